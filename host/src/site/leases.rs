//! Leases: every allocation has a deadline (the site's default, at most its maximum,
//! renewable before it passes). At the deadline the owner's access is blocked and a
//! job stops the VM, in one transaction; the owner sees why on every refused call.

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::agents::db;
use super::auth::Caller;
use super::jobs::{new_job, store_error};
use super::model::{now_ms, Job, JobKind, Lease, OpError, SiteVm};
use super::vms::err;
use super::SiteCore;
use crate::api::ApiError;

impl SiteCore {
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
    /// owner's access at once) and an expire job stops their VMs. Every minute,
    /// staging is swept and retention runs on a blocking thread of its own: a
    /// removal of millions takes minutes, and leases keep expiring meanwhile.
    pub fn spawn_leases(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut ticks = 0u64;
            let pruning = Arc::new(std::sync::atomic::AtomicBool::new(false));
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Err(e) = me.expire_due().await {
                    tracing::error!("lease check: {e}");
                }
                ticks += 1;
                if ticks % 120 == 60 {
                    me.sweep_staging().await;
                    // One pass at a time; one still running skips this turn.
                    if !pruning.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        let (core, pruning) = (me.clone(), pruning.clone());
                        tokio::task::spawn_blocking(move || {
                            let pass = std::panic::AssertUnwindSafe(|| core.prune_finished());
                            if std::panic::catch_unwind(pass).is_err() {
                                tracing::error!(
                                    "a retention pass panicked; the next runs in a minute"
                                );
                            }
                            pruning.store(false, std::sync::atomic::Ordering::Release);
                        });
                    }
                }
            }
        })
    }

    async fn expire_due(&self) -> Result<(), ApiError> {
        let now = now_ms();
        let due: Vec<SiteVm> = self
            .store
            .leases_due(now)
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
                self.scheduler
                    .push(&owner, job.id.clone(), super::scheduler::Lane::System);
            }
        }
        Ok(())
    }
}
