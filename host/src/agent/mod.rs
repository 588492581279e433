//! The agent service: one per hypervisor host. It keeps a registry of the host's VMs
//! and templates in sync with the hypervisor, runs VM operations asynchronously
//! through its driver plugin, and lets its administrator manage plugins at runtime.

pub mod bulk_copy;
pub mod bulk_out;
pub mod config;
pub mod guest;
pub mod guest_api;
pub mod guest_gate;
mod guest_job;
pub mod model;
pub mod ops;
mod pieces;
pub mod plugin_admin;
pub mod plugins_api;
pub mod policy;
pub mod provision;
pub mod ready;
pub mod ready_events;
pub mod reconcile;
pub mod registry;
pub mod runtime;
pub mod site_claim;
pub mod vms_api;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;
use tokio::sync::oneshot;

use crate::api::{self, server::Handler, ApiError, Response};
use crate::plugin::bindings::types::Credentials;
use crate::plugin::{DriverSession, HostConfig, PluginError, PluginHost};
pub use config::AgentConfig;
use registry::{Registry, RegistryError};

/// The VM side of an agent: its registry and its driver session.
pub struct AgentCore {
    /// The registry database.
    pub registry: Registry,
    /// The driver session every VM operation runs on.
    pub driver: DriverSession,
    /// Default reservation length, seconds.
    pub reservation_seconds: u64,
    /// Where exec and copy run: the driver's own guest export or the guest plugin;
    /// else why there is none.
    pub guest: Result<guest::GuestProvider, String>,
    /// Software bundles for provision.
    pub bundles_dir: Option<std::path::PathBuf>,
    /// Where migrations to this host are sent (default: the driver endpoint).
    pub migration_uri: Option<String>,
    /// VMs this agent removed recently (id → Unix ms), so a reconcile pass whose
    /// listing predates the removal does not report them as appeared.
    pub(crate) removed: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Each VM's gate to its guest agent (shared with the guest router).
    pub guest_gates: Arc<guest_gate::GuestGates>,
    /// Where ended operations are counted (`gve_agent_operations_*`).
    pub metrics: Arc<crate::metrics::WorkMetrics>,
    /// Guest agents connecting behind the driver's endpoint (libvirt drivers).
    pub ready_events: ready_events::ReadyEvents,
}

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The plugin host failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The registry could not be opened.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The driver session could not be opened.
    #[error("driver '{plugin}' on {endpoint}: {source}")]
    Driver {
        /// Plugin.
        plugin: String,
        /// Endpoint.
        endpoint: String,
        /// Cause.
        #[source]
        source: PluginError,
    },
    /// The TLS setup is not usable.
    #[error("tls: {0}")]
    Tls(String),
    /// The driver's password or token could not be read.
    #[error("driver credentials: {0}")]
    Secret(String),
    /// The key sealing what is recorded (`agent.key`) could not be read or made.
    #[error(transparent)]
    Key(#[from] crate::sealing::SealError),
    /// Plugins recorded at runtime could not be read back.
    #[error("restoring plugins recorded at runtime: {0}")]
    Restore(String),
    /// A configured plugin failed to load.
    #[error("plugin '{name}' from the agent config: {source}")]
    ConfiguredPlugin {
        /// Plugin name in the config.
        name: String,
        /// Cause.
        #[source]
        source: PluginError,
    },
}

/// The OpenAPI 3 document of the agent's HTTP API (also `docs/agent-openapi.yaml`).
pub const OPENAPI: &str = include_str!("../../../docs/agent-openapi.yaml");

struct AgentApi {
    admin: Arc<plugin_admin::PluginAdmin>,
    runtime: Arc<runtime::Runtime>,
    admin_token: String,
    metrics_token: Option<String>,
}

impl AgentApi {
    async fn route(&self, req: Request<Incoming>) -> Result<Response, ApiError> {
        let path = req.uri().path().to_string();
        let segs = api::segments(&path);
        match segs.as_slice() {
            ["v1", "health"] => return api::ok(&serde_json::json!({ "status": "ok" })),
            ["v1", "openapi.yaml"] => return api::yaml(OPENAPI),
            _ => {}
        }
        let scrape = req.method() == hyper::Method::GET && segs.as_slice() == ["metrics"];
        match &self.metrics_token {
            Some(m) if scrape && !m.is_empty() && api::check_bearer(&req, m).is_ok() => {}
            _ => api::check_bearer(&req, &self.admin_token)?,
        }
        match (req.method().clone(), segs.as_slice()) {
            (hyper::Method::GET, ["metrics"]) => Ok(api::text(
                crate::metrics::CONTENT_TYPE,
                self.runtime.metrics_text()?,
            )),
            (_, ["v1", "plugins", rest @ ..]) => plugins_api::handle(&self.admin, req, rest).await,
            (hyper::Method::GET, ["v1", "audit"]) => {
                let after = api::query_u64(req.uri(), "after", 0, 0, u64::MAX)?;
                let limit = api::query_u64(req.uri(), "limit", 1000, 1, api::MAX_LIST)?;
                api::ok(&self.runtime.audit(after, limit as usize)?)
            }
            (hyper::Method::PUT, ["v1", "driver"]) => {
                let d: config::DriverConfig = api::read_json(req.into_body()).await?;
                let core = self.runtime.set(d).await?;
                api::ok(&serde_json::json!({
                    "plugin": core.driver.plugin(),
                    "endpoint": core.driver.endpoint(),
                }))
            }
            // The site it serves is the registry's, driver or none.
            (_, ["v1", "site"]) => site_claim::handle(self.runtime.registry(), req).await,
            (_, ["v1", "host" | "driver" | "vms" | "templates" | "operations" | "events" | "reconcile", ..]) => match self.runtime.core.load_full() {
                Some(core) => core.handle_vms(req, &segs).await,
                None => Err(ApiError::new(
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "this agent has no driver yet: configure [driver], or set one with `gve agent driver set`",
                )),
            },
            _ => Err(ApiError::no_route(req.method(), &path)),
        }
    }
}

impl Handler for AgentApi {
    async fn handle(&self, req: Request<Incoming>) -> Response {
        self.route(req)
            .await
            .unwrap_or_else(ApiError::into_response)
    }
}

/// Opens the guest provider of the driver: its own `guest` export when it declares
/// `guest-native`, else the configured guest plugin when the driver declares
/// `guest-agent-channel` (the plugin's way to the guest), else none, and why.
pub(crate) async fn open_guest(
    plugins: &PluginHost,
    d: &config::DriverConfig,
    creds: &Credentials,
) -> Result<Result<guest::GuestProvider, String>, AgentError> {
    use crate::plugin::bindings::types::Capabilities;
    let caps = plugins
        .slot(&d.plugin)
        .and_then(|s| s.current())
        .ok()
        .and_then(|l| l.driver_info.as_ref().map(|i| i.capabilities))
        .unwrap_or(Capabilities::empty());
    let name = match &d.guest_plugin {
        _ if caps.contains(Capabilities::GUEST_NATIVE) => d.plugin.clone(),
        Some(g) if caps.contains(Capabilities::GUEST_AGENT_CHANNEL) => g.clone(),
        Some(g) => {
            return Ok(Err(format!(
                "driver '{}' declares neither guest-native nor guest-agent-channel: guest \
                 plugin '{g}' has no way into its guests",
                d.plugin
            )))
        }
        None => {
            return Ok(Err(format!(
                "driver '{}' has no native guest operations and the agent has no [driver] \
                 guest-plugin configured",
                d.plugin
            )))
        }
    };
    let session = plugins
        .open_guest(&name, &d.endpoint, creds.clone())
        .await
        .map_err(|source| AgentError::Driver {
            plugin: name.clone(),
            endpoint: d.endpoint.clone(),
            source,
        })?;
    Ok(Ok(guest::GuestProvider {
        via_channel: name != d.plugin,
        session,
        plugin: name,
        plugins: plugins.clone(),
    }))
}

/// A running agent.
pub struct Agent {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its plugin host.
    pub plugins: PluginHost,
    /// Its driver, registry and plugin administration.
    pub runtime: Arc<runtime::Runtime>,
    /// Its open HTTP connections.
    pub connections: Arc<api::server::Connections>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    retention: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// The VM side (registry and driver session), once a driver is set.
    pub fn core(&self) -> Option<Arc<AgentCore>> {
        self.runtime.core.load_full()
    }

    /// Starts the plugin host, loads the configured plugins and serves the API.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        let plugins = PluginHost::new(HostConfig {
            cache_dir: config.data_dir.join("cache"),
            engine: Default::default(),
        })?;
        // Guest plugins reach VMs' in-guest agents through this agent's drivers.
        let router = Arc::new(guest::GuestRouter::default());
        plugins.set_guest_channel(router.clone());
        for (name, spec) in &config.plugins {
            let summary = plugins.load(spec.clone()).await.map_err(|source| {
                AgentError::ConfiguredPlugin {
                    name: name.clone(),
                    source,
                }
            })?;
            if summary.name != *name {
                return Err(AgentError::ConfiguredPlugin {
                    name: name.clone(),
                    source: PluginError::Config(format!(
                        "the bundle holds plugin '{}'",
                        summary.name
                    )),
                });
            }
        }
        let registry = Registry::open_with_cache(
            &config.data_dir.join("agent.redb"),
            config.database_cache_mib,
        )?;
        let instance = registry.instance()?;
        tracing::info!(instance, "agent instance");
        // Credentials and plugin config values given at runtime are recorded
        // sealed under this key, never in the clear.
        let sealer = Arc::new(crate::sealing::Sealer::open_or_create(
            &config.data_dir.join("agent.key"),
        )?);
        let policy = config
            .plugin_policy
            .clone()
            .unwrap_or_else(|| policy::PluginPolicy::implied_by(config.plugins.values()));
        let admin = Arc::new(plugin_admin::PluginAdmin::new(
            plugins.clone(),
            registry.clone(),
            sealer.clone(),
            policy,
            &config.plugins,
        ));
        admin
            .restore()
            .await
            .map_err(|e| AgentError::Restore(e.message))?;
        let kept = registry.clone();
        let runtime = Arc::new(runtime::Runtime::new(
            plugins.clone(),
            registry,
            router,
            sealer,
            config.bundles_dir.clone(),
        ));
        // The config file's driver, else the one an earlier run was given
        // (over the API: secret files are the config file's alone, whatever
        // a record says).
        let driver = match config.driver.clone() {
            Some(d) => {
                // Read only to seal a record from before records were sealed.
                if let Err(e) = runtime.recorded() {
                    tracing::warn!("{e} (the config file's [driver] is in force)");
                }
                Some(d)
            }
            None => match runtime.recorded().map_err(AgentError::Secret)? {
                Some(d) if d.password_file.is_some() || d.token_file.is_some() => {
                    return Err(AgentError::Secret(
                        "the driver recorded at runtime names a password-file or token-file, \
                         which only the config file may: give [driver] in the config file"
                            .into(),
                    ))
                }
                recorded => recorded,
            },
        };
        if let Some(d) = driver {
            runtime.bring_up(&d).await?;
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;
        let handler = Arc::new(AgentApi {
            admin,
            runtime: runtime.clone(),
            admin_token: config.admin_token,
            metrics_token: config.metrics_token,
        });
        let running = api::server::spawn(listener, handler, config.http, config.tls.as_ref())
            .map_err(|e| AgentError::Tls(e.to_string()))?;
        tracing::info!(%addr, "agent listening");
        let retention = kept.spawn_retention(
            config.operation_retention_seconds,
            config.audit_retention_seconds,
        );
        Ok(Agent {
            addr,
            plugins,
            runtime,
            connections: running.connections,
            stop: Some(running.stop),
            task: running.task,
            retention,
        })
    }

    /// Stops serving and waits for the accept loop to end.
    pub async fn stop(mut self) {
        // A retention pass runs on a blocking thread with a registry of its
        // own: told to stop, it ends after its batch. The task that starts
        // passes is awaited, not only aborted: an aborted task is dropped on a
        // worker later, and until then it holds the registry open.
        self.runtime.stop_background();
        self.retention.abort();
        let _ = (&mut self.retention).await;
        self.runtime.stop().await;
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        // Returns once the registry is closed (operations still finishing hold
        // it a moment), so a restart in this process opens it at once.
        let watch = self.runtime.close_watch();
        drop(self);
        if !watch.closed(crate::store_core::CLOSE_WAIT).await {
            tracing::warn!(
                "the registry is still open {:?} after stop",
                crate::store_core::CLOSE_WAIT
            );
        }
    }

    /// Serves until the process is asked to stop (Ctrl-C / SIGTERM).
    pub async fn run_until_signal(self) {
        api::server::until_signal().await;
        tracing::info!("agent stopping");
        self.stop().await;
    }
}
