//! The in-guest agent of a VM, reached through the VM's own driver (`guest-channel`
//! import; the manifest must request `guest-channel`).

use crate::bindings::guest_world::gve::hypervisor::guest_channel as wit;

/// Sends one QEMU guest agent JSON command to `vm` behind `endpoint` and returns the reply.
pub fn agent_command(
    endpoint: &str,
    vm: &str,
    command: &str,
    timeout_ms: u32,
) -> crate::Result<String> {
    wit::agent_command(endpoint, vm, command, timeout_ms)
}
