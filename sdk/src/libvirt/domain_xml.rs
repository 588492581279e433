//! [`DomainXml`]: a builder of libvirt domain XML for the shapes drivers need.

use core::fmt::{self, Write};

/// XML namespace of the `<metadata>` element that holds a domain's labels.
pub const LABELS_NAMESPACE: &str = "urn:gve:hypervisor:labels:0.1";

/// The guest's OS type (`<os><type>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OsType {
    /// Fully virtualized (`hvm`), for KVM/QEMU and Xen HVM guests.
    Hvm,
    /// Xen paravirtualized (`xen`).
    Xen,
}

/// The guest's processor (`<cpu>`): its mode (`host-model`, `host-passthrough`,
/// `maximum`, `custom`), a named model and features, and how libvirt checks them.
/// A driver carries a template's CPU to the VMs made from it with this; topology,
/// NUMA cells, cache, `maxphysaddr` and vendor are not part of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cpu {
    /// `mode`, as libvirt spells it; none for libvirt's default (`custom`).
    pub mode: Option<String>,
    /// `check`: `none`, `partial` or `full`. libvirt writes `none` with the
    /// default CPU it gives a domain defined without one (`qemu64` is not
    /// runnable on every KVM host); without it a KVM host checks and may refuse.
    pub check: Option<String>,
    /// `migratable` (`on`, `off`) of `host-passthrough` and `maximum`.
    pub migratable: Option<String>,
    /// `<model>`: a named CPU model (`Skylake-Server`, `qemu64`).
    pub model: Option<String>,
    /// `<model fallback>`: `allow` or `forbid`.
    pub fallback: Option<String>,
    /// `match` of a custom CPU: `exact`, `minimum` or `strict`.
    pub matching: Option<String>,
    /// `<feature policy name>`: each feature and its policy (`require`, `disable`,
    /// `force`, `optional`, `forbid`).
    pub features: Vec<(String, String)>,
}

/// Format of a disk image (`<driver type>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// QEMU copy-on-write image.
    Qcow2,
    /// Raw image.
    Raw,
}

/// Bus a disk is attached to (`<target bus>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// virtio-blk.
    Virtio,
    /// SATA.
    Sata,
    /// SCSI.
    Scsi,
    /// IDE.
    Ide,
    /// Xen's paravirtual block device.
    Xen,
}

/// Who serves a disk to the guest (`<driver name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBackend {
    /// QEMU (for Xen: the `qdisk` backend, a QEMU process in dom0).
    Qemu,
    /// The kernel's block backend (for Xen: `blkback`, a file through a loop device).
    Phy,
}

/// A file-backed disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Path of the image file on the host.
    pub path: String,
    /// Image format.
    pub format: DiskFormat,
    /// Device name in the guest (`vda`, `sda`, `xvda`).
    pub target_dev: String,
    /// Bus the disk is attached to.
    pub bus: DiskBus,
    /// Attach read-only.
    pub readonly: bool,
    /// Who serves it.
    pub backend: DiskBackend,
}

impl Disk {
    /// A writable virtio disk backed by `path`, seen as `target_dev` in the guest.
    pub fn new(path: impl Into<String>, format: DiskFormat, target_dev: impl Into<String>) -> Disk {
        Disk {
            path: path.into(),
            format,
            target_dev: target_dev.into(),
            bus: DiskBus::Virtio,
            readonly: false,
            backend: DiskBackend::Qemu,
        }
    }

    /// A writable disk of a Xen PV guest: `blkback` serves it on the Xen bus, so
    /// dom0 needs no QEMU (the format must be raw).
    pub fn xen_pv(path: impl Into<String>, target_dev: impl Into<String>) -> Disk {
        Disk {
            bus: DiskBus::Xen,
            backend: DiskBackend::Phy,
            ..Disk::new(path, DiskFormat::Raw, target_dev)
        }
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interface {
    /// Attached to a libvirt network by name; `model` is the NIC model (`virtio`).
    Network {
        /// libvirt network name.
        network: String,
        /// NIC model, if any.
        model: Option<String>,
    },
    /// User-mode networking (slirp / passt), no host setup needed.
    User {
        /// NIC model, if any.
        model: Option<String>,
    },
}

/// A libvirt domain definition being built; [`DomainXml::to_xml`] renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    domain_type: String,
    name: String,
    uuid: Option<String>,
    memory_mib: u64,
    vcpus: u32,
    os_type: OsType,
    arch: Option<String>,
    machine: Option<String>,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    acpi: bool,
    disks: Vec<Disk>,
    interfaces: Vec<Interface>,
    serial_console: bool,
    xen_console: bool,
    guest_agent: bool,
    labels: Vec<(String, String)>,
    cpu: Option<Cpu>,
}

impl DomainXml {
    /// A `kvm` domain named `name`: 1 vCPU, 512 MiB, `hvm`, ACPI on, no devices.
    pub fn new(name: impl Into<String>) -> DomainXml {
        DomainXml {
            domain_type: "kvm".into(),
            name: name.into(),
            uuid: None,
            memory_mib: 512,
            vcpus: 1,
            os_type: OsType::Hvm,
            arch: None,
            machine: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            acpi: true,
            disks: Vec::new(),
            interfaces: Vec::new(),
            serial_console: false,
            xen_console: false,
            guest_agent: false,
            labels: Vec::new(),
            cpu: None,
        }
    }

    /// The libvirt domain type (`kvm`, `qemu` for TCG, `xen`, `test`).
    pub fn domain_type(mut self, domain_type: impl Into<String>) -> Self {
        self.domain_type = domain_type.into();
        self
    }

    /// A fixed UUID (libvirt generates one otherwise).
    pub fn uuid(mut self, uuid: impl Into<String>) -> Self {
        self.uuid = Some(uuid.into());
        self
    }

    /// Memory in MiB (both maximum and current).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of virtual CPUs.
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// The guest OS type.
    pub fn os_type(mut self, os_type: OsType) -> Self {
        self.os_type = os_type;
        self
    }

    /// The guest architecture (`x86_64`, `aarch64`).
    pub fn arch(mut self, arch: impl Into<String>) -> Self {
        self.arch = Some(arch.into());
        self
    }

    /// The machine type (`q35`, `pc`, `xenfv`, `xenpv`).
    pub fn machine(mut self, machine: impl Into<String>) -> Self {
        self.machine = Some(machine.into());
        self
    }

    /// Boots this kernel image directly.
    pub fn kernel(mut self, path: impl Into<String>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// The initrd for a direct kernel boot.
    pub fn initrd(mut self, path: impl Into<String>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// The kernel command line for a direct kernel boot.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = Some(cmdline.into());
        self
    }

    /// Turns the ACPI feature on (the default) or off.
    pub fn acpi(mut self, on: bool) -> Self {
        self.acpi = on;
        self
    }

    /// Adds a disk.
    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    /// Adds a virtio NIC on the libvirt network `network`.
    pub fn network(self, network: impl Into<String>) -> Self {
        self.interface(Interface::Network {
            network: network.into(),
            model: Some("virtio".into()),
        })
    }

    /// Adds a virtio NIC with user-mode networking.
    pub fn user_network(self) -> Self {
        self.interface(Interface::User {
            model: Some("virtio".into()),
        })
    }

    /// Adds a network interface.
    pub fn interface(mut self, interface: Interface) -> Self {
        self.interfaces.push(interface);
        self
    }

    /// Adds a serial port on a pty and makes it the console.
    pub fn serial_console(mut self) -> Self {
        self.serial_console = true;
        self
    }

    /// A console on Xen's paravirtual console (`hvc0` in a PV guest).
    pub fn xen_console(mut self) -> Self {
        self.xen_console = true;
        self
    }

    /// Adds the virtio channel `org.qemu.guest_agent.0` for the QEMU guest agent.
    pub fn guest_agent(mut self) -> Self {
        self.guest_agent = true;
        self
    }

    /// The guest's processor (none: the hypervisor's default).
    pub fn cpu(mut self, cpu: Option<Cpu>) -> Self {
        self.cpu = cpu;
        self
    }

    /// Stores a label in the domain's `<metadata>` (namespace [`LABELS_NAMESPACE`]).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Renders the domain XML.
    pub fn to_xml(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for DomainXml {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "<domain type='{}'>", Esc(&self.domain_type))?;
        writeln!(f, "  <name>{}</name>", Esc(&self.name))?;
        if let Some(uuid) = &self.uuid {
            writeln!(f, "  <uuid>{}</uuid>", Esc(uuid))?;
        }
        if !self.labels.is_empty() {
            writeln!(f, "  <metadata>")?;
            writeln!(f, "    <gve:labels xmlns:gve='{LABELS_NAMESPACE}'>")?;
            for (k, v) in &self.labels {
                writeln!(
                    f,
                    "      <gve:label key='{}'>{}</gve:label>",
                    Esc(k),
                    Esc(v)
                )?;
            }
            writeln!(f, "    </gve:labels>")?;
            writeln!(f, "  </metadata>")?;
        }
        writeln!(f, "  <memory unit='MiB'>{}</memory>", self.memory_mib)?;
        writeln!(
            f,
            "  <currentMemory unit='MiB'>{}</currentMemory>",
            self.memory_mib
        )?;
        writeln!(f, "  <vcpu placement='static'>{}</vcpu>", self.vcpus)?;
        self.write_os(f)?;
        if self.acpi {
            writeln!(f, "  <features>\n    <acpi/>\n  </features>")?;
        }
        if let Some(cpu) = &self.cpu {
            write_cpu(f, cpu)?;
        }
        writeln!(f, "  <devices>")?;
        for d in &self.disks {
            write_disk(f, d)?;
        }
        for i in &self.interfaces {
            write_interface(f, i)?;
        }
        if self.serial_console {
            writeln!(
                f,
                "    <serial type='pty'>\n      <target port='0'/>\n    </serial>"
            )?;
            writeln!(
                f,
                "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>"
            )?;
        }
        if self.xen_console {
            writeln!(
                f,
                "    <console type='pty'>\n      <target type='xen' port='0'/>\n    </console>"
            )?;
        }
        if self.guest_agent {
            writeln!(f, "    <channel type='unix'>")?;
            writeln!(
                f,
                "      <target type='virtio' name='org.qemu.guest_agent.0'/>"
            )?;
            writeln!(f, "    </channel>")?;
        }
        writeln!(f, "  </devices>")?;
        f.write_str("</domain>\n")
    }
}

fn write_cpu(f: &mut fmt::Formatter<'_>, cpu: &Cpu) -> fmt::Result {
    f.write_str("  <cpu")?;
    for (name, value) in [
        ("mode", &cpu.mode),
        ("match", &cpu.matching),
        ("check", &cpu.check),
        ("migratable", &cpu.migratable),
    ] {
        if let Some(v) = value {
            write!(f, " {name}='{}'", Esc(v))?;
        }
    }
    if cpu.model.is_none() && cpu.fallback.is_none() && cpu.features.is_empty() {
        return writeln!(f, "/>");
    }
    writeln!(f, ">")?;
    if cpu.model.is_some() || cpu.fallback.is_some() {
        f.write_str("    <model")?;
        if let Some(fb) = &cpu.fallback {
            write!(f, " fallback='{}'", Esc(fb))?;
        }
        match &cpu.model {
            Some(model) => writeln!(f, ">{}</model>", Esc(model))?,
            None => writeln!(f, "/>")?,
        }
    }
    for (policy, name) in &cpu.features {
        writeln!(
            f,
            "    <feature policy='{}' name='{}'/>",
            Esc(policy),
            Esc(name)
        )?;
    }
    writeln!(f, "  </cpu>")
}

impl DomainXml {
    fn write_os(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  <os>")?;
        f.write_str("    <type")?;
        if let Some(arch) = &self.arch {
            write!(f, " arch='{}'", Esc(arch))?;
        }
        if let Some(machine) = &self.machine {
            write!(f, " machine='{}'", Esc(machine))?;
        }
        let os = match self.os_type {
            OsType::Hvm => "hvm",
            OsType::Xen => "xen",
        };
        writeln!(f, ">{os}</type>")?;
        if let Some(k) = &self.kernel {
            writeln!(f, "    <kernel>{}</kernel>", Esc(k))?;
        }
        if let Some(i) = &self.initrd {
            writeln!(f, "    <initrd>{}</initrd>", Esc(i))?;
        }
        if let Some(c) = &self.cmdline {
            writeln!(f, "    <cmdline>{}</cmdline>", Esc(c))?;
        }
        if self.kernel.is_none() && self.os_type == OsType::Hvm {
            writeln!(f, "    <boot dev='hd'/>")?;
        }
        writeln!(f, "  </os>")
    }
}

fn write_disk(f: &mut fmt::Formatter<'_>, d: &Disk) -> fmt::Result {
    let format = match d.format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    };
    let bus = match d.bus {
        DiskBus::Virtio => "virtio",
        DiskBus::Sata => "sata",
        DiskBus::Scsi => "scsi",
        DiskBus::Ide => "ide",
        DiskBus::Xen => "xen",
    };
    let driver = match d.backend {
        DiskBackend::Qemu => "qemu",
        DiskBackend::Phy => "phy",
    };
    writeln!(f, "    <disk type='file' device='disk'>")?;
    writeln!(f, "      <driver name='{driver}' type='{format}'/>")?;
    writeln!(f, "      <source file='{}'/>", Esc(&d.path))?;
    writeln!(
        f,
        "      <target dev='{}' bus='{bus}'/>",
        Esc(&d.target_dev)
    )?;
    if d.readonly {
        writeln!(f, "      <readonly/>")?;
    }
    writeln!(f, "    </disk>")
}

fn write_interface(f: &mut fmt::Formatter<'_>, i: &Interface) -> fmt::Result {
    let model = match i {
        Interface::Network { network, model } => {
            writeln!(f, "    <interface type='network'>")?;
            writeln!(f, "      <source network='{}'/>", Esc(network))?;
            model
        }
        Interface::User { model } => {
            writeln!(f, "    <interface type='user'>")?;
            model
        }
    };
    if let Some(m) = model {
        writeln!(f, "      <model type='{}'/>", Esc(m))?;
    }
    writeln!(f, "    </interface>")
}

/// Escapes text for XML element content and single- or double-quoted attributes.
pub fn escape(text: &str) -> String {
    Esc(text).to_string()
}

/// Displays its text XML-escaped.
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '\'' => f.write_str("&apos;")?,
                '"' => f.write_str("&quot;")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "domain_xml_tests.rs"]
mod tests;
