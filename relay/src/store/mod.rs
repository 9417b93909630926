//! Durable state behind a small storage trait.
//!
//! ```text
//!  handlers ──spawn_blocking──────────────► dyn Store ──► RedbStore (<data-dir>/relay.redb)
//!  send / ack ──► QueueWriter ─(batches)──►    │     └──► RedisStore (--redis URL), shared by several relays
//! ```
//!
//! The trait is synchronous on purpose: the embedded backend blocks on disk
//! I/O, so callers run it on tokio's blocking pool (see [`blocking`]). Every
//! method that changes state has committed durably when it returns `Ok`.
//!
//! `relay migrate` moves a relay's state from the redb file into Redis
//! ([`migrate`]).
//!
//! Sends and acks go through the [`QueueWriter`] ([`writer`]), which groups
//! the requests that arrive while a commit is in progress into one
//! [`Store::write_queue_batch`] call: one transaction, one fsync.
//!
//! What is kept:
//! * accounts (username → email, argon2id PHC, public key, TOTP secret);
//! * pending registrations (username → hashed one-time code, expiry, attempts);
//! * activations not yet followed by a login (username → the code's hash,
//!   expiry and attempts), so a `Verified` answer lost in flight can be given
//!   again to the holder of the same code;
//! * sessions, keyed by the SHA-256 of the token (the token itself is never stored);
//! * the last accepted TOTP time step per account (a code works once);
//! * per-recipient message queues in arrival order, a dedupe index on
//!   (recipient, message id), per-recipient totals for the quota, and who
//!   sent each queued message with per-(recipient, sender) totals, so one
//!   sender can fill only its share of someone's queue. A queue entry is a
//!   message or a notice that a message its owner sent expired
//!   ([`queue_item`]).

pub mod migrate;
pub mod queue_item;
mod redb_store;
mod redis_store;
pub mod writer;

use std::sync::Arc;

use securechat_common::protocol::DirectoryEntry;
use securechat_common::MessageId;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use queue_item::{ExpiredNotice, QueueItem};
pub use redb_store::RedbStore;
pub use redis_store::{Durability, RedisStore};
pub use writer::{QueueWriter, WriterTask};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error (I/O, corruption, lock).
    #[error("database error: {0}")]
    Db(Box<redb::Error>),
    /// Redis reported an error, or could not be reached.
    #[error("redis: {0}; check that the Redis given by --redis is running and reachable")]
    Redis(#[from] redis::RedisError),
    /// Fewer Redis replicas than `--redis-replicas` confirmed a queue batch
    /// in time: it is on the primary, but not counted as stored.
    #[error(
        "only {confirmed} of the {wanted} Redis replicas the relay waits for confirmed the \
         write; check the replicas (INFO replication)"
    )]
    Replication {
        /// Replicas waited for.
        wanted: u32,
        /// Replicas that confirmed.
        confirmed: u32,
    },
    /// A stored record could not be decoded.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// The blocking task running the operation failed, or the queue writer
    /// stopped (the relay is shutting down) before answering.
    #[error("storage task failed: {0}")]
    Task(String),
    /// The batch this request was grouped into did not commit; nothing in
    /// the batch was stored. Every request of the batch shares the cause.
    #[error("batched write failed: {0}")]
    Batch(Arc<StoreError>),
    /// The database file could not be created or made private (mode 0600).
    #[error("database file {path}: {source}; check the data directory's owner and permissions")]
    File {
        /// The database file.
        path: std::path::PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
redb_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// An active account.
#[derive(Clone, Serialize, Deserialize)]
pub struct Account {
    /// Account name (validated, lowercase).
    pub username: String,
    /// Verified email address.
    pub email: String,
    /// argon2id hash in PHC string format.
    pub password_phc: String,
    /// RSA public key, SubjectPublicKeyInfo DER.
    pub public_key: Vec<u8>,
    /// The raw TOTP secret (20 bytes).
    pub totp_secret: Zeroizing<Vec<u8>>,
    /// Unix seconds when the account was activated.
    pub created_unix: u64,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("username", &self.username)
            .field("created_unix", &self.created_unix)
            .finish_non_exhaustive()
    }
}

/// A registration waiting for its emailed code.
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingRegistration {
    /// Wanted account name.
    pub username: String,
    /// Where the code was sent.
    pub email: String,
    /// argon2id hash of the chosen password.
    pub password_phc: String,
    /// The account's public key.
    pub public_key: Vec<u8>,
    /// SHA-256 of the six-digit code.
    pub code_hash: [u8; 32],
    /// Unix seconds after which the code is refused.
    pub expires_unix: u64,
    /// Wrong codes tried so far.
    pub attempts: u32,
}

impl std::fmt::Debug for PendingRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRegistration")
            .field("username", &self.username)
            .field("expires_unix", &self.expires_unix)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// How an account was activated, kept from [`Store::activate_pending`]
/// until its first successful login (or the code's expiry): a `Verify`
/// with the same code may then be answered again, in case the first
/// answer was lost.
#[derive(Clone, Serialize, Deserialize)]
pub struct Activation {
    /// SHA-256 of the code that activated the account.
    pub code_hash: [u8; 32],
    /// The code's original expiry; after it the answer is not repeated.
    pub expires_unix: u64,
    /// Wrong codes tried so far, before and after the activation.
    pub attempts: u32,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("expires_unix", &self.expires_unix)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// One page of [`Store::directory`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectoryPage {
    /// Active accounts in name order: name and public key only.
    pub users: Vec<DirectoryEntry>,
    /// More accounts follow the last one of `users`.
    pub more: bool,
}

/// What [`Store::take_code_attempt`] found.
#[derive(Clone, Debug)]
pub enum CodeAttempt {
    /// No registration is pending for the name.
    NoPending,
    /// The code had expired; the registration is gone.
    Expired,
    /// The attempts are used up; the registration stays locked until it expires.
    Locked {
        /// When it expires.
        expires_unix: u64,
    },
    /// The attempt was counted; compare the code against this record
    /// (whose `attempts` includes this one).
    Counted(PendingRegistration),
    /// No registration is pending, but the account was activated by a code
    /// and has not logged in yet, within the code's expiry. The attempt was
    /// counted; compare the code against the activation (whose `attempts`
    /// includes this one) before showing the account's TOTP secret again.
    Repeat {
        /// The account as activated.
        account: Account,
        /// How it was activated.
        activation: Activation,
    },
    /// As [`CodeAttempt::Repeat`], but the attempts are used up: the
    /// secret is not shown again.
    RepeatLocked,
}

/// A session created by a full login.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    /// Whose session.
    pub username: String,
    /// Unix seconds after which the token is refused.
    pub expires_unix: u64,
}

/// Per-recipient queue limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Most messages waiting for one recipient.
    pub messages: u64,
    /// Most envelope bytes waiting for one recipient.
    pub bytes: u64,
}

/// How much may wait in the queues: per recipient, and per sender within
/// one recipient's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Per recipient.
    pub quota: Quota,
    /// The percentage (1 to 100) of `quota`, in messages and in bytes, that
    /// one sender may fill in one recipient's queue.
    pub sender_share_percent: u8,
}

impl QueueLimits {
    /// Only the per-recipient quota: any one sender may fill all of it.
    pub fn quota_only(quota: Quota) -> Self {
        Self {
            quota,
            sender_share_percent: 100,
        }
    }

    /// What one sender may have waiting in one recipient's queue (at least
    /// one message and one byte, so that a tiny quota still takes something).
    pub fn sender_quota(&self) -> Quota {
        let share = |total: u64| {
            let percent = u128::from(self.sender_share_percent.clamp(1, 100));
            let part = u128::from(total) * percent / 100;
            u64::try_from(part).unwrap_or(total).max(1)
        };
        Quota {
            messages: share(self.quota.messages),
            bytes: share(self.quota.bytes),
        }
    }
}

/// What [`Store::enqueue`] (or an enqueue in [`Store::write_queue_batch`]) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Stored and committed.
    Stored,
    /// This (recipient, id) was stored before; nothing was added.
    Duplicate,
    /// The recipient's queue is full; nothing was added.
    QuotaExceeded,
    /// The sender holds its whole share of the recipient's queue
    /// ([`QueueLimits::sender_quota`]); nothing was added.
    SenderShareExceeded,
    /// No account has the recipient's name; nothing was added. Only
    /// [`Store::write_queue_batch`] checks this.
    UnknownRecipient,
}

/// One change to the message queues; a batch of them is applied in order
/// by [`Store::write_queue_batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueOp {
    /// Queue an envelope for `recipient`, who must have an account,
    /// deduplicated on `id` and limited by the batch's [`QueueLimits`].
    Enqueue {
        /// Whose queue.
        recipient: String,
        /// Who sent it (the logged-in user): counted for the sender's share.
        sender: String,
        /// The message id (dedupe key).
        id: MessageId,
        /// The envelope, postcard-encoded.
        envelope: Vec<u8>,
        /// Unix seconds of arrival (retention counts from here).
        now: u64,
    },
    /// Delete an acknowledged message, as [`Store::ack`] does.
    Ack {
        /// Whose queue.
        recipient: String,
        /// The acknowledged message.
        id: MessageId,
        /// Unix seconds of the ack.
        now: u64,
    },
}

impl QueueOp {
    /// Envelope bytes this operation writes (for bounding a batch).
    pub fn envelope_len(&self) -> usize {
        match self {
            QueueOp::Enqueue { envelope, .. } => envelope.len(),
            QueueOp::Ack { .. } => 0,
        }
    }
}

/// What one [`QueueOp`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueOutcome {
    /// The outcome of a [`QueueOp::Enqueue`].
    Enqueue(EnqueueOutcome),
    /// The outcome of a [`QueueOp::Ack`]: `false` if the message was not queued.
    Ack(bool),
}

/// One entry of a queue as stored: a message or a notice. What the push
/// task reads.
#[derive(Clone, Debug)]
pub struct QueueEntry {
    /// Position in the owner's queue (grows with arrival).
    pub seq: u64,
    /// When the relay stored it (Unix seconds).
    pub received_unix: u64,
    /// The entry: a postcard [`QueueItem`] (see [`QueueItem::decode`]).
    pub item: Vec<u8>,
}

/// One queued message.
#[derive(Clone, Debug)]
pub struct Queued {
    /// Position in the recipient's queue (grows with arrival).
    pub seq: u64,
    /// The message id.
    pub id: MessageId,
    /// When the relay stored it (Unix seconds).
    pub received_unix: u64,
    /// The envelope, postcard-encoded as received.
    pub envelope: Vec<u8>,
}

/// Totals for the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreCounts {
    /// Active accounts.
    pub accounts: u64,
    /// Pending registrations (expired ones included until swept).
    pub pending_registrations: u64,
    /// Messages (and expiry notices) waiting in all queues.
    pub queued_messages: u64,
    /// Bytes waiting in all queues.
    pub queued_bytes: u64,
}

/// What a [`Store::sweep`] removed, and the notices it queued.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Messages (and notices) older than the retention time.
    pub expired_messages: u64,
    /// [`ExpiredNotice`]s queued for the senders of expired messages.
    pub expiry_notices: u64,
    /// Whose queues got a notice, sorted, each once: the relay wakes their
    /// push tasks.
    pub notified: Vec<String>,
    /// Expired pending registrations.
    pub expired_registrations: u64,
    /// Expired [`Activation`] records (accounts stay).
    pub expired_activations: u64,
    /// Expired sessions.
    pub expired_sessions: u64,
}

/// The relay's durable state. All methods block; call them through
/// [`blocking`]. Methods that write have committed when they return `Ok`.
///
/// The first methods are what a user does (log in, resume, come online):
/// each is one transaction and, on Redis, one round trip, where the
/// building blocks below them would be several.
pub trait Store: Send + Sync + 'static {
    /// What checking a login needs, read together: the account called
    /// `username` and its last accepted TOTP step.
    fn login_lookup(&self, username: &str) -> Result<(Option<Account>, Option<u64>), StoreError>;

    /// Finish a full login in one commit: record `step` as the account's
    /// last accepted TOTP step (as [`Store::accept_totp_step`] does: the
    /// activation goes too), store `session` under `token_hash`, and count
    /// what waits for the user. `None` (and nothing changed) if `step` is
    /// not later than the recorded one: the code was used already.
    fn complete_login(
        &self,
        username: &str,
        step: u64,
        token_hash: &[u8; 32],
        session: &Session,
    ) -> Result<Option<u64>, StoreError>;

    /// What checking a resume needs, read together: the session with this
    /// token hash and the account called `username`.
    fn resume_lookup(
        &self,
        token_hash: &[u8; 32],
        username: &str,
    ) -> Result<(Option<Session>, Option<Account>), StoreError>;

    /// Whether the session with this token hash still exists and, if so,
    /// how many entries wait for `username` (read together: a logout that
    /// removed the session is seen).
    fn live_session_unread(
        &self,
        token_hash: &[u8; 32],
        username: &str,
    ) -> Result<Option<u64>, StoreError>;

    /// The active account called `username`.
    fn account(&self, username: &str) -> Result<Option<Account>, StoreError>;

    /// Up to `limit` active accounts whose names sort after `after` (from
    /// the first with `None`), in name (byte) order, and whether more follow.
    fn directory(&self, after: Option<&str>, limit: usize) -> Result<DirectoryPage, StoreError>;

    /// Store a pending registration unless the name is taken by an account
    /// or by a pending registration that has not expired at `now`.
    /// Returns `false` (and stores nothing) when taken.
    fn insert_pending(&self, pending: &PendingRegistration, now: u64) -> Result<bool, StoreError>;

    /// Replace a live pending registration with `pending` (a new code),
    /// only if no account has the name and the registration stored now has
    /// the code hash `replaced` and has not expired at `now`. Returns `false`
    /// (and stores nothing) otherwise.
    fn replace_pending(
        &self,
        pending: &PendingRegistration,
        replaced: &[u8; 32],
        now: u64,
    ) -> Result<bool, StoreError>;

    /// The pending registration for `username`.
    fn pending(&self, username: &str) -> Result<Option<PendingRegistration>, StoreError>;

    /// Count one code attempt for `username`, atomically, before the code
    /// is compared: concurrent guesses cannot exceed `max_attempts`.
    /// An expired registration is removed. Without a pending registration,
    /// the attempt counts against the account's [`Activation`] if it has one
    /// (an expired one is removed and answered [`CodeAttempt::NoPending`]).
    fn take_code_attempt(
        &self,
        username: &str,
        now: u64,
        max_attempts: u32,
    ) -> Result<CodeAttempt, StoreError>;

    /// Forget a pending registration.
    fn remove_pending(&self, username: &str) -> Result<(), StoreError>;

    /// Atomically drop the pending registration and create the account
    /// (without an [`Activation`]: nothing can repeat its secret).
    /// Returns `false` if an account of that name exists already.
    fn activate(&self, account: &Account) -> Result<bool, StoreError>;

    /// Atomically create the account from its pending registration, drop
    /// the registration and keep `activation` until the first login.
    /// Returns `false` (and changes nothing) if an account of that name
    /// exists, or the pending registration is gone or now has another code
    /// than `activation.code_hash` (it was replaced by a new `Register`).
    fn activate_pending(
        &self,
        account: &Account,
        activation: &Activation,
    ) -> Result<bool, StoreError>;

    /// Replace an account's public key.
    fn set_public_key(&self, username: &str, public_key: &[u8]) -> Result<(), StoreError>;

    /// Record `step` as the account's last accepted TOTP time step if it is
    /// later than the one recorded; `false` means it was used already.
    /// A recorded step is a completed login: the account's [`Activation`]
    /// is dropped in the same commit, so its secret is never shown again.
    fn accept_totp_step(&self, username: &str, step: u64) -> Result<bool, StoreError>;

    /// The account's last accepted TOTP time step, if it has logged in.
    fn last_totp_step(&self, username: &str) -> Result<Option<u64>, StoreError>;

    /// Store a session under the SHA-256 of its token.
    fn put_session(&self, token_hash: &[u8; 32], session: &Session) -> Result<(), StoreError>;

    /// The session with this token hash.
    fn session(&self, token_hash: &[u8; 32]) -> Result<Option<Session>, StoreError>;

    /// Revoke a session.
    fn remove_session(&self, token_hash: &[u8; 32]) -> Result<(), StoreError>;

    /// Queue an envelope for `recipient`, deduplicated on `id` and limited by
    /// `quota`; committed durably before returning. No sender is recorded
    /// (this is for tools and tests; the relay's `Send` goes through
    /// [`Store::write_queue_batch`]), so the message counts for the
    /// recipient's quota only.
    fn enqueue(
        &self,
        recipient: &str,
        id: &MessageId,
        envelope: &[u8],
        now: u64,
        quota: Quota,
    ) -> Result<EnqueueOutcome, StoreError>;

    /// Apply `ops` in order in one atomic, durable commit and return one
    /// outcome per op, in the same order.
    ///
    /// Each op sees the effect of the ops before it: an id enqueued twice
    /// in a batch is stored once (the second is a duplicate), and the
    /// limits count what the batch has added so far. Unlike
    /// [`Store::enqueue`], an enqueue for a name without an account is
    /// answered with [`EnqueueOutcome::UnknownRecipient`], and the sender's
    /// share is kept. On `Err` nothing of the batch was stored.
    fn write_queue_batch(
        &self,
        ops: &[QueueOp],
        limits: QueueLimits,
    ) -> Result<Vec<QueueOutcome>, StoreError>;

    /// Up to `limit` queue entries (messages and notices) for `recipient`
    /// with `seq > after`, oldest first, undecoded.
    fn entries_after(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<QueueEntry>, StoreError>;

    /// The queued messages among the first `limit` queue entries for
    /// `recipient` with `seq > after`, oldest first; notices are left out.
    /// For tools and tests: an entry that does not decode fails the call.
    fn queued_after(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let mut out = Vec::new();
        for entry in self.entries_after(recipient, after, limit)? {
            let item = QueueItem::decode(&entry.item)?;
            let id = item.ack_id()?;
            if let QueueItem::Envelope(envelope) = item {
                out.push(Queued {
                    seq: entry.seq,
                    id,
                    received_unix: entry.received_unix,
                    envelope,
                });
            }
        }
        Ok(out)
    }

    /// Entries (messages and notices) waiting for `recipient`.
    fn queue_len(&self, recipient: &str) -> Result<u64, StoreError>;

    /// Delete an acknowledged message or notice (and a message's count in
    /// its sender's share); `false` if it was not queued. The id stays known for dedupe
    /// until the retention time has passed.
    fn ack(&self, recipient: &str, id: &MessageId, now: u64) -> Result<bool, StoreError>;

    /// Delete many acknowledged messages or notices of `recipient`, as
    /// [`Store::ack`] does each, in one atomic, durable commit; one flag per
    /// id, in order (`false`: it was not queued). On `Err` none was deleted.
    fn ack_many(
        &self,
        recipient: &str,
        ids: &[MessageId],
        now: u64,
    ) -> Result<Vec<bool>, StoreError> {
        // Acks never look at the limits; these only satisfy the signature.
        let limits = QueueLimits::quota_only(Quota {
            messages: 0,
            bytes: 0,
        });
        let ops: Vec<QueueOp> = ids
            .iter()
            .map(|id| QueueOp::Ack {
                recipient: recipient.to_string(),
                id: *id,
                now,
            })
            .collect();
        self.write_queue_batch(&ops, limits)?
            .into_iter()
            .map(|outcome| match outcome {
                QueueOutcome::Ack(removed) => Ok(removed),
                other => Err(StoreError::Task(format!(
                    "the store answered an ack with {other:?}"
                ))),
            })
            .collect()
    }

    /// Remove messages stored before `now - retention_secs` (with their
    /// counts in their senders' shares), dedupe entries of that age, and
    /// expired registrations, activations and sessions.
    ///
    /// In the same commit, each removed message with a recorded sender who
    /// still has an account becomes an [`ExpiredNotice`] in the sender's
    /// queue, stored at `now`. A removed notice gets no notice.
    fn sweep(&self, now: u64, retention_secs: u64) -> Result<SweepStats, StoreError>;

    /// Totals for the status page.
    fn counts(&self) -> Result<StoreCounts, StoreError>;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

/// Run a store operation on tokio's blocking pool.
pub async fn blocking<T, F>(store: &Arc<dyn Store>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// Encode a record for storage.
pub(crate) fn to_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Decode a stored record.
pub(crate) fn from_bytes<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}
