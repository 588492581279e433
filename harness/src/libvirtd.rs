//! A private libvirtd for tests: started as this test's own child process in its own
//! mount namespace (so several run side by side, and a second one plays another host),
//! with a `gve` storage pool and a tiny-guest template. Dropping it kills the QEMU
//! processes it started (by their pid files) and then libvirtd (by its pid).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{root, target_dir};

/// A running private libvirtd.
pub struct Libvirtd {
    /// Its state directory.
    pub dir: tempfile::TempDir,
    /// URI for clients on this machine.
    pub uri: String,
    /// The storage pool's directory.
    pub images: PathBuf,
    child: Child,
}

/// The tiny guest (kernel, initrd, base disk), built once per test run.
pub fn guest() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = target_dir().join("guest");
        let status = Command::new("bash")
            .arg(root().join("scripts/harness/build-guest.sh"))
            .env("OUT", &out)
            .status()
            .expect("run build-guest.sh");
        assert!(
            status.success(),
            "building the test guest failed (did scripts/setup.sh run?)"
        );
        std::path::absolute(out).unwrap()
    })
    .clone()
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Command::new("virsh")
        .arg("-q")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("run virsh");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Libvirtd {
    /// Starts a libvirtd with a `gve` pool holding a copy of the tiny guest's disk
    /// and a template domain `tiny` (direct kernel boot, qemu-ga channel).
    pub fn start() -> Libvirtd {
        let guest = guest();
        let dir = tempfile::Builder::new()
            .prefix("gve-lv")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        for sub in ["sock", "run", "varlib", "etc", "log", "cache", "images"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        for mp in [
            "/run/libvirt",
            "/var/lib/libvirt",
            "/etc/libvirt",
            "/var/log/libvirt",
            "/var/cache/libvirt",
        ] {
            std::fs::create_dir_all(mp).unwrap();
        }
        std::fs::write(
            d.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_ro = \"none\"\nauth_unix_rw = \"none\"\n\
                 host_uuid = \"{}\"\nlog_outputs = \"3:file:{}\"\n",
                d.join("sock").display(),
                uuid::Uuid::new_v4(),
                d.join("log/libvirtd.log").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\nstdio_handler = \"file\"\n",
        )
        .unwrap();
        let p = |s: &str| d.join(s).display().to_string();
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
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("log/stdout.log")).unwrap())
            .stderr(std::fs::File::create(d.join("log/stderr.log")).unwrap())
            .spawn()
            .expect("start libvirtd (is libvirt-daemon installed? run scripts/setup.sh)");
        let sock = d.join("sock/libvirt-sock");
        let end = Instant::now() + Duration::from_secs(15);
        while !sock.exists() {
            assert!(
                Instant::now() < end,
                "libvirtd did not come up: {}",
                std::fs::read_to_string(d.join("log/stderr.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let uri = format!("qemu:///system?socket={}", sock.display());
        let images = d.join("images");
        std::fs::copy(guest.join("base.qcow2"), images.join("tiny-base.qcow2")).unwrap();
        let lv = Libvirtd {
            uri,
            images,
            child,
            dir,
        };
        virsh(
            &lv.uri,
            &[
                "pool-define-as",
                "gve",
                "dir",
                "--target",
                &lv.images.display().to_string(),
            ],
        );
        virsh(&lv.uri, &["pool-start", "gve"]);
        let xml = d.join("tiny.xml");
        std::fs::write(
            &xml,
            template_xml(&guest, &lv.images.join("tiny-base.qcow2")),
        )
        .unwrap();
        virsh(&lv.uri, &["define", &xml.display().to_string()]);
        lv
    }

    /// `virsh` against this daemon.
    pub fn virsh(&self, args: &[&str]) -> String {
        virsh(&self.uri, args)
    }
}

fn template_xml(guest: &Path, disk: &Path) -> String {
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
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>console=ttyS0 quiet</cmdline></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='pty'><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>",
        kernel = guest.join("vmlinuz").display(),
        initrd = guest.join("initrd.img").display(),
        disk = disk.display()
    )
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // QEMU processes outlive libvirtd: end the ones this daemon started, by pid.
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("run/qemu")) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid") {
                    if let Ok(pid) = std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .trim()
                        .parse::<i32>()
                    {
                        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                    }
                }
            }
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(5);
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
