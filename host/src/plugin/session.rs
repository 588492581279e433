//! Sessions on a plugin: each call takes a warm instance of the plugin's current
//! version from its [`Pool`](super::pool::Pool), opens the session there if needed,
//! runs inside the sandbox, checks the answer ([`answers`](super::answers)) and gives
//! the instance back.
//!
//! Each loaded version has a pool of at most `pool-size` instances (lowered to the
//! manifest's `concurrency`). A plugin that declares `concurrency = 1` therefore runs
//! as one instance whose memory every session shares. A replaced version's pool goes
//! away with it, so calls after a replacement reopen their sessions on the new
//! version; sessions hold the plugin's [`Slot`], so they follow it by name across
//! unload and load.

use std::collections::HashMap;
use std::sync::Arc;

use super::answers::{self, Answer};
use super::bindings::types::{
    Capabilities, Credentials, ExecRequest, ExecResult, FileInfo, HostInfo, VmInfo, VmProfile,
};
use super::bulk::BulkTransfer;
use super::error::{PluginError, Result};
use super::instance::guarded;
use super::pool::{Kind, Lane, Lease, Pooled, SessionKey};
use super::slot::Slot;
use super::transfer::{Download, Upload};

/// What a session handle knows: the plugin, the interface and where it points.
pub(crate) struct Target {
    pub(crate) slot: Arc<Slot>,
    key: SessionKey,
    credentials: Credentials,
}

impl Target {
    fn new(slot: Arc<Slot>, kind: Kind, endpoint: &str, credentials: Credentials) -> Target {
        let key = SessionKey {
            kind,
            endpoint: endpoint.to_string(),
            username: credentials.username.clone(),
            password: credentials.password.clone(),
            token: credentials.token.clone(),
        };
        Target {
            slot,
            key,
            credentials,
        }
    }

    /// An instance of the current version with this session open in it, for a
    /// call `op` in `lane`; waiting for one at most the plugin's call budget.
    pub(crate) async fn lease(&self, op: &'static str, lane: Lane) -> Result<Lease> {
        let loaded = self.current()?;
        let pool = loaded.pool.clone();
        let budget = loaded.meta.limits.call_timeout();
        let busy = || PluginError::Busy {
            plugin: self.slot.name.to_string(),
            op,
            lane: lane.name(),
            waited: budget,
        };
        // A turn in the lane, then an idle instance or a slot for a new one
        // (lanes together may want more than `max-instances`): within the budget.
        let until = tokio::time::Instant::now() + budget;
        let permit = tokio::time::timeout_at(until, pool.permit(lane))
            .await
            .map_err(|_| busy())?
            .ok_or_else(|| PluginError::Unloaded(self.slot.name.clone()))?;
        let mut pooled = match pool.take_idle() {
            Some(p) => p,
            None => {
                let slot = tokio::time::timeout_at(until, loaded.instance_slot())
                    .await
                    .map_err(|_| busy())??;
                Pooled {
                    inst: loaded.instantiate_in(slot).await?,
                    sessions: HashMap::new(),
                }
            }
        };
        if let Some(&session) = pooled.sessions.get(&self.key) {
            return Ok(Lease {
                pool,
                pooled,
                session,
                _permit: permit,
            });
        }
        let (endpoint, creds) = (self.key.endpoint.as_str(), &self.credentials);
        let opened = match self.key.kind {
            Kind::Driver => guarded!(&mut pooled.inst, "open", driver, |d, store| d
                .session()
                .call_open(store, endpoint, creds)),
            Kind::Guest => guarded!(&mut pooled.inst, "open", guest, |g, store| g
                .guest_session()
                .call_open(store, endpoint, creds)),
        };
        match opened {
            Ok(session) => {
                pooled.sessions.insert(self.key.clone(), session);
                Ok(Lease {
                    pool,
                    pooled,
                    session,
                    _permit: permit,
                })
            }
            Err(e) => {
                pool.put(pooled);
                Err(e)
            }
        }
    }

    /// The plugin's current version, or `Unloaded` (kind `unavailable`: a missing
    /// plugin must never read as a missing VM).
    fn current(&self) -> Result<Arc<super::version::Loaded>> {
        self.slot
            .current()
            .map_err(|_| PluginError::Unloaded(self.slot.name.clone()))
    }

    /// Checks a plugin's answer before it reaches the host ([`answers`]).
    fn checked<T: Answer>(&self, op: &'static str, r: Result<T>) -> Result<T> {
        answers::checked(&self.slot.name, op, r?)
    }

    /// Refuses an operation the driver did not declare, before entering the plugin.
    fn require(&self, op: &'static str, needed: Capabilities) -> Result<()> {
        let loaded = self.current()?;
        let declared = loaded
            .driver_info
            .as_ref()
            .map(|i| i.capabilities)
            .unwrap_or(Capabilities::empty());
        if declared.contains(needed) {
            Ok(())
        } else {
            let missing = super::contract::capability_names(needed & !declared).join(", ");
            Err(PluginError::NotSupported {
                plugin: self.slot.name.clone(),
                op,
                reason: format!("the driver does not declare {missing}"),
            })
        }
    }
}

/// An open session on a driver plugin. Cheap to clone.
#[derive(Clone)]
pub struct DriverSession {
    target: Arc<Target>,
}

/// Defines one session method: capability check, lease an instance, guarded call,
/// give the instance back.
macro_rules! driver_op {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, $op:literal, $cap:expr, $call:ident($($pass:expr),*)) => {
        $(#[$doc])*
        pub async fn $name(&self, $($arg: $ty),*) -> Result<$ret> {
            self.target.require($op, $cap)?;
            let lane = Lane::of($op);
            let mut lease = self.target.lease($op, lane).await?;
            let s = lease.session;
            let r = guarded!(&mut lease.pooled.inst, $op, driver, |d, store| d.session().$call(store, s $(, $pass)*));
            lease.give_back();
            self.target.checked($op, r)
        }
    };
}

impl DriverSession {
    /// Opens (and checks, by opening it once) a session on `endpoint`.
    pub(crate) async fn open(
        slot: Arc<Slot>,
        endpoint: &str,
        credentials: Credentials,
    ) -> Result<DriverSession> {
        let target = Arc::new(Target::new(slot, Kind::Driver, endpoint, credentials));
        target.lease("open", Lane::Control).await?.give_back();
        Ok(DriverSession { target })
    }

    /// The endpoint this session is open on.
    pub fn endpoint(&self) -> &str {
        &self.target.key.endpoint
    }

    /// The plugin name.
    pub fn plugin(&self) -> &str {
        &self.target.slot.name
    }

    /// Refuses `op` unless the loaded driver declares every capability in `needed`.
    pub fn require(&self, op: &'static str, needed: Capabilities) -> Result<()> {
        self.target.require(op, needed)
    }

    driver_op!(
        /// Capacity and identity of the host.
        host_info() -> HostInfo, "host-info", Capabilities::empty(), call_host_info());
    driver_op!(
        /// Every VM that is not a template.
        list_vms() -> Vec<VmInfo>, "list-vms", Capabilities::empty(), call_list_vms());
    driver_op!(
        /// Every template.
        list_templates() -> Vec<VmInfo>, "list-templates", Capabilities::empty(), call_list_templates());
    driver_op!(
        /// One VM or template by id or name.
        get_vm(vm: &str) -> VmInfo, "get-vm", Capabilities::empty(), call_get_vm(vm));
    /// Defines a VM from a profile.
    pub async fn create(&self, profile: &VmProfile) -> Result<VmInfo> {
        self.refuse("create", answers::profile_problem(profile))?;
        self.create_checked(profile).await
    }

    driver_op!(create_checked(profile: &VmProfile) -> VmInfo, "create", Capabilities::CREATE,
        call_create(profile));

    /// An argument the host would refuse when the answer carries it back (a new
    /// VM's name, its profile's texts) is refused before the call.
    fn refuse(&self, op: &'static str, problem: Option<String>) -> Result<()> {
        match problem {
            None => Ok(()),
            Some(problem) => Err(PluginError::Argument {
                plugin: self.target.slot.name.to_string(),
                op,
                problem,
            }),
        }
    }
    driver_op!(
        /// Powers a VM on.
        start(vm: &str) -> VmInfo, "start", Capabilities::START, call_start(vm));
    driver_op!(
        /// Shuts a VM down (gracefully, or at once with `force`).
        shutdown(vm: &str, force: bool) -> VmInfo, "shutdown", Capabilities::SHUTDOWN, call_shutdown(vm, force));
    driver_op!(
        /// Suspends a running VM.
        suspend(vm: &str) -> VmInfo, "suspend", Capabilities::SUSPEND, call_suspend(vm));
    driver_op!(
        /// Resumes a suspended VM.
        resume(vm: &str) -> VmInfo, "resume", Capabilities::RESUME, call_resume(vm));
    driver_op!(
        /// Deletes a VM and its disks.
        destroy(vm: &str) -> (), "destroy", Capabilities::DESTROY, call_destroy(vm));
    driver_op!(
        /// Sends a qemu-ga command to the VM's in-guest agent.
        guest_agent_command(vm: &str, command: &str, timeout_ms: u32) -> String, "guest-agent-command",
        Capabilities::GUEST_AGENT_CHANNEL, call_guest_agent_command(vm, command, timeout_ms));

    /// Copies a VM or template (`linked`: copy-on-write).
    pub async fn clone_vm(&self, source: &str, name: &str, linked: bool) -> Result<VmInfo> {
        let cap = if linked {
            Capabilities::CLONE | Capabilities::LINKED_CLONE
        } else {
            Capabilities::CLONE
        };
        self.refuse("clone", answers::name_problem(name))?;
        self.clone_checked(cap, source, name, linked).await
    }

    driver_op!(clone_checked(_cap: Capabilities, source: &str, name: &str, linked: bool) -> VmInfo,
        "clone", _cap, call_clone(source, name, linked));

    /// Moves a VM to `destination` (`live`: while running).
    pub async fn migrate(&self, vm: &str, destination: &str, live: bool) -> Result<VmInfo> {
        let cap = if live {
            Capabilities::MIGRATE | Capabilities::LIVE_MIGRATE
        } else {
            Capabilities::MIGRATE
        };
        self.migrate_checked(cap, vm, destination, live).await
    }

    /// Whether the loaded driver stages bulk copies (exports `gve:hypervisor/bulk`).
    pub fn has_bulk(&self) -> bool {
        self.target.current().is_ok_and(|l| l.exports.bulk)
    }

    /// Stages a raw disk of at least `size` bytes for running `vm`, named by `id`,
    /// and attaches it; the transfer holds an instance until released.
    pub async fn bulk_stage(&self, vm: &str, id: &str, size: u64) -> Result<BulkTransfer> {
        let op = "bulk-stage";
        self.bulk_required(op)?;
        let mut lease = self.target.lease(op, Lane::Control).await?;
        let (endpoint, creds) = (self.target.key.endpoint.as_str(), &self.target.credentials);
        let inst = &mut lease.pooled.inst;
        let staged = guarded!(inst, op, bulk, |b, store| b
            .transfer()
            .call_stage(store, endpoint, creds, vm, id, size));
        let transfer = match staged {
            Ok(t) => t,
            Err(e) => {
                lease.give_back();
                return Err(e);
            }
        };
        let serial = guarded!(inst, "bulk-serial", bulk, |b, store| async {
            b.transfer().call_serial(store, transfer).await.map(Ok)
        });
        let plugin = &self.target.slot.name;
        let mut bulk = BulkTransfer::new(lease, transfer, plugin, String::new());
        match serial {
            Ok(serial) if answers::serial_problem(&serial).is_none() => {
                bulk.serial = serial;
                Ok(bulk)
            }
            Ok(serial) => {
                let problem = answers::serial_problem(&serial).unwrap_or_default();
                let _ = bulk.release().await;
                Err(PluginError::Answer {
                    plugin: plugin.clone(),
                    op,
                    problem,
                })
            }
            Err(e) => {
                let _ = bulk.release().await;
                Err(e)
            }
        }
    }

    /// Detaches and deletes whatever transfer `id` on `vm` left (after a crash).
    pub async fn bulk_release_left(&self, vm: &str, id: &str) -> Result<()> {
        let op = "bulk-release-left";
        self.bulk_required(op)?;
        let mut lease = self.target.lease(op, Lane::Control).await?;
        let (endpoint, creds) = (self.target.key.endpoint.as_str(), &self.target.credentials);
        let r = guarded!(&mut lease.pooled.inst, op, bulk, |b, store| b
            .call_release_left(store, endpoint, creds, vm, id));
        lease.give_back();
        self.target.checked(op, r)
    }

    fn bulk_required(&self, op: &'static str) -> Result<()> {
        if self.has_bulk() {
            return Ok(());
        }
        Err(PluginError::NotSupported {
            plugin: self.target.slot.name.clone(),
            op,
            reason: format!(
                "the driver does not export gve:hypervisor/bulk ({})",
                super::contract::BULK_COPY
            ),
        })
    }

    driver_op!(migrate_checked(_cap: Capabilities, vm: &str, destination: &str, live: bool) -> VmInfo,
        "migrate", _cap, call_migrate(vm, destination, live));
}

/// An open session on a plugin exporting `guest`. Cheap to clone.
#[derive(Clone)]
pub struct GuestSession {
    target: Arc<Target>,
}

impl GuestSession {
    /// Opens (and checks, by opening it once) guest access on `endpoint`.
    pub(crate) async fn open(
        slot: Arc<Slot>,
        endpoint: &str,
        credentials: Credentials,
    ) -> Result<GuestSession> {
        let target = Arc::new(Target::new(slot, Kind::Guest, endpoint, credentials));
        target.lease("open", Lane::Control).await?.give_back();
        Ok(GuestSession { target })
    }

    /// Runs a command in the guest.
    pub async fn exec(&self, vm: &str, request: &ExecRequest) -> Result<ExecResult> {
        let mut lease = self.target.lease("guest", Lane::Guest).await?;
        let s = lease.session;
        let r = guarded!(&mut lease.pooled.inst, "exec", guest, |g, store| g
            .guest_session()
            .call_exec(store, s, vm, request));
        lease.give_back();
        let result = self.target.checked("exec", r)?;
        let limit = request.output_limit as usize;
        if result.stdout.len() > limit || result.stderr.len() > limit {
            return Err(PluginError::Answer {
                plugin: self.target.slot.name.clone(),
                op: "exec",
                problem: format!(
                    "{} bytes of stdout and {} of stderr for an output limit of {limit}",
                    result.stdout.len(),
                    result.stderr.len()
                ),
            });
        }
        Ok(result)
    }

    /// Size, mode and SHA-256 of a guest file.
    pub async fn stat(&self, vm: &str, path: &str) -> Result<FileInfo> {
        let mut lease = self.target.lease("guest", Lane::Guest).await?;
        let s = lease.session;
        let r = guarded!(&mut lease.pooled.inst, "stat", guest, |g, store| g
            .guest_session()
            .call_stat(store, s, vm, path));
        lease.give_back();
        self.target.checked("stat", r)
    }

    /// Starts writing a guest file.
    pub async fn upload(
        &self,
        vm: &str,
        path: &str,
        mode: u32,
        create_parents: bool,
    ) -> Result<Upload> {
        let mut lease = self.target.lease("guest", Lane::Guest).await?;
        let s = lease.session;
        let r = guarded!(&mut lease.pooled.inst, "upload", guest, |g, store| g
            .guest_session()
            .call_upload(store, s, vm, path, mode, create_parents));
        match r {
            Ok(upload) => Ok(Upload::new(lease, upload, &self.target.slot.name)),
            Err(e) => {
                lease.give_back();
                Err(e)
            }
        }
    }

    /// Starts reading a guest file.
    pub async fn download(&self, vm: &str, path: &str) -> Result<Download> {
        let mut lease = self.target.lease("guest", Lane::Guest).await?;
        let s = lease.session;
        let r = guarded!(&mut lease.pooled.inst, "download", guest, |g, store| g
            .guest_session()
            .call_download(store, s, vm, path));
        let download = match r {
            Ok(d) => d,
            Err(e) => {
                lease.give_back();
                return Err(e);
            }
        };
        let inst = &mut lease.pooled.inst;
        let size = guarded!(inst, "download", guest, |g, store| async {
            g.download().call_size(store, download).await.map(Ok)
        });
        let mode = guarded!(inst, "download", guest, |g, store| async {
            g.download().call_mode(store, download).await.map(Ok)
        });
        let plugin = &self.target.slot.name;
        match (size, mode) {
            (Ok(size), Ok(mode)) => Ok(Download::new(lease, download, plugin, size, mode)),
            (Err(e), _) | (_, Err(e)) => {
                Download::new(lease, download, plugin, 0, 0).close().await;
                Err(e)
            }
        }
    }
}
