//! Time to start N = 1, 2, 4, 8 VMs at once through the agent (HTTP API → operation →
//! kvm plugin → libvirt) against `virsh start` on the same daemon, on real QEMU guests
//! (TCG). The paper reported up to 17% overhead at N = 8; the target is under 2%.
//!
//! Each round starts the N VMs at once and ends when every one is running, then
//! destroys them; rounds alternate the two paths. Writes bench/results/vm-start.md.
//! Run with `bash bench/run.sh`.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use gve::agent::model::{OpState, Operation};
use gve::api::client::Client;
use gve::plugin::{Grants, Limits, PluginSpec};
use gve_harness::{target_dir, Libvirtd};
use hyper::Method;
use serde_json::json;

use common::{cores, ms, quartiles, today};

const TOKEN: &str = "bench-token-0123456789abcdef";
const ROUNDS: usize = 15;
const SIZES: [usize; 4] = [1, 2, 4, 8];

async fn wait_op(c: &Client, op: Operation) -> Operation {
    loop {
        let now: Operation = c.get(&format!("/v1/operations/{}", op.id)).await.unwrap();
        if now.state != OpState::Running {
            assert_eq!(now.state, OpState::Succeeded, "{now:?}");
            return now;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn through_agent(c: &Client, ids: &[String]) -> Duration {
    let t = Instant::now();
    let mut waits = Vec::new();
    for id in ids {
        let c = c.clone();
        let id = id.clone();
        waits.push(tokio::spawn(async move {
            let op: Operation = c
                .call(
                    Method::POST,
                    &format!("/v1/vms/{id}/start"),
                    Some(&json!({})),
                )
                .await
                .unwrap();
            wait_op(&c, op).await
        }));
    }
    for w in waits {
        w.await.unwrap();
    }
    t.elapsed()
}

async fn with_virsh(uri: &str, names: &[String]) -> Duration {
    let t = Instant::now();
    let mut children = Vec::new();
    for n in names {
        children.push(
            tokio::process::Command::new("virsh")
                .args(["-q", "-c", uri, "start", n])
                .output(),
        );
    }
    for c in children {
        let out = c.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    t.elapsed()
}

fn stop_all(lv: &Libvirtd, names: &[String]) {
    for n in names {
        lv.virsh(&["destroy", n]);
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
    let lv = Libvirtd::start();
    let mut grants = Grants {
        libvirt: vec![lv.uri.clone()],
        ..Default::default()
    };
    grants.config.insert("storage-pool".into(), "gve".into());
    let spec = PluginSpec {
        bundle: target_dir().join("plugins/kvm"),
        grants,
        limits: Limits {
            call_timeout_ms: 120_000,
            ..Default::default()
        },
    };
    let (agent, c, _agent_dir) = common::agent("kvm", spec, &lv.uri, TOKEN).await;
    let max = *SIZES.iter().max().unwrap();
    let mut names = Vec::new();
    let mut ids = Vec::new();
    for i in 0..max {
        let op: Operation = c
            .call(Method::POST, "/v1/vms", Some(&json!({ "name": format!("b-{i}"), "template": "tiny", "main-memory-mib": 128 })))
            .await
            .unwrap();
        let vm = wait_op(&c, op).await.result.unwrap();
        names.push(vm.name);
        ids.push(vm.id);
    }
    let mut rows = Vec::new();
    for n in SIZES {
        let (mut agent_t, mut virsh_t) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            // Alternate which path goes first, so warm-up effects do not favour one.
            for path in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                let t = if path == 0 {
                    through_agent(&c, &ids[..n]).await
                } else {
                    with_virsh(&lv.uri, &names[..n]).await
                };
                stop_all(&lv, &names[..n]);
                if path == 0 {
                    agent_t.push(t)
                } else {
                    virsh_t.push(t)
                }
                // Let the agent's registry see the VMs stopped before the next round.
                c.call::<_, serde_json::Value>(Method::POST, "/v1/reconcile", Some(&json!({})))
                    .await
                    .unwrap();
            }
        }
        let (a, v) = (quartiles(agent_t), quartiles(virsh_t));
        let overhead = (a.0.as_secs_f64() / v.0.as_secs_f64() - 1.0) * 100.0;
        eprintln!(
            "N={n}: agent {:?}, virsh {:?}, overhead {overhead:+.1}%",
            a.0, v.0
        );
        rows.push((n, a, v, overhead));
    }
    agent.stop().await;
    let mut md =
        String::from("# Time to start N VMs at once: through the agent vs `virsh start`\n\n");
    md += &format!(
        "Measured {} on {} cores, QEMU under TCG, libvirt 9.0, the tiny guest (128 MiB). Median of {ROUNDS} rounds per N;\n\
         rounds alternate the two paths. A start ends when libvirt reports the domain running (the agent: when\n\
         every start operation has succeeded, polled every 2 ms). Produced by `bash bench/run.sh`.\n\n",
        today(),
        cores()
    );
    md += "| N | through the agent: median (IQR) | virsh start: median (IQR) | overhead of the medians |\n|---|---|---|---|\n";
    for (n, a, v, o) in rows {
        md += &format!(
            "| {n} | {:.0} ms ({:.0}–{:.0}) | {:.0} ms ({:.0}–{:.0}) | {o:+.1}% |\n",
            ms(a.0),
            ms(a.1),
            ms(a.2),
            ms(v.0),
            ms(v.1),
            ms(v.2)
        );
    }
    let out = gve_harness::root().join("bench/results/vm-start.md");
    std::fs::write(&out, md).unwrap();
    println!("{}", std::fs::read_to_string(out).unwrap());
}
