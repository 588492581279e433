//! Every record, enum and flags type of the contract's `types` interface, plus the
//! contract's [`Error`]. This module is the one Rust home of those types: both
//! generated worlds use it.

pub use crate::bindings::driver_world::gve::hypervisor::types::*;
pub use crate::error::Error;

/// The contract's name of a VM state (`running`, `stopped`, ...), for messages.
pub fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Stopped => "stopped",
        VmState::Suspended => "suspended",
        VmState::Paused => "paused",
        VmState::Crashed => "crashed",
        VmState::Migrating => "migrating",
        VmState::Unknown => "unknown",
    }
}
