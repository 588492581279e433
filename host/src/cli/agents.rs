//! `gve agent ...`: run an agent service (`run`), or manage the agents a site
//! drives (admins): register, inspect, health-check and unregister them.

use hyper::Method;
use serde_json::{json, Value};

use super::output::{self, Output};
use super::{CliError, SiteOpts};
use crate::site::model::{AgentStatus, AgentView};

/// Arguments of `gve agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The site (not used by `run`, `init`, `driver` and `audit`, which refuse these
    /// options given on their command line).
    #[command(flatten)]
    pub site: SiteOpts,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// Agent actions.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Run an agent service until Ctrl-C or SIGTERM.
    Run(super::agent::RunArgs),
    /// Write a working agent config with a fresh secret and certificate (0600).
    Init(super::init::AgentInitArgs),
    /// Manage a running agent's driver (talks to the agent, not the site).
    #[command(subcommand)]
    Driver(super::agent::DriverAction),
    /// Read a running agent's audit log (talks to the agent, not the site).
    Audit(super::agent::AgentAuditArgs),
    /// Release a running agent from the site it serves, so that another site may
    /// register it (talks to the agent): for a site that is gone. A site that
    /// unregisters an agent releases it itself.
    Release(super::agent::AgentConn),
    /// List the site's agents.
    List,
    /// Register an agent with the site.
    Add {
        /// Id for the agent (chosen by you).
        id: String,
        /// Its URL, e.g. http://host-1:7070 (named apart from the global --url of the site).
        #[arg(value_name = "AGENT_URL")]
        agent_url: String,
        /// Its admin token: the site authenticates with it.
        #[arg(long, env = "GVE_AGENT_SECRET", hide_env_values = true)]
        secret: String,
        /// For an https:// agent: the SHA-256 fingerprint of its certificate.
        #[arg(long = "agent-fingerprint")]
        agent_fingerprint: Option<String>,
    },
    /// Show one agent.
    Show {
        /// Agent id.
        id: String,
    },
    /// Unregister an agent.
    Remove {
        /// Agent id.
        id: String,
        /// Even when the site still records VMs on it (they are forgotten).
        #[arg(long)]
        force: bool,
    },
    /// Health-check an agent now (refreshing its capacity and templates).
    Check {
        /// Agent id.
        id: String,
    },
}

/// Runs an agent command; returns the exit code.
pub async fn run(args: AgentArgs) -> i32 {
    let direct = match &args.action {
        Action::Run(_) => Some(("run", false)),
        Action::Init(_) => Some(("init", false)),
        Action::Driver(_) => Some(("driver", true)),
        Action::Audit(_) => Some(("audit", true)),
        Action::Release(_) => Some(("release", true)),
        _ => None,
    };
    if let Some((command, to_agent)) = direct {
        if let Some(e) = misplaced_site_flag(&args.site, command, to_agent) {
            return super::report(Err(e));
        }
    }
    match args.action {
        Action::Run(r) => super::agent::run(r).await,
        Action::Init(i) => super::report(super::init::agent(i)),
        Action::Driver(d) => super::agent::driver(d, site_output(&args.site)).await,
        Action::Audit(a) => super::agent::audit(a, site_output(&args.site)).await,
        Action::Release(a) => super::agent::release(a, site_output(&args.site)).await,
        action => super::report(manage(&args.site, action).await),
    }
}

/// A site option given on the command line to `gve agent COMMAND`, which talks to
/// the agent directly (`to_agent`) or to nobody: it would be ignored (the agent's
/// own are `--agent-url`, `--secret`, `--agent-fingerprint`, `--agent-cert` and
/// `--agent-key`), so it is a usage error naming the one meant. A value that is
/// its environment variable's is left alone: it is there for the site's commands.
fn misplaced_site_flag(site: &SiteOpts, command: &str, to_agent: bool) -> Option<CliError> {
    use std::ffi::OsString;
    let text = |v: &Option<String>| v.as_ref().map(OsString::from);
    let path = |v: &Option<std::path::PathBuf>| v.as_ref().map(|p| p.clone().into_os_string());
    let flags = [
        (text(&site.url), "GVE_URL", "--url", Some("--agent-url")),
        (text(&site.site), "GVE_SITE", "--site", None),
        (text(&site.token), "GVE_TOKEN", "--token", Some("--secret")),
        (
            text(&site.fingerprint),
            "GVE_FINGERPRINT",
            "--fingerprint",
            Some("--agent-fingerprint"),
        ),
        (path(&site.ca), "GVE_CA", "--ca", None),
        (path(&site.cert), "GVE_CERT", "--cert", Some("--agent-cert")),
        (path(&site.key), "GVE_KEY", "--key", Some("--agent-key")),
    ];
    let (_, _, flag, agents) = flags
        .into_iter()
        .find(|(value, env, _, _)| value.is_some() && std::env::var_os(env) != *value)?;
    let meant = match (to_agent, agents) {
        (true, Some(a)) => format!("; for the agent, give {a}"),
        (true, None) => "; the agent has no such option".to_string(),
        (false, _) => String::new(),
    };
    let talks_to = if to_agent { "the agent" } else { "no site" };
    Some(CliError::Usage(format!(
        "{flag} is the site's option, and `gve agent {command}` talks to {talks_to}{meant}"
    )))
}

async fn manage(site: &SiteOpts, action: Action) -> Result<i32, CliError> {
    let client = site.client()?;
    let one = |a: AgentView| print(site.output, &[a], true);
    match action {
        // Reached only if `run` changes; `run` needs no site.
        Action::Run(r) => return Ok(super::agent::run(r).await),
        Action::Init(i) => return super::init::agent(i),
        Action::Driver(d) => return Ok(super::agent::driver(d, site.output).await),
        Action::Audit(a) => return Ok(super::agent::audit(a, site.output).await),
        Action::Release(a) => return Ok(super::agent::release(a, site.output).await),
        Action::List => {
            let all: Vec<AgentView> = client.get_pages("/v1/agents", usize::MAX).await?;
            print(site.output, &all, false);
        }
        Action::Add {
            id,
            agent_url: url,
            secret,
            agent_fingerprint,
        } => one(client
            .call(
                Method::POST,
                "/v1/agents",
                Some(&json!({ "id": id, "url": url, "token": secret, "fingerprint": agent_fingerprint })),
            )
            .await?),
        Action::Show { id } => one(client.get(&agent_path(&id)).await?),
        Action::Check { id } => one(client
            .call::<(), _>(Method::POST, &format!("{}/check", agent_path(&id)), None)
            .await?),
        Action::Remove { id, force } => {
            let v: Value = client
                .call::<(), _>(
                    Method::DELETE,
                    &format!("{}?force={force}", agent_path(&id)),
                    None,
                )
                .await?;
            match site.output {
                Output::Json => output::json(&v),
                Output::Table => println!("removed agent {id}"),
            }
            if v["agent-released"] == false {
                eprintln!(
                    "warning: the agent did not take its release yet (it did not answer, \
                     or its version has none): this site sends it again about every minute \
                     until the agent takes it (for up to 7 days); until then another site cannot register it \
                     (or release it on the agent with `gve agent release`)"
                );
            }
        }
    }
    Ok(0)
}

fn agent_path(id: &str) -> String {
    format!("/v1/agents/{}", crate::api::percent_encode(id))
}

fn status(a: &AgentView) -> &'static str {
    match a.status {
        AgentStatus::Up => "up",
        AgentStatus::Down => "down",
    }
}

fn print(out: Output, agents: &[AgentView], detail: bool) {
    if out == Output::Json {
        return if detail {
            output::json(&agents[0])
        } else {
            output::json(agents)
        };
    }
    if detail {
        let a = &agents[0];
        let h = a.host.as_ref();
        output::fields(&[
            ("id", a.id.clone()),
            ("status", status(a).into()),
            ("error", output::or_dash(a.error.as_ref())),
            ("url", a.url.clone()),
            ("instance", output::or_dash(a.instance.as_ref())),
            (
                "seen",
                match a.seen_ms {
                    0 => "never".into(),
                    t => format!("{} ago", output::age(t)),
                },
            ),
            ("host", output::or_dash(h.map(|h| &h.hostname))),
            (
                "hypervisor",
                output::or_dash(
                    h.map(|h| format!("{} {}", h.hypervisor_kind, h.hypervisor_version)),
                ),
            ),
            (
                "cpus",
                output::or_dash(h.map(|h| {
                    format!(
                        "{} allocated of {}",
                        h.allocated_logical_cpus, h.logical_cpus
                    )
                })),
            ),
            (
                "memory",
                output::or_dash(
                    h.map(|h| format!("{} MiB free of {}", h.free_memory_mib, h.main_memory_mib)),
                ),
            ),
            (
                "vms",
                output::or_dash(
                    h.map(|h| format!("{} running of {}", h.used_instances, h.total_instances)),
                ),
            ),
            ("templates", a.templates.join(", ")),
        ]);
        return;
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let h = a.host.as_ref();
            vec![
                a.id.clone(),
                status(a).into(),
                a.url.clone(),
                output::or_dash(h.map(|h| h.hypervisor_kind.clone())),
                output::or_dash(
                    h.map(|h| format!("{}/{}", h.allocated_logical_cpus, h.logical_cpus)),
                ),
                output::or_dash(h.map(|h| format!("{}/{}", h.free_memory_mib, h.main_memory_mib))),
                output::clip(&a.templates.join(","), 40),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "STATUS",
            "URL",
            "KIND",
            "CPUS",
            "FREE-MIB",
            "TEMPLATES",
        ],
        &rows,
    );
}

fn site_output(site: &SiteOpts) -> Output {
    site.output
}
