//! File copies through the site, as jobs like every other change. A copy in is
//! first received whole into the site's staging directory (checked against the
//! client's SHA-256), then a job streams it to the VM's agent; a copy out is a job
//! that streams the file from the agent into staging, from where the user fetches
//! it (`GET /v1/jobs/{id}/content`). Memory stays flat: everything moves in chunks.
//! Staged inputs are removed when their job ends; anything else after
//! `copy-output-retention-seconds` (a day unless configured).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::agents::agent_error;
use super::auth::Caller;
use super::jobs::new_job;
use super::model::{Job, JobKind, JobState, OpError};
use super::SiteCore;
use crate::api::{query_param, ApiError, Response};

/// Bytes read or written at a time.
const CHUNK: usize = 1 << 20;

fn io_err(what: &str, e: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "backend",
        format!("{what}: {e}"),
    )
}

impl SiteCore {
    fn staging(&self) -> PathBuf {
        self.config.data_dir.join("staging")
    }

    /// The largest file a copy may stage, bytes.
    fn copy_cap(&self) -> u64 {
        self.config.max_copy_mib.saturating_mul(1 << 20)
    }

    /// A copy-in's staged file.
    pub fn staged_in(&self, job: &str) -> PathBuf {
        self.staging().join(format!("{job}.in"))
    }

    /// A copy-out's staged file.
    pub fn staged_out(&self, job: &str) -> PathBuf {
        self.staging().join(format!("{job}.out"))
    }

    /// `PUT /v1/vms/{id}/files?path=&mode=&parents=`: stages the body, then queues
    /// the copy-in job.
    pub async fn copy_in_request(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        req: Request<Incoming>,
    ) -> Result<Job, ApiError> {
        let vm = self.vm_for(caller, id, "copy-in")?;
        // A staged file must not take the site's last free space.
        self.disk.check()?;
        if vm.owner.is_none() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid-state",
                format!("VM {id} is free: request it first"),
            ));
        }
        let path = query_param(req.uri(), "path")?
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| {
                ApiError::bad_request("query parameter path must be an absolute guest path")
            })?;
        let mode = format!(
            "{:04o}",
            crate::api::parse_mode(query_param(req.uri(), "mode")?.as_deref())?
        );
        if path.len() > 4096 || path.contains('\0') {
            return Err(ApiError::bad_request(
                "path must be at most 4096 bytes without NUL",
            ));
        }
        let parents = query_param(req.uri(), "parents")?.as_deref() == Some("true");
        let expected = req
            .headers()
            .get("x-gve-sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_lowercase);
        let owner = vm.owner.clone().unwrap_or_else(|| caller.name.clone());
        let job = new_job(
            &owner,
            JobKind::CopyIn,
            Some(vm.id.clone()),
            json!({ "path": path, "mode": mode, "parents": parents }),
        );
        crate::private_fs::private_dir_async(self.staging())
            .await
            .map_err(|e| io_err("staging directory", e))?;
        let file = self.staged_in(&job.id);
        let cap = self.copy_cap();
        let announced = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // A body a little over a limit is read first, so the connection stays
        // usable (a pooled client reusing it would otherwise write into a socket
        // the server is closing); a far larger one is cut.
        if announced.is_some_and(|n| n > cap) {
            drain(&mut req.into_body(), DRAIN_BYTES).await;
            return Err(too_large(cap));
        }
        if let Err(full) = announced.map_or(Ok(()), |n| self.staging.fits(&owner, n)) {
            drain(&mut req.into_body(), DRAIN_BYTES).await;
            return Err(full.to_api());
        }
        // The rest runs on its own task: hyper drops a handler whose client
        // closes after sending the whole body, and a staged file (its bytes on
        // the owner's books) must then be either queued as a job or removed,
        // never left behind.
        let (core, body, caller, vm) = (self.clone(), req.into_body(), caller.name.clone(), vm.id);
        let staged = async move {
            let into = Staged {
                file: &file,
                cap,
                books: &core.staging,
                owner: &owner,
            };
            let received = receive(body, into).await;
            let (size, sha) = match received {
                Ok(r) => r,
                Err(e) => {
                    core.staging.remove(&file).await;
                    return Err(e);
                }
            };
            if let Some(want) = expected.filter(|w| *w != sha) {
                core.staging.remove(&file).await;
                return Err(ApiError::bad_request(format!(
                    "the content received has SHA-256 {sha}, the request said {want}; nothing was copied"
                )));
            }
            let mut job = job;
            job.params["size"] = json!(size);
            job.params["sha256"] = json!(sha);
            let audit = super::jobs::audit_entry(
                &caller,
                "vm.copy-in",
                &vm,
                super::jobs::audit_detail(&job.params),
            );
            match core.submitter.submit_audited(job, None, Some(audit)).await {
                Ok(j) => Ok(j),
                Err(e) => {
                    core.staging.remove(&file).await;
                    Err(e)
                }
            }
        };
        crate::api::detached("copy-in staging", staged).await
    }

    /// The copy-in job: streams the staged file to the VM's agent.
    pub async fn run_copy_in(&self, job: &Job) -> Result<Value, OpError> {
        let (_, v) = self.job_vm(job)?;
        let staged = self.staged_in(&job.id);
        // The staged file is removed once this job's end is durable (run_job).
        let file = tokio::fs::File::open(&staged).await.map_err(|e| OpError {
            kind: "backend".into(),
            message: format!("the staged copy of job {} is gone: {e}", job.id),
        })?;
        {
            let c = self
                .agents
                .client(&v.agent)
                .map_err(|e| agent_error(&v.agent, e))?;
            let p = &job.params;
            let path = format!(
                "/v1/vms/{}/files?path={}&mode={}&parents={}",
                v.agent_vm,
                crate::api::percent_encode(p["path"].as_str().unwrap_or_default()),
                p["mode"].as_str().unwrap_or("0644"),
                p["parents"].as_bool().unwrap_or(false)
            );
            // The length lets the agent choose a staged disk for a large copy.
            let size = file
                .metadata()
                .await
                .map(|m| m.len())
                .map_err(|e| OpError {
                    kind: "backend".into(),
                    message: format!("the staged copy of job {}: {e}", job.id),
                })?;
            let headers = [
                (
                    "x-gve-sha256",
                    p["sha256"].as_str().unwrap_or_default().to_string(),
                ),
                ("content-length", size.to_string()),
            ];
            c.put_stream::<Value>(&path, &headers, file_body(file, true))
                .await
                .map_err(|e| agent_error(&v.agent, e))
        }
    }

    /// The copy-out job: streams the file from the VM's agent into staging.
    pub async fn run_copy_out(&self, job: &Job) -> Result<Value, OpError> {
        let (id, v) = self.job_vm(job)?;
        let guest_path = job.params["path"].as_str().unwrap_or_default().to_string();
        let c = self
            .agents
            .client(&v.agent)
            .map_err(|e| agent_error(&v.agent, e))?;
        let resp = c
            .get_stream(&format!(
                "/v1/vms/{}/files?path={}",
                v.agent_vm,
                crate::api::percent_encode(&guest_path)
            ))
            .await
            .map_err(|e| agent_error(&v.agent, e))?;
        let mode = resp
            .headers()
            .get("x-gve-file-mode")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("0644")
            .to_string();
        crate::private_fs::private_dir_async(self.staging())
            .await
            .map_err(|e| OpError {
                kind: "backend".into(),
                message: format!("staging directory: {e}"),
            })?;
        let out = self.staged_out(&job.id);
        let into = Staged {
            file: &out,
            cap: self.copy_cap(),
            books: &self.staging,
            owner: &job.owner,
        };
        let received = receive(resp.into_body(), into).await;
        if received.is_err() {
            self.staging.remove(&out).await;
        }
        let (size, sha) = received.map_err(|e| OpError {
            kind: e.kind,
            message: format!("copying {guest_path} out of {id}: {}", e.message),
        })?;
        Ok(json!({ "path": guest_path, "size": size, "mode": mode, "sha256": sha }))
    }

    /// `GET /v1/jobs/{id}/content`: the file a finished copy-out fetched.
    pub async fn copy_out_content(&self, job: &Job) -> Result<Response, ApiError> {
        if job.kind != JobKind::CopyOut || job.state != JobState::Succeeded {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid-state",
                format!("job {} is not a finished copy-out", job.id),
            ));
        }
        let file = tokio::fs::File::open(self.staged_out(&job.id))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("the content of job {} is no longer kept", job.id),
                )
            })?;
        let r = job.result.clone().unwrap_or_default();
        hyper::Response::builder()
            .status(StatusCode::OK)
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .header(
                hyper::header::CONTENT_LENGTH,
                r["size"].as_u64().unwrap_or(0),
            )
            .header("x-gve-file-mode", r["mode"].as_str().unwrap_or("0644"))
            .header("x-gve-sha256", r["sha256"].as_str().unwrap_or(""))
            .body(file_body(file, false))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string()))
    }

    /// Removes staged files older than `copy-output-retention-seconds`.
    pub async fn sweep_staging(&self) {
        let keep = Duration::from_secs(self.config.copy_output_retention_seconds);
        let Ok(mut dir) = tokio::fs::read_dir(self.staging()).await else {
            return;
        };
        while let Ok(Some(entry)) = dir.next_entry().await {
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > keep);
            // Outputs nobody fetched, and inputs of jobs cancelled before they ran.
            if old {
                self.staging.remove(&entry.path()).await;
            }
        }
    }

    /// Starts a copy-out job of `path` from VM `id`.
    pub async fn copy_out_request(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        path: String,
    ) -> Result<Job, ApiError> {
        let vm = self.vm_for(caller, id, "copy-out")?;
        if vm.owner.is_none() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid-state",
                format!("VM {id} is free: request it first"),
            ));
        }
        if !path.starts_with('/') {
            return Err(ApiError::bad_request("path must be an absolute guest path"));
        }
        if path.len() > 4096 || path.contains('\0') {
            return Err(ApiError::bad_request(
                "path must be at most 4096 bytes without NUL",
            ));
        }
        let audit =
            super::jobs::audit_entry(&caller.name, "vm.copy-out", &vm.id, json!({ "path": path }));
        let job = new_job(
            vm.owner.as_deref().unwrap_or(&caller.name),
            JobKind::CopyOut,
            Some(vm.id),
            json!({ "path": path }),
        );
        self.submitter.submit_audited(job, None, Some(audit)).await
    }
}

/// How much of an oversized body is read (and dropped) before the 413.
const DRAIN_BYTES: usize = 1 << 20;

/// The answer to a copy over the site's limit.
fn too_large(cap: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid-argument",
        format!("the file is larger than this site's copy limit of {cap} bytes"),
    )
}

/// Reads and drops up to `limit` more bytes of `body`, so a client that overshot a
/// little has sent its whole body and reads the 413 instead of a reset.
async fn drain<B>(body: &mut B, limit: usize)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut extra = 0usize;
    while extra < limit {
        match crate::api::next_frame(body).await {
            Some(Ok(f)) => extra += f.into_data().map(|d| d.len()).unwrap_or(0),
            _ => break,
        }
    }
}

/// Where a transfer is staged, and the limits it is held to.
struct Staged<'a> {
    file: &'a std::path::Path,
    /// The site's copy limit, bytes.
    cap: u64,
    books: &'a super::staging::Staging,
    /// Whose staging quota it counts toward.
    owner: &'a str,
}

/// Writes a body to its staged file chunk by chunk, counting it in the staging
/// books; returns its size and SHA-256.
async fn receive<B>(mut body: B, into: Staged<'_>) -> Result<(u64, String), ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let Staged {
        file,
        cap,
        books,
        owner,
    } = into;
    let mut out = tokio::fs::File::create(file)
        .await
        .map_err(|e| io_err("staging file", e))?;
    let (mut size, mut h) = (0u64, Sha256::new());
    while let Some(frame) = crate::api::next_frame(&mut body).await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("the transfer stopped after {size} bytes: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            h.update(&data);
            size += data.len() as u64;
            if size > cap {
                drain(&mut body, DRAIN_BYTES).await;
                return Err(too_large(cap));
            }
            if let Err(full) = books.take(owner, file, data.len() as u64) {
                drain(&mut body, DRAIN_BYTES).await;
                return Err(full.to_api());
            }
            out.write_all(&data)
                .await
                .map_err(|e| io_err("staging file", e))?;
        }
    }
    out.sync_all()
        .await
        .map_err(|e| io_err("staging file", e))?;
    Ok((size, hex::encode(h.finalize())))
}

/// A body that streams a file in chunks: a response (cut when its client stops
/// reading) or a request to an agent.
fn file_body(mut file: tokio::fs::File, request: bool) -> crate::api::Body {
    let (feed, body) = match request {
        true => crate::api::request_feed(),
        false => crate::api::feed(),
    };
    tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if !feed.data(Bytes::from(buf)).await {
                        break;
                    }
                }
                Err(e) => {
                    feed.fail(e.to_string()).await;
                    break;
                }
            }
        }
    });
    body
}
