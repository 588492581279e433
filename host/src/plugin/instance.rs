//! One live instance of a plugin ([`Instance`]) and the sandbox every entry into it
//! runs under: deadline, memory cap, host-resource budgets and trap mapping. Calls go
//! through [`guarded!`]; destructors of plugin resources through
//! [`Instance::drop_resource`]; both arm the same deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::component::{ResourceAny, ResourceTableError};
use wasmtime::{Store, Trap};

use super::bindings::{bulk_export, driver_export, guest_export, types};
use super::budget::{self, Holdings};
use super::error::{DriverError, PluginError, Result};
use super::grants::Limits;
use super::limits::{EntryDeadline, Overran, Stopped};
use super::pool::Lane;
use super::state::HostState;

/// Extra time given to host-side awaits (libvirt, HTTP) beyond the call's deadline
/// (its budget, moved on by its long host calls) before the call is abandoned.
pub const BACKSTOP_GRACE: Duration = Duration::from_secs(1);

/// What an instance needs to know about the version it came from.
#[derive(Debug)]
pub struct Meta {
    /// Plugin name.
    pub name: Arc<str>,
    /// Limits applied to its instances.
    pub limits: Limits,
    /// Load generation of the version.
    pub generation: u64,
    /// Where its calls are counted.
    pub metrics: Arc<crate::metrics::PluginMetrics>,
}

/// A live instance: a store and the contract exports found in it.
pub struct Instance {
    /// The version it was instantiated from.
    pub meta: Arc<Meta>,
    /// Its store.
    pub store: Store<HostState>,
    /// The driver export, when the plugin has one.
    pub driver: Option<driver_export::Guest>,
    /// The guest export, when the plugin has one.
    pub guest: Option<guest_export::Guest>,
    /// The bulk export, when the plugin has one.
    pub bulk: Option<bulk_export::Guest>,
    /// Set once an entry trapped, overran or was abandoned: the instance must not be
    /// reused or entered again.
    pub poisoned: bool,
    _permit: OwnedSemaphorePermit,
}

/// The contract exports found in a new instance.
pub struct Exported {
    /// `driver`, when exported.
    pub driver: Option<driver_export::Guest>,
    /// `guest`, when exported.
    pub guest: Option<guest_export::Guest>,
    /// `bulk`, when exported.
    pub bulk: Option<bulk_export::Guest>,
}

/// Arms the deadline of one entry `op` into the instance of `store`; returns the
/// budget and the deadline, whose [`EntryDeadline::backstop`] (with
/// [`BACKSTOP_GRACE`]) bounds host-side awaits. Only an operation of the long lane
/// ([`Lane::of`]) may wait for long host calls beyond its budget: the others share
/// instances with reconcile and `get-vm`.
pub fn arm(store: &mut Store<HostState>, meta: &Meta, op: &str) -> (Duration, EntryDeadline) {
    let budget = meta.limits.call_timeout();
    let long = if Lane::of(op) == Lane::Long {
        meta.limits.long_call_timeout()
    } else {
        Duration::ZERO
    };
    let data = store.data_mut();
    data.limiter.arm(budget, long);
    data.log.start_call();
    (budget, data.limiter.entry_deadline())
}

impl Instance {
    /// Wraps an instantiated store (built by the version's `instantiate`).
    pub fn new(
        meta: Arc<Meta>,
        store: Store<HostState>,
        exported: Exported,
        permit: OwnedSemaphorePermit,
    ) -> Instance {
        Instance {
            meta,
            store,
            driver: exported.driver,
            guest: exported.guest,
            bulk: exported.bulk,
            poisoned: false,
            _permit: permit,
        }
    }

    /// Disarms the deadline and turns the outcome of an entry into the host's error.
    pub fn finish<T>(
        &mut self,
        op: &'static str,
        budget: Duration,
        outcome: std::result::Result<
            wasmtime::Result<std::result::Result<T, types::Error>>,
            Overran,
        >,
    ) -> Result<T> {
        let (stopped, dropped_log, took) = {
            let data = self.store.data_mut();
            let took = data.limiter.disarm();
            (data.limiter.stopped.take(), data.log.end_call(), took)
        };
        let plugin = self.meta.name.to_string();
        if dropped_log > 0 {
            tracing::warn!(
                plugin,
                op,
                dropped_lines = dropped_log,
                "plugin log lines dropped: over its log budget for one call"
            );
        }
        let result = match outcome {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(PluginError::Driver {
                plugin,
                op,
                error: DriverError::from(e).bounded(),
            }),
            Err(Overran) => {
                self.poisoned = true;
                Err(PluginError::Deadline {
                    plugin,
                    op,
                    budget,
                    ran: took,
                })
            }
            Ok(Err(trap)) => {
                self.poisoned = true;
                Err(self.trap_error(plugin, op, budget, took, stopped, trap))
            }
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(PluginError::Driver { .. }) => "driver-error",
            Err(PluginError::Deadline { .. }) => "deadline",
            Err(PluginError::MemoryCap { .. }) => "memory-cap",
            Err(PluginError::Budget { .. }) => "budget",
            Err(PluginError::Trap { .. }) => "trap",
            Err(PluginError::Panic { .. }) => "panic",
            Err(_) => "other",
        };
        self.meta.metrics.call(&self.meta.name, op, outcome, took);
        result
    }

    fn trap_error(
        &self,
        plugin: String,
        op: &'static str,
        budget: Duration,
        ran: Duration,
        stopped: Option<Stopped>,
        trap: wasmtime::Error,
    ) -> PluginError {
        match stopped {
            Some(Stopped::Deadline) => PluginError::Deadline {
                plugin,
                op,
                budget,
                ran,
            },
            Some(Stopped::Memory(asked)) => PluginError::MemoryCap {
                plugin,
                op,
                cap_mib: self.meta.limits.memory_mib,
                asked_mib: asked.div_ceil(1 << 20),
            },
            Some(Stopped::Budget { what, limit }) => PluginError::Budget {
                plugin,
                op,
                what,
                limit,
            },
            None if matches!(
                trap.downcast_ref::<ResourceTableError>(),
                Some(ResourceTableError::Full)
            ) =>
            {
                PluginError::Budget {
                    plugin,
                    op,
                    what: budget::HOST_RESOURCES,
                    limit: u64::from(self.meta.limits.max_host_resources),
                }
            }
            None => match trap.downcast_ref::<Trap>() {
                Some(Trap::UnreachableCodeReached) => PluginError::Panic { plugin, op },
                // The trap's own words ("call stack exhausted", ...), not the backtrace.
                Some(t) => PluginError::Trap {
                    plugin,
                    op,
                    message: t.to_string(),
                },
                None => PluginError::Trap {
                    plugin,
                    op,
                    message: crate::plugin::answers::bounded_message(format!("{trap:#}")),
                },
            },
        }
    }

    /// Drops a plugin-side resource. Its destructor is plugin code, so it runs under
    /// the same deadline as a call; one that overruns poisons the instance. A poisoned
    /// instance is not entered again (it is discarded with everything it holds).
    pub async fn drop_resource(&mut self, op: &'static str, resource: ResourceAny) -> Result<()> {
        if self.poisoned {
            return Ok(());
        }
        let (budget, deadline) = arm(&mut self.store, &self.meta, op);
        let store = &mut self.store;
        let outcome = deadline
            .backstop(BACKSTOP_GRACE, async move {
                resource
                    .resource_drop_async(store)
                    .await
                    .map(Ok::<(), types::Error>)
            })
            .await;
        self.finish(op, budget, outcome)
    }

    /// The host resources the instance holds now.
    pub fn holdings(&mut self) -> Holdings {
        budget::holdings(self.store.data_mut())
    }
}

/// Runs one export call on an [`Instance`] inside the sandbox: arms the deadline,
/// bounds host-side awaits with a backstop, maps traps to [`PluginError`]s, and marks
/// the instance poisoned when it must not be reused. A poisoned instance is not
/// entered.
///
/// `guarded!(instance, "op", driver, |export, store| export.call_x(store, ...))` where
/// `export` is the instance's driver (`driver`) or guest (`guest`) export.
macro_rules! guarded {
    ($inst:expr, $op:expr, $which:ident, |$ex:ident, $store:ident| $call:expr) => {{
        let inst: &mut $crate::plugin::instance::Instance = $inst;
        match inst.$which.as_ref() {
            _ if inst.poisoned => Err($crate::plugin::error::PluginError::Trap {
                plugin: inst.meta.name.to_string(),
                op: $op,
                message: "the instance failed earlier and is not entered again".into(),
            }),
            None => Err($crate::plugin::error::PluginError::NotSupported {
                plugin: inst.meta.name.to_string(),
                op: $op,
                reason: concat!("it does not export the ", stringify!($which), " interface").into(),
            }),
            Some($ex) => {
                let (budget, deadline) =
                    $crate::plugin::instance::arm(&mut inst.store, &inst.meta, $op);
                let $store = &mut inst.store;
                let outcome = deadline
                    .backstop($crate::plugin::instance::BACKSTOP_GRACE, $call)
                    .await;
                inst.finish($op, budget, outcome)
            }
        }
    }};
}
pub(crate) use guarded;
