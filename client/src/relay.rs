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
//! ([`ServerTrust::CaCert`], for a relay with a proper certificate). A
//! refused certificate is its own error, [`ClientError::CertificateRejected`]
//! with a typed [`CertRejection`], apart from a relay that cannot be reached
//! ([`ClientError::Connect`]): the first needs a person to check the relay,
//! the second only time.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
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
    /// The relay could not be reached: no UDP socket, no answer in time, or
    /// a handshake that failed for another reason than the relay's
    /// certificate (that is [`ClientError::CertificateRejected`]).
    #[error("cannot connect to the relay at {addr}: {reason}")]
    Connect {
        /// Where we tried.
        addr: SocketAddr,
        /// What went wrong.
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
    /// The relay answered, but its TLS certificate was refused in the
    /// handshake (not the pinned one, not issued by the trusted CA, or not
    /// valid for the name); nothing was sent.
    #[error("refused the certificate of the relay at {addr}: {rejection}")]
    CertificateRejected {
        /// Where we tried.
        addr: SocketAddr,
        /// What was wrong with the certificate.
        rejection: CertRejection,
    },
    /// The relay refused the connection before the handshake: it holds as
    /// many connections as it is allowed to.
    #[error("the relay at {addr} refused the connection (it is at its connection limit)")]
    Refused {
        /// Where we tried.
        addr: SocketAddr,
    },
}

/// Why the relay's TLS certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertRejection {
    /// The certificate is not the pinned one ([`ServerTrust::Fingerprint`]).
    #[error(
        "the relay presented certificate sha256:{}, which does not match the pinned sha256:{}",
        hex::encode(presented),
        hex::encode(expected)
    )]
    PinMismatch {
        /// The pinned SHA-256.
        expected: [u8; 32],
        /// The SHA-256 of the certificate the relay presented.
        presented: [u8; 32],
    },
    /// The certificate is not signed by a trusted CA ([`ServerTrust::CaCert`]):
    /// none of them issued it, or the one it names as issuer did not sign it.
    #[error("the relay's certificate is not signed by the trusted CA")]
    UnknownIssuer,
    /// The certificate does not carry the name the relay was reached by.
    #[error(
        "the relay's certificate is not valid for {expected} (it names: {})",
        names(presented)
    )]
    NameMismatch {
        /// The name we asked for (the host given in `--relay`).
        expected: String,
        /// The names in the certificate, when known.
        presented: Vec<String>,
    },
    /// Anything else wrong with the certificate: expired, not yet valid,
    /// badly signed or encoded.
    #[error("the relay's certificate is not acceptable: {0}")]
    Invalid(String),
}

fn names(presented: &[String]) -> String {
    if presented.is_empty() {
        "no name we could read".into()
    } else {
        presented.join(", ")
    }
}

impl CertRejection {
    /// The typed reason behind a verifier's refusal of the certificate
    /// presented for `server_name`.
    fn from_rustls(e: &rustls::Error, server_name: &ServerName<'_>) -> Self {
        let rustls::Error::InvalidCertificate(cert) = e else {
            return Self::Invalid(e.to_string());
        };
        match cert {
            CertificateError::Other(other) => other
                .0
                .downcast_ref::<CertRejection>()
                .cloned()
                .unwrap_or_else(|| Self::Invalid(e.to_string())),
            // A bad signature in the chain: a CA by the trusted one's name,
            // but not its key.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::UnknownIssuer,
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => Self::NameMismatch {
                expected: expected.to_str().into_owned(),
                presented: presented.clone(),
            },
            CertificateError::NotValidForName => Self::NameMismatch {
                expected: server_name.to_str().into_owned(),
                presented: Vec::new(),
            },
            _ => Self::Invalid(e.to_string()),
        }
    }
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
    // Whether the endpoint is this connection's alone (then closing waits
    // for it to go idle, so the relay hears the close).
    owns_endpoint: bool,
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
        Self::connect_from(any_local_for(addr), addr, server_name, trust).await
    }

    /// As [`RelayClient::connect_named`], from the local address `bind` (tests
    /// use other loopback addresses to appear as other sources).
    pub async fn connect_from(
        bind: SocketAddr,
        addr: SocketAddr,
        server_name: &str,
        trust: ServerTrust,
    ) -> Result<Self, ClientError> {
        let endpoint = client_endpoint(bind).map_err(|e| ClientError::Connect {
            addr,
            reason: format!("UDP socket: {e}"),
        })?;
        let mut client = Self::connect_via(&endpoint, addr, server_name, trust).await?;
        client.owns_endpoint = true;
        Ok(client)
    }

    /// Connect through an existing client `endpoint` (one UDP socket), which
    /// may carry many connections: a load generator holding thousands of
    /// sessions would otherwise hold a socket and an endpoint driver each.
    pub async fn connect_via(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        trust: ServerTrust,
    ) -> Result<Self, ClientError> {
        let connect_err = |reason: String| ClientError::Connect { addr, reason };
        // A config per connection, so a refusal is recorded for this one.
        let refused = Arc::new(Mutex::new(None));
        let config = client_config(trust, refused.clone())?;
        let conn = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| match (take_refusal(&refused), e) {
                (Some(rejection), _) => ClientError::CertificateRejected { addr, rejection },
                (None, quinn::ConnectionError::ConnectionClosed(c))
                    if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                {
                    ClientError::Refused { addr }
                }
                (None, e) => connect_err(e.to_string()),
            })?;
        Ok(Self {
            endpoint: endpoint.clone(),
            owns_endpoint: false,
            conn,
        })
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
        let req = self.login_request(username, password, totp, key).await?;
        logged_in(self.call(&req).await?)
    }

    /// The `Login` request [`login`](Self::login) sends, signed over a fresh
    /// challenge of this connection.
    pub async fn login_request(
        &self,
        username: &str,
        password: &str,
        totp: &str,
        key: &IdentityKey,
    ) -> Result<Request, ClientError> {
        let signature = self
            .sign_challenge(LoginPurpose::Login, username, key)
            .await?;
        Ok(Request::Login {
            username: username.to_string(),
            password: Zeroizing::new(password.to_string()),
            totp: Zeroizing::new(totp.to_string()),
            signature,
        })
    }

    /// Resume a session with the token from an earlier login.
    pub async fn resume(
        &self,
        username: &str,
        token: &[u8],
        key: &IdentityKey,
    ) -> Result<LoggedIn, ClientError> {
        let req = self.resume_request(username, token, key).await?;
        logged_in(self.call(&req).await?)
    }

    /// The `Resume` request [`resume`](Self::resume) sends, signed over a
    /// fresh challenge of this connection.
    pub async fn resume_request(
        &self,
        username: &str,
        token: &[u8],
        key: &IdentityKey,
    ) -> Result<Request, ClientError> {
        let signature = self
            .sign_challenge(LoginPurpose::Resume, username, key)
            .await?;
        Ok(Request::Resume {
            username: username.to_string(),
            token: Zeroizing::new(token.to_vec()),
            signature,
        })
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
        // A shared endpoint keeps running and sends the close on its own;
        // waiting for it to go idle would wait for every other connection.
        if self.owns_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
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

/// The local address to bind to reach `peer`: any interface, a free port,
/// the peer's address family.
pub fn any_local_for(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// A client endpoint (one UDP socket) bound to `bind`, for
/// [`RelayClient::connect_via`]: port 0 picks a free one.
pub fn client_endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::client(bind)
}

/// The QUIC and TLS settings of one connection: TLS 1.3 only, the relay's
/// certificate checked as `trust` says, a refusal recorded in `refused`.
fn client_config(
    trust: ServerTrust,
    refused: Arc<Mutex<Option<CertRejection>>>,
) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        ServerTrust::Fingerprint(fp) => Arc::new(PinnedCert {
            fp,
            provider: provider.clone(),
        }),
        ServerTrust::CaCert(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| ClientError::Config(format!("relay CA certificate: {e}")))?;
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| ClientError::Config(format!("relay CA certificate: {e}")))?
        }
    };
    // Either verifier, wrapped only to keep the typed reason of a refusal
    // (quinn reports a failed handshake as text).
    let mut tls = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RecordRefusal {
            inner: verifier,
            refused,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Config(e.to_string()))?;
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
    Ok(config)
}

fn take_refusal(slot: &Mutex<Option<CertRejection>>) -> Option<CertRejection> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Delegates to `inner` and keeps the typed reason when it refuses the
/// relay's certificate.
#[derive(Debug)]
struct RecordRefusal {
    inner: Arc<dyn ServerCertVerifier>,
    refused: Arc<Mutex<Option<CertRejection>>>,
}

impl ServerCertVerifier for RecordRefusal {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(CertRejection::from_rustls(e, server_name));
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
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
            let refusal = CertRejection::PinMismatch {
                expected: self.fp,
                presented: seen,
            };
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(refusal)),
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
