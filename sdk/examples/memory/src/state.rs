//! The simulated hypervisors: one [`Endpoint`] per endpoint string, all in this
//! instance's memory.

use std::cell::RefCell;
use std::collections::BTreeMap;

use gve_sdk::prelude::*;

use crate::fs::Fs;

/// One VM or template and its disk contents.
pub struct Vm {
    /// What the contract reports.
    pub info: VmInfo,
    /// The guest's files.
    pub fs: Fs,
}

/// One simulated hypervisor host.
pub struct Endpoint {
    /// The endpoint string, also the `host` of its VMs.
    pub name: String,
    /// VMs and templates in creation order.
    pub vms: Vec<Vm>,
}

/// Every endpoint this instance has seen, and the id counter shared by all of them
/// (ids stay unique when VMs migrate between endpoints).
#[derive(Default)]
pub struct World {
    endpoints: BTreeMap<String, Endpoint>,
    next_id: u64,
}

thread_local! {
    static WORLD: RefCell<World> = RefCell::new(World::default());
}

/// Runs `f` with exclusive access to the world.
pub fn with<R>(f: impl FnOnce(&mut World) -> R) -> R {
    WORLD.with(|w| f(&mut w.borrow_mut()))
}

/// Makes sure `endpoint` exists, seeding its templates on first use.
pub fn touch(endpoint: &str) {
    with(|w| {
        w.endpoint(endpoint);
    });
}

impl World {
    /// The endpoint named `name`, created with its two templates if new.
    pub fn endpoint(&mut self, name: &str) -> &mut Endpoint {
        self.endpoints
            .entry(name.to_string())
            .or_insert_with(|| Endpoint::seeded(name))
    }

    /// A fresh VM id, `mem-<n>`.
    pub fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("mem-{}", self.next_id)
    }
}

impl Endpoint {
    fn seeded(name: &str) -> Endpoint {
        let template = |id: &str, tname: &str, cpus: u32, mib: u64, disk: u64, os: &str| Vm {
            info: VmInfo {
                id: id.into(),
                name: tname.into(),
                state: VmState::Stopped,
                host: name.into(),
                addresses: Vec::new(),
                resources: VmResources {
                    logical_cpus: cpus,
                    main_memory_mib: mib,
                    disk_mib: Some(disk),
                },
                platform: Some("amd64".into()),
                os_family: Some("linux".into()),
                os_name: Some(os.into()),
                is_template: true,
                labels: Vec::new(),
            },
            fs: Fs::base(),
        };
        Endpoint {
            name: name.to_string(),
            vms: vec![
                template("tpl-debian-12", "debian-12", 2, 2048, 10_240, "debian"),
                template("tpl-alpine-3", "alpine-3", 1, 256, 1_024, "alpine"),
            ],
        }
    }

    /// Index of the VM or template with id or name `key`.
    pub fn position(&self, key: &str) -> Result<usize> {
        self.vms
            .iter()
            .position(|v| v.info.id == key)
            .or_else(|| self.vms.iter().position(|v| v.info.name == key))
            .ok_or_else(|| Error::not_found(format!("no VM or template {key:?} on {}", self.name)))
    }

    /// The VM or template with id or name `key`.
    pub fn get(&self, key: &str) -> Result<&Vm> {
        Ok(&self.vms[self.position(key)?])
    }

    /// The VM or template with id or name `key`, mutably.
    pub fn get_mut(&mut self, key: &str) -> Result<&mut Vm> {
        let i = self.position(key)?;
        Ok(&mut self.vms[i])
    }

    /// Fails with `already-exists` when a VM or template is called `name`.
    pub fn check_name_free(&self, name: &str) -> Result<()> {
        if self.vms.iter().any(|v| v.info.name == name) {
            return Err(Error::already_exists(format!(
                "a VM or template named {name:?} exists on {}",
                self.name
            )));
        }
        Ok(())
    }

    /// vCPUs and MiB held by VMs the hypervisor keeps in memory, and how many there are.
    pub fn used(&self) -> (u32, u64, u32) {
        self.vms
            .iter()
            .filter(|v| holds_resources(v.info.state))
            .fold((0, 0, 0), |(c, m, n), v| {
                (
                    c + v.info.resources.logical_cpus,
                    m + v.info.resources.main_memory_mib,
                    n + 1,
                )
            })
    }

    /// Fails with `unavailable` unless `mib` more MiB fit on this host.
    pub fn check_memory(&self, vm: &str, mib: u64) -> Result<()> {
        let (_, total) = capacity()?;
        let free = total.saturating_sub(self.used().1);
        if mib > free {
            return Err(Error::unavailable(format!(
                "not enough memory on {} for {vm}: {mib} MiB needed, {free} MiB free",
                self.name
            )));
        }
        Ok(())
    }
}

/// True for states in which the hypervisor holds the VM's memory and vCPUs.
pub fn holds_resources(state: VmState) -> bool {
    matches!(
        state,
        VmState::Running | VmState::Paused | VmState::Suspended | VmState::Migrating
    )
}

/// The simulated host's (logical CPUs, memory MiB), from the operator's config.
pub fn capacity() -> Result<(u32, u64)> {
    Ok((
        gve_sdk::config::parse_or("cpus", 16u32)?,
        gve_sdk::config::parse_or("memory-mib", 65_536u64)?,
    ))
}
