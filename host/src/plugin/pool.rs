//! The warm instances of one plugin version, and the rule for taking one back.
//!
//! A pooled instance keeps every session opened in it, keyed by (interface,
//! endpoint, credentials). When a call ends the instance goes back to the pool only
//! if nothing about it is suspect: not poisoned, no HTTP request or response left in
//! flight, and no more host resources than a session legitimately keeps between
//! calls ([`REUSE_MAX_FILES`], [`REUSE_MAX_RESOURCES`]). Anything else is discarded,
//! and discarding drops its store and with it every host resource it held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::ResourceAny;

use super::instance::Instance;

/// Most open files an instance may keep between calls and still be reused.
pub const REUSE_MAX_FILES: usize = 8;
/// Most host resources of any kind an instance may keep between calls and still be
/// reused.
pub const REUSE_MAX_RESOURCES: usize = 64;

/// Identifies a session inside an instance.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub(crate) struct SessionKey {
    /// Which export the session lives in.
    pub(crate) kind: Kind,
    /// Endpoint it was opened on.
    pub(crate) endpoint: String,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) token: Option<String>,
}

/// Which export a session lives in.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Kind {
    /// `gve:hypervisor/driver`.
    Driver,
    /// `gve:hypervisor/guest`.
    Guest,
}

/// A warm instance and the sessions open in it.
pub(crate) struct Pooled {
    /// The instance.
    pub(crate) inst: Instance,
    /// Its open sessions.
    pub(crate) sessions: HashMap<SessionKey, ResourceAny>,
}

/// Which calls an instance is taken for. Calls a VM's guest agent answers (a
/// qemu-ga command) can hang for their whole timeout when the guest does; they
/// take turns among their own instances so that control calls (operations,
/// reconcile, host information) never wait behind them. So do the operations
/// that may wait for libvirt's long calls (a full disk copy, a migration) beyond
/// the call budget, within the long-call budget.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Lane {
    /// Everything but guest-agent commands.
    Control,
    /// Commands to a VM's in-guest agent.
    Guest,
    /// Creates, clones and migrations ([`Lane::of`]).
    Long,
}

impl Lane {
    /// The lane of driver operation `op`.
    pub(crate) fn of(op: &str) -> Lane {
        match op {
            "guest-agent-command" => Lane::Guest,
            "create" | "clone" | "migrate" => Lane::Long,
            _ => Lane::Control,
        }
    }

    /// The lane's name, as errors say it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Lane::Control => "control",
            Lane::Guest => "guest-agent",
            Lane::Long => "long-operation",
        }
    }
}

/// The warm instances of one plugin version.
pub(crate) struct Pool {
    name: Arc<str>,
    idle: Mutex<Vec<Pooled>>,
    control: Arc<Semaphore>,
    /// The guest lane's own turns; the control lane's when the pool is one instance.
    guest: Arc<Semaphore>,
    /// The long lane's own turns (as many as the control lane's); likewise.
    long: Arc<Semaphore>,
}

impl Pool {
    /// A pool of at most `size` instances in use at once for control calls. With
    /// `lanes` (a driver, which guest-agent commands reach) the guest lane has
    /// half as many again of its own, and the long lane as many again, unless
    /// `size` is 1 (a plugin that runs as one instance shares it between lanes).
    pub(crate) fn new(name: Arc<str>, size: usize, lanes: bool) -> Pool {
        let size = size.max(1);
        let split = lanes && size >= 2;
        let control = Arc::new(Semaphore::new(size));
        let own = |n: usize| {
            if split {
                Arc::new(Semaphore::new(n))
            } else {
                control.clone()
            }
        };
        let (guest, long) = (own(size / 2), own(size));
        Pool {
            name,
            idle: Mutex::new(Vec::new()),
            control,
            guest,
            long,
        }
    }

    /// Waits for a turn to use an instance in `lane`.
    pub(crate) async fn permit(&self, lane: Lane) -> Option<OwnedSemaphorePermit> {
        let sem = match lane {
            Lane::Control => &self.control,
            Lane::Guest => &self.guest,
            Lane::Long => &self.long,
        };
        sem.clone().acquire_owned().await.ok()
    }

    /// An idle instance, if there is one.
    pub(crate) fn take_idle(&self) -> Option<Pooled> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Takes an instance back when it may be reused; discards it otherwise.
    pub(crate) fn put(&self, mut pooled: Pooled) {
        if pooled.inst.poisoned {
            return;
        }
        let held = pooled.inst.holdings();
        let in_flight = pooled.inst.store.data().http_in_flight();
        if in_flight > 0
            || held.http_exchanges > 0
            || held.files > REUSE_MAX_FILES
            || held.total > REUSE_MAX_RESOURCES
        {
            tracing::info!(
                plugin = &*self.name,
                in_flight,
                ?held,
                "plugin instance discarded instead of reused: it holds host resources past its call"
            );
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pooled);
    }
}

/// A pooled instance taken for one call (or one transfer).
pub(crate) struct Lease {
    pub(crate) pool: Arc<Pool>,
    pub(crate) pooled: Pooled,
    pub(crate) session: ResourceAny,
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl Lease {
    /// Returns the instance to its version's pool (or discards it, see [`Pool::put`]).
    pub(crate) fn give_back(self) {
        self.pool.put(self.pooled);
    }
}
