//! Log lines through the host's `log` import; the host tags them with the plugin's name.

use crate::bindings::driver_world::gve::hypervisor::log as wit;

pub use wit::Level;

/// Emits one log line at `level`.
pub fn log(level: Level, message: &str) {
    wit::log(level, message);
}

/// Emits a `trace` line.
pub fn trace(message: &str) {
    wit::log(Level::Trace, message);
}

/// Emits a `debug` line.
pub fn debug(message: &str) {
    wit::log(Level::Debug, message);
}

/// Emits an `info` line.
pub fn info(message: &str) {
    wit::log(Level::Info, message);
}

/// Emits a `warn` line.
pub fn warn(message: &str) {
    wit::log(Level::Warn, message);
}

/// Emits an `error` line.
pub fn error(message: &str) {
    wit::log(Level::Error, message);
}
