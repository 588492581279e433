//! Migration between two real Xen hosts: the lab's two nested Xens share their pool
//! (one directory mounted in both dom0s) and a private link between the dom0s, as
//! Xen hosts of one site share storage and a network. Each host has its own agent;
//! the guest's console ticks (a counter and its uptime) show it ran on and how
//! long it stood still. Part of CI's Xen tier.
//!
//! Two nested Xens under TCG share this machine's two cores, and whatever one does
//! slows the other: a start that takes 20 s on an idle pair takes a minute while the
//! other host is busy. Agents here reconcile every 3 s and operations get 3 minutes.

use std::time::{Duration, Instant};

use gve::agent::model::{OpState, Operation, Vm, VmState};
use gve::api::client::Client;
use gve_harness::xen::{console_ticks, stood_still_ms, NestedXen};
use serde_json::json;

use crate::agent::{last_event_seq, post, run_op_within, start_agent, wait_for_event_within};
use crate::xen::{agrees_with_xl, console_shows, record, registry_shows, xen_spec};

/// Submits an operation and waits for its end, giving it 3 minutes.
async fn act(c: &Client, path: &str, body: serde_json::Value) -> Operation {
    run_op_within(c, path, body, Duration::from_secs(180)).await
}

async fn ok(c: &Client, vm: &str, action: &str, body: serde_json::Value) -> Vm {
    let op = act(c, &format!("/v1/vms/{vm}/{action}"), body).await;
    assert_eq!(op.state, OpState::Succeeded, "{action}: {op:?}");
    op.result.unwrap_or_else(|| panic!("{action} gave no VM"))
}

/// An agent on `xen` that may migrate to `peer` over the shared pool.
async fn agent_on(
    xen: &NestedXen,
    peer: &NestedXen,
) -> (gve::agent::Agent, Client, tempfile::TempDir) {
    let mut spec = xen_spec(xen);
    spec.limits.call_timeout_ms = 180_000;
    spec.grants.libvirt.push(peer.uri.clone());
    spec.grants
        .config
        .insert("shared-storage".into(), "true".into());
    start_agent("xen", spec, &xen.uri, 3000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_between_two_xen_hosts_keeps_the_guest_running() {
    let one = gve_harness::xen::shared();
    let two = one.second();
    one.clear("xm-");
    two.clear("xm-");
    let (agent_1, c1, _d1) = agent_on(&one, two).await;
    let (agent_2, c2, _d2) = agent_on(two, &one).await;

    let op = act(
        &c1,
        "/v1/vms",
        json!({ "name": "xm-1", "template": gve_harness::xen::TEMPLATE,
                "main-memory-mib": 128, "logical-cpus": 1 }),
    )
    .await;
    let vm = op
        .result
        .clone()
        .unwrap_or_else(|| panic!("create: {op:?}"));
    ok(&c1, &vm.id, "start", json!({})).await;
    assert!(
        console_shows(&one, "xm-1", "gve-tick 10 ", 90),
        "the guest never ticked: {}",
        one.console("xm-1")
    );
    let seq_2 = last_event_seq(&c2).await;
    one.sync_clock();
    two.sync_clock();
    let t = Instant::now();
    let op = act(
        &c1,
        &format!("/v1/vms/{}/migrate", vm.id),
        json!({ "destination": two.uri, "live": true }),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let moved = op.result.unwrap();
    assert_eq!(
        (moved.id.as_str(), moved.state, moved.host.as_str()),
        (vm.id.as_str(), VmState::Running, "gve-xen-2")
    );

    // Host 1's agent let it go; host 2's found it running, with the same id; Xen
    // agrees on both hosts.
    let e = c1
        .get::<serde_json::Value>(&format!("/v1/vms/{}", vm.id))
        .await
        .unwrap_err();
    assert_eq!(e.status, 404, "{e}");
    wait_for_event_within(&c2, seq_2, "vm-appeared", &vm.id, Duration::from_secs(60)).await;
    // A reconcile pass during the migration may have seen the incoming domain
    // shut off (libxl shows it so until it is resumed): running by a later pass
    // (every 3 s).
    assert!(
        registry_shows(&c2, &vm.id, VmState::Running).await,
        "host 2's record stayed {:?}",
        record(&c2, &vm.id).await.vm.state
    );
    agrees_with_xl(&c1, &one, "xm-", "host 1 after migration").await;
    agrees_with_xl(&c2, two, "xm-", "host 2 after migration").await;

    // The guest ran on: host 2's console goes on counting where host 1's stopped,
    // with no boot in between.
    let before = console_ticks(&one.console("xm-1"));
    let last = before.last().expect("ticks on host 1").0;
    assert!(
        console_shows(two, "xm-1", &format!("gve-tick {} ", last + 20), 60),
        "the guest does not tick on host 2: {}",
        two.console("xm-1")
    );
    let after_console = two.console("xm-1");
    assert!(
        !after_console.contains("GVE-XEN-GUEST-READY"),
        "the guest booted again on host 2: {after_console}"
    );
    let after = console_ticks(&after_console);
    let first = after.first().expect("ticks on host 2").0;
    assert!(
        first > 1 && first <= last + 5,
        "the counter did not go on: host 1 ended at {last}, host 2 began at {first}"
    );
    let stall = stood_still_ms(before.into_iter().chain(after).collect());
    eprintln!(
        "xm-1: live migration took {took:?}; counter {last} -> {first}; the guest stood \
         still {stall:.0} ms at most"
    );

    // Back, stopped: live is refused (a stopped VM has no memory to move), a
    // plain migration moves the definition; the disk stayed where it was.
    ok(&c2, &vm.id, "shutdown", json!({})).await;
    let e = post(
        &c2,
        &format!("/v1/vms/{}/migrate", vm.id),
        json!({ "destination": one.uri, "live": true }),
    )
    .await
    .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (409, "invalid-state"), "{e}");
    let seq_1 = last_event_seq(&c1).await;
    let moved = ok(
        &c2,
        &vm.id,
        "migrate",
        json!({ "destination": one.uri, "live": false }),
    )
    .await;
    assert_eq!(
        (moved.state, moved.host.as_str()),
        (VmState::Stopped, "gve-xen-1")
    );
    let e = c2
        .get::<serde_json::Value>(&format!("/v1/vms/{}", vm.id))
        .await
        .unwrap_err();
    assert_eq!(e.status, 404, "host 2's agent still has it: {e}");
    wait_for_event_within(&c1, seq_1, "vm-appeared", &vm.id, Duration::from_secs(60)).await;
    ok(&c1, &vm.id, "start", json!({})).await;
    agrees_with_xl(&c1, &one, "xm-", "host 1 after moving back").await;
    agrees_with_xl(&c2, two, "xm-", "host 2 after moving back").await;
    let op = act(&c1, &format!("/v1/vms/{}/destroy", vm.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    // Gone from the pool both hosts share.
    let left = two.shell("ls /var/lib/gve/images");
    assert!(!left.contains("xm-1"), "the disk is left: {left}");
    agent_1.stop().await;
    agent_2.stop().await;
}
