//! One loaded version of a plugin ([`Loaded`]): its compiled component linked and
//! ready to instantiate, what it was lent, and its pool of warm instances.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{InstancePre, Linker};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::{bulk_export, driver_export, guest_export, types};
use super::cache::Origin;
use super::caps::Policies;
use super::contract::Exports;
use super::error::{PluginError, Result};
use super::grants::Limits;
use super::instance::{Exported, Instance, Meta};
use super::manifest::Bundle;
use super::pool::Pool;
use super::state::HostState;

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
    bulk: Option<bulk_export::GuestIndices>,
    instances: Arc<Semaphore>,
    /// Warm instances of this version, with their open sessions.
    pub(crate) pool: Arc<Pool>,
}

impl Loaded {
    /// Ok when its manifest names plugin `name`; else the manifest's error.
    pub fn names(&self, name: &str) -> Result<()> {
        if &*self.name == name {
            return Ok(());
        }
        Err(PluginError::Manifest {
            path: self.bundle.manifest_path.clone(),
            message: format!("names plugin '{}', not '{name}'", self.name),
        })
    }

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
        metrics: Arc<crate::metrics::PluginMetrics>,
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
        let bulk = if exports.bulk {
            Some(
                bulk_export::GuestIndices::new(&pre)
                    .map_err(|e| runtime("find its bulk export", e))?,
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
                metrics,
            }),
            pool: Arc::new(Pool::new(name.clone(), pool_size as usize, exports.driver)),
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
            bulk,
        })
    }

    /// Instantiates afresh, waiting for an instance slot if the plugin is at its cap.
    /// Instantiation runs the component's start code, so it is armed like a call.
    pub async fn instantiate(&self) -> Result<Instance> {
        let permit = self.instance_slot().await?;
        self.instantiate_in(permit).await
    }

    /// Waits for an instance slot (the plugin's `max-instances`).
    pub async fn instance_slot(&self) -> Result<OwnedSemaphorePermit> {
        self.instances
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PluginError::Unloaded(self.name.to_string()))
    }

    /// Instantiates afresh in instance slot `permit`.
    pub async fn instantiate_in(&self, permit: OwnedSemaphorePermit) -> Result<Instance> {
        let state = HostState::new(self.name.clone(), &self.policies, &self.meta.limits)?;
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
        let (_, deadline) = super::instance::arm(&mut store, &self.meta, "instantiate");
        let instance = deadline
            .backstop(
                super::instance::BACKSTOP_GRACE,
                self.pre.instantiate_async(&mut store),
            )
            .await;
        let ran = store.data_mut().limiter.disarm();
        let instance = instance
            .map_err(|_| PluginError::Deadline {
                plugin: self.name.to_string(),
                op: "instantiate",
                budget: self.meta.limits.call_timeout(),
                ran,
            })?
            .map_err(runtime)?;
        let driver = match &self.driver {
            Some(ix) => Some(ix.load(&mut store, &instance).map_err(runtime)?),
            None => None,
        };
        let guest = match &self.guest {
            Some(ix) => Some(ix.load(&mut store, &instance).map_err(runtime)?),
            None => None,
        };
        let bulk = match &self.bulk {
            Some(ix) => Some(ix.load(&mut store, &instance).map_err(runtime)?),
            None => None,
        };
        Ok(Instance::new(
            self.meta.clone(),
            store,
            Exported {
                driver,
                guest,
                bulk,
            },
            permit,
        ))
    }
}
