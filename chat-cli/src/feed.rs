//! A live, resumable follow of agentd's event journal (the `Events`
//! request), shared by `chat`, `events` and `inbox --follow`.
//!
//! ```text
//! Feed::open ──► Events { after } ──► agentd: Events { head }, then Event lines
//!                                       │
//!   reader task ── each line ──► feed task ──► FeedItem::Event ──► caller
//!                                   ▲  │ MarkRead lines (no answer) on the
//!        caller: Feed::mark_read ───┘  │ same connection
//!                                      ▼
//!   connection lost ─► FeedItem::Lost; every second: connect, Events { after:
//!   the last cursor passed on } ─► FeedItem::Back, and the events missed
//! ```
//!
//! Cursors survive agentd restarts, so resuming after the last cursor
//! handed to the caller loses nothing and repeats nothing; an event at or
//! below that cursor is dropped should agentd ever send one again.

use std::time::Duration;

use securechat_client::ipc::IpcClientError;
use securechat_client::Paths;
use securechat_common::ipc::{EventRecord, IpcRequest, IpcResponse, MAX_MARK_READ};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::link::{self, Duplex, Writer};

/// How long to wait between attempts to reach agentd again.
pub const RETRY: Duration = Duration::from_secs(1);

/// What a [`Feed`] hands on.
#[derive(Debug)]
pub enum FeedItem {
    /// One event, in journal order.
    Event(EventRecord),
    /// The connection to agentd broke (agentd stopped or crashed); the
    /// feed retries every [`RETRY`].
    Lost(String),
    /// agentd answers again but refuses the events (its key is locked, say);
    /// the feed keeps retrying. Said once per reason.
    Refused(String),
    /// agentd answers again; the events missed meanwhile follow.
    Back,
}

/// A follow of agentd's events that reconnects by itself. Dropping it
/// stops its tasks.
pub struct Feed {
    items: mpsc::Receiver<FeedItem>,
    marks: mpsc::UnboundedSender<Vec<String>>,
    _tasks: JoinSet<()>,
}

impl Feed {
    /// Connect and start following after `after` (`None`: only what
    /// happens from now on). Fails when agentd cannot be reached or
    /// refuses; returns the journal's newest cursor as of now beside the
    /// feed.
    pub async fn open(paths: &Paths, after: Option<u64>) -> Result<(Self, u64), IpcClientError> {
        let mut conn = Duplex::open(paths).await?;
        let head = start(&mut conn, after).await?;
        let (items_tx, items) = mpsc::channel(256);
        let (marks, marks_rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let follow = Follow {
            paths: paths.clone(),
            last: after.unwrap_or(head),
            items: items_tx,
            marks: marks_rx,
            pending: Vec::new(),
        };
        tasks.spawn(follow.run(conn));
        Ok((
            Self {
                items,
                marks,
                _tasks: tasks,
            },
            head,
        ))
    }

    /// The next item; `None` only if the feed's task ended (it does not
    /// while the feed lives).
    pub async fn next(&mut self) -> Option<FeedItem> {
        self.items.recv().await
    }

    /// Mark messages read once they are shown (sent on the events
    /// connection, again after a reconnect if it broke meanwhile).
    pub fn mark_read(&self, ids: Vec<String>) {
        if !ids.is_empty() {
            let _ = self.marks.send(ids);
        }
    }
}

/// Ask for the events after `after`; agentd answers with the head first.
async fn start(conn: &mut Duplex, after: Option<u64>) -> Result<u64, IpcClientError> {
    conn.send(&IpcRequest::Events { after }).await?;
    match conn.next().await? {
        IpcResponse::Events { head } => Ok(head),
        _ => Err(IpcClientError::Closed),
    }
}

/// The feed's task: follows one connection after another.
struct Follow {
    paths: Paths,
    /// The cursor of the last event handed on (or the head we started at).
    last: u64,
    items: mpsc::Sender<FeedItem>,
    marks: mpsc::UnboundedReceiver<Vec<String>>,
    /// Ids to mark read that could not be written yet.
    pending: Vec<String>,
}

impl Follow {
    async fn run(mut self, mut conn: Duplex) {
        loop {
            let reason = match self.follow(conn).await {
                Some(reason) => reason,
                // The caller is gone.
                None => return,
            };
            if self.items.send(FeedItem::Lost(reason)).await.is_err() {
                return;
            }
            let mut refused: Option<String> = None;
            conn = loop {
                tokio::time::sleep(RETRY).await;
                if self.items.is_closed() {
                    return;
                }
                let Ok(mut c) = Duplex::open(&self.paths).await else {
                    continue;
                };
                match start(&mut c, Some(self.last)).await {
                    Ok(_) => break c,
                    Err(IpcClientError::Agent(e)) if refused.as_ref() != Some(&e.message) => {
                        refused = Some(e.message.clone());
                        if self.items.send(FeedItem::Refused(e.message)).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => {}
                }
            };
            if self.items.send(FeedItem::Back).await.is_err() {
                return;
            }
        }
    }

    /// Follow one connection until it breaks (`Some(why)`) or the caller
    /// goes away (`None`).
    async fn follow(&mut self, conn: Duplex) -> Option<String> {
        let Duplex { mut reader, writer } = conn;
        let mut writer = Some(writer);
        // Reading runs on its own task, so that no line is ever cut in half
        // by waiting for something else.
        let (lines_tx, mut lines) = mpsc::channel(64);
        let mut reading = JoinSet::new();
        reading.spawn(async move {
            loop {
                let next = link::next(&mut reader).await;
                let end = next.is_err();
                if lines_tx.send(next).await.is_err() || end {
                    return;
                }
            }
        });
        if !self.pending.is_empty() {
            let ids = std::mem::take(&mut self.pending);
            self.write_marks(&mut writer, ids).await;
        }
        loop {
            tokio::select! {
                line = lines.recv() => match line {
                    Some(Ok(IpcResponse::Event(rec))) => {
                        if rec.cursor <= self.last {
                            continue;
                        }
                        self.last = rec.cursor;
                        if self.items.send(FeedItem::Event(rec)).await.is_err() {
                            return None;
                        }
                    }
                    // Nothing else belongs in the stream; a newer agentd may
                    // add kinds of lines, which are skipped.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Some(e.to_string()),
                    None => return Some("agentd closed the connection".into()),
                },
                ids = self.marks.recv() => match ids {
                    Some(ids) => self.write_marks(&mut writer, ids).await,
                    None => return None,
                },
            }
        }
    }

    /// Write `MarkRead` lines; if the connection cannot take them, keep the
    /// ids for the next one (the reader notices the break).
    async fn write_marks(&mut self, writer: &mut Option<Writer>, ids: Vec<String>) {
        let Some(w) = writer.as_mut() else {
            self.pending.extend(ids);
            return;
        };
        for chunk in ids.chunks(MAX_MARK_READ) {
            let req = IpcRequest::MarkRead {
                ids: chunk.to_vec(),
            };
            if securechat_client::lines::write_msg(w, &req).await.is_err() {
                *writer = None;
                self.pending.extend(ids);
                return;
            }
        }
    }
}
