//! libvirt through the host's `libvirt` import (the manifest must request `libvirt`,
//! and the operator must grant the URIs), plus [`DomainXml`] to define domains.
//!
//! ```no_run
//! # fn demo() -> gve_sdk::Result<()> {
//! use gve_sdk::libvirt::{Connection, Disk, DiskFormat, DomainXml};
//! let conn = Connection::open("qemu:///system")?;
//! let xml = DomainXml::new("web-1")
//!     .memory_mib(1024)
//!     .vcpus(2)
//!     .disk(Disk::new("/var/lib/gve/web-1.qcow2", DiskFormat::Qcow2, "vda"))
//!     .network("default")
//!     .guest_agent();
//! let domain = conn.define_domain(&xml.to_xml())?;
//! conn.start_domain(&domain.name)?;
//! # Ok(()) }
//! ```

mod domain_xml;

pub use crate::bindings::driver_world::gve::hypervisor::libvirt::{
    Connection, Domain, DomainState, MigrateFlags, NodeInfo, UndefineFlags, Volume,
};
pub use domain_xml::{
    escape, Cpu, Disk, DiskBackend, DiskBus, DiskFormat, DomainXml, Interface, OsType,
    LABELS_NAMESPACE,
};
