//! Files and directories that hold secrets (tokens, configs with tokens,
//! databases): directories are made 0700 and files 0600 from the moment they
//! exist (created with the mode, written to a temporary name and renamed into
//! place), never loosened and tightened afterwards.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and missing parents) with mode 0700. An existing directory that
/// others can read or enter is tightened to 0700 (a data directory made by an
/// earlier version); the returned flag says so.
pub fn private_dir(dir: &Path) -> std::io::Result<bool> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        return Ok(true);
    }
    Ok(false)
}

/// [`private_dir`] off the async executor.
pub async fn private_dir_async(dir: std::path::PathBuf) -> std::io::Result<bool> {
    tokio::task::spawn_blocking(move || private_dir(&dir))
        .await
        .map_err(std::io::Error::other)?
}

/// Writes `bytes` to `path` as a file of mode 0600: a temporary file created with
/// that mode beside it, synced, then renamed over `path` (readers see the old or
/// the new file, never a partial or readable-by-others one).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Longest secret file read, bytes.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The secret in file `path`, named `what` in errors (a config field): a regular
/// file of the agent's own user that no other user may read, at most
/// [`MAX_SECRET_FILE`] bytes of UTF-8, one trailing newline dropped. Errors say
/// what is wrong with the file, never what it holds.
pub fn read_secret(what: &str, path: &Path) -> Result<String, String> {
    let shown = path.display();
    let bytes = read_private(what, path)?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{what} {shown} is not UTF-8 text"))?;
    let value = match text.strip_suffix('\n') {
        Some(t) => t.strip_suffix('\r').unwrap_or(t),
        None => &text,
    };
    if value.is_empty() {
        return Err(format!("{what} {shown} is empty"));
    }
    Ok(value.to_string())
}

/// The bytes of file `path`, named `what` in errors: a regular file of this
/// process's user that no other user may read, at most [`MAX_SECRET_FILE`] bytes.
pub fn read_private(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let io = |e: std::io::Error| format!("{what} {shown}: {e}");
    // Only a regular file is opened (a device's open may do something), then
    // checked again through the handle, so a swap in between is caught;
    // non-blocking and without taking a terminal.
    let before = std::fs::metadata(path).map_err(io)?;
    if !before.is_file() {
        return Err(format!("{what} {shown} is not a file"));
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() || (meta.dev(), meta.ino()) != (before.dev(), before.ino()) {
        return Err(format!("{what} {shown} changed while it was opened"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "{what} {shown} belongs to user {}, not to the agent's ({me})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{what} {shown} is open to other users (mode {:o}): make it 0600 or 0400",
            meta.mode() & 0o777
        ));
    }
    // Bounded by what is read, not by the size the file reports.
    let mut bytes = Vec::new();
    Read::by_ref(&mut f)
        .take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "{what} {shown} is larger than {MAX_SECRET_FILE} bytes"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_private_from_the_start() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        assert!(!private_dir(&d).unwrap());
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = d.join("secrets.toml");
        write_private(&f, b"token = 1").unwrap();
        write_private(&f, b"token = 2").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"token = 2");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "no temporary left"
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(private_dir(&d).unwrap());
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
