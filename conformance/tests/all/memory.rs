//! The SDK's memory example is the executable specification: it passes every case
//! it can run, and skips only the one that checks a capability it declares and
//! the one that needs the optional bulk export (0.1.1), which it does not have.

use gve_conformance::{run, run_loaded, Options, Outcome};

use crate::support::memory_target;

#[tokio::test]
async fn the_memory_example_passes_every_case() {
    let report = run(&memory_target(), &Options::default()).await.unwrap();
    print!("{}", report.human());
    for c in &report.cases {
        match &c.outcome {
            Outcome::Pass => {}
            Outcome::Skip(why) => assert!(
                [
                    (
                        "linked-clone.refused-by-name",
                        "the driver declares linked-clone"
                    ),
                    (
                        "bulk.disk-carries-bytes-both-ways",
                        "the driver does not export gve:hypervisor/bulk (bulk-copy)"
                    ),
                ]
                .contains(&(c.name.as_str(), why.as_str())),
                "only the inverse of a declared capability, or the optional bulk export, may skip: {} ({why})",
                c.name
            ),
            Outcome::Fail(why) => panic!("{} failed: {why}", c.name),
        }
    }
    assert!(report.cases.len() >= 17, "{} cases", report.cases.len());
    assert_eq!(report.driver, "memory");
    assert!(
        report.proven_against.contains("memory"),
        "{}",
        report.proven_against
    );
}

/// The run shares its host (and so the memory driver's one instance) with VMs of the
/// operator's: it must not touch them, and must leave nothing of its own.
#[tokio::test]
async fn a_run_leaves_nothing_behind_and_touches_nothing_else() {
    let target = memory_target();
    let cache = tempfile::tempdir().unwrap();
    let host = gve::plugin::PluginHost::new(gve::plugin::HostConfig {
        cache_dir: cache.path().join("cache"),
        engine: Default::default(),
    })
    .unwrap();
    host.load(gve::plugin::PluginSpec {
        bundle: target.bundle.clone(),
        grants: Default::default(),
        limits: Default::default(),
    })
    .await
    .unwrap();
    let s = host
        .open_driver("memory", &target.endpoint, target.credentials.clone())
        .await
        .unwrap();
    let ctx = gve_conformance::Ctx::new(
        s.clone(),
        None,
        host.driver_info("memory").await.unwrap(),
        None,
        std::time::Duration::from_secs(1),
    );
    for name in ["operators-vm", "gvc-operators"] {
        let mut profile = ctx.profile("x");
        profile.name = name.into();
        let vm = s.create(&profile).await.unwrap();
        s.start(&vm.id).await.unwrap();
    }
    let view = |vms: Vec<gve::plugin::bindings::types::VmInfo>| -> Vec<String> {
        vms.iter().map(|v| format!("{v:?}")).collect()
    };
    let before = view(s.list_vms().await.unwrap());
    assert_eq!(before.len(), 2);

    let report = run_loaded(&host, "memory", &target, &Options::default())
        .await
        .unwrap();
    assert!(report.passed(), "{}", report.human());
    let passed = report
        .cases
        .iter()
        .filter(|c| c.outcome == Outcome::Pass)
        .count();
    assert!(passed >= 16, "{}", report.human());

    let after = view(s.list_vms().await.unwrap());
    assert_eq!(
        after, before,
        "the run left VMs behind or changed the operator's"
    );
}

#[tokio::test]
async fn benchmark_mode_times_every_operation() {
    let options = Options {
        bench_rounds: 20,
        filter: Some(regex::Regex::new("^core\\.").unwrap()),
        ..Default::default()
    };
    let report = run(&memory_target(), &options).await.unwrap();
    let ops: Vec<&str> = report.bench.iter().map(|l| l.op.as_str()).collect();
    for op in [
        "create",
        "start",
        "shutdown (force)",
        "destroy",
        "list-vms",
        "host-info",
    ] {
        let l = report
            .bench
            .iter()
            .find(|l| l.op == op)
            .unwrap_or_else(|| panic!("{op} not timed: {ops:?}"));
        assert_eq!((l.samples, l.failed), (20, 0), "{l:?}");
        assert!(l.p50_ms <= l.p99_ms && l.p50_ms > 0.0, "{l:?}");
    }
    assert!(report.human().contains("p99 ms"));
}
