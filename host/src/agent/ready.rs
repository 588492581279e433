//! Whether a VM is usable: its guest agent answers. Guest operations on a VM that
//! is still booting wait for it (bounded) instead of failing, every guest
//! operation takes a turn at its VM's gate ([`super::guest_gate`]), and
//! `GET /v1/vms/{id}/ready?wait-ms=N` answers `{"ready": bool, ...}` once the
//! guest agent answers or the wait is over.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use super::guest::channel_command;
use super::guest_gate::PROBE;
use super::model::{OpError, VmState};
use super::AgentCore;
use crate::api::ApiError;
use crate::plugin::bindings::types::ExecRequest;
use crate::plugin::{ErrorKind, PluginError};

/// How long a guest operation waits for the guest agent of a VM that is booting.
pub const GUEST_WAIT: Duration = Duration::from_secs(60);
/// Longest `wait-ms` of `GET /v1/vms/{id}/ready`.
pub const MAX_READY_WAIT_MS: u64 = 60_000;
/// How long one probe through the guest-agent channel may wait for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Between probes of a guest agent that is not connected yet.
const PROBE_PAUSE: Duration = Duration::from_millis(250);
/// Between probes while libvirt reports the VM's guest agent disconnected (the
/// event of its connecting brings the next probe at once; the timer only covers
/// a lost event).
const EVENT_PROBE_PAUSE: Duration = Duration::from_secs(2);
/// Shortest pause between probes just after the VM's guest agent connected:
/// qemu-ga answers its first ping 76 ms (one guest) to 3 s (16 booting at once
/// on 2 cores) after libvirt reports it connected (bench/results/fig4.md,
/// "connect → answer").
const CONNECTED_PROBE_PAUSE: Duration = Duration::from_millis(10);

/// The pause before the next probe, `since` after the guest agent connected: a
/// tenth of that time, from [`CONNECTED_PROBE_PAUSE`] up to [`PROBE_PAUSE`]. What
/// the pause adds to readiness stays within about a tenth of the time the guest
/// agent took to answer, and a guest slow to answer is asked about 45 times in
/// its first 3 s instead of 200 (every 10 ms, as before: at N = 16 gve used 24%
/// more CPU than the direct path).
pub fn connected_pause(since: Duration) -> Duration {
    (since / 10).clamp(CONNECTED_PROBE_PAUSE, PROBE_PAUSE)
}

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

impl Readiness {
    /// The guest agent answered.
    fn answered() -> Readiness {
        Readiness {
            ready: true,
            guest_agent: true,
            reason: None,
        }
    }

    /// Nothing to wait for: this agent has no guest operations.
    fn no_guest_agent() -> Readiness {
        Readiness {
            ready: true,
            guest_agent: false,
            reason: None,
        }
    }

    /// The guest agent did not answer, for `reason`.
    fn not_ready(reason: String) -> Readiness {
        Readiness {
            ready: false,
            guest_agent: true,
            reason: Some(reason),
        }
    }
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

    /// Probes `vm`'s guest agent until it answers or `within` has passed: a
    /// `guest-ping` through the driver's guest-agent channel when the guest plugin
    /// goes that way, else the guest export running `true`. A VM
    /// that is not running is never ready; an agent without guest operations has
    /// nothing to wait for.
    pub async fn wait_ready(&self, vm: &str, within: Duration) -> Result<Readiness, OpError> {
        let Ok(guest) = self.guest() else {
            return Ok(Readiness::no_guest_agent());
        };
        let endpoint = self.driver.endpoint().to_string();
        let end = Instant::now() + within;
        // A single probe (no wait) needs no events.
        let mut events = if within.is_zero() {
            None
        } else {
            self.ready_events.subscribe().await
        };
        // When the VM's guest agent last connected, as this wait heard it.
        let mut connected_at: Option<Instant> = None;
        loop {
            // Noted before the probe: an agent that connects during it wakes the wait.
            let seen = events.as_ref().map(|e| e.seen(vm));
            let state = self.registry.vm(vm).ok().flatten().map(|r| r.vm.state);
            if state != Some(VmState::Running) {
                return Ok(Readiness::not_ready(format!("VM {vm} is not running")));
            }
            let answer = if guest.via_channel {
                // The guest plugin's way in is the driver's qemu-ga channel: that
                // agent answering a ping is what the plugin needs (a command run
                // in a guest still booting can take far longer than the answer).
                match channel_command(&self.driver, &self.guest_gates, vm, PROBE, PROBE_TIMEOUT)
                    .await
                {
                    Ok(_) => Ok(()),
                    // Nothing was sent: libvirt has not answered earlier calls.
                    Err(e) if e.not_started() => return Ok(Readiness::not_ready(e.to_string())),
                    Err(e) => Err(Some((e.kind, e.to_string()))),
                }
            } else {
                let probe = ExecRequest {
                    argv: vec!["true".into()],
                    env: Vec::new(),
                    cwd: None,
                    stdin: Vec::new(),
                    timeout_ms: PROBE_TIMEOUT.as_millis() as u32,
                    output_limit: 0,
                };
                match guest.session.exec(vm, &probe).await {
                    Ok(_) => Ok(()),
                    Err(PluginError::NotSupported { .. }) => Err(None),
                    Err(e) => Err(Some((e.kind(), e.to_string()))),
                }
            };
            let why = match answer {
                Err(None) => return Ok(Readiness::no_guest_agent()),
                // A guest agent that hangs (its circuit is open) is not waited for:
                // that would hold this operation's turn for nothing.
                Err(Some((_, e))) if self.guest_gates.hung(&endpoint, vm) => {
                    return Ok(Readiness::not_ready(e))
                }
                Err(Some((ErrorKind::Unavailable | ErrorKind::Timeout, e))) => e,
                // An answer, even an error of the probe command's own: the guest
                // agent is there.
                _ => {
                    self.guest_gates.set_answered(&endpoint, vm, true);
                    return Ok(Readiness::answered());
                }
            };
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Readiness::not_ready(format!(
                    "the guest agent of VM {vm} did not answer within {} ms: {why}",
                    within.as_millis()
                )));
            }
            // While libvirt says its guest agent is disconnected, the event of its
            // connecting says when to probe; after it connected (qemu-ga not
            // answering yet) a timer growing from 10 ms does; otherwise (not heard
            // of) the short timer does.
            let pause = match (seen, connected_at) {
                (Some(s), _) if s.connected == Some(false) => EVENT_PROBE_PAUSE,
                (Some(s), Some(at)) if s.connected == Some(true) => connected_pause(at.elapsed()),
                _ => PROBE_PAUSE,
            };
            let nap = tokio::time::sleep(pause.min(left));
            match (events.as_mut(), seen) {
                (Some(ev), Some(seen)) => {
                    tokio::select! {
                        _ = nap => {
                            // A dead connection delivers nothing: the timer only.
                            if !ev.alive() {
                                events = None;
                            }
                        }
                        again = ev.connected_again(vm, seen.connects) => {
                            if again {
                                connected_at = Some(Instant::now());
                            } else {
                                events = None;
                            }
                        }
                    }
                }
                _ => nap.await,
            }
        }
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
