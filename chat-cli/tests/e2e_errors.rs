//! Mistakes a user makes, as the user sees them: a clear message on stderr
//! (typed under `--json`), nothing on stdout, a non-zero exit status.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;

use common::{Agent, Relay};
use securechat_common::limits::MAX_MESSAGE_LEN;

/// A failed human-mode run; returns its stderr.
fn failed(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "should have failed: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.starts_with("chat-cli: "), "{err}");
    err
}

#[test]
fn user_mistakes_give_clear_errors_and_a_failing_exit_status() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let mut alice = Agent::start(tmp.path(), "alice", &relay);
    alice.onboard(&relay);

    // A recipient nobody registered.
    let err = failed(&alice.cli(&["send", "nobody", "hello?"]));
    assert!(err.contains("nobody"), "{err}");
    assert!(err.contains("no user"), "{err}");
    let json = alice.json_err(&["send", "nobody", "hello?"]);
    assert_eq!(json["relay_code"], "unknown_user", "{json}");
    // Nothing was pinned for a user that does not exist.
    let fp = alice.cli(&["--json", "fingerprint", "nobody"]);
    assert!(!fp.status.success());

    // A message one byte over the limit, from a pipe; exactly the limit is
    // fine (sent to herself, so the relay stores it).
    let big = "x".repeat(MAX_MESSAGE_LEN + 1);
    let err = failed(&alice.cli_stdin(&["send", "alice", "-"], &big));
    assert!(err.contains(&(MAX_MESSAGE_LEN + 1).to_string()), "{err}");
    assert!(err.contains(&MAX_MESSAGE_LEN.to_string()), "{err}");
    let json = {
        let out = alice.cli_stdin(&["--json", "send", "alice", "-"], &big);
        assert!(!out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
        v["error"].clone()
    };
    assert_eq!(json["kind"], "invalid_input", "{json}");
    let limit = "y".repeat(MAX_MESSAGE_LEN);
    let out = alice.cli_stdin(&["--json", "send", "alice", "-"], &limit);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    alice.wait_message("alice", &limit);
    assert!(!alice
        .json(&["inbox", "--all"])
        .to_string()
        .contains(&big[..MAX_MESSAGE_LEN + 1]));

    // A wrong verification code: refused, and the right one still works.
    let mut carol = Agent::start(tmp.path(), "carol", &relay);
    let out = carol.register();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = relay.code_for("carol@example.org");
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let err = failed(&carol.cli(&["verify", wrong]));
    assert!(err.to_lowercase().contains("code"), "{err}");
    let json = carol.json_err(&["verify", wrong]);
    assert_eq!(json["kind"], "relay", "{json}");
    assert!(json["relay_code"].is_string(), "{json}");
    let verified = carol.json(&["verify", &code]);
    assert!(verified["secret_base32"].is_string(), "{verified}");
    // Until the first login the same code shows the same secret again (in
    // case the first answer was lost).
    let again = carol.json(&["verify", &code]);
    assert_eq!(again["secret_base32"], verified["secret_base32"]);
    carol.secret = Some(verified["secret_base32"].as_str().unwrap().to_string());
    carol.login(0);

    // Verifying again when nothing is pending.
    let err = failed(&carol.cli(&["verify", &code]));
    assert!(err.contains("chat-cli register"), "{err}");
    let json = carol.json_err(&["verify", &code]);
    assert_eq!(json["kind"], "no_pending_registration", "{json}");
}
