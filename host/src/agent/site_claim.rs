//! Which site an agent serves: one at a time. A site registering an agent sends
//! it a record, `{"id", "instance", "agent-id", "at-ms"}` (`PUT /v1/site`); the
//! agent keeps it and refuses another site's until that site unregisters it (a
//! `DELETE /v1/site` naming its registration) or the agent's admin releases it
//! (a `DELETE /v1/site` naming none). Two sites sharing one agent would each take
//! the other's VMs for strays and offer the host's capacity twice.
//!
//! Sites are told apart by their instance id (made at random at a site's first
//! start and kept in its database; a site id is a name, `site` unless set), and
//! where either record has none (a site older than instance ids) by their id.

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};

use super::registry::{Registry, RegistryError};
use crate::api::{ok, query_param, read_json, ApiError, Response};

/// The registry key of the site record.
const SITE: &str = "site";

/// What releasing the agent came to.
pub enum Release {
    /// Released from this site record (none: it served no site).
    Released(Option<Value>),
    /// It serves this other site, which the release did not name.
    Other(Value),
}

/// Serves `/v1/site` (a driver or none): `GET` the site this agent serves and
/// its own `instance` id (the site compares it with its other agents': one agent,
/// one registration), `PUT` a site's record (refused while another site's is
/// kept), `DELETE` it.
pub async fn handle(registry: &Registry, req: Request<Incoming>) -> Result<Response, ApiError> {
    let instance = registry.instance().map_err(backend)?;
    let answer = |site: &Value| ok(&json!({ "site": site, "instance": instance }));
    match *req.method() {
        Method::GET => answer(&recorded(registry).map_err(backend)?),
        Method::PUT => {
            let body: Value = read_json(req.into_body()).await?;
            if !body.is_object() || !body["id"].is_string() {
                return Err(ApiError::bad_request(
                    "the site record must be an object with a string id",
                ));
            }
            match record(registry, &body).map_err(backend)? {
                None => answer(&body),
                Some(r) => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "already-exists",
                    serves_already("this agent", &r),
                )),
            }
        }
        Method::DELETE => {
            // A site unregistering this agent names itself; the agent's admin
            // releasing it from a site that is gone names none.
            let mut claim = serde_json::Map::new();
            for key in ["id", "instance", "agent-id"] {
                if let Some(v) = query_param(req.uri(), key)? {
                    claim.insert(key.into(), v.into());
                }
            }
            if let Some(v) = query_param(req.uri(), "at-ms")? {
                let at: u64 = v.parse().map_err(|_| {
                    ApiError::bad_request(format!("at-ms must be Unix ms, not '{v}'"))
                })?;
                claim.insert("at-ms".into(), at.into());
            }
            let claim = (!claim.is_empty()).then_some(Value::Object(claim));
            match release(registry, claim.as_ref()).map_err(backend)? {
                Release::Released(r) => ok(&json!({
                    "site": null,
                    "instance": instance,
                    "released": r,
                })),
                Release::Other(r) => {
                    // The same registration but for its time: the agent id was
                    // registered there again since.
                    let mut earlier = claim.unwrap_or_default();
                    let again = earlier.is_object() && {
                        earlier["at-ms"] = Value::Null;
                        same_registration(&r, &earlier)
                    };
                    let which = if again {
                        "another registration there than the one named (another at-ms)"
                    } else {
                        "not the site named"
                    };
                    Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid-state",
                        format!(
                            "this agent serves {}, {which}; nothing released",
                            describe(&r)
                        ),
                    ))
                }
            }
        }
        ref m => Err(ApiError::no_route(m, req.uri().path())),
    }
}

/// Why `agent` ("this agent", "the agent") is refused to a site: it serves the
/// site of record `theirs`, and how it is freed.
pub fn serves_already(agent: &str, theirs: &Value) -> String {
    format!(
        "{agent} serves {} already: that site must unregister it first, or, if that \
         site is gone, {agent}'s admin releases it (`gve agent release`)",
        describe(theirs)
    )
}

fn backend(e: RegistryError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
}

/// The site this agent serves (null: none).
pub fn recorded(registry: &Registry) -> Result<Value, RegistryError> {
    Ok(registry
        .meta(SITE)?
        .map_or(Value::Null, |text| parse(&text)))
}

/// Records `claim` as the site this agent serves, unless another site's record
/// is there, or a record with an instance id and `claim` has none (checked in
/// the same transaction: two sites racing); that one is answered then.
pub fn record(registry: &Registry, claim: &Value) -> Result<Option<Value>, RegistryError> {
    let text = claim.to_string();
    registry.write(|t| {
        if let Some(r) = t.meta(SITE)?.map(|text| parse(&text)) {
            // A record from before instance ids may be replaced by one with an
            // instance (its site upgraded), never the other way round: an older
            // site named like this one is not taken for it.
            let older = r["instance"].is_string() && claim["instance"].is_null();
            if r.is_object() && (!same_site(&r, claim) || older) {
                return Ok(Some(r));
            }
        }
        t.set_meta(SITE, &text)?;
        t.event("site-registered", "", claim.clone())?;
        Ok(None)
    })
}

/// Releases the agent from the site it serves: from any (`None`: its admin's
/// release, audited as `site.release`) or only from the site `claim` names (a
/// site unregistering it; with an `agent-id`, only that registration there).
pub fn release(registry: &Registry, claim: Option<&Value>) -> Result<Release, RegistryError> {
    let released = registry.write(|t| {
        let Some(r) = t.meta(SITE)?.map(|text| parse(&text)) else {
            return Ok(Release::Released(None));
        };
        if claim.is_some_and(|c| !same_registration(&r, c)) {
            return Ok(Release::Other(r));
        }
        t.remove_meta(SITE)?;
        t.event("site-released", "", r.clone())?;
        Ok(Release::Released(Some(r)))
    })?;
    if let (Release::Released(Some(r)), None) = (&released, claim) {
        registry.audit("site.release", r["id"].as_str().unwrap_or(""), r.clone())?;
    }
    Ok(released)
}

/// A stored site record (JSON text; null if it does not parse).
fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Whether site records `a` and `b` name the same site.
pub fn same_site(a: &Value, b: &Value) -> bool {
    match (a["instance"].as_str(), b["instance"].as_str()) {
        (Some(x), Some(y)) => x == y,
        _ => a["id"].is_string() && a["id"] == b["id"],
    }
}

/// Whether `recorded` is the registration `claim` names: the same site and, when
/// `claim` names them, the same agent id there and the same time of registering
/// (`at-ms`: an id unregistered and registered again is another registration).
pub fn same_registration(recorded: &Value, claim: &Value) -> bool {
    let named = |k: &str| claim[k].is_null() || recorded[k] == claim[k];
    same_site(recorded, claim) && named("agent-id") && named("at-ms")
}

/// Site record `site` in words, for errors: its id, instance and the agent id
/// it registered this agent as.
pub fn describe(site: &Value) -> String {
    let text = |k: &str| site[k].as_str().unwrap_or("?").to_string();
    match site["instance"].as_str() {
        Some(i) => format!(
            "site '{}' (instance {i}) as '{}'",
            text("id"),
            text("agent-id")
        ),
        None => format!("site '{}' as '{}'", text("id"), text("agent-id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sites_are_told_apart_by_instance_else_by_id() {
        let a = json!({ "id": "site", "instance": "i-a", "agent-id": "a-0" });
        let b = json!({ "id": "site", "instance": "i-b", "agent-id": "a-0" });
        let old = json!({ "id": "site", "agent-id": "a-0" });
        let other = json!({ "id": "fzk", "agent-id": "a-0" });
        assert!(same_site(&a, &a.clone()));
        assert!(!same_site(&a, &b), "two sites both named 'site'");
        assert!(
            same_site(&a, &old) && same_site(&old, &b),
            "an old record: by id"
        );
        assert!(!same_site(&old, &other));
        assert!(!same_site(&json!(null), &json!(null)), "no id is no site");
    }

    #[test]
    fn a_registration_is_its_site_and_agent_id() {
        let rec = json!({ "id": "site", "instance": "i-a", "agent-id": "a-0" });
        assert!(same_registration(
            &rec,
            &json!({ "instance": "i-a", "agent-id": "a-0" })
        ));
        assert!(same_registration(&rec, &json!({ "instance": "i-a" })));
        let timed = json!({ "id": "site", "instance": "i-a", "agent-id": "a-0", "at-ms": 5 });
        assert!(same_registration(
            &timed,
            &json!({ "instance": "i-a", "agent-id": "a-0", "at-ms": 5 })
        ));
        assert!(
            !same_registration(
                &timed,
                &json!({ "instance": "i-a", "agent-id": "a-0", "at-ms": 4 })
            ),
            "an earlier registration of the same id"
        );
        assert!(same_registration(
            &timed,
            &json!({ "instance": "i-a", "agent-id": "a-0" })
        ));
        assert!(!same_registration(
            &rec,
            &json!({ "instance": "i-a", "agent-id": "a-1" })
        ));
        assert!(!same_registration(
            &rec,
            &json!({ "instance": "i-b", "agent-id": "a-0" })
        ));
        assert_eq!(describe(&rec), "site 'site' (instance i-a) as 'a-0'");
    }
}
