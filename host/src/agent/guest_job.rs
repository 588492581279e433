//! Shell scripts run in a guest in the background and polled until they end, for
//! guest work longer than one plugin call may last (a bulk copy's `dd` and
//! `sha256sum` of gigabytes). The script runs as its own session under
//! `setsid`, its output and exit code kept in a private `mktemp -d` directory of
//! the guest's `/tmp`; each poll is a short exec that reads them, and the
//! directory is removed when they are read or the job is killed at its deadline.

use std::time::{Duration, Instant};

use hyper::StatusCode;

use super::guest::GuestProvider;
use crate::api::ApiError;
use crate::plugin::bindings::types::ExecRequest;

/// Starts `$0` (the script) with the remaining arguments in the background; prints
/// the job's directory. The directory is made by root in a sticky, root-owned
/// `/tmp` (0700, so no guest user can replace it or forge its files); a guest
/// without such a `/tmp` or without `setsid` is refused (exit 92, 91).
const LAUNCH: &str = r#"s=$0
command -v setsid >/dev/null || { echo "the guest has no setsid" >&2; exit 91; }
[ -k /tmp ] && [ "$(stat -c %u /tmp)" = 0 ] || { echo "the guest's /tmp is not a sticky root-owned directory" >&2; exit 92; }
d=$(mktemp -d /tmp/.gve-job.XXXXXX) || exit 90
setsid /bin/sh -c 's=$1; d=$2; shift 2; /bin/sh -c "$s" gve-job "$@" >"$d/out" 2>"$d/err" </dev/null; echo $? >"$d/rc.t"; mv "$d/rc.t" "$d/rc"' gve-job "$s" "$d" "$@" >/dev/null 2>&1 </dev/null &
echo $! >"$d/pid"
echo "$d"
"#;

/// Exit code of [`POLL_HEAD`] while the job runs (scripts must not use it).
const RUNNING: i32 = 99;

/// Exit code of [`POLL_HEAD`] and [`KILL_HEAD`] for a job that ended without an exit code
/// (killed, its directory gone): scripts must not use it.
const LOST: i32 = 98;

/// A poll, followed by [`REPORT`]: exits [`RUNNING`] while the job runs,
/// [`LOST`] when it is gone without an exit code. A zombie counts as gone: a guest whose init reaps no orphans
/// keeps a killed job's process as one.
const POLL_HEAD: &str = r#"if [ ! -f "$1/rc" ]; then
  [ -d "$1" ] || exit 98
  st=$(sed 's/.*) //' "/proc/$(cat "$1/pid" 2>/dev/null)/stat" 2>/dev/null); st=${st%% *}
  [ -n "$st" ] && [ "$st" != Z ] && exit 99
  [ -f "$1/rc" ] || { rm -rf -- "$1"; exit 98; }
fi
"#;

/// Ends the job, followed by [`REPORT`]: one that has just finished reports as a
/// poll would; else its session gets SIGTERM (a script's traps clean up), then
/// SIGKILL, its directory is removed, exit [`LOST`].
const KILL_HEAD: &str = r#"if [ ! -f "$1/rc" ] && p=$(cat "$1/pid" 2>/dev/null); then
  kill -TERM -"$p" 2>/dev/null
  sleep 0.3
  kill -9 -"$p" 2>/dev/null
  sleep 0.1
fi
[ -f "$1/rc" ] || { rm -rf -- "$1"; exit 98; }
"#;

/// The end of [`POLL_HEAD`] and [`KILL_HEAD`] once the job has finished: its
/// output (stdout, stderr) and exit code, its directory removed.
const REPORT: &str =
    r#"cat "$1/out"; cat "$1/err" >&2; rc=$(cat "$1/rc"); rm -rf -- "$1"; exit "$rc""#;

/// A job's end.
#[derive(Debug)]
pub(super) struct Finished {
    /// Its exit code.
    pub exit_code: i32,
    /// Its standard output (at most 4 KiB), trimmed.
    pub stdout: String,
    /// Its standard error (at most 4 KiB), trimmed.
    pub stderr: String,
}

/// Runs `script` with `args` ($1…) in the guest of `vm` and waits for it, at most
/// `deadline` (then it is killed: 504 `timeout`).
pub(super) async fn run(
    guest: &GuestProvider,
    vm: &str,
    script: &str,
    args: Vec<String>,
    deadline: Duration,
) -> Result<Finished, ApiError> {
    let start = Instant::now();
    let launched = exec(guest, vm, LAUNCH, script, args).await?;
    let dir = launched.stdout;
    if launched.exit_code != 0 || !dir.starts_with("/tmp/.gve-job.") || dir.contains('\n') {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "backend",
            format!(
                "could not start a job in the guest of {vm} (exit {}): {}",
                launched.exit_code, launched.stderr
            ),
        ));
    }
    let mut pause = Duration::from_millis(50);
    let poll = format!("{POLL_HEAD}{REPORT}");
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
        let polled = exec(guest, vm, &poll, "gve-poll", vec![dir.clone()]).await;
        let (status, kind, why) = match polled {
            Ok(p) if p.exit_code == RUNNING && start.elapsed() <= deadline => continue,
            Ok(p) if p.exit_code == RUNNING => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("did not finish within {deadline:?}"),
            ),
            Ok(p) if p.exit_code == LOST => (
                StatusCode::BAD_GATEWAY,
                "backend",
                "ended without an exit code (killed?)".to_string(),
            ),
            Ok(p) => return Ok(p),
            Err(e) => (
                StatusCode::BAD_GATEWAY,
                "backend",
                format!("could not be polled: {}", e.message),
            ),
        };
        // Never leave it running behind an error: it could still put a file in
        // place. It may also have just finished; then its own end counts.
        let kill = format!("{KILL_HEAD}{REPORT}");
        let why = match exec(guest, vm, &kill, "gve-kill", vec![dir]).await {
            Ok(p) if p.exit_code != LOST => return Ok(p),
            Ok(_) => why,
            Err(e) => format!(
                "{why}, and may still run (stopping it failed: {})",
                e.message
            ),
        };
        return Err(ApiError::new(
            status,
            kind,
            format!("the guest's side of a bulk copy in VM {vm} {why}"),
        ));
    }
}

/// One short exec (at most 10 s) of `sh -c body name args…`: its exit code (or
/// [`LOST`] when it has none) and its output; 504 `timeout` when it overran.
pub(super) async fn exec(
    guest: &GuestProvider,
    vm: &str,
    body: &str,
    name: &str,
    args: Vec<String>,
) -> Result<Finished, ApiError> {
    let request = ExecRequest {
        argv: ["/bin/sh", "-c", body, name]
            .iter()
            .map(|s| s.to_string())
            .chain(args)
            .collect(),
        env: Vec::new(),
        cwd: None,
        stdin: Vec::new(),
        timeout_ms: 10_000,
        output_limit: 4096,
    };
    let r = guest.session.exec(vm, &request).await?;
    if r.timed_out {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("a 10 s exec in the guest of {vm} (a bulk copy's step) timed out"),
        ));
    }
    Ok(Finished {
        // No exit code (killed by a signal) reads as a job that is gone.
        exit_code: r.exit_code.unwrap_or(LOST),
        stdout: String::from_utf8_lossy(&r.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&r.stderr).trim().to_string(),
    })
}
