//! Registration steps whose answer was lost can be retried by the same
//! client, through a real relay, a real SMTP server and the real QUIC
//! client: a repeated `Verify` gets the same TOTP secret until the first
//! login, and a repeated `Register` (same email, key and password) mails a
//! new code that replaces the old one. Nobody else gains anything.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use securechat_client::relay::{ClientError, RelayClient};
use securechat_common::crypto::{IdentityKey, KeySize};
use securechat_common::protocol::{ErrorCode, ErrorReply, Request, Response};
use securechat_relay::config::DEFAULT_CODE_TTL;
use securechat_testkit::relay::test_config;
use securechat_testkit::{error_code, SmtpServer, TestRelay, TestUser};
use zeroize::Zeroizing;

const WAIT: Duration = Duration::from_secs(20);
/// More than a test takes between two steps, less than any lifetime it checks.
const MINUTE: Duration = Duration::from_secs(60);

async fn started() -> (SmtpServer, tempfile::TempDir, TestRelay) {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    (smtp, dir, relay)
}

/// Send `Register` and wait for the mailed code.
async fn register(c: &RelayClient, smtp: &SmtpServer, user: &TestUser) -> String {
    let r = c.call(&user.register_request()).await;
    assert!(matches!(r, Ok(Response::RegisterPending { .. })), "{r:?}");
    smtp.wait_for_code(&user.email, WAIT).await.unwrap()
}

fn verify_request(name: &str, code: &str) -> Request {
    Request::Verify {
        username: name.into(),
        code: Zeroizing::new(code.into()),
    }
}

/// A six-digit code that is not `code`.
fn other_than(code: &str) -> &'static str {
    if code == "000000" {
        "111111"
    } else {
        "000000"
    }
}

fn same_key(user: &TestUser) -> IdentityKey {
    IdentityKey::from_pkcs8(&user.key.to_pkcs8().unwrap()).unwrap()
}

fn refusal(r: Result<Response, ClientError>) -> ErrorReply {
    match r {
        Err(ClientError::Relay(reply)) => reply,
        other => panic!("not a relay refusal: {other:?}"),
    }
}

#[tokio::test]
async fn verify_is_answered_again_with_the_same_secret_until_the_first_login() {
    let (smtp, _dir, relay) = started().await;
    let c = relay.connect().await.unwrap();
    let mut alice = TestUser::new("alice").unwrap();
    let code = register(&c, &smtp, &alice).await;

    alice.verify(&c, &code).await.unwrap();
    let first = alice.totp.as_ref().unwrap().get_secret_base32();
    // The first answer was "lost": the same code on a new connection gets
    // the same secret, not a new one.
    let again = relay.connect().await.unwrap();
    alice.verify(&again, &code).await.unwrap();
    assert_eq!(alice.totp.as_ref().unwrap().get_secret_base32(), first);

    // The account logs in with that secret...
    let l = relay.connect().await.unwrap();
    alice.login(&l).await.unwrap();
    // ...and after a login nothing is repeated.
    assert_eq!(
        error_code(c.call(&verify_request("alice", &code)).await),
        Ok(ErrorCode::NoPendingRegistration)
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn repeated_verify_counts_wrong_codes_with_the_registration() {
    let (smtp, _dir, relay) = started().await;
    let c = relay.connect().await.unwrap();
    let mut bob = TestUser::new("bob").unwrap();
    let code = register(&c, &smtp, &bob).await;
    let wrong = other_than(&code);

    // Two wrong codes before the activation (5 attempts by default)...
    for left in [4, 3] {
        let reply = refusal(c.call(&verify_request("bob", wrong)).await);
        assert_eq!(reply.code, ErrorCode::WrongCode);
        assert!(reply.message.contains(&format!("{left} attempt(s) left")));
    }
    bob.verify(&c, &code).await.unwrap();
    // ...the right one was the third; the count goes on after it.
    let reply = refusal(c.call(&verify_request("bob", wrong)).await);
    assert_eq!(reply.code, ErrorCode::WrongCode);
    assert!(
        reply.message.contains("1 attempt(s) left"),
        "{}",
        reply.message
    );
    assert_eq!(
        error_code(c.call(&verify_request("bob", wrong)).await),
        Ok(ErrorCode::TooManyAttempts)
    );
    // Locked: even the right code no longer shows the secret.
    assert_eq!(
        error_code(c.call(&verify_request("bob", &code)).await),
        Ok(ErrorCode::TooManyAttempts)
    );
    // The account itself is fine.
    bob.login(&c).await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn repeated_verify_ends_when_the_code_expires() {
    let (smtp, _dir, relay) = started().await;
    let c = relay.connect().await.unwrap();
    let mut carol = TestUser::new("carol").unwrap();
    carol.use_clock(relay.clock());
    let code = register(&c, &smtp, &carol).await;
    carol.verify(&c, &code).await.unwrap();
    // A minute before the code's expiry the answer is still repeated...
    relay.clock().advance(DEFAULT_CODE_TTL - MINUTE);
    carol.verify(&c, &code).await.unwrap();
    // ...from the expiry on it is not.
    relay.clock().advance(MINUTE);
    assert_eq!(
        error_code(c.call(&verify_request("carol", &code)).await),
        Ok(ErrorCode::NoPendingRegistration)
    );
    // The account stays, with the secret from the first answer.
    carol.login(&c).await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn register_retried_by_the_same_client_mails_a_new_code() {
    let (smtp, _dir, relay) = started().await;
    let c = relay.connect().await.unwrap();
    let mut dave = TestUser::new("dave").unwrap();
    let old = register(&c, &smtp, &dave).await;
    // Use up most attempts on the old code.
    for _ in 0..4 {
        assert_eq!(
            error_code(c.call(&verify_request("dave", other_than(&old))).await),
            Ok(ErrorCode::WrongCode)
        );
    }

    // Anyone else asking for the name is refused, and nothing is mailed.
    let mut other_email = TestUser::new("dave").unwrap();
    other_email.key = same_key(&dave);
    other_email.password = dave.password.clone();
    other_email.email = "someone-else@securechat.test".into();
    let mut other_key = TestUser::new("dave").unwrap();
    other_key.email = dave.email.clone();
    other_key.password = dave.password.clone();
    other_key.key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
    let mut other_password = TestUser::new("dave").unwrap();
    other_password.key = same_key(&dave);
    other_password.email = dave.email.clone();
    other_password.password = "another long password".into();
    for impostor in [&other_email, &other_key, &other_password] {
        assert_eq!(
            error_code(c.call(&impostor.register_request()).await),
            Ok(ErrorCode::UsernameTaken)
        );
    }
    let mails = smtp.messages().len();

    // The same client retrying gets a new mail with a new code.
    let again = relay.connect().await.unwrap();
    let new = register(&again, &smtp, &dave).await;
    assert_eq!(smtp.messages().len(), mails + 1);
    if new != old {
        assert_eq!(
            error_code(again.call(&verify_request("dave", &old)).await),
            Ok(ErrorCode::WrongCode),
            "the old code no longer works"
        );
    }
    // The attempt count is fresh: with the old code above, four wrong
    // codes in all are still only "wrong".
    for _ in 0..3 {
        assert_eq!(
            error_code(again.call(&verify_request("dave", other_than(&new))).await),
            Ok(ErrorCode::WrongCode)
        );
    }
    dave.verify(&again, &new).await.unwrap();
    dave.login(&again).await.unwrap();

    // Once the account exists, the same request is simply taken.
    assert_eq!(
        error_code(c.call(&dave.register_request()).await),
        Ok(ErrorCode::UsernameTaken)
    );
    relay.stop().await.unwrap();
}
