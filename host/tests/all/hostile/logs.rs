//! Logs: a plugin's log lines are capped in size and in bytes per call.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use gve::plugin::Grants;

use super::{bench, hostile};

/// Counts the bytes the log subscriber writes.
#[derive(Clone)]
struct Counter(Arc<AtomicUsize>);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len(), Ordering::SeqCst);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One call once wrote 164 MiB of agent log.
#[tokio::test]
async fn a_log_flood_is_cut_at_the_per_call_budget() {
    let b = bench(hostile(Grants::default())).await;
    let written = Arc::new(AtomicUsize::new(0));
    let counter = Counter(written.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || counter.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    // The test runs on a current-thread runtime: the plugin's calls log on this thread.
    let guard = tracing::subscriber::set_default(subscriber);
    let vm = b.hostile.get_vm("log:20000").await.unwrap();
    drop(guard);
    assert_eq!(vm.name, "logged");
    let bytes = written.load(Ordering::SeqCst);
    assert!(
        bytes > 32 << 10,
        "only {bytes} bytes logged: the budget is 64 KiB"
    );
    assert!(bytes < 96 << 10, "{bytes} bytes logged for a 64 KiB budget");
    b.aftermath().await;
}
