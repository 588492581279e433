//! The site tried as tenants would try it against each other (memory-driver
//! agents): what one leaves in a released VM, numbers at the edge of their type,
//! requests that fail half-way, bodies that are wrong, and a seeded random walk of
//! requests, failures, releases, expiries and crashes that checks the books.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gve::api::client::Client;
use gve::site::model::{Job, JobState, SiteVm, UserView};
use hyper::Method;
use serde_json::{json, Value};

use crate::agent::{start_agent, TOKEN as AGENT_TOKEN};
use crate::site::{env, job, post, wait_job, ADMIN};
use crate::site_crash::{spawn_site, Rng, SiteProcess};
use crate::support::spec;

fn profile() -> Value {
    json!({ "template": "debian-12", "logical-cpus": 1, "main-memory-mib": 512 })
}

async fn copy_in(c: &Client, vm: &str, path: &str, data: &'static [u8]) -> Job {
    let j: Job = c
        .put_stream(
            &format!("/v1/vms/{vm}/files?path={path}&parents=true"),
            &[],
            gve::api::full(Bytes::from_static(data)),
        )
        .await
        .unwrap();
    wait_job(c, &j.id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_vm_reaches_the_next_tenant_clean() {
    let e = env(1, |_| {}).await;
    let alice = e.user("alice", None).await;
    let bob = e.user("bob", None).await;
    let j = job(&alice, "/v1/vms", profile()).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let put = copy_in(&alice, &vm.id, "/home/alice/secret.txt", b"alice's secret").await;
    assert_eq!(put.state, JobState::Succeeded, "{put:?}");

    let rel = job(&alice, &format!("/v1/vms/{}/release", vm.id), json!({})).await;
    assert_eq!(rel.state, JobState::Succeeded, "{rel:?}");
    let pooled = rel.result.as_ref().unwrap()["pooled"]
        .as_str()
        .expect("a fresh VM replaces the released one in the pool")
        .to_string();
    assert_ne!(pooled, vm.id);

    // bob asks for the same profile: he is given the pooled VM, made afresh.
    let j = job(&bob, "/v1/vms", profile()).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(j.step["reused"], true, "{j:?}");
    let got: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    assert_eq!(got.id, pooled);
    assert!(got.software.is_empty() && !got.clean, "{got:?}");
    let out: Job = serde_json::from_value(
        post(
            &bob,
            &format!("/v1/vms/{}/copy-out", got.id),
            json!({ "path": "/home/alice/secret.txt" }),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let out = wait_job(&bob, &out.id).await;
    assert_eq!(
        out.state,
        JobState::Failed,
        "alice's file reached bob: {out:?}"
    );
    assert_eq!(out.error.unwrap().kind, "not-found");

    // alice's old VM is gone from the agent, not merely unlisted.
    let agent_vms: Vec<Value> = e.agents[0].1.get("/v1/vms").await.unwrap();
    let agent_vm = vm.agent_vm.as_str();
    assert!(
        agent_vms
            .iter()
            .all(|v| v["vm"]["id"].as_str() != Some(agent_vm)),
        "{agent_vms:?}"
    );
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_vms_the_site_did_not_make_go_to_no_tenant() {
    let e = env(1, |_| {}).await;
    let carol = e.user("carol", None).await;
    // A VM made on the agent behind the site's back (the operator, or a leftover).
    let (_, agent) = &e.agents[0];
    let op: Value = agent
        .call(
            Method::POST,
            "/v1/vms",
            Some(&json!({ "name": "stray", "template": "debian-12", "main-memory-mib": 512 })),
        )
        .await
        .unwrap();
    let op_id = op["id"].as_str().unwrap();
    let _: Value = agent
        .get(&format!("/v1/operations/{op_id}?wait-ms=5000"))
        .await
        .unwrap();
    let stray = loop {
        let all: Vec<SiteVm> = e.admin.get("/v1/vms?all=true").await.unwrap();
        if let Some(v) = all.into_iter().find(|v| v.name == "stray") {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(stray.owner.is_none() && !stray.clean, "{stray:?}");
    // Not in the pool index either: a request never reads it.
    let pool = e.site.core.store.pool_ids().unwrap();
    assert!(!pool.contains(&stray.id), "{pool:?}");
    // Not by profile: carol gets a new VM...
    let j = job(&carol, "/v1/vms", profile()).await;
    let got: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    assert_ne!(got.id, stray.id);
    // ...and not by name either.
    let e404 = post(
        &carol,
        "/v1/vms",
        json!({ "vm": stray.id, "main-memory-mib": 512 }),
    )
    .await
    .unwrap_err();
    assert_eq!(e404.status, 404, "{e404}");
    e.site.stop().await;
}

/// The contract's VM ids are unique on their own hypervisor only (vSphere's
/// `vm-42`, the memory driver's `mem-7`): the same id on two agents is two VMs.
/// A tenant's VM destroyed behind the site's back is not followed to another
/// agent's VM that happens to share its id, and that VM is adopted, not ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_id_another_agent_also_uses_is_another_vm() {
    use gve::agent::model::OpState;
    let e = env(2, |_| {}).await;
    let alice = e.user("alice", None).await;
    let j = job(&alice, "/v1/vms", profile()).await;
    let mine: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let here = if mine.agent == "a-0" { 0 } else { 1 };
    let (there, there_id) = (&e.agents[1 - here].1, format!("a-{}", 1 - here));
    // The other agent makes VMs until one has the id of alice's.
    let twin = loop {
        let op = crate::agent::run_op(
            there,
            "/v1/vms",
            json!({ "name": format!("n-{}", uuid::Uuid::new_v4()), "main-memory-mib": 64 }),
        )
        .await;
        assert_eq!(op.state, OpState::Succeeded, "{op:?}");
        let vm = op.result.unwrap();
        if vm.id == mine.agent_vm {
            break vm;
        }
        assert!(
            vm.id.len() <= mine.agent_vm.len(),
            "{} passed {}",
            vm.id,
            mine.agent_vm
        );
    };
    let adopted = |all: &[SiteVm]| {
        all.iter()
            .find(|v| v.agent == there_id && v.agent_vm == twin.id)
            .cloned()
    };
    let end = Instant::now() + Duration::from_secs(20);
    let stranger = loop {
        let all: Vec<SiteVm> = e.admin.get("/v1/vms?all=true").await.unwrap();
        if let Some(v) = adopted(&all) {
            break v;
        }
        assert!(Instant::now() < end, "the twin was never adopted: {all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stranger.owner.is_none() && stranger.id != mine.id,
        "{stranger:?}"
    );
    // alice's VM goes behind the site's back: its record is missing, then
    // forgotten; it never moves onto the twin.
    let op = crate::agent::run_op(
        &e.agents[here].1,
        &format!("/v1/vms/{}/destroy", mine.agent_vm),
        json!({}),
    )
    .await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        let rec: Option<SiteVm> = alice.get(&format!("/v1/vms/{}", mine.id)).await.ok();
        if let Some(r) = &rec {
            assert_eq!(r.agent, mine.agent, "alice's record moved: {r:?}");
        }
        let all: Vec<SiteVm> = e.admin.get("/v1/vms?all=true").await.unwrap();
        let twin_now = adopted(&all).expect("the twin's record stays");
        assert!(
            twin_now.owner.is_none(),
            "the twin went to alice: {twin_now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rec: SiteVm = alice.get(&format!("/v1/vms/{}", mine.id)).await.unwrap();
    assert_eq!(rec.state, "missing", "{rec:?}");
    e.site.stop().await;
}

/// A VM whose record moved to another agent (as a migration job records it)
/// and that shows up again where it started, under an id unique there only:
/// its record is left to its owner, never replaced by a stray's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_seen_again_where_it_started_keeps_its_owner() {
    let e = env(2, |_| {}).await;
    let alice = e.user("alice", None).await;
    let j = job(&alice, "/v1/vms", profile()).await;
    let mine: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let other = if mine.agent == "a-0" { "a-1" } else { "a-0" };
    e.site
        .core
        .store
        .write(|t| {
            let mut v = t.vm(&mine.id)?.unwrap();
            v.agent = other.to_string();
            t.put_vm(&v)
        })
        .unwrap();
    // Ten health periods: the agent it started on lists it all along.
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let all: Vec<SiteVm> = e.admin.get("/v1/vms?all=true").await.unwrap();
        let rec = all
            .iter()
            .find(|v| v.id == mine.id)
            .expect("the record stays");
        assert_eq!(rec.owner.as_deref(), Some("alice"), "{rec:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rec: SiteVm = alice.get(&format!("/v1/vms/{}", mine.id)).await.unwrap();
    assert_eq!(rec.agent_vm, mine.agent_vm, "{rec:?}");
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_at_the_edge_of_their_type_are_refused_by_name() {
    let e = env(1, |_| {}).await;
    let dave = e.user("dave", None).await;
    let j = job(&dave, "/v1/vms", json!({ "main-memory-mib": 512 })).await;
    assert_eq!(j.state, JobState::Succeeded);
    for (body, field) in [
        (
            json!({ "main-memory-mib": 18446744073709551104u64 }),
            "main-memory-mib",
        ),
        (json!({ "main-memory-mib": u64::MAX }), "main-memory-mib"),
        (json!({ "logical-cpus": u32::MAX }), "logical-cpus"),
        (json!({ "logical-cpus": -1 }), "logical-cpus"),
        (json!({ "main-memory-mib": 1.5 }), "main-memory-mib"),
        (json!({ "lease-seconds": u64::MAX }), "lease-seconds"),
        (json!({ "software": ["a\nb"] }), "software"),
        (json!({ "template": "../../etc" }), "template"),
        (json!({ "nonsense": 1 }), "nonsense"),
    ] {
        let err = post(&dave, "/v1/vms", body.clone()).await.unwrap_err();
        assert_eq!(err.status, 400, "{body}: {err}");
        assert!(err.message.contains(field), "{body}: {err}");
    }
    let me: UserView = dave.get("/v1/me").await.unwrap();
    assert_eq!((me.usage.vms, me.usage.main_memory_mib), (1, 512), "{me:?}");
    // Quotas too.
    for q in [
        json!({ "logical-cpus": u64::MAX, "main-memory-mib": 1, "vms": 1 }),
        json!({ "logical-cpus": 1, "main-memory-mib": u64::MAX, "vms": 1 }),
    ] {
        let err: gve::api::ApiError = e
            .admin
            .call::<_, Value>(Method::PUT, "/v1/users/dave/quota", Some(&q))
            .await
            .unwrap_err();
        assert_eq!(err.status, 400, "{q}: {err}");
    }
    // Listing and long-poll parameters.
    for path in [
        "/v1/jobs?limit=0",
        "/v1/jobs?limit=100001",
        "/v1/jobs?limit=18446744073709551616",
        &format!("/v1/jobs/{}?wait-ms=60001", j.id),
    ] {
        let err = dave.get::<Value>(path).await.unwrap_err();
        assert_eq!(err.status, 400, "{path}: {err}");
    }
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_destroys_its_vm_and_keeps_no_quota() {
    let e = env(1, |_| {}).await;
    let eve = e
        .user(
            "eve",
            Some(json!({ "logical-cpus": 4, "main-memory-mib": 8192, "vms": 1 })),
        )
        .await;
    let (_, agent) = &e.agents[0];
    let before: Vec<Value> = agent.get("/v1/vms").await.unwrap();
    for mib in [3001, 3002, 3003] {
        let j = job(
            &eve,
            "/v1/vms",
            json!({ "main-memory-mib": mib, "software": ["nope"] }),
        )
        .await;
        assert_eq!(j.state, JobState::Failed, "{j:?}");
        let err = j.error.unwrap();
        assert!(err.message.contains("was destroyed"), "{err:?}");
        let me: UserView = eve.get("/v1/me").await.unwrap();
        assert_eq!(me.usage.vms, 0, "{me:?}");
    }
    let after: Vec<Value> = agent.get("/v1/vms").await.unwrap();
    assert_eq!(after.len(), before.len(), "{after:?}");
    let all: Vec<SiteVm> = e.admin.get("/v1/vms?all=true").await.unwrap();
    assert!(all.iter().all(|v| v.main_memory_mib < 3000), "{all:?}");
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_checked_when_submitted_not_when_run() {
    let e = env(1, |c| c.max_exec_seconds = 10).await;
    let fay = e.user("fay", None).await;
    let j = job(&fay, "/v1/vms", json!({ "main-memory-mib": 256 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let before = fay.get::<Vec<Job>>("/v1/jobs").await.unwrap().len();
    for (action, body, field) in [
        ("exec", json!({ "argv": ["true"], "env": 5 }), "env"),
        ("exec", json!({ "argv": [] }), "argv"),
        (
            "exec",
            json!({ "argv": ["true"], "timeout-ms": 0 }),
            "timeout-ms",
        ),
        (
            "exec",
            json!({ "argv": ["true"], "timeout-ms": 10_001 }),
            "max-exec-seconds",
        ),
        ("provision", json!({ "bundle": "x\r\nX-Evil: 1" }), "bundle"),
        ("clone", json!({ "name": "a/b" }), "clone name"),
        ("shutdown", json!({ "force": "yes" }), "force"),
        ("start", json!({ "extra": true }), "extra"),
    ] {
        let err = post(&fay, &format!("/v1/vms/{}/{action}", vm.id), body.clone())
            .await
            .unwrap_err();
        assert_eq!(err.status, 400, "{action} {body}: {err}");
        assert!(err.message.contains(field), "{action} {body}: {err}");
    }
    let after = fay.get::<Vec<Job>>("/v1/jobs").await.unwrap().len();
    assert_eq!(before, after, "a refused body must not make a job");
    // Without a budget of its own, a command gets the site's when that is shorter
    // than the agent's default.
    let j = job(
        &fay,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["true"] }),
    )
    .await;
    assert_eq!(j.params["timeout-ms"], 10_000, "{j:?}");
    e.site.stop().await;
}

/// What each user holds (VMs they own) must equal their recorded usage once no
/// job is in flight, and stay within their quota.
async fn check_books(admin: &Client, step: usize, seed: u64) {
    let users: Vec<UserView> = admin.get("/v1/users").await.unwrap();
    let vms: Vec<SiteVm> = admin.get("/v1/vms?all=true").await.unwrap();
    for u in users.iter().filter(|u| u.name != "admin") {
        let held: Vec<&SiteVm> = vms
            .iter()
            .filter(|v| v.owner.as_deref() == Some(u.name.as_str()))
            .collect();
        let mib: u64 = held.iter().map(|v| v.main_memory_mib).sum();
        let cpus: u64 = held.iter().map(|v| u64::from(v.logical_cpus)).sum();
        assert_eq!(
            (u.usage.vms, u.usage.main_memory_mib, u.usage.logical_cpus),
            (held.len() as u64, mib, cpus),
            "seed {seed}, step {step}: usage of {} is not what they hold: {held:?}",
            u.name
        );
        assert!(
            u.usage.vms <= u.quota.vms && u.usage.main_memory_mib <= u.quota.main_memory_mib,
            "seed {seed}, step {step}: {} is over quota: {u:?}",
            u.name
        );
    }
}

/// The site's `gve_site_vms` gauges, by state.
async fn vm_gauges(admin: &Client) -> std::collections::BTreeMap<String, u64> {
    use http_body_util::BodyExt;
    let resp = admin.get_stream("/metrics").await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("gve_site_vms{state=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(state, n)| (state.to_string(), n.trim().parse().unwrap()))
        .collect()
}

/// The VM gauges (counted as records change, never by reading them all) agree
/// with the inventory, read between two equal scrapes.
async fn gauges_agree(admin: &Client, step: usize, seed: u64) {
    for _ in 0..20 {
        let before = vm_gauges(admin).await;
        let vms: Vec<SiteVm> = admin
            .get_pages("/v1/vms?all=true", usize::MAX)
            .await
            .unwrap();
        if vm_gauges(admin).await != before {
            continue;
        }
        // A VM on an agent the site sees down reads `unknown` (the gauge keeps
        // its last state): then only the totals compare.
        if vms.iter().any(|v| v.state == "unknown") {
            let total: u64 = before.values().sum();
            assert_eq!(
                total,
                vms.len() as u64,
                "seed {seed}, step {step}: VMs gauged"
            );
            return;
        }
        let mut want = std::collections::BTreeMap::new();
        for v in &vms {
            *want.entry(v.state.clone()).or_insert(0u64) += 1;
        }
        assert_eq!(before, want, "seed {seed}, step {step}: VM gauges");
        return;
    }
    panic!("seed {seed}, step {step}: the VM gauges never held still");
}

/// Waits until no job is queued or running (expiry jobs included).
async fn quiesce(admin: &Client, seed: u64) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs: Vec<Job> = admin.get("/v1/jobs?all=true&limit=100000").await.unwrap();
        let active: Vec<&Job> = jobs.iter().filter(|j| !j.state.is_terminal()).collect();
        if active.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "seed {seed}: jobs never ended: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Steps of the random walk.
const STEPS: usize = 80;

/// A property test: random sequences of requests (some over quota, some failing
/// half-way), releases, lease expiries and kill -9 of a real site process; after
/// every step the books must balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_equals_what_each_user_holds_through_a_random_walk_with_kills() {
    let seed = std::env::var("GVE_WALK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| gve::site::model::now_ms() | 1);
    eprintln!("random walk seed {seed} (replay with GVE_WALK_SEED={seed})");
    let mut rng = Rng(seed);
    let mut agents = Vec::new();
    for i in 0..2 {
        let endpoint = format!("memory:walk-{}-{i}", uuid::Uuid::new_v4());
        agents.push(
            start_agent(
                "memory",
                spec("memory", Default::default()),
                &endpoint,
                60_000,
            )
            .await,
        );
    }
    let (_dir, config, log) = crate::site_crash::site_files(300, "parallel-jobs = 8\n");
    let mut site = spawn_site(&config, &log).await;
    let admin = |s: &SiteProcess| Client::new(&s.url, Some(ADMIN.into())).unwrap();
    for (i, (a, _, _)) in agents.iter().enumerate() {
        let _: Value = admin(&site)
            .call(Method::POST, "/v1/agents", Some(&json!({ "id": format!("a-{i}"), "url": format!("http://{}", a.addr), "token": AGENT_TOKEN })))
            .await
            .unwrap();
    }
    let mut tokens = Vec::new();
    for name in ["gil", "hal"] {
        let u: UserView = admin(&site)
            .call(Method::POST, "/v1/users", Some(&json!({ "name": name, "quota": { "logical-cpus": 6, "main-memory-mib": 2048, "vms": 3 } })))
            .await
            .unwrap();
        tokens.push(u.token.unwrap());
    }
    let sizes = [256u64, 512, 768];
    let mut kills = 0;
    for step in 0..STEPS {
        let c = Client::new(&site.url, Some(tokens[rng.below(2) as usize].clone())).unwrap();
        let mine: Vec<SiteVm> = c.get("/v1/vms").await.unwrap();
        let request = |rng: &mut Rng| {
            let mut body = json!({
                "template": "debian-12",
                "main-memory-mib": sizes[rng.below(3) as usize],
                "logical-cpus": 1 + rng.below(2),
            });
            if rng.below(4) == 0 {
                body["lease-seconds"] = json!(1);
            }
            body
        };
        match rng.below(10) {
            // Requests (some over quota: refused at submission), in bursts.
            0..=3 => {
                for _ in 0..=rng.below(3) {
                    let _ = post(&c, "/v1/vms", request(&mut rng)).await;
                }
            }
            // A request that fails half-way (its bundle does not exist).
            4 => {
                let _ = post(
                    &c,
                    "/v1/vms",
                    json!({ "main-memory-mib": 256, "software": ["missing"] }),
                )
                .await;
            }
            // Releases.
            5..=7 => {
                if !mine.is_empty() {
                    let v = &mine[rng.below(mine.len() as u64) as usize];
                    let _ = post(&c, &format!("/v1/vms/{}/release", v.id), json!({})).await;
                }
            }
            // Leases run out (those asked with 1 s).
            8 => tokio::time::sleep(Duration::from_millis(1200)).await,
            // kill -9 of the site 0-20 ms after a burst, then a restart.
            _ => {
                for _ in 0..=rng.below(3) {
                    let _ = post(&c, "/v1/vms", request(&mut rng)).await;
                }
                if let Some(v) = mine.first() {
                    let _ = post(&c, &format!("/v1/vms/{}/release", v.id), json!({})).await;
                }
                tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
                site.child.start_kill().unwrap();
                site.child.wait().await.unwrap();
                kills += 1;
                site = spawn_site(&config, &log).await;
            }
        }
        quiesce(&admin(&site), seed).await;
        check_books(&admin(&site), step, seed).await;
        gauges_agree(&admin(&site), step, seed).await;
    }
    eprintln!("random walk: {STEPS} steps, {kills} kills, books balanced after each");
    let _ = site.child.start_kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_larger_than_the_sites_limit_is_refused_and_nothing_staged() {
    let e = env(1, |c| c.max_copy_mib = 1).await;
    let jo = e.user("jo", None).await;
    let j = job(&jo, "/v1/vms", json!({ "main-memory-mib": 128 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    // Announced too large: refused before a byte is read.
    let big = Bytes::from(vec![7u8; (1 << 20) + 1]);
    let err = jo
        .put_stream::<Value>(
            &format!("/v1/vms/{}/files?path=/tmp/big", vm.id),
            &[],
            gve::api::full(big.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status, 413, "{err}");
    // Streamed without a length (chunked): cut at the limit. One byte over it, so
    // the client has sent everything before the 413 comes (no race with a reset).
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for n in [512 * 1024, 512 * 1024, 1] {
            let chunk = Bytes::from(vec![7u8; n]);
            if tx.send(Ok(hyper::body::Frame::data(chunk))).await.is_err() {
                return;
            }
        }
    });
    let err = jo
        .put_stream::<Value>(
            &format!("/v1/vms/{}/files?path=/tmp/big", vm.id),
            &[],
            gve::api::channel_body(rx),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status, 413, "{err}");
    let staging = e.site.core.config.data_dir.join("staging");
    let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "a refused copy left a staged file");
    e.site.stop().await;
}

/// Sends a copy-in to the site by hand (4 MiB, announced with its length) and
/// goes away: with `whole`, right after the last byte (while the site stages it);
/// otherwise after half of it.
async fn left_copy(site: std::net::SocketAddr, token: &str, vm: &str, path: &str, whole: bool) {
    use tokio::io::AsyncWriteExt;
    const SIZE: usize = 4 << 20;
    let mut s = tokio::net::TcpStream::connect(site).await.unwrap();
    let head = format!(
        "PUT /v1/vms/{vm}/files?path={path} HTTP/1.1\r\nhost: gve\r\n\
         authorization: Bearer {token}\r\ncontent-length: {SIZE}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let body = vec![3u8; SIZE];
    if whole {
        s.write_all(&body).await.unwrap();
    } else {
        s.write_all(&body[..SIZE / 2]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_client_leaves_is_queued_when_whole_and_unstaged_when_cut() {
    let e = env(1, |_| {}).await;
    let u: UserView = e
        .admin
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "kit" })))
        .await
        .unwrap();
    let token = u.token.clone().expect("a new user's token");
    let kit = Client::new(e.admin.base(), u.token.clone()).unwrap();
    let j = job(&kit, "/v1/vms", json!({ "main-memory-mib": 128 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let cases = [true, false, true, false, true];
    for (i, whole) in cases.into_iter().enumerate() {
        left_copy(
            e.site.addr,
            &token,
            &vm.id,
            &format!("/tmp/left-{i}"),
            whole,
        )
        .await;
    }
    // Every whole one became a job (the memory driver has no guest: it fails),
    // no cut one did, and nothing stays staged or on the books.
    let staging = e.site.core.config.data_dir.join("staging");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs: Vec<Job> = kit.get("/v1/jobs?limit=1000").await.unwrap();
        let copies: Vec<&Job> = jobs
            .iter()
            .filter(|j| {
                j.params["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/tmp/left-"))
            })
            .collect();
        let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
        let used = e.site.core.staging.used("kit");
        let settled = copies.iter().all(|j| j.state.is_terminal()) && left == 0 && used == 0;
        if settled && copies.len() == 3 {
            let mut paths: Vec<&str> = copies
                .iter()
                .map(|j| j.params["path"].as_str().unwrap())
                .collect();
            paths.sort();
            assert_eq!(paths, ["/tmp/left-0", "/tmp/left-2", "/tmp/left-4"]);
            break;
        }
        assert!(
            Instant::now() < end,
            "copies {copies:?}, {left} staged files, {used} bytes on kit's books"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    e.site.stop().await;
}
