//! Live migration of a Xen PV guest between two real Xen 4.17 hosts nested under QEMU
//! (TCG) on this machine, through gve (agent HTTP API → operation → xen plugin →
//! libvirt's migration of the libxl driver) against `virsh migrate --live` between the
//! same two dom0s. The hosts share their pool (one directory, 9p) and a link between
//! the dom0s (UDP between the two QEMUs on 127.0.0.1). The guest ping-pongs between
//! them; migrations alternate the two paths. Writes bench/results/xen-migrate.md. Run
//! with `bash bench/run.sh xen_migrate` (attaches to `GVE_XEN_LAB` when set).
//!
//! Downtime is read from the guest itself: its console ticks five times a second
//! with its uptime, and the kernel advances that by the time the domain stood still,
//! taken from the wall clocks of the two hosts' Xen (both set from this machine's
//! clock before each migration, to a few ms). The largest gap between consecutive
//! ticks, less the tick period, is the downtime (an upper bound: a tick the guest's
//! vCPU was not scheduled for also counts).

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use gve::agent::model::{OpState, Operation};
use gve::agent::Agent;
use gve::api::client::Client;
use gve::plugin::{Grants, Limits, PluginSpec};
use gve_harness::target_dir;
use gve_harness::xen::{console_ticks, stood_still_ms, NestedXen, TEMPLATE};
use hyper::Method;
use serde_json::json;

use common::{cores, median_iqr, publish, today};

const TOKEN: &str = "bench-token-0123456789abcdef";
/// Migrations per path.
const ROUNDS: usize = 2;
const VM: &str = "bm-1";

async fn op(c: &Client, path: &str, body: serde_json::Value) -> Operation {
    let op: Operation = c.call(Method::POST, path, Some(&body)).await.unwrap();
    loop {
        let now: Operation = c
            .get(&format!("/v1/operations/{}?wait-ms=1000", op.id))
            .await
            .unwrap();
        if now.state != OpState::Running {
            assert_eq!(now.state, OpState::Succeeded, "{now:?}");
            return now;
        }
    }
}

async fn agent(xen: &NestedXen, peer: &NestedXen) -> (Agent, Client, tempfile::TempDir) {
    let mut grants = Grants {
        libvirt: vec![xen.uri.clone(), peer.uri.clone()],
        ..Default::default()
    };
    grants.config.insert("storage-pool".into(), "gve".into());
    grants.config.insert("shared-storage".into(), "true".into());
    let spec = PluginSpec {
        bundle: target_dir().join("plugins/xen"),
        grants,
        limits: Limits {
            call_timeout_ms: 600_000,
            ..Default::default()
        },
    };
    common::agent("xen", spec, &xen.uri, TOKEN).await
}

/// The guest's ticks on both hosts' consoles (counter, uptime), repeated where both
/// logged one.
fn ticks(hosts: &[&NestedXen]) -> Vec<(u64, f64)> {
    hosts
        .iter()
        .flat_map(|x| console_ticks(&x.console(VM)))
        .collect()
}

/// Waits until the guest has ticked past `n` (up to 3 minutes).
fn ticked_past(hosts: &[&NestedXen], n: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(180);
    loop {
        let last = ticks(hosts).iter().map(|t| t.0).max().unwrap_or(0);
        if last > n {
            return last;
        }
        assert!(Instant::now() < end, "the guest stopped ticking at {last}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The longest the guest stood still among ticks from `from` on, in ms.
fn stall_ms(hosts: &[&NestedXen], from: u64) -> f64 {
    stood_still_ms(ticks(hosts).into_iter().filter(|t| t.0 >= from).collect())
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
    let lab = gve_harness::xen::shared();
    let hosts = [&*lab, lab.second()];
    eprintln!("nested Xen hosts up in {:?}", booted.elapsed());
    for x in hosts {
        x.clear("bm-");
    }
    let (a1, c1, _d1) = agent(hosts[0], hosts[1]).await;
    let (a2, c2, _d2) = agent(hosts[1], hosts[0]).await;
    let clients = [&c1, &c2];
    let vm = op(
        &c1,
        "/v1/vms",
        json!({ "name": VM, "template": TEMPLATE, "main-memory-mib": 128 }),
    )
    .await
    .result
    .unwrap();
    op(&c1, &format!("/v1/vms/{}/start", vm.id), json!({})).await;
    ticked_past(&hosts, 10);
    let (mut gve_total, mut gve_stall, mut virsh_total, mut virsh_stall) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut on = 0;
    for i in 0..2 * ROUNDS {
        let to = 1 - on;
        // Alternate the paths: gve, virsh, virsh, gve, ...
        let through_gve = matches!(i % 4, 0 | 3);
        for x in hosts {
            x.sync_clock();
        }
        let from = ticked_past(&hosts, 0);
        let t = Instant::now();
        if through_gve {
            op(
                clients[on],
                &format!("/v1/vms/{}/migrate", vm.id),
                json!({ "destination": hosts[to].uri, "live": true }),
            )
            .await;
        } else {
            common::virsh(
                &hosts[on].uri,
                &[
                    "migrate",
                    "--live",
                    "--persistent",
                    "--undefinesource",
                    VM,
                    &hosts[to].uri,
                ],
            )
            .await;
        }
        let took = t.elapsed();
        ticked_past(&hosts, from + 10);
        let stall = Duration::from_secs_f64(stall_ms(&hosts, from.saturating_sub(5)) / 1000.0);
        eprintln!(
            "migration {i} ({}) host {} -> {}: {took:?}, stood still {stall:?}",
            if through_gve { "gve" } else { "virsh" },
            on + 1,
            to + 1
        );
        if through_gve {
            gve_total.push(took);
            gve_stall.push(stall);
        } else {
            virsh_total.push(took);
            virsh_stall.push(stall);
        }
        on = to;
        // Both registries learn where it went (a virsh migration is out of band).
        for c in clients {
            c.call::<_, serde_json::Value>(Method::POST, "/v1/reconcile", Some(&json!({})))
                .await
                .unwrap();
        }
    }
    op(
        clients[on],
        &format!("/v1/vms/{}/destroy", vm.id),
        json!({}),
    )
    .await;
    a1.stop().await;
    a2.stop().await;
    let mut md = String::from(
        "# Xen: live migration through gve vs `virsh migrate --live` between the same two hosts\n\n",
    );
    md += &format!(
        "Measured {} on {} cores: two Xen 4.17 hosts nested under QEMU (TCG) on this one machine,\n\
         each a QEMU with 3 GiB and 2 vCPUs, so the two hosts and the agents share 2 cores; libvirt\n\
         9.0's libxl driver in each dom0, the pool shared (one directory over 9p), the memory sent\n\
         from dom0 to dom0 over a link between the two QEMUs (UDP on 127.0.0.1). The harness's PV\n\
         guest, 128 MiB. Median and IQR of {ROUNDS} migrations per path, alternating; the guest\n\
         goes back and forth. Total: from the request until the operation succeeded (gve) or\n\
         virsh returned. Downtime: the largest jump of the guest's own uptime between two\n\
         consecutive console ticks (every 200 ms), less the tick period, with both Xen wall clocks\n\
         set from this machine's before each migration (see the header of `bench/xen_migrate.rs`).\n\
         Produced by `bash bench/run.sh xen_migrate`.\n\n",
        today(),
        cores()
    );
    md += "| measure | through gve: median (IQR) | virsh: median (IQR) |\n|---|---|---|\n";
    for (name, g, v) in [
        ("total", gve_total, virsh_total),
        ("downtime (guest's view)", gve_stall, virsh_stall),
    ] {
        md += &format!("| {name} | {} | {} |\n", median_iqr(g), median_iqr(v));
    }
    publish("xen-migrate.md", &md);
}
