//! kill -9 of real `gve agent run` processes (kvm on private libvirtds, tiny QEMU
//! guests) at random points while 100 mixed jobs run through a `gve site run`
//! process, and of the site and an agent together; afterwards every job and
//! operation has ended, libvirt holds no domain or disk that no agent knows, and
//! the site, the agents and libvirt agree on every VM, its owner and its state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gve::agent::model::{OpState, Operation, VmRecord};
use gve::api::client::Client;
use gve::site::model::{Job, JobKind, SiteVm, UserView};
use gve_harness::Libvirtd;
use hyper::Method;
use serde_json::{json, Value};

use crate::agent::TOKEN as AGENT_TOKEN;
use crate::site::ADMIN;
use crate::site_crash::{crash_seed, Rng};
use crate::support::{bundle, spawn_service, Service};

/// The test's directory, removed at the end unless kept.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if std::env::var_os("GVE_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One agent process: its config, log, fixed address and libvirtd.
struct AgentSlot {
    id: &'static str,
    config: PathBuf,
    log: PathBuf,
    url: String,
    process: Option<Service>,
}

impl AgentSlot {
    /// Writes the config of a kvm agent on `lv` (with guest-install, migration to
    /// `other`) listening on a fixed loopback port, so the site finds it again
    /// after each restart.
    fn new(id: &'static str, lv: &Libvirtd, other: &Libvirtd, dir: &Path) -> AgentSlot {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = dir.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata-dir = \"data\"\nadmin-token = \"{token}\"\n\
                 [plugins.kvm]\nbundle = \"{kvm}\"\n[plugins.kvm.grants]\nlibvirt = [\"{uri}\", \"{other}\"]\n\
                 [plugins.kvm.grants.config]\nstorage-pool = \"gve\"\nshutdown-timeout-ms = \"2000\"\nshared-storage = \"true\"\n\
                 [plugins.kvm.limits]\ncall-timeout-ms = 120000\n\
                 [plugins.guest-install]\nbundle = \"{gi}\"\n[plugins.guest-install.grants]\nguest-channel = true\n\
                 [plugins.guest-install.limits]\ncall-timeout-ms = 120000\n\
                 [driver]\nplugin = \"kvm\"\nendpoint = \"{uri}\"\nguest-plugin = \"guest-install\"\n\
                 migration-uri = \"{mig}\"\nreconcile-period-ms = 1000\n",
                token = AGENT_TOKEN,
                kvm = bundle("kvm").display(),
                gi = bundle("guest-install").display(),
                uri = lv.uri,
                other = other.migration_uri(),
                mig = lv.migration_uri(),
            ),
        )
        .unwrap();
        AgentSlot {
            id,
            log: dir.join("agent.log"),
            config,
            url: format!("http://127.0.0.1:{port}"),
            process: None,
        }
    }

    async fn start(&mut self) {
        let p = spawn_service("agent", &self.config, &self.log).await;
        assert_eq!(
            p.url, self.url,
            "the agent listens where the site expects it"
        );
        self.process = Some(p);
    }

    async fn kill(&mut self) {
        let mut p = self.process.take().unwrap();
        p.child.kill().await.unwrap(); // SIGKILL
    }

    fn client(&self) -> Client {
        Client::new(&self.url, Some(AGENT_TOKEN.into())).unwrap()
    }
}

/// A job to submit for one of the user's VMs, by its state; `None` asks for a VM.
fn pick_job(vm: &SiteVm, rng: &mut Rng, n: usize) -> (String, Value, Option<&'static [u8]>) {
    let other = if vm.agent == "a" { "b" } else { "a" };
    let p = |action: &str| format!("/v1/vms/{}/{action}", vm.id);
    match vm.state.as_str() {
        "running" => match rng.below(9) {
            0 | 1 => (p("exec"), json!({ "argv": ["echo", "crash"] }), None),
            2 => (
                format!("/v1/vms/{}/files?path=/tmp/crash-{n}", vm.id),
                Value::Null,
                Some(b"data that must arrive whole".as_slice()),
            ),
            3 => (p("copy-out"), json!({ "path": "/etc/hostname" }), None),
            4 => (p("shutdown"), json!({}), None),
            5 => (p("suspend"), json!({}), None),
            6 => (p("migrate"), json!({ "to": other, "live": true }), None),
            7 => (p("clone"), json!({ "name": format!("cl-{n}") }), None),
            _ => (p("release"), json!({}), None),
        },
        "stopped" => match rng.below(3) {
            0 => (p("start"), json!({}), None),
            1 => (p("clone"), json!({ "name": format!("cl-{n}") }), None),
            _ => (p("release"), json!({}), None),
        },
        "suspended" | "paused" => (p("resume"), json!({}), None),
        _ => (p("release"), json!({}), None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agents_during_100_mixed_jobs_leaves_no_orphan_and_all_agree() {
    let (la, lb) = (Libvirtd::start(), Libvirtd::start());
    // Shared storage: each host sees the other's disks (a migrated VM's stays
    // where it was made).
    la.see_pool_of(&lb);
    lb.see_pool_of(&la);
    // Kept with GVE_KEEP_TEST_DIR set, to read the logs.
    let dir = DirGuard(tempfile::tempdir().unwrap().keep());
    eprintln!("test directory {}", dir.0.display());
    let mut agents = [
        AgentSlot::new("a", &la, &lb, dir.0.as_path()),
        AgentSlot::new("b", &lb, &la, dir.0.as_path()),
    ];
    for a in agents.iter_mut() {
        a.start().await;
    }
    let site_config = dir.0.as_path().join("site.toml");
    std::fs::write(
        &site_config,
        format!("listen = \"127.0.0.1:0\"\ndata-dir = \"site\"\nadmin-token = \"{ADMIN}\"\nhealth-period-ms = 300\nparallel-jobs = 8\nready-timeout-seconds = 60\n"),
    )
    .unwrap();
    let site_log = dir.0.as_path().join("site.log");
    let mut site = spawn_service("site", &site_config, &site_log).await;
    let admin = |s: &Service| Client::new(&s.url, Some(ADMIN.into())).unwrap();
    for a in &agents {
        let _: Value = admin(&site)
            .call(
                Method::POST,
                "/v1/agents",
                Some(&json!({ "id": a.id, "url": a.url, "token": AGENT_TOKEN })),
            )
            .await
            .unwrap();
    }
    // At most 5 VMs at a time: 2 cores boot tiny guests under TCG.
    let u: UserView = admin(&site)
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "grid", "quota": { "logical-cpus": 100, "main-memory-mib": 100000, "vms": 5 } })))
        .await
        .unwrap();
    let token = u.token.unwrap();

    let seed = crash_seed("agent crash test");
    let mut rng = Rng(seed);
    let logs = |agents: &[AgentSlot]| {
        let mut text = std::fs::read_to_string(&site_log).unwrap_or_default();
        for a in agents {
            text += &format!("\n--- agent {} ---\n", a.id);
            text += &std::fs::read_to_string(&a.log).unwrap_or_default();
        }
        text
    };
    let mut accepted: Vec<String> = Vec::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut kills: Vec<&str> = Vec::new();
    let mut next_kill = 8 + rng.below(10) as usize;
    let (mut submitted, mut refused) = (0, 0);
    let give_up = Instant::now() + Duration::from_secs(420);
    while submitted < 100 {
        assert!(
            Instant::now() < give_up,
            "submissions stalled at {submitted} (seed {seed}):\n{}",
            logs(&agents)
        );
        let user = Client::new(&site.url, Some(token.clone())).unwrap();
        let mine: Vec<SiteVm> = user.get("/v1/vms").await.unwrap();
        let mut burst = Vec::new();
        let mut used = BTreeSet::new();
        for k in 0..(1 + rng.below(4)) as usize {
            let free: Vec<&SiteVm> = mine.iter().filter(|v| !used.contains(&v.id)).collect();
            let (path, body, data) = if free.is_empty() || rng.below(4) == 0 {
                (
                    "/v1/vms".to_string(),
                    json!({ "template": "tiny", "main-memory-mib": 128 }),
                    None,
                )
            } else {
                let vm = free[rng.below(free.len() as u64) as usize];
                used.insert(vm.id.clone());
                pick_job(vm, &mut rng, submitted + k)
            };
            let user = user.clone();
            burst.push(tokio::spawn(async move {
                match data {
                    Some(d) => {
                        user.put_stream::<Job>(
                            &path,
                            &[],
                            gve::api::full(bytes::Bytes::from_static(d)),
                        )
                        .await
                    }
                    None => user.call::<_, Job>(Method::POST, &path, Some(&body)).await,
                }
            }));
        }
        for b in burst {
            match b.await.unwrap() {
                Ok(j) => {
                    *kinds.entry(j.kind.as_str().to_string()).or_default() += 1;
                    accepted.push(j.id);
                    submitted += 1;
                }
                // The VM's agent is down for the moment, or restarting.
                Err(e) if e.status == 503 || e.kind == "unavailable" => {}
                // Over the quota, or the VM changed since it was listed.
                Err(e) if [403, 404, 409, 429].contains(&e.status) => refused += 1,
                Err(e) => panic!("submission failed: {e}"),
            }
        }
        if submitted >= next_kill {
            tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
            // Every third kill takes the site down with the agent.
            let which = rng.below(2) as usize;
            let both = kills.len() % 3 == 2;
            agents[which].kill().await;
            if both {
                site.child.kill().await.unwrap();
            }
            kills.push(if both {
                ["site+a", "site+b"][which]
            } else {
                ["a", "b"][which]
            });
            // Down for a moment, as a real restart would be.
            tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
            agents[which].start().await;
            if both {
                site = spawn_service("site", &site_config, &site_log).await;
            }
            next_kill = submitted + 8 + rng.below(10) as usize;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
    }
    assert!(kills.len() >= 5, "only {} kills happened", kills.len());
    eprintln!("accepted {kinds:?}, refused {refused}; kills {kills:?}");

    // Every accepted job ends.
    let c = admin(&site);
    let end = Instant::now() + Duration::from_secs(300);
    let jobs: BTreeMap<String, Job> = loop {
        let all: Vec<Job> = c.get("/v1/jobs?all=true&limit=100000").await.unwrap();
        if all.iter().all(|j| j.state.is_terminal()) {
            break all.into_iter().map(|j| (j.id.clone(), j)).collect();
        }
        assert!(
            Instant::now() < end,
            "seed {seed}: jobs still running: {:?}\n{}",
            all.iter()
                .filter(|j| !j.state.is_terminal())
                .collect::<Vec<_>>(),
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for id in &accepted {
        assert!(
            jobs.contains_key(id),
            "seed {seed}: accepted job {id} was lost"
        );
    }
    // Every operation on each agent ends. A site job may end before the agent
    // operation it started does (a copy whose sender died with a killed site
    // ends when the agent sees the stream cut), so this waits a bounded while.
    let end = Instant::now() + Duration::from_secs(90);
    for a in &agents {
        loop {
            let ops: Vec<Operation> = a.client().get("/v1/operations").await.unwrap();
            let running: Vec<&Operation> =
                ops.iter().filter(|o| o.state == OpState::Running).collect();
            if running.is_empty() {
                break;
            }
            assert!(
                Instant::now() < end,
                "seed {seed}: agent {}: {running:?}\n{}",
                a.id,
                logs(&agents)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    // libvirt holds nothing the agents do not know: every domain but the template
    // is in its agent's registry and back, and every file in either pool is a
    // disk of some domain (shared storage: a migrated VM's disk stays where it was
    // made).
    let libvirts = [(&la, &agents[0]), (&lb, &agents[1])];
    let mut disks_in_use: BTreeSet<PathBuf> = BTreeSet::new();
    for (lv, a) in libvirts {
        let domains: BTreeSet<String> = lv
            .virsh(&["list", "--all", "--name"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        for d in &domains {
            let out = std::process::Command::new("virsh")
                .args(["-c", &lv.uri, "domblklist", d, "--details"])
                .output()
                .unwrap();
            if !out.status.success() {
                // Gone since the listing: something still acted after every job and
                // operation had ended. Say what each agent did to it, and when.
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis();
                let mut about = String::new();
                for a in &agents {
                    let ops: Vec<Value> = a.client().get("/v1/operations").await.unwrap();
                    for op in ops.iter().filter(|o| o.to_string().contains(d.as_str())) {
                        about += &format!("\nagent {}: {op}", a.id);
                    }
                }
                panic!(
                    "seed {seed}: domain {d} went between `virsh list` and `domblklist` at {now_ms} \
                     ({}); listed now: {:?}; operations naming it:{about}\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    lv.virsh(&["list", "--all", "--name"]),
                    logs(&agents)
                );
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(src) = line.split_whitespace().nth(3) {
                    disks_in_use.insert(PathBuf::from(src));
                }
            }
        }
        let templates: Vec<Value> = a.client().get("/v1/templates").await.unwrap();
        let templates: BTreeSet<String> = templates
            .iter()
            .filter_map(|t| t["name"].as_str().map(String::from))
            .collect();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let registry: Vec<VmRecord> = a.client().get("/v1/vms").await.unwrap();
            let names: BTreeSet<String> = registry.iter().map(|r| r.vm.name.clone()).collect();
            let on_libvirt: BTreeSet<String> = domains.difference(&templates).cloned().collect();
            if names == on_libvirt {
                break;
            }
            assert!(
                Instant::now() < end,
                "seed {seed}: agent {} knows {names:?}, libvirt has {on_libvirt:?}",
                a.id
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    for images in [&la.images, &lb.images] {
        for f in std::fs::read_dir(images).unwrap() {
            let f = f.unwrap().path();
            assert!(
                disks_in_use.contains(&f),
                "seed {seed}: orphan file {} (disks in use: {disks_in_use:?})",
                f.display()
            );
        }
    }

    // The site's records are exactly the agents' VMs, with their state (a record
    // of a VM that moved during a cut-off migration follows it within a few checks).
    let end = Instant::now() + Duration::from_secs(60);
    let site_vms: Vec<SiteVm> = loop {
        for a in &agents {
            let _: Value = c
                .call(
                    Method::POST,
                    &format!("/v1/agents/{}/check", a.id),
                    Some(&json!({})),
                )
                .await
                .unwrap();
        }
        let mut on_agents: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut made_by: BTreeMap<String, usize> = BTreeMap::new();
        for a in &agents {
            let vms: Vec<VmRecord> = a.client().get("/v1/vms").await.unwrap();
            for r in vms {
                let state = serde_json::to_value(r.vm.state).unwrap();
                on_agents.insert(
                    (a.id.to_string(), r.vm.id.clone()),
                    state.as_str().unwrap().to_string(),
                );
                if let Some(j) = r.vm.labels.get("gve.job") {
                    *made_by.entry(j.clone()).or_default() += 1;
                }
            }
        }
        for (job, n) in &made_by {
            assert_eq!(*n, 1, "seed {seed}: job {job} created {n} VMs");
        }
        let site_vms: Vec<SiteVm> = c.get("/v1/vms?all=true").await.unwrap();
        let known: BTreeMap<(String, String), String> = site_vms
            .iter()
            .map(|v| ((v.agent.clone(), v.agent_vm.clone()), v.state.clone()))
            .collect();
        assert_eq!(
            known.len(),
            site_vms.len(),
            "seed {seed}: duplicate VM records"
        );
        if known == on_agents {
            break site_vms;
        }
        assert!(
            Instant::now() < end,
            "seed {seed}: the site and the agents disagree: site {known:?}, agents {on_agents:?}\n{}",
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // No tenant lost a VM to a kill: every VM the user got and did not give back
    // is still theirs, not in the pool.
    let lost: Vec<&SiteVm> = site_vms
        .iter()
        .filter(|v| v.owner.is_none() && !v.clean)
        .collect();
    eprintln!(
        "pool VMs nobody may get (made outside a job): {}",
        lost.len()
    );

    // Quotas add up: usage is exactly what the user holds.
    let held: Vec<&SiteVm> = site_vms
        .iter()
        .filter(|v| v.owner.as_deref() == Some("grid"))
        .collect();
    let user: UserView = c.get("/v1/users/grid").await.unwrap();
    assert_eq!(user.usage.vms as usize, held.len(), "seed {seed}");
    assert_eq!(
        user.usage.main_memory_mib,
        held.iter().map(|v| v.main_memory_mib).sum::<u64>(),
        "seed {seed}"
    );
    // What the user holds and is running is usable.
    let u = Client::new(&site.url, Some(token.clone())).unwrap();
    for v in held.iter().filter(|v| v.state == "running") {
        let j: Job = u
            .call(
                Method::POST,
                &format!("/v1/vms/{}/exec", v.id),
                Some(&json!({ "argv": ["true"] })),
            )
            .await
            .unwrap();
        let j = crate::fairness::ended(&u, &j.id, Duration::from_secs(120)).await;
        assert!(j.state.is_terminal());
        assert_eq!(
            j.state,
            gve::site::model::JobState::Succeeded,
            "seed {seed}: a held running VM cannot run a command: {j:?}"
        );
    }
    let ended_by_kind = |k: JobKind, s: gve::site::model::JobState| {
        jobs.values()
            .filter(|j| j.kind == k && j.state == s)
            .count()
    };
    eprintln!(
        "{} jobs, {} kills; requests {} succeeded / {} failed; migrations {} / {}; {} VMs held, {} in the pool",
        jobs.len(),
        kills.len(),
        ended_by_kind(JobKind::Request, gve::site::model::JobState::Succeeded),
        ended_by_kind(JobKind::Request, gve::site::model::JobState::Failed),
        ended_by_kind(JobKind::Migrate, gve::site::model::JobState::Succeeded),
        ended_by_kind(JobKind::Migrate, gve::site::model::JobState::Failed),
        held.len(),
        site_vms.len() - held.len(),
    );
    for j in jobs
        .values()
        .filter(|j| j.state == gve::site::model::JobState::Failed)
    {
        eprintln!(
            "failed {}: {}",
            j.kind.as_str(),
            j.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
        );
    }
    let _ = site.child.start_kill();
    for a in agents.iter_mut() {
        a.kill().await;
    }
}
