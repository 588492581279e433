//! The plain-Rust side of the `guest` export: [`GuestAccess`], [`GuestSession`],
//! [`Upload`] and [`Download`], and the blanket impls that map them onto the
//! generated traits.

use core::cell::RefCell;

use crate::bindings::guest_world::exports::gve::hypervisor::guest as wit;
use crate::error::{Error, Result};
use crate::types::{Credentials, ExecRequest, ExecResult, FileInfo};

/// Operations inside VMs' operating systems: a way to open guest sessions.
///
/// Export it with [`crate::export_guest!`] (or [`crate::export_driver_with_guest!`]).
pub trait GuestAccess: 'static {
    /// The session type [`GuestAccess::open`] returns.
    type Session: GuestSession;

    /// Opens guest access for an endpoint (the endpoint and credentials the VM's
    /// driver session uses).
    fn open(endpoint: String, credentials: Credentials) -> Result<Self::Session>;
}

/// A connection to the guests behind one endpoint.
///
/// Every method has a default body that returns [`Error::Unsupported`]. A provider
/// that does not transfer files can name [`NoTransfer`] as its `Upload` and `Download`.
pub trait GuestSession: 'static {
    /// The file writer [`GuestSession::upload`] returns.
    type Upload: Upload;
    /// The file reader [`GuestSession::download`] returns.
    type Download: Download;

    /// Runs a command to completion or its timeout (`exec`).
    fn exec(&mut self, vm: String, request: ExecRequest) -> Result<ExecResult> {
        let _ = (vm, request);
        Err(Error::not_implemented("exec"))
    }

    /// Starts writing `path` with permission bits `mode`, creating missing parent
    /// directories when `create_parents` is set (`upload`).
    fn upload(
        &mut self,
        vm: String,
        path: String,
        mode: u32,
        create_parents: bool,
    ) -> Result<Self::Upload> {
        let _ = (vm, path, mode, create_parents);
        Err(Error::not_implemented("upload"))
    }

    /// Starts reading `path` (`download`).
    fn download(&mut self, vm: String, path: String) -> Result<Self::Download> {
        let _ = (vm, path);
        Err(Error::not_implemented("download"))
    }

    /// Size, mode and SHA-256 of a file in the guest (`stat`).
    fn stat(&mut self, vm: String, path: String) -> Result<FileInfo> {
        let _ = (vm, path);
        Err(Error::not_implemented("stat"))
    }
}

/// A file being written into a guest, one chunk at a time.
pub trait Upload: 'static {
    /// Appends a chunk (at most 4 MiB).
    fn write(&mut self, chunk: Vec<u8>) -> Result<()>;

    /// Closes the file, applies its mode and reports what the guest now holds.
    fn finish(&mut self) -> Result<FileInfo>;
}

/// A file being read out of a guest, one chunk at a time.
pub trait Download: 'static {
    /// Size of the file in bytes.
    fn size(&self) -> u64;

    /// Unix permission bits of the file.
    fn mode(&self) -> u32;

    /// Reads up to `max` bytes; an empty vector means end of file.
    fn read(&mut self, max: u32) -> Result<Vec<u8>>;
}

/// A stand-in `Upload`/`Download` type for guest sessions without file transfer;
/// it cannot be constructed.
pub enum NoTransfer {}

impl Upload for NoTransfer {
    fn write(&mut self, _chunk: Vec<u8>) -> Result<()> {
        match *self {}
    }

    fn finish(&mut self) -> Result<FileInfo> {
        match *self {}
    }
}

impl Download for NoTransfer {
    fn size(&self) -> u64 {
        match *self {}
    }

    fn mode(&self) -> u32 {
        match *self {}
    }

    fn read(&mut self, _max: u32) -> Result<Vec<u8>> {
        match *self {}
    }
}

/// A [`Download`] served from a file's content read whole when the download began
/// (for guests whose transfer hands over a file in one piece).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BytesDownload {
    data: Vec<u8>,
    mode: u32,
    pos: usize,
}

impl BytesDownload {
    /// A download of `data`, a file with permission bits `mode`.
    pub fn new(data: Vec<u8>, mode: u32) -> BytesDownload {
        BytesDownload { data, mode, pos: 0 }
    }
}

impl Download for BytesDownload {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn mode(&self) -> u32 {
        self.mode
    }

    fn read(&mut self, max: u32) -> Result<Vec<u8>> {
        let end = self.data.len().min(self.pos.saturating_add(max as usize));
        let chunk = self.data[self.pos..end].to_vec();
        self.pos = end;
        Ok(chunk)
    }
}

/// The `guest-session` resource the SDK exports for a [`GuestAccess`] `G`.
#[doc(hidden)]
pub struct GuestSessionResource<G: GuestAccess>(RefCell<G::Session>);

/// The `upload` resource the SDK exports for an [`Upload`] `U`.
#[doc(hidden)]
pub struct UploadResource<U: Upload>(RefCell<U>);

/// The `download` resource the SDK exports for a [`Download`] `D`.
#[doc(hidden)]
pub struct DownloadResource<D: Download>(RefCell<D>);

/// The upload type of `G`'s sessions.
type UploadOf<G> = <<G as GuestAccess>::Session as GuestSession>::Upload;
/// The download type of `G`'s sessions.
type DownloadOf<G> = <<G as GuestAccess>::Session as GuestSession>::Download;

impl<T: GuestAccess> wit::Guest for T {
    type Upload = UploadResource<UploadOf<T>>;
    type Download = DownloadResource<DownloadOf<T>>;
    type GuestSession = GuestSessionResource<T>;
}

impl<G: GuestAccess> wit::GuestGuestSession for GuestSessionResource<G> {
    fn open(endpoint: String, credentials: Credentials) -> Result<wit::GuestSession> {
        let session = G::open(endpoint, credentials)?;
        Ok(wit::GuestSession::new(GuestSessionResource::<G>(
            RefCell::new(session),
        )))
    }

    fn exec(&self, vm: String, request: ExecRequest) -> Result<ExecResult> {
        self.0.borrow_mut().exec(vm, request)
    }

    fn upload(
        &self,
        vm: String,
        path: String,
        mode: u32,
        create_parents: bool,
    ) -> Result<wit::Upload> {
        let upload = self.0.borrow_mut().upload(vm, path, mode, create_parents)?;
        Ok(wit::Upload::new(UploadResource(RefCell::new(upload))))
    }

    fn download(&self, vm: String, path: String) -> Result<wit::Download> {
        let download = self.0.borrow_mut().download(vm, path)?;
        Ok(wit::Download::new(DownloadResource(RefCell::new(download))))
    }

    fn stat(&self, vm: String, path: String) -> Result<FileInfo> {
        self.0.borrow_mut().stat(vm, path)
    }
}

impl<U: Upload> wit::GuestUpload for UploadResource<U> {
    fn write(&self, chunk: Vec<u8>) -> Result<()> {
        self.0.borrow_mut().write(chunk)
    }

    fn finish(&self) -> Result<FileInfo> {
        self.0.borrow_mut().finish()
    }
}

impl<D: Download> wit::GuestDownload for DownloadResource<D> {
    fn size(&self) -> u64 {
        self.0.borrow().size()
    }

    fn mode(&self) -> u32 {
        self.0.borrow().mode()
    }

    fn read(&self, max: u32) -> Result<Vec<u8>> {
        self.0.borrow_mut().read(max)
    }
}
