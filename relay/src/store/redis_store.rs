//! The shared [`Store`] backend: every relay started with the same
//! `--redis redis://HOST:PORT` keeps its state in that Redis, so several
//! relays serve one set of users.
//!
//! ```text
//!  relay A ─┐  one Lua script per operation (atomic, one round trip),
//!  relay B ─┼──────────────────────────────► redis-server (AOF, appendfsync always)
//!  relay C ─┘  a queue batch included
//! ```
//!
//! Each operation is one script ([`lua`]), so it is atomic and costs one
//! round trip; a queue batch from the group-commit writer is one script
//! for the whole batch. Redis answers a write only after it is in its
//! append-only file, and with `appendfsync always` (checked by
//! [`RedisStore::check_durability`]) only after that file is fsync'd: an
//! answer means the write is durable, as with redb.
//!
//! A connection that breaks after a batch was sent leaves it unknown
//! whether the batch ran: it is sent again on a new connection, and the
//! message ids make the sends in it duplicates and its acks harmless.

mod lua;

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use redis::Value;
use securechat_common::protocol::DirectoryEntry;
use securechat_common::MessageId;

use super::{
    from_bytes, to_bytes, Account, Activation, CodeAttempt, DirectoryPage, EnqueueOutcome,
    ExpiredNotice, PendingRegistration, QueueEntry, QueueItem, QueueLimits, QueueOp, QueueOutcome,
    Quota, Session, Store, StoreCounts, StoreError, SweepStats,
};

static SCRIPTS: LazyLock<lua::Scripts> = LazyLock::new(lua::Scripts::new);

/// How long one Redis call may take before it fails (a Redis that stopped
/// answering must not hang a request forever).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 32;

/// A connection idle for longer is checked with a PING before use: Redis
/// may have restarted meanwhile, and a request must not be the first to
/// find the connection dead (it would fail for nothing).
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Expired entries with a sender the sweep handles per round trip.
const SWEEP_BATCH: usize = 1000;

/// The Redis-backed store: a client and a pool of connections, each used
/// by one blocking call at a time.
pub struct RedisStore {
    client: redis::Client,
    /// Idle connections, with when each was last used.
    idle: Mutex<Vec<(redis::Connection, Instant)>>,
    /// Replicas that must have each queue batch before it counts as stored.
    replicas: u32,
}

/// How long a queue batch waits for its replicas (Redis `WAIT`).
const REPLICA_TIMEOUT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("server", &self.client.get_connection_info().addr())
            .finish_non_exhaustive()
    }
}

/// What [`RedisStore::check_durability`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `appendonly yes` and `appendfsync always`: an answer means fsync'd.
    Always,
    /// Acknowledged writes could be lost; the text says why.
    Unsafe(String),
}

impl RedisStore {
    /// Connect to the Redis at `url` (`redis://HOST:PORT[/DB]`, with
    /// `redis://:PASSWORD@HOST:PORT` for a password; `rediss://` is not
    /// built in) and load the scripts.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let store = Self {
            client,
            idle: Mutex::new(Vec::new()),
            replicas: 0,
        };
        let con = store.connect()?;
        store.put_back(con);
        Ok(store)
    }

    /// Count a queue batch as stored only once `n` replicas have it too
    /// (Redis `WAIT n`, in the batch's round trip); a batch they do not
    /// confirm within 2 s fails, and its senders retry.
    pub fn with_replicas(mut self, n: u32) -> Self {
        self.replicas = n;
        self
    }

    /// A client for the same Redis (for the presence tasks).
    pub fn client(&self) -> redis::Client {
        self.client.clone()
    }

    /// Whether Redis persists every write before answering it: its
    /// `appendonly` and `appendfsync` settings.
    pub fn check_durability(&self) -> Result<Durability, StoreError> {
        self.with(|con| {
            let config = |name: &str, con: &mut redis::Connection| {
                let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(con)?;
                Ok::<_, redis::RedisError>(pair.get(1).cloned().unwrap_or_default())
            };
            let (aof, fsync) = match (config("appendonly", con), config("appendfsync", con)) {
                (Ok(aof), Ok(fsync)) => (aof, fsync),
                (Err(e), _) | (_, Err(e)) => {
                    return Ok(Durability::Unsafe(format!(
                        "CONFIG GET is refused ({e}), so the relay cannot check that Redis \
                         fsyncs every write"
                    )))
                }
            };
            Ok(if aof != "yes" {
                Durability::Unsafe(format!(
                    "Redis has appendonly {aof:?}: a Redis crash loses acknowledged messages \
                     (set `appendonly yes` and `appendfsync always`)"
                ))
            } else if fsync != "always" {
                Durability::Unsafe(format!(
                    "Redis has appendfsync {fsync:?}: a power loss loses up to a second of \
                     acknowledged messages (set `appendfsync always`)"
                ))
            } else {
                Durability::Always
            })
        })
    }

    /// A fresh connection with time-outs and the scripts loaded.
    fn connect(&self) -> Result<redis::Connection, StoreError> {
        let mut con = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        // Pipelines call scripts by hash (EVALSHA), which needs them loaded.
        for script in SCRIPTS.all() {
            script.load(&mut con)?;
        }
        Ok(con)
    }

    fn put_back(&self, con: redis::Connection) {
        let mut idle = crate::lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push((con, Instant::now()));
        }
    }

    /// A pooled connection that works, or a new one.
    fn take(&self) -> Result<redis::Connection, StoreError> {
        loop {
            let pooled = crate::lock(&self.idle).pop();
            let Some((mut con, last_used)) = pooled else {
                return self.connect();
            };
            if last_used.elapsed() < CHECK_AFTER_IDLE
                || redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return Ok(con);
            }
        }
    }

    /// Run `f` on a pooled connection. A connection that saw an I/O error
    /// is dropped (the next call connects anew: Redis may have restarted).
    fn with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut con = self.take()?;
        let result = f(&mut con);
        let broken = matches!(&result, Err(StoreError::Redis(e)) if is_broken(e));
        if !broken {
            self.put_back(con);
        }
        result
    }

    /// Run `f` as [`Self::with`] does; if the connection turns out to be
    /// broken (Redis restarted since it was last used), drop every pooled
    /// connection and, when `f` is safe to run twice, run it once more on
    /// a new one.
    fn with_retry<T>(
        &self,
        retry: bool,
        f: impl Fn(&mut redis::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self.with(&f) {
            Err(StoreError::Redis(e)) if is_broken(&e) => {
                crate::lock(&self.idle).clear();
                if retry {
                    self.with(&f)
                } else {
                    Err(StoreError::Redis(e))
                }
            }
            other => other,
        }
    }

    /// Invoke one script with `args`. Scripts that only read, and the
    /// enqueue (a second run is a duplicate), are retried on a broken
    /// connection.
    fn call<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        self.with_retry(SCRIPTS.retry_safe(script), |con| {
            let mut invocation = script.prepare_invoke();
            for arg in args {
                invocation.arg(*arg);
            }
            Ok(invocation.invoke(con)?)
        })
    }
}

/// Whether the error means the connection is no good any more.
fn is_broken(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

fn num_arg(n: u64) -> Vec<u8> {
    n.to_string().into_bytes()
}

fn parse_num(bytes: &[u8]) -> Result<u64, StoreError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| StoreError::Corrupt("a stored number is not text".into()))?;
    // Sorted-set scores come back as doubles ("1.7e9" is possible).
    text.parse::<u64>()
        .or_else(|_| text.parse::<f64>().map(|f| f as u64))
        .map_err(|_| StoreError::Corrupt(format!("a stored number is {text:?}")))
}

fn hash32(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("a stored code hash is not 32 bytes".into()))
}

fn enqueue_outcome(code: i64) -> Result<EnqueueOutcome, StoreError> {
    Ok(match code {
        0 => EnqueueOutcome::Stored,
        1 => EnqueueOutcome::Duplicate,
        2 => EnqueueOutcome::QuotaExceeded,
        3 => EnqueueOutcome::SenderShareExceeded,
        4 => EnqueueOutcome::UnknownRecipient,
        other => {
            return Err(StoreError::Corrupt(format!(
                "the enqueue script answered {other}"
            )))
        }
    })
}

fn pending_args(p: &PendingRegistration) -> Result<Vec<Vec<u8>>, StoreError> {
    Ok(vec![
        p.username.as_bytes().to_vec(),
        to_bytes(p)?,
        p.code_hash.to_vec(),
        num_arg(p.expires_unix),
        num_arg(u64::from(p.attempts)),
    ])
}

fn refs(args: &[Vec<u8>]) -> Vec<&[u8]> {
    args.iter().map(Vec::as_slice).collect()
}

/// An empty answer means none.
fn decode_opt<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<Option<T>, StoreError> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        from_bytes(bytes).map(Some)
    }
}

impl Store for RedisStore {
    fn login_lookup(&self, username: &str) -> Result<(Option<Account>, Option<u64>), StoreError> {
        let found: Vec<Vec<u8>> = self.call(&SCRIPTS.login_lookup, &[username.as_bytes()])?;
        let [account, step] = found.as_slice() else {
            return Err(StoreError::Corrupt("the login lookup gave no pair".into()));
        };
        let step = if step.is_empty() {
            None
        } else {
            Some(parse_num(step)?)
        };
        Ok((decode_opt(account)?, step))
    }

    fn complete_login(
        &self,
        username: &str,
        step: u64,
        token_hash: &[u8; 32],
        session: &Session,
    ) -> Result<Option<u64>, StoreError> {
        let record = to_bytes(session)?;
        let unread: i64 = self.call(
            &SCRIPTS.complete_login,
            &[
                username.as_bytes(),
                &num_arg(step),
                hex::encode(token_hash).as_bytes(),
                &record,
                &num_arg(session.expires_unix),
            ],
        )?;
        Ok(u64::try_from(unread).ok())
    }

    fn resume_lookup(
        &self,
        token_hash: &[u8; 32],
        username: &str,
    ) -> Result<(Option<Session>, Option<Account>), StoreError> {
        let found: Vec<Vec<u8>> = self.call(
            &SCRIPTS.resume_lookup,
            &[hex::encode(token_hash).as_bytes(), username.as_bytes()],
        )?;
        let [session, account] = found.as_slice() else {
            return Err(StoreError::Corrupt("the resume lookup gave no pair".into()));
        };
        Ok((decode_opt(session)?, decode_opt(account)?))
    }

    fn live_session_unread(
        &self,
        token_hash: &[u8; 32],
        username: &str,
    ) -> Result<Option<u64>, StoreError> {
        let unread: i64 = self.call(
            &SCRIPTS.live_session_unread,
            &[hex::encode(token_hash).as_bytes(), username.as_bytes()],
        )?;
        Ok(u64::try_from(unread).ok())
    }

    fn account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        let found: Option<Vec<u8>> = self.call(&SCRIPTS.account, &[username.as_bytes()])?;
        found.map(|b| from_bytes(&b)).transpose()
    }

    fn directory(&self, after: Option<&str>, limit: usize) -> Result<DirectoryPage, StoreError> {
        let records: Vec<Vec<u8>> = self.call(
            &SCRIPTS.directory,
            &[after.unwrap_or("").as_bytes(), &num_arg(limit as u64)],
        )?;
        let mut page = DirectoryPage::default();
        for record in records {
            if page.users.len() >= limit {
                page.more = true;
                break;
            }
            let account: Account = from_bytes(&record)?;
            page.users.push(DirectoryEntry {
                username: account.username,
                public_key: account.public_key,
            });
        }
        Ok(page)
    }

    fn insert_pending(&self, pending: &PendingRegistration, now: u64) -> Result<bool, StoreError> {
        let mut args = pending_args(pending)?;
        args.push(num_arg(now));
        let done: i64 = self.call(&SCRIPTS.insert_pending, &refs(&args))?;
        Ok(done == 1)
    }

    fn replace_pending(
        &self,
        pending: &PendingRegistration,
        replaced: &[u8; 32],
        now: u64,
    ) -> Result<bool, StoreError> {
        let mut args = pending_args(pending)?;
        args.push(replaced.to_vec());
        args.push(num_arg(now));
        let done: i64 = self.call(&SCRIPTS.replace_pending, &refs(&args))?;
        Ok(done == 1)
    }

    fn pending(&self, username: &str) -> Result<Option<PendingRegistration>, StoreError> {
        let found: Vec<Vec<u8>> = self.call(&SCRIPTS.pending, &[username.as_bytes()])?;
        let [record, attempts] = found.as_slice() else {
            return Ok(None);
        };
        let mut pending: PendingRegistration = from_bytes(record)?;
        pending.attempts = u32::try_from(parse_num(attempts)?).unwrap_or(u32::MAX);
        Ok(Some(pending))
    }

    fn take_code_attempt(
        &self,
        username: &str,
        now: u64,
        max_attempts: u32,
    ) -> Result<CodeAttempt, StoreError> {
        let answer: Vec<Vec<u8>> = self.call(
            &SCRIPTS.take_code_attempt,
            &[
                username.as_bytes(),
                &num_arg(now),
                &num_arg(u64::from(max_attempts)),
            ],
        )?;
        let attempts = |b: &[u8]| parse_num(b).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        Ok(match answer.as_slice() {
            [tag] if tag == b"expired" => CodeAttempt::Expired,
            [tag] if tag == b"none" => CodeAttempt::NoPending,
            [tag] if tag == b"repeat_locked" => CodeAttempt::RepeatLocked,
            [tag, expires] if tag == b"locked" => CodeAttempt::Locked {
                expires_unix: parse_num(expires)?,
            },
            [tag, record, a] if tag == b"counted" => {
                let mut pending: PendingRegistration = from_bytes(record)?;
                pending.attempts = attempts(a)?;
                CodeAttempt::Counted(pending)
            }
            [tag, account, code, expires, a] if tag == b"repeat" => CodeAttempt::Repeat {
                account: from_bytes(account)?,
                activation: Activation {
                    code_hash: hash32(code)?,
                    expires_unix: parse_num(expires)?,
                    attempts: attempts(a)?,
                },
            },
            _ => {
                return Err(StoreError::Corrupt(
                    "the code-attempt script gave an unexpected answer".into(),
                ))
            }
        })
    }

    fn remove_pending(&self, username: &str) -> Result<(), StoreError> {
        let _: i64 = self.call(&SCRIPTS.remove_pending, &[username.as_bytes()])?;
        Ok(())
    }

    fn activate(&self, account: &Account) -> Result<bool, StoreError> {
        let record = to_bytes(account)?;
        let done: i64 = self.call(&SCRIPTS.activate, &[account.username.as_bytes(), &record])?;
        Ok(done == 1)
    }

    fn activate_pending(
        &self,
        account: &Account,
        activation: &Activation,
    ) -> Result<bool, StoreError> {
        let record = to_bytes(account)?;
        let done: i64 = self.call(
            &SCRIPTS.activate_pending,
            &[
                account.username.as_bytes(),
                &record,
                &activation.code_hash,
                &num_arg(activation.expires_unix),
                &num_arg(u64::from(activation.attempts)),
            ],
        )?;
        Ok(done == 1)
    }

    fn set_public_key(&self, username: &str, public_key: &[u8]) -> Result<(), StoreError> {
        let key = lua::account_key(username);
        // Optimistic: the account record is rewritten only if nothing
        // changed it since it was read (WATCH, MULTI).
        let found = self.with(|con| {
            Ok(redis::transaction(con, &[&key], |con, pipe| {
                let found: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(con)?;
                let Some(bytes) = found else {
                    return Ok(Some(false));
                };
                let mut account: Account = from_bytes(&bytes).map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "stored account",
                        e.to_string(),
                    ))
                })?;
                account.public_key = public_key.to_vec();
                let record = to_bytes(&account).map_err(|e| {
                    redis::RedisError::from((redis::ErrorKind::Client, "account", e.to_string()))
                })?;
                let done: Option<()> = pipe.set(&key, record).ignore().query(con)?;
                Ok(done.map(|()| true))
            })?)
        })?;
        if !found {
            return Err(StoreError::Corrupt(format!("no account {username:?}")));
        }
        Ok(())
    }

    fn accept_totp_step(&self, username: &str, step: u64) -> Result<bool, StoreError> {
        let done: i64 = self.call(
            &SCRIPTS.accept_totp_step,
            &[username.as_bytes(), &num_arg(step)],
        )?;
        Ok(done == 1)
    }

    fn last_totp_step(&self, username: &str) -> Result<Option<u64>, StoreError> {
        let found: Option<Vec<u8>> = self.call(&SCRIPTS.last_totp_step, &[username.as_bytes()])?;
        found.map(|b| parse_num(&b)).transpose()
    }

    fn put_session(&self, token_hash: &[u8; 32], session: &Session) -> Result<(), StoreError> {
        let record = to_bytes(session)?;
        let _: i64 = self.call(
            &SCRIPTS.put_session,
            &[
                hex::encode(token_hash).as_bytes(),
                &record,
                &num_arg(session.expires_unix),
            ],
        )?;
        Ok(())
    }

    fn session(&self, token_hash: &[u8; 32]) -> Result<Option<Session>, StoreError> {
        let found: Option<Vec<u8>> =
            self.call(&SCRIPTS.session, &[hex::encode(token_hash).as_bytes()])?;
        found.map(|b| from_bytes(&b)).transpose()
    }

    fn remove_session(&self, token_hash: &[u8; 32]) -> Result<(), StoreError> {
        let _: i64 = self.call(
            &SCRIPTS.remove_session,
            &[hex::encode(token_hash).as_bytes()],
        )?;
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
        // No sender (so no share), and no account needed: see the trait.
        let item = QueueItem::encode_envelope(envelope)?;
        let (messages, bytes) = (num_arg(quota.messages), num_arg(quota.bytes));
        enqueue_outcome(self.call(
            &SCRIPTS.enqueue,
            &[
                recipient.as_bytes(),
                b"",
                &id.0,
                &item,
                &num_arg(now),
                &messages,
                &bytes,
                &messages,
                &bytes,
                b"0",
            ],
        )?)
    }

    fn write_queue_batch(
        &self,
        ops: &[QueueOp],
        limits: QueueLimits,
    ) -> Result<Vec<QueueOutcome>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let share = limits.sender_quota();
        let mut batch = redis::cmd("EVALSHA");
        batch
            .arg(SCRIPTS.batch.get_hash())
            .arg(0)
            .arg(limits.quota.messages)
            .arg(limits.quota.bytes)
            .arg(share.messages)
            .arg(share.bytes);
        for op in ops {
            match op {
                QueueOp::Enqueue {
                    recipient,
                    sender,
                    id,
                    envelope,
                    now,
                } => {
                    batch
                        .arg("E")
                        .arg(recipient.as_str())
                        .arg(sender.as_str())
                        .arg(id.0.as_slice())
                        .arg(QueueItem::encode_envelope(envelope)?)
                        .arg(*now);
                }
                QueueOp::Ack { recipient, id, now } => {
                    batch
                        .arg("A")
                        .arg(recipient.as_str())
                        .arg(id.0.as_slice())
                        .arg(*now);
                }
            }
        }
        let mut pipe = redis::pipe();
        pipe.add_command(batch);
        if self.replicas > 0 {
            pipe.cmd("WAIT")
                .arg(self.replicas)
                .arg(REPLICA_TIMEOUT.as_millis() as u64);
        }
        // Safe to run twice: a stored message is then a duplicate, an acked
        // one "not queued", which its client does not act on.
        let answers: Vec<Value> = self.with_retry(true, |con| Ok(pipe.query(con)?))?;
        let mut answers = answers.into_iter();
        let outcomes: Vec<i64> = match answers.next() {
            Some(v) => redis::from_redis_value(v)
                .map_err(|e| StoreError::Corrupt(format!("a batch's answer: {e}")))?,
            None => Vec::new(),
        };
        if self.replicas > 0 {
            let confirmed: i64 = match answers.next() {
                Some(v) => redis::from_redis_value(v)
                    .map_err(|e| StoreError::Corrupt(format!("WAIT's answer: {e}")))?,
                None => 0,
            };
            if confirmed < i64::from(self.replicas) {
                return Err(StoreError::Replication {
                    wanted: self.replicas,
                    confirmed: u32::try_from(confirmed).unwrap_or(0),
                });
            }
        }
        if outcomes.len() != ops.len() {
            return Err(StoreError::Corrupt(format!(
                "{} answers to a batch of {}",
                outcomes.len(),
                ops.len()
            )));
        }
        ops.iter()
            .zip(outcomes)
            .map(|(op, answer)| {
                Ok(match op {
                    QueueOp::Enqueue { .. } => QueueOutcome::Enqueue(enqueue_outcome(answer)?),
                    QueueOp::Ack { .. } => QueueOutcome::Ack(answer == 1),
                })
            })
            .collect()
    }

    fn entries_after(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        if after == u64::MAX || limit == 0 {
            return Ok(Vec::new());
        }
        let flat: Vec<Vec<u8>> = self.call(
            &SCRIPTS.entries_after,
            &[
                recipient.as_bytes(),
                &num_arg(after),
                &num_arg(limit as u64),
            ],
        )?;
        flat.chunks_exact(3)
            .map(|c| {
                Ok(QueueEntry {
                    seq: parse_num(&c[0])?,
                    received_unix: parse_num(&c[1])?,
                    item: c[2].clone(),
                })
            })
            .collect()
    }

    fn queue_len(&self, recipient: &str) -> Result<u64, StoreError> {
        let n: i64 = self.call(&SCRIPTS.queue_len, &[recipient.as_bytes()])?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn ack(&self, recipient: &str, id: &MessageId, now: u64) -> Result<bool, StoreError> {
        let done: i64 = self.call(&SCRIPTS.ack, &[recipient.as_bytes(), &id.0, &num_arg(now)])?;
        Ok(done == 1)
    }

    fn sweep(&self, now: u64, retention_secs: u64) -> Result<SweepStats, StoreError> {
        let cutoff = num_arg(now.saturating_sub(retention_secs));
        let mut stats = SweepStats::default();
        let mut notified = std::collections::BTreeSet::new();
        loop {
            // The notices are built here (they are postcard), then applied
            // with the removals in one script.
            let flat: Vec<Vec<u8>> = self.call(
                &SCRIPTS.sweep_scan,
                &[&cutoff, &num_arg(SWEEP_BATCH as u64)],
            )?;
            let scanned = flat.len() / 4;
            let mut args = vec![num_arg(now), cutoff.clone()];
            for c in flat.chunks_exact(4) {
                let (owner, seq, stored, item) = (&c[0], &c[1], &c[2], &c[3]);
                let owner_name = String::from_utf8_lossy(owner).into_owned();
                let seq_n = parse_num(seq)?;
                let notice = match QueueItem::decode(item).and_then(|item| item.ack_id()) {
                    Ok(id) => {
                        let notice = ExpiredNotice::new(id, &owner_name, seq_n, parse_num(stored)?);
                        let item = QueueItem::Expired(notice.clone()).encode()?;
                        Some((notice.notice, item))
                    }
                    Err(e) => {
                        tracing::warn!(seq = seq_n, error = %e, "an expired message does not decode; its sender is not told");
                        None
                    }
                };
                args.push(owner.clone());
                args.push(seq.clone());
                match notice {
                    Some((id, item)) => {
                        args.push(id.0.to_vec());
                        args.push(item);
                    }
                    None => {
                        args.push(Vec::new());
                        args.push(Vec::new());
                    }
                }
            }
            let out: Vec<Value> = self.call(&SCRIPTS.sweep_apply, &refs(&args))?;
            let int = |i: usize| match out.get(i) {
                Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            stats.expired_messages += int(0);
            stats.expiry_notices += int(1);
            stats.expired_registrations += int(2);
            stats.expired_activations += int(3);
            stats.expired_sessions += int(4);
            for name in out.iter().skip(5) {
                if let Value::BulkString(b) = name {
                    notified.insert(String::from_utf8_lossy(b).into_owned());
                }
            }
            if scanned < SWEEP_BATCH {
                break;
            }
        }
        stats.notified = notified.into_iter().collect();
        Ok(stats)
    }

    fn counts(&self) -> Result<StoreCounts, StoreError> {
        let c: Vec<i64> = self.call(&SCRIPTS.counts, &[])?;
        let at = |i: usize| c.get(i).map_or(0, |n| u64::try_from(*n).unwrap_or(0));
        Ok(StoreCounts {
            accounts: at(0),
            pending_registrations: at(1),
            queued_messages: at(2),
            queued_bytes: at(3),
        })
    }
}
