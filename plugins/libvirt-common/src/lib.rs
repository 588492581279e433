//! What gve's libvirt drivers share (`plugins/kvm`, `plugins/xen`): one session type
//! speaking to libvirt through the host's `libvirt` import, made for a hypervisor by a
//! [`Flavor`] (the shape of its domains and disks, what it can and cannot do).
//!
//! Templates are persistent domains labelled `gve.template=true` whose disks are
//! volumes in a storage pool; create and clone make copy-on-write overlays (linked,
//! where the flavor's disk format has them) or full copies in that pool.
//!
//! Config values every flavor reads: `storage-pool` (default `gve`),
//! `shutdown-timeout-ms` (default 20000: a graceful shutdown that does not finish in
//! time, or within what is left of the plugin's call less 3 s, is forced),
//! `shared-storage` (default false: migration copies the disks where the flavor can;
//! true: every destination sees the pool's disks at the same paths,
//! so nothing is copied), `peer-to-peer` (default false: this client drives a live
//! migration's steps on both daemons; true: the source's libvirtd drives it and
//! connects to the destination URI itself, which must then resolve from the source
//! host).

pub mod bulk;
pub mod domain;
pub mod migration;
mod session;

pub use session::LibvirtSession;

use gve_sdk::libvirt::{Disk, DiskFormat, DomainXml, UndefineFlags};

use domain::{DiskView, DomainView};

/// The storage pool the driver makes disks in (config `storage-pool`, default `gve`).
pub fn storage_pool() -> String {
    gve_sdk::config::get("storage-pool").unwrap_or_else(|| "gve".to_string())
}

/// What differs between the hypervisors gve drives through libvirt.
pub trait Flavor: 'static {
    /// The driver's name, for messages (`kvm`, `xen`).
    const DRIVER: &'static str;
    /// Format of the disks create and clone make.
    const DISK_FORMAT: DiskFormat;
    /// Linked clones: copy-on-write overlays of the source's disks.
    const LINKED_CLONES: bool;
    /// Domains have a QEMU guest agent channel libvirt can reach.
    const GUEST_AGENT: bool;
    /// libvirt can copy non-shared disks while migrating.
    const STORAGE_MIGRATION: bool;
    /// Migrating with disks on storage the operator declared shared takes
    /// `VIR_MIGRATE_UNSAFE` (QEMU cannot prove plain directories shared); libxl does
    /// not know the flag and refuses it.
    const UNSAFE_WHEN_SHARED: bool = true;

    /// What undefining a VM removes with it: managed-save image, snapshot metadata
    /// and NVRAM where the hypervisor has them (libvirt refuses flags it does not know).
    fn undefine_flags() -> UndefineFlags {
        UndefineFlags::MANAGED_SAVE | UndefineFlags::SNAPSHOTS_METADATA | UndefineFlags::NVRAM
    }

    /// The error a failed start of `vm` reports: `e`, or `e` with what the operator
    /// should know about this hypervisor.
    fn start_failed(_vm: &str, e: gve_sdk::Error) -> gve_sdk::Error {
        e
    }

    /// Refuses a template or source VM this flavor cannot derive VMs from.
    fn check_base(_base: &DomainView) -> gve_sdk::Result<()> {
        Ok(())
    }

    /// The start of the definition of a new domain `name` modelled on `base` (a
    /// template or a source VM): domain and OS type, console, features. The session
    /// adds memory, vCPUs, boot, disks, networks and labels.
    fn skeleton(name: &str, base: &DomainView) -> DomainXml;

    /// The new domain's disk at `path`, standing where the base had `old`.
    fn disk(path: String, old: &DiskView) -> Disk;
}
