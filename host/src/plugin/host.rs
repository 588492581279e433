//! The plugin host: loads, replaces and unloads plugins at runtime and hands out
//! sessions on them.
//!
//! Each plugin name has a [`Slot`] whose current version is swapped atomically. A call
//! holds the version it started on, so a replacement lets in-flight calls finish on
//! the old version while new calls go to the new one: no restart, no failed call.
//! Slots are kept across unload, so sessions follow a plugin by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::component::{HasSelf, Linker};

use super::bindings::{types, PluginHost as Contract};
use super::cache::{ArtifactCache, Origin};
use super::caps::guest_channel::GuestChannel;
use super::caps::Policies;
use super::contract;
pub use super::contract::capability_names;
use super::engine::{EngineSettings, PluginEngine};
use super::error::{PluginError, Result};
use super::grants::{Grants, Limits};
use super::instance::guarded;
use super::manifest::Bundle;
use super::session::{DriverSession, GuestSession};
use super::slot::Slot;
use super::state::HostState;
use super::version::Loaded;

/// How the host is set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Directory for precompiled artifacts.
    pub cache_dir: PathBuf,
    /// Engine-wide settings.
    pub engine: EngineSettings,
}

/// What the operator configures for one plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginSpec {
    /// Bundle directory (or manifest path).
    pub bundle: PathBuf,
    /// What the plugin is granted.
    #[serde(default)]
    pub grants: Grants,
    /// Its resource limits.
    #[serde(default)]
    pub limits: Limits,
}

/// What a loaded plugin is, for operators.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct PluginSummary {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// Contract version of its component.
    pub contract: String,
    /// Component file.
    pub component: PathBuf,
    /// SHA-256 of the component.
    pub sha256: String,
    /// `compiled` or `cached`.
    pub origin: String,
    /// Exports `gve:hypervisor/driver`.
    pub driver: bool,
    /// Exports `gve:hypervisor/guest`.
    pub guest: bool,
    /// Hypervisor kind (drivers).
    pub hypervisor_kind: Option<String>,
    /// Declared capabilities (drivers).
    pub capabilities: Vec<String>,
    /// What it was granted (grants it asked for).
    pub granted: BTreeMap<String, Vec<String>>,
    /// Grants given by the operator that the manifest did not request (not lent).
    pub ignored_grants: Vec<String>,
    /// Its limits.
    #[serde(deserialize_with = "Limits::lenient")]
    pub limits: Limits,
    /// What ending a guest command takes it, ms: its manifest's `exec-margin-ms`,
    /// or its limits' when higher. The agent allows exec timeouts of at most the
    /// call budget less this.
    #[serde(default = "default_exec_margin_ms")]
    pub exec_margin_ms: u64,
    /// Load generation; grows with every load or replace.
    pub generation: u64,
}

/// The exec margin in force: the manifest's `declared`, or the operator's limit
/// when higher (never lower: the plugin declares what it needs).
fn exec_margin(limits: &Limits, declared: u64) -> u64 {
    limits.exec_margin_ms.map_or(declared, |m| m.max(declared))
}

/// The exec margin of a summary that does not say (an older agent's): the default.
fn default_exec_margin_ms() -> u64 {
    super::manifest::DeclaredLimits::default().exec_margin_ms
}

/// What one fresh instance of a plugin costs ([`PluginHost::footprint`]).
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    /// Time to instantiate it (its start code included).
    pub instantiate: std::time::Duration,
    /// Time for its first `info` call (zero for a guest provider).
    pub info: std::time::Duration,
    /// Linear memory it holds after instantiation and `info`, bytes.
    pub memory_bytes: u64,
}

struct Inner {
    engine: PluginEngine,
    cache: ArtifactCache,
    linker: Linker<HostState>,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    generation: AtomicU64,
    guest_channel: RwLock<Option<Arc<dyn GuestChannel>>>,
    metrics: Arc<crate::metrics::PluginMetrics>,
}

/// The plugin host. Cheap to clone.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
}

impl PluginHost {
    /// Creates the engine, the artifact cache and the linker with every capability.
    pub fn new(config: HostConfig) -> Result<PluginHost> {
        let engine = PluginEngine::new(config.engine)?;
        let cache_dir =
            std::path::absolute(&config.cache_dir).map_err(|source| PluginError::Io {
                path: config.cache_dir.clone(),
                source,
            })?;
        let cache = ArtifactCache::new(cache_dir)?;
        let linker = linker(engine.engine())?;
        Ok(PluginHost {
            inner: Arc::new(Inner {
                engine,
                cache,
                linker,
                slots: RwLock::new(BTreeMap::new()),
                generation: AtomicU64::new(0),
                guest_channel: RwLock::new(None),
                metrics: Default::default(),
            }),
        })
    }

    /// What its plugins' calls counted (`gve_plugin_*` metrics).
    pub fn metrics(&self) -> &Arc<crate::metrics::PluginMetrics> {
        &self.inner.metrics
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &wasmtime::Engine {
        self.inner.engine.engine()
    }

    /// Sets the router by which plugins granted the guest channel reach VMs' agents.
    /// Applies to plugins loaded or replaced afterwards.
    pub fn set_guest_channel(&self, router: Arc<dyn GuestChannel>) {
        *self
            .inner
            .guest_channel
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(router);
    }

    /// Loads a plugin that is not loaded yet.
    pub async fn load(&self, spec: PluginSpec) -> Result<PluginSummary> {
        self.load_checked(spec, None).await
    }

    /// Loads a plugin that is not loaded yet, only if its manifest names `name`: a
    /// caller that decided on the name (its grants checked for that plugin) gets that
    /// plugin or an error, even if the bundle changed since it looked.
    pub async fn load_named(&self, name: &str, spec: PluginSpec) -> Result<PluginSummary> {
        self.load_checked(spec, Some(name)).await
    }

    async fn load_checked(&self, spec: PluginSpec, name: Option<&str>) -> Result<PluginSummary> {
        let loaded = self.prepare(spec).await?;
        if let Some(name) = name {
            loaded.names(name)?;
        }
        let loaded = Arc::new(loaded);
        let mut slots = self.inner.slots.write().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .entry(loaded.name.to_string())
            .or_insert_with(|| Arc::new(Slot::new(&loaded.name)));
        if slot.is_loaded() {
            return Err(PluginError::AlreadyLoaded(loaded.name.to_string()));
        }
        let summary = summary(&loaded);
        slot.install(loaded);
        tracing::info!(
            plugin = summary.name,
            version = summary.version,
            "plugin loaded"
        );
        Ok(summary)
    }

    /// Replaces a loaded plugin with another version of it. In-flight calls finish
    /// on the old version; calls that start afterwards use the new one.
    pub async fn replace(&self, name: &str, spec: PluginSpec) -> Result<PluginSummary> {
        let slot = self.slot(name)?;
        let loaded = self.prepare(spec).await?;
        loaded.names(name)?;
        let summary = summary(&loaded);
        if !slot.is_loaded() {
            return Err(PluginError::NotLoaded(name.to_string()));
        }
        if slot.install(Arc::new(loaded)).is_none() {
            // Unloaded while the new version was being prepared: stay unloaded.
            slot.clear();
            return Err(PluginError::NotLoaded(name.to_string()));
        }
        tracing::info!(plugin = name, version = summary.version, "plugin replaced");
        Ok(summary)
    }

    /// Unloads a plugin. Calls in flight finish; later calls fail with `Unloaded`
    /// until a version of it is loaded again. Its warm instances, and every host
    /// resource they hold, go with the version.
    pub fn unload(&self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        if slot.clear().is_none() {
            return Err(PluginError::NotLoaded(name.to_string()));
        }
        tracing::info!(plugin = name, "plugin unloaded");
        Ok(())
    }

    /// Every loaded plugin.
    pub fn list(&self) -> Vec<PluginSummary> {
        let slots = self.inner.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .values()
            .filter_map(|s| s.current().ok())
            .map(|l| summary(&l))
            .collect()
    }

    /// One loaded plugin.
    pub fn get(&self, name: &str) -> Result<PluginSummary> {
        Ok(summary(&*self.slot(name)?.current()?))
    }

    /// The slot of a plugin loaded now or earlier (empty while unloaded).
    pub fn slot(&self, name: &str) -> Result<Arc<Slot>> {
        let slots = self.inner.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .get(name)
            .cloned()
            .ok_or_else(|| PluginError::NotLoaded(name.to_string()))
    }

    /// Calls the driver's `info` on a fresh instance.
    pub async fn driver_info(&self, name: &str) -> Result<types::DriverInfo> {
        let loaded = self.slot(name)?.current()?;
        let mut inst = loaded.instantiate().await?;
        guarded!(&mut inst, "info", driver, |d, store| async {
            d.call_info(store).await.map(Ok)
        })
    }

    /// What one fresh instance of `name` costs: the time to instantiate it and to
    /// answer `info` (drivers), and the linear memory it then holds.
    pub async fn footprint(&self, name: &str) -> Result<Footprint> {
        let loaded = self.slot(name)?.current()?;
        let t = std::time::Instant::now();
        let mut inst = loaded.instantiate().await?;
        let instantiate = t.elapsed();
        let t = std::time::Instant::now();
        if inst.driver.is_some() {
            guarded!(&mut inst, "info", driver, |d, store| async {
                d.call_info(store).await.map(Ok)
            })?;
        }
        Ok(Footprint {
            instantiate,
            info: t.elapsed(),
            memory_bytes: inst.store.data().limiter.memory_bytes() as u64,
        })
    }

    /// Opens a driver session on `endpoint`.
    pub async fn open_driver(
        &self,
        name: &str,
        endpoint: &str,
        credentials: types::Credentials,
    ) -> Result<DriverSession> {
        DriverSession::open(self.slot(name)?, endpoint, credentials).await
    }

    /// Opens a guest session on `endpoint`.
    pub async fn open_guest(
        &self,
        name: &str,
        endpoint: &str,
        credentials: types::Credentials,
    ) -> Result<GuestSession> {
        GuestSession::open(self.slot(name)?, endpoint, credentials).await
    }

    /// Reads, compiles (or takes from the cache), links and checks a plugin version.
    async fn prepare(&self, spec: PluginSpec) -> Result<Loaded> {
        let max = self.inner.engine.settings().max_memory_mib;
        spec.limits.validate(max).map_err(PluginError::Config)?;
        spec.grants.validate().map_err(PluginError::Config)?;
        let bundle = Bundle::read(&spec.bundle)?;
        let name = bundle.manifest.name.clone();
        if !contract::is_accepted(&bundle.contract) {
            return Err(PluginError::Contract {
                plugin: name,
                message: format!(
                    "its manifest names {}; this host accepts {}",
                    bundle.contract,
                    contract::accepted_description()
                ),
            });
        }
        let inner = self.inner.clone();
        let path = bundle.component_path.clone();
        let plugin = name.clone();
        let (component, origin, sha) = tokio::task::spawn_blocking(move || {
            let bytes = read(&path)?;
            let sha = hex::encode(Sha256::digest(&bytes));
            let (c, origin) = inner.cache.load(inner.engine.engine(), &plugin, &bytes)?;
            Ok::<_, PluginError>((c, origin, sha))
        })
        .await
        .map_err(|e| PluginError::runtime(&name, "compile", e))??;
        let exports = contract::inspect(self.engine(), &component).map_err(|message| {
            PluginError::Contract {
                plugin: name.clone(),
                message,
            }
        })?;
        if exports.version != bundle.contract {
            return Err(PluginError::Manifest {
                path: bundle.manifest_path.clone(),
                message: format!(
                    "names contract {} but the component implements {}",
                    bundle.contract, exports.version
                ),
            });
        }
        let mut effective = spec.grants.effective(&bundle.manifest.requests);
        effective.config.extend(
            spec.grants
                .config_file_values()
                .map_err(PluginError::Config)?,
        );
        if !effective.http.is_empty() {
            effective.tls = spec.grants.tls_configs().map_err(PluginError::Config)?;
        }
        if !effective.ignored.is_empty() {
            tracing::warn!(plugin = name, ignored = ?effective.ignored, "grants given but not requested by the manifest are not lent");
        }
        let declared = bundle.manifest.limits.exec_margin_ms;
        let margin = exec_margin(&spec.limits, declared);
        if let Some(asked) = spec.limits.exec_margin_ms.filter(|m| *m < declared) {
            // Not refused: a bundle update that declares more must not keep the
            // plugin (or the agent) from loading.
            tracing::warn!(
                plugin = name,
                exec_margin_ms = asked,
                declared,
                "limits.exec-margin-ms is below what the plugin declares it needs to end a guest command; its own is used"
            );
        }
        if exports.guest && margin >= spec.limits.call_timeout_ms {
            tracing::warn!(
                plugin = name,
                exec_margin_ms = margin,
                call_timeout_ms = spec.limits.call_timeout_ms,
                "the call budget does not exceed the plugin's exec margin: guest commands get at most 1 ms; raise call-timeout-ms"
            );
        }
        let router = self
            .inner
            .guest_channel
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let policies = Policies::new(&name, effective, &spec.limits, router);
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let mut loaded = Loaded::new(
            &self.inner.linker,
            &component,
            bundle,
            sha,
            origin,
            exports,
            spec.limits,
            policies,
            generation,
            self.inner.metrics.clone(),
        )?;
        if exports.driver {
            let mut inst = loaded.instantiate().await?;
            let info = guarded!(&mut inst, "info", driver, |d, store| async {
                d.call_info(store).await.map(Ok)
            })?;
            drop(inst);
            let m = &loaded.bundle.manifest;
            if info.name != m.name || info.version != m.version.to_string() {
                return Err(PluginError::Manifest {
                    path: loaded.bundle.manifest_path.clone(),
                    message: format!(
                        "says {} {}, but the component's info() says {} {}",
                        m.name, m.version, info.name, info.version
                    ),
                });
            }
            loaded.driver_info = Some(info);
        }
        Ok(loaded)
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| PluginError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The linker every plugin is instantiated with: WASI (filesystem limited to granted
/// preopens, no sockets), wasi:http (gated by the allow-list hook) and the contract's
/// host imports (each gated by its capability module).
fn linker(engine: &wasmtime::Engine) -> Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    let err = |e| PluginError::runtime("<host>", "build the linker", e);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(err)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(err)?;
    super::caps::files::add_budgets(&mut linker).map_err(err)?;
    super::caps::clocks::add_timers(&mut linker).map_err(err)?;
    super::caps::http::add_budgets(&mut linker).map_err(err)?;
    Contract::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(err)?;
    Ok(linker)
}

fn summary(l: &Loaded) -> PluginSummary {
    let e = &l.policies.effective;
    let mut granted = BTreeMap::new();
    let dirs: Vec<String> = e
        .directories
        .iter()
        .map(|d| {
            format!(
                "{} -> {}{}",
                d.host.display(),
                d.guest,
                if d.writable { " (rw)" } else { "" }
            )
        })
        .collect();
    for (k, v) in [
        ("http", e.http.clone()),
        ("libvirt", e.libvirt.clone()),
        ("directories", dirs),
    ] {
        if !v.is_empty() {
            granted.insert(k.to_string(), v);
        }
    }
    if e.guest_channel {
        granted.insert("guest-channel".into(), vec!["yes".into()]);
    }
    PluginSummary {
        name: l.name.to_string(),
        version: l.bundle.manifest.version.to_string(),
        contract: l.exports.version.to_string(),
        component: l.bundle.component_path.clone(),
        sha256: l.component_sha256.clone(),
        origin: match l.origin {
            Origin::Compiled => "compiled".into(),
            Origin::Cached => "cached".into(),
        },
        driver: l.exports.driver,
        guest: l.exports.guest,
        hypervisor_kind: l.driver_info.as_ref().map(|i| i.hypervisor_kind.clone()),
        capabilities: l
            .driver_info
            .as_ref()
            .map(|i| capability_names(i.capabilities))
            .unwrap_or_default()
            .into_iter()
            .chain(
                l.exports
                    .bulk
                    .then(|| super::contract::BULK_COPY.to_string()),
            )
            .collect(),
        granted,
        ignored_grants: e.ignored.clone(),
        limits: l.meta.limits,
        exec_margin_ms: exec_margin(&l.meta.limits, l.bundle.manifest.limits.exec_margin_ms),
        generation: l.meta.generation,
    }
}
