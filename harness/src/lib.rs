//! The project's own harness for tests and benchmarks against real hypervisors: the
//! tiny guest (Debian cloud kernel + busybox + qemu-ga) and private libvirtd
//! instances, each in its own mount namespace, ended with everything they started;
//! a real Xen nested under QEMU (`harness/xen`); and the vSphere API simulator
//! (`harness/vsphere-sim`); and an agent in the calling process ([`agent::start`]).

pub mod agent;
mod libvirtd;
pub mod vsphere;
pub mod xen;

pub use libvirtd::{guest, Libvirtd};
pub use vsphere::VsphereSim;
pub use xen::NestedXen;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Runs `scripts/harness/SCRIPT` with `OUT=<target>/OUT_DIR` once per process and
/// returns that directory (absolute); `what` names it when the script fails.
pub(crate) fn built_once(
    cell: &'static OnceLock<PathBuf>,
    script: &str,
    out_dir: &str,
    what: &str,
) -> PathBuf {
    cell.get_or_init(|| {
        let out = target_dir().join(out_dir);
        let status = std::process::Command::new("bash")
            .arg(root().join("scripts/harness").join(script))
            .env("OUT", &out)
            .status()
            .unwrap_or_else(|e| panic!("run {script}: {e}"));
        assert!(
            status.success(),
            "building {what} failed (did scripts/setup.sh run?)"
        );
        std::path::absolute(out).unwrap()
    })
    .clone()
}

/// Builds every plugin bundle from source (once per process) with
/// `scripts/build-plugins.sh` and returns the directory holding them
/// (`<target>/plugins/<name>/`).
pub fn plugin_bundles() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(root().join("scripts/build-plugins.sh"))
            .output()
            .expect("run scripts/build-plugins.sh");
        assert!(
            out.status.success(),
            "building plugins failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        target_dir().join("plugins")
    })
}
