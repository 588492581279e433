//! Runs the cases against one target: loads the driver into a real plugin host,
//! opens its session, runs each case that applies, cleans up after each.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use gve::agent::guest::GuestRouter;
use gve::plugin::bindings::types::{Capabilities, Credentials};
use gve::plugin::{Grants, HostConfig, Limits, PluginHost, PluginSpec};
use regex::Regex;

use crate::case::{Case, Has, Need, Outcome};
use crate::ctx::Ctx;
use crate::report::{CaseReport, Report};

/// What to prove the driver against.
#[derive(Debug, Clone)]
pub struct Target {
    /// The driver's bundle directory (or manifest).
    pub bundle: PathBuf,
    /// The endpoint its session opens.
    pub endpoint: String,
    /// Credentials for the session.
    pub credentials: Credentials,
    /// What the driver is granted.
    pub grants: Grants,
    /// Its limits.
    pub limits: Limits,
    /// A second host to migrate to (a destination the driver understands).
    pub second_host: Option<String>,
    /// A host of the same endpoint to migrate to, for drivers whose destinations
    /// are hosts behind one endpoint (vSphere): the VM keeps its id and session and
    /// reads back on that host. Used instead of `second_host`.
    pub destination_host: Option<String>,
    /// A template to create and clone from.
    pub template: Option<String>,
    /// A VM or template ready for linked clones (vSphere links to the source's
    /// current snapshot); without it the linked-clone case clones a VM it creates.
    pub linked_source: Option<String>,
    /// A label for the target in the report and the matrix (`vCenter`, `ESXi`).
    pub label: Option<String>,
    /// A guest plugin (such as guest-install) for the guest cases of a driver
    /// without native guest operations: its bundle directory. It is granted the
    /// guest channel, routed to the driver's sessions as the agent routes it.
    pub guest_plugin: Option<PathBuf>,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only cases whose name matches.
    pub filter: Option<Regex>,
    /// How long a state change may take to read back.
    pub settle: Duration,
    /// How long a started guest is given to boot before it is live-migrated.
    pub boot: Duration,
    /// Longest a case may run, cleanup excluded.
    pub case_timeout: Duration,
    /// Benchmark rounds after the cases (0: none).
    pub bench_rounds: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            filter: None,
            settle: Duration::from_secs(60),
            boot: Duration::ZERO,
            case_timeout: Duration::from_secs(600),
            bench_rounds: 0,
        }
    }
}

/// Why a run could not start at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The plugin host could not be set up.
    #[error("cannot set up the plugin host: {0}")]
    Host(String),
    /// The driver did not load.
    #[error("cannot load the driver: {0}")]
    Load(gve::plugin::PluginError),
    /// The guest plugin did not load.
    #[error("cannot load the guest plugin: {0}")]
    LoadGuest(gve::plugin::PluginError),
}

/// The guest plugin of a run and the router its guest channel goes through.
struct GuestPlugin {
    name: String,
    router: Arc<GuestRouter>,
}

/// Runs every applicable case against `target`.
pub async fn run(target: &Target, options: &Options) -> Result<Report, RunError> {
    let cache = tempfile::tempdir().map_err(|e| RunError::Host(e.to_string()))?;
    let host = PluginHost::new(HostConfig {
        cache_dir: cache.path().join("cache"),
        engine: Default::default(),
    })
    .map_err(|e| RunError::Host(e.to_string()))?;
    let router = Arc::new(GuestRouter::default());
    host.set_guest_channel(router.clone());
    let summary = host
        .load(PluginSpec {
            bundle: target.bundle.clone(),
            grants: target.grants.clone(),
            limits: target.limits,
        })
        .await
        .map_err(RunError::Load)?;
    let guest = match &target.guest_plugin {
        Some(bundle) => {
            let loaded = host
                .load(PluginSpec {
                    bundle: bundle.clone(),
                    grants: Grants {
                        guest_channel: true,
                        ..Default::default()
                    },
                    limits: target.limits,
                })
                .await
                .map_err(RunError::LoadGuest)?;
            Some(GuestPlugin {
                name: loaded.name,
                router,
            })
        }
        None => None,
    };
    run_with(&host, &summary.name, guest, target, options).await
}

/// Runs every applicable case against `target` with the driver `name` already loaded
/// in `host` (its bundle, grants, limits and guest plugin in `target` are not used;
/// the guest cases run when the driver declares `guest-native`).
pub async fn run_loaded(
    host: &PluginHost,
    name: &str,
    target: &Target,
    options: &Options,
) -> Result<Report, RunError> {
    run_with(host, name, None, target, options).await
}

async fn run_with(
    host: &PluginHost,
    name: &str,
    guest_plugin: Option<GuestPlugin>,
    target: &Target,
    options: &Options,
) -> Result<Report, RunError> {
    let summary = host.get(name).map_err(RunError::Load)?;
    let info = host.driver_info(name).await.map_err(RunError::Load)?;
    let mut report = Report::new(&summary, &info, &target.endpoint);
    report.label = target.label.clone();
    let open = |endpoint: String| {
        let host = host.clone();
        let (name, creds) = (summary.name.clone(), target.credentials.clone());
        async move { host.open_driver(&name, &endpoint, creds).await }
    };
    let cases: Vec<Case> = crate::cases::all()
        .into_iter()
        .filter(|c| options.filter.as_ref().is_none_or(|f| f.is_match(c.name)))
        .collect();
    let driver = match open(target.endpoint.clone()).await {
        Ok(d) => d,
        Err(e) => {
            for c in &cases {
                report.push(CaseReport::new(
                    c,
                    Outcome::Fail(format!("open {}: {e}", target.endpoint)),
                    0,
                ));
            }
            return Ok(report);
        }
    };
    if let Ok(h) = driver.host_info().await {
        report.proven_against = format!(
            "{} {} on {}",
            h.hypervisor_kind, h.hypervisor_version, h.platform
        );
    }
    let second = match (&target.destination_host, &target.second_host) {
        (Some(dest), _) => Some((dest.clone(), driver.clone())),
        (None, Some(dest)) => match open(dest.clone()).await {
            Ok(s) => Some((dest.clone(), s)),
            Err(e) => {
                report
                    .notes
                    .push(format!("second host {dest} did not open: {e}"));
                None
            }
        },
        (None, None) => None,
    };
    // Guest operations: the driver's own, or the guest plugin's through the router.
    let guest_provider = if info.capabilities.contains(Capabilities::GUEST_NATIVE) {
        Some(summary.name.clone())
    } else if let Some(g) = &guest_plugin {
        g.router.insert(driver.clone());
        if let (Some((_, s)), None) = (&second, &target.destination_host) {
            g.router.insert(s.clone());
        }
        report.guest_plugin = Some(g.name.clone());
        Some(g.name.clone())
    } else {
        None
    };
    let guest = match guest_provider {
        Some(provider) => match host
            .open_guest(&provider, &target.endpoint, target.credentials.clone())
            .await
        {
            Ok(g) => Some(Ok(g)),
            Err(e) => Some(Err(format!(
                "guest operations of {provider} did not open on {}: {e}",
                target.endpoint
            ))),
        },
        None => None,
    };
    let ctx = Ctx::new(
        driver,
        second,
        info.clone(),
        target.template.clone(),
        options.settle,
    )
    .with_guest(guest)
    .with_boot(options.boot)
    .with_destination_host(target.destination_host.is_some())
    .with_linked_source(target.linked_source.clone());
    report.run = ctx.run.clone();
    let has = Has {
        second_host: ctx.second.is_some(),
        template: ctx.template.is_some(),
        guest: ctx.guest.is_some(),
        bulk: ctx.driver.has_bulk(),
    };
    for case in &cases {
        let skip = case.need.skip_reason(info.capabilities, has);
        if let Some(reason) = skip {
            report.push(CaseReport::new(case, Outcome::Skip(reason), 0));
            continue;
        }
        let t = Instant::now();
        let checked = tokio::time::timeout(options.case_timeout, (case.check)(&ctx)).await;
        let left = ctx.cleanup().await;
        let ms = t.elapsed().as_millis() as u64;
        let mut outcome = match checked {
            Ok(Ok(())) => Outcome::Pass,
            Ok(Err(f)) => Outcome::Fail(f.0),
            Err(_) => Outcome::Fail(format!("did not finish within {:?}", options.case_timeout)),
        };
        if !left.is_empty() {
            let leak = format!("left behind after cleanup: {}", left.join("; "));
            outcome = match outcome {
                Outcome::Fail(m) => Outcome::Fail(format!("{m}; {leak}")),
                _ => Outcome::Fail(leak),
            };
        }
        report.push(CaseReport::new(case, outcome, ms));
    }
    if options.bench_rounds > 0 {
        report.bench = crate::bench::run(&ctx, options.bench_rounds).await;
    }
    report.finished = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Ok(report)
}

/// Whether a case with `need` is mandatory.
pub fn mandatory(need: &Need) -> bool {
    matches!(need, Need::Mandatory)
}
