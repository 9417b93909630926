//! What the relay knows about one connection: who is logged in on it, its
//! login challenge and deadline, its bad frames and its push task. The
//! connection task (`connection`), the request handlers and the live-login
//! table (`logins`) share it.

use std::sync::atomic::AtomicU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use securechat_common::protocol::{BINDING_LEN, EXPORTER_LABEL};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::close;
use crate::lock;
use crate::ratelimit::Source;

/// Who is logged in on a connection.
#[derive(Clone, Debug)]
pub(crate) struct Auth {
    pub(crate) username: String,
    /// When a full (password + TOTP) login happened here; `None` after a resume.
    pub(crate) full_login_at: Option<Instant>,
    /// SHA-256 of the session token in use.
    pub(crate) token_hash: [u8; 32],
    /// When the session expires (Unix seconds): the login ends then.
    pub(crate) session_expires_unix: u64,
}

/// Per-connection state.
pub(crate) struct ConnState {
    pub(crate) id: u64,
    pub(crate) conn: quinn::Connection,
    /// Who the peer counts as for limits (its IPv4 address or IPv6 /64).
    pub(crate) source: Source,
    challenge: Mutex<Option<[u8; BINDING_LEN]>>,
    auth: Mutex<Option<Auth>>,
    /// While nobody is logged in: when the connection is closed unless a
    /// login or resume succeeds first.
    pub(crate) login_deadline: Mutex<Option<Instant>>,
    /// Wakes the connection task when a deadline changes.
    pub(crate) deadlines_changed: Notify,
    clock: Clock,
    login_timeout: Duration,
    pub(crate) bad_frames: AtomicU32,
    /// The push task and the user it pushes for.
    pub(crate) push_task: Mutex<Option<(JoinHandle<()>, String)>>,
}

impl ConnState {
    /// A new connection's state: nobody logged in, the login time running.
    pub(crate) fn new(
        id: u64,
        conn: quinn::Connection,
        source: Source,
        clock: Clock,
        login_timeout: Duration,
    ) -> Self {
        Self {
            id,
            conn,
            source,
            challenge: Mutex::new(None),
            auth: Mutex::new(None),
            login_deadline: Mutex::new(Some(clock.now() + login_timeout)),
            deadlines_changed: Notify::new(),
            clock,
            login_timeout,
            bad_frames: AtomicU32::new(0),
            push_task: Mutex::new(None),
        }
    }

    /// Store a fresh challenge nonce, replacing any unused one.
    pub(crate) fn set_challenge(&self, nonce: [u8; BINDING_LEN]) {
        *lock(&self.challenge) = Some(nonce);
    }

    /// Take the challenge (each is good for one attempt).
    pub(crate) fn take_challenge(&self) -> Option<[u8; BINDING_LEN]> {
        lock(&self.challenge).take()
    }

    /// The TLS exporter value both ends compute for this connection.
    pub(crate) fn tls_binding(&self) -> Option<[u8; BINDING_LEN]> {
        let mut out = [0u8; BINDING_LEN];
        self.conn
            .export_keying_material(&mut out, EXPORTER_LABEL, b"")
            .ok()
            .map(|()| out)
    }

    /// Who is logged in here.
    pub(crate) fn auth(&self) -> Option<Auth> {
        lock(&self.auth).clone()
    }

    /// Record a login (no deadline while logged in) or its end (the
    /// unauthenticated time starts again).
    pub(crate) fn set_auth(&self, auth: Option<Auth>) {
        let logged_in = auth.is_some();
        *lock(&self.auth) = auth;
        *lock(&self.login_deadline) = if logged_in {
            None
        } else {
            Some(self.clock.now() + self.login_timeout)
        };
        self.deadlines_changed.notify_one();
    }

    /// Give a connection without a login its full time again (after a
    /// successful step of registration, which takes a while).
    pub(crate) fn restart_login_time(&self) {
        let mut deadline = lock(&self.login_deadline);
        if deadline.is_some() {
            *deadline = Some(self.clock.now() + self.login_timeout);
            self.deadlines_changed.notify_one();
        }
    }

    /// End the login made with `token_hash` (revoked or expired): nothing
    /// more is done as that user here, and the connection is closed with
    /// `reason`; closing ends the push task. `false` if the connection is
    /// logged in with another token (or not at all) by now.
    pub(crate) fn end_login(&self, token_hash: &[u8; 32], reason: &'static [u8]) -> bool {
        {
            let mut auth = lock(&self.auth);
            if auth.as_ref().is_none_or(|a| a.token_hash != *token_hash) {
                return false;
            }
            *auth = None;
        }
        if let Some((task, _)) = lock(&self.push_task).as_ref() {
            task.abort();
        }
        self.conn.close(close::SESSION_ENDED_CODE.into(), reason);
        true
    }
}
