//! Clients that come from another address: a QUIC connection bound to a
//! chosen loopback address (any of 127.0.0.0/8 on Linux), so the relay sees
//! it as a different source for its per-source limits.
//!
//! agentd's [`RelayClient`] bound to the chosen address, with a login and a
//! resume that hand back the relay's answer as it is (errors included), as
//! the limit tests want to see it.

use std::net::IpAddr;

use anyhow::Context;
use securechat_client::relay::{ClientError, RelayClient, ServerTrust, PINNED_SERVER_NAME};
use securechat_common::crypto::IdentityKey;
use securechat_common::protocol::{Request, Response};

use crate::relay::TestRelay;

/// One QUIC connection to a [`TestRelay`] from a chosen local address.
#[derive(Debug)]
pub struct SourceClient {
    client: RelayClient,
}

impl SourceClient {
    /// Connect to `relay` from `local` (e.g. `127.0.0.2`), pinning the
    /// relay's certificate.
    pub async fn connect(relay: &TestRelay, local: IpAddr) -> anyhow::Result<Self> {
        let client = RelayClient::connect_from(
            (local, 0).into(),
            relay.addr(),
            PINNED_SERVER_NAME,
            ServerTrust::Fingerprint(relay.fingerprint()),
        )
        .await
        .with_context(|| format!("connecting to the test relay from {local}"))?;
        Ok(Self { client })
    }

    /// The QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        self.client.connection()
    }

    /// Send one request and read the answer; an error reply is
    /// `Err(ClientError::Relay(..))`, as with agentd's client.
    pub async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        self.client.call(req).await
    }

    /// A full login attempt with these factors; the relay's answer as it is.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        totp: &str,
        key: &IdentityKey,
    ) -> Result<Response, ClientError> {
        let req = self
            .client
            .login_request(username, password, totp, key)
            .await?;
        self.call(&req).await
    }

    /// A session resume with `token`; the relay's answer as it is.
    pub async fn resume(
        &self,
        username: &str,
        token: &[u8],
        key: &IdentityKey,
    ) -> Result<Response, ClientError> {
        let req = self.client.resume_request(username, token, key).await?;
        self.call(&req).await
    }
}
