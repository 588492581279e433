//! Network: only granted authorities, parsed strictly, are reached, and every phase
//! of a connection has its own timeout.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gve::plugin::{ErrorKind, Grants, PluginError};

use super::servers::{counting, Silent};
use super::{bench, hostile, libvirt_test_grant};

#[tokio::test]
async fn http_to_a_host_not_granted_never_connects() {
    let (port, count) = counting();
    let (other_port, _) = counting();
    let grants = Grants {
        http: vec![format!("127.0.0.1:{other_port}")],
        ..Default::default()
    };
    let b = bench(hostile(grants)).await;
    let err = b
        .hostile
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
    let ok = b
        .hostile
        .get_vm(&format!("http:http://127.0.0.1:{other_port}/"))
        .await
        .unwrap();
    assert_eq!(ok.name, "200");
    b.aftermath().await;
}

#[tokio::test]
async fn other_spellings_of_a_granted_host_are_refused() {
    let (port, count) = counting();
    let grants = Grants {
        http: vec![format!("127.0.0.1:{port}")],
        ..Default::default()
    };
    let b = bench(hostile(grants)).await;
    for url in [
        format!("http://localhost:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://127.0.0.1.:{port}/"),
    ] {
        let err = b.hostile.get_vm(&format!("http:{url}")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Denied, "{url}: {err}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 0);
    b.aftermath().await;
}

/// `granted@other` used to pass the check on the part after `@`.
#[tokio::test]
async fn an_authority_with_userinfo_is_refused_before_connecting() {
    let (granted, granted_count) = counting();
    let (other, other_count) = counting();
    let grants = Grants {
        http: vec![format!("127.0.0.1:{granted}")],
        ..Default::default()
    };
    let b = bench(hostile(grants)).await;
    // Raw wasi:http, past the SDK's own refusal of user info.
    for authority in [
        format!("127.0.0.1:{other}@127.0.0.1:{granted}"),
        format!("user:pw@127.0.0.1:{granted}"),
    ] {
        let err = b
            .hostile
            .get_vm(&format!("raw-get:{authority}"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Denied, "{authority}: {err}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(granted_count.load(Ordering::SeqCst), 0);
    assert_eq!(other_count.load(Ordering::SeqCst), 0);
    // Control: the same raw path reaches the granted authority.
    let ok = b
        .hostile
        .get_vm(&format!("raw-get:127.0.0.1:{granted}"))
        .await
        .unwrap();
    assert_eq!(ok.name, "200");
    b.aftermath().await;
}

/// A granted server that accepts and never answers the TLS handshake fails the
/// request with a timeout the plugin sees, well before the call's deadline.
#[tokio::test]
async fn a_tls_handshake_that_never_ends_times_out_on_its_own() {
    let server = Silent::start();
    let grants = Grants {
        http: vec![format!("127.0.0.1:{}", server.port)],
        ..Default::default()
    };
    let mut sp = hostile(grants);
    sp.limits.call_timeout_ms = 3_000;
    let b = bench(sp).await;
    let t = Instant::now();
    let err = b
        .hostile
        .get_vm(&format!("http:https://127.0.0.1:{}/", server.port))
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert!(
        !matches!(err, PluginError::Deadline { .. }),
        "stopped by the call deadline, not the handshake timeout: {err}"
    );
    assert!(matches!(err, PluginError::Driver { .. }), "{err}");
    assert!(
        took >= Duration::from_millis(1_400) && took < Duration::from_millis(2_500),
        "handshake timeout after {took:?} (expected half the 3 s budget)"
    );
    assert_eq!(server.accepted(), 1);
    b.aftermath().await;
}

#[tokio::test]
async fn libvirt_uri_not_granted_is_refused() {
    let b = bench(hostile(libvirt_test_grant())).await;
    let err = b
        .hostile
        .get_vm("libvirt:qemu:///system")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("qemu:///system"), "{err}");
    // Spellings of the granted URI are other URIs.
    for uri in [
        "test:///default/",
        "TEST:///default",
        "test:///default?x=1",
        "test:///default ",
        "test+ssh:///default",
        "test:///./default",
    ] {
        let err = b
            .hostile
            .get_vm(&format!("libvirt:{uri}"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Denied, "{uri}: {err}");
    }
    // Control: the granted URI opens (libvirt's in-process test driver).
    let ok = b.hostile.get_vm("libvirt:test:///default").await.unwrap();
    assert!(!ok.name.is_empty());
    b.aftermath().await;
}

/// wasi:sockets is linked (wasmtime's WASI), but no network is lent: a raw TCP
/// connect is refused and never reaches the listener.
#[tokio::test]
async fn raw_sockets_reach_nothing() {
    let (port, count) = counting();
    let grants = Grants {
        http: vec![format!("127.0.0.1:{port}")],
        ..Default::default()
    };
    let b = bench(hostile(grants)).await;
    let err = b
        .hostile
        .get_vm(&format!("socket:{port}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("wasi:sockets"), "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count.load(Ordering::SeqCst), 0);
    b.aftermath().await;
}
