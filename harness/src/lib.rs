//! The project's own harness for tests and benchmarks against real hypervisors: the
//! tiny guest (Debian cloud kernel + busybox + qemu-ga) and private libvirtd
//! instances, each in its own mount namespace, ended with everything they started.

mod libvirtd;

pub use libvirtd::{guest, Libvirtd};

use std::path::{Path, PathBuf};

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
