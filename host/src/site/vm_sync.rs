//! Keeping the site's VM records in line with each agent's registry. A health
//! check lists an agent's VMs, compares the listing page by page with the
//! site's records ([`Comparison`]) and applies what differs; the agent
//! tags its listing (an entity tag that moves with every VM record it writes),
//! and [`Listings`] remembers the tag of a listing the records fully agreed
//! with, so the next check asks with `If-None-Match` and an unchanged agent
//! answers 304 instead of every VM again. A full listing is still read at
//! least every [`FULL_LISTING_EVERY`] per [`FULL_LISTING_STEP`] VMs listed
//! (see [`full_listing_every`]; each agent's falls due at a random point in the
//! last quarter of that, [`trust_for`]), after any listing that left something
//! unsettled (a VM missing, or one a job was working on), and after the site
//! wrote any of the agent's VM records itself (a job recording an operation's
//! result, a VM moved between agents): the agent's tag does not move for those.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::agents::{forget_vm, site_vm_id};
use super::model::{now_ms, AgentRec, AgentStatus, SiteVm};
use super::store::StoreError;
use serde::Deserialize;

use crate::agent::model::{VmRecord, VmState};

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

/// How long one settled listing of `vms` VMs is trusted: a random share between
/// three quarters and all of [`full_listing_every`], drawn anew for each listing,
/// so that agents registered together (a site's start, a batch of hosts) do not
/// have their full reads fall due together and spend a core at once; the longest
/// a listing goes unread stays [`full_listing_every`].
pub fn trust_for(vms: usize) -> Duration {
    let whole = full_listing_every(vms);
    // A v4 UUID's first six bytes are random (its version and variant bits
    // come later): 48 bits, as a fraction in [0, 1).
    let b = uuid::Uuid::new_v4().into_bytes();
    let r = b[..6].iter().fold(0u64, |acc, x| acc << 8 | u64::from(*x));
    let share = 0.75 + 0.25 * (r as f64 / (1u64 << 48) as f64);
    whole.mul_f64(share).min(whole)
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

/// Per agent, the tag of the last listing the site's records agreed with,
/// and when its last listing applied (or answered unchanged) was taken.
#[derive(Default)]
pub struct Listings {
    marks: Mutex<HashMap<String, Mark>>,
    taken: Mutex<HashMap<String, u64>>,
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
                let trusted = trust_for(vms);
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
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(agent);
    }

    /// Records that agent `agent`'s listing taken at `at` (Unix ms) was applied,
    /// or answered unchanged: every VM it had then is known to the site.
    pub fn taken(&self, agent: &str, at: u64) {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let t = taken.entry(agent.to_string()).or_default();
        *t = (*t).max(at);
    }

    /// When a `missing` VM record may be forgotten: after `after_ms`, and
    /// once every other agent up has had a listing taken since (see [`Forgetting`]).
    pub fn forgetting(&self, after_ms: u64) -> Forgetting {
        Forgetting {
            after_ms,
            taken: self.taken.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// State of a VM record whose agent no longer lists it: forgotten when checks
/// still miss it a while later, unless another agent lists it by then (it moved).
pub const MISSING: &str = "missing";

/// When a `missing` VM record is forgotten: once it has been missing at
/// least `after_ms`, and every other agent that is up has had a listing
/// taken after it went missing and applied (`taken`: per agent, when its
/// last such listing was taken, Unix ms; an agent with none holds it back).
/// A VM that moved to one of them is then claimed there first, however long
/// its check waited for its turn or took to apply a long listing.
#[derive(Debug, Clone, Default)]
pub struct Forgetting {
    /// The least time a record stays `missing`, ms.
    pub after_ms: u64,
    /// Per agent, when its last listing applied or answered unchanged was taken.
    pub taken: HashMap<String, u64>,
}

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

/// What the site reads of one VM in an agent's listing: the part of the
/// agent's [`VmRecord`] its records follow, decoded from the same JSON (the
/// rest of each record is skipped, not held: a check of 100,000 VMs keeps
/// what it compares by, not every address and label).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Listed {
    /// The VM as the hypervisor reports it.
    pub vm: ListedVm,
}

/// The fields of a listed [`crate::agent::model::Vm`] the site records.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ListedVm {
    /// Id on the hypervisor.
    pub id: String,
    /// Name.
    pub name: String,
    /// Power state.
    pub state: VmState,
    /// GLUE2 LogicalCPUs.
    pub logical_cpus: u32,
    /// GLUE2 MainMemorySize (MiB).
    pub main_memory_mib: u64,
    /// GLUE2 OSFamily.
    pub os_family: Option<String>,
    /// The labels gve sets.
    #[serde(default)]
    pub labels: ListedLabels,
}

/// The labels of a listed VM the site reads (others are skipped).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ListedLabels {
    /// `gve.job`: the job that made it.
    #[serde(rename = "gve.job")]
    pub job: Option<String>,
    /// `gve.template`: the template it was made from.
    #[serde(rename = "gve.template")]
    pub template: Option<String>,
}

impl From<&VmRecord> for Listed {
    fn from(r: &VmRecord) -> Listed {
        let label = |k: &str| r.vm.labels.get(k).cloned();
        Listed {
            vm: ListedVm {
                id: r.vm.id.clone(),
                name: r.vm.name.clone(),
                state: r.vm.state,
                logical_cpus: r.vm.logical_cpus,
                main_memory_mib: r.vm.main_memory_mib,
                os_family: r.vm.os_family.clone(),
                labels: ListedLabels {
                    job: label("gve.job"),
                    template: label("gve.template"),
                },
            },
        }
    }
}

/// A VM the listing and the site's records disagree on.
enum Differs {
    /// Listed, and the site's record of it is missing or says otherwise.
    Listed(Listed),
    /// The site's record (by id) of a VM the listing lacks.
    Unlisted(String),
}

/// What a comparison keeps of one site record: what it is compared by, and
/// whether the listing had it.
struct Known {
    id: Box<str>,
    state: Box<str>,
    name: Box<str>,
    listed: bool,
}

/// An agent's listing compared, page by page as it is read, with the site's
/// records of the agent's VMs, then applied ([`Comparison::apply`]). It holds
/// what each record is compared by and the listed VMs that disagree, not the
/// records nor the listing (a restarted site checks agents of 100,000 VMs).
pub struct Comparison {
    /// The agent's id.
    agent: String,
    /// The URL and registration time of the registration the listing is read
    /// from.
    url: String,
    registered_ms: u64,
    /// The agent's VM-record write count before the records were read.
    before: u64,
    /// The records, by the hypervisor's VM id.
    known: HashMap<Box<str>, Known>,
    differs: Vec<Differs>,
    listed: usize,
}

impl Comparison {
    /// Reads the site's records of agent `agent`'s VMs, to compare its
    /// listing with; `None` when the agent is no longer registered at `url` as
    /// of `registered_ms` (the URL it is listed from, registered then: not an
    /// agent registered again under its id meanwhile).
    pub fn begin(
        store: &super::store::Store,
        agent: &str,
        url: &str,
        registered_ms: u64,
    ) -> Result<Option<Comparison>, StoreError> {
        // The count of writes made before the records are read, read under
        // the write lock: a write counted but not committed yet would otherwise
        // be taken as seen by the comparison (and a record it changed as agreeing).
        let (mut before, mut same) = (0, false);
        store.write_if(|t| {
            before = t.vm_writes(agent);
            same = t
                .agent(agent)?
                .is_some_and(|r| same_registration(&r, url, registered_ms));
            Ok(None::<()>)
        })?;
        if !same {
            return Ok(None);
        }
        // Only this agent's records are read: a check costs this agent's VMs.
        let mut known = HashMap::new();
        store.each_vm_of_agent(agent, |v| {
            known.insert(
                v.agent_vm.into_boxed_str(),
                Known {
                    id: v.id.into_boxed_str(),
                    state: v.state.into_boxed_str(),
                    name: v.name.into_boxed_str(),
                    listed: false,
                },
            );
        })?;
        Ok(Some(Comparison {
            agent: agent.to_string(),
            url: url.to_string(),
            registered_ms,
            before,
            known,
            differs: Vec::new(),
            listed: 0,
        }))
    }

    /// Compares one page of the listing, keeping the VMs that disagree.
    pub fn page(&mut self, page: Vec<Listed>) {
        self.listed += page.len();
        for rec in page {
            let agrees = match self.known.get_mut(rec.vm.id.as_str()) {
                Some(k) => {
                    k.listed = true;
                    *k.state == *state_of(rec.vm.state) && *k.name == *rec.vm.name
                }
                None => false,
            };
            if !agrees {
                self.differs.push(Differs::Listed(rec));
            }
        }
    }

    /// Whether agent record `r` is the registration compared with.
    fn is(&self, r: &AgentRec) -> bool {
        r.id == self.agent && same_registration(r, &self.url, self.registered_ms)
    }

    /// How many VMs the listing had so far.
    pub fn listed(&self) -> usize {
        self.listed
    }

    /// Brings the site's records in line with the listing (taken at
    /// `listed_at`): only the VMs they disagree on are written, in
    /// transactions of at most [`SYNC_BATCH`], each deciding on the records as
    /// they are then (see [`sync_listed`] and [`sync_unlisted`]); `registered`
    /// is the agent's record as this check wrote it (its endpoint now). `None`
    /// when the agent is no longer the registration compared with. Settled
    /// only when no other writer wrote one of the agent's records meanwhile
    /// (what it wrote was not compared with the listing).
    pub fn apply(
        self,
        store: &super::store::Store,
        registered: &AgentRec,
        listed_at: u64,
        forgetting: &Forgetting,
    ) -> Result<Option<Applied>, StoreError> {
        // `registered` is the record this check wrote, of the registration
        // compared with; a caller's mistake otherwise.
        if !self.is(registered) {
            return Ok(None);
        }
        let Comparison {
            before,
            known,
            mut differs,
            ..
        } = self;
        let agent = registered.id.as_str();
        let (url, registered_ms) = (registered.url.as_str(), registered.registered_ms);
        // The endpoint this agent reached at this check.
        let here = registered.endpoint.as_deref();
        let mut settled = true;
        for k in known.into_values().filter(|k| !k.listed) {
            // Missing now, or left to a job or to the next listing; either way a
            // later listing must look again.
            settled = false;
            differs.push(Differs::Unlisted(k.id.into()));
        }
        let mut ours = 0u64;
        let batches = differs.len().div_ceil(SYNC_BATCH);
        // Each batch is dropped once written (a first check's is every VM).
        let mut rest = differs.into_iter();
        for i in 0..batches {
            if i > 0 && store.stopping() {
                return Ok(Some(Applied {
                    settled: false,
                    writes: store.vm_writes(agent),
                }));
            }
            let batch: Vec<Differs> = rest.by_ref().take(SYNC_BATCH).collect();
            let t0 = Instant::now();
            let done = store.write_lazy(|t| {
                if !t
                    .agent(agent)?
                    .is_some_and(|r| same_registration(&r, url, registered_ms))
                {
                    return Ok(None);
                }
                let w0 = t.vm_writes(agent);
                let agents = t.agents()?;
                // The endpoint each other agent reached at its last check, and this
                // one's now (`here`): agents on one endpoint (one vCenter) share
                // its VM ids.
                let endpoints: HashMap<&str, Option<&str>> = agents
                    .iter()
                    .map(|a| (a.id.as_str(), a.endpoint.as_deref()))
                    .collect();
                let same_vm = |id: &str, other: &SiteVm| {
                    unique_everywhere(id)
                        || (here.is_some()
                            && endpoints.get(other.agent.as_str()).copied().flatten() == here)
                };
                // Since when every other agent up has had a listing applied.
                let others_since = agents
                    .iter()
                    .filter(|a| a.id != agent && a.status == AgentStatus::Up)
                    .map(|a| forgetting.taken.get(&a.id).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(u64::MAX);
                let mut agreed = true;
                for d in &batch {
                    agreed &= match d {
                        Differs::Listed(rec) => {
                            sync_listed(t, agent, &same_vm, &rec.vm, listed_at)?
                        }
                        Differs::Unlisted(id) => {
                            let forget = |missing_since: u64| {
                                now_ms().saturating_sub(missing_since) >= forgetting.after_ms
                                    && others_since > missing_since
                            };
                            sync_unlisted(t, agent, id, listed_at, &forget)?;
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
            if i + 1 < batches {
                std::thread::sleep(sync_pause(t0.elapsed()));
            }
        }
        // Nothing to write is applied too, to the registration compared with only.
        if batches == 0
            && !store
                .agent(agent)?
                .is_some_and(|r| same_registration(&r, url, registered_ms))
        {
            return Ok(None);
        }
        let writes = store.vm_writes(agent);
        if writes != before.wrapping_add(ours) {
            settled = false;
        }
        Ok(Some(Applied { settled, writes }))
    }
}

/// Whether agent record `r` is the registration at `url` made at `registered_ms`
/// (not one made again under the same id meanwhile).
fn same_registration(r: &AgentRec, url: &str, registered_ms: u64) -> bool {
    r.url == url && r.registered_ms == registered_ms
}

/// Brings the site's records of agent `registered`'s VMs in line with a whole
/// listing at once ([`Comparison`] over one page).
pub fn apply_listing(
    store: &super::store::Store,
    registered: &AgentRec,
    listed: Vec<Listed>,
    listed_at: u64,
    forgetting: &Forgetting,
) -> Result<Option<Applied>, StoreError> {
    let r = registered;
    let Some(mut c) = Comparison::begin(store, &r.id, &r.url, r.registered_ms)? else {
        return Ok(None);
    };
    c.page(listed);
    c.apply(store, registered, listed_at, forgetting)
}

/// A listed VM's state as the site records it.
fn state_of(state: VmState) -> &'static str {
    match state {
        VmState::Running => "running",
        VmState::Stopped => "stopped",
        VmState::Suspended => "suspended",
        VmState::Paused => "paused",
        VmState::Crashed => "crashed",
        VmState::Migrating => "migrating",
        VmState::Unknown => "unknown",
    }
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
    vm: &ListedVm,
    listed_at: u64,
) -> Result<bool, StoreError> {
    let state = state_of(vm.state);
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
        k.state = state.to_string();
        k.name = vm.name.clone();
        k.updated_ms = now;
        t.put_vm(&k)?;
        return Ok(true);
    }
    // Being created or cloned by a job, or migrating in under a job: not ours
    // to add (the job records it, with its owner). What jobs not yet ended work
    // on is asked of the active-job indexes VM by VM.
    let made_by_active = match &vm.labels.job {
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
            m.state = state.to_string();
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
        template: vm.labels.template.clone(),
        os_family: vm.os_family.clone(),
        state: state.to_string(),
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
/// and forgotten when a check still misses it once `forget` says of the time
/// it went missing (unless another agent listed it by then: it moved). A record that moved to another
/// agent since the comparison, that a job works on, or that was written after
/// the listing (`listed_at`) is left as it is.
fn sync_unlisted(
    t: &mut super::store::Txn<'_>,
    agent: &str,
    id: &str,
    listed_at: u64,
    forget: &dyn Fn(u64) -> bool,
) -> Result<(), StoreError> {
    let Some(v) = t.vm(id)?.filter(|v| v.agent == agent) else {
        return Ok(());
    };
    if v.updated_ms >= listed_at || t.vm_busy(&v.id)? {
        return Ok(());
    }
    let now = now_ms();
    if v.state == MISSING {
        if !forget(v.updated_ms) {
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
    fn agents_listed_together_fall_due_apart_and_never_past_the_period() {
        use super::{full_listing_every, trust_for};
        let whole = full_listing_every(100_000);
        let trusts: Vec<_> = (0..200).map(|_| trust_for(100_000)).collect();
        for t in &trusts {
            assert!(
                *t >= whole.mul_f64(0.75) && *t <= whole,
                "{t:?} of {whole:?}"
            );
        }
        let (lo, hi) = (trusts.iter().min().unwrap(), trusts.iter().max().unwrap());
        // The draws cover the whole last quarter: 200 uniform draws miss its first
        // or its last fifth with a chance of 2 * 0.8^200, about 1e-19.
        assert!(*lo < whole.mul_f64(0.80), "{lo:?} of {whole:?}");
        assert!(*hi > whole.mul_f64(0.95), "{hi:?} of {whole:?}");
    }

    #[test]
    fn a_listed_vm_is_read_from_the_agents_record_as_it_serializes() {
        use super::Listed;
        use crate::agent::model::{Vm, VmRecord, VmState};
        let vm = Vm {
            id: "8f0c6a3e-1b2d-4c5e-9f70-0123456789ab".into(),
            name: "web-1".into(),
            state: VmState::Suspended,
            host: "h1".into(),
            addresses: vec!["10.0.0.5".into()],
            logical_cpus: 3,
            main_memory_mib: 1536,
            disk_mib: Some(4096),
            platform: Some("x86_64".into()),
            os_family: Some("linux".into()),
            os_name: Some("debian".into()),
            is_template: false,
            labels: [
                ("gve.job", "job-7"),
                ("gve.template", "tiny"),
                ("owner-note", "x"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        };
        let rec = VmRecord {
            vm,
            allocation: Default::default(),
            seen_ms: 42,
            provisioned: Default::default(),
        };
        let json = serde_json::to_vec(&rec).unwrap();
        let listed: Listed = serde_json::from_slice(&json).unwrap();
        assert_eq!(listed, Listed::from(&rec));
        assert_eq!(listed.vm.labels.job.as_deref(), Some("job-7"));
        assert_eq!(listed.vm.labels.template.as_deref(), Some("tiny"));
        assert_eq!(listed.vm.state, VmState::Suspended);
        assert_eq!(
            (listed.vm.logical_cpus, listed.vm.main_memory_mib),
            (3, 1536)
        );
        // Without gve's labels: none read.
        let mut bare = rec.clone();
        bare.vm.labels.clear();
        let listed: Listed = serde_json::from_slice(&serde_json::to_vec(&bare).unwrap()).unwrap();
        assert_eq!(
            (listed.vm.labels.job, listed.vm.labels.template),
            (None, None)
        );
    }

    #[test]
    fn every_listed_state_is_recorded_by_its_name() {
        use crate::agent::model::VmState::*;
        for s in [
            Running, Stopped, Suspended, Paused, Crashed, Migrating, Unknown,
        ] {
            let json = serde_json::to_value(s).unwrap();
            assert_eq!(super::state_of(s), json.as_str().unwrap());
        }
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
