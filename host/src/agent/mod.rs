//! The agent service: one per hypervisor host. This is its skeleton: the plugin host
//! and the admin API to manage plugins at runtime.

pub mod config;
pub mod plugins_api;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;
use tokio::sync::oneshot;

use crate::api::{self, server::Handler, ApiError, Response};
use crate::plugin::{HostConfig, PluginError, PluginHost};
pub use config::AgentConfig;

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

struct AgentApi {
    plugins: PluginHost,
    admin_token: String,
}

impl AgentApi {
    async fn route(&self, req: Request<Incoming>) -> Result<Response, ApiError> {
        let path = req.uri().path().to_string();
        let segs = api::segments(&path);
        if segs.as_slice() == ["v1", "health"] {
            return api::ok(&serde_json::json!({ "status": "ok" }));
        }
        api::check_bearer(&req, &self.admin_token)?;
        match segs.as_slice() {
            ["v1", "plugins", rest @ ..] => plugins_api::handle(&self.plugins, req, rest).await,
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

/// A running agent.
pub struct Agent {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its plugin host.
    pub plugins: PluginHost,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Starts the plugin host, loads the configured plugins and serves the API.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        let plugins = PluginHost::new(HostConfig {
            cache_dir: config.data_dir.join("cache"),
            engine: Default::default(),
        })?;
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
            plugins: plugins.clone(),
            admin_token: config.admin_token,
        });
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(api::server::serve(listener, handler, async {
            let _ = rx.await;
        }));
        tracing::info!(%addr, "agent listening");
        Ok(Agent {
            addr,
            plugins,
            stop: Some(tx),
            task,
        })
    }

    /// Stops serving and waits for the accept loop to end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Serves until the process is asked to stop (Ctrl-C / SIGTERM).
    pub async fn run_until_signal(self) {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
        }
        tracing::info!("agent stopping");
        self.stop().await;
    }
}
