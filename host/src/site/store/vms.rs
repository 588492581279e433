//! The site's VM records and their indexes, kept in the same transaction as
//! each record: by owner (a user's listing, a page at a time in id order), the
//! pool (free VMs known clean, by the size a request matches on), by agent and
//! by the hypervisor's id (a health check's sync), and by lease deadline
//! (expiry). Each reads the records it is about, whatever the site holds.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{decode, get, storage, Store, StoreError, Txn, META, VMS};
use crate::site::model::SiteVm;

/// (owner, VM id) → (): the VMs each user holds.
const BY_OWNER: TableDefinition<(&str, &str), ()> = TableDefinition::new("vms_by_owner");
/// (logical CPUs, memory MiB, template or "", OS family or "", VM id) → (): the
/// pool, VMs nobody holds that are known clean, by what a request matches on. Free
/// VMs not known clean (adopted from an agent, released by a tenant) go to no
/// request, so they are not here: a request reads the pool's VMs of its size only.
const POOL: TableDefinition<(u64, u64, &str, &str, &str), ()> = TableDefinition::new("vms_pool");
/// The index [`POOL`] replaced: every free VM, clean or not, in id order.
const OLD_FREE: TableDefinition<&str, ()> = TableDefinition::new("vms_free");
/// (agent, VM id) → (): each agent's VMs.
const BY_AGENT: TableDefinition<(&str, &str), ()> = TableDefinition::new("vms_by_agent");
/// (the hypervisor's VM id, site VM id) → (): records of one hypervisor VM, on any agent.
const BY_AGENT_VM: TableDefinition<(&str, &str), ()> = TableDefinition::new("vms_by_agent_vm");
/// (lease deadline, VM id) → (): held VMs whose lease has not expired.
const BY_LEASE: TableDefinition<(u64, &str), ()> = TableDefinition::new("vms_by_lease");
/// Agent → the memory its VMs hold, MiB (exact: a sum of u64s in a u128).
const MEMORY: TableDefinition<&str, u128> = TableDefinition::new("vms_memory_by_agent");

/// (agent, template or "", state, holder class) → how many VMs: what the
/// site's gauges and GLUE document count, read without reading the VMs.
const TALLY: TableDefinition<(&str, &str, &str, u8), u64> = TableDefinition::new("vms_tally");

/// Meta key saying the indexes above were built (a database from before them has none).
const BUILT: &str = "index:vms";
/// Meta key saying [`TALLY`] was built (it came after the other indexes).
const TALLY_BUILT: &str = "index:vms-tally";
/// Meta key saying [`POOL`] was built (it replaced an index of every free VM).
const POOL_BUILT: &str = "index:vms-pool";

/// Holder classes of [`TALLY`]: held by a user, free and clean (the pool),
/// free and not known clean.
const HELD: u8 = 2;
const POOLED: u8 = 1;
const FREE_DIRTY: u8 = 0;

/// How many VMs share an agent, a template, a state and a holder class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// The agent they are on.
    pub agent: String,
    /// Their template, when one is known.
    pub template: Option<String>,
    /// Their state (as [`SiteVm::state`]).
    pub state: String,
    /// Held by a user.
    pub held: bool,
    /// Free and known clean (in the pool); false when held or not known clean.
    pub pooled: bool,
    /// How many.
    pub n: u64,
}

/// The index entries of one record.
#[derive(PartialEq)]
struct Keys<'a> {
    owner: Option<&'a str>,
    agent: &'a str,
    agent_vm: &'a str,
    lease: Option<u64>,
    mib: u64,
    /// (CPUs, MiB, template, OS family) of a VM in the pool.
    pool: Option<(u64, u64, &'a str, &'a str)>,
}

fn keys(v: &SiteVm) -> Keys<'_> {
    Keys {
        owner: v.owner.as_deref(),
        agent: &v.agent,
        agent_vm: &v.agent_vm,
        lease: match (&v.owner, &v.lease) {
            (Some(_), Some(l)) if !l.expired => Some(l.until_ms),
            _ => None,
        },
        mib: v.main_memory_mib,
        pool: (v.owner.is_none() && v.clean).then(|| {
            (
                u64::from(v.logical_cpus),
                v.main_memory_mib,
                v.template.as_deref().unwrap_or(""),
                v.os_family.as_deref().unwrap_or(""),
            )
        }),
    }
}

/// Where `v` counts in [`TALLY`].
fn tally_key(v: &SiteVm) -> (&str, &str, &str, u8) {
    let class = match (&v.owner, v.clean) {
        (Some(_), _) => HELD,
        (None, true) => POOLED,
        (None, false) => FREE_DIRTY,
    };
    let template = v.template.as_deref().unwrap_or("");
    (v.agent.as_str(), template, v.state.as_str(), class)
}

/// Counts one more (`add`) or one fewer VM under `key`; a count at 0 goes.
fn tally(
    txn: &WriteTransaction,
    key: (&str, &str, &str, u8),
    add: bool,
) -> Result<(), redb::Error> {
    let mut t = txn.open_table(TALLY)?;
    let n = t.get(key)?.map(|g| g.value()).unwrap_or(0);
    let n = if add {
        n.saturating_add(1)
    } else {
        n.saturating_sub(1)
    };
    if n == 0 {
        t.remove(key)?;
    } else {
        t.insert(key, n)?;
    }
    Ok(())
}

/// Adds (`add`) or removes the index entries `k` of VM `id`.
fn index(txn: &WriteTransaction, id: &str, k: &Keys<'_>, add: bool) -> Result<(), redb::Error> {
    let mut by_owner = txn.open_table(BY_OWNER)?;
    let mut pool = txn.open_table(POOL)?;
    let mut by_agent = txn.open_table(BY_AGENT)?;
    let mut by_agent_vm = txn.open_table(BY_AGENT_VM)?;
    let mut by_lease = txn.open_table(BY_LEASE)?;
    let mut memory = txn.open_table(MEMORY)?;
    let held = memory.get(k.agent)?.map(|g| g.value()).unwrap_or(0);
    let held = if add {
        held + u128::from(k.mib)
    } else {
        held.saturating_sub(u128::from(k.mib))
    };
    if held == 0 {
        memory.remove(k.agent)?;
    } else {
        memory.insert(k.agent, held)?;
    }
    if add {
        if let Some(o) = k.owner {
            by_owner.insert((o, id), ())?;
        }
        if let Some((cpus, mib, template, os)) = k.pool {
            pool.insert((cpus, mib, template, os, id), ())?;
        }
        by_agent.insert((k.agent, id), ())?;
        by_agent_vm.insert((k.agent_vm, id), ())?;
        if let Some(d) = k.lease {
            by_lease.insert((d, id), ())?;
        }
    } else {
        if let Some(o) = k.owner {
            by_owner.remove((o, id))?;
        }
        if let Some((cpus, mib, template, os)) = k.pool {
            pool.remove((cpus, mib, template, os, id))?;
        }
        by_agent.remove((k.agent, id))?;
        by_agent_vm.remove((k.agent_vm, id))?;
        if let Some(d) = k.lease {
            by_lease.remove((d, id))?;
        }
    }
    Ok(())
}

/// Creates the indexes; a database from before them gets them built here, once.
pub(super) fn open_tables(txn: &WriteTransaction) -> Result<(), redb::Error> {
    for t in [BY_OWNER, BY_AGENT, BY_AGENT_VM] {
        txn.open_table(t)?;
    }
    txn.open_table(POOL)?;
    txn.open_table(BY_LEASE)?;
    txn.open_table(MEMORY)?;
    txn.open_table(TALLY)?;
    let mut meta = txn.open_table(META)?;
    let (built, tallied, pooled) = (
        meta.get(BUILT)?.is_some(),
        meta.get(TALLY_BUILT)?.is_some(),
        meta.get(POOL_BUILT)?.is_some(),
    );
    if built && tallied && pooled {
        return Ok(());
    }
    txn.delete_table(OLD_FREE)?;
    let records = txn.open_table(VMS)?.len()?;
    super::build_index("the VM records", records, |progress| {
        let vms: Vec<SiteVm> = {
            let t = txn.open_table(VMS)?;
            let mut out = Vec::new();
            for row in t.range::<&str>(..)? {
                let (_, v) = row?;
                progress.read_one();
                // An unreadable record is reported where it is read; it has no entries.
                if let Ok(vm) = serde_json::from_slice::<SiteVm>(v.value()) {
                    out.push(vm);
                }
            }
            out
        };
        if built && !pooled {
            let mut pool = txn.open_table(POOL)?;
            for v in &vms {
                if let Some((cpus, mib, template, os)) = keys(v).pool {
                    pool.insert((cpus, mib, template, os, v.id.as_str()), ())?;
                }
            }
        }
        for v in &vms {
            if !built {
                index(txn, &v.id, &keys(v), true)?;
            }
            if !tallied {
                tally(txn, tally_key(v), true)?;
            }
        }
        Ok::<_, redb::Error>(vms.len() as u64)
    })?;
    meta.insert(BUILT, "1")?;
    meta.insert(TALLY_BUILT, "1")?;
    meta.insert(POOL_BUILT, "1")?;
    Ok(())
}

pub use crate::store_core::Page;

impl Txn<'_> {
    /// Inserts or replaces a VM whose agent is registered, keeping the owner
    /// index; refused with [`StoreError::NoAgent`] otherwise (a job that ends
    /// after its agent was force-unregistered records nothing on the missing agent).
    pub fn put_vm(&mut self, v: &SiteVm) -> Result<(), StoreError> {
        if self.agent(&v.agent)?.is_none() {
            return Err(StoreError::NoAgent {
                vm: v.id.clone(),
                agent: v.agent.clone(),
            });
        }
        let old = self.readable_vm(&v.id)?;
        self.wrote_vm_of(&v.agent);
        if let Some(o) = old.as_ref().filter(|o| o.agent != v.agent) {
            self.wrote_vm_of(&o.agent);
        }
        let new = keys(v);
        if old.as_ref().map(keys) != Some(new) {
            if let Some(o) = &old {
                index(self.txn, &o.id, &keys(o), false).map_err(storage)?;
            }
            index(self.txn, &v.id, &keys(v), true).map_err(storage)?;
        }
        let counted = old.as_ref().map(tally_key);
        if counted != Some(tally_key(v)) {
            if let Some(k) = counted {
                tally(self.txn, k, false).map_err(storage)?;
            }
            tally(self.txn, tally_key(v), true).map_err(storage)?;
        }
        self.put_vm_record(v)
    }

    /// Removes a VM record and its index entries.
    pub fn remove_vm(&mut self, id: &str) -> Result<(), StoreError> {
        if let Some(o) = self.readable_vm(id)? {
            self.wrote_vm_of(&o.agent);
            index(self.txn, id, &keys(&o), false).map_err(storage)?;
            tally(self.txn, tally_key(&o), false).map_err(storage)?;
        }
        self.remove_vm_record(id)
    }

    /// Counts a write of one of agent `agent`'s VM records (made before the
    /// commit: a write rolled back costs one needless full listing, no more).
    fn wrote_vm_of(&self, agent: &str) {
        let mut w = self.vm_writes.lock().unwrap_or_else(|p| p.into_inner());
        let n = w.entry(agent.to_string()).or_default();
        *n = n.wrapping_add(1);
    }

    /// How many writes of agent `agent`'s VM records this process has made,
    /// this transaction's included.
    pub fn vm_writes(&self, agent: &str) -> u64 {
        let w = self.vm_writes.lock().unwrap_or_else(|p| p.into_inner());
        w.get(agent).copied().unwrap_or(0)
    }

    /// The record a write replaces, for its index entries; an unreadable one is
    /// logged and replaced (or removed) all the same: its stale entries, if any,
    /// are skipped by the readers, which check each record against its entry.
    fn readable_vm(&self, id: &str) -> Result<Option<SiteVm>, StoreError> {
        match self.vm(id) {
            Err(StoreError::Corrupt { key, message }) => {
                tracing::warn!(vm = key, "replacing an unreadable VM record: {message}");
                Ok(None)
            }
            other => other,
        }
    }

    /// The first VM of the pool (free, known clean) with `cpus` and `mib`, of
    /// `template` when one is asked for, that `accept` takes: reads the pool's
    /// entries of that size (and template) only, in (template, OS family, id) order.
    pub fn pooled_vm(
        &self,
        cpus: u64,
        mib: u64,
        template: Option<&str>,
        accept: impl Fn(&SiteVm) -> bool,
    ) -> Result<Option<SiteVm>, StoreError> {
        let pool = self.txn.open_table(POOL).map_err(storage)?;
        let vms = self.txn.open_table(VMS).map_err(storage)?;
        let from = (cpus, mib, template.unwrap_or(""), "", "");
        for row in pool.range(from..).map_err(storage)? {
            let (k, _) = row.map_err(storage)?;
            let (c, m, t, _, id) = k.value();
            if (c, m) != (cpus, mib) || template.is_some_and(|want| want != t) {
                break;
            }
            let Some(v) = get::<SiteVm>(&vms, id)? else {
                continue;
            };
            // Each reader checks the record against its entry (see `readable_vm`).
            if keys(&v)
                .pool
                .is_some_and(|(c, m, _, _)| (c, m) == (cpus, mib))
                && accept(&v)
            {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Agent `agent`'s VMs, by the index.
    pub fn vms_of_agent(&self, agent: &str) -> Result<Vec<SiteVm>, StoreError> {
        self.by_index(BY_AGENT, agent, |v| v.agent == agent)
    }

    /// The records of hypervisor VM `agent_vm`, on any agent, by the index.
    pub fn vms_by_agent_vm(&self, agent_vm: &str) -> Result<Vec<SiteVm>, StoreError> {
        self.by_index(BY_AGENT_VM, agent_vm, |v| v.agent_vm == agent_vm)
    }

    /// The VMs whose entries in `index` start with `key` and whose record agrees
    /// (`agrees`: each reader checks the record against its entry).
    fn by_index(
        &self,
        index: TableDefinition<(&str, &str), ()>,
        key: &str,
        agrees: impl Fn(&SiteVm) -> bool,
    ) -> Result<Vec<SiteVm>, StoreError> {
        let index = self.txn.open_table(index).map_err(storage)?;
        let vms = self.txn.open_table(VMS).map_err(storage)?;
        by_index(&index, &vms, key, agrees)
    }
}

/// The VMs whose entries in `index` start with `key` and whose record agrees.
fn by_index(
    index: &impl ReadableTable<(&'static str, &'static str), ()>,
    vms: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    agrees: impl Fn(&SiteVm) -> bool,
) -> Result<Vec<SiteVm>, StoreError> {
    let mut out = Vec::new();
    each_by_index(index, vms, key, |v| {
        if agrees(&v) {
            out.push(v);
        }
    })?;
    Ok(out)
}

/// Hands `each` the VMs whose entries in `index` start with `key`, one at a
/// time (none is kept here).
fn each_by_index(
    index: &impl ReadableTable<(&'static str, &'static str), ()>,
    vms: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    mut each: impl FnMut(SiteVm),
) -> Result<(), StoreError> {
    for row in index.range((key, "")..).map_err(storage)? {
        let (k, _) = row.map_err(storage)?;
        let (a, id) = k.value();
        if a != key {
            break;
        }
        if let Some(v) = get::<SiteVm>(vms, id)? {
            each(v);
        }
    }
    Ok(())
}

impl Store {
    /// Agent `agent`'s VMs, by the index, read without a write transaction.
    pub fn vms_of_agent(&self, agent: &str) -> Result<Vec<SiteVm>, StoreError> {
        let mut out = Vec::new();
        self.each_vm_of_agent(agent, |v| out.push(v))?;
        Ok(out)
    }

    /// Hands `each` agent `agent`'s VMs one at a time, by the index, read
    /// without a write transaction: a health check compares them with the
    /// agent's listing before it writes, keeping only what it compares by.
    pub fn each_vm_of_agent(
        &self,
        agent: &str,
        mut each: impl FnMut(SiteVm),
    ) -> Result<(), StoreError> {
        self.read(|r| {
            let index = r.open_table(BY_AGENT).map_err(storage)?;
            let vms = r.open_table(VMS).map_err(storage)?;
            each_by_index(&index, &vms, agent, |v| {
                if v.agent == agent {
                    each(v);
                }
            })
        })
    }

    /// Whether the pool index is empty (no free VM is known clean), read without
    /// a write transaction: a request can skip looking for one to claim.
    pub fn pool_is_empty(&self) -> Result<bool, StoreError> {
        self.read(|r| {
            let pool = r.open_table(POOL).map_err(storage)?;
            pool.is_empty().map_err(storage)
        })
    }

    /// The ids in the pool index (for tests of its upkeep).
    pub fn pool_ids(&self) -> Result<Vec<String>, StoreError> {
        self.read(|r| {
            let pool = r.open_table(POOL).map_err(storage)?;
            let mut out = Vec::new();
            for row in pool
                .range::<(u64, u64, &str, &str, &str)>(..)
                .map_err(storage)?
            {
                out.push(row.map_err(storage)?.0.value().4.to_string());
            }
            Ok(out)
        })
    }

    /// Up to `limit` VMs with ids after `after`, in id order: `owner`'s, or every
    /// VM for `None`. Reads one page's worth of records, whatever the site holds.
    pub fn vms_page(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<SiteVm>, StoreError> {
        self.read(|r| {
            let vms = r.open_table(VMS).map_err(storage)?;
            let mut items = Vec::new();
            let mut more = false;
            let lo = after.unwrap_or("");
            let Some(owner) = owner else {
                for row in vms.range::<&str>(lo..).map_err(storage)? {
                    let (k, v) = row.map_err(storage)?;
                    if Some(k.value()) == after {
                        continue;
                    }
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(decode(k.value(), v.value())?);
                }
                return Ok(Page { items, more });
            };
            let index = r.open_table(BY_OWNER).map_err(storage)?;
            for row in index.range((owner, lo)..).map_err(storage)? {
                let (k, _) = row.map_err(storage)?;
                let (o, id) = k.value();
                if o != owner {
                    break;
                }
                if Some(id) == after {
                    continue;
                }
                let Some(vm) = get::<SiteVm>(&vms, id)? else {
                    continue;
                };
                if vm.owner.as_deref() != Some(owner) {
                    continue;
                }
                if items.len() == limit {
                    more = true;
                    break;
                }
                items.push(vm);
            }
            Ok(Page { items, more })
        })
    }

    /// Held VMs whose unexpired lease ends at or before `now_ms`, by the index.
    pub fn leases_due(&self, now_ms: u64) -> Result<Vec<SiteVm>, StoreError> {
        self.read(|r| {
            let index = r.open_table(BY_LEASE).map_err(storage)?;
            let vms = r.open_table(VMS).map_err(storage)?;
            let mut out = Vec::new();
            for row in index
                .range(..(now_ms.saturating_add(1), ""))
                .map_err(storage)?
            {
                let (k, _) = row.map_err(storage)?;
                if let Some(v) = get::<SiteVm>(&vms, k.value().1)? {
                    let due = v.owner.is_some()
                        && v.lease.is_some_and(|l| !l.expired && l.until_ms <= now_ms);
                    if due {
                        out.push(v);
                    }
                }
            }
            Ok(out)
        })
    }

    /// The memory each agent's VMs hold, MiB (agents without VMs are absent).
    pub fn memory_by_agent(&self) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        self.read(|r| {
            let t = r.open_table(MEMORY).map_err(storage)?;
            let mut out = std::collections::HashMap::new();
            for row in t.range::<&str>(..).map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                out.insert(
                    k.value().to_string(),
                    u64::try_from(v.value()).unwrap_or(u64::MAX),
                );
            }
            Ok(out)
        })
    }

    /// The VMs counted by agent, template, state and holder: one row per
    /// combination, whatever the number of VMs.
    pub fn vm_tallies(&self) -> Result<Vec<Tally>, StoreError> {
        self.read(|r| {
            let t = r.open_table(TALLY).map_err(storage)?;
            let mut out = Vec::new();
            for row in t.range::<(&str, &str, &str, u8)>(..).map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                let (agent, template, state, class) = k.value();
                out.push(Tally {
                    agent: agent.to_string(),
                    template: (!template.is_empty()).then(|| template.to_string()),
                    state: state.to_string(),
                    held: class == HELD,
                    pooled: class == POOLED,
                    n: v.value(),
                });
            }
            Ok(out)
        })
    }

    /// How many VMs `owner` holds by the index (for tests of its upkeep).
    pub fn owned_vm_count(&self, owner: &str) -> Result<usize, StoreError> {
        self.read(|r| {
            let index = r.open_table(BY_OWNER).map_err(storage)?;
            let mut n = 0;
            for row in index.range((owner, "")..).map_err(storage)? {
                if row.map_err(storage)?.0.value().0 != owner {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
    }
}
