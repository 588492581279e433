//! What the site's store and the agent's registry share beyond redb itself: a
//! database whose writes publish their events only once committed
//! ([`Published`]), sequence tables (events, audit) trimmed by age, and retention
//! run in bounded batches, one transaction each, so a large backlog never holds
//! the writer long; a write that holds the database over a second is logged
//! with where it was made.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use serde::Deserialize;
use tokio::sync::broadcast;

/// The cache each service's database keeps in memory unless configured
/// (`database-cache-mib`), MiB: redb's own default (1 GiB) would let a site's
/// resident memory grow with its history up to that.
pub const DEFAULT_CACHE_MIB: u64 = 256;

/// The most `database-cache-mib` may ask, MiB.
pub const MAX_CACHE_MIB: u64 = 64 * 1024;

/// What a cached page holds resident for each byte it caches, as a fraction:
/// redb keeps each 4,096-byte page in a block of its own behind an `Arc`'s
/// 16-byte counts, which mimalloc (the `gve` binary's allocator) serves from its
/// 5,120-byte class. Told four fifths, a site at a million VMs rested at 354-358 MiB
/// after each stage instead of 446-465 (`bench/results/million.md`, run 11). Under
/// glibc (tests, other users of the library) the cache simply holds a fifth less.
const RESIDENT_PER_CACHED: (u64, u64) = (5, 4);

/// Opens (or creates) the redb database at `path` with a cache that holds about
/// `cache_mib` resident once full (redb is told four fifths of it,
/// [`RESIDENT_PER_CACHED`]).
pub fn open_database(
    path: &std::path::Path,
    cache_mib: u64,
) -> Result<Database, redb::DatabaseError> {
    let (resident, cached) = RESIDENT_PER_CACHED;
    let bytes = cache_mib.min(MAX_CACHE_MIB).saturating_mul(1 << 20) / resident * cached;
    redb::Builder::new()
        .set_cache_size(usize::try_from(bytes).unwrap_or(usize::MAX))
        .create(path)
}

/// A redb database and the channel its committed writes publish events on.
/// Cheap to clone.
pub struct Published<Ev> {
    db: Arc<Held>,
    events: broadcast::Sender<Ev>,
    /// Set when the service stops: [`Published::in_batches`] ends after its batch.
    stopping: Arc<AtomicBool>,
}

/// The database and a sender dropped after it (fields drop in order), so a
/// [`CloseWatch`] hears of the close once the file is closed, not when the last
/// holder lets go (redb's own drop still writes before it unlocks the file).
struct Held {
    db: Database,
    closed: tokio::sync::watch::Sender<()>,
}

impl<Ev> Clone for Published<Ev> {
    fn clone(&self) -> Self {
        Published {
            db: self.db.clone(),
            events: self.events.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

/// How long a stopping service waits for its database to be closed.
pub const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells when every holder of a database has let go of it and the file is
/// closed (another open, in this process or another, will succeed).
pub struct CloseWatch(tokio::sync::watch::Receiver<()>);

impl CloseWatch {
    /// Waits until the database is closed, at most `limit`; false if it is still open.
    pub async fn closed(mut self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, async { while self.0.changed().await.is_ok() {} })
            .await
            .is_ok()
    }
}

impl<Ev> Published<Ev> {
    /// A watch on this database's closing.
    pub fn close_watch(&self) -> CloseWatch {
        CloseWatch(self.db.closed.subscribe())
    }
}

impl<Ev: Clone> Published<Ev> {
    /// `db`, publishing to subscribers that keep up within `backlog` events.
    pub fn new(db: Database, backlog: usize) -> Published<Ev> {
        Published {
            db: Arc::new(Held {
                db,
                closed: tokio::sync::watch::channel(()).0,
            }),
            events: broadcast::channel(backlog).0,
            stopping: Default::default(),
        }
    }

    /// Tells background removals ([`Published::in_batches`]) to end after the
    /// batch they are in: the service is stopping, and they hold the database.
    pub fn stop_background(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the service is stopping ([`Published::stop_background`]): long
    /// work in batches ends after the batch it is in.
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The database, for reads.
    pub fn db(&self) -> &Database {
        &self.db.db
    }

    /// Runs `f` in one write transaction committed with `durability`; the events
    /// `f` collected are published after the commit, never before, so no
    /// subscriber sees what a rollback or a failed commit undid. An `Err` from `f`
    /// rolls everything back; `storage` names redb's own failures.
    #[track_caller]
    pub fn write<T, E>(
        &self,
        durability: Durability,
        storage: fn(String) -> E,
        f: impl FnOnce(&WriteTransaction, &mut Vec<Ev>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.write_when(durability, storage, |txn, events| {
            f(txn, events).map(|v| (v, true))
        })
    }

    /// [`Published::write`] for a change that may find nothing to do: `None`
    /// from `f` rolls the transaction back instead of committing it (a durable
    /// commit of nothing still waits for the disk).
    #[track_caller]
    pub fn write_if<T, E>(
        &self,
        durability: Durability,
        storage: fn(String) -> E,
        f: impl FnOnce(&WriteTransaction, &mut Vec<Ev>) -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        self.write_when(durability, storage, |txn, events| {
            f(txn, events).map(|v| {
                let keep = v.is_some();
                (v, keep)
            })
        })
    }

    /// [`Published::write`] that hands the events back instead of publishing
    /// them: the caller publishes them ([`Published::publish`]) once the change
    /// is durable, when a later commit makes it so.
    #[track_caller]
    pub fn write_holding<T, E>(
        &self,
        durability: Durability,
        storage: fn(String) -> E,
        f: impl FnOnce(&WriteTransaction, &mut Vec<Ev>) -> Result<T, E>,
    ) -> Result<(T, Vec<Ev>), E> {
        self.commit_when(durability, storage, |txn, events| {
            let v = f(txn, events)?;
            Ok((v, true))
        })
    }

    /// Publishes events held back by [`Published::write_holding`].
    pub fn publish(&self, events: Vec<Ev>) {
        for ev in events {
            // No subscriber is not an error.
            let _ = self.events.send(ev);
        }
    }

    /// Runs `f`, which says whether its transaction is to be committed.
    #[track_caller]
    fn write_when<T, E>(
        &self,
        durability: Durability,
        storage: fn(String) -> E,
        f: impl FnOnce(&WriteTransaction, &mut Vec<Ev>) -> Result<(T, bool), E>,
    ) -> Result<T, E> {
        let (v, events) = self.commit_when(durability, storage, f)?;
        self.publish(events);
        Ok(v)
    }

    /// Runs `f`, which says whether its transaction is to be committed; its
    /// value, and the events of a committed transaction (none of an aborted one).
    #[track_caller]
    fn commit_when<T, E>(
        &self,
        durability: Durability,
        storage: fn(String) -> E,
        f: impl FnOnce(&WriteTransaction, &mut Vec<Ev>) -> Result<(T, bool), E>,
    ) -> Result<(T, Vec<Ev>), E> {
        let mut txn = self
            .db
            .db
            .begin_write()
            .map_err(|e| storage(e.to_string()))?;
        let held = WriteHeld {
            since: Instant::now(),
            at: std::panic::Location::caller(),
        };
        txn.set_durability(durability)
            .map_err(|e| storage(e.to_string()))?;
        let mut events = Vec::new();
        let (value, keep) = f(&txn, &mut events)?;
        if !keep {
            txn.abort().map_err(|e| storage(e.to_string()))?;
            return Ok((value, Vec::new()));
        }
        txn.commit().map_err(|e| storage(e.to_string()))?;
        drop(held);
        Ok((value, events))
    }

    /// Events committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Ev> {
        self.events.subscribe()
    }
}

/// A write transaction holding the database (redb has one writer at a time):
/// logged when dropped after [`SLOW_WRITE`] or more.
struct WriteHeld {
    since: Instant,
    at: &'static std::panic::Location<'static>,
}

/// How long a write may hold the database before it is logged.
const SLOW_WRITE: Duration = Duration::from_secs(1);

impl Drop for WriteHeld {
    fn drop(&mut self) {
        let held = self.since.elapsed();
        if held >= SLOW_WRITE {
            tracing::warn!(
                secs = format!("{:.1}", held.as_secs_f64()),
                at = %self.at,
                "a write held the database this long; every other write waited"
            );
        }
    }
}

/// Records removed per retention transaction: few, so that a writer waiting
/// for the database behind one waits milliseconds.
pub const BATCH: usize = 256;

/// One page of a listing and whether more follow it.
#[derive(Debug)]
pub struct Page<T> {
    /// The items, in the listing's order.
    pub items: Vec<T>,
    /// True when at least one more item follows the last.
    pub more: bool,
}

/// The time of a sequence record (every event and audit entry has one).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Stamp {
    at_ms: u64,
}

/// The services' table of named values (both name theirs `meta`).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The `meta` key holding the highest number retention removed from sequence
/// table `table`.
fn floor_key(table: &str) -> String {
    format!("seq-floor:{table}")
}

/// The next sequence number of table `def` (events, audit): one past its
/// newest record, or, in a table retention emptied, past the highest it
/// removed. Numbers never start from 1 again: a follower (`after=N`,
/// `Last-Event-ID`) would take new records for ones it has seen.
pub fn next_seq(txn: &WriteTransaction, def: TableDefinition<u64, &[u8]>) -> Result<u64, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let table = txn.open_table(def).map_err(|x| e(&x))?;
    if let Some((k, _)) = table.last().map_err(|x| e(&x))? {
        return Ok(k.value() + 1);
    }
    let meta = txn.open_table(META).map_err(|x| e(&x))?;
    let key = floor_key(def.name());
    let floor = meta.get(key.as_str()).map_err(|x| e(&x))?;
    let floor = sequence_floor(&key, floor.as_ref().map(|v| v.value()))?;
    floor
        .checked_add(1)
        .ok_or_else(|| format!("meta '{key}' is {floor}: no sequence number is left above it"))
}

/// A sequence floor kept in `meta` under `key` (0 when none is kept). A value
/// that is not a number is an error, never 0: numbering again from a guessed
/// floor would hand followers (`after=N`, `Last-Event-ID`) numbers they have
/// seen, so the service refuses the write (and refuses to open) instead.
pub fn sequence_floor(key: &str, value: Option<&str>) -> Result<u64, String> {
    match value {
        None => Ok(0),
        Some(v) => v.parse::<u64>().map_err(|_| {
            format!(
                "meta '{key}' holds {v:?}, not a sequence number: the database is damaged \
                 (restore it from a backup, or set the value past every number handed out)"
            )
        }),
    }
}

/// Removes up to `limit` of the oldest records of sequence table `def` whose
/// `at-ms` is before `before_ms`, stopping at the first newer one (sequence
/// order is time order); how many went. The highest number removed is kept in
/// `meta`, so an emptied table numbers on ([`next_seq`]); it is always above
/// the one kept before, since every record left was numbered past it.
pub fn trim_older(
    txn: &WriteTransaction,
    def: TableDefinition<u64, &[u8]>,
    before_ms: u64,
    limit: usize,
) -> Result<usize, String> {
    let mut table = txn.open_table(def).map_err(|e| e.to_string())?;
    let mut last = None;
    let mut n = 0;
    for row in table.range::<u64>(..).map_err(|e| e.to_string())? {
        let (k, v) = row.map_err(|e| e.to_string())?;
        // A record that cannot be read has no time: it goes with its older neighbours.
        let at = serde_json::from_slice::<Stamp>(v.value()).map_or(0, |s| s.at_ms);
        if at >= before_ms || n >= limit {
            break;
        }
        last = Some(k.value());
        n += 1;
    }
    if let Some(last) = last {
        table
            .retain_in(..=last, |_, _| false)
            .map_err(|e| e.to_string())?;
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        meta.insert(floor_key(def.name()).as_str(), last.to_string().as_str())
            .map_err(|e| e.to_string())?;
    }
    Ok(n)
}

impl<Ev> Published<Ev> {
    /// Runs `batch(BATCH)` until it removes fewer than a batch, fails (logged,
    /// naming `what`) or the service stops ([`Published::stop_background`]);
    /// how many went in all. After each full batch it leaves the database to
    /// other writers as long as the batch took (its wait for the lock
    /// included): removing millions takes at most about half of the writes'
    /// time. Back to back, with 1,024 a batch, a site's submissions nearly
    /// stopped while it removed 926,000 jobs (256 of ~14,000 got through,
    /// `bench/million.rs` run 5); with the pause they kept their pace.
    pub fn in_batches<E: std::fmt::Display>(
        &self,
        what: &str,
        mut batch: impl FnMut(usize) -> Result<usize, E>,
    ) -> usize {
        let mut total = 0;
        // A pass that starts, or wakes from its pause, after the stop does nothing more.
        while !self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            let t = Instant::now();
            match batch(BATCH) {
                Ok(n) => {
                    if total == 0 && n == BATCH {
                        // Its start, timestamped: more batches follow.
                        tracing::info!("removing {what} past their retention");
                    }
                    total += n;
                    if n < BATCH || self.stopping.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    std::thread::sleep(t.elapsed().max(Duration::from_micros(100)));
                }
                Err(e) => {
                    tracing::error!("removing {what} past their retention: {e}");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(removed = total, "{what} past their retention removed");
        }
        total
    }
}
