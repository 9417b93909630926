//! What agentd does for each chat-cli request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use securechat_common::crypto::{CryptoError, Fingerprint};
use securechat_common::envelope::{seal, seal_for, Envelope, Header, Kind, SealParams, To};
use securechat_common::ipc::{
    BroadcastFailure, DeliveryState, DoctorInfo, FingerprintInfo, IpcError, IpcErrorKind,
    IpcRequest, IpcResponse, SentInfo, SentMessage, MAX_MARK_READ,
};
use securechat_common::limits::{
    validate_email, validate_password, validate_username, MAX_MESSAGE_LEN, MAX_RECIPIENTS,
};
use securechat_common::protocol::{AckOutcome, DirectoryEntry, Request, Response};
use securechat_common::{IdentityKey, MessageId, PublicKey};
use zeroize::Zeroizing;

use crate::agent::{
    certificate_refused, err, now_ms, open_inbox, relay_error, unlock_keys, Agent, Keys, ReadyKeys,
};
use crate::keystore::{self, KeyStoreError, Sealer, Session};
use crate::receive::{deliver, open_any, receipt};
use crate::rotation;
use crate::store::StoreError;
use securechat_client::relay::{ClientError, RelayClient, ServerTrust};

fn unexpected(what: &str, got: &Response) -> IpcError {
    err(
        IpcErrorKind::Internal,
        format!("unexpected answer from the relay to {what}: {got:?}"),
    )
}

fn invalid(e: String) -> IpcError {
    err(IpcErrorKind::InvalidInput, e)
}

async fn generate(agent: &Agent) -> Result<IdentityKey, IpcError> {
    let size = agent.config.key_size;
    tokio::task::spawn_blocking(move || IdentityKey::generate(size))
        .await
        .map_err(|e| err(IpcErrorKind::Internal, e.to_string()))?
        .map_err(|e| err(IpcErrorKind::Crypto, e.to_string()))
}

/// Answer one request (everything but `Hello` and the streamed ones).
pub(crate) async fn handle(agent: &Arc<Agent>, req: IpcRequest) -> Result<IpcResponse, IpcError> {
    match req {
        IpcRequest::Register {
            username,
            email,
            password,
        } => register(agent, username, email, password).await,
        IpcRequest::Verify { code } => verify(agent, code).await,
        IpcRequest::Login {
            username,
            password,
            totp,
        } => login(agent, username, password, totp).await,
        IpcRequest::Logout => logout(agent).await,
        IpcRequest::Status => Ok(IpcResponse::Status(Box::new(agent.status()?))),
        IpcRequest::Send { to, text, .. } => {
            let (client, me) = agent.logged_in_client().await?;
            Ok(IpcResponse::Sent(
                send_one(agent, &client, &me, &to, &text).await?,
            ))
        }
        IpcRequest::Cancel => Err(err(
            IpcErrorKind::BadRequest,
            "nothing to cancel: no cancellable send is running on this connection",
        )),
        IpcRequest::Doctor => Ok(IpcResponse::Doctor(Box::new(doctor(agent).await))),
        IpcRequest::Broadcast { text } => broadcast(agent, text).await,
        IpcRequest::MarkRead { ids } => mark_read(agent, &ids).await,
        IpcRequest::Online => {
            let (client, _) = agent.logged_in_client().await?;
            Ok(IpcResponse::Online {
                users: online(&client).await?,
            })
        }
        IpcRequest::Fingerprint { user } => fingerprint(agent, user).await,
        IpcRequest::Trust { user, fingerprint } => trust(agent, user, fingerprint).await,
        IpcRequest::RotateKey { password, totp } => rotate_key(agent, password, totp).await,
        IpcRequest::Unlock { passphrase } => unlock(agent, passphrase).await,
        IpcRequest::SetPassphrase { passphrase } => set_passphrase(agent, passphrase).await,
        IpcRequest::Hello { .. }
        | IpcRequest::Events { .. }
        | IpcRequest::History { .. }
        | IpcRequest::Contacts
        | IpcRequest::Inbox { .. }
        | IpcRequest::Held => Err(err(
            IpcErrorKind::BadRequest,
            "this request is not allowed here",
        )),
        _ => Err(err(IpcErrorKind::BadRequest, "unknown request")),
    }
}

async fn register(
    agent: &Arc<Agent>,
    username: String,
    email: String,
    password: Zeroizing<String>,
) -> Result<IpcResponse, IpcError> {
    validate_username(&username).map_err(invalid)?;
    validate_email(&email).map_err(invalid)?;
    validate_password(&password).map_err(invalid)?;
    let _op = agent.op_lock.lock().await;
    if agent.conn().logged_in {
        return Err(err(
            IpcErrorKind::AlreadyLoggedIn,
            "this agent is logged in to an account already; `chat-cli logout` first",
        ));
    }
    let keys = match agent.ready_keys() {
        Ok(k) => k,
        Err(e) if e.kind == IpcErrorKind::NotRegistered => {
            let key = generate(agent).await?;
            let keys = on_store(agent, move |a| -> Result<ReadyKeys, KeyStoreError> {
                let paths = &a.config.paths;
                keystore::save_key(&paths.identity_key(), &key, None)?;
                Ok(ReadyKeys {
                    current: Arc::new(key),
                    old: Vec::new(),
                    pending: None,
                    sealer: None,
                    inbox: open_inbox(paths, &a.store, None)?,
                })
            })
            .await?;
            agent.set_keys(Keys::Ready(keys.clone()));
            keys
        }
        Err(e) => return Err(e),
    };
    let client = agent.any_client().await?;
    let req = Request::Register {
        username: username.clone(),
        email,
        password,
        public_key: keys.current.public_key().as_der().to_vec(),
    };
    // Remember the name before the relay hears of it: if agentd dies after
    // the relay accepted, `verify` still works after a restart. A refusal
    // puts the earlier value back.
    let name = username.clone();
    let previous = on_store(agent, move |a| {
        let previous = a.store.setting("pending_username")?;
        a.store.set_setting("pending_username", &name)?;
        Ok::<_, StoreError>(previous)
    })
    .await?;
    let answer = match client.call(&req).await {
        Err(e @ ClientError::Relay(_)) => {
            on_store(agent, move |a| {
                a.store
                    .set_setting("pending_username", previous.as_deref().unwrap_or(""))
            })
            .await?;
            return Err(relay_error(e));
        }
        other => other.map_err(relay_error)?,
    };
    match answer {
        Response::RegisterPending { expires_in_secs } => Ok(IpcResponse::RegisterPending {
            username,
            expires_in_secs,
            fingerprint: keys.current.public_key().fingerprint().to_string(),
        }),
        other => Err(unexpected("Register", &other)),
    }
}

async fn verify(agent: &Arc<Agent>, code: Zeroizing<String>) -> Result<IpcResponse, IpcError> {
    // A finished registration leaves the setting empty: nothing is pending.
    let pending = agent.store.setting("pending_username")?;
    let Some(username) = pending.filter(|u| !u.is_empty()) else {
        return Err(err(
            IpcErrorKind::NoPendingRegistration,
            "no registration is waiting for a code; run `chat-cli register` first",
        ));
    };
    let client = agent.any_client().await?;
    let req = Request::Verify {
        username: username.clone(),
        code,
    };
    match client.call(&req).await.map_err(relay_error)? {
        Response::Verified {
            otpauth_uri,
            secret_base32,
        } => {
            // The pending name stays until the first login: if this answer
            // is lost on its way to chat-cli, `verify` with the same code
            // asks the relay again, which repeats it until then.
            let name = username.clone();
            on_store(agent, move |a| a.store.set_setting("username", &name)).await?;
            Ok(IpcResponse::Verified {
                username,
                otpauth_uri,
                secret_base32,
            })
        }
        other => Err(unexpected("Verify", &other)),
    }
}

async fn login(
    agent: &Arc<Agent>,
    username: String,
    password: Zeroizing<String>,
    totp: Zeroizing<String>,
) -> Result<IpcResponse, IpcError> {
    validate_username(&username).map_err(invalid)?;
    let keys = agent.ready_keys()?;
    let _op = agent.op_lock.lock().await;
    if agent.conn().logged_in {
        return Err(err(
            IpcErrorKind::AlreadyLoggedIn,
            "already logged in; agentd keeps the session (run `chat-cli logout` to end it)",
        ));
    }
    let client = agent.any_client().await?;
    // With an interrupted rotation on disk this also settles which key the
    // relay holds (a refused signature does not use up the TOTP code).
    let (c, u, p, t) = (
        &*client,
        username.as_str(),
        password.as_str(),
        totp.as_str(),
    );
    let done = rotation::with_either_key(agent, c, u, &keys, move |key| async move {
        c.login(u, p, t, &key).await
    })
    .await
    .map_err(relay_error)?;
    let Some(token) = done.token else {
        return Err(err(
            IpcErrorKind::Internal,
            "the relay sent no session token",
        ));
    };
    // The name first: a session file always has its account name beside it.
    // A login ends any registration: `verify` has nothing left to repeat.
    let session = Session {
        username: username.clone(),
        token,
    };
    on_store(agent, move |a| -> Result<(), IpcError> {
        a.store
            .set_settings(&[("username", &session.username), ("pending_username", "")])?;
        keystore::save_session(&a.config.paths.session(), &session)?;
        Ok(())
    })
    .await?;
    agent.set_logged_in(true);
    Ok(IpcResponse::LoggedIn {
        username,
        unread: done.unread,
    })
}

async fn logout(agent: &Arc<Agent>) -> Result<IpcResponse, IpcError> {
    let conn = agent.conn();
    // A connection whose session the relay ended (or that had none) is
    // clean and stays up, so a `login` right after uses it. One that did
    // not answer may still carry the session: it is replaced.
    let mut clean = true;
    if let (Some(client), true) = (conn.client, conn.logged_in) {
        match client.call(&Request::Logout).await {
            Ok(_) | Err(ClientError::Relay(_)) => {}
            Err(e) => {
                tracing::warn!("logout on the relay failed: {e}; reconnecting");
                clean = false;
            }
        }
    }
    on_store(agent, |a| {
        keystore::remove_session(&a.config.paths.session())
    })
    .await?;
    agent.set_logged_in(false);
    if !clean {
        agent.set_conn(None, false);
        agent.request_reconnect();
    }
    Ok(IpcResponse::Ok)
}

async fn online(client: &RelayClient) -> Result<Vec<String>, IpcError> {
    match client.call(&Request::Online).await.map_err(relay_error)? {
        Response::Online { users } => Ok(users),
        other => Err(unexpected("Online", &other)),
    }
}

/// Refuse a send that can never work (bad recipient name, too long).
pub(crate) fn check_send(to: &str, text: &str) -> Result<(), IpcError> {
    validate_username(to).map_err(|e| invalid(format!("recipient: {e}")))?;
    check_text(text)
}

/// Refuse a text that cannot be a message: empty, blank, or too long.
pub(crate) fn check_text(text: &str) -> Result<(), IpcError> {
    if text.trim().is_empty() {
        return Err(invalid(
            "the message is empty; type some text (nothing was sent)".to_string(),
        ));
    }
    if text.len() > MAX_MESSAGE_LEN {
        return Err(invalid(format!(
            "message of {} bytes is larger than the limit of {MAX_MESSAGE_LEN} bytes",
            text.len()
        )));
    }
    Ok(())
}

/// A fresh message id.
pub(crate) fn new_message_id() -> Result<MessageId, IpcError> {
    MessageId::random().map_err(|e| err(IpcErrorKind::Crypto, e.to_string()))
}

pub(crate) async fn send_one(
    agent: &Arc<Agent>,
    client: &RelayClient,
    me: &str,
    to: &str,
    text: &str,
) -> Result<SentInfo, IpcError> {
    check_send(to, text)?;
    let id = new_message_id()?;
    send_as(agent, client, me, to, text, id, &AtomicBool::new(false)).await
}

/// A cancellable send of message `id` (see `IpcRequest::Send`): waits for
/// a logged-in relay connection, then sends. `committed` turns true at the
/// point after which the message may reach the relay; until then, dropping
/// the future leaves nothing behind (no sequence number taken, nothing sent).
pub(crate) async fn send_cancellable(
    agent: &Arc<Agent>,
    to: &str,
    text: &str,
    id: MessageId,
    committed: &AtomicBool,
) -> Result<SentInfo, IpcError> {
    let (client, me) = agent.logged_in_client().await?;
    send_as(agent, &client, &me, to, text, id, committed).await
}

/// Run `f` on the blocking pool (see [`Agent::blocking`]): every commit
/// and durable file write of a request (each an fsync) goes through here,
/// so that a slow disk holds up this request, not the runtime's threads.
pub(crate) async fn on_store<T, E, F>(agent: &Arc<Agent>, f: F) -> Result<T, IpcError>
where
    T: Send + 'static,
    E: Into<IpcError> + Send + 'static,
    F: FnOnce(&Agent) -> Result<T, E> + Send + 'static,
{
    agent.blocking(f).await?.map_err(Into::into)
}

/// Take the number for a message to `to`, keep it in the sent history as
/// `sending` (one durable commit), and seal it (number and envelope): one trip to the blocking
/// pool, since the seal needs the number and the RSA signature is as much
/// CPU as the commit is disk. A seal that fails gives the number back and
/// records the failure.
fn begin_and_seal(
    agent: &Agent,
    keys: &ReadyKeys,
    me: &str,
    to: &str,
    recipient_key: &PublicKey,
    sent: &SentMessage,
    id: MessageId,
) -> Result<Result<(u64, Envelope), IpcError>, StoreError> {
    let seq = match agent.store.begin_send(&keys.inbox, sent)?.as_slice() {
        [seq] => *seq,
        _ => return Ok(Err(err(IpcErrorKind::Internal, "no sequence number taken"))),
    };
    let params = SealParams {
        sender_key: &keys.current,
        sender: me,
        recipient: to,
        recipient_key,
        id,
        seq,
        timestamp_ms: sent.sent_ms,
    };
    match seal(&params, sent.text.as_bytes()) {
        Ok(envelope) => Ok(Ok((seq, envelope))),
        Err(e) => {
            let e = err(IpcErrorKind::Crypto, e.to_string());
            agent.store.release_seq(to, seq)?;
            let failed = [(to, DeliveryState::Failed, Some(e.message.clone()))];
            agent.store.update_sent(&keys.inbox, &id, &failed)?;
            Ok(Err(e))
        }
    }
}

async fn send_as(
    agent: &Arc<Agent>,
    client: &RelayClient,
    me: &str,
    to: &str,
    text: &str,
    id: MessageId,
    committed: &AtomicBool,
) -> Result<SentInfo, IpcError> {
    check_send(to, text)?;
    let keys = agent.ready_keys()?;
    let recipient_key = agent.recipient_key(client, to).await?;
    // One send at a time per recipient, so that numbers go out in order and
    // a refused one can be given back.
    let lane = agent.send_lane(to);
    let _lane = lane.lock().await;
    // From here on a cancel finds the send committed and lets it finish (the
    // IPC server keeps polling it); before this, dropping the future leaves
    // nothing done.
    committed.store(true, Ordering::SeqCst);
    // Kept before it leaves, with its number taken in the same commit: a
    // crash after the relay stored it must not lose it from the history.
    let sent = SentMessage::sending(
        id.to_string(),
        false,
        text.to_string(),
        now_ms(),
        &[to.to_string()],
    );
    let sealed = {
        let (keys, me, to) = (keys.clone(), me.to_string(), to.to_string());
        on_store(agent, move |a| {
            begin_and_seal(a, &keys, &me, &to, &recipient_key, &sent, id)
        })
        .await?
    };
    let (seq, envelope) = sealed?;
    let answer = client.call(&Request::Send { envelope }).await;
    let result = match answer {
        Ok(Response::Stored { id, duplicate }) => Ok(SentInfo {
            to: to.to_string(),
            id: id.to_string(),
            duplicate,
        }),
        // A refusal: the relay stored nothing, the number is free again.
        // (Without an answer it may have stored it: the number stays used.)
        Err(e @ ClientError::Relay(_)) => Err((relay_error(e), true)),
        Err(e) => Err((relay_error(e), false)),
        Ok(other) => Err((unexpected("Send", &other), false)),
    };
    let (inbox, user) = (keys.inbox.clone(), to.to_string());
    match &result {
        // The message is on the relay's disk and in our history already:
        // only its state is news, and that need not wait for an fsync.
        Ok(_) => {
            on_store(agent, move |a| {
                let queued = [(user.as_str(), DeliveryState::Queued, None)];
                a.store.update_sent_relaxed(&inbox, &id, &queued)
            })
            .await?;
        }
        Err((e, true)) => {
            let detail = Some(e.message.clone());
            on_store(agent, move |a| {
                a.store.release_seq(&user, seq)?;
                let failed = [(user.as_str(), DeliveryState::Failed, detail)];
                a.store.update_sent(&inbox, &id, &failed)
            })
            .await?;
        }
        // No answer: it may be stored; it stays `sending`.
        Err((_, false)) => {}
    }
    result.map_err(|(e, _)| e)
}

async fn mark_read(agent: &Arc<Agent>, ids: &[String]) -> Result<IpcResponse, IpcError> {
    if ids.len() > MAX_MARK_READ {
        return Err(invalid(format!(
            "at most {MAX_MARK_READ} ids per mark_read request"
        )));
    }
    let ids = ids
        .iter()
        .map(|s| MessageId::from_hex(s).ok_or_else(|| invalid(format!("not a message id: {s:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    on_store(agent, move |a| a.store.mark_read(&ids)).await?;
    Ok(IpcResponse::Ok)
}

/// Most users a broadcast is sealed for (the directory is read up to here).
const MAX_BROADCAST_USERS: usize = 10_000;

/// Everyone in the relay's directory, read page by page.
async fn directory(client: &RelayClient) -> Result<Vec<DirectoryEntry>, IpcError> {
    let mut users: Vec<DirectoryEntry> = Vec::new();
    loop {
        let after = users.last().map(|e| e.username.clone());
        match client
            .call(&Request::Directory { after })
            .await
            .map_err(relay_error)?
        {
            Response::Directory { users: page, more } => {
                let empty = page.is_empty();
                users.extend(page);
                if !more || empty || users.len() >= MAX_BROADCAST_USERS {
                    return Ok(users);
                }
            }
            other => return Err(unexpected("Directory", &other)),
        }
    }
}

/// Send `text` to every other registered user: sealed once per group of
/// [`MAX_RECIPIENTS`], its key wrapped for each, signed once, marked as a
/// broadcast inside the signed part. Offline users get it when they come
/// back. A user whose key changed is skipped, as a direct send would be.
async fn broadcast(agent: &Arc<Agent>, text: String) -> Result<IpcResponse, IpcError> {
    check_text(&text)?;
    let (client, me) = agent.logged_in_client().await?;
    let keys = agent.ready_keys()?;
    let entries = directory(&client).await?;
    // Pins checked (and first ones written) in one go, off the runtime.
    let me2 = me.clone();
    let (targets, mut failed) = on_store(agent, move |a| {
        let mut failed = Vec::new();
        let mut targets: Vec<(String, PublicKey)> = Vec::new();
        for entry in entries {
            if entry.username == me2 || validate_username(&entry.username).is_err() {
                continue;
            }
            let key = PublicKey::from_der(&entry.public_key)
                .map_err(|e| err(IpcErrorKind::Crypto, format!("{}: {e}", entry.username)))
                .and_then(|k| a.check_pin(&entry.username, k));
            match key {
                Ok(k) => targets.push((entry.username, k)),
                Err(error) => failed.push(BroadcastFailure {
                    to: entry.username,
                    error,
                }),
            }
        }
        Ok::<_, StoreError>((targets, failed))
    })
    .await?;
    let id = new_message_id()?;
    let now = now_ms();
    let names: Vec<String> = targets.iter().map(|(user, _)| user.clone()).collect();
    let sent_record = SentMessage::sending(id.to_string(), true, text.clone(), now, &names);
    let all_seqs = if targets.is_empty() {
        Vec::new()
    } else {
        let inbox = keys.inbox.clone();
        on_store(agent, move |a| a.store.begin_send(&inbox, &sent_record)).await?
    };
    let mut sent = Vec::new();
    for (group, seqs) in targets
        .chunks(MAX_RECIPIENTS)
        .zip(all_seqs.chunks(MAX_RECIPIENTS))
    {
        let to: Vec<To<'_>> = group
            .iter()
            .zip(seqs)
            .map(|((name, key), seq)| To {
                name,
                key,
                seq: *seq,
            })
            .collect();
        let header = Header {
            sender_key: &keys.current,
            sender: &me,
            kind: Kind::Broadcast,
            id,
            timestamp_ms: now,
        };
        let envelope = seal_for(&header, &to, text.as_bytes())
            .map_err(|e| err(IpcErrorKind::Crypto, e.to_string()))?;
        let mut updates: Vec<(&str, DeliveryState, Option<String>)> = Vec::new();
        let mut released: Vec<(String, u64)> = Vec::new();
        match client.call(&Request::Send { envelope }).await {
            Ok(Response::Fanout {
                stored, refused, ..
            }) => {
                for user in stored {
                    if let Some((name, _)) = group.iter().find(|(n, _)| *n == user) {
                        updates.push((name, DeliveryState::Queued, None));
                        sent.push(SentInfo {
                            to: user,
                            id: id.to_string(),
                            duplicate: false,
                        });
                    }
                }
                for r in refused {
                    let Some(((name, _), seq)) =
                        group.iter().zip(seqs).find(|((n, _), _)| *n == r.user)
                    else {
                        continue;
                    };
                    released.push((name.clone(), *seq));
                    let error: IpcError = relay_error(ClientError::Relay(r.error));
                    updates.push((name, DeliveryState::Failed, Some(error.message.clone())));
                    failed.push(BroadcastFailure {
                        to: name.clone(),
                        error,
                    });
                }
            }
            Ok(other) => return Err(unexpected("Send", &other)),
            Err(e) => {
                let refused = matches!(e, ClientError::Relay(_));
                let error: IpcError = relay_error(e);
                for ((name, _), seq) in group.iter().zip(seqs) {
                    if refused {
                        released.push((name.clone(), *seq));
                        updates.push((name, DeliveryState::Failed, Some(error.message.clone())));
                    }
                    failed.push(BroadcastFailure {
                        to: name.clone(),
                        error: error.clone(),
                    });
                }
            }
        }
        let updates: Vec<(String, DeliveryState, Option<String>)> = updates
            .into_iter()
            .map(|(name, state, detail)| (name.to_string(), state, detail))
            .collect();
        let inbox = keys.inbox.clone();
        on_store(agent, move |a| {
            for (name, seq) in &released {
                a.store.release_seq(name, *seq)?;
            }
            let updates: Vec<(&str, DeliveryState, Option<String>)> = updates
                .iter()
                .map(|(name, state, detail)| (name.as_str(), *state, detail.clone()))
                .collect();
            a.store.update_sent(&inbox, &id, &updates)
        })
        .await?;
    }
    Ok(IpcResponse::Broadcast { sent, failed })
}

/// How long `doctor` waits for the relay to tell its time.
const CLOCK_WAIT: Duration = Duration::from_secs(5);

/// The facts `chat-cli doctor` needs from agentd, measured now.
async fn doctor(agent: &Agent) -> DoctorInfo {
    let conn = agent.conn();
    let relay = agent.config.relay.as_ref();
    let relay_trust = relay.map(|r| match &r.trust {
        ServerTrust::Fingerprint(fp) => format!("sha256:{}", hex::encode(fp)),
        ServerTrust::CaCert(_) => "ca".to_string(),
    });
    let mut info = DoctorInfo {
        relay: agent.relay_in_use().map(|r| r.display.clone()),
        relay_trust,
        certificate_rejected: conn.refused.clone(),
        clock_offset_ms: None,
        clock_rtt_ms: None,
        clock_error: None,
    };
    let Some(client) = conn.client else {
        info.clock_error = Some("agentd is not connected to the relay".into());
        return info;
    };
    let start = std::time::Instant::now();
    let before = now_ms();
    match tokio::time::timeout(CLOCK_WAIT, client.call(&Request::Time)).await {
        Ok(Ok(Response::Time { unix_ms })) => {
            let rtt = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            // The relay read its clock about half way through the round trip.
            let ours = before.saturating_add(rtt / 2);
            info.clock_offset_ms = Some(signed_diff(unix_ms, ours));
            info.clock_rtt_ms = Some(rtt);
        }
        Ok(Err(ClientError::Relay(e))) => {
            info.clock_error = Some(format!(
                "the relay does not tell its time (an older version?): {}",
                e.message
            ));
        }
        Ok(Ok(other)) => info.clock_error = Some(unexpected("Time", &other).message),
        Ok(Err(e)) => info.clock_error = Some(e.to_string()),
        Err(_) => {
            info.clock_error = Some(format!(
                "the relay did not answer within {} s",
                CLOCK_WAIT.as_secs()
            ))
        }
    }
    info
}

/// `a - b` as a signed number, saturating.
fn signed_diff(a: u64, b: u64) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        i64::try_from(b - a).map(|d| -d).unwrap_or(i64::MIN)
    }
}

async fn fingerprint(agent: &Agent, user: Option<String>) -> Result<IpcResponse, IpcError> {
    let Some(user) = user else {
        let keys = agent.ready_keys()?;
        return Ok(IpcResponse::Fingerprint(FingerprintInfo {
            user: agent.username(),
            own: true,
            pinned: Some(keys.current.public_key().fingerprint().to_string()),
            directory: None,
        }));
    };
    validate_username(&user).map_err(invalid)?;
    let pinned = agent
        .store
        .pin(&user)?
        .and_then(|der| securechat_common::PublicKey::from_der(&der).ok())
        .map(|k| k.fingerprint().to_string());
    let conn = agent.conn();
    let directory = match (conn.client, conn.logged_in) {
        (Some(client), true) => match agent.directory_key(&client, &user).await {
            Ok(k) => Some(k.fingerprint().to_string()),
            Err(ClientError::Relay(r)) if pinned.is_none() => {
                return Err(relay_error(ClientError::Relay(r)))
            }
            Err(_) => None,
        },
        _ => None,
    };
    Ok(IpcResponse::Fingerprint(FingerprintInfo {
        user: Some(user),
        own: false,
        pinned,
        directory,
    }))
}

async fn trust(
    agent: &Arc<Agent>,
    user: String,
    fingerprint: String,
) -> Result<IpcResponse, IpcError> {
    validate_username(&user).map_err(invalid)?;
    let Some(wanted) = Fingerprint::parse(&fingerprint) else {
        return Err(invalid(
            "the fingerprint must be 64 hex digits, as `chat-cli fingerprint <user>` shows it \
             (spaces and colons are ignored)"
                .to_string(),
        ));
    };
    let (client, me) = agent.logged_in_client().await?;
    let _op = agent.op_lock.lock().await;
    let key = agent
        .directory_key(&client, &user)
        .await
        .map_err(relay_error)?;
    if key.fingerprint() != wanted {
        return Err(err(
            IpcErrorKind::FingerprintMismatch,
            format!(
                "nothing was trusted: the relay's directory gives {user} the key {}, not the one \
                 you checked. Check the fingerprint with {user} again; if it is right, the relay \
                 is not serving their key",
                key.fingerprint()
            ),
        ));
    }
    tracing::info!("trusting the key of {user}: {}", key.fingerprint());
    let keys = agent.ready_keys()?;
    let (user2, key2) = (user.clone(), key.clone());
    let released = on_store(agent, move |a| release_held(a, &keys, &me, &user2, &key2)).await?;
    Ok(IpcResponse::Trusted {
        user,
        fingerprint: key.fingerprint().to_string(),
        released,
    })
}

/// Pin `key` for `user` as verified and release what was held from them
/// (receipts applied, messages delivered); returns how many messages were
/// released. Database work throughout, run on the blocking pool.
fn release_held(
    agent: &Agent,
    keys: &ReadyKeys,
    me: &str,
    user: &str,
    key: &PublicKey,
) -> Result<u64, StoreError> {
    agent.set_pin(user, key.as_der())?;
    agent.store.set_verified(user)?;
    let mut released = 0;
    for env in agent.store.held_from(user)? {
        match open_any(&env, me, keys, key) {
            Ok(body) if env.kind == Kind::Receipt => {
                receipt(agent, keys, &env, &body);
                agent.store.unhold(&env.id)?;
            }
            Ok(body) => {
                if deliver(agent, keys, me, &env, &body, key, None)? == AckOutcome::Stored {
                    released += 1;
                }
            }
            // Signed by some other key: it stays held, whatever the user
            // trusts, until the key that signed it is trusted.
            Err(CryptoError::BadSignature) => agent.store.hold(
                &env,
                &format!(
                    "signed by neither the pinned key nor {}; still held",
                    key.fingerprint()
                ),
            )?,
            Err(e) => agent.store.reject(&env.id, &env.sender, &e.to_string())?,
        }
    }
    Ok(released)
}

fn unsettled_rotation(agent: &Agent) -> IpcError {
    agent.request_reconnect();
    err(
        IpcErrorKind::RelayUnavailable,
        "an earlier key rotation was interrupted and is not settled yet; agentd settles it \
         when it reconnects to the relay, try again shortly",
    )
}

/// [`rotation::abandon`] on the blocking pool (it rewrites key files).
async fn abandon(agent: &Arc<Agent>, key: &Arc<IdentityKey>) -> Result<(), IpcError> {
    let key = Arc::clone(key);
    on_store(agent, move |a| rotation::abandon(a, &key)).await
}

async fn rotate_key(
    agent: &Arc<Agent>,
    password: Zeroizing<String>,
    totp: Zeroizing<String>,
) -> Result<IpcResponse, IpcError> {
    let (_main, me) = agent.logged_in_client().await?;
    let Some(relay) = agent.config.relay.clone() else {
        return Err(err(IpcErrorKind::NoRelay, "no relay configured"));
    };
    let _op = agent.op_lock.lock().await;
    let keys = agent.ready_keys()?;
    if keys.pending.is_some() {
        return Err(unsettled_rotation(agent));
    }
    let new_key = Arc::new(generate(agent).await?);
    // The new key is on disk before the relay can hear of it.
    let key = Arc::clone(&new_key);
    if !on_store(agent, move |a| rotation::begin(a, &key)).await? {
        return Err(unsettled_rotation(agent));
    }
    // A fresh full login with the old key on a separate connection, then the
    // new key proves possession and is published.
    let side = match resolve_and_connect(agent, &relay).await {
        Ok(side) => side,
        Err(e) => {
            abandon(agent, &new_key).await?;
            return Err(e);
        }
    };
    let done = match side.login(&me, &password, &totp, &keys.current).await {
        Ok(done) => done,
        Err(e) => {
            side.close("rotation failed").await;
            abandon(agent, &new_key).await?;
            return Err(relay_error(e));
        }
    };
    let published = side.publish_key(&me, &new_key).await;
    side.close("key rotated").await;
    match published {
        Ok(()) => {}
        // A refusal: the relay kept the old key.
        Err(e @ ClientError::Relay(_)) => {
            abandon(agent, &new_key).await?;
            return Err(relay_error(e));
        }
        // No answer: the relay may or may not have taken the new key. Keep
        // both; the next connection finds out which one it holds.
        Err(e) => {
            rotation::keep_pending(agent, &new_key);
            agent.request_reconnect();
            return Err(err(
                IpcErrorKind::RelayUnavailable,
                format!(
                    "the relay's answer to the new key was lost ({e}); agentd keeps both keys \
                     and finishes or undoes the rotation when it reconnects"
                ),
            ));
        }
    }
    // The new session belongs to the account, whichever key signs resumes.
    let key = Arc::clone(&new_key);
    on_store(agent, move |a| -> Result<_, KeyStoreError> {
        if let Some(token) = done.token {
            let session = Session {
                username: me,
                token,
            };
            keystore::save_session(&a.config.paths.session(), &session)?;
        }
        rotation::finish(a, &key)
    })
    .await?;
    agent.request_reconnect();
    Ok(IpcResponse::KeyRotated {
        old_fingerprint: keys.current.public_key().fingerprint().to_string(),
        new_fingerprint: new_key.public_key().fingerprint().to_string(),
    })
}

async fn unlock(
    agent: &Arc<Agent>,
    passphrase: Zeroizing<String>,
) -> Result<IpcResponse, IpcError> {
    let Some(locked) = agent.locked_key() else {
        agent.ready_keys()?;
        return Ok(IpcResponse::Ok);
    };
    let paths = agent.config.paths.clone();
    let agent2 = Arc::clone(agent);
    let keys = tokio::task::spawn_blocking(move || {
        let _guard = agent2.rotation_guard();
        unlock_keys(&paths, &agent2.store, &locked, &passphrase)
    })
    .await
    .map_err(|e| err(IpcErrorKind::Internal, e.to_string()))??;
    agent.set_keys(Keys::Ready(keys));
    agent.request_reconnect();
    Ok(IpcResponse::Ok)
}

async fn set_passphrase(
    agent: &Arc<Agent>,
    passphrase: Option<Zeroizing<String>>,
) -> Result<IpcResponse, IpcError> {
    agent.ready_keys()?;
    let _op = agent.op_lock.lock().await;
    let sealer = match passphrase {
        Some(p) => Some(Arc::new(
            tokio::task::spawn_blocking(move || Sealer::new(&p))
                .await
                .map_err(|e| err(IpcErrorKind::Internal, e.to_string()))??,
        )),
        None => None,
    };
    // All key files change together: a crash leaves all of them under the
    // old passphrase or all under the new one (see keystore).
    on_store(agent, move |a| -> Result<(), IpcError> {
        let paths = &a.config.paths;
        let _guard = a.rotation_guard();
        let keys = a.ready_keys()?;
        if keys.pending.is_none() && paths.pending_key().exists() {
            return Err(unsettled_rotation(a));
        }
        keystore::reseal_all(paths, &keys.files(paths)?, sealer.as_deref())?;
        a.set_keys(Keys::Ready(ReadyKeys { sealer, ..keys }));
        Ok(())
    })
    .await?;
    Ok(IpcResponse::Ok)
}

/// A fresh connection to the relay in use (the relays of a list share one
/// state, and that one answered last), its address looked up now.
async fn resolve_and_connect(
    agent: &Agent,
    relay: &crate::RelaySettings,
) -> Result<RelayClient, IpcError> {
    let Some(at) = agent.relay_in_use() else {
        return Err(err(IpcErrorKind::NoRelay, "no relay configured"));
    };
    let addr = at.resolve().await.map_err(|e| {
        err(
            IpcErrorKind::RelayUnavailable,
            format!("cannot resolve the relay address {}: {e}", at.display),
        )
    })?;
    RelayClient::connect_named(addr, &at.server_name, relay.trust.clone())
        .await
        .map_err(|e| match e {
            ClientError::CertificateRejected { rejection, .. } => {
                certificate_refused(&at.display, &relay.list(), &rejection)
            }
            other => relay_error(other),
        })
}
