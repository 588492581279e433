//! Shared test support: builds the plugin components from source once per test run,
//! and makes plugin hosts and specs in temporary directories.

use std::path::{Path, PathBuf};

use gve::plugin::bindings::types::Credentials;
use gve::plugin::{Grants, HostConfig, Limits, PluginHost, PluginSpec};

/// Builds every plugin bundle from source (once) and returns `target/plugins`.
pub fn bundles() -> &'static Path {
    gve_harness::plugin_bundles()
}

/// The bundle directory of one plugin.
pub fn bundle(name: &str) -> PathBuf {
    bundles().join(name)
}

/// A plugin host with its own artifact cache in a temp dir.
pub fn host() -> (PluginHost, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new(HostConfig {
        cache_dir: dir.path().join("cache"),
        engine: Default::default(),
    })
    .unwrap();
    (host, dir)
}

/// A spec for `name` with grants and default limits.
pub fn spec(name: &str, grants: Grants) -> PluginSpec {
    PluginSpec {
        bundle: bundle(name),
        grants,
        limits: Limits::default(),
    }
}

/// No credentials.
pub fn no_creds() -> Credentials {
    Credentials {
        username: None,
        password: None,
        token: None,
    }
}

/// Where [`edited_bundle`] puts its copies (a directory tests may allow).
pub fn edited_bundles_dir() -> PathBuf {
    let d = std::env::temp_dir().join("gve-test-bundles");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies a bundle to a temp dir (under [`edited_bundles_dir`]), applying `edit`
/// to its manifest text.
pub fn edited_bundle(name: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(edited_bundles_dir()).unwrap();
    for entry in std::fs::read_dir(bundle(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let m = dir.path().join("gve-plugin.toml");
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, edit(text)).unwrap();
    dir
}

/// A `gve <role> run` process (`site` or `agent`), killable with SIGKILL.
pub struct Service {
    /// The process.
    pub child: tokio::process::Child,
    /// Where it listens (`http://…`).
    pub url: String,
}

/// Starts `gve ROLE run --config CONFIG`, its stderr appended to `log` (so restarts
/// keep one log); returns once it prints a new `listening on` line.
pub async fn spawn_service(role: &str, config: &Path, log: &Path) -> Service {
    // Whole lines only: the service may be writing one while it is read (a
    // read mid-line once gave the URL `http:`), and a killed one may have left
    // half a line.
    let listening = |text: &str| {
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| l.split("listening on ").nth(1))
            .map(|u| u.trim().to_string())
            .collect::<Vec<_>>()
    };
    let before = listening(&std::fs::read_to_string(log).unwrap_or_default()).len();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"))
        .args([role, "run", "--config"])
        .arg(config)
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(url) = listening(&text).get(before) {
            return Service {
                child,
                url: url.clone(),
            };
        }
        assert!(
            std::time::Instant::now() < end,
            "{role} did not start: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A `gve` command that knows of no site but what `env` says (every `GVE_*` site
/// variable removed first).
pub fn gve_command(env: &[(&str, &str)], args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gve"));
    cmd.args(args);
    for var in [
        "GVE_URL",
        "GVE_TOKEN",
        "GVE_SITE",
        "GVE_FINGERPRINT",
        "GVE_CA",
        "GVE_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `work` on a blocking thread while another thread writes to `store`
/// back to back (empty durable transactions): what `work` answered, and how
/// many of those writes committed before it ended (redb has one writer at a
/// time: work holding the database throughout lets none in).
pub async fn other_writes_during<T: Send + 'static>(
    store: &gve::site::store::Store,
    work: impl FnOnce() -> T + Send + 'static,
) -> (T, usize) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let (working, got_in) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicUsize::new(0)),
    );
    let writer = {
        let (store, working, got_in) = (store.clone(), working.clone(), got_in.clone());
        std::thread::spawn(move || {
            while working.load(Ordering::SeqCst) {
                store.write(|_| Ok(())).unwrap();
                // Counted only if the work had not ended when it committed.
                if working.load(Ordering::SeqCst) {
                    got_in.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let done = tokio::task::spawn_blocking(work).await.unwrap();
    working.store(false, Ordering::SeqCst);
    writer.join().unwrap();
    (done, got_in.load(Ordering::SeqCst))
}
