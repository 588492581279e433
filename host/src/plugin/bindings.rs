//! The host's Rust view of the WIT contract, generated once from `wit/0.1`.
//!
//! Everything else in the host uses the types re-exported from here; nothing else
//! calls `bindgen!`.

wasmtime::component::bindgen!({
    path: "../wit/0.1",
    world: "plugin-host",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "gve:hypervisor/libvirt.connection": crate::plugin::caps::libvirt::Connection,
        "gve:hypervisor/digest.sha256": crate::plugin::caps::digest::Sha256State,
    },
});

pub use exports::gve::hypervisor::bulk as bulk_export;
pub use exports::gve::hypervisor::driver as driver_export;
pub use exports::gve::hypervisor::guest as guest_export;
pub use gve::hypervisor::types;
