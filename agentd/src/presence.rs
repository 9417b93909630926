//! Whose comings and goings the relay pushes to us: our contacts (the users
//! whose keys are pinned), sent as a watch list on every logged-in
//! connection and again whenever a contact is added.
//!
//! ```text
//!  connection logged in ─┐
//!  key pinned ───────────┴──► WatchPresence{contacts, most recently seen first}
//!                             ──► relay pushes Presence{user, online} for them
//! ```
//!
//! A relay that predates watch lists answers `BadRequest` and pushes every
//! user's changes instead; that is logged and left alone.

use std::sync::{Arc, Weak};

use securechat_client::relay::{ClientError, RelayClient};
use securechat_common::limits::MAX_WATCH;
use securechat_common::protocol::{Request, Response};

use crate::agent::Agent;

/// Keep the relay's watch list equal to our contacts while logged in.
pub(crate) async fn run(agent: Arc<Agent>) {
    let mut conn = agent.subscribe_conn();
    // The connection the current list was sent on (weak: only compared).
    let mut sent_on: Option<Weak<RelayClient>> = None;
    let mut contacts_changed = false;
    loop {
        let live = {
            let c = conn.borrow_and_update();
            c.client.clone().filter(|_| c.logged_in)
        };
        match live {
            // A logout and login on one connection starts a new list on
            // the relay too.
            None => sent_on = None,
            Some(client) => {
                let already = sent_on
                    .as_ref()
                    .is_some_and(|w| w.ptr_eq(&Arc::downgrade(&client)));
                if !already || contacts_changed {
                    contacts_changed = false;
                    match send(&agent, &client).await {
                        Ok(online) => {
                            tracing::debug!("watching our contacts; {online} of them online");
                        }
                        Err(ClientError::Relay(reply)) => tracing::info!(
                            "the relay did not take our watch list ({}); it may push every user's \
                             presence instead",
                            reply.message
                        ),
                        // The connection is going: its successor gets the list.
                        Err(e) => tracing::debug!("watch list not sent: {e}"),
                    }
                    sent_on = Some(Arc::downgrade(&client));
                }
            }
        }
        tokio::select! {
            changed = conn.changed() => if changed.is_err() { return },
            () = agent.contacts_changed.notified() => contacts_changed = true,
        }
    }
}

/// Send the watch list; returns how many of them are online.
async fn send(agent: &Arc<Agent>, client: &RelayClient) -> Result<usize, ClientError> {
    let users = match agent.blocking(|a| a.store.watch_list(MAX_WATCH)).await {
        Ok(Ok(users)) => users,
        Ok(Err(e)) | Err(e) => {
            tracing::error!("store: {e}");
            return Ok(0);
        }
    };
    match client.call(&Request::WatchPresence { users }).await? {
        Response::Online { users } => Ok(users.len()),
        other => Err(ClientError::Unexpected(format!(
            "wanted the watched users online, got {other:?}"
        ))),
    }
}
