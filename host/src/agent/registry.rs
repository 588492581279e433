//! The agent's registry (the paper's Registry Database) in redb: VMs, templates,
//! operations and events. Every change that belongs together (a VM's new state, the
//! operation that caused it, the event that reports it) is one transaction, so a
//! kill -9 at any point leaves a database that opens and is consistent.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::store_core::Page;

use super::model::{now_ms, AuditEntry, Event, Operation, Vm, VmRecord};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("templates");
const OPS: TableDefinition<&str, &[u8]> = TableDefinition::new("operations");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Sequence number → audit entry.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Client idempotency keys → the operation they started.
const OP_KEYS: TableDefinition<&str, &str> = TableDefinition::new("operation_keys");
/// Meta key: `none` once no operation with an id from before ids were ordered
/// by time is left (so retention no longer scans for them).
const LEGACY_OPS: &str = "legacy-operations";
/// Meta key of the agent's instance id ([`Registry::instance`]).
const INSTANCE: &str = "instance";

/// Whether an operation id is ordered by time (`op-<12 hex digits of ms>-…`).
fn is_time_ordered(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() > 16
        && b.starts_with(b"op-")
        && b[3..15].iter().all(u8::is_ascii_hexdigit)
        && b[15] == b'-'
}

/// Operation → the idempotency key that started it (removed with it).
const KEY_OF_OP: TableDefinition<&str, &str> = TableDefinition::new("operation_key_of");
/// (VM name, VM id) → (): finding a VM by name reads its entry, not every record.
const NAMES: TableDefinition<(&str, &str), ()> = TableDefinition::new("vm_names");
/// Meta key saying [`NAMES`] was built (a registry from before it has none).
const NAMES_BUILT: &str = "index:vm-names";
/// Meta key: a random id made each time the registry is opened.
const REGISTRY_ID: &str = "registry-id";
/// Meta key: how many transactions have written or removed a VM record.
const VMS_GENERATION: &str = "vms-generation";

/// A VM record a write replaces, for its name entry; an unreadable one is
/// logged and replaced all the same (a lookup by name checks the record it finds).
fn readable(id: &str, bytes: &[u8]) -> Option<VmRecord> {
    decode::<VmRecord>(id, bytes)
        .map_err(|e| tracing::warn!(vm = id, "replacing an unreadable VM record: {e}"))
        .ok()
}

/// The id of the first VM (in id order) named `name`, by the name index.
fn id_by_name(
    names: &impl ReadableTable<(&'static str, &'static str), ()>,
    name: &str,
) -> Result<Option<String>, RegistryError> {
    let first = names.range((name, "")..).map_err(storage)?.next();
    match first {
        Some(row) => {
            let (k, _) = row.map_err(storage)?;
            let (n, id) = k.value();
            Ok((n == name).then(|| id.to_string()))
        }
        None => Ok(None),
    }
}

/// Events kept; older ones are trimmed.
const MAX_EVENTS: u64 = 100_000;

/// A registry failure.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The database file could not be opened or created.
    #[error("registry {path}: {message}")]
    Open {
        /// Database file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// A read or write failed.
    #[error("registry: {0}")]
    Storage(String),
    /// A stored record could not be decoded.
    #[error("registry: damaged record {key}: {message}")]
    Decode {
        /// Key of the record.
        key: String,
        /// Cause.
        message: String,
    },
}

fn storage(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Decode {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(value).map_err(storage)
}

/// The registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    db: crate::store_core::Published<Event>,
    /// Every VM record as of a VM tag ([`Registry::vms_snapshot`]).
    snapshot: Arc<Mutex<Option<Snapshot>>>,
    /// How far the audit trail is written, and how far it is durable.
    audit_mark: Arc<AuditMark>,
}

/// The audit trail's sequence numbers: the last one committed, and the last
/// one known durable. Readers see only durable entries: one written lazily
/// ([`Registry::audit_lazy`]) and lost in a crash before its sync must not have
/// been shown, since the next entry takes its number again.
#[derive(Default)]
struct AuditMark {
    written: std::sync::atomic::AtomicU64,
    durable: std::sync::atomic::AtomicU64,
}

/// Every VM record, and the VM tag they were read at.
type Snapshot = (String, Arc<Vec<VmRecord>>);

/// One write transaction over the registry.
pub struct Txn<'a> {
    txn: &'a WriteTransaction,
    new_events: Vec<Event>,
    /// Whether a VM record was written or removed (the VM generation moves on).
    vms_changed: bool,
}

impl Txn<'_> {
    /// Inserts or replaces a VM record.
    pub fn put_vm(&mut self, rec: &VmRecord) -> Result<(), RegistryError> {
        self.vms_changed = true;
        let mut t = self.txn.open_table(VMS).map_err(storage)?;
        let id = rec.vm.id.as_str();
        let old = t
            .insert(id, encode(rec)?.as_slice())
            .map_err(storage)?
            .and_then(|v| readable(id, v.value()));
        if old.as_ref().map(|o| o.vm.name.as_str()) != Some(rec.vm.name.as_str()) {
            let mut names = self.txn.open_table(NAMES).map_err(storage)?;
            if let Some(o) = &old {
                names.remove((o.vm.name.as_str(), id)).map_err(storage)?;
            }
            names
                .insert((rec.vm.name.as_str(), id), ())
                .map_err(storage)?;
        }
        Ok(())
    }

    /// Every VM record, as this transaction sees it.
    pub fn vms(&self) -> Result<Vec<VmRecord>, RegistryError> {
        let t = self.txn.open_table(VMS).map_err(storage)?;
        let mut out = Vec::new();
        for row in t.range::<&str>(..).map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// A VM record by id, or else by name, as this transaction sees it.
    pub fn vm(&self, id_or_name: &str) -> Result<Option<VmRecord>, RegistryError> {
        let by_id = {
            let t = self.txn.open_table(VMS).map_err(storage)?;
            let v = t.get(id_or_name).map_err(storage)?;
            v.map(|v| decode::<VmRecord>(id_or_name, v.value()))
                .transpose()?
        };
        if by_id.is_some() {
            return Ok(by_id);
        }
        let names = self.txn.open_table(NAMES).map_err(storage)?;
        match id_by_name(&names, id_or_name)? {
            Some(id) => {
                let t = self.txn.open_table(VMS).map_err(storage)?;
                let v = t.get(id.as_str()).map_err(storage)?;
                Ok(v.map(|v| decode::<VmRecord>(&id, v.value()))
                    .transpose()?
                    .filter(|r| r.vm.name == id_or_name))
            }
            None => Ok(None),
        }
    }

    /// Removes a VM record.
    pub fn remove_vm(&mut self, id: &str) -> Result<(), RegistryError> {
        self.vms_changed = true;
        let mut t = self.txn.open_table(VMS).map_err(storage)?;
        let old = t
            .remove(id)
            .map_err(storage)?
            .and_then(|v| readable(id, v.value()));
        if let Some(o) = old {
            let mut names = self.txn.open_table(NAMES).map_err(storage)?;
            names.remove((o.vm.name.as_str(), id)).map_err(storage)?;
        }
        Ok(())
    }

    /// Replaces the template list.
    pub fn set_templates(&mut self, templates: &[Vm]) -> Result<(), RegistryError> {
        let mut t = self.txn.open_table(TEMPLATES).map_err(storage)?;
        t.retain(|_, _| false).map_err(storage)?;
        for tpl in templates {
            t.insert(tpl.id.as_str(), encode(tpl)?.as_slice())
                .map_err(storage)?;
        }
        Ok(())
    }

    /// Moves the VM generation on by one (once per transaction that changed a VM).
    fn bump_vms_generation(&mut self) -> Result<(), RegistryError> {
        let mut t = self.txn.open_table(META).map_err(storage)?;
        let now = t
            .get(VMS_GENERATION)
            .map_err(storage)?
            .and_then(|v| v.value().parse::<u64>().ok())
            .unwrap_or(0);
        let next = now.wrapping_add(1).to_string();
        t.insert(VMS_GENERATION, next.as_str()).map_err(storage)?;
        Ok(())
    }

    /// Sets a registry-wide value (e.g. `site`).
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), RegistryError> {
        let mut t = self.txn.open_table(META).map_err(storage)?;
        t.insert(key, value).map_err(storage)?;
        Ok(())
    }

    /// A meta value, as this transaction sees it.
    pub fn meta(&self, key: &str) -> Result<Option<String>, RegistryError> {
        let t = self.txn.open_table(META).map_err(storage)?;
        let v = t.get(key).map_err(storage)?;
        Ok(v.map(|v| v.value().to_string()))
    }

    /// Removes a meta value (absent is fine).
    pub fn remove_meta(&mut self, key: &str) -> Result<(), RegistryError> {
        let mut t = self.txn.open_table(META).map_err(storage)?;
        t.remove(key).map_err(storage)?;
        Ok(())
    }

    /// The operation a client's idempotency key started, if any.
    pub fn op_for_key(&self, key: &str) -> Result<Option<Operation>, RegistryError> {
        let id = {
            let t = self.txn.open_table(OP_KEYS).map_err(storage)?;
            let v = t.get(key).map_err(storage)?;
            v.map(|v| v.value().to_string())
        };
        let Some(id) = id else { return Ok(None) };
        let t = self.txn.open_table(OPS).map_err(storage)?;
        let v = t.get(id.as_str()).map_err(storage)?;
        v.map(|v| decode(&id, v.value())).transpose()
    }

    /// Remembers that `key` started operation `op`.
    pub fn put_op_key(&mut self, key: &str, op: &str) -> Result<(), RegistryError> {
        let mut t = self.txn.open_table(OP_KEYS).map_err(storage)?;
        t.insert(key, op).map_err(storage)?;
        let mut t = self.txn.open_table(KEY_OF_OP).map_err(storage)?;
        t.insert(op, key).map_err(storage)?;
        Ok(())
    }

    /// Removes up to `limit` of the oldest records of sequence table `def` (events,
    /// audit) from before `before_ms`.
    pub fn trim(
        &mut self,
        def: TableDefinition<u64, &[u8]>,
        before_ms: u64,
        limit: usize,
    ) -> Result<usize, RegistryError> {
        crate::store_core::trim_older(self.txn, def, before_ms, limit)
            .map_err(RegistryError::Storage)
    }

    /// Removes up to `limit` finished operations that ended before `before_ms`,
    /// with their idempotency keys: those whose ids sort before that time
    /// (`op-<ms, 12 hex digits>-…`). Running operations are never removed.
    pub fn prune_ops(&mut self, before_ms: u64, limit: usize) -> Result<usize, RegistryError> {
        let bound = format!("op-{before_ms:012x}");
        let mut gone: Vec<String> = Vec::new();
        {
            let ops = self.txn.open_table(OPS).map_err(storage)?;
            for row in ops.range::<&str>(..bound.as_str()).map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                let op: Operation = decode(k.value(), v.value())?;
                if op.finished_ms.is_some_and(|f| f < before_ms) {
                    gone.push(op.id);
                    if gone.len() >= limit {
                        break;
                    }
                }
            }
        }
        self.remove_ops(&gone)?;
        Ok(gone.len())
    }

    /// Removes operations with the idempotency keys that started them.
    fn remove_ops(&mut self, ids: &[String]) -> Result<(), RegistryError> {
        let mut ops = self.txn.open_table(OPS).map_err(storage)?;
        let mut key_of = self.txn.open_table(KEY_OF_OP).map_err(storage)?;
        let mut keys = self.txn.open_table(OP_KEYS).map_err(storage)?;
        for id in ids {
            ops.remove(id.as_str()).map_err(storage)?;
            let key = key_of
                .remove(id.as_str())
                .map_err(storage)?
                .map(|k| k.value().to_string());
            if let Some(k) = key {
                keys.remove(k.as_str()).map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Removes up to `limit` finished operations with ids from before they were
    /// ordered by time (`op-<uuid>`) that ended before `before_ms`, with their
    /// keys, scanning the whole table (retention by range cannot find them); how
    /// many went, and whether any such operation is left.
    pub fn prune_legacy_ops(
        &mut self,
        before_ms: u64,
        limit: usize,
    ) -> Result<(usize, bool), RegistryError> {
        let mut gone: Vec<String> = Vec::new();
        let mut left = false;
        {
            let ops = self.txn.open_table(OPS).map_err(storage)?;
            for row in ops.range::<&str>(..).map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                if is_time_ordered(k.value()) {
                    continue;
                }
                let op: Operation = decode(k.value(), v.value())?;
                if gone.len() < limit && op.finished_ms.is_some_and(|f| f < before_ms) {
                    gone.push(op.id);
                } else {
                    left = true;
                }
            }
        }
        self.remove_ops(&gone)?;
        Ok((gone.len(), left))
    }

    /// Inserts or replaces an operation.
    pub fn put_op(&mut self, op: &Operation) -> Result<(), RegistryError> {
        let mut t = self.txn.open_table(OPS).map_err(storage)?;
        t.insert(op.id.as_str(), encode(op)?.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// Appends an event (published once the transaction commits).
    pub fn event(
        &mut self,
        kind: &str,
        vm: &str,
        detail: serde_json::Value,
    ) -> Result<(), RegistryError> {
        let seq = crate::store_core::next_seq(self.txn, EVENTS).map_err(RegistryError::Storage)?;
        let mut t = self.txn.open_table(EVENTS).map_err(storage)?;
        let ev = Event {
            seq,
            at_ms: now_ms(),
            kind: kind.to_string(),
            vm: vm.to_string(),
            detail,
        };
        t.insert(seq, encode(&ev)?.as_slice()).map_err(storage)?;
        if seq > MAX_EVENTS {
            let cut = seq - MAX_EVENTS;
            t.retain_in(..cut, |_, _| false).map_err(storage)?;
        }
        self.new_events.push(ev);
        Ok(())
    }
}

impl Registry {
    /// Opens (or creates) the registry at `path` with the default cache.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        Registry::open_with_cache(path, crate::store_core::DEFAULT_CACHE_MIB)
    }

    /// Opens (or creates) the registry at `path`, its cache holding about `cache_mib`
    /// resident once full ([`crate::store_core::open_database`]).
    pub fn open_with_cache(path: &Path, cache_mib: u64) -> Result<Registry, RegistryError> {
        let err = |e: &dyn std::fmt::Display| RegistryError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            crate::private_fs::private_dir(dir).map_err(|e| err(&e))?;
        }
        let db = crate::store_core::open_database(path, cache_mib).map_err(|e| err(&e))?;
        // Create every table so readers never meet a missing one.
        let txn = db.begin_write().map_err(|e| err(&e))?;
        {
            txn.open_table(VMS).map_err(|e| err(&e))?;
            txn.open_table(TEMPLATES).map_err(|e| err(&e))?;
            txn.open_table(OPS).map_err(|e| err(&e))?;
            txn.open_table(EVENTS).map_err(|e| err(&e))?;
            txn.open_table(OP_KEYS).map_err(|e| err(&e))?;
            txn.open_table(KEY_OF_OP).map_err(|e| err(&e))?;
            txn.open_table(AUDIT).map_err(|e| err(&e))?;
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            if meta.get("schema").map_err(|e| err(&e))?.is_none() {
                meta.insert("schema", "1").map_err(|e| err(&e))?;
            }
            // Tells this opening's VM generations from any other's: a database
            // replaced, restored from a backup or started afresh may count the
            // same generations again with other VMs.
            let id = uuid::Uuid::new_v4().simple().to_string();
            meta.insert(REGISTRY_ID, id.as_str()).map_err(|e| err(&e))?;
            let mut names = txn.open_table(NAMES).map_err(|e| err(&e))?;
            if meta.get(NAMES_BUILT).map_err(|e| err(&e))?.is_none() {
                let vms = txn.open_table(VMS).map_err(|e| err(&e))?;
                for row in vms.range::<&str>(..).map_err(|e| err(&e))? {
                    let (k, v) = row.map_err(|e| err(&e))?;
                    if let Ok(r) = serde_json::from_slice::<VmRecord>(v.value()) {
                        names
                            .insert((r.vm.name.as_str(), k.value()), ())
                            .map_err(|e| err(&e))?;
                    }
                }
                meta.insert(NAMES_BUILT, "1").map_err(|e| err(&e))?;
            }
        }
        // What the file holds after an opening is durable.
        // A damaged events floor refuses the open, not every write with an event.
        crate::store_core::next_seq(&txn, EVENTS).map_err(|e| err(&e))?;
        let last_audit = crate::store_core::next_seq(&txn, AUDIT).map_err(|e| err(&e))? - 1;
        txn.commit().map_err(|e| err(&e))?;
        Ok(Registry {
            db: crate::store_core::Published::new(db, 1024),
            snapshot: Default::default(),
            audit_mark: Arc::new(AuditMark {
                written: last_audit.into(),
                durable: last_audit.into(),
            }),
        })
    }

    /// Removes finished operations (and their idempotency keys) and events older
    /// than `keep_ms`, and audit entries older than `keep_audit_ms`, a batch per
    /// transaction; how many operations went.
    pub fn prune_finished_ops(&self, keep_ms: u64, keep_audit_ms: u64) -> usize {
        let before = now_ms().saturating_sub(keep_ms);
        let audit_before = now_ms().saturating_sub(keep_audit_ms);
        let mut ops = self
            .db
            .in_batches("operations", |n| self.write(|t| t.prune_ops(before, n)));
        // Operations from before ids were ordered by time, until none is left.
        if self.meta(LEGACY_OPS).ok().flatten().as_deref() != Some("none") {
            ops += self.db.in_batches("operations with unordered ids", |n| {
                self.write(|t| {
                    let (gone, left) = t.prune_legacy_ops(before, n)?;
                    if !left {
                        t.set_meta(LEGACY_OPS, "none")?;
                    }
                    Ok::<_, RegistryError>(gone)
                })
            });
        }
        self.db
            .in_batches("events", |n| self.write(|t| t.trim(EVENTS, before, n)));
        self.db.in_batches("audit entries", |n| {
            self.write(|t| t.trim(AUDIT, audit_before, n))
        });
        ops
    }

    /// Tells a running retention pass to end after its batch (the agent stops).
    pub fn stop_background(&self) {
        self.db.stop_background();
    }

    /// A watch on the registry's closing.
    pub fn close_watch(&self) -> crate::store_core::CloseWatch {
        self.db.close_watch()
    }

    /// Every minute, off the runtime's threads, removes what is past its
    /// retention (`keep` for operations and events, `keep_audit` for audit).
    pub fn spawn_retention(&self, keep_s: u64, keep_audit_s: u64) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let (keep_ms, audit_ms) = (
            keep_s.saturating_mul(1000),
            keep_audit_s.saturating_mul(1000),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                let r = me.clone();
                let _ =
                    tokio::task::spawn_blocking(move || r.prune_finished_ops(keep_ms, audit_ms))
                        .await;
            }
        })
    }

    /// Runs `f` in one write transaction and commits it durably; events it appended
    /// are published after the commit.
    #[track_caller]
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        self.write_with(redb::Durability::Immediate, f)
    }

    /// [`Registry::write`] without waiting for the disk: atomic and seen at once,
    /// durable with the next durable commit or [`Registry::sync`]. For a change the
    /// caller makes durable itself before anyone outside relies on it.
    #[track_caller]
    pub fn write_lazy<T>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        self.write_with(redb::Durability::None, f)
    }

    /// Makes every change committed so far durable (a durable commit of nothing).
    #[track_caller]
    pub fn sync(&self) -> Result<(), RegistryError> {
        self.write(|_| Ok(()))
    }

    #[track_caller]
    fn write_with<T>(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        // A durable commit keeps every commit before it, and this one begins
        // after the audit entries counted here were committed.
        let written = self.audit_mark.written.load(Ordering::Acquire);
        let v = self
            .db
            .write(durability, RegistryError::Storage, |txn, events| {
                let mut t = Txn {
                    txn,
                    new_events: Vec::new(),
                    vms_changed: false,
                };
                let v = f(&mut t)?;
                if t.vms_changed {
                    t.bump_vms_generation()?;
                }
                *events = t.new_events;
                Ok(v)
            })?;
        if matches!(durability, redb::Durability::Immediate) {
            self.audit_mark.durable.fetch_max(written, Ordering::AcqRel);
        }
        Ok(v)
    }

    /// Subscribes to events committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.db.subscribe()
    }

    /// Every record of `def`, in key order: the one page without a bound.
    fn all<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, RegistryError> {
        Ok(self.page(def, None, usize::MAX)?.items)
    }

    /// Up to `limit` records of `def` in key order, from the first key after
    /// `after` (a key that is gone meanwhile still places the page), and
    /// whether more follow.
    fn page<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<T>, RegistryError> {
        use std::ops::Bound;
        let txn = self.db.db().begin_read().map_err(storage)?;
        let t = txn.open_table(def).map_err(storage)?;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut rows = t.range::<&str>((from, Bound::Unbounded)).map_err(storage)?;
        let mut items = Vec::with_capacity(limit.min(1024));
        for row in rows.by_ref().take(limit) {
            let (k, v) = row.map_err(storage)?;
            items.push(decode(k.value(), v.value())?);
        }
        let more = rows.next().is_some();
        Ok(Page { items, more })
    }

    fn one<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, RegistryError> {
        let txn = self.db.db().begin_read().map_err(storage)?;
        let t = txn.open_table(def).map_err(storage)?;
        let v = t.get(key).map_err(storage)?;
        v.map(|v| decode(key, v.value())).transpose()
    }

    /// Every VM record.
    pub fn vms(&self) -> Result<Vec<VmRecord>, RegistryError> {
        self.all(VMS)
    }

    /// Every VM record, decoded again only when the VM tag moved since the
    /// last snapshot (an idle reconcile pass reads no record).
    pub fn vms_snapshot(&self) -> Result<Arc<Vec<VmRecord>>, RegistryError> {
        let txn = self.db.db().begin_read().map_err(storage)?;
        let tag = vms_tag_in(&txn)?;
        {
            let cached = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((t, vms)) = cached.as_ref() {
                if *t == tag {
                    return Ok(vms.clone());
                }
            }
        }
        let t = txn.open_table(VMS).map_err(storage)?;
        let mut out = Vec::new();
        for row in t.range::<&str>(..).map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            out.push(decode(k.value(), v.value())?);
        }
        let vms = Arc::new(out);
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some((tag, vms.clone()));
        Ok(vms)
    }

    /// A tag that changes whenever a VM record is written or removed: the
    /// registry's id and its VM generation (an HTTP entity tag, quoted).
    pub fn vms_tag(&self) -> Result<String, RegistryError> {
        let txn = self.db.db().begin_read().map_err(storage)?;
        vms_tag_in(&txn)
    }

    /// Up to `limit` VM records in id order after the id `after`.
    pub fn vms_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<VmRecord>, RegistryError> {
        self.page(VMS, after, limit)
    }

    /// A VM record by id, or else by name.
    pub fn vm(&self, id_or_name: &str) -> Result<Option<VmRecord>, RegistryError> {
        if let Some(r) = self.one::<VmRecord>(VMS, id_or_name)? {
            return Ok(Some(r));
        }
        // One snapshot: the name entry and the record it points to agree.
        let txn = self.db.db().begin_read().map_err(storage)?;
        let names = txn.open_table(NAMES).map_err(storage)?;
        let Some(id) = id_by_name(&names, id_or_name)? else {
            return Ok(None);
        };
        let t = txn.open_table(VMS).map_err(storage)?;
        let v = t.get(id.as_str()).map_err(storage)?;
        Ok(v.map(|v| decode::<VmRecord>(&id, v.value()))
            .transpose()?
            .filter(|r| r.vm.name == id_or_name))
    }

    /// The operation a client's idempotency key started, if any.
    pub fn op_by_key(&self, key: &str) -> Result<Option<Operation>, RegistryError> {
        let txn = self.db.db().begin_read().map_err(storage)?;
        let t = txn.open_table(OP_KEYS).map_err(storage)?;
        let id = t.get(key).map_err(storage)?.map(|v| v.value().to_string());
        match id {
            Some(id) => self.operation(&id),
            None => Ok(None),
        }
    }

    /// This agent's instance id, made at random by the first call and kept: how a
    /// site tells one agent from another, whatever URL reaches it.
    pub fn instance(&self) -> Result<String, RegistryError> {
        if let Some(id) = self.meta(INSTANCE)? {
            return Ok(id);
        }
        self.write(|t| match t.meta(INSTANCE)? {
            Some(id) => Ok(id),
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                t.set_meta(INSTANCE, &id)?;
                Ok(id)
            }
        })
    }

    /// A registry-wide value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, RegistryError> {
        let txn = self.db.db().begin_read().map_err(storage)?;
        let t = txn.open_table(META).map_err(storage)?;
        let v = t.get(key).map_err(storage)?;
        Ok(v.map(|v| v.value().to_string()))
    }

    /// Records that the agent's admin did `action` on `target`.
    #[track_caller]
    pub fn audit(
        &self,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<(), RegistryError> {
        self.audit_with(redb::Durability::Immediate, action, target, detail)
    }

    /// [`Registry::audit`] without waiting for the disk: the entry is durable
    /// with the next durable commit, which the caller makes before it answers
    /// (a request that starts an operation: its record's sync).
    #[track_caller]
    pub fn audit_lazy(
        &self,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<(), RegistryError> {
        self.audit_with(redb::Durability::None, action, target, detail)
    }

    #[track_caller]
    fn audit_with(
        &self,
        durability: redb::Durability,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<(), RegistryError> {
        let seq = self
            .db
            .write(durability, RegistryError::Storage, |txn, _| {
                let seq =
                    crate::store_core::next_seq(txn, AUDIT).map_err(RegistryError::Storage)?;
                let mut t = txn.open_table(AUDIT).map_err(storage)?;
                let entry = AuditEntry {
                    seq,
                    at_ms: now_ms(),
                    who: "agent-admin".into(),
                    action: action.into(),
                    target: target.into(),
                    detail,
                };
                let bytes = serde_json::to_vec(&entry).map_err(storage)?;
                t.insert(seq, bytes.as_slice()).map_err(storage)?;
                Ok(seq)
            })?;
        let mark = &self.audit_mark;
        mark.written.fetch_max(seq, Ordering::AcqRel);
        if matches!(durability, redb::Durability::Immediate) {
            mark.durable.fetch_max(seq, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Audit entries after `after`, oldest first, at most `limit`.
    /// Only durable entries: a follower never sees a number a crash could give
    /// to another entry.
    pub fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, RegistryError> {
        let durable = self.audit_mark.durable.load(Ordering::Acquire);
        let txn = self.db.db().begin_read().map_err(storage)?;
        let t = txn.open_table(AUDIT).map_err(storage)?;
        let mut out = Vec::new();
        if after >= durable {
            return Ok(out);
        }
        for row in t
            .range(after.saturating_add(1)..=durable)
            .map_err(storage)?
            .take(limit)
        {
            let (k, v) = row.map_err(storage)?;
            out.push(decode(&k.value().to_string(), v.value())?);
        }
        Ok(out)
    }

    /// Registry-wide values whose keys start with `prefix` (the prefix removed).
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, RegistryError> {
        let txn = self.db.db().begin_read().map_err(storage)?;
        let t = txn.open_table(META).map_err(storage)?;
        let mut out = Vec::new();
        for row in t.range(prefix..).map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let Some(rest) = k.value().strip_prefix(prefix) else {
                break;
            };
            out.push((rest.to_string(), v.value().to_string()));
        }
        Ok(out)
    }

    /// Every template.
    pub fn templates(&self) -> Result<Vec<Vm>, RegistryError> {
        self.all(TEMPLATES)
    }

    /// Every operation.
    pub fn operations(&self) -> Result<Vec<Operation>, RegistryError> {
        self.all(OPS)
    }

    /// Up to `limit` operations in id order after the id `after`.
    pub fn operations_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Operation>, RegistryError> {
        self.page(OPS, after, limit)
    }

    /// One operation.
    pub fn operation(&self, id: &str) -> Result<Option<Operation>, RegistryError> {
        self.one(OPS, id)
    }

    /// Events with a sequence number above `after`, at most `limit`.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, RegistryError> {
        let txn = self.db.db().begin_read().map_err(storage)?;
        let t = txn.open_table(EVENTS).map_err(storage)?;
        let mut out = Vec::new();
        // Strictly after `after`: `after + 1` would wrap at u64::MAX.
        let after = (std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded);
        for row in t.range(after).map_err(storage)?.take(limit) {
            let (k, v) = row.map_err(storage)?;
            out.push(decode(&k.value().to_string(), v.value())?);
        }
        Ok(out)
    }
}

/// The VM tag as read transaction `txn` sees it.
fn vms_tag_in(txn: &redb::ReadTransaction) -> Result<String, RegistryError> {
    let t = txn.open_table(META).map_err(storage)?;
    let get = |k: &str| -> Result<String, RegistryError> {
        Ok(t.get(k)
            .map_err(storage)?
            .map(|v| v.value().to_string())
            .unwrap_or_default())
    };
    Ok(format!(
        "\"{}-{}\"",
        get(REGISTRY_ID)?,
        get(VMS_GENERATION)?
    ))
}
