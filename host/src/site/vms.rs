//! VM jobs: request by profile (reuse a free matching VM or create one on the best
//! agent, start it, provision its software), manage (an agent operation on the VM's
//! agent), clone, migrate, release and lease expiry. Every agent call carries the
//! idempotency key `<job>:<step>`, and each step's result is checkpointed, so a job
//! resumed after a site crash picks up where it was and runs nothing twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::agents::{db, forget_vm, site_vm_id};
use super::auth::Caller;
use super::jobs::{new_job, store_error};
use super::model::{now_ms, AgentStatus, Job, JobKind, Lease, OpError, SiteVm, Usage, VmRequest};
use super::placement;
use super::store::{StoreError, Txn};
use super::SiteCore;
use crate::agent::model::{OpOutput, Vm};
use crate::api::ApiError;

fn err(kind: &str, message: impl Into<String>) -> OpError {
    OpError {
        kind: kind.into(),
        message: message.into(),
    }
}

fn resources(v: &SiteVm) -> Usage {
    Usage::vm(u64::from(v.logical_cpus), v.main_memory_mib)
}

/// The API view of a VM: state `unknown` while its agent is down.
pub fn view(core: &SiteCore, mut v: SiteVm) -> SiteVm {
    let down = core
        .store
        .agent(&v.agent)
        .ok()
        .flatten()
        .is_none_or(|a| a.status == AgentStatus::Down);
    if down {
        v.state = "unknown".into();
    }
    v
}

/// Gives a request's claimed VM back to the pool when the request fails.
pub fn unclaim_on_failure(t: &mut Txn<'_>, job: &Job) -> Result<(), StoreError> {
    let Some(id) = &job.vm else { return Ok(()) };
    if job.step["claimed"] != true {
        return Ok(());
    }
    if let Some(mut v) = t.vm(id)? {
        if v.owner.as_deref() == Some(job.owner.as_str()) && job.step["was-owner"] != true {
            let u = t.usage(&job.owner)?;
            t.set_usage(&job.owner, u.minus(resources(&v)))?;
            v.owner = None;
            v.lease = None;
            t.put_vm(&v)?;
        }
    }
    Ok(())
}

impl SiteCore {
    /// The lease deadline for a request asking `seconds`.
    fn lease_until(&self, seconds: Option<u64>) -> Result<u64, ApiError> {
        let s = seconds.unwrap_or(self.config.lease_default_seconds);
        if s == 0 || s > self.config.lease_max_seconds {
            return Err(ApiError::bad_request(format!(
                "lease-seconds must be between 1 and {} (this site's maximum), not {s}",
                self.config.lease_max_seconds
            )));
        }
        Ok(now_ms() + s * 1000)
    }

    /// A VM the caller may act on: theirs (or any, for admins), lease not expired.
    pub fn vm_for(&self, caller: &Caller, id: &str, action: &str) -> Result<SiteVm, ApiError> {
        let v = self.store.vm(id).map_err(db)?;
        let v = v
            .filter(|v| caller.may_see(v.owner.as_deref()))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no VM '{id}' of yours"),
                )
            })?;
        if let Some(l) = v.lease {
            if l.expired && !caller.is_admin() && !matches!(action, "release" | "show") {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "denied",
                    format!(
                        "the lease of VM {id} expired at {} (Unix ms) and the site stopped it; release it, or ask an admin to renew it",
                        l.until_ms
                    ),
                ));
            }
        }
        Ok(v)
    }

    /// Checks a request and builds its job, with the quota it reserves.
    pub fn request_job(&self, caller: &Caller, req: VmRequest) -> Result<Job, ApiError> {
        if req.logical_cpus == 0 || req.main_memory_mib == 0 {
            return Err(ApiError::bad_request(
                "logical-cpus and main-memory-mib must be positive",
            ));
        }
        self.lease_until(req.lease_seconds)?;
        let mut reserved = Usage::vm(u64::from(req.logical_cpus), req.main_memory_mib);
        if let Some(id) = &req.vm {
            let v =
                self.store.vm(id).map_err(db)?.filter(|v| {
                    v.owner.is_none() || v.owner.as_deref() == Some(caller.name.as_str())
                });
            let v = v.ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no free VM '{id}' and none of yours"),
                )
            })?;
            if v.lease.is_some_and(|l| l.expired) && !caller.is_admin() {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "denied",
                    format!("the lease of VM {id} expired; only an admin can renew it"),
                ));
            }
            reserved = if v.owner.is_some() {
                Usage::default()
            } else {
                resources(&v)
            };
        }
        if let Some(n) = &req.name {
            super::auth::validate_id("VM name", n)?;
        }
        let params = serde_json::to_value(&req).unwrap_or_default();
        let mut job = new_job(&caller.name, JobKind::Request, req.vm.clone(), params);
        job.reserved = reserved;
        Ok(job)
    }

    /// The request job: claim or create, start, provision.
    pub async fn run_request(self: &Arc<Self>, job: &Job) -> Result<Value, OpError> {
        let req: VmRequest = serde_json::from_value(job.params.clone())
            .map_err(|e| err("invalid-argument", format!("job parameters: {e}")))?;
        let until = self
            .lease_until(req.lease_seconds)
            .map_err(|e| err("invalid-argument", e.message))?;
        let mut job = job.clone();
        if job.step["claimed"] != true {
            let vm_id = match self.claim(&job, &req, until)? {
                Some(id) => id,
                None => self.create_for(&job, &req, until).await?,
            };
            job.vm = Some(vm_id);
            job = self.store.job(&job.id).map_err(store_error)?.unwrap_or(job);
        }
        let vm_id = job
            .vm
            .clone()
            .ok_or_else(|| err("backend", "request lost its VM"))?;
        let v = self
            .store
            .vm(&vm_id)
            .map_err(store_error)?
            .ok_or_else(|| err("not-found", format!("VM {vm_id} vanished")))?;
        if v.state != "running" {
            let op = self
                .agents
                .run_op(
                    &v.agent,
                    &format!("/v1/vms/{}/start", v.agent_vm),
                    json!({}),
                    &format!("{}:start", job.id),
                )
                .await;
            match op {
                Ok(op) => self.record_vm_state(&vm_id, op.result.as_ref())?,
                // Already running (started by an earlier attempt without its key).
                Err(e) if e.kind == "invalid-state" && e.message.contains("running") => {}
                Err(e) => return Err(e),
            }
        }
        for bundle in &req.software {
            let v = self
                .store
                .vm(&vm_id)
                .map_err(store_error)?
                .ok_or_else(|| err("not-found", "VM vanished"))?;
            if v.software.contains_key(bundle) {
                continue;
            }
            let op = self
                .agents
                .run_op(
                    &v.agent,
                    &format!("/v1/vms/{}/provision", v.agent_vm),
                    json!({ "bundle": bundle }),
                    &format!("{}:provision:{bundle}", job.id),
                )
                .await?;
            if let Some(OpOutput::Provision(p)) = op.output {
                self.store
                    .write(|t| {
                        if let Some(mut v) = t.vm(&vm_id)? {
                            v.software.insert(p.bundle.clone(), p.digest.clone());
                            t.put_vm(&v)?;
                        }
                        Ok(())
                    })
                    .map_err(store_error)?;
            }
        }
        let v = self
            .store
            .vm(&vm_id)
            .map_err(store_error)?
            .ok_or_else(|| err("not-found", "VM vanished"))?;
        Ok(serde_json::to_value(view(self, v)).unwrap_or_default())
    }

    /// Claims a free VM that matches (or the one named), moving the job's reservation
    /// onto it, in one transaction. `None` when nothing matches.
    fn claim(&self, job: &Job, req: &VmRequest, until: u64) -> Result<Option<String>, OpError> {
        self.store
            .write(|t| {
                let agents_up: Vec<String> = t
                    .agents()?
                    .into_iter()
                    .filter(|a| a.status == AgentStatus::Up)
                    .map(|a| a.id)
                    .collect();
                let candidate = match &req.vm {
                    Some(id) => t.vm(id)?,
                    None => t.vms()?.into_iter().find(|v| {
                        v.owner.is_none()
                            && agents_up.contains(&v.agent)
                            && v.logical_cpus == req.logical_cpus
                            && v.main_memory_mib == req.main_memory_mib
                            && req
                                .template
                                .as_ref()
                                .is_none_or(|t| v.template.as_ref() == Some(t))
                            && req
                                .os_family
                                .as_ref()
                                .is_none_or(|o| v.os_family.as_ref() == Some(o))
                            && matches!(v.state.as_str(), "running" | "stopped")
                    }),
                };
                let Some(mut v) = candidate else {
                    return Ok(None);
                };
                let was_owner = v.owner.as_deref() == Some(job.owner.as_str());
                if v.owner.is_some() && !was_owner {
                    return Ok(None);
                }
                v.owner = Some(job.owner.clone());
                v.lease = Some(Lease {
                    until_ms: until,
                    expired: false,
                });
                v.updated_ms = now_ms();
                t.put_vm(&v)?;
                let mut j = t.job(&job.id)?.unwrap_or_else(|| job.clone());
                // The reservation becomes the VM's: usage stays as it is.
                j.reserved = Usage::default();
                j.vm = Some(v.id.clone());
                j.step = json!({ "claimed": true, "was-owner": was_owner, "reused": true });
                t.put_job(
                    &j,
                    Some(&format!("claimed VM {} on agent {}", v.id, v.agent)),
                )?;
                Ok(Some(v.id))
            })
            .map_err(store_error)
    }

    /// Creates a VM for a request on the agent placement chose.
    async fn create_for(&self, job: &Job, req: &VmRequest, until: u64) -> Result<String, OpError> {
        let (agent, name) = match (job.step["agent"].as_str(), job.step["name"].as_str()) {
            (Some(a), Some(n)) => (a.to_string(), n.to_string()),
            _ => {
                let agents = self.store.agents().map_err(store_error)?;
                let vms = self.store.vms().map_err(store_error)?;
                let mut placing = self.placing.lock().unwrap_or_else(|p| p.into_inner());
                let pending: Vec<(String, u64)> = placing.values().cloned().collect();
                let chosen = placement::choose(&agents, &vms, &pending, req, self.config.placement)
                    .map_err(|m| err("unavailable", m))?;
                placing.insert(job.id.clone(), (chosen.clone(), req.main_memory_mib));
                drop(placing);
                let name = req
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("gve-{}", &job.id[job.id.len() - 12..]));
                if let Err(e) = self.checkpoint(&job.id, json!({ "agent": chosen, "name": name })) {
                    self.placing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&job.id);
                    return Err(e);
                }
                (chosen, name)
            }
        };
        let mut labels = BTreeMap::new();
        labels.insert("gve.job".to_string(), job.id.clone());
        labels.insert("gve.owner".to_string(), job.owner.clone());
        if let Some(t) = &req.template {
            labels.insert("gve.template".to_string(), t.clone());
        }
        let profile = json!({
            "name": name, "logical-cpus": req.logical_cpus, "main-memory-mib": req.main_memory_mib,
            "template": req.template, "os-family": req.os_family, "labels": labels,
        });
        let op = self
            .agents
            .run_op(&agent, "/v1/vms", profile, &format!("{}:create", job.id))
            .await;
        self.placing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job.id);
        let op = op?;
        let vm: Vm = op
            .result
            .ok_or_else(|| err("backend", format!("agent {agent}: create returned no VM")))?;
        let id = site_vm_id(&agent, &vm.id);
        let rec = SiteVm {
            id: id.clone(),
            agent: agent.clone(),
            agent_vm: vm.id.clone(),
            name: vm.name.clone(),
            owner: Some(job.owner.clone()),
            logical_cpus: vm.logical_cpus,
            main_memory_mib: vm.main_memory_mib,
            template: req.template.clone(),
            os_family: vm.os_family.clone().or(req.os_family.clone()),
            state: format!("{:?}", vm.state).to_lowercase(),
            lease: Some(Lease {
                until_ms: until,
                expired: false,
            }),
            software: Default::default(),
            updated_ms: now_ms(),
        };
        self.store
            .write(|t| {
                // A health check may have recorded it as free meanwhile: it is this job's.
                if let Some(old) = t.vm(&id)? {
                    if old.owner.is_some() && old.owner != rec.owner {
                        return Err(StoreError::Storage(format!(
                            "VM {id} was claimed by another user"
                        )));
                    }
                }
                t.put_vm(&rec)?;
                let mut j = t.job(&job.id)?.unwrap_or_else(|| job.clone());
                let u = t.usage(&j.owner)?;
                // The reservation becomes the VM's (its actual size, should it differ).
                t.set_usage(&j.owner, u.minus(j.reserved).plus(resources(&rec)))?;
                j.reserved = Usage::default();
                j.vm = Some(id.clone());
                j.step =
                    json!({ "claimed": true, "created": true, "agent": agent, "name": vm.name });
                t.put_job(
                    &j,
                    Some(&format!("created VM {id} ({}) on agent {agent}", vm.name)),
                )?;
                Ok(())
            })
            .map_err(store_error)?;
        Ok(id)
    }

    /// Records the VM state an agent operation reported.
    fn record_vm_state(&self, id: &str, vm: Option<&Vm>) -> Result<(), OpError> {
        let Some(vm) = vm else { return Ok(()) };
        self.store
            .write(|t| {
                if let Some(mut v) = t.vm(id)? {
                    v.state = format!("{:?}", vm.state).to_lowercase();
                    v.updated_ms = now_ms();
                    t.put_vm(&v)?;
                }
                Ok(())
            })
            .map_err(store_error)
    }

    /// A manage job: one agent operation on the job's VM.
    pub async fn run_action(&self, job: &Job) -> Result<Value, OpError> {
        let id = job
            .vm
            .clone()
            .ok_or_else(|| err("invalid-argument", "job names no VM"))?;
        let v = self
            .store
            .vm(&id)
            .map_err(store_error)?
            .ok_or_else(|| err("not-found", format!("VM {id} vanished")))?;
        let path = format!("/v1/vms/{}/{}", v.agent_vm, job.kind.as_str());
        let op = self
            .agents
            .run_op(
                &v.agent,
                &path,
                job.params.clone(),
                &format!("{}:{}", job.id, job.kind.as_str()),
            )
            .await?;
        if matches!(
            job.kind,
            JobKind::Start | JobKind::Shutdown | JobKind::Suspend | JobKind::Resume
        ) {
            self.record_vm_state(&id, op.result.as_ref())?;
        }
        if let Some(OpOutput::Provision(p)) = &op.output {
            self.store
                .write(|t| {
                    if let Some(mut v) = t.vm(&id)? {
                        v.software.insert(p.bundle.clone(), p.digest.clone());
                        t.put_vm(&v)?;
                    }
                    Ok(())
                })
                .map_err(store_error)?;
        }
        Ok(match (op.output, op.result) {
            (Some(o), _) => serde_json::to_value(o).unwrap_or_default(),
            (None, Some(vm)) => serde_json::to_value(vm).unwrap_or_default(),
            (None, None) => json!({}),
        })
    }

    /// Clone: a new VM for the caller, reserved at submission.
    pub async fn run_clone(&self, job: &Job) -> Result<Value, OpError> {
        let src_id = job
            .vm
            .clone()
            .ok_or_else(|| err("invalid-argument", "job names no VM"))?;
        let src = self
            .store
            .vm(&src_id)
            .map_err(store_error)?
            .ok_or_else(|| err("not-found", "source VM vanished"))?;
        let name = job.params["name"].as_str().unwrap_or_default().to_string();
        let op = self
            .agents
            .run_op(
                &src.agent,
                &format!("/v1/vms/{}/clone", src.agent_vm),
                json!({ "name": name, "linked": job.params["linked"].as_bool().unwrap_or(false) }),
                &format!("{}:clone", job.id),
            )
            .await?;
        let vm = op
            .result
            .ok_or_else(|| err("backend", "clone returned no VM"))?;
        let id = site_vm_id(&src.agent, &vm.id);
        let until = src
            .lease
            .map(|l| l.until_ms)
            .unwrap_or_else(|| now_ms() + self.config.lease_default_seconds * 1000);
        let rec = SiteVm {
            id: id.clone(),
            agent: src.agent.clone(),
            agent_vm: vm.id.clone(),
            name: vm.name.clone(),
            owner: Some(job.owner.clone()),
            logical_cpus: vm.logical_cpus,
            main_memory_mib: vm.main_memory_mib,
            template: src.template.clone(),
            os_family: src.os_family.clone(),
            state: format!("{:?}", vm.state).to_lowercase(),
            lease: Some(Lease {
                until_ms: until,
                expired: false,
            }),
            software: src.software.clone(),
            updated_ms: now_ms(),
        };
        self.store
            .write(|t| {
                t.put_vm(&rec)?;
                let mut j = t.job(&job.id)?.unwrap_or_else(|| job.clone());
                j.reserved = Usage::default();
                t.put_job(&j, Some(&format!("cloned as VM {id}")))?;
                Ok(())
            })
            .map_err(store_error)?;
        Ok(serde_json::to_value(rec).unwrap_or_default())
    }

    /// Migrate: the VM's agent moves it to the destination agent's endpoint; the
    /// site's record follows it.
    pub async fn run_migrate(&self, job: &Job) -> Result<Value, OpError> {
        let id = job
            .vm
            .clone()
            .ok_or_else(|| err("invalid-argument", "job names no VM"))?;
        let to = job.params["to"].as_str().unwrap_or_default().to_string();
        let v = self
            .store
            .vm(&id)
            .map_err(store_error)?
            .ok_or_else(|| err("not-found", "VM vanished"))?;
        if v.agent == to && job.step["migrated"] == true {
            return Ok(serde_json::to_value(v).unwrap_or_default());
        }
        let dest = self
            .store
            .agent(&to)
            .map_err(store_error)?
            .ok_or_else(|| err("not-found", format!("no agent '{to}'")))?;
        let endpoint = dest.endpoint.clone().ok_or_else(|| {
            err(
                "unavailable",
                format!("agent {to} has not reported its endpoint yet"),
            )
        })?;
        let op = self
            .agents
            .run_op(&v.agent, &format!("/v1/vms/{}/migrate", v.agent_vm), json!({ "destination": endpoint, "live": job.params["live"].as_bool().unwrap_or(true) }), &format!("{}:migrate", job.id))
            .await?;
        // Let the destination agent's registry see the VM now, not at its next period.
        if let Ok(c) = self.agents.client(&to) {
            let _ = c
                .call::<_, Value>(hyper::Method::POST, "/v1/reconcile", Some(&json!({})))
                .await;
        }
        let vm = op.result;
        // Trust, but check: the VM must now be on the destination.
        let agent_vm = vm
            .as_ref()
            .map(|v| v.id.clone())
            .unwrap_or_else(|| v.agent_vm.clone());
        if let Ok(c) = self.agents.client(&to) {
            if let Err(e) = c.get::<Value>(&format!("/v1/vms/{agent_vm}")).await {
                return Err(err(
                    "backend",
                    format!(
                        "agent {} reported VM {id} migrated, but agent {to} does not have it: {}",
                        v.agent, e.message
                    ),
                ));
            }
        }
        let moved = self
            .store
            .write(|t| {
                let Some(mut v) = t.vm(&id)? else {
                    return Ok(None);
                };
                v.agent = to.clone();
                if let Some(vm) = &vm {
                    v.agent_vm = vm.id.clone();
                    v.state = format!("{:?}", vm.state).to_lowercase();
                }
                v.updated_ms = now_ms();
                t.put_vm(&v)?;
                let mut j = t.job(&job.id)?.unwrap_or_else(|| job.clone());
                j.step = json!({ "migrated": true });
                t.put_job(&j, Some(&format!("migrated to agent {to}")))?;
                Ok(Some(v))
            })
            .map_err(store_error)?;
        Ok(serde_json::to_value(moved).unwrap_or_default())
    }

    /// Release: stop the VM, then give it back to the pool or destroy it (site
    /// policy); the owner's quota is given back in the same transaction.
    pub async fn run_release(&self, job: &Job) -> Result<Value, OpError> {
        let id = job
            .vm
            .clone()
            .ok_or_else(|| err("invalid-argument", "job names no VM"))?;
        let Some(v) = self.store.vm(&id).map_err(store_error)? else {
            return Ok(json!({ "released": id, "already-gone": true }));
        };
        let destroy = self.config.release_policy == super::config::ReleasePolicy::Destroy;
        if destroy {
            let r = self
                .agents
                .run_op(
                    &v.agent,
                    &format!("/v1/vms/{}/destroy", v.agent_vm),
                    json!({}),
                    &format!("{}:destroy", job.id),
                )
                .await;
            match r {
                Ok(_) => {}
                Err(e) if e.kind == "not-found" => {}
                Err(e) => return Err(e),
            }
        } else if !matches!(v.state.as_str(), "stopped" | "crashed") {
            let r = self
                .agents
                .run_op(
                    &v.agent,
                    &format!("/v1/vms/{}/shutdown", v.agent_vm),
                    json!({ "force": true }),
                    &format!("{}:shutdown", job.id),
                )
                .await;
            match r {
                Ok(op) => self.record_vm_state(&id, op.result.as_ref())?,
                Err(e) if e.kind == "invalid-state" => {}
                Err(e) => return Err(e),
            }
        }
        self.store
            .write(|t| {
                let Some(mut v) = t.vm(&id)? else {
                    return Ok(());
                };
                if v.owner.is_none() {
                    return Ok(());
                }
                if destroy {
                    forget_vm(t, &v)
                } else {
                    let o = v.owner.take().unwrap_or_default();
                    let u = t.usage(&o)?;
                    t.set_usage(&o, u.minus(resources(&v)))?;
                    v.lease = None;
                    v.updated_ms = now_ms();
                    t.put_vm(&v)
                }
            })
            .map_err(store_error)?;
        Ok(json!({ "released": id, "destroyed": destroy }))
    }

    /// Lease expiry: stop the VM (its access was blocked when the job was queued).
    pub async fn run_expire(&self, job: &Job) -> Result<Value, OpError> {
        let id = job
            .vm
            .clone()
            .ok_or_else(|| err("invalid-argument", "job names no VM"))?;
        let Some(v) = self.store.vm(&id).map_err(store_error)? else {
            return Ok(json!({ "expired": id }));
        };
        if !matches!(v.state.as_str(), "stopped" | "crashed") {
            let r = self
                .agents
                .run_op(
                    &v.agent,
                    &format!("/v1/vms/{}/shutdown", v.agent_vm),
                    json!({ "force": true }),
                    &format!("{}:shutdown", job.id),
                )
                .await;
            match r {
                Ok(op) => self.record_vm_state(&id, op.result.as_ref())?,
                Err(e) if e.kind == "invalid-state" => {}
                Err(e) => return Err(e),
            }
        }
        Ok(json!({ "expired": id, "stopped": true }))
    }

    /// Renews a lease that has not expired.
    pub fn renew(
        &self,
        caller: &Caller,
        id: &str,
        seconds: Option<u64>,
    ) -> Result<SiteVm, ApiError> {
        let until = self.lease_until(seconds)?;
        let r = self.store.write(|t| {
            let Some(mut v) = t
                .vm(id)?
                .filter(|v| caller.may_see(v.owner.as_deref()) && v.owner.is_some())
            else {
                return Ok(Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no VM '{id}' of yours"),
                )));
            };
            match v.lease {
                Some(l) if l.expired && !caller.is_admin() => {
                    return Ok(Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "denied",
                        format!("the lease of VM {id} expired; only an admin can renew it"),
                    )));
                }
                _ => {}
            }
            v.lease = Some(Lease {
                until_ms: until,
                expired: false,
            });
            v.updated_ms = now_ms();
            t.put_vm(&v)?;
            Ok(Ok(v))
        });
        r.map_err(db)?
    }

    /// Twice a second: leases past their deadline are marked expired (blocking the
    /// owner's access at once) and an expire job stops their VMs.
    pub fn spawn_leases(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut ticks = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Err(e) = me.expire_due().await {
                    tracing::error!("lease check: {e}");
                }
                ticks += 1;
                if ticks % 1200 == 1 {
                    me.sweep_staging().await;
                }
            }
        })
    }

    async fn expire_due(&self) -> Result<(), ApiError> {
        let now = now_ms();
        let due: Vec<SiteVm> = self
            .store
            .vms()
            .map_err(db)?
            .into_iter()
            .filter(|v| {
                v.owner.is_some() && v.lease.is_some_and(|l| !l.expired && l.until_ms <= now)
            })
            .collect();
        for v in due {
            let owner = v.owner.clone().unwrap_or_default();
            let job = new_job(&owner, JobKind::Expire, Some(v.id.clone()), json!({}));
            // Access is blocked and the stop is queued in one transaction.
            let marked = self.store.write(|t| {
                let Some(mut cur) = t.vm(&v.id)? else {
                    return Ok(false);
                };
                match cur.lease {
                    Some(l) if !l.expired && l.until_ms <= now => {
                        cur.lease = Some(Lease {
                            until_ms: l.until_ms,
                            expired: true,
                        });
                        t.put_vm(&cur)?;
                        t.put_job(&job, Some("queued: the lease expired"))?;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            });
            if marked.map_err(db)? {
                tracing::info!(vm = v.id, owner, "lease expired; stopping the VM");
                let _ = self.runner.send(job.id.clone());
            }
        }
        Ok(())
    }
}
