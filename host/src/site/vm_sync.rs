//! Keeping the site's VM records in line with each agent's registry. A health
//! check lists an agent's VMs and [`sync_vms`] applies the listing; the agent
//! tags its listing (an entity tag that moves with every VM record it writes),
//! and [`Listings`] remembers the tag of a listing the records fully agreed
//! with, so the next check asks with `If-None-Match` and an unchanged agent
//! answers 304 instead of every VM again. A full listing is still read at
//! least every [`FULL_LISTING_EVERY`] per [`FULL_LISTING_STEP`] VMs listed
//! (see [`full_listing_every`]), after any listing that left something
//! unsettled (a VM missing, or one a job was working on), and after the site
//! wrote any of the agent's VM records itself (a job recording an operation's
//! result, a VM moved between agents): the agent's tag does not move for those.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::agents::{forget_vm, site_vm_id};
use super::model::{now_ms, SiteVm};
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

/// Brings the site's records of agent `agent`'s VMs in line with what it reports
/// (listed at `listed_at`). VMs that jobs are working on are left to those jobs, and
/// records written after the listing was taken are newer than it: kept as they are.
/// A VM the agent no longer lists is `missing` first and forgotten when a check
/// still misses it `forget_after_ms` later; one that turns up on another agent
/// meanwhile (a migration whose job was cut off, or one made outside gve) keeps
/// its record, owner and lease there when it is the same VM: its id is a UUID,
/// or both agents reach the same endpoint (`here` is this agent's). A listed VM
/// whose site id a record already holds is left alone, never replaced by a stray. Whether the records now agree with the
/// listing (nothing missing, nothing left to a job or to a later listing).
pub(super) fn sync_vms(
    t: &mut super::store::Txn<'_>,
    agent: &str,
    here: Option<&str>,
    listed: &[VmRecord],
    listed_at: u64,
    forget_after_ms: u64,
) -> Result<bool, StoreError> {
    // Whether every record agrees with the listing when this is done.
    let mut settled = true;
    // Only this agent's records are read, and records of other agents only for a
    // VM it lists that it has no record of: a check costs this agent's VMs.
    let mine: BTreeMap<String, SiteVm> = t
        .vms_of_agent(agent)?
        .into_iter()
        .map(|v| (v.agent_vm.clone(), v))
        .collect();
    // What jobs not yet ended work on is asked of the active-job indexes VM by
    // VM: a backlog of queued jobs is never read here (nor held in memory).
    // The endpoint each other agent reached at its last check, and this one's
    // now (`here`): agents on one endpoint (one vCenter) share its VM ids.
    let endpoints: HashMap<String, Option<String>> = t
        .agents()?
        .into_iter()
        .map(|a| (a.id, a.endpoint))
        .collect();
    // Whether `other`'s record of hypervisor VM `id` may be this agent's VM.
    let same_vm = |id: &str, other: &SiteVm| {
        unique_everywhere(id)
            || (here.is_some() && endpoints.get(&other.agent).and_then(|e| e.as_deref()) == here)
    };
    let now = now_ms();
    for rec in listed {
        let vm = &rec.vm;
        let state = format!("{:?}", vm.state).to_lowercase();
        match mine.get(&vm.id) {
            Some(known) => {
                let differs = known.state != state || known.name != vm.name;
                if differs && known.updated_ms >= listed_at {
                    settled = false;
                }
                if known.updated_ms < listed_at && differs {
                    let mut k = known.clone();
                    if k.state != state {
                        k.ready = false;
                    }
                    k.state = state;
                    k.name = vm.name.clone();
                    k.updated_ms = now;
                    t.put_vm(&k)?;
                }
            }
            None => {
                // Being created or cloned by a job, or migrating in under a job: not
                // ours to add (the job records it, with its owner).
                let made_by_active = match vm.labels.get("gve.job") {
                    Some(j) => t.job_active(j)?,
                    None => false,
                } || t.cloning_to(agent, &vm.name)?;
                // Records by the hypervisor's id of the VM on other agents that
                // may be this VM (never one only sharing an id it has elsewhere).
                let elsewhere: Vec<SiteVm> = t
                    .vms_by_agent_vm(&vm.id)?
                    .into_iter()
                    .filter(|v| same_vm(&vm.id, v))
                    .collect();
                let mut elsewhere_busy = false;
                for v in &elsewhere {
                    elsewhere_busy |= t.vm_busy(&v.id)?;
                }
                if made_by_active || elsewhere_busy {
                    settled = false;
                    continue;
                }
                if let Some(moved) = elsewhere.first() {
                    // Known on another agent: it moved once that agent misses it;
                    // until then (or while both list it) the record stays put.
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
                    } else {
                        settled = false;
                    }
                    continue;
                }
                // A record already holding the id this VM would get (one that
                // started here under this hypervisor id, and moved or is being
                // moved, or an id the hypervisor gave again) is never replaced:
                // it may be a tenant's. Left for a later listing.
                if t.vm(&site_vm_id(agent, &vm.id))?.is_some() {
                    settled = false;
                    continue;
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
                    // The site installed nothing on it and did not make it: what
                    // is on its disks is unknown, so it goes to no tenant.
                    software: Default::default(),
                    clean: false,
                    ready: false,
                    updated_ms: now,
                })?;
            }
        }
    }
    let present: HashSet<&str> = listed.iter().map(|r| r.vm.id.as_str()).collect();
    for (agent_vm, v) in &mine {
        if present.contains(agent_vm.as_str()) {
            continue;
        }
        // A record the listing lacks: missing now, or left to a job or to the
        // next listing; either way a later listing must look again.
        settled = false;
        if v.updated_ms >= listed_at || t.vm_busy(&v.id)? {
            continue;
        }
        if v.state == MISSING {
            if now.saturating_sub(v.updated_ms) < forget_after_ms {
                continue;
            }
            tracing::warn!(
                vm = v.id,
                agent,
                "VM vanished from its agent; forgetting it"
            );
            forget_vm(t, v)?;
        } else {
            tracing::warn!(
                vm = v.id,
                agent,
                "VM missing from its agent; forgotten soon unless an agent lists it"
            );
            let mut m = v.clone();
            m.state = MISSING.into();
            m.ready = false;
            m.updated_ms = now;
            t.put_vm(&m)?;
        }
    }
    Ok(settled)
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
