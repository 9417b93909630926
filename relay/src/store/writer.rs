//! Group commit for the message queues.
//!
//! ```text
//!  send / ack handlers                           writer task (one per relay)
//!    QueueWriter::enqueue ─┐                    ┌─ take every waiting request
//!    QueueWriter::ack ─────┼─► bounded channel ─┤   (≤ MAX_BATCH_OPS ops,
//!    QueueWriter::enqueue ─┘                    │    ≤ MAX_BATCH_BYTES envelope bytes)
//!          ▲                                    ├─ Store::write_queue_batch on the
//!          │                                    │  blocking pool: one transaction,
//!          └──── each its own outcome ◄─────────┘  one fsync, then answer each request
//! ```
//!
//! While a batch commits, new requests wait in the channel; the next batch
//! takes all of them at once. A lone request is committed as soon as it
//! arrives: nothing waits on a timer for company, so an idle relay answers
//! as fast as one transaction per request.
//!
//! Each commit's duration (the transaction and its fsync, on the blocking
//! pool) is recorded in [`WriterTask::commit_latency`], the histogram
//! behind `/metrics`.
//!
//! A request is answered only after its batch has committed. If the commit
//! fails, every request in the batch gets the error
//! ([`StoreError::Batch`]): nothing is acknowledged that is not durable.
//!
//! The [`WriterTask`] belongs to [`Relay::run`](crate::Relay::run), which
//! stops it after the connections have drained: the channel is closed (late
//! requests are refused), what is queued is still committed, then the task
//! returns.

use std::sync::Arc;

use securechat_common::MessageId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Histogram, COMMIT_BUCKETS};

use super::{blocking, EnqueueOutcome, QueueLimits, QueueOp, QueueOutcome, Store, StoreError};

/// Most operations in one batch.
pub const MAX_BATCH_OPS: usize = 256;
/// Most envelope bytes in one batch (a single larger envelope still goes alone).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Requests that may wait for the writer before submitters are held back.
const CHANNEL_CAPACITY: usize = 4 * MAX_BATCH_OPS;

/// One request waiting for the writer.
struct Job {
    op: QueueOp,
    reply: oneshot::Sender<Result<QueueOutcome, StoreError>>,
}

/// Submits queue writes to the [`WriterTask`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct QueueWriter {
    jobs: mpsc::Sender<Job>,
}

/// The task that batches and commits what [`QueueWriter`]s submit; run it
/// with [`WriterTask::run`].
pub struct WriterTask {
    store: Arc<dyn Store>,
    jobs: mpsc::Receiver<Job>,
    limits: QueueLimits,
    commit_latency: Arc<Histogram>,
}

impl std::fmt::Debug for WriterTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterTask")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A writer for `store`, enforcing `limits` on every enqueue, and the task
/// that must run for its requests to be answered.
pub fn queue_writer(store: Arc<dyn Store>, limits: QueueLimits) -> (QueueWriter, WriterTask) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    (
        QueueWriter { jobs: tx },
        WriterTask {
            store,
            jobs: rx,
            limits,
            commit_latency: Arc::new(Histogram::new(&COMMIT_BUCKETS)),
        },
    )
}

impl QueueWriter {
    /// Queue an envelope from `sender` for `recipient` (see
    /// [`QueueOp::Enqueue`]); returns once the batch holding it has committed.
    pub async fn enqueue(
        &self,
        recipient: String,
        sender: String,
        id: MessageId,
        envelope: Vec<u8>,
        now: u64,
    ) -> Result<EnqueueOutcome, StoreError> {
        let op = QueueOp::Enqueue {
            recipient,
            sender,
            id,
            envelope,
            now,
        };
        match self.submit(op).await? {
            QueueOutcome::Enqueue(outcome) => Ok(outcome),
            other => Err(mismatch("an enqueue", other)),
        }
    }

    /// Delete an acknowledged message (see [`QueueOp::Ack`]); `false` if it
    /// was not queued. Returns once the batch holding it has committed.
    pub async fn ack(
        &self,
        recipient: String,
        id: MessageId,
        now: u64,
    ) -> Result<bool, StoreError> {
        match self.submit(QueueOp::Ack { recipient, id, now }).await? {
            QueueOutcome::Ack(removed) => Ok(removed),
            other => Err(mismatch("an ack", other)),
        }
    }

    async fn submit(&self, op: QueueOp) -> Result<QueueOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::Task("the queue writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Task("the queue writer stopped before answering".into()))?
    }
}

fn mismatch(what: &str, outcome: QueueOutcome) -> StoreError {
    StoreError::Task(format!("the store answered {what} with {outcome:?}"))
}

impl WriterTask {
    /// How long each batch took to commit durably; shared with whoever
    /// reports it.
    pub fn commit_latency(&self) -> Arc<Histogram> {
        Arc::clone(&self.commit_latency)
    }

    /// Commit batches until `stop` is cancelled, then refuse new requests,
    /// commit the ones already queued and return.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut carry: Option<Job> = None;
        let mut stopping = false;
        loop {
            let first = match carry.take() {
                Some(job) => job,
                None => tokio::select! {
                    job = self.jobs.recv() => match job {
                        Some(job) => job,
                        // Closed and empty: everything queued is answered.
                        None => break,
                    },
                    () = stop.cancelled(), if !stopping => {
                        stopping = true;
                        self.jobs.close();
                        continue;
                    }
                },
            };
            let (batch, next) = self.gather(first);
            carry = next;
            self.commit(batch).await;
        }
        tracing::debug!("queue writer stopped");
    }

    /// `first` and whatever else is waiting now, within the batch bounds;
    /// a request that would overflow the byte bound starts the next batch.
    fn gather(&mut self, first: Job) -> (Vec<Job>, Option<Job>) {
        let mut bytes = first.op.envelope_len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_OPS {
            let Ok(job) = self.jobs.try_recv() else {
                break;
            };
            let len = job.op.envelope_len();
            if bytes + len > MAX_BATCH_BYTES {
                return (batch, Some(job));
            }
            bytes += len;
            batch.push(job);
        }
        (batch, None)
    }

    /// Commit one batch and answer each of its requests.
    async fn commit(&self, batch: Vec<Job>) {
        let count = batch.len();
        let (ops, replies): (Vec<QueueOp>, Vec<_>) =
            batch.into_iter().map(|job| (job.op, job.reply)).unzip();
        let limits = self.limits;
        let started = std::time::Instant::now();
        let result = blocking(&self.store, move |s| s.write_queue_batch(&ops, limits)).await;
        self.commit_latency.observe(started.elapsed());
        let result = result.and_then(|outcomes| {
            if outcomes.len() == count {
                Ok(outcomes)
            } else {
                Err(StoreError::Task(format!(
                    "the store answered {} of {count} queue operations",
                    outcomes.len()
                )))
            }
        });
        match result {
            Ok(outcomes) => {
                tracing::trace!(ops = count, "queue batch committed");
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // The requester may be gone; its write stands regardless.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let cause = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Batch(Arc::clone(&cause))));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::RedbStore;

    const LIMITS: QueueLimits = QueueLimits {
        quota: crate::store::Quota {
            messages: 1000,
            bytes: 1 << 30,
        },
        sender_share_percent: 100,
    };

    /// Counts batches and fails them on demand, around a real store.
    struct Probe {
        inner: RedbStore,
        batches: AtomicUsize,
        ops: AtomicUsize,
        largest: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Probe {
        fn new(dir: &std::path::Path) -> Arc<Self> {
            Arc::new(Self {
                inner: RedbStore::open(&dir.join("relay.redb")).unwrap(),
                batches: AtomicUsize::new(0),
                ops: AtomicUsize::new(0),
                largest: AtomicUsize::new(0),
                fail: std::sync::atomic::AtomicBool::new(false),
            })
        }
    }

    /// Forwards everything to the inner store except the batch method.
    macro_rules! forward {
        ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
            fn $name(&self, $($arg: $ty),*) -> Result<$ret, StoreError> {
                self.inner.$name($($arg),*)
            }
        )*};
    }

    impl Store for Probe {
        forward! {
            login_lookup(username: &str) -> (Option<crate::store::Account>, Option<u64>);
            complete_login(
                username: &str,
                step: u64,
                token_hash: &[u8; 32],
                session: &crate::store::Session
            ) -> Option<u64>;
            resume_lookup(
                token_hash: &[u8; 32],
                username: &str
            ) -> (Option<crate::store::Session>, Option<crate::store::Account>);
            live_session_unread(token_hash: &[u8; 32], username: &str) -> Option<u64>;
            account(username: &str) -> Option<crate::store::Account>;
            directory(after: Option<&str>, limit: usize) -> crate::store::DirectoryPage;
            insert_pending(p: &crate::store::PendingRegistration, now: u64) -> bool;
            replace_pending(
                p: &crate::store::PendingRegistration,
                replaced: &[u8; 32],
                now: u64
            ) -> bool;
            pending(username: &str) -> Option<crate::store::PendingRegistration>;
            take_code_attempt(username: &str, now: u64, max: u32) -> crate::store::CodeAttempt;
            remove_pending(username: &str) -> ();
            activate(account: &crate::store::Account) -> bool;
            activate_pending(
                account: &crate::store::Account,
                activation: &crate::store::Activation
            ) -> bool;
            set_public_key(username: &str, key: &[u8]) -> ();
            accept_totp_step(username: &str, step: u64) -> bool;
            last_totp_step(username: &str) -> Option<u64>;
            put_session(hash: &[u8; 32], s: &crate::store::Session) -> ();
            session(hash: &[u8; 32]) -> Option<crate::store::Session>;
            remove_session(hash: &[u8; 32]) -> ();
            enqueue(
                r: &str,
                id: &MessageId,
                e: &[u8],
                now: u64,
                q: crate::store::Quota
            ) -> EnqueueOutcome;
            entries_after(r: &str, after: u64, limit: usize) -> Vec<crate::store::QueueEntry>;
            queued_after(r: &str, after: u64, limit: usize) -> Vec<crate::store::Queued>;
            queue_len(r: &str) -> u64;
            ack(r: &str, id: &MessageId, now: u64) -> bool;
            sweep(now: u64, retention: u64) -> crate::store::SweepStats;
            counts() -> crate::store::StoreCounts;
        }

        fn write_queue_batch(
            &self,
            ops: &[QueueOp],
            limits: QueueLimits,
        ) -> Result<Vec<QueueOutcome>, StoreError> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            self.ops.fetch_add(ops.len(), Ordering::SeqCst);
            self.largest.fetch_max(ops.len(), Ordering::SeqCst);
            // Long enough for the other requests to pile up behind it.
            std::thread::sleep(std::time::Duration::from_millis(20));
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Corrupt("injected failure".into()));
            }
            self.inner.write_queue_batch(ops, limits)
        }
    }

    fn account(name: &str) -> crate::store::Account {
        crate::store::Account {
            username: name.into(),
            email: format!("{name}@x.test"),
            password_phc: "phc".into(),
            public_key: vec![1],
            totp_secret: zeroize::Zeroizing::new(vec![4; 20]),
            created_unix: 1,
        }
    }

    fn start(probe: &Arc<Probe>) -> (QueueWriter, CancellationToken, tokio::task::JoinHandle<()>) {
        let store: Arc<dyn Store> = Arc::clone(probe) as Arc<dyn Store>;
        let (writer, task) = queue_writer(store, LIMITS);
        let stop = CancellationToken::new();
        let handle = tokio::spawn(task.run(stop.clone()));
        (writer, stop, handle)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_share_commits_and_each_gets_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let probe = Probe::new(dir.path());
        probe.inner.activate(&account("bob")).unwrap();
        let (writer, stop, handle) = start(&probe);

        let mut sends = tokio::task::JoinSet::new();
        for i in 0..100u8 {
            let writer = writer.clone();
            // Ids 0..50 twice each: one of every pair is a duplicate.
            let id = MessageId([i % 50; 16]);
            let to = if i == 99 { "nobody" } else { "bob" };
            sends.spawn(async move {
                (
                    i,
                    writer
                        .enqueue(to.into(), "alice".into(), id, vec![i; 10], 1)
                        .await,
                )
            });
        }
        let mut stored = 0;
        let mut duplicates = 0;
        while let Some(done) = sends.join_next().await {
            let (i, outcome) = done.unwrap();
            match outcome.unwrap() {
                EnqueueOutcome::Stored => stored += 1,
                EnqueueOutcome::Duplicate => duplicates += 1,
                EnqueueOutcome::UnknownRecipient => assert_eq!(i, 99),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((stored, duplicates), (50, 49));
        assert_eq!(probe.inner.queue_len("bob").unwrap(), 50);
        let batches = probe.batches.load(Ordering::SeqCst);
        assert!(batches < 100, "{batches} batches for 100 sends");
        assert!(probe.largest.load(Ordering::SeqCst) > 1);

        // Acks go through the same writer.
        assert!(writer
            .ack("bob".into(), MessageId([0; 16]), 2)
            .await
            .unwrap());
        assert!(!writer
            .ack("bob".into(), MessageId([0; 16]), 2)
            .await
            .unwrap());
        assert_eq!(probe.inner.queue_len("bob").unwrap(), 49);

        stop.cancel();
        handle.await.unwrap();
        let refused = writer.ack("bob".into(), MessageId([1; 16]), 3).await;
        assert!(matches!(refused, Err(StoreError::Task(_))), "{refused:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_fails_every_request_of_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let probe = Probe::new(dir.path());
        probe.inner.activate(&account("bob")).unwrap();
        probe.fail.store(true, Ordering::SeqCst);
        let (writer, stop, handle) = start(&probe);
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..20u8 {
            let writer = writer.clone();
            sends.spawn(async move {
                writer
                    .enqueue(
                        "bob".into(),
                        "alice".into(),
                        MessageId([i; 16]),
                        vec![i; 10],
                        1,
                    )
                    .await
            });
        }
        while let Some(done) = sends.join_next().await {
            let outcome = done.unwrap();
            assert!(matches!(outcome, Err(StoreError::Batch(_))), "{outcome:?}");
        }
        assert_eq!(probe.inner.queue_len("bob").unwrap(), 0);
        stop.cancel();
        handle.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_commits_what_is_already_queued() {
        let dir = tempfile::tempdir().unwrap();
        let probe = Probe::new(dir.path());
        probe.inner.activate(&account("bob")).unwrap();
        let (writer, stop, handle) = start(&probe);
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..20u8 {
            let writer = writer.clone();
            sends.spawn(async move {
                writer
                    .enqueue(
                        "bob".into(),
                        "alice".into(),
                        MessageId([i; 16]),
                        vec![i; 10],
                        1,
                    )
                    .await
            });
        }
        // Stop once every request is in a batch or waiting in the channel
        // (most of them wait: the first batch takes 20 ms).
        while CHANNEL_CAPACITY - writer.jobs.capacity() + probe.ops.load(Ordering::SeqCst) < 20 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        stop.cancel();
        handle.await.unwrap();
        while let Some(done) = sends.join_next().await {
            assert_eq!(done.unwrap().unwrap(), EnqueueOutcome::Stored);
        }
        assert_eq!(probe.inner.queue_len("bob").unwrap(), 20);
    }
}
