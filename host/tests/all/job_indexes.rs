//! The site's job indexes (active jobs by VM, clone name, kind and state;
//! finished jobs by their end): kept with every job write, built on the first
//! open of a database from before them, and built again when a release from
//! before them has written the database since.

use std::time::Duration;

use gve::site::jobs::new_job;
use gve::site::model::{AgentRec, Job, JobKind, JobState, SiteVm};
use gve::site::store::Store;
use serde_json::json;

/// Makes the database at `path` one from before an index: `drop` deletes its
/// tables and the meta key `built` saying it was built goes.
fn without_index(path: &std::path::Path, built: &str, drop: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(path).unwrap();
    let w = db.begin_write().unwrap();
    drop(&w);
    let meta: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("meta");
    let mut m = w.open_table(meta).unwrap();
    assert!(m.remove(built).unwrap().is_some(), "{built}");
    std::mem::drop(m);
    w.commit().unwrap();
}

/// A new site database in a directory of its own (kept while the first is held).
fn fresh_store() -> (tempfile::TempDir, std::path::PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.redb");
    let store = Store::open(&path).unwrap();
    (dir, path, store)
}

/// An agent record registered at `id`.
fn agent(id: &str) -> AgentRec {
    serde_json::from_value(json!({
        "id": id, "url": "http://127.0.0.1:1", "token": "t", "status": "up",
        "seen-ms": 0, "templates": [], "registered-ms": 0
    }))
    .unwrap()
}

/// A running VM record `id` on agent `on`.
fn vm(id: &str, on: &str) -> SiteVm {
    serde_json::from_value(json!({
        "id": id, "agent": on, "agent-vm": id, "name": id, "logical-cpus": 1,
        "main-memory-mib": 64, "state": "running", "updated-ms": 0
    }))
    .unwrap()
}

/// What the site's health check asks of a VM's jobs (one busy, a job active, a
/// clone naming its VM) is answered from indexes kept with every job write, and
/// a database from before them gets them built on open: a backlog of queued
/// jobs is never read whole to answer.
#[test]
fn the_active_job_indexes_follow_every_job_and_are_built_on_open() {
    let (_dir, path, store) = fresh_store();
    let exec = new_job("ann", JobKind::Exec, Some("vm-1".into()), json!({}));
    let clone = new_job(
        "ann",
        JobKind::Clone,
        Some("vm-1".into()),
        json!({ "name": "twin" }),
    );
    let mut request = new_job("bo", JobKind::Request, None, json!({}));
    store
        .write(|t| {
            t.put_agent(&agent("a1"))?;
            t.put_agent(&agent("a2"))?;
            t.put_vm(&vm("vm-1", "a1"))?;
            t.put_vm(&vm("vm-2", "a2"))?;
            t.put_job(&exec, None)?;
            t.put_job(&clone, None)?;
            t.put_job(&request, None)
        })
        .unwrap();
    // (busy vm-1, busy vm-2, busy vm-3, clone "twin" from a1, from a2, "other" from
    // a1); and the tally the gauges read agrees with the active jobs, as read.
    let ask = |s: &Store| {
        let mut want: std::collections::BTreeMap<(String, String), u64> = Default::default();
        for j in s.active_jobs().unwrap() {
            let state = serde_json::to_value(j.state).unwrap();
            *want
                .entry((j.kind.as_str().into(), state.as_str().unwrap().into()))
                .or_default() += 1;
        }
        assert_eq!(
            s.active_tally().unwrap(),
            want.into_iter().collect::<Vec<_>>()
        );
        s.write(|t| {
            Ok([
                t.vm_busy("vm-1")?,
                t.vm_busy("vm-2")?,
                t.vm_busy("vm-")?,
                t.cloning_to("a1", "twin")?,
                t.cloning_to("a2", "twin")?,
                t.cloning_to("a1", "twi")?,
            ])
        })
        .unwrap()
    };
    assert_eq!(ask(&store), [true, false, false, true, false, false]);
    // Placement gives the request a VM: that VM is busy now.
    request.vm = Some("vm-2".into());
    request.state = JobState::Running;
    store.write(|t| t.put_job(&request, None)).unwrap();
    assert_eq!(ask(&store), [true, true, false, true, false, false]);
    // A job moved to another VM leaves no entry on the first.
    request.vm = Some("vm-3".into());
    store.write(|t| t.put_job(&request, None)).unwrap();
    assert_eq!(ask(&store), [true, false, false, true, false, false]);
    request.vm = Some("vm-2".into());
    store.write(|t| t.put_job(&request, None)).unwrap();

    // A database from before the indexes (dropped here) gets them built on open.
    drop(store);
    without_index(&path, "index:active-jobs", |w| {
        for name in ["active_by_vm", "active_clones"] {
            let def: redb::TableDefinition<&str, ()> = redb::TableDefinition::new(name);
            assert!(w.delete_table(def).unwrap(), "{name}");
        }
        let def: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("active_job_facts");
        assert!(w.delete_table(def).unwrap());
        let def: redb::TableDefinition<(&str, &str), u64> =
            redb::TableDefinition::new("active_tally");
        assert!(w.delete_table(def).unwrap());
    });
    let store = Store::open(&path).unwrap();
    assert_eq!(ask(&store), [true, true, false, true, false, false]);
    assert!(store.write(|t| t.job_active(&exec.id)).unwrap());

    // Jobs end: their entries go, one at a time.
    let mut exec = exec;
    exec.state = JobState::Succeeded;
    store.write(|t| t.put_job(&exec, None)).unwrap();
    assert!(!store.write(|t| t.job_active(&exec.id)).unwrap());
    assert_eq!(
        ask(&store),
        [true, true, false, true, false, false],
        "the clone still works on vm-1"
    );
    let mut clone = clone;
    clone.state = JobState::Failed;
    request.state = JobState::Cancelled;
    store
        .write(|t| {
            t.put_job(&clone, None)?;
            t.put_job(&request, None)
        })
        .unwrap();
    assert_eq!(ask(&store), [false; 6]);
    assert_eq!(store.active_job_count().unwrap(), 0);
    assert!(store.active_tally().unwrap().is_empty());
    let mut seen = 0;
    store.for_each_active(|_| seen += 1).unwrap();
    assert_eq!(seen, 0);
}

/// Retention removes the finished jobs that ended first (not those submitted
/// first: a job that waited long and just ended stays), with their events, and
/// never an active job; a finished job written again moves to its new end; an
/// older database gets the index built on open.
#[test]
fn finished_jobs_go_in_the_order_they_ended_with_their_events() {
    let (_dir, path, store) = fresh_store();
    // Submitted in this order; `a` still runs, the others ended at these times.
    let mk = |state: JobState, end: u64| {
        let mut j = new_job("ann", JobKind::Exec, None, json!({}));
        j.state = state;
        j.updated_ms = end;
        std::thread::sleep(Duration::from_millis(2));
        j
    };
    let a = mk(JobState::Running, 1);
    let b = mk(JobState::Succeeded, 10);
    let c = mk(JobState::Failed, 5);
    let mut d = mk(JobState::Cancelled, 20);
    let e = mk(JobState::Succeeded, 22);
    store
        .write(|t| {
            for j in [&a, &b, &c, &d, &e] {
                t.put_job(j, Some("a step"))?;
            }
            Ok(())
        })
        .unwrap();
    let there = |s: &Store, j: &Job| {
        let events = s.events_after(0, 100, Some(&j.id)).unwrap();
        let job = s.job(&j.id).unwrap();
        assert_eq!(job.is_some(), !events.is_empty(), "{}: {events:?}", j.id);
        job.is_some()
    };
    assert_eq!(store.write(|t| t.prune_oldest_jobs(1)).unwrap(), 1);
    assert!(!there(&store, &c), "c ended first");
    assert!(there(&store, &a) && there(&store, &b) && there(&store, &d));
    assert_eq!(store.write(|t| t.prune_jobs(15, 10)).unwrap(), 1);
    assert!(!there(&store, &b), "b ended before 15");
    assert!(there(&store, &a) && there(&store, &d) && there(&store, &e));

    // A database from before the index (dropped here) gets it built on open.
    drop(store);
    without_index(&path, "index:jobs-finished", |w| {
        let def: redb::TableDefinition<(u64, &str), &str> =
            redb::TableDefinition::new("jobs_finished");
        assert!(w.delete_table(def).unwrap());
    });
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.finished_job_count().unwrap(),
        2,
        "d and e indexed again"
    );
    // Only ends before the bound go: d ended at 20 exactly.
    assert_eq!(store.write(|t| t.prune_jobs(20, 10)).unwrap(), 0);
    // d written again with a later end: its entry moves there.
    d.updated_ms = 30;
    store.write(|t| t.put_job(&d, None)).unwrap();
    assert_eq!(store.write(|t| t.prune_jobs(25, 10)).unwrap(), 1);
    assert!(!there(&store, &e) && there(&store, &d));
    assert_eq!(store.write(|t| t.prune_oldest_jobs(10)).unwrap(), 1);
    assert!(!there(&store, &d));
    assert!(there(&store, &a), "a running job never goes");
    assert_eq!(store.write(|t| t.prune_oldest_jobs(10)).unwrap(), 0);
    assert_eq!(store.finished_job_count().unwrap(), 0);
    // Nothing of the removed jobs is left in the per-user index either.
    drop(store);
    let db = redb::Database::open(&path).unwrap();
    let r = redb::ReadableDatabase::begin_read(&db).unwrap();
    let def: redb::TableDefinition<&str, ()> = redb::TableDefinition::new("user_jobs");
    let t = r.open_table(def).unwrap();
    let left: Vec<String> = redb::ReadableTable::range::<&str>(&t, ..)
        .unwrap()
        .map(|row| row.unwrap().0.value().to_string())
        .collect();
    assert_eq!(left, [format!("ann\0{}", a.id)]);
}

/// What a release from before the job indexes wrote: jobs, `active_jobs`, job
/// events; never the indexes.
struct Older<'t> {
    jobs: redb::Table<'t, &'static str, &'static [u8]>,
    active: redb::Table<'t, &'static str, ()>,
    events: redb::Table<'t, u64, &'static [u8]>,
}

impl Older<'_> {
    /// Writes `job` with an event, as that release's runners did.
    fn put(&mut self, job: &Job, active: bool) {
        let bytes = serde_json::to_vec(job).unwrap();
        self.jobs.insert(job.id.as_str(), bytes.as_slice()).unwrap();
        if active {
            self.active.insert(job.id.as_str(), ()).unwrap();
        } else {
            self.active.remove(job.id.as_str()).unwrap();
        }
        let seq = redb::ReadableTable::last(&self.events)
            .unwrap()
            .map_or(1, |(k, _)| k.value() + 1);
        let ev = json!({
            "seq": seq, "job": job.id, "owner": job.owner, "state": job.state,
            "message": "older release", "at-ms": 1
        });
        let bytes = serde_json::to_vec(&ev).unwrap();
        self.events.insert(seq, bytes.as_slice()).unwrap();
    }
}

/// Writes the site database at `path` as a release from before the job indexes
/// did; `with_floor`: one from after the event floor, which its open moves.
fn as_an_older_release(
    path: &std::path::Path,
    with_floor: bool,
    write: impl FnOnce(&mut Older<'_>),
) {
    let db = redb::Database::open(path).unwrap();
    let w = db.begin_write().unwrap();
    if with_floor {
        let mut meta = w
            .open_table(redb::TableDefinition::<&str, &str>::new("meta"))
            .unwrap();
        let floor: u64 = redb::ReadableTable::get(&meta, "events:floor")
            .unwrap()
            .unwrap()
            .value()
            .parse()
            .unwrap();
        let moved = (floor + (1 << 20)).to_string();
        meta.insert("events:floor", moved.as_str()).unwrap();
    }
    {
        let mut older = Older {
            jobs: w.open_table(redb::TableDefinition::new("jobs")).unwrap(),
            active: w
                .open_table(redb::TableDefinition::new("active_jobs"))
                .unwrap(),
            events: w
                .open_table(redb::TableDefinition::new("job_events"))
                .unwrap(),
        };
        write(&mut older);
    }
    w.commit().unwrap();
}

/// A release from before the job indexes (a downgrade) writes jobs without
/// them and leaves their built flags set. The next open by this one finds out,
/// by the event floor that release's open moved or by counts that moved, and
/// builds them again: a job that ended meanwhile frees its VM, one submitted or started
/// meanwhile is counted, one retired meanwhile is gone from the index. This
/// release's own writes, and a difference no index can remove (an unreadable
/// job), are not taken for drift: no open builds anything then.
#[test]
fn jobs_written_by_a_release_before_the_indexes_are_indexed_on_the_next_open() {
    let (_dir, path, store) = fresh_store();
    let exec = new_job("ann", JobKind::Exec, Some("vm-1".into()), json!({}));
    let mut other = new_job("ann", JobKind::Exec, None, json!({}));
    let mut done = new_job("ann", JobKind::Exec, None, json!({}));
    done.state = JobState::Succeeded;
    done.updated_ms = 5;
    store
        .write(|t| {
            t.put_agent(&agent("a1"))?;
            for v in ["vm-1", "vm-2", "vm-9"] {
                t.put_vm(&vm(v, "a1"))?;
            }
            for j in [&exec, &other, &done] {
                t.put_job(j, Some("submitted"))?;
            }
            Ok(())
        })
        .unwrap();
    let busy = |s: &Store, vm: &str| s.write(|t| t.vm_busy(vm)).unwrap();
    let tally = |s: &Store| -> Vec<String> {
        let t = s.active_tally().unwrap();
        t.into_iter()
            .map(|((k, st), n)| format!("{k} {st} {n}"))
            .collect()
    };
    assert!(busy(&store, "vm-1"));
    assert_eq!(store.finished_job_count().unwrap(), 1);
    drop(store);

    // The older release ends the exec on vm-1.
    let mut ended = exec.clone();
    ended.state = JobState::Succeeded;
    ended.updated_ms = 7;
    as_an_older_release(&path, true, |o| o.put(&ended, false));
    let store = Store::open(&path).unwrap();
    assert!(!busy(&store, "vm-1"), "the exec ended: vm-1 is free");
    assert_eq!(tally(&store), ["exec queued 1"]);
    assert_eq!(store.finished_job_count().unwrap(), 2, "done and the exec");
    drop(store);

    // As many jobs in as out: it submits one and retires `done`.
    let late = new_job("bo", JobKind::Request, None, json!({}));
    as_an_older_release(&path, true, |o| {
        o.put(&late, true);
        o.jobs.remove(done.id.as_str()).unwrap();
    });
    let store = Store::open(&path).unwrap();
    assert_eq!(tally(&store), ["exec queued 1", "request queued 1"]);
    assert_eq!(store.finished_job_count().unwrap(), 1, "only the exec");
    drop(store);

    // No count moves, only the floor tells: it starts `other` on vm-2.
    other.state = JobState::Running;
    other.vm = Some("vm-2".into());
    as_an_older_release(&path, true, |o| o.put(&other, true));
    let store = Store::open(&path).unwrap();
    assert_eq!(tally(&store), ["exec running 1", "request queued 1"]);
    assert!(busy(&store, "vm-2"));
    drop(store);

    // A release from before the floor: only a count tells. Its retention
    // removes the exec.
    as_an_older_release(&path, false, |o| {
        o.jobs.remove(exec.id.as_str()).unwrap();
    });
    let store = Store::open(&path).unwrap();
    assert_eq!(store.finished_job_count().unwrap(), 0, "the exec is gone");
    assert_eq!(store.write(|t| t.prune_oldest_jobs(10)).unwrap(), 0);
    drop(store);

    // An unreadable job is in no index: the open that finds it builds them
    // again and records the difference it makes. From then on, with this
    // release's writes in between (jobs run and end, retention), no open builds
    // anything: an entry planted in an index, which a build would drop, stays.
    as_an_older_release(&path, false, |o| {
        o.jobs
            .insert("job-unreadable", b"{not json".as_slice())
            .unwrap();
    });
    drop(Store::open(&path).unwrap());
    {
        let db = redb::Database::open(&path).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(redb::TableDefinition::<&str, ()>::new("active_by_vm"))
            .unwrap()
            .insert("vm-9\0job-planted", ())
            .unwrap();
        w.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert!(
        busy(&store, "vm-9"),
        "no build on an open that found no drift"
    );
    let mut late = late;
    late.state = JobState::Running;
    store.write(|t| t.put_job(&late, Some("running"))).unwrap();
    late.state = JobState::Succeeded;
    store.write(|t| t.put_job(&late, Some("ended"))).unwrap();
    let fresh = new_job("cy", JobKind::Exec, None, json!({}));
    store
        .write(|t| t.put_job(&fresh, Some("submitted")))
        .unwrap();
    assert_eq!(store.write(|t| t.prune_oldest_jobs(10)).unwrap(), 1);
    drop(store);
    let store = Store::open(&path).unwrap();
    assert!(busy(&store, "vm-9"), "this release's writes are not drift");
    assert_eq!(tally(&store), ["exec queued 1", "exec running 1"]);
    assert_eq!(store.finished_job_count().unwrap(), 0);
}
