//! The agent's guest API: commands, files and software inside running VMs.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | /v1/vms/{id}/exec | `ExecBody` | 202 `Operation` (output: `exec`) |
//! | POST | /v1/vms/{id}/provision | `{"bundle", "timeout-ms"}` | 202 `Operation` (output: `provision`) |
//! | PUT | /v1/vms/{id}/files?path=P&mode=0644&parents=true | the file's bytes | `FileMeta` |
//! | GET | /v1/vms/{id}/files?path=P | | the file's bytes |
//! | GET | /v1/vms/{id}/stat?path=P | | `FileMeta` |
//! | GET | /v1/vms/{id}/ready?wait-ms=N | | `Readiness`: the guest agent answers |
//!
//! `PUT` takes an optional `X-Gve-Sha256` header: content whose SHA-256 differs is
//! not written. `GET .../files` answers with `Content-Length`, `X-Gve-File-Mode`
//! (octal); its body is cut (the connection closed) if the guest plugin finds the
//! content changed while it was read. Copies are recorded as `copy-in` operations.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use super::guest::ExecBody;
use super::model::VmRecord;
use super::ops::OpParams;
use super::AgentCore;
use crate::api::{ok, query_param, read_json, ApiError, Response};

/// Header carrying a file's SHA-256 (upload: what the client sent).
pub const SHA256_HEADER: &str = "x-gve-sha256";
/// Header carrying a file's mode, octal (download).
pub const MODE_HEADER: &str = "x-gve-file-mode";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ProvisionBody {
    bundle: String,
    #[serde(default)]
    timeout_ms: Option<u32>,
}

fn required_path(req: &Request<Incoming>) -> Result<String, ApiError> {
    query_param(req.uri(), "path")?
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("query parameter path (the guest file) is required"))
}

fn parse_mode(v: Option<String>) -> Result<u32, ApiError> {
    crate::api::parse_mode(v.as_deref())
}

impl AgentCore {
    /// Audits guest action `action` on `rec`. For a request that starts an
    /// operation (`submitted`), the entry reaches the disk with the operation's
    /// record, before the answer (`submit_keyed` syncs), not in a commit of its
    /// own first.
    fn audit_guest(
        &self,
        action: &str,
        rec: &VmRecord,
        detail: serde_json::Value,
        submitted: bool,
    ) -> Result<(), ApiError> {
        let r = &self.registry;
        match submitted {
            true => r.audit_lazy(action, &rec.vm.id, detail),
            false => r.audit(action, &rec.vm.id, detail),
        }
        .map_err(registry)
    }

    /// Serves the guest routes of VM `rec`; `action` is the last path segment.
    pub async fn handle_guest(
        self: &Arc<Self>,
        req: Request<Incoming>,
        rec: VmRecord,
        action: &str,
        key: Option<String>,
    ) -> Result<Response, ApiError> {
        let method = req.method().clone();
        match (method, action) {
            (Method::POST, "exec") => {
                Self::require_running(&rec, "exec")?;
                let body: ExecBody = read_json(req.into_body()).await?;
                let body = self.check_exec(body)?;
                self.audit_guest(
                    "vm.exec",
                    &rec,
                    serde_json::json!({
                        "argv": body.argv, "cwd": body.cwd,
                        "env-names": body.env.keys().collect::<Vec<_>>(),
                    }),
                    true,
                )?;
                let op = self
                    .submit_keyed(&rec.vm.id, OpParams::Exec(Box::new(body)), key.as_deref())
                    .await
                    .map_err(registry)?;
                Ok(super::vms_api::accepted_op(&op))
            }
            (Method::POST, "provision") => {
                Self::require_running(&rec, "provision")?;
                let body: ProvisionBody = read_json(req.into_body()).await?;
                let ceiling = self.guest()?.command_ceiling_ms();
                let timeout = u64::from(body.timeout_ms.unwrap_or(ceiling.min(600_000) as u32));
                if timeout == 0 || timeout > ceiling {
                    return Err(ApiError::bad_request(format!(
                        "timeout-ms must be between 1 and {ceiling} (the guest plugin's call budget less its exec margin)"
                    )));
                }
                // Refuse unknown or unreadable bundles before an operation exists.
                let core = self.clone();
                let name = body.bundle.clone();
                tokio::task::spawn_blocking(move || core.bundle(&name))
                    .await
                    .map_err(|e| {
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
                    })??;
                self.audit_guest(
                    "vm.provision",
                    &rec,
                    serde_json::json!({ "bundle": body.bundle }),
                    true,
                )?;
                let op = self
                    .submit_keyed(
                        &rec.vm.id,
                        OpParams::Provision {
                            bundle: body.bundle,
                            timeout_ms: timeout as u32,
                        },
                        key.as_deref(),
                    )
                    .await
                    .map_err(registry)?;
                Ok(super::vms_api::accepted_op(&op))
            }
            (Method::PUT, "files") => {
                let path = required_path(&req)?;
                let mode = parse_mode(query_param(req.uri(), "mode")?)?;
                let parents = match query_param(req.uri(), "parents")?.as_deref() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(v) => {
                        return Err(ApiError::bad_request(format!(
                            "parents must be true or false, not '{v}'"
                        )))
                    }
                };
                let expected = req
                    .headers()
                    .get(SHA256_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                self.audit_guest(
                    "vm.copy-in",
                    &rec,
                    serde_json::json!({ "path": path, "mode": format!("{mode:04o}") }),
                    false,
                )?;
                let meta = self
                    .copy_in(&rec, &path, mode, parents, expected, req.into_body())
                    .await?;
                ok(&meta)
            }
            (Method::GET, "files") => {
                let path = required_path(&req)?;
                self.audit_guest(
                    "vm.copy-out",
                    &rec,
                    serde_json::json!({ "path": path }),
                    false,
                )?;
                let (size, mode, body) = self.copy_out(&rec, &path).await?;
                hyper::Response::builder()
                    .status(StatusCode::OK)
                    .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
                    .header(hyper::header::CONTENT_LENGTH, size)
                    .header(MODE_HEADER, format!("{mode:04o}"))
                    .body(body)
                    .map_err(|e| {
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
                    })
            }
            (Method::GET, "stat") => {
                let path = required_path(&req)?;
                ok(&self.stat(&rec, &path).await?)
            }
            (Method::GET, "ready") => {
                Self::require_running(&rec, "wait for its guest agent")?;
                let wait = query_param(req.uri(), "wait-ms")?;
                ok(&self.handle_ready(&rec.vm.id, wait).await?)
            }
            (m, _) => Err(ApiError::no_route(&m, req.uri().path())),
        }
    }
}

fn registry(e: super::registry::RegistryError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
}
