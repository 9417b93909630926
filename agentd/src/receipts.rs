//! Delivery receipts: once a message is in the inbox, its sender is owed a
//! small signed receipt, sent through the relay like any message.
//!
//! ```text
//! inbox commit (+ receipts_out row, same commit) ──► notify ──► flush:
//!   group owed receipts by sender ─► seal Kind::Receipt for their pinned key
//!   ─► Send ─► relay stored it ─► rows removed
//! ```
//!
//! What is owed is on disk, so receipts survive restarts and wait out a
//! relay that is away or rate-limits us. A receipt is idempotent (it only
//! marks messages delivered), so it carries the fixed sequence number 1
//! instead of using up the conversation's numbers, and a repeat changes
//! nothing at the other end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use securechat_common::envelope::{seal_for, Header, Kind, ReceiptBody, To};
use securechat_common::ipc::{IpcError, IpcErrorKind};
use securechat_common::limits::MAX_RECEIPT_IDS;
use securechat_common::protocol::{ErrorCode, Request, Response};
use securechat_common::{MessageId, PublicKey};

use crate::agent::{err, now_ms, Agent};
use crate::commands::new_message_id;
use securechat_client::relay::ClientError;

/// How often owed receipts are retried without a wake-up.
const RETRY: Duration = Duration::from_secs(30);

/// Most owed receipts read per pass.
const PASS: usize = 4 * MAX_RECEIPT_IDS;

/// Send owed receipts whenever a message is stored or we log in, and
/// every [`RETRY`] while some are left.
pub(crate) async fn run(agent: Arc<Agent>) {
    loop {
        tokio::select! {
            () = agent.receipts_due.notified() => {}
            () = tokio::time::sleep(RETRY) => {}
        }
        if let Err(e) = flush(&agent).await {
            tracing::debug!("receipts not sent yet: {e}");
        }
    }
}

/// One pass over what is owed.
async fn flush(agent: &Agent) -> Result<(), IpcError> {
    let due = agent.store.receipts_due(PASS)?;
    if due.is_empty() {
        return Ok(());
    }
    let (client, me) = agent.logged_in_client().await?;
    let keys = agent.ready_keys()?;
    let mut by_sender: BTreeMap<String, Vec<MessageId>> = BTreeMap::new();
    for (to, id) in due {
        by_sender.entry(to).or_default().push(id);
    }
    for (to, ids) in by_sender {
        // The key their message verified with: a receipt never looks them up.
        let Some(key) = agent
            .store
            .pin(&to)?
            .and_then(|der| PublicKey::from_der(&der).ok())
        else {
            tracing::warn!("no usable pinned key for {to}; dropping the receipts owed to them");
            agent.store.receipts_sent(&to, &ids)?;
            continue;
        };
        for chunk in ids.chunks(MAX_RECEIPT_IDS) {
            let body = postcard::to_stdvec(&ReceiptBody {
                stored: chunk.to_vec(),
            })
            .map_err(|e| err(IpcErrorKind::Internal, e.to_string()))?;
            let header = Header {
                sender_key: &keys.current,
                sender: &me,
                kind: Kind::Receipt,
                id: new_message_id()?,
                timestamp_ms: now_ms(),
            };
            let to_slot = [To {
                name: &to,
                key: &key,
                seq: 1,
            }];
            let envelope = seal_for(&header, &to_slot, &body)
                .map_err(|e| err(IpcErrorKind::Crypto, e.to_string()))?;
            match client.call(&Request::Send { envelope }).await {
                Ok(Response::Stored { .. }) => agent.store.receipts_sent(&to, chunk)?,
                // They are gone, or will never take it: nothing to wait for.
                Err(ClientError::Relay(r))
                    if matches!(r.code, ErrorCode::UnknownUser | ErrorCode::MessageTooLarge) =>
                {
                    agent.store.receipts_sent(&to, chunk)?;
                }
                Err(e) => return Err(crate::agent::relay_error(e)),
                Ok(other) => {
                    tracing::warn!("unexpected answer to a receipt: {other:?}");
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}
