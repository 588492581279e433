//! Copy-out through a staged disk, attacked: a file rewritten while it is copied
//! must not arrive as if whole, and a client that stops reading must not hold the
//! VM's guest turn, the plugin instance and the staged disk for ever.

use std::time::{Duration, Instant};

use gve_harness::Libvirtd;
use serde_json::json;

use super::pool_volumes;
use crate::agent::TOKEN;
use crate::guest::{download, exec, running_vm, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_out_is_cut_when_the_file_changes_or_the_client_stops_reading() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = crate::guest::agent(&lv, None).await;
    let vm = running_vm(&agent, &c, "bulk-out", 256).await;
    exec(
        &c,
        &vm.id,
        json!({ "argv": ["sh", "-c", "head -c 12582912 /dev/urandom > /tmp/f.bin && head -c 41943040 /dev/zero > /tmp/z.bin"] }),
    )
    .await;

    // A loop in the guest rewrites the file's first bytes in place (same size) all
    // along: the guest's hash and the disk's bytes differ, and the download must
    // not end as if complete.
    exec(
        &c,
        &vm.id,
        json!({ "argv": ["sh", "-c", "(i=0; while :; do i=$((i+1)); printf %08d $i | dd of=/tmp/f.bin bs=8 count=1 conv=notrunc 2>/dev/null; done) >/dev/null 2>&1 & echo $! > /tmp/loop.pid"] }),
    )
    .await;
    let d = download(&c, &vm.id, "/tmp/f.bin").await;
    let (got, announced, failed) = (d.size, d.announced, d.cut);
    eprintln!("a file rewritten during the copy: {got} of {announced} bytes, cut: {failed}");
    assert!(
        failed || got < announced,
        "a file changed during the copy arrived as if whole ({got} bytes)"
    );
    exec(
        &c,
        &vm.id,
        json!({ "argv": ["sh", "-c", "kill $(cat /tmp/loop.pid)"] }),
    )
    .await;
    // Unchanged, the same file arrives whole.
    let d = download(&c, &vm.id, "/tmp/f.bin").await;
    let (got, announced, failed) = (d.size, d.announced, d.cut);
    assert!(!failed && got == announced && got == 12 << 20, "{got}");

    // A client that asks for 40 MiB and reads nothing: more than sockets and the
    // agent's pipeline hold, so the copy waits on it, and is cut after
    // BODY_WRITE_TIMEOUT. Until then the staged disk exists; after it, it is
    // released and the VM's guest turn is free again.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let head = format!(
        "GET /v1/vms/{}/files?path=%2Ftmp%2Fz.bin HTTP/1.1\r\nhost: gve\r\nauthorization: Bearer {TOKEN}\r\n\r\n",
        vm.id
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut first))
        .await
        .expect("no answer within 60 s")
        .unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    let stalled = Instant::now();
    tokio::time::sleep(gve::api::BODY_WRITE_TIMEOUT - Duration::from_secs(5)).await;
    assert!(
        pool_volumes(&lv).contains("gve-xfer"),
        "the disk went before the stall timeout: {}",
        pool_volumes(&lv)
    );
    let limit = gve::api::BODY_WRITE_TIMEOUT + Duration::from_secs(20);
    while pool_volumes(&lv).contains("gve-xfer") {
        assert!(
            stalled.elapsed() < limit,
            "a client that reads nothing still holds the staged disk after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "a stalled download released its disk after {:?}",
        stalled.elapsed()
    );
    let t = Instant::now();
    let out = exec(&c, &vm.id, json!({ "argv": ["echo", "free"] })).await;
    assert_eq!(text(&out.stdout_b64), "free\n");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(s);
    agent.stop().await;
}
