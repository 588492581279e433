//! Waiting for vSphere tasks, always within the call's budget.

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

/// Polls `task` until it ends or `want` passes, within what is left of the call
/// less [`KEEP`] and the client's reserve (then `timeout`, saying the task goes on
/// on the server, and naming `call-timeout-ms` when the call's budget was the
/// bound). Fails with the task's fault mapped to the contract, prefixed by `context`.
pub fn wait(
    client: &mut Client,
    task: &MoRef,
    context: &str,
    want: Duration,
) -> Result<Option<MoRef>> {
    let limit = deadline::bounded(want, KEEP + client.reserve);
    let until = Instant::now() + limit;
    let mut pause = Duration::from_millis(50);
    loop {
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
            Some(Outcome::Success(r)) => return Ok(r),
            Some(Outcome::Error(f)) => return Err(f.to_error(context)),
            None => {}
        }
        let now = Instant::now();
        if now >= until {
            let what = format!(
                "{context}: task {} still running after {} ms; it goes on on the server",
                task.value,
                limit.as_millis()
            );
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
