//! Sessions on a plugin: a small pool of instances per (plugin, endpoint), each with
//! the plugin's session resource open in it.
//!
//! A call takes an idle instance of the plugin's *current* version (or instantiates
//! one and opens the session in it), runs, and gives it back. Instances of a replaced
//! version and instances whose call trapped are dropped, so the next call starts
//! afresh. The pool's size is the smaller of the operator's `session-instances` and
//! the manifest's `concurrency`.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::ResourceAny;

use super::bindings::types::{
    self, Capabilities, Credentials, ExecRequest, ExecResult, FileInfo, HostInfo, VmInfo, VmProfile,
};
use super::error::{PluginError, Result};
use super::host::Slot;
use super::instance::{guarded, Instance};

/// Which export a pool's sessions live in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Driver,
    Guest,
}

/// An instance with an open session resource.
struct Live {
    inst: Instance,
    session: ResourceAny,
}

struct Pool {
    slot: Arc<Slot>,
    kind: Kind,
    endpoint: String,
    credentials: Credentials,
    idle: Mutex<Vec<Live>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    async fn new(
        slot: Arc<Slot>,
        kind: Kind,
        endpoint: &str,
        credentials: Credentials,
    ) -> Result<Arc<Pool>> {
        let loaded = slot.current()?;
        let size = loaded
            .limits
            .session_instances
            .min(loaded.bundle.manifest.limits.concurrency)
            .max(1);
        let pool = Arc::new(Pool {
            slot,
            kind,
            endpoint: endpoint.to_string(),
            credentials,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size as usize)),
        });
        // Open one session now so a bad endpoint or credentials fail here.
        let (live, _permit) = pool.take().await?;
        pool.give_back(live);
        Ok(pool)
    }

    /// An instance with an open session, of the current version.
    async fn take(&self) -> Result<(Live, OwnedSemaphorePermit)> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PluginError::NotLoaded(self.slot.name.clone()))?;
        let loaded = self.slot.current()?;
        loop {
            let candidate = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match candidate {
                Some(live) if live.inst.loaded.generation == loaded.generation => {
                    return Ok((live, permit))
                }
                Some(stale) => drop(stale),
                None => break,
            }
        }
        let mut inst = loaded.instantiate().await?;
        let (endpoint, creds) = (self.endpoint.as_str(), &self.credentials);
        let session = match self.kind {
            Kind::Driver => guarded!(&mut inst, "open", driver, |d, store| d
                .session()
                .call_open(store, endpoint, creds))?,
            Kind::Guest => guarded!(&mut inst, "open", guest, |g, store| g
                .guest_session()
                .call_open(store, endpoint, creds))?,
        };
        Ok((Live { inst, session }, permit))
    }

    /// Returns an instance for reuse unless it is poisoned or of a replaced version.
    fn give_back(&self, live: Live) {
        let current = self.slot.current().ok().map(|l| l.generation);
        if !live.inst.poisoned && current == Some(live.inst.loaded.generation) {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(live);
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

/// An open session on a driver plugin.
#[derive(Clone)]
pub struct DriverSession {
    pool: Arc<Pool>,
}

/// Defines one session method: capability check, take an instance, guarded call,
/// give the instance back.
macro_rules! driver_op {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, $op:literal, $cap:expr, $call:ident($($pass:expr),*)) => {
        $(#[$doc])*
        pub async fn $name(&self, $($arg: $ty),*) -> Result<$ret> {
            self.pool.require($op, $cap)?;
            let (mut live, _permit) = self.pool.take().await?;
            let s = live.session;
            let r = guarded!(&mut live.inst, $op, driver, |d, store| d.session().$call(store, s $(, $pass)*));
            self.pool.give_back(live);
            r
        }
    };
}

impl DriverSession {
    pub(crate) async fn open(
        slot: Arc<Slot>,
        endpoint: &str,
        credentials: Credentials,
    ) -> Result<DriverSession> {
        Ok(DriverSession {
            pool: Pool::new(slot, Kind::Driver, endpoint, credentials).await?,
        })
    }

    /// The endpoint this session is open on.
    pub fn endpoint(&self) -> &str {
        &self.pool.endpoint
    }

    /// The plugin name.
    pub fn plugin(&self) -> &str {
        &self.pool.slot.name
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

/// An open session on a plugin exporting `guest`.
#[derive(Clone)]
pub struct GuestSession {
    pool: Arc<Pool>,
}

/// A file being written into a guest; holds its instance until finished.
pub struct Upload {
    pool: Arc<Pool>,
    live: Option<Live>,
    upload: ResourceAny,
    _permit: OwnedSemaphorePermit,
}

/// A file being read from a guest; holds its instance until dropped.
pub struct Download {
    pool: Arc<Pool>,
    live: Option<Live>,
    download: ResourceAny,
    /// File size in bytes.
    pub size: u64,
    /// Unix mode bits.
    pub mode: u32,
    _permit: OwnedSemaphorePermit,
}

impl GuestSession {
    pub(crate) async fn open(
        slot: Arc<Slot>,
        endpoint: &str,
        credentials: Credentials,
    ) -> Result<GuestSession> {
        Ok(GuestSession {
            pool: Pool::new(slot, Kind::Guest, endpoint, credentials).await?,
        })
    }

    /// Runs a command in the guest.
    pub async fn exec(&self, vm: &str, request: &ExecRequest) -> Result<ExecResult> {
        let (mut live, _permit) = self.pool.take().await?;
        let s = live.session;
        let r = guarded!(&mut live.inst, "exec", guest, |g, store| g
            .guest_session()
            .call_exec(store, s, vm, request));
        self.pool.give_back(live);
        r
    }

    /// Size, mode and SHA-256 of a guest file.
    pub async fn stat(&self, vm: &str, path: &str) -> Result<FileInfo> {
        let (mut live, _permit) = self.pool.take().await?;
        let s = live.session;
        let r = guarded!(&mut live.inst, "stat", guest, |g, store| g
            .guest_session()
            .call_stat(store, s, vm, path));
        self.pool.give_back(live);
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
        let (mut live, permit) = self.pool.take().await?;
        let s = live.session;
        let r = guarded!(&mut live.inst, "upload", guest, |g, store| g
            .guest_session()
            .call_upload(store, s, vm, path, mode, create_parents));
        match r {
            Ok(upload) => Ok(Upload {
                pool: self.pool.clone(),
                live: Some(live),
                upload,
                _permit: permit,
            }),
            Err(e) => {
                self.pool.give_back(live);
                Err(e)
            }
        }
    }

    /// Starts reading a guest file.
    pub async fn download(&self, vm: &str, path: &str) -> Result<Download> {
        let (mut live, permit) = self.pool.take().await?;
        let s = live.session;
        let r = guarded!(&mut live.inst, "download", guest, |g, store| g
            .guest_session()
            .call_download(store, s, vm, path));
        let download = match r {
            Ok(d) => d,
            Err(e) => {
                self.pool.give_back(live);
                return Err(e);
            }
        };
        let size = guarded!(&mut live.inst, "download", guest, |g, store| async {
            g.download().call_size(store, download).await.map(Ok)
        });
        let mode = guarded!(&mut live.inst, "download", guest, |g, store| async {
            g.download().call_mode(store, download).await.map(Ok)
        });
        let (size, mode) = (size?, mode?);
        Ok(Download {
            pool: self.pool.clone(),
            live: Some(live),
            download,
            size,
            mode,
            _permit: permit,
        })
    }
}

fn live_or_gone(live: &mut Option<Live>, plugin: &str, op: &'static str) -> Result<Live> {
    live.take().ok_or_else(|| PluginError::Trap {
        plugin: plugin.to_string(),
        op,
        message: "the transfer's instance failed earlier".into(),
    })
}

impl Upload {
    /// Appends a chunk (at most 4 MiB is a good size).
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let mut live = live_or_gone(&mut self.live, &self.pool.slot.name, "upload-write")?;
        let u = self.upload;
        let r = guarded!(&mut live.inst, "upload-write", guest, |g, store| g
            .upload()
            .call_write(store, u, chunk));
        if !live.inst.poisoned {
            self.live = Some(live);
        }
        r
    }

    /// Closes the file and returns what the guest holds.
    pub async fn finish(mut self) -> Result<FileInfo> {
        let mut live = live_or_gone(&mut self.live, &self.pool.slot.name, "upload-finish")?;
        let u = self.upload;
        let r = guarded!(&mut live.inst, "upload-finish", guest, |g, store| g
            .upload()
            .call_finish(store, u));
        let _ = u.resource_drop_async(&mut live.inst.store).await;
        self.pool.give_back(live);
        r
    }
}

impl Download {
    /// Reads up to `max` bytes; empty means end of file.
    pub async fn read(&mut self, max: u32) -> Result<Vec<u8>> {
        let mut live = live_or_gone(&mut self.live, &self.pool.slot.name, "download-read")?;
        let d = self.download;
        let r = guarded!(&mut live.inst, "download-read", guest, |g, store| g
            .download()
            .call_read(store, d, max));
        if !live.inst.poisoned {
            self.live = Some(live);
        }
        r
    }

    /// Ends the transfer and returns the instance to its pool.
    pub async fn close(mut self) {
        if let Some(mut live) = self.live.take() {
            let _ = self
                .download
                .resource_drop_async(&mut live.inst.store)
                .await;
            self.pool.give_back(live);
        }
    }
}

/// Re-exported so callers need not reach into the bindings.
pub use types::Credentials as SessionCredentials;
