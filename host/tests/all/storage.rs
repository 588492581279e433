//! Bounded storage of the site: finished jobs go after their retention (newer
//! ones stay; queued and running ones are never removed), a command's stored output is capped by site policy and flagged
//! truncated, and below the disk low-water mark new work is refused `507` with
//! nothing recorded or staged.

use std::time::Duration;

use gve::site::model::{Job, JobState, SiteVm};
use serde_json::json;

use crate::site::{env, job, post, wait_job};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_go_after_their_retention_and_newer_ones_stay() {
    let e = env(1, |c| {
        c.job_retention_seconds = 1;
        c.audit_retention_seconds = 1;
    })
    .await;
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
    let cutoff = gve::site::model::now_ms() - 1_000;
    let removed = e.site.core.prune_finished();
    // Job events and audit entries from before the cutoff went with them; the
    // fresh job's are kept.
    let store = &e.site.core.store;
    let events = store.events_after(0, 100_000, None).unwrap();
    assert!(events.iter().all(|ev| ev.at_ms >= cutoff), "{events:?}");
    assert!(events.iter().any(|ev| ev.job == fresh.id));
    let audit = store.audit_after(0, 100_000).unwrap();
    assert!(audit.iter().all(|a| a.at_ms >= cutoff), "{audit:?}");
    assert!(audit.iter().any(|a| a.target.contains(&vm.id)), "{audit:?}");
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

/// Past `max-finished-jobs` the finished jobs that ended first go whatever their
/// age, each with its events; the newest stay whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_finished_jobs_the_oldest_go_whatever_their_age() {
    let e = env(0, |c| c.max_finished_jobs = 3).await;
    let ann = e.user("ann", None).await;
    // Requests no agent can place, one after another: each ends failed.
    let mut ids = Vec::new();
    for _ in 0..7 {
        let j = job(&ann, "/v1/vms", json!({ "main-memory-mib": 64 })).await;
        assert_eq!(j.state, JobState::Failed, "{j:?}");
        ids.push(j.id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let kept = || async {
        let (status, _, text) =
            crate::metrics::scrape(e.admin.base(), Some(crate::site::ADMIN)).await;
        assert_eq!(status, 200, "{text}");
        crate::metrics::sample(&text, "gve_site_jobs_kept")
    };
    assert_eq!(
        kept().await,
        7.0,
        "every finished job is kept until retention runs"
    );
    assert_eq!(e.site.core.prune_finished(), 4);
    assert_eq!(
        e.site.core.prune_finished(),
        0,
        "at the count, nothing more"
    );
    assert_eq!(kept().await, 3.0, "the metric follows the removal");
    let store = &e.site.core.store;
    for id in &ids[..4] {
        let err = ann.get::<Job>(&format!("/v1/jobs/{id}")).await.unwrap_err();
        assert_eq!(err.status, 404, "{id}: {err:?}");
        let evs = store.events_after(0, 100, Some(id)).unwrap();
        assert!(evs.is_empty(), "{id}'s events went: {evs:?}");
    }
    let listed: Vec<Job> = ann.get("/v1/jobs").await.unwrap();
    let mut kept: Vec<&str> = listed.iter().map(|j| j.id.as_str()).collect();
    kept.sort();
    assert_eq!(
        kept,
        ids[4..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    for id in &ids[4..] {
        let evs = store.events_after(0, 100, Some(id)).unwrap();
        assert!(
            evs.iter().any(|ev| ev.state == JobState::Queued)
                && evs.iter().any(|ev| ev.state == JobState::Failed),
            "{id} keeps its events whole: {evs:?}"
        );
    }
    e.site.stop().await;
}

/// Writes `batches` retention batches of failed jobs straight into `store`;
/// how many jobs.
fn finished_jobs(store: &gve::site::store::Store, batches: usize) -> usize {
    for _ in 0..batches {
        store
            .write(|t| {
                for _ in 0..gve::store_core::BATCH {
                    let mut j = gve::site::jobs::new_job(
                        "ann",
                        gve::site::model::JobKind::Request,
                        None,
                        json!({}),
                    );
                    j.state = JobState::Failed;
                    t.put_job(&j, Some("failed"))?;
                }
                Ok(())
            })
            .unwrap();
    }
    batches * gve::store_core::BATCH
}

/// Retention removing a large backlog lets other writers in between its
/// batches (redb has one writer at a time): a removal in one transaction, or
/// one that never lets go, fails this. What the pause between batches is for,
/// a busy site's submissions keeping their pace, is measured by
/// `bench/million.rs` (run 5: back to back, 256 of ~14,000 submissions got
/// through while 926,000 jobs went).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_of_a_large_backlog_lets_other_writers_in_between_its_batches() {
    let e = env(0, |c| c.max_finished_jobs = 10).await;
    let store = e.site.core.store.clone();
    let jobs = finished_jobs(&store, 30);
    let core = e.site.core.clone();
    let (removed, n) =
        crate::support::other_writes_during(&store, move || core.prune_finished()).await;
    assert_eq!(removed, jobs - 10);
    let batches = removed / gve::store_core::BATCH;
    assert!(
        n >= batches / 2,
        "only {n} other writes got in during {batches} batches of removal"
    );
    e.site.stop().await;
}

/// A site stopped while retention removes a large backlog: the removal ends
/// after its batch, the database closes, and what was not removed yet is still
/// there for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_stopped_during_a_large_removal_ends_it_after_its_batch() {
    let e = env(0, |c| c.max_finished_jobs = 10).await;
    let store = e.site.core.store.clone();
    let jobs = finished_jobs(&store, 100);
    let path = e.site.core.config.data_dir.join("site.redb");
    let core = e.site.core.clone();
    let removal = tokio::task::spawn_blocking(move || core.prune_finished());
    // Once the removal is under way.
    while store.finished_job_count().unwrap() == jobs as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(store);
    let t = std::time::Instant::now();
    e.site.stop().await;
    let removed = removal.await.unwrap();
    assert!(
        t.elapsed() < gve::store_core::CLOSE_WAIT,
        "the stop waited for the removal: {:?}",
        t.elapsed()
    );
    assert!(removed < jobs - 10, "the removal ran to its end: {removed}");
    let reopened = gve::site::store::Store::open(&path).unwrap();
    assert_eq!(
        reopened.finished_job_count().unwrap(),
        (jobs - removed) as u64,
        "what was not removed is kept"
    );
}

/// Past `max-job-events` the oldest events go (with their index entries), and the
/// newest jobs' events stay whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_job_events_the_oldest_go_and_the_newest_stay() {
    let e = env(0, |c| {
        c.max_job_events = 1_000;
        c.max_queued_jobs_per_user = 10_000;
    })
    .await;
    let ann = e.user("ann", None).await;
    // Requests no agent can place: each ends failed with its events.
    let mut ids = Vec::new();
    for _ in 0..1_200 {
        let j: Job = serde_json::from_value(
            post(&ann, "/v1/vms", json!({ "main-memory-mib": 64 }))
                .await
                .unwrap(),
        )
        .unwrap();
        ids.push(j.id);
    }
    let last = wait_job(&ann, ids.last().unwrap()).await;
    assert_eq!(last.state, JobState::Failed, "{last:?}");
    for id in &ids {
        wait_job(&ann, id).await;
    }
    let store = &e.site.core.store;
    let events = store.events_after(0, usize::MAX, None).unwrap();
    // Trimmed to the cap each 1,024 events: never more than the cap and one round.
    assert!(
        events.len() > 1_000 / 2 && events.len() <= 1_000 + 1_024,
        "{} events kept",
        events.len()
    );
    assert!(events.len() < 3 * ids.len(), "some were trimmed");
    assert_eq!(store.event_index_len().unwrap(), events.len() as u64);
    let first = store.events_after(0, 100, Some(&ids[0])).unwrap();
    assert!(first.is_empty(), "the oldest job's events went: {first:?}");
    let newest = store
        .events_after(0, 100, Some(ids.last().unwrap()))
        .unwrap();
    assert!(
        newest.iter().any(|ev| ev.state == JobState::Failed),
        "{newest:?}"
    );
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

/// Sends `n` bytes to be copied into `vm` at `path`: the copy-in job, or the refusal.
async fn stage(
    c: &gve::api::client::Client,
    vm: &str,
    path: &str,
    n: usize,
) -> Result<Job, gve::api::ApiError> {
    c.put_stream(
        &format!("/v1/vms/{vm}/files?path={path}"),
        &[],
        gve::api::full(bytes::Bytes::from(vec![1u8; n])),
    )
    .await
}

/// Copies `n` bytes into `vm` at `path` and waits for the copy-in to end.
async fn copy_in(c: &gve::api::client::Client, vm: &str, path: &str, n: usize) -> Job {
    let j = stage(c, vm, path, n).await.unwrap();
    wait_job(c, &j.id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_copies_are_held_to_a_per_user_quota_and_a_site_cap() {
    let e = env(1, |c| {
        c.max_staging_mib_per_user = 1;
        c.max_staging_mib = 2;
    })
    .await;
    let staging = &e.site.core.staging;
    let (ann, bo, cy) = (
        e.user("ann", None).await,
        e.user("bo", None).await,
        e.user("cy", None).await,
    );
    let vm_of = |j: Job| {
        serde_json::from_value::<SiteVm>(j.result.unwrap())
            .unwrap()
            .id
    };
    let body = json!({ "main-memory-mib": 128 });
    let (va, vb, vc) = (
        vm_of(job(&ann, "/v1/vms", body.clone()).await),
        vm_of(job(&bo, "/v1/vms", body.clone()).await),
        vm_of(job(&cy, "/v1/vms", body).await),
    );
    let kib = 1024;

    // A copy-in's staged input is given back once its job ran.
    let j = copy_in(&ann, &va, "/tmp/a", 600 * kib).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(staging.used("ann"), 0);
    // A copy-out's output is held until it goes; a second one passes ann's 1 MiB.
    let out = job(
        &ann,
        &format!("/v1/vms/{va}/copy-out"),
        json!({ "path": "/tmp/a" }),
    )
    .await;
    assert_eq!(out.state, JobState::Succeeded, "{out:?}");
    assert_eq!(staging.used("ann"), 600 * 1024);
    let j = job(
        &ann,
        &format!("/v1/vms/{va}/copy-out"),
        json!({ "path": "/tmp/a" }),
    )
    .await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let err = j.error.unwrap();
    assert!(
        err.kind == "denied" && err.message.contains("staging quota"),
        "{err:?}"
    );
    assert_eq!(
        staging.used("ann"),
        600 * 1024,
        "the cut copy gave its bytes back"
    );
    // A copy-in that would pass it is refused before it is staged or recorded.
    let jobs_before: Vec<Job> = ann.get("/v1/jobs").await.unwrap();
    let err = stage(&ann, &va, "/tmp/b", 600 * kib).await.unwrap_err();
    assert_eq!((err.status, err.kind.as_str()), (403, "denied"), "{err:?}");
    let jobs_after: Vec<Job> = ann.get("/v1/jobs").await.unwrap();
    assert_eq!(jobs_before.len(), jobs_after.len());

    // The site's cap of 2 MiB: bo holds 1000 KiB more, so cy's 600 KiB would pass
    // it, and cy, under their own quota, is told to come back later.
    assert_eq!(
        copy_in(&bo, &vb, "/tmp/b", 1000 * kib).await.state,
        JobState::Succeeded
    );
    let held = job(
        &bo,
        &format!("/v1/vms/{vb}/copy-out"),
        json!({ "path": "/tmp/b" }),
    )
    .await;
    assert_eq!(held.state, JobState::Succeeded, "{held:?}");
    let err = stage(&cy, &vc, "/tmp/c", 600 * kib).await.unwrap_err();
    assert_eq!(
        (err.status, err.kind.as_str()),
        (507, "insufficient-storage"),
        "{err:?}"
    );
    assert!(err.retry_after_s.is_some(), "{err:?}");
    assert_eq!(staging.total(), 1600 * 1024);
    // What is held is what the directory holds.
    let on_disk: u64 = std::fs::read_dir(e.site.core.config.data_dir.join("staging"))
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(on_disk, staging.total());
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_finished_operations_go_after_their_retention_with_their_keys() {
    use gve::agent::model::{OpKind, OpState, Operation};
    let (agent, c, _dir) = crate::agent::start_agent(
        "memory",
        crate::support::spec("memory", Default::default()),
        "memory:op-retention",
        60_000,
    )
    .await;
    let submit = |path: &'static str, body: serde_json::Value, key: &'static str| {
        let c = c.clone();
        async move {
            let op: Operation = c
                .call_with(
                    hyper::Method::POST,
                    path,
                    Some(&body),
                    &[("idempotency-key", key.to_string())],
                )
                .await
                .unwrap();
            crate::agent::wait_op(&c, &op.id).await
        }
    };
    let made = submit(
        "/v1/vms",
        json!({ "name": "kept", "main-memory-mib": 64 }),
        "k-create",
    )
    .await;
    assert_eq!(made.state, OpState::Succeeded, "{made:?}");
    // An operation still running (as a crash leaves one) is never removed, however old.
    let core = agent.core().unwrap();
    let running = Operation {
        id: "op-000000000001-running".into(),
        kind: OpKind::Start,
        vm: "x".into(),
        params: json!({}),
        state: OpState::Running,
        result: None,
        output: None,
        error: None,
        created_ms: 1,
        finished_ms: None,
    };
    core.registry.write(|t| t.put_op(&running)).unwrap();
    // Operations kept by an older version have unordered ids (`op-<uuid>`):
    // retention finds them too, running ones excepted.
    let now = gve::agent::model::now_ms();
    let legacy = |id: &str, finished_ms: Option<u64>| Operation {
        id: id.into(),
        state: if finished_ms.is_some() {
            OpState::Succeeded
        } else {
            OpState::Running
        },
        finished_ms,
        ..running.clone()
    };
    let old = "op-f1e2d3c4-0000-4000-8000-000000000001";
    let recent = "op-a1e2d3c4-0000-4000-8000-000000000002";
    let busy = "op-b1e2d3c4-0000-4000-8000-000000000003";
    core.registry
        .write(|t| {
            t.put_op(&legacy(old, Some(1)))?;
            t.put_op(&legacy(recent, Some(now - 10_000)))?;
            t.put_op(&legacy(busy, None))
        })
        .unwrap();
    // A retention of an hour keeps all but the one that ended in 1970; of
    // nothing, every finished one.
    assert_eq!(core.registry.prune_finished_ops(3_600_000, u64::MAX), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(core.registry.prune_finished_ops(0, u64::MAX), 2);
    for gone in [old, recent] {
        let err = c
            .get::<Operation>(&format!("/v1/operations/{gone}"))
            .await
            .unwrap_err();
        assert_eq!(err.status, 404, "{gone}: {err:?}");
    }
    let kept: Operation = c.get(&format!("/v1/operations/{busy}")).await.unwrap();
    assert_eq!(kept.state, OpState::Running);
    let err = c
        .get::<Operation>(&format!("/v1/operations/{}", made.id))
        .await
        .unwrap_err();
    assert_eq!(err.status, 404, "{err:?}");
    let still: Operation = c
        .get("/v1/operations/op-000000000001-running")
        .await
        .unwrap();
    assert_eq!(still.state, OpState::Running);
    // Its key went with it: the same key now starts a new operation.
    let again = submit(
        "/v1/vms",
        json!({ "name": "kept-2", "main-memory-mib": 64 }),
        "k-create",
    )
    .await;
    assert_ne!(again.id, made.id);
    assert_eq!(again.state, OpState::Succeeded, "{again:?}");
    agent.stop().await;
}

/// A `max-job-events` lowered below what a quiet site holds is met by retention's
/// rounds (bounded bites, the oldest first), not only as new events arrive.
#[test]
fn a_lowered_max_job_events_is_met_without_new_events() {
    use gve::site::jobs::new_job;
    use gve::site::model::JobKind;
    use gve::site::store::Store;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.redb");
    let j = new_job("ann", JobKind::Exec, None, json!({}));
    Store::open(&path)
        .unwrap()
        .write(|t| {
            for i in 0..1_500 {
                t.event(&j, &format!("step {i}"))?;
            }
            Ok(())
        })
        .unwrap();
    let store = Store::open(&path).unwrap().with_max_events(1_000);
    assert_eq!(store.write(|t| t.trim_events_over_max(300)).unwrap(), 300);
    assert_eq!(store.write(|t| t.trim_events_over_max(300)).unwrap(), 200);
    assert_eq!(store.write(|t| t.trim_events_over_max(300)).unwrap(), 0);
    let kept = store.events_after(0, usize::MAX, None).unwrap();
    assert_eq!(kept.len(), 1_000);
    assert_eq!(kept[0].message, "step 500", "the oldest went first");
    assert_eq!(store.event_index_len().unwrap(), 1_000);
}

/// A sequence floor that is not a number (a damaged database) refuses the
/// service's open and names its key, rather than numbering again from 0 and
/// handing followers (`after=N`, `Last-Event-ID`) numbers they have seen; once
/// mended, the database opens.
#[test]
fn a_damaged_sequence_floor_refuses_the_open_and_names_it() {
    use gve::agent::registry::Registry;
    use gve::site::store::Store;

    fn set_meta(path: &std::path::Path, key: &str, value: &str) {
        let db = redb::Database::open(path).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(redb::TableDefinition::<&str, &str>::new("meta"))
            .unwrap()
            .insert(key, value)
            .unwrap();
        w.commit().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site.redb");
    let agent = dir.path().join("agent.redb");
    let open = |path: &std::path::Path| -> Result<(), String> {
        if path == site {
            Store::open(path).map(drop).map_err(|e| e.to_string())
        } else {
            Registry::open(path).map(drop).map_err(|e| e.to_string())
        }
    };
    open(&site).unwrap();
    open(&agent).unwrap();
    for (path, key) in [
        (&site, "events:floor"),
        (&site, "seq-floor:audit"),
        (&agent, "seq-floor:audit"),
        (&agent, "seq-floor:events"),
    ] {
        set_meta(path, key, "12x");
        let e = open(path).unwrap_err();
        assert!(
            e.contains(key) && e.contains("\"12x\"") && e.contains("damaged"),
            "{key}: {e}"
        );
        set_meta(path, key, "7");
        open(path).unwrap_or_else(|e| panic!("{key} mended: {e}"));
    }
    // A floor at the end of the numbers cannot be numbered past either.
    set_meta(&agent, "seq-floor:audit", &u64::MAX.to_string());
    let e = open(&agent).unwrap_err();
    assert!(e.contains("no sequence number is left"), "{e}");
}
