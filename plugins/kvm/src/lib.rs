//! gve driver for QEMU/KVM through libvirt (`plugins/kvm`).
//!
//! Speaks to libvirt only through the host's `libvirt` import (granted URIs only),
//! with the session `gve-libvirt-common` shares with the xen driver. Templates are
//! persistent domains labelled `gve.template=true` whose disks are qcow2 volumes in a
//! storage pool; create and clone make copy-on-write overlays (linked) or full copies
//! in that pool. Works on TCG and on KVM: the domain type comes from the template (or
//! the `domain-type` config value), never assumed.
//!
//! Config values: `storage-pool` (default `gve`), `shutdown-timeout-ms` (default
//! 20000: a graceful shutdown that does not finish in time is forced), `domain-type`
//! (default: the template's), `shared-storage` (default false: migration copies the
//! disks' top layers; true: every destination sees the pool's disks at the same
//! paths, so nothing is copied), `peer-to-peer` (default false; true: the source's
//! libvirtd drives a migration itself, see `gve-libvirt-common`).
//!
//! A template's processor (`<cpu>`: mode, `match`, `check`, `migratable`, model,
//! features) is given to every VM created or cloned from it (`host-model` on a
//! KVM host, `maximum` under TCG, a named model); its topology, NUMA cells, cache,
//! `maxphysaddr` and vendor are not. A `host-passthrough` or `host-model` template
//! made a TCG domain by `domain-type = "qemu"` does not start: libvirt refuses
//! those modes under TCG.
//!
//! Exports `gve:hypervisor/bulk` too (capability `bulk-copy`): a copy's bytes go
//! through a raw disk staged in the pool and attached live to the running VM.

use gve_libvirt_common::bulk::StagedDisk;
use gve_libvirt_common::domain::{DiskView, DomainView};
use gve_libvirt_common::{storage_pool, Flavor, LibvirtSession};
use gve_sdk::libvirt::{Disk, DiskFormat, DomainXml};
use gve_sdk::prelude::*;
use gve_sdk::BulkCopy;

/// QEMU/KVM domains: qcow2 disks on virtio, a serial console, the guest agent's
/// virtio channel, ACPI.
pub struct QemuFlavor;

impl Flavor for QemuFlavor {
    const DRIVER: &'static str = "kvm";
    const DISK_FORMAT: DiskFormat = DiskFormat::Qcow2;
    const LINKED_CLONES: bool = true;
    const GUEST_AGENT: bool = true;
    const STORAGE_MIGRATION: bool = true;

    fn skeleton(name: &str, base: &DomainView) -> DomainXml {
        let domain_type =
            gve_sdk::config::get("domain-type").unwrap_or_else(|| base.domain_type.clone());
        DomainXml::new(name)
            .domain_type(domain_type)
            .serial_console()
            .guest_agent()
            .acpi(true)
    }

    fn disk(path: String, old: &DiskView) -> Disk {
        Disk::new(path, DiskFormat::Qcow2, old.target.clone())
    }
}

/// The kvm driver.
pub struct Kvm;

impl Driver for Kvm {
    type Session = LibvirtSession<QemuFlavor>;

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

    fn open(endpoint: String, _credentials: Credentials) -> Result<Self::Session> {
        LibvirtSession::open(endpoint)
    }
}

/// Bulk copies: a raw disk in the pool, attached live as a virtio disk.
impl BulkCopy for Kvm {
    type Transfer = StagedDisk;

    fn stage(
        endpoint: String,
        _credentials: Credentials,
        vm: String,
        id: String,
        size: u64,
    ) -> Result<StagedDisk> {
        StagedDisk::stage(&endpoint, &storage_pool(), &vm, &id, size)
    }

    fn release_left(
        endpoint: String,
        _credentials: Credentials,
        vm: String,
        id: String,
    ) -> Result<()> {
        StagedDisk::release_left(&endpoint, &storage_pool(), &vm, &id)
    }
}

gve_sdk::export_driver_with_bulk!(Kvm);
