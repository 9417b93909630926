//! The embedded [`Store`] backend: one redb file, one write transaction per
//! change (redb commits are durable: fsync before `commit` returns).

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use securechat_common::MessageId;

use super::{
    from_bytes, to_bytes, Account, CodeAttempt, EnqueueOutcome, PendingRegistration, Queued, Quota,
    Session, Store, StoreCounts, StoreError, SweepStats,
};

/// username → postcard [`Account`].
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// username → postcard [`PendingRegistration`].
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending_registrations");
/// SHA-256(token) → postcard [`Session`].
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
/// username → last accepted TOTP time step.
const TOTP_STEPS: TableDefinition<&str, u64> = TableDefinition::new("totp_steps");
/// (recipient, seq) → (stored unix secs, postcard envelope).
const QUEUE: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("queue");
/// (recipient, message id) → (seq, stored unix secs); seq 0 = delivered.
const DEDUPE: TableDefinition<(&str, &[u8]), (u64, u64)> = TableDefinition::new("queue_dedupe");
/// recipient → (messages, bytes) waiting.
const TOTALS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("queue_totals");
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
    /// Open (or create) the database file and make sure every table exists.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(ACCOUNTS)?;
            tx.open_table(PENDING)?;
            tx.open_table(SESSIONS)?;
            tx.open_table(TOTP_STEPS)?;
            tx.open_table(QUEUE)?;
            tx.open_table(DEDUPE)?;
            tx.open_table(TOTALS)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(Self { db })
    }
}

fn is_live_pending(bytes: &[u8], now: u64) -> Result<bool, StoreError> {
    let p: PendingRegistration = from_bytes(bytes)?;
    Ok(p.expires_unix > now)
}

impl Store for RedbStore {
    fn account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(ACCOUNTS)?;
        let found = table.get(username)?;
        found.map(|g| from_bytes(g.value())).transpose()
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
                None => CodeAttempt::NoPending,
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
        }
        tx.commit()?;
        Ok(true)
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
        {
            let mut dedupe = tx.open_table(DEDUPE)?;
            if dedupe.get((recipient, id.0.as_slice()))?.is_some() {
                return Ok(EnqueueOutcome::Duplicate);
            }
            let mut totals = tx.open_table(TOTALS)?;
            let (messages, bytes) = totals.get(recipient)?.map(|g| g.value()).unwrap_or((0, 0));
            let size = envelope.len() as u64;
            if messages + 1 > quota.messages || bytes + size > quota.bytes {
                return Ok(EnqueueOutcome::QuotaExceeded { messages, bytes });
            }
            let mut meta = tx.open_table(META)?;
            let seq = meta.get("next_seq")?.map(|g| g.value()).unwrap_or(1);
            meta.insert("next_seq", seq + 1)?;
            tx.open_table(QUEUE)?
                .insert((recipient, seq), (now, envelope))?;
            dedupe.insert((recipient, id.0.as_slice()), (seq, now))?;
            totals.insert(recipient, (messages + 1, bytes + size))?;
        }
        tx.commit()?;
        Ok(EnqueueOutcome::Stored)
    }

    fn queued_after(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
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
            let (_, seq) = key.value();
            let (_, envelope) = value.value();
            let env: securechat_common::Envelope = from_bytes(envelope)?;
            out.push(Queued {
                seq,
                id: env.id,
                envelope: envelope.to_vec(),
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
        {
            let mut dedupe = tx.open_table(DEDUPE)?;
            let entry = dedupe.get((recipient, id.0.as_slice()))?.map(|g| g.value());
            let Some((seq, _stored)) = entry else {
                return Ok(false);
            };
            if seq == DELIVERED {
                return Ok(false);
            }
            let removed = tx
                .open_table(QUEUE)?
                .remove((recipient, seq))?
                .map(|g| g.value().1.len() as u64);
            // Keep the id (as delivered) so a late resend is still a duplicate.
            dedupe.insert((recipient, id.0.as_slice()), (DELIVERED, now))?;
            if let Some(size) = removed {
                subtract_totals(&mut tx.open_table(TOTALS)?, recipient, 1, size)?;
            }
        }
        tx.commit()?;
        Ok(true)
    }

    fn sweep(&self, now: u64, retention_secs: u64) -> Result<SweepStats, StoreError> {
        let cutoff = now.saturating_sub(retention_secs);
        let mut stats = SweepStats::default();
        let tx = self.db.begin_write()?;
        {
            let mut queue = tx.open_table(QUEUE)?;
            let mut expired: Vec<(String, u64, u64)> = Vec::new();
            for entry in queue.iter()? {
                let (key, value) = entry?;
                let (stored, envelope) = value.value();
                if stored < cutoff {
                    let (recipient, seq) = key.value();
                    expired.push((recipient.to_string(), seq, envelope.len() as u64));
                }
            }
            let mut totals = tx.open_table(TOTALS)?;
            for (recipient, seq, size) in &expired {
                queue.remove((recipient.as_str(), *seq))?;
                subtract_totals(&mut totals, recipient, 1, *size)?;
            }
            stats.expired_messages = expired.len() as u64;

            // Dedupe entries live as long as the messages they guard.
            let mut dedupe = tx.open_table(DEDUPE)?;
            let mut old: Vec<(String, Vec<u8>)> = Vec::new();
            for entry in dedupe.iter()? {
                let (key, value) = entry?;
                let (_, stored) = value.value();
                if stored < cutoff {
                    let (recipient, id) = key.value();
                    old.push((recipient.to_string(), id.to_vec()));
                }
            }
            for (recipient, id) in &old {
                dedupe.remove((recipient.as_str(), id.as_slice()))?;
            }

            let mut pending = tx.open_table(PENDING)?;
            let mut dead: Vec<String> = Vec::new();
            for entry in pending.iter()? {
                let (key, value) = entry?;
                if !is_live_pending(value.value(), now)? {
                    dead.push(key.value().to_string());
                }
            }
            for name in &dead {
                pending.remove(name.as_str())?;
            }
            stats.expired_registrations = dead.len() as u64;

            let mut sessions = tx.open_table(SESSIONS)?;
            let mut gone: Vec<Vec<u8>> = Vec::new();
            for entry in sessions.iter()? {
                let (key, value) = entry?;
                let session: Session = from_bytes(value.value())?;
                if session.expires_unix <= now {
                    gone.push(key.value().to_vec());
                }
            }
            for key in &gone {
                sessions.remove(key.as_slice())?;
            }
            stats.expired_sessions = gone.len() as u64;
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

fn subtract_totals(
    totals: &mut redb::Table<&str, (u64, u64)>,
    recipient: &str,
    messages: u64,
    bytes: u64,
) -> Result<(), StoreError> {
    let (m, b) = totals.get(recipient)?.map(|g| g.value()).unwrap_or((0, 0));
    let (m, b) = (m.saturating_sub(messages), b.saturating_sub(bytes));
    if m == 0 {
        totals.remove(recipient)?;
    } else {
        totals.insert(recipient, (m, b))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    const QUOTA: Quota = Quota {
        messages: 3,
        bytes: 10_000,
    };

    fn open() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("relay.redb")).unwrap();
        (dir, store)
    }

    fn envelope(id: MessageId) -> Vec<u8> {
        let env = securechat_common::Envelope {
            version: 1,
            id,
            sender: "alice".into(),
            recipient: "bob".into(),
            timestamp_ms: 1,
            wrapped_key: vec![1; 256],
            nonce: [0; 12],
            ciphertext: vec![2; 32],
            signature: vec![3; 256],
        };
        postcard::to_stdvec(&env).unwrap()
    }

    fn pending(name: &str, expires_unix: u64) -> PendingRegistration {
        PendingRegistration {
            username: name.into(),
            email: format!("{name}@x.test"),
            password_phc: "phc".into(),
            public_key: vec![1, 2, 3],
            code_hash: [9; 32],
            expires_unix,
            attempts: 0,
        }
    }

    fn account(name: &str) -> Account {
        Account {
            username: name.into(),
            email: format!("{name}@x.test"),
            password_phc: "phc".into(),
            public_key: vec![1, 2, 3],
            totp_secret: Zeroizing::new(vec![4; 20]),
            created_unix: 1,
        }
    }

    #[test]
    fn pending_registration_holds_the_name_until_it_expires() {
        let (_dir, store) = open();
        assert!(store.insert_pending(&pending("alice", 100), 50).unwrap());
        assert!(!store.insert_pending(&pending("alice", 200), 60).unwrap());
        assert!(store.insert_pending(&pending("alice", 300), 150).unwrap());
        assert_eq!(store.pending("alice").unwrap().unwrap().expires_unix, 300);
        assert!(store.activate(&account("alice")).unwrap());
        assert!(store.pending("alice").unwrap().is_none());
        assert!(!store.activate(&account("alice")).unwrap());
        assert!(!store.insert_pending(&pending("alice", 999), 500).unwrap());
        assert_eq!(store.counts().unwrap().accounts, 1);
    }

    #[test]
    fn code_attempts_are_counted_then_locked_and_expire() {
        let (_dir, store) = open();
        assert!(matches!(
            store.take_code_attempt("carol", 10, 2).unwrap(),
            CodeAttempt::NoPending
        ));
        store.insert_pending(&pending("carol", 100), 0).unwrap();
        for n in 1..=2 {
            match store.take_code_attempt("carol", 10, 2).unwrap() {
                CodeAttempt::Counted(p) => assert_eq!(p.attempts, n),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            store.take_code_attempt("carol", 10, 2).unwrap(),
            CodeAttempt::Locked { expires_unix: 100 }
        ));
        assert!(matches!(
            store.take_code_attempt("carol", 100, 2).unwrap(),
            CodeAttempt::Expired
        ));
        assert!(store.pending("carol").unwrap().is_none());
    }

    #[test]
    fn totp_steps_are_accepted_once_and_only_forward() {
        let (_dir, store) = open();
        assert!(store.accept_totp_step("alice", 10).unwrap());
        assert!(!store.accept_totp_step("alice", 10).unwrap());
        assert!(!store.accept_totp_step("alice", 9).unwrap());
        assert!(store.accept_totp_step("alice", 11).unwrap());
        assert!(store.accept_totp_step("bob", 10).unwrap());
    }

    #[test]
    fn queue_dedupes_limits_acks_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.redb");
        let ids: Vec<MessageId> = (1..=4u8).map(|i| MessageId([i; 16])).collect();
        {
            let store = RedbStore::open(&path).unwrap();
            for id in &ids[..3] {
                let out = store.enqueue("bob", id, &envelope(*id), 10, QUOTA).unwrap();
                assert_eq!(out, EnqueueOutcome::Stored);
            }
            let dup = store
                .enqueue("bob", &ids[0], &envelope(ids[0]), 10, QUOTA)
                .unwrap();
            assert_eq!(dup, EnqueueOutcome::Duplicate);
            let full = store
                .enqueue("bob", &ids[3], &envelope(ids[3]), 10, QUOTA)
                .unwrap();
            assert!(matches!(
                full,
                EnqueueOutcome::QuotaExceeded { messages: 3, .. }
            ));
            assert_eq!(store.queue_len("bob").unwrap(), 3);
            assert_eq!(store.queue_len("alice").unwrap(), 0);
        }
        let store = RedbStore::open(&path).unwrap();
        let queued = store.queued_after("bob", 0, 10).unwrap();
        assert_eq!(queued.iter().map(|q| q.id).collect::<Vec<_>>(), ids[..3]);
        let rest = store.queued_after("bob", queued[0].seq, 10).unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(store.queued_after("bob", 0, 1).unwrap().len(), 1);

        assert!(store.ack("bob", &ids[0], 20).unwrap());
        assert!(!store.ack("bob", &ids[0], 20).unwrap(), "acked once");
        assert!(!store.ack("alice", &ids[1], 20).unwrap(), "not alice's");
        assert_eq!(store.queue_len("bob").unwrap(), 2);
        let again = store
            .enqueue("bob", &ids[0], &envelope(ids[0]), 30, QUOTA)
            .unwrap();
        assert_eq!(again, EnqueueOutcome::Duplicate, "delivered ids stay known");
        let counts = store.counts().unwrap();
        assert_eq!(counts.queued_messages, 2);
        assert!(counts.queued_bytes > 0);
    }

    #[test]
    fn byte_quota_counts_envelope_sizes() {
        let (_dir, store) = open();
        let id = MessageId([1; 16]);
        let small = Quota {
            messages: 100,
            bytes: 10,
        };
        let out = store.enqueue("bob", &id, &envelope(id), 1, small).unwrap();
        assert!(matches!(
            out,
            EnqueueOutcome::QuotaExceeded { bytes: 0, .. }
        ));
        assert_eq!(store.counts().unwrap().queued_messages, 0);
    }

    #[test]
    fn sweep_removes_what_has_expired_only() {
        let (_dir, store) = open();
        let (old, new) = (MessageId([1; 16]), MessageId([2; 16]));
        store
            .enqueue("bob", &old, &envelope(old), 100, QUOTA)
            .unwrap();
        store
            .enqueue("bob", &new, &envelope(new), 900, QUOTA)
            .unwrap();
        store.insert_pending(&pending("carol", 500), 0).unwrap();
        store.insert_pending(&pending("dave", 5000), 0).unwrap();
        store
            .put_session(
                &[1; 32],
                &Session {
                    username: "bob".into(),
                    expires_unix: 500,
                },
            )
            .unwrap();
        store
            .put_session(
                &[2; 32],
                &Session {
                    username: "bob".into(),
                    expires_unix: 5000,
                },
            )
            .unwrap();

        let stats = store.sweep(1000, 500).unwrap();
        assert_eq!(
            stats,
            SweepStats {
                expired_messages: 1,
                expired_registrations: 1,
                expired_sessions: 1
            }
        );
        let left = store.queued_after("bob", 0, 10).unwrap();
        assert_eq!(left.iter().map(|q| q.id).collect::<Vec<_>>(), [new]);
        assert_eq!(store.queue_len("bob").unwrap(), 1);
        assert!(store.pending("dave").unwrap().is_some());
        assert!(store.session(&[1; 32]).unwrap().is_none());
        assert!(store.session(&[2; 32]).unwrap().is_some());
        // The expired id is forgotten, so it could be queued again.
        let out = store
            .enqueue("bob", &old, &envelope(old), 1000, QUOTA)
            .unwrap();
        assert_eq!(out, EnqueueOutcome::Stored);
    }

    #[test]
    fn sessions_and_keys() {
        let (_dir, store) = open();
        store.activate(&account("alice")).unwrap();
        store.set_public_key("alice", &[7, 7]).unwrap();
        assert_eq!(store.account("alice").unwrap().unwrap().public_key, [7, 7]);
        assert!(store.set_public_key("nobody", &[1]).is_err());
        let s = Session {
            username: "alice".into(),
            expires_unix: 10,
        };
        store.put_session(&[5; 32], &s).unwrap();
        assert_eq!(store.session(&[5; 32]).unwrap().unwrap().username, "alice");
        store.remove_session(&[5; 32]).unwrap();
        assert!(store.session(&[5; 32]).unwrap().is_none());
    }
}
