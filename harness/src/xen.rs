//! A real Xen 4.17 for tests: Debian's hypervisor and a Debian dom0 running libvirtd's
//! libxl driver, booted under QEMU (TCG) from what `scripts/harness/build-xen.sh`
//! made. libvirtd is reached at `xen+tcp://127.0.0.1:PORT/system` and a command shell
//! in dom0 (for `xl`, and for taking libvirtd away) at another port; QEMU forwards
//! both from 127.0.0.1 only. dom0 has a `gve` storage pool and a PV template `tiny-pv`.
//!
//! Hosts are booted on a [`Fabric`]: what two Xen hosts of a site share to migrate
//! between them, storage (one directory of this machine, mounted over 9p at the pool's
//! path in every dom0) and a private network between their dom0s.
//!
//! Booting takes about a minute, so a test process shares one ([`shared`]; its second
//! host boots on first use, [`Turn::second`]), and a script can hold both for several
//! processes (`gve-lab xen`, whose env file [`shared`] attaches to when `GVE_XEN_LAB`
//! names it).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable naming a `gve-lab xen` env file to attach to.
pub const LAB_ENV: &str = "GVE_XEN_LAB";

/// Name of the PV template in dom0.
pub const TEMPLATE: &str = "tiny-pv";

/// How often the template's guest ticks on its console (`harness/xen/guest-init.sh`).
pub const TICK_MS: f64 = 200.0;

/// The ticks in a guest's console: (counter, the guest's uptime in seconds).
pub fn console_ticks(console: &str) -> Vec<(u64, f64)> {
    console
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().strip_prefix("gve-tick ")?.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// The longest the guest stood still, in ms: the largest jump of its uptime between
/// two consecutive ticks (the kernel advances it by the time the domain was
/// stopped), less the tick period. Ticks may come from several consoles, in any
/// order and repeated.
pub fn stood_still_ms(mut ticks: Vec<(u64, f64)>) -> f64 {
    ticks.sort_by_key(|t| t.0);
    ticks.dedup_by_key(|t| t.0);
    ticks
        .windows(2)
        .filter(|w| w[1].0 == w[0].0 + 1)
        .map(|w| (w[1].1 - w[0].1) * 1000.0 - TICK_MS)
        .fold(0.0, f64::max)
}

/// The name of a `gve-lab xen` env file's variable `name` for host `n`
/// (`GVE_LAB_XEN_URI` for host 1, `GVE_LAB_XEN_URI_2` for host 2).
pub fn lab_var(name: &str, n: u8) -> String {
    if n == 1 {
        name.to_string()
    } else {
        format!("{name}_{n}")
    }
}

/// A nested Xen: booted here (ended on drop) or attached to (left running).
pub struct NestedXen {
    qemu: Option<Child>,
    dir: Option<tempfile::TempDir>,
    /// Kept while a host on it runs.
    _fabric: Option<Arc<Fabric>>,
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

const FABRIC_PREFIX: &str = "gve-xen-fabric";

/// Removes fabric directories in /var/tmp whose owner process has ended.
fn sweep_dead_fabrics() {
    let Ok(entries) = std::fs::read_dir("/var/tmp") else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(FABRIC_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(e.path().join("owner.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback UDP port")
}

/// What the two hosts of a nested Xen site share: a directory of this machine that
/// every dom0 mounts (9p) at `/var/lib/gve/images`, the `gve` pool's path, so disks
/// stay put when a VM migrates; and a private link between the dom0s (a second NIC
/// in each QEMU, the two joined by UDP on 127.0.0.1): host N is `gve-xen-N` at
/// 192.168.77.N, and every dom0 resolves every host's name, as libxl's migration
/// needs (the destination names itself in the address it gives the source).
pub struct Fabric {
    /// Holds `images/` (the shared pool) and `owner.pid`.
    dir: tempfile::TempDir,
    /// UDP ports of host 1's and host 2's end of the link.
    link: [u16; 2],
}

impl Fabric {
    /// An empty shared directory and a link for two hosts. A test process's lab
    /// lives in a static that is never dropped, so this first removes the
    /// directories of fabrics whose process is gone.
    pub fn new() -> Arc<Fabric> {
        sweep_dead_fabrics();
        let dir = tempfile::Builder::new()
            .prefix(FABRIC_PREFIX)
            .tempdir_in("/var/tmp")
            .expect("a directory for the shared pool");
        std::fs::create_dir(dir.path().join("images")).expect("the shared pool directory");
        std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string())
            .expect("the fabric's owner file");
        Arc::new(Fabric {
            dir,
            link: [free_udp_port(), free_udp_port()],
        })
    }

    /// The shared directory (the pool of every host).
    pub fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// Boots host `n` (1 or 2) and waits until its libvirtd answers (up to 5
    /// minutes); defines the `gve` pool and the template there.
    pub fn boot(self: &Arc<Self>, n: u8) -> NestedXen {
        assert!(n == 1 || n == 2, "a fabric has hosts 1 and 2");
        let images = images();
        let mut last = String::new();
        // A port picked free may be taken before QEMU binds it: try again.
        for _ in 0..3 {
            match NestedXen::try_boot(&images, self, n) {
                Ok(x) => return x,
                Err(e) => last = e,
            }
        }
        panic!("nested Xen host {n} did not come up: {last}");
    }

    /// [`Fabric::boot`] from a thread that lives as long as the process (QEMU's
    /// parent-death signal follows the thread that started it), for hosts kept in
    /// statics or booted side by side.
    pub fn boot_kept(self: &Arc<Self>, n: u8) -> NestedXen {
        let fabric = self.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let booted = std::panic::catch_unwind(|| fabric.boot(n));
            let failed = booted.is_err();
            let _ = tx.send(booted);
            if !failed {
                loop {
                    std::thread::park();
                }
            }
        });
        match rx.recv().expect("the Xen keeper thread") {
            Ok(x) => x,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
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
    /// Boots a nested Xen of its own (host 1 of a new [`Fabric`]).
    pub fn boot() -> NestedXen {
        Fabric::new().boot(1)
    }

    fn try_boot(images: &Path, fabric: &Arc<Fabric>, n: u8) -> Result<NestedXen, String> {
        let dir = tempfile::Builder::new()
            .prefix("gve-xen")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let (lv_port, sh_port) = (free_port(), free_port());
        let (here, there) = if n == 1 {
            (fabric.link[0], fabric.link[1])
        } else {
            (fabric.link[1], fabric.link[0])
        };
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
                "{} console=hvc0 earlyprintk=xen rdinit=/init gve.host={n} gve.images=gveimages,{}",
                images.join("vmlinuz").display(),
                images.join("dom0.cpio.zst").display()
            ))
            .arg("-uuid")
            .arg(format!("6776652d-7865-6e00-0000-00000000000{n}"))
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{lv_port}-:16509,\
                 hostfwd=tcp:127.0.0.1:{sh_port}-:2323"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            // The link to the other host: dom0's eth1.
            .arg("-netdev")
            .arg(format!(
                "dgram,id=n1,local.type=inet,local.host=127.0.0.1,local.port={here},\
                 remote.type=inet,remote.host=127.0.0.1,remote.port={there}"
            ))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n1,mac=52:54:00:77:00:0{n}"))
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=gveimages,security_model=none",
                fabric.images().display()
            ))
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
            _fabric: Some(fabric.clone()),
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
        x.sync_clock();
        Ok(x)
    }

    /// Sets dom0's clock (and so Xen's wall clock, which dom0 keeps) to this
    /// machine's, to a few milliseconds: guests' clocks then agree across hosts, and
    /// a migrated guest's clock jump is its downtime.
    pub fn sync_clock(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970");
        self.shell(&format!(
            "date -s @{}.{:09} >/dev/null",
            now.as_secs(),
            now.subsec_nanos()
        ));
    }

    /// Attaches to host `n` of the nested Xens a `gve-lab xen` holds (its env file:
    /// `GVE_LAB_XEN_URI` and `GVE_LAB_XEN_SHELL` for host 1, with `_2` for host 2).
    pub fn attach(env_file: &Path, n: u8) -> NestedXen {
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
            _fabric: None,
            uri: get(&lab_var("GVE_LAB_XEN_URI", n)),
            shell_port: get(&lab_var("GVE_LAB_XEN_SHELL", n))
                .parse()
                .expect("a port"),
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
    /// and in libvirt, and their console logs (what an earlier test may have left:
    /// xenconsoled appends to a guest's log across boots).
    pub fn clear(&self, prefix: &str) {
        self.shell(&format!(
            "for d in $(xl list | awk 'NR>1 {{print $1}}' | grep '^{prefix}'); do xl destroy $d; done; \
             for d in $(virsh -q -c xen:///system list --all --name | grep '^{prefix}'); do \
               virsh -q -c xen:///system destroy $d; virsh -q -c xen:///system undefine $d; done; \
             for v in $(virsh -q -c xen:///system vol-list gve | awk '{{print $1}}' | grep '^{prefix}'); do \
               virsh -q -c xen:///system vol-delete --pool gve $v; done; \
             rm -f /var/log/xen/console/guest-{prefix}*.log"
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

/// A test's turn on this process's nested Xen ([`shared`]): derefs to host 1; the
/// next test's turn starts when this is dropped.
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

static FABRIC: OnceLock<Arc<Fabric>> = OnceLock::new();

/// Boots (or attaches to) host `n` of this process's lab.
fn kept(n: u8) -> NestedXen {
    if let Some(env) = std::env::var_os(LAB_ENV) {
        return NestedXen::attach(Path::new(&env), n);
    }
    FABRIC.get_or_init(Fabric::new).boot_kept(n)
}

impl Turn {
    /// The lab's second host, on the same fabric as the first (shared pool, a link
    /// between the dom0s): booted on first use, or the `gve-lab xen` one.
    pub fn second(&self) -> &'static NestedXen {
        static SECOND: OnceLock<NestedXen> = OnceLock::new();
        SECOND.get_or_init(|| kept(2))
    }
}

/// This process's nested Xen, for the caller's turn: booted on first use (host 1 of
/// the lab's fabric) by a thread that lives as long as the process (QEMU ends with
/// it), or attached to the one `GVE_XEN_LAB` names. Tests take turns, so one test's
/// faults (a killed libvirtd) never meet another's operations.
pub fn shared() -> Turn {
    static LAB: OnceLock<NestedXen> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    // A test that failed during its turn does not spoil the lab for the next.
    let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let xen = LAB.get_or_init(|| kept(1));
    Turn { xen, _turn: turn }
}
