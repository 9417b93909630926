//! agentd with several relays (`--relay A,B`): a relay of the list that is
//! down is skipped, and losing the relay in use moves agentd to the next one
//! at once. Real processes: relays, agentd and chat-cli, on loopback.
//!
//! The relays here have one database each (redb), so a session made on one
//! is unknown to the other; relays sharing one state (Redis) resume it.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{wait_for, Agent, Relay};

/// A loopback UDP address where nothing listens (bound, read, then freed).
fn dead_addr() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().to_string()
}

#[test]
fn a_relay_that_is_down_is_skipped_for_the_next_in_the_list() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let dead = dead_addr();
    let list = format!("{dead}, {}", relay.addr);
    let mut alice = Agent::start_pinned(tmp.path(), "alice", &list, &relay.fingerprint);
    let mut bob = Agent::start(tmp.path(), "bob", &relay);

    // Register, verify and log in: all through the second relay of the list.
    alice.onboard(&relay);
    bob.onboard(&relay);
    alice.wait_logged_in();
    alice.send("bob", "through the second relay");
    bob.wait_message("alice", "through the second relay");

    let s = alice.status();
    assert_eq!(s["relay"], relay.addr.as_str(), "{s}");
    assert_eq!(s["relays"], serde_json::json!([dead, relay.addr]), "{s}");
    // One relay alone: no list in the status, as before.
    assert!(bob.status().get("relays").is_none(), "{}", bob.status());

    // As a person reads it.
    let out = alice.cli(&["status"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!("relay:       {}\n", relay.addr)),
        "{shown}"
    );
    assert!(
        shown.contains(&format!(
            "relays:      {dead}, {} (tried in turn)",
            relay.addr
        )),
        "{shown}"
    );

    // The list is saved tidily and read back at the next start without flags.
    let saved = std::fs::read_to_string(alice.home.join("agentd.toml")).unwrap();
    assert!(
        saved.contains(&format!("relay = \"{dead},{}\"", relay.addr)),
        "{saved}"
    );
    let log = std::fs::read_to_string(alice.home.with_extension("log")).unwrap();
    assert!(
        log.contains(&format!("connected to the relay at {}", relay.addr)),
        "{log}"
    );
    alice.stop();
    bob.stop();
}

#[test]
fn a_bad_entry_in_the_relay_list_is_named_and_nothing_is_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let fp = format!("sha256:{}", "ab".repeat(32));
    for (list, says) in [
        ("127.0.0.1:7443,,127.0.0.1:7444", "entry 2 is empty"),
        (
            "127.0.0.1:7443,127.0.0.1:70000",
            "entry 2: relay address \"127.0.0.1:70000\"",
        ),
    ] {
        let out = common::agentd_refusal(
            &[
                "--home",
                home.to_str().unwrap(),
                "--relay",
                list,
                "--relay-fingerprint",
                &fp,
            ],
            &[],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{list}: {err}");
        assert!(err.contains(says), "{list}: stderr lacks {says:?}:\n{err}");
        assert!(!home.join("agentd.toml").exists(), "{list}: saved");
    }
}

/// Two relays with one certificate (the second started with the first's
/// `--cert`/`--key`) but separate databases: when the first stops, agentd
/// is on the second within seconds. The session cannot resume there (that
/// relay never saw it), and agentd says so; with one shared state it would.
#[test]
fn losing_the_relay_in_use_moves_to_the_next_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut relay_a = Relay::start(&dir_a);
    let tls = dir_a.join("relay").join("tls");
    let (cert, key) = (tls.join("cert.pem"), tls.join("key.pem"));
    let relay_b = Relay::start_with(
        &dir_b,
        &[
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(relay_a.fingerprint, relay_b.fingerprint, "one certificate");

    let list = format!("{},{}", relay_a.addr, relay_b.addr);
    let mut alice = Agent::start_pinned(tmp.path(), "alice", &list, &relay_a.fingerprint);
    alice.onboard(&relay_a);
    alice.wait_logged_in();
    assert_eq!(alice.status()["relay"], relay_a.addr.as_str());

    relay_a.stop();
    let lost = Instant::now();
    let s = wait_for("agentd to move to the second relay", || {
        let s = alice.status();
        (s["relay"] == relay_b.addr.as_str() && s["connection"] == "connected").then_some(s)
    });
    let took = lost.elapsed();
    eprintln!("agentd reached the second relay {took:?} after the first stopped");
    assert!(
        took < Duration::from_secs(10),
        "agentd took {took:?} to reach the second relay: {s}"
    );
    // B never saw the session: agentd asks for a login instead of failing
    // quietly (relays sharing one state resume it instead).
    assert_eq!(s["login_needed"], true, "{s}");
    let err = alice.json_err(&["send", "bob", "hello"]);
    assert_eq!(err["kind"], "login_needed", "{err}");
    let log = std::fs::read_to_string(alice.home.with_extension("log")).unwrap();
    assert!(
        log.contains(&format!("connected to the relay at {}", relay_b.addr)),
        "{log}"
    );
    alice.stop();
}

/// A relay of the list whose certificate is not the pinned one is refused
/// (and the log says that one pin covers the list), and the next is used.
#[test]
fn a_relay_with_another_certificate_is_refused_and_the_next_one_used() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let relay_a = Relay::start(&dir_a);
    // Its own self-signed certificate: not the one pinned.
    let other = Relay::start(&dir_b);
    assert_ne!(relay_a.fingerprint, other.fingerprint);

    let list = format!("{},{}", other.addr, relay_a.addr);
    let mut alice = Agent::start_pinned(tmp.path(), "alice", &list, &relay_a.fingerprint);
    alice.onboard(&relay_a);
    alice.wait_logged_in();
    assert_eq!(alice.status()["relay"], relay_a.addr.as_str());
    let log = std::fs::read_to_string(alice.home.with_extension("log")).unwrap();
    assert!(
        log.contains(&format!(
            "the relay at {} presented a different certificate",
            other.addr
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "Every relay of {list} must present that certificate"
        )),
        "{log}"
    );
    alice.stop();
}
