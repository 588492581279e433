//! Guest-channel capability: a guest plugin (guest-install) reaches a VM's in-guest
//! agent through the VM's own driver. The host supplies a [`GuestChannel`] router
//! (the agent maps an endpoint to its driver session); plugins without the grant get
//! `denied` before anything is routed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::plugin::bindings::gve::hypervisor::guest_channel::Host;
use crate::plugin::bindings::types::Error;
use crate::plugin::error::DriverError;
use crate::plugin::state::HostState;

/// Routes in-guest agent commands to the driver that owns the VM.
pub trait GuestChannel: Send + Sync + 'static {
    /// Sends one qemu-ga JSON command to `vm` behind `endpoint`; returns the JSON reply.
    fn agent_command(
        &self,
        endpoint: String,
        vm: String,
        command: String,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<String, DriverError>> + Send + 'static>>;
}

/// What one plugin is lent: a router, or nothing.
#[derive(Clone)]
pub struct GuestChannelCap {
    plugin: Arc<str>,
    router: Option<Arc<dyn GuestChannel>>,
}

impl GuestChannelCap {
    /// The capability of `plugin`; `None` when not granted.
    pub fn new(plugin: Arc<str>, router: Option<Arc<dyn GuestChannel>>) -> GuestChannelCap {
        GuestChannelCap { plugin, router }
    }
}

impl Host for HostState {
    async fn agent_command(
        &mut self,
        endpoint: String,
        vm: String,
        command: String,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<String, Error>> {
        let Some(router) = self.guest_channel.router.clone() else {
            return Ok(Err(Error::Denied(format!(
                "the guest channel is not granted to plugin '{}'",
                self.guest_channel.plugin
            ))));
        };
        // A host-side wait: at most what is left of the call, less what the plugin
        // needs to act on the answer.
        let timeout =
            Duration::from_millis(u64::from(timeout_ms.max(1))).min(self.limiter.host_wait());
        if timeout.is_zero() {
            return Ok(Err(Error::Timeout(
                "guest agent command not sent: the plugin's call has no time left for it".into(),
            )));
        }
        Ok(router
            .agent_command(endpoint, vm, command, timeout)
            .await
            .map_err(Error::from))
    }
}
