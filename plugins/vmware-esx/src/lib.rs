//! gve driver for VMware ESXi and vCenter (`plugins/vmware-esx`).
//!
//! Speaks the vSphere Web Services (SOAP) API over the host's `wasi:http`, to
//! authorities the operator granted, with TLS verified as the operator says (a CA or
//! a pinned certificate). The endpoint is the SDK URL (`https://vc.example.org/sdk`);
//! credentials are the vSphere user's. VMs are named by managed object id (`vm-57`)
//! or display name; `host` in answers is the ESXi host's name; migration relocates a
//! VM to another host of the same endpoint (named by id or name). Templates are
//! vSphere templates; linked clones share the source's current snapshot. Guest
//! operations are native (VMware Tools), see [`guest`].
//!
//! Config values: `task-timeout-ms` (25000), `request-timeout-ms` (20000),
//! `shutdown-timeout-ms` (20000), `plain-http` (false), `datastore`,
//! `resource-pool`, `guest-id` (otherLinux64Guest), `guest-username`,
//! `guest-password`, `max-transfer-mib` (32).

pub mod fault;
#[cfg(test)]
mod fuzz;
pub mod guest;
pub mod inventory;
pub mod props;
pub mod session;
pub mod settings;
pub mod soap;
pub mod task;
pub mod vm;
pub mod xml;

use gve_sdk::prelude::*;

/// The vmware-esx driver.
pub struct Esx;

impl Driver for Esx {
    type Session = session::EsxSession;

    fn info() -> DriverInfo {
        DriverInfo {
            name: "vmware-esx".into(),
            version: "0.1.0".into(),
            hypervisor_kind: "esx".into(),
            capabilities: Capabilities::CREATE
                | Capabilities::CLONE
                | Capabilities::LINKED_CLONE
                | Capabilities::START
                | Capabilities::SHUTDOWN
                | Capabilities::SUSPEND
                | Capabilities::RESUME
                | Capabilities::MIGRATE
                | Capabilities::LIVE_MIGRATE
                | Capabilities::DESTROY
                | Capabilities::TEMPLATES
                | Capabilities::GUEST_NATIVE,
        }
    }

    fn open(endpoint: String, credentials: Credentials) -> Result<session::EsxSession> {
        session::EsxSession::open(endpoint, credentials)
    }
}

impl GuestAccess for Esx {
    type Session = guest::EsxGuestSession;

    fn open(endpoint: String, credentials: Credentials) -> Result<guest::EsxGuestSession> {
        guest::EsxGuestSession::open(endpoint, credentials)
    }
}

gve_sdk::export_driver_with_guest!(Esx);
