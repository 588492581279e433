//! Operator conventions: `gve site init` and `gve agent init` write configs that
//! run as written (a site and a memory-driver agent as processes, mutual TLS
//! between them, a VM requested through the CLI), secrets 0600; the systemd units
//! in `dist/systemd/` pass `systemd-analyze verify` and keep a low exposure score.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::api::tls::ClientTls;

use crate::support::{bundles, spawn_service};

/// `gve ARGS` with `env`; (exit code, stdout, stderr).
fn gve(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = crate::support::gve_command(env, args)
        .as_std_mut()
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value after `prefix` on a line of `text`.
fn line_value(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"))
        .trim()
        .to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_from_init_run_as_written_with_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let site_cfg = dir.path().join("etc/site.toml");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, out, err) = gve(
        &[],
        &[
            "site",
            "init",
            "--config",
            &s(&site_cfg),
            "--listen",
            "127.0.0.1:0",
            "--site-id",
            "lab",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let admin = line_value(&out, "admin token: ");
    let site_fp = line_value(&out, "site fingerprint: ");
    assert!(admin.starts_with("gve_") && admin.len() > 40, "{admin}");
    assert_eq!(mode(&site_cfg), 0o600);
    assert_eq!(mode(&dir.path().join("etc/tls/site.key")), 0o600);
    assert_eq!(mode(&dir.path().join("etc")), 0o700);
    // Again without --force: refused, nothing changed.
    let before = std::fs::read_to_string(&site_cfg).unwrap();
    let (code, _, err) = gve(&[], &["site", "init", "--config", &s(&site_cfg)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&site_cfg).unwrap(), before);
    let (code, _, err) = gve(
        &[],
        &[
            "site",
            "init",
            "--config",
            &s(&dir.path().join("x.toml")),
            "--site-id",
            "no/slash",
        ],
    );
    assert_eq!(code, 2, "{err}");

    // A relative --config with a directory part, listening on every address: the
    // certificate paths resolve, and the published URL is a name others can use.
    let out = crate::support::gve_command(
        &[],
        &[
            "site",
            "init",
            "--config",
            "conf/other.toml",
            "--listen",
            "0.0.0.0:7080",
            "--name",
            "vms.example.org",
        ],
    )
    .current_dir(dir.path())
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("--url https://vms.example.org:7080"),
        "{stdout}"
    );
    let other = gve::site::SiteConfig::read(&dir.path().join("conf/other.toml")).unwrap();
    assert!(
        other.tls.as_ref().unwrap().cert.is_file(),
        "{:?}",
        other.tls
    );
    assert_eq!(
        other.public_url.as_deref(),
        Some("https://vms.example.org:7080")
    );

    let agent_cfg = dir.path().join("agent/agent.toml");
    let plugins = bundles().to_str().unwrap().to_string();
    let (code, out, err) = gve(
        &[],
        &[
            "agent",
            "init",
            "--config",
            &s(&agent_cfg),
            "--listen",
            "127.0.0.1:0",
            "--driver",
            "memory",
            "--endpoint",
            "memory:init-test",
            "--plugins",
            &plugins,
            "--site-fingerprint",
            &site_fp,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let secret = line_value(&out, "agent secret: ");
    let agent_fp = line_value(&out, "agent fingerprint: ");
    assert_eq!(mode(&agent_cfg), 0o600);
    let (code, _, err) = gve(
        &[],
        &[
            "agent",
            "init",
            "--config",
            &s(&dir.path().join("b.toml")),
            "--driver",
            "vmware-esx",
            "--plugins",
            &plugins,
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--endpoint"), "{err}");
    // Mutual TLS asked for without TLS: refused, not silently dropped.
    let (code, _, err) = gve(
        &[],
        &[
            "agent",
            "init",
            "--config",
            &s(&dir.path().join("c.toml")),
            "--driver",
            "memory",
            "--endpoint",
            "memory:x",
            "--plugins",
            &plugins,
            "--no-tls",
            "--site-fingerprint",
            &site_fp,
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(!dir.path().join("c.toml").exists());

    // Both run as written.
    let log = dir.path().join("services.log");
    let site = spawn_service("site", &site_cfg, &log).await;
    let agent = spawn_service("agent", &agent_cfg, &log).await;
    assert!(site.url.starts_with("https://") && agent.url.starts_with("https://"));
    // Mutual TLS: the agent admits only the site's certificate, even with its secret.
    let stranger = Client::with_tls(
        &agent.url,
        Some(secret.clone()),
        &ClientTls {
            fingerprint: Some(agent_fp.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(stranger.get::<serde_json::Value>("/v1/host").await.is_err());

    let env = [
        ("GVE_URL", site.url.as_str()),
        ("GVE_TOKEN", admin.as_str()),
        ("GVE_FINGERPRINT", site_fp.as_str()),
    ];
    let (code, _, err) = gve(
        &env,
        &[
            "agent",
            "add",
            "local",
            &agent.url,
            "--secret",
            &secret,
            "--agent-fingerprint",
            &agent_fp,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, _) = gve(&env, &["agent", "list", "-o", "json"]);
        if out.contains("\"up\"") {
            break;
        }
        assert!(Instant::now() < end, "agent not up: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out, err) = gve(
        &env,
        &[
            "vm",
            "request",
            "--template",
            "alpine-3",
            "--memory-mib",
            "64",
            "--running",
            "--wait",
            "-o",
            "json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["result"]["state"], "running", "{job}");
}

#[test]
fn the_systemd_units_verify_and_are_sandboxed() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd");
    let dir = tempfile::tempdir().unwrap();
    for (unit, most) in [("gve-site.service", 2.0), ("gve-agent.service", 2.5)] {
        // Verified with ExecStart pointing at this build (verify checks it exists).
        let text = std::fs::read_to_string(units.join(unit))
            .unwrap()
            .replace("/usr/local/bin/gve", env!("CARGO_BIN_EXE_gve"));
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (package systemd) runs");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{unit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| r.split(": ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in:\n{text}"));
        assert!(score <= most, "{unit}: exposure {score} > {most}:\n{text}");
    }
}
