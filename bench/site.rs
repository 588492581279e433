//! The site service's own costs.
//!
//! 1. Durable job submissions per second over HTTP (target ≥ 2,000/s on 2 cores):
//!    64 concurrent clients submit VM requests to a site whose database is a file on
//!    disk (every accepted job committed durably before its `202`); the site's
//!    runners work the jobs off meanwhile. Also the same through the in-process
//!    submitter, without HTTP.
//! 2. Request → running latency added by the site: a VM requested through the site
//!    (job: place, create, start, long-polled) against the same two operations sent
//!    to the agent directly, on the memory driver (so the hypervisor adds nothing).
//!
//! Writes bench/results/site.md. Run with `bash bench/run.sh site`.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use gve::agent::model::Operation;
use gve::agent::Agent;
use gve::api::client::Client;
use gve::plugin::{Grants, PluginSpec};
use gve::site::model::{Job, UserView};
use gve::site::{Site, SiteConfig};
use gve_harness::target_dir;
use hyper::Method;
use serde_json::json;

const ADMIN: &str = "bench-site-admin-0123456789";
const AGENT: &str = "bench-agent-token-0123456789";
const SUBMISSIONS: usize = 20_000;
const CLIENTS: usize = 64;
/// Concurrent HTTP clients: group commit batches what arrives during one commit.
const CLIENT_COUNTS: [usize; 3] = [16, 64, 256];
const LATENCY_ROUNDS: usize = 40;
/// Exec round trips per path.
const EXEC_ROUNDS: usize = 200;

async fn agent() -> (Agent, Client, tempfile::TempDir) {
    let spec = PluginSpec {
        bundle: target_dir().join("plugins/memory"),
        grants: Grants::default(),
        limits: Default::default(),
    };
    let endpoint = format!("memory:bench-{}", uuid::Uuid::new_v4());
    common::agent("memory", spec, &endpoint, AGENT).await
}

async fn site(dir: &std::path::Path) -> (Site, Client) {
    let mut config = SiteConfig::new(dir.to_path_buf(), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    if let Ok(p) = std::env::var("GVE_BENCH_PARALLEL") {
        config.parallel_jobs = p.parse().unwrap();
    }
    // One user submits everything: measure the site's throughput, not its
    // fairness between users.
    config.max_running_jobs_per_user = config.parallel_jobs;
    config.max_queued_jobs_per_user = 1_000_000;
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    (site, admin)
}

async fn user(admin: &Client) -> Client {
    let u: UserView = admin
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "bench", "quota": { "logical-cpus": 1u64 << 20, "main-memory-mib": 1u64 << 40, "vms": 1u64 << 20 } })))
        .await
        .unwrap();
    Client::new(admin.base(), u.token).unwrap()
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() / 4], v[3 * v.len() / 4])
}

/// Time from `since` until the site has no queued or running job.
async fn all_ended(s: &Site, since: Instant) -> std::time::Duration {
    let end = Instant::now() + std::time::Duration::from_secs(600);
    while s.core.store.active_job_count().unwrap() > 0 {
        assert!(Instant::now() < end, "jobs did not end within 600 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    since.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Part 1: durable submissions over HTTP at each client count, then in-process;
/// each as (clients, submissions/s, ended/s), and the in-process pair.
async fn submissions() -> (Vec<(usize, f64, f64)>, f64, f64) {
    // 1. Submissions: no agent, so each request fails fast at placement; its runner
    //    still writes two more transactions (running, failed) per job meanwhile.
    let dir = tempfile::tempdir_in(target_dir()).unwrap();
    let (s, admin) = site(dir.path()).await;
    let u = user(&admin).await;
    let mut http_rates = Vec::new();
    for clients in CLIENT_COUNTS {
        let per = SUBMISSIONS / clients;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let u = u.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per {
                    let _: Job = u
                        .call(
                            Method::POST,
                            "/v1/vms",
                            Some(&json!({ "main-memory-mib": 64 })),
                        )
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rate = (per * clients) as f64 / t.elapsed().as_secs_f64();
        // The runners work the jobs off meanwhile; a row ends when every job has.
        let ended = (per * clients) as f64 / all_ended(&s, t).await.as_secs_f64();
        eprintln!("HTTP, {clients} clients: {rate:.0} submissions/s, {ended:.0} ended/s");
        http_rates.push((clients, rate, ended));
    }
    let core = s.core.clone();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let core = core.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..SUBMISSIONS / CLIENTS {
                let job = gve::site::jobs::new_job(
                    "bench",
                    gve::site::model::JobKind::Request,
                    None,
                    json!({ "main-memory-mib": 64 }),
                );
                core.submitter.submit(job, None).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let direct = t.elapsed();
    let direct_rate = (SUBMISSIONS / CLIENTS * CLIENTS) as f64 / direct.as_secs_f64();
    let direct_ended =
        (SUBMISSIONS / CLIENTS * CLIENTS) as f64 / all_ended(&s, t).await.as_secs_f64();
    eprintln!("in-process: {direct_rate:.0} submissions/s, {direct_ended:.0} ended/s");
    // Every job really ran: a request with no agent fails at placement.
    let jobs = s.core.store.jobs(None, usize::MAX, None).unwrap().items;
    let failed = jobs
        .iter()
        .filter(|j| j.state == gve::site::model::JobState::Failed && j.error.is_some())
        .count();
    let submitted = http_rates
        .iter()
        .map(|(clients, _, _)| SUBMISSIONS / clients * clients)
        .sum::<usize>()
        + SUBMISSIONS / CLIENTS * CLIENTS;
    assert_eq!(
        (jobs.len(), failed),
        (submitted, submitted),
        "every job submitted ran and failed at placement"
    );
    s.stop().await;
    drop(dir);
    (http_rates, direct_rate, direct_ended)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let status = std::process::Command::new("bash")
        .arg(gve_harness::root().join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success());

    let latency_only = std::env::var_os("GVE_SITE_LATENCY_ONLY").is_some();
    let (http_rates, direct_rate, direct_ended) = match latency_only {
        true => (Vec::new(), 0.0, 0.0),
        false => submissions().await,
    };
    // Under a profiler (bash bench/run.sh site-flame): the submissions only,
    // and no results written from a run the profiler slowed.
    if std::env::var_os("GVE_SITE_PROFILE").is_some() {
        return;
    }

    // 2. Latency: one memory agent, registered with a fresh site.
    let dir = tempfile::tempdir_in(target_dir()).unwrap();
    let (a, _, _agent_dir) = agent().await;
    let (s, admin) = site(&dir.path().join("site")).await;
    let _: serde_json::Value = admin
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({ "id": "a", "url": format!("http://{}", a.addr), "token": AGENT })),
        )
        .await
        .unwrap();
    let u = user(&admin).await;
    let ac = Client::new(&format!("http://{}", a.addr), Some(AGENT.into())).unwrap();
    let (mut via_site, mut direct_t) = (Vec::new(), Vec::new());
    for i in 0..LATENCY_ROUNDS {
        for path in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let t = Instant::now();
            if path == 0 {
                let j: Job = u
                    .call(
                        Method::POST,
                        "/v1/vms",
                        Some(&json!({ "main-memory-mib": 64, "name": format!("s-{i}") })),
                    )
                    .await
                    .unwrap();
                let done: Job = u
                    .get(&format!("/v1/jobs/{}?wait-ms=10000", j.id))
                    .await
                    .unwrap();
                assert!(
                    done.state == gve::site::model::JobState::Succeeded,
                    "{done:?}"
                );
                via_site.push(t.elapsed());
            } else {
                let op: Operation = ac
                    .call(
                        Method::POST,
                        "/v1/vms",
                        Some(&json!({ "name": format!("d-{i}"), "main-memory-mib": 64 })),
                    )
                    .await
                    .unwrap();
                let op: Operation = ac
                    .get(&format!("/v1/operations/{}?wait-ms=10000", op.id))
                    .await
                    .unwrap();
                let vm = op.result.unwrap();
                let op: Operation = ac
                    .call(
                        Method::POST,
                        &format!("/v1/vms/{}/start", vm.id),
                        Some(&json!({})),
                    )
                    .await
                    .unwrap();
                let op: Operation = ac
                    .get(&format!("/v1/operations/{}?wait-ms=10000", op.id))
                    .await
                    .unwrap();
                assert!(op.result.is_some());
                direct_t.push(t.elapsed());
            }
        }
    }
    // Exec of `true` on one of the site's VMs: the user's job (answered at its
    // end, `?wait-ms`) against the agent's operation (the same).
    let vm: Job = u
        .call(
            Method::POST,
            "/v1/vms?wait-ms=10000",
            Some(&json!({ "main-memory-mib": 64, "name": "exec" })),
        )
        .await
        .unwrap();
    let vm_id = vm.vm.clone().unwrap();
    let site_vm: gve::site::model::SiteVm = u.get(&format!("/v1/vms/{vm_id}")).await.unwrap();
    let (mut exec_site, mut exec_agent) = (Vec::new(), Vec::new());
    for i in 0..EXEC_ROUNDS {
        for path in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let t = Instant::now();
            if path == 0 {
                let j: Job = u
                    .call(
                        Method::POST,
                        &format!("/v1/vms/{vm_id}/exec?wait-ms=10000"),
                        Some(&json!({ "argv": ["true"] })),
                    )
                    .await
                    .unwrap();
                assert_eq!(j.state, gve::site::model::JobState::Succeeded, "{j:?}");
                exec_site.push(t.elapsed());
            } else {
                let op: Operation = ac
                    .call(
                        Method::POST,
                        &format!("/v1/vms/{}/exec?wait-ms=10000", site_vm.agent_vm),
                        Some(&json!({ "argv": ["true"] })),
                    )
                    .await
                    .unwrap();
                assert_eq!(op.state, gve::agent::model::OpState::Succeeded, "{op:?}");
                exec_agent.push(t.elapsed());
            }
        }
    }
    s.stop().await;
    a.stop().await;
    let (sv, dv) = (median(via_site), median(direct_t));
    let (es, ea) = (median(exec_site), median(exec_agent));
    if latency_only {
        eprintln!(
            "request: site {:.2} ms, agent {:.2} ms; exec: site {:.2} ({:.2}-{:.2}) ms, agent {:.2} ({:.2}-{:.2}) ms",
            ms(sv.0), ms(dv.0), ms(es.0), ms(es.1), ms(es.2), ms(ea.0), ms(ea.1), ms(ea.2)
        );
        return;
    }
    let date = std::process::Command::new("date")
        .arg("-I")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut md = String::from("# Site service: durable submissions and added latency\n\n");
    md += &format!(
        "Measured {date} on {} cores; the site database is a redb file in the build directory, every job committed\n\
         durably (group commit) before its `202`. Produced by `bash bench/run.sh site`.\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    md += &format!("## Durable job submissions (about {SUBMISSIONS} per row; target ≥ 5,000/s)\n\n| path | concurrent clients | submissions/s (`202`, job durable) | jobs ended/s (all run to their end) |\n|---|---|---|---|\n");
    for (clients, rate, ended) in &http_rates {
        md += &format!("| HTTP `POST /v1/vms` (identify, quota check, group commit, `202`) | {clients} | {rate:.0} | {ended:.0} |\n");
    }
    md += &format!(
        "| in-process submitter (no HTTP) | {CLIENTS} | {direct_rate:.0} | {direct_ended:.0} |\n\n"
    );
    md += "Each commit waits for the disk (fsync) and takes what arrived meanwhile (group commit). The site's\n\
           runners work the jobs off at the same time (each request fails at placement: no agent); their\n\
           transitions go through the same writer: `running` (lazily durable) and the end (durable) join the\n\
           submissions' batches, and a request that finds the pool empty writes nothing to claim. \"Ended/s\"\n\
           counts until the last job of the row has ended. The hot path's flame graph is `site-flame.svg`\n\
           (`bash bench/run.sh site-flame`).\n\n";
    md += &format!("## Request → running, median (IQR) of {LATENCY_ROUNDS}, memory driver\n\n| path | latency |\n|---|---|\n");
    md += &format!("| site: `POST /v1/vms` job (place, create, start), long-polled | {:.1} ms ({:.1}–{:.1}) |\n", ms(sv.0), ms(sv.1), ms(sv.2));
    md += &format!(
        "| agent directly: create + start operations, long-polled | {:.1} ms ({:.1}–{:.1}) |\n",
        ms(dv.0),
        ms(dv.1),
        ms(dv.2)
    );
    md += &format!("| added by the site | {:+.1} ms |\n", ms(sv.0) - ms(dv.0));
    md += &format!("\n## Exec of `true` on a VM, answered at its end (`?wait-ms`), median (IQR) of {EXEC_ROUNDS}, memory driver\n\n| path | round trip |\n|---|---|\n");
    md += &format!("| site: `POST /v1/vms/{{id}}/exec` job (recorded `running` at once and started while that reaches the disk, the end durable before the answer; the agent's operation alike) | {:.2} ms ({:.2}–{:.2}) |\n", ms(es.0), ms(es.1), ms(es.2));
    md += &format!("| agent directly: `POST /v1/vms/{{id}}/exec` operation (durable at its start and end) | {:.2} ms ({:.2}–{:.2}) |\n", ms(ea.0), ms(ea.1), ms(ea.2));
    md += &format!("| added by the site | {:+.2} ms |\n", ms(es.0) - ms(ea.0));
    eprintln!("{md}");
    std::fs::write(gve_harness::root().join("bench/results/site.md"), md).unwrap();
}
