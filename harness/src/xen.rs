//! A real Xen 4.17 for tests: Debian's hypervisor and a Debian dom0 running libvirtd's
//! libxl driver, booted under QEMU (TCG) from what `scripts/harness/build-xen.sh`
//! made. libvirtd is reached at `xen+tcp://127.0.0.1:PORT/system` and a command shell
//! in dom0 (for `xl`, and for taking libvirtd away) at another port; QEMU forwards
//! both from 127.0.0.1 only. dom0 has a `gve` storage pool and a PV template `tiny-pv`.
//!
//! Booting takes about a minute, so a test process shares one ([`shared`]), and a
//! script can hold one for several processes (`gve-lab xen`, whose env file
//! [`shared`] attaches to when `GVE_XEN_LAB` names it).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable naming a `gve-lab xen` env file to attach to.
pub const LAB_ENV: &str = "GVE_XEN_LAB";

/// Name of the PV template in dom0.
pub const TEMPLATE: &str = "tiny-pv";

/// A nested Xen: booted here (ended on drop) or attached to (left running).
pub struct NestedXen {
    qemu: Option<Child>,
    dir: Option<tempfile::TempDir>,
    /// libvirt URI of dom0's libvirtd.
    pub uri: String,
    /// Port of dom0's command shell on 127.0.0.1.
    pub shell_port: u16,
}

/// The images (hypervisor, kernel, dom0 initramfs), built once per machine.
pub fn images() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    crate::built_once(&DIR, "build-xen.sh", "xen", "the nested Xen")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn virsh_at(uri: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .arg("-q")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .map_err(|e| format!("run virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "virsh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The PV template's definition: dom0's Debian kernel and the busybox initramfs,
/// a 16 MiB raw disk in the pool, labelled in gve's metadata namespace.
pub fn template_xml() -> String {
    format!(
        "<domain type='xen'>
  <name>{TEMPLATE}</name>
  <metadata><gve:labels xmlns:gve='urn:gve:hypervisor:labels:0.1'>
    <gve:label key='gve.template'>true</gve:label>
    <gve:label key='gve.os-family'>linux</gve:label>
    <gve:label key='gve.os-name'>busybox</gve:label>
  </gve:labels></metadata>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='xenpv'>linux</type>
    <kernel>/var/lib/gve/boot/vmlinuz</kernel><initrd>/var/lib/gve/boot/initrd.img</initrd>
    <cmdline>console=hvc0 quiet</cmdline></os>
  <devices>
    <disk type='file' device='disk'><driver name='phy' type='raw'/>
      <source file='/var/lib/gve/images/tiny-base.img'/><target dev='xvda' bus='xen'/></disk>
    <console type='pty'><target type='xen' port='0'/></console>
  </devices>
</domain>"
    )
}

impl NestedXen {
    /// Boots a nested Xen and waits until dom0's libvirtd answers (up to 5 minutes);
    /// defines the `gve` pool and the template.
    pub fn boot() -> NestedXen {
        let images = images();
        let mut last = String::new();
        // A port picked free may be taken before QEMU binds it: try again.
        for _ in 0..3 {
            match Self::try_boot(&images) {
                Ok(x) => return x,
                Err(e) => last = e,
            }
        }
        panic!("the nested Xen did not come up: {last}");
    }

    fn try_boot(images: &Path) -> Result<NestedXen, String> {
        let dir = tempfile::Builder::new()
            .prefix("gve-xen")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let (lv_port, sh_port) = (free_port(), free_port());
        let serial = dir.path().join("serial.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg,thread=multi"])
            // With an AMD vendor, libvirt's libxl driver finds no CPU model.
            .args([
                "-cpu",
                "qemu64,vendor=GenuineIntel",
                "-M",
                "pc",
                "-m",
                "3072",
            ])
            .args([
                "-smp",
                "2",
                "-display",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(images.join("xen.elf"))
            .args([
                "-append",
                "console=com1 com1=115200,8n1 dom0_mem=1536M,max:1536M dom0_max_vcpus=2",
            ])
            .arg("-initrd")
            .arg(format!(
                "{} console=hvc0 earlyprintk=xen rdinit=/init,{}",
                images.join("vmlinuz").display(),
                images.join("dom0.cpio.zst").display()
            ))
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{lv_port}-:16509,\
                 hostfwd=tcp:127.0.0.1:{sh_port}-:2323"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu.log")).map_err(|e| e.to_string())?);
        // QEMU dies with the thread that started it: a test process that ends, or
        // panics, leaves no Xen behind (shared() starts it from a thread that lives
        // as long as the process).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("start QEMU: {e}"))?;
        let mut x = NestedXen {
            qemu: Some(child),
            dir: Some(dir),
            uri: format!("xen+tcp://127.0.0.1:{lv_port}/system"),
            shell_port: sh_port,
        };
        let end = Instant::now() + Duration::from_secs(300);
        loop {
            let log = std::fs::read(&serial).unwrap_or_default();
            if log.windows(14).any(|w| w == b"GVE-DOM0-READY") {
                break;
            }
            let exited = x
                .qemu
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > end {
                let qemu = std::fs::read_to_string(x.dir().join("qemu.log")).unwrap_or_default();
                let tail: String = String::from_utf8_lossy(&log)
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(format!(
                    "QEMU: {qemu}\nserial (last lines, reversed):\n{tail}"
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        x.virsh(&[
            "pool-define-as",
            "gve",
            "dir",
            "--target",
            "/var/lib/gve/images",
        ]);
        x.virsh(&["pool-start", "gve"]);
        let xml = x.dir().join("tiny.xml");
        std::fs::write(&xml, template_xml()).map_err(|e| e.to_string())?;
        x.virsh(&["define", &xml.display().to_string()]);
        Ok(x)
    }

    /// Attaches to a nested Xen a `gve-lab xen` holds (its env file).
    pub fn attach(env_file: &Path) -> NestedXen {
        let text = std::fs::read_to_string(env_file)
            .unwrap_or_else(|e| panic!("read {}: {e}", env_file.display()));
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(|v| v.trim_matches('\'').to_string())
                .unwrap_or_else(|| panic!("{} has no {k}", env_file.display()))
        };
        NestedXen {
            qemu: None,
            dir: None,
            uri: get("GVE_LAB_XEN_URI"),
            shell_port: get("GVE_LAB_XEN_SHELL").parse().expect("a port"),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("a booted Xen").path()
    }

    /// QEMU's process id, if this process booted it.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(|c| c.id())
    }

    /// Runs a shell command in dom0 and returns its output (stdout and stderr).
    pub fn shell(&self, command: &str) -> String {
        let run = || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", self.shell_port))?;
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            s.write_all(format!("{command} 2>&1; exit\n").as_bytes())?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        };
        run().unwrap_or_else(|e| panic!("dom0 shell `{command}`: {e}"))
    }

    /// `virsh` against dom0's libvirtd; panics on failure.
    pub fn virsh(&self, args: &[&str]) -> String {
        virsh_at(&self.uri, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `virsh` against dom0's libvirtd.
    pub fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        virsh_at(&self.uri, args)
    }

    /// The domains Xen itself runs (`xl list` in dom0, dom0 left out): name → state
    /// letters (`r`unning, `b`locked, `p`aused, `s`hutdown, `c`rashed, `d`ying).
    pub fn xl_list(&self) -> BTreeMap<String, String> {
        self.shell("xl list")
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 5 && f[0] != "Domain-0").then(|| {
                    let state = f[f.len() - 2].chars().filter(|c| *c != '-').collect();
                    (f[0].to_string(), state)
                })
            })
            .collect()
    }

    /// Removes every domain and pool volume whose name starts with `prefix`, in Xen
    /// and in libvirt (what an earlier, failed test may have left).
    pub fn clear(&self, prefix: &str) {
        self.shell(&format!(
            "for d in $(xl list | awk 'NR>1 {{print $1}}' | grep '^{prefix}'); do xl destroy $d; done; \
             for d in $(virsh -q -c xen:///system list --all --name | grep '^{prefix}'); do \
               virsh -q -c xen:///system destroy $d; virsh -q -c xen:///system undefine $d; done; \
             for v in $(virsh -q -c xen:///system vol-list gve | awk '{{print $1}}' | grep '^{prefix}'); do \
               virsh -q -c xen:///system vol-delete --pool gve $v; done"
        ));
    }

    /// What the guest `vm` wrote on its console (xenconsoled's log in dom0).
    pub fn console(&self, vm: &str) -> String {
        self.shell(&format!("cat /var/log/xen/console/guest-{vm}.log"))
    }
}

impl Drop for NestedXen {
    fn drop(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A test's turn on this process's nested Xen ([`shared`]): derefs to it; the next
/// test's turn starts when this is dropped.
pub struct Turn {
    xen: &'static NestedXen,
    _turn: MutexGuard<'static, ()>,
}

impl std::ops::Deref for Turn {
    type Target = NestedXen;
    fn deref(&self) -> &NestedXen {
        self.xen
    }
}

/// This process's nested Xen, for the caller's turn: booted on first use by a thread
/// that lives as long as the process (QEMU ends with it), or attached to the one
/// `GVE_XEN_LAB` names. Tests take turns, so one test's faults (a killed libvirtd)
/// never meet another's operations.
pub fn shared() -> Turn {
    static LAB: OnceLock<NestedXen> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    // A test that failed during its turn does not spoil the lab for the next.
    let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let xen = LAB.get_or_init(|| {
        if let Some(env) = std::env::var_os(LAB_ENV) {
            return NestedXen::attach(Path::new(&env));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let booted = std::panic::catch_unwind(NestedXen::boot);
            let failed = booted.is_err();
            let _ = tx.send(booted);
            if !failed {
                // The keeper: QEMU's parent-death signal follows this thread.
                loop {
                    std::thread::park();
                }
            }
        });
        match rx.recv().expect("the Xen keeper thread") {
            Ok(x) => x,
            Err(p) => std::panic::resume_unwind(p),
        }
    });
    Turn { xen, _turn: turn }
}
