//! Bulk copies out of running guests, the way back of [`super::bulk_copy`]: for a
//! file of at least [`BULK_MIN`] bytes, when the driver stages disks, the guest
//! writes the file onto a staged disk with `dd` (O_DIRECT on the disk) and hashes
//! it; the agent streams the disk's first `size` bytes to the client while hashing
//! them, and cuts the connection if the two checksums differ (the file changed
//! during the copy), as the guest agent's path does. A copy-out is no operation, so
//! its disk is recorded in the registry's meta table (`bulk-out:<id>` = VM) from
//! before it is staged until it is released; a restart releases what is recorded.

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::bulk_copy::{api, guest_script, BULK_MIN};
use super::guest::GuestProvider;
use super::AgentCore;
use crate::api::{ApiError, Body};
use crate::plugin::ErrorKind;
use tokio::sync::OwnedSemaphorePermit as GuestTurn;

/// Meta key prefix of a staged copy-out's record.
const RECORD: &str = "bulk-out:";

/// Bytes per read off the staged disk.
const IO: u32 = crate::plugin::bulk::MAX_BULK_IO;

/// Size and mode of `$1` in the guest, or nothing (exit 1).
const STAT: &str = r#"stat -c '%s %a' -- "$1""#;

/// What the guest runs (after the disk is found) to write `path` onto it and hash
/// it: prints the size and SHA-256 it read. Exit 4: the file is gone or changed size.
const GUEST_OUT: &str = r#"path=$2 size=$3
[ "$(stat -c %s -- "$path" 2>/dev/null)" = "$size" ] || { echo "$path changed size or is gone" >&2; exit 4; }
dd if="$path" of="$dev" bs=4M conv=sync oflag=direct 2>/dev/null || { echo "dd to $dev failed" >&2; exit 6; }
got=$(sha256sum -- "$path") || exit 8
[ "$(stat -c %s -- "$path" 2>/dev/null)" = "$size" ] || { echo "$path changed size during the copy" >&2; exit 4; }
echo "${got%% *}"
"#;

/// How a bulk copy-out went.
pub enum BulkOut {
    /// Streaming: size, mode and the body.
    Streaming(u64, u32, Body),
    /// Not through a staged disk: use the guest agent's path.
    Fallback(GuestTurn),
}

/// Starts copying `path` out of `vm` through a staged disk when it is large enough
/// and a disk can be staged; `turn` (the VM's guest turn) is held until the body ends.
pub async fn copy_out(
    core: &Arc<AgentCore>,
    guest: &GuestProvider,
    vm: &str,
    path: &str,
    turn: GuestTurn,
) -> Result<BulkOut, ApiError> {
    let exec = crate::plugin::bindings::types::ExecRequest {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            STAT.into(),
            "gve-stat".into(),
            path.into(),
        ],
        env: Vec::new(),
        cwd: None,
        stdin: Vec::new(),
        timeout_ms: 10_000,
        output_limit: 256,
    };
    let r = guest.session.exec(vm, &exec).await.map_err(api)?;
    let stat = String::from_utf8_lossy(&r.stdout);
    let mut words = stat.split_whitespace();
    let (Some(size), Some(mode)) = (
        words.next().and_then(|w| w.parse::<u64>().ok()),
        words.next().and_then(|w| u32::from_str_radix(w, 8).ok()),
    ) else {
        // Missing, unreadable or no `stat`: the guest agent's path says why.
        return Ok(BulkOut::Fallback(turn));
    };
    if r.exit_code != Some(0) || size < BULK_MIN {
        return Ok(BulkOut::Fallback(turn));
    }
    let id = format!("out-{}", uuid::Uuid::new_v4().simple());
    let key = format!("{RECORD}{id}");
    let registry = |e: super::registry::RegistryError| {
        ApiError::new(
            hyper::StatusCode::INTERNAL_SERVER_ERROR,
            "backend",
            e.to_string(),
        )
    };
    core.registry
        .write(|t| t.set_meta(&key, vm))
        .map_err(registry)?;
    let mut xfer = match core.driver.bulk_stage(vm, &id, size).await {
        Ok(x) => x,
        Err(e) => {
            forget(core, &key);
            return match e.kind() {
                ErrorKind::Unavailable | ErrorKind::Unsupported => Ok(BulkOut::Fallback(turn)),
                _ => Err(api(e)),
            };
        }
    };
    let args = vec![xfer.serial.clone(), path.to_string(), size.to_string()];
    let sum = match guest_script(guest, vm, GUEST_OUT, args).await {
        Ok(r) if r.exit_code == Some(0) => {
            Ok(String::from_utf8_lossy(&r.stdout).trim().to_string())
        }
        Ok(r) => Err(ApiError::new(
            hyper::StatusCode::CONFLICT,
            "invalid-state",
            format!(
                "copy of {path} out of VM {vm}: the guest's side ended with {:?}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr).trim()
            ),
        )),
        Err(e) => Err(e),
    };
    let sum = match sum {
        Ok(sum) => sum,
        Err(e) => {
            if let Err(e) = xfer.release().await {
                tracing::warn!(vm, "releasing a staged disk: {e}");
            }
            forget(core, &key);
            return Err(e);
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let (core, vm, path) = (core.clone(), vm.to_string(), path.to_string());
    tokio::spawn(async move {
        let (mut at, mut hasher) = (0u64, Sha256::new());
        let mut failed = None;
        while at < size {
            let want = (size - at).min(u64::from(IO)) as u32;
            match xfer.read(at, want).await {
                Ok(chunk) if chunk.is_empty() => {
                    failed = Some(format!("the staged disk ended after {at} of {size} bytes"));
                    break;
                }
                Ok(chunk) => {
                    at += chunk.len() as u64;
                    hasher.update(&chunk);
                    if tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.is_err() {
                        tracing::debug!("copy-out: the client left after {at} bytes");
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        if at == size && failed.is_none() {
            let got = hex::encode(hasher.finalize());
            if got != sum {
                failed = Some(format!(
                    "{path} changed during the copy (the guest hashed {sum}, the disk held {got})"
                ));
            }
        }
        if let Some(why) = failed {
            tracing::warn!(vm, "copy-out failed: {why}");
            let _ = tx.send(Err(std::io::Error::other(why))).await;
        }
        if let Err(e) = xfer.release().await {
            tracing::warn!(vm, "releasing a staged disk: {e}");
        }
        forget(&core, &key);
        drop(turn);
    });
    Ok(BulkOut::Streaming(size, mode, crate::api::channel_body(rx)))
}

/// Drops the record of a released (or never staged) copy-out disk.
fn forget(core: &AgentCore, key: &str) {
    if let Err(e) = core.registry.write(|t| t.remove_meta(key)) {
        tracing::warn!("forgetting a released copy-out disk: {e}");
    }
}

/// Releases the disks of copy-outs a previous run of the agent left staged.
pub async fn recover(core: &AgentCore) {
    let Ok(left) = core.registry.meta_with_prefix(RECORD) else {
        return;
    };
    for (key, vm) in left {
        let id = key.trim_start_matches(RECORD);
        // Kept when the driver cannot release it now: the next start tries again.
        if super::bulk_copy::release_left(&core.driver, &vm, id).await {
            forget(core, &key);
        }
    }
}
