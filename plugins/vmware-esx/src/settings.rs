//! The operator's configuration values for this plugin.

use std::time::Duration;

use gve_sdk::config::{get, parse_or};
use gve_sdk::Result;

/// Configuration read once per session.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Longest an operation waits for its vSphere task (`task-timeout-ms`, 25000):
    /// keep it below the agent's call budget.
    pub task_timeout: Duration,
    /// Budget of one SOAP request (`request-timeout-ms`, 20000).
    pub request_timeout: Duration,
    /// How long a graceful shutdown may take before the VM is powered off
    /// (`shutdown-timeout-ms`, 20000; at most `task-timeout-ms`).
    pub shutdown_timeout: Duration,
    /// Allow `http://` endpoints (`plain-http`, false): the password then travels in clear.
    pub plain_http: bool,
    /// Datastore new VMs are placed on (`datastore`, default: the first accessible one).
    pub datastore: Option<String>,
    /// Resource pool id new VMs go to (`resource-pool`, default: the first host's).
    pub resource_pool: Option<String>,
    /// Guest id of VMs whose profile names no OS (`guest-id`, `otherLinux64Guest`).
    pub guest_id: String,
    /// Guest user for guest operations (`guest-username`).
    pub guest_username: Option<String>,
    /// Guest password for guest operations (`guest-password`); never logged.
    pub guest_password: Option<String>,
}

impl Settings {
    /// Reads the values; one that does not parse is `invalid-argument` naming it.
    pub fn read() -> Result<Settings> {
        let ms = |key: &str, default: u64| -> Result<Duration> {
            Ok(Duration::from_millis(parse_or(key, default)?))
        };
        let task_timeout = ms("task-timeout-ms", 25_000)?;
        Ok(Settings {
            task_timeout,
            request_timeout: ms("request-timeout-ms", 20_000)?,
            shutdown_timeout: ms("shutdown-timeout-ms", 20_000)?.min(task_timeout),
            plain_http: parse_or("plain-http", false)?,
            datastore: get("datastore").filter(|s| !s.is_empty()),
            resource_pool: get("resource-pool").filter(|s| !s.is_empty()),
            guest_id: get("guest-id").unwrap_or_else(|| "otherLinux64Guest".into()),
            guest_username: get("guest-username"),
            guest_password: get("guest-password"),
        })
    }
}
