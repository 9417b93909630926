//! The local socket server: JSON lines, a version check first, peers of
//! another uid refused.
//!
//! The socket lives in a 0700 directory and is itself 0600; the peer
//! credential check is the last line of defence.

use std::sync::Arc;

use futures_util::StreamExt;
use interprocess::local_socket::tokio::{prelude::*, Listener, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use securechat_common::ipc::{
    ContactInfo, InboxMessage, IpcError, IpcErrorKind, IpcRequest, IpcResponse, SendOutcome,
    SendState, SentInfo, TrustState, IPC_VERSION,
};
use securechat_common::limits::validate_username;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::task::JoinSet;

use crate::agent::{err, now_ms, Agent};
use crate::commands;
use crate::files::ensure_private_dir;
use crate::store::InboxFilter;
use crate::AgentError;
use securechat_client::lines::{read_line, write_msg, IoLineError};
use securechat_client::Paths;

/// Create the socket directory (0700) and bind the socket, replacing a
/// stale socket file but refusing if another agentd answers on it.
///
/// A directory agentd owns (its home, or a `securechat` directory) is made
/// 0700; a directory named by `--socket` / `SECURECHAT_SOCKET` is left as it
/// is but refused when other users may write to it, since they could then
/// replace the socket.
pub(crate) fn bind(paths: &Paths) -> Result<Listener, AgentError> {
    let dir = paths.socket_dir();
    let ours = dir == paths.home || dir.file_name() == Some(std::ffi::OsStr::new("securechat"));
    if ours || !dir.exists() {
        ensure_private_dir(dir).map_err(|e| AgentError::io(dir, e))?;
    } else {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)
            .map_err(|e| AgentError::io(dir, e))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            return Err(AgentError::SocketDirShared(dir.to_path_buf()));
        }
    }
    if paths.socket.exists() {
        if std::os::unix::net::UnixStream::connect(&paths.socket).is_ok() {
            return Err(AgentError::AlreadyRunning(paths.socket.clone()));
        }
        std::fs::remove_file(&paths.socket).map_err(|e| AgentError::io(&paths.socket, e))?;
    }
    let name = paths
        .socket
        .as_path()
        .to_fs_name::<GenericFilePath>()
        .map_err(|e| AgentError::io(&paths.socket, e))?;
    ListenerOptions::new()
        .name(name)
        .mode(0o600)
        .create_tokio()
        .map_err(|e| AgentError::io(&paths.socket, e))
}

/// Adopt a socket systemd opened for us (socket activation). The socket
/// file stays systemd's: it is not removed when agentd stops, so the next
/// chat-cli call starts agentd again.
pub(crate) fn adopt(listener: std::os::unix::net::UnixListener) -> std::io::Result<Listener> {
    use interprocess::os::unix::uds_local_socket as uds;
    let sync = uds::Listener::from(listener);
    let tokio_listener = uds::tokio::Listener::try_from(sync)?;
    Ok(Listener::from(tokio_listener))
}

/// Accept connections until aborted; each runs in a task owned here.
pub(crate) async fn serve(listener: Listener, agent: Arc<Agent>) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok(stream) => {
                    tasks.spawn(handle(agent.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!("local socket accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

async fn handle(agent: Arc<Agent>, stream: Stream) {
    let me = rustix::process::geteuid().as_raw();
    let peer = stream.peer_creds().ok().and_then(|c| c.euid());
    let (r, mut w) = tokio::io::split(stream);
    let mut reader = BufReader::new(r);
    if peer != Some(me) {
        tracing::warn!("refused a local connection from uid {peer:?}");
        // Read the hello first (bounded) so the refusal is not lost to a reset.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), read_line(&mut reader)).await;
        let e = err(
            IpcErrorKind::PermissionDenied,
            "this agentd belongs to another user",
        );
        let _ = write_msg(&mut w, &IpcResponse::Error(e)).await;
        return;
    }
    if let Err(e) = serve_conn(&agent, &mut reader, &mut w).await {
        tracing::debug!("local connection ended: {e}");
    }
}

fn bad_request(message: String) -> IpcResponse {
    IpcResponse::Error(err(IpcErrorKind::BadRequest, message))
}

async fn serve_conn<R, W>(
    agent: &Arc<Agent>,
    reader: &mut BufReader<R>,
    w: &mut W,
) -> Result<(), IoLineError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeted = false;
    loop {
        let line = match read_line(reader).await {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(IoLineError::Line(e)) => {
                let resp = IpcResponse::Error(err(IpcErrorKind::TooLarge, e.to_string()));
                return write_msg(w, &resp).await;
            }
            Err(e) => return Err(e),
        };
        let req = match securechat_common::ipc::decode_line::<IpcRequest>(&line) {
            Ok(r) => r,
            Err(e) => {
                write_msg(w, &bad_request(format!("not a valid request: {e}"))).await?;
                if !greeted {
                    return Ok(());
                }
                continue;
            }
        };
        tracing::debug!("local request {req:?}");
        if !greeted {
            let resp = match req {
                IpcRequest::Hello { version } if version == IPC_VERSION => IpcResponse::Hello {
                    version: IPC_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                },
                IpcRequest::Hello { version } => {
                    let e = err(
                        IpcErrorKind::VersionMismatch,
                        format!(
                            "chat-cli speaks local protocol {version}, this agentd speaks \
                             {IPC_VERSION}; install matching versions and restart agentd"
                        ),
                    );
                    return write_msg(w, &IpcResponse::Error(e)).await;
                }
                _ => return write_msg(w, &bad_request("send hello first".into())).await,
            };
            write_msg(w, &resp).await?;
            greeted = true;
            continue;
        }
        match req {
            IpcRequest::Events { after } => return events(agent, after, reader, w).await,
            IpcRequest::History { with, limit } => history(agent, with, limit, w).await?,
            IpcRequest::Contacts => contacts(agent, w).await?,
            IpcRequest::Inbox { all, from } => inbox(agent, all, from.as_deref(), w).await?,
            IpcRequest::Held => held(agent, w).await?,
            IpcRequest::Send {
                to,
                text,
                cancellable: true,
            } => send_cancellable(agent, to, text, reader, w).await?,
            req => {
                let resp = commands::handle(agent, req)
                    .await
                    .unwrap_or_else(IpcResponse::Error);
                write_msg(w, &resp).await?;
            }
        }
    }
}

/// A cancellable send: `Accepted { id }` at once, then the result; a
/// `Cancel` line meanwhile withdraws the message if it has not gone to the
/// relay yet (`Cancelled`), or is answered `Sending`. If the client stops
/// listening (after `Sending`, or by hanging up), the send still finishes
/// and its outcome is kept for `status`: nothing is left half done.
async fn send_cancellable<R, W>(
    agent: &Arc<Agent>,
    to: String,
    text: String,
    reader: &mut BufReader<R>,
    w: &mut W,
) -> Result<(), IoLineError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let id = match commands::check_send(&to, &text).and_then(|()| commands::new_message_id()) {
        Ok(id) => id,
        Err(e) => return write_msg(w, &IpcResponse::Error(e)).await,
    };
    let id_text = id.to_string();
    let outcome = |state, detail| SendOutcome {
        id: id_text.clone(),
        to: to.clone(),
        state,
        detail,
        at_ms: now_ms(),
    };
    let mut listening = write_msg(
        w,
        &IpcResponse::Accepted {
            id: id_text.clone(),
        },
    )
    .await
    .is_ok();
    let committed = std::sync::atomic::AtomicBool::new(false);
    let send = commands::send_cancellable(agent, &to, &text, id, &committed);
    tokio::pin!(send);
    let result = loop {
        tokio::select! {
            result = &mut send => break result,
            line = read_line(reader), if listening => {
                let cancel = match line {
                    Ok(Some(line)) => {
                        let cancel = matches!(
                            securechat_common::ipc::decode_line::<IpcRequest>(&line),
                            Ok(IpcRequest::Cancel)
                        );
                        if !cancel {
                            let no = bad_request("while a send runs only `cancel` is accepted".into());
                            listening = write_msg(w, &no).await.is_ok();
                            continue;
                        }
                        true
                    }
                    // Hung up: the user may not have seen the id; finishing
                    // is what they asked for.
                    _ => false,
                };
                if cancel && !committed.load(std::sync::atomic::Ordering::SeqCst) {
                    // Nothing was reserved or sent: dropping the send is a
                    // clean cancel.
                    tracing::info!("send {id_text} to {to} cancelled before it reached the relay");
                    return write_msg(w, &IpcResponse::Cancelled { id: id_text }).await;
                }
                if cancel {
                    let _ = write_msg(w, &IpcResponse::Sending { id: id_text.clone() }).await;
                }
                listening = false;
                agent.note_interrupted_send(outcome(SendState::Sending, None));
            }
        }
    };
    if listening {
        let resp = result
            .map(IpcResponse::Sent)
            .unwrap_or_else(IpcResponse::Error);
        return write_msg(w, &resp).await;
    }
    let sent_state = |r: &Result<SentInfo, IpcError>| match r {
        Ok(_) => (SendState::Stored, None),
        Err(e) => {
            // Only a connection lost while the relay had the message leaves
            // its fate open; any other error means it was not stored.
            let open = committed.load(std::sync::atomic::Ordering::SeqCst)
                && e.relay_code.is_none()
                && e.kind == IpcErrorKind::RelayUnavailable;
            let state = if open {
                SendState::Unknown
            } else {
                SendState::NotSent
            };
            (state, Some(e.message.clone()))
        }
    };
    let (state, detail) = sent_state(&result);
    tracing::info!("send {id_text} to {to}, whose client went away, ended: {state:?}");
    agent.note_interrupted_send(outcome(state, detail));
    Ok(())
}

/// Inbox messages read from the database per page while streaming.
const PAGE: usize = 64;

/// One page of the inbox after record `after`, or the error to answer.
fn inbox_page(
    agent: &Agent,
    all: bool,
    from: Option<&str>,
    after: Option<u64>,
) -> Result<Vec<(u64, InboxMessage)>, IpcError> {
    let keys = agent.ready_keys()?;
    let filter = InboxFilter {
        all,
        from,
        after,
        limit: PAGE,
    };
    Ok(agent.store.inbox_page(&keys.inbox, filter)?)
}

/// Write what `page` returns, page after page from `after` on, one line
/// per item. `None`: `page` failed, and its error was the answer.
async fn write_pages<K: Copy, T, W: AsyncWrite + Unpin>(
    w: &mut W,
    after: &mut Option<K>,
    mut page: impl FnMut(Option<K>) -> Result<Vec<(K, T)>, IpcError>,
    line: impl Fn(T) -> IpcResponse,
) -> Result<Option<u64>, IoLineError> {
    let mut count = 0u64;
    loop {
        let items = match page(*after) {
            Ok(items) => items,
            Err(e) => {
                write_msg(w, &IpcResponse::Error(e)).await?;
                return Ok(None);
            }
        };
        let Some((last, _)) = items.last() else {
            return Ok(Some(count));
        };
        *after = Some(*last);
        for (_, item) in items {
            write_msg(w, &line(item)).await?;
            count += 1;
        }
    }
}

/// Stream the inbox one `Message` line each, then `End`. Nothing is marked
/// read: the client does that once it has shown them.
async fn inbox<W: AsyncWrite + Unpin>(
    agent: &Agent,
    all: bool,
    from: Option<&str>,
    w: &mut W,
) -> Result<(), IoLineError> {
    let page = |after| inbox_page(agent, all, from, after);
    if let Some(count) = write_pages(w, &mut None, page, IpcResponse::Message).await? {
        write_msg(w, &IpcResponse::End { count }).await?;
    }
    Ok(())
}

/// Stream the held messages, one `Held` line each, then `End`.
async fn held<W: AsyncWrite + Unpin>(agent: &Agent, w: &mut W) -> Result<(), IoLineError> {
    let page = |after| Ok(agent.store.held_page(after, PAGE)?);
    if let Some(count) = write_pages(w, &mut None, page, IpcResponse::Held).await? {
        write_msg(w, &IpcResponse::End { count }).await?;
    }
    Ok(())
}

/// The client's lines as a stream. Waiting on `next()` in a `select!` is
/// cancel-safe: a line that arrives in pieces while another branch wins
/// is kept in the stream's state, not lost (a bare `read_line` future
/// dropped half way would lose what it had read).
fn client_lines<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> impl futures_util::Stream<Item = Result<Option<Vec<u8>>, IoLineError>> + '_ {
    futures_util::stream::unfold(reader, |r| async move {
        let line = read_line(r).await;
        Some((line, r))
    })
}

/// What an `Events` stream does with a client line:
/// `MarkRead` is taken (no answer); anything else, or the end, stops it.
async fn take_mark_read<W: AsyncWrite + Unpin>(
    agent: &Arc<Agent>,
    line: Option<Result<Option<Vec<u8>>, IoLineError>>,
    w: &mut W,
) -> Result<bool, IoLineError> {
    let Some(Ok(Some(line))) = line else {
        return Ok(false);
    };
    match securechat_common::ipc::decode_line::<IpcRequest>(&line) {
        Ok(IpcRequest::MarkRead { ids }) => {
            if let Err(e) = commands::handle(agent, IpcRequest::MarkRead { ids }).await {
                write_msg(w, &IpcResponse::Error(e)).await?;
                return Ok(false);
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Most history entries one request returns.
const MAX_HISTORY: u32 = 10_000;

/// Stream a conversation, one `Entry` line each, then `End`.
async fn history<W: AsyncWrite + Unpin>(
    agent: &Agent,
    with: Option<String>,
    limit: u32,
    w: &mut W,
) -> Result<(), IoLineError> {
    let found = (|| {
        if let Some(user) = &with {
            validate_username(user).map_err(|e| err(IpcErrorKind::InvalidInput, e))?;
        }
        let keys = agent.ready_keys()?;
        let limit = limit.min(MAX_HISTORY) as usize;
        Ok::<_, IpcError>(agent.store.history(&keys.inbox, with.as_deref(), limit)?)
    })();
    match found {
        Ok(entries) => {
            let count = entries.len() as u64;
            for e in entries {
                write_msg(w, &IpcResponse::Entry(e)).await?;
            }
            write_msg(w, &IpcResponse::End { count }).await
        }
        Err(e) => write_msg(w, &IpcResponse::Error(e)).await,
    }
}

/// Stream every pinned contact, one `Contact` line each, then `End`.
async fn contacts<W: AsyncWrite + Unpin>(agent: &Agent, w: &mut W) -> Result<(), IoLineError> {
    let found = match agent.store.contacts() {
        Ok(c) => c,
        Err(e) => return write_msg(w, &IpcResponse::Error(e.into())).await,
    };
    let count = found.len() as u64;
    for c in found {
        let fingerprint = securechat_common::PublicKey::from_der(&c.key)
            .map(|k| k.fingerprint().to_string())
            .unwrap_or_else(|_| "(unreadable key)".into());
        let trust = if c.held > 0 {
            TrustState::Changed
        } else if c.verified_ms.is_some() {
            TrustState::Verified
        } else {
            TrustState::FirstUse
        };
        let info = ContactInfo {
            user: c.user,
            fingerprint,
            trust,
            held: c.held,
            last_seen_ms: c.last_seen_ms,
        };
        write_msg(w, &IpcResponse::Contact(info)).await?;
    }
    write_msg(w, &IpcResponse::End { count }).await
}

/// Journal events read per page while streaming.
const EVENT_PAGE: usize = 256;

/// Answer `Events { head }`, then stream journal events after `after`
/// (after `head` when `None`), old ones first, then new ones as they are
/// journalled, until the client hangs up. `MarkRead` lines from the client
/// are taken (no answer); any other line ends the stream.
async fn events<R, W>(
    agent: &Arc<Agent>,
    after: Option<u64>,
    reader: &mut BufReader<R>,
    w: &mut W,
) -> Result<(), IoLineError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut journal = agent.journal.subscribe();
    let keys = match agent.ready_keys() {
        Ok(k) => k,
        Err(e) => return write_msg(w, &IpcResponse::Error(e)).await,
    };
    let head = match agent.store.journal_head() {
        Ok(h) => h,
        Err(e) => return write_msg(w, &IpcResponse::Error(e.into())).await,
    };
    write_msg(w, &IpcResponse::Events { head }).await?;
    let lines = client_lines(reader);
    tokio::pin!(lines);
    let mut cursor = after.unwrap_or(head);
    loop {
        journal.mark_unchanged();
        loop {
            let page = match agent.store.events_after(&keys.inbox, cursor, EVENT_PAGE) {
                Ok(p) => p,
                Err(e) => return write_msg(w, &IpcResponse::Error(e.into())).await,
            };
            let Some(last) = page.last() else { break };
            cursor = last.cursor;
            for record in page {
                write_msg(w, &IpcResponse::Event(record)).await?;
            }
        }
        tokio::select! {
            changed = journal.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            line = lines.next() => {
                if !take_mark_read(agent, line, w).await? {
                    return Ok(());
                }
            }
        }
    }
}
