//! The paper's Fig. 4, measured the way the paper measured it: from when a user
//! asks for N VMs to start until every one is usable, through gve's user
//! endpoint, against the direct path on the same libvirtd.
//!
//! - **Through gve:** a user of an in-process site, whose kvm agent (with
//!   guest-install) drives a private libvirtd, holds N stopped tiny guests and
//!   submits `POST /v1/vms/{id}/start` for each at once. A start job ends once
//!   the VM is `ready` (its guest agent answers); the user long-polls each job's
//!   end (`GET /v1/jobs/{id}?wait-ms=`). The round ends when every job has
//!   succeeded, and the site's record of every VM then says `ready`.
//! - **Direct:** the same N domains started at once with libvirt
//!   (`virDomainCreate`), each then asked `guest-ping` through libvirt's
//!   guest-agent channel until it answers ([`first_answer`]: at once when libvirt
//!   reports its guest agent connected, then every [`FAST_POLL`]; every
//!   [`FALLBACK_POLL`] before that).
//!
//! Each round ends by destroying the domains behind gve's back (the agent's
//! reconcile and the site's health check see them stopped before the next);
//! rounds alternate which path goes first. N = 1, 2, 4, 8, 16;
//! GVE_FIG4_ROUNDS rounds per N (default 5), GVE_FIG4_SIZES to pick N,
//! GVE_FIG4_TRACE to print each VM's timeline. Writes bench/results/fig4.md.
//! `bash bench/run.sh fig4`.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use std::sync::Arc;

use gve::api::client::Client;
use gve::libvirt_events::GuestAgentEvents;
use gve::site::model::{Job, JobState, SiteVm, UserView};
use gve::site::{Site, SiteConfig};
use gve_harness::Libvirtd;
use hyper::Method;
use serde_json::{json, Value};

use common::{cores, ms, quartiles, today};

const ADMIN: &str = "bench-site-admin-0123456789";
const AGENT: &str = "bench-agent-token-0123456789";
/// N, unless GVE_FIG4_SIZES (e.g. `1,8`) says otherwise.
const SIZES: [usize; 5] = [1, 2, 4, 8, 16];
/// Between `guest-ping`s of a domain whose guest agent libvirt reports connected
/// (and between looks at that report).
const FAST_POLL: Duration = Duration::from_millis(5);
/// Between `guest-ping`s of a domain whose guest agent has not been reported
/// connected (covers a lost event; libvirt refuses these without the guest).
const FALLBACK_POLL: Duration = Duration::from_millis(100);
const PING: &str = r#"{"execute":"guest-ping"}"#;

/// When a domain's guest agent first answered, and when libvirt first reported
/// it connected (since `c0`, its connects before the round), from `t`.
struct Answer {
    connected: Option<Duration>,
    answered: Duration,
}

/// Asks `dom` `guest-ping` until it answers: at once and then every
/// [`FAST_POLL`] once libvirt reports its guest agent connected (an
/// agent-lifecycle event), every [`FALLBACK_POLL`] before. Blocking.
fn first_answer(
    events: &GuestAgentEvents,
    dom: &virt::domain::Domain,
    name: &str,
    c0: u64,
    t: Instant,
) -> Answer {
    let limit = Duration::from_secs(600);
    let mut connected = None;
    let mut last_try: Option<Instant> = None;
    loop {
        let s = events.seen(name);
        let up = s.connects > c0 && s.connected == Some(true);
        if up && connected.is_none() {
            connected = Some(t.elapsed());
        }
        if up || last_try.is_none_or(|l| l.elapsed() >= FALLBACK_POLL) {
            last_try = Some(Instant::now());
            if dom.qemu_agent_command(PING, 5, 0).is_ok() {
                return Answer {
                    connected,
                    answered: t.elapsed(),
                };
            }
        }
        assert!(t.elapsed() < limit, "{name} never answered");
        std::thread::sleep(FAST_POLL);
    }
}

async fn post(c: &Client, path: &str, body: Value) -> Value {
    c.call(Method::POST, path, Some(&body))
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// Long-polls job `id` to its end.
async fn ended(c: &Client, id: &str) -> Job {
    loop {
        let j: Job = c
            .get(&format!("/v1/jobs/{id}?wait-ms=60000"))
            .await
            .unwrap();
        if j.state.is_terminal() {
            return j;
        }
    }
}

/// One round through gve: how long until every VM was usable, and for each VM
/// how much later its job ended than its guest agent first answered a
/// `guest-ping` from this bench (asked as the direct path asks, during the same
/// round): what gve added after the guest was usable, free of the boot's noise.
struct GveRound {
    took: Duration,
    lags_ms: Vec<f64>,
}

/// One round direct: how long until every VM was usable, and for each VM how
/// long after libvirt reported its guest agent connected it first answered.
struct DirectRound {
    took: Duration,
    connect_to_answer_ms: Vec<f64>,
}

/// Through gve: N start jobs at once, until each has ended with its VM ready.
async fn through_gve(
    user: &Client,
    uri: &str,
    events: &Arc<GuestAgentEvents>,
    ids: &[String],
    names: &[String],
) -> GveRound {
    let pingers: Vec<_> = names
        .iter()
        .map(|n| {
            let conn = virt::connect::Connect::open(Some(uri)).unwrap();
            (conn, n.clone(), events.connects_of(n))
        })
        .collect();
    let t = Instant::now();
    let mut answered = Vec::new();
    for (conn, name, c0) in pingers {
        let events = events.clone();
        answered.push(tokio::task::spawn_blocking(move || {
            let mut conn = conn;
            let dom = virt::domain::Domain::lookup_by_name(&conn, &name).unwrap();
            let a = first_answer(&events, &dom, &name, c0, t);
            drop(dom);
            let _ = conn.close();
            a.answered
        }));
    }
    let mut waits = Vec::new();
    for id in ids {
        let c = user.clone();
        let id = id.clone();
        waits.push(tokio::spawn(async move {
            let j: Job =
                serde_json::from_value(post(&c, &format!("/v1/vms/{id}/start"), json!({})).await)
                    .unwrap();
            let j = ended(&c, &j.id).await;
            (j, t.elapsed())
        }));
    }
    let mut jobs = Vec::new();
    for w in waits {
        jobs.push(w.await.unwrap());
    }
    let took = t.elapsed();
    let mut lags_ms = Vec::new();
    for ((j, end), ping) in jobs.iter().zip(answered) {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        let ping = ping.await.unwrap();
        lags_ms.push(ms(*end) - ms(ping));
    }
    if std::env::var_os("GVE_FIG4_TRACE").is_some() {
        for ((j, _), lag) in jobs.iter().zip(&lags_ms) {
            eprintln!(
                "  {} (ended {lag:+.0} ms after a guest-ping was first answered): {}",
                j.id,
                timeline(user, j).await
            );
        }
    }
    for id in ids {
        let v: SiteVm = user.get(&format!("/v1/vms/{id}")).await.unwrap();
        assert!(v.ready, "a start job ended before its VM was ready: {v:?}");
    }
    GveRound { took, lags_ms }
}

/// A finished job's events as `+ms message` from its submission.
async fn timeline(c: &Client, j: &Job) -> String {
    use http_body_util::BodyExt;
    let resp = c
        .get_stream(&format!("/v1/jobs/{}/events", j.id))
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<gve::site::model::JobEvent>(d).ok())
        .map(|e| format!("+{} {}", e.at_ms.saturating_sub(j.created_ms), e.message))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Direct: start the domains with libvirt, then `guest-ping` each until it answers.
async fn direct(uri: &str, events: &Arc<GuestAgentEvents>, names: &[String]) -> DirectRound {
    // Connections are opened before the clock starts (gve's are already open).
    let conns: Vec<_> = names
        .iter()
        .map(|n| {
            let conn = virt::connect::Connect::open(Some(uri)).unwrap();
            (conn, n.clone(), events.connects_of(n))
        })
        .collect();
    let t = Instant::now();
    let mut waits = Vec::new();
    for (conn, name, c0) in conns {
        let events = events.clone();
        waits.push(tokio::task::spawn_blocking(move || {
            let mut conn = conn;
            let dom = virt::domain::Domain::lookup_by_name(&conn, &name).unwrap();
            dom.create().unwrap_or_else(|e| panic!("start {name}: {e}"));
            let started = t.elapsed();
            let a = first_answer(&events, &dom, &name, c0, t);
            if std::env::var_os("GVE_FIG4_TRACE").is_some() {
                eprintln!(
                    "  {name}: running +{} ms, guest agent connected +{:?}, answered +{} ms",
                    started.as_millis(),
                    a.connected.map(|c| c.as_millis()),
                    a.answered.as_millis()
                );
            }
            drop(dom);
            let _ = conn.close();
            a
        }));
    }
    let mut connect_to_answer_ms = Vec::new();
    for w in waits {
        let a = w.await.unwrap();
        if let Some(c) = a.connected {
            connect_to_answer_ms.push(ms(a.answered) - ms(c));
        }
    }
    DirectRound {
        took: t.elapsed(),
        connect_to_answer_ms,
    }
}

/// CPU seconds used so far by this process (site, agent and the bench's
/// pingers) and the libvirtd.
fn cpu_now(lv: &Libvirtd) -> f64 {
    common::cpu_seconds("self") + common::cpu_seconds(&lv.pid().to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Destroys the domains behind gve's back and waits until the site has seen
/// every one stopped.
async fn stop_all(lv: &Libvirtd, agent: &Client, user: &Client, names: &[String], ids: &[String]) {
    for n in names {
        lv.virsh(&["destroy", n]);
    }
    let _: Value = post(agent, "/v1/reconcile", json!({})).await;
    let end = Instant::now() + Duration::from_secs(60);
    for id in ids {
        loop {
            let v: SiteVm = user.get(&format!("/v1/vms/{id}")).await.unwrap();
            if v.state == "stopped" && !v.ready {
                break;
            }
            assert!(Instant::now() < end, "the site still sees {v:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Let the host settle (libvirtd's and QEMU's teardown) before the next start.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    gve::libvirt_log::route_to_log();
    let rounds: usize = std::env::var("GVE_FIG4_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let sizes: Vec<usize> = std::env::var("GVE_FIG4_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| SIZES.to_vec());
    assert!(
        !sizes.is_empty() && !sizes.contains(&0),
        "GVE_FIG4_SIZES: {sizes:?}"
    );
    let status = std::process::Command::new("bash")
        .arg(gve_harness::root().join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success());
    let lv = Libvirtd::start();
    let (agent, agent_c, _agent_dir) = common::kvm_guest_agent(&lv, AGENT, |config| {
        if let Some(d) = config.driver.as_mut() {
            d.reconcile_period_ms = 5_000;
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // The site's defaults but for a faster health check, so that the domains
    // destroyed between rounds are seen stopped sooner.
    let mut config = SiteConfig::new(dir.path().to_path_buf(), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_period_ms = 500;
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    let _: Value = post(
        &admin,
        "/v1/agents",
        json!({ "id": "kvm", "url": format!("http://{}", agent.addr), "token": AGENT }),
    )
    .await;
    let max = *sizes.iter().max().unwrap();
    let u: UserView = admin
        .call(
            Method::POST,
            "/v1/users",
            Some(&json!({ "name": "grid-user", "quota": {
                "vms": max, "logical-cpus": max, "main-memory-mib": 128 * max } })),
        )
        .await
        .unwrap();
    let user = Client::new(admin.base(), u.token).unwrap();

    // The user's N VMs: requested through the site (not waiting for their
    // guests), then stopped.
    let mut ids = Vec::new();
    let mut names = Vec::new();
    for _ in 0..max {
        let j: Job = serde_json::from_value(
            post(
                &user,
                "/v1/vms",
                json!({ "template": "tiny", "main-memory-mib": 128, "lease-seconds": 86_400,
                        "wait-for-guest": false }),
            )
            .await,
        )
        .unwrap();
        let j = ended(&user, &j.id).await;
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        let id = j.result.unwrap()["id"].as_str().unwrap().to_string();
        let v: SiteVm = user.get(&format!("/v1/vms/{id}")).await.unwrap();
        names.push(v.name.clone());
        ids.push(id);
    }
    stop_all(&lv, &agent_c, &user, &names, &ids).await;
    // The bench's own view of the guest agents (not the agent's connection).
    let uri = lv.uri.clone();
    let events = Arc::new(
        tokio::task::spawn_blocking(move || GuestAgentEvents::open(&uri))
            .await
            .unwrap()
            .expect("libvirt agent-lifecycle events"),
    );

    let mut rows = Vec::new();
    for &n in &sizes {
        let (mut gve_t, mut direct_t, mut lags) = (Vec::new(), Vec::new(), Vec::new());
        let mut connect_to_answer = Vec::new();
        let (mut gve_cpu, mut direct_cpu) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which path goes first, so warm-up effects favour neither.
            for path in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                let cpu0 = cpu_now(&lv);
                if path == 0 {
                    let r = through_gve(&user, &lv.uri, &events, &ids[..n], &names[..n]).await;
                    gve_t.push(r.took);
                    lags.extend(r.lags_ms);
                    gve_cpu.push(cpu_now(&lv) - cpu0);
                } else {
                    let r = direct(&lv.uri, &events, &names[..n]).await;
                    direct_t.push(r.took);
                    connect_to_answer.extend(r.connect_to_answer_ms);
                    direct_cpu.push(cpu_now(&lv) - cpu0);
                }
                stop_all(&lv, &agent_c, &user, &names[..n], &ids[..n]).await;
            }
            eprintln!(
                "N={n} round {round}: gve {:.0} ms, direct {:.0} ms",
                ms(*gve_t.last().unwrap()),
                ms(*direct_t.last().unwrap())
            );
        }
        let (g, d) = (quartiles(gve_t), quartiles(direct_t));
        let added = g.0.as_secs_f64() - d.0.as_secs_f64();
        let overhead = (g.0.as_secs_f64() / d.0.as_secs_f64() - 1.0) * 100.0;
        eprintln!(
            "N={n}: gve {:?}, direct {:?}, overhead {overhead:+.1}%",
            g.0, d.0
        );
        let cpu = (median(gve_cpu), median(direct_cpu));
        eprintln!(
            "N={n}: CPU of this process and libvirtd per round: gve {:.2} s, direct {:.2} s",
            cpu.0, cpu.1
        );
        lags.sort_by(f64::total_cmp);
        let lag = (lags[lags.len() / 2], lags[lags.len() - 1]);
        eprintln!(
            "N={n}: a job ended {:+.0} ms (median; {:+.0} at most) after its guest answered",
            lag.0, lag.1
        );
        let c2a = median(connect_to_answer);
        eprintln!("N={n}: direct, a guest agent answered {c2a:.0} ms (median) after it connected");
        rows.push((n, g, d, added, overhead, lag, cpu, c2a));
    }
    site.stop().await;
    agent.stop().await;

    let mut md = String::from(
        "# The paper's Fig. 4: time until N VMs started at once are usable, through gve vs direct\n\n",
    );
    md += &format!(
        "Measured {} on {} cores, QEMU under TCG, libvirt 9.0, the tiny guest (128 MiB, 1 vCPU). \
         Median and IQR of {rounds} rounds per N; rounds alternate the two paths.\n\n\
         - **through gve:** the user submits `POST /v1/vms/{{id}}/start` for N held, stopped VMs \
         at once (in-process site → kvm agent with guest-install → private libvirtd) and long-polls \
         each job; the time ends when every job has succeeded, which a start job does once the \
         VM's guest agent answers (the site's record then says `ready`, checked).\n\
         - **direct:** the same domains started with libvirt (`virDomainCreate`, one thread each), \
         then `guest-ping` through libvirt's guest-agent channel until it answers: at once when \
         libvirt reports the domain's guest agent connected (its agent-lifecycle event, heard on \
         the bench's own connection) and every {} ms after, every {} ms before (libvirt refuses \
         those without asking the guest).\n\
         - **job end after the guest answered:** during each gve round the bench also asks each \
         domain `guest-ping` as the direct path does; per VM, when its job ended minus when its \
         guest agent first answered: what gve adds once the guest is usable, free of the boot's \
         noise, to within {} ms (negative when gve's own probe answered first; the bench's ping \
         and gve's probe take turns on the guest's channel).\n\
         - **connect → answer (direct):** how long a guest agent took to answer its first \
         `guest-ping` after libvirt reported it connected: the part of readiness no caller can \
         remove.\n\
         - **CPU per round:** CPU seconds this process (site, agent, the bench's pingers) and the \
         libvirtd used during the round, not counting QEMU: the CPU the path took from the guests.\n\n\
         Between rounds the domains are destroyed behind gve's back. Produced by `bash bench/run.sh fig4`.\n\n",
        today(),
        cores(),
        FAST_POLL.as_millis(),
        FALLBACK_POLL.as_millis(),
        FAST_POLL.as_millis()
    );
    md += "| N | through gve: median (IQR) | direct: median (IQR) | added | overhead of the medians | job end after the guest answered: median, max | connect → answer (direct), median | CPU per round, gve vs direct |\n|---|---|---|---|---|---|---|---|\n";
    for (n, g, d, added, o, lag, cpu, c2a) in rows {
        md += &format!(
            "| {n} | {:.0} ms ({:.0}–{:.0}) | {:.0} ms ({:.0}–{:.0}) | {:+.0} ms | {o:+.1}% | {:+.0} ms, {:+.0} ms | {c2a:.0} ms | {:.2} s vs {:.2} s |\n",
            ms(g.0),
            ms(g.1),
            ms(g.2),
            ms(d.0),
            ms(d.1),
            ms(d.2),
            added * 1e3,
            lag.0,
            lag.1,
            cpu.0,
            cpu.1
        );
    }
    let out = gve_harness::root().join("bench/results/fig4.md");
    std::fs::write(&out, md).unwrap();
    println!("{}", std::fs::read_to_string(out).unwrap());
}
