//! vmware-esx's guest exec against its call budget (contract 0.1.2's `deadline`): a
//! command runs for its own timeout, not for the plugin's task timeout, and one that
//! would outrun what is left of the call is ended by the plugin and reported as its
//! own `timeout` naming the limit, never stopped by the sandbox.

use std::time::{Duration, Instant};

use gve::agent::model::OpState;
use gve::agent::Agent;
use gve::api::client::Client;
use gve_harness::vsphere::{self, VsphereSim};
use serde_json::json;

use crate::agent::{run_op, TOKEN};
use crate::guest::exec;
use crate::vmware::esx_config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_runs_for_its_own_timeout_within_the_call_budget() {
    let sim = VsphereSim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut config = esx_config(&sim, dir.path(), &sim.tls_pin(), vsphere::PASSWORD);
    let spec = config.plugins.get_mut("vmware-esx").unwrap();
    // A task timeout shorter than the command: it used to cut the command short and
    // call it timed out, though the command's own timeout had not passed.
    spec.grants
        .config
        .insert("task-timeout-ms".into(), "1000".into());
    spec.limits.call_timeout_ms = 6_000;
    let agent = Agent::start(config).await.unwrap();
    let c = Client::new(&format!("http://{}", agent.addr), Some(TOKEN.into())).unwrap();
    let op = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "esx-exec", "template": vsphere::TEMPLATE, "main-memory-mib": 128 }),
    )
    .await;
    let id = op.result.unwrap().id;
    let op = run_op(&c, &format!("/v1/vms/{id}/start"), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");

    let r = exec(
        &c,
        &id,
        json!({ "argv": ["sleep", "2"], "timeout-ms": 4000 }),
    )
    .await;
    assert_eq!((r.exit_code, r.timed_out), (Some(0), false), "{r:?}");

    // 5 s asked, 3 s left of a 6 s budget less the plugin's 3 s margin.
    let t = Instant::now();
    let op = run_op(
        &c,
        &format!("/v1/vms/{id}/exec"),
        json!({ "argv": ["sleep", "10"], "timeout-ms": 5000 }),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(op.state, OpState::Failed, "{op:?}");
    let err = op.error.unwrap();
    assert_eq!(err.kind, "timeout", "{err:?}");
    assert!(err.message.contains("call-timeout-ms"), "{err:?}");
    assert!(took >= Duration::from_millis(2_000), "{took:?}");
    let metrics = agent.runtime.metrics_text().unwrap();
    let stopped = crate::metrics::deadline_stops(&metrics, "vmware-esx");
    assert!(stopped.is_empty(), "{stopped:?}");
    // The plugin is fine afterwards.
    let r = exec(&c, &id, json!({ "argv": ["hostname"] })).await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    agent.stop().await;
}
