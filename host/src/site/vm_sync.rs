//! Keeping the site's VM records in line with each agent's registry. A health
//! check lists an agent's VMs and [`apply_listing`] applies the listing; the agent
//! tags its listing (an entity tag that moves with every VM record it writes),
//! and [`Listings`] remembers the tag of a listing the records fully agreed
//! with, so the next check asks with `If-None-Match` and an unchanged agent
//! answers 304 instead of every VM again. A full listing is still read at
//! least every [`FULL_LISTING_EVERY`] per [`FULL_LISTING_STEP`] VMs listed
//! (see [`full_listing_every`]), after any listing that left something
//! unsettled (a VM missing, or one a job was working on), and after the site
//! wrote any of the agent's VM records itself (a job recording an operation's
//! result, a VM moved between agents): the agent's tag does not move for those.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::agents::{forget_vm, site_vm_id};
use super::model::{now_ms, AgentRec, SiteVm};
use super::store::StoreError;
use crate::agent::model::VmRecord;

/// The longest a site goes without reading an agent's whole VM listing of up to
/// [`FULL_LISTING_STEP`] VMs; longer listings are read in full as much less often
/// (a minute per that many VMs, at most [`FULL_LISTING_MAX`]), so that this
/// safety net costs the same small share of a core at any size.
pub const FULL_LISTING_EVERY: Duration = Duration::from_secs(60);
/// See [`FULL_LISTING_EVERY`].
pub const FULL_LISTING_STEP: usize = 10_000;
/// See [`FULL_LISTING_EVERY`].
pub const FULL_LISTING_MAX: Duration = Duration::from_secs(30 * 60);

/// How long a settled listing of `vms` VMs may be trusted without a full read.
pub fn full_listing_every(vms: usize) -> Duration {
    let steps = u32::try_from(vms.div_ceil(FULL_LISTING_STEP)).unwrap_or(u32::MAX);
    FULL_LISTING_EVERY
        .saturating_mul(steps.max(1))
        .min(FULL_LISTING_MAX)
}

/// What a check did with an agent's VM listing.
pub enum Checked {
    /// The agent answered 304: its VMs are as the last settled listing saw them.
    Unchanged,
    /// Every VM was read and applied, with the listing's tag; `settled` when
    /// the records then agreed with it, as of `writes` writes of the agent's
    /// VM records ([`super::store::Store::vm_writes`]).
    Read {
        /// The listing's entity tag.
        tag: Option<String>,
        /// Whether the records agreed with the listing.
        settled: bool,
        /// The agent's VM-record write count right after the listing was applied.
        writes: u64,
    },
}

/// A settled listing: its tag, when it was read, the write count then, and
/// how long it may be trusted.
struct Mark {
    tag: String,
    at: Instant,
    writes: u64,
    trusted: Duration,
}

/// Per agent, the tag of the last listing the site's records agreed with.
#[derive(Default)]
pub struct Listings {
    marks: Mutex<HashMap<String, Mark>>,
}

impl Listings {
    /// The tag to send with agent `agent`'s next listing, if one may be
    /// skipped: none once the site wrote one of the agent's VM records since
    /// (`writes` is the count now), nor after [`full_listing_every`] of its size.
    pub fn tag(&self, agent: &str, writes: u64) -> Option<String> {
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks
            .get(agent)
            .filter(|m| m.writes == writes && m.at.elapsed() < m.trusted)
            .map(|m| m.tag.clone())
    }

    /// Records agent `agent`'s listing of `vms` VMs with `tag`, applied as of
    /// `writes`: remembered when the records `settled` with it, else forgotten
    /// (the next check reads every VM). A mark from a check that finished late
    /// is no risk: the write count or the agent's tag has moved on since.
    pub fn listed(&self, agent: &str, vms: usize, tag: Option<String>, settled: bool, writes: u64) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        match tag.filter(|_| settled) {
            Some(tag) => {
                let at = Instant::now();
                let trusted = full_listing_every(vms);
                marks.insert(
                    agent.to_string(),
                    Mark {
                        tag,
                        at,
                        writes,
                        trusted,
                    },
                );
            }
            None => {
                marks.remove(agent);
            }
        }
    }

    /// Forgets agent `agent` (registered or unregistered, or its check failed).
    pub fn forget(&self, agent: &str) {
        self.marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(agent);
    }
}

/// State of a VM record whose agent no longer lists it: forgotten when checks
/// still miss it a while later, unless another agent lists it by then (it moved).
pub const MISSING: &str = "missing";

/// VMs a health check brings in line in one transaction at most. Between two,
/// it leaves the database to other writers ([`sync_pause`]): a first check
/// adopting an agent's 100,000 VMs in one transaction held the database
/// 1.9-2.9 s (`bench/million.rs`, run 5), every other write waiting.
pub const SYNC_BATCH: usize = 256;

/// How long a health check leaves the database to other writers after a batch
/// that took `took`: a quarter of that, at least 1 ms, enough for a writer
/// waiting on the lock to take it. Two agents' first checks adopting 100,000
/// VMs each: 6.0 s in one transaction each, 8.0 s in batches back to back,
/// 9.2 s with this pause, 14.3 s with a pause as long as the batch (as
/// retention's, which is no one's wait).
pub fn sync_pause(took: Duration) -> Duration {
    (took / 4).max(Duration::from_millis(1))
}

/// What applying an agent's listing came to.
pub struct Applied {
    /// Whether the records agreed with the listing once it was applied.
    pub settled: bool,
    /// The agent's VM-record write count then ([`super::store::Store::vm_writes`]).
    pub writes: u64,
}

/// A VM the listing and the site's records disagree on.
enum Differs<'a> {
    /// Listed, and the site's record of it is missing or says otherwise.
    Listed(&'a VmRecord),
    /// The site's record (by id) of a VM the listing lacks.
    Unlisted(String),
}

/// Brings the site's records of agent `agent`'s VMs in line with what it reports
/// (listed at `listed_at`). The records are compared with the listing without
/// the write lock; only the VMs they disagree on are written, in transactions
/// of at most [`SYNC_BATCH`], each deciding on the records as they are then
/// (see [`sync_listed`] and [`sync_unlisted`]). `None` when the agent is no
/// longer registered as `registered` says (at the URL it was listed from,
/// registered then: not an agent registered again under its id meanwhile).
/// Settled only when no other writer wrote one of the agent's records
/// meanwhile (what it wrote was not compared with the listing).
pub fn apply_listing(
    store: &super::store::Store,
    registered: &AgentRec,
    listed: &[VmRecord],
    listed_at: u64,
    forget_after_ms: u64,
) -> Result<Option<Applied>, StoreError> {
    let agent = registered.id.as_str();
    // The endpoint this agent reached at this check.
    let here = registered.endpoint.as_deref();
    let same_registration =
        |r: &AgentRec| r.url == registered.url && r.registered_ms == registered.registered_ms;
    // The count of writes made before the snapshot below, read under the write
    // lock: a write counted but not committed yet would otherwise be taken as
    // seen by the comparison (and a record it changed as agreeing).
    let (mut before, mut same) = (0, false);
    store.write_if(|t| {
        before = t.vm_writes(agent);
        same = t.agent(agent)?.is_some_and(|r| same_registration(&r));
        Ok(None::<()>)
    })?;
    if !same {
        return Ok(None);
    }
    // Only this agent's records are read: a check costs this agent's VMs.
    let mine: HashMap<String, SiteVm> = store
        .vms_of_agent(agent)?
        .into_iter()
        .map(|v| (v.agent_vm.clone(), v))
        .collect();
    let mut settled = true;
    let mut differs = Vec::new();
    for rec in listed {
        match mine.get(&rec.vm.id) {
            Some(known) if known.state == state_of(rec) && known.name == rec.vm.name => {}
            _ => differs.push(Differs::Listed(rec)),
        }
    }
    let present: HashSet<&str> = listed.iter().map(|r| r.vm.id.as_str()).collect();
    for (agent_vm, v) in &mine {
        if !present.contains(agent_vm.as_str()) {
            // Missing now, or left to a job or to the next listing; either way a
            // later listing must look again.
            settled = false;
            differs.push(Differs::Unlisted(v.id.clone()));
        }
    }
    drop(mine);
    let mut ours = 0u64;
    for (i, batch) in differs.chunks(SYNC_BATCH).enumerate() {
        if i > 0 && store.stopping() {
            return Ok(Some(Applied {
                settled: false,
                writes: store.vm_writes(agent),
            }));
        }
        let t0 = Instant::now();
        let done = store.write_lazy(|t| {
            if !t.agent(agent)?.is_some_and(|r| same_registration(&r)) {
                return Ok(None);
            }
            let w0 = t.vm_writes(agent);
            // The endpoint each other agent reached at its last check, and this
            // one's now (`here`): agents on one endpoint (one vCenter) share
            // its VM ids.
            let endpoints: HashMap<String, Option<String>> = t
                .agents()?
                .into_iter()
                .map(|a| (a.id, a.endpoint))
                .collect();
            let same_vm = |id: &str, other: &SiteVm| {
                unique_everywhere(id)
                    || (here.is_some()
                        && endpoints.get(&other.agent).and_then(|e| e.as_deref()) == here)
            };
            let mut agreed = true;
            for d in batch {
                agreed &= match d {
                    Differs::Listed(rec) => sync_listed(t, agent, &same_vm, rec, listed_at)?,
                    Differs::Unlisted(id) => {
                        sync_unlisted(t, agent, id, listed_at, forget_after_ms)?;
                        false
                    }
                };
            }
            Ok(Some((agreed, t.vm_writes(agent).wrapping_sub(w0))))
        })?;
        let Some((agreed, wrote)) = done else {
            return Ok(None);
        };
        settled &= agreed;
        ours = ours.wrapping_add(wrote);
        if i + 1 < differs.len().div_ceil(SYNC_BATCH) {
            std::thread::sleep(sync_pause(t0.elapsed()));
        }
    }
    let writes = store.vm_writes(agent);
    if writes != before.wrapping_add(ours) {
        settled = false;
    }
    Ok(Some(Applied { settled, writes }))
}

/// A listed VM's state as the site records it.
fn state_of(rec: &VmRecord) -> String {
    format!("{:?}", rec.vm.state).to_lowercase()
}

/// Brings the site's record of one VM agent `agent` lists in line with it.
/// VMs that jobs are working on are left to those jobs, and records written
/// after the listing was taken (`listed_at`) are newer than it: kept as they
/// are. A VM the site has no record of is adopted, unless it turned up here
/// from another agent (a migration whose job was cut off, or one made outside
/// gve): that record, owner and lease follow it once the other agent misses it,
/// when it is the same VM (`same_vm`: its id is a UUID, or both agents reach
/// the same endpoint). A listed VM whose site id a record already holds is left
/// alone, never replaced by a stray. Whether the record now agrees.
fn sync_listed(
    t: &mut super::store::Txn<'_>,
    agent: &str,
    same_vm: &dyn Fn(&str, &SiteVm) -> bool,
    rec: &VmRecord,
    listed_at: u64,
) -> Result<bool, StoreError> {
    let vm = &rec.vm;
    let state = state_of(rec);
    let now = now_ms();
    // Records by the hypervisor's id of the VM: this agent's, and others'.
    let (mine, others): (Vec<SiteVm>, Vec<SiteVm>) = t
        .vms_by_agent_vm(&vm.id)?
        .into_iter()
        .partition(|v| v.agent == agent);
    if let Some(known) = mine.into_iter().next() {
        let differs = known.state != state || known.name != vm.name;
        if !differs {
            return Ok(true);
        }
        if known.updated_ms >= listed_at {
            return Ok(false);
        }
        let mut k = known;
        if k.state != state {
            k.ready = false;
        }
        k.state = state;
        k.name = vm.name.clone();
        k.updated_ms = now;
        t.put_vm(&k)?;
        return Ok(true);
    }
    // Being created or cloned by a job, or migrating in under a job: not ours
    // to add (the job records it, with its owner). What jobs not yet ended work
    // on is asked of the active-job indexes VM by VM.
    let made_by_active = match vm.labels.get("gve.job") {
        Some(j) => t.job_active(j)?,
        None => false,
    } || t.cloning_to(agent, &vm.name)?;
    // Records on other agents that may be this VM (never one only sharing an
    // id it has elsewhere).
    let elsewhere: Vec<SiteVm> = others.into_iter().filter(|v| same_vm(&vm.id, v)).collect();
    let mut elsewhere_busy = false;
    for v in &elsewhere {
        elsewhere_busy |= t.vm_busy(&v.id)?;
    }
    if made_by_active || elsewhere_busy {
        return Ok(false);
    }
    if let Some(moved) = elsewhere.first() {
        // Known on another agent: it moved once that agent misses it; until
        // then (or while both list it) the record stays put.
        if moved.state == MISSING && moved.updated_ms < listed_at {
            tracing::warn!(
                vm = moved.id,
                from = moved.agent,
                to = agent,
                "VM turned up on another agent; its record follows it"
            );
            let mut m = moved.clone();
            m.agent = agent.to_string();
            m.name = vm.name.clone();
            m.state = state;
            m.ready = false;
            m.updated_ms = now;
            t.put_vm(&m)?;
            return Ok(true);
        }
        return Ok(false);
    }
    // A record already holding the id this VM would get (one that started here
    // under this hypervisor id, and moved or is being moved, or an id the
    // hypervisor gave again) is never replaced: it may be a tenant's. Left for
    // a later listing.
    if t.vm(&site_vm_id(agent, &vm.id))?.is_some() {
        return Ok(false);
    }
    t.put_vm(&SiteVm {
        id: site_vm_id(agent, &vm.id),
        agent: agent.to_string(),
        agent_vm: vm.id.clone(),
        name: vm.name.clone(),
        owner: None,
        logical_cpus: vm.logical_cpus,
        main_memory_mib: vm.main_memory_mib,
        template: vm.labels.get("gve.template").cloned(),
        os_family: vm.os_family.clone(),
        state,
        lease: None,
        // The site installed nothing on it and did not make it: what is on its
        // disks is unknown, so it goes to no tenant.
        software: Default::default(),
        clean: false,
        ready: false,
        updated_ms: now,
    })?;
    Ok(true)
}

/// Site record `id`, of a VM agent `agent`'s listing lacks: `missing` first,
/// and forgotten when a check still misses it `forget_after_ms` later (unless
/// another agent lists it by then: it moved). A record that moved to another
/// agent since the comparison, that a job works on, or that was written after
/// the listing (`listed_at`) is left as it is.
fn sync_unlisted(
    t: &mut super::store::Txn<'_>,
    agent: &str,
    id: &str,
    listed_at: u64,
    forget_after_ms: u64,
) -> Result<(), StoreError> {
    let Some(v) = t.vm(id)?.filter(|v| v.agent == agent) else {
        return Ok(());
    };
    if v.updated_ms >= listed_at || t.vm_busy(&v.id)? {
        return Ok(());
    }
    let now = now_ms();
    if v.state == MISSING {
        if now.saturating_sub(v.updated_ms) < forget_after_ms {
            return Ok(());
        }
        tracing::warn!(
            vm = v.id,
            agent,
            "VM vanished from its agent; forgetting it"
        );
        forget_vm(t, &v)
    } else {
        tracing::warn!(
            vm = v.id,
            agent,
            "VM missing from its agent; forgotten soon unless an agent lists it"
        );
        let mut m = v;
        m.state = MISSING.into();
        m.ready = false;
        m.updated_ms = now;
        t.put_vm(&m)
    }
}

/// Whether a hypervisor's VM id names one VM wherever it turns up, so that the
/// same id on another agent is this VM moved there: a UUID (libvirt's ids, kept
/// by a migration) does. The contract promises an id stable on its own
/// hypervisor only: a managed object id (`vm-42` on vSphere, `3` on a standalone
/// ESXi, `mem-7` on the memory driver) on an agent of another endpoint is
/// another VM, never one to hand this record (and its owner) to.
fn unique_everywhere(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::parse_str(id).is_ok_and(|u| !u.is_nil() && !u.is_max())
}

#[cfg(test)]
mod tests {
    use super::unique_everywhere;

    #[test]
    fn a_longer_listing_is_read_in_full_less_often() {
        use super::full_listing_every;
        use std::time::Duration;
        let min = |m: u64| Duration::from_secs(60 * m);
        assert_eq!(full_listing_every(0), min(1));
        assert_eq!(full_listing_every(10_000), min(1));
        assert_eq!(full_listing_every(10_001), min(2));
        assert_eq!(full_listing_every(100_000), min(10));
        assert_eq!(full_listing_every(usize::MAX), min(30));
    }

    #[test]
    fn only_a_uuid_names_a_vm_on_every_agent() {
        assert!(unique_everywhere("8f0c6a3e-1b2d-4c5e-9f70-0123456789ab"));
        for scoped in [
            "vm-42",
            "3",
            "mem-7",
            "8f0c6a3e1b2d4c5e9f700123456789ab",
            "00000000-0000-0000-0000-000000000000",
            "",
        ] {
            assert!(!unique_everywhere(scoped), "{scoped}");
        }
    }
}
