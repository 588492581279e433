//! gve driver for Xen through libvirt's libxl driver (`plugins/xen`).
//!
//! Speaks to libvirt only through the host's `libvirt` import (granted URIs only:
//! `xen:///system` on dom0 itself, `xen+tls://`, `xen+ssh://` or `xen+tcp://` from
//! elsewhere), with the session `gve-libvirt-common` shares with the kvm driver.
//! Templates are persistent PV domains labelled `gve.template=true` (kernel and initrd,
//! or a disk booted by a PV bootloader) whose disks are raw volumes in a storage pool
//! in dom0; create and clone copy those volumes in full (raw files have no
//! copy-on-write overlays), and `blkback` serves them to the guest, so dom0 needs no
//! QEMU.
//!
//! Migration, live or not, between Xen hosts that share the pool's storage (the
//! operator says so with `shared-storage = true`: libxl copies memory, never disks):
//! the host's libvirt client drives both daemons, and the source dom0 sends the
//! domain straight to the address the destination's libvirtd names (its host name,
//! a port in 49152-49216), so dom0s must resolve and reach each other. A stopped VM
//! moves as its definition.
//!
//! Not here, and said so: linked clones (raw disks), migration without shared
//! storage, guest operations (the libxl driver has no guest agent channel), HVM
//! templates (refused: unproven, Xen under TCG runs no HVM guest). One backend today,
//! libvirt, chosen by the endpoint's scheme in [`Xen::open`]: XAPI (XenServer,
//! XCP-ng) would be a second session type beside it, for `https://` endpoints.
//!
//! Config values: `storage-pool` (default `gve`), `shutdown-timeout-ms` (default
//! 20000: a guest that does not power off when asked is destroyed then),
//! `shared-storage` (default false: migration is refused, saying why).

use gve_libvirt_common::domain::{DiskView, DomainView};
use gve_libvirt_common::{Flavor, LibvirtSession};
use gve_sdk::libvirt::{Disk, DiskFormat, DomainXml, OsType, UndefineFlags};
use gve_sdk::prelude::*;

/// Xen PV domains: raw disks served by `blkback` on the Xen bus, Xen's console.
pub struct XenPv;

impl Flavor for XenPv {
    const DRIVER: &'static str = "xen";
    const DISK_FORMAT: DiskFormat = DiskFormat::Raw;
    const LINKED_CLONES: bool = false;
    const GUEST_AGENT: bool = false;
    const STORAGE_MIGRATION: bool = false;
    const UNSAFE_WHEN_SHARED: bool = false;

    fn undefine_flags() -> UndefineFlags {
        // libxl keeps no snapshots or NVRAM, and refuses those flags.
        UndefineFlags::MANAGED_SAVE
    }

    fn start_failed(vm: &str, e: Error) -> Error {
        if e.kind() != "backend" {
            return e;
        }
        // Seen when libvirtd died while libxl built the domain: Xen keeps the
        // half-made domain, the restarted libvirtd does not know it, and the name is
        // taken.
        Error::backend(format!(
            "{}; if `xl list` in dom0 shows a domain named '{vm}' that libvirt reports shut \
             off, it was left by a libvirtd that died while building it: `xl destroy {vm}` \
             frees the name",
            e.message()
        ))
    }

    fn check_base(base: &DomainView) -> Result<()> {
        match base.os_type.as_deref() {
            Some("linux") | Some("xen") | None => Ok(()),
            Some(other) => Err(Error::unsupported(format!(
                "the xen driver makes PV guests only; this one's OS type is '{other}'"
            ))),
        }
    }

    fn skeleton(name: &str, _base: &DomainView) -> DomainXml {
        DomainXml::new(name)
            .domain_type("xen")
            .os_type(OsType::Xen)
            .acpi(false)
            .xen_console()
    }

    fn disk(path: String, old: &DiskView) -> Disk {
        Disk::xen_pv(path, old.target.clone())
    }
}

/// The xen driver.
pub struct Xen;

impl Driver for Xen {
    type Session = LibvirtSession<XenPv>;

    fn info() -> DriverInfo {
        DriverInfo {
            name: "xen".into(),
            version: "0.1.0".into(),
            hypervisor_kind: "xen".into(),
            capabilities: Capabilities::CREATE
                | Capabilities::CLONE
                | Capabilities::START
                | Capabilities::SHUTDOWN
                | Capabilities::SUSPEND
                | Capabilities::RESUME
                | Capabilities::DESTROY
                | Capabilities::MIGRATE
                | Capabilities::LIVE_MIGRATE
                | Capabilities::TEMPLATES,
        }
    }

    fn open(endpoint: String, _credentials: Credentials) -> Result<Self::Session> {
        match endpoint.split_once("://").map(|(scheme, _)| scheme) {
            Some(s) if s == "xen" || s.starts_with("xen+") => LibvirtSession::open(endpoint),
            Some("http") | Some("https") => Err(Error::unsupported(format!(
                "{endpoint}: the xen driver speaks to Xen through libvirt (xen://, xen+tls://, \
                 xen+ssh://, xen+tcp://); XAPI (XenServer, XCP-ng) is not supported"
            ))),
            _ => Err(Error::invalid_argument(format!(
                "'{endpoint}' is not a libvirt Xen URI (xen:///system, xen+tls://host/system, ...)"
            ))),
        }
    }
}

gve_sdk::export_driver!(Xen);
