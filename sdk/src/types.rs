//! Every record, enum and flags type of the contract's `types` interface, plus the
//! contract's [`Error`]. This module is the one Rust home of those types: both
//! generated worlds use it.

pub use crate::bindings::driver_world::gve::hypervisor::types::*;
pub use crate::error::Error;
