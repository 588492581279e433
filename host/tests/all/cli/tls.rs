//! The CLI over mutual TLS: a site and an agent that admit only clients presenting
//! a certificate they list (`tls.client-fingerprints`). Without one the CLI is
//! refused at the handshake, whatever its token; with `--cert`/`--key` (or a named
//! site that keeps them) it works; half an identity is a usage error.

use gve::api::tls::{self_signed, TlsConfig};
use gve::site::{Site, SiteConfig};

use super::{run, Run};
use crate::site::{ADMIN, AGENT_TOKEN};
use crate::support::spec;

/// Runs `gve ARGS` with `envs` only (no GVE_* from the caller's environment).
async fn gve(envs: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"));
    cmd.args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(envs.iter().copied());
    run(cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_presents_a_client_certificate_where_one_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let (site_cert, site_key, site_fp) = self_signed(&tls, "site", &["127.0.0.1"]).unwrap();
    let (agent_cert, agent_key, agent_fp) = self_signed(&tls, "agent", &["127.0.0.1"]).unwrap();
    let (me_cert, me_key, me_fp) = self_signed(&tls, "me", &["alice"]).unwrap();
    let (other_cert, other_key, _) = self_signed(&tls, "other", &["mallory"]).unwrap();

    let mut config = SiteConfig::new(dir.path().join("site"), ADMIN.into());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tls = Some(TlsConfig {
        cert: site_cert,
        key: site_key,
        client_fingerprints: vec![me_fp.clone()],
    });
    let site = Site::start(config).await.unwrap();
    let url = format!("https://{}", site.addr);
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (me_cert, me_key, other_cert, other_key) =
        (s(&me_cert), s(&me_key), s(&other_cert), s(&other_key));
    let base = [
        ("GVE_URL", url.as_str()),
        ("GVE_TOKEN", ADMIN),
        ("GVE_FINGERPRINT", site_fp.as_str()),
    ];

    // No certificate, or one the site does not list: refused before the token is
    // looked at (unavailable, exit 3), the admin token notwithstanding.
    for (extra, why) in [
        (vec![], "presented none"),
        (
            vec!["--cert", &other_cert, "--key", &other_key],
            "does not list the one this client presented",
        ),
    ] {
        let args: Vec<&str> = ["user", "me"].into_iter().chain(extra).collect();
        let r = gve(&base, &args).await;
        assert_eq!(r.code, 3, "{args:?}: {}", r.out);
        assert!(!r.out.contains("admin"), "{args:?}: {}", r.out);
        assert!(r.err.contains(why), "{args:?}: {}", r.err);
    }
    // Its own: admitted.
    let r = gve(
        &base,
        &[
            "user", "me", "-o", "json", "--cert", &me_cert, "--key", &me_key,
        ],
    )
    .await
    .ok();
    assert_eq!(r.json()["name"], "admin");
    // The same from the environment.
    let mut with_env = base.to_vec();
    with_env.extend([("GVE_CERT", me_cert.as_str()), ("GVE_KEY", me_key.as_str())]);
    gve(&with_env, &["user", "me"]).await.ok();
    // Half an identity is a usage error (2) that says what is missing, not a
    // connection silently made without a certificate.
    let r = gve(&base, &["user", "me", "--cert", &me_cert]).await;
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("key"), "{}", r.err);

    // A named site keeps the certificate and uses it (and only it).
    let config = dir.path().join("cfg/sites.toml");
    let named = [("GVE_CONFIG", config.to_str().unwrap())];
    let add = |name: &'static str| -> Vec<&str> {
        let mut v = vec!["site", "add", name, "--url", &url, "--token", ADMIN];
        v.extend(["--fingerprint", &site_fp]);
        v
    };
    let mut alpha = add("alpha");
    alpha.extend(["--cert", &me_cert, "--key", &me_key]);
    gve(&named, &alpha).await.ok();
    let kept = std::fs::read_to_string(&config).unwrap();
    assert!(kept.contains(&me_cert) && kept.contains(&me_key), "{kept}");
    let r = gve(&named, &["user", "me", "-o", "json"]).await.ok();
    assert_eq!(r.json()["name"], "admin");
    // `site add` checks the site with the certificate given; without one it fails
    // and keeps nothing.
    assert_ne!(gve(&named, &add("beta")).await.code, 0);
    assert!(!std::fs::read_to_string(&config).unwrap().contains("beta"));

    // An agent that admits only an operator's certificate: `gve plugin` and `gve
    // agent audit` present it.
    let (agent, _client, _agent_dir) = gve_harness::agent::start(
        "memory",
        spec("memory", Default::default()),
        &format!("memory:cli-tls-{}", uuid::Uuid::new_v4()),
        AGENT_TOKEN,
        |c| {
            c.tls = Some(TlsConfig {
                cert: agent_cert,
                key: agent_key,
                client_fingerprints: vec![me_fp.clone()],
            })
        },
    )
    .await;
    let agent_url = format!("https://{}", agent.addr);
    let at_agent = [
        ("GVE_AGENT_URL", agent_url.as_str()),
        ("GVE_TOKEN", AGENT_TOKEN),
        ("GVE_AGENT_FINGERPRINT", agent_fp.as_str()),
        ("GVE_AGENT_SECRET", AGENT_TOKEN),
    ];
    assert_ne!(gve(&at_agent, &["plugin", "list"]).await.code, 0);
    let r = gve(
        &at_agent,
        &[
            "plugin", "list", "-o", "json", "--cert", &me_cert, "--key", &me_key,
        ],
    )
    .await
    .ok();
    assert!(r.out.contains("memory"), "{}", r.out);
    let audit = ["agent", "audit", "--agent-url", &agent_url];
    assert_ne!(gve(&at_agent, &audit).await.code, 0);
    let mut at_agent_env = at_agent.to_vec();
    at_agent_env.extend([
        ("GVE_AGENT_CERT", me_cert.as_str()),
        ("GVE_AGENT_KEY", me_key.as_str()),
    ]);
    gve(&at_agent_env, &audit).await.ok();
    // The site's --cert/--key given to a command that talks to the agent were
    // ignored; they are a usage error naming the agent's flag.
    let mut with_site_flags = audit.to_vec();
    with_site_flags.extend(["--cert", &me_cert, "--key", &me_key]);
    let r = gve(&at_agent, &with_site_flags).await;
    assert_eq!(r.code, 2, "stdout: {}\nstderr: {}", r.out, r.err);
    assert!(
        r.err.contains("--cert") && r.err.contains("--agent-cert"),
        "{}",
        r.err
    );
    let r = gve(&at_agent, &["agent", "audit", "--url", &agent_url]).await;
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("--agent-url"), "{}", r.err);
    // From the environment they are the site's, there for other commands: left alone.
    at_agent_env.extend([("GVE_CERT", me_cert.as_str()), ("GVE_KEY", me_key.as_str())]);
    gve(&at_agent_env, &audit).await.ok();
    // But a flag that differs from its variable was typed for this command.
    let r = gve(
        &at_agent_env,
        &["agent", "audit", "--cert", "/tmp/another.pem"],
    )
    .await;
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("--agent-cert"), "{}", r.err);
    // `run` talks to no site at all.
    let r = gve(
        &[],
        &[
            "agent",
            "run",
            "--url",
            &agent_url,
            "--config",
            "/nonexistent",
        ],
    )
    .await;
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("talks to no site"), "{}", r.err);
}
