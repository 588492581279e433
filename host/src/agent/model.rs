//! The agent's API and registry types (plain serde structs), and their conversions
//! from and to the contract's generated types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plugin::bindings::types as wit;

/// Power state of a VM (the contract's `vm-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Running.
    Running,
    /// Powered off.
    Stopped,
    /// Suspended by the hypervisor.
    Suspended,
    /// vCPUs paused.
    Paused,
    /// Crashed.
    Crashed,
    /// Being migrated.
    Migrating,
    /// Not known (hypervisor unreachable, or an unknown state).
    Unknown,
}

impl From<wit::VmState> for VmState {
    fn from(s: wit::VmState) -> VmState {
        match s {
            wit::VmState::Running => VmState::Running,
            wit::VmState::Stopped => VmState::Stopped,
            wit::VmState::Suspended => VmState::Suspended,
            wit::VmState::Paused => VmState::Paused,
            wit::VmState::Crashed => VmState::Crashed,
            wit::VmState::Migrating => VmState::Migrating,
            wit::VmState::Unknown => VmState::Unknown,
        }
    }
}

/// A VM or template as the agent reports it (GLUE 2.0 ExecutionEnvironment terms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Vm {
    /// Id on the hypervisor.
    pub id: String,
    /// Name.
    pub name: String,
    /// Power state.
    pub state: VmState,
    /// Host it runs on.
    pub host: String,
    /// Known IP addresses.
    pub addresses: Vec<String>,
    /// GLUE2 LogicalCPUs.
    pub logical_cpus: u32,
    /// GLUE2 MainMemorySize (MiB).
    pub main_memory_mib: u64,
    /// Disk size (MiB), when known.
    pub disk_mib: Option<u64>,
    /// GLUE2 Platform.
    pub platform: Option<String>,
    /// GLUE2 OSFamily.
    pub os_family: Option<String>,
    /// GLUE2 OSName.
    pub os_name: Option<String>,
    /// Template (cannot be started).
    pub is_template: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl From<wit::VmInfo> for Vm {
    fn from(v: wit::VmInfo) -> Vm {
        Vm {
            id: v.id,
            name: v.name,
            state: v.state.into(),
            host: v.host,
            addresses: v.addresses,
            logical_cpus: v.resources.logical_cpus,
            main_memory_mib: v.resources.main_memory_mib,
            disk_mib: v.resources.disk_mib,
            platform: v.platform,
            os_family: v.os_family,
            os_name: v.os_name,
            is_template: v.is_template,
            labels: v.labels.into_iter().map(|l| (l.key, l.value)).collect(),
        }
    }
}

/// What a user asks for (GLUE 2.0 ExecutionEnvironment, extended for VMs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Profile {
    /// VM name.
    pub name: String,
    /// GLUE2 LogicalCPUs.
    #[serde(default = "one")]
    pub logical_cpus: u32,
    /// GLUE2 MainMemorySize (MiB).
    #[serde(default = "default_memory")]
    pub main_memory_mib: u64,
    /// Root disk size (MiB).
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// Template to derive from.
    #[serde(default)]
    pub template: Option<String>,
    /// Disk image when no template is used.
    #[serde(default)]
    pub image: Option<String>,
    /// GLUE2 OSFamily.
    #[serde(default)]
    pub os_family: Option<String>,
    /// GLUE2 OSName.
    #[serde(default)]
    pub os_name: Option<String>,
    /// GLUE2 OSVersion.
    #[serde(default)]
    pub os_version: Option<String>,
    /// GLUE2 Platform.
    #[serde(default)]
    pub platform: Option<String>,
    /// Network to attach.
    #[serde(default)]
    pub network: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

fn default_memory() -> u64 {
    512
}

/// Largest GLUE2 LogicalCPUs one VM may have.
pub const MAX_VM_CPUS: u32 = 1024;
/// Largest GLUE2 MainMemorySize one VM may have, MiB (16 TiB).
pub const MAX_VM_MEMORY_MIB: u64 = 16 << 20;
/// Largest root disk, MiB (64 TiB).
pub const MAX_VM_DISK_MIB: u64 = 64 << 20;

/// Checks a new VM's name (create, clone): 1-128 characters, not blank, without
/// '/', '\\' or control characters (a 400 naming `field`).
pub fn check_vm_name(field: &str, name: &str) -> Result<(), crate::api::ApiError> {
    if name.trim().is_empty()
        || name.len() > 128
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err(crate::api::ApiError::bad_request(format!(
            "{field} must be 1-128 characters without '/', '\\' or control characters"
        )));
    }
    Ok(())
}

impl Profile {
    /// Checks every value against its range (a 400 naming the field).
    pub fn validate(&self) -> Result<(), crate::api::ApiError> {
        use crate::api::{in_range, ApiError};
        check_vm_name("name", &self.name)?;
        in_range("logical-cpus", self.logical_cpus, 1, MAX_VM_CPUS)?;
        in_range(
            "main-memory-mib",
            self.main_memory_mib,
            1,
            MAX_VM_MEMORY_MIB,
        )?;
        if let Some(d) = self.disk_mib {
            in_range("disk-mib", d, 1, MAX_VM_DISK_MIB)?;
        }
        if self.labels.len() > 64
            || self.labels.iter().any(|(k, v)| {
                k.is_empty()
                    || k.len() > 128
                    || v.len() > 1024
                    || k.chars().chain(v.chars()).any(char::is_control)
            })
        {
            return Err(ApiError::bad_request(
                "labels: at most 64, keys of 1-128 and values of at most 1024 characters, without control characters",
            ));
        }
        // Whatever else a driver would carry back in its answers: the host refuses
        // it there, and then refuses every listing that holds the VM.
        match crate::plugin::answers::profile_problem(&wit::VmProfile::from(self)) {
            Some(problem) => Err(ApiError::bad_request(format!("profile: {problem}"))),
            None => Ok(()),
        }
    }
}

impl From<&Profile> for wit::VmProfile {
    fn from(p: &Profile) -> wit::VmProfile {
        wit::VmProfile {
            name: p.name.clone(),
            logical_cpus: p.logical_cpus,
            main_memory_mib: p.main_memory_mib,
            disk_mib: p.disk_mib,
            template: p.template.clone(),
            image: p.image.clone(),
            os_family: p.os_family.clone(),
            os_name: p.os_name.clone(),
            os_version: p.os_version.clone(),
            platform: p.platform.clone(),
            network: p.network.clone(),
            labels: p
                .labels
                .iter()
                .map(|(k, v)| wit::Label {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        }
    }
}

/// The hypervisor host (GLUE2 ExecutionEnvironment of the physical machine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Host {
    /// Host name.
    pub hostname: String,
    /// Hypervisor kind.
    pub hypervisor_kind: String,
    /// Hypervisor version.
    pub hypervisor_version: String,
    /// GLUE2 Platform.
    pub platform: String,
    /// GLUE2 CPUModel.
    pub cpu_model: String,
    /// GLUE2 PhysicalCPUs.
    pub physical_cpus: u32,
    /// GLUE2 LogicalCPUs.
    pub logical_cpus: u32,
    /// GLUE2 MainMemorySize (MiB).
    pub main_memory_mib: u64,
    /// Free memory (MiB).
    pub free_memory_mib: u64,
    /// vCPUs given to running VMs.
    pub allocated_logical_cpus: u32,
    /// GLUE2 TotalInstances.
    pub total_instances: u32,
    /// GLUE2 UsedInstances.
    pub used_instances: u32,
}

impl From<wit::HostInfo> for Host {
    fn from(h: wit::HostInfo) -> Host {
        Host {
            hostname: h.hostname,
            hypervisor_kind: h.hypervisor_kind,
            hypervisor_version: h.hypervisor_version,
            platform: h.platform,
            cpu_model: h.cpu_model,
            physical_cpus: h.physical_cpus,
            logical_cpus: h.logical_cpus,
            main_memory_mib: h.main_memory_mib,
            free_memory_mib: h.free_memory_mib,
            allocated_logical_cpus: h.allocated_logical_cpus,
            total_instances: h.total_instances,
            used_instances: h.used_instances,
        }
    }
}

/// Who holds a VM (the paper's reserve / acquire / release).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Allocation {
    /// Nobody: the VM can be reserved.
    #[default]
    Free,
    /// Held for `holder` until `until_ms` (Unix ms); lapses afterwards.
    Reserved {
        /// Who reserved it.
        holder: String,
        /// Reservation expiry, Unix milliseconds. (`rename_all` on an enum renames
        /// only variants: the field is named here; records written before read
        /// through the alias.)
        #[serde(rename = "until-ms", alias = "until_ms")]
        until_ms: u64,
    },
    /// Given to `holder` until released.
    Acquired {
        /// Who holds it.
        holder: String,
    },
}

/// A VM as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmRecord {
    /// The VM as last seen on the hypervisor.
    pub vm: Vm,
    /// Who holds it.
    #[serde(default)]
    pub allocation: Allocation,
    /// When the hypervisor was last seen reporting it (Unix ms).
    pub seen_ms: u64,
    /// Software bundles provisioned in its guest, by bundle name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provisioned: BTreeMap<String, Provisioned>,
}

/// A software bundle installed in a VM's guest by `provision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Provisioned {
    /// SHA-256 over the bundle's files (names, modes, contents).
    pub digest: String,
    /// When its install script succeeded (Unix ms).
    pub at_ms: u64,
}

/// Kinds of asynchronous operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// Create from a profile.
    Create,
    /// Clone a VM or template.
    Clone,
    /// Power on.
    Start,
    /// Shut down.
    Shutdown,
    /// Suspend.
    Suspend,
    /// Resume.
    Resume,
    /// Migrate.
    Migrate,
    /// Destroy.
    Destroy,
    /// Run a command in the guest.
    Exec,
    /// Copy a file into the guest.
    CopyIn,
    /// Copy a software bundle into the guest and run its install script.
    Provision,
}

impl OpKind {
    /// The contract operation's name.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Clone => "clone",
            OpKind::Start => "start",
            OpKind::Shutdown => "shutdown",
            OpKind::Suspend => "suspend",
            OpKind::Resume => "resume",
            OpKind::Migrate => "migrate",
            OpKind::Destroy => "destroy",
            OpKind::Exec => "exec",
            OpKind::CopyIn => "copy-in",
            OpKind::Provision => "provision",
        }
    }
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpState {
    /// Accepted, running.
    Running,
    /// Finished; `result` holds the outcome.
    Succeeded,
    /// Finished with `error`.
    Failed,
}

/// An error as operations record it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OpError {
    /// Contract error kind (`not-found`, ...).
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

/// An asynchronous operation: returned at once, queryable until it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Operation {
    /// Operation id.
    pub id: String,
    /// What it does.
    pub kind: OpKind,
    /// The VM it acts on (for create: the new VM's name).
    pub vm: String,
    /// Its arguments.
    pub params: serde_json::Value,
    /// Where it is.
    pub state: OpState,
    /// The VM after the operation, when it succeeded.
    pub result: Option<Vm>,
    /// What a guest operation produced (command output, file metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OpOutput>,
    /// Why it failed.
    pub error: Option<OpError>,
    /// Submitted at (Unix ms).
    pub created_ms: u64,
    /// Finished at (Unix ms).
    pub finished_ms: Option<u64>,
}

/// What a guest operation produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpOutput {
    /// A command's end and output.
    Exec(ExecOutput),
    /// A file in the guest after a copy.
    File(FileMeta),
    /// A provisioned bundle.
    Provision(ProvisionOutput),
}

/// How a command in the guest ended; output is base64 (binary-safe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExecOutput {
    /// Exit code; none when killed by a signal or timed out.
    pub exit_code: Option<i32>,
    /// Signal that ended the command.
    pub signal: Option<i32>,
    /// The command outlived its timeout (and was killed).
    pub timed_out: bool,
    /// Standard output, base64.
    pub stdout_b64: String,
    /// Standard error, base64.
    pub stderr_b64: String,
    /// Stdout was longer than the output limit and was cut.
    pub stdout_truncated: bool,
    /// Stderr was longer than the output limit and was cut.
    pub stderr_truncated: bool,
}

/// A file in the guest: size, mode and SHA-256 computed in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileMeta {
    /// Path in the guest.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// What `provision` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProvisionOutput {
    /// Bundle name.
    pub bundle: String,
    /// Bundle digest.
    pub digest: String,
    /// True when the bundle was already installed and nothing ran.
    pub already_installed: bool,
    /// The install script's end, when it ran.
    pub install: Option<ExecOutput>,
}

/// Something the agent noticed or did, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Event {
    /// Sequence number, strictly increasing.
    pub seq: u64,
    /// When (Unix ms).
    pub at_ms: u64,
    /// What happened: `vm-appeared`, `vm-vanished`, `vm-state-changed`, `operation-finished`, ...
    pub kind: String,
    /// The VM concerned.
    pub vm: String,
    /// Details (old/new state, operation id, ...).
    pub detail: serde_json::Value,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One entry of an audit log (the site's or an agent's): who did what, when.
/// Secrets (tokens, credentials, environment values, stdin, file contents) are
/// never in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AuditEntry {
    /// Sequence number (increasing).
    pub seq: u64,
    /// When (Unix ms).
    pub at_ms: u64,
    /// Who acted (a site user; on an agent, `agent-admin`).
    pub who: String,
    /// What: `user.create`, `user.quota`, `user.token`, `user.delete`,
    /// `agent.add`, `agent.remove`, `vm.exec`, `vm.provision`, `vm.copy-in`,
    /// `vm.copy-out`, `job.cancel`, `plugin.load`, `plugin.replace`,
    /// `plugin.unload`, `driver.set`, or `vm.<action>` by an admin on another's VM.
    pub action: String,
    /// On what (a user, an agent, a VM, a job, a plugin).
    pub target: String,
    /// Particulars (an exec's argv and environment names, a copy's path, grants).
    #[serde(default)]
    pub detail: serde_json::Value,
}
