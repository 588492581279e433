//! The `gve` command line: one module per command group.

pub mod agent;
pub mod output;
pub mod plugin;

use clap::{Parser, Subcommand};

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
    /// Run an agent service (one per hypervisor host).
    Agent(agent::AgentArgs),
    /// Manage the plugins of a running agent.
    #[command(subcommand_required = true)]
    Plugin(Box<plugin::PluginArgs>),
    /// Print shell completions.
    Completions {
        /// Shell to generate for.
        shell: clap_complete::Shell,
    },
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Agent(a) => agent::run(a).await,
        Command::Plugin(p) => plugin::run(*p).await,
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
