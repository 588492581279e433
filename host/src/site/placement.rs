//! Placement: which agent gets a new VM. Capacity-aware: an agent must be up, offer
//! the template, and have room for the VM's memory after the VMs it holds and the
//! VMs jobs are creating on it. Policy `pack` fills the fullest agent that fits
//! (keeps others free), `spread` the emptiest (spreads load).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::model::{AgentRec, AgentStatus, SiteVm, VmRequest};

/// How placement picks among agents that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The agent with the least room left that still fits.
    Pack,
    /// The agent with the most room left.
    #[default]
    Spread,
}

/// Memory the VMs on each agent hold, MiB (saturating: the numbers come from
/// agents). The site keeps the same sums as it writes VM records
/// ([`super::store::Store::memory_by_agent`]); this sums a set already read
/// (the tests check the kept sums against it).
pub fn held(vms: &[SiteVm]) -> HashMap<String, u64> {
    let mut held: HashMap<String, u64> = HashMap::new();
    for v in vms {
        let c = held.entry(v.agent.clone()).or_default();
        *c = c.saturating_add(v.main_memory_mib);
    }
    held
}

/// Memory each agent has promised, MiB: what its VMs hold (`held`) and the VMs
/// jobs are creating on it (`pending`: agent, MiB).
pub fn committed(
    mut held: HashMap<String, u64>,
    pending: &[(String, u64)],
) -> HashMap<String, u64> {
    // Requests placed but not created yet hold room too.
    for (agent, mib) in pending {
        let c = held.entry(agent.clone()).or_default();
        *c = c.saturating_add(*mib);
    }
    held
}

/// Memory agent `a` has left for a new VM, MiB (0 when it never reported a host).
pub fn room(a: &AgentRec, committed: &HashMap<String, u64>) -> u64 {
    let total = a.host.as_ref().map(|h| h.main_memory_mib).unwrap_or(0);
    total.saturating_sub(committed.get(a.id.as_str()).copied().unwrap_or(0))
}

/// Picks an agent for `req`, or says why none fits.
pub fn choose(
    agents: &[AgentRec],
    held: HashMap<String, u64>,
    pending: &[(String, u64)],
    req: &VmRequest,
    policy: Policy,
) -> Result<String, String> {
    let committed = committed(held, pending);
    let mut why = Vec::new();
    let mut fits: Vec<(u64, &str)> = Vec::new();
    for a in agents {
        if a.status != AgentStatus::Up {
            why.push(format!("{}: down", a.id));
            continue;
        }
        if let Some(t) = &req.template {
            if !a.templates.contains(t) {
                why.push(format!("{}: no template '{t}'", a.id));
                continue;
            }
        }
        let room = room(a, &committed);
        if room < req.main_memory_mib {
            let total = a.host.as_ref().map(|h| h.main_memory_mib).unwrap_or(0);
            why.push(format!("{}: {room} MiB free of {total}", a.id));
            continue;
        }
        fits.push((room, a.id.as_str()));
    }
    let pick = match policy {
        Policy::Pack => fits.iter().min(),
        Policy::Spread => fits
            .iter()
            .max_by_key(|(room, id)| (*room, std::cmp::Reverse(*id))),
    };
    match pick {
        Some((_, id)) => Ok(id.to_string()),
        None if agents.is_empty() => Err("no agent is registered at this site".into()),
        None => Err(format!(
            "no agent can host {} MiB{}: {}",
            req.main_memory_mib,
            req.template
                .as_ref()
                .map(|t| format!(" from template '{t}'"))
                .unwrap_or_default(),
            why.join("; ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::model::Host;

    fn agent(id: &str, mib: u64, up: bool) -> AgentRec {
        AgentRec {
            id: id.into(),
            url: "http://127.0.0.1:1".into(),
            token: String::new(),
            fingerprint: None,
            instance: None,
            status: if up {
                AgentStatus::Up
            } else {
                AgentStatus::Down
            },
            error: None,
            seen_ms: 0,
            host: Some(Host {
                hostname: id.into(),
                hypervisor_kind: "memory".into(),
                hypervisor_version: "0".into(),
                platform: "amd64".into(),
                cpu_model: "x".into(),
                physical_cpus: 2,
                logical_cpus: 2,
                main_memory_mib: mib,
                free_memory_mib: mib,
                allocated_logical_cpus: 0,
                total_instances: 0,
                used_instances: 0,
            }),
            templates: vec!["tiny".into()],
            offers: Vec::new(),
            endpoint: None,
            registered_ms: 0,
        }
    }

    fn req(mib: u64, template: Option<&str>) -> VmRequest {
        serde_json::from_value(serde_json::json!({ "main-memory-mib": mib, "template": template }))
            .unwrap()
    }

    #[test]
    fn pack_fills_the_fullest_spread_the_emptiest_and_down_agents_are_skipped() {
        let agents = [
            agent("a", 4096, true),
            agent("b", 8192, true),
            agent("c", 65536, false),
        ];
        assert_eq!(
            choose(&agents, HashMap::new(), &[], &req(1024, None), Policy::Pack).unwrap(),
            "a"
        );
        assert_eq!(
            choose(
                &agents,
                HashMap::new(),
                &[],
                &req(1024, None),
                Policy::Spread
            )
            .unwrap(),
            "b"
        );
        let e = choose(
            &agents,
            HashMap::new(),
            &[],
            &req(10_000, Some("tiny")),
            Policy::Spread,
        )
        .unwrap_err();
        assert!(
            e.contains("c: down") && e.contains("b: 8192 MiB free"),
            "{e}"
        );
        let e = choose(
            &agents,
            HashMap::new(),
            &[],
            &req(10, Some("other")),
            Policy::Spread,
        )
        .unwrap_err();
        assert!(e.contains("no template 'other'"), "{e}");
        assert!(
            choose(&[], HashMap::new(), &[], &req(1, None), Policy::Pack)
                .unwrap_err()
                .contains("no agent")
        );
    }

    #[test]
    fn memory_held_and_pending_take_room() {
        let agents = [agent("a", 4096, true), agent("b", 8192, true)];
        let on_a = HashMap::from([("a".to_string(), 3000)]);
        // a has 1096 MiB left: too little for 2048, so even pack goes to b.
        assert_eq!(
            choose(&agents, on_a.clone(), &[], &req(2048, None), Policy::Pack).unwrap(),
            "b"
        );
        // b's room is taken by a request being created there.
        let pending = [("b".to_string(), 7000)];
        let e = choose(&agents, on_a, &pending, &req(2048, None), Policy::Spread).unwrap_err();
        assert!(
            e.contains("a: 1096 MiB free") && e.contains("b: 1192 MiB free"),
            "{e}"
        );
        // Sums saturate rather than wrap.
        let vms: Vec<SiteVm> = (0..2)
            .map(|i| {
                serde_json::from_value(serde_json::json!({
                    "id": format!("v{i}"), "agent": "a", "agent-vm": format!("x{i}"),
                    "name": "n", "logical-cpus": 1, "main-memory-mib": u64::MAX, "state": "running",
                    "updated-ms": 0
                }))
                .unwrap()
            })
            .collect();
        assert_eq!(held(&vms)["a"], u64::MAX);
    }
}
