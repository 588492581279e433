//! The files the agent reads for a plugin (its `config-files`, its TLS grants'
//! certificates and keys) are those the agent's config file names: not what an
//! admin sends (see the policy test beside), nor what a record of an earlier
//! run says.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gve::agent::registry::Registry;
use gve::agent::{Agent, AgentConfig};
use gve::plugin::{Grants, Limits, PluginSpec, PluginSummary};
use hyper::Method;
use serde_json::{json, Value};

use super::{client, memory_config};
use crate::support::{edited_bundle, no_creds};

/// Writes a secret file as the agent accepts one: its user's, no access for others.
fn secret(path: &Path, value: &str) {
    std::fs::write(path, value).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// hostile's config value `key`, read back through a driver session (as a VM's name).
async fn value(agent: &Agent, key: &str) -> String {
    let d = agent
        .plugins
        .open_driver("hostile", "files", no_creds())
        .await
        .unwrap();
    d.get_vm(&format!("config:{key}")).await.unwrap().name
}

async fn replace(agent: &Agent, change: Value) -> PluginSummary {
    client(agent)
        .call::<Value, PluginSummary>(Method::PUT, "/v1/plugins/hostile", Some(&change))
        .await
        .unwrap()
}

fn hostile(agent: &Agent) -> (String, u64) {
    let h = agent
        .plugins
        .list()
        .into_iter()
        .find(|p| p.name == "hostile")
        .expect("hostile is loaded");
    (h.version, h.limits.memory_mib)
}

fn record(dir: &Path) -> String {
    Registry::open(&dir.join("agent.redb"))
        .unwrap()
        .meta("plugin:hostile")
        .unwrap()
        .expect("hostile's runtime record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_secret_files_come_from_the_config_file_whatever_a_record_says() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    // Version 0.2.0 of hostile reports the version its config gives: a file
    // holding another makes its load fail.
    let v2 = edited_bundle("hostile", |m| {
        m.replace("version = \"0.1.0\"", "version = \"0.2.0\"")
    });
    let (old, new, token) = (
        files.path().join("old"),
        files.path().join("new"),
        files.path().join("token"),
    );
    let config = |config_files: &[(&str, &Path)], tls: Option<Value>| -> AgentConfig {
        let mut c = memory_config(dir.path());
        let mut grants = Grants::default();
        for (k, p) in config_files {
            grants.config_files.insert(k.to_string(), p.to_path_buf());
        }
        if let Some(t) = tls {
            grants.http = vec!["127.0.0.1:9".into()];
            grants.tls = serde_json::from_value(t).unwrap();
        }
        c.plugins.insert(
            "hostile".into(),
            PluginSpec {
                bundle: v2.path().to_path_buf(),
                grants,
                limits: Limits::default(),
            },
        );
        c
    };
    let default_mib = Limits::default().memory_mib;

    // A runtime replace records the spec in force, its config-files' paths too.
    secret(&old, "0.2.0");
    let agent = Agent::start(config(&[("version", &old)], None))
        .await
        .unwrap();
    replace(&agent, json!({ "limits": { "memory-mib": 80 } })).await;
    agent.stop().await;
    assert!(record(dir.path()).contains(old.to_str().unwrap()));

    // The operator points the key at another file; the old one now holds what
    // the plugin would refuse. The restart reads the config file's file.
    secret(&new, "0.2.0");
    secret(&old, "9.9.9");
    let agent = Agent::start(config(&[("version", &new)], None))
        .await
        .unwrap();
    assert_eq!(
        hostile(&agent),
        ("0.2.0".to_string(), 80),
        "the runtime replace is restored, with the config file's secret file"
    );
    assert_eq!(value(&agent, "version").await, "0.2.0");

    // An admin gives a value inline at runtime (grants replaced whole); the
    // operator then moves it to a file. The file wins, and the record no
    // longer holds the inline value.
    replace(
        &agent,
        json!({ "grants": { "config": { "version": "0.2.0", "token": "inline-s3cr3t" } } }),
    )
    .await;
    assert_eq!(value(&agent, "token").await, "inline-s3cr3t");
    agent.stop().await;
    // Recorded sealed (`sealed.rs`): the key, not the value.
    let inline = |rec: &str| {
        let rec: Value = serde_json::from_str(rec).unwrap();
        rec["spec"]["grants"]["config"]["token"]
            .as_str()
            .map(String::from)
    };
    let rec = record(dir.path());
    assert!(!rec.contains("inline-s3cr3t"), "{rec}");
    assert!(
        inline(&rec).is_some_and(|v| v.starts_with("sealed-v1:")),
        "{rec}"
    );
    secret(&token, "file-s3cr3t");
    let agent = Agent::start(config(&[("version", &new), ("token", &token)], None))
        .await
        .unwrap();
    assert_eq!(value(&agent, "token").await, "file-s3cr3t");
    assert_eq!(hostile(&agent).1, 80, "the rest of the record is restored");
    agent.stop().await;
    let rec = record(dir.path());
    assert_eq!(inline(&rec), None, "{rec}");
    assert!(rec.contains(token.to_str().unwrap()), "{rec}");

    // A value an admin's replace dropped (grants given whole) stays dropped
    // after a restart, though the config file still names its file.
    let both = [("version", new.as_path()), ("token", token.as_path())];
    let agent = Agent::start(config(&both, None)).await.unwrap();
    replace(
        &agent,
        json!({ "grants": { "config": { "version": "0.2.0" } } }),
    )
    .await;
    assert_eq!(value(&agent, "token").await, "<unset>");
    agent.stop().await;
    let agent = Agent::start(config(&both, None)).await.unwrap();
    assert_eq!(value(&agent, "token").await, "<unset>");
    assert_eq!(value(&agent, "version").await, "0.2.0");
    agent.stop().await;

    // A record naming a TLS file the config file does not give the plugin (a
    // real certificate, which a load would take) is not restored.
    let pem = files.path().join("elsewhere.pem");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&pem, made.cert.pem()).unwrap();
    let mut rec: Value = serde_json::from_str(&record(dir.path())).unwrap();
    rec["spec"]["grants"]["http"] = json!(["127.0.0.1:9"]);
    rec["spec"]["grants"]["tls"] = json!({ "127.0.0.1:9": { "ca": pem } });
    rec["spec"]["limits"]["memory-mib"] = json!(96);
    let reg = Registry::open(&dir.path().join("agent.redb")).unwrap();
    reg.write(|t| t.set_meta("plugin:hostile", &rec.to_string()))
        .unwrap();
    drop(reg);
    let agent = Agent::start(config(&[("version", &new)], None))
        .await
        .unwrap();
    assert_eq!(
        hostile(&agent).1,
        default_mib,
        "the record naming another TLS file is left out"
    );
    agent.stop().await;
    // The same file given by the config file is the plugin's: restored.
    let mut c = config(
        &[("version", &new)],
        Some(json!({ "127.0.0.1:9": { "ca": pem } })),
    );
    c.plugin_policy
        .as_mut()
        .unwrap()
        .http
        .push("127.0.0.1:10".into());
    let agent = Agent::start(c).await.unwrap();
    assert_eq!(hostile(&agent).1, 96);
    // Through the API it goes only where the config file gives it: for the same
    // authority, as the same file.
    for (tls, ok) in [
        (json!({ "127.0.0.1:10": { "ca": pem } }), false),
        (
            json!({ "127.0.0.1:9": { "fingerprint": "AB".repeat(32), "cert": pem, "key": pem } }),
            false,
        ),
        (json!({ "127.0.0.1:9": { "ca": pem } }), true),
    ] {
        let change = json!({ "grants": {
            "http": ["127.0.0.1:9", "127.0.0.1:10"],
            "tls": tls,
            "config": { "version": "0.2.0" },
        } });
        let r = client(&agent)
            .call::<Value, PluginSummary>(Method::PUT, "/v1/plugins/hostile", Some(&change))
            .await;
        match r {
            Ok(_) => assert!(ok, "{tls} was granted"),
            Err(e) => {
                assert!(!ok, "{tls}: {e}");
                assert_eq!((e.status, e.kind.as_str()), (403, "denied"), "{e}");
                assert!(e.message.contains("may not be granted"), "{e}");
            }
        }
    }
    agent.stop().await;
}
