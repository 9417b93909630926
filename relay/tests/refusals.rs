//! Everything the relay must refuse, each with a typed error, while it keeps
//! serving everyone else and stores nothing for the refused request.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use securechat_client::relay::{ClientError, RelayClient};
use securechat_common::codec;
use securechat_common::crypto::{login_transcript, IdentityKey, KeySize, LoginPurpose};
use securechat_common::limits::MAX_FRAME_LEN;
use securechat_common::protocol::{AckOutcome, ErrorCode, Request, Response, PROTOCOL_VERSION};
use securechat_common::Envelope;
use securechat_relay::config::DEFAULT_CODE_TTL;
use securechat_testkit::relay::test_config;
use securechat_testkit::{
    error_code, http_get, next_queued, raw_request, refusal, SmtpServer, TestRelay, TestUser,
};
use zeroize::Zeroizing;

/// How long a test waits for a push.
const WAIT: Duration = Duration::from_secs(10);

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

    // Wrong password, unknown user and a wrong code get one answer, word
    // for word: only the holder of the password and a fresh code learns more.
    let wrong_password = refusal(
        manual_login(
            &c,
            &alice,
            "wrong password",
            &good_totp,
            &alice.key,
            binding,
        )
        .await,
    )
    .unwrap();
    assert_eq!(wrong_password.code, ErrorCode::InvalidCredentials);
    let ghost = TestUser::new("ghost").unwrap();
    let r = manual_login(&c, &ghost, &pw, "123456", &ghost.key, binding).await;
    assert_eq!(refusal(r).unwrap(), wrong_password);

    // Wrong TOTP: a code from outside the ±1 window, even with the right
    // password, and also when the signature is wrong as well.
    let window: Vec<String> = (step - 1..=step + 1)
        .map(|s| alice.totp_at_step(s).unwrap())
        .collect();
    let wrong = [step - 3, step - 2, step + 2, step + 3]
        .map(|s| alice.totp_at_step(s).unwrap())
        .into_iter()
        .find(|code| !window.contains(code))
        .unwrap();
    let r = manual_login(&c, &alice, &pw, &wrong, &alice.key, binding).await;
    assert_eq!(refusal(r).unwrap(), wrong_password);
    let mallory = IdentityKey::generate(KeySize::Rsa2048).unwrap();
    let r = manual_login(&c, &alice, &pw, &wrong, &mallory, binding).await;
    assert_eq!(refusal(r).unwrap(), wrong_password);

    // Signed with another key, with the password and a fresh code right.
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
    assert_eq!(refusal(r).unwrap(), wrong_password);
    // Nor does a used code with a wrong signature say that the password
    // and the code were right.
    let r = manual_login(
        &again,
        &alice,
        &pw,
        &good_totp,
        &mallory,
        again.tls_binding().unwrap(),
    )
    .await;
    assert_eq!(refusal(r).unwrap(), wrong_password);

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
    let (smtp, _dir, relay) = started().await;
    let c = relay.connect().await.unwrap();
    let mut erin = TestUser::new("erin").unwrap();
    erin.use_clock(relay.clock());
    c.call(&erin.register_request()).await.unwrap();
    let code = smtp
        .wait_for_code(&erin.email, Duration::from_secs(20))
        .await
        .unwrap();
    let verify = Request::Verify {
        username: "erin".into(),
        code: Zeroizing::new(code),
    };
    // A minute before the expiry the code still counts (a wrong one is
    // "wrong", not "expired")...
    let minute = Duration::from_secs(60);
    relay.clock().advance(DEFAULT_CODE_TTL - minute);
    let wrong = Request::Verify {
        username: "erin".into(),
        code: Zeroizing::new("not a code".into()),
    };
    assert_eq!(error_code(c.call(&wrong).await), Ok(ErrorCode::WrongCode));
    // ...and at the expiry it does not.
    relay.clock().advance(minute);
    assert_eq!(
        error_code(c.call(&verify).await),
        Ok(ErrorCode::CodeExpired)
    );
    assert_eq!(status(&relay).await["accounts"], 0);

    // The expired registration no longer holds the name.
    erin.register(&c, &smtp).await.unwrap();
    erin.login(&c).await.unwrap();
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
    let garbage = [
        &[0, 0, 0, 9, securechat_common::protocol::PROTOCOL_VERSION][..],
        b"garbage!",
    ]
    .concat();
    let r = raw_request(&c, &garbage).await.unwrap();
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
    from.seal_to(to, to_key, b"payload").unwrap()
}

#[tokio::test]
async fn send_refusals_are_typed_and_store_nothing() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.quota.messages = 2;
    // One sender may fill the whole queue here: this is about the quota.
    config.sender_share_percent = 100;
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
    // It says nothing about how much waits for ivy.
    assert_eq!(
        reply.message,
        "\"ivy\" cannot take more messages from you right now; try again later"
    );
    assert_eq!(status(&relay).await["queued_messages"], 2);

    // Ivy drains her queue; then there is room again.
    let v = relay.connect().await.unwrap();
    assert_eq!(ivy.login(&v).await.unwrap().unread, 2);
    let mut pushes = v.accept_pushes().await.unwrap();
    for _ in 0..2 {
        let Ok(securechat_common::Push::Deliver { envelope: got, .. }) =
            next_queued(&mut pushes, WAIT).await
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
async fn oversized_names_are_refused_without_being_echoed_or_kept() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.login_limits.free_failures = 2;
    let relay = TestRelay::start(config).await.unwrap();
    let c = relay.connect().await.unwrap();
    let mut mia = TestUser::new("mia").unwrap();
    mia.register(&c, &smtp).await.unwrap();
    let huge = "a".repeat(200 * 1024);
    let short = |r: Result<Response, ClientError>, want: ErrorCode| {
        let reply = refusal(r).unwrap();
        assert_eq!(reply.code, want, "{}", reply.message);
        assert!(
            reply.message.len() < 200,
            "echoed: {} bytes",
            reply.message.len()
        );
    };

    // A name that can never be an account is the unknown user's answer,
    // every time: it is not a guessing-limit key (which would refuse the
    // third attempt here).
    let mut nobody = TestUser::new("nobody").unwrap();
    nobody.name = huge.clone();
    for _ in 0..4 {
        let binding = c.tls_binding().unwrap();
        let r = manual_login(&c, &nobody, "some password", "123456", &nobody.key, binding).await;
        short(r, ErrorCode::InvalidCredentials);
    }
    short(
        c.call(&Request::Verify {
            username: huge.clone(),
            code: Zeroizing::new("123456".into()),
        })
        .await,
        ErrorCode::NoPendingRegistration,
    );
    let mut register = mia.register_request();
    if let Request::Register { username, .. } = &mut register {
        *username = huge.clone();
    }
    short(c.call(&register).await, ErrorCode::InvalidUsername);
    let resume = c.resume(&huge, &[7; 32], &mia.key).await;
    let code = match resume {
        Err(ClientError::Relay(reply)) => {
            assert!(reply.message.len() < 200);
            reply.code
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(code, ErrorCode::SessionExpired);

    mia.login(&c).await.unwrap();
    short(
        c.call(&Request::LookupKey {
            username: huge.clone(),
        })
        .await,
        ErrorCode::UnknownUser,
    );
    relay.stop().await.unwrap();
}
