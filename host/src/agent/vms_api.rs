//! The agent's VM API (JSON over HTTP). Long operations answer `202 Accepted` with an
//! operation at once; `GET /v1/operations/{id}` follows it to its end.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/host | | `Host` |
//! | GET | /v1/driver | | `{"plugin", "endpoint", "migration-uri", "guest"}` (migrations to this host target `migration-uri`) |
//! | GET | /v1/vms | | `[VmRecord]` |
//! | GET | /v1/vms/{id} | | `VmRecord` |
//! | POST | /v1/vms | `Profile` | 202 `Operation` (create) |
//! | POST | /v1/vms/{id}/start, suspend, resume, destroy | | 202 `Operation` |
//! | POST | /v1/vms/{id}/shutdown | `{"force": bool}` | 202 `Operation` |
//! | POST | /v1/vms/{id}/clone | `{"name", "linked"}` | 202 `Operation` |
//! | POST | /v1/vms/{id}/migrate | `{"destination", "live"}` | 202 `Operation` |
//! | POST | /v1/vms/{id}/reserve | `{"holder", "seconds"}` | `VmRecord` |
//! | POST | /v1/vms/{id}/acquire, release | `{"holder"}` | `VmRecord` |
//! | GET | /v1/templates | | `[Vm]` |
//! | GET | /v1/operations, /v1/operations/{id}?wait-ms=N | | `[Operation]`, `Operation` (long poll up to N ≤ 60000 ms for its end) |
//! | GET | /v1/events?after=N&limit=M | | `[Event]` |
//! | POST | /v1/reconcile | | `ReconcileReport` |
//!
//! Every 202 names where its operation is followed (`Location`); a request
//! that starts one, sent with `?wait-ms=N`, waits up to N ms for it to end
//! (then 200 with it).
//!
//! Guest routes (exec, provision, files, stat) are in [`super::guest_api`].
//!
//! A request that cannot succeed (unknown VM, wrong state, bad body) is refused with a
//! 4xx before anything changes. A `POST` with an `Idempotency-Key` header that an
//! earlier request used answers that request's operation and starts nothing (the
//! site retries with the same key after a crash, so nothing runs twice).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use super::model::{now_ms, Allocation, OpState, Operation, Profile, VmRecord, VmState};
use super::ops::OpParams;
use super::AgentCore;
use crate::api::page::{next_path, ok_page};
use crate::api::{ok, read_json, ApiError, Response};
use crate::store_core::Page;

/// Where an operation is followed.
const OPERATIONS: &str = "/v1/operations/";

/// 202 with operation `op`, and where to follow it (`Location`).
pub(crate) fn accepted_op(op: &Operation) -> Response {
    crate::api::accepted_at(op, &format!("{OPERATIONS}{}", op.id))
}

/// Whether `method` on `segs` is a route that starts an operation (the routes
/// that take `?wait-ms`): not reservations, reconcile or the site record,
/// whose answers are not operations (but for a replayed idempotency key).
fn starts_operation(method: &Method, segs: &[&str]) -> bool {
    match (method, segs) {
        (&Method::POST, ["v1", "vms"]) | (&Method::DELETE, ["v1", "vms", _]) => true,
        (&Method::POST, ["v1", "vms", _, action]) => matches!(
            *action,
            "start"
                | "shutdown"
                | "suspend"
                | "resume"
                | "destroy"
                | "clone"
                | "migrate"
                | "exec"
                | "provision"
        ),
        _ => false,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneBody {
    name: String,
    #[serde(default)]
    linked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    destination: String,
    #[serde(default = "yes")]
    live: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HolderBody {
    holder: String,
    #[serde(default)]
    seconds: Option<u64>,
}

/// Longest reservation, seconds (one year).
pub const MAX_RESERVATION_SECONDS: u64 = 365 * 24 * 3600;

/// A registry failure as the API reports it (`500 backend`).
pub(crate) fn registry_error(e: super::registry::RegistryError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
}

/// One page of a listing at `path` in id order: `read(after, limit)` with the
/// query's `after` cursor and `limit` (at most [`crate::api::MAX_LIST`]), and a
/// `Link` to the next page when more follow.
fn paged<T: serde::Serialize>(
    uri: &hyper::Uri,
    path: &str,
    read: impl FnOnce(Option<&str>, usize) -> Result<Page<T>, super::registry::RegistryError>,
    id: impl Fn(&T) -> &str,
) -> Result<Response, ApiError> {
    let (limit, after) = crate::api::page::page_query(uri, "after")?;
    let page = read(after.as_deref(), limit as usize).map_err(registry_error)?;
    let last = page.items.last().map(id);
    let next = next_path(path, "after", last, page.more, limit, false);
    ok_page(&page.items, next)
}

fn conflict(message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "invalid-state", message)
}

/// The `Idempotency-Key` header: at most 200 printable ASCII characters.
pub fn idempotency_key<B>(req: &Request<B>) -> Result<Option<String>, ApiError> {
    let Some(v) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 200 => Ok(Some(k.to_string())),
        _ => Err(ApiError::bad_request(
            "Idempotency-Key must be 1-200 printable ASCII characters",
        )),
    }
}

/// Reads an optional JSON body: empty means `{}`.
pub async fn body_or_default<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    let bytes = crate::api::read_small_body(req.into_body()).await?;
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    crate::api::parse_json(text)
}

impl AgentCore {
    /// A VM (or template) by id or name.
    fn record(&self, id: &str) -> Result<VmRecord, ApiError> {
        if let Some(rec) = self.registry.vm(id).map_err(registry_error)? {
            return Ok(rec);
        }
        let templates = self.registry.templates().map_err(registry_error)?;
        match templates.into_iter().find(|t| t.id == id || t.name == id) {
            Some(vm) => Ok(VmRecord {
                vm,
                allocation: Allocation::Free,
                seen_ms: now_ms(),
                provisioned: Default::default(),
            }),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no VM or template '{id}' on this agent"),
            )),
        }
    }

    async fn accepted(
        self: &Arc<Self>,
        key: &Option<String>,
        vm: &str,
        params: OpParams,
    ) -> Result<Response, ApiError> {
        self.declared(&params)?;
        let op = self
            .submit_keyed(vm, params, key.as_deref())
            .await
            .map_err(registry_error)?;
        Ok(accepted_op(&op))
    }

    /// Refuses at once (501 `unsupported`) an operation the driver does not declare,
    /// rather than accepting it only to fail.
    fn declared(&self, params: &OpParams) -> Result<(), ApiError> {
        use crate::plugin::bindings::types::Capabilities as C;
        let (op, needed) = match params {
            OpParams::Create(_) => ("create", C::CREATE),
            OpParams::Clone { linked: true, .. } => ("clone", C::CLONE | C::LINKED_CLONE),
            OpParams::Clone { .. } => ("clone", C::CLONE),
            OpParams::Start => ("start", C::START),
            OpParams::Shutdown { .. } => ("shutdown", C::SHUTDOWN),
            OpParams::Suspend => ("suspend", C::SUSPEND),
            OpParams::Resume => ("resume", C::RESUME),
            OpParams::Migrate { live: true, .. } => ("migrate", C::MIGRATE | C::LIVE_MIGRATE),
            OpParams::Migrate { .. } => ("migrate", C::MIGRATE),
            OpParams::Destroy => ("destroy", C::DESTROY),
            // Guest operations: checked against the guest provider.
            _ => return Ok(()),
        };
        self.driver
            .require(op, needed)
            .map_err(|e| ApiError::new(StatusCode::NOT_IMPLEMENTED, "unsupported", e.to_string()))
    }

    /// Checks that `rec` is in one of `allowed` states for `action`.
    fn require_state(rec: &VmRecord, action: &str, allowed: &[VmState]) -> Result<(), ApiError> {
        if rec.vm.is_template {
            return Err(conflict(format!(
                "{} is a template; clone it to get a VM",
                rec.vm.name
            )));
        }
        if allowed.contains(&rec.vm.state) {
            Ok(())
        } else {
            Err(conflict(
                format!(
                    "cannot {action} VM {} ({}): it is {:?}",
                    rec.vm.name, rec.vm.id, rec.vm.state
                )
                .to_lowercase(),
            ))
        }
    }

    /// Serves `/v1/...` VM routes; `segs` is the whole path split on `/`. A
    /// request that starts an operation, sent with `?wait-ms=N` (N ≤ 60000), is
    /// answered when the operation ends (200 with it) or after N ms (202 with
    /// it running): one request instead of a submission and a long poll.
    pub async fn handle_vms(
        self: &Arc<Self>,
        req: Request<Incoming>,
        segs: &[&str],
    ) -> Result<Response, ApiError> {
        let wait = match starts_operation(req.method(), segs) {
            true => crate::api::query_u64(req.uri(), "wait-ms", 0, 0, crate::api::MAX_WAIT_MS)?,
            false => 0,
        };
        let resp = self.route_vms(req, segs).await?;
        match crate::api::accepted_id(&resp, OPERATIONS) {
            // A wait that fails (the operation's record unreadable) still
            // answers what was started: the 202.
            Some(id) if wait > 0 => match self.operation_waiting(&id, wait).await {
                Ok(op) if op.state != OpState::Running => ok(&op),
                Ok(op) => Ok(accepted_op(&op)),
                Err(_) => Ok(resp),
            },
            _ => Ok(resp),
        }
    }

    async fn route_vms(
        self: &Arc<Self>,
        req: Request<Incoming>,
        segs: &[&str],
    ) -> Result<Response, ApiError> {
        use VmState::*;
        let method = req.method().clone();
        // A request retried with the idempotency key of one already accepted gets
        // that operation back, whatever the VM's state is now.
        let key = idempotency_key(&req)?;
        if let (&Method::POST, Some(k)) = (&method, &key) {
            if let Some(op) = self.registry.op_by_key(k).map_err(registry_error)? {
                return Ok(accepted_op(&op));
            }
        }
        match (method, segs) {
            (Method::GET, ["v1", "host"]) => {
                ok(&super::model::Host::from(self.driver.host_info().await?))
            }
            (Method::GET, ["v1", "driver"]) => ok(&serde_json::json!({
                "plugin": self.driver.plugin(),
                "endpoint": self.driver.endpoint(),
                "migration-uri": self.migration_uri.as_deref().unwrap_or(self.driver.endpoint()),
                "guest": self.guest.as_ref().ok().map(|g| g.plugin.clone()),
            })),
            (Method::GET, ["v1", "vms"]) => {
                // The tag is read before the page: a change in between makes the
                // tag older than the page, and the client's next look reads again.
                let tag = self.registry.vms_tag().map_err(registry_error)?;
                if crate::api::page::matches_tag(req.headers(), &tag) {
                    return Ok(crate::api::page::not_modified(&tag));
                }
                let mut resp = paged(
                    req.uri(),
                    "/v1/vms",
                    |after, n| self.registry.vms_page(after, n),
                    |v| &v.vm.id,
                )?;
                crate::api::page::set_tag(&mut resp, &tag);
                Ok(resp)
            }
            (Method::GET, ["v1", "vms", id]) => ok(&self.record(id)?),
            (Method::GET, ["v1", "templates"]) => {
                ok(&self.registry.templates().map_err(registry_error)?)
            }
            (Method::GET, ["v1", "operations"]) => paged(
                req.uri(),
                "/v1/operations",
                |after, n| self.registry.operations_page(after, n),
                |o| &o.id,
            ),
            (Method::GET, ["v1", "operations", id]) => {
                let wait =
                    crate::api::query_u64(req.uri(), "wait-ms", 0, 0, crate::api::MAX_WAIT_MS)?;
                ok(&self.operation_waiting(id, wait).await?)
            }
            (Method::GET, ["v1", "events"]) => {
                let after = crate::api::query_u64(req.uri(), "after", 0, 0, u64::MAX)?;
                let limit = crate::api::query_u64(req.uri(), "limit", 1000, 1, 10_000)?;
                ok(&self
                    .registry
                    .events_after(after, limit as usize)
                    .map_err(registry_error)?)
            }
            (Method::POST, ["v1", "reconcile"]) => ok(&self.reconcile().await.map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                )
            })?),
            (Method::POST, ["v1", "vms"]) => {
                let profile: Profile = read_json(req.into_body()).await?;
                profile.validate()?;
                if let Some(t) = &profile.template {
                    let templates = self.registry.templates().map_err(registry_error)?;
                    if !templates.iter().any(|x| x.id == *t || x.name == *t) {
                        return Err(ApiError::new(
                            StatusCode::NOT_FOUND,
                            "not-found",
                            format!("no template '{t}' on this agent"),
                        ));
                    }
                }
                if self
                    .registry
                    .vm(&profile.name)
                    .map_err(registry_error)?
                    .is_some()
                {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "already-exists",
                        format!("a VM named '{}' exists on this agent", profile.name),
                    ));
                }
                let name = profile.name.clone();
                self.accepted(&key, &name, OpParams::Create(Box::new(profile)))
                    .await
            }
            (Method::POST, ["v1", "vms", id, a @ ("exec" | "provision")])
            | (Method::PUT | Method::GET, ["v1", "vms", id, a @ ("files" | "stat")])
            | (Method::GET, ["v1", "vms", id, a @ "ready"]) => {
                let rec = self.record(id)?;
                self.handle_guest(req, rec, a, key).await
            }
            // The REST spelling of `POST /v1/vms/{id}/destroy`: the same operation.
            (Method::DELETE, ["v1", "vms", id]) => {
                let vm = self.record(id)?.vm.id;
                self.accepted(&key, &vm, OpParams::Destroy).await
            }
            (Method::POST, ["v1", "vms", id, action]) => {
                let rec = self.record(id)?;
                let vm = rec.vm.id.clone();
                match *action {
                    "start" => {
                        Self::require_state(&rec, "start", &[Stopped, Crashed])?;
                        self.accepted(&key, &vm, OpParams::Start).await
                    }
                    "shutdown" => {
                        let b: ShutdownBody = body_or_default(req).await?;
                        Self::require_state(&rec, "shut down", &[Running, Paused, Suspended])?;
                        self.accepted(&key, &vm, OpParams::Shutdown { force: b.force })
                            .await
                    }
                    "suspend" => {
                        Self::require_state(&rec, "suspend", &[Running])?;
                        self.accepted(&key, &vm, OpParams::Suspend).await
                    }
                    "resume" => {
                        Self::require_state(&rec, "resume", &[Suspended, Paused])?;
                        self.accepted(&key, &vm, OpParams::Resume).await
                    }
                    "destroy" => self.accepted(&key, &vm, OpParams::Destroy).await,
                    "clone" => {
                        let b: CloneBody = read_json(req.into_body()).await?;
                        super::model::check_vm_name("name", &b.name)?;
                        if self.registry.vm(&b.name).map_err(registry_error)?.is_some() {
                            return Err(ApiError::new(
                                StatusCode::CONFLICT,
                                "already-exists",
                                format!("a VM named '{}' exists on this agent", b.name),
                            ));
                        }
                        self.accepted(
                            &key,
                            &vm,
                            OpParams::Clone {
                                name: b.name,
                                linked: b.linked,
                            },
                        )
                        .await
                    }
                    "migrate" => {
                        let b: MigrateBody = read_json(req.into_body()).await?;
                        let allowed: &[VmState] = if b.live {
                            &[Running]
                        } else {
                            &[Running, Stopped, Suspended, Paused]
                        };
                        Self::require_state(&rec, "migrate", allowed)?;
                        self.accepted(
                            &key,
                            &vm,
                            OpParams::Migrate {
                                destination: b.destination,
                                live: b.live,
                            },
                        )
                        .await
                    }
                    "reserve" | "acquire" | "release" => {
                        let b: HolderBody = read_json(req.into_body()).await?;
                        ok(&self.allocate(&vm, action, b.holder, b.seconds)?)
                    }
                    other => Err(ApiError::no_route(
                        &Method::POST,
                        &format!("/v1/vms/{id}/{other}"),
                    )),
                }
            }
            (m, _) => Err(ApiError::no_route(&m, req.uri().path())),
        }
    }

    /// An operation; with `wait_ms`, answers as soon as it has ended or after that
    /// long (a long poll), whichever comes first.
    async fn operation_waiting(&self, id: &str, wait_ms: u64) -> Result<Operation, ApiError> {
        // Subscribe before reading, so an end committed in between is not missed.
        let mut events = self.registry.subscribe();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
        loop {
            let op = self
                .registry
                .operation(id)
                .map_err(registry_error)?
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not-found",
                        format!("no operation '{id}'"),
                    )
                })?;
            if op.state != OpState::Running || tokio::time::Instant::now() >= deadline {
                return Ok(op);
            }
            loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Err(_) => break,
                    Ok(Ok(ev))
                        if ev.kind == "operation-finished" && ev.detail["operation"] == id =>
                    {
                        break
                    }
                    Ok(Ok(_)) => continue,
                    // Lagged or closed: read the record again.
                    Ok(Err(_)) => break,
                }
            }
        }
    }

    /// Reserve / acquire / release, checked and applied in one transaction.
    fn allocate(
        &self,
        vm: &str,
        action: &str,
        holder: String,
        seconds: Option<u64>,
    ) -> Result<VmRecord, ApiError> {
        if holder.is_empty() || holder.len() > 200 || holder.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "holder must be 1-200 characters without control characters",
            ));
        }
        let seconds = crate::api::in_range(
            "seconds",
            seconds.unwrap_or(self.reservation_seconds),
            0,
            MAX_RESERVATION_SECONDS,
        )?;
        let now = now_ms();
        let result = self.registry.write(|t| {
            let Some(mut rec) = t.vm(vm)? else {
                return Ok(Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no VM '{vm}'"),
                )));
            };
            let current = match &rec.allocation {
                Allocation::Reserved { until_ms, .. } if *until_ms <= now => Allocation::Free,
                a => a.clone(),
            };
            let next = match (action, &current) {
                ("reserve", Allocation::Free) if !rec.vm.is_template => Allocation::Reserved {
                    holder: holder.clone(),
                    until_ms: now + seconds * 1000,
                },
                ("acquire", Allocation::Free) if !rec.vm.is_template => Allocation::Acquired {
                    holder: holder.clone(),
                },
                ("acquire", Allocation::Reserved { holder: h, .. }) if *h == holder => {
                    Allocation::Acquired {
                        holder: holder.clone(),
                    }
                }
                (
                    "release",
                    Allocation::Reserved { holder: h, .. } | Allocation::Acquired { holder: h },
                ) if *h == holder => Allocation::Free,
                _ => {
                    return Ok(Err(conflict(format!(
                        "cannot {action} VM {} for '{holder}': it is {}",
                        rec.vm.name,
                        match &current {
                            Allocation::Free if rec.vm.is_template => "a template".to_string(),
                            Allocation::Free => "free".to_string(),
                            Allocation::Reserved { holder, .. } =>
                                format!("reserved by '{holder}'"),
                            Allocation::Acquired { holder } => format!("acquired by '{holder}'"),
                        }
                    ))))
                }
            };
            rec.allocation = next;
            t.put_vm(&rec)?;
            t.event(
                &format!("vm-{action}d"),
                vm,
                serde_json::json!({ "holder": holder }),
            )?;
            Ok(Ok(rec))
        });
        result.map_err(registry_error)?
    }
}
