//! Everything the relay must refuse, each with a typed error, while it keeps
//! serving everyone else and stores nothing for the refused request.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use securechat_agentd::relay_client::{ClientError, RelayClient};
use securechat_common::codec;
use securechat_common::crypto::{login_transcript, IdentityKey, KeySize, LoginPurpose};
use securechat_common::envelope::{seal, SealParams};
use securechat_common::limits::MAX_FRAME_LEN;
use securechat_common::protocol::{AckOutcome, ErrorCode, Request, Response, PROTOCOL_VERSION};
use securechat_common::{Envelope, MessageId};
use securechat_relay::ratelimit::Limit;
use securechat_testkit::relay::test_config;
use securechat_testkit::{error_code, http_get, raw_request, SmtpServer, TestRelay, TestUser};
use zeroize::Zeroizing;

fn code_of(err: ClientError) -> ErrorCode {
    match err {
        ClientError::Relay(reply) => reply.code,
        other => panic!("not a relay error: {other}"),
    }
}

async fn status(relay: &TestRelay) -> serde_json::Value {
    let body = http_get(relay.status_addr().unwrap(), "/status.json")
        .await
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

/// A login request built by hand: a challenge, then a signature over the
/// transcript with the given binding and key.
async fn manual_login(
    client: &RelayClient,
    user: &TestUser,
    password: &str,
    totp: &str,
    key: &IdentityKey,
    binding: [u8; 32],
) -> Result<Response, ClientError> {
    let Response::Challenge { nonce } = client.call(&Request::Challenge).await? else {
        panic!("no challenge");
    };
    let transcript = login_transcript(LoginPurpose::Login, &user.name, &nonce, &binding);
    client
        .call(&Request::Login {
            username: user.name.clone(),
            password: Zeroizing::new(password.into()),
            totp: Zeroizing::new(totp.into()),
            signature: key.sign(&transcript).unwrap(),
        })
        .await
}

async fn started() -> (SmtpServer, tempfile::TempDir, TestRelay) {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    (smtp, dir, relay)
}

#[tokio::test]
async fn each_login_factor_failure_is_typed() {
    let (smtp, _dir, relay) = started().await;
    let mut alice = TestUser::new("alice").unwrap();
    let c = relay.connect().await.unwrap();
    alice.register(&c, &smtp).await.unwrap();
    let binding = c.tls_binding().unwrap();
    let step = alice.fresh_step().unwrap();
    let good_totp = alice.totp_at_step(step).unwrap();
    let pw = alice.password.clone();

    // Login without a challenge.
    let no_challenge = c
        .call(&Request::Login {
            username: "alice".into(),
            password: Zeroizing::new(pw.clone()),
            totp: Zeroizing::new(good_totp.clone()),
            signature: vec![1; 256],
        })
        .await;
    assert_eq!(error_code(no_challenge), Ok(ErrorCode::NoChallenge));

    // Wrong password and unknown user look the same.
    let r = manual_login(
        &c,
        &alice,
        "wrong password",
        &good_totp,
        &alice.key,
        binding,
    )
    .await;
    assert_eq!(error_code(r), Ok(ErrorCode::InvalidCredentials));
    let ghost = TestUser::new("ghost").unwrap();
    let r = manual_login(&c, &ghost, &pw, "123456", &ghost.key, binding).await;
    assert_eq!(error_code(r), Ok(ErrorCode::InvalidCredentials));

    // Wrong TOTP (a code two steps old is outside the window).
    let stale = alice.totp_at_step(step - 3).unwrap();
    let wrong = if stale == good_totp {
        "000000".to_string()
    } else {
        stale
    };
    let r = manual_login(&c, &alice, &pw, &wrong, &alice.key, binding).await;
    assert_eq!(error_code(r), Ok(ErrorCode::InvalidTotp));

    // Signed with another key.
    let mallory = IdentityKey::generate(KeySize::Rsa2048).unwrap();
    let r = manual_login(&c, &alice, &pw, &good_totp, &mallory, binding).await;
    assert_eq!(error_code(r), Ok(ErrorCode::InvalidSignature));

    // Signed with the right key but for another connection's TLS session:
    // a relayed signature does not work here.
    let other = relay.connect().await.unwrap();
    let r = manual_login(
        &c,
        &alice,
        &pw,
        &good_totp,
        &alice.key,
        other.tls_binding().unwrap(),
    )
    .await;
    assert_eq!(error_code(r), Ok(ErrorCode::InvalidSignature));

    // None of those consumed the TOTP code: the real login works...
    let r = manual_login(&c, &alice, &pw, &good_totp, &alice.key, binding).await;
    assert!(matches!(r, Ok(Response::LoggedIn { .. })), "{r:?}");
    alice.used_step(step);

    // ...and the same code is refused afterwards, even on a new connection.
    let again = relay.connect().await.unwrap();
    let r = manual_login(
        &again,
        &alice,
        &pw,
        &good_totp,
        &alice.key,
        again.tls_binding().unwrap(),
    )
    .await;
    assert_eq!(error_code(r), Ok(ErrorCode::TotpReused));

    // A bogus session token.
    let err = other
        .resume("alice", &[7u8; 32], &alice.key)
        .await
        .unwrap_err();
    assert_eq!(code_of(err), ErrorCode::SessionExpired);

    // The relay still serves: another user registers and logs in.
    let mut bob = TestUser::new("bob").unwrap();
    let b = relay.connect().await.unwrap();
    bob.register(&b, &smtp).await.unwrap();
    bob.login(&b).await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn registration_refusals_are_typed_and_store_nothing() {
    let (smtp, _dir, relay) = started().await;
    let c = relay.connect().await.unwrap();
    let carol = TestUser::new("carol").unwrap();

    // Input rules.
    let bad = |username: &str, email: &str, password: &str, key: Vec<u8>| Request::Register {
        username: username.into(),
        email: email.into(),
        password: Zeroizing::new(password.into()),
        public_key: key,
    };
    let der = carol.key.public_key().as_der().to_vec();
    for (req, want) in [
        (
            bad("Carol", "c@x.test", "long enough pw", der.clone()),
            ErrorCode::InvalidUsername,
        ),
        (
            bad("carol", "not-an-email", "long enough pw", der.clone()),
            ErrorCode::InvalidEmail,
        ),
        (
            bad("carol", "c@x.test", "short", der.clone()),
            ErrorCode::WeakPassword,
        ),
        (
            bad("carol", "c@x.test", "long enough pw", b"junk".to_vec()),
            ErrorCode::InvalidPublicKey,
        ),
    ] {
        assert_eq!(error_code(c.call(&req).await), Ok(want));
    }

    // A pending registration holds the name.
    assert!(matches!(
        c.call(&carol.register_request()).await,
        Ok(Response::RegisterPending { .. })
    ));
    let code = smtp
        .wait_for_code(&carol.email, Duration::from_secs(20))
        .await
        .unwrap();
    let mut impostor = TestUser::new("carol").unwrap();
    impostor.email = "impostor@securechat.test".into();
    assert_eq!(
        error_code(c.call(&impostor.register_request()).await),
        Ok(ErrorCode::UsernameTaken)
    );

    // Wrong codes count down, then the registration is locked.
    let wrong = if code.as_str() == "000000" {
        "111111"
    } else {
        "000000"
    };
    let verify = |code: &str| Request::Verify {
        username: "carol".into(),
        code: Zeroizing::new(code.into()),
    };
    for _ in 0..4 {
        assert_eq!(
            error_code(c.call(&verify(wrong)).await),
            Ok(ErrorCode::WrongCode)
        );
    }
    assert_eq!(
        error_code(c.call(&verify(wrong)).await),
        Ok(ErrorCode::TooManyAttempts)
    );
    assert_eq!(
        error_code(c.call(&verify(&code)).await),
        Ok(ErrorCode::TooManyAttempts),
        "even the right code is refused once locked"
    );
    assert_eq!(
        error_code(
            c.call(&Request::Verify {
                username: "nobody".into(),
                code: Zeroizing::new("123456".into()),
            })
            .await
        ),
        Ok(ErrorCode::NoPendingRegistration)
    );
    let s = status(&relay).await;
    assert_eq!(s["accounts"], 0, "nothing activated");

    // An active account holds its name too.
    let mut dave = TestUser::new("dave").unwrap();
    dave.register(&c, &smtp).await.unwrap();
    let mut dave2 = TestUser::new("dave").unwrap();
    dave2.email = "other-dave@securechat.test".into();
    assert_eq!(
        error_code(c.call(&dave2.register_request()).await),
        Ok(ErrorCode::UsernameTaken)
    );
    assert_eq!(status(&relay).await["accounts"], 1);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn expired_code_is_refused_and_registration_can_restart() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.code_ttl = Duration::from_secs(1);
    let relay = TestRelay::start(config).await.unwrap();
    let c = relay.connect().await.unwrap();
    let mut erin = TestUser::new("erin").unwrap();
    c.call(&erin.register_request()).await.unwrap();
    let code = smtp
        .wait_for_code(&erin.email, Duration::from_secs(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = c
        .call(&Request::Verify {
            username: "erin".into(),
            code: Zeroizing::new(code),
        })
        .await;
    assert_eq!(error_code(r), Ok(ErrorCode::CodeExpired));
    assert_eq!(status(&relay).await["accounts"], 0);
    relay.stop().await.unwrap();

    // The expired registration no longer holds the name (a relay with the
    // default lifetime, so a slow machine cannot expire this one too).
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    let c = relay.connect().await.unwrap();
    erin.register(&c, &smtp).await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn mail_failure_keeps_no_registration() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), None);
    // Nothing listens on port 1.
    config.mail.smtp_url = Some("smtp://127.0.0.1:1".into());
    let relay = TestRelay::start(config).await.unwrap();
    let c = relay.connect().await.unwrap();
    let frank = TestUser::new("frank").unwrap();
    assert_eq!(
        error_code(c.call(&frank.register_request()).await),
        Ok(ErrorCode::MailFailed)
    );
    assert_eq!(status(&relay).await["pending_registrations"], 0);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_frames_get_typed_errors_and_do_not_hurt_the_relay() {
    let (smtp, _dir, relay) = started().await;
    let c = relay.connect().await.unwrap();

    // Garbage bytes.
    let r = raw_request(&c, b"\x00\x00\x00\x05\x01garbage!")
        .await
        .unwrap();
    assert!(
        matches!(r, Response::Error(ref e) if e.code == ErrorCode::BadRequest),
        "{r:?}"
    );
    // A frame cut short.
    let r = raw_request(&c, b"\x00\x00").await.unwrap();
    assert!(
        matches!(r, Response::Error(ref e) if e.code == ErrorCode::BadRequest),
        "{r:?}"
    );
    // Another protocol version.
    let mut frame = codec::encode(&Request::Online).unwrap().to_vec();
    frame[4] = PROTOCOL_VERSION + 1;
    let r = raw_request(&c, &frame).await.unwrap();
    assert!(
        matches!(r, Response::Error(ref e) if e.code == ErrorCode::UnsupportedVersion),
        "{r:?}"
    );
    // A length prefix beyond the limit, and a body that really is too long.
    let r = raw_request(&c, &u32::MAX.to_be_bytes()).await.unwrap();
    assert!(
        matches!(r, Response::Error(ref e) if e.code == ErrorCode::FrameTooLarge),
        "{r:?}"
    );
    let mut huge = ((MAX_FRAME_LEN + 100) as u32).to_be_bytes().to_vec();
    huge.push(PROTOCOL_VERSION);
    huge.resize(MAX_FRAME_LEN + 104, 0xAB);
    let r = raw_request(&c, &huge).await.unwrap();
    assert!(
        matches!(r, Response::Error(ref e) if e.code == ErrorCode::FrameTooLarge),
        "{r:?}"
    );

    // The same connection still works.
    assert!(matches!(
        c.call(&Request::Challenge).await,
        Ok(Response::Challenge { .. })
    ));

    // Persisting with garbage gets the connection closed, with a reason.
    for _ in 0..10 {
        if raw_request(&c, b"junk junk junk").await.is_err() {
            break;
        }
    }
    match tokio::time::timeout(Duration::from_secs(10), c.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(&close.reason[..], b"too many malformed requests")
        }
        other => panic!("connection not closed as expected: {other:?}"),
    }

    // Others are served as before.
    let mut gina = TestUser::new("gina").unwrap();
    let g = relay.connect().await.unwrap();
    gina.register(&g, &smtp).await.unwrap();
    gina.login(&g).await.unwrap();
    relay.stop().await.unwrap();
}

fn envelope(from: &TestUser, to: &str, to_key: &securechat_common::PublicKey) -> Envelope {
    seal(
        &SealParams {
            sender_key: &from.key,
            sender: &from.name,
            recipient: to,
            recipient_key: to_key,
            id: MessageId::random().unwrap(),
            seq: 1,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        },
        b"payload",
    )
    .unwrap()
}

#[tokio::test]
async fn send_refusals_are_typed_and_store_nothing() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.quota.messages = 2;
    let relay = TestRelay::start(config).await.unwrap();
    let mut hank = TestUser::new("hank").unwrap();
    let mut ivy = TestUser::new("ivy").unwrap();
    let h = relay.connect().await.unwrap();
    hank.register(&h, &smtp).await.unwrap();
    ivy.register(&h, &smtp).await.unwrap();
    let ivy_key = ivy.key.public_key().clone();
    let env = envelope(&hank, "ivy", &ivy_key);

    // Not logged in: nothing but registration and login works.
    for req in [
        Request::Send {
            envelope: env.clone(),
        },
        Request::LookupKey {
            username: "ivy".into(),
        },
        Request::Online,
        Request::Ack {
            id: env.id,
            outcome: AckOutcome::Stored,
        },
        Request::Logout,
    ] {
        assert_eq!(
            error_code(h.call(&req).await),
            Ok(ErrorCode::NotAuthenticated)
        );
    }

    hank.login(&h).await.unwrap();
    // Sender must be the logged-in user.
    let forged = envelope(&ivy, "hank", hank.key.public_key());
    assert_eq!(
        error_code(h.call(&Request::Send { envelope: forged }).await),
        Ok(ErrorCode::NotSender)
    );
    // Unknown recipient.
    let lost = envelope(&hank, "nobody", &ivy_key);
    assert_eq!(
        error_code(h.call(&Request::Send { envelope: lost }).await),
        Ok(ErrorCode::UnknownUser)
    );
    // A malformed envelope.
    let mut broken = envelope(&hank, "ivy", &ivy_key);
    broken.signature.clear();
    assert_eq!(
        error_code(h.call(&Request::Send { envelope: broken }).await),
        Ok(ErrorCode::BadRequest)
    );
    assert_eq!(status(&relay).await["queued_messages"], 0, "nothing stored");

    // Quota: two fit, the third is refused with a clear message.
    for _ in 0..2 {
        let ok = h
            .call(&Request::Send {
                envelope: envelope(&hank, "ivy", &ivy_key),
            })
            .await;
        assert!(
            matches!(
                ok,
                Ok(Response::Stored {
                    duplicate: false,
                    ..
                })
            ),
            "{ok:?}"
        );
    }
    let err = h
        .call(&Request::Send {
            envelope: envelope(&hank, "ivy", &ivy_key),
        })
        .await
        .unwrap_err();
    let ClientError::Relay(reply) = err else {
        panic!("{err}")
    };
    assert_eq!(reply.code, ErrorCode::QuotaExceeded);
    assert!(reply.message.contains("full"), "{}", reply.message);
    assert_eq!(status(&relay).await["queued_messages"], 2);

    // Ivy drains her queue; then there is room again.
    let v = relay.connect().await.unwrap();
    assert_eq!(ivy.login(&v).await.unwrap().unread, 2);
    let mut pushes = v.accept_pushes().await.unwrap();
    for _ in 0..2 {
        let Some(Ok(securechat_common::Push::Deliver { envelope: got, .. })) = pushes.next().await
        else {
            panic!("no push");
        };
        v.call(&Request::Ack {
            id: got.id,
            outcome: AckOutcome::Stored,
        })
        .await
        .unwrap();
    }
    let ok = h
        .call(&Request::Send {
            envelope: envelope(&hank, "ivy", &ivy_key),
        })
        .await;
    assert!(matches!(ok, Ok(Response::Stored { .. })), "{ok:?}");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_account() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.login_failures_per_account = Limit {
        max: 3,
        window: Duration::from_secs(300),
    };
    let relay = TestRelay::start(config).await.unwrap();
    let mut jack = TestUser::new("jack").unwrap();
    let mut kate = TestUser::new("kate").unwrap();
    let c = relay.connect().await.unwrap();
    jack.register(&c, &smtp).await.unwrap();
    kate.register(&c, &smtp).await.unwrap();
    let binding = c.tls_binding().unwrap();
    for _ in 0..3 {
        let r = manual_login(&c, &jack, "not the password", "000000", &jack.key, binding).await;
        assert_eq!(error_code(r), Ok(ErrorCode::InvalidCredentials));
    }
    // Even the right password is refused for now.
    let err = jack.login(&c).await.unwrap_err();
    let refused = err
        .downcast_ref::<ClientError>()
        .map(|e| matches!(e, ClientError::Relay(r) if r.code == ErrorCode::RateLimited));
    assert_eq!(refused, Some(true), "{err}");
    // Another account is not affected, and successes never add up to a limit.
    let k = relay.connect().await.unwrap();
    let token = kate.login(&k).await.unwrap().token.unwrap();
    for _ in 0..5 {
        let again = relay.connect().await.unwrap();
        again.resume("kate", &token, &kate.key).await.unwrap();
    }
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn attempts_are_rate_limited_per_address() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.attempts_per_ip = Limit {
        max: 3,
        window: Duration::from_secs(60),
    };
    let relay = TestRelay::start(config).await.unwrap();
    let c = relay.connect().await.unwrap();
    let verify = Request::Verify {
        username: "nobody".into(),
        code: Zeroizing::new("123456".into()),
    };
    for _ in 0..3 {
        assert_eq!(
            error_code(c.call(&verify).await),
            Ok(ErrorCode::NoPendingRegistration)
        );
    }
    assert_eq!(
        error_code(c.call(&verify).await),
        Ok(ErrorCode::RateLimited)
    );
    // Requests that are not attempts still work.
    assert!(matches!(
        c.call(&Request::Challenge).await,
        Ok(Response::Challenge { .. })
    ));
    relay.stop().await.unwrap();
}
