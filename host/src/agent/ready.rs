//! Whether a VM is usable: its guest agent answers. Guest operations on a VM that
//! is still booting wait for it (bounded) instead of failing, every guest
//! operation takes a turn at its VM's gate ([`super::guest_gate`]), and
//! `GET /v1/vms/{id}/ready?wait-ms=N` answers `{"ready": bool, ...}` once the
//! guest agent answers or the wait is over.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use super::model::{OpError, VmState};
use super::AgentCore;
use crate::api::ApiError;
use crate::plugin::bindings::types::ExecRequest;
use crate::plugin::{ErrorKind, PluginError};

/// How long a guest operation waits for the guest agent of a VM that is booting.
pub const GUEST_WAIT: Duration = Duration::from_secs(60);
/// Longest `wait-ms` of `GET /v1/vms/{id}/ready`.
pub const MAX_READY_WAIT_MS: u64 = 60_000;
/// Between probes of a guest agent that is not connected yet.
const PROBE_PAUSE: Duration = Duration::from_millis(250);

/// The answer of `GET /v1/vms/{id}/ready`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Readiness {
    /// The guest agent answers (or the VM has none this agent could wait for).
    pub ready: bool,
    /// Whether a guest agent was asked (false: the agent has no guest operations).
    pub guest_agent: bool,
    /// Why it is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn op_error(kind: ErrorKind, message: String) -> OpError {
    OpError {
        kind: kind.as_str().to_string(),
        message,
    }
}

impl AgentCore {
    /// A turn for one guest operation on `vm`, once its guest agent answers:
    /// waits for the turn and for a booting guest's agent, each at most `within`
    /// (the caller's budget: a command's timeout, else [`GUEST_WAIT`]); fails at
    /// once while the VM's guest agent is known hung.
    pub async fn guest_turn(
        &self,
        vm: &str,
        within: Duration,
    ) -> Result<OwnedSemaphorePermit, OpError> {
        let endpoint = self.driver.endpoint().to_string();
        let turn = self
            .guest_gates
            .op_turn(&endpoint, vm, within)
            .await
            .map_err(|e| op_error(e.kind, e.message))?;
        if !self.guest_gates.answered(&endpoint, vm) {
            let r = self.wait_ready(vm, within).await?;
            if !r.ready {
                return Err(op_error(
                    ErrorKind::Unavailable,
                    r.reason
                        .unwrap_or_else(|| format!("the guest agent of VM {vm} does not answer")),
                ));
            }
        }
        Ok(turn)
    }

    /// Probes `vm`'s guest agent until it answers or `within` has passed. A VM
    /// that is not running is never ready; an agent without guest operations has
    /// nothing to wait for.
    pub async fn wait_ready(&self, vm: &str, within: Duration) -> Result<Readiness, OpError> {
        let Ok(guest) = self.guest() else {
            return Ok(Readiness {
                ready: true,
                guest_agent: false,
                reason: None,
            });
        };
        let endpoint = self.driver.endpoint().to_string();
        let end = Instant::now() + within;
        let probe = ExecRequest {
            argv: vec!["true".into()],
            env: Vec::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout_ms: 5_000,
            output_limit: 0,
        };
        loop {
            let state = self.registry.vm(vm).ok().flatten().map(|r| r.vm.state);
            if state != Some(VmState::Running) {
                return Ok(Readiness {
                    ready: false,
                    guest_agent: true,
                    reason: Some(format!("VM {vm} is not running")),
                });
            }
            let why = match guest.session.exec(vm, &probe).await {
                Ok(_) => {
                    self.guest_gates.set_answered(&endpoint, vm, true);
                    return Ok(Readiness {
                        ready: true,
                        guest_agent: true,
                        reason: None,
                    });
                }
                Err(PluginError::NotSupported { .. }) => {
                    return Ok(Readiness {
                        ready: true,
                        guest_agent: false,
                        reason: None,
                    })
                }
                // A guest agent that hangs (its circuit is open) is not waited for:
                // that would hold this operation's turn for nothing.
                Err(e) if !self.not_hung(vm) => {
                    return Ok(Readiness {
                        ready: false,
                        guest_agent: true,
                        reason: Some(e.to_string()),
                    })
                }
                Err(e) if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout) => {
                    e.to_string()
                }
                // Any other error is an answer (of the probe command's own): the
                // guest agent is there.
                Err(_) => {
                    self.guest_gates.set_answered(&endpoint, vm, true);
                    return Ok(Readiness {
                        ready: true,
                        guest_agent: true,
                        reason: None,
                    });
                }
            };
            if Instant::now() + PROBE_PAUSE >= end {
                return Ok(Readiness {
                    ready: false,
                    guest_agent: true,
                    reason: Some(format!(
                        "the guest agent of VM {vm} did not answer within {} ms: {why}",
                        within.as_millis()
                    )),
                });
            }
            tokio::time::sleep(PROBE_PAUSE).await;
        }
    }

    /// Whether `vm`'s guest agent is not known to hang (its circuit is closed).
    pub fn not_hung(&self, vm: &str) -> bool {
        !self.guest_gates.hung(self.driver.endpoint(), vm)
    }

    /// Serves `GET /v1/vms/{id}/ready?wait-ms=N` (default 0: probe once).
    pub async fn handle_ready(
        &self,
        vm: &str,
        wait_ms: Option<String>,
    ) -> Result<Readiness, ApiError> {
        let ms = match wait_ms {
            None => 0,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|m| *m <= MAX_READY_WAIT_MS)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "wait-ms must be between 0 and {MAX_READY_WAIT_MS}, not '{v}'"
                    ))
                })?,
        };
        self.wait_ready(vm, Duration::from_millis(ms))
            .await
            .map_err(|e| {
                let kind = ErrorKind::parse(&e.kind).unwrap_or(ErrorKind::Backend);
                ApiError::new(ApiError::status_of(kind), &e.kind, e.message)
            })
    }
}
