//! The contract's guest bindings, generated from `wit/0.1`.
//!
//! [`driver_world`] (world `hypervisor-driver`) generates every interface the worlds
//! share: `types`, `log`, `config`, `deadline`, `digest` and `libvirt`, and the `driver` export.
//! [`guest_world`] (world `guest-provider`) maps those onto the first module with
//! `with`, so each WIT type has exactly one Rust type, and adds the `guest-channel`
//! import and the `guest` export.
//!
//! World `hypervisor-driver-with-guest` is not generated on its own: wit-bindgen
//! names the hidden per-interface export macros after the interface
//! (`__export_gve_hypervisor_driver_0_1_0_cabi`) and `#[macro_export]`s them at the
//! crate root, so two worlds exporting `driver` cannot live in one crate. Its
//! exports are exactly the union of the two worlds' exports, and wit-component
//! merges the type sections of both worlds into that union when a plugin invokes
//! both export macros, which is what [`crate::export_driver_with_guest!`] does.
//!
//! [`bulk_world`] (world `bulk-provider`, contract 0.1.1) does the same for the
//! `bulk` export, which a driver adds with [`crate::export_driver_with_bulk!`].
//!
//! Plugins use [`crate::export_driver!`], [`crate::export_guest!`],
//! [`crate::export_driver_with_guest!`] and [`crate::export_driver_with_bulk!`],
//! never the generated macros directly.

/// World `hypervisor-driver`: imports `log`, `config`, `deadline`, `digest`, `libvirt`; exports `driver`.
#[allow(missing_docs, clippy::all)]
pub mod driver_world {
    wit_bindgen::generate!({
        path: "../wit/0.1",
        world: "hypervisor-driver",
        with: {
            "gve:hypervisor/types@0.1.3/error": crate::error::Error,
        },
        additional_derives: [PartialEq],
        pub_export_macro: true,
        export_macro_name: "__gve_export_driver_world",
        default_bindings_module: "gve_sdk::bindings::driver_world",
    });
}

/// World `guest-provider`: imports `log`, `config`, `deadline`, `digest`, `guest-channel`; exports `guest`.
#[allow(missing_docs, clippy::all)]
pub mod guest_world {
    wit_bindgen::generate!({
        path: "../wit/0.1",
        world: "guest-provider",
        with: {
            "gve:hypervisor/types@0.1.3": crate::types,
            "gve:hypervisor/log@0.1.3": crate::bindings::driver_world::gve::hypervisor::log,
            "gve:hypervisor/config@0.1.3": crate::bindings::driver_world::gve::hypervisor::config,
            "gve:hypervisor/deadline@0.1.3": crate::bindings::driver_world::gve::hypervisor::deadline,
            "gve:hypervisor/digest@0.1.3": crate::bindings::driver_world::gve::hypervisor::digest,
        },
        additional_derives: [PartialEq],
        pub_export_macro: true,
        export_macro_name: "__gve_export_guest_world",
        default_bindings_module: "gve_sdk::bindings::guest_world",
    });
}

/// World `bulk-provider`: imports `log`, `config`, `deadline`, `digest`, `libvirt`; exports `bulk`.
#[allow(missing_docs, clippy::all)]
pub mod bulk_world {
    wit_bindgen::generate!({
        path: "../wit/0.1",
        world: "bulk-provider",
        with: {
            "gve:hypervisor/types@0.1.3": crate::types,
            "gve:hypervisor/log@0.1.3": crate::bindings::driver_world::gve::hypervisor::log,
            "gve:hypervisor/config@0.1.3": crate::bindings::driver_world::gve::hypervisor::config,
            "gve:hypervisor/deadline@0.1.3": crate::bindings::driver_world::gve::hypervisor::deadline,
            "gve:hypervisor/digest@0.1.3": crate::bindings::driver_world::gve::hypervisor::digest,
            "gve:hypervisor/libvirt@0.1.3": crate::bindings::driver_world::gve::hypervisor::libvirt,
        },
        pub_export_macro: true,
        export_macro_name: "__gve_export_bulk_world",
        default_bindings_module: "gve_sdk::bindings::bulk_world",
    });
}
