//! `gve vm ...`: request VMs by profile, manage them (each change is a job: printed
//! at once, or followed to its end with `--wait`), run commands in them and copy
//! files in and out.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use base64::Engine;
use hyper::Method;
use serde_json::{json, Value};

use super::output::{self, Output};
use super::wait::{self, Show};
use super::{CliError, SiteOpts};
use crate::api::client::Client;
use crate::site::model::{Job, JobKind, SiteVm, VmRequest};

/// Arguments of `gve vm`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// The site.
    #[command(flatten)]
    pub site: SiteOpts,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// VM actions.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List your VMs.
    List {
        /// Every user's VMs and the free ones (admins).
        #[arg(long)]
        all: bool,
        /// At every named site at once (`gve site add`), with a SITE column;
        /// a site that does not answer is a warning, not a failure.
        #[arg(long)]
        all_sites: bool,
    },
    /// Show one VM.
    Show {
        /// VM id.
        id: String,
    },
    /// List the templates the site's agents offer.
    Templates,
    /// Request a VM by profile: a free one that matches, or a new one; started.
    Request(RequestArgs),
    /// Power a VM on.
    Start(Target),
    /// Shut a VM down.
    Shutdown {
        /// The VM.
        #[command(flatten)]
        target: Target,
        /// Power it off instead of asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Suspend a running VM.
    Suspend(Target),
    /// Resume a suspended or paused VM.
    Resume(Target),
    /// Give a VM back to the site (stopped; pooled or destroyed by site policy).
    Release(Target),
    /// Move a VM to another agent.
    Migrate {
        /// The VM.
        #[command(flatten)]
        target: Target,
        /// Destination agent id.
        #[arg(long)]
        to: String,
        /// Stop-and-copy instead of live migration.
        #[arg(long)]
        offline: bool,
    },
    /// Copy a VM into a new VM of yours.
    Clone {
        /// The VM.
        #[command(flatten)]
        target: Target,
        /// Name of the copy.
        #[arg(long)]
        name: String,
        /// Share the source's disks copy-on-write instead of copying them.
        #[arg(long)]
        linked: bool,
    },
    /// Install a software bundle in the guest.
    Provision {
        /// The VM.
        #[command(flatten)]
        target: Target,
        /// Bundle name (as the agent knows it).
        bundle: String,
    },
    /// Extend a VM's lease.
    Renew {
        /// VM id.
        id: String,
        /// New lease length from now, seconds (the site's default when absent).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Run a command in the guest; prints its output and exits with its exit code
    /// (124 when it timed out, 128+N when signal N ended it).
    Exec(ExecArgs),
    /// Copy a local file into the guest (streamed; checked by SHA-256).
    CopyIn {
        /// VM id.
        id: String,
        /// Local file.
        local: PathBuf,
        /// Absolute path in the guest.
        guest: String,
        /// Permission bits of the guest file, octal.
        #[arg(long, default_value = "0644")]
        mode: String,
        /// Create missing parent directories.
        #[arg(long)]
        parents: bool,
    },
    /// Copy a guest file out (streamed; checked by SHA-256).
    CopyOut {
        /// VM id.
        id: String,
        /// Absolute path in the guest.
        guest: String,
        /// Local file (or an existing directory to copy into).
        local: PathBuf,
    },
}

/// A VM to act on, and whether to follow the job.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// VM id.
    pub id: String,
    /// Follow the job to its end and print the result.
    #[arg(long)]
    pub wait: bool,
}

/// A VM profile (GLUE 2.0 terms) and how to hold it.
#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// Virtual CPUs (GLUE2 LogicalCPUs).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Memory, MiB (GLUE2 MainMemorySize).
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// Template to derive a new VM from.
    #[arg(long)]
    pub template: Option<String>,
    /// OS family wanted (GLUE2 OSFamily, e.g. linux).
    #[arg(long)]
    pub os_family: Option<String>,
    /// Software bundle that must be installed (repeatable).
    #[arg(long = "software", value_name = "BUNDLE")]
    pub software: Vec<String>,
    /// Lease length, seconds (the site's default when absent).
    #[arg(long)]
    pub lease_seconds: Option<u64>,
    /// Name for a new VM.
    #[arg(long)]
    pub name: Option<String>,
    /// Start this VM (free, or yours already) instead of matching the profile.
    #[arg(long = "vm", value_name = "ID")]
    pub vm: Option<String>,
    /// Follow the job to its end and print the VM: once it is ready (its guest
    /// agent answers), or with --running as soon as it runs.
    #[arg(long)]
    pub wait: bool,
    /// End the request as soon as the VM runs, without waiting for its guest agent.
    #[arg(long)]
    pub running: bool,
    /// Place it on the named site with the most room for the profile (by each
    /// site's GLUE 2 document and your quota there).
    #[arg(long, conflicts_with = "vm")]
    pub any_site: bool,
}

/// A command to run in the guest.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// VM id.
    pub id: String,
    /// An environment variable KEY=VALUE (repeatable; not recorded by the site).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Budget of the command, milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u32>,
    /// A file to feed the command's standard input (`-`: gve's own stdin).
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// Program and arguments (after `--` when they start with `-`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub argv: Vec<String>,
}

/// Runs a VM command; returns the exit code.
pub async fn run(args: VmArgs) -> Result<i32, CliError> {
    match &args.action {
        Action::List {
            all,
            all_sites: true,
        } => return list_all_sites(args.site.output, *all).await,
        Action::Request(r) if r.any_site => {
            let chosen = super::sites::pick(args.site.output, &profile(r)).await?;
            request(&chosen, r).await?;
            return Ok(0);
        }
        _ => {}
    }
    let site = &args.site.resolve()?;
    let client = site.client()?;
    let action = |t: &Target, what: &str, body: Value| {
        let client = client.clone();
        let path = format!("{}/{what}", vm_path(&t.id));
        let wait = t.wait;
        async move {
            let job: Job = client.call(Method::POST, &path, Some(&body)).await?;
            follow(site, &client, job, wait).await
        }
    };
    match &args.action {
        Action::List { all, .. } => {
            let path = if *all { "/v1/vms?all=true" } else { "/v1/vms" };
            let vms: Vec<SiteVm> = client.get_pages(path, usize::MAX).await?;
            print_vms(site.output, &vms);
        }
        Action::Show { id } => show_vm(site.output, &client.get(&vm_path(id)).await?),
        Action::Templates => {
            let names: Vec<String> = client.get("/v1/templates").await?;
            match site.output {
                Output::Json => output::json(&names),
                Output::Table => names.iter().for_each(|n| println!("{n}")),
            }
        }
        Action::Request(r) => request(site, r).await?,
        Action::Start(t) => action(t, "start", json!({})).await?,
        Action::Suspend(t) => action(t, "suspend", json!({})).await?,
        Action::Resume(t) => action(t, "resume", json!({})).await?,
        Action::Release(t) => action(t, "release", json!({})).await?,
        Action::Shutdown { target, force } => {
            action(target, "shutdown", json!({ "force": force })).await?
        }
        Action::Migrate {
            target,
            to,
            offline,
        } => action(target, "migrate", json!({ "to": to, "live": !offline })).await?,
        Action::Clone {
            target,
            name,
            linked,
        } => action(target, "clone", json!({ "name": name, "linked": linked })).await?,
        Action::Provision { target, bundle } => {
            action(target, "provision", json!({ "bundle": bundle })).await?
        }
        Action::Renew { id, seconds } => {
            let vm: SiteVm = client
                .call(
                    Method::POST,
                    &format!("{}/renew", vm_path(id)),
                    Some(&json!({ "seconds": seconds })),
                )
                .await?;
            show_vm(site.output, &vm);
        }
        Action::Exec(e) => return exec(site, &client, e).await,
        Action::CopyIn {
            id,
            local,
            guest,
            mode,
            parents,
        } => super::copy::copy_in(site, &client, id, local, guest, mode, *parents).await?,
        Action::CopyOut { id, guest, local } => {
            super::copy::copy_out(site, &client, id, guest, local).await?
        }
    }
    Ok(0)
}

/// The profile of a request, as `--any-site` compares it with sites.
fn profile(r: &RequestArgs) -> super::sites::Profile {
    super::sites::Profile {
        cpus: r.cpus,
        memory_mib: r.memory_mib,
        template: r.template.clone(),
        os_family: r.os_family.clone(),
    }
}

/// Submits a VM request to `site` (resolved) and follows it as asked.
async fn request(site: &SiteOpts, r: &RequestArgs) -> Result<(), CliError> {
    let client = site.client()?;
    let body = VmRequest {
        logical_cpus: r.cpus,
        main_memory_mib: r.memory_mib,
        template: r.template.clone(),
        os_family: r.os_family.clone(),
        software: r.software.clone(),
        lease_seconds: r.lease_seconds,
        name: r.name.clone(),
        vm: r.vm.clone(),
        wait_for_guest: !r.running,
    };
    let job: Job = client.call(Method::POST, "/v1/vms", Some(&body)).await?;
    follow(site, &client, job, r.wait).await
}

/// `vm list --all-sites`: every named site's VMs, with the site's name.
async fn list_all_sites(out: Output, all: bool) -> Result<i32, CliError> {
    let path = if all { "/v1/vms?all=true" } else { "/v1/vms" };
    let got = super::sites::across(super::sites::all(out)?, move |s| async move {
        Ok(s.client()?.get_pages::<SiteVm>(path, usize::MAX).await?)
    })
    .await?;
    if out == Output::Json {
        let tagged: Vec<Value> = got
            .iter()
            .flat_map(|(site, vms)| vms.iter().map(move |v| tag(site, v)))
            .collect();
        output::json(&tagged);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = got
        .iter()
        .flat_map(|(site, vms)| {
            vms.iter().map(move |v| {
                let mut row = vec![site.clone()];
                row.extend(vm_row(v));
                row
            })
        })
        .collect();
    let mut headers = vec!["SITE"];
    headers.extend(VM_HEADERS);
    output::table(&headers, &rows);
    Ok(0)
}

/// `value` as a JSON object with `"site": site` added.
pub fn tag(site: &str, value: &impl serde::Serialize) -> Value {
    let mut v = serde_json::to_value(value).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("site".into(), json!(site));
    }
    v
}

/// The API path of VM `id`.
pub fn vm_path(id: &str) -> String {
    format!("/v1/vms/{}", crate::api::percent_encode(id))
}

/// Prints a submitted job, or follows it and prints what it produced.
async fn follow(site: &SiteOpts, client: &Client, job: Job, wait: bool) -> Result<(), CliError> {
    let Some(done) = wait::submitted(site, client, job, wait).await? else {
        return Ok(());
    };
    if site.output == Output::Table {
        print_result(client, &done).await;
    }
    Ok(())
}

/// A table of what a succeeded job produced: the VM it made or changed, or a line.
async fn print_result(client: &Client, job: &Job) {
    let r = job.result.clone().unwrap_or(Value::Null);
    match job.kind {
        JobKind::Request | JobKind::Clone | JobKind::Migrate => {
            match serde_json::from_value::<SiteVm>(r.clone()) {
                Ok(vm) => print_vms(Output::Table, &[vm]),
                Err(_) => output::json(&r),
            }
        }
        JobKind::Release => println!(
            "released VM {}{}",
            r["released"].as_str().unwrap_or_default(),
            if r["destroyed"] == true {
                " (destroyed)"
            } else {
                ""
            }
        ),
        JobKind::Provision => {
            let p = &r["provision"];
            println!(
                "{} {} ({})",
                p["bundle"].as_str().unwrap_or_default(),
                if p["already-installed"] == true {
                    "was installed already"
                } else {
                    "installed"
                },
                output::clip(p["digest"].as_str().unwrap_or_default(), 20)
            );
        }
        _ => match &job.vm {
            Some(id) => match client.get::<SiteVm>(&vm_path(id)).await {
                Ok(vm) => print_vms(Output::Table, &[vm]),
                Err(_) => output::json(&r),
            },
            None => output::json(&r),
        },
    }
}

/// Runs a command in the guest and relays its output and exit code.
async fn exec(site: &SiteOpts, client: &Client, e: &ExecArgs) -> Result<i32, CliError> {
    let mut env = BTreeMap::new();
    for kv in &e.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--env '{kv}' must be KEY=VALUE")))?;
        env.insert(k.to_string(), v.to_string());
    }
    let mut body = json!({ "argv": e.argv, "env": env });
    if let Some(c) = &e.cwd {
        body["cwd"] = json!(c);
    }
    if let Some(t) = e.timeout_ms {
        body["timeout-ms"] = json!(t);
    }
    if let Some(f) = &e.stdin {
        let mut bytes = Vec::new();
        let read = if f.as_os_str() == "-" {
            std::io::stdin().read_to_end(&mut bytes)
        } else {
            std::fs::File::open(f).and_then(|mut file| file.read_to_end(&mut bytes))
        };
        read.map_err(|err| CliError::file(f, err))?;
        body["stdin-b64"] = json!(base64::engine::general_purpose::STANDARD.encode(&bytes));
    }
    let job: Job = client
        .call(
            Method::POST,
            &format!("{}/exec", vm_path(&e.id)),
            Some(&body),
        )
        .await?;
    let done = wait::wait(site, client, &job.id, Show::SpinnerOnly).await?;
    if site.output == Output::Json {
        output::json(&done);
    }
    let done = wait::outcome(done)?;
    let x = done
        .result
        .as_ref()
        .map(|r| r["exec"].clone())
        .unwrap_or_default();
    if site.output == Output::Table {
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode = |field: &str| b64.decode(x[field].as_str().unwrap_or_default());
        let (out, err) = match (decode("stdout-b64"), decode("stderr-b64")) {
            (Ok(o), Ok(e)) => (o, e),
            _ => {
                return Err(CliError::Api(crate::api::ApiError::new(
                    hyper::StatusCode::BAD_GATEWAY,
                    "backend",
                    format!("job {}: the command's output is not base64", done.id),
                )))
            }
        };
        let _ = std::io::stdout().write_all(&out);
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().write_all(&err);
        for s in ["stdout", "stderr"] {
            if x[format!("{s}-truncated")] == true {
                eprintln!("gve: the command's {s} was longer than the output limit and was cut");
            }
        }
    }
    Ok(exit_status(&x))
}

/// The exit code of a command as a shell reports it.
fn exit_status(x: &Value) -> i32 {
    if x["timed-out"] == true {
        eprintln!("gve: the command timed out");
        return 124;
    }
    if let Some(c) = x["exit-code"].as_i64() {
        return i32::try_from(c).unwrap_or(1);
    }
    match x["signal"].as_i64() {
        Some(s) => 128 + i32::try_from(s).unwrap_or(0),
        None => 1,
    }
}

fn lease(vm: &SiteVm) -> String {
    match vm.lease {
        None => "-".into(),
        Some(l) if l.expired => "expired".into(),
        Some(l) => output::span(l.until_ms.saturating_sub(crate::agent::model::now_ms())),
    }
}

/// Prints VMs as a table (or JSON).
pub fn print_vms(out: Output, vms: &[SiteVm]) {
    if out == Output::Json {
        return output::json(vms);
    }
    let rows: Vec<Vec<String>> = vms.iter().map(vm_row).collect();
    output::table(&VM_HEADERS, &rows);
}

/// The columns of a VM table.
const VM_HEADERS: [&str; 9] = [
    "ID", "NAME", "STATE", "READY", "AGENT", "CPUS", "MEM-MIB", "OWNER", "LEASE",
];

/// One VM as a table row ([`VM_HEADERS`]).
fn vm_row(v: &SiteVm) -> Vec<String> {
    vec![
        v.id.clone(),
        v.name.clone(),
        v.state.clone(),
        ready(v),
        v.agent.clone(),
        v.logical_cpus.to_string(),
        v.main_memory_mib.to_string(),
        output::or_dash(v.owner.as_ref()),
        lease(v),
    ]
}

/// `yes` once the guest agent answered, `no` while it boots, `-` when not running.
fn ready(v: &SiteVm) -> String {
    match (v.state.as_str(), v.ready) {
        ("running", true) => "yes".into(),
        ("running", false) => "no".into(),
        _ => "-".into(),
    }
}

fn show_vm(out: Output, v: &SiteVm) {
    if out == Output::Json {
        return output::json(v);
    }
    let software: Vec<String> = v
        .software
        .iter()
        .map(|(b, d)| format!("{b} ({})", output::clip(d, 20)))
        .collect();
    output::fields(&[
        ("id", v.id.clone()),
        ("name", v.name.clone()),
        ("state", v.state.clone()),
        ("ready", ready(v)),
        ("owner", output::or_dash(v.owner.as_ref())),
        ("agent", format!("{} (as {})", v.agent, v.agent_vm)),
        ("cpus", v.logical_cpus.to_string()),
        ("memory", format!("{} MiB", v.main_memory_mib)),
        ("template", output::or_dash(v.template.as_ref())),
        ("os-family", output::or_dash(v.os_family.as_ref())),
        ("lease", lease(v)),
        ("software", software.join(", ")),
        ("updated", format!("{} ago", output::age(v.updated_ms))),
    ]);
}
