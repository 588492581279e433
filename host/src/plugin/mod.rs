//! The sandboxed plugin host: WebAssembly components implementing the
//! `gve:hypervisor` contract, loaded, replaced and unloaded at runtime.
//!
//! Layers, outermost first, each importing only those after it:
//! [`host::PluginHost`] (load/replace/unload) → [`session`], [`transfer`] and [`bulk`] (calls,
//! answers checked by [`answers`]) → [`slot`] (a name and its current version) →
//! [`version`] (one loaded version) → [`pool`] (its warm instances) → [`instance`]
//! (one store: deadline, memory cap, budgets, trap mapping) → [`bindings`] (the
//! generated contract) → [`caps`] (what a plugin may reach, each with its policy).

pub mod answers;
pub mod bindings;
pub mod budget;
pub mod bulk;
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
pub(crate) mod pool;
pub mod session;
pub mod slot;
pub mod state;
pub mod transfer;
pub mod version;

pub use bulk::BulkTransfer;
pub use error::{DriverError, ErrorKind, PluginError};
pub use grants::{DirGrant, Grants, Limits};
pub use host::{Footprint, HostConfig, PluginHost, PluginSpec, PluginSummary};
pub use session::{DriverSession, GuestSession};
pub use transfer::{Download, Upload};
