//! Loading, replacing under load, unloading, contract versions and the artifact cache.

use std::collections::BTreeMap;
use std::time::Duration;

use gve::plugin::{ErrorKind, Grants, HostConfig, PluginError, PluginHost, PluginSpec};

use crate::support::{edited_bundle, host, no_creds, spec};

/// The hostile fixture as version `v` (its info() reports the configured version).
fn hostile_version(v: &str) -> (PluginSpec, tempfile::TempDir) {
    let dir = edited_bundle("hostile", |m| {
        m.replace("version = \"0.1.0\"", &format!("version = \"{v}\""))
    });
    let mut config = BTreeMap::new();
    config.insert("version".to_string(), v.to_string());
    let sp = PluginSpec {
        bundle: dir.path().to_path_buf(),
        grants: Grants {
            config,
            ..Default::default()
        },
        ..Default::default()
    };
    (sp, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_under_100_in_flight_calls_fails_none() {
    let (host, _dir) = host();
    let (v1, _b1) = hostile_version("0.1.0");
    let (v2, _b2) = hostile_version("0.2.0");
    host.load(v1).await.unwrap();
    let s = host
        .open_driver("hostile", "anywhere", no_creds())
        .await
        .unwrap();
    let mut calls = Vec::new();
    for i in 0..100 {
        let (s, host) = (s.clone(), host.clone());
        calls.push(tokio::spawn(async move {
            // Half are session calls that run 20 ms inside the plugin, half are
            // fresh-instance calls.
            if i % 2 == 0 {
                s.get_vm("sleep:20").await.map(|vm| vm.name)
            } else {
                host.driver_info("hostile").await.map(|i| i.version)
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let summary = host.replace("hostile", v2).await.unwrap();
    assert_eq!(summary.version, "0.2.0");
    let mut versions = BTreeMap::new();
    for c in calls {
        let v = c
            .await
            .unwrap()
            .expect("no call fails across a replacement");
        *versions.entry(v).or_insert(0) += 1;
    }
    assert!(
        versions.contains_key("0.1.0"),
        "no call ran on the old version: {versions:?}"
    );
    // Every call that starts after the swap uses the new version.
    assert_eq!(s.get_vm("version").await.unwrap().name, "0.2.0");
    assert_eq!(host.driver_info("hostile").await.unwrap().version, "0.2.0");
    assert_eq!(host.get("hostile").unwrap().version, "0.2.0");
}

#[tokio::test]
async fn unload_refuses_later_calls_and_allows_a_fresh_load() {
    let (host, _dir) = host();
    host.load(spec("memory", Grants::default())).await.unwrap();
    let s = host
        .open_driver("memory", "memory:u", no_creds())
        .await
        .unwrap();
    s.list_vms().await.unwrap();
    host.unload("memory").unwrap();
    assert!(host.list().is_empty());
    let err = s.list_vms().await.unwrap_err();
    // A session's plugin gone is `unavailable`, never `not-found` (which callers
    // read as "the VM is gone").
    assert!(
        matches!(err, PluginError::Unloaded(ref n) if n == "memory"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(matches!(
        host.unload("memory"),
        Err(PluginError::NotLoaded(_))
    ));
    assert!(matches!(host.get("memory"), Err(PluginError::NotLoaded(_))));
    host.load(spec("memory", Grants::default())).await.unwrap();
    assert!(matches!(
        host.load(spec("memory", Grants::default())).await,
        Err(PluginError::AlreadyLoaded(_))
    ));
    // The session opened before the unload follows the plugin back.
    s.list_vms().await.unwrap();
}

#[tokio::test]
async fn a_component_of_another_contract_version_is_refused_by_name() {
    let (host, _dir) = host();
    let err = host
        .load(spec("future", Grants::default()))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::Contract { .. }), "{msg}");
    assert!(
        msg.contains("gve:hypervisor@0.2.0") && msg.contains("gve:hypervisor@0.1.x"),
        "{msg}"
    );

    // A manifest that lies about the version: the component itself is inspected.
    let lying = edited_bundle("future", |m| {
        m.replace("gve:hypervisor@0.2.0", "gve:hypervisor@0.1.0")
    });
    let sp = PluginSpec {
        bundle: lying.path().to_path_buf(),
        ..Default::default()
    };
    let msg = host.load(sp).await.unwrap_err().to_string();
    assert!(
        msg.contains("implements gve:hypervisor@0.2.0")
            && msg.contains("accepts gve:hypervisor@0.1.x"),
        "{msg}"
    );
    assert!(host.list().is_empty());
}

#[tokio::test]
async fn manifest_and_component_must_agree() {
    let (host, _dir) = host();
    let renamed = edited_bundle("memory", |m| {
        m.replace("name = \"memory\"", "name = \"other\"")
    });
    let sp = PluginSpec {
        bundle: renamed.path().to_path_buf(),
        ..Default::default()
    };
    let msg = host.load(sp).await.unwrap_err().to_string();
    assert!(msg.contains("info() says memory"), "{msg}");

    let missing = edited_bundle("memory", |m| m.replace("memory.wasm", "absent.wasm"));
    let sp = PluginSpec {
        bundle: missing.path().to_path_buf(),
        ..Default::default()
    };
    let msg = host.load(sp).await.unwrap_err().to_string();
    assert!(msg.contains("absent.wasm"), "{msg}");

    let garbage = edited_bundle("memory", |m| m);
    std::fs::write(garbage.path().join("memory.wasm"), b"\0asm garbage").unwrap();
    let sp = PluginSpec {
        bundle: garbage.path().to_path_buf(),
        ..Default::default()
    };
    let err = host.load(sp).await.unwrap_err();
    assert!(
        matches!(
            err,
            PluginError::Runtime {
                action: "compile",
                ..
            }
        ),
        "{err}"
    );
}

/// A caller that checked a bundle's grants for the plugin its manifest named (the
/// agent's admin API) loads it by that name: a bundle that names another plugin by
/// the time it is read again (swapped in between) is refused, and nothing is loaded.
#[tokio::test]
async fn a_load_by_name_refuses_a_bundle_that_names_another_plugin() {
    let (host, _dir) = host();
    let err = host
        .load_named("hostile", spec("memory", Grants::default()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PluginError::Manifest { ref message, .. }
            if message.contains("'memory'") && message.contains("'hostile'")),
        "{err}"
    );
    assert!(host.list().is_empty(), "{:?}", host.list());
    let loaded = host
        .load_named("memory", spec("memory", Grants::default()))
        .await
        .unwrap();
    assert_eq!(loaded.name, "memory");
}

#[tokio::test]
async fn operator_limits_are_checked() {
    let (host, _dir) = host();
    let mut sp = spec("memory", Grants::default());
    sp.limits.memory_mib = 1 << 20;
    let msg = host.load(sp).await.unwrap_err().to_string();
    assert!(msg.contains("memory-mib"), "{msg}");
}

#[tokio::test]
async fn a_second_host_deserializes_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HostConfig {
        cache_dir: dir.path().join("cache"),
        engine: Default::default(),
    };
    let first = PluginHost::new(cfg.clone()).unwrap();
    assert_eq!(
        first
            .load(spec("memory", Grants::default()))
            .await
            .unwrap()
            .origin,
        "compiled"
    );
    drop(first);
    let second = PluginHost::new(cfg.clone()).unwrap();
    assert_eq!(
        second
            .load(spec("memory", Grants::default()))
            .await
            .unwrap()
            .origin,
        "cached"
    );
    drop(second);

    // A damaged artifact is recompiled, not trusted.
    for entry in std::fs::read_dir(dir.path().join("cache")).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not an artifact").unwrap();
    }
    let third = PluginHost::new(cfg).unwrap();
    assert_eq!(
        third
            .load(spec("memory", Grants::default()))
            .await
            .unwrap()
            .origin,
        "compiled"
    );
    let s = third
        .open_driver("memory", "memory:c", no_creds())
        .await
        .unwrap();
    s.host_info().await.unwrap();
}
