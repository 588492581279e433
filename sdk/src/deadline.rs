//! The time left in the current call (`deadline` import, contract 0.1.2).
//!
//! The host stops a call that outlives the plugin's `call-timeout-ms` limit and drops
//! the instance it ran in: the call fails as a sandbox deadline, and what the call
//! meant to clean up afterwards (a resource's drop) never runs. A plugin that waits
//! on something slow (a command in a guest, a hypervisor's task) can instead bound
//! its wait by [`remaining`] less what it needs to stop cleanly, and return an
//! [`crate::Error::Timeout`] that names the limit.

use core::time::Duration;

use crate::bindings::driver_world::gve::hypervisor::deadline as wit;

/// The time left before the host stops the current call (zero once it passed).
pub fn remaining() -> Duration {
    Duration::from_millis(wit::remaining_ms())
}
