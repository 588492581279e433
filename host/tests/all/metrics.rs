//! Prometheus metrics: the site's and an agent's `GET /metrics` (who may read
//! them, what they count after real jobs), and the plugin host's counts of a
//! hostile plugin's deadline hits, memory-cap refusals and panics, per plugin.

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::metrics::AgentMetrics;
use gve::plugin::{Grants, PluginError};
use gve::site::model::JobState;
use hyper::Method;
use serde_json::json;

use crate::hostile::{bench, hostile};
use crate::site::{env, job, AGENT_TOKEN};

/// `GET path` at `base` with `token`: status, content type and body.
pub async fn scrape(base: &str, token: Option<&str>) -> (u16, String, String) {
    let c = Client::new(base, token.map(str::to_string)).unwrap();
    let resp = match c.get_stream("/metrics").await {
        Ok(resp) => resp,
        Err(e) => return (e.status, String::new(), e.message),
    };
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (200, ctype, String::from_utf8(body.to_vec()).unwrap())
}

/// The value of the sample `name{labels}` in `text` (0 when absent).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_and_agent_metrics_count_real_jobs_and_only_admins_read_them() {
    let e = env(1, |_| {}).await;
    let base = e.admin.base().to_string();
    let alice = e.user("alice", None).await;
    // Anonymous: 401; a user: 403; the admin: the text exposition.
    assert_eq!(scrape(&base, None).await.0, 401);
    let user_token = {
        let u: serde_json::Value = e
            .admin
            .call(Method::POST, "/v1/users", Some(&json!({ "name": "bob" })))
            .await
            .unwrap();
        u["token"].as_str().unwrap().to_string()
    };
    assert_eq!(scrape(&base, Some(&user_token)).await.0, 403);

    let ok = job(
        &alice,
        "/v1/vms",
        json!({ "template": "debian-12", "main-memory-mib": 256 }),
    )
    .await;
    assert_eq!(ok.state, JobState::Succeeded, "{ok:?}");
    let failed = job(
        &alice,
        "/v1/vms",
        json!({ "template": "nope", "main-memory-mib": 256 }),
    )
    .await;
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");

    // The agent is up once its first check is in.
    let end = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, ctype, text) = scrape(&base, Some(crate::site::ADMIN)).await;
        assert_eq!(status, 200, "{text}");
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        if sample(&text, "gve_site_agents{state=\"up\"}") == 1.0 {
            break text;
        }
        assert!(Instant::now() < end, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (series, want) in [
        (
            "gve_site_jobs_ended_total{kind=\"request\",state=\"succeeded\"}",
            1.0,
        ),
        (
            "gve_site_jobs_ended_total{kind=\"request\",state=\"failed\"}",
            1.0,
        ),
        (
            "gve_site_jobs_duration_seconds_count{kind=\"request\",state=\"succeeded\"}",
            1.0,
        ),
        ("gve_site_vms{state=\"running\"}", 1.0),
        ("gve_site_agents{state=\"up\"}", 1.0),
    ] {
        assert_eq!(sample(&text, series), want, "{series} in:\n{text}");
    }
    assert!(
        text.contains("# HELP gve_site_jobs_ended Jobs that ended"),
        "{text}"
    );
    // No user names, VM ids or URLs in any label.
    assert!(!text.contains("alice") && !text.contains(&ok.id), "{text}");

    // The agent: its admin token only; its operations and its plugin's calls.
    let agent_base = format!("http://{}", e.agents[0].0.addr);
    assert_eq!(scrape(&agent_base, None).await.0, 401);
    assert_eq!(
        scrape(&agent_base, Some("wrong-token-0123456789")).await.0,
        401
    );
    let (status, _, text) = scrape(&agent_base, Some(AGENT_TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    for series in [
        "gve_agent_operations_ended_total{kind=\"create\",state=\"succeeded\"}",
        "gve_agent_operations_ended_total{kind=\"start\",state=\"succeeded\"}",
        "gve_plugin_calls_total{plugin=\"memory\",op=\"create\",outcome=\"ok\"}",
        "gve_agent_vms{state=\"running\"}",
    ] {
        assert!(sample(&text, series) >= 1.0, "{series} in:\n{text}");
    }
    assert!(
        sample(
            &text,
            "gve_plugin_calls_total{plugin=\"memory\",op=\"list-vms\",outcome=\"ok\"}"
        ) >= 1.0,
        "the reconciler's listings are calls too:\n{text}"
    );
}

#[tokio::test]
async fn a_hostile_plugins_deadline_hits_memory_refusals_and_panics_are_counted() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 500;
    let b = bench(sp).await;
    let metrics = AgentMetrics::new(b.host.metrics());
    let err = b.hostile.get_vm("loop").await.unwrap_err();
    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    let err = b.hostile.get_vm("bomb").await.unwrap_err();
    assert!(matches!(err, PluginError::MemoryCap { .. }), "{err}");
    let err = b.hostile.get_vm("panic").await.unwrap_err();
    assert!(matches!(err, PluginError::Panic { .. }), "{err}");
    b.hostile.get_vm("ordinary").await.unwrap();
    let text = metrics.render();
    for (outcome, want) in [
        ("deadline", 1.0),
        ("memory-cap", 1.0),
        ("panic", 1.0),
        ("ok", 1.0),
    ] {
        let series = format!(
            "gve_plugin_calls_total{{plugin=\"hostile\",op=\"get-vm\",outcome=\"{outcome}\"}}"
        );
        assert_eq!(sample(&text, &series), want, "{series} in:\n{text}");
    }
    // The calm plugin's calls are its own.
    assert_eq!(
        sample(
            &text,
            "gve_plugin_calls_total{plugin=\"memory\",op=\"get-vm\",outcome=\"deadline\"}"
        ),
        0.0
    );
    // The deadline hit took about its budget.
    let slow = sample(
        &text,
        "gve_plugin_call_duration_seconds_bucket{le=\"0.25\",plugin=\"hostile\",op=\"get-vm\"}",
    );
    let all = sample(
        &text,
        "gve_plugin_call_duration_seconds_count{plugin=\"hostile\",op=\"get-vm\"}",
    );
    assert_eq!(all - slow, 1.0, "exactly the loop ran past 0.25 s:\n{text}");
    b.aftermath().await;
}

/// `method path` with `token` at `base`: the status (200 when it succeeded).
async fn status_of(base: &str, token: &str, method: Method, path: &str) -> u16 {
    let c = Client::new(base, Some(token.to_string())).unwrap();
    let body = (method == Method::POST).then(|| json!({}));
    match c
        .call::<_, serde_json::Value>(method, path, body.as_ref())
        .await
    {
        Ok(_) => 200,
        Err(e) => e.status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_reads_the_metrics_and_nothing_else() {
    let e = env(0, |_| {}).await;
    let base = e.admin.base().to_string();
    let alice = e.user("alice", None).await;
    // A monitor takes no quota and holds zero.
    let refused = e
        .admin
        .call::<_, serde_json::Value>(
            Method::POST,
            "/v1/users",
            Some(&json!({ "name": "prom", "role": "monitor", "quota": { "vms": 1, "logical-cpus": 1, "main-memory-mib": 1 } })),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.status, 400, "{refused:?}");
    let m: serde_json::Value = e
        .admin
        .call(
            Method::POST,
            "/v1/users",
            Some(&json!({ "name": "prom", "role": "monitor" })),
        )
        .await
        .unwrap();
    assert_eq!(m["role"], "monitor");
    assert_eq!(m["quota"]["vms"], 0);
    let refused = e
        .admin
        .call::<_, serde_json::Value>(
            Method::PUT,
            "/v1/users/prom/quota",
            Some(&json!({ "vms": 1, "logical-cpus": 1, "main-memory-mib": 1 })),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.status, 400, "{refused:?}");
    let token = m["token"].as_str().unwrap().to_string();

    let (status, _, text) = scrape(&base, Some(&token)).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("gve_site_jobs_kept"), "{text}");
    for (method, path, want) in [
        (Method::GET, "/v1/glue2", 200),
        (Method::GET, "/v1/me", 200),
        (Method::GET, "/v1/vms", 403),
        (Method::POST, "/v1/vms", 403),
        (Method::GET, "/v1/jobs", 403),
        (Method::GET, "/v1/templates", 403),
        (Method::GET, "/v1/users", 403),
        (Method::POST, "/v1/users", 403),
        (Method::GET, "/v1/users/alice", 403),
        (Method::POST, "/v1/users/alice/token", 403),
        (Method::GET, "/v1/agents", 403),
        (Method::POST, "/v1/agents", 403),
        (Method::GET, "/v1/audit", 403),
        (Method::GET, "/v1/users/prom", 403),
    ] {
        assert_eq!(
            status_of(&base, &token, method.clone(), path).await,
            want,
            "{method} {path}"
        );
    }
    // Alice's token still works: the monitor rotated nothing of hers.
    alice.get::<serde_json::Value>("/v1/me").await.unwrap();
    // Its own token it may rotate; the old one then opens nothing.
    let c = Client::new(&base, Some(token.clone())).unwrap();
    let rotated: serde_json::Value = c
        .call(Method::POST, "/v1/users/prom/token", None::<&()>)
        .await
        .unwrap();
    let new = rotated["token"].as_str().unwrap();
    assert_eq!(scrape(&base, Some(&token)).await.0, 401);
    assert_eq!(scrape(&base, Some(new)).await.0, 200);
    assert_eq!(status_of(&base, new, Method::GET, "/v1/vms").await, 403);

    // An agent's metrics token reads /metrics and nothing else; its admin token
    // reads everything, as before.
    const SCRAPE: &str = "agent-scrape-0123456789";
    let (agent, _admin, _dir) = gve_harness::agent::start(
        "memory",
        crate::support::spec("memory", Default::default()),
        &format!("memory:monitor-{}", uuid::Uuid::new_v4()),
        AGENT_TOKEN,
        |c| c.metrics_token = Some(SCRAPE.into()),
    )
    .await;
    let agent_base = format!("http://{}", agent.addr);
    let (status, _, text) = scrape(&agent_base, Some(SCRAPE)).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("gve_plugin_calls_total{plugin=\"memory\""),
        "{text}"
    );
    assert_eq!(scrape(&agent_base, Some(AGENT_TOKEN)).await.0, 200);
    for (method, path) in [
        (Method::GET, "/v1/vms"),
        (Method::POST, "/v1/vms"),
        (Method::GET, "/v1/plugins"),
        (Method::GET, "/v1/audit"),
        (Method::GET, "/v1/host"),
        (Method::POST, "/metrics"),
    ] {
        assert_eq!(
            status_of(&agent_base, SCRAPE, method.clone(), path).await,
            401,
            "{method} {path}"
        );
    }
    assert_eq!(
        status_of(&agent_base, AGENT_TOKEN, Method::GET, "/v1/vms").await,
        200
    );
}

/// No call of `plugin` in `agent` was stopped by the sandbox at its deadline (no
/// `gve_plugin_calls_total` series of that outcome).
pub fn assert_no_deadline_stop(agent: &gve::agent::Agent, plugin: &str) {
    let text = agent.runtime.metrics_text().unwrap();
    let plugin = format!("plugin=\"{plugin}\"");
    let stopped: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&plugin) && l.contains("outcome=\"deadline\""))
        .collect();
    assert!(stopped.is_empty(), "{stopped:?}");
}
