//! Relay throughput and latency over real QUIC on loopback, with the redb
//! store committing every message:
//!
//! ```sh
//! cargo bench -p securechat-relay --bench throughput
//! ```
//!
//! Envelopes are sealed before the clock starts, so the figures are the
//! relay's (frame decode, checks, durable commit), not RSA's. Draining a
//! queue is `--bench drain`.
//! The registration mails go to testkit's in-process SMTP server.
//!
//! The relay runs on a runtime of its own (threads named `relay`, two
//! workers like the binary on this two-core machine), so a profile of this
//! process tells the relay's time from the clients'.
//!
//! Sections:
//! 1. one connection, one send at a time;
//! 2. one connection, [`IN_FLIGHT`] sends at a time (one stream each);
//! 3. N connections (one sender each) × K sends in flight per connection,
//!    to a recipient of their own, for [`SCENARIOS`]. `-- conns` runs
//!    only this section. Compare with
//!    `redis-benchmark -t lpush -d 256 -c N [-P K]` against a
//!    `redis-server --appendonly yes --appendfsync always`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use securechat_client::relay::RelayClient;
use securechat_common::protocol::{Request, Response};
use securechat_common::{Envelope, MessageId, PublicKey};
use securechat_relay::store::Quota;
use securechat_testkit::relay::test_config;
use securechat_testkit::{SmtpServer, TestRelay, TestUser};

const SEQUENTIAL: usize = 400;
const CONCURRENT: usize = 2000;
const IN_FLIGHT: usize = 64;
/// Section 4: (connections, sends in flight per connection, messages in all).
const SCENARIOS: [(usize, usize, usize); 4] =
    [(1, 1, 400), (16, 1, 3200), (50, 1, 5000), (16, 16, 8000)];

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

/// A send section's line: throughput and the latency distribution of one run.
fn report(label: &str, elapsed: Duration, mut latencies: Vec<Duration>) {
    latencies.sort();
    let n = latencies.len();
    println!(
        "{label}: {n} msgs in {:.2} s = {:>6.0} msg/s  (latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
}

/// Message ids for section 3: unique across the whole run without asking
/// the OS for randomness per message.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn fresh_id() -> MessageId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(b"benchmrk");
    id[8..].copy_from_slice(&NEXT_ID.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    MessageId(id)
}

/// One sender's connection and the envelope it sends over and over. The
/// relay checks an envelope's shape, not its signature (only the recipient
/// can open it), so copies under fresh ids cost the relay what distinct
/// messages would, and the bench need not seal thousands.
struct Sender {
    client: Arc<RelayClient>,
    envelope: Envelope,
}

/// `total` sends spread over `senders`, `in_flight` at a time on each
/// connection; the elapsed time and every send's latency.
async fn load(
    senders: &[Sender],
    in_flight: usize,
    total: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let workers = senders.len() * in_flight;
    let per_worker = total.div_ceil(workers);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for sender in senders {
        for _ in 0..in_flight {
            let client = Arc::clone(&sender.client);
            let template = sender.envelope.clone();
            tasks.spawn(async move {
                let mut latencies = Vec::with_capacity(per_worker);
                for _ in 0..per_worker {
                    let mut envelope = template.clone();
                    envelope.id = fresh_id();
                    latencies.push(send(&client, envelope).await?);
                }
                anyhow::Ok(latencies)
            });
        }
    }
    let mut latencies = Vec::with_capacity(per_worker * workers);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    Ok((start.elapsed(), latencies))
}

/// Section 4: `senders` users, each on a connection of its own, sending to
/// one recipient.
async fn many_connections(relay: &TestRelay, smtp: &SmtpServer) -> anyhow::Result<()> {
    let most = SCENARIOS.iter().map(|s| s.0).max().unwrap_or(1);
    let mut carol = TestUser::new("carol")?;
    let c = relay.connect().await?;
    carol.register(&c, smtp).await?;
    let carol_key = PublicKey::from_der(carol.key.public_key().as_der())?;
    let mut senders = Vec::with_capacity(most);
    for i in 0..most {
        let mut user = TestUser::new(&format!("sender{i:02}"))?;
        let client = relay.connect().await?;
        user.register(&client, smtp).await?;
        user.login(&client).await?;
        let envelope = user.seal_to(
            "carol",
            &carol_key,
            b"benchmark message with a little padding to look like chat",
        )?;
        senders.push(Sender {
            client: Arc::new(client),
            envelope,
        });
    }
    // Every login was announced to the senders already online; let those
    // presence pushes and their acks settle so they do not load the first run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A profiler attached from here on sees the load, not RSA key generation.
    eprintln!("{most} senders registered and logged in");
    for (conns, in_flight, total) in SCENARIOS {
        let (elapsed, latencies) = load(&senders[..conns], in_flight, total).await?;
        report(
            &format!("send, {conns:>2} conn x {in_flight:>2} in flight"),
            elapsed,
            latencies,
        );
    }
    for sender in &senders {
        sender.client.close("done").await;
    }
    c.close("done").await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let only_conns = std::env::args().any(|a| a == "conns");
    let dir = tempfile::tempdir()?;
    let smtp = SmtpServer::start()?;
    let mut config = test_config(dir.path(), Some(&smtp));
    config.quota = Quota {
        messages: 1_000_000,
        bytes: 1 << 34,
    };
    let relay_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("relay")
        .enable_all()
        .build()?;
    let relay = relay_runtime.spawn(TestRelay::start(config)).await??;
    if only_conns {
        many_connections(&relay, &smtp).await?;
        relay.stop().await?;
        relay_runtime.shutdown_background();
        return Ok(());
    }

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
    report("send, 1 in flight", start.elapsed(), latencies);

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
    report(
        &format!("send, {IN_FLIGHT} in flight, 1 conn"),
        start.elapsed(),
        latencies,
    );

    a.close("done").await;
    b.close("done").await;

    many_connections(&relay, &smtp).await?;
    relay.stop().await?;
    relay_runtime.shutdown_background();
    Ok(())
}
