//! Guest operations of the agent: exec, copy in and out, stat. They run on the guest
//! provider of the agent's driver: the driver itself when it declares
//! `guest-native`, otherwise the `[driver] guest-plugin` (guest-install), whose
//! qemu-ga commands the [`GuestRouter`] sends back to the VM's own driver session.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::StatusCode;
use serde::Deserialize;

use super::bulk_copy::{self, BulkIn};
use super::bulk_out::BulkOut;
use super::guest_gate::{GuestGates, Pass, Ticket, PROBE, PROBE_TIMEOUT_MS};
use super::model::{ExecOutput, FileMeta, OpError, OpOutput, VmRecord, VmState};
use super::ops::{op_error, OpParams, Outcome};
use super::ready::GUEST_WAIT;
use super::AgentCore;
use crate::api::{ApiError, Body};
use crate::plugin::bindings::types::{EnvVar, ExecRequest, ExecResult, FileInfo};
use crate::plugin::caps::guest_channel::GuestChannel;
use crate::plugin::{DriverError, DriverSession, ErrorKind, GuestSession, PluginError, PluginHost};

/// Bytes per chunk between the agent and the guest plugin: one guest-file-read of a
/// copy out. Under TCG a 3 MiB copy out went at 8.0 MiB/s in 512 KiB reads, 7.6 in
/// 1 MiB, 6.3 in 2 MiB (qemu-ga's base64 of a large read costs more than the round
/// trips it saves; `bench/results/guest.md`).
pub const CHUNK: usize = 512 << 10;

/// Largest `output-limit` of one exec, bytes (qemu-ga captures at most 16 MiB).
pub const MAX_OUTPUT: u32 = 16 << 20;

/// Routes a guest plugin's qemu-ga commands to the driver session of the endpoint it
/// names. Only endpoints this agent's drivers serve are reachable.
/// Each VM's guest agent is behind a [`GuestGates`] gate: one command at a time,
/// bounded waits, and a circuit breaker for a guest agent that stopped answering.
#[derive(Default)]
pub struct GuestRouter {
    drivers: RwLock<HashMap<String, DriverSession>>,
    gates: std::sync::Arc<GuestGates>,
}

impl GuestRouter {
    /// The gates in front of VMs' guest agents.
    pub fn gates(&self) -> std::sync::Arc<GuestGates> {
        self.gates.clone()
    }

    /// Makes `driver`'s endpoint reachable.
    pub fn insert(&self, driver: DriverSession) {
        self.drivers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(driver.endpoint().to_string(), driver);
    }
}

impl GuestChannel for GuestRouter {
    fn agent_command(
        &self,
        endpoint: String,
        vm: String,
        command: String,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<String, DriverError>> + Send + 'static>> {
        let driver = self
            .drivers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&endpoint)
            .cloned();
        let gates = self.gates.clone();
        Box::pin(async move {
            let Some(driver) = driver else {
                return Err(DriverError::new(
                    ErrorKind::Denied,
                    format!("no driver of this agent serves endpoint '{endpoint}'"),
                ));
            };
            channel_command(&driver, &gates, &vm, &command, timeout).await
        })
    }
}

/// Sends one qemu-ga command to `vm` through `driver`'s guest-agent channel,
/// behind the VM's gate (one command at a time, the circuit breaker).
pub async fn channel_command(
    driver: &DriverSession,
    gates: &GuestGates,
    vm: &str,
    command: &str,
    timeout: Duration,
) -> Result<String, DriverError> {
    let endpoint = driver.endpoint();
    let ticket = match gates.enter(endpoint, vm, timeout).await? {
        Pass::Go(t) => t,
        Pass::Probe(t) => {
            let r = send(driver, &t, vm, PROBE, PROBE_TIMEOUT_MS).await;
            if let Err(e) = r {
                if e.not_started() {
                    return Err(e);
                }
                return Err(DriverError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the guest agent of VM {vm} still does not answer ({}); \
                         commands to it fail at once until it does",
                        e.message
                    ),
                ));
            }
            t
        }
    };
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    send(driver, &ticket, vm, command, ms).await
}

/// Sends one qemu-ga command and tells the gate how the guest agent answered (a
/// wait for a driver instance, or a command the host did not start because
/// libvirt has not answered earlier ones, says nothing about the guest).
async fn send(
    driver: &DriverSession,
    ticket: &Ticket,
    vm: &str,
    command: &str,
    ms: u32,
) -> Result<String, DriverError> {
    let r = driver.guest_agent_command(vm, command, ms).await;
    let busy = matches!(r, Err(PluginError::Busy { .. }));
    let r = r.map_err(|e| match e {
        PluginError::Driver { error, .. } => error,
        other => DriverError::new(other.kind(), other.to_string()),
    });
    let not_started = matches!(&r, Err(e) if e.not_started());
    if !busy && !not_started {
        ticket.done(&r);
    }
    r
}

/// The guest session exec and copy run on, and the plugin behind it.
pub struct GuestProvider {
    /// The open guest session.
    pub session: GuestSession,
    /// Plugin name.
    pub plugin: String,
    /// The plugin reaches the guest through the driver's guest-agent channel
    /// (qemu-ga), not natively: readiness is that channel's agent answering.
    pub via_channel: bool,
    /// The plugin host (for the plugin's current call budget).
    pub plugins: PluginHost,
}

impl GuestProvider {
    /// The longest timeout a guest command may ask for, milliseconds: the plugin's
    /// call budget less what ending a command takes it (its manifest's
    /// `exec-margin-ms`), so a command's own timeout ends it before the call's.
    pub fn command_ceiling_ms(&self) -> u64 {
        let (budget, margin) = self
            .plugins
            .get(&self.plugin)
            .map(|s| (s.limits.call_timeout_ms, s.exec_margin_ms))
            .unwrap_or((30_000, 1_000));
        budget.saturating_sub(margin).max(1)
    }
}

/// A command to run in the guest (the body of `POST /v1/vms/{id}/exec`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExecBody {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input, base64.
    #[serde(default)]
    pub stdin_b64: Option<String>,
    /// Budget, milliseconds (at most the guest plugin's call budget less its exec
    /// margin, which is also the default, capped at 60 s).
    #[serde(default)]
    pub timeout_ms: Option<u32>,
    /// Most bytes kept of stdout and of stderr each (default 1 MiB, at most 16 MiB).
    #[serde(default)]
    pub output_limit: Option<u32>,
}

fn guest_error(status: StatusCode, kind: &str, message: String) -> ApiError {
    ApiError::new(status, kind, message)
}

impl AgentCore {
    /// The guest provider, or why there is none.
    pub fn guest(&self) -> Result<&GuestProvider, ApiError> {
        self.guest
            .as_ref()
            .map_err(|why| guest_error(StatusCode::NOT_IMPLEMENTED, "unsupported", why.clone()))
    }

    /// Refuses guest operations on a VM whose guest cannot answer.
    pub fn require_running(rec: &VmRecord, action: &str) -> Result<(), ApiError> {
        if rec.vm.is_template || rec.vm.state != VmState::Running {
            return Err(guest_error(
                StatusCode::CONFLICT,
                "invalid-state",
                format!(
                    "cannot {action} on VM {} ({}): it is {}",
                    rec.vm.name,
                    rec.vm.id,
                    if rec.vm.is_template {
                        "a template".to_string()
                    } else {
                        format!("{:?}", rec.vm.state).to_lowercase()
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Checks an exec request before it becomes an operation; fills in defaults.
    pub fn check_exec(&self, mut body: ExecBody) -> Result<ExecBody, ApiError> {
        let ceiling = self.guest()?.command_ceiling_ms();
        if body.argv.is_empty() || body.argv[0].is_empty() {
            return Err(ApiError::bad_request("argv must name a program"));
        }
        let timeout = body.timeout_ms.map_or(ceiling.min(60_000), u64::from);
        if timeout == 0 || timeout > ceiling {
            return Err(ApiError::bad_request(format!(
                "timeout-ms must be between 1 and {ceiling} (the guest plugin's call budget less its exec margin), not {timeout}"
            )));
        }
        body.timeout_ms = Some(timeout as u32);
        let limit = body.output_limit.unwrap_or(1 << 20);
        if limit > MAX_OUTPUT {
            return Err(ApiError::bad_request(format!(
                "output-limit must be at most {MAX_OUTPUT} bytes, not {limit}"
            )));
        }
        body.output_limit = Some(limit);
        if let Some(s) = &body.stdin_b64 {
            B64.decode(s)
                .map_err(|e| ApiError::bad_request(format!("stdin-b64 is not base64: {e}")))?;
        }
        Ok(body)
    }

    /// Runs a checked exec request in the guest of `vm`.
    pub async fn guest_exec(&self, vm: &str, body: &ExecBody) -> Result<ExecOutput, OpError> {
        let guest = self.guest().map_err(|e| OpError {
            kind: e.kind.clone(),
            message: e.message.clone(),
        })?;
        // A booting guest is waited for, within the command's own budget. A
        // command that fails because the guest agent went away is not sent again:
        // it may have started (a reboot would run twice); the next one waits.
        let budget = Duration::from_millis(u64::from(body.timeout_ms.unwrap_or(60_000)));
        let _turn = self.guest_turn(vm, budget).await?;
        let request = ExecRequest {
            argv: body.argv.clone(),
            env: body
                .env
                .iter()
                .map(|(name, value)| EnvVar {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            cwd: body.cwd.clone(),
            stdin: body
                .stdin_b64
                .as_deref()
                .map(|s| B64.decode(s).unwrap_or_default())
                .unwrap_or_default(),
            timeout_ms: body.timeout_ms.unwrap_or(60_000),
            output_limit: body.output_limit.unwrap_or(1 << 20),
        };
        let r = guest.session.exec(vm, &request).await.map_err(|e| {
            // A call the host did not start says nothing of the guest.
            let refused = e.driver_error().is_some_and(DriverError::not_started);
            if e.kind() == ErrorKind::Unavailable && !refused {
                self.guest_gates
                    .set_answered(self.driver.endpoint(), vm, false);
            }
            op_error(&e)
        })?;
        Ok(exec_output(r))
    }

    /// Streams a request body into `path` in the guest of `rec`, recorded as a
    /// `copy-in` operation. `expected` is the client's SHA-256 of the content, when given.
    ///
    /// The transfer runs on its own task: hyper drops a request's handler when its
    /// connection fails mid-body, and the operation must still end (failed, its
    /// temporary file removed) rather than stay running.
    pub async fn copy_in(
        self: &Arc<Self>,
        rec: &VmRecord,
        path: &str,
        mode: u32,
        parents: bool,
        expected: Option<String>,
        body: Incoming,
    ) -> Result<FileMeta, ApiError> {
        self.guest()?;
        Self::require_running(rec, "copy a file in")?;
        let (core, vm, path) = (self.clone(), rec.vm.id.clone(), path.to_string());
        crate::api::detached("copy-in", async move {
            let guest = core.guest()?;
            let params = OpParams::CopyIn {
                path: path.clone(),
                mode,
            };
            let turn = core.guest_turn(&vm, GUEST_WAIT).await.map_err(api_error)?;
            let op = core.begin(&vm, &params).map_err(registry)?;
            // A large copy of known size goes through a staged disk where the driver can.
            let size = hyper::body::Body::size_hint(&body).exact();
            let session = &guest.session;
            let result = match size.filter(|s| bulk_copy::worth_it(&core.driver, guest, &path, *s))
            {
                Some(size) => {
                    let to = bulk_copy::Target {
                        vm: &vm,
                        path: &path,
                        mode,
                        parents,
                        expected: expected.clone(),
                    };
                    match bulk_copy::copy_in(&core, guest, &op.id, to, size, body).await {
                        BulkIn::Done(r) => r,
                        BulkIn::Fallback(body) => {
                            stream_in(session, &vm, &path, mode, parents, expected, body).await
                        }
                    }
                }
                None => stream_in(session, &vm, &path, mode, parents, expected, body).await,
            };
            drop(turn);
            let outcome = match &result {
                Ok(meta) => Ok(Outcome::Output(OpOutput::File(meta.clone()))),
                Err(e) => Err(OpError {
                    kind: e.kind.clone(),
                    message: e.message.clone(),
                }),
            };
            core.finish(op, outcome).map_err(registry)?;
            result
        })
        .await
    }

    /// Opens `path` in the guest of `rec` for reading: its size, mode and a body that
    /// streams it. The body ends with an error (the connection is cut) if the guest
    /// plugin finds the content changed during the transfer.
    ///
    /// A large file goes through a staged disk where the driver can
    /// ([`super::bulk_out`]).
    pub async fn copy_out(
        self: &Arc<Self>,
        rec: &VmRecord,
        path: &str,
    ) -> Result<(u64, u32, Body), ApiError> {
        let guest = self.guest()?;
        Self::require_running(rec, "copy a file out")?;
        let mut turn = self
            .guest_turn(&rec.vm.id, GUEST_WAIT)
            .await
            .map_err(api_error)?;
        if guest.via_channel && self.driver.has_bulk() && bulk_copy::plain_path(path) {
            match super::bulk_out::copy_out(self, guest, &rec.vm.id, path, turn).await? {
                BulkOut::Streaming(size, mode, body) => return Ok((size, mode, body)),
                BulkOut::Fallback(t) => turn = t,
            }
        }
        let mut download = guest.session.download(&rec.vm.id, path).await?;
        let (size, mode) = (download.size, download.mode);
        let (feed, body) = crate::api::feed();
        tokio::spawn(async move {
            let mut sent = 0u64;
            loop {
                match download.read(CHUNK as u32).await {
                    Ok(chunk) if chunk.is_empty() => break,
                    Ok(chunk) => {
                        sent += chunk.len() as u64;
                        if !feed.data(Bytes::from(chunk)).await {
                            tracing::debug!("copy-out: the client left after {sent} bytes");
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("copy-out failed after {sent} bytes: {e}");
                        feed.fail(e.to_string()).await;
                        break;
                    }
                }
            }
            download.close().await;
            drop(turn);
        });
        Ok((size, mode, body))
    }

    /// Size, mode and SHA-256 of a guest file.
    pub async fn stat(&self, rec: &VmRecord, path: &str) -> Result<FileMeta, ApiError> {
        let guest = self.guest()?;
        Self::require_running(rec, "stat a file")?;
        let _turn = self
            .guest_turn(&rec.vm.id, GUEST_WAIT)
            .await
            .map_err(api_error)?;
        let info = guest.session.stat(&rec.vm.id, path).await?;
        Ok(file_meta(path, info))
    }
}

/// An operation's error as an HTTP error of its kind.
fn api_error(e: OpError) -> ApiError {
    let kind = ErrorKind::parse(&e.kind).unwrap_or(ErrorKind::Backend);
    ApiError::new(ApiError::status_of(kind), &e.kind, e.message)
}

fn registry(e: super::registry::RegistryError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
}

/// Writes a request body into a guest upload, chunk by chunk.
async fn stream_in(
    session: &GuestSession,
    vm: &str,
    path: &str,
    mode: u32,
    parents: bool,
    expected: Option<String>,
    body: Incoming,
) -> Result<FileMeta, ApiError> {
    let mut upload = session.upload(vm, path, mode, parents).await?;
    match feed(&mut upload, path, expected, body).await {
        Ok(()) => Ok(file_meta(path, upload.finish().await?)),
        Err(e) => {
            // The plugin drops its half-written temporary file: the target is untouched.
            upload.abort().await;
            Err(e)
        }
    }
}

/// Feeds a request body into an upload, chunk by chunk, and checks the client's
/// checksum when it sent one.
async fn feed(
    upload: &mut crate::plugin::transfer::Upload,
    path: &str,
    expected: Option<String>,
    body: Incoming,
) -> Result<(), ApiError> {
    let (got, _) = super::pieces::pieces(body, path, CHUNK, upload).await?;
    match expected {
        Some(want) if !want.eq_ignore_ascii_case(&got) => Err(ApiError::bad_request(format!(
            "the content received for {path} has SHA-256 {got}, the request said {want}; nothing was written"
        ))),
        _ => Ok(()),
    }
}

impl super::pieces::Sink for crate::plugin::transfer::Upload {
    async fn put(&mut self, _at: u64, piece: &[u8]) -> Result<(), ApiError> {
        Ok(self.write(piece).await?)
    }
}

fn file_meta(path: &str, info: FileInfo) -> FileMeta {
    FileMeta {
        path: path.to_string(),
        size: info.size,
        mode: info.mode,
        sha256: info.sha256,
    }
}

/// The API form of a command's end.
pub fn exec_output(r: ExecResult) -> ExecOutput {
    ExecOutput {
        exit_code: r.exit_code,
        signal: r.signal,
        timed_out: r.timed_out,
        stdout_b64: B64.encode(&r.stdout),
        stderr_b64: B64.encode(&r.stderr),
        stdout_truncated: r.stdout_truncated,
        stderr_truncated: r.stderr_truncated,
    }
}
