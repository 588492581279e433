//! # gve-sdk: write gve hypervisor drivers as WebAssembly components
//!
//! A plugin is a `cdylib` crate built for `wasm32-wasip2` that implements plain Rust
//! traits and names its type in one export macro:
//!
//! | plugin exports | implement | macro |
//! |---|---|---|
//! | `gve:hypervisor/driver` | [`Driver`] + [`Session`] | [`export_driver!`] |
//! | `gve:hypervisor/guest` | [`GuestAccess`] + [`GuestSession`] (+ [`Upload`], [`Download`]) | [`export_guest!`] |
//! | both | all of the above | [`export_driver_with_guest!`] |
//! | `driver` and `bulk` (0.1.1: capability `bulk-copy`) | [`Driver`] + [`BulkCopy`] + [`BulkTransfer`] | [`export_driver_with_bulk!`] |
//!
//! Host imports are wrapped in [`log`], [`config`], [`deadline`], [`digest`], [`libvirt`], [`guest_channel`],
//! and `wasi:http` in [`http`]. Every contract type is in [`types`] (and re-exported
//! here); the one error type is [`Error`]. See the crate's README for a walk-through
//! from an empty crate to a driver loaded into a running agent.
//!
//! ```no_run
//! use gve_sdk::prelude::*;
//!
//! struct Hello;
//! struct HelloSession;
//!
//! impl Driver for Hello {
//!     type Session = HelloSession;
//!     fn info() -> DriverInfo {
//!         DriverInfo {
//!             name: "hello".into(),
//!             version: "0.1.0".into(),
//!             hypervisor_kind: "none".into(),
//!             capabilities: Capabilities::empty(),
//!         }
//!     }
//!     fn open(_endpoint: String, _credentials: Credentials) -> Result<HelloSession> {
//!         Ok(HelloSession)
//!     }
//! }
//!
//! impl Session for HelloSession {
//!     fn list_vms(&mut self) -> Result<Vec<VmInfo>> {
//!         Ok(Vec::new())
//!     }
//! }
//!
//! gve_sdk::export_driver!(Hello);
//! ```

#![warn(missing_docs)]

pub mod bindings;
mod bulk;
pub mod config;
pub mod deadline;
pub mod digest;
mod driver;
pub mod error;
mod guest;
pub mod guest_channel;
pub mod http;
pub mod libvirt;
pub mod log;
pub mod types;

pub use bulk::{BulkCopy, BulkTransfer};
pub use driver::{Driver, Session};
pub use error::{Error, Result};
pub use guest::{BytesDownload, Download, GuestAccess, GuestSession, NoTransfer, Upload};
pub use types::{
    Capabilities, Credentials, DriverInfo, EnvVar, ExecRequest, ExecResult, FileInfo, HostInfo,
    Label, VmInfo, VmProfile, VmResources, VmState,
};

#[doc(hidden)]
pub use bulk::TransferResource;
#[doc(hidden)]
pub use driver::SessionResource;
#[doc(hidden)]
pub use guest::{DownloadResource, GuestSessionResource, UploadResource};

/// The traits and types most plugins need: `use gve_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::types::state_name;
    pub use crate::{
        BytesDownload, Capabilities, Credentials, Download, Driver, DriverInfo, EnvVar, Error,
        ExecRequest, ExecResult, FileInfo, GuestAccess, GuestSession, HostInfo, Label, NoTransfer,
        Result, Session, Upload, VmInfo, VmProfile, VmResources, VmState,
    };
}

/// Exports a [`Driver`] as the component's `gve:hypervisor/driver` interface (world
/// `hypervisor-driver`). Invoke it once, at the root of the plugin crate.
#[macro_export]
macro_rules! export_driver {
    ($ty:ty) => {
        const _: () = {
            fn __gve_assert_driver<T: $crate::Driver>() {}
            let _ = __gve_assert_driver::<$ty>;
        };
        const _: () = {
            type __GveExportedDriver = $ty;
            $crate::bindings::driver_world::__gve_export_driver_world!(
                __GveExportedDriver with_types_in $crate::bindings::driver_world
            );
        };
    };
}

/// Exports a [`GuestAccess`] as the component's `gve:hypervisor/guest` interface
/// (world `guest-provider`). Invoke it once, at the root of the plugin crate.
#[macro_export]
macro_rules! export_guest {
    ($ty:ty) => {
        const _: () = {
            fn __gve_assert_guest<T: $crate::GuestAccess>() {}
            let _ = __gve_assert_guest::<$ty>;
        };
        const _: () = {
            type __GveExportedGuest = $ty;
            $crate::bindings::guest_world::__gve_export_guest_world!(
                __GveExportedGuest with_types_in $crate::bindings::guest_world
            );
        };
    };
}

/// Exports a type that is both a [`Driver`] and a [`GuestAccess`] as the component's
/// `gve:hypervisor/driver` and `gve:hypervisor/guest` interfaces (world
/// `hypervisor-driver-with-guest`, the union of the other two worlds).
#[macro_export]
macro_rules! export_driver_with_guest {
    ($ty:ty) => {
        $crate::export_driver!($ty);
        $crate::export_guest!($ty);
    };
}

/// Exports a [`BulkCopy`] as the component's `gve:hypervisor/bulk` interface (world
/// `bulk-provider`). A driver invokes it next to [`export_driver!`], or both at
/// once with [`export_driver_with_bulk!`].
#[macro_export]
macro_rules! export_bulk {
    ($ty:ty) => {
        const _: () = {
            fn __gve_assert_bulk<T: $crate::BulkCopy>() {}
            let _ = __gve_assert_bulk::<$ty>;
        };
        const _: () = {
            type __GveExportedBulk = $ty;
            $crate::bindings::bulk_world::__gve_export_bulk_world!(
                __GveExportedBulk with_types_in $crate::bindings::bulk_world
            );
        };
    };
}

/// Exports a type that is both a [`Driver`] and a [`BulkCopy`] as the component's
/// `gve:hypervisor/driver` and `gve:hypervisor/bulk` interfaces (world
/// `hypervisor-driver-with-bulk`; the host reports the capability `bulk-copy`).
#[macro_export]
macro_rules! export_driver_with_bulk {
    ($ty:ty) => {
        $crate::export_driver!($ty);
        $crate::export_bulk!($ty);
    };
}
