//! The push task of a logged-in connection: one unidirectional stream that
//! carries the user's queue and the others' comings and goings.
//!
//! ```text
//!  loop:
//!    queue (seq > cursor) ──batches──► Push::Deliver / Push::Expired …  until it is empty
//!    wait for: hub.notify(user) ──► back to the queue
//!              a watched user's presence change ──► Push::Presence{user, online}
//!              connection closed ──► end
//! ```
//!
//! Everything up to the cursor has been pushed on this connection; what is
//! not acknowledged stays queued and is pushed again on the next login.
//! Presence changes are written between queue batches. A client that reads
//! slowly holds up only its own stream: the presence changes it falls
//! behind on are skipped (its agent can ask `Online`, or watch again),
//! never queued without bound.

use std::sync::Arc;

use securechat_common::codec;
use securechat_common::protocol::Push;
use securechat_common::Envelope;
use tokio::sync::{mpsc, Notify};

use crate::conn_state::ConnState;
use crate::hub::Presence;
use crate::lock;
use crate::shared::Shared;
use crate::store::{blocking, from_bytes, QueueEntry, QueueItem, StoreError};

/// Queue entries read from the store per batch.
const PUSH_BATCH: usize = 64;

/// The push stream ended: the connection closed, or the store failed (the
/// connection was then closed with a reason).
struct Ended;

/// Push `username`'s queue and the presence changes on `state`'s
/// connection until it closes.
pub(crate) async fn run(
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    username: String,
    notify: Arc<Notify>,
    presence: mpsc::Receiver<Presence>,
) {
    let send = match state.conn.open_uni().await {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(conn = state.id, error = %e, "cannot open the push stream");
            return;
        }
    };
    let mut pusher = Pusher {
        shared,
        state,
        username,
        send,
        cursor: 0,
    };
    let _ = pusher.serve(&notify, presence).await;
}

/// Start the push task unless one runs already.
pub(crate) fn start(state: &Arc<ConnState>, shared: &Arc<Shared>, username: &str) {
    let mut slot = lock(&state.push_task);
    if slot.as_ref().is_some_and(|(t, _)| !t.is_finished()) {
        return;
    }
    let live = shared.hub.register(username, state.id, state.conn.clone());
    if let Some(cluster) = &shared.cluster {
        cluster.login(username, state.id);
    }
    let task = tokio::spawn(run(
        Arc::clone(shared),
        Arc::clone(state),
        username.to_string(),
        live.notify,
        live.presence,
    ));
    *slot = Some((task, username.to_string()));
}

/// Stop the push task (logout or connection end) and go offline.
pub(crate) async fn stop(state: &ConnState, shared: &Shared) {
    let task = lock(&state.push_task).take();
    if let Some((task, username)) = task {
        task.abort();
        let _ = task.await;
        if shared.hub.unregister(&username, state.id) {
            if let Some(cluster) = &shared.cluster {
                cluster.logout(&username, state.id);
            }
        }
    }
}

struct Pusher {
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    username: String,
    send: quinn::SendStream,
    /// The last queue position pushed on this connection.
    cursor: u64,
}

impl Pusher {
    async fn serve(
        &mut self,
        notify: &Notify,
        mut presence: mpsc::Receiver<Presence>,
    ) -> Result<(), Ended> {
        let mut presence_open = true;
        loop {
            // Armed before the queue is read: a commit during the read
            // still wakes the wait below.
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            self.drain_queue().await?;
            loop {
                tokio::select! {
                    () = &mut woken => break,
                    change = presence.recv(), if presence_open => match change {
                        Some(change) => self.push_presence(change).await?,
                        // The hub forgot this connection: a newer one took
                        // over (and this one is being closed).
                        None => presence_open = false,
                    },
                    _ = self.state.conn.closed() => return Err(Ended),
                }
            }
        }
    }

    /// Push every queue entry after the cursor.
    async fn drain_queue(&mut self) -> Result<(), Ended> {
        loop {
            let user = self.username.clone();
            let cursor = self.cursor;
            let batch = match blocking(&self.shared.store, move |s| {
                s.entries_after(&user, cursor, PUSH_BATCH)
            })
            .await
            {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(conn = self.state.id, error = %e, "cannot read the queue");
                    self.state.conn.close(0u32.into(), b"relay storage error");
                    return Err(Ended);
                }
            };
            if batch.is_empty() {
                return Ok(());
            }
            for entry in batch {
                self.cursor = entry.seq;
                match to_push(&entry) {
                    Ok(push) => {
                        self.write(&push).await?;
                        tracing::debug!(conn = self.state.id, seq = entry.seq, "pushed");
                    }
                    // An entry from an older relay: it stays queued (the
                    // retention time removes it) and the others go on.
                    Err(e) => {
                        tracing::error!(conn = self.state.id, seq = entry.seq, error = %e, "skipping an undecodable queue entry");
                    }
                }
            }
        }
    }

    /// Tell this user that someone they watch came or went.
    async fn push_presence(&mut self, change: Presence) -> Result<(), Ended> {
        if change.user == self.username {
            return Ok(());
        }
        self.write(&Push::Presence {
            user: change.user,
            online: change.online,
        })
        .await
    }

    async fn write(&mut self, push: &Push) -> Result<(), Ended> {
        let frame = match codec::encode(push) {
            Ok(frame) => frame,
            Err(e) => {
                // Nothing the relay queues is larger than a frame; should it
                // happen, that one push is lost, not the stream.
                tracing::error!(conn = self.state.id, error = %e, "cannot encode a push; skipped");
                return Ok(());
            }
        };
        self.send.write_all(&frame).await.map_err(|e| {
            tracing::debug!(conn = self.state.id, error = %e, "push stream closed");
            Ended
        })
    }
}

/// What the client is sent for a queue entry.
fn to_push(entry: &QueueEntry) -> Result<Push, StoreError> {
    Ok(match QueueItem::decode(&entry.item)? {
        QueueItem::Envelope(bytes) => Push::Deliver {
            envelope: from_bytes::<Envelope>(&bytes)?,
            received_unix: entry.received_unix,
        },
        QueueItem::Expired(notice) => Push::Expired {
            notice: notice.notice,
            id: notice.id,
            recipient: notice.recipient,
            stored_unix: notice.stored_unix,
        },
    })
}
