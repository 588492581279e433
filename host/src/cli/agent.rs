//! `gve agent run`: run an agent service (one per hypervisor host). The site's
//! view of its agents (`gve agent list`, ...) is in [`super::agents`].

use std::path::PathBuf;

use crate::agent::{Agent, AgentConfig};

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
    match Agent::start(config).await {
        Ok(agent) => {
            eprintln!("gve agent listening on http://{}", agent.addr);
            agent.run_until_signal().await;
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
