//! One QUIC connection: its request streams, login state and push stream.
//!
//! ```text
//!  connection task (admitted under the connection caps, see `admission`)
//!    ├─ accept_bi ─► request task: read ≤ MAX_FRAME_LEN+4 bytes → decode
//!    │                 → handlers::dispatch → one Response frame → finish
//!    ├─ login deadline: no login or resume in time → closed with a reason
//!    ├─ session expiry: the login ends, closed with a reason
//!    └─ after login: push task (see `push`) ─► uni stream: queued…, then new…
//! ```
//!
//! Bad frames get a typed error reply; a connection that keeps sending them
//! is closed with a reason. A connection without a login may stay for
//! `Config::unauthenticated_timeout`, counted from its start, from its last
//! successful `Register` or `Verify`, or from the end of its login. A login
//! ends when its session does (expiry, or a logout anywhere): the
//! connection is then closed with a reason.
//!
//! When the connection ends, in-flight requests are allowed to finish (so a
//! `Send` being committed is committed) before the task returns.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use securechat_common::codec::{self, CodecError};
use securechat_common::limits::MAX_FRAME_LEN;
use securechat_common::protocol::{ErrorCode, ErrorReply, Request, Response};
use tokio::task::JoinSet;

use crate::admission::Full;
use crate::clock::Clock;
use crate::close;
use crate::conn_state::ConnState;
use crate::handlers;
use crate::lock;
use crate::metrics::FrameRejection;
use crate::push;
use crate::ratelimit::Source;
use crate::shared::Shared;

/// Malformed frames tolerated per connection before it is closed.
const MAX_BAD_FRAMES: u32 = 8;
/// How long a client may take to send one whole request.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve one incoming connection until it closes.
pub(crate) async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "handshake failed");
            return;
        }
    };
    let source = Source::of(peer.ip());
    let _admitted = match shared.admission.admit(source) {
        Ok(admitted) => admitted,
        Err(full) => {
            let (counter, reason) = match full {
                Full::Relay => (&shared.stats.refused_relay_full, close::RELAY_FULL_REASON),
                Full::Source => (&shared.stats.refused_source_full, close::SOURCE_FULL_REASON),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%source, ?full, "connection refused: cap reached");
            conn.close(close::TOO_MANY_CONNECTIONS_CODE.into(), reason);
            return;
        }
    };
    let _open = shared.stats.connection_guard();
    let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, conn = id, "connection open");
    let clock = shared.config.clock.clone();
    let login_timeout = shared.config.unauthenticated_timeout;
    let state = Arc::new(ConnState::new(
        id,
        conn.clone(),
        source,
        clock.clone(),
        login_timeout,
    ));

    let mut requests = JoinSet::new();
    let reason = loop {
        let login_deadline = *lock(&state.login_deadline);
        let session = state.auth().map(|a| (a.token_hash, a.session_expires_unix));
        tokio::select! {
            () = sleep_until_unix(&clock, session.map(|(_, expires)| expires)) => {
                if let Some((token_hash, expires)) = session {
                    if clock.unix_now() >= expires {
                        let ended = shared.logins.end(&token_hash, close::SESSION_EXPIRED_REASON);
                        // This connection may have been removed from the
                        // live logins (a race with its own closing): end it
                        // here too.
                        let here = state.end_login(&token_hash, close::SESSION_EXPIRED_REASON);
                        let ended = ended + usize::from(here);
                        shared.stats.sessions_ended.fetch_add(ended as u64, Ordering::Relaxed);
                        tracing::info!(conn = id, ended, "session expired; its connections closed");
                    }
                }
            }
            () = sleep_until(&clock, login_deadline) => {
                // A login may have won the race against the timer. Taking
                // the deadline makes this fire once.
                let due = {
                    let mut deadline = lock(&state.login_deadline);
                    let due = deadline.is_some_and(|d| clock.now() >= d);
                    if due {
                        *deadline = None;
                    }
                    due
                };
                if due && conn.close_reason().is_none() {
                    shared.stats.login_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn = id, "no login in time; closing");
                    conn.close(close::LOGIN_TIMEOUT_CODE.into(), close::LOGIN_TIMEOUT_REASON);
                }
            }
            () = state.deadlines_changed.notified() => {}
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    requests.spawn(serve_request(Arc::clone(&shared), Arc::clone(&state), send, recv));
                }
                Err(e) => break e,
            },
            Some(done) = requests.join_next(), if !requests.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(conn = id, error = %e, "request task failed");
                }
            }
        }
    };
    // Let in-flight requests (a commit, say) finish before going away.
    if tokio::time::timeout(shared.config.shutdown_grace, async {
        while requests.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        requests.abort_all();
        while requests.join_next().await.is_some() {}
    }
    push::stop(&state, &shared).await;
    if let Some(auth) = state.auth() {
        shared.logins.remove(&auth.token_hash, id);
    }
    tracing::debug!(%peer, conn = id, %reason, "connection closed");
}

async fn serve_request(
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let read = tokio::time::timeout(REQUEST_READ_TIMEOUT, recv.read_to_end(MAX_FRAME_LEN + 4));
    let Ok(read) = read.await else {
        tracing::debug!(
            conn = state.id,
            "request not finished in time; dropping the stream"
        );
        let _ = recv.stop(0u32.into());
        let _ = send.reset(0u32.into());
        return;
    };
    let response = match read {
        Ok(bytes) => match codec::decode::<Request>(&bytes) {
            Ok(request) => {
                tracing::debug!(conn = state.id, request = %Summary(&request), "request");
                handlers::dispatch(&shared, &state, request).await
            }
            Err(e) => bad_frame(&shared, &state, &bytes, &e),
        },
        Err(quinn::ReadToEndError::TooLong) => bad_frame(
            &shared,
            &state,
            &[],
            &CodecError::TooLarge {
                len: MAX_FRAME_LEN + 5,
                max: MAX_FRAME_LEN,
            },
        ),
        Err(quinn::ReadToEndError::Read(e)) => {
            tracing::debug!(conn = state.id, error = %e, "request stream failed");
            return;
        }
    };
    // Whatever the client still sends on this stream is not wanted.
    let _ = recv.stop(0u32.into());
    if let Response::Error(e) = &response {
        tracing::debug!(conn = state.id, code = ?e.code, "request refused");
    }
    let frame = match codec::encode(&response) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::error!(conn = state.id, error = %e, "cannot encode a response");
            return;
        }
    };
    if let Err(e) = send.write_all(&frame).await {
        tracing::debug!(conn = state.id, error = %e, "cannot write the response");
        return;
    }
    let _ = send.finish();
    if state.bad_frames.load(Ordering::Relaxed) >= MAX_BAD_FRAMES {
        if state.conn.close_reason().is_none() {
            shared
                .stats
                .bad_frame_closes
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            conn = state.id,
            "closing a connection that sent too many bad frames"
        );
        state
            .conn
            .close(close::BAD_FRAMES_CODE.into(), close::BAD_FRAMES_REASON);
    }
}

/// A request as it may appear in a log line: its kind, and a username only
/// if it passes the rules (a peer may send anything up to the frame limit).
struct Summary<'a>(&'a Request);

impl std::fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, name) = match self.0 {
            Request::Register { username, .. } => ("Register", Some(username)),
            Request::Verify { username, .. } => ("Verify", Some(username)),
            Request::Challenge => ("Challenge", None),
            Request::Login { username, .. } => ("Login", Some(username)),
            Request::Resume { username, .. } => ("Resume", Some(username)),
            Request::Logout => ("Logout", None),
            Request::LookupKey { username } => ("LookupKey", Some(username)),
            Request::PublishKey { .. } => ("PublishKey", None),
            Request::Send { envelope } => ("Send", envelope.slots.first().map(|s| &s.name)),
            Request::Ack { .. } => ("Ack", None),
            Request::Online => ("Online", None),
            Request::Time => ("Time", None),
            Request::Directory { .. } => ("Directory", None),
            Request::AckMany { .. } => ("AckMany", None),
            Request::WatchPresence { .. } => ("WatchPresence", None),
            _ => ("unknown request", None),
        };
        match name {
            Some(name) => write!(f, "{kind} {}", handlers::loggable(name)),
            None => f.write_str(kind),
        }
    }
}

/// Resolve at `unix_secs` on the relay's clock; never without a time.
async fn sleep_until_unix(clock: &Clock, unix_secs: Option<u64>) {
    match unix_secs {
        Some(unix_secs) => clock.sleep_until_unix(unix_secs).await,
        None => std::future::pending().await,
    }
}

/// Resolve at `deadline` on the relay's clock; never without one.
async fn sleep_until(clock: &Clock, deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => clock.sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How many request kinds this build knows ([`Request`]'s variants, whose
/// index starts the frame body).
const REQUEST_KINDS: u32 = 15;

/// Whether a frame that could not be decoded at least names a request kind
/// this build knows; if not, it is most likely from a newer client. A frame
/// too short to tell counts as known (and so as malformed).
fn known_request_kind(frame: &[u8]) -> bool {
    frame
        .get(5..)
        .and_then(|body| postcard::take_from_bytes::<u32>(body).ok())
        .is_none_or(|(kind, _)| kind < REQUEST_KINDS)
}

fn bad_frame(shared: &Shared, state: &ConnState, frame: &[u8], e: &CodecError) -> Response {
    state.bad_frames.fetch_add(1, Ordering::Relaxed);
    let (code, rejection) = match e {
        CodecError::TooLarge { .. } => (ErrorCode::FrameTooLarge, FrameRejection::Oversized),
        CodecError::UnsupportedVersion(_) => (
            ErrorCode::UnsupportedVersion,
            FrameRejection::UnsupportedVersion,
        ),
        _ if !known_request_kind(frame) => (ErrorCode::BadRequest, FrameRejection::Unknown),
        _ => (ErrorCode::BadRequest, FrameRejection::Malformed),
    };
    shared.stats.rejected_frames.add(rejection);
    Response::Error(ErrorReply::new(
        code,
        format!("cannot read the request: {e}"),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_last_request_kind_is_the_last_one_known() {
        // `WatchPresence` is the last variant of `Request`: a new one must
        // raise REQUEST_KINDS, or its malformed frames are counted as unknown.
        let frame = codec::encode(&Request::WatchPresence { users: Vec::new() }).unwrap();
        assert_eq!(u32::from(frame[5]), REQUEST_KINDS - 1);
        assert!(known_request_kind(&frame));
        let mut newer = frame.to_vec();
        newer[5] = REQUEST_KINDS as u8;
        assert!(!known_request_kind(&newer));
        assert!(known_request_kind(&[0, 0, 0, 1]));
    }
}
