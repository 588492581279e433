//! What a request costs as the site's history grows.
//!
//! A site (database on disk) and a memory-driver agent, both with their default
//! background periods (health sync and reconcile every 5 s), in this process.
//! The history is grown in stages through the public API only: crowd users'
//! VM requests that the agent cannot fit (each a durable job with its events,
//! failed at placement) and real VMs on the agent. At each stage a probe user
//! (150 VMs, a few hundred jobs of its own) measures:
//!
//! - a page of 100 of its jobs, and of the admin's whole job list;
//! - a page of 100 of its VMs, and of the admin's whole inventory;
//! - following one finished job's events to their end (`/v1/jobs/ID/events`);
//! - an exec round trip (submit, long-poll the end) on one of its VMs;
//! - a VM request and its release (placement and pool reuse among all VMs);
//! - the CPU the idle site and agent use over 10 s (their background loops).
//!
//! Writes bench/results/history.md. `bash bench/run.sh history`;
//! GVE_HISTORY_JOBS (default 100000) sets the last stage's job count.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::plugin::{Grants, PluginSpec};
use gve::site::model::{Job, JobState, SiteVm};
use gve::site::{Site, SiteConfig};
use gve_harness::target_dir;
use hyper::Method;
use serde_json::{json, Value};

const ADMIN: &str = "bench-site-admin-0123456789";
const AGENT: &str = "bench-agent-token-0123456789";
const PROBE_VMS: usize = 150;
const CROWD: usize = 8;
const SAMPLES: usize = 200;
const ROUND_TRIPS: usize = 40;

async fn submit(c: &Client, path: &str, body: Value) -> Job {
    let v: Value = c.call(Method::POST, path, Some(&body)).await.unwrap();
    serde_json::from_value(v).unwrap()
}

async fn new_vm(c: &Client) -> SiteVm {
    let j = submit(c, "/v1/vms", json!({ "main-memory-mib": 16 })).await;
    let j = common::job_ended(c, &j.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    serde_json::from_value(j.result.unwrap()).unwrap()
}

/// `n` of `what` from `clients` in parallel, each waited for; returns when done.
async fn many<F, Fut>(clients: &[Client], n: usize, what: F)
where
    F: Fn(Client) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let share = n / clients.len() + usize::from(i < n % clients.len());
        let (c, what) = (c.clone(), what.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..share {
                what(c.clone()).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until the site has no queued or running job.
async fn drained(site: &Site) {
    while site.core.store.active_job_count().unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Times `n` runs of `f`.
async fn timed<F, Fut>(n: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        out.push(t.elapsed());
    }
    out
}

async fn events_to_end(c: &Client, id: &str) {
    use http_body_util::BodyExt;
    let resp = c
        .get_stream(&format!("/v1/jobs/{id}/events"))
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        body.starts_with(b"id: "),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

/// Median and 99th percentile.
fn p50_p99(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| common::ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.99))
}

struct Stage {
    jobs: u64,
    vms: usize,
    db_mib: f64,
    rows: Vec<(&'static str, (f64, f64))>,
    idle_cpu: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let last: u64 = std::env::var("GVE_HISTORY_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let stages: [(u64, usize); 4] = [(0, 0), (last / 10, 500), (last / 2, 1500), (last, 3000)];
    let status = std::process::Command::new("bash")
        .arg(gve_harness::root().join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success());

    let spec = PluginSpec {
        bundle: target_dir().join("plugins/memory"),
        grants: Grants::default(),
        limits: Default::default(),
    };
    let endpoint = format!("memory:history-{}", uuid::Uuid::new_v4());
    let (agent, _, _adir) = common::agent_with(
        "memory",
        spec,
        &endpoint,
        AGENT,
        gve_harness::agent::reconcile_every(5_000),
    )
    .await;
    let dir = tempfile::tempdir_in(target_dir()).unwrap();
    let mut config = SiteConfig::new(dir.path().to_path_buf(), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.max_queued_jobs_per_user = 1_000_000;
    config.max_running_jobs_per_user = config.parallel_jobs;
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    let _: Value = admin
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({ "id": "a-0", "url": format!("http://{}", agent.addr), "token": AGENT })),
        )
        .await
        .unwrap();
    let probe = common::unlimited_user(&admin, "probe").await;
    let mut crowd = Vec::new();
    for i in 0..CROWD {
        crowd.push(common::unlimited_user(&admin, &format!("crowd-{i}")).await);
    }
    let mut probe_vms = Vec::new();
    for _ in 0..PROBE_VMS {
        probe_vms.push(new_vm(&probe).await);
    }
    let target_vm = probe_vms[0].id.clone();
    let mut grown_jobs = 0u64;
    let mut grown_vms = 0usize;
    let mut results = Vec::new();
    for (jobs, vms) in stages {
        // Grow: failed requests (the agent has 64 GiB; these ask for 1 TiB).
        let add = jobs.saturating_sub(grown_jobs) as usize;
        let t = Instant::now();
        many(&crowd, add, |c| async move {
            let _ = submit(&c, "/v1/vms", json!({ "main-memory-mib": 1u64 << 20 })).await;
        })
        .await;
        let more_vms = vms.saturating_sub(grown_vms);
        many(&crowd, more_vms, |c| async move {
            new_vm(&c).await;
        })
        .await;
        drained(&site).await;
        grown_jobs = jobs;
        grown_vms = vms;
        eprintln!(
            "stage: {jobs} jobs, {vms} crowd VMs (grown in {:.0} s)",
            t.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;

        let mut rows = Vec::new();
        let finished = submit(
            &probe,
            &format!("/v1/vms/{target_vm}/exec"),
            json!({ "argv": ["true"] }),
        )
        .await;
        common::job_ended(&probe, &finished.id).await;
        let p = &probe;
        let a = &admin;
        rows.push((
            "a page of 100 of the user's jobs",
            p50_p99(
                timed(SAMPLES, || async {
                    let _: Vec<Job> = p.get("/v1/jobs?limit=100").await.unwrap();
                })
                .await,
            ),
        ));
        rows.push((
            "a page of 100 of all jobs (admin)",
            p50_p99(
                timed(SAMPLES, || async {
                    let _: Vec<Job> = a.get("/v1/jobs?limit=100&all=true").await.unwrap();
                })
                .await,
            ),
        ));
        rows.push((
            "a page of 100 of the user's VMs",
            p50_p99(
                timed(SAMPLES, || async {
                    let v: Vec<SiteVm> = p.get("/v1/vms?limit=100").await.unwrap();
                    assert_eq!(v.len(), 100);
                })
                .await,
            ),
        ));
        rows.push((
            "a page of 100 of all VMs (admin)",
            p50_p99(
                timed(SAMPLES, || async {
                    let _: Vec<SiteVm> = a.get("/v1/vms?limit=100&all=true").await.unwrap();
                })
                .await,
            ),
        ));
        rows.push((
            "one finished job's events, to their end",
            p50_p99(timed(SAMPLES, || events_to_end(p, &finished.id)).await),
        ));
        let exec_path = format!("/v1/vms/{target_vm}/exec");
        rows.push((
            "exec round trip (submit, long-poll the end)",
            p50_p99(
                timed(ROUND_TRIPS, || async {
                    let j = submit(p, &exec_path, json!({ "argv": ["true"] })).await;
                    assert_eq!(common::job_ended(p, &j.id).await.state, JobState::Succeeded);
                })
                .await,
            ),
        ));
        rows.push((
            "VM request to running, then its release",
            p50_p99(
                timed(ROUND_TRIPS / 2, || async {
                    let vm = new_vm(p).await;
                    let r = submit(p, &format!("/v1/vms/{}/release", vm.id), json!({})).await;
                    assert_eq!(common::job_ended(p, &r.id).await.state, JobState::Succeeded);
                })
                .await,
            ),
        ));
        let (c0, t0) = (common::cpu_seconds("self"), Instant::now());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle_cpu = (common::cpu_seconds("self") - c0) / t0.elapsed().as_secs_f64();
        let db_mib = std::fs::metadata(dir.path().join("site.redb"))
            .map(|m| m.len() as f64 / (1 << 20) as f64)
            .unwrap_or(0.0);
        let total: u64 = site.core.store.job_count().unwrap();
        eprintln!(
            "  {total} jobs in the database, {db_mib:.1} MiB, idle {:.1}% of a core",
            idle_cpu * 100.0
        );
        for (name, (p50, p99)) in &rows {
            eprintln!("  {name}: p50 {p50:.2} ms, p99 {p99:.2} ms");
        }
        results.push(Stage {
            jobs: total,
            vms: vms + PROBE_VMS,
            db_mib,
            rows,
            idle_cpu,
        });
    }
    let rss_mib = common::rss_mib();
    // A restart on the grown database: open, index check, resume.
    let config = site.core.config.clone();
    let t = Instant::now();
    site.stop().await;
    let stop_s = t.elapsed().as_secs_f64();
    // `stop` waits up to 5 s for the database to close; past that, say how long
    // it took rather than fail.
    let t = Instant::now();
    let again = loop {
        match Site::start(config.clone()).await {
            Ok(s) => break s,
            Err(e) if t.elapsed() < Duration::from_secs(120) => {
                eprintln!("  restart refused: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let start_s = t.elapsed().as_secs_f64();
    eprintln!(
        "site stop {stop_s:.2} s, restart on the grown database: {start_s:.2} s; process RSS {rss_mib:.0} MiB"
    );
    again.stop().await;
    agent.stop().await;
    write(&results, stop_s, start_s, rss_mib);
}

fn write(stages: &[Stage], stop_s: f64, start_s: f64, rss_mib: f64) {
    let mut md = String::new();
    md.push_str("# A request's cost as the site's history grows\n\n");
    md.push_str(&format!(
        "`bench/history.rs` on {}, {} cores. A site (database on disk) and a memory-driver \
         agent in one process, default background periods (health sync, reconcile: 5 s). \
         History grown through the public API: failed VM requests from 8 users (durable jobs \
         with their events) and real VMs on the agent. A probe user with {PROBE_VMS} VMs \
         measures; p50 / p99 in ms over {SAMPLES} samples ({ROUND_TRIPS} exec round trips, \
         {} request/release pairs).\n\n",
        common::today(),
        common::cores(),
        ROUND_TRIPS / 2
    ));
    md.push_str("| measure |");
    for s in stages {
        md.push_str(&format!(" {} jobs, {} VMs |", s.jobs, s.vms));
    }
    md.push_str(" last p99 / first p99 |\n|---|");
    for _ in stages {
        md.push_str("---|");
    }
    md.push_str("---|\n");
    for (i, (name, _)) in stages[0].rows.iter().enumerate() {
        md.push_str(&format!("| {name} |"));
        for s in stages {
            let (p50, p99) = s.rows[i].1;
            md.push_str(&format!(" {p50:.2} / {p99:.2} |"));
        }
        let ratio = stages.last().unwrap().rows[i].1 .1 / stages[0].rows[i].1 .1;
        md.push_str(&format!(" {ratio:.2} |\n"));
    }
    md.push_str("| site database (MiB) |");
    for s in stages {
        md.push_str(&format!(" {:.1} |", s.db_mib));
    }
    md.push_str(" |\n| idle CPU of site + agent (% of a core) |");
    for s in stages {
        md.push_str(&format!(" {:.1} |", s.idle_cpu * 100.0));
    }
    md.push_str(" |\n");
    md.push_str(&format!(
        "\nThe site stopped in {stop_s:.2} s and restarted on the last stage's database in \
         {start_s:.2} s (open, index check, resuming nothing). Resident memory of the whole process (site, agent with \
         its plugin, and the bench's clients) at the end: {rss_mib:.0} MiB.\n"
    ));
    let path = gve_harness::root().join("bench/results/history.md");
    std::fs::write(&path, &md).unwrap();
    print!("{md}");
}
