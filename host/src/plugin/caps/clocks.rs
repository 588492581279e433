//! Plugins' timers (`wasi:clocks/monotonic-clock` `subscribe-duration`, which a
//! plugin's `std::thread::sleep` waits on). wasmtime-wasi waits every timer out
//! on tokio's, whose 1 ms ticks round each deadline up, so a 1 ms sleep took up
//! to 2. That cost every short back-off: guest-install polls a command's status
//! after 1, 2, 4 ms, and an exec of `true` sleeps about twice while raw
//! `nanosleep` does not (`bench/guest.rs`). Here a wait of at least
//! [`PRECISE_FROM`] spends its last [`LAST_STRETCH`] at most in `nanosleep` on a
//! blocking thread, the rest on tokio's timer as before.
//!
//! Policy: a plugin never waits less than it asked; waits shorter than
//! [`PRECISE_FROM`] stay on tokio's timer as before; a blocking thread is held
//! at most [`LAST_STRETCH`] per wait, and at most [`STRETCHES`] are slept out
//! at once in the whole process (a plugin polling thousands of timers gets the
//! rest on tokio's timer, not thousands of threads).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, Resource};
use wasmtime::StoreContextMut;
use wasmtime_wasi::p2::{DynPollable, Pollable};

use crate::plugin::state::HostState;

/// Waits at least this long get their last stretch on a blocking thread.
pub const PRECISE_FROM: Duration = Duration::from_micros(500);

/// How much of a wait a blocking thread sleeps out, at most.
pub const LAST_STRETCH: Duration = Duration::from_millis(2);

/// Last stretches slept out at once, at most, over every plugin.
pub const STRETCHES: usize = 4;

/// Last stretches being slept out now.
static SLEEPING: AtomicUsize = AtomicUsize::new(0);

/// A place among the [`STRETCHES`], given back when dropped.
struct Stretch;

impl Stretch {
    fn take() -> Option<Stretch> {
        SLEEPING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < STRETCHES).then_some(n + 1)
            })
            .ok()
            .map(|_| Stretch)
    }
}

impl Drop for Stretch {
    fn drop(&mut self) {
        SLEEPING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A plugin's timer: ready once `until` has passed.
pub struct Timer {
    until: Option<Instant>,
    /// Asked for no wait at all: yields once, as wasmtime-wasi's own does.
    zero: bool,
    precise: bool,
    yielded: bool,
    /// The blocking thread sleeping out the last stretch, once started: a new
    /// `ready()` (wasmtime makes one per poll) waits on it, never a second one.
    sleeper: Option<tokio::task::JoinHandle<()>>,
}

impl Timer {
    /// A timer that fires `after` from now (never, past the clock's range).
    pub fn after(after: Duration) -> Timer {
        Timer {
            until: Instant::now().checked_add(after),
            zero: after.is_zero(),
            precise: after >= PRECISE_FROM,
            yielded: false,
            sleeper: None,
        }
    }

    async fn wait(&mut self) {
        let Some(until) = self.until else {
            return std::future::pending().await;
        };
        if self.zero {
            // A plugin polling a zero timer in a loop cannot starve the executor.
            if !self.yielded {
                self.yielded = true;
                tokio::task::yield_now().await;
            }
            return;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if !self.precise {
            tokio::time::sleep_until(until.into()).await;
            return;
        }
        if self.sleeper.is_none() {
            if left > LAST_STRETCH {
                tokio::time::sleep(left - LAST_STRETCH).await;
            }
            let Some(place) = Stretch::take() else {
                tokio::time::sleep_until(until.into()).await;
                return;
            };
            // Left running when this future is dropped (another pollable ended
            // the poll): it sleeps out its stretch (at most LAST_STRETCH),
            // holding its place, and the next `ready()` waits on it.
            self.sleeper = Some(tokio::task::spawn_blocking(move || {
                let _place = place;
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    std::thread::sleep(left);
                }
            }));
        }
        if let Some(sleeper) = self.sleeper.as_mut() {
            // A blocking pool too busy to start it soon, or a runtime shutting
            // down, must make the wait neither late nor early: tokio's timer backs it.
            let backstop = tokio::time::sleep_until((until + Duration::from_millis(1)).into());
            tokio::select! {
                _ = sleeper => self.sleeper = None,
                _ = backstop => {}
            }
        }
        if until > Instant::now() {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

impl Pollable for Timer {
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(self.wait())
    }
}

/// Shadows wasmtime-wasi's `subscribe-duration` with [`Timer`] (the linker must
/// already hold WASI).
pub fn add_timers(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, HostState>,
         (nanos,): (u64,)|
         -> wasmtime::Result<(Resource<DynPollable>,)> {
            let table = store.data_mut().table();
            let timer = table.push(Timer::after(Duration::from_nanos(nanos)))?;
            Ok((wasmtime_wasi::p2::subscribe(table, timer)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `f` is ready on its first poll.
    fn ready_at_once(f: impl Future<Output = ()>) -> bool {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.as_mut().poll(&mut cx).is_ready()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timer_never_fires_early_and_a_due_one_at_once() {
        for after in [
            Duration::ZERO,
            Duration::from_micros(100),
            Duration::from_micros(700),
            Duration::from_millis(1),
            Duration::from_millis(5),
        ] {
            let t = Instant::now();
            Timer::after(after).ready().await;
            let took = t.elapsed();
            assert!(took >= after, "{after:?} fired after {took:?}");
        }
        // More timers at once than places: each still waits its whole time.
        let t = Instant::now();
        let many: Vec<_> = (0..64)
            .map(|_| tokio::spawn(async { Timer::after(Duration::from_millis(3)).ready().await }))
            .collect();
        for m in many {
            m.await.unwrap();
        }
        assert!(t.elapsed() >= Duration::from_millis(3));
        // Polled again and again, each `ready()` dropped before it ends (as a
        // plugin's `pollable.ready()` does), a timer starts one sleeper at most
        // and still ends no earlier than its time.
        let t = Instant::now();
        let mut again = Timer::after(Duration::from_millis(1));
        for _ in 0..50 {
            let _ = tokio::time::timeout(Duration::from_micros(50), again.ready()).await;
        }
        again.ready().await;
        assert!(t.elapsed() >= Duration::from_millis(1));
        // Due, a timer that asked for a wait is ready on its first poll; a zero
        // one yields once first.
        let mut due = Timer::after(Duration::from_micros(1));
        std::thread::sleep(Duration::from_millis(1));
        assert!(
            ready_at_once(due.ready()),
            "a due timer answers ready at once"
        );
        let mut zero = Timer::after(Duration::ZERO);
        assert!(!ready_at_once(zero.ready()), "a zero timer yields once");
        assert!(ready_at_once(zero.ready()));
        // Past the clock's range: never ready.
        let mut never = Timer::after(Duration::ZERO);
        never.until = None;
        let never = tokio::time::timeout(Duration::from_millis(20), never.ready()).await;
        assert!(never.is_err());
    }
}
