//! `start`, `shutdown`, `suspend`, `resume`: each state change reads back from the
//! hypervisor, and repeating one answers invalid-state.

use gve::plugin::bindings::types::{Capabilities as C, VmState};
use gve::plugin::ErrorKind;

use crate::case::{Case, CheckFuture, Need};
use crate::ctx::{must, must_fail, Ctx, Side};

fn power_caps() -> C {
    C::CREATE | C::DESTROY | C::START | C::SHUTDOWN
}

/// The power cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "start.runs-and-repeats-invalid-state",
            group: "start",
            about: "start reads back running; starting a running VM answers invalid-state",
            need: Need::Declared(power_caps()),
            check: start,
        },
        Case {
            name: "shutdown.force-stops-and-repeats-invalid-state",
            group: "shutdown",
            about: "a forced shutdown reads back stopped; shutting down a stopped VM answers invalid-state",
            need: Need::Declared(power_caps()),
            check: shutdown,
        },
        Case {
            name: "suspend.suspends-and-resume-runs",
            group: "suspend",
            about: "suspend reads back suspended, resume running; suspending a stopped VM and resuming a running one answer invalid-state",
            need: Need::Declared(power_caps() | C::SUSPEND | C::RESUME),
            check: suspend_resume,
        },
    ]
}

fn start(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vm = ctx.create("start").await?;
        must(&format!("start {}", vm.id), ctx.driver.start(&vm.id).await)?;
        ctx.wait_state(Side::First, &vm.id, VmState::Running)
            .await?;
        must_fail(
            &format!("start {} while running", vm.id),
            ErrorKind::InvalidState,
            ctx.driver.start(&vm.id).await,
        )
    })
}

fn shutdown(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vm = ctx.create("shutdown").await?;
        must_fail(
            &format!("shutdown {} while stopped", vm.id),
            ErrorKind::InvalidState,
            ctx.driver.shutdown(&vm.id, true).await,
        )?;
        must(&format!("start {}", vm.id), ctx.driver.start(&vm.id).await)?;
        ctx.wait_state(Side::First, &vm.id, VmState::Running)
            .await?;
        must(
            &format!("shutdown {} (force)", vm.id),
            ctx.driver.shutdown(&vm.id, true).await,
        )?;
        ctx.wait_state(Side::First, &vm.id, VmState::Stopped)
            .await?;
        must_fail(
            &format!("shutdown {} again", vm.id),
            ErrorKind::InvalidState,
            ctx.driver.shutdown(&vm.id, true).await,
        )
    })
}

fn suspend_resume(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vm = ctx.create("suspend").await?;
        must_fail(
            &format!("suspend {} while stopped", vm.id),
            ErrorKind::InvalidState,
            ctx.driver.suspend(&vm.id).await,
        )?;
        must(&format!("start {}", vm.id), ctx.driver.start(&vm.id).await)?;
        ctx.wait_state(Side::First, &vm.id, VmState::Running)
            .await?;
        must_fail(
            &format!("resume {} while running", vm.id),
            ErrorKind::InvalidState,
            ctx.driver.resume(&vm.id).await,
        )?;
        must(
            &format!("suspend {}", vm.id),
            ctx.driver.suspend(&vm.id).await,
        )?;
        ctx.wait_state(Side::First, &vm.id, VmState::Suspended)
            .await?;
        must(
            &format!("resume {}", vm.id),
            ctx.driver.resume(&vm.id).await,
        )?;
        ctx.wait_state(Side::First, &vm.id, VmState::Running)
            .await?;
        Ok(())
    })
}
