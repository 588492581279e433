//! The private libvirtd `gve up` runs when the machine has none (and the test
//! harness runs for every test that needs a hypervisor): its state under one
//! directory, bind-mounted over libvirt's compiled-in paths in a private mount
//! namespace. It ends, with its QEMU guests, when dropped. One left behind by a
//! `gve up` that was killed is adopted when it still answers (its guests keep
//! running) and ended otherwise; either way the user is told which.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private libvirtd, started or adopted; ended (with its guests) on drop.
pub struct PrivateLibvirtd {
    pid: i32,
    /// Set when this process started it (to reap it).
    child: Option<Child>,
    dir: PathBuf,
}

/// How long `gve up` waits for a libvirtd to answer a connection.
pub const OPEN_WAIT: Duration = Duration::from_secs(10);

/// Opens a connection to `uri`, or says why not within `limit`: a libvirtd
/// that accepts and never answers (hung, or not libvirt at all) would hold the
/// caller for ever. The thread left waiting on such a daemon ends with the
/// process.
pub fn open_within(uri: &str, limit: Duration) -> Result<virt::connect::Connect, OpenError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let target = uri.to_string();
    std::thread::Builder::new()
        .name("gve-libvirt-open".into())
        .spawn(move || {
            let _ = tx.send(virt::connect::Connect::open(Some(&target)).map_err(|e| e.to_string()));
        })
        .map_err(|e| OpenError::Failed(format!("cannot start a thread to open {uri}: {e}")))?;
    match rx.recv_timeout(limit) {
        Ok(opened) => opened.map_err(OpenError::Failed),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(OpenError::NoAnswer(limit)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(OpenError::Failed(
            "the connection attempt ended without an answer".into(),
        )),
    }
}

/// Why [`open_within`] has no connection.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The daemon did not answer in time.
    #[error("no answer within {} s (is that libvirtd hung?)", .0.as_secs())]
    NoAnswer(Duration),
    /// libvirt refused, or the attempt failed.
    #[error("{0}")]
    Failed(String),
}

/// Whether process `pid` runs (and is not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid read from our own state directory.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Pids in `dir/run/libvirtd.pid` (libvirtd) or `dir/run/qemu/*.pid` (guests).
fn pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn guest_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir.join("run/qemu"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                .filter_map(|e| pid_file(&e.path()))
                .filter(|p| alive(*p))
                .collect()
        })
        .unwrap_or_default()
}

/// Ends guests, then libvirtd `pid` (TERM, then KILL after 5 s).
fn end(dir: &Path, pid: i32, child: Option<&mut Child>) {
    for g in guest_pids(dir) {
        signal(g, libc::SIGTERM);
    }
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut child = child;
    loop {
        let gone = match child.as_deref_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => !alive(pid),
        };
        if gone {
            return;
        }
        if Instant::now() > deadline {
            signal(pid, libc::SIGKILL);
            if let Some(c) = child {
                let _ = c.wait();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl PrivateLibvirtd {
    /// Starts a libvirtd under `dir`, or adopts the one an earlier `gve up` left
    /// there; returns it and its URI.
    pub fn start(dir: &Path) -> Result<(PrivateLibvirtd, String), String> {
        Self::start_with(dir, None)
    }

    /// [`PrivateLibvirtd::start`] with a host UUID of its own (two private daemons
    /// on one machine must differ for libvirt to migrate between them).
    pub fn start_with(
        dir: &Path,
        host_uuid: Option<&str>,
    ) -> Result<(PrivateLibvirtd, String), String> {
        let sock = dir.join("sock/libvirt-sock");
        let uri = format!("qemu:///system?socket={}", sock.display());
        let conf = dir.join("etc/libvirtd.conf");
        if let Some(pid) = pid_file(&dir.join("run/libvirtd.pid")).filter(|p| alive(*p)) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains(&conf.display().to_string());
            if ours {
                let guests = guest_pids(dir).len();
                if open_within(&uri, OPEN_WAIT).is_ok() {
                    eprintln!(
                        "gve up: adopted the private libvirtd (pid {pid}) and its {guests} running guest(s) left by an earlier gve up"
                    );
                    return Ok((
                        PrivateLibvirtd {
                            pid,
                            child: None,
                            dir: dir.to_path_buf(),
                        },
                        uri,
                    ));
                }
                eprintln!(
                    "gve up: ended the private libvirtd (pid {pid}) and {guests} guest(s) left by an earlier gve up: it did not answer"
                );
                end(dir, pid, None);
            }
        }
        Self::spawn(dir, &sock, host_uuid).map(|lv| (lv, uri))
    }

    fn spawn(dir: &Path, sock: &Path, host_uuid: Option<&str>) -> Result<PrivateLibvirtd, String> {
        let io = |what: &str, e: std::io::Error| format!("{what} under {}: {e}", dir.display());
        for sub in ["sock", "run", "varlib", "etc", "log", "cache"] {
            crate::private_fs::private_dir(&dir.join(sub)).map_err(|e| io("directory", e))?;
        }
        let p = |s: &str| dir.join(s).display().to_string();
        std::fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_ro = \"none\"\nauth_unix_rw = \"none\"\nlog_outputs = \"3:file:{}\"\n{}",
                p("sock"),
                p("log/libvirtd.log"),
                host_uuid.map(|u| format!("host_uuid = \"{u}\"\n")).unwrap_or_default()
            ),
        )
        .map_err(|e| io("libvirtd config", e))?;
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\nstdio_handler = \"file\"\n",
        )
        .map_err(|e| io("qemu config", e))?;
        for mp in [
            "/run/libvirt",
            "/var/lib/libvirt",
            "/etc/libvirt",
            "/var/log/libvirt",
            "/var/cache/libvirt",
        ] {
            std::fs::create_dir_all(mp).map_err(|e| format!("mount point {mp}: {e}"))?;
        }
        // A stale socket of a dead libvirtd would look like a live one.
        let _ = std::fs::remove_file(sock);
        let script = format!(
            "mount --bind {run} /run/libvirt && mount --bind {varlib} /var/lib/libvirt && \
             mount --bind {etc} /etc/libvirt && mount --bind {log} /var/log/libvirt && \
             mount --bind {cache} /var/cache/libvirt && exec libvirtd -f {etc}/libvirtd.conf -p {run}/libvirtd.pid",
            run = p("run"),
            varlib = p("varlib"),
            etc = p("etc"),
            log = p("log"),
            cache = p("cache"),
        );
        let log = std::fs::File::create(dir.join("log/stderr.log")).map_err(|e| io("log", e))?;
        // unshare and sh exec into libvirtd: the child's pid is libvirtd's.
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot start libvirtd (run scripts/setup.sh first, as root): {e}")
            })?;
        let mut lv = PrivateLibvirtd {
            pid: child.id() as i32,
            child: Some(child),
            dir: dir.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            let exited = lv
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > end {
                let err = std::fs::read_to_string(dir.join("log/stderr.log")).unwrap_or_default();
                return Err(format!("libvirtd did not come up: {}", err.trim()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(lv)
    }

    /// libvirtd's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        end(&self.dir, self.pid, self.child.as_mut());
    }
}

/// The domain XML of the tiny test guest as template `tiny` (direct kernel boot,
/// a qcow2 disk, the qemu-ga channel), labelled in the gve metadata namespace.
pub fn tiny_template_xml(kernel: &Path, initrd: &Path, disk: &Path) -> String {
    format!(
        "<domain type='qemu'>
  <name>tiny</name>
  <metadata><gve:labels xmlns:gve='urn:gve:hypervisor:labels:0.1'>
    <gve:label key='gve.template'>true</gve:label>
    <gve:label key='gve.os-family'>linux</gve:label>
    <gve:label key='gve.os-name'>busybox</gve:label>
  </gve:labels></metadata>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{}</kernel><initrd>{}</initrd><cmdline>console=ttyS0 quiet</cmdline></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='pty'><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>",
        kernel.display(),
        initrd.display(),
        disk.display()
    )
}
