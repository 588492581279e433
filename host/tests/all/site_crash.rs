//! kill -9 of a real `gve site` process at random points while 100 jobs run, then a
//! restart: every accepted job reaches a terminal state, nothing ran twice, no VM
//! leaked or was duplicated (the agents' registries agree with the site), and the
//! quota usage adds up. And at chosen points: after a quiet period, and between an
//! agent's unregistration and its release.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::{Job, SiteVm, UserView};
use hyper::Method;
use serde_json::{json, Value};

use crate::agent::{start_agent, TOKEN as AGENT_TOKEN};
use crate::site::ADMIN;
use crate::support::spec;

pub use crate::support::Service as SiteProcess;

/// Starts `gve site run`, its stderr appended to `log`; returns once it listens.
pub async fn spawn_site(config: &std::path::Path, log: &std::path::Path) -> SiteProcess {
    crate::support::spawn_service("site", config, log).await
}

/// A site's config (listen on 127.0.0.1, data in `data`, the test admin token, a
/// health check every `health_ms`, then `extra` lines) in a new directory; answers
/// the directory, the config's path and the log's.
pub fn site_files(
    health_ms: u64,
    extra: &str,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:0\"\ndata-dir = \"data\"\nadmin-token = \"{ADMIN}\"\nhealth-period-ms = {health_ms}\n{extra}"),
    )
    .unwrap();
    let log = dir.path().join("site.log");
    (dir, config, log)
}

/// The seed of a crash test's random choices: `GVE_CRASH_SEED`, or a new one
/// each run (printed, to replay it), so runs explore new crash points.
pub fn crash_seed(test: &str) -> u64 {
    let seed = std::env::var("GVE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("{test} seed {seed} (set GVE_CRASH_SEED to replay)");
    seed
}

/// A small deterministic generator (no dependency on a random crate).
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_100_jobs_loses_nothing_runs_nothing_twice_and_quotas_add_up() {
    let mut agents = Vec::new();
    for i in 0..2 {
        let endpoint = format!("memory:crash-{}-{i}", uuid::Uuid::new_v4());
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
    let (_dir, config, log) = site_files(300, "parallel-jobs = 8\n");
    let mut site = spawn_site(&config, &log).await;
    let admin = |s: &SiteProcess| Client::new(&s.url, Some(ADMIN.into())).unwrap();
    for (i, (a, _, _)) in agents.iter().enumerate() {
        let _: Value = admin(&site)
            .call(Method::POST, "/v1/agents", Some(&json!({ "id": format!("a-{i}"), "url": format!("http://{}", a.addr), "token": AGENT_TOKEN })))
            .await
            .unwrap();
    }
    let u: UserView = admin(&site)
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "grid", "quota": { "logical-cpus": 1000, "main-memory-mib": 1000000, "vms": 1000 } })))
        .await
        .unwrap();
    let token = u.token.unwrap();

    let seed = crash_seed("site crash test");
    let mut rng = Rng(seed);
    let mut accepted: Vec<String> = Vec::new();
    let mut kills = 0;
    // Kill after a random number (5-20) of submissions, a random 0-20 ms later, so
    // jobs are caught queued, placing, creating, starting or finishing.
    let mut next_kill = 5 + rng.below(16) as usize;
    let mut submitted = 0;
    let give_up = Instant::now() + Duration::from_secs(120);
    // At least 100 submissions and at least 5 kills, whatever the seed drew.
    while submitted < 100 || kills < 5 {
        assert!(
            Instant::now() < give_up,
            "submissions stalled at {submitted} (seed {seed}); site log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let user = Client::new(&site.url, Some(token.clone())).unwrap();
        // Bursts of 1-8 concurrent submissions: mostly requests, some manage jobs on
        // VMs the user holds.
        let mine: Vec<SiteVm> = user.get("/v1/vms").await.unwrap_or_default();
        let running: Vec<&SiteVm> = mine.iter().filter(|v| v.state == "running").collect();
        let mut burst = Vec::new();
        for k in 0..(1 + rng.below(8)) as usize {
            let (path, body) = if (submitted + k) % 3 == 2 && !running.is_empty() {
                let v = running[rng.below(running.len() as u64) as usize];
                match rng.below(3) {
                    0 => (format!("/v1/vms/{}/suspend", v.id), json!({})),
                    1 => (
                        format!("/v1/vms/{}/exec", v.id),
                        json!({ "argv": ["echo", "x"] }),
                    ),
                    _ => (format!("/v1/vms/{}/release", v.id), json!({})),
                }
            } else {
                (
                    "/v1/vms".to_string(),
                    json!({ "main-memory-mib": 64 + 64 * rng.below(3) }),
                )
            };
            let user = user.clone();
            burst.push(tokio::spawn(async move {
                user.call::<_, Job>(Method::POST, &path, Some(&body)).await
            }));
        }
        for b in burst {
            match b.await.unwrap() {
                Ok(j) => {
                    accepted.push(j.id);
                    submitted += 1;
                }
                Err(e) if e.status == 503 || e.kind == "unavailable" => {}
                Err(e) if e.status == 409 || e.status == 404 => submitted += 1,
                Err(e) => panic!("submission failed: {e}"),
            }
        }
        if submitted >= next_kill {
            tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
            // What anyone could see as finished before the kill stays so after it.
            let seen = finished(&admin(&site)).await;
            site.child.kill().await.unwrap(); // SIGKILL
            kills += 1;
            site = spawn_site(&config, &log).await;
            assert_unchanged(&seen, &finished(&admin(&site)).await, seed);
            next_kill = submitted + 5 + rng.below(16) as usize;
        }
    }

    // After a last restart, every accepted job ends.
    site.child.kill().await.unwrap();
    let site = spawn_site(&config, &log).await;
    let c = admin(&site);
    let end = Instant::now() + Duration::from_secs(60);
    let jobs: BTreeMap<String, Job> = loop {
        let all: Vec<Job> = c.get("/v1/jobs?all=true&limit=100000").await.unwrap();
        if all.iter().all(|j| j.state.is_terminal()) {
            break all.into_iter().map(|j| (j.id.clone(), j)).collect();
        }
        assert!(
            Instant::now() < end,
            "jobs still running: {:?}",
            all.iter()
                .filter(|j| !j.state.is_terminal())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for id in &accepted {
        assert!(jobs.contains_key(id), "accepted job {id} was lost");
    }
    // Let a health check see the agents' final state.
    for i in 0..2 {
        let _: Value = c
            .call(
                Method::POST,
                &format!("/v1/agents/a-{i}/check"),
                Some(&json!({})),
            )
            .await
            .unwrap();
    }
    // Nothing ran twice: no request created more than one VM.
    let mut on_agents: BTreeSet<(String, String)> = BTreeSet::new();
    let mut made_by: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (_, ac, _)) in agents.iter().enumerate() {
        let vms: Vec<Value> = ac.get("/v1/vms").await.unwrap();
        for v in vms {
            on_agents.insert((
                format!("a-{i}"),
                v["vm"]["id"].as_str().unwrap().to_string(),
            ));
            if let Some(j) = v["vm"]["labels"]["gve.job"].as_str() {
                *made_by.entry(j.to_string()).or_default() += 1;
            }
        }
    }
    for (job, n) in &made_by {
        assert_eq!(*n, 1, "job {job} created {n} VMs");
    }
    // No VM leaked or duplicated: the site knows exactly the agents' VMs.
    let site_vms: Vec<SiteVm> = c.get("/v1/vms?all=true").await.unwrap();
    let known: BTreeSet<(String, String)> = site_vms
        .iter()
        .map(|v| (v.agent.clone(), v.agent_vm.clone()))
        .collect();
    assert_eq!(known.len(), site_vms.len(), "duplicate VM records");
    let pool: Vec<&SiteVm> = site_vms.iter().filter(|v| v.owner.is_none()).collect();
    assert_eq!(known, on_agents, "site and agents disagree");
    // Quotas add up: usage is exactly what the user holds.
    let held: Vec<&SiteVm> = site_vms
        .iter()
        .filter(|v| v.owner.as_deref() == Some("grid"))
        .collect();
    let user: UserView = c.get("/v1/users/grid").await.unwrap();
    assert_eq!(user.usage.vms as usize, held.len());
    assert_eq!(
        user.usage.main_memory_mib,
        held.iter().map(|v| v.main_memory_mib).sum::<u64>()
    );
    let succeeded_requests = jobs
        .values()
        .filter(|j| {
            j.kind == gve::site::model::JobKind::Request
                && j.state == gve::site::model::JobState::Succeeded
        })
        .count();
    // Some kills caught jobs unfinished: the restarted site resumed them.
    let resumed: usize = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| l.split("resumed=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    assert!(
        resumed > 0,
        "no kill caught a job unfinished (seed {seed}): {}",
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| !l.contains(" INFO "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{} jobs accepted, {kills} kills, {resumed} jobs resumed after restarts; {} jobs recorded, {succeeded_requests} requests succeeded; {} VMs held, {} in the pool",
        accepted.len(),
        jobs.len(),
        held.len(),
        pool.len()
    );
    drop(site);
    for (a, _, _) in agents {
        a.stop().await;
    }
}

/// Jobs that have ended, by id.
async fn finished(c: &Client) -> BTreeMap<String, Job> {
    let all: Vec<Job> = c.get("/v1/jobs?all=true&limit=100000").await.unwrap();
    all.into_iter()
        .filter(|j| j.state.is_terminal())
        .map(|j| (j.id.clone(), j))
        .collect()
}

/// Every job in `before` is still there with the same end.
fn assert_unchanged(before: &BTreeMap<String, Job>, after: &BTreeMap<String, Job>, seed: u64) {
    for (id, b) in before {
        let a = after
            .get(id)
            .unwrap_or_else(|| panic!("seed {seed}: finished job {id} is gone after a restart"));
        assert_eq!(
            (a.state, &a.result, &a.error),
            (b.state, &b.result, &b.error),
            "seed {seed}: finished job {id} ({}) changed after a restart",
            b.kind.as_str()
        );
    }
}

/// Each kind of job succeeds, the site stays quiet a while, then is killed with -9
/// and restarted: no finished job changes its end, and a copied-in file is still
/// what the guest has (its staged input was kept until its end was durable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_a_quiet_period_changes_no_finished_job() {
    let (agent, _, _adir) = start_agent(
        "memory",
        spec("memory", Default::default()),
        &format!("memory:quiet-{}", uuid::Uuid::new_v4()),
        60_000,
    )
    .await;
    let (_dir, config, log) = site_files(60000, "");
    let mut site = spawn_site(&config, &log).await;
    let admin = |s: &SiteProcess| Client::new(&s.url, Some(ADMIN.into())).unwrap();
    let _: Value = admin(&site)
        .call(Method::POST, "/v1/agents", Some(&json!({ "id": "a-0", "url": format!("http://{}", agent.addr), "token": AGENT_TOKEN })))
        .await
        .unwrap();
    let u: UserView = admin(&site)
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "quiet" })))
        .await
        .unwrap();
    let token = u.token.unwrap();
    let user = |s: &SiteProcess| Client::new(&s.url, Some(token.clone())).unwrap();
    let wait = |c: Client, id: String| async move {
        let j: Job = c
            .get(&format!("/v1/jobs/{id}?wait-ms=30000"))
            .await
            .unwrap();
        assert_eq!(j.state, gve::site::model::JobState::Succeeded, "{j:?}");
        j
    };
    let request = json!({ "template": "debian-12", "main-memory-mib": 128 });
    let j: Job = user(&site)
        .call(Method::POST, "/v1/vms", Some(&request))
        .await
        .unwrap();
    let vm = wait(user(&site), j.id).await.result.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut kinds = vec!["request".to_string()];
    let steps: Vec<(&str, Value)> = vec![
        ("copy-in", json!(null)),
        ("exec", json!({ "argv": ["echo", "hi"] })),
        ("copy-out", json!({ "path": "/tmp/q.txt" })),
        ("suspend", json!({})),
        ("resume", json!({})),
        ("clone", json!({ "name": "quiet-copy" })),
        ("release", json!({})),
    ];
    for (kind, body) in steps {
        let c = user(&site);
        let j: Job = match kind {
            "copy-in" => c
                .put_stream(
                    &format!("/v1/vms/{vm}/files?path=/tmp/q.txt"),
                    &[],
                    gve::api::full(bytes::Bytes::from_static(b"quiet data")),
                )
                .await
                .unwrap(),
            _ => c
                .call(Method::POST, &format!("/v1/vms/{vm}/{kind}"), Some(&body))
                .await
                .unwrap(),
        };
        wait(c, j.id).await;
        kinds.push(kind.to_string());
        // Quiet: nothing else is written, so only the job's own commit can have
        // made its end durable.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let seen = finished(&admin(&site)).await;
        site.child.kill().await.unwrap();
        site = spawn_site(&config, &log).await;
        // Resumed jobs (none should be) get a moment to run before comparing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_unchanged(&seen, &finished(&admin(&site)).await, 0);
        if kind == "copy-in" {
            // The file arrived, and stays arrived.
            let out: Job = user(&site)
                .call(
                    Method::POST,
                    &format!("/v1/vms/{vm}/copy-out"),
                    Some(&json!({ "path": "/tmp/q.txt" })),
                )
                .await
                .unwrap();
            let out = wait(user(&site), out.id).await;
            assert_eq!(out.result.unwrap()["size"], 10);
        }
    }
    let resumed: usize = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| l.split("resumed=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    assert_eq!(resumed, 0, "a quiet site had unfinished jobs at its kill");
    eprintln!("no finished job changed after a kill -9 following each of {kinds:?}");
    let _ = site.child.start_kill();
    agent.stop().await;
}

/// An agent unregistered while its release is on its way, the site killed with -9
/// at that moment (the unregistration durable, the release not taken): the
/// restarted site does not list the agent again, and sends the release it owes in
/// its first health round, so the agent stops naming a site that let it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_an_unregistration_and_its_release_still_releases_the_agent() {
    use crate::proxy::{pick, Proxy, Rule};

    let (agent, agent_client, _adir) = start_agent(
        "memory",
        spec("memory", Default::default()),
        &format!("memory:unreg-{}", uuid::Uuid::new_v4()),
        60_000,
    )
    .await;
    let proxy = Proxy::start(agent.addr).await;
    let (_dir, config, log) = site_files(300, "");
    let mut site = spawn_site(&config, &log).await;
    let admin = |s: &SiteProcess| Client::new(&s.url, Some(ADMIN.into())).unwrap();
    let _: Value = admin(&site)
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({ "id": "a-0", "url": proxy.url(), "token": AGENT_TOKEN })),
        )
        .await
        .unwrap();
    let serving = || {
        let c = agent_client.clone();
        async move { c.get::<Value>("/v1/site").await.unwrap()["site"].clone() }
    };
    assert_eq!(serving().await["agent-id"], "a-0");

    // The release is held on its way to the agent, and the site killed then.
    let release = || pick(|m, p| m == Method::DELETE && p.starts_with("/v1/site"));
    proxy.set(Rule::Hold(release()));
    let c = admin(&site);
    let unregister = tokio::spawn(async move {
        c.call::<(), Value>(Method::DELETE, "/v1/agents/a-0", None)
            .await
    });
    proxy.wait_held(Duration::from_secs(10)).await;
    site.child.kill().await.unwrap();
    assert!(
        unregister.await.unwrap().is_err(),
        "answered after a kill -9"
    );
    // The dead site's release is refused, never delivered: only the restarted
    // site can release the agent.
    proxy.set(Rule::Refuse(release()));
    let t = Instant::now();
    while proxy.held() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the held release stays held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        serving().await["agent-id"],
        "a-0",
        "released by the killed site"
    );
    proxy.set(Rule::Pass);

    site = spawn_site(&config, &log).await;
    let agents: Vec<Value> = admin(&site).get("/v1/agents").await.unwrap();
    assert!(agents.is_empty(), "the unregistration was lost: {agents:?}");
    // Within 3 s: its first round (the next that sends releases owed is 12 rounds
    // of 300 ms later).
    let t = Instant::now();
    while !serving().await.is_null() {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the restarted site did not send the release it owes; site log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = site.child.start_kill();
    agent.stop().await;
}
