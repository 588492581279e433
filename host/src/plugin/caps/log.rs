//! Log capability: a plugin's log lines go to the host's tracing output, tagged with
//! the plugin's name. Always granted; a line is capped at 8 KiB, and one call may
//! write at most `log-kib-per-call` (64 KiB by default): later lines of that call are
//! dropped and counted, and the count is logged when the call ends.

use crate::plugin::bindings::gve::hypervisor::log::{Host, Level};
use crate::plugin::state::HostState;

/// Longest log line kept, in bytes.
const MAX_LINE: usize = 8 * 1024;

/// Log bytes written in the current call, against the per-call budget.
#[derive(Debug)]
pub struct LogBudget {
    per_call: u64,
    written: u64,
    dropped: u64,
}

impl LogBudget {
    /// A budget of `per_call` bytes per call.
    pub fn new(per_call: u64) -> LogBudget {
        LogBudget {
            per_call,
            written: 0,
            dropped: 0,
        }
    }

    /// Starts counting a new call.
    pub fn start_call(&mut self) {
        self.written = 0;
        self.dropped = 0;
    }

    /// Ends the call; returns how many lines were dropped.
    pub fn end_call(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Whether a line of `len` bytes may be written (and counts it either way).
    pub fn admit(&mut self, len: usize) -> bool {
        let after = self.written.saturating_add(len as u64);
        if after > self.per_call {
            self.dropped += 1;
            false
        } else {
            self.written = after;
            true
        }
    }
}

impl Host for HostState {
    async fn log(&mut self, level: Level, mut message: String) -> wasmtime::Result<()> {
        if message.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        if !self.log.admit(message.len()) {
            return Ok(());
        }
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }
}
