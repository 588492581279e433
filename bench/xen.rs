//! Start and graceful-shutdown latency of a Xen PV guest through gve (the agent's HTTP
//! API → operation → xen plugin → libvirt's libxl driver in dom0) against
//! `virsh -c xen+tcp://…` on the same dom0, on a real Xen 4.17 nested under QEMU
//! (TCG). Rounds alternate the two paths. Writes bench/results/xen.md. Run with
//! `bash bench/run.sh xen`.
//!
//! A start ends when libvirt reports the domain running; a shutdown when it reports
//! it shut off, the guest having powered itself off (virsh: `virsh shutdown`, then
//! `virsh domstate` every 100 ms, the driver's own polling period).

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use gve::agent::model::{OpState, Operation};
use gve::api::client::Client;
use gve::plugin::{Grants, Limits, PluginSpec};
use gve_harness::target_dir;
use gve_harness::xen::{NestedXen, TEMPLATE};
use hyper::Method;
use serde_json::json;

use common::{cores, median_iqr, ms, publish, quartiles, today};

const TOKEN: &str = "bench-token-0123456789abcdef";
const ROUNDS: usize = 8;

async fn op(c: &Client, path: &str, body: serde_json::Value) -> Operation {
    let op: Operation = c.call(Method::POST, path, Some(&body)).await.unwrap();
    loop {
        let now: Operation = c.get(&format!("/v1/operations/{}", op.id)).await.unwrap();
        if now.state != OpState::Running {
            assert_eq!(now.state, OpState::Succeeded, "{now:?}");
            return now;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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
    let booted = Instant::now();
    let xen = NestedXen::boot();
    eprintln!("nested Xen up in {:?} at {}", booted.elapsed(), xen.uri);
    let mut grants = Grants {
        libvirt: vec![xen.uri.clone()],
        ..Default::default()
    };
    grants.config.insert("storage-pool".into(), "gve".into());
    let spec = PluginSpec {
        bundle: target_dir().join("plugins/xen"),
        grants,
        limits: Limits {
            call_timeout_ms: 120_000,
            ..Default::default()
        },
    };
    let (agent, c, _dir) = common::agent("xen", spec, &xen.uri, TOKEN).await;
    let vm = op(
        &c,
        "/v1/vms",
        json!({ "name": "bx-1", "template": TEMPLATE, "main-memory-mib": 128 }),
    )
    .await
    .result
    .unwrap();
    let (mut gve_start, mut gve_stop, mut virsh_start, mut virsh_stop) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for path in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            if path == 0 {
                let t = Instant::now();
                op(&c, &format!("/v1/vms/{}/start", vm.id), json!({})).await;
                gve_start.push(t.elapsed());
                // Let the guest's kernel come up before it is asked to power off.
                tokio::time::sleep(Duration::from_secs(8)).await;
                let t = Instant::now();
                op(
                    &c,
                    &format!("/v1/vms/{}/shutdown", vm.id),
                    json!({ "force": false }),
                )
                .await;
                gve_stop.push(t.elapsed());
            } else {
                let t = Instant::now();
                common::virsh(&xen.uri, &["start", "bx-1"]).await;
                virsh_start.push(t.elapsed());
                tokio::time::sleep(Duration::from_secs(8)).await;
                let t = Instant::now();
                common::virsh(&xen.uri, &["shutdown", "bx-1"]).await;
                while common::virsh(&xen.uri, &["domstate", "bx-1"]).await != "shut off" {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                virsh_stop.push(t.elapsed());
                // Let the agent's registry see it stopped before its next round.
                c.call::<_, serde_json::Value>(Method::POST, "/v1/reconcile", Some(&json!({})))
                    .await
                    .unwrap();
            }
            // Xen tears the domain down a moment after libvirt reports it off.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        eprintln!("round {round} done");
    }
    op(&c, &format!("/v1/vms/{}/destroy", vm.id), json!({})).await;
    agent.stop().await;
    let mut md = String::from(
        "# Xen: start and graceful shutdown through gve vs `virsh` on the same dom0\n\n",
    );
    md += &format!(
        "Measured {} on {} cores: Xen 4.17 nested under QEMU (TCG), libvirt 9.0's libxl driver in\n\
         dom0, reached at `xen+tcp://127.0.0.1:PORT/system` through QEMU's port forward; the harness's\n\
         PV guest (Debian's kernel and a busybox initramfs, 128 MiB, a 16 MiB raw disk). Median and IQR\n\
         of {ROUNDS} rounds; rounds alternate the two paths. A start ends when libvirt reports the\n\
         domain running (gve: when the start operation has succeeded, polled every 2 ms); a shutdown\n\
         when libvirt reports it shut off after the guest powered itself off (virsh: `virsh shutdown`,\n\
         then `virsh domstate` every 100 ms, the driver's own polling period). Produced by\n\
         `bash bench/run.sh xen`.\n\n",
        today(),
        cores()
    );
    md += "| operation | through gve: median (IQR) | virsh: median (IQR) | overhead of the medians |\n|---|---|---|---|\n";
    for (name, g, v) in [
        ("start", gve_start, virsh_start),
        ("graceful shutdown", gve_stop, virsh_stop),
    ] {
        let overhead = (ms(quartiles(g.clone()).0) / ms(quartiles(v.clone()).0) - 1.0) * 100.0;
        md += &format!(
            "| {name} | {} | {} | {overhead:+.1}% |\n",
            median_iqr(g),
            median_iqr(v)
        );
    }
    publish("xen.md", &md);
}
