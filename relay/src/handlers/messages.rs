//! Directory lookups and pages, the online list, and the message queue
//! (send / ack / ack many).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use securechat_common::crypto::CryptoError;
use securechat_common::envelope::Kind;
use securechat_common::limits::{validate_username, MAX_ACK_BATCH, MAX_WATCH};
use securechat_common::protocol::{
    AckOutcome, ErrorCode, ErrorReply, Refusal, Response, DIRECTORY_PAGE,
};
use securechat_common::{Envelope, MessageId};

use super::{fail, internal, require_auth, whole_secs, Reply};
use crate::conn_state::ConnState;
use crate::shared::Shared;
use crate::store::{blocking, EnqueueOutcome};

pub(super) async fn lookup(shared: &Arc<Shared>, state: &ConnState, username: String) -> Reply {
    require_auth(state)?;
    if validate_username(&username).is_err() {
        // Not echoed: it may be anything, of any size.
        return Err(fail(
            ErrorCode::UnknownUser,
            "no user has that name (it breaks the username rules)",
        ));
    }
    let unknown = || {
        fail(
            ErrorCode::UnknownUser,
            format!("no user named {username:?}"),
        )
    };
    let name = username.clone();
    let account = blocking(&shared.store, move |s| s.account(&name))
        .await
        .map_err(|e| internal("directory lookup failed", e))?
        .ok_or_else(unknown)?;
    Ok(Response::Key {
        username,
        public_key: account.public_key,
    })
}

/// A page of the directory: what a client seals a broadcast for.
pub(super) async fn directory(
    shared: &Arc<Shared>,
    state: &ConnState,
    after: Option<String>,
) -> Reply {
    require_auth(state)?;
    if after
        .as_deref()
        .is_some_and(|a| validate_username(a).is_err())
    {
        // Not echoed: it may be anything, of any size.
        return Err(fail(
            ErrorCode::BadRequest,
            "the directory's `after` breaks the username rules; give the last name \
             of the previous page, or none for the first page",
        ));
    }
    let page = blocking(&shared.store, move |s| {
        s.directory(after.as_deref(), DIRECTORY_PAGE)
    })
    .await
    .map_err(|e| internal("reading the directory failed", e))?;
    Ok(Response::Directory {
        users: page.users,
        more: page.more,
    })
}

pub(super) fn online(shared: &Shared, state: &ConnState) -> Reply {
    require_auth(state)?;
    Ok(Response::Online {
        users: shared.hub.online(),
    })
}

pub(super) fn watch_presence(shared: &Shared, state: &ConnState, users: Vec<String>) -> Reply {
    let auth = require_auth(state)?;
    if users.len() > MAX_WATCH {
        return Err(fail(
            ErrorCode::BadRequest,
            format!(
                "a connection watches at most {MAX_WATCH} users; {} were asked for",
                users.len()
            ),
        ));
    }
    for (i, user) in users.iter().enumerate() {
        if let Err(e) = validate_username(user) {
            return Err(fail(
                ErrorCode::BadRequest,
                format!("watch list entry {i} is not a username ({e}); nothing changed"),
            ));
        }
    }
    let online = shared
        .hub
        .watch(&auth.username, state.id, users)
        .ok_or_else(|| {
            fail(
                ErrorCode::NotAuthenticated,
                "this connection is no longer the live one of its user (a newer one took over)",
            )
        })?;
    Ok(Response::Online { users: online })
}

pub(super) async fn send(shared: &Arc<Shared>, state: &ConnState, envelope: Envelope) -> Reply {
    let auth = require_auth(state)?;
    if let Err(wait) = super::acquire(shared, &shared.send_limiter, "send", &auth.username).await {
        shared
            .stats
            .send_rate_refusals
            .fetch_add(1, Ordering::Relaxed);
        let limit = shared.send_limiter.limit();
        return Err(fail(
            ErrorCode::RateLimited,
            format!(
                "you are sending too fast (at most {} messages per {} s); retry after {} s",
                limit.max,
                limit.window.as_secs(),
                whole_secs(wait)
            ),
        ));
    }
    // The shape first: it bounds the names before any is compared or shown.
    envelope.check_shape().map_err(|e| match e {
        CryptoError::TooLarge(_) => fail(ErrorCode::MessageTooLarge, e.to_string()),
        other => fail(ErrorCode::BadRequest, other.to_string()),
    })?;
    if envelope.sender != auth.username {
        return Err(fail(
            ErrorCode::NotSender,
            format!(
                "the envelope's sender is {:?}, but this connection is logged in as {:?}",
                envelope.sender, auth.username
            ),
        ));
    }
    if envelope.kind == Kind::Broadcast {
        return fanout(shared, auth.username, envelope).await;
    }
    // check_shape: a direct message or receipt has exactly one slot.
    let recipient = envelope.recipient().unwrap_or_default().to_string();
    let id = envelope.id;
    let outcome = enqueue_copy(shared, &auth.username, &envelope).await?;
    match outcome {
        Ok(duplicate) => Ok(Response::Stored { id, duplicate }),
        Err(refusal) => {
            debug_assert_eq!(refusal.user, recipient);
            Err(refusal.error)
        }
    }
}

/// Split a broadcast into one copy per recipient and queue each on its own
/// (the queue writer commits them together); one answer lists who has it.
async fn fanout(shared: &Arc<Shared>, sender: String, envelope: Envelope) -> Reply {
    let id = envelope.id;
    let copies = envelope.split();
    let results = futures_util::future::join_all(
        copies
            .iter()
            .map(|copy| enqueue_copy(shared, &sender, copy)),
    )
    .await;
    let mut stored = Vec::new();
    let mut refused = Vec::new();
    for (copy, result) in copies.iter().zip(results) {
        let user = copy.recipient().unwrap_or_default().to_string();
        match result? {
            Ok(_) => stored.push(user),
            Err(refusal) => refused.push(refusal),
        }
    }
    Ok(Response::Fanout {
        id,
        stored,
        refused,
    })
}

/// Queue one single-recipient copy. The outer error is the relay's own
/// failure (the whole request fails); the inner one a refusal for this
/// recipient; `Ok(duplicate)` otherwise.
async fn enqueue_copy(
    shared: &Arc<Shared>,
    sender: &str,
    envelope: &Envelope,
) -> Result<Result<bool, Refusal>, ErrorReply> {
    let recipient = envelope.recipient().unwrap_or_default().to_string();
    let refuse = |error: ErrorReply| {
        Ok(Err(Refusal {
            user: recipient.clone(),
            error,
        }))
    };
    let unknown = || {
        fail(
            ErrorCode::UnknownUser,
            format!("no user named {recipient:?}"),
        )
    };
    if validate_username(&recipient).is_err() {
        return refuse(unknown());
    }
    let bytes =
        postcard::to_stdvec(envelope).map_err(|e| internal("envelope encoding failed", e))?;
    let id = envelope.id;
    let now = shared.config.clock.unix_now();
    // Grouped with concurrent sends and acks into one durable commit.
    let outcome = shared
        .queue
        .enqueue(recipient.clone(), sender.to_string(), id, bytes, now)
        .await
        .map_err(|e| internal("storing a message failed", e))?;
    match outcome {
        EnqueueOutcome::Stored => {
            shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
            shared.hub.notify(&recipient);
            tracing::debug!(%id, "message stored");
            Ok(Ok(false))
        }
        EnqueueOutcome::Duplicate => Ok(Ok(true)),
        // One answer for both: how much waits for someone else, and from
        // whom, is not the sender's business.
        EnqueueOutcome::QuotaExceeded | EnqueueOutcome::SenderShareExceeded => {
            let counter = if outcome == EnqueueOutcome::QuotaExceeded {
                &shared.stats.quota_refusals
            } else {
                &shared.stats.sender_share_refusals
            };
            counter.fetch_add(1, Ordering::Relaxed);
            refuse(fail(
                ErrorCode::QuotaExceeded,
                format!(
                    "{recipient:?} cannot take more messages from you right now; \
                     try again later"
                ),
            ))
        }
        EnqueueOutcome::UnknownRecipient => refuse(unknown()),
    }
}

pub(super) async fn ack(
    shared: &Arc<Shared>,
    state: &ConnState,
    id: MessageId,
    outcome: AckOutcome,
) -> Reply {
    let auth = require_auth(state)?;
    let removed = shared
        .queue
        .ack(auth.username, id, shared.config.clock.unix_now())
        .await
        .map_err(|e| internal("acknowledging a message failed", e))?;
    if removed {
        shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%id, ?outcome, "message acknowledged");
    }
    Ok(Response::Ok)
}

/// Confirm many pushed messages in one durable commit: either all of them
/// are deleted or (the store failed) none, and the agent sends them again.
pub(super) async fn ack_many(
    shared: &Arc<Shared>,
    state: &ConnState,
    acks: Vec<(MessageId, AckOutcome)>,
) -> Reply {
    let auth = require_auth(state)?;
    if acks.len() > MAX_ACK_BATCH {
        return Err(fail(
            ErrorCode::BadRequest,
            format!(
                "{} acks in one request; at most {MAX_ACK_BATCH} are taken at once, \
                 send the rest in another",
                acks.len()
            ),
        ));
    }
    let ids: Vec<MessageId> = acks.iter().map(|(id, _)| *id).collect();
    let now = shared.config.clock.unix_now();
    let user = auth.username;
    // Straight to the store rather than through the queue writer: the batch
    // is already one transaction, and splitting it among the writer's
    // batches would lose its all-or-nothing commit.
    let removed = blocking(&shared.store, move |s| s.ack_many(&user, &ids, now))
        .await
        .map_err(|e| internal("acknowledging messages failed", e))?;
    let count = removed.iter().filter(|&&r| r).count() as u64;
    shared.stats.delivered.fetch_add(count, Ordering::Relaxed);
    tracing::debug!(acks = acks.len(), removed = count, "messages acknowledged");
    Ok(Response::Ok)
}
