//! File transfer with the guest through qemu-ga's guest-file-* commands, one chunk
//! per command, so memory stays flat whatever the file's size.
//!
//! An upload writes a hidden temporary file next to the target (mode applied before
//! any content is written) and renames it over the target only after every chunk
//! arrived: an abandoned upload never leaves a half-written target. Before the
//! rename, in the same guest command, the guest's own `stat` and `sha256sum` of the
//! temporary file must agree with what was sent: a file that does not (a write
//! lost, a guest process that changed it before the check) is never moved into
//! place. A change between the check and the rename is the guest's own race.
//! A download takes the guest's size, mode and SHA-256 first (one guest command,
//! held to what is left of the call) and checks the bytes it read against them
//! at end of file. What is sent and read is hashed by the host (contract 0.1.3's
//! `digest`, natively), not in WebAssembly. Only regular files are copied (a symbolic
//! link is followed). Paths must be absolute POSIX paths.

use gve_sdk::digest::Sha256;
use gve_sdk::prelude::*;

use crate::exec::{helper, must, run, succeeded};
use crate::qga::{Agent, MAX_READ};

/// Largest piece sent in one guest-file-write. Measured with qemu-ga 7.2 behind
/// libvirt 9.0 under TCG: 128 KiB (175 KB of JSON) answers in 44 ms, 192 KiB (262 KB)
/// never answers and leaves the channel unusable until libvirt resyncs. 96 KiB
/// keeps a margin and costs ~35 ms a piece.
const MAX_WRITE: usize = 96 << 10;

/// Refuses paths the guest could read differently from what the user meant.
fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::invalid_argument(format!(
            "guest path '{path}' must be absolute"
        )));
    }
    if path.ends_with('/') || path.contains('\0') || path.split('/').any(|s| s == "..") {
        return Err(Error::invalid_argument(format!(
            "guest path '{path}' must name a file, without '..' or NUL"
        )));
    }
    // A newline would also let a path pose as a tool's own message line.
    if path.chars().any(char::is_control) {
        return Err(Error::invalid_argument(format!(
            "guest path {path:?} must not hold control characters"
        )));
    }
    Ok(())
}

/// Splits `/a/b/c` into (`/a/b`, `c`).
fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((dir, name)) => (dir, name),
        None => (".", path),
    }
}

/// After an upload, in one guest command (one round of `guest-exec-status` polls
/// instead of three): the temporary file's (`$1`) `stat` and `sha256sum`, compared
/// with the size (`$4`) and digest (`$3`) sent, and only when both agree the file
/// moved over the target (`$2`). Prints the `stat` and `sha256sum` lines. Run as
/// `sh -c FINISH gve-upload TEMP PATH SHA256 SIZE`. A target that is a directory is
/// refused with [`FINISH_DIRECTORY`] (`mv` would move the file into it), a file
/// that differs from what was sent with [`FINISH_DIFFERS`] (nothing moved). GNU
/// marks the digest of an escaped name with a leading `\`.
const FINISH: &str = r#"if [ -d "$2" ]; then exit 21; fi
st=$(stat -c %s:%a -- "$1") && sum=$(sha256sum -- "$1") || exit 8
h=${sum%% *}
printf '%s\n' "$st" "$sum"
if [ "${st%%:*}" != "$4" ] || [ "${h#\\}" != "$3" ]; then exit 22; fi
mv -f -- "$1" "$2" || exit 3"#;

/// [`FINISH`]'s exit code for a target that is a directory.
const FINISH_DIRECTORY: i32 = 21;

/// [`FINISH`]'s exit code for a file that differs from what was sent.
const FINISH_DIFFERS: i32 = 22;

/// Before a download, in one guest command (one round of `guest-exec-status` polls
/// instead of two): the file's (`$1`) `stat -L` (type bits in hex, size, mode),
/// then, for a regular file only, its `sha256sum` (a directory cannot be hashed, a
/// device or pipe reads forever). Prints the `stat` and `sha256sum` lines. Run as
/// `sh -c STAT_SUM gve-stat PATH`, held to what is left of the call (the size is
/// not known before). A file that is not regular ends it with
/// [`STAT_SUM_IRREGULAR`].
const STAT_SUM: &str = r#"st=$(stat -L -c %f:%s:%a -- "$1") || exit 8
printf '%s\n' "$st"
[ -f "$1" ] || exit 23
sha256sum -- "$1""#;

/// [`STAT_SUM`]'s exit code for a file that is not a regular file.
const STAT_SUM_IRREGULAR: i32 = 23;

/// The time hashing `size` bytes in the guest may take: the command timeout, plus a
/// second per 2 MiB (a guest under TCG on a loaded host hashes 200 MiB in well over
/// 10 s).
fn hash_budget(agent: &Agent, size: u64) -> u32 {
    let budget = u64::from(agent.command_timeout_ms).saturating_add(size / (2 << 20) * 1000);
    u32::try_from(budget).unwrap_or(u32::MAX)
}

/// What this call keeps, of its deadline, to stop a checksum that would outrun it:
/// the kill and the status polls after it, then the answer.
const STOP_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The least time worth starting a checksum with: below it the call ends at once.
const LEAST_CHECKSUM_MS: u32 = 500;

/// How long a checksum of `size` bytes may run in this call: [`hash_budget`] (where
/// the size is not known yet, before a download's, only the call bounds it), but
/// never past the call's own deadline less [`STOP_MARGIN`]. Past that the host would stop the call
/// and drop the instance, leaving a half-done upload's temporary file in the guest;
/// killed in time, the call ends with [`over_call_budget`] and the upload's drop
/// removes it. `Some(left)` when the call's deadline is the bound.
fn checksum_budget(agent: &Agent, path: &str, size: Option<u64>) -> Result<(u32, Option<u32>)> {
    let own = hash_budget(agent, size.unwrap_or(u64::MAX));
    let wait =
        gve_sdk::deadline::bounded(std::time::Duration::from_millis(own.into()), STOP_MARGIN);
    let left = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    if left >= own {
        Ok((own, None))
    } else if left < LEAST_CHECKSUM_MS {
        Err(over_call_budget(agent, path, size, left))
    } else {
        Ok((left, Some(left)))
    }
}

/// Runs `argv`, a checksum of the `size` bytes at `path` (not known before a
/// download's), for its [`checksum_budget`]; one the call's deadline cut short is
/// [`over_call_budget`].
fn run_checksum(agent: &Agent, path: &str, size: Option<u64>, argv: &[&str]) -> Result<ExecResult> {
    let (budget, bound) = checksum_budget(agent, path, size)?;
    let r = run(agent, &helper(argv, budget))?;
    match (r.timed_out, bound) {
        (true, Some(left)) => Err(over_call_budget(agent, path, size, left)),
        _ => Ok(r),
    }
}

/// The error of a checksum of `size` bytes (where known) stopped at what was left
/// of the call (`left_ms`).
fn over_call_budget(agent: &Agent, path: &str, size: Option<u64>, left_ms: u32) -> Error {
    let (what, or) = match size {
        Some(size) => (format!("checksum of {path} ({size} bytes)"), ""),
        // Before a download the size is not known: the call's budget is the
        // only bound, and a file that never reads to its end meets it too.
        None => (
            format!("stat and checksum of {path}"),
            " (or the file does not read to its end, or the guest hangs)",
        ),
    };
    Error::timeout(format!(
        "{}: the guest's {what} did not fit in the {:.1} s \
         left of this plugin's call budget and was stopped{or}; an operator raises \
         the budget with the guest plugin's `call-timeout-ms` limit",
        agent.vm,
        f64::from(left_ms) / 1000.0
    ))
}

/// Size and mode from `stat -c %s:%a` output.
fn parse_stat(agent: &Agent, path: &str, text: &str) -> Result<(u64, u32)> {
    let parsed = text
        .trim()
        .split_once(':')
        .and_then(|(s, m)| Some((s.parse::<u64>().ok()?, u32::from_str_radix(m, 8).ok()?)));
    parsed.ok_or_else(|| {
        Error::backend(format!(
            "{}: stat {path}: unexpected output '{}'",
            agent.vm,
            text.trim()
        ))
    })
}

/// The digest from `sha256sum` output, lower case (GNU marks a line whose name it
/// escaped with a leading `\`).
fn parse_sum(agent: &Agent, path: &str, text: &str) -> Result<String> {
    let first = text.split_whitespace().next().unwrap_or("");
    let sha256 = first.strip_prefix('\\').unwrap_or(first).to_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::backend(format!(
            "{}: sha256sum {path}: unexpected output '{}'",
            agent.vm,
            text.trim()
        )));
    }
    Ok(sha256)
}

/// The file type bits of a mode (`stat -c %f`, hex), and the regular file's.
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;

/// What a file of raw mode `raw` (hex, `stat -c %f`) is, when not a regular file:
/// the error refusing it. Only a regular file has an end that its size and checksum
/// describe (a directory cannot be hashed, a device or pipe reads forever).
fn regular(agent: &Agent, path: &str, raw: &str) -> Result<()> {
    let Ok(mode) = u32::from_str_radix(raw.trim(), 16) else {
        return Err(Error::backend(format!(
            "{}: stat {path}: unexpected file mode '{raw}'",
            agent.vm
        )));
    };
    let kind = match mode & S_IFMT {
        S_IFREG => return Ok(()),
        0o040000 => "a directory",
        0o020000 => "a character device",
        0o060000 => "a block device",
        0o010000 => "a named pipe",
        0o140000 => "a socket",
        _ => "not a regular file",
    };
    Err(Error::invalid_argument(format!(
        "{}: {path} is {kind}: only regular files are copied and checked",
        agent.vm
    )))
}

/// Size, mode and SHA-256 of a regular guest file (a symbolic link is followed),
/// computed in the guest by one command ([`STAT_SUM`]).
pub fn stat(agent: &Agent, path: &str) -> Result<FileInfo> {
    check_path(path)?;
    let argv = ["sh", "-c", STAT_SUM, "gve-stat", path];
    let r = run_checksum(agent, path, None, &argv)?;
    stat_sum_result(agent, path, r)
}

/// What [`STAT_SUM`] ended with, `r`: the file's figures, or why there are none.
fn stat_sum_result(agent: &Agent, path: &str, r: ExecResult) -> Result<FileInfo> {
    let code = r.exit_code;
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let (stat_line, sum_line) = out.split_once('\n').unwrap_or((&out, ""));
    if code == Some(STAT_SUM_IRREGULAR) {
        let (raw, _) = stat_line.split_once(':').unwrap_or((stat_line, ""));
        regular(agent, path, raw)?;
        // Regular when stat looked, not when the shell did: replaced meanwhile.
        return Err(Error::invalid_argument(format!(
            "{}: {path} is not a regular file: only regular files are copied and checked",
            agent.vm
        )));
    }
    let shown = format!("stat -L, sha256sum {path}");
    succeeded(agent, &shown, "stat and checksum", r)?;
    let (raw, size_mode) = stat_line.split_once(':').unwrap_or((stat_line, ""));
    regular(agent, path, raw)?;
    let (size, mode) = parse_stat(agent, path, size_mode)?;
    let sha256 = parse_sum(agent, path, sum_line.trim_end())?;
    Ok(FileInfo { size, mode, sha256 })
}

/// A file being written into the guest.
pub struct GuestUpload {
    agent: Agent,
    path: String,
    temp: String,
    handle: Option<i64>,
    /// Bytes short of a whole piece, written with the next chunk or at `finish`
    /// (so a chunk size that is no multiple of [`MAX_WRITE`] costs no extra writes).
    pending: Vec<u8>,
    /// A write failed (bytes may be lost): every later write and the finish fail.
    failed: bool,
    hasher: Sha256,
    size: u64,
    renamed: bool,
}

impl GuestUpload {
    /// Prepares the parent directory and opens the temporary file with `mode`.
    pub fn start(agent: Agent, path: String, mode: u32, create_parents: bool) -> Result<Self> {
        check_path(&path)?;
        if mode > 0o7777 {
            return Err(Error::invalid_argument(format!(
                "file mode {mode:o} has bits beyond 7777"
            )));
        }
        let (dir, name) = split(&path);
        if create_parents {
            must(
                &agent,
                &["mkdir", "-p", "--", dir],
                "create parent directories",
            )?;
        }
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let temp = format!("{}/.{name}.gve-upload-{nonce:x}", dir.trim_end_matches('/'));
        let handle = agent
            .file_open(&temp, "w")
            .map_err(|e| e.context(format_args!("upload {path}")))?;
        let upload = GuestUpload {
            agent,
            path,
            temp,
            handle: Some(handle),
            pending: Vec::with_capacity(MAX_WRITE),
            failed: false,
            hasher: Sha256::new(),
            size: 0,
            renamed: false,
        };
        let mode = format!("{mode:04o}");
        must(
            &upload.agent,
            &["chmod", &mode, "--", &upload.temp],
            "set the file mode",
        )?;
        Ok(upload)
    }
}

impl GuestUpload {
    /// The open file's handle, unless the upload finished or a write failed.
    fn open_handle(&self) -> Result<i64> {
        match self.handle {
            Some(_) if self.failed => Err(Error::invalid_state(format!(
                "upload of {} failed: a write did not complete",
                self.path
            ))),
            Some(handle) => Ok(handle),
            None => Err(Error::invalid_state(format!(
                "upload of {} is already finished",
                self.path
            ))),
        }
    }

    /// Writes one piece and counts it.
    fn put(&mut self, handle: i64, piece: &[u8]) -> Result<()> {
        self.failed = true;
        self.agent
            .file_write(handle, piece)
            .map_err(|e| e.context(format_args!("upload {}", self.path)))?;
        self.failed = false;
        self.hasher.update(piece);
        self.size += piece.len() as u64;
        Ok(())
    }
}

impl Upload for GuestUpload {
    fn write(&mut self, chunk: Vec<u8>) -> Result<()> {
        let handle = self.open_handle()?;
        let mut rest = chunk.as_slice();
        if !self.pending.is_empty() {
            let take = (MAX_WRITE - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() < MAX_WRITE {
                return Ok(());
            }
            let piece = std::mem::take(&mut self.pending);
            self.put(handle, &piece)?;
            self.pending = piece;
            self.pending.clear();
        }
        let whole = rest.len() - rest.len() % MAX_WRITE;
        for piece in rest[..whole].chunks(MAX_WRITE) {
            self.put(handle, piece)?;
        }
        self.pending.extend_from_slice(&rest[whole..]);
        Ok(())
    }

    fn finish(&mut self) -> Result<FileInfo> {
        let handle = self.open_handle()?;
        if !self.pending.is_empty() {
            let piece = std::mem::take(&mut self.pending);
            self.put(handle, &piece)?;
        }
        self.handle = None;
        self.agent.file_close(handle)?;
        let sent = self.hasher.hex();
        let size = self.size.to_string();
        let argv = [
            "sh",
            "-c",
            FINISH,
            "gve-upload",
            &self.temp,
            &self.path,
            &sent,
            &size,
        ];
        let r = run_checksum(&self.agent, &self.path, Some(self.size), &argv)?;
        if r.exit_code == Some(FINISH_DIRECTORY) {
            return Err(Error::invalid_argument(format!(
                "{}: {} is a directory: an upload names the file to write",
                self.agent.vm, self.path
            )));
        }
        let differs = r.exit_code == Some(FINISH_DIFFERS);
        let out = if differs {
            r.stdout
        } else {
            let shown = format!("stat, sha256sum, mv {}", self.path);
            let out = succeeded(
                &self.agent,
                &shown,
                "check the file and move it into place",
                r,
            )?;
            self.renamed = true;
            out
        };
        let out = String::from_utf8_lossy(&out);
        let (stat_line, sum_line) = out.split_once('\n').unwrap_or((&out, ""));
        let (size, mode) = parse_stat(&self.agent, &self.path, stat_line)?;
        let sha256 = parse_sum(&self.agent, &self.path, sum_line.trim_end())?;
        if differs || size != self.size || sha256 != sent {
            let target = if differs {
                "is left as it was"
            } else {
                "was replaced"
            };
            return Err(Error::backend(format!(
                "{}: the upload of {} held {size} bytes with SHA-256 {sha256} in the guest, \
                 but {} bytes with SHA-256 {sent} were sent; {} {target}",
                self.agent.vm, self.path, self.size, self.path
            )));
        }
        Ok(FileInfo { size, mode, sha256 })
    }
}

impl Drop for GuestUpload {
    /// An abandoned upload closes its handle and removes its temporary file.
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.agent.file_close(handle);
        }
        if !self.renamed {
            if let Err(e) = must(&self.agent, &["rm", "-f", "--", &self.temp], "clean up") {
                gve_sdk::log::warn(&format!("abandoned upload: {e}"));
            }
        }
    }
}

/// A file being read from the guest.
pub struct GuestDownload {
    agent: Agent,
    path: String,
    handle: Option<i64>,
    expected: FileInfo,
    hasher: Sha256,
    read: u64,
    /// A read failed: every later one fails too (never a clean end of file).
    failed: bool,
}

impl GuestDownload {
    /// Takes the file's size, mode and checksum (a regular file's only), then
    /// opens it.
    pub fn start(agent: Agent, path: String) -> Result<Self> {
        let expected = stat(&agent, &path)?;
        let handle = agent
            .file_open(&path, "r")
            .map_err(|e| e.context(format_args!("download {path}")))?;
        Ok(GuestDownload {
            agent,
            path,
            handle: Some(handle),
            expected,
            hasher: Sha256::new(),
            read: 0,
            failed: false,
        })
    }

    /// Closes the file and checks what was read against the guest's own figures.
    fn verify(&mut self) -> Result<()> {
        if let Some(handle) = self.handle.take() {
            self.agent.file_close(handle)?;
        }
        let got = self.hasher.hex();
        if self.read != self.expected.size || got != self.expected.sha256 {
            return Err(Error::backend(format!(
                "{}: {} changed during the download: read {} bytes with SHA-256 {}, the guest reported {} bytes with SHA-256 {}",
                self.agent.vm, self.path, self.read, got, self.expected.size, self.expected.sha256
            )));
        }
        Ok(())
    }
}

impl Download for GuestDownload {
    fn size(&self) -> u64 {
        self.expected.size
    }

    fn mode(&self) -> u32 {
        self.expected.mode
    }

    fn read(&mut self, max: u32) -> Result<Vec<u8>> {
        if self.failed {
            return Err(Error::invalid_state(format!(
                "download of {} already failed",
                self.path
            )));
        }
        let r = self.read_next(max);
        self.failed = r.is_err();
        r
    }
}

impl GuestDownload {
    /// The next piece; empty once the whole file was read and verified.
    fn read_next(&mut self, max: u32) -> Result<Vec<u8>> {
        let Some(handle) = self.handle else {
            return Ok(Vec::new());
        };
        let got = self
            .agent
            .file_read(handle, max.clamp(1, MAX_READ))
            .map_err(|e| e.context(format_args!("download {}", self.path)))?;
        self.hasher.update(&got.data);
        self.read += got.data.len() as u64;
        if self.read > self.expected.size {
            self.handle = None;
            let _ = self.agent.file_close(handle);
            return Err(Error::backend(format!(
                "{}: {} changed during the download: more than the {} bytes the guest reported",
                self.agent.vm, self.path, self.expected.size
            )));
        }
        if got.eof || got.data.is_empty() {
            self.verify()?;
        }
        Ok(got.data)
    }
}

impl Drop for GuestDownload {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.agent.file_close(handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_files() {
        assert!(check_path("/tmp/x").is_ok());
        for bad in [
            "tmp/x",
            "/tmp/",
            "/tmp/../etc/passwd",
            "/a\0b",
            "/a\nb",
            "/a\x1bb",
        ] {
            assert_eq!(
                check_path(bad).unwrap_err().kind(),
                "invalid-argument",
                "{bad}"
            );
        }
    }

    #[test]
    fn only_regular_files_pass_by_their_mode_bits() {
        let a = Agent::for_tests();
        // `stat -c %f`: the raw mode in hex, whatever the guest's language.
        assert!(regular(&a, "/f", "81a4").is_ok());
        for (raw, kind) in [
            ("41ed", "directory"),
            ("21b6", "character device"),
            ("61b0", "block device"),
            ("1180", "named pipe"),
            ("c1ed", "socket"),
        ] {
            let e = regular(&a, "/f", raw).unwrap_err();
            assert_eq!(e.kind(), "invalid-argument", "{raw}");
            assert!(e.message().contains(kind), "{raw}: {e}");
        }
        assert_eq!(
            regular(&a, "/f", "regular file").unwrap_err().kind(),
            "backend"
        );
    }

    #[test]
    fn sums_are_read_with_or_without_gnus_escape_mark() {
        let a = Agent::for_tests();
        let hex = "ab".repeat(32);
        assert_eq!(parse_sum(&a, "/f", &format!("{hex}  /f\n")).unwrap(), hex);
        assert_eq!(
            parse_sum(&a, "/a\\nb", &format!("\\{}  /a\\nb\n", hex.to_uppercase())).unwrap(),
            hex
        );
        assert_eq!(
            parse_sum(&a, "/f", "sha256sum: /f: Is a directory")
                .unwrap_err()
                .kind(),
            "backend"
        );
    }

    /// What [`STAT_SUM`] ends with when this host's `sh` runs it on `path`.
    fn stat_sum_here(path: &str) -> ExecResult {
        let out = std::process::Command::new("sh")
            .args(["-c", STAT_SUM, "gve-stat", path])
            .output()
            .unwrap();
        ExecResult {
            exit_code: out.status.code(),
            signal: None,
            timed_out: false,
            stdout: out.stdout,
            stderr: out.stderr,
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }

    #[test]
    fn one_command_stats_and_hashes_only_regular_files() {
        let a = Agent::for_tests();
        let dir = std::env::temp_dir().join(format!("gve-stat-sum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.to_str().unwrap();
        let file = format!("{d}/f");
        std::fs::write(&file, b"hello").unwrap();
        let link = format!("{d}/link");
        let pipe = format!("{d}/pipe");
        let made = std::process::Command::new("sh")
            .args(["-c", "ln -sf f \"$1\" && mkfifo \"$2\"", "-", &link, &pipe])
            .status()
            .unwrap();
        assert!(made.success());
        let hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        // A symbolic link is followed.
        for path in [&file, &link] {
            let info = stat_sum_result(&a, path, stat_sum_here(path)).unwrap();
            assert_eq!((info.size, info.sha256.as_str()), (5, hello), "{path}");
        }
        // Refused by their mode bits, before any read: a pipe would never end.
        for (path, kind) in [(d, "a directory"), (pipe.as_str(), "a named pipe")] {
            let e = stat_sum_result(&a, path, stat_sum_here(path)).unwrap_err();
            assert_eq!(e.kind(), "invalid-argument", "{path}: {e}");
            assert!(e.message().contains(kind), "{path}: {e}");
        }
        let gone = format!("{d}/gone");
        let e = stat_sum_result(&a, &gone, stat_sum_here(&gone)).unwrap_err();
        assert_eq!(e.kind(), "not-found", "{e}");
        // Regular when `stat` looked, not when the shell did (replaced meanwhile).
        let raced = ExecResult {
            exit_code: Some(STAT_SUM_IRREGULAR),
            stdout: b"81a4:5:644\n".to_vec(),
            ..stat_sum_here(&file)
        };
        let e = stat_sum_result(&a, &file, raced).unwrap_err();
        assert_eq!(e.kind(), "invalid-argument", "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn split_keeps_the_root() {
        assert_eq!(split("/x"), ("/", "x"));
        assert_eq!(split("/a/b/c"), ("/a/b", "c"));
    }
}
