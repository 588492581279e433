//! Shared test support: the plugin bundles (built once) and a memory target.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use gve::plugin::bindings::types::Credentials;
use gve::plugin::{Grants, Limits};
use gve_conformance::Target;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds every plugin bundle (once) and returns the directory of `name`.
pub fn bundle(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("scripts/build-plugins.sh"))
            .output()
            .expect("run scripts/build-plugins.sh");
        assert!(
            out.status.success(),
            "building plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"))
            .join("plugins")
    })
    .join(name)
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
        template: Some("alpine-3".into()),
    }
}
