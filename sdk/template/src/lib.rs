//! A minimal gve driver: it reports one host and knows one VM. Replace the bodies
//! with calls to your hypervisor (`gve_sdk::http`, `gve_sdk::libvirt`) and declare
//! every operation you implement in `capabilities`.

#![warn(missing_docs)]

use gve_sdk::prelude::*;

/// The driver: named in `export_driver!` below.
pub struct MyDriver;

/// One connection to one endpoint.
pub struct MySession {
    endpoint: String,
}

impl Driver for MyDriver {
    type Session = MySession;

    fn info() -> DriverInfo {
        DriverInfo {
            name: "my-driver".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            hypervisor_kind: "example".into(),
            // Declare each operation as you implement it (`Capabilities::START |
            // Capabilities::SHUTDOWN | ...`): the host refuses undeclared ones before
            // they reach the plugin. Reads (host-info, list-vms, get-vm) need none.
            capabilities: Capabilities::empty(),
        }
    }

    fn open(endpoint: String, _credentials: Credentials) -> Result<MySession> {
        if !endpoint.starts_with("example:") {
            return Err(Error::invalid_argument(format!(
                "{endpoint:?} is not an example: endpoint"
            )));
        }
        gve_sdk::log::info(&format!("connected to {endpoint}"));
        Ok(MySession { endpoint })
    }
}

impl Session for MySession {
    fn host_info(&mut self) -> Result<HostInfo> {
        // Operator-set values: `gve plugin load ... --config cpus=8`.
        let cpus = gve_sdk::config::parse_or("cpus", 4u32)?;
        Ok(HostInfo {
            hostname: self.endpoint.trim_start_matches("example:").into(),
            hypervisor_kind: "example".into(),
            hypervisor_version: "1.0".into(),
            platform: "amd64".into(),
            cpu_model: "example".into(),
            physical_cpus: cpus,
            logical_cpus: cpus,
            main_memory_mib: 8192,
            free_memory_mib: 8192,
            allocated_logical_cpus: 0,
            total_instances: 1,
            used_instances: 0,
        })
    }

    fn list_vms(&mut self) -> Result<Vec<VmInfo>> {
        Ok(vec![self.get_vm("vm-1".into())?])
    }

    fn get_vm(&mut self, vm: String) -> Result<VmInfo> {
        if vm != "vm-1" {
            return Err(Error::not_found(format!(
                "no VM {vm:?} on {}",
                self.endpoint
            )));
        }
        Ok(VmInfo {
            id: "vm-1".into(),
            name: "vm-1".into(),
            state: VmState::Stopped,
            host: self.endpoint.clone(),
            addresses: Vec::new(),
            resources: VmResources {
                logical_cpus: 1,
                main_memory_mib: 512,
                disk_mib: None,
            },
            platform: Some("amd64".into()),
            os_family: None,
            os_name: None,
            is_template: false,
            labels: Vec::new(),
        })
    }

    // start, shutdown, ...: every method you do not write answers
    // `unsupported("<op> is not implemented by this driver")`.
}

gve_sdk::export_driver!(MyDriver);
