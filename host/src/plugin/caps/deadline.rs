//! Deadline capability: the time left in the plugin's current call, so a plugin can
//! end a slow wait itself (with its instance kept and its clean-up run) rather than
//! be stopped by the sandbox; and a sleep while a hypervisor's task long by nature
//! runs, charged to the operator's long-call budget where the call has one. Always
//! granted: it tells the plugin only its own limits, and its long sleeps are held to
//! the same budget the host's long libvirt calls are.

use std::time::Duration;

use crate::plugin::bindings::gve::hypervisor::deadline::Host;
use crate::plugin::state::HostState;

/// Milliseconds, saturating.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Sleeps `d`; nothing at all for zero (a plugin asking what is left of its long
/// budget sleeps zero).
async fn nap(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

impl Host for HostState {
    async fn remaining_ms(&mut self) -> wasmtime::Result<u64> {
        // No deadline armed only outside a call, where the plugin cannot ask.
        Ok(ms(self.limiter.remaining()))
    }

    async fn long_wait(&mut self, wanted: u64) -> wasmtime::Result<u64> {
        let want = Duration::from_millis(wanted);
        // A long wait moves the deadline on by the long budget while it sleeps and
        // back by what it did not use: the plugin runs no code meanwhile, so only
        // the sleep is left out of the call's budget.
        match self.limiter.begin_long() {
            Some(wait) => {
                nap(want.min(wait.limit())).await;
                self.limiter.end_long(wait);
                Ok(ms(self.limiter.long_left()))
            }
            None => {
                // No long budget, or no time left in the call to use it: a plain
                // sleep, and 0 so that a loop on the answer does not spin.
                nap(want.min(self.limiter.host_wait())).await;
                Ok(0)
            }
        }
    }
}
