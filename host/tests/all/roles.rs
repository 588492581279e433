//! Roles across releases: a user record whose role this release does not know (one
//! a later release added, read after a downgrade) is listed under its own name,
//! opens no route, is written back unchanged, and cannot be given to a new user.

use gve::api::client::Client;
use gve::site::auth;
use gve::site::model::{now_ms, Quota, Role, User, UserView};
use hyper::Method;
use serde_json::{json, Value};

use crate::site::env;

/// The role's name as the site's database holds it.
fn stored_role(e: &crate::site::Env, name: &str) -> String {
    let u = e.site.core.store.user(name).unwrap().unwrap();
    let raw = serde_json::to_value(&u).unwrap();
    raw["role"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_from_a_later_release_grants_nothing_and_survives_rewrites() {
    let e = env(0, |_| {}).await;
    let base = e.admin.base().to_string();
    let token = auth::new_token();
    // The record a later release would have written.
    e.site
        .core
        .store
        .write(|t| {
            t.put_user(&User {
                name: "auditor-1".into(),
                role: Role::from_name("auditor"),
                token_sha256: auth::hash(&token),
                quota: Quota::default(),
                created_ms: now_ms(),
            })
        })
        .unwrap();
    let alice = e.user("alice", None).await;

    // The admin's listing decodes (as the CLI decodes it) and names the role.
    let users: Vec<UserView> = e.admin.get_pages("/v1/users", usize::MAX).await.unwrap();
    let listed = users.iter().find(|u| u.name == "auditor-1").unwrap();
    assert_eq!(listed.role, Role::Other("auditor".into()));
    let raw: Value = e.admin.get("/v1/users/auditor-1").await.unwrap();
    assert_eq!(raw["role"], "auditor");

    // Its token opens nothing: not its own record, the metrics, a listing, a request.
    let its = Client::new(&base, Some(token.clone())).unwrap();
    for (method, path) in [
        (Method::GET, "/v1/me"),
        (Method::GET, "/metrics"),
        (Method::GET, "/v1/glue2"),
        (Method::GET, "/v1/vms"),
        (Method::GET, "/v1/jobs"),
        (Method::GET, "/v1/users"),
        (Method::GET, "/v1/agents"),
        (Method::GET, "/v1/audit"),
        (Method::POST, "/v1/users/auditor-1/token"),
    ] {
        let err = its
            .call::<_, Value>(method.clone(), path, None::<&Value>)
            .await
            .unwrap_err();
        assert_eq!(err.status, 403, "{method} {path}: {err:?}");
        assert!(err.message.contains("'auditor'"), "{err:?}");
    }
    let err = its
        .call::<_, Value>(
            Method::POST,
            "/v1/vms",
            Some(&json!({ "template": "debian-12", "main-memory-mib": 256 })),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status, 403, "{err:?}");
    // A user still sees nothing of it.
    let err = alice.get::<Value>("/v1/users/auditor-1").await.unwrap_err();
    assert_eq!(err.status, 404, "{err:?}");

    // The admin's rewrites keep the role it had.
    let q: Value = e
        .admin
        .call(
            Method::PUT,
            "/v1/users/auditor-1/quota",
            Some(&json!({ "vms": 2, "logical-cpus": 2, "main-memory-mib": 1024 })),
        )
        .await
        .unwrap();
    assert_eq!(q["role"], "auditor");
    assert_eq!(stored_role(&e, "auditor-1"), "auditor");
    let rotated: Value = e
        .admin
        .call(Method::POST, "/v1/users/auditor-1/token", None::<&Value>)
        .await
        .unwrap();
    assert_eq!(rotated["role"], "auditor");
    assert_eq!(stored_role(&e, "auditor-1"), "auditor");
    let new_token = rotated["token"].as_str().unwrap().to_string();
    let err = Client::new(&base, Some(new_token))
        .unwrap()
        .get::<Value>("/v1/me")
        .await
        .unwrap_err();
    assert_eq!(err.status, 403, "{err:?}");
    let err = its.get::<Value>("/v1/me").await.unwrap_err();
    assert_eq!(err.status, 401, "the old token is gone: {err:?}");

    // No new user is given a role this release does not know, whatever its name.
    for role in ["auditor", "other", "Admin", ""] {
        let err = e
            .admin
            .call::<_, Value>(
                Method::POST,
                "/v1/users",
                Some(&json!({ "name": "carol", "role": role })),
            )
            .await
            .unwrap_err();
        assert_eq!(err.status, 400, "{role:?}: {err:?}");
        assert!(err.message.contains("admin, user, monitor"), "{err:?}");
    }
    assert!(e.site.core.store.user("carol").unwrap().is_none());

    // And the admin can remove it.
    let _: Value = e
        .admin
        .call(Method::DELETE, "/v1/users/auditor-1", None::<&Value>)
        .await
        .unwrap();
    assert!(e.site.core.store.user("auditor-1").unwrap().is_none());
}
