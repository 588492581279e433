//! Bounded storage: finished jobs and job events are kept for
//! `job-retention-seconds` and finished jobs at most `max-finished-jobs` (those
//! that ended first go first, with their events), audit entries for `audit-retention-seconds`, then
//! removed in small transactions; and a disk low-water mark (`min-free-disk-mib`
//! free where the database lives) below which the site refuses new work with
//! `507 insufficient-storage` instead of failing commits of every user.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::StatusCode;

use super::model::now_ms;
use super::SiteCore;
use crate::api::ApiError;

/// How long a measurement of free space is trusted.
const DISK_FRESH: Duration = Duration::from_secs(1);

/// Free space where the site keeps its data, measured at most once a second.
pub struct DiskGuard {
    path: std::path::PathBuf,
    min_free_bytes: u64,
    last: Mutex<Option<(Instant, u64)>>,
}

impl DiskGuard {
    /// Guards `path`'s file system with a low-water mark of `min_free_mib`.
    pub fn new(path: &std::path::Path, min_free_mib: u64) -> DiskGuard {
        DiskGuard {
            path: path.to_path_buf(),
            min_free_bytes: min_free_mib.saturating_mul(1 << 20),
            last: Mutex::new(None),
        }
    }

    /// Bytes free for unprivileged users where the data lives.
    fn free_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("the data directory's path contains NUL"))?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized,
        // writable statvfs the call fills in.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }

    /// Refuses new work (`507`) while free space is under the low-water mark.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let free = match *last {
            Some((at, free)) if at.elapsed() < DISK_FRESH => free,
            _ => {
                let free = self.free_bytes().unwrap_or(u64::MAX);
                *last = Some((Instant::now(), free));
                free
            }
        };
        if free >= self.min_free_bytes {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient-storage",
            format!(
                "the site is low on disk ({} MiB free where it keeps its data, under its \
                 low-water mark of {} MiB): it takes no new work until an operator frees space",
                free >> 20,
                self.min_free_bytes >> 20
            ),
        )
        .retry_after(60))
    }
}

impl SiteCore {
    /// Removes finished jobs and job events older than the job retention, and
    /// audit entries older than the audit retention; returns how many jobs went.
    pub fn prune_finished(&self) -> usize {
        let before = |secs: u64| now_ms().saturating_sub(secs.saturating_mul(1000));
        let jobs_before = before(self.config.job_retention_seconds);
        let audit_before = before(self.config.audit_retention_seconds);
        let mut jobs = self.store.in_batches("finished jobs", |n| {
            self.store.write(|t| t.prune_jobs(jobs_before, n))
        });
        // Past the count, the jobs that ended first go whatever their age,
        // with their events.
        match self.store.finished_job_count() {
            Ok(n) => {
                let mut over = n.saturating_sub(self.config.max_finished_jobs);
                jobs += self
                    .store
                    .in_batches("finished jobs over max-finished-jobs", |n| {
                        let k = n.min(usize::try_from(over).unwrap_or(usize::MAX));
                        if k == 0 {
                            return Ok(0);
                        }
                        let gone = self.store.write(|t| t.prune_oldest_jobs(k))?;
                        over = over.saturating_sub(gone as u64);
                        Ok::<usize, super::store::StoreError>(gone)
                    });
            }
            Err(e) => tracing::error!("counting the finished jobs: {e}"),
        }
        self.store.in_batches("job events", |n| {
            self.store.write(|t| t.trim_events(jobs_before, n))
        });
        // Beyond the cap too: one lowered on a quiet site is met here, not only
        // as new events arrive.
        self.store
            .in_batches("job events over max-job-events", |n| {
                self.store.write(|t| t.trim_events_over_max(n))
            });
        self.store.in_batches("audit entries", |n| {
            self.store.write(|t| t.trim_audit(audit_before, n))
        });
        jobs
    }
}
