//! The room: what a relay does for messages to everyone and for knowing
//! who is there, through a real relay, a real SMTP server and the real QUIC
//! client.
//!
//! * a broadcast is split into one copy per recipient: each gets only its
//!   own slot and can open it; an unknown name is refused for its slot only;
//!   the whole broadcast is one send for the sender's rate limit;
//! * the directory comes in pages of `DIRECTORY_PAGE` in name order;
//! * presence: those who watch a user hear them come and go (and nobody
//!   else does), but not a connection of theirs taking over from another;
//! * a message that waited for the whole retention time comes back to its
//!   sender as an `Expired` notice, acknowledged like a message.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use securechat_client::relay::{PushStream, RelayClient};
use securechat_common::envelope::{open, seal_for, Header, Kind, To};
use securechat_common::protocol::{
    DirectoryEntry, ErrorCode, Push, Refusal, Request, Response, DIRECTORY_PAGE,
};
use securechat_common::{Envelope, MessageId, PublicKey};
use securechat_relay::ratelimit::Limit;
use securechat_relay::store::{Account, RedbStore, Store as _};
use securechat_relay::Config;
use securechat_testkit::relay::test_config;
use securechat_testkit::{error_code, http_get, next_queued, SmtpServer, TestRelay, TestUser};
use zeroize::Zeroizing;

const WAIT: Duration = Duration::from_secs(15);

/// A relay, its mail server, and registered users (none logged in).
struct Room {
    /// Kept running for the relay's mail.
    _smtp: SmtpServer,
    relay: TestRelay,
    users: Vec<TestUser>,
    _dir: tempfile::TempDir,
}

impl Room {
    /// Start a relay with `config` (made from `test_config`) and register
    /// `names` on it.
    async fn open(names: &[&str], config: impl FnOnce(&mut Config)) -> Self {
        let smtp = SmtpServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut c = test_config(dir.path(), Some(&smtp));
        config(&mut c);
        let relay = TestRelay::start(c).await.unwrap();
        let setup = relay.connect().await.unwrap();
        let mut users = Vec::new();
        for name in names {
            let mut user = TestUser::new(name).unwrap();
            user.use_clock(relay.clock());
            user.register(&setup, &smtp).await.unwrap();
            users.push(user);
        }
        setup.close("set up").await;
        Room {
            _smtp: smtp,
            relay,
            users,
            _dir: dir,
        }
    }

    /// `users[i]` logged in on a new connection.
    async fn login(&mut self, i: usize) -> RelayClient {
        let client = self.relay.connect().await.unwrap();
        self.users[i].login(&client).await.unwrap();
        client
    }

    async fn status(&self) -> serde_json::Value {
        let body = http_get(self.relay.status_addr().unwrap(), "/status.json")
            .await
            .unwrap();
        serde_json::from_str(&body).unwrap()
    }

    /// Wait until the relay counts `n` open connections: a closed one has
    /// then been fully taken down (its push task stopped, the hub told).
    async fn wait_open_connections(&self, n: u64) {
        tokio::time::timeout(WAIT, async {
            while self.status().await["open_connections"] != n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the relay never got to {n} open connections"));
    }
}

/// The push stream of a logged-in `client`. The client sees it once the
/// relay has written on it: wait for it only when something is due.
async fn pushes(client: &RelayClient) -> PushStream {
    tokio::time::timeout(WAIT, client.accept_pushes())
        .await
        .expect("a push stream within the wait")
        .unwrap()
}

/// A broadcast from `from`, sealed for each of `to` (a name and the key the
/// slot is sealed with).
fn broadcast(from: &TestUser, to: &[(&str, &PublicKey)], text: &str) -> Envelope {
    let to: Vec<To<'_>> = to
        .iter()
        .map(|&(name, key)| To { name, key, seq: 1 })
        .collect();
    seal_for(
        &Header {
            sender_key: &from.key,
            sender: &from.name,
            kind: Kind::Broadcast,
            id: MessageId::random().unwrap(),
            timestamp_ms: 1_700_000_000_000,
        },
        &to,
        text.as_bytes(),
    )
    .unwrap()
}

async fn send(client: &RelayClient, envelope: &Envelope) -> Result<Response, ErrorCode> {
    client
        .call(&Request::Send {
            envelope: envelope.clone(),
        })
        .await
        .map_err(|e| error_code(Err(e)).unwrap())
}

async fn ack(client: &RelayClient, id: MessageId) {
    securechat_testkit::ack_stored(client, id).await.unwrap();
}

/// The next push, which must be a presence change: (user, online).
async fn next_presence(pushes: &mut PushStream) -> (String, bool) {
    let push = tokio::time::timeout(WAIT, pushes.next())
        .await
        .expect("a push within the wait")
        .expect("push stream open")
        .expect("a valid push frame");
    match push {
        Push::Presence { user, online } => (user, online),
        other => panic!("wanted a presence change, got {other:?}"),
    }
}

#[tokio::test]
async fn a_broadcast_reaches_each_recipient_with_only_its_own_slot() {
    let mut room = Room::open(&["alice", "bob", "carol", "dave"], |c| {
        // Two sends a minute: each broadcast is one of them, whatever
        // the number of its recipients.
        c.sends_per_sender = Limit {
            max: 2,
            window: Duration::from_secs(60),
        };
    })
    .await;
    let a = room.login(0).await;
    let [alice, bob, carol, dave] = [0, 1, 2, 3].map(|i| &room.users[i]);
    let everyone = [
        ("bob", bob.key.public_key()),
        ("carol", carol.key.public_key()),
        ("dave", dave.key.public_key()),
    ];
    let env = broadcast(alice, &everyone, "hello room");
    assert_eq!(
        send(&a, &env).await,
        Ok(Response::Fanout {
            id: env.id,
            stored: vec!["bob".into(), "carol".into(), "dave".into()],
            refused: Vec::new(),
        })
    );

    // A name without an account is refused for its slot; the others get it.
    let stray = broadcast(
        alice,
        &[
            ("bob", bob.key.public_key()),
            ("nobody", bob.key.public_key()),
        ],
        "and you?",
    );
    let Ok(Response::Fanout {
        id,
        stored,
        refused,
    }) = send(&a, &stray).await
    else {
        panic!("no fanout for the stray broadcast");
    };
    assert_eq!((id, stored), (stray.id, vec!["bob".to_string()]));
    let [Refusal { user, error }] = refused.as_slice() else {
        panic!("one refusal expected: {refused:?}");
    };
    assert_eq!(
        (user.as_str(), error.code),
        ("nobody", ErrorCode::UnknownUser)
    );
    // Two sends so far: the third is over the limit, however small.
    let third = broadcast(alice, &everyone[..1], "one too many");
    assert_eq!(send(&a, &third).await, Err(ErrorCode::RateLimited));

    // Each recipient's copy carries its own slot and the others' digests,
    // and opens for them with alice's signature.
    for (i, name) in [(1, "bob"), (2, "carol"), (3, "dave")] {
        let client = room.login(i).await;
        let mut pushes = pushes(&client).await;
        let Push::Deliver { envelope: copy, .. } = next_queued(&mut pushes, WAIT).await.unwrap()
        else {
            panic!("{name} got no message");
        };
        assert_eq!(copy.id, env.id);
        assert_eq!(copy.kind, Kind::Broadcast);
        assert_eq!(copy.recipients().collect::<Vec<_>>(), [name]);
        assert_eq!(copy.other_slots.len(), 2);
        let me = &room.users[i];
        let body = open(&copy, name, &me.key, room.users[0].key.public_key()).unwrap();
        assert_eq!(body.as_slice(), b"hello room");
        // Not for anyone else.
        let other = &room.users[1 + i % 3];
        assert!(open(
            &copy,
            &other.name,
            &other.key,
            room.users[0].key.public_key()
        )
        .is_err());
        ack(&client, copy.id).await;
        if name == "bob" {
            let Push::Deliver {
                envelope: second, ..
            } = next_queued(&mut pushes, WAIT).await.unwrap()
            else {
                panic!("bob got no second message");
            };
            assert_eq!(second.id, stray.id);
            assert_eq!(second.recipients().collect::<Vec<_>>(), ["bob"]);
            assert_eq!(second.other_slots.len(), 1);
            ack(&client, second.id).await;
        }
    }
    assert_eq!(room.status().await["queued_messages"], 0);
    room.relay.stop().await.unwrap();
}

/// The directory's full listing, page by page: (pages, entries).
async fn whole_directory(client: &RelayClient) -> (Vec<usize>, Vec<DirectoryEntry>) {
    let (mut pages, mut all) = (Vec::new(), Vec::<DirectoryEntry>::new());
    loop {
        let after = all.last().map(|e| e.username.clone());
        let Response::Directory { users, more } =
            client.call(&Request::Directory { after }).await.unwrap()
        else {
            panic!("no directory page");
        };
        pages.push(users.len());
        all.extend(users);
        if !more {
            return (pages, all);
        }
    }
}

#[tokio::test]
async fn the_directory_comes_in_pages_in_name_order() {
    // More accounts than a page holds, put in the relay's database before
    // it starts (registering each through mail would take minutes).
    let dir = tempfile::tempdir().unwrap();
    let bulk = DIRECTORY_PAGE + 2;
    {
        let store = RedbStore::open(&dir.path().join("relay.redb")).unwrap();
        for n in (0..bulk).rev() {
            let username = format!("user{n:03}");
            store
                .activate(&Account {
                    public_key: username.as_bytes().to_vec(),
                    email: format!("{username}@securechat.test"),
                    username,
                    password_phc: "not a hash: nobody logs in as these".into(),
                    totp_secret: Zeroizing::new(vec![0; 20]),
                    created_unix: 1,
                })
                .unwrap();
        }
    }
    let smtp = SmtpServer::start().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    let client = relay.connect().await.unwrap();
    let mut alice = TestUser::new("alice").unwrap();
    alice.register(&client, &smtp).await.unwrap();

    // A directory needs a login.
    assert_eq!(
        error_code(client.call(&Request::Directory { after: None }).await),
        Ok(ErrorCode::NotAuthenticated)
    );
    alice.login(&client).await.unwrap();

    let (pages, all) = whole_directory(&client).await;
    assert_eq!(pages, [DIRECTORY_PAGE, bulk + 1 - DIRECTORY_PAGE]);
    let names: Vec<&str> = all.iter().map(|e| e.username.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names, sorted, "in name order, each once");
    assert_eq!(names.len(), bulk + 1);
    assert_eq!(all[0].username, "alice");
    assert_eq!(all[0].public_key, alice.key.public_key().as_der());
    assert_eq!(all[1].public_key, b"user000");

    // Past the end, and from a name that is nobody's.
    let after_last = Request::Directory {
        after: Some(format!("user{:03}", bulk - 1)),
    };
    assert_eq!(
        client.call(&after_last).await.unwrap(),
        Response::Directory {
            users: Vec::new(),
            more: false
        }
    );
    let Response::Directory { users, more } = client
        .call(&Request::Directory {
            after: Some("user128a".into()),
        })
        .await
        .unwrap()
    else {
        panic!("no directory page");
    };
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].username, "user129");
    assert!(!more);

    // An `after` no username could be is a bad request.
    for bad in ["", "NotAName!", &"x".repeat(1000)] {
        assert_eq!(
            error_code(
                client
                    .call(&Request::Directory {
                        after: Some(bad.to_string())
                    })
                    .await
            ),
            Ok(ErrorCode::BadRequest),
            "{bad:?}"
        );
    }
    relay.stop().await.unwrap();
}

/// Ask the relay to push the comings and goings of `users` on `client`;
/// the answer is those of them online now.
async fn watch(client: &RelayClient, users: &[&str]) -> Result<Vec<String>, ErrorCode> {
    let req = Request::WatchPresence {
        users: users.iter().map(|u| u.to_string()).collect(),
    };
    match client.call(&req).await {
        Ok(Response::Online { users }) => Ok(users),
        other => Err(error_code(other).unwrap()),
    }
}

#[tokio::test]
async fn watchers_hear_a_user_come_and_go_but_not_a_connection_taking_over() {
    let mut room = Room::open(&["alice", "bob", "carol"], |_| {}).await;

    // Watching needs a login.
    let anonymous = room.relay.connect().await.unwrap();
    assert_eq!(
        watch(&anonymous, &["bob"]).await,
        Err(ErrorCode::NotAuthenticated)
    );

    let a = room.login(0).await;
    assert_eq!(watch(&a, &["bob", "carol"]).await, Ok(vec![]));
    // A list too long, or with a name no user could have, is refused whole
    // and the list before it stays.
    let too_many: Vec<String> = (0..=securechat_common::limits::MAX_WATCH)
        .map(|i| format!("user{i}"))
        .collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    assert_eq!(watch(&a, &too_many).await, Err(ErrorCode::BadRequest));
    assert_eq!(
        watch(&a, &["bob", "not a name\u{1b}[2J"]).await,
        Err(ErrorCode::BadRequest)
    );

    // bob comes online: alice, who watches him, hears it.
    let b = room.relay.connect().await.unwrap();
    let bob_token = room.users[1].login(&b).await.unwrap().token.unwrap();
    let mut alice_hears = pushes(&a).await;
    assert_eq!(next_presence(&mut alice_hears).await, ("bob".into(), true));

    // A second connection of bob's takes over from the first: he is online
    // throughout, so nobody hears him leave or come. The new connection
    // watches nobody until it says so (bob watches only alice).
    let b2 = room.relay.connect().await.unwrap();
    b2.resume("bob", &bob_token, &room.users[1].key)
        .await
        .unwrap();
    assert_eq!(
        securechat_testkit::close_reason(b.connection(), WAIT)
            .await
            .unwrap(),
        securechat_relay::close::SUPERSEDED_REASON
    );
    assert_eq!(
        watch(&b2, &["alice", "bob"]).await,
        Ok(vec!["alice".to_string()])
    );
    // alice's and bob's second connection (and the anonymous one) are all
    // that is left: the first is gone from the relay, hub and all.
    room.wait_open_connections(3).await;

    // So the next thing alice hears is carol; bob, who does not watch
    // carol, hears nothing of her.
    let c = room.login(2).await;
    assert_eq!(
        next_presence(&mut alice_hears).await,
        ("carol".into(), true)
    );
    c.close("carol leaves").await;
    assert_eq!(
        next_presence(&mut alice_hears).await,
        ("carol".into(), false)
    );
    // The first thing bob hears is alice leaving (his push stream shows up
    // with its first push).
    let (bob_heard, ()) = tokio::join!(
        async { next_presence(&mut pushes(&b2).await).await },
        a.close("alice leaves")
    );
    assert_eq!(bob_heard, ("alice".into(), false));
    room.relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_message_never_delivered_comes_back_to_its_sender_as_a_notice() {
    let retention = Duration::from_secs(3600);
    let mut room = Room::open(&["alice", "bob"], |c| {
        c.retention = retention;
        // The sweeper looks often; the test moves the clock past the
        // retention time instead of waiting for it.
        c.sweep_interval = Duration::from_millis(50);
    })
    .await;
    let clock = room.relay.clock().clone();
    let a = room.relay.connect().await.unwrap();
    let alice_token = room.users[0].login(&a).await.unwrap().token.unwrap();

    // bob is offline, and stays away.
    let bob_key = room.users[1].key.public_key().clone();
    let before = clock.unix_now();
    let env = room.users[0]
        .seal_to("bob", &bob_key, b"are you there?")
        .unwrap();
    assert!(matches!(send(&a, &env).await, Ok(Response::Stored { .. })));
    let after = clock.unix_now();

    clock.advance(retention + Duration::from_secs(60));
    let mut alice_pushes = pushes(&a).await;
    let Push::Expired {
        notice,
        id,
        recipient,
        stored_unix,
    } = next_queued(&mut alice_pushes, WAIT).await.unwrap()
    else {
        panic!("alice was not told");
    };
    assert_eq!((id, recipient.as_str()), (env.id, "bob"));
    assert!((before..=after).contains(&stored_unix), "{stored_unix}");
    assert_ne!(notice, env.id);

    // Not acknowledged: a new connection of alice's gets it again...
    let a2 = room.relay.connect().await.unwrap();
    let resumed = a2
        .resume("alice", &alice_token, &room.users[0].key)
        .await
        .unwrap();
    assert_eq!(resumed.unread, 1);
    let mut again = pushes(&a2).await;
    let Push::Expired { notice: same, .. } = next_queued(&mut again, WAIT).await.unwrap() else {
        panic!("the notice was not pushed again");
    };
    assert_eq!(same, notice);
    // ...and acknowledged it is gone, like a message.
    ack(&a2, notice).await;
    let a3 = room.relay.connect().await.unwrap();
    let resumed = a3
        .resume("alice", &alice_token, &room.users[0].key)
        .await
        .unwrap();
    assert_eq!(resumed.unread, 0);
    assert_eq!(room.status().await["queued_messages"], 0);

    // bob never gets the message.
    let b = room.relay.connect().await.unwrap();
    assert_eq!(room.users[1].login(&b).await.unwrap().unread, 0);
    room.relay.stop().await.unwrap();
}
