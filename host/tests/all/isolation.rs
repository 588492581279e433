//! A hung guest agent does not take its host down: with qemu-ga stopped
//! (SIGSTOP) in one real guest and a burst of 32 commands sent to it, another
//! VM's commands, the agent's control API and the site's health check go on
//! unaffected; the burst fails fast once the first command has timed out; and the
//! VM's commands work again once its guest agent answers.

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::{AgentView, Job, JobState};
use serde_json::{json, Value};

use crate::agent::TOKEN as AGENT_TOKEN;
use crate::fairness::{ended, kvm_site, usable_vm};
use crate::site::post;

async fn exec(c: &Client, vm: &str, argv: &[&str], timeout_ms: u32) -> Job {
    serde_json::from_value(
        post(
            c,
            &format!("/v1/vms/{vm}/exec"),
            json!({ "argv": argv, "timeout-ms": timeout_ms }),
        )
        .await
        .unwrap(),
    )
    .unwrap()
}

async fn job(c: &Client, id: &str) -> Job {
    c.get(&format!("/v1/jobs/{id}")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_guest_agent_holds_neither_other_vms_nor_health_checks() {
    let ks = kvm_site(|_| {}).await;
    let admin = &ks.admin;
    let agent_url = format!("http://{}", ks.agent.addr);
    let (hung, calm) = (&ks.user("hung").await, &ks.user("calm").await);
    let frozen_vm = usable_vm(hung).await;
    let calm_vm = usable_vm(calm).await;

    // Freeze the guest agent of one VM for 45 s (from inside the guest).
    const FROZEN_S: u64 = 45;
    let freeze = format!(
        "(sleep 1; kill -STOP $(pidof qemu-ga); sleep {FROZEN_S}; kill -CONT $(pidof qemu-ga)) \
         </dev/null >/dev/null 2>&1 &"
    );
    let j = exec(hung, &frozen_vm, &["sh", "-c", &freeze], 10_000).await;
    ended(hung, &j.id, Duration::from_secs(30)).await;
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The burst.
    let mut burst = Vec::new();
    for _ in 0..32 {
        burst.push(exec(hung, &frozen_vm, &["true"], 10_000).await);
    }
    let agent_client = Client::new(&agent_url, Some(AGENT_TOKEN.into())).unwrap();
    let burst_started = Instant::now();

    // Meanwhile: the other VM's commands, the agent's control API and the site's
    // view of the agent.
    let mut calm_runs = Vec::new();
    let mut worst_host = Duration::ZERO;
    while burst_started.elapsed() < Duration::from_secs(30) {
        let t = Instant::now();
        let _: Value = agent_client.get("/v1/host").await.unwrap();
        worst_host = worst_host.max(t.elapsed());
        let a: AgentView = admin.get("/v1/agents/kvm").await.unwrap();
        assert_eq!(
            format!("{:?}", a.status).to_lowercase(),
            "up",
            "the site marked the agent down during the burst: {a:?}"
        );
        if calm_runs.len() < 3 {
            let t = Instant::now();
            let j = exec(calm, &calm_vm, &["echo", "calm"], 10_000).await;
            // Not behind the frozen VM's commands.
            let j = ended(calm, &j.id, Duration::from_secs(15)).await;
            assert_eq!(j.state, JobState::Succeeded, "{j:?}");
            calm_runs.push(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        worst_host < Duration::from_secs(8),
        "the agent's host information took {worst_host:?} during the burst"
    );

    // The burst has ended, fast: after the first timeout the rest fail at once.
    let mut seen = Vec::new();
    let mut fast = 0;
    for j in &burst {
        let j = job(hung, &j.id).await;
        let took = j.updated_ms - j.created_ms;
        let message = j
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default();
        if j.state == JobState::Failed && message.contains("stopped answering") {
            fast += 1;
        }
        seen.push((j.state, took, message));
    }
    // Each ends within one command timeout (10 s) and a probe (2 s) of its start,
    // not after the others' timeouts in turn.
    assert!(
        seen.iter()
            .all(|(state, took, _)| *state == JobState::Failed && *took < 20_000),
        "commands to the frozen guest: {seen:#?}"
    );
    let burst_took = burst_started.elapsed();
    assert!(
        fast >= 24,
        "only {fast} of 32 commands failed fast on the open circuit"
    );
    eprintln!(
        "isolation: burst of 32 on a frozen guest ended within {burst_took:?} ({fast} fast); \
         other VM's commands took {calm_runs:?}; host info at worst {worst_host:?}"
    );

    // Once qemu-ga runs again, the circuit closes and commands work.
    let thawed = frozen_at + Duration::from_secs(FROZEN_S + 2);
    tokio::time::sleep(thawed.saturating_duration_since(Instant::now())).await;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let j = exec(hung, &frozen_vm, &["echo", "back"], 10_000).await;
        let j = ended(hung, &j.id, Duration::from_secs(30)).await;
        if j.state == JobState::Succeeded {
            break;
        }
        assert!(
            Instant::now() < end,
            "commands never worked again after the guest agent came back: {j:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    ks.stop().await;
}
