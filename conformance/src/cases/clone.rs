//! `clone`, `linked-clone` and `templates`.

use gve::plugin::bindings::types::{Capabilities as C, VmState};
use gve::plugin::ErrorKind;

use crate::case::{Case, CheckFuture, Need};
use crate::ctx::{ensure, must, must_fail, state_name, Ctx, Side};

fn clone_caps() -> C {
    C::CREATE | C::DESTROY | C::CLONE
}

/// The clone and template cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "clone.copies-a-vm",
            group: "clone",
            about: "a clone is a new stopped VM under the new name; its source is unchanged",
            need: Need::Declared(clone_caps()),
            check: clone_copies,
        },
        Case {
            name: "linked-clone.copies-a-vm",
            group: "linked-clone",
            about: "a linked clone is a new stopped VM under the new name",
            need: Need::Declared(clone_caps() | C::LINKED_CLONE),
            check: linked_clone,
        },
        Case {
            name: "linked-clone.refused-by-name",
            group: "clone",
            about: "a driver without linked-clone is never asked for one: the host answers unsupported, naming linked-clone",
            need: Need::Undeclared(clone_caps(), C::LINKED_CLONE),
            check: linked_refused,
        },
        Case {
            name: "templates.listed-apart",
            group: "templates",
            about: "list-templates lists only templates, each found by get-vm as a template",
            need: Need::Declared(C::TEMPLATES),
            check: templates_listed,
        },
        Case {
            name: "templates.clone-from-template",
            group: "templates",
            about: "a clone of the target's template is a stopped VM, not a template",
            need: Need::Template(C::TEMPLATES | C::CLONE | C::DESTROY),
            check: clone_template,
        },
    ]
}

async fn check_clone(
    ctx: &Ctx,
    source: &str,
    what: &str,
    linked: bool,
) -> Result<(), crate::Failure> {
    let name = ctx.name(what);
    let before = must(&format!("get-vm {source}"), ctx.driver.get_vm(source).await)?;
    let copy = ctx.driver.clone_vm(source, &name, linked).await;
    if let Ok(vm) = &copy {
        ctx.made(Side::First, &vm.id);
    }
    let copy = must(
        &format!("clone {source} to {name} (linked: {linked})"),
        copy,
    )?;
    ensure(copy.name == name && copy.id != before.id, || {
        format!(
            "the clone is {} named {:?}; expected a new id named {name:?}",
            copy.id, copy.name
        )
    })?;
    ensure(!copy.is_template, || "the clone is a template".into())?;
    let read = ctx
        .wait_state(Side::First, &copy.id, VmState::Stopped)
        .await?;
    ensure(read.name == name, || {
        format!("get-vm reads the clone back as {:?}", read.name)
    })?;
    let after = must(&format!("get-vm {source}"), ctx.driver.get_vm(source).await)?;
    ensure(
        after.state == before.state && after.name == before.name,
        || {
            format!(
                "cloning changed its source: {:?} {} -> {:?} {}",
                before.name,
                state_name(before.state),
                after.name,
                state_name(after.state)
            )
        },
    )
}

fn clone_copies(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let src = ctx.create("clone-src").await?;
        check_clone(ctx, &src.id, "clone", false).await
    })
}

fn linked_clone(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let src = match &ctx.linked_source {
            Some(s) => s.clone(),
            None => ctx.create("linked-src").await?.id,
        };
        check_clone(ctx, &src, "linked", true).await
    })
}

fn linked_refused(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let src = ctx.create("unlinked-src").await?;
        let r = ctx
            .driver
            .clone_vm(&src.id, &ctx.name("unlinked"), true)
            .await;
        if let Ok(vm) = &r {
            ctx.made(Side::First, &vm.id);
        }
        let err = match r {
            Err(e) => e,
            Ok(_) => return must_fail("linked clone", ErrorKind::Unsupported, r),
        };
        ensure(
            err.kind() == ErrorKind::Unsupported && err.to_string().contains("linked-clone"),
            || format!("a refused linked clone must be unsupported and name linked-clone: {err}"),
        )
    })
}

fn templates_listed(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let templates = must("list-templates", ctx.driver.list_templates().await)?;
        for t in templates.iter().take(20) {
            ensure(t.is_template, || {
                format!("list-templates lists {} which is not a template", t.id)
            })?;
            let again = must(&format!("get-vm {}", t.id), ctx.driver.get_vm(&t.id).await)?;
            ensure(again.is_template, || {
                format!("get-vm {} does not say it is a template", t.id)
            })?;
        }
        if let Some(want) = &ctx.template {
            ensure(
                templates.iter().any(|t| &t.id == want || &t.name == want),
                || format!("list-templates does not list the target's template {want:?}"),
            )?;
        }
        let vms = must("list-vms", ctx.driver.list_vms().await)?;
        ensure(!vms.iter().any(|v| v.is_template), || {
            "list-vms lists a template".into()
        })
    })
}

fn clone_template(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let template = ctx.template.clone().unwrap_or_default();
        check_clone(ctx, &template, "from-template", false).await
    })
}
