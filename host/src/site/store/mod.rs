//! The site's database in redb (`site.redb`, the paper's User Information Database):
//! users and their tokens, quotas and usage, agents, VMs, jobs and job events. Every
//! change is one durable transaction, so a job's new state, the usage it moves and
//! the event reporting it commit together or not at all.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::broadcast;

mod active;
mod building;
mod directory;
mod drift;
mod events;
mod finished;
mod releases;
mod vms;

use building::build_index;
pub use events::MAX_EVENTS;
pub use releases::OwedRelease;
pub use vms::{Page, Tally};

use super::model::{now_ms, AgentRec, AuditEntry, Job, JobEvent, SiteVm, Usage, User};

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// Token SHA-256 → user name.
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// "owner\0job id" → (): a user's jobs in submission order.
const USER_JOBS: TableDefinition<&str, ()> = TableDefinition::new("user_jobs");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Sequence number → audit entry.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or created.
    #[error("site database {path}: {message}")]
    Open {
        /// File.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// A read, write or commit failed.
    #[error("site database: {0}")]
    Storage(String),
    /// Usage arithmetic would leave its range (a bookkeeping error, refused).
    #[error("site database: usage: {0}")]
    Usage(String),
    /// A VM record names an agent that is not registered (unregistered while a
    /// job worked on the VM): no VM record outlives its agent.
    #[error("VM {vm}: agent '{agent}' is not registered (it was unregistered while a job worked on the VM)")]
    NoAgent {
        /// Site VM id.
        vm: String,
        /// The missing agent.
        agent: String,
    },
    /// A stored value could not be decoded.
    #[error("site database: record '{key}' is unreadable: {message}")]
    Corrupt {
        /// Key.
        key: String,
        /// Cause.
        message: String,
    },
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(storage)
}

fn get<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let v = t.get(key).map_err(storage)?;
    v.map(|v| decode(key, v.value())).transpose()
}

fn all<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for row in t.range::<&str>(..).map_err(storage)? {
        let (k, v) = row.map_err(storage)?;
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

/// The site database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: crate::store_core::Published<JobEvent>,
    vm_writes: std::sync::Arc<VmWrites>,
    /// The lowest sequence number this run may give a job event
    /// ([`events::open_tables`]).
    event_floor: u64,
    /// Job events kept at most; older ones are trimmed.
    max_events: u64,
}

/// Per agent, how many writes of its VM records this process has made (a VM
/// moving between agents counts for both): the health check's listing tags
/// hold only while no write came after the listing was applied.
type VmWrites = std::sync::Mutex<std::collections::HashMap<String, u64>>;

/// One write transaction.
pub struct Txn<'a> {
    txn: &'a redb::WriteTransaction,
    new_events: Vec<JobEvent>,
    vm_writes: &'a VmWrites,
    event_floor: u64,
    max_events: u64,
}

macro_rules! json_table {
    ($get:ident, $put:ident, $remove:ident, $all:ident, $table:ident, $ty:ty, $key:ident) => {
        /// One record by key.
        pub fn $get(&self, key: &str) -> Result<Option<$ty>, StoreError> {
            get(&self.txn.open_table($table).map_err(storage)?, key)
        }
        /// Inserts or replaces a record.
        pub fn $put(&mut self, v: &$ty) -> Result<(), StoreError> {
            let mut t = self.txn.open_table($table).map_err(storage)?;
            t.insert(v.$key.as_str(), encode(v)?.as_slice())
                .map_err(storage)?;
            Ok(())
        }
        /// Removes a record.
        pub fn $remove(&mut self, key: &str) -> Result<(), StoreError> {
            let mut t = self.txn.open_table($table).map_err(storage)?;
            t.remove(key).map_err(storage)?;
            Ok(())
        }
        /// Every record.
        pub fn $all(&self) -> Result<Vec<$ty>, StoreError> {
            all(&self.txn.open_table($table).map_err(storage)?)
        }
    };
}

impl Txn<'_> {
    json_table!(
        user,
        put_user_record,
        remove_user_record,
        users,
        USERS,
        User,
        name
    );
    json_table!(agent, put_agent, remove_agent, agents, AGENTS, AgentRec, id);
    json_table!(vm, put_vm_record, remove_vm_record, vms, VMS, SiteVm, id);
    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        get(&self.txn.open_table(JOBS).map_err(storage)?, id)
    }

    /// Inserts or replaces a user and its token index.
    pub fn put_user(&mut self, u: &User) -> Result<(), StoreError> {
        if let Some(old) = self.user(&u.name)? {
            let mut t = self.txn.open_table(TOKENS).map_err(storage)?;
            t.remove(old.token_sha256.as_str()).map_err(storage)?;
        }
        self.put_user_record(u)?;
        let mut t = self.txn.open_table(TOKENS).map_err(storage)?;
        t.insert(u.token_sha256.as_str(), u.name.as_str())
            .map_err(storage)?;
        Ok(())
    }

    /// Removes a user and its token.
    pub fn remove_user(&mut self, name: &str) -> Result<(), StoreError> {
        if let Some(old) = self.user(name)? {
            let mut t = self.txn.open_table(TOKENS).map_err(storage)?;
            t.remove(old.token_sha256.as_str()).map_err(storage)?;
        }
        self.remove_user_record(name)?;
        let mut t = self.txn.open_table(USAGE).map_err(storage)?;
        t.remove(name).map_err(storage)?;
        Ok(())
    }

    /// What `user` holds and has reserved.
    pub fn usage(&self, user: &str) -> Result<Usage, StoreError> {
        Ok(get(&self.txn.open_table(USAGE).map_err(storage)?, user)?.unwrap_or_default())
    }

    /// Sets what `user` holds and has reserved.
    pub fn set_usage(&mut self, user: &str, u: Usage) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(USAGE).map_err(storage)?;
        t.insert(user, encode(&u)?.as_slice()).map_err(storage)?;
        Ok(())
    }

    /// Moves `user`'s usage by `take` down and `add` up, checked: an overflow
    /// fails the transaction ([`StoreError::Usage`]) and nothing wraps. Taking
    /// more than is held means the books are wrong: also an error, so it is seen.
    pub fn move_usage(&mut self, user: &str, take: Usage, add: Usage) -> Result<Usage, StoreError> {
        let was = self.usage(user)?;
        let now = was
            .minus(take)
            .ok_or_else(|| {
                StoreError::Usage(format!(
                    "user '{user}' holds {was:?}, less than the {take:?} given back"
                ))
            })?
            .plus(add)
            .ok_or_else(|| StoreError::Usage(format!("usage of user '{user}' would overflow")))?;
        self.set_usage(user, now)?;
        Ok(now)
    }

    /// Inserts or replaces a job, keeping the active and per-user indexes, and
    /// appends an event with `message` when given.
    pub fn put_job(&mut self, job: &Job, message: Option<&str>) -> Result<(), StoreError> {
        let was = self.active_facts(&job.id)?;
        // New or not is what the insert replaced: no read (and decode) first;
        // only a finished job written again (it has no active facts) has its
        // old end read, whatever it becomes.
        let (new, ended_before) = {
            let mut t = self.txn.open_table(JOBS).map_err(storage)?;
            let old = t
                .insert(job.id.as_str(), encode(job)?.as_slice())
                .map_err(storage)?;
            match old {
                None => (true, None),
                Some(o) if was.is_none() => (false, finished::end_of(o.value())),
                Some(_) => (false, None),
            }
        };
        self.track_active(job, was.as_deref())?;
        finished::track(self.txn, job, ended_before)?;
        if new {
            let mut by_user = self.txn.open_table(USER_JOBS).map_err(storage)?;
            by_user
                .insert(format!("{}\0{}", job.owner, job.id).as_str(), ())
                .map_err(storage)?;
        }
        if let Some(m) = message {
            self.event(job, m)?;
        }
        Ok(())
    }

    /// Removes up to `limit` of the oldest audit entries from before `before_ms`.
    pub fn trim_audit(&mut self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        crate::store_core::trim_older(self.txn, AUDIT, before_ms, limit)
            .map_err(StoreError::Storage)
    }

    /// Appends an audit entry (its sequence number and time are set here).
    pub fn audit(&mut self, mut entry: AuditEntry) -> Result<(), StoreError> {
        entry.seq = crate::store_core::next_seq(self.txn, AUDIT).map_err(StoreError::Storage)?;
        let mut t = self.txn.open_table(AUDIT).map_err(storage)?;
        entry.at_ms = now_ms();
        t.insert(entry.seq, encode(&entry)?.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// A site-wide value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let t = self.txn.open_table(META).map_err(storage)?;
        let v = t.get(key).map_err(storage)?;
        Ok(v.map(|v| v.value().to_string()))
    }

    /// Sets a site-wide value.
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(META).map_err(storage)?;
        t.insert(key, value).map_err(storage)?;
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) the database at `path` with the default cache.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_cache(path, crate::store_core::DEFAULT_CACHE_MIB)
    }

    /// Opens (or creates) the database at `path`, its cache holding about `cache_mib`
    /// resident once full ([`crate::store_core::open_database`]).
    pub fn open_with_cache(path: &Path, cache_mib: u64) -> Result<Store, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            crate::private_fs::private_dir(dir).map_err(|e| err(&e))?;
        }
        let db = crate::store_core::open_database(path, cache_mib).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        let event_floor;
        {
            txn.open_table(USERS).map_err(|e| err(&e))?;
            txn.open_table(TOKENS).map_err(|e| err(&e))?;
            txn.open_table(USAGE).map_err(|e| err(&e))?;
            txn.open_table(AGENTS).map_err(|e| err(&e))?;
            txn.open_table(releases::RELEASES).map_err(|e| err(&e))?;
            txn.open_table(VMS).map_err(|e| err(&e))?;
            txn.open_table(JOBS).map_err(|e| err(&e))?;
            drift::drop_if_drifted(&txn).map_err(|e| err(&e))?;
            active::open_tables(&txn).map_err(|e| err(&e))?;
            finished::open_tables(&txn).map_err(|e| err(&e))?;
            txn.open_table(USER_JOBS).map_err(|e| err(&e))?;
            event_floor = events::open_tables(&txn).map_err(|e| err(&e))?;
            drift::record(&txn).map_err(|e| err(&e))?;
            vms::open_tables(&txn).map_err(|e| err(&e))?;
            txn.open_table(AUDIT).map_err(|e| err(&e))?;
            // A damaged audit floor refuses the open, not the first audited write.
            crate::store_core::next_seq(&txn, AUDIT).map_err(|e| err(&e))?;
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            if meta.get("schema").map_err(|e| err(&e))?.is_none() {
                meta.insert("schema", "1").map_err(|e| err(&e))?;
            }
        }
        let t = std::time::Instant::now();
        txn.commit().map_err(|e| err(&e))?;
        // An index built on this open is written here: at tens of millions of
        // records, a minute or more after its build said it was done.
        if t.elapsed() >= std::time::Duration::from_secs(1) {
            tracing::info!(
                secs = format!("{:.1}", t.elapsed().as_secs_f64()),
                "the database's open written to the disk (its indexes built)"
            );
        }
        Ok(Store {
            db: crate::store_core::Published::new(db, 4096),
            vm_writes: Default::default(),
            event_floor,
            max_events: MAX_EVENTS,
        })
    }

    /// This store keeping at most `n` job events (the oldest trimmed first);
    /// [`MAX_EVENTS`] unless set.
    pub fn with_max_events(mut self, n: u64) -> Store {
        self.max_events = n;
        self
    }

    /// How many writes of agent `agent`'s VM records this process has made.
    pub fn vm_writes(&self, agent: &str) -> u64 {
        let w = self.vm_writes.lock().unwrap_or_else(|p| p.into_inner());
        w.get(agent).copied().unwrap_or(0)
    }

    /// Runs `f` in one write transaction and commits it durably; its events are
    /// published after the commit. An `Err` from `f` rolls everything back.
    #[track_caller]
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.commit(redb::Durability::Immediate, f)
    }

    /// Runs retention's `batch` until done ([`crate::store_core::Published::in_batches`]).
    pub fn in_batches<E: std::fmt::Display>(
        &self,
        what: &str,
        batch: impl FnMut(usize) -> Result<usize, E>,
    ) -> usize {
        self.db.in_batches(what, batch)
    }

    /// Tells a running retention pass to end after its batch (the site stops).
    pub fn stop_background(&self) {
        self.db.stop_background();
    }

    /// Whether the site is stopping: work in batches ends after its batch.
    pub fn stopping(&self) -> bool {
        self.db.stopping()
    }

    /// [`Store::write`] without waiting for the disk: the change is atomic and seen at
    /// once, and reaches the disk with the next durable commit. Only for changes a
    /// crash may undo safely, ones a restarted site derives again: the agents'
    /// health (a job's `running` goes lazily through the writer's batches,
    /// [`super::jobs::Submitter::run`]). Never a job's end: that goes through the
    /// group-committed [`super::jobs::Submitter::apply`].
    #[track_caller]
    pub fn write_lazy<T>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.commit(redb::Durability::None, f)
    }

    /// [`Store::write`] for a change that may find nothing to do: `None` from
    /// `f` rolls back instead of committing (no wait for the disk).
    #[track_caller]
    pub fn write_if<T>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<Option<T>, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.db.write_if(
            redb::Durability::Immediate,
            StoreError::Storage,
            |txn, events| self.within(txn, events, f),
        )
    }

    /// [`Store::write`] when `durable`, else [`Store::write_lazy`].
    #[track_caller]
    pub fn commit_to<T>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (value, events) = self.commit_holding(durable, f)?;
        self.publish(events);
        Ok(value)
    }

    /// [`Store::commit_to`] that hands back the events instead of publishing
    /// them, for [`Store::publish`] once the change is durable.
    #[track_caller]
    pub fn commit_holding<T>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, StoreError>,
    ) -> Result<(T, Vec<JobEvent>), StoreError> {
        let durability = match durable {
            true => redb::Durability::Immediate,
            false => redb::Durability::None,
        };
        self.db
            .write_holding(durability, StoreError::Storage, |txn, events| {
                self.within(txn, events, f)
            })
    }

    /// Publishes events [`Store::commit_holding`] held back.
    pub fn publish(&self, events: Vec<JobEvent>) {
        self.db.publish(events);
    }

    #[track_caller]
    fn commit<T>(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.db
            .write(durability, StoreError::Storage, |txn, events| {
                self.within(txn, events, f)
            })
    }

    /// Runs `f` on `txn`, handing the events it recorded to `events`.
    fn within<T>(
        &self,
        txn: &redb::WriteTransaction,
        events: &mut Vec<JobEvent>,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut t = Txn {
            txn,
            new_events: Vec::new(),
            vm_writes: &self.vm_writes,
            event_floor: self.event_floor,
            max_events: self.max_events,
        };
        let v = f(&mut t)?;
        *events = t.new_events;
        Ok(v)
    }

    /// A watch on the database's closing.
    pub fn close_watch(&self) -> crate::store_core::CloseWatch {
        self.db.close_watch()
    }

    /// Subscribes to job events committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.db.subscribe()
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.db().begin_read().map_err(storage)?;
        f(&txn)
    }

    /// The user a token hash belongs to.
    pub fn user_by_token(&self, sha256: &str) -> Result<Option<User>, StoreError> {
        self.read(|r| {
            let names = r.open_table(TOKENS).map_err(storage)?;
            let Some(name) = names.get(sha256).map_err(storage)? else {
                return Ok(None);
            };
            let name = name.value().to_string();
            get(&r.open_table(USERS).map_err(storage)?, &name)
        })
    }

    /// One user.
    pub fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.read(|r| get(&r.open_table(USERS).map_err(storage)?, name))
    }

    /// Every user.
    pub fn users(&self) -> Result<Vec<User>, StoreError> {
        self.read(|r| all(&r.open_table(USERS).map_err(storage)?))
    }

    /// What a user holds and has reserved.
    pub fn usage(&self, user: &str) -> Result<Usage, StoreError> {
        self.read(|r| Ok(get(&r.open_table(USAGE).map_err(storage)?, user)?.unwrap_or_default()))
    }

    /// One agent.
    pub fn agent(&self, id: &str) -> Result<Option<AgentRec>, StoreError> {
        self.read(|r| get(&r.open_table(AGENTS).map_err(storage)?, id))
    }

    /// Whether agent id `id` is registered.
    pub fn holds_agent(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.agent(id)?.is_some())
    }

    /// Every agent.
    pub fn agents(&self) -> Result<Vec<AgentRec>, StoreError> {
        self.read(|r| all(&r.open_table(AGENTS).map_err(storage)?))
    }

    /// One VM.
    pub fn vm(&self, id: &str) -> Result<Option<SiteVm>, StoreError> {
        self.read(|r| get(&r.open_table(VMS).map_err(storage)?, id))
    }

    /// Every VM.
    pub fn vms(&self) -> Result<Vec<SiteVm>, StoreError> {
        self.read(|r| all(&r.open_table(VMS).map_err(storage)?))
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.read(|r| get(&r.open_table(JOBS).map_err(storage)?, id))
    }

    /// Jobs of `owner` (every job for `None`), newest first, at most `limit`,
    /// older than job `before` when given (job ids start with their submission
    /// time: id order is time order). Reads one page's worth, whatever the history.
    pub fn jobs(
        &self,
        owner: Option<&str>,
        limit: usize,
        before: Option<&str>,
    ) -> Result<Page<Job>, StoreError> {
        self.read(|r| {
            let jobs = r.open_table(JOBS).map_err(storage)?;
            let mut items = Vec::new();
            let mut more = false;
            let Some(owner) = owner else {
                let rows = match before {
                    Some(b) => jobs.range::<&str>(..b),
                    None => jobs.range::<&str>(..),
                };
                for row in rows.map_err(storage)?.rev() {
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    let (k, v) = row.map_err(storage)?;
                    items.push(decode(k.value(), v.value())?);
                }
                return Ok(Page { items, more });
            };
            let index = r.open_table(USER_JOBS).map_err(storage)?;
            let lo = format!("{owner}\0");
            let hi = match before {
                Some(b) => format!("{owner}\0{b}"),
                None => format!("{owner}\u{1}"),
            };
            for row in index
                .range(lo.as_str()..hi.as_str())
                .map_err(storage)?
                .rev()
            {
                let (k, _) = row.map_err(storage)?;
                let id = k.value().split('\0').nth(1).unwrap_or_default().to_string();
                if let Some(j) = get(&jobs, &id)? {
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(j);
                }
            }
            Ok(Page { items, more })
        })
    }

    /// How many jobs exist.
    pub fn job_count(&self) -> Result<u64, StoreError> {
        self.read(|r| r.open_table(JOBS).map_err(storage)?.len().map_err(storage))
    }

    /// Audit entries after `after`, oldest first, at most `limit`.
    pub fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(|r| {
            let t = r.open_table(AUDIT).map_err(storage)?;
            let mut out = Vec::new();
            for row in t
                .range(after.saturating_add(1)..)
                .map_err(storage)?
                .take(limit)
            {
                let (k, v) = row.map_err(storage)?;
                out.push(decode(&k.value().to_string(), v.value())?);
            }
            Ok(out)
        })
    }

    /// A site-wide value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read(|r| {
            let t = r.open_table(META).map_err(storage)?;
            let v = t.get(key).map_err(storage)?;
            Ok(v.map(|v| v.value().to_string()))
        })
    }
}
