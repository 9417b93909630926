//! The measurements: logins, durable sends, end-to-end latency at a fixed
//! offered rate, draining a queue, and idle sessions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use securechat_client::relay::RelayClient;
use securechat_common::limits::MAX_ACK_BATCH;
use securechat_common::protocol::{AckOutcome, Push, Request, Response};
use securechat_common::MessageId;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::stats::{rate, Latency};
use crate::target::Target;
use crate::users::{Identity, Template, User};

/// How many registrations, logins or resumes run at once during set-up:
/// enough to keep the relay's password workers busy.
const SETUP_CONCURRENCY: usize = 32;

/// A logged-in user and its connection.
pub struct Session {
    /// The user.
    pub user: User,
    /// Its connection, logged in.
    pub conn: Arc<RelayClient>,
}

/// Register `names` (each on a connection of its own, closed when done),
/// then log each in on a new connection, as agentd's first login does. The
/// first `keep` stay connected; the others only keep their session token,
/// so that thousands of users do not hold connections open while they wait
/// their turn. Returns the connected sessions, the other users, and how
/// long the logins (not the registrations) took.
pub async fn sign_up(
    target: &Arc<Target>,
    id: &Arc<Identity>,
    names: Vec<String>,
    keep: usize,
) -> anyhow::Result<(Vec<Session>, Vec<User>, Duration)> {
    let mut registered = run_bounded(names.into_iter().enumerate().map(|(i, name)| {
        let target = Arc::clone(target);
        let id = Arc::clone(id);
        async move {
            let conn = target.connect(i).await?;
            let mut user = User::new(name);
            user.register(&conn, &target, &id).await?;
            conn.close("registered").await;
            anyhow::Ok((i, user))
        }
    }))
    .await?;
    registered.sort_by_key(|(i, _)| *i);

    let start = Instant::now();
    let mut logged_in = run_bounded(registered.into_iter().map(|(i, mut user)| {
        let target = Arc::clone(target);
        let id = Arc::clone(id);
        async move {
            let conn = target.connect(i).await?;
            user.login(&conn, &id).await?;
            let conn = if i < keep {
                Some(Arc::new(conn))
            } else {
                conn.close("logged in").await;
                None
            };
            anyhow::Ok((i, user, conn))
        }
    }))
    .await?;
    let elapsed = start.elapsed();
    logged_in.sort_by_key(|(i, _, _)| *i);
    let mut sessions = Vec::with_capacity(keep);
    let mut others = Vec::new();
    for (_, user, conn) in logged_in {
        match conn {
            Some(conn) => sessions.push(Session { user, conn }),
            None => others.push(user),
        }
    }
    Ok((sessions, others, elapsed))
}

/// Run the futures, [`SETUP_CONCURRENCY`] at a time; the first error ends it.
async fn run_bounded<T: Send + 'static>(
    jobs: impl Iterator<Item = impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static>,
) -> anyhow::Result<Vec<T>> {
    let permits = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut set = JoinSet::new();
    for job in jobs {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        set.spawn(async move {
            let out = job.await;
            drop(permit);
            out
        });
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        out.push(done??);
    }
    Ok(out)
}

/// What the durable-send run measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SendResult {
    /// Messages acknowledged `Stored` per second.
    pub msgs_per_s: f64,
    /// Per-send latency, request to `Stored`.
    pub latency: Latency,
}

/// Send `messages` in all from `senders` (each with the envelope it sends),
/// `in_flight` outstanding per connection; each one counts when the relay
/// answers `Stored`, which it does only after the durable commit.
pub async fn send(
    senders: &[(Arc<RelayClient>, Arc<Template>)],
    in_flight: usize,
    messages: usize,
) -> anyhow::Result<SendResult> {
    let left = Arc::new(AtomicUsize::new(messages));
    let mut set = JoinSet::new();
    let start = Instant::now();
    for (conn, template) in senders {
        for _ in 0..in_flight {
            let (conn, template, left) = (Arc::clone(conn), Arc::clone(template), left.clone());
            set.spawn(async move {
                let mut latencies = Vec::new();
                while take_one(&left) {
                    let envelope = template.next()?;
                    let t = Instant::now();
                    match conn.call(&Request::Send { envelope }).await? {
                        Response::Stored { .. } => latencies.push(t.elapsed()),
                        other => bail!("send: the relay answered {other:?}"),
                    }
                }
                anyhow::Ok(latencies)
            });
        }
    }
    let mut all = Vec::with_capacity(messages);
    while let Some(done) = set.join_next().await {
        all.extend(done??);
    }
    let elapsed = start.elapsed();
    Ok(SendResult {
        msgs_per_s: rate(all.len(), elapsed),
        latency: Latency::of(&mut all),
    })
}

fn take_one(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// What the end-to-end run measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct E2eResult {
    /// The offered rate, messages per second.
    pub offered_per_s: f64,
    /// Messages sent.
    pub sent: usize,
    /// Messages that reached their recipient.
    pub received: usize,
    /// From the moment a send was due to the moment its recipient had it.
    pub latency: Latency,
}

/// Offer `per_second` messages for `duration` (open loop: each send starts
/// when it is due, whether or not earlier ones have been answered), spread
/// over the senders; each goes to its sender's recipient, who is online,
/// takes it from the push stream and acks it as agentd does. The latency is
/// from when a send was due to when the recipient had the message.
pub async fn end_to_end(
    pairs: &[(Arc<RelayClient>, Arc<Template>, Arc<RelayClient>)],
    per_second: u32,
    duration: Duration,
) -> anyhow::Result<E2eResult> {
    let due: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let total = (f64::from(per_second) * duration.as_secs_f64()).round() as usize;
    let received = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(tokio::sync::Notify::new());

    let mut readers = JoinSet::new();
    for (_, _, recipient) in pairs {
        let (recipient, due, latencies, received, all_in) = (
            Arc::clone(recipient),
            due.clone(),
            latencies.clone(),
            received.clone(),
            all_in.clone(),
        );
        // Accepted in the reader: the push stream reaches the client with
        // its first push, which the sends below cause.
        readers.spawn(async move {
            let mut pushes = recipient.accept_pushes().await?;
            while let Some(push) = pushes.next().await {
                let Push::Deliver { envelope, .. } = push? else {
                    continue;
                };
                let now = Instant::now();
                let started = lock(&due).remove(&envelope.id);
                if let Some(started) = started {
                    lock(&latencies).push(now - started);
                    if received.fetch_add(1, Ordering::Relaxed) + 1 == total {
                        all_in.notify_one();
                    }
                }
                let recipient = Arc::clone(&recipient);
                tokio::spawn(async move {
                    let _ = recipient
                        .call(&Request::Ack {
                            id: envelope.id,
                            outcome: AckOutcome::Stored,
                        })
                        .await;
                });
            }
            anyhow::Ok(())
        });
    }

    let period = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
    let start = tokio::time::Instant::now();
    let mut sends = JoinSet::new();
    for k in 0..total {
        tokio::time::sleep_until(start + period * k as u32).await;
        let (conn, template, _) = &pairs[k % pairs.len()];
        let envelope = template.next()?;
        lock(&due).insert(envelope.id, Instant::now());
        let conn = Arc::clone(conn);
        sends.spawn(async move {
            match conn.call(&Request::Send { envelope }).await? {
                Response::Stored { .. } => anyhow::Ok(()),
                other => bail!("send: the relay answered {other:?}"),
            }
        });
        while let Some(done) = sends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while received.load(Ordering::Relaxed) < total {
            all_in.notified().await;
        }
    })
    .await;
    readers.abort_all();
    let got = received.load(Ordering::Relaxed);
    if waited.is_err() {
        eprintln!("securechat-bench: e2e: only {got} of {total} messages arrived within 30 s");
    }
    let mut samples = std::mem::take(&mut *lock(&latencies));
    Ok(E2eResult {
        offered_per_s: f64::from(per_second),
        sent: total,
        received: got,
        latency: Latency::of(&mut samples),
    })
}

/// What the drain measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DrainResult {
    /// Messages that were queued.
    pub messages: usize,
    /// From the resume until the last message was pushed, per second.
    pub pushed_per_s: f64,
    /// From the resume until the last ack was answered, per second.
    pub acked_per_s: f64,
}

/// `user` (offline, with `queued` messages waiting) connects, resumes its
/// session and takes every message from the push stream, acking as agentd
/// does: what has arrived, up to `MAX_ACK_BATCH`, in one `AckMany`.
pub async fn drain(
    target: &Target,
    id: &Identity,
    user: &User,
    queued: usize,
) -> anyhow::Result<DrainResult> {
    let conn = Arc::new(target.connect(0).await?);
    let start = Instant::now();
    user.resume(&conn, id).await?;
    let mut pushes = conn.accept_pushes().await?;
    let in_flight = Arc::new(Semaphore::new(4));
    let mut set = JoinSet::new();
    let mut batch = Vec::new();
    let mut got = 0;
    while got < queued {
        // Wait for a push only when there is nothing to ack; otherwise take
        // what has already arrived and ack it.
        let push = if batch.is_empty() {
            Some(
                tokio::time::timeout(Duration::from_secs(30), pushes.next())
                    .await
                    .context("the push stream stalled for 30 s")?,
            )
        } else {
            tokio::select! {
                biased;
                p = pushes.next() => Some(p),
                () = std::future::ready(()) => None,
            }
        };
        if let Some(push) = push {
            if let Push::Deliver { envelope, .. } =
                push.context("the relay ended the push stream")??
            {
                got += 1;
                batch.push((envelope.id, AckOutcome::Stored));
            }
            if batch.len() < MAX_ACK_BATCH && got < queued {
                continue;
            }
        }
        let acks = std::mem::take(&mut batch);
        let permit = Arc::clone(&in_flight).acquire_owned().await?;
        let conn = Arc::clone(&conn);
        set.spawn(async move {
            let r = conn.call(&Request::AckMany { acks }).await;
            drop(permit);
            r
        });
        while let Some(done) = set.try_join_next() {
            done??;
        }
    }
    let pushed = start.elapsed();
    while let Some(done) = set.join_next().await {
        done??;
    }
    let acked = start.elapsed();
    conn.close("drained").await;
    Ok(DrainResult {
        messages: queued,
        pushed_per_s: rate(queued, pushed),
        acked_per_s: rate(queued, acked),
    })
}

/// What holding idle sessions measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct IdleResult {
    /// Sessions held open at once.
    pub sessions: usize,
    /// Session resumes per second (each on a new connection: handshake,
    /// challenge, signed resume), as agentd does after a network change.
    pub resumes_per_s: f64,
    /// The relay's resident memory with them all open, if known.
    pub rss_bytes: Option<u64>,
    /// The growth of that memory per session, if known.
    pub rss_bytes_per_conn: Option<f64>,
}

/// Resume every user's session on a new connection and hold them all open.
pub async fn idle(
    target: &Arc<Target>,
    id: &Arc<Identity>,
    users: Vec<User>,
) -> anyhow::Result<IdleResult> {
    // Let the connections of the set-up close before the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = target.rss_bytes();
    let count = users.len();
    let start = Instant::now();
    let held = run_bounded(users.into_iter().enumerate().map(|(i, user)| {
        let target = Arc::clone(target);
        let id = Arc::clone(id);
        async move {
            let conn = target.connect(i).await?;
            user.resume(&conn, &id).await?;
            anyhow::Ok(conn)
        }
    }))
    .await?;
    let resumes_per_s = rate(count, start.elapsed());
    // Give the relay a moment to settle what each connection holds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = target.rss_bytes();
    let per_conn = match (before, after) {
        (Some(b), Some(a)) if count > 0 => Some(a.saturating_sub(b) as f64 / count as f64),
        _ => None,
    };
    let mut closing = JoinSet::new();
    for conn in held {
        closing.spawn(async move { conn.close("bench done").await });
    }
    while closing.join_next().await.is_some() {}
    Ok(IdleResult {
        sessions: count,
        resumes_per_s,
        rss_bytes: after,
        rss_bytes_per_conn: per_conn,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
