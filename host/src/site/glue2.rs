//! GLUE 2 publication (`GET /v1/glue2`): the site described the way grid
//! information systems describe resources (OGF GFD.147, in its JSON rendering).
//!
//! One ComputingService with its ComputingEndpoint (this API), a ComputingManager
//! (gve over the site's agents), one ExecutionEnvironment per template the up
//! agents offer, each template's image as an ApplicationEnvironment with an
//! ApplicationHandle (as the GLUE JSON OpenStack examples publish images), and one
//! ComputingShare with the site's free capacity. GLUE 2.1's cloud entities have no
//! JSON rendering yet, so these are GLUE 2.0 entities.
//!
//! Capacity is the placement's own arithmetic ([`super::placement::room`]): what
//! the document says fits is what a request would be placed on. The numbers gve
//! adds that GLUE 2.0 has no attribute for are under `Extension`:
//! - ExecutionEnvironment `FreeMainMemory`: the largest memory (MiB) a new VM from
//!   this template can get now (the agent offering it with the most room);
//!   `FreeInstances`: free pooled VMs of it plus new ones of its default size that
//!   fit; `PooledInstances`: free pooled VMs of it.
//! - ComputingShare `FreeMainMemory`: the sum of the up agents' room, MiB;
//!   `AgentsUp`, `Agents`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::model::{AgentRec, AgentStatus, TemplateOffer};
use super::placement;
use super::store::Tally;

/// What the document is made from (one consistent read of the site).
pub struct Inputs<'a> {
    /// Site id (the ids' last part).
    pub site_id: &'a str,
    /// The URL users reach the site at.
    pub url: &'a str,
    /// GLUE QualityLevel (`production`, `testing`, ...).
    pub quality_level: &'a str,
    /// The site's agents.
    pub agents: &'a [AgentRec],
    /// The site's VMs, counted ([`super::store::Store::vm_tallies`]).
    pub tallies: &'a [Tally],
    /// The memory each agent's VMs hold, MiB ([`super::store::Store::memory_by_agent`]).
    pub held_mib: &'a HashMap<String, u64>,
    /// Requests placed but not created yet (agent, MiB).
    pub pending: &'a [(String, u64)],
    /// Jobs waiting to run.
    pub waiting_jobs: u64,
    /// Jobs running.
    pub running_jobs: u64,
    /// Refusing new work (disk nearly full).
    pub draining: bool,
    /// Longest lease, seconds (the share's MaxWallTime).
    pub lease_max_seconds: u64,
    /// Default lease, seconds (the share's DefaultWallTime).
    pub lease_default_seconds: u64,
    /// Now, Unix ms.
    pub now_ms: u64,
}

/// How long a reader may rely on the document, seconds (GLUE Validity).
pub const VALIDITY_SECONDS: u64 = 60;

/// GLUE OSFamily and OSName for what a driver reports as the OS family: GLUE's
/// families as they are, a Linux distribution as family `linux` with that name.
pub fn os_family_and_name(reported: Option<&str>) -> (String, Option<String>) {
    const FAMILIES: [&str; 4] = ["linux", "macosx", "windows", "solaris"];
    const LINUXES: [&str; 16] = [
        "debian",
        "ubuntu",
        "centos",
        "rhel",
        "redhat",
        "fedora",
        "alpine",
        "suse",
        "opensuse",
        "sl",
        "scientificlinux",
        "rocky",
        "almalinux",
        "arch",
        "gentoo",
        "cirros",
    ];
    match reported.map(|s| s.trim().to_ascii_lowercase()) {
        None => ("unknown".into(), None),
        Some(s) if s.is_empty() => ("unknown".into(), None),
        Some(s) if FAMILIES.contains(&s.as_str()) => (s, None),
        Some(s) if LINUXES.contains(&s.as_str()) => ("linux".into(), Some(s)),
        Some(s) => (s, None),
    }
}

/// `ms` (Unix) as GLUE's `CCYY-MM-DDThh:mm:ssZ`.
pub fn glue_time(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// One template as the site offers it: the up agents that have it.
struct Offer<'a> {
    info: &'a TemplateOffer,
    agents: Vec<&'a AgentRec>,
}

/// The GLUE 2 document of the site.
pub fn document(i: &Inputs) -> Value {
    let site = i.site_id;
    let service_id = format!("urn:glue2:ComputingService:{site}");
    let endpoint_id = format!("urn:glue2:ComputingEndpoint:{site}:api-v1");
    let manager_id = format!("urn:glue2:ComputingManager:{site}");
    let share_id = format!("urn:glue2:ComputingShare:{site}:default");
    let created = glue_time(i.now_ms);
    let version = env!("CARGO_PKG_VERSION");

    let committed = placement::committed(i.held_mib.clone(), i.pending);
    let up: Vec<&AgentRec> = i
        .agents
        .iter()
        .filter(|a| a.status == AgentStatus::Up)
        .collect();
    // Templates by name: the first agent's description, every up agent offering it.
    let mut offers: BTreeMap<&str, Offer> = BTreeMap::new();
    for a in &up {
        for t in &a.offers {
            offers
                .entry(t.name.as_str())
                .or_insert_with(|| Offer {
                    info: t,
                    agents: Vec::new(),
                })
                .agents
                .push(a);
        }
    }
    let down_agents: Vec<&str> = i
        .agents
        .iter()
        .filter(|a| a.status != AgentStatus::Up)
        .map(|a| a.id.as_str())
        .collect();

    let mut environments = Vec::new();
    let mut app_envs = Vec::new();
    let mut handles = Vec::new();
    let mut ee_ids = Vec::new();
    let mut ae_ids = Vec::new();
    for (name, offer) in &offers {
        let t = offer.info;
        let ee_id = format!("urn:glue2:ExecutionEnvironment:{site}:{name}");
        let ae_id = format!("urn:glue2:ApplicationEnvironment:{site}:{name}");
        let ah_id = format!("urn:glue2:ApplicationHandle:{site}:{name}");
        // Disjoint: unavailable (missing, or on a down agent), used (held), pooled.
        let (mut down, mut used, mut pooled) = (0u64, 0u64, 0u64);
        for t in i
            .tallies
            .iter()
            .filter(|t| t.template.as_deref() == Some(name))
        {
            let unavailable =
                t.state == super::agents::MISSING || down_agents.contains(&t.agent.as_str());
            let count = match (unavailable, t.held, t.pooled) {
                (true, _, _) => &mut down,
                (false, true, _) => &mut used,
                (false, false, true) => &mut pooled,
                (false, false, false) => continue,
            };
            *count = count.saturating_add(t.n);
        }
        let rooms: Vec<u64> = offer
            .agents
            .iter()
            .map(|a| placement::room(a, &committed))
            .collect();
        let per_vm = t.main_memory_mib.max(1);
        let new_fit = rooms
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r / per_vm));
        let free = pooled.saturating_add(new_fit);
        let (family, name_from_family) = os_family_and_name(t.os_family.as_deref());
        let platform = t
            .platform
            .clone()
            .or_else(|| {
                offer
                    .agents
                    .iter()
                    .find_map(|a| a.host.as_ref().map(|h| h.platform.clone()))
            })
            .unwrap_or_else(|| "unknown".into());
        let mut ee = json!({
            "ID": ee_id,
            "Name": name,
            "CreationTime": created,
            "Validity": VALIDITY_SECONDS,
            "Platform": platform,
            "VirtualMachine": true,
            "TotalInstances": used.saturating_add(down).saturating_add(free),
            "UsedInstances": used,
            "UnavailableInstances": down,
            "LogicalCPUs": t.logical_cpus,
            "MainMemorySize": t.main_memory_mib,
            "OSFamily": family,
            "ConnectivityIn": null,
            "ConnectivityOut": null,
            "Extension": {
                "FreeMainMemory": rooms.iter().copied().max().unwrap_or(0),
                "FreeInstances": free,
                "PooledInstances": pooled,
            },
            "Associations": {
                "ManagerID": manager_id,
                "ShareID": [share_id],
                "ApplicationEnvironmentID": [ae_id],
            },
        });
        if let Some(os) = t.os_name.clone().or(name_from_family) {
            ee["OSName"] = json!(os);
        }
        if let Some(v) = &t.os_version {
            ee["OSVersion"] = json!(v);
        }
        if let Some(d) = t.disk_mib {
            ee["Extension"]["DiskSize"] = json!(d);
        }
        environments.push(ee);
        app_envs.push(json!({
            "ID": ae_id,
            "Name": name,
            "CreationTime": created,
            "AppName": name,
            "State": "installednotverified",
            "Description": format!("VM image of template '{name}'"),
            "Associations": {
                "ExecutionEnvironmentID": [ee_id],
                "ComputingManagerID": manager_id,
                "ApplicationHandleID": [ah_id],
            },
        }));
        handles.push(json!({
            "ID": ah_id,
            "Name": name,
            "CreationTime": created,
            "Type": "ImageIdentifier",
            "Value": name,
            "Associations": { "ApplicationEnvironmentID": ae_id },
        }));
        ee_ids.push(ee_id);
        ae_ids.push(ae_id);
    }

    let rooms: Vec<u64> = up.iter().map(|a| placement::room(a, &committed)).collect();
    let held = i
        .tallies
        .iter()
        .filter(|t| t.held && t.state != super::agents::MISSING)
        .fold(0u64, |sum, t| sum.saturating_add(t.n));
    let (health, health_info) = match (i.agents.len(), up.len()) {
        (0, _) => ("critical", "no agent is registered".to_string()),
        (_, 0) => ("critical", "no agent is up".to_string()),
        // Counts only: which agents are down is for admins (`/v1/agents`).
        (n, u) if u < n => ("warning", format!("{} of {n} agents down", n - u)),
        (n, _) => ("ok", format!("{n} agents up")),
    };
    let serving = if up.is_empty() {
        "closed"
    } else if i.draining {
        "draining"
    } else {
        "production"
    };
    let (physical, logical) =
        up.iter()
            .filter_map(|a| a.host.as_ref())
            .fold((0u64, 0u64), |(p, l), h| {
                (
                    p.saturating_add(h.physical_cpus.into()),
                    l.saturating_add(h.logical_cpus.into()),
                )
            });
    let kinds: std::collections::BTreeSet<&str> = up
        .iter()
        .filter_map(|a| a.host.as_ref().map(|h| h.hypervisor_kind.as_str()))
        .collect();
    let total_jobs = i.waiting_jobs.saturating_add(i.running_jobs);
    let capability = [
        "executionmanagement.jobmanager",
        "executionmanagement.jobexecution",
        "executionmanagement.reservation",
        "data.transfer",
    ];

    json!({
        "ComputingService": [{
            "ID": service_id,
            "Name": site,
            "CreationTime": created,
            "Validity": VALIDITY_SECONDS,
            "Type": "org.gve.site",
            "QualityLevel": i.quality_level,
            "Capability": capability,
            "Complexity": format!("endpointType=1,share=1,resource={}", ee_ids.len()),
            "TotalJobs": total_jobs,
            "RunningJobs": i.running_jobs,
            "WaitingJobs": i.waiting_jobs,
            "StagingJobs": 0,
            "SuspendedJobs": 0,
            "PreLRMSWaitingJobs": 0,
            "Associations": {
                "ContactID": [],
                "LocationID": null,
                "ServiceID": [],
                "EndpointID": [endpoint_id],
                "ShareID": [share_id],
                "ManagerID": [manager_id],
            },
        }],
        "ComputingEndpoint": [{
            "ID": endpoint_id,
            "Name": format!("{site} API v1"),
            "CreationTime": created,
            "Validity": VALIDITY_SECONDS,
            "URL": i.url,
            "Capability": capability,
            "Technology": "rest",
            "InterfaceName": "org.gve.site",
            "InterfaceVersion": "1",
            "Implementor": "gve",
            "ImplementationName": "gve",
            "ImplementationVersion": version,
            "QualityLevel": i.quality_level,
            "HealthState": health,
            "HealthStateInfo": health_info,
            "ServingState": serving,
            "Staging": "staginginout",
            "TotalJobs": total_jobs,
            "RunningJobs": i.running_jobs,
            "WaitingJobs": i.waiting_jobs,
            "Associations": {
                "ServiceID": service_id,
                "ShareID": [share_id],
            },
        }],
        "ComputingManager": [{
            "ID": manager_id,
            "Name": format!("{site} agents"),
            "CreationTime": created,
            "ProductName": "gve",
            "ProductVersion": version,
            "Reservation": true,
            "BulkSubmission": false,
            "Homogeneous": kinds.len() <= 1,
            "TotalPhysicalCPUs": physical,
            "TotalLogicalCPUs": logical,
            "SlotsUsedByGridJobs": held,
            "Extension": { "HypervisorKinds": kinds },
            "Associations": {
                "ServiceID": service_id,
                "ResourceID": ee_ids,
                "ApplicationEnvironmentID": ae_ids,
            },
        }],
        "ExecutionEnvironment": environments,
        "ApplicationEnvironment": app_envs,
        "ApplicationHandle": handles,
        "ComputingShare": [{
            "ID": share_id,
            "Name": "default",
            "CreationTime": created,
            "Validity": VALIDITY_SECONDS,
            "Description": "every user of the site, within their quota",
            "ServingState": serving,
            "MaxWallTime": i.lease_max_seconds,
            "DefaultWallTime": i.lease_default_seconds,
            "MaxMainMemory": rooms.iter().copied().max().unwrap_or(0),
            "UsedSlots": held,
            "TotalJobs": total_jobs,
            "RunningJobs": i.running_jobs,
            "WaitingJobs": i.waiting_jobs,
            "ReservationPolicy": "optional",
            "Extension": {
                "FreeMainMemory": rooms.iter().fold(0u64, |s, r| s.saturating_add(*r)),
                "AgentsUp": up.len(),
                "Agents": i.agents.len(),
            },
            "Associations": {
                "ServiceID": service_id,
                "EndpointID": [endpoint_id],
                "ResourceID": ee_ids,
            },
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_families_follow_glue() {
        assert_eq!(os_family_and_name(Some("linux")), ("linux".into(), None));
        assert_eq!(
            os_family_and_name(Some("Debian")),
            ("linux".into(), Some("debian".into()))
        );
        assert_eq!(
            os_family_and_name(Some("windows")),
            ("windows".into(), None)
        );
        assert_eq!(os_family_and_name(None), ("unknown".into(), None));
        assert_eq!(os_family_and_name(Some("plan9")), ("plan9".into(), None));
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(glue_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(glue_time(1_764_633_600_123), "2025-12-02T00:00:00Z");
        // Out of range: the epoch, not a panic.
        assert_eq!(glue_time(u64::MAX), "1970-01-01T00:00:00Z");
    }
}
