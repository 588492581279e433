//! The cost of a request does not grow with the site's history: listings are
//! paged by a stable cursor (a `Link` to the next page), a user's VMs and jobs
//! come from their own index entries, and a job's events from the by-job index,
//! which retention keeps in step and an older database gets built on open.

use std::collections::BTreeSet;

use gve::api::client::Client;
use gve::site::model::{Job, JobState, SiteVm};
use gve::site::store::Store;
use serde_json::json;

use crate::site::{env, job, post};

/// The body and the `next` link of one page, read raw.
async fn page(c: &Client, path: &str) -> (Vec<serde_json::Value>, Option<String>) {
    use http_body_util::BodyExt;
    let resp = c.get_stream(path).await.unwrap();
    let next = gve::api::page::next_link(resp.headers());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (serde_json::from_slice(&body).unwrap(), next)
}

/// The memory sums placement reads, and the counts the gauges and GLUE
/// document read, agree with the records they sum.
fn sums_agree(store: &Store) {
    let vms = store.vms().unwrap();
    // The pool index holds exactly the free VMs known clean.
    let mut pool: Vec<String> = vms
        .iter()
        .filter(|v| v.owner.is_none() && v.clean)
        .map(|v| v.id.clone())
        .collect();
    let mut indexed = store.pool_ids().unwrap();
    pool.sort();
    indexed.sort();
    assert_eq!(indexed, pool, "the pool index");
    assert_eq!(
        store.memory_by_agent().unwrap(),
        gve::site::placement::held(&vms)
    );
    type Key = (String, Option<String>, String, bool, bool);
    let mut want: std::collections::BTreeMap<Key, u64> = Default::default();
    for v in vms {
        let pooled = v.owner.is_none() && v.clean;
        *want
            .entry((v.agent, v.template, v.state, v.owner.is_some(), pooled))
            .or_default() += 1;
    }
    let got: std::collections::BTreeMap<Key, u64> = store
        .vm_tallies()
        .unwrap()
        .into_iter()
        .map(|t| ((t.agent, t.template, t.state, t.held, t.pooled), t.n))
        .collect();
    assert_eq!(got, want);
}

fn ids(items: &[serde_json::Value]) -> Vec<String> {
    items
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

async fn vm(c: &Client) -> SiteVm {
    let j = job(c, "/v1/vms", json!({ "main-memory-mib": 64 })).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    serde_json::from_value(j.result.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_paged_by_a_stable_cursor_and_hold_only_the_callers() {
    let e = env(1, |_| {}).await;
    let ann = e.user("ann", None).await;
    let bo = e.user("bo", None).await;
    let mut anns = BTreeSet::new();
    for _ in 0..7 {
        anns.insert(vm(&ann).await.id);
    }
    let bos: BTreeSet<String> = [vm(&bo).await.id, vm(&bo).await.id].into();

    // Pages of 3 in id order, each with a link to the next until the last.
    let (first, next) = page(&ann, "/v1/vms?limit=3").await;
    assert_eq!(first.len(), 3);
    let next = next.expect("a next link after a full page");
    // A VM added between pages neither repeats nor hides one listed before.
    let late = vm(&ann).await.id;
    anns.insert(late.clone());
    let (second, next2) = page(&ann, &next).await;
    let (third, next3) = page(&ann, &next2.unwrap()).await;
    let mut seen = ids(&first);
    seen.extend(ids(&second));
    seen.extend(ids(&third));
    let mut rest = next3;
    while let Some(n) = rest {
        let (p, n) = page(&ann, &n).await;
        seen.extend(ids(&p));
        rest = n;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in id order");
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no VM on two pages: {seen:?}");
    let before_late: BTreeSet<String> = anns.iter().filter(|i| **i != late).cloned().collect();
    assert!(unique.is_superset(&before_late), "{unique:?}");
    assert!(unique.is_subset(&anns), "only ann's VMs: {unique:?}");

    // The client follows the links; the last page has none.
    let all: Vec<SiteVm> = ann.get_pages("/v1/vms?limit=2", usize::MAX).await.unwrap();
    assert_eq!(
        all.iter().map(|v| v.id.clone()).collect::<BTreeSet<_>>(),
        anns
    );
    let (_, none) = page(&ann, "/v1/vms?limit=1000").await;
    assert_eq!(none, None);
    let (empty, none) = page(&ann, &format!("/v1/vms?after={}", anns.last().unwrap())).await;
    assert!(empty.is_empty() && none.is_none());
    // bo's own listing, and the admin's whole inventory in pages of 4.
    let theirs: Vec<SiteVm> = bo.get_pages("/v1/vms?limit=1", usize::MAX).await.unwrap();
    assert_eq!(
        theirs.iter().map(|v| v.id.clone()).collect::<BTreeSet<_>>(),
        bos
    );
    let inventory: Vec<SiteVm> = e
        .admin
        .get_pages("/v1/vms?all=true&limit=4", usize::MAX)
        .await
        .unwrap();
    let everyone: BTreeSet<String> = anns.union(&bos).cloned().collect();
    assert_eq!(
        inventory
            .iter()
            .map(|v| v.id.clone())
            .collect::<BTreeSet<_>>(),
        everyone
    );
    // A user asking for everything gets their own (all is for admins).
    let mine: Vec<SiteVm> = bo.get_pages("/v1/vms?all=true", usize::MAX).await.unwrap();
    assert_eq!(mine.len(), 2);
    sums_agree(&e.site.core.store);

    // Jobs: newest first, pages by `before`, the same as one big page.
    let big: Vec<Job> = ann.get("/v1/jobs?limit=1000").await.unwrap();
    assert_eq!(big.len(), 8);
    let paged: Vec<Job> = ann.get_pages("/v1/jobs?limit=3", usize::MAX).await.unwrap();
    assert_eq!(
        paged.iter().map(|j| &j.id).collect::<Vec<_>>(),
        big.iter().map(|j| &j.id).collect::<Vec<_>>()
    );
    assert!(paged.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let capped: Vec<Job> = ann.get_pages("/v1/jobs?limit=3", 5).await.unwrap();
    assert_eq!(capped.len(), 5);
    let admin_jobs: Vec<Job> = e
        .admin
        .get_pages("/v1/jobs?all=true&limit=2", usize::MAX)
        .await
        .unwrap();
    assert_eq!(admin_jobs.len(), 10);

    // Bad cursors and sizes: 400 for sizes out of range, an empty page for a
    // cursor past everything; never a 500.
    for bad in [
        "/v1/vms?limit=0",
        "/v1/vms?limit=18446744073709551615",
        "/v1/jobs?limit=-1",
    ] {
        let err = ann.get::<serde_json::Value>(bad).await.unwrap_err();
        assert_eq!(err.status, 400, "{bad}: {err}");
    }
    for odd in [
        "/v1/vms?after=%00",
        "/v1/vms?after=%FF%FE",
        "/v1/jobs?before=",
        "/v1/jobs?before=zzzz",
        "/v1/jobs?before=%00",
    ] {
        let got = ann.get::<Vec<serde_json::Value>>(odd).await;
        assert!(
            got.is_ok() || got.as_ref().unwrap_err().status == 400,
            "{odd}: {got:?}"
        );
    }
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_events_come_from_its_index_kept_by_retention_and_rebuilt_on_open() {
    let e = env(1, |c| c.job_retention_seconds = 1).await;
    let ann = e.user("ann", None).await;
    let v = vm(&ann).await;
    let mut jobs = Vec::new();
    for i in 0..6 {
        let j = job(
            &ann,
            &format!("/v1/vms/{}/exec", v.id),
            json!({ "argv": ["echo", i.to_string()] }),
        )
        .await;
        jobs.push(j.id);
    }
    let store = e.site.core.store.clone();
    let everything = store.events_after(0, usize::MAX, None).unwrap();
    assert_eq!(store.event_index_len().unwrap(), everything.len() as u64);
    for id in &jobs {
        let by_index = store.events_after(0, usize::MAX, Some(id)).unwrap();
        let by_scan: Vec<_> = everything.iter().filter(|ev| &ev.job == id).collect();
        assert!(!by_index.is_empty());
        assert_eq!(
            by_index.iter().map(|e| e.seq).collect::<Vec<_>>(),
            by_scan.iter().map(|e| e.seq).collect::<Vec<_>>()
        );
        // Resuming after an event sends only what followed it.
        let after = by_index[0].seq;
        let rest = store.events_after(after, usize::MAX, Some(id)).unwrap();
        assert_eq!(rest.len(), by_index.len() - 1);
        assert!(rest.iter().all(|ev| ev.seq > after && &ev.job == id));
        assert!(store
            .events_after(u64::MAX, 10, Some(id))
            .unwrap()
            .is_empty());
    }
    assert_eq!(e.site.core.store.owned_vm_count("ann").unwrap(), 1);

    // Retention removes events and their index entries together.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let fresh = job(
        &ann,
        &format!("/v1/vms/{}/exec", v.id),
        json!({ "argv": ["true"] }),
    )
    .await;
    e.site.core.prune_finished();
    let left = store.events_after(0, usize::MAX, None).unwrap();
    assert!(left.iter().all(|ev| ev.job == fresh.id), "{left:?}");
    assert_eq!(store.event_index_len().unwrap(), left.len() as u64);
    assert!(store
        .events_after(0, 100, Some(&jobs[0]))
        .unwrap()
        .is_empty());

    // Releasing the VM takes it out of ann's index entries.
    let r: Job = serde_json::from_value(
        post(&ann, &format!("/v1/vms/{}/release", v.id), json!({}))
            .await
            .unwrap(),
    )
    .unwrap();
    crate::site::wait_job(&ann, &r.id).await;
    assert_eq!(store.owned_vm_count("ann").unwrap(), 0);
    let mine: Vec<SiteVm> = ann.get("/v1/vms").await.unwrap();
    assert!(mine.is_empty(), "{mine:?}");
    sums_agree(&store);
    let kept = vm(&ann).await;
    // One of a template released: a fresh one replaces it in the pool, which so
    // has a VM when the indexes are rebuilt below.
    let spare = job(
        &ann,
        "/v1/vms",
        json!({ "template": "debian-12", "main-memory-mib": 64 }),
    )
    .await;
    assert_eq!(spare.state, JobState::Succeeded, "{spare:?}");
    let spare: SiteVm = serde_json::from_value(spare.result.unwrap()).unwrap();
    assert!(store.pool_ids().unwrap().is_empty());
    let r: Job = serde_json::from_value(
        post(&ann, &format!("/v1/vms/{}/release", spare.id), json!({}))
            .await
            .unwrap(),
    )
    .unwrap();
    crate::site::wait_job(&ann, &r.id).await;
    assert_eq!(store.pool_ids().unwrap().len(), 1);
    sums_agree(&store);

    // A database from before the indexes (dropped here) gets them built on open.
    let path = e.site.core.config.data_dir.join("site.redb");
    drop(store);
    let more = job(
        &ann,
        &format!("/v1/vms/{}/exec", kept.id),
        json!({ "argv": ["true"] }),
    )
    .await;
    e.site.stop().await;
    // A database from before the tallies and the pool index (the other indexes
    // built, every free VM in `vms_free`) gets them built, and `vms_free` goes.
    let pool_def: redb::TableDefinition<(u64, u64, &str, &str, &str), ()> =
        redb::TableDefinition::new("vms_pool");
    let free_def: redb::TableDefinition<&str, ()> = redb::TableDefinition::new("vms_free");
    {
        let db = redb::Database::open(&path).unwrap();
        let w = db.begin_write().unwrap();
        let tally: redb::TableDefinition<(&str, &str, &str, u8), u64> =
            redb::TableDefinition::new("vms_tally");
        assert!(w.delete_table(tally).unwrap());
        assert!(w.delete_table(pool_def).unwrap());
        w.open_table(free_def)
            .unwrap()
            .insert(kept.id.as_str(), ())
            .unwrap();
        let meta: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("meta");
        let mut m = w.open_table(meta).unwrap();
        for k in ["index:vms-tally", "index:vms-pool"] {
            assert!(m.remove(k).unwrap().is_some(), "{k}");
        }
        drop(m);
        w.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert!(!store.vm_tallies().unwrap().is_empty());
    assert_eq!(store.pool_ids().unwrap().len(), 1);
    sums_agree(&store);
    drop(store);
    {
        let db = redb::Database::open(&path).unwrap();
        let r = redb::ReadableDatabase::begin_read(&db).unwrap();
        assert!(r.open_table(free_def).is_err(), "vms_free is gone");
    }
    {
        let db = redb::Database::open(&path).unwrap();
        let w = db.begin_write().unwrap();
        let tally: redb::TableDefinition<(&str, &str, &str, u8), u64> =
            redb::TableDefinition::new("vms_tally");
        assert!(w.delete_table(tally).unwrap());
        let events: redb::TableDefinition<(&str, u64), ()> =
            redb::TableDefinition::new("job_events_by_job");
        assert!(w.delete_table(events).unwrap());
        for t in ["vms_by_owner", "vms_by_agent", "vms_by_agent_vm"] {
            let def: redb::TableDefinition<(&str, &str), ()> = redb::TableDefinition::new(t);
            assert!(w.delete_table(def).unwrap(), "{t}");
        }
        assert!(w.delete_table(pool_def).unwrap());
        let lease: redb::TableDefinition<(u64, &str), ()> =
            redb::TableDefinition::new("vms_by_lease");
        assert!(w.delete_table(lease).unwrap());
        let memory: redb::TableDefinition<&str, u128> =
            redb::TableDefinition::new("vms_memory_by_agent");
        assert!(w.delete_table(memory).unwrap());
        let meta: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("meta");
        let mut m = w.open_table(meta).unwrap();
        for k in [
            "index:job-events",
            "index:vms",
            "index:vms-tally",
            "index:vms-pool",
        ] {
            assert!(m.remove(k).unwrap().is_some(), "{k}");
        }
        drop(m);
        w.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let evs = store.events_after(0, 100, Some(&more.id)).unwrap();
    assert!(
        evs.iter().any(|ev| ev.state == JobState::Succeeded),
        "{evs:?}"
    );
    assert_eq!(
        store.event_index_len().unwrap(),
        store.events_after(0, usize::MAX, None).unwrap().len() as u64
    );
    let page = store.vms_page(Some("ann"), None, 10).unwrap();
    assert_eq!(
        page.items.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        [kept.id.as_str()]
    );
    assert!(!page.more);
    // Its lease is indexed again: due at its deadline, not before.
    let until = page.items[0].lease.unwrap().until_ms;
    assert!(store.leases_due(until - 1).unwrap().is_empty());
    assert_eq!(store.leases_due(until).unwrap().len(), 1);
    sums_agree(&store);

    // A stale index entry (an older binary wrote the record after the index was
    // built) never shows one user's VM to another: readers check the record.
    drop(store);
    {
        let db = redb::Database::open(&path).unwrap();
        let w = db.begin_write().unwrap();
        let owners: redb::TableDefinition<(&str, &str), ()> =
            redb::TableDefinition::new("vms_by_owner");
        w.open_table(owners)
            .unwrap()
            .insert(("bo", kept.id.as_str()), ())
            .unwrap();
        w.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let bos = store.vms_page(Some("bo"), None, 10).unwrap();
    assert!(bos.items.is_empty() && !bos.more, "{bos:?}");
    assert_eq!(
        store.vms_page(Some("ann"), None, 10).unwrap().items.len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_listings_are_paged_and_the_sites_health_check_reads_every_page() {
    use gve::agent::model::{OpState, Operation, VmRecord};
    let e = env(1, |_| {}).await;
    let ac = &e.agents[0].1;
    // One more than a default page (1000) and then some, made on the agent
    // behind the site's back (8 at a time): the site's health check adopts them.
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let c = ac.clone();
        workers.spawn(async move {
            let mut made = Vec::new();
            for i in (w..1003).step_by(8) {
                let body = json!({ "name": format!("bulk-{i:04}"), "main-memory-mib": 64 });
                made.push(crate::agent::run_op(&c, "/v1/vms", body).await);
            }
            made
        });
    }
    let made: Vec<Operation> = workers.join_all().await.into_iter().flatten().collect();
    assert_eq!(made.len(), 1003);
    assert!(made.iter().all(|o| o.state == OpState::Succeeded));
    let on_agent: Vec<VmRecord> = ac.get_pages("/v1/vms", usize::MAX).await.unwrap();
    assert!(on_agent.len() >= 1003, "{}", on_agent.len());

    // A default page holds 1000 and links to the rest.
    let (first, next) = page(ac, "/v1/vms").await;
    assert_eq!(first.len(), 1000);
    let next = next.expect("a link after a full default page");
    let (rest, none) = page(ac, &next).await;
    assert_eq!((first.len() + rest.len(), none), (on_agent.len(), None));

    // Pages of 2 in id order; the VM a cursor names going away between pages
    // neither ends the listing nor repeats a VM.
    let (p1, n1) = page(ac, "/v1/vms?limit=2").await;
    let vm_ids = |page: &[serde_json::Value]| -> Vec<String> {
        page.iter()
            .map(|r| r["vm"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    let cursor = vm_ids(&p1)[1].clone();
    let gone = crate::agent::run_op(ac, &format!("/v1/vms/{cursor}/destroy"), json!({})).await;
    assert_eq!(gone.state, OpState::Succeeded, "{gone:?}");
    let (p2, _) = page(ac, &n1.unwrap()).await;
    let (a, b) = (vm_ids(&p1), vm_ids(&p2));
    assert!(a[0] < a[1] && a[1] < b[0] && b[0] < b[1], "{a:?} {b:?}");
    assert_eq!(b, vm_ids(&first)[2..4], "the page after a gone cursor");

    // Operations page the same way, in id order.
    let ops: Vec<Operation> = ac
        .get_pages("/v1/operations?limit=300", usize::MAX)
        .await
        .unwrap();
    let op_ids: BTreeSet<&str> = ops.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(op_ids.len(), ops.len(), "no operation on two pages");
    assert!(made.iter().all(|o| op_ids.contains(o.id.as_str())));
    assert!(ops.windows(2).all(|w| w[0].id < w[1].id));

    // Limits out of range are refused; a cursor past the end is an empty last page.
    for bad in [
        "/v1/vms?limit=0",
        "/v1/vms?limit=100001",
        "/v1/operations?limit=-1",
    ] {
        let err = ac.get::<Vec<serde_json::Value>>(bad).await.unwrap_err();
        assert_eq!(err.status, 400, "{bad}: {err:?}");
    }
    let (empty, none) = page(ac, "/v1/vms?after=%7E%7E%7E").await;
    assert!(empty.is_empty() && none.is_none());

    // The site sees every VM on every page, not the first 1000.
    let wanted = on_agent.len() - 1;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let all: Vec<SiteVm> = e
            .admin
            .get_pages("/v1/vms?all=true", usize::MAX)
            .await
            .unwrap();
        let live = all.iter().filter(|v| v.state != "missing").count();
        if live == wanted
            && all
                .iter()
                .all(|v| v.agent_vm != cursor || v.state == "missing")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the site holds {live} live VMs of the agent's {wanted}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    e.site.stop().await;
}

/// Follows `path`'s `Link`s to the end; the `name`/`id` field of every item, in order.
async fn keys_of_pages(c: &Client, path: &str, key: &str) -> Vec<String> {
    let (mut keys, mut next) = (Vec::new(), Some(path.to_string()));
    while let Some(p) = next {
        let (items, n) = page(c, &p).await;
        assert!(
            n.is_none() || !items.is_empty(),
            "an empty page links on: {p}"
        );
        keys.extend(items.iter().map(|i| i[key].as_str().unwrap().to_string()));
        next = n;
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_listings_of_users_and_agents_are_paged_in_name_order() {
    let e = env(3, |_| {}).await;
    let mut names = BTreeSet::new();
    for n in ["zoe", "ann", "mia", "bo", "kai"] {
        e.user(n, None).await;
        names.insert(n.to_string());
    }
    let everyone: Vec<String> = e
        .site
        .core
        .store
        .users()
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert!(names.iter().all(|n| everyone.contains(n)), "{everyone:?}");

    // Pages of 2, each linking to the next: every user once, in name order.
    let (first, next) = page(&e.admin, "/v1/users?limit=2").await;
    assert_eq!(first.len(), 2);
    assert!(next.is_some(), "a full first page links on");
    let listed = keys_of_pages(&e.admin, "/v1/users?limit=2", "name").await;
    let mut sorted = everyone.clone();
    sorted.sort();
    assert_eq!(listed, sorted);
    // The client follows them too (the CLI's `gve user list`).
    let all: Vec<gve::site::model::UserView> = e
        .admin
        .get_pages("/v1/users?limit=2", usize::MAX)
        .await
        .unwrap();
    assert_eq!(all.len(), everyone.len());

    let agents = keys_of_pages(&e.admin, "/v1/agents?limit=2", "id").await;
    assert_eq!(agents, ["a-0", "a-1", "a-2"]);
    let (after, next) = page(&e.admin, "/v1/agents?after=a-1").await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["id"], "a-2");
    assert!(next.is_none());

    // Out-of-range limits are refused; the listings stay admin-only.
    for bad in [
        "/v1/users?limit=0",
        "/v1/agents?limit=100001",
        "/v1/users?limit=x",
    ] {
        let err = e.admin.get::<serde_json::Value>(bad).await.unwrap_err();
        assert_eq!(err.status, 400, "{bad}: {err:?}");
    }
    let ivy = e.user("ivy", None).await;
    for path in ["/v1/users?limit=1", "/v1/agents?limit=1"] {
        let err = ivy.get::<serde_json::Value>(path).await.unwrap_err();
        assert_eq!(err.status, 403, "{path}: {err:?}");
    }
    e.site.stop().await;
}
