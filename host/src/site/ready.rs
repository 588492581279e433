//! `ready`: a VM is usable once its guest agent answers. A request (and a start)
//! waits for that after the VM runs, asking the VM's agent
//! (`GET /v1/vms/{id}/ready?wait-ms=N`, long-polled), so that a client that chains
//! `request --wait` and `exec` never finds the guest still booting.

use std::time::{Duration, Instant};

use serde_json::json;

use super::agents::agent_error;
use super::jobs::store_error;
use super::model::{Job, OpError};
use super::SiteCore;
use crate::agent::ready::Readiness;

/// Longest single long poll of an agent's readiness.
const POLL_MS: u64 = 30_000;

impl SiteCore {
    /// Waits (at most `ready-timeout-seconds`) until the guest agent of VM `id`
    /// answers, then records it `ready`. Says whether it became ready; a VM whose
    /// guest agent never answers stays running and not ready (the job still
    /// succeeds: the VM is the user's to use or release).
    pub(crate) async fn wait_usable(&self, job: &Job, id: &str) -> Result<bool, OpError> {
        let limit = Duration::from_secs(self.config.ready_timeout_seconds);
        if limit.is_zero() {
            return Ok(false);
        }
        self.update_job(
            &job.id,
            Some("running; waiting for its guest agent to answer"),
            |j, _| {
                j.step["started"] = json!(true);
                Ok(())
            },
        )
        .map_err(store_error)?;
        let end = Instant::now() + limit;
        loop {
            let v = self
                .store
                .vm(id)
                .map_err(store_error)?
                .ok_or_else(|| OpError {
                    kind: "not-found".into(),
                    message: format!("VM {id} vanished"),
                })?;
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let wait = (left.as_millis() as u64).min(POLL_MS);
            let c = self
                .agents
                .client(&v.agent)
                .map_err(|e| agent_error(&v.agent, e))?;
            let path = format!("/v1/vms/{}/ready?wait-ms={wait}", v.agent_vm);
            match c.get::<Readiness>(&path).await {
                Ok(r) if r.ready => {
                    self.store
                        .write(|t| {
                            if let Some(mut cur) = t.vm(id)? {
                                cur.ready = cur.state == "running";
                                t.put_vm(&cur)?;
                            }
                            Ok(())
                        })
                        .map_err(store_error)?;
                    return Ok(true);
                }
                Ok(_) => {}
                // Not running any more: nothing to wait for.
                Err(e) if e.status == 409 => return Ok(false),
                Err(e) => {
                    tracing::debug!(vm = id, "readiness: {}", e.message);
                    tokio::time::sleep(Duration::from_secs(1).min(left)).await;
                }
            }
        }
    }
}
