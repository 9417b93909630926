//! The relay binary mails verification codes over STARTTLS and over
//! implicit TLS to a server whose certificate comes from a private CA,
//! trusted with `--smtp-ca`; a user registers through chat-cli as usual.

mod common;

use securechat_testkit::smtp::{SmtpServer, SmtpTls};

#[test]
fn registration_mail_over_starttls_and_smtps_with_smtp_ca() {
    for tls in [SmtpTls::StartTls, SmtpTls::Implicit] {
        let tmp = tempfile::tempdir().unwrap();
        let smtp = SmtpServer::start_with(tls).unwrap();
        let relay = common::relay_with_smtp(tmp.path(), smtp);
        let mut alice = common::Agent::start(tmp.path(), "alice", &relay);
        alice.onboard(&relay);
        alice.wait_logged_in();
    }
}
