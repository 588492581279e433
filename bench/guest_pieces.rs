//! The pieces of an exec of `true` through the agent, each timed alone
//! (`bench/guest.rs`; the table "Where the agent's time goes").

use std::time::{Duration, Instant};

use gve::api::client::Client;
use serde_json::{json, Value};

use crate::common::{self, ms};

/// What one exec through the agent does besides the raw path's qemu-ga commands,
/// each measured alone (medians of GVE_GUEST_PINGS, 40): the plugins' part of an
/// exec with no operation around it, durable commits (a new file's, the agent's
/// registry's), one qemu-ga command through the kvm plugin, the VM's gate and a
/// blocking thread vs raw, and an HTTP round trip to the agent. Also how many
/// guest-exec-status polls an exec of `true` takes.
pub async fn breakdown(
    agent: &gve::agent::Agent,
    vm: &str,
    c: &Client,
    raw: &common::Raw,
) -> Vec<(&'static str, f64, String)> {
    // GVE_GUEST_PINGS: more pieces measured (a profile's run).
    let n: usize = std::env::var("GVE_GUEST_PINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let ping = r#"{"execute":"guest-ping"}"#;
    let med = |mut v: Vec<Duration>| {
        v.sort();
        ms(v[v.len() / 2])
    };
    let dir = tempfile::tempdir_in(gve_harness::target_dir()).unwrap();
    let db = redb::Database::create(dir.path().join("commit.redb")).unwrap();
    let mut commit = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        db.begin_write().unwrap().commit().unwrap();
        commit.push(t.elapsed());
    }
    let core = agent.core().unwrap();
    // What an exec's start costs the agent's own database: its audit entry
    // committed lazily, then made durable (the operation's end is one such commit).
    let mut registry_commit = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        core.registry
            .audit_lazy("bench.commit", vm, json!({}))
            .unwrap();
        core.registry.sync().unwrap();
        registry_commit.push(t.elapsed());
    }
    let driver = core.driver.clone();
    let (mut via, mut direct, mut http) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gated, mut hop) = (Vec::new(), Vec::new());
    // GVE_GUEST_PROFILE=via|raw: only that path, marked on stderr (profiling).
    if let Ok(only) = std::env::var("GVE_GUEST_PROFILE") {
        eprintln!("profile {only}: start");
        let t = Instant::now();
        for _ in 0..n {
            if only == "via" {
                driver.guest_agent_command(vm, ping, 5_000).await.unwrap();
            } else {
                raw.dom.qemu_agent_command(ping, 5, 0).unwrap();
            }
        }
        eprintln!(
            "profile {only}: end, {:.3} ms each",
            ms(t.elapsed()) / n as f64
        );
    }
    for _ in 0..n {
        let t = Instant::now();
        driver.guest_agent_command(vm, ping, 5_000).await.unwrap();
        via.push(t.elapsed());
        let t = Instant::now();
        gve::agent::guest::channel_command(
            &driver,
            &core.guest_gates,
            vm,
            ping,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        gated.push(t.elapsed());
        let t = Instant::now();
        raw.dom.qemu_agent_command(ping, 5, 0).unwrap();
        direct.push(t.elapsed());
        let dom = raw.dom.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || dom.qemu_agent_command(ping, 5, 0).unwrap())
            .await
            .unwrap();
        hop.push(t.elapsed());
        let t = Instant::now();
        let _: Value = c.get("/v1/health").await.unwrap();
        http.push(t.elapsed());
    }
    // An exec of `true` through guest-install and the kvm plugin, with no
    // operation and no HTTP around it, against the raw path in turn.
    let body = core
        .check_exec(serde_json::from_value(json!({ "argv": ["true"] })).unwrap())
        .unwrap();
    let (mut plugin_exec, mut raw_exec) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        core.guest_exec(vm, &body).await.unwrap();
        plugin_exec.push(t.elapsed());
        let t = Instant::now();
        raw.exec("true", &[]);
        raw_exec.push(t.elapsed());
    }
    raw.calls.set(0);
    for _ in 0..n {
        raw.exec("true", &[]);
    }
    let polls = f64::from(raw.calls.get()) / n as f64;
    vec![
        (
            "an exec of `true` through the plugins alone (no operation, no HTTP)",
            med(plugin_exec),
            "1 (the agent's operation and HTTP round trip around it)".into(),
        ),
        (
            "an exec of `true`, raw, in turn with the one above",
            med(raw_exec),
            "the raw path".into(),
        ),
        (
            "a durable commit (redb, empty, a new file) on this disk",
            med(commit),
            "(the disk's floor)".into(),
        ),
        (
            "a durable commit of the agent's registry (an audit entry, as an exec's start)",
            med(registry_commit),
            "2 (the operation's start, with its audit entry, made durable while it runs; its end, before the answer)".into(),
        ),
        (
            "guest-ping through the kvm plugin",
            med(via),
            format!("{:.1} (guest-exec, then the status polls)", 1.0 + polls),
        ),
        (
            "guest-ping through the VM's guest gate and the kvm plugin",
            med(gated),
            "the same, guest-install's path less its own call".into(),
        ),
        (
            "guest-ping, raw libvirt",
            med(direct),
            "the same, on the raw path".into(),
        ),
        (
            "guest-ping, raw libvirt on a blocking thread",
            med(hop),
            "(what the host's hand-off to a blocking thread costs)".into(),
        ),
        (
            "an HTTP round trip to the agent (GET /v1/health)",
            med(http),
            "1 (submitted with `?wait-ms`: answered at its end)".into(),
        ),
    ]
}
