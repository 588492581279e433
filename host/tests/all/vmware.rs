//! The vmware-esx driver through the agent's HTTP API, on the project's vSphere API
//! simulator (`harness/vsphere-sim`): a vCenter inventory and a standalone ESXi host,
//! TLS pinned to the simulator's certificate, native guest operations.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gve::agent::config::DriverConfig;
use gve::agent::model::{OpState, Vm, VmRecord, VmState};
use gve::agent::{Agent, AgentConfig};
use gve::api::client::Client;
use gve::plugin::{Limits, PluginSpec};
use gve_harness::vsphere::{self, VsphereSim};
use serde_json::{json, Value};

use crate::agent::{post, run_op, wait_op, TOKEN};
use crate::guest::{copy_in, copy_out, exec, text};
use crate::support::bundle;

/// The driver's spec for `sim`: its authority granted, TLS pinned to `pin`.
pub fn esx_spec(sim: &VsphereSim, pin: &str) -> PluginSpec {
    let mut grants = sim.grants(pin);
    grants
        .config
        .insert("task-timeout-ms".into(), "20000".into());
    PluginSpec {
        bundle: bundle("vmware-esx"),
        grants,
        limits: Limits {
            call_timeout_ms: 30_000,
            ..Default::default()
        },
    }
}

/// Sets the vmware-esx plugin's config value `key` in `config`.
pub fn set_esx_config(config: &mut AgentConfig, key: &str, value: &str) {
    let spec = config.plugins.get_mut("vmware-esx").unwrap();
    spec.grants.config.insert(key.into(), value.into());
}

/// The agent's config for a vmware-esx driver on `sim`.
pub fn esx_config(
    sim: &VsphereSim,
    dir: &std::path::Path,
    pin: &str,
    password: &str,
) -> AgentConfig {
    let mut plugins = BTreeMap::new();
    plugins.insert("vmware-esx".to_string(), esx_spec(sim, pin));
    AgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        admin_token: TOKEN.into(),
        plugins,
        driver: Some(DriverConfig {
            username: Some(vsphere::USERNAME.into()),
            password: Some(password.into()),
            ..gve_harness::agent::driver("vmware-esx", &sim.url)
        }),
        bundles_dir: None,
        ..Default::default()
    }
}

async fn esx_agent(sim: &VsphereSim) -> (Agent, Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = esx_config(sim, dir.path(), &sim.tls_pin(), vsphere::PASSWORD);
    let agent = Agent::start(config).await.unwrap();
    let c = Client::new(&format!("http://{}", agent.addr), Some(TOKEN.into())).unwrap();
    (agent, c, dir)
}

async fn vm(c: &Client, id: &str) -> Vm {
    c.get::<VmRecord>(&format!("/v1/vms/{id}"))
        .await
        .unwrap()
        .vm
}

/// Runs `action` on `id` and returns the VM it reads back.
async fn act(c: &Client, id: &str, action: &str, body: serde_json::Value) -> Vm {
    let op = run_op(c, &format!("/v1/vms/{id}/{action}"), body).await;
    assert_eq!(op.state, OpState::Succeeded, "{action} {id}: {op:?}");
    op.result
        .unwrap_or_else(|| panic!("{action} {id} returned no VM"))
}

async fn lifecycle(sim: &VsphereSim, destination: Option<&str>) {
    let (_agent, c, _dir) = esx_agent(sim).await;
    let templates: Vec<serde_json::Value> = c.get("/v1/templates").await.unwrap();
    assert!(
        templates.iter().any(|t| t["name"] == vsphere::TEMPLATE),
        "{templates:?}"
    );

    // Create from the template: sized and labelled as asked.
    let op = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "esx-1", "template": vsphere::TEMPLATE, "main-memory-mib": 256,
        "logical-cpus": 2, "labels": { "owner": "alice" } }),
    )
    .await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let v = op.result.unwrap();
    assert_eq!(
        (v.state, v.main_memory_mib, v.logical_cpus),
        (VmState::Stopped, 256, 2)
    );
    assert_eq!(v.labels["owner"], "alice");
    let id = v.id.clone();

    // Clones: full from the VM, linked from the template's snapshot; a linked clone
    // of a VM without a snapshot is refused, saying why.
    let full = act(&c, &id, "clone", json!({ "name": "esx-1-full" })).await;
    assert_eq!(
        (full.state, full.name.as_str()),
        (VmState::Stopped, "esx-1-full")
    );
    let e = post(
        &c,
        &format!("/v1/vms/{id}/clone"),
        json!({ "name": "esx-1-linked", "linked": true }),
    )
    .await;
    let op: gve::agent::model::Operation = serde_json::from_value(e.unwrap()).unwrap();
    let op = wait_op(&c, &op.id).await;
    assert_eq!(op.state, OpState::Failed, "{op:?}");
    let err = op.error.unwrap();
    assert_eq!(err.kind, "invalid-state", "{err:?}");
    assert!(err.message.contains("snapshot"), "{err:?}");
    let linked = act(
        &c,
        vsphere::TEMPLATE,
        "clone",
        json!({ "name": "esx-linked", "linked": true }),
    )
    .await;
    assert!(!linked.is_template && linked.state == VmState::Stopped);

    // Power: start, suspend, resume, and the wrong state is a clear 409.
    assert_eq!(
        act(&c, &id, "start", json!({})).await.state,
        VmState::Running
    );
    let e = post(&c, &format!("/v1/vms/{id}/start"), json!({}))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (409, "invalid-state"), "{e}");
    assert_eq!(
        act(&c, &id, "suspend", json!({})).await.state,
        VmState::Suspended
    );
    assert_eq!(
        act(&c, &id, "resume", json!({})).await.state,
        VmState::Running
    );

    // Guest operations, natively through VMware Tools' managers.
    let r = exec(
        &c,
        &id,
        json!({ "argv": ["sh", "-c", "echo out; echo err >&2; exit 3"] }),
    )
    .await;
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(
        (text(&r.stdout_b64).as_str(), text(&r.stderr_b64).as_str()),
        ("out\n", "err\n")
    );
    let r = exec(&c, &id, json!({ "argv": ["hostname"] })).await;
    assert_eq!(
        (r.exit_code, text(&r.stdout_b64)),
        (Some(0), "esx-1\n".into())
    );
    let meta = copy_in(&c, &id, "/opt/data/blob.bin", 7, 700_000, "0640").await;
    assert_eq!(meta.mode, 0o640);
    let (size, sha, mode) = copy_out(&c, &id, "/opt/data/blob.bin").await;
    assert_eq!(
        (size, sha.as_str(), mode.as_str()),
        (700_000, meta.sha256.as_str(), "0640")
    );
    let r = exec(
        &c,
        &id,
        json!({ "argv": ["sha256sum", "/opt/data/blob.bin"] }),
    )
    .await;
    assert!(text(&r.stdout_b64).starts_with(&meta.sha256), "{r:?}");

    // Relocation to another host of the same endpoint (vCenter only).
    if let Some(dest) = destination {
        let before = vm(&c, &id).await.host;
        let moved = act(
            &c,
            &id,
            "migrate",
            json!({ "destination": dest, "live": true }),
        )
        .await;
        assert_eq!((moved.host.as_str(), moved.state), (dest, VmState::Running));
        assert_ne!(before, dest);
        assert_eq!(vm(&c, &id).await.host, dest);
    }

    // The guest password is in no record the agent keeps or shows.
    for path in ["/v1/operations", "/v1/events?after=0", "/v1/plugins"] {
        let shown: serde_json::Value = c.get(path).await.unwrap();
        assert!(
            !shown.to_string().contains(vsphere::GUEST_PASSWORD),
            "{path} shows the guest password"
        );
    }

    // Graceful shutdown, then destroy; the registry follows.
    assert_eq!(
        act(&c, &id, "shutdown", json!({})).await.state,
        VmState::Stopped
    );
    for v in [id.as_str(), full.id.as_str(), linked.id.as_str()] {
        let op = run_op(&c, &format!("/v1/vms/{v}/destroy"), json!({})).await;
        assert_eq!(op.state, OpState::Succeeded, "{op:?}");
        let e = c
            .get::<VmRecord>(&format!("/v1/vms/{v}"))
            .await
            .unwrap_err();
        assert_eq!(e.status, 404, "{v}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_the_agent_on_vcenter() {
    let sim = VsphereSim::vcenter();
    lifecycle(&sim, Some("DC0_H0")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_the_agent_on_esxi() {
    let sim = VsphereSim::esxi();
    lifecycle(&sim, None).await;
}

/// Bad credentials and an untrusted certificate stop the agent's driver with a typed
/// error naming the cause; nothing is sent to a server that fails verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_untrusted_certificates_are_refused() {
    let sim = VsphereSim::vcenter();
    let dir = tempfile::tempdir().unwrap();
    let e = Agent::start(esx_config(&sim, dir.path(), &sim.tls_pin(), "wrong"))
        .await
        .err()
        .expect("a wrong password must not open the driver");
    let msg = e.to_string();
    assert!(
        msg.contains("InvalidLogin") && msg.contains("denied"),
        "{msg}"
    );
    assert!(!msg.contains("wrong"), "the password leaked: {msg}");

    let dir = tempfile::tempdir().unwrap();
    let other = format!("sha256:{}", "ab".repeat(32));
    let e = Agent::start(esx_config(&sim, dir.path(), &other, vsphere::PASSWORD))
        .await
        .err()
        .expect("an untrusted certificate must not open the driver");
    let msg = e.to_string();
    assert!(
        msg.contains("not trusted") && msg.contains("denied"),
        "{msg}"
    );
}

/// The password from a file the agent reads at start (owner-only), never in the
/// config: it opens the driver on the real simulator, and neither the driver's
/// record nor the audit log holds it. The same for the plugin's guest password
/// from `config-files`, also across a runtime replace (which records the spec).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_opens_the_driver_and_is_nowhere_recorded() {
    use std::os::unix::fs::PermissionsExt;
    let sim = VsphereSim::vcenter();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vsphere.pw");
    std::fs::write(&file, format!("{}\n", vsphere::PASSWORD)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = esx_config(&sim, dir.path(), &sim.tls_pin(), "unused");
    let d = config.driver.as_mut().unwrap();
    d.password = None;
    d.password_file = Some(file.clone());
    // The guest password from a file as well (`config-files`), not inline.
    let guest_file = dir.path().join("guest.pw");
    std::fs::write(&guest_file, vsphere::GUEST_PASSWORD).unwrap();
    std::fs::set_permissions(&guest_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let grants = &mut config.plugins.get_mut("vmware-esx").unwrap().grants;
    grants.config.remove("guest-password");
    grants
        .config_files
        .insert("guest-password".into(), guest_file.clone());
    config.plugin_policy = Some(gve::agent::policy::PluginPolicy {
        bundle_dirs: vec![crate::support::bundles().to_path_buf()],
        http: vec![sim.authority.clone()],
        libvirt: vec![],
        directories: vec![],
        guest_channel: false,
        max_memory_mib: Limits::default().memory_mib,
        max_call_timeout_ms: 60_000,
        max_long_call_timeout_ms: 1_800_000,
        max_instances: 64,
    });
    let agent = Agent::start(config.clone()).await.unwrap();
    let c = Client::new(&format!("http://{}", agent.addr), Some(TOKEN.into())).unwrap();
    let vms: Vec<Value> = c.get("/v1/vms").await.unwrap();
    assert!(!vms.is_empty(), "the simulator's VMs were listed");
    let op = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "esx-pw", "template": vsphere::TEMPLATE, "main-memory-mib": 128 }),
    )
    .await;
    let id = op.result.unwrap().id;
    run_op(&c, &format!("/v1/vms/{id}/start"), json!({})).await;
    // The plugin refuses guest operations without a password: it got the file's.
    let r = exec(&c, &id, json!({ "argv": ["hostname"] })).await;
    assert_eq!(
        (r.exit_code, text(&r.stdout_b64)),
        (Some(0), "esx-pw\n".into())
    );
    // A runtime replace that keeps the grants keeps the file's value; what it
    // records (and audits) names the file, never the value.
    let _: Value = c
        .call(
            hyper::Method::PUT,
            "/v1/plugins/vmware-esx",
            Some(&json!({ "limits": { "pool-size": 1 } })),
        )
        .await
        .unwrap();
    let r = exec(&c, &id, json!({ "argv": ["hostname"] })).await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    agent.stop().await;

    // A file others may read is refused, saying so, before anything is sent.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Agent::start(config)
        .await
        .err()
        .expect("an open file must be refused");
    let msg = e.to_string();
    assert!(msg.contains("open to other users"), "{msg}");
    assert!(!msg.contains(vsphere::PASSWORD), "{msg}");
    // Nothing the agent wrote holds either password.
    for entry in walk(dir.path()) {
        if entry == file || entry == guest_file {
            continue;
        }
        let bytes = std::fs::read(&entry).unwrap_or_default();
        for secret in [vsphere::PASSWORD, vsphere::GUEST_PASSWORD] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds a password",
                entry.display()
            );
        }
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The server dies during a task: the operation fails with `unavailable` well
/// within its budget, the VM keeps its last known state, and later calls fail fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_task_fails_typed_and_leaves_the_registry_consistent() {
    let mut sim = VsphereSim::start(&["-method-delay", "PowerOnVM_Task=5000"]);
    let (_agent, c, _dir) = esx_agent(&sim).await;
    let op = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "doomed", "template": vsphere::TEMPLATE, "main-memory-mib": 128 }),
    )
    .await;
    let id = op.result.unwrap().id;
    let started: gve::agent::model::Operation = serde_json::from_value(
        post(&c, &format!("/v1/vms/{id}/start"), json!({}))
            .await
            .unwrap(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t = Instant::now();
    sim.kill();
    let op = wait_op(&c, &started.id).await;
    assert_eq!(op.state, OpState::Failed, "{op:?}");
    let err = op.error.unwrap();
    assert_eq!(err.kind, "unavailable", "{err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the failure took {:?}",
        t.elapsed()
    );
    // The registry still has the VM as last seen, not half-started.
    let rec = c.get::<VmRecord>(&format!("/v1/vms/{id}")).await.unwrap();
    assert_eq!(rec.vm.state, VmState::Stopped);
    // Later calls fail fast with the same kind.
    let t = Instant::now();
    let op = run_op(&c, &format!("/v1/vms/{id}/start"), json!({})).await;
    assert_eq!(
        (op.state, op.error.as_ref().map(|e| e.kind.as_str())),
        (OpState::Failed, Some("unavailable")),
        "{op:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// 404 hosts and 2,400 VMs (4 datacenters of 5 clusters of 20 hosts, 100 VMs per
/// cluster and per standalone host) are listed whole by the agent's reconcile loop,
/// page by page, by a plugin allowed only 16 MiB of memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_of_400_hosts_and_2400_vms_is_listed_whole_in_bounded_memory() {
    let sim = VsphereSim::start(&["-dc", "4", "-cluster", "5", "-host", "20", "-vm", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let mut config = esx_config(&sim, dir.path(), &sim.tls_pin(), vsphere::PASSWORD);
    config
        .plugins
        .get_mut("vmware-esx")
        .unwrap()
        .limits
        .memory_mib = 16;
    let t = Instant::now();
    // Starting reconciles once before it answers.
    let agent = Agent::start(config).await.unwrap();
    eprintln!("2400 VMs: agent up after {:?}", t.elapsed());
    let c = Client::new(&format!("http://{}", agent.addr), Some(TOKEN.into())).unwrap();
    if let Err(e) = agent.core().unwrap().reconcile().await {
        panic!("a reconcile pass failed: {e}");
    }
    // Paged by the agent (1000 a page), read whole by following the links.
    let first: Vec<VmRecord> = c.get("/v1/vms").await.unwrap();
    assert_eq!(first.len(), 1000);
    let vms: Vec<VmRecord> = c.get_pages("/v1/vms", usize::MAX).await.unwrap();
    assert_eq!(vms.len(), 2400);
    let hosts: std::collections::BTreeSet<&str> = vms.iter().map(|r| r.vm.host.as_str()).collect();
    assert!(
        hosts.len() > 300 && hosts.iter().all(|h| h.starts_with("DC")),
        "VMs on {} hosts: {:?}",
        hosts.len(),
        hosts.iter().take(5).collect::<Vec<_>>()
    );
    let templates: Vec<serde_json::Value> = c.get("/v1/templates").await.unwrap();
    assert_eq!(templates.len(), 1, "{templates:?}");
    // A VM made behind the agent's back shows up at the next pass.
    let seq = crate::agent::last_event_seq(&c).await;
    let driver = agent.core().unwrap().driver.clone();
    let made = driver
        .clone_vm(vsphere::TEMPLATE, "behind-its-back", false)
        .await
        .unwrap();
    let t = Instant::now();
    agent.core().unwrap().reconcile().await.unwrap();
    eprintln!("2400 VMs: one reconcile pass {:?}", t.elapsed());
    crate::agent::wait_for_event(&c, seq, "vm-appeared", &made.id).await;
}

/// A VM destroyed between the container view being read and its properties being
/// read fails the whole property request on vSphere; the listing leaves it out
/// instead of failing (the simulator holds each DestroyView for a second, the gap
/// in which another session destroys the VM). The inventory is three pages: the
/// others' VMs are all listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_destroyed_while_being_listed_is_left_out() {
    let sim = VsphereSim::start(&["-method-delay", "DestroyView=1000", "-vm", "110"]);
    let (agent, _c, _dir) = esx_agent(&sim).await;
    let lister = agent.core().unwrap().driver.clone();
    let creds = gve::plugin::bindings::types::Credentials {
        username: Some(vsphere::USERNAME.into()),
        password: Some(vsphere::PASSWORD.into()),
        token: None,
    };
    let other = agent
        .plugins
        .open_driver("vmware-esx", &sim.url, creds)
        .await
        .unwrap();
    let before = other.list_vms().await.unwrap();
    assert!(
        before.len() > 2 * 100,
        "{} VMs: not three pages",
        before.len()
    );
    let doomed = other
        .clone_vm(vsphere::TEMPLATE, "doomed-while-listed", false)
        .await
        .unwrap();
    let listing = tokio::spawn(async move { lister.list_vms().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    other.destroy(&doomed.id).await.unwrap();
    let listed = listing.await.unwrap().expect("the listing succeeds");
    assert!(!listed.iter().any(|v| v.id == doomed.id), "{listed:?}");
    let ids = |l: &[gve::plugin::bindings::types::VmInfo]| {
        l.iter()
            .map(|v| v.id.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(listed.len(), before.len(), "an object listed twice");
    assert_eq!(ids(&listed), ids(&before));
}

/// A session the server ended (idle too long) is renewed by the driver on its next
/// call, without the caller seeing it: whether the server says so with a fault (a VM
/// by name: a container view first) or by withholding every property it was asked
/// for (a VM by id: its properties at once; the simulator answers so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_renewed_transparently() {
    let sim = VsphereSim::start(&["-session-idle", "1s"]);
    let dir = tempfile::tempdir().unwrap();
    let mut config = esx_config(&sim, dir.path(), &sim.tls_pin(), vsphere::PASSWORD);
    // No reconcile meanwhile: the session must really sit idle.
    config.driver.as_mut().unwrap().reconcile_period_ms = 600_000;
    let agent = Agent::start(config).await.unwrap();
    let driver = agent.core().unwrap().driver.clone();
    let before = driver.list_vms().await.unwrap().len();
    let template = driver.list_templates().await.unwrap().remove(0);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let after = driver
        .get_vm(vsphere::TEMPLATE)
        .await
        .expect("the expired session is renewed");
    assert!(after.is_template);
    assert_eq!(after.name, template.name);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let by_id = driver
        .get_vm(&template.id)
        .await
        .expect("the expired session is renewed when the server withholds properties");
    assert_eq!((by_id.id, by_id.name), (template.id, template.name));
    assert_eq!(driver.list_vms().await.unwrap().len(), before);
}

/// Plain HTTP sends the vSphere password in clear: the driver refuses an `http://`
/// endpoint unless the operator sets `plain-http = true` in its config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_needs_the_operators_explicit_opt_in() {
    let sim = VsphereSim::start(&["-tls=false"]);
    assert!(sim.url.starts_with("http://"), "{}", sim.url);
    let dir = tempfile::tempdir().unwrap();
    let mut config = esx_config(&sim, dir.path(), &sim.tls_pin(), vsphere::PASSWORD);
    let spec = config.plugins.get_mut("vmware-esx").unwrap();
    spec.grants.tls.clear();
    let e = Agent::start(config.clone())
        .await
        .err()
        .expect("an http:// endpoint without the opt-in must not open");
    let msg = e.to_string();
    assert!(
        msg.contains("plain-http") && msg.contains("denied"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    config.data_dir = dir.path().to_path_buf();
    set_esx_config(&mut config, "plain-http", "true");
    let agent = Agent::start(config).await.unwrap();
    let driver = agent.core().unwrap().driver.clone();
    assert!(driver.get_vm(vsphere::TEMPLATE).await.unwrap().is_template);
}
