//! Log capability: a plugin's log lines go to the host's tracing output, tagged with
//! the plugin's name. Always granted; a line is capped at 8 KiB.

use crate::plugin::bindings::gve::hypervisor::log::{Host, Level};
use crate::plugin::state::HostState;

/// Longest log line kept, in bytes.
const MAX_LINE: usize = 8 * 1024;

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
