//! Whether the job indexes still describe the jobs. A release from before them
//! writes jobs without them and leaves their built flags set, so after a
//! downgrade and an upgrade again this release would answer from indexes that
//! miss those jobs: a VM busy for a job that ended long ago, a finished job
//! never retired. Two checks at each open, neither reading a job:
//! - every open since the event floor (2026-12-03) moves the floor
//!   (`events:floor`), and this release records the floor it moved to: a
//!   floor other than that one was moved by another release since;
//! - counts, read in constant time: every job is active (one entry in
//!   `active_job_facts`) or finished (one in `jobs_finished`), and
//!   `active_jobs`, which every release keeps, has one entry per active job.
//!   Records no index can hold (an unreadable job) leave a difference, which
//!   is recorded at each open and cannot move while only this release writes.
//!   This catches a release older than the floor submitting, ending or
//!   retiring jobs (not one only starting them, or ending as many as it
//!   submits and retires).
//!
//! Either finding drops the indexes; the same open builds them again
//! (`active::open_tables`, `finished::open_tables`).
//! Nothing is written on the hot path.

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::{active, events, finished, storage, StoreError, JOBS, META};

/// Meta key: the counts' differences at the last open (see [`gap`]).
const GAP: &str = "index:jobs-gap";
/// Meta key: the event floor this release's last open moved to.
const FLOOR_SEEN: &str = "index:events-floor";

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

/// Drops the job indexes when another release wrote jobs since the last open;
/// before the event floor moves.
pub(super) fn drop_if_drifted(txn: &WriteTransaction) -> Result<(), StoreError> {
    let built =
        meta_value(txn, active::BUILT)?.is_some() && meta_value(txn, finished::BUILT)?.is_some();
    if !built {
        // Built below in any case.
        return Ok(());
    }
    let now = gap(txn)?;
    // A database last opened by a release with the indexes but not this check
    // has no difference recorded: indexes that agree with the jobs leave none
    // (but an unreadable job, which costs one needless build here).
    let was = meta_value(txn, GAP)?.unwrap_or_else(|| "0 0".into());
    let seen = meta_value(txn, FLOOR_SEEN)?;
    let floor = meta_value(txn, events::FLOOR)?;
    let moved_by_another = seen.is_some() && seen != floor;
    if now != was || moved_by_another {
        tracing::warn!(
            counts_were = was,
            counts_now = now,
            event_floor = floor,
            event_floor_left_here = seen,
            "the job indexes disagree with the jobs (a release from before them wrote this database since): building them again"
        );
        active::forget(txn)?;
        finished::forget(txn)?;
    }
    Ok(())
}

/// Records what the next open compares, once the job indexes are open (and
/// built) and the event floor moved: the counts' differences and the floor.
pub(super) fn record(txn: &WriteTransaction) -> Result<(), StoreError> {
    let now = gap(txn)?;
    let floor = meta_value(txn, events::FLOOR)?.unwrap_or_default();
    let mut meta = txn.open_table(META).map_err(storage)?;
    meta.insert(GAP, now.as_str()).map_err(storage)?;
    meta.insert(FLOOR_SEEN, floor.as_str()).map_err(storage)?;
    Ok(())
}
