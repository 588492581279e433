//! Bulk copies into running guests (issue 16 part 3). When the VM's driver exports
//! `gve:hypervisor/bulk` and a copy is at least [`BULK_MIN`] bytes of known size,
//! its bytes go through a raw disk the driver stages and attaches to the running VM
//! instead of through the guest agent's JSON: the agent writes the disk through
//! libvirt's storage streams, then the guest copies it into place with `dd`
//! (O_DIRECT on the disk, so the emulated CPU hardly touches the data) through the
//! guest provider's exec, and hashes the file itself. The checksum a caller gets is
//! still the guest's, and a mismatch with the bytes the agent received leaves the
//! target untouched. A disk that cannot be staged (no free slot, no room in the
//! pool) falls back to the guest agent before a byte of the body is read. The disk
//! is named by the operation's id, so a restart's recovery releases what a crash
//! left ([`release_left`]).

use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::StatusCode;
use sha2::{Digest, Sha256};

use super::guest::GuestProvider;
use super::model::FileMeta;
use crate::api::ApiError;
use crate::plugin::bindings::types::{ExecRequest, ExecResult};
use crate::plugin::{BulkTransfer, DriverSession, ErrorKind, PluginError};

/// Smallest copy that goes through a staged disk, bytes: below it the guest agent's
/// own path costs less than staging, attaching and releasing a disk.
pub const BULK_MIN: u64 = 4 << 20;

/// Bytes per write into the staged disk (the contract's most per call).
const IO: usize = crate::plugin::bulk::MAX_BULK_IO as usize;

/// How a bulk copy-in went.
pub enum BulkIn {
    /// Done (copied, or failed for good).
    Done(Result<FileMeta, ApiError>),
    /// No disk could be staged: the body is untouched, copy through the guest agent.
    Fallback(Incoming),
}

/// The start of every guest script: sets `dev` to the block device whose serial is
/// `$1` (waiting for it to show up, at most 10 s; exit code 3 if it never does).
const FIND_DISK: &str = r#"set -u
serial=$1
dev=
i=0
while :; do
  for s in /sys/block/*/serial; do
    [ "$(cat "$s" 2>/dev/null)" = "$serial" ] && { d=${s%/serial}; dev=/dev/${d##*/}; }
  done
  [ -n "$dev" ] && [ -b "$dev" ] && break
  i=$((i+1)); [ $i -gt 200 ] && { echo "the staged disk $serial never showed in the guest" >&2; exit 3; }
  sleep 0.05
done
"#;

/// What the guest runs (after [`FIND_DISK`]) to put the disk's first `size` bytes
/// at `path`: copy it with O_DIRECT reads (and writes where the target's filesystem
/// allows them) into a temporary file next to `path`, cut it to `size`, check its
/// SHA-256 against the agent's, apply the mode and rename it into place. Prints the
/// guest's SHA-256. Exit codes: 4 no such directory, 5 checksums differ, others
/// from the tools.
const GUEST_IN: &str = r#"path=$2 size=$3 mode=$4 parents=$5 want=$6
dir=$(dirname -- "$path")
[ "$parents" = 1 ] && mkdir -p -- "$dir"
[ -d "$dir" ] || { echo "no directory $dir" >&2; exit 4; }
tmp="$dir/.gve-bulk.$$"
trap 'rm -f -- "$tmp"' EXIT
n=$(( (size + 4194303) / 4194304 ))
dd if="$dev" of="$tmp" bs=4M count=$n iflag=direct oflag=direct 2>/dev/null ||
  dd if="$dev" of="$tmp" bs=4M count=$n iflag=direct 2>/dev/null || { echo "dd from $dev failed" >&2; exit 6; }
truncate -s "$size" "$tmp" || exit 7
got=$(sha256sum "$tmp") || exit 8
got=${got%% *}
[ "$got" = "$want" ] || { echo "the guest read SHA-256 $got off the disk, the agent wrote $want" >&2; exit 5; }
chmod "$mode" "$tmp" && mv -f -- "$tmp" "$path" || exit 9
trap - EXIT
echo "$got"
"#;

/// Runs `FIND_DISK` + `body` in the guest of `vm` with `args` ($1 the serial), within
/// the guest plugin's budget less a second.
pub(super) async fn guest_script(
    guest: &GuestProvider,
    vm: &str,
    body: &str,
    args: Vec<String>,
) -> Result<ExecResult, ApiError> {
    let budget = guest.call_budget().saturating_sub(Duration::from_secs(1));
    let script = format!("{FIND_DISK}{body}");
    let request = ExecRequest {
        argv: ["/bin/sh", "-c", &script, "gve-bulk"]
            .iter()
            .map(|s| s.to_string())
            .chain(args)
            .collect(),
        env: Vec::new(),
        cwd: None,
        stdin: Vec::new(),
        timeout_ms: u32::try_from(budget.as_millis()).unwrap_or(u32::MAX).max(1),
        output_limit: 4096,
    };
    let r = guest.session.exec(vm, &request).await.map_err(api)?;
    if r.timed_out {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("the guest's side of a bulk copy did not finish within {budget:?}"),
        ));
    }
    Ok(r)
}

/// Whether a copy of `size` bytes to or from `path` should go through a staged
/// disk. A path the guest plugin would refuse (relative, with `..`, naming a
/// directory) never does, so the guest plugin's own answer comes back.
pub fn worth_it(driver: &DriverSession, guest: &GuestProvider, path: &str, size: u64) -> bool {
    size >= BULK_MIN && plain_path(path) && guest.via_channel && driver.has_bulk()
}

/// An absolute path naming a file, without `..` or NUL.
pub fn plain_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.ends_with('/')
        && !path.contains('\0')
        && path.split('/').all(|s| s != "..")
}

pub(super) fn api(e: PluginError) -> ApiError {
    ApiError::from(e)
}

/// One copy into a guest: where, with what mode, and the client's checksum.
pub struct Target<'a> {
    /// The VM.
    pub vm: &'a str,
    /// The file in the guest.
    pub path: &'a str,
    /// Its permission bits.
    pub mode: u32,
    /// Make missing parent directories.
    pub parents: bool,
    /// The client's SHA-256 of the content, when given.
    pub expected: Option<String>,
}

/// Copies a body of `size` bytes to `to` through a disk staged under the transfer
/// id `id` (the operation's).
pub async fn copy_in(
    driver: &DriverSession,
    guest: &GuestProvider,
    id: &str,
    to: Target<'_>,
    size: u64,
    body: Incoming,
) -> BulkIn {
    let (t, vm) = (Instant::now(), to.vm);
    let mut xfer = match driver.bulk_stage(vm, id, size).await {
        Ok(x) => x,
        Err(e) if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Unsupported) => {
            tracing::info!(
                vm,
                "copy-in through the guest agent: no disk could be staged ({e})"
            );
            return BulkIn::Fallback(body);
        }
        Err(e) => return BulkIn::Done(Err(api(e))),
    };
    let staged = t.elapsed();
    let r = fill_and_place(&mut xfer, guest, &to, size, body).await;
    let placed = t.elapsed();
    if let Err(e) = xfer.release().await {
        tracing::warn!(vm, transfer = id, "releasing a staged disk: {e}");
    }
    tracing::debug!(
        vm,
        size,
        staged_ms = staged.as_millis() as u64,
        placed_ms = placed.as_millis() as u64,
        released_ms = t.elapsed().as_millis() as u64,
        "bulk copy-in"
    );
    BulkIn::Done(r)
}

async fn fill_and_place(
    xfer: &mut BulkTransfer,
    guest: &GuestProvider,
    to: &Target<'_>,
    size: u64,
    body: Incoming,
) -> Result<FileMeta, ApiError> {
    let (vm, path, mode) = (to.vm, to.path, to.mode);
    let sum = fill(xfer, path, size, body).await?;
    if let Some(want) = to
        .expected
        .as_ref()
        .filter(|w| !w.eq_ignore_ascii_case(&sum))
    {
        return Err(ApiError::bad_request(format!(
            "the content received for {path} has SHA-256 {sum}, the request said {want}; nothing was written"
        )));
    }
    let args = [&xfer.serial, path]
        .iter()
        .map(|s| s.to_string())
        .chain([
            size.to_string(),
            format!("{mode:o}"),
            u8::from(to.parents).to_string(),
            sum.clone(),
        ])
        .collect();
    let r = guest_script(guest, vm, GUEST_IN, args).await?;
    let out = String::from_utf8_lossy(&r.stdout).trim().to_string();
    let err = String::from_utf8_lossy(&r.stderr).trim().to_string();
    let fail = |status: StatusCode, kind: &str, what: String| {
        Err(ApiError::new(
            status,
            kind,
            format!("copy of {path} into VM {vm}: {what}"),
        ))
    };
    match r.exit_code {
        Some(0) if out == sum => Ok(FileMeta {
            path: path.to_string(),
            size,
            mode,
            sha256: out,
        }),
        Some(4) => fail(StatusCode::NOT_FOUND, "not-found", err),
        Some(3) => fail(StatusCode::SERVICE_UNAVAILABLE, "unavailable", err),
        code => fail(
            StatusCode::BAD_GATEWAY,
            "backend",
            format!("the guest's copy ended with {code:?}: {err} {out}; nothing was written"),
        ),
    }
}

/// Writes the body into the staged disk in [`IO`]-byte pieces; returns its SHA-256.
async fn fill(
    xfer: &mut BulkTransfer,
    path: &str,
    size: u64,
    mut body: Incoming,
) -> Result<String, ApiError> {
    let mut hasher = Sha256::new();
    let mut buf: Vec<u8> = Vec::with_capacity(IO);
    let mut at = 0u64;
    let cut = |received: u64, why: String| {
        ApiError::bad_request(format!(
            "the upload of {path} stopped after {received} of {size} bytes: {why}; nothing was written"
        ))
    };
    loop {
        let frame = match crate::api::next_frame(&mut body).await {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(cut(at + buf.len() as u64, e)),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        hasher.update(&data);
        let mut rest: &[u8] = &data;
        while !rest.is_empty() {
            let take = rest.len().min(IO - buf.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == IO {
                put(xfer, &mut at, &mut buf, size).await?;
            }
        }
    }
    if !buf.is_empty() {
        put(xfer, &mut at, &mut buf, size).await?;
    }
    if at != size {
        return Err(cut(
            at,
            "the body's length differs from its Content-Length".into(),
        ));
    }
    Ok(hex::encode(hasher.finalize()))
}

async fn put(
    xfer: &mut BulkTransfer,
    at: &mut u64,
    buf: &mut Vec<u8>,
    size: u64,
) -> Result<(), ApiError> {
    if *at + buf.len() as u64 > size {
        return Err(ApiError::bad_request(format!(
            "the body runs past its Content-Length of {size} bytes; nothing was written"
        )));
    }
    xfer.write(*at, buf).await.map_err(api)?;
    *at += buf.len() as u64;
    buf.clear();
    Ok(())
}

/// Releases what an interrupted copy `id` on `vm` left staged, if anything; false
/// when the driver could not (the disk may still be there).
pub async fn release_left(driver: &DriverSession, vm: &str, id: &str) -> bool {
    if !driver.has_bulk() {
        return true;
    }
    match driver.bulk_release_left(vm, id).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                vm,
                transfer = id,
                "releasing a disk an interrupted copy staged: {e}"
            );
            false
        }
    }
}
