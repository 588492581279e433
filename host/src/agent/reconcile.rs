//! Keeps the registry in sync with the hypervisor. Every period the agent lists what
//! the hypervisor has and records differences as events: a VM that appeared behind
//! gve's back (`vm-appeared`), one that vanished (`vm-vanished`), one whose state
//! changed (`vm-state-changed`). Out-of-band changes are detected, not assumed away.
//!
//! One pass records at most [`MAX_EVENTS_PER_PASS`] events one by one; past that the
//! rest are folded into one `vm-changes-summarized` event with counts, so a driver
//! that invents thousands of VMs per listing cannot flood the event log. (The
//! listing itself is bounded and checked by the plugin host's answer rules.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::model::{now_ms, Allocation, Vm, VmRecord, VmState};
use super::AgentCore;
use crate::plugin::PluginError;

/// Most events one pass records one by one.
pub const MAX_EVENTS_PER_PASS: usize = 1_000;

/// What one reconcile pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReconcileReport {
    /// VMs found on the hypervisor that the registry did not have.
    pub appeared: Vec<String>,
    /// VMs the registry had that the hypervisor no longer has.
    pub vanished: Vec<String>,
    /// VMs whose state changed.
    pub changed: Vec<String>,
}

/// Why a pass could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The driver could not list the hypervisor's VMs.
    #[error("cannot list the hypervisor's VMs: {0}")]
    Driver(#[from] PluginError),
    /// The registry could not be updated.
    #[error(transparent)]
    Registry(#[from] super::registry::RegistryError),
}

impl AgentCore {
    /// One pass: lists the hypervisor's VMs and templates and records the differences.
    pub async fn reconcile(&self) -> Result<ReconcileReport, ReconcileError> {
        // Disks staged before the listing: one staged after it belongs to a copy
        // on a VM started since, whatever the listing says of the VM.
        let staged = super::bulk_copy::staged(self);
        let listed_at = now_ms();
        let seen: HashMap<String, Vm> = self
            .driver
            .list_vms()
            .await?
            .into_iter()
            .map(|v| (v.id.clone(), Vm::from(v)))
            .collect();
        let mut templates: Vec<Vm> = self
            .driver
            .list_templates()
            .await?
            .into_iter()
            .map(Vm::from)
            .collect();
        // In the registry's order (by id), to compare with what it holds.
        templates.sort_by(|a, b| a.id.cmp(&b.id));
        templates.dedup_by(|a, b| a.id == b.id);
        let removed: HashMap<String, u64> = {
            let mut r = self.removed.lock().unwrap_or_else(|e| e.into_inner());
            r.retain(|_, at| *at + 60_000 > listed_at);
            r.clone()
        };
        // Compared first on a snapshot: a pass that finds nothing to change
        // takes no write lock and commits nothing.
        let known = self.registry.vms_snapshot()?;
        if plan(&known, &seen, &removed, listed_at).is_empty()
            && self.registry.templates()? == templates
        {
            return Ok(ReconcileReport::default());
        }
        let report = self.registry.write(|t| {
            let mut report = ReconcileReport::default();
            let mut events = 0usize;
            let mut event = |t: &mut super::registry::Txn<'_>,
                             kind: &str,
                             id: &str,
                             data: serde_json::Value| {
                events += 1;
                if events <= MAX_EVENTS_PER_PASS {
                    t.event(kind, id, data)
                } else {
                    Ok(())
                }
            };
            // Planned again inside the transaction: operations may have
            // written since the snapshot.
            let known = t.vms()?;
            for change in plan(&known, &seen, &removed, listed_at) {
                match change {
                    Change::Appeared(vm) => {
                        t.put_vm(&VmRecord {
                            vm: vm.clone(),
                            allocation: Allocation::Free,
                            seen_ms: listed_at,
                            provisioned: Default::default(),
                        })?;
                        event(
                            t,
                            "vm-appeared",
                            &vm.id,
                            json!({ "name": vm.name, "state": vm.state }),
                        )?;
                        report.appeared.push(vm.id.clone());
                    }
                    Change::Changed(rec, vm) => {
                        if rec.vm.state != vm.state {
                            event(
                                t,
                                "vm-state-changed",
                                &vm.id,
                                json!({ "from": rec.vm.state, "to": vm.state }),
                            )?;
                            report.changed.push(vm.id.clone());
                        }
                        t.put_vm(&VmRecord {
                            vm: vm.clone(),
                            allocation: rec.allocation.clone(),
                            seen_ms: listed_at,
                            provisioned: rec.provisioned.clone(),
                        })?;
                    }
                    Change::Vanished(rec) => {
                        let id = &rec.vm.id;
                        t.remove_vm(id)?;
                        event(
                            t,
                            "vm-vanished",
                            id,
                            json!({ "name": rec.vm.name, "last-state": rec.vm.state }),
                        )?;
                        report.vanished.push(id.clone());
                    }
                }
            }
            if events > MAX_EVENTS_PER_PASS {
                t.event(
                    "vm-changes-summarized",
                    "",
                    json!({
                        "appeared": report.appeared.len(),
                        "vanished": report.vanished.len(),
                        "changed": report.changed.len(),
                        "not-recorded-one-by-one": events - MAX_EVENTS_PER_PASS,
                    }),
                )?;
            }
            t.set_templates(&templates)?;
            Ok(report)
        })?;
        // A VM stopped or gone behind gve's back has let go of any staged disk
        // whose release failed while it ran (its guest held on): released now,
        // as after a stop through gve, not left until the agent's next start.
        if !staged.is_empty() {
            let stopped: std::collections::HashSet<&str> = report
                .vanished
                .iter()
                .chain(
                    report
                        .changed
                        .iter()
                        .filter(|id| seen.get(*id).is_some_and(|v| v.state == VmState::Stopped)),
                )
                .map(String::as_str)
                .collect();
            super::bulk_copy::release_recorded(self, staged, |vm| stopped.contains(vm)).await;
        }
        Ok(report)
    }

    /// Runs [`AgentCore::reconcile`] every `period` until the agent stops.
    pub fn spawn_reconciler(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        let core = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(core) = core.upgrade() else { break };
                match core.reconcile().await {
                    Ok(r) if r != ReconcileReport::default() => tracing::info!(
                        appeared = r.appeared.len(),
                        vanished = r.vanished.len(),
                        changed = r.changed.len(),
                        "reconciled with the hypervisor"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("reconcile: {e}"),
                }
            }
        })
    }
}

/// One difference between the registry and a hypervisor listing.
enum Change<'a> {
    /// Listed, not in the registry: it appeared behind gve's back.
    Appeared(&'a Vm),
    /// In both, but the listing differs from the record (old record, new view).
    Changed(&'a VmRecord, &'a Vm),
    /// In the registry, no longer listed.
    Vanished(&'a VmRecord),
}

/// The differences between the registry's records `known` and the listing
/// `seen` taken at `listed_at`. Records an operation wrote after the listing
/// are newer than it, and VMs an operation removed after it (`removed`, id →
/// when) are not taken for new.
fn plan<'a>(
    known: &'a [VmRecord],
    seen: &'a HashMap<String, Vm>,
    removed: &HashMap<String, u64>,
    listed_at: u64,
) -> Vec<Change<'a>> {
    let by_id: HashMap<&str, &VmRecord> = known.iter().map(|r| (r.vm.id.as_str(), r)).collect();
    let mut out = Vec::new();
    for (id, vm) in seen {
        match by_id.get(id.as_str()) {
            // Removed by an operation after the listing was taken.
            None if removed.get(id).is_some_and(|at| *at >= listed_at) => {}
            None => out.push(Change::Appeared(vm)),
            // An operation recorded a newer view after the list was taken: keep it.
            Some(rec) if rec.seen_ms >= listed_at => {}
            Some(rec) if rec.vm != *vm => out.push(Change::Changed(rec, vm)),
            Some(_) => {}
        }
    }
    for rec in known {
        if !seen.contains_key(&rec.vm.id) && rec.seen_ms < listed_at {
            out.push(Change::Vanished(rec));
        }
    }
    out
}
