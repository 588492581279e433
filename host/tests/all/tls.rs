//! Secrets in flight and at rest: a site and an agent over mutual TLS (pinned
//! self-signed certificates), a wrong pin refused, and the agent's secret sealed
//! in the site's database.

use std::collections::BTreeMap;

use gve::agent::config::DriverConfig;
use gve::agent::{Agent, AgentConfig};
use gve::api::client::Client;
use gve::api::tls::{self_signed, ClientTls, TlsConfig};
use gve::site::model::{JobState, SiteVm};
use gve::site::{Site, SiteConfig};
use hyper::Method;
use serde_json::{json, Value};

use crate::agent::TOKEN as AGENT_TOKEN;
use crate::site::{job, ADMIN};
use crate::support::spec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_and_agent_speak_mutual_tls_and_the_agent_secret_is_sealed_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let (site_cert, site_key, site_fp) = self_signed(&tls, "site", &["127.0.0.1"]).unwrap();
    let (agent_cert, agent_key, agent_fp) = self_signed(&tls, "agent", &["127.0.0.1"]).unwrap();
    let agent = Agent::start(AgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("agent"),
        admin_token: AGENT_TOKEN.into(),
        plugins: BTreeMap::from([("memory".to_string(), spec("memory", Default::default()))]),
        driver: Some(DriverConfig {
            plugin: "memory".into(),
            endpoint: format!("memory:tls-{}", uuid::Uuid::new_v4()),
            username: None,
            password: None,
            token: None,
            password_file: None,
            token_file: None,
            guest_plugin: None,
            migration_uri: None,
            reconcile_period_ms: 60_000,
            reservation_seconds: 60,
        }),
        tls: Some(TlsConfig {
            cert: agent_cert,
            key: agent_key,
            client_fingerprints: vec![site_fp.clone()],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let agent_url = format!("https://{}", agent.addr);

    let mut config = SiteConfig::new(dir.path().join("site"), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tls = Some(TlsConfig {
        cert: site_cert.clone(),
        key: site_key.clone(),
        client_fingerprints: vec![],
    });
    config.agent_tls = ClientTls {
        cert: Some(site_cert),
        key: Some(site_key),
        ..Default::default()
    };
    let site = Site::start(config).await.unwrap();
    let pin = |f: &str| ClientTls {
        fingerprint: Some(f.to_string()),
        ..Default::default()
    };
    let admin = Client::with_tls(
        &format!("https://{}", site.addr),
        Some(ADMIN.into()),
        &pin(&site_fp),
    )
    .unwrap();

    // A wrong pin for the agent: refused, nothing registered.
    let wrong = admin
        .call::<_, Value>(
            Method::POST,
            "/v1/agents",
            Some(&json!({ "id": "a-0", "url": agent_url, "token": AGENT_TOKEN, "fingerprint": site_fp })),
        )
        .await
        .unwrap_err();
    assert_eq!(wrong.status, 503, "{wrong}");
    assert!(wrong.message.contains("fingerprint"), "{wrong}");
    // The right pin: registered, and a request runs over mutual TLS.
    let _: Value = admin
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({ "id": "a-0", "url": agent_url, "token": AGENT_TOKEN, "fingerprint": agent_fp })),
        )
        .await
        .unwrap();
    let u: Value = admin
        .call(Method::POST, "/v1/users", Some(&json!({ "name": "tls" })))
        .await
        .unwrap();
    let user = Client::with_tls(
        &format!("https://{}", site.addr),
        Some(u["token"].as_str().unwrap().into()),
        &pin(&site_fp),
    )
    .unwrap();
    let j = job(&user, "/v1/vms", json!({ "main-memory-mib": 128 })).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    assert_eq!(vm.agent, "a-0");

    // The agent admits no client without the site's certificate, even with its token.
    let outsider = Client::with_tls(&agent_url, Some(AGENT_TOKEN.into()), &pin(&agent_fp)).unwrap();
    assert!(outsider.get::<Value>("/v1/vms").await.is_err());

    // At rest: the site's database holds the agent secret sealed, never in clear.
    let rec = site.core.store.agent("a-0").unwrap().unwrap();
    assert!(gve::sealing::Sealer::is_sealed(&rec.token) && !rec.token.contains(AGENT_TOKEN));
    site.stop().await;
    let raw = std::fs::read(dir.path().join("site/site.redb")).unwrap();
    let needle = AGENT_TOKEN.as_bytes();
    assert!(
        !raw.windows(needle.len()).any(|w| w == needle),
        "the agent secret is in site.redb in clear"
    );
    agent.stop().await;
}
