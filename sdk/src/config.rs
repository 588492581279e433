//! The plugin's own configuration values, set by the operator (`config` import).

use crate::bindings::driver_world::gve::hypervisor::config as wit;

/// One value, if the operator set it.
pub fn get(key: &str) -> Option<String> {
    wit::get(key)
}

/// Every value set for this plugin, as `(key, value)` pairs.
pub fn all() -> Vec<(String, String)> {
    wit::all()
}

/// A value parsed with [`str::parse`], or `default` when it is unset; a value that does
/// not parse is an [`crate::Error::InvalidArgument`] naming the key.
pub fn parse_or<T: core::str::FromStr>(key: &str, default: T) -> crate::Result<T> {
    match get(key) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| {
            crate::Error::invalid_argument(format!("config value {key} = {v:?} is not valid"))
        }),
    }
}
