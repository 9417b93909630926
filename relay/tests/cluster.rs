//! Two relays on one Redis (a real redis-server on a loopback port), through
//! the real QUIC client:
//!
//! * a message sent through relay A to a user logged in on relay B is
//!   pushed to them at once, and the other way round;
//! * `online`, watchers and the status counts see the users of both relays;
//! * a login on B supersedes the same user's connection on A;
//! * a TOTP code used through A is refused through B;
//! * a sender's rate limit counts the sends through both relays;
//! * a relay refuses a Redis that does not fsync every write, unless told.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use securechat_client::relay::{PushStream, RelayClient};
use securechat_common::protocol::{ErrorCode, Push, Request, Response};
use securechat_relay::ratelimit::Limit;
use securechat_relay::Config;
use securechat_testkit::redis::RedisServer;
use securechat_testkit::relay::test_config;
use securechat_testkit::{error_code, http_get, SmtpServer, TestRelay, TestUser};

const WAIT: Duration = Duration::from_secs(15);

/// Two relays on one Redis, with a mail server each.
struct Pair {
    redis: RedisServer,
    a: TestRelay,
    b: TestRelay,
    smtp_a: SmtpServer,
    _dirs: [tempfile::TempDir; 2],
}

async fn relay_on(
    redis: &RedisServer,
    dir: &tempfile::TempDir,
    smtp: &SmtpServer,
    tune: impl Fn(&mut Config),
) -> TestRelay {
    let mut c: Config = test_config(dir.path(), Some(smtp));
    c.redis = Some(redis.url());
    tune(&mut c);
    TestRelay::start(c).await.unwrap()
}

impl Pair {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Two relays whose configs `tune` changes alike.
    async fn start_with(tune: impl Fn(&mut Config)) -> Self {
        let redis = RedisServer::start().unwrap();
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let smtp_a = SmtpServer::start().unwrap();
        let smtp_b = SmtpServer::start().unwrap();
        let a = relay_on(&redis, &dirs[0], &smtp_a, &tune).await;
        let b = relay_on(&redis, &dirs[1], &smtp_b, &tune).await;
        drop(smtp_b);
        Pair {
            redis,
            a,
            b,
            smtp_a,
            _dirs: dirs,
        }
    }

    /// `name` registered through relay A.
    async fn user(&self, name: &str) -> TestUser {
        let mut user = TestUser::new(name).unwrap();
        let setup = self.a.connect().await.unwrap();
        user.register(&setup, &self.smtp_a).await.unwrap();
        setup.close("set up").await;
        user
    }
}

async fn pushes(client: &RelayClient) -> PushStream {
    tokio::time::timeout(WAIT, client.accept_pushes())
        .await
        .expect("a push stream within the wait")
        .unwrap()
}

async fn next_push(pushes: &mut PushStream) -> Push {
    tokio::time::timeout(WAIT, pushes.next())
        .await
        .expect("a push within the wait")
        .expect("push stream open")
        .expect("a valid push frame")
}

/// The next push that is not a presence change.
async fn next_message(pushes: &mut PushStream) -> Push {
    loop {
        match next_push(pushes).await {
            Push::Presence { .. } => continue,
            other => return other,
        }
    }
}

async fn online(client: &RelayClient) -> Vec<String> {
    match client.call(&Request::Online).await.unwrap() {
        Response::Online { users } => users,
        other => panic!("wanted Online, got {other:?}"),
    }
}

async fn wait_online(client: &RelayClient, want: &[&str]) {
    tokio::time::timeout(WAIT, async {
        loop {
            if online(client).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("online never became {want:?}"));
}

#[tokio::test]
async fn users_of_two_relays_talk_live_and_see_each_other() {
    let pair = Pair::start().await;
    let mut alice = pair.user("alice").await;
    let mut bob = pair.user("bob").await;

    let a = pair.a.connect().await.unwrap();
    alice.login(&a).await.unwrap();
    let b = pair.b.connect().await.unwrap();
    bob.login(&b).await.unwrap();

    // Both relays list both users, and count them on the status page.
    wait_online(&a, &["alice", "bob"]).await;
    wait_online(&b, &["alice", "bob"]).await;
    for relay in [&pair.a, &pair.b] {
        let body = http_get(relay.status_addr().unwrap(), "/status.json")
            .await
            .unwrap();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["online_users"], 2, "{body}");
        assert_eq!(status["accounts"], 2, "{body}");
    }

    // alice (on A) to bob (on B): pushed to bob at once.
    let to_bob = alice
        .seal_to("bob", bob.key.public_key(), b"hi bob")
        .unwrap();
    let sent = a
        .call(&Request::Send {
            envelope: to_bob.clone(),
        })
        .await
        .unwrap();
    assert!(matches!(sent, Response::Stored { .. }), "{sent:?}");
    let mut bob_pushes = pushes(&b).await;
    match next_message(&mut bob_pushes).await {
        Push::Deliver { envelope, .. } => assert_eq!(envelope.id, to_bob.id),
        other => panic!("bob wanted alice's message, got {other:?}"),
    }
    securechat_testkit::ack_stored(&b, to_bob.id).await.unwrap();

    // And back, from B to A.
    let to_alice = bob
        .seal_to("alice", alice.key.public_key(), b"hi alice")
        .unwrap();
    let sent = b
        .call(&Request::Send {
            envelope: to_alice.clone(),
        })
        .await
        .unwrap();
    assert!(matches!(sent, Response::Stored { .. }), "{sent:?}");
    let mut alice_pushes = pushes(&a).await;
    match next_message(&mut alice_pushes).await {
        Push::Deliver { envelope, .. } => assert_eq!(envelope.id, to_alice.id),
        other => panic!("alice wanted bob's message, got {other:?}"),
    }

    // alice watches bob from A; bob leaves B: alice hears it.
    let watched = a
        .call(&Request::WatchPresence {
            users: vec!["bob".into()],
        })
        .await
        .unwrap();
    assert_eq!(
        watched,
        Response::Online {
            users: vec!["bob".into()]
        }
    );
    b.close("bye").await;
    loop {
        match next_push(&mut alice_pushes).await {
            Push::Presence { user, online } if user == "bob" => {
                assert!(!online, "bob left");
                break;
            }
            _ => continue,
        }
    }
    wait_online(&a, &["alice"]).await;

    // bob logs in on A and then resumes that session on B: the session
    // holds on every relay, the connection on B takes over, and the one on
    // A is closed as superseded.
    let b_on_a = pair.a.connect().await.unwrap();
    let token = bob.login(&b_on_a).await.unwrap().token.unwrap();
    wait_online(&a, &["alice", "bob"]).await;
    let b_on_b = pair.b.connect().await.unwrap();
    b_on_b.resume("bob", &token, &bob.key).await.unwrap();
    assert_eq!(
        securechat_testkit::close_reason(b_on_a.connection(), WAIT)
            .await
            .unwrap(),
        securechat_relay::close::SUPERSEDED_REASON
    );
    wait_online(&b_on_b, &["alice", "bob"]).await;

    pair.a.stop().await.unwrap();
    pair.b.stop().await.unwrap();
}

#[tokio::test]
async fn a_totp_code_used_through_one_relay_is_refused_through_the_other() {
    let pair = Pair::start().await;
    let alice = pair.user("alice").await;
    let step = TestUser::current_step();
    let code = alice.totp_at_step(step).unwrap();

    let a = pair.a.connect().await.unwrap();
    a.login(&alice.name, &alice.password, &code, &alice.key)
        .await
        .unwrap();
    let b = pair.b.connect().await.unwrap();
    let refused = b
        .login(&alice.name, &alice.password, &code, &alice.key)
        .await
        .expect_err("the same code again, through the other relay, is refused");
    assert_eq!(error_code(Err(refused)), Ok(ErrorCode::InvalidCredentials));
    pair.a.stop().await.unwrap();
    pair.b.stop().await.unwrap();
}

#[tokio::test]
async fn a_relay_refuses_a_redis_that_may_lose_acknowledged_messages() {
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path(), None);
    c.redis = Some(redis.url());
    let refused = TestRelay::start(c.clone()).await.unwrap_err();
    let text = format!("{refused:#}");
    assert!(text.contains("appendfsync"), "{text}");
    assert!(text.contains("--redis-accept-data-loss"), "{text}");

    // The operator may accept it explicitly.
    c.redis_accept_data_loss = true;
    let relay = TestRelay::start(c).await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_send_limit_counts_the_sends_through_every_relay() {
    let pair = Pair::start_with(|c| {
        c.sends_per_sender = Limit {
            max: 2,
            window: Duration::from_secs(60),
        };
    })
    .await;
    let mut alice = pair.user("alice").await;
    let bob = pair.user("bob").await;
    let a = pair.a.connect().await.unwrap();
    let token = alice.login(&a).await.unwrap().token.unwrap();
    // alice's connection on B supersedes the one on A: the send through A
    // goes first.
    let hi = || Request::Send {
        envelope: alice.seal_to("bob", bob.key.public_key(), b"hi").unwrap(),
    };
    assert!(matches!(a.call(&hi()).await, Ok(Response::Stored { .. })));
    // Relay A adds its count to Redis within a moment.
    let mut con = redis::Client::open(pair.redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("sc:rl:send:alice:*")
                .query(&mut con)
                .unwrap();
            let mut counted = 0u64;
            for key in keys {
                let n: Option<u64> = redis::cmd("GET").arg(key).query(&mut con).unwrap();
                counted += n.unwrap_or(0);
            }
            if counted >= 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("relay A's count reaches Redis");
    let b = pair.b.connect().await.unwrap();
    b.resume("alice", &token, &alice.key).await.unwrap();
    assert!(matches!(b.call(&hi()).await, Ok(Response::Stored { .. })));
    // Two sends in the minute, one through each relay: the third is refused
    // on B, although B has seen only one.
    assert_eq!(error_code(b.call(&hi()).await), Ok(ErrorCode::RateLimited));
    pair.a.stop().await.unwrap();
    pair.b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_replicas_a_batch_counts_only_once_they_have_it() {
    use securechat_common::MessageId;
    use securechat_relay::store::{
        Account, QueueLimits, QueueOp, QueueOutcome, Quota, RedisStore, Store as _, StoreError,
    };
    let primary = RedisServer::start().unwrap();
    let store = RedisStore::open(&primary.url()).unwrap().with_replicas(1);
    let account = Account {
        username: "bob".into(),
        email: "bob@x.test".into(),
        password_phc: "phc".into(),
        public_key: vec![1],
        totp_secret: zeroize::Zeroizing::new(vec![4; 20]),
        created_unix: 1,
    };
    tokio::task::block_in_place(|| store.activate(&account)).unwrap();
    let limits = QueueLimits::quota_only(Quota {
        messages: 10,
        bytes: 1 << 20,
    });
    let send = |i: u8| QueueOp::Enqueue {
        recipient: "bob".into(),
        sender: "alice".into(),
        id: MessageId([i; 16]),
        envelope: vec![i; 10],
        now: 1,
    };
    // No replica: the batch is refused as not stored, with the reason.
    let refused = tokio::task::block_in_place(|| store.write_queue_batch(&[send(1)], limits));
    assert!(
        matches!(
            refused,
            Err(StoreError::Replication {
                wanted: 1,
                confirmed: 0
            })
        ),
        "{refused:?}"
    );
    // With a replica in sync, a send is stored. (The refused one is on the
    // primary: its sender's retry is answered as a duplicate, i.e. stored.)
    let port = primary.port().to_string();
    let _replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]).unwrap();
    let mut con = redis::Client::open(primary.url())
        .unwrap()
        .get_connection()
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut con)
                .unwrap();
            if info.contains("state=online") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the replica is in sync within the wait");
    let outcome = tokio::task::block_in_place(|| store.write_queue_batch(&[send(2)], limits))
        .expect("the replica confirms");
    assert_eq!(
        outcome,
        [QueueOutcome::Enqueue(
            securechat_relay::store::EnqueueOutcome::Stored
        )]
    );
}
