//! Bulk copies out of running guests, the way back of [`super::bulk_copy`]: for a
//! file of at least [`BULK_MIN`] bytes, when the driver stages disks, the guest
//! writes the file onto a staged disk with `dd` (O_DIRECT on the disk) and hashes
//! it; the agent streams the disk's first `size` bytes to the client while hashing
//! them, holding the last piece back until the two checksums agree: if they differ
//! (the file changed during the copy) the response is cut short of its length, as
//! the guest agent's path does. The disk is recorded like a copy-in's
//! ([`super::bulk_copy::recover`]).

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::bulk_copy::{guest_script, release, stage, BULK_MIN, PIECE};
use super::guest::GuestProvider;
use super::AgentCore;
use crate::api::{ApiError, Body};
use tokio::sync::OwnedSemaphorePermit as GuestTurn;

/// Size, permission bits and raw mode (hex) of `$1` in the guest, symbolic links
/// followed, or nothing (exit 1).
const STAT: &str = r#"stat -L -c '%s %a %f' -- "$1""#;

/// The file-type bits of a raw mode, and those of a regular file: the guest's (Linux)
/// values, spelled here rather than taken from this host's libc.
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;

/// What the guest runs (after the disk is found) to write `path` onto it and hash
/// it: prints the size and SHA-256 it read. Exit 4: the file is gone or changed size.
const GUEST_OUT: &str = r#"path=$2 size=$3
[ "$(stat -L -c %s -- "$path" 2>/dev/null)" = "$size" ] || { echo "$path changed size or is gone" >&2; exit 4; }
dd if="$path" of="$dev" bs=4M conv=sync oflag=direct 2>/dev/null || { echo "dd to $dev failed" >&2; exit 6; }
got=$(sum "$path") || exit 8
[ "$(stat -L -c %s -- "$path" 2>/dev/null)" = "$size" ] || { echo "$path changed size during the copy" >&2; exit 4; }
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
    let r = match super::guest_job::exec(guest, vm, STAT, "gve-stat", vec![path.into()]).await {
        // A guest too slow to answer a stat: the guest agent's path copes.
        Err(e) if e.kind == "timeout" => return Ok(BulkOut::Fallback(turn)),
        r => r?,
    };
    let mut words = r.stdout.split_whitespace();
    let (Some(size), Some(mode), Some(raw)) = (
        words.next().and_then(|w| w.parse::<u64>().ok()),
        words.next().and_then(|w| u32::from_str_radix(w, 8).ok()),
        words.next().and_then(|w| u32::from_str_radix(w, 16).ok()),
    ) else {
        // Missing, unreadable or no `stat`: the guest agent's path says why.
        return Ok(BulkOut::Fallback(turn));
    };
    // Not a regular file (a directory, a device): the guest agent's path refuses it.
    if r.exit_code != 0 || size < BULK_MIN || raw & S_IFMT != S_IFREG {
        return Ok(BulkOut::Fallback(turn));
    }
    let id = format!("out-{}", uuid::Uuid::new_v4().simple());
    let Some(mut xfer) = stage(core, vm, &id, size).await? else {
        return Ok(BulkOut::Fallback(turn));
    };
    let args = vec![xfer.serial.clone(), path.to_string(), size.to_string()];
    let sum = match guest_script(guest, vm, GUEST_OUT, args, size).await {
        Ok(r) if r.exit_code == 0 => Ok(r.stdout),
        Ok(r) => Err(ApiError::new(
            hyper::StatusCode::CONFLICT,
            "invalid-state",
            format!(
                "copy of {path} out of VM {vm}: the guest's side ended with {}: {}",
                r.exit_code, r.stderr
            ),
        )),
        Err(e) => Err(e),
    };
    let sum = match sum {
        Ok(sum) => sum,
        Err(e) => {
            release(core, xfer, vm, &id).await;
            return Err(e);
        }
    };
    let (feed, body) = crate::api::feed();
    let (core, vm, path) = (core.clone(), vm.to_string(), path.to_string());
    tokio::spawn(async move {
        if let Err(why) = stream(&mut xfer, &feed, size, &sum, &path).await {
            tracing::warn!(vm, "copy-out failed: {why}");
            feed.fail(why).await;
        }
        release(&core, xfer, &vm, &id).await;
        drop(turn);
    });
    Ok(BulkOut::Streaming(size, mode, body))
}

/// Streams the disk's first `size` bytes to `feed`, holding the last piece back
/// until the bytes' SHA-256 is known to be the guest's `sum`: the client announced
/// `size` bytes, so a response cut any earlier would look complete. `Ok` also when
/// the client left.
async fn stream(
    xfer: &mut crate::plugin::BulkTransfer,
    feed: &crate::api::Feed,
    size: u64,
    sum: &str,
    path: &str,
) -> Result<(), String> {
    let (mut at, mut hasher) = (0u64, Sha256::new());
    let mut held: Option<Bytes> = None;
    while at < size {
        let want = (size - at).min(PIECE as u64) as u32;
        // The next piece is read off the disk while the one before it goes to
        // the client: one piece ahead, never more.
        let earlier = held.take();
        let (piece, sent) = tokio::join!(xfer.read(at, want), async {
            match earlier {
                Some(p) => feed.data(p).await,
                None => true,
            }
        });
        if !sent {
            tracing::debug!("copy-out: the client left after {at} bytes");
            return Ok(());
        }
        let piece = piece.map_err(|e| e.to_string())?;
        if piece.is_empty() {
            return Err(format!("the staged disk ended after {at} of {size} bytes"));
        }
        at += piece.len() as u64;
        hasher.update(&piece);
        held = Some(Bytes::from(piece));
    }
    let got = hex::encode(hasher.finalize());
    if got != sum {
        return Err(format!(
            "{path} changed during the copy (the guest hashed {sum}, the disk held {got})"
        ));
    }
    if let Some(last) = held {
        feed.data(last).await;
    }
    Ok(())
}
