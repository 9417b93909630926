//! Registration, login, sessions and key replacement.
//!
//! Registration survives a lost answer on either step. A `Register` for a
//! name whose registration is still pending, with the same email, key and
//! password, replaces it: a new code is mailed and the old one stops
//! working. A `Verify` for an account that the same code activated and that
//! has not logged in yet, before the code's expiry, is answered again with
//! the same TOTP secret; wrong codes there count against the same attempts.
//!
//! Login checks, in order: the per-source attempt limit, the connection's
//! challenge, the password-guessing limits (per account and source, with
//! growing delays, and per account; see [`crate::ratelimit`]), password
//! (an unknown user costs the same argon2 time), TOTP (±1 step, later than
//! the last one used), the signature over the challenge transcript bound to
//! this TLS session, and finally records the TOTP step so the code cannot
//! be used again. An unknown user, a wrong password and a wrong or used code
//! all get the same answer ([`ErrorCode::InvalidCredentials`], same text):
//! only the holder of both the password and a fresh code learns that the
//! signature failed ([`ErrorCode::InvalidSignature`]).
//!
//! A resume involves no password and no attempt or guessing limit: a valid
//! session token and a fresh signature by the account key always get in,
//! whatever others have tried against the account's password, from
//! wherever.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use securechat_common::crypto::{login_transcript, random_bytes, sha256, LoginPurpose};
use securechat_common::limits::{
    validate_email, validate_password, validate_username, FRESH_LOGIN_SECS,
};
use securechat_common::protocol::{ErrorCode, ErrorReply, Response, BINDING_LEN};
use securechat_common::PublicKey;
use zeroize::Zeroizing;

use super::{
    check_password, fail, internal, limit_peer, require_auth, reserve_password_check, whole_secs,
    Reply,
};
use crate::accounts::{check_totp, code_hash, code_matches, new_code, new_token, totp};
use crate::close;
use crate::conn_state::{Auth, ConnState};
use crate::mail::Mailer;
use crate::ratelimit::{GuessLimiter, Refusal};
use crate::shared::Shared;
use crate::store::{blocking, Account, Activation, CodeAttempt, PendingRegistration, Session};

fn username_taken(username: &str) -> ErrorReply {
    fail(
        ErrorCode::UsernameTaken,
        format!("the username {username:?} is taken (or a registration for it is pending)"),
    )
}

pub(super) async fn register(
    shared: &Arc<Shared>,
    state: &ConnState,
    username: String,
    email: String,
    password: Zeroizing<String>,
    public_key: Vec<u8>,
) -> Reply {
    limit_peer(shared, state).await?;
    validate_username(&username).map_err(|m| fail(ErrorCode::InvalidUsername, m))?;
    validate_email(&email).map_err(|m| fail(ErrorCode::InvalidEmail, m))?;
    Mailer::check_address(&email).map_err(|e| fail(ErrorCode::InvalidEmail, e.to_string()))?;
    validate_password(&password).map_err(|m| fail(ErrorCode::WeakPassword, m))?;
    PublicKey::from_der(&public_key)
        .map_err(|e| fail(ErrorCode::InvalidPublicKey, e.to_string()))?;

    let now = shared.config.clock.unix_now();
    let name = username.clone();
    let (has_account, live_pending) = blocking(&shared.store, move |s| {
        let pending = s.pending(&name)?.filter(|p| p.expires_unix > now);
        Ok((s.account(&name)?.is_some(), pending))
    })
    .await
    .map_err(|e| internal("registration lookup failed", e))?;
    if has_account {
        return Err(username_taken(&username));
    }
    // A pending registration is replaced (a new code, a fresh attempt
    // count) only for the same email, key and password: a client whose
    // first answer was lost can retry, nobody else can touch the name.
    let replaced = match live_pending {
        None => None,
        Some(p) if p.email == email && p.public_key == public_key => Some(p),
        Some(_) => return Err(username_taken(&username)),
    };
    let slot = reserve_password_check(shared)?;
    let password_phc = match &replaced {
        Some(old) => {
            // Comparing the password is a guess like a login's, but counted
            // apart: a client retrying its registration never delays a login.
            limit_guesses(Guesses::Register, shared, state, &username).await?;
            let phc = old.password_phc.clone();
            let same = check_password(shared, slot, move |p| p.verify(&phc, &password)).await?;
            if !same {
                return Err(username_taken(&username));
            }
            guess_succeeded(Guesses::Register, shared, state, &username).await;
            old.password_phc.clone()
        }
        None => check_password(shared, slot, move |p| p.hash(&password))
            .await?
            .map_err(|e| internal("password hashing failed", e))?,
    };
    let code = new_code().map_err(|e| internal("code generation failed", e))?;
    let ttl = shared.config.code_ttl;
    let pending = PendingRegistration {
        username: username.clone(),
        email: email.clone(),
        password_phc,
        public_key,
        code_hash: code_hash(&code),
        expires_unix: now + ttl.as_secs(),
        attempts: 0,
    };
    let old_code = replaced.as_ref().map(|old| old.code_hash);
    let stored = blocking(&shared.store, move |s| match old_code {
        Some(old) => s.replace_pending(&pending, &old, now),
        None => s.insert_pending(&pending, now),
    })
    .await
    .map_err(|e| internal("storing a registration failed", e))?;
    if !stored {
        return Err(username_taken(&username));
    }
    if let Err(e) = shared.mailer.send_code(&email, &username, &code, ttl).await {
        tracing::warn!(%username, error = %e, "verification mail failed; registration dropped");
        let name = username.clone();
        if let Err(e) = blocking(&shared.store, move |s| s.remove_pending(&name)).await {
            tracing::error!(%username, error = %e, "cannot drop the failed registration");
        }
        return Err(fail(
            ErrorCode::MailFailed,
            "the relay could not send the verification mail; nothing was registered, try again later",
        ));
    }
    tracing::info!(%username, resent = replaced.is_some(), "registration pending");
    Ok(Response::RegisterPending {
        expires_in_secs: ttl.as_secs(),
    })
}

pub(super) async fn verify(
    shared: &Arc<Shared>,
    state: &ConnState,
    username: String,
    code: Zeroizing<String>,
) -> Reply {
    limit_peer(shared, state).await?;
    if validate_username(&username).is_err() {
        // Never a registration; not echoed (it may be anything, of any size).
        return Err(fail(
            ErrorCode::NoPendingRegistration,
            "no registration is waiting for that name; register first",
        ));
    }
    let no_pending = || {
        fail(
            ErrorCode::NoPendingRegistration,
            format!("no registration is waiting for {username:?}; register first"),
        )
    };
    let now = shared.config.clock.unix_now();
    let max = shared.config.max_code_attempts;
    let name = username.clone();
    let attempt = blocking(&shared.store, move |s| s.take_code_attempt(&name, now, max))
        .await
        .map_err(|e| internal("registration lookup failed", e))?;
    let locked = |expires_unix: u64| {
        fail(
            ErrorCode::TooManyAttempts,
            format!(
                "too many wrong codes; register again after {} seconds",
                expires_unix.saturating_sub(now)
            ),
        )
    };
    let repeat_locked = || {
        fail(
            ErrorCode::TooManyAttempts,
            "too many wrong codes; the account is active, but its TOTP secret is not shown again",
        )
    };
    let wrong_code = |attempts: u32| {
        tracing::info!(%username, attempts, "wrong verification code");
        fail(
            ErrorCode::WrongCode,
            format!(
                "wrong code; {} attempt(s) left",
                max.saturating_sub(attempts)
            ),
        )
    };
    let pending = match attempt {
        CodeAttempt::NoPending => return Err(no_pending()),
        CodeAttempt::Expired => {
            return Err(fail(
                ErrorCode::CodeExpired,
                "the code has expired; register again for a new one",
            ))
        }
        CodeAttempt::Locked { expires_unix } => return Err(locked(expires_unix)),
        CodeAttempt::RepeatLocked => return Err(repeat_locked()),
        CodeAttempt::Repeat {
            account,
            activation,
        } => {
            // The account was activated by a code and has not logged in
            // yet: the holder of that code may have lost the answer.
            if !code_matches(&code, &activation.code_hash) {
                if activation.attempts >= max {
                    tracing::info!(%username, "wrong verification code; locked");
                    return Err(repeat_locked());
                }
                return Err(wrong_code(activation.attempts));
            }
            tracing::info!(%username, "activation answer repeated");
            return verified(&account.totp_secret, &username);
        }
        CodeAttempt::Counted(pending) => pending,
    };
    if !code_matches(&code, &pending.code_hash) {
        if pending.attempts >= max {
            tracing::info!(%username, "wrong verification code; locked");
            return Err(locked(pending.expires_unix));
        }
        return Err(wrong_code(pending.attempts));
    }

    let secret =
        crate::accounts::new_totp_secret().map_err(|e| internal("TOTP secret failed", e))?;
    let reply = verified(&secret, &username)?;
    let activation = Activation {
        code_hash: pending.code_hash,
        expires_unix: pending.expires_unix,
        attempts: pending.attempts,
    };
    let account = Account {
        username: username.clone(),
        email: pending.email,
        password_phc: pending.password_phc,
        public_key: pending.public_key,
        totp_secret: secret,
        created_unix: now,
    };
    let created = blocking(&shared.store, move |s| {
        s.activate_pending(&account, &activation)
    })
    .await
    .map_err(|e| internal("activating an account failed", e))?;
    if !created {
        return Err(username_taken(&username));
    }
    tracing::info!(%username, "account activated");
    Ok(reply)
}

/// The `Verified` answer for an account's TOTP secret.
fn verified(secret: &[u8], username: &str) -> Reply {
    let generator = totp(secret, username).map_err(|e| internal("TOTP setup failed", e))?;
    Ok(Response::Verified {
        otpauth_uri: Zeroizing::new(generator.get_url()),
        secret_base32: Zeroizing::new(generator.get_secret_base32()),
    })
}

pub(super) fn challenge(state: &ConnState) -> Reply {
    let nonce =
        random_bytes::<BINDING_LEN>().map_err(|e| internal("nonce generation failed", e))?;
    state.set_challenge(nonce);
    Ok(Response::Challenge {
        nonce: nonce.to_vec(),
    })
}

/// Check and consume this connection's challenge, and refuse a login as a
/// second user on the same connection.
fn take_challenge(
    state: &ConnState,
    username: &str,
) -> Result<([u8; BINDING_LEN], [u8; BINDING_LEN]), ErrorReply> {
    if let Some(auth) = state.auth() {
        if auth.username != username {
            return Err(fail(
                ErrorCode::BadRequest,
                format!(
                    "this connection is logged in as {:?}; open a new connection for another user",
                    auth.username
                ),
            ));
        }
    }
    let nonce = state.take_challenge().ok_or_else(|| {
        fail(
            ErrorCode::NoChallenge,
            "ask for a Challenge first; each challenge is good for one attempt",
        )
    })?;
    let binding = state
        .tls_binding()
        .ok_or_else(|| internal("TLS exporter failed", "no keying material"))?;
    Ok((nonce, binding))
}

/// Which password checks a guess is counted for.
#[derive(Clone, Copy)]
enum Guesses {
    Login,
    Register,
}

impl Guesses {
    fn limiter(self, shared: &Shared) -> &GuessLimiter {
        match self {
            Guesses::Login => &shared.login_guesses,
            Guesses::Register => &shared.register_guesses,
        }
    }

    /// The name of the shared count (several relays).
    fn scope(self) -> &'static str {
        match self {
            Guesses::Login => "login",
            Guesses::Register => "register",
        }
    }
}

/// The guess went well: take it back, here and on the other relays.
async fn guess_succeeded(kind: Guesses, shared: &Shared, state: &ConnState, username: &str) {
    kind.limiter(shared).succeeded(username, state.source);
    if let Some(limits) = &shared.shared_limits {
        limits
            .guess_succeeded(kind.scope(), username, state.source)
            .await;
    }
}

/// Count a password attempt by this connection's source against the
/// account before the password is checked (so concurrent guesses cannot
/// slip past the limit); the caller takes it back on success with
/// [`guess_succeeded`], so in effect only failures accumulate. With
/// several relays the attempt is also counted in Redis.
/// `username` must be valid: only account names become limiter keys.
async fn limit_guesses(
    kind: Guesses,
    shared: &Shared,
    state: &ConnState,
    username: &str,
) -> Result<(), ErrorReply> {
    let now = shared.config.clock.now();
    let mut verdict = kind.limiter(shared).begin(username, state.source, now);
    if let (Ok(()), Some(limits)) = (&verdict, &shared.shared_limits) {
        let now_ms = shared.config.clock.unix_now_ms();
        verdict = limits
            .guess_begin(
                kind.scope(),
                username,
                state.source,
                shared.config.login_limits,
                now_ms,
            )
            .await;
    }
    verdict
        .inspect_err(|_| {
            shared.stats.guess_refusals.fetch_add(1, Ordering::Relaxed);
        })
        .map_err(|refusal| match refusal {
            Refusal::Pair { retry_after } => fail(
                ErrorCode::RateLimited,
                format!(
                    "too many failed attempts for this account from your address; \
                     retry after {} s",
                    whole_secs(retry_after)
                ),
            ),
            Refusal::Account { retry_after } => fail(
                ErrorCode::RateLimited,
                format!(
                    "too many failed attempts for this account; password logins to it \
                     are paused for {} s (a session resume still works)",
                    whole_secs(retry_after)
                ),
            ),
        })
}

/// A username as it may appear in a log line: only names that pass the
/// rules (short, printable) are written; anything else is a placeholder.
pub(crate) fn loggable(username: &str) -> &str {
    if validate_username(username).is_ok() {
        username
    } else {
        "<invalid username>"
    }
}

/// The one answer for an unknown user, a wrong password and a wrong or used
/// TOTP code.
fn wrong_credentials() -> ErrorReply {
    fail(
        ErrorCode::InvalidCredentials,
        "unknown user or wrong password or code",
    )
}

fn bad_signature() -> ErrorReply {
    fail(
        ErrorCode::InvalidSignature,
        "the signature over the challenge does not verify with the account key \
         (wrong key, or signed for another connection or challenge)",
    )
}

/// Check a login or resume signature by the account's stored key over this
/// connection's challenge transcript.
fn check_account_signature(
    stored_key: &[u8],
    purpose: LoginPurpose,
    username: &str,
    nonce: &[u8],
    binding: &[u8],
    signature: &[u8],
) -> Result<(), ErrorReply> {
    let key = PublicKey::from_der(stored_key).map_err(|e| internal("stored key invalid", e))?;
    let transcript = login_transcript(purpose, username, nonce, binding);
    key.verify(&transcript, signature)
        .map_err(|_| bad_signature())
}

pub(super) async fn login(
    shared: &Arc<Shared>,
    state: &Arc<ConnState>,
    username: String,
    password: Zeroizing<String>,
    totp_code: Zeroizing<String>,
    signature: Vec<u8>,
) -> Reply {
    limit_peer(shared, state).await?;
    // Only a valid name can be an account, a limiter key or a log field. An
    // invalid one gets the unknown user's answer after the same argon2
    // time; the per-source limit above bounds how often.
    let valid = validate_username(&username).is_ok();
    let (nonce, binding) = take_challenge(state, &username)?;
    let slot = reserve_password_check(shared)?;
    if valid {
        limit_guesses(Guesses::Login, shared, state, &username).await?;
    }

    let name = username.clone();
    let (account, last_step) = if valid {
        blocking(&shared.store, move |s| s.login_lookup(&name))
            .await
            .map_err(|e| internal("account lookup failed", e))?
    } else {
        (None, None)
    };
    let phc = account.as_ref().map(|a| a.password_phc.clone());
    let password_ok = check_password(shared, slot, move |p| match phc {
        Some(phc) => p.verify(&phc, &password),
        None => {
            p.verify_unknown_user(&password);
            false
        }
    })
    .await?;
    let account = match account {
        Some(account) if password_ok => account,
        _ => return Err(wrong_credentials()),
    };

    // A wrong or used code gets the wrong password's answer: telling them
    // apart would confirm the password to whoever guessed it.
    let generator =
        totp(&account.totp_secret, &username).map_err(|e| internal("TOTP setup failed", e))?;
    let step = check_totp(&generator, totp_code.trim(), shared.config.clock.unix_now())
        .filter(|step| last_step.is_none_or(|last| *step > last));
    let Some(step) = step else {
        return Err(wrong_credentials());
    };

    check_account_signature(
        &account.public_key,
        LoginPurpose::Login,
        &username,
        &nonce,
        &binding,
        &signature,
    )?;

    // Recorded only now, so that a failed signature does not use up the
    // code; a concurrent login that recorded it first wins. The session is
    // stored in the same commit.
    let (token, token_hash) = new_token().map_err(|e| internal("token generation failed", e))?;
    let expires = shared.config.clock.unix_now() + shared.config.session_ttl.as_secs();
    let session = Session {
        username: username.clone(),
        expires_unix: expires,
    };
    let name = username.clone();
    let completed = blocking(&shared.store, move |s| {
        s.complete_login(&name, step, &token_hash, &session)
    })
    .await
    .map_err(|e| internal("recording the login failed", e))?;
    if completed.is_none() {
        return Err(wrong_credentials());
    }
    guess_succeeded(Guesses::Login, shared, state, &username).await;
    let unread = go_online(
        shared,
        state,
        Auth {
            username: username.clone(),
            full_login_at: Some(shared.config.clock.now()),
            token_hash,
            session_expires_unix: expires,
        },
    )
    .await?;
    tracing::info!(%username, conn = state.id, unread, "logged in");
    Ok(Response::LoggedIn {
        username,
        token: Some(token),
        session_expires_unix: expires,
        unread,
    })
}

/// Mark the connection logged in (and live under its token), start
/// pushing, and count the queue.
async fn go_online(
    shared: &Arc<Shared>,
    state: &Arc<ConnState>,
    auth: Auth,
) -> Result<u64, ErrorReply> {
    let username = auth.username.clone();
    let token_hash = auth.token_hash;
    let previous = state.auth();
    state.set_auth(Some(auth));
    shared.logins.add(token_hash, state);
    if let Some(previous) = previous.filter(|p| p.token_hash != token_hash) {
        shared.logins.remove(&previous.token_hash, state.id);
    }
    // A logout with this token may have run since the session was checked.
    // It removes the session before it ends the live logins, so now either
    // the session is gone from the store or this login has been ended.
    let name = username.clone();
    let live = blocking(&shared.store, move |s| {
        s.live_session_unread(&token_hash, &name)
    })
    .await
    .map_err(|e| internal("session lookup failed", e))?;
    let Some(unread) = live else {
        shared.logins.remove(&token_hash, state.id);
        state.end_login(&token_hash, close::LOGGED_OUT_REASON);
        return Err(fail(
            ErrorCode::SessionExpired,
            "the session was revoked while logging in; log in again",
        ));
    };
    crate::push::start(state, shared, &username);
    Ok(unread)
}

pub(super) async fn resume(
    shared: &Arc<Shared>,
    state: &Arc<ConnState>,
    username: String,
    token: Zeroizing<Vec<u8>>,
    signature: Vec<u8>,
) -> Reply {
    // No password is involved: a session token (256 random bits) and a
    // fresh signature by the account key. Password failures, by anyone,
    // never stand in the way of a resume - not even through the per-source
    // attempt limit, which a guesser behind the owner's address (the same
    // NAT, say) would use up. Guessing a token is hopeless, and each try
    // needs a fresh challenge on a connection the caps already bound.
    let session_gone = || {
        fail(
            ErrorCode::SessionExpired,
            "the session token is unknown, revoked or expired; log in again",
        )
    };
    if validate_username(&username).is_err() {
        return Err(session_gone());
    }
    let (nonce, binding) = take_challenge(state, &username)?;
    let token_hash = sha256(&token);
    let name = username.clone();
    let found = blocking(&shared.store, move |s| s.resume_lookup(&token_hash, &name))
        .await
        .map_err(|e| internal("session lookup failed", e))?;
    let now = shared.config.clock.unix_now();
    let (session, account) = match found {
        (Some(session), Some(account))
            if session.username == username && session.expires_unix > now =>
        {
            (session, account)
        }
        _ => return Err(session_gone()),
    };
    check_account_signature(
        &account.public_key,
        LoginPurpose::Resume,
        &username,
        &nonce,
        &binding,
        &signature,
    )?;
    let unread = go_online(
        shared,
        state,
        Auth {
            username: username.clone(),
            full_login_at: None,
            token_hash,
            session_expires_unix: session.expires_unix,
        },
    )
    .await?;
    tracing::info!(%username, conn = state.id, unread, "session resumed");
    Ok(Response::LoggedIn {
        username,
        token: None,
        session_expires_unix: session.expires_unix,
        unread,
    })
}

pub(super) async fn logout(shared: &Arc<Shared>, state: &ConnState) -> Reply {
    let auth = require_auth(state)?;
    let hash = auth.token_hash;
    // The store first: a resume racing this one then fails its own check.
    blocking(&shared.store, move |s| s.remove_session(&hash))
        .await
        .map_err(|e| internal("revoking the session failed", e))?;
    crate::push::stop(state, shared).await;
    state.set_auth(None);
    shared.logins.remove(&hash, state.id);
    // Every other connection with this token stops being logged in too.
    let ended = shared.logins.end(&hash, close::LOGGED_OUT_REASON);
    shared
        .stats
        .sessions_ended
        .fetch_add(ended as u64, Ordering::Relaxed);
    tracing::info!(username = %auth.username, conn = state.id, ended, "logged out");
    Ok(Response::Ok)
}

pub(super) async fn publish_key(
    shared: &Arc<Shared>,
    state: &ConnState,
    public_key: Vec<u8>,
    signature: Vec<u8>,
) -> Reply {
    let auth = require_auth(state)?;
    let fresh = auth.full_login_at.is_some_and(|t| {
        shared
            .config
            .clock
            .now()
            .saturating_duration_since(t)
            .as_secs()
            < FRESH_LOGIN_SECS
    });
    if !fresh {
        return Err(fail(
            ErrorCode::FreshLoginRequired,
            format!(
                "replacing the key needs a full login (password + TOTP) on this connection \
                 within the last {FRESH_LOGIN_SECS} seconds"
            ),
        ));
    }
    let (nonce, binding) = take_challenge(state, &auth.username)?;
    let key = PublicKey::from_der(&public_key)
        .map_err(|e| fail(ErrorCode::InvalidPublicKey, e.to_string()))?;
    let transcript = login_transcript(LoginPurpose::PublishKey, &auth.username, &nonce, &binding);
    if key.verify(&transcript, &signature).is_err() {
        return Err(fail(
            ErrorCode::InvalidSignature,
            "the new key's signature over the challenge does not verify",
        ));
    }
    let name = auth.username.clone();
    blocking(&shared.store, move |s| {
        s.set_public_key(&name, key.as_der())
    })
    .await
    .map_err(|e| internal("storing the new key failed", e))?;
    tracing::info!(username = %auth.username, "public key replaced");
    Ok(Response::Ok)
}
