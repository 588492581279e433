//! The xen driver on a real Xen 4.17 nested under QEMU (dom0's libvirtd, libxl
//! driver), through the agent's HTTP API; `xl` in dom0 is the referee. The tests share
//! one nested Xen per process (`gve_harness::xen::shared`) and take turns on it.
//! They are CI's Xen tier (`scripts/test.sh --tier xen`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gve::agent::model::{OpState, Operation, Vm, VmRecord, VmState};
use gve::api::client::Client;
use gve::plugin::{Grants, Limits, PluginSpec};
use gve_harness::xen::{NestedXen, TEMPLATE};
use serde_json::json;

use crate::agent::{post, run_op, start_agent, wait_op};
use crate::support::bundle;

/// The xen plugin granted `xen.uri`, graceful shutdowns given 20 s.
pub fn xen_spec(xen: &NestedXen) -> PluginSpec {
    let mut grants = Grants {
        libvirt: vec![xen.uri.clone()],
        ..Default::default()
    };
    grants.config.insert("storage-pool".into(), "gve".into());
    grants
        .config
        .insert("shutdown-timeout-ms".into(), "20000".into());
    PluginSpec {
        bundle: bundle("xen"),
        grants,
        limits: Limits {
            call_timeout_ms: 60_000,
            ..Default::default()
        },
    }
}

pub(crate) async fn record(c: &Client, vm: &str) -> VmRecord {
    c.get::<VmRecord>(&format!("/v1/vms/{vm}")).await.unwrap()
}

async fn vms(c: &Client) -> Vec<VmRecord> {
    c.get("/v1/vms").await.unwrap()
}

/// Asserts the registry and Xen agree on every VM whose name starts with
/// `prefix`: running in gve is running (or blocked) in `xl list`, suspended is
/// paused, stopped is absent; and no such domain runs that gve does not know. Xen
/// tears a domain down a moment after libvirt reports it off, so this waits up to
/// 10 s for agreement.
pub(crate) async fn agrees_with_xl(c: &Client, xen: &NestedXen, prefix: &str, step: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match disagreement(c, xen, prefix).await {
            None => return,
            Some(why) if Instant::now() > end => panic!("{step}: {why}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

async fn disagreement(c: &Client, xen: &NestedXen, prefix: &str) -> Option<String> {
    let xl: BTreeMap<String, String> = xen
        .xl_list()
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .collect();
    let ours: BTreeMap<String, VmState> = vms(c)
        .await
        .into_iter()
        .filter(|r| r.vm.name.starts_with(prefix))
        .map(|r| (r.vm.name, r.vm.state))
        .collect();
    for (name, state) in &ours {
        let letters = xl.get(name).map(String::as_str);
        let agrees = match state {
            VmState::Running => letters.is_some_and(|l| l == "r" || l == "b"),
            VmState::Suspended => letters.is_some_and(|l| l.contains('p')),
            VmState::Stopped => letters.is_none(),
            _ => false,
        };
        if !agrees {
            return Some(format!(
                "gve has {name} {state:?}, xl list has {letters:?} (xl: {xl:?})"
            ));
        }
    }
    xl.keys()
        .find(|name| !ours.contains_key(*name))
        .map(|name| format!("Xen runs {name}, which gve does not know ({ours:?})"))
}

/// Waits (up to `secs`) for the VM's console to show `text`.
pub(crate) fn console_shows(xen: &NestedXen, vm: &str, text: &str, secs: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if xen.console(vm).contains(text) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn volumes(xen: &NestedXen) -> Vec<String> {
    xen.virsh(&["vol-list", "gve"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

async fn create(c: &Client, name: &str) -> Vm {
    let op = run_op(
        c,
        "/v1/vms",
        json!({ "name": name, "template": TEMPLATE, "main-memory-mib": 128,
                "logical-cpus": 1 }),
    )
    .await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    op.result.unwrap()
}

async fn act(c: &Client, vm: &str, action: &str, body: serde_json::Value) -> Operation {
    run_op(c, &format!("/v1/vms/{vm}/{action}"), body).await
}

async fn ok(c: &Client, vm: &str, action: &str, body: serde_json::Value) -> Vm {
    let op = act(c, vm, action, body).await;
    assert_eq!(op.state, OpState::Succeeded, "{action}: {op:?}");
    op.result.unwrap_or_else(|| panic!("{action} gave no VM"))
}

/// Makes libxl's teardown of a domain `secs` longer while it lives: dom0's block
/// hotplug script sleeps before it removes a disk.
struct SlowTeardown<'a>(&'a NestedXen);

impl<'a> SlowTeardown<'a> {
    fn new(xen: &'a NestedXen, secs: u32) -> SlowTeardown<'a> {
        let out = xen.shell(&format!(
            "cd /etc/xen/scripts && {{ [ -e block.gve-real ] || cp block block.gve-real; }} && \
             printf '#!/bin/sh\\n[ \"$1\" = remove ] && sleep {secs}\\nexec /etc/xen/scripts/block.gve-real \"$@\"\\n' > block && \
             chmod +x block && echo slowed"
        ));
        assert!(out.contains("slowed"), "{out}");
        SlowTeardown(xen)
    }
}

impl Drop for SlowTeardown<'_> {
    fn drop(&mut self) {
        self.0
            .shell("cd /etc/xen/scripts && mv -f block.gve-real block");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_a_nested_xen_agrees_with_xl() {
    let xen = gve_harness::xen::shared();
    xen.clear("xl-");
    let (_agent, c, _dir) = start_agent("xen", xen_spec(&xen), &xen.uri, 1000).await;
    let templates: Vec<serde_json::Value> = c.get("/v1/templates").await.unwrap();
    assert!(
        templates.iter().any(|t| t["name"] == TEMPLATE),
        "{templates:?}"
    );
    // Host facts are Xen's own (`xl info` in dom0).
    let host: serde_json::Value = c.get("/v1/host").await.unwrap();
    let xl_info = xen.shell("xl info");
    let fact = |key: &str| -> u64 {
        xl_info
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == key))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("xl info has no {key}: {xl_info}"))
    };
    assert_eq!(host["hypervisor-kind"], "xen", "{host}");
    assert_eq!(host["logical-cpus"], fact("nr_cpus"), "{host}");
    assert_eq!(host["main-memory-mib"], fact("total_memory"), "{host}");
    let free = host["free-memory-mib"].as_u64().unwrap();
    assert!(
        free.abs_diff(fact("free_memory")) <= 8,
        "{host} vs {xl_info}"
    );

    // Create: a full copy of the template's raw disk, a PV domain, stopped.
    let vm = create(&c, "xl-a").await;
    assert_eq!((vm.state, vm.main_memory_mib), (VmState::Stopped, 128));
    assert!(volumes(&xen).contains(&"xl-a-disk0.img".into()));
    let xml = xen.virsh(&["dumpxml", "xl-a"]);
    assert!(xml.contains("<driver name='phy' type='raw'/>"), "{xml}");
    assert!(xml.contains("machine='xenpv'"), "{xml}");
    agrees_with_xl(&c, &xen, "xl-", "after create").await;

    // Start: Xen runs it as a PV guest and its console says so.
    let v = ok(&c, &vm.id, "start", json!({})).await;
    assert_eq!(v.state, VmState::Running);
    agrees_with_xl(&c, &xen, "xl-", "after start").await;
    assert!(
        console_shows(&xen, "xl-a", "GVE-XEN-GUEST-READY PV", 60),
        "console: {}",
        xen.console("xl-a")
    );
    // Wrong state: a second start is refused, nothing changes.
    let e = post(&c, &format!("/v1/vms/{}/start", vm.id), json!({}))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (409, "invalid-state"), "{e}");

    let v = ok(&c, &vm.id, "suspend", json!({})).await;
    assert_eq!(v.state, VmState::Suspended);
    agrees_with_xl(&c, &xen, "xl-", "after suspend").await;
    let v = ok(&c, &vm.id, "resume", json!({})).await;
    assert_eq!(v.state, VmState::Running);
    agrees_with_xl(&c, &xen, "xl-", "after resume").await;

    // The libxl driver has no guest agent channel: guest operations are refused,
    // saying why.
    let e = post(
        &c,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["true"] }),
    )
    .await
    .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (501, "unsupported"), "{e}");
    assert!(e.message.contains("guest"), "{e}");

    // A graceful shutdown: the guest powers itself off (its kernel says so on the
    // console) well before the 20 s deadline would force it. libxl's teardown of
    // the domain is slowed by 3 s: libvirt reports it shut off meanwhile, and Xen
    // still has it. The shutdown ends once the teardown has: Xen no longer lists
    // it, and a clone of it right after finds it torn down.
    let slow = SlowTeardown::new(&xen, 3);
    let t = Instant::now();
    let v = ok(&c, &vm.id, "shutdown", json!({ "force": false })).await;
    let took = t.elapsed();
    let xl = xen.xl_list();
    drop(slow);
    assert_eq!(v.state, VmState::Stopped);
    assert!(
        !xl.contains_key("xl-a"),
        "Xen still has it: {xl:?} ({took:?})"
    );
    assert!(took < Duration::from_secs(18), "{took:?}");
    assert!(
        took >= Duration::from_secs(3),
        "the teardown was not slowed: {took:?}"
    );
    assert!(
        console_shows(&xen, "xl-a", "reboot: System halted", 5),
        "the guest did not power itself off: {}",
        xen.console("xl-a")
    );
    agrees_with_xl(&c, &xen, "xl-", "after shutdown").await;

    // Clone: full (raw disks have no overlays), and a linked clone is refused.
    let b = ok(
        &c,
        &vm.id,
        "clone",
        json!({ "name": "xl-b", "linked": false }),
    )
    .await;
    assert_eq!((b.name.as_str(), b.state), ("xl-b", VmState::Stopped));
    assert!(volumes(&xen).contains(&"xl-b-disk0.img".into()));
    let e = post(
        &c,
        &format!("/v1/vms/{}/clone", vm.id),
        json!({ "name": "xl-c", "linked": true }),
    )
    .await
    .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (501, "unsupported"), "{e}");
    let v = ok(&c, &b.id, "start", json!({})).await;
    assert_eq!(v.state, VmState::Running);
    agrees_with_xl(&c, &xen, "xl-", "after clone and start").await;
    // Wrong state and unknown domain.
    let e = post(&c, &format!("/v1/vms/{}/resume", b.id), json!({}))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (409, "invalid-state"), "{e}");
    let e = post(&c, "/v1/vms/no-such-domain/start", json!({}))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (404, "not-found"), "{e}");

    // Destroy both (one running): gone from gve, from Xen, from libvirt, disks too.
    for id in [&vm.id, &b.id] {
        let op = run_op(&c, &format!("/v1/vms/{id}/destroy"), json!({})).await;
        assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    }
    agrees_with_xl(&c, &xen, "xl-", "after destroy").await;
    assert!(vms(&c).await.iter().all(|r| !r.vm.name.starts_with("xl-")));
    let all = xen.virsh(&["list", "--all", "--name"]);
    assert!(!all.contains("xl-"), "{all}");
    let vols = volumes(&xen);
    assert!(vols.iter().all(|v| !v.starts_with("xl-")), "{vols:?}");
    assert!(vols.contains(&"tiny-base.img".into()), "{vols:?}");
}

/// Waits (up to 15 s) for the registry to show `vm` in `state`.
pub(crate) async fn registry_shows(c: &Client, vm: &str, state: VmState) -> bool {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if record(c, vm).await.vm.state == state {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A guest that powered itself off while libxl's teardown of it is slow (10 s),
/// destroyed with a call budget of 6 s: the destroy ends `timeout` and keeps the
/// VM's disk and definition (none is deleted under a domain Xen still holds);
/// asked again once the teardown has ended, it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_during_a_slow_teardown_keeps_the_disks_until_it_ends() {
    let xen = gve_harness::xen::shared();
    xen.clear("xt-");
    let mut spec = xen_spec(&xen);
    spec.limits.call_timeout_ms = 6_000;
    let (_agent, c, _dir) = start_agent("xen", spec, &xen.uri, 1000).await;
    let vm = create(&c, "xt-a").await;
    // Started behind gve's back: a cold start may take longer than this budget.
    xen.virsh(&["start", "xt-a"]);
    let slow = SlowTeardown::new(&xen, 10);
    let out = xen.shell("xl shutdown xt-a && echo asked");
    assert!(out.contains("asked"), "{out}");
    // Shut off for libvirt, still torn down (its id kept).
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let info = xen.virsh(&["dominfo", "xt-a"]);
        if info.contains("shut off") {
            assert!(!info.contains("Id:             -"), "not slowed: {info}");
            break;
        }
        assert!(Instant::now() < end, "never shut off: {info}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let op = act(&c, &vm.id, "destroy", json!({})).await;
    let e = op.error.clone().unwrap_or_else(|| panic!("{op:?}"));
    assert_eq!(
        (op.state, e.kind.as_str()),
        (OpState::Failed, "timeout"),
        "{op:?}"
    );
    assert!(e.message.contains("its disks are kept"), "{e:?}");
    assert!(volumes(&xen).contains(&"xt-a-disk0.img".into()));
    drop(slow);
    let end = Instant::now() + Duration::from_secs(30);
    while !xen
        .virsh(&["dominfo", "xt-a"])
        .contains("Id:             -")
    {
        assert!(Instant::now() < end, "the teardown never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let op = act(&c, &vm.id, "destroy", json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert!(!volumes(&xen).contains(&"xt-a-disk0.img".into()));
    let all = xen.virsh(&["list", "--all", "--name"]);
    assert!(!all.contains("xt-a"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_with_xl_in_dom0_reach_the_registry() {
    let xen = gve_harness::xen::shared();
    xen.clear("xo-");
    let (_agent, c, _dir) = start_agent("xen", xen_spec(&xen), &xen.uri, 500).await;
    let vm = create(&c, "xo-a").await;
    ok(&c, &vm.id, "start", json!({})).await;
    assert!(console_shows(&xen, "xo-a", "GVE-XEN-GUEST-READY", 60));

    // `xl destroy` behind gve's back: the reconcile loop sees it stopped.
    let out = xen.shell("xl destroy xo-a && echo destroyed");
    assert!(out.contains("destroyed"), "{out}");
    assert!(
        registry_shows(&c, &vm.id, VmState::Stopped).await,
        "{:?}",
        record(&c, &vm.id).await.vm
    );
    agrees_with_xl(&c, &xen, "xo-", "after xl destroy").await;

    // `xl shutdown` (the guest powers off when Xen asks): seen too.
    ok(&c, &vm.id, "start", json!({})).await;
    assert!(console_shows(&xen, "xo-a", "GVE-XEN-GUEST-READY", 60));
    let out = xen.shell("xl shutdown -w xo-a && echo down");
    assert!(out.contains("down"), "{out}");
    assert!(registry_shows(&c, &vm.id, VmState::Stopped).await);
    agrees_with_xl(&c, &xen, "xo-", "after xl shutdown").await;

    // A domain undefined by another libvirt client: it vanishes from the registry.
    xen.virsh(&["undefine", "xo-a"]);
    let end = Instant::now() + Duration::from_secs(15);
    while vms(&c).await.iter().any(|r| r.vm.id == vm.id) {
        assert!(
            Instant::now() < end,
            "xo-a never vanished from the registry"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events: Vec<serde_json::Value> = c.get("/v1/events").await.unwrap();
    for kind in ["vm-state-changed", "vm-vanished"] {
        assert!(
            events.iter().any(|e| e["kind"] == kind && e["vm"] == vm.id),
            "no {kind} event: {events:?}"
        );
    }
    xen.virsh(&["vol-delete", "--pool", "gve", "xo-a-disk0.img"]);
}

/// Starts dom0's libvirtd when dropped, unless it runs.
struct Revive<'a>(&'a NestedXen);

impl Drop for Revive<'_> {
    fn drop(&mut self) {
        if self.0.try_virsh(&["version"]).is_err() {
            self.0.shell("gve-libvirtd start; sleep 2");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dom0_libvirtd_killed_or_gone_gives_typed_errors_in_time() {
    let xen = gve_harness::xen::shared();
    // However this ends, dom0's libvirtd is up again for the next test.
    let _revive = Revive(&xen);
    xen.clear("xk-");
    let (_agent, c, _dir) = start_agent("xen", xen_spec(&xen), &xen.uri, 500).await;
    let vm = create(&c, "xk-a").await;

    // libvirtd killed while it starts the domain.
    let op: Operation = serde_json::from_value(
        post(&c, &format!("/v1/vms/{}/start", vm.id), json!({}))
            .await
            .unwrap(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    xen.shell("gve-libvirtd kill");
    let killed = Instant::now();
    let op = wait_op(&c, &op.id).await;
    let took = killed.elapsed();
    assert_eq!(op.state, OpState::Failed, "{op:?}");
    let err = op.error.unwrap();
    assert_eq!(err.kind, "unavailable", "{err:?}");
    assert!(
        took < Duration::from_secs(10),
        "failed {took:?} after the kill"
    );

    // While it is gone: operations fail `unavailable` at once, and the reconcile
    // loop keeps the VMs it cannot see (it cannot tell gone from unreachable).
    let before = record(&c, &vm.id).await.vm;
    let t = Instant::now();
    let op = act(&c, &vm.id, "start", json!({})).await;
    assert_eq!(op.state, OpState::Failed, "{op:?}");
    assert_eq!(op.error.unwrap().kind, "unavailable");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(record(&c, &vm.id).await.vm, before);
    eprintln!(
        "xk-a while libvirtd is gone: gve {:?}, xl {:?}",
        before.state,
        xen.xl_list()
    );

    // libvirtd back: the same session reconnects, and the registry agrees with
    // Xen again (whatever the interrupted start left).
    xen.shell("gve-libvirtd start");
    let end = Instant::now() + Duration::from_secs(60);
    while xen.try_virsh(&["version"]).is_err() {
        assert!(Instant::now() < end, "dom0's libvirtd did not come back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let libvirt = xen.virsh(&["domstate", "xk-a"]);
    let (ours, xl) = (record(&c, &vm.id).await.vm.state, xen.xl_list());
    eprintln!("xk-a after libvirtd came back: gve {ours:?}, libvirt {libvirt:?}, xl {xl:?}");
    // gve reports what libvirt knows.
    let expected = match libvirt.trim() {
        "shut off" => VmState::Stopped,
        "running" | "idle" => VmState::Running,
        "paused" => VmState::Suspended,
        other => panic!("libvirt says {other}"),
    };
    assert!(
        registry_shows(&c, &vm.id, expected).await,
        "gve {ours:?}, libvirt {libvirt}"
    );
    if expected == VmState::Stopped && xl.contains_key("xk-a") {
        // Killed in the middle of building the domain: libxl (inside libvirtd) left
        // it half-made and paused in Xen, and the restarted libvirtd does not know
        // it. Starting the VM then fails, saying so, until the operator runs
        // `xl destroy` (plugins/xen/README.md).
        let op = act(&c, &vm.id, "start", json!({})).await;
        eprintln!("xk-a start with the orphan: {op:?}");
        assert_eq!(op.state, OpState::Failed, "{op:?}");
        let err = op.error.unwrap();
        assert!(err.message.contains("xl destroy xk-a"), "{err:?}");
        xen.shell("xl destroy xk-a");
    }
    agrees_with_xl(&c, &xen, "xk-", "after libvirtd came back").await;
    if record(&c, &vm.id).await.vm.state == VmState::Stopped {
        ok(&c, &vm.id, "start", json!({})).await;
    }
    agrees_with_xl(&c, &xen, "xk-", "after start").await;
    let op = run_op(&c, &format!("/v1/vms/{}/destroy", vm.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    agrees_with_xl(&c, &xen, "xk-", "after destroy").await;
    assert!(volumes(&xen).iter().all(|v| !v.starts_with("xk-")));
}
