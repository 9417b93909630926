//! The connection manager: one persistent relay connection, reconnected with
//! exponential backoff and resumed with the stored session token.
//!
//! With several relays (one state, one certificate), it uses one at a time
//! and moves on to the next of the list when it loses it or cannot reach
//! it, at once: the session resumes on the next relay within about a second.
//! The backoff pauses only after a full round in which every relay failed;
//! the next round starts again at the relay that worked last.
//!
//! ```text
//!   ┌─► resolve + connect relay i ───────────fail──┐
//!   │      │ok                                     │
//!   │   resume (token + challenge signature) ─fail─┤
//!   │      │ └─ SessionExpired ─► "login needed"   │
//!   │      │                                       │
//!   │   publish connection; read pushes ──lost─────┤
//!   │      │                                       ▼
//!   ├──────│─── i = the next relay, at once; but once every relay of this round
//!   │      │    failed: sleep (backoff: 0.2 s · 2ⁿ, cap 10 s, ± jitter; the cap if
//!   │      │    a certificate was refused), then a round from the last good one
//!   └──────┴─ asked to reconnect (rotate-key, unlock, a logout the relay did not
//!             confirm): unpublished, closed, and at once relay i again
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use securechat_common::close;
use securechat_common::crypto::random_bytes;
use securechat_common::ipc::IpcError;
use securechat_common::protocol::ErrorCode;

use crate::agent::{certificate_refused, Agent};
use crate::config::{RelayAddr, RelaySettings};
use crate::keystore;
use crate::receive;
use crate::rotation;
use securechat_client::relay::{ClientError, RelayClient};

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// How long a connection attempt may take while another relay of the list
/// could be tried instead. A relay that is down does not answer at all
/// (QUIC hears no "port unreachable"), and waiting out the whole idle
/// timeout (20 s) would keep the session off the others that long. A single
/// relay keeps the idle timeout: there is nothing else to try.
const CONNECT_TIMEOUT_OF_MANY: Duration = Duration::from_secs(5);

/// A connection that stayed up this long was a good one: its loss starts a
/// fresh round through the list instead of counting toward the last one.
const STABLE: Duration = Duration::from_secs(10);

/// Exponential backoff with jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: BACKOFF_START,
        }
    }
}

impl Backoff {
    /// The delay to wait now; doubles the next one up to the cap.
    pub(crate) fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        // Jitter: 75 % to 125 % of the base, so agents don't reconnect in step.
        let r = random_bytes::<1>().map(|b| b[0]).unwrap_or(128);
        base.mul_f64(0.75 + f64::from(r) / 510.0)
    }

    /// The longest delay, and the longest from now on (until a reset).
    pub(crate) fn longest(&mut self) -> Duration {
        self.next = BACKOFF_CAP;
        self.step()
    }

    /// Back to the shortest delay after a good connection.
    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_START;
    }
}

/// Where the manager is in the list of relays: the one to try now, how
/// many failed since the last pause, and which one worked last (where a
/// round starts after a pause).
#[derive(Debug)]
struct Round {
    len: usize,
    at: usize,
    failed: usize,
    last_good: usize,
    /// A relay of this round presented a certificate that was refused: the
    /// answer to requests if no relay of the round works.
    refused: Option<IpcError>,
}

impl Round {
    fn new(len: usize) -> Self {
        Self {
            len: len.max(1),
            at: 0,
            failed: 0,
            last_good: 0,
            refused: None,
        }
    }

    /// The relay tried now connected.
    fn connected(&mut self) {
        self.last_good = self.at;
    }

    /// The relay tried now failed (or was lost): move on to the next.
    /// `true` when every relay of the round failed: time to pause.
    fn failed(&mut self, refused: Option<IpcError>) -> bool {
        if refused.is_some() {
            self.refused = refused;
        }
        self.failed += 1;
        self.at = (self.at + 1) % self.len;
        self.failed >= self.len
    }

    /// A connection lasted: what failed before it is history.
    fn forget(&mut self) {
        self.failed = 0;
        self.refused = None;
    }

    /// After the pause: a new round from the relay that worked last. What
    /// a refused certificate means for requests goes to the caller.
    fn restart(&mut self) -> Option<IpcError> {
        self.failed = 0;
        self.at = self.last_good;
        self.refused.take()
    }
}

/// Why one connection attempt failed.
enum Failure {
    /// Unreachable, not resolvable, or the session could not be resumed:
    /// `reason` in a few words for the `relay:` line of status, `error` in
    /// full for the log and `last error`.
    Other { reason: String, error: String },
    /// The relay's certificate was refused: retrying soon cannot help.
    Refused(IpcError),
}

/// Resolve `addr` and connect, bounded by [`CONNECT_TIMEOUT_OF_MANY`] when
/// the list has other relays to try.
async fn connect(relay: &RelaySettings, addr: &RelayAddr) -> Result<RelayClient, Failure> {
    // Looked up at every attempt: a name that does not resolve yet (no
    // network at boot) is retried like an unreachable relay.
    let sock = addr.resolve().await.map_err(|e| Failure::Other {
        reason: format!("cannot resolve: {e}"),
        error: format!("cannot resolve the relay address {}: {e}", addr.display),
    })?;
    let connecting = RelayClient::connect_named(sock, &addr.server_name, relay.trust.clone());
    let connected = if relay.addrs.len() > 1 {
        match tokio::time::timeout(CONNECT_TIMEOUT_OF_MANY, connecting).await {
            Ok(r) => r,
            Err(_) => {
                let secs = CONNECT_TIMEOUT_OF_MANY.as_secs();
                return Err(Failure::Other {
                    reason: format!("no answer from {} within {secs} s", addr.display),
                    error: format!(
                        "the relay at {} did not answer within {secs} s",
                        addr.display
                    ),
                });
            }
        }
    } else {
        connecting.await
    };
    connected.map_err(|e| match e {
        ClientError::CertificateRejected { rejection, .. } => Failure::Refused(
            certificate_refused(&addr.display, &relay.list(), &rejection),
        ),
        e => Failure::Other {
            reason: e.to_string(),
            error: e.to_string(),
        },
    })
}

/// Run forever (until aborted): keep a relay connection up.
pub(crate) async fn run(agent: Arc<Agent>) {
    let Some(relay) = agent.config.relay.clone().filter(|r| !r.addrs.is_empty()) else {
        tracing::info!("no relay configured; only local commands will work");
        return std::future::pending().await;
    };
    let mut backoff = Backoff::default();
    let mut round = Round::new(relay.addrs.len());
    // The relays of one round are tried back to back; the pause comes once
    // all of them failed (a round of one: after every failure, as always).
    let fail = |round: &mut Round, backoff: &mut Backoff, failure: Failure, tried: &RelayAddr| {
        let (reason, refused) = match failure {
            Failure::Other { reason, error } => {
                agent.note_error(&error);
                (reason, None)
            }
            Failure::Refused(refused) => {
                agent.note_error(&refused);
                (
                    "certificate refused, see the last error".to_string(),
                    Some(refused),
                )
            }
        };
        if !round.failed(refused) {
            agent.clear_retry();
            tracing::info!(
                "{} failed; trying the next relay of the list, {}, now",
                tried.display,
                relay.addrs[round.at].display
            );
            return None;
        }
        let refused = round.restart();
        // Retrying soon cannot help a refused certificate: it changes only
        // when someone changes a relay or agentd's settings. Don't hammer
        // the relays meanwhile.
        let delay = if refused.is_some() {
            backoff.longest()
        } else {
            backoff.step()
        };
        agent.note_retry(reason, delay);
        agent.set_refused(refused);
        Some(delay)
    };
    loop {
        let at = round.at;
        let addr = &relay.addrs[at];
        agent.set_relay_at(at);
        let client = match connect(&relay, addr).await {
            Ok(c) => Arc::new(c),
            Err(failure) => {
                if let Some(delay) = fail(&mut round, &mut backoff, failure, addr) {
                    tokio::time::sleep(delay).await;
                }
                continue;
            }
        };
        // Connected: earlier connection errors are history (a resume that
        // fails now records its own).
        agent.clear_errors();
        let logged_in = match resume(&agent, &client).await {
            Ok(v) => v,
            Err(e) => {
                client.close("resume failed").await;
                let failure = Failure::Other {
                    reason: "resuming the session failed".into(),
                    error: format!("resuming the session on {} failed: {e}", addr.display),
                };
                if let Some(delay) = fail(&mut round, &mut backoff, failure, addr) {
                    tokio::time::sleep(delay).await;
                }
                continue;
            }
        };
        let which = if relay.addrs.len() > 1 {
            format!("; relay {} of {} in the list", at + 1, relay.addrs.len())
        } else {
            String::new()
        };
        tracing::info!(
            "connected to the relay at {} ({}{which})",
            addr.display,
            if logged_in {
                "session resumed"
            } else {
                "not logged in"
            }
        );
        round.connected();
        backoff.reset();
        let since = Instant::now();
        // Listen for "reconnect" before the connection is published: a
        // request that asks right after seeing it is not missed.
        let reconnect = agent.reconnect.notified();
        agent.set_conn(Some(client.clone()), logged_in);
        let lost = tokio::select! {
            r = receive::push_loop(&agent, &client) => match r {
                // The relay closes connections that stay without a login
                // (see `close`); being logged out is not an error, and
                // reconnecting at once keeps `register` and `login` ready.
                Err(ClientError::Connection(quinn::ConnectionError::ApplicationClosed(c)))
                    if c.error_code == close::LOGIN_TIMEOUT_CODE.into() =>
                {
                    tracing::debug!("the relay closed a connection without a login; reconnecting");
                    None
                }
                Err(e) => Some(format!("connection to {} lost: {e}", addr.display)),
                Ok(()) => Some(format!("connection to {} closed", addr.display)),
            },
            _ = reconnect => {
                tracing::info!("reconnecting as asked");
                None
            }
        };
        // Unpublished before it is closed, so that no request picks up a
        // connection on its way out.
        agent.set_conn(None, false);
        if since.elapsed() >= STABLE {
            round.forget();
        }
        match lost {
            // Asked (or logged out by the relay): the same relay again, now.
            None => client.close("reconnecting").await,
            // Lost: it counts as this relay's failure, so the next one of
            // the list is tried at once (a single relay: after the backoff).
            Some(error) => {
                let failure = Failure::Other {
                    reason: "connection lost".into(),
                    error,
                };
                if let Some(delay) = fail(&mut round, &mut backoff, failure, addr) {
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Resume the stored session on a fresh connection. `Ok(false)`: nothing to
/// resume (or the session is gone and a login is needed); `Err`: try again.
async fn resume(agent: &Agent, client: &RelayClient) -> Result<bool, ClientError> {
    let Ok(keys) = agent.ready_keys() else {
        return Ok(false);
    };
    let path = agent.config.paths.session();
    let session = match keystore::load_session(&path) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(false),
        Err(e) => {
            agent.note_error(format!("session file: {e}"));
            return Ok(false);
        }
    };
    // With an interrupted rotation on disk, this also learns which key the
    // relay holds and finishes or undoes the rotation.
    let (user, token) = (session.username.as_str(), session.token.as_slice());
    let resumed = rotation::with_either_key(agent, client, user, &keys, move |key| async move {
        client.resume(user, token, &key).await
    })
    .await;
    match resumed {
        // A rotation in flight in this process (its new key on disk, not yet
        // installed): the relay may hold the new key already. Keep the
        // session and retry once the rotation has settled.
        Err(ClientError::Relay(reply))
            if reply.code == ErrorCode::InvalidSignature
                && keys.pending.is_none()
                && agent.config.paths.pending_key().exists() =>
        {
            Err(ClientError::Relay(reply))
        }
        Ok(_) => {
            agent.set_login_needed(false);
            // A crash between saving the session and the account name
            // leaves the name to be restored from the session.
            if agent.username().as_deref() != Some(session.username.as_str()) {
                if let Err(e) = agent.store.set_setting("username", &session.username) {
                    agent.note_error(e);
                }
            }
            Ok(true)
        }
        Err(ClientError::Relay(reply))
            if matches!(
                reply.code,
                ErrorCode::SessionExpired
                    | ErrorCode::InvalidCredentials
                    | ErrorCode::InvalidSignature
                    | ErrorCode::UnknownUser
                    | ErrorCode::NotAuthenticated
            ) =>
        {
            agent.note_error(format!("the relay refused the session: {reply}"));
            agent.set_login_needed(true);
            if let Err(e) = keystore::remove_session(&path) {
                agent.note_error(e);
            }
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let first = b.step();
        assert!(first >= BACKOFF_START.mul_f64(0.74) && first <= BACKOFF_START.mul_f64(1.26));
        for _ in 0..20 {
            assert!(b.step() <= BACKOFF_CAP.mul_f64(1.26));
        }
        b.reset();
        assert!(b.step() <= BACKOFF_START.mul_f64(1.26));
        // After a refused certificate: the cap at once, and it stays there.
        for _ in 0..3 {
            assert!(b.longest() >= BACKOFF_CAP.mul_f64(0.74));
            assert!(b.step() >= BACKOFF_CAP.mul_f64(0.74));
        }
    }

    #[test]
    fn a_round_pauses_only_once_every_relay_failed() {
        let refusal = || {
            crate::agent::err(
                securechat_common::ipc::IpcErrorKind::CertificateRejected,
                "refused",
            )
        };
        let mut round = Round::new(3);
        assert_eq!(round.at, 0);
        assert!(!round.failed(None), "the second relay next, at once");
        assert_eq!(round.at, 1);
        round.connected();
        // Relay 2 is lost before it lasted: the round goes on with relay 3.
        assert!(!round.failed(None));
        assert_eq!(round.at, 2);
        assert!(round.failed(Some(refusal())), "all three failed: pause");
        // The next round starts at the relay that worked last, and the
        // refusal seen in this one is the answer to requests meanwhile.
        assert!(round.restart().is_some());
        assert_eq!(round.at, 1);
        assert!(!round.failed(None));
        round.forget();
        assert!(round.restart().is_none());

        // One relay: every failure is a full round, as before lists.
        let mut one = Round::new(1);
        assert!(one.failed(None));
        assert_eq!(one.restart().map(|e| e.message), None);
        assert_eq!(one.at, 0);
    }
}
