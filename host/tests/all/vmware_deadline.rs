//! vmware-esx's waits against its call budget (contract 0.1.2's `deadline`): a guest
//! command runs for its own timeout (not the plugin's task timeout), the agent's
//! default leaves the plugin its declared `exec-margin-ms`, and a command, a task or
//! a SOAP request the call's budget would outlive is ended by the plugin and
//! reported as its own `timeout` naming the limit, never stopped by the sandbox.

use std::time::{Duration, Instant};

use gve::agent::model::{OpError, OpState, Operation};
use gve::agent::{Agent, AgentConfig};
use gve::api::client::Client;
use gve_harness::vsphere::{self, VsphereSim};
use serde_json::{json, Value};

use crate::agent::{run_op, TOKEN};
use crate::guest::exec;
use crate::metrics::assert_no_deadline_stop;
use crate::vmware::{esx_config, set_esx_config};

/// An agent on `sim` whose vmware-esx plugin has a `budget_ms` call budget.
async fn agent_with_budget(
    sim: &VsphereSim,
    dir: &std::path::Path,
    budget_ms: u64,
    tweak: impl FnOnce(&mut AgentConfig),
) -> (Agent, Client) {
    let mut config = esx_config(sim, dir, &sim.tls_pin(), vsphere::PASSWORD);
    config
        .plugins
        .get_mut("vmware-esx")
        .unwrap()
        .limits
        .call_timeout_ms = budget_ms;
    tweak(&mut config);
    let agent = Agent::start(config).await.unwrap();
    let c = Client::new(&format!("http://{}", agent.addr), Some(TOKEN.into())).unwrap();
    (agent, c)
}

/// Makes a VM of 128 MiB named `name` from the simulator's template: how the
/// operation ended and how long it took.
async fn create(c: &Client, name: &str) -> (Operation, Duration) {
    let t = Instant::now();
    let body = json!({ "name": name, "template": vsphere::TEMPLATE, "main-memory-mib": 128 });
    let op = run_op(c, "/v1/vms", body).await;
    (op, t.elapsed())
}

/// A running VM made from the simulator's template.
async fn running_vm(c: &Client, name: &str) -> String {
    let (op, _) = create(c, name).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let id = op.result.unwrap().id;
    let op = run_op(c, &format!("/v1/vms/{id}/start"), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    id
}

/// A simulator that holds the methods of `delays` (`-method-delay`), an agent whose
/// plugin has a `budget_ms` call budget, and a running VM on it.
struct SlowServer {
    agent: Agent,
    c: Client,
    id: String,
    _dir: tempfile::TempDir,
    _sim: VsphereSim,
}

impl SlowServer {
    async fn start(delays: &str, budget_ms: u64) -> SlowServer {
        let sim = VsphereSim::start(&["-method-delay", delays]);
        let dir = tempfile::tempdir().unwrap();
        let (agent, c) = agent_with_budget(&sim, dir.path(), budget_ms, |_| {}).await;
        let id = running_vm(&c, "esx-slow").await;
        SlowServer {
            agent,
            c,
            id,
            _dir: dir,
            _sim: sim,
        }
    }

    /// Runs operation `action` on the VM; how it ended and how long it took.
    async fn run(&self, action: &str, body: serde_json::Value) -> (Operation, Duration) {
        let t = Instant::now();
        let op = run_op(&self.c, &format!("/v1/vms/{}/{action}", self.id), body).await;
        (op, t.elapsed())
    }
}

/// `op` failed as the plugin's own `timeout` naming the limit to raise, and no
/// call was stopped by the sandbox; its error.
fn ended_by_the_plugin_over_budget(agent: &Agent, op: Operation) -> OpError {
    assert_eq!(op.state, OpState::Failed, "{op:?}");
    let err = op.error.unwrap();
    assert_eq!(err.kind, "timeout", "{err:?}");
    assert!(err.message.contains("call-timeout-ms"), "{err:?}");
    assert_no_deadline_stop(agent, "vmware-esx");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_runs_for_its_own_timeout_and_the_default_leaves_the_exec_margin() {
    let sim = VsphereSim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (agent, c) = agent_with_budget(&sim, dir.path(), 8_000, |config| {
        // A task timeout shorter than the command: it used to cut the command
        // short and call it timed out, though its own timeout had not passed.
        set_esx_config(config, "task-timeout-ms", "1000");
    })
    .await;
    let summary = agent.plugins.get("vmware-esx").unwrap();
    assert_eq!(summary.exec_margin_ms, 3_000);
    let id = running_vm(&c, "esx-exec").await;

    let r = exec(
        &c,
        &id,
        json!({ "argv": ["sleep", "2"], "timeout-ms": 4000 }),
    )
    .await;
    assert_eq!((r.exit_code, r.timed_out), (Some(0), false), "{r:?}");

    // Without a timeout the command gets the budget less the manifest's 3 s margin
    // (5 s), and ends as a command that timed out, with the plugin's instance kept.
    let t = Instant::now();
    let op = run_op(
        &c,
        &format!("/v1/vms/{id}/exec"),
        json!({ "argv": ["sleep", "10"] }),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let r = match op.output {
        Some(gve::agent::model::OpOutput::Exec(o)) => o,
        other => panic!("exec produced {other:?}"),
    };
    assert_eq!((r.exit_code, r.timed_out), (None, true), "{r:?}");
    assert!(took >= Duration::from_millis(4_900), "{took:?}");
    // More than the ceiling is refused before anything runs.
    let e = crate::agent::post(
        &c,
        &format!("/v1/vms/{id}/exec"),
        json!({ "argv": ["true"], "timeout-ms": 5001 }),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("between 1 and 5000"), "{e}");
    // An operator's margin, changed at run time through the admin API (as
    // `gve plugin replace --exec-margin-ms` sends it), moves the ceiling; one below
    // the manifest's is not used; 0 drops it.
    for (margin, in_force) in [(4_500, 4_500), (2_000, 3_000), (0, 3_000)] {
        set_margin(&c, margin).await.unwrap();
        let summary = agent.plugins.get("vmware-esx").unwrap();
        assert_eq!(summary.exec_margin_ms, in_force, "margin {margin}");
        let kept = (margin != 0).then_some(margin);
        assert_eq!(summary.limits.exec_margin_ms, kept, "margin {margin}");
        let ceiling = 8_000 - in_force;
        let e = crate::agent::post(
            &c,
            &format!("/v1/vms/{id}/exec"),
            json!({ "argv": ["true"], "timeout-ms": ceiling + 1 }),
        )
        .await
        .unwrap_err();
        let bound = format!("between 1 and {ceiling}");
        assert!(e.to_string().contains(&bound), "margin {margin}: {e}");
        let r = exec(&c, &id, json!({ "argv": ["true"], "timeout-ms": ceiling })).await;
        assert_eq!(r.exit_code, Some(0), "margin {margin}: {r:?}");
    }
    // More than 60 s is refused, and the margin in force stays.
    let e = set_margin(&c, 60_001).await.unwrap_err();
    assert!(e.to_string().contains("at most 60000"), "{e}");
    // So is a margin that leaves guest commands nothing of the 8 s budget.
    let e = set_margin(&c, 8_000).await.unwrap_err();
    assert!(
        e.to_string().contains("below call-timeout-ms (8000)"),
        "{e}"
    );
    assert_eq!(
        agent.plugins.get("vmware-esx").unwrap().exec_margin_ms,
        3_000
    );
    assert_no_deadline_stop(&agent, "vmware-esx");
    agent.stop().await;
}

/// Sets vmware-esx's exec margin at run time, as `gve plugin replace
/// --exec-margin-ms` does.
async fn set_margin(c: &Client, margin: u64) -> Result<Value, gve::api::ApiError> {
    let body = json!({ "limits": { "exec-margin-ms": margin } });
    c.call(hyper::Method::PUT, "/v1/plugins/vmware-esx", Some(&body))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_setup_ends_the_command_as_the_plugins_own_timeout() {
    // Making the command's directory takes 2 s of an 8 s budget, so the default
    // 5 s no longer fits before the 2 s the plugin keeps to end it.
    let slow = SlowServer::start("CreateTemporaryDirectoryInGuest=2000", 8_000).await;
    let (c, id) = (&slow.c, &slow.id);
    let (op, took) = slow.run("exec", json!({ "argv": ["sleep", "10"] })).await;
    let agent = &slow.agent;
    let err = ended_by_the_plugin_over_budget(agent, op);
    assert!(err.message.contains("of its 5000 ms timeout"), "{err:?}");
    assert!(took >= Duration::from_millis(5_000), "{took:?}");
    // The plugin answers afterwards.
    let r = exec(c, id, json!({ "argv": ["hostname"] })).await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_slow_requests_end_within_the_call_budget() {
    // Destroying a running VM powers it off, then destroys it: two requests the
    // server holds 2.5 s each, in a 4 s budget. The second is cut at what is left.
    let slow = SlowServer::start("PowerOffVM_Task=2500,Destroy_Task=2500", 4_000).await;
    let (op, took) = slow.run("destroy", json!({})).await;
    let (agent, c) = (&slow.agent, &slow.c);
    ended_by_the_plugin_over_budget(agent, op);
    // A sandbox stop would show in the metric; this bounds the agent's own part.
    assert!(took < Duration::from_millis(6_000), "{took:?}");
    // The plugin answers afterwards (the host's description comes from it).
    let host: serde_json::Value = c.get("/v1/host").await.unwrap();
    assert!(host["logical-cpus"].as_u64().unwrap_or(0) > 0, "{host}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_that_cannot_be_sized_in_time_is_removed() {
    // The server holds the sizing of a new VM 10 s in an 8 s budget: the request is
    // cut with time kept to remove the clone, which is then removed.
    let sim = VsphereSim::start(&["-method-delay", "ReconfigVM_Task=10000"]);
    let dir = tempfile::tempdir().unwrap();
    let (agent, c) = agent_with_budget(&sim, dir.path(), 8_000, |_| {}).await;
    let driver = agent.core().unwrap().driver.clone();
    let before = driver.list_vms().await.unwrap().len();
    let (op, _) = create(&c, "esx-unsized").await;
    let err = ended_by_the_plugin_over_budget(&agent, op);
    assert!(err.message.contains("ReconfigVM_Task"), "{err:?}");
    assert!(err.message.contains("was removed"), "{err:?}");
    let names: Vec<String> = driver
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert!(!names.iter().any(|n| n == "esx-unsized"), "{names:?}");
    assert_eq!(names.len(), before, "{names:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_and_relocation_tasks_longer_than_the_call_are_waited_for_on_the_long_call_budget() {
    // The server's clone task runs 12 s after CloneVM_Task answered, as a real
    // vCenter's does while it copies disks; the plugin's call budget is 10 s, of
    // which the clone of a new VM keeps about 5.5 s for sizing it and what follows.
    let sim = VsphereSim::start(&["-task-delay", "CloneVM_Task=12000,RelocateVM_Task=12000"]);
    let dir = tempfile::tempdir().unwrap();
    let long_budget = |ms: u64| {
        move |config: &mut AgentConfig| {
            let limits = &mut config.plugins.get_mut("vmware-esx").unwrap().limits;
            limits.long_call_timeout_ms = ms;
        }
    };
    let (agent, c) = agent_with_budget(&sim, dir.path(), 10_000, long_budget(20_000)).await;
    let driver = agent.core().unwrap().driver.clone();
    let (op, took) = create(&c, "esx-long").await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert!(
        took >= Duration::from_secs(12),
        "the task was not delayed: {took:?}"
    );
    assert_no_deadline_stop(&agent, "vmware-esx");
    let vm = driver.get_vm("esx-long").await.unwrap();
    assert_eq!(vm.resources.main_memory_mib, 128, "{vm:?}");
    // A relocation's task likewise (a migration).
    let id = op.result.unwrap().id;
    let op = run_op(&c, &format!("/v1/vms/{id}/start"), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert_ne!(driver.get_vm("esx-long").await.unwrap().host, "DC0_H0");
    let t = Instant::now();
    let body = json!({ "destination": "DC0_H0", "live": true });
    let op = run_op(&c, &format!("/v1/vms/{id}/migrate"), body).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert!(t.elapsed() >= Duration::from_secs(12), "{:?}", t.elapsed());
    assert_eq!(driver.get_vm("esx-long").await.unwrap().host, "DC0_H0");
    assert_no_deadline_stop(&agent, "vmware-esx");
    agent.stop().await;

    // With a long-call budget of 1 s the wait gives up once that and the call's
    // 10 s less the 5.5 s it keeps are used (the call's part alone about 4.5 s),
    // names both limits, and says the task goes on: the server makes the VM later.
    let (agent, c) = agent_with_budget(&sim, dir.path(), 10_000, long_budget(1_000)).await;
    let (op, took) = create(&c, "esx-cut").await;
    let err = ended_by_the_plugin_over_budget(&agent, op);
    assert!(err.message.contains("`long-call-timeout-ms`"), "{err:?}");
    assert!(err.message.contains("`call-timeout-ms`"), "{err:?}");
    assert!(err.message.contains("goes on on the server"), "{err:?}");
    assert!(
        took >= Duration::from_millis(5_000) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    let driver = agent.core().unwrap().driver.clone();
    let made = async {
        loop {
            let vms = driver.list_vms().await.unwrap();
            if vms.iter().any(|v| v.name == "esx-cut") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), made)
        .await
        .expect("the server finishes the clone it was asked for");
    agent.stop().await;
}
