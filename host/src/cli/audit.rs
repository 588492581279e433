//! `gve audit`: the site's audit log (admins): who did what to which user, agent,
//! VM or job, and when.

use super::output::{self, Output};
use super::{CliError, SiteOpts};
use crate::site::model::AuditEntry;

/// Arguments of `gve audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// The site.
    #[command(flatten)]
    pub site: SiteOpts,
    /// Entries after this sequence number.
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Most entries listed.
    #[arg(long, default_value_t = 100)]
    pub limit: u64,
}

/// Prints the audit log; returns the exit code.
pub async fn run(args: AuditArgs) -> Result<i32, CliError> {
    let client = args.site.client()?;
    let entries: Vec<AuditEntry> = client
        .get(&format!(
            "/v1/audit?after={}&limit={}",
            args.after, args.limit
        ))
        .await?;
    print(args.site.output, &entries);
    Ok(0)
}

/// Prints audit entries as a table or JSON.
pub fn print(out: Output, entries: &[AuditEntry]) {
    match out {
        Output::Json => output::json(entries),
        Output::Table => {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.seq.to_string(),
                        output::age(e.at_ms),
                        e.who.clone(),
                        e.action.clone(),
                        e.target.clone(),
                        output::clip(&e.detail.to_string(), 80),
                    ]
                })
                .collect();
            output::table(&["SEQ", "WHEN", "WHO", "ACTION", "TARGET", "DETAIL"], &rows);
        }
    }
}
