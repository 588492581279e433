//! Long host calls: in a create, clone or migration, a libvirt call long by nature
//! (a migration, a full volume copy, a pool refresh) is waited for beyond the
//! plugin's call budget, up to its long-call budget (`long-call-timeout-ms`); a
//! plugin cannot chain such calls to hold its call longer than the two budgets
//! together, nor wait for them so in other calls.

use std::time::{Duration, Instant};

use gve::plugin::bindings::types::VmInfo;
use gve::plugin::PluginError;

use super::network::{libvirtd_bench_long, timed_get_vm, Frozen};
use super::{bench, hostile, Bench};
use gve::plugin::Grants;

/// A private libvirtd and the hostile plugin with a call budget of `budget_ms` and
/// a long-call budget of `long_ms`, and what asks the plugin for `n` refreshes of
/// its pool; one clone of one refresh is done first, with libvirtd answering, so
/// that the instance keeps its connection open.
async fn refreshing(
    budget_ms: u64,
    long_ms: u64,
) -> (gve_harness::Libvirtd, Bench, impl Fn(u32) -> String) {
    let (lv, b, _) = libvirtd_bench_long(budget_ms, long_ms).await;
    let uri = lv.uri.clone();
    let ask = move |n: u32| format!("libvirt-long:{uri}|gve|{n}");
    let (outcome, _) = timed_clone(&b, &ask(1)).await;
    assert_eq!(outcome.unwrap().name, "1");
    (lv, b, ask)
}

/// `clone` of `source` on the hostile plugin (the fixture does what `get-vm` of
/// it does): its outcome and how long it took.
async fn timed_clone(b: &Bench, source: &str) -> (Result<VmInfo, PluginError>, Duration) {
    let t = Instant::now();
    let outcome = b.hostile.clone_vm(source, "copy", false).await;
    (outcome, t.elapsed())
}

/// A pool refresh that libvirtd answers only after 4 s (it is stopped until then)
/// ends well in a call whose budget is 2 s: its wait is not charged to the call.
/// Before, the host gave up on it at 1.8 s and the plugin's call failed.
#[tokio::test]
async fn a_long_libvirt_call_is_waited_for_beyond_the_call_budget() {
    let (lv, b, ask) = refreshing(2_000, 10_000).await;
    let one = ask(1);
    let frozen = Frozen::new(&lv);
    let ((outcome, took), ()) = tokio::join!(timed_clone(&b, &one), async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        drop(frozen);
    });
    let vm = outcome.expect("the call ends well");
    assert_eq!(vm.name, "1", "the refresh was not waited for");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(7),
        "took {took:?}"
    );
    b.aftermath().await;
}

/// Against a libvirtd that never answers, a plugin that refreshes a pool again
/// and again in a clone gets its long-call budget (3 s) once, over all its long
/// calls, and then what is left of its call budget (2 s): its call ends by the two
/// together, as the plugin's own answer, not stopped by the sandbox. In `get-vm`
/// (a control call) it gets no long-call budget at all.
#[tokio::test]
async fn chained_long_calls_hold_a_call_no_longer_than_both_budgets() {
    let (lv, b, ask) = refreshing(2_000, 3_000).await;
    let frozen = Frozen::new(&lv);
    let (outcome, took) = timed_get_vm(&b, &ask(1)).await;
    assert_eq!(outcome.expect("the plugin answers").name, "0");
    assert!(took < Duration::from_millis(2_300), "get-vm took {took:?}");
    let (outcome, took) = timed_clone(&b, &ask(1000)).await;
    drop(frozen);
    let vm = outcome.expect("the plugin answers on its own");
    assert_eq!(vm.name, "0", "no refresh answered");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_millis(5_300),
        "took {took:?} (budget 2 s, long-call budget 3 s)"
    );
    b.aftermath().await;
}

/// Clones waiting for libvirt's long calls (every instance of the plugin's long
/// lane, 4, held by a stopped libvirtd) never hold up a control call: `get-vm`
/// answers at once. Before, they took the control lane's turns and `get-vm`
/// waited for one.
#[tokio::test]
async fn long_operations_never_hold_up_control_calls() {
    let (lv, b, ask) = refreshing(5_000, 10_000).await;
    let frozen = Frozen::new(&lv);
    let mut clones = tokio::task::JoinSet::new();
    for i in 0..4 {
        let (s, ask) = (b.hostile.clone(), ask(1));
        clones.spawn(async move { s.clone_vm(&ask, &format!("c{i}"), false).await });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (outcome, took) = timed_get_vm(&b, "plain").await;
    assert_eq!(outcome.expect("a control call answers").name, "plain");
    assert!(took < Duration::from_secs(1), "get-vm waited {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(frozen);
    while let Some(r) = clones.join_next().await {
        // The warmed instance waited for its refresh; fresh ones could not open.
        let _ = r.unwrap();
    }
    b.aftermath().await;
}

/// A plugin sleeping while a hypervisor's task runs (contract 0.1.3's
/// `deadline.long-wait`): in a clone the sleeps come out of the long-call budget,
/// not the call's (3 s asleep in a 2 s budget ends well, the call's time left as
/// it was); once that budget is used up they are plain sleeps that end before the
/// call's deadline; in `get-vm` they never were anything else. No call is stopped
/// by the sandbox.
#[tokio::test]
async fn a_plugin_sleeps_on_its_long_call_budget_only_in_long_operations() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 2_000;
    sp.limits.long_call_timeout_ms = 5_000;
    let b = bench(sp).await;
    let left = |vm: VmInfo| -> (u64, u64) {
        let (call, long) = vm.name.split_once('/').unwrap();
        (call.parse().unwrap(), long.parse().unwrap())
    };

    let (outcome, took) = timed_clone(&b, "long-wait:1000:3").await;
    let (call, long) = left(outcome.expect("3 s asleep in a 2 s call ends well"));
    assert!(took >= Duration::from_secs(3), "took {took:?}");
    assert!((1_500..=2_000).contains(&call), "call left {call}");
    assert!(
        (1_700..=2_000).contains(&long),
        "long-call budget left {long}"
    );

    // 8 s asked: 5 s on the long budget, then what the call has less 0.2 s.
    let held_to_both = |(outcome, took): (Result<VmInfo, PluginError>, Duration)| {
        let (call, long) = left(outcome.expect("the plugin answers on its own"));
        assert_eq!(long, 0);
        assert!(call <= 400, "call left {call}");
        assert!(
            took >= Duration::from_millis(6_500) && took < Duration::from_secs(8),
            "took {took:?} (budget 2 s, long-call budget 5 s)"
        );
    };
    held_to_both(timed_clone(&b, "long-wait:1000:8").await);

    // get-vm has no long-call budget: 3 s asked, at most the call's 2 s given.
    let (outcome, took) = timed_get_vm(&b, "long-wait:1000:3").await;
    let (call, long) = left(outcome.expect("the plugin answers on its own"));
    assert_eq!(long, 0);
    assert!(call <= 400, "call left {call}");
    assert!(took < Duration::from_secs(3), "get-vm took {took:?}");

    // A sleep of u64::MAX ms is held to the same bounds: the call's budget in
    // get-vm, the long budget and the call's in a clone.
    let forever = format!("long-wait:{}:1", u64::MAX);
    let (outcome, took) = timed_get_vm(&b, &forever).await;
    assert_eq!(left(outcome.expect("the plugin answers on its own")).1, 0);
    assert!(took < Duration::from_secs(3), "get-vm took {took:?}");
    held_to_both(timed_clone(&b, &forever).await);
    b.aftermath().await;
}

/// Code a plugin runs after its long sleeps is held to the call's budget: a clone
/// that sleeps 3 s on its long-call budget, then spins, is stopped 0.5 s (its call
/// budget) after the sleeps, and the error says how long it ran.
#[tokio::test]
async fn a_plugin_that_spins_after_its_long_sleeps_is_stopped_at_its_call_budget() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 500;
    sp.limits.long_call_timeout_ms = 10_000;
    let b = bench(sp).await;
    let (outcome, took) = timed_clone(&b, "long-wait:1000:3:spin").await;
    let err = outcome.unwrap_err();
    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    assert!(
        took >= Duration::from_millis(3_400) && took < Duration::from_millis(4_600),
        "took {took:?} (3 s asleep, then a 0.5 s budget)"
    );
    let text = err.to_string();
    assert!(text.contains("stopped after running 3."), "{text}");
    assert!(text.contains("past its 500ms budget"), "{text}");
    b.aftermath().await;
}
