//! Bounded storage of the site: finished jobs go after their retention (newer
//! ones stay; queued and running ones are never removed), a command's stored output is capped by site policy and flagged
//! truncated, and below the disk low-water mark new work is refused `507` with
//! nothing recorded or staged.

use std::time::Duration;

use gve::site::model::{Job, JobState, SiteVm};
use serde_json::json;

use crate::site::{env, job, post};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_go_after_their_retention_and_newer_ones_stay() {
    let e = env(1, |c| c.job_retention_seconds = 1).await;
    let ann = e.user("ann", None).await;
    let j = job(&ann, "/v1/vms", json!({ "main-memory-mib": 256 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.clone().unwrap()).unwrap();
    let mut done = vec![j.id.clone()];
    for _ in 0..5 {
        let j = job(
            &ann,
            &format!("/v1/vms/{}/exec", vm.id),
            json!({ "argv": ["echo", "x"] }),
        )
        .await;
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        done.push(j.id);
    }
    // A job that ended after the cutoff is kept.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let fresh = job(
        &ann,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["true"] }),
    )
    .await;
    let removed = e.site.core.prune_finished();
    assert_eq!(removed, done.len(), "every finished job past 1 s goes");
    for id in &done {
        let err = ann.get::<Job>(&format!("/v1/jobs/{id}")).await.unwrap_err();
        assert_eq!(err.status, 404, "{id}: {err:?}");
    }
    let listed: Vec<Job> = ann.get("/v1/jobs").await.unwrap();
    assert_eq!(
        listed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [fresh.id.as_str()],
        "the user's listing holds only what is kept"
    );
    // The VM, its owner and usage are untouched by the removal of its history.
    let v: SiteVm = ann.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
    assert_eq!(v.owner.as_deref(), Some("ann"));
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_stored_output_is_capped_and_flagged() {
    let e = env(1, |c| c.max_output_kib = 1).await;
    let bo = e.user("bo", None).await;
    let j = job(&bo, "/v1/vms", json!({ "main-memory-mib": 256 })).await;
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let long = "y".repeat(4096);
    let j = job(
        &bo,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["echo", long], "output-limit": 16 << 20 }),
    )
    .await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(j.params["output-limit"], 1024, "{:?}", j.params);
    let r = j.result.unwrap();
    assert_eq!(r["exec"]["stdout-truncated"], true, "{r}");
    let out = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        r["exec"]["stdout-b64"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(out.len(), 1024, "kept exactly the site's cap");
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_disk_low_water_mark_new_work_is_refused_507_and_nothing_recorded() {
    // A mark no disk here meets: every submission finds the disk "full".
    let e = env(1, |c| c.min_free_disk_mib = 1 << 40).await;
    let cy = e.user("cy", None).await;
    let before: Vec<Job> = e.admin.get("/v1/jobs").await.unwrap();
    let err = post(&cy, "/v1/vms", json!({ "main-memory-mib": 256 }))
        .await
        .unwrap_err();
    assert_eq!(err.status, 507, "{err:?}");
    assert_eq!(err.kind, "insufficient-storage", "{err:?}");
    assert!(err.message.contains("low-water mark"), "{err:?}");
    assert!(err.retry_after_s.is_some(), "{err:?}");
    let after: Vec<Job> = e.admin.get("/v1/jobs").await.unwrap();
    assert_eq!(before.len(), after.len(), "nothing was recorded");
    // Reading goes on.
    let _: Vec<SiteVm> = cy.get("/v1/vms").await.unwrap();
    e.site.stop().await;
}
