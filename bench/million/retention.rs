//! The million bench's retention stage. The site, its history full, starts
//! again with `max-finished-jobs` at a tenth of the jobs it holds; its
//! retention (every minute, the first 30 s after the start) removes the rest,
//! oldest first, in transactions of `BATCH` jobs with their events, while users
//! submit at a steady pace and an admin reads the newest page of all jobs. It
//! reports how long the removal took, at what rate, and what those writers and
//! readers saw before, during and after it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::Job;
use serde_json::json;

use super::{active_jobs, common, dir_mib, gauge, quantile, serving, spawn, stop, submit, ADMIN};

/// Users submitting during the stage, and clients of each.
pub const USERS: usize = 8;
const CLIENTS_PER_USER: usize = 2;
/// Each client's pace: one submission every this often (about 1,000/s in all).
const PACE: Duration = Duration::from_millis(16);
/// The admin's pace reading the newest page of all jobs.
const READ_PACE: Duration = Duration::from_millis(50);
/// How long the load runs before and after the removal.
const AROUND: Duration = Duration::from_secs(20);

/// The log line retention writes once it removed the jobs over the count.
const REMOVED: &str = "finished jobs over max-finished-jobs past their retention removed";

/// Samples taken by the load: when each request started (since the stage's
/// start) and how long it took.
type Samples = Arc<Mutex<Vec<(Duration, Duration)>>>;

/// "p50 / p99 / max (n)" in ms of the samples that started in `from..to`.
fn window(s: &[(Duration, Duration)], from: Duration, to: Duration) -> String {
    let mut v: Vec<Duration> = s
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .map(|(_, d)| *d)
        .collect();
    if v.is_empty() {
        return "none".into();
    }
    v.sort();
    format!(
        "{:.1} / {:.1} / {:.0} ({})",
        quantile(&v, 0.5),
        quantile(&v, 0.99),
        common::ms(*v.last().unwrap()),
        v.len()
    )
}

/// Runs the stage on the site whose config is `config` (logging to `log`) and
/// database under `data`, holding `jobs` finished jobs; returns its report rows.
pub async fn stage(config: &Path, log: &Path, data: &Path, jobs: u64) -> Vec<String> {
    let keep = (jobs / 10).max(1);
    let text = std::fs::read_to_string(config).unwrap();
    let tuned: String = text
        .lines()
        .map(|l| {
            if l.starts_with("max-finished-jobs") {
                format!("max-finished-jobs = {keep}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_ne!(tuned, text, "the site's config sets max-finished-jobs");
    std::fs::write(config, tuned).unwrap();
    let (log_before, removals_before) = {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        (text.len(), text.matches(REMOVED).count())
    };
    let db_before = dir_mib(data);

    let (site, _) = spawn("site", config, log).await;
    let admin = Client::new(&site.url, Some(ADMIN.into())).unwrap();
    serving(&admin).await;
    let t0 = Instant::now();
    let kept0 = gauge(&admin, "gve_site_jobs_kept").await;
    let ended0 = gauge(&admin, "gve_site_jobs_ended_total").await;

    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(common::unlimited_user(&admin, &format!("keeper-{i}")).await);
    }
    let stop_load = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (writes, reads): (Samples, Samples) = Default::default();
    let mut load = Vec::new();
    let big = json!({ "main-memory-mib": 1u64 << 20 });
    for k in 0..USERS * CLIENTS_PER_USER {
        let (c, big, stop_load, writes) = (
            users[k % USERS].clone(),
            big.clone(),
            stop_load.clone(),
            writes.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(PACE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop_load.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                submit(&c, &big).await;
                writes.lock().unwrap().push((t - t0, t.elapsed()));
            }
        }));
    }
    {
        let (a, stop_load, reads) = (admin.clone(), stop_load.clone(), reads.clone());
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(READ_PACE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop_load.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                let v: Vec<Job> = a.get("/v1/jobs?limit=100&all=true").await.unwrap();
                assert_eq!(v.len(), 100);
                reads.lock().unwrap().push((t - t0, t.elapsed()));
            }
        }));
    }

    // The removal: from the first fall of the kept count to retention's log line.
    let mut began = None;
    let mut peak_during = 0.0f64;
    let ended_at = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if began.is_none() && gauge(&admin, "gve_site_jobs_kept").await < kept0 {
            began = Some(t0.elapsed());
        }
        if began.is_some() {
            peak_during = peak_during.max(common::rss_of(&site.pid).0);
        }
        let logged = std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(REMOVED)
            .count();
        if logged > removals_before {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3600),
            "retention did not remove the jobs over the count within an hour"
        );
    };
    let began = began.unwrap_or(ended_at);
    let kept1 = gauge(&admin, "gve_site_jobs_kept").await;
    let ended1 = gauge(&admin, "gve_site_jobs_ended_total").await;
    tokio::time::sleep(AROUND).await;
    stop_load.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    while active_jobs(&admin).await > 0.0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (rss, hwm) = common::rss_of(&site.pid);
    stop(site).await;

    // Removed = held at the start + ended since - held at the end.
    let removed = kept0 + (ended1 - ended0) - kept1;
    let took = ended_at.saturating_sub(began);
    let (w, r) = (writes.lock().unwrap(), reads.lock().unwrap());
    let before = (Duration::from_secs(5), began);
    let after = (ended_at, ended_at + AROUND);
    vec![
        format!(
            "| finished jobs held at the start / `max-finished-jobs` / held when retention logged its removal | {kept0:.0} / {keep} / {kept1:.0} |"
        ),
        format!(
            "| the removal: from the kept count's first fall to retention's log line, jobs removed, rate | {:.1} s, {removed:.0}, {:.0} jobs/s |",
            took.as_secs_f64(),
            removed / took.as_secs_f64().max(0.001)
        ),
        format!(
            "| {} users' submissions ({} clients, one each every {} ms), p50 / p99 / max ms (n): before the removal | {} |",
            USERS,
            USERS * CLIENTS_PER_USER,
            PACE.as_millis(),
            window(&w, before.0, before.1)
        ),
        format!("| the same during the removal | {} |", window(&w, began, ended_at)),
        format!(
            "| the same in the {} s after it | {} |",
            AROUND.as_secs(),
            window(&w, after.0, after.1)
        ),
        format!(
            "| the admin's newest page of 100 of all jobs (every {} ms): before / during / after | {} / {} / {} |",
            READ_PACE.as_millis(),
            window(&r, before.0, before.1),
            window(&r, began, ended_at),
            window(&r, after.0, after.1)
        ),
        format!(
            "| site: resident memory, highest seen during the removal / at the end / peak (MiB) | {peak_during:.0} / {rss:.0} / {hwm:.0} |"
        ),
        format!(
            "| the site's writes holding the database 1 s or more during the stage | {} |",
            super::slow_writes(&std::fs::read_to_string(log).unwrap_or_default()[log_before..])
        ),
        format!(
            "| site: database before / after (MiB; redb keeps freed pages for reuse, the file does not shrink) | {db_before:.0} / {:.0} |",
            dir_mib(data)
        ),
    ]
}
