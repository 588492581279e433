//! The kvm driver carries a template's processor to the VMs made from it (real
//! QEMU guests under TCG, a private libvirtd).

use gve::agent::model::OpState;
use serde_json::json;

use crate::agent::{run_op, start_agent};
use crate::kvm::{guest_sh, kvm_spec, wait_for_guest_agent};
use gve_harness::Libvirtd;

/// The `<cpu ...>` start tag of `vm`'s definition, if it has one.
fn cpu_tag(lv: &Libvirtd, vm: &str) -> Option<String> {
    let xml = lv.virsh(&["dumpxml", "--inactive", vm]);
    let at = xml.find("<cpu")?;
    Some(xml[at..at + xml[at..].find('>')? + 1].to_string())
}

/// A template's processor reaches the VMs made from it: created from it, and
/// cloned from one of those. Before, every VM got the hypervisor's default CPU
/// (QEMU's `qemu64` here; on a KVM host a grid job lost AVX and AES) whatever
/// the operator's template said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_templates_cpu_reaches_the_vms_made_from_it() {
    let lv = Libvirtd::start();
    // libvirt writes the default out: `qemu64` under TCG.
    let tiny = lv.virsh(&["dumpxml", "--inactive", "tiny"]);
    let cut = |xml: &str, from: &str, to: &str, with: &str| {
        let (a, b) = (xml.find(from).unwrap(), xml.find(to).unwrap() + to.len());
        format!("{}{with}{}", &xml[..a], &xml[b..])
    };
    let max = cut(&tiny, "<uuid>", "</uuid>", "");
    let max = cut(&max, "<cpu", "</cpu>", "<cpu mode='maximum'/>")
        .replace("<name>tiny</name>", "<name>tiny-max</name>");
    let file = lv.images.join("../tiny-max.xml");
    std::fs::write(&file, max).unwrap();
    lv.virsh(&["define", &file.display().to_string()]);
    let (agent, c, _dir) = start_agent("kvm", kvm_spec(&lv), &lv.uri, 60_000).await;

    let made = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "cpu-max", "template": "tiny-max" }),
    )
    .await;
    assert_eq!(made.state, OpState::Succeeded, "{made:?}");
    let plain = run_op(
        &c,
        "/v1/vms",
        json!({ "name": "cpu-plain", "template": "tiny" }),
    )
    .await;
    assert_eq!(plain.state, OpState::Succeeded, "{plain:?}");
    let (max_vm, plain_vm) = (made.result.unwrap(), plain.result.unwrap());
    let template = cpu_tag(&lv, "tiny-max").unwrap();
    assert!(template.starts_with("<cpu mode='maximum'"), "{template}");
    assert_eq!(cpu_tag(&lv, "cpu-max").as_deref(), Some(template.as_str()));
    // libvirt's default, written out, keeps its `check='none'` (under TCG libvirt
    // would say so anyway; a KVM host would check a VM's `qemu64` and could
    // refuse it: `domain::tests` asserts the check is carried).
    assert_eq!(
        cpu_tag(&lv, "cpu-plain").as_deref(),
        Some("<cpu mode='custom' match='exact' check='none'>")
    );
    let cloned = run_op(
        &c,
        &format!("/v1/vms/{}/clone", max_vm.id),
        json!({ "name": "cpu-max-2", "linked": true }),
    )
    .await;
    assert_eq!(cloned.state, OpState::Succeeded, "{cloned:?}");
    assert_eq!(
        cpu_tag(&lv, "cpu-max-2").as_deref(),
        Some(template.as_str())
    );

    // The guest sees it: TCG's `max` model has SHA instructions, `qemu64` not.
    let driver = agent.core().unwrap().driver.clone();
    for vm in [&max_vm, &plain_vm] {
        let op = run_op(&c, &format!("/v1/vms/{}/start", vm.id), json!({})).await;
        assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    }
    let mut seen = Vec::new();
    for vm in [&max_vm, &plain_vm] {
        wait_for_guest_agent(&driver, &vm.id).await;
        let (code, out) = guest_sh(&driver, &vm.id, "grep -c -w sha_ni /proc/cpuinfo").await;
        seen.push((code, out.trim().to_string()));
    }
    assert_eq!(
        seen,
        [(0, "1".to_string()), (1, "0".to_string())],
        "sha_ni in the guests of cpu-max and cpu-plain"
    );
    for vm in [&max_vm, &plain_vm] {
        run_op(&c, &format!("/v1/vms/{}/destroy", vm.id), json!({})).await;
    }
    agent.stop().await;
}
