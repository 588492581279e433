//! A deliberately broken driver: each defect is caught by the case that owns it,
//! with a message that names what the contract expects and what the driver did.

use std::time::Duration;

use gve::plugin::{Grants, Limits};
use gve_conformance::{run, Options, Outcome, Report, Target};

use crate::support::bundle;

async fn with_defect(defect: &str) -> Report {
    let mut grants = Grants::default();
    grants.config.insert("defect".into(), defect.into());
    let target = Target {
        bundle: bundle("broken"),
        endpoint: "broken:here".into(),
        credentials: crate::support::no_creds(),
        grants,
        limits: Limits {
            call_timeout_ms: 1_000,
            ..Default::default()
        },
        second_host: None,
        destination_host: None,
        linked_source: None,
        label: None,
        template: None,
        guest_plugin: None,
    };
    let options = Options {
        settle: Duration::from_secs(1),
        ..Default::default()
    };
    run(&target, &options).await.unwrap()
}

/// The failure message of `case`, which must have failed.
fn failure<'a>(r: &'a Report, case: &str) -> &'a str {
    let c = r.cases.iter().find(|c| c.name == case).unwrap();
    match &c.outcome {
        Outcome::Fail(m) => m,
        other => panic!("{case} should fail, it is {other:?}\n{}", r.human()),
    }
}

#[tokio::test]
async fn without_a_defect_it_passes_what_it_declares() {
    let r = with_defect("").await;
    assert!(r.passed(), "{}", r.human());
    let skipped: Vec<&str> = r
        .cases
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Skip(_)))
        .map(|c| c.name.as_str())
        .collect();
    assert!(
        skipped.contains(&"suspend.suspends-and-resume-runs"),
        "{skipped:?}"
    );
    assert!(
        r.cases
            .iter()
            .filter(|c| c.mandatory)
            .all(|c| c.outcome == Outcome::Pass),
        "a mandatory case was skipped: {}",
        r.human()
    );
}

#[tokio::test]
async fn a_wrong_state_after_start_is_caught() {
    let r = with_defect("wrong-state-after-start").await;
    let m = failure(&r, "start.runs-and-repeats-invalid-state");
    assert!(m.contains("reads back stopped, not running"), "{m}");
}

#[tokio::test]
async fn a_wrong_error_kind_is_caught() {
    let r = with_defect("wrong-error-kind").await;
    let m = failure(&r, "core.unknown-vm-is-not-found");
    assert!(
        m.contains("the contract's answer is `not-found`, the driver answered `backend`"),
        "{m}"
    );
}

#[tokio::test]
async fn a_leaked_vm_is_caught() {
    let r = with_defect("leak").await;
    let m = failure(&r, "destroy.removes");
    assert!(
        m.contains("after destroy: the contract's answer is `not-found`, the driver succeeded"),
        "{m}"
    );
    let m = failure(&r, "create.reads-back");
    assert!(
        m.contains("left behind after cleanup") && m.contains("still there after destroy"),
        "{m}"
    );
}

#[tokio::test]
async fn a_call_past_its_deadline_is_caught() {
    let r = with_defect("slow-start").await;
    let m = failure(&r, "start.runs-and-repeats-invalid-state");
    assert!(m.contains("start stopped after running 1."), "{m}");
    assert!(m.contains("past its 1s budget"), "{m}");
    // Cases that do not start anything still pass.
    assert_eq!(
        r.cases
            .iter()
            .find(|c| c.name == "destroy.removes")
            .unwrap()
            .outcome,
        Outcome::Pass
    );
}
