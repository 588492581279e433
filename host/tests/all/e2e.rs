//! End to end on real QEMU guests, through the `gve` CLI only: a grid user requests a
//! VM by profile and waits, runs a command in it, copies a file in and out, suspends
//! and resumes it, migrates it live between the site's two agents (each with its own
//! libvirtd), and releases it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gve::agent::config::DriverConfig;
use gve::agent::{Agent, AgentConfig};
use gve::site::model::UserView;
use gve::site::{Site, SiteConfig};
use gve_harness::Libvirtd;
use hyper::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::agent::TOKEN as AGENT_TOKEN;
use crate::kvm::kvm_spec;
use crate::site::ADMIN;
use crate::support::bundle;

pub async fn kvm_agent(lv: &Libvirtd, other: &Libvirtd, dir: &std::path::Path) -> Agent {
    let mut kvm = kvm_spec(lv);
    kvm.grants.libvirt.push(other.migration_uri());
    // Both daemons see the same files (one machine).
    kvm.grants
        .config
        .insert("shared-storage".into(), "true".into());
    let mut gi = gve::plugin::PluginSpec {
        bundle: bundle("guest-install"),
        grants: Default::default(),
        limits: gve::plugin::Limits {
            call_timeout_ms: 120_000,
            ..Default::default()
        },
    };
    gi.grants.guest_channel = true;
    Agent::start(AgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        admin_token: AGENT_TOKEN.into(),
        plugins: BTreeMap::from([("kvm".to_string(), kvm), ("guest-install".to_string(), gi)]),
        driver: Some(DriverConfig {
            guest_plugin: Some("guest-install".into()),
            migration_uri: Some(lv.migration_uri()),
            ..gve_harness::agent::driver("kvm", &lv.uri)
        }),
        bundles_dir: None,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Runs `gve ARGS` as the user; returns (exit code, stdout, stderr).
async fn gve(url: &str, token: &str, args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args(args)
        .env("GVE_URL", url)
        .env("GVE_TOKEN", token)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn gve_json(url: &str, token: &str, args: &[&str]) -> Value {
    let (code, out, err) = gve(url, token, args).await;
    assert_eq!(code, 0, "gve {args:?}: {err}");
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("gve {args:?}: {e}: {}", String::from_utf8_lossy(&out)))
}

/// A site in `dir` with `agents` added by the admin through the CLI, and a user
/// `grid`: (site, its URL, an admin client, the user's token).
async fn site_with(
    dir: &std::path::Path,
    agents: &[(&str, &Agent)],
) -> (Site, String, gve::api::client::Client, String) {
    let mut config = SiteConfig::new(dir.join("site"), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_period_ms = 500;
    let site = Site::start(config).await.unwrap();
    let url = format!("http://{}", site.addr);
    let admin = gve::api::client::Client::new(&url, Some(ADMIN.into())).unwrap();
    for (id, agent) in agents {
        let addr = format!("http://{}", agent.addr);
        let (code, _, err) = gve(
            &url,
            ADMIN,
            &["agent", "add", id, &addr, "--secret", AGENT_TOKEN],
        )
        .await;
        assert_eq!(code, 0, "{err}");
    }
    let u: UserView = admin
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "grid" })))
        .await
        .unwrap();
    (site, url, admin, u.token.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_gets_uses_moves_and_releases_a_real_vm_through_the_cli() {
    let (la, lb) = (Libvirtd::start(), Libvirtd::start());
    let dir = tempfile::tempdir().unwrap();
    let a = kvm_agent(&la, &lb, &dir.path().join("a")).await;
    let b = kvm_agent(&lb, &la, &dir.path().join("b")).await;
    let (site, url, admin, token) = site_with(dir.path(), &[("kvm-a", &a), ("kvm-b", &b)]).await;
    let t = token.as_str();

    // Request by profile and wait: a running VM.
    let started = Instant::now();
    let job = gve_json(
        &url,
        t,
        &[
            "vm",
            "request",
            "--template",
            "tiny",
            "--memory-mib",
            "192",
            "--wait",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let vm = job["result"]["id"].as_str().unwrap().to_string();
    let first_agent = job["result"]["agent"].as_str().unwrap().to_string();
    eprintln!(
        "e2e: {vm} running on {first_agent} after {:?}",
        started.elapsed()
    );

    // `request --wait` ends once the VM is usable: exec works at once.
    assert_eq!(job["result"]["ready"], true, "{job}");
    let (code, out, err) = gve(&url, t, &["vm", "exec", &vm, "--", "uname", "-a"]).await;
    assert_eq!(code, 0, "exec right after request --wait: {err}");
    let uname = String::from_utf8(out).unwrap();
    assert!(uname.starts_with("Linux gve-guest "), "{uname}");
    let (code, _, _) = gve(&url, t, &["vm", "exec", &vm, "--", "sh", "-c", "exit 7"]).await;
    assert_eq!(code, 7, "the command's exit code is the CLI's");

    // Copy a file in (6 MiB of known length: the agent stages a disk for it) and
    // back out.
    let data: Vec<u8> = (0..(6u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = dir.path().join("in.bin");
    std::fs::write(&local, &data).unwrap();
    let (code, _, err) = gve(
        &url,
        t,
        &[
            "vm",
            "copy-in",
            &vm,
            local.to_str().unwrap(),
            "/tmp/gve/in.bin",
            "--parents",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let mut staged = 0.0;
    for agent in [&a, &b] {
        let (_, _, text) =
            crate::metrics::scrape(&format!("http://{}", agent.addr), Some(AGENT_TOKEN)).await;
        let series = r#"gve_plugin_calls_total{plugin="kvm",op="bulk-stage",outcome="ok"}"#;
        staged += crate::metrics::sample(&text, series);
    }
    assert_eq!(
        staged, 1.0,
        "the site's copy did not go through a staged disk"
    );
    let back = dir.path().join("out.bin");
    let (code, _, err) = gve(
        &url,
        t,
        &[
            "vm",
            "copy-out",
            &vm,
            "/tmp/gve/in.bin",
            back.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&back).unwrap(), data);

    // Suspend and resume.
    for (action, state) in [("suspend", "suspended"), ("resume", "running")] {
        let (code, _, err) = gve(&url, t, &["vm", action, &vm, "--wait"]).await;
        assert_eq!(code, 0, "{action}: {err}");
        let shown = gve_json(&url, t, &["vm", "show", &vm, "-o", "json"]).await;
        assert_eq!(shown["state"], state, "{shown}");
    }

    // Live migration to the other agent: the guest keeps running (the file copied
    // into its tmpfs is still there) and the site's record follows it.
    let other = if first_agent == "kvm-a" {
        "kvm-b"
    } else {
        "kvm-a"
    };
    let t0 = Instant::now();
    let (code, _, err) = gve(&url, t, &["vm", "migrate", &vm, "--to", other, "--wait"]).await;
    assert_eq!(code, 0, "migrate: {err}");
    eprintln!("e2e: migrated to {other} in {:?}", t0.elapsed());
    let shown = gve_json(&url, t, &["vm", "show", &vm, "-o", "json"]).await;
    assert_eq!(
        (shown["agent"].as_str(), shown["state"].as_str()),
        (Some(other), Some("running")),
        "{shown}"
    );
    let (code, out, err) = gve(
        &url,
        t,
        &["vm", "exec", &vm, "--", "sha256sum", "/tmp/gve/in.bin"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let sum = String::from_utf8(out).unwrap();
    assert!(
        sum.starts_with(&hex::encode(Sha256::digest(&data))),
        "{sum}"
    );
    // Both agents agree: the source forgot it, the destination has it.
    let (src, dst) = if other == "kvm-b" { (&a, &b) } else { (&b, &a) };
    let vm_id = shown["agent-vm"].as_str().unwrap();
    let c = |x: &Agent| {
        gve::api::client::Client::new(&format!("http://{}", x.addr), Some(AGENT_TOKEN.into()))
            .unwrap()
    };
    assert_eq!(
        c(src)
            .get::<Value>(&format!("/v1/vms/{vm_id}"))
            .await
            .unwrap_err()
            .status,
        404
    );
    assert_eq!(
        c(dst)
            .get::<Value>(&format!("/v1/vms/{vm_id}"))
            .await
            .unwrap()["vm"]["state"],
        "running"
    );

    // What this tenant leaves on the VM's disk...
    let secret = "alice-secret-4242";
    let (code, _, err) = gve(
        &url,
        t,
        &[
            "vm",
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            &format!("printf {secret} > /dev/vda && sync"),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = gve(
        &url,
        t,
        &["vm", "exec", &vm, "--", "head", "-c", "17", "/dev/vda"],
    )
    .await;
    assert_eq!(
        (code, String::from_utf8_lossy(&out).as_ref()),
        (0, secret),
        "{err}"
    );

    // Release: destroyed, a fresh VM from the template in the pool; the user holds
    // nothing.
    let rel = gve_json(&url, t, &["vm", "release", &vm, "--wait", "-o", "json"]).await;
    assert_eq!(rel["state"], "succeeded", "{rel}");
    let pooled = rel["result"]["pooled"].as_str().unwrap().to_string();
    let mine = gve_json(&url, t, &["vm", "list", "-o", "json"]).await;
    assert_eq!(mine, json!([]));
    let me = gve_json(&url, t, &["user", "me", "-o", "json"]).await;
    assert_eq!(me["usage"]["vms"], 0, "{me}");

    // ...does not reach the next tenant, who is given the pooled VM.
    let u: UserView = admin
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "bob" })))
        .await
        .unwrap();
    let bob = u.token.unwrap();
    let job = gve_json(
        &url,
        &bob,
        &[
            "vm",
            "request",
            "--template",
            "tiny",
            "--memory-mib",
            "192",
            "--wait",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let bobs = job["result"]["id"].as_str().unwrap().to_string();
    if bobs != pooled {
        let all: Value = admin.get("/v1/vms?all=true").await.unwrap();
        let agents: Value = admin.get("/v1/agents").await.unwrap();
        eprintln!("e2e: the site's VMs {all:#}\nand agents {agents:#}");
    }
    assert_eq!(bobs, pooled, "bob was not given the pooled VM: {job}");
    let end = Instant::now() + Duration::from_secs(60);
    let head = loop {
        let (code, out, err) = gve(
            &url,
            &bob,
            &["vm", "exec", &bobs, "--", "head", "-c", "17", "/dev/vda"],
        )
        .await;
        if code == 0 {
            break out;
        }
        assert!(Instant::now() < end, "exec never worked: {code} {err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        head,
        vec![0u8; 17],
        "bob's disk is not the template's: {}",
        String::from_utf8_lossy(&head)
    );
    let (code, _, err) = gve(&url, &bob, &["vm", "release", &bobs, "--wait"]).await;
    assert_eq!(code, 0, "{err}");
    site.stop().await;
    a.stop().await;
    b.stop().await;
}

/// One site, two hypervisors: a kvm agent (real QEMU guest) and a vmware-esx agent
/// (the vSphere simulator). A user gets a VM on each by profile, runs a command in
/// both, and releases both, with the same CLI commands.
/// Requests a VM of `template` (192 MiB) and waits: it runs, on `agent`; its id.
async fn request_running(url: &str, t: &str, template: &str, agent: &str) -> String {
    let job = gve_json(
        url,
        t,
        &[
            "vm",
            "request",
            "--template",
            template,
            "--memory-mib",
            "192",
            "--wait",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["agent"], agent, "{job}");
    let vm = job["result"]["id"].as_str().unwrap().to_string();
    let shown = gve_json(url, t, &["vm", "show", &vm, "-o", "json"]).await;
    assert_eq!(shown["state"], "running", "{shown}");
    vm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_endpoint_serves_kvm_and_vmware_alike() {
    let lv = Libvirtd::start();
    let sim = gve_harness::VsphereSim::vcenter();
    let dir = tempfile::tempdir().unwrap();
    let kvm = kvm_agent(&lv, &lv, &dir.path().join("kvm")).await;
    let esx = Agent::start(crate::vmware::esx_config(
        &sim,
        &dir.path().join("esx"),
        &sim.tls_pin(),
        gve_harness::vsphere::PASSWORD,
    ))
    .await
    .unwrap();
    let (_site, url, _admin, token) =
        site_with(dir.path(), &[("kvm-1", &kvm), ("esx-1", &esx)]).await;
    let t = token.as_str();

    let mut vms = Vec::new();
    for (template, agent) in [("tiny", "kvm-1"), (gve_harness::vsphere::TEMPLATE, "esx-1")] {
        vms.push(request_running(&url, t, template, agent).await);
    }
    for vm in &vms {
        // The same command on both, once the guest answers.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, out, err) = gve(
                &url,
                t,
                &["vm", "exec", vm, "--", "sh", "-c", "echo hello; exit 5"],
            )
            .await;
            if code == 5 {
                assert_eq!(String::from_utf8_lossy(&out), "hello\n");
                break;
            }
            assert!(
                Instant::now() < end,
                "exec in {vm} never worked: {code} {err}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for vm in &vms {
        let rel = gve_json(&url, t, &["vm", "release", vm, "--wait", "-o", "json"]).await;
        assert_eq!(rel["state"], "succeeded", "{rel}");
    }
    let mine = gve_json(&url, t, &["vm", "list", "-o", "json"]).await;
    assert_eq!(mine, json!([]));
    let me = gve_json(&url, t, &["user", "me", "-o", "json"]).await;
    assert_eq!(me["usage"]["vms"], 0, "{me}");
}

/// An agent serving the nested Xen through the xen driver.
async fn xen_agent(xen: &gve_harness::NestedXen, dir: &std::path::Path) -> Agent {
    Agent::start(AgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        admin_token: AGENT_TOKEN.into(),
        plugins: BTreeMap::from([("xen".to_string(), crate::xen::xen_spec(xen))]),
        driver: Some(gve_harness::agent::driver("xen", &xen.uri)),
        bundles_dir: None,
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_endpoint_serves_kvm_and_xen_alike() {
    let xen = gve_harness::xen::shared();
    let lv = Libvirtd::start();
    let dir = tempfile::tempdir().unwrap();
    let kvm = kvm_agent(&lv, &lv, &dir.path().join("kvm")).await;
    let xa = xen_agent(&xen, &dir.path().join("xen")).await;
    let (_site, url, _admin, token) =
        site_with(dir.path(), &[("kvm-1", &kvm), ("xen-1", &xa)]).await;
    let t = token.as_str();

    let mut vms = Vec::new();
    for (template, agent) in [("tiny", "kvm-1"), (gve_harness::xen::TEMPLATE, "xen-1")] {
        vms.push(request_running(&url, t, template, agent).await);
    }
    // Xen runs the second as a PV domain, under the name the site gave it.
    let xen_name = gve_json(&url, t, &["vm", "show", &vms[1], "-o", "json"]).await["name"]
        .as_str()
        .unwrap()
        .to_string();
    let running = xen.xl_list();
    assert!(running.contains_key(&xen_name), "{xen_name}: {running:?}");
    for vm in &vms {
        for (action, state) in [("suspend", "suspended"), ("resume", "running")] {
            let (code, _, err) = gve(&url, t, &["vm", action, vm, "--wait"]).await;
            assert_eq!(code, 0, "{action}: {err}");
            let shown = gve_json(&url, t, &["vm", "show", vm, "-o", "json"]).await;
            assert_eq!(shown["state"], state, "{shown}");
        }
    }
    // Guest operations: kvm's through guest-install, Xen's refused with the reason.
    let (code, _, err) = gve(&url, t, &["vm", "exec", &vms[1], "--", "true"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("unsupported") || err.contains("guest"),
        "{err}"
    );
    for vm in &vms {
        let rel = gve_json(&url, t, &["vm", "release", vm, "--wait", "-o", "json"]).await;
        assert_eq!(rel["state"], "succeeded", "{rel}");
    }
    let mine = gve_json(&url, t, &["vm", "list", "-o", "json"]).await;
    assert_eq!(mine, json!([]));
    let me = gve_json(&url, t, &["user", "me", "-o", "json"]).await;
    assert_eq!(me["usage"]["vms"], 0, "{me}");
    // Released VMs are destroyed: nothing of them is left in Xen.
    let end = Instant::now() + Duration::from_secs(30);
    while xen.xl_list().contains_key(&xen_name) {
        assert!(Instant::now() < end, "{:?}", xen.xl_list());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
