//! Fair scheduling on real QEMU guests: a tenant who floods the site with long
//! commands neither delays another tenant's request nor a lease's expiry, and is
//! told `429` with `Retry-After` once their queue is full.

use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::{Job, JobState, SiteVm, UserView};
use gve::site::{Site, SiteConfig};
use gve_harness::Libvirtd;
use hyper::Method;
use serde_json::{json, Value};

use crate::agent::TOKEN as AGENT_TOKEN;
use crate::e2e::kvm_agent;
use crate::site::{post, ADMIN};

/// Waits up to `within` for a job to end.
pub async fn ended(c: &Client, id: &str, within: Duration) -> Job {
    let end = Instant::now() + within;
    loop {
        let j: Job = c.get(&format!("/v1/jobs/{id}")).await.unwrap();
        if j.state.is_terminal() {
            return j;
        }
        assert!(
            Instant::now() < end,
            "job {id} did not end in {within:?}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn submit(c: &Client, path: &str, body: Value) -> Job {
    serde_json::from_value(post(c, path, body).await.unwrap()).unwrap()
}

/// Requests a tiny VM, which the request ends with usable: its id.
pub async fn usable_vm(c: &Client) -> String {
    let j = submit(
        c,
        "/v1/vms",
        json!({ "template": "tiny", "main-memory-mib": 192, "lease-seconds": 3600 }),
    )
    .await;
    let j = ended(c, &j.id, Duration::from_secs(120)).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let result = j.result.unwrap();
    assert_eq!(result["ready"], true, "{result}");
    let vm = result["id"].as_str().unwrap().to_string();
    let j = submit(
        c,
        &format!("/v1/vms/{vm}/exec"),
        json!({ "argv": ["true"] }),
    )
    .await;
    let j = ended(c, &j.id, Duration::from_secs(60)).await;
    assert_eq!(
        j.state,
        JobState::Succeeded,
        "a ready VM runs commands: {j:?}"
    );
    vm
}

/// A site in this process with one kvm agent (its own libvirtd) registered as
/// `kvm`.
pub struct KvmSite {
    pub site: Site,
    pub admin: Client,
    pub agent: gve::agent::Agent,
    _lv: Libvirtd,
    _dir: tempfile::TempDir,
}

pub async fn kvm_site(tune: impl FnOnce(&mut SiteConfig)) -> KvmSite {
    let lv = Libvirtd::start();
    let dir = tempfile::tempdir().unwrap();
    let agent = kvm_agent(&lv, &lv, &dir.path().join("agent")).await;
    let mut config = SiteConfig::new(dir.path().join("site"), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_period_ms = 500;
    tune(&mut config);
    let site = Site::start(config).await.unwrap();
    let admin = Client::new(&format!("http://{}", site.addr), Some(ADMIN.into())).unwrap();
    let _: Value = post(
        &admin,
        "/v1/agents",
        json!({ "id": "kvm", "url": format!("http://{}", agent.addr), "token": AGENT_TOKEN }),
    )
    .await
    .unwrap();
    KvmSite {
        site,
        admin,
        agent,
        _lv: lv,
        _dir: dir,
    }
}

impl KvmSite {
    /// Creates a user and returns a client with their token.
    pub async fn user(&self, name: &str) -> Client {
        let u: UserView = self
            .admin
            .call(Method::POST, "/v1/users", Some(&json!({ "name": name })))
            .await
            .unwrap();
        Client::new(self.admin.base(), u.token).unwrap()
    }

    pub async fn stop(self) {
        self.site.stop().await;
        self.agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_delays_neither_another_tenant_nor_a_lease_expiry() {
    // Two run slots, one per user at most; six jobs may wait per user.
    let ks = kvm_site(|config| {
        config.parallel_jobs = 2;
        config.max_running_jobs_per_user = 1;
        config.max_queued_jobs_per_user = 6;
    })
    .await;
    let admin = &ks.admin;
    let flood = ks.user("flood").await;
    let other = ks.user("other").await;
    let fvm = usable_vm(&flood).await;

    // The flood: minute-long commands until the site says no more.
    let long = json!({ "argv": ["sleep", "60"], "timeout-ms": 100_000 });
    let mut accepted = Vec::new();
    let refused = loop {
        match post(&flood, &format!("/v1/vms/{fvm}/exec"), long.clone()).await {
            Ok(j) => accepted.push(serde_json::from_value::<Job>(j).unwrap()),
            Err(e) => break e,
        }
        assert!(
            accepted.len() <= 7,
            "the queue limit was never applied: {accepted:?}"
        );
    };
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.kind, "too-many-jobs", "{refused:?}");
    assert!(
        refused
            .retry_after_s
            .is_some_and(|s| (1..=300).contains(&s)),
        "429 without a usable Retry-After: {refused:?}"
    );
    // One runs, six wait (the first may not have left the queue when the last came).
    assert!((6..=7).contains(&accepted.len()), "{}", accepted.len());

    // Another tenant's request runs in the free slot at once, not after the flood.
    let started = Instant::now();
    let ovm = usable_vm(&other).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(50),
        "the other tenant waited {took:?} behind the flood"
    );
    let mut queued = Vec::new();
    for j in &accepted {
        queued.push(
            flood
                .get::<Job>(&format!("/v1/jobs/{}", j.id))
                .await
                .unwrap(),
        );
    }
    assert!(
        queued
            .iter()
            .filter(|j| j.state == JobState::Queued)
            .count()
            >= 5,
        "the flood's jobs should still wait: {queued:?}"
    );

    // Now every user slot is taken by a minute-long command; the flooder's lease
    // runs out. Its expiry runs in the system lane and stops the VM on time.
    let busy = submit(&other, &format!("/v1/vms/{ovm}/exec"), long.clone()).await;
    let end = Instant::now() + Duration::from_secs(10);
    while other
        .get::<Job>(&format!("/v1/jobs/{}", busy.id))
        .await
        .unwrap()
        .state
        == JobState::Queued
    {
        assert!(
            Instant::now() < end,
            "the other tenant's command never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: SiteVm = post(
        &flood,
        &format!("/v1/vms/{fvm}/renew"),
        json!({ "seconds": 1 }),
    )
    .await
    .map(|v| serde_json::from_value(v).unwrap())
    .unwrap();
    let expiry_started = Instant::now();
    let end = expiry_started + Duration::from_secs(40);
    loop {
        let v: SiteVm = admin.get(&format!("/v1/vms/{fvm}")).await.unwrap();
        if v.state == "stopped" {
            break;
        }
        assert!(
            Instant::now() < end,
            "the expired VM was not stopped within 40 s while users' commands held every slot: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "fairness: other tenant's VM usable after {took:?}; expired VM stopped {:?} after its deadline",
        expiry_started.elapsed()
    );
    // The other tenant's command is still running: it was not displaced.
    let b: Job = other.get(&format!("/v1/jobs/{}", busy.id)).await.unwrap();
    assert_eq!(b.state, JobState::Running, "{b:?}");
    ks.stop().await;
}
