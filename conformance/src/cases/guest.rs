//! The guest interface: commands and file copies inside a running VM, through the
//! driver's own guest operations or the target's guest plugin (guest-install). The
//! commands are ones every Linux guest has (`echo`, `cat`, `env`, `pwd`, `sh -c`,
//! `sleep`), and the SDK's memory example has too.

use std::time::{Duration, Instant};

use gve::plugin::bindings::types::{
    Capabilities as C, EnvVar, ExecRequest, ExecResult, FileInfo, VmState,
};
use gve::plugin::{ErrorKind, GuestSession, PluginError};
use sha2::{Digest, Sha256};

use crate::case::{Case, CheckFuture, Need};
use crate::ctx::{ensure, must, must_fail, Ctx, Failure, Side};

fn guest_caps() -> C {
    C::CREATE | C::DESTROY | C::START
}

/// The guest cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "guest.exec-runs-commands",
            group: "guest",
            about: "exec returns the exit code, stdout, stderr; feeds stdin; sets env and cwd; cuts output at its limit and says so",
            need: Need::Guest(guest_caps()),
            check: exec,
        },
        Case {
            name: "guest.exec-timeout-and-errors",
            group: "guest",
            about: "a command past its timeout reports timed-out; empty argv is invalid-argument, an unknown VM not-found, a stopped VM unavailable",
            need: Need::Guest(guest_caps() | C::SHUTDOWN),
            check: exec_errors,
        },
        Case {
            name: "guest.files-round-trip",
            group: "guest",
            about: "an uploaded file reads back byte for byte with its mode and SHA-256 (finish, stat, download); missing paths answer not-found",
            need: Need::Guest(guest_caps()),
            check: files,
        },
    ]
}

/// A request for `argv` with a 30 s budget and a 64 KiB output limit.
pub(super) fn request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        stdin: Vec::new(),
        timeout_ms: 30_000,
        output_limit: 64 << 10,
    }
}

/// The guest session (the runner only runs guest cases when there is a provider),
/// or why it did not open.
pub(super) fn guest(ctx: &Ctx) -> Result<&GuestSession, Failure> {
    match ctx.guest.as_ref() {
        Some(Ok(g)) => Ok(g),
        Some(Err(why)) => Err(Failure::new(why.clone())),
        None => Err(Failure::new("no guest operations on this target")),
    }
}

/// A running VM whose guest answers commands (its in-guest agent may take a while
/// to come up after boot: up to the settle time).
pub(super) async fn running_guest(ctx: &Ctx, what: &str) -> Result<String, Failure> {
    guest(ctx)?;
    let vm = ctx.create(what).await?;
    must(&format!("start {}", vm.id), ctx.driver.start(&vm.id).await)?;
    ctx.wait_state(Side::First, &vm.id, VmState::Running)
        .await?;
    let end = Instant::now() + ctx.settle;
    loop {
        let last = match guest(ctx)?.exec(&vm.id, &request(&["true"])).await {
            Ok(r) if r.exit_code == Some(0) => return Ok(vm.id),
            Ok(r) => format!("`true` answered {r:?}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= end {
            return Err(Failure::new(format!(
                "the guest of {} did not run `true` within {:?} of starting: {last}",
                vm.id, ctx.settle
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `req` on `vm`; it must succeed.
pub(super) async fn run(ctx: &Ctx, vm: &str, req: &ExecRequest) -> Result<ExecResult, Failure> {
    must(
        &format!("exec {:?} in {vm}", req.argv),
        guest(ctx)?.exec(vm, req).await,
    )
}

/// Fails unless `r` exited with `code` and printed `stdout`.
fn expect(argv: &[String], r: &ExecResult, code: i32, stdout: &[u8]) -> Result<(), Failure> {
    ensure(r.exit_code == Some(code) && r.stdout == stdout, || {
        format!(
            "exec {argv:?}: want exit {code} and stdout {:?}, got exit {:?}, stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(stdout),
            r.exit_code,
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        )
    })
}

fn exec(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vm = running_guest(ctx, "exec").await?;
        let req = request(&["echo", "gve", "conformance"]);
        expect(
            &req.argv,
            &run(ctx, &vm, &req).await?,
            0,
            b"gve conformance\n",
        )?;
        let req = request(&["sh", "-c", "exit 3"]);
        expect(&req.argv, &run(ctx, &vm, &req).await?, 3, b"")?;
        let req = request(&["cat", "/gvc-no-such-file"]);
        let r = run(ctx, &vm, &req).await?;
        ensure(r.exit_code == Some(1) && !r.stderr.is_empty(), || {
            format!(
                "exec {:?}: want exit 1 and an error on stderr, got exit {:?}, stderr {:?}",
                req.argv,
                r.exit_code,
                String::from_utf8_lossy(&r.stderr)
            )
        })?;
        let mut req = request(&["cat"]);
        req.stdin = b"through stdin\n".to_vec();
        expect(
            &req.argv,
            &run(ctx, &vm, &req).await?,
            0,
            b"through stdin\n",
        )?;
        let mut req = request(&["env"]);
        req.env.push(EnvVar {
            name: "GVC_RUN".into(),
            value: ctx.run.clone(),
        });
        let r = run(ctx, &vm, &req).await?;
        let want = format!("GVC_RUN={}", ctx.run);
        ensure(
            String::from_utf8_lossy(&r.stdout)
                .lines()
                .any(|l| l == want),
            || {
                format!(
                    "exec env with GVC_RUN set: no line {want:?} in {:?}",
                    String::from_utf8_lossy(&r.stdout)
                )
            },
        )?;
        let mut req = request(&["pwd"]);
        req.cwd = Some("/tmp".into());
        expect(&req.argv, &run(ctx, &vm, &req).await?, 0, b"/tmp\n")?;
        // Output past the limit is cut to the limit and flagged.
        let mut req = request(&["cat"]);
        req.stdin = vec![b'x'; 10_000];
        req.output_limit = 100;
        let r = run(ctx, &vm, &req).await?;
        ensure(
            r.stdout.len() == 100 && r.stdout_truncated && !r.stderr_truncated,
            || {
                format!(
                    "exec cat of 10,000 bytes with output-limit 100: want 100 bytes of stdout \
                     flagged truncated, got {} bytes, stdout-truncated {}, stderr-truncated {}",
                    r.stdout.len(),
                    r.stdout_truncated,
                    r.stderr_truncated
                )
            },
        )
    })
}

fn exec_errors(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vm = running_guest(ctx, "exec-errors").await?;
        let mut req = request(&["sleep", "30"]);
        req.timeout_ms = 1_000;
        let t = Instant::now();
        let r = run(ctx, &vm, &req).await?;
        ensure(r.timed_out && r.exit_code.is_none(), || {
            format!("exec sleep 30 with a 1 s timeout: want timed-out and no exit code, got {r:?}")
        })?;
        ensure(t.elapsed() < Duration::from_secs(25), || {
            format!(
                "exec sleep 30 with a 1 s timeout took {:?}: the timeout was not honoured",
                t.elapsed()
            )
        })?;
        must_fail(
            &format!("exec with an empty argv in {vm}"),
            ErrorKind::InvalidArgument,
            guest(ctx)?.exec(&vm, &request(&[])).await,
        )?;
        let unknown = ctx.name("never-made");
        must_fail(
            &format!("exec in {unknown}, which does not exist"),
            ErrorKind::NotFound,
            guest(ctx)?.exec(&unknown, &request(&["true"])).await,
        )?;
        must(
            &format!("shutdown {vm} (force)"),
            ctx.driver.shutdown(&vm, true).await,
        )?;
        ctx.wait_state(Side::First, &vm, VmState::Stopped).await?;
        must_fail(
            &format!("exec in {vm} while it is stopped"),
            ErrorKind::Unavailable,
            guest(ctx)?.exec(&vm, &request(&["true"])).await,
        )
    })
}

/// Bytes that show a chunking or offset mistake: 300 KiB + 17 of a position pattern.
fn payload() -> Vec<u8> {
    (0..300 * 1024 + 17u32)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

fn files(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vm = running_guest(ctx, "files").await?;
        let g = guest(ctx)?;
        let dir = format!("/tmp/{}", ctx.name("files"));
        let path = format!("{dir}/sub/data.bin");
        let data = payload();
        let sha = hex::encode(Sha256::digest(&data));
        let mut up = must(
            &format!("upload {path} (create-parents)"),
            g.upload(&vm, &path, 0o640, true).await,
        )?;
        for chunk in data.chunks(64 << 10) {
            must(&format!("write to {path}"), up.write(chunk).await)?;
        }
        let done = must(&format!("finish {path}"), up.finish().await)?;
        let size = data.len() as u64;
        same_file(&format!("finish {path}"), &done, size, 0o640, &sha)?;
        let st = must(&format!("stat {path}"), g.stat(&vm, &path).await)?;
        same_file(&format!("stat {path}"), &st, size, 0o640, &sha)?;
        let mut down = must(&format!("download {path}"), g.download(&vm, &path).await)?;
        let (down_size, mode) = (down.size, down.mode);
        let mut back = Vec::new();
        let read = loop {
            match down.read(64 << 10).await {
                Ok(chunk) if chunk.is_empty() => break Ok(()),
                Ok(chunk) if back.len() + chunk.len() > data.len() => {
                    break Err(Failure::new(format!(
                        "download {path}: more than the {} bytes uploaded",
                        data.len()
                    )))
                }
                Ok(chunk) => back.extend_from_slice(&chunk),
                Err(e) => break Err(Failure::new(format!("read {path}: {e}"))),
            }
        };
        down.close().await;
        read?;
        ensure((down_size, mode & 0o7777) == (size, 0o640), || {
            format!(
                "download {path}: announces {down_size} bytes, mode {mode:o}; want {size} bytes, mode 640"
            )
        })?;
        ensure(back == data, || {
            let at = back.iter().zip(&data).take_while(|(a, b)| a == b).count();
            format!(
                "download {path}: {} bytes back for {} uploaded, first difference at byte {at}",
                back.len(),
                data.len()
            )
        })?;
        let missing = format!("{dir}-missing/file");
        not_found(&format!("upload {missing} without create-parents"), async {
            g.upload(&vm, &missing, 0o600, false).await.map(|_| ())
        })
        .await?;
        not_found(&format!("stat {missing}"), g.stat(&vm, &missing)).await?;
        not_found(&format!("download {missing}"), async {
            g.download(&vm, &missing).await.map(|d| d.size)
        })
        .await
    })
}

/// Fails unless `got` (what `what` reported) is `size` bytes of mode `mode` with
/// SHA-256 `sha`.
fn same_file(what: &str, got: &FileInfo, size: u64, mode: u32, sha: &str) -> Result<(), Failure> {
    let held = (got.size, got.mode & 0o7777, got.sha256.as_str());
    ensure(held == (size, mode, sha), || {
        format!(
            "{what}: want {size} bytes, mode {mode:o}, sha256 {sha}; got {} bytes, mode {:o}, sha256 {}",
            got.size, got.mode, got.sha256
        )
    })
}

/// `call` must answer not-found.
async fn not_found<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, PluginError>>,
) -> Result<(), Failure> {
    must_fail(what, ErrorKind::NotFound, call.await)
}
