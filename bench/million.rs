//! A site at a million: 1,000,000 VMs over 10 agents and 10,000,000 jobs.
//!
//! The site runs as its own `gve site run` process (so its start time, memory and
//! CPU are its own), with its defaults (health check every 5 s) and a ten-year job
//! retention so nothing is removed while the history grows. The agents run in
//! this process on the memory driver, each on a simulated host that starts with
//! 100,000 VMs (`memory:<name>?vms=N`), adopted by the agent's reconcile and then
//! by the site's first health check, as VMs made outside gve are. One more, empty agent
//! holds the probe user's VMs. The jobs are VM requests too large for any agent,
//! submitted over HTTP by 64 clients of 8 users; each is a durable job with its
//! events, failed at placement by the site's runners, the way a busy site's
//! history fills. Everything goes through the public API.
//!
//! At each stage (a tenth, three tenths and all of the jobs) it measures p50 and
//! p99 of: a page of 100 of a user's jobs and VMs, of the admin's whole lists
//! (first and deep pages), one job's events and a `Last-Event-ID` reconnect;
//! and the site process's idle CPU, resident memory and database size. At the
//! last size it measures the site's idle CPU over one whole period of full
//! re-reads of the agents' listings (ten minutes at 100,000 VMs an agent), then
//! restarts the site (stop, start, serving, first checks), opens its database
//! as an upgrade from before the job indexes, lets retention remove nine tenths
//! of the jobs under a steady load ([`retention`]), and restarts an agent with
//! 100,000 VMs in its registry, each as its own process.
//!
//! Writes bench/results/million.md after every stage. `bash bench/run.sh
//! million`; GVE_MILLION_AGENTS (10), GVE_MILLION_VMS_PER_AGENT (100000) and
//! GVE_MILLION_JOBS (10000000) set the sizes; GVE_MILLION_IDLE=0 skips the idle
//! window. A quick run, of fewer than 100,000 jobs (to try a change on the
//! site's restart at a million VMs in a few minutes), writes
//! target/million-quick.md instead.

#[path = "common.rs"]
mod common;
#[path = "million/retention.rs"]
mod retention;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::plugin::{Grants, Limits, PluginSpec};
use gve::site::model::{Job, JobState, SiteVm};
use gve_harness::target_dir;
use hyper::Method;
use serde_json::{json, Value};

const ADMIN: &str = "bench-site-admin-0123456789";
const AGENT: &str = "bench-agent-token-0123456789";
const CROWD: usize = 8;
const CLIENTS_PER_USER: usize = 8;
const PROBE_VMS: usize = 100;
const SAMPLES: usize = 200;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn memory_spec() -> PluginSpec {
    PluginSpec {
        bundle: target_dir().join("plugins/memory"),
        grants: Grants::default(),
        limits: Limits {
            memory_mib: 1024,
            call_timeout_ms: 300_000,
            ..Default::default()
        },
    }
}

/// A `gve` service process and where it listens.
struct Service {
    child: tokio::process::Child,
    url: String,
    pid: String,
}

/// Starts `gve ROLE run --config CONFIG` (stderr to `log`); returns it once it
/// logged where it listens, and how long that took.
async fn spawn(role: &str, config: &Path, log: &Path) -> (Service, Duration) {
    let listening = |text: &str| {
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| l.split("listening on ").nth(1))
            .map(|u| u.trim().to_string())
            .collect::<Vec<_>>()
    };
    let before = listening(&std::fs::read_to_string(log).unwrap_or_default()).len();
    let t = Instant::now();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args([role, "run", "--config"])
        .arg(config)
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(url) = listening(&text).get(before) {
            return (
                Service {
                    child,
                    url: url.clone(),
                    pid,
                },
                t.elapsed(),
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(1800),
            "{role} did not start: {text}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops a service with SIGTERM; returns how long it took to exit.
async fn stop(mut s: Service) -> Duration {
    let t = Instant::now();
    let pid: i32 = s.pid.parse().unwrap();
    // SAFETY: kill(2) on the PID of a child this bench started and still holds.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(120), s.child.wait())
        .await
        .expect("the service exits within 120 s of SIGTERM")
        .unwrap();
    if !status.success() {
        eprintln!("the service ended {status} after SIGTERM");
    }
    t.elapsed()
}

/// Makes the site database at `path` what the release before the active-job
/// and finished-job indexes left: without their tables and meta keys.
fn as_before_job_indexes(path: &Path) {
    let db = redb::Database::open(path).unwrap();
    let w = db.begin_write().unwrap();
    for table in [
        "active_job_facts",
        "active_by_vm",
        "active_clones",
        "active_tally",
        "jobs_finished",
    ] {
        assert!(
            w.delete_table(redb::TableDefinition::<&str, ()>::new(table))
                .unwrap(),
            "{table}"
        );
    }
    {
        let mut meta = w
            .open_table(redb::TableDefinition::<&str, &str>::new("meta"))
            .unwrap();
        for built in ["index:active-jobs", "index:jobs-finished"] {
            assert!(meta.remove(built).unwrap().is_some(), "{built}");
        }
        // What their consistency check records (a release with it was here).
        meta.remove("index:jobs-gap").unwrap();
        meta.remove("index:events-floor").unwrap();
    }
    w.commit().unwrap();
}

/// Waits until `GET /v1/health` answers; returns how long that took.
async fn serving(c: &Client) -> Duration {
    let t = Instant::now();
    while c.get::<Value>("/v1/health").await.is_err() {
        assert!(t.elapsed() < Duration::from_secs(300));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.elapsed()
}

async fn submit(c: &Client, body: &Value) -> Job {
    c.call(Method::POST, "/v1/vms", Some(body)).await.unwrap()
}

/// The sum of the site's metric `name` over its labels (or its one value), from its metrics.
async fn gauge(admin: &Client, name: &str) -> f64 {
    use http_body_util::BodyExt;
    let resp = admin.get_stream("/metrics").await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The site's queued and running jobs.
async fn active_jobs(admin: &Client) -> f64 {
    gauge(admin, "gve_site_jobs_active").await
}

/// The sequence numbers of a job's events, read to the stream's end.
async fn event_ids(c: &Client, id: &str, last: Option<u64>) -> Vec<u64> {
    use http_body_util::BodyExt;
    let headers: Vec<(&str, String)> = last
        .map(|l| vec![("last-event-id", l.to_string())])
        .unwrap_or_default();
    let resp = c
        .get_stream_with(&format!("/v1/jobs/{id}/events"), &headers)
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
        .collect()
}

/// Times `n` runs of `f`; p50 and p99 in ms.
async fn p50_p99<F, Fut>(n: usize, mut f: F) -> (f64, f64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed());
    }
    v.sort();
    (quantile(&v, 0.5), quantile(&v, 0.99))
}

/// The `q` quantile of `sorted` (not empty), in ms.
fn quantile(sorted: &[Duration], q: f64) -> f64 {
    common::ms(sorted[((sorted.len() - 1) as f64 * q).round() as usize])
}

fn dir_mib(dir: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
    }
    walk(dir) as f64 / (1 << 20) as f64
}

/// The writes a service logged as holding its database 1 s or more in `log`:
/// how many, the longest, and where each was made (with how many).
fn slow_writes(log: &str) -> String {
    let mut at: std::collections::BTreeMap<String, usize> = Default::default();
    let mut longest = 0.0f64;
    for l in log
        .lines()
        .filter(|l| l.contains("a write held the database"))
    {
        let field = |name: &str| {
            l.split(&format!("{name}="))
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("?")
                .trim_matches('"')
                .to_string()
        };
        longest = longest.max(field("secs").parse().unwrap_or(0.0));
        *at.entry(field("at")).or_default() += 1;
    }
    if at.is_empty() {
        return "none".into();
    }
    let places: Vec<String> = at.iter().map(|(w, n)| format!("{n} at `{w}`")).collect();
    format!(
        "{}, the longest {longest:.1} s: {}",
        at.values().sum::<usize>(),
        places.join(", ")
    )
}

/// CPU (% of a core) process `pid` uses over `d`.
async fn cpu_over(pid: &str, d: Duration) -> f64 {
    let (c0, t0) = (common::cpu_seconds(pid), Instant::now());
    tokio::time::sleep(d).await;
    (common::cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0
}

/// The process's CPU (% of a core) in each `slice` of `d`, in order, and its
/// resident memory (MiB) at each slice's end.
async fn cpu_slices(pid: &str, d: Duration, slice: Duration) -> (Vec<f64>, Vec<f64>) {
    let end = Instant::now() + d;
    let (mut cpu, mut rss) = (Vec::new(), Vec::new());
    while Instant::now() < end {
        cpu.push(cpu_over(pid, slice.min(end - Instant::now())).await);
        rss.push(common::rss_of(pid).0);
    }
    (cpu, rss)
}

/// The results so far, as markdown.
struct Report {
    setup: Vec<String>,
    stages: Vec<(u64, Vec<(String, String)>)>,
    restart: Vec<String>,
    retention: Vec<String>,
    /// Fewer than 100,000 jobs: written under target/, not bench/results/.
    quick: bool,
}

impl Report {
    fn write(&self, agents: u64, per_agent: u64) {
        let mut md = format!(
            "# A site at a million\n\n`bench/million.rs` on {}, {} cores. A `gve site run` \
             process (its defaults: health check every 5 s, 64 runners, a 256 MiB database cache; job retention ten years and 10^12 finished jobs, up to 100,000,000 job events) \
             over {agents} memory-driver agents in the bench process, each on a simulated host \
             that starts with {per_agent} VMs made outside gve (its reconcile every 60 s), and one empty agent \
             for the probe user's {PROBE_VMS} VMs. The history: VM requests too large for any \
             agent, submitted over HTTP by {} clients of {CROWD} users, each a durable job with \
             its events, failed at placement by the runners. p50 / p99 in ms over {SAMPLES} \
             samples.\n\n## Building it\n\n| step | value |\n|---|---|\n{}\n",
            common::today(),
            common::cores(),
            CROWD * CLIENTS_PER_USER,
            self.setup.join("\n")
        );
        if let Some((_, first)) = self.stages.first() {
            md.push_str("\n## At each size\n\n| measure |");
            for (jobs, _) in &self.stages {
                md.push_str(&format!(" {jobs} jobs |"));
            }
            md.push_str("\n|---|");
            md.push_str(&"---|".repeat(self.stages.len()));
            for (i, (name, _)) in first.iter().enumerate() {
                md.push_str(&format!("\n| {name} |"));
                for (_, rows) in &self.stages {
                    md.push_str(&format!(" {} |", rows[i].1));
                }
            }
            md.push('\n');
        }
        if !self.restart.is_empty() {
            md.push_str(&format!(
                "\n## At the last size: idle, then restarts\n\n| measure | value |\n|---|---|\n{}\n",
                self.restart.join("\n")
            ));
        }
        if !self.retention.is_empty() {
            md.push_str(&format!(
                "\n## At the last size: retention catching up\n\nThe site started again with \
                 `max-finished-jobs` at a tenth of its jobs; its retention removes the rest \
                 (oldest first, {} jobs with their events a transaction) while {} users \
                 submit at a steady pace and an admin reads.\n\n| measure | value |\n|---|---|\n{}\n",
                gve::store_core::BATCH,
                retention::USERS,
                self.retention.join("\n")
            ));
        }
        // A quick run (fewer than 100,000 jobs, to try a change) leaves the
        // committed results alone.
        if self.quick {
            let out = target_dir().join("million-quick.md");
            std::fs::write(&out, &md).unwrap();
            eprintln!("{md}\n(written to {})", out.display());
        } else {
            common::publish("million.md", &md);
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let agents_n = env("GVE_MILLION_AGENTS", 10);
    let per_agent = env("GVE_MILLION_VMS_PER_AGENT", 100_000);
    let last = env("GVE_MILLION_JOBS", 10_000_000);
    let status = std::process::Command::new("bash")
        .arg(gve_harness::root().join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success());
    let mut report = Report {
        setup: Vec::new(),
        stages: Vec::new(),
        restart: Vec::new(),
        retention: Vec::new(),
        quick: last < 100_000,
    };
    let note = |r: &mut Report, s: String| {
        eprintln!("{s}");
        r.setup.push(s);
    };

    // The agents, each on a simulated host that starts with its VMs (made outside
    // gve: the agent's first reconcile pass adopts them).
    let mut agents = Vec::new();
    let (mut made, mut adopted) = (Duration::ZERO, Duration::ZERO);
    for a in 0..agents_n {
        let endpoint = format!(
            "memory:million-{a}-{}?vms={per_agent}",
            uuid::Uuid::new_v4()
        );
        let t = Instant::now();
        let (agent, ac, adir) = common::agent_with(
            "memory",
            memory_spec(),
            &endpoint,
            AGENT,
            gve_harness::agent::reconcile_every(60_000),
        )
        .await;
        made += t.elapsed();
        let t = Instant::now();
        let _: Value = ac
            .call(Method::POST, "/v1/reconcile", Some(&json!({})))
            .await
            .unwrap();
        adopted += t.elapsed();
        agents.push((agent, adir, endpoint));
    }
    let (work, _, _wdir) = common::agent_with(
        "memory",
        memory_spec(),
        &format!("memory:million-work-{}", uuid::Uuid::new_v4()),
        AGENT,
        gve_harness::agent::reconcile_every(60_000),
    )
    .await;
    note(
        &mut report,
        format!(
            "| {agents_n} agents started, their simulated hosts holding {} VMs | {:.1} s |",
            agents_n * per_agent,
            made.as_secs_f64()
        ),
    );
    note(
        &mut report,
        format!(
            "| the agents' first reconcile passes adopting them | {:.1} s |",
            adopted.as_secs_f64()
        ),
    );

    // The site, its own process.
    let sdir = tempfile::tempdir_in(target_dir()).unwrap();
    let config = sdir.path().join("site.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"data\"\nadmin-token = \"{ADMIN}\"\n\
             max-queued-jobs-per-user = 1000000\njob-retention-seconds = 315360000\n\
             max-job-events = 100000000\nmax-finished-jobs = 1000000000000\n"
        ),
    )
    .unwrap();
    let log = sdir.path().join("site.log");
    let (mut site, _) = spawn("site", &config, &log).await;
    let admin = Client::new(&site.url, Some(ADMIN.into())).unwrap();
    let t = Instant::now();
    for (i, (agent, _, _)) in agents.iter().enumerate() {
        let _: Value = admin
            .call(
                Method::POST,
                "/v1/agents",
                Some(&json!({ "id": format!("a-{i:02}"), "url": format!("http://{}", agent.addr), "token": AGENT })),
            )
            .await
            .unwrap();
    }
    let _: Value = admin
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({ "id": "work", "url": format!("http://{}", work.addr), "token": AGENT })),
        )
        .await
        .unwrap();
    note(
        &mut report,
        format!(
            "| the site registering the agents (each first check adopts every VM) | {:.1} s |",
            t.elapsed().as_secs_f64()
        ),
    );
    let probe = common::unlimited_user(&admin, "probe").await;
    let mut probe_vms = Vec::new();
    for _ in 0..PROBE_VMS {
        let j = submit(&probe, &json!({ "main-memory-mib": 16 })).await;
        let j = common::job_ended(&probe, &j.id).await;
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        probe_vms.push(j.id);
    }
    let total_vms = (agents_n * per_agent) as usize + PROBE_VMS;
    while (gauge(&admin, "gve_site_vms").await as usize) < total_vms {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "the site never held every VM"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    note(
        &mut report,
        format!(
            "| the site holding every VM ({total_vms}) after the first registration | {:.1} s |",
            t.elapsed().as_secs_f64()
        ),
    );
    let t = Instant::now();
    let half: Vec<SiteVm> = admin
        .get_pages("/v1/vms?all=true", total_vms / 2)
        .await
        .unwrap();
    let mid_vm = half.last().unwrap().id.clone();
    note(
        &mut report,
        format!(
            "| the admin reading half the inventory ({} VMs, pages of 1,000) | {:.1} s |",
            half.len(),
            t.elapsed().as_secs_f64()
        ),
    );
    drop(half);
    let mut crowd = Vec::new();
    for i in 0..CROWD {
        crowd.push(common::unlimited_user(&admin, &format!("crowd-{i}")).await);
    }
    report.write(agents_n, per_agent);

    // The history, in stages.
    let mut grown = 0u64;
    let mut mid_job = (0, String::new());
    let big = json!({ "main-memory-mib": 1u64 << 20 });
    for stage in [last / 10, last * 3 / 10, last] {
        let add = stage - grown;
        let done = Arc::new(AtomicU64::new(0));
        let tasks_n = (CROWD * CLIENTS_PER_USER) as u64;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..tasks_n {
            let c = crowd[k as usize % CROWD].clone();
            let (done, big) = (done.clone(), big.clone());
            let share = add / tasks_n + u64::from(k < add % tasks_n);
            tasks.push(tokio::spawn(async move {
                let mut middle = None;
                for i in 0..share {
                    let j = submit(&c, &big).await;
                    if i == share / 2 {
                        middle = Some((k as usize % CROWD, j.id));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                middle
            }));
        }
        let progress = {
            let done = done.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    let n = done.load(Ordering::Relaxed);
                    eprintln!(
                        "  {n} of {add} submitted ({:.0}/s)",
                        n as f64 / t.elapsed().as_secs_f64()
                    );
                }
            })
        };
        for task in tasks {
            if let Some(m) = task.await.unwrap() {
                mid_job = m;
            }
        }
        progress.abort();
        let submitted = t.elapsed();
        while active_jobs(&admin).await > 0.0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        grown = stage;
        note(
            &mut report,
            format!(
                "| {add} more jobs submitted / ended (to {stage}) | {:.0} s, {:.0}/s / {:.0} s |",
                submitted.as_secs_f64(),
                add as f64 / submitted.as_secs_f64(),
                t.elapsed().as_secs_f64()
            ),
        );
        let owner = crowd[mid_job.0].clone();
        let mid_job = mid_job.1.clone();
        tokio::time::sleep(Duration::from_secs(6)).await;

        let mut rows: Vec<(String, String)> = Vec::new();
        let fmt = |(a, b): (f64, f64)| format!("{a:.2} / {b:.2}");
        // A quick run (few jobs) may have pages of jobs shorter than 100.
        let jobs_page = move |n: usize| {
            assert!(n <= 100, "{n}");
            assert!(last < 100_000 || n == 100, "{n}");
        };
        let (p, a) = (&probe, &admin);
        rows.push((
            "a page of 100 of a user's jobs".into(),
            fmt(p50_p99(SAMPLES, || async {
                let v: Vec<Job> = owner.get("/v1/jobs?limit=100").await.unwrap();
                jobs_page(v.len());
            })
            .await),
        ));
        rows.push((
            "a page of 100 of all jobs (admin), newest".into(),
            fmt(p50_p99(SAMPLES, || async {
                let v: Vec<Job> = a.get("/v1/jobs?limit=100&all=true").await.unwrap();
                jobs_page(v.len());
            })
            .await),
        ));
        let deep = format!("/v1/jobs?limit=100&all=true&before={mid_job}");
        rows.push((
            "a page of 100 of all jobs (admin), deep in the history".into(),
            fmt(p50_p99(SAMPLES, || async {
                let v: Vec<Job> = a.get(&deep).await.unwrap();
                jobs_page(v.len());
            })
            .await),
        ));
        rows.push((
            "a page of 100 of a user's VMs".into(),
            fmt(p50_p99(SAMPLES, || async {
                let v: Vec<SiteVm> = p.get("/v1/vms?limit=100").await.unwrap();
                assert_eq!(v.len(), 100);
            })
            .await),
        ));
        rows.push((
            "a page of 100 of all VMs (admin), first".into(),
            fmt(p50_p99(SAMPLES, || async {
                let v: Vec<SiteVm> = a.get("/v1/vms?limit=100&all=true").await.unwrap();
                assert_eq!(v.len(), 100);
            })
            .await),
        ));
        let deep = format!("/v1/vms?limit=100&all=true&after={mid_vm}");
        rows.push((
            "a page of 100 of all VMs (admin), at the middle".into(),
            fmt(p50_p99(SAMPLES, || async {
                let v: Vec<SiteVm> = a.get(&deep).await.unwrap();
                assert_eq!(v.len(), 100);
            })
            .await),
        ));
        let ids = event_ids(&owner, &mid_job, None).await;
        assert!(ids.len() >= 2, "{ids:?}");
        let before_last = ids[ids.len() - 2];
        let o = &owner;
        let mj = &mid_job;
        rows.push((
            format!("one finished job's events, to their end ({})", ids.len()),
            fmt(p50_p99(SAMPLES, || async {
                assert_eq!(event_ids(o, mj, None).await.len(), ids.len());
            })
            .await),
        ));
        rows.push((
            "the same, reconnecting with `Last-Event-ID` of the one before last".into(),
            fmt(p50_p99(SAMPLES, || async {
                assert_eq!(event_ids(o, mj, Some(before_last)).await.len(), 1);
            })
            .await),
        ));
        rows.push((
            "site: idle CPU over 20 s (% of a core)".into(),
            format!("{:.1}", cpu_over(&site.pid, Duration::from_secs(20)).await),
        ));
        let (rss, hwm) = common::rss_of(&site.pid);
        rows.push((
            "site: resident memory now / peak (MiB)".into(),
            format!("{rss:.0} / {hwm:.0}"),
        ));
        rows.push((
            "site: database (MiB)".into(),
            format!("{:.0}", dir_mib(&sdir.path().join("data"))),
        ));
        eprintln!("stage {stage}: {rows:?}");
        report.stages.push((stage, rows));
        report.write(agents_n, per_agent);
    }

    // Idle over one whole period of full re-reads (each agent's listing is
    // trusted that long once settled): every re-read falls inside the window.
    // GVE_MILLION_IDLE=0 skips it (ten minutes at 100,000 VMs an agent).
    if env("GVE_MILLION_IDLE", 1) != 0 {
        let period =
            gve::site::vm_sync::full_listing_every(per_agent as usize) + Duration::from_secs(30);
        eprintln!("idle for {} s", period.as_secs());
        let (slices, mut held) = cpu_slices(&site.pid, period, Duration::from_secs(10)).await;
        held.sort_by(f64::total_cmp);
        let cpu = slices.iter().sum::<f64>() / slices.len().max(1) as f64;
        let top = slices.iter().copied().fold(0.0, f64::max);
        let busy = slices.iter().filter(|c| **c >= 20.0).count();
        let (rss, hwm) = common::rss_of(&site.pid);
        report.restart.push(format!(
            "| site: idle CPU over {} s, one full re-read of every agent's listing (% of a core) | {cpu:.1} |",
            period.as_secs()
        ));
        report.restart.push(format!(
            "| the same in 10 s slices: the busiest / slices at 20% or more (of {}) | {top:.1} / {busy} |",
            slices.len()
        ));
        report.restart.push(format!(
            "| site: resident memory at the end of each 10 s slice, lowest / median / highest (MiB) | {:.0} / {:.0} / {:.0} |",
            held.first().copied().unwrap_or(0.0),
            held.get(held.len() / 2).copied().unwrap_or(0.0),
            held.last().copied().unwrap_or(0.0)
        ));
        report.restart.push(format!(
            "| site: resident memory after it, now / peak (MiB) | {rss:.0} / {hwm:.0} |"
        ));
        report.write(agents_n, per_agent);
    }

    // The site restarted on its database.
    let stopped = stop(site).await;
    let (s, listening) = spawn("site", &config, &log).await;
    site = s;
    let admin = Client::new(&site.url, Some(ADMIN.into())).unwrap();
    let ready = listening + serving(&admin).await;
    let (rss0, _) = common::rss_of(&site.pid);
    let t = Instant::now();
    let page: Vec<SiteVm> = admin.get("/v1/vms?limit=100&all=true").await.unwrap();
    assert_eq!(page.len(), 100);
    let first_page = t.elapsed();
    let cpu = cpu_over(&site.pid, Duration::from_secs(20)).await;
    let (rss1, hwm1) = common::rss_of(&site.pid);
    let r = &mut report.restart;
    r.push(format!(
        "| site: stop (SIGTERM to exit) | {:.2} s |",
        stopped.as_secs_f64()
    ));
    r.push(format!(
        "| site: start to listening / to answering `/v1/health` | {:.2} s / {:.2} s |",
        listening.as_secs_f64(),
        ready.as_secs_f64()
    ));
    r.push(format!(
        "| site: the first page of all VMs after the start | {:.1} ms |",
        common::ms(first_page)
    ));
    r.push(format!(
        "| site: resident memory when serving / 20 s later / peak (MiB) | {rss0:.0} / {rss1:.0} / {hwm1:.0} |"
    ));
    r.push(format!(
        "| site: CPU over its first 20 s (health checks of {} agents) | {cpu:.1}% of a core |",
        agents_n + 1
    ));
    eprintln!("{r:?}");
    stop(site).await;
    report.write(agents_n, per_agent);

    // An upgrade: the same database as the release before the job indexes
    // left it (no active-job or finished-job index), opened by this one, which
    // builds them before it listens.
    let db = sdir.path().join("data/site.redb");
    let db_mib = std::fs::metadata(&db).unwrap().len() as f64 / (1 << 20) as f64;
    as_before_job_indexes(&db);
    let (s, listening) = spawn("site", &config, &log).await;
    let admin = Client::new(&s.url, Some(ADMIN.into())).unwrap();
    let ready = listening + serving(&admin).await;
    let (_, hwm) = common::rss_of(&s.pid);
    report.restart.push(format!(
        "| site, upgraded: start to listening (indexing every job of a {db_mib:.0} MiB database from the release before the job indexes) / to answering `/v1/health` | {:.1} s / {:.1} s |",
        listening.as_secs_f64(),
        ready.as_secs_f64()
    ));
    report.restart.push(format!(
        "| site, upgraded: peak resident memory (MiB) | {hwm:.0} |"
    ));
    stop(s).await;
    report.write(agents_n, per_agent);

    // Retention catching up: the same site told to keep a tenth of its jobs.
    report.retention = retention::stage(&config, &log, &sdir.path().join("data"), grown).await;
    eprintln!("{:?}", report.retention);
    report.write(agents_n, per_agent);

    // An agent with every VM of its registry, restarted as its own process.
    let (agent, adir, endpoint) = agents.remove(0);
    agent.stop().await;
    let aconfig = sdir.path().join("agent.toml");
    std::fs::write(
        &aconfig,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nadmin-token = \"{AGENT}\"\n\
             [plugins.memory]\nbundle = \"{}\"\n[plugins.memory.limits]\nmemory-mib = 1024\n\
             call-timeout-ms = 300000\n[driver]\nplugin = \"memory\"\nendpoint = \"{endpoint}\"\n",
            adir.path().display(),
            target_dir().join("plugins/memory").display()
        ),
    )
    .unwrap();
    let alog = sdir.path().join("agent.log");
    let (a, listening) = spawn("agent", &aconfig, &alog).await;
    let ac = Client::new(&a.url, Some(AGENT.into())).unwrap();
    let ready = listening + serving(&ac).await;
    let (rss0, _) = common::rss_of(&a.pid);
    let t = Instant::now();
    let page: Vec<Value> = ac.get("/v1/vms?limit=1000").await.unwrap();
    assert_eq!(page.len(), 1000);
    let first_page = t.elapsed();
    let cpu = cpu_over(&a.pid, Duration::from_secs(20)).await;
    let (rss1, hwm1) = common::rss_of(&a.pid);
    let r = &mut report.restart;
    r.push(format!(
        "| agent ({per_agent} VMs in its registry): start to listening / to answering `/v1/health` | {:.2} s / {:.2} s |",
        listening.as_secs_f64(),
        ready.as_secs_f64()
    ));
    r.push(format!(
        "| agent: its first page of 1,000 VMs after the start | {:.1} ms |",
        common::ms(first_page)
    ));
    r.push(format!(
        "| agent: resident memory when serving / 20 s later / peak (MiB) | {rss0:.0} / {rss1:.0} / {hwm1:.0} |"
    ));
    r.push(format!(
        "| agent: CPU over its first 20 s (its start-up reconcile pass finding every VM as it was, and the periodic ones every 5 s) | {cpu:.1}% of a core |"
    ));
    stop(a).await;
    report.write(agents_n, per_agent);
    report.restart.push(format!(
        "| site: writes holding its database 1 s or more over the whole run | {} |",
        slow_writes(&std::fs::read_to_string(&log).unwrap_or_default())
    ));
    report.write(agents_n, per_agent);
    // The site's log outlives the run's directory.
    let _ = std::fs::copy(&log, target_dir().join("million-site.log"));
    for (agent, _, _) in agents {
        agent.stop().await;
    }
    work.stop().await;
}
