//! Simulated users: accounts registered, verified and logged in through the
//! real protocol, as agentd does it.
//!
//! One RSA key serves every simulated user (made once: key generation would
//! otherwise dominate the set-up). The relay stores each account's key
//! without comparing it with others', so this changes none of its work.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use securechat_client::relay::{ClientError, RelayClient};
use securechat_common::crypto::IdentityKey;
use securechat_common::envelope::{seal, SealParams};
use securechat_common::protocol::{ErrorCode, Request, Response};
use securechat_common::{Envelope, MessageId, PublicKey};
use totp_rs::TOTP;
use zeroize::Zeroizing;

use crate::target::Target;

/// One simulated user.
pub struct User {
    /// Username.
    pub name: String,
    password: String,
    totp: Option<TOTP>,
    /// The session token of the last full login.
    pub token: Option<Zeroizing<Vec<u8>>>,
}

/// The identity every simulated user shares.
pub struct Identity {
    /// The private key.
    pub key: IdentityKey,
    /// Its public half.
    pub public: PublicKey,
}

impl Identity {
    /// Make the shared key (RSA-2048: the smallest the relay accepts).
    pub fn generate() -> anyhow::Result<Arc<Self>> {
        let key = IdentityKey::generate(securechat_common::crypto::KeySize::Rsa2048)?;
        let public = PublicKey::from_der(key.public_key().as_der())?;
        Ok(Arc::new(Self { key, public }))
    }
}

impl User {
    /// A user named `name` (not registered yet).
    pub fn new(name: String) -> Self {
        Self {
            password: format!("bench password of {name}"),
            name,
            totp: None,
            token: None,
        }
    }

    /// Register, wait for the mailed code, verify.
    pub async fn register(
        &mut self,
        client: &RelayClient,
        target: &Target,
        id: &Identity,
    ) -> anyhow::Result<()> {
        let req = Request::Register {
            username: self.name.clone(),
            email: format!("{}@bench.invalid", self.name),
            password: Zeroizing::new(self.password.clone()),
            public_key: id.key.public_key().as_der().to_vec(),
        };
        match call_retrying(client, &req).await? {
            Response::RegisterPending { .. } => {}
            other => bail!("register {}: unexpected {other:?}", self.name),
        }
        let code = target.code_for(&self.name, Duration::from_secs(30)).await?;
        let req = Request::Verify {
            username: self.name.clone(),
            code: Zeroizing::new(code),
        };
        let Response::Verified { otpauth_uri, .. } = call_retrying(client, &req).await? else {
            bail!("verify {}: unexpected answer", self.name);
        };
        self.totp = Some(TOTP::from_url(otpauth_uri.as_str()).context("the otpauth URI")?);
        Ok(())
    }

    /// Full multi-factor login (password, TOTP code, signature over the
    /// relay's challenge); keeps the session token.
    pub async fn login(&mut self, client: &RelayClient, id: &Identity) -> anyhow::Result<()> {
        let totp = self.totp.as_ref().context("not verified")?;
        let code = totp.generate(unix_now() / 1000);
        let logged = loop {
            match client
                .login(&self.name, &self.password, &code, &id.key)
                .await
            {
                Err(ClientError::Relay(r)) if r.code == ErrorCode::Busy => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => break other.with_context(|| format!("login {}", self.name))?,
            }
        };
        self.token = logged.token;
        Ok(())
    }

    /// Resume the session on a new connection.
    pub async fn resume(&self, client: &RelayClient, id: &Identity) -> anyhow::Result<()> {
        let token = self.token.as_ref().context("no session to resume")?;
        client
            .resume(&self.name, token, &id.key)
            .await
            .with_context(|| format!("resume {}", self.name))?;
        Ok(())
    }
}

/// A call, repeated while the relay answers "busy" (its password-check
/// queue is full: the bench registers many users at once).
async fn call_retrying(client: &RelayClient, req: &Request) -> anyhow::Result<Response> {
    loop {
        match client.call(req).await {
            Err(ClientError::Relay(r)) if r.code == ErrorCode::Busy => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other?),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A real envelope from `sender` to `recipient` with a `size`-byte body;
/// [`Template::next`] gives copies under fresh ids.
///
/// The relay does not check signatures (agents do), so a copy under a new id
/// costs it exactly what a freshly sealed message would, while sealing one
/// per message would make the bench measure RSA instead of the relay.
pub struct Template {
    envelope: Envelope,
}

impl Template {
    /// Seal one envelope.
    pub fn seal(id: &Identity, sender: &str, recipient: &str, size: usize) -> anyhow::Result<Self> {
        let body = vec![b'x'; size];
        let envelope = seal(
            &SealParams {
                sender_key: &id.key,
                sender,
                recipient,
                recipient_key: &id.public,
                id: MessageId::random()?,
                seq: 1,
                timestamp_ms: unix_now(),
            },
            &body,
        )?;
        Ok(Self { envelope })
    }

    /// A copy under a fresh id.
    pub fn next(&self) -> anyhow::Result<Envelope> {
        let mut e = self.envelope.clone();
        e.id = MessageId::random()?;
        Ok(e)
    }

    /// The envelope's size on the wire (what the relay stores).
    pub fn wire_len(&self) -> usize {
        postcard::to_stdvec(&self.envelope).map_or(0, |v| v.len())
    }
}
