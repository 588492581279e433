//! The site's API and database types (plain serde structs). VM profiles and host
//! capacity use GLUE 2.0 ExecutionEnvironment terms (LogicalCPUs, MainMemorySize,
//! OSFamily, OSName, Platform), extended for VMs as the paper extended GLUE 1.3:
//! a template to derive from, software to provision, a lease.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::agent::model::{now_ms, AuditEntry, OpError};

/// What a user may do. Written and read as its name; a name this release does not
/// know (a role added by a later release, read after a downgrade, or by an older
/// CLI) is kept as [`Role::Other`], grants nothing, and is written back unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Manages users, agents and every VM and job.
    Admin,
    /// Manages their own VMs and jobs.
    User,
    /// A scraper's credential: reads `/metrics`, `/v1/glue2` and its own record and
    /// rotates its own token; nothing else, and holds no quota.
    Monitor,
    /// A role this release does not know, by its name: no route is open to it.
    Other(String),
}

impl Role {
    /// The roles this release grants, by name (what a new user may be given).
    pub const KNOWN: [&'static str; 3] = ["admin", "user", "monitor"];

    /// The role's name.
    pub fn as_str(&self) -> &str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Monitor => "monitor",
            Role::Other(name) => name,
        }
    }

    /// The role named `name`; a name not known here is [`Role::Other`].
    pub fn from_name(name: &str) -> Role {
        match name {
            "admin" => Role::Admin,
            "user" => Role::User,
            "monitor" => Role::Monitor,
            other => Role::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        Ok(Role::from_name(&String::deserialize(d)?))
    }
}

/// Limits on what one user holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Quota {
    /// Virtual CPUs (GLUE2 LogicalCPUs summed over the user's VMs).
    pub logical_cpus: u64,
    /// Memory, MiB (GLUE2 MainMemorySize summed).
    pub main_memory_mib: u64,
    /// VMs.
    pub vms: u64,
}

pub use crate::agent::model::{MAX_VM_CPUS, MAX_VM_MEMORY_MIB};
/// Largest quota on vCPUs and on VMs.
pub const MAX_QUOTA_COUNT: u64 = 1 << 20;
/// Largest quota on memory, MiB.
pub const MAX_QUOTA_MEMORY_MIB: u64 = 1 << 40;

impl Quota {
    /// Checks each value against its range (a 400 naming the field).
    pub fn validate(&self) -> Result<(), crate::api::ApiError> {
        use crate::api::in_range;
        in_range("logical-cpus", self.logical_cpus, 0, MAX_QUOTA_COUNT)?;
        in_range(
            "main-memory-mib",
            self.main_memory_mib,
            0,
            MAX_QUOTA_MEMORY_MIB,
        )?;
        in_range("vms", self.vms, 0, MAX_QUOTA_COUNT)?;
        Ok(())
    }
}

impl Default for Quota {
    fn default() -> Quota {
        Quota {
            logical_cpus: 16,
            main_memory_mib: 32 * 1024,
            vms: 8,
        }
    }
}

/// What a user holds or has reserved for jobs in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Usage {
    /// Virtual CPUs.
    pub logical_cpus: u64,
    /// Memory, MiB.
    pub main_memory_mib: u64,
    /// VMs.
    pub vms: u64,
}

impl Usage {
    /// One VM of `cpus` and `mib`.
    pub fn vm(cpus: u64, mib: u64) -> Usage {
        Usage {
            logical_cpus: cpus,
            main_memory_mib: mib,
            vms: 1,
        }
    }

    /// `self + other`; `None` on overflow.
    pub fn plus(self, o: Usage) -> Option<Usage> {
        Some(Usage {
            logical_cpus: self.logical_cpus.checked_add(o.logical_cpus)?,
            main_memory_mib: self.main_memory_mib.checked_add(o.main_memory_mib)?,
            vms: self.vms.checked_add(o.vms)?,
        })
    }

    /// `self - other`; `None` when `other` holds more than `self` of anything.
    pub fn minus(self, o: Usage) -> Option<Usage> {
        Some(Usage {
            logical_cpus: self.logical_cpus.checked_sub(o.logical_cpus)?,
            main_memory_mib: self.main_memory_mib.checked_sub(o.main_memory_mib)?,
            vms: self.vms.checked_sub(o.vms)?,
        })
    }

    /// What in `self` exceeds `q`, as a sentence; `None` when within.
    pub fn exceeds(&self, q: &Quota) -> Option<String> {
        let mut over = Vec::new();
        if self.vms > q.vms {
            over.push(format!("{} VMs (quota {})", self.vms, q.vms));
        }
        if self.logical_cpus > q.logical_cpus {
            over.push(format!(
                "{} vCPUs (quota {})",
                self.logical_cpus, q.logical_cpus
            ));
        }
        if self.main_memory_mib > q.main_memory_mib {
            over.push(format!(
                "{} MiB of memory (quota {})",
                self.main_memory_mib, q.main_memory_mib
            ));
        }
        (!over.is_empty()).then(|| over.join(", "))
    }
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct User {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// SHA-256 of the bearer token (the token itself is shown once, at creation).
    pub token_sha256: String,
    /// Quota.
    pub quota: Quota,
    /// Created at (Unix ms).
    pub created_ms: u64,
}

/// A user as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct UserView {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Quota.
    pub quota: Quota,
    /// Held and reserved now.
    pub usage: Usage,
    /// The bearer token: only in the answer that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Whether the site can reach an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentStatus {
    /// Answered its last health check.
    Up,
    /// Did not: its VMs' state is unknown.
    Down,
}

/// An agent as stored (its secret included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentRec {
    /// Id chosen by the admin.
    pub id: String,
    /// Base URL.
    pub url: String,
    /// The agent's secret (its admin token), sealed under the site's key
    /// ([`crate::sealing`]): the site authenticates with it.
    pub token: String,
    /// Reachable or not.
    pub status: AgentStatus,
    /// Why it is down.
    pub error: Option<String>,
    /// Last successful health check (Unix ms).
    pub seen_ms: u64,
    /// Its host's capacity at the last check.
    pub host: Option<crate::agent::model::Host>,
    /// Template names it offers.
    pub templates: Vec<String>,
    /// Where VMs migrating to it are sent (its driver endpoint, or the migration
    /// URI its config names).
    pub endpoint: Option<String>,
    /// Registered at (Unix ms).
    pub registered_ms: u64,
    /// For an `https://` agent: the SHA-256 fingerprint of its certificate.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// What each template it offers is (GLUE 2 publication reads it).
    #[serde(default)]
    pub offers: Vec<TemplateOffer>,
    /// The agent's instance id at registration ([`super::agent_twin`]); none
    /// from an agent or a record older than them.
    #[serde(default)]
    pub instance: Option<String>,
}

impl AgentRec {
    /// Agent `id` at `url` (no trailing `/`), registered now with `token`
    /// (sealed) and certificate `fingerprint`; down until its first check.
    pub fn registered(id: &str, url: &str, token: String, fingerprint: Option<String>) -> AgentRec {
        AgentRec {
            id: id.to_string(),
            url: url.trim_end_matches('/').to_string(),
            token,
            status: AgentStatus::Down,
            error: Some("not checked yet".into()),
            seen_ms: 0,
            host: None,
            templates: Vec::new(),
            endpoint: None,
            registered_ms: now_ms(),
            fingerprint,
            offers: Vec::new(),
            instance: None,
        }
    }
}

/// A template an agent offers, as the site publishes it (GLUE 2 ExecutionEnvironment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TemplateOffer {
    /// Template name (what `template` in a request names).
    pub name: String,
    /// vCPUs of a VM made from it unless the request says.
    pub logical_cpus: u32,
    /// Memory of a VM made from it unless the request says, MiB.
    pub main_memory_mib: u64,
    /// Disk size, MiB, when known.
    pub disk_mib: Option<u64>,
    /// GLUE 2 Platform (`x86_64`, ...), when known.
    pub platform: Option<String>,
    /// Operating system family or distribution (`linux`, `debian`, ...), when known.
    pub os_family: Option<String>,
    /// Operating system name, when known.
    pub os_name: Option<String>,
    /// Operating system version (label `os-version`), when known.
    pub os_version: Option<String>,
}

impl From<&crate::agent::model::Vm> for TemplateOffer {
    fn from(t: &crate::agent::model::Vm) -> TemplateOffer {
        TemplateOffer {
            name: t.name.clone(),
            logical_cpus: t.logical_cpus,
            main_memory_mib: t.main_memory_mib,
            disk_mib: t.disk_mib,
            platform: t.platform.clone(),
            os_family: t.os_family.clone(),
            os_name: t.os_name.clone(),
            os_version: t.labels.get("os-version").cloned(),
        }
    }
}

/// An agent as the API shows it (no secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentView {
    /// Id.
    pub id: String,
    /// URL.
    pub url: String,
    /// Up or down.
    pub status: AgentStatus,
    /// Why it is down.
    pub error: Option<String>,
    /// Last successful health check.
    pub seen_ms: u64,
    /// Capacity (GLUE2 ExecutionEnvironment of the host).
    pub host: Option<crate::agent::model::Host>,
    /// Templates.
    pub templates: Vec<String>,
    /// The agent's instance id, as it last answered it (none before its first
    /// answer, or from an agent older than instance ids).
    #[serde(default)]
    pub instance: Option<String>,
}

impl From<&AgentRec> for AgentView {
    fn from(a: &AgentRec) -> AgentView {
        AgentView {
            id: a.id.clone(),
            url: a.url.clone(),
            status: a.status,
            error: a.error.clone(),
            seen_ms: a.seen_ms,
            host: a.host.clone(),
            templates: a.templates.clone(),
            instance: a.instance.clone(),
        }
    }
}

/// A VM's allocation deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Lease {
    /// Deadline (Unix ms).
    pub until_ms: u64,
    /// Set once the deadline passed and the site stopped the VM.
    pub expired: bool,
}

/// A VM the site knows of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SiteVm {
    /// Site-wide id (stable across migrations).
    pub id: String,
    /// Agent it lives on.
    pub agent: String,
    /// Its id on that agent.
    pub agent_vm: String,
    /// Name.
    pub name: String,
    /// The user it is allocated to; none for a free VM of the pool.
    pub owner: Option<String>,
    /// GLUE2 LogicalCPUs.
    pub logical_cpus: u32,
    /// GLUE2 MainMemorySize, MiB.
    pub main_memory_mib: u64,
    /// Template it was made from, when known.
    pub template: Option<String>,
    /// GLUE2 OSFamily.
    pub os_family: Option<String>,
    /// State as last reported (`unknown` while its agent is down).
    pub state: String,
    /// Allocation deadline, while allocated.
    pub lease: Option<Lease>,
    /// Software bundles the site installed (name → digest): the site's record,
    /// never the guest's word.
    #[serde(default)]
    pub software: BTreeMap<String, String>,
    /// Made from its template by the site and never used since: the only kind of
    /// free VM a request is given (nothing of an earlier tenant is on it).
    #[serde(default)]
    pub clean: bool,
    /// Usable: running and its guest agent answered (where its agent can tell;
    /// an agent without guest operations reports running VMs ready).
    #[serde(default)]
    pub ready: bool,
    /// Last update (Unix ms).
    pub updated_ms: u64,
}

/// A request for a VM by profile (the paper's RequestVirtualMachine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmRequest {
    /// GLUE2 LogicalCPUs.
    #[serde(default = "one")]
    pub logical_cpus: u32,
    /// GLUE2 MainMemorySize, MiB.
    #[serde(default = "default_mib")]
    pub main_memory_mib: u64,
    /// Template to derive from.
    #[serde(default)]
    pub template: Option<String>,
    /// GLUE2 OSFamily wanted (matched against free VMs).
    #[serde(default)]
    pub os_family: Option<String>,
    /// Software bundles that must be installed.
    #[serde(default)]
    pub software: Vec<String>,
    /// Lease length, seconds (the site's default when absent; at most its maximum).
    #[serde(default)]
    pub lease_seconds: Option<u64>,
    /// Name for a new VM (generated when absent).
    #[serde(default)]
    pub name: Option<String>,
    /// Start an existing VM (free, or already the caller's) instead of matching.
    #[serde(default)]
    pub vm: Option<String>,
    /// End the job only once the VM is `ready` (its guest agent answers, at most
    /// the site's `ready-timeout-seconds`); `false`: as soon as it runs.
    #[serde(default = "yes")]
    pub wait_for_guest: bool,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

fn default_mib() -> u64 {
    512
}

impl VmRequest {
    /// Checks every value against its range and grammar (a 400 naming the field);
    /// the lease is checked against the site's maximum by the caller.
    pub fn validate(&self) -> Result<(), crate::api::ApiError> {
        use crate::api::in_range;
        use crate::site::auth::validate_id;
        in_range("logical-cpus", self.logical_cpus, 1, MAX_VM_CPUS)?;
        in_range(
            "main-memory-mib",
            self.main_memory_mib,
            1,
            MAX_VM_MEMORY_MIB,
        )?;
        if let Some(t) = &self.template {
            validate_name("template", t)?;
        }
        if let Some(o) = &self.os_family {
            validate_name("os-family", o)?;
        }
        if self.software.len() > 32 {
            return Err(crate::api::ApiError::bad_request(format!(
                "software names at most 32 bundles, not {}",
                self.software.len()
            )));
        }
        for b in &self.software {
            validate_id("software bundle", b)?;
        }
        if let Some(n) = &self.name {
            validate_id("VM name", n)?;
        }
        if let Some(v) = &self.vm {
            validate_name("vm", v)?;
        }
        Ok(())
    }
}

/// Checks a name taken from a request (a template, an OS family, a VM id): 1-128
/// printable ASCII characters without `/`, `\\` or spaces, so it is safe in paths,
/// headers, logs and labels.
pub fn validate_name(field: &str, v: &str) -> Result<(), crate::api::ApiError> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(crate::api::ApiError::bad_request(format!(
            "{field} must be 1-128 printable ASCII characters without '/', '\\' or spaces"
        )))
    }
}

/// Kinds of jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Get a VM by profile (reuse a free one or create one) and start it.
    Request,
    /// Power on.
    Start,
    /// Shut down.
    Shutdown,
    /// Suspend.
    Suspend,
    /// Resume.
    Resume,
    /// Move to another agent.
    Migrate,
    /// Copy a VM.
    Clone,
    /// Run a command in the guest.
    Exec,
    /// Install a software bundle.
    Provision,
    /// Give the VM back (stop it; pool or destroy by site policy).
    Release,
    /// Stop a VM whose lease ran out.
    Expire,
    /// Copy a staged file into the guest.
    CopyIn,
    /// Copy a guest file out to staging.
    CopyOut,
}

impl JobKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Request => "request",
            JobKind::Start => "start",
            JobKind::Shutdown => "shutdown",
            JobKind::Suspend => "suspend",
            JobKind::Resume => "resume",
            JobKind::Migrate => "migrate",
            JobKind::Clone => "clone",
            JobKind::Exec => "exec",
            JobKind::Provision => "provision",
            JobKind::Release => "release",
            JobKind::Expire => "expire",
            JobKind::CopyIn => "copy-in",
            JobKind::CopyOut => "copy-out",
        }
    }
}

/// Where a job is (the paper's JobState).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Accepted, waiting for a runner.
    Queued,
    /// Being worked on.
    Running,
    /// Done; the result is ready.
    Succeeded,
    /// Ended with a typed error.
    Failed,
    /// Cancelled before it ran.
    Cancelled,
}

impl JobState {
    /// Its name, as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// An asynchronous job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Job {
    /// Id.
    pub id: String,
    /// The user it runs for.
    pub owner: String,
    /// What it does.
    pub kind: JobKind,
    /// The site VM it acts on (for request: once chosen).
    pub vm: Option<String>,
    /// Its arguments.
    pub params: serde_json::Value,
    /// Where it is.
    pub state: JobState,
    /// Progress a restarted site resumes from (agent, agent operation, ...).
    #[serde(default)]
    pub step: serde_json::Value,
    /// Quota held for it while it runs (request).
    #[serde(default)]
    pub reserved: Usage,
    /// What it produced.
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<OpError>,
    /// Submitted at (Unix ms).
    pub created_ms: u64,
    /// Last change (Unix ms).
    pub updated_ms: u64,
}

/// One change of a job, in order: what the event stream carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobEvent {
    /// Sequence number (site-wide, increasing).
    pub seq: u64,
    /// Job id.
    pub job: String,
    /// Owner (events are shown to the owner and admins only).
    pub owner: String,
    /// State after the change.
    pub state: JobState,
    /// What happened.
    pub message: String,
    /// When (Unix ms).
    pub at_ms: u64,
}
