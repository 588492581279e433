//! One version of a plugin ready to instantiate ([`Loaded`]) and one live instance of
//! it ([`Instance`]), with the per-call sandbox: deadline, memory cap, trap mapping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{InstancePre, Linker};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::{driver_export, guest_export, types};
use super::cache::Origin;
use super::caps::Policies;
use super::contract::Exports;
use super::error::{DriverError, PluginError, Result};
use super::grants::Limits;
use super::limits::Stopped;
use super::manifest::Bundle;
use super::state::HostState;

/// Extra time given to host-side awaits (libvirt, HTTP) beyond the call budget
/// before the call is abandoned.
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
}

/// One loaded version of a plugin.
pub struct Loaded {
    /// Plugin name.
    pub name: Arc<str>,
    /// Name, limits and generation, shared with its instances.
    pub meta: Arc<Meta>,
    /// The bundle it was loaded from.
    pub bundle: Bundle,
    /// SHA-256 of the component file.
    pub component_sha256: String,
    /// Compiled now or taken from the cache.
    pub origin: Origin,
    /// Contract interfaces it exports.
    pub exports: Exports,
    /// Driver description (plugins exporting `driver`).
    pub driver_info: Option<types::DriverInfo>,
    /// Capabilities lent to it.
    pub policies: Policies,
    /// When it was loaded.
    pub loaded_at: std::time::SystemTime,
    pre: InstancePre<HostState>,
    driver: Option<driver_export::GuestIndices>,
    guest: Option<guest_export::GuestIndices>,
    instances: Arc<Semaphore>,
    /// Warm instances of this version, with their open sessions.
    pub(crate) pool: crate::plugin::session::Pool,
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
    /// Set once a call trapped or was abandoned: the instance must not be reused.
    pub poisoned: bool,
    _permit: OwnedSemaphorePermit,
}

impl Loaded {
    /// Prepares a compiled component for instantiation.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        linker: &Linker<HostState>,
        component: &wasmtime::component::Component,
        bundle: Bundle,
        component_sha256: String,
        origin: Origin,
        exports: Exports,
        limits: Limits,
        policies: Policies,
        generation: u64,
    ) -> Result<Loaded> {
        let name: Arc<str> = Arc::from(bundle.manifest.name.as_str());
        let runtime = |action, e| PluginError::runtime(&*name, action, e);
        let pre = linker
            .instantiate_pre(component)
            .map_err(|e| runtime("link its imports", e))?;
        let driver = if exports.driver {
            Some(
                driver_export::GuestIndices::new(&pre)
                    .map_err(|e| runtime("find its driver export", e))?,
            )
        } else {
            None
        };
        let guest = if exports.guest {
            Some(
                guest_export::GuestIndices::new(&pre)
                    .map_err(|e| runtime("find its guest export", e))?,
            )
        } else {
            None
        };
        let pool_size = limits
            .pool_size
            .min(bundle.manifest.limits.concurrency)
            .max(1);
        Ok(Loaded {
            instances: Arc::new(Semaphore::new(limits.max_instances as usize)),
            meta: Arc::new(Meta {
                name: name.clone(),
                limits,
                generation,
            }),
            pool: crate::plugin::session::Pool::new(pool_size as usize),
            name,
            bundle,
            component_sha256,
            origin,
            exports,
            driver_info: None,
            policies,
            loaded_at: std::time::SystemTime::now(),
            pre,
            driver,
            guest,
        })
    }

    /// Instantiates afresh, waiting for an instance slot if the plugin is at its cap.
    pub async fn instantiate(&self) -> Result<Instance> {
        let permit = self
            .instances
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PluginError::NotLoaded(self.name.to_string()))?;
        let state = HostState::new(
            self.name.clone(),
            &self.policies,
            (self.meta.limits.memory_mib as usize) << 20,
        )?;
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            if ctx.data_mut().limiter.deadline_passed() {
                Err(Trap::Interrupt.into())
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let runtime = |e| PluginError::runtime(&*self.name, "instantiate", e);
        store.data_mut().limiter.deadline = Some(Instant::now() + self.meta.limits.call_timeout());
        let instance = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(runtime)?;
        store.data_mut().limiter.deadline = None;
        let driver = match &self.driver {
            Some(ix) => Some(ix.load(&mut store, &instance).map_err(runtime)?),
            None => None,
        };
        let guest = match &self.guest {
            Some(ix) => Some(ix.load(&mut store, &instance).map_err(runtime)?),
            None => None,
        };
        Ok(Instance {
            meta: self.meta.clone(),
            store,
            driver,
            guest,
            poisoned: false,
            _permit: permit,
        })
    }
}

impl Instance {
    /// Disarms the deadline and turns the outcome of a call into the host's error.
    pub fn finish<T>(
        &mut self,
        op: &'static str,
        budget: Duration,
        outcome: std::result::Result<
            wasmtime::Result<std::result::Result<T, types::Error>>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<T> {
        let stopped = {
            let l = &mut self.store.data_mut().limiter;
            l.deadline = None;
            l.stopped.take()
        };
        let plugin = self.meta.name.to_string();
        match outcome {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(PluginError::Driver {
                plugin,
                op,
                error: DriverError::from(e),
            }),
            Err(_elapsed) => {
                self.poisoned = true;
                Err(PluginError::Deadline { plugin, op, budget })
            }
            Ok(Err(trap)) => {
                self.poisoned = true;
                Err(match stopped {
                    Some(Stopped::Deadline) => PluginError::Deadline { plugin, op, budget },
                    Some(Stopped::Memory(asked)) => PluginError::MemoryCap {
                        plugin,
                        op,
                        cap_mib: self.meta.limits.memory_mib,
                        asked_mib: asked.div_ceil(1 << 20),
                    },
                    None => match trap.downcast_ref::<Trap>() {
                        Some(Trap::UnreachableCodeReached) => PluginError::Panic { plugin, op },
                        _ => PluginError::Trap {
                            plugin,
                            op,
                            message: format!("{trap:#}"),
                        },
                    },
                })
            }
        }
    }
}

/// Runs one export call on an [`Instance`] inside the sandbox: arms the deadline,
/// bounds host-side awaits with a backstop, maps traps to [`PluginError`]s, and marks
/// the instance poisoned when it must not be reused.
///
/// `guarded!(instance, "op", |export, store| export.call_x(store, ...))` where
/// `export` is the instance's driver (`driver`) or guest (`guest`) export.
macro_rules! guarded {
    ($inst:expr, $op:expr, $which:ident, |$ex:ident, $store:ident| $call:expr) => {{
        let inst: &mut $crate::plugin::instance::Instance = $inst;
        match inst.$which.as_ref() {
            None => Err($crate::plugin::error::PluginError::NotSupported {
                plugin: inst.meta.name.to_string(),
                op: $op,
                reason: concat!("it does not export the ", stringify!($which), " interface").into(),
            }),
            Some($ex) => {
                let (budget, backstop) = {
                    // Re-borrow: `begin` needs the whole instance.
                    let b = inst.meta.limits.call_timeout();
                    let data = inst.store.data_mut();
                    data.limiter.deadline = Some(std::time::Instant::now() + b);
                    data.limiter.stopped = None;
                    (b, b + $crate::plugin::instance::BACKSTOP_GRACE)
                };
                let $store = &mut inst.store;
                let outcome = tokio::time::timeout(backstop, $call).await;
                inst.finish($op, budget, outcome)
            }
        }
    }};
}
pub(crate) use guarded;
