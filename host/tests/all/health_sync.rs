//! A site's health check reads an agent's whole VM listing only when it may
//! have changed: the agent tags its listing (`ETag`, moving with every VM
//! record it writes), the site asks with the tag of its last settled listing
//! (`If-None-Match`) and an unchanged agent answers 304. Changes through the
//! agent, behind its back (found by its reconcile), VMs gone missing and
//! records the site wrote itself must still be set right by the next check.

use std::time::{Duration, Instant};

use gve::agent::model::VmRecord;
use gve::api::client::{Client, Listing};
use gve::site::model::SiteVm;
use serde_json::{json, Value};

use crate::site::{env, post};
use crate::support::no_creds;

async fn listing(c: &Client, tag: Option<&str>) -> Listing<VmRecord> {
    c.get_pages_unless("/v1/vms", usize::MAX, tag)
        .await
        .unwrap()
}

/// The listing's items and tag; fails on a 304 or an untagged listing.
async fn read(c: &Client, tag: Option<&str>) -> (Vec<VmRecord>, String) {
    match listing(c, tag).await {
        Listing::Changed {
            items,
            tag: Some(t),
        } => (items, t),
        other => panic!("expected a tagged listing, got {other:?}"),
    }
}

/// The site's counts of VM listings read in full and answered unchanged.
async fn counts(admin: &Client) -> (f64, f64) {
    use http_body_util::BodyExt;
    let resp = admin.get_stream("/metrics").await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let sample = |outcome: &str| {
        let series = format!("gve_site_agent_vm_listings_total{{state=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
            .unwrap_or(0.0)
    };
    (sample("read"), sample("unchanged"))
}

/// Waits (up to 10 s) for the site's record of agent VM `agent_vm` to pass `ok`.
async fn site_record(admin: &Client, agent_vm: &str, ok: impl Fn(Option<&SiteVm>) -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let vms: Vec<SiteVm> = admin
            .get_pages("/v1/vms?all=true", usize::MAX)
            .await
            .unwrap();
        let rec = vms.iter().find(|v| v.agent_vm == agent_vm);
        if ok(rec) {
            return;
        }
        assert!(Instant::now() < end, "the site's record: {rec:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_reads_an_agents_vms_again_only_when_they_changed() {
    let e = env(2, |_| {}).await;
    let (agent, ac) = (&e.agents[0].0, &e.agents[0].1);

    // The agent's tag: matched exactly, by `*`, weakly, or in a list.
    let (_, t1) = read(ac, None).await;
    for tag in [t1.clone(), "*".into(), format!("\"x\", W/{t1}")] {
        assert!(
            matches!(listing(ac, Some(&tag)).await, Listing::Unchanged),
            "If-None-Match: {tag}"
        );
    }
    // Another agent's registry has another tag, whatever its generation.
    let (_, other) = read(&e.agents[1].1, None).await;
    assert_ne!(other, t1);
    read(&e.agents[1].1, Some(&t1)).await;

    // A VM made through the agent (behind the site) moves the tag.
    let op = crate::agent::run_op(
        ac,
        "/v1/vms",
        json!({ "name": "s-1", "main-memory-mib": 64 }),
    )
    .await;
    let vm = op.result.expect("a created VM").id;
    let (items, t2) = read(ac, Some(&t1)).await;
    assert_ne!(t2, t1);
    assert!(items.iter().any(|r| r.vm.id == vm));

    // The site adopts it, and then its checks (every 300 ms) are answered 304.
    site_record(&e.admin, &vm, |r| r.is_some()).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (read0, unchanged0) = counts(&e.admin).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (read1, unchanged1) = counts(&e.admin).await;
    assert_eq!(read1, read0, "an unchanged agent's VMs were read again");
    assert!(
        unchanged1 >= unchanged0 + 4.0,
        "{unchanged0} -> {unchanged1} checks answered unchanged"
    );

    // The site writes the record itself (as a job recording a stale operation
    // result would): the agent's tag does not move, but the next check reads
    // every VM again and puts the agent's view back within a few periods.
    let site_id = {
        let vms: Vec<SiteVm> = e
            .admin
            .get_pages("/v1/vms?all=true", usize::MAX)
            .await
            .unwrap();
        vms.into_iter().find(|v| v.agent_vm == vm).unwrap().id
    };
    let (read_before, _) = counts(&e.admin).await;
    e.site
        .core
        .store
        .write(|t| {
            let mut v = t.vm(&site_id)?.unwrap();
            v.state = "suspended".into();
            t.put_vm(&v)
        })
        .unwrap();
    site_record(&e.admin, &vm, |r| r.is_some_and(|r| r.state == "stopped")).await;
    let (read_after, _) = counts(&e.admin).await;
    assert!(read_after > read_before, "put back without a full read?");

    // Behind the agent's back: another session starts the VM; the agent's
    // reconcile finds it, the tag moves and the site follows.
    let driver: Value = ac.get("/v1/driver").await.unwrap();
    let endpoint = driver["endpoint"].as_str().unwrap().to_string();
    let behind = agent
        .plugins
        .open_driver("memory", &endpoint, no_creds())
        .await
        .unwrap();
    behind.start(&vm).await.unwrap();
    let _: Value = post(ac, "/v1/reconcile", json!({})).await.unwrap();
    let (_, t3) = read(ac, Some(&t2)).await;
    assert_ne!(t3, t2);
    site_record(&e.admin, &vm, |r| r.is_some_and(|r| r.state == "running")).await;

    // Gone behind everyone's back: missing at the site, and until it is
    // forgotten every check reads the whole listing again.
    behind.destroy(&vm).await.unwrap();
    let _: Value = post(ac, "/v1/reconcile", json!({})).await.unwrap();
    site_record(&e.admin, &vm, |r| r.is_some_and(|r| r.state == "missing")).await;
    let (read2, _) = counts(&e.admin).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (read3, _) = counts(&e.admin).await;
    assert!(
        read3 >= read2 + 3.0,
        "{read2} -> {read3}: a listing with a VM missing must be read in full"
    );
}

/// A listed VM in `state`, its UUID id and its name made from `n`.
fn listed_vm(n: usize, state: gve::agent::model::VmState) -> VmRecord {
    VmRecord {
        vm: gve::agent::model::Vm {
            id: format!("00000000-0000-4000-8000-{n:012}"),
            name: format!("bulk-{n}"),
            state,
            host: "h".into(),
            addresses: Vec::new(),
            logical_cpus: 1,
            main_memory_mib: 64,
            disk_mib: None,
            platform: None,
            os_family: None,
            os_name: None,
            is_template: false,
            labels: Default::default(),
        },
        allocation: Default::default(),
        seen_ms: 0,
        provisioned: Default::default(),
    }
}

/// A listing of thousands of VMs the site has no record of (a first check of
/// a large agent) is applied a batch of [`SYNC_BATCH`] a transaction, with a
/// pause between: other writers get in while it adopts them (in one
/// transaction, 100,000 VMs held a site's database 1.9-2.9 s). The same
/// listing again writes nothing; one with VMs gone and VMs changed writes
/// those, and is not settled while VMs are missing; one of an earlier
/// registration of the agent's id is not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_listing_is_applied_in_batches_that_let_other_writers_in() {
    use gve::agent::model::VmState;
    use gve::site::model::AgentRec;
    use gve::site::vm_sync::{apply_listing, Forgetting, Listed, SYNC_BATCH};

    let e = env(0, |_| {}).await;
    let store = e.site.core.store.clone();
    // An agent no health check reaches (its secret does not unseal): only
    // this test applies listings to its records.
    let agent = AgentRec::registered("bulk", "http://127.0.0.1:9", "not sealed".into(), None);
    store.write(|t| t.put_agent(&agent)).unwrap();
    let n = 8 * SYNC_BATCH + 17;
    let listing: Vec<VmRecord> = (0..n).map(|i| listed_vm(i, VmState::Running)).collect();
    // Applying `listing` (to be run on a blocking thread).
    let apply = |listing: Vec<VmRecord>| {
        let (store, agent) = (store.clone(), agent.clone());
        move || {
            let at = gve::site::model::now_ms();
            apply_listing(
                &store,
                &agent,
                listing.iter().map(Listed::from).collect(),
                at,
                &Forgetting {
                    after_ms: 60_000,
                    ..Default::default()
                },
            )
            .unwrap()
            .expect("the agent is registered")
        }
    };

    let (first, others) = crate::support::other_writes_during(&store, apply(listing.clone())).await;
    assert!(first.settled);
    let records = store.vms_of_agent("bulk").unwrap();
    assert_eq!(records.len(), n);
    assert!(records
        .iter()
        .all(|v| v.state == "running" && v.owner.is_none()));
    let gaps = n / SYNC_BATCH;
    assert!(
        others >= gaps / 2,
        "only {others} other writes got in during {gaps} pauses of the adoption"
    );

    // Unchanged: compared without writing anything.
    let writes = store.vm_writes("bulk");
    let again = tokio::task::spawn_blocking(apply(listing.clone()))
        .await
        .unwrap();
    assert!(again.settled);
    assert_eq!(
        store.vm_writes("bulk"),
        writes,
        "an unchanged listing wrote"
    );

    // 300 gone, 5 suspended: only those are written, and it is not settled.
    let mut changed = listing[300..].to_vec();
    for r in &mut changed[..5] {
        r.vm.state = VmState::Suspended;
    }
    let third = tokio::task::spawn_blocking(apply(changed)).await.unwrap();
    assert!(!third.settled, "VMs are missing");
    assert_eq!(store.vm_writes("bulk"), writes + 305);
    let records = store.vms_of_agent("bulk").unwrap();
    let count = |s: &str| records.iter().filter(|v| v.state == s).count();
    assert_eq!(
        (count("missing"), count("suspended"), count("running")),
        (300, 5, n - 305)
    );

    // Registered again under its id since the listing was taken: a listing of
    // the earlier registration (here: nothing listed) is not applied to it.
    let again = AgentRec {
        registered_ms: agent.registered_ms + 1,
        ..agent.clone()
    };
    store.write(|t| t.put_agent(&again)).unwrap();
    let writes = store.vm_writes("bulk");
    let stale = {
        let (store, agent) = (store.clone(), agent.clone());
        tokio::task::spawn_blocking(move || {
            let at = gve::site::model::now_ms();
            apply_listing(&store, &agent, Vec::new(), at, &Forgetting::default()).unwrap()
        })
    };
    assert!(stale.await.unwrap().is_none());
    assert_eq!(store.vm_writes("bulk"), writes);
    assert_eq!(store.vms_of_agent("bulk").unwrap().len(), n);
    e.site.stop().await;
}

/// A listing compared over several pages: a VM in none of them goes
/// `missing`, one on a later page does not. A `missing` record is forgotten
/// only once every other agent up has had a listing taken since it went
/// missing (one waiting for its turn, or applying a long listing, may be where
/// the VM moved), not on time alone. And a listing compared with one
/// registration is not applied to the agent registered again meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_vm_is_forgotten_only_once_every_other_agent_up_has_listed_since() {
    use gve::agent::model::VmState;
    use gve::site::model::{now_ms, AgentRec, AgentStatus};
    use gve::site::vm_sync::{Comparison, Forgetting, Listed};

    let e = env(0, |_| {}).await;
    let store = e.site.core.store.clone();
    // Agents no health check reaches (their secrets do not unseal).
    let a = AgentRec::registered("a", "http://127.0.0.1:9", "not sealed".into(), None);
    let mut b = AgentRec::registered("b", "http://127.0.0.1:10", "not sealed".into(), None);
    b.status = AgentStatus::Up;
    store
        .write(|t| {
            t.put_agent(&a)?;
            t.put_agent(&b)
        })
        .unwrap();
    let listed: Vec<Listed> = (0..6)
        .map(|i| Listed::from(&listed_vm(i, VmState::Running)))
        .collect();
    let records = || {
        let mut v: Vec<(String, String)> = store
            .vms_of_agent("a")
            .unwrap()
            .into_iter()
            .map(|v| (v.name, v.state))
            .collect();
        v.sort();
        v
    };
    let missing = || -> Vec<String> {
        records()
            .into_iter()
            .filter(|(_, s)| s == "missing")
            .map(|(n, _)| n)
            .collect()
    };
    // Compares `pages` of agent a's listing with its records, as a check does.
    let compare = |pages: Vec<Vec<Listed>>| {
        let (store, a) = (store.clone(), a.clone());
        tokio::task::spawn_blocking(move || {
            let mut c = Comparison::begin(&store, &a.id, &a.url, a.registered_ms)
                .unwrap()
                .expect("registered");
            for p in pages {
                c.page(p);
            }
            c
        })
    };
    // Compares and applies them.
    let apply = |pages: Vec<Vec<Listed>>, forgetting: Forgetting| {
        let (store, a) = (store.clone(), a.clone());
        let compared = compare(pages);
        async move {
            let c = compared.await.unwrap();
            // Taken after every record written before (to the ms).
            tokio::time::sleep(Duration::from_millis(2)).await;
            let at = now_ms();
            tokio::task::spawn_blocking(move || c.apply(&store, &a, at, &forgetting).unwrap())
                .await
                .unwrap()
                .expect("registered")
        }
    };
    let first = apply(vec![listed.clone()], Forgetting::default()).await;
    assert!(first.settled);
    assert_eq!(records().len(), 6);

    // Pages of 2, with bulk-0 in none: it alone goes missing.
    let pages = vec![
        listed[1..3].to_vec(),
        listed[3..5].to_vec(),
        listed[5..].to_vec(),
    ];
    let r = apply(pages.clone(), Forgetting::default()).await;
    assert!(!r.settled, "a VM is missing");
    assert_eq!(missing(), ["bulk-0"]);
    let since = store
        .vms_of_agent("a")
        .unwrap()
        .into_iter()
        .find(|v| v.name == "bulk-0")
        .unwrap()
        .updated_ms;

    // Missing long enough by the clock (no least time), but agent b, up, has
    // had no listing applied, or only one taken before bulk-0 went missing.
    for taken in [None, Some(since - 1), Some(since)] {
        let forgetting = Forgetting {
            after_ms: 0,
            taken: taken.map(|t| ("b".to_string(), t)).into_iter().collect(),
        };
        apply(pages.clone(), forgetting).await;
        assert_eq!(missing(), ["bulk-0"], "b's listing taken at {taken:?}");
    }
    // b listed since: forgotten, though not before the least time.
    let b_listed = |after_ms| Forgetting {
        after_ms,
        taken: [("b".to_string(), since + 1)].into_iter().collect(),
    };
    apply(pages.clone(), b_listed(3_600_000)).await;
    assert_eq!(missing(), ["bulk-0"]);
    apply(pages.clone(), b_listed(0)).await;
    assert_eq!(records().len(), 5, "bulk-0 is forgotten");

    // An agent down holds nothing back (it lists nothing until it is up).
    store
        .write(|t| {
            let mut b = t.agent("b")?.unwrap();
            b.status = AgentStatus::Down;
            t.put_agent(&b)
        })
        .unwrap();
    let pages = vec![listed[2..5].to_vec(), listed[5..].to_vec()];
    apply(pages.clone(), Forgetting::default()).await;
    assert_eq!(missing(), ["bulk-1"]);
    apply(pages.clone(), Forgetting::default()).await;
    assert_eq!(records().len(), 4, "bulk-1 is forgotten");

    // Registered again between the comparison and its application: nothing
    // is applied (bulk-2 would go missing), not even a listing with nothing
    // to write.
    for pages in [vec![listed[3..].to_vec()], vec![listed[2..].to_vec()]] {
        let c = compare(pages).await.unwrap();
        let again = AgentRec {
            registered_ms: a.registered_ms + 1,
            ..a.clone()
        };
        store.write(|t| t.put_agent(&again)).unwrap();
        let writes = store.vm_writes("a");
        // The check applies with the record it wrote, of the registration it
        // compared with.
        let (s, compared) = (store.clone(), a.clone());
        let got = tokio::task::spawn_blocking(move || {
            c.apply(&s, &compared, now_ms(), &Forgetting::default())
                .unwrap()
        })
        .await
        .unwrap();
        assert!(got.is_none(), "applied to a later registration");
        assert_eq!(store.vm_writes("a"), writes);
        assert!(missing().is_empty());
        store.write(|t| t.put_agent(&a)).unwrap();
    }
    e.site.stop().await;
}
