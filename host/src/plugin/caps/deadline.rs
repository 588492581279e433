//! Deadline capability: the time left in the plugin's current call, so a plugin can
//! end a slow wait itself (with its instance kept and its clean-up run) rather than
//! be stopped by the sandbox. Always granted: it tells the plugin only its own limit.

use crate::plugin::bindings::gve::hypervisor::deadline::Host;
use crate::plugin::state::HostState;

impl Host for HostState {
    async fn remaining_ms(&mut self) -> wasmtime::Result<u64> {
        // No deadline armed only outside a call, where the plugin cannot ask.
        let left = self.limiter.remaining();
        Ok(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
    }
}
