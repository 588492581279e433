//! The books of the site's staging directory: how many bytes each user's copies
//! hold there (inputs waiting for their job, outputs waiting to be fetched) and in
//! all, against a per-user quota and a site-wide cap. Bytes are counted as they
//! arrive, so a transfer is cut the moment it would pass either; files are counted
//! again from the directory when the site starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hyper::StatusCode;

use crate::api::ApiError;

/// How long a client is told to wait when the site-wide cap is reached, seconds.
const FULL_RETRY_S: u64 = 60;

/// Which staging limit a transfer would pass.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StagingFull {
    /// The user's own quota.
    #[error(
        "staging quota of user '{user}' exceeded: their copies hold {used} bytes at the site \
         and this one would pass the quota of {limit} bytes (a copy-out's file is kept a day \
         after its job, a copy-in's until its job ran)"
    )]
    User {
        /// Whose.
        user: String,
        /// Bytes they hold now.
        used: u64,
        /// Their quota, bytes.
        limit: u64,
    },
    /// The site's cap on all staged bytes.
    #[error(
        "the site's staging area is full ({used} of {limit} bytes held by copies in flight): \
         try again later"
    )]
    Site {
        /// Bytes held by all users.
        used: u64,
        /// The cap, bytes.
        limit: u64,
    },
}

impl StagingFull {
    /// As an answer: `403 denied` for the user's quota, `507` with `Retry-After`
    /// for the site's cap.
    pub fn to_api(&self) -> ApiError {
        match self {
            StagingFull::User { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "denied", self.to_string())
            }
            StagingFull::Site { .. } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient-storage",
                self.to_string(),
            )
            .retry_after(FULL_RETRY_S),
        }
    }
}

#[derive(Default)]
struct Books {
    by_user: HashMap<String, u64>,
    total: u64,
    by_file: HashMap<PathBuf, (String, u64)>,
}

/// Staged bytes per user and in all.
pub struct Staging {
    per_user: u64,
    total: u64,
    books: Mutex<Books>,
}

impl Staging {
    /// Books with limits of `per_user_mib` per user and `total_mib` in all.
    pub fn new(per_user_mib: u64, total_mib: u64) -> Staging {
        Staging {
            per_user: per_user_mib.saturating_mul(1 << 20),
            total: total_mib.saturating_mul(1 << 20),
            books: Mutex::new(Books::default()),
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the files already in `dir`, each for the user `owner_of` names from
    /// its job id (the file name up to its first dot); files of unknown jobs count
    /// toward the site's total only.
    pub fn recount(&self, dir: &Path, owner_of: impl Fn(&str) -> Option<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            let job = name.split('.').next().unwrap_or_default();
            let owner = owner_of(job).unwrap_or_default();
            let mut b = self.books();
            let b = &mut *b;
            *b.by_user.entry(owner.clone()).or_default() += meta.len();
            b.total = b.total.saturating_add(meta.len());
            b.by_file.insert(e.path(), (owner, meta.len()));
        }
    }

    /// Would `n` more bytes for `user` fit?
    pub fn fits(&self, user: &str, n: u64) -> Result<(), StagingFull> {
        let b = self.books();
        self.check(&b, user, n)
    }

    fn check(&self, b: &Books, user: &str, n: u64) -> Result<(), StagingFull> {
        let used = b.by_user.get(user).copied().unwrap_or(0);
        if used.checked_add(n).is_none_or(|w| w > self.per_user) {
            return Err(StagingFull::User {
                user: user.to_string(),
                used,
                limit: self.per_user,
            });
        }
        if b.total.checked_add(n).is_none_or(|w| w > self.total) {
            return Err(StagingFull::Site {
                used: b.total,
                limit: self.total,
            });
        }
        Ok(())
    }

    /// Counts `n` more bytes of `user`'s staged `file`, or refuses them (nothing
    /// counted) when either limit would be passed.
    pub fn take(&self, user: &str, file: &Path, n: u64) -> Result<(), StagingFull> {
        let mut b = self.books();
        self.check(&b, user, n)?;
        let b = &mut *b;
        *b.by_user.entry(user.to_string()).or_default() += n;
        b.total += n;
        b.by_file
            .entry(file.to_path_buf())
            .or_insert_with(|| (user.to_string(), 0))
            .1 += n;
        Ok(())
    }

    /// Gives back what `file` held (it was removed).
    pub fn give_back(&self, file: &Path) {
        let mut b = self.books();
        let b = &mut *b;
        if let Some((user, n)) = b.by_file.remove(file) {
            if let Some(u) = b.by_user.get_mut(&user) {
                *u = u.saturating_sub(n);
                if *u == 0 {
                    b.by_user.remove(&user);
                }
            }
            b.total = b.total.saturating_sub(n);
        }
    }

    /// Removes a staged file and gives back what it held.
    pub async fn remove(&self, file: &Path) {
        let _ = tokio::fs::remove_file(file).await;
        self.give_back(file);
    }

    /// Bytes `user` holds in staging.
    pub fn used(&self, user: &str) -> u64 {
        self.books().by_user.get(user).copied().unwrap_or(0)
    }

    /// Bytes held in all.
    pub fn total(&self) -> u64 {
        self.books().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_cut_at_their_quota_and_everyone_at_the_cap() {
        let s = Staging::new(2, 3);
        let (a, b, c) = (Path::new("/s/a"), Path::new("/s/b"), Path::new("/s/c"));
        s.take("alice", a, 2 << 20).unwrap();
        assert!(matches!(
            s.take("alice", b, 1),
            Err(StagingFull::User { used, .. }) if used == 2 << 20
        ));
        s.take("bob", b, 1 << 20).unwrap();
        assert!(matches!(
            s.take("carol", c, 1),
            Err(StagingFull::Site { .. })
        ));
        // Refused bytes are not counted; given-back ones free room for others.
        assert_eq!(
            (s.used("alice"), s.used("carol"), s.total()),
            (2 << 20, 0, 3 << 20)
        );
        s.give_back(a);
        s.take("carol", c, 2 << 20).unwrap();
        assert_eq!((s.used("alice"), s.total()), (0, 3 << 20));
        s.give_back(a); // twice: nothing more given back
        assert_eq!(s.total(), 3 << 20);
    }

    #[test]
    fn limits_at_u64_max_neither_wrap_nor_refuse() {
        let s = Staging::new(u64::MAX, u64::MAX);
        let f = Path::new("/s/f");
        s.take("alice", f, u64::MAX / 2).unwrap();
        assert!(s.fits("alice", u64::MAX).is_err());
        s.give_back(f);
        assert_eq!(s.total(), 0);
    }

    #[test]
    fn files_found_at_start_are_counted_for_their_job_owner() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("job-1.in"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("job-2.out"), vec![0u8; 500]).unwrap();
        let s = Staging::new(1, 1);
        s.recount(dir.path(), |j| (j == "job-1").then(|| "alice".to_string()));
        assert_eq!((s.used("alice"), s.total()), (1000, 1500));
    }
}
