//! VMs and jobs (`/v1/vms...`, `/v1/templates`, `/v1/jobs...`). Everything that
//! changes a VM answers `202` with a job at once (`Location` names it; sent with
//! `?wait-ms=N`, the answer waits up to N ms for its end, then 200 with it);
//! `GET /v1/jobs/{id}` polls it (`?wait-ms=N` long-polls its end),
//! `GET /v1/jobs/{id}/events` streams its changes (server-sent events) and
//! `GET /v1/jobs/{id}/result` fetches what it produced. Users see only their own
//! VMs and jobs; others' answer 404.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use super::agents::db;
use super::auth::Caller;
use super::jobs::{new_job, redacted};
use super::model::{AgentStatus, Job, JobKind, JobState, Usage, VmRequest};
use super::SiteCore;
use crate::api::page::{next_path, ok_page, page_query};
use crate::api::{ok, query_param, query_u64, read_json, ApiError, Response, MAX_WAIT_MS};

/// Where a job is followed (`Location` of a 202).
const JOBS: &str = "/v1/jobs/";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RenewBody {
    #[serde(default)]
    seconds: Option<u64>,
}

fn not_found(what: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", what)
}

impl SiteCore {
    fn job_for(&self, caller: &Caller, id: &str) -> Result<Job, ApiError> {
        self.store
            .job(id)
            .map_err(db)?
            .filter(|j| caller.may_see(Some(&j.owner)))
            .ok_or_else(|| not_found(format!("no job '{id}' of yours")))
    }

    /// Holds an exec's or provision's time budget to the site's policy: a longer
    /// `timeout-ms` is refused; without one, the agent's default (60 s) applies
    /// unless the policy is shorter. An exec's `output-limit` is lowered to the
    /// site's `max-output-kib`.
    fn cap_exec_budget(&self, params: &mut serde_json::Value) -> Result<(), ApiError> {
        let cap_ms = self.config.max_exec_seconds.saturating_mul(1000);
        match params.get("timeout-ms").and_then(serde_json::Value::as_u64) {
            Some(t) if t > cap_ms => Err(ApiError::bad_request(format!(
                "timeout-ms {t} is over this site's limit of {} s for a command \
                 (max-exec-seconds)",
                self.config.max_exec_seconds
            ))),
            Some(_) => Ok(()),
            None => {
                if cap_ms < 60_000 {
                    params["timeout-ms"] = serde_json::Value::from(cap_ms);
                }
                Ok(())
            }
        }?;
        // What a job keeps of a command's output is capped too: beyond it the
        // agent cuts the output and flags it truncated.
        if params.get("argv").is_none() {
            return Ok(());
        }
        let cap = u64::from(self.config.max_output_kib) * 1024;
        let asked = params
            .get("output-limit")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(1 << 20);
        if asked > cap {
            params["output-limit"] = serde_json::Value::from(cap);
        }
        Ok(())
    }

    fn accepted(job: &Job) -> Result<Response, ApiError> {
        let at = format!("{JOBS}{}", job.id);
        Ok(crate::api::accepted_at(&redacted(job.clone()), &at))
    }

    /// Serves `/v1/vms...` and `/v1/templates`. A request that submits a job,
    /// sent with `?wait-ms=N` (N ≤ 60000), is answered when the job ends (200
    /// with it) or after N ms (202 with it): one request instead of a
    /// submission and a long poll.
    pub async fn handle_vms(
        self: &Arc<Self>,
        caller: &Caller,
        req: Request<Incoming>,
        segs: &[&str],
    ) -> Result<Response, ApiError> {
        // Every change but a lease's renewal (answered at once) is a job.
        let wait = match (req.method(), segs) {
            (&Method::GET, _) | (_, ["v1", "vms", _, "renew"]) => 0,
            _ => query_u64(req.uri(), "wait-ms", 0, 0, MAX_WAIT_MS)?,
        };
        let resp = self.route_vms(caller, req, segs).await?;
        match crate::api::accepted_id(&resp, JOBS) {
            // A wait that fails still answers what was queued: the 202.
            Some(id) if wait > 0 => match self.job_waiting(caller, &id, wait).await {
                Ok(job) if job.state.is_terminal() => ok(&redacted(job)),
                Ok(job) => Self::accepted(&job),
                Err(_) => Ok(resp),
            },
            _ => Ok(resp),
        }
    }

    async fn route_vms(
        self: &Arc<Self>,
        caller: &Caller,
        req: Request<Incoming>,
        segs: &[&str],
    ) -> Result<Response, ApiError> {
        let method = req.method().clone();
        match (method, segs) {
            (Method::GET, ["v1", "templates"]) => {
                let names: BTreeSet<String> = self
                    .store
                    .agents()
                    .map_err(db)?
                    .into_iter()
                    .filter(|a| a.status == AgentStatus::Up)
                    .flat_map(|a| a.templates)
                    .collect();
                ok(&names)
            }
            (Method::GET, ["v1", "vms"]) => {
                let all =
                    caller.is_admin() && query_param(req.uri(), "all")?.as_deref() == Some("true");
                let (limit, after) = page_query(req.uri(), "after")?;
                let owner = (!all).then_some(caller.name.as_str());
                let page = self
                    .store
                    .vms_page(owner, after.as_deref(), limit as usize)
                    .map_err(db)?;
                let last = page.items.last().map(|j| j.id.as_str());
                let next = next_path("/v1/vms", "after", last, page.more, limit, all);
                let vms: Vec<_> = page
                    .items
                    .into_iter()
                    .map(|v| super::vms::view(self, v))
                    .collect();
                ok_page(&vms, next)
            }
            (Method::POST, ["v1", "vms"]) => {
                let req: VmRequest = read_json(req.into_body()).await?;
                let job = self.request_job(caller, req)?;
                let quota = self.store.user(&caller.name).map_err(db)?.map(|u| u.quota);
                let job = self.submitter.submit(job, quota).await?;
                Self::accepted(&job)
            }
            (Method::GET, ["v1", "vms", id]) => {
                ok(&super::vms::view(self, self.vm_for(caller, id, "show")?))
            }
            (Method::PUT, ["v1", "vms", id, "files"]) => {
                let job = self.copy_in_request(caller, id, req).await?;
                Self::accepted(&job)
            }
            (Method::POST, ["v1", "vms", id, "copy-out"]) => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct CopyOut {
                    path: String,
                }
                let body: CopyOut = read_json(req.into_body()).await?;
                let job = self.copy_out_request(caller, id, body.path).await?;
                Self::accepted(&job)
            }
            (Method::POST, ["v1", "vms", id, "renew"]) => {
                let body: RenewBody = crate::agent::vms_api::body_or_default(req).await?;
                ok(&self.renew(caller, id, body.seconds)?)
            }
            (Method::POST, ["v1", "vms", id, action]) => {
                let kind = match *action {
                    "start" => JobKind::Start,
                    "shutdown" => JobKind::Shutdown,
                    "suspend" => JobKind::Suspend,
                    "resume" => JobKind::Resume,
                    "migrate" => JobKind::Migrate,
                    "clone" => JobKind::Clone,
                    "exec" => JobKind::Exec,
                    "provision" => JobKind::Provision,
                    "release" => JobKind::Release,
                    other => {
                        return Err(ApiError::no_route(
                            &Method::POST,
                            &format!("/v1/vms/{id}/{other}"),
                        ))
                    }
                };
                let vm = self.vm_for(caller, id, action)?;
                if vm.owner.is_none() {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid-state",
                        format!("VM {id} is free: request it first"),
                    ));
                }
                let body = crate::api::read_small_body(req.into_body()).await?;
                let mut params = super::bodies::check(kind, &body)?;
                if matches!(kind, JobKind::Exec | JobKind::Provision) {
                    self.cap_exec_budget(&mut params)?;
                }
                let agent = self.store.agent(&vm.agent).map_err(db)?;
                if kind != JobKind::Release
                    && agent.as_ref().is_none_or(|a| a.status != AgentStatus::Up)
                {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        format!(
                            "agent {} of VM {id} is down; its state is unknown",
                            vm.agent
                        ),
                    ));
                }
                let mut quota = None;
                let mut job = new_job(
                    vm.owner.as_deref().unwrap_or(&caller.name),
                    kind,
                    Some(vm.id.clone()),
                    params,
                );
                match kind {
                    JobKind::Clone => {
                        job.reserved = Usage::vm(u64::from(vm.logical_cpus), vm.main_memory_mib);
                        quota = self.store.user(&job.owner).map_err(db)?.map(|u| u.quota);
                    }
                    JobKind::Migrate => {
                        let to = job.params["to"].as_str().unwrap_or_default().to_string();
                        let dest =
                            self.store.agent(&to).map_err(db)?.ok_or_else(|| {
                                not_found(format!("no agent '{to}' to migrate to"))
                            })?;
                        if dest.id == vm.agent {
                            return Err(ApiError::bad_request(format!(
                                "VM {id} is on agent {to} already"
                            )));
                        }
                    }
                    _ => {}
                }
                // Commands in guests, and anything an admin does to another's VM.
                let audit = (matches!(kind, JobKind::Exec | JobKind::Provision)
                    || job.owner != caller.name)
                    .then(|| {
                        super::jobs::audit_entry(
                            &caller.name,
                            &format!("vm.{}", kind.as_str()),
                            &vm.id,
                            super::jobs::audit_detail(&job.params),
                        )
                    });
                let job = self.submitter.submit_audited(job, quota, audit).await?;
                Self::accepted(&job)
            }
            (m, _) => Err(ApiError::no_route(&m, req.uri().path())),
        }
    }

    /// Serves `/v1/jobs...`.
    pub async fn handle_jobs(
        self: &Arc<Self>,
        caller: &Caller,
        req: Request<Incoming>,
        segs: &[&str],
    ) -> Result<Response, ApiError> {
        let method = req.method().clone();
        match (method, segs) {
            (Method::GET, ["v1", "jobs"]) => {
                let (limit, before) = page_query(req.uri(), "before")?;
                let all =
                    caller.is_admin() && query_param(req.uri(), "all")?.as_deref() == Some("true");
                let owner = (!all).then_some(caller.name.as_str());
                let page = self
                    .store
                    .jobs(owner, limit as usize, before.as_deref())
                    .map_err(db)?;
                let last = page.items.last().map(|j| j.id.as_str());
                let next = next_path("/v1/jobs", "before", last, page.more, limit, all);
                let jobs: Vec<_> = page.items.into_iter().map(redacted).collect();
                ok_page(&jobs, next)
            }
            (Method::GET, ["v1", "jobs", id]) => {
                let wait = query_u64(req.uri(), "wait-ms", 0, 0, MAX_WAIT_MS)?;
                ok(&redacted(self.job_waiting(caller, id, wait).await?))
            }
            (Method::GET, ["v1", "jobs", id, "result"]) => {
                let job = self.job_for(caller, id)?;
                match job.state {
                    JobState::Succeeded => ok(&job.result.unwrap_or(Value::Null)),
                    // The job failed, not this request: 409, with the job's own
                    // error kind so a client can tell why.
                    JobState::Failed => {
                        let e = job.error.unwrap_or_else(|| super::model::OpError {
                            kind: "backend".into(),
                            message: "failed".into(),
                        });
                        Err(ApiError::new(
                            StatusCode::CONFLICT,
                            &e.kind,
                            format!("job {id} failed: {}", e.message),
                        ))
                    }
                    JobState::Cancelled => Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid-state",
                        format!("job {id} was cancelled"),
                    )),
                    JobState::Queued | JobState::Running => Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid-state",
                        format!(
                            "job {id} is {}: no result yet",
                            if job.state == JobState::Queued {
                                "queued"
                            } else {
                                "running"
                            }
                        ),
                    )),
                }
            }
            (Method::GET, ["v1", "jobs", id, "content"]) => {
                let job = self.job_for(caller, id)?;
                self.copy_out_content(&job).await
            }
            (Method::POST, ["v1", "jobs", id, "cancel"]) => {
                let job = self.job_for(caller, id)?;
                if job.kind == JobKind::Expire && !caller.is_admin() {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "denied",
                        format!(
                            "job {id} stops a VM whose lease expired: only an admin can cancel it"
                        ),
                    ));
                }
                let cancelled = self.cancel(id)?;
                self.audit(&caller.name, "job.cancel", id, Value::Null)
                    .await?;
                ok(&redacted(cancelled))
            }
            (Method::GET, ["v1", "jobs", id, "events"]) => {
                let job = self.job_for(caller, id)?;
                let after = req
                    .headers()
                    .get("last-event-id")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                Ok(self.event_stream(job, after))
            }
            (m, _) => Err(ApiError::no_route(&m, req.uri().path())),
        }
    }

    /// A job; with `wait_ms`, answers once it has ended or after that long.
    async fn job_waiting(&self, caller: &Caller, id: &str, wait_ms: u64) -> Result<Job, ApiError> {
        let mut events = self.store.subscribe();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
        loop {
            let job = self.job_for(caller, id)?;
            if job.state.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(job);
            }
            loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Ok(ev)) if ev.job == id && ev.state.is_terminal() => break,
                    Ok(Ok(_)) => continue,
                    Err(_) | Ok(Err(_)) => break,
                }
            }
        }
    }

    /// A server-sent event stream of one job's changes after event `after` (the
    /// client's `Last-Event-ID`): the past ones, then live ones, ending after the
    /// terminal one; a keep-alive comment every 15 s.
    fn event_stream(self: &Arc<Self>, job: Job, after: u64) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
        let core = self.clone();
        tokio::spawn(async move {
            let mut live = core.store.subscribe();
            let mut last = after;
            let frame = |ev: &super::model::JobEvent| {
                let data = serde_json::to_string(ev).unwrap_or_default();
                Ok(Frame::data(Bytes::from(format!(
                    "id: {}\nevent: job\ndata: {data}\n\n",
                    ev.seq
                ))))
            };
            // Past events (also what a lagging subscriber missed); true once terminal.
            let replay = |last: &mut u64| {
                let evs = core
                    .store
                    .events_after(*last, 100_000, Some(&job.id))
                    .unwrap_or_default();
                if let Some(ev) = evs.last() {
                    *last = ev.seq;
                }
                evs
            };
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(15));
            ticker.tick().await;
            let mut pending = replay(&mut last);
            loop {
                for ev in pending.drain(..) {
                    if tx.send(frame(&ev)).await.is_err() || ev.state.is_terminal() {
                        return;
                    }
                }
                // A job whose events were trimmed away still ends the stream.
                if core
                    .store
                    .job(&job.id)
                    .ok()
                    .flatten()
                    .is_none_or(|j| j.state.is_terminal())
                    && core
                        .store
                        .events_after(last, 1, Some(&job.id))
                        .unwrap_or_default()
                        .is_empty()
                {
                    return;
                }
                tokio::select! {
                    // The client left: stop at once, not at the next event or tick.
                    _ = tx.closed() => return,
                    _ = ticker.tick() => {
                        if tx.send(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n")))).await.is_err() {
                            return;
                        }
                    }
                    got = live.recv() => match got {
                        Ok(ev) if ev.job == job.id && ev.seq > last => {
                            last = ev.seq;
                            pending.push(ev);
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => pending = replay(&mut last),
                        Err(_) => return,
                    },
                }
            }
        });
        hyper::Response::builder()
            .status(StatusCode::OK)
            .header(hyper::header::CONTENT_TYPE, "text/event-stream")
            .header(hyper::header::CACHE_CONTROL, "no-cache")
            .body(crate::api::channel_body(rx))
            .unwrap_or_else(|_| {
                ApiError::bad_request("cannot build the event stream").into_response()
            })
    }
}
