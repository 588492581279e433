//! A libvirtd that stops answering is not a hung guest: once the host has given
//! up on enough calls there, it refuses a guest's commands at once, without
//! sending them, and the agent takes that as news of libvirt, not of the guest.
//! Neither the guest's circuit nor its readiness is touched, so the next command
//! is refused at once too (not after a readiness probe of its whole timeout), and
//! commands work again as soon as libvirtd answers.

use std::time::{Duration, Instant};

use gve::agent::model::OpState;
use gve::plugin::caps::libvirt_stranded::NOT_STARTED;
use gve_harness::Libvirtd;
use serde_json::json;

use super::network::Frozen;
use crate::agent::run_op;
use crate::guest::{agent_with, running_vm};
use crate::kvm::kvm_spec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_libvirtd_refuses_guest_commands_at_once_and_blames_no_guest() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = agent_with(&lv, None, kvm_spec(&lv)).await;
    let vm = running_vm(&agent, &c, "g-frozen-lv", 192).await;
    // Once the VM runs, calls that end at a short budget.
    let mut kvm = kvm_spec(&lv);
    kvm.limits.call_timeout_ms = 5_000;
    agent.plugins.replace("kvm", kvm).await.unwrap();
    let exec = format!("/v1/vms/{}/exec", vm.id);
    let exec_true = || run_op(&c, &exec, json!({ "argv": ["true"], "timeout-ms": 3_000 }));
    assert_eq!(exec_true().await.state, OpState::Succeeded);

    let core = agent.core().unwrap();
    let frozen = Frozen::new(&lv);
    // Eight calls the host gives up on (each at the kvm plugin's 5 s budget).
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (driver, id) = (core.driver.clone(), vm.id.clone());
        calls.spawn(async move { driver.get_vm(&id).await });
    }
    while let Some(r) = calls.join_next().await {
        assert!(r.unwrap().is_err(), "a frozen libvirtd answered");
    }

    // Every command now is refused at once, the second and third as the first.
    for n in 1..=3 {
        let t = Instant::now();
        let op = exec_true().await;
        let took = t.elapsed();
        assert_eq!(op.state, OpState::Failed, "exec {n}: {op:?}");
        let err = op.error.unwrap();
        assert_eq!(err.kind, "unavailable", "exec {n}: {err:?}");
        assert!(err.message.ends_with(NOT_STARTED), "exec {n}: {err:?}");
        // Not the 3 s readiness probe a guest taken for gone would get.
        assert!(!err.message.contains("did not answer"), "exec {n}: {err:?}");
        assert!(
            took < Duration::from_millis(2_500),
            "exec {n} took {took:?}"
        );
    }

    // libvirtd answers again: so do commands, once the calls it holds have ended.
    drop(frozen);
    let resumed = Instant::now();
    loop {
        let op = exec_true().await;
        if op.state == OpState::Succeeded {
            break;
        }
        let err = op.error.unwrap();
        assert!(
            resumed.elapsed() < Duration::from_secs(30),
            "still refused 30 s after SIGCONT: {err:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.stop().await;
}
