//! An agent in the calling process for tests and benches: one driver plugin on one
//! endpoint, listening on 127.0.0.1, its database in a temporary directory.

use std::collections::BTreeMap;

use gve::agent::config::DriverConfig;
use gve::agent::{Agent, AgentConfig};
use gve::api::client::Client;
use gve::plugin::PluginSpec;

/// A `[driver]` of `plugin` on `endpoint`: no credentials, reconcile every second.
pub fn driver(plugin: &str, endpoint: &str) -> DriverConfig {
    DriverConfig {
        plugin: plugin.into(),
        endpoint: endpoint.into(),
        username: None,
        password: None,
        token: None,
        password_file: None,
        token_file: None,
        reconcile_period_ms: 1000,
        reservation_seconds: 60,
        guest_plugin: None,
        migration_uri: None,
    }
}

/// Starts an agent whose driver is `plugin` (from `spec`) on `endpoint`,
/// reconciling only when asked (`POST /v1/reconcile`) unless `tune` says
/// otherwise; returns it, a client holding its admin `token`, and its directory
/// (dropped last).
pub async fn start(
    plugin: &str,
    spec: PluginSpec,
    endpoint: &str,
    token: &str,
    tune: impl FnOnce(&mut AgentConfig),
) -> (Agent, Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory for the agent");
    let (agent, client) = start_in(dir.path(), plugin, spec, endpoint, token, tune).await;
    (agent, client, dir)
}

/// [`start`] with its database in `dir`: an agent started again on the same
/// directory finds what the last one left there.
pub async fn start_in(
    dir: &std::path::Path,
    plugin: &str,
    spec: PluginSpec,
    endpoint: &str,
    token: &str,
    tune: impl FnOnce(&mut AgentConfig),
) -> (Agent, Client) {
    let mut config = AgentConfig {
        listen: "127.0.0.1:0".parse().expect("a loopback address"),
        data_dir: dir.to_path_buf(),
        admin_token: token.into(),
        plugins: BTreeMap::from([(plugin.to_string(), spec)]),
        driver: Some(DriverConfig {
            reconcile_period_ms: 600_000,
            ..driver(plugin, endpoint)
        }),
        bundles_dir: None,
        ..Default::default()
    };
    tune(&mut config);
    let agent = Agent::start(config)
        .await
        .unwrap_or_else(|e| panic!("agent on {endpoint}: {e}"));
    let client = Client::new(&format!("http://{}", agent.addr), Some(token.into()))
        .expect("a client of the agent");
    (agent, client)
}

/// Sets the reconcile period of the agent's driver.
pub fn reconcile_every(ms: u64) -> impl FnOnce(&mut AgentConfig) {
    move |c| {
        if let Some(d) = c.driver.as_mut() {
            d.reconcile_period_ms = ms;
        }
    }
}
