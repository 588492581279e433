//! What a case works with: the driver session, the target's facts, names for what it
//! makes, and the cleanup of everything it made.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use gve::plugin::bindings::types::{DriverInfo, VmInfo, VmProfile, VmState};
use gve::plugin::{DriverSession, ErrorKind, GuestSession, PluginError};

/// Why a case failed: one sentence a plugin author can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl Failure {
    /// A failure saying `message`.
    pub fn new(message: impl Into<String>) -> Failure {
        Failure(message.into())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The contract's name of a state (`running`, ...).
pub fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Stopped => "stopped",
        VmState::Suspended => "suspended",
        VmState::Paused => "paused",
        VmState::Crashed => "crashed",
        VmState::Migrating => "migrating",
        VmState::Unknown => "unknown",
    }
}

/// Fails with `message` unless `cond` holds.
pub fn ensure(cond: bool, message: impl FnOnce() -> String) -> Result<(), Failure> {
    if cond {
        Ok(())
    } else {
        Err(Failure(message()))
    }
}

/// The value of a call that must succeed, or a failure naming what was done.
pub fn must<T>(what: &str, r: Result<T, PluginError>) -> Result<T, Failure> {
    r.map_err(|e| Failure(format!("{what}: {e}")))
}

/// A call that must fail with `kind`, or a failure saying what it did instead.
pub fn must_fail<T: std::fmt::Debug>(
    what: &str,
    kind: ErrorKind,
    r: Result<T, PluginError>,
) -> Result<(), Failure> {
    match r {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(Failure(format!(
            "{what}: the contract's answer is `{kind}`, the driver answered `{}`: {e}",
            e.kind()
        ))),
        Ok(v) => {
            let shown: String = format!("{v:?}").chars().take(160).collect();
            Err(Failure(format!(
                "{what}: the contract's answer is `{kind}`, the driver succeeded ({shown})"
            )))
        }
    }
}

/// Where a VM a case made lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// On the target endpoint.
    First,
    /// On the second host.
    Second,
}

/// What a case works with.
pub struct Ctx {
    /// The session on the target endpoint.
    pub driver: DriverSession,
    /// A session on the second host, when the target has one: (destination, session).
    pub second: Option<(String, DriverSession)>,
    /// The driver's own description.
    pub info: DriverInfo,
    /// This run's id (in every name the run makes).
    pub run: String,
    /// A template to create or clone from, when the target names one.
    pub template: Option<String>,
    /// How long a state change may take to show.
    pub settle: Duration,
    /// Guest operations on the target's VMs: the driver's own (`guest-native`) or
    /// the target's guest plugin's; `None` when neither is there, an error when
    /// the provider's session did not open (the guest cases then fail with it).
    pub guest: Option<Result<GuestSession, String>>,
    /// The second host is a host of the target's own endpoint (`second` holds the
    /// target's session): a migrated VM keeps its id and reads back on it.
    pub destination_host: bool,
    /// A VM or template the target has ready for linked clones.
    pub linked_source: Option<String>,
    /// How long a started guest is given to boot before it is live-migrated.
    pub boot: Duration,
    made: Mutex<Vec<(Side, String)>>,
}

impl Ctx {
    /// A context for one run.
    pub fn new(
        driver: DriverSession,
        second: Option<(String, DriverSession)>,
        info: DriverInfo,
        template: Option<String>,
        settle: Duration,
    ) -> Ctx {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        Ctx {
            driver,
            second,
            info,
            run,
            template,
            settle,
            guest: None,
            destination_host: false,
            linked_source: None,
            boot: Duration::ZERO,
            made: Mutex::new(Vec::new()),
        }
    }

    /// The same context with guest operations through `guest`.
    pub fn with_guest(mut self, guest: Option<Result<GuestSession, String>>) -> Ctx {
        self.guest = guest;
        self
    }

    /// The same context giving started guests `boot` before a live migration.
    pub fn with_boot(mut self, boot: Duration) -> Ctx {
        self.boot = boot;
        self
    }

    /// The same context with the second host behind the target's own endpoint.
    pub fn with_destination_host(mut self, within: bool) -> Ctx {
        self.destination_host = within;
        self
    }

    /// The same context with a source for linked clones.
    pub fn with_linked_source(mut self, source: Option<String>) -> Ctx {
        self.linked_source = source;
        self
    }

    /// The name of something this run makes: `gvc-<run>-<what>`.
    pub fn name(&self, what: &str) -> String {
        format!("gvc-{}-{what}", self.run)
    }

    /// A small profile named for `what` (from the target's template, if any).
    pub fn profile(&self, what: &str) -> VmProfile {
        VmProfile {
            name: self.name(what),
            logical_cpus: 1,
            main_memory_mib: 128,
            disk_mib: None,
            template: self.template.clone(),
            image: None,
            os_family: None,
            os_name: None,
            os_version: None,
            platform: None,
            network: None,
            labels: Vec::new(),
        }
    }

    /// Records a VM the current case made, for its cleanup.
    pub fn made(&self, side: Side, id: &str) {
        self.made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((side, id.to_string()));
    }

    /// Creates a VM for `what` and records it for cleanup.
    pub async fn create(&self, what: &str) -> Result<VmInfo, Failure> {
        let profile = self.profile(what);
        let vm = must(
            &format!("create {}", profile.name),
            self.driver.create(&profile).await,
        )?;
        self.made(Side::First, &vm.id);
        Ok(vm)
    }

    /// The session of `side`.
    pub fn session(&self, side: Side) -> &DriverSession {
        match (side, &self.second) {
            (Side::Second, Some((_, s))) => s,
            _ => &self.driver,
        }
    }

    /// Reads `id` back until it is in `want`, or fails after the settle time.
    pub async fn wait_state(&self, side: Side, id: &str, want: VmState) -> Result<VmInfo, Failure> {
        let end = Instant::now() + self.settle;
        loop {
            let vm = must(&format!("get-vm {id}"), self.session(side).get_vm(id).await)?;
            if vm.state == want {
                return Ok(vm);
            }
            if Instant::now() >= end {
                return Err(Failure(format!(
                    "{id} reads back {}, not {}, {:?} after the operation",
                    state_name(vm.state),
                    state_name(want),
                    self.settle
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Destroys everything the current case made and checks it is gone; returns
    /// what could not be removed.
    pub async fn cleanup(&self) -> Vec<String> {
        let made = std::mem::take(&mut *self.made.lock().unwrap_or_else(|p| p.into_inner()));
        let mut left = Vec::new();
        for (side, id) in made.into_iter().rev() {
            let s = self.session(side);
            match s.destroy(&id).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    left.push(format!("{id}: destroy failed: {e}"));
                    continue;
                }
            }
            match s.get_vm(&id).await {
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Ok(vm) => left.push(format!(
                    "{id}: still there after destroy ({})",
                    state_name(vm.state)
                )),
                Err(e) => left.push(format!("{id}: cannot confirm it is gone: {e}")),
            }
        }
        left
    }
}
