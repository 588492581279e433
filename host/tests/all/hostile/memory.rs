//! Memory: linear memory is capped, and host memory a plugin makes the host hold
//! (wasi:http header sets, resource-table entries) is budgeted per instance.

use gve::plugin::{ErrorKind, Grants, PluginError};

use super::{bench, hostile};

#[tokio::test]
async fn memory_bomb_is_refused_at_the_cap() {
    let mut sp = hostile(Grants::default());
    sp.limits.memory_mib = 32;
    let b = bench(sp).await;
    let err = b.hostile.get_vm("bomb").await.unwrap_err();
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
    b.aftermath().await;
}

#[tokio::test]
async fn panic_becomes_a_typed_error() {
    let b = bench(hostile(Grants::default())).await;
    let err = b.hostile.get_vm("panic").await.unwrap_err();
    assert!(
        matches!(&err, PluginError::Panic { plugin, op } if plugin == "hostile" && *op == "get-vm"),
        "{err}"
    );
    b.aftermath().await;
}

/// 5,000 header sets of 60 KiB (300 MiB of host memory before budgets), three times.
#[tokio::test]
async fn http_header_sets_without_a_grant_stop_at_their_budget() {
    let b = bench(hostile(Grants::default())).await;
    for _ in 0..3 {
        let err = b.hostile.get_vm("fields:5000").await.unwrap_err();
        assert!(
            matches!(&err, PluginError::Budget { what, limit: 256, .. } if *what == "HTTP header sets"),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::Denied);
        assert!(
            err.to_string().contains("budget of 256 HTTP header sets"),
            "{err}"
        );
    }
    // Under the budget it works, and the instance still goes back to the pool.
    assert_eq!(
        b.hostile.get_vm("fields:10").await.unwrap().name,
        "10 fields"
    );
    b.aftermath().await;
}

#[tokio::test]
async fn every_host_resource_counts_against_the_table_budget() {
    let mut sp = hostile(Grants::default());
    sp.limits.max_http_header_sets = 4_096;
    sp.limits.max_host_resources = 300;
    let b = bench(sp).await;
    for ask in ["fields:1000", "hashers:1000"] {
        let err = b.hostile.get_vm(ask).await.unwrap_err();
        assert!(
            matches!(&err, PluginError::Budget { what, limit: 300, .. } if *what == "host resources"),
            "{ask}: {err}"
        );
    }
    b.aftermath().await;
}

/// SHA-256 by the host (contract 0.1.3's `digest`): a plugin's hash of nothing, one
/// byte, or 5 MiB + 7 bytes in one update (the host hashes it in pieces of 1 MiB),
/// each then 3 bytes more, is the SHA-256 of those bytes.
#[tokio::test]
async fn the_hosts_sha256_is_the_sha256_of_what_the_plugin_gave() {
    use sha2::{Digest, Sha256};
    let b = bench(hostile(Grants::default())).await;
    for n in [0usize, 1, (5 << 20) + 7] {
        let mut data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        data.extend_from_slice(b"end");
        let vm = b.hostile.get_vm(&format!("digest:{n}")).await.unwrap();
        assert_eq!(vm.name, hex::encode(Sha256::digest(&data)), "{n} bytes");
    }
    b.aftermath().await;
}
