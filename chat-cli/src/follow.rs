//! Commands that follow agentd live, until interrupted: `events` (every
//! event, for scripts and bots) and `inbox --follow` (messages only,
//! marked read once printed).
//!
//! Both ride on a [`Feed`], so they outlast agentd restarts: they say on
//! stderr that agentd went away and came back, and carry on after the last
//! event printed, without losing or repeating one.

use std::collections::HashSet;
use std::io::Write;

use securechat_client::Paths;
use securechat_common::ipc::{Event, IpcRequest, IpcResponse};

use crate::failure::Failure;
use crate::feed::{Feed, FeedItem};
use crate::{link, output, render};

/// Connect (with the usual advice when agentd is not running), then follow.
async fn open(paths: &Paths, after: Option<u64>) -> Result<(Feed, u64), Failure> {
    drop(link::connect(paths).await?);
    Ok(Feed::open(paths, after).await?)
}

/// Write `text` to stdout now. `Ok(false)` when stdout is closed (the
/// reader of a pipe is done: a normal end, not an error).
fn emit(text: &str) -> Result<bool, Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout").into()),
    }
}

/// Say on stderr what happened to the connection.
fn connection_news(item: &FeedItem, last: u64) {
    match item {
        FeedItem::Lost(why) => eprintln!(
            "chat-cli: agentd went away ({}); reconnecting…",
            output::sanitize(why)
        ),
        FeedItem::Refused(why) => eprintln!(
            "chat-cli: agentd answers but refuses the events: {}; still trying",
            output::sanitize(why)
        ),
        FeedItem::Back => eprintln!("chat-cli: agentd is back; resuming after event {last}"),
        FeedItem::Event(_) => {}
    }
}

/// `events`: one line per event (`--json`: the event record as one JSON
/// object per line), from `after` or from now on.
pub async fn events(paths: &Paths, json: bool, after: Option<u64>) -> Result<(), Failure> {
    let (mut feed, head) = open(paths, after).await?;
    let mut last = after.unwrap_or(head);
    // On stderr, so that stdout holds events only; a script may wait for it
    // to know that the follow has started.
    eprintln!("chat-cli: following agentd's events after cursor {last}; Ctrl-C stops");
    while let Some(item) = feed.next().await {
        let FeedItem::Event(rec) = item else {
            connection_news(&item, last);
            continue;
        };
        last = rec.cursor;
        let line = if json {
            let mut line = serde_json::to_string(&rec).map_err(anyhow::Error::new)?;
            line.push('\n');
            line
        } else {
            output::sanitize(&render::event(&rec.event)) + "\n"
        };
        if !emit(&line)? {
            return Ok(());
        }
    }
    Ok(())
}

/// `inbox --follow`: the inbox as `inbox` shows it, then each new message
/// as it arrives (`--json`: one message object per line); each is marked
/// read once printed.
pub async fn inbox(
    paths: &Paths,
    json: bool,
    all: bool,
    from: Option<String>,
) -> Result<(), Failure> {
    // The feed first, so that nothing arriving while the inbox is listed
    // is missed; what shows in both is printed once.
    let (mut feed, head) = open(paths, None).await?;
    let mut client = link::connect(paths).await?;
    client
        .send(&IpcRequest::Inbox {
            all,
            from: from.clone(),
        })
        .await?;
    let mut printed = HashSet::new();
    let mut unread = Vec::new();
    loop {
        match client.next().await? {
            IpcResponse::Message(m) => {
                if !print_message(&m, json)? {
                    return Ok(());
                }
                if !m.read {
                    unread.push(m.id.clone());
                }
                printed.insert(m.id);
            }
            IpcResponse::End { .. } => break,
            other => return Err(anyhow::anyhow!("unexpected answer from agentd: {other:?}").into()),
        }
    }
    link::mark_read(&mut client, unread).await?;
    drop(client);
    eprintln!("chat-cli: following new messages; Ctrl-C stops");
    let mut last = head;
    while let Some(item) = feed.next().await {
        let FeedItem::Event(rec) = item else {
            connection_news(&item, last);
            continue;
        };
        last = rec.cursor;
        let Event::Message(m) = rec.event else {
            continue;
        };
        if from.as_ref().is_some_and(|f| *f != m.from) || !printed.insert(m.id.clone()) {
            continue;
        }
        if !print_message(&m, json)? {
            return Ok(());
        }
        feed.mark_read(vec![m.id]);
    }
    Ok(())
}

/// One message as `inbox` prints it; `Ok(false)` when stdout is closed.
fn print_message(m: &securechat_common::ipc::InboxMessage, json: bool) -> Result<bool, Failure> {
    if json {
        let mut line = serde_json::to_string(m).map_err(anyhow::Error::new)?;
        line.push('\n');
        emit(&line)
    } else {
        emit(&(output::sanitize(&output::message(m)) + "\n"))
    }
}
