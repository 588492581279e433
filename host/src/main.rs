//! The `gve` binary.

use clap::Parser;

/// mimalloc, not glibc's malloc: per-thread heaps with no arena locks on the
/// hot path (a fifth of a busy site's CPU was glibc's malloc and free, waiting
/// on its arenas' locks), and freed pages go back to the system on their own
/// (`bench/results/million.md` compares the two).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's collection (v3, in the library the allocator links): frees
    /// the calling thread's empty pages and, with `force`, purges every free
    /// page of the process's arenas now instead of after its delay. Pages
    /// other threads still own are theirs to free.
    fn mi_collect(force: bool);
}

/// Gives mimalloc's free memory back to the system (`gve::heap::trim`): the
/// calling thread's empty pages, and every free page of the arenas (pages
/// other threads gave back). A thread that never allocated has no heap yet and
/// mi_collect would return at once, so this one allocates first.
fn release_mimalloc() {
    std::hint::black_box(Box::new(0u64));
    // SAFETY: mi_collect only returns memory mimalloc holds free; it takes no
    // pointer and touches no live allocation.
    unsafe { mi_collect(true) }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GVE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for people: logs sent to files and pipes stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    gve::libvirt_log::route_to_log();
    gve::api::server::raise_fd_limit();
    gve::heap::tune();
    gve::heap::set_release(release_mimalloc);
    // Services run for months: what a busy stretch freed goes back to the system.
    let _trimmer = gve::heap::spawn_trimmer(gve::heap::TRIM_EVERY);
    let cli = gve::cli::Cli::parse();
    std::process::exit(gve::cli::run(cli).await);
}
