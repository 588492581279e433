//! The site's writer: submissions, the runners' transitions and other changes
//! share its batches (group commit); a change that finds nothing to do writes
//! nothing; a failing change does not take its batch down with it.

use std::time::{Duration, Instant};

use gve::site::jobs::new_job;
use gve::site::model::{JobKind, JobState};
use gve::site::store::StoreError;
use serde_json::json;

use crate::site::env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_finds_nothing_is_rolled_back_and_publishes_nothing() {
    let e = env(0, |_| {}).await;
    let store = &e.site.core.store;
    let mut events = store.subscribe();
    let job = new_job("ann", JobKind::Request, None, json!({}));
    let id = job.id.clone();

    let kept = {
        let job = job.clone();
        store
            .write_if(move |t| {
                t.put_job(&job, Some("queued"))?;
                Ok(None::<()>)
            })
            .unwrap()
    };
    assert!(kept.is_none());
    assert!(
        store.job(&id).unwrap().is_none(),
        "a change that returned None was committed"
    );
    while let Ok(ev) = events.try_recv() {
        assert_ne!(ev.job, id, "a rolled-back change published {ev:?}");
    }

    let kept = store
        .write_if(move |t| {
            t.put_job(&job, Some("queued"))?;
            Ok(Some(7))
        })
        .unwrap();
    assert_eq!(kept, Some(7));
    assert!(store.job(&id).unwrap().is_some());
    let ev = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let ev = events.recv().await.unwrap();
            if ev.job == id {
                return ev;
            }
        }
    })
    .await
    .expect("the committed change's event");
    assert_eq!(ev.message, "queued");
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_transitions_and_a_failing_change_share_batches_without_loss() {
    // No agent: every request fails at placement, after its runner recorded
    // `running` (a lazy change through the writer) and its end (a durable one).
    let e = env(0, |_| {}).await;
    let core = e.site.core.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60u32 {
        let core = core.clone();
        tasks.spawn(async move {
            let job = new_job(
                "ann",
                JobKind::Request,
                None,
                json!({ "main-memory-mib": 64 }),
            );
            let id = core.submitter.submit(job, None).await.unwrap().id;
            // Interleaved: lazy changes returning values, and one that fails.
            let lazy = core.submitter.run(true, move |_t| Ok(i)).await.unwrap();
            assert_eq!(lazy, i);
            if i == 30 {
                let r = core
                    .submitter
                    .run(false, |_t| -> Result<(), StoreError> {
                        Err(StoreError::Storage("refused by the test".into()))
                    })
                    .await;
                assert!(
                    matches!(&r, Err(StoreError::Storage(m)) if m.contains("refused by the test")),
                    "{r:?}"
                );
            }
            id
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = tasks.join_next().await {
        ids.push(id.unwrap());
    }
    assert_eq!(ids.len(), 60);

    let end = Instant::now() + Duration::from_secs(60);
    while core.store.active_job_count().unwrap() > 0 {
        assert!(Instant::now() < end, "jobs still active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &ids {
        let j = core
            .store
            .job(id)
            .unwrap()
            .expect("an accepted job was lost");
        assert_eq!(j.state, JobState::Failed, "{j:?}");
        let states: Vec<JobState> = core
            .store
            .events_after(0, 100, Some(id))
            .unwrap()
            .into_iter()
            .map(|ev| ev.state)
            .collect();
        assert_eq!(
            states,
            [JobState::Queued, JobState::Running, JobState::Failed],
            "job {id}"
        );
    }
    e.site.stop().await;
}

/// A lazy change's event is published at once but reaches the disk only with the
/// next durable commit; a crash in between takes it back. The sequence number a
/// subscriber saw must not then be given to another event: a client resuming
/// with `Last-Event-ID` would skip that one.
#[test]
fn an_event_a_crash_took_back_does_not_give_its_number_to_another() {
    use gve::site::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.redb");
    let store = Store::open(&path).unwrap();
    let mut job = new_job("ann", JobKind::Request, None, json!({}));
    store.write(|t| t.put_job(&job, Some("queued"))).unwrap();
    let mut seen = store.subscribe();
    job.state = JobState::Running;
    store
        .write_lazy(|t| t.put_job(&job, Some("running")))
        .unwrap();
    let lazy = seen.try_recv().expect("the lazy change's event, published");
    assert_eq!(lazy.message, "running");

    // kill -9 now: the file as the disk holds it (the lazy commit is not in it).
    let crashed = dir.path().join("crashed.redb");
    std::fs::copy(&path, &crashed).unwrap();
    drop(store);
    let again = Store::open(&crashed).unwrap();
    let kept = again.events_after(0, 100, None).unwrap();
    assert_eq!(
        kept.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
        ["queued"],
        "the crash image still holds the lazy event: this test proves nothing"
    );
    let other = new_job("bob", JobKind::Request, None, json!({}));
    again.write(|t| t.put_job(&other, Some("queued"))).unwrap();
    let after = again.events_after(lazy.seq, 100, None).unwrap();
    assert_eq!(
        after.iter().map(|e| e.job.as_str()).collect::<Vec<_>>(),
        [other.id.as_str()],
        "a client resuming after the lost event {} misses the next one",
        lazy.seq
    );

    // Again, with the lost event the first of its run: the floor each open
    // records, not the last event on disk, keeps the numbers apart.
    drop(again);
    let run = dir.path().join("run-3.redb");
    std::fs::copy(&crashed, &run).unwrap();
    let third_run = Store::open(&run).unwrap();
    let mut seen = third_run.subscribe();
    let mut third = new_job("cy", JobKind::Request, None, json!({}));
    third.state = JobState::Running;
    third_run
        .write_lazy(|t| t.put_job(&third, Some("running")))
        .unwrap();
    let lost = seen.try_recv().unwrap();
    let crashed = dir.path().join("crashed-3.redb");
    std::fs::copy(&run, &crashed).unwrap();
    drop(third_run);
    let fourth_run = Store::open(&crashed).unwrap();
    assert!(fourth_run.job(&third.id).unwrap().is_none());
    fourth_run
        .write(|t| t.put_job(&third, Some("queued")))
        .unwrap();
    let next = fourth_run.events_after(0, 100, None).unwrap();
    let next = next.last().unwrap();
    assert_eq!(next.job, third.id);
    assert!(
        next.seq > lost.seq,
        "{} reuses or precedes {}",
        next.seq,
        lost.seq
    );
}
