//! The jobs not yet ended, what they work on and how many there are of each
//! kind and state, kept as indexes so a question about one VM or one job costs
//! that VM or job, not the whole backlog: a site with hundreds of thousands of
//! queued jobs answers its health checks, metrics and GLUE 2 document without
//! reading (or holding) every one of them.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{decode, storage, StoreError, Txn, JOBS, META};
use crate::site::model::{Job, JobKind};

/// Jobs not yet terminal (what a restarted site resumes).
pub(super) const ACTIVE: TableDefinition<&str, ()> = TableDefinition::new("active_jobs");
/// Active job id → "kind\0state\0site VM" (the VM empty when it has none):
/// what the other indexes were written from, read back when the job changes.
const FACTS: TableDefinition<&str, &str> = TableDefinition::new("active_job_facts");
/// (kind, state) → how many active jobs are of that kind in that state.
const TALLY: TableDefinition<(&str, &str), u64> = TableDefinition::new("active_tally");
/// "site VM id\0job id" → (): the active jobs working on a VM.
const BY_VM: TableDefinition<&str, ()> = TableDefinition::new("active_by_vm");
/// "new VM's name\0job id" → (): active clones and the name they give their VM.
const CLONES: TableDefinition<&str, ()> = TableDefinition::new("active_clones");
/// Meta key saying the indexes above were built (a database from before them has none).
pub(super) const BUILT: &str = "index:active-jobs";

fn pair(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
}

/// The keys [`pair`] makes with `a` first, whatever the second.
fn pairs_of(a: &str) -> std::ops::Range<String> {
    pair(a, "")..format!("{a}\u{1}")
}

/// What the indexes hold of one active job.
#[derive(PartialEq)]
struct Facts<'a> {
    kind: &'a str,
    state: &'a str,
    vm: &'a str,
}

impl<'a> Facts<'a> {
    fn of(job: &'a Job) -> Option<Facts<'a>> {
        (!job.state.is_terminal()).then(|| Facts {
            kind: job.kind.as_str(),
            state: job.state.as_str(),
            vm: job.vm.as_deref().unwrap_or(""),
        })
    }

    fn parse(s: &'a str) -> Option<Facts<'a>> {
        let mut it = s.splitn(3, '\0');
        Some(Facts {
            kind: it.next()?,
            state: it.next()?,
            vm: it.next()?,
        })
    }

    fn encode(&self) -> String {
        format!("{}\0{}\0{}", self.kind, self.state, self.vm)
    }
}

/// The name an active clone gives its new VM.
fn clone_name(job: &Job) -> Option<&str> {
    (job.kind == JobKind::Clone)
        .then(|| job.params["name"].as_str())
        .flatten()
}

/// Opens the tables, building the indexes from the active jobs on the first
/// open of a database from before them.
pub(super) fn open_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(ACTIVE).map_err(storage)?;
    txn.open_table(FACTS).map_err(storage)?;
    txn.open_table(TALLY).map_err(storage)?;
    txn.open_table(BY_VM).map_err(storage)?;
    txn.open_table(CLONES).map_err(storage)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    if meta.get(BUILT).map_err(storage)?.is_some() {
        return Ok(());
    }
    let records = txn
        .open_table(ACTIVE)
        .map_err(storage)?
        .len()
        .map_err(storage)?;
    super::build_index("the active jobs' VMs", records, |progress| {
        // Read first: the index writes open the same tables.
        let found: Vec<Job> = {
            let active = txn.open_table(ACTIVE).map_err(storage)?;
            let jobs = txn.open_table(JOBS).map_err(storage)?;
            let mut found = Vec::new();
            for row in active.range::<&str>(..).map_err(storage)? {
                let (k, _) = row.map_err(storage)?;
                progress.read_one();
                let Some(v) = jobs.get(k.value()).map_err(storage)? else {
                    continue;
                };
                // An unreadable job is reported where it is read; it has no entries.
                if let Ok(job) = decode::<Job>(k.value(), v.value()) {
                    found.push(job);
                }
            }
            found
        };
        for job in &found {
            track(txn, job, None)?;
        }
        Ok(found.len() as u64)
    })?;
    meta.insert(BUILT, "1").map_err(storage)?;
    Ok(())
}

/// How many entries `active_jobs` and the facts hold.
pub(super) fn lens(txn: &WriteTransaction) -> Result<(u64, u64), StoreError> {
    let listed = txn.open_table(ACTIVE).map_err(storage)?.len();
    let facts = txn.open_table(FACTS).map_err(storage)?.len();
    Ok((listed.map_err(storage)?, facts.map_err(storage)?))
}

/// Drops the indexes (not `active_jobs`, their source) and their built flag.
pub(super) fn forget(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.delete_table(FACTS).map_err(storage)?;
    txn.delete_table(TALLY).map_err(storage)?;
    txn.delete_table(BY_VM).map_err(storage)?;
    txn.delete_table(CLONES).map_err(storage)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    meta.remove(BUILT).map_err(storage)?;
    Ok(())
}

/// Moves the count of (`kind`, `state`) by one, up or down.
fn count(
    tally: &mut redb::Table<'_, (&'static str, &'static str), u64>,
    f: &Facts<'_>,
    up: bool,
) -> Result<(), StoreError> {
    let n = tally
        .get((f.kind, f.state))
        .map_err(storage)?
        .map(|v| v.value())
        .unwrap_or(0);
    match (up, n) {
        (true, n) => tally.insert((f.kind, f.state), n.saturating_add(1)),
        (false, 0 | 1) => tally.remove((f.kind, f.state)),
        (false, n) => tally.insert((f.kind, f.state), n - 1),
    }
    .map_err(storage)?;
    Ok(())
}

/// Keeps the indexes of `job`, just written; `was` is what the facts table
/// held for it before (none for a job new to the index).
fn track(txn: &WriteTransaction, job: &Job, was: Option<&str>) -> Result<(), StoreError> {
    let id = job.id.as_str();
    let was = was.and_then(Facts::parse);
    let now = Facts::of(job);
    if was != now {
        let mut facts = txn.open_table(FACTS).map_err(storage)?;
        let mut tally = txn.open_table(TALLY).map_err(storage)?;
        let mut by_vm = txn.open_table(BY_VM).map_err(storage)?;
        if let Some(w) = &was {
            count(&mut tally, w, false)?;
            if now.as_ref().map(|n| n.vm) != Some(w.vm) && !w.vm.is_empty() {
                by_vm.remove(pair(w.vm, id).as_str()).map_err(storage)?;
            }
        }
        match &now {
            Some(n) => {
                count(&mut tally, n, true)?;
                if was.as_ref().map(|w| w.vm) != Some(n.vm) && !n.vm.is_empty() {
                    by_vm.insert(pair(n.vm, id).as_str(), ()).map_err(storage)?;
                }
                facts.insert(id, n.encode().as_str()).map_err(storage)?;
            }
            None => {
                facts.remove(id).map_err(storage)?;
            }
        }
    }
    let mut active = txn.open_table(ACTIVE).map_err(storage)?;
    let mut clones = txn.open_table(CLONES).map_err(storage)?;
    if job.state.is_terminal() {
        active.remove(id).map_err(storage)?;
        if let Some(name) = clone_name(job) {
            clones.remove(pair(name, id).as_str()).map_err(storage)?;
        }
    } else {
        active.insert(id, ()).map_err(storage)?;
        if let Some(name) = clone_name(job) {
            clones
                .insert(pair(name, id).as_str(), ())
                .map_err(storage)?;
        }
    }
    Ok(())
}

impl Txn<'_> {
    /// What the indexes hold of job `id` while it is active (none once ended,
    /// or before it was first written).
    pub(super) fn active_facts(&self, id: &str) -> Result<Option<String>, StoreError> {
        let t = self.txn.open_table(FACTS).map_err(storage)?;
        let v = t.get(id).map_err(storage)?;
        Ok(v.map(|v| v.value().to_string()))
    }

    /// Keeps the active-job indexes of `job`, just written; `was` is what
    /// [`Self::active_facts`] said before the write.
    pub(super) fn track_active(&mut self, job: &Job, was: Option<&str>) -> Result<(), StoreError> {
        track(self.txn, job, was)
    }

    /// Whether job `id` is queued or running.
    pub fn job_active(&self, id: &str) -> Result<bool, StoreError> {
        let t = self.txn.open_table(ACTIVE).map_err(storage)?;
        let found = t.get(id).map_err(storage)?.is_some();
        Ok(found)
    }

    /// Whether a job that has not ended works on site VM `vm`.
    pub fn vm_busy(&self, vm: &str) -> Result<bool, StoreError> {
        let t = self.txn.open_table(BY_VM).map_err(storage)?;
        let keys = pairs_of(vm);
        let mut rows = t
            .range::<&str>(keys.start.as_str()..keys.end.as_str())
            .map_err(storage)?;
        let found = rows.next().transpose().map_err(storage)?.is_some();
        Ok(found)
    }

    /// Whether an active clone of a VM on `agent` names its new VM `name` (the
    /// contract's clone carries no labels: the name is what marks it).
    pub fn cloning_to(&self, agent: &str, name: &str) -> Result<bool, StoreError> {
        let ids: Vec<String> = {
            let t = self.txn.open_table(CLONES).map_err(storage)?;
            let keys = pairs_of(name);
            let mut ids = Vec::new();
            for row in t
                .range::<&str>(keys.start.as_str()..keys.end.as_str())
                .map_err(storage)?
            {
                let (k, _) = row.map_err(storage)?;
                if let Some((_, id)) = k.value().rsplit_once('\0') {
                    ids.push(id.to_string());
                }
            }
            ids
        };
        let facts = self.txn.open_table(FACTS).map_err(storage)?;
        for id in ids {
            let Some(f) = facts.get(id.as_str()).map_err(storage)? else {
                continue;
            };
            let Some(vm) = Facts::parse(f.value()).map(|f| f.vm.to_string()) else {
                continue;
            };
            if self.vm(&vm)?.is_some_and(|v| v.agent == agent) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A job kind and state, as the API spells them.
pub type KindState = (String, String);

impl super::Store {
    /// How many jobs are queued or running (by the index, reading no job).
    pub fn active_job_count(&self) -> Result<u64, StoreError> {
        self.read(|r| {
            r.open_table(ACTIVE)
                .map_err(storage)?
                .len()
                .map_err(storage)
        })
    }

    /// How many jobs are queued or running, by (kind, state), from the tally
    /// (reading no job).
    pub fn active_tally(&self) -> Result<Vec<(KindState, u64)>, StoreError> {
        self.read(|r| {
            let t = r.open_table(TALLY).map_err(storage)?;
            let mut out = Vec::new();
            for row in t.range::<(&str, &str)>(..).map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                let (kind, state) = k.value();
                out.push(((kind.to_string(), state.to_string()), v.value()));
            }
            Ok(out)
        })
    }

    /// Calls `f` with every job that is queued or running, one at a time (a
    /// backlog is never held in memory at once).
    pub fn for_each_active(&self, mut f: impl FnMut(Job)) -> Result<(), StoreError> {
        self.read(|r| {
            let active = r.open_table(ACTIVE).map_err(storage)?;
            let jobs = r.open_table(JOBS).map_err(storage)?;
            for row in active.range::<&str>(..).map_err(storage)? {
                let (k, _) = row.map_err(storage)?;
                if let Some(v) = jobs.get(k.value()).map_err(storage)? {
                    f(decode(k.value(), v.value())?);
                }
            }
            Ok(())
        })
    }

    /// Jobs that are queued or running (tests and benches; the site itself
    /// goes through [`Self::for_each_active`]).
    pub fn active_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        self.for_each_active(|j| out.push(j))?;
        Ok(out)
    }
}
