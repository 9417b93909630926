//! Who is online: one live connection per user, a wake-up per user, and
//! the news of users coming and going, for those who watch them.
//!
//! ```text
//!  Send(for bob) ── commit ──► hub.notify("bob") ──► bob's push task reads the queue
//!  login(bob) on conn 7 ──► hub.register ──► conn 3 (older bob) closed: "superseded"
//!  first login(bob) / last bob gone ──► Presence{bob, online} ──► push tasks watching bob
//! ```
//!
//! The newest connection of a user wins: registering closes the previous
//! one with a reason, so exactly one push task drains each queue.
//!
//! A [`Presence`] change is sent when a user who was offline registers and
//! when the live connection of a user unregisters, to the live connections
//! that watch that user ([`Hub::watch`]: an agent's contacts). A connection
//! that supersedes another of the same user changes nothing (no leave and
//! join), and the superseded one's unregistering is not a leave: it is no
//! longer the live one. Changes are sent while the map is locked, so they
//! come in the order the map changed.
//!
//! Only watchers hear a change, so a login costs one push per watcher, not
//! one per online user: with everyone told of everyone, ten thousand users
//! logging in meant a hundred million pushes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

pub use crate::close::{SUPERSEDED_CODE, SUPERSEDED_REASON};

/// Presence changes a push task may fall behind by before it skips some
/// (it cannot write while its client does not read; the others go on).
const PRESENCE_BACKLOG: usize = 256;

struct Entry {
    conn_id: u64,
    conn: quinn::Connection,
    notify: Arc<Notify>,
    /// Where this connection's presence changes go (its push task).
    presence: mpsc::Sender<Presence>,
    /// The users this connection watches.
    watching: Vec<String>,
}

/// A user came online or went offline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    /// Who.
    pub user: String,
    /// Online now (`true`) or gone (`false`).
    pub online: bool,
}

/// What a push task is handed when its connection goes live.
pub struct Live {
    /// Woken when the user's queue may have grown.
    pub notify: Arc<Notify>,
    /// The presence changes of the users this connection watches.
    pub presence: mpsc::Receiver<Presence>,
}

#[derive(Default)]
struct Inner {
    users: HashMap<String, Entry>,
    /// Watched user → the live connections (by user) watching them.
    watchers: HashMap<String, HashSet<String>>,
}

/// The online users.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hub({} online)", self.len())
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
    }

    /// Make `conn` the user's live connection; close any older one. Returns
    /// what the push task for this connection waits on. The new connection
    /// watches nobody until [`Hub::watch`].
    pub fn register(&self, username: &str, conn_id: u64, conn: quinn::Connection) -> Live {
        let notify = Arc::new(Notify::new());
        let (tx, presence) = mpsc::channel(PRESENCE_BACKLOG);
        let mut inner = self.lock();
        let old = inner.users.insert(
            username.to_string(),
            Entry {
                conn_id,
                conn,
                notify: Arc::clone(&notify),
                presence: tx,
                watching: Vec::new(),
            },
        );
        match &old {
            Some(old) => inner.unwatch(username, &old.watching),
            None => inner.announce(username, true),
        }
        drop(inner);
        if let Some(old) = old.filter(|old| old.conn_id != conn_id) {
            tracing::info!(%username, old = old.conn_id, new = conn_id, "newer connection supersedes older one");
            old.conn.close(SUPERSEDED_CODE.into(), SUPERSEDED_REASON);
        }
        Live { notify, presence }
    }

    /// Forget the user's connection if it is still `conn_id`.
    pub fn unregister(&self, username: &str, conn_id: u64) {
        let mut inner = self.lock();
        if inner
            .users
            .get(username)
            .is_some_and(|e| e.conn_id == conn_id)
        {
            if let Some(gone) = inner.users.remove(username) {
                inner.unwatch(username, &gone.watching);
            }
            inner.announce(username, false);
        }
    }

    /// Let the user's live connection `conn_id` hear the comings and goings
    /// of `users` (instead of those it watched before). Returns which of
    /// them are online now, sorted; `None` if `conn_id` is not the live one
    /// (it was superseded, or has logged out).
    pub fn watch(
        &self,
        username: &str,
        conn_id: u64,
        mut users: Vec<String>,
    ) -> Option<Vec<String>> {
        let mut inner = self.lock();
        let old = match inner.users.get_mut(username) {
            Some(entry) if entry.conn_id == conn_id => std::mem::take(&mut entry.watching),
            _ => return None,
        };
        inner.unwatch(username, &old);
        users.retain(|u| u != username);
        users.sort();
        users.dedup();
        for user in &users {
            inner
                .watchers
                .entry(user.clone())
                .or_default()
                .insert(username.to_string());
        }
        let online = users
            .iter()
            .filter(|u| inner.users.contains_key(u.as_str()))
            .cloned()
            .collect();
        if let Some(entry) = inner.users.get_mut(username) {
            entry.watching = users;
        }
        Some(online)
    }

    /// Wake the user's push task, if online. A wake-up while the task is
    /// busy is remembered, so nothing committed is missed.
    pub fn notify(&self, username: &str) {
        if let Some(entry) = self.lock().users.get(username) {
            entry.notify.notify_one();
        }
    }

    /// Usernames online now, sorted.
    pub fn online(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().users.keys().cloned().collect();
        names.sort();
        names
    }

    /// How many users are online.
    pub fn len(&self) -> usize {
        self.lock().users.len()
    }

    /// True when nobody is online.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Tell the live connections watching `user` (a watcher that has
    /// fallen [`PRESENCE_BACKLOG`] changes behind misses this one).
    fn announce(&self, user: &str, online: bool) {
        let Some(watchers) = self.watchers.get(user) else {
            return;
        };
        for watcher in watchers {
            if let Some(entry) = self.users.get(watcher) {
                let _ = entry.presence.try_send(Presence {
                    user: user.to_string(),
                    online,
                });
            }
        }
    }

    /// `watcher` no longer watches `users`.
    fn unwatch(&mut self, watcher: &str, users: &[String]) {
        for user in users {
            if let Some(set) = self.watchers.get_mut(user) {
                set.remove(watcher);
                if set.is_empty() {
                    self.watchers.remove(user);
                }
            }
        }
    }
}
