//! gve driver for QEMU/KVM through libvirt (`plugins/kvm`).
//!
//! Speaks to libvirt only through the host's `libvirt` import (granted URIs only).
//! Templates are persistent domains labelled `gve.template=true` whose disks are qcow2
//! volumes in a storage pool; create and clone make copy-on-write overlays (linked) or
//! full copies in that pool. Works on TCG and on KVM: the domain type comes from the
//! template (or the `domain-type` config value), never assumed.
//!
//! Config values: `storage-pool` (default `gve`), `shutdown-timeout-ms` (default
//! 20000: a graceful shutdown that does not finish in time is forced), `domain-type`
//! (default: the template's), `shared-storage` (default false: migration copies the
//! disks' top layers; true: every destination sees the pool's disks at the same
//! paths, so nothing is copied).

mod domain;
mod session;

use gve_sdk::prelude::*;

/// The kvm driver.
pub struct Kvm;

impl Driver for Kvm {
    type Session = session::KvmSession;

    fn info() -> DriverInfo {
        DriverInfo {
            name: "kvm".into(),
            version: "0.1.0".into(),
            hypervisor_kind: "qemu".into(),
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
                | Capabilities::GUEST_AGENT_CHANNEL,
        }
    }

    fn open(endpoint: String, _credentials: Credentials) -> Result<session::KvmSession> {
        session::KvmSession::open(endpoint)
    }
}

gve_sdk::export_driver!(Kvm);
