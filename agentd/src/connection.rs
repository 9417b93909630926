//! The connection manager: one persistent relay connection, reconnected with
//! exponential backoff and resumed with the stored session token.
//!
//! ```text
//!   ┌─► resolve + connect ──fail──► sleep(backoff: 0.2 s · 2ⁿ, cap 10 s, ± jitter) ─┐
//!   │      │ └─certificate refused─► sleep(cap); requests get the refusal ─┤
//!   │      │ok                                                            │
//!   │   resume (token + challenge signature)  ── SessionExpired ─► "login needed"
//!   │      │                                                              │
//!   │   publish connection; read pushes until it closes ──────────────────┘
//!   └── or until asked to reconnect (rotate-key, unlock, a logout the relay
//!       did not confirm): unpublished, closed, and at once connect again
//! ```

use std::sync::Arc;
use std::time::Duration;

use securechat_common::close;
use securechat_common::crypto::random_bytes;
use securechat_common::protocol::ErrorCode;

use crate::agent::{certificate_refused, Agent};
use crate::keystore;
use crate::receive;
use crate::rotation;
use securechat_client::relay::{ClientError, RelayClient};

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

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

/// Run forever (until aborted): keep a relay connection up.
pub(crate) async fn run(agent: Arc<Agent>) {
    let Some(relay) = agent.config.relay.clone() else {
        tracing::info!("no relay configured; only local commands will work");
        return std::future::pending().await;
    };
    let mut backoff = Backoff::default();
    loop {
        // Looked up at every attempt: a name that does not resolve yet (no
        // network at boot) is retried like an unreachable relay.
        let addr = match relay.resolve().await {
            Ok(addr) => addr,
            Err(e) => {
                let delay = backoff.step();
                agent.note_error(format!(
                    "cannot resolve the relay address {}: {e}",
                    relay.display
                ));
                agent.note_retry(format!("cannot resolve: {e}"), delay);
                agent.set_refused(None);
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let client =
            match RelayClient::connect_named(addr, &relay.server_name, relay.trust.clone()).await {
                Ok(c) => Arc::new(c),
                Err(ClientError::CertificateRejected { rejection, .. }) => {
                    let refused = certificate_refused(&relay.display, &rejection);
                    agent.note_error(&refused);
                    agent.set_refused(Some(refused));
                    // Retrying soon cannot help: the certificate changes
                    // only when someone changes the relay or agentd's
                    // settings. Don't hammer the relay meanwhile.
                    let delay = backoff.longest();
                    agent.note_retry("certificate refused, see the last error", delay);
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Err(e) => {
                    let delay = backoff.step();
                    agent.note_error(&e);
                    agent.note_retry(e.to_string(), delay);
                    agent.set_refused(None);
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
        // Connected: earlier connection errors are history (a resume that
        // fails now records its own).
        agent.clear_errors();
        let logged_in = match resume(&agent, &client).await {
            Ok(v) => v,
            Err(e) => {
                let delay = backoff.step();
                agent.note_error(format!("resuming the session failed: {e}"));
                agent.note_retry("resuming the session failed", delay);
                client.close("resume failed").await;
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        tracing::info!(
            "connected to the relay at {} ({})",
            relay.display,
            if logged_in {
                "session resumed"
            } else {
                "not logged in"
            }
        );
        backoff.reset();
        // Listen for "reconnect" before the connection is published: a
        // request that asks right after seeing it is not missed.
        let reconnect = agent.reconnect.notified();
        agent.set_conn(Some(client.clone()), logged_in);
        let asked = tokio::select! {
            r = receive::push_loop(&agent, &client) => match r {
                // The relay closes connections that stay without a login
                // (see `close`); being logged out is not an error, and
                // reconnecting at once keeps `register` and `login` ready.
                Err(ClientError::Connection(quinn::ConnectionError::ApplicationClosed(c)))
                    if c.error_code == close::LOGIN_TIMEOUT_CODE.into() =>
                {
                    tracing::debug!("the relay closed a connection without a login; reconnecting");
                    true
                }
                Err(e) => {
                    agent.note_error(format!("connection lost: {e}"));
                    false
                }
                Ok(()) => false,
            },
            _ = reconnect => {
                tracing::info!("reconnecting as asked");
                true
            }
        };
        // Unpublished before it is closed, so that no request picks up a
        // connection on its way out.
        agent.set_conn(None, false);
        if asked {
            client.close("reconnecting").await;
        } else {
            let delay = backoff.step();
            agent.note_retry("connection lost", delay);
            tokio::time::sleep(delay).await;
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
}
