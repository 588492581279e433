//! `gve-conformance` (also `gve conformance`): proves a driver against a real host.
//!
//! ```text
//! gve-conformance run --plugin BUNDLE --endpoint URI [--grant-http H:P]... [--grant-tls H:P=sha256:HEX]...
//!     [--grant-libvirt URI]...
//!     [--grant-dir HOST=GUEST[:rw]]... [--config K=V]... [--username U --password P | --token T]
//!     [--second-host DEST | --destination-host HOST] [--template T] [--linked-source VM] [--guest-plugin BUNDLE] [--run REGEX] [--report DIR]
//! gve-conformance list
//! gve-conformance matrix REPORT.json... [--out FILE] [--check]
//! ```
//!
//! Exit status: 0 all applicable cases passed; 1 a case failed; 2 bad usage or the
//! driver could not be loaded; 3 `matrix --check` found the file stale.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gve::plugin::bindings::types::Credentials;
use gve::plugin::{DirGrant, Grants, Limits};
use gve_conformance::{cases, matrix, run, Options, Report, Target};

#[derive(Parser)]
#[command(
    name = "gve-conformance",
    version,
    about = "Proves a gve hypervisor driver against a real host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the suite against a driver and a host.
    Run(Box<RunArgs>),
    /// Lists the cases: name, group, what they need, what they check.
    List,
    /// Writes the support matrix from JSON reports.
    Matrix {
        /// Reports written by `run --report`.
        reports: Vec<PathBuf>,
        /// Where to write it (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Fails (exit 3) if `--out` differs from what the reports give.
        #[arg(long, requires = "out")]
        check: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The driver's bundle directory.
    #[arg(long)]
    plugin: PathBuf,
    /// The endpoint its session opens (a libvirt URI, an SDK URL, ...).
    #[arg(long)]
    endpoint: String,
    /// HTTP authority to grant (`host:port`), repeatable.
    #[arg(long = "grant-http")]
    http: Vec<String>,
    /// How to verify the TLS server at a granted HTTP authority:
    /// `HOST:PORT=sha256:HEX` or `HOST:PORT=ca:PATH`, repeatable.
    #[arg(long = "grant-tls")]
    tls: Vec<String>,
    /// libvirt URI to grant, repeatable.
    #[arg(long = "grant-libvirt")]
    libvirt: Vec<String>,
    /// Directory to grant, `HOST=GUEST` or `HOST=GUEST:rw`, repeatable.
    #[arg(long = "grant-dir")]
    dirs: Vec<String>,
    /// Config value `KEY=VALUE`, repeatable.
    #[arg(long = "config")]
    config: Vec<String>,
    /// Session user name.
    #[arg(long, env = "GVE_CONFORMANCE_USERNAME")]
    username: Option<String>,
    /// Session password.
    #[arg(long, env = "GVE_CONFORMANCE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Session token.
    #[arg(long, env = "GVE_CONFORMANCE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A second host to migrate to.
    #[arg(long, conflicts_with = "destination_host")]
    second_host: Option<String>,
    /// A host of the same endpoint to migrate to (vSphere: a host id or name).
    #[arg(long)]
    destination_host: Option<String>,
    /// A label for the target in the report and the support matrix (e.g. `vCenter`).
    #[arg(long)]
    label: Option<String>,
    /// A VM or template ready for linked clones (vSphere: one with a snapshot).
    #[arg(long)]
    linked_source: Option<String>,
    /// A template to create and clone from.
    #[arg(long)]
    template: Option<String>,
    /// A guest plugin's bundle (such as guest-install) for the guest cases of a
    /// driver without native guest operations; it is granted the guest channel.
    #[arg(long)]
    guest_plugin: Option<PathBuf>,
    /// Only cases whose name matches this regular expression.
    #[arg(long = "run")]
    filter: Option<String>,
    /// Directory for report.json, junit.xml and report.txt.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Call budget for the driver, ms.
    #[arg(long, default_value_t = 60_000)]
    call_timeout_ms: u64,
    /// Benchmark mode: after the cases, this many rounds of timed operations
    /// (p50 / p99 per operation in the report).
    #[arg(long, default_value_t = 0)]
    bench: u32,
    /// How long a state change may take to read back, s.
    #[arg(long, default_value_t = 60)]
    settle_s: u64,
    /// How long a started guest is given to boot before it is live-migrated, s (a
    /// Xen PV guest can be suspended only once its kernel has told Xen its memory map).
    #[arg(long, default_value_t = 0)]
    boot_s: u64,
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("gve-conformance: {msg}");
    ExitCode::from(2)
}

fn grants(a: &RunArgs) -> Result<Grants, String> {
    let mut g = Grants {
        http: a.http.clone(),
        libvirt: a.libvirt.clone(),
        ..Default::default()
    };
    for d in &a.dirs {
        let (host, rest) = d
            .split_once('=')
            .ok_or_else(|| format!("--grant-dir {d}: want HOST=GUEST or HOST=GUEST:rw"))?;
        let (guest, writable) = match rest.strip_suffix(":rw") {
            Some(g) => (g, true),
            None => (rest, false),
        };
        g.directories.push(DirGrant {
            host: PathBuf::from(host),
            guest: guest.into(),
            writable,
        });
    }
    for t in &a.tls {
        let (authority, trust) = gve::plugin::grants::parse_tls_grant(t)?;
        g.tls.insert(authority, trust);
    }
    for kv in &a.config {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--config {kv}: want KEY=VALUE"))?;
        g.config.insert(k.into(), v.into());
    }
    Ok(g)
}

async fn run_cmd(a: RunArgs) -> ExitCode {
    let grants = match grants(&a) {
        Ok(g) => g,
        Err(e) => return usage(e),
    };
    let filter = match a.filter.as_deref().map(regex::Regex::new).transpose() {
        Ok(f) => f,
        Err(e) => return usage(format!("--run: {e}")),
    };
    let limits = Limits {
        call_timeout_ms: a.call_timeout_ms,
        ..Default::default()
    };
    let target = Target {
        bundle: a.plugin,
        endpoint: a.endpoint,
        credentials: Credentials {
            username: a.username,
            password: a.password,
            token: a.token,
        },
        grants,
        limits,
        second_host: a.second_host,
        destination_host: a.destination_host,
        template: a.template,
        linked_source: a.linked_source,
        label: a.label,
        guest_plugin: a.guest_plugin,
    };
    let options = Options {
        filter,
        settle: Duration::from_secs(a.settle_s),
        boot: Duration::from_secs(a.boot_s),
        bench_rounds: a.bench,
        ..Default::default()
    };
    let report = match run(&target, &options).await {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    say(&report.human());
    if let Some(dir) = a.report {
        if let Err(e) = write_reports(&dir, &report) {
            return usage(format!("writing reports to {}: {e}", dir.display()));
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn write_reports(dir: &std::path::Path, r: &Report) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(r).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("report.json"), json + "\n")?;
    std::fs::write(dir.join("junit.xml"), r.junit())?;
    std::fs::write(dir.join("report.txt"), r.human())
}

fn matrix_cmd(reports: Vec<PathBuf>, out: Option<PathBuf>, check: bool) -> ExitCode {
    let mut rs = Vec::new();
    for p in &reports {
        let text = match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => return usage(format!("{}: {e}", p.display())),
        };
        match serde_json::from_str::<Report>(&text) {
            Ok(r) => rs.push(r),
            Err(e) => return usage(format!("{}: not a conformance report: {e}", p.display())),
        }
    }
    let md = matrix::markdown(&rs);
    match out {
        None => {
            say(&md);
            ExitCode::SUCCESS
        }
        Some(path) if check => match std::fs::read_to_string(&path) {
            Ok(current) if current == md => ExitCode::SUCCESS,
            _ => {
                eprintln!(
                    "gve-conformance: {} is stale; regenerate it with `gve-conformance matrix ... --out {}`",
                    path.display(),
                    path.display()
                );
                ExitCode::from(3)
            }
        },
        Some(path) => match std::fs::write(&path, md) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => usage(format!("{}: {e}", path.display())),
        },
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(a) => run_cmd(*a).await,
        Command::List => {
            for c in cases::all() {
                use gve_conformance::Need;
                let caps = gve::plugin::contract::capability_names(c.need.capabilities()).join("+");
                let need = match c.need {
                    Need::Mandatory => "mandatory".to_string(),
                    Need::SecondHost(_) => format!("needs {caps}, a second host"),
                    Need::Template(_) => format!("needs {caps}, a template"),
                    Need::Guest(_) => format!("needs {caps}, guest ops"),
                    Need::Bulk(_) => format!("needs {caps}, bulk-copy, guest ops"),
                    Need::NoBulk => "drivers without bulk-copy".to_string(),
                    Need::Declared(_) | Need::Undeclared(..) => format!("needs {caps}"),
                };
                say(&format!(
                    "{:<48} {:<13} {:<40} {}\n",
                    c.name, c.group, need, c.about
                ));
            }
            ExitCode::SUCCESS
        }
        Command::Matrix {
            reports,
            out,
            check,
        } => matrix_cmd(reports, out, check),
    }
}
