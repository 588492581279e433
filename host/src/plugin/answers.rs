//! What a plugin returns is checked before it reaches the host: sizes of strings,
//! lists and error messages, and the grammar and numbers of VM and host records. A
//! record that breaks a rule refuses the whole answer as a typed
//! [`PluginError::Answer`] (kind `backend`): a listing is never half taken, so a bad
//! record cannot make VMs seem to vanish. Error messages are cut with a marker
//! instead (the error itself still counts).
//!
//! The sizes of what crosses the boundary at all are bounded by the instance's
//! memory cap: wasmtime lifts answers out of the plugin's own linear memory.

use std::collections::HashSet;

use super::bindings::types::{ExecResult, FileInfo, HostInfo, Label, VmInfo, VmProfile};
use super::error::{PluginError, Result};

/// Longest error or trap message kept, bytes.
pub const MAX_MESSAGE: usize = 4 * 1024;
/// Most VMs or templates in one listing: twice the 100,000 VMs an agent is
/// sized for. (What a listing can hold at all is bounded by the instance's
/// memory cap; this bounds the host's work on one answer.)
pub const MAX_LIST: usize = 200_000;
/// Longest VM id, bytes.
pub const MAX_ID: usize = 128;
/// Longest other text field (names, addresses, labels, host facts), bytes.
pub const MAX_TEXT: usize = 1024;
/// Most addresses or labels on one VM.
pub const MAX_ITEMS: usize = 64;
/// Largest CPU count a record may state.
pub const MAX_CPUS: u32 = 65_536;
/// Largest memory a record may state, MiB (4 PiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 32;
/// Largest disk a record may state, MiB (1 EiB).
pub const MAX_DISK_MIB: u64 = 1 << 40;
/// Longest in-guest agent reply, bytes.
pub const MAX_AGENT_REPLY: usize = 16 << 20;

/// `message` cut to [`MAX_MESSAGE`] bytes with a marker saying how much was cut.
pub fn bounded_message(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let total = message.len();
    let mut cut = MAX_MESSAGE;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(&format!(" [… {} more bytes cut]", total - cut));
    message
}

/// Something a plugin returns that the host checks.
pub trait Answer {
    /// What is wrong with it, if anything.
    fn problem(&self) -> Option<String>;
}

/// `value`, or a typed error naming the plugin, the operation and the problem.
pub fn checked<T: Answer>(plugin: &str, op: &'static str, value: T) -> Result<T> {
    match value.problem() {
        None => Ok(value),
        Some(problem) => {
            tracing::warn!(plugin, op, problem, "plugin answer refused");
            Err(PluginError::Answer {
                plugin: plugin.to_string(),
                op,
                problem,
            })
        }
    }
}

/// A chunk read for at most `max` bytes, or the typed error of a plugin that
/// answered with more.
pub fn at_most(plugin: &str, op: &'static str, chunk: Vec<u8>, max: u32) -> Result<Vec<u8>> {
    if chunk.len() > max as usize {
        return Err(PluginError::Answer {
            plugin: plugin.to_string(),
            op,
            problem: format!("{} bytes returned for a read of at most {max}", chunk.len()),
        });
    }
    Ok(chunk)
}

/// What is wrong with a bulk disk's serial number: it must be 1 to 20 bytes (what
/// a virtio disk carries) of ASCII letters, digits and `-`, since the guest finds
/// its disk by it.
pub fn serial_problem(serial: &str) -> Option<String> {
    let ok = (1..=20).contains(&serial.len())
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (!ok).then(|| {
        format!(
            "the disk serial {:?} is not 1 to 20 ASCII letters, digits or '-'",
            bounded_message(serial.to_string())
        )
    })
}

/// Whether `id` is a usable VM id: 1 to [`MAX_ID`] bytes of `A-Z a-z 0-9 . _ : @ + -`,
/// not `.` or `..`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+-".contains(&b))
}

/// What is wrong with `name` as the name of a new VM (create, clone): the host
/// refuses, before the call, a name it would refuse in the driver's answer.
pub fn name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() {
        return Some("the name is empty".into());
    }
    text("the name", name)
}

/// What is wrong with a profile to create from: any text the host would refuse
/// when the driver's answers carry it back (the name, labels, OS facts, ...).
pub fn profile_problem(p: &VmProfile) -> Option<String> {
    let texts = [
        ("the template", &p.template),
        ("the image", &p.image),
        ("the OS family", &p.os_family),
        ("the OS name", &p.os_name),
        ("the OS version", &p.os_version),
        ("the platform", &p.platform),
        ("the network", &p.network),
    ];
    name_problem(&p.name)
        .or_else(|| texts.iter().find_map(|(f, s)| opt_text(f, s)))
        .or_else(|| labels(&p.labels))
}

fn text(field: &str, s: &str) -> Option<String> {
    if s.len() > MAX_TEXT {
        return Some(format!("{field} is {} bytes (at most {MAX_TEXT})", s.len()));
    }
    if s.chars().any(char::is_control) {
        return Some(format!("{field} contains control characters"));
    }
    None
}

fn opt_text(field: &str, s: &Option<String>) -> Option<String> {
    s.as_deref().and_then(|s| text(field, s))
}

fn labels(l: &[Label]) -> Option<String> {
    if l.len() > MAX_ITEMS {
        return Some(format!("{} labels (at most {MAX_ITEMS})", l.len()));
    }
    l.iter()
        .find_map(|l| text("a label key", &l.key).or_else(|| text("a label value", &l.value)))
}

fn quote(id: &str) -> String {
    let shown: String = id.chars().take(40).flat_map(char::escape_default).collect();
    if id.chars().count() > 40 {
        format!("\"{shown}…\"")
    } else {
        format!("\"{shown}\"")
    }
}

impl Answer for VmInfo {
    fn problem(&self) -> Option<String> {
        if !valid_id(&self.id) {
            return Some(format!(
                "VM id {} is not 1-{MAX_ID} characters of A-Z a-z 0-9 . _ : @ + -",
                quote(&self.id)
            ));
        }
        let r = &self.resources;
        let numbers = if r.logical_cpus > MAX_CPUS {
            Some(format!("{} logical CPUs", r.logical_cpus))
        } else if r.main_memory_mib > MAX_MEMORY_MIB {
            Some(format!("{} MiB of memory", r.main_memory_mib))
        } else if r.disk_mib.is_some_and(|d| d > MAX_DISK_MIB) {
            Some(format!("{} MiB of disk", r.disk_mib.unwrap_or_default()))
        } else {
            None
        };
        let fields = || {
            text("the name", &self.name)
                .or_else(|| text("the host", &self.host))
                .or_else(|| opt_text("the platform", &self.platform))
                .or_else(|| opt_text("the OS family", &self.os_family))
                .or_else(|| opt_text("the OS name", &self.os_name))
                .or_else(|| labels(&self.labels))
                .or_else(|| {
                    if self.addresses.len() > MAX_ITEMS {
                        Some(format!(
                            "{} addresses (at most {MAX_ITEMS})",
                            self.addresses.len()
                        ))
                    } else {
                        self.addresses.iter().find_map(|a| text("an address", a))
                    }
                })
        };
        numbers
            .map(|n| format!("it states {n}"))
            .or_else(fields)
            .map(|p| format!("VM {}: {p}", quote(&self.id)))
    }
}

impl Answer for Vec<VmInfo> {
    fn problem(&self) -> Option<String> {
        if self.len() > MAX_LIST {
            return Some(format!("{} records (at most {MAX_LIST})", self.len()));
        }
        let mut ids = HashSet::with_capacity(self.len());
        for vm in self {
            if let Some(p) = vm.problem() {
                return Some(p);
            }
            if !ids.insert(vm.id.as_str()) {
                return Some(format!("VM id {} is listed twice", quote(&vm.id)));
            }
        }
        None
    }
}

impl Answer for HostInfo {
    fn problem(&self) -> Option<String> {
        let texts = [
            ("the host name", &self.hostname),
            ("the hypervisor kind", &self.hypervisor_kind),
            ("the hypervisor version", &self.hypervisor_version),
            ("the platform", &self.platform),
            ("the CPU model", &self.cpu_model),
        ];
        if let Some(p) = texts.iter().find_map(|(f, s)| text(f, s)) {
            return Some(p);
        }
        if self.logical_cpus > MAX_CPUS || self.physical_cpus > MAX_CPUS {
            return Some(format!(
                "it states {} physical and {} logical CPUs (at most {MAX_CPUS})",
                self.physical_cpus, self.logical_cpus
            ));
        }
        if self.main_memory_mib > MAX_MEMORY_MIB {
            return Some(format!("it states {} MiB of memory", self.main_memory_mib));
        }
        if self.free_memory_mib > self.main_memory_mib {
            return Some(format!(
                "free memory ({} MiB) exceeds total memory ({} MiB)",
                self.free_memory_mib, self.main_memory_mib
            ));
        }
        if self.used_instances > self.total_instances {
            return Some(format!(
                "used instances ({}) exceed total instances ({})",
                self.used_instances, self.total_instances
            ));
        }
        None
    }
}

impl Answer for FileInfo {
    fn problem(&self) -> Option<String> {
        let hex = self.sha256.len() == 64 && self.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        (!hex && !self.sha256.is_empty()).then(|| {
            format!(
                "sha256 {} is not 64 hexadecimal digits",
                quote(&self.sha256)
            )
        })
    }
}

impl Answer for ExecResult {
    fn problem(&self) -> Option<String> {
        // The per-request output limit is checked by the caller that knows it; this
        // is the absolute ceiling.
        let ceiling = u32::MAX as usize;
        (self.stdout.len() > ceiling || self.stderr.len() > ceiling)
            .then(|| "exec output exceeds 4 GiB".to_string())
    }
}

impl Answer for String {
    fn problem(&self) -> Option<String> {
        (self.len() > MAX_AGENT_REPLY).then(|| {
            format!(
                "a reply of {} bytes (at most {MAX_AGENT_REPLY})",
                self.len()
            )
        })
    }
}

impl Answer for () {
    fn problem(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::bindings::types::{VmResources, VmState};

    fn vm(id: &str) -> VmInfo {
        VmInfo {
            id: id.into(),
            name: id.into(),
            state: VmState::Stopped,
            host: "h".into(),
            addresses: vec![],
            resources: VmResources {
                logical_cpus: 1,
                main_memory_mib: 512,
                disk_mib: None,
            },
            platform: None,
            os_family: None,
            os_name: None,
            is_template: false,
            labels: vec![],
        }
    }

    #[test]
    fn ids_follow_the_grammar() {
        for ok in [
            "vm-1",
            "4f6c0c1e-9d7b-4a3e-8c51-2f0b6c1d9e77",
            "a.b_c:d@e+f",
        ] {
            assert!(valid_id(ok), "{ok}");
        }
        let long = "a".repeat(MAX_ID + 1);
        for bad in ["", ".", "..", "a/b", "a\r\nb", "a b", "é", long.as_str()] {
            assert!(!valid_id(bad), "{bad:?}");
            assert!(vec![vm(bad)].problem().is_some(), "{bad:?}");
        }
    }

    #[test]
    fn listings_refuse_duplicates_oversize_and_absurd_numbers() {
        assert!(vec![vm("a"), vm("b")].problem().is_none());
        assert!(vec![vm("a"), vm("a")].problem().unwrap().contains("twice"));
        let mut big = vm("a");
        big.resources.main_memory_mib = u64::MAX;
        assert!(big.problem().unwrap().contains("MiB of memory"));
        let mut cpus = vm("a");
        cpus.resources.logical_cpus = u32::MAX;
        assert!(cpus.problem().is_some());
        let many: Vec<VmInfo> = (0..=MAX_LIST).map(|i| vm(&format!("v{i}"))).collect();
        assert!(many.problem().unwrap().contains("records"));
    }

    #[test]
    fn messages_are_cut_with_a_marker() {
        let m = bounded_message("é".repeat(MAX_MESSAGE));
        assert!(m.len() < MAX_MESSAGE + 64, "{}", m.len());
        assert!(m.ends_with("more bytes cut]"), "{m}");
        assert_eq!(bounded_message("short".into()), "short");
    }
}
