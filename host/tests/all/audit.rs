//! The audit logs: every admin action and every exec or copy is recorded with who,
//! what and when, readable by admins (API and CLI), and no secret is in them.

use bytes::Bytes;
use gve::site::model::{AuditEntry, Job, JobState, SiteVm};
use hyper::Method;
use serde_json::{json, Value};

use crate::site::{env, job, post, wait_job, ADMIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_execs_and_copies_are_audited_without_secrets() {
    let e = env(1, |_| {}).await;
    let ida = e.user("ida", None).await;
    let _: Value = e
        .admin
        .call(
            Method::PUT,
            "/v1/users/ida/quota",
            Some(&json!({ "logical-cpus": 4, "main-memory-mib": 4096, "vms": 2 })),
        )
        .await
        .unwrap();
    let j = job(&ida, "/v1/vms", json!({ "main-memory-mib": 256 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let x = job(
        &ida,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["echo", "hi"], "env": { "TOKEN": "s3cr3t-value" }, "stdin-b64": "c2VjcmV0LXN0ZGlu" }),
    )
    .await;
    assert_eq!(x.state, JobState::Succeeded, "{x:?}");
    let put: Job = ida
        .put_stream(
            &format!("/v1/vms/{}/files?path=/tmp/a.txt", vm.id),
            &[],
            gve::api::full(Bytes::from_static(b"secret file content")),
        )
        .await
        .unwrap();
    wait_job(&ida, &put.id).await;
    let out = post(
        &ida,
        &format!("/v1/vms/{}/copy-out", vm.id),
        json!({ "path": "/tmp/a.txt" }),
    )
    .await
    .unwrap();
    wait_job(&ida, out["id"].as_str().unwrap()).await;

    // Users cannot read it.
    let denied = ida.get::<Value>("/v1/audit").await.unwrap_err();
    assert_eq!(denied.status, 403, "{denied}");
    // Admins read it through the CLI.
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args(["audit", "-o", "json", "--limit", "1000"])
        .env("GVE_URL", e.admin.base())
        .env("GVE_TOKEN", ADMIN)
        .output()
        .await
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let text = String::from_utf8(cli.stdout).unwrap();
    for secret in [
        "s3cr3t-value",
        "c2VjcmV0LXN0ZGlu",
        "secret file content",
        "c2VjcmV0",
    ] {
        assert!(!text.contains(secret), "{secret} in the audit log: {text}");
    }
    let log: Vec<AuditEntry> = serde_json::from_str(&text).unwrap();
    let find = |action: &str| {
        log.iter()
            .find(|a| a.action == action)
            .unwrap_or_else(|| panic!("no {action} in {log:?}"))
    };
    let created = find("user.create");
    assert_eq!(
        (created.who.as_str(), created.target.as_str()),
        ("admin", "ida")
    );
    assert_eq!(find("user.quota").detail["vms"], 2);
    assert_eq!(find("agent.add").target, "a-0");
    let exec = find("vm.exec");
    assert_eq!(
        (exec.who.as_str(), exec.target.as_str()),
        ("ida", vm.id.as_str())
    );
    assert_eq!(exec.detail["argv"], json!(["echo", "hi"]));
    assert_eq!(exec.detail["env-names"], json!(["TOKEN"]));
    assert_eq!(find("vm.copy-in").detail["path"], "/tmp/a.txt");
    assert_eq!(find("vm.copy-out").detail["path"], "/tmp/a.txt");
    assert!(log
        .windows(2)
        .all(|w| w[0].seq < w[1].seq && w[0].at_ms <= w[1].at_ms));

    // The agent keeps its own: the site's exec arrived there as the agent admin's.
    let (_, agent) = &e.agents[0];
    let alog: Vec<AuditEntry> = agent.get("/v1/audit").await.unwrap();
    let aexec = alog
        .iter()
        .find(|a| a.action == "vm.exec")
        .expect("agent vm.exec");
    assert_eq!(aexec.who, "agent-admin");
    let atext = serde_json::to_string(&alog).unwrap();
    assert!(
        !atext.contains("s3cr3t-value") && !atext.contains("secret file content"),
        "{atext}"
    );
    e.site.stop().await;
}

/// An exec's audit entry is written without a durable commit of its own (the
/// operation's sync makes it durable before the answer). Until then a follower
/// must not see it: a crash would lose it, and the next entry would take its
/// number, one an `after=N` follower has already passed.
#[test]
fn an_audit_entry_is_shown_only_once_durable() {
    use gve::agent::registry::Registry;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.redb");
    let reg = Registry::open(&path).unwrap();
    reg.audit("vm.destroy", "vm-1", json!({})).unwrap();
    reg.audit_lazy("vm.exec", "vm-1", json!({ "argv": ["true"] }))
        .unwrap();
    let seen: Vec<u64> = reg
        .audit_after(0, 100)
        .unwrap()
        .iter()
        .map(|a| a.seq)
        .collect();
    assert_eq!(seen, [1], "a lazily written entry is shown before its sync");
    assert!(reg.audit_after(1, 100).unwrap().is_empty());

    // What a kill -9 now would leave: the file as the page cache holds it.
    let crashed = dir.path().join("crashed.redb");
    std::fs::copy(&path, &crashed).unwrap();

    reg.sync().unwrap();
    let after_sync: Vec<(u64, String)> = reg
        .audit_after(0, 100)
        .unwrap()
        .into_iter()
        .map(|a| (a.seq, a.action))
        .collect();
    assert_eq!(
        after_sync,
        [(1, "vm.destroy".to_string()), (2, "vm.exec".to_string())]
    );
    // Any other durable commit makes it durable too; a lazy entry then an
    // immediate one are both shown.
    reg.audit_lazy("vm.exec", "vm-2", json!({})).unwrap();
    reg.write(|_| Ok(())).unwrap();
    reg.audit_lazy("vm.exec", "vm-3", json!({})).unwrap();
    reg.audit("vm.destroy", "vm-3", json!({})).unwrap();
    assert_eq!(reg.audit_after(2, 100).unwrap().len(), 3);
    assert_eq!(reg.audit_after(4, 1).unwrap()[0].seq, 5);

    // After the crash, what a follower saw is kept, and no later entry takes
    // a number it saw (had the lazy entry been shown, the entry after a crash
    // that lost it would be numbered 2 again).
    drop(reg);
    let after_crash = Registry::open(&crashed).unwrap();
    let kept = after_crash.audit_after(0, 100).unwrap();
    assert_eq!((kept[0].seq, kept[0].action.as_str()), (1, "vm.destroy"));
    after_crash.audit("vm.start", "vm-4", json!({})).unwrap();
    let all = after_crash.audit_after(0, 100).unwrap();
    let newest = all.last().unwrap();
    assert_eq!(newest.action, "vm.start");
    assert!(newest.seq > *seen.iter().max().unwrap());

    // Retention that finds every entry old removes them all; numbers go on
    // from the highest it removed, also after a reopening, rather than from 1
    // again; and a lazy entry is still not shown before it is durable.
    std::thread::sleep(std::time::Duration::from_millis(5));
    after_crash.prune_finished_ops(0, 0);
    assert!(after_crash.audit_after(0, 100).unwrap().is_empty());
    after_crash
        .audit_lazy("vm.exec", "vm-4", json!({}))
        .unwrap();
    assert!(after_crash.audit_after(0, 100).unwrap().is_empty());
    after_crash.sync().unwrap();
    let next = after_crash.audit_after(0, 100).unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].seq, newest.seq + 1);
    std::thread::sleep(std::time::Duration::from_millis(5));
    after_crash.prune_finished_ops(0, 0);
    drop(after_crash);
    let reopened = Registry::open(&crashed).unwrap();
    assert!(reopened.audit_after(0, 100).unwrap().is_empty());
    reopened.audit("vm.stop", "vm-4", json!({})).unwrap();
    let again = reopened.audit_after(0, 100).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].seq, newest.seq + 2);
}
