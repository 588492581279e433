//! A private libvirtd for tests: gve's own ([`gve::cli::libvirtd::PrivateLibvirtd`],
//! what `gve up` runs), started in its own mount namespace with a host UUID of its
//! own (so several run side by side, and a second one plays another host), with a
//! `gve` storage pool and a tiny-guest template. Dropping it ends the QEMU
//! processes it started and then libvirtd.

use std::path::PathBuf;
use std::process::Command;

use gve::cli::libvirtd::{tiny_template_xml, PrivateLibvirtd};

/// A running private libvirtd.
pub struct Libvirtd {
    /// Dropped first (fields drop in order): ends the guests and the daemon
    /// before their directory goes.
    daemon: PrivateLibvirtd,
    /// Its state directory.
    pub dir: tempfile::TempDir,
    /// URI for clients on this machine.
    pub uri: String,
    /// The storage pool's directory.
    pub images: PathBuf,
}

/// The tiny guest (kernel, initrd, base disk), built once per test run.
pub fn guest() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    crate::built_once(&DIR, "build-guest.sh", "guest", "the test guest")
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
        let (daemon, uri) =
            PrivateLibvirtd::start_with(dir.path(), Some(&uuid::Uuid::new_v4().to_string()))
                .unwrap_or_else(|e| {
                    panic!("{e} (is libvirt-daemon installed? run scripts/setup.sh)")
                });
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::copy(guest.join("base.qcow2"), images.join("tiny-base.qcow2")).unwrap();
        let lv = Libvirtd {
            daemon,
            dir,
            uri,
            images,
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
        let xml = lv.dir.path().join("tiny.xml");
        std::fs::write(
            &xml,
            tiny_template_xml(
                &guest.join("vmlinuz"),
                &guest.join("initrd.img"),
                &lv.images.join("tiny-base.qcow2"),
            ),
        )
        .unwrap();
        virsh(&lv.uri, &["define", &xml.display().to_string()]);
        lv
    }

    /// Gives this daemon a pool `gve-peer` on `other`'s images directory, as
    /// shared storage would (one path, seen by both hosts): a VM migrated here
    /// with its disk left there can then be destroyed here, disk and all.
    pub fn see_pool_of(&self, other: &Libvirtd) {
        self.virsh(&[
            "pool-define-as",
            "gve-peer",
            "dir",
            "--target",
            &other.images.display().to_string(),
        ]);
        self.virsh(&["pool-start", "gve-peer"]);
    }

    /// libvirtd's process id.
    pub fn pid(&self) -> i32 {
        self.daemon.pid()
    }

    /// This daemon named as a migration destination: libvirt refuses
    /// `qemu:///…?socket=` as one ("same host"), so it is `qemu+unix:///…`.
    pub fn migration_uri(&self) -> String {
        self.uri.replacen("qemu:///", "qemu+unix:///", 1)
    }

    /// `virsh` against this daemon.
    pub fn virsh(&self, args: &[&str]) -> String {
        virsh(&self.uri, args)
    }
}
