//! Provisioning: install a software bundle in a VM's guest, once.
//!
//! A bundle is a directory under the agent's `bundles-dir` holding an `install.sh`
//! and whatever it needs. Its digest is a SHA-256 over every file's relative path,
//! mode and content. `provision` copies the bundle to
//! `/var/lib/gve/provision/<name>/` in the guest, runs `sh install.sh` there (with
//! `GVE_BUNDLE` and `GVE_BUNDLE_DIGEST` set) and, when it exits 0, writes the digest
//! to `.gve-digest` beside it and records the bundle in the VM's registry record.
//! It is idempotent: a VM whose record or guest marker already holds the digest is
//! left alone; a changed bundle (new digest) is installed again.

use std::io::Read;
use std::path::{Path, PathBuf};

use hyper::StatusCode;
use sha2::{Digest, Sha256};

use super::guest::{exec_output, CHUNK};
use super::model::{OpError, ProvisionOutput};
use super::ops::op_error;
use super::AgentCore;
use crate::api::ApiError;
use crate::plugin::bindings::types::{EnvVar, ExecRequest};
use crate::plugin::ErrorKind;

/// Where bundles go in the guest.
pub const GUEST_ROOT: &str = "/var/lib/gve/provision";

/// A bundle read from disk.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Its name (the directory name).
    pub name: String,
    /// Files: path relative to the bundle, mode, absolute path on the agent host.
    pub files: Vec<(String, u32, PathBuf)>,
    /// SHA-256 over names, modes and contents.
    pub digest: String,
}

/// Reads and digests bundle `name` from `dir`; refuses names and files that could
/// reach outside it.
pub fn load(dir: &Path, name: &str) -> Result<Bundle, ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid {
        return Err(ApiError::bad_request(format!(
            "bundle name '{name}' must be 1-64 of [A-Za-z0-9._-], not starting with '.'"
        )));
    }
    let root = dir.join(name);
    if !root.join("install.sh").is_file() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!(
                "no bundle '{name}' on this agent (expected {})",
                root.join("install.sh").display()
            ),
        ));
    }
    let mut files = Vec::new();
    walk(&root, &root, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for (rel, mode, abs) in &files {
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(mode.to_le_bytes());
        let mut f = std::fs::File::open(abs).map_err(|e| io(abs, e))?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).map_err(|e| io(abs, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.update([0]);
    }
    Ok(Bundle {
        name: name.to_string(),
        files,
        digest: hex::encode(h.finalize()),
    })
}

fn io(path: &Path, e: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "backend",
        format!("bundle file {}: {e}", path.display()),
    )
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u32, PathBuf)>) -> Result<(), ApiError> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            let rel = path
                .strip_prefix(root)
                .ok()
                .and_then(|p| p.to_str())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "bundle file {} has a non-UTF-8 name",
                        path.display()
                    ))
                })?;
            out.push((
                rel.to_string(),
                meta.permissions().mode() & 0o7777,
                path.clone(),
            ));
        } else {
            return Err(ApiError::bad_request(format!(
                "bundle entry {} is neither a file nor a directory (symlinks are refused)",
                path.display()
            )));
        }
    }
    Ok(())
}

fn failed(kind: ErrorKind, message: String) -> OpError {
    OpError {
        kind: kind.as_str().into(),
        message,
    }
}

impl AgentCore {
    /// The bundle `name` from the agent's bundles directory.
    pub fn bundle(&self, name: &str) -> Result<Bundle, ApiError> {
        let Some(dir) = &self.bundles_dir else {
            return Err(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported",
                "this agent has no bundles-dir configured: nothing to provision",
            ));
        };
        load(dir, name)
    }

    /// Installs bundle `name` in the guest of `vm` unless it is there already.
    pub async fn provision(
        &self,
        vm: &str,
        name: &str,
        timeout_ms: u32,
    ) -> Result<ProvisionOutput, OpError> {
        let as_op = |e: ApiError| OpError {
            kind: e.kind,
            message: e.message,
        };
        let dir = self.bundles_dir.clone();
        let bundle = {
            let owned = name.to_string();
            tokio::task::spawn_blocking(move || match dir {
                Some(d) => load(&d, &owned),
                None => Err(ApiError::bad_request("no bundles-dir")),
            })
            .await
            .map_err(|e| failed(ErrorKind::Backend, format!("reading bundle '{name}': {e}")))?
            .map_err(as_op)?
        };
        let done = |install: Option<super::model::ExecOutput>| ProvisionOutput {
            bundle: bundle.name.clone(),
            digest: bundle.digest.clone(),
            already_installed: install.is_none(),
            install,
        };
        let recorded = self
            .registry
            .vm(vm)
            .ok()
            .flatten()
            .and_then(|r| r.provisioned.get(name).cloned());
        if recorded.is_some_and(|p| p.digest == bundle.digest) {
            return Ok(done(None));
        }
        let guest = self.guest().map_err(as_op)?;
        let _turn = self.guest_turn(vm, super::ready::GUEST_WAIT).await?;
        let base = format!("{GUEST_ROOT}/{}", bundle.name);
        let marker = format!("{base}/.gve-digest");
        let quick = |argv: Vec<String>| ExecRequest {
            argv,
            env: Vec::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout_ms: 10_000,
            output_limit: 4096,
        };
        let seen = guest
            .session
            .exec(vm, &quick(vec!["cat".into(), marker.clone()]))
            .await
            .map_err(|e| op_error(&e))?;
        if seen.exit_code == Some(0)
            && String::from_utf8_lossy(&seen.stdout).trim() == bundle.digest
        {
            return Ok(done(None));
        }
        for (rel, mode, abs) in &bundle.files {
            let target = format!("{base}/{rel}");
            let mut up = guest
                .session
                .upload(vm, &target, *mode, true)
                .await
                .map_err(|e| op_error(&e))?;
            let mut f = tokio::fs::File::open(abs)
                .await
                .map_err(|e| failed(ErrorKind::Backend, format!("{}: {e}", abs.display())))?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                use tokio::io::AsyncReadExt;
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| failed(ErrorKind::Backend, format!("{}: {e}", abs.display())))?;
                if n == 0 {
                    break;
                }
                up.write(&buf[..n]).await.map_err(|e| op_error(&e))?;
            }
            up.finish().await.map_err(|e| op_error(&e))?;
        }
        let install = ExecRequest {
            argv: vec!["/bin/sh".into(), "install.sh".into()],
            env: vec![
                EnvVar {
                    name: "GVE_BUNDLE".into(),
                    value: bundle.name.clone(),
                },
                EnvVar {
                    name: "GVE_BUNDLE_DIGEST".into(),
                    value: bundle.digest.clone(),
                },
            ],
            cwd: Some(base.clone()),
            stdin: Vec::new(),
            timeout_ms,
            output_limit: 64 << 10,
        };
        let r = guest
            .session
            .exec(vm, &install)
            .await
            .map_err(|e| op_error(&e))?;
        if r.exit_code != Some(0) {
            let stderr = String::from_utf8_lossy(&r.stderr);
            let tail: String = stderr
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let how = match (r.timed_out, r.exit_code, r.signal) {
                (true, _, _) => format!("timed out after {timeout_ms} ms"),
                (_, Some(c), _) => format!("exit code {c}"),
                (_, _, Some(s)) => format!("signal {s}"),
                _ => "an unknown end".into(),
            };
            let kind = if r.timed_out {
                ErrorKind::Timeout
            } else {
                ErrorKind::Backend
            };
            return Err(failed(
                kind,
                format!(
                    "{vm}: install script of bundle '{}' ended with {how}: {}",
                    bundle.name,
                    tail.trim()
                ),
            ));
        }
        let mut up = guest
            .session
            .upload(vm, &marker, 0o644, true)
            .await
            .map_err(|e| op_error(&e))?;
        up.write(bundle.digest.as_bytes())
            .await
            .map_err(|e| op_error(&e))?;
        up.finish().await.map_err(|e| op_error(&e))?;
        Ok(done(Some(exec_output(r))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_change_with_content_and_mode_and_bad_names_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("tool");
        std::fs::create_dir_all(b.join("lib")).unwrap();
        std::fs::write(b.join("install.sh"), "echo hi\n").unwrap();
        std::fs::write(b.join("lib/data"), "x").unwrap();
        let one = load(d.path(), "tool").unwrap();
        assert_eq!(one.files.len(), 2);
        assert_eq!(one.files[1].0, "lib/data");
        std::fs::write(b.join("lib/data"), "y").unwrap();
        let two = load(d.path(), "tool").unwrap();
        assert_ne!(one.digest, two.digest);
        std::fs::set_permissions(b.join("lib/data"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        assert_ne!(two.digest, load(d.path(), "tool").unwrap().digest);
        for bad in ["../etc", ".hidden", "a/b", ""] {
            assert_eq!(load(d.path(), bad).unwrap_err().status, 400, "{bad}");
        }
        assert_eq!(load(d.path(), "missing").unwrap_err().status, 404);
    }
}
