//! `gve-lab`: stands up the project's real test targets for scripts (the
//! conformance runs, benchmarks) and keeps them up until its standard input closes.
//!
//! ```text
//! gve-lab kvm --env FILE [--hosts N]
//! gve-lab xen --env FILE [--hosts N]
//! ```
//!
//! `kvm` starts N (default 2) private libvirtd instances, each with a `gve` storage
//! pool and the tiny-guest template `tiny`, and writes shell assignments to FILE:
//! `GVE_LAB_URI_<i>` (the URI to connect to) and `GVE_LAB_MIGRATE_<i>` (the same
//! daemon named as a migration destination), `i` from 1. When standard input reaches
//! end of file (the script that started it closed its pipe, or died), everything it
//! started is ended: QEMU guests first, then the daemons.
//!
//! `xen` boots N (1 or 2, default 2) real Xen hosts nested under QEMU, side by side
//! (dom0 with libvirtd's libxl driver, a `gve` pool shared by both hosts, the PV
//! template `tiny-pv`, a private link between the dom0s) and writes `GVE_LAB_XEN_URI`
//! (libvirt URI) and `GVE_LAB_XEN_SHELL` (dom0's test shell port on 127.0.0.1) for
//! host 1, the same with `_2` for host 2; tests attach to them when `GVE_XEN_LAB`
//! names that file.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use gve_harness::xen::{lab_var, Fabric};
use gve_harness::{Libvirtd, NestedXen};

fn usage(msg: &str) -> ExitCode {
    eprintln!("gve-lab: {msg}\nusage: gve-lab kvm --env FILE [--hosts N] | gve-lab xen --env FILE [--hosts N]");
    ExitCode::from(2)
}

/// What a lab holds until standard input closes.
enum Lab {
    Kvm(Vec<Libvirtd>),
    Xen(Vec<NestedXen>),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((what, rest)) = args.split_first() else {
        return usage("name a lab");
    };
    if what != "kvm" && what != "xen" {
        return usage(&format!("unknown lab {what:?}"));
    }
    let (mut env, mut hosts) = (None::<PathBuf>, 2usize);
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--env", Some(v)) => env = Some(v.into()),
            ("--hosts", Some(v)) => match v.parse() {
                Ok(n) if what == "xen" && (1..=2).contains(&n) => hosts = n,
                Ok(n) if what == "kvm" && (1..=4).contains(&n) => hosts = n,
                _ => return usage("--hosts takes 1 to 4 (kvm), 1 or 2 (xen)"),
            },
            _ => return usage(&format!("unexpected argument {a:?}")),
        }
    }
    let Some(env) = env else {
        return usage("--env FILE is required");
    };
    let (lab, text) = if what == "xen" {
        // Side by side: each boot mostly waits on its own QEMU.
        let fabric = Fabric::new();
        let boots: Vec<_> = (1..=hosts as u8)
            .map(|n| {
                let f = fabric.clone();
                std::thread::spawn(move || f.boot_kept(n))
            })
            .collect();
        let mut xens = Vec::new();
        let mut text = String::new();
        for (i, b) in boots.into_iter().enumerate() {
            let Ok(xen) = b.join() else {
                eprintln!("gve-lab: Xen host {} did not come up", i + 1);
                return ExitCode::FAILURE;
            };
            let n = i as u8 + 1;
            text.push_str(&format!(
                "{}='{}'\n{}='{}'\n",
                lab_var("GVE_LAB_XEN_URI", n),
                xen.uri,
                lab_var("GVE_LAB_XEN_SHELL", n),
                xen.shell_port
            ));
            xens.push(xen);
        }
        (Lab::Xen(xens), text)
    } else {
        let daemons: Vec<Libvirtd> = (0..hosts).map(|_| Libvirtd::start()).collect();
        let mut text = String::new();
        for (i, d) in daemons.iter().enumerate() {
            text.push_str(&format!(
                "GVE_LAB_URI_{n}='{}'\nGVE_LAB_MIGRATE_{n}='{}'\n",
                d.uri,
                d.migration_uri(),
                n = i + 1
            ));
        }
        (Lab::Kvm(daemons), text)
    };
    // Written whole, then renamed: a reader never sees half a file.
    let tmp = env.with_extension("partial");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &env)) {
        eprintln!("gve-lab: cannot write {}: {e}", env.display());
        return ExitCode::FAILURE;
    }
    match &lab {
        Lab::Kvm(d) => eprintln!(
            "gve-lab: {} libvirtd up; ends when standard input closes",
            d.len()
        ),
        Lab::Xen(x) => eprintln!(
            "gve-lab: Xen up at {}; ends when standard input closes",
            x.iter()
                .map(|x| x.uri.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    let mut sink = [0u8; 4096];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    drop(lab);
    let _ = std::fs::remove_file(&env);
    ExitCode::SUCCESS
}
