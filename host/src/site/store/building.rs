//! Index builds on open: a database from before an index (or written since by a
//! release from before it, [`super::drift`]) gets it built before the site
//! listens. At tens of millions of records that takes minutes, so a build says
//! what it reads before it starts, how far it got every ten seconds, and what it
//! indexed, in how long, when done.

use std::time::{Duration, Instant};

/// How often a long build logs how far it got.
const EVERY: Duration = Duration::from_secs(10);

/// How far an index build has read, logged every [`EVERY`].
pub(super) struct Progress<'a> {
    what: &'a str,
    records: u64,
    read: u64,
    every: Duration,
    last: Instant,
}

impl Progress<'_> {
    /// Counts one record read; every so often says how far the build is.
    pub(super) fn read_one(&mut self) {
        self.read += 1;
        // The clock only every 4,096 records: a build reads millions.
        if self.read.is_multiple_of(4096) && self.last.elapsed() >= self.every {
            self.last = Instant::now();
            tracing::info!(
                read = self.read,
                of = self.records,
                "indexing {}: {}% read",
                self.what,
                self.read.saturating_mul(100) / self.records.max(1)
            );
        }
    }
}

/// Builds the index `what` from `records` records with `build`, which calls
/// [`Progress::read_one`] for each record it reads and answers how many it
/// indexed; a database with nothing to read gets the index without a word.
pub(super) fn build_index<E>(
    what: &str,
    records: u64,
    build: impl FnOnce(&mut Progress) -> Result<u64, E>,
) -> Result<(), E> {
    build_logging_every(what, records, EVERY, build)
}

fn build_logging_every<E>(
    what: &str,
    records: u64,
    every: Duration,
    build: impl FnOnce(&mut Progress) -> Result<u64, E>,
) -> Result<(), E> {
    if records > 0 {
        tracing::info!(
            records,
            "indexing {what} (a database from before the index, or written by a release from before it): the site listens when done"
        );
    }
    let t = Instant::now();
    let mut progress = Progress {
        what,
        records,
        read: 0,
        every,
        last: t,
    };
    let n = build(&mut progress)?;
    if records > 0 {
        tracing::info!(
            indexed = n,
            secs = format!("{:.1}", t.elapsed().as_secs_f64()),
            "indexed {what}; written to the disk with the rest of the open, before the site listens"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Keeps what the log subscriber writes.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a build over `records` logs, its progress due every `every`.
    fn logged(records: u64, every: Duration) -> String {
        let kept = Kept::default();
        let writer = kept.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            build_logging_every("the things", records, every, |p| {
                for _ in 0..records {
                    p.read_one();
                }
                Ok::<_, ()>(records / 2)
            })
            .unwrap()
        });
        let text = kept.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn a_long_build_says_how_far_it_got_and_a_short_one_only_its_start_and_end() {
        let long = logged(3 * 4096, Duration::ZERO);
        assert!(long.contains("indexing the things (a database"), "{long}");
        for (read, pct) in [(4096, 33), (8192, 66), (12288, 100)] {
            assert!(
                long.contains(&format!(
                    "indexing the things: {pct}% read read={read} of=12288"
                )),
                "{long}"
            );
        }
        assert!(
            long.contains("indexed the things; written to the disk with the rest of the open, before the site listens indexed=6144"),
            "{long}"
        );
        let short = logged(3 * 4096, Duration::from_secs(3600));
        assert!(!short.contains("% read"), "{short}");
        assert!(short.contains("indexed the things"), "{short}");
        assert_eq!(
            logged(0, Duration::ZERO),
            "",
            "an empty database builds silently"
        );
    }
}
