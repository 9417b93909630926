//! `relay migrate`: move a relay's whole state from its redb file into a
//! Redis, so the relay (or several relays) can then run with `--redis URL`.
//!
//! ```text
//!  relay.redb ──export: one read transaction──► pipelines of a few hundred ──► Redis
//!              (RedbStore::export)               commands (key layout: redis_store/lua.rs)
//!  then verify: counts() equal; every queue (a spread sample past
//!  VERIFY_QUEUES) lists the same entries in the same order
//! ```
//!
//! Records are copied as stored (the same postcard bytes). What Redis keeps
//! beside them is derived here: the hash fields of pending registrations and
//! activations, the expiry indexes (`sc:pending`, `sc:activations`,
//! `sc:sessions`), `sc:dir`, `sc:owners`, each user's `sc:{u}:seq` and
//! `sc:totals`.
//!
//! Every write sets a value (SET, HSET, ZADD, SADD; a queue position is only
//! ever raised), nothing is deleted or counted up: running the migration
//! again over the same data (with `force`, after one that stopped half-way)
//! writes the same values again instead of counting twice.

use std::collections::BTreeMap;
use std::time::Duration;

use super::redb_store::Exported;
use super::{
    from_bytes, Activation, Durability, PendingRegistration, RedbStore, RedisStore, Session, Store,
    StoreCounts, StoreError,
};

/// Commands sent per round trip.
const BATCH_COMMANDS: usize = 500;

/// Argument bytes per round trip, so a batch of large envelopes stays a
/// few MiB.
const BATCH_BYTES: usize = 4 << 20;

/// How long one round trip may take (a pipeline of large envelopes on a
/// slow link takes a while; a Redis that stopped answering must not hang
/// the migration forever).
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Queue entries between two progress lines.
const PROGRESS_EVERY: u64 = 10_000;

/// Queues compared entry by entry after the copy; past this, an evenly
/// spread sample of this many.
const VERIFY_QUEUES: usize = 10_000;

/// Queue entries read per call while verifying.
const VERIFY_PAGE: usize = 1000;

/// Raise `KEYS[1]` (a user's last queue position) to at least `ARGV[1]`,
/// never lower it: new messages must sort after the moved ones.
const RAISE_SEQ: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"#;

/// Set `sc:totals` to the sum of every queue's totals: right after a first
/// migration and after a repeated one alike.
const SUM_TOTALS: &str = r#"
local m, b = 0, 0
for _, o in ipairs(redis.call('SMEMBERS', 'sc:owners')) do
  local t = redis.call('HMGET', 'sc:{' .. o .. '}:tot', 'm', 'b')
  m = m + (tonumber(t[1]) or 0)
  b = b + (tonumber(t[2]) or 0)
end
redis.call('HSET', 'sc:totals', 'm', string.format('%.0f', m), 'b', string.format('%.0f', b))
return 1
"#;

/// What the migration tells its caller as it goes.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Progress<'a> {
    /// A step done, or how far a long one is (for stdout).
    Step(&'a str),
    /// Something the operator should fix; the migration goes on.
    Warning(&'a str),
}

/// What [`migrate_redb_to_redis`] moved and checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrateSummary {
    /// Accounts (each also in the key directory).
    pub accounts: u64,
    /// Pending registrations (expired ones included, as the store counts them).
    pub pending_registrations: u64,
    /// Activations waiting for their account's first login.
    pub activations: u64,
    /// Sessions.
    pub sessions: u64,
    /// Accounts' last accepted TOTP steps.
    pub totp_steps: u64,
    /// Queue entries (messages and expiry notices).
    pub queued_messages: u64,
    /// Their bytes, as the quota counts them.
    pub queued_bytes: u64,
    /// Queues (users with anything queued or remembered for dedupe).
    pub queues: u64,
    /// Dedupe entries, queued and delivered.
    pub dedupe_ids: u64,
    /// Of those, delivered ones (kept so that a resend is still a duplicate).
    pub delivered_ids: u64,
    /// Per-(recipient, sender) shares.
    pub sender_shares: u64,
    /// Queues whose listing was compared after the copy.
    pub queues_verified: u64,
}

impl std::fmt::Display for MigrateSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "accounts: {}", self.accounts)?;
        writeln!(f, "pending registrations: {}", self.pending_registrations)?;
        writeln!(f, "activations: {}", self.activations)?;
        writeln!(f, "sessions: {}", self.sessions)?;
        writeln!(f, "TOTP steps: {}", self.totp_steps)?;
        writeln!(
            f,
            "queued messages: {} ({} bytes) in {} queues",
            self.queued_messages, self.queued_bytes, self.queues
        )?;
        writeln!(
            f,
            "dedupe ids: {} ({} delivered)",
            self.dedupe_ids, self.delivered_ids
        )?;
        writeln!(f, "sender shares: {}", self.sender_shares)?;
        write!(
            f,
            "verified: the counts match; {} of {} queues list the same entries",
            self.queues_verified, self.queues
        )
    }
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// Reading the redb file or writing Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis holds securechat keys already and `force` was not given.
    #[error(
        "Redis already holds securechat data (key {key:?}); migrate into an empty Redis, or \
         pass --force to write over keys of the same names (nothing is deleted; meant for \
         repeating a migration that stopped half-way)"
    )]
    NotEmpty {
        /// One of the keys found.
        key: String,
    },
    /// The copy in Redis differs from the redb file.
    #[error(
        "verification failed: {0}; do not start relays on this Redis: find the cause and \
         migrate again into an empty Redis"
    )]
    Mismatch(String),
}

/// Copy everything in `from` into `to` (the key layout of
/// `redis_store/lua.rs`), then check the copy. Refuses a Redis that holds
/// any `sc:*` key unless `force`. The relay using `from` must be stopped:
/// redb allows one process per file, so [`RedbStore::open`] fails while it
/// runs.
pub fn migrate_redb_to_redis(
    from: &RedbStore,
    to: &RedisStore,
    force: bool,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<MigrateSummary, MigrateError> {
    let client = to.client();
    let mut con = client
        .get_connection_with_timeout(IO_TIMEOUT)
        .map_err(StoreError::from)?;
    con.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(StoreError::from)?;
    con.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(StoreError::from)?;

    if let Durability::Unsafe(why) = to.check_durability()? {
        progress(Progress::Warning(&format!(
            "{why}; the relays will refuse this Redis unless started with \
             --redis-accept-data-loss"
        )));
    }
    let existing = first_securechat_key(&mut con)?;
    let forced_over_data = match existing {
        Some(key) if !force => return Err(MigrateError::NotEmpty { key }),
        Some(key) => {
            progress(Progress::Warning(&format!(
                "Redis already holds securechat data (key {key:?}); writing over it (--force)"
            )));
            true
        }
        None => false,
    };

    let expected = from.counts()?;
    let mut copy = Copy {
        pipe: Batch::new(&mut con),
        summary: MigrateSummary::default(),
        owners: BTreeMap::new(),
        table: "",
    };
    from.export(|record| copy.record(record, &mut progress))?;
    copy.step_done(&mut progress);
    let Copy {
        pipe,
        mut summary,
        owners,
        ..
    } = copy;
    pipe.flush()?;

    // Positions: each user's counter at least at the highest position moved.
    let raise = redis::Script::new(RAISE_SEQ);
    let sum = redis::Script::new(SUM_TOTALS);
    raise.load(&mut con).map_err(StoreError::from)?;
    sum.load(&mut con).map_err(StoreError::from)?;
    let mut pipe = Batch::new(&mut con);
    for (owner, top) in &owners {
        let key = user_key(owner, "seq");
        pipe.add(
            "EVALSHA",
            &[
                raise.get_hash().as_bytes(),
                b"1",
                key.as_bytes(),
                num(*top).as_bytes(),
            ],
        )?;
    }
    pipe.add("EVALSHA", &[sum.get_hash().as_bytes(), b"0"])?;
    pipe.flush()?;
    summary.queues = owners.len() as u64;
    progress(Progress::Step(&format!(
        "queue positions and totals: {} queues",
        owners.len()
    )));

    verify(
        from,
        to,
        &expected,
        forced_over_data,
        &owners,
        &mut summary,
        &mut progress,
    )?;
    Ok(summary)
}

/// The first key of `sc:*` that SCAN finds, if any.
fn first_securechat_key(con: &mut redis::Connection) -> Result<Option<String>, StoreError> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("sc:*")
            .arg("COUNT")
            .arg(1000)
            .query(con)?;
        if let Some(key) = keys.first() {
            return Ok(Some(String::from_utf8_lossy(key).into_owned()));
        }
        if next == 0 {
            return Ok(None);
        }
        cursor = next;
    }
}

/// `sc:{user}:suffix`, as the scripts' `k(u, s)` spells it.
fn user_key(user: &str, suffix: &str) -> String {
    format!("sc:{{{user}}}:{suffix}")
}

fn num(n: u64) -> String {
    n.to_string()
}

/// Commands gathered into one pipeline, sent when it is full.
struct Batch<'c> {
    con: &'c mut redis::Connection,
    pipe: redis::Pipeline,
    bytes: usize,
}

impl<'c> Batch<'c> {
    fn new(con: &'c mut redis::Connection) -> Self {
        Self {
            con,
            pipe: redis::pipe(),
            bytes: 0,
        }
    }

    /// Queue one command (its answer is not needed); send the batch when full.
    fn add(&mut self, name: &str, args: &[&[u8]]) -> Result<(), StoreError> {
        self.pipe.cmd(name);
        for arg in args {
            self.pipe.arg(*arg);
            self.bytes += arg.len();
        }
        self.pipe.ignore();
        if self.pipe.len() >= BATCH_COMMANDS || self.bytes >= BATCH_BYTES {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), StoreError> {
        if !self.pipe.is_empty() {
            self.pipe.query::<()>(self.con)?;
            self.pipe.clear();
            self.bytes = 0;
        }
        Ok(())
    }

    /// Send what is left.
    fn flush(mut self) -> Result<(), StoreError> {
        self.send()
    }
}

/// The copy in progress.
struct Copy<'c> {
    pipe: Batch<'c>,
    summary: MigrateSummary,
    /// Every user with queue state → the highest queue position seen.
    owners: BTreeMap<String, u64>,
    /// The table being copied (for the progress lines).
    table: &'static str,
}

impl Copy<'_> {
    /// Write one exported record in Redis's layout.
    fn record(
        &mut self,
        record: Exported<'_>,
        progress: &mut impl FnMut(Progress<'_>),
    ) -> Result<(), StoreError> {
        let table = table_name(&record);
        if table != self.table {
            self.step_done(progress);
            self.table = table;
        }
        let s = &mut self.summary;
        let pipe = &mut self.pipe;
        match record {
            Exported::Account { username, record } => {
                pipe.add("SET", &[user_key(username, "acct").as_bytes(), record])?;
                pipe.add("ZADD", &[b"sc:dir", b"0", username.as_bytes()])?;
                s.accounts += 1;
            }
            Exported::Pending { username, record } => {
                let p: PendingRegistration = from_bytes(record)?;
                let expires = num(p.expires_unix);
                pipe.add(
                    "HSET",
                    &[
                        user_key(username, "pend").as_bytes(),
                        b"r",
                        record,
                        b"c",
                        &p.code_hash,
                        b"e",
                        expires.as_bytes(),
                        b"a",
                        num(u64::from(p.attempts)).as_bytes(),
                    ],
                )?;
                pipe.add(
                    "ZADD",
                    &[b"sc:pending", expires.as_bytes(), username.as_bytes()],
                )?;
                s.pending_registrations += 1;
            }
            Exported::Activation { username, record } => {
                let a: Activation = from_bytes(record)?;
                let expires = num(a.expires_unix);
                pipe.add(
                    "HSET",
                    &[
                        user_key(username, "actv").as_bytes(),
                        b"c",
                        &a.code_hash,
                        b"e",
                        expires.as_bytes(),
                        b"a",
                        num(u64::from(a.attempts)).as_bytes(),
                    ],
                )?;
                pipe.add(
                    "ZADD",
                    &[b"sc:activations", expires.as_bytes(), username.as_bytes()],
                )?;
                s.activations += 1;
            }
            Exported::Session { token_hash, record } => {
                let session: Session = from_bytes(record)?;
                let hex = hex::encode(token_hash);
                pipe.add("SET", &[format!("sc:sess:{hex}").as_bytes(), record])?;
                pipe.add(
                    "ZADD",
                    &[
                        b"sc:sessions",
                        num(session.expires_unix).as_bytes(),
                        hex.as_bytes(),
                    ],
                )?;
                s.sessions += 1;
            }
            Exported::TotpStep { username, step } => {
                pipe.add(
                    "SET",
                    &[user_key(username, "totp").as_bytes(), num(step).as_bytes()],
                )?;
                s.totp_steps += 1;
            }
            Exported::QueueEntry {
                owner,
                seq,
                stored,
                item,
            } => {
                let seq_text = num(seq);
                let seq_b = seq_text.as_bytes();
                pipe.add("ZADD", &[user_key(owner, "q").as_bytes(), seq_b, seq_b])?;
                pipe.add("HSET", &[user_key(owner, "qv").as_bytes(), seq_b, item])?;
                pipe.add(
                    "ZADD",
                    &[
                        user_key(owner, "qt").as_bytes(),
                        num(stored).as_bytes(),
                        seq_b,
                    ],
                )?;
                Self::owner_seen(&mut self.owners, pipe, owner, seq)?;
                s.queued_messages += 1;
                s.queued_bytes += item.len() as u64;
                if s.queued_messages.is_multiple_of(PROGRESS_EVERY) {
                    progress(Progress::Step(&format!(
                        "queued messages: {} so far ({} bytes)",
                        s.queued_messages, s.queued_bytes
                    )));
                }
            }
            Exported::Dedupe {
                recipient,
                id,
                seq,
                stored,
            } => {
                pipe.add(
                    "HSET",
                    &[
                        user_key(recipient, "dd").as_bytes(),
                        id,
                        num(seq).as_bytes(),
                    ],
                )?;
                pipe.add(
                    "ZADD",
                    &[
                        user_key(recipient, "ddt").as_bytes(),
                        num(stored).as_bytes(),
                        id,
                    ],
                )?;
                Self::owner_seen(&mut self.owners, pipe, recipient, seq)?;
                s.dedupe_ids += 1;
                if seq == 0 {
                    s.delivered_ids += 1;
                }
            }
            Exported::Totals {
                owner,
                messages,
                bytes,
            } => {
                pipe.add(
                    "HSET",
                    &[
                        user_key(owner, "tot").as_bytes(),
                        b"m",
                        num(messages).as_bytes(),
                        b"b",
                        num(bytes).as_bytes(),
                    ],
                )?;
                Self::owner_seen(&mut self.owners, pipe, owner, 0)?;
            }
            Exported::Sender {
                recipient,
                seq,
                sender,
            } => {
                pipe.add(
                    "HSET",
                    &[
                        user_key(recipient, "snd").as_bytes(),
                        num(seq).as_bytes(),
                        sender.as_bytes(),
                    ],
                )?;
                Self::owner_seen(&mut self.owners, pipe, recipient, seq)?;
            }
            Exported::SenderTotals {
                recipient,
                sender,
                messages,
                bytes,
            } => {
                pipe.add(
                    "HSET",
                    &[
                        user_key(recipient, "shm").as_bytes(),
                        sender.as_bytes(),
                        num(messages).as_bytes(),
                    ],
                )?;
                pipe.add(
                    "HSET",
                    &[
                        user_key(recipient, "shb").as_bytes(),
                        sender.as_bytes(),
                        num(bytes).as_bytes(),
                    ],
                )?;
                Self::owner_seen(&mut self.owners, pipe, recipient, 0)?;
                s.sender_shares += 1;
            }
        }
        Ok(())
    }

    /// `owner` has queue state up to position `seq`: it goes into
    /// `sc:owners` (the sweep visits only those) once.
    fn owner_seen(
        owners: &mut BTreeMap<String, u64>,
        pipe: &mut Batch<'_>,
        owner: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        match owners.get_mut(owner) {
            Some(top) => *top = (*top).max(seq),
            None => {
                owners.insert(owner.to_string(), seq);
                pipe.add("SADD", &[b"sc:owners", owner.as_bytes()])?;
            }
        }
        Ok(())
    }

    /// Report the table just finished.
    fn step_done(&self, progress: &mut impl FnMut(Progress<'_>)) {
        let s = &self.summary;
        let line = match self.table {
            "" => return,
            "accounts" => format!("accounts: {}", s.accounts),
            "pending" => format!("pending registrations: {}", s.pending_registrations),
            "activations" => format!("activations: {}", s.activations),
            "sessions" => format!("sessions: {}", s.sessions),
            "totp" => format!("TOTP steps: {}", s.totp_steps),
            "queue" => format!(
                "queued messages: {} ({} bytes)",
                s.queued_messages, s.queued_bytes
            ),
            "dedupe" => format!(
                "dedupe ids: {} ({} delivered)",
                s.dedupe_ids, s.delivered_ids
            ),
            "sender_totals" => format!("sender shares: {}", s.sender_shares),
            // Per-queue totals and who sent what: counted with the queue.
            _ => return,
        };
        progress(Progress::Step(&line));
    }
}

/// Which table a record comes from (the export goes table by table).
fn table_name(record: &Exported<'_>) -> &'static str {
    match record {
        Exported::Account { .. } => "accounts",
        Exported::Pending { .. } => "pending",
        Exported::Activation { .. } => "activations",
        Exported::Session { .. } => "sessions",
        Exported::TotpStep { .. } => "totp",
        Exported::QueueEntry { .. } => "queue",
        Exported::Dedupe { .. } => "dedupe",
        Exported::Totals { .. } => "totals",
        Exported::Sender { .. } => "senders",
        Exported::SenderTotals { .. } => "sender_totals",
    }
}

/// Compare the copy with the source: the totals, then each queue's
/// listing (all of them up to [`VERIFY_QUEUES`], an evenly spread sample
/// past that). Over data that was there before (`forced_over_data`), the
/// totals include it, so a difference is only warned about.
fn verify(
    from: &RedbStore,
    to: &RedisStore,
    expected: &StoreCounts,
    forced_over_data: bool,
    owners: &BTreeMap<String, u64>,
    summary: &mut MigrateSummary,
    progress: &mut impl FnMut(Progress<'_>),
) -> Result<(), MigrateError> {
    let got = to.counts()?;
    if got != *expected {
        let what = format!("Redis counts {got:?}, the redb file {expected:?}");
        if forced_over_data {
            progress(Progress::Warning(&format!(
                "{what}: the difference is the data Redis held before (--force)"
            )));
        } else {
            return Err(MigrateError::Mismatch(what));
        }
    }
    let step = owners.len().div_ceil(VERIFY_QUEUES).max(1);
    for owner in owners.keys().step_by(step) {
        compare_queue(from, to, owner)?;
        summary.queues_verified += 1;
    }
    progress(Progress::Step(&format!(
        "verified: {} of {} queues list the same entries",
        summary.queues_verified,
        owners.len()
    )));
    Ok(())
}

/// Whether `owner`'s queue lists the same entries, in the same order, in
/// both stores.
fn compare_queue(from: &RedbStore, to: &RedisStore, owner: &str) -> Result<(), MigrateError> {
    let mut after = 0;
    loop {
        let want = from.entries_after(owner, after, VERIFY_PAGE)?;
        let got = to.entries_after(owner, after, VERIFY_PAGE)?;
        if want.len() != got.len() {
            return Err(MigrateError::Mismatch(format!(
                "the queue of {owner:?} lists {} entries after position {after} in Redis, {} in \
                 the redb file",
                got.len(),
                want.len()
            )));
        }
        for (w, g) in want.iter().zip(&got) {
            if (w.seq, w.received_unix, &w.item) != (g.seq, g.received_unix, &g.item) {
                return Err(MigrateError::Mismatch(format!(
                    "the queue of {owner:?} differs at position {} (Redis has position {} \
                     stored at {}, {} bytes; the redb file stored at {}, {} bytes)",
                    w.seq,
                    g.seq,
                    g.received_unix,
                    g.item.len(),
                    w.received_unix,
                    w.item.len()
                )));
            }
        }
        match want.last() {
            Some(last) if want.len() == VERIFY_PAGE => after = last.seq,
            _ => break,
        }
    }
    if from.queue_len(owner)? != to.queue_len(owner)? {
        return Err(MigrateError::Mismatch(format!(
            "the queue of {owner:?} counts a different length in Redis"
        )));
    }
    Ok(())
}
