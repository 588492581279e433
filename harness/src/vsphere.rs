//! The project's vSphere API simulator (`harness/vsphere-sim`), run for a test: built
//! once per process, started with its stdin held by the test (it exits when the pipe
//! closes), its address and certificate read from its start-up lines.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The simulator's only accepted login.
pub const USERNAME: &str = "gve";
/// Its password.
pub const PASSWORD: &str = "gve-secret";
/// The guest user every guest operation needs.
pub const GUEST_USERNAME: &str = "root";
/// Its password.
pub const GUEST_PASSWORD: &str = "guest-secret";
/// The template `-template` makes in every simulator this harness starts.
pub const TEMPLATE: &str = "gve-tiny";

/// Builds the simulator (once per process) with `scripts/harness/build-vsphere-sim.sh`.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new("bash")
            .arg(crate::root().join("scripts/harness/build-vsphere-sim.sh"))
            .output()
            .expect("run scripts/harness/build-vsphere-sim.sh");
        assert!(
            out.status.success(),
            "building the vSphere simulator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("the script prints the binary")
                .trim(),
        )
    })
}

/// A running simulator; dropped, it is ended (stdin closed, then killed if needed).
pub struct VsphereSim {
    /// `https://127.0.0.1:PORT/sdk`.
    pub url: String,
    /// `127.0.0.1:PORT`.
    pub authority: String,
    /// Lower-case hex SHA-256 of its certificate (empty without TLS).
    pub thumbprint: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl VsphereSim {
    /// A vCenter inventory (DC0: a cluster of three hosts and a standalone host
    /// `DC0_H0`) with the template [`TEMPLATE`].
    pub fn vcenter() -> VsphereSim {
        VsphereSim::start(&[])
    }

    /// A standalone ESXi host with the template [`TEMPLATE`].
    pub fn esxi() -> VsphereSim {
        VsphereSim::start(&["-esx"])
    }

    /// A simulator with these extra flags (see harness/vsphere-sim/README.md).
    pub fn start(args: &[&str]) -> VsphereSim {
        let mut child = Command::new(binary())
            .args(args)
            .args(["-template", TEMPLATE])
            .env("TMPDIR", std::env::temp_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start gve-vsphere-sim");
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (mut url, mut authority, mut thumbprint) =
            (String::new(), String::new(), String::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        for line in lines.by_ref() {
            let line = line.expect("read the simulator's stdout");
            if let Some(v) = line.strip_prefix("GVE_VSPHERE_URL=") {
                url = v.into();
            } else if let Some(v) = line.strip_prefix("GVE_VSPHERE_AUTHORITY=") {
                authority = v.into();
            } else if let Some(v) = line.strip_prefix("GVE_VSPHERE_THUMBPRINT=") {
                thumbprint = v.into();
            } else if line == "GVE_VSPHERE_READY=1" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the simulator did not start in 60 s"
            );
        }
        assert!(
            !url.is_empty(),
            "the simulator ended before it was ready ({args:?})"
        );
        VsphereSim {
            url,
            authority,
            thumbprint,
            child,
            stdin,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends it with SIGKILL at once (a server dying mid-call).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its certificate's pin, as a `tls` grant takes it.
    pub fn tls_pin(&self) -> String {
        format!("sha256:{}", self.thumbprint)
    }

    /// What the vmware-esx plugin needs to be granted for it: its authority, TLS
    /// pinned to `pin` (its own [`VsphereSim::tls_pin`], or another to see it refused),
    /// and the guest account as config.
    pub fn grants(&self, pin: &str) -> gve::plugin::Grants {
        let mut grants = gve::plugin::Grants {
            http: vec![self.authority.clone()],
            ..Default::default()
        };
        grants.tls.insert(
            self.authority.clone(),
            gve::tls::ClientTls {
                fingerprint: Some(pin.to_string()),
                ..Default::default()
            },
        );
        grants
            .config
            .insert("guest-username".into(), GUEST_USERNAME.into());
        grants
            .config
            .insert("guest-password".into(), GUEST_PASSWORD.into());
        grants
    }
}

impl Drop for VsphereSim {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        let end = Instant::now() + Duration::from_secs(8);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
