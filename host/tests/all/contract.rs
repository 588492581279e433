//! Every contract function, called through the plugin host on the example memory
//! driver built from source.

use gve::plugin::bindings::types::{Credentials, ExecRequest, Label, VmProfile, VmState};
use gve::plugin::{ErrorKind, Grants, PluginError};

use crate::support::{host, no_creds, spec};

fn profile(name: &str) -> VmProfile {
    VmProfile {
        name: name.into(),
        logical_cpus: 2,
        main_memory_mib: 512,
        disk_mib: Some(2048),
        template: Some("debian-12".into()),
        image: None,
        os_family: Some("linux".into()),
        os_name: Some("debian".into()),
        os_version: Some("12".into()),
        platform: Some("amd64".into()),
        network: None,
        labels: vec![Label {
            key: "owner".into(),
            value: "alice".into(),
        }],
    }
}

fn kind(e: &PluginError) -> ErrorKind {
    e.kind()
}

/// An operator may raise a plugin's exec margin (a slow server) above what its
/// manifest declares, up to 60 s; a lower one is not used (a bundle that comes to
/// declare more still loads). The summary, which the agent's guest-command
/// ceiling follows, shows the margin in force.
#[tokio::test]
async fn an_operator_raises_the_exec_margin_never_below_the_manifest() {
    let (host, _dir) = host();
    let with = |margin: Option<u64>| {
        let mut sp = spec("memory", Grants::default());
        sp.limits.exec_margin_ms = margin;
        sp
    };
    assert_eq!(host.load(with(None)).await.unwrap().exec_margin_ms, 1_000);
    let raised = host.replace("memory", with(Some(4_000))).await.unwrap();
    assert_eq!(raised.exec_margin_ms, 4_000);
    assert_eq!(raised.limits.exec_margin_ms, Some(4_000));
    let err = host
        .replace("memory", with(Some(60_001)))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("at most 60000"), "{err}");
    // A refused replace leaves the version in force.
    assert_eq!(host.get("memory").unwrap().exec_margin_ms, 4_000);
    // Below the manifest's: loaded, with the manifest's margin in force.
    let low = host.replace("memory", with(Some(999))).await.unwrap();
    assert_eq!(low.exec_margin_ms, 1_000);
}

#[tokio::test]
async fn driver_lifecycle_through_the_host() {
    let (host, _dir) = host();
    let summary = host.load(spec("memory", Grants::default())).await.unwrap();
    assert!(summary.driver && summary.guest);
    assert_eq!(summary.contract, "gve:hypervisor@0.1.3");
    assert!(summary.capabilities.contains(&"live-migrate".to_string()));

    let info = host.driver_info("memory").await.unwrap();
    assert_eq!(
        (info.name.as_str(), info.hypervisor_kind.as_str()),
        ("memory", "memory")
    );

    // A bad endpoint fails at open with the driver's own error kind.
    let err = host
        .open_driver("memory", "vsphere://x", no_creds())
        .await
        .err()
        .unwrap();
    assert_eq!(kind(&err), ErrorKind::InvalidArgument, "{err}");

    let s = host
        .open_driver("memory", "memory:a", no_creds())
        .await
        .unwrap();
    let hi = s.host_info().await.unwrap();
    assert_eq!(hi.hypervisor_kind, "memory");
    assert_eq!(hi.used_instances, 0);

    let templates = s.list_templates().await.unwrap();
    assert!(templates
        .iter()
        .any(|t| t.name == "debian-12" && t.is_template));
    assert!(s.list_vms().await.unwrap().is_empty());

    let vm = s.create(&profile("web-1")).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(vm.resources.logical_cpus, 2);
    assert_eq!(vm.labels[0].value, "alice");
    let dup = s.create(&profile("web-1")).await.unwrap_err();
    assert_eq!(kind(&dup), ErrorKind::AlreadyExists, "{dup}");
    let mut bad = profile("web-x");
    bad.template = Some("no-such-template".into());
    assert_eq!(
        kind(&s.create(&bad).await.unwrap_err()),
        ErrorKind::NotFound
    );

    assert_eq!(s.get_vm(&vm.id).await.unwrap().name, "web-1");
    assert_eq!(s.get_vm("web-1").await.unwrap().id, vm.id);
    assert_eq!(
        kind(&s.get_vm("nope").await.unwrap_err()),
        ErrorKind::NotFound
    );

    let running = s.start(&vm.id).await.unwrap();
    assert_eq!(running.state, VmState::Running);
    assert_eq!(
        kind(&s.start(&vm.id).await.unwrap_err()),
        ErrorKind::InvalidState
    );
    assert_eq!(s.host_info().await.unwrap().used_instances, 1);

    assert_eq!(s.suspend(&vm.id).await.unwrap().state, VmState::Suspended);
    assert_eq!(s.resume(&vm.id).await.unwrap().state, VmState::Running);

    let linked = s.clone_vm("debian-12", "web-2", true).await.unwrap();
    assert_eq!(
        (linked.name.as_str(), linked.state),
        ("web-2", VmState::Stopped)
    );
    let full = s.clone_vm(&vm.id, "web-3", false).await.unwrap();
    assert_eq!(full.resources.main_memory_mib, 512);
    let refused = s.clone_vm(&vm.id, "web-4", true).await.unwrap_err();
    assert_eq!(
        kind(&refused),
        ErrorKind::InvalidState,
        "linked clone of a running VM: {refused}"
    );

    let reply = s
        .guest_agent_command(&vm.id, r#"{"execute":"guest-ping"}"#, 1000)
        .await
        .unwrap();
    assert_eq!(reply.replace(' ', ""), r#"{"return":{}}"#);
    let stopped_reply = s
        .guest_agent_command(&linked.id, r#"{"execute":"guest-ping"}"#, 1000)
        .await
        .unwrap_err();
    assert_eq!(kind(&stopped_reply), ErrorKind::Unavailable);

    let moved = s.migrate(&vm.id, "memory:b", true).await.unwrap();
    assert_eq!(
        (moved.host.as_str(), moved.state),
        ("memory:b", VmState::Running)
    );
    assert_eq!(
        kind(&s.get_vm(&vm.id).await.unwrap_err()),
        ErrorKind::NotFound
    );
    let b = host
        .open_driver("memory", "memory:b", no_creds())
        .await
        .unwrap();
    assert_eq!(b.get_vm("web-1").await.unwrap().state, VmState::Running);
    assert_eq!(
        b.shutdown("web-1", false).await.unwrap().state,
        VmState::Stopped
    );
    assert_eq!(
        kind(&b.shutdown("web-1", true).await.unwrap_err()),
        ErrorKind::InvalidState
    );

    s.destroy(&full.id).await.unwrap();
    s.destroy(&linked.id).await.unwrap();
    assert_eq!(
        kind(&s.destroy(&linked.id).await.unwrap_err()),
        ErrorKind::NotFound
    );
    assert!(s.list_vms().await.unwrap().is_empty());
    assert_eq!(b.list_vms().await.unwrap().len(), 1);

    // A name the host would refuse in the answer never reaches the driver: the
    // driver would keep the VM and every later listing would be refused.
    for bad in ["", "  ", "web\u{1}", "web\n2", &"x".repeat(2000)] {
        let e = s.create(&profile(bad)).await.unwrap_err();
        assert!(
            matches!(e, PluginError::Argument { op: "create", .. }),
            "{bad:?}: {e}"
        );
        assert_eq!(kind(&e), ErrorKind::InvalidArgument);
    }
    let mut labelled = profile("labelled");
    labelled.labels.push(Label {
        key: "k".into(),
        value: "v\u{1b}[2J".into(),
    });
    let e = s.create(&labelled).await.unwrap_err();
    assert!(
        matches!(e, PluginError::Argument { op: "create", .. }),
        "{e}"
    );
    let src = s.create(&profile("src")).await.unwrap();
    let e = s.clone_vm(&src.id, "c\u{7f}", false).await.unwrap_err();
    assert!(
        matches!(e, PluginError::Argument { op: "clone", .. }),
        "{e}"
    );
    assert_eq!(s.list_vms().await.unwrap().len(), 1, "nothing was made");
    s.destroy(&src.id).await.unwrap();
}

#[tokio::test]
async fn credentials_come_from_the_operator_config() {
    let (host, _dir) = host();
    let mut grants = Grants::default();
    grants.config.insert("password".into(), "hunter2".into());
    host.load(spec("memory", grants)).await.unwrap();
    let wrong = Credentials {
        username: Some("u".into()),
        password: Some("nope".into()),
        token: None,
    };
    let err = host
        .open_driver("memory", "memory:a", wrong)
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    let right = Credentials {
        username: Some("u".into()),
        password: Some("hunter2".into()),
        token: None,
    };
    host.open_driver("memory", "memory:a", right).await.unwrap();
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        stdin: vec![],
        timeout_ms: 5_000,
        output_limit: 1 << 20,
    }
}

#[tokio::test]
async fn guest_operations_through_the_host() {
    let (host, _dir) = host();
    host.load(spec("memory", Grants::default())).await.unwrap();
    let d = host
        .open_driver("memory", "memory:g", no_creds())
        .await
        .unwrap();
    let vm = d.create(&profile("g-1")).await.unwrap();
    let g = host
        .open_guest("memory", "memory:g", no_creds())
        .await
        .unwrap();

    // The guest must be running.
    assert_eq!(
        g.exec(&vm.id, &exec(&["true"])).await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );
    d.start(&vm.id).await.unwrap();

    let r = g
        .exec(&vm.id, &exec(&["echo", "hello", "grid"]))
        .await
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (Some(0), &b"hello grid\n"[..])
    );
    let r = g.exec(&vm.id, &exec(&["false"])).await.unwrap();
    assert_eq!(r.exit_code, Some(1));
    let r = g.exec(&vm.id, &exec(&["frobnicate"])).await.unwrap();
    assert_eq!(r.exit_code, Some(127));
    assert!(String::from_utf8_lossy(&r.stderr).contains("frobnicate"));
    let mut cat = exec(&["cat"]);
    cat.stdin = vec![0, 159, 255, 10];
    assert_eq!(
        g.exec(&vm.id, &cat).await.unwrap().stdout,
        vec![0, 159, 255, 10]
    );
    let mut sleepy = exec(&["sleep", "10"]);
    sleepy.timeout_ms = 100;
    let r = g.exec(&vm.id, &sleepy).await.unwrap();
    assert!(r.timed_out && r.exit_code.is_none());
    let mut limited = exec(&["bytes", "1000"]);
    limited.output_limit = 100;
    let r = g.exec(&vm.id, &limited).await.unwrap();
    assert_eq!(r.stdout.len(), 100);
    assert!(r.stdout_truncated);

    // Chunked upload, then stat and chunked download of the same bytes.
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut up = g
        .upload(&vm.id, "/opt/app/data.bin", 0o640, true)
        .await
        .unwrap();
    for chunk in content.chunks(64 * 1024) {
        up.write(chunk).await.unwrap();
    }
    let info = up.finish().await.unwrap();
    assert_eq!((info.size, info.mode), (content.len() as u64, 0o640));
    use sha2::Digest;
    assert_eq!(info.sha256, hex::encode(sha2::Sha256::digest(&content)));
    let st = g.stat(&vm.id, "/opt/app/data.bin").await.unwrap();
    assert_eq!(
        (st.size, st.mode, &st.sha256),
        (info.size, info.mode, &info.sha256)
    );

    let mut down = g.download(&vm.id, "/opt/app/data.bin").await.unwrap();
    assert_eq!(down.size, content.len() as u64);
    let mut back = Vec::new();
    loop {
        let chunk = down.read(50_000).await.unwrap();
        if chunk.is_empty() {
            break;
        }
        assert!(chunk.len() <= 50_000);
        back.extend(chunk);
    }
    down.close().await;
    assert_eq!(back, content);

    let missing = g
        .upload(&vm.id, "/no/such/dir/f", 0o600, false)
        .await
        .err()
        .unwrap();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    assert_eq!(
        g.stat(&vm.id, "/nope").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn a_driver_built_against_0_1_0_as_released_still_loads_and_answers() {
    let (host, _dir) = host();
    let mut grants = Grants::default();
    grants.config.insert("hostname".into(), "old-config".into());
    let summary = host.load(spec("old", grants)).await.unwrap();
    assert_eq!(summary.contract, "gve:hypervisor@0.1.0");
    assert!(summary.driver && !summary.guest);
    assert!(
        !summary.capabilities.contains(&"bulk-copy".to_string()),
        "{:?}",
        summary.capabilities
    );
    let s = host.open_driver("old", "old:a", no_creds()).await.unwrap();
    assert!(!s.has_bulk());
    let vms = s.list_vms().await.unwrap();
    assert_eq!(
        vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["relic"]
    );
    // Its `config@0.1.0` import is answered by the host's own `config`.
    let info = s.host_info().await.unwrap();
    assert_eq!(
        (info.hypervisor_kind.as_str(), info.hostname.as_str()),
        ("old", "old-config")
    );
    assert_eq!(
        kind(&s.get_vm("nope").await.unwrap_err()),
        ErrorKind::NotFound
    );
    // What it never declared is refused by the host, and it has no bulk export.
    assert_eq!(
        kind(&s.start("relic").await.unwrap_err()),
        ErrorKind::Unsupported
    );
    let e = s.bulk_stage("relic", "t-1", 1).await.err().unwrap();
    assert_eq!(kind(&e), ErrorKind::Unsupported, "{e}");
}
