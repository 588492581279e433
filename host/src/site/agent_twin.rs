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
    /// holds it: its admin took this site for gone), serves this site under an
    /// id no longer registered here (a registration racing this one told it),
    /// or holds this registration's record from before site instance ids or
    /// registration times (`at-ms`, which a release names), is sent `claim` again, under `lock` (the registration's: its release takes it
    /// too) and only while `still` says the registration is there. One that
    /// serves another site, or this site under another id `held_here` says is
    /// registered too (two registrations from before twins were refused), is an
    /// error: the agent is down to this registration until one is unregistered.
    /// Answers the agent's instance id.
    pub async fn hold(
        c: &Client,
        claim: &Value,
        answer: &Value,
        lock: &tokio::sync::Mutex<()>,
        still: impl Fn() -> bool,
        held_here: impl Fn(&str) -> bool,
    ) -> Result<Option<String>, ApiError> {
        let theirs = &answer["site"];
        let instance = answer["instance"].as_str().map(str::to_string);
        let other_id = theirs["agent-id"]
            .as_str()
            .filter(|other| claim["agent-id"].as_str() != Some(*other));
        let down = |message: String| ApiError::new(StatusCode::CONFLICT, "invalid-state", message);
        let elsewhere = |theirs: &Value| {
            down(format!(
                "the agent serves {} now: {TAKEN}",
                site_claim::describe(theirs)
            ))
        };
        if theirs.is_object() {
            // A record from before site instance ids is this site's only if it
            // names this registration (every site is `site` unless named).
            if !site_claim::same_site(theirs, claim)
                || (theirs["instance"].is_null() && other_id.is_some())
            {
                return Err(elsewhere(theirs));
            }
            match other_id {
                Some(other) if held_here(other) => {
                    return Err(down(format!(
                        "the agent is registered here as '{other}' too: unregister one"
                    )))
                }
                None if theirs["instance"] == claim["instance"]
                    && theirs["at-ms"] == claim["at-ms"] =>
                {
                    return Ok(instance)
                }
                _ => {}
            }
        }
        let _one = lock.lock().await;
        if !still() {
            return Ok(instance);
        }
        if theirs.is_null() {
            tracing::warn!(
                agent = claim["agent-id"].as_str().unwrap_or(""),
                "the agent serves no site: held for this one again"
            );
        }
        match c
            .call::<_, Value>(Method::PUT, "/v1/site", Some(claim))
            .await
        {
            Ok(_) => Ok(instance),
            // Another site took it since it was read.
            Err(e) if e.status == 409 => Err(down(format!(
                "the agent serves another site now: {TAKEN} ({})",
                e.message
            ))),
            Err(e) => Err(e),
        }
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

/// What an admin does about an agent that serves another site.
const TAKEN: &str = "if that is this site from before (its database restored from a \
     backup older than its instance id), release the agent there (`gve agent release`) and \
     this site holds it again at its next check; otherwise unregister it here";

/// How long an unregistration's release may take, waiting for a check's hold
/// included.
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An unregistered agent's release from its registration, under way.
pub struct Release(Option<tokio::task::JoinHandle<bool>>);

impl Release {
    /// Starts `delivery` (a [`deliver`] and what follows it), when there is one
    /// (the agent's record gave a client): it runs to its end whether or not
    /// anyone waits for it.
    pub fn spawn(
        delivery: Option<impl std::future::Future<Output = bool> + Send + 'static>,
    ) -> Release {
        Release(delivery.map(tokio::spawn))
    }

    /// Whether the agent no longer serves the registration (one that was down
    /// still does: the release stays owed and is sent again).
    pub async fn told(self) -> bool {
        match self.0 {
            Some(task) => task.await.unwrap_or(false),
            None => false,
        }
    }
}

/// Releases an agent (through `c`) from registration `claim` (this site's record
/// of it, `{"id", "instance", "agent-id", "at-ms"}`), under its claims' `lock`,
/// at most 5 s; answers whether the agent no longer serves the registration (it
/// took the release, serves another, or has no site record to release). A
/// record of this registration from before registration times (another
/// `at-ms`) is released too while `gone` says the agent id is not registered
/// here again. A failure is a warning when `loud`, else a debug line (a release
/// sent again and again).
pub async fn deliver(
    c: &Client,
    claim: &Value,
    lock: &tokio::sync::Mutex<()>,
    gone: impl Fn() -> bool,
    loud: bool,
) -> bool {
    let agent = claim["agent-id"].as_str().unwrap_or("");
    let sent = tokio::time::timeout(RELEASE_TIMEOUT, async {
        let _one = lock.lock().await;
        let path = release_path(claim, true);
        match c.call::<(), Value>(Method::DELETE, &path, None).await {
            Err(e) if e.status == 409 => {
                let now: Value = c.get("/v1/site").await?;
                let mut untimed = now["site"].clone();
                if untimed.is_object() {
                    untimed["at-ms"] = Value::Null;
                }
                if site_claim::same_registration(claim, &untimed)
                    && untimed["instance"] == claim["instance"]
                    && now["site"]["at-ms"] != claim["at-ms"]
                    && gone()
                {
                    let path = release_path(claim, false);
                    c.call::<(), Value>(Method::DELETE, &path, None).await
                } else {
                    Err(e)
                }
            }
            r => r,
        }
    })
    .await;
    let failed = match sent {
        Ok(Ok(_)) => return true,
        // It serves another registration: nothing of this one to release; or it
        // keeps no site record (older than them).
        Ok(Err(e)) if e.status == 409 || e.status == 404 => return true,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5 s".to_string(),
    };
    if loud {
        tracing::warn!(agent, error = failed, "unregistered agent not released");
    } else {
        tracing::debug!(agent, error = failed, "unregistered agent not released yet");
    }
    false
}

/// The release of registration `claim`: `DELETE /v1/site` naming the site, the
/// agent id there and, when `timed`, the time of registering.
fn release_path(claim: &Value, timed: bool) -> String {
    let text = |k: &str| crate::api::percent_encode(claim[k].as_str().unwrap_or(""));
    let mut path = format!(
        "/v1/site?id={}&instance={}&agent-id={}",
        text("id"),
        text("instance"),
        text("agent-id")
    );
    if let (true, Some(at)) = (timed, claim["at-ms"].as_u64()) {
        path.push_str(&format!("&at-ms={at}"));
    }
    path
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
