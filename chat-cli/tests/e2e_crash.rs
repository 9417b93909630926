//! End-to-end crash safety: agentd killed with SIGKILL in the middle of a
//! multi-step operation, then started again, must neither lose a message nor
//! lock the user out.
//!
//! Each test kills agentd and leaves on disk exactly what a kill at the
//! window under test leaves (files written in agentd's order), changing the
//! relay's redb file only while the relay is stopped, through its own store
//! API. Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{load_key, unix_now, wait_for, world, Agent, Relay};
use securechat_agentd::keystore;
use securechat_agentd::store::Delivery;
use securechat_common::ipc::InboxMessage;
use securechat_common::{IdentityKey, KeySize};
use securechat_relay::store::{RedbStore, Store as _};

fn fingerprint(key: &IdentityKey) -> String {
    key.public_key().fingerprint().to_string()
}

fn old_keys(home: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(home.join("old-keys")) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    out.sort();
    out
}

/// What `rotate-key` writes first: the new key as `identity.key.new`, 0600.
fn write_pending_key(agent: &Agent) -> IdentityKey {
    let key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
    let der = key.to_pkcs8().unwrap();
    securechat_agentd::files::write_private(&agent.home.join("identity.key.new"), &der).unwrap();
    key
}

/// What an accepted `PublishKey` leaves on the relay: `key` is `user`'s key.
fn relay_takes_key(relay: &mut Relay, user: &str, key: &IdentityKey) {
    relay.stop();
    {
        let store = RedbStore::open(&relay.db_path()).unwrap();
        store
            .set_public_key(user, key.public_key().as_der())
            .unwrap();
    }
    relay.restart();
}

fn own_fingerprint(agent: &Agent) -> String {
    agent.json(&["fingerprint"])["pinned"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn rotation_killed_after_the_relay_took_the_new_key_is_finished_at_restart() {
    let mut w = world();
    w.alice.send("bob", "pin alice's first key");
    w.bob.wait_message("alice", "pin alice's first key");
    let first = load_key(&w.alice.home.join("identity.key"));

    // Alice's agentd dies between PublishKey and installing the new key.
    // Meanwhile bob writes to her, sealed to her first key (the directory's
    // key when he sends).
    w.alice.kill9();
    w.bob
        .send("alice", "sealed to the first key while alice was down");
    let new = write_pending_key(&w.alice);
    relay_takes_key(&mut w.relay, "alice", &new);

    // Restarted, agentd finds out the relay holds the new key, finishes the
    // rotation and resumes the session without a new login.
    w.alice.restart();
    w.alice.wait_logged_in();
    let status = w.alice.status();
    assert_eq!(status["login_needed"], false, "{status}");
    assert_eq!(own_fingerprint(&w.alice), fingerprint(&new));
    assert!(!w.alice.home.join("identity.key.new").exists());
    assert_eq!(
        load_key(&w.alice.home.join("identity.key")).public_key(),
        new.public_key()
    );
    assert_eq!(common::mode(&w.alice.home.join("identity.key")), 0o600);
    let archived = old_keys(&w.alice.home);
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert_eq!(load_key(&archived[0]).public_key(), first.public_key());

    // The message sealed to the first key opens with the archived key.
    w.alice
        .wait_message("bob", "sealed to the first key while alice was down");

    // Both directions work with the new key (bob trusts it first).
    let trusted = w.bob.trust_directory_key("alice");
    assert_eq!(trusted["fingerprint"], fingerprint(&new).as_str());
    w.bob.send("alice", "to alice's new key");
    w.alice.wait_message("bob", "to alice's new key");
    w.alice.send("bob", "signed by alice's new key");
    w.bob.wait_message("alice", "signed by alice's new key");

    // And it stays that way across another restart.
    w.alice.restart();
    w.alice.wait_logged_in();
    assert_eq!(own_fingerprint(&w.alice), fingerprint(&new));
    assert_eq!(old_keys(&w.alice.home).len(), 1);
}

#[test]
fn rotation_killed_before_the_relay_took_the_new_key_is_undone_at_restart() {
    let mut w = world();
    let first = own_fingerprint(&w.alice);

    // Killed after writing the new key, before the relay accepted it.
    w.alice.kill9();
    write_pending_key(&w.alice);
    w.alice.restart();
    w.alice.wait_logged_in();
    wait_for("the unpublished key to be dropped", || {
        (!w.alice.home.join("identity.key.new").exists()).then_some(())
    });
    assert_eq!(own_fingerprint(&w.alice), first);
    assert!(old_keys(&w.alice.home).is_empty());
    w.alice.send("bob", "still the first key");
    w.bob.wait_message("alice", "still the first key");
    w.bob.send("alice", "to the first key");
    w.alice.wait_message("bob", "to the first key");

    // A new rotation works afterwards.
    let rotated = w.alice.rotate_key(1);
    assert_eq!(rotated["old_fingerprint"], first.as_str());
    w.alice.wait_logged_in();
    assert_eq!(old_keys(&w.alice.home).len(), 1);
}

#[test]
fn rotation_interrupted_while_logged_out_is_finished_by_the_next_login() {
    let mut w = world();
    let out = w.alice.cli(&["logout"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.alice.kill9();
    let new = write_pending_key(&w.alice);
    relay_takes_key(&mut w.relay, "alice", &new);

    w.alice.restart();
    // No session to resume: the login signs with the old key, is refused,
    // and signs again with the pending one (same TOTP code).
    w.alice.login(1);
    w.alice.wait_logged_in();
    assert_eq!(own_fingerprint(&w.alice), fingerprint(&new));
    assert!(!w.alice.home.join("identity.key.new").exists());
    assert_eq!(old_keys(&w.alice.home).len(), 1);
    w.bob.trust_directory_key("alice");
    w.bob.send("alice", "after the login");
    w.alice.wait_message("bob", "after the login");
}

#[test]
fn redelivery_after_a_kill_between_inbox_commit_and_ack_is_shown_once() {
    let mut w = world();
    w.alice.send("bob", "pin alice's key");
    w.bob.wait_message("alice", "pin alice's key");

    // Bob's agentd committed a message to its inbox and died before its ack
    // reached the relay, which therefore still has it queued.
    w.bob.kill9();
    let alice_key = w.alice.identity_key();
    let bob_key = w.bob.identity_key();
    let now_ms = unix_now() * 1000;
    let envelope = w.alice.seal_by_hand(
        "bob",
        bob_key.public_key(),
        "committed but not acked",
        now_ms,
    );
    let seq = envelope.slots[0].seq;
    {
        let store = securechat_agentd::store::Store::open(&w.bob.home.join("agent.redb")).unwrap();
        let inbox_key =
            keystore::load_or_create_inbox_key(&w.bob.home.join("inbox.key"), None).unwrap();
        let msg = InboxMessage {
            id: envelope.id.to_string(),
            from: "alice".into(),
            sent_ms: now_ms,
            relay_ms: None,
            received_ms: now_ms,
            text: "committed but not acked".into(),
            read: false,
            seq,
            missing_before: 0,
            late: false,
            broadcast: false,
        };
        let delivered = store
            .deliver(
                &inbox_key,
                &envelope.id,
                msg,
                alice_key.public_key().fingerprint().0,
            )
            .unwrap();
        assert!(matches!(delivered, Delivery::Stored(_)));
    }
    w.relay.stop();
    w.relay.enqueue_directly("bob", &envelope);
    w.relay.restart();
    // Queued behind it: once bob has this one, the redelivery was handled.
    w.alice.send("bob", "sent after the crash");
    w.bob.restart();
    w.bob.wait_message("alice", "sent after the crash");

    let inbox = w.bob.json(&["inbox", "--all"]);
    let copies = inbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["text"] == "committed but not acked")
        .count();
    assert_eq!(copies, 1, "{inbox}");
    let status = w.bob.status();
    assert!(
        status["rejected"].as_array().unwrap().is_empty(),
        "{status}"
    );
    // The redelivered copy was acked: at most the last message is queued.
    w.bob.stop();
    w.relay.stop();
    let store = RedbStore::open(&w.relay.db_path()).unwrap();
    assert!(store.queue_len("bob").unwrap() <= 1);
}

#[test]
fn registration_survives_a_kill_before_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let mut carol = Agent::start(tmp.path(), "carol", &relay);
    let out = carol.register();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp = carol.json(&["fingerprint"])["pinned"].clone();

    carol.kill9();
    carol.restart();
    // Same key, and the mailed code still completes the registration.
    assert_eq!(carol.json(&["fingerprint"])["pinned"], fp);
    let code = relay.code_for("carol@example.org");
    let verified = carol.json(&["verify", &code]);
    carol.secret = Some(verified["secret_base32"].as_str().unwrap().to_string());
    carol.kill9();
    carol.restart();
    carol.login(0);
    carol.wait_logged_in();
    assert_eq!(carol.status()["username"], "carol");
}

#[test]
fn stale_temporary_key_files_are_removed_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let mut dave = Agent::start(tmp.path(), "dave", &relay);
    dave.kill9();
    // What a kill between writing and renaming a key file leaves.
    let stale = dave.home.join(".identity.key.tmp-4242-0");
    std::fs::write(&stale, b"private key material").unwrap();
    dave.restart();
    assert!(!stale.exists());
}

#[test]
fn lost_register_and_verify_answers_can_be_asked_again_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let mut erin = Agent::start(tmp.path(), "erin", &relay);
    let register = |agent: &Agent| {
        let out = agent.cli_stdin(
            &[
                "register",
                "erin",
                "--email",
                "erin@example.org",
                "--password-stdin",
            ],
            &format!("{}\n", common::password("erin")),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    register(&erin);
    let old = relay.code_for("erin@example.org");
    // The answer never reached the user: register again after a kill. The
    // same key and email go out, so the relay mails a new code.
    erin.kill9();
    erin.restart();
    register(&erin);
    let new = relay.code_for("erin@example.org");
    if new != old {
        erin.json_err(&["verify", &old]);
    }

    let first = erin.json(&["verify", &new]);
    // The Verified answer was lost too: after a kill, the same code shows
    // the same secret again.
    erin.kill9();
    erin.restart();
    let second = erin.json(&["verify", &new]);
    assert_eq!(first["secret_base32"], second["secret_base32"]);
    erin.secret = Some(second["secret_base32"].as_str().unwrap().to_string());
    erin.login(0);
    erin.wait_logged_in();
    // After the first login there is nothing left to repeat.
    let err = erin.json_err(&["verify", &new]);
    assert_eq!(err["kind"], "no_pending_registration", "{err}");
}

/// The state `agent`'s history gives its message `text` to `with`, if the
/// message is there at all.
fn sent_state(agent: &Agent, with: &str, text: &str) -> Option<String> {
    let v = agent.json(&["history", with]);
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["direction"] == "out" && e["text"] == text)
        .map(|e| e["recipients"][0]["state"].as_str().unwrap().to_string())
}

#[test]
fn sends_chat_cli_was_told_were_stored_survive_a_kill_right_after() {
    // agentd records "the relay stored it" without an fsync of its own:
    // what a kill may lose is that state, never the message. Bob is away,
    // so no receipt can make up for a lost state.
    let mut w = world();
    w.alice.send("bob", "warm up");
    w.bob.wait_message("alice", "warm up");
    w.bob.stop();
    let texts: Vec<String> = (1..=5).map(|n| format!("answered {n}")).collect();
    for text in &texts {
        w.alice.send("bob", text);
    }
    w.alice.kill9();
    w.alice.restart();
    w.alice.wait_logged_in();
    for text in &texts {
        let state = sent_state(&w.alice, "bob", text);
        assert!(
            matches!(state.as_deref(), Some("sending" | "queued")),
            "{text:?} after the kill: {state:?}"
        );
    }
    // The relay had them: bob gets each once, and his receipts move every
    // one of them on, whatever the kill left.
    w.bob.restart();
    for text in &texts {
        w.bob.wait_message("alice", text);
    }
    wait_for("bob's receipts to reach alice", || {
        texts
            .iter()
            .all(|t| sent_state(&w.alice, "bob", t).as_deref() == Some("delivered"))
            .then_some(())
    });
    let inbox = w.bob.json(&["inbox", "--all"]);
    assert_eq!(
        inbox["messages"].as_array().unwrap().len(),
        texts.len() + 1,
        "{inbox}"
    );
}
