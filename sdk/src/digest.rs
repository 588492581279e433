//! SHA-256 computed by the host (`digest` import, contract 0.1.3): natively, with the
//! CPU's SHA instructions where it has them, several times faster than hashing in
//! WebAssembly. Always granted.

use crate::bindings::driver_world::gve::hypervisor::digest as wit;

/// A SHA-256 over what was given to it so far (a host resource: one entry of the
/// plugin's resource table while it lives).
pub struct Sha256(wit::Sha256);

impl Sha256 {
    /// An empty hash.
    pub fn new() -> Sha256 {
        Sha256(wit::Sha256::new())
    }

    /// Adds `data` (handed to the host 1 MiB at a time, so the host never holds a
    /// copy of more).
    pub fn update(&mut self, data: &[u8]) {
        for piece in data.chunks(1 << 20) {
            self.0.update(piece);
        }
    }

    /// The digest of everything added so far, 64 lower-case hex digits; more may
    /// still be added.
    pub fn hex(&self) -> String {
        self.0.hex()
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}
