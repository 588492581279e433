//! The kvm driver on real QEMU guests (TCG) under a private libvirtd, through the
//! agent's HTTP API.

use std::time::{Duration, Instant};

use gve::agent::model::{OpState, VmRecord, VmState};
use gve::api::client::Client;
use gve::plugin::{DriverSession, Grants, Limits, PluginSpec};
use serde_json::json;

use crate::agent::{last_event_seq, post, run_op, start_agent, wait_for_event};
use crate::support::bundle;
use gve_harness::Libvirtd;

/// [`kvm_spec`] for `lv`, also granted to migrate to `to` over shared storage
/// (both daemons see the same files: one machine), with `config` on top.
pub fn migrating_spec(lv: &Libvirtd, to: &Libvirtd, config: &[(&str, &str)]) -> PluginSpec {
    let mut spec = kvm_spec(lv);
    spec.grants.libvirt.push(to.migration_uri());
    for (k, v) in [("shared-storage", "true")].iter().chain(config) {
        spec.grants.config.insert(k.to_string(), v.to_string());
    }
    spec
}

pub fn kvm_spec(lv: &Libvirtd) -> PluginSpec {
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
pub async fn wait_for_guest_agent(driver: &DriverSession, vm: &str) -> Duration {
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
    let driver = agent.core().unwrap().driver.clone();
    let up = wait_for_guest_agent(&driver, &vm.id).await;
    eprintln!("k-1: guest agent answered {up:?} after start");
    // No guest plugin configured and kvm has no native guest operations.
    let e = post(
        &c,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["true"] }),
    )
    .await
    .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (501, "unsupported"), "{e}");

    // Bad input: a clear 4xx, and nothing changes.
    let ops_before = c
        .get::<Vec<serde_json::Value>>("/v1/operations")
        .await
        .unwrap()
        .len();
    let e = post(&c, &format!("/v1/vms/{}/start", vm.id), json!({}))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status, e.kind.as_str()),
        (409, "invalid-state"),
        "{}",
        e.message
    );
    let e = post(
        &c,
        "/v1/vms",
        json!({ "name": "k-x", "template": "no-such" }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.status, 404, "{}", e.message);
    let e = post(&c, "/v1/vms/no-such-vm/suspend", json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.status, 404, "{}", e.message);
    let e = post(
        &c,
        &format!("/v1/vms/{}/clone", vm.id),
        json!({ "nmae": "k-y" }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.status, 400, "{}", e.message);
    assert_eq!(
        c.get::<Vec<serde_json::Value>>("/v1/operations")
            .await
            .unwrap()
            .len(),
        ops_before
    );
    assert_eq!(state(&c, &vm.id).await, VmState::Running);
    assert!(lv
        .virsh(&["list", "--all", "--name"])
        .lines()
        .all(|l| l.trim() != "k-x"));

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

    // A running VM's disks are in use: a clone of it is refused, leaving no disk.
    let refused = run_op(
        &c,
        &format!("/v1/vms/{}/clone", vm.id),
        json!({ "name": "k-r", "linked": false }),
    )
    .await;
    assert_eq!(refused.state, OpState::Failed, "{refused:?}");
    let e = refused.error.unwrap();
    assert_eq!(e.kind, "invalid-state", "{e:?}");
    assert!(e.message.contains("shut it down first"), "{e:?}");
    assert!(!lv.images.join("k-r-disk0.qcow2").exists());

    // The tiny guest ignores ACPI: a graceful shutdown times out and is forced.
    // Asked to wait 60 s for it in an 8 s call budget, the plugin waits what is
    // left of the call less the time powering off takes: the sandbox never stops
    // the call (which would fail the shutdown and drop the instance).
    let mut patient = kvm_spec(&lv);
    patient
        .grants
        .config
        .insert("shutdown-timeout-ms".into(), "60000".into());
    patient.limits.call_timeout_ms = 8_000;
    agent.plugins.replace("kvm", patient).await.unwrap();
    let t = Instant::now();
    let op = run_op(&c, &format!("/v1/vms/{}/shutdown", vm.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    crate::metrics::assert_no_deadline_stop(&agent, "kvm");
    agent.plugins.replace("kvm", kvm_spec(&lv)).await.unwrap();
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
    let seq = last_event_seq(&c).await;

    lv.virsh(&["start", "oob-1"]);
    // QEMU starts paused and libvirt resumes it: a reconcile pass may see that
    // transient state first, so wait for the change that ends in `running`.
    let e = wait_for_state(&c, seq, &vm.id, "running").await;
    let seq = e.seq;
    lv.virsh(&["destroy", "oob-1"]);
    let e = wait_for_state(&c, seq, &vm.id, "stopped").await;
    assert_eq!(state(&c, &vm.id).await, VmState::Stopped);

    lv.virsh(&["undefine", "oob-1"]);
    wait_for_event(&c, e.seq, "vm-vanished", &vm.id).await;
    agent.stop().await;
}

/// Waits (up to 10 s) for a `vm-state-changed` event of `vm` to state `to` after `seq`.
async fn wait_for_state(c: &Client, mut seq: u64, vm: &str, to: &str) -> gve::agent::model::Event {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let e = wait_for_event(c, seq, "vm-state-changed", vm).await;
        if e.detail["to"] == to {
            return e;
        }
        assert!(
            Instant::now() < end,
            "{vm} never changed to {to}; last {e:?}"
        );
        seq = e.seq;
    }
}

/// Runs `script` with `/bin/sh -c` in the guest through qemu-ga's guest-exec (via
/// the driver, not gve's guest plugin); returns its exit code and stdout.
pub async fn guest_sh(driver: &DriverSession, vm: &str, script: &str) -> (i64, String) {
    let exec = json!({"execute": "guest-exec", "arguments":
        {"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}});
    let reply = driver
        .guest_agent_command(vm, &exec.to_string(), 5000)
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let pid = reply["return"]["pid"].as_i64().expect("guest-exec pid");
    let status = format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        let s = driver.guest_agent_command(vm, &status, 5000).await.unwrap();
        let s: serde_json::Value = serde_json::from_str(&s).unwrap();
        if s["return"]["exited"] == true {
            use base64::Engine;
            let out = s["return"]["out-data"].as_str().unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(out)
                .unwrap();
            let code = s["return"]["exitcode"].as_i64().unwrap_or(-1);
            return (code, String::from_utf8_lossy(&bytes).into_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("guest-exec of {script:?} did not finish in 120 s");
}

/// Reads the guest's tick counter (/tmp/counter).
async fn guest_counter(driver: &DriverSession, vm: &str) -> u64 {
    let (code, out) = guest_sh(driver, vm, "cat /tmp/counter").await;
    assert_eq!(code, 0, "cat /tmp/counter: {out}");
    out.trim().parse().expect("a counter value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_between_two_agents_keeps_the_guest_running_managed_or_peer_to_peer() {
    let (a, b) = (Libvirtd::start(), Libvirtd::start());
    let dest = b.migration_uri();
    let spec_a = migrating_spec(&a, &b, &[]);
    let (agent_a, ca, _da) = start_agent("kvm", spec_a, &a.uri, 60_000).await;
    // B migrates back peer-to-peer: its libvirtd drives the migration to A's.
    let spec_b = migrating_spec(&b, &a, &[("peer-to-peer", "true")]);
    let (agent_b, cb, _db) = start_agent("kvm", spec_b, &b.uri, 300).await;
    let vm = run_op(
        &ca,
        "/v1/vms",
        json!({ "name": "mig-1", "template": "tiny" }),
    )
    .await
    .result
    .unwrap();
    assert_eq!(
        run_op(&ca, &format!("/v1/vms/{}/start", vm.id), json!({}))
            .await
            .state,
        OpState::Succeeded
    );
    let drv_a = agent_a.core().unwrap().driver.clone();
    wait_for_guest_agent(&drv_a, &vm.id).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = guest_counter(&drv_a, &vm.id).await;
    assert!(before >= 2, "the guest's counter runs: {before}");
    let seq_b = last_event_seq(&cb).await;

    let t = Instant::now();
    let op = run_op(
        &ca,
        &format!("/v1/vms/{}/migrate", vm.id),
        json!({ "destination": dest, "live": true }),
    )
    .await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    eprintln!("mig-1: live migration took {:?}", t.elapsed());

    // Agent A no longer has it; agent B found it, running, with the same id.
    assert_eq!(
        ca.get::<VmRecord>(&format!("/v1/vms/{}", vm.id))
            .await
            .unwrap_err()
            .status,
        404
    );
    wait_for_event(&cb, seq_b, "vm-appeared", &vm.id).await;
    assert_eq!(state(&cb, &vm.id).await, VmState::Running);
    assert!(a
        .virsh(&["list", "--all", "--name"])
        .lines()
        .all(|l| l.trim() != "mig-1"));
    // The guest kept running: its counter went on from where it was.
    let drv_b = agent_b.core().unwrap().driver.clone();
    let after = guest_counter(&drv_b, &vm.id).await;
    assert!(
        after >= before,
        "the counter was reset by the migration: {before} -> {after}"
    );
    eprintln!("mig-1: counter {before} -> {after}");

    // And back, peer-to-peer through B's plugin.
    let op = run_op(
        &cb,
        &format!("/v1/vms/{}/migrate", vm.id),
        json!({ "destination": a.migration_uri(), "live": true }),
    )
    .await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert!(b
        .virsh(&["list", "--all", "--name"])
        .lines()
        .all(|l| l.trim() != "mig-1"));
    let _: serde_json::Value = ca
        .call(hyper::Method::POST, "/v1/reconcile", Some(&json!({})))
        .await
        .unwrap();
    assert_eq!(state(&ca, &vm.id).await, VmState::Running);
    let back = guest_counter(&drv_a, &vm.id).await;
    assert!(back >= after, "the counter was reset: {after} -> {back}");
    agent_a.stop().await;
    agent_b.stop().await;
}

/// A `gve agent run` process of its own, so it can be killed with SIGKILL.
pub struct AgentProcess {
    pub child: tokio::process::Child,
    pub url: String,
}

pub async fn spawn_agent(config: &std::path::Path, log: &std::path::Path) -> AgentProcess {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args(["agent", "run", "--config"])
        .arg(config)
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(url) = text.lines().find_map(|l| l.split("listening on ").nth(1)) {
            return AgentProcess {
                child,
                url: url.trim().to_string(),
            };
        }
        assert!(Instant::now() < end, "agent did not start: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_during_clones_restarts_consistent_with_no_orphan_disk() {
    let lv = Libvirtd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"data\"\nadmin-token = \"{token}\"\n\
             [plugins.kvm]\nbundle = \"{bundle}\"\n[plugins.kvm.grants]\nlibvirt = [\"{uri}\"]\n\
             [plugins.kvm.grants.config]\nstorage-pool = \"gve\"\n\
             [driver]\nplugin = \"kvm\"\nendpoint = \"{uri}\"\nreconcile-period-ms = 1000\n",
            token = crate::agent::TOKEN,
            bundle = bundle("kvm").display(),
            uri = lv.uri
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let mut agent = spawn_agent(&config, &log).await;
    let client = |a: &AgentProcess| Client::new(&a.url, Some(crate::agent::TOKEN.into())).unwrap();
    let c = client(&agent);
    let src = run_op(&c, "/v1/vms", json!({ "name": "src", "template": "tiny" }))
        .await
        .result
        .unwrap();

    for (i, delay_ms) in [0u64, 2, 10, 40, 200].into_iter().enumerate() {
        let name = format!("cl-{i}");
        let c = client(&agent);
        let op: gve::agent::model::Operation = serde_json::from_value(
            crate::agent::post(
                &c,
                &format!("/v1/vms/{}/clone", src.id),
                json!({ "name": name, "linked": false }),
            )
            .await
            .unwrap(),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        agent.child.start_kill().unwrap();
        agent.child.wait().await.unwrap();

        agent = spawn_agent(&config, &log).await;
        let c = client(&agent);
        let after: gve::agent::model::Operation =
            c.get(&format!("/v1/operations/{}", op.id)).await.unwrap();
        let disk = lv.images.join(format!("{name}-disk0.qcow2"));
        let defined = lv
            .virsh(&["list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == name);
        match after.state {
            OpState::Succeeded => {
                let rec: VmRecord = c.get(&format!("/v1/vms/{name}")).await.unwrap();
                assert_eq!(rec.vm.name, name);
                assert!(
                    defined && disk.exists(),
                    "{name}: succeeded but missing on the hypervisor"
                );
            }
            OpState::Failed => {
                assert!(c.get::<VmRecord>(&format!("/v1/vms/{name}")).await.is_err());
                assert!(!defined, "{name}: failed but defined");
                assert!(!disk.exists(), "{name}: orphan disk {}", disk.display());
            }
            OpState::Running => panic!("{name}: still running after the restart"),
        }
        eprintln!("kill after {delay_ms} ms: clone {name} {:?}", after.state);
    }
    let ops: Vec<gve::agent::model::Operation> =
        client(&agent).get("/v1/operations").await.unwrap();
    assert!(ops.iter().all(|o| o.state != OpState::Running));
    agent.child.start_kill().unwrap();
    agent.child.wait().await.unwrap();
}
