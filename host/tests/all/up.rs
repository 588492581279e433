//! `gve up` as a user runs it: a fresh data directory, a private libvirtd, the tiny
//! guest as template; then a VM requested, used and released through the site it
//! printed, and a clean stop on SIGTERM that ends everything it started.

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::{Job, JobState, SiteVm};
use hyper::Method;
use serde_json::json;

/// A running `gve up` (stdout and stderr in files under `dir`).
struct Up {
    child: tokio::process::Child,
    url: String,
    token: String,
    fingerprint: String,
    agent_url: String,
    err: std::path::PathBuf,
}

impl Up {
    /// A client of the site, pinning its certificate.
    fn client(&self, token: Option<String>) -> Client {
        Client::with_tls(
            &self.url,
            token,
            &gve::api::tls::ClientTls {
                fingerprint: Some(self.fingerprint.clone()),
                ..Default::default()
            },
        )
        .unwrap()
    }
}

/// Starts `gve up` on `dir/data` with a private libvirtd; returns once it printed
/// its site URL and admin token.
async fn start_up(dir: &std::path::Path, run: usize) -> Up {
    let out_path = dir.join(format!("up-{run}.out"));
    let err_path = dir.join(format!("up-{run}.err"));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .arg("up")
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--private-libvirtd")
        .arg("--template")
        .arg(gve_harness::guest())
        .args(["--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .arg("--plugins")
        .arg(crate::support::bundles())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Longer than gve up's own wait for its agent (60 s), after which it says
    // on stderr why the agent is not up and goes on: a failure here shows it.
    let started = Instant::now();
    let end = started + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("gve up: site "))
            .map(|r| r.split_whitespace().next().unwrap().to_string());
        let token = text
            .lines()
            .find_map(|l| l.strip_prefix("admin token: "))
            .map(str::to_string);
        let fingerprint = text
            .lines()
            .find_map(|l| l.strip_prefix("site fingerprint: "))
            .map(str::to_string);
        let agent_url = text
            .lines()
            .find_map(|l| l.split("(agent ").nth(1))
            .and_then(|r| r.split(',').next())
            .map(str::to_string);
        if let (Some(url), Some(token), Some(fingerprint), Some(agent_url)) =
            (url, token, fingerprint, agent_url)
        {
            return Up {
                child,
                url,
                token,
                fingerprint,
                agent_url,
                err: err_path,
            };
        }
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(
            Instant::now() < end,
            "gve up (run {run}) did not start in {:?}:\n{text}\n{err}",
            started.elapsed()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "gve up exited:\n{text}\n{err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pid of the private libvirtd under `dir/data`.
fn libvirtd_pid(dir: &std::path::Path) -> u32 {
    std::fs::read_to_string(dir.join("data/libvirt/run/libvirtd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gve_up_runs_a_site_and_a_kvm_agent_that_serve_real_vms() {
    let dir = tempfile::tempdir_in(gve_harness::target_dir()).unwrap();
    let up = start_up(dir.path(), 0).await;
    let c = up.client(Some(up.token.clone()));
    assert!(up.url.starts_with("https://"), "{}", up.url);
    // Probing libvirt (a daemon, a pool, a domain that may not exist yet) prints
    // none of libvirt's own error lines: they go to gve's log at debug.
    let err = std::fs::read_to_string(&up.err).unwrap();
    assert!(
        !err.lines().any(|l| l.starts_with("libvirt:")),
        "libvirt's errors reached stderr:\n{err}"
    );
    // TLS holds: plain HTTP, a wrong pin, and (at the agent) a client without the
    // site's certificate all fail; the agent answers the site's certificate.
    let plain = Client::new(
        &up.url.replacen("https://", "http://", 1),
        Some(up.token.clone()),
    )
    .unwrap();
    assert!(plain.get::<serde_json::Value>("/v1/me").await.is_err());
    let wrong = Client::with_tls(
        &up.url,
        Some(up.token.clone()),
        &gve::api::tls::ClientTls {
            fingerprint: Some("00".repeat(32)),
            ..Default::default()
        },
    )
    .unwrap();
    let e = wrong.get::<serde_json::Value>("/v1/me").await.unwrap_err();
    assert!(e.message.contains("fingerprint"), "{e}");
    let tls = dir.path().join("data/tls");
    let agent_fp = gve::api::tls::file_fingerprint(&tls.join("agent.pem")).unwrap();
    let secrets = std::fs::read_to_string(dir.path().join("data/secrets.toml")).unwrap();
    let agent_token = secrets
        .lines()
        .find_map(|l| l.strip_prefix("agent-token = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let anon = Client::with_tls(
        &up.agent_url,
        Some(agent_token.clone()),
        &gve::api::tls::ClientTls {
            fingerprint: Some(agent_fp.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        anon.get::<serde_json::Value>("/v1/health").await.is_err(),
        "the agent admitted a client without a certificate"
    );
    let as_site = Client::with_tls(
        &up.agent_url,
        Some(agent_token),
        &gve::api::tls::ClientTls {
            fingerprint: Some(agent_fp),
            cert: Some(tls.join("site.pem")),
            key: Some(tls.join("site.key")),
            ..Default::default()
        },
    )
    .unwrap();
    let _: serde_json::Value = as_site.get("/v1/health").await.unwrap();
    let Up { mut child, .. } = up;
    // Secrets are the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for (f, mode) in [
        ("data", 0o700),
        ("data/secrets.toml", 0o600),
        ("data/agent.toml", 0o600),
    ] {
        let m = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{f} is {m:o}");
    }
    let templates: Vec<String> = c.get("/v1/templates").await.unwrap();
    assert_eq!(templates, ["tiny"]);
    let j: Job = c
        .call(
            Method::POST,
            "/v1/vms",
            Some(&json!({ "template": "tiny", "main-memory-mib": 192 })),
        )
        .await
        .unwrap();
    let j: Job = c
        .get(&format!("/v1/jobs/{}?wait-ms=60000", j.id))
        .await
        .unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    assert_eq!((vm.state.as_str(), vm.agent.as_str()), ("running", "local"));
    // The guest really runs: its agent answers a command (once it has booted).
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let j: Job = c
            .call(
                Method::POST,
                &format!("/v1/vms/{}/exec", vm.id),
                Some(&json!({ "argv": ["cat", "/proc/uptime"] })),
            )
            .await
            .unwrap();
        let j: Job = c
            .get(&format!("/v1/jobs/{}?wait-ms=30000", j.id))
            .await
            .unwrap();
        if j.state == JobState::Succeeded {
            break;
        }
        assert!(Instant::now() < end, "the guest never answered: {j:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let j: Job = c
        .call(
            Method::POST,
            &format!("/v1/vms/{}/release", vm.id),
            Some(&json!({})),
        )
        .await
        .unwrap();
    let j: Job = c
        .get(&format!("/v1/jobs/{}?wait-ms=60000", j.id))
        .await
        .unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");

    // SIGTERM: gve up stops the site, the agent, the private libvirtd and its QEMU.
    let pid = child.id().unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let run = dir.path().join("data/libvirt/run/libvirtd.pid");
    let lv_pid = std::fs::read_to_string(&run).unwrap_or_default();
    if let Ok(p) = lv_pid.trim().parse::<u32>() {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "libvirtd {p} still runs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gve_up_killed_with_9_leaves_nothing_the_next_one_trips_over() {
    let dir = tempfile::tempdir_in(gve_harness::target_dir()).unwrap();
    let mut first = start_up(dir.path(), 0).await;
    let lv = libvirtd_pid(dir.path());
    first.child.kill().await.unwrap(); // SIGKILL: nothing of gve up runs its drop
    assert!(
        runs(lv),
        "the private libvirtd should outlive a kill -9 of gve up"
    );

    // The next gve up adopts it, says so, and serves.
    let mut second = start_up(dir.path(), 1).await;
    let err = std::fs::read_to_string(&second.err).unwrap();
    assert!(
        err.contains(&format!("adopted the private libvirtd (pid {lv})")),
        "{err}"
    );
    let c = second.client(Some(second.token.clone()));
    let templates: Vec<String> = c.get("/v1/templates").await.unwrap();
    assert_eq!(templates, ["tiny"]);

    // Stopping it ends the adopted libvirtd too.
    let pid = second.child.id().unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(30), second.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let end = Instant::now() + Duration::from_secs(10);
    while runs(lv) {
        assert!(Instant::now() < end, "adopted libvirtd {lv} still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A libvirtd that is gone leaves a stale pid file and socket: a fresh one starts.
    let mut third = start_up(dir.path(), 2).await;
    assert_ne!(libvirtd_pid(dir.path()), lv);
    third.child.kill().await.unwrap();
    // Leave nothing running: end the orphan this kill made, by its pid.
    let orphan = libvirtd_pid(dir.path());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &orphan.to_string()])
        .status();
}

/// A libvirtd that accepts a connection and never answers (hung, or not
/// libvirt at all) does not hold `gve up` for ever: it ends with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gve_up_on_a_libvirtd_that_never_answers_ends_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    // Accepts and holds every connection, answering nothing.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
            .arg("up")
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--libvirt")
            .arg(format!("qemu:///system?socket={}", sock.display()))
            .args(["--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("gve up still waiting on a libvirtd that never answers")
    .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no answer within 10 s"), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    silent.abort();
}
