//! File transfers into and out of a guest ([`Upload`], [`Download`]). A transfer holds
//! its pooled instance from start to end. Ending it drops the plugin's transfer
//! resource, whose destructor is plugin code: it runs under the call deadline like
//! any call, and an instance whose destructor overruns is discarded, never reused.
//! A transfer dropped without being ended has its resource dropped the same way on a
//! background task (or, outside a runtime, its instance discarded).

use wasmtime::component::ResourceAny;

use super::answers;
use super::bindings::types::FileInfo;
use super::error::{PluginError, Result};
use super::instance::guarded;
use super::pool::Lease;

/// A file being written into a guest; holds its instance until finished or dropped.
pub struct Upload {
    lease: Option<Lease>,
    upload: ResourceAny,
    plugin: String,
}

/// A file being read from a guest; holds its instance until closed or dropped.
pub struct Download {
    lease: Option<Lease>,
    download: ResourceAny,
    plugin: String,
    /// File size in bytes.
    pub size: u64,
    /// Unix mode bits.
    pub mode: u32,
}

/// The error of a call on a transfer whose instance failed earlier.
pub(super) fn gone(plugin: &str, op: &'static str) -> PluginError {
    PluginError::Trap {
        plugin: plugin.to_string(),
        op,
        message: "the transfer's instance failed earlier".into(),
    }
}

/// Drops `resource` in its instance under the deadline, then gives the instance back.
pub(super) async fn end(mut lease: Lease, op: &'static str, resource: ResourceAny) -> Result<()> {
    let r = lease.pooled.inst.drop_resource(op, resource).await;
    lease.give_back();
    r
}

/// Ends an abandoned transfer: on a background task when a runtime is there, else by
/// discarding its instance (dropping the store runs no plugin code).
fn end_abandoned(lease: Lease, op: &'static str, resource: ResourceAny) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            if let Err(e) = end(lease, op, resource).await {
                tracing::warn!("ending an abandoned transfer: {e}");
            }
        });
    }
}

impl Upload {
    /// A started upload on `lease`.
    pub(crate) fn new(lease: Lease, upload: ResourceAny, plugin: &str) -> Upload {
        Upload {
            lease: Some(lease),
            upload,
            plugin: plugin.to_string(),
        }
    }

    /// Appends a chunk (at most 4 MiB is a good size).
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let lease = self
            .lease
            .as_mut()
            .ok_or_else(|| gone(&self.plugin, "upload-write"))?;
        let u = self.upload;
        let r = guarded!(&mut lease.pooled.inst, "upload-write", guest, |g, store| g
            .upload()
            .call_write(store, u, chunk));
        if lease.pooled.inst.poisoned {
            self.lease = None;
        }
        r
    }

    /// Closes the file and returns what the guest holds.
    pub async fn finish(mut self) -> Result<FileInfo> {
        let mut lease = self
            .lease
            .take()
            .ok_or_else(|| gone(&self.plugin, "upload-finish"))?;
        let u = self.upload;
        let r = guarded!(
            &mut lease.pooled.inst,
            "upload-finish",
            guest,
            |g, store| g.upload().call_finish(store, u)
        );
        let dropped = end(lease, "upload-finish", u).await;
        let info = answers::checked(&self.plugin, "upload-finish", r?)?;
        dropped.map(|()| info)
    }

    /// Abandons the transfer: the plugin drops its upload (guest-install removes its
    /// temporary file) and the instance returns to its pool.
    pub async fn abort(mut self) {
        if let Some(lease) = self.lease.take() {
            if let Err(e) = end(lease, "upload-abort", self.upload).await {
                tracing::warn!("aborting an upload: {e}");
            }
        }
    }
}

impl Download {
    /// A started download on `lease`.
    pub(crate) fn new(
        lease: Lease,
        download: ResourceAny,
        plugin: &str,
        size: u64,
        mode: u32,
    ) -> Download {
        Download {
            lease: Some(lease),
            download,
            plugin: plugin.to_string(),
            size,
            mode,
        }
    }

    /// Reads up to `max` bytes; empty means end of file. A plugin that answers with
    /// more than `max` bytes gets a typed error instead.
    pub async fn read(&mut self, max: u32) -> Result<Vec<u8>> {
        let lease = self
            .lease
            .as_mut()
            .ok_or_else(|| gone(&self.plugin, "download-read"))?;
        let d = self.download;
        let r = guarded!(
            &mut lease.pooled.inst,
            "download-read",
            guest,
            |g, store| g.download().call_read(store, d, max)
        );
        if lease.pooled.inst.poisoned {
            self.lease = None;
        }
        answers::at_most(&self.plugin, "download-read", r?, max)
    }

    /// Ends the transfer and returns the instance to its pool.
    pub async fn close(mut self) {
        if let Some(lease) = self.lease.take() {
            if let Err(e) = end(lease, "download-close", self.download).await {
                tracing::warn!("closing a download: {e}");
            }
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            end_abandoned(lease, "upload-abort", self.upload);
        }
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            end_abandoned(lease, "download-close", self.download);
        }
    }
}
