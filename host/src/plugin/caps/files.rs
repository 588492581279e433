//! Filesystem capability: the directories the operator granted, preopened through
//! WASI (cap-std underneath), read-only unless granted writable. Nothing else of the
//! host's filesystem, environment, arguments, stdio or network sockets is visible.

use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use crate::plugin::error::{PluginError, Result};
use crate::plugin::grants::DirGrant;

/// The WASI context of one instance: only the granted directories.
pub fn wasi_ctx(plugin: &str, directories: &[DirGrant]) -> Result<WasiCtx> {
    let mut wasi = WasiCtxBuilder::new();
    for d in directories {
        let perms = if d.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        wasi.preopened_dir(&d.host, &d.guest, perms).map_err(|e| {
            PluginError::Config(format!(
                "plugin '{plugin}': cannot open granted directory {}: {e:#}",
                d.host.display()
            ))
        })?;
    }
    Ok(wasi.build())
}
