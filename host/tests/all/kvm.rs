//! The kvm driver on real QEMU guests (TCG) under a private libvirtd, through the
//! agent's HTTP API.

use std::time::{Duration, Instant};

use gve::agent::model::{Event, OpState, VmRecord, VmState};
use gve::api::client::Client;
use gve::plugin::{DriverSession, Grants, Limits, PluginSpec};
use serde_json::json;

use crate::agent::{run_op, start_agent, wait_for_event};
use crate::libvirtd::Libvirtd;
use crate::support::bundle;

fn kvm_spec(lv: &Libvirtd) -> PluginSpec {
    let mut grants = Grants {
        libvirt: vec![lv.uri.clone()],
        ..Default::default()
    };
    grants.config.insert("storage-pool".into(), "gve".into());
    grants
        .config
        .insert("shutdown-timeout-ms".into(), "2000".into());
    PluginSpec {
        bundle: bundle("kvm"),
        grants,
        limits: Limits {
            call_timeout_ms: 60_000,
            ..Default::default()
        },
    }
}

/// Waits until the VM's qemu-ga answers guest-ping through the driver.
async fn wait_for_guest_agent(driver: &DriverSession, vm: &str) -> Duration {
    let t = Instant::now();
    loop {
        match driver
            .guest_agent_command(vm, r#"{"execute":"guest-ping"}"#, 2000)
            .await
        {
            Ok(reply) if reply.contains("return") => return t.elapsed(),
            _ if t.elapsed() > Duration::from_secs(60) => {
                panic!("the guest agent of {vm} never answered")
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

async fn state(c: &Client, vm: &str) -> VmState {
    c.get::<VmRecord>(&format!("/v1/vms/{vm}"))
        .await
        .unwrap()
        .vm
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_real_qemu_guests() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = start_agent("kvm", kvm_spec(&lv), &lv.uri, 60_000).await;
    let templates: Vec<serde_json::Value> = c.get("/v1/templates").await.unwrap();
    assert!(
        templates.iter().any(|t| t["name"] == "tiny"),
        "{templates:?}"
    );

    let op = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "k-1", "template": "tiny", "main-memory-mib": 192,
        "logical-cpus": 1, "labels": { "owner": "alice" } }),
    )
    .await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let vm = op.result.unwrap();
    assert_eq!((vm.state, vm.main_memory_mib), (VmState::Stopped, 192));
    assert_eq!(vm.labels["owner"], "alice");
    // A linked clone: a qcow2 overlay whose backing file is the template's disk.
    let disk = lv.images.join("k-1-disk0.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info["backing-filename"]
            .as_str()
            .unwrap_or("")
            .ends_with("tiny-base.qcow2"),
        "{info}"
    );

    let op = run_op(&c, &format!("/v1/vms/{}/start", vm.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert_eq!(state(&c, &vm.id).await, VmState::Running);
    let driver = agent.core.as_ref().unwrap().driver.clone();
    let up = wait_for_guest_agent(&driver, &vm.id).await;
    eprintln!("k-1: guest agent answered {up:?} after start");

    assert_eq!(
        run_op(&c, &format!("/v1/vms/{}/suspend", vm.id), json!({}))
            .await
            .state,
        OpState::Succeeded
    );
    assert_eq!(state(&c, &vm.id).await, VmState::Suspended);
    assert_eq!(lv.virsh(&["domstate", "k-1"]).trim(), "paused");
    assert_eq!(
        run_op(&c, &format!("/v1/vms/{}/resume", vm.id), json!({}))
            .await
            .state,
        OpState::Succeeded
    );
    wait_for_guest_agent(&driver, &vm.id).await;

    // The tiny guest ignores ACPI: a graceful shutdown times out and is forced.
    let op = run_op(&c, &format!("/v1/vms/{}/shutdown", vm.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert_eq!(state(&c, &vm.id).await, VmState::Stopped);
    assert_eq!(lv.virsh(&["domstate", "k-1"]).trim(), "shut off");

    let linked = run_op(
        &c,
        &format!("/v1/vms/{}/clone", vm.id),
        json!({ "name": "k-2", "linked": true }),
    )
    .await;
    assert_eq!(linked.state, OpState::Succeeded, "{linked:?}");
    let full = run_op(
        &c,
        &format!("/v1/vms/{}/clone", vm.id),
        json!({ "name": "k-3", "linked": false }),
    )
    .await;
    assert_eq!(full.state, OpState::Succeeded, "{full:?}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(lv.images.join("k-3-disk0.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info.get("backing-filename").is_none(),
        "a full clone has no backing file: {info}"
    );

    let k3 = full.result.unwrap();
    assert_eq!(
        run_op(&c, &format!("/v1/vms/{}/start", k3.id), json!({}))
            .await
            .state,
        OpState::Succeeded
    );
    wait_for_guest_agent(&driver, &k3.id).await;
    for v in [&k3.id, &linked.result.unwrap().id, &vm.id] {
        let op = run_op(&c, &format!("/v1/vms/{v}/destroy"), json!({})).await;
        assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    }
    let vms: Vec<VmRecord> = c.get("/v1/vms").await.unwrap();
    assert!(vms.is_empty(), "{vms:?}");
    let left: Vec<_> = std::fs::read_dir(&lv.images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("tiny-base.qcow2")],
        "orphan disks"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virsh_behind_the_agents_back_is_reflected_within_the_reconcile_period() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = start_agent("kvm", kvm_spec(&lv), &lv.uri, 500).await;
    let vm = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "oob-1", "template": "tiny" }),
    )
    .await
    .result
    .unwrap();
    let seq = c
        .get::<Vec<Event>>("/v1/events")
        .await
        .unwrap()
        .last()
        .map(|e| e.seq)
        .unwrap_or(0);

    lv.virsh(&["start", "oob-1"]);
    let e = wait_for_event(&c, seq, "vm-state-changed", &vm.id).await;
    assert_eq!(e.detail["to"], "running");
    let seq = e.seq;
    lv.virsh(&["destroy", "oob-1"]);
    let e = wait_for_event(&c, seq, "vm-state-changed", &vm.id).await;
    assert_eq!(e.detail["to"], "stopped");
    assert_eq!(state(&c, &vm.id).await, VmState::Stopped);

    lv.virsh(&["undefine", "oob-1"]);
    wait_for_event(&c, e.seq, "vm-vanished", &vm.id).await;
    agent.stop().await;
}
