//! The guest-agent events an agent waits on ([`crate::libvirt_events`]) for its
//! driver's endpoint, when that endpoint is a libvirt URI the operator granted
//! to the driver: opened when first needed, opened again after its connection
//! died, and not retried for [`RETRY`] after a failure (waits then probe on a
//! timer, as for any other driver).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Mutex};

use crate::libvirt_events::GuestAgentEvents;

/// How long after a failed open the next is tried.
const RETRY: Duration = Duration::from_secs(30);

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

    /// A receiver that changes when a guest agent connects behind this
    /// endpoint; `None` when there are no events to wait on (waiters probe on a
    /// timer).
    pub async fn subscribe(&self) -> Option<watch::Receiver<u64>> {
        let uri = self.uri.clone()?;
        let mut s = self.state.lock().await;
        if let Some(e) = &s.events {
            if e.alive() {
                return Some(e.subscribe());
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
        let opened = tokio::task::spawn_blocking(move || GuestAgentEvents::open(&uri)).await;
        match opened {
            Ok(Ok(e)) => {
                let rx = e.subscribe();
                s.events = Some(Arc::new(e));
                s.failed_at = None;
                Some(rx)
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
