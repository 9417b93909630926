//! Receiving: every pushed envelope is verified with the sender's *pinned*
//! key, opened, committed to the inbox, and only then acked.
//!
//! ```text
//! Deliver(env) ─► seen before? ──yes──► Ack(Stored|Rejected) again
//!      │no
//!      ▼
//! sender a valid username? addressed to us? (else rejected)
//!      ▼
//! pinned key (or look up + pin on first contact)
//!      ▼
//! open(env) ──ok──► timestamp not far in the future? ──► sequence number
//!      │              (else rejected)                     (see `seq`)
//!      │                                                   ▼
//!      │              inbox commit ──► Ack(Stored) ──► watchers, receipt owed
//!      │              (a receipt: our messages marked delivered instead)
//!      │              (a replayed number: rejected, Ack(Rejected))
//!      │ bad signature, and the directory key differs from the pin
//!      ├──────────► held (until `trust`) ──► Ack(Stored)
//!      │ anything else
//!      └──────────► rejected (status) ──► Ack(Rejected)
//! ```
//!
//! A transient failure (relay unreachable during a lookup, database error)
//! sends no ack: the relay keeps the message and pushes it again later.
//!
//! # Rounds
//!
//! Pushes are taken in rounds: the one that woke the loop and every push
//! that has arrived by then, up to [`MAX_ACK_BATCH`]. A round's messages
//! are decrypted on the blocking pool (spread over the cores), the verified
//! ones go to the inbox in one commit (one fsync), and then one `AckMany`
//! answers the round. A lone message is a round of one and goes at once:
//! nothing waits for company. Only what the round's commits made durable
//! is acked, so a crash at any point loses nothing: what was not acked is
//! pushed again and `seen` answers it.

use std::sync::Arc;

use futures_util::FutureExt;
use securechat_common::crypto::CryptoError;
use securechat_common::envelope::{open, Envelope, Kind, ReceiptBody};
use securechat_common::ipc::{DeliveryState, InboxMessage};
use securechat_common::limits::{validate_username, MAX_ACK_BATCH, MAX_RECEIPT_IDS};
use securechat_common::protocol::{AckOutcome, ErrorCode, Push, Request};
use securechat_common::MessageId;
use securechat_common::PublicKey;
use zeroize::Zeroizing;

use crate::agent::{now_ms, Agent, ReadyKeys};
use crate::store::{Delivery, Seen, StoreError};
use securechat_client::relay::{ClientError, RelayClient};

/// How far ahead of agentd's clock a sender's timestamp may be before the
/// message is refused (a day covers any time zone mistake).
const MAX_FUTURE_MS: u64 = 24 * 3600 * 1000;

/// Read pushes until the connection ends.
pub(crate) async fn push_loop(agent: &Arc<Agent>, client: &RelayClient) -> Result<(), ClientError> {
    loop {
        let mut pushes = client.accept_pushes().await?;
        agent.set_logged_in(true);
        let mut acker = Acker::default();
        while let Some(first) = pushes.next().await {
            let mut round = vec![first?];
            let mut ended = false;
            // `next` keeps a half-read frame in the stream, so polling it
            // once and dropping it loses nothing.
            while round.len() < MAX_ACK_BATCH {
                match pushes.next().now_or_never() {
                    Some(Some(push)) => round.push(push?),
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            let answers = handle_round(agent, client, round).await?;
            acker.send(client, answers).await?;
            if ended {
                break;
            }
        }
    }
}

/// Sends a round's acks: one `AckMany`, or one `Ack` each to a relay that
/// predates `AckMany` (it answers `BadRequest`; remembered for the
/// connection).
#[derive(Default)]
struct Acker {
    singles_only: bool,
}

impl Acker {
    async fn send(
        &mut self,
        client: &RelayClient,
        mut acks: Vec<(MessageId, AckOutcome)>,
    ) -> Result<(), ClientError> {
        if acks.len() > 1 && !self.singles_only {
            let req = Request::AckMany { acks };
            match client.call(&req).await {
                Ok(_) => return Ok(()),
                Err(ClientError::Relay(e)) if e.code == ErrorCode::BadRequest => {
                    tracing::info!("the relay does not take acks in batches; acking one by one");
                    self.singles_only = true;
                    let Request::AckMany { acks: back } = req else {
                        return Ok(());
                    };
                    acks = back;
                }
                Err(e) => return Err(e),
            }
        }
        for (id, outcome) in acks {
            client.call(&Request::Ack { id, outcome }).await?;
        }
        Ok(())
    }
}

/// A pushed envelope that passed the cheap checks and waits to be opened.
struct Checked {
    env: Envelope,
    pinned: PublicKey,
    relay_ms: u64,
}

/// Handle one round of pushes; returns the acks it owes.
async fn handle_round(
    agent: &Arc<Agent>,
    client: &RelayClient,
    round: Vec<Push>,
) -> Result<Vec<(MessageId, AckOutcome)>, ClientError> {
    let mut answers = Vec::new();
    let mut checked = Vec::new();
    for push in round {
        match push {
            Push::Deliver {
                envelope: env,
                received_unix,
            } => {
                let id = env.id;
                let relay_ms = received_unix.saturating_mul(1000);
                match check(agent, client, env).await? {
                    Step::Answer(outcome) => answers.push((id, outcome)),
                    Step::Leave => {}
                    Step::Open(env, pinned) => checked.push(Checked {
                        env,
                        pinned,
                        relay_ms,
                    }),
                }
            }
            Push::Presence { user, online } => {
                let _ = agent
                    .blocking(move |a| presence(a, &user, online))
                    .await
                    .inspect_err(|e| tracing::error!("store: {e}"));
            }
            Push::Expired {
                notice,
                id,
                recipient,
                ..
            } => {
                let outcome = agent
                    .blocking(move |a| expired(a, &id, &recipient))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!("store: {e}");
                        None
                    });
                if let Some(outcome) = outcome {
                    answers.push((notice, outcome));
                }
            }
            other => tracing::debug!("ignoring push {other:?}"),
        }
    }
    if checked.is_empty() {
        return Ok(answers);
    }
    let (Some(me), Ok(keys)) = (agent.username(), agent.ready_keys()) else {
        return Ok(answers);
    };
    let opened = open_all(&keys, &me, checked).await;
    let mut inbox = Vec::new();
    for (c, result) in opened {
        let Checked { env, pinned, .. } = c;
        let id = env.id;
        let outcome = match result {
            Ok(body) if env.kind == Kind::Receipt => {
                let keys = keys.clone();
                agent
                    .blocking(move |a| receipt(a, &keys, &env, &body))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!("store: {e}");
                        None
                    })
            }
            Ok(body) => match inbox_message(&me, &env, &body, Some(c.relay_ms)) {
                Ok(msg) => {
                    inbox.push((env, msg, pinned.fingerprint().0));
                    None
                }
                Err(why) => reject_off(agent, &env, why).await,
            },
            Err(CryptoError::BadSignature) => bad_signature(agent, client, env, &pinned).await?,
            Err(e) => reject_off(agent, &env, e.to_string()).await,
        };
        if let Some(outcome) = outcome {
            answers.push((id, outcome));
        }
    }
    answers.extend(store_all(agent, &keys, inbox).await);
    Ok(answers)
}

/// The relay says `user` came online or went offline: journal it for
/// `events` and the chat's join and leave lines. A name that breaks the
/// rules is dropped before it reaches any terminal.
fn presence(agent: &Agent, user: &str, online: bool) {
    if validate_username(user).is_err() {
        tracing::warn!("ignoring a presence notice with an invalid name");
        return;
    }
    let Ok(keys) = agent.ready_keys() else { return };
    match agent.store.record_presence(&keys.inbox, user, online) {
        Ok(()) => agent.journal_changed(),
        Err(e) => tracing::error!("store: {e}"),
    }
}

/// The relay removed our message `id` to `recipient` undelivered after its
/// retention time. Recorded (and journalled) unless a receipt says it was
/// delivered: the relay's word never undoes a signed receipt. `None`
/// leaves the notice queued (the store failed).
fn expired(agent: &Agent, id: &MessageId, recipient: &str) -> Option<AckOutcome> {
    let keys = agent.ready_keys().ok()?;
    let update = [(recipient, DeliveryState::Expired, None)];
    match agent.store.update_sent(&keys.inbox, id, &update) {
        Ok(changed) => {
            if !changed.is_empty() {
                tracing::warn!("message {id} to {recipient:?} expired on the relay undelivered");
                agent.journal_changed();
            }
            Some(AckOutcome::Stored)
        }
        Err(e) => {
            tracing::error!("store: {e}");
            None
        }
    }
}

/// A verified receipt from `env.sender`: our messages it names are
/// delivered to them. Nothing goes to the inbox; no receipt answers it.
pub(crate) fn receipt(
    agent: &Agent,
    keys: &ReadyKeys,
    env: &Envelope,
    body: &[u8],
) -> Option<AckOutcome> {
    let ids = match postcard::from_bytes::<ReceiptBody>(body) {
        Ok(r) if r.stored.len() <= MAX_RECEIPT_IDS => r.stored,
        _ => return reject(agent, env, "a receipt whose body does not decode"),
    };
    match agent.store.record_receipt(&keys.inbox, &env.sender, &ids) {
        Ok(changed) => {
            if changed > 0 {
                tracing::info!("{} delivered {changed} message(s)", env.sender);
                agent.journal_changed();
            }
            Some(AckOutcome::Stored)
        }
        Err(e) => {
            tracing::error!("store: {e}");
            None
        }
    }
}

/// Decrypt with the current key, or an older one after a rotation.
pub(crate) fn open_any(
    env: &Envelope,
    me: &str,
    keys: &ReadyKeys,
    sender: &PublicKey,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    match open(env, me, &keys.current, sender) {
        Err(CryptoError::Decrypt) => {
            for old in keys.old.iter().rev() {
                if let Ok(body) = open(env, me, old, sender) {
                    return Ok(body);
                }
            }
            Err(CryptoError::Decrypt)
        }
        other => other,
    }
}

/// The inbox record for a message whose signature verified, or why it is
/// refused (its timestamp is too far in the future; the caller records the
/// rejection). `relay_ms` is when the relay stored it, if known (held
/// messages lose it).
fn inbox_message(
    me: &str,
    env: &Envelope,
    body: &[u8],
    relay_ms: Option<u64>,
) -> Result<InboxMessage, String> {
    let now = now_ms();
    let seq = env.slot(me).map_or(0, |s| s.seq);
    // The relay's clock is shown beside the sender's, never trusted to
    // excuse it: a receive time from the future is dropped.
    let relay_ms = relay_ms.filter(|&t| t <= now.saturating_add(MAX_FUTURE_MS));
    if env.timestamp_ms > now.saturating_add(MAX_FUTURE_MS) {
        return Err(format!(
            "its timestamp ({} ms since 1970) is more than a day in the future: the sender's \
             clock is wrong",
            env.timestamp_ms
        ));
    }
    Ok(InboxMessage {
        id: env.id.to_string(),
        from: env.sender.clone(),
        sent_ms: env.timestamp_ms,
        relay_ms,
        received_ms: now,
        text: String::from_utf8_lossy(body).into_owned(),
        read: false,
        seq,
        broadcast: env.kind == Kind::Broadcast,
        missing_before: 0,
        late: false,
    })
}

/// What a delivery comes to, logged. Watchers and the receipt sender are
/// woken by the caller, once per commit.
fn delivered(env: &Envelope, delivery: &Delivery) -> AckOutcome {
    match delivery {
        Delivery::Stored(msg) => {
            if msg.missing_before > 0 {
                tracing::warn!(
                    "{} message(s) from {} before number {} are missing",
                    msg.missing_before,
                    env.sender,
                    msg.seq
                );
            }
            tracing::info!("message {} from {} stored", env.id, env.sender);
            AckOutcome::Stored
        }
        Delivery::Duplicate => AckOutcome::Stored,
        Delivery::Replayed => {
            tracing::warn!(
                "message {} from {} reuses its number: replay refused",
                env.id,
                env.sender,
            );
            AckOutcome::Rejected
        }
    }
}

/// Store a message whose signature verified with `signer`, checking its
/// timestamp and sequence number, and tell watchers (for a held message
/// released by `trust`; pushes go through [`store_all`]).
pub(crate) fn deliver(
    agent: &Agent,
    keys: &ReadyKeys,
    me: &str,
    env: &Envelope,
    body: &[u8],
    signer: &PublicKey,
    relay_ms: Option<u64>,
) -> Result<AckOutcome, StoreError> {
    let msg = match inbox_message(me, env, body, relay_ms) {
        Ok(msg) => msg,
        Err(why) => {
            tracing::warn!("rejected message {} from {}: {why}", env.id, env.sender);
            agent.store.reject(&env.id, &env.sender, &why)?;
            return Ok(AckOutcome::Rejected);
        }
    };
    let delivery = agent
        .store
        .deliver(&keys.inbox, &env.id, msg, signer.fingerprint().0)?;
    if matches!(delivery, Delivery::Stored(_)) {
        agent.journal_changed();
        agent.receipts_due.notify_one();
    }
    Ok(delivered(env, &delivery))
}

/// Put a round's verified messages in the inbox in one commit, on the
/// blocking pool; their acks. If the commit fails none is acked (the relay
/// pushes them again).
async fn store_all(
    agent: &Arc<Agent>,
    keys: &ReadyKeys,
    inbox: Vec<(Envelope, InboxMessage, [u8; 32])>,
) -> Vec<(MessageId, AckOutcome)> {
    if inbox.is_empty() {
        return Vec::new();
    }
    let (envs, batch): (Vec<Envelope>, Vec<_>) = inbox
        .into_iter()
        .map(|(env, msg, signer)| {
            let id = env.id;
            (env, (id, msg, signer))
        })
        .unzip();
    let key = keys.inbox.clone();
    let deliveries = match agent
        .blocking(move |a| a.store.deliver_many(&key, batch))
        .await
    {
        Ok(Ok(d)) if d.len() == envs.len() => d,
        Ok(Ok(_)) => {
            tracing::error!("store: a delivery batch answered for another count of messages");
            return Vec::new();
        }
        Ok(Err(e)) | Err(e) => {
            tracing::error!("store: {e}");
            return Vec::new();
        }
    };
    if deliveries.iter().any(|d| matches!(d, Delivery::Stored(_))) {
        agent.journal_changed();
        agent.receipts_due.notify_one();
    }
    envs.iter()
        .zip(&deliveries)
        .map(|(env, d)| (env.id, delivered(env, d)))
        .collect()
}

/// Open a round's envelopes on the blocking pool, spread over the cores
/// (RSA decryption is most of a drain's work), in their order. Envelopes
/// of a part whose task failed are left out: they stay queued.
async fn open_all(
    keys: &ReadyKeys,
    me: &str,
    checked: Vec<Checked>,
) -> Vec<(Checked, Result<Zeroizing<Vec<u8>>, CryptoError>)> {
    let parts = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(checked.len())
        .max(1);
    let per_part = checked.len().div_ceil(parts);
    let mut tasks = Vec::with_capacity(parts);
    let mut rest = checked.into_iter().peekable();
    while rest.peek().is_some() {
        let part: Vec<Checked> = rest.by_ref().take(per_part).collect();
        let keys = keys.clone();
        let me = me.to_string();
        tasks.push(tokio::task::spawn_blocking(move || {
            part.into_iter()
                .map(|c| {
                    let opened = open_any(&c.env, &me, &keys, &c.pinned);
                    (c, opened)
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        match task.await {
            Ok(part) => out.extend(part),
            Err(e) => tracing::error!("decrypting messages failed: {e}"),
        }
    }
    out
}

/// Record a rejection (on the blocking pool) and answer `Rejected`; `None`
/// if it could not be recorded (the message stays queued).
async fn reject_off(agent: &Arc<Agent>, env: &Envelope, reason: String) -> Option<AckOutcome> {
    let (id, sender) = (env.id, env.sender.clone());
    tracing::warn!("rejected message {id} from {sender:?}: {reason}");
    match agent
        .blocking(move |a| a.store.reject(&id, &sender, &reason))
        .await
    {
        Ok(Ok(())) => Some(AckOutcome::Rejected),
        Ok(Err(e)) | Err(e) => {
            tracing::error!("cannot record rejection: {e}");
            None
        }
    }
}

fn reject(agent: &Agent, env: &Envelope, reason: &str) -> Option<AckOutcome> {
    tracing::warn!(
        "rejected message {} from {:?}: {reason}",
        env.id,
        env.sender
    );
    match agent.store.reject(&env.id, &env.sender, reason) {
        Ok(()) => Some(AckOutcome::Rejected),
        Err(e) => {
            tracing::error!("cannot record rejection: {e}");
            None
        }
    }
}

/// What to do next with one pushed envelope.
enum Step {
    /// Answer it now.
    Answer(AckOutcome),
    /// Leave it queued on the relay (a transient failure).
    Leave,
    /// Open it with the sender's pinned key.
    Open(Envelope, PublicKey),
}

/// The checks before decryption: seen before, shape, names, pinned key.
async fn check(
    agent: &Arc<Agent>,
    client: &RelayClient,
    env: Envelope,
) -> Result<Step, ClientError> {
    let answered = |o: Option<AckOutcome>| o.map_or(Step::Leave, Step::Answer);
    // Reads: redb serves them from memory without waiting on a commit.
    match agent.store.seen(&env.id) {
        Ok(Some(Seen::Inbox | Seen::Held)) => return Ok(Step::Answer(AckOutcome::Stored)),
        Ok(Some(Seen::Rejected)) => return Ok(Step::Answer(AckOutcome::Rejected)),
        Ok(None) => {}
        Err(e) => {
            tracing::error!("store: {e}");
            return Ok(Step::Leave);
        }
    }
    let (Some(me), Ok(_)) = (agent.username(), agent.ready_keys()) else {
        return Ok(Step::Leave);
    };
    if let Err(e) = env.check_shape() {
        return Ok(answered(reject_off(agent, &env, e.to_string()).await));
    }
    // Before the name reaches the directory, the pins or a terminal.
    if let Err(e) = validate_username(&env.sender) {
        let why = format!("invalid sender name: {e}");
        return Ok(answered(reject_off(agent, &env, why).await));
    }
    if env.slot(&me).is_none() {
        let names: Vec<String> = env.recipients().map(|n| format!("{n:?}")).collect();
        let why = format!("addressed to {}, not to us", names.join(", "));
        return Ok(answered(reject_off(agent, &env, why).await));
    }
    let pinned = match agent.store.pin(&env.sender) {
        Ok(Some(der)) => match PublicKey::from_der(&der) {
            Ok(k) => k,
            Err(e) => {
                let why = format!("pinned key unusable: {e}");
                return Ok(answered(reject_off(agent, &env, why).await));
            }
        },
        Ok(None) => match agent.directory_key(client, &env.sender).await {
            Ok(k) => {
                let (user, der) = (env.sender.clone(), k.as_der().to_vec());
                match agent.blocking(move |a| a.set_pin(&user, &der)).await {
                    Ok(Ok(())) => k,
                    Ok(Err(e)) | Err(e) => {
                        tracing::error!("store: {e}");
                        return Ok(Step::Leave);
                    }
                }
            }
            Err(ClientError::Relay(r)) if r.code == ErrorCode::UnknownUser => {
                let why = "sender is not a known user".to_string();
                return Ok(answered(reject_off(agent, &env, why).await));
            }
            Err(ClientError::Crypto(e)) => {
                let why = format!("sender's key unusable: {e}");
                return Ok(answered(reject_off(agent, &env, why).await));
            }
            Err(e) => return Err(e),
        },
        Err(e) => {
            tracing::error!("store: {e}");
            return Ok(Step::Leave);
        }
    };
    Ok(Step::Open(env, pinned))
}

/// The signature does not verify with the pinned key: either forged, or
/// the sender rotated their key. The directory decides between holding it
/// (a new key there) and rejecting it.
async fn bad_signature(
    agent: &Arc<Agent>,
    client: &RelayClient,
    env: Envelope,
    pinned: &PublicKey,
) -> Result<Option<AckOutcome>, ClientError> {
    let current = match agent.directory_key(client, &env.sender).await {
        Ok(k) => Some(k),
        Err(ClientError::Relay(_) | ClientError::Crypto(_)) => None,
        Err(e) => return Err(e),
    };
    match current {
        Some(k) if k != *pinned => {
            let reason = format!(
                "sender key changed (pinned {}, directory {}); run `chat-cli trust {}` \
                 after checking it",
                pinned.fingerprint(),
                k.fingerprint(),
                env.sender
            );
            tracing::warn!("holding message {} from {}: {reason}", env.id, env.sender);
            match agent.blocking(move |a| a.store.hold(&env, &reason)).await {
                Ok(Ok(())) => Ok(Some(AckOutcome::Stored)),
                Ok(Err(e)) | Err(e) => {
                    tracing::error!("store: {e}");
                    Ok(None)
                }
            }
        }
        _ => Ok(reject_off(
            agent,
            &env,
            "bad signature (not signed by the pinned key)".to_string(),
        )
        .await),
    }
}
