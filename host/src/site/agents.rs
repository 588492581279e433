//! The site's agents: registered and unregistered at runtime by an admin, called with
//! each agent's own secret, checked every health period. A check records the host's
//! capacity and templates and brings the site's VM records in line with the agent's
//! registry; an agent that does not answer is marked down, and its VMs' state is
//! shown as `unknown` until it answers again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::model::{
    now_ms, AgentRec, AgentStatus, AgentView, JobKind, OpError, SiteVm, TemplateOffer, Usage,
};
use super::store::{Store, StoreError};
use crate::agent::model::{OpState, Operation, Vm, VmRecord};
use crate::api::client::Client;
use crate::api::ApiError;

/// The site's view of its agents.
pub struct Agents {
    store: Store,
    site_id: String,
    sealer: super::sealing::Sealer,
    tls: crate::api::tls::ClientTls,
    clients: RwLock<HashMap<String, Client>>,
    /// The health checks' period, ms (set by [`Agents::spawn_health`]).
    health_period_ms: std::sync::atomic::AtomicU64,
}

/// How long a check may take before its agent counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// The site-wide id of VM `vm` on agent `agent`: stable, and the same wherever it is
/// computed (a job that creates a VM and a check that discovers it agree).
pub fn site_vm_id(agent: &str, vm: &str) -> String {
    let h = Sha256::digest(format!("{agent}\0{vm}").as_bytes());
    format!("vm-{}", &hex::encode(h)[..12])
}

pub(crate) fn db(e: StoreError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
}

/// An agent-side failure as a job error, naming the agent.
pub fn agent_error(agent: &str, e: ApiError) -> OpError {
    OpError {
        kind: e.kind,
        message: format!("agent {agent}: {}", e.message),
    }
}

impl Agents {
    /// The agents of `store`'s site, their secrets sealed by `sealer`. Secrets an
    /// earlier version stored in the clear are sealed now.
    pub fn new(
        store: Store,
        site_id: String,
        sealer: super::sealing::Sealer,
        tls: crate::api::tls::ClientTls,
    ) -> Result<Agents, StoreError> {
        store.write(|t| {
            for mut a in t.agents()? {
                if !super::sealing::Sealer::is_sealed(&a.token) {
                    a.token = sealer.seal(&a.token);
                    t.put_agent(&a)?;
                }
            }
            Ok(())
        })?;
        Ok(Agents {
            store,
            site_id,
            sealer,
            tls,
            clients: RwLock::new(HashMap::new()),
            health_period_ms: std::sync::atomic::AtomicU64::new(5_000),
        })
    }

    /// How long a VM record stays `missing` before it is forgotten: two rounds of
    /// health checks and the longest a check may take, so every other agent that
    /// is up has listed its VMs since (and claimed it, if it moved there).
    fn forget_missing_after_ms(&self) -> u64 {
        2 * self
            .health_period_ms
            .load(std::sync::atomic::Ordering::Relaxed)
            + CHECK_TIMEOUT.as_millis() as u64
    }

    /// A client for agent `id`, authenticated with its secret.
    pub fn client(&self, id: &str) -> Result<Client, ApiError> {
        if let Some(c) = self
            .clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(c.clone());
        }
        let rec = self.store.agent(id).map_err(db)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no agent '{id}'"),
            )
        })?;
        let secret = self.sealer.unseal(&rec.token).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backend",
                format!("agent '{id}': {e}"),
            )
        })?;
        let c = Client::with_tls(
            &rec.url,
            Some(secret),
            &self.tls_for(rec.fingerprint.as_deref()),
        )?;
        self.clients
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), c.clone());
        Ok(c)
    }

    /// How to verify an agent with certificate fingerprint `pin` (else by the CA).
    fn tls_for(&self, pin: Option<&str>) -> crate::api::tls::ClientTls {
        let mut t = self.tls.clone();
        if let Some(p) = pin {
            t.fingerprint = Some(p.to_string());
        }
        t
    }

    /// Registers an agent: checks that it answers with this secret (over TLS, the
    /// certificate `fingerprint` pins, or the site's agent CA), tells it which site
    /// it serves, and records it.
    pub async fn register(
        &self,
        id: &str,
        url: &str,
        token: &str,
        fingerprint: Option<&str>,
    ) -> Result<AgentView, ApiError> {
        let fingerprint = fingerprint
            .map(crate::api::tls::normalize_fingerprint)
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        super::auth::validate_id("agent id", id)?;
        if self.store.agent(id).map_err(db)?.is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already-exists",
                format!("agent '{id}' is registered already"),
            ));
        }
        let c = Client::with_tls(
            url,
            Some(token.to_string()),
            &self.tls_for(fingerprint.as_deref()),
        )?;
        let site = json!({ "id": self.site_id, "agent-id": id, "at-ms": now_ms() });
        c.call::<_, Value>(Method::PUT, "/v1/site", Some(&site))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!(
                        "agent '{id}' at {url} did not accept this site: {}",
                        e.message
                    ),
                )
            })?;
        let rec = AgentRec {
            id: id.to_string(),
            url: url.trim_end_matches('/').to_string(),
            token: self.sealer.seal(token),
            status: AgentStatus::Down,
            error: Some("not checked yet".into()),
            seen_ms: 0,
            host: None,
            templates: Vec::new(),
            endpoint: None,
            registered_ms: now_ms(),
            fingerprint,
            offers: Vec::new(),
        };
        // Checked again in the transaction: two registrations of one id race.
        let fresh = self.store.write(|t| {
            if t.agent(id)?.is_some() {
                return Ok(false);
            }
            t.put_agent(&rec)?;
            Ok(true)
        });
        if !fresh.map_err(db)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already-exists",
                format!("agent '{id}' is registered already"),
            ));
        }
        self.check(id).await;
        let rec = self.store.agent(id).map_err(db)?.unwrap_or(rec);
        Ok(AgentView::from(&rec))
    }

    /// Unregisters an agent. Refused while users hold VMs on it, unless `force`
    /// (their VMs are then forgotten and their quota given back).
    pub fn unregister(&self, id: &str, force: bool) -> Result<(), ApiError> {
        let r = self.store.write(|t| {
            if t.agent(id)?.is_none() {
                return Ok(Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no agent '{id}'"),
                )));
            }
            let vms: Vec<SiteVm> = t.vms_of_agent(id)?;
            let held = vms.iter().filter(|v| v.owner.is_some()).count();
            if held > 0 && !force {
                return Ok(Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "invalid-state",
                    format!("agent '{id}' has {held} allocated VMs; release them or unregister with force"),
                )));
            }
            for v in vms {
                forget_vm(t, &v)?;
            }
            t.remove_agent(id)?;
            Ok(Ok(()))
        });
        self.clients
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        r.map_err(db)?
    }

    /// Checks one agent: capacity, templates, endpoint and VMs; marks it up or down.
    /// An agent that does not answer within 15 s is down.
    pub async fn check(&self, id: &str) {
        let Ok(c) = self.client(id) else { return };
        // Records a job writes after the listing was taken are newer than it.
        let listed_at = now_ms();
        let got = tokio::time::timeout(CHECK_TIMEOUT, async {
            let host: crate::agent::model::Host = c.get("/v1/host").await?;
            let templates: Vec<Vm> = c.get("/v1/templates").await?;
            let driver: Value = c.get("/v1/driver").await?;
            // Every page: a VM left out would be taken for gone.
            let vms: Vec<VmRecord> = c.get_pages("/v1/vms", usize::MAX).await?;
            Ok::<_, ApiError>((host, templates, driver, vms))
        })
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("agent {id} did not answer its health check within 15 s"),
            ))
        });
        // What a check learns, the next check learns again: no need to wait for the disk.
        let r = self.store.write_lazy(|t| {
            let Some(mut rec) = t.agent(id)? else {
                return Ok(());
            };
            match got {
                Ok((host, templates, driver, vms)) => {
                    rec.status = AgentStatus::Up;
                    rec.error = None;
                    rec.seen_ms = now_ms();
                    rec.host = Some(host);
                    rec.offers = templates.iter().map(TemplateOffer::from).collect();
                    rec.templates = templates.into_iter().map(|t| t.name).collect();
                    rec.endpoint = driver["migration-uri"]
                        .as_str()
                        .or(driver["endpoint"].as_str())
                        .map(str::to_string);
                    sync_vms(t, id, &vms, listed_at, self.forget_missing_after_ms())?;
                }
                Err(e) => {
                    if rec.status == AgentStatus::Up {
                        tracing::warn!(agent = id, "agent down: {}", e.message);
                    }
                    rec.status = AgentStatus::Down;
                    rec.error = Some(e.message);
                }
            }
            t.put_agent(&rec)
        });
        if let Err(e) = r {
            tracing::error!(agent = id, "cannot record the agent check: {e}");
        }
    }

    /// Checks every agent every `period`, all at once: each check has its own
    /// deadline, so an agent that does not answer delays no other agent's check.
    pub fn spawn_health(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        self.health_period_ms.store(
            period.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let ids: Vec<String> = me
                    .store
                    .agents()
                    .map(|a| a.into_iter().map(|a| a.id).collect())
                    .unwrap_or_default();
                let mut checks = tokio::task::JoinSet::new();
                for id in ids {
                    let me = me.clone();
                    checks.spawn(async move { me.check(&id).await });
                }
                while checks.join_next().await.is_some() {}
                tokio::time::sleep(period).await;
            }
        })
    }

    /// Submits an operation to an agent with an idempotency key (a retry after a
    /// site crash gets the same operation back) and waits for its end.
    pub async fn run_op(
        &self,
        agent: &str,
        path: &str,
        body: Value,
        key: &str,
    ) -> Result<Operation, OpError> {
        let c = self.client(agent).map_err(|e| agent_error(agent, e))?;
        // A lost answer is asked again with the same key: the agent answers the
        // operation the first attempt started, or starts it once.
        let mut attempt = 0;
        let mut op: Operation = loop {
            match c
                .call_with(
                    Method::POST,
                    path,
                    Some(&body),
                    &[("idempotency-key", key.to_string())],
                )
                .await
            {
                Ok(op) => break op,
                Err(e) if e.kind == "unavailable" && e.status == 503 && attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(agent, key, "retrying a submission: {}", e.message);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(agent_error(agent, e)),
            }
        };
        let mut failures = 0;
        while op.state == OpState::Running {
            match c
                .get::<Operation>(&format!("/v1/operations/{}?wait-ms=20000", op.id))
                .await
            {
                Ok(o) => {
                    op = o;
                    failures = 0;
                }
                // An agent that stops answering mid-operation: keep asking a while.
                Err(e) if failures < 30 => {
                    failures += 1;
                    tracing::warn!(agent, op = op.id, "waiting for an operation: {}", e.message);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(agent_error(agent, e)),
            }
        }
        match op.state {
            OpState::Succeeded => Ok(op),
            _ => Err(op
                .error
                .clone()
                .map(|e| OpError {
                    kind: e.kind,
                    message: format!("agent {agent}: {}", e.message),
                })
                .unwrap_or_else(|| OpError {
                    kind: "backend".into(),
                    message: format!("agent {agent}: operation {} failed", op.id),
                })),
        }
    }
}

/// Removes a VM record, giving its owner's quota back.
pub fn forget_vm(t: &mut super::store::Txn<'_>, v: &SiteVm) -> Result<(), StoreError> {
    if let Some(o) = &v.owner {
        t.move_usage(
            o,
            Usage::vm(u64::from(v.logical_cpus), v.main_memory_mib),
            Usage::default(),
        )?;
    }
    t.remove_vm(&v.id)
}

/// State of a VM record whose agent no longer lists it: forgotten when checks
/// still miss it a while later, unless another agent lists it by then (it moved).
pub const MISSING: &str = "missing";

/// Brings the site's records of agent `agent`'s VMs in line with what it reports
/// (listed at `listed_at`). VMs that jobs are working on are left to those jobs, and
/// records written after the listing was taken are newer than it: kept as they are.
/// A VM the agent no longer lists is `missing` first and forgotten when a check
/// still misses it `forget_after_ms` later; one that turns up on another agent
/// meanwhile (a migration whose job was cut off, or one made outside gve) keeps
/// its record, owner and lease there.
fn sync_vms(
    t: &mut super::store::Txn<'_>,
    agent: &str,
    listed: &[VmRecord],
    listed_at: u64,
    forget_after_ms: u64,
) -> Result<(), StoreError> {
    // Only this agent's records are read, and records of other agents only for a
    // VM it lists that it has no record of: a check costs this agent's VMs.
    let mine: BTreeMap<String, SiteVm> = t
        .vms_of_agent(agent)?
        .into_iter()
        .map(|v| (v.agent_vm.clone(), v))
        .collect();
    let mut busy: HashSet<String> = HashSet::new();
    let mut active_jobs: HashSet<String> = HashSet::new();
    // Names the active clones give their new VMs on this agent (the contract's
    // clone carries no labels, so the name is what marks them).
    let mut cloning: HashSet<String> = HashSet::new();
    for j in t.active_jobs()? {
        if let Some(v) = &j.vm {
            busy.insert(v.clone());
            let from_here = j.kind == JobKind::Clone && t.vm(v)?.is_some_and(|s| s.agent == agent);
            if j.kind == JobKind::Clone && from_here {
                if let Some(name) = j.params["name"].as_str() {
                    cloning.insert(name.to_string());
                }
            }
        }
        active_jobs.insert(j.id);
    }
    let now = now_ms();
    for rec in listed {
        let vm = &rec.vm;
        let state = format!("{:?}", vm.state).to_lowercase();
        match mine.get(&vm.id) {
            Some(known) => {
                if known.updated_ms < listed_at && (known.state != state || known.name != vm.name) {
                    let mut k = known.clone();
                    if k.state != state {
                        k.ready = false;
                    }
                    k.state = state;
                    k.name = vm.name.clone();
                    k.updated_ms = now;
                    t.put_vm(&k)?;
                }
            }
            None => {
                // Being created or cloned by a job, or migrating in under a job: not
                // ours to add (the job records it, with its owner).
                let made_by_active = vm
                    .labels
                    .get("gve.job")
                    .is_some_and(|j| active_jobs.contains(j))
                    || cloning.contains(&vm.name);
                // Records by the hypervisor's id of the VM, on any agent.
                let elsewhere = t.vms_by_agent_vm(&vm.id)?;
                if made_by_active || elsewhere.iter().any(|v| busy.contains(&v.id)) {
                    continue;
                }
                if let Some(moved) = elsewhere.first() {
                    // Known on another agent: it moved once that agent misses it;
                    // until then (or while both list it) the record stays put.
                    if moved.state == MISSING && moved.updated_ms < listed_at {
                        tracing::warn!(
                            vm = moved.id,
                            from = moved.agent,
                            to = agent,
                            "VM turned up on another agent; its record follows it"
                        );
                        let mut m = moved.clone();
                        m.agent = agent.to_string();
                        m.name = vm.name.clone();
                        m.state = state;
                        m.ready = false;
                        m.updated_ms = now;
                        t.put_vm(&m)?;
                    }
                    continue;
                }
                t.put_vm(&SiteVm {
                    id: site_vm_id(agent, &vm.id),
                    agent: agent.to_string(),
                    agent_vm: vm.id.clone(),
                    name: vm.name.clone(),
                    owner: None,
                    logical_cpus: vm.logical_cpus,
                    main_memory_mib: vm.main_memory_mib,
                    template: vm.labels.get("gve.template").cloned(),
                    os_family: vm.os_family.clone(),
                    state,
                    lease: None,
                    // The site installed nothing on it and did not make it: what
                    // is on its disks is unknown, so it goes to no tenant.
                    software: Default::default(),
                    clean: false,
                    ready: false,
                    updated_ms: now,
                })?;
            }
        }
    }
    let present: HashSet<&str> = listed.iter().map(|r| r.vm.id.as_str()).collect();
    for (agent_vm, v) in &mine {
        if present.contains(agent_vm.as_str()) || busy.contains(&v.id) || v.updated_ms >= listed_at
        {
            continue;
        }
        if v.state == MISSING {
            if now.saturating_sub(v.updated_ms) < forget_after_ms {
                continue;
            }
            tracing::warn!(
                vm = v.id,
                agent,
                "VM vanished from its agent; forgetting it"
            );
            forget_vm(t, v)?;
        } else {
            tracing::warn!(
                vm = v.id,
                agent,
                "VM missing from its agent; forgotten soon unless an agent lists it"
            );
            let mut m = v.clone();
            m.state = MISSING.into();
            m.ready = false;
            m.updated_ms = now;
            t.put_vm(&m)?;
        }
    }
    Ok(())
}
