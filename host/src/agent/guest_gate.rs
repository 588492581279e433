//! The gate in front of each VM's in-guest agent: one command at a time (the
//! channel to qemu-ga is serial anyway; more would only hold driver instances while
//! they queue in libvirt), waits bounded by the caller's timeout, and a circuit
//! breaker: once a command to a VM's guest agent times out, further commands to it
//! fail at once (`unavailable`) instead of each holding an instance for its whole
//! timeout, until a short `guest-ping` (at most one every [`PROBE_EVERY`]) is
//! answered again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::plugin::{DriverError, ErrorKind};

/// How often a VM whose guest agent stopped answering is probed, at most.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// The probe's own budget.
pub const PROBE_TIMEOUT_MS: u32 = 2_000;
/// A failure after this long is the guest agent not answering (one that is not
/// connected yet fails at once).
const HUNG_AFTER: Duration = Duration::from_secs(3);
/// Gates kept before idle ones are dropped.
const PRUNE_AT: usize = 1024;
/// Guest operations on one VM at once; more wait their turn (bounded).
pub const OPS_PER_VM: usize = 4;

/// Per-VM gates, keyed by (endpoint, VM).
#[derive(Default)]
pub struct GuestGates {
    vms: Mutex<HashMap<(String, String), Arc<Gate>>>,
}

struct Gate {
    turn: Arc<Semaphore>,
    /// Guest operations (exec, copy, stat) on the VM at once.
    ops: Arc<Semaphore>,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    /// When a command last timed out, while the circuit is open.
    hung_since: Option<Instant>,
    last_probe: Option<Instant>,
    /// The guest agent answered since the VM last (re)started or was found without one.
    answered: bool,
    /// Operations holding (or waiting for) every turn at once: migrations.
    exclusive: u32,
}

/// What the gate decided for one command.
pub enum Pass {
    /// Go ahead; report how it went with [`Ticket::done`].
    Go(Ticket),
    /// The circuit is open but a probe is due: send [`PROBE`] first, then report.
    Probe(Ticket),
}

/// The qemu-ga command that probes an open circuit.
pub const PROBE: &str = r#"{"execute":"guest-ping"}"#;

/// Every guest-operation turn of one VM (see [`GuestGates::all_turns`]), held
/// until dropped.
pub struct AllTurns {
    gate: Arc<Gate>,
    _turns: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for AllTurns {
    fn drop(&mut self) {
        let mut s = lock(&self.gate.state);
        s.exclusive = s.exclusive.saturating_sub(1);
    }
}

fn lock(state: &Mutex<GateState>) -> std::sync::MutexGuard<'_, GateState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A command's turn at a VM's guest agent (held until dropped).
pub struct Ticket {
    gate: Arc<Gate>,
    _turn: tokio::sync::OwnedSemaphorePermit,
    started: Instant,
}

impl GuestGates {
    fn gate(&self, endpoint: &str, vm: &str) -> Arc<Gate> {
        let mut m = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= PRUNE_AT {
            // Gates nobody holds (a turn or an operation's permit holds a clone of
            // its semaphore) and whose circuit is closed carry nothing.
            m.retain(|_, g| {
                Arc::strong_count(g) > 1
                    || Arc::strong_count(&g.ops) > 1
                    || Arc::strong_count(&g.turn) > 1
                    || g.state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .hung_since
                        .is_some()
            });
        }
        m.entry((endpoint.to_string(), vm.to_string()))
            .or_insert_with(|| {
                Arc::new(Gate {
                    turn: Arc::new(Semaphore::new(1)),
                    ops: Arc::new(Semaphore::new(OPS_PER_VM)),
                    state: Mutex::new(GateState::default()),
                })
            })
            .clone()
    }

    /// A turn for one guest operation (exec, copy, stat) on `vm`, waiting at most
    /// `within`: at most [`OPS_PER_VM`] hold one, so a burst on one VM holds few
    /// guest-plugin instances. While the VM's circuit is open (and no probe is due)
    /// it fails at once.
    pub async fn op_turn(
        &self,
        endpoint: &str,
        vm: &str,
        within: Duration,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, DriverError> {
        let gate = self.gate(endpoint, vm);
        self.open_circuit(&gate, vm)?;
        let turn = tokio::time::timeout(within, gate.ops.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                let migrating = lock(&gate.state).exclusive > 0;
                let why = if migrating {
                    format!(
                        "VM {vm} is being migrated (or waits to be): guest operations wait for it"
                    )
                } else {
                    format!("VM {vm} already has {OPS_PER_VM} guest operations running")
                };
                DriverError::new(
                    ErrorKind::Unavailable,
                    format!("{why}; no turn came within {} ms", within.as_millis()),
                )
            })?;
        self.open_circuit(&gate, vm)?;
        Ok(turn)
    }

    /// Every guest-operation turn on `vm` at once, waiting at most `within` for the
    /// running ones to end: held by an operation (a migration) that no exec or copy
    /// may overlap. Later guest operations queue behind it.
    pub async fn all_turns(
        &self,
        endpoint: &str,
        vm: &str,
        within: Duration,
    ) -> Result<AllTurns, DriverError> {
        let gate = self.gate(endpoint, vm);
        lock(&gate.state).exclusive += 1;
        // Counted from here, so the count drops however this ends.
        let mut held = AllTurns {
            gate: gate.clone(),
            _turns: None,
        };
        let turns = tokio::time::timeout(
            within,
            gate.ops.clone().acquire_many_owned(OPS_PER_VM as u32),
        )
        .await
        .ok()
        .and_then(Result::ok);
        match turns {
            Some(t) => {
                held._turns = Some(t);
                Ok(held)
            }
            None => Err(DriverError::new(
                ErrorKind::Unavailable,
                format!(
                    "VM {vm} has guest operations (exec, copy) running; they did not end within {} ms",
                    within.as_millis()
                ),
            )),
        }
    }

    /// Fails when `vm`'s circuit is open and no probe is due.
    fn open_circuit(&self, gate: &Gate, vm: &str) -> Result<(), DriverError> {
        let s = lock(&gate.state);
        match s.hung_since {
            Some(since) if s.last_probe.is_some_and(|p| p.elapsed() < PROBE_EVERY) => {
                Err(hung(vm, since))
            }
            _ => Ok(()),
        }
    }

    /// Whether `vm`'s circuit is open (its guest agent stopped answering).
    pub fn hung(&self, endpoint: &str, vm: &str) -> bool {
        let gate = self.gate(endpoint, vm);
        let s = lock(&gate.state);
        s.hung_since.is_some()
    }

    /// Whether `vm`'s guest agent answered since the VM last (re)started.
    pub fn answered(&self, endpoint: &str, vm: &str) -> bool {
        let gate = self.gate(endpoint, vm);
        let s = lock(&gate.state);
        s.answered
    }

    /// Records whether `vm`'s guest agent answers (a probe's finding, or `false`
    /// when the VM (re)starts).
    pub fn set_answered(&self, endpoint: &str, vm: &str, answered: bool) {
        let gate = self.gate(endpoint, vm);
        let mut s = lock(&gate.state);
        s.answered = answered;
        if answered {
            s.hung_since = None;
        }
    }

    /// Waits (at most `within`) for `vm`'s turn, then says whether the command may go.
    pub async fn enter(
        &self,
        endpoint: &str,
        vm: &str,
        within: Duration,
    ) -> Result<Pass, DriverError> {
        let gate = self.gate(endpoint, vm);
        let turn = match tokio::time::timeout(within, gate.turn.clone().acquire_owned()).await {
            Ok(Ok(t)) => t,
            _ => {
                return Err(DriverError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the guest agent of VM {vm} is busy with other commands; none ended within {} ms",
                        within.as_millis()
                    ),
                ))
            }
        };
        let ticket = Ticket {
            gate: gate.clone(),
            _turn: turn,
            started: Instant::now(),
        };
        let mut s = lock(&gate.state);
        let Some(since) = s.hung_since else {
            return Ok(Pass::Go(ticket));
        };
        if s.last_probe.is_none_or(|p| p.elapsed() >= PROBE_EVERY) {
            s.last_probe = Some(Instant::now());
            return Ok(Pass::Probe(ticket));
        }
        Err(hung(vm, since))
    }
}

impl Ticket {
    /// Records how the command (or probe) went: an answer closes the circuit; a
    /// timeout, or a failure only after waiting, opens it.
    pub fn done<T>(&self, r: &Result<T, DriverError>) {
        let mut s = lock(&self.gate.state);
        match r {
            Ok(_) => {
                s.hung_since = None;
                s.answered = true;
            }
            Err(e) => {
                let slow = self.started.elapsed() >= HUNG_AFTER;
                match e.kind {
                    ErrorKind::Timeout => {
                        s.hung_since.get_or_insert_with(Instant::now);
                        s.answered = false;
                    }
                    ErrorKind::Unavailable if slow => {
                        s.hung_since.get_or_insert_with(Instant::now);
                        s.answered = false;
                    }
                    // Not connected (yet): nothing hangs.
                    ErrorKind::Unavailable => s.answered = false,
                    // The agent answered, with an error of the command's own.
                    _ => {
                        s.hung_since = None;
                        s.answered = true;
                    }
                }
            }
        }
    }
}

fn hung(vm: &str, since: Instant) -> DriverError {
    DriverError::new(
        ErrorKind::Unavailable,
        format!(
            "the guest agent of VM {vm} stopped answering {} s ago (a command timed out); \
             commands to it fail at once until it answers again (probed every {} s)",
            since.elapsed().as_secs(),
            PROBE_EVERY.as_secs()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_migration_waits_for_guest_work_even_when_idle_gates_are_pruned() {
        let gates = GuestGates::default();
        let copy = gates.op_turn("e", "vm", SHORT).await.unwrap();
        // Enough other VMs that the next lookup prunes idle gates.
        for i in 0..PRUNE_AT {
            drop(
                gates
                    .op_turn("e", &format!("other-{i}"), SHORT)
                    .await
                    .unwrap(),
            );
        }
        let e = gates
            .all_turns("e", "vm", SHORT)
            .await
            .err()
            .expect("refused");
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.message.contains("guest operations"), "{}", e.message);
        drop(copy);
        let all = gates.all_turns("e", "vm", SHORT).await.unwrap();
        // While it is held, guest work waits (and here gives up, saying why).
        let e = gates.op_turn("e", "vm", SHORT).await.unwrap_err();
        assert!(e.message.contains("being migrated"), "{}", e.message);
        drop(all);
        assert!(gates.op_turn("e", "vm", SHORT).await.is_ok());
    }
}
