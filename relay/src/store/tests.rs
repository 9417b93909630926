//! The store test suite, run against both backends: redb on real database
//! files, and Redis on a real redis-server (one per test, AOF fsync always).

use super::*;
use zeroize::Zeroizing;

const QUOTA: Quota = Quota {
    messages: 3,
    bytes: 10_000,
};

/// Which backend the tests of this thread open (set by [`suite!`]'s wrappers).
#[derive(Clone, Copy)]
enum Backend {
    Redb,
    Redis,
}

thread_local! {
    static BACKEND: std::cell::Cell<Backend> = const { std::cell::Cell::new(Backend::Redb) };
}

/// A store of this thread's backend on a fresh database (a file, or a
/// redis-server of its own), with what the tests look at behind its back.
struct Db {
    /// `None` only while reopening.
    inner: Option<Inner>,
    place: Place,
}

enum Inner {
    Redb(RedbStore),
    Redis(RedisStore),
}

enum Place {
    Redb(tempfile::TempDir),
    Redis(securechat_testkit::redis::RedisServer),
}

fn open() -> Db {
    match BACKEND.get() {
        Backend::Redb => {
            let dir = tempfile::tempdir().unwrap();
            let store = RedbStore::open(&dir.path().join("relay.redb")).unwrap();
            Db {
                inner: Some(Inner::Redb(store)),
                place: Place::Redb(dir),
            }
        }
        Backend::Redis => {
            let server = securechat_testkit::redis::RedisServer::start().unwrap();
            let store = RedisStore::open(&server.url()).unwrap();
            Db {
                inner: Some(Inner::Redis(store)),
                place: Place::Redis(server),
            }
        }
    }
}

impl std::ops::Deref for Db {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        match self.inner.as_ref().unwrap() {
            Inner::Redb(store) => store,
            Inner::Redis(store) => store,
        }
    }
}

impl Db {
    /// Close the store and open it again on the same data (Redis is
    /// restarted with SIGKILL: what comes back is what its AOF had).
    fn reopen(&mut self) {
        self.inner = None;
        self.inner = Some(match &mut self.place {
            Place::Redb(dir) => {
                Inner::Redb(RedbStore::open(&dir.path().join("relay.redb")).unwrap())
            }
            Place::Redis(server) => {
                server.restart().unwrap();
                Inner::Redis(RedisStore::open(&server.url()).unwrap())
            }
        });
    }

    fn redis(&self) -> ::redis::Connection {
        let Place::Redis(server) = &self.place else {
            panic!("not a Redis store");
        };
        ::redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Per-(recipient, sender) counts, as the share check sees them.
    fn held(&self, recipient: &str, sender: &str) -> (u64, u64) {
        match &self.place {
            Place::Redb(_) => match self.inner.as_ref().unwrap() {
                Inner::Redb(store) => store.held_by(recipient, sender),
                Inner::Redis(_) => unreachable!(),
            },
            Place::Redis(_) => {
                let mut con = self.redis();
                let get = |suffix: &str, con: &mut ::redis::Connection| -> u64 {
                    ::redis::cmd("HGET")
                        .arg(format!("sc:{{{recipient}}}:{suffix}"))
                        .arg(sender)
                        .query::<Option<u64>>(con)
                        .unwrap()
                        .unwrap_or(0)
                };
                (get("shm", &mut con), get("shb", &mut con))
            }
        }
    }

    /// Put raw bytes in `owner`'s queue at `seq`, as an older relay did.
    fn insert_raw(&self, owner: &str, seq: u64, stored: u64, item: &[u8]) {
        match &self.place {
            Place::Redb(_) => match self.inner.as_ref().unwrap() {
                Inner::Redb(store) => store.insert_raw(owner, seq, stored, item),
                Inner::Redis(_) => unreachable!(),
            },
            Place::Redis(_) => {
                let mut con = self.redis();
                let k = |s: &str| format!("sc:{{{owner}}}:{s}");
                ::redis::pipe()
                    .cmd("ZADD")
                    .arg(k("q"))
                    .arg(seq)
                    .arg(seq)
                    .ignore()
                    .cmd("HSET")
                    .arg(k("qv"))
                    .arg(seq)
                    .arg(item)
                    .ignore()
                    .cmd("ZADD")
                    .arg(k("qt"))
                    .arg(stored)
                    .arg(seq)
                    .ignore()
                    .cmd("SADD")
                    .arg("sc:owners")
                    .arg(owner)
                    .ignore()
                    .cmd("HINCRBY")
                    .arg(k("tot"))
                    .arg("m")
                    .arg(1)
                    .ignore()
                    .cmd("HINCRBY")
                    .arg(k("tot"))
                    .arg("b")
                    .arg(item.len())
                    .ignore()
                    .cmd("HINCRBY")
                    .arg("sc:totals")
                    .arg("m")
                    .arg(1)
                    .ignore()
                    .cmd("HINCRBY")
                    .arg("sc:totals")
                    .arg("b")
                    .arg(item.len())
                    .ignore()
                    .query::<()>(&mut con)
                    .unwrap();
            }
        }
    }
}

fn envelope(id: MessageId) -> Vec<u8> {
    let env = securechat_common::Envelope {
        version: 1,
        id,
        sender: "alice".into(),
        kind: securechat_common::envelope::Kind::Direct,
        timestamp_ms: 1,
        slots: vec![securechat_common::envelope::Slot {
            name: "bob".into(),
            seq: 1,
            wrapped_key: vec![1; 256],
        }],
        other_slots: Vec::new(),
        nonce: [0; 12],
        ciphertext: vec![2; 32],
        signature: vec![3; 256],
    };
    postcard::to_stdvec(&env).unwrap()
}

/// The bytes one envelope from [`envelope`] takes in a queue (and counts
/// for the byte quota): the envelope in its [`QueueItem`].
fn stored_len(id: MessageId) -> u64 {
    QueueItem::Envelope(envelope(id)).encode().unwrap().len() as u64
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

fn pending_registration_holds_the_name_until_it_expires() {
    let store = open();
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

fn code_attempts_are_counted_then_locked_and_expire() {
    let store = open();
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

fn totp_steps_are_accepted_once_and_only_forward() {
    let store = open();
    assert_eq!(store.last_totp_step("alice").unwrap(), None);
    assert!(store.accept_totp_step("alice", 10).unwrap());
    assert!(!store.accept_totp_step("alice", 10).unwrap());
    assert!(!store.accept_totp_step("alice", 9).unwrap());
    assert_eq!(store.last_totp_step("alice").unwrap(), Some(10));
    assert!(store.accept_totp_step("alice", 11).unwrap());
    assert!(store.accept_totp_step("bob", 10).unwrap());
    assert_eq!(store.last_totp_step("alice").unwrap(), Some(11));
}

fn queue_dedupes_limits_acks_and_survives_reopen() {
    let mut store = open();
    let ids: Vec<MessageId> = (1..=4u8).map(|i| MessageId([i; 16])).collect();
    {
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
        assert_eq!(full, EnqueueOutcome::QuotaExceeded);
        assert_eq!(store.queue_len("bob").unwrap(), 3);
        assert_eq!(store.queue_len("alice").unwrap(), 0);
    }
    store.reopen();
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

fn send(to: &str, id: MessageId, now: u64) -> QueueOp {
    send_from("alice", to, id, now)
}

fn send_from(from: &str, to: &str, id: MessageId, now: u64) -> QueueOp {
    QueueOp::Enqueue {
        recipient: to.into(),
        sender: from.into(),
        id,
        envelope: envelope(id),
        now,
    }
}

fn ack(to: &str, id: MessageId, now: u64) -> QueueOp {
    QueueOp::Ack {
        recipient: to.into(),
        id,
        now,
    }
}

fn a_batch_applies_its_ops_in_order_with_mixed_outcomes() {
    let mut store = open();
    let ids: Vec<MessageId> = (1..=6u8).map(|i| MessageId([i; 16])).collect();
    let stored = EnqueueOutcome::Stored;
    {
        store.activate(&account("bob")).unwrap();
        store.activate(&account("carol")).unwrap();
        // One already queued for bob before the batch.
        store
            .enqueue("bob", &ids[0], &envelope(ids[0]), 5, QUOTA)
            .unwrap();
        let ops = [
            send("bob", ids[1], 10),
            send("bob", ids[1], 10),    // duplicate within the batch
            send("bob", ids[0], 10),    // duplicate of an earlier commit
            send("nobody", ids[2], 10), // no such account
            send("carol", ids[2], 10),  // same id, another queue
            send("bob", ids[2], 10),    // bob's third: quota is 3
            send("bob", ids[3], 10),    // crosses the quota mid-batch
            ack("bob", ids[0], 11),     // frees one place...
            send("bob", ids[4], 12),    // ...which the next send takes
            ack("bob", ids[0], 12),     // acked already in this batch
            ack("carol", ids[5], 12),   // never queued
        ];
        let outcomes = store
            .write_queue_batch(&ops, QueueLimits::quota_only(QUOTA))
            .unwrap();
        use QueueOutcome::{Ack, Enqueue};
        assert_eq!(
            outcomes,
            [
                Enqueue(stored),
                Enqueue(EnqueueOutcome::Duplicate),
                Enqueue(EnqueueOutcome::Duplicate),
                Enqueue(EnqueueOutcome::UnknownRecipient),
                Enqueue(stored),
                Enqueue(stored),
                Enqueue(EnqueueOutcome::QuotaExceeded),
                Ack(true),
                Enqueue(stored),
                Ack(false),
                Ack(false),
            ]
        );
    }
    // Durable: the same state after reopening.
    store.reopen();
    let bob = store.queued_after("bob", 0, 10).unwrap();
    assert_eq!(
        bob.iter().map(|q| q.id).collect::<Vec<_>>(),
        [ids[1], ids[2], ids[4]]
    );
    let carol = store.queued_after("carol", 0, 10).unwrap();
    assert_eq!(carol.iter().map(|q| q.id).collect::<Vec<_>>(), [ids[2]]);
    assert_eq!(store.queue_len("nobody").unwrap(), 0);
    let counts = store.counts().unwrap();
    assert_eq!(counts.queued_messages, 4);
    assert_eq!(counts.queued_bytes, 4 * stored_len(ids[0]));
    // Positions in a queue keep growing across batches.
    let out = store
        .write_queue_batch(&[send("carol", ids[3], 20)], QueueLimits::quota_only(QUOTA))
        .unwrap();
    assert_eq!(out, [QueueOutcome::Enqueue(stored)]);
    let carol = store.queued_after("carol", 0, 10).unwrap();
    assert!(carol[1].seq > carol[0].seq);
}

fn a_batch_counts_the_byte_quota_across_its_envelopes() {
    let store = open();
    store.activate(&account("bob")).unwrap();
    let ids: Vec<MessageId> = (1..=3u8).map(|i| MessageId([i; 16])).collect();
    let size = stored_len(ids[0]);
    let quota = Quota {
        messages: 100,
        bytes: 2 * size + 1,
    };
    let ops: Vec<QueueOp> = ids.iter().map(|id| send("bob", *id, 1)).collect();
    let outcomes = store
        .write_queue_batch(&ops, QueueLimits::quota_only(quota))
        .unwrap();
    assert_eq!(
        outcomes[2],
        QueueOutcome::Enqueue(EnqueueOutcome::QuotaExceeded)
    );
    assert_eq!(store.queue_len("bob").unwrap(), 2);
}

fn a_batch_that_changes_nothing_and_an_empty_batch_are_fine() {
    let store = open();
    let id = MessageId([1; 16]);
    assert!(store
        .write_queue_batch(&[], QueueLimits::quota_only(QUOTA))
        .unwrap()
        .is_empty());
    let out = store
        .write_queue_batch(
            &[send("nobody", id, 1), ack("nobody", id, 1)],
            QueueLimits::quota_only(QUOTA),
        )
        .unwrap();
    assert_eq!(
        out,
        [
            QueueOutcome::Enqueue(EnqueueOutcome::UnknownRecipient),
            QueueOutcome::Ack(false)
        ]
    );
    assert_eq!(store.counts().unwrap(), StoreCounts::default());
}

fn byte_quota_counts_envelope_sizes() {
    let store = open();
    let id = MessageId([1; 16]);
    let small = Quota {
        messages: 100,
        bytes: 10,
    };
    let out = store.enqueue("bob", &id, &envelope(id), 1, small).unwrap();
    assert_eq!(out, EnqueueOutcome::QuotaExceeded);
    assert_eq!(store.counts().unwrap().queued_messages, 0);
}

fn sweep_removes_what_has_expired_only() {
    let store = open();
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
            expired_activations: 0,
            expired_sessions: 1,
            // Queued without a sender (the tools' way): nobody to tell.
            expiry_notices: 0,
            notified: Vec::new(),
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

fn sessions_and_keys() {
    let store = open();
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

fn one_sender_fills_only_its_share_of_a_queue() {
    let store = open();
    store.activate(&account("bob")).unwrap();
    // A quota of 4 messages, half of it per sender.
    let limits = QueueLimits {
        quota: Quota {
            messages: 4,
            bytes: 1 << 20,
        },
        sender_share_percent: 50,
    };
    assert_eq!(limits.sender_quota().messages, 2);
    let ids: Vec<MessageId> = (1..=8u8).map(|i| MessageId([i; 16])).collect();
    let size = stored_len(ids[0]);
    use EnqueueOutcome::{Duplicate, QuotaExceeded, SenderShareExceeded, Stored};
    use QueueOutcome::{Ack, Enqueue};
    let ops = [
        send_from("mallory", "bob", ids[0], 1),
        send_from("mallory", "bob", ids[1], 1),
        send_from("mallory", "bob", ids[2], 1), // past mallory's half
        send_from("mallory", "bob", ids[0], 1), // a duplicate adds nothing
        send_from("alice", "bob", ids[3], 1),   // others still get in
        send_from("mallory", "carol", ids[4], 1),
    ];
    let out = store.write_queue_batch(&ops, limits).unwrap();
    assert_eq!(
        out,
        [
            Enqueue(Stored),
            Enqueue(Stored),
            Enqueue(SenderShareExceeded),
            Enqueue(Duplicate),
            Enqueue(Stored),
            Enqueue(EnqueueOutcome::UnknownRecipient),
        ]
    );
    assert_eq!(store.held("bob", "mallory"), (2, 2 * size));
    assert_eq!(store.held("bob", "alice"), (1, size));

    // An ack frees a place in its sender's share (and only there).
    let out = store
        .write_queue_batch(
            &[
                ack("bob", ids[0], 2),
                send_from("mallory", "bob", ids[5], 2),
                send_from("mallory", "bob", ids[6], 2),
            ],
            limits,
        )
        .unwrap();
    assert_eq!(
        out,
        [Ack(true), Enqueue(Stored), Enqueue(SenderShareExceeded)]
    );
    assert_eq!(store.held("bob", "mallory"), (2, 2 * size));

    // The whole quota still holds: alice's second fills it, and the next,
    // from someone with nothing queued, is refused for the queue.
    let out = store
        .write_queue_batch(
            &[
                send_from("alice", "bob", ids[6], 3),
                send_from("dave", "bob", ids[7], 3),
            ],
            limits,
        )
        .unwrap();
    assert_eq!(out, [Enqueue(Stored), Enqueue(QuotaExceeded)]);

    // A message queued without a sender counts for the queue only, and its
    // ack takes nothing from anyone's share.
    let other = open();
    let id = MessageId([9; 16]);
    other
        .enqueue("bob", &id, &envelope(id), 1, limits.quota)
        .unwrap();
    assert!(other.ack("bob", &id, 2).unwrap());
    assert_eq!(other.held("bob", "mallory"), (0, 0));

    // Byte shares count too.
    let bytes = open();
    bytes.activate(&account("bob")).unwrap();
    let by_bytes = QueueLimits {
        quota: Quota {
            messages: 100,
            bytes: 4 * size,
        },
        sender_share_percent: 50,
    };
    let out = bytes
        .write_queue_batch(
            &[
                send_from("mallory", "bob", ids[0], 1),
                send_from("mallory", "bob", ids[1], 1),
                send_from("mallory", "bob", ids[2], 1),
            ],
            by_bytes,
        )
        .unwrap();
    assert_eq!(out[2], Enqueue(SenderShareExceeded));
}

fn the_sweep_gives_back_the_shares_of_expired_messages() {
    let store = open();
    store.activate(&account("bob")).unwrap();
    let limits = QueueLimits {
        quota: Quota {
            messages: 2,
            bytes: 1 << 20,
        },
        sender_share_percent: 50,
    };
    let (old, new) = (MessageId([1; 16]), MessageId([2; 16]));
    let out = store
        .write_queue_batch(&[send_from("mallory", "bob", old, 100)], limits)
        .unwrap();
    assert_eq!(out, [QueueOutcome::Enqueue(EnqueueOutcome::Stored)]);
    let out = store
        .write_queue_batch(&[send_from("mallory", "bob", new, 900)], limits)
        .unwrap();
    assert_eq!(
        out,
        [QueueOutcome::Enqueue(EnqueueOutcome::SenderShareExceeded)]
    );
    assert_eq!(store.sweep(1000, 500).unwrap().expired_messages, 1);
    assert_eq!(store.held("bob", "mallory"), (0, 0));
    let out = store
        .write_queue_batch(&[send_from("mallory", "bob", new, 1000)], limits)
        .unwrap();
    assert_eq!(out, [QueueOutcome::Enqueue(EnqueueOutcome::Stored)]);
    assert_eq!(store.held("bob", "mallory").0, 1);
}

fn shares_are_at_least_one_and_at_most_the_quota() {
    let quota = Quota {
        messages: 3,
        bytes: u64::MAX,
    };
    let share = |percent| {
        QueueLimits {
            quota,
            sender_share_percent: percent,
        }
        .sender_quota()
    };
    assert_eq!(share(50).messages, 1);
    assert_eq!(share(0).messages, 1, "clamped to 1 %, at least one");
    assert_eq!(share(100), quota);
    assert_eq!(share(200), quota, "clamped to 100 %");
    assert_eq!(share(50).bytes, u64::MAX / 2);
}

fn the_directory_pages_through_active_accounts_in_name_order() {
    let store = open();
    assert_eq!(store.directory(None, 2).unwrap(), DirectoryPage::default());
    for name in ["dave", "alice", "carol", "bob", "erin"] {
        store.activate(&account(name)).unwrap();
    }
    // Pending registrations are not in the directory.
    store.insert_pending(&pending("aaron", 5000), 0).unwrap();
    let names = |page: &DirectoryPage| {
        page.users
            .iter()
            .map(|u| u.username.clone())
            .collect::<Vec<_>>()
    };
    let first = store.directory(None, 2).unwrap();
    assert_eq!(names(&first), ["alice", "bob"]);
    assert!(first.more);
    assert_eq!(first.users[0].public_key, account("alice").public_key);
    let second = store.directory(Some("bob"), 2).unwrap();
    assert_eq!(names(&second), ["carol", "dave"]);
    assert!(second.more);
    // The last page is exactly full: nothing follows it.
    let last = store.directory(Some("dave"), 1).unwrap();
    assert_eq!(names(&last), ["erin"]);
    assert!(!last.more);
    // `after` need not be a name that exists.
    let from_b = store.directory(Some("bz"), 10).unwrap();
    assert_eq!(names(&from_b), ["carol", "dave", "erin"]);
    assert!(!from_b.more);
    assert_eq!(
        store.directory(Some("erin"), 10).unwrap(),
        DirectoryPage::default()
    );
}

/// The entries of `owner`'s queue, decoded.
fn items(store: &Db, owner: &str) -> Vec<(u64, QueueItem)> {
    store
        .entries_after(owner, 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| (e.received_unix, QueueItem::decode(&e.item).unwrap()))
        .collect()
}

fn the_sweep_tells_senders_of_expired_messages_in_their_queue() {
    let store = open();
    for name in ["alice", "bob", "carol"] {
        store.activate(&account(name)).unwrap();
    }
    let limits = QueueLimits {
        quota: QUOTA,
        sender_share_percent: 100,
    };
    let [lost, ghostly, untold, fresh] = [1u8, 2, 3, 4].map(|i| MessageId([i; 16]));
    let out = store
        .write_queue_batch(
            &[
                send_from("alice", "bob", lost, 100),
                // A sender whose account is gone by the sweep.
                send_from("ghost", "bob", ghostly, 100),
                send_from("alice", "carol", fresh, 900),
            ],
            limits,
        )
        .unwrap();
    assert!(out
        .iter()
        .all(|o| *o == QueueOutcome::Enqueue(EnqueueOutcome::Stored)));
    // Queued without a sender: nobody to tell.
    store
        .enqueue("bob", &untold, &envelope(untold), 100, QUOTA)
        .unwrap();
    let lost_seq = store.queued_after("bob", 0, 10).unwrap()[0].seq;

    let stats = store.sweep(1000, 500).unwrap();
    assert_eq!(stats.expired_messages, 3);
    assert_eq!(stats.expiry_notices, 1);
    assert_eq!(stats.notified, ["alice"]);
    assert_eq!(store.queue_len("bob").unwrap(), 0);
    assert_eq!(store.held("bob", "alice"), (0, 0));

    // Alice's queue holds the notice, stored now, acknowledged by its own id.
    let notice = ExpiredNotice {
        notice: ExpiredNotice::id_for(&lost, "bob", lost_seq),
        id: lost,
        recipient: "bob".into(),
        stored_unix: 100,
    };
    assert_eq!(
        items(&store, "alice"),
        [(1000, QueueItem::Expired(notice.clone()))]
    );
    assert_eq!(store.queue_len("alice").unwrap(), 1);
    assert!(
        store.queued_after("alice", 0, 10).unwrap().is_empty(),
        "messages only"
    );
    // It counts against nobody's share in alice's queue, and carol's
    // message from alice is untouched.
    assert_eq!(store.held("alice", "alice"), (0, 0));
    assert_eq!(store.queue_len("carol").unwrap(), 1);
    assert!(
        !store.ack("alice", &lost, 1001).unwrap(),
        "not by the message id"
    );
    assert!(store.ack("alice", &notice.notice, 1001).unwrap());
    assert!(items(&store, "alice").is_empty());
    assert_eq!(store.counts().unwrap().queued_messages, 1);

    // A notice that expires in turn is dropped without a notice.
    let again = MessageId([5; 16]);
    store
        .write_queue_batch(&[send_from("carol", "bob", again, 1000)], limits)
        .unwrap();
    // (alice's message to carol expires now too.)
    let stats = store.sweep(2000, 500).unwrap();
    assert_eq!((stats.expired_messages, stats.expiry_notices), (2, 2));
    assert_eq!(stats.notified, ["alice", "carol"]);
    assert_eq!(items(&store, "carol").len(), 1);
    let stats = store.sweep(3000, 500).unwrap();
    assert_eq!((stats.expired_messages, stats.expiry_notices), (2, 0));
    assert!(stats.notified.is_empty());
    assert_eq!(
        store.counts().unwrap(),
        StoreCounts {
            accounts: 3,
            ..StoreCounts::default()
        }
    );
}

fn entries_of_an_older_relay_are_listed_but_do_not_decode() {
    let store = open();
    // Bare envelopes, as queued before notices existed: version 3, and
    // the version 1 of the test envelope, whose first byte is a variant
    // of QueueItem (what follows is not a whole notice).
    let id = MessageId([1; 16]);
    let mut current: securechat_common::Envelope = postcard::from_bytes(&envelope(id)).unwrap();
    current.version = 3;
    let current = postcard::to_stdvec(&current).unwrap();
    store.insert_raw("bob", 1, 10, &envelope(id));
    store.insert_raw("bob", 2, 10, &current);
    let entries = store.entries_after("bob", 0, 10).unwrap();
    assert_eq!(entries.len(), 2);
    for entry in &entries {
        assert!(QueueItem::decode(&entry.item).is_err());
    }
    assert!(store.queued_after("bob", 0, 10).is_err());
    // The sweep removes them like any other.
    assert_eq!(store.sweep(1000, 500).unwrap().expired_messages, 2);
}

fn ack_many_deletes_a_batch_in_one_commit_that_survives_reopen() {
    let mut store = open();
    let ids: Vec<MessageId> = (1..=3u8).map(|i| MessageId([i; 16])).collect();
    {
        for id in &ids {
            store.enqueue("bob", id, &envelope(*id), 10, QUOTA).unwrap();
        }
        // An id twice, one never queued, one of another user's name: each
        // answered as a lone ack would be.
        let batch = [ids[0], ids[1], ids[0], MessageId([9; 16])];
        assert_eq!(
            store.ack_many("bob", &batch, 20).unwrap(),
            [true, true, false, false]
        );
        assert_eq!(store.ack_many("alice", &ids[2..], 20).unwrap(), [false]);
        assert!(store.ack_many("bob", &[], 20).unwrap().is_empty());
    }
    store.reopen();
    assert_eq!(store.queue_len("bob").unwrap(), 1);
    let left = store.queued_after("bob", 0, 10).unwrap();
    assert_eq!(left.iter().map(|q| q.id).collect::<Vec<_>>(), [ids[2]]);
    // Acked ids stay known for dedupe, as with single acks.
    let again = store
        .enqueue("bob", &ids[0], &envelope(ids[0]), 30, QUOTA)
        .unwrap();
    assert_eq!(again, EnqueueOutcome::Duplicate);
}

fn a_login_and_a_resume_are_one_transaction_each() {
    let store = open();
    assert!(matches!(store.login_lookup("alice").unwrap(), (None, None)));
    store.activate(&account("alice")).unwrap();
    let (found, step) = store.login_lookup("alice").unwrap();
    assert_eq!(found.unwrap().username, "alice");
    assert_eq!(step, None);

    let id = MessageId([1; 16]);
    store
        .enqueue("alice", &id, &envelope(id), 10, QUOTA)
        .unwrap();
    let session = Session {
        username: "alice".into(),
        expires_unix: 100,
    };
    assert_eq!(
        store
            .complete_login("alice", 7, &[1; 32], &session)
            .unwrap(),
        Some(1),
        "the step is recorded, the session stored, the queue counted"
    );
    assert_eq!(store.login_lookup("alice").unwrap().1, Some(7));
    // The same step again (through any relay) changes nothing.
    assert_eq!(
        store
            .complete_login("alice", 7, &[2; 32], &session)
            .unwrap(),
        None
    );
    assert!(store.session(&[2; 32]).unwrap().is_none());

    let (found_session, found_account) = store.resume_lookup(&[1; 32], "alice").unwrap();
    assert_eq!(found_session.unwrap().expires_unix, 100);
    assert_eq!(found_account.unwrap().username, "alice");
    assert!(matches!(
        store.resume_lookup(&[3; 32], "nobody").unwrap(),
        (None, None)
    ));

    assert_eq!(
        store.live_session_unread(&[1; 32], "alice").unwrap(),
        Some(1)
    );
    store.remove_session(&[1; 32]).unwrap();
    assert_eq!(store.live_session_unread(&[1; 32], "alice").unwrap(), None);
}

/// Each test above, once per backend.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(#[test]
            fn $name() {
                super::BACKEND.set(super::Backend::Redb);
                super::$name();
            })*
        }
        mod redis {
            $(#[test]
            fn $name() {
                super::BACKEND.set(super::Backend::Redis);
                super::$name();
            })*
        }
    };
}

suite!(
    a_login_and_a_resume_are_one_transaction_each,
    pending_registration_holds_the_name_until_it_expires,
    code_attempts_are_counted_then_locked_and_expire,
    totp_steps_are_accepted_once_and_only_forward,
    queue_dedupes_limits_acks_and_survives_reopen,
    a_batch_applies_its_ops_in_order_with_mixed_outcomes,
    a_batch_counts_the_byte_quota_across_its_envelopes,
    a_batch_that_changes_nothing_and_an_empty_batch_are_fine,
    byte_quota_counts_envelope_sizes,
    sweep_removes_what_has_expired_only,
    sessions_and_keys,
    one_sender_fills_only_its_share_of_a_queue,
    the_sweep_gives_back_the_shares_of_expired_messages,
    shares_are_at_least_one_and_at_most_the_quota,
    the_directory_pages_through_active_accounts_in_name_order,
    the_sweep_tells_senders_of_expired_messages_in_their_queue,
    entries_of_an_older_relay_are_listed_but_do_not_decode,
    ack_many_deletes_a_batch_in_one_commit_that_survives_reopen,
);
