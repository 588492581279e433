//! Registering agents with a site: one agent is one registration, whatever name or
//! URL an admin gives it a second time.

use std::time::Duration;

use gve::site::model::SiteVm;
use hyper::Method;
use serde_json::{json, Value};

use crate::site::{env, job, AGENT_TOKEN};

/// Registers the agent at `url` as `id`.
async fn register(
    admin: &gve::api::client::Client,
    id: &str,
    url: &str,
) -> Result<Value, gve::api::ApiError> {
    admin
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({ "id": id, "url": url, "token": AGENT_TOKEN })),
        )
        .await
}

/// An agent registered a second time under another id (an admin's typo fixed by
/// registering again, or the same host by another name) would be two agents to
/// the site: its capacity offered twice, its VMs claimed by both. The second
/// registration is refused naming the first, by the instance id the agent answers,
/// not by URL; once the first is unregistered it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_cannot_be_registered_twice_under_two_ids() {
    let e = env(1, |_| {}).await;
    let port = e.agents[0].0.addr.port();
    let dave = e.user("dave", None).await;
    let j = job(&dave, "/v1/vms", json!({ "main-memory-mib": 64 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    for url in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ] {
        let err = register(&e.admin, "a-dup", &url).await.unwrap_err();
        assert_eq!(
            (err.status, err.kind.as_str()),
            (409, "already-exists"),
            "{err}"
        );
        assert!(err.message.contains("'a-0'"), "{err}");
    }
    let agents: Vec<Value> = e.admin.get("/v1/agents").await.unwrap();
    assert_eq!(agents.len(), 1, "{agents:?}");
    let serving = |c: &gve::api::client::Client| {
        let c = c.clone();
        async move {
            let v: Value = c.get("/v1/site").await.unwrap();
            v["site"]["agent-id"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(
        serving(&e.agents[0].1).await,
        "a-0",
        "told nothing by the refusals"
    );
    // The agent still serves a-0: its VM stays there, the site's health checks
    // go on reading it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let v: SiteVm = dave.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
    assert_eq!(
        (v.agent.as_str(), v.state.as_str()),
        ("a-0", "running"),
        "{v:?}"
    );

    // Unregistered (forced: dave holds a VM there), the agent may be registered
    // under another id.
    let _: Value = e
        .admin
        .call::<(), Value>(Method::DELETE, "/v1/agents/a-0?force=true", None)
        .await
        .unwrap();
    register(&e.admin, "a-new", &format!("http://localhost:{port}"))
        .await
        .unwrap();
    let agents: Vec<Value> = e.admin.get("/v1/agents").await.unwrap();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0]["id"], "a-new");
    assert_eq!(serving(&e.agents[0].1).await, "a-new");
    e.site.stop().await;
}
