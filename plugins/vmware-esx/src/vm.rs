//! Virtual machines as the contract sees them: the properties read, and how they
//! become a `vm-info` (state, resources, GLUE OS facts from the guest id, addresses
//! from `guest.net`, labels from `extraConfig`).

use std::collections::BTreeMap;

use gve_sdk::{Label, VmInfo, VmResources, VmState};

use crate::props::{self, Prop};
use crate::xml::{self, MoRef};

/// `extraConfig` keys holding the VM's labels: `gve.label.<key>`.
pub const LABEL_PREFIX: &str = "gve.label.";

/// The properties read for a `vm-info`.
pub const PROPS: &[&str] = &[
    "name",
    "config.template",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.guestId",
    "config.extraConfig",
    "runtime.powerState",
    "runtime.host",
    "guest.net",
];

/// What one VM's properties say, before host ids are turned into names.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its managed object reference.
    pub id: MoRef,
    /// Display name.
    pub name: String,
    /// `config.template`.
    pub template: bool,
    /// `runtime.powerState`.
    pub power: String,
    /// `runtime.host`.
    pub host: Option<MoRef>,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// `config.guestId`.
    pub guest_id: Option<String>,
    /// IP addresses from `guest.net`.
    pub addresses: Vec<String>,
    /// Labels from `extraConfig`.
    pub labels: Vec<Label>,
}

impl Record {
    /// Reads the [`PROPS`] of `id`.
    pub fn read(id: MoRef, p: &[Prop<'_, '_>]) -> Record {
        let mut labels = Vec::new();
        if let Some(ec) = props::get(p, "config.extraConfig") {
            for ov in xml::elements(ec) {
                if let (Some(k), Some(v)) =
                    (xml::child_text(ov, "key"), xml::child_text(ov, "value"))
                {
                    if let Some(key) = k.strip_prefix(LABEL_PREFIX) {
                        labels.push(Label {
                            key: key.into(),
                            value: v.into(),
                        });
                    }
                }
            }
        }
        let mut addresses = Vec::new();
        if let Some(net) = props::get(p, "guest.net") {
            for nic in xml::elements(net) {
                for a in xml::children(nic, "ipAddress") {
                    let a = xml::text_of(a).trim();
                    if !a.is_empty() && !addresses.iter().any(|x| x == a) {
                        addresses.push(a.to_string());
                    }
                }
            }
        }
        Record {
            name: props::text(p, "name").unwrap_or(&id.value).to_string(),
            id,
            template: props::text(p, "config.template") == Some("true"),
            power: props::text(p, "runtime.powerState")
                .unwrap_or("")
                .to_string(),
            host: props::moref(p, "runtime.host"),
            cpus: props::number(p, "config.hardware.numCPU").unwrap_or(0),
            memory_mib: props::number(p, "config.hardware.memoryMB").unwrap_or(0),
            guest_id: props::text(p, "config.guestId").map(str::to_string),
            addresses,
            labels,
        }
    }

    /// The contract's state.
    pub fn state(&self) -> VmState {
        match self.power.as_str() {
            "poweredOn" => VmState::Running,
            "poweredOff" => VmState::Stopped,
            "suspended" => VmState::Suspended,
            _ => VmState::Unknown,
        }
    }

    /// The contract's `vm-info`, its host named through `hosts` (id → name).
    pub fn info(&self, hosts: &BTreeMap<String, String>) -> VmInfo {
        let host = self
            .host
            .as_ref()
            .map(|h| {
                hosts
                    .get(&h.value)
                    .cloned()
                    .unwrap_or_else(|| h.value.clone())
            })
            .unwrap_or_default();
        let os = self.guest_id.as_deref().map(os_of).unwrap_or_default();
        VmInfo {
            id: self.id.value.clone(),
            name: self.name.clone(),
            state: self.state(),
            host,
            addresses: self.addresses.clone(),
            resources: VmResources {
                logical_cpus: self.cpus,
                main_memory_mib: self.memory_mib,
                disk_mib: None,
            },
            platform: os.platform,
            os_family: os.family,
            os_name: os.name,
            is_template: self.template,
            labels: self.labels.clone(),
        }
    }
}

/// GLUE OS facts read from a vSphere guest id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Os {
    /// GLUE2 OSFamily.
    pub family: Option<String>,
    /// GLUE2 OSName.
    pub name: Option<String>,
    /// GLUE2 Platform.
    pub platform: Option<String>,
}

/// What a guest id (`debian10_64Guest`, `windows9_64Guest`, `otherGuest`, ...) says.
pub fn os_of(guest_id: &str) -> Os {
    let id = guest_id.strip_suffix("Guest").unwrap_or(guest_id);
    let platform = if id.contains("64") { "amd64" } else { "i386" };
    let base: String = id
        .split('_')
        .next()
        .unwrap_or("")
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .to_ascii_lowercase();
    let (family, name) = match base.as_str() {
        "" => (None, None),
        "other" => (None, None),
        "otherlinux" | "genericlinux" => (Some("linux"), None),
        b if b.starts_with("win") => (Some("windows"), Some("windows")),
        "darwin" => (Some("macosx"), Some("macosx")),
        "solaris" => (Some("solaris"), Some("solaris")),
        "freebsd" => (Some("freebsd"), Some("freebsd")),
        b => (Some("linux"), Some(b)),
    };
    Os {
        family: family.map(str::to_string),
        name: name.map(str::to_string),
        platform: Some(platform.to_string()),
    }
}

/// The guest id for a profile's OS facts (`fallback` when they say too little).
pub fn guest_id_for(
    family: Option<&str>,
    name: Option<&str>,
    version: Option<&str>,
    platform: Option<&str>,
    fallback: &str,
) -> String {
    let bits64 = !matches!(platform, Some("i386" | "i686" | "x86"));
    let suffix = if bits64 { "_64Guest" } else { "Guest" };
    let major = version
        .and_then(|v| v.split('.').next())
        .filter(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()));
    match (family, name) {
        (_, Some(n @ ("debian" | "centos" | "rhel" | "sles" | "oracleLinux"))) => match major {
            Some(m) => format!("{n}{m}{suffix}"),
            None => format!("{n}{}", if bits64 { "64Guest" } else { "Guest" }),
        },
        (_, Some("ubuntu")) => format!("ubuntu{}", if bits64 { "64Guest" } else { "Guest" }),
        (Some("windows"), _) => "windows9_64Guest".into(),
        (Some("linux"), _) => format!("otherLinux{}", if bits64 { "64Guest" } else { "Guest" }),
        _ => fallback.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ids_give_glue_os_facts() {
        let os = os_of("debian10_64Guest");
        assert_eq!(
            (
                os.family.as_deref(),
                os.name.as_deref(),
                os.platform.as_deref()
            ),
            (Some("linux"), Some("debian"), Some("amd64"))
        );
        assert_eq!(os_of("otherGuest").family, None);
        assert_eq!(os_of("otherGuest").platform.as_deref(), Some("i386"));
        assert_eq!(os_of("otherLinux64Guest").family.as_deref(), Some("linux"));
        assert_eq!(os_of("windows9_64Guest").family.as_deref(), Some("windows"));
        assert_eq!(os_of("ubuntu64Guest").name.as_deref(), Some("ubuntu"));
        assert_eq!(os_of("").family, None);
    }

    #[test]
    fn profiles_give_guest_ids_that_read_back() {
        let id = guest_id_for(
            Some("linux"),
            Some("debian"),
            Some("12"),
            Some("amd64"),
            "x",
        );
        assert_eq!(id, "debian12_64Guest");
        assert_eq!(os_of(&id).name.as_deref(), Some("debian"));
        assert_eq!(
            guest_id_for(None, None, None, None, "otherGuest64"),
            "otherGuest64"
        );
        assert_eq!(
            guest_id_for(Some("linux"), None, None, None, "x"),
            "otherLinux64Guest"
        );
        assert_eq!(
            guest_id_for(None, Some("ubuntu"), Some("22.04"), None, "x"),
            "ubuntu64Guest"
        );
    }

    #[test]
    fn labels_and_addresses_are_read_from_extra_config_and_guest_net() {
        let body = r#"<o xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<a><OptionValue><key>govcsim</key><value xsi:type="xsd:string">TRUE</value></OptionValue><OptionValue><key>gve.label.owner</key><value>alice</value></OptionValue></a>
<b><GuestNicInfo><ipAddress>10.0.0.5</ipAddress><ipAddress>fe80::1</ipAddress></GuestNicInfo><GuestNicInfo><ipAddress>10.0.0.5</ipAddress></GuestNicInfo></b>
<c>poweredOn</c><d>vm-1-name</d><e type="HostSystem">host-21</e></o>"#;
        let doc = xml::parse(body, "t").unwrap();
        let root = doc.root_element();
        let props = vec![
            ("config.extraConfig", xml::child(root, "a").unwrap()),
            ("guest.net", xml::child(root, "b").unwrap()),
            ("runtime.powerState", xml::child(root, "c").unwrap()),
            ("name", xml::child(root, "d").unwrap()),
            ("runtime.host", xml::child(root, "e").unwrap()),
        ];
        let r = Record::read(MoRef::new("VirtualMachine", "vm-1"), &props);
        assert_eq!(
            r.labels,
            vec![Label {
                key: "owner".into(),
                value: "alice".into()
            }]
        );
        assert_eq!(r.addresses, vec!["10.0.0.5", "fe80::1"]);
        assert_eq!(r.state(), VmState::Running);
        let mut hosts = BTreeMap::new();
        hosts.insert("host-21".to_string(), "esx-1".to_string());
        let info = r.info(&hosts);
        assert_eq!(
            (info.id.as_str(), info.name.as_str(), info.host.as_str()),
            ("vm-1", "vm-1-name", "esx-1")
        );
        assert_eq!(info.resources.disk_mib, None);
    }
}
