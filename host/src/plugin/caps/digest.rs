//! Digest capability: SHA-256 computed natively for a plugin (guest-install checks
//! every file it reads from or writes to a guest). Always granted: pure
//! computation, each hasher an entry of the plugin's resource table (so their
//! number is budgeted), and the data of one `update` is at most the plugin's own
//! memory. A long update yields to the executor between pieces.

use sha2::{Digest, Sha256};
use wasmtime::component::Resource;

use crate::plugin::bindings::gve::hypervisor::digest::{Host, HostSha256};
use crate::plugin::state::HostState;

/// Bytes hashed between two yields to the executor (about 0.5 ms with SHA
/// instructions).
const PIECE: usize = 1 << 20;

/// A plugin's SHA-256 in progress (`digest.sha256`).
pub struct Sha256State(Sha256);

impl Host for HostState {}

impl HostSha256 for HostState {
    async fn new(&mut self) -> wasmtime::Result<Resource<Sha256State>> {
        Ok(self.table().push(Sha256State(Sha256::new()))?)
    }

    async fn update(&mut self, this: Resource<Sha256State>, data: Vec<u8>) -> wasmtime::Result<()> {
        let mut pieces = data.chunks(PIECE).peekable();
        while let Some(piece) = pieces.next() {
            self.table().get_mut(&this)?.0.update(piece);
            if pieces.peek().is_some() {
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }

    async fn hex(&mut self, this: Resource<Sha256State>) -> wasmtime::Result<String> {
        Ok(hex::encode(self.table().get(&this)?.0.clone().finalize()))
    }

    async fn drop(&mut self, this: Resource<Sha256State>) -> wasmtime::Result<()> {
        self.table().delete(this)?;
        Ok(())
    }
}
