//! The `gve` command line: one module per command group. The site's groups
//! (`user`, `agent`, `vm`, `job`) share [`SiteOpts`] and [`CliError`]; every job a
//! command submits is followed by [`wait`].

pub mod agent;
pub mod agents;
pub mod audit;
mod copy;
pub mod init;
pub mod jobs;
pub mod libvirtd;
pub mod output;
pub mod plugin;
pub mod site;
pub mod sites;
pub mod up;
pub mod user;
pub mod vms;
pub mod wait;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::api::client::Client;
use crate::api::ApiError;
use output::Output;

/// gve: one uniform endpoint for virtual machines on heterogeneous hypervisors.
///
/// Exit codes: 0 success; 1 failure; 2 bad usage; 3 service unreachable;
/// 4 not found; 5 unauthorized or denied; 6 conflict (exists / wrong state).
#[derive(Debug, Parser)]
#[command(name = "gve", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Command groups.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a site and a local kvm agent in one process, state in one directory.
    Up(Box<up::UpArgs>),
    /// Run a site service (`site run`), or keep the sites you use (`site add|use|list|remove`).
    #[command(subcommand_required = true)]
    Site(site::SiteArgs),
    /// Manage the site's users (admins), or see your own record.
    #[command(subcommand_required = true)]
    User(Box<user::UserArgs>),
    /// Run an agent service (`agent run`), or manage the site's agents (admins).
    #[command(subcommand_required = true)]
    Agent(Box<agents::AgentArgs>),
    /// Request, manage and use VMs.
    #[command(subcommand_required = true)]
    Vm(Box<vms::VmArgs>),
    /// Follow, inspect and cancel jobs.
    #[command(subcommand_required = true)]
    Job(Box<jobs::JobArgs>),
    /// Manage the plugins of a running agent.
    #[command(subcommand_required = true)]
    Plugin(Box<plugin::PluginArgs>),
    /// Read the site's audit log (admins).
    Audit(Box<audit::AuditArgs>),
    /// Prove a driver against a real host (runs `gve-conformance`, installed next
    /// to `gve`; `gve conformance --help` lists its commands).
    #[command(disable_help_flag = true)]
    Conformance {
        /// Arguments for `gve-conformance`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print shell completions.
    Completions {
        /// Shell to generate for.
        shell: clap_complete::Shell,
    },
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::User(u) => report(user::run(*u).await),
        Command::Agent(a) => agents::run(*a).await,
        Command::Vm(v) => report(vms::run(*v).await),
        Command::Job(j) => report(jobs::run(*j).await),
        Command::Plugin(p) => plugin::run(*p).await,
        Command::Audit(a) => report(audit::run(*a).await),
        Command::Conformance { args } => conformance(&args),
        Command::Up(u) => up::run(*u).await,
        Command::Site(s) => site::run(s).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "gve", &mut std::io::stdout());
            0
        }
    }
}

/// The exit code for an API error.
pub fn exit_code(e: &crate::api::ApiError) -> i32 {
    match (e.status, e.kind.as_str()) {
        (_, "unavailable") if e.status == 503 => 3,
        (404, _) => 4,
        (401 | 403, _) => 5,
        (409, _) => 6,
        (400, _) => 2,
        _ => 1,
    }
}

/// The exit code for a job error of contract kind `kind`: that of the HTTP status
/// the API gives the kind.
pub fn kind_exit_code(kind: &str) -> i32 {
    let status = crate::plugin::ErrorKind::parse(kind)
        .map(ApiError::status_of)
        .unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    exit_code(&ApiError::new(status, kind, ""))
}

/// How to reach the site; shared by `gve user|agent|vm|job|audit`. Which site is
/// chosen is [`sites`]' rule ([`SiteOpts::resolve`]).
#[derive(Debug, Clone, clap::Args)]
pub struct SiteOpts {
    /// Site URL (default: the current named site, else http://127.0.0.1:7080).
    #[arg(long, env = "GVE_URL", global = true)]
    pub url: Option<String>,
    /// A named site (`gve site add`): its stored URL and credentials.
    #[arg(long, env = "GVE_SITE", global = true)]
    pub site: Option<String>,
    /// The named site these options were resolved to.
    #[arg(skip)]
    pub resolved_name: Option<String>,
    /// Your bearer token at the site.
    #[arg(long, env = "GVE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// For an https:// site: the SHA-256 fingerprint of its certificate.
    #[arg(long, env = "GVE_FINGERPRINT", global = true)]
    pub fingerprint: Option<String>,
    /// For an https:// site: a CA certificate (PEM) its certificate chains to.
    #[arg(long, env = "GVE_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// For a site that requires client certificates (mutual TLS): yours (PEM), with --key.
    #[arg(long, env = "GVE_CERT", global = true)]
    pub cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, env = "GVE_KEY", global = true)]
    pub key: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t, global = true)]
    pub output: Output,
}

impl SiteOpts {
    /// A client for the site (resolved first).
    pub fn client(&self) -> Result<Client, CliError> {
        let site = self.resolve()?;
        Ok(Client::with_tls(
            site.base_url(),
            site.token.clone(),
            &crate::api::tls::ClientTls {
                fingerprint: site.fingerprint.clone(),
                ca: site.ca.clone(),
                cert: site.cert.clone(),
                key: site.key.clone(),
            },
        )?)
    }
}

/// Why a site command failed; [`CliError::exit_code`] is what a script sees.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The site refused or failed the call.
    #[error("{}{}", .0.message, .0.retry_after_s.map(|s| format!(" (retry after {s} s)")).unwrap_or_default())]
    Api(#[from] ApiError),
    /// A job ended in failure.
    #[error("job {job} failed: {message} ({kind})")]
    JobFailed {
        /// Job id.
        job: String,
        /// Contract error kind.
        kind: String,
        /// What went wrong.
        message: String,
    },
    /// A job was cancelled before it ran.
    #[error("job {0} was cancelled")]
    JobCancelled(String),
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Bytes arrived different from the bytes sent.
    #[error("{what}: SHA-256 {actual} does not match {expected}")]
    Digest {
        /// The copy.
        what: String,
        /// What the sender computed.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// Arguments refused before any call.
    #[error("{0}")]
    Usage(String),
    /// No site has room for a request (`--any-site`).
    #[error("{0}")]
    NoRoom(String),
}

impl CliError {
    /// The process exit code (see [`Cli`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Api(e) => exit_code(e),
            CliError::JobFailed { kind, .. } => kind_exit_code(kind),
            CliError::JobCancelled(_) => 6,
            CliError::Usage(_) => 2,
            // As a request that found no room at one site (`unavailable`).
            CliError::NoRoom(_) => 3,
            CliError::File { .. } | CliError::Digest { .. } => 1,
        }
    }

    /// A local file error.
    pub fn file(path: impl Into<PathBuf>, source: std::io::Error) -> CliError {
        CliError::File {
            path: path.into(),
            source,
        }
    }
}

/// Prints a failed command's error as `error: ...`; returns the exit code.
pub fn report(r: Result<i32, CliError>) -> i32 {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Runs `gve-conformance` from the directory of this executable (or from `PATH`)
/// with `args`; returns its exit code.
fn conformance(args: &[String]) -> i32 {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("gve-conformance")))
        .filter(|p| p.is_file());
    let program = sibling.unwrap_or_else(|| "gve-conformance".into());
    match std::process::Command::new(&program).args(args).status() {
        Ok(status) => status.code().unwrap_or(1),
        Err(e) => {
            eprintln!(
                "gve: cannot run {}: {e} (build it with `cargo build --release -p gve-conformance`)",
                program.display()
            );
            2
        }
    }
}
