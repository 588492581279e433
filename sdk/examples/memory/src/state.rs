//! The simulated hypervisors: one [`Endpoint`] per endpoint string, all in this
//! instance's memory.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use gve_sdk::prelude::*;

use crate::fs::Fs;

/// One VM or template and its disk contents.
pub struct Vm {
    /// What the contract reports.
    pub info: VmInfo,
    /// The guest's files.
    pub fs: Fs,
}

/// One simulated hypervisor host. Lookups by id or name, the resources held and
/// the count of VMs are kept in indexes, so no operation but a listing walks every
/// VM (a scale bench makes hundreds of thousands).
pub struct Endpoint {
    /// The endpoint string, also the `host` of its VMs.
    pub name: String,
    /// VMs and templates by arrival order.
    vms: BTreeMap<u64, Vm>,
    /// Arrival order by id, and by name.
    ids: HashMap<String, u64>,
    names: HashMap<String, u64>,
    /// The next arrival's number.
    arrivals: u64,
    /// What VMs in a state that holds resources hold.
    held: Held,
    /// VMs (not templates).
    vm_count: u64,
}

/// vCPUs and memory held by VMs, and how many VMs hold them. Kept wide (a profile
/// may ask for any count) and narrowed only when reported.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    cpus: u64,
    mib: u128,
    vms: u64,
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

/// The most VMs an endpoint may start with (each takes about 1 KiB of the
/// plugin's memory).
pub const MAX_SEED: u64 = 200_000;

/// How many VMs endpoint `name` starts with: `N` of a `memory:<name>?vms=N`
/// endpoint (a host already full, for benches), else none.
pub fn seed_count(name: &str) -> Result<u64> {
    let Some((_, query)) = name.split_once('?') else {
        return Ok(0);
    };
    query
        .strip_prefix("vms=")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n <= MAX_SEED)
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "endpoint {name:?}: expected memory:<name>?vms=N with N at most {MAX_SEED}"
            ))
        })
}

/// The id of VM `i` an endpoint starts with: the same for the same endpoint
/// string in every instance (a restarted agent finds the VMs it had), distinct
/// between endpoints (a hash of the string) and from made VMs (`mem-<n>`).
fn seed_id(name: &str, i: u64) -> String {
    // FNV-1a, 64 bits: stable across builds, unlike the std hasher.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("seed-{h:016x}-{i}")
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
        let mut ep = Endpoint {
            name: name.to_string(),
            vms: BTreeMap::new(),
            ids: HashMap::new(),
            names: HashMap::new(),
            arrivals: 0,
            held: Held::default(),
            vm_count: 0,
        };
        ep.insert(template(
            "tpl-debian-12",
            "debian-12",
            2,
            2048,
            10_240,
            "debian",
        ));
        ep.insert(template(
            "tpl-alpine-3",
            "alpine-3",
            1,
            256,
            1_024,
            "alpine",
        ));
        // Checked when the session opened; a bad count seeds nothing.
        for i in 0..seed_count(name).unwrap_or(0) {
            let mut vm = template(
                &seed_id(name, i),
                &format!("vm-{i:07}"),
                1,
                16,
                1_024,
                "debian",
            );
            vm.info.is_template = false;
            vm.info.resources.disk_mib = None;
            ep.insert(vm);
        }
        ep
    }

    /// Every VM and template, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values()
    }

    /// Adds a VM or template (its name checked free by the caller).
    pub fn insert(&mut self, vm: Vm) {
        debug_assert!(!self.names.contains_key(&vm.info.name), "name checked free");
        let n = self.arrivals;
        self.vm_count += u64::from(!vm.info.is_template);
        self.arrivals += 1;
        self.ids.insert(vm.info.id.clone(), n);
        self.names.insert(vm.info.name.clone(), n);
        self.hold(&vm.info, true);
        self.vms.insert(n, vm);
    }

    /// Removes the VM or template with id or name `key`.
    pub fn remove(&mut self, key: &str) -> Result<Vm> {
        let n = self.position(key)?;
        let vm = self.vms.remove(&n).expect("indexed");
        self.ids.remove(&vm.info.id);
        self.names.remove(&vm.info.name);
        self.hold(&vm.info, false);
        self.vm_count -= u64::from(!vm.info.is_template);
        Ok(vm)
    }

    /// Sets the state (and addresses) of the VM with id or name `key`.
    pub fn set_state(&mut self, key: &str, to: VmState, addresses: Vec<String>) -> Result<VmInfo> {
        let n = self.position(key)?;
        let before = self.vms[&n].info.clone();
        self.hold(&before, false);
        let info = &mut self.vms.get_mut(&n).expect("indexed").info;
        info.state = to;
        info.addresses = addresses;
        let info = info.clone();
        self.hold(&info, true);
        Ok(info)
    }

    /// Counts `info`'s resources in (or out of) what the host holds.
    fn hold(&mut self, info: &VmInfo, add: bool) {
        if !holds_resources(info.state) {
            return;
        }
        let (c, m) = (
            u64::from(info.resources.logical_cpus),
            u128::from(info.resources.main_memory_mib),
        );
        let h = &mut self.held;
        if add {
            (h.cpus, h.mib, h.vms) = (h.cpus + c, h.mib + m, h.vms + 1);
        } else {
            (h.cpus, h.mib, h.vms) = (h.cpus - c, h.mib - m, h.vms - 1);
        }
    }

    /// Arrival number of the VM or template with id or name `key`.
    fn position(&self, key: &str) -> Result<u64> {
        self.ids
            .get(key)
            .or_else(|| self.names.get(key))
            .copied()
            .ok_or_else(|| Error::not_found(format!("no VM or template {key:?} on {}", self.name)))
    }

    /// The VM or template with id or name `key`.
    pub fn get(&self, key: &str) -> Result<&Vm> {
        Ok(&self.vms[&self.position(key)?])
    }

    /// The VM or template with id or name `key`, and its files to change (its
    /// state changes only through [`Endpoint::set_state`], which keeps the totals).
    pub fn files_mut(&mut self, key: &str) -> Result<(&VmInfo, &mut Fs)> {
        let n = self.position(key)?;
        let vm = self.vms.get_mut(&n).expect("indexed");
        Ok((&vm.info, &mut vm.fs))
    }

    /// Fails with `already-exists` when a VM or template is called `name`.
    pub fn check_name_free(&self, name: &str) -> Result<()> {
        if self.names.contains_key(name) {
            return Err(Error::already_exists(format!(
                "a VM or template named {name:?} exists on {}",
                self.name
            )));
        }
        Ok(())
    }

    /// vCPUs and MiB held by VMs the hypervisor keeps in memory, and how many there
    /// are (each at most its type's largest value).
    pub fn used(&self) -> (u32, u64, u32) {
        let h = self.held;
        (
            u32::try_from(h.cpus).unwrap_or(u32::MAX),
            u64::try_from(h.mib).unwrap_or(u64::MAX),
            u32::try_from(h.vms).unwrap_or(u32::MAX),
        )
    }

    /// How many VMs (not templates) there are.
    pub fn vm_count(&self) -> u64 {
        self.vm_count
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
