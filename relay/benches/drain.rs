//! How fast the relay hands a long queue to its recipient: `DRAIN_N`
//! (default 100 000) messages are queued for bob, then bob logs in and takes
//! them all, acknowledging as an agent does:
//!
//! ```sh
//! cargo bench -p securechat-relay --bench drain                 # both ack modes
//! DRAIN_N=20000 DRAIN_ACKS=single cargo bench -p securechat-relay --bench drain
//! ```
//!
//! * `many`: `AckMany` batches of up to `MAX_ACK_BATCH`, a few in flight;
//! * `single`: one `Ack` per message, 64 in flight (what agents did before
//!   `AckMany`).
//!
//! The queue is written straight into the relay's database while the relay
//! is stopped (one copy of a sealed envelope under fresh ids: the relay
//! checks shapes, not signatures), so the figure is the drain alone: push
//! reads, frames on the push stream, and the ack commits. The clock runs
//! from the login request to the last ack's answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use securechat_client::relay::RelayClient;
use securechat_common::limits::MAX_ACK_BATCH;
use securechat_common::protocol::{AckOutcome, Push, Request, Response};
use securechat_common::{MessageId, PublicKey};
use securechat_relay::store::{QueueLimits, QueueOp, Quota, RedbStore, Store};
use securechat_relay::Config;
use securechat_testkit::relay::test_config;
use securechat_testkit::{SmtpServer, TestRelay, TestUser};

/// Acks (single) or batches (many) waiting for their answer at once.
const SINGLE_IN_FLIGHT: usize = 64;
const BATCHES_IN_FLIGHT: usize = 4;
/// Messages written to the store per transaction while filling.
const FILL_CHUNK: usize = 2000;

fn config(dir: &std::path::Path, smtp: &SmtpServer) -> Config {
    let mut config = test_config(dir, Some(smtp));
    config.quota = Quota {
        messages: 10_000_000,
        bytes: 1 << 40,
    };
    config
}

/// Queue `n` copies of one envelope from alice for bob, under ids that
/// start at `first`, straight into the stopped relay's database.
fn fill(
    dir: &std::path::Path,
    env: &securechat_common::Envelope,
    first: u64,
    n: usize,
) -> anyhow::Result<()> {
    let store = RedbStore::open(&dir.join("relay.redb"))?;
    let limits = QueueLimits::quota_only(Quota {
        messages: u64::MAX,
        bytes: u64::MAX,
    });
    let now = securechat_relay::clock::unix_now();
    let mut next = first;
    let mut left = n;
    while left > 0 {
        let chunk = left.min(FILL_CHUNK);
        let mut ops = Vec::with_capacity(chunk);
        for _ in 0..chunk {
            let mut copy = env.clone();
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&next.to_be_bytes());
            copy.id = MessageId(id);
            next += 1;
            ops.push(QueueOp::Enqueue {
                recipient: "bob".into(),
                sender: "alice".into(),
                id: copy.id,
                envelope: postcard::to_stdvec(&copy)?,
                now,
            });
        }
        store.write_queue_batch(&ops, limits)?;
        left -= chunk;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Acks {
    Many,
    Single,
}

async fn ack(client: &RelayClient, ids: Vec<MessageId>, mode: Acks) -> anyhow::Result<()> {
    let requests: Vec<Request> = match mode {
        Acks::Many => vec![Request::AckMany {
            acks: ids.into_iter().map(|id| (id, AckOutcome::Stored)).collect(),
        }],
        Acks::Single => ids
            .into_iter()
            .map(|id| Request::Ack {
                id,
                outcome: AckOutcome::Stored,
            })
            .collect(),
    };
    for req in requests {
        match client.call(&req).await? {
            Response::Ok => {}
            other => bail!("ack answered {other:?}"),
        }
    }
    Ok(())
}

/// Log bob in on a new connection and take `n` queued messages.
async fn drain(relay: &TestRelay, bob: &mut TestUser, n: usize, mode: Acks) -> anyhow::Result<()> {
    let b = Arc::new(relay.connect().await?);
    let start = Instant::now();
    let logged = bob.login(&b).await?;
    let mut pushes = b.accept_pushes().await?;
    let (batch_len, in_flight) = match mode {
        Acks::Many => (MAX_ACK_BATCH, BATCHES_IN_FLIGHT),
        Acks::Single => (1, SINGLE_IN_FLIGHT),
    };
    let mut acks = tokio::task::JoinSet::new();
    let mut batch = Vec::with_capacity(batch_len);
    let mut received = 0usize;
    let mut first_push = None;
    while received < n {
        let push = tokio::time::timeout(Duration::from_secs(60), pushes.next())
            .await
            .context("push stream stalled")?
            .context("push stream ended")??;
        let Push::Deliver { envelope, .. } = push else {
            continue;
        };
        first_push.get_or_insert_with(|| start.elapsed());
        received += 1;
        batch.push(envelope.id);
        if batch.len() == batch_len || received == n {
            let ids = std::mem::replace(&mut batch, Vec::with_capacity(batch_len));
            let b = Arc::clone(&b);
            acks.spawn(async move { ack(&b, ids, mode).await });
            while acks.len() >= in_flight {
                if let Some(done) = acks.join_next().await {
                    done??;
                }
            }
        }
    }
    while let Some(done) = acks.join_next().await {
        done??;
    }
    let elapsed = start.elapsed();
    println!(
        "drain, {mode:?} acks: {received} msgs in {:.2} s = {:>7.0} msg/s  (unread at login {}, first push after {:.1} ms)",
        elapsed.as_secs_f64(),
        received as f64 / elapsed.as_secs_f64(),
        logged.unread,
        first_push.unwrap_or_default().as_secs_f64() * 1e3,
    );
    b.close("done").await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::var("DRAIN_N") {
        Ok(v) => v.parse().context("DRAIN_N must be a number")?,
        Err(_) => 100_000,
    };
    let modes = match std::env::var("DRAIN_ACKS").as_deref() {
        Ok("many") => vec![Acks::Many],
        Ok("single") => vec![Acks::Single],
        _ => vec![Acks::Many, Acks::Single],
    };
    let dir = tempfile::tempdir()?;
    let smtp = SmtpServer::start()?;
    let relay = TestRelay::start(config(dir.path(), &smtp)).await?;
    let mut alice = TestUser::new("alice")?;
    let mut bob = TestUser::new("bob")?;
    let a = relay.connect().await?;
    alice.register(&a, &smtp).await?;
    bob.register(&a, &smtp).await?;
    let bob_key = PublicKey::from_der(bob.key.public_key().as_der())?;
    let env = alice.seal_to(
        "bob",
        &bob_key,
        b"benchmark message with a little padding to look like chat",
    )?;
    a.close("done").await;
    let mut relay = Some(relay);
    for (round, mode) in modes.into_iter().enumerate() {
        if let Some(running) = relay.take() {
            running.stop().await?;
        }
        let started = Instant::now();
        fill(dir.path(), &env, (round * n) as u64, n)?;
        eprintln!(
            "queued {n} messages in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let running = TestRelay::start(config(dir.path(), &smtp)).await?;
        drain(&running, &mut bob, n, mode).await?;
        relay = Some(running);
    }
    if let Some(running) = relay {
        running.stop().await?;
    }
    Ok(())
}
