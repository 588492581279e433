//! Reading libvirt domain XML: what the driver needs to report a VM and to derive new
//! domains from a template or a source VM.

use std::collections::BTreeMap;

use gve_sdk::libvirt::{Cpu, Domain, DomainState, LABELS_NAMESPACE};
use gve_sdk::{Error, Label, Result, VmInfo, VmResources, VmState};

/// Label that marks a domain as a template.
pub const TEMPLATE_LABEL: &str = "gve.template";

/// One disk of a domain.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskView {
    /// Source file.
    pub path: String,
    /// Image format (qcow2, raw).
    pub format: String,
    /// Target device (vda, ...).
    pub target: String,
}

/// The first child element of `parent` named `name`.
fn child<'a, 'i>(parent: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    parent.children().find(|n| n.has_tag_name(name))
}

/// The text of that child.
fn text(parent: roxmltree::Node, name: &str) -> Option<String> {
    child(parent, name)
        .and_then(|n| n.text())
        .map(str::to_string)
}

/// The parts of a domain definition the driver uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainView {
    /// Domain type (kvm, qemu, xen).
    pub domain_type: String,
    /// OS type (`hvm`; `linux` or `xen` for a Xen PV guest).
    pub os_type: Option<String>,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// OS architecture.
    pub arch: Option<String>,
    /// Machine type.
    pub machine: Option<String>,
    /// Direct-boot kernel.
    pub kernel: Option<String>,
    /// Direct-boot initrd.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// File-backed disks.
    pub disks: Vec<DiskView>,
    /// Networks the interfaces attach to.
    pub networks: Vec<String>,
    /// gve labels from the metadata.
    pub labels: BTreeMap<String, String>,
    /// The processor (`<cpu>`), carried to the VMs made from this definition.
    pub cpu: Option<Cpu>,
}

/// A definition's `<cpu>`: mode, check, model and features. Its topology and NUMA
/// cells are left out (a VM made from a template has its own vCPU count and
/// memory), and so are cache, `maxphysaddr` and vendor.
fn cpu_of(cpu: roxmltree::Node<'_, '_>) -> Cpu {
    let model = child(cpu, "model");
    let attr = |name| cpu.attribute(name).map(str::to_string);
    Cpu {
        mode: attr("mode"),
        matching: attr("match"),
        check: attr("check"),
        migratable: attr("migratable"),
        model: model
            .and_then(|m| m.text())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
        fallback: model
            .and_then(|m| m.attribute("fallback"))
            .map(str::to_string),
        features: cpu
            .children()
            .filter(|n| n.has_tag_name("feature"))
            .filter_map(|n| {
                let name = n.attribute("name")?;
                Some((
                    n.attribute("policy").unwrap_or("require").to_string(),
                    name.to_string(),
                ))
            })
            .collect(),
    }
}

impl DomainView {
    /// Parses a domain's XML description.
    pub fn parse(xml: &str) -> Result<DomainView> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| {
            Error::backend(format!(
                "libvirt returned domain XML that does not parse: {e}"
            ))
        })?;
        let root = doc.root_element();
        let mut v = DomainView {
            domain_type: root.attribute("type").unwrap_or("qemu").to_string(),
            ..Default::default()
        };
        if let Some(m) = child(root, "memory") {
            let n: u64 = m.text().unwrap_or("0").trim().parse().unwrap_or(0);
            v.memory_mib = match m.attribute("unit").unwrap_or("KiB") {
                "b" | "bytes" => n >> 20,
                "KiB" | "k" | "K" => n >> 10,
                "MiB" | "M" | "m" => n,
                "GiB" | "G" | "g" => n << 10,
                _ => n >> 10,
            };
        }
        v.vcpus = text(root, "vcpu")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(1);
        if let Some(os) = child(root, "os") {
            if let Some(t) = child(os, "type") {
                v.arch = t.attribute("arch").map(str::to_string);
                v.machine = t.attribute("machine").map(str::to_string);
                v.os_type = t.text().map(|t| t.trim().to_string());
            }
            v.kernel = text(os, "kernel");
            v.initrd = text(os, "initrd");
            v.cmdline = text(os, "cmdline");
        }
        v.cpu = child(root, "cpu").map(cpu_of);
        if let Some(devices) = child(root, "devices") {
            for d in devices
                .children()
                .filter(|n| n.has_tag_name("disk") && n.attribute("device") != Some("cdrom"))
            {
                let path = child(d, "source")
                    .and_then(|s| s.attribute("file"))
                    .map(str::to_string);
                let format = child(d, "driver")
                    .and_then(|s| s.attribute("type"))
                    .unwrap_or("raw")
                    .to_string();
                let target = child(d, "target")
                    .and_then(|s| s.attribute("dev"))
                    .unwrap_or("vda")
                    .to_string();
                if let Some(path) = path {
                    v.disks.push(DiskView {
                        path,
                        format,
                        target,
                    });
                }
            }
            for i in devices.children().filter(|n| n.has_tag_name("interface")) {
                if let Some(net) = child(i, "source").and_then(|s| s.attribute("network")) {
                    v.networks.push(net.to_string());
                }
            }
        }
        if let Some(meta) = child(root, "metadata") {
            for labels in meta
                .children()
                .filter(|n| n.tag_name().namespace() == Some(LABELS_NAMESPACE))
            {
                for l in labels.children().filter(|n| n.is_element()) {
                    if let Some(k) = l.attribute("key") {
                        v.labels
                            .insert(k.to_string(), l.text().unwrap_or("").to_string());
                    }
                }
            }
        }
        Ok(v)
    }

    /// True for templates.
    pub fn is_template(&self) -> bool {
        self.labels.get(TEMPLATE_LABEL).is_some_and(|v| v == "true")
    }
}

/// The contract's state for a libvirt domain. gve's suspend pauses the vCPUs, so a
/// paused domain is reported suspended; a domain saved to disk (managed save) too.
pub fn state(d: &Domain) -> VmState {
    match d.state {
        DomainState::Running | DomainState::Blocked | DomainState::Shutdown => VmState::Running,
        DomainState::Paused | DomainState::PmSuspended => VmState::Suspended,
        DomainState::Shutoff if d.has_managed_save => VmState::Suspended,
        DomainState::Shutoff => VmState::Stopped,
        DomainState::Crashed => VmState::Crashed,
        DomainState::NoState => VmState::Unknown,
    }
}

/// A VM record from a domain and its parsed definition.
pub fn vm_info(d: &Domain, view: &DomainView, host: &str, disk_mib: Option<u64>) -> VmInfo {
    VmInfo {
        id: d.uuid.clone(),
        name: d.name.clone(),
        state: state(d),
        host: host.to_string(),
        addresses: Vec::new(),
        resources: VmResources {
            logical_cpus: d.vcpus,
            main_memory_mib: d.max_memory_kib >> 10,
            disk_mib,
        },
        platform: view.arch.as_deref().map(|a| {
            if a == "x86_64" {
                "amd64".to_string()
            } else {
                a.to_string()
            }
        }),
        os_family: view.labels.get("gve.os-family").cloned(),
        os_name: view.labels.get("gve.os-name").cloned(),
        is_template: view.is_template(),
        labels: view
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with("gve."))
            .map(|(k, v)| Label {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_templates_cpu_is_read_without_its_topology() {
        let xml = "<domain type='kvm'><name>t</name><memory unit='KiB'>524288</memory>\
            <vcpu>2</vcpu><cpu mode='custom' match='exact' check='full'>\
            <model fallback='forbid'> Skylake-Server </model><topology sockets='1' cores='2' threads='1'/>\
            <feature policy='disable' name='avx512f'/><feature name='pcid'/></cpu></domain>";
        let v = DomainView::parse(xml).unwrap();
        assert_eq!(
            v.cpu,
            Some(Cpu {
                mode: Some("custom".into()),
                matching: Some("exact".into()),
                check: Some("full".into()),
                migratable: None,
                model: Some("Skylake-Server".into()),
                fallback: Some("forbid".into()),
                features: vec![
                    ("disable".into(), "avx512f".into()),
                    ("require".into(), "pcid".into())
                ],
            })
        );
        let max = DomainView::parse(
            "<domain type='qemu'><cpu mode='maximum' check='none' migratable='on'/></domain>",
        )
        .unwrap();
        let max = max.cpu.unwrap();
        assert_eq!(
            (
                max.mode.as_deref(),
                max.check.as_deref(),
                max.migratable.as_deref()
            ),
            (Some("maximum"), Some("none"), Some("on"))
        );
        assert_eq!(
            DomainView::parse("<domain type='qemu'/>").unwrap().cpu,
            None
        );
    }
}
