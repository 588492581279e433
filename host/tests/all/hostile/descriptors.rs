//! Descriptors: files, outgoing requests and libvirt connections a plugin opens are
//! budgeted per instance, and whatever an instance still holds when its call ends
//! is closed with it.

use std::time::{Duration, Instant};

use gve::plugin::{DirGrant, Grants, PluginError};

use super::servers::Silent;
use super::{bench, hostile, libvirt_test_grant};
use crate::support::spec;

fn budget_error(err: &PluginError, what: &str, limit: u64) -> bool {
    matches!(err, PluginError::Budget { what: w, limit: l, .. } if *w == what && *l == limit)
}

/// 30,000 opens of one granted file used to take every descriptor of the process.
#[tokio::test]
async fn opening_a_granted_file_over_and_over_stops_at_the_budget() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("f"), "x").unwrap();
    let grants = Grants {
        directories: vec![DirGrant {
            host: data.path().to_path_buf(),
            guest: "/data".into(),
            writable: false,
        }],
        ..Default::default()
    };
    let b = bench(hostile(grants)).await;
    let err = b.hostile.get_vm("files:/data/f:30000").await.unwrap_err();
    assert!(budget_error(&err, "open files", 64), "{err}");
    assert!(err.to_string().contains("budget of 64 open files"), "{err}");
    // Under the budget: fine, and the descriptors left open are closed with the
    // instance (more than a session keeps between calls).
    assert_eq!(
        b.hostile.get_vm("files:/data/f:20").await.unwrap().name,
        "20"
    );
    // Loading still works (it needs descriptors), and a session follows its plugin
    // by name across the unload.
    b.host.unload("memory").unwrap();
    b.host
        .load(spec("memory", Grants::default()))
        .await
        .unwrap();
    b.aftermath().await;
}

/// Requests never awaited: at most the budget are in flight, the rest fail at once,
/// and those in flight are closed when the call ends.
#[tokio::test]
async fn requests_never_awaited_are_bounded_and_closed_with_the_call() {
    let server = Silent::start();
    let authority = format!("127.0.0.1:{}", server.port);
    let grants = Grants {
        http: vec![authority.clone()],
        ..Default::default()
    };
    let b = bench(hostile(grants)).await;
    let t = Instant::now();
    let started = b
        .hostile
        .get_vm(&format!("requests:{authority}:500"))
        .await
        .unwrap();
    assert_eq!(
        started.name, "500",
        "handles are made; the budget applies to sending"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted = server.accepted();
    assert!(accepted <= 16, "{accepted} connections reached the server");
    assert!(accepted > 0, "no request was sent at all");
    assert_eq!(server.open(), 0, "connections outlived the call");

    // Past the table budget the call is stopped instead.
    let err = b
        .hostile
        .get_vm(&format!("requests:{authority}:6000"))
        .await
        .unwrap_err();
    assert!(budget_error(&err, "host resources", 1_024), "{err}");
    b.aftermath().await;
}

#[tokio::test]
async fn libvirt_connections_stop_at_their_budget() {
    let b = bench(hostile(libvirt_test_grant())).await;
    let err = b
        .hostile
        .get_vm("libvirt-many:test:///default:100")
        .await
        .unwrap_err();
    assert!(budget_error(&err, "libvirt connections", 8), "{err}");
    assert_eq!(
        b.hostile
            .get_vm("libvirt-many:test:///default:2")
            .await
            .unwrap()
            .name,
        "2"
    );
    b.aftermath().await;
}
