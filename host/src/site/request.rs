//! The request job (the paper's RequestVirtualMachine): claim a free VM that matches
//! the profile (or the VM named), or place and create one on the best agent; start
//! it; provision the software asked for. The quota reserved at submission moves onto
//! the VM when it is claimed or created, in the same transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::agents::{db, forget_vm, site_vm_id};
use super::auth::Caller;
use super::jobs::{new_job, store_error};
use super::model::{
    now_ms, AgentStatus, Job, JobKind, Lease, OpError, Role, SiteVm, Usage, VmRequest,
};
use super::placement;
use super::store::StoreError;
use super::vms::{err, resources, view};
use super::SiteCore;
use crate::agent::model::{OpOutput, Vm};
use crate::api::ApiError;

impl SiteCore {
    /// The lease deadline for a request asking `seconds`.
    pub(crate) fn lease_until(&self, seconds: Option<u64>) -> Result<u64, ApiError> {
        let s = seconds.unwrap_or(self.config.lease_default_seconds);
        if s == 0 || s > self.config.lease_max_seconds {
            return Err(ApiError::bad_request(format!(
                "lease-seconds must be between 1 and {} (this site's maximum), not {s}",
                self.config.lease_max_seconds
            )));
        }
        Ok(now_ms() + s * 1000)
    }

    /// Checks a request and builds its job, with the quota it reserves.
    pub fn request_job(&self, caller: &Caller, req: VmRequest) -> Result<Job, ApiError> {
        req.validate()?;
        self.lease_until(req.lease_seconds)?;
        let mut reserved = Usage::vm(u64::from(req.logical_cpus), req.main_memory_mib);
        if let Some(id) = &req.vm {
            let v = self
                .store
                .vm(id)
                .map_err(db)?
                .filter(|v| may_claim(v, caller));
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
        let params = serde_json::to_value(&req).unwrap_or_default();
        let mut job = new_job(&caller.name, JobKind::Request, req.vm.clone(), params);
        job.reserved = reserved;
        Ok(job)
    }

    /// The request job: claim or create, start, provision. A request that fails
    /// after it got a VM it did not hold before destroys that VM (an unknown guest
    /// state must reach no one), its quota counted until it is gone.
    pub async fn run_request(self: &Arc<Self>, job: &Job) -> Result<Value, OpError> {
        match self.request_steps(job).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.discard_failed(job, e).await),
        }
    }

    /// Destroys the VM a failed request got, and forgets it (giving its quota
    /// back) in one transaction; if that fails the VM stays the user's, to release.
    async fn discard_failed(&self, job: &Job, mut e: OpError) -> OpError {
        let Ok(Some(job)) = self.store.job(&job.id) else {
            return e;
        };
        let (Some(id), true, false) = (
            job.vm.clone(),
            job.step["claimed"] == true,
            job.step["was-owner"] == true,
        ) else {
            return e;
        };
        let Ok(Some(v)) = self.store.vm(&id) else {
            return e;
        };
        if v.owner.as_deref() != Some(job.owner.as_str()) {
            return e;
        }
        let gone = self
            .destroy_on_agent(&v, &format!("{}:discard", job.id))
            .await;
        let forgotten = gone.and_then(|()| {
            self.store
                .write(|t| match t.vm(&id)? {
                    Some(v) if v.owner.as_deref() == Some(job.owner.as_str()) => forget_vm(t, &v),
                    _ => Ok(()),
                })
                .map_err(store_error)
        });
        match forgotten {
            Ok(()) => e.message.push_str(&format!("; VM {id} was destroyed")),
            Err(d) => e.message.push_str(&format!(
                "; VM {id} could not be destroyed ({}) and stays yours: release it",
                d.message
            )),
        }
        e
    }

    async fn request_steps(self: &Arc<Self>, job: &Job) -> Result<Value, OpError> {
        let req: VmRequest = serde_json::from_value(job.params.clone())
            .map_err(|e| err("invalid-argument", format!("job parameters: {e}")))?;
        let until = self
            .lease_until(req.lease_seconds)
            .map_err(|e| err("invalid-argument", e.message))?;
        let mut job = job.clone();
        if job.step["claimed"] != true {
            let vm_id = match self.claim(&job, &req, until)? {
                Some(id) => id,
                // The VM named is not free (any more): nothing else will do.
                None if req.vm.is_some() => {
                    return Err(err(
                        "invalid-state",
                        format!(
                            "VM {} is no longer free or yours, or its lease expired",
                            req.vm.as_deref().unwrap_or_default()
                        ),
                    ))
                }
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
        let ready = req.wait_for_guest && self.wait_usable(&job, &vm_id).await?;
        if !ready && req.wait_for_guest && self.config.ready_timeout_seconds > 0 {
            tracing::warn!(
                vm = vm_id,
                job = job.id,
                "the VM runs but its guest agent did not answer in time"
            );
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

    /// Claims a free clean VM that matches (or the one named), moving the job's reservation
    /// onto it, in one transaction. `None` when nothing matches.
    fn claim(&self, job: &Job, req: &VmRequest, until: u64) -> Result<Option<String>, OpError> {
        // An empty pool has nothing to claim: no write transaction at all.
        if req.vm.is_none() && self.store.pool_is_empty().map_err(store_error)? {
            return Ok(None);
        }
        // Nothing claimed is nothing written: rolled back, not committed.
        self.store
            .write_if(|t| {
                let agents_up: Vec<String> = t
                    .agents()?
                    .into_iter()
                    .filter(|a| a.status == AgentStatus::Up)
                    .map(|a| a.id)
                    .collect();
                let candidate = match &req.vm {
                    Some(id) => t.vm(id)?,
                    None => t.pooled_vm(
                        u64::from(req.logical_cpus),
                        req.main_memory_mib,
                        req.template.as_deref(),
                        |v| {
                            agents_up.contains(&v.agent)
                                && req
                                    .template
                                    .as_ref()
                                    .is_none_or(|t| v.template.as_ref() == Some(t))
                                && req
                                    .os_family
                                    .as_ref()
                                    .is_none_or(|o| v.os_family.as_ref() == Some(o))
                                && matches!(v.state.as_str(), "running" | "stopped")
                        },
                    )?,
                };
                let Some(mut v) = candidate else {
                    return Ok(None);
                };
                let was_owner = v.owner.as_deref() == Some(job.owner.as_str());
                if v.owner.is_some() && !was_owner {
                    return Ok(None);
                }
                // A free VM that is not clean goes to no tenant (only an admin
                // names one, knowing what is on it).
                if v.owner.is_none()
                    && !v.clean
                    && !t.user(&job.owner)?.is_some_and(|u| u.role == Role::Admin)
                {
                    return Ok(None);
                }
                if v.lease.is_some_and(|l| l.expired) {
                    return Ok(None);
                }
                v.owner = Some(job.owner.clone());
                v.clean = false;
                v.lease = Some(Lease {
                    until_ms: until,
                    expired: false,
                });
                v.updated_ms = now_ms();
                t.put_vm(&v)?;
                let mut j = t.job(&job.id)?.unwrap_or_else(|| job.clone());
                // The reservation becomes the VM's, recomputed here: the VM may have
                // changed hands since the request was submitted.
                let held = if was_owner {
                    Usage::default()
                } else {
                    resources(&v)
                };
                t.move_usage(&j.owner, j.reserved, held)?;
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
                let held = self.store.memory_by_agent().map_err(store_error)?;
                let mut placing = self.placing.lock().unwrap_or_else(|p| p.into_inner());
                let pending: Vec<(String, u64)> = placing.values().cloned().collect();
                let chosen = placement::choose(&agents, held, &pending, req, self.config.placement)
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
            clean: false,
            ready: false,
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
                // The reservation becomes the VM's (its actual size, should it differ).
                t.move_usage(&j.owner, j.reserved, resources(&rec))?;
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
}

/// May `caller` request VM `v` by its id: theirs, or free and clean (an admin may
/// also take a free VM that is not clean).
fn may_claim(v: &SiteVm, caller: &Caller) -> bool {
    match &v.owner {
        Some(o) => o == &caller.name,
        None => v.clean || caller.is_admin(),
    }
}
