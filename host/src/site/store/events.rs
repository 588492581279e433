//! Job events: one table in sequence order (the stream's ids, what retention
//! trims by age) and an index by job, so that following one job, or resuming it
//! with `Last-Event-ID`, reads that job's events and none of the others'. The
//! cost of a follower does not grow with the site's history.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::Deserialize;

use super::{decode, encode, storage, Store, StoreError, Txn, META};
use crate::site::model::{now_ms, Job, JobEvent};

/// Sequence number → event.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("job_events");
/// (job id, sequence number) → (): each job's events in order.
const BY_JOB: TableDefinition<(&str, u64), ()> = TableDefinition::new("job_events_by_job");

/// Meta key saying the index was built (a database from before it has none).
const BUILT: &str = "index:job-events";

/// Job events kept unless the site's `max-job-events` says; older ones are trimmed.
pub const MAX_EVENTS: u64 = 1_000_000;

/// Meta key: the floor of sequence numbers the last open handed out.
pub(super) const FLOOR: &str = "events:floor";

/// How far each open moves the sequence past everything before it: more than
/// the events a crash can take back. Events of lazy commits are published at
/// once but reach the disk only with the next durable commit; a crash loses at
/// most one `running` event per job that was running (every durable commit
/// keeps all before it), and a site runs far fewer jobs at once than this.
const SEQ_GAP: u64 = 1 << 20;

/// What trimming needs of an event (an unreadable one has neither).
#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", default)]
struct Head {
    job: String,
    at_ms: u64,
}

fn head(bytes: &[u8]) -> Head {
    serde_json::from_slice(bytes).unwrap_or_default()
}

/// Creates the tables; a database from before the index gets it built here,
/// once, from the events it holds. Returns the lowest sequence number this run
/// may use: [`SEQ_GAP`] past both the last event on disk and the previous run's
/// floor, and recorded (the caller commits durably), so that no sequence number
/// a subscriber may have seen before a crash is given to another event after it.
pub(super) fn open_tables(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let events = txn.open_table(EVENTS).map_err(storage)?;
    let mut by_job = txn.open_table(BY_JOB).map_err(storage)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    let last = events
        .last()
        .map_err(storage)?
        .map(|(k, _)| k.value())
        .unwrap_or(0);
    let before = meta
        .get(FLOOR)
        .map_err(storage)?
        .map(|v| v.value().to_string());
    let before =
        crate::store_core::sequence_floor(FLOOR, before.as_deref()).map_err(StoreError::Storage)?;
    let floor = last.max(before).checked_add(SEQ_GAP).ok_or_else(|| {
        StoreError::Storage(format!(
            "meta '{FLOOR}' or the last event is {}: no sequence number is left above it",
            last.max(before)
        ))
    })?;
    meta.insert(FLOOR, floor.to_string().as_str())
        .map_err(storage)?;
    if meta.get(BUILT).map_err(storage)?.is_some() {
        return Ok(floor);
    }
    super::build_index(
        "the job events by job",
        events.len().map_err(storage)?,
        |progress| {
            let mut n = 0u64;
            for row in events.range::<u64>(..)? {
                let (k, v) = row?;
                progress.read_one();
                let h = head(v.value());
                if !h.job.is_empty() {
                    by_job.insert((h.job.as_str(), k.value()), ())?;
                    n += 1;
                }
            }
            Ok::<_, redb::Error>(n)
        },
    )
    .map_err(storage)?;
    meta.insert(BUILT, "1").map_err(storage)?;
    Ok(floor)
}

/// Removes the events `gone` names from both tables.
fn remove(txn: &WriteTransaction, gone: &[(u64, String)]) -> Result<(), StoreError> {
    let mut events = txn.open_table(EVENTS).map_err(storage)?;
    let mut by_job = txn.open_table(BY_JOB).map_err(storage)?;
    for (seq, job) in gone {
        events.remove(*seq).map_err(storage)?;
        if !job.is_empty() {
            by_job.remove((job.as_str(), *seq)).map_err(storage)?;
        }
    }
    Ok(())
}

/// Removes every event of job `id` (read through the index); returns how many.
pub(super) fn remove_of_job(txn: &WriteTransaction, id: &str) -> Result<usize, StoreError> {
    let gone: Vec<(u64, String)> = {
        let by_job = txn.open_table(BY_JOB).map_err(storage)?;
        let mut gone = Vec::new();
        for row in by_job.range((id, 0)..=(id, u64::MAX)).map_err(storage)? {
            let (k, _) = row.map_err(storage)?;
            gone.push((k.value().1, id.to_string()));
        }
        gone
    };
    remove(txn, &gone)?;
    Ok(gone.len())
}

/// The oldest events, up to `limit`, before the first for which `stop` says true.
fn oldest(
    txn: &WriteTransaction,
    limit: usize,
    stop: impl Fn(u64, &Head) -> bool,
) -> Result<Vec<(u64, String)>, StoreError> {
    let events = txn.open_table(EVENTS).map_err(storage)?;
    let mut out = Vec::new();
    for row in events.range::<u64>(..).map_err(storage)? {
        let (k, v) = row.map_err(storage)?;
        let h = head(v.value());
        if out.len() >= limit || stop(k.value(), &h) {
            break;
        }
        out.push((k.value(), h.job));
    }
    Ok(out)
}

impl Txn<'_> {
    /// Appends a job event (published once the transaction commits).
    pub fn event(&mut self, job: &Job, message: &str) -> Result<(), StoreError> {
        let seq = {
            let mut t = self.txn.open_table(EVENTS).map_err(storage)?;
            let seq = t
                .last()
                .map_err(storage)?
                .map_or(1, |(k, _)| k.value() + 1)
                .max(self.event_floor);
            let ev = JobEvent {
                seq,
                job: job.id.clone(),
                owner: job.owner.clone(),
                state: job.state,
                message: message.to_string(),
                at_ms: now_ms(),
            };
            t.insert(seq, encode(&ev)?.as_slice()).map_err(storage)?;
            self.txn
                .open_table(BY_JOB)
                .map_err(storage)?
                .insert((job.id.as_str(), seq), ())
                .map_err(storage)?;
            self.new_events.push(ev);
            seq
        };
        // Sequence numbers jump at each open: trim by count, not by number. A
        // bounded bite per round: a cap lowered far below what is held converges
        // over later rounds (and retention's) instead of stalling this writer.
        if seq % 1024 == 0 {
            self.trim_events_over_max(4 * 1024)?;
        }
        Ok(())
    }

    /// Removes up to `limit` of the oldest job events beyond `max-job-events`;
    /// returns how many went.
    pub fn trim_events_over_max(&mut self, limit: usize) -> Result<usize, StoreError> {
        let held = self
            .txn
            .open_table(EVENTS)
            .map_err(storage)?
            .len()
            .map_err(storage)?;
        if held <= self.max_events {
            return Ok(0);
        }
        let surplus = usize::try_from(held - self.max_events).unwrap_or(usize::MAX);
        let gone = oldest(self.txn, surplus.min(limit), |_, _| false)?;
        remove(self.txn, &gone)?;
        Ok(gone.len())
    }

    /// Removes up to `limit` of the oldest job events from before `before_ms`.
    pub fn trim_events(&mut self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        // An unreadable event has no time: it goes with its older neighbours.
        let gone = oldest(self.txn, limit, |_, h| h.at_ms >= before_ms)?;
        remove(self.txn, &gone)?;
        Ok(gone.len())
    }
}

impl Store {
    /// Job events after `after`, at most `limit`, optionally of one job (then
    /// read through the index: only that job's events are touched).
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
        job: Option<&str>,
    ) -> Result<Vec<JobEvent>, StoreError> {
        self.read(|r| {
            let t = r.open_table(EVENTS).map_err(storage)?;
            let event = |seq: u64| -> Result<Option<JobEvent>, StoreError> {
                match t.get(seq).map_err(storage)? {
                    Some(v) => Ok(Some(decode(&seq.to_string(), v.value())?)),
                    None => Ok(None),
                }
            };
            let mut out = Vec::new();
            if after == u64::MAX {
                return Ok(out);
            }
            let Some(job) = job else {
                for row in t.range(after + 1..).map_err(storage)? {
                    let (k, v) = row.map_err(storage)?;
                    out.push(decode(&k.value().to_string(), v.value())?);
                    if out.len() >= limit {
                        break;
                    }
                }
                return Ok(out);
            };
            let index = r.open_table(BY_JOB).map_err(storage)?;
            let from = (job, after + 1);
            for row in index.range(from..=(job, u64::MAX)).map_err(storage)? {
                let (k, _) = row.map_err(storage)?;
                if let Some(ev) = event(k.value().1)? {
                    out.push(ev);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
    }

    /// How many entries the by-job index holds (for tests of its upkeep).
    pub fn event_index_len(&self) -> Result<u64, StoreError> {
        self.read(|r| {
            r.open_table(BY_JOB)
                .map_err(storage)?
                .len()
                .map_err(storage)
        })
    }
}
