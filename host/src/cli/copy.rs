//! `gve vm copy-in` and `gve vm copy-out`: files streamed through the site in
//! chunks (never whole in memory), with the bytes moved shown on stderr and the
//! SHA-256 of both ends compared. A copy out is written beside its destination as
//! `NAME.partial` and renamed into place only once its digest matched.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::output::{self, Output};
use super::vms::vm_path;
use super::wait::{self, Show};
use super::{CliError, SiteOpts};
use crate::api::client::Client;
use crate::site::model::Job;

/// Bytes read or written at a time.
const CHUNK: usize = 1 << 20;

/// Streams `local` into the guest of VM `id` at `guest`, then checks the digest
/// the guest computed.
pub async fn copy_in(
    site: &SiteOpts,
    client: &Client,
    id: &str,
    local: &Path,
    guest: &str,
    mode: &str,
    parents: bool,
) -> Result<(), CliError> {
    // First pass: the digest goes in a header, before the body.
    let path = local.to_path_buf();
    let (size, sha) = tokio::task::spawn_blocking(move || digest_file(&path))
        .await
        .map_err(|e| CliError::file(local, std::io::Error::other(e)))?
        .map_err(|e| CliError::file(local, e))?;
    let file = tokio::fs::File::open(local)
        .await
        .map_err(|e| CliError::file(local, e))?;
    let (feed, body) = crate::api::request_feed();
    let sender = tokio::spawn(send_file(file, size, feed));
    let url = format!(
        "{}/files?path={}&mode={}&parents={parents}",
        vm_path(id),
        crate::api::percent_encode(guest),
        crate::api::percent_encode(mode)
    );
    let sent = client
        .put_stream::<Job>(&url, &[("x-gve-sha256", sha.clone())], body)
        .await;
    // A local read error explains a cut upload better than the transport does.
    let read = sender.await.unwrap_or(Ok(()));
    let job = match (sent, read) {
        (_, Err(e)) => return Err(CliError::file(local, e)),
        (r, Ok(())) => r?,
    };
    let done = wait::wait(site, client, &job.id, Show::Progress).await?;
    if site.output == Output::Json {
        output::json(&done);
    }
    let done = wait::outcome(done)?;
    let r = done.result.unwrap_or_default();
    let got = r["sha256"].as_str().unwrap_or_default();
    if got != sha {
        return Err(CliError::Digest {
            what: format!("copy of {} to {id}:{guest}", local.display()),
            expected: sha,
            actual: got.to_string(),
        });
    }
    if site.output == Output::Table {
        println!(
            "copied {} to {id}:{guest} ({size} bytes, sha256 {})",
            local.display(),
            &sha[..16]
        );
    }
    Ok(())
}

/// Streams the guest file `guest` of VM `id` into `local` (a file, or an existing
/// directory to copy into).
pub async fn copy_out(
    site: &SiteOpts,
    client: &Client,
    id: &str,
    guest: &str,
    local: &Path,
) -> Result<(), CliError> {
    let job: Job = client
        .call(
            Method::POST,
            &format!("{}/copy-out", vm_path(id)),
            Some(&json!({ "path": guest })),
        )
        .await?;
    let done = wait::outcome(wait::wait(site, client, &job.id, Show::Progress).await?)?;
    let target = if local.is_dir() {
        let name = guest.rsplit('/').find(|s| !s.is_empty()).unwrap_or("file");
        local.join(name)
    } else {
        local.to_path_buf()
    };
    let mut partial = target.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let resp = client
        .get_stream(&format!("/v1/jobs/{}/content", done.id))
        .await?;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let total = header("content-length").and_then(|v| v.parse::<u64>().ok());
    let result = done.result.clone().unwrap_or_default();
    let expected = header("x-gve-sha256")
        .or_else(|| result["sha256"].as_str().map(str::to_string))
        .unwrap_or_default()
        .to_lowercase();
    let mode = header("x-gve-file-mode").and_then(|m| u32::from_str_radix(&m, 8).ok());
    let received = receive(resp.into_body(), &partial, total).await;
    let (size, sha) = match received {
        Ok(r) => r,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    if sha != expected {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(CliError::Digest {
            what: format!("copy of {id}:{guest} to {}", target.display()),
            expected,
            actual: sha,
        });
    }
    if let Some(m) = mode {
        // Permission bits only: no set-id bits from a guest.
        use std::os::unix::fs::PermissionsExt;
        let perms = std::fs::Permissions::from_mode(m & 0o777);
        tokio::fs::set_permissions(&partial, perms)
            .await
            .map_err(|e| CliError::file(&partial, e))?;
    }
    tokio::fs::rename(&partial, &target)
        .await
        .map_err(|e| CliError::file(&target, e))?;
    match site.output {
        Output::Json => output::json(&done),
        Output::Table => println!(
            "copied {id}:{guest} to {} ({size} bytes, sha256 {})",
            target.display(),
            &sha[..16]
        ),
    }
    Ok(())
}

/// Size and SHA-256 of a file, read in chunks.
fn digest_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    if f.metadata()?.is_dir() {
        return Err(std::io::Error::other("is a directory"));
    }
    let (mut h, mut size, mut buf) = (Sha256::new(), 0u64, vec![0u8; CHUNK]);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((size, hex::encode(h.finalize())));
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
}

/// Feeds a file to a request body chunk by chunk, showing bytes sent.
async fn send_file(
    mut file: tokio::fs::File,
    total: u64,
    feed: crate::api::Feed,
) -> Result<(), std::io::Error> {
    let mut meter = Meter::new("sent", Some(total));
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                feed.fail(e.to_string()).await;
                meter.done();
                return Err(e);
            }
        };
        if n == 0 {
            meter.done();
            return Ok(());
        }
        buf.truncate(n);
        if !feed.data(Bytes::from(buf)).await {
            // The request ended (its error is the caller's to report).
            meter.done();
            return Ok(());
        }
        meter.add(n as u64);
    }
}

/// Writes a body to `file` while hashing it; returns size and SHA-256.
async fn receive(
    mut body: hyper::body::Incoming,
    file: &Path,
    total: Option<u64>,
) -> Result<(u64, String), CliError> {
    let mut out = tokio::fs::File::create(file)
        .await
        .map_err(|e| CliError::file(file, e))?;
    let (mut h, mut meter) = (Sha256::new(), Meter::new("received", total));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            meter.done();
            CliError::Api(crate::api::ApiError::new(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the download stopped after {} bytes: {e}", meter.bytes),
            ))
        })?;
        if let Ok(data) = frame.into_data() {
            h.update(&data);
            out.write_all(&data)
                .await
                .map_err(|e| CliError::file(file, e))?;
            meter.add(data.len() as u64);
        }
    }
    meter.done();
    out.sync_all().await.map_err(|e| CliError::file(file, e))?;
    Ok((meter.bytes, hex::encode(h.finalize())))
}

/// Bytes moved, on stderr: an indicatif bar on a terminal, a
/// line every five seconds and one at the end otherwise.
struct Meter {
    verb: &'static str,
    total: Option<u64>,
    bytes: u64,
    /// An indicatif bar on a terminal.
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    shown: Instant,
}

impl Meter {
    fn new(verb: &'static str, total: Option<u64>) -> Meter {
        let now = Instant::now();
        let bar = std::io::stderr().is_terminal().then(|| {
            let (bar, template) = match total {
                Some(t) => (
                    indicatif::ProgressBar::new(t),
                    "{prefix} {bar:30} {bytes}/{total_bytes} ({percent}%, {binary_bytes_per_sec})",
                ),
                None => (
                    indicatif::ProgressBar::new_spinner(),
                    "{spinner} {prefix} {bytes} ({binary_bytes_per_sec})",
                ),
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar.set_prefix(verb);
            bar
        });
        Meter {
            verb,
            total,
            bytes: 0,
            bar,
            start: now,
            shown: now,
        }
    }

    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = self.bytes as f64 / secs / (1024.0 * 1024.0);
        match self.total {
            Some(t) if t > 0 => format!(
                "{} {} of {t} bytes ({}%, {rate:.1} MiB/s)",
                self.verb,
                self.bytes,
                self.bytes * 100 / t
            ),
            _ => format!("{} {} bytes ({rate:.1} MiB/s)", self.verb, self.bytes),
        }
    }

    fn add(&mut self, n: u64) {
        self.bytes += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.bytes);
        } else if self.shown.elapsed() >= Duration::from_secs(5) {
            self.shown = Instant::now();
            eprintln!("{}", self.line());
        }
    }

    fn done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("{}", self.line());
    }
}
