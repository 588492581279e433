//! TLS (rustls, ring) for the site, the agents, the CLI and plugins' outgoing HTTP.
//! A server presents a certificate from PEM files; a client verifies the server by a
//! pinned SHA-256
//! fingerprint of its certificate (self-signed certificates, as `gve up` makes)
//! or by a CA; mutual TLS is a server's list of client certificate fingerprints it
//! accepts, each client presenting its own certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A TLS setup that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("{what} {path}: {message}")]
    File {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// rustls refused the setup.
    #[error("TLS: {0}")]
    Rustls(String),
    /// A fingerprint is not 64 hex digits.
    #[error("fingerprint '{0}' must be the SHA-256 of a certificate: 64 hex digits")]
    Fingerprint(String),
    /// A client certificate without its key, or a key without its certificate.
    #[error("a client certificate needs its key and a key its certificate: give both or neither")]
    HalfIdentity,
}

/// A server's TLS (`[tls]` in the site's and agent's config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// Certificate chain (PEM) the server presents.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Mutual TLS: SHA-256 fingerprints of the client certificates accepted; a
    /// client without one of them cannot connect. Empty: no client certificate.
    #[serde(default)]
    pub client_fingerprints: Vec<String>,
}

/// How a client verifies the server it calls, and what it presents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClientTls {
    /// The SHA-256 fingerprint of the server's certificate.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// A CA certificate (PEM) the server's certificate must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// A certificate (PEM) to present (mutual TLS), with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SHA-256 fingerprint (lower-case hex) of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// `f` normalized (an optional `sha256:` prefix dropped, lower-case, `:` removed),
/// or why it is no fingerprint.
pub fn normalize_fingerprint(f: &str) -> Result<String, TlsError> {
    let bare = f
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("sha256:"))
        .map_or(f, |_| &f[7..]);
    let n: String = bare
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_lowercase();
    if n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(n)
    } else {
        Err(TlsError::Fingerprint(f.to_string()))
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |message: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file(e.to_string()))?;
    if certs.is_empty() {
        return Err(file("no certificate in it".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "private key",
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The fingerprint of the first certificate in a PEM file.
pub fn file_fingerprint(path: &Path) -> Result<String, TlsError> {
    Ok(fingerprint(&certs("certificate", path)?[0]))
}

impl TlsConfig {
    /// The rustls server configuration.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain = certs("certificate", &self.cert)?;
        let key = key(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = if self.client_fingerprints.is_empty() {
            builder.with_no_client_auth()
        } else {
            let pins = self
                .client_fingerprints
                .iter()
                .map(|f| normalize_fingerprint(f))
                .collect::<Result<Vec<_>, _>>()?;
            builder.with_client_cert_verifier(Arc::new(PinnedClients {
                pins,
                provider: provider(),
            }))
        };
        let mut cfg = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ClientTls {
    /// A client certificate comes with its key and a key with its certificate
    /// (checked where a config is read, and again when a client is made).
    pub fn check_identity(&self) -> Result<(), TlsError> {
        if self.cert.is_some() == self.key.is_some() {
            Ok(())
        } else {
            Err(TlsError::HalfIdentity)
        }
    }

    /// The rustls client configuration: verified by fingerprint or CA (one is
    /// needed for `https://`; with neither, every server is refused).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match (&self.fingerprint, &self.ca) {
            (Some(f), _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedServer {
                    pin: normalize_fingerprint(f)?,
                    provider: provider(),
                })),
            (None, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs("CA certificate", ca)? {
                    roots.add(c).map_err(|e| TlsError::Rustls(e.to_string()))?;
                }
                builder.with_root_certificates(roots)
            }
            (None, None) => builder.with_root_certificates(rustls::RootCertStore::empty()),
        };
        self.check_identity()?;
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs("client certificate", c)?, key(k)?)
                .map_err(|e| TlsError::Rustls(e.to_string())),
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// Accepts exactly the server certificate whose fingerprint is pinned.
#[derive(Debug)]
struct PinnedServer {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            // A certificate error (not a general one), so callers can tell an
            // untrusted server from a broken handshake.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(std::sync::Arc::new(
                    PinMismatch {
                        got,
                        pin: self.pin.clone(),
                    },
                ))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Accepts client certificates whose fingerprints are listed.
#[derive(Debug)]
struct PinnedClients {
    pins: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.pins.contains(&fingerprint(end_entity)) {
            Ok(ClientCertVerified::assertion())
        } else {
            // The `access_denied` alert: a valid certificate the server's access
            // control refuses (the client can tell it from other failures).
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Makes a self-signed certificate for `names` (host names and IP addresses) as
/// `dir/<stem>.pem` and `dir/<stem>.key` (0600), unless they exist; returns their
/// paths and the certificate's fingerprint.
pub fn self_signed(
    dir: &Path,
    stem: &str,
    names: &[&str],
) -> Result<(PathBuf, PathBuf, String), TlsError> {
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    let io = |what: &'static str, path: &Path, e: std::io::Error| TlsError::File {
        what,
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    if !(cert.is_file() && key.is_file()) {
        crate::private_fs::private_dir(dir).map_err(|e| io("directory", dir, e))?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let made = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        crate::private_fs::write_private(&key, made.key_pair.serialize_pem().as_bytes())
            .map_err(|e| io("private key", &key, e))?;
        crate::private_fs::write_private(&cert, made.cert.pem().as_bytes())
            .map_err(|e| io("certificate", &cert, e))?;
    }
    let f = file_fingerprint(&cert)?;
    Ok((cert, key, f))
}

/// A server certificate that is not the pinned one.
#[derive(thiserror::Error)]
#[error("the server's certificate has fingerprint {got}, not the pinned {pin}")]
struct PinMismatch {
    got: String,
    pin: String,
}

// rustls shows the cause of a certificate error with `Debug`: say it in words.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_taken_in_the_usual_spellings() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        for f in [
            hex.clone(),
            colons.clone(),
            format!("sha256:{hex}"),
            format!("SHA256:{colons}"),
        ] {
            assert_eq!(normalize_fingerprint(&f).unwrap(), hex, "{f}");
        }
        for bad in ["", "sha256:", "sha1:abcd", &hex[..62], &format!("{hex}00")] {
            assert!(normalize_fingerprint(bad).is_err(), "{bad}");
        }
    }
}
