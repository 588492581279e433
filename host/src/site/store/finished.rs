//! The finished jobs in the order they ended, each with its owner: retention
//! removes the jobs that ended first (by age or past `max-finished-jobs`),
//! with their events, reading only what it removes; a backlog of queued jobs
//! older than them is never read.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::Deserialize;

use super::{events, storage, StoreError, Txn, JOBS, META, USER_JOBS};
use crate::site::model::{Job, JobState};

/// (end, Unix ms; job id) → owner: every finished job.
const FINISHED: TableDefinition<(u64, &str), &str> = TableDefinition::new("jobs_finished");
/// Meta key saying the index was built (a database from before it has none).
pub(super) const BUILT: &str = "index:jobs-finished";

/// What the index needs of a stored job.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Stamp {
    owner: String,
    state: JobState,
    updated_ms: u64,
}

/// When the job stored as `bytes` ended, if it had.
pub(super) fn end_of(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Stamp>(bytes)
        .ok()
        .filter(|s| s.state.is_terminal())
        .map(|s| s.updated_ms)
}

/// Opens the table, building it from the jobs on the first open of a database
/// from before it.
pub(super) fn open_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut finished = txn.open_table(FINISHED).map_err(storage)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    if meta.get(BUILT).map_err(storage)?.is_some() {
        return Ok(());
    }
    let jobs = txn.open_table(JOBS).map_err(storage)?;
    super::build_index(
        "the finished jobs by their end",
        jobs.len().map_err(storage)?,
        |progress| {
            let mut n = 0u64;
            for row in jobs.range::<&str>(..).map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                progress.read_one();
                // An unreadable job is reported where it is read; it has no entry.
                if let Ok(s) = serde_json::from_slice::<Stamp>(v.value()) {
                    if s.state.is_terminal() {
                        finished
                            .insert((s.updated_ms, k.value()), s.owner.as_str())
                            .map_err(storage)?;
                        n += 1;
                    }
                }
            }
            Ok(n)
        },
    )?;
    meta.insert(BUILT, "1").map_err(storage)?;
    Ok(())
}

/// How many finished jobs the index holds.
pub(super) fn len(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let t = txn.open_table(FINISHED).map_err(storage)?;
    t.len().map_err(storage)
}

/// Drops the index and its built flag.
pub(super) fn forget(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.delete_table(FINISHED).map_err(storage)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    meta.remove(BUILT).map_err(storage)?;
    Ok(())
}

/// Keeps the entry of `job`, just written; `ended_before` is when its previous
/// write had it end (a finished job written again, finished or not now).
pub(super) fn track(
    txn: &WriteTransaction,
    job: &Job,
    ended_before: Option<u64>,
) -> Result<(), StoreError> {
    let end = job.state.is_terminal().then_some(job.updated_ms);
    if ended_before == end {
        return Ok(());
    }
    let mut t = txn.open_table(FINISHED).map_err(storage)?;
    if let Some(e) = ended_before {
        t.remove((e, job.id.as_str())).map_err(storage)?;
    }
    if let Some(e) = end {
        t.insert((e, job.id.as_str()), job.owner.as_str())
            .map_err(storage)?;
    }
    Ok(())
}

impl super::Store {
    /// How many finished jobs retention may remove (the index's entries).
    pub fn finished_job_count(&self) -> Result<u64, StoreError> {
        self.read(|r| {
            r.open_table(FINISHED)
                .map_err(storage)?
                .len()
                .map_err(storage)
        })
    }
}

impl Txn<'_> {
    /// Removes up to `limit` of the finished jobs that ended first, of those
    /// that ended before `before_ms`, with their events; returns how many jobs
    /// went (an entry whose job was already gone is dropped, not counted).
    /// Jobs still queued or running are not in the index and never go.
    pub fn prune_jobs(&mut self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut removed = 0;
        let gone: Vec<(u64, String, String)> = {
            let t = self.txn.open_table(FINISHED).map_err(storage)?;
            let mut gone = Vec::new();
            for row in t.range(..(before_ms, "")).map_err(storage)? {
                if gone.len() >= limit {
                    break;
                }
                let (k, owner) = row.map_err(storage)?;
                let (end, id) = k.value();
                gone.push((end, id.to_string(), owner.value().to_string()));
            }
            gone
        };
        {
            let mut finished = self.txn.open_table(FINISHED).map_err(storage)?;
            let mut jobs = self.txn.open_table(JOBS).map_err(storage)?;
            let mut by_user = self.txn.open_table(USER_JOBS).map_err(storage)?;
            for (end, id, owner) in &gone {
                finished.remove((*end, id.as_str())).map_err(storage)?;
                if jobs.remove(id.as_str()).map_err(storage)?.is_some() {
                    removed += 1;
                }
                by_user
                    .remove(format!("{owner}\0{id}").as_str())
                    .map_err(storage)?;
            }
        }
        for (_, id, _) in &gone {
            events::remove_of_job(self.txn, id)?;
        }
        Ok(removed)
    }

    /// Removes up to `limit` of the finished jobs that ended first, whatever
    /// their age, with their events; returns how many went.
    pub fn prune_oldest_jobs(&mut self, limit: usize) -> Result<usize, StoreError> {
        self.prune_jobs(u64::MAX, limit)
    }
}
