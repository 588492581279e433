//! Bulk copies staged by a driver (contract 0.1.1, `gve:hypervisor/bulk`): the kvm
//! driver's raw disk attached live to a real running guest, its bytes written and
//! read through libvirt streams, seen by the guest; and what a caller may not do.

use std::time::{Duration, Instant};

use gve::plugin::{ErrorKind, Grants, PluginError};
use gve_harness::Libvirtd;
use sha2::{Digest, Sha256};

use crate::kvm::{guest_sh, kvm_spec, wait_for_guest_agent};
use crate::support::{host, no_creds, spec};

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
    lv.virsh(&["pool-refresh", "gve"]);
    lv.virsh(&["vol-list", "gve"])
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
    assert!(
        !pool_volumes(&lv).contains("gve-xfer"),
        "{}",
        pool_volumes(&lv)
    );

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
    assert!(
        !pool_volumes(&lv).contains("gve-xfer"),
        "{}",
        pool_volumes(&lv)
    );
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
