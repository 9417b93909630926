//! Who is online: one live connection per user, and a wake-up per user.
//!
//! ```text
//!  Send(for bob) ── commit ──► hub.notify("bob") ──► bob's push task reads the queue
//!  login(bob) on conn 7 ──► hub.register ──► conn 3 (older bob) closed: "superseded"
//! ```
//!
//! The newest connection of a user wins: registering closes the previous
//! one with a reason, so exactly one push task drains each queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

pub use crate::close::{SUPERSEDED_CODE, SUPERSEDED_REASON};

struct Entry {
    conn_id: u64,
    conn: quinn::Connection,
    notify: Arc<Notify>,
}

/// The online users.
#[derive(Default)]
pub struct Hub {
    users: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hub({} online)", self.len())
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        crate::lock(&self.users)
    }

    /// Make `conn` the user's live connection; close any older one. Returns
    /// the wake-up the push task for this connection waits on.
    pub fn register(&self, username: &str, conn_id: u64, conn: quinn::Connection) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let old = self.lock().insert(
            username.to_string(),
            Entry {
                conn_id,
                conn,
                notify: Arc::clone(&notify),
            },
        );
        if let Some(old) = old {
            if old.conn_id != conn_id {
                tracing::info!(%username, old = old.conn_id, new = conn_id, "newer connection supersedes older one");
                old.conn.close(SUPERSEDED_CODE.into(), SUPERSEDED_REASON);
            }
        }
        notify
    }

    /// Forget the user's connection if it is still `conn_id`.
    pub fn unregister(&self, username: &str, conn_id: u64) {
        let mut users = self.lock();
        if users.get(username).is_some_and(|e| e.conn_id == conn_id) {
            users.remove(username);
        }
    }

    /// Wake the user's push task, if online. A wake-up while the task is
    /// busy is remembered, so nothing committed is missed.
    pub fn notify(&self, username: &str) {
        if let Some(entry) = self.lock().get(username) {
            entry.notify.notify_one();
        }
    }

    /// Usernames online now, sorted.
    pub fn online(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().keys().cloned().collect();
        names.sort();
        names
    }

    /// How many users are online.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nobody is online.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
