//! `gve agent run`: run an agent service (one per hypervisor host); `gve agent
//! driver set`: give a running agent without a driver one. The site's view of its
//! agents (`gve agent list`, ...) is in [`super::agents`].

use std::path::PathBuf;

use hyper::Method;

use super::output::{self, Output};
use crate::agent::config::DriverConfig;
use crate::agent::{Agent, AgentConfig};
use crate::api::client::Client;

/// `gve agent driver ...`.
#[derive(Debug, clap::Subcommand)]
pub enum DriverAction {
    /// Give an agent started without a `[driver]` one, now and after restarts.
    Set {
        /// A loaded plugin that exports `driver`.
        plugin: String,
        /// Its endpoint (libvirt URI, vSphere URL, `memory:NAME`, ...).
        endpoint: String,
        /// A loaded plugin (granted the guest channel) for exec and copy.
        #[arg(long)]
        guest_plugin: Option<String>,
        /// Where other hosts send VMs migrating here.
        #[arg(long)]
        migration_uri: Option<String>,
        /// Reconcile period, ms.
        #[arg(long, default_value_t = 5000)]
        reconcile_period_ms: u64,
        /// The agent.
        #[command(flatten)]
        agent: AgentConn,
    },
}

/// How to reach one agent's admin API (`gve agent driver set`, `audit`, `release`).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentConn {
    /// The agent.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub agent_url: String,
    /// The agent's admin token.
    #[arg(long, env = "GVE_AGENT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// For an https:// agent: the SHA-256 fingerprint of its certificate.
    #[arg(long, env = "GVE_AGENT_FINGERPRINT")]
    pub agent_fingerprint: Option<String>,
    /// For an agent that requires client certificates (mutual TLS): one it
    /// admits (PEM; its `tls.client-fingerprints`), with --agent-key.
    #[arg(long, env = "GVE_AGENT_CERT")]
    pub agent_cert: Option<PathBuf>,
    /// The private key (PEM) of --agent-cert.
    #[arg(long, env = "GVE_AGENT_KEY")]
    pub agent_key: Option<PathBuf>,
}

impl AgentConn {
    /// A client for the agent, verifying and presenting certificates as given.
    fn client(&self) -> Result<Client, crate::api::ApiError> {
        Client::with_tls(
            &self.agent_url,
            Some(self.secret.clone()),
            &crate::api::tls::ClientTls {
                fingerprint: self.agent_fingerprint.clone(),
                cert: self.agent_cert.clone(),
                key: self.agent_key.clone(),
                ..Default::default()
            },
        )
    }
}

/// Runs a driver command; returns the exit code.
pub async fn driver(action: DriverAction, out: Output) -> i32 {
    let DriverAction::Set {
        plugin,
        endpoint,
        guest_plugin,
        migration_uri,
        reconcile_period_ms,
        agent,
    } = action;
    let d = DriverConfig {
        plugin,
        endpoint,
        username: None,
        password: None,
        token: None,
        password_file: None,
        token_file: None,
        guest_plugin,
        migration_uri,
        reconcile_period_ms,
        reservation_seconds: 300,
    };
    let r = async {
        agent
            .client()?
            .call::<_, serde_json::Value>(Method::PUT, "/v1/driver", Some(&d))
            .await
    }
    .await;
    answered(r, |v| match out {
        Output::Json => output::json(&v),
        Output::Table => println!(
            "driver {} on {} is up",
            v["plugin"].as_str().unwrap_or_default(),
            v["endpoint"].as_str().unwrap_or_default()
        ),
    })
}

/// The exit code of a command the agent answered `r` to; `show` prints a
/// success, an error is printed here.
fn answered<T>(r: Result<T, crate::api::ApiError>, show: impl FnOnce(T)) -> i32 {
    match r {
        Ok(v) => {
            show(v);
            0
        }
        Err(e) => {
            eprintln!("error: {}", e.message);
            super::exit_code(&e)
        }
    }
}

/// Arguments of `gve agent run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Agent configuration file (TOML).
    #[arg(long, short, env = "GVE_AGENT_CONFIG")]
    pub config: PathBuf,
}

/// Runs the agent until Ctrl-C or SIGTERM.
pub async fn run(args: RunArgs) -> i32 {
    let config = match AgentConfig::read(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    match Agent::start(config).await {
        Ok(agent) => {
            eprintln!("gve agent listening on {}://{}", scheme, agent.addr);
            agent.run_until_signal().await;
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `gve agent audit`.
#[derive(Debug, clap::Args)]
pub struct AgentAuditArgs {
    /// Entries after this sequence number.
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Most entries listed.
    #[arg(long, default_value_t = 100)]
    pub limit: u64,
    /// The agent.
    #[command(flatten)]
    pub agent: AgentConn,
}

/// Prints an agent's audit log; returns the exit code.
pub async fn audit(args: AgentAuditArgs, out: Output) -> i32 {
    let r = async {
        args.agent
            .client()?
            .get::<Vec<crate::agent::model::AuditEntry>>(&format!(
                "/v1/audit?after={}&limit={}",
                args.after, args.limit
            ))
            .await
    }
    .await;
    answered(r, |entries| super::audit::print(out, &entries))
}

/// `gve agent release`: tells an agent it serves no site (it keeps its VMs);
/// returns the exit code.
pub async fn release(agent: AgentConn, out: Output) -> i32 {
    let r = async {
        agent
            .client()?
            .call::<(), serde_json::Value>(Method::DELETE, "/v1/site", None)
            .await
    }
    .await;
    answered(r, |v| match out {
        Output::Json => output::json(&v),
        Output::Table => match v["released"]["id"].as_str() {
            Some(site) => println!(
                "released from site {site} (registered there as {})",
                v["released"]["agent-id"].as_str().unwrap_or("?")
            ),
            None => println!("the agent served no site"),
        },
    })
}
