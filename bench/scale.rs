//! An agent with 100,000 VMs and a site over it: what the background loops cost.
//!
//! A memory-driver agent (reconcile every 5 s, its default) and a site (health
//! check every 5 s, its default) in this process. The VMs are made on the
//! simulated hypervisor behind the agent's back, the way a host with VMs made
//! outside gve looks, and reach the registry and the site the way such VMs do:
//! the agent's reconcile adopts them, the site's health check adopts them from
//! the agent's listing. Measured:
//!
//! - the reconcile pass that adopts them, and an idle pass (nothing changed);
//! - the site's first check (adopting every VM) and how long until it holds them;
//! - reading the agent's whole listing, and a conditional read answered 304;
//! - the CPU the idle site and agent use over 30 s, and which listings the
//!   site's checks read in full;
//! - the process's resident memory.
//!
//! Writes bench/results/scale.md. `bash bench/run.sh scale`; GVE_SCALE_VMS
//! (default 100000) sets the count.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use gve::agent::model::VmRecord;
use gve::api::client::{Client, Listing};
use gve::plugin::bindings::types::{Credentials, VmProfile};
use gve::plugin::{Grants, Limits, PluginSpec};
use gve::site::model::SiteVm;
use gve::site::{Site, SiteConfig};
use gve_harness::target_dir;
use hyper::Method;
use serde_json::{json, Value};

const ADMIN: &str = "bench-site-admin-0123456789";
const AGENT: &str = "bench-agent-token-0123456789";

fn profile(name: String) -> VmProfile {
    VmProfile {
        name,
        logical_cpus: 1,
        main_memory_mib: 16,
        disk_mib: None,
        template: None,
        image: None,
        os_family: None,
        os_name: None,
        os_version: None,
        platform: None,
        network: None,
        labels: vec![],
    }
}

async fn listing_counts(admin: &Client) -> (f64, f64) {
    use http_body_util::BodyExt;
    let resp = admin.get_stream("/metrics").await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body).to_string();
    let sample = |outcome: &str| {
        let series = format!("gve_site_agent_vm_listings_total{{state=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
            .unwrap_or(0.0)
    };
    (sample("read"), sample("unchanged"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("GVE_SCALE_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let status = std::process::Command::new("bash")
        .arg(gve_harness::root().join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success());
    let mut lines: Vec<String> = Vec::new();
    let mut note = |s: String| {
        println!("{s}");
        lines.push(s);
    };

    // The simulated hypervisor holds every VM in the plugin's memory.
    let spec = PluginSpec {
        bundle: target_dir().join("plugins/memory"),
        grants: Grants::default(),
        limits: Limits {
            memory_mib: 1024,
            call_timeout_ms: 300_000,
            ..Default::default()
        },
    };
    let endpoint = format!("memory:scale-{}", uuid::Uuid::new_v4());
    let (agent, ac, _adir) = common::agent_with(
        "memory",
        spec,
        &endpoint,
        AGENT,
        gve_harness::agent::reconcile_every(5_000),
    )
    .await;
    let behind = agent
        .plugins
        .open_driver(
            "memory",
            &endpoint,
            Credentials {
                username: None,
                password: None,
                token: None,
            },
        )
        .await
        .unwrap();
    let t = Instant::now();
    for i in 0..n {
        behind.create(&profile(format!("vm-{i:06}"))).await.unwrap();
    }
    note(format!(
        "| {n} VMs made on the simulated hypervisor | {:.1} s |",
        t.elapsed().as_secs_f64()
    ));

    let t = Instant::now();
    let r: Value = ac
        .call(Method::POST, "/v1/reconcile", Some(&json!({})))
        .await
        .unwrap();
    // The periodic passes adopt what was made while they ran; this one the rest.
    note(format!(
        "| agent: a reconcile pass adopting the last {} of them | {:.2} s |",
        r["appeared"].as_array().map_or(0, Vec::len),
        t.elapsed().as_secs_f64()
    ));
    let mut idle = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r: Value = ac
            .call(Method::POST, "/v1/reconcile", Some(&json!({})))
            .await
            .unwrap();
        assert_eq!(r["appeared"].as_array().map_or(1, Vec::len), 0, "{r}");
        idle.push(t.elapsed());
    }
    let (med, q1, q3) = common::quartiles(idle);
    note(format!(
        "| agent: an idle reconcile pass (median, IQR of 5) | {:.0} ms ({:.0}-{:.0}) |",
        common::ms(med),
        common::ms(q1),
        common::ms(q3)
    ));

    let t = Instant::now();
    let all: Vec<VmRecord> = ac.get_pages("/v1/vms", usize::MAX).await.unwrap();
    assert!(all.len() >= n, "{}", all.len());
    note(format!(
        "| agent: reading the whole listing ({} pages of 1,000) | {:.2} s |",
        all.len().div_ceil(1000),
        t.elapsed().as_secs_f64()
    ));
    let tag = match ac
        .get_pages_unless::<VmRecord>("/v1/vms?limit=1", 1, None)
        .await
        .unwrap()
    {
        Listing::Changed { tag, .. } => tag.expect("a tagged listing"),
        Listing::Unchanged => unreachable!("an unconditional read"),
    };
    let t = Instant::now();
    let got = ac
        .get_pages_unless::<VmRecord>("/v1/vms", usize::MAX, Some(&tag))
        .await
        .unwrap();
    assert!(matches!(got, Listing::Unchanged));
    note(format!(
        "| agent: the same listing asked with its tag (304) | {:.2} ms |",
        common::ms(t.elapsed())
    ));
    drop(all);

    let dir = tempfile::tempdir_in(target_dir()).unwrap();
    let mut config = SiteConfig::new(dir.path().to_path_buf(), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    let t = Instant::now();
    let _: Value = admin
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({ "id": "a-0", "url": format!("http://{}", agent.addr), "token": AGENT })),
        )
        .await
        .unwrap();
    note(format!(
        "| site: registering the agent (its first check adopts every VM) | {:.2} s |",
        t.elapsed().as_secs_f64()
    ));
    let t = Instant::now();
    let held: Vec<SiteVm> = admin
        .get_pages("/v1/vms?all=true", usize::MAX)
        .await
        .unwrap();
    assert!(held.len() >= n, "the site holds {} VMs", held.len());
    note(format!(
        "| site: the admin reading the whole inventory ({} VMs) | {:.2} s |",
        held.len(),
        t.elapsed().as_secs_f64()
    ));
    drop(held);

    // Let the first periods pass, then measure the idle loops.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (read0, unchanged0) = listing_counts(&admin).await;
    let (c0, t0) = (common::cpu_seconds("self"), Instant::now());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let cpu = (common::cpu_seconds("self") - c0) / t0.elapsed().as_secs_f64();
    let (read1, unchanged1) = listing_counts(&admin).await;
    note(format!(
        "| idle site + agent over 30 s: CPU | {:.1}% of a core |",
        cpu * 100.0
    ));
    note(format!(
        "| idle: the site's checks that read every VM / were answered 304 | {} / {} |",
        read1 - read0,
        unchanged1 - unchanged0
    ));
    note(format!(
        "| resident memory of the process (site, agent, plugin with every VM, bench) | {:.0} MiB |",
        common::rss_mib()
    ));
    site.stop().await;
    agent.stop().await;

    let md = format!(
        "# An agent with {n} VMs, and a site over it\n\n\
         `bench/scale.rs` on {}, {} cores. A memory-driver agent (reconcile every 5 s) and a \
         site (health check every 5 s) in one process, databases on disk. The VMs are made on \
         the simulated hypervisor behind the agent's back; the agent's reconcile and then the \
         site's health check adopt them, as they would VMs made outside gve.\n\n\
         | measure | value |\n|---|---|\n{}\n",
        common::today(),
        common::cores(),
        lines.join("\n")
    );
    let out = gve_harness::root().join("bench/results/scale.md");
    std::fs::write(&out, md).unwrap();
    println!("wrote {}", out.display());
}
