//! `gve job ...`: list, inspect, follow and cancel jobs (yours; every user's for
//! admins with `--all`).

use hyper::Method;
use serde_json::Value;

use super::output::{self, Output};
use super::wait::{self, state_name, Show};
use super::{CliError, SiteOpts};
use crate::site::model::{Job, JobEvent};

/// Arguments of `gve job`.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// The site.
    #[command(flatten)]
    pub site: SiteOpts,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// Job actions.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List jobs, newest first.
    List {
        /// Every user's jobs (admins).
        #[arg(long)]
        all: bool,
        /// Most jobs listed (per site with --all-sites).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// At every named site at once (`gve site add`), with a SITE column;
        /// a site that does not answer is a warning, not a failure.
        #[arg(long)]
        all_sites: bool,
    },
    /// Show one job.
    Show {
        /// Job id.
        id: String,
    },
    /// Follow a job to its end; exits with the code of its error if it failed.
    Wait {
        /// Job id.
        id: String,
    },
    /// Print what a job produced (JSON).
    Result {
        /// Job id.
        id: String,
    },
    /// Cancel a job that has not started.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Print a job's changes as they happen, until it ends.
    Events {
        /// Job id.
        id: String,
    },
}

/// Runs a job command; returns the exit code.
pub async fn run(args: JobArgs) -> Result<i32, CliError> {
    if let Action::List {
        all,
        limit,
        all_sites: true,
    } = &args.action
    {
        return list_all_sites(args.site.output, *all, *limit).await;
    }
    let site = &args.site.resolve()?;
    let out = site.output;
    let client = site.client()?;
    match &args.action {
        Action::List { all, limit, .. } => {
            let jobs: Vec<Job> = client.get_pages(&jobs_path(*limit, *all), *limit).await?;
            match out {
                Output::Json => output::json(&jobs),
                Output::Table => table(&jobs),
            }
        }
        Action::Show { id } => show(out, &client.get(&job_path(id)).await?),
        Action::Wait { id } => {
            let done = wait::wait(site, &client, id, Show::Progress).await?;
            show(out, &done);
            wait::outcome(done)?;
        }
        Action::Result { id } => {
            match client
                .get::<Value>(&format!("{}/result", job_path(id)))
                .await
            {
                Ok(v) => output::json(&v),
                // A failed job: exit with the code of its error's kind.
                Err(e) if e.status == 409 && e.kind != "invalid-state" => {
                    eprintln!("error: {}", e.message);
                    return Ok(super::kind_exit_code(&e.kind));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Action::Cancel { id } => {
            let j: Job = client
                .call::<(), _>(Method::POST, &format!("{}/cancel", job_path(id)), None)
                .await?;
            match out {
                Output::Json => output::json(&j),
                Output::Table => println!("cancelled job {}", j.id),
            }
        }
        Action::Events { id } => {
            // The job must exist (and be yours) before the stream is followed.
            let _: Job = client.get(&job_path(id)).await?;
            let ended = wait::follow(site, id, |seen| {
                if let Some(ev) = seen {
                    print_event(out, ev);
                }
            })
            .await;
            if !ended {
                // The stream ended without the terminal event (trimmed history, or
                // it broke for good): the job itself says where it is.
                let j: Job = client.get(&job_path(id)).await?;
                if !j.state.is_terminal() {
                    return Err(CliError::Api(crate::api::ApiError::new(
                        hyper::StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        format!(
                            "the event stream of job {id} broke off while it was {}",
                            state_name(j.state)
                        ),
                    )));
                }
            }
        }
    }
    Ok(0)
}

fn job_path(id: &str) -> String {
    format!("/v1/jobs/{}", crate::api::percent_encode(id))
}

fn print_event(out: Output, ev: &JobEvent) {
    match out {
        Output::Json => match serde_json::to_string(ev) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode output: {e}"),
        },
        Output::Table => {
            let line = format!(
                "{}  {:<9}  {}",
                clock(ev.at_ms),
                state_name(ev.state),
                wait::note(ev)
            );
            println!("{}", line.trim_end());
        }
    }
}

/// UTC time of day of a Unix-ms instant, `HH:MM:SS.mmm`.
fn clock(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

fn error_of(j: &Job) -> String {
    j.error
        .as_ref()
        .map(|e| format!("{}: {}", e.kind, e.message))
        .unwrap_or_default()
}

fn table(jobs: &[Job]) {
    let rows: Vec<Vec<String>> = jobs.iter().map(job_row).collect();
    output::table(&JOB_HEADERS, &rows);
}

/// The columns of a job table.
const JOB_HEADERS: [&str; 6] = ["ID", "KIND", "STATE", "VM", "AGE", "ERROR"];

/// One job as a table row ([`JOB_HEADERS`]).
fn job_row(j: &Job) -> Vec<String> {
    vec![
        j.id.clone(),
        j.kind.as_str().to_string(),
        state_name(j.state).into(),
        output::or_dash(j.vm.as_ref()),
        output::age(j.created_ms),
        output::clip(&error_of(j), 60),
    ]
}

/// The first page of a job listing of `limit` jobs (pages of at most 1,000).
fn jobs_path(limit: usize, all: bool) -> String {
    format!("/v1/jobs?limit={}&all={all}", limit.clamp(1, 1000))
}

/// `job list --all-sites`: every named site's jobs, newest first, with the site.
async fn list_all_sites(out: Output, all: bool, limit: usize) -> Result<i32, CliError> {
    let path = jobs_path(limit, all);
    let got = super::sites::across(super::sites::all(out)?, move |s| {
        let path = path.clone();
        async move { Ok(s.client()?.get_pages::<Job>(&path, limit).await?) }
    })
    .await?;
    let mut jobs: Vec<(&str, &Job)> = got
        .iter()
        .flat_map(|(site, jobs)| jobs.iter().map(move |j| (site.as_str(), j)))
        .collect();
    jobs.sort_by_key(|(_, j)| std::cmp::Reverse(j.created_ms));
    if out == Output::Json {
        let tagged: Vec<Value> = jobs
            .iter()
            .map(|(site, j)| super::vms::tag(site, j))
            .collect();
        output::json(&tagged);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|(site, j)| {
            let mut row = vec![site.to_string()];
            row.extend(job_row(j));
            row
        })
        .collect();
    let mut headers = vec!["SITE"];
    headers.extend(JOB_HEADERS);
    output::table(&headers, &rows);
    Ok(0)
}

fn show(out: Output, j: &Job) {
    if out == Output::Json {
        return output::json(j);
    }
    let compact = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    output::fields(&[
        ("id", j.id.clone()),
        ("kind", j.kind.as_str().into()),
        ("state", state_name(j.state).into()),
        ("owner", j.owner.clone()),
        ("vm", output::or_dash(j.vm.as_ref())),
        ("created", format!("{} ago", output::age(j.created_ms))),
        ("updated", format!("{} ago", output::age(j.updated_ms))),
        ("params", compact(&j.params)),
        (
            "result",
            j.result
                .as_ref()
                .map(|r| output::clip(&compact(r), 200))
                .unwrap_or_else(|| "-".into()),
        ),
        ("error", error_of(j)),
    ]);
}
