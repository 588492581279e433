//! `create` and `destroy`: a VM made from a profile reads back as asked, a name is
//! unique, and a destroyed VM is gone.

use gve::plugin::bindings::types::{Capabilities as C, VmState};
use gve::plugin::ErrorKind;

use crate::case::{Case, CheckFuture, Need};
use crate::ctx::{ensure, must, must_fail, state_name, Ctx};

/// The lifecycle cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "create.reads-back",
            group: "create",
            about: "a created VM is stopped, named as asked, found by get-vm and listed",
            need: Need::Declared(C::CREATE | C::DESTROY),
            check: create_reads_back,
        },
        Case {
            name: "create.name-taken-is-already-exists",
            group: "create",
            about: "creating a second VM of the same name answers already-exists",
            need: Need::Declared(C::CREATE | C::DESTROY),
            check: name_taken,
        },
        Case {
            name: "destroy.removes",
            group: "destroy",
            about: "a destroyed VM is not found nor listed; destroying it again answers not-found",
            need: Need::Declared(C::CREATE | C::DESTROY),
            check: destroy_removes,
        },
    ]
}

fn create_reads_back(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let asked = ctx.profile("create");
        let vm = ctx.create("create").await?;
        ensure(vm.name == asked.name, || {
            format!("create answered name {:?}, asked {:?}", vm.name, asked.name)
        })?;
        ensure(vm.state == VmState::Stopped, || {
            format!(
                "a created VM must be stopped; create answered {}",
                state_name(vm.state)
            )
        })?;
        ensure(!vm.is_template, || "create made a template".into())?;
        let again = must(
            &format!("get-vm {}", vm.id),
            ctx.driver.get_vm(&vm.id).await,
        )?;
        ensure(
            again.name == asked.name && again.state == VmState::Stopped,
            || {
                format!(
                    "get-vm {} reads back {:?} {}; create answered {:?} stopped",
                    vm.id,
                    again.name,
                    state_name(again.state),
                    asked.name
                )
            },
        )?;
        let by_name = must(
            &format!("get-vm {} (by name)", asked.name),
            ctx.driver.get_vm(&asked.name).await,
        )?;
        ensure(by_name.id == vm.id, || {
            format!("get-vm by name finds {}, not {}", by_name.id, vm.id)
        })?;
        let listed = must("list-vms", ctx.driver.list_vms().await)?;
        ensure(listed.iter().any(|v| v.id == vm.id), || {
            format!("list-vms does not list the created VM {}", vm.id)
        })
    })
}

fn name_taken(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let first = ctx.create("twin").await?;
        let second = ctx.driver.create(&ctx.profile("twin")).await;
        if let Ok(vm) = &second {
            ctx.made(crate::ctx::Side::First, &vm.id);
        }
        must_fail(
            &format!("a second create of {}", first.name),
            ErrorKind::AlreadyExists,
            second,
        )
    })
}

fn destroy_removes(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vm = ctx.create("destroy").await?;
        must(
            &format!("destroy {}", vm.id),
            ctx.driver.destroy(&vm.id).await,
        )?;
        must_fail(
            &format!("get-vm {} after destroy", vm.id),
            ErrorKind::NotFound,
            ctx.driver.get_vm(&vm.id).await,
        )?;
        let listed = must("list-vms", ctx.driver.list_vms().await)?;
        ensure(!listed.iter().any(|v| v.id == vm.id), || {
            format!("list-vms still lists {} after destroy", vm.id)
        })?;
        must_fail(
            &format!("destroy {} again", vm.id),
            ErrorKind::NotFound,
            ctx.driver.destroy(&vm.id).await,
        )
    })
}
