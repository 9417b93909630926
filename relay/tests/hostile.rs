//! Other users are adversaries too: hostile inputs against one real relay
//! over real QUIC, each with the exact answer it must get, and after all of
//! them honest users still register, log in, send and receive.
//!
//! The table below lists each case: what it tries, what is sent, and the
//! outcome expected (an error code, a connection closed with a given
//! reason, or — where the hostile part is someone else's doing — that the
//! honest request still succeeds). The cases run in order on one relay, so
//! that each also shows the relay still serving after the ones before it.
//! Time-dependent cases move the relay's clock rather than waiting.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use securechat_client::relay::{ClientError, LoggedIn, RelayClient};
use securechat_common::crypto::{IdentityKey, KeySize};
use securechat_common::limits::MAX_CIPHERTEXT_LEN;
use securechat_common::protocol::{
    AckOutcome, ErrorCode, Push, Request, Response, PROTOCOL_VERSION,
};
use securechat_common::Envelope;
use securechat_relay::close;
use securechat_relay::config::DEFAULT_UNAUTHENTICATED_TIMEOUT;
use securechat_relay::ratelimit::Limit;
use securechat_testkit::relay::test_config;
use securechat_testkit::{
    close_reason, http_get, next_queued, raw_request, SmtpServer, SourceClient, TestRelay, TestUser,
};
use zeroize::Zeroizing;

/// How long a test waits for a push.
const WAIT: Duration = Duration::from_secs(10);

/// What the relay did with a hostile request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Refused with this code.
    Refused(ErrorCode),
    /// The connection was closed with this reason.
    Closed(&'static [u8]),
    /// A login or resume succeeded (the honest side of a case).
    LoggedIn,
    /// Answered `Ok` (and did nothing it should not have; the case checks).
    Accepted,
}

/// Every close reason the relay sends, to name the one seen.
const REASONS: [&[u8]; 7] = [
    close::SOURCE_FULL_REASON,
    close::RELAY_FULL_REASON,
    close::LOGIN_TIMEOUT_REASON,
    close::SUPERSEDED_REASON,
    close::LOGGED_OUT_REASON,
    close::SESSION_EXPIRED_REASON,
    close::BAD_FRAMES_REASON,
];

/// The outcome of `result`, a call on `conn`.
fn outcome(conn: &quinn::Connection, result: Result<Response, ClientError>) -> Outcome {
    match result {
        Err(ClientError::Relay(reply)) | Ok(Response::Error(reply)) => Outcome::Refused(reply.code),
        Ok(Response::LoggedIn { .. }) => Outcome::LoggedIn,
        Ok(Response::Ok) => Outcome::Accepted,
        Ok(other) => panic!("unexpected answer {other:?}"),
        Err(e) => match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => closed_with(&c.reason),
            other => panic!("neither an answer nor a close with a reason: {e} / {other:?}"),
        },
    }
}

/// The outcome of a login or resume on `conn`.
fn login_outcome(conn: &quinn::Connection, result: Result<LoggedIn, ClientError>) -> Outcome {
    match result {
        Ok(_) => Outcome::LoggedIn,
        Err(e) => outcome(conn, Err(e)),
    }
}

/// A raw request's answer as a call result.
fn answered(result: anyhow::Result<Response>) -> Result<Response, ClientError> {
    result.map_err(|e| ClientError::Stream(format!("{e:#}")))
}

fn closed_with(reason: &[u8]) -> Outcome {
    match REASONS.iter().find(|r| **r == reason) {
        Some(known) => Outcome::Closed(known),
        None => panic!(
            "closed with an unknown reason {:?}",
            String::from_utf8_lossy(reason)
        ),
    }
}

/// Wait (bounded) until the relay closes `conn`, and say why.
async fn closed(conn: &quinn::Connection) -> Outcome {
    closed_with(&close_reason(conn, Duration::from_secs(10)).await.unwrap())
}

fn from(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// One frame as the codec lays it out (length, version, postcard body),
/// without the sender-side size check, so a peer can send what agentd never
/// would.
fn frame_unchecked(request: &Request) -> Vec<u8> {
    let body = postcard::to_stdvec(request).unwrap();
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(PROTOCOL_VERSION);
    frame.extend_from_slice(&body);
    frame
}

/// The relay and the people on it.
struct World {
    smtp: SmtpServer,
    relay: TestRelay,
    alice: TestUser,
    /// alice's live connection and session token.
    a: RelayClient,
    alice_token: Vec<u8>,
    bob: TestUser,
    b: RelayClient,
    /// Registered, offline: the target of floods.
    carol: TestUser,
    /// Sends what she should not, on `m`.
    mallory: TestUser,
    m: RelayClient,
    /// Sends too fast, on `f`.
    flo: TestUser,
    f: RelayClient,
    /// Fills carol's queue, on `s`.
    sid: TestUser,
    s: RelayClient,
    /// Ids sid queued for carol (carol must get them in the end).
    for_carol: Vec<securechat_common::MessageId>,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        let smtp = SmtpServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path(), Some(&smtp));
        config.max_connections_per_source = 16;
        config.unauthenticated_timeout = DEFAULT_UNAUTHENTICATED_TIMEOUT;
        // One password check at a time, none waiting.
        config.argon2_workers = 1;
        config.argon2_queue = 0;
        config.sends_per_sender = Limit {
            max: 5,
            window: Duration::from_secs(60),
        };
        // Half of it (2 messages) per sender.
        config.quota.messages = 4;
        // The real password-guessing limits, not the test_config ones.
        config.login_limits = Default::default();
        config.session_ttl = Duration::from_secs(24 * 3600);
        let relay = TestRelay::start(config).await.unwrap();
        let setup = relay.connect().await.unwrap();
        let mut users = Vec::new();
        for name in ["alice", "bob", "carol", "mallory", "flo", "sid"] {
            let mut user = TestUser::new(name).unwrap();
            user.use_clock(relay.clock());
            user.register(&setup, &smtp).await.unwrap();
            users.push(user);
        }
        let [mut alice, mut bob, carol, mut mallory, mut flo, mut sid] =
            <[TestUser; 6]>::try_from(users).unwrap();
        let (a, alice_token) = online(&relay, &mut alice).await;
        let (b, _) = online(&relay, &mut bob).await;
        let (m, _) = online(&relay, &mut mallory).await;
        let (f, _) = online(&relay, &mut flo).await;
        let (s, _) = online(&relay, &mut sid).await;
        setup.close("set up").await;
        World {
            smtp,
            relay,
            alice,
            a,
            alice_token,
            bob,
            b,
            carol,
            mallory,
            m,
            flo,
            f,
            sid,
            s,
            for_carol: Vec::new(),
            _dir: dir,
        }
    }

    fn clock(&self) -> &securechat_relay::clock::Clock {
        self.relay.clock()
    }

    async fn status(&self) -> serde_json::Value {
        let body = http_get(self.relay.status_addr().unwrap(), "/status.json")
            .await
            .unwrap();
        serde_json::from_str(&body).unwrap()
    }
}

/// `user` logged in on a new connection, and the session token.
async fn online(relay: &TestRelay, user: &mut TestUser) -> (RelayClient, Vec<u8>) {
    let client = relay.connect().await.unwrap();
    let token = user.login(&client).await.unwrap().token.unwrap();
    (client, token.to_vec())
}

/// An envelope from `from` to `to`.
fn letter(from: &TestUser, to: &TestUser) -> Envelope {
    from.seal_to(&to.name, to.key.public_key(), b"hello")
        .unwrap()
}

type Run = for<'a> fn(&'a mut World) -> Pin<Box<dyn Future<Output = Outcome> + 'a>>;

struct Case {
    /// What the hostile party tries.
    what: &'static str,
    /// What goes over the wire.
    sent: &'static str,
    /// What the relay must do.
    expect: Outcome,
    run: Run,
}

macro_rules! case {
    ($what:expr, $sent:expr, $expect:expr, |$w:ident| $body:block) => {
        Case {
            what: $what,
            sent: $sent,
            expect: $expect,
            run: |$w: &mut World| Box::pin(async move $body),
        }
    };
}

fn cases() -> Vec<Case> {
    use Outcome::{Accepted, Closed, LoggedIn, Refused};
    vec![
        case!(
            "bytes that are no frame",
            "00 00 00 09 <this build's protocol version> 'garbage!'",
            Refused(ErrorCode::BadRequest),
            |w| {
                let garbage = [&[0, 0, 0, 9, PROTOCOL_VERSION][..], b"garbage!"].concat();
                let r = raw_request(&w.m, &garbage).await;
                outcome(w.m.connection(), answered(r))
            }
        ),
        case!(
            "a length prefix of 4 GiB",
            "ff ff ff ff",
            Refused(ErrorCode::FrameTooLarge),
            |w| {
                let r = raw_request(&w.m, &u32::MAX.to_be_bytes()).await;
                outcome(w.m.connection(), answered(r))
            }
        ),
        case!(
            "another protocol version",
            "Online framed with version 2",
            Refused(ErrorCode::UnsupportedVersion),
            |w| {
                let mut frame = frame_unchecked(&Request::Online);
                frame[4] = PROTOCOL_VERSION + 1;
                let r = raw_request(&w.m, &frame).await;
                outcome(w.m.connection(), answered(r))
            }
        ),
        case!(
            "an oversized username in Login (never an account: the unknown user's answer)",
            "Challenge, then Login { username: 200 KiB of 'a' }",
            Refused(ErrorCode::InvalidCredentials),
            |w| {
                let c = w.relay.connect().await.unwrap();
                let huge = "a".repeat(200 * 1024);
                let r = c.login(&huge, "a password", "123456", &w.mallory.key).await;
                login_outcome(c.connection(), r)
            }
        ),
        case!(
            "a 64 KiB username in Resume",
            "Challenge, then Resume { username: 64 KiB of 'b', token: alice's }",
            Refused(ErrorCode::SessionExpired),
            |w| {
                let c = w.relay.connect().await.unwrap();
                let huge = "b".repeat(64 * 1024);
                let r = c.resume(&huge, &w.alice_token, &w.alice.key).await;
                login_outcome(c.connection(), r)
            }
        ),
        case!(
            "a 64 KiB username in Verify",
            "Verify { username: 64 KiB of 'c', code: \"123456\" }",
            Refused(ErrorCode::NoPendingRegistration),
            |w| {
                let r =
                    w.m.call(&Request::Verify {
                        username: "c".repeat(64 * 1024),
                        code: Zeroizing::new("123456".into()),
                    })
                    .await;
                if let Err(ClientError::Relay(reply)) = &r {
                    assert!(reply.message.len() < 200, "the name is echoed");
                }
                outcome(w.m.connection(), r)
            }
        ),
        case!(
            "a 64 KiB username in LookupKey",
            "LookupKey { username: 64 KiB of 'd' }",
            Refused(ErrorCode::UnknownUser),
            |w| {
                let r =
                    w.m.call(&Request::LookupKey {
                        username: "d".repeat(64 * 1024),
                    })
                    .await;
                outcome(w.m.connection(), r)
            }
        ),
        case!(
            "sending without logging in",
            "Send { envelope from mallory } on a new connection",
            Refused(ErrorCode::NotAuthenticated),
            |w| {
                let c = w.relay.connect().await.unwrap();
                let envelope = letter(&w.mallory, &w.carol);
                let r = c.call(&Request::Send { envelope }).await;
                outcome(c.connection(), r)
            }
        ),
        case!(
            "a login as another user on a logged-in connection",
            "Challenge, then Login { username: \"alice\" } on bob's connection",
            Refused(ErrorCode::BadRequest),
            |w| {
                let code = w.alice.totp_at_step(w.alice.step_now()).unwrap();
                let r =
                    w.b.login("alice", &w.alice.password, &code, &w.alice.key)
                        .await;
                login_outcome(w.b.connection(), r)
            }
        ),
        case!(
            "an envelope with a forged sender",
            "Send { envelope sealed and signed by alice } on mallory's connection",
            Refused(ErrorCode::NotSender),
            |w| {
                let envelope = letter(&w.alice, &w.carol);
                let r = w.m.call(&Request::Send { envelope }).await;
                outcome(w.m.connection(), r)
            }
        ),
        case!(
            "an envelope with a 10 KiB wrapped key",
            "Send { envelope.wrapped_key: 10 KiB }",
            Refused(ErrorCode::BadRequest),
            |w| {
                let mut envelope = letter(&w.mallory, &w.carol);
                envelope.slots[0].wrapped_key = vec![7; 10 * 1024];
                let r = w.m.call(&Request::Send { envelope }).await;
                outcome(w.m.connection(), r)
            }
        ),
        case!(
            "an envelope over the message size",
            "Send { envelope.ciphertext: 64 KiB + 17 bytes }",
            Refused(ErrorCode::MessageTooLarge),
            |w| {
                let mut envelope = letter(&w.mallory, &w.carol);
                envelope.ciphertext = vec![7; MAX_CIPHERTEXT_LEN + 1];
                let r = w.m.call(&Request::Send { envelope }).await;
                outcome(w.m.connection(), r)
            }
        ),
        case!(
            "an envelope over the frame size",
            "Send { envelope.ciphertext: 300 KiB }, framed by hand",
            Refused(ErrorCode::FrameTooLarge),
            |w| {
                let mut envelope = letter(&w.mallory, &w.carol);
                envelope.ciphertext = vec![7; 300 * 1024];
                let frame = frame_unchecked(&Request::Send { envelope });
                let r = raw_request(&w.m, &frame).await;
                assert_eq!(w.status().await["queued_messages"], 0, "nothing stored");
                outcome(w.m.connection(), answered(r))
            }
        ),
        case!(
            "sending faster than the per-sender rate",
            "6 × Send from flo within a minute (limit 5)",
            Refused(ErrorCode::RateLimited),
            |w| {
                let to = [&w.alice, &w.alice, &w.bob, &w.bob, &w.mallory];
                for recipient in to {
                    let envelope = letter(&w.flo, recipient);
                    let r = w.f.call(&Request::Send { envelope }).await;
                    assert!(matches!(r, Ok(Response::Stored { .. })), "{r:?}");
                }
                let envelope = letter(&w.flo, &w.alice);
                let r = w.f.call(&Request::Send { envelope }).await;
                outcome(w.f.connection(), r)
            }
        ),
        case!(
            "filling more than one sender's share of someone's queue",
            "3 × Send from sid to carol (quota 4, share 50 %)",
            Refused(ErrorCode::QuotaExceeded),
            |w| {
                for _ in 0..2 {
                    let envelope = letter(&w.sid, &w.carol);
                    w.for_carol.push(envelope.id);
                    let r = w.s.call(&Request::Send { envelope }).await;
                    assert!(matches!(r, Ok(Response::Stored { .. })), "{r:?}");
                }
                let envelope = letter(&w.sid, &w.carol);
                let r = w.s.call(&Request::Send { envelope }).await;
                if let Err(ClientError::Relay(reply)) = &r {
                    assert_eq!(
                        reply.message,
                        "\"carol\" cannot take more messages from you right now; try again later"
                    );
                }
                outcome(w.s.connection(), r)
            }
        ),
        case!(
            "acknowledging someone else's message",
            "Ack { id of sid's message to carol } on mallory's connection",
            Accepted,
            |w| {
                let before = w.status().await["queued_messages"].clone();
                let r =
                    w.m.call(&Request::Ack {
                        id: w.for_carol[0],
                        outcome: AckOutcome::Stored,
                    })
                    .await;
                // Acks only ever touch the acker's own queue.
                assert_eq!(w.status().await["queued_messages"], before);
                outcome(w.m.connection(), r)
            }
        ),
        case!(
            "too many connections from one address",
            "17 QUIC connections from 127.0.0.9 (limit 16)",
            Closed(close::SOURCE_FULL_REASON),
            |w| {
                let mut held = Vec::new();
                for _ in 0..16 {
                    held.push(SourceClient::connect(&w.relay, from(9)).await.unwrap());
                }
                for c in &held {
                    assert!(c.call(&Request::Challenge).await.is_ok());
                }
                let one_more = SourceClient::connect(&w.relay, from(9)).await.unwrap();
                closed(one_more.connection()).await
            }
        ),
        case!(
            "a connection kept open without logging in",
            "a connection from 127.0.0.10, then nothing for 61 s (relay clock)",
            Closed(close::LOGIN_TIMEOUT_REASON),
            |w| {
                let idle = SourceClient::connect(&w.relay, from(10)).await.unwrap();
                assert!(idle.call(&Request::Challenge).await.is_ok());
                w.clock()
                    .advance(DEFAULT_UNAUTHENTICATED_TIMEOUT + Duration::from_secs(1));
                let why = closed(idle.connection()).await;
                // Logged-in connections have no such limit.
                assert!(w.a.call(&Request::Online).await.is_ok());
                why
            }
        ),
        case!(
            "more password checks at once than the relay runs and queues",
            "12 × Register (new names) at once (1 worker, no queue)",
            Refused(ErrorCode::Busy),
            |w| {
                let c = Arc::new(w.relay.connect().await.unwrap());
                let template = TestUser::new("template").unwrap();
                let mut burst = tokio::task::JoinSet::new();
                for i in 0..12 {
                    let mut request = template.register_request();
                    if let Request::Register {
                        username, email, ..
                    } = &mut request
                    {
                        *username = format!("burst{i}");
                        *email = format!("burst{i}@securechat.test");
                    }
                    let c = Arc::clone(&c);
                    burst.spawn(async move { c.call(&request).await });
                }
                let mut seen = Vec::new();
                while let Some(done) = burst.join_next().await {
                    let answer = done.unwrap().map(|pending| {
                        assert!(matches!(pending, Response::RegisterPending { .. }));
                        Response::Ok
                    });
                    seen.push(outcome(c.connection(), answer));
                }
                assert!(seen.contains(&Accepted), "none got through: {seen:?}");
                *seen.iter().find(|o| **o != Accepted).unwrap_or(&Accepted)
            }
        ),
        case!(
            "a wrong TOTP code with the right password (must not confirm it)",
            "Login { alice, right password, a code from outside the window }",
            Refused(ErrorCode::InvalidCredentials),
            |w| {
                let c = w.relay.connect().await.unwrap();
                let step = w.alice.step_now();
                let good = w.alice.totp_at_step(step).unwrap();
                let window: Vec<String> = (step - 1..=step + 1)
                    .map(|s| w.alice.totp_at_step(s).unwrap())
                    .collect();
                let wrong = (step + 2..step + 10)
                    .map(|s| w.alice.totp_at_step(s).unwrap())
                    .find(|code| !window.contains(code))
                    .unwrap();
                let wrong_password = c
                    .login("alice", "not alice's password", &good, &w.alice.key)
                    .await
                    .unwrap_err();
                let wrong_code = c
                    .login("alice", &w.alice.password, &wrong, &w.alice.key)
                    .await
                    .unwrap_err();
                match (&wrong_password, &wrong_code) {
                    (ClientError::Relay(p), ClientError::Relay(t)) => assert_eq!(p, t),
                    other => panic!("{other:?}"),
                }
                outcome(c.connection(), Err(wrong_code))
            }
        ),
        case!(
            "a used TOTP code with a wrong signature",
            "Login { alice, right password, the code of her last login, signed by another key }",
            Refused(ErrorCode::InvalidCredentials),
            |w| {
                // alice logs in afresh (on a new connection, which becomes hers)...
                let step = w.alice.fresh_step().unwrap();
                let code = w.alice.totp_at_step(step).unwrap();
                let a = w.relay.connect().await.unwrap();
                a.login("alice", &w.alice.password, &code, &w.alice.key)
                    .await
                    .unwrap();
                w.alice.used_step(step);
                w.a = a;
                // ...and someone replays her code with another key.
                let other = IdentityKey::generate(KeySize::Rsa2048).unwrap();
                let c = w.relay.connect().await.unwrap();
                let r = c.login("alice", &w.alice.password, &code, &other).await;
                login_outcome(c.connection(), r)
            }
        ),
        case!(
            "50 password guesses against alice from another address, then her resume",
            "50 × Login { alice, wrong password } from 127.0.0.2; Resume { alice, token }",
            LoggedIn,
            |w| {
                let guesser = SourceClient::connect(&w.relay, from(2)).await.unwrap();
                let (mut wrong, mut delayed) = (0, 0);
                for _ in 0..50 {
                    let r = guesser
                        .login("alice", "a guess", "000000", &w.mallory.key)
                        .await;
                    match outcome(guesser.connection(), r) {
                        Refused(ErrorCode::InvalidCredentials) => wrong += 1,
                        Refused(ErrorCode::RateLimited) => delayed += 1,
                        other => panic!("{other:?}"),
                    }
                }
                // Five at once, then a wait of 2 s, doubling: on a slow
                // machine a wait may run out during the fifty.
                assert!((5..=8).contains(&wrong), "{wrong} wrong, {delayed} delayed");
                assert_eq!(wrong + delayed, 50);
                // alice's password login from her own address is not held up...
                let step = w.alice.fresh_step().unwrap();
                let code = w.alice.totp_at_step(step).unwrap();
                let own = w.relay.connect().await.unwrap();
                own.login("alice", &w.alice.password, &code, &w.alice.key)
                    .await
                    .unwrap();
                w.alice.used_step(step);
                // ...and her agent's resume never is.
                let a = w.relay.connect().await.unwrap();
                let r = a.resume("alice", &w.alice_token, &w.alice.key).await;
                let resumed = login_outcome(a.connection(), r);
                w.a = a;
                resumed
            }
        ),
        case!(
            "a session used on a second connection, then logged out",
            "Resume { alice, token } on two connections; Logout on the second; Online on the first",
            Closed(close::SUPERSEDED_REASON),
            |w| {
                // The relay keeps one live connection per user: the second
                // resume already closes the first; the logout then leaves
                // nothing logged in with the token anywhere.
                let first = std::mem::replace(&mut w.a, w.relay.connect().await.unwrap());
                w.a.resume("alice", &w.alice_token, &w.alice.key)
                    .await
                    .unwrap();
                assert_eq!(w.a.call(&Request::Logout).await.unwrap(), Response::Ok);
                assert!(matches!(
                    w.a.call(&Request::Online).await,
                    Err(ClientError::Relay(ref e)) if e.code == ErrorCode::NotAuthenticated
                ));
                let again = w.relay.connect().await.unwrap();
                assert!(matches!(
                    again.resume("alice", &w.alice_token, &w.alice.key).await,
                    Err(ClientError::Relay(ref e)) if e.code == ErrorCode::SessionExpired
                ));
                let r = first.call(&Request::Online).await;
                outcome(first.connection(), r)
            }
        ),
        case!(
            "a session that expires while its connection is open",
            "bob's connection, then the relay clock moved past his session's expiry",
            Closed(close::SESSION_EXPIRED_REASON),
            |w| {
                assert!(w.b.call(&Request::Online).await.is_ok());
                w.clock().advance(Duration::from_secs(24 * 3600 + 1));
                closed(w.b.connection()).await
            }
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_their_exact_answer_and_honest_users_carry_on() {
    let mut w = World::new().await;
    let cases = cases();
    assert!(cases.len() >= 15);
    for case in &cases {
        let got = (case.run)(&mut w).await;
        assert_eq!(
            got, case.expect,
            "{}\n  sent: {}\n  got {got:?}, want {:?}",
            case.what, case.sent, case.expect
        );
        // The relay serves after each one.
        let probe = w.relay.connect().await.unwrap();
        assert!(
            matches!(
                probe.call(&Request::Challenge).await,
                Ok(Response::Challenge { .. })
            ),
            "the relay stopped serving after: {}",
            case.what
        );
    }
    let s = w.status().await;
    for counter in [
        "refused_connections_source_full",
        "unauthenticated_timeouts",
        "busy_refusals",
        "send_rate_refusals",
        "sender_share_refusals",
        "sessions_ended",
    ] {
        assert!(s[counter].as_u64().unwrap() >= 1, "{counter}: {s}");
    }

    // Honest users: two new ones register, log in, send and receive...
    let [mut dora, mut eve] = ["dora", "eve"].map(|n| TestUser::new(n).unwrap());
    let (d, e) = (
        w.relay.connect().await.unwrap(),
        w.relay.connect().await.unwrap(),
    );
    for (user, client) in [(&mut dora, &d), (&mut eve, &e)] {
        user.use_clock(w.relay.clock());
        user.register(client, &w.smtp).await.unwrap();
        user.login(client).await.unwrap();
    }
    let envelope = letter(&dora, &eve);
    let r = d
        .call(&Request::Send {
            envelope: envelope.clone(),
        })
        .await;
    assert!(matches!(r, Ok(Response::Stored { .. })), "{r:?}");
    let mut pushes = e.accept_pushes().await.unwrap();
    let Ok(Push::Deliver { envelope: got, .. }) = next_queued(&mut pushes, WAIT).await else {
        panic!("eve got nothing");
    };
    assert_eq!(got, envelope);
    assert_eq!(
        e.call(&Request::Ack {
            id: got.id,
            outcome: AckOutcome::Stored,
        })
        .await
        .unwrap(),
        Response::Ok
    );
    // ...and carol, offline through all of it, gets everything sent to her:
    // mallory's ack of one of her messages removed nothing.
    let c = w.relay.connect().await.unwrap();
    let logged = w.carol.login(&c).await.unwrap();
    assert_eq!(logged.unread, w.for_carol.len() as u64);
    let mut pushes = c.accept_pushes().await.unwrap();
    for id in &w.for_carol {
        let Ok(Push::Deliver { envelope: got, .. }) = next_queued(&mut pushes, WAIT).await else {
            panic!("carol got nothing");
        };
        assert_eq!(got.id, *id);
        assert_eq!(got.sender, w.sid.name);
    }
    w.relay.stop().await.unwrap();
}
