//! `gve site run`: run a site service.

use std::path::PathBuf;

use crate::site::{Site, SiteConfig};

/// Arguments of `gve site`.
#[derive(Debug, clap::Args)]
pub struct SiteArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: SiteAction,
}

/// Site actions.
#[derive(Debug, clap::Subcommand)]
pub enum SiteAction {
    /// Run a site service until Ctrl-C or SIGTERM.
    Run {
        /// Site configuration file (TOML).
        #[arg(long, short, env = "GVE_SITE_CONFIG")]
        config: PathBuf,
    },
}

/// Runs the site until Ctrl-C or SIGTERM.
pub async fn run(args: SiteArgs) -> i32 {
    let SiteAction::Run { config } = args.action;
    let config = match SiteConfig::read(&config) {
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
    match Site::start(config).await {
        Ok(site) => {
            eprintln!("gve site listening on {}://{}", scheme, site.addr);
            site.run_until_signal().await;
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
