//! Sessions on a plugin, and the pool of warm instances that serves them.
//!
//! Each loaded version has a pool of at most `pool-size` instances (lowered to the
//! manifest's `concurrency`). A pooled instance keeps every session opened in it,
//! keyed by (interface, endpoint, credentials), so a call takes any idle instance,
//! opens its session there if needed, runs, and gives the instance back. A plugin that
//! declares `concurrency = 1` therefore runs as one instance whose memory every session
//! shares. Instances whose call trapped are dropped; a replaced version's pool goes
//! away with it, so calls after a replacement reopen their sessions on the new version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::ResourceAny;

use super::bindings::types::{
    Capabilities, Credentials, ExecRequest, ExecResult, FileInfo, HostInfo, VmInfo, VmProfile,
};
use super::error::{PluginError, Result};
use super::host::Slot;
use super::instance::{guarded, Instance, Loaded};

/// Which export a session lives in.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Driver,
    Guest,
}

/// Identifies a session inside an instance.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct SessionKey {
    kind: Kind,
    endpoint: String,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
}

/// A warm instance and the sessions open in it.
pub(crate) struct Pooled {
    inst: Instance,
    sessions: HashMap<SessionKey, ResourceAny>,
}

/// The warm instances of one plugin version.
pub(crate) struct Pool {
    idle: Mutex<Vec<Pooled>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    /// A pool of at most `size` instances in use at once.
    pub(crate) fn new(size: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size)),
        }
    }
}

/// A pooled instance taken for one call (or one transfer).
struct Lease {
    loaded: Arc<Loaded>,
    pooled: Pooled,
    session: ResourceAny,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    /// Returns the instance to its version's pool unless its last call poisoned it.
    fn give_back(self) {
        return_to_pool(&self.loaded, self.pooled);
    }
}

fn return_to_pool(loaded: &Loaded, pooled: Pooled) {
    if !pooled.inst.poisoned {
        loaded
            .pool
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pooled);
    }
}

/// What a session handle knows: the plugin, the interface and where it points.
struct Target {
    slot: Arc<Slot>,
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

    /// An instance of the current version with this session open in it.
    async fn lease(&self) -> Result<Lease> {
        let loaded = self.slot.current()?;
        let permit = loaded
            .pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PluginError::NotLoaded(self.slot.name.clone()))?;
        let idle = loaded
            .pool
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut pooled = match idle {
            Some(p) => p,
            None => Pooled {
                inst: loaded.instantiate().await?,
                sessions: HashMap::new(),
            },
        };
        if let Some(&session) = pooled.sessions.get(&self.key) {
            return Ok(Lease {
                loaded,
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
                    loaded,
                    pooled,
                    session,
                    _permit: permit,
                })
            }
            Err(e) => {
                return_to_pool(&loaded, pooled);
                Err(e)
            }
        }
    }

    /// Refuses an operation the driver did not declare, before entering the plugin.
    fn require(&self, op: &'static str, needed: Capabilities) -> Result<()> {
        let loaded = self.slot.current()?;
        let declared = loaded
            .driver_info
            .as_ref()
            .map(|i| i.capabilities)
            .unwrap_or(Capabilities::empty());
        if declared.contains(needed) {
            Ok(())
        } else {
            Err(PluginError::NotSupported {
                plugin: self.slot.name.clone(),
                op,
                reason: "the driver does not declare this capability".into(),
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
            let mut lease = self.target.lease().await?;
            let s = lease.session;
            let r = guarded!(&mut lease.pooled.inst, $op, driver, |d, store| d.session().$call(store, s $(, $pass)*));
            lease.give_back();
            r
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
        target.lease().await?.give_back();
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
    driver_op!(
        /// Defines a VM from a profile.
        create(profile: &VmProfile) -> VmInfo, "create", Capabilities::CREATE, call_create(profile));
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

    driver_op!(migrate_checked(_cap: Capabilities, vm: &str, destination: &str, live: bool) -> VmInfo,
        "migrate", _cap, call_migrate(vm, destination, live));
}

/// An open session on a plugin exporting `guest`. Cheap to clone.
#[derive(Clone)]
pub struct GuestSession {
    target: Arc<Target>,
}

/// A file being written into a guest; holds its instance until finished or dropped.
pub struct Upload {
    lease: Option<Lease>,
    upload: ResourceAny,
    plugin: String,
}

/// A file being read from a guest; holds its instance until closed or dropped.
pub struct Download {
    lease: Option<Lease>,
    download: ResourceAny,
    plugin: String,
    /// File size in bytes.
    pub size: u64,
    /// Unix mode bits.
    pub mode: u32,
}

impl GuestSession {
    /// Opens (and checks, by opening it once) guest access on `endpoint`.
    pub(crate) async fn open(
        slot: Arc<Slot>,
        endpoint: &str,
        credentials: Credentials,
    ) -> Result<GuestSession> {
        let target = Arc::new(Target::new(slot, Kind::Guest, endpoint, credentials));
        target.lease().await?.give_back();
        Ok(GuestSession { target })
    }

    /// Runs a command in the guest.
    pub async fn exec(&self, vm: &str, request: &ExecRequest) -> Result<ExecResult> {
        let mut lease = self.target.lease().await?;
        let s = lease.session;
        let r = guarded!(&mut lease.pooled.inst, "exec", guest, |g, store| g
            .guest_session()
            .call_exec(store, s, vm, request));
        lease.give_back();
        r
    }

    /// Size, mode and SHA-256 of a guest file.
    pub async fn stat(&self, vm: &str, path: &str) -> Result<FileInfo> {
        let mut lease = self.target.lease().await?;
        let s = lease.session;
        let r = guarded!(&mut lease.pooled.inst, "stat", guest, |g, store| g
            .guest_session()
            .call_stat(store, s, vm, path));
        lease.give_back();
        r
    }

    /// Starts writing a guest file.
    pub async fn upload(
        &self,
        vm: &str,
        path: &str,
        mode: u32,
        create_parents: bool,
    ) -> Result<Upload> {
        let mut lease = self.target.lease().await?;
        let s = lease.session;
        let r = guarded!(&mut lease.pooled.inst, "upload", guest, |g, store| g
            .guest_session()
            .call_upload(store, s, vm, path, mode, create_parents));
        match r {
            Ok(upload) => Ok(Upload {
                lease: Some(lease),
                upload,
                plugin: self.target.slot.name.clone(),
            }),
            Err(e) => {
                lease.give_back();
                Err(e)
            }
        }
    }

    /// Starts reading a guest file.
    pub async fn download(&self, vm: &str, path: &str) -> Result<Download> {
        let mut lease = self.target.lease().await?;
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
        let plugin = self.target.slot.name.clone();
        match (size, mode) {
            (Ok(size), Ok(mode)) => Ok(Download {
                lease: Some(lease),
                download,
                plugin,
                size,
                mode,
            }),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }
}

/// An abandoned transfer gives its instance back (the guest-side transfer object
/// stays open in that instance until the instance is dropped), so a single-instance
/// plugin keeps its state.
impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.give_back();
        }
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.give_back();
        }
    }
}

fn gone(plugin: &str, op: &'static str) -> PluginError {
    PluginError::Trap {
        plugin: plugin.to_string(),
        op,
        message: "the transfer's instance failed earlier".into(),
    }
}

impl Upload {
    /// Appends a chunk (at most 4 MiB is a good size).
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let lease = self
            .lease
            .as_mut()
            .ok_or_else(|| gone(&self.plugin, "upload-write"))?;
        let u = self.upload;
        let r = guarded!(&mut lease.pooled.inst, "upload-write", guest, |g, store| g
            .upload()
            .call_write(store, u, chunk));
        if lease.pooled.inst.poisoned {
            self.lease = None;
        }
        r
    }

    /// Closes the file and returns what the guest holds.
    pub async fn finish(mut self) -> Result<FileInfo> {
        let mut lease = self
            .lease
            .take()
            .ok_or_else(|| gone(&self.plugin, "upload-finish"))?;
        let u = self.upload;
        let r = guarded!(
            &mut lease.pooled.inst,
            "upload-finish",
            guest,
            |g, store| g.upload().call_finish(store, u)
        );
        if !lease.pooled.inst.poisoned {
            let _ = u.resource_drop_async(&mut lease.pooled.inst.store).await;
        }
        lease.give_back();
        r
    }
}

impl Upload {
    /// Abandons the transfer: the plugin drops its upload (guest-install removes its
    /// temporary file) and the instance returns to its pool.
    pub async fn abort(mut self) {
        if let Some(mut lease) = self.lease.take() {
            let _ = self
                .upload
                .resource_drop_async(&mut lease.pooled.inst.store)
                .await;
            lease.give_back();
        }
    }
}

impl Download {
    /// Reads up to `max` bytes; empty means end of file.
    pub async fn read(&mut self, max: u32) -> Result<Vec<u8>> {
        let lease = self
            .lease
            .as_mut()
            .ok_or_else(|| gone(&self.plugin, "download-read"))?;
        let d = self.download;
        let r = guarded!(
            &mut lease.pooled.inst,
            "download-read",
            guest,
            |g, store| g.download().call_read(store, d, max)
        );
        if lease.pooled.inst.poisoned {
            self.lease = None;
        }
        r
    }

    /// Ends the transfer and returns the instance to its pool.
    pub async fn close(mut self) {
        if let Some(mut lease) = self.lease.take() {
            let _ = self
                .download
                .resource_drop_async(&mut lease.pooled.inst.store)
                .await;
            lease.give_back();
        }
    }
}
