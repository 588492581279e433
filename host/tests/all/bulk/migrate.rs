//! A migration and a copy through a staged disk on the same VM: the migration
//! waits until the copy has released its disk, so no staged disk travels with the
//! VM, and the copy is not cut under it.

use std::time::{Duration, Instant};

use gve::agent::model::{OpState, Operation};
use gve::api::percent_encode;
use gve_harness::Libvirtd;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::nothing_staged;
use crate::agent::{post, start_agent, wait_op_within, TOKEN};
use crate::guest::{agent_with, running_vm};
use crate::kvm::{kvm_spec, migrating_spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_waits_for_a_staged_copy_and_takes_no_disk_along() {
    let (a, b) = (Libvirtd::start(), Libvirtd::start());
    let dest = b.migration_uri();
    let (agent_a, ca, _da) = agent_with(&a, None, migrating_spec(&a, &b, &[])).await;
    let (agent_b, _cb, _db) = start_agent("kvm", kvm_spec(&b), &b.uri, 300).await;
    let vm = running_vm(&agent_a, &ca, "bulk-mig", 256).await;

    // A copy of 8 MiB whose client sends 5 MiB, then pauses: its disk is staged
    // and attached, and the copy holds its turn at the VM.
    let size = 8 << 20;
    let mut s = tokio::net::TcpStream::connect(agent_a.addr).await.unwrap();
    let head = format!(
        "PUT /v1/vms/{}/files?path={} HTTP/1.1\r\nhost: gve\r\nauthorization: Bearer {TOKEN}\r\n\
         content-length: {size}\r\n\r\n",
        vm.id,
        percent_encode("/tmp/mig.bin"),
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![7u8; 5 << 20]).await.unwrap();
    let t = Instant::now();
    while !a.virsh(&["dumpxml", "bulk-mig"]).contains("gve-xfer") {
        assert!(t.elapsed() < Duration::from_secs(30), "no disk was staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The migration waits for the copy.
    let op: Operation = serde_json::from_value(
        post(
            &ca,
            &format!("/v1/vms/{}/migrate", vm.id),
            json!({ "destination": dest, "live": true }),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    // Longer than a migration of this guest takes (about 3 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let waiting: Operation = ca.get(&format!("/v1/operations/{}", op.id)).await.unwrap();
    assert_eq!(waiting.state, OpState::Running, "{waiting:?}");
    assert!(
        a.virsh(&["list", "--name"])
            .lines()
            .any(|l| l.trim() == "bulk-mig"),
        "the VM left while its copy was staged"
    );

    // The rest of the body: the copy ends whole, then the migration goes.
    s.write_all(&vec![7u8; size - (5 << 20)]).await.unwrap();
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut reply))
        .await
        .expect("the copy answered")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).to_string();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let op = wait_op_within(&ca, &op.id, Duration::from_secs(120)).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");

    // Nothing staged went along or stayed behind.
    let moved = b.virsh(&["dumpxml", "bulk-mig"]);
    assert!(moved.contains("<domain"), "{moved}");
    assert!(
        !moved.contains("gve-xfer"),
        "a staged disk migrated: {moved}"
    );
    nothing_staged(&a);
    agent_a.stop().await;
    agent_b.stop().await;
}
