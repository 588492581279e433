//! The guest-agent events an agent waits on ([`crate::libvirt_events`]) for its
//! driver's endpoint, when that endpoint is a libvirt URI the operator granted
//! to the driver: opened when first needed, opened again after its connection
//! died, and not retried for [`RETRY`] after a failure (waits then probe on a
//! timer, as for any other driver).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Mutex};

use crate::libvirt_events::{GuestAgentEvents, Seen};

/// How long after a failed open the next is tried.
const RETRY: Duration = Duration::from_secs(30);
/// Longest a wait lets an open take (a hung libvirtd, an ssh URI) before it
/// goes on without events; the open then counts as failed.
const OPEN_WAIT: Duration = Duration::from_secs(2);

/// Guest-agent events of one endpoint, or none for an endpoint without them.
pub struct ReadyEvents {
    uri: Option<String>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    events: Option<Arc<GuestAgentEvents>>,
    failed_at: Option<Instant>,
}

impl ReadyEvents {
    /// Events of libvirt URI `uri`; `None`: this endpoint has none.
    pub fn new(uri: Option<String>) -> ReadyEvents {
        ReadyEvents {
            uri,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether an events connection is open and alive now.
    pub async fn live(&self) -> bool {
        let s = self.state.lock().await;
        s.events.as_ref().is_some_and(|e| e.alive())
    }

    /// A waiter's view of the events behind this endpoint; `None` when there
    /// are none to wait on (waiters probe on a timer).
    pub async fn subscribe(&self) -> Option<Subscription> {
        let uri = self.uri.clone()?;
        let mut s = self.state.lock().await;
        if let Some(e) = &s.events {
            if e.alive() {
                return Some(Subscription::of(e.clone()));
            }
            tracing::info!(
                uri,
                "guest-agent events: the connection went away; opening it again"
            );
            let dead = s.events.take();
            // Deregistering talks to libvirt: not on the executor.
            tokio::task::spawn_blocking(move || drop(dead));
        }
        if s.failed_at.is_some_and(|t| t.elapsed() < RETRY) {
            return None;
        }
        let open = tokio::task::spawn_blocking(move || GuestAgentEvents::open(&uri));
        let Ok(opened) = tokio::time::timeout(OPEN_WAIT, open).await else {
            tracing::warn!(
                "guest-agent events: opening the connection took over {} s; \
                 guest readiness is probed on a timer",
                OPEN_WAIT.as_secs()
            );
            s.failed_at = Some(Instant::now());
            return None;
        };
        match opened {
            Ok(Ok(e)) => {
                let e = Arc::new(e);
                s.events = Some(e.clone());
                s.failed_at = None;
                Some(Subscription::of(e))
            }
            Ok(Err(e)) => {
                tracing::warn!("{e}; guest readiness is probed on a timer");
                s.failed_at = Some(Instant::now());
                None
            }
            Err(e) => {
                tracing::warn!("guest-agent events: {e}");
                s.failed_at = Some(Instant::now());
                None
            }
        }
    }
}

/// One waiter's view of an endpoint's guest-agent events.
pub struct Subscription {
    events: Arc<GuestAgentEvents>,
    rx: watch::Receiver<u64>,
}

impl Subscription {
    fn of(events: Arc<GuestAgentEvents>) -> Subscription {
        let rx = events.subscribe();
        Subscription { events, rx }
    }

    /// What is known of `vm`'s guest agent (note it before a probe).
    pub fn seen(&self, vm: &str) -> Seen {
        self.events.seen(vm)
    }

    /// Whether events can still come (a dead connection delivers none).
    pub fn alive(&self) -> bool {
        self.events.alive()
    }

    /// Waits until `vm`'s guest agent has connected more often than `seen`;
    /// `false` when no more events can come (the caller then uses its timer).
    /// Other domains' events wake it only to look at its own count.
    pub async fn connected_again(&mut self, vm: &str, seen: u64) -> bool {
        loop {
            if self.events.connects_of(vm) != seen {
                return true;
            }
            if self.rx.changed().await.is_err() {
                return false;
            }
        }
    }
}
