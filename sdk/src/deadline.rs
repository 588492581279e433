//! The time left in the current call (`deadline` import, contract 0.1.2), and sleeps
//! while a hypervisor's task long by nature runs (0.1.3).
//!
//! The host stops a call that outlives the plugin's `call-timeout-ms` limit and drops
//! the instance it ran in: the call fails as a sandbox deadline, and what the call
//! meant to clean up afterwards (a resource's drop) never runs. A plugin that waits
//! on something slow (a command in a guest, a hypervisor's task) can instead bound
//! its wait with [`bounded`] (what it wants, within what is left less what it needs
//! to stop cleanly) and, when the call's budget was the bound, return
//! [`over_budget`]: a [`crate::Error::Timeout`] that names the limit.
//! [`crate::http::Request::send`] bounds every request this way by itself.

use core::time::Duration;

use crate::bindings::driver_world::gve::hypervisor::deadline as wit;
use crate::error::Error;

/// The time left before the host stops the current call (zero once it passed).
pub fn remaining() -> Duration {
    Duration::from_millis(wit::remaining_ms())
}

/// Sleeps up to `pause` while the hypervisor does work long by nature on its own
/// side (a clone or relocation task the plugin polls between sleeps). In `create`,
/// `clone` and `migrate` the sleep is charged to the operator's
/// `long-call-timeout-ms` as far as that covers it, not to the call ([`remaining`]
/// is then what it was before); elsewhere, and once that budget is used up, it is a
/// plain sleep that ends before the call's deadline. Returns what is left of the
/// long-call budget (zero: none left, none granted to this call, or too little of
/// the call left to use it); sleep no longer than that, or the rest of the sleep is
/// charged to the call. Needs a host of contract 0.1.3.
pub fn long_wait(pause: Duration) -> Duration {
    let ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(wit::long_wait(ms))
}

/// `want`, or less: at most what is left of the call once `keep` is set aside for
/// what must follow the wait (ending it, reporting, cleaning up). Zero when not even
/// `keep` is left. The call's budget was the bound when the result is below `want`.
pub fn bounded(want: Duration, keep: Duration) -> Duration {
    want.min(remaining().saturating_sub(keep))
}

/// The `timeout` error of work the call's budget cut short: `what` (e.g. "shut down
/// web-1: task task-12 still running") and how an operator gives the plugin more time.
pub fn over_budget(what: impl core::fmt::Display) -> Error {
    Error::timeout(format!(
        "{what} (the plugin call's time ran out; an operator gives the plugin more \
         with its `call-timeout-ms` limit)"
    ))
}
