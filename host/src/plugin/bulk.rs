//! Bulk copies staged by a driver ([`BulkTransfer`], contract 0.1.1's
//! `gve:hypervisor/bulk`): a raw disk attached to a running VM whose bytes the host
//! writes or reads in large pieces. Like the guest transfers, one holds its pooled
//! instance from stage to release. A transfer dropped without being released is
//! released on a background task (the disk detached and deleted), then its resource
//! dropped; a host that crashed instead calls [`DriverSession::bulk_release_left`]
//! with the transfer's id.
//!
//! [`DriverSession::bulk_release_left`]: super::session::DriverSession::bulk_release_left

use wasmtime::component::ResourceAny;

use super::answers;
use super::error::Result;
use super::instance::guarded;
use super::pool::Lease;
use super::transfer::{end, gone};

/// Most bytes one [`BulkTransfer::write`] or [`BulkTransfer::read`] moves.
pub const MAX_BULK_IO: u32 = 8 << 20;

/// A staged disk attached to a running VM; holds its instance until released.
pub struct BulkTransfer {
    lease: Option<Lease>,
    transfer: ResourceAny,
    plugin: String,
    /// The disk's serial number as the guest sees it.
    pub serial: String,
}

impl std::fmt::Debug for BulkTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkTransfer")
            .field("plugin", &self.plugin)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl BulkTransfer {
    /// A staged transfer on `lease`.
    pub(crate) fn new(lease: Lease, transfer: ResourceAny, plugin: &str, serial: String) -> Self {
        BulkTransfer {
            lease: Some(lease),
            transfer,
            plugin: plugin.to_string(),
            serial,
        }
    }

    fn lease(&mut self, op: &'static str) -> Result<&mut Lease> {
        self.lease.as_mut().ok_or_else(|| gone(&self.plugin, op))
    }

    /// Writes `data` (at most [`MAX_BULK_IO`] bytes) at byte `offset` of the disk.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let t = self.transfer;
        let lease = self.lease("bulk-write")?;
        let r = guarded!(&mut lease.pooled.inst, "bulk-write", bulk, |b, store| b
            .transfer()
            .call_write(store, t, offset, data));
        if lease.pooled.inst.poisoned {
            self.lease = None;
        }
        answers::checked(&self.plugin, "bulk-write", r?)
    }

    /// Reads up to `max` bytes at byte `offset` of the disk. A plugin that answers
    /// with more than `max` bytes gets a typed error instead.
    pub async fn read(&mut self, offset: u64, max: u32) -> Result<Vec<u8>> {
        let t = self.transfer;
        let lease = self.lease("bulk-read")?;
        let r = guarded!(&mut lease.pooled.inst, "bulk-read", bulk, |b, store| b
            .transfer()
            .call_read(store, t, offset, max));
        if lease.pooled.inst.poisoned {
            self.lease = None;
        }
        answers::at_most(&self.plugin, "bulk-read", r?, max)
    }

    /// Detaches and deletes the disk, then gives the instance back.
    pub async fn release(mut self) -> Result<()> {
        match self.lease.take() {
            Some(lease) => release(lease, self.transfer).await,
            None => Err(gone(&self.plugin, "bulk-release")),
        }
    }
}

/// Releases the transfer's disk and drops its resource, whatever the release said.
async fn release(mut lease: Lease, transfer: ResourceAny) -> Result<()> {
    let r = guarded!(&mut lease.pooled.inst, "bulk-release", bulk, |b, store| b
        .transfer()
        .call_release(store, transfer));
    let dropped = end(lease, "bulk-release", transfer).await;
    r.and(dropped)
}

impl Drop for BulkTransfer {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let transfer = self.transfer;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = release(lease, transfer).await {
                        tracing::warn!("releasing an abandoned bulk transfer: {e}");
                    }
                });
            }
        }
    }
}
