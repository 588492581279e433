//! One agent, one registration: how a registration finds the agent it names
//! already registered under another id (a second registration would offer the
//! host's capacity twice and have two agents claim its VMs).
//!
//! An agent is known by the instance id it answers at `GET /v1/site` (made at
//! random at its first start and kept in its database), not only by its URL: a
//! host has many names. A registration at the URL of another (the same process
//! for certain, whatever its instance: an agent whose database was made anew) is
//! one too. A record from before instance ids, with an agent from before them,
//! is matched by the registration the agent says it serves.
//!
//! Every health check reads the same answer to hold the agent (see
//! [`Twin::hold`]): one agent serves one site.

use hyper::{Method, StatusCode};
use serde_json::Value;

use super::model::AgentRec;
use crate::agent::site_claim;
use crate::api::client::Client;
use crate::api::ApiError;

/// What an agent answered about itself at `GET /v1/site`.
#[derive(Debug, Clone, Default)]
pub struct Twin {
    /// Its instance id (none from an agent older than them).
    pub instance: Option<String>,
    /// The id this site registered it under, as the agent recorded it.
    serving_as: Option<String>,
}

impl Twin {
    /// Reads an agent's answer to `GET /v1/site`, for the site whose record
    /// (`{"id", "instance"}`) is `site`.
    pub fn of(answer: &Value, site: &Value) -> Twin {
        let theirs = &answer["site"];
        Twin {
            instance: answer["instance"].as_str().map(str::to_string),
            serving_as: site_claim::same_site(theirs, site)
                .then(|| theirs["agent-id"].as_str().map(str::to_string))
                .flatten(),
        }
    }

    /// At a health check of registration `claim` (this site's record for the
    /// agent), with the agent's `answer` to `GET /v1/site`: holds the agent for
    /// this site. An agent that serves no site (released while this site still
    /// holds it: its admin took this site for gone), serves this site under
    /// another id, or holds this registration's record from before site instance
    /// ids, is sent `claim` again, under `claims` (an unregistration's release
    /// takes it too) and only while `still` says the registration is there. One
    /// that serves another site is an error (the agent is down to this site
    /// until it is unregistered here or released there). Answers the agent's
    /// instance id.
    pub async fn hold(
        c: &Client,
        claim: &Value,
        answer: &Value,
        claims: &tokio::sync::Mutex<()>,
        still: impl Fn() -> bool,
    ) -> Result<Option<String>, ApiError> {
        let theirs = &answer["site"];
        let instance = answer["instance"].as_str().map(str::to_string);
        let ours = theirs["agent-id"] == claim["agent-id"];
        // A record from before site instance ids is this site's only if it
        // names this registration (every site is `site` unless named).
        let elsewhere = theirs.is_object()
            && (!site_claim::same_site(theirs, claim) || (theirs["instance"].is_null() && !ours));
        if elsewhere {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid-state",
                format!(
                    "the agent serves {} now (it was released from this site): \
                     unregister it here",
                    site_claim::describe(theirs)
                ),
            ));
        }
        if theirs.is_object() && ours && theirs["instance"] == claim["instance"] {
            return Ok(instance);
        }
        let mut again = claim.clone();
        if theirs["at-ms"].is_u64() {
            again["at-ms"] = theirs["at-ms"].clone();
        }
        let _one = claims.lock().await;
        if !still() {
            return Ok(instance);
        }
        if theirs.is_null() {
            tracing::warn!(
                agent = claim["agent-id"].as_str().unwrap_or(""),
                "the agent serves no site: held for this one again"
            );
        }
        c.call::<_, Value>(Method::PUT, "/v1/site", Some(&again))
            .await?;
        Ok(instance)
    }

    /// The id this site registered the agent as, by the agent's record.
    pub fn serving_as(&self) -> Option<String> {
        self.serving_as.clone()
    }

    /// The id of the agent in `agents` (other than `id`) that is this one, at
    /// `url`.
    pub fn among(&self, id: &str, url: &str, agents: Vec<AgentRec>) -> Option<String> {
        let url = normal(url);
        agents
            .into_iter()
            .filter(|a| a.id != id)
            .find(|a| {
                normal(&a.url) == url
                    || match (&a.instance, &self.instance) {
                        (Some(theirs), Some(ours)) => theirs == ours,
                        // A record with an instance id is of an agent that has one.
                        (Some(_), None) => false,
                        (None, _) => self.serving_as.as_deref() == Some(a.id.as_str()),
                    }
            })
            .map(|a| a.id)
    }
}

/// A URL as registrations compare them: scheme and authority in lower case (as
/// URLs compare them), no trailing `/`.
fn normal(url: &str) -> String {
    let url = url.trim_end_matches('/');
    let path = url
        .find("://")
        .and_then(|s| url[s + 3..].find('/').map(|p| s + 3 + p))
        .unwrap_or(url.len());
    url[..path].to_ascii_lowercase() + &url[path..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(id: &str, instance: Option<&str>) -> AgentRec {
        let mut a = AgentRec::registered(id, "http://h", "t".into(), None);
        a.instance = instance.map(str::to_string);
        a
    }

    #[test]
    fn an_agent_is_matched_by_instance_else_by_the_registration_it_serves() {
        let answer = json!({ "site": { "id": "s", "agent-id": "x" }, "instance": "i-1" });
        let s = json!({ "id": "s", "instance": "i-s" });
        let twin = Twin::of(&answer, &s);
        let at = "http://other";
        let of = |t: &Twin, id: &str, url: &str, agents: Vec<AgentRec>| t.among(id, url, agents);
        // The same instance under another id: a twin, whatever it serves.
        assert_eq!(
            of(&twin, "new", at, vec![rec("y", Some("i-1"))]),
            Some("y".into())
        );
        // It serves x, but x is now another instance (another host took the name).
        assert_eq!(of(&twin, "new", at, vec![rec("x", Some("i-2"))]), None);
        // x recorded before instance ids: matched by what the agent serves.
        assert_eq!(of(&twin, "new", at, vec![rec("x", None)]), Some("x".into()));
        // Its own id is not a twin; another site's registration says nothing.
        assert_eq!(of(&twin, "y", at, vec![rec("y", Some("i-1"))]), None);
        let elsewhere = Twin::of(&answer, &json!({ "id": "other-site" }));
        assert_eq!(of(&elsewhere, "new", at, vec![rec("x", None)]), None);
        // An agent older than instance ids, serving x: x's record has an instance,
        // so it is another agent (this one was unregistered as x, x taken since).
        let old = Twin::of(&json!({ "site": { "id": "s", "agent-id": "x" } }), &s);
        let both = vec![rec("x", Some("i-1")), rec("y", None)];
        assert_eq!(of(&old, "new", at, both), None);
        // At a registered agent's URL: that agent, whatever its instance says.
        let anew = Twin::of(&json!({ "site": null, "instance": "i-9" }), &s);
        let x = || vec![rec("x", Some("i-1"))];
        assert_eq!(of(&anew, "new", "HTTP://H/", x()), Some("x".into()));
        // A path is compared as it is.
        assert_eq!(normal("HTTP://H:7070/Agent/"), "http://h:7070/Agent");
        assert_eq!(of(&anew, "new", "http://h/other", x()), None);
    }
}
