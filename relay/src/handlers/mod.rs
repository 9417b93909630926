//! Request handlers: one function per [`Request`] kind, each returning the
//! [`Response`] or a typed [`ErrorReply`].
//!
//! * [`account`] — register, verify, challenge, login, resume, logout, publish key;
//! * [`messages`] — directory lookup and pages, online list, send, ack, ack many;
//! * [`audit`] — counts of login and resume outcomes, and the log line a
//!   failed login leaves for fail2ban.
//!
//! Internal failures are logged with their cause and answered with a bare
//! `Internal` error: the client learns nothing about the relay's insides.

mod account;
mod audit;
mod messages;

pub(crate) use account::loggable;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use securechat_common::protocol::{ErrorCode, ErrorReply, Request, Response};

use crate::accounts::Passwords;
use crate::conn_state::{Auth, ConnState};
use crate::password_pool::Slot;
use crate::shared::Shared;

/// A handler's result.
pub(crate) type Reply = Result<Response, ErrorReply>;

/// Answer one request.
pub(crate) async fn dispatch(
    shared: &Arc<Shared>,
    state: &Arc<ConnState>,
    request: Request,
) -> Response {
    // A registration step that succeeds gives a connection without a login
    // its full time again: mail takes a while to arrive.
    let registration_step = matches!(request, Request::Register { .. } | Request::Verify { .. });
    let attempt = match &request {
        Request::Login { username, .. } => Some((audit::Attempt::Login, username.clone())),
        Request::Resume { username, .. } => Some((audit::Attempt::Resume, username.clone())),
        _ => None,
    };
    let result = match request {
        Request::Register {
            username,
            email,
            password,
            public_key,
        } => account::register(shared, state, username, email, password, public_key).await,
        Request::Verify { username, code } => account::verify(shared, state, username, code).await,
        Request::Challenge => account::challenge(state),
        Request::Login {
            username,
            password,
            totp,
            signature,
        } => account::login(shared, state, username, password, totp, signature).await,
        Request::Resume {
            username,
            token,
            signature,
        } => account::resume(shared, state, username, token, signature).await,
        Request::Logout => account::logout(shared, state).await,
        Request::PublishKey {
            public_key,
            signature,
        } => account::publish_key(shared, state, public_key, signature).await,
        Request::LookupKey { username } => messages::lookup(shared, state, username).await,
        Request::Directory { after } => messages::directory(shared, state, after).await,
        Request::Online => messages::online(shared, state),
        Request::Time => Ok(Response::Time {
            unix_ms: shared.config.clock.unix_now_ms(),
        }),
        Request::Send { envelope } => messages::send(shared, state, envelope).await,
        Request::Ack { id, outcome } => messages::ack(shared, state, id, outcome).await,
        Request::AckMany { acks } => messages::ack_many(shared, state, acks).await,
        Request::WatchPresence { users } => messages::watch_presence(shared, state, users),
        _ => Err(fail(
            ErrorCode::BadRequest,
            "this relay does not know that request",
        )),
    };
    if registration_step && result.is_ok() {
        state.restart_login_time();
    }
    if let Some((attempt, username)) = attempt {
        audit::record(shared, state, attempt, &username, &result);
    }
    result.unwrap_or_else(Response::Error)
}

/// A typed error reply.
pub(crate) fn fail(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, message)
}

/// Log an internal failure and answer without details.
pub(crate) fn internal(what: &str, error: impl std::fmt::Display) -> ErrorReply {
    tracing::error!(error = %error, "{what}");
    fail(
        ErrorCode::Internal,
        "internal relay error; the relay's log has the details",
    )
}

/// The logged-in user, or `NotAuthenticated`.
pub(crate) fn require_auth(state: &ConnState) -> Result<Auth, ErrorReply> {
    state.auth().ok_or_else(|| {
        fail(
            ErrorCode::NotAuthenticated,
            "log in (or resume a session) on this connection first",
        )
    })
}

/// Count an attempt from the peer's source; refuse past the limit.
pub(crate) async fn limit_peer(shared: &Shared, state: &ConnState) -> Result<(), ErrorReply> {
    acquire(shared, &shared.source_limiter, "source", &state.source)
        .await
        .map_err(|wait| {
            shared
                .stats
                .attempt_refusals
                .fetch_add(1, Ordering::Relaxed);
            fail(
                ErrorCode::RateLimited,
                format!(
                    "too many attempts from your address; retry after {} s",
                    whole_secs(wait)
                ),
            )
        })
}

/// Count one event for `key` on this relay's `limiter` and, with several
/// relays, on the shared count of `kind` too; `Err` is how long to wait.
pub(crate) async fn acquire<K>(
    shared: &Shared,
    limiter: &crate::ratelimit::RateLimiter<K>,
    kind: &str,
    key: &K,
) -> Result<(), std::time::Duration>
where
    K: Eq + std::hash::Hash + Clone + std::fmt::Display,
{
    limiter.try_acquire(key, shared.config.clock.now())?;
    match &shared.shared_limits {
        Some(limits) => {
            let now_ms = shared.config.clock.unix_now_ms();
            limits
                .acquire(kind, &key.to_string(), limiter.limit(), now_ms)
                .await
        }
        None => Ok(()),
    }
}

/// Reserve a place among the password workers, or answer `Busy`.
pub(crate) fn reserve_password_check(shared: &Shared) -> Result<Slot, ErrorReply> {
    shared.passwords.try_reserve().map_err(|_| {
        shared.stats.busy_refusals.fetch_add(1, Ordering::Relaxed);
        fail(ErrorCode::Busy, "relay busy, retry in a moment")
    })
}

/// Run an argon2 hash or check in the place `slot` holds.
pub(crate) async fn check_password<T, F>(
    shared: &Shared,
    slot: Slot,
    check: F,
) -> Result<T, ErrorReply>
where
    T: Send + 'static,
    F: FnOnce(&Passwords) -> T + Send + 'static,
{
    shared
        .passwords
        .run(slot, check)
        .await
        .map_err(|e| internal("password check failed", e))
}

/// A wait in whole seconds, rounded up (a client told "0 s" would retry
/// too early).
pub(crate) fn whole_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}
