//! Bulk copies into running guests (issue 16 part 3). When the VM's driver exports
//! `gve:hypervisor/bulk` and a copy is at least [`BULK_MIN`] bytes of known size,
//! its bytes go through a raw disk the driver stages and attaches to the running VM
//! instead of through the guest agent's JSON: the agent writes the disk through
//! libvirt's storage streams, then the guest copies it into place with `dd`
//! (O_DIRECT on the disk, so the emulated CPU hardly touches the data) through the
//! guest provider's exec, and hashes the file itself. The checksum a caller gets is
//! still the guest's, and a mismatch with the bytes the agent received leaves the
//! target untouched. A disk that cannot be staged (no free slot, no room in the
//! pool) falls back to the guest agent before a byte of the body is read. Every
//! staged disk (copy-in or copy-out) is recorded in the registry's meta table
//! (`bulk-disk:<id>` = VM) from before it is staged until it is released, so a
//! restart releases what a crash left ([`recover`]).

use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::StatusCode;

use super::guest::GuestProvider;
use super::guest_job::Finished;
use super::model::{FileMeta, OpError};
use super::AgentCore;
use crate::api::ApiError;
use crate::plugin::{BulkTransfer, DriverSession, ErrorKind, PluginError};

/// Smallest copy that goes through a staged disk, bytes: below it the guest agent's
/// own path costs less than staging, attaching and releasing a disk.
pub const BULK_MIN: u64 = 4 << 20;

/// Bytes per write into (and read off) the staged disk. The contract allows twice
/// that; at this size a copy keeps the agent's memory flat (each piece exists in
/// the agent, in the plugin's memory and in libvirt's stream at once) while the
/// per-call cost stays a few percent of the mechanism's speed.
pub(super) const PIECE: usize = 4 << 20;

/// The speed below which the guest's side of a copy is taken to be stuck, bytes/s
/// (`dd` plus busybox `sha256sum` under TCG measured 23-47 MiB/s).
const GUEST_SPEED: u64 = 2 << 20;

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

/// Defined for every guest script (after [`FIND_DISK`]): `sum FILE` prints FILE's
/// SHA-256 in hex, then a space. OpenSSL's where the guest has it (tuned code, and
/// the CPU's SHA extensions where the guest sees them, which neither busybox 1.35's
/// nor coreutils' `sha256sum` uses; bench/results/bulk.md has it against busybox's
/// in the test guest), `sha256sum`'s where it has not or its `openssl` fails. FILE
/// is `f` or an absolute path: never taken for an option.
const SUM: &str = r#"sum() { openssl dgst -sha256 -r "$1" 2>/dev/null || sha256sum -- "$1"; }
"#;

/// What the guest runs (after [`FIND_DISK`]) to put the disk's first `size` bytes
/// at `path`: copy it with O_DIRECT reads (and writes where the target's filesystem
/// allows them) into a file in a private directory next to `path`, cut it to `size`, check its
/// SHA-256 against the agent's, apply the mode and rename it into place. Prints the
/// guest's SHA-256. Exit codes: 4 no such directory, 5 checksums differ, 10 the
/// target is a directory, others from the tools. The script runs as root in a
/// directory a guest user may own, so it works inside a private directory made
/// by `mktemp -d` (0700) and entered first: a user who renames or replaces it
/// cannot redirect a write, `chmod` or rename through a symlink; `mv -T` never
/// moves the file into a directory planted at the target. A job stopped with
/// SIGTERM (as [`super::guest_job`] stops one) removes its directory; one killed
/// outright leaves it (root's, 0700) beside the target.
const GUEST_IN: &str = r#"path=$2 size=$3 mode=$4 parents=$5 want=$6
dir=$(dirname -- "$path")
[ "$parents" = 1 ] && mkdir -p -- "$dir"
[ -d "$dir" ] || { echo "no directory $dir" >&2; exit 4; }
[ -d "$path" ] && { echo "$path is a directory" >&2; exit 10; }
t=
trap 'cd /; [ -n "$t" ] && rm -rf -- "$t"' EXIT
trap 'exit 143' TERM HUP
t=$(mktemp -d "$dir/.gve-bulk.XXXXXX") || { echo "no temporary directory in $dir" >&2; exit 6; }
cd "$t" || exit 6
n=$(( (size + 4194303) / 4194304 ))
dd if="$dev" of=f bs=4M count=$n iflag=direct oflag=direct 2>/dev/null ||
  dd if="$dev" of=f bs=4M count=$n iflag=direct 2>/dev/null || { echo "dd from $dev failed" >&2; exit 6; }
truncate -s "$size" f || exit 7
got=$(sum f) || exit 8
got=${got%% *}
[ "$got" = "$want" ] || { echo "the guest read SHA-256 $got off the disk, the agent wrote $want" >&2; exit 5; }
chmod "$mode" f || exit 9
mv -fT f "$path" || { [ -d "$path" ] && { echo "$path is a directory" >&2; exit 10; }; exit 9; }
echo "$got"
"#;

/// Runs `FIND_DISK` + `SUM` + `body` in the guest of `vm` with `args` ($1 the serial) as
/// a guest job ([`super::guest_job`]), for at most a minute plus `size` bytes at
/// [`GUEST_SPEED`].
pub(super) async fn guest_script(
    guest: &GuestProvider,
    vm: &str,
    body: &str,
    args: Vec<String>,
    size: u64,
) -> Result<Finished, ApiError> {
    let deadline = Duration::from_secs(60 + size / GUEST_SPEED);
    super::guest_job::run(
        guest,
        vm,
        &format!("{FIND_DISK}{SUM}{body}"),
        args,
        deadline,
    )
    .await
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

fn api(e: PluginError) -> ApiError {
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
    core: &AgentCore,
    guest: &GuestProvider,
    id: &str,
    to: Target<'_>,
    size: u64,
    body: Incoming,
) -> BulkIn {
    let (t, vm) = (Instant::now(), to.vm);
    let mut xfer = match stage(core, vm, id, size).await {
        Ok(Some(x)) => x,
        Ok(None) => return BulkIn::Fallback(body),
        Err(e) => return BulkIn::Done(Err(e)),
    };
    let staged = t.elapsed();
    let r = fill_and_place(&mut xfer, guest, &to, size, body).await;
    let placed = t.elapsed();
    release(core, xfer, vm, id).await;
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
    let r = guest_script(guest, vm, GUEST_IN, args, size).await?;
    let (out, err) = (r.stdout, r.stderr);
    let fail = |status: StatusCode, kind: &str, what: String| {
        Err(ApiError::new(
            status,
            kind,
            format!("copy of {path} into VM {vm}: {what}"),
        ))
    };
    match r.exit_code {
        0 if out == sum => Ok(FileMeta {
            path: path.to_string(),
            size,
            mode,
            sha256: out,
        }),
        4 => fail(StatusCode::NOT_FOUND, "not-found", err),
        10 => fail(StatusCode::BAD_REQUEST, "invalid-argument", err),
        3 => fail(StatusCode::SERVICE_UNAVAILABLE, "unavailable", err),
        code => fail(
            StatusCode::BAD_GATEWAY,
            "backend",
            format!("the guest's copy ended with {code}: {err} {out}; nothing was written"),
        ),
    }
}

/// Writes the body into the staged disk in [`PIECE`]-byte pieces; returns its SHA-256.
async fn fill(
    xfer: &mut BulkTransfer,
    path: &str,
    size: u64,
    body: Incoming,
) -> Result<String, ApiError> {
    let mut disk = Disk { xfer, size };
    let (sum, received) = super::pieces::pieces(body, path, PIECE, &mut disk).await?;
    if received != size {
        return Err(ApiError::bad_request(format!(
            "the upload of {path} stopped after {received} of {size} bytes: the body's length differs from its Content-Length; nothing was written"
        )));
    }
    Ok(sum)
}

/// A staged disk of `size` bytes as the sink of a body's pieces.
struct Disk<'a> {
    xfer: &'a mut BulkTransfer,
    size: u64,
}

impl super::pieces::Sink for Disk<'_> {
    async fn put(&mut self, at: u64, piece: &[u8]) -> Result<(), ApiError> {
        if at + piece.len() as u64 > self.size {
            return Err(ApiError::bad_request(format!(
                "the body runs past its Content-Length of {} bytes; nothing was written",
                self.size
            )));
        }
        self.xfer.write(at, piece).await.map_err(api)
    }
}

/// Meta key prefix of a staged disk's record.
const RECORD: &str = "bulk-disk:";

/// Stages a disk of `size` bytes on `vm` for transfer `id`, recorded first (see the
/// module's doc). `None`: no disk can be staged now (no free slot, no room, the
/// driver declines), so the copy takes the guest agent's path.
pub(super) async fn stage(
    core: &AgentCore,
    vm: &str,
    id: &str,
    size: u64,
) -> Result<Option<BulkTransfer>, ApiError> {
    let (key, on) = (format!("{RECORD}{id}"), vm.to_string());
    durably(core, move |t| t.set_meta(&key, &on))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backend",
                format!("recording a staged disk: {e}"),
            )
        })?;
    match core.driver.bulk_stage(vm, id, size).await {
        Ok(x) => Ok(Some(x)),
        Err(e) => {
            // A driver that failed (or trapped) half way may have left a volume or
            // an attached disk: released by id, or the record stays for a restart.
            if release_left(&core.driver, vm, id).await {
                forget(core, id).await;
            }
            if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Unsupported) {
                tracing::info!(
                    vm,
                    "copy through the guest agent: no disk could be staged ({e})"
                );
                return Ok(None);
            }
            Err(api(e))
        }
    }
}

/// Releases a staged disk and forgets its record. When its own instance cannot (it
/// trapped or overran) a fresh one releases it by its id; when neither can, or the
/// guest holds on to the disk (`unavailable`: asking again now would only wait
/// again), the record stays, and the VM's next stop or migration, or the agent's
/// next start, releases it.
pub(super) async fn release(core: &AgentCore, xfer: BulkTransfer, vm: &str, id: &str) {
    let released = match xfer.release().await {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::Unavailable => {
            tracing::warn!(
                vm,
                transfer = id,
                "releasing a staged disk: {e}; kept until the VM stops"
            );
            false
        }
        Err(e) => {
            tracing::warn!(
                vm,
                transfer = id,
                "releasing a staged disk: {e}; again by its id"
            );
            release_left(&core.driver, vm, id).await
        }
    };
    if released {
        forget(core, id).await;
    }
}

/// Drops the record of transfer `id`'s disk, released (or never staged).
async fn forget(core: &AgentCore, id: &str) {
    let key = format!("{RECORD}{id}");
    if let Err(e) = durably(core, move |t| t.remove_meta(&key)).await {
        tracing::warn!("forgetting a released staged disk: {e}");
    }
}

/// A durable registry write on a blocking thread: its sync does not hold up one
/// of the runtime's workers (and the tasks queued on it).
async fn durably(
    core: &AgentCore,
    f: impl FnOnce(&mut super::registry::Txn<'_>) -> Result<(), super::registry::RegistryError>
        + Send
        + 'static,
) -> Result<(), String> {
    let registry = core.registry.clone();
    match tokio::task::spawn_blocking(move || registry.write(f)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the write's thread ended: {e}")),
    }
}

/// Releases the disks a previous run of the agent left staged (by their records).
pub async fn recover(core: &AgentCore) {
    release_recorded(core, staged(core), |_| true).await;
}

/// The staged disks recorded now: (transfer id, VM). None when the records
/// cannot be read (logged).
pub(super) fn staged(core: &AgentCore) -> Vec<(String, String)> {
    core.registry.meta_with_prefix(RECORD).unwrap_or_else(|e| {
        tracing::warn!("reading the staged disks' records: {e}");
        Vec::new()
    })
}

/// How long [`release_recorded`] waits for a VM's guest operations to end.
const TURNS_WITHIN: Duration = Duration::from_millis(200);

/// Releases the disks of `recorded` ([`staged`]) whose VM `on` takes, and
/// forgets the record of each released. Each VM's guest-operation turns are
/// taken first, so that no copy started since (on a VM started again) loses
/// its disk; a VM with guest operations running, or a disk that cannot be
/// released, keeps its record for a later start, stop, migration or agent start.
pub(super) async fn release_recorded(
    core: &AgentCore,
    recorded: Vec<(String, String)>,
    on: impl Fn(&str) -> bool,
) {
    for (id, vm) in recorded.into_iter().filter(|(_, vm)| on(vm)) {
        let Ok(_turns) = core
            .guest_gates
            .all_turns(core.driver.endpoint(), &vm, TURNS_WITHIN)
            .await
        else {
            tracing::info!(
                vm,
                transfer = id,
                "a staged disk left by an earlier copy stays for now: the VM's guest \
                 operations are running; released at its next start, stop or migration, \
                 or the agent's next start"
            );
            continue;
        };
        if release_left(&core.driver, &vm, &id).await {
            forget(core, &id).await;
            tracing::info!(
                vm,
                transfer = id,
                "released a staged disk left by an earlier copy"
            );
        }
    }
}

/// Releases every disk still recorded as staged on `vm` (a release that failed
/// earlier); fails while one stays, so that a migration never carries one along.
pub async fn release_staged_on(core: &AgentCore, vm: &str) -> Result<(), OpError> {
    let left = core
        .registry
        .meta_with_prefix(RECORD)
        .map_err(|e| OpError {
            kind: ErrorKind::Backend.as_str().into(),
            message: format!("reading the staged disks' records: {e}"),
        })?;
    // Listed by transfer id: the records' prefix is left off.
    for (id, _) in left.into_iter().filter(|(_, on)| on == vm) {
        if !release_left(&core.driver, vm, &id).await {
            return Err(OpError {
                kind: ErrorKind::Unavailable.as_str().into(),
                message: format!(
                    "VM {vm} still has the staged disk of copy {id} attached and it cannot be released now (see the agent's log); try again later"
                ),
            });
        }
        forget(core, &id).await;
    }
    Ok(())
}

/// Releases what an interrupted copy `id` on `vm` left staged, if anything; false
/// when the driver could not (the disk may still be there).
async fn release_left(driver: &DriverSession, vm: &str, id: &str) -> bool {
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
