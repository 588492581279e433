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
/// the job's directory.
const LAUNCH: &str = r#"s=$0
d=$(mktemp -d /tmp/.gve-job.XXXXXX) || exit 90
setsid /bin/sh -c 's=$1; d=$2; shift 2; /bin/sh -c "$s" gve-job "$@" >"$d/out" 2>"$d/err" </dev/null; echo $? >"$d/rc.t"; mv "$d/rc.t" "$d/rc"' gve-job "$s" "$d" "$@" >/dev/null 2>&1 </dev/null &
echo $! >"$d/pid"
echo "$d"
"#;

/// Exit code of [`POLL`] while the job runs (scripts must not use it).
const RUNNING: i32 = 99;

/// Prints the job's output (stdout, stderr) and exits with its code, removing its
/// directory; exits [`RUNNING`] while it runs.
const POLL: &str = r#"[ -f "$1/rc" ] || exit 99
cat "$1/out"; cat "$1/err" >&2; rc=$(cat "$1/rc"); rm -rf -- "$1"; exit "$rc""#;

/// Kills the job's session and removes its directory.
const KILL: &str = r#"p=$(cat "$1/pid" 2>/dev/null) && { kill -9 -- "-$p" 2>/dev/null || kill -9 "$p"; }; rm -rf -- "$1""#;

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
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
        let polled = exec(guest, vm, POLL, "gve-poll", vec![dir.clone()]).await?;
        if polled.exit_code != RUNNING {
            return Ok(polled);
        }
        if start.elapsed() > deadline {
            if let Err(e) = exec(guest, vm, KILL, "gve-kill", vec![dir]).await {
                tracing::warn!(vm, "killing a guest job past its deadline: {e}");
            }
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("the guest's side of a bulk copy did not finish within {deadline:?}"),
            ));
        }
    }
}

/// One short exec of `sh -c body name args…`.
async fn exec(
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
        exit_code: r.exit_code.unwrap_or(-1),
        stdout: String::from_utf8_lossy(&r.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&r.stderr).trim().to_string(),
    })
}
