//! The soak: a site and two memory-driver agents in this process under a steady
//! mixed load from many users, for `GVE_SOAK_SECONDS` (default 1800), loopback
//! only. Each user, in a loop: requests a VM, runs commands, copies a file in and
//! out (checking it), suspends and resumes, asks for more VMs than their quota
//! allows (the refusals are the load's own), and releases. Retention is short
//! (two minutes) so that history and copied-out files are removed as they are made.
//!
//! Every 30 s it samples resident memory, open files and the size of each
//! database and of staging. After the warm-up (the first sixth) they must stay
//! flat, and no error may occur but the ones the load asked for; the verdict and
//! the samples go to bench/results/soak.md, and the run fails when either is not
//! kept. Run with `bash bench/run.sh soak`.

#[path = "common.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::plugin::{Grants, PluginSpec};
use gve::site::model::{Job, JobState, UserView};
use gve::site::{Site, SiteConfig};
use gve_harness::target_dir;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const ADMIN: &str = "soak-site-admin-0123456789";
const AGENT: &str = "soak-agent-token-0123456789";
const USERS: usize = 12;
/// Each user's VM quota; a burst asks for one more.
const QUOTA_VMS: u64 = 2;
/// Retention of jobs, events, operations and audit, seconds.
const KEEP_S: u64 = 120;
const SAMPLE: Duration = Duration::from_secs(30);
/// Pause between one user's steps.
const PACE: Duration = Duration::from_millis(150);

#[derive(Default)]
struct Counts {
    jobs: AtomicU64,
    asked_refusals: AtomicU64,
    errors: AtomicU64,
}

struct Sample {
    at_s: u64,
    rss_mib: f64,
    fds: usize,
    site_db_mib: f64,
    agent_db_mib: f64,
    staging_kib: u64,
    jobs: u64,
    kept_jobs: u64,
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path).map_or(0, |d| d.flatten().map(|e| size(&e.path())).sum())
}

async fn submit(c: &Client, path: &str, body: Value) -> Result<Job, gve::api::ApiError> {
    c.call(Method::POST, path, Some(&body)).await
}

async fn wait(c: &Client, id: &str) -> Job {
    loop {
        let j: Job = c
            .get(&format!("/v1/jobs/{id}?wait-ms=20000"))
            .await
            .unwrap();
        if j.state.is_terminal() {
            return j;
        }
    }
}

/// Runs one job to its end; a failure is counted as an error and logged.
async fn run(c: &Client, counts: &Counts, path: &str, body: Value) -> Option<Job> {
    counts.jobs.fetch_add(1, Ordering::Relaxed);
    match submit(c, path, body).await {
        Ok(j) => {
            let j = wait(c, &j.id).await;
            if j.state == JobState::Succeeded {
                return Some(j);
            }
            eprintln!("soak: {path}: {:?}", j.error);
        }
        Err(e) => eprintln!("soak: {path}: {e}"),
    }
    counts.errors.fetch_add(1, Ordering::Relaxed);
    None
}

/// One user's round; returns when it ended.
async fn round(c: &Client, counts: &Counts, n: u64) {
    let Some(j) = run(c, counts, "/v1/vms", json!({ "main-memory-mib": 64 })).await else {
        return;
    };
    let vm = j.result.unwrap()["id"].as_str().unwrap().to_string();
    tokio::time::sleep(PACE).await;
    for i in 0..3 {
        run(
            c,
            counts,
            &format!("/v1/vms/{vm}/exec"),
            json!({ "argv": ["echo", format!("round {n} step {i}")] }),
        )
        .await;
        tokio::time::sleep(PACE).await;
    }
    // A file in and back out, checked.
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i as u64 * 31 + n) as u8).collect();
    let want = hex::encode(Sha256::digest(&data));
    counts.jobs.fetch_add(1, Ordering::Relaxed);
    let put: Result<Job, _> = c
        .put_stream(
            &format!("/v1/vms/{vm}/files?path=/tmp/f"),
            &[],
            gve::api::full(bytes::Bytes::from(data)),
        )
        .await;
    match put {
        Ok(j) if wait(c, &j.id).await.state == JobState::Succeeded => {}
        other => {
            eprintln!("soak: copy-in: {:?}", other.err());
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    tokio::time::sleep(PACE).await;
    if let Some(out) = run(
        c,
        counts,
        &format!("/v1/vms/{vm}/copy-out"),
        json!({ "path": "/tmp/f" }),
    )
    .await
    {
        let body = c.get_stream(&format!("/v1/jobs/{}/content", out.id)).await;
        let got = match body {
            Ok(r) => r.into_body().collect().await.map(|b| b.to_bytes()).ok(),
            Err(_) => None,
        };
        if got.map(|b| hex::encode(Sha256::digest(&b))) != Some(want) {
            eprintln!("soak: copy-out content differs");
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    tokio::time::sleep(PACE).await;
    for action in ["suspend", "resume"] {
        run(c, counts, &format!("/v1/vms/{vm}/{action}"), json!({})).await;
        tokio::time::sleep(PACE).await;
    }
    // More VMs than the quota leaves: exactly the excess is refused.
    if n.is_multiple_of(3) {
        let mut held = Vec::new();
        for _ in 0..QUOTA_VMS {
            counts.jobs.fetch_add(1, Ordering::Relaxed);
            match submit(c, "/v1/vms", json!({ "main-memory-mib": 64 })).await {
                Ok(j) => held.push(j.id),
                Err(e) if e.status == 403 => {
                    counts.asked_refusals.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("soak: burst: {e}");
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // One VM was held already, so the last of the burst must have been refused.
        if held.len() as u64 != QUOTA_VMS - 1 {
            eprintln!(
                "soak: burst: {} accepted, expected {}",
                held.len(),
                QUOTA_VMS - 1
            );
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
        for id in held {
            let j = wait(c, &id).await;
            if let Some(v) = j.result.as_ref().and_then(|r| r["id"].as_str()) {
                run(c, counts, &format!("/v1/vms/{v}/release"), json!({})).await;
            }
        }
    }
    run(c, counts, &format!("/v1/vms/{vm}/release"), json!({})).await;
    tokio::time::sleep(PACE).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let total = Duration::from_secs(
        std::env::var("GVE_SOAK_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1800),
    );
    let warm = total / 6;
    let dir = tempfile::tempdir().unwrap();
    let spec = PluginSpec {
        bundle: target_dir().join("plugins/memory"),
        grants: Grants::default(),
        limits: Default::default(),
    };
    let mut agents = Vec::new();
    for i in 0..2 {
        let (a, _, d) = common::agent_with(
            "memory",
            spec.clone(),
            &format!("memory:soak-{i}"),
            AGENT,
            |c| {
                c.operation_retention_seconds = KEEP_S;
                c.audit_retention_seconds = KEEP_S;
                if let Some(d) = &mut c.driver {
                    d.reconcile_period_ms = 5_000;
                }
            },
        )
        .await;
        agents.push((a, d));
    }
    let mut config = SiteConfig::new(dir.path().join("site"), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.job_retention_seconds = KEEP_S;
    config.audit_retention_seconds = KEEP_S;
    config.copy_output_retention_seconds = KEEP_S;
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    for (i, (a, _)) in agents.iter().enumerate() {
        let _: Value = admin
            .call(Method::POST, "/v1/agents", Some(&json!({ "id": format!("a-{i}"), "url": format!("http://{}", a.addr), "token": AGENT })))
            .await
            .unwrap();
    }
    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for u in 0..USERS {
        let v: UserView = admin
            .call(Method::POST, "/v1/users", Some(&json!({ "name": format!("u{u}"), "quota": { "logical-cpus": 64, "main-memory-mib": 65536, "vms": QUOTA_VMS } })))
            .await
            .unwrap();
        let c = Client::new(admin.base(), v.token).unwrap();
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while start.elapsed() < total {
                round(&c, &counts, n).await;
                n += 1;
            }
        }));
    }
    let site_db = dir.path().join("site/site.redb");
    let agent_dbs: Vec<_> = agents
        .iter()
        .map(|(_, d)| d.path().join("agent.redb"))
        .collect();
    let staging = dir.path().join("site/staging");
    let mut samples = Vec::new();
    loop {
        let s = Sample {
            at_s: start.elapsed().as_secs(),
            rss_mib: common::rss_mib(),
            fds: open_files(),
            site_db_mib: size(&site_db) as f64 / 1048576.0,
            agent_db_mib: agent_dbs.iter().map(|p| size(p)).sum::<u64>() as f64 / 1048576.0,
            staging_kib: dir_size(&staging) / 1024,
            jobs: counts.jobs.load(Ordering::Relaxed),
            kept_jobs: site.core.store.job_count().unwrap_or(0),
        };
        eprintln!(
            "soak: {:>5} s  rss {:.1} MiB  fds {}  site.redb {:.1} MiB  agent.redb {:.1} MiB  staging {} KiB  jobs {} (kept {})  errors {}",
            s.at_s, s.rss_mib, s.fds, s.site_db_mib, s.agent_db_mib, s.staging_kib, s.jobs, s.kept_jobs,
            counts.errors.load(Ordering::Relaxed)
        );
        samples.push(s);
        if start.elapsed() >= total {
            break;
        }
        tokio::time::sleep(SAMPLE.min(total.saturating_sub(start.elapsed()))).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    site.stop().await;
    for (a, _) in agents {
        a.stop().await;
    }
    report(&samples, &counts, warm, elapsed);
}

/// Writes bench/results/soak.md; fails the run when a promise is not kept.
fn report(samples: &[Sample], counts: &Counts, warm: Duration, elapsed: Duration) {
    // Flat: the highest of the last third is no more than a quarter (plus slack
    // for allocator, page and sweep granularity) above the highest of the sixth
    // right after the warm-up. Highest against highest, since retention removes
    // in sweeps (a saw-tooth, not a trend).
    let w = warm.as_secs();
    let end = samples.last().map_or(0, |s| s.at_s);
    let high = |from: u64, to: u64, f: &dyn Fn(&Sample) -> f64| {
        samples
            .iter()
            .filter(|s| s.at_s >= from && s.at_s <= to)
            .map(f)
            .fold(0.0, f64::max)
    };
    let base = |f: &dyn Fn(&Sample) -> f64| high(w, 2 * w, f);
    let last = |f: &dyn Fn(&Sample) -> f64| high(end - end / 3, end, f);
    let rss = |s: &Sample| s.rss_mib;
    let fds = |s: &Sample| s.fds as f64;
    let sdb = |s: &Sample| s.site_db_mib;
    let adb = |s: &Sample| s.agent_db_mib;
    let stg = |s: &Sample| s.staging_kib as f64;
    let checks = [
        (
            "resident memory (MiB)",
            base(&rss),
            last(&rss),
            base(&rss) * 1.25 + 16.0,
        ),
        ("open files", base(&fds), last(&fds), base(&fds) + 16.0),
        (
            "site.redb (MiB)",
            base(&sdb),
            last(&sdb),
            base(&sdb) * 1.25 + 4.0,
        ),
        (
            "agent.redb, both (MiB)",
            base(&adb),
            last(&adb),
            base(&adb) * 1.25 + 4.0,
        ),
        (
            "staging (KiB)",
            base(&stg),
            last(&stg),
            base(&stg) * 1.25 + 2048.0,
        ),
    ];
    let errors = counts.errors.load(Ordering::Relaxed);
    let jobs = counts.jobs.load(Ordering::Relaxed);
    let mut md = String::new();
    md += "# Soak: a site, two agents, many users, steady mixed load\n\n";
    md += &format!(
        "`bash bench/run.sh soak` on {}, {} cores: {USERS} users for {:.0} s against a site and two \
         memory-driver agents in one process (loopback). Each user in a loop requests a VM, runs three \
         commands, copies 64 KiB in and out (checked by SHA-256), suspends, resumes, every third round \
         asks for more VMs than their quota of {QUOTA_VMS} (the refusals are the load's own), and \
         releases. Jobs, events, operations, audit and copied-out files are kept {KEEP_S} s. Flat means: the highest \
         sample of the last third is at most a quarter (plus a little slack) above the highest of the \
         sixth right after the warm-up ({} s).\n\n",
        common::today(),
        common::cores(),
        elapsed.as_secs_f64(),
        warm.as_secs()
    );
    md += &format!(
        "Jobs submitted: **{jobs}** ({:.1}/s); refusals the load asked for: {}; other errors: **{errors}**.\n\n",
        jobs as f64 / elapsed.as_secs_f64(),
        counts.asked_refusals.load(Ordering::Relaxed)
    );
    md += "| measure | highest after warm-up | highest in last third | bound | flat |\n|---|---|---|---|---|\n";
    let mut flat = true;
    for (name, at, high, bound) in checks {
        let ok = high <= bound;
        flat &= ok;
        md += &format!(
            "| {name} | {at:.1} | {high:.1} | {bound:.1} | {} |\n",
            if ok { "yes" } else { "**no**" }
        );
    }
    md += "\n## Samples\n\n| s | RSS MiB | open files | site.redb MiB | agent.redb MiB | staging KiB | jobs submitted | jobs kept |\n|---|---|---|---|---|---|---|---|\n";
    for s in samples {
        md += &format!(
            "| {} | {:.1} | {} | {:.1} | {:.1} | {} | {} | {} |\n",
            s.at_s,
            s.rss_mib,
            s.fds,
            s.site_db_mib,
            s.agent_db_mib,
            s.staging_kib,
            s.jobs,
            s.kept_jobs
        );
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results/soak.md");
    std::fs::write(&out, &md).unwrap();
    println!("{md}");
    assert_eq!(errors, 0, "errors the load did not ask for (see above)");
    assert!(flat, "something grew after the warm-up (see the table)");
}
