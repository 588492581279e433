//! The agent's plugin admin API, driven through the `gve plugin` CLI.

mod files;
mod sealed;

use std::collections::BTreeMap;

use gve::agent::policy::{DirCeiling, PluginPolicy};
use gve::agent::{Agent, AgentConfig};
use gve::api::client::Client;
use gve::plugin::{Grants, PluginSummary};
use hyper::Method;
use serde_json::{json, Value};

use crate::support::{bundle, edited_bundle, spec};

const TOKEN: &str = "test-admin-token-0123456789";

async fn gve(agent: &Agent, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args([
            "plugin",
            "--url",
            &format!("http://{}", agent.addr),
            "--token",
            TOKEN,
        ])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The policy these tests run under: bundles from the build's plugins and the
/// edited copies tests make, HTTP to 127.0.0.1:9 only, a read-only directory grant of the temp
/// directory, 128 MiB at most.
fn test_policy() -> PluginPolicy {
    PluginPolicy {
        bundle_dirs: vec![
            crate::support::bundles().to_path_buf(),
            crate::support::edited_bundles_dir(),
        ],
        http: vec!["127.0.0.1:9".into()],
        libvirt: vec![],
        directories: vec![DirCeiling {
            host: std::env::temp_dir(),
            writable: false,
        }],
        guest_channel: false,
        max_memory_mib: 128,
        max_call_timeout_ms: 60_000,
        max_long_call_timeout_ms: 1_800_000,
        max_instances: 64,
    }
}

pub(super) fn memory_config(dir: &std::path::Path) -> AgentConfig {
    let mut plugins = BTreeMap::new();
    plugins.insert("memory".to_string(), spec("memory", Grants::default()));
    AgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        admin_token: TOKEN.into(),
        plugins,
        driver: None,
        bundles_dir: None,
        plugin_policy: Some(test_policy()),
        ..Default::default()
    }
}

async fn agent_with_memory() -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (Agent::start(memory_config(dir.path())).await.unwrap(), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_loads_replaces_and_unloads_plugins() {
    let (agent, _dir) = agent_with_memory().await;
    let (code, out, err) = gve(&agent, &["list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().next().unwrap().starts_with("NAME"), "{out}");
    assert!(
        out.contains("memory") && out.contains("driver+guest"),
        "{out}"
    );

    let hostile = bundle("hostile");
    let (code, out, err) = gve(
        &agent,
        &[
            "load",
            hostile.to_str().unwrap(),
            "--grant-http",
            "127.0.0.1:9",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let loaded: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(loaded[0]["name"], "hostile");
    assert_eq!(loaded[0]["granted"]["http"][0], "127.0.0.1:9");

    // Loading it twice is a conflict (exit 6), with the reason on stderr.
    let (code, _, err) = gve(&agent, &["load", hostile.to_str().unwrap()]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("already loaded"), "{err}");

    let v2 = edited_bundle("hostile", |m| {
        m.replace("version = \"0.1.0\"", "version = \"0.2.0\"")
    });
    let (code, out, err) = gve(
        &agent,
        &[
            "replace",
            "hostile",
            v2.path().to_str().unwrap(),
            "--config",
            "version=0.2.0",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0.2.0"), "{out}");
    assert_eq!(
        agent.plugins.driver_info("hostile").await.unwrap().version,
        "0.2.0"
    );

    let (code, out, _) = gve(&agent, &["unload", "hostile"]).await;
    assert_eq!((code, out.trim()), (0, "unloaded hostile"));
    let (code, _, err) = gve(&agent, &["show", "hostile"]).await;
    assert_eq!(code, 4, "{err}");

    // A grant the manifest does not request is said, not silently dropped.
    let (code, _, err) = gve(&agent, &["unload", "memory"]).await;
    assert_eq!(code, 0, "{err}");
    let memory = bundle("memory");
    let (code, _, err) = gve(
        &agent,
        &[
            "load",
            memory.to_str().unwrap(),
            "--grant-http",
            "127.0.0.1:9",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(
            "warning: plugin 'memory' was granted http but its manifest does not request it"
        ),
        "{err}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_bad_tokens_and_bad_bodies() {
    let (agent, _dir) = agent_with_memory().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args([
            "plugin",
            "--url",
            &format!("http://{}", agent.addr),
            "--token",
            "wrong-token",
            "list",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bearer token"));

    let client =
        gve::api::client::Client::new(&format!("http://{}", agent.addr), Some(TOKEN.into()))
            .unwrap();
    let bad: Result<serde_json::Value, _> = client
        .call(
            hyper::Method::POST,
            "/v1/plugins",
            Some(&serde_json::json!({"bundel": "/x"})),
        )
        .await;
    let e = bad.unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (400, "invalid-argument"));
    assert!(e.message.contains("bundel"), "{}", e.message);
    let none: Result<serde_json::Value, _> = client.get("/v1/nothing").await;
    assert_eq!(none.unwrap_err().status, 404);
    // The health endpoint needs no token.
    let anon = gve::api::client::Client::new(&format!("http://{}", agent.addr), None).unwrap();
    let h: serde_json::Value = anon.get("/v1/health").await.unwrap();
    assert_eq!(h["status"], "ok");
    agent.stop().await;
}

pub(super) fn client(agent: &Agent) -> Client {
    Client::new(&format!("http://{}", agent.addr), Some(TOKEN.into())).unwrap()
}

pub(super) async fn load(agent: &Agent, body: Value) -> Result<PluginSummary, gve::api::ApiError> {
    client(agent)
        .call(Method::POST, "/v1/plugins", Some(&body))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_grants_nothing_beyond_the_operators_policy() {
    let (agent, _dir) = agent_with_memory().await;
    let hostile = bundle("hostile");
    // Outside the bundle directories, also when reached through a symlink.
    let elsewhere = tempfile::tempdir_in(gve_harness::target_dir()).unwrap();
    let copy = elsewhere.path().join("hostile");
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(&hostile).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    let link = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&copy, link.path().join("innocent")).unwrap();
    let cases = [
        (json!({ "bundle": copy }), "outside the directories"),
        (
            json!({ "bundle": link.path().join("innocent") }),
            "outside the directories",
        ),
        (
            json!({ "bundle": "/etc/../etc/passwd" }),
            "outside the directories",
        ),
        (
            json!({ "bundle": hostile, "grants": { "http": ["10.0.0.1:443"] } }),
            "HTTP authority 10.0.0.1:443",
        ),
        (
            json!({ "bundle": hostile, "grants": { "libvirt": ["qemu:///system"] } }),
            "libvirt URI",
        ),
        (
            json!({ "bundle": hostile, "grants": { "directories": [{ "host": "/", "guest": "/root", "writable": true }] } }),
            "directory /",
        ),
        (
            json!({ "bundle": hostile, "grants": { "directories": [{ "host": std::env::temp_dir(), "guest": "/t", "writable": true }] } }),
            "writable",
        ),
        (
            json!({ "bundle": hostile, "grants": { "guest-channel": true } }),
            "guest channel",
        ),
        (
            json!({ "bundle": hostile, "limits": { "memory-mib": 4096 } }),
            "memory-mib 4096",
        ),
        (
            json!({ "bundle": hostile, "limits": { "long-call-timeout-ms": 1_800_001 } }),
            "long-call-timeout-ms 1800001 is above the ceiling",
        ),
        (
            json!({ "bundle": hostile, "limits": { "call-timeout-ms": u64::MAX } }),
            "call-timeout-ms 18446744073709551615 is above the ceiling",
        ),
        // The agent would read the file and lend it to the plugin.
        (
            json!({ "bundle": hostile, "grants": { "config-files": { "key": "/etc/shadow" } } }),
            "config-files may not be granted",
        ),
        // Or present the agent's own key as the plugin's.
        (
            json!({ "bundle": hostile, "grants": { "http": ["127.0.0.1:9"], "tls": { "127.0.0.1:9": { "fingerprint": "AB".repeat(32), "cert": "/etc/gve/agent.pem", "key": "/etc/gve/agent.key" } } } }),
            "TLS file /etc/gve/agent.pem (as the cert for '127.0.0.1:9') may not be granted to plugin 'hostile'",
        ),
        (
            json!({ "bundle": hostile, "grants": { "http": ["127.0.0.1:9"], "tls": { "127.0.0.1:9": { "ca": "/dev/zero" } } } }),
            "TLS file /dev/zero",
        ),
    ];
    for (body, says) in cases {
        let e = load(&agent, body.clone()).await.unwrap_err();
        assert_eq!((e.status, e.kind.as_str()), (403, "denied"), "{body}: {e}");
        assert!(e.message.contains(says), "{body}: {e}");
    }
    // A bundle inside the allowed directories whose manifest points elsewhere.
    let real = hostile.join("hostile.wasm");
    for component in [
        real.display().to_string(),
        "../hostile/hostile.wasm".to_string(),
    ] {
        let b = edited_bundle("hostile", |m| {
            m.lines()
                .map(|l| {
                    if l.starts_with("component") {
                        format!("component = \"{component}\"")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        });
        let e = load(&agent, json!({ "bundle": b.path() }))
            .await
            .unwrap_err();
        assert_eq!(e.status, 400, "{component}: {e}");
        assert!(e.message.contains("inside the bundle"), "{component}: {e}");
    }
    assert_eq!(agent.plugins.list().len(), 1, "nothing was loaded");
    // Within the policy it loads; a pinned fingerprint needs no file.
    let ok = load(
        &agent,
        json!({ "bundle": hostile, "grants": { "http": ["127.0.0.1:9"], "tls": { "127.0.0.1:9": { "fingerprint": "AB".repeat(32) } } } }),
    )
    .await
    .unwrap();
    assert_eq!(ok.granted["http"], ["127.0.0.1:9"]);
    // Nor through a replace's grants.
    let e = client(&agent)
        .call::<Value, PluginSummary>(
            Method::PUT,
            &format!("/v1/plugins/{}", ok.name),
            Some(&json!({ "grants": { "config-files": { "key": "/etc/shadow" } } })),
        )
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (403, "denied"), "{e}");
    assert!(e.message.contains("config-files"), "{e}");
    let e = client(&agent)
        .call::<Value, PluginSummary>(
            Method::PUT,
            &format!("/v1/plugins/{}", ok.name),
            Some(&json!({ "grants": { "http": ["127.0.0.1:9"], "tls": { "127.0.0.1:9": { "ca": "/etc/ssl/certs/ca-certificates.crt" } } } })),
        )
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (403, "denied"), "{e}");
    assert!(e.message.contains("TLS file"), "{e}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_keeps_grants_and_runtime_changes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(memory_config(dir.path())).await.unwrap();
    // Version 0.2.0 of hostile reports the version its config gives.
    let v2 = edited_bundle("hostile", |m| {
        m.replace("version = \"0.1.0\"", "version = \"0.2.0\"")
    });
    load(
        &agent,
        json!({ "bundle": v2.path(), "grants": { "http": ["127.0.0.1:9"], "config": { "version": "0.2.0" } }, "limits": { "memory-mib": 96 } }),
    )
    .await
    .unwrap();
    // A bare replace keeps grants, config and limits: were its config dropped,
    // the new instance would report 0.1.0 against its manifest's 0.2.0 and fail.
    let (code, out, err) = gve(
        &agent,
        &[
            "replace",
            "hostile",
            v2.path().to_str().unwrap(),
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let r: Vec<PluginSummary> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r[0].version.as_str(), r[0].limits.memory_mib),
        ("0.2.0", 96)
    );
    assert_eq!(r[0].granted["http"], ["127.0.0.1:9"]);
    // Only the limit named changes.
    let (code, out, err) = gve(
        &agent,
        &[
            "replace",
            "hostile",
            v2.path().to_str().unwrap(),
            "--memory-mib",
            "80",
            "--exec-margin-ms",
            "2500",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let r: Vec<PluginSummary> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r[0].limits.memory_mib, r[0].limits.call_timeout_ms),
        (80, 30_000)
    );
    assert_eq!(
        (r[0].limits.exec_margin_ms, r[0].exec_margin_ms),
        (Some(2_500), 2_500)
    );
    assert_eq!(r[0].granted["http"], ["127.0.0.1:9"]);
    // A configured plugin unloaded at runtime stays unloaded.
    let (code, _, err) = gve(&agent, &["unload", "memory"]).await;
    assert_eq!(code, 0, "{err}");
    let before: Vec<PluginSummary> = agent.plugins.list();
    // Each change is in the agent's audit log, read through the CLI.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args([
            "agent",
            "audit",
            "-o",
            "json",
            "--agent-url",
            &format!("http://{}", agent.addr),
            "--secret",
            TOKEN,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let actions: Vec<&str> = log.iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "plugin.load",
            "plugin.replace",
            "plugin.replace",
            "plugin.unload"
        ]
    );
    assert_eq!(log[0]["detail"]["http"], json!(["127.0.0.1:9"]));
    assert_eq!(log[0]["detail"]["config-keys"], json!(["version"]));
    agent.stop().await;

    let again = Agent::start(memory_config(dir.path())).await.unwrap();
    let after = again.plugins.list();
    let key = |l: &[PluginSummary]| -> Vec<(String, String, u64, u64, Vec<String>)> {
        l.iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.version.clone(),
                    p.limits.memory_mib,
                    p.exec_margin_ms,
                    p.granted.get("http").cloned().unwrap_or_default(),
                )
            })
            .collect()
    };
    assert_eq!(key(&after), key(&before));
    assert_eq!(
        key(&after),
        [(
            "hostile".to_string(),
            "0.2.0".to_string(),
            80,
            2_500,
            vec!["127.0.0.1:9".to_string()]
        )]
    );
    again.stop().await;

    // A record from before a margin had to be below the call budget: restored
    // with the plugin's own margin, not left out.
    let db = dir.path().join("agent.redb");
    let registry = gve::agent::registry::Registry::open(&db).unwrap();
    let mut rec: Value =
        serde_json::from_str(&registry.meta("plugin:hostile").unwrap().unwrap()).unwrap();
    let limits = &mut rec["spec"]["limits"];
    limits["exec-margin-ms"] = limits["call-timeout-ms"].clone();
    let rec = rec.to_string();
    registry
        .write(|t| t.set_meta("plugin:hostile", &rec))
        .unwrap();
    drop(registry);
    let third = Agent::start(memory_config(dir.path())).await.unwrap();
    let p = third.plugins.get("hostile").expect("restored");
    assert_eq!(
        (p.version.as_str(), p.limits.exec_margin_ms),
        ("0.2.0", None)
    );
    third.stop().await;
    // And the record says so.
    let registry = gve::agent::registry::Registry::open(&db).unwrap();
    let rec: Value =
        serde_json::from_str(&registry.meta("plugin:hostile").unwrap().unwrap()).unwrap();
    assert_eq!(rec["spec"]["limits"].get("exec-margin-ms"), None, "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_driver_is_given_one_at_runtime_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(memory_config(dir.path())).await.unwrap();
    let c = client(&agent);
    let e = c.get::<Value>("/v1/vms").await.unwrap_err();
    assert_eq!(e.status, 503, "{e}");
    let endpoint = format!("memory:runtime-{}", uuid::Uuid::new_v4());
    let set = |extra: &[&str]| {
        let mut args = vec![
            "agent".to_string(),
            "driver".into(),
            "set".into(),
            "--agent-url".into(),
            format!("http://{}", agent.addr),
            "--secret".into(),
            TOKEN.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
            .args(args)
            .output()
    };
    // A secret file named through the API is refused: it could be any file
    // the agent may read, sent to an endpoint the caller picks.
    let e = c
        .call::<_, Value>(
            Method::PUT,
            "/v1/driver",
            Some(&json!({ "plugin": "memory", "endpoint": endpoint, "password-file": "/etc/shadow" })),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status, 400, "{e}");
    assert!(e.message.contains("config file"), "{e}");
    // A plugin that is not loaded is refused with the reason.
    let out = set(&["nope", &endpoint]).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("'nope' is not loaded"));
    let out = set(&["memory", &endpoint]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vms: Vec<Value> = c.get("/v1/vms").await.unwrap();
    assert!(vms.is_empty());
    // A second driver is a conflict: this agent has one.
    let out = set(&["memory", "memory:other"]).await.unwrap();
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    // The one that was set is in the audit log; the refused ones are not.
    let log: Vec<Value> = c.get("/v1/audit").await.unwrap();
    let sets: Vec<&Value> = log.iter().filter(|a| a["action"] == "driver.set").collect();
    assert_eq!(sets.len(), 1, "{log:?}");
    assert_eq!(sets[0]["detail"]["endpoint"], endpoint.as_str());
    assert_eq!(sets[0]["detail"]["password-set"], false);
    agent.stop().await;

    let again = Agent::start(memory_config(dir.path())).await.unwrap();
    let d: Value = client(&again).get("/v1/driver").await.unwrap();
    assert_eq!(
        (d["plugin"].as_str(), d["endpoint"].as_str()),
        (Some("memory"), Some(endpoint.as_str()))
    );
    again.stop().await;

    // A recorded driver that names a secret file (as a build that took one
    // over the API could have recorded) does not start: the file could be any.
    {
        let reg = gve::agent::registry::Registry::open(&dir.path().join("agent.redb")).unwrap();
        let forged = json!({ "plugin": "memory", "endpoint": endpoint, "password-file": "/proc/self/environ" });
        reg.write(|t| t.set_meta("driver", &forged.to_string()))
            .unwrap();
    }
    let e = Agent::start(memory_config(dir.path()))
        .await
        .err()
        .expect("a recorded password-file must not be read");
    assert!(e.to_string().contains("only the config file may"), "{e}");
}

/// An unloaded driver plugin used to leave `[driver]` bound to a dead slot until a
/// restart; now the driver says its plugin is missing (503, never a 404 that could
/// read as a missing VM) and works again once the plugin is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_follows_its_plugin_across_unload_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(memory_config(dir.path())).await.unwrap();
    let c = client(&agent);
    let endpoint = format!("memory:follow-{}", uuid::Uuid::new_v4());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args([
            "agent",
            "driver",
            "set",
            "--agent-url",
            &format!("http://{}", agent.addr),
            "--secret",
            TOKEN,
            "memory",
            &endpoint,
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let host: Value = c.get("/v1/host").await.unwrap();
    assert!(host.is_object(), "{host}");

    let (code, _, err) = gve(&agent, &["unload", "memory"]).await;
    assert_eq!(code, 0, "{err}");
    let e = c.get::<Value>("/v1/host").await.unwrap_err();
    assert_eq!(e.status, 503, "{e}");
    assert!(
        e.message.contains("plugin 'memory' is not loaded now"),
        "{e}"
    );

    let memory = bundle("memory");
    let (code, _, err) = gve(&agent, &["load", memory.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let again: Value = c.get("/v1/host").await.unwrap();
    assert_eq!(again["hostname"], host["hostname"], "{again}");
    agent.stop().await;
}

/// `stop` returns only once the agent has let go of its database: an operator's
/// in-process restart (or a test's) opens it again at once, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_has_released_its_database() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..5 {
        let agent = Agent::start(memory_config(dir.path()))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        // Both runtime workers busy (as on a loaded host): a background task
        // that `stop` only aborted would still be alive when `start` runs.
        for _ in 0..2 {
            tokio::spawn(async { std::thread::sleep(std::time::Duration::from_millis(300)) });
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        agent.stop().await;
    }
}
