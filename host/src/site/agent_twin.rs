//! One agent, one registration: how a registration finds the agent it names
//! already registered under another id (a second registration would offer the
//! host's capacity twice and have two agents claim its VMs).
//!
//! An agent is known by the instance id it answers at `GET /v1/site` (made at
//! random at its first start and kept in its database), not by its URL: a host has
//! many names. A record from before instance ids (or an agent from before them)
//! is matched by the registration the agent says it serves instead.

use serde_json::Value;

use super::model::AgentRec;

/// What an agent answered about itself at `GET /v1/site`.
#[derive(Debug, Clone, Default)]
pub struct Twin {
    /// Its instance id (none from an agent older than them).
    pub instance: Option<String>,
    /// The id this site registered it under, as the agent recorded it.
    serving_as: Option<String>,
}

impl Twin {
    /// Reads an agent's answer to `GET /v1/site`, for site `site_id`.
    pub fn of(answer: &Value, site_id: &str) -> Twin {
        let site = &answer["site"];
        Twin {
            instance: answer["instance"].as_str().map(str::to_string),
            serving_as: (site["id"].as_str() == Some(site_id))
                .then(|| site["agent-id"].as_str().map(str::to_string))
                .flatten(),
        }
    }

    /// The id of the agent in `agents` (other than `id`) that is this one.
    pub fn among(&self, id: &str, agents: Vec<AgentRec>) -> Option<String> {
        agents
            .into_iter()
            .filter(|a| a.id != id)
            .find(|a| match (&a.instance, &self.instance) {
                (Some(theirs), Some(ours)) => theirs == ours,
                _ => self.serving_as.as_deref() == Some(a.id.as_str()),
            })
            .map(|a| a.id)
    }
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
        let twin = Twin::of(&answer, "s");
        // The same instance under another id: a twin, whatever it serves.
        assert_eq!(
            twin.among("new", vec![rec("y", Some("i-1"))]),
            Some("y".into())
        );
        // It serves x, but x is now another instance (another host took the name).
        assert_eq!(twin.among("new", vec![rec("x", Some("i-2"))]), None);
        // x recorded before instance ids: matched by what the agent serves.
        assert_eq!(twin.among("new", vec![rec("x", None)]), Some("x".into()));
        // Its own id is not a twin; another site's registration says nothing.
        assert_eq!(twin.among("y", vec![rec("y", Some("i-1"))]), None);
        let elsewhere = Twin::of(&answer, "other-site");
        assert_eq!(elsewhere.among("new", vec![rec("x", None)]), None);
        // An agent older than instance ids, serving nothing here.
        let old = Twin::of(&json!({ "site": null }), "s");
        assert_eq!(
            old.among("new", vec![rec("x", Some("i-1")), rec("y", None)]),
            None
        );
    }
}
