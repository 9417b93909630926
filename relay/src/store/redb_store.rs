//! The embedded [`Store`] backend: one redb file, one write transaction per
//! change or per queue batch (redb commits are durable: fsync before
//! `commit` returns). A transaction that changed nothing is not committed.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use securechat_common::protocol::DirectoryEntry;
use securechat_common::MessageId;

use super::{
    from_bytes, to_bytes, Account, Activation, CodeAttempt, DirectoryPage, EnqueueOutcome,
    ExpiredNotice, PendingRegistration, QueueEntry, QueueItem, QueueLimits, QueueOp, QueueOutcome,
    Quota, Session, Store, StoreCounts, StoreError, SweepStats,
};

/// username → postcard [`Account`].
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// username → postcard [`PendingRegistration`].
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending_registrations");
/// username → postcard [`Activation`], until the account's first login.
const ACTIVATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("activations");
/// SHA-256(token) → postcard [`Session`].
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
/// username → last accepted TOTP time step.
const TOTP_STEPS: TableDefinition<&str, u64> = TableDefinition::new("totp_steps");
/// (owner, seq) → (stored unix secs, postcard [`QueueItem`]).
const QUEUE: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("queue");
/// (recipient, message id) → (seq, stored unix secs); seq 0 = delivered.
const DEDUPE: TableDefinition<(&str, &[u8]), (u64, u64)> = TableDefinition::new("queue_dedupe");
/// recipient → (messages, bytes) waiting.
const TOTALS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("queue_totals");
/// (recipient, seq) → sender, for every queued message whose sender counts
/// (sent through [`Store::write_queue_batch`]).
const QUEUE_SENDERS: TableDefinition<(&str, u64), &str> = TableDefinition::new("queue_senders");
/// (recipient, sender) → (messages, bytes) waiting from that sender.
const SENDER_TOTALS: TableDefinition<(&str, &str), (u64, u64)> =
    TableDefinition::new("queue_sender_totals");
/// Counters: "next_seq".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Sequence number meaning "delivered, kept only for dedupe".
const DELIVERED: u64 = 0;

/// The redb-backed store.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Open (or create) the database file, readable and writable by its
    /// owner only (mode 0600, also when it existed already), and make sure
    /// every table exists.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        make_private_file(path).map_err(|source| StoreError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(ACCOUNTS)?;
            tx.open_table(PENDING)?;
            tx.open_table(ACTIVATIONS)?;
            tx.open_table(SESSIONS)?;
            tx.open_table(TOTP_STEPS)?;
            tx.open_table(QUEUE)?;
            tx.open_table(DEDUPE)?;
            tx.open_table(TOTALS)?;
            tx.open_table(QUEUE_SENDERS)?;
            tx.open_table(SENDER_TOTALS)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(Self { db })
    }
}

/// One stored record, as [`RedbStore::export`] hands it out: the raw
/// values of the tables, undecoded (for `relay migrate`).
pub(super) enum Exported<'a> {
    /// username → postcard [`Account`].
    Account { username: &'a str, record: &'a [u8] },
    /// username → postcard [`PendingRegistration`].
    Pending { username: &'a str, record: &'a [u8] },
    /// username → postcard [`Activation`].
    Activation { username: &'a str, record: &'a [u8] },
    /// SHA-256(token) → postcard [`Session`].
    Session {
        token_hash: &'a [u8],
        record: &'a [u8],
    },
    /// username → last accepted TOTP step.
    TotpStep { username: &'a str, step: u64 },
    /// One queue entry: postcard [`QueueItem`] stored at `stored`.
    QueueEntry {
        owner: &'a str,
        seq: u64,
        stored: u64,
        item: &'a [u8],
    },
    /// A dedupe entry; `seq` 0 means delivered.
    Dedupe {
        recipient: &'a str,
        id: &'a [u8],
        seq: u64,
        stored: u64,
    },
    /// What waits in one queue.
    Totals {
        owner: &'a str,
        messages: u64,
        bytes: u64,
    },
    /// Who sent the message at (recipient, seq).
    Sender {
        recipient: &'a str,
        seq: u64,
        sender: &'a str,
    },
    /// What one sender has waiting in one queue.
    SenderTotals {
        recipient: &'a str,
        sender: &'a str,
        messages: u64,
        bytes: u64,
    },
}

impl RedbStore {
    /// Hand every record of every table to `visit`, table by table, from
    /// one read transaction (one consistent snapshot). The `next_seq`
    /// counter is left out: queue positions are in the entries.
    pub(super) fn export(
        &self,
        mut visit: impl FnMut(Exported<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_read()?;
        for entry in tx.open_table(ACCOUNTS)?.iter()? {
            let (k, v) = entry?;
            visit(Exported::Account {
                username: k.value(),
                record: v.value(),
            })?;
        }
        for entry in tx.open_table(PENDING)?.iter()? {
            let (k, v) = entry?;
            visit(Exported::Pending {
                username: k.value(),
                record: v.value(),
            })?;
        }
        for entry in tx.open_table(ACTIVATIONS)?.iter()? {
            let (k, v) = entry?;
            visit(Exported::Activation {
                username: k.value(),
                record: v.value(),
            })?;
        }
        for entry in tx.open_table(SESSIONS)?.iter()? {
            let (k, v) = entry?;
            visit(Exported::Session {
                token_hash: k.value(),
                record: v.value(),
            })?;
        }
        for entry in tx.open_table(TOTP_STEPS)?.iter()? {
            let (k, v) = entry?;
            visit(Exported::TotpStep {
                username: k.value(),
                step: v.value(),
            })?;
        }
        for entry in tx.open_table(QUEUE)?.iter()? {
            let (k, v) = entry?;
            let ((owner, seq), (stored, item)) = (k.value(), v.value());
            visit(Exported::QueueEntry {
                owner,
                seq,
                stored,
                item,
            })?;
        }
        for entry in tx.open_table(DEDUPE)?.iter()? {
            let (k, v) = entry?;
            let ((recipient, id), (seq, stored)) = (k.value(), v.value());
            visit(Exported::Dedupe {
                recipient,
                id,
                seq,
                stored,
            })?;
        }
        for entry in tx.open_table(TOTALS)?.iter()? {
            let (k, v) = entry?;
            let (messages, bytes) = v.value();
            visit(Exported::Totals {
                owner: k.value(),
                messages,
                bytes,
            })?;
        }
        for entry in tx.open_table(QUEUE_SENDERS)?.iter()? {
            let (k, v) = entry?;
            let (recipient, seq) = k.value();
            visit(Exported::Sender {
                recipient,
                seq,
                sender: v.value(),
            })?;
        }
        for entry in tx.open_table(SENDER_TOTALS)?.iter()? {
            let (k, v) = entry?;
            let ((recipient, sender), (messages, bytes)) = (k.value(), v.value());
            visit(Exported::SenderTotals {
                recipient,
                sender,
                messages,
                bytes,
            })?;
        }
        Ok(())
    }
}

/// Create `path` if missing (mode 0600 from the start, so it is never
/// readable by others, even briefly) and set mode 0600 on it either way.
/// redb initialises an empty file as a new database.
fn make_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

/// Remove every entry whose encoded value `expired` says is over; returns
/// how many went. A value that cannot be decoded fails the whole sweep (the
/// caller's transaction is then dropped, undoing the removals).
fn remove_expired<K: redb::Key + 'static>(
    table: &mut redb::Table<'_, K, &'static [u8]>,
    mut expired: impl FnMut(&[u8]) -> Result<bool, StoreError>,
) -> Result<u64, StoreError> {
    let mut removed = 0u64;
    let mut failure = None;
    table.retain(|_, value| {
        if failure.is_some() {
            return true;
        }
        match expired(value) {
            Ok(true) => {
                removed += 1;
                false
            }
            Ok(false) => true,
            Err(e) => {
                failure = Some(e);
                true
            }
        }
    })?;
    failure.map_or(Ok(removed), Err)
}

fn is_live_pending(bytes: &[u8], now: u64) -> Result<bool, StoreError> {
    let p: PendingRegistration = from_bytes(bytes)?;
    Ok(p.expires_unix > now)
}

/// The part of [`Store::take_code_attempt`] for a name without a pending
/// registration: count the attempt against the account's [`Activation`].
fn repeat_attempt(
    tx: &WriteTransaction,
    username: &str,
    now: u64,
    max_attempts: u32,
) -> Result<CodeAttempt, StoreError> {
    let mut table = tx.open_table(ACTIVATIONS)?;
    let existing = table.get(username)?.map(|g| g.value().to_vec());
    let Some(bytes) = existing else {
        return Ok(CodeAttempt::NoPending);
    };
    let mut activation: Activation = from_bytes(&bytes)?;
    if now >= activation.expires_unix {
        table.remove(username)?;
        return Ok(CodeAttempt::NoPending);
    }
    if activation.attempts >= max_attempts {
        return Ok(CodeAttempt::RepeatLocked);
    }
    let found = tx
        .open_table(ACCOUNTS)?
        .get(username)?
        .map(|g| g.value().to_vec());
    let Some(account) = found else {
        // Cannot happen (accounts are never deleted); forget the record.
        table.remove(username)?;
        return Ok(CodeAttempt::NoPending);
    };
    activation.attempts += 1;
    table.insert(username, to_bytes(&activation)?.as_slice())?;
    Ok(CodeAttempt::Repeat {
        account: from_bytes(&account)?,
        activation,
    })
}

impl Store for RedbStore {
    fn login_lookup(&self, username: &str) -> Result<(Option<Account>, Option<u64>), StoreError> {
        let tx = self.db.begin_read()?;
        let account = tx
            .open_table(ACCOUNTS)?
            .get(username)?
            .map(|g| from_bytes(g.value()))
            .transpose()?;
        let step = tx.open_table(TOTP_STEPS)?.get(username)?.map(|g| g.value());
        Ok((account, step))
    }

    fn complete_login(
        &self,
        username: &str,
        step: u64,
        token_hash: &[u8; 32],
        session: &Session,
    ) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_write()?;
        let unread = {
            let mut steps = tx.open_table(TOTP_STEPS)?;
            let last = steps.get(username)?.map(|g| g.value());
            if last.is_some_and(|last| step <= last) {
                return Ok(None);
            }
            steps.insert(username, step)?;
            tx.open_table(ACTIVATIONS)?.remove(username)?;
            tx.open_table(SESSIONS)?
                .insert(token_hash.as_slice(), to_bytes(session)?.as_slice())?;
            let totals = tx.open_table(TOTALS)?;
            let found = totals.get(username)?;
            found.map(|g| g.value().0).unwrap_or(0)
        };
        tx.commit()?;
        Ok(Some(unread))
    }

    fn resume_lookup(
        &self,
        token_hash: &[u8; 32],
        username: &str,
    ) -> Result<(Option<Session>, Option<Account>), StoreError> {
        let tx = self.db.begin_read()?;
        let session = tx
            .open_table(SESSIONS)?
            .get(token_hash.as_slice())?
            .map(|g| from_bytes(g.value()))
            .transpose()?;
        let account = tx
            .open_table(ACCOUNTS)?
            .get(username)?
            .map(|g| from_bytes(g.value()))
            .transpose()?;
        Ok((session, account))
    }

    fn live_session_unread(
        &self,
        token_hash: &[u8; 32],
        username: &str,
    ) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        if tx
            .open_table(SESSIONS)?
            .get(token_hash.as_slice())?
            .is_none()
        {
            return Ok(None);
        }
        let totals = tx.open_table(TOTALS)?;
        let found = totals.get(username)?;
        Ok(Some(found.map(|g| g.value().0).unwrap_or(0)))
    }

    fn account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(ACCOUNTS)?;
        let found = table.get(username)?;
        found.map(|g| from_bytes(g.value())).transpose()
    }

    fn directory(&self, after: Option<&str>, limit: usize) -> Result<DirectoryPage, StoreError> {
        let tx = self.db.begin_read()?;
        let accounts = tx.open_table(ACCOUNTS)?;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = DirectoryPage::default();
        for entry in accounts.range::<&str>((start, Bound::Unbounded))? {
            if page.users.len() >= limit {
                // One entry past the page is enough to know that more follow.
                page.more = true;
                break;
            }
            let (_, value) = entry?;
            let account: Account = from_bytes(value.value())?;
            page.users.push(DirectoryEntry {
                username: account.username,
                public_key: account.public_key,
            });
        }
        Ok(page)
    }

    fn insert_pending(&self, pending: &PendingRegistration, now: u64) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            if tx
                .open_table(ACCOUNTS)?
                .get(pending.username.as_str())?
                .is_some()
            {
                return Ok(false);
            }
            let mut table = tx.open_table(PENDING)?;
            let existing = table
                .get(pending.username.as_str())?
                .map(|g| g.value().to_vec());
            if let Some(bytes) = existing {
                if is_live_pending(&bytes, now)? {
                    return Ok(false);
                }
            }
            table.insert(pending.username.as_str(), to_bytes(pending)?.as_slice())?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn replace_pending(
        &self,
        pending: &PendingRegistration,
        replaced: &[u8; 32],
        now: u64,
    ) -> Result<bool, StoreError> {
        let name = pending.username.as_str();
        let tx = self.db.begin_write()?;
        {
            if tx.open_table(ACCOUNTS)?.get(name)?.is_some() {
                return Ok(false);
            }
            let mut table = tx.open_table(PENDING)?;
            let existing = table.get(name)?.map(|g| g.value().to_vec());
            let Some(bytes) = existing else {
                return Ok(false);
            };
            let current: PendingRegistration = from_bytes(&bytes)?;
            if current.expires_unix <= now || current.code_hash != *replaced {
                return Ok(false);
            }
            table.insert(name, to_bytes(pending)?.as_slice())?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn pending(&self, username: &str) -> Result<Option<PendingRegistration>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(PENDING)?;
        let found = table.get(username)?;
        found.map(|g| from_bytes(g.value())).transpose()
    }

    fn take_code_attempt(
        &self,
        username: &str,
        now: u64,
        max_attempts: u32,
    ) -> Result<CodeAttempt, StoreError> {
        let tx = self.db.begin_write()?;
        let outcome = {
            let mut table = tx.open_table(PENDING)?;
            let existing = table.get(username)?.map(|g| g.value().to_vec());
            match existing {
                None => {
                    drop(table);
                    repeat_attempt(&tx, username, now, max_attempts)?
                }
                Some(bytes) => {
                    let mut pending: PendingRegistration = from_bytes(&bytes)?;
                    if now >= pending.expires_unix {
                        table.remove(username)?;
                        CodeAttempt::Expired
                    } else if pending.attempts >= max_attempts {
                        CodeAttempt::Locked {
                            expires_unix: pending.expires_unix,
                        }
                    } else {
                        pending.attempts += 1;
                        table.insert(username, to_bytes(&pending)?.as_slice())?;
                        CodeAttempt::Counted(pending)
                    }
                }
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn remove_pending(&self, username: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(PENDING)?.remove(username)?;
        tx.commit()?;
        Ok(())
    }

    fn activate(&self, account: &Account) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut accounts = tx.open_table(ACCOUNTS)?;
            if accounts.get(account.username.as_str())?.is_some() {
                return Ok(false);
            }
            accounts.insert(account.username.as_str(), to_bytes(account)?.as_slice())?;
            tx.open_table(PENDING)?.remove(account.username.as_str())?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn activate_pending(
        &self,
        account: &Account,
        activation: &Activation,
    ) -> Result<bool, StoreError> {
        let name = account.username.as_str();
        let tx = self.db.begin_write()?;
        {
            let mut accounts = tx.open_table(ACCOUNTS)?;
            if accounts.get(name)?.is_some() {
                return Ok(false);
            }
            let mut pending = tx.open_table(PENDING)?;
            let existing = pending.get(name)?.map(|g| g.value().to_vec());
            let Some(bytes) = existing else {
                return Ok(false);
            };
            let current: PendingRegistration = from_bytes(&bytes)?;
            if current.code_hash != activation.code_hash {
                return Ok(false);
            }
            pending.remove(name)?;
            accounts.insert(name, to_bytes(account)?.as_slice())?;
            tx.open_table(ACTIVATIONS)?
                .insert(name, to_bytes(activation)?.as_slice())?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn set_public_key(&self, username: &str, public_key: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut accounts = tx.open_table(ACCOUNTS)?;
            let existing = accounts.get(username)?.map(|g| g.value().to_vec());
            let Some(bytes) = existing else {
                return Err(StoreError::Corrupt(format!("no account {username:?}")));
            };
            let mut account: Account = from_bytes(&bytes)?;
            account.public_key = public_key.to_vec();
            accounts.insert(username, to_bytes(&account)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn accept_totp_step(&self, username: &str, step: u64) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut steps = tx.open_table(TOTP_STEPS)?;
            let last = steps.get(username)?.map(|g| g.value());
            if last.is_some_and(|last| step <= last) {
                return Ok(false);
            }
            steps.insert(username, step)?;
            tx.open_table(ACTIVATIONS)?.remove(username)?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn last_totp_step(&self, username: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let steps = tx.open_table(TOTP_STEPS)?;
        let found = steps.get(username)?;
        Ok(found.map(|g| g.value()))
    }

    fn put_session(&self, token_hash: &[u8; 32], session: &Session) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(SESSIONS)?
            .insert(token_hash.as_slice(), to_bytes(session)?.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    fn session(&self, token_hash: &[u8; 32]) -> Result<Option<Session>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SESSIONS)?;
        let found = table.get(token_hash.as_slice())?;
        found.map(|g| from_bytes(g.value())).transpose()
    }

    fn remove_session(&self, token_hash: &[u8; 32]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(SESSIONS)?.remove(token_hash.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    fn enqueue(
        &self,
        recipient: &str,
        id: &MessageId,
        envelope: &[u8],
        now: u64,
        quota: Quota,
    ) -> Result<EnqueueOutcome, StoreError> {
        let tx = self.db.begin_write()?;
        let limits = QueueLimits::quota_only(quota);
        let mut tables = QueueTables::open(&tx)?;
        let outcome = tables.enqueue(recipient, None, id, envelope, now, limits)?;
        if outcome == EnqueueOutcome::Stored {
            tables.finish()?;
            tx.commit()?;
        }
        Ok(outcome)
    }

    fn write_queue_batch(
        &self,
        ops: &[QueueOp],
        limits: QueueLimits,
    ) -> Result<Vec<QueueOutcome>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut changed = false;
        let mut outcomes = Vec::with_capacity(ops.len());
        {
            let mut tables = QueueTables::open(&tx)?;
            for op in ops {
                let outcome = match op {
                    QueueOp::Enqueue {
                        recipient,
                        sender,
                        id,
                        envelope,
                        now,
                    } => QueueOutcome::Enqueue(if tables.has_account(recipient)? {
                        tables.enqueue(recipient, Some(sender), id, envelope, *now, limits)?
                    } else {
                        EnqueueOutcome::UnknownRecipient
                    }),
                    QueueOp::Ack { recipient, id, now } => {
                        QueueOutcome::Ack(tables.ack(recipient, id, *now)?)
                    }
                };
                changed |= matches!(
                    outcome,
                    QueueOutcome::Enqueue(EnqueueOutcome::Stored) | QueueOutcome::Ack(true)
                );
                outcomes.push(outcome);
            }
            tables.finish()?;
        }
        // A batch of duplicates and refusals changed nothing: no fsync.
        if changed {
            tx.commit()?;
        }
        Ok(outcomes)
    }

    fn entries_after(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let queue = tx.open_table(QUEUE)?;
        let mut out = Vec::new();
        if after == u64::MAX {
            return Ok(out);
        }
        for entry in queue.range((recipient, after + 1)..=(recipient, u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            let (received_unix, item) = value.value();
            out.push(QueueEntry {
                seq: key.value().1,
                received_unix,
                item: item.to_vec(),
            });
        }
        Ok(out)
    }

    fn queue_len(&self, recipient: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let totals = tx.open_table(TOTALS)?;
        let found = totals.get(recipient)?;
        Ok(found.map(|g| g.value().0).unwrap_or(0))
    }

    fn ack(&self, recipient: &str, id: &MessageId, now: u64) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let mut tables = QueueTables::open(&tx)?;
        let removed = tables.ack(recipient, id, now)?;
        if removed {
            tables.finish()?;
            tx.commit()?;
        }
        Ok(removed)
    }

    fn sweep(&self, now: u64, retention_secs: u64) -> Result<SweepStats, StoreError> {
        let cutoff = now.saturating_sub(retention_secs);
        let mut stats = SweepStats::default();
        let tx = self.db.begin_write()?;
        {
            let mut tables = QueueTables::open(&tx)?;
            tables.expire(cutoff, now, &mut stats)?;

            // Dedupe entries live as long as the messages they guard.
            let mut old: Vec<(String, Vec<u8>)> = Vec::new();
            for entry in tables.dedupe.iter()? {
                let (key, value) = entry?;
                let (_, stored) = value.value();
                if stored < cutoff {
                    let (recipient, id) = key.value();
                    old.push((recipient.to_string(), id.to_vec()));
                }
            }
            for (recipient, id) in &old {
                tables.dedupe.remove((recipient.as_str(), id.as_slice()))?;
            }
            tables.finish()?;

            stats.expired_registrations = remove_expired(&mut tx.open_table(PENDING)?, |v| {
                Ok(!is_live_pending(v, now)?)
            })?;
            stats.expired_activations = remove_expired(&mut tx.open_table(ACTIVATIONS)?, |v| {
                Ok(from_bytes::<Activation>(v)?.expires_unix <= now)
            })?;
            stats.expired_sessions = remove_expired(&mut tx.open_table(SESSIONS)?, |v| {
                Ok(from_bytes::<Session>(v)?.expires_unix <= now)
            })?;
        }
        tx.commit()?;
        Ok(stats)
    }

    fn counts(&self) -> Result<StoreCounts, StoreError> {
        let tx = self.db.begin_read()?;
        let mut counts = StoreCounts {
            accounts: tx.open_table(ACCOUNTS)?.len()?,
            pending_registrations: tx.open_table(PENDING)?.len()?,
            ..StoreCounts::default()
        };
        for entry in tx.open_table(TOTALS)?.iter()? {
            let (_, value) = entry?;
            let (messages, bytes) = value.value();
            counts.queued_messages += messages;
            counts.queued_bytes += bytes;
        }
        Ok(counts)
    }
}

/// The queue tables, open in one write transaction: the single-message
/// methods and [`Store::write_queue_batch`] share these steps.
///
/// The counters (each queue's totals, each sender's share of it, the next
/// queue position) are read once per transaction and written back once by
/// [`QueueTables::finish`], which must run before the commit: a batch of
/// 200 sends to 16 queues then makes 17 counter updates instead of 600,
/// and B-tree updates are what a commit spends its CPU on.
struct QueueTables<'txn> {
    accounts: redb::Table<'txn, &'static str, &'static [u8]>,
    queue: redb::Table<'txn, (&'static str, u64), (u64, &'static [u8])>,
    dedupe: redb::Table<'txn, (&'static str, &'static [u8]), (u64, u64)>,
    totals: redb::Table<'txn, &'static str, (u64, u64)>,
    senders: redb::Table<'txn, (&'static str, u64), &'static str>,
    sender_totals: redb::Table<'txn, (&'static str, &'static str), (u64, u64)>,
    meta: redb::Table<'txn, &'static str, u64>,
    /// Totals read or changed in this transaction: owner → (messages, bytes).
    held: HashMap<String, (u64, u64)>,
    /// Sender shares read or changed: (recipient, sender) → (messages, bytes).
    shares: HashMap<(String, String), (u64, u64)>,
    /// The next queue position, once read.
    next_seq: Option<u64>,
}

impl<'txn> QueueTables<'txn> {
    fn open(tx: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            accounts: tx.open_table(ACCOUNTS)?,
            queue: tx.open_table(QUEUE)?,
            dedupe: tx.open_table(DEDUPE)?,
            totals: tx.open_table(TOTALS)?,
            senders: tx.open_table(QUEUE_SENDERS)?,
            sender_totals: tx.open_table(SENDER_TOTALS)?,
            meta: tx.open_table(META)?,
            held: HashMap::new(),
            shares: HashMap::new(),
            next_seq: None,
        })
    }

    /// Write the counters back; call before committing.
    fn finish(mut self) -> Result<(), StoreError> {
        for (owner, (m, b)) in std::mem::take(&mut self.held) {
            if m == 0 {
                self.totals.remove(owner.as_str())?;
            } else {
                self.totals.insert(owner.as_str(), (m, b))?;
            }
        }
        for ((recipient, sender), (m, b)) in std::mem::take(&mut self.shares) {
            let key = (recipient.as_str(), sender.as_str());
            if m == 0 {
                self.sender_totals.remove(key)?;
            } else {
                self.sender_totals.insert(key, (m, b))?;
            }
        }
        if let Some(seq) = self.next_seq {
            self.meta.insert("next_seq", seq)?;
        }
        Ok(())
    }

    /// `sender`'s share of `recipient`'s queue: (messages, bytes).
    fn share(&mut self, recipient: &str, sender: &str) -> Result<(u64, u64), StoreError> {
        let key = (recipient.to_string(), sender.to_string());
        if let Some(v) = self.shares.get(&key) {
            return Ok(*v);
        }
        let v = self
            .sender_totals
            .get((recipient, sender))?
            .map(|g| g.value())
            .unwrap_or((0, 0));
        self.shares.insert(key, v);
        Ok(v)
    }

    /// A message of `bytes` at `(recipient, seq)` left the queue (acked or
    /// expired): it no longer counts against its sender's share, if it
    /// did. Returns that sender.
    fn forget_sender(
        &mut self,
        recipient: &str,
        seq: u64,
        bytes: u64,
    ) -> Result<Option<String>, StoreError> {
        let Some(sender) = self
            .senders
            .remove((recipient, seq))?
            .map(|g| g.value().to_string())
        else {
            return Ok(None);
        };
        let (m, b) = self.share(recipient, &sender)?;
        self.shares.insert(
            (recipient.to_string(), sender.clone()),
            (m.saturating_sub(1), b.saturating_sub(bytes)),
        );
        Ok(Some(sender))
    }

    /// One message of `bytes` left `owner`'s queue.
    fn subtract_held(&mut self, owner: &str, bytes: u64) -> Result<(), StoreError> {
        let (m, b) = self.held(owner)?;
        self.held.insert(
            owner.to_string(),
            (m.saturating_sub(1), b.saturating_sub(bytes)),
        );
        Ok(())
    }

    fn has_account(&self, username: &str) -> Result<bool, StoreError> {
        Ok(self.accounts.get(username)?.is_some())
    }

    /// Queue one envelope; with a `sender`, also within its share.
    fn enqueue(
        &mut self,
        recipient: &str,
        sender: Option<&str>,
        id: &MessageId,
        envelope: &[u8],
        now: u64,
        limits: QueueLimits,
    ) -> Result<EnqueueOutcome, StoreError> {
        if self.dedupe.get((recipient, id.0.as_slice()))?.is_some() {
            return Ok(EnqueueOutcome::Duplicate);
        }
        let item = QueueItem::encode_envelope(envelope)?;
        let held = self.held(recipient)?;
        let size = item.len() as u64;
        if exceeds(held, size, limits.quota) {
            return Ok(EnqueueOutcome::QuotaExceeded);
        }
        let from_sender = match sender {
            Some(sender) => {
                let held = self.share(recipient, sender)?;
                if exceeds(held, size, limits.sender_quota()) {
                    return Ok(EnqueueOutcome::SenderShareExceeded);
                }
                Some((sender, held))
            }
            None => None,
        };
        let seq = self.append(recipient, held, id, &item, now)?;
        if let Some((sender, (held_messages, held_bytes))) = from_sender {
            self.senders.insert((recipient, seq), sender)?;
            self.shares.insert(
                (recipient.to_string(), sender.to_string()),
                (held_messages + 1, held_bytes + size),
            );
        }
        Ok(EnqueueOutcome::Stored)
    }

    /// What waits in `owner`'s queue: (entries, bytes).
    fn held(&mut self, owner: &str) -> Result<(u64, u64), StoreError> {
        if let Some(v) = self.held.get(owner) {
            return Ok(*v);
        }
        let v = self.totals.get(owner)?.map(|g| g.value()).unwrap_or((0, 0));
        self.held.insert(owner.to_string(), v);
        Ok(v)
    }

    /// Put `item` at the end of `owner`'s queue, known by `id` for dedupe
    /// and acks, and count it on top of `held` (what [`Self::held`] said
    /// just before: the caller has read it for the limits already); the
    /// caller has checked the limits and the dedupe index. Returns its
    /// queue position.
    fn append(
        &mut self,
        owner: &str,
        (messages, bytes): (u64, u64),
        id: &MessageId,
        item: &[u8],
        now: u64,
    ) -> Result<u64, StoreError> {
        let seq = match self.next_seq {
            Some(seq) => seq,
            None => self.meta.get("next_seq")?.map(|g| g.value()).unwrap_or(1),
        };
        self.next_seq = Some(seq + 1);
        self.queue.insert((owner, seq), (now, item))?;
        self.dedupe.insert((owner, id.0.as_slice()), (seq, now))?;
        self.held
            .insert(owner.to_string(), (messages + 1, bytes + item.len() as u64));
        Ok(seq)
    }

    /// Remove every entry stored before `cutoff`; for each removed message
    /// with a recorded sender, queue an [`ExpiredNotice`] for that sender at
    /// `now` (if they still have an account). Counts go into `stats`.
    fn expire(&mut self, cutoff: u64, now: u64, stats: &mut SweepStats) -> Result<(), StoreError> {
        struct Gone {
            owner: String,
            seq: u64,
            stored: u64,
            size: u64,
            /// The message id, read only for entries with a sender: notices
            /// (which have none) get no notice in turn.
            id: Option<MessageId>,
        }
        let mut gone = Vec::new();
        for entry in self.queue.iter()? {
            let (key, value) = entry?;
            let (stored, item) = value.value();
            if stored >= cutoff {
                continue;
            }
            let (owner, seq) = key.value();
            let id = if self.senders.get((owner, seq))?.is_some() {
                match QueueItem::decode(item).and_then(|item| item.ack_id()) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::warn!(seq, error = %e, "an expired message does not decode; its sender is not told");
                        None
                    }
                }
            } else {
                None
            };
            gone.push(Gone {
                owner: owner.to_string(),
                seq,
                stored,
                size: item.len() as u64,
                id,
            });
        }
        let mut notified = std::collections::BTreeSet::new();
        for g in &gone {
            self.queue.remove((g.owner.as_str(), g.seq))?;
            self.subtract_held(&g.owner, g.size)?;
            let sender = self.forget_sender(&g.owner, g.seq, g.size)?;
            let (Some(sender), Some(id)) = (sender, g.id) else {
                continue;
            };
            if !self.has_account(&sender)? {
                continue;
            }
            let notice = ExpiredNotice::new(id, &g.owner, g.seq, g.stored);
            if self.enqueue_notice(&sender, &notice, now)? {
                stats.expiry_notices += 1;
                notified.insert(sender);
            }
        }
        stats.expired_messages = gone.len() as u64;
        stats.notified = notified.into_iter().collect();
        Ok(())
    }

    /// Queue `notice` for `owner`: no limit applies (one notice per message
    /// the owner had queued, and smaller than it). `false` if its id is
    /// taken in the owner's dedupe index, which a derived id makes
    /// practically impossible; it is then dropped.
    fn enqueue_notice(
        &mut self,
        owner: &str,
        notice: &ExpiredNotice,
        now: u64,
    ) -> Result<bool, StoreError> {
        if self
            .dedupe
            .get((owner, notice.notice.0.as_slice()))?
            .is_some()
        {
            tracing::warn!(notice = %notice.notice, "an expiry notice's id is taken; the notice is dropped");
            return Ok(false);
        }
        let item = QueueItem::Expired(notice.clone()).encode()?;
        let held = self.held(owner)?;
        self.append(owner, held, &notice.notice, &item, now)?;
        Ok(true)
    }

    fn ack(&mut self, recipient: &str, id: &MessageId, now: u64) -> Result<bool, StoreError> {
        let entry = self
            .dedupe
            .get((recipient, id.0.as_slice()))?
            .map(|g| g.value());
        let Some((seq, _stored)) = entry else {
            return Ok(false);
        };
        if seq == DELIVERED {
            return Ok(false);
        }
        let removed = self
            .queue
            .remove((recipient, seq))?
            .map(|g| g.value().1.len() as u64);
        // Keep the id (as delivered) so a late resend is still a duplicate.
        self.dedupe
            .insert((recipient, id.0.as_slice()), (DELIVERED, now))?;
        if let Some(size) = removed {
            self.subtract_held(recipient, size)?;
            self.forget_sender(recipient, seq, size)?;
        }
        Ok(true)
    }
}

/// Whether one more message of `size` bytes on top of `held` (messages,
/// bytes) goes past `quota`.
fn exceeds(held: (u64, u64), size: u64, quota: Quota) -> bool {
    held.0.saturating_add(1) > quota.messages || held.1.saturating_add(size) > quota.bytes
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
impl RedbStore {
    /// Per-(recipient, sender) counts, as the share check sees them.
    pub(super) fn held_by(&self, recipient: &str, sender: &str) -> (u64, u64) {
        let tx = self.db.begin_read().unwrap();
        let table = tx.open_table(SENDER_TOTALS).unwrap();
        let found = table.get((recipient, sender)).unwrap();
        found.map(|g| g.value()).unwrap_or((0, 0))
    }

    /// Put raw bytes in `owner`'s queue at `seq`, as an older relay did.
    pub(super) fn insert_raw(&self, owner: &str, seq: u64, stored: u64, item: &[u8]) {
        let tx = self.db.begin_write().unwrap();
        tx.open_table(QUEUE)
            .unwrap()
            .insert((owner, seq), (stored, item))
            .unwrap();
        tx.commit().unwrap();
    }
}
