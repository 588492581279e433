//! Waiting for vSphere tasks: within the call's budget, and a clone's or a
//! relocation's first within the operator's long-call budget.

use std::time::{Duration, Instant};

use gve_sdk::{deadline, Error, Result};

use crate::fault::Fault;
use crate::props;
use crate::soap::Client;
use crate::xml::{self, MoRef};

/// How a task ended.
#[derive(Debug)]
pub enum Outcome {
    /// It succeeded; its result, when it is a managed object (a new VM).
    Success(Option<MoRef>),
    /// It failed with this fault.
    Error(Fault),
}

/// Reads the task returned by a `..._Task` method's reply.
pub fn returned(response: roxmltree::Node<'_, '_>, method: &str) -> Result<MoRef> {
    xml::child(response, "returnval")
        .and_then(xml::moref_of)
        .ok_or_else(|| Error::backend(format!("vSphere {method}: no task in the reply")))
}

/// What a task's wait leaves of the call's budget for the steps after it.
pub const KEEP: Duration = Duration::from_secs(1);

/// The `..._Task` methods whose work is long by nature (a full copy of a VM's
/// disks): between polls the wait sleeps with [`deadline::long_wait`], charged to
/// the operator's `long-call-timeout-ms` in `create`, `clone` and `migrate`.
pub const LONG: &[&str] = &["CloneVM_Task", "RelocateVM_Task"];

/// The longest pause between two polls of a long task: each poll is charged to the
/// call, so a task of half an hour costs a few hundred polls, not thousands.
const LONG_PAUSE_MAX: Duration = Duration::from_secs(5);

/// Polls `task` until it ends or `want` passes, within what is left of the call
/// less [`KEEP`] and the client's reserve (then `timeout`, saying the task goes on
/// on the server, and naming `call-timeout-ms` when the call's budget was the
/// bound). A `long` task ([`LONG`]) is first waited for within the operator's
/// long-call budget, each pause an eighth of the time it has run (50 ms to 5 s);
/// `want` and the call's budget count from when that is used up. Fails with the
/// task's fault mapped to the contract, prefixed by `context`.
pub fn wait(
    client: &mut Client,
    task: &MoRef,
    context: &str,
    want: Duration,
    long: bool,
) -> Result<Option<MoRef>> {
    let began = Instant::now();
    let keep = KEEP + client.reserve;
    let mut on_long_budget = long;
    let mut limit = deadline::bounded(want, keep);
    let mut until = began + limit;
    let mut pause = Duration::from_millis(50);
    loop {
        if on_long_budget && deadline::remaining() <= keep {
            // The polls themselves used up the call.
            return Err(deadline::over_budget(still_running(
                context, task, began, long,
            )));
        }
        if let Some(r) = poll(client, task, context)? {
            return Ok(r);
        }
        if on_long_budget {
            let pause = (began.elapsed() / 8).clamp(Duration::from_millis(50), LONG_PAUSE_MAX);
            if deadline::long_wait(pause).is_zero() {
                // No long budget (left, or granted to this call): from here on the
                // task is waited for like any other.
                on_long_budget = false;
                limit = deadline::bounded(want, keep);
                until = Instant::now() + limit;
            }
            continue;
        }
        let now = Instant::now();
        if now >= until {
            let what = still_running(context, task, began, long);
            return Err(if limit < want {
                deadline::over_budget(what)
            } else {
                Error::timeout(format!("{what} (the plugin's `task-timeout-ms`)"))
            });
        }
        std::thread::sleep(pause.min(until - now));
        pause = (pause * 2).min(Duration::from_millis(1000));
    }
}

/// The task's end, once it ended: its result, or its fault as the error.
fn poll(client: &mut Client, task: &MoRef, context: &str) -> Result<Option<Option<MoRef>>> {
    let mut outcome = None;
    props::one(
        client,
        task,
        &["info.state", "info.error", "info.result"],
        |p| {
            outcome = match props::text(p, "info.state") {
                Some("success") => Some(Outcome::Success(props::moref(p, "info.result"))),
                Some("error") => Some(Outcome::Error(
                    props::get(p, "info.error")
                        .map(Fault::from_localized)
                        .unwrap_or_else(|| Fault {
                            kind: "UnknownFault".into(),
                            message: "the task failed without saying why".into(),
                            existing_state: None,
                        }),
                )),
                _ => None,
            };
            Ok(())
        },
    )?;
    match outcome {
        Some(Outcome::Success(r)) => Ok(Some(r)),
        Some(Outcome::Error(f)) => Err(f.to_error(context)),
        None => Ok(None),
    }
}

/// What a wait that gave up says: the task goes on on the server.
fn still_running(context: &str, task: &MoRef, began: Instant, long: bool) -> String {
    let first = if long {
        " (waited for within the operator's `long-call-timeout-ms` first)"
    } else {
        ""
    };
    format!(
        "{context}: task {} still running after {} ms{first}; it goes on on the server",
        task.value,
        began.elapsed().as_millis()
    )
}
