//! The relay's TLS identity and QUIC server configuration.
//!
//! Either a certificate chain and key from PEM files (a proper certificate),
//! or a self-signed certificate made on first start and kept in
//! `<data-dir>/tls/{cert,key}.pem` (key mode 0600). Clients pin the SHA-256
//! of the leaf certificate's DER encoding, which [`TlsIdentity::fingerprint`]
//! returns and the relay prints on start.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use securechat_common::crypto::sha256;
use securechat_common::protocol::ALPN;

/// Request streams one connection may have open at once: each may hold a
/// whole request (up to `MAX_FRAME_LEN`) in memory, so this bounds a
/// connection's buffers.
const MAX_REQUEST_STREAMS: u32 = 32;

/// Names the self-signed certificate is valid for.
pub const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "securechat-relay"];

/// Why the TLS identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading or writing a certificate or key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// Where the certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files: the certificate chain (leaf first) and its private key.
    Files {
        /// Certificate chain PEM.
        cert: PathBuf,
        /// Private key PEM (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A self-signed certificate kept in `<data-dir>/tls/`, made if missing.
    SelfSigned,
}

/// A loaded certificate chain and key.
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("fingerprint", &hex::encode(self.fingerprint()))
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Load the configured identity, creating the self-signed one if needed.
    pub fn load_or_create(source: &TlsSource, data_dir: &Path) -> Result<Self, TlsError> {
        match source {
            TlsSource::Files { cert, key } => Self::load(cert, key),
            TlsSource::SelfSigned => {
                let dir = data_dir.join("tls");
                let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
                if !cert.exists() || !key.exists() {
                    generate_self_signed(&dir, &cert, &key)?;
                }
                Self::load(&cert, &key)
            }
        }
    }

    fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_err = |path: &Path, reason: String| TlsError::Pem {
            path: path.to_path_buf(),
            reason,
        };
        let cert_pem = fs::read(cert).map_err(|source| TlsError::Io {
            path: cert.to_path_buf(),
            source,
        })?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_err(cert, "no PEM certificate found".into()));
        }
        let key_pem = fs::read(key).map_err(|source| TlsError::Io {
            path: key.to_path_buf(),
            source,
        })?;
        let key_der =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key, e.to_string()))?;
        Ok(Self {
            chain,
            key: key_der,
        })
    }

    /// SHA-256 of the leaf certificate's DER encoding.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.chain
            .first()
            .map(|c| sha256(c.as_ref()))
            .unwrap_or_default()
    }

    /// A QUIC server configuration: TLS 1.3 only, our ALPN, aws-lc-rs.
    pub fn server_config(&self, idle_timeout: Duration) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle_timeout)
                .map_err(|e| TlsError::Config(e.to_string()))?,
        ));
        // Clients only open request streams; the relay opens the push stream.
        transport.max_concurrent_bidi_streams(MAX_REQUEST_STREAMS.into());
        transport.max_concurrent_uni_streams(0u32.into());
        // A request stream's slot comes back only once the client has
        // acknowledged the response. Left to its default, a client may hold
        // a lone acknowledgement back 25 ms, and a client with more than
        // MAX_REQUEST_STREAMS requests in flight waits that long for each
        // slot: that was the 60 ms tail at 64 in flight. Asking for
        // acknowledgements within 1 ms (ACK_FREQUENCY; quinn clients
        // support it) returns slots within a round trip.
        let mut acks = quinn::AckFrequencyConfig::default();
        acks.max_ack_delay(Some(Duration::from_millis(1)));
        transport.ack_frequency_config(Some(acks));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

fn generate_self_signed(dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| s.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names)?;
    write_private(key, certified.signing_key.serialize_pem().as_bytes()).map_err(io(key))?;
    write_private(cert, certified.cert.pem().as_bytes()).map_err(io(cert))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
    Ok(())
}

/// Write a file readable by its owner only, atomically (temp file + rename).
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = TlsIdentity::load_or_create(&TlsSource::SelfSigned, dir.path()).unwrap();
        let b = TlsIdentity::load_or_create(&TlsSource::SelfSigned, dir.path()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mode = fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        a.server_config(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn missing_files_are_a_clear_error() {
        let err = TlsIdentity::load_or_create(
            &TlsSource::Files {
                cert: "/nonexistent/cert.pem".into(),
                key: "/nonexistent/key.pem".into(),
            },
            Path::new("/tmp"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"));
    }
}
