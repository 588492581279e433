//! libvirt's guest-agent events, so that an agent waiting for a booting guest
//! hears the moment its guest agent connects instead of probing on a timer.
//!
//! QEMU reports when the guest opens its guest-agent channel (the virtio-serial
//! port qemu-ga listens on) and libvirt turns that into an `agent-lifecycle`
//! domain event. [`GuestAgentEvents`] holds one connection to a libvirt URI
//! (one the operator granted to the agent's driver) with a callback for those
//! events, and counts every "connected" in a `watch` channel: a waiter
//! subscribes before it probes and wakes on the next change. Events are a hint
//! only: a waiter still probes, and still probes on a (slower) timer, so a lost
//! event or a dropped connection costs time, never correctness.
//!
//! libvirt delivers events from its default event loop, which this module runs
//! on one thread of its own, started the first time events are asked for.

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use virt::connect::Connect;

/// Why events could not be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("libvirt events on {uri}: {why}")]
pub struct EventsError {
    /// The URI.
    pub uri: String,
    /// What failed.
    pub why: String,
}

/// Starts libvirt's default event loop on a thread of its own (once per process).
fn event_loop() -> Result<(), String> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        crate::libvirt_log::route_to_log();
        virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::warn!("libvirt event loop: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map(|_| ())
            .map_err(|e| format!("cannot start the event thread: {e}"))
    })
    .clone()
}

/// A libvirt connection that counts guest agents connecting, on any domain.
pub struct GuestAgentEvents {
    conn: Connect,
    callback: libc::c_int,
    connected: Arc<watch::Sender<u64>>,
}

impl GuestAgentEvents {
    /// Opens `uri` and registers for its domains' guest-agent events. Blocks
    /// (a libvirt connection): call it off the async executor.
    pub fn open(uri: &str) -> Result<GuestAgentEvents, EventsError> {
        let fail = |why: String| EventsError {
            uri: uri.to_string(),
            why,
        };
        event_loop().map_err(fail)?;
        let mut conn = Connect::open(Some(uri)).map_err(|e| fail(e.to_string()))?;
        // Keepalive (needs the event loop) notices a daemon that went away.
        if let Err(e) = conn.set_keep_alive(5, 3) {
            tracing::debug!(uri, "libvirt keepalive: {e}");
        }
        let connected = Arc::new(watch::channel(0u64).0);
        let opaque = Arc::into_raw(connected.clone()) as *mut c_void;
        let cb: virt_sys::virConnectDomainEventAgentLifecycleCallback = Some(on_agent_lifecycle);
        // SAFETY: libvirt calls back with the signature of the event id registered
        // (agent lifecycle); the generic type is how its C API takes every
        // callback. `opaque` is an `Arc` handed to libvirt, released by
        // `release` when the callback is deregistered.
        let callback = unsafe {
            virt_sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                virt_sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE as libc::c_int,
                std::mem::transmute::<
                    virt_sys::virConnectDomainEventAgentLifecycleCallback,
                    virt_sys::virConnectDomainEventGenericCallback,
                >(cb),
                opaque,
                Some(release),
            )
        };
        if callback < 0 {
            // On failure libvirt does not keep `opaque`; it is leaked rather than
            // risk a double release (one Arc of a u64 counter).
            let why = virt::error::Error::last_error().to_string();
            let _ = conn.close();
            return Err(fail(why));
        }
        Ok(GuestAgentEvents {
            conn,
            callback,
            connected,
        })
    }

    /// A receiver that changes each time a guest agent connects.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.connected.subscribe()
    }

    /// Whether the connection still stands (a dead one delivers nothing).
    pub fn alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }
}

impl Drop for GuestAgentEvents {
    fn drop(&mut self) {
        // SAFETY: `callback` was returned by a successful registration on this
        // connection; deregistering releases `opaque` through `release`.
        unsafe {
            virt_sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.callback);
        }
        let _ = self.conn.close();
    }
}

unsafe extern "C" fn on_agent_lifecycle(
    _conn: virt_sys::virConnectPtr,
    _dom: virt_sys::virDomainPtr,
    state: libc::c_int,
    _reason: libc::c_int,
    opaque: *mut c_void,
) {
    if state != virt_sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED as libc::c_int {
        return;
    }
    // SAFETY: `opaque` is the `Arc<watch::Sender<u64>>` registered with this
    // callback, alive until `release` runs.
    let connected = unsafe { &*(opaque as *const watch::Sender<u64>) };
    connected.send_modify(|n| *n = n.wrapping_add(1));
}

unsafe extern "C" fn release(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once, when the callback registered with this
    // `opaque` (made by `Arc::into_raw`) is deregistered.
    drop(unsafe { Arc::from_raw(opaque as *const watch::Sender<u64>) });
}
