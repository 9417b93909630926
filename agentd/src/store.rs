//! The local database (redb): inbox, pinned keys, seen ids, held and
//! rejected messages, and a few settings.
//!
//! ```text
//! inbox     u64 seq   → JSON InboxMessage     (oldest first)
//! seen      msg id    → u8 (1 inbox, 2 held, 3 rejected)   dedupe
//! pins      username  → SubjectPublicKeyInfo DER            TOFU pins
//! held      msg id    → postcard (Envelope, reason, at_ms) sender key changed
//! rejected  u64 seq   → JSON Problem                        kept for status
//! settings  name      → text                                account name
//! ```
//!
//! A message is in `inbox` and in `seen` after one commit, and agentd acks
//! it to the relay only after that commit returned.

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use securechat_common::envelope::Envelope;
use securechat_common::ipc::{InboxMessage, Problem};
use securechat_common::MessageId;

const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
const SEEN: TableDefinition<&[u8], u8> = TableDefinition::new("seen");
const PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("pins");
const HELD: TableDefinition<&[u8], &[u8]> = TableDefinition::new("held");
const REJECTED: TableDefinition<u64, &[u8]> = TableDefinition::new("rejected");
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");

/// How many rejected messages `status` keeps.
const KEEP_REJECTED: u64 = 50;

/// Why the database failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// redb failed (I/O, corruption, locked by another agentd).
    #[error("database: {0}")]
    Db(Box<redb::Error>),
    /// A stored record does not decode.
    #[error("database record is damaged: {0}")]
    Corrupt(String),
}

macro_rules! db_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(Box::new(e.into())) }
        }
    )*};
}
db_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What `seen` remembers about a message id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// In the inbox.
    Inbox,
    /// Held until the sender's new key is trusted.
    Held,
    /// Rejected.
    Rejected,
}

/// The agent's database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn next_key<T: ReadableTable<u64, &'static [u8]>>(table: &T) -> Result<u64, StoreError> {
    Ok(table.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0))
}

impl Store {
    /// Open (or create) the database; fails if another agentd holds it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(INBOX)?;
            tx.open_table(SEEN)?;
            tx.open_table(PINS)?;
            tx.open_table(HELD)?;
            tx.open_table(REJECTED)?;
            tx.open_table(SETTINGS)?;
        }
        tx.commit()?;
        Ok(Self { db })
    }

    /// Whether this message id was handled before, and how.
    pub fn seen(&self, id: &MessageId) -> Result<Option<Seen>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SEEN)?;
        Ok(t.get(id.0.as_slice())?.map(|v| match v.value() {
            1 => Seen::Inbox,
            2 => Seen::Held,
            _ => Seen::Rejected,
        }))
    }

    /// Store a verified message in the inbox; `false` if its id was seen
    /// before (nothing added). Committed when this returns.
    pub fn add_to_inbox(&self, id: &MessageId, msg: &InboxMessage) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut seen = tx.open_table(SEEN)?;
            if seen.get(id.0.as_slice())?.is_some_and(|v| v.value() == 1) {
                return Ok(false);
            }
            seen.insert(id.0.as_slice(), 1)?;
            let mut inbox = tx.open_table(INBOX)?;
            let key = next_key(&inbox)?;
            let json = serde_json::to_vec(msg).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            inbox.insert(key, json.as_slice())?;
            tx.open_table(HELD)?.remove(id.0.as_slice())?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Inbox messages (unread only unless `all`), oldest first; the returned
    /// ones are marked read in the same transaction. Each carries its read
    /// state from before this call.
    pub fn take_inbox(
        &self,
        all: bool,
        from: Option<&str>,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut out = Vec::new();
        {
            let mut inbox = tx.open_table(INBOX)?;
            let mut updates = Vec::new();
            for entry in inbox.iter()? {
                let (k, v) = entry?;
                let msg: InboxMessage = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if (all || !msg.read) && from.is_none_or(|f| f == msg.from) {
                    if !msg.read {
                        updates.push((k.value(), msg.clone()));
                    }
                    out.push(msg);
                }
            }
            for (k, mut msg) in updates {
                msg.read = true;
                let json =
                    serde_json::to_vec(&msg).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                inbox.insert(k, json.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Unread inbox messages.
    pub fn unread_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let mut n = 0;
        for entry in tx.open_table(INBOX)?.iter()? {
            let (_, v) = entry?;
            let msg: InboxMessage = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            n += u64::from(!msg.read);
        }
        Ok(n)
    }

    /// The pinned key of `user` (SPKI DER).
    pub fn pin(&self, user: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PINS)?;
        Ok(t.get(user)?.map(|v| v.value().to_vec()))
    }

    /// Pin (or re-pin, after `trust`) the key of `user`.
    pub fn set_pin(&self, user: &str, der: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(PINS)?.insert(user, der)?;
        tx.commit()?;
        Ok(())
    }

    /// Keep an envelope out of the inbox until its sender's key is trusted.
    pub fn hold(&self, env: &Envelope, reason: &str) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(&(env, reason, now_ms()))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let tx = self.db.begin_write()?;
        {
            tx.open_table(HELD)?
                .insert(env.id.0.as_slice(), bytes.as_slice())?;
            tx.open_table(SEEN)?.insert(env.id.0.as_slice(), 2)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn held_all(&self) -> Result<Vec<(Envelope, String, u64)>, StoreError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(HELD)?.iter()? {
            let (_, v) = entry?;
            let rec: (Envelope, String, u64) =
                postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Held envelopes from `user`.
    pub fn held_from(&self, user: &str) -> Result<Vec<Envelope>, StoreError> {
        Ok(self
            .held_all()?
            .into_iter()
            .filter(|(e, _, _)| e.sender == user)
            .map(|(e, _, _)| e)
            .collect())
    }

    /// Held messages, for `status`.
    pub fn held_list(&self) -> Result<Vec<Problem>, StoreError> {
        Ok(self
            .held_all()?
            .into_iter()
            .map(|(e, reason, at_ms)| Problem {
                id: e.id.to_string(),
                from: e.sender,
                reason,
                at_ms,
            })
            .collect())
    }

    /// Record a rejected message (and drop it from `held`, if it was there).
    pub fn reject(&self, id: &MessageId, from: &str, reason: &str) -> Result<(), StoreError> {
        let problem = Problem {
            id: id.to_string(),
            from: from.to_string(),
            reason: reason.to_string(),
            at_ms: now_ms(),
        };
        let json = serde_json::to_vec(&problem).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let tx = self.db.begin_write()?;
        {
            let mut rejected = tx.open_table(REJECTED)?;
            let key = next_key(&rejected)?;
            rejected.insert(key, json.as_slice())?;
            if key >= KEEP_REJECTED {
                rejected.remove(key - KEEP_REJECTED)?;
            }
            tx.open_table(SEEN)?.insert(id.0.as_slice(), 3)?;
            tx.open_table(HELD)?.remove(id.0.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Recently rejected messages, oldest first.
    pub fn rejected_list(&self) -> Result<Vec<Problem>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REJECTED)?;
        let mut out = Vec::with_capacity(t.len()? as usize);
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// A setting.
    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SETTINGS)?;
        Ok(t.get(name)?.map(|v| v.value().to_string()))
    }

    /// Set a setting.
    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.set_settings(&[(name, value)])
    }

    /// Set several settings in one transaction: all or none survive a crash.
    pub fn set_settings(&self, pairs: &[(&str, &str)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(SETTINGS)?;
            for (name, value) in pairs {
                t.insert(*name, *value)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(from: &str, text: &str) -> InboxMessage {
        InboxMessage {
            id: "00".into(),
            from: from.into(),
            sent_ms: 1,
            received_ms: 2,
            text: text.into(),
            read: false,
        }
    }

    #[test]
    fn inbox_dedupes_and_marks_read() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("a.redb")).unwrap();
        let id = MessageId([7; 16]);
        assert!(store.add_to_inbox(&id, &msg("bob", "hi")).unwrap());
        assert!(!store.add_to_inbox(&id, &msg("bob", "hi")).unwrap());
        assert_eq!(store.seen(&id).unwrap(), Some(Seen::Inbox));
        assert_eq!(store.unread_count().unwrap(), 1);
        let got = store.take_inbox(false, None).unwrap();
        assert_eq!(got.len(), 1);
        assert!(!got[0].read);
        assert!(store.take_inbox(false, None).unwrap().is_empty());
        let all = store.take_inbox(true, None).unwrap();
        assert!(all[0].read);
        store
            .reject(&MessageId([8; 16]), "eve", "bad signature")
            .unwrap();
        assert_eq!(store.rejected_list().unwrap().len(), 1);
        store.set_pin("bob", b"der").unwrap();
        assert_eq!(store.pin("bob").unwrap().unwrap(), b"der");
        store
            .set_settings(&[("username", "alice"), ("pending_username", "")])
            .unwrap();
        assert_eq!(store.setting("username").unwrap().as_deref(), Some("alice"));
        assert_eq!(
            store.setting("pending_username").unwrap().as_deref(),
            Some("")
        );
    }

    #[test]
    fn committed_messages_survive_reopening_and_stay_deduplicated() {
        // What a kill between the inbox commit and the ack leaves: the
        // message is in the database, and a redelivery adds nothing.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        let id = MessageId([9; 16]);
        {
            let store = Store::open(&path).unwrap();
            assert!(store.add_to_inbox(&id, &msg("bob", "once")).unwrap());
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.seen(&id).unwrap(), Some(Seen::Inbox));
        assert!(!store.add_to_inbox(&id, &msg("bob", "once")).unwrap());
        assert_eq!(store.take_inbox(true, None).unwrap().len(), 1);
    }
}
