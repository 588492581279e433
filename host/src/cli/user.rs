//! `gve user ...`: the site's users, their quotas and tokens. Everything but `me`,
//! `show` and `token` of oneself is for admins.

use hyper::Method;
use serde_json::{json, Value};

use super::output::{self, Output};
use super::{CliError, SiteOpts};
use crate::site::model::{Quota, Role, UserView};

/// Arguments of `gve user`.
#[derive(Debug, clap::Args)]
pub struct UserArgs {
    /// The site.
    #[command(flatten)]
    pub site: SiteOpts,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// User actions.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Show your own record: role, quota and usage.
    Me,
    /// List users (admins).
    List,
    /// Show one user.
    Show {
        /// Login name.
        name: String,
    },
    /// Create a user; prints their token, shown this once only.
    Add {
        /// Login name.
        name: String,
        /// Make them an admin.
        #[arg(long, conflicts_with = "monitor")]
        admin: bool,
        /// Make them a monitor: a scraper's credential that reads `/metrics`,
        /// `/v1/glue2` and its own record only (no quota).
        #[arg(long)]
        monitor: bool,
        /// Quota limits (the site's defaults for those not given).
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Remove a user (who must hold no VMs).
    Remove {
        /// Login name.
        name: String,
    },
    /// Change a user's quota (limits not given stay as they are).
    Quota {
        /// Login name.
        name: String,
        /// New limits.
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Rotate a user's token (yours, or anyone's for admins); prints the new one.
    Token {
        /// Login name.
        name: String,
    },
}

/// Quota limits on the command line.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct QuotaArgs {
    /// Virtual CPUs held at once.
    #[arg(long)]
    pub vcpus: Option<u64>,
    /// Memory held at once, MiB.
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// VMs held at once.
    #[arg(long)]
    pub vms: Option<u64>,
}

impl QuotaArgs {
    fn given(&self) -> bool {
        self.vcpus.is_some() || self.memory_mib.is_some() || self.vms.is_some()
    }

    /// `base` with the limits given here.
    fn over(&self, base: Quota) -> Quota {
        Quota {
            logical_cpus: self.vcpus.unwrap_or(base.logical_cpus),
            main_memory_mib: self.memory_mib.unwrap_or(base.main_memory_mib),
            vms: self.vms.unwrap_or(base.vms),
        }
    }
}

/// Runs a user command; returns the exit code.
pub async fn run(args: UserArgs) -> Result<i32, CliError> {
    let client = args.site.client()?;
    let out = args.site.output;
    match &args.action {
        Action::Me => show(out, &client.get("/v1/me").await?),
        Action::List => {
            let users: Vec<UserView> = client.get_pages("/v1/users", usize::MAX).await?;
            match out {
                Output::Json => output::json(&users),
                Output::Table => table(&users),
            }
        }
        Action::Show { name } => show(out, &client.get(&user_path(name)).await?),
        Action::Add {
            name,
            admin,
            monitor,
            quota,
        } => {
            let role = match (admin, monitor) {
                (true, _) => "admin",
                (_, true) => "monitor",
                _ => "user",
            };
            let mut body = json!({ "name": name, "role": role });
            if quota.given() {
                body["quota"] = serde_json::to_value(quota.over(Quota::default()))
                    .map_err(|e| CliError::Usage(e.to_string()))?;
            }
            let u: UserView = client.call(Method::POST, "/v1/users", Some(&body)).await?;
            token(out, &u, "created");
        }
        Action::Remove { name } => {
            let v: Value = client
                .call::<(), _>(Method::DELETE, &user_path(name), None)
                .await?;
            match out {
                Output::Json => output::json(&v),
                Output::Table => println!("removed user {name}"),
            }
        }
        Action::Quota { name, quota } => {
            if !quota.given() {
                return Err(CliError::Usage(
                    "give at least one of --vcpus, --memory-mib, --vms".into(),
                ));
            }
            let path = user_path(name);
            let now: UserView = client.get(&path).await?;
            let u: UserView = client
                .call(
                    Method::PUT,
                    &format!("{path}/quota"),
                    Some(&quota.over(now.quota)),
                )
                .await?;
            show(out, &u);
        }
        Action::Token { name } => {
            let u: UserView = client
                .call::<(), _>(Method::POST, &format!("{}/token", user_path(name)), None)
                .await?;
            token(out, &u, "rotated the token of");
        }
    }
    Ok(0)
}

fn user_path(name: &str) -> String {
    format!("/v1/users/{}", crate::api::percent_encode(name))
}

/// A new token alone on stdout (so `TOKEN=$(gve user add bob)` works), what
/// happened on stderr; JSON prints the user with the token.
fn token(out: Output, u: &UserView, what: &str) {
    match out {
        Output::Json => output::json(u),
        Output::Table => {
            eprintln!(
                "{what} user {} ({}); the token is shown only this once",
                u.name,
                role(&u.role)
            );
            println!("{}", u.token.as_deref().unwrap_or_default());
        }
    }
}

/// A role's name; one this CLI does not know (a later site's) is marked so.
fn role(r: &Role) -> String {
    match r {
        Role::Other(name) => format!("{name} (unknown to this gve)"),
        known => known.to_string(),
    }
}

fn show(out: Output, u: &UserView) {
    match out {
        Output::Json => output::json(u),
        Output::Table => output::fields(&[
            ("name", u.name.clone()),
            ("role", role(&u.role)),
            ("vms", format!("{} of {}", u.usage.vms, u.quota.vms)),
            (
                "vcpus",
                format!("{} of {}", u.usage.logical_cpus, u.quota.logical_cpus),
            ),
            (
                "memory",
                format!(
                    "{} of {} MiB",
                    u.usage.main_memory_mib, u.quota.main_memory_mib
                ),
            ),
        ]),
    }
}

fn table(users: &[UserView]) {
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                role(&u.role),
                format!("{}/{}", u.usage.vms, u.quota.vms),
                format!("{}/{}", u.usage.logical_cpus, u.quota.logical_cpus),
                format!("{}/{}", u.usage.main_memory_mib, u.quota.main_memory_mib),
            ]
        })
        .collect();
    output::table(&["NAME", "ROLE", "VMS", "VCPUS", "MEMORY-MIB"], &rows);
}
