//! CPU: loops in calls and in destructors are stopped at the deadline, the instance
//! is discarded and its pool permit returned.

use std::time::{Duration, Instant};

use gve::plugin::{ErrorKind, Grants, PluginError};

use super::{bench, hostile};
use crate::support::no_creds;

#[tokio::test]
async fn infinite_loop_is_stopped_at_its_deadline() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 500;
    let b = bench(sp).await;
    let t = Instant::now();
    let err = b.hostile.get_vm("loop").await.unwrap_err();
    let took = t.elapsed();
    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    assert!(err.to_string().contains("hostile"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(
        took >= Duration::from_millis(500),
        "stopped early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "deadline + 1 s exceeded: {took:?}"
    );
    b.aftermath().await;
}

/// A plugin reads the time left in its call (contract 0.1.2's `deadline`): its
/// budget at entry, less what it spent since (0.7 s asleep).
#[tokio::test]
async fn a_plugin_reads_the_time_left_in_its_call() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 2_000;
    let b = bench(sp).await;
    let left = |name: String| name.parse::<u64>().unwrap();
    let fresh = left(b.hostile.get_vm("deadline:0").await.unwrap().name);
    assert!((1_000..=2_000).contains(&fresh), "{fresh}");
    let spent = left(b.hostile.get_vm("deadline:700").await.unwrap().name);
    assert!((300..=1_300).contains(&spent), "{spent}");
    b.aftermath().await;
}

#[tokio::test]
async fn runaway_loop_does_not_block_other_calls() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 1_500;
    let b = bench(sp).await;
    let looping = tokio::spawn({
        let s = b.hostile.clone();
        async move { s.get_vm("loop").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another instance of the same session answers while the loop spins.
    let t = Instant::now();
    assert_eq!(b.hostile.get_vm("ordinary").await.unwrap().name, "ordinary");
    assert!(
        t.elapsed() < Duration::from_millis(1_000),
        "blocked behind the loop: {:?}",
        t.elapsed()
    );
    assert!(looping.await.unwrap().is_err());
    b.aftermath().await;
}

/// One instance allowed in all: a later call can only answer if every instance whose
/// destructor spun is gone, permit and all.
#[tokio::test]
async fn destructors_that_spin_are_stopped_and_their_instance_discarded() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 500;
    sp.limits.max_instances = 1;
    sp.limits.pool_size = 1;
    let b = bench(sp).await;
    let guest = b
        .host
        .open_guest("hostile", "anywhere", no_creds())
        .await
        .unwrap();
    let budget = Duration::from_millis(500 + 1_000 + 200);

    let t = Instant::now();
    guest
        .download("vm", "spin-drop")
        .await
        .unwrap()
        .close()
        .await;
    assert!(
        t.elapsed() < budget,
        "download close took {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    guest
        .upload("vm", "spin-drop", 0o644, false)
        .await
        .unwrap()
        .abort()
        .await;
    assert!(t.elapsed() < budget, "upload abort took {:?}", t.elapsed());

    let mut up = guest.upload("vm", "spin-drop", 0o644, false).await.unwrap();
    up.write(b"abc").await.unwrap();
    let err = up.finish().await.unwrap_err();
    assert!(
        matches!(&err, PluginError::Deadline { op, .. } if *op == "upload-finish"),
        "{err}"
    );

    // Dropped without being ended: the destructor runs on a background task, armed.
    drop(guest.download("vm", "spin-drop").await.unwrap());
    let t = Instant::now();
    let vm = tokio::time::timeout(Duration::from_secs(5), b.hostile.get_vm("ordinary"))
        .await
        .expect("the only instance permit came back")
        .unwrap();
    assert_eq!(vm.name, "ordinary");
    assert!(
        t.elapsed() < budget,
        "waited {:?} for the permit",
        t.elapsed()
    );

    // A well-behaved transfer still works on the same plugin.
    let mut d = guest.download("vm", "small").await.unwrap();
    assert_eq!(d.read(16).await.unwrap(), b"xxx");
    d.close().await;
    b.aftermath().await;
}

#[tokio::test]
async fn spinning_in_open_or_info_is_stopped_and_the_old_version_stays() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 500;
    let b = bench(sp.clone()).await;
    let t = Instant::now();
    let err = b
        .host
        .open_driver("hostile", "spin-open", no_creds())
        .await
        .err()
        .expect("a spinning open fails");
    assert!(
        matches!(&err, PluginError::Deadline { op, .. } if *op == "open"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1_700),
        "{:?}",
        t.elapsed()
    );
    // A version whose info() spins is refused; the loaded one keeps serving.
    sp.grants.config.insert("spin-info".into(), "yes".into());
    let err = b.host.replace("hostile", sp).await.unwrap_err();
    assert!(
        matches!(&err, PluginError::Deadline { op, .. } if *op == "info"),
        "{err}"
    );
    b.aftermath().await;
}

#[tokio::test]
async fn deep_recursion_traps_without_harm() {
    let b = bench(hostile(Grants::default())).await;
    let err = b.hostile.get_vm("recurse").await.unwrap_err();
    // Rust's shadow stack lives in linear memory: running off it is an out-of-bounds
    // access, reported in the trap's own words rather than as a backtrace.
    assert!(matches!(err, PluginError::Trap { .. }), "{err}");
    assert!(err.to_string().len() < 200, "{err}");
    b.aftermath().await;
}

/// A wait on the host side (a clock pollable) has no epoch to interrupt: the
/// backstop ends it at the budget plus one second.
#[tokio::test]
async fn a_long_host_side_wait_is_cut_by_the_backstop() {
    let mut sp = hostile(Grants::default());
    sp.limits.call_timeout_ms = 500;
    let b = bench(sp).await;
    let t = Instant::now();
    let err = b.hostile.get_vm("nap:60000").await.unwrap_err();
    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    assert!(
        t.elapsed() < Duration::from_millis(2_000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(b.hostile.get_vm("nap:10").await.unwrap().name, "rested");
    b.aftermath().await;
}
