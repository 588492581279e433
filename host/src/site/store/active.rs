//! The jobs not yet ended and what they work on, kept as indexes so a question
//! about one VM or one job costs that VM or job, not the whole backlog: a site
//! with hundreds of thousands of queued jobs answers its health checks, metrics
//! and GLUE 2 document without reading (or holding) every one of them.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{decode, storage, StoreError, Txn, JOBS, META};
use crate::site::model::{Job, JobKind};

/// Jobs not yet terminal (what a restarted site resumes).
pub(super) const ACTIVE: TableDefinition<&str, ()> = TableDefinition::new("active_jobs");
/// Active job id → the site VM it works on.
const JOB_VM: TableDefinition<&str, &str> = TableDefinition::new("active_job_vm");
/// "site VM id\0job id" → (): the active jobs working on a VM.
const BY_VM: TableDefinition<&str, ()> = TableDefinition::new("active_by_vm");
/// "new VM's name\0job id" → (): active clones and the name they give their VM.
const CLONES: TableDefinition<&str, ()> = TableDefinition::new("active_clones");
/// Meta key saying the indexes above were built (a database from before them has none).
const BUILT: &str = "index:active-vms";

fn pair(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
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
    txn.open_table(JOB_VM).map_err(storage)?;
    txn.open_table(BY_VM).map_err(storage)?;
    txn.open_table(CLONES).map_err(storage)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    if meta.get(BUILT).map_err(storage)?.is_some() {
        return Ok(());
    }
    // Read first (once, on an upgrade): the index writes open the same tables.
    let found: Vec<Job> = {
        let active = txn.open_table(ACTIVE).map_err(storage)?;
        let jobs = txn.open_table(JOBS).map_err(storage)?;
        let mut found = Vec::new();
        for row in active.range::<&str>(..).map_err(storage)? {
            let (k, _) = row.map_err(storage)?;
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
    meta.insert(BUILT, "1").map_err(storage)?;
    if !found.is_empty() {
        tracing::info!(jobs = found.len(), "indexed the active jobs' VMs");
    }
    Ok(())
}

/// Keeps the indexes of `job`, just written; `was_vm` is the VM the index held
/// for it before (none for a job new to the index).
fn track(txn: &WriteTransaction, job: &Job, was_vm: Option<String>) -> Result<(), StoreError> {
    let mut active = txn.open_table(ACTIVE).map_err(storage)?;
    let mut job_vm = txn.open_table(JOB_VM).map_err(storage)?;
    let mut by_vm = txn.open_table(BY_VM).map_err(storage)?;
    let mut clones = txn.open_table(CLONES).map_err(storage)?;
    let id = job.id.as_str();
    let now_vm = (!job.state.is_terminal())
        .then_some(job.vm.as_deref())
        .flatten();
    if was_vm.as_deref() != now_vm {
        if let Some(old) = &was_vm {
            by_vm.remove(pair(old, id).as_str()).map_err(storage)?;
            job_vm.remove(id).map_err(storage)?;
        }
        if let Some(vm) = now_vm {
            by_vm.insert(pair(vm, id).as_str(), ()).map_err(storage)?;
            job_vm.insert(id, vm).map_err(storage)?;
        }
    }
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
    /// Keeps the active-job indexes of `job`, just written.
    pub(super) fn track_active(&mut self, job: &Job) -> Result<(), StoreError> {
        let was_vm = {
            let t = self.txn.open_table(JOB_VM).map_err(storage)?;
            let v = t.get(job.id.as_str()).map_err(storage)?;
            v.map(|v| v.value().to_string())
        };
        track(self.txn, job, was_vm)
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
        let from = pair(vm, "");
        let to = format!("{vm}\u{1}");
        let mut rows = t
            .range::<&str>(from.as_str()..to.as_str())
            .map_err(storage)?;
        let found = rows.next().transpose().map_err(storage)?.is_some();
        Ok(found)
    }

    /// Whether an active clone of a VM on `agent` names its new VM `name` (the
    /// contract's clone carries no labels: the name is what marks it).
    pub fn cloning_to(&self, agent: &str, name: &str) -> Result<bool, StoreError> {
        let ids: Vec<String> = {
            let t = self.txn.open_table(CLONES).map_err(storage)?;
            let from = pair(name, "");
            let to = format!("{name}\u{1}");
            let mut ids = Vec::new();
            for row in t
                .range::<&str>(from.as_str()..to.as_str())
                .map_err(storage)?
            {
                let (k, _) = row.map_err(storage)?;
                if let Some((_, id)) = k.value().split_once('\0') {
                    ids.push(id.to_string());
                }
            }
            ids
        };
        let job_vm = self.txn.open_table(JOB_VM).map_err(storage)?;
        for id in ids {
            let Some(vm) = job_vm.get(id.as_str()).map_err(storage)? else {
                continue;
            };
            if self.vm(vm.value())?.is_some_and(|v| v.agent == agent) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

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
