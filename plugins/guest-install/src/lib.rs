//! guest-install: runs commands in and copies files to and from any VM whose driver
//! reaches the VM's in-guest agent (the paper's InstallService, today the QEMU guest
//! agent). It speaks the qemu-ga protocol over the host's `guest-channel`, which the
//! host routes to the VM's own driver (`session.guest-agent-command`; for kvm,
//! libvirt's qemu-agent-command).
//!
//! Config values: `command-timeout-ms` (default 10000): the budget of one qemu-ga
//! command (a file chunk, a status poll); a guest agent that does not answer within
//! it is reported as unavailable. An upload's checksum in the guest may take a
//! second per 2 MiB more; a download's (and `stat`'s) stat and checksum, one guest
//! command run before the size is known, are held only to the call. Neither runs
//! past what is left of the call (the host's `deadline`, the plugin's
//! `call-timeout-ms` limit less 2 s): one that would is stopped and reported as a
//! `timeout` naming that limit.

mod exec;
mod files;
mod qga;

use gve_sdk::prelude::*;

/// The guest provider.
pub struct GuestInstall;

/// Guest access to the VMs behind one driver endpoint.
pub struct Guests {
    endpoint: String,
    command_timeout_ms: u32,
}

impl Guests {
    fn agent(&self, vm: String) -> qga::Agent {
        qga::Agent {
            endpoint: self.endpoint.clone(),
            vm,
            command_timeout_ms: self.command_timeout_ms,
        }
    }
}

impl GuestAccess for GuestInstall {
    type Session = Guests;

    fn open(endpoint: String, _credentials: Credentials) -> Result<Guests> {
        if endpoint.is_empty() {
            return Err(Error::invalid_argument("guest-install: empty endpoint"));
        }
        let command_timeout_ms = gve_sdk::config::parse_or("command-timeout-ms", 10_000u32)?;
        if command_timeout_ms == 0 {
            return Err(Error::invalid_argument(
                "guest-install: command-timeout-ms must be positive",
            ));
        }
        Ok(Guests {
            endpoint,
            command_timeout_ms,
        })
    }
}

impl GuestSession for Guests {
    type Upload = files::GuestUpload;
    type Download = files::GuestDownload;

    fn exec(&mut self, vm: String, request: ExecRequest) -> Result<ExecResult> {
        exec::run(&self.agent(vm), &request)
    }

    fn upload(
        &mut self,
        vm: String,
        path: String,
        mode: u32,
        create_parents: bool,
    ) -> Result<files::GuestUpload> {
        files::GuestUpload::start(self.agent(vm), path, mode, create_parents)
    }

    fn download(&mut self, vm: String, path: String) -> Result<files::GuestDownload> {
        files::GuestDownload::start(self.agent(vm), path)
    }

    fn stat(&mut self, vm: String, path: String) -> Result<FileInfo> {
        files::stat(&self.agent(vm), &path)
    }
}

gve_sdk::export_guest!(GuestInstall);
