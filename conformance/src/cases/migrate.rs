//! `migrate` and `live-migrate`, against the target's second host.

use gve::plugin::bindings::types::{Capabilities as C, VmState};
use gve::plugin::ErrorKind;

use crate::case::{Case, CheckFuture, Need};
use crate::ctx::{ensure, must, must_fail, Ctx, Side};

fn move_caps() -> C {
    C::CREATE | C::DESTROY | C::MIGRATE
}

/// The migration cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "migrate.moves-a-stopped-vm",
            group: "migrate",
            about:
                "after a migration the VM is found on the destination and no longer on the source",
            need: Need::SecondHost(move_caps()),
            check: cold,
        },
        Case {
            name: "live-migrate.keeps-it-running",
            group: "live-migrate",
            about:
                "a live migration moves a running VM, which reads back running on the destination",
            need: Need::SecondHost(move_caps() | C::LIVE_MIGRATE | C::START),
            check: live,
        },
    ]
}

async fn moved(ctx: &Ctx, what: &str, live: bool) -> Result<(), crate::Failure> {
    let (dest, _) = ctx
        .second
        .as_ref()
        .expect("the runner checked the second host");
    let vm = ctx.create(what).await?;
    if live {
        must(&format!("start {}", vm.id), ctx.driver.start(&vm.id).await)?;
        ctx.wait_state(Side::First, &vm.id, VmState::Running)
            .await?;
        tokio::time::sleep(ctx.boot).await;
    }
    let r = ctx.driver.migrate(&vm.id, dest, live).await;
    // Wherever it is now, it is cleaned up.
    ctx.made(Side::Second, &vm.name);
    must(&format!("migrate {} to {dest} (live: {live})", vm.id), r)?;
    let want = if live {
        VmState::Running
    } else {
        VmState::Stopped
    };
    let there = ctx.wait_state(Side::Second, &vm.name, want).await?;
    ensure(there.name == vm.name, || {
        format!(
            "the destination names it {:?}, not {:?}",
            there.name, vm.name
        )
    })?;
    if ctx.destination_host {
        // A host behind the same endpoint: the VM keeps its id and reads back there.
        let again = must(
            &format!("get-vm {} after migrating", vm.id),
            ctx.driver.get_vm(&vm.id).await,
        )?;
        return ensure(again.host == *dest && again.host != vm.host, || {
            format!(
                "after migrating to {dest}, {} reads back on host {:?} (it was on {:?})",
                vm.id, again.host, vm.host
            )
        });
    }
    must_fail(
        &format!("get-vm {} on the source after migrating", vm.id),
        ErrorKind::NotFound,
        ctx.driver.get_vm(&vm.id).await,
    )
}

fn cold(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(moved(ctx, "migrate", false))
}

fn live(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(moved(ctx, "live", true))
}
