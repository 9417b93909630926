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
//!
//! With several relays on one Redis ([`Hub::clustered`]), the hub holds this
//! relay's connections as before, and who is online anywhere as the
//! `cluster` task hears it: presence changes then come from there
//! ([`Hub::remote_join`], [`Hub::remote_leave`]), for this relay's logins
//! too, so every relay tells its watchers the same changes.

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
    /// With several relays: the place of this login in Redis's order of
    /// logins, once the `cluster` task has recorded it.
    login_seq: Option<u64>,
    /// The latest login of the same user on another relay heard of before
    /// `login_seq` was known: whichever is later wins.
    remote_seq: Option<u64>,
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
    /// With several relays: who is online on any relay.
    global: HashSet<String>,
}

/// The online users.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// One of several relays: presence and the online list come from Redis.
    clustered: bool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hub({} online)", self.len())
    }
}

impl Hub {
    /// A hub for one of several relays sharing a Redis.
    pub fn clustered() -> Self {
        Self {
            inner: Mutex::default(),
            clustered: true,
        }
    }

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
                login_seq: None,
                remote_seq: None,
            },
        );
        match &old {
            Some(old) => inner.unwatch(username, &old.watching),
            None if self.clustered => {
                inner.global.insert(username.to_string());
            }
            None => inner.announce(username, true),
        }
        drop(inner);
        if let Some(old) = old.filter(|old| old.conn_id != conn_id) {
            tracing::info!(%username, old = old.conn_id, new = conn_id, "newer connection supersedes older one");
            old.conn.close(SUPERSEDED_CODE.into(), SUPERSEDED_REASON);
        }
        Live { notify, presence }
    }

    /// Forget the user's connection if it is still `conn_id`; returns
    /// whether it was (the user went offline here).
    pub fn unregister(&self, username: &str, conn_id: u64) -> bool {
        let mut inner = self.lock();
        if inner
            .users
            .get(username)
            .is_none_or(|e| e.conn_id != conn_id)
        {
            return false;
        }
        if let Some(gone) = inner.users.remove(username) {
            inner.unwatch(username, &gone.watching);
        }
        if !self.clustered {
            inner.announce(username, false);
        }
        true
    }

    /// Another relay (or this one, `here`) made `username` live there,
    /// as Redis's login number `seq`. A connection of the user here whose
    /// login came before it is closed as superseded (one whose login Redis
    /// has not numbered yet is compared when it is: see
    /// [`Hub::login_recorded`]). Watchers hear of it unless the user
    /// `was_online`.
    pub fn remote_join(&self, username: &str, here: bool, was_online: bool, seq: u64) {
        let mut inner = self.lock();
        inner.global.insert(username.to_string());
        let mut old = None;
        if !here {
            if let Some(entry) = inner.users.get_mut(username) {
                match entry.login_seq {
                    Some(mine) if mine < seq => old = inner.users.remove(username),
                    Some(_) => {}
                    None => entry.remote_seq = entry.remote_seq.max(Some(seq)),
                }
            }
        }
        if let Some(old) = &old {
            inner.unwatch(username, &old.watching);
        }
        if !was_online {
            inner.announce(username, true);
        }
        drop(inner);
        if let Some(old) = old {
            tracing::info!(%username, old = old.conn_id, "a login on another relay supersedes this one");
            old.conn.close(SUPERSEDED_CODE.into(), SUPERSEDED_REASON);
        }
    }

    /// Redis numbered the login of `username` on this relay's connection
    /// `conn_id` as `seq`. If a later login of the user on another relay
    /// was heard of meanwhile, this connection is superseded now.
    pub fn login_recorded(&self, username: &str, conn_id: u64, seq: u64) {
        let mut inner = self.lock();
        let Some(entry) = inner.users.get_mut(username) else {
            return;
        };
        if entry.conn_id != conn_id {
            return;
        }
        entry.login_seq = Some(seq);
        if entry.remote_seq.is_none_or(|remote| remote <= seq) {
            return;
        }
        let Some(old) = inner.users.remove(username) else {
            return;
        };
        inner.unwatch(username, &old.watching);
        drop(inner);
        tracing::info!(%username, old = old.conn_id, "a later login on another relay supersedes this one");
        old.conn.close(SUPERSEDED_CODE.into(), SUPERSEDED_REASON);
    }

    /// `username` went offline on the relay that had the live connection.
    pub fn remote_leave(&self, username: &str) {
        let mut inner = self.lock();
        if inner.users.contains_key(username) {
            // Live here after all (a newer login): not gone.
            return;
        }
        if inner.global.remove(username) {
            inner.announce(username, false);
        }
    }

    /// Who is online on any relay, as read from Redis afresh.
    pub fn reset_global(&self, users: Vec<String>) {
        let mut inner = self.lock();
        let mut global: HashSet<String> = users.into_iter().collect();
        global.extend(inner.users.keys().cloned());
        inner.global = global;
    }

    /// Wake every push task here (news may have been missed).
    pub fn notify_all(&self) {
        for entry in self.lock().users.values() {
            entry.notify.notify_one();
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
            .filter(|u| inner.is_online(u, self.clustered))
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

    /// Usernames online now (on any relay, with several), sorted.
    pub fn online(&self) -> Vec<String> {
        let inner = self.lock();
        let mut names: Vec<String> = if self.clustered {
            inner.global.iter().cloned().collect()
        } else {
            inner.users.keys().cloned().collect()
        };
        names.sort();
        names
    }

    /// How many users are online (on any relay, with several).
    pub fn len(&self) -> usize {
        let inner = self.lock();
        if self.clustered {
            inner.global.len()
        } else {
            inner.users.len()
        }
    }

    /// True when nobody is online.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn is_online(&self, user: &str, clustered: bool) -> bool {
        if clustered {
            self.global.contains(user)
        } else {
            self.users.contains_key(user)
        }
    }

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
