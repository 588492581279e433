//! A VM's file system: files with content and mode, and directories (explicit ones
//! plus every ancestor of a file).

use std::collections::{BTreeMap, BTreeSet};

use gve_sdk::prelude::*;
use sha2::{Digest, Sha256};

/// One regular file.
#[derive(Clone)]
pub struct File {
    /// Content.
    pub data: Vec<u8>,
    /// Unix permission bits.
    pub mode: u32,
    /// Lower-case hex SHA-256 of `data`.
    pub sha256: String,
}

impl File {
    /// What `stat` reports about the file.
    pub fn info(&self) -> FileInfo {
        FileInfo {
            size: self.data.len() as u64,
            mode: self.mode,
            sha256: self.sha256.clone(),
        }
    }
}

/// The file system of one VM.
#[derive(Clone, Default)]
pub struct Fs {
    files: BTreeMap<String, File>,
    dirs: BTreeSet<String>,
}

impl Fs {
    /// The directories a fresh guest has.
    pub fn base() -> Fs {
        let dirs = [
            "/", "/etc", "/home", "/opt", "/root", "/tmp", "/usr", "/usr/bin", "/var",
        ];
        Fs {
            files: BTreeMap::new(),
            dirs: dirs.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// True when `path` is a directory (explicit, or the ancestor of a file).
    pub fn is_dir(&self, path: &str) -> bool {
        if self.dirs.contains(path) {
            return true;
        }
        let prefix = format!("{}/", path.trim_end_matches('/'));
        self.files
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
    }

    /// The file at `path`.
    pub fn file(&self, path: &str) -> Result<&File> {
        match self.files.get(path) {
            Some(f) => Ok(f),
            None if self.is_dir(path) => {
                Err(Error::invalid_argument(format!("{path} is a directory")))
            }
            None => Err(Error::not_found(format!("no file {path}"))),
        }
    }

    /// Checks that a file can be written at `path`, creating its missing parent
    /// directories when `create_parents` is set.
    pub fn prepare_write(&mut self, path: &str, create_parents: bool) -> Result<()> {
        if self.is_dir(path) {
            return Err(Error::invalid_argument(format!("{path} is a directory")));
        }
        let parent = parent(path);
        if self.is_dir(parent) {
            return Ok(());
        }
        if self.files.contains_key(parent) || ancestors(parent).any(|a| self.files.contains_key(a))
        {
            return Err(Error::invalid_argument(format!(
                "a parent of {path} is a file"
            )));
        }
        if !create_parents {
            return Err(Error::not_found(format!(
                "directory {parent} does not exist (no create-parents)"
            )));
        }
        self.dirs.insert(parent.to_string());
        for a in ancestors(parent) {
            self.dirs.insert(a.to_string());
        }
        Ok(())
    }

    /// Stores a file (its parent must have been prepared).
    pub fn write(&mut self, path: &str, data: Vec<u8>, mode: u32) -> FileInfo {
        let sha256 = hex::encode(Sha256::digest(&data));
        let file = File {
            data,
            mode: mode & 0o7777,
            sha256,
        };
        let info = file.info();
        self.files.insert(path.to_string(), file);
        info
    }
}

/// Checks that `path` is an absolute, normalized file path.
pub fn check_path(path: &str) -> Result<()> {
    let ok = path.starts_with('/')
        && path.len() > 1
        && !path.ends_with('/')
        && !path.contains('\0')
        && path
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "path {path:?} must be absolute and normalized"
        )))
    }
}

/// Resolves `path` against `cwd` (for commands).
pub fn resolve(cwd: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", cwd.trim_end_matches('/'))
    }
}

/// The parent directory of an absolute path.
fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Every ancestor of an absolute path, nearest first, ending with `/`.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut cur = path;
    std::iter::from_fn(move || {
        if cur == "/" {
            return None;
        }
        cur = parent(cur);
        Some(cur)
    })
}
