//! `gve up` as a user runs it: a fresh data directory, a private libvirtd, the tiny
//! guest as template; then a VM requested, used and released through the site it
//! printed, and a clean stop on SIGTERM that ends everything it started.

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::{Job, JobState, SiteVm};
use hyper::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gve_up_runs_a_site_and_a_kvm_agent_that_serve_real_vms() {
    let guest = gve_harness::guest();
    let dir = tempfile::tempdir_in(gve_harness::target_dir()).unwrap();
    let out_path = dir.path().join("up.out");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .arg("up")
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--private-libvirtd")
        .arg("--template")
        .arg(&guest)
        .args(["--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .arg("--plugins")
        .arg(crate::support::bundles())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(dir.path().join("up.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let (url, token) = loop {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("gve up: site "))
            .map(|r| r.split_whitespace().next().unwrap().to_string());
        let token = text
            .lines()
            .find_map(|l| l.strip_prefix("admin token: "))
            .map(str::to_string);
        if let (Some(u), Some(t)) = (url, token) {
            break (u, t);
        }
        let err = std::fs::read_to_string(dir.path().join("up.err")).unwrap_or_default();
        assert!(Instant::now() < end, "gve up did not start:\n{text}\n{err}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "gve up exited:\n{text}\n{err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let c = Client::new(&url, Some(token)).unwrap();
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
