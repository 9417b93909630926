//! End-to-end tests: the real relay, two agentd processes and chat-cli
//! commands on loopback, as a user would run them.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{mode, wait_for, world};
use securechat_relay::store::Store as _;

#[test]
fn demo_story_with_offline_delivery_and_file_modes() {
    let mut w = world();
    w.alice.send("bob", "Hi Bob, this is end-to-end encrypted.");
    w.bob
        .wait_message("alice", "Hi Bob, this is end-to-end encrypted.");

    // Unread once, then marked read.
    let again = w.bob.json(&["inbox"]);
    assert!(again["messages"].as_array().unwrap().is_empty());

    // Bob replies while alice's agentd is stopped; she gets it on restart.
    w.alice.stop();
    w.bob
        .send("alice", "Hi Alice, read this when you are back.");
    w.alice.restart();
    w.alice
        .wait_message("bob", "Hi Alice, read this when you are back.");
    assert_eq!(w.alice.status()["login_needed"], false);

    // Files and socket are private.
    assert_eq!(mode(&w.alice.home), 0o700);
    assert_eq!(mode(&w.alice.home.join("identity.key")), 0o600);
    assert_eq!(mode(&w.alice.home.join("session")), 0o600);
    assert_eq!(
        mode(w.alice.home.join("agent.sock").parent().unwrap()),
        0o700
    );

    // Online list, fingerprints and human output.
    let users = w.alice.online_users();
    assert!(
        users.iter().any(|u| u == "alice") && users.iter().any(|u| u == "bob"),
        "{users:?}"
    );
    let own = w.bob.json(&["fingerprint"]);
    let seen_by_alice = w.alice.json(&["fingerprint", "bob"]);
    assert_eq!(own["pinned"], seen_by_alice["pinned"]);
    assert_eq!(seen_by_alice["pinned"], seen_by_alice["directory"]);
    let text = w.alice.cli(&["inbox", "--all"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("bob: Hi Alice"));
}

#[test]
fn agentd_killed_keeps_inbox_and_session() {
    let mut w = world();
    w.alice.send("bob", "before the crash");
    w.bob.wait_message("alice", "before the crash");
    w.bob.kill9();
    w.bob.restart();
    // Same inbox, and the session resumes without a new login.
    w.bob.wait_message("alice", "before the crash");
    w.bob.wait_logged_in();
    w.alice.send("bob", "after the crash");
    w.bob.wait_message("alice", "after the crash");
    let all = w.bob.json(&["inbox", "--all"]);
    let n = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["text"] == "before the crash")
        .count();
    assert_eq!(n, 1, "a message must never show twice");
}

#[test]
fn relay_restart_agents_reconnect_by_themselves() {
    let mut w = world();
    w.alice.send("bob", "first");
    w.bob.wait_message("alice", "first");
    w.relay.restart();
    w.alice.wait_logged_in();
    w.bob.wait_logged_in();
    w.alice.send("bob", "after the relay restart");
    w.bob.wait_message("alice", "after the relay restart");
    w.bob.send("alice", "reply after the relay restart");
    w.alice.wait_message("bob", "reply after the relay restart");
}

#[test]
fn rotated_key_is_refused_until_trust() {
    let w = world();
    w.alice.send("bob", "pin your key");
    w.bob.wait_message("alice", "pin your key");
    let before = w.bob.json(&["fingerprint"])["pinned"].clone();

    // A fresh MFA login is needed: the next step's code (the current one
    // was used by the login).
    let out = w.bob.cli_stdin(
        &[
            "--json",
            "rotate-key",
            "--password-stdin",
            "--totp",
            &w.bob.totp(1),
        ],
        &format!("{}\n", common::password("bob")),
    );
    assert!(
        out.status.success(),
        "rotate-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = w.bob.json(&["fingerprint"])["pinned"].clone();
    assert_ne!(before, after);
    w.bob.wait_logged_in();

    // Bob writes first, signed with his new key: alice holds it (not in
    // the inbox, not lost) because it does not verify with the pinned key.
    w.bob.send("alice", "signed by the new key");
    wait_for("alice to hold bob's message", || {
        let held = w.alice.status()["held"].as_array().cloned()?;
        (!held.is_empty()).then_some(())
    });
    let inbox = w.alice.json(&["inbox", "--all"]);
    assert!(!inbox.to_string().contains("signed by the new key"));

    // Sending to bob is refused until alice trusts the new key.
    let err = w.alice.json_err(&["send", "bob", "refused"]);
    assert_eq!(err["kind"], "key_changed", "{err}");
    assert_eq!(err["key_change"]["pinned"], before);
    assert_eq!(err["key_change"]["current"], after);
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("chat-cli trust bob"));

    let trusted = w.alice.trust_directory_key("bob");
    assert_eq!(trusted["fingerprint"], after);
    assert_eq!(trusted["released"], 1);
    w.alice.wait_message("bob", "signed by the new key");
    w.alice.send("bob", "sealed to the new key");
    w.bob.wait_message("alice", "sealed to the new key");
}

#[test]
fn hostile_relay_key_swap_is_refused_until_trust() {
    let mut w = world();
    w.alice.send("bob", "pin your key");
    w.bob.wait_message("alice", "pin your key");

    // The relay operator replaces bob's directory key with one of their own.
    w.relay.stop();
    let mallory =
        securechat_common::IdentityKey::generate(securechat_common::KeySize::Rsa2048).unwrap();
    {
        let store = securechat_relay::store::RedbStore::open(&w.relay.db_path()).unwrap();
        store
            .set_public_key("bob", mallory.public_key().as_der())
            .unwrap();
    }
    w.relay.restart();
    w.alice.wait_logged_in();

    let err = w
        .alice
        .json_err(&["send", "bob", "must not be sealed to mallory"]);
    assert_eq!(err["kind"], "key_changed", "{err}");
    assert_eq!(
        err["key_change"]["current"],
        mallory.public_key().fingerprint().to_string()
    );
    // Only an explicit trust accepts the new key.
    let trusted = w.alice.trust_directory_key("bob");
    assert_eq!(
        trusted["fingerprint"],
        mallory.public_key().fingerprint().to_string()
    );
    w.alice.send("bob", "now sealed to the trusted key");
}

#[test]
fn chat_cli_without_agentd_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::bin("chat-cli"))
        .arg("--home")
        .arg(tmp.path().join("nobody"))
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agentd is not running"), "{err}");
    assert!(err.contains("agentd --home"), "{err}");
    assert!(
        err.contains("systemctl --user start securechat-agentd"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn chat_mode_and_broadcast() {
    use std::io::{BufRead, Write};
    let w = world();
    w.alice.send("bob", "pins");
    w.bob.wait_message("alice", "pins");

    let mut chat = std::process::Command::new(common::bin("chat-cli"))
        .arg("--home")
        .arg(&w.bob.home)
        .args(["chat", "alice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = chat.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut stdin = chat.stdin.take().unwrap();
    writeln!(stdin, "typed in chat mode").unwrap();
    w.alice.wait_message("bob", "typed in chat mode");
    w.alice.send("bob", "shown live in the chat");
    // Before it: the conversation so far and bob's own line.
    let mut before = Vec::new();
    loop {
        let shown = rx
            .recv_timeout(common::WAIT)
            .unwrap_or_else(|_| panic!("the chat shows incoming messages; got {before:?}"));
        if shown.contains("alice: shown live in the chat") {
            break;
        }
        before.push(shown);
    }
    assert!(
        before.iter().any(|l| l.ends_with("alice: pins")),
        "{before:?}"
    );
    assert!(
        before
            .iter()
            .any(|l| l.ends_with("you → alice: typed in chat mode  [queued]")),
        "{before:?}"
    );
    drop(stdin);
    assert!(chat.wait().unwrap().success());

    let sent = w.alice.json(&["broadcast", "to everyone online"]);
    assert_eq!(sent["sent"].as_array().unwrap().len(), 1, "{sent}");
    w.bob.wait_message("alice", "to everyone online");
}

#[test]
fn passphrase_protected_key_waits_for_unlock() {
    let mut w = world();
    w.bob.send("alice", "kept in the encrypted inbox");
    w.alice.wait_message("bob", "kept in the encrypted inbox");
    let out = w
        .alice
        .cli_stdin(&["passphrase", "--passphrase-stdin"], "open sesame\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The identity key and the inbox key, both under the passphrase.
    for file in ["identity.key", "inbox.key"] {
        let data = std::fs::read(w.alice.home.join(file)).unwrap();
        assert!(data.starts_with(b"SCKEY2"), "{file} is not encrypted");
        assert_eq!(mode(&w.alice.home.join(file)), 0o600);
    }
    assert_eq!(mode(&w.alice.home.join("agent.redb")), 0o600);
    let db = std::fs::read(w.alice.home.join("agent.redb")).unwrap();
    assert!(!db.windows(12).any(|x| x == b"kept in the "));

    w.alice.restart();
    assert_eq!(w.alice.status()["locked"], true);
    let err = w.alice.json_err(&["send", "bob", "locked"]);
    assert_eq!(err["kind"], "locked", "{err}");
    let err = w.alice.json_err(&["inbox", "--all"]);
    assert_eq!(err["kind"], "locked", "{err}");
    let wrong = w
        .alice
        .cli_stdin(&["unlock", "--passphrase-stdin"], "wrong\n");
    assert!(!wrong.status.success());
    let out = w
        .alice
        .cli_stdin(&["unlock", "--passphrase-stdin"], "open sesame\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Unlocking resumes the stored session: no new login.
    w.alice.wait_logged_in();
    w.alice.wait_message("bob", "kept in the encrypted inbox");
    w.alice.send("bob", "after unlock");
    w.bob.wait_message("alice", "after unlock");
}
