//! Relay throughput and latency over real QUIC on loopback, with the redb
//! store committing every message:
//!
//! ```sh
//! cargo bench -p securechat-relay --bench throughput
//! ```
//!
//! Envelopes are sealed before the clock starts, so the figures are the
//! relay's (frame decode, checks, durable commit, push, ack), not RSA's.
//! The registration mails go to testkit's in-process SMTP server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use securechat_client::relay::RelayClient;
use securechat_common::protocol::{AckOutcome, Push, Request, Response};
use securechat_common::{Envelope, PublicKey};
use securechat_relay::store::Quota;
use securechat_testkit::relay::test_config;
use securechat_testkit::{SmtpServer, TestRelay, TestUser};

const SEQUENTIAL: usize = 400;
const CONCURRENT: usize = 2000;
const IN_FLIGHT: usize = 64;

fn envelopes(
    from: &TestUser,
    to: &str,
    key: &PublicKey,
    n: usize,
) -> anyhow::Result<Vec<Envelope>> {
    (0..n)
        .map(|i| {
            from.seal_to(
                to,
                key,
                format!("benchmark message {i:06} with a little padding to look like chat")
                    .as_bytes(),
            )
        })
        .collect()
}

async fn send(client: &RelayClient, envelope: Envelope) -> anyhow::Result<Duration> {
    let start = Instant::now();
    match client.call(&Request::Send { envelope }).await? {
        Response::Stored { .. } => Ok(start.elapsed()),
        other => bail!("send: unexpected {other:?}"),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let smtp = SmtpServer::start()?;
    let mut config = test_config(dir.path(), Some(&smtp));
    config.quota = Quota {
        messages: 1_000_000,
        bytes: 1 << 34,
    };
    let relay = TestRelay::start(config).await?;

    let mut alice = TestUser::new("alice")?;
    let mut bob = TestUser::new("bob")?;
    let a = Arc::new(relay.connect().await?);
    let b = relay.connect().await?;
    alice.register(&a, &smtp).await?;
    bob.register(&b, &smtp).await?;
    alice.login(&a).await?;
    let bob_key = PublicKey::from_der(bob.key.public_key().as_der())?;

    // 1. One at a time: each send waits for its durable commit.
    let batch = envelopes(&alice, "bob", &bob_key, SEQUENTIAL)?;
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    for env in batch {
        latencies.push(send(&a, env).await?);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    println!(
        "send, 1 in flight:   {SEQUENTIAL} msgs in {:.2} s = {:>6.0} msg/s  (latency p50 {:.2} ms, p99 {:.2} ms)",
        elapsed.as_secs_f64(),
        SEQUENTIAL as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );

    // 2. Many in flight on one connection (one QUIC stream each).
    let batch = envelopes(&alice, "bob", &bob_key, CONCURRENT)?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = batch.into_iter();
    let mut latencies = Vec::with_capacity(CONCURRENT);
    for env in pending.by_ref().take(IN_FLIGHT) {
        let a = Arc::clone(&a);
        tasks.spawn(async move { send(&a, env).await });
    }
    while let Some(done) = tasks.join_next().await {
        latencies.push(done??);
        if let Some(env) = pending.next() {
            let a = Arc::clone(&a);
            tasks.spawn(async move { send(&a, env).await });
        }
    }
    let elapsed = start.elapsed();
    latencies.sort();
    println!(
        "send, {IN_FLIGHT} in flight:  {CONCURRENT} msgs in {:.2} s = {:>6.0} msg/s  (latency p50 {:.2} ms, p99 {:.2} ms)",
        elapsed.as_secs_f64(),
        CONCURRENT as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );

    // 3. Drain: bob logs in and takes every queued message, acking each.
    let queued = SEQUENTIAL + CONCURRENT;
    let start = Instant::now();
    let logged = bob.login(&b).await?;
    let mut pushes = b.accept_pushes().await?;
    let b = Arc::new(b);
    let mut acks = tokio::task::JoinSet::new();
    let mut received = 0usize;
    while received < queued {
        let push = tokio::time::timeout(Duration::from_secs(60), pushes.next())
            .await
            .context("push stream stalled")?
            .context("push stream ended")??;
        let Push::Deliver { envelope: env, .. } = push else {
            continue;
        };
        received += 1;
        let b = Arc::clone(&b);
        acks.spawn(async move {
            b.call(&Request::Ack {
                id: env.id,
                outcome: AckOutcome::Stored,
            })
            .await
        });
        while acks.len() > IN_FLIGHT {
            if let Some(done) = acks.join_next().await {
                done??;
            }
        }
    }
    while let Some(done) = acks.join_next().await {
        done??;
    }
    let elapsed = start.elapsed();
    println!(
        "drain (push + ack):  {received} msgs in {:.2} s = {:>6.0} msg/s  (unread at login: {})",
        elapsed.as_secs_f64(),
        received as f64 / elapsed.as_secs_f64(),
        logged.unread
    );

    a.close("done").await;
    b.close("done").await;
    relay.stop().await?;
    Ok(())
}
