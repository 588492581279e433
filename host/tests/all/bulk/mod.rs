//! Bulk copies staged by a driver (contract 0.1.1, `gve:hypervisor/bulk`): the kvm
//! driver's raw disk attached live to a real running guest, its bytes written and
//! read through libvirt streams, seen by the guest; what a caller may not do; and
//! the agent's copy-in through it, with its fallback to the guest agent.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gve::agent::model::{FileMeta, OpState, Operation};
use gve::api::client::Client;
use gve::api::{percent_encode, ApiError};
use gve::plugin::{ErrorKind, Grants, PluginError};
use gve_harness::Libvirtd;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::agent::TOKEN;
use crate::guest::{agent_config, copy_out, exec, running_vm, started_vm, text};
use crate::kvm::{guest_sh, kvm_spec, spawn_agent, wait_for_guest_agent};
use crate::metrics::{sample, scrape};
use crate::support::{host, no_creds, spec};

mod hash;
mod job;
mod migrate;
mod out;

fn kind(r: Result<impl Sized, PluginError>) -> ErrorKind {
    match r {
        Ok(_) => panic!("succeeded where it must fail"),
        Err(e) => e.kind(),
    }
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The guest's device whose serial is `serial`, found as a guest script would.
fn find_device(serial: &str) -> String {
    format!(
        "for i in $(seq 50); do for s in /sys/block/*/serial; do \
         [ \"$(cat $s)\" = {serial} ] && {{ d=${{s%/serial}}; echo /dev/${{d##*/}}; exit 0; }}; \
         done; sleep 0.1; done; exit 3"
    )
}

/// Volumes of the lab's `gve` pool.
fn pool_volumes(lv: &Libvirtd) -> String {
    // libvirt refuses a refresh while a volume is being streamed ("asynchronous
    // jobs running"); the listing is still current then (the volume streamed
    // into was made through this daemon), so that refusal alone is let pass.
    let refresh = std::process::Command::new("virsh")
        .args(["-q", "-c", &lv.uri, "pool-refresh", "gve"])
        .output()
        .expect("run virsh");
    let why = String::from_utf8_lossy(&refresh.stderr);
    assert!(
        refresh.status.success() || why.contains("asynchronous jobs running"),
        "virsh pool-refresh gve: {why}"
    );
    lv.virsh(&["vol-list", "gve"])
}

/// Asserts that no staged disk is left in the lab's pool.
fn nothing_staged(lv: &Libvirtd) {
    let volumes = pool_volumes(lv);
    assert!(
        !volumes.contains("gve-xfer"),
        "a staged disk was left: {volumes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_disk_carries_bytes_both_ways_on_a_real_guest_and_leaves_nothing() {
    let lv = Libvirtd::start();
    let (host, _dir) = host();
    let summary = host.load(kvm_spec(&lv)).await.unwrap();
    assert!(
        summary.capabilities.contains(&"bulk-copy".to_string()),
        "{:?}",
        summary.capabilities
    );
    let driver = host.open_driver("kvm", &lv.uri, no_creds()).await.unwrap();
    assert!(driver.has_bulk());
    let vm = driver.clone_vm("tiny", "bulk-1", true).await.unwrap();

    // Refused before any disk is made: a stopped VM, bad ids, sizes past the cap.
    assert_eq!(
        kind(driver.bulk_stage(&vm.id, "t-0", 1 << 20).await),
        ErrorKind::InvalidState
    );
    driver.start(&vm.id).await.unwrap();
    wait_for_guest_agent(&driver, &vm.id).await;
    for id in ["", "../x", "a b", &"x".repeat(65)] {
        assert_eq!(
            kind(driver.bulk_stage(&vm.id, id, 1 << 20).await),
            ErrorKind::InvalidArgument,
            "{id:?}"
        );
    }
    assert_eq!(
        kind(driver.bulk_stage(&vm.id, "t-0", u64::MAX).await),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(driver.bulk_stage("no-such-vm", "t-0", 1 << 20).await),
        ErrorKind::NotFound
    );
    nothing_staged(&lv);

    // In: the host writes 10 MiB + 123 bytes; the guest reads them off the disk.
    let size = (10 << 20) + 123;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4093) as u8).collect();
    let t = Instant::now();
    let mut xfer = driver.bulk_stage(&vm.id, "t-1", size as u64).await.unwrap();
    eprintln!("staged and attached in {:?}", t.elapsed());
    assert_eq!(xfer.serial.len(), 20, "{}", xfer.serial);
    assert_eq!(
        kind(driver.bulk_stage(&vm.id, "t-1", 1 << 20).await),
        ErrorKind::AlreadyExists
    );
    for (i, chunk) in data.chunks(4 << 20).enumerate() {
        xfer.write((i as u64) << 22, chunk).await.unwrap();
    }
    // The disk is padded to 4 MiB units: 12 MiB here; nothing runs past its end.
    let e = xfer.write(12 << 20, b"x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let back = xfer.read(0, 8 << 20).await.unwrap();
    assert_eq!(back[..], data[..8 << 20]);
    assert!(xfer.read(0, (8 << 20) + 1).await.is_err(), "8 MiB a call");

    let (code, dev) = guest_sh(&driver, &vm.id, &find_device(&xfer.serial)).await;
    assert_eq!(code, 0, "the guest never saw disk {}: {dev}", xfer.serial);
    let dev = dev.trim();
    let read_in = format!(
        "dd if={dev} of=/tmp/in bs=4M count=3 iflag=direct 2>/dev/null && \
         truncate -s {size} /tmp/in && sha256sum /tmp/in"
    );
    let (code, sum) = guest_sh(&driver, &vm.id, &read_in).await;
    assert_eq!(code, 0, "{sum}");
    assert!(
        sum.starts_with(&hex(&data)),
        "guest {sum} vs host {}",
        hex(&data)
    );

    // Out: the guest writes 3 MiB of its own onto the disk; the host reads them.
    let write_out = format!(
        "head -c 3145728 /dev/urandom > /tmp/out && \
         dd if=/tmp/out of={dev} bs=1M oflag=direct conv=fsync 2>/dev/null && sha256sum /tmp/out"
    );
    let (code, sum) = guest_sh(&driver, &vm.id, &write_out).await;
    assert_eq!(code, 0, "{sum}");
    let mut out = Vec::new();
    while out.len() < 3 << 20 {
        let chunk = xfer
            .read(out.len() as u64, (3 << 20) - out.len() as u32)
            .await
            .unwrap();
        assert!(!chunk.is_empty());
        out.extend(chunk);
    }
    assert!(
        sum.starts_with(&hex(&out)),
        "guest {sum} vs host {}",
        hex(&out)
    );

    // Released: detached from the guest and gone from the pool.
    let t = Instant::now();
    xfer.release().await.unwrap();
    eprintln!("released in {:?}", t.elapsed());
    nothing_staged(&lv);
    let live = lv.virsh(&["dumpxml", &vm.name]);
    assert!(!live.contains("gve-xfer"), "{live}");
    assert!(!lv
        .virsh(&["dumpxml", "--inactive", &vm.name])
        .contains("gve-xfer"));

    // A transfer dropped unreleased (its caller gone) is released all the same.
    let xfer = driver.bulk_stage(&vm.id, "t-2", 1).await.unwrap();
    assert!(pool_volumes(&lv).contains("gve-xfer-t-2"));
    drop(xfer);
    let t = Instant::now();
    while pool_volumes(&lv).contains("gve-xfer-t-2") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a dropped transfer kept its disk"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // What a crashed host left (made here by hand, as the plugin would have) is
    // found again by its id and released; releasing nothing is fine.
    let path = lv.images.join("gve-xfer-t-3.raw");
    lv.virsh(&[
        "vol-create-as",
        "gve",
        "gve-xfer-t-3.raw",
        "4M",
        "--format",
        "raw",
    ]);
    lv.virsh(&[
        "attach-disk",
        &vm.name,
        &path.display().to_string(),
        "vdz",
        "--live",
        "--subdriver",
        "raw",
    ]);
    driver.bulk_release_left(&vm.id, "t-3").await.unwrap();
    assert!(!pool_volumes(&lv).contains("gve-xfer-t-3"));
    assert!(!lv.virsh(&["dumpxml", &vm.name]).contains("gve-xfer-t-3"));
    driver.bulk_release_left(&vm.id, "t-3").await.unwrap();
    driver.destroy(&vm.id).await.unwrap();
}

#[tokio::test]
async fn a_driver_without_the_bulk_export_is_refused_before_it_is_entered() {
    let (host, _dir) = host();
    let summary = host.load(spec("memory", Grants::default())).await.unwrap();
    assert!(!summary.capabilities.contains(&"bulk-copy".to_string()));
    let s = host
        .open_driver("memory", "memory:a", no_creds())
        .await
        .unwrap();
    assert!(!s.has_bulk());
    let e = s.bulk_stage("vm", "t-1", 1).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("bulk"), "{e}");
}

/// Copies `data` whole (a body of known length) into `path` of `vm`, `sha` as the
/// client's checksum.
async fn put_known(
    c: &Client,
    vm: &str,
    path: &str,
    data: &[u8],
    sha: &str,
) -> Result<FileMeta, ApiError> {
    c.put_stream(
        &format!(
            "/v1/vms/{vm}/files?path={}&mode=0640&parents=true",
            percent_encode(path)
        ),
        &[("x-gve-sha256", sha.to_string())],
        gve::api::full(Bytes::copy_from_slice(data)),
    )
    .await
}

/// How often the agent's kvm plugin staged a disk, with `outcome`.
async fn stagings(agent: &gve::agent::Agent, outcome: &str) -> f64 {
    let (_, _, text) = scrape(&format!("http://{}", agent.addr), Some(TOKEN)).await;
    sample(
        &text,
        &format!(
            "gve_plugin_calls_total{{plugin=\"kvm\",op=\"bulk-stage\",outcome=\"{outcome}\"}}"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_copy_in_goes_through_a_staged_disk_and_falls_back_when_none_can_be_staged() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = crate::guest::agent(&lv, None).await;
    let vm = running_vm(&agent, &c, "bulk-in", 256).await;
    let size = (12 << 20) + 5;
    let data: Vec<u8> = (0..size)
        .map(|i: usize| (i.wrapping_mul(31) ^ (i >> 13)) as u8)
        .collect();
    let sha = hex(&data);

    // Through a staged disk: the guest's own checksum comes back, the file is whole
    // with its mode, and nothing is left staged.
    let t = Instant::now();
    let meta = put_known(&c, &vm.id, "/tmp/b/in.bin", &data, &sha)
        .await
        .unwrap();
    eprintln!("12 MiB in through a staged disk: {:?}", t.elapsed());
    assert_eq!(
        (meta.size, meta.sha256.as_str(), meta.mode),
        (size as u64, sha.as_str(), 0o640)
    );
    assert_eq!(stagings(&agent, "ok").await, 1.0);
    let out = exec(&c, &vm.id, json!({ "argv": ["sh", "-c", "sha256sum /tmp/b/in.bin; stat -c %a /tmp/b/in.bin; ls -a /tmp/b"] })).await;
    let out = text(&out.stdout_b64);
    assert!(out.starts_with(&sha) && out.contains("\n640\n"), "{out}");
    assert!(
        !out.contains(".gve-bulk"),
        "a temporary file was left: {out}"
    );
    nothing_staged(&lv);

    // A client checksum that does not match: refused, the file as it was.
    let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    let e = put_known(&c, &vm.id, "/tmp/b/in.bin", &other, &sha)
        .await
        .unwrap_err();
    assert_eq!(
        (e.status, e.kind.as_str()),
        (400, "invalid-argument"),
        "{e}"
    );
    assert_eq!(stagings(&agent, "ok").await, 2.0);
    let out = exec(
        &c,
        &vm.id,
        json!({ "argv": ["sha256sum", "/tmp/b/in.bin"] }),
    )
    .await;
    assert!(text(&out.stdout_b64).starts_with(&sha));
    // A missing directory without `parents`: not-found, nothing left.
    let e = c
        .put_stream::<FileMeta>(
            "/v1/vms/{vm}/files?path=/nope/x.bin"
                .replace("{vm}", &vm.id)
                .as_str(),
            &[],
            gve::api::full(Bytes::copy_from_slice(&data)),
        )
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (404, "not-found"), "{e}");
    nothing_staged(&lv);

    // A directory as the target: refused by the guest's side of a staged copy,
    // nothing replaced or left.
    let before = stagings(&agent, "ok").await;
    let e = put_known(&c, &vm.id, "/tmp/b", &data, &sha)
        .await
        .unwrap_err();
    assert_eq!(
        (e.status, e.kind.as_str()),
        (400, "invalid-argument"),
        "{e}"
    );
    assert_eq!(stagings(&agent, "ok").await, before + 1.0);
    let out = exec(&c, &vm.id, json!({ "argv": ["ls", "-a", "/tmp/b"] })).await;
    let out = text(&out.stdout_b64);
    assert!(
        out.contains("in.bin") && !out.contains(".gve-bulk"),
        "{out}"
    );

    // Out through a staged disk: the same bytes and mode; a small file and a
    // missing one go the guest agent's way.
    let staged = stagings(&agent, "ok").await;
    let t = Instant::now();
    let (n, sum, m) = copy_out(&c, &vm.id, "/tmp/b/in.bin").await;
    eprintln!("12 MiB out through a staged disk: {:?}", t.elapsed());
    assert_eq!(
        (n, sum.as_str(), m.as_str()),
        (size as u64, sha.as_str(), "0640")
    );
    assert_eq!(stagings(&agent, "ok").await, staged + 1.0);
    // Through a symbolic link: the file it names, also through a staged disk (its
    // own size is a few bytes).
    exec(
        &c,
        &vm.id,
        json!({ "argv": ["ln", "-s", "/tmp/b/in.bin", "/tmp/b/in.link"] }),
    )
    .await;
    let (n, sum, m) = copy_out(&c, &vm.id, "/tmp/b/in.link").await;
    assert_eq!(
        (n, sum.as_str(), m.as_str()),
        (size as u64, sha.as_str(), "0640")
    );
    assert_eq!(stagings(&agent, "ok").await, staged + 2.0);
    // Released once the last byte is sent (the client may finish first).
    let t = Instant::now();
    while pool_volumes(&lv).contains("gve-xfer") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            pool_volumes(&lv)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    exec(
        &c,
        &vm.id,
        json!({ "argv": ["sh", "-c", "head -c 1000 /tmp/b/in.bin > /tmp/b/small"] }),
    )
    .await;
    let (n, sum, _) = copy_out(&c, &vm.id, "/tmp/b/small").await;
    assert_eq!((n, sum), (1000, hex(&data[..1000])));
    let e = c
        .get_stream(&format!("/v1/vms/{}/files?path=/tmp/b/none", vm.id))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (404, "not-found"), "{e}");
    assert_eq!(stagings(&agent, "ok").await, staged + 2.0);

    // An upload that announces 8 MiB and is cut after 5: fails, nothing left.
    cut_known(agent.addr, &vm.id, "/tmp/b/cut.bin").await;
    let t = Instant::now();
    loop {
        let ops: Vec<Operation> = c.get("/v1/operations").await.unwrap();
        let running = ops.iter().filter(|o| o.state == OpState::Running).count();
        if running == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{ops:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = exec(&c, &vm.id, json!({ "argv": ["ls", "-a", "/tmp/b"] })).await;
    let out = text(&out.stdout_b64);
    assert!(
        !out.contains("cut.bin") && !out.contains(".gve-bulk"),
        "{out}"
    );
    nothing_staged(&lv);

    // No slot left for another disk (filled by hand): the copy goes through the
    // guest agent instead, and arrives all the same.
    let mut filled = 0;
    for i in 0..32 {
        let name = format!("filler-{i}.raw");
        lv.virsh(&["vol-create-as", "gve", &name, "1M", "--format", "raw"]);
        let path = lv.images.join(&name).display().to_string();
        let target = format!("vd{}", (b'c' + i as u8) as char);
        let out = std::process::Command::new("virsh")
            .args(["-q", "-c", &lv.uri, "attach-disk", &vm.name, &path, &target])
            .args(["--live", "--subdriver", "raw"])
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "attach {i} refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            break;
        }
        filled += 1;
    }
    assert!(filled < 32, "the VM took 32 more disks: no slot ran out");
    let small = &data[..(5 << 20)];
    let meta = put_known(&c, &vm.id, "/tmp/b/fallback.bin", small, &hex(small))
        .await
        .unwrap();
    assert_eq!(meta.sha256, hex(small));
    assert!(stagings(&agent, "driver-error").await >= 1.0);
    nothing_staged(&lv);
    agent.stop().await;
}

/// PUTs `path` announcing 8 MiB, sends 5 MiB and closes the connection.
async fn cut_known(addr: std::net::SocketAddr, vm: &str, path: &str) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT /v1/vms/{vm}/files?path={} HTTP/1.1\r\nhost: gve\r\nauthorization: Bearer {TOKEN}\r\n\
         content-length: {}\r\n\r\n",
        percent_encode(path),
        8 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![9u8; 5 << 20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_copy_releases_the_staged_disk_when_it_restarts() {
    let lv = Libvirtd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(&lv, dir.path());
    let mut agent = spawn_agent(&config, &dir.path().join("agent-1.log")).await;
    let c = Client::new(&agent.url, Some(TOKEN.into())).unwrap();
    let vm = started_vm(&c, "bulk-crash", 512).await;
    let data = vec![3u8; 96 << 20];
    let sha = hex(&data);
    let copy = {
        let (c, vm) = (c.clone(), vm.id.clone());
        tokio::spawn(async move { put_known(&c, &vm, "/tmp/crash.bin", &data, &sha).await })
    };
    // Killed while the disk is staged (being filled, or read in the guest).
    let t = Instant::now();
    while !pool_volumes(&lv).contains("gve-xfer") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no disk was ever staged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.child.start_kill().unwrap();
    agent.child.wait().await.unwrap();
    assert!(
        copy.await.unwrap().is_err(),
        "a copy whose agent died cannot succeed"
    );
    assert!(
        pool_volumes(&lv).contains("gve-xfer"),
        "the kill came too late to test anything"
    );

    // The restarted agent finds the interrupted copy and releases its disk.
    let agent = spawn_agent(&config, &dir.path().join("agent-2.log")).await;
    let c = Client::new(&agent.url, Some(TOKEN.into())).unwrap();
    let ops: Vec<Operation> = c.get("/v1/operations").await.unwrap();
    let op = ops
        .iter()
        .find(|o| o.kind == gve::agent::model::OpKind::CopyIn)
        .expect("the copy's operation");
    assert_eq!(op.state, OpState::Failed, "{op:?}");
    gone_within_30s(&lv, &vm.name).await;

    // The same for a copy out, which is no operation: its disk is recorded apart.
    let data = vec![5u8; 96 << 20];
    put_known(&c, &vm.id, "/tmp/out.bin", &data, &hex(&data))
        .await
        .unwrap();
    gone_within_30s(&lv, &vm.name).await;
    let copy = {
        let (c, vm) = (c.clone(), vm.id.clone());
        let url = format!("/v1/vms/{vm}/files?path=/tmp/out.bin");
        // It fails when the agent dies under it.
        tokio::spawn(async move { c.get_stream(&url).await.map(drop) })
    };
    let t = Instant::now();
    while !pool_volumes(&lv).contains("gve-xfer-out-") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no disk was ever staged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut agent = agent;
    agent.child.start_kill().unwrap();
    agent.child.wait().await.unwrap();
    copy.abort();
    assert!(
        pool_volumes(&lv).contains("gve-xfer-out-"),
        "the kill came too late"
    );
    let mut agent = spawn_agent(&config, &dir.path().join("agent-3.log")).await;
    gone_within_30s(&lv, &vm.name).await;
    // And their records are forgotten (each right after its disk went), not
    // kept to be released again at each start.
    let log = dir.path().join("agent-3.log");
    let t = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("released a staged disk left by an earlier copy")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no release was logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = recorded_disks(&dir.path().join("data/agent.redb"), &mut agent).await;
    assert!(left.is_empty(), "released disks still recorded: {left:?}");
}

/// The staged disks recorded in the registry at `path`, read once `agent` is
/// stopped (it holds the file).
async fn recorded_disks(
    path: &std::path::Path,
    agent: &mut crate::kvm::AgentProcess,
) -> Vec<(String, String)> {
    agent.child.start_kill().unwrap();
    agent.child.wait().await.unwrap();
    gve::agent::registry::Registry::open(path)
        .unwrap()
        .meta_with_prefix("bulk-disk:")
        .unwrap()
}

/// Stages a disk on `vm` by hand, as the kvm plugin does (a raw volume of the
/// lab's pool attached live), and records it in the registry as a copy's
/// release that failed leaves it.
fn leave_staged(lv: &Libvirtd, core: &gve::agent::AgentCore, vm: &gve::agent::model::Vm, id: &str) {
    let volume = format!("gve-xfer-{id}.raw");
    lv.virsh(&["vol-create-as", "gve", &volume, "4M", "--format", "raw"]);
    let path = lv.images.join(&volume);
    lv.virsh(&[
        "attach-disk",
        &vm.name,
        &path.display().to_string(),
        "vdy",
        "--live",
        "--subdriver",
        "raw",
    ]);
    core.registry
        .write(|t| t.set_meta(&format!("bulk-disk:{id}"), &vm.id))
        .unwrap();
}

/// A disk left staged on a running VM (its release failed: the guest held on
/// to it) is released by the reconcile pass that finds the VM stopped behind
/// gve's back, and its record forgotten; passes while the VM runs leave it,
/// since a copy may still use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_left_staged_is_released_when_reconcile_finds_its_vm_stopped() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = crate::guest::agent(&lv, None).await;
    let vm = running_vm(&agent, &c, "bulk-left", 256).await;
    let core = agent.core().unwrap();
    leave_staged(&lv, &core, &vm, "left-1");
    let reconcile = || async {
        let r: serde_json::Value = c
            .call(hyper::Method::POST, "/v1/reconcile", Some(&json!({})))
            .await
            .unwrap();
        r
    };
    // Passes that see the VM change but not stop (paused, then running again).
    for how in ["suspend", "resume"] {
        lv.virsh(&[how, &vm.name]);
        let r = reconcile().await;
        assert_eq!(r["changed"], json!([vm.id]), "after virsh {how}: {r}");
        assert!(pool_volumes(&lv).contains("gve-xfer-left-1"));
        assert!(lv.virsh(&["dumpxml", &vm.name]).contains("gve-xfer-left-1"));
        let recorded = core.registry.meta_with_prefix("bulk-disk:").unwrap();
        assert_eq!(recorded, [("left-1".to_string(), vm.id.clone())]);
    }

    lv.virsh(&["destroy", &vm.name]);
    let r = reconcile().await;
    assert_eq!(r["changed"], json!([vm.id]), "{r}");
    nothing_staged(&lv);
    assert!(
        core.registry
            .meta_with_prefix("bulk-disk:")
            .unwrap()
            .is_empty(),
        "the released disk's record was kept"
    );
    drop(core);
    agent.stop().await;
}

/// Waits until no staged disk is in the pool or attached to `vm`.
async fn gone_within_30s(lv: &Libvirtd, vm: &str) {
    let t = Instant::now();
    while pool_volumes(lv).contains("gve-xfer") || lv.virsh(&["dumpxml", vm]).contains("gve-xfer") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a staged disk outlived the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
