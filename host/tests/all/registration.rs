//! Registering agents with a site: one agent is one registration, whatever name or
//! URL an admin gives it a second time.

use std::time::Duration;

use gve::site::model::SiteVm;
use hyper::Method;
use serde_json::{json, Value};

use crate::site::{env, job, ADMIN, AGENT_TOKEN};

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

/// Two sites sharing one agent would each take the other's VMs for strays and
/// offer the host's capacity twice. An agent serves one site: a second site's
/// registration is refused, by the site (naming the first) and by the agent
/// itself (a site that does not check); the first site's unregistration releases
/// it, a release naming another registration releases nothing, and the agent's
/// admin can release it from a site that is gone. Both sites are named `site`
/// (the default): they are told apart by their instance ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_serves_one_site_until_it_is_released() {
    let a = env(1, |_| {}).await;
    let (agent, agent_admin) = (&a.agents[0].0, a.agents[0].1.clone());
    let url = format!("http://{}", agent.addr);
    let dave = a.user("dave", None).await;
    let j = job(&dave, "/v1/vms", json!({ "main-memory-mib": 64 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let mut config = gve::site::SiteConfig::new(b_dir.path().to_path_buf(), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let b = gve::site::Site::start(config).await.unwrap();
    let b_admin =
        gve::api::client::Client::new(&format!("http://{}", b.addr), Some(ADMIN.into())).unwrap();
    let serving = || {
        let c = agent_admin.clone();
        async move { c.get::<Value>("/v1/site").await.unwrap()["site"].clone() }
    };
    let first = serving().await;
    assert_eq!(first["agent-id"], "a-0", "{first}");
    assert!(first["instance"].is_string(), "{first}");

    // Site b is refused, naming site a's registration; the agent serves a still.
    let err = register(&b_admin, "b-0", &url).await.unwrap_err();
    assert_eq!(
        (err.status, err.kind.as_str()),
        (409, "already-exists"),
        "{err}"
    );
    assert!(err.message.contains("as 'a-0'"), "{err}");
    assert!(
        err.message.contains(first["instance"].as_str().unwrap()),
        "{err}"
    );
    assert!(b_admin
        .get::<Vec<Value>>("/v1/agents")
        .await
        .unwrap()
        .is_empty());
    // A site that does not check is refused by the agent.
    for other in [
        json!({ "id": "site", "instance": "another", "agent-id": "b-0", "at-ms": 1 }),
        json!({ "id": "older-site", "agent-id": "b-0", "at-ms": 1 }),
    ] {
        let err = agent_admin
            .call::<_, Value>(Method::PUT, "/v1/site", Some(&other))
            .await
            .unwrap_err();
        assert_eq!(
            (err.status, err.kind.as_str()),
            (409, "already-exists"),
            "{err}"
        );
    }
    assert_eq!(serving().await, first);
    // A release naming another registration releases nothing.
    let path = |instance: &str, agent_id: &str| {
        format!("/v1/site?id=site&instance={instance}&agent-id={agent_id}")
    };
    let a_instance = first["instance"].as_str().unwrap();
    // The record's time is the registration's: a release sent late by an
    // earlier registration of a-0 names an earlier one.
    let at = first["at-ms"].as_u64().unwrap();
    let earlier = format!("{}&at-ms={}", path(a_instance, "a-0"), at - 1);
    for p in [path("another", "a-0"), path(a_instance, "a-1"), earlier] {
        let err = agent_admin
            .call::<(), Value>(Method::DELETE, &p, None)
            .await
            .unwrap_err();
        assert_eq!(
            (err.status, err.kind.as_str()),
            (409, "invalid-state"),
            "{p}: {err}"
        );
        assert_eq!(
            err.message.contains("another registration there"),
            p.contains("at-ms"),
            "{err}"
        );
    }
    let bad = format!("{}&at-ms=soon", path(a_instance, "a-0"));
    let err = agent_admin
        .call::<(), Value>(Method::DELETE, &bad, None)
        .await
        .unwrap_err();
    assert_eq!(err.status, 400, "{err}");
    assert_eq!(serving().await, first);
    let v: SiteVm = dave.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
    assert_eq!((v.agent.as_str(), v.state.as_str()), ("a-0", "running"));

    // Site a unregisters it (forced: dave holds a VM there) and releases it.
    let removed: Value = a
        .admin
        .call::<(), Value>(Method::DELETE, "/v1/agents/a-0?force=true", None)
        .await
        .unwrap();
    assert_eq!(removed["agent-released"], true, "{removed}");
    assert_eq!(serving().await, Value::Null);
    register(&b_admin, "b-0", &url).await.unwrap();
    let now = serving().await;
    assert_eq!(now["agent-id"], "b-0", "{now}");
    assert_ne!(now["instance"], first["instance"]);
    let err = register(&a.admin, "a-0", &url).await.unwrap_err();
    assert_eq!(
        (err.status, err.kind.as_str()),
        (409, "already-exists"),
        "{err}"
    );

    // Site b is gone without unregistering it: the agent's admin releases it
    // (`gve agent release`), which is audited, and site a may register it again.
    b.stop().await;
    let released: Value = agent_admin
        .call::<(), Value>(Method::DELETE, "/v1/site", None)
        .await
        .unwrap();
    assert_eq!(released["released"], now, "{released}");
    let audit: Vec<Value> = agent_admin.get("/v1/audit").await.unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "site.release" && e["detail"] == now),
        "{audit:?}"
    );
    // A record from before site instance ids names its site by id alone, and
    // every site is `site` unless named: site a does not hold 'zz', so the
    // record is not taken for its own.
    let put = |record: Value| {
        let c = agent_admin.clone();
        async move {
            c.call::<_, Value>(Method::PUT, "/v1/site", Some(&record))
                .await
                .unwrap()
        }
    };
    put(json!({ "id": "site", "agent-id": "zz", "at-ms": 1 })).await;
    let err = register(&a.admin, "a-1", &url).await.unwrap_err();
    assert_eq!(
        (err.status, err.kind.as_str()),
        (409, "already-exists"),
        "{err}"
    );
    assert!(err.message.contains("as 'zz'"), "{err}");
    let _: Value = agent_admin
        .call::<(), Value>(Method::DELETE, "/v1/site", None)
        .await
        .unwrap();
    register(&a.admin, "a-1", &url).await.unwrap();
    let held = serving().await;
    assert_eq!(held["agent-id"], "a-1");

    // Site a holds it at every check: released while site a is alive (its
    // admin took it for gone), it is held again; its record from before site
    // instance ids is sent again with the instance; taken by another site, it
    // is down to site a, saying why.
    // Releases the agent and sends `record` until the PUT comes before site a's
    // check holds the agent again (it may come first: then again).
    let released_then = |record: Value| {
        let c = agent_admin.clone();
        async move {
            for _ in 0..50 {
                let _: Value = c
                    .call::<(), Value>(Method::DELETE, "/v1/site", None)
                    .await
                    .unwrap();
                if c.call::<_, Value>(Method::PUT, "/v1/site", Some(&record))
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            panic!("site a held it again every time");
        }
    };
    let until = |what: &'static str, done: Box<dyn Fn(&Value) -> bool + Send>| {
        let c = agent_admin.clone();
        async move {
            for _ in 0..100 {
                let v: Value = c.get("/v1/site").await.unwrap();
                if done(&v["site"]) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("{what}: not within 10 s");
        }
    };
    let _: Value = agent_admin
        .call::<(), Value>(Method::DELETE, "/v1/site", None)
        .await
        .unwrap();
    let instance = held["instance"].clone();
    until(
        "held again",
        Box::new(move |s| s["agent-id"] == "a-1" && s["instance"] == instance),
    )
    .await;
    // An older site named `site` (no instance id) is refused over site a's
    // record; this registration's record from before instance ids (released,
    // then written anew) is upgraded.
    let old_a1 = json!({ "id": "site", "agent-id": "a-1", "at-ms": 1 });
    let err = agent_admin
        .call::<_, Value>(Method::PUT, "/v1/site", Some(&old_a1))
        .await
        .unwrap_err();
    assert_eq!(err.status, 409, "{err}");
    released_then(old_a1).await;
    let instance = held["instance"].clone();
    until(
        "record upgraded",
        Box::new(move |s| s["instance"] == instance),
    )
    .await;
    // A record of this registration from before registration times (sent with
    // the time of the request) is sent again with the registration's, which
    // its release names.
    let at = serving().await["at-ms"].clone();
    let mut untimed = serving().await;
    untimed["at-ms"] = json!(1);
    let _: Value = agent_admin
        .call::<_, Value>(Method::PUT, "/v1/site", Some(&untimed))
        .await
        .unwrap();
    until("time restored", Box::new(move |s| s["at-ms"] == at)).await;
    // Released, then taken by site c before site a's next check holds it again.
    released_then(json!({ "id": "site", "instance": "c", "agent-id": "c-0", "at-ms": 1 })).await;
    let mut down = Value::Null;
    for _ in 0..100 {
        down = a.admin.get("/v1/agents/a-1").await.unwrap();
        if down["status"] == "down" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(down["status"], "down", "{down}");
    assert!(
        down["error"]
            .as_str()
            .unwrap()
            .contains("serves site 'site' (instance c) as 'c-0'"),
        "{down}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(serving().await["instance"], "c", "site a took it back");
    let _: Value = agent_admin
        .call::<(), Value>(Method::DELETE, "/v1/site", None)
        .await
        .unwrap();

    // An agent that does not answer its release is reported not told.
    let crate::site::Env {
        site,
        admin,
        agents,
        ..
    } = a;
    for (agent, _) in agents {
        agent.stop().await;
    }
    let removed: Value = admin
        .call::<(), Value>(Method::DELETE, "/v1/agents/a-1", None)
        .await
        .unwrap();
    assert_eq!(removed["agent-released"], false, "{removed}");
    site.stop().await;
}

/// An agent that does not take its release when unregistered (down, or its
/// answer lost) is owed it: the site sends it again now and then until the
/// agent takes it, so the agent does not keep naming a site that let it go.
/// And a release owed to an earlier registration of an id does not release a
/// later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_agent_did_not_take_is_sent_again_until_it_does() {
    use crate::proxy::{pick, Proxy, Rule};

    let a = env(1, |_| {}).await;
    let (agent, agent_admin) = (&a.agents[0].0, a.agents[0].1.clone());
    let serving = || {
        let c = agent_admin.clone();
        async move { c.get::<Value>("/v1/site").await.unwrap()["site"].clone() }
    };
    let removed: Value = a
        .admin
        .call::<(), Value>(Method::DELETE, "/v1/agents/a-0", None)
        .await
        .unwrap();
    assert_eq!(removed["agent-released"], true, "{removed}");
    // Registered as a-1 through a proxy, then unregistered while the proxy
    // refuses every release.
    let proxy = Proxy::start(agent.addr).await;
    let unregistered_unreleased = || async {
        register(&a.admin, "a-1", &proxy.url()).await.unwrap();
        proxy.set(Rule::Refuse(pick(|m, p| {
            m == Method::DELETE && p.starts_with("/v1/site")
        })));
        let removed: Value = a
            .admin
            .call::<(), Value>(Method::DELETE, "/v1/agents/a-1", None)
            .await
            .unwrap();
        assert_eq!(removed["agent-released"], false, "{removed}");
    };
    unregistered_unreleased().await;
    let first = serving().await;
    assert_eq!(first["agent-id"], "a-1", "{first}");
    // The agent answers again: the release owed reaches it.
    proxy.set(Rule::Pass);
    let mut now = first.clone();
    for _ in 0..200 {
        now = serving().await;
        if now.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(now, Value::Null, "still serving after 20 s");

    // Owed again to a-1, then a-1 registered anew (releases still refused): the
    // owed release names the earlier registration, and the later one keeps the
    // agent, not even released for a moment (a check would hold it again).
    unregistered_unreleased().await;
    let events = || {
        let c = agent_admin.clone();
        async move {
            let all: Vec<Value> = c.get("/v1/events?after=0&limit=1000").await.unwrap();
            all.iter().filter(|e| e["kind"] == "site-released").count()
        }
    };
    let released = events().await;
    register(&a.admin, "a-1", &proxy.url()).await.unwrap();
    let later = serving().await;
    assert_eq!(later["agent-id"], "a-1", "{later}");
    let owed = || a.site.core.store.owed_releases().unwrap().len();
    assert_eq!(owed(), 1);
    proxy.set(Rule::Pass);
    a.site.core.agents.release_owed().await;
    assert_eq!(owed(), 0, "the owed release was not settled");
    assert_eq!(
        serving().await,
        later,
        "the later registration was released"
    );
    assert_eq!(events().await, released, "released for a moment");

    // A release owed for 7 days is given up (the agent's admin releases it).
    let mut gone =
        gve::site::model::AgentRec::registered("gone", "http://127.0.0.1:9", "x".into(), None);
    gone.registered_ms = 1;
    let old = gve::site::store::OwedRelease {
        agent: gone,
        since_ms: 1,
    };
    a.site.core.store.write(|t| t.owe_release(&old)).unwrap();
    assert_eq!(owed(), 1);
    a.site.core.agents.release_owed().await;
    assert_eq!(owed(), 0, "a release owed for 7 days was kept");
    a.site.stop().await;
}
