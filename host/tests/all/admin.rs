//! The agent's plugin admin API, driven through the `gve plugin` CLI.

use std::collections::BTreeMap;

use gve::agent::{Agent, AgentConfig};
use gve::plugin::Grants;

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

async fn agent_with_memory() -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut plugins = BTreeMap::new();
    plugins.insert("memory".to_string(), spec("memory", Grants::default()));
    let config = AgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        admin_token: TOKEN.into(),
        plugins,
        driver: None,
        bundles_dir: None,
        ..Default::default()
    };
    (Agent::start(config).await.unwrap(), dir)
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
