//! Users and agents (`/v1/me`, `/v1/users...`, `/v1/agents...`). Managing users and
//! agents is for admins; a user may read and rotate only their own record.

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use super::agents::db;
use super::auth::{self, Caller};
use super::model::{now_ms, AgentView, Quota, Role, User, UserView};
use super::SiteCore;
use crate::api::page::{next_path, ok_page, page_query};
use crate::api::{json_response, ok, query_param, read_json, ApiError, Response};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NewUser {
    name: String,
    #[serde(default = "user_role")]
    role: Role,
    #[serde(default)]
    quota: Option<Quota>,
}

fn user_role() -> Role {
    Role::User
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NewAgent {
    id: String,
    url: String,
    token: String,
    #[serde(default)]
    fingerprint: Option<String>,
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", what.to_string())
}

impl SiteCore {
    fn user_view(&self, u: &User, token: Option<String>) -> Result<UserView, ApiError> {
        Ok(UserView {
            name: u.name.clone(),
            role: u.role.clone(),
            quota: u.quota,
            usage: self.store.usage(&u.name).map_err(db)?,
            token,
        })
    }

    /// Serves `/v1/me` and `/v1/users...`.
    pub async fn handle_users(
        &self,
        caller: &Caller,
        req: Request<Incoming>,
        segs: &[&str],
    ) -> Result<Response, ApiError> {
        let method = req.method().clone();
        match (method, segs) {
            (Method::GET, ["v1", "me"]) => {
                let u = self
                    .store
                    .user(&caller.name)
                    .map_err(db)?
                    .ok_or_else(ApiError::unauthorized)?;
                ok(&self.user_view(&u, None)?)
            }
            (Method::GET, ["v1", "users"]) => {
                caller.require_admin()?;
                let (limit, after) = page_query(req.uri(), "after")?;
                let page = self
                    .store
                    .users_page(after.as_deref(), limit as usize)
                    .map_err(db)?;
                let last = page.items.last().map(|u| u.name.as_str());
                let next = next_path("/v1/users", "after", last, page.more, limit, false);
                let views: Result<Vec<UserView>, ApiError> =
                    page.items.iter().map(|u| self.user_view(u, None)).collect();
                ok_page(&views?, next)
            }
            (Method::POST, ["v1", "users"]) => {
                caller.require_admin()?;
                let body: NewUser = read_json(req.into_body()).await?;
                auth::validate_name(&body.name)?;
                if let Role::Other(name) = &body.role {
                    return Err(ApiError::bad_request(format!(
                        "no role '{name}': a user is one of {}",
                        Role::KNOWN.join(", ")
                    )));
                }
                if let Some(q) = &body.quota {
                    q.validate()?;
                }
                // A monitor holds nothing: its quota is zero, and one given is a mistake.
                let quota = match (&body.role, body.quota) {
                    (Role::Monitor, Some(_)) => {
                        return Err(ApiError::bad_request(
                            "a monitor holds no VMs: create it without a quota",
                        ))
                    }
                    (Role::Monitor, None) => Quota {
                        logical_cpus: 0,
                        main_memory_mib: 0,
                        vms: 0,
                    },
                    (_, q) => q.unwrap_or_default(),
                };
                let token = auth::new_token();
                let user = User {
                    name: body.name.clone(),
                    role: body.role.clone(),
                    token_sha256: auth::hash(&token),
                    quota,
                    created_ms: now_ms(),
                };
                let created = self.store.write(|t| {
                    if t.user(&user.name)?.is_some() {
                        return Ok(false);
                    }
                    t.put_user(&user)?;
                    Ok(true)
                });
                if !created.map_err(db)? {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "already-exists",
                        format!("user '{}' exists", body.name),
                    ));
                }
                self.audit(
                    &caller.name,
                    "user.create",
                    &user.name,
                    serde_json::json!({ "role": &user.role, "quota": user.quota }),
                )
                .await?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &self.user_view(&user, Some(token))?,
                ))
            }
            (Method::GET, ["v1", "users", name]) => {
                if !caller.is_admin() && caller.name != *name {
                    return Err(not_found(&format!("no user '{name}'")));
                }
                let u = self
                    .store
                    .user(name)
                    .map_err(db)?
                    .ok_or_else(|| not_found(&format!("no user '{name}'")))?;
                ok(&self.user_view(&u, None)?)
            }
            (Method::PUT, ["v1", "users", name, "quota"]) => {
                caller.require_admin()?;
                let quota: Quota = read_json(req.into_body()).await?;
                quota.validate()?;
                let r = self.store.write(|t| {
                    let Some(mut u) = t.user(name)? else {
                        return Ok(Err(not_found(&format!("no user '{name}'"))));
                    };
                    if u.role == Role::Monitor {
                        return Ok(Err(ApiError::bad_request(format!(
                            "user '{name}' is a monitor, which holds no VMs: it takes no quota"
                        ))));
                    }
                    u.quota = quota;
                    t.put_user(&u)?;
                    Ok(Ok(u))
                });
                let u = r.map_err(db)??;
                self.audit(&caller.name, "user.quota", name, serde_json::json!(quota))
                    .await?;
                ok(&self.user_view(&u, None)?)
            }
            (Method::POST, ["v1", "users", name, "token"]) => {
                if !caller.is_admin() && caller.name != *name {
                    return Err(not_found(&format!("no user '{name}'")));
                }
                let token = auth::new_token();
                let r = self.store.write(|t| {
                    let Some(mut u) = t.user(name)? else {
                        return Ok(None);
                    };
                    u.token_sha256 = auth::hash(&token);
                    t.put_user(&u)?;
                    Ok(Some(u))
                });
                let u = r
                    .map_err(db)?
                    .ok_or_else(|| not_found(&format!("no user '{name}'")))?;
                self.audit(&caller.name, "user.token", name, serde_json::Value::Null)
                    .await?;
                ok(&self.user_view(&u, Some(token))?)
            }
            (Method::DELETE, ["v1", "users", name]) => {
                caller.require_admin()?;
                if caller.name == *name {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid-state",
                        "an admin cannot remove themselves",
                    ));
                }
                let r = self.store.write(|t| {
                    if t.user(name)?.is_none() {
                        return Ok(Err(not_found(&format!("no user '{name}'"))));
                    }
                    let u = t.usage(name)?;
                    if u.vms > 0 {
                        return Ok(Err(ApiError::new(
                            StatusCode::CONFLICT,
                            "invalid-state",
                            format!("user '{name}' holds {} VMs (or has requests in flight); release them first", u.vms),
                        )));
                    }
                    t.remove_user(name)?;
                    Ok(Ok(()))
                });
                r.map_err(db)??;
                self.audit(&caller.name, "user.delete", name, serde_json::Value::Null)
                    .await?;
                ok(&serde_json::json!({ "removed": name }))
            }
            (m, _) => Err(ApiError::no_route(&m, req.uri().path())),
        }
    }

    /// Serves `/v1/agents...` (admins only).
    pub async fn handle_agents(
        &self,
        caller: &Caller,
        req: Request<Incoming>,
        segs: &[&str],
    ) -> Result<Response, ApiError> {
        caller.require_admin()?;
        let method = req.method().clone();
        match (method, segs) {
            (Method::GET, ["v1", "agents"]) => {
                let (limit, after) = page_query(req.uri(), "after")?;
                let page = self
                    .store
                    .agents_page(after.as_deref(), limit as usize)
                    .map_err(db)?;
                let last = page.items.last().map(|a| a.id.as_str());
                let next = next_path("/v1/agents", "after", last, page.more, limit, false);
                ok_page(
                    &page.items.iter().map(AgentView::from).collect::<Vec<_>>(),
                    next,
                )
            }
            (Method::POST, ["v1", "agents"]) => {
                let body: NewAgent = read_json(req.into_body()).await?;
                let view = self
                    .agents
                    .register(
                        &body.id,
                        &body.url,
                        &body.token,
                        body.fingerprint.as_deref(),
                    )
                    .await?;
                self.audit(
                    &caller.name,
                    "agent.add",
                    &body.id,
                    serde_json::json!({ "url": body.url }),
                )
                .await?;
                Ok(json_response(StatusCode::CREATED, &view))
            }
            (Method::GET, ["v1", "agents", id]) => {
                let a = self
                    .store
                    .agent(id)
                    .map_err(db)?
                    .ok_or_else(|| not_found(&format!("no agent '{id}'")))?;
                ok(&AgentView::from(&a))
            }
            (Method::POST, ["v1", "agents", id, "check"]) => {
                if self.store.agent(id).map_err(db)?.is_none() {
                    return Err(not_found(&format!("no agent '{id}'")));
                }
                self.agents.check(id).await;
                let a = self
                    .store
                    .agent(id)
                    .map_err(db)?
                    .ok_or_else(|| not_found(&format!("no agent '{id}'")))?;
                ok(&AgentView::from(&a))
            }
            (Method::DELETE, ["v1", "agents", id]) => {
                let force = query_param(req.uri(), "force")?.as_deref() == Some("true");
                let release = self.agents.unregister(id, force)?;
                self.audit(
                    &caller.name,
                    "agent.remove",
                    id,
                    serde_json::json!({ "force": force }),
                )
                .await?;
                let released = release.told().await;
                ok(&serde_json::json!({ "removed": id, "agent-released": released }))
            }
            (m, _) => Err(ApiError::no_route(&m, req.uri().path())),
        }
    }
}

impl SiteCore {
    /// `GET /v1/audit?after=N&limit=N` (admins): the audit log, oldest first.
    pub fn handle_audit(
        &self,
        caller: &Caller,
        req: &Request<Incoming>,
    ) -> Result<Response, ApiError> {
        caller.require_admin()?;
        let after = crate::api::query_u64(req.uri(), "after", 0, 0, u64::MAX)?;
        let limit = crate::api::query_u64(req.uri(), "limit", 1000, 1, crate::api::MAX_LIST)?;
        ok(&self.store.audit_after(after, limit as usize).map_err(db)?)
    }
}
