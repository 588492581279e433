//! The driver session: the VM state machine of the contract.

use gve_sdk::prelude::*;

use crate::fs::Fs;
use crate::state::{self, capacity, Endpoint, Vm};

/// A driver session on one `memory:` endpoint.
pub struct MemorySession {
    endpoint: String,
}

impl MemorySession {
    /// A session on `endpoint` (already authenticated).
    pub fn new(endpoint: String) -> MemorySession {
        MemorySession { endpoint }
    }

    /// Runs `f` on this session's endpoint.
    fn with<R>(&self, f: impl FnOnce(&mut Endpoint) -> R) -> R {
        state::with(|w| f(w.endpoint(&self.endpoint)))
    }

    /// Applies a power transition to a VM (not a template): `next` maps the current
    /// state to the new one or to the reason the transition is not allowed.
    fn transition(
        &self,
        vm: &str,
        op: &str,
        next: impl FnOnce(VmState) -> std::result::Result<VmState, String>,
    ) -> Result<VmInfo> {
        self.with(|ep| {
            let current = &ep.get(vm)?.info;
            if current.is_template {
                return Err(Error::invalid_state(format!(
                    "{op} {vm}: {} is a template",
                    current.name
                )));
            }
            let to = next(current.state)
                .map_err(|why| Error::invalid_state(format!("{op} {vm}: {why}")))?;
            if !state::holds_resources(current.state) && state::holds_resources(to) {
                ep.check_memory(vm, current.resources.main_memory_mib)?;
            }
            let seq = current
                .id
                .trim_start_matches("mem-")
                .parse::<u32>()
                .unwrap_or(0);
            let addresses = if to == VmState::Running {
                vec![format!("10.77.{}.{}", (seq >> 8) & 0xff, seq & 0xff)]
            } else {
                Vec::new()
            };
            let id = current.id.clone();
            ep.set_state(&id, to, addresses)
        })
    }
}

fn validate(profile: &VmProfile) -> Result<()> {
    if profile.name.trim().is_empty() {
        return Err(Error::invalid_argument("profile.name must not be empty"));
    }
    if profile.logical_cpus < 1 {
        return Err(Error::invalid_argument(format!(
            "{}: logical-cpus must be at least 1",
            profile.name
        )));
    }
    if profile.main_memory_mib < 16 {
        return Err(Error::invalid_argument(format!(
            "{}: main-memory-mib must be at least 16, not {}",
            profile.name, profile.main_memory_mib
        )));
    }
    Ok(())
}

impl Session for MemorySession {
    fn host_info(&mut self) -> Result<HostInfo> {
        let (cpus, memory) = capacity()?;
        self.with(|ep| {
            let (used_cpus, used_mib, used) = ep.used();
            let hostname = match ep.name.trim_start_matches("memory:") {
                "" => "memory".to_string(),
                h => h.to_string(),
            };
            Ok(HostInfo {
                hostname,
                hypervisor_kind: "memory".into(),
                hypervisor_version: crate::VERSION.into(),
                platform: "amd64".into(),
                cpu_model: "gve memory vCPU".into(),
                physical_cpus: cpus,
                logical_cpus: cpus,
                main_memory_mib: memory,
                free_memory_mib: memory.saturating_sub(used_mib),
                allocated_logical_cpus: used_cpus,
                total_instances: u32::try_from(ep.vm_count()).unwrap_or(u32::MAX),
                used_instances: used,
            })
        })
    }

    fn list_vms(&mut self) -> Result<Vec<VmInfo>> {
        Ok(self.with(|ep| {
            ep.iter()
                .filter(|v| !v.info.is_template)
                .map(|v| v.info.clone())
                .collect()
        }))
    }

    fn list_templates(&mut self) -> Result<Vec<VmInfo>> {
        Ok(self.with(|ep| {
            ep.iter()
                .filter(|v| v.info.is_template)
                .map(|v| v.info.clone())
                .collect()
        }))
    }

    fn get_vm(&mut self, vm: String) -> Result<VmInfo> {
        self.with(|ep| Ok(ep.get(&vm)?.info.clone()))
    }

    fn create(&mut self, profile: VmProfile) -> Result<VmInfo> {
        validate(&profile)?;
        state::with(|w| {
            let ep = w.endpoint(&self.endpoint);
            ep.check_name_free(&profile.name)?;
            let template = match &profile.template {
                None => None,
                Some(t) => match ep.get(t) {
                    Ok(vm) if vm.info.is_template => Some(vm.info.clone()),
                    _ => {
                        return Err(Error::not_found(format!(
                            "no template {t:?} on {}",
                            ep.name
                        )))
                    }
                },
            };
            let template = template.as_ref();
            let or_template = |own: &Option<String>, pick: fn(&VmInfo) -> &Option<String>| {
                own.clone()
                    .or_else(|| template.and_then(|t| pick(t).clone()))
            };
            let info = VmInfo {
                id: w.next_id(),
                name: profile.name.clone(),
                state: VmState::Stopped,
                host: self.endpoint.clone(),
                addresses: Vec::new(),
                resources: VmResources {
                    logical_cpus: profile.logical_cpus,
                    main_memory_mib: profile.main_memory_mib,
                    disk_mib: profile
                        .disk_mib
                        .or_else(|| template.and_then(|t| t.resources.disk_mib)),
                },
                platform: or_template(&profile.platform, |t| &t.platform),
                os_family: or_template(&profile.os_family, |t| &t.os_family),
                os_name: or_template(&profile.os_name, |t| &t.os_name),
                is_template: false,
                labels: profile.labels.clone(),
            };
            w.endpoint(&self.endpoint).insert(Vm {
                info: info.clone(),
                fs: Fs::base(),
            });
            gve_sdk::log::info(&format!(
                "created {} ({}) on {}",
                info.name, info.id, self.endpoint
            ));
            Ok(info)
        })
    }

    fn clone_vm(&mut self, source: String, name: String, linked: bool) -> Result<VmInfo> {
        if name.trim().is_empty() {
            return Err(Error::invalid_argument(
                "clone: the new name must not be empty",
            ));
        }
        state::with(|w| {
            let ep = w.endpoint(&self.endpoint);
            let src = ep.get(&source)?;
            let shareable = src.info.is_template
                || matches!(src.info.state, VmState::Stopped | VmState::Suspended);
            if linked && !shareable {
                return Err(Error::invalid_state(format!(
                    "linked clone of {source}: the source is {}; stop or suspend it first",
                    state_name(src.info.state)
                )));
            }
            ep.check_name_free(&name)?;
            let (mut info, fs) = (src.info.clone(), src.fs.clone());
            info.id = w.next_id();
            info.name = name;
            info.state = VmState::Stopped;
            info.addresses = Vec::new();
            info.is_template = false;
            w.endpoint(&self.endpoint).insert(Vm {
                info: info.clone(),
                fs,
            });
            Ok(info)
        })
    }

    fn start(&mut self, vm: String) -> Result<VmInfo> {
        self.transition(&vm, "start", |s| match s {
            VmState::Stopped | VmState::Crashed => Ok(VmState::Running),
            VmState::Suspended => Err("it is suspended; use resume".into()),
            VmState::Paused => Err("it is paused; use resume".into()),
            other => Err(format!("it is already {}", state_name(other))),
        })
    }

    fn shutdown(&mut self, vm: String, _force: bool) -> Result<VmInfo> {
        self.transition(&vm, "shutdown", |s| match s {
            VmState::Running | VmState::Paused => Ok(VmState::Stopped),
            other => Err(format!("it is {}", state_name(other))),
        })
    }

    fn suspend(&mut self, vm: String) -> Result<VmInfo> {
        self.transition(&vm, "suspend", |s| match s {
            VmState::Running => Ok(VmState::Suspended),
            other => Err(format!("it is {}, not running", state_name(other))),
        })
    }

    fn resume(&mut self, vm: String) -> Result<VmInfo> {
        self.transition(&vm, "resume", |s| match s {
            VmState::Suspended | VmState::Paused => Ok(VmState::Running),
            other => Err(format!(
                "it is {}, not suspended or paused",
                state_name(other)
            )),
        })
    }

    fn migrate(&mut self, vm: String, destination: String, live: bool) -> Result<VmInfo> {
        if !destination.starts_with("memory:") {
            return Err(Error::invalid_argument(format!(
                "migrate {vm}: destination {destination:?} is not a memory endpoint"
            )));
        }
        if destination == self.endpoint {
            return Err(Error::invalid_argument(format!(
                "migrate {vm}: it is already on {destination}"
            )));
        }
        state::with(|w| {
            let src = w.endpoint(&self.endpoint);
            let info = src.get(&vm)?.info.clone();
            if info.is_template {
                return Err(Error::invalid_state(format!(
                    "migrate {vm}: templates cannot be migrated"
                )));
            }
            if live && info.state != VmState::Running {
                return Err(Error::invalid_state(format!(
                    "live migration of {vm}: it is {}, not running",
                    state_name(info.state)
                )));
            }
            let dst = w.endpoint(&destination);
            dst.check_name_free(&info.name)?;
            if state::holds_resources(info.state) {
                dst.check_memory(&vm, info.resources.main_memory_mib)?;
            }
            let src = w.endpoint(&self.endpoint);
            let mut moved = src.remove(&vm)?;
            moved.info.host = destination.clone();
            let info = moved.info.clone();
            w.endpoint(&destination).insert(moved);
            gve_sdk::log::info(&format!(
                "migrated {} from {} to {destination}",
                info.id, self.endpoint
            ));
            Ok(info)
        })
    }

    fn destroy(&mut self, vm: String) -> Result<()> {
        self.with(|ep| {
            let gone = ep.remove(&vm)?;
            gve_sdk::log::info(&format!("destroyed {} ({})", gone.info.name, gone.info.id));
            Ok(())
        })
    }

    fn guest_agent_command(
        &mut self,
        vm: String,
        command: String,
        _timeout_ms: u32,
    ) -> Result<String> {
        let info = self.get_vm(vm.clone())?;
        if info.state != VmState::Running {
            return Err(Error::unavailable(format!(
                "{vm}: guest agent not running (the VM is {})",
                state_name(info.state)
            )));
        }
        let request: serde_json::Value = serde_json::from_str(&command).map_err(|e| {
            Error::invalid_argument(format!("guest agent command is not JSON: {e}"))
        })?;
        let execute = request
            .get("execute")
            .and_then(|e| e.as_str())
            .ok_or_else(|| {
                Error::invalid_argument("guest agent command has no \"execute\" member")
            })?;
        let reply = match execute {
            "guest-ping" => serde_json::json!({ "return": {} }),
            "guest-info" => {
                serde_json::json!({ "return": { "version": format!("memory-{}", crate::VERSION) } })
            }
            other => serde_json::json!({
                "error": { "class": "CommandNotFound", "desc": format!("The command {other} has not been found") }
            }),
        };
        Ok(reply.to_string())
    }
}
