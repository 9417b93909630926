//! What agentd keeps, listed: `history` (a conversation both ways, with
//! where each sent message stands) and `contacts` (pinned keys).

use securechat_client::Paths;
use securechat_common::ipc::{IpcErrorKind, IpcRequest, IpcResponse};

use crate::failure::Failure;
use crate::render::{self, Stamp};
use crate::{link, output};

/// Print `text` escaped for the terminal.
fn say(text: &str) {
    println!("{}", output::sanitize(text));
}

/// Every answer line of a streamed request, up to `End`.
async fn list(paths: &Paths, req: &IpcRequest) -> Result<Vec<IpcResponse>, Failure> {
    let mut client = link::connect(paths).await?;
    client.send(req).await?;
    let mut items = Vec::new();
    loop {
        match client.next().await? {
            IpcResponse::End { .. } => return Ok(items),
            item => items.push(item),
        }
    }
}

/// `history [USER] --limit N`: the newest N messages with USER (or in the
/// room), oldest first.
pub async fn history(
    paths: &Paths,
    json: bool,
    with: Option<String>,
    limit: u32,
) -> Result<(), Failure> {
    if let Some(user) = &with {
        securechat_common::limits::validate_username(user)
            .map_err(|e| Failure::refuse(IpcErrorKind::InvalidInput, e))?;
    }
    let req = IpcRequest::History {
        with: with.clone(),
        limit,
    };
    let mut entries = Vec::new();
    for item in list(paths, &req).await? {
        match item {
            IpcResponse::Entry(e) => entries.push(e),
            other => return Err(anyhow::anyhow!("unexpected answer from agentd: {other:?}").into()),
        }
    }
    if json {
        let doc = serde_json::json!({ "response": "history", "with": with, "entries": entries });
        println!("{doc}");
        return Ok(());
    }
    if entries.is_empty() {
        match &with {
            Some(u) => println!("no messages with {} yet", output::sanitize(u)),
            None => println!("no messages in the room yet"),
        }
    }
    for e in &entries {
        say(&render::entry(e, Stamp::Full));
    }
    Ok(())
}

/// `contacts`: each pinned key, its fingerprint, how far it is trusted and
/// when the contact was last seen.
pub async fn contacts(paths: &Paths, json: bool) -> Result<(), Failure> {
    let mut contacts = Vec::new();
    for item in list(paths, &IpcRequest::Contacts).await? {
        match item {
            IpcResponse::Contact(c) => contacts.push(c),
            other => return Err(anyhow::anyhow!("unexpected answer from agentd: {other:?}").into()),
        }
    }
    if json {
        let doc = serde_json::json!({ "response": "contacts", "contacts": contacts });
        println!("{doc}");
        return Ok(());
    }
    if contacts.is_empty() {
        println!(
            "no contacts yet: a contact's key is pinned the first time you exchange a message"
        );
    }
    for c in &contacts {
        say(&render::contact(c));
    }
    Ok(())
}
