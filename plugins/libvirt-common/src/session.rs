//! One libvirt connection and the contract's operations on it, for any [`Flavor`].

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use gve_sdk::libvirt::{escape, Connection, DiskFormat, Domain, DomainState, UndefineFlags};
use gve_sdk::prelude::*;

use crate::domain::{self, DomainView, TEMPLATE_LABEL};
use crate::migration::{Abilities, MigrationConfig};
use crate::Flavor;

/// What a graceful shutdown leaves of the call's budget for powering off a guest
/// that did not stop in time.
const POWER_OFF_KEEP: Duration = Duration::from_secs(3);

/// What waiting for a shut-off domain's teardown leaves of the call's budget for
/// describing it.
const TEARDOWN_KEEP: Duration = Duration::from_millis(500);

/// Shut off and torn down: libxl reports a domain shut off before it destroys it
/// in Xen (hotplug scripts, its memory freed), and forgets its id only after.
fn torn_down(d: &Domain) -> bool {
    d.state == DomainState::Shutoff && d.id.is_none()
}

/// An open session: a libvirt connection and the node's host name.
pub struct LibvirtSession<F: Flavor> {
    conn: Connection,
    hostname: String,
    pool: String,
    shutdown_timeout: Duration,
    migration: MigrationConfig,
    flavor: PhantomData<F>,
}

/// File name suffix of a volume in `format`.
fn suffix(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => ".qcow2",
        DiskFormat::Raw => ".img",
    }
}

/// libvirt's name of a volume format.
fn format_name(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    }
}

/// Domain `d` as `dest`, another host's connection, describes it (without
/// disk sizes: its pools are not this session's).
fn info_at(dest: &Connection, d: &Domain) -> Result<VmInfo> {
    let view = DomainView::parse(&dest.domain_xml(&d.name, true)?)?;
    Ok(domain::vm_info(d, &view, &dest.hostname()?, None))
}

impl<F: Flavor> LibvirtSession<F> {
    /// Connects to `endpoint` (a libvirt URI the operator granted).
    pub fn open(endpoint: String) -> Result<LibvirtSession<F>> {
        let conn = Connection::open(&endpoint)?;
        let hostname = conn.hostname()?;
        let shutdown_ms: u64 = gve_sdk::config::parse_or("shutdown-timeout-ms", 20_000)?;
        Ok(LibvirtSession {
            conn,
            hostname,
            pool: crate::storage_pool(),
            shutdown_timeout: Duration::from_millis(shutdown_ms),
            migration: MigrationConfig::from_config()?,
            flavor: PhantomData,
        })
    }

    fn describe(&self, d: &Domain) -> Result<(VmInfo, DomainView)> {
        let view = DomainView::parse(&self.conn.domain_xml(&d.name, true)?)?;
        let disk_mib = view
            .disks
            .iter()
            .filter_map(|disk| self.conn.lookup_volume(&disk.path).ok())
            .map(|v| v.capacity_bytes >> 20)
            .reduce(|a, b| a + b);
        Ok((domain::vm_info(d, &view, &self.hostname, disk_mib), view))
    }

    fn find(&self, vm: &str) -> Result<Domain> {
        self.conn.lookup_domain(vm).map_err(|e| {
            if e.kind() == "not-found" {
                Error::not_found(format!("no VM '{vm}' on {}", self.hostname))
            } else {
                e
            }
        })
    }

    fn info(&self, vm: &str) -> Result<VmInfo> {
        Ok(self.describe(&self.find(vm)?)?.0)
    }

    fn all(&self, templates: bool) -> Result<Vec<VmInfo>> {
        let mut out = Vec::new();
        for d in self.conn.list_domains()? {
            // A domain can vanish between the listing and its description.
            match self.describe(&d) {
                Ok((info, _)) if info.is_template == templates => out.push(info),
                Ok(_) => {}
                Err(e) if e.kind() == "not-found" => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Creates the disk of a new VM in the pool: an overlay of `source` (linked, where
    /// the flavor has them) or a full copy of it.
    fn new_disk(
        &self,
        vm: &str,
        index: usize,
        source: &str,
        linked: bool,
        grow_mib: Option<u64>,
    ) -> Result<String> {
        let src = self
            .conn
            .lookup_volume(source)
            .map_err(|e| e.context(format!("disk {source}")))?;
        let capacity = grow_mib
            .map(|m| m << 20)
            .unwrap_or(0)
            .max(src.capacity_bytes);
        let name = format!("{vm}-disk{index}{}", suffix(F::DISK_FORMAT));
        let format = format_name(F::DISK_FORMAT);
        let vol = if linked {
            let xml = format!(
                "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
                 <target><format type='{format}'/></target><backingStore><path>{}</path>\
                 <format type='{format}'/></backingStore></volume>",
                escape(&name),
                escape(source)
            );
            self.conn.create_volume(&self.pool, &xml)?
        } else {
            let xml = format!(
                "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
                 <target><format type='{format}'/></target></volume>",
                escape(&name)
            );
            self.conn.clone_volume(&self.pool, &xml, source)?
        };
        Ok(vol.path)
    }

    /// Defines `name` from `base` (a template or source VM's definition) with new disks.
    fn define(
        &self,
        name: &str,
        base: &DomainView,
        memory_mib: u64,
        vcpus: u32,
        disks: &[String],
        labels: &[(String, String)],
    ) -> Result<VmInfo> {
        let mut xml = F::skeleton(name, base)
            .memory_mib(memory_mib)
            .vcpus(vcpus)
            .cpu(base.cpu.clone());
        if let Some(a) = &base.arch {
            xml = xml.arch(a.clone());
        }
        if let Some(m) = &base.machine {
            xml = xml.machine(m.clone());
        }
        if let Some(k) = &base.kernel {
            xml = xml.kernel(k.clone());
        }
        if let Some(i) = &base.initrd {
            xml = xml.initrd(i.clone());
        }
        if let Some(c) = &base.cmdline {
            xml = xml.cmdline(c.clone());
        }
        for (disk, old) in disks.iter().zip(&base.disks) {
            xml = xml.disk(F::disk(disk.clone(), old));
        }
        for net in &base.networks {
            xml = xml.network(net.clone());
        }
        for (k, v) in labels {
            xml = xml.label(k.clone(), v.clone());
        }
        let d = self.conn.define_domain(&xml.to_xml())?;
        Ok(self.describe(&d)?.0)
    }

    /// Deletes volumes, best effort (used to undo a half-made VM).
    fn drop_disks(&self, disks: &[String]) {
        for d in disks {
            let _ = self.conn.delete_volume(d);
        }
    }

    fn derive(
        &self,
        source: &str,
        name: &str,
        linked: bool,
        profile: Option<&VmProfile>,
    ) -> Result<VmInfo> {
        if self.conn.lookup_domain(name).is_ok() {
            return Err(Error::already_exists(format!(
                "a VM named '{name}' exists on {}",
                self.hostname
            )));
        }
        let src = self.find(source)?;
        let (src_info, view) = self.describe(&src)?;
        F::check_base(&view)?;
        // A running guest writes its disks (and QEMU locks them): a copy would be
        // torn, and an overlay would fork from a moving base.
        if !src_info.is_template && !matches!(src_info.state, VmState::Stopped | VmState::Crashed) {
            return Err(Error::invalid_state(format!(
                "cloning {} needs it stopped: its disks are in use while it is {}; shut it down first",
                src_info.name,
                state_name(src_info.state)
            )));
        }
        if view.disks.is_empty() {
            return Err(Error::invalid_argument(format!(
                "{} has no file-backed disk to clone",
                src_info.name
            )));
        }
        let mut made = Vec::new();
        for (i, disk) in view.disks.iter().enumerate() {
            let grow = if i == 0 {
                profile.and_then(|p| p.disk_mib)
            } else {
                None
            };
            match self.new_disk(name, i, &disk.path, linked, grow) {
                Ok(path) => made.push(path),
                Err(e) => {
                    self.drop_disks(&made);
                    return Err(e);
                }
            }
        }
        let mut labels: Vec<(String, String)> = view
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != TEMPLATE_LABEL)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (memory, vcpus) = match profile {
            Some(p) => {
                labels.extend(p.labels.iter().map(|l| (l.key.clone(), l.value.clone())));
                for (k, v) in [
                    ("gve.os-family", &p.os_family),
                    ("gve.os-name", &p.os_name),
                    ("gve.os-version", &p.os_version),
                ] {
                    if let Some(v) = v {
                        labels.push((k.to_string(), v.clone()));
                    }
                }
                (p.main_memory_mib, p.logical_cpus)
            }
            None => (view.memory_mib, view.vcpus),
        };
        labels.push(("gve.source".into(), src_info.name.clone()));
        self.define(name, &view, memory, vcpus, &made, &labels)
            .inspect_err(|_| self.drop_disks(&made))
    }

    /// Deletes pool volumes named `<vm>-disk<N><suffix>` (disks gve makes for a VM)
    /// when no domain of that name exists; returns how many were deleted.
    fn remove_leftover_disks(&self, vm: &str) -> Result<usize> {
        let prefix = format!("{vm}-disk");
        let mut n = 0;
        for v in self.conn.list_volumes(&self.pool)? {
            let ours = v
                .name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(suffix(F::DISK_FORMAT)))
                .is_some_and(|i| i.parse::<u32>().is_ok());
            if ours {
                self.conn.delete_volume(&v.path)?;
                gve_sdk::log::warn(&format!(
                    "removed {} left behind by an interrupted create or clone of {vm}",
                    v.path
                ));
                n += 1;
            }
        }
        Ok(n)
    }

    /// Moves a stopped VM: its definition goes to `destination` and leaves this
    /// host; its disks stay where they are, so every host must see the pool at the
    /// same paths (`shared-storage`). libvirt's own migration needs a running domain.
    fn move_definition(&self, d: &Domain, destination: &str) -> Result<VmInfo> {
        if !self.migration.shared_storage {
            return Err(Error::unsupported(format!(
                "{} is stopped: moving it means moving its disks, which libvirt does only for a \
                 running VM; start it first, or set shared-storage = true if every host sees the \
                 storage pool at the same paths",
                d.name
            )));
        }
        let xml = self.conn.domain_xml(&d.name, true)?;
        let dest = Connection::open(destination)?;
        if dest.lookup_domain(&d.uuid).is_ok() {
            return Err(Error::already_exists(format!(
                "{destination} already has a VM with the id of {}",
                d.name
            )));
        }
        let moved = dest.define_domain(&xml)?;
        if let Err(e) = self.conn.undefine_domain(&d.name, UndefineFlags::empty()) {
            // Never leave it defined on both hosts.
            let _ = dest.undefine_domain(&moved.name, UndefineFlags::empty());
            return Err(e);
        }
        // A domain libvirt is still cleaning up after it stopped (libxl does that
        // after the guest powers off) is only made transient by the undefine and
        // goes when the cleanup ends: wait for that, so the VM is on one host only.
        // (Reading a domain in that cleanup can fail otherwise: only not-found ends it.)
        let end = Instant::now()
            + gve_sdk::deadline::bounded(Duration::from_secs(20), Duration::from_secs(1));
        while Instant::now() < end {
            match self.conn.lookup_domain(&d.uuid) {
                Err(e) if e.kind() == "not-found" => break,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        info_at(&dest, &moved)
    }

    /// Finishes a migration of `d` to `destination` cut off after the
    /// destination resumed the VM and before this host's confirm step (in
    /// managed mode the client drives each step: one killed in between leaves
    /// the VM running there and its copy here paused and still defined, for
    /// good). Does what that confirm would have done: ends the copy here and
    /// its definition, never its disks (the VM there runs on them when they
    /// are shared), and answers the VM as it is there. `None` unless the copy
    /// here is paused and the one there runs: a copy here that runs is the VM,
    /// and one paused there may be a migration still under way.
    fn confirm_cut_off_migration(&self, d: &Domain, destination: &str) -> Result<Option<VmInfo>> {
        if d.state != DomainState::Paused {
            return Ok(None);
        }
        // One that cannot be reached is left to the migration's own errors.
        let Ok(dest) = Connection::open(destination) else {
            return Ok(None);
        };
        let there = match dest.lookup_domain(&d.uuid) {
            Ok(there) if there.state == DomainState::Running => there,
            _ => return Ok(None),
        };
        gve_sdk::log::warn(&format!(
            "{}: a migration to {destination} was cut off after the VM resumed there; \
             ending its paused copy here",
            d.name
        ));
        // Stopped or gone meanwhile is done: with peer-to-peer, the source's
        // libvirtd may be confirming it itself (it stops the copy, then
        // undefines it).
        let done = |r: Result<()>, meanwhile: &[&str]| match r {
            Err(e) if meanwhile.contains(&e.kind()) => Ok(()),
            other => other,
        };
        done(
            self.conn.destroy_domain(&d.name),
            &["not-found", "invalid-state"],
        )?;
        done(
            self.conn.undefine_domain(&d.name, F::undefine_flags()),
            &["not-found"],
        )?;
        info_at(&dest, &there).map(Some)
    }

    fn wait_for(
        &self,
        vm: &str,
        done: impl Fn(&Domain) -> bool,
        timeout: Duration,
    ) -> Result<bool> {
        let end = Instant::now() + timeout;
        loop {
            if done(&self.find(vm)?) {
                return Ok(true);
            }
            if Instant::now() >= end {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl<F: Flavor> Session for LibvirtSession<F> {
    fn host_info(&mut self) -> Result<HostInfo> {
        let node = self.conn.node_info()?;
        let free = self.conn.node_free_memory()?;
        let domains = self.conn.list_domains()?;
        let running: Vec<_> = domains
            .iter()
            .filter(|d| {
                matches!(
                    d.state,
                    DomainState::Running | DomainState::Blocked | DomainState::Paused
                )
            })
            .collect();
        Ok(HostInfo {
            hostname: self.hostname.clone(),
            hypervisor_kind: self.conn.hypervisor_type()?.to_lowercase(),
            hypervisor_version: self.conn.hypervisor_version()?,
            platform: if node.model == "x86_64" {
                "amd64".into()
            } else {
                node.model.clone()
            },
            cpu_model: node.model,
            physical_cpus: node.sockets * node.cores * node.nodes,
            logical_cpus: node.cpus,
            main_memory_mib: node.memory_kib >> 10,
            free_memory_mib: free >> 20,
            allocated_logical_cpus: running.iter().map(|d| d.vcpus).sum(),
            total_instances: domains.len() as u32,
            used_instances: running.len() as u32,
        })
    }

    fn list_vms(&mut self) -> Result<Vec<VmInfo>> {
        self.all(false)
    }

    fn list_templates(&mut self) -> Result<Vec<VmInfo>> {
        self.all(true)
    }

    fn get_vm(&mut self, vm: String) -> Result<VmInfo> {
        self.info(&vm)
    }

    fn create(&mut self, profile: VmProfile) -> Result<VmInfo> {
        if profile.name.is_empty() || profile.name.contains(['/', '\0']) {
            return Err(Error::invalid_argument(format!(
                "'{}' is not a usable VM name",
                profile.name
            )));
        }
        let template = profile.template.clone().ok_or_else(|| {
            Error::invalid_argument(format!(
                "the {} driver creates VMs from a template; the profile names none",
                F::DRIVER
            ))
        })?;
        let tpl = self.find(&template)?;
        if !self.describe(&tpl)?.0.is_template {
            return Err(Error::invalid_argument(format!(
                "'{template}' is a VM, not a template"
            )));
        }
        self.derive(
            &template,
            &profile.name.clone(),
            F::LINKED_CLONES,
            Some(&profile),
        )
    }

    fn clone_vm(&mut self, source: String, name: String, linked: bool) -> Result<VmInfo> {
        if linked && !F::LINKED_CLONES {
            return Err(Error::unsupported(format!(
                "the {} driver makes full clones only: its disks are {} files, which have no \
                 copy-on-write overlays",
                F::DRIVER,
                format_name(F::DISK_FORMAT)
            )));
        }
        self.derive(&source, &name, linked, None)
    }

    fn start(&mut self, vm: String) -> Result<VmInfo> {
        let d = self.find(&vm)?;
        let info = self.describe(&d)?.0;
        if info.is_template {
            return Err(Error::invalid_state(format!(
                "{} is a template; clone it to get a VM",
                info.name
            )));
        }
        if info.state != VmState::Stopped && info.state != VmState::Crashed {
            return Err(Error::invalid_state(format!(
                "{} is {}, not stopped",
                info.name,
                state_name(info.state)
            )));
        }
        self.conn
            .start_domain(&d.name)
            .map_err(|e| F::start_failed(&d.name, e))?;
        self.info(&vm)
    }

    fn shutdown(&mut self, vm: String, force: bool) -> Result<VmInfo> {
        let d = self.find(&vm)?;
        if domain::state(&d) == VmState::Stopped {
            return Err(Error::invalid_state(format!(
                "{} is already stopped",
                d.name
            )));
        }
        if !force {
            // Ask nicely (the hypervisor's request, and the guest agent if it runs),
            // then wait.
            let _ = self.conn.shutdown_domain(&d.name);
            if F::GUEST_AGENT {
                let _ = self.conn.qemu_agent_command(
                    &d.name,
                    r#"{"execute":"guest-shutdown","arguments":{"mode":"powerdown"}}"#,
                    2,
                );
            }
            // Within what is left of the call less what powering off takes.
            let grace = gve_sdk::deadline::bounded(self.shutdown_timeout, POWER_OFF_KEEP);
            if self.wait_for(&vm, torn_down, grace)? {
                return self.info(&vm);
            }
            // Shut off and still being torn down: powering it off would only wait
            // for that teardown (and its job); it is waited for instead.
            if self.find(&vm)?.state == DomainState::Shutoff {
                let rest = gve_sdk::deadline::bounded(Duration::MAX, TEARDOWN_KEEP);
                if !self.wait_for(&vm, torn_down, rest)? {
                    return Err(gve_sdk::deadline::over_budget(format_args!(
                        "shut down {}: shut off, still being torn down",
                        d.name
                    )));
                }
                return self.info(&vm);
            }
            gve_sdk::log::warn(&format!(
                "{}: no graceful shutdown within {grace:?}; powering off",
                d.name
            ));
        }
        match self.conn.destroy_domain(&d.name) {
            Ok(()) => {}
            // It reached shut-off on its own meanwhile.
            Err(e) if e.kind() == "invalid-state" => {}
            Err(e) => return Err(e),
        }
        self.info(&vm)
    }

    fn suspend(&mut self, vm: String) -> Result<VmInfo> {
        let d = self.find(&vm)?;
        if domain::state(&d) != VmState::Running {
            return Err(Error::invalid_state(format!("{} is not running", d.name)));
        }
        self.conn.suspend_domain(&d.name)?;
        self.info(&vm)
    }

    fn resume(&mut self, vm: String) -> Result<VmInfo> {
        let d = self.find(&vm)?;
        match d.state {
            DomainState::Paused | DomainState::PmSuspended => self.conn.resume_domain(&d.name)?,
            DomainState::Shutoff if d.has_managed_save => {
                self.conn.start_domain(&d.name)?;
            }
            _ => return Err(Error::invalid_state(format!("{} is not suspended", d.name))),
        }
        self.info(&vm)
    }

    fn migrate(&mut self, vm: String, destination: String, live: bool) -> Result<VmInfo> {
        let d = self.find(&vm)?;
        if let Some(done) = self.confirm_cut_off_migration(&d, &destination)? {
            return Ok(done);
        }
        if !live && domain::state(&d) == VmState::Stopped {
            return self.move_definition(&d, &destination);
        }
        // A copy's staged disk (live only) must not travel: the agent releases it
        // before a migration; one still attached means the guest holds on to it.
        let live_view = DomainView::parse(&self.conn.domain_xml(&d.name, false)?)?;
        if let Some(staged) = live_view
            .disks
            .iter()
            .find(|k| crate::bulk::is_staged(&k.path))
        {
            return Err(Error::invalid_state(format!(
                "migrate {}: a copy's staged disk {} is still attached",
                d.name, staged.path
            )));
        }
        let can = Abilities {
            driver: F::DRIVER,
            unsafe_when_shared: F::UNSAFE_WHEN_SHARED,
            storage_migration: F::STORAGE_MIGRATION,
        };
        let flags = self.migration.flags(can, live)?;
        if live && domain::state(&d) != VmState::Running {
            return Err(Error::invalid_state(format!(
                "live migration needs a running VM; {} is not",
                d.name
            )));
        }
        self.conn.migrate_domain(&d.name, &destination, flags, 0)?;
        let dest = Connection::open(&destination)?;
        info_at(&dest, &dest.lookup_domain(&d.uuid)?)
    }

    fn destroy(&mut self, vm: String) -> Result<()> {
        let d = match self.find(&vm) {
            Ok(d) => d,
            // No domain: remove disks a create or clone interrupted before its define
            // left behind under that name; not-found if there are none.
            Err(e) if e.kind() == "not-found" => {
                return self.remove_leftover_disks(&vm).and_then(|n| {
                    if n > 0 {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
            }
            Err(e) => return Err(e),
        };
        let (_, view) = self.describe(&d)?;
        if d.state != DomainState::Shutoff {
            match self.conn.destroy_domain(&d.name) {
                Ok(()) => {}
                // It reached shut-off on its own meanwhile.
                Err(e) if e.kind() == "invalid-state" => {}
                Err(e) => return Err(e),
            }
        }
        // Its disks are let go once libvirt has torn it down (a shut-off domain
        // libxl still destroys holds them), or it is gone (a transient one).
        let end = Instant::now() + gve_sdk::deadline::bounded(Duration::MAX, TEARDOWN_KEEP);
        let gone = loop {
            match self.find(&vm) {
                Ok(now) if torn_down(&now) => break false,
                // Still defined: a destroy asked again finishes it.
                Ok(_) if Instant::now() >= end => {
                    return Err(gve_sdk::deadline::over_budget(format_args!(
                        "destroy {}: powered off, still being torn down; its disks are kept",
                        d.name
                    )))
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) if e.kind() == "not-found" => break true,
                Err(e) => return Err(e),
            }
        };
        // Delete the disks this VM owns (the ones gve made for it in the pool)
        // before the definition that names them: a destroy cut off between the two
        // leaves a defined VM to destroy again, never disks nothing refers to.
        let prefix = format!("{}-disk", d.name);
        for disk in &view.disks {
            if disk
                .path
                .rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with(&prefix))
            {
                if let Err(e) = self.conn.delete_volume(&disk.path) {
                    gve_sdk::log::warn(&format!(
                        "{}: cannot delete disk {}: {e}",
                        d.name, disk.path
                    ));
                }
            }
        }
        // A transient domain is gone once powered off: nothing to undefine.
        if !gone {
            self.conn.undefine_domain(&d.name, F::undefine_flags())?;
        }
        Ok(())
    }

    fn guest_agent_command(
        &mut self,
        vm: String,
        command: String,
        timeout_ms: u32,
    ) -> Result<String> {
        if !F::GUEST_AGENT {
            return Err(Error::unsupported(format!(
                "the {} driver has no channel to a guest agent",
                F::DRIVER
            )));
        }
        // The command goes at once (one lookup and the command: an exec's every
        // status poll pays this path); only a failure asks the domain why, so the
        // caller learns that it is gone or not running rather than libvirt's words.
        let seconds = timeout_ms.div_ceil(1000).max(1) as i32;
        match self.conn.qemu_agent_command(&vm, &command, seconds) {
            Ok(reply) => Ok(reply),
            Err(e) => {
                let d = self.find(&vm)?;
                if domain::state(&d) != VmState::Running {
                    return Err(Error::unavailable(format!(
                        "{} is not running: its guest agent cannot answer",
                        d.name
                    )));
                }
                Err(e)
            }
        }
    }
}
