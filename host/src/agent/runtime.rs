//! The agent's driver, brought up at start from `[driver]` (or from the driver an
//! earlier run was given), or at runtime through `PUT /v1/driver` (`gve agent
//! driver set`) on an agent started without one: the new hypervisor plugin comes
//! online without a restart, and the choice is recorded for the next start.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use hyper::StatusCode;

use super::config::DriverConfig;
use super::guest::GuestRouter;
use super::model::OpState;
use super::registry::Registry;
use super::vms_api::registry_error;
use super::{open_guest, AgentCore, AgentError};
use crate::api::ApiError;
use crate::plugin::bindings::types::Credentials;
use crate::plugin::PluginHost;
use crate::sealing::Sealer;

/// Registry meta key of a driver given at runtime.
const DRIVER_KEY: &str = "driver";

/// What the agent's VM side runs on, and how to bring it up.
pub struct Runtime {
    /// The VM side, once a driver is set.
    pub core: ArcSwapOption<AgentCore>,
    plugins: PluginHost,
    registry: Registry,
    router: Arc<GuestRouter>,
    /// Seals the credentials of a driver given at runtime in its record.
    sealer: Arc<Sealer>,
    bundles_dir: Option<PathBuf>,
    reconciler: Mutex<Option<tokio::task::JoinHandle<()>>>,
    setting: tokio::sync::Mutex<()>,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: crate::metrics::AgentMetrics,
}

impl Runtime {
    /// A runtime with no driver yet.
    pub fn new(
        plugins: PluginHost,
        registry: Registry,
        router: Arc<GuestRouter>,
        sealer: Arc<Sealer>,
        bundles_dir: Option<PathBuf>,
    ) -> Runtime {
        Runtime {
            core: ArcSwapOption::empty(),
            metrics: crate::metrics::AgentMetrics::new(plugins.metrics()),
            plugins,
            registry,
            router,
            sealer,
            bundles_dir,
            reconciler: Mutex::new(None),
            setting: tokio::sync::Mutex::new(()),
        }
    }

    /// The Prometheus exposition, its gauges read now.
    pub fn metrics_text(&self) -> Result<String, ApiError> {
        use crate::metrics::{count, name_of};
        let ops = self.registry.operations().map_err(registry_error)?;
        let vms = self.registry.vms().map_err(registry_error)?;
        let _one = self
            .metrics
            .scrape
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.metrics.work.set_now(
            count(ops.iter().filter(|o| o.state == OpState::Running), |o| {
                (o.kind.as_str().to_string(), name_of(&o.state))
            }),
            count(&vms, |v| name_of(&v.vm.state)),
        );
        Ok(self.metrics.render())
    }

    /// The registry database.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The driver an earlier run was given at runtime, if any.
    /// Its password and token are unsealed; a record from before they were
    /// sealed is sealed now. An unreadable record is logged and taken as none;
    /// credentials that cannot be unsealed (`agent.key` lost or replaced) are an
    /// error: the agent would otherwise log in with the wrong ones.
    pub fn recorded(&self) -> Result<Option<DriverConfig>, String> {
        let Some(json) = self.registry.meta(DRIVER_KEY).ok().flatten() else {
            return Ok(None);
        };
        let mut d: DriverConfig = match serde_json::from_str(&json) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("unreadable driver record: {e}");
                return Ok(None);
            }
        };
        let secrets = [("password", &mut d.password), ("token", &mut d.token)];
        let plain = self
            .sealer
            .open_all(
                secrets
                    .into_iter()
                    .filter_map(|(what, v)| Some((what, v.as_mut()?))),
            )
            .map_err(|(what, e)| {
                format!(
                    "the driver recorded at runtime has a {what} that cannot be read ({e}): \
                     put back the agent.key it was sealed under, or give [driver] in the \
                     config file"
                )
            })?;
        if plain {
            match self.record(&d) {
                Ok(()) => tracing::info!("the driver's recorded credentials are sealed now"),
                Err(e) => tracing::error!("the driver's record stays unsealed: {}", e.message),
            }
        }
        Ok(Some(d))
    }

    /// Records `d` as the driver given at runtime, its password and token sealed.
    fn record(&self, d: &DriverConfig) -> Result<(), ApiError> {
        let mut sealed = d.clone();
        self.sealer.seal_all(
            [&mut sealed.password, &mut sealed.token]
                .into_iter()
                .flatten(),
        );
        let json =
            serde_json::to_string(&sealed).map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.registry
            .write(|t| t.set_meta(DRIVER_KEY, &json))
            .map_err(registry_error)
    }

    /// Checks a driver config against the loaded plugins.
    pub fn check(&self, d: &DriverConfig) -> Result<(), String> {
        let loaded = |name: &str| self.plugins.slot(name).and_then(|s| s.current());
        loaded(&d.plugin).map_err(|_| format!("driver plugin '{}' is not loaded", d.plugin))?;
        if let Some(g) = &d.guest_plugin {
            let l = loaded(g).map_err(|_| format!("guest plugin '{g}' is not loaded"))?;
            if !l.policies.effective.guest_channel {
                return Err(format!(
                    "guest plugin '{g}' is not granted the guest channel"
                ));
            }
        }
        if d.reconcile_period_ms < 100 {
            return Err("reconcile-period-ms must be at least 100".into());
        }
        if d.endpoint.is_empty() || d.endpoint.len() > 2048 {
            return Err("endpoint must be 1-2048 characters".into());
        }
        // A path through the API could name any file the agent may read (its
        // keys, /proc), to be sent to an endpoint the caller picks: files are
        // the operator's, in the config file.
        if d.password_file.is_some() || d.token_file.is_some() {
            return Err(
                "password-file and token-file are read from the agent's config file ([driver]) \
                 only; here give password or token"
                    .into(),
            );
        }
        Ok(())
    }

    /// Opens the driver session (and guest provider), resolves operations an
    /// earlier run left, reconciles once and starts the reconcile loop.
    pub async fn bring_up(&self, d: &DriverConfig) -> Result<Arc<AgentCore>, AgentError> {
        // Files are read at each start: a rotated secret is taken up by the
        // next one.
        let (password, token) = d.secrets().map_err(AgentError::Secret)?;
        let creds = Credentials {
            username: d.username.clone(),
            password,
            token,
        };
        let driver = self
            .plugins
            .open_driver(&d.plugin, &d.endpoint, creds.clone())
            .await
            .map_err(|source| AgentError::Driver {
                plugin: d.plugin.clone(),
                endpoint: d.endpoint.clone(),
                source,
            })?;
        self.router.insert(driver.clone());
        let guest = open_guest(&self.plugins, d, &creds).await?;
        // Readiness waits hear guest agents connect when the endpoint is a
        // libvirt URI granted to the driver (the agent opens it itself).
        let granted_libvirt = self
            .plugins
            .slot(&d.plugin)
            .and_then(|s| s.current())
            .is_ok_and(|l| l.policies.effective.libvirt.contains(&d.endpoint));
        let core = Arc::new(AgentCore {
            registry: self.registry.clone(),
            driver,
            reservation_seconds: d.reservation_seconds,
            guest,
            bundles_dir: self.bundles_dir.clone(),
            migration_uri: d.migration_uri.clone(),
            removed: Default::default(),
            guest_gates: self.router.gates(),
            metrics: self.metrics.work.clone(),
            ready_events: super::ready_events::ReadyEvents::new(
                granted_libvirt.then(|| d.endpoint.clone()),
            ),
        });
        let resolved = core.recover().await?;
        // In the background: a disk whose guest holds on to it costs its release
        // timeout, and nothing else waits for these.
        let staged = core.clone();
        tokio::spawn(async move { super::bulk_copy::recover(&staged).await });
        if resolved > 0 {
            tracing::warn!(
                resolved,
                "resolved operations interrupted by the previous run"
            );
        }
        if let Err(e) = core.reconcile().await {
            tracing::warn!("first reconcile: {e}");
        }
        let task = core.spawn_reconciler(std::time::Duration::from_millis(d.reconcile_period_ms));
        if let Some(old) = self
            .reconciler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task)
        {
            old.abort();
        }
        self.core.store(Some(core.clone()));
        Ok(core)
    }

    /// `PUT /v1/driver`: gives an agent without a driver one, and records it.
    pub async fn set(&self, d: DriverConfig) -> Result<Arc<AgentCore>, ApiError> {
        let _one_at_a_time = self.setting.lock().await;
        if let Some(core) = self.core.load_full() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid-state",
                format!(
                    "this agent already runs driver '{}' on {}",
                    core.driver.plugin(),
                    core.driver.endpoint()
                ),
            ));
        }
        self.check(&d).map_err(ApiError::bad_request)?;
        let core = self.bring_up(&d).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        })?;
        self.record(&d)?;
        // Who reads the log learns what was set, never a credential.
        let detail = serde_json::json!({
            "plugin": d.plugin,
            "endpoint": d.endpoint,
            "guest-plugin": d.guest_plugin,
            "migration-uri": d.migration_uri,
            "username": d.username,
            "password-set": d.password.is_some(),
            "token-set": d.token.is_some(),
        });
        self.registry
            .audit("driver.set", &d.plugin, detail)
            .map_err(registry_error)?;
        tracing::info!(
            plugin = d.plugin,
            endpoint = d.endpoint,
            "driver set at runtime"
        );
        Ok(core)
    }

    /// The agent's audit log after `after`.
    pub fn audit(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<crate::agent::model::AuditEntry>, ApiError> {
        self.registry
            .audit_after(after, limit)
            .map_err(registry_error)
    }

    /// A watch on the registry's closing.
    pub fn close_watch(&self) -> crate::store_core::CloseWatch {
        self.registry.close_watch()
    }

    /// Tells a running retention pass to end after its batch (the agent stops).
    pub fn stop_background(&self) {
        self.registry.stop_background();
    }

    /// Stops the reconcile loop and waits until it is gone.
    pub async fn stop(&self) {
        let task = self
            .reconciler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }
}
