//! A guest command that would outrun the plugin's call budget (contract 0.1.2's
//! `deadline`): guest-install stops the guest's checksum in time and says which limit
//! to raise, rather than being stopped by the sandbox, which would drop its instance
//! and, for an upload, the clean-up that removes the temporary file from the guest.
//! Run on the real guest of `guest::exec_copy_and_provision_on_a_real_guest`.

use gve::agent::model::FileMeta;
use gve::agent::Agent;
use gve::api::client::Client;
use serde_json::json;
use std::time::{Duration, Instant};

use crate::guest::{exec, guest_spec, spawn_in_guest, text};

/// The call budget guest-install runs under here: below its per-command timeout
/// (5 s), the shortest time it gave a checksum before it knew its deadline, as a
/// large file's checksum outruns the default 30 s budget.
const CALL_BUDGET_MS: u64 = 4_000;

/// What a checksum given the time left (4 s less the plugin's 2 s margin, less what
/// the call did before) takes at least, where one cut at once would take a moment.
const LEAST: Duration = Duration::from_millis(1_500);

/// `upload-finish` calls that ended with the plugin's own error.
const FINISH_FAILED: &str =
    r#"gve_plugin_calls_total{plugin="guest-install",op="upload-finish",outcome="driver-error"}"#;

/// Both checksums (an upload's, a download's) outrun a 4 s call budget; each call
/// ends with a `timeout` naming `call-timeout-ms`, no plugin call is stopped by the
/// sandbox, and nothing of the upload is left in the guest.
pub async fn checksums_stop_within_the_call_budget(agent: &Agent, c: &Client, id: &str) {
    // In the guest: a file to copy out whose checksum never ends, a regular file
    // by its mode bits that reads forever (the kernel's log, waiting for more).
    // A `sha256sum` earlier in PATH would not do: both checks run under busybox's
    // shell, which runs its own applet whatever PATH says.
    let setup = "mkdir -p /tmp/slow && ln -sf /proc/kmsg /tmp/slow/down.bin";
    let r = exec(c, id, json!({ "argv": ["sh", "-c", setup] })).await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let mut spec = guest_spec(5_000);
    spec.limits.call_timeout_ms = CALL_BUDGET_MS;
    agent.plugins.replace("guest-install", spec).await.unwrap();
    // A guest process that turns the upload's temporary file into a named pipe
    // once its first piece is there: the check's `sha256sum` then waits on it.
    let pipe = r#"i=0; while [ $i -lt 500 ]; do
for f in /tmp/slow/.up.bin.gve-upload-*; do
if [ -s "$f" ]; then rm -f "$f"; mkfifo "$f"; exit 0; fi
done; sleep 0.02; i=$((i+1)); done"#;
    spawn_in_guest(c, id, pipe).await;

    let failed_finishes = || {
        let text = agent.runtime.metrics_text().unwrap();
        crate::metrics::sample(&text, FINISH_FAILED)
    };
    let failed_before = failed_finishes();

    let t = Instant::now();
    let e = c
        .put_stream::<FileMeta>(
            &format!("/v1/vms/{id}/files?path=/tmp/slow/up.bin"),
            &[],
            gve::api::full(vec![b'U'; 1 << 20]),
        )
        .await
        .unwrap_err();
    // The check was given what was left (about 2 s), not cut at once.
    over_call_budget(&e, t);
    let t = Instant::now();
    let e = c
        .get_stream(&format!("/v1/vms/{id}/files?path=/tmp/slow/down.bin"))
        .await
        .unwrap_err();
    over_call_budget(&e, t);
    // No call was stopped by the sandbox: both ended as the plugin's own errors.
    assert_eq!(failed_finishes(), failed_before + 1.0);
    crate::metrics::assert_no_deadline_stop(agent, "guest-install");
    // Nothing of either checksum runs on: killed with their children (the upload's
    // `sha256sum` ran under the check's shell; the download's shell, whose command
    // line names `sha256sum` too, may have become its `sha256sum`). Live processes' command lines (a
    // killed one the guest's init has not reaped has none).
    let live = "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '";
    let r = exec(
        c,
        id,
        json!({ "argv": ["sh", "-c", live], "timeout-ms": 3000 }),
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let live = text(&r.stdout_b64);
    assert!(!live.contains("sha256sum"), "{live}");
    agent
        .plugins
        .replace("guest-install", guest_spec(5_000))
        .await
        .unwrap();
    // Neither the target nor the temporary file (the upload's drop removed it).
    let ls = exec(c, id, json!({ "argv": ["ls", "-A", "/tmp/slow"] })).await;
    assert_eq!(text(&ls.stdout_b64).trim(), "down.bin");
    let r = exec(c, id, json!({ "argv": ["rm", "-rf", "/tmp/slow"] })).await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
}

/// `e`, of a call started at `t`, is the plugin's own timeout naming the limit, and
/// came after the checksum had [`LEAST`].
fn over_call_budget(e: &gve::api::ApiError, t: Instant) {
    assert_eq!((e.status, e.kind.as_str()), (504, "timeout"), "{e}");
    assert!(
        e.message.contains("checksum") && e.message.contains("call-timeout-ms"),
        "{e}"
    );
    assert!(t.elapsed() >= LEAST, "{:?}", t.elapsed());
}
