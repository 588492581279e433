//! Per-instance resource limits: the memory cap (a `ResourceLimiter` that remembers
//! what it refused, so the error can say so) and the deadline of the current entry.
//!
//! Every entry into a plugin (instantiation, a call, a resource destructor) arms a
//! deadline first. Code that runs with no deadline armed is stopped at the next epoch
//! tick, so an entry the host forgot to arm cannot spin for ever.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most table elements an instance may have.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// What a wait on the host's side for a plugin (a libvirt call, an HTTP response)
/// leaves of the call for the plugin to act on its outcome: such a wait ends that
/// long before the call's deadline, at the latest.
pub const HOST_WAIT_KEEP: Duration = Duration::from_millis(200);

/// The deadline of an instance's current entry, shared with the capabilities that
/// wait for the plugin on the host's side (HTTP bodies are read outside any one
/// host call), so that none of their waits outlives the entry. Its
/// [`backstop`](EntryDeadline::backstop) follows every change.
#[derive(Debug, Clone)]
pub struct EntryDeadline(Arc<tokio::sync::watch::Sender<Option<Instant>>>);

impl Default for EntryDeadline {
    fn default() -> Self {
        EntryDeadline(Arc::new(tokio::sync::watch::Sender::new(None)))
    }
}

/// A wait the backstop cut: the entry's deadline passed by the grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overran;

impl EntryDeadline {
    /// The deadline, if an entry is running.
    pub fn get(&self) -> Option<Instant> {
        *self.0.borrow()
    }

    fn set(&self, d: Option<Instant>) {
        self.0.send_replace(d);
    }

    /// When a host-side wait begun now must end: [`HOST_WAIT_KEEP`] before the
    /// deadline (now, when less is left); `None` outside an entry.
    pub fn wait_until(&self) -> Option<Instant> {
        let d = self.get()?;
        let now = Instant::now();
        Some(d.checked_sub(HOST_WAIT_KEEP).unwrap_or(now).max(now))
    }

    /// Waits for `call` until the entry's deadline is passed by `grace`, the
    /// deadline followed as it moves (on, while a long host call runs, and back
    /// when it ends); `Overran` then. The backstop of host-side awaits that no
    /// capability bounds itself.
    pub async fn backstop<F: std::future::Future>(
        &self,
        grace: Duration,
        call: F,
    ) -> Result<F::Output, Overran> {
        let mut call = std::pin::pin!(call);
        let mut moved = self.0.subscribe();
        loop {
            let until = moved.borrow_and_update().unwrap_or_else(Instant::now) + grace;
            tokio::select! {
                biased;
                v = call.as_mut() => return Ok(v),
                _ = moved.changed() => {}
                _ = tokio::time::sleep_until(until.into()) => return Err(Overran),
            }
        }
    }
}

/// A host call long by nature under way ([`Limiter::begin_long`]).
#[derive(Debug)]
#[must_use = "a long wait's time must be given back with Limiter::end_long"]
pub struct LongWait {
    began: Instant,
    /// The entry's deadline before the call.
    deadline: Instant,
    /// The long-call budget it may use.
    long: Duration,
    /// The longest it may be waited for: that, and what was left of the entry
    /// less [`HOST_WAIT_KEEP`].
    limit: Duration,
}

impl LongWait {
    /// The longest the call may be waited for.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

/// Why a call was stopped by the sandbox rather than failing on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It ran past its deadline.
    Deadline,
    /// It asked for more memory than its cap (bytes asked).
    Memory(u64),
    /// It tried to hold more of a host resource than its budget.
    Budget {
        /// What it ran out of (`open files`, ...).
        what: &'static str,
        /// The budget.
        limit: u64,
    },
}

/// The limiter and deadline kept in each store.
#[derive(Debug)]
pub struct Limiter {
    memory_cap: usize,
    memory_bytes: usize,
    /// When the current call must end, if a call is running.
    deadline: EntryDeadline,
    /// When the current call began.
    armed_at: Option<Instant>,
    /// What is left of the current call's budget for long host calls
    /// (`long-call-timeout-ms`).
    long_left: Duration,
    /// Set when the sandbox stopped the current call.
    pub stopped: Option<Stopped>,
}

impl Limiter {
    /// A limiter with a memory cap in bytes.
    pub fn new(memory_cap: usize) -> Limiter {
        Limiter {
            memory_cap,
            memory_bytes: 0,
            deadline: EntryDeadline::default(),
            armed_at: None,
            long_left: Duration::ZERO,
            stopped: None,
        }
    }

    /// Linear memory the instance holds, bytes (all its memories together).
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// The memory cap in bytes.
    pub fn memory_cap(&self) -> usize {
        self.memory_cap
    }

    /// Arms the deadline of one entry `budget` from now, with `long` for host calls
    /// long by nature ([`Limiter::begin_long`]).
    pub fn arm(&mut self, budget: Duration, long: Duration) {
        let now = Instant::now();
        self.deadline.set(Some(now + budget));
        self.armed_at = Some(now);
        self.long_left = long;
        self.stopped = None;
    }

    /// Begins a host call long by nature (a migration, a full disk copy: libvirt's
    /// own work, not the plugin's). It may be waited for up to what is left of
    /// the entry's long-call budget, and so long a wait is not charged to the
    /// entry: the deadline moves on by it ([`Limiter::end_long`]), so the plugin
    /// keeps the time it had to act on the answer; beyond that, up to what is left
    /// of the entry less [`HOST_WAIT_KEEP`], as any host call. `None` when no long
    /// budget is left, or not even [`HOST_WAIT_KEEP`] of the entry: the call is
    /// then waited for like any other.
    pub fn begin_long(&mut self) -> Option<LongWait> {
        let deadline = self.deadline.get()?;
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if self.long_left.is_zero() || left <= HOST_WAIT_KEEP {
            return None;
        }
        let long = self.long_left;
        self.deadline.set(Some(deadline.checked_add(long)?));
        Some(LongWait {
            began: now,
            deadline,
            long,
            limit: long + (left - HOST_WAIT_KEEP),
        })
    }

    /// Ends a long host call: the entry's deadline is the one before it moved on
    /// by the time it took, as far as the long-call budget covered it, and that
    /// budget is that much less.
    pub fn end_long(&mut self, wait: LongWait) {
        let covered = wait.began.elapsed().min(wait.long);
        self.long_left = self.long_left.saturating_sub(covered);
        self.deadline.set(Some(wait.deadline + covered));
    }

    /// What is left of the current entry's long-call budget (zero outside an entry,
    /// and in entries armed without one).
    pub fn long_left(&self) -> Duration {
        self.long_left
    }

    /// The current entry's deadline, shared (it follows every arm and disarm).
    pub fn entry_deadline(&self) -> EntryDeadline {
        self.deadline.clone()
    }

    /// How long a host-side wait begun now may last: what is left of the entry
    /// less [`HOST_WAIT_KEEP`] (zero outside an entry).
    pub fn host_wait(&self) -> Duration {
        self.deadline
            .wait_until()
            .map(|u| u.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// The time left before the current entry's deadline: zero once it passed, and
    /// outside an entry (no deadline armed).
    pub fn remaining(&self) -> Duration {
        self.deadline
            .get()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Disarms the deadline; returns how long the entry ran.
    pub fn disarm(&mut self) -> Duration {
        self.deadline.set(None);
        self.long_left = Duration::ZERO;
        self.armed_at
            .take()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Called by the epoch callback: must the running code stop? It must when its
    /// deadline passed, and when no deadline is armed at all.
    pub fn deadline_passed(&mut self) -> bool {
        match self.deadline.get() {
            Some(d) if Instant::now() < d => false,
            _ => {
                self.stopped = Some(Stopped::Deadline);
                true
            }
        }
    }

    /// Records that the plugin ran out of a host-resource budget and returns the
    /// error that stops its call.
    pub fn over_budget(&mut self, what: &'static str, limit: u64) -> wasmtime::Error {
        self.stopped = Some(Stopped::Budget { what, limit });
        wasmtime::format_err!("budget of {limit} {what} exceeded")
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.stopped = Some(Stopped::Memory(desired as u64));
            return Err(wasmtime::format_err!(
                "memory cap of {} bytes exceeded: asked for {desired}",
                self.memory_cap
            ));
        }
        self.memory_bytes = self
            .memory_bytes
            .saturating_add(desired.saturating_sub(current));
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        // A component instance is several core instances (module, WASI adapter, shims).
        16
    }

    fn tables(&self) -> usize {
        16
    }

    fn memories(&self) -> usize {
        4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host-side wait shares the entry's deadline: it ends `HOST_WAIT_KEEP`
    /// before it, at once when less is left, and has no bound outside an entry.
    #[test]
    fn host_waits_follow_the_entry_deadline() {
        let mut l = Limiter::new(1 << 20);
        let shared = l.entry_deadline();
        assert_eq!(shared.wait_until(), None);
        assert_eq!(l.host_wait(), Duration::ZERO);
        l.arm(Duration::from_secs(10), Duration::ZERO);
        let until = shared.wait_until().expect("armed");
        let left = until.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_millis(9_700) && left <= Duration::from_millis(9_800));
        assert!(l.host_wait() <= Duration::from_millis(9_800));
        l.arm(Duration::from_millis(100), Duration::ZERO);
        let until = shared.wait_until().expect("armed");
        assert!(until <= Instant::now());
        assert_eq!(l.host_wait(), Duration::ZERO);
        l.disarm();
        assert_eq!(shared.wait_until(), None);
    }

    /// A long host call moves the deadline on by the long budget while it waits,
    /// then back to the old deadline plus what it took (as far as the long
    /// budget covers it); the long budget shrinks by that. With none left, or no
    /// time left in the entry, nothing is long.
    #[test]
    fn a_long_wait_is_not_charged_to_the_entry() {
        let mut l = Limiter::new(1 << 20);
        let shared = l.entry_deadline();
        assert!(l.begin_long().is_none(), "outside an entry");
        l.arm(Duration::from_secs(10), Duration::from_secs(60));
        let before = shared.get().unwrap();
        let wait = l.begin_long().expect("long budget left");
        let limit = wait.limit();
        assert!(
            limit > Duration::from_millis(69_000) && limit <= Duration::from_millis(69_800),
            "the long budget and what is left of the entry, less what the plugin keeps: {limit:?}"
        );
        assert_eq!(shared.get(), Some(before + Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(50));
        l.end_long(wait);
        let after = shared.get().unwrap();
        let moved = after - before;
        assert!(
            moved >= Duration::from_millis(50) && moved < Duration::from_secs(1),
            "{moved:?}"
        );
        let wait = l.begin_long().expect("long budget left");
        assert!(wait.limit() < Duration::from_secs(70) - moved);
        l.end_long(wait);
        // A long budget almost used up: the call may still be waited for within
        // the entry's time, as any other, but the deadline moves on only by the
        // long budget.
        l.arm(Duration::from_secs(10), Duration::from_millis(5));
        let before = shared.get().unwrap();
        let wait = l.begin_long().unwrap();
        assert!(wait.limit() > Duration::from_millis(9_000), "{wait:?}");
        std::thread::sleep(Duration::from_millis(50));
        l.end_long(wait);
        assert_eq!(shared.get(), Some(before + Duration::from_millis(5)));
        assert!(l.begin_long().is_none(), "the long budget is used up");
        assert!(l.disarm() >= Duration::from_millis(50));
        l.arm(Duration::from_secs(10), Duration::ZERO);
        assert!(l.begin_long().is_none(), "no long budget");
        l.arm(HOST_WAIT_KEEP, Duration::from_secs(60));
        assert!(l.begin_long().is_none(), "no time to act on the answer");
    }

    /// The backstop follows the deadline as it moves: a wait past the first
    /// deadline ends well once the deadline moved on, and is cut otherwise.
    #[tokio::test]
    async fn the_backstop_follows_a_moved_deadline() {
        let grace = Duration::from_secs(1);
        let slow = || tokio::time::sleep(Duration::from_secs(3));
        let mut l = Limiter::new(1 << 20);
        l.arm(Duration::from_millis(300), Duration::from_secs(10));
        let shared = l.entry_deadline();
        assert_eq!(shared.backstop(grace, slow()).await, Err(Overran));
        l.arm(Duration::from_millis(300), Duration::from_secs(10));
        let wait = l.begin_long().unwrap();
        assert!(shared.backstop(grace, slow()).await.is_ok());
        l.end_long(wait);
        // Moved on, then back while it waits: cut at the deadline it came back to
        // (0.4 s, and the grace), not the one it had moved on to (10.3 s).
        l.arm(Duration::from_millis(300), Duration::from_secs(10));
        let wait = l.begin_long().unwrap();
        let t = Instant::now();
        let (cut, ()) = tokio::join!(shared.backstop(grace, slow()), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            l.end_long(wait);
        });
        assert_eq!(cut, Err(Overran));
        assert!(
            t.elapsed() < Duration::from_millis(2_500),
            "{:?}",
            t.elapsed()
        );
    }
}
