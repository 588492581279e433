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

/// The longest pause between two polls of a long task, as its run time goes
/// (each poll is charged to the call; see [`long_pause`] for the other bound).
const LONG_PAUSE_MAX: Duration = Duration::from_secs(5);

/// The longest pause between two polls of a long task whatever the call's spare
/// time (a call with almost none would otherwise sleep through its whole long
/// budget before looking again).
const LONG_STRETCH_MAX: Duration = Duration::from_secs(60);

/// Polls `task` until it ends or `want` passes, within what is left of the call
/// less [`KEEP`], the client's reserve and `after` (what the caller needs once the
/// task ended); then `timeout`, saying the task goes on on the server, and naming
/// `call-timeout-ms` when the call's budget was the bound. A `long` task ([`LONG`])
/// is first waited for within the operator's long-call budget ([`long_pause`]
/// between polls); `want` and the call's budget count from when that is used up.
/// Fails with the task's fault mapped to the contract, prefixed by `context`.
pub fn wait(
    client: &mut Client,
    task: &MoRef,
    context: &str,
    want: Duration,
    long: bool,
    after: Duration,
) -> Result<Option<MoRef>> {
    let began = Instant::now();
    // What follows never takes more than half of what the wait could have: the
    // polls always get a real share (a small budget sizes a new VM with less).
    let own = KEEP + client.reserve;
    let after = after.min(deadline::remaining().saturating_sub(own) / 2);
    let keep = own + after;
    // What is left of the long-call budget (`None`: none to use). A sleep of
    // nothing asks the host for it.
    let mut long_left = long
        .then(|| deadline::long_wait(Duration::ZERO))
        .filter(|left| !left.is_zero());
    let mut long_used_up = false;
    let mut poll_cost: Option<Duration> = None;
    let mut limit = deadline::bounded(want, keep);
    let mut until = began + limit;
    let mut pause = Duration::from_millis(50);
    loop {
        let polled = Instant::now();
        if let Some(r) = poll(client, task, context)? {
            return Ok(r);
        }
        // A running average, so that one slow poll does not stretch every pause.
        let cost = polled.elapsed();
        let cost =
            *poll_cost.insert(poll_cost.map_or(cost, |c| c.mul_f64(0.8) + cost.mul_f64(0.2)));
        if let Some(left) = long_left {
            if deadline::remaining() <= keep {
                // The polls used up the call before the long budget ran out (or
                // the call never had more than what must follow the task).
                let what = still_running(context, task, began, false);
                return Err(deadline::over_budget(what));
            }
            let p = long_pause(began.elapsed(), cost, left, keep).min(left);
            let now_left = deadline::long_wait(p);
            if now_left.is_zero() {
                // None left: from here on the task is waited for like any other.
                long_used_up = true;
                long_left = None;
                limit = deadline::bounded(want, keep);
                until = Instant::now() + limit;
            } else {
                long_left = Some(now_left);
            }
            continue;
        }
        let now = Instant::now();
        if now >= until {
            let what = still_running(context, task, began, long_used_up);
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

/// The pause before the next poll of a long task that has run `ran`, whose polls
/// take `poll` (a running average), with `long_left` of the long-call budget: an
/// eighth of its run time (50 ms to [`LONG_PAUSE_MAX`]), and never so short that
/// polling through the rest of the long budget would take more than half of what is
/// left of the call beyond `keep` (up to [`LONG_STRETCH_MAX`]: past it the polls
/// may use up the call, which then ends the wait).
fn long_pause(ran: Duration, poll: Duration, long_left: Duration, keep: Duration) -> Duration {
    let by_run = (ran / 8).clamp(Duration::from_millis(50), LONG_PAUSE_MAX);
    let spare = deadline::remaining().saturating_sub(keep);
    if spare.is_zero() {
        return by_run;
    }
    let share = 2.0 * long_left.as_secs_f64() / spare.as_secs_f64();
    let spaced = poll.max(Duration::from_millis(5)).mul_f64(share.min(1e6));
    by_run.max(spaced.min(LONG_STRETCH_MAX))
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

/// What a wait that gave up says: the task goes on on the server (and, when
/// `long_used_up`, that the long-call budget ran out first).
fn still_running(context: &str, task: &MoRef, began: Instant, long_used_up: bool) -> String {
    let first = if long_used_up {
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
