//! What the bench binaries share (each includes this file as a module).

#![allow(dead_code)]

use std::time::Duration;

/// Median, first and third quartile.
pub fn quartiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() / 4], v[3 * v.len() / 4])
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Today's date (`date -I`), for the results' headers.
pub fn today() -> String {
    std::process::Command::new("date")
        .arg("-I")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// CPU seconds (user + system) process `pid` (a number, or `self`) has used.
pub fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// This process's resident memory, MiB.
pub fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident and peak resident memory (MiB) of process `pid` (a number, or `self`).
pub fn rss_of(pid: &str) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// This machine's cores.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

/// An agent on 127.0.0.1 whose driver is `plugin` (from `spec`) on `endpoint`,
/// reconciling only when asked (`POST /v1/reconcile`), and a client holding its
/// admin `token`.
pub async fn agent(
    plugin: &str,
    spec: gve::plugin::PluginSpec,
    endpoint: &str,
    token: &str,
) -> (
    gve::agent::Agent,
    gve::api::client::Client,
    tempfile::TempDir,
) {
    gve_harness::agent::start(plugin, spec, endpoint, token, |_| {}).await
}

/// [`agent`], with its configuration changed by `tune` before it starts.
pub async fn agent_with(
    plugin: &str,
    spec: gve::plugin::PluginSpec,
    endpoint: &str,
    token: &str,
    tune: impl FnOnce(&mut gve::agent::AgentConfig),
) -> (
    gve::agent::Agent,
    gve::api::client::Client,
    tempfile::TempDir,
) {
    gve_harness::agent::start(plugin, spec, endpoint, token, tune).await
}

/// A kvm agent with guest-install on the private libvirtd `lv` (its `gve`
/// pool, 120 s call budgets), holding admin `token`; `tune` changes its
/// configuration before it starts.
pub async fn kvm_guest_agent(
    lv: &gve_harness::Libvirtd,
    token: &str,
    tune: impl FnOnce(&mut gve::agent::AgentConfig),
) -> (
    gve::agent::Agent,
    gve::api::client::Client,
    tempfile::TempDir,
) {
    use gve::plugin::{Grants, Limits, PluginSpec};
    let mut kvm = Grants {
        libvirt: vec![lv.uri.clone()],
        ..Default::default()
    };
    kvm.config.insert("storage-pool".into(), "gve".into());
    let limits = Limits {
        call_timeout_ms: 120_000,
        ..Default::default()
    };
    let kvm = PluginSpec {
        bundle: gve_harness::target_dir().join("plugins/kvm"),
        grants: kvm,
        limits,
    };
    let guest = PluginSpec {
        bundle: gve_harness::target_dir().join("plugins/guest-install"),
        grants: Grants {
            guest_channel: true,
            ..Default::default()
        },
        limits,
    };
    agent_with("kvm", kvm, &lv.uri, token, |config| {
        config.plugins.insert("guest-install".to_string(), guest);
        if let Some(d) = config.driver.as_mut() {
            d.guest_plugin = Some("guest-install".into());
        }
        tune(config);
    })
    .await
}

/// Long-polls site job `id` until it ends, however it ends.
pub async fn job_ended(c: &gve::api::client::Client, id: &str) -> gve::site::model::Job {
    loop {
        let j: gve::site::model::Job = c
            .get(&format!("/v1/jobs/{id}?wait-ms=30000"))
            .await
            .unwrap();
        if j.state.is_terminal() {
            return j;
        }
    }
}

/// Long-polls site job `id` until it ends; panics unless it succeeded.
pub async fn job_succeeded(c: &gve::api::client::Client, id: &str) -> gve::site::model::Job {
    let j = job_ended(c, id).await;
    assert_eq!(j.state, gve::site::model::JobState::Succeeded, "{j:?}");
    j
}

/// A new site user whose quota no bench reaches; its client.
pub async fn unlimited_user(
    admin: &gve::api::client::Client,
    name: &str,
) -> gve::api::client::Client {
    let quota = serde_json::json!({ "logical-cpus": 1u64 << 20, "main-memory-mib": 1u64 << 40, "vms": 1u64 << 20 });
    site_user(admin, name, quota).await
}

/// Submits a site job (`POST path` with `body`) and waits until it succeeded.
pub async fn site_job(
    c: &gve::api::client::Client,
    path: &str,
    body: serde_json::Value,
) -> gve::site::model::Job {
    let j: gve::site::model::Job = c
        .call(hyper::Method::POST, path, Some(&body))
        .await
        .unwrap();
    job_succeeded(c, &j.id).await
}

/// A site in this process on 127.0.0.1 (its database in `dir`), health-checking
/// every `health_ms`, with `agents` (id, address) registered under `agent_token`;
/// its admin's client.
pub async fn site_over(
    dir: &std::path::Path,
    admin_token: &str,
    health_ms: u64,
    agents: &[(&str, std::net::SocketAddr)],
    agent_token: &str,
) -> (gve::site::Site, gve::api::client::Client) {
    let mut config = gve::site::SiteConfig::new(dir.to_path_buf(), admin_token.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_period_ms = health_ms;
    let site = gve::site::Site::start(config).await.unwrap();
    let admin =
        gve::api::client::Client::new(&format!("http://{}", site.addr), Some(admin_token.into()))
            .unwrap();
    for (id, addr) in agents {
        let _: serde_json::Value = admin
            .call(
                hyper::Method::POST,
                "/v1/agents",
                Some(&serde_json::json!({ "id": id, "url": format!("http://{addr}"), "token": agent_token })),
            )
            .await
            .unwrap();
    }
    (site, admin)
}

/// A new site user with `quota`; its client.
pub async fn site_user(
    admin: &gve::api::client::Client,
    name: &str,
    quota: serde_json::Value,
) -> gve::api::client::Client {
    let u: gve::site::model::UserView = admin
        .call(
            hyper::Method::POST,
            "/v1/users",
            Some(&serde_json::json!({ "name": name, "quota": quota })),
        )
        .await
        .unwrap();
    gve::api::client::Client::new(admin.base(), u.token).unwrap()
}

/// "median ms (first–third quartile)" of `v`, in whole ms.
pub fn median_iqr(v: Vec<Duration>) -> String {
    let q = quartiles(v);
    format!("{:.0} ms ({:.0}–{:.0})", ms(q.0), ms(q.1), ms(q.2))
}

/// Writes `md` to bench/results/`name` and prints it.
pub fn publish(name: &str, md: &str) {
    let out = gve_harness::root().join("bench/results").join(name);
    std::fs::write(&out, md).unwrap();
    println!("{md}");
}

/// Runs `virsh -q -c URI ARGS...`, asserts it succeeded, and returns its output trimmed.
pub async fn virsh(uri: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Raw qemu-ga through libvirt on the bench's own connection.
pub struct Raw {
    /// The guest's domain.
    pub dom: virt::domain::Domain,
    /// guest-exec-status calls made by `exec` so far.
    pub calls: std::cell::Cell<u32>,
}

impl Raw {
    /// One qemu-ga command; its `return`.
    pub fn call(&self, execute: &str, arguments: serde_json::Value) -> serde_json::Value {
        let cmd = serde_json::json!({ "execute": execute, "arguments": arguments }).to_string();
        let reply = self.dom.qemu_agent_command(&cmd, 60, 0).unwrap();
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        v["return"].clone()
    }

    /// guest-exec, then guest-exec-status with the plugin's backoff (1 ms doubling to 50).
    pub fn exec(&self, path: &str, args: &[&str]) -> serde_json::Value {
        let pid = self.call(
            "guest-exec",
            serde_json::json!({ "path": path, "arg": args, "capture-output": true }),
        )["pid"]
            .clone();
        let mut pause = Duration::from_millis(1);
        loop {
            let s = self.call("guest-exec-status", serde_json::json!({ "pid": pid }));
            self.calls.set(self.calls.get() + 1);
            if s["exited"] == true {
                return s;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}
