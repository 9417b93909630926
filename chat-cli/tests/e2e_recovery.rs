//! End-to-end recovery paths: messages sealed to a key that was rotated
//! away since, and a session the relay no longer accepts.
//!
//! Real relay, real agentd processes, real chat-cli; the relay's redb file
//! is edited only while the relay is stopped, through its own store API.
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::{unix_now, wait_for, world};
use securechat_relay::store::{RedbStore, Session, Store as _};
use sha2::Digest as _;

/// The keys agentd archived in `old-keys/` (by rotate-key).
fn archived_keys(home: &std::path::Path) -> Vec<PathBuf> {
    let dir = home.join("old-keys");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    out.sort();
    out
}

#[test]
fn messages_sealed_to_a_rotated_key_still_open() {
    let mut w = world();
    // Pin each other's first keys.
    w.alice.send("bob", "pin alice's first key");
    w.bob.wait_message("alice", "pin alice's first key");
    w.bob.send("alice", "pin bob's first key");
    w.alice.wait_message("bob", "pin bob's first key");
    let bob_first = w.bob.json(&["fingerprint"])["pinned"].clone();

    // Alice rotates; her next message is sealed to bob's first key (still
    // the one in the directory) but signed by her new key, so bob's agentd
    // holds it until he trusts her new key.
    w.alice.rotate_key(1);
    w.alice.wait_logged_in();
    w.alice.send("bob", "sealed to bob's first key");
    wait_for("bob to hold alice's message", || {
        let held = w.bob.status()["held"].as_array().cloned()?;
        (!held.is_empty()).then_some(())
    });

    // Bob rotates before releasing it, and restarts: the only copy of his
    // first private key is the archived one in old-keys/.
    let rotated = w.bob.rotate_key(1);
    assert_eq!(rotated["old_fingerprint"], bob_first, "{rotated}");
    assert_ne!(rotated["new_fingerprint"], bob_first, "{rotated}");
    let archived = archived_keys(&w.bob.home);
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert_eq!(common::mode(&archived[0]), 0o600);
    w.bob.restart();
    w.bob.wait_logged_in();
    assert_eq!(
        w.bob.json(&["fingerprint"])["pinned"],
        rotated["new_fingerprint"]
    );

    let trusted = w.bob.trust_directory_key("alice");
    assert_eq!(trusted["released"], 1, "{trusted}");
    w.bob.wait_message("alice", "sealed to bob's first key");

    // The push path: a message alice sealed to bob's first key that the
    // relay still had queued when bob's new key was published (as if it had
    // been sent just before the rotation) is opened with the archived key
    // when it is pushed.
    let bob_old = common::load_key(&archived[0]);
    let envelope = w.alice.seal_by_hand(
        "bob",
        bob_old.public_key(),
        "queued before the rotation",
        unix_now() * 1000,
    );
    w.relay.stop();
    w.relay.enqueue_directly("bob", &envelope);
    w.relay.restart();
    w.bob.wait_message("alice", "queued before the rotation");
    let status = w.bob.status();
    assert!(
        status["rejected"].as_array().unwrap().is_empty(),
        "{status}"
    );
    assert!(status["held"].as_array().unwrap().is_empty(), "{status}");

    // Alice still has bob's first key pinned: she must trust the new one
    // before sealing to it.
    let err = w.alice.json_err(&["send", "bob", "refused"]);
    assert_eq!(err["kind"], "key_changed", "{err}");
    let trusted = w.alice.trust_directory_key("bob");
    assert_eq!(trusted["fingerprint"], rotated["new_fingerprint"]);
    w.alice.send("bob", "sealed to bob's new key");
    w.bob.wait_message("alice", "sealed to bob's new key");
}

#[test]
fn refused_session_shows_login_needed_until_a_new_login() {
    let mut w = world();
    w.alice.send("bob", "before the sessions end");
    w.bob.wait_message("alice", "before the sessions end");

    // The relay operator revokes bob's session and alice's expires.
    let bob_token = w.bob.session_token();
    let alice_token = w.alice.session_token();
    w.relay.stop();
    {
        let store = RedbStore::open(&w.relay.db_path()).unwrap();
        let bob_hash: [u8; 32] = sha2::Sha256::digest(&bob_token).into();
        store.remove_session(&bob_hash).unwrap();
        let alice_hash: [u8; 32] = sha2::Sha256::digest(&alice_token).into();
        let expired = Session {
            username: "alice".into(),
            expires_unix: 1,
        };
        store.put_session(&alice_hash, &expired).unwrap();
    }
    w.relay.restart();

    for agent in [&w.alice, &w.bob] {
        let status = wait_for(&format!("{} to need a login", agent.name), || {
            let s = agent.status();
            (s["login_needed"] == true).then_some(s)
        });
        assert_eq!(status["connection"], "connected", "{status}");
        assert!(
            !agent.home.join("session").exists(),
            "a refused token is forgotten"
        );
        let human = agent.cli(&["status"]);
        assert!(human.status.success());
        let text = String::from_utf8_lossy(&human.stdout);
        assert!(text.contains("LOGIN NEEDED"), "{text}");
        assert!(text.contains("chat-cli login"), "{text}");

        let err = agent.json_err(&["send", "carol", "not sent"]);
        assert_eq!(err["kind"], "login_needed", "{err}");
        let human = agent.cli(&["send", "alice", "not sent"]);
        assert!(!human.status.success());
        assert!(
            String::from_utf8_lossy(&human.stderr).contains("chat-cli login"),
            "{}",
            String::from_utf8_lossy(&human.stderr)
        );
    }

    // Alice logs in again and writes to bob, who is still logged out: the
    // message waits on the relay until his new login.
    w.alice.login(1);
    w.alice.wait_logged_in();
    assert_eq!(w.alice.status()["login_needed"], false);
    w.alice.send("bob", "waiting for your new login");
    assert!(!w
        .bob
        .json(&["inbox", "--all"])
        .to_string()
        .contains("waiting for your new login"));

    w.bob.login(1);
    w.bob.wait_logged_in();
    let status = w.bob.status();
    assert_eq!(status["login_needed"], false, "{status}");
    assert!(w.bob.home.join("session").exists());
    w.bob.wait_message("alice", "waiting for your new login");
    w.bob.send("alice", "back after the new login");
    w.alice.wait_message("bob", "back after the new login");

    // The new session survives an agentd restart (no third login).
    w.bob.restart();
    w.bob.wait_logged_in();
    assert_eq!(w.bob.status()["login_needed"], false);
}
