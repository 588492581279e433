//! Native guest operations (vSphere `GuestOperationsManager`), exported as the
//! contract's `guest` interface.
//!
//! - exec: `/bin/sh -c` runs the argv (quoted) with its standard streams redirected
//!   to files in a fresh temporary directory of the guest; the driver polls
//!   `ListProcessesInGuest` for the exit code (an ended process without `exitCode`
//!   exited 0), ends it with `TerminateProcessInGuest` at its timeout, reads the
//!   files back and removes the directory. Ending and reading take up to
//!   [`END_KEEP`] of the call's budget; the manifest's `exec-margin-ms` (3000) tells
//!   the agent to allow commands at most the budget less that and the setup. A
//!   command the call's budget would still cut short (a slow setup) is ended there
//!   and fails as a `timeout` naming `call-timeout-ms`, not as `timed-out`.
//! - files: `InitiateFileTransferToGuest` / `FromGuest`, then one HTTP PUT / GET on
//!   the URL the server returns (its authority must be granted too). Uploads are
//!   buffered in the instance until `finish` (the transfer needs the size first), up
//!   to `max-transfer-mib`; the SHA-256 reported is of the bytes read back from the
//!   guest.
//! - Guest credentials come from the plugin's config (`guest-username`,
//!   `guest-password`) and are never logged.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use gve_sdk::digest::Sha256;
use gve_sdk::http::Request;
use gve_sdk::prelude::*;
use gve_sdk::{deadline, log};

use crate::inventory::Conn;
use crate::props;
use crate::xml::{self, MoRef};

type Shared = Rc<RefCell<Guest>>;

/// What an exec keeps of its call's budget for ending the command, reading its
/// output and removing its directory (about six SOAP and HTTP round trips, each
/// bounded by what is left).
const END_KEEP: Duration = Duration::from_secs(2);
/// What an exec's steps keep of the call's budget for removing its directory.
const REMOVE_KEEP: Duration = Duration::from_secs(1);
/// The least wait worth starting a command with.
const LEAST_WAIT: Duration = Duration::from_millis(500);

/// A guest session: the connection and the guest managers.
pub struct Guest {
    conn: Conn,
    process_manager: MoRef,
    file_manager: MoRef,
    max_transfer: usize,
}

/// The `guest-session` resource.
pub struct EsxGuestSession(Shared);

impl EsxGuestSession {
    /// Logs in to `endpoint` and finds the guest operation managers.
    pub fn open(endpoint: String, credentials: Credentials) -> Result<EsxGuestSession> {
        let mut conn = Conn::open(&endpoint, credentials)?;
        let gom = conn
            .client
            .content
            .guest_operations_manager
            .clone()
            .ok_or_else(|| {
                Error::unsupported(format!("{endpoint} has no guest operations manager"))
            })?;
        let (mut pm, mut fm) = (None, None);
        props::one(
            &mut conn.client,
            &gom,
            &["processManager", "fileManager"],
            |p| {
                pm = props::moref(p, "processManager");
                fm = props::moref(p, "fileManager");
                Ok(())
            },
        )?;
        let missing =
            || Error::unsupported(format!("{endpoint}: guest operations are not available"));
        let max_mib: usize = gve_sdk::config::parse_or("max-transfer-mib", 32)?;
        Ok(EsxGuestSession(Rc::new(RefCell::new(Guest {
            conn,
            process_manager: pm.ok_or_else(missing)?,
            file_manager: fm.ok_or_else(missing)?,
            max_transfer: max_mib.saturating_mul(1 << 20),
        }))))
    }
}

impl Guest {
    fn auth(&self) -> Result<String> {
        let s = &self.conn.settings;
        match (&s.guest_username, &s.guest_password) {
            (Some(u), Some(p)) => Ok(format!(
                "<auth xsi:type=\"NamePasswordAuthentication\"><interactiveSession>false</interactiveSession>{}{}</auth>",
                xml::text("username", u),
                xml::text("password", p)
            )),
            _ => Err(Error::denied(
                "no guest credentials: the operator sets guest-username and guest-password in the vmware-esx config",
            )),
        }
    }

    /// Calls a guest method on `manager` for `vm`; a VM that is not running (its
    /// guest cannot answer) is `unavailable`, as the contract says.
    fn call<T>(
        &mut self,
        file: bool,
        method: &str,
        vm: &MoRef,
        args: &str,
        read: impl FnOnce(roxmltree::Node<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        let manager = if file {
            self.file_manager.clone()
        } else {
            self.process_manager.clone()
        };
        let args = format!("{}{}{args}", xml::moref("vm", vm), self.auth()?);
        self.conn
            .client
            .call(method, &manager, &args, read)
            .map_err(|e| match e {
                Error::InvalidState(m) => Error::unavailable(m),
                e => e,
            })
    }

    fn vm(&mut self, vm: &str) -> Result<MoRef> {
        self.conn.resolve(vm)
    }

    fn temp_dir(&mut self, vm: &MoRef) -> Result<String> {
        self.call(
            true,
            "CreateTemporaryDirectoryInGuest",
            vm,
            "<prefix>gve-exec-</prefix><suffix></suffix>",
            |r| {
                xml::child_text(r, "returnval")
                    .map(str::to_string)
                    .ok_or_else(|| {
                        Error::backend("CreateTemporaryDirectoryInGuest: no path in the reply")
                    })
            },
        )
    }

    fn remove_dir(&mut self, vm: &MoRef, dir: &str) {
        let args = format!(
            "{}<recursive>true</recursive>",
            xml::text("directoryPath", dir)
        );
        if let Err(e) = self.call(true, "DeleteDirectoryInGuest", vm, &args, |_| Ok(())) {
            log::warn(&format!("removing {dir} in {}: {e}", vm.value));
        }
    }

    /// A transfer URL with ESXi's `*` host replaced by the endpoint's host.
    fn transfer_url(&self, url: &str) -> String {
        match url.split_once("://*") {
            Some((scheme, rest)) => format!("{scheme}://{}{rest}", self.conn.client.endpoint.host),
            None => url.to_string(),
        }
    }

    fn put(&mut self, vm: &MoRef, path: &str, mode: u32, bytes: &[u8]) -> Result<()> {
        let args = format!(
            "{}<fileAttributes xsi:type=\"GuestPosixFileAttributes\"><permissions>{}</permissions></fileAttributes><fileSize>{}</fileSize><overwrite>true</overwrite>",
            xml::text("guestFilePath", path),
            mode & 0o7777,
            bytes.len()
        );
        let url = self.call(true, "InitiateFileTransferToGuest", vm, &args, |r| {
            xml::child_text(r, "returnval")
                .map(str::to_string)
                .ok_or_else(|| Error::backend("InitiateFileTransferToGuest: no URL in the reply"))
        })?;
        let url = self.transfer_url(&url);
        let resp = Request::new("PUT", &url)
            .header("content-type", "application/octet-stream")
            .timeout(self.conn.settings.request_timeout)
            .keep(self.conn.client.reserve)
            .body(bytes.to_vec())
            .send()?;
        if !resp.is_success() {
            return Err(Error::backend(format!(
                "writing {path} in {}: HTTP {}",
                vm.value, resp.status
            )));
        }
        Ok(())
    }

    /// Reads a guest file whole: (mode, content).
    fn get(&mut self, vm: &MoRef, path: &str) -> Result<(u32, Vec<u8>)> {
        let args = xml::text("guestFilePath", path);
        let (size, mode, url) =
            self.call(true, "InitiateFileTransferFromGuest", vm, &args, |r| {
                let rv = xml::child(r, "returnval")
                    .ok_or_else(|| Error::backend("InitiateFileTransferFromGuest: no reply"))?;
                let size: u64 = xml::child_text(rv, "size")
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                let mode: u32 = xml::path(rv, &["attributes", "permissions"])
                    .and_then(|p| xml::text_of(p).trim().parse().ok())
                    .unwrap_or(0o644);
                let url = xml::child_text(rv, "url").ok_or_else(|| {
                    Error::backend("InitiateFileTransferFromGuest: no URL in the reply")
                })?;
                Ok((size, mode & 0o7777, url.to_string()))
            })?;
        if size > self.max_transfer as u64 {
            return Err(Error::invalid_argument(format!(
                "{path} in {} has {size} bytes, more than max-transfer-mib allows",
                vm.value
            )));
        }
        let url = self.transfer_url(&url);
        let resp = Request::get(&url)
            .timeout(self.conn.settings.request_timeout)
            .keep(self.conn.client.reserve)
            .send()?;
        if !resp.is_success() {
            return Err(Error::backend(format!(
                "reading {path} in {}: HTTP {}",
                vm.value, resp.status
            )));
        }
        Ok((mode, resp.body))
    }

    fn stat(&mut self, vm: &MoRef, path: &str) -> Result<FileInfo> {
        let (mode, bytes) = self.get(vm, path)?;
        // Hashed by the host (contract 0.1.3's `digest`), natively.
        let mut sha = Sha256::new();
        sha.update(&bytes);
        Ok(FileInfo {
            size: bytes.len() as u64,
            mode,
            sha256: sha.hex(),
        })
    }

    fn exec(&mut self, vm: &str, req: ExecRequest) -> Result<ExecResult> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(Error::invalid_argument(
                "exec needs a program: argv is empty",
            ));
        }
        let left = deadline::remaining();
        if left < END_KEEP + LEAST_WAIT {
            return Err(deadline::over_budget(format!(
                "exec in {vm} not started: {} ms were left",
                left.as_millis()
            )));
        }
        let id = self.vm(vm)?;
        let dir = self.temp_dir(&id)?;
        // Every step keeps a second of the call for removing the directory.
        self.conn.client.reserve = REMOVE_KEEP;
        let r = self.exec_in(&id, &dir, req);
        self.conn.client.reserve = Duration::ZERO;
        self.remove_dir(&id, &dir);
        r
    }

    fn exec_in(&mut self, id: &MoRef, dir: &str, req: ExecRequest) -> Result<ExecResult> {
        let (out, err, input) = (
            format!("{dir}/stdout"),
            format!("{dir}/stderr"),
            format!("{dir}/stdin"),
        );
        let mut script: Vec<String> = req.argv.iter().map(|a| sh_quote(a)).collect();
        script.push(format!("> {} 2> {}", sh_quote(&out), sh_quote(&err)));
        if !req.stdin.is_empty() {
            self.put(id, &input, 0o600, &req.stdin)?;
            script.push(format!("< {}", sh_quote(&input)));
        }
        let mut spec = format!(
            "<spec>{}{}",
            xml::text("programPath", "/bin/sh"),
            xml::text("arguments", &format!("-c {}", sh_quote(&script.join(" "))))
        );
        if let Some(cwd) = &req.cwd {
            spec.push_str(&xml::text("workingDirectory", cwd));
        }
        for e in &req.env {
            if e.name.is_empty() || e.name.contains('=') {
                return Err(Error::invalid_argument(format!(
                    "environment variable name {:?}",
                    e.name
                )));
            }
            spec.push_str(&xml::text(
                "envVariables",
                &format!("{}={}", e.name, e.value),
            ));
        }
        spec.push_str("</spec>");
        // The command's own timeout, within what is left of the call less what
        // ending it takes.
        let own = Duration::from_millis(u64::from(req.timeout_ms));
        let wait = deadline::bounded(own, END_KEEP);
        let by_call = wait < own;
        let over_budget = |wait: Duration| {
            deadline::over_budget(format!(
                "exec in {}: the command was given {} ms of its {} ms timeout",
                id.value,
                wait.as_millis(),
                req.timeout_ms
            ))
        };
        if by_call && wait < LEAST_WAIT {
            return Err(over_budget(wait));
        }
        let until = Instant::now() + wait;
        let pid: i64 = self.call(false, "StartProgramInGuest", id, &spec, |r| {
            xml::child_text(r, "returnval")
                .and_then(|p| p.trim().parse().ok())
                .ok_or_else(|| Error::backend("StartProgramInGuest: no pid in the reply"))
        })?;
        let mut pause = Duration::from_millis(20);
        let exit = loop {
            if let Some(code) = self.ended(id, pid)? {
                break Some(code);
            }
            let now = Instant::now();
            if now >= until {
                break None;
            }
            std::thread::sleep(pause.min(until - now));
            pause = (pause * 2).min(Duration::from_millis(500));
        };
        if exit.is_none() {
            let args = format!("<pid>{pid}</pid>");
            match self.call(false, "TerminateProcessInGuest", id, &args, |_| Ok(())) {
                Ok(()) | Err(Error::NotFound(_)) => {}
                Err(e) => log::warn(&format!("ending process {pid} in {}: {e}", id.value)),
            }
            if by_call {
                return Err(over_budget(wait));
            }
        }
        let limit = req.output_limit as usize;
        let (stdout, stdout_truncated) = self.output(id, &out, limit)?;
        let (stderr, stderr_truncated) = self.output(id, &err, limit)?;
        Ok(ExecResult {
            exit_code: exit,
            signal: None,
            timed_out: exit.is_none(),
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
        })
    }

    /// The exit code of `pid` once it has ended.
    fn ended(&mut self, id: &MoRef, pid: i64) -> Result<Option<i32>> {
        let args = format!("<pids>{pid}</pids>");
        self.call(false, "ListProcessesInGuest", id, &args, |r| {
            let Some(p) = xml::children(r, "returnval").find(|p| {
                xml::child_text(*p, "pid").and_then(|v| v.trim().parse::<i64>().ok()) == Some(pid)
            }) else {
                return Err(Error::backend(format!(
                    "process {pid} vanished from {}",
                    id.value
                )));
            };
            if xml::child(p, "endTime").is_none() {
                return Ok(None);
            }
            // vcsim leaves out an exit code of 0.
            Ok(Some(
                xml::child_text(p, "exitCode")
                    .and_then(|c| c.trim().parse().ok())
                    .unwrap_or(0),
            ))
        })
    }

    fn output(&mut self, id: &MoRef, path: &str, limit: usize) -> Result<(Vec<u8>, bool)> {
        match self.get(id, path) {
            Ok((_, mut bytes)) => {
                let cut = bytes.len() > limit;
                bytes.truncate(limit);
                Ok((bytes, cut))
            }
            // A program that never started leaves no output files.
            Err(Error::NotFound(_)) => Ok((Vec::new(), false)),
            Err(e) => Err(e),
        }
    }

    fn parent_exists(&mut self, id: &MoRef, parent: &str) -> Result<bool> {
        let args = format!(
            "{}<maxResults>1</maxResults>",
            xml::text("filePath", parent)
        );
        match self.call(true, "ListFilesInGuest", id, &args, |_| Ok(())) {
            Ok(()) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl GuestSession for EsxGuestSession {
    type Upload = EsxUpload;
    type Download = BytesDownload;

    fn exec(&mut self, vm: String, request: ExecRequest) -> Result<ExecResult> {
        self.0.borrow_mut().exec(&vm, request)
    }

    fn upload(
        &mut self,
        vm: String,
        path: String,
        mode: u32,
        create_parents: bool,
    ) -> Result<EsxUpload> {
        if !path.starts_with('/') || path.ends_with('/') {
            return Err(Error::invalid_argument(format!(
                "{path:?}: a guest file path must be absolute"
            )));
        }
        let mut g = self.0.borrow_mut();
        let id = g.vm(&vm)?;
        let parent = match path.rsplit_once('/') {
            Some(("", _)) | None => "/".to_string(),
            Some((p, _)) => p.to_string(),
        };
        if !g.parent_exists(&id, &parent)? {
            if !create_parents {
                return Err(Error::not_found(format!("{parent} does not exist in {vm}")));
            }
            let args = format!(
                "{}<createParentDirectories>true</createParentDirectories>",
                xml::text("directoryPath", &parent)
            );
            match g.call(true, "MakeDirectoryInGuest", &id, &args, |_| Ok(())) {
                Ok(()) | Err(Error::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        drop(g);
        Ok(EsxUpload {
            guest: self.0.clone(),
            vm: id,
            path,
            mode,
            bytes: Vec::new(),
        })
    }

    fn download(&mut self, vm: String, path: String) -> Result<BytesDownload> {
        let mut g = self.0.borrow_mut();
        let id = g.vm(&vm)?;
        let (mode, bytes) = g.get(&id, &path)?;
        Ok(BytesDownload::new(bytes, mode))
    }

    fn stat(&mut self, vm: String, path: String) -> Result<FileInfo> {
        let mut g = self.0.borrow_mut();
        let id = g.vm(&vm)?;
        g.stat(&id, &path)
    }
}

/// A file being written: buffered until `finish`.
pub struct EsxUpload {
    guest: Shared,
    vm: MoRef,
    path: String,
    mode: u32,
    bytes: Vec<u8>,
}

impl Upload for EsxUpload {
    fn write(&mut self, chunk: Vec<u8>) -> Result<()> {
        let max = self.guest.borrow().max_transfer;
        if self.bytes.len().saturating_add(chunk.len()) > max {
            return Err(Error::invalid_argument(format!(
                "{}: more than max-transfer-mib ({} MiB) for one upload",
                self.path,
                max >> 20
            )));
        }
        self.bytes.extend_from_slice(&chunk);
        Ok(())
    }

    fn finish(&mut self) -> Result<FileInfo> {
        let mut g = self.guest.borrow_mut();
        g.put(&self.vm, &self.path, self.mode, &self.bytes)?;
        self.bytes = Vec::new();
        g.stat(&self.vm, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
    }
}
