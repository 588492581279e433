//! Running commands in the guest: `guest-exec`, then `guest-exec-status` until the
//! process ends or its timeout passes.
//!
//! qemu-ga has no working directory and replaces (rather than extends) the
//! environment when one is given, so a request with `cwd` or `env` runs through a
//! small POSIX `sh` wrapper that exports the variables, changes directory and `exec`s
//! the command (the pid stays the command's). Requests without them run directly,
//! so guests without a shell (Windows) still work. A command that outlives its
//! timeout is killed with every process under it (`kill -KILL`, best effort) and
//! reported as timed out.

use std::time::{Duration, Instant};

use gve_sdk::prelude::*;

use crate::qga::{decode_output, Agent, ExecStatus};

/// Runs the wrapper: `sh -c WRAPPER gve-exec CWD N NAME=VALUE... ARGV...`.
const WRAPPER: &str = r#"d=$1; n=$2; shift 2
while [ "$n" -gt 0 ]; do export "$1" || exit 125; shift; n=$((n - 1)); done
if [ -n "$d" ]; then cd -- "$d" || exit 126; fi
exec "$@""#;

/// Program and arguments to hand to `guest-exec` for `request`.
pub fn command_line(request: &ExecRequest) -> Result<(String, Vec<String>)> {
    let Some(program) = request.argv.first() else {
        return Err(Error::invalid_argument("exec: argv must not be empty"));
    };
    if program.is_empty() {
        return Err(Error::invalid_argument("exec: argv[0] must not be empty"));
    }
    for v in &request.env {
        let valid = !v.name.is_empty()
            && !v.name.starts_with(|c: char| c.is_ascii_digit())
            && v.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::invalid_argument(format!(
                "exec: '{}' is not a valid environment variable name",
                v.name
            )));
        }
    }
    if request.env.is_empty() && request.cwd.is_none() {
        return Ok((program.clone(), request.argv[1..].to_vec()));
    }
    let mut args = vec![
        "-c".to_string(),
        WRAPPER.to_string(),
        "gve-exec".to_string(),
        request.cwd.clone().unwrap_or_default(),
        request.env.len().to_string(),
    ];
    args.extend(
        request
            .env
            .iter()
            .map(|v| format!("{}={}", v.name, v.value)),
    );
    args.extend(request.argv.iter().cloned());
    Ok(("/bin/sh".to_string(), args))
}

/// Runs `request` to its end or timeout.
pub fn run(agent: &Agent, request: &ExecRequest) -> Result<ExecResult> {
    if request.timeout_ms == 0 {
        return Err(Error::invalid_argument("exec: timeout-ms must be positive"));
    }
    let (program, args) = command_line(request)?;
    let started = Instant::now();
    let budget = Duration::from_millis(u64::from(request.timeout_ms));
    // No single qemu-ga command may wait longer than the whole command may take.
    let agent = &Agent {
        command_timeout_ms: agent.command_timeout_ms.min(request.timeout_ms),
        ..agent.clone()
    };
    let pid = agent.exec_start(&program, &args, &request.stdin)?;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        let status = agent.exec_status(pid)?;
        if status.exited {
            break status;
        }
        let elapsed = started.elapsed();
        if elapsed >= budget {
            return Ok(timed_out(agent, pid, request));
        }
        std::thread::sleep(pause.min(budget - elapsed));
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    ended(agent, &status, request.output_limit, true)
}

/// What an ended process reported: its exit (none where a signal ended it) and
/// its output, each cut to `limit` bytes. Output qemu-ga sent as invalid base64
/// is an error when `strict`, else left out and flagged cut.
fn ended(agent: &Agent, status: &ExecStatus, limit: u32, strict: bool) -> Result<ExecResult> {
    let output = |data: Option<&str>, cut: bool| -> Result<(Vec<u8>, bool)> {
        match decode_output(&agent.vm, data) {
            Ok(d) => Ok(limited(d, limit as usize, cut)),
            Err(e) if strict => Err(e),
            Err(e) => {
                gve_sdk::log::warn(&e.to_string());
                Ok((Vec::new(), true))
            }
        }
    };
    let (stdout, stdout_truncated) = output(status.out_data.as_deref(), status.out_truncated)?;
    let (stderr, stderr_truncated) = output(status.err_data.as_deref(), status.err_truncated)?;
    Ok(ExecResult {
        exit_code: status.exitcode.filter(|_| status.signal.is_none()),
        signal: status.signal,
        timed_out: false,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
    })
}

/// Kills process `$1` and every process under it (a shell's running command, which
/// would otherwise go on and hold the process's output open, so that qemu-ga never
/// sees it end): nothing, if `$1` is this script or no longer a child of its parent
/// (qemu-ga, which may have reaped it and had its pid reused); else `$1` stopped, so
/// it starts no other, then its children as `/proc` names them stopped, again until
/// a pass finds none (a child may have started one before it was stopped; 64 passes
/// at most), then all killed. `/proc` is read through `cat`, which goes past a
/// process that ended after the glob named it; mawk and busybox awk would give up
/// at its file, so a guest whose processes come and go would keep the children.
/// Where `awk` is missing, `$1` alone. A child that ends before it is stopped
/// leaves its own children to init, out of reach.
const KILL_TREE: &str = r#"[ "$1" != "$$" ] || exit 0
grep -q "^PPid:[[:space:]]*$PPID\$" "/proc/$1/status" 2>/dev/null || exit 0
kill -STOP "$1" 2>/dev/null
t=$1 i=0
while [ $i -lt 64 ]; do
  k=$(cat /proc/[0-9]*/status 2>/dev/null | awk -v t="$t" 'BEGIN { n = split(t, a, " "); for (j = 1; j <= n; j++) s[a[j]] = 1 }
/^Pid:/ { p = $2 } /^PPid:/ { up[p] = $2 }
END { do { more = 0; for (p in up) if (!(p in s) && (up[p] in s)) { s[p] = 1; more = 1; printf "%s ", p } } while (more) }')
  [ -n "$k" ] || break
  kill -STOP $k 2>/dev/null
  t="$t $k" i=$((i + 1))
done
kill -KILL $t 2>/dev/null"#;

/// Kills a process that outlived its budget (with every process under it where the
/// guest has a POSIX shell) and reports what it wrote until then. A process that
/// ended on its own before the kill reached it is reported as it ended, not as
/// timed out.
fn timed_out(agent: &Agent, pid: i64, request: &ExecRequest) -> ExecResult {
    let pid_arg = pid.to_string();
    let tree = [
        "-c".to_string(),
        KILL_TREE.to_string(),
        "gve-kill".to_string(),
        pid_arg.clone(),
    ];
    // `kill` alone only where the script could not start (a guest without
    // `/bin/sh`), not where it may have started and its answer was late.
    let killer = match agent.exec_start("/bin/sh", &tree, &[]) {
        Err(e) if e.kind() != "timeout" => {
            agent.exec_start("kill", &["-KILL".to_string(), pid_arg], &[])
        }
        r => r,
    };
    let result = ExecResult {
        exit_code: None,
        signal: None,
        timed_out: true,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
    };
    let Ok(killer) = killer else {
        gve_sdk::log::warn(&format!(
            "{}: cannot kill timed-out guest process {pid}",
            agent.vm
        ));
        return result;
    };
    // The kill ends once everything under it is killed, however long a busy guest
    // takes; then the process is reported ended (or soon: a daemon it started
    // may hold its output open). Both are collected, so qemu-ga forgets them,
    // while the call has time left to answer.
    wait_exited(agent, killer, Instant::now() + KILL_WAIT);
    let Some(s) = wait_exited(agent, pid, Instant::now() + REPORT_WAIT) else {
        return result;
    };
    match ended(agent, &s, request.output_limit, false) {
        // Reported killed, or ended on its own before the kill reached it.
        Ok(r) => ExecResult {
            timed_out: r.exit_code.is_none(),
            ..r
        },
        Err(_) => result,
    }
}

/// Longest a timed-out command's kill is waited for.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Longest a killed command is waited for to be reported ended, after its kill.
const REPORT_WAIT: Duration = Duration::from_secs(1);

/// Polls process `pid` until it has exited (its status, which qemu-ga then
/// forgets), qemu-ga does not know it, `until` passes or the call has under
/// 0.3 s left.
fn wait_exited(agent: &Agent, pid: i64, until: Instant) -> Option<ExecStatus> {
    while gve_sdk::deadline::remaining() >= Duration::from_millis(300) && Instant::now() < until {
        match agent.exec_status(pid) {
            Ok(s) if s.exited => return Some(s),
            Ok(_) => std::thread::sleep(Duration::from_millis(25)),
            Err(_) => return None,
        }
    }
    None
}

/// Cuts `data` to `limit` bytes; the flag says whether anything was dropped.
fn limited(mut data: Vec<u8>, limit: usize, already_cut: bool) -> (Vec<u8>, bool) {
    let cut = data.len() > limit;
    data.truncate(limit);
    (data, cut || already_cut)
}

/// Runs a helper command (mkdir, chmod, rm, ...) that must succeed within the
/// command timeout; returns its stdout.
pub fn must(agent: &Agent, argv: &[&str], what: &str) -> Result<Vec<u8>> {
    let r = run(agent, &helper(argv, agent.command_timeout_ms))?;
    succeeded(agent, &argv.join(" "), what, r)
}

/// A helper command's request: no environment, 64 KiB of output at most.
pub fn helper(argv: &[&str], timeout_ms: u32) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        stdin: Vec::new(),
        timeout_ms,
        output_limit: 1 << 16,
    }
}

/// The stdout of a helper command (`shown` in the error) that ended with `r`, or
/// an error saying `what` failed and how, of the kind its stderr's errno texts
/// tell (not its command line, nor the paths quoted in stderr: they are the user's).
pub fn succeeded(agent: &Agent, shown: &str, what: &str, r: ExecResult) -> Result<Vec<u8>> {
    if r.exit_code == Some(0) {
        return Ok(r.stdout);
    }
    let stderr = String::from_utf8_lossy(&r.stderr);
    let how = match (r.timed_out, r.exit_code, r.signal) {
        (true, _, _) => "timed out".to_string(),
        (_, Some(c), _) => format!("exit code {c}"),
        (_, _, Some(s)) => format!("signal {s}"),
        _ => "unknown end".to_string(),
    };
    let message = format!(
        "{}: {what}: `{shown}` failed ({how}): {}",
        agent.vm,
        stderr.trim()
    );
    // coreutils put the path before the errno text: "stat: cannot statx 'P': E".
    let evidence: Vec<&str> = stderr
        .lines()
        .map(|l| l.rsplit(": ").next().unwrap_or(l))
        .collect();
    Err(crate::qga::classify_by(&evidence.join("\n"), message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str], env: &[(&str, &str)], cwd: Option<&str>) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(n, v)| EnvVar {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            cwd: cwd.map(str::to_string),
            stdin: Vec::new(),
            timeout_ms: 1000,
            output_limit: 10,
        }
    }

    #[test]
    fn plain_commands_run_directly() {
        let (p, a) = command_line(&req(&["uname", "-a"], &[], None)).unwrap();
        assert_eq!((p.as_str(), a), ("uname", vec!["-a".to_string()]));
    }

    #[test]
    fn env_and_cwd_go_through_the_wrapper() {
        let (p, a) = command_line(&req(&["pwd"], &[("A", "x y")], Some("/tmp"))).unwrap();
        assert_eq!(p, "/bin/sh");
        assert_eq!(a[3..], ["/tmp", "1", "A=x y", "pwd"]);
    }

    #[test]
    fn bad_requests_are_refused() {
        assert_eq!(
            command_line(&req(&[], &[], None)).unwrap_err().kind(),
            "invalid-argument"
        );
        assert_eq!(
            command_line(&req(&["x"], &[("1A", "v")], None))
                .unwrap_err()
                .kind(),
            "invalid-argument"
        );
        assert_eq!(
            command_line(&req(&["x"], &[("A=B", "v")], None))
                .unwrap_err()
                .kind(),
            "invalid-argument"
        );
    }

    #[test]
    fn output_is_cut_at_the_limit() {
        assert_eq!(limited(vec![1; 20], 10, false), (vec![1; 10], true));
        assert_eq!(limited(vec![1; 5], 10, false), (vec![1; 5], false));
        assert_eq!(limited(vec![1; 5], 10, true), (vec![1; 5], true));
    }

    #[test]
    fn a_helpers_error_kind_comes_from_its_errno_text_not_the_users_path() {
        let agent = Agent::for_tests();
        let ended = |code: i32, stderr: &str| ExecResult {
            exit_code: Some(code),
            signal: None,
            timed_out: false,
            stdout: b"out".to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            stdout_truncated: false,
            stderr_truncated: false,
        };
        assert_eq!(
            succeeded(&agent, "true", "x", ended(0, "")).unwrap(),
            b"out"
        );
        for (stderr, kind) in [
            (
                "stat: cannot statx '/a/No such file or directory/b': Permission denied",
                "denied",
            ),
            (
                "mv: cannot move '/t' to '/Permission denied/x': No such file or directory",
                "not-found",
            ),
            (
                "sha256sum: '/Is a directory': Read-only file system",
                "backend",
            ),
            ("sha256sum: /d: Is a directory", "invalid-argument"),
            ("sha256sum: can't open '/x': No such file or directory", "not-found"),
            ("mkdir: cannot create directory '/a': File exists\nchmod: '/b': Operation not permitted", "denied"),
        ] {
            let e = succeeded(&agent, "/Permission denied/x", "x", ended(1, stderr)).unwrap_err();
            assert_eq!(e.kind(), kind, "{stderr}");
            assert!(e.message().contains(stderr), "{e}");
        }
    }
}
