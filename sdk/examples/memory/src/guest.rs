//! Guest operations: commands and file transfer inside running memory VMs.

use gve_sdk::prelude::*;

use crate::fs::{check_path, Fs};
use crate::state;

/// A guest session on one `memory:` endpoint.
pub struct MemoryGuestSession {
    endpoint: String,
}

impl MemoryGuestSession {
    /// A guest session on `endpoint` (already authenticated).
    pub fn new(endpoint: String) -> MemoryGuestSession {
        MemoryGuestSession { endpoint }
    }
}

/// Runs `f` on the running VM `vm` of `endpoint`; a VM that is not running has no
/// guest agent to answer.
fn with_running<R>(
    endpoint: &str,
    vm: &str,
    f: impl FnOnce(&VmInfo, &mut Fs) -> Result<R>,
) -> Result<R> {
    state::with(|w| {
        let (info, fs) = w.endpoint(endpoint).files_mut(vm)?;
        if info.state != VmState::Running {
            return Err(Error::unavailable(format!(
                "{vm}: guest agent not running (the VM is not running)"
            )));
        }
        f(info, fs)
    })
}

impl GuestSession for MemoryGuestSession {
    type Upload = MemoryUpload;
    type Download = BytesDownload;

    fn exec(&mut self, vm: String, request: ExecRequest) -> Result<ExecResult> {
        with_running(&self.endpoint, &vm, |_, fs| crate::exec::run(&request, fs))
    }

    fn upload(
        &mut self,
        vm: String,
        path: String,
        mode: u32,
        create_parents: bool,
    ) -> Result<MemoryUpload> {
        check_path(&path)?;
        let id = with_running(&self.endpoint, &vm, |info, fs| {
            fs.prepare_write(&path, create_parents)?;
            Ok(info.id.clone())
        })?;
        Ok(MemoryUpload {
            endpoint: self.endpoint.clone(),
            vm: id,
            path,
            mode,
            data: Vec::new(),
            finished: false,
        })
    }

    fn download(&mut self, vm: String, path: String) -> Result<BytesDownload> {
        check_path(&path)?;
        with_running(&self.endpoint, &vm, |_, fs| {
            // A snapshot of the content, taken as the download begins.
            let f = fs.file(&path)?;
            Ok(BytesDownload::new(f.data.clone(), f.mode))
        })
    }

    fn stat(&mut self, vm: String, path: String) -> Result<FileInfo> {
        check_path(&path)?;
        with_running(&self.endpoint, &vm, |_, fs| Ok(fs.file(&path)?.info()))
    }
}

/// A file being uploaded: chunks are buffered and stored on `finish`.
pub struct MemoryUpload {
    endpoint: String,
    vm: String,
    path: String,
    mode: u32,
    data: Vec<u8>,
    finished: bool,
}

impl Upload for MemoryUpload {
    fn write(&mut self, chunk: Vec<u8>) -> Result<()> {
        if self.finished {
            return Err(Error::invalid_state(format!(
                "upload of {}: already finished",
                self.path
            )));
        }
        self.data.extend_from_slice(&chunk);
        Ok(())
    }

    fn finish(&mut self) -> Result<FileInfo> {
        if self.finished {
            return Err(Error::invalid_state(format!(
                "upload of {}: already finished",
                self.path
            )));
        }
        self.finished = true;
        let data = std::mem::take(&mut self.data);
        with_running(&self.endpoint, &self.vm, |_, fs| {
            // The parents were made when the upload started; a VM cannot lose them.
            fs.prepare_write(&self.path, true)?;
            Ok(fs.write(&self.path, data, self.mode))
        })
    }
}
