//! `gve site run`: run a site service; `gve site add|use|list|remove`: the named
//! sites this user works with ([`super::sites`]).

use std::path::PathBuf;

use super::output::{self, Output};
use super::sites::{self, NamedSite, SitesFile};
use super::CliError;
use crate::site::model::UserView;
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
    /// Write a working site config with a fresh admin token and certificate (0600).
    Init(super::init::SiteInitArgs),
    /// Keep a site under a name (checks the token with the site unless
    /// --no-check); the first site kept becomes the current one.
    Add {
        /// Name for it (what --site and GVE_SITE take).
        name: String,
        /// Its URL.
        #[arg(long)]
        url: String,
        /// Your bearer token there (never taken from GVE_TOKEN, which may be
        /// another site's).
        #[arg(long)]
        token: Option<String>,
        /// For an https:// site: the SHA-256 fingerprint of its certificate.
        #[arg(long)]
        fingerprint: Option<String>,
        /// For an https:// site: a CA certificate (PEM) it chains to.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// For a site that requires client certificates: yours (PEM), with --key.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// The private key (PEM) of --cert.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Replace a site kept under this name.
        #[arg(long)]
        replace: bool,
        /// Do not call the site to check the URL and token.
        #[arg(long)]
        no_check: bool,
    },
    /// Make a named site the one commands use when none is named.
    Use {
        /// Its name.
        name: String,
    },
    /// List the named sites (never their tokens).
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Forget a named site.
    Remove {
        /// Its name.
        name: String,
    },
}

/// Runs `gve site ...`; returns the exit code.
pub async fn run(args: SiteArgs) -> i32 {
    match args.action {
        SiteAction::Run { config } => serve(config).await,
        SiteAction::Init(i) => super::report(super::init::site(i)),
        action => super::report(manage(action).await),
    }
}

/// `gve site add|use|list|remove`.
async fn manage(action: SiteAction) -> Result<i32, CliError> {
    let path = sites::path()?;
    let mut file = SitesFile::load(&path)?;
    match action {
        SiteAction::Run { .. } | SiteAction::Init(_) => unreachable!("served by run"),
        SiteAction::Add {
            name,
            url,
            token,
            fingerprint,
            ca,
            cert,
            key,
            replace,
            no_check,
        } => {
            sites::validate_name(&name)?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(CliError::Usage(format!(
                    "--url {url:?}: give an http:// or https:// URL"
                )));
            }
            if file.sites.contains_key(&name) && !replace {
                return Err(CliError::Usage(format!(
                    "a site named '{name}' is kept already; --replace replaces it"
                )));
            }
            let site = NamedSite {
                url: url.trim_end_matches('/').to_string(),
                token,
                fingerprint,
                ca: absolute(ca),
                cert: absolute(cert),
                key: absolute(key),
            };
            let who = if no_check {
                None
            } else {
                let me: UserView = site
                    .opts(&name, Output::Table)
                    .client()?
                    .get("/v1/me")
                    .await?;
                Some(me.name)
            };
            file.sites.insert(name.clone(), site);
            let current = file.current.get_or_insert_with(|| name.clone()) == &name;
            file.save(&path)?;
            eprintln!(
                "kept site {name}{}{} in {}",
                who.map(|w| format!(" (signed in as {w})"))
                    .unwrap_or_default(),
                if current { ", the current site" } else { "" },
                path.display()
            );
        }
        SiteAction::Use { name } => {
            file.get(&name)?;
            file.current = Some(name.clone());
            file.save(&path)?;
            eprintln!("site {name} is the current site");
        }
        SiteAction::List { output: out } => {
            let current = file.current.clone();
            if out == Output::Json {
                let list: Vec<serde_json::Value> = file
                    .sites
                    .iter()
                    .map(|(n, s)| {
                        serde_json::json!({
                            "name": n,
                            "url": s.url,
                            "current": current.as_deref() == Some(n),
                            "token": s.token.is_some(),
                            "fingerprint": s.fingerprint,
                        })
                    })
                    .collect();
                output::json(&list);
            } else {
                let rows: Vec<Vec<String>> = file
                    .sites
                    .iter()
                    .map(|(n, s)| {
                        vec![
                            if current.as_deref() == Some(n) {
                                "*"
                            } else {
                                ""
                            }
                            .into(),
                            n.clone(),
                            s.url.clone(),
                            if s.token.is_some() { "yes" } else { "no" }.into(),
                        ]
                    })
                    .collect();
                output::table(&["CURRENT", "NAME", "URL", "TOKEN"], &rows);
            }
        }
        SiteAction::Remove { name } => {
            file.get(&name)?;
            file.sites.remove(&name);
            if file.current.as_deref() == Some(name.as_str()) {
                file.current = None;
            }
            file.save(&path)?;
            eprintln!("forgot site {name}");
        }
    }
    Ok(0)
}

/// `p` made absolute (kept in the sites file, read from any working directory).
fn absolute(p: Option<PathBuf>) -> Option<PathBuf> {
    p.map(|p| std::path::absolute(&p).unwrap_or(p))
}

/// Runs the site until Ctrl-C or SIGTERM.
async fn serve(config: PathBuf) -> i32 {
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
