//! The `gve user|agent|vm|job` commands, run as the real binary against a site in
//! this process with memory-driver agents: tables and JSON, `--wait`, `exec`
//! relaying output and exit codes, copies, and the exit codes scripts rely on.

mod sites;
mod tls;
mod wait;

use std::path::Path;

use serde_json::Value;

use crate::site::{env, Env, ADMIN};

/// What one run of `gve` gave: exit code, stdout, stderr.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.out, self.err);
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.out, self.err))
    }
}

/// Runs `gve ARGS` with the site URL and `token` in the environment.
async fn gve(url: &str, token: &str, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"));
    cmd.args(args).env("GVE_URL", url).env("GVE_TOKEN", token);
    run(cmd).await
}

/// Runs `cmd` (stdin empty) to its end.
async fn run(mut cmd: tokio::process::Command) -> Run {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn url(e: &Env) -> String {
    format!("http://{}", e.site.addr)
}

/// Creates a user with the CLI; returns their token.
async fn add_user(e: &Env, name: &str) -> String {
    let r = gve(&url(e), ADMIN, &["user", "add", name]).await.ok();
    r.out.trim().to_string()
}

/// Requests a VM with `--wait`; returns its id.
async fn request_vm(u: &str, token: &str) -> String {
    let r = gve(
        u,
        token,
        &[
            "vm",
            "request",
            "--template",
            "debian-12",
            "--wait",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    let job = r.json();
    assert_eq!(job["state"], "succeeded", "{job}");
    job["result"]["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_users_and_agents() {
    let e = env(1, |_| {}).await;
    let u = url(&e);
    let r = gve(
        &u,
        ADMIN,
        &["user", "add", "bob", "--vcpus", "4", "--output", "json"],
    )
    .await
    .ok();
    let bob = r.json();
    assert_eq!(
        (&bob["name"], &bob["role"], &bob["quota"]["logical-cpus"]),
        (&"bob".into(), &"user".into(), &4.into())
    );
    assert_eq!(bob["quota"]["vms"], 8, "the other limits are the defaults");
    let token = bob["token"].as_str().unwrap().to_string();

    // The table form prints the token alone on stdout.
    let carol = add_user(&e, "carol").await;
    assert!(carol.starts_with("gve_"), "{carol}");

    let list = gve(&u, ADMIN, &["user", "list", "-o", "json"])
        .await
        .ok()
        .json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert!(
        ["admin", "bob", "carol"].iter().all(|n| names.contains(n)),
        "{names:?}"
    );
    let table = gve(&u, ADMIN, &["user", "list"]).await.ok().out;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bob") && l.contains("0/8")),
        "{table}"
    );

    let me = gve(&u, &token, &["user", "me", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!((&me["name"], &me["role"]), (&"bob".into(), &"user".into()));
    let me = gve(&u, &token, &["user", "me"]).await.ok().out;
    assert!(me.contains("vcpus:") && me.contains("0 of 4"), "{me}");

    // A user is not an admin (5); a wrong token is unauthorized (5); a bad name is
    // bad usage (2); a user that exists is a conflict (6).
    let r = gve(&u, &token, &["user", "list"]).await;
    assert_eq!(r.code, 5, "{}", r.err);
    assert!(
        r.err.starts_with("error: ") && r.err.contains("not an admin"),
        "{}",
        r.err
    );
    assert_eq!(gve(&u, "gve_wrong", &["user", "me"]).await.code, 5);
    assert_eq!(gve(&u, ADMIN, &["user", "add", "Bad Name!"]).await.code, 2);
    assert_eq!(gve(&u, ADMIN, &["user", "add", "bob"]).await.code, 6);
    assert_eq!(gve(&u, ADMIN, &["user", "show", "nobody"]).await.code, 4);

    // A monitor: no quota, the metrics only; a quota or --admin with it is refused.
    let m = gve(
        &u,
        ADMIN,
        &["user", "add", "prom", "--monitor", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        (&m["role"], &m["quota"]["vms"]),
        (&"monitor".into(), &0.into())
    );
    let monitor = m["token"].as_str().unwrap().to_string();
    let r = gve(&u, &monitor, &["vm", "list"]).await;
    assert_eq!(r.code, 5, "{}", r.err);
    assert!(r.err.contains("is a monitor"), "{}", r.err);
    let r = gve(&u, ADMIN, &["user", "add", "p2", "--monitor", "--vms", "1"]).await;
    assert_eq!(r.code, 2, "{}", r.err);
    let r = gve(&u, ADMIN, &["user", "add", "p3", "--monitor", "--admin"]).await;
    assert_eq!(r.code, 2, "{}", r.err);

    let q = gve(
        &u,
        ADMIN,
        &["user", "quota", "bob", "--vms", "3", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        (&q["quota"]["vms"], &q["quota"]["logical-cpus"]),
        (&3.into(), &4.into())
    );

    // A rotated token replaces the old one.
    let new = gve(&u, &token, &["user", "token", "bob"]).await.ok().out;
    assert_eq!(gve(&u, &token, &["user", "me"]).await.code, 5);
    gve(&u, new.trim(), &["user", "me"]).await.ok();
    let removed = gve(&u, ADMIN, &["user", "remove", "carol"]).await.ok().out;
    assert!(removed.contains("removed user carol"), "{removed}");

    // Agents: the list, one agent, a check; unknown agents are not found.
    let agents = gve(&u, ADMIN, &["agent", "list"]).await.ok().out;
    let header = agents.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{agents}"
    );
    assert!(
        agents
            .lines()
            .any(|l| l.starts_with("a-0") && l.contains(" up ")),
        "{agents}"
    );
    let a = gve(&u, ADMIN, &["agent", "check", "a-0", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!((&a["id"], &a["status"]), (&"a-0".into(), &"up".into()));
    // The instance id the agent answers, as the site recorded it.
    let answered: Value = e.agents[0].1.get("/v1/site").await.unwrap();
    assert_eq!(a["instance"], answered["instance"], "{a}");
    let shown = gve(&u, ADMIN, &["agent", "show", "a-0"]).await.ok().out;
    assert!(
        shown.contains("status:")
            && shown.contains("debian-12")
            && shown.contains(answered["instance"].as_str().unwrap()),
        "{shown}"
    );
    assert_eq!(gve(&u, ADMIN, &["agent", "show", "a-9"]).await.code, 4);
    assert_eq!(gve(&u, new.trim(), &["agent", "list"]).await.code, 5);
    // A site nobody listens on is unreachable (3).
    assert_eq!(
        gve("http://127.0.0.1:9", ADMIN, &["agent", "list"])
            .await
            .code,
        3
    );
    // `gve agent release` (to the agent): its site is gone, so another may
    // register it. Then the site's own release finds nothing to release.
    let release = || {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"));
        cmd.args(["agent", "release", "--agent-url"])
            .arg(format!("http://{}", e.agents[0].0.addr))
            .env("GVE_AGENT_SECRET", crate::site::AGENT_TOKEN);
        run(cmd)
    };
    let r = release().await.ok();
    assert!(
        r.out
            .contains("released from site site (registered there as a-0)"),
        "{}",
        r.out
    );
    assert!(release().await.ok().out.contains("served no site"));
    let r = gve(&u, ADMIN, &["agent", "remove", "a-0"]).await.ok();
    assert!(
        r.out.contains("removed agent a-0") && r.err.is_empty(),
        "{}",
        r.err
    );
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_requests_manages_and_runs_commands_in_vms() {
    let e = env(1, |_| {}).await;
    let u = url(&e);
    let alice = add_user(&e, "alice").await;
    let id = request_vm(&u, &alice).await;

    let list = gve(&u, &alice, &["vm", "list"]).await.ok().out;
    let header = list.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("LEASE"),
        "{list}"
    );
    let row = list.lines().find(|l| l.starts_with(&id)).expect(&list);
    assert!(
        row.contains("running") && row.contains("alice") && row.contains("a-0"),
        "{row}"
    );
    let vms = gve(&u, &alice, &["vm", "list", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    let vm = gve(&u, &alice, &["vm", "show", &id, "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        (&vm["state"], &vm["owner"]),
        (&"running".into(), &"alice".into())
    );
    let shown = gve(&u, &alice, &["vm", "show", &id]).await.ok().out;
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("state:") && l.ends_with("running")),
        "{shown}"
    );

    // --wait follows the job (progress lines on stderr, stderr not being a
    // terminal) and ends with the VM.
    for (action, state) in [("suspend", "suspended"), ("resume", "running")] {
        let r = gve(&u, &alice, &["vm", action, &id, "--wait"]).await.ok();
        assert!(r.out.starts_with("ID"), "{}", r.out);
        assert!(
            r.out.lines().nth(1).unwrap().contains(state),
            "{action}: {}",
            r.out
        );
        assert!(
            r.err.contains("waiting for job") && r.err.contains("succeeded"),
            "{}",
            r.err
        );
    }
    // On a terminal (a pty from `script`): indicatif's spinner (redrawn in place
    // while the job runs), then one summary line; no line per change.
    let mut cmd = tokio::process::Command::new("script");
    cmd.args(["-qefc"])
        .arg(format!(
            "{} vm suspend {id} --wait",
            env!("CARGO_BIN_EXE_gve")
        ))
        .arg("/dev/null")
        .env("GVE_URL", &u)
        .env("GVE_TOKEN", &alice)
        .env("TERM", "xterm");
    let r = run(cmd).await.ok();
    assert!(r.out.contains(" succeeded after "), "{:?}", r.out);
    assert!(!r.out.contains("waiting for job"), "{:?}", r.out);
    gve(&u, &alice, &["vm", "resume", &id, "--wait"]).await.ok();
    // Without --wait the job id is printed; `job wait` follows it.
    let job = gve(&u, &alice, &["vm", "suspend", &id]).await.ok().out;
    let job = job.trim();
    assert!(job.starts_with("job-"), "{job}");
    let waited = gve(&u, &alice, &["job", "wait", job]).await.ok().out;
    assert!(waited.contains("succeeded"), "{waited}");
    gve(&u, &alice, &["vm", "resume", &id, "--wait"]).await.ok();
    // A job that fails exits with the code of its error: starting a running VM is
    // a wrong state (6).
    let r = gve(&u, &alice, &["vm", "start", &id, "--wait"]).await;
    assert_eq!(r.code, 6, "{}", r.err);
    assert!(
        r.err.contains("error: job") && r.err.contains("failed"),
        "{}",
        r.err
    );

    // exec relays the command's bytes and exit code.
    let r = gve(
        &u,
        &alice,
        &["vm", "exec", &id, "--", "echo", "hello", "world"],
    )
    .await
    .ok();
    assert_eq!(r.out, "hello world\n");
    assert!(
        r.err.is_empty(),
        "no progress lines on exec's stderr: {}",
        r.err
    );
    let r = gve(&u, &alice, &["vm", "exec", &id, "--", "sh", "-c", "exit 3"]).await;
    assert_eq!(r.code, 3, "{}", r.err);
    let r = gve(&u, &alice, &["vm", "exec", &id, "cat", "/no/such"]).await;
    assert_eq!(r.code, 1);
    assert!(r.err.contains("No such file"), "{}", r.err);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "from a file\n").unwrap();
    let r = gve(
        &u,
        &alice,
        &[
            "vm",
            "exec",
            &id,
            "--stdin",
            input.to_str().unwrap(),
            "--env",
            "A=1",
            "--",
            "cat",
        ],
    )
    .await
    .ok();
    assert_eq!(r.out, "from a file\n");
    let r = gve(
        &u,
        &alice,
        &["vm", "exec", &id, "-o", "json", "--", "echo", "hi"],
    )
    .await
    .ok();
    assert_eq!(r.json()["result"]["exec"]["exit-code"], 0, "{}", r.out);

    // Jobs: list, show, result, events.
    let jobs = gve(&u, &alice, &["job", "list", "-o", "json"])
        .await
        .ok()
        .json();
    let jobs = jobs.as_array().unwrap();
    let request = jobs
        .iter()
        .find(|j| j["kind"] == "request")
        .expect("a request job");
    let rid = request["id"].as_str().unwrap();
    let table = gve(&u, &alice, &["job", "list"]).await.ok().out;
    assert!(table.starts_with("ID") && table.contains("KIND"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(rid) && l.contains("succeeded")),
        "{table}"
    );
    let shown = gve(&u, &alice, &["job", "show", rid, "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        (&shown["kind"], &shown["vm"]),
        (&"request".into(), &id.clone().into())
    );
    let shown = gve(&u, &alice, &["job", "show", rid]).await.ok().out;
    assert!(
        shown.contains("kind:") && shown.contains("request"),
        "{shown}"
    );
    let result = gve(&u, &alice, &["job", "result", rid]).await.ok().json();
    assert_eq!(result["id"], id.as_str());
    let events = gve(&u, &alice, &["job", "events", rid]).await.ok().out;
    assert!(
        events.lines().next().unwrap().contains("queued"),
        "{events}"
    );
    assert!(
        events.lines().last().unwrap().contains("succeeded"),
        "{events}"
    );
    let events = gve(&u, &alice, &["job", "events", rid, "-o", "json"])
        .await
        .ok()
        .out;
    let last: Value = serde_json::from_str(events.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["job"], &last["state"]),
        (&rid.into(), &"succeeded".into())
    );
    // A finished job cannot be cancelled (6).
    assert_eq!(gve(&u, &alice, &["job", "cancel", rid]).await.code, 6);

    // Exit codes: bad requests 2, missing objects 4, bad tokens 5.
    let r = gve(&u, &alice, &["vm", "migrate", &id, "--to", "a-0"]).await;
    assert_eq!(r.code, 2, "already there: {}", r.err);
    assert_eq!(
        gve(&u, &alice, &["vm", "request", "--lease-seconds", "0"])
            .await
            .code,
        2
    );
    assert_eq!(
        gve(&u, &alice, &["vm", "exec", &id]).await.code,
        2,
        "no argv"
    );
    assert_eq!(gve(&u, &alice, &["vm", "show", "no-such-vm"]).await.code, 4);
    assert_eq!(
        gve(&u, &alice, &["vm", "suspend", "no-such-vm", "--wait"])
            .await
            .code,
        4
    );
    assert_eq!(gve(&u, &alice, &["job", "show", "job-none"]).await.code, 4);
    assert_eq!(gve(&u, "gve_not-a-token", &["vm", "list"]).await.code, 5);
    // Other users' VMs do not exist for them.
    let mallory = add_user(&e, "mallory").await;
    assert_eq!(gve(&u, &mallory, &["vm", "show", &id]).await.code, 4);

    let renewed = gve(
        &u,
        &alice,
        &["vm", "renew", &id, "--seconds", "600", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert!(renewed["lease"]["until-ms"].as_u64().is_some(), "{renewed}");
    let r = gve(&u, &alice, &["vm", "release", &id, "--wait"])
        .await
        .ok();
    assert!(r.out.contains(&format!("released VM {id}")), "{}", r.out);
    let vms = gve(&u, &alice, &["vm", "list", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(vms, Value::Array(vec![]));
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_copies_files_in_and_out_checked_by_digest() {
    let e = env(1, |_| {}).await;
    let u = url(&e);
    let alice = add_user(&e, "alice").await;
    let id = request_vm(&u, &alice).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("data.bin");
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(&local, &data).unwrap();

    let r = gve(
        &u,
        &alice,
        &[
            "vm",
            "copy-in",
            &id,
            local.to_str().unwrap(),
            "/data/in.bin",
            "--parents",
            "--mode",
            "0600",
        ],
    )
    .await
    .ok();
    assert!(
        r.out.contains("copied") && r.out.contains(&data.len().to_string()),
        "{}",
        r.out
    );
    assert!(
        r.err.contains(&format!("sent {}", data.len())),
        "bytes sent on stderr: {}",
        r.err
    );

    let back = dir.path().join("back.bin");
    let r = gve(
        &u,
        &alice,
        &[
            "vm",
            "copy-out",
            &id,
            "/data/in.bin",
            back.to_str().unwrap(),
        ],
    )
    .await
    .ok();
    assert!(r.out.contains("copied"), "{}", r.out);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert!(!Path::new(&format!("{}.partial", back.display())).exists());
    // Into a directory: the guest file's name.
    let r = gve(
        &u,
        &alice,
        &[
            "vm",
            "copy-out",
            &id,
            "/data/in.bin",
            dir.path().to_str().unwrap(),
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert_eq!(r.json()["kind"], "copy-out", "{}", r.out);
    assert_eq!(std::fs::read(dir.path().join("in.bin")).unwrap(), data);

    // A guest file that does not exist fails the job (4), leaving nothing behind.
    let none = dir.path().join("none.bin");
    let r = gve(
        &u,
        &alice,
        &["vm", "copy-out", &id, "/no/such", none.to_str().unwrap()],
    )
    .await;
    assert_eq!(r.code, 4, "{}", r.err);
    assert!(!none.exists());
    // A local file that does not exist is refused before any call (1).
    let r = gve(&u, &alice, &["vm", "copy-in", &id, "/no/such/file", "/x"]).await;
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("/no/such/file"), "{}", r.err);
    e.site.stop().await;
}

/// `gve plugin inspect` measures a bundle in its own process (no agent), and a
/// bundle the host would refuse fails there with the host's reason and exit 2.
#[tokio::test]
async fn plugin_inspect_measures_a_bundle_and_refuses_what_the_host_would() {
    let memory = crate::support::bundle("memory");
    let r = gve(
        "http://127.0.0.1:9",
        "",
        &["plugin", "inspect", memory.to_str().unwrap(), "-o", "json"],
    )
    .await
    .ok();
    let v = r.json();
    assert_eq!(v["plugin"]["name"], "memory");
    assert_eq!(v["plugin"]["guest"], true);
    let wasm = std::fs::metadata(memory.join("memory.wasm")).unwrap().len();
    assert_eq!(v["component-bytes"], wasm);
    let mem = v["memory-bytes"].as_u64().unwrap();
    assert!(
        (64 << 10..=64 << 20).contains(&mem),
        "linear memory after instantiation: {mem} bytes"
    );
    assert!(v["compile-ms"].as_f64().unwrap() > 0.0, "{v}");

    let future = crate::support::bundle("future");
    let r = gve(
        "http://127.0.0.1:9",
        "",
        &["plugin", "inspect", future.to_str().unwrap()],
    )
    .await;
    assert_eq!(r.code, 2, "{}{}", r.out, r.err);
    assert!(r.err.contains("this host accepts"), "{}", r.err);
    let r = gve(
        "http://127.0.0.1:9",
        "",
        &["plugin", "inspect", "/no/such/bundle"],
    )
    .await;
    assert_eq!(r.code, 2, "{}{}", r.out, r.err);
    assert!(r.err.contains("/no/such/bundle"), "{}", r.err);
}
