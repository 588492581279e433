//! Filesystem capability: the directories the operator granted, preopened through
//! WASI (cap-std underneath, so paths cannot leave a grant through `..` or symlinks),
//! read-only unless granted writable. Nothing else of the host's filesystem,
//! environment, arguments, stdio or network sockets is visible.
//!
//! On top of WASI's own rules:
//! - a plugin may not create symlinks at all (`not-permitted`), so a writable grant
//!   cannot be made to hold links that point outside it;
//! - an instance may hold at most `max-open-files` files, directories and directory
//!   listings open at once; one more stops its call (each is a host descriptor).

use wasmtime::component::{Linker, Resource};
use wasmtime::StoreContextMut;
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    DescriptorFlags, ErrorCode, Host as _, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::FsResult;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use crate::plugin::budget;
use crate::plugin::error::{PluginError, Result};
use crate::plugin::grants::DirGrant;
use crate::plugin::state::HostState;

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

/// Checks the open-files budget before one more descriptor is opened.
fn open_files_budget(state: &mut HostState) -> wasmtime::Result<()> {
    let limit = state.limits.max_open_files;
    if budget::holdings(state).files >= limit as usize {
        return Err(state
            .limiter
            .over_budget(budget::OPEN_FILES, u64::from(limit)));
    }
    Ok(())
}

/// The error code of a filesystem result, as WASI reports it to the plugin.
fn code<T>(
    state: &mut HostState,
    r: FsResult<T>,
) -> wasmtime::Result<std::result::Result<T, ErrorCode>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => Ok(Err(state.filesystem().convert_error_code(e)?)),
    }
}

/// Puts the open-files budget in front of `open-at` and `read-directory`, and refuses
/// `symlink-at` (the linker must already hold WASI; these definitions shadow its own).
pub fn add_budgets(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance("wasi:filesystem/types@0.2.12")?;
    types.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, HostState>,
         (fd, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                open_files_budget(state)?;
                let r = state
                    .filesystem()
                    .open_at(fd, path_flags, path, open_flags, flags)
                    .await;
                Ok((code(state, r)?,))
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.read-directory",
        |mut store: StoreContextMut<'_, HostState>, (fd,): (Resource<Descriptor>,)| {
            Box::new(async move {
                let state = store.data_mut();
                open_files_budget(state)?;
                let r = state.filesystem().read_directory(fd).await;
                Ok((code(state, r)?,))
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store: StoreContextMut<'_, HostState>,
         (_fd, old, new): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                store.data_mut().refused(
                    "symlink creation refused: plugins may not create symlinks",
                    &format!("{new} -> {old}"),
                );
                Ok((Err::<(), _>(ErrorCode::NotPermitted),))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
