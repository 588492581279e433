//! The agent's VM API over HTTP, on the memory driver: asynchronous operations,
//! bad input, reservations, reconciliation with out-of-band changes, and recovery of
//! operations interrupted by a restart.

use std::time::{Duration, Instant};

use gve::agent::model::{Event, OpKind, OpState, Operation, VmRecord, VmState};
use gve::agent::Agent;
use gve::api::client::Client;
use gve::api::ApiError;
use gve::plugin::Grants;
use hyper::Method;
use serde_json::{json, Value};

use crate::support::{no_creds, spec};

pub const TOKEN: &str = "agent-test-token-0123456789";

/// Starts an agent whose driver is `plugin` (from `spec`) on `endpoint`.
pub async fn start_agent(
    plugin: &str,
    spec: gve::plugin::PluginSpec,
    endpoint: &str,
    reconcile_ms: u64,
) -> (Agent, Client, tempfile::TempDir) {
    gve_harness::agent::start(
        plugin,
        spec,
        endpoint,
        TOKEN,
        gve_harness::agent::reconcile_every(reconcile_ms),
    )
    .await
}

async fn agent(endpoint: &str, reconcile_ms: u64) -> (Agent, Client, tempfile::TempDir) {
    start_agent(
        "memory",
        spec("memory", Grants::default()),
        endpoint,
        reconcile_ms,
    )
    .await
}

/// POSTs a JSON body.
pub async fn post(c: &Client, path: &str, body: Value) -> Result<Value, ApiError> {
    c.call(Method::POST, path, Some(&body)).await
}

/// Submits an operation and waits (up to 60 s) for its end.
pub async fn run_op(c: &Client, path: &str, body: Value) -> Operation {
    run_op_within(c, path, body, Duration::from_secs(60)).await
}

/// Submits an operation and waits (up to `limit`) for its end.
pub async fn run_op_within(c: &Client, path: &str, body: Value, limit: Duration) -> Operation {
    let op: Operation = serde_json::from_value(post(c, path, body).await.unwrap()).unwrap();
    assert_eq!(op.state, OpState::Running);
    wait_op_within(c, &op.id, limit).await
}

/// Waits (up to 60 s) for an operation's end.
pub async fn wait_op(c: &Client, id: &str) -> Operation {
    wait_op_within(c, id, Duration::from_secs(60)).await
}

/// Waits (up to `limit`) for an operation's end.
pub async fn wait_op_within(c: &Client, id: &str, limit: Duration) -> Operation {
    let end = Instant::now() + limit;
    loop {
        let now: Operation = c
            .get(&format!("/v1/operations/{id}?wait-ms=5000"))
            .await
            .unwrap();
        if now.state != OpState::Running {
            return now;
        }
        assert!(Instant::now() < end, "operation {id} did not finish");
    }
}

fn profile(name: &str) -> Value {
    json!({ "name": name, "logical-cpus": 2, "main-memory-mib": 256, "template": "debian-12",
            "os-family": "linux", "labels": { "owner": "alice" } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_run_asynchronously_and_update_the_registry() {
    let (agent, c, _dir) = agent("memory:ops", 60_000).await;
    let templates: Vec<Value> = c.get("/v1/templates").await.unwrap();
    assert!(templates.iter().any(|t| t["name"] == "debian-12"));

    let op = run_op(&c, "/v1/vms", profile("web-1")).await;
    assert_eq!(
        (op.kind, op.state),
        (OpKind::Create, OpState::Succeeded),
        "{op:?}"
    );
    let vm = op.result.unwrap();
    assert_eq!((vm.state, vm.logical_cpus), (VmState::Stopped, 2));
    let rec: VmRecord = c.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
    assert_eq!(rec.vm.labels["owner"], "alice");

    for (action, body, state) in [
        ("start", json!({}), VmState::Running),
        ("suspend", json!({}), VmState::Suspended),
        ("resume", json!({}), VmState::Running),
        ("shutdown", json!({ "force": false }), VmState::Stopped),
    ] {
        let op = run_op(&c, &format!("/v1/vms/{}/{action}", vm.id), body).await;
        assert_eq!(op.state, OpState::Succeeded, "{action}: {op:?}");
        let rec: VmRecord = c.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
        assert_eq!(rec.vm.state, state, "after {action}");
    }

    let linked = run_op(
        &c,
        "/v1/vms/debian-12/clone",
        json!({ "name": "web-2", "linked": true }),
    )
    .await;
    assert_eq!(linked.state, OpState::Succeeded, "{linked:?}");
    let full = run_op(
        &c,
        &format!("/v1/vms/{}/clone", vm.id),
        json!({ "name": "web-3" }),
    )
    .await;
    assert_eq!(full.result.as_ref().unwrap().main_memory_mib, 256);
    let vms: Vec<VmRecord> = c.get("/v1/vms").await.unwrap();
    assert_eq!(vms.len(), 3);

    let gone = run_op(
        &c,
        &format!("/v1/vms/{}/destroy", full.result.unwrap().id),
        json!({}),
    )
    .await;
    assert_eq!(gone.state, OpState::Succeeded);
    let vms: Vec<VmRecord> = c.get("/v1/vms").await.unwrap();
    assert_eq!(vms.len(), 2);
    // DELETE is the same operation.
    let linked_id = linked.result.unwrap().id;
    let op: Operation = c
        .call::<(), _>(hyper::Method::DELETE, &format!("/v1/vms/{linked_id}"), None)
        .await
        .unwrap();
    let op = wait_op(&c, &op.id).await;
    assert_eq!((op.kind, op.state), (OpKind::Destroy, OpState::Succeeded));
    let vms: Vec<VmRecord> = c.get("/v1/vms").await.unwrap();
    assert_eq!(vms.len(), 1);

    let events: Vec<Event> = c.get("/v1/events?after=0").await.unwrap();
    let finished = events
        .iter()
        .filter(|e| e.kind == "operation-finished")
        .count();
    assert_eq!(finished, 9, "{events:?}");
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    // Nothing comes after the last possible sequence number (`after + 1` wrapped to 0
    // and answered every event from the start).
    let last = events.last().unwrap().seq;
    for after in [last, u64::MAX - 1, u64::MAX] {
        let none: Vec<Event> = c.get(&format!("/v1/events?after={after}")).await.unwrap();
        assert!(none.is_empty(), "after={after}: {none:?}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_4xx_and_changes_nothing() {
    let (agent, c, _dir) = agent("memory:bad", 60_000).await;
    let vm = run_op(&c, "/v1/vms", profile("b-1")).await.result.unwrap();
    run_op(&c, &format!("/v1/vms/{}/start", vm.id), json!({})).await;
    let ops_before: Vec<Operation> = c.get("/v1/operations").await.unwrap();

    let e = c.get::<Value>("/v1/vms/no-such-vm").await.unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (404, "not-found"));
    let e = post(&c, "/v1/vms/no-such-vm/start", json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.status, 404);
    let e = post(&c, &format!("/v1/vms/{}/start", vm.id), json!({}))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status, e.kind.as_str()),
        (409, "invalid-state"),
        "{}",
        e.message
    );
    assert!(e.message.contains("running"), "{}", e.message);
    let e = post(&c, &format!("/v1/vms/{}/resume", vm.id), json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.status, 409);
    let e = post(&c, "/v1/vms", json!({ "name": "b-2", "tempalte": "x" }))
        .await
        .unwrap_err();
    assert_eq!(e.status, 400);
    assert!(e.message.contains("tempalte"), "{}", e.message);
    let e = post(
        &c,
        "/v1/vms",
        json!({ "name": "b-2", "template": "no-such-template" }),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (e.status, e.kind.as_str()),
        (404, "not-found"),
        "{}",
        e.message
    );
    let e = post(&c, "/v1/vms", profile("b-1")).await.unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (409, "already-exists"));
    let e = post(&c, "/v1/vms/debian-12/start", json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.status, 409, "templates cannot start");
    // Numbers at the edge of their type, named in the answer.
    for (path, body, field) in [
        (
            "/v1/vms".to_string(),
            json!({ "name": "b-3", "main-memory-mib": u64::MAX }),
            "main-memory-mib",
        ),
        (
            "/v1/vms".to_string(),
            json!({ "name": "b-3", "logical-cpus": u32::MAX }),
            "logical-cpus",
        ),
        (
            "/v1/vms".to_string(),
            json!({ "name": "b-3", "disk-mib": u64::MAX }),
            "disk-mib",
        ),
        ("/v1/vms".to_string(), json!({ "name": "a/b" }), "name"),
        // A clone named with a control character once reached the driver, which
        // kept it; every later listing was then refused and reconcile stopped.
        (
            format!("/v1/vms/{}/clone", vm.id),
            json!({ "name": "b\u{1}6" }),
            "name",
        ),
        (
            "/v1/vms".to_string(),
            json!({ "name": "b-4", "labels": { "k\u{1}": "v" } }),
            "labels",
        ),
        (
            "/v1/vms".to_string(),
            json!({ "name": "b-4", "os-name": "deb\nian" }),
            "OS name",
        ),
        (
            format!("/v1/vms/{}/reserve", vm.id),
            json!({ "holder": "h", "seconds": u64::MAX }),
            "seconds",
        ),
    ] {
        let e = post(&c, &path, body.clone()).await.unwrap_err();
        assert_eq!(e.status, 400, "{body}: {e}");
        assert!(e.message.contains(field), "{body}: {e}");
    }
    for q in [
        "/v1/events?limit=0",
        "/v1/events?after=-1",
        "/v1/operations/x?wait-ms=60001",
    ] {
        let e = c.get::<serde_json::Value>(q).await.unwrap_err();
        assert_eq!(e.status, 400, "{q}: {e}");
    }

    // Malformed JSON, straight on the wire.
    let url = format!("http://{}/v1/vms", agent.addr);
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
        ])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .args(["--data", "{\"name\": \"x\",", &url])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");

    let ops_after: Vec<Operation> = c.get("/v1/operations").await.unwrap();
    assert_eq!(
        ops_before.len(),
        ops_after.len(),
        "a refused request created an operation"
    );
    let rec: VmRecord = c.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
    assert_eq!(rec.vm.state, VmState::Running);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_acquire_release() {
    let (agent, c, _dir) = agent("memory:alloc", 60_000).await;
    let vm = run_op(&c, "/v1/vms", profile("r-1")).await.result.unwrap();
    let path = |a: &str| format!("/v1/vms/{}/{a}", vm.id);
    post(&c, &path("reserve"), json!({ "holder": "alice" }))
        .await
        .unwrap();
    let e = post(&c, &path("reserve"), json!({ "holder": "bob" }))
        .await
        .unwrap_err();
    assert_eq!(e.status, 409);
    assert!(e.message.contains("reserved by 'alice'"), "{}", e.message);
    let e = post(&c, &path("acquire"), json!({ "holder": "bob" }))
        .await
        .unwrap_err();
    assert_eq!(e.status, 409);
    let rec: VmRecord = serde_json::from_value(
        post(&c, &path("acquire"), json!({ "holder": "alice" }))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&rec.allocation).unwrap()["state"],
        "acquired"
    );
    // Power operations keep the allocation.
    run_op(&c, &path("start"), json!({})).await;
    let rec: VmRecord = c.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
    assert_eq!(
        serde_json::to_value(&rec.allocation).unwrap()["holder"],
        "alice"
    );
    assert!(post(&c, &path("release"), json!({ "holder": "bob" }))
        .await
        .is_err());
    post(&c, &path("release"), json!({ "holder": "alice" }))
        .await
        .unwrap();
    // A lapsed reservation frees the VM.
    post(
        &c,
        &path("reserve"),
        json!({ "holder": "carol", "seconds": 0 }),
    )
    .await
    .unwrap();
    post(&c, &path("reserve"), json!({ "holder": "dave" }))
        .await
        .unwrap();
    agent.stop().await;
}

/// The sequence number of the agent's newest event (0 when there is none).
pub async fn last_event_seq(c: &Client) -> u64 {
    let events: Vec<Event> = c.get("/v1/events").await.unwrap();
    events.last().map(|e| e.seq).unwrap_or(0)
}

/// Waits (up to 10 s) for an event of `kind` about `vm` after sequence `after`.
pub async fn wait_for_event(c: &Client, after: u64, kind: &str, vm: &str) -> Event {
    wait_for_event_within(c, after, kind, vm, Duration::from_secs(10)).await
}

/// Waits (up to `limit`) for an event of `kind` about `vm` after sequence `after`.
pub async fn wait_for_event_within(
    c: &Client,
    after: u64,
    kind: &str,
    vm: &str,
    limit: Duration,
) -> Event {
    let end = Instant::now() + limit;
    loop {
        let events: Vec<Event> = c.get(&format!("/v1/events?after={after}")).await.unwrap();
        if let Some(e) = events.into_iter().find(|e| e.kind == kind && e.vm == vm) {
            return e;
        }
        assert!(
            Instant::now() < end,
            "no {kind} event for {vm} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_band_changes_show_up_within_the_reconcile_period() {
    let (agent, c, _dir) = agent("memory:oob", 200).await;
    let vm = run_op(&c, "/v1/vms", profile("o-1")).await.result.unwrap();
    let seq = last_event_seq(&c).await;

    // A second session on the same hypervisor: changes behind the agent's back.
    let behind = agent
        .plugins
        .open_driver("memory", "memory:oob", no_creds())
        .await
        .unwrap();
    behind.start(&vm.id).await.unwrap();
    let e = wait_for_event(&c, seq, "vm-state-changed", &vm.id).await;
    assert_eq!(
        (e.detail["from"].as_str(), e.detail["to"].as_str()),
        (Some("stopped"), Some("running"))
    );
    let rec: VmRecord = c.get(&format!("/v1/vms/{}", vm.id)).await.unwrap();
    assert_eq!(rec.vm.state, VmState::Running);

    let stranger = behind
        .create(&gve::plugin::bindings::types::VmProfile {
            name: "stranger".into(),
            logical_cpus: 1,
            main_memory_mib: 128,
            disk_mib: None,
            template: None,
            image: None,
            os_family: None,
            os_name: None,
            os_version: None,
            platform: None,
            network: None,
            labels: vec![],
        })
        .await
        .unwrap();
    wait_for_event(&c, seq, "vm-appeared", &stranger.id).await;

    behind.destroy(&vm.id).await.unwrap();
    wait_for_event(&c, seq, "vm-vanished", &vm.id).await;
    let e = c
        .get::<Value>(&format!("/v1/vms/{}", vm.id))
        .await
        .unwrap_err();
    assert_eq!(e.status, 404);
    agent.stop().await;
}

/// A `memory:<name>?vms=N` endpoint is a host that starts full: its VMs are
/// adopted like any made behind the agent's back, and another instance of the
/// plugin (a restarted agent) finds the same ids; a bad count is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_endpoint_can_start_full_with_the_same_vms_every_time() {
    let endpoint = format!("memory:full-{}?vms=3", uuid::Uuid::new_v4());
    let listed = |c: Client| async move {
        let _: Value = post(&c, "/v1/reconcile", json!({})).await.unwrap();
        let vms: Vec<VmRecord> = c.get("/v1/vms").await.unwrap();
        let mut got: Vec<(String, String)> =
            vms.into_iter().map(|r| (r.vm.name, r.vm.id)).collect();
        got.sort();
        got
    };
    let (first, c, _dir) = agent(&endpoint, 600_000).await;
    let one = listed(c).await;
    assert_eq!(
        one.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["vm-0000000", "vm-0000001", "vm-0000002"]
    );
    let (second, c, _dir2) = agent(&endpoint, 600_000).await;
    assert_eq!(listed(c).await, one, "the same VMs in another instance");
    let (other, c, _dir3) = agent(
        &format!("memory:other-{}?vms=1", uuid::Uuid::new_v4()),
        600_000,
    )
    .await;
    let theirs = listed(c).await;
    assert!(
        one.iter().all(|(_, id)| id != &theirs[0].1),
        "ids differ between endpoints"
    );
    for bad in [
        "memory:x?vms=lots",
        "memory:x?vms=200001",
        "memory:x?cpus=2",
    ] {
        let e = first
            .plugins
            .open_driver("memory", bad, no_creds())
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad} was accepted"));
        assert!(e.to_string().contains("vms=N"), "{bad}: {e}");
    }
    for a in [first, second, other] {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_interrupted_by_a_restart_are_resolved() {
    let (agent, c, _dir) = agent("memory:recover", 60_000).await;
    let vm = run_op(&c, "/v1/vms", profile("rc-1")).await.result.unwrap();
    let core = agent.core().unwrap();
    // Two operations a crashed agent left running: a start that never reached the
    // hypervisor, and a create whose VM does exist.
    let behind = agent
        .plugins
        .open_driver("memory", "memory:recover", no_creds())
        .await
        .unwrap();
    behind.clone_vm(&vm.id, "rc-2", false).await.unwrap();
    let stale = |id: &str, kind: OpKind, vm: &str| Operation {
        id: id.into(),
        kind,
        vm: vm.into(),
        params: json!({}),
        state: OpState::Running,
        result: None,
        output: None,
        error: None,
        created_ms: 1,
        finished_ms: None,
    };
    core.registry
        .write(|t| {
            t.put_op(&stale("op-lost-start", OpKind::Start, &vm.id))?;
            t.put_op(&stale("op-lost-create", OpKind::Create, "rc-2"))?;
            t.put_op(&stale("op-lost-exec", OpKind::Exec, &vm.id))
        })
        .unwrap();
    assert_eq!(core.recover().await.unwrap(), 3);
    // What a command did in the guest cannot be known: failed, saying so.
    let exec: Operation = c.get("/v1/operations/op-lost-exec").await.unwrap();
    assert_eq!(exec.state, OpState::Failed);
    let err = exec.error.unwrap();
    assert_eq!(err.kind, "unavailable");
    assert!(err.message.contains("may have run partly"), "{err:?}");
    let start: Operation = c.get("/v1/operations/op-lost-start").await.unwrap();
    assert_eq!(start.state, OpState::Failed);
    assert!(start
        .error
        .unwrap()
        .message
        .contains("interrupted by an agent restart"));
    let create: Operation = c.get("/v1/operations/op-lost-create").await.unwrap();
    assert_eq!(create.state, OpState::Succeeded);
    assert_eq!(create.result.unwrap().name, "rc-2");
    let ops: Vec<Operation> = c.get("/v1/operations").await.unwrap();
    assert!(ops.iter().all(|o| o.state != OpState::Running));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_operations_use_the_drivers_native_guest_export() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (agent, c, _dir) = agent("memory:guest", 60_000).await;
    let vm = run_op(&c, "/v1/vms", profile("g-1")).await.result.unwrap();
    // A stopped VM's guest cannot answer: refused before anything runs.
    let e = post(
        &c,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["echo"] }),
    )
    .await
    .unwrap_err();
    assert_eq!((e.status, e.kind.as_str()), (409, "invalid-state"), "{e}");
    run_op(&c, &format!("/v1/vms/{}/start", vm.id), json!({})).await;

    let meta: gve::agent::model::FileMeta = c
        .put_stream(
            &format!("/v1/vms/{}/files?path=/etc/motd&mode=0640", vm.id),
            &[],
            gve::api::full(&b"hello from the grid\n"[..]),
        )
        .await
        .unwrap();
    assert_eq!((meta.size, meta.mode), (20, 0o640));
    let op = run_op(
        &c,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["cat", "/etc/motd"] }),
    )
    .await;
    let Some(gve::agent::model::OpOutput::Exec(out)) = op.output else {
        panic!("{op:?}")
    };
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(
        b64.decode(out.stdout_b64).unwrap(),
        b"hello from the grid\n"
    );
    // The operation records the command but not the environment's values.
    let op = run_op(
        &c,
        &format!("/v1/vms/{}/exec", vm.id),
        json!({ "argv": ["true"], "env": { "SECRET": "hunter2" } }),
    )
    .await;
    assert!(!op.params.to_string().contains("hunter2"), "{}", op.params);

    use http_body_util::BodyExt;
    let resp = c
        .get_stream(&format!("/v1/vms/{}/files?path=/etc/motd", vm.id))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-gve-file-mode"], "0640");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello from the grid\n");
    let e = c
        .get::<Value>(&format!("/v1/vms/{}/files", vm.id))
        .await
        .unwrap_err();
    assert_eq!(e.status, 400, "{e}");
    let e = c
        .put_stream::<Value>(
            &format!("/v1/vms/{}/files?path=/x&mode=999", vm.id),
            &[],
            gve::api::full(&b"x"[..]),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status, 400, "{e}");
    // No bundles directory: provision says so.
    let e = post(
        &c,
        &format!("/v1/vms/{}/provision", vm.id),
        json!({ "bundle": "x" }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.status, 501, "{e}");

    // The site this agent serves is recorded in its registry.
    let none: Value = c.get("/v1/site").await.unwrap();
    assert!(none["site"].is_null());
    c.call::<_, Value>(
        Method::PUT,
        "/v1/site",
        Some(&json!({ "id": "site-a", "url": "http://127.0.0.1:1" })),
    )
    .await
    .unwrap();
    let site: Value = c.get("/v1/site").await.unwrap();
    assert_eq!(site["site"]["id"], "site-a");
    agent.stop().await;
}

/// A VM is found by name through an index kept with each record (not by reading
/// every record): a destroyed VM's name is free again, and a registry from before
/// the index gets it built on open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_found_by_name_through_an_index_kept_with_each_record() {
    let (agent, c, dir) = agent("memory:names", 60_000).await;
    let one = run_op(&c, "/v1/vms", profile("n-1")).await.result.unwrap();
    let two = run_op(&c, "/v1/vms", profile("n-2")).await.result.unwrap();
    let by_name: VmRecord = c.get("/v1/vms/n-1").await.unwrap();
    assert_eq!(by_name.vm.id, one.id);
    let op = run_op(&c, &format!("/v1/vms/{}/destroy", one.id), json!({})).await;
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    let e = c.get::<VmRecord>("/v1/vms/n-1").await.unwrap_err();
    assert_eq!(e.status, 404, "{e}");
    let again = run_op(&c, "/v1/vms", profile("n-1")).await;
    assert_eq!(
        again.state,
        OpState::Succeeded,
        "the name is free: {again:?}"
    );
    let again = again.result.unwrap();
    agent.stop().await;

    let path = dir.path().join("agent.redb");
    {
        let db = redb::Database::open(&path).unwrap();
        let w = db.begin_write().unwrap();
        let names: redb::TableDefinition<(&str, &str), ()> = redb::TableDefinition::new("vm_names");
        assert!(w.delete_table(names).unwrap());
        let meta: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("meta");
        assert!(w
            .open_table(meta)
            .unwrap()
            .remove("index:vm-names")
            .unwrap()
            .is_some());
        w.commit().unwrap();
    }
    let reg = gve::agent::registry::Registry::open(&path).unwrap();
    assert_eq!(reg.vm("n-2").unwrap().unwrap().vm.id, two.id);
    assert_eq!(reg.vm("n-1").unwrap().unwrap().vm.id, again.id);
    assert!(reg.vm("n-3").unwrap().is_none());
}

/// Status, headers (names lowercased) and JSON body of one raw HTTP/1.1 request.
pub async fn raw_call(
    base: &str,
    token: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Vec<(String, String)>, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    let text = String::from_utf8(got).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    (
        status,
        headers,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The value of header `name` (lowercase) in `headers`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A request that starts an operation names where it is followed (`Location`);
/// sent with `?wait-ms=N` it is answered when the operation ended (200 with
/// it), an idempotent retry too; a bad `wait-ms` is refused before anything
/// starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_with_wait_ms_is_answered_when_its_operation_ends() {
    let (_agent, c, _dir) = agent("memory:wait", 60_000).await;
    let base = c.base().to_string();
    let body = profile("w-1").to_string();
    let (status, headers, op) =
        raw_call(&base, TOKEN, "POST", "/v1/vms?wait-ms=30000", &body).await;
    assert_eq!(status, 200, "{op}");
    let op: Operation = serde_json::from_value(op).unwrap();
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert!(header(&headers, "location").is_none(), "{headers:?}");
    let vm = op.result.unwrap().id;

    // Without wait-ms: 202 at once, and where to follow it.
    let (status, headers, op) =
        raw_call(&base, TOKEN, "POST", &format!("/v1/vms/{vm}/start"), "{}").await;
    assert_eq!(status, 202, "{op}");
    let op: Operation = serde_json::from_value(op).unwrap();
    assert_eq!(
        header(&headers, "location"),
        Some(format!("/v1/operations/{}", op.id).as_str())
    );
    assert_eq!(wait_op(&c, &op.id).await.state, OpState::Succeeded);

    // Out of range or not a number: 400, and no operation started.
    let ops = |c: Client| async move {
        c.get::<Vec<Operation>>("/v1/operations")
            .await
            .unwrap()
            .len()
    };
    let before = ops(c.clone()).await;
    for bad in ["abc", "60001", "-1"] {
        let (status, _, e) = raw_call(
            &base,
            TOKEN,
            "POST",
            &format!("/v1/vms/{vm}/suspend?wait-ms={bad}"),
            "{}",
        )
        .await;
        assert_eq!(status, 400, "wait-ms={bad}: {e}");
        assert_eq!(e["error"]["kind"], "invalid-argument", "{e}");
    }
    assert_eq!(ops(c.clone()).await, before);
    let rec: VmRecord = c.get(&format!("/v1/vms/{vm}")).await.unwrap();
    assert_eq!(rec.vm.state, VmState::Running);
    // A route that starts no operation does not read it: answered as ever.
    let (status, _, rec) = raw_call(
        &base,
        TOKEN,
        "POST",
        &format!("/v1/vms/{vm}/reserve?wait-ms=abc"),
        &json!({ "holder": "h", "seconds": 60 }).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{rec}");
    let rec: VmRecord = serde_json::from_value(rec).unwrap();
    let (status, _, _) = raw_call(
        &base,
        TOKEN,
        "POST",
        &format!("/v1/vms/{vm}/release"),
        &json!({ "holder": "h" }).to_string(),
    )
    .await;
    assert_eq!((status, rec.vm.id.as_str()), (200, vm.as_str()));

    // An idempotent retry with wait-ms: the operation the key started, ended.
    let keyed = |path: String| {
        let base = base.clone();
        async move {
            let c = Client::new(&base, Some(TOKEN.into())).unwrap();
            let op: Operation = c
                .call_with(
                    Method::POST,
                    &path,
                    Some(&json!({})),
                    &[("idempotency-key", "wait-key-1".to_string())],
                )
                .await
                .unwrap();
            op
        }
    };
    let first = keyed(format!("/v1/vms/{vm}/suspend?wait-ms=30000")).await;
    assert_eq!(first.state, OpState::Succeeded, "{first:?}");
    let again = keyed(format!("/v1/vms/{vm}/suspend?wait-ms=30000")).await;
    assert_eq!((again.id, again.state), (first.id, OpState::Succeeded));
    assert_eq!(ops(c.clone()).await, before + 1);
}
