//! gve: the Grid Virtualization Engine.
//!
//! Layers, outermost first: [`cli`] → [`api`] (HTTP plumbing) → [`site`] → [`agent`] → [`plugin`]
//! (the sandboxed plugin host) → plugins (WebAssembly components) → hypervisors.

pub mod agent;
pub mod api;
pub mod cli;
pub mod heap;
pub mod libvirt_events;
pub mod libvirt_log;
pub mod metrics;
pub mod plugin;
pub mod private_fs;
pub mod sealing;
pub mod site;
pub mod store_core;
pub mod tls;
