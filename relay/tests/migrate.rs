//! `relay migrate`: a redb store filled through the `Store` trait, moved
//! into a real redis-server, then read back and used through the trait; and
//! the `relay migrate` command as an operator runs it.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

use securechat_common::MessageId;
use securechat_relay::store::migrate::{migrate_redb_to_redis, MigrateError, Progress};
use securechat_relay::store::{
    Account, Activation, CodeAttempt, EnqueueOutcome, PendingRegistration, QueueLimits, QueueOp,
    QueueOutcome, Quota, RedbStore, RedisStore, Session, Store,
};
use securechat_testkit::redis::RedisServer;
use zeroize::Zeroizing;

const RELAY: &str = env!("CARGO_BIN_EXE_relay");

const NOW: u64 = 1_700_000_000;

/// 10 messages per queue, 5 of them from one sender.
const LIMITS: QueueLimits = QueueLimits {
    quota: Quota {
        messages: 10,
        bytes: 100_000,
    },
    sender_share_percent: 50,
};

const TOKEN: [u8; 32] = [9; 32];

fn account(name: &str) -> Account {
    Account {
        username: name.into(),
        email: format!("{name}@example.org"),
        password_phc: format!("$argon2id$v=19$m=19456,t=2,p=1$salt${name}"),
        public_key: name.bytes().chain([0, 1, 2]).collect(),
        totp_secret: Zeroizing::new(vec![name.len() as u8; 20]),
        created_unix: NOW - 100,
    }
}

fn pending(name: &str, code: u8) -> PendingRegistration {
    let a = account(name);
    PendingRegistration {
        username: a.username,
        email: a.email,
        password_phc: a.password_phc,
        public_key: a.public_key,
        code_hash: [code; 32],
        expires_unix: NOW + 600,
        attempts: 0,
    }
}

fn id(n: u8) -> MessageId {
    MessageId([n; 16])
}

/// A real envelope (the sweep reads its id to tell the sender), of a size
/// that differs with `n`.
fn envelope(sender: &str, recipient: &str, n: u8) -> Vec<u8> {
    let env = securechat_common::Envelope {
        version: 1,
        id: id(n),
        sender: sender.into(),
        kind: securechat_common::envelope::Kind::Direct,
        timestamp_ms: 1,
        slots: vec![securechat_common::envelope::Slot {
            name: recipient.into(),
            seq: 1,
            wrapped_key: vec![1; 256],
        }],
        other_slots: Vec::new(),
        nonce: [0; 12],
        ciphertext: vec![2; 32 + usize::from(n)],
        signature: vec![3; 256],
    };
    postcard::to_stdvec(&env).unwrap()
}

fn send(recipient: &str, sender: &str, n: u8) -> QueueOp {
    QueueOp::Enqueue {
        recipient: recipient.into(),
        sender: sender.into(),
        id: id(n),
        envelope: envelope(sender, recipient, n),
        now: NOW + u64::from(n),
    }
}

fn outcomes(store: &dyn Store, ops: &[QueueOp]) -> Vec<QueueOutcome> {
    store.write_queue_batch(ops, LIMITS).unwrap()
}

/// A relay's database with something of every kind: accounts alice, bob,
/// carol and erin (activated by code, not logged in yet), dave pending,
/// alice logged in (TOTP step, session), messages between them (one acked,
/// one queued without a sender).
fn fill(path: &Path) -> RedbStore {
    let store = RedbStore::open(path).unwrap();
    for name in ["alice", "bob", "carol"] {
        assert!(store.activate(&account(name)).unwrap());
    }
    assert!(store.insert_pending(&pending("dave", 4), NOW).unwrap());
    assert!(matches!(
        store.take_code_attempt("dave", NOW, 5).unwrap(),
        CodeAttempt::Counted(_)
    ));
    assert!(store.insert_pending(&pending("erin", 5), NOW).unwrap());
    let activation = Activation {
        code_hash: [5; 32],
        expires_unix: NOW + 600,
        attempts: 1,
    };
    assert!(store
        .activate_pending(&account("erin"), &activation)
        .unwrap());
    store
        .put_session(
            &TOKEN,
            &Session {
                username: "alice".into(),
                expires_unix: NOW + 3600,
            },
        )
        .unwrap();
    assert!(store.accept_totp_step("alice", 56_666_666).unwrap());
    let sent = outcomes(
        &store,
        &[
            send("bob", "alice", 1),
            send("bob", "alice", 2),
            send("carol", "alice", 3),
            send("bob", "carol", 4),
            QueueOp::Ack {
                recipient: "bob".into(),
                id: id(1),
                now: NOW + 50,
            },
        ],
    );
    assert!(sent[..4]
        .iter()
        .all(|o| *o == QueueOutcome::Enqueue(EnqueueOutcome::Stored)));
    assert_eq!(sent[4], QueueOutcome::Ack(true));
    let quota = LIMITS.quota;
    assert_eq!(
        store
            .enqueue("alice", &id(5), &envelope("tool", "alice", 5), NOW, quota)
            .unwrap(),
        EnqueueOutcome::Stored
    );
    store
}

fn migrate(from: &RedbStore, to: &RedisStore, force: bool) -> Result<Vec<String>, MigrateError> {
    let mut lines = Vec::new();
    migrate_redb_to_redis(from, to, force, |p| match p {
        Progress::Step(line) => lines.push(line.to_string()),
        Progress::Warning(line) => lines.push(format!("warning: {line}")),
        _ => {}
    })?;
    Ok(lines)
}

/// Both stores list the same entries for `owner`.
fn same_queue(a: &dyn Store, b: &dyn Store, owner: &str) {
    let a = a.entries_after(owner, 0, 1000).unwrap();
    let b = b.entries_after(owner, 0, 1000).unwrap();
    let key = |e: &securechat_relay::store::QueueEntry| (e.seq, e.received_unix, e.item.clone());
    assert_eq!(
        a.iter().map(key).collect::<Vec<_>>(),
        b.iter().map(key).collect::<Vec<_>>(),
        "{owner}'s queue"
    );
}

#[test]
fn everything_moves_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let redb = fill(&dir.path().join("relay.redb"));
    let server = RedisServer::start().unwrap();
    let redis = RedisStore::open(&server.url()).unwrap();

    let lines = migrate(&redb, &redis, false).unwrap();
    assert!(!lines.iter().any(|l| l.starts_with("warning")), "{lines:?}");
    assert!(lines.iter().any(|l| l == "accounts: 4"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("verified: 3 of 3 queues")),
        "{lines:?}"
    );
    // A fresh handle on the same Redis, as a relay started with --redis has.
    let redis = RedisStore::open(&server.url()).unwrap();

    // Accounts and the key directory.
    for name in ["alice", "bob", "carol", "erin"] {
        let (a, b) = (
            redb.account(name).unwrap().unwrap(),
            redis.account(name).unwrap().unwrap(),
        );
        assert_eq!(
            (
                a.username,
                a.email,
                a.password_phc,
                a.public_key,
                a.created_unix
            ),
            (
                b.username,
                b.email,
                b.password_phc,
                b.public_key,
                b.created_unix
            )
        );
        assert_eq!(*a.totp_secret, *b.totp_secret);
    }
    assert_eq!(
        redis.directory(None, 10).unwrap(),
        redb.directory(None, 10).unwrap()
    );
    assert_eq!(
        redis.directory(Some("bob"), 1).unwrap(),
        redb.directory(Some("bob"), 1).unwrap()
    );

    // Pending registration (with its counted attempt), activation, session,
    // TOTP step.
    let p = redis.pending("dave").unwrap().unwrap();
    assert_eq!(
        (p.email.as_str(), p.code_hash, p.expires_unix, p.attempts),
        ("dave@example.org", [4; 32], NOW + 600, 1)
    );
    assert!(redis.pending("erin").unwrap().is_none());
    match redis.take_code_attempt("erin", NOW, 5).unwrap() {
        CodeAttempt::Repeat {
            account,
            activation,
        } => {
            assert_eq!(account.username, "erin");
            assert_eq!(
                (
                    activation.code_hash,
                    activation.expires_unix,
                    activation.attempts
                ),
                ([5; 32], NOW + 600, 2)
            );
        }
        other => panic!("erin's activation did not move: {other:?}"),
    }
    let session = redis.session(&TOKEN).unwrap().unwrap();
    assert_eq!(
        (session.username.as_str(), session.expires_unix),
        ("alice", NOW + 3600)
    );
    assert_eq!(redis.last_totp_step("alice").unwrap(), Some(56_666_666));
    assert!(!redis.accept_totp_step("alice", 56_666_666).unwrap());
    assert_eq!(redis.last_totp_step("bob").unwrap(), None);

    // Queues and totals.
    for owner in ["alice", "bob", "carol", "erin"] {
        same_queue(&redb, &redis, owner);
        assert_eq!(
            redis.queue_len(owner).unwrap(),
            redb.queue_len(owner).unwrap()
        );
    }
    assert_eq!(redis.counts().unwrap(), redb.counts().unwrap());
    let bob_top = redb
        .entries_after("bob", 0, 100)
        .unwrap()
        .last()
        .unwrap()
        .seq;

    // The same sends and a sweep on both: the same answers. Ids 1 (acked)
    // and 2 (queued) are duplicates; alice holds 1 of her 5 in bob's queue.
    let more: Vec<QueueOp> = [1, 2, 10, 11, 12, 13, 14]
        .into_iter()
        .map(|n| send("bob", "alice", n))
        .collect();
    let answers = outcomes(&redis, &more);
    assert_eq!(answers, outcomes(&redb, &more));
    let e = |o| QueueOutcome::Enqueue(o);
    assert_eq!(
        answers,
        [
            e(EnqueueOutcome::Duplicate),
            e(EnqueueOutcome::Duplicate),
            e(EnqueueOutcome::Stored),
            e(EnqueueOutcome::Stored),
            e(EnqueueOutcome::Stored),
            e(EnqueueOutcome::Stored),
            e(EnqueueOutcome::SenderShareExceeded),
        ]
    );
    // New positions come after the moved ones, in order.
    let new = redis.queued_after("bob", bob_top, 100).unwrap();
    assert_eq!(
        new.iter().map(|q| q.id).collect::<Vec<_>>(),
        [id(10), id(11), id(12), id(13)]
    );
    assert!(new.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(new[0].seq > bob_top);
    assert_eq!(redis.counts().unwrap(), redb.counts().unwrap());

    // A sweep long after: every message expires, each sender is told, and
    // the dedupe index (delivered ids too) is swept: the moved queues are
    // known to the sweep.
    let later = NOW + 10_000;
    let swept = redis.sweep(later, 1000).unwrap();
    assert_eq!(swept, redb.sweep(later, 1000).unwrap());
    assert_eq!(swept.expired_messages, 8);
    assert_eq!(swept.expiry_notices, 7);
    assert_eq!(swept.expired_registrations, 1);
    assert_eq!(swept.expired_activations, 1);
    assert_eq!(swept.expired_sessions, 1);
    let resend = [send("bob", "alice", 1)];
    assert_eq!(outcomes(&redis, &resend), [e(EnqueueOutcome::Stored)]);
}

#[test]
fn refuses_a_redis_with_securechat_data_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let redb = fill(&dir.path().join("relay.redb"));
    let server = RedisServer::start().unwrap();
    let redis = RedisStore::open(&server.url()).unwrap();
    migrate(&redb, &redis, false).unwrap();
    let after_first = redis.counts().unwrap();

    let refused = migrate(&redb, &redis, false).unwrap_err();
    assert!(
        matches!(refused, MigrateError::NotEmpty { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("--force"), "{refused}");

    // Forced, the same data is written again: nothing is counted twice.
    let lines = migrate(&redb, &redis, true).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("already holds securechat data")),
        "{lines:?}"
    );
    assert_eq!(redis.counts().unwrap(), after_first);
    assert_eq!(redis.counts().unwrap(), redb.counts().unwrap());
    same_queue(&redb, &redis, "bob");
}

#[test]
fn warns_about_a_redis_that_may_lose_writes() {
    let dir = tempfile::tempdir().unwrap();
    let redb = fill(&dir.path().join("relay.redb"));
    let server = RedisServer::start_with(&["--appendfsync", "everysec"]).unwrap();
    let redis = RedisStore::open(&server.url()).unwrap();
    let lines = migrate(&redb, &redis, false).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("warning:") && l.contains("appendfsync")),
        "{lines:?}"
    );
    assert_eq!(redis.counts().unwrap(), redb.counts().unwrap());
}

#[test]
fn an_empty_database_moves_too() {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(&dir.path().join("relay.redb")).unwrap();
    let server = RedisServer::start().unwrap();
    let redis = RedisStore::open(&server.url()).unwrap();
    migrate(&redb, &redis, false).unwrap();
    assert_eq!(redis.counts().unwrap(), redb.counts().unwrap());
}

fn relay_migrate(from: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    Command::new(RELAY)
        .arg("migrate")
        .arg("--from-redb")
        .arg(from)
        .arg("--to-redis")
        .arg(url)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn the_command_moves_a_data_dir_and_refuses_a_second_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let db = data.join("relay.redb");
    let server = RedisServer::start().unwrap();

    // Missing database: says what to give.
    let out = relay_migrate(&dir.path().join("nowhere"), &server.url(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no relay database"), "{err}");

    // A running relay holds the file: stop it first.
    let held = fill(&db);
    let out = relay_migrate(&data, &server.url(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stop the relay first"), "{err}");
    let expected = held.counts().unwrap();
    drop(held);

    let out = relay_migrate(&data, &server.url(), &[]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for line in [
        "accounts: 4",
        "pending registrations: 1",
        "sessions: 1",
        &format!(
            "queued messages: {} ({} bytes)",
            expected.queued_messages, expected.queued_bytes
        ),
        "verified: the counts match; 3 of 3 queues",
        "--redis",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(!stderr.contains("warning"), "{stderr}");
    let redis = RedisStore::open(&server.url()).unwrap();
    assert_eq!(redis.counts().unwrap(), expected);

    // Again (the file itself this time): refused, nothing written.
    let out = relay_migrate(&db, &server.url(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds securechat data"), "{err}");
    assert!(err.contains("--force"), "{err}");

    let out = relay_migrate(&db, &server.url(), &["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(redis.counts().unwrap(), expected);
}

#[test]
fn help_says_to_stop_the_relay_and_what_comes_next() {
    let out = Command::new(RELAY)
        .args(["migrate", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for text in [
        "--from-redb",
        "--to-redis",
        "--force",
        "Stop the relay first",
        "--redis URL",
    ] {
        assert!(help.contains(text), "no {text:?} in:\n{help}");
    }
}
