//! The limits that keep the relay up for honest users while others abuse
//! it, each over real QUIC against a real relay: password guessing per
//! (account, source) and per account, attempts per source, connection caps,
//! the time without a login, argon2's bounded pool, the send rate, one
//! sender's share of a queue, and sessions that end while connected. Time
//! is the relay's clock, moved by the test.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use securechat_client::relay::{ClientError, RelayClient};
use securechat_common::protocol::{AckOutcome, ErrorCode, Push, Request, Response};
use securechat_common::IdentityKey;
use securechat_relay::ratelimit::{Limit, LoginLimits};
use securechat_testkit::relay::test_config;
use securechat_testkit::{
    close_reason, error_code, http_get, next_queued, refusal, SmtpServer, SourceClient, TestRelay,
    TestUser,
};
use zeroize::Zeroizing;

/// How long a test waits for the relay to close a connection.
const WAIT: Duration = Duration::from_secs(10);

async fn status(relay: &TestRelay) -> serde_json::Value {
    let body = http_get(relay.status_addr().unwrap(), "/status.json")
        .await
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

fn from(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A login with the right key but a wrong password, from `client`.
async fn guess(client: &SourceClient, user: &TestUser) -> Result<Response, ClientError> {
    client
        .login(&user.name, "not the password", "000000", &user.key)
        .await
}

#[tokio::test]
async fn password_guessing_is_slowed_per_source_and_never_locks_the_owner_out() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.login_limits = LoginLimits {
        free_failures: 3,
        first_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(8),
        forget_after: Duration::from_secs(3600),
        per_account: Limit {
            max: 12,
            window: Duration::from_secs(3600),
        },
    };
    let relay = TestRelay::start(config).await.unwrap();
    let clock = relay.clock().clone();
    let mut jack = TestUser::new("jack").unwrap();
    let mut kate = TestUser::new("kate").unwrap();
    jack.use_clock(&clock);
    kate.use_clock(&clock);
    let c = relay.connect().await.unwrap();
    jack.register(&c, &smtp).await.unwrap();
    kate.register(&c, &smtp).await.unwrap();
    let token = jack.login(&c).await.unwrap().token.unwrap();

    // A stranger at 127.0.0.2 guesses: three failures, then a wait.
    let stranger = SourceClient::connect(&relay, from(2)).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            error_code(guess(&stranger, &jack).await),
            Ok(ErrorCode::InvalidCredentials)
        );
    }
    let wait = refusal(guess(&stranger, &jack).await).unwrap();
    assert_eq!(wait.code, ErrorCode::RateLimited);
    assert!(wait.message.contains("retry after 2 s"), "{}", wait.message);
    // Only that pair waits: another account from there is answered...
    assert_eq!(
        error_code(guess(&stranger, &kate).await),
        Ok(ErrorCode::InvalidCredentials)
    );
    // ...and the owner logs in from his own address, and resumes.
    let own = relay.connect().await.unwrap();
    jack.login(&own).await.unwrap();
    relay
        .connect()
        .await
        .unwrap()
        .resume("jack", &token, &jack.key)
        .await
        .unwrap();

    // The owner's success did not clear the stranger's failures: after the
    // wait one more guess is taken, and the next wait is twice as long.
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        error_code(guess(&stranger, &jack).await),
        Ok(ErrorCode::InvalidCredentials)
    );
    let wait = refusal(guess(&stranger, &jack).await).unwrap();
    assert_eq!(wait.code, ErrorCode::RateLimited);
    assert!(wait.message.contains("retry after 4 s"), "{}", wait.message);

    // Many sources together reach the account's ceiling (12 failures here:
    // 4 from 127.0.0.2, then 3 + 3 + 2 more)...
    for (last, tries) in [(3, 3), (4, 3), (5, 2)] {
        let other = SourceClient::connect(&relay, from(last)).await.unwrap();
        for _ in 0..tries {
            assert_eq!(
                error_code(guess(&other, &jack).await),
                Ok(ErrorCode::InvalidCredentials)
            );
        }
    }
    let fresh = SourceClient::connect(&relay, from(6)).await.unwrap();
    let paused = refusal(guess(&fresh, &jack).await).unwrap();
    assert_eq!(paused.code, ErrorCode::RateLimited);
    assert!(paused.message.contains("paused"), "{}", paused.message);
    // ...which pauses password logins to it, even the owner's (with a TOTP
    // code of a later step: he has used the current ones)...
    clock.advance(Duration::from_secs(60));
    let own = relay.connect().await.unwrap();
    let err = jack.login(&own).await.unwrap_err();
    let code = err.downcast_ref::<ClientError>().map(|e| match e {
        ClientError::Relay(r) => Some(r.code),
        _ => None,
    });
    assert_eq!(code, Some(Some(ErrorCode::RateLimited)), "{err}");
    // ...but never a resume, from anywhere.
    for client in [&own, &relay.connect().await.unwrap()] {
        client.resume("jack", &token, &jack.key).await.unwrap();
    }
    let resumed = fresh.resume("jack", &token, &jack.key).await;
    assert!(
        matches!(resumed, Ok(Response::LoggedIn { .. })),
        "{resumed:?}"
    );
    // Other accounts log in as usual.
    kate.login(&relay.connect().await.unwrap()).await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_guesser_at_the_owners_own_address_never_stops_a_resume() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.attempts_per_source = Limit {
        max: 5,
        window: Duration::from_secs(60),
    };
    let relay = TestRelay::start(config).await.unwrap();
    let mut yan = TestUser::new("yan").unwrap();
    let c = relay.connect().await.unwrap();
    yan.register(&c, &smtp).await.unwrap();
    let token = yan.login(&c).await.unwrap().token.unwrap();
    // Someone behind yan's own address (everything here is 127.0.0.1)
    // guesses until the address has no attempts left...
    let guesser = SourceClient::connect(&relay, from(1)).await.unwrap();
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(refusal(guess(&guesser, &yan).await).unwrap().code);
    }
    assert_eq!(codes.last(), Some(&ErrorCode::RateLimited), "{codes:?}");
    // ...and yan's agent resumes all the same, again and again.
    for _ in 0..3 {
        let again = relay.connect().await.unwrap();
        again.resume("yan", &token, &yan.key).await.unwrap();
    }
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn retried_registrations_do_not_delay_the_owners_login() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.login_limits.free_failures = 2;
    let relay = TestRelay::start(config).await.unwrap();
    let c = relay.connect().await.unwrap();
    let mut lena = TestUser::new("lena").unwrap();
    // Someone with lena's email and key but another password keeps asking
    // for the pending name: each is a password check, counted...
    assert!(matches!(
        c.call(&lena.register_request()).await,
        Ok(Response::RegisterPending { .. })
    ));
    smtp.wait_for_code(&lena.email, Duration::from_secs(20))
        .await
        .unwrap();
    let mut other = TestUser::new("lena").unwrap();
    other.key = IdentityKey::from_pkcs8(&lena.key.to_pkcs8().unwrap()).unwrap();
    other.password = "another long password".into();
    for _ in 0..2 {
        assert_eq!(
            error_code(c.call(&other.register_request()).await),
            Ok(ErrorCode::UsernameTaken)
        );
    }
    assert_eq!(
        error_code(c.call(&other.register_request()).await),
        Ok(ErrorCode::RateLimited)
    );
    // ...but apart from logins: lena, retrying from the same address once
    // the wait is over, finishes her registration and logs in at once.
    relay.clock().advance(Duration::from_secs(60));
    lena.use_clock(relay.clock());
    lena.register(&c, &smtp).await.unwrap();
    lena.login(&c).await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn attempts_are_rate_limited_per_address() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.attempts_per_source = Limit {
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

#[tokio::test]
async fn password_checks_past_the_workers_and_queue_are_answered_busy() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    // One check at a time, none waiting.
    config.argon2_workers = 1;
    config.argon2_queue = 0;
    let relay = TestRelay::start(config).await.unwrap();
    let c = std::sync::Arc::new(relay.connect().await.unwrap());
    let template = TestUser::new("template").unwrap();
    // Twenty registrations at once (each hashes a password).
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut request = template.register_request();
        if let Request::Register {
            username, email, ..
        } = &mut request
        {
            *username = format!("burst{i}");
            *email = format!("burst{i}@securechat.test");
        }
        let c = std::sync::Arc::clone(&c);
        burst.spawn(async move { c.call(&request).await });
    }
    let (mut pending, mut busy) = (0, 0);
    while let Some(done) = burst.join_next().await {
        match done.unwrap() {
            Ok(Response::RegisterPending { .. }) => pending += 1,
            Err(ClientError::Relay(reply)) if reply.code == ErrorCode::Busy => {
                assert_eq!(reply.message, "relay busy, retry in a moment");
                busy += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(pending >= 1 && busy >= 1, "{pending} pending, {busy} busy");
    assert_eq!(status(&relay).await["busy_refusals"], busy);
    assert_eq!(status(&relay).await["password_checks_in_use"], 0);

    // Once the burst is over, everyone is served again.
    let mut nora = TestUser::new("nora").unwrap();
    nora.register(&c, &smtp).await.unwrap();
    nora.login(&c).await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn connections_are_capped_in_all_and_per_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), None);
    config.max_connections = 4;
    config.max_connections_per_source = 2;
    let relay = TestRelay::start(config).await.unwrap();
    let online = |r: Result<Response, ClientError>| {
        assert!(matches!(r, Ok(Response::Challenge { .. })), "{r:?}");
    };

    // Two from 127.0.0.1 are fine; a third is closed with a reason.
    let first = relay.connect().await.unwrap();
    let _second = relay.connect().await.unwrap();
    let third = relay.connect().await.unwrap();
    assert_eq!(
        close_reason(third.connection(), WAIT).await.unwrap(),
        securechat_relay::close::SOURCE_FULL_REASON
    );
    // Other sources still get in, up to the relay's cap (4)...
    let two = SourceClient::connect(&relay, from(2)).await.unwrap();
    let _three = SourceClient::connect(&relay, from(3)).await.unwrap();
    online(two.call(&Request::Challenge).await);
    // ...past which connections are refused before the handshake.
    let refused = SourceClient::connect(&relay, from(4)).await.unwrap_err();
    let closed = refused
        .chain()
        .find_map(|e| e.downcast_ref::<ClientError>());
    assert!(
        matches!(closed, Some(ClientError::Refused { .. })),
        "{refused:#}"
    );
    let s = status(&relay).await;
    assert_eq!(s["refused_connections_source_full"], 1);
    assert_eq!(s["refused_connections_relay_full"], 1);

    // A place that is given back can be taken again.
    first.close("done").await;
    let again = relay.connect().await.unwrap();
    online(again.call(&Request::Challenge).await);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn connections_without_a_login_are_closed_after_the_time_limit() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    let minute = securechat_relay::config::DEFAULT_UNAUTHENTICATED_TIMEOUT;
    config.unauthenticated_timeout = minute;
    let relay = TestRelay::start(config).await.unwrap();
    let clock = relay.clock().clone();
    let second = Duration::from_secs(1);
    let idle = relay.connect().await.unwrap();
    let registering = relay.connect().await.unwrap();
    let user = relay.connect().await.unwrap();
    let mut olga = TestUser::new("olga").unwrap();
    olga.use_clock(&clock);
    olga.register(&user, &smtp).await.unwrap();
    olga.login(&user).await.unwrap();

    // Half-way, a registration step succeeds on one of them.
    clock.advance(minute / 2);
    let pia = TestUser::new("pia").unwrap();
    assert!(matches!(
        registering.call(&pia.register_request()).await,
        Ok(Response::RegisterPending { .. })
    ));
    // A minute after the start, the idle one is closed with a reason...
    clock.advance(minute / 2 + second);
    assert_eq!(
        close_reason(idle.connection(), WAIT).await.unwrap(),
        securechat_relay::close::LOGIN_TIMEOUT_REASON
    );
    // ...the registering one has the rest of its new minute, and the
    // logged-in one has no limit.
    assert!(registering.call(&Request::Challenge).await.is_ok());
    assert!(user.call(&Request::Online).await.is_ok());
    clock.advance(minute / 2);
    assert_eq!(
        close_reason(registering.connection(), WAIT).await.unwrap(),
        securechat_relay::close::LOGIN_TIMEOUT_REASON
    );
    // After a logout the time runs again.
    assert_eq!(user.call(&Request::Logout).await.unwrap(), Response::Ok);
    clock.advance(minute - second);
    assert!(user.call(&Request::Challenge).await.is_ok());
    clock.advance(second);
    assert_eq!(
        close_reason(user.connection(), WAIT).await.unwrap(),
        securechat_relay::close::LOGIN_TIMEOUT_REASON
    );
    assert_eq!(status(&relay).await["unauthenticated_timeouts"], 3);
    relay.stop().await.unwrap();
}

/// Send a fresh message from `from` to `to` on `client`.
async fn send(
    client: &RelayClient,
    from: &TestUser,
    to: &TestUser,
) -> Result<Response, ClientError> {
    let envelope = from.seal_to(&to.name, to.key.public_key(), b"hi").unwrap();
    client.call(&Request::Send { envelope }).await
}

#[tokio::test]
async fn sends_are_limited_per_sender() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.sends_per_sender = Limit {
        max: 3,
        window: Duration::from_secs(60),
    };
    let relay = TestRelay::start(config).await.unwrap();
    let (mut sam, mut rita) = (
        TestUser::new("sam").unwrap(),
        TestUser::new("rita").unwrap(),
    );
    let (q, r) = (
        relay.connect().await.unwrap(),
        relay.connect().await.unwrap(),
    );
    sam.register(&q, &smtp).await.unwrap();
    rita.register(&r, &smtp).await.unwrap();
    sam.login(&q).await.unwrap();
    rita.login(&r).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            send(&q, &sam, &rita).await,
            Ok(Response::Stored { .. })
        ));
    }
    let reply = refusal(send(&q, &sam, &rita).await).unwrap();
    assert_eq!(reply.code, ErrorCode::RateLimited);
    assert!(
        reply
            .message
            .contains("sending too fast (at most 3 messages per 60 s); retry after "),
        "{}",
        reply.message
    );
    // Another sender is not held back; the fast one is, until the minute is over.
    assert!(send(&r, &rita, &sam).await.is_ok());
    relay.clock().advance(Duration::from_secs(60));
    assert!(send(&q, &sam, &rita).await.is_ok());
    let s = status(&relay).await;
    assert_eq!(s["send_rate_refusals"], 1);
    assert_eq!(s["messages_accepted"], 5);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn one_sender_fills_only_half_of_a_queue_and_is_not_told_about_it() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    config.quota.messages = 4;
    let relay = TestRelay::start(config).await.unwrap();
    let c = relay.connect().await.unwrap();
    let [mut tom, mut uma, mut vic] = ["tom", "uma", "vic"].map(|n| TestUser::new(n).unwrap());
    for user in [&mut tom, &mut uma, &mut vic] {
        user.register(&c, &smtp).await.unwrap();
    }
    let (t, u) = (
        relay.connect().await.unwrap(),
        relay.connect().await.unwrap(),
    );
    tom.login(&t).await.unwrap();
    uma.login(&u).await.unwrap();

    // tom floods vic: two fit (half of 4), then the same answer as a full
    // queue.
    for _ in 0..2 {
        assert!(matches!(
            send(&t, &tom, &vic).await,
            Ok(Response::Stored { .. })
        ));
    }
    let share = refusal(send(&t, &tom, &vic).await).unwrap();
    assert_eq!(share.code, ErrorCode::QuotaExceeded);
    assert_eq!(
        share.message,
        "\"vic\" cannot take more messages from you right now; try again later"
    );
    // uma still gets through to vic, until the queue itself is full.
    for _ in 0..2 {
        assert!(matches!(
            send(&u, &uma, &vic).await,
            Ok(Response::Stored { .. })
        ));
    }
    // Word for word the same: the sender cannot tell which limit it met.
    assert_eq!(refusal(send(&u, &uma, &vic).await).unwrap(), share);
    let s = status(&relay).await;
    assert_eq!(s["sender_share_refusals"], 1);
    assert_eq!(s["quota_refusals"], 1);

    // vic takes one of tom's: tom has room for one again.
    let v = relay.connect().await.unwrap();
    vic.login(&v).await.unwrap();
    let mut pushes = v.accept_pushes().await.unwrap();
    let Ok(Push::Deliver {
        envelope: first, ..
    }) = next_queued(&mut pushes, WAIT).await
    else {
        panic!("no push");
    };
    assert_eq!(first.sender, "tom");
    v.call(&Request::Ack {
        id: first.id,
        outcome: AckOutcome::Stored,
    })
    .await
    .unwrap();
    assert!(matches!(
        send(&t, &tom, &vic).await,
        Ok(Response::Stored { .. })
    ));
    assert_eq!(
        error_code(send(&t, &tom, &vic).await),
        Ok(ErrorCode::QuotaExceeded)
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_that_expires_ends_its_live_connection() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&smtp));
    let hour = Duration::from_secs(3600);
    config.session_ttl = hour;
    let relay = TestRelay::start(config).await.unwrap();
    let clock = relay.clock().clone();
    let [mut wes, mut xia] = ["wes", "xia"].map(|n| TestUser::new(n).unwrap());
    let c = relay.connect().await.unwrap();
    for user in [&mut wes, &mut xia] {
        user.use_clock(&clock);
        user.register(&c, &smtp).await.unwrap();
    }
    let w = relay.connect().await.unwrap();
    let token = wes.login(&w).await.unwrap().token.unwrap();
    // xia's session starts half an hour later, so it outlives wes's.
    clock.advance(hour / 2);
    let x = relay.connect().await.unwrap();
    xia.login(&x).await.unwrap();
    send(&x, &xia, &wes).await.unwrap();
    let mut pushes = w.accept_pushes().await.unwrap();
    assert!(matches!(
        next_queued(&mut pushes, WAIT).await,
        Ok(Push::Deliver { .. })
    ));

    // A minute before the expiry wes's connection works...
    clock.advance(hour / 2 - Duration::from_secs(60));
    assert!(matches!(
        send(&w, &wes, &xia).await,
        Ok(Response::Stored { .. })
    ));
    // ...at the expiry it is closed with a reason, push stream and all,
    // without waiting for a resume.
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        close_reason(w.connection(), WAIT).await.unwrap(),
        securechat_relay::close::SESSION_EXPIRED_REASON
    );
    assert!(pushes.next().await.is_none_or(|p| p.is_err()));
    let again = relay.connect().await.unwrap();
    let r = again.resume("wes", &token, &wes.key).await.unwrap_err();
    assert!(
        matches!(&r, ClientError::Relay(e) if e.code == ErrorCode::SessionExpired),
        "{r}"
    );
    // xia's session goes on.
    assert!(matches!(
        send(&x, &xia, &wes).await,
        Ok(Response::Stored { .. })
    ));
    assert_eq!(status(&relay).await["sessions_ended"], 1);
    relay.stop().await.unwrap();
}
