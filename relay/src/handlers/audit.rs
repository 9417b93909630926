//! What a login or resume attempt leaves behind: a count by outcome (for
//! `/metrics` and the status page) and, for a failed password login, one
//! warning line in a fixed form that fail2ban can match:
//!
//! ```text
//! login failed: source=203.0.113.9 reason=bad_credentials user="alice"
//! ```
//!
//! `source` is the peer's IP address (an IPv4-mapped IPv6 address is shown
//! as IPv4); `reason` is `bad_credentials` (unknown user, wrong password or
//! wrong or used TOTP code), `bad_signature` or `rate_limited`. The username
//! comes from the network: it is written last, quoted, with quotes,
//! backslashes and anything but printable ASCII escaped and cut at 64
//! characters, so no name can fake a line or another source in front of it.

use std::net::IpAddr;

use securechat_common::protocol::{ErrorCode, ErrorReply, Response};

use crate::conn_state::ConnState;
use crate::metrics::{LoginOutcome, ResumeOutcome};
use crate::shared::Shared;

/// Longest username (in characters) written to a log line.
const MAX_LOGGED_NAME: usize = 64;

/// Which kind of attempt.
#[derive(Clone, Copy, Debug)]
pub(super) enum Attempt {
    /// A password login.
    Login,
    /// A session resume.
    Resume,
}

/// Count the attempt's outcome and log a failure.
pub(super) fn record(
    shared: &Shared,
    state: &ConnState,
    attempt: Attempt,
    username: &str,
    result: &Result<Response, ErrorReply>,
) {
    let code = result.as_ref().err().map(|e| e.code);
    match attempt {
        Attempt::Login => {
            let outcome = login_outcome(code);
            shared.stats.logins.add(outcome);
            let reason = match outcome {
                LoginOutcome::BadCredentials => "bad_credentials",
                LoginOutcome::BadSignature => "bad_signature",
                LoginOutcome::RateLimited => "rate_limited",
                LoginOutcome::Ok | LoginOutcome::Busy | LoginOutcome::Other => return,
            };
            tracing::warn!(
                "login failed: source={} reason={reason} user=\"{}\"",
                source(state),
                escaped(username)
            );
        }
        Attempt::Resume => {
            let outcome = resume_outcome(code);
            shared.stats.resumes.add(outcome);
            if outcome != ResumeOutcome::Ok {
                tracing::info!(
                    "resume failed: source={} reason={} user=\"{}\"",
                    source(state),
                    crate::metrics::Kind::label(outcome),
                    escaped(username)
                );
            }
        }
    }
}

fn login_outcome(code: Option<ErrorCode>) -> LoginOutcome {
    match code {
        None => LoginOutcome::Ok,
        Some(ErrorCode::InvalidCredentials) => LoginOutcome::BadCredentials,
        Some(ErrorCode::InvalidSignature) => LoginOutcome::BadSignature,
        Some(ErrorCode::RateLimited) => LoginOutcome::RateLimited,
        Some(ErrorCode::Busy) => LoginOutcome::Busy,
        Some(_) => LoginOutcome::Other,
    }
}

fn resume_outcome(code: Option<ErrorCode>) -> ResumeOutcome {
    match code {
        None => ResumeOutcome::Ok,
        Some(ErrorCode::SessionExpired) => ResumeOutcome::SessionExpired,
        Some(ErrorCode::InvalidSignature) => ResumeOutcome::BadSignature,
        Some(_) => ResumeOutcome::Other,
    }
}

/// The peer's address as fail2ban wants it: IPv4 for an IPv4-mapped
/// address (a relay listening on `[::]` sees those).
fn source(state: &ConnState) -> IpAddr {
    state.conn.remote_address().ip().to_canonical()
}

/// `name` made safe for a quoted log field.
fn escaped(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if i == MAX_LOGGED_NAME {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_network_cannot_fake_a_field_or_a_line() {
        assert_eq!(escaped("alice"), "alice");
        assert_eq!(
            escaped("x\" source=1.2.3.4 reason=ok\nlogin failed"),
            "x\\\" source=1.2.3.4 reason=ok\\nlogin failed"
        );
        assert_eq!(escaped("\u{1b}[31m\u{202e}"), "\\u{1b}[31m\\u{202e}");
        assert_eq!(escaped(&"a".repeat(100)), format!("{}...", "a".repeat(64)));
    }
}
