//! Mandatory: what every driver answers, whatever it declares.

use gve::plugin::ErrorKind;

use crate::case::{Case, CheckFuture, Need};
use crate::ctx::{ensure, must, must_fail, Ctx};

/// The core cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "core.info",
            group: "core",
            about: "info() names the driver, its version and its hypervisor kind",
            need: Need::Mandatory,
            check: info,
        },
        Case {
            name: "core.host-info",
            group: "core",
            about: "host-info states a host with CPUs and memory, free memory within total",
            need: Need::Mandatory,
            check: host_info,
        },
        Case {
            name: "core.list-vms-reads-back",
            group: "core",
            about: "every listed VM is found again by get-vm under the same id and name",
            need: Need::Mandatory,
            check: list_reads_back,
        },
        Case {
            name: "core.unknown-vm-is-not-found",
            group: "core",
            about: "get-vm of a VM that does not exist answers not-found",
            need: Need::Mandatory,
            check: unknown_is_not_found,
        },
    ]
}

fn info(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let i = &ctx.info;
        ensure(!i.name.is_empty(), || "info() has an empty name".into())?;
        ensure(!i.hypervisor_kind.is_empty(), || {
            "info() has an empty hypervisor kind".into()
        })?;
        ensure(
            i.version.split('.').count() == 3 && i.version.split('.').all(|p| !p.is_empty()),
            || format!("info() version {:?} is not MAJOR.MINOR.PATCH", i.version),
        )
    })
}

fn host_info(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let h = must("host-info", ctx.driver.host_info().await)?;
        ensure(h.logical_cpus > 0, || {
            "host-info states 0 logical CPUs".into()
        })?;
        ensure(h.main_memory_mib > 0, || {
            "host-info states 0 MiB of memory".into()
        })?;
        ensure(!h.hostname.is_empty(), || {
            "host-info has an empty host name".into()
        })?;
        ensure(h.hypervisor_kind == ctx.info.hypervisor_kind, || {
            format!(
                "host-info says hypervisor kind {:?}, info() says {:?}",
                h.hypervisor_kind, ctx.info.hypervisor_kind
            )
        })
    })
}

fn list_reads_back(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let vms = must("list-vms", ctx.driver.list_vms().await)?;
        for vm in vms.iter().take(20) {
            ensure(!vm.is_template, || {
                format!(
                    "list-vms lists template {} (templates belong in list-templates)",
                    vm.id
                )
            })?;
            let again = must(
                &format!("get-vm {} (listed by list-vms)", vm.id),
                ctx.driver.get_vm(&vm.id).await,
            )?;
            ensure(again.id == vm.id && again.name == vm.name, || {
                format!(
                    "list-vms lists {} named {:?}; get-vm answers {} named {:?}",
                    vm.id, vm.name, again.id, again.name
                )
            })?;
        }
        Ok(())
    })
}

fn unknown_is_not_found(ctx: &Ctx) -> CheckFuture<'_> {
    Box::pin(async move {
        let absent = ctx.name("absent");
        must_fail(
            &format!("get-vm {absent}"),
            ErrorKind::NotFound,
            ctx.driver.get_vm(&absent).await,
        )
    })
}
