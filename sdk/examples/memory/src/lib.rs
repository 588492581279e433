//! # gve example driver "memory"
//!
//! A complete driver whose "hypervisor" is a map in the component's own memory, one
//! per endpoint string (`memory:<anything>`). It implements the whole contract,
//! `driver` and `guest`, with the state machine and errors a real driver must have,
//! so it doubles as the executable specification of `gve:hypervisor@0.1.3` and as
//! the fixture of the host's tests.
//!
//! Because its VMs live in instance memory, its manifest declares
//! `limits.concurrency = 1`: the host must keep one instance for it.
//!
//! An endpoint `memory:<name>?vms=N` starts with N stopped VMs (named `vm-0000000`,
//! ..., with ids `seed-<hash of the endpoint>-<i>`; at most 200,000), the same ids
//! every time: a host already full, for benches.
//!
//! Operator configuration (`gve plugin config` / grants): `password` (sessions must
//! present it), `cpus` (default 16) and `memory-mib` (default 65536), the capacity of
//! every simulated host.

#![warn(missing_docs)]

mod exec;
mod fs;
mod guest;
mod session;
mod state;

use gve_sdk::prelude::*;

pub use guest::{MemoryGuestSession, MemoryUpload};
pub use session::MemorySession;

/// The driver type named in the export macro.
pub struct Memory;

/// Plugin name; equals `name` in `gve-plugin.toml`.
pub const NAME: &str = "memory";
/// Plugin version; equals `version` in `gve-plugin.toml`.
pub const VERSION: &str = "0.1.0";

impl Driver for Memory {
    type Session = MemorySession;

    fn info() -> DriverInfo {
        DriverInfo {
            name: NAME.into(),
            version: VERSION.into(),
            hypervisor_kind: "memory".into(),
            capabilities: Capabilities::all(),
        }
    }

    fn open(endpoint: String, credentials: Credentials) -> Result<MemorySession> {
        authenticate(&endpoint, &credentials)?;
        state::touch(&endpoint);
        gve_sdk::log::debug(&format!("session opened on {endpoint}"));
        Ok(MemorySession::new(endpoint))
    }
}

impl GuestAccess for Memory {
    type Session = MemoryGuestSession;

    fn open(endpoint: String, credentials: Credentials) -> Result<MemoryGuestSession> {
        authenticate(&endpoint, &credentials)?;
        state::touch(&endpoint);
        Ok(MemoryGuestSession::new(endpoint))
    }
}

/// Checks the endpoint's form and, when the operator set a `password`, the credentials.
fn authenticate(endpoint: &str, credentials: &Credentials) -> Result<()> {
    if !endpoint.starts_with("memory:") {
        return Err(Error::invalid_argument(format!(
            "endpoint {endpoint:?} is not a memory endpoint (expected memory:<name>)"
        )));
    }
    state::seed_count(endpoint)?;
    if let Some(expected) = gve_sdk::config::get("password") {
        if credentials.password.as_deref() != Some(expected.as_str()) {
            return Err(Error::denied(format!(
                "wrong or missing password for {endpoint}"
            )));
        }
    }
    Ok(())
}

gve_sdk::export_driver_with_guest!(Memory);
