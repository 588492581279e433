//! The site's records when a job races with what else changes: an agent
//! force-unregistered while a job works on it, a health check that lists a clone
//! before the clone job records it, and a migration the destination does not
//! confirm. A proxy in front of an agent stops each job at the exact point.

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::{Job, JobState, SiteVm, UserView};
use gve::site::{Site, SiteConfig};
use gve_harness::Libvirtd;
use hyper::Method;
use serde_json::{json, Value};

use crate::agent::{start_agent, TOKEN as AGENT_TOKEN};
use crate::e2e::kvm_agent;
use crate::fairness::{ended, usable_vm};
use crate::proxy::{pick, Proxy, Rule};
use crate::site::{post, ADMIN};
use crate::support::spec;

/// A site with one memory agent `a-0`, reached through a proxy.
struct Proxied {
    site: Site,
    config: SiteConfig,
    admin: Client,
    proxy: Proxy,
    agent: gve::agent::Agent,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn proxied() -> Proxied {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SiteConfig::new(dir.path().to_path_buf(), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_period_ms = 200;
    let site = Site::start(config.clone()).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    let endpoint = format!("memory:races-{}", uuid::Uuid::new_v4());
    let (agent, _, adir) = start_agent(
        "memory",
        spec("memory", Default::default()),
        &endpoint,
        60_000,
    )
    .await;
    let proxy = Proxy::start(agent.addr).await;
    let _: Value = post(
        &admin,
        "/v1/agents",
        json!({ "id": "a-0", "url": proxy.url(), "token": AGENT_TOKEN }),
    )
    .await
    .unwrap();
    Proxied {
        site,
        config,
        admin,
        proxy,
        agent,
        _dirs: (dir, adir),
    }
}

async fn user(admin: &Client, name: &str) -> Client {
    let u: UserView = admin
        .call(Method::POST, "/v1/users", Some(&json!({ "name": name })))
        .await
        .unwrap();
    Client::new(admin.base(), u.token).unwrap()
}

/// The site's VM records that `keep` picks.
fn records(site: &Site, keep: impl Fn(&SiteVm) -> bool) -> Vec<SiteVm> {
    site.core
        .store
        .vms()
        .unwrap()
        .into_iter()
        .filter(|v| keep(v))
        .collect()
}

async fn submit(c: &Client, path: &str, body: Value) -> Job {
    serde_json::from_value(post(c, path, body).await.unwrap()).unwrap()
}

/// Sets `rule`, submits a VM request as `user` and waits until the proxy holds
/// a request of it.
async fn held_request(p: &Proxied, user: &Client, rule: Rule) -> Job {
    p.proxy.set(rule);
    let j = submit(
        user,
        "/v1/vms",
        json!({ "template": "debian-12", "main-memory-mib": 512 }),
    )
    .await;
    p.proxy.wait_held(Duration::from_secs(10)).await;
    j
}

/// The agent's answers on how its operations went.
fn op_polls() -> Rule {
    Rule::Hold(pick(|m, p| {
        m == Method::GET && p.starts_with("/v1/operations/")
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_cancels_a_job_waiting_on_its_agent_and_the_restarted_site_resumes_it() {
    let p = proxied().await;
    let u: UserView = p
        .admin
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "alice" })))
        .await
        .unwrap();
    let token = u.token.expect("a new user's token");
    let alice = Client::new(p.admin.base(), Some(token.clone())).unwrap();
    // The request's create is held at the proxy, before the agent sees it. When
    // the rule changes, the proxy may still forward it beside the resumed
    // job's: the agent's idempotency key must make them one VM.
    let j = held_request(
        &p,
        &alice,
        Rule::Hold(pick(|m, p| m == Method::POST && p == "/v1/vms")),
    )
    .await;
    // The stop cancels the waiting job, so the database is closed when it
    // returns: the site opens again in this process at once (before, the job
    // held it until the agent answered and the reopen failed).
    let config = p.config.clone();
    p.site.stop().await;
    let site = Site::start(config)
        .await
        .expect("the site reopens after stop");
    let alice = Client::new(&format!("http://{}", site.addr), Some(token)).unwrap();
    p.proxy.set(Rule::Pass);
    let j = ended(&alice, &j.id, Duration::from_secs(30)).await;
    assert_eq!(j.state, JobState::Succeeded, "resumed: {j:?}");
    // Resumed, not run twice: one VM on the agent, the user's.
    let vms: Vec<gve::agent::model::VmRecord> = Client::new(
        &format!("http://{}", p.agent.addr),
        Some(AGENT_TOKEN.into()),
    )
    .unwrap()
    .get("/v1/vms")
    .await
    .unwrap();
    let made: Vec<_> = vms.iter().filter(|v| !v.vm.is_template).collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let mine: Vec<SiteVm> = alice.get("/v1/vms").await.unwrap();
    assert_eq!(mine.len(), 1, "{mine:?}");
    site.stop().await;
    p.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_force_unregistered_mid_request_keeps_no_vm_record_and_no_quota() {
    let p = proxied().await;
    let alice = user(&p.admin, "alice").await;
    // The agent creates the VM; the site does not hear of it until the agent is gone.
    let j = held_request(&p, &alice, op_polls()).await;
    p.admin
        .call::<(), Value>(Method::DELETE, "/v1/agents/a-0?force=true", None)
        .await
        .unwrap();
    p.proxy.set(Rule::Pass);
    let j = ended(&alice, &j.id, Duration::from_secs(30)).await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let e = j.error.unwrap();
    assert!(
        e.kind == "not-found" && e.message.contains("not registered"),
        "{e:?}"
    );
    let on_missing: Vec<SiteVm> = records(&p.site, |v| v.agent == "a-0");
    assert!(on_missing.is_empty(), "{on_missing:?}");
    let me: UserView = alice.get("/v1/me").await.unwrap();
    assert_eq!(
        (
            me.usage.vms,
            me.usage.main_memory_mib,
            me.usage.logical_cpus
        ),
        (0, 0, 0),
        "the reservation went back"
    );
    p.site.stop().await;
    p.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_leaves_a_clone_to_its_job() {
    let p = proxied().await;
    let alice = user(&p.admin, "alice").await;
    let j = submit(
        &alice,
        "/v1/vms",
        json!({ "template": "debian-12", "main-memory-mib": 512 }),
    )
    .await;
    let j = ended(&alice, &j.id, Duration::from_secs(30)).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let vm = j.result.unwrap()["id"].as_str().unwrap().to_string();

    // The agent clones; the site hears of it only after several health checks
    // (every 200 ms) have listed the new VM.
    p.proxy.set(op_polls());
    let c = submit(
        &alice,
        &format!("/v1/vms/{vm}/clone"),
        json!({ "name": "twin" }),
    )
    .await;
    p.proxy.wait_held(Duration::from_secs(10)).await;
    let agent = Client::new(
        &format!("http://{}", p.agent.addr),
        Some(AGENT_TOKEN.into()),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let listed: Vec<Value> = agent.get("/v1/vms").await.unwrap();
        if listed.iter().any(|r| r["vm"]["name"] == "twin") {
            break;
        }
        assert!(Instant::now() < end, "the agent never made the clone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checks_from = Instant::now();
    while checks_from.elapsed() < Duration::from_millis(1500) {
        let twins: Vec<SiteVm> = records(&p.site, |v| v.name == "twin");
        assert!(twins.is_empty(), "a check recorded the clone: {twins:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.proxy.set(Rule::Pass);
    let c = ended(&alice, &c.id, Duration::from_secs(30)).await;
    assert_eq!(c.state, JobState::Succeeded, "{c:?}");
    let twins: Vec<SiteVm> = records(&p.site, |v| v.name == "twin");
    assert_eq!(twins.len(), 1, "{twins:?}");
    assert_eq!(twins[0].owner.as_deref(), Some("alice"));
    let me: UserView = alice.get("/v1/me").await.unwrap();
    assert_eq!(me.usage.vms, 2);
    p.site.stop().await;
    p.agent.stop().await;
}

/// Two kvm agents, each with its own libvirtd: `a` reached directly, `b` through
/// a proxy that refuses `GET /v1/vms/{id}` while the migration ends, so `b` cannot
/// confirm the VM that really arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_the_destination_does_not_confirm_keeps_its_owner() {
    let (la, lb) = (Libvirtd::start(), Libvirtd::start());
    let dir = tempfile::tempdir().unwrap();
    let a = kvm_agent(&la, &lb, &dir.path().join("a")).await;
    let b = kvm_agent(&lb, &la, &dir.path().join("b")).await;
    let proxy = Proxy::start(b.addr).await;
    let mut config = SiteConfig::new(dir.path().join("site"), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_period_ms = 300;
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    let register = |id: &str, url: String| {
        post(
            &admin,
            "/v1/agents",
            json!({ "id": id, "url": url, "token": AGENT_TOKEN }),
        )
    };
    register("a", format!("http://{}", a.addr)).await.unwrap();
    let alice = user(&admin, "alice").await;
    // Only `a` is registered when the VM is placed.
    let vm = usable_vm(&alice).await;
    register("b", proxy.url()).await.unwrap();

    proxy.set(Rule::Refuse(pick(|m, p| {
        m == Method::GET && p.starts_with("/v1/vms/")
    })));
    let j = submit(
        &alice,
        &format!("/v1/vms/{vm}/migrate"),
        json!({ "to": "b", "live": true }),
    )
    .await;
    let j = ended(&alice, &j.id, Duration::from_secs(180)).await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let e = j.error.unwrap();
    assert!(e.message.contains("did not confirm"), "{e:?}");
    let rec: SiteVm = alice.get(&format!("/v1/vms/{vm}")).await.unwrap();
    assert_eq!(
        (rec.agent.as_str(), rec.owner.as_deref()),
        ("b", Some("alice")),
        "the record follows the VM: {rec:?}"
    );

    // Once `b` answers again, its check finds the VM running: still alice's,
    // and no record of it that nobody owns.
    proxy.set(Rule::Pass);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let rec: SiteVm = alice.get(&format!("/v1/vms/{vm}")).await.unwrap();
        if rec.state == "running" {
            assert_eq!(
                (rec.agent.as_str(), rec.owner.as_deref()),
                ("b", Some("alice"))
            );
            break;
        }
        assert!(
            Instant::now() < end,
            "the site never learned the VM's state: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all: Vec<SiteVm> = site.core.store.vms().unwrap();
    assert_eq!(all.len(), 1, "one VM, one record: {all:?}");
    runs_a_command(&alice, &vm).await;
    site.stop().await;
    a.stop().await;
    b.stop().await;
}

/// `true` runs in VM `vm` through the site.
async fn runs_a_command(c: &Client, vm: &str) {
    let x = submit(
        c,
        &format!("/v1/vms/{vm}/exec"),
        json!({ "argv": ["true"] }),
    )
    .await;
    let x = ended(c, &x.id, Duration::from_secs(60)).await;
    assert_eq!(x.state, JobState::Succeeded, "{x:?}");
}

/// Waits (up to `within`) until the site's record of `vm` passes `done`.
async fn record_until(
    c: &Client,
    vm: &str,
    within: Duration,
    done: impl Fn(Option<&SiteVm>) -> bool,
) -> Option<SiteVm> {
    let end = Instant::now() + within;
    loop {
        let rec: Option<SiteVm> = c.get(&format!("/v1/vms/{vm}")).await.ok();
        if done(rec.as_ref()) {
            return rec;
        }
        assert!(Instant::now() < end, "the record of {vm} stayed {rec:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A VM moved between agents outside any job (as a migration whose site was cut
/// off leaves it: two kvm agents on real libvirtds) keeps its record, owner, lease
/// and quota on the agent it is on now; nothing of it is pooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moved_outside_a_job_keeps_its_owner() {
    let (la, lb) = (Libvirtd::start(), Libvirtd::start());
    let dir = tempfile::tempdir().unwrap();
    let a = kvm_agent(&la, &lb, &dir.path().join("a")).await;
    let b = kvm_agent(&lb, &la, &dir.path().join("b")).await;
    let mut config = SiteConfig::new(dir.path().join("site"), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_period_ms = 300;
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    for (id, agent) in [("a", &a), ("b", &b)] {
        post(
            &admin,
            "/v1/agents",
            json!({ "id": id, "url": format!("http://{}", agent.addr), "token": AGENT_TOKEN }),
        )
        .await
        .unwrap();
    }
    let alice = user(&admin, "alice").await;
    let vm = usable_vm(&alice).await;
    let rec: SiteVm = alice.get(&format!("/v1/vms/{vm}")).await.unwrap();
    let (from, to, dest) = if rec.agent == "a" {
        (&a, "b", &lb)
    } else {
        (&b, "a", &la)
    };
    let from = Client::new(&format!("http://{}", from.addr), Some(AGENT_TOKEN.into())).unwrap();
    let op = crate::agent::run_op(
        &from,
        &format!("/v1/vms/{}/migrate", rec.agent_vm),
        json!({ "destination": dest.migration_uri(), "live": true }),
    )
    .await;
    assert_eq!(op.state, gve::agent::model::OpState::Succeeded, "{op:?}");
    let moved = record_until(&alice, &vm, Duration::from_secs(30), |r| {
        r.is_some_and(|r| r.agent == to && r.state == "running")
    })
    .await
    .unwrap();
    assert_eq!(
        (moved.owner.as_deref(), moved.lease, moved.agent_vm.as_str()),
        (Some("alice"), rec.lease, rec.agent_vm.as_str()),
        "{moved:?}"
    );
    // A few more rounds of checks change nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = records(&site, |_| true);
    assert_eq!(all.len(), 1, "one VM, one record, none pooled: {all:?}");
    assert_eq!(all[0].agent, to);
    let me: UserView = alice.get("/v1/me").await.unwrap();
    assert_eq!((me.usage.vms, me.usage.main_memory_mib), (1, 192));
    // Jobs reach it where it is now.
    runs_a_command(&alice, &vm).await;
    // The memory placement counts moved with it: all on the new agent.
    let held = site.core.store.memory_by_agent().unwrap();
    assert_eq!(
        held,
        gve::site::placement::held(&site.core.store.vms().unwrap())
    );
    assert_eq!(held.get(to), Some(&192), "{held:?}");
    assert_eq!(held.len(), 1, "{held:?}");
    site.stop().await;
    a.stop().await;
    b.stop().await;
}

/// A VM destroyed outside gve is `missing` a while (still counted), then
/// forgotten and its quota given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_destroyed_outside_gve_is_missing_then_forgotten() {
    let e = crate::site::env(1, |_| {}).await;
    let alice = e.user("alice", None).await;
    let j = submit(&alice, "/v1/vms", json!({ "main-memory-mib": 256 })).await;
    let j = ended(&alice, &j.id, Duration::from_secs(30)).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let op = crate::agent::run_op(
        &e.agents[0].1,
        &format!("/v1/vms/{}/destroy", vm.agent_vm),
        json!({}),
    )
    .await;
    assert_eq!(op.state, gve::agent::model::OpState::Succeeded, "{op:?}");
    record_until(&alice, &vm.id, Duration::from_secs(10), |r| {
        r.is_some_and(|r| r.state == "missing" && r.owner.as_deref() == Some("alice"))
    })
    .await;
    let me: UserView = alice.get("/v1/me").await.unwrap();
    assert_eq!(me.usage.vms, 1, "a missing VM is still counted");
    record_until(&alice, &vm.id, Duration::from_secs(30), |r| r.is_none()).await;
    let me: UserView = alice.get("/v1/me").await.unwrap();
    assert_eq!((me.usage.vms, me.usage.main_memory_mib), (0, 0));
    assert!(records(&e.site, |_| true).is_empty());
    e.site.stop().await;
}
