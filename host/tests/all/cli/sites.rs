//! Many sites, one view: `gve site add|use|list|remove`, `--site` / `GVE_SITE`,
//! `--all-sites` listings and `vm request --any-site`, run as the real binary
//! against two real sites (each with its own memory-driver agent).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gve::site::model::UserView;
use hyper::Method;
use serde_json::{json, Value};

use super::{run, Run};
use crate::site::{env, Env};

/// Runs `gve ARGS` with the sites file `config`, nothing about a site in the
/// environment but `extra`.
async fn gve_at(config: &Path, extra: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = crate::support::gve_command(extra, args);
    cmd.env("GVE_CONFIG", config);
    run(cmd).await
}

/// Makes user `name` at `e` with `quota`; returns their token.
async fn user_at(e: &Env, name: &str, quota: Value) -> String {
    let u: UserView = e
        .admin
        .call(
            Method::POST,
            "/v1/users",
            Some(&json!({ "name": name, "quota": quota })),
        )
        .await
        .unwrap();
    u.token.unwrap()
}

fn url(e: &Env) -> String {
    format!("http://{}", e.site.addr)
}

/// The site names of a JSON listing, in order.
fn sites_of(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["site"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_user_works_with_two_sites_from_one_cli() {
    let alpha = env(1, |c| c.site_id = "alpha".into()).await;
    let beta = env(1, |c| c.site_id = "beta".into()).await;
    let one_vm = json!({ "logical-cpus": 64, "main-memory-mib": 1_000_000, "vms": 1 });
    let many = json!({ "logical-cpus": 64, "main-memory-mib": 1_000_000, "vms": 10 });
    let ta = user_at(&alpha, "alice", one_vm).await;
    let tb = user_at(&beta, "alice", many).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("conf/gve/sites.toml");
    let (ua, ub) = (url(&alpha), url(&beta));

    // Adding checks the token; a wrong one keeps nothing (exit 5).
    let bad = gve_at(
        &cfg,
        &[],
        &["site", "add", "alpha", "--url", &ua, "--token", "gve_wrong"],
    )
    .await;
    assert_eq!(bad.code, 5, "{}", bad.err);
    assert!(!cfg.exists(), "nothing kept after a failed check");
    let r = gve_at(
        &cfg,
        &[],
        &["site", "add", "alpha", "--url", &ua, "--token", &ta],
    )
    .await
    .ok();
    assert!(
        r.err.contains("signed in as alice") && r.err.contains("current"),
        "{}",
        r.err
    );
    // The token may come from GVE_TOKEN; a second add of one name needs --replace.
    // GVE_TOKEN (perhaps another site's) is never what `site add` sends or keeps:
    // without --token the check goes without one and fails.
    let from_env = gve_at(
        &cfg,
        &[("GVE_TOKEN", &ta)],
        &["site", "add", "beta", "--url", &ub],
    )
    .await;
    assert_eq!(from_env.code, 5, "{}", from_env.err);
    assert!(!std::fs::read_to_string(&cfg).unwrap().contains("beta"));
    gve_at(
        &cfg,
        &[],
        &["site", "add", "beta", "--url", &ub, "--token", &tb],
    )
    .await
    .ok();
    let dup = gve_at(
        &cfg,
        &[],
        &["site", "add", "beta", "--url", &ub, "--no-check"],
    )
    .await;
    assert_eq!(dup.code, 2, "{}", dup.err);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cfg), 0o600);
    assert_eq!(mode(cfg.parent().unwrap()), 0o700);
    let listed = gve_at(&cfg, &[], &["site", "list", "-o", "json"])
        .await
        .ok();
    assert!(
        !listed.out.contains(&ta) && !listed.out.contains(&tb),
        "no token is listed"
    );
    let listed = listed.json();
    assert_eq!(listed[0]["name"], "alpha");
    assert_eq!(listed[0]["current"], true);
    assert_eq!(listed[1]["current"], false);

    // No site named: the current one (alpha). --site / GVE_SITE: that site, with
    // its own token even when the environment holds another site's.
    let on_alpha = gve_at(
        &cfg,
        &[],
        &[
            "vm",
            "request",
            "--template",
            "debian-12",
            "--memory-mib",
            "256",
            "--wait",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(on_alpha["state"], "succeeded", "{on_alpha}");
    let env_of_alpha = [("GVE_URL", ua.as_str()), ("GVE_TOKEN", ta.as_str())];
    let on_beta = gve_at(
        &cfg,
        &env_of_alpha,
        &[
            "vm",
            "request",
            "--site",
            "beta",
            "--template",
            "alpine-3",
            "--memory-mib",
            "128",
            "--wait",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert!(
        on_beta.err.contains("using site beta")
            && on_beta
                .err
                .contains("ignoring --url/GVE_URL and --token/GVE_TOKEN"),
        "{}",
        on_beta.err
    );
    let on_beta = on_beta.json();
    assert_eq!(on_beta["state"], "succeeded", "{on_beta}");
    let beta_vms: Vec<Value> = beta.admin.get("/v1/vms?all=true").await.unwrap();
    assert_eq!(beta_vms.len(), 1, "{beta_vms:?}");
    let seen = gve_at(
        &cfg,
        &[("GVE_SITE", "beta"), ("GVE_TOKEN", "gve_wrong")],
        &["vm", "list", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(seen[0]["id"], on_beta["result"]["id"]);
    let unknown = gve_at(&cfg, &[], &["vm", "list", "--site", "gamma"]).await;
    assert_eq!(unknown.code, 2);
    assert!(unknown.err.contains("alpha, beta"), "{}", unknown.err);

    // Every site at once, each row with its site.
    let all = gve_at(&cfg, &[], &["vm", "list", "--all-sites", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(sites_of(&all), ["alpha", "beta"]);
    let table = gve_at(&cfg, &[], &["vm", "list", "--all-sites"])
        .await
        .ok()
        .out;
    assert!(table.starts_with("SITE"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("alpha"))
            && table.lines().any(|l| l.starts_with("beta")),
        "{table}"
    );
    let jobs = gve_at(&cfg, &[], &["job", "list", "--all-sites", "-o", "json"])
        .await
        .ok()
        .json();
    let mut job_sites = sites_of(&jobs);
    job_sites.sort();
    assert_eq!(job_sites, ["alpha", "beta"]);

    // --any-site: alpha has no quota left, so beta gets it, and says why.
    let any = gve_at(
        &cfg,
        &[],
        &[
            "vm",
            "request",
            "--any-site",
            "--template",
            "debian-12",
            "--memory-mib",
            "256",
            "--wait",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert!(any.err.contains("placing on site beta"), "{}", any.err);
    assert!(any.err.contains("alpha: your quota is full"), "{}", any.err);
    assert_eq!(any.json()["state"], "succeeded");
    let beta_vms: Vec<Value> = beta.admin.get("/v1/vms?all=true").await.unwrap();
    assert_eq!(beta_vms.len(), 2);
    // More memory than any site's published room: refused before any job (3).
    let none = gve_at(
        &cfg,
        &[],
        &[
            "vm",
            "request",
            "--any-site",
            "--template",
            "debian-12",
            "--memory-mib",
            "70000",
        ],
    )
    .await;
    assert_eq!(none.code, 3, "{}", none.err);
    assert!(
        none.err.contains("no site has room") && none.err.contains("beta: 65"),
        "{}",
        none.err
    );
    let none = gve_at(
        &cfg,
        &[],
        &["vm", "request", "--any-site", "--template", "nope"],
    )
    .await;
    assert!(
        none.err.contains("beta: no template 'nope'"),
        "{}",
        none.err
    );
    let jobs_at_beta: Vec<Value> = beta.admin.get("/v1/jobs?all=true").await.unwrap();
    assert_eq!(jobs_at_beta.len(), 2, "refused requests submitted nothing");

    // One site down: partial results and a warning, not a failure.
    beta.site.stop().await;
    let partial = gve_at(&cfg, &[], &["vm", "list", "--all-sites", "-o", "json"])
        .await
        .ok();
    assert_eq!(sites_of(&partial.json()), ["alpha"]);
    assert!(
        partial.err.contains("warning: site beta") && partial.err.contains("1 of 2 sites"),
        "{}",
        partial.err
    );

    // use / remove; a file others can read is refused with the fix.
    gve_at(&cfg, &[], &["site", "use", "beta"]).await.ok();
    gve_at(&cfg, &[], &["site", "remove", "beta"]).await.ok();
    let listed = gve_at(&cfg, &[], &["site", "list", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(
        listed[0]["current"], false,
        "the removed site was the current one"
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = gve_at(&cfg, &[], &["vm", "list", "--site", "alpha"]).await;
    assert_eq!(open.code, 2);
    assert!(open.err.contains("chmod 600"), "{}", open.err);
    alpha.site.stop().await;
}
