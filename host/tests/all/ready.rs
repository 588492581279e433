//! Readiness from libvirt's guest-agent events on real QEMU guests: libvirt
//! tells when a booting guest's agent connects, the agent's ready wait listens
//! for it (a probe follows at once, not at the next tick of a timer), and an
//! endpoint whose events cannot be had falls back to the timer.

use std::time::Duration;

use gve::agent::model::OpState;
use gve::agent::ready::Readiness;
use gve::agent::ready_events::ReadyEvents;
use gve::libvirt_events::GuestAgentEvents;
use gve_harness::Libvirtd;
use serde_json::json;

use crate::agent::run_op;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_agent_connecting_is_heard_and_wakes_the_ready_wait() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = crate::guest::agent(&lv, None).await;
    let uri = lv.uri.clone();
    let events = tokio::task::spawn_blocking(move || GuestAgentEvents::open(&uri))
        .await
        .unwrap()
        .expect("guest-agent events from a private libvirtd");
    let mut heard = events.subscribe();
    assert!(events.alive());

    let op = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "ev-1", "template": "tiny", "main-memory-mib": 128 }),
    )
    .await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let vm = op.result.unwrap();
    // Stopped: nothing to wait for (409), and no event yet.
    let e = c
        .get::<Readiness>(&format!("/v1/vms/{}/ready?wait-ms=0", vm.id))
        .await
        .unwrap_err();
    assert_eq!(e.status, 409, "{e:?}");
    assert!(!heard.has_changed().unwrap());

    let op = run_op(&c, &format!("/v1/vms/{}/start", vm.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let r: Readiness = c
        .get(&format!("/v1/vms/{}/ready?wait-ms=60000", vm.id))
        .await
        .unwrap();
    assert!(r.ready && r.guest_agent, "{r:?}");
    // libvirt told this independent listener that the guest agent connected,
    // and the agent's own wait listened on an events connection of its own.
    tokio::time::timeout(Duration::from_secs(30), heard.changed())
        .await
        .expect("no guest-agent event within 30 s of the guest answering")
        .unwrap();
    assert!(*heard.borrow() >= 1);
    assert!(agent.core().unwrap().ready_events.live().await);
    // Counted for this domain, by UUID (the kvm driver's VM id) and by name,
    // and for no other.
    let first = events.connects_of(&vm.id);
    assert!(first >= 1);
    assert!(events.connects_of(&vm.name) >= first);
    assert_eq!(events.seen(&vm.id).connected, Some(true));
    assert_eq!(events.connects_of("tiny"), 0);

    // A destroy disconnects the agent; the next boot connects it again.
    let op = run_op(
        &c,
        &format!("/v1/vms/{}/shutdown", vm.id),
        json!({ "force": true }),
    )
    .await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let before = *heard.borrow_and_update();
    let op = run_op(&c, &format!("/v1/vms/{}/start", vm.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let r: Readiness = c
        .get(&format!("/v1/vms/{}/ready?wait-ms=60000", vm.id))
        .await
        .unwrap();
    assert!(r.ready, "{r:?}");
    tokio::time::timeout(Duration::from_secs(30), heard.changed())
        .await
        .expect("no event for the second boot")
        .unwrap();
    assert!(*heard.borrow() > before);
    assert!(events.connects_of(&vm.id) > first);

    // Deregistering while the daemon runs is clean; the agent's wait is unaffected.
    tokio::task::spawn_blocking(move || drop(events))
        .await
        .unwrap();
    let r: Readiness = c
        .get(&format!("/v1/vms/{}/ready?wait-ms=1000", vm.id))
        .await
        .unwrap();
    assert!(r.ready, "{r:?}");
    agent.stop().await;
}

#[tokio::test]
async fn an_endpoint_without_events_falls_back_to_the_timer() {
    // No daemon behind this socket: the open fails, nothing is waited on,
    // and the failure is remembered instead of retried on every wait.
    let gone = tempfile::tempdir().unwrap();
    let uri = format!(
        "qemu+unix:///system?socket={}",
        gone.path().join("no-daemon.sock").display()
    );
    let events = ReadyEvents::new(Some(uri));
    assert!(events.subscribe().await.is_none());
    assert!(!events.live().await);
    assert!(events.subscribe().await.is_none());
    // An endpoint that is not a granted libvirt URI never opens anything.
    let none = ReadyEvents::new(None);
    assert!(none.subscribe().await.is_none());
    assert!(!none.live().await);
}

#[test]
fn probes_after_a_connect_back_off_to_a_tenth_of_the_wait() {
    use gve::agent::ready::connected_pause;
    let ms = Duration::from_millis;
    assert_eq!(connected_pause(Duration::ZERO), ms(10));
    assert_eq!(connected_pause(ms(500)), ms(50));
    assert_eq!(connected_pause(Duration::from_secs(60)), ms(250));
    // The probe times after a connect, as the wait takes them (probes answered
    // at once: the fewest pauses, the most probes).
    let mut probes = vec![Duration::ZERO];
    while *probes.last().unwrap() < Duration::from_secs(10) {
        let t = *probes.last().unwrap();
        probes.push(t + connected_pause(t));
    }
    // A guest agent slow to answer (3 s after its connect: 16 guests booting
    // on 2 cores) is asked at most 50 times meanwhile (every 10 ms: 300).
    let asked = probes
        .iter()
        .filter(|t| **t < Duration::from_secs(3))
        .count();
    assert!(asked <= 50, "{asked} probes in 3 s");
    // Whenever it starts answering, the next probe comes within a tenth of the
    // time it took (at least 10 ms): what the back-off adds to readiness.
    for answer_ms in (1..3000).step_by(7) {
        let at = ms(answer_ms);
        let next = probes.iter().find(|t| **t >= at).unwrap();
        assert!(
            *next - at <= (at / 10).max(ms(10)),
            "answering at {at:?}, asked at {next:?}"
        );
    }
}
