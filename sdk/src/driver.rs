//! The plain-Rust side of the `driver` export: the [`Driver`] and [`Session`] traits a
//! plugin implements, and the blanket impls that map them onto the generated traits.

use core::cell::RefCell;

use crate::bindings::driver_world::exports::gve::hypervisor::driver as wit;
use crate::error::{Error, Result};
use crate::types::{Credentials, DriverInfo, HostInfo, VmInfo, VmProfile};

/// A hypervisor driver: a static description and a way to open sessions.
///
/// Export it with [`crate::export_driver!`] (or [`crate::export_driver_with_guest!`]).
pub trait Driver: 'static {
    /// The session type [`Driver::open`] returns.
    type Session: Session;

    /// Static description of the driver; its name and version must match the manifest.
    fn info() -> DriverInfo;

    /// Connects and authenticates to `endpoint` (driver-specific: a libvirt URI, a URL, ...).
    fn open(endpoint: String, credentials: Credentials) -> Result<Self::Session>;
}

/// One authenticated connection to one hypervisor endpoint.
///
/// Every method has a default body that returns [`Error::Unsupported`]; implement the
/// ones the driver declares in its [`crate::types::Capabilities`]. Methods take
/// `&mut self`: the component model never re-enters an instance, so the SDK can hand
/// out exclusive access for the duration of a call.
pub trait Session: 'static {
    /// Capacity and identity of the host behind the endpoint (`host-info`).
    fn host_info(&mut self) -> Result<HostInfo> {
        Err(Error::not_implemented("host-info"))
    }

    /// Every VM that is not a template (`list-vms`).
    fn list_vms(&mut self) -> Result<Vec<VmInfo>> {
        Err(Error::not_implemented("list-vms"))
    }

    /// Every template (`list-templates`).
    fn list_templates(&mut self) -> Result<Vec<VmInfo>> {
        Err(Error::not_implemented("list-templates"))
    }

    /// One VM or template by id or name (`get-vm`).
    fn get_vm(&mut self, vm: String) -> Result<VmInfo> {
        let _ = vm;
        Err(Error::not_implemented("get-vm"))
    }

    /// Defines a new, stopped VM from a profile (`create`).
    fn create(&mut self, profile: VmProfile) -> Result<VmInfo> {
        let _ = profile;
        Err(Error::not_implemented("create"))
    }

    /// Copies a VM or template; `linked` asks for a copy-on-write clone (`clone`).
    fn clone_vm(&mut self, source: String, name: String, linked: bool) -> Result<VmInfo> {
        let _ = (source, name, linked);
        Err(Error::not_implemented("clone"))
    }

    /// Powers a VM on (`start`).
    fn start(&mut self, vm: String) -> Result<VmInfo> {
        let _ = vm;
        Err(Error::not_implemented("start"))
    }

    /// Asks the guest OS to shut down, or with `force` powers off at once (`shutdown`).
    fn shutdown(&mut self, vm: String, force: bool) -> Result<VmInfo> {
        let _ = (vm, force);
        Err(Error::not_implemented("shutdown"))
    }

    /// Suspends a running VM (`suspend`).
    fn suspend(&mut self, vm: String) -> Result<VmInfo> {
        let _ = vm;
        Err(Error::not_implemented("suspend"))
    }

    /// Resumes a suspended or paused VM (`resume`).
    fn resume(&mut self, vm: String) -> Result<VmInfo> {
        let _ = vm;
        Err(Error::not_implemented("resume"))
    }

    /// Moves a VM to `destination`, with `live` keeping it running (`migrate`).
    fn migrate(&mut self, vm: String, destination: String, live: bool) -> Result<VmInfo> {
        let _ = (vm, destination, live);
        Err(Error::not_implemented("migrate"))
    }

    /// Powers off if needed and deletes the VM and the disks it owns (`destroy`).
    fn destroy(&mut self, vm: String) -> Result<()> {
        let _ = vm;
        Err(Error::not_implemented("destroy"))
    }

    /// Sends one QEMU guest agent JSON command to the VM's agent (`guest-agent-command`).
    fn guest_agent_command(
        &mut self,
        vm: String,
        command: String,
        timeout_ms: u32,
    ) -> Result<String> {
        let _ = (vm, command, timeout_ms);
        Err(Error::not_implemented("guest-agent-command"))
    }
}

/// The `session` resource the SDK exports for a [`Driver`] `D`: its session behind a
/// `RefCell`.
#[doc(hidden)]
pub struct SessionResource<D: Driver>(RefCell<D::Session>);

impl<T: Driver> wit::Guest for T {
    type Session = SessionResource<T>;

    fn info() -> DriverInfo {
        T::info()
    }
}

impl<D: Driver> wit::GuestSession for SessionResource<D> {
    fn open(endpoint: String, credentials: Credentials) -> Result<wit::Session> {
        let session = D::open(endpoint, credentials)?;
        Ok(wit::Session::new(SessionResource::<D>(RefCell::new(
            session,
        ))))
    }

    fn host_info(&self) -> Result<HostInfo> {
        self.0.borrow_mut().host_info()
    }

    fn list_vms(&self) -> Result<Vec<VmInfo>> {
        self.0.borrow_mut().list_vms()
    }

    fn list_templates(&self) -> Result<Vec<VmInfo>> {
        self.0.borrow_mut().list_templates()
    }

    fn get_vm(&self, vm: String) -> Result<VmInfo> {
        self.0.borrow_mut().get_vm(vm)
    }

    fn create(&self, profile: VmProfile) -> Result<VmInfo> {
        self.0.borrow_mut().create(profile)
    }

    fn clone(&self, source: String, name: String, linked: bool) -> Result<VmInfo> {
        self.0.borrow_mut().clone_vm(source, name, linked)
    }

    fn start(&self, vm: String) -> Result<VmInfo> {
        self.0.borrow_mut().start(vm)
    }

    fn shutdown(&self, vm: String, force: bool) -> Result<VmInfo> {
        self.0.borrow_mut().shutdown(vm, force)
    }

    fn suspend(&self, vm: String) -> Result<VmInfo> {
        self.0.borrow_mut().suspend(vm)
    }

    fn resume(&self, vm: String) -> Result<VmInfo> {
        self.0.borrow_mut().resume(vm)
    }

    fn migrate(&self, vm: String, destination: String, live: bool) -> Result<VmInfo> {
        self.0.borrow_mut().migrate(vm, destination, live)
    }

    fn destroy(&self, vm: String) -> Result<()> {
        self.0.borrow_mut().destroy(vm)
    }

    fn guest_agent_command(&self, vm: String, command: String, timeout_ms: u32) -> Result<String> {
        self.0
            .borrow_mut()
            .guest_agent_command(vm, command, timeout_ms)
    }
}
