//! Whether the job indexes still describe the jobs. A release from before them
//! writes jobs without them and leaves their built flags set, so after a
//! downgrade and an upgrade again this release would answer from indexes that
//! miss those jobs: a VM busy for a job that ended long ago, a finished job
//! never retired. Two checks at each open, neither reading a job:
//! - every release writes an event for each job it submits, runs or ends, and
//!   this one records (in the same transaction) the newest event it wrote: a
//!   newer event on disk was written by another release;
//! - counts, read in constant time: every job is active (one entry in
//!   `active_job_facts`) or finished (one in `jobs_finished`), and
//!   `active_jobs`, which every release keeps, has one entry per active job.
//!   Records no index can hold (an unreadable job) leave a difference, which
//!   is recorded at each open and cannot move while only this release writes.
//!
//! Either finding drops the indexes, to be built again by the opens after it.

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::{active, events, finished, storage, StoreError, JOBS, META};

/// Meta key: the counts' differences at the last open (see [`gap`]).
const GAP: &str = "index:jobs-gap";
/// Meta key: the sequence number of the newest event this release wrote.
const WROTE: &str = "index:events-written";

/// Jobs in neither index, and `active_jobs` entries with no facts.
fn gap(txn: &WriteTransaction) -> Result<String, StoreError> {
    let jobs = txn
        .open_table(JOBS)
        .map_err(storage)?
        .len()
        .map_err(storage)?;
    let (listed, facts) = active::lens(txn)?;
    let ended = finished::len(txn)?;
    let unindexed = i128::from(jobs) - i128::from(facts) - i128::from(ended);
    Ok(format!(
        "{unindexed} {}",
        i128::from(listed) - i128::from(facts)
    ))
}

fn meta_value(txn: &WriteTransaction, key: &str) -> Result<Option<String>, StoreError> {
    let meta = txn.open_table(META).map_err(storage)?;
    let v = meta.get(key).map_err(storage)?;
    Ok(v.map(|v| v.value().to_string()))
}

/// Drops the job indexes when another release wrote jobs since the last open.
pub(super) fn drop_if_drifted(txn: &WriteTransaction) -> Result<(), StoreError> {
    let built =
        meta_value(txn, active::BUILT)?.is_some() && meta_value(txn, finished::BUILT)?.is_some();
    if !built {
        // Built below in any case.
        return Ok(());
    }
    let now = gap(txn)?;
    // A database last opened by a release with the indexes but not this check
    // had no difference to record: indexes that agree with the jobs leave none.
    let was = meta_value(txn, GAP)?.unwrap_or_else(|| "0 0".into());
    let wrote = meta_value(txn, WROTE)?.and_then(|v| v.parse::<u64>().ok());
    let newest = events::last_seq(txn)?;
    let foreign_events = wrote.is_some_and(|w| newest > w);
    if now != was || foreign_events {
        tracing::warn!(
            counts_were = was,
            counts_now = now,
            newest_event = newest,
            newest_event_written_here = wrote,
            "the job indexes disagree with the jobs (a release from before them wrote this database since): building them again"
        );
        active::forget(txn)?;
        finished::forget(txn)?;
    }
    Ok(())
}

/// Records what the next open compares, once the job indexes are open (and
/// built): the counts' differences and the newest event.
pub(super) fn record(txn: &WriteTransaction) -> Result<(), StoreError> {
    let now = gap(txn)?;
    let newest = events::last_seq(txn)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    meta.insert(GAP, now.as_str()).map_err(storage)?;
    meta.insert(WROTE, newest.to_string().as_str())
        .map_err(storage)?;
    Ok(())
}

/// Records `seq` as the newest event this release wrote (in the transaction
/// that wrote it).
pub(super) fn wrote_event(txn: &WriteTransaction, seq: u64) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(storage)?;
    meta.insert(WROTE, seq.to_string().as_str())
        .map_err(storage)?;
    Ok(())
}
