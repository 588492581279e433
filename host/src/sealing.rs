//! Secrets at rest, sealed (ChaCha20-Poly1305) under a key file beside a
//! service's database (0600), so a copy of the database alone (a backup, a
//! support bundle) reveals none: the site keeps each agent's secret (it must
//! present it, so it cannot keep only a hash) under `site.key`; an agent keeps
//! the credentials and plugin config values given to it at runtime under
//! `agent.key`.

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The prefix of a sealed value.
const SEALED: &str = "sealed-v1:";

/// Seals and unseals secrets with one key file's key.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

/// Why the key could not be had, or a value not unsealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read or made.
    #[error("{message}")]
    Key {
        /// The key file.
        path: std::path::PathBuf,
        /// What is wrong with it, naming it.
        message: String,
    },
    /// A sealed value is damaged or was sealed under another key.
    #[error("a sealed secret cannot be opened (damaged, or sealed under another key)")]
    Damaged,
}

impl Sealer {
    /// The sealer of the key in `path`, made (32 random bytes, 0600) if missing.
    /// A key file must pass the checks of a secret file ([`crate::private_fs::read_private`]).
    pub fn open_or_create(path: &Path) -> Result<Sealer, SealError> {
        let err = |m: String| SealError::Key {
            path: path.to_path_buf(),
            message: format!("key file {}{m}", path.display()),
        };
        let rng = SystemRandom::new();
        let bytes = match std::fs::symlink_metadata(path) {
            // The checks of a secret file: a regular file of this user's alone.
            Ok(_) => {
                crate::private_fs::read_private("key file", path).map_err(|m| SealError::Key {
                    path: path.to_path_buf(),
                    message: m,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; 32];
                rng.fill(&mut b)
                    .map_err(|_| err(": no randomness".into()))?;
                crate::private_fs::write_private(path, &b).map_err(|e| err(format!(": {e}")))?;
                b
            }
            Err(e) => return Err(err(format!(": {e}"))),
        };
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| err(format!(" must hold 32 bytes, not {}", bytes.len())))?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
            rng,
        })
    }

    /// Whether `value` is sealed already.
    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(SEALED)
    }

    /// `plain` sealed under a fresh random nonce.
    pub fn seal(&self, plain: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        // SystemRandom fails only without an OS random source; the nonce then
        // stays zero, which is still unique per key here only by luck: refuse.
        self.rng.fill(&mut nonce).expect("the OS random source");
        let mut buf = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .expect("sealing a short secret");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("{SEALED}{}", hex::encode(out))
    }

    /// Seals each of `values` in place (a record's secrets before it is written).
    pub fn seal_all<'a>(&self, values: impl IntoIterator<Item = &'a mut String>) {
        for v in values {
            *v = self.seal(v);
        }
    }

    /// Opens each of the named recorded `values` in place; whether any was
    /// recorded in the clear (by a release before they were sealed: to be sealed
    /// now), or the name of the first that cannot be opened, and why.
    pub fn open_all<'a>(
        &self,
        values: impl IntoIterator<Item = (&'a str, &'a mut String)>,
    ) -> Result<bool, (&'a str, SealError)> {
        let mut plain = false;
        for (name, v) in values {
            if Self::is_sealed(v) {
                *v = self.unseal(v).map_err(|e| (name, e))?;
            } else {
                plain = true;
            }
        }
        Ok(plain)
    }

    /// The secret in `sealed`.
    pub fn unseal(&self, sealed: &str) -> Result<String, SealError> {
        let raw = sealed
            .strip_prefix(SEALED)
            .and_then(|h| hex::decode(h).ok())
            .filter(|r| r.len() > NONCE_LEN)
            .ok_or(SealError::Damaged)?;
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Damaged)?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .map_err(|_| SealError::Damaged)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Damaged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_another_key_cannot_open_them() {
        let d = tempfile::tempdir().unwrap();
        let s = Sealer::open_or_create(&d.path().join("site.key")).unwrap();
        let sealed = s.seal("agent-secret-0123456789");
        assert!(Sealer::is_sealed(&sealed) && !sealed.contains("agent-secret"));
        assert_ne!(sealed, s.seal("agent-secret-0123456789"), "nonces differ");
        assert_eq!(s.unseal(&sealed).unwrap(), "agent-secret-0123456789");
        let again = Sealer::open_or_create(&d.path().join("site.key")).unwrap();
        assert_eq!(again.unseal(&sealed).unwrap(), "agent-secret-0123456789");
        let other = Sealer::open_or_create(&d.path().join("other.key")).unwrap();
        assert!(other.unseal(&sealed).is_err());
        let mut bad = sealed.clone();
        bad.pop();
        bad.push('0');
        assert!(s.unseal(&bad).is_err() || bad == sealed);
    }
}
