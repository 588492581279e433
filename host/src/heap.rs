//! The process heap: giving freed memory back to the system. glibc's allocator
//! keeps what is freed for reuse, in one arena per thread that allocated it, so
//! a busy stretch (a listing of 100,000 VMs read, a backlog of jobs worked off)
//! would otherwise stay in the resident set: the million bench saw a site
//! holding 800 MiB of which 300 were in use. The `gve` binary allocates with
//! mimalloc (src/main.rs), which purges freed pages on its own schedule and is
//! told to purge them now by [`trim`] ([`set_release`]); glibc's heap then
//! serves the C libraries (libvirt) and whatever links the library without it.

use std::time::Duration;

/// Allocations at least this large get their own mapping, returned when freed
/// (glibc otherwise raises its threshold up to 32 MiB after such frees, and
/// large buffers then stay in the arenas).
const OWN_MAPPING_FROM: usize = 1 << 20;

/// How often a running service hands its free heap back.
pub const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Sets the allocator up for a long-running service; once, at process start.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) only changes allocator parameters; an out-of-range
    // value is refused by returning 0, which leaves the defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM as libc::c_int);
    }
}

/// How the program's global allocator gives its free memory back, when it is
/// not glibc's (set once by the binary, [`set_release`]).
static RELEASE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets how the global allocator gives free memory back to the system; the
/// `gve` binary's mimalloc keeps pages freed by threads that then sit idle, and
/// purges them only on its own schedule (a site held 731 MiB after ten idle
/// minutes of full listings, `bench/results/million.md` run 7). Once; later
/// calls are ignored.
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Returns the heap's free memory to the system where the allocator keeps it:
/// glibc's heap (the C libraries' allocations), and the global allocator's
/// through [`set_release`].
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) only releases memory the allocator holds free; it
    // touches no allocation of the program.
    unsafe {
        libc::malloc_trim(0);
    }
    if let Some(release) = RELEASE.get() {
        release();
    }
}

/// Trims the heap every `every`, off the async workers (a trim of a large heap
/// takes a while), for as long as the runtime runs.
pub fn spawn_trimmer(every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    })
}
