//! A kvm live migration cut off at its worst moment, on real QEMU guests
//! under two private libvirtds.

use gve::agent::model::{OpKind, OpState, Operation, VmRecord};
use gve::agent::registry::Registry;
use serde_json::json;

use crate::agent::{run_op, wait_op, TOKEN};
use crate::kvm::migrating_spec;
use gve_harness::Libvirtd;

/// The first disk file in a domain's XML.
fn disk_file(xml: &str) -> String {
    let at = xml.find("<source file='").expect("a file-backed disk") + "<source file='".len();
    xml[at..].split('\'').next().unwrap().to_string()
}

/// In managed mode the agent drives each step of a live migration; one killed
/// after the destination resumed the VM and before the source's confirm leaves
/// it running there and a paused copy here, both defined, for good (seen once
/// in `agent_crash` under load: the VM listed by both agents). Staged on real
/// guests: the same domain (its own copy of the disk: two QEMUs may not open
/// one) runs on the destination, the copy here is paused, and the agent's
/// database holds the migration as running. The restarted agent finishes it:
/// the copy here is gone with its definition (its disk kept: the VM there may
/// run on it), the operation succeeds with the VM on the destination, and the
/// agent no longer lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_cut_off_after_the_destination_resumed_is_finished_on_restart() {
    let (a, b) = (Libvirtd::start(), Libvirtd::start());
    let spec = migrating_spec(&a, &b, &[]);
    let (agent, c, dir) = crate::agent::start_agent("kvm", spec.clone(), &a.uri, 600_000).await;
    let vm = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "cut-1", "template": "tiny" }),
    )
    .await
    .result
    .expect("a created VM");
    let xml = a.virsh(&["dumpxml", "--inactive", "cut-1"]);
    let disk = disk_file(&xml);
    let copy = format!("{disk}.there");
    std::fs::copy(&disk, &copy).unwrap();
    let there = dir.path().join("there.xml");
    std::fs::write(&there, xml.replace(&disk, &copy)).unwrap();
    b.virsh(&["define", there.to_str().unwrap()]);
    b.virsh(&["start", "cut-1"]);
    let op = run_op(&c, &format!("/v1/vms/{}/start", vm.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    a.virsh(&["suspend", "cut-1"]);
    agent.stop().await;

    // What a kill -9 between the two steps leaves in the agent's database.
    let cut = Operation {
        id: uuid::Uuid::new_v4().to_string(),
        kind: OpKind::Migrate,
        vm: vm.id.clone(),
        params: json!({ "destination": b.migration_uri(), "live": true }),
        state: OpState::Running,
        result: None,
        output: None,
        error: None,
        created_ms: gve::agent::model::now_ms(),
        finished_ms: None,
    };
    Registry::open(&dir.path().join("agent.redb"))
        .unwrap()
        .write(|t| t.put_op(&cut))
        .unwrap();

    let (agent, c) = gve_harness::agent::start_in(
        dir.path(),
        "kvm",
        spec,
        &a.uri,
        TOKEN,
        gve_harness::agent::reconcile_every(600_000),
    )
    .await;
    let op = wait_op(&c, &cut.id).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert_eq!(op.result.expect("the VM there").id, vm.id);
    assert_eq!(
        c.get::<VmRecord>(&format!("/v1/vms/{}", vm.id))
            .await
            .unwrap_err()
            .status,
        404,
        "the agent still lists the VM it migrated"
    );
    assert!(
        a.virsh(&["list", "--all", "--name"])
            .lines()
            .all(|l| l.trim() != "cut-1"),
        "the paused copy is still defined here"
    );
    assert_eq!(b.virsh(&["domstate", "cut-1"]).trim(), "running");
    assert!(std::path::Path::new(&disk).exists(), "the disk was deleted");
    agent.stop().await;
    b.virsh(&["destroy", "cut-1"]);
}
