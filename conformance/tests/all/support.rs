//! Shared test support: the plugin bundles (built once) and a memory target.

use std::path::PathBuf;

use gve::plugin::bindings::types::Credentials;
use gve::plugin::{Grants, Limits};
use gve_conformance::Target;

/// The bundle directory of plugin `name` (all built once per test run).
pub fn bundle(name: &str) -> PathBuf {
    gve_harness::plugin_bundles().join(name)
}

/// No credentials.
pub fn no_creds() -> Credentials {
    Credentials {
        username: None,
        password: None,
        token: None,
    }
}

/// The memory example on a fresh endpoint, with a second host and a template.
pub fn memory_target() -> Target {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Target {
        bundle: bundle("memory"),
        endpoint: format!("memory:conformance-{id}"),
        credentials: no_creds(),
        grants: Grants::default(),
        limits: Limits::default(),
        second_host: Some(format!("memory:conformance-{id}-b")),
        destination_host: None,
        linked_source: None,
        label: None,
        template: Some("alpine-3".into()),
        guest_plugin: None,
    }
}
