//! Shared test support: builds the plugin components from source once per test run,
//! and makes plugin hosts and specs in temporary directories.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use gve::plugin::bindings::types::Credentials;
use gve::plugin::{Grants, HostConfig, Limits, PluginHost, PluginSpec};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds every plugin bundle from source (once) and returns `target/plugins`.
pub fn bundles() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("scripts/build-plugins.sh"))
            .output()
            .expect("run scripts/build-plugins.sh");
        assert!(
            out.status.success(),
            "building plugins failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"));
        target.join("plugins")
    })
}

/// The bundle directory of one plugin.
pub fn bundle(name: &str) -> PathBuf {
    bundles().join(name)
}

/// A plugin host with its own artifact cache in a temp dir.
pub fn host() -> (PluginHost, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new(HostConfig {
        cache_dir: dir.path().join("cache"),
        engine: Default::default(),
    })
    .unwrap();
    (host, dir)
}

/// A spec for `name` with grants and default limits.
pub fn spec(name: &str, grants: Grants) -> PluginSpec {
    PluginSpec {
        bundle: bundle(name),
        grants,
        limits: Limits::default(),
    }
}

/// No credentials.
pub fn no_creds() -> Credentials {
    Credentials {
        username: None,
        password: None,
        token: None,
    }
}

/// Where [`edited_bundle`] puts its copies (a directory tests may allow).
pub fn edited_bundles_dir() -> PathBuf {
    let d = std::env::temp_dir().join("gve-test-bundles");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies a bundle to a temp dir (under [`edited_bundles_dir`]), applying `edit`
/// to its manifest text.
pub fn edited_bundle(name: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(edited_bundles_dir()).unwrap();
    for entry in std::fs::read_dir(bundle(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let m = dir.path().join("gve-plugin.toml");
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, edit(text)).unwrap();
    dir
}
