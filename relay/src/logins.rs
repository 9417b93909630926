//! Live logins by session token, so that ending a session ends every
//! connection using it — not only the next resume.
//!
//! ```text
//!  Login / Resume ok ──► add(token, conn)
//!  Logout on conn 3 ───► session removed from the store, then
//!                        end(token): conn 7, 9 (same token) lose their login
//!                        and are closed: "session ended: logged out"
//!  session expiry ─────► the connection's timer: end(token): "…it expired"
//!  connection closes ──► remove(token, conn)
//! ```
//!
//! A resume racing a logout cannot keep a revoked token alive: the logout
//! removes the session from the store *before* it ends the live logins, and
//! a resume registers here *before* it checks the store again (see
//! `handlers::account`), so one of the two sees the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::conn_state::ConnState;

/// SHA-256 of a session token → the connections logged in with it, by id.
type ByToken = HashMap<[u8; 32], HashMap<u64, Weak<ConnState>>>;

/// Connections logged in, per SHA-256 of their session token.
#[derive(Default)]
pub(crate) struct LiveLogins {
    by_token: Mutex<ByToken>,
}

impl std::fmt::Debug for LiveLogins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveLogins({} sessions)", self.lock().len())
    }
}

impl LiveLogins {
    fn lock(&self) -> std::sync::MutexGuard<'_, ByToken> {
        crate::lock(&self.by_token)
    }

    /// `conn` is logged in with the token hashed to `token_hash`.
    pub(crate) fn add(&self, token_hash: [u8; 32], conn: &Arc<ConnState>) {
        self.lock()
            .entry(token_hash)
            .or_default()
            .insert(conn.id, Arc::downgrade(conn));
    }

    /// `conn_id` no longer uses the token (logout, another login, closed).
    pub(crate) fn remove(&self, token_hash: &[u8; 32], conn_id: u64) {
        let mut by_token = self.lock();
        if let Some(conns) = by_token.get_mut(token_hash) {
            conns.remove(&conn_id);
            if conns.is_empty() {
                by_token.remove(token_hash);
            }
        }
    }

    /// End every live login with this token: each connection loses its
    /// login and is closed with `reason`. Returns how many were ended.
    pub(crate) fn end(&self, token_hash: &[u8; 32], reason: &'static [u8]) -> usize {
        let conns = self.lock().remove(token_hash).unwrap_or_default();
        let mut ended = 0;
        for conn in conns.values().filter_map(Weak::upgrade) {
            if conn.end_login(token_hash, reason) {
                ended += 1;
            }
        }
        ended
    }
}
