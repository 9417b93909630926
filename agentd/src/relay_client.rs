//! QUIC client for the relay protocol.
//!
//! One [`RelayClient`] is one QUIC connection. Each [`Request`] runs on its own
//! bidirectional stream (write one frame, finish, read one frame); pushes
//! arrive on the single unidirectional stream the relay opens after a login,
//! read through [`PushStream`]. See `securechat_common::protocol` for the flow.
//!
//! The relay's certificate is trusted either by pinning the SHA-256 of its
//! DER encoding ([`ServerTrust::Fingerprint`], for the self-signed certificate
//! a relay makes on first start) or through a CA certificate
//! ([`ServerTrust::CaCert`], for a relay with a proper certificate).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use securechat_common::codec::{self, CodecError, FrameCodec};
use securechat_common::crypto::{login_transcript, sha256, CryptoError, IdentityKey, LoginPurpose};
use securechat_common::limits::MAX_FRAME_LEN;
use securechat_common::protocol::{
    ErrorReply, Push, Request, Response, ALPN, BINDING_LEN, EXPORTER_LABEL,
};
use tokio_util::codec::FramedRead;
use zeroize::Zeroizing;

/// Server name used in the TLS handshake when the certificate is pinned by
/// fingerprint (the name is then not what is checked).
pub const PINNED_SERVER_NAME: &str = "securechat-relay";

/// Why talking to the relay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The relay address or TLS settings are unusable.
    #[error("invalid relay settings: {0}")]
    Config(String),
    /// Connecting (UDP socket, QUIC or TLS handshake) failed.
    #[error("cannot connect to the relay at {addr}: {reason}")]
    Connect {
        /// Where we tried.
        addr: SocketAddr,
        /// What went wrong (a certificate mismatch shows up here).
        reason: String,
    },
    /// The connection was lost or closed by the relay.
    #[error("relay connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream failed mid-request.
    #[error("relay stream failed: {0}")]
    Stream(String),
    /// A frame from the relay could not be decoded.
    #[error("bad frame from the relay: {0}")]
    Codec(#[from] CodecError),
    /// The relay answered with an error.
    #[error("relay refused: {0}")]
    Relay(ErrorReply),
    /// The relay answered something that does not fit the request.
    #[error("unexpected answer from the relay: {0}")]
    Unexpected(String),
    /// Signing or key handling failed locally.
    #[error("crypto failure: {0}")]
    Crypto(#[from] CryptoError),
}

/// How the relay's TLS certificate is trusted.
#[derive(Clone, Debug)]
pub enum ServerTrust {
    /// Accept exactly the certificate whose DER encoding has this SHA-256.
    Fingerprint([u8; 32]),
    /// Verify the certificate chain and name against these CA certificates.
    CaCert(Vec<CertificateDer<'static>>),
}

/// Parse a certificate fingerprint as printed by `relay fingerprint`:
/// 64 hex digits, optionally prefixed with `sha256:` and split by spaces or
/// colons.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], ClientError> {
    securechat_common::crypto::Fingerprint::parse(text)
        .map(|f| f.0)
        .ok_or_else(|| {
            ClientError::Config(format!(
                "relay fingerprint {text:?} is not 64 hex digits (see `relay fingerprint`)"
            ))
        })
}

/// Read CA certificates from PEM text.
pub fn parse_ca_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Config(format!("relay certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Config(
            "relay certificate file holds no PEM certificate".into(),
        ));
    }
    Ok(certs)
}

/// What a successful login or resume returned.
pub struct LoggedIn {
    /// The account name.
    pub username: String,
    /// A new session token (full login only).
    pub token: Option<Zeroizing<Vec<u8>>>,
    /// Unix seconds when the session expires.
    pub session_expires_unix: u64,
    /// Messages waiting on the relay.
    pub unread: u64,
}

impl std::fmt::Debug for LoggedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedIn")
            .field("username", &self.username)
            .field("unread", &self.unread)
            .finish_non_exhaustive()
    }
}

/// One QUIC connection to a relay.
#[derive(Debug)]
pub struct RelayClient {
    // Kept so the UDP socket lives as long as the connection.
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl RelayClient {
    /// Connect and complete the TLS handshake.
    pub async fn connect(addr: SocketAddr, trust: ServerTrust) -> Result<Self, ClientError> {
        Self::connect_named(addr, PINNED_SERVER_NAME, trust).await
    }

    /// Connect, presenting `server_name` (checked with [`ServerTrust::CaCert`]).
    pub async fn connect_named(
        addr: SocketAddr,
        server_name: &str,
        trust: ServerTrust,
    ) -> Result<Self, ClientError> {
        let connect_err = |reason: String| ClientError::Connect { addr, reason };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let mut tls = match trust {
            ServerTrust::Fingerprint(fp) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert { fp, provider }))
                .with_no_client_auth(),
            ServerTrust::CaCert(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| ClientError::Config(format!("relay CA certificate: {e}")))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic =
            QuicClientConfig::try_from(tls).map_err(|e| ClientError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        // Keep-alives hold NAT bindings open and let both sides notice a dead
        // peer within the idle timeout.
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(20))
                .map_err(|e| ClientError::Config(e.to_string()))?,
        ));
        config.transport_config(Arc::new(transport));

        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| connect_err(format!("UDP socket: {e}")))?;
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(addr, server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        Ok(Self { endpoint, conn })
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Send one request and read its response (an error reply is returned
    /// as `Ok(Response::Error(..))`).
    pub async fn request(&self, req: &Request) -> Result<Response, ClientError> {
        let frame = codec::encode(req)?;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(&frame)
            .await
            .map_err(|e| ClientError::Stream(e.to_string()))?;
        send.finish()
            .map_err(|e| ClientError::Stream(e.to_string()))?;
        let bytes = recv
            .read_to_end(MAX_FRAME_LEN + 4)
            .await
            .map_err(|e| ClientError::Stream(e.to_string()))?;
        Ok(codec::decode::<Response>(&bytes)?)
    }

    /// Like [`request`](Self::request), with an error reply as `Err`.
    pub async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        match self.request(req).await? {
            Response::Error(e) => Err(ClientError::Relay(e)),
            other => Ok(other),
        }
    }

    /// Keying material exported from this connection's TLS session; the
    /// relay computes the same bytes, which ties a login signature to it.
    pub fn tls_binding(&self) -> Result<[u8; BINDING_LEN], ClientError> {
        let mut out = [0u8; BINDING_LEN];
        self.conn
            .export_keying_material(&mut out, EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Stream("TLS keying-material export failed".into()))?;
        Ok(out)
    }

    /// Fetch a fresh challenge and sign its transcript with `key`.
    pub async fn sign_challenge(
        &self,
        purpose: LoginPurpose,
        username: &str,
        key: &IdentityKey,
    ) -> Result<Vec<u8>, ClientError> {
        let nonce = match self.call(&Request::Challenge).await? {
            Response::Challenge { nonce } => nonce,
            other => return Err(unexpected("Challenge", &other)),
        };
        let transcript = login_transcript(purpose, username, &nonce, &self.tls_binding()?);
        Ok(key.sign(&transcript)?)
    }

    /// Full multi-factor login: password, TOTP code and a signature by `key`.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        totp: &str,
        key: &IdentityKey,
    ) -> Result<LoggedIn, ClientError> {
        let signature = self
            .sign_challenge(LoginPurpose::Login, username, key)
            .await?;
        let req = Request::Login {
            username: username.to_string(),
            password: Zeroizing::new(password.to_string()),
            totp: Zeroizing::new(totp.to_string()),
            signature,
        };
        logged_in(self.call(&req).await?)
    }

    /// Resume a session with the token from an earlier login.
    pub async fn resume(
        &self,
        username: &str,
        token: &[u8],
        key: &IdentityKey,
    ) -> Result<LoggedIn, ClientError> {
        let signature = self
            .sign_challenge(LoginPurpose::Resume, username, key)
            .await?;
        let req = Request::Resume {
            username: username.to_string(),
            token: Zeroizing::new(token.to_vec()),
            signature,
        };
        logged_in(self.call(&req).await?)
    }

    /// Publish `new_key` as the account key (needs a fresh full login on
    /// this connection); the new key signs a challenge to prove possession.
    pub async fn publish_key(
        &self,
        username: &str,
        new_key: &IdentityKey,
    ) -> Result<(), ClientError> {
        let signature = self
            .sign_challenge(LoginPurpose::PublishKey, username, new_key)
            .await?;
        let req = Request::PublishKey {
            public_key: new_key.public_key().as_der().to_vec(),
            signature,
        };
        match self.call(&req).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected("Ok", &other)),
        }
    }

    /// Wait for the push stream the relay opens after a login.
    pub async fn accept_pushes(&self) -> Result<PushStream, ClientError> {
        let recv = self.conn.accept_uni().await?;
        Ok(PushStream {
            frames: FramedRead::new(recv, FrameCodec::new()),
        })
    }

    /// Resolves when the connection is closed, with the reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// Close the connection with a reason and wait briefly for the relay to
    /// see it.
    pub async fn close(&self, reason: &str) {
        self.conn.close(0u32.into(), reason.as_bytes());
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

fn unexpected(wanted: &str, got: &Response) -> ClientError {
    ClientError::Unexpected(format!("wanted {wanted}, got {got:?}"))
}

fn logged_in(resp: Response) -> Result<LoggedIn, ClientError> {
    match resp {
        Response::LoggedIn {
            username,
            token,
            session_expires_unix,
            unread,
        } => Ok(LoggedIn {
            username,
            token,
            session_expires_unix,
            unread,
        }),
        other => Err(unexpected("LoggedIn", &other)),
    }
}

/// The relay's push stream.
#[derive(Debug)]
pub struct PushStream {
    frames: FramedRead<quinn::RecvStream, FrameCodec<Push>>,
}

impl PushStream {
    /// The next push; `None` when the relay finished the stream.
    pub async fn next(&mut self) -> Option<Result<Push, ClientError>> {
        self.frames.next().await.map(|r| r.map_err(Into::into))
    }
}

/// Accepts exactly one certificate, identified by the SHA-256 of its DER.
#[derive(Debug)]
struct PinnedCert {
    fp: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = sha256(end_entity.as_ref());
        if aws_lc_rs::constant_time::verify_slices_are_equal(&seen, &self.fp).is_ok() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "relay certificate sha256:{} does not match the pinned sha256:{}",
                hex::encode(seen),
                hex::encode(self.fp)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The client config allows TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_forms() {
        let hex64 = "ab".repeat(32);
        let want = [0xab; 32];
        assert_eq!(parse_fingerprint(&hex64).unwrap(), want);
        assert_eq!(parse_fingerprint(&format!("sha256:{hex64}")).unwrap(), want);
        let grouped: Vec<String> = hex64
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        assert_eq!(parse_fingerprint(&grouped.join(" ")).unwrap(), want);
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}
