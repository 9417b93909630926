//! The local database (redb): inbox, pinned keys, seen ids, held and
//! rejected messages, sequence numbers, and a few settings.
//!
//! ```text
//! inbox          u64 key   → sealed InboxMessage (see below)   oldest first
//! inbox_unread   u64 key   → 1                                 not yet shown
//! inbox_ids      msg id    → u64 key                           mark read by id
//! seen           msg id    → u8 (1 inbox, 2 held, 3 rejected)  dedupe
//! seen_at        (Unix ms, msg id) → ()                        when, for pruning `seen`
//! pins           username  → SubjectPublicKeyInfo DER          TOFU pins
//! held           msg id    → postcard (Envelope, reason, at_ms) sender key changed
//! rejected       u64       → JSON Problem                      kept for status
//! seq_in         sender    → postcard SeqState                 gaps, replays (see `seq`)
//! seq_out        recipient → u64, the next number to send
//! seq_alerts     u64       → JSON Problem                      kept for status
//! settings       name      → text                              account name
//! sent           u64 key   → sealed SentMessage                what we sent, oldest first
//! sent_ids       msg id    → u64 key                           receipts find it by id
//! receipts_out   (sender, msg id) → 1                          receipts still to send
//! events         cursor    → sealed EventRecord                the journal `events` follows
//! verified       username  → Unix ms                           pinned after `trust`
//! last_seen      username  → Unix ms                           a message or presence
//! ```
//!
//! A stored message, its journal event and the receipt owed for it are
//! written in one commit: after a crash either all three exist or none.
//! Sent messages and journal events are sealed like inbox records (under
//! their own associated-data labels).
//!
//! A message is in `inbox` and in `seen` after one commit, and agentd acks
//! it to the relay only after that commit returned.
//!
//! Inbox records are encrypted: `1 │ nonce (12) │ AES-256-GCM(JSON)`, with
//! the record's key as associated data (so records cannot be swapped), under
//! the inbox key from `inbox.key` (see `keystore`), which a passphrase
//! protects like the identity key. Records written by earlier versions
//! (plain JSON) are encrypted by [`Store::seal_legacy_inbox`] once the key is
//! at hand. The database file is 0600 in agentd's 0700 home.

use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use securechat_common::crypto::random_bytes;
use securechat_common::envelope::Envelope;
use securechat_common::ipc::{
    DeliveryState, Event, EventRecord, HistoryEntry, InboxMessage, Problem, RecipientState,
    SentMessage,
};
use securechat_common::MessageId;

use crate::keystore::InboxKey;
use crate::seq::{self, SeqState, Verdict};

const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
const UNREAD: TableDefinition<u64, u8> = TableDefinition::new("inbox_unread");
const INBOX_IDS: TableDefinition<&[u8], u64> = TableDefinition::new("inbox_ids");
const SEEN: TableDefinition<&[u8], u8> = TableDefinition::new("seen");
const SEEN_AT: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("seen_at");
const PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("pins");
const HELD: TableDefinition<&[u8], &[u8]> = TableDefinition::new("held");
const REJECTED: TableDefinition<u64, &[u8]> = TableDefinition::new("rejected");
const SEQ_IN: TableDefinition<&str, &[u8]> = TableDefinition::new("seq_in");
const SEQ_OUT: TableDefinition<&str, u64> = TableDefinition::new("seq_out");
const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("seq_alerts");
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");
const SENT: TableDefinition<u64, &[u8]> = TableDefinition::new("sent");
const SENT_IDS: TableDefinition<&[u8], u64> = TableDefinition::new("sent_ids");
const RECEIPTS_OUT: TableDefinition<(&str, &[u8]), u8> = TableDefinition::new("receipts_out");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const VERIFIED: TableDefinition<&str, u64> = TableDefinition::new("verified");
const LAST_SEEN: TableDefinition<&str, u64> = TableDefinition::new("last_seen");

/// How many journal events are kept (the oldest go first). A client that
/// resumes after a cursor older than that gets what is left.
pub const KEEP_EVENTS: u64 = 10_000;
const SENT_AAD: &[u8] = b"securechat-sent-v1\0";
const EVENTS_AAD: &[u8] = b"securechat-event-v1\0";

/// How many rejected messages and sequence alerts `status` keeps.
const KEEP_PROBLEMS: u64 = 50;

/// Setting present once every `seen` id has a `seen_at` entry.
const SEEN_INDEXED: &str = "seen_indexed";

/// Setting present once every inbox record is encrypted.
const INBOX_SEALED: &str = "inbox_sealed";

/// First byte of an encrypted inbox record (plain JSON records start with `{`).
const SEALED_V1: u8 = 1;
const INBOX_AAD: &[u8] = b"securechat-inbox-v1\0";

/// How long a message id stays in `seen` after it was last handled.
///
/// `seen` is what answers a redelivery (our ack was lost, or the relay
/// pushed the queue again on reconnect) with the same outcome as the first
/// time, without a second inbox entry or a false replay alert. The relay
/// only redelivers what it still queues, and it drops every message after
/// its retention time (30 days unless its operator chose otherwise), so an
/// id handled longer ago than that cannot come back from an honest relay.
/// Twice the default retention leaves room for a longer setting and for
/// clocks that disagree.
///
/// Forgetting an id does not open the door to replays: a message a
/// dishonest relay replays after that still carries a sequence number that
/// was delivered before, and `seq` refuses it (recorded as a replay).
/// Held messages keep their ids for as long as they are held.
pub const SEEN_KEEP_MS: u64 = 60 * 24 * 3600 * 1000;

/// Most `seen` ids forgotten in one commit, so that a first prune of a
/// large old table does not make one delivery slow; the rest go with the
/// next ones.
const PRUNE_BATCH: usize = 1000;

/// Why the database failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// redb failed (I/O, corruption, locked by another agentd).
    #[error("database: {0}")]
    Db(Box<redb::Error>),
    /// A stored record does not decode (or does not decrypt with the inbox key).
    #[error("database record is damaged: {0}")]
    Corrupt(String),
    /// Setting the database file's mode failed.
    #[error("database file: {0}")]
    Io(#[from] std::io::Error),
    /// The blocking task that ran the database work failed (it panicked or
    /// was cancelled as agentd stopped).
    #[error("database task failed: {0}")]
    Task(String),
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

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

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

/// What [`Store::deliver`] did with a verified message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the inbox now, with its sequence flags filled in.
    Stored(Box<InboxMessage>),
    /// The id was in the inbox already; nothing changed.
    Duplicate,
    /// Its sequence number was delivered before: refused, recorded as
    /// rejected and as a sequence alert.
    Replayed,
}

/// Which inbox messages [`Store::inbox_page`] returns.
#[derive(Clone, Copy, Debug)]
pub struct InboxFilter<'a> {
    /// Read ones too.
    pub all: bool,
    /// Only from this sender.
    pub from: Option<&'a str>,
    /// Only after this record key (for paging).
    pub after: Option<u64>,
    /// At most this many.
    pub limit: usize,
}

/// A pinned contact, as [`Store::contacts`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contact {
    /// The contact.
    pub user: String,
    /// Their pinned key, SubjectPublicKeyInfo DER.
    pub key: Vec<u8>,
    /// When the pin was confirmed with `trust` (Unix ms), if it was.
    pub verified_ms: Option<u64>,
    /// When they were last seen (a message, a receipt, online), Unix ms.
    pub last_seen_ms: Option<u64>,
    /// Messages from them held because another key signed them.
    pub held: u64,
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

fn cipher(key: &InboxKey) -> Result<LessSafeKey, StoreError> {
    UnboundKey::new(&AES_256_GCM, key.as_bytes())
        .map(LessSafeKey::new)
        .map_err(|_| corrupt("unusable inbox key"))
}

fn aad(label: &[u8], record: u64) -> Vec<u8> {
    [label, &record.to_be_bytes()].concat()
}

/// Encrypt one inbox message for record `record`.
fn seal_record(key: &InboxKey, record: u64, msg: &InboxMessage) -> Result<Vec<u8>, StoreError> {
    seal_json(key, INBOX_AAD, record, msg)
}

/// Encrypt `value` as JSON for record `record` of the table `label` names.
fn seal_json<T: serde::Serialize>(
    key: &InboxKey,
    label: &[u8],
    record: u64,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    let mut body = serde_json::to_vec(value).map_err(corrupt)?;
    let nonce = random_bytes::<NONCE_LEN>().map_err(corrupt)?;
    cipher(key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(label, record)),
            &mut body,
        )
        .map_err(|_| corrupt("record encryption failed"))?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + body.len());
    out.push(SEALED_V1);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decrypt (or, for a record of an earlier version, parse) record `record`.
fn open_record(key: &InboxKey, record: u64, bytes: &[u8]) -> Result<InboxMessage, StoreError> {
    if bytes.first() == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(corrupt);
    }
    open_json(key, INBOX_AAD, record, bytes)
}

/// Decrypt record `record` of the table `label` names.
fn open_json<T: serde::de::DeserializeOwned>(
    key: &InboxKey,
    label: &[u8],
    record: u64,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let (Some(&SEALED_V1), Some(nonce), Some(body)) = (
        bytes.first(),
        bytes.get(1..1 + NONCE_LEN),
        bytes.get(1 + NONCE_LEN..),
    ) else {
        return Err(corrupt(format!("record {record} has an unknown format")));
    };
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(corrupt)?;
    let mut body = zeroize::Zeroizing::new(body.to_vec());
    let plain = cipher(key)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(label, record)),
            &mut body,
        )
        .map_err(|_| corrupt(format!("record {record} does not decrypt")))?;
    serde_json::from_slice(plain).map_err(corrupt)
}

/// Within `tx`: add `event` to the journal (dropping the oldest beyond
/// [`KEEP_EVENTS`]) and return its cursor. Cursors start at 1.
fn append_event(tx: &WriteTransaction, key: &InboxKey, event: Event) -> Result<u64, StoreError> {
    let mut t = tx.open_table(EVENTS)?;
    let cursor = next_key(&t)?.max(1);
    let record = EventRecord { cursor, event };
    t.insert(
        cursor,
        seal_json(key, EVENTS_AAD, cursor, &record)?.as_slice(),
    )?;
    if cursor > KEEP_EVENTS {
        let cut = cursor - KEEP_EVENTS;
        let old: Vec<u64> = t
            .range(..=cut)?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for k in old {
            t.remove(k)?;
        }
    }
    Ok(cursor)
}

/// Take the next number of the messages to `user` from `seq_out`.
fn take_seq(seq_out: &mut redb::Table<&str, u64>, user: &str) -> Result<u64, StoreError> {
    let seq = seq_out.get(user)?.map_or(1, |v| v.value());
    seq_out.insert(user, seq + 1)?;
    Ok(seq)
}

/// Within `tx`: remember that `user` was seen at `at_ms` (never moving back).
fn note_seen(tx: &WriteTransaction, user: &str, at_ms: u64) -> Result<(), StoreError> {
    let mut t = tx.open_table(LAST_SEEN)?;
    let before = t.get(user)?.map(|v| v.value());
    if before.is_none_or(|b| b < at_ms) {
        t.insert(user, at_ms)?;
    }
    Ok(())
}

/// How a recipient's state may move: never back from delivered or
/// expired, and a receipt beats every other news (it may arrive before
/// the relay's own answer is processed).
fn advances(from: DeliveryState, to: DeliveryState) -> bool {
    use DeliveryState::*;
    match (from, to) {
        (a, b) if a == b => false,
        (Delivered, _) => false,
        (_, Delivered) => true,
        (Expired, _) => false,
        (Queued, Failed | Sending) => false,
        _ => true,
    }
}

/// Append a problem to a bounded list table.
fn push_problem(
    tx: &WriteTransaction,
    table: TableDefinition<u64, &[u8]>,
    problem: &Problem,
) -> Result<(), StoreError> {
    let json = serde_json::to_vec(problem).map_err(corrupt)?;
    let mut t = tx.open_table(table)?;
    let key = next_key(&t)?;
    t.insert(key, json.as_slice())?;
    if key >= KEEP_PROBLEMS {
        t.remove(key - KEEP_PROBLEMS)?;
    }
    Ok(())
}

fn problems(db: &Database, table: TableDefinition<u64, &[u8]>) -> Result<Vec<Problem>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(table)?;
    let mut out = Vec::with_capacity(t.len()? as usize);
    for entry in t.iter()? {
        let (_, v) = entry?;
        out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
    }
    Ok(out)
}

/// Within `tx`: list `problem` among the rejected messages, remember `id` as
/// rejected, and drop it from `held`.
fn record_rejection(
    tx: &WriteTransaction,
    seen: &mut redb::Table<&[u8], u8>,
    id: &MessageId,
    problem: &Problem,
) -> Result<(), StoreError> {
    push_problem(tx, REJECTED, problem)?;
    mark_seen(tx, seen, id, 3)?;
    tx.open_table(HELD)?.remove(id.0.as_slice())?;
    Ok(())
}

/// Within `tx`: one message of [`Store::deliver_many`].
fn deliver_in(
    tx: &WriteTransaction,
    key: &InboxKey,
    id: &MessageId,
    mut msg: InboxMessage,
    signer: [u8; 32],
) -> Result<Delivery, StoreError> {
    let delivery = {
        let mut seen = tx.open_table(SEEN)?;
        if seen.get(id.0.as_slice())?.is_some_and(|v| v.value() == 1) {
            return Ok(Delivery::Duplicate);
        }
        let mut seq_in = tx.open_table(SEQ_IN)?;
        let state: Option<SeqState> = match seq_in.get(msg.from.as_str())? {
            Some(v) => Some(postcard::from_bytes(v.value()).map_err(corrupt)?),
            None => None,
        };
        let (verdict, next) = seq::check(state.as_ref(), msg.seq, signer);
        let alert = |reason: String| Problem {
            id: msg.id.clone(),
            from: msg.from.clone(),
            reason,
            at_ms: now_ms(),
        };
        match verdict {
            Verdict::Replay { highest } => {
                let reason = format!(
                    "replayed: message number {} from {} was delivered before (highest so far \
                         {highest}); the relay sent it again",
                    msg.seq, msg.from
                );
                push_problem(tx, ALERTS, &alert(reason.clone()))?;
                record_rejection(tx, &mut seen, id, &alert(reason))?;
                Delivery::Replayed
            }
            verdict => {
                msg.missing_before = verdict.missing();
                msg.late = verdict == Verdict::Late;
                msg.read = false;
                if let Verdict::Gap { first, last } = verdict {
                    let reason = if first == last {
                        format!("1 message from {} is missing (number {first})", msg.from)
                    } else {
                        format!(
                            "{} messages from {} are missing (numbers {first} to {last})",
                            last - first + 1,
                            msg.from
                        )
                    };
                    push_problem(tx, ALERTS, &alert(reason))?;
                }
                let bytes = postcard::to_stdvec(&next).map_err(corrupt)?;
                seq_in.insert(msg.from.as_str(), bytes.as_slice())?;
                mark_seen(tx, &mut seen, id, 1)?;
                let mut inbox = tx.open_table(INBOX)?;
                let record = next_key(&inbox)?;
                inbox.insert(record, seal_record(key, record, &msg)?.as_slice())?;
                tx.open_table(UNREAD)?.insert(record, 1)?;
                tx.open_table(INBOX_IDS)?.insert(id.0.as_slice(), record)?;
                tx.open_table(HELD)?.remove(id.0.as_slice())?;
                tx.open_table(RECEIPTS_OUT)?
                    .insert((msg.from.as_str(), id.0.as_slice()), 1)?;
                note_seen(tx, &msg.from, msg.received_ms)?;
                append_event(tx, key, Event::Message(msg.clone()))?;
                Delivery::Stored(Box::new(msg))
            }
        }
    };
    Ok(delivery)
}

/// Within `tx`: remember `id` as handled (`state` as in `seen`) now, for
/// dedupe until [`SEEN_KEEP_MS`] has passed.
fn mark_seen(
    tx: &WriteTransaction,
    seen: &mut redb::Table<&[u8], u8>,
    id: &MessageId,
    state: u8,
) -> Result<(), StoreError> {
    seen.insert(id.0.as_slice(), state)?;
    tx.open_table(SEEN_AT)?
        .insert((now_ms(), id.0.as_slice()), ())?;
    Ok(())
}

/// Within `tx`: forget the ids of up to `limit` `seen_at` entries older
/// than `cutoff_ms` (Unix ms), except those still held. Returns how many
/// entries were taken (fewer than `limit`: no older one is left) and how
/// many ids were forgotten.
///
/// An id can have several `seen_at` entries (held, then released or
/// rejected); the first is when the relay had our ack, and the relay's
/// retention counts from there, so the first one to pass the cutoff
/// forgets the id. A held id outlives its entry; releasing or rejecting it
/// later adds a new one.
fn prune_seen_in(
    tx: &WriteTransaction,
    cutoff_ms: u64,
    limit: usize,
) -> Result<(usize, u64), StoreError> {
    let mut at = tx.open_table(SEEN_AT)?;
    let old: Vec<(u64, Vec<u8>)> = at
        .range::<(u64, &[u8])>(..(cutoff_ms, &[][..]))?
        .take(limit)
        .map(|e| e.map(|(k, _)| (k.value().0, k.value().1.to_vec())))
        .collect::<Result<_, _>>()?;
    if old.is_empty() {
        return Ok((0, 0));
    }
    let mut seen = tx.open_table(SEEN)?;
    let held = tx.open_table(HELD)?;
    let mut forgotten = 0;
    for (when, id) in &old {
        at.remove((*when, id.as_slice()))?;
        if held.get(id.as_slice())?.is_none() {
            forgotten += u64::from(seen.remove(id.as_slice())?.is_some());
        }
    }
    Ok((old.len(), forgotten))
}

fn held_record(bytes: &[u8]) -> Result<(Envelope, String, u64), StoreError> {
    postcard::from_bytes(bytes).map_err(corrupt)
}

impl Store {
    /// Open (or create) the database, 0600; fails if another agentd holds it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let db = Database::create(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let tx = db.begin_write()?;
        {
            tx.open_table(INBOX)?;
            tx.open_table(UNREAD)?;
            tx.open_table(INBOX_IDS)?;
            tx.open_table(SEEN)?;
            tx.open_table(SEEN_AT)?;
            tx.open_table(PINS)?;
            tx.open_table(HELD)?;
            tx.open_table(REJECTED)?;
            tx.open_table(SEQ_IN)?;
            tx.open_table(SEQ_OUT)?;
            tx.open_table(ALERTS)?;
            tx.open_table(SETTINGS)?;
            tx.open_table(SENT)?;
            tx.open_table(SENT_IDS)?;
            tx.open_table(RECEIPTS_OUT)?;
            tx.open_table(EVENTS)?;
            tx.open_table(VERIFIED)?;
            tx.open_table(LAST_SEEN)?;
            // Ids that earlier versions saw have no time: they count from
            // now, once.
            let mut settings = tx.open_table(SETTINGS)?;
            if settings.get(SEEN_INDEXED)?.is_none() {
                let now = now_ms();
                let mut at = tx.open_table(SEEN_AT)?;
                for entry in tx.open_table(SEEN)?.iter()? {
                    let (id, _) = entry?;
                    at.insert((now, id.value()), ())?;
                }
                settings.insert(SEEN_INDEXED, "1")?;
            }
        }
        tx.commit()?;
        Ok(Self { db })
    }

    /// Forget the ids handled before `cutoff_ms` (Unix ms; see
    /// [`SEEN_KEEP_MS`]), except held ones, in commits of a bounded size.
    /// Deliveries do this as they go; agentd also calls it at start.
    /// Returns how many were forgotten.
    pub fn prune_seen(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let tx = self.db.begin_write()?;
            let (taken, forgotten) = prune_seen_in(&tx, cutoff_ms, PRUNE_BATCH)?;
            if taken == 0 {
                return Ok(total);
            }
            tx.commit()?;
            total += forgotten;
        }
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

    /// Encrypt inbox records that earlier versions stored as plain JSON,
    /// keeping their read state. Returns how many were converted.
    pub fn seal_legacy_inbox(&self, key: &InboxKey) -> Result<usize, StoreError> {
        // Done once per database: later starts skip the scan.
        if self.setting(INBOX_SEALED)?.is_some() {
            return Ok(0);
        }
        let legacy: Vec<(u64, InboxMessage)> = {
            let tx = self.db.begin_read()?;
            let mut out = Vec::new();
            for entry in tx.open_table(INBOX)?.iter()? {
                let (k, v) = entry?;
                if v.value().first() == Some(&b'{') {
                    out.push((k.value(), open_record(key, k.value(), v.value())?));
                }
            }
            out
        };
        let tx = self.db.begin_write()?;
        {
            tx.open_table(SETTINGS)?.insert(INBOX_SEALED, "1")?;
            let mut inbox = tx.open_table(INBOX)?;
            let mut unread = tx.open_table(UNREAD)?;
            let mut ids = tx.open_table(INBOX_IDS)?;
            for (k, msg) in &legacy {
                if !msg.read {
                    unread.insert(*k, 1)?;
                }
                if let Some(id) = MessageId::from_hex(&msg.id) {
                    ids.insert(id.0.as_slice(), *k)?;
                }
                let sealed = seal_record(
                    key,
                    *k,
                    &InboxMessage {
                        read: false,
                        ..msg.clone()
                    },
                )?;
                inbox.insert(*k, sealed.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(legacy.len())
    }

    /// Store a verified message in the inbox, checking its sequence number
    /// (see `seq`) in the same transaction. `signer` is the SHA-256 of the
    /// key whose signature verified. Committed when this returns.
    pub fn deliver(
        &self,
        key: &InboxKey,
        id: &MessageId,
        msg: InboxMessage,
        signer: [u8; 32],
    ) -> Result<Delivery, StoreError> {
        let mut done = self.deliver_many(key, vec![(*id, msg, signer)])?;
        done.pop()
            .ok_or_else(|| corrupt("no outcome for a delivery"))
    }

    /// [`Store::deliver`] for several messages, in order, in one commit
    /// (one fsync for all of them): each sees what the ones before it
    /// stored, so that numbers and duplicates within the batch are checked
    /// as if they came one by one. One outcome per message, in order; on
    /// `Err` none of them is stored.
    pub fn deliver_many(
        &self,
        key: &InboxKey,
        msgs: Vec<(MessageId, InboxMessage, [u8; 32])>,
    ) -> Result<Vec<Delivery>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut out = Vec::with_capacity(msgs.len());
        let mut changed = false;
        // Rides on a commit that happens anyway.
        let cutoff = now_ms().saturating_sub(SEEN_KEEP_MS);
        changed |= prune_seen_in(&tx, cutoff, PRUNE_BATCH)?.0 > 0;
        for (id, msg, signer) in msgs {
            let delivery = deliver_in(&tx, key, &id, msg, signer)?;
            changed |= delivery != Delivery::Duplicate;
            out.push(delivery);
        }
        // Only duplicates: nothing to make durable.
        if changed {
            tx.commit()?;
        }
        Ok(out)
    }

    /// Inbox messages in the order they arrived, with their record keys, as
    /// `filter` says. Changes nothing: see [`Store::mark_read`].
    pub fn inbox_page(
        &self,
        key: &InboxKey,
        filter: InboxFilter<'_>,
    ) -> Result<Vec<(u64, InboxMessage)>, StoreError> {
        let tx = self.db.begin_read()?;
        let inbox = tx.open_table(INBOX)?;
        let unread = tx.open_table(UNREAD)?;
        let start = match filter.after {
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(after) => after + 1,
            None => 0,
        };
        let mut out = Vec::new();
        if filter.all {
            for entry in inbox.range(start..)? {
                if out.len() >= filter.limit {
                    break;
                }
                let (k, v) = entry?;
                let record = k.value();
                let read = unread.get(record)?.is_none();
                let mut msg = open_record(key, record, v.value())?;
                if filter.from.is_some_and(|f| f != msg.from) {
                    continue;
                }
                msg.read = read;
                out.push((record, msg));
            }
            return Ok(out);
        }
        // The unread listing walks `inbox_unread` alone: its cost follows
        // what is new, not everything ever received.
        for entry in unread.range(start..)? {
            if out.len() >= filter.limit {
                break;
            }
            let record = entry?.0.value();
            let Some(v) = inbox.get(record)? else {
                return Err(corrupt(format!(
                    "unread record {record} is not in the inbox"
                )));
            };
            let mut msg = open_record(key, record, v.value())?;
            if filter.from.is_some_and(|f| f != msg.from) {
                continue;
            }
            msg.read = false;
            out.push((record, msg));
        }
        Ok(out)
    }

    /// Mark these messages read; unknown ids are ignored. Returns how many
    /// changed.
    pub fn mark_read(&self, ids: &[MessageId]) -> Result<u64, StoreError> {
        let tx = self.db.begin_write()?;
        let mut changed = 0;
        {
            let by_id = tx.open_table(INBOX_IDS)?;
            let mut unread = tx.open_table(UNREAD)?;
            for id in ids {
                if let Some(record) = by_id.get(id.0.as_slice())? {
                    changed += u64::from(unread.remove(record.value())?.is_some());
                }
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Unread inbox messages.
    pub fn unread_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(UNREAD)?.len()?)
    }

    /// Take the next sequence number for a message to `user`. It is
    /// committed before the message is sealed, so that a crash can at worst
    /// skip a number (the recipient sees a gap), never use one twice.
    pub fn reserve_seq(&self, user: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_write()?;
        let seq = take_seq(&mut tx.open_table(SEQ_OUT)?, user)?;
        tx.commit()?;
        Ok(seq)
    }

    /// Start a send in one commit: take the next sequence number for each
    /// recipient of `msg` (in its order) and keep `msg` (every recipient
    /// `sending`) in the sent history. As with [`Store::reserve_seq`], a
    /// crash after this can at worst skip numbers, never reuse one.
    pub fn begin_send(&self, key: &InboxKey, msg: &SentMessage) -> Result<Vec<u64>, StoreError> {
        let id = MessageId::from_hex(&msg.id).ok_or_else(|| corrupt("sent message id"))?;
        let tx = self.db.begin_write()?;
        let mut seqs = Vec::with_capacity(msg.recipients.len());
        {
            let mut t = tx.open_table(SEQ_OUT)?;
            for r in &msg.recipients {
                seqs.push(take_seq(&mut t, &r.user)?);
            }
            let mut sent = tx.open_table(SENT)?;
            let record = next_key(&sent)?;
            sent.insert(record, seal_json(key, SENT_AAD, record, msg)?.as_slice())?;
            tx.open_table(SENT_IDS)?.insert(id.0.as_slice(), record)?;
        }
        tx.commit()?;
        Ok(seqs)
    }

    /// Give back a number the relay certainly did not store (it refused the
    /// message), if no later one was taken since.
    pub fn release_seq(&self, user: &str, seq: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(SEQ_OUT)?;
            let next = t.get(user)?.map(|v| v.value());
            if next == Some(seq + 1) {
                t.insert(user, seq)?;
            }
        }
        tx.commit()?;
        Ok(())
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
        let bytes = postcard::to_stdvec(&(env, reason, now_ms())).map_err(corrupt)?;
        let tx = self.db.begin_write()?;
        {
            tx.open_table(HELD)?
                .insert(env.id.0.as_slice(), bytes.as_slice())?;
            mark_seen(&tx, &mut tx.open_table(SEEN)?, &env.id, 2)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Drop a held envelope that was dealt with (a released receipt).
    pub fn unhold(&self, id: &MessageId) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(HELD)?.remove(id.0.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Held envelopes from `user`, in the order their sender numbered them.
    pub fn held_from(&self, user: &str) -> Result<Vec<Envelope>, StoreError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(HELD)?.iter()? {
            let (_, v) = entry?;
            let (env, _, _) = held_record(v.value())?;
            if env.sender == user {
                out.push(env);
            }
        }
        out.sort_by_key(|e| e.slots.iter().map(|s| s.seq).min());
        Ok(out)
    }

    /// How many messages are held.
    pub fn held_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(HELD)?.len()?)
    }

    /// Held messages as problems, at most `limit` after the id `after`
    /// (paging by id), without keeping their envelopes in memory.
    pub fn held_page(
        &self,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<(MessageId, Problem)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HELD)?;
        let mut out = Vec::new();
        let iter = match &after {
            Some(a) => t.range::<&[u8]>((
                std::ops::Bound::Excluded(a.0.as_slice()),
                std::ops::Bound::Unbounded,
            ))?,
            None => t.iter()?,
        };
        for entry in iter {
            if out.len() >= limit {
                break;
            }
            let (_, v) = entry?;
            let (env, reason, at_ms) = held_record(v.value())?;
            out.push((
                env.id,
                Problem {
                    id: env.id.to_string(),
                    from: env.sender,
                    reason,
                    at_ms,
                },
            ));
        }
        Ok(out)
    }

    /// The newest `limit` held messages, for `status`.
    pub fn held_newest(&self, limit: usize) -> Result<Vec<Problem>, StoreError> {
        let mut all: Vec<Problem> = Vec::new();
        let mut after = None;
        loop {
            let page = self.held_page(after, 256)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            all.extend(page.into_iter().map(|(_, p)| p));
            all.sort_by_key(|p| std::cmp::Reverse(p.at_ms));
            all.truncate(limit);
        }
        Ok(all)
    }

    /// Record a rejected message (and drop it from `held`, if it was there).
    pub fn reject(&self, id: &MessageId, from: &str, reason: &str) -> Result<(), StoreError> {
        let problem = Problem {
            id: id.to_string(),
            from: from.to_string(),
            reason: reason.to_string(),
            at_ms: now_ms(),
        };
        let tx = self.db.begin_write()?;
        record_rejection(&tx, &mut tx.open_table(SEEN)?, id, &problem)?;
        tx.commit()?;
        Ok(())
    }

    /// Recently rejected messages, oldest first.
    pub fn rejected_list(&self) -> Result<Vec<Problem>, StoreError> {
        problems(&self.db, REJECTED)
    }

    /// Recent gaps and replays in senders' numbering, oldest first.
    pub fn sequence_alerts(&self) -> Result<Vec<Problem>, StoreError> {
        problems(&self.db, ALERTS)
    }

    /// Move recipients of our message `id` to new states, where that is
    /// progress (see `advances`), in one commit. Deliveries and expiries
    /// go to the journal. Returns the recipients whose state changed.
    pub fn update_sent(
        &self,
        key: &InboxKey,
        id: &MessageId,
        updates: &[(&str, DeliveryState, Option<String>)],
    ) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_write()?;
        let changed = self.update_sent_in(&tx, key, id, updates)?;
        tx.commit()?;
        Ok(changed)
    }

    /// [`Store::update_sent`] without an fsync of its own: for news that
    /// may be lost in a crash without losing a message, such as "the relay
    /// stored it" after a send. The record it changes was made durable by
    /// [`Store::begin_send`], so a crash leaves it `sending` (what it shows
    /// for any send whose answer was not recorded) and a later receipt
    /// still moves it on. The next durable commit carries this one along.
    pub fn update_sent_relaxed(
        &self,
        key: &InboxKey,
        id: &MessageId,
        updates: &[(&str, DeliveryState, Option<String>)],
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::None);
        let changed = self.update_sent_in(&tx, key, id, updates)?;
        tx.commit()?;
        Ok(changed)
    }

    fn update_sent_in(
        &self,
        tx: &WriteTransaction,
        key: &InboxKey,
        id: &MessageId,
        updates: &[(&str, DeliveryState, Option<String>)],
    ) -> Result<Vec<String>, StoreError> {
        let Some(record) = tx
            .open_table(SENT_IDS)?
            .get(id.0.as_slice())?
            .map(|v| v.value())
        else {
            return Ok(Vec::new());
        };
        let mut sent = tx.open_table(SENT)?;
        let mut msg: SentMessage = match sent.get(record)? {
            Some(v) => open_json(key, SENT_AAD, record, v.value())?,
            None => return Ok(Vec::new()),
        };
        let now = now_ms();
        let mut changed = Vec::new();
        for (user, state, detail) in updates {
            let Some(r) = msg.recipients.iter_mut().find(|r| r.user == *user) else {
                continue;
            };
            if !advances(r.state, *state) {
                continue;
            }
            *r = RecipientState {
                user: r.user.clone(),
                state: *state,
                at_ms: now,
                detail: detail.clone(),
            };
            changed.push(r.user.clone());
            let event = match state {
                DeliveryState::Delivered => Event::Receipt {
                    id: msg.id.clone(),
                    from: r.user.clone(),
                    at_ms: now,
                },
                DeliveryState::Expired => Event::Expired {
                    id: msg.id.clone(),
                    to: r.user.clone(),
                    at_ms: now,
                },
                _ => continue,
            };
            append_event(tx, key, event)?;
        }
        if !changed.is_empty() {
            sent.insert(record, seal_json(key, SENT_AAD, record, &msg)?.as_slice())?;
        }
        Ok(changed)
    }

    /// A signed receipt from `from` for our messages `ids`: each becomes
    /// delivered to them (receipts are idempotent: a repeated one changes
    /// nothing and journals nothing). Returns how many changed.
    pub fn record_receipt(
        &self,
        key: &InboxKey,
        from: &str,
        ids: &[MessageId],
    ) -> Result<usize, StoreError> {
        let tx = self.db.begin_write()?;
        let mut changed = 0;
        for id in ids {
            changed += self
                .update_sent_in(&tx, key, id, &[(from, DeliveryState::Delivered, None)])?
                .len();
        }
        note_seen(&tx, from, now_ms())?;
        tx.commit()?;
        Ok(changed)
    }

    /// A user came online or went offline: journal it.
    pub fn record_presence(
        &self,
        key: &InboxKey,
        user: &str,
        online: bool,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let tx = self.db.begin_write()?;
        append_event(
            &tx,
            key,
            Event::Presence {
                user: user.to_string(),
                online,
                at_ms: now,
            },
        )?;
        if self.pin(user)?.is_some() {
            note_seen(&tx, user, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Receipts owed, at most `limit`: (to whom, for which message).
    pub fn receipts_due(&self, limit: usize) -> Result<Vec<(String, MessageId)>, StoreError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(RECEIPTS_OUT)?.iter()? {
            if out.len() >= limit {
                break;
            }
            let (k, _) = entry?;
            let (to, id) = k.value();
            let id: [u8; 16] = id.try_into().map_err(corrupt)?;
            out.push((to.to_string(), MessageId(id)));
        }
        Ok(out)
    }

    /// Receipts the relay has stored: no longer owed.
    pub fn receipts_sent(&self, to: &str, ids: &[MessageId]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(RECEIPTS_OUT)?;
            for id in ids {
                t.remove((to, id.0.as_slice()))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The cursor of the newest journal event (0: none yet).
    pub fn journal_head(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx
            .open_table(EVENTS)?
            .last()?
            .map(|(k, _)| k.value())
            .unwrap_or(0))
    }

    /// Journal events after `after`, oldest first, at most `limit`.
    pub fn events_after(
        &self,
        key: &InboxKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        let Some(start) = after.checked_add(1) else {
            return Ok(out);
        };
        for entry in t.range(start..)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            out.push(open_json(key, EVENTS_AAD, k.value(), v.value())?);
        }
        Ok(out)
    }

    /// The newest `limit` messages of a conversation, both ways, oldest
    /// first by our own clock: with `with`, the direct messages between us
    /// and them; without, the room (broadcasts sent and received).
    pub fn history(
        &self,
        key: &InboxKey,
        with: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let unread = tx.open_table(UNREAD)?;
        // (our clock, entry), newest first, from each table.
        let mut found: Vec<(u64, HistoryEntry)> = Vec::new();
        let mut taken = 0;
        for entry in tx.open_table(INBOX)?.iter()?.rev() {
            if taken >= limit {
                break;
            }
            let (k, v) = entry?;
            let mut msg = open_record(key, k.value(), v.value())?;
            let wanted = match with {
                Some(user) => msg.from == user && !msg.broadcast,
                None => msg.broadcast,
            };
            if wanted {
                msg.read = unread.get(k.value())?.is_none();
                taken += 1;
                found.push((msg.received_ms, HistoryEntry::In(msg)));
            }
        }
        taken = 0;
        for entry in tx.open_table(SENT)?.iter()?.rev() {
            if taken >= limit {
                break;
            }
            let (k, v) = entry?;
            let msg: SentMessage = open_json(key, SENT_AAD, k.value(), v.value())?;
            let wanted = match with {
                Some(user) => !msg.broadcast && msg.recipients.iter().any(|r| r.user == user),
                None => msg.broadcast,
            };
            if wanted {
                taken += 1;
                found.push((msg.sent_ms, HistoryEntry::Out(msg)));
            }
        }
        found.sort_by_key(|(at, _)| *at);
        let skip = found.len().saturating_sub(limit);
        Ok(found.into_iter().skip(skip).map(|(_, e)| e).collect())
    }

    /// Every pinned contact: name, key, when it was verified with `trust`
    /// (if it was), when they were last seen, and how many messages from
    /// them are held.
    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        let tx = self.db.begin_read()?;
        let verified = tx.open_table(VERIFIED)?;
        let seen = tx.open_table(LAST_SEEN)?;
        let mut held: std::collections::HashMap<String, u64> = Default::default();
        for entry in tx.open_table(HELD)?.iter()? {
            let (_, v) = entry?;
            let (env, _, _) = held_record(v.value())?;
            *held.entry(env.sender).or_default() += 1;
        }
        let mut out = Vec::new();
        for entry in tx.open_table(PINS)?.iter()? {
            let (k, v) = entry?;
            let user = k.value().to_string();
            out.push(Contact {
                key: v.value().to_vec(),
                verified_ms: verified.get(user.as_str())?.map(|v| v.value()),
                last_seen_ms: seen.get(user.as_str())?.map(|v| v.value()),
                held: held.get(&user).copied().unwrap_or(0),
                user,
            });
        }
        Ok(out)
    }

    /// Our contacts (the users with a pinned key), the most recently seen
    /// first, at most `limit`: whose presence the relay is asked to push.
    pub fn watch_list(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let seen = tx.open_table(LAST_SEEN)?;
        let mut users = Vec::new();
        for entry in tx.open_table(PINS)?.iter()? {
            let (k, _) = entry?;
            let user = k.value().to_string();
            let last = seen.get(user.as_str())?.map_or(0, |v| v.value());
            users.push((std::cmp::Reverse(last), user));
        }
        users.sort();
        Ok(users.into_iter().take(limit).map(|(_, u)| u).collect())
    }

    /// `user`'s pinned key was checked out of band (`trust`).
    pub fn set_verified(&self, user: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(VERIFIED)?.insert(user, now_ms())?;
        tx.commit()?;
        Ok(())
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

    fn msg(from: &str, seq: u64, text: &str) -> InboxMessage {
        InboxMessage {
            id: hex::encode([seq as u8; 16]),
            from: from.into(),
            sent_ms: 1,
            relay_ms: None,
            received_ms: 2,
            text: text.into(),
            read: false,
            seq,
            missing_before: 0,
            late: false,
            broadcast: false,
        }
    }

    fn id(seq: u64) -> MessageId {
        MessageId([seq as u8; 16])
    }

    fn all<'a>() -> InboxFilter<'a> {
        InboxFilter {
            all: true,
            from: None,
            after: None,
            limit: usize::MAX,
        }
    }

    fn unread<'a>() -> InboxFilter<'a> {
        InboxFilter {
            all: false,
            ..all()
        }
    }

    #[test]
    fn inbox_dedupes_and_marks_read_only_when_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("a.redb")).unwrap();
        let key = InboxKey::generate().unwrap();
        let first = store.deliver(&key, &id(1), msg("bob", 1, "hi"), [0; 32]);
        assert!(matches!(first.unwrap(), Delivery::Stored(_)));
        assert_eq!(
            store
                .deliver(&key, &id(1), msg("bob", 1, "hi"), [0; 32])
                .unwrap(),
            Delivery::Duplicate
        );
        assert_eq!(store.seen(&id(1)).unwrap(), Some(Seen::Inbox));
        assert_eq!(store.unread_count().unwrap(), 1);
        // Listing changes nothing.
        for _ in 0..2 {
            let got = store.inbox_page(&key, unread()).unwrap();
            assert_eq!(got.len(), 1);
            assert!(!got[0].1.read);
        }
        assert_eq!(store.mark_read(&[id(1), id(9)]).unwrap(), 1);
        assert!(store.inbox_page(&key, unread()).unwrap().is_empty());
        assert!(store.inbox_page(&key, all()).unwrap()[0].1.read);
        store.reject(&id(8), "eve", "bad signature").unwrap();
        assert_eq!(store.rejected_list().unwrap().len(), 1);
        store.set_pin("bob", b"der").unwrap();
        assert_eq!(store.pin("bob").unwrap().unwrap(), b"der");
        store
            .set_settings(&[("username", "alice"), ("pending_username", "")])
            .unwrap();
        assert_eq!(store.setting("username").unwrap().as_deref(), Some("alice"));
    }

    #[test]
    fn the_watch_list_is_the_pinned_users_most_recently_seen_first() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("a.redb")).unwrap();
        let key = InboxKey::generate().unwrap();
        assert!(store.watch_list(10).unwrap().is_empty());
        for user in ["bob", "carol", "dave"] {
            store.set_pin(user, b"der").unwrap();
        }
        // Presence of someone not pinned makes nobody a contact.
        store.record_presence(&key, "eve", true).unwrap();
        store.record_presence(&key, "carol", true).unwrap();
        assert_eq!(store.watch_list(10).unwrap(), ["carol", "bob", "dave"]);
        assert_eq!(store.watch_list(2).unwrap(), ["carol", "bob"]);
    }

    #[test]
    fn the_unread_listing_is_exactly_the_unread_messages_in_order_after_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        let key = InboxKey::generate().unwrap();
        {
            let store = Store::open(&path).unwrap();
            for n in 1..=8 {
                let from = if n % 3 == 0 { "carol" } else { "bob" };
                let m = msg(from, n, &format!("message {n}"));
                store.deliver(&key, &id(n), m, [0; 32]).unwrap();
            }
            // Read in a scattered order, including the first and the last.
            assert_eq!(store.mark_read(&[id(8), id(2), id(1), id(5)]).unwrap(), 4);
        }
        let store = Store::open(&path).unwrap();
        let texts = |page: Vec<(u64, InboxMessage)>| -> Vec<String> {
            page.into_iter()
                .map(|(_, m)| {
                    assert!(!m.read, "{} listed as unread but read", m.text);
                    m.text
                })
                .collect()
        };
        let wanted = ["message 3", "message 4", "message 6", "message 7"];
        assert_eq!(texts(store.inbox_page(&key, unread()).unwrap()), wanted);
        assert_eq!(store.unread_count().unwrap(), 4);
        // Paged two at a time, as agentd streams it: same order, nothing twice.
        let mut after = None;
        let mut paged = Vec::new();
        loop {
            let filter = InboxFilter {
                after,
                limit: 2,
                ..unread()
            };
            let page = store.inbox_page(&key, filter).unwrap();
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            paged.extend(texts(page));
        }
        assert_eq!(paged, wanted);
        let from_carol = InboxFilter {
            from: Some("carol"),
            ..unread()
        };
        assert_eq!(
            texts(store.inbox_page(&key, from_carol).unwrap()),
            ["message 3", "message 6"]
        );
        // `--all` still lists everything, with the read state from the table.
        let everything = store.inbox_page(&key, all()).unwrap();
        let read: Vec<bool> = everything.iter().map(|(_, m)| m.read).collect();
        assert_eq!(read, [true, true, false, false, true, false, false, true]);
        // A message delivered after the restart joins the end of the listing.
        store
            .deliver(&key, &id(9), msg("bob", 9, "message 9"), [0; 32])
            .unwrap();
        assert_eq!(store.mark_read(&[id(4)]).unwrap(), 1);
        assert_eq!(
            texts(store.inbox_page(&key, unread()).unwrap()),
            ["message 3", "message 6", "message 7", "message 9"]
        );
    }

    #[test]
    fn a_relaxed_sent_update_is_kept_by_a_clean_close_and_by_the_next_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        let key = InboxKey::generate().unwrap();
        let state = |store: &Store, n: u64| -> DeliveryState {
            let history = store.history(&key, Some("bob"), 10).unwrap();
            let found = history.into_iter().find_map(|e| match e {
                HistoryEntry::Out(m) if m.id == id(n).to_string() => Some(m.state()),
                _ => None,
            });
            found.unwrap()
        };
        let queued = [("bob", DeliveryState::Queued, None)];
        {
            let store = Store::open(&path).unwrap();
            store
                .begin_send(&key, &sent(id(1), &["bob"], false, 10))
                .unwrap();
            let changed = store.update_sent_relaxed(&key, &id(1), &queued).unwrap();
            assert_eq!(changed, ["bob"]);
            assert_eq!(state(&store, 1), DeliveryState::Queued);
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(state(&store, 1), DeliveryState::Queued);
        // Followed by a durable commit, it is part of that commit's state.
        store
            .begin_send(&key, &sent(id(2), &["bob"], false, 20))
            .unwrap();
        store.update_sent_relaxed(&key, &id(2), &queued).unwrap();
        store.mark_read(&[]).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(state(&store, 2), DeliveryState::Queued);
        // Progress only, as with the durable update: a receipt wins.
        assert_eq!(store.record_receipt(&key, "bob", &[id(2)]).unwrap(), 1);
        assert!(store
            .update_sent_relaxed(&key, &id(2), &queued)
            .unwrap()
            .is_empty());
        assert_eq!(state(&store, 2), DeliveryState::Delivered);
    }

    #[test]
    fn the_inbox_is_encrypted_at_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        let key = InboxKey::generate().unwrap();
        {
            let store = Store::open(&path).unwrap();
            let m = msg("bob", 1, "the eagle lands at midnight");
            store.deliver(&key, &id(1), m, [0; 32]).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(9).any(|w| w == b"the eagle"));
        let store = Store::open(&path).unwrap();
        let other = InboxKey::generate().unwrap();
        assert!(matches!(
            store.inbox_page(&other, all()),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(
            store.inbox_page(&key, all()).unwrap()[0].1.text,
            "the eagle lands at midnight"
        );
    }

    #[test]
    fn plain_records_of_earlier_versions_are_sealed_keeping_read_state() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut inbox = tx.open_table(INBOX).unwrap();
                for (k, read) in [(0u64, true), (1, false)] {
                    let m = InboxMessage {
                        read,
                        ..msg("bob", k + 1, "old secret")
                    };
                    inbox
                        .insert(k, serde_json::to_vec(&m).unwrap().as_slice())
                        .unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let key = InboxKey::generate().unwrap();
        assert_eq!(store.seal_legacy_inbox(&key).unwrap(), 2);
        assert_eq!(store.seal_legacy_inbox(&key).unwrap(), 0);
        assert_eq!(store.unread_count().unwrap(), 1);
        let got = store.inbox_page(&key, all()).unwrap();
        assert_eq!((got[0].1.read, got[1].1.read), (true, false));
        drop(store);
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(10).any(|w| w == b"old secret"));
    }

    #[test]
    fn sequence_gaps_late_arrivals_and_replays() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("a.redb")).unwrap();
        let key = InboxKey::generate().unwrap();
        let deliver = |n: u64, seq: u64| store.deliver(&key, &id(n), msg("bob", seq, "x"), [5; 32]);
        assert!(matches!(deliver(1, 1).unwrap(), Delivery::Stored(_)));
        let Delivery::Stored(gap) = deliver(4, 4).unwrap() else {
            panic!("stored")
        };
        assert_eq!(gap.missing_before, 2);
        let Delivery::Stored(late) = deliver(3, 3).unwrap() else {
            panic!("stored")
        };
        assert!(late.late);
        // Number 3 again under another id: the relay replays it.
        assert_eq!(deliver(30, 3).unwrap(), Delivery::Replayed);
        assert_eq!(store.seen(&id(30)).unwrap(), Some(Seen::Rejected));
        let alerts = store.sequence_alerts().unwrap();
        assert_eq!(alerts.len(), 2, "{alerts:?}");
        assert!(alerts[0].reason.contains("2 messages from bob are missing"));
        assert!(alerts[1].reason.contains("replayed"));
        assert_eq!(store.inbox_page(&key, all()).unwrap().len(), 3);
    }

    #[test]
    fn sent_numbers_are_reserved_durably_and_given_back_on_refusal() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.reserve_seq("bob").unwrap(), 1);
            assert_eq!(store.reserve_seq("bob").unwrap(), 2);
            store.release_seq("bob", 2).unwrap();
            assert_eq!(store.reserve_seq("bob").unwrap(), 2);
            assert_eq!(store.reserve_seq("carol").unwrap(), 1);
        }
        let store = Store::open(&path).unwrap();
        // A number taken before a crash is never used again.
        assert_eq!(store.reserve_seq("bob").unwrap(), 3);
        // An older number cannot be given back once a later one is out.
        store.release_seq("bob", 2).unwrap();
        assert_eq!(store.reserve_seq("bob").unwrap(), 4);
    }

    #[test]
    fn committed_messages_survive_reopening_and_stay_deduplicated() {
        // What a kill between the inbox commit and the ack leaves: the
        // message is in the database, and a redelivery adds nothing.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        let key = InboxKey::generate().unwrap();
        {
            let store = Store::open(&path).unwrap();
            store
                .deliver(&key, &id(9), msg("bob", 1, "once"), [0; 32])
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.seen(&id(9)).unwrap(), Some(Seen::Inbox));
        assert_eq!(
            store
                .deliver(&key, &id(9), msg("bob", 1, "once"), [0; 32])
                .unwrap(),
            Delivery::Duplicate
        );
        assert_eq!(store.inbox_page(&key, all()).unwrap().len(), 1);
    }

    fn sent(id: MessageId, to: &[&str], broadcast: bool, at: u64) -> SentMessage {
        let to: Vec<String> = to.iter().map(|u| u.to_string()).collect();
        SentMessage::sending(id.to_string(), broadcast, format!("text {at}"), at, &to)
    }

    #[test]
    fn sent_messages_move_forward_only_and_receipts_are_journalled_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("a.redb")).unwrap();
        let key = InboxKey::generate().unwrap();
        store
            .begin_send(&key, &sent(id(1), &["bob"], false, 10))
            .unwrap();
        // The receipt can beat the relay's own answer.
        assert_eq!(store.record_receipt(&key, "bob", &[id(1)]).unwrap(), 1);
        let queued = [("bob", DeliveryState::Queued, None)];
        assert!(store.update_sent(&key, &id(1), &queued).unwrap().is_empty());
        let expired = [("bob", DeliveryState::Expired, None)];
        assert!(store
            .update_sent(&key, &id(1), &expired)
            .unwrap()
            .is_empty());
        // A repeated receipt, or one from someone else, changes nothing.
        assert_eq!(store.record_receipt(&key, "bob", &[id(1)]).unwrap(), 0);
        assert_eq!(store.record_receipt(&key, "eve", &[id(1)]).unwrap(), 0);
        let events = store.events_after(&key, 0, 100).unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(&events[0].event, Event::Receipt { from, .. } if from == "bob"));
        assert_eq!(store.journal_head().unwrap(), events[0].cursor);
        let history = store.history(&key, Some("bob"), 10).unwrap();
        let [HistoryEntry::Out(m)] = history.as_slice() else {
            panic!("{history:?}")
        };
        assert_eq!(m.state(), DeliveryState::Delivered);
    }

    #[test]
    fn a_stored_message_is_journalled_and_owes_a_receipt_in_the_same_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        let key = InboxKey::generate().unwrap();
        {
            let store = Store::open(&path).unwrap();
            store
                .deliver(&key, &id(1), msg("bob", 1, "hi"), [0; 32])
                .unwrap();
            store
                .deliver(&key, &id(1), msg("bob", 1, "hi"), [0; 32])
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.receipts_due(10).unwrap(), vec![("bob".into(), id(1))]);
        let events = store.events_after(&key, 0, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert!(matches!(&events[0].event, Event::Message(m) if m.text == "hi"));
        assert!(store
            .events_after(&key, events[0].cursor, 10)
            .unwrap()
            .is_empty());
        store.receipts_sent("bob", &[id(1)]).unwrap();
        assert!(store.receipts_due(10).unwrap().is_empty());
        // The journal is sealed like the inbox.
        drop(store);
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(4).any(|w| w == b"\"hi\""));
    }

    #[test]
    fn history_keeps_conversations_and_the_room_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("a.redb")).unwrap();
        let key = InboxKey::generate().unwrap();
        let mut m = msg("bob", 1, "direct from bob");
        m.received_ms = 20;
        store.deliver(&key, &id(1), m, [0; 32]).unwrap();
        let mut b = msg("bob", 2, "bob to all");
        b.received_ms = 30;
        b.broadcast = true;
        store.deliver(&key, &id(2), b, [0; 32]).unwrap();
        store
            .begin_send(&key, &sent(id(3), &["bob"], false, 10))
            .unwrap();
        store
            .begin_send(&key, &sent(id(4), &["bob", "carol"], true, 40))
            .unwrap();
        store
            .begin_send(&key, &sent(id(5), &["carol"], false, 50))
            .unwrap();
        let texts = |with, limit| -> Vec<String> {
            store
                .history(&key, with, limit)
                .unwrap()
                .into_iter()
                .map(|e| match e {
                    HistoryEntry::In(m) => m.text,
                    HistoryEntry::Out(m) => m.text,
                })
                .collect()
        };
        assert_eq!(texts(Some("bob"), 10), ["text 10", "direct from bob"]);
        assert_eq!(texts(None, 10), ["bob to all", "text 40"]);
        assert_eq!(texts(Some("bob"), 1), ["direct from bob"]);
        assert_eq!(texts(Some("carol"), 10), ["text 50"]);
    }

    #[test]
    fn the_journal_keeps_a_bounded_tail_and_cursors_keep_growing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("a.redb")).unwrap();
        let key = InboxKey::generate().unwrap();
        for i in 0..(KEEP_EVENTS + 5) {
            store.record_presence(&key, "bob", i % 2 == 0).unwrap();
        }
        let head = store.journal_head().unwrap();
        assert_eq!(head, KEEP_EVENTS + 5);
        let all = store.events_after(&key, 0, usize::MAX).unwrap();
        assert_eq!(all.len() as u64, KEEP_EVENTS);
        assert_eq!(all[0].cursor, 6);
    }

    #[test]
    fn a_batch_of_deliveries_is_checked_in_order_and_committed_together() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.redb");
        let key = InboxKey::generate().unwrap();
        {
            let store = Store::open(&path).unwrap();
            let out = store
                .deliver_many(
                    &key,
                    vec![
                        (id(1), msg("bob", 1, "one"), [5; 32]),
                        (id(2), msg("bob", 3, "three"), [5; 32]),
                        // The same id again within the batch.
                        (id(1), msg("bob", 1, "one"), [5; 32]),
                        // Number 3 again under another id: a replay.
                        (id(4), msg("bob", 3, "again"), [5; 32]),
                    ],
                )
                .unwrap();
            assert!(matches!(&out[0], Delivery::Stored(_)));
            assert!(matches!(&out[1], Delivery::Stored(m) if m.missing_before == 1));
            assert_eq!(out[2..], [Delivery::Duplicate, Delivery::Replayed]);
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.unread_count().unwrap(), 2);
        assert_eq!(store.seen(&id(4)).unwrap(), Some(Seen::Rejected));
        assert_eq!(store.receipts_due(10).unwrap().len(), 2);
        assert_eq!(store.events_after(&key, 0, 10).unwrap().len(), 2);
    }

    #[test]
    fn seen_ids_are_forgotten_after_the_window_except_held_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("a.redb")).unwrap();
        let key = InboxKey::generate().unwrap();
        store
            .deliver(&key, &id(1), msg("bob", 1, "hi"), [0; 32])
            .unwrap();
        store.reject(&id(2), "eve", "bad signature").unwrap();
        let env = Envelope {
            version: 1,
            id: id(3),
            sender: "carol".into(),
            kind: securechat_common::envelope::Kind::Direct,
            timestamp_ms: 1,
            slots: Vec::new(),
            other_slots: Vec::new(),
            nonce: [0; 12],
            ciphertext: Vec::new(),
            signature: Vec::new(),
        };
        store.hold(&env, "key changed").unwrap();
        let handled = now_ms();

        // Nothing is old enough yet.
        assert_eq!(store.prune_seen(handled - SEEN_KEEP_MS).unwrap(), 0);
        assert_eq!(store.seen(&id(1)).unwrap(), Some(Seen::Inbox));

        // Past the window: delivered and rejected ids go, the held one stays.
        assert_eq!(store.prune_seen(handled + 1).unwrap(), 2);
        assert_eq!(store.seen(&id(1)).unwrap(), None);
        assert_eq!(store.seen(&id(2)).unwrap(), None);
        assert_eq!(store.seen(&id(3)).unwrap(), Some(Seen::Held));
        assert_eq!(store.prune_seen(handled + 1).unwrap(), 0);

        // Replays stay refused without the id: the number was delivered.
        assert_eq!(
            store
                .deliver(&key, &id(1), msg("bob", 1, "hi"), [0; 32])
                .unwrap(),
            Delivery::Replayed
        );
        // The inbox itself is untouched.
        assert_eq!(store.inbox_page(&key, all()).unwrap().len(), 1);
    }
}
