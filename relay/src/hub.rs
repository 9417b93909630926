//! Who is online: one live connection per user, a wake-up per user, and
//! the news of users coming and going.
//!
//! ```text
//!  Send(for bob) ── commit ──► hub.notify("bob") ──► bob's push task reads the queue
//!  login(bob) on conn 7 ──► hub.register ──► conn 3 (older bob) closed: "superseded"
//!  first login(bob) / last bob gone ──► Presence{bob, online} ──► every push task
//! ```
//!
//! The newest connection of a user wins: registering closes the previous
//! one with a reason, so exactly one push task drains each queue.
//!
//! A [`Presence`] change is broadcast when a user who was offline registers
//! and when the live connection of a user unregisters. A connection that
//! supersedes another of the same user changes nothing (no leave and join),
//! and the superseded one's unregistering is not a leave: it is no longer
//! the live one. Changes are sent while the map is locked, so they come in
//! the order the map changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, Notify};

pub use crate::close::{SUPERSEDED_CODE, SUPERSEDED_REASON};

/// Presence changes a push task may fall behind by before it skips some
/// (it cannot write while its client does not read; the others go on).
const PRESENCE_BACKLOG: usize = 256;

struct Entry {
    conn_id: u64,
    conn: quinn::Connection,
    notify: Arc<Notify>,
}

/// A user came online or went offline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    /// Who.
    pub user: String,
    /// Online now (`true`) or gone (`false`).
    pub online: bool,
}

/// The online users.
pub struct Hub {
    users: Mutex<HashMap<String, Entry>>,
    presence: broadcast::Sender<Presence>,
}

impl Default for Hub {
    fn default() -> Self {
        let (presence, _) = broadcast::channel(PRESENCE_BACKLOG);
        Self {
            users: Mutex::default(),
            presence,
        }
    }
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

    /// Tell everyone who is subscribed (nobody listening is fine).
    fn announce(&self, user: &str, online: bool) {
        let _ = self.presence.send(Presence {
            user: user.to_string(),
            online,
        });
    }

    /// The presence changes from now on. Subscribe before registering, so
    /// that no change between the two is missed (the user's own come too).
    pub fn subscribe(&self) -> broadcast::Receiver<Presence> {
        self.presence.subscribe()
    }

    /// Make `conn` the user's live connection; close any older one. Returns
    /// the wake-up the push task for this connection waits on.
    pub fn register(&self, username: &str, conn_id: u64, conn: quinn::Connection) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut users = self.lock();
        let old = users.insert(
            username.to_string(),
            Entry {
                conn_id,
                conn,
                notify: Arc::clone(&notify),
            },
        );
        if old.is_none() {
            self.announce(username, true);
        }
        drop(users);
        if let Some(old) = old.filter(|old| old.conn_id != conn_id) {
            tracing::info!(%username, old = old.conn_id, new = conn_id, "newer connection supersedes older one");
            old.conn.close(SUPERSEDED_CODE.into(), SUPERSEDED_REASON);
        }
        notify
    }

    /// Forget the user's connection if it is still `conn_id`.
    pub fn unregister(&self, username: &str, conn_id: u64) {
        let mut users = self.lock();
        if users.get(username).is_some_and(|e| e.conn_id == conn_id) {
            users.remove(username);
            self.announce(username, false);
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
