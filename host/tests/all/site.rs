//! The site service over HTTP, with memory-driver agents: requests by profile,
//! management jobs, events, authorization, quotas under concurrency, leases, agents
//! going down.

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::api::ApiError;
use gve::site::model::{Job, JobState, SiteVm, UserView};
use gve::site::{Site, SiteConfig};
use hyper::Method;
use serde_json::{json, Value};

pub use crate::agent::{start_agent, TOKEN as AGENT_TOKEN};
use crate::support::spec;

pub const ADMIN: &str = "site-admin-token-0123456789";

/// A site in this process with `agents` memory agents registered as a-0, a-1, ...
pub struct Env {
    pub site: Site,
    pub admin: Client,
    pub agents: Vec<(gve::agent::Agent, Client)>,
    _dirs: Vec<tempfile::TempDir>,
}

pub async fn env(agents: usize, tune: impl FnOnce(&mut SiteConfig)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SiteConfig::new(dir.path().to_path_buf(), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_period_ms = 300;
    tune(&mut config);
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    let mut dirs = vec![dir];
    let mut list = Vec::new();
    for i in 0..agents {
        let endpoint = format!("memory:site-{}-{i}", uuid::Uuid::new_v4());
        let (agent, c, d) = start_agent(
            "memory",
            spec("memory", Default::default()),
            &endpoint,
            60_000,
        )
        .await;
        let _: Value = admin
            .call(
                Method::POST,
                "/v1/agents",
                Some(&json!({ "id": format!("a-{i}"), "url": format!("http://{}", agent.addr), "token": AGENT_TOKEN })),
            )
            .await
            .unwrap();
        dirs.push(d);
        list.push((agent, c));
    }
    Env {
        site,
        admin,
        agents: list,
        _dirs: dirs,
    }
}

impl Env {
    /// Creates a user and returns a client with their token.
    pub async fn user(&self, name: &str, quota: Option<Value>) -> Client {
        self.user_with_token(name, quota).await.0
    }

    /// [`Env::user`], and the token itself (for raw requests).
    pub async fn user_with_token(&self, name: &str, quota: Option<Value>) -> (Client, String) {
        let mut body = json!({ "name": name });
        if let Some(q) = quota {
            body["quota"] = q;
        }
        let u: UserView = self
            .admin
            .call(Method::POST, "/v1/users", Some(&body))
            .await
            .unwrap();
        let token = u.token.expect("a new user's token");
        (
            Client::new(self.admin.base(), Some(token.clone())).unwrap(),
            token,
        )
    }
}

pub async fn post(c: &Client, path: &str, body: Value) -> Result<Value, ApiError> {
    c.call(Method::POST, path, Some(&body)).await
}

/// Waits (up to 30 s) for a job to end.
pub async fn wait_job(c: &Client, id: &str) -> Job {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let j: Job = c.get(&format!("/v1/jobs/{id}")).await.unwrap();
        if j.state.is_terminal() {
            return j;
        }
        assert!(Instant::now() < end, "job {id} did not end: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits a job and waits for its end.
pub async fn job(c: &Client, path: &str, body: Value) -> Job {
    let j: Job = serde_json::from_value(post(c, path, body).await.unwrap()).unwrap();
    assert!(
        matches!(j.state, JobState::Queued | JobState::Running),
        "{j:?}"
    );
    wait_job(c, &j.id).await
}

fn profile() -> Value {
    json!({ "template": "debian-12", "logical-cpus": 1, "main-memory-mib": 512 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_requests_manages_and_releases_a_vm_and_the_pool_reuses_it() {
    let e = env(2, |_| {}).await;
    let alice = e.user("alice", None).await;
    let j = job(&alice, "/v1/vms", profile()).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let vm: SiteVm = alice
        .get(&format!("/v1/jobs/{}/result", j.id))
        .await
        .unwrap();
    assert_eq!(
        (vm.state.as_str(), vm.owner.as_deref()),
        ("running", Some("alice"))
    );
    assert!(vm.lease.is_some());

    // The event stream replays the job's changes up to its end.
    let resp = alice
        .get_stream(&format!("/v1/jobs/{}/events", j.id))
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    use http_body_util::BodyExt;
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let states: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            match v["state"].as_str().unwrap() {
                "queued" => "queued",
                "running" => "running",
                "succeeded" => "succeeded",
                _ => "other",
            }
        })
        .collect();
    assert_eq!(states.first(), Some(&"queued"), "{text}");
    assert_eq!(states.last(), Some(&"succeeded"), "{text}");

    for (action, body, state) in [
        ("suspend", json!({}), "suspended"),
        ("resume", json!({}), "running"),
    ] {
        let j = job(&alice, &format!("/v1/vms/{}/{action}", vm.id), body).await;
        assert_eq!(j.state, JobState::Succeeded, "{action}: {j:?}");
        let now: SiteVm = alice.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
        assert_eq!(now.state, state);
    }
    let j = job(
        &alice,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["echo", "hi"], "env": { "TOKEN": "s3cr3t" }, "stdin-b64": "c2VjcmV0" }),
    )
    .await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(j.result.as_ref().unwrap()["exec"]["exit-code"], 0);
    // Secrets of a command are neither shown nor kept once it ran.
    let shown = serde_json::to_string(&j).unwrap();
    assert!(
        !shown.contains("s3cr3t") && !shown.contains("c2VjcmV0"),
        "{shown}"
    );
    let stored = serde_json::to_string(&e.site.core.store.job(&j.id).unwrap().unwrap()).unwrap();
    assert!(
        !stored.contains("s3cr3t") && !stored.contains("c2VjcmV0"),
        "{stored}"
    );

    // A clone is the user's new VM, counted in their quota.
    let c = job(
        &alice,
        &format!("/v1/vms/{}/clone", vm.id),
        json!({ "name": "copy-1" }),
    )
    .await;
    assert_eq!(c.state, JobState::Succeeded, "{c:?}");
    let copy: SiteVm = serde_json::from_value(c.result.unwrap()).unwrap();
    assert_eq!(
        (copy.owner.as_deref(), copy.name.as_str()),
        (Some("alice"), "copy-1")
    );
    let me: UserView = alice.get("/v1/me").await.unwrap();
    assert_eq!(me.usage.vms, 2);
    assert_eq!(
        job(&alice, &format!("/v1/vms/{}/release", copy.id), json!({}))
            .await
            .state,
        JobState::Succeeded
    );

    // Migrating to an unknown agent is refused before a job exists.
    let err = post(
        &alice,
        &format!("/v1/vms/{}/migrate", vm.id),
        json!({ "to": "nowhere" }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status, 404, "{err}");

    let me: UserView = alice.get("/v1/me").await.unwrap();
    assert_eq!((me.usage.vms, me.usage.main_memory_mib), (1, 512));
    let j = job(&alice, &format!("/v1/vms/{}/release", vm.id), json!({})).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let pooled = j.result.unwrap()["pooled"].as_str().unwrap().to_string();
    let me: UserView = alice.get("/v1/me").await.unwrap();
    assert_eq!(me.usage.vms, 0);
    let mine: Vec<SiteVm> = alice.get("/v1/vms").await.unwrap();
    assert!(mine.is_empty());

    // A fresh VM of the released one's profile is in the pool: the same profile
    // gets it, started.
    let j = job(&alice, "/v1/vms", profile()).await;
    let again: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    assert_eq!(
        (again.id.as_str(), again.state.as_str()),
        (pooled.as_str(), "running")
    );
    assert_ne!(again.id, vm.id);
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_against_a_quota_of_five_allocate_exactly_five() {
    let e = env(2, |_| {}).await;
    let bob = e
        .user(
            "bob",
            Some(json!({ "logical-cpus": 100, "main-memory-mib": 100000, "vms": 5 })),
        )
        .await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let bob = bob.clone();
        tasks.push(tokio::spawn(async move {
            post(&bob, "/v1/vms", json!({ "main-memory-mib": 64 })).await
        }));
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(j) => accepted.push(j["id"].as_str().unwrap().to_string()),
            Err(e) => {
                assert_eq!((e.status, e.kind.as_str()), (403, "denied"), "{e}");
                assert!(e.message.contains("quota"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted.len(), refused), (5, 45));
    for id in &accepted {
        assert_eq!(wait_job(&bob, id).await.state, JobState::Succeeded);
    }
    let vms: Vec<SiteVm> = bob.get("/v1/vms").await.unwrap();
    assert_eq!(vms.len(), 5);
    let me: UserView = bob.get("/v1/me").await.unwrap();
    assert_eq!((me.usage.vms, me.usage.main_memory_mib), (5, 320));
    // The agents hold exactly those five VMs.
    let mut on_agents = 0;
    for (_, c) in &e.agents {
        on_agents += c.get::<Vec<Value>>("/v1/vms").await.unwrap().len();
    }
    assert_eq!(on_agents, 5);
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_stops_the_vm_and_blocks_access_and_renewal_keeps_it() {
    let e = env(1, |_| {}).await;
    let carol = e.user("carol", None).await;
    let short = job(
        &carol,
        "/v1/vms",
        json!({ "main-memory-mib": 64, "lease-seconds": 2 }),
    )
    .await;
    let renewed = job(
        &carol,
        "/v1/vms",
        json!({ "main-memory-mib": 128, "lease-seconds": 2 }),
    )
    .await;
    let short: SiteVm = serde_json::from_value(short.result.unwrap()).unwrap();
    let renewed: SiteVm = serde_json::from_value(renewed.result.unwrap()).unwrap();
    let r: SiteVm = serde_json::from_value(
        post(
            &carol,
            &format!("/v1/vms/{}/renew", renewed.id),
            json!({ "seconds": 60 }),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert!(r.lease.unwrap().until_ms > short.lease.unwrap().until_ms + 30_000);

    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let v: SiteVm = carol.get(&format!("/v1/vms/{}", short.id)).await.unwrap();
        if v.lease.is_some_and(|l| l.expired) && v.state == "stopped" {
            break;
        }
        assert!(Instant::now() < end, "the lease did not expire: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The agent stopped it, the user is told why, and cannot use or renew it.
    let rec: Value = e.agents[0]
        .1
        .get(&format!("/v1/vms/{}", short.agent_vm))
        .await
        .unwrap();
    assert_eq!(rec["vm"]["state"], "stopped");
    let err = post(&carol, &format!("/v1/vms/{}/start", short.id), json!({}))
        .await
        .unwrap_err();
    assert_eq!((err.status, err.kind.as_str()), (403, "denied"));
    assert!(
        err.message.contains("lease") && err.message.contains("expired"),
        "{err}"
    );
    let err = post(&carol, &format!("/v1/vms/{}/renew", short.id), json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.status, 403, "{err}");
    // Nor get it back by requesting it by id.
    let err = post(&carol, "/v1/vms", json!({ "vm": short.id }))
        .await
        .unwrap_err();
    assert_eq!(err.status, 403, "{err}");
    // The renewed one is still running and usable.
    let v: SiteVm = carol.get(&format!("/v1/vms/{}", renewed.id)).await.unwrap();
    assert_eq!(
        (v.state.as_str(), v.lease.unwrap().expired),
        ("running", false)
    );
    // Release still works on the expired one, and gives the quota back.
    assert_eq!(
        job(&carol, &format!("/v1/vms/{}/release", short.id), json!({}))
            .await
            .state,
        JobState::Succeeded
    );
    let me: UserView = carol.get("/v1/me").await.unwrap();
    assert_eq!(me.usage.vms, 1);
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_is_down_and_its_vms_unknown() {
    let mut e = env(1, |_| {}).await;
    let dave = e.user("dave", None).await;
    let j = job(&dave, "/v1/vms", json!({ "main-memory-mib": 64 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let (agent, _) = e.agents.remove(0);
    agent.stop().await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let v: SiteVm = dave.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
        if v.state == "unknown" {
            break;
        }
        assert!(Instant::now() < end, "still {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agents: Vec<Value> = e.admin.get("/v1/agents").await.unwrap();
    assert_eq!(agents[0]["status"], "down");
    let err = post(&dave, &format!("/v1/vms/{}/suspend", vm.id), json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.status, 503, "{err}");
    // No agent can take a new VM: the request fails with the reason.
    let j = job(&dave, "/v1/vms", json!({ "main-memory-mib": 64 })).await;
    assert_eq!(j.state, JobState::Failed);
    assert!(j.error.unwrap().message.contains("a-0: down"));
    let me: UserView = dave.get("/v1/me").await.unwrap();
    assert_eq!(
        me.usage.vms, 1,
        "the failed request gave its reservation back"
    );
    e.site.stop().await;
}

/// Status of one call (anonymous when `c` has no token).
async fn status(c: &Client, method: &Method, path: &str, body: &Value) -> u16 {
    let body = if *method == Method::GET || *method == Method::DELETE {
        None
    } else {
        Some(body)
    };
    match c.call::<_, Value>(method.clone(), path, body).await {
        Ok(_) => 200,
        Err(e) => e.status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_every_endpoint_by_anonymous_other_owner_admin() {
    let e = env(3, |_| {}).await;
    let big = json!({ "logical-cpus": 1000, "main-memory-mib": 1000000, "vms": 100 });
    let owner = e.user("owner", Some(big.clone())).await;
    let other = e.user("other", Some(big)).await;
    let _spare = e.user("spare", None).await;
    let anon = Client::new(e.admin.base(), None).unwrap();
    let fresh = || async {
        let j = job(&owner, "/v1/vms", json!({ "main-memory-mib": 64 })).await;
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        serde_json::from_value::<SiteVm>(j.result.unwrap())
            .unwrap()
            .id
    };
    let vm = fresh().await;
    let done = job(&owner, "/v1/vms", json!({ "main-memory-mib": 64 }))
        .await
        .id;
    const OK: u16 = 200;
    // (method, path, body, [anonymous, other user, owner, admin]); 200 = any success.
    let g = Method::GET;
    let p = Method::POST;
    let fixed: Vec<(Method, String, Value, [u16; 4])> = vec![
        (g.clone(), "/v1/health".into(), json!({}), [OK, OK, OK, OK]),
        (
            g.clone(),
            "/v1/openapi.yaml".into(),
            json!({}),
            [OK, OK, OK, OK],
        ),
        (g.clone(), "/v1/me".into(), json!({}), [401, OK, OK, OK]),
        (g.clone(), "/v1/glue2".into(), json!({}), [401, OK, OK, OK]),
        (
            g.clone(),
            "/v1/users".into(),
            json!({}),
            [401, 403, 403, OK],
        ),
        (
            g.clone(),
            "/v1/users/owner".into(),
            json!({}),
            [401, 404, OK, OK],
        ),
        (
            Method::PUT,
            "/v1/users/spare/quota".into(),
            json!({ "logical-cpus": 1, "main-memory-mib": 1, "vms": 1 }),
            [401, 403, 403, OK],
        ),
        (
            g.clone(),
            "/v1/agents".into(),
            json!({}),
            [401, 403, 403, OK],
        ),
        (
            g.clone(),
            "/v1/agents/a-0".into(),
            json!({}),
            [401, 403, 403, OK],
        ),
        (
            p.clone(),
            "/v1/agents/a-0/check".into(),
            json!({}),
            [401, 403, 403, OK],
        ),
        (
            p.clone(),
            "/v1/agents".into(),
            json!({ "id": "x", "url": "http://127.0.0.1:9", "token": "t" }),
            [401, 403, 403, 503],
        ),
        (
            g.clone(),
            "/v1/templates".into(),
            json!({}),
            [401, OK, OK, OK],
        ),
        (g.clone(), "/v1/vms".into(), json!({}), [401, OK, OK, OK]),
        (
            g.clone(),
            format!("/v1/vms/{vm}"),
            json!({}),
            [401, 404, OK, OK],
        ),
        (
            p.clone(),
            format!("/v1/vms/{vm}/renew"),
            json!({ "seconds": 600 }),
            [401, 404, OK, OK],
        ),
        (g.clone(), "/v1/jobs".into(), json!({}), [401, OK, OK, OK]),
        (
            g.clone(),
            format!("/v1/jobs/{done}"),
            json!({}),
            [401, 404, OK, OK],
        ),
        (
            g.clone(),
            format!("/v1/jobs/{done}/result"),
            json!({}),
            [401, 404, OK, OK],
        ),
        (
            p.clone(),
            format!("/v1/jobs/{done}/cancel"),
            json!({}),
            [401, 404, 409, 409],
        ),
    ];
    for (m, path, body, want) in &fixed {
        let got = [
            status(&anon, m, path, body).await,
            status(&other, m, path, body).await,
            status(&owner, m, path, body).await,
            status(&e.admin, m, path, body).await,
        ];
        assert_eq!(&got, want, "{m} {path}: [anonymous, other, owner, admin]");
    }
    // Actions on a VM: each success on its own fresh VM, so one does not undo another.
    for (action, body) in [
        ("start", json!({})),
        ("shutdown", json!({ "force": true })),
        ("suspend", json!({})),
        ("resume", json!({})),
        ("exec", json!({ "argv": ["true"] })),
        ("provision", json!({ "bundle": "none" })),
        ("clone", json!({ "name": "copy" })),
        ("migrate", json!({ "to": "a-1" })),
        ("release", json!({})),
    ] {
        let (vm_o, vm_a) = (fresh().await, fresh().await);
        let path = |v: &str| format!("/v1/vms/{v}/{action}");
        let got = [
            status(&anon, &p, &path(&vm_o), &body).await,
            status(&other, &p, &path(&vm_o), &body).await,
            status(&owner, &p, &path(&vm_o), &body).await,
            status(&e.admin, &p, &path(&vm_a), &body).await,
        ];
        // A migrate to the VM's own agent is a bad request: pick the other one.
        assert!(
            got == [401, 404, OK, OK] || (action == "migrate" && got[..2] == [401, 404]),
            "{action}: {got:?}"
        );
    }
    let j: Job = serde_json::from_value(
        post(&owner, "/v1/vms", json!({ "main-memory-mib": 64 }))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        status(&other, &g, &format!("/v1/jobs/{}/events", j.id), &json!({})).await,
        404
    );
    assert_eq!(
        status(&anon, &g, &format!("/v1/jobs/{}/events", j.id), &json!({})).await,
        401
    );
    // Lists show only one's own; admins see all with all=true.
    let theirs: Vec<SiteVm> = other.get("/v1/vms").await.unwrap();
    assert!(theirs.iter().all(|v| v.owner.as_deref() == Some("other")));
    let mine: Vec<Job> = other.get("/v1/jobs").await.unwrap();
    assert!(mine.iter().all(|j| j.owner == "other"));
    let all: Vec<SiteVm> = e.admin.get("/v1/vms?all=true").await.unwrap();
    assert!(all.iter().any(|v| v.owner.as_deref() == Some("owner")));
    // Destructive admin calls last.
    for (m, path, want) in [
        (p.clone(), "/v1/users/spare/token", [401, 404, 404, OK]),
        (Method::DELETE, "/v1/users/spare", [401, 403, 403, OK]),
        (
            Method::DELETE,
            "/v1/agents/a-2?force=true",
            [401, 403, 403, OK],
        ),
    ] {
        let got = [
            status(&anon, &m, path, &json!({})).await,
            status(&other, &m, path, &json!({})).await,
            status(&owner, &m, path, &json!({})).await,
            status(&e.admin, &m, path, &json!({})).await,
        ];
        assert_eq!(got, want, "{m} {path}");
    }
    // A user's own token rotation works and the old token stops working.
    let u: UserView = serde_json::from_value(
        post(&other, "/v1/users/other/token", json!({}))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status(&other, &g, "/v1/me", &json!({})).await, 401);
    let renewed = Client::new(e.admin.base(), u.token).unwrap();
    assert_eq!(status(&renewed, &g, "/v1/me", &json!({})).await, OK);
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_for_the_same_pooled_vm_keep_the_quota_exact() {
    let e = env(1, |_| {}).await;
    let erin = e.user("erin", None).await;
    let j = job(
        &erin,
        "/v1/vms",
        json!({ "template": "debian-12", "main-memory-mib": 256 }),
    )
    .await;
    let first: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let rel = job(&erin, &format!("/v1/vms/{}/release", first.id), json!({})).await;
    assert_eq!(rel.state, JobState::Succeeded);
    // The fresh VM that replaced it in the pool.
    let vm: SiteVm = e
        .admin
        .get(&format!(
            "/v1/vms/{}",
            rel.result.unwrap()["pooled"].as_str().unwrap()
        ))
        .await
        .unwrap();
    // Two requests for that pooled VM at once (a double click): one VM, counted once.
    let (a, b) = tokio::join!(
        post(
            &erin,
            "/v1/vms",
            json!({ "vm": vm.id, "main-memory-mib": 256 })
        ),
        post(
            &erin,
            "/v1/vms",
            json!({ "vm": vm.id, "main-memory-mib": 256 })
        )
    );
    for r in [a, b] {
        let id = r.unwrap()["id"].as_str().unwrap().to_string();
        wait_job(&erin, &id).await;
    }
    let me: UserView = erin.get("/v1/me").await.unwrap();
    assert_eq!((me.usage.vms, me.usage.main_memory_mib), (1, 256), "{me:?}");
    // A request naming a VM that another user took fails; it never falls back to
    // a new VM.
    let rel = job(&erin, &format!("/v1/vms/{}/release", vm.id), json!({})).await;
    assert_eq!(rel.state, JobState::Succeeded);
    let fresh = rel.result.unwrap()["pooled"].as_str().unwrap().to_string();
    let other = e.user("frank", None).await;
    let taken = job(
        &other,
        "/v1/vms",
        json!({ "vm": fresh, "main-memory-mib": 256 }),
    )
    .await;
    assert_eq!(taken.state, JobState::Succeeded, "{taken:?}");
    for id in [&fresh, &vm.id] {
        let late = post(
            &erin,
            "/v1/vms",
            json!({ "main-memory-mib": 256, "vm": id }),
        )
        .await
        .unwrap_err();
        assert_eq!(late.status, 404, "{late}");
    }
    let me: UserView = erin.get("/v1/me").await.unwrap();
    assert_eq!(me.usage.vms, 0, "{me:?}");
    e.site.stop().await;
}

/// A request that submits a job names where it is followed (`Location`); sent
/// with `?wait-ms=N` it is answered when the job ended (200 with it); a bad
/// `wait-ms` is refused before any job is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_with_wait_ms_is_answered_when_its_job_ends() {
    use crate::agent::{header, raw_call};
    let e = env(1, |_| {}).await;
    let (c, token) = e.user_with_token("waiter", None).await;
    let base = e.admin.base().to_string();
    let (status, _, job) = raw_call(
        &base,
        &token,
        "POST",
        "/v1/vms?wait-ms=30000",
        &profile().to_string(),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let job: Job = serde_json::from_value(job).unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let vm: SiteVm = serde_json::from_value(job.result.unwrap()).unwrap();

    let (status, headers, job) = raw_call(
        &base,
        &token,
        "POST",
        &format!("/v1/vms/{}/shutdown", vm.id),
        "{}",
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let job: Job = serde_json::from_value(job).unwrap();
    assert_eq!(
        header(&headers, "location"),
        Some(format!("/v1/jobs/{}", job.id).as_str())
    );
    assert_eq!(wait_job(&c, &job.id).await.state, JobState::Succeeded);

    let jobs = || async { c.get::<Vec<Job>>("/v1/jobs").await.unwrap().len() };
    let before = jobs().await;
    for bad in ["soon", "60001", "1e3"] {
        let (status, _, err) = raw_call(
            &base,
            &token,
            "POST",
            &format!("/v1/vms/{}/start?wait-ms={bad}", vm.id),
            "{}",
        )
        .await;
        assert_eq!(status, 400, "wait-ms={bad}: {err}");
    }
    assert_eq!(jobs().await, before, "a refused request queued a job");
    let (status, _, job) = raw_call(
        &base,
        &token,
        "POST",
        &format!("/v1/vms/{}/start?wait-ms=30000", vm.id),
        "{}",
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// A job still running when `wait-ms` runs out is answered 202, naming it, and
/// goes on: here its agent stopped answering after the site last saw it up, so
/// the job retries its submission for seconds, then fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_whose_job_outlasts_wait_ms_is_answered_202_and_goes_on() {
    use crate::agent::{header, raw_call};
    // No health check after registration: the site still takes the agent as up.
    let mut e = env(1, |c| c.health_period_ms = 600_000).await;
    let (u, token) = e.user_with_token("patient", None).await;
    let vm: SiteVm =
        serde_json::from_value(job(&u, "/v1/vms", profile()).await.result.expect("a VM")).unwrap();
    let (agent, _) = e.agents.remove(0);
    agent.stop().await;
    let (status, headers, body) = raw_call(
        e.admin.base(),
        &token,
        "POST",
        &format!("/v1/vms/{}/suspend?wait-ms=300", vm.id),
        "{}",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let j: Job = serde_json::from_value(body).unwrap();
    assert!(!j.state.is_terminal(), "{j:?}");
    assert_eq!(
        header(&headers, "location"),
        Some(format!("/v1/jobs/{}", j.id).as_str())
    );
    let end = wait_job(&u, &j.id).await;
    assert_eq!(end.state, JobState::Failed, "{end:?}");
    assert!(end.error.unwrap().message.contains("a-0"));
    e.site.stop().await;
}

/// An exec that finds a run slot free is recorded `running` and starts while
/// its batch reaches the disk; its `202` and its events come only once it is
/// durable. The database as a kill -9 would leave it, right after the answer
/// or right after a follower got the job's first event, holds the job and its
/// audit entry. Each image is copied holding the database's write lock, so no
/// commit lands during a copy, and none (the sync included) before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_started_as_it_is_recorded_is_answered_and_published_only_once_durable() {
    // No health checks to write while the file is copied.
    let e = env(1, |c| c.health_period_ms = 600_000).await;
    let c = e.user("durable", None).await;
    let vm: SiteVm =
        serde_json::from_value(job(&c, "/v1/vms", profile()).await.result.unwrap()).unwrap();
    let db = e.site.core.config.data_dir.join("site.redb");
    let images = tempfile::tempdir().unwrap();
    let image_of =
        |store: &gve::site::store::Store, db: &std::path::Path, image: &std::path::Path| {
            store
                .write_if(|_| {
                    std::fs::copy(db, image).unwrap();
                    Ok(None::<()>)
                })
                .unwrap();
        };
    // A follower that copies the file as soon as it is told of a new job.
    let mut events = e.site.core.store.subscribe();
    let (follower_db, follower_dir) = (db.clone(), images.path().to_path_buf());
    let store = e.site.core.store.clone();
    let follower = tokio::spawn(async move {
        let mut seen = Vec::new();
        // The 20 execs' (nothing else is submitted meanwhile).
        while seen.len() < 20 {
            let ev = events.recv().await.unwrap();
            if ev.state == JobState::Queued {
                let image = follower_dir.join(format!("event-{}.redb", seen.len()));
                image_of(&store, &follower_db, &image);
                seen.push((ev.job, image));
            }
        }
        seen
    });
    let mut answered = Vec::new();
    for i in 0..20 {
        let j: Job = c
            .call(
                Method::POST,
                &format!("/v1/vms/{}/exec", vm.id),
                Some(&json!({ "argv": ["echo", i.to_string()] })),
            )
            .await
            .unwrap();
        let image = images.path().join(format!("answer-{i}.redb"));
        image_of(&e.site.core.store, &db, &image);
        assert_eq!(wait_job(&c, &j.id).await.state, JobState::Succeeded);
        answered.push((j, image));
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("the follower got every exec's first event")
        .unwrap();
    e.site.stop().await;
    // Nothing else ran: each found the slot free and started at once.
    let started = answered
        .iter()
        .filter(|(j, _)| j.state == JobState::Running)
        .count();
    assert_eq!(started, 20, "execs answered queued: {answered:?}");
    let execs: Vec<&str> = answered.iter().map(|(j, _)| j.id.as_str()).collect();
    let followed: Vec<&(String, std::path::PathBuf)> = seen
        .iter()
        .filter(|(job, _)| execs.contains(&job.as_str()))
        .collect();
    assert_eq!(
        followed.len(),
        20,
        "every exec's first event reached the follower"
    );
    let nth = |job: &str| execs.iter().position(|j| *j == job).unwrap().to_string();
    for (job, image) in answered
        .iter()
        .map(|(j, image)| (j.id.as_str(), image))
        .chain(followed.iter().map(|(job, image)| (job.as_str(), image)))
    {
        let crashed = gve::site::store::Store::open(image).unwrap();
        let j = crashed.job(job).unwrap();
        assert!(
            j.as_ref().is_some_and(|j| j.state != JobState::Queued),
            "{} was seen before job {job} was durable: {j:?}",
            image.display()
        );
        let audited = crashed
            .audit_after(0, 10_000)
            .unwrap()
            .iter()
            .any(|a| a.action == "vm.exec" && a.detail["argv"][1] == nth(job).as_str());
        assert!(
            audited,
            "job {job}'s audit entry is not in {}",
            image.display()
        );
    }
}
