//! Test accounts: a key, a password, and the TOTP secret the relay hands out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use securechat_client::relay::{ClientError, LoggedIn, RelayClient};
use securechat_common::crypto::{IdentityKey, KeySize};
use securechat_common::envelope::{seal, SealParams};
use securechat_common::protocol::{ErrorCode, ErrorReply, Request, Response};
use securechat_common::{Envelope, MessageId, PublicKey};
use securechat_relay::clock::Clock;
use totp_rs::TOTP;
use zeroize::Zeroizing;

use crate::smtp::SmtpServer;

/// A test user. Keys are 2048-bit to keep tests fast.
#[derive(Debug)]
pub struct TestUser {
    /// Username.
    pub name: String,
    /// Email address (unique per user).
    pub email: String,
    /// Password.
    pub password: String,
    /// Identity key.
    pub key: IdentityKey,
    /// TOTP generator from the relay's otpauth URI (after verification).
    pub totp: Option<TOTP>,
    /// Last TOTP step used for a successful login.
    last_step: Option<u64>,
    /// The time TOTP codes are made for: the system clock, or the relay's
    /// adjustable one (see [`TestUser::use_clock`]).
    clock: Clock,
    /// The last sequence number sealed (one count for all recipients: the
    /// relay does not look at it).
    seq: std::sync::atomic::AtomicU64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The error code of a failed call, or a description of what came instead.
pub fn error_code(result: Result<Response, ClientError>) -> Result<ErrorCode, String> {
    match result {
        Err(ClientError::Relay(reply)) => Ok(reply.code),
        Err(other) => Err(format!("not a relay error: {other}")),
        Ok(resp) => Err(format!("unexpected success: {resp:?}")),
    }
}

/// The relay's refusal (code and message) of a call, or a description of
/// what came instead.
pub fn refusal(result: Result<Response, ClientError>) -> Result<ErrorReply, String> {
    match result {
        Err(ClientError::Relay(reply)) => Ok(reply),
        Err(other) => Err(format!("not a relay error: {other}")),
        Ok(resp) => Err(format!("unexpected success: {resp:?}")),
    }
}

/// Wait (up to `within`) until the relay closes `conn`, and return the
/// reason it gave.
pub async fn close_reason(conn: &quinn::Connection, within: Duration) -> anyhow::Result<Vec<u8>> {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => Ok(close.reason.to_vec()),
        Ok(other) => bail!("closed, but not by the relay with a reason: {other}"),
        Err(_) => bail!("still open after {within:?}"),
    }
}

impl TestUser {
    /// A new user with a fresh 2048-bit key.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.to_string(),
            email: format!("{name}@securechat.test"),
            password: format!("password of {name}"),
            key: IdentityKey::generate(KeySize::Rsa2048)?,
            totp: None,
            last_step: None,
            clock: Clock::system(),
            seq: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The `Register` request for this user.
    pub fn register_request(&self) -> Request {
        Request::Register {
            username: self.name.clone(),
            email: self.email.clone(),
            password: Zeroizing::new(self.password.clone()),
            public_key: self.key.public_key().as_der().to_vec(),
        }
    }

    /// Register, read the code from `smtp`, verify, and keep the TOTP secret.
    pub async fn register(
        &mut self,
        client: &RelayClient,
        smtp: &SmtpServer,
    ) -> anyhow::Result<()> {
        match client.call(&self.register_request()).await? {
            Response::RegisterPending { .. } => {}
            other => bail!("register: unexpected {other:?}"),
        }
        let code = smtp
            .wait_for_code(&self.email, Duration::from_secs(20))
            .await?;
        self.verify(client, &code).await
    }

    /// Verify with `code` and keep the TOTP secret.
    pub async fn verify(&mut self, client: &RelayClient, code: &str) -> anyhow::Result<()> {
        let resp = client
            .call(&Request::Verify {
                username: self.name.clone(),
                code: Zeroizing::new(code.to_string()),
            })
            .await?;
        let Response::Verified {
            otpauth_uri,
            secret_base32,
        } = resp
        else {
            bail!("verify: unexpected {resp:?}");
        };
        let totp = TOTP::from_url(otpauth_uri.as_str()).context("parsing the otpauth URI")?;
        if totp.get_secret_base32() != *secret_base32 {
            bail!("the otpauth URI and the base32 secret disagree");
        }
        self.totp = Some(totp);
        Ok(())
    }

    /// The TOTP code for a time step.
    pub fn totp_at_step(&self, step: u64) -> anyhow::Result<String> {
        let totp = self.totp.as_ref().context("user is not verified yet")?;
        Ok(totp.generate(step * 30))
    }

    /// The current TOTP step on the system clock.
    pub fn current_step() -> u64 {
        now_unix() / 30
    }

    /// Make TOTP codes for the time of `clock` (the relay's, when the test
    /// moves it) instead of the system clock.
    pub fn use_clock(&mut self, clock: &Clock) {
        self.clock = clock.clone();
    }

    /// The current TOTP step on this user's clock.
    pub fn step_now(&self) -> u64 {
        self.clock.unix_now() / 30
    }

    /// A step not used by an earlier login of this user and within the
    /// relay's ±1 window: the current one, or the next if that was used.
    pub fn fresh_step(&self) -> anyhow::Result<u64> {
        let now = self.step_now();
        let step = match self.last_step {
            Some(last) if last >= now => last + 1,
            _ => now,
        };
        if step > now + 1 {
            bail!("no unused TOTP step left in the window; resume instead of logging in again");
        }
        Ok(step)
    }

    /// Full login (password + fresh TOTP + signature) on `client`.
    pub async fn login(&mut self, client: &RelayClient) -> anyhow::Result<LoggedIn> {
        let step = self.fresh_step()?;
        let code = self.totp_at_step(step)?;
        let logged = client
            .login(&self.name, &self.password, &code, &self.key)
            .await?;
        self.last_step = Some(step);
        Ok(logged)
    }

    /// An envelope from this user to `recipient`, sealed for
    /// `recipient_key` and signed, with a fresh id and the current time.
    pub fn seal_to(
        &self,
        recipient: &str,
        recipient_key: &PublicKey,
        body: &[u8],
    ) -> anyhow::Result<Envelope> {
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(seal(
            &SealParams {
                sender_key: &self.key,
                sender: &self.name,
                recipient,
                recipient_key,
                id: MessageId::random()?,
                seq: self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                timestamp_ms,
            },
            body,
        )?)
    }

    /// Mark a step as used (after a login done by hand).
    pub fn used_step(&mut self, step: u64) {
        self.last_step = Some(step);
    }
}
