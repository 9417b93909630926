//! The happy path through a real relay, a real SMTP server and the real
//! QUIC client: register → verify → MFA login → lookup → send → push → ack,
//! a relay restart in between, resume, logout and supersede.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use securechat_client::relay::{ClientError, PushStream, RelayClient};
use securechat_common::envelope::open;
use securechat_common::limits::MAX_ACK_BATCH;
use securechat_common::protocol::{AckOutcome, ErrorCode, Push, Request, Response};
use securechat_common::{Envelope, MessageId, PublicKey};
use securechat_testkit::relay::test_config;
use securechat_testkit::{error_code, http_get, next_queued, SmtpServer, TestRelay, TestUser};

const WAIT: Duration = Duration::from_secs(15);

async fn lookup(client: &RelayClient, name: &str) -> PublicKey {
    match client
        .call(&Request::LookupKey {
            username: name.into(),
        })
        .await
        .unwrap()
    {
        Response::Key {
            username,
            public_key,
        } => {
            assert_eq!(username, name);
            PublicKey::from_der(&public_key).unwrap()
        }
        other => panic!("lookup: {other:?}"),
    }
}

fn seal_for(from: &TestUser, to: &str, to_key: &PublicKey, text: &str) -> Envelope {
    from.seal_to(to, to_key, text.as_bytes()).unwrap()
}

async fn send(client: &RelayClient, env: &Envelope) -> bool {
    match client
        .call(&Request::Send {
            envelope: env.clone(),
        })
        .await
        .unwrap()
    {
        Response::Stored { id, duplicate } => {
            assert_eq!(id, env.id);
            duplicate
        }
        other => panic!("send: {other:?}"),
    }
}

async fn next_push(pushes: &mut PushStream) -> Envelope {
    match next_queued(pushes, WAIT).await.expect("a queued push") {
        Push::Deliver { envelope: env, .. } => env,
        other => panic!("push: {other:?}"),
    }
}

async fn ack(client: &RelayClient, id: MessageId) {
    securechat_testkit::ack_stored(client, id).await.unwrap();
}

async fn status(relay: &TestRelay) -> serde_json::Value {
    let body = http_get(relay.status_addr().unwrap(), "/status.json")
        .await
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn register_login_send_push_ack() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();

    let mut alice = TestUser::new("alice").unwrap();
    let mut bob = TestUser::new("bob").unwrap();
    let a = relay.connect().await.unwrap();
    alice.register(&a, &smtp).await.unwrap();
    bob.register(&a, &smtp).await.unwrap();
    assert!(smtp.messages().len() >= 2, "codes went through SMTP");

    let logged = alice.login(&a).await.unwrap();
    assert_eq!(logged.username, "alice");
    assert!(logged.token.as_ref().is_some_and(|t| t.len() == 32));
    assert_eq!(logged.unread, 0);

    // Directory lookup returns bob's registered key.
    let bob_key = lookup(&a, "bob").await;
    assert_eq!(bob_key.as_der(), bob.key.public_key().as_der());

    // Send to bob while he is offline; a resend of the same id is a duplicate.
    let env = seal_for(&alice, "bob", &bob_key, "hello bob");
    assert!(!send(&a, &env).await);
    assert!(send(&a, &env).await, "same id again is a duplicate");
    assert_eq!(status(&relay).await["queued_messages"], 1);

    // Bob logs in, sees one unread and gets it pushed.
    let b = relay.connect().await.unwrap();
    let logged = bob.login(&b).await.unwrap();
    assert_eq!(logged.unread, 1);
    let mut pushes = b.accept_pushes().await.unwrap();
    let got = next_push(&mut pushes).await;
    assert_eq!(got, env);
    let plain = open(&got, "bob", &bob.key, alice.key.public_key()).unwrap();
    assert_eq!(plain.as_slice(), b"hello bob");
    ack(&b, got.id).await;

    // Online now: a new message is pushed at once.
    let live = seal_for(&alice, "bob", &bob_key, "still there?");
    send(&a, &live).await;
    let got = next_push(&mut pushes).await;
    assert_eq!(got.id, live.id);
    ack(&b, got.id).await;

    match b.call(&Request::Online).await.unwrap() {
        Response::Online { users } => assert_eq!(users, ["alice", "bob"]),
        other => panic!("online: {other:?}"),
    }

    let s = status(&relay).await;
    assert_eq!(s["accounts"], 2);
    assert_eq!(s["queued_messages"], 0);
    assert_eq!(s["messages_accepted"], 2);
    assert_eq!(s["messages_delivered"], 2);
    assert_eq!(s["online_users"], 2);
    let page = http_get(relay.status_addr().unwrap(), "/").await.unwrap();
    assert!(page.contains("Queued messages"));
    assert!(
        !page.contains("alice") && !page.contains("bob"),
        "no names on the status page"
    );

    // A duplicate after delivery is still a duplicate, and is not queued again.
    assert!(send(&a, &env).await);
    assert_eq!(status(&relay).await["queued_messages"], 0);

    relay.stop().await.unwrap();
}

#[tokio::test]
async fn queued_message_survives_restart_and_session_resumes() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    let fingerprint = relay.fingerprint();

    let mut alice = TestUser::new("alice").unwrap();
    let mut bob = TestUser::new("bob").unwrap();
    let a = relay.connect().await.unwrap();
    alice.register(&a, &smtp).await.unwrap();
    bob.register(&a, &smtp).await.unwrap();
    let token = alice.login(&a).await.unwrap().token.unwrap();
    let bob_key = lookup(&a, "bob").await;
    let env = seal_for(&alice, "bob", &bob_key, "across a restart");
    send(&a, &env).await;

    // The relay tells connected clients why it goes away.
    relay.stop().await.unwrap();
    match a.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(&close.reason[..], b"relay shutting down")
        }
        other => panic!("closed: {other:?}"),
    }

    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    assert_eq!(relay.fingerprint(), fingerprint, "certificate is kept");

    // Alice resumes with her token: no password, no TOTP.
    let a = relay.connect().await.unwrap();
    let resumed = a.resume("alice", &token, &alice.key).await.unwrap();
    assert!(resumed.token.is_none());

    let b = relay.connect().await.unwrap();
    let logged = bob.login(&b).await.unwrap();
    assert_eq!(logged.unread, 1);
    let mut pushes = b.accept_pushes().await.unwrap();
    let got = next_push(&mut pushes).await;
    assert_eq!(got, env);

    // Not acked: a new connection of bob gets it again, and the old one is
    // closed with a reason (newest connection wins).
    let bob_token = logged.token.unwrap();
    let b2 = relay.connect().await.unwrap();
    let again = b2.resume("bob", &bob_token, &bob.key).await.unwrap();
    assert_eq!(again.unread, 1);
    match b.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(&close.reason[..], b"superseded by a new connection")
        }
        other => panic!("closed: {other:?}"),
    }
    let mut pushes = b2.accept_pushes().await.unwrap();
    let got = next_push(&mut pushes).await;
    assert_eq!(got.id, env.id);
    ack(&b2, got.id).await;

    let b3 = relay.connect().await.unwrap();
    let after = b3.resume("bob", &bob_token, &bob.key).await.unwrap();
    assert_eq!(after.unread, 0, "acked message is gone");

    // Logout revokes the token.
    assert_eq!(b3.call(&Request::Logout).await.unwrap(), Response::Ok);
    let b4 = relay.connect().await.unwrap();
    let err = b4.resume("bob", &bob_token, &bob.key).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Relay(r) if r.code == ErrorCode::SessionExpired),
        "{err}"
    );

    relay.stop().await.unwrap();
}

#[tokio::test]
async fn publish_key_needs_a_fresh_full_login() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    let mut alice = TestUser::new("alice").unwrap();
    let a = relay.connect().await.unwrap();
    alice.register(&a, &smtp).await.unwrap();
    let token = alice.login(&a).await.unwrap().token.unwrap();

    let new_key =
        securechat_common::IdentityKey::generate(securechat_common::KeySize::Rsa2048).unwrap();
    a.publish_key("alice", &new_key).await.unwrap();
    assert_eq!(
        lookup(&a, "alice").await.as_der(),
        new_key.public_key().as_der()
    );

    // After a resume only, replacing the key is refused.
    let other = relay.connect().await.unwrap();
    other.resume("alice", &token, &new_key).await.unwrap();
    let third =
        securechat_common::IdentityKey::generate(securechat_common::KeySize::Rsa2048).unwrap();
    let err = other.publish_key("alice", &third).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Relay(r) if r.code == ErrorCode::FreshLoginRequired),
        "{err}"
    );
    assert_eq!(
        error_code(
            other
                .call(&Request::LookupKey {
                    username: "nobody".into()
                })
                .await
        ),
        Ok(ErrorCode::UnknownUser)
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn ack_many_takes_a_batch_at_once_and_refuses_an_oversized_one_whole() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    let mut alice = TestUser::new("alice").unwrap();
    let mut bob = TestUser::new("bob").unwrap();
    let a = relay.connect().await.unwrap();
    alice.register(&a, &smtp).await.unwrap();
    bob.register(&a, &smtp).await.unwrap();
    alice.login(&a).await.unwrap();
    let bob_key = lookup(&a, "bob").await;
    let sent: Vec<Envelope> = (0..4)
        .map(|i| seal_for(&alice, "bob", &bob_key, &format!("m{i}")))
        .collect();
    for env in &sent {
        send(&a, env).await;
    }

    let b = relay.connect().await.unwrap();
    let logged = bob.login(&b).await.unwrap();
    assert_eq!(logged.unread, 4);
    let acks = |ids: &[MessageId]| Request::AckMany {
        acks: ids.iter().map(|id| (*id, AckOutcome::Stored)).collect(),
    };
    let ids: Vec<MessageId> = sent.iter().map(|e| e.id).collect();

    // One too many: refused whole, even the entries that are queued.
    let mut oversized = vec![ids[0]; MAX_ACK_BATCH];
    oversized.push(ids[1]);
    let refused = b.call(&acks(&oversized)).await;
    let Err(ClientError::Relay(e)) = refused else {
        panic!("oversized batch: {refused:?}")
    };
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains(&MAX_ACK_BATCH.to_string()), "{e}");
    assert_eq!(status(&relay).await["queued_messages"], 4);

    // Three at once (one of them never queued, which is ignored).
    let batch = [ids[0], ids[2], MessageId([7; 16])];
    assert_eq!(b.call(&acks(&batch)).await.unwrap(), Response::Ok);
    let s = status(&relay).await;
    assert_eq!(s["queued_messages"], 2);
    assert_eq!(s["messages_delivered"], 2);

    // On the next login, only what is left is counted and pushed.
    b.close("again").await;
    let b = relay.connect().await.unwrap();
    assert_eq!(bob.login(&b).await.unwrap().unread, 2);
    let mut pushes = b.accept_pushes().await.unwrap();
    let mut left = vec![next_push(&mut pushes).await.id];
    left.push(next_push(&mut pushes).await.id);
    assert_eq!(left, [ids[1], ids[3]]);
    assert_eq!(b.call(&acks(&left)).await.unwrap(), Response::Ok);
    assert_eq!(status(&relay).await["queued_messages"], 0);
    relay.stop().await.unwrap();
}
