//! Verification mail over TLS, through a real in-process SMTP server whose
//! certificate comes from a test CA: STARTTLS (`smtp://…?tls=required`) and
//! implicit TLS (`smtps://`) deliver once the relay trusts that CA
//! (`MailConfig::smtp_ca`, the `--smtp-ca` flag); without it, and to a
//! server that cannot do TLS when TLS is required, nothing is sent and the
//! registration is refused with `mail_failed`.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use securechat_common::protocol::ErrorCode;
use securechat_testkit::relay::test_config;
use securechat_testkit::{error_code, SmtpServer, SmtpTls, TestRelay, TestUser};

/// Register `name` through a relay configured by `configure`; the relay's
/// answer (ok after verification, or the refusal's code).
async fn register_with(
    smtp: &SmtpServer,
    name: &str,
    configure: impl FnOnce(&mut securechat_relay::Config),
) -> Result<(), ErrorCode> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(smtp));
    configure(&mut config);
    let relay = TestRelay::start(config).await.unwrap();
    let client = relay.connect().await.unwrap();
    let mut user = TestUser::new(name).unwrap();
    let first = client.call(&user.register_request()).await;
    if first.is_err() {
        return Err(error_code(first).unwrap());
    }
    let code = smtp
        .wait_for_code(&user.email, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    user.verify(&client, &code).await.unwrap();
    user.login(&client).await.unwrap();
    Ok(())
}

#[tokio::test]
async fn starttls_delivers_with_the_test_ca() {
    let smtp = SmtpServer::start_with(SmtpTls::StartTls).unwrap();
    assert!(smtp.url().ends_with("?tls=required"));
    register_with(&smtp, "stella", |_| {}).await.unwrap();
    assert_eq!(smtp.messages().len(), 1);
}

#[tokio::test]
async fn implicit_tls_delivers_with_the_test_ca() {
    let smtp = SmtpServer::start_with(SmtpTls::Implicit).unwrap();
    assert!(smtp.url().starts_with("smtps://"));
    register_with(&smtp, "imogen", |_| {}).await.unwrap();
    assert_eq!(smtp.messages().len(), 1);
}

/// The certificate is checked: without the test CA the public roots do not
/// vouch for the server, so no mail goes out and nothing is registered.
#[tokio::test]
async fn an_untrusted_certificate_is_refused() {
    for tls in [SmtpTls::StartTls, SmtpTls::Implicit] {
        let smtp = SmtpServer::start_with(tls).unwrap();
        let result = register_with(&smtp, "umberto", |c| c.mail.smtp_ca = None).await;
        assert_eq!(result, Err(ErrorCode::MailFailed), "{tls:?}");
        assert!(smtp.messages().is_empty(), "{tls:?}: a mail went out");
    }
}

/// `?tls=required` never falls back to plain text, even to a server that
/// offers no STARTTLS at all.
#[tokio::test]
async fn a_plain_text_server_is_refused_when_tls_is_required() {
    let smtp = SmtpServer::start().unwrap();
    let tls_smtp = SmtpServer::start_with(SmtpTls::StartTls).unwrap();
    let result = register_with(&smtp, "petra", |c| {
        c.mail.smtp_url = Some(format!("smtp://{}?tls=required", smtp.addr()));
        c.mail.smtp_ca = tls_smtp.ca_file();
    })
    .await;
    assert_eq!(result, Err(ErrorCode::MailFailed));
    assert!(smtp.messages().is_empty(), "a mail went out in plain text");
}
