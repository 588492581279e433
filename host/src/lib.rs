//! gve: the Grid Virtualization Engine.
pub mod plugin;
