//! The sandboxed plugin host: WebAssembly components implementing the
//! `gve:hypervisor` contract, loaded, replaced and unloaded at runtime.
//!
//! Layers, outermost first: [`host::PluginHost`] (load/replace/unload, slots) →
//! [`session`] (per-endpoint instance pools) → [`instance`] (one store, deadline,
//! memory cap, trap mapping) → [`bindings`] (the generated contract) → [`caps`]
//! (what a plugin may reach).

pub mod bindings;
pub mod cache;
pub mod caps;
pub mod contract;
mod convert;
pub mod engine;
pub mod error;
pub mod grants;
pub mod host;
pub mod instance;
pub mod limits;
pub mod manifest;
pub mod session;
pub mod state;

pub use error::{DriverError, ErrorKind, PluginError};
pub use grants::{DirGrant, Grants, Limits};
pub use host::{HostConfig, PluginHost, PluginSpec, PluginSummary};
pub use session::{DriverSession, GuestSession};
