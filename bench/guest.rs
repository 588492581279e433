//! Guest operations through gve against raw qemu-ga commands sent with libvirt's
//! qemu-agent-command on the same channel of the same VM:
//!
//! - **site:** the user's job at an in-process site (`POST /v1/vms/{id}/exec?wait-ms=N`,
//!   answered at its end; a copy in staged by `PUT .../files` then run as a job; a copy out
//!   run as a job, then its content fetched), over
//! - **agent:** the agent's HTTP API (an exec operation submitted with `?wait-ms`,
//!   answered at its end; streamed
//!   PUT/GET of a file, verified by size and SHA-256 computed in the guest) →
//!   guest-install plugin → guest channel → kvm plugin → libvirt → qemu-ga;
//! - **raw:** guest-exec + guest-exec-status polled with the plugin's back-off;
//!   guest-file-open / write (96 KiB pieces) / read (the agent's chunk) / close, with and
//!   without the same verification.
//!
//! The measurement runs GVE_GUEST_RUNS times (default 3) on the same VM; the
//! results give each run's figures, so the spread between runs shows. Writes
//! bench/results/guest.md. Run with `bash bench/run.sh guest`.
//!
//! For an A/B or a profile: GVE_GUEST_ONLY=small (only the copies through the
//! guest agent) or `exec` (only the execs and the pieces of one) write to
//! target/ instead; GVE_GUEST_PINGS sets how many times each piece is measured
//! (40), and GVE_GUEST_PROFILE=via|raw first sends that many guest-pings on one
//! path alone, timed, for `perf record` to look at.

#[path = "common.rs"]
mod common;
#[path = "guest_pieces.rs"]
mod pieces;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use gve::agent::model::{FileMeta, OpState, Operation};
use gve::api::client::Client;
use gve::site::model::{Job, SiteVm};
use gve_harness::Libvirtd;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};

use common::{cores, ms, quartiles, today};
use sha2::{Digest, Sha256};

const TOKEN: &str = "bench-token-0123456789abcdef";
const ADMIN: &str = "bench-site-admin-0123456789";
const EXEC_ROUNDS: usize = 40;
const COPY_ROUNDS: usize = 2;
const COPY_MIB: usize = 32;
/// A copy below the staged disk's threshold (`BULK_MIN`, 4 MiB): it takes the guest agent.
const SMALL_MIB: usize = 3;
const SMALL_ROUNDS: usize = 6;

/// An agent operation, submitted with `?wait-ms` (answered at its end), long-polled
/// further if it outlasts that; it must succeed.
async fn op(c: &Client, path: &str, body: Value) -> Operation {
    let mut op: Operation = c
        .call(Method::POST, &format!("{path}?wait-ms=60000"), Some(&body))
        .await
        .unwrap();
    while op.state == OpState::Running {
        op = c
            .get(&format!("/v1/operations/{}?wait-ms=60000", op.id))
            .await
            .unwrap();
    }
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    op
}

/// A site job, submitted with `?wait-ms` (answered at its end), long-polled further
/// if it outlasts that; it must succeed.
async fn site_job(c: &Client, path: &str, body: Value) -> Job {
    let j: Job = c
        .call(Method::POST, &format!("{path}?wait-ms=60000"), Some(&body))
        .await
        .unwrap();
    if j.state.is_terminal() {
        assert_eq!(j.state, gve::site::model::JobState::Succeeded, "{j:?}");
        return j;
    }
    common::job_succeeded(c, &j.id).await
}

impl common::Raw {
    fn write(&self, path: &str, data: &[u8]) {
        let h = self.call("guest-file-open", json!({ "path": path, "mode": "w" }));
        for piece in data.chunks(96 << 10) {
            self.call(
                "guest-file-write",
                json!({ "handle": h, "buf-b64": B64.encode(piece) }),
            );
        }
        self.call("guest-file-close", json!({ "handle": h }));
    }

    fn read(&self, path: &str) -> Vec<u8> {
        let h = self.call("guest-file-open", json!({ "path": path, "mode": "r" }));
        let mut out = Vec::new();
        loop {
            let r = self.call(
                "guest-file-read",
                json!({ "handle": h, "count": gve::agent::guest::CHUNK }),
            );
            out.extend(B64.decode(r["buf-b64"].as_str().unwrap()).unwrap());
            if r["eof"] == true {
                break;
            }
        }
        self.call("guest-file-close", json!({ "handle": h }));
        out
    }

    /// What the agent's copy adds: stat and sha256sum in the guest.
    fn verify(&self, path: &str) {
        self.exec("stat", &["-c", "%s:%a", "--", path]);
        self.exec("sha256sum", &["--", path]);
    }
}

/// `data` copied into `path` through the agent, then out again, each checked
/// against `sha`: how long each way took.
async fn agent_copy(
    c: &Client,
    vm: &str,
    path: &str,
    data: &[u8],
    sha: &str,
) -> (Duration, Duration) {
    let t = Instant::now();
    let meta: FileMeta = c
        .put_stream(
            &format!("/v1/vms/{vm}/files?path={path}"),
            &[],
            gve::api::full(data.to_vec()),
        )
        .await
        .unwrap();
    let copy_in = t.elapsed();
    assert_eq!(meta.sha256, sha);
    let t = Instant::now();
    let resp = c
        .get_stream(&format!("/v1/vms/{vm}/files?path={path}"))
        .await
        .unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    let copy_out = t.elapsed();
    assert_eq!(hex::encode(Sha256::digest(&got)), sha);
    (copy_in, copy_out)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mibps(d: Duration) -> f64 {
    COPY_MIB as f64 / d.as_secs_f64()
}

fn small_mibps(d: Duration) -> f64 {
    SMALL_MIB as f64 / d.as_secs_f64()
}

/// One run's samples.
#[derive(Default)]
struct Run {
    site_exec: Vec<Duration>,
    agent_exec: Vec<Duration>,
    raw_exec: Vec<Duration>,
    /// Site copy in: staging (the PUT until its 202), then the whole (until the job ended).
    site_stage: Vec<Duration>,
    site_in: Vec<Duration>,
    /// Site copy out: the job, then the whole (its content fetched).
    site_out_job: Vec<Duration>,
    site_out: Vec<Duration>,
    agent_in: Vec<Duration>,
    agent_out: Vec<Duration>,
    raw_in: Vec<Duration>,
    raw_out: Vec<Duration>,
    raw_in_verified: Vec<Duration>,
    raw_out_verified: Vec<Duration>,
    /// Copies of SMALL_MIB through the guest agent: the agent's, and raw with the
    /// same verification.
    small_agent_in: Vec<Duration>,
    small_agent_out: Vec<Duration>,
    small_raw_in: Vec<Duration>,
    small_raw_out: Vec<Duration>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("GVE_GUEST_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // `small`: only the copies through the guest agent, written to target/ (an A/B).
    let only_small = std::env::var("GVE_GUEST_ONLY").is_ok_and(|v| v == "small");
    // `exec`: only the execs and their breakdown, written to target/ (an A/B).
    let only_exec = std::env::var("GVE_GUEST_ONLY").is_ok_and(|v| v == "exec");
    let status = std::process::Command::new("bash")
        .arg(gve_harness::root().join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success());
    let lv = Libvirtd::start();
    let (agent, c, _agent_dir) = common::kvm_guest_agent(&lv, TOKEN, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (site, admin) =
        common::site_over(dir.path(), ADMIN, 5_000, &[("kvm", agent.addr)], TOKEN).await;
    let quota = json!({ "vms": 1, "logical-cpus": 1, "main-memory-mib": 512 });
    let user = common::site_user(&admin, "grid-user", quota).await;
    let j = common::site_job(
        &user,
        "/v1/vms",
        json!({ "template": "tiny", "main-memory-mib": 512, "lease-seconds": 86_400 }),
    )
    .await;
    let id = j.result.unwrap()["id"].as_str().unwrap().to_string();
    let vm: SiteVm = user.get(&format!("/v1/vms/{id}")).await.unwrap();
    let conn = virt::connect::Connect::open(Some(&lv.uri)).unwrap();
    let raw = common::Raw {
        dom: virt::domain::Domain::lookup_by_name(&conn, &vm.name).unwrap(),
        calls: Default::default(),
    };
    let up = Instant::now();
    while raw
        .dom
        .qemu_agent_command(r#"{"execute":"guest-ping"}"#, 2, 0)
        .is_err()
    {
        assert!(
            up.elapsed() < Duration::from_secs(60),
            "qemu-ga never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let agent_vm = vm.agent_vm.clone();

    let data: Vec<u8> = (0..COPY_MIB << 20).map(|i| (i * 31 % 251) as u8).collect();
    let sha = hex::encode(Sha256::digest(&data));
    let small = data[..SMALL_MIB << 20].to_vec();
    let small_sha = hex::encode(Sha256::digest(&small));
    let mut all = Vec::new();
    for run in 0..runs {
        let mut r = Run::default();
        for round in 0..if only_exec { 0 } else { SMALL_ROUNDS } {
            // Alternate which path goes first.
            for k in 0..2 {
                if (round + k) % 2 == 0 {
                    let (copy_in, copy_out) =
                        agent_copy(&c, &agent_vm, "/tmp/sa.bin", &small, &small_sha).await;
                    r.small_agent_in.push(copy_in);
                    r.small_agent_out.push(copy_out);
                } else {
                    let t = Instant::now();
                    raw.write("/tmp/sr.bin", &small);
                    raw.verify("/tmp/sr.bin");
                    r.small_raw_in.push(t.elapsed());
                    let t = Instant::now();
                    raw.verify("/tmp/sr.bin");
                    let back = raw.read("/tmp/sr.bin");
                    r.small_raw_out.push(t.elapsed());
                    assert_eq!(back.len(), small.len());
                }
            }
        }
        if !only_exec {
            eprintln!(
            "run {run}: {SMALL_MIB} MiB in agent {:.2} raw {:.2}, out agent {:.2} raw {:.2} MiB/s",
            small_mibps(median(r.small_agent_in.clone())),
            small_mibps(median(r.small_raw_in.clone())),
            small_mibps(median(r.small_agent_out.clone())),
            small_mibps(median(r.small_raw_out.clone())),
        );
        }
        if only_small {
            all.push(r);
            continue;
        }
        for round in 0..EXEC_ROUNDS {
            // Rotate which path goes first.
            for k in 0..3 {
                let path = (round + k) % 3;
                let t = Instant::now();
                match path {
                    0 => {
                        site_job(
                            &user,
                            &format!("/v1/vms/{id}/exec"),
                            json!({ "argv": ["true"] }),
                        )
                        .await;
                        r.site_exec.push(t.elapsed());
                    }
                    1 => {
                        op(
                            &c,
                            &format!("/v1/vms/{agent_vm}/exec"),
                            json!({ "argv": ["true"] }),
                        )
                        .await;
                        r.agent_exec.push(t.elapsed());
                    }
                    _ => {
                        assert_eq!(raw.exec("true", &[])["exitcode"], 0);
                        r.raw_exec.push(t.elapsed());
                    }
                }
            }
        }
        for _ in 0..if only_exec { 0 } else { COPY_ROUNDS } {
            // Through the site: staged, then a job.
            let t = Instant::now();
            let j: Job = user
                .put_stream(
                    &format!("/v1/vms/{id}/files?path=/tmp/s.bin"),
                    &[],
                    gve::api::full(data.clone()),
                )
                .await
                .unwrap();
            r.site_stage.push(t.elapsed());
            let j = common::job_succeeded(&user, &j.id).await;
            r.site_in.push(t.elapsed());
            assert_eq!(j.result.unwrap()["sha256"], sha.as_str());
            let t = Instant::now();
            let j = common::site_job(
                &user,
                &format!("/v1/vms/{id}/copy-out"),
                json!({ "path": "/tmp/s.bin" }),
            )
            .await;
            r.site_out_job.push(t.elapsed());
            let resp = user
                .get_stream(&format!("/v1/jobs/{}/content", j.id))
                .await
                .unwrap();
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            r.site_out.push(t.elapsed());
            assert_eq!(hex::encode(Sha256::digest(&got)), sha);

            // Through the agent: streamed.
            let (copy_in, copy_out) = agent_copy(&c, &agent_vm, "/tmp/a.bin", &data, &sha).await;
            r.agent_in.push(copy_in);
            r.agent_out.push(copy_out);

            let t = Instant::now();
            raw.write("/tmp/r.bin", &data);
            r.raw_in.push(t.elapsed());
            raw.verify("/tmp/r.bin");
            r.raw_in_verified.push(t.elapsed());
            let t = Instant::now();
            let back = raw.read("/tmp/r.bin");
            r.raw_out.push(t.elapsed());
            raw.verify("/tmp/r.bin");
            r.raw_out_verified.push(t.elapsed());
            assert_eq!(back.len(), data.len());
        }
        eprintln!(
            "run {run}: exec site {:.1} ms, agent {:.1} ms, raw {:.1} ms",
            ms(median(r.site_exec.clone())),
            ms(median(r.agent_exec.clone())),
            ms(median(r.raw_exec.clone()))
        );
        all.push(r);
    }
    // The pieces are measured while the agent still serves; then one shutdown.
    let parts = match only_small {
        true => Vec::new(),
        false => pieces::breakdown(&agent, &agent_vm, &c, &raw).await,
    };
    let _ = common::site_job(&user, &format!("/v1/vms/{id}/release"), json!({})).await;
    site.stop().await;
    agent.stop().await;
    if only_small {
        let md = small_table(&all);
        eprintln!("{md}");
        let out = gve_harness::root().join("target/guest-small.md");
        std::fs::write(&out, md).unwrap();
        eprintln!("written to {}", out.display());
    } else if only_exec {
        let mut md = String::new();
        for (i, r) in all.iter().enumerate() {
            let (a, w) = (median(r.agent_exec.clone()), median(r.raw_exec.clone()));
            md += &format!(
                "run {}: site {:.2} ms, agent {:.2} ms, raw {:.2} ms, agent - raw {:+.2} ms\n",
                i + 1,
                ms(median(r.site_exec.clone())),
                ms(a),
                ms(w),
                ms(a) - ms(w)
            );
        }
        for (what, cost, per) in &parts {
            md += &format!("{what}: {cost:.3} ms x {per}\n");
        }
        eprintln!("{md}");
        std::fs::write(gve_harness::root().join("target/guest-exec.md"), md).unwrap();
    } else {
        write(&all, &parts);
    }
}

fn write(runs: &[Run], parts: &[(&str, f64, String)]) {
    let date = today();
    let mut md =
        String::from("# Guest operations: through the site and the agent vs raw qemu-ga\n\n");
    md += &format!(
        "Measured {date} on {} cores, QEMU under TCG, libvirt 9.0, qemu-ga 7.2 in the tiny guest (512 MiB), \
         {} runs on the same VM. Raw = JSON commands sent by this bench with libvirt's qemu-agent-command \
         on the same VM's channel. Site = the user's jobs at an in-process site over the same agent. \
         Produced by `bash bench/run.sh guest`.\n\n",
        cores(),
        runs.len()
    );
    md += &format!(
        "## exec round trip (`true`), median (IQR) of {EXEC_ROUNDS} per run\n\n\
         Site: `POST /v1/vms/{{id}}/exec?wait-ms=60000`, answered when the job ended. Agent: \
         `POST /v1/vms/{{id}}/exec?wait-ms=60000`, answered when the operation ended. Raw: guest-exec, then guest-exec-status with the plugin's back-off \
         (1 ms doubling to 50).\n\n\
         | run | site | agent | raw | agent − raw | site − raw |\n|---|---|---|---|---|---|\n"
    );
    for (i, r) in runs.iter().enumerate() {
        let (s, a, w) = (
            quartiles(r.site_exec.clone()),
            quartiles(r.agent_exec.clone()),
            quartiles(r.raw_exec.clone()),
        );
        let q = |x: (Duration, Duration, Duration)| {
            format!("{:.1} ms ({:.1}–{:.1})", ms(x.0), ms(x.1), ms(x.2))
        };
        let pct = |x: Duration| 100.0 * (ms(x) - ms(w.0)) / ms(w.0);
        md += &format!(
            "| {} | {} | {} | {} | {:+.1} ms ({:+.0}%) | {:+.1} ms ({:+.0}%) |\n",
            i + 1,
            q(s),
            q(a),
            q(w),
            ms(a.0) - ms(w.0),
            pct(a.0),
            ms(s.0) - ms(w.0),
            pct(s.0)
        );
    }
    md += "\n### Where the agent's time goes\n\nEach piece measured alone after the runs (median of 40), \
           and how many times an exec of `true` through the agent pays it:\n\n\
           | piece | cost | per exec |\n|---|---|---|\n";
    for (name, cost, times) in parts {
        md += &format!("| {name} | {cost:.2} ms | {times} |\n");
    }
    md += &format!(
        "\n## copy of {COPY_MIB} MiB, median of {COPY_ROUNDS} per run (MiB/s)\n\n\
         Every gve copy is verified: size and SHA-256 computed in the guest, checked against the \
         client's. Site in = the PUT staged at the site until its 202 (staging alone in brackets), \
         then the job until it ended; site out = the job, then its content fetched (the job alone in \
         brackets).\n\n\
         | run | site in (staging) | agent in | raw in, verified | raw in | site out (job) | agent out | raw out, verified | raw out |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for (i, r) in runs.iter().enumerate() {
        let m = |v: &Vec<Duration>| mibps(median(v.clone()));
        md += &format!(
            "| {} | {:.2} ({:.0}) | {:.2} | {:.2} | {:.2} | {:.2} ({:.2}) | {:.2} | {:.2} | {:.2} |\n",
            i + 1,
            m(&r.site_in),
            m(&r.site_stage),
            m(&r.agent_in),
            m(&r.raw_in_verified),
            m(&r.raw_in),
            m(&r.site_out),
            m(&r.site_out_job),
            m(&r.agent_out),
            m(&r.raw_out_verified),
            m(&r.raw_out)
        );
    }
    md += &small_table(runs);
    md += "\nWrites go in 96 KiB pieces: a guest-file-write of 192 KiB or more never answers on this stack\n\
           (qemu-ga 7.2 behind libvirt 9.0); reads in the agent's chunk, 512 KiB, on both paths (libvirt caps an agent reply at 4 MiB of RPC string).\n\
           The raw path is bound by the guest (TCG) parsing JSON and base64.\n";
    eprintln!("{md}");
    std::fs::write(gve_harness::root().join("bench/results/guest.md"), md).unwrap();
}

/// The copies through the guest agent, per run.
fn small_table(runs: &[Run]) -> String {
    let mut md = format!(
        "\n## copy of {SMALL_MIB} MiB through the guest agent, median of {SMALL_ROUNDS} per run (MiB/s)\n\n\
         Below the staged disk's threshold (4 MiB) gve copies through qemu-ga. Agent = the streamed \
         PUT/GET; raw = the same qemu-ga commands with the same verification (stat and sha256sum in \
         the guest; before reading for a copy out, as gve does). The paths alternate which goes first.\n\n\
         | run | agent in | raw in, verified | agent − raw | agent out | raw out, verified | agent − raw |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for (i, r) in runs.iter().enumerate() {
        let m = |v: &Vec<Duration>| small_mibps(median(v.clone()));
        let pct = |a: f64, b: f64| 100.0 * (a - b) / b;
        let (ai, ri, ao, ro) = (
            m(&r.small_agent_in),
            m(&r.small_raw_in),
            m(&r.small_agent_out),
            m(&r.small_raw_out),
        );
        md += &format!(
            "| {} | {ai:.2} | {ri:.2} | {:+.0}% | {ao:.2} | {ro:.2} | {:+.0}% |\n",
            i + 1,
            pct(ai, ri),
            pct(ao, ro)
        );
    }
    md
}
