//! Hostile plugins: every misbehaviour fails only its own call, with an error naming
//! the plugin and the cause, and the next call on the same session works.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gve::plugin::{
    DirGrant, DriverSession, ErrorKind, Grants, PluginError, PluginHost, PluginSpec,
};

use crate::support::{host, no_creds, spec};

async fn open(host: &PluginHost, spec: PluginSpec) -> DriverSession {
    host.load(spec).await.unwrap();
    host.open_driver("hostile", "anywhere", no_creds())
        .await
        .unwrap()
}

/// A normal call still works on the session.
async fn still_healthy(s: &DriverSession) {
    let vm = s.get_vm("ordinary").await.expect("the next call works");
    assert_eq!(vm.name, "ordinary");
}

#[tokio::test]
async fn infinite_loop_is_stopped_at_its_deadline() {
    let (host, _dir) = host();
    let mut sp = spec("hostile", Grants::default());
    sp.limits.call_timeout_ms = 500;
    let s = open(&host, sp).await;
    let t = Instant::now();
    let err = s.get_vm("loop").await.unwrap_err();
    let took = t.elapsed();
    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    assert!(err.to_string().contains("hostile"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(
        took >= Duration::from_millis(500),
        "stopped early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "deadline + 1 s exceeded: {took:?}"
    );
    still_healthy(&s).await;
}

#[tokio::test]
async fn runaway_loop_does_not_block_other_calls() {
    let (host, _dir) = host();
    let mut sp = spec("hostile", Grants::default());
    sp.limits.call_timeout_ms = 1_500;
    let s = open(&host, sp).await;
    let looping = tokio::spawn({
        let s = s.clone();
        async move { s.get_vm("loop").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another instance of the same session answers while the loop spins.
    let t = Instant::now();
    still_healthy(&s).await;
    assert!(
        t.elapsed() < Duration::from_millis(1_000),
        "blocked behind the loop: {:?}",
        t.elapsed()
    );
    assert!(looping.await.unwrap().is_err());
}

#[tokio::test]
async fn memory_bomb_is_refused_at_the_cap() {
    let (host, _dir) = host();
    let mut sp = spec("hostile", Grants::default());
    sp.limits.memory_mib = 32;
    let s = open(&host, sp).await;
    let err = s.get_vm("bomb").await.unwrap_err();
    match &err {
        PluginError::MemoryCap {
            plugin,
            cap_mib,
            asked_mib,
            ..
        } => {
            assert_eq!((plugin.as_str(), *cap_mib), ("hostile", 32));
            assert!(*asked_mib > 32);
        }
        other => panic!("expected a memory cap error, got {other}"),
    }
    assert!(err.to_string().contains("memory cap of 32 MiB"), "{err}");
    still_healthy(&s).await;
}

#[tokio::test]
async fn panic_becomes_a_typed_error() {
    let (host, _dir) = host();
    let s = open(&host, spec("hostile", Grants::default())).await;
    let err = s.get_vm("panic").await.unwrap_err();
    assert!(
        matches!(&err, PluginError::Panic { plugin, op } if plugin == "hostile" && *op == "get-vm"),
        "{err}"
    );
    still_healthy(&s).await;
}

/// A loopback HTTP server that counts connections and answers 200 to each.
fn counting_server() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    c.fetch_add(1, Ordering::SeqCst);
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(2)))
                        .unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (port, count)
}

#[tokio::test]
async fn http_to_a_host_not_granted_never_connects() {
    let (port, count) = counting_server();
    let (other_port, _) = counting_server();
    let (host, _dir) = host();
    let grants = Grants {
        http: vec![format!("127.0.0.1:{other_port}")],
        ..Default::default()
    };
    let s = open(&host, spec("hostile", grants)).await;
    let err = s
        .get_vm(&format!("http:http://127.0.0.1:{port}/secret"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        0,
        "the listener saw a connection"
    );
    // Control: the granted authority is reached.
    let ok = s
        .get_vm(&format!("http:http://127.0.0.1:{other_port}/"))
        .await
        .unwrap();
    assert_eq!(ok.name, "200");
    still_healthy(&s).await;
}

#[tokio::test]
async fn http_grant_is_ignored_unless_requested_and_host_matches_exactly() {
    let (port, count) = counting_server();
    let (host, _dir) = host();
    // Granted by port but reached through another host name: refused.
    let grants = Grants {
        http: vec![format!("127.0.0.1:{port}")],
        ..Default::default()
    };
    let s = open(&host, spec("hostile", grants)).await;
    let err = s
        .get_vm(&format!("http:http://localhost:{port}/"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn libvirt_uri_not_granted_is_refused() {
    let (host, _dir) = host();
    let grants = Grants {
        libvirt: vec!["test:///default".into()],
        ..Default::default()
    };
    let s = open(&host, spec("hostile", grants)).await;
    let err = s.get_vm("libvirt:qemu:///system").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("qemu:///system"), "{err}");
    // Control: the granted URI opens (libvirt's in-process test driver).
    let ok = s.get_vm("libvirt:test:///default").await.unwrap();
    assert!(!ok.name.is_empty());
    still_healthy(&s).await;
}

#[tokio::test]
async fn only_granted_directories_are_visible_and_read_only_by_default() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("hello.txt"), "from the host").unwrap();
    let (host, _dir) = host();
    let grants = Grants {
        directories: vec![DirGrant {
            host: data.path().to_path_buf(),
            guest: "/data".into(),
            writable: false,
        }],
        ..Default::default()
    };
    let s = open(&host, spec("hostile", grants)).await;
    assert_eq!(
        s.get_vm("file:/data/hello.txt").await.unwrap().name,
        "from the host"
    );
    assert!(s.get_vm("write:/data/new.txt").await.is_err());
    assert!(!data.path().join("new.txt").exists());
    assert!(s.get_vm("file:/etc/passwd").await.is_err());
    still_healthy(&s).await;
}

#[tokio::test]
async fn plugin_sees_only_its_own_config() {
    let (host, _dir) = host();
    let mut grants = Grants::default();
    grants.config.insert("region".into(), "eu-1".into());
    let s = open(&host, spec("hostile", grants)).await;
    assert_eq!(s.get_vm("config:region").await.unwrap().name, "eu-1");
    assert_eq!(s.get_vm("config:password").await.unwrap().name, "<unset>");
}
