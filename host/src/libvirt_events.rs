//! libvirt's guest-agent events, so that an agent waiting for a booting guest
//! hears the moment its guest agent connects instead of probing on a timer.
//!
//! QEMU reports when the guest opens its guest-agent channel (the virtio-serial
//! port qemu-ga listens on) and libvirt turns that into an `agent-lifecycle`
//! domain event. [`GuestAgentEvents`] holds one connection to a libvirt URI
//! (one the operator granted to the agent's driver) with a callback for those
//! events. It keeps each domain's agent state and connects (by UUID and by
//! name) and counts all connects in a `watch` channel: a waiter notes its
//! domain's count before it probes, wakes on each change of the total and
//! probes again only when its own domain's count moved, so a thousand guests
//! booting at once do not each probe on every other guest's event. Events are a hint only: a
//! waiter still probes, and still probes on a (slower) timer, so a lost event
//! or a dropped connection costs time, never correctness.
//!
//! libvirt delivers events from its default event loop, which this module runs
//! on one thread of its own, started the first time events are asked for.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};
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

/// Domains whose counts are kept at most; past it the counts start again
/// (a waiter then sees its domain's count move and probes once more).
const MAX_DOMAINS: usize = 65_536;

/// What is known of one domain's guest agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Times it connected since counting began.
    pub connects: u64,
    /// Its last reported state: connected, disconnected (libvirt reports that
    /// when a domain starts), or not heard of.
    pub connected: Option<bool>,
}

/// What the callback updates: each domain's agent by key, and connects in all.
struct Counts {
    by_domain: Mutex<HashMap<String, Seen>>,
    all: watch::Sender<u64>,
}

impl Counts {
    fn changed(&self, keys: &[String], connected: bool) {
        {
            let mut m = self.by_domain.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() + keys.len() > MAX_DOMAINS {
                m.clear();
            }
            for k in keys {
                let seen = m.entry(k.clone()).or_default();
                seen.connected = Some(connected);
                if connected {
                    seen.connects = seen.connects.wrapping_add(1);
                }
            }
        }
        if connected {
            self.all.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// A libvirt connection that counts guest agents connecting.
pub struct GuestAgentEvents {
    conn: Connect,
    callback: libc::c_int,
    counts: Arc<Counts>,
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
        let counts = Arc::new(Counts {
            by_domain: Mutex::new(HashMap::new()),
            all: watch::channel(0u64).0,
        });
        let opaque = Arc::into_raw(counts.clone()) as *mut c_void;
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
            // risk a double release (one empty map and a counter).
            let why = virt::error::Error::last_error().to_string();
            let _ = conn.close();
            return Err(fail(why));
        }
        Ok(GuestAgentEvents {
            conn,
            callback,
            counts,
        })
    }

    /// A receiver that changes each time a guest agent connects, on any domain.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.counts.all.subscribe()
    }

    /// What is known of the guest agent of the domain with this UUID or name.
    pub fn seen(&self, domain: &str) -> Seen {
        let m = self
            .counts
            .by_domain
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.get(domain).copied().unwrap_or_default()
    }

    /// How many times the guest agent of the domain with this UUID or name has
    /// connected since counting began.
    pub fn connects_of(&self, domain: &str) -> u64 {
        self.seen(domain).connects
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

/// The domain's UUID and name, as far as libvirt tells them.
///
/// # Safety
/// `dom` is a domain libvirt passed to a callback, valid for that call.
unsafe fn domain_keys(dom: virt_sys::virDomainPtr) -> Vec<String> {
    let mut keys = Vec::with_capacity(2);
    if dom.is_null() {
        return keys;
    }
    let mut uuid = [0 as libc::c_char; virt_sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: `uuid` has the room libvirt writes (VIR_UUID_STRING_BUFLEN, NUL
    // included); the name is owned by `dom`, NUL-terminated, valid for this call.
    unsafe {
        if virt_sys::virDomainGetUUIDString(dom, uuid.as_mut_ptr()) == 0 {
            keys.push(CStr::from_ptr(uuid.as_ptr()).to_string_lossy().into_owned());
        }
        let name = virt_sys::virDomainGetName(dom);
        if !name.is_null() {
            keys.push(CStr::from_ptr(name).to_string_lossy().into_owned());
        }
    }
    keys
}

unsafe extern "C" fn on_agent_lifecycle(
    _conn: virt_sys::virConnectPtr,
    dom: virt_sys::virDomainPtr,
    state: libc::c_int,
    _reason: libc::c_int,
    opaque: *mut c_void,
) {
    let connected = match state as libc::c_uint {
        virt_sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED => true,
        virt_sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED => false,
        _ => return,
    };
    // SAFETY: libvirt passes the domain the event is about for this call, and
    // `opaque` is the `Arc<Counts>` registered with this callback, alive until
    // `release` runs.
    let (keys, counts) = unsafe { (domain_keys(dom), &*(opaque as *const Counts)) };
    counts.changed(&keys, connected);
}

unsafe extern "C" fn release(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once, when the callback registered with this
    // `opaque` (made by `Arc::into_raw`) is deregistered.
    drop(unsafe { Arc::from_raw(opaque as *const Counts) });
}
