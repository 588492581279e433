//! The plain-Rust side of the `bulk` export (contract 0.1.1): [`BulkCopy`] and
//! [`BulkTransfer`], and the blanket impls that map them onto the generated traits.
//! A driver that exports it has the capability `bulk-copy`: it stages a raw disk
//! attached to a running VM, the host writes or reads the disk's bytes, and the
//! guest moves them between the disk and a file.

use core::cell::RefCell;

use crate::bindings::bulk_world::exports::gve::hypervisor::bulk as wit;
use crate::error::Result;
use crate::types::Credentials;

/// Bulk copies staged by a driver.
///
/// Export it next to the driver with [`crate::export_driver_with_bulk!`].
pub trait BulkCopy: 'static {
    /// The transfer type [`BulkCopy::stage`] returns.
    type Transfer: BulkTransfer;

    /// Makes a raw disk of `size` bytes (rounded up to 4 MiB) next to `vm`'s disks,
    /// named by `id`, and attaches it to the running VM, live only.
    fn stage(
        endpoint: String,
        credentials: Credentials,
        vm: String,
        id: String,
        size: u64,
    ) -> Result<Self::Transfer>;

    /// Detaches and deletes whatever transfer `id` on `vm` left; nothing left is fine.
    fn release_left(
        endpoint: String,
        credentials: Credentials,
        vm: String,
        id: String,
    ) -> Result<()>;
}

/// One staged disk attached to a running VM.
pub trait BulkTransfer: 'static {
    /// The disk's serial number as the guest sees it (1 to 20 of `A-Z a-z 0-9 -`).
    fn serial(&self) -> String;

    /// Writes `data` at byte `offset` of the disk.
    fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<()>;

    /// Reads up to `max` bytes at byte `offset` of the disk.
    fn read(&mut self, offset: u64, max: u32) -> Result<Vec<u8>>;

    /// Detaches the disk and deletes it; calling it again does nothing.
    fn release(&mut self) -> Result<()>;
}

/// The `transfer` resource the SDK exports for a [`BulkCopy`] `B`.
#[doc(hidden)]
pub struct TransferResource<B: BulkCopy>(RefCell<B::Transfer>);

impl<T: BulkCopy> wit::Guest for T {
    type Transfer = TransferResource<T>;

    fn release_left(
        endpoint: String,
        credentials: Credentials,
        vm: String,
        id: String,
    ) -> Result<()> {
        T::release_left(endpoint, credentials, vm, id)
    }
}

impl<B: BulkCopy> wit::GuestTransfer for TransferResource<B> {
    fn stage(
        endpoint: String,
        credentials: Credentials,
        vm: String,
        id: String,
        size: u64,
    ) -> Result<wit::Transfer> {
        let t = B::stage(endpoint, credentials, vm, id, size)?;
        Ok(wit::Transfer::new(TransferResource::<B>(RefCell::new(t))))
    }

    fn serial(&self) -> String {
        self.0.borrow().serial()
    }

    fn write(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.0.borrow_mut().write(offset, data)
    }

    fn read(&self, offset: u64, max: u32) -> Result<Vec<u8>> {
        self.0.borrow_mut().read(offset, max)
    }

    fn release(&self) -> Result<()> {
        self.0.borrow_mut().release()
    }
}
