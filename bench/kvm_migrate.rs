//! Live migration of a running QEMU/KVM guest between two private libvirtds on
//! this machine, through gve (a site job → the source agent's operation → the kvm
//! plugin → libvirt) against `virsh migrate --live` between the same two daemons
//! with the same flags (persistent at the destination, undefined at the source,
//! shared storage), in two modes: managed (the client drives each step on both
//! daemons) and peer-to-peer (the source's libvirtd drives it: the kvm plugin's
//! `peer-to-peer = true`, `virsh migrate --p2p`). The guest goes back and forth;
//! migrations alternate the two paths (gve, virsh, virsh, gve, ...).
//!
//! - **Total:** from the request until the site's job succeeded (gve; the user
//!   long-polls the job) or until virsh returned.
//! - **Downtime:** what QEMU measured as the time the guest stood still, as the
//!   destination's libvirt reports it for the completed incoming migration
//!   (`virsh domjobinfo --completed`, "Total downtime"); the same reading for both
//!   paths.
//! - **Hand-over:** of that downtime, the time from the source's end of the
//!   migration to the destination's Finish arriving ("Total downtime" − "Downtime
//!   w/o network"): in managed mode the client's step from Perform to Finish, the one
//!   part of the downtime the client (gve or virsh) takes part in.
//!
//! After a virsh migration (out of band for gve) both agents reconcile and the
//! bench waits until the site's record follows the VM, so the next gve migration
//! starts from where the VM is. Writes bench/results/kvm-migrate.md;
//! `bash bench/run.sh kvm_migrate`; GVE_MIGRATE_ROUNDS migrations per path and
//! mode (default 6).

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::SiteVm;
use gve_harness::Libvirtd;
use hyper::Method;
use serde_json::{json, Value};

use common::{cores, median_iqr, ms, publish, quartiles, today};

const ADMIN: &str = "bench-site-admin-0123456789";
const AGENT: &str = "bench-agent-token-0123456789";

/// A kvm agent with guest-install on `lv` that may migrate to `other` (shared
/// storage: both daemons see each other's pool).
async fn agent(
    lv: &Libvirtd,
    other: &Libvirtd,
    p2p: bool,
) -> (gve::agent::Agent, Client, tempfile::TempDir) {
    let (own, dest) = (lv.migration_uri(), other.migration_uri());
    common::kvm_guest_agent(lv, AGENT, move |config| {
        let kvm = config.plugins.get_mut("kvm").expect("the kvm plugin");
        kvm.grants.libvirt.push(dest);
        kvm.grants
            .config
            .insert("shared-storage".into(), "true".into());
        kvm.grants
            .config
            .insert("peer-to-peer".into(), p2p.to_string());
        if let Some(d) = config.driver.as_mut() {
            d.migration_uri = Some(own);
            d.reconcile_period_ms = 5_000;
        }
    })
    .await
}

/// "Total downtime" of the last incoming migration of `name` on `lv`, and of it the
/// hand-over ("Total downtime" − "Downtime w/o network"), in ms. libvirt leaves the
/// latter out when it could not tell the hosts' clock offset, or when the downtime
/// was no longer than it: no hand-over then.
fn downtime_ms(lv: &Libvirtd, name: &str) -> (f64, Option<f64>) {
    let out = lv.virsh(&["domjobinfo", "--completed", name]);
    let field = |key: &str| {
        out.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?;
            rest.trim().strip_suffix("ms")?.trim().parse::<f64>().ok()
        })
    };
    let total = field("Total downtime:")
        .unwrap_or_else(|| panic!("no downtime in domjobinfo of {name}:\n{out}"));
    let hand_over = field("Downtime w/o network:").map(|w| total - w);
    (total, hand_over)
}

/// Waits until the site places VM `id` on agent `on` (its health sync follows an
/// out-of-band migration).
async fn site_follows(user: &Client, id: &str, on: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let v: SiteVm = user.get(&format!("/v1/vms/{id}")).await.unwrap();
        if v.agent == on && v.state == "running" {
            return;
        }
        assert!(
            Instant::now() < end,
            "the site did not follow to {on}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    gve::libvirt_log::route_to_log();
    let rounds: usize = std::env::var("GVE_MIGRATE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let status = std::process::Command::new("bash")
        .arg(gve_harness::root().join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success());
    let hosts = [Libvirtd::start(), Libvirtd::start()];
    hosts[0].see_pool_of(&hosts[1]);
    hosts[1].see_pool_of(&hosts[0]);
    let managed = measure(&hosts, false, rounds).await;
    let p2p = measure(&hosts, true, rounds).await;
    write(rounds, managed, p2p);
}

/// One mode's samples by `[direction][path][measure]`: direction 0 is a → b,
/// path 0 gve (1 virsh), measure 0 the total (1 the downtime, 2 its hand-over).
type Measured = [[[Vec<Duration>; 3]; 2]; 2];

/// `rounds` migrations per path through a fresh site and agents, peer-to-peer or
/// driven by the client (gve's libvirt client, virsh).
async fn measure(hosts: &[Libvirtd; 2], p2p: bool, rounds: usize) -> Measured {
    let (agent_a, ca, _da) = agent(&hosts[0], &hosts[1], p2p).await;
    let (agent_b, cb, _db) = agent(&hosts[1], &hosts[0], p2p).await;
    let agent_clients = [&ca, &cb];
    let ids = ["a", "b"];

    let dir = tempfile::tempdir().unwrap();
    let agents = [(ids[0], agent_a.addr), (ids[1], agent_b.addr)];
    let (site, admin) = common::site_over(dir.path(), ADMIN, 500, &agents, AGENT).await;
    let quota = json!({ "vms": 1, "logical-cpus": 1, "main-memory-mib": 128 });
    let user = common::site_user(&admin, "grid-user", quota).await;
    let j = common::site_job(
        &user,
        "/v1/vms",
        json!({ "template": "tiny", "main-memory-mib": 128, "lease-seconds": 86_400 }),
    )
    .await;
    let id = j.result.unwrap()["id"].as_str().unwrap().to_string();
    let vm: SiteVm = user.get(&format!("/v1/vms/{id}")).await.unwrap();
    let mut on = ids.iter().position(|a| *a == vm.agent).unwrap();
    eprintln!("{} ({}) is running on agent {}", vm.id, vm.name, vm.agent);
    // Let the guest settle after its boot.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut got: Measured = Default::default();
    for i in 0..2 * rounds {
        let to = 1 - on;
        let through_gve = matches!(i % 4, 0 | 3);
        let t = Instant::now();
        if through_gve {
            common::site_job(
                &user,
                &format!("/v1/vms/{id}/migrate"),
                json!({ "to": ids[to], "live": true }),
            )
            .await;
        } else {
            let dest = hosts[to].migration_uri();
            let live = ["--live", "--persistent", "--undefinesource", "--unsafe"];
            let mode: &[&str] = if p2p { &["--p2p"] } else { &[] };
            let args = [&["migrate"][..], &live, mode, &[&vm.name, &dest]].concat();
            common::virsh(&hosts[on].uri, &args).await;
        }
        let took = t.elapsed();
        let (down, hand_over) = downtime_ms(&hosts[to], &vm.name);
        let down = Duration::from_secs_f64(down / 1000.0);
        let hand_over = hand_over.map(|h| Duration::from_secs_f64(h / 1000.0));
        eprintln!(
            "migration {i} ({}{}) {} -> {}: {took:?}, downtime {down:?}, hand-over {hand_over:?}",
            if through_gve { "gve" } else { "virsh" },
            if p2p { ", p2p" } else { "" },
            ids[on],
            ids[to]
        );
        let path = usize::from(!through_gve);
        got[on][path][0].push(took);
        got[on][path][1].push(down);
        // A migration without the reading is left out of the hand-over's median
        // (counted in the results).
        got[on][path][2].extend(hand_over);
        if !through_gve {
            for c in agent_clients {
                let _: Value = c
                    .call(Method::POST, "/v1/reconcile", Some(&json!({})))
                    .await
                    .unwrap();
            }
        }
        site_follows(&user, &id, ids[to]).await;
        on = to;
        // The next migration starts from a quiet machine.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    common::site_job(&user, &format!("/v1/vms/{id}/release"), json!({})).await;
    site.stop().await;
    agent_a.stop().await;
    agent_b.stop().await;
    got
}

/// Both directions' samples of one path and measure.
fn pooled(m: &Measured, path: usize, measure: usize) -> Vec<Duration> {
    [&m[0][path][measure][..], &m[1][path][measure][..]].concat()
}

fn write(rounds: usize, managed: Measured, p2p: Measured) {
    let mut md = String::from(
        "# KVM: live migration through gve vs `virsh migrate --live` between the same two libvirtds\n\n",
    );
    md += &format!(
        "Measured {} on {} cores: two private libvirt 9.0 daemons on this machine, QEMU 10 under \
         TCG, the tiny guest (128 MiB, 1 vCPU, running, idle after boot), shared storage (each \
         daemon has a pool on the other's directory). Through gve: the user's `POST \
         /v1/vms/{{id}}/migrate` to the site, which runs it as a job on the source agent (kvm \
         plugin, libvirt's migration with LIVE, PERSIST_DEST, UNDEFINE_SOURCE, UNSAFE); \
         the total ends when the user's long-poll sees the job succeed. virsh: `virsh migrate \
         --live --persistent --undefinesource --unsafe`, until it returns. Two modes, each with \
         a fresh site and agents: **managed** (the client, gve's libvirt client or virsh, drives \
         each step on both daemons: `virDomainMigrate3`) and **peer-to-peer** (the kvm plugin's \
         `peer-to-peer = true`, virsh `--p2p`: the source's libvirtd drives the destination \
         itself). Downtime: QEMU's own, \
         as the destination's libvirt reports the completed migration (`virsh domjobinfo \
         --completed`, Total downtime), for both paths. Median and IQR of {rounds} migrations \
         per path and mode, alternating, the guest going back and forth. Produced by `bash bench/run.sh \
         kvm_migrate`.\n\n",
        today(),
        cores()
    );
    md += "| mode | measure | through gve: median (IQR) | virsh: median (IQR) | gve − virsh (medians) |\n|---|---|---|---|---|\n";
    let modes = [("managed", &managed), ("peer-to-peer", &p2p)];
    for (mode, m) in modes {
        for (k, name) in ["total", "downtime (QEMU's)"].into_iter().enumerate() {
            let (g, v) = (pooled(m, 0, k), pooled(m, 1, k));
            let diff = ms(quartiles(g.clone()).0) - ms(quartiles(v.clone()).0);
            let pct = 100.0 * diff / ms(quartiles(v.clone()).0).max(f64::MIN_POSITIVE);
            md += &format!(
                "| {mode} | {name} | {} | {} | {diff:+.0} ms ({pct:+.1}%) |\n",
                median_iqr(g),
                median_iqr(v)
            );
        }
    }
    // The two directions take different times (one host's pool is the other's
    // directory): a pooled median lands on either, so compare per direction.
    md += "\nPer direction (median of each path's migrations that way). Hand-over: of the \
           downtime, the time from the source's end of the migration to the destination's \
           Finish arriving (libvirt's Total downtime − Downtime w/o network); in managed mode, \
           the client's step from Perform to Finish.\n\n\
           | mode | direction | total gve / virsh | downtime gve / virsh | hand-over gve / virsh |\n|---|---|---|---|---|\n";
    for (mode, m) in modes {
        for (d, direction) in ["a → b", "b → a"].into_iter().enumerate() {
            // NaN (shown as such) for a hand-over libvirt never reported.
            let med = |path: usize, k: usize| {
                let v = &m[d][path][k];
                if v.is_empty() {
                    f64::NAN
                } else {
                    ms(quartiles(v.clone()).0)
                }
            };
            let (tg, tv, dg, dv) = (med(0, 0), med(1, 0), med(0, 1), med(1, 1));
            let (hg, hv) = (med(0, 2), med(1, 2));
            md += &format!(
                "| {mode} | {direction} | {tg:.0} / {tv:.0} ms ({:+.1}%) | {dg:.0} / {dv:.0} ms ({:+.0} ms) | {hg:.1} / {hv:.1} ms ({:+.1} ms) |\n",
                100.0 * (tg - tv) / tv.max(f64::MIN_POSITIVE),
                dg - dv,
                hg - hv
            );
        }
    }
    let count = |k: usize| {
        modes
            .iter()
            .flat_map(|(_, m)| m.iter().flatten())
            .map(|measures| measures[k].len())
            .sum::<usize>()
    };
    md += &format!(
        "\nThe hand-over was read in {} of {} migrations (libvirt leaves it out when it cannot \
         tell the hosts' clock offset).\n",
        count(2),
        count(1)
    );
    publish("kvm-migrate.md", &md);
}
