//! # securechat-testkit
//!
//! Shared helpers for the integration tests, built from real parts only:
//!
//! ```text
//!  SmtpServer ── mailin-embedded thread (plain, STARTTLS or smtps, test CA)
//!                 ◄── relay mails codes here
//!  TestRelay  ── securechat_relay::Relay on 127.0.0.1:0, temp data dir
//!  TestUser   ── identity key, password, TOTP from the relay's otpauth URI
//!      └─ register / login through agentd's real QUIC RelayClient
//!  SourceClient ── the same protocol from another loopback address
//!  Browser    ── headless Chromium over the DevTools Protocol
//! ```
//!
//! * [`smtp`] — a real SMTP server in-process that keeps the mail it takes.
//! * [`relay`] — an in-process relay that can be stopped and restarted.
//! * [`user`] — test accounts: registration with the mailed code, MFA login.
//! * [`redis`] — a real redis-server on a free loopback port (AOF, fsync always).
//! * [`browser`] — a real headless Chromium: open a page, evaluate
//!   JavaScript, take a screenshot.
//! * [`source`] — a client bound to a chosen loopback address, for
//!   per-source limits.
#![forbid(unsafe_code)]

pub mod browser;
pub mod redis;
pub mod relay;
pub mod smtp;
pub mod source;
pub mod user;

pub use relay::TestRelay;
pub use smtp::{SmtpServer, SmtpTls};
pub use source::SourceClient;
pub use user::TestUser;

pub use user::{close_reason, error_code, refusal};

use std::net::SocketAddr;

use anyhow::Context;
use securechat_client::relay::{PushStream, RelayClient};
use securechat_common::codec;
use securechat_common::limits::MAX_FRAME_LEN;
use securechat_common::protocol::{AckOutcome, Push, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Write raw `bytes` as one request stream (no encoding) and decode the
/// relay's answer: for feeding the relay garbage.
pub async fn raw_request(client: &RelayClient, bytes: &[u8]) -> anyhow::Result<Response> {
    let (mut send, mut recv) = client.connection().open_bi().await?;
    // The relay may stop reading early (oversized frames); its answer counts.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let answer = recv
        .read_to_end(MAX_FRAME_LEN + 4)
        .await
        .context("reading the relay's answer")?;
    Ok(codec::decode::<Response>(&answer)?)
}

/// Acknowledge a pushed message (or notice) as stored; the relay must
/// answer `Ok`.
pub async fn ack_stored(
    client: &RelayClient,
    id: securechat_common::MessageId,
) -> anyhow::Result<()> {
    let req = Request::Ack {
        id,
        outcome: AckOutcome::Stored,
    };
    match client.call(&req).await? {
        Response::Ok => Ok(()),
        other => anyhow::bail!("ack answered {other:?}"),
    }
}

/// The next push from the user's queue (a message or a notice), skipping
/// presence changes, which come whenever someone else logs in or out.
/// Fails if none comes `within`, or the stream ends or breaks first.
pub async fn next_queued(
    pushes: &mut PushStream,
    within: std::time::Duration,
) -> anyhow::Result<Push> {
    tokio::time::timeout(within, async {
        loop {
            match pushes.next().await {
                Some(Ok(Push::Presence { .. })) => continue,
                Some(push) => return Ok(push?),
                None => anyhow::bail!("the push stream ended"),
            }
        }
    })
    .await
    .with_context(|| format!("no queued push within {within:?}"))?
}

/// A minimal HTTP/1.0 GET; returns the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("HTTP answer without a header end")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("HTTP GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}
