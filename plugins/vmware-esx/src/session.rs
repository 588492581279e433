//! The contract's driver operations on one vSphere session.

use std::time::{Duration, Instant};

use gve_sdk::prelude::*;
use gve_sdk::{deadline, log};

use crate::inventory::Conn;
use crate::props;
use crate::task;
use crate::vm::{self, LABEL_PREFIX};
use crate::xml::{self, MoRef};

/// What a graceful shutdown leaves of the call's budget for powering the VM off
/// when its guest does not stop in time.
const POWER_OFF_KEEP: Duration = Duration::from_secs(5);

/// What a step whose failure is cleaned up leaves of the call's budget for that
/// clean-up (a `Destroy_Task` and its wait).
const CLEAN_UP_KEEP: Duration = Duration::from_secs(3);

/// What a new VM's clone leaves of the call's budget for sizing it (a
/// `ReconfigVM_Task` and its wait), on top of [`CLEAN_UP_KEEP`] for removing it
/// should sizing fail.
const SIZE_KEEP: Duration = Duration::from_secs(3);

/// An open driver session.
pub struct EsxSession {
    conn: Conn,
}

impl EsxSession {
    /// Logs in to `endpoint`.
    pub fn open(endpoint: String, credentials: Credentials) -> Result<EsxSession> {
        Ok(EsxSession {
            conn: Conn::open(&endpoint, credentials)?,
        })
    }

    /// Calls a `..._Task` method on `this` and waits for it; returns its result.
    fn run_task(
        &mut self,
        method: &str,
        this: &MoRef,
        args: &str,
        context: &str,
    ) -> Result<Option<MoRef>> {
        self.run_task_keeping(method, this, args, context, Duration::ZERO)
    }

    /// [`Self::run_task`], its wait leaving `after` of the call for what follows.
    fn run_task_keeping(
        &mut self,
        method: &str,
        this: &MoRef,
        args: &str,
        context: &str,
        after: Duration,
    ) -> Result<Option<MoRef>> {
        let want = self.conn.settings.task_timeout;
        let client = &mut self.conn.client;
        let t = client.call(method, this, args, |r| task::returned(r, method))?;
        let long = task::LONG.contains(&method);
        task::wait(client, &t, context, want, long, after)
    }

    fn power(&mut self, vm: &str) -> Result<(MoRef, vm::Record)> {
        let rec = self.conn.find(vm)?;
        Ok((rec.id.clone(), rec))
    }

    fn not_template(rec: &vm::Record, op: &str) -> Result<()> {
        if rec.template {
            return Err(Error::invalid_state(format!(
                "{} ({}) is a template: it cannot be {op}",
                rec.name, rec.id.value
            )));
        }
        Ok(())
    }

    fn labels_xml(labels: &[Label]) -> String {
        labels
            .iter()
            .map(|l| {
                format!(
                    "<extraConfig xsi:type=\"OptionValue\">{}<value xsi:type=\"xsd:string\">{}</value></extraConfig>",
                    xml::text("key", &format!("{LABEL_PREFIX}{}", l.key)),
                    xml::escape(&l.value)
                )
            })
            .collect()
    }

    fn check_new_name(&mut self, name: &str) -> Result<()> {
        if name.is_empty() || name.len() > 80 {
            return Err(Error::invalid_argument(format!(
                "VM name {name:?}: vSphere names are 1 to 80 characters"
            )));
        }
        if self.conn.name_taken(name)? {
            return Err(Error::already_exists(format!(
                "a VM or template named '{name}' exists at {}",
                self.conn.client.endpoint.url
            )));
        }
        Ok(())
    }

    /// Clones `source` to `name` (stopped, never a template); `config` is extra
    /// `VirtualMachineConfigSpec` content (schema order); the wait for the clone
    /// leaves `after` of the call for what follows.
    fn clone_to(
        &mut self,
        source: &MoRef,
        name: &str,
        linked: bool,
        config: &str,
        after: Duration,
    ) -> Result<MoRef> {
        let mut parent = None;
        let mut pool = None;
        let mut host = None;
        let mut snapshot = None;
        let mut template = false;
        let mut labels = Vec::new();
        props::one(
            &mut self.conn.client,
            source,
            &[
                "parent",
                "resourcePool",
                "runtime.host",
                "snapshot.currentSnapshot",
                "config.template",
                "config.extraConfig",
                "name",
            ],
            |p| {
                parent = props::moref(p, "parent");
                pool = props::moref(p, "resourcePool");
                host = props::moref(p, "runtime.host");
                snapshot = props::moref(p, "snapshot.currentSnapshot");
                template = props::text(p, "config.template") == Some("true");
                labels = vm::Record::read(source.clone(), p).labels;
                Ok(())
            },
        )?;
        if linked && snapshot.is_none() {
            return Err(Error::invalid_state(format!(
                "{}: a linked clone shares the disks of the source's current snapshot, and it has none; take a snapshot first or clone in full",
                source.value
            )));
        }
        let folder = match parent {
            Some(f) if f.kind == "Folder" => f,
            _ => self.conn.placement()?.folder,
        };
        let pool = match (pool, host) {
            (Some(p), _) => p,
            (None, Some(h)) => self.conn.pool_of_host(&h)?,
            (None, None) => self.conn.placement()?.pool,
        };
        let mut location = String::new();
        if linked {
            location.push_str("<diskMoveType>createNewChildDiskBacking</diskMoveType>");
        }
        location.push_str(&xml::moref("pool", &pool));
        let spec = format!(
            "<spec><location>{location}</location><template>false</template><config>{config}{}</config><powerOn>false</powerOn>{}</spec>",
            Self::labels_xml(&labels),
            snapshot.filter(|_| linked).map(|s| xml::moref("snapshot", &s)).unwrap_or_default()
        );
        let args = format!(
            "{}{}{spec}",
            xml::moref("folder", &folder),
            xml::text("name", name)
        );
        let what = if template { "template" } else { "VM" };
        let context = format!("clone {what} {} to '{name}'", source.value);
        self.run_task_keeping("CloneVM_Task", source, &args, &context, after)?
            .ok_or_else(|| Error::backend(format!("{context}: the task named no new VM")))
    }

    fn reconfigure(&mut self, id: &MoRef, spec: &str, context: &str) -> Result<()> {
        let args = format!("<spec>{spec}</spec>");
        self.run_task("ReconfigVM_Task", id, &args, context)
            .map(|_| ())
    }

    fn wait_power(&mut self, id: &MoRef, want: &str, until: Instant) -> Result<bool> {
        loop {
            if self.conn.record(id)?.power == want {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Session for EsxSession {
    fn host_info(&mut self) -> Result<HostInfo> {
        let mut physical = 0u32;
        let mut logical = 0u32;
        let mut memory_mib = 0u64;
        let mut used_mib = 0u64;
        let mut model = String::new();
        let mut names = Vec::new();
        let mut version = String::new();
        props::retrieve(
            &mut self.conn.client,
            "HostSystem",
            &[
                "name",
                "summary.hardware.cpuModel",
                "summary.hardware.numCpuCores",
                "summary.hardware.numCpuThreads",
                "summary.hardware.memorySize",
                "summary.quickStats.overallMemoryUsage",
                "summary.config.product.version",
            ],
            props::Objects::All,
            |_, p| {
                names.push(props::text(p, "name").unwrap_or("").to_string());
                physical = physical
                    .saturating_add(props::number(p, "summary.hardware.numCpuCores").unwrap_or(0));
                logical = logical.saturating_add(
                    props::number(p, "summary.hardware.numCpuThreads").unwrap_or(0),
                );
                memory_mib = memory_mib.saturating_add(
                    props::number::<u64>(p, "summary.hardware.memorySize").unwrap_or(0) >> 20,
                );
                used_mib = used_mib.saturating_add(
                    props::number(p, "summary.quickStats.overallMemoryUsage").unwrap_or(0),
                );
                if model.is_empty() {
                    model = props::text(p, "summary.hardware.cpuModel")
                        .unwrap_or("")
                        .to_string();
                }
                if version.is_empty() {
                    version = props::text(p, "summary.config.product.version")
                        .unwrap_or("")
                        .to_string();
                }
                Ok(())
            },
        )?;
        let (mut total, mut used, mut vcpus) = (0u32, 0u32, 0u32);
        self.conn.records(|r| {
            if !r.template {
                total = total.saturating_add(1);
                if r.power == "poweredOn" {
                    used = used.saturating_add(1);
                    vcpus = vcpus.saturating_add(r.cpus);
                }
            }
        })?;
        let c = &self.conn.client.content;
        let hostname = match names.as_slice() {
            [one] if c.api_type == "HostAgent" => one.clone(),
            _ => self.conn.client.endpoint.host.clone(),
        };
        Ok(HostInfo {
            hostname,
            hypervisor_kind: "esx".into(),
            hypervisor_version: if c.version.is_empty() {
                version
            } else {
                c.version.clone()
            },
            platform: "amd64".into(),
            cpu_model: model,
            physical_cpus: physical,
            logical_cpus: logical,
            main_memory_mib: memory_mib,
            free_memory_mib: memory_mib.saturating_sub(used_mib),
            allocated_logical_cpus: vcpus,
            total_instances: total,
            used_instances: used,
        })
    }

    fn list_vms(&mut self) -> Result<Vec<VmInfo>> {
        self.conn.list(false)
    }

    fn list_templates(&mut self) -> Result<Vec<VmInfo>> {
        self.conn.list(true)
    }

    fn get_vm(&mut self, vm: String) -> Result<VmInfo> {
        let rec = self.conn.find(&vm)?;
        Ok(rec.info(self.conn.host_names(rec.host.as_ref())?))
    }

    fn create(&mut self, profile: VmProfile) -> Result<VmInfo> {
        if profile.image.is_some() {
            return Err(Error::unsupported(
                "vmware-esx creates VMs from a template or empty; disk images are not supported",
            ));
        }
        if profile.logical_cpus == 0 || profile.main_memory_mib == 0 {
            return Err(Error::invalid_argument(
                "a VM needs at least one CPU and 1 MiB of memory",
            ));
        }
        let cpus = i32::try_from(profile.logical_cpus).map_err(|_| {
            Error::invalid_argument(format!("{} CPUs is out of range", profile.logical_cpus))
        })?;
        let memory = i64::try_from(profile.main_memory_mib).map_err(|_| {
            Error::invalid_argument(format!("{} MiB is out of range", profile.main_memory_mib))
        })?;
        self.check_new_name(&profile.name)?;
        let labels = Self::labels_xml(&profile.labels);
        let id = match &profile.template {
            Some(t) => {
                let source = self.conn.resolve(t)?;
                // Time kept for sizing it and its clean-up (the wait keeps at most
                // half of what it has for them).
                let after = SIZE_KEEP + CLEAN_UP_KEEP;
                let id = self.clone_to(&source, &profile.name, false, "", after)?;
                let context = format!("size new VM {} ({})", profile.name, id.value);
                let spec =
                    format!("<numCPUs>{cpus}</numCPUs><memoryMB>{memory}</memoryMB>{labels}");
                // Sized with time kept to remove the clone should sizing fail.
                self.conn.client.reserve = CLEAN_UP_KEEP;
                let sized = self.reconfigure(&id, &spec, &context);
                self.conn.client.reserve = Duration::ZERO;
                if let Err(e) = sized {
                    let gone = self.run_task("Destroy_Task", &id, "", "remove half-made VM");
                    return Err(match gone {
                        Ok(_) => e.context(format_args!(
                            "{}: its clone {} was removed",
                            profile.name, id.value
                        )),
                        Err(left) => {
                            log::warn(&format!(
                                "{} ({}) was cloned but not sized, and its removal failed: {left}",
                                profile.name, id.value
                            ));
                            e.context(format_args!(
                                "{}: its clone {} may be left on the server ({left})",
                                profile.name, id.value
                            ))
                        }
                    });
                }
                id
            }
            None => {
                let place = self.conn.placement()?;
                let guest_id = vm::guest_id_for(
                    profile.os_family.as_deref(),
                    profile.os_name.as_deref(),
                    profile.os_version.as_deref(),
                    profile.platform.as_deref(),
                    &self.conn.settings.guest_id,
                );
                let mut devices = String::new();
                if let Some(mib) = profile.disk_mib {
                    let kib = mib
                        .checked_mul(1024)
                        .filter(|k| *k <= i64::MAX as u64)
                        .ok_or_else(|| {
                            Error::invalid_argument(format!("a disk of {mib} MiB is out of range"))
                        })?;
                    devices.push_str(&format!(
                        "<deviceChange><operation>add</operation><device xsi:type=\"VirtualLsiLogicController\"><key>-100</key><busNumber>0</busNumber><sharedBus>noSharing</sharedBus></device></deviceChange>\
<deviceChange><operation>add</operation><fileOperation>create</fileOperation><device xsi:type=\"VirtualDisk\"><key>-101</key>\
<backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName></fileName><diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></backing>\
<controllerKey>-100</controllerKey><unitNumber>0</unitNumber><capacityInKB>{kib}</capacityInKB></device></deviceChange>"
                    ));
                }
                if let Some(net) = &profile.network {
                    devices.push_str(&format!(
                        "<deviceChange><operation>add</operation><device xsi:type=\"VirtualVmxnet3\"><key>-102</key>\
<backing xsi:type=\"VirtualEthernetCardNetworkBackingInfo\">{}</backing><addressType>generated</addressType></device></deviceChange>",
                        xml::text("deviceName", net)
                    ));
                }
                let config = format!(
                    "<config>{}{}<files>{}</files><numCPUs>{cpus}</numCPUs><memoryMB>{memory}</memoryMB>{devices}{labels}</config>{}",
                    xml::text("name", &profile.name),
                    xml::text("guestId", &guest_id),
                    xml::text("vmPathName", &format!("[{}]", place.datastore)),
                    xml::moref("pool", &place.pool),
                );
                let context = format!("create VM '{}'", profile.name);
                self.run_task("CreateVM_Task", &place.folder, &config, &context)?
                    .ok_or_else(|| Error::backend(format!("{context}: the task named no new VM")))?
            }
        };
        self.conn.info(&id)
    }

    fn clone_vm(&mut self, source: String, name: String, linked: bool) -> Result<VmInfo> {
        let src = self.conn.resolve(&source)?;
        self.check_new_name(&name)?;
        let id = self.clone_to(&src, &name, linked, "", Duration::ZERO)?;
        self.conn.info(&id)
    }

    fn start(&mut self, vm: String) -> Result<VmInfo> {
        let (id, rec) = self.power(&vm)?;
        Self::not_template(&rec, "started")?;
        match rec.power.as_str() {
            "poweredOn" => {
                return Err(Error::invalid_state(format!(
                    "{} is running already",
                    rec.name
                )))
            }
            "suspended" => {
                return Err(Error::invalid_state(format!(
                    "{} is suspended: resume it",
                    rec.name
                )))
            }
            _ => {}
        }
        self.run_task("PowerOnVM_Task", &id, "", &format!("power on {}", rec.name))?;
        self.conn.info(&id)
    }

    fn shutdown(&mut self, vm: String, force: bool) -> Result<VmInfo> {
        let (id, rec) = self.power(&vm)?;
        Self::not_template(&rec, "shut down")?;
        match (rec.power.as_str(), force) {
            ("poweredOff", _) => {
                return Err(Error::invalid_state(format!(
                    "{} is stopped already",
                    rec.name
                )))
            }
            ("suspended", false) => {
                return Err(Error::invalid_state(format!(
                    "{} is suspended: its guest cannot shut down; resume it or force",
                    rec.name
                )))
            }
            _ => {}
        }
        let context = format!("shut down {}", rec.name);
        if !force {
            // The guest's own shutdown, within what is left of the call less what
            // powering it off takes.
            let grace = deadline::bounded(self.conn.settings.shutdown_timeout, POWER_OFF_KEEP);
            let until = Instant::now() + grace;
            self.conn
                .client
                .call("ShutdownGuest", &id, "", |_| Ok(()))?;
            if self.wait_power(&id, "poweredOff", until)? {
                return self.conn.info(&id);
            }
            log::warn(&format!(
                "{}: the guest did not shut down in {} ms; powering off",
                rec.name,
                grace.as_millis()
            ));
        }
        match self.run_task("PowerOffVM_Task", &id, "", &context) {
            Ok(_) => {}
            // The guest finished shutting down meanwhile.
            Err(Error::InvalidState(_)) if self.conn.record(&id)?.power == "poweredOff" => {}
            Err(e) => return Err(e),
        }
        self.conn.info(&id)
    }

    fn suspend(&mut self, vm: String) -> Result<VmInfo> {
        let (id, rec) = self.power(&vm)?;
        Self::not_template(&rec, "suspended")?;
        if rec.power != "poweredOn" {
            return Err(Error::invalid_state(format!(
                "{} is not running ({})",
                rec.name, rec.power
            )));
        }
        self.run_task("SuspendVM_Task", &id, "", &format!("suspend {}", rec.name))?;
        self.conn.info(&id)
    }

    fn resume(&mut self, vm: String) -> Result<VmInfo> {
        let (id, rec) = self.power(&vm)?;
        Self::not_template(&rec, "resumed")?;
        if rec.power != "suspended" {
            return Err(Error::invalid_state(format!(
                "{} is not suspended ({})",
                rec.name, rec.power
            )));
        }
        self.run_task("PowerOnVM_Task", &id, "", &format!("resume {}", rec.name))?;
        self.conn.info(&id)
    }

    fn migrate(&mut self, vm: String, destination: String, live: bool) -> Result<VmInfo> {
        let (id, rec) = self.power(&vm)?;
        let host = self.conn.host(&destination)?;
        if live && rec.power != "poweredOn" {
            return Err(Error::invalid_state(format!(
                "{} is not running ({}): a live migration moves a running VM",
                rec.name, rec.power
            )));
        }
        if rec.host.as_ref() == Some(&host) {
            return Err(Error::invalid_argument(format!(
                "{} is on {destination} already",
                rec.name
            )));
        }
        let pool = self.conn.pool_of_host(&host)?;
        let args = format!(
            "<spec>{}{}</spec><priority>defaultPriority</priority>",
            xml::moref("pool", &pool),
            xml::moref("host", &host)
        );
        self.run_task(
            "RelocateVM_Task",
            &id,
            &args,
            &format!("relocate {} to {destination}", rec.name),
        )?;
        self.conn.info(&id)
    }

    fn destroy(&mut self, vm: String) -> Result<()> {
        let (id, rec) = self.power(&vm)?;
        if matches!(rec.power.as_str(), "poweredOn" | "suspended") {
            match self.run_task(
                "PowerOffVM_Task",
                &id,
                "",
                &format!("power off {} to destroy it", rec.name),
            ) {
                Ok(_) => {}
                Err(Error::InvalidState(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.run_task("Destroy_Task", &id, "", &format!("destroy {}", rec.name))?;
        Ok(())
    }
}
