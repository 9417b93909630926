//! Clients that come from another address: a QUIC connection bound to a
//! chosen loopback address (any of 127.0.0.0/8 on Linux), so the relay sees
//! it as a different source for its per-source limits.
//!
//! agentd's [`RelayClient`](securechat_agentd::relay_client::RelayClient)
//! always binds the unspecified address; this is the same protocol with a
//! chosen local address and only what the tests need: raw requests, a
//! password login and a session resume.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use securechat_agentd::relay_client::ClientError;
use securechat_common::codec;
use securechat_common::crypto::{login_transcript, IdentityKey, LoginPurpose};
use securechat_common::limits::MAX_FRAME_LEN;
use securechat_common::protocol::{Request, Response, ALPN, BINDING_LEN, EXPORTER_LABEL};
use zeroize::Zeroizing;

use crate::relay::TestRelay;

/// One QUIC connection to a [`TestRelay`] from a chosen local address.
#[derive(Debug)]
pub struct SourceClient {
    // Kept so the UDP socket lives as long as the connection.
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl SourceClient {
    /// Connect to `relay` from `local` (e.g. `127.0.0.2`), trusting the
    /// relay's self-signed certificate from its data directory.
    pub async fn connect(relay: &TestRelay, local: IpAddr) -> anyhow::Result<Self> {
        let cert_path = relay.data_dir().join("tls").join("cert.pem");
        let pem = std::fs::read(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(local, 0))
            .with_context(|| format!("binding a UDP socket on {local}"))?;
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(relay.addr(), "localhost")?
            .await
            .with_context(|| format!("connecting to the test relay from {local}"))?;
        Ok(Self {
            _endpoint: endpoint,
            conn,
        })
    }

    /// The QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Send one request and read the answer; an error reply is
    /// `Err(ClientError::Relay(..))`, as with agentd's client.
    pub async fn call(&self, req: &Request) -> Result<Response, ClientError> {
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
        match codec::decode::<Response>(&bytes)? {
            Response::Error(reply) => Err(ClientError::Relay(reply)),
            other => Ok(other),
        }
    }

    /// A challenge signed by `key` for `purpose`, bound to this connection.
    pub async fn sign_challenge(
        &self,
        purpose: LoginPurpose,
        username: &str,
        key: &IdentityKey,
    ) -> Result<Vec<u8>, ClientError> {
        let nonce = match self.call(&Request::Challenge).await? {
            Response::Challenge { nonce } => nonce,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        let mut binding = [0u8; BINDING_LEN];
        self.conn
            .export_keying_material(&mut binding, EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Stream("TLS keying-material export failed".into()))?;
        let transcript = login_transcript(purpose, username, &nonce, &binding);
        Ok(key.sign(&transcript)?)
    }

    /// A full login attempt with these factors.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        totp: &str,
        key: &IdentityKey,
    ) -> Result<Response, ClientError> {
        let signature = self
            .sign_challenge(LoginPurpose::Login, username, key)
            .await?;
        self.call(&Request::Login {
            username: username.into(),
            password: Zeroizing::new(password.into()),
            totp: Zeroizing::new(totp.into()),
            signature,
        })
        .await
    }

    /// A session resume with `token`.
    pub async fn resume(
        &self,
        username: &str,
        token: &[u8],
        key: &IdentityKey,
    ) -> Result<Response, ClientError> {
        let signature = self
            .sign_challenge(LoginPurpose::Resume, username, key)
            .await?;
        self.call(&Request::Resume {
            username: username.into(),
            token: Zeroizing::new(token.to_vec()),
            signature,
        })
        .await
    }
}
