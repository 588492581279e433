//! Integration tests of gve-conformance: one binary, a module per area.

mod broken;
mod cli;
mod memory;
mod support;
