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

use std::sync::Arc;

use securechat_common::crypto::CryptoError;
use securechat_common::envelope::{open, Envelope, Kind, ReceiptBody};
use securechat_common::ipc::{DeliveryState, InboxMessage};
use securechat_common::limits::{validate_username, MAX_RECEIPT_IDS};
use securechat_common::protocol::{AckOutcome, ErrorCode, Push, Request};
use securechat_common::MessageId;
use securechat_common::PublicKey;
use zeroize::Zeroizing;

use crate::agent::{now_ms, Agent, ReadyKeys};
use crate::store::{Delivery, Seen};
use securechat_client::relay::{ClientError, RelayClient};

/// How far ahead of agentd's clock a sender's timestamp may be before the
/// message is refused (a day covers any time zone mistake).
const MAX_FUTURE_MS: u64 = 24 * 3600 * 1000;

/// Read pushes until the connection ends.
pub(crate) async fn push_loop(agent: &Arc<Agent>, client: &RelayClient) -> Result<(), ClientError> {
    loop {
        let mut pushes = client.accept_pushes().await?;
        agent.set_logged_in(true);
        while let Some(push) = pushes.next().await {
            match push? {
                Push::Deliver {
                    envelope: env,
                    received_unix,
                } => {
                    let id = env.id;
                    let relay_ms = received_unix.saturating_mul(1000);
                    if let Some(outcome) = decide(agent, client, env, relay_ms).await? {
                        client.call(&Request::Ack { id, outcome }).await?;
                    }
                }
                Push::Presence { user, online } => presence(agent, &user, online),
                Push::Expired {
                    notice,
                    id,
                    recipient,
                    ..
                } => {
                    if let Some(outcome) = expired(agent, &id, &recipient) {
                        let ack = Request::Ack {
                            id: notice,
                            outcome,
                        };
                        client.call(&ack).await?;
                    }
                }
                other => tracing::debug!("ignoring push {other:?}"),
            }
        }
    }
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

/// Store a message whose signature verified with `signer`, checking its
/// timestamp and sequence number, and tell watchers. `relay_ms` is when the
/// relay stored it, if known (held messages lose it).
pub(crate) fn deliver(
    agent: &Agent,
    keys: &ReadyKeys,
    me: &str,
    env: &Envelope,
    body: &[u8],
    signer: &PublicKey,
    relay_ms: Option<u64>,
) -> Result<AckOutcome, crate::store::StoreError> {
    let now = now_ms();
    let seq = env.slot(me).map_or(0, |s| s.seq);
    // The relay's clock is shown beside the sender's, never trusted to
    // excuse it: a receive time from the future is dropped.
    let relay_ms = relay_ms.filter(|&t| t <= now.saturating_add(MAX_FUTURE_MS));
    if env.timestamp_ms > now.saturating_add(MAX_FUTURE_MS) {
        let why = format!(
            "its timestamp ({} ms since 1970) is more than a day in the future: the sender's \
             clock is wrong",
            env.timestamp_ms
        );
        tracing::warn!("rejected message {} from {}: {why}", env.id, env.sender);
        agent.store.reject(&env.id, &env.sender, &why)?;
        return Ok(AckOutcome::Rejected);
    }
    let msg = InboxMessage {
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
    };
    let signer = signer.fingerprint().0;
    match agent.store.deliver(&keys.inbox, &env.id, msg, signer)? {
        Delivery::Stored(msg) => {
            if msg.missing_before > 0 {
                tracing::warn!(
                    "{} message(s) from {} before number {} are missing",
                    msg.missing_before,
                    env.sender,
                    seq
                );
            }
            tracing::info!("message {} from {} stored", env.id, env.sender);
            agent.journal_changed();
            agent.receipts_due.notify_one();
            Ok(AckOutcome::Stored)
        }
        Delivery::Duplicate => Ok(AckOutcome::Stored),
        Delivery::Replayed => {
            tracing::warn!(
                "message {} from {} reuses number {}: replay refused",
                env.id,
                env.sender,
                seq
            );
            Ok(AckOutcome::Rejected)
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

/// What to answer for one envelope; `None` leaves it queued on the relay.
async fn decide(
    agent: &Agent,
    client: &RelayClient,
    env: Envelope,
    relay_ms: u64,
) -> Result<Option<AckOutcome>, ClientError> {
    match agent.store.seen(&env.id) {
        Ok(Some(Seen::Inbox | Seen::Held)) => return Ok(Some(AckOutcome::Stored)),
        Ok(Some(Seen::Rejected)) => return Ok(Some(AckOutcome::Rejected)),
        Ok(None) => {}
        Err(e) => {
            tracing::error!("store: {e}");
            return Ok(None);
        }
    }
    let (Some(me), Ok(keys)) = (agent.username(), agent.ready_keys()) else {
        return Ok(None);
    };
    if let Err(e) = env.check_shape() {
        return Ok(reject(agent, &env, &e.to_string()));
    }
    // Before the name reaches the directory, the pins or a terminal.
    if let Err(e) = validate_username(&env.sender) {
        return Ok(reject(agent, &env, &format!("invalid sender name: {e}")));
    }
    if env.slot(&me).is_none() {
        let names: Vec<String> = env.recipients().map(|n| format!("{n:?}")).collect();
        let why = format!("addressed to {}, not to us", names.join(", "));
        return Ok(reject(agent, &env, &why));
    }
    let pinned = match agent.store.pin(&env.sender) {
        Ok(Some(der)) => match PublicKey::from_der(&der) {
            Ok(k) => k,
            Err(e) => return Ok(reject(agent, &env, &format!("pinned key unusable: {e}"))),
        },
        Ok(None) => match agent.directory_key(client, &env.sender).await {
            Ok(k) => {
                if let Err(e) = agent.store.set_pin(&env.sender, k.as_der()) {
                    tracing::error!("store: {e}");
                    return Ok(None);
                }
                k
            }
            Err(ClientError::Relay(r)) if r.code == ErrorCode::UnknownUser => {
                return Ok(reject(agent, &env, "sender is not a known user"));
            }
            Err(ClientError::Crypto(e)) => {
                return Ok(reject(agent, &env, &format!("sender's key unusable: {e}")));
            }
            Err(e) => return Err(e),
        },
        Err(e) => {
            tracing::error!("store: {e}");
            return Ok(None);
        }
    };
    match open_any(&env, &me, &keys, &pinned) {
        Ok(body) if env.kind == Kind::Receipt => Ok(receipt(agent, &keys, &env, &body)),
        Ok(body) => match deliver(agent, &keys, &me, &env, &body, &pinned, Some(relay_ms)) {
            Ok(outcome) => Ok(Some(outcome)),
            Err(e) => {
                tracing::error!("store: {e}");
                Ok(None)
            }
        },
        Err(CryptoError::BadSignature) => {
            // Either forged, or the sender rotated their key: ask the directory.
            let current = match agent.directory_key(client, &env.sender).await {
                Ok(k) => Some(k),
                Err(ClientError::Relay(_) | ClientError::Crypto(_)) => None,
                Err(e) => return Err(e),
            };
            match current {
                Some(k) if k != pinned => {
                    let reason = format!(
                        "sender key changed (pinned {}, directory {}); run `chat-cli trust {}` \
                         after checking it",
                        pinned.fingerprint(),
                        k.fingerprint(),
                        env.sender
                    );
                    tracing::warn!("holding message {} from {}: {reason}", env.id, env.sender);
                    match agent.store.hold(&env, &reason) {
                        Ok(()) => Ok(Some(AckOutcome::Stored)),
                        Err(e) => {
                            tracing::error!("store: {e}");
                            Ok(None)
                        }
                    }
                }
                _ => Ok(reject(
                    agent,
                    &env,
                    "bad signature (not signed by the pinned key)",
                )),
            }
        }
        Err(e) => Ok(reject(agent, &env, &e.to_string())),
    }
}
