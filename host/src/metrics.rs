//! Prometheus metrics, served as text at `GET /metrics` by the site (admins) and
//! by each agent (its admin token). Counters and histograms are updated where
//! things happen; gauges of what exists now (VMs by state, agents up, active jobs)
//! are read from the store at each scrape. Every metric is named and described in
//! `docs/metrics.md`.
//!
//! Labels have bounded values only: plugin names, operation and job kinds, states,
//! outcomes; never a VM id, user or URL.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of the text exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets, seconds: 5 ms to 20 min (plugin calls are ms, VM operations
/// seconds, copies and provisioning minutes).
fn buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        600.0, 1200.0,
    ]
    .into_iter()
}

fn histogram() -> Histogram {
    Histogram::new(buckets())
}

/// Labels of one plugin entry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Plugin name.
    pub plugin: String,
    /// Contract operation (`create`, `list-vms`, ...).
    pub op: String,
    /// `ok`, `driver-error`, `deadline`, `memory-cap`, `budget`, `trap`, `panic`, `other`.
    pub outcome: String,
}

/// Labels of a plugin's call latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginOpLabels {
    /// Plugin name.
    pub plugin: String,
    /// Contract operation.
    pub op: String,
}

/// What the plugin host counts: every entry into a plugin, by outcome, and its
/// latency. Deadline hits, traps and memory-cap refusals per plugin are the
/// `outcome` label of `gve_plugin_calls_total`.
#[derive(Debug)]
pub struct PluginMetrics {
    calls: Family<CallLabels, Counter>,
    seconds: Family<PluginOpLabels, Histogram, fn() -> Histogram>,
}

impl Default for PluginMetrics {
    fn default() -> Self {
        PluginMetrics {
            calls: Family::default(),
            seconds: Family::new_with_constructor(histogram),
        }
    }
}

impl PluginMetrics {
    /// Records one entry into `plugin`'s `op` that took `took` and ended as `outcome`.
    pub fn call(&self, plugin: &str, op: &str, outcome: &str, took: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                plugin: plugin.to_string(),
                op: op.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.seconds
            .get_or_create(&PluginOpLabels {
                plugin: plugin.to_string(),
                op: op.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Registers its metrics in `r`.
    pub fn register(self: &Arc<Self>, r: &mut Registry) {
        r.register(
            "gve_plugin_calls",
            "Entries into plugins, by plugin, contract operation and outcome",
            self.calls.clone(),
        );
        r.register(
            "gve_plugin_call_duration_seconds",
            "Time an entry into a plugin took",
            self.seconds.clone(),
        );
    }
}

/// Labels of a kind and a state (jobs, operations).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindState {
    /// Job or operation kind.
    pub kind: String,
    /// State.
    pub state: String,
}

/// Labels of one state (VMs, agents).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// State.
    pub state: String,
}

/// Counts of finished work by kind and end state, with its latency: the site's
/// jobs or an agent's operations.
pub struct WorkMetrics {
    ended: Family<KindState, Counter>,
    seconds: Family<KindState, Histogram, fn() -> Histogram>,
    /// What exists now, set at each scrape: active work by kind and state.
    pub active: Family<KindState, Gauge>,
    /// What exists now, set at each scrape: VMs by state.
    pub vms: Family<StateLabel, Gauge>,
}

impl Default for WorkMetrics {
    fn default() -> Self {
        WorkMetrics {
            ended: Family::default(),
            seconds: Family::new_with_constructor(histogram),
            active: Family::default(),
            vms: Family::default(),
        }
    }
}

impl WorkMetrics {
    /// Records a piece of work of `kind` that ended in `state` after `took`.
    pub fn ended(&self, kind: &str, state: &str, took: Duration) {
        let labels = KindState {
            kind: kind.to_string(),
            state: state.to_string(),
        };
        self.ended.get_or_create(&labels).inc();
        self.seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Sets the gauges of what exists now: active work by (kind, state) and VMs
    /// by state (labels not listed drop out).
    pub fn set_now(
        &self,
        active: impl IntoIterator<Item = ((String, String), i64)>,
        vms: impl IntoIterator<Item = (String, i64)>,
    ) {
        self.active.clear();
        for ((kind, state), n) in active {
            self.active.get_or_create(&KindState { kind, state }).set(n);
        }
        self.vms.clear();
        for (state, n) in vms {
            self.vms.get_or_create(&StateLabel { state }).set(n);
        }
    }

    /// Registers its metrics in `r` as `gve_<prefix>_...` (`site_jobs` or
    /// `agent_operations`).
    pub fn register(&self, r: &mut Registry, prefix: &str, what: &str, vms_help: &str) {
        r.register(
            format!("gve_{prefix}_ended"),
            format!("{what} that ended, by kind and end state"),
            self.ended.clone(),
        );
        r.register(
            format!("gve_{prefix}_duration_seconds"),
            format!("Time from submission to end of {what}, by kind and end state"),
            self.seconds.clone(),
        );
        r.register(
            format!("gve_{prefix}_active"),
            format!("{what} queued or running now, by kind and state"),
            self.active.clone(),
        );
        let vms = if prefix.starts_with("site") {
            "gve_site_vms"
        } else {
            "gve_agent_vms"
        };
        r.register(vms, vms_help.to_string(), self.vms.clone());
    }
}

/// The site's metrics: its jobs, its VMs and its agents.
pub struct SiteMetrics {
    /// Jobs ended and active; VMs by state.
    pub work: WorkMetrics,
    /// Agents by status, set at each scrape.
    pub agents: Family<StateLabel, Gauge>,
    /// Finished jobs the site holds, set at each scrape.
    pub jobs_kept: Gauge,
    /// Health checks' VM listings by outcome: `read` (every VM) or `unchanged`
    /// (a 304: the agent's VMs were as the last settled listing saw them).
    pub agent_listings: Family<StateLabel, Counter>,
    /// One scrape at a time sets the gauges and renders them.
    pub scrape: std::sync::Mutex<()>,
    registry: Registry,
}

impl Default for SiteMetrics {
    fn default() -> Self {
        let work = WorkMetrics::default();
        let agents = Family::<StateLabel, Gauge>::default();
        let mut registry = Registry::default();
        work.register(
            &mut registry,
            "site_jobs",
            "Jobs",
            "The site's VMs, by state",
        );
        registry.register(
            "gve_site_agents",
            "The site's agents, by status (up or down)",
            agents.clone(),
        );
        let jobs_kept = Gauge::default();
        registry.register(
            "gve_site_jobs_kept",
            "Finished jobs the site holds (retention trims them to job-retention-seconds and max-finished-jobs every minute)",
            jobs_kept.clone(),
        );
        let agent_listings = Family::<StateLabel, Counter>::default();
        registry.register(
            "gve_site_agent_vm_listings",
            "Health checks' VM listings of agents, by outcome (read: every VM; unchanged: not modified since the last settled listing)",
            agent_listings.clone(),
        );
        SiteMetrics {
            work,
            agents,
            jobs_kept,
            agent_listings,
            scrape: Default::default(),
            registry,
        }
    }
}

impl SiteMetrics {
    /// The text exposition.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// An agent's metrics: its operations, its VMs and its plugins' calls.
pub struct AgentMetrics {
    /// Operations ended and active; VMs by state.
    pub work: Arc<WorkMetrics>,
    /// One scrape at a time sets the gauges and renders them.
    pub scrape: std::sync::Mutex<()>,
    registry: Registry,
}

impl AgentMetrics {
    /// Metrics over `plugins`' counters.
    pub fn new(plugins: &Arc<PluginMetrics>) -> AgentMetrics {
        let work = Arc::new(WorkMetrics::default());
        let mut registry = Registry::default();
        work.register(
            &mut registry,
            "agent_operations",
            "Operations",
            "The VMs in the agent's registry, by state",
        );
        plugins.register(&mut registry);
        AgentMetrics {
            work,
            scrape: Default::default(),
            registry,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// Renders `r` as Prometheus text.
pub fn render(r: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, r) {
        tracing::error!("cannot encode metrics: {e}");
    }
    out
}

/// The serde name of a unit enum value (`succeeded`, `running`, ...).
pub fn name_of<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// Counts `items` by `key`.
pub fn count<T, K: Ord>(items: impl IntoIterator<Item = T>, key: impl Fn(T) -> K) -> Vec<(K, i64)> {
    let mut m = std::collections::BTreeMap::new();
    for i in items {
        *m.entry(key(i)).or_insert(0i64) += 1;
    }
    m.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_what_was_recorded_and_drops_what_is_gone() {
        let p = Arc::new(PluginMetrics::default());
        let w = WorkMetrics::default();
        let mut r = Registry::default();
        p.register(&mut r);
        w.register(&mut r, "site_jobs", "Jobs", "VMs by state");
        p.call("memory", "create", "ok", Duration::from_millis(3));
        p.call("hostile", "list-vms", "deadline", Duration::from_secs(2));
        w.ended("request", "succeeded", Duration::from_secs(7));
        w.set_now(
            [(("request".into(), "running".into()), 2)],
            [("running".into(), 3)],
        );
        let text = render(&r);
        for line in [
            "gve_plugin_calls_total{plugin=\"hostile\",op=\"list-vms\",outcome=\"deadline\"} 1",
            "gve_plugin_call_duration_seconds_count{plugin=\"memory\",op=\"create\"} 1",
            "gve_site_jobs_ended_total{kind=\"request\",state=\"succeeded\"} 1",
            "gve_site_jobs_duration_seconds_bucket{le=\"10.0\",kind=\"request\",state=\"succeeded\"} 1",
            "gve_site_jobs_active{kind=\"request\",state=\"running\"} 2",
            "gve_site_vms{state=\"running\"} 3",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        w.set_now([], [("stopped".into(), 1)]);
        let text = render(&r);
        assert!(!text.contains("gve_site_vms{state=\"running\"}"), "{text}");
        assert!(!text.contains("gve_site_jobs_active{"), "{text}");
    }
}
