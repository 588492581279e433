//! Asynchronous VM operations: submitted (recorded as running) and answered with an
//! id at once, run against the driver, and finished (succeeded with the VM, or failed
//! with a typed error) in the same transaction that updates the VM's record. An
//! operation that was running when the agent died is resolved at the next start by
//! asking the hypervisor whether its effect happened.

use serde_json::json;

use super::guest::ExecBody;
use super::model::{
    now_ms, Allocation, OpError, OpKind, OpOutput, OpState, Operation, Provisioned, Vm, VmRecord,
    VmState,
};
use super::registry::RegistryError;
use super::AgentCore;
use crate::plugin::{DriverSession, ErrorKind, PluginError};

/// Parameters of an operation, as submitted.
#[derive(Debug, Clone)]
pub enum OpParams {
    /// Create from a profile.
    Create(Box<super::model::Profile>),
    /// Clone `source` as `name`.
    Clone {
        /// New VM's name.
        name: String,
        /// Copy-on-write.
        linked: bool,
    },
    /// Power on.
    Start,
    /// Shut down; `force` powers off at once.
    Shutdown {
        /// Power off at once.
        force: bool,
    },
    /// Suspend.
    Suspend,
    /// Resume.
    Resume,
    /// Migrate to another host.
    Migrate {
        /// Destination (driver-specific).
        destination: String,
        /// Keep running during the move.
        live: bool,
    },
    /// Destroy.
    Destroy,
    /// Run a command in the guest.
    Exec(Box<ExecBody>),
    /// Copy a file into the guest (streamed by the request that started it).
    CopyIn {
        /// Guest path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Install a software bundle in the guest.
    Provision {
        /// Bundle name.
        bundle: String,
        /// Install script budget, milliseconds.
        timeout_ms: u32,
    },
}

/// What a finished operation produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The VM as it is now.
    Vm(Vm),
    /// The VM is gone.
    Removed,
    /// The VM was migrated to a destination behind another endpoint: as it is
    /// there, and no longer this agent's.
    MovedAway(Vm),
    /// A guest operation's output; the VM's record is kept.
    Output(OpOutput),
}

impl OpParams {
    /// The kind of operation.
    pub fn kind(&self) -> OpKind {
        match self {
            OpParams::Create(_) => OpKind::Create,
            OpParams::Clone { .. } => OpKind::Clone,
            OpParams::Start => OpKind::Start,
            OpParams::Shutdown { .. } => OpKind::Shutdown,
            OpParams::Suspend => OpKind::Suspend,
            OpParams::Resume => OpKind::Resume,
            OpParams::Migrate { .. } => OpKind::Migrate,
            OpParams::Destroy => OpKind::Destroy,
            OpParams::Exec(_) => OpKind::Exec,
            OpParams::CopyIn { .. } => OpKind::CopyIn,
            OpParams::Provision { .. } => OpKind::Provision,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            OpParams::Create(p) => serde_json::to_value(&**p).unwrap_or_default(),
            OpParams::Clone { name, linked } => json!({ "name": name, "linked": linked }),
            OpParams::Shutdown { force } => json!({ "force": force }),
            OpParams::Migrate { destination, live } => {
                json!({ "destination": destination, "live": live })
            }
            // Environment values may be secrets and stdin may be large: names only.
            OpParams::Exec(b) => json!({
                "argv": b.argv, "cwd": b.cwd, "env": b.env.keys().collect::<Vec<_>>(),
                "timeout-ms": b.timeout_ms,
            }),
            OpParams::CopyIn { path, mode } => {
                json!({ "path": path, "mode": format!("{mode:04o}") })
            }
            OpParams::Provision { bundle, timeout_ms } => {
                json!({ "bundle": bundle, "timeout-ms": timeout_ms })
            }
            OpParams::Start | OpParams::Suspend | OpParams::Resume | OpParams::Destroy => json!({}),
        }
    }
}

/// The typed error an operation fails with.
pub fn op_error(e: &PluginError) -> OpError {
    let (kind, message) = match e.driver_error() {
        Some(d) => (d.kind, d.message.clone()),
        None => (e.kind(), e.to_string()),
    };
    OpError {
        kind: kind.as_str().to_string(),
        message,
    }
}

/// Runs an operation; `vm` is the target VM's id (the source for clone, the new name
/// for create).
async fn call(core: &AgentCore, vm: &str, params: &OpParams) -> Result<Outcome, OpError> {
    match params {
        OpParams::Exec(b) => core
            .guest_exec(vm, b)
            .await
            .map(|o| Outcome::Output(OpOutput::Exec(o))),
        OpParams::Provision { bundle, timeout_ms } => core
            .provision(vm, bundle, *timeout_ms)
            .await
            .map(|o| Outcome::Output(OpOutput::Provision(o))),
        OpParams::CopyIn { .. } => Err(OpError {
            kind: ErrorKind::InvalidArgument.as_str().into(),
            message: "copy-in runs inside the request that streams the file".into(),
        }),
        OpParams::Migrate { .. } => {
            // No exec or copy overlaps a migration, and no staged disk goes along.
            let _all = core
                .guest_gates
                .all_turns(core.driver.endpoint(), vm, super::ready::GUEST_WAIT)
                .await
                .map_err(|e| OpError {
                    kind: e.kind.as_str().into(),
                    message: e.message,
                })?;
            super::bulk_copy::release_staged_on(core, vm).await?;
            driver_call(&core.driver, vm, params)
                .await
                .map_err(|e| op_error(&e))
        }
        _ => {
            // A VM that (re)starts or stops has a guest agent to wait for again.
            if matches!(
                params,
                OpParams::Start | OpParams::Shutdown { .. } | OpParams::Suspend | OpParams::Resume
            ) {
                core.guest_gates
                    .set_answered(core.driver.endpoint(), vm, false);
            }
            // A VM stopped behind gve's back (and not seen so by a reconcile
            // pass) may still have a staged disk recorded: released while it is
            // stopped, before it starts.
            if matches!(params, OpParams::Start) {
                if let Err(e) = super::bulk_copy::release_staged_on(core, vm).await {
                    tracing::warn!(vm, "before starting it: {}", e.message);
                }
            }
            let done = driver_call(&core.driver, vm, params)
                .await
                .map_err(|e| op_error(&e))?;
            // A stopped or destroyed VM has let go of any staged disk a release
            // could not take back while it ran (its guest held on): released now.
            if matches!(params, OpParams::Shutdown { .. } | OpParams::Destroy) {
                if let Err(e) = super::bulk_copy::release_staged_on(core, vm).await {
                    tracing::warn!(vm, "after stopping it: {}", e.message);
                }
            }
            Ok(done)
        }
    }
}

/// The longest a restarted agent waits for its driver to finish a migration
/// cut off with the VM paused ([`AgentCore::recover`]).
const FINISH_MIGRATION_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs the driver call of a VM operation.
async fn driver_call(
    driver: &DriverSession,
    vm: &str,
    params: &OpParams,
) -> Result<Outcome, PluginError> {
    let vm = match params {
        OpParams::Create(p) => driver.create(&(&**p).into()).await?,
        OpParams::Clone { name, linked } => driver.clone_vm(vm, name, *linked).await?,
        OpParams::Start => driver.start(vm).await?,
        OpParams::Shutdown { force } => driver.shutdown(vm, *force).await?,
        OpParams::Suspend => driver.suspend(vm).await?,
        OpParams::Resume => driver.resume(vm).await?,
        OpParams::Migrate { destination, live } => {
            let moved = driver.migrate(vm, destination, *live).await?;
            // The hypervisor says where it is: still found through this session
            // (a host behind the same endpoint, as with vSphere) it stays here.
            return match driver.get_vm(&moved.id).await {
                Ok(here) => Ok(Outcome::Vm(here.into())),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Outcome::MovedAway(moved.into())),
                Err(e) => {
                    tracing::warn!(vm, "after migrating, reading it back failed: {e}");
                    Ok(Outcome::MovedAway(moved.into()))
                }
            };
        }
        OpParams::Destroy => {
            driver.destroy(vm).await?;
            return Ok(Outcome::Removed);
        }
        OpParams::Exec(_) | OpParams::CopyIn { .. } | OpParams::Provision { .. } => {
            return Err(PluginError::Config(format!(
                "{} is not a driver operation",
                params.kind().as_str()
            )))
        }
    };
    Ok(Outcome::Vm(vm.into()))
}

impl AgentCore {
    /// Records an operation as running and starts it; returns it once its
    /// record is durable, while it runs. With a client's idempotency key, a
    /// key seen before returns the operation it started, and nothing new runs.
    pub async fn submit_keyed(
        self: &std::sync::Arc<Self>,
        vm: &str,
        params: OpParams,
        key: Option<&str>,
    ) -> Result<Operation, RegistryError> {
        // Recorded at once but not yet durable, so that the operation starts while
        // the disk catches up: the answer (which promises the operation) waits for
        // `sync`, the operation does not. A crash before the sync loses a record
        // nobody was told of; its end is recorded durably, and a durable commit
        // keeps everything before it.
        // (An operation found by its key may be another caller's, not yet synced.)
        let (op, new) = match self.begin_keyed(vm, &params, key, true) {
            Ok(begun) => begun,
            Err(e) => {
                // What the caller wrote lazily first (an exec's audit entry)
                // still reaches the disk, and its followers, now.
                let _ = self.sync_off_workers().await;
                return Err(e);
            }
        };
        if new {
            let (core, running) = (self.clone(), op.clone());
            tokio::spawn(async move {
                let outcome = call(&core, &running.vm, &params).await;
                // A durable commit: off the workers too.
                let me = core.clone();
                let ended = tokio::task::spawn_blocking(move || me.finish(running, outcome)).await;
                if let Err(e) = ended
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    tracing::error!("cannot record the end of an operation: {e}");
                }
            });
        }
        // Off the runtime's workers: a task spawned from a worker waits in that
        // worker's next-task slot, which no other worker takes, so a sync
        // here would hold the operation back until the disk answered.
        self.sync_off_workers().await?;
        Ok(op)
    }

    /// Makes every change committed so far durable, on a blocking thread.
    async fn sync_off_workers(&self) -> Result<(), RegistryError> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.sync())
            .await
            .map_err(|e| RegistryError::Storage(format!("a sync of the registry: {e}")))?
    }

    /// Records an operation as running (the caller runs it and calls `finish`).
    pub fn begin(&self, vm: &str, params: &OpParams) -> Result<Operation, RegistryError> {
        Ok(self.begin_keyed(vm, params, None, false)?.0)
    }

    /// Records an operation as running unless `key` started one already; says which.
    /// With `lazy`, the record is not yet durable (the caller syncs).
    fn begin_keyed(
        &self,
        vm: &str,
        params: &OpParams,
        key: Option<&str>,
        lazy: bool,
    ) -> Result<(Operation, bool), RegistryError> {
        let op = Operation {
            // Ordered by creation, so retention removes old ones by a range.
            id: format!("op-{:012x}-{}", now_ms(), uuid::Uuid::new_v4().simple()),
            kind: params.kind(),
            vm: vm.to_string(),
            params: params.to_json(),
            state: OpState::Running,
            result: None,
            output: None,
            error: None,
            created_ms: now_ms(),
            finished_ms: None,
        };
        let record = |t: &mut super::registry::Txn<'_>| {
            if let Some(k) = key {
                if let Some(existing) = t.op_for_key(k)? {
                    return Ok((existing, false));
                }
                t.put_op_key(k, &op.id)?;
            }
            t.put_op(&op)?;
            Ok((op, true))
        };
        if lazy {
            self.registry.write_lazy(record)
        } else {
            self.registry.write(record)
        }
    }

    /// Records the end of an operation together with the VM's new record.
    pub fn finish(
        &self,
        mut op: Operation,
        outcome: Result<Outcome, OpError>,
    ) -> Result<Operation, RegistryError> {
        op.finished_ms = Some(now_ms());
        self.registry.write(|t| {
            // Read the VM's record in the same transaction that replaces it.
            let previous = t.vm(&op.vm)?;
            if matches!(outcome, Ok(Outcome::Removed | Outcome::MovedAway(_))) {
                if let Some(p) = &previous {
                    self.removed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(p.vm.id.clone(), now_ms());
                }
            }
            match &outcome {
                Ok(Outcome::MovedAway(vm)) => {
                    op.state = OpState::Succeeded;
                    op.result = Some(vm.clone());
                    t.remove_vm(&op.vm)?;
                    t.event("vm-migrated", &op.vm, json!({ "to": vm.host, "away": true }))?;
                }
                Ok(Outcome::Vm(vm)) => {
                    op.state = OpState::Succeeded;
                    op.result = Some(vm.clone());
                    if op.kind == OpKind::Migrate {
                        t.event("vm-migrated", &op.vm, json!({ "to": vm.host, "away": false }))?;
                    }
                    // A clone or create is a new VM; everything else keeps the allocation.
                    let allocation = match (&previous, op.kind) {
                        (
                            Some(p),
                            OpKind::Start
                            | OpKind::Shutdown
                            | OpKind::Suspend
                            | OpKind::Resume
                            | OpKind::Migrate,
                        ) => {
                            p.allocation.clone()
                        }
                        _ => Allocation::Free,
                    };
                    let provisioned = match (&previous, op.kind) {
                        (Some(p), OpKind::Create | OpKind::Clone) if p.vm.id != vm.id => Default::default(),
                        (Some(p), _) => p.provisioned.clone(),
                        (None, _) => Default::default(),
                    };
                    t.put_vm(&VmRecord { vm: vm.clone(), allocation, seen_ms: now_ms(), provisioned })?;
                }
                Ok(Outcome::Removed) => {
                    op.state = OpState::Succeeded;
                    if let Some(p) = &previous {
                        t.remove_vm(&p.vm.id)?;
                    }
                }
                Ok(Outcome::Output(output)) => {
                    op.state = OpState::Succeeded;
                    op.output = Some(output.clone());
                    if let (OpOutput::Provision(p), Some(mut rec)) = (output, previous) {
                        rec.provisioned.insert(
                            p.bundle.clone(),
                            Provisioned { digest: p.digest.clone(), at_ms: now_ms() },
                        );
                        t.put_vm(&rec)?;
                    }
                }
                Err(e) => {
                    op.state = OpState::Failed;
                    op.error = Some(e.clone());
                }
            }
            t.put_op(&op)?;
            t.event(
                "operation-finished",
                &op.vm,
                json!({ "operation": op.id, "kind": op.kind, "state": op.state, "error": op.error }),
            )?;
            Ok(())
        })?;
        self.metrics.ended(
            op.kind.as_str(),
            &crate::metrics::name_of(&op.state),
            std::time::Duration::from_millis(
                op.finished_ms
                    .unwrap_or(op.created_ms)
                    .saturating_sub(op.created_ms),
            ),
        );
        Ok(op)
    }

    /// Resolves operations left running by a previous run of the agent: asks the
    /// hypervisor whether each one's effect happened and records it as succeeded or
    /// failed (with the reason). Never leaves one running.
    pub async fn recover(&self) -> Result<usize, RegistryError> {
        let stale: Vec<Operation> = self
            .registry
            .operations()?
            .into_iter()
            .filter(|o| o.state == OpState::Running)
            .collect();
        let n = stale.len();
        for op in stale {
            if matches!(op.kind, OpKind::Exec | OpKind::CopyIn | OpKind::Provision) {
                // What happened in the guest cannot be asked of the hypervisor.
                let message = format!(
                    "interrupted by an agent restart before it finished; the {} may have run partly in the guest (provision can be run again: bundles are installed idempotently)",
                    op.kind.as_str()
                );
                self.finish(
                    op,
                    Err(OpError {
                        kind: ErrorKind::Unavailable.as_str().into(),
                        message,
                    }),
                )?;
                continue;
            }
            let target = match op.kind {
                OpKind::Create => op.vm.clone(),
                OpKind::Clone => op.params["name"].as_str().unwrap_or_default().to_string(),
                _ => op.vm.clone(),
            };
            let seen = self.driver.get_vm(&target).await;
            if matches!(op.kind, OpKind::Create | OpKind::Clone) && seen.is_err() {
                // The VM was never defined: let the driver remove what it had made of it
                // (disks). Not-found just means nothing was left behind.
                match self.driver.destroy(&target).await {
                    Ok(()) => tracing::warn!(
                        vm = target,
                        "removed leftovers of an interrupted {}",
                        op.kind.as_str()
                    ),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(
                        vm = target,
                        "cannot remove leftovers of an interrupted {}: {e}",
                        op.kind.as_str()
                    ),
                }
            }
            // A destroy cut off while the VM still exists is finished: it was
            // asked to go, and going again is safe.
            let seen = if op.kind == OpKind::Destroy && seen.is_ok() {
                match self.driver.destroy(&target).await {
                    Ok(()) => tracing::warn!(vm = target, "finished an interrupted destroy"),
                    Err(e) => {
                        tracing::warn!(vm = target, "cannot finish an interrupted destroy: {e}")
                    }
                }
                self.driver.get_vm(&target).await
            } else {
                seen
            };
            // A migration cut off with its VM paused here may have resumed it
            // at the destination: asking the driver again finishes it then
            // (the kvm and xen drivers end the paused copy). Asked as a live
            // one whatever it was, which every driver refuses at once for a VM
            // that does not run: an agent's start never moves a VM (nor its
            // disks) anew. Left as it was, the VM would be on both hosts for good.
            if op.kind == OpKind::Migrate
                && seen
                    .as_ref()
                    .is_ok_and(|vm| Vm::from(vm.clone()).state == VmState::Suspended)
            {
                let params = OpParams::Migrate {
                    destination: op.params["destination"].as_str().unwrap_or_default().into(),
                    live: true,
                };
                let call = driver_call(&self.driver, &op.vm, &params);
                let outcome = match tokio::time::timeout(FINISH_MIGRATION_WITHIN, call).await {
                    Ok(outcome) => outcome.map_err(|e| op_error(&e)),
                    Err(_) => Err(OpError {
                        kind: ErrorKind::Timeout.as_str().into(),
                        message: format!(
                            "did not finish within {} s; it may still complete",
                            FINISH_MIGRATION_WITHIN.as_secs()
                        ),
                    }),
                }
                .map_err(|mut e| {
                    e.message = format!(
                        "interrupted by an agent restart before it finished, with the VM paused here; finishing it failed: {}",
                        e.message
                    );
                    e
                });
                if outcome.is_ok() {
                    tracing::warn!(vm = op.vm, "finished an interrupted migration");
                }
                self.finish(op, outcome)?;
                continue;
            }
            let wanted = match op.kind {
                OpKind::Start | OpKind::Resume => Some(VmState::Running),
                OpKind::Shutdown => Some(VmState::Stopped),
                OpKind::Suspend => Some(VmState::Suspended),
                _ => None,
            };
            let outcome = match (op.kind, seen) {
                (OpKind::Destroy | OpKind::Migrate, Err(e)) if e.kind() == ErrorKind::NotFound => Ok(Outcome::Removed),
                (OpKind::Create | OpKind::Clone, Ok(vm)) => Ok(Outcome::Vm(vm.into())),
                (_, Ok(vm)) if wanted.is_some_and(|w| Vm::from(vm.clone()).state == w) => Ok(Outcome::Vm(vm.into())),
                (_, seen) => Err(OpError {
                    kind: ErrorKind::Unavailable.as_str().into(),
                    message: format!(
                        "interrupted by an agent restart before it finished; the hypervisor now reports {}",
                        match seen {
                            Ok(vm) => format!("{} as {:?}", vm.name, Vm::from(vm.clone()).state).to_lowercase(),
                            Err(e) => format!("no such VM ({e})"),
                        }
                    ),
                }),
            };
            self.finish(op, outcome)?;
        }
        Ok(n)
    }
}
