//! Plugin host speed: compile vs cached load, instantiation, the round trip of a
//! small contract call (fresh instance and reused instance) against a native Rust
//! trait call, and a call that works in the plugin's memory (10,000 VM records). Run with `bash bench/run.sh`; promises are in docs/SPEC.md.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion};
use gve::plugin::bindings::types::{Credentials, VmInfo, VmResources, VmState};
use gve::plugin::{Grants, HostConfig, Limits, PluginHost, PluginSpec};

fn bundles() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let status = Command::new("bash")
        .arg(root.join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "building plugins failed");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("plugins")
}

fn spec(dir: &Path, name: &str) -> PluginSpec {
    PluginSpec {
        bundle: dir.join(name),
        grants: Grants::default(),
        limits: Limits::default(),
    }
}

fn creds() -> Credentials {
    Credentials {
        username: None,
        password: None,
        token: None,
    }
}

/// The native baseline: the same call shape as a Rust trait object.
trait NativeDriver: Send + Sync {
    fn get_vm(&self, vm: &str) -> Result<VmInfo, String>;
}

struct Native;

impl NativeDriver for Native {
    fn get_vm(&self, vm: &str) -> Result<VmInfo, String> {
        Ok(VmInfo {
            id: vm.to_string(),
            name: vm.to_string(),
            state: VmState::Stopped,
            host: "native".into(),
            addresses: vec![],
            resources: VmResources {
                logical_cpus: 1,
                main_memory_mib: 512,
                disk_mib: None,
            },
            platform: None,
            os_family: None,
            os_name: None,
            is_template: false,
            labels: vec![],
        })
    }
}

fn benches(c: &mut Criterion) {
    let dir = bundles();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |sub: &str| HostConfig {
        cache_dir: tmp.path().join(sub),
        engine: Default::default(),
    };

    let mut g = c.benchmark_group("load");
    g.sample_size(10);
    let compile_host = PluginHost::new(cfg("compile")).unwrap();
    let mut n = 0;
    g.bench_function("compile (cold, no cache)", |b| {
        b.to_async(&rt).iter(|| {
            n += 1;
            // A fresh cache directory each time forces compilation.
            let host = PluginHost::new(cfg(&format!("cold-{n}"))).unwrap();
            let sp = spec(&dir, "hostile");
            async move {
                let s = host.load(sp).await.unwrap();
                assert_eq!(s.origin, "compiled");
            }
        })
    });
    drop(compile_host);
    g.sample_size(50);
    let warm = PluginHost::new(cfg("warm")).unwrap();
    rt.block_on(warm.load(spec(&dir, "hostile"))).unwrap();
    warm.unload("hostile").unwrap();
    g.bench_function("cached (warm load)", |b| {
        b.to_async(&rt).iter(|| async {
            let s = warm.load(spec(&dir, "hostile")).await.unwrap();
            assert_eq!(s.origin, "cached");
            warm.unload("hostile").unwrap();
        })
    });
    g.finish();

    let host = PluginHost::new(cfg("calls")).unwrap();
    rt.block_on(host.load(spec(&dir, "hostile"))).unwrap();
    let loaded = host.slot("hostile").unwrap().current().unwrap();
    let mut g = c.benchmark_group("call");
    g.bench_function("instantiate (pooled)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(loaded.instantiate().await.unwrap()) })
    });
    g.bench_function("fresh instance + info()", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(host.driver_info("hostile").await.unwrap()) })
    });
    let session = rt
        .block_on(host.open_driver("hostile", "bench", creds()))
        .unwrap();
    g.bench_function("reused instance: get-vm", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(session.get_vm(black_box("vm-1")).await.unwrap()) })
    });
    // A call that works in the plugin's memory: the memory driver builds the
    // records of 10,000 VMs and hands them over (loads and stores in linear
    // memory, the shape of a driver parsing a large reply).
    rt.block_on(host.load(spec(&dir, "memory"))).unwrap();
    let memory = rt
        .block_on(host.open_driver("memory", "memory:bench?vms=10000", creds()))
        .unwrap();
    g.sample_size(20);
    g.bench_function("reused instance: list-vms of 10,000 (memory driver)", |b| {
        b.to_async(&rt).iter(|| async {
            let vms = memory.list_vms().await.unwrap();
            assert_eq!(vms.len(), 10_000);
            black_box(vms)
        })
    });
    g.sample_size(100);
    let native: Box<dyn NativeDriver> = Box::new(Native);
    g.bench_function("native trait call: get_vm", |b| {
        b.iter(|| black_box(native.get_vm(black_box("vm-1")).unwrap()))
    });
    g.finish();
}

criterion_group!(plugin, benches);
criterion_main!(plugin);
