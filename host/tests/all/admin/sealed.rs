//! Credentials given to an agent at runtime (a driver's password, a plugin's
//! config values) are recorded sealed under `agent.key`: a copy of `agent.redb`
//! alone holds none of them; a record from before they were sealed is sealed at
//! the next start; a lost key is a clear error, never a login with the wrong one.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gve::agent::registry::Registry;
use gve::agent::Agent;
use gve::plugin::PluginSummary;
use hyper::Method;
use serde_json::{json, Value};

use super::{client, memory_config};

/// The memory plugin's session password: it refuses a driver session without it.
const PASSWORD: &str = "sealed-test-password-5d1f0c";

/// Gives the memory plugin a `password` config value and the agent a memory driver
/// presenting it, both through the API.
async fn set_up(agent: &Agent, endpoint: &str) {
    let c = client(agent);
    let _: PluginSummary = c
        .call(
            Method::PUT,
            "/v1/plugins/memory",
            Some(&json!({ "grants": { "config": { "password": PASSWORD } } })),
        )
        .await
        .unwrap();
    // A wrong password is refused: the plugin checks it.
    let e = c
        .call::<_, Value>(
            Method::PUT,
            "/v1/driver",
            Some(&json!({ "plugin": "memory", "endpoint": endpoint, "password": "wrong" })),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status, 503, "{e}");
    let _: Value = c
        .call(
            Method::PUT,
            "/v1/driver",
            Some(&json!({ "plugin": "memory", "endpoint": endpoint, "password": PASSWORD })),
        )
        .await
        .unwrap();
}

/// Whether the agent's driver is up: its VM listing answers.
async fn driver_up(agent: &Agent) -> bool {
    client(agent).get::<Value>("/v1/vms").await.is_ok()
}

/// Whether `path`'s bytes hold `needle`.
fn holds(path: &Path, needle: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The driver's and the memory plugin's records as the database holds them.
fn records(db: &Path) -> (String, String) {
    let r = Registry::open(db).unwrap();
    (
        r.meta("driver").unwrap().unwrap(),
        r.meta("plugin:memory").unwrap().unwrap(),
    )
}

/// Writes the driver's and the memory plugin's records with the password in the
/// clear, as a release before sealing did; `edit` changes the plugin's record.
fn write_clear_records(db: &Path, endpoint: &str, edit: impl Fn(&mut Value)) {
    let r = Registry::open(db).unwrap();
    let plain = json!({ "plugin": "memory", "endpoint": endpoint, "password": PASSWORD });
    r.write(|t| t.set_meta("driver", &plain.to_string()))
        .unwrap();
    let plugin = r.meta("plugin:memory").unwrap().unwrap();
    let mut rec: Value = serde_json::from_str(&plugin).unwrap();
    rec["spec"]["grants"]["config"]["password"] = json!(PASSWORD);
    edit(&mut rec);
    r.write(|t| t.set_meta("plugin:memory", &rec.to_string()))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_given_at_runtime_are_recorded_sealed_and_a_lost_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (db, key) = (dir.path().join("agent.redb"), dir.path().join("agent.key"));
    let endpoint = format!("memory:sealed-{}", uuid::Uuid::new_v4());
    let agent = Agent::start(memory_config(dir.path())).await.unwrap();
    set_up(&agent, &endpoint).await;
    assert!(driver_up(&agent).await);
    agent.stop().await;

    // Neither value is anywhere in the database file; both records hold them sealed.
    assert!(
        !holds(&db, PASSWORD),
        "agent.redb holds the password in the clear"
    );
    let (driver, plugin) = records(&db);
    let driver: Value = serde_json::from_str(&driver).unwrap();
    let sealed = driver["password"].as_str().unwrap();
    assert!(gve::sealing::Sealer::is_sealed(sealed), "{driver}");
    assert!(plugin.contains("sealed-v1:"), "{plugin}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "agent.key is readable by others: {mode:o}");

    // A restart unseals both: the plugin takes the driver's password again.
    let again = Agent::start(memory_config(dir.path())).await.unwrap();
    assert!(
        driver_up(&again).await,
        "the driver came back with its password"
    );
    again.stop().await;

    // Without the key the records cannot be read: the start fails naming the key,
    // rather than presenting something else as the password.
    std::fs::rename(&key, dir.path().join("agent.key.kept")).unwrap();
    let e = Agent::start(memory_config(dir.path()))
        .await
        .err()
        .expect("a driver record sealed under a lost key must not start");
    let msg = e.to_string();
    assert!(
        msg.contains("password") && msg.contains("agent.key") && !msg.contains(PASSWORD),
        "{msg}"
    );
    std::fs::rename(dir.path().join("agent.key.kept"), &key).unwrap();
    let back = Agent::start(memory_config(dir.path())).await.unwrap();
    assert!(driver_up(&back).await, "the key put back opens the records");
    back.stop().await;

    // Records written in the clear (by a release before sealing) still start the
    // agent, and are sealed by that start.
    write_clear_records(&db, &endpoint, |_| {});
    let old = Agent::start(memory_config(dir.path())).await.unwrap();
    assert!(driver_up(&old).await, "clear records from before are read");
    old.stop().await;
    let (driver, plugin) = records(&db);
    assert!(
        !driver.contains(PASSWORD) && driver.contains("sealed-v1:"),
        "{driver}"
    );
    assert!(
        !plugin.contains(PASSWORD) && plugin.contains("sealed-v1:"),
        "{plugin}"
    );
}

/// Clear records from before sealing are sealed at the next start also when they
/// are not used: a driver record under a config file that now has `[driver]`, a
/// plugin record the policy now refuses. A key others may read stops the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_records_are_sealed_even_unused_and_a_key_others_may_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agent.redb");
    let endpoint = format!("memory:sealed-{}", uuid::Uuid::new_v4());
    let agent = Agent::start(memory_config(dir.path())).await.unwrap();
    set_up(&agent, &endpoint).await;
    agent.stop().await;
    // Beyond the test policy (HTTP to 127.0.0.1:9 only): not restored.
    write_clear_records(&db, &endpoint, |rec| {
        rec["spec"]["grants"]["http"] = json!(["192.0.2.1:443"])
    });
    let mut config = memory_config(dir.path());
    config.driver = Some(gve_harness::agent::driver("memory", &endpoint));
    let agent = Agent::start(config).await.unwrap();
    // The config file's plugin (no password) and driver are in force.
    assert!(driver_up(&agent).await);
    agent.stop().await;
    let (driver, plugin) = records(&db);
    assert!(
        !driver.contains(PASSWORD) && driver.contains("sealed-v1:"),
        "{driver}"
    );
    assert!(
        !plugin.contains(PASSWORD) && plugin.contains("sealed-v1:") && plugin.contains("192.0.2.1"),
        "the record is sealed as it was: {plugin}"
    );

    let key = dir.path().join("agent.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Agent::start(memory_config(dir.path()))
        .await
        .err()
        .expect("a key others may read must not be used");
    let msg = e.to_string();
    assert!(
        msg.contains("agent.key") && msg.contains("open to other users"),
        "{msg}"
    );
}
