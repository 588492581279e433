//! The guest's side of a staged copy (a background job in the guest), attacked: a
//! `/tmp` a guest user could tamper with, and the job killed half way. Either way
//! the copy fails with a clear error, the target keeps its content and no disk is
//! left staged; the next copy goes through.

use gve_harness::Libvirtd;
use serde_json::json;

use super::{hex, nothing_staged, put_known};
use crate::guest::{exec, running_vm, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_unsafe_guest_job_fails_the_copy_and_leaves_the_target() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = crate::guest::agent(&lv, None).await;
    let vm = running_vm(&agent, &c, "bulk-job", 256).await;
    let data: Vec<u8> = (0..6usize << 20)
        .map(|i| (i * 7 + (i >> 12)) as u8)
        .collect();
    let sha = hex(&data);
    let sh = |script: &str| json!({ "argv": ["sh", "-c", script] });
    exec(&c, &vm.id, sh("echo before > /tmp/t.bin")).await;
    let untouched = |what: &str| {
        let what = what.to_string();
        let (c, vm) = (&c, &vm.id);
        async move {
            let out = exec(c, vm, json!({ "argv": ["cat", "/tmp/t.bin"] })).await;
            assert_eq!(text(&out.stdout_b64), "before\n", "{what}");
        }
    };

    // Without the sticky bit, a guest user could swap the job's directory (and
    // forge its exit code): refused before anything runs.
    exec(&c, &vm.id, sh("chmod 0777 /tmp")).await;
    let e = put_known(&c, &vm.id, "/tmp/t.bin", &data, &sha)
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (502, "backend"), "{e}");
    assert!(e.message.contains("sticky"), "{e}");
    exec(&c, &vm.id, sh("chmod 1777 /tmp")).await;
    untouched("after a refused /tmp").await;

    // The job's whole session killed while it copies (as a guest's OOM killer or a
    // hostile root might, SIGKILL; as a shutdown would, SIGTERM first): it ends
    // without an exit code. SIGTERM lets it remove its private directory.
    for signal in ["KILL", "TERM"] {
        let killer = format!(
            "(while :; do for t in /tmp/.gve-bulk.*; do [ -d \"$t\" ] || continue; \
             for p in /tmp/.gve-job.*/pid; do [ -f \"$p\" ] && kill -{signal} -\"$(cat \"$p\")\"; done; \
             done; sleep 0.05; done) >/dev/null 2>&1 & echo $! > /tmp/killer.pid"
        );
        exec(&c, &vm.id, sh(&killer)).await;
        let e = put_known(&c, &vm.id, "/tmp/t.bin", &data, &sha)
            .await
            .unwrap_err();
        eprintln!("a guest job killed with SIG{signal}: {e}");
        assert_eq!((e.status, e.kind.as_str()), (502, "backend"), "{e}");
        assert!(e.message.contains("without an exit code"), "{e}");
        exec(&c, &vm.id, sh("kill $(cat /tmp/killer.pid)")).await;
        untouched(&format!("after a job killed with SIG{signal}")).await;
        nothing_staged(&lv);
        let left = exec(&c, &vm.id, sh("ls -a /tmp; rm -rf /tmp/.gve-bulk.*")).await;
        let left = text(&left.stdout_b64);
        assert_eq!(
            left.contains(".gve-bulk."),
            signal == "KILL",
            "SIG{signal} left: {left}"
        );
    }

    // Nothing is stuck: the same copy now goes through.
    let meta = put_known(&c, &vm.id, "/tmp/t.bin", &data, &sha)
        .await
        .unwrap();
    assert_eq!(meta.sha256, sha);
    agent.stop().await;
}
