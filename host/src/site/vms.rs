//! VM jobs on VMs users hold: manage (an agent operation on the VM's agent), clone,
//! migrate and release. Requests are in [`super::request`], leases in
//! [`super::leases`]. Every agent call carries the idempotency key `<job>:<step>`, and
//! each step's result is checkpointed, so a job resumed after a site crash picks up
//! where it was and runs nothing twice.

use std::collections::BTreeMap;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::agents::{db, forget_vm, site_vm_id};
use super::auth::Caller;
use super::jobs::store_error;
use super::model::{now_ms, AgentStatus, Job, JobKind, Lease, OpError, SiteVm, Usage};
use super::store::StoreError;
use super::SiteCore;
use crate::agent::model::{OpOutput, Vm};
use crate::api::ApiError;

/// A job error of `kind`.
pub(crate) fn err(kind: &str, message: impl Into<String>) -> OpError {
    OpError {
        kind: kind.into(),
        message: message.into(),
    }
}

/// What a VM counts against its owner's quota.
pub(crate) fn resources(v: &SiteVm) -> Usage {
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
    v.ready &= v.state == "running";
    v
}

impl SiteCore {
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

    /// Records the VM state an agent operation reported.
    pub(crate) fn record_vm_state(&self, id: &str, vm: Option<&Vm>) -> Result<(), OpError> {
        let Some(vm) = vm else { return Ok(()) };
        self.store
            .write(|t| {
                if let Some(mut v) = t.vm(id)? {
                    let state = format!("{:?}", vm.state).to_lowercase();
                    // Whatever it was, a VM that changed state is usable again
                    // only once its guest agent has answered.
                    if state != v.state {
                        v.ready = false;
                    }
                    v.state = state;
                    v.updated_ms = now_ms();
                    t.put_vm(&v)?;
                }
                Ok(())
            })
            .map_err(store_error)
    }

    /// The VM a job acts on: its site id and record.
    pub(crate) fn job_vm(&self, job: &Job) -> Result<(String, SiteVm), OpError> {
        let id = job
            .vm
            .clone()
            .ok_or_else(|| err("invalid-argument", "job names no VM"))?;
        let v = self
            .store
            .vm(&id)
            .map_err(store_error)?
            .ok_or_else(|| err("not-found", format!("VM {id} vanished")))?;
        Ok((id, v))
    }

    /// A manage job: one agent operation on the job's VM.
    pub async fn run_action(&self, job: &Job) -> Result<Value, OpError> {
        let (id, v) = self.job_vm(job)?;
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
        if matches!(job.kind, JobKind::Start | JobKind::Resume) {
            self.wait_usable(job, &id).await?;
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
            clean: false,
            ready: false,
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
        let checked = match self.agents.client(&to) {
            Ok(c) => c
                .get::<Value>(&format!("/v1/vms/{agent_vm}"))
                .await
                .map(|_| ())
                .map_err(|e| e.message),
            Err(e) => Err(e.message),
        };
        if let Err(why) = checked {
            return Err(self
                .unconfirmed_migration(job, &v, &to, &agent_vm, why)
                .await);
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

    /// A migration the source reported done that the destination did not confirm.
    /// Where the source still has the VM, its record stays; otherwise the record
    /// follows the VM to the destination with state `unknown` (its owner and lease
    /// kept), and the destination's next check finds it, or finds it gone. Either
    /// way no check takes it for a VM nobody owns.
    async fn unconfirmed_migration(
        &self,
        job: &Job,
        v: &SiteVm,
        to: &str,
        agent_vm: &str,
        why: String,
    ) -> OpError {
        let from = &v.agent;
        let still_here = match self.agents.client(from) {
            Ok(c) => c
                .get::<Value>(&format!("/v1/vms/{}", v.agent_vm))
                .await
                .is_ok(),
            Err(_) => false,
        };
        if still_here {
            return err(
                "backend",
                format!("agent {from} reported VM {} migrated to agent {to}, but it still has it and agent {to} does not ({why})", v.id),
            );
        }
        let recorded = self.store.write(|t| {
            let Some(mut cur) = t.vm(&v.id)? else {
                return Ok(());
            };
            cur.agent = to.to_string();
            cur.agent_vm = agent_vm.to_string();
            cur.state = "unknown".into();
            cur.ready = false;
            cur.updated_ms = now_ms();
            t.put_vm(&cur)?;
            let mut j = t.job(&job.id)?.unwrap_or_else(|| job.clone());
            j.step = json!({ "migrated": "unconfirmed" });
            t.put_job(
                &j,
                Some(&format!(
                    "agent {from} reported the VM migrated; agent {to} did not confirm it"
                )),
            )
        });
        let whereabouts = match recorded {
            Ok(()) => format!("the site now expects it on agent {to} and learns its state at that agent's next check"),
            Err(e) => format!("recording it on agent {to} failed too: {e}"),
        };
        err(
            "backend",
            format!(
                "agent {from} reported VM {} migrated, but agent {to} did not confirm it ({why}); {whereabouts}",
                v.id
            ),
        )
    }

    /// Destroys VM `v` on its agent (powered off first by the driver); a VM the
    /// agent no longer has counts as destroyed.
    pub(crate) async fn destroy_on_agent(&self, v: &SiteVm, key: &str) -> Result<(), OpError> {
        let r = self
            .agents
            .run_op(
                &v.agent,
                &format!("/v1/vms/{}/destroy", v.agent_vm),
                json!({}),
                key,
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.kind == "not-found" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Release: the VM is destroyed with its disks and its owner's quota given back
    /// in one transaction; under the `pool` policy a fresh VM of the same profile is
    /// then made from the template for the next request (nothing of this tenant
    /// reaches the next one). A VM without a known template is not replaced.
    pub async fn run_release(&self, job: &Job) -> Result<Value, OpError> {
        let id = job
            .vm
            .clone()
            .ok_or_else(|| err("invalid-argument", "job names no VM"))?;
        let pool = self.config.release_policy == super::config::ReleasePolicy::Pool;
        let job = self
            .store
            .job(&job.id)
            .map_err(store_error)?
            .unwrap_or_else(|| job.clone());
        if job.step["destroyed"] != true {
            let Some(v) = self.store.vm(&id).map_err(store_error)? else {
                return Ok(json!({ "released": id, "already-gone": true }));
            };
            self.destroy_on_agent(&v, &format!("{}:destroy", job.id))
                .await?;
            let step = json!({ "destroyed": true, "agent": v.agent, "vm": v });
            self.store
                .write(|t| {
                    if let Some(v) = t.vm(&id)? {
                        forget_vm(t, &v)?;
                    }
                    let mut j = t.job(&job.id)?.unwrap_or_else(|| job.clone());
                    j.step = step.clone();
                    t.put_job(&j, Some(&format!("destroyed VM {id}")))
                })
                .map_err(store_error)?;
        }
        let job = self.store.job(&job.id).map_err(store_error)?.unwrap_or(job);
        let old: Option<SiteVm> = serde_json::from_value(job.step["vm"].clone()).ok();
        let pooled = match (pool, old) {
            (true, Some(old)) if old.template.is_some() => {
                match self.refill_pool(&job, &old).await {
                    Ok(new) => Some(new),
                    Err(e) => {
                        tracing::warn!(
                            job = job.id,
                            vm = id,
                            "released, but no fresh VM replaces it in the pool: {}",
                            e.message
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(json!({ "released": id, "destroyed": true, "pooled": pooled }))
    }

    /// Makes a fresh free VM of `old`'s profile from its template on its agent.
    async fn refill_pool(&self, job: &Job, old: &SiteVm) -> Result<String, OpError> {
        let name = format!("gve-pool-{}", &job.id[job.id.len() - 12..]);
        let template = old.template.clone().unwrap_or_default();
        let labels = BTreeMap::from([
            ("gve.job".to_string(), job.id.clone()),
            ("gve.template".to_string(), template.clone()),
        ]);
        let profile = json!({
            "name": name, "logical-cpus": old.logical_cpus, "main-memory-mib": old.main_memory_mib,
            "template": template, "os-family": old.os_family, "labels": labels,
        });
        let op = self
            .agents
            .run_op(
                &old.agent,
                "/v1/vms",
                profile,
                &format!("{}:refill", job.id),
            )
            .await?;
        let vm: Vm = op.result.ok_or_else(|| {
            err(
                "backend",
                format!("agent {}: create returned no VM", old.agent),
            )
        })?;
        let id = site_vm_id(&old.agent, &vm.id);
        let rec = SiteVm {
            id: id.clone(),
            agent: old.agent.clone(),
            agent_vm: vm.id.clone(),
            name: vm.name.clone(),
            owner: None,
            logical_cpus: vm.logical_cpus,
            main_memory_mib: vm.main_memory_mib,
            template: old.template.clone(),
            os_family: vm.os_family.clone().or(old.os_family.clone()),
            state: format!("{:?}", vm.state).to_lowercase(),
            lease: None,
            software: Default::default(),
            clean: true,
            ready: false,
            updated_ms: now_ms(),
        };
        self.store
            .write(|t| {
                match t.vm(&id)? {
                    // Adopted by a health check meanwhile: it is this job's fresh VM.
                    Some(cur) if cur.owner.is_some() => {
                        Err(StoreError::Storage(format!("VM {id} was claimed already")))
                    }
                    _ => t.put_vm(&rec),
                }
            })
            .map_err(store_error)?;
        Ok(id)
    }
}
