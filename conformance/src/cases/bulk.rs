//! Bulk copies (contract 0.1.1, `gve:hypervisor/bulk`): a disk the driver stages
//! and attaches to a running VM carries bytes both ways, the guest finds it by its
//! serial, and it goes away when released; and a driver without the export is
//! refused by the host before it is entered. The guest side uses only `sh`, `dd`,
//! `head`, `sha256sum` and `/sys/block/*/serial`.

use gve::plugin::bindings::types::{Capabilities as C, VmState};
use gve::plugin::ErrorKind;
use sha2::{Digest, Sha256};

use super::guest::{guest, request, run, running_guest};
use crate::case::{Case, CheckFuture, Need};
use crate::ctx::{ensure, must, must_fail, Ctx, Failure, Side};

/// The bulk cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "bulk.disk-carries-bytes-both-ways",
            group: "bulk",
            about: "a staged disk shows in the running guest by its serial; bytes the host writes read back in the guest and bytes the guest writes read back on the host (SHA-256 both sides); release removes it; a stopped VM is invalid-state, bad ids and sizes invalid-argument, a staged id already-exists",
            need: Need::Bulk(C::CREATE | C::DESTROY | C::START | C::SHUTDOWN),
            check: carries,
        },
        Case {
            name: "bulk.refused-without-export",
            group: "bulk",
            about: "a driver that does not export gve:hypervisor/bulk is refused (unsupported) by the host before it is entered",
            need: Need::NoBulk,
            check: refused,
        },
    ]
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A guest script that sets `dev` to the disk whose serial is `serial`.
fn find(serial: &str) -> String {
    format!(
        "dev=; for i in $(seq 100); do for s in /sys/block/*/serial; do \
         [ \"$(cat $s 2>/dev/null)\" = {serial} ] && {{ d=${{s%/serial}}; dev=/dev/${{d##*/}}; }}; \
         done; [ -n \"$dev\" ] && break; sleep 0.1; done; [ -n \"$dev\" ] || exit 3; "
    )
}

fn carries(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vm = running_guest(ctx, "bulk").await?;
        let d = &ctx.driver;
        let id = format!("conf-{}", std::process::id());
        for bad in ["", "a/b", "a b"] {
            must_fail(
                &format!("stage with id {bad:?}"),
                ErrorKind::InvalidArgument,
                d.bulk_stage(&vm, bad, 1).await,
            )?;
        }
        must_fail(
            "stage of u64::MAX bytes",
            ErrorKind::InvalidArgument,
            d.bulk_stage(&vm, &id, u64::MAX).await,
        )?;

        let size = (5 << 20) + 7;
        let data: Vec<u8> = (0..size)
            .map(|i: usize| (i.wrapping_mul(131) >> 3) as u8)
            .collect();
        let mut x = must("stage", d.bulk_stage(&vm, &id, size as u64).await)?;
        must_fail(
            "a second stage of the same id",
            ErrorKind::AlreadyExists,
            d.bulk_stage(&vm, &id, 1).await,
        )?;
        for (i, piece) in data.chunks(4 << 20).enumerate() {
            must("write", x.write((i as u64) << 22, piece).await)?;
        }
        let back = must("read", x.read(0, size as u32).await)?;
        ensure(back == data, || {
            "the disk read back differs from what was written".into()
        })?;

        let script = format!(
            "{}dd if=$dev bs=1M count=6 iflag=direct 2>/dev/null | head -c {size} | sha256sum",
            find(&x.serial)
        );
        let r = run(ctx, &vm, &request(&["sh", "-c", &script])).await?;
        let out = String::from_utf8_lossy(&r.stdout).to_string();
        ensure(
            r.exit_code == Some(0) && out.starts_with(&hex(&data)),
            || {
                format!(
                    "the guest read {out:?} (exit {:?}, {}) off disk {}, the host wrote {}",
                    r.exit_code,
                    String::from_utf8_lossy(&r.stderr),
                    x.serial,
                    hex(&data)
                )
            },
        )?;

        let script = format!(
            "{}head -c 1048576 /dev/urandom > /tmp/gve-conf-out && \
             dd if=/tmp/gve-conf-out of=$dev bs=1M oflag=direct conv=fsync 2>/dev/null && \
             sha256sum /tmp/gve-conf-out && rm -f /tmp/gve-conf-out",
            find(&x.serial)
        );
        let r = run(ctx, &vm, &request(&["sh", "-c", &script])).await?;
        let out = String::from_utf8_lossy(&r.stdout).to_string();
        let got = must("read what the guest wrote", x.read(0, 1 << 20).await)?;
        ensure(
            r.exit_code == Some(0) && out.starts_with(&hex(&got)),
            || {
                format!(
                    "the guest wrote {out:?} (exit {:?}), the host read {}",
                    r.exit_code,
                    hex(&got)
                )
            },
        )?;

        let serial = x.serial.clone();
        must("release", x.release().await)?;
        must(
            "release-left after release",
            d.bulk_release_left(&vm, &id).await,
        )?;
        // The guest sees the disk go (an unplug may finish after release answers).
        let script = format!(
            "for i in $(seq 100); do gone=1; for s in /sys/block/*/serial; do \
             [ \"$(cat $s 2>/dev/null)\" = {serial} ] && gone=0; done; \
             [ $gone = 1 ] && exit 0; sleep 0.1; done; exit 3"
        );
        let r = run(ctx, &vm, &request(&["sh", "-c", &script])).await?;
        ensure(r.exit_code == Some(0), || {
            format!("the released disk {serial} is still in the guest 10 s later")
        })?;
        // Released, the id can be staged again.
        let again = must("stage again after release", d.bulk_stage(&vm, &id, 1).await)?;
        must("release again", again.release().await)?;

        must("shutdown", d.shutdown(&vm, true).await)?;
        ctx.wait_state(Side::First, &vm, VmState::Stopped).await?;
        must_fail(
            "stage for a stopped VM",
            ErrorKind::InvalidState,
            d.bulk_stage(&vm, &id, 1).await,
        )?;
        guest(ctx).map(drop)
    })
}

fn refused(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let e = ctx.driver.bulk_stage("any-vm", "any", 1).await;
        match e {
            Err(e) if e.kind() == ErrorKind::Unsupported => Ok(()),
            Err(e) => Err(Failure::new(format!("want unsupported, got {e}"))),
            Ok(_) => Err(Failure::new(
                "a driver without the bulk export staged a disk",
            )),
        }
    })
}
