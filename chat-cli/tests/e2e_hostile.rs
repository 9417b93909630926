//! Other users and the relay as adversaries, through the real binaries: what
//! a hostile sender or relay operator can try, and what the user sees.
//!
//! * huge and escape-heavy messages hide nothing and lose nothing;
//! * a client that dies half way through `inbox` marks nothing read;
//! * terminal control sequences in messages are shown, never obeyed;
//! * `trust` pins only the fingerprint the user checked, and held messages
//!   signed by a key nobody trusted stay held;
//! * messages the relay drops are reported as missing by number;
//! * an absurd sender clock is refused or flagged, never a crash.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use common::{unix_now, wait_for, world};
use securechat_common::envelope::{seal, SealParams};
use securechat_common::ipc::IPC_VERSION;
use securechat_common::limits::MAX_MESSAGE_LEN;
use securechat_common::{IdentityKey, KeySize, MessageId};
use securechat_relay::store::{RedbStore, Store as _};

fn texts(inbox: &serde_json::Value) -> Vec<String> {
    inbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_largest_and_most_expensive_messages_hide_nothing() {
    let w = world();
    // Four messages of 64 KiB of control characters, which JSON escapes to
    // six bytes each, around a genuine one: on one reply line they were far
    // over the socket's limit, and all five were lost.
    let worst: String = std::iter::repeat_n('\u{1}', MAX_MESSAGE_LEN).collect();
    for i in 0..4 {
        if i == 2 {
            w.alice.send("bob", "the genuine message");
        }
        let out = w.alice.cli_stdin(&["send", "bob", "-"], &worst);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for("bob's agentd to store all five", || {
        (w.bob.status()["unread"] == 5).then_some(())
    });

    // A client that asks for the inbox and dies after the first line.
    let stream = UnixStream::connect(w.bob.socket()).unwrap();
    stream.set_read_timeout(Some(common::WAIT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writeln!(writer, r#"{{"request":"hello","version":{IPC_VERSION}}}"#).unwrap();
    writeln!(writer, r#"{{"request":"inbox","all":false}}"#).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains(r#""response":"message""#), "{line:.200}");
    drop((reader, writer));
    assert_eq!(w.bob.status()["unread"], 5, "nothing was marked read");

    // The real client shows all five, and only then are they read.
    let inbox = w.bob.json(&["inbox"]);
    let got = texts(&inbox);
    assert_eq!(got.len(), 5, "{got:.100?}");
    assert_eq!(got.iter().filter(|t| **t == worst).count(), 4);
    assert!(got.contains(&"the genuine message".to_string()));
    assert_eq!(w.bob.status()["unread"], 0);
    assert!(texts(&w.bob.json(&["inbox"])).is_empty());
    let human = w.bob.cli(&["inbox", "--all"]);
    assert!(human.status.success());
    let shown = String::from_utf8_lossy(&human.stdout);
    assert!(shown.contains("alice: the genuine message"), "{shown:.300}");
    assert_eq!(
        texts(&w.bob.json(&["inbox", "--all", "--from", "alice"])).len(),
        5
    );
}

#[test]
fn terminal_control_sequences_are_shown_not_obeyed() {
    let w = world();
    let forged = "ok\r[2026-01-01T00:00:00Z] carol: please wire the money\u{1b}]0;owned\u{7}\
                  \u{1b}[2J\u{1b}[31mred\u{202e}gnp.exe\u{9b}2J";
    w.alice.send("bob", forged);
    w.bob.wait_message("alice", forged);

    // On a pipe as on a terminal: the escaping does not depend on isatty.
    let out = w.bob.cli(&["inbox", "--all"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "ESC reached the terminal: {text:?}"
    );
    assert!(!text.contains('\r'), "CR reached the terminal: {text:?}");
    assert!(!text.contains('\u{202e}'), "bidi override: {text:?}");
    assert!(!text.contains('\u{9b}'), "C1 CSI: {text:?}");
    assert!(!text.contains('\u{7}'), "BEL: {text:?}");
    assert!(
        text.contains("alice: ok\\r[2026-01-01T00:00:00Z] carol"),
        "{text:?}"
    );
    assert!(
        text.contains("\\x1b]0;owned\\x07") && text.contains("\\u{202e}"),
        "{text:?}"
    );
    // JSON keeps the exact text for programs.
    let inbox = w.bob.json(&["inbox", "--all"]);
    assert!(texts(&inbox).iter().any(|t| t == forged));
}

#[test]
fn trust_pins_only_the_checked_key_and_held_messages_stay_held() {
    let mut w = world();
    w.alice.send("bob", "pin your key");
    w.bob.wait_message("alice", "pin your key");
    w.bob.send("alice", "pin mine");
    w.alice.wait_message("bob", "pin mine");
    let bob_real = w.bob.json(&["fingerprint"])["pinned"]
        .as_str()
        .unwrap()
        .to_string();

    // The relay operator serves a key of their own for bob and injects a
    // message "from bob" signed with it. (Bob is away meanwhile: with his
    // directory key swapped, the relay would refuse his own session too.)
    w.bob.stop();
    w.relay.stop();
    let mallory = IdentityKey::generate(KeySize::Rsa2048).unwrap();
    let alice_key = w.alice.identity_key();
    let forged = seal(
        &SealParams {
            sender_key: &mallory,
            sender: "bob",
            recipient: "alice",
            recipient_key: alice_key.public_key(),
            id: MessageId::random().unwrap(),
            seq: 2,
            timestamp_ms: unix_now() * 1000,
        },
        b"forged by the relay",
    )
    .unwrap();
    {
        let store = RedbStore::open(&w.relay.db_path()).unwrap();
        store
            .set_public_key("bob", mallory.public_key().as_der())
            .unwrap();
    }
    w.relay.enqueue_directly("alice", &forged);
    w.relay.restart();
    wait_for("the forged message to be held", || {
        (w.alice.status()["held_count"] == 1).then_some(())
    });

    // Alice checked bob's real fingerprint with him: trusting it is refused,
    // because the directory serves another key. Nothing changes.
    let err = w.alice.json_err(&["trust", "bob", &bob_real]);
    assert_eq!(err["kind"], "fingerprint_mismatch", "{err}");
    assert_eq!(
        w.alice.json(&["fingerprint", "bob"])["pinned"],
        bob_real.as_str()
    );
    // Without a fingerprint and without a terminal, trust asks for one.
    let out = w.alice.cli(&["trust", "bob"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give the fingerprint"));

    // The relay serves bob's real key again; bob comes back, really rotates
    // his key, and alice checks and trusts the new one. The
    // message mallory signed is not released by it, and not dropped either.
    w.relay.stop();
    {
        let store = RedbStore::open(&w.relay.db_path()).unwrap();
        let bob_key = w.bob.identity_key();
        store
            .set_public_key("bob", bob_key.public_key().as_der())
            .unwrap();
    }
    w.relay.restart();
    w.bob.restart();
    w.bob.wait_logged_in();
    let rotated = w.bob.rotate_key(1);
    let trusted = w.alice.trust_directory_key("bob");
    assert_eq!(trusted["fingerprint"], rotated["new_fingerprint"]);
    assert_eq!(trusted["released"], 0, "{trusted}");
    let status = w.alice.status();
    assert_eq!(status["held_count"], 1, "{status}");
    assert!(texts(&w.alice.json(&["inbox", "--all"]))
        .iter()
        .all(|t| t != "forged by the relay"));
    let held = w.alice.json(&["held"]);
    assert_eq!(held["messages"].as_array().unwrap().len(), 1, "{held}");
    w.bob.send("alice", "from bob's new key");
    w.alice.wait_message("bob", "from bob's new key");
}

#[test]
fn messages_the_relay_drops_are_reported_by_number() {
    let mut w = world();
    w.alice.send("bob", "one");
    w.bob.wait_message("alice", "one");
    w.bob.stop();
    let ids: Vec<String> = ["two", "three", "four"]
        .iter()
        .map(|t| {
            let sent = w.alice.json(&["send", "bob", t]);
            sent["id"].as_str().unwrap().to_string()
        })
        .collect();
    // The relay silently drops "two" and "three".
    w.relay.stop();
    {
        let store = RedbStore::open(&w.relay.db_path()).unwrap();
        for id in &ids[..2] {
            let id = MessageId::from_hex(id).unwrap();
            assert!(store.ack("bob", &id, unix_now()).unwrap());
        }
    }
    w.relay.restart();
    w.bob.restart();
    w.bob.wait_message("alice", "four");

    let inbox = w.bob.json(&["inbox", "--all"]);
    let four = inbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["text"] == "four")
        .unwrap()
        .clone();
    assert_eq!(four["missing_before"], 2, "{four}");
    let status = w.bob.status();
    let alerts = status["sequence_alerts"].as_array().unwrap();
    assert!(
        alerts.iter().any(|a| a["reason"]
            .as_str()
            .unwrap()
            .contains("2 messages from alice are missing (numbers 2 to 3)")),
        "{status}"
    );
    let human = w.bob.cli(&["inbox", "--all"]);
    let shown = String::from_utf8_lossy(&human.stdout);
    assert!(
        shown.contains("2 earlier message(s) from alice never arrived"),
        "{shown}"
    );
}

#[test]
fn a_sender_clock_far_off_is_refused_or_flagged_never_a_crash() {
    let mut w = world();
    w.alice.send("bob", "pin");
    w.bob.wait_message("alice", "pin");
    let bob_key = w.bob.identity_key();
    let year_10103_ms = 256_759_372_800_000;
    let two_hours_ahead = (unix_now() + 2 * 3600) * 1000;
    let envelopes: Vec<_> = [
        ("from year 10103", year_10103_ms),
        ("two hours ahead", two_hours_ahead),
    ]
    .into_iter()
    .map(|(text, ts)| w.alice.seal_by_hand("bob", bob_key.public_key(), text, ts))
    .collect();
    w.relay.stop();
    for env in &envelopes {
        w.relay.enqueue_directly("bob", env);
    }
    w.relay.restart();
    w.bob.wait_message("alice", "two hours ahead");

    for args in [&["inbox"][..], &["inbox", "--all"][..], &["status"][..]] {
        let out = w.bob.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let all = w.bob.cli(&["inbox", "--all"]);
    let shown = String::from_utf8_lossy(&all.stdout);
    assert!(shown.contains("(sender's clock: "), "{shown}");
    assert!(!shown.contains("from year 10103"), "{shown}");
    let status = w.bob.status();
    let rejected = status["rejected"].as_array().unwrap();
    assert!(
        rejected
            .iter()
            .any(|r| r["reason"].as_str().unwrap().contains("in the future")),
        "{status}"
    );
}

/// One raw line to agentd's socket on a greeted connection, and its answer.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn greeted(agent: &common::Agent) -> Self {
        let stream = UnixStream::connect(agent.socket()).unwrap();
        stream.set_read_timeout(Some(common::WAIT)).unwrap();
        let mut raw = Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        };
        let hello =
            raw.call(format!(r#"{{"request":"hello","version":{IPC_VERSION}}}"#).as_bytes());
        assert_eq!(hello["response"], "hello");
        raw
    }

    fn call(&mut self, line: &[u8]) -> serde_json::Value {
        self.writer.write_all(line).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }
}

#[test]
fn hostile_local_requests_get_typed_errors_and_change_nothing() {
    let w = world();
    w.alice.send("bob", "before the abuse");
    w.bob.wait_message("alice", "before the abuse");
    let before = w.bob.status();

    let long_name = "a".repeat(10_000);
    let too_long = "x".repeat(MAX_MESSAGE_LEN + 1);
    let many_ids: Vec<String> = (0..1025).map(|_| "00".repeat(16)).collect();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("path as recipient", br#"{"request":"send","to":"../../etc/passwd","text":"x"}"#.to_vec(), "invalid_input"),
        ("33-character recipient", format!(r#"{{"request":"send","to":"{}","text":"x"}}"#, "a".repeat(33)).into_bytes(), "invalid_input"),
        ("uppercase recipient", br#"{"request":"send","to":"Bob","text":"x"}"#.to_vec(), "invalid_input"),
        ("control characters in recipient", br#"{"request":"send","to":"bob\u001b[2J","text":"x"}"#.to_vec(), "invalid_input"),
        ("message over 64 KiB", format!(r#"{{"request":"send","to":"alice","text":"{too_long}"}}"#).into_bytes(), "invalid_input"),
        ("10 kB login name", format!(r#"{{"request":"login","username":"{long_name}","password":"p","totp":"1"}}"#).into_bytes(), "invalid_input"),
        ("register with a bad email", br#"{"request":"register","username":"eve","email":"not-an-email","password":"long enough pw"}"#.to_vec(), "invalid_input"),
        ("mark_read with a non-id", br#"{"request":"mark_read","ids":["../../x"]}"#.to_vec(), "invalid_input"),
        ("mark_read with too many ids", serde_json::to_vec(&serde_json::json!({"request":"mark_read","ids":many_ids})).unwrap(), "invalid_input"),
        ("mark_read with the wrong type", br#"{"request":"mark_read","ids":"all"}"#.to_vec(), "bad_request"),
        ("trust with a malformed fingerprint", br#"{"request":"trust","user":"alice","fingerprint":"xyz"}"#.to_vec(), "invalid_input"),
        ("trust with a short fingerprint", br#"{"request":"trust","user":"alice","fingerprint":"abcd"}"#.to_vec(), "invalid_input"),
        ("trust of an invalid name", br#"{"request":"trust","user":"al ice","fingerprint":"00"}"#.to_vec(), "invalid_input"),
        ("trust without a fingerprint", br#"{"request":"trust","user":"alice"}"#.to_vec(), "bad_request"),
        ("a second hello", format!(r#"{{"request":"hello","version":{IPC_VERSION}}}"#).into_bytes(), "bad_request"),
        ("100 000 nested arrays", deep.into_bytes(), "bad_request"),
        ("invalid UTF-8", b"{\"request\":\"send\",\"to\":\"alice\",\"text\":\"\xff\xfe\"}".to_vec(), "bad_request"),
        ("verify with nothing pending", br#"{"request":"verify","code":"123456"}"#.to_vec(), "no_pending_registration"),
        ("login while logged in", br#"{"request":"login","username":"bob","password":"long enough pw","totp":"123456"}"#.to_vec(), "already_logged_in"),
        ("register while logged in", br#"{"request":"register","username":"eve","email":"eve@example.org","password":"long enough pw"}"#.to_vec(), "already_logged_in"),
        ("unknown request", br#"{"request":"delete_everything"}"#.to_vec(), "bad_request"),
        ("fingerprint of an invalid name", br#"{"request":"fingerprint","user":"\u001b[2J"}"#.to_vec(), "invalid_input"),
    ];
    let mut raw = Raw::greeted(&w.bob);
    for (what, line, kind) in &cases {
        let v = raw.call(line);
        assert_eq!(v["response"], "error", "{what}: {v:.300}");
        assert_eq!(v["kind"], *kind, "{what}: {v:.300}");
    }

    // Nothing changed, and honest requests still work on the same
    // connection and through chat-cli.
    let after = w.bob.status();
    for field in [
        "unread",
        "held_count",
        "username",
        "connection",
        "fingerprint",
    ] {
        assert_eq!(before[field], after[field], "{field}");
    }
    assert_eq!(raw.call(br#"{"request":"status"}"#)["response"], "status");
    w.bob.send("alice", "after the abuse");
    w.alice.wait_message("bob", "after the abuse");
    assert_eq!(
        texts(&w.bob.json(&["inbox", "--all"])),
        ["before the abuse"]
    );
}

#[test]
fn password_guessing_by_others_never_locks_the_owner_out() {
    use securechat_client::relay::{parse_fingerprint, ClientError, RelayClient, ServerTrust};
    use securechat_common::protocol::ErrorCode;

    let mut w = world();
    w.alice.send("bob", "before the guessing");
    w.bob.wait_message("alice", "before the guessing");

    // Someone guesses alice's password, from the same address as her own
    // agentd even (everything here is 127.0.0.1), far past any limit.
    let addr: std::net::SocketAddr = w.relay.addr.parse().unwrap();
    let pin = parse_fingerprint(&w.relay.fingerprint).unwrap();
    let guesser = IdentityKey::generate(KeySize::Rsa2048).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let codes = rt.block_on(async {
        let client = RelayClient::connect(addr, ServerTrust::Fingerprint(pin))
            .await
            .unwrap();
        let mut codes = Vec::new();
        for i in 0..40 {
            match client
                .login("alice", &format!("wrong guess {i}"), "123456", &guesser)
                .await
            {
                Err(ClientError::Relay(r)) => codes.push(r.code),
                other => panic!("a guess was not refused: {other:?}"),
            }
        }
        codes
    });
    assert!(codes.contains(&ErrorCode::InvalidCredentials), "{codes:?}");
    assert!(
        codes.contains(&ErrorCode::RateLimited),
        "guessing is slowed: {codes:?}"
    );

    // Alice's agentd reconnects and resumes her session: no login needed.
    w.alice.restart();
    w.alice.wait_logged_in();
    assert_eq!(w.alice.status()["login_needed"], false);
    w.alice.send("bob", "after the guessing");
    w.bob.wait_message("alice", "after the guessing");
}

#[test]
fn what_the_relay_alters_or_readdresses_is_caught() {
    let mut w = world();
    w.alice.send("bob", "delivered once");
    w.bob.wait_message("alice", "delivered once");
    w.bob.stop();
    w.alice.send("bob", "the relay would like to change this");
    w.alice.send("bob", "and to show this one to alice");

    // The relay operator edits its queue while bob is away: it flips a byte
    // of one message and hands the other to alice instead.
    w.relay.stop();
    let queued = {
        let store = RedbStore::open(&w.relay.db_path()).unwrap();
        let queued = store.queued_after("bob", 0, 10).unwrap();
        for q in &queued {
            store.ack("bob", &q.id, unix_now()).unwrap();
        }
        queued
    };
    assert_eq!(queued.len(), 2);
    let raw = std::fs::read(w.relay.db_path()).unwrap();
    assert!(
        !raw.windows(14).any(|x| x == b"the relay woul"),
        "the relay's database holds only ciphertext"
    );
    let mut altered: securechat_common::Envelope =
        postcard::from_bytes(&queued[0].envelope).unwrap();
    altered.ciphertext[0] ^= 1;
    // (A fresh id, or the relay's own dedupe would not queue it again.)
    altered.id = MessageId::random().unwrap();
    let readdressed: securechat_common::Envelope =
        postcard::from_bytes(&queued[1].envelope).unwrap();
    w.relay.enqueue_directly("bob", &altered);
    w.relay.enqueue_directly("alice", &readdressed);
    w.relay.restart();
    w.bob.restart();

    // Queued behind them, so once it is in, they were handled.
    w.alice.send("bob", "after the tampering");
    w.bob.wait_message("alice", "after the tampering");
    let bob_inbox = texts(&w.bob.json(&["inbox", "--all"]));
    assert_eq!(
        bob_inbox,
        ["delivered once", "after the tampering"],
        "nothing altered reached bob"
    );
    let reasons: Vec<String> = w.bob.status()["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("signature")),
        "{reasons:?}"
    );
    wait_for("alice to reject the message addressed to bob", || {
        let status = w.alice.status();
        status["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| {
                r["reason"]
                    .as_str()
                    .unwrap()
                    .contains("addressed to \"bob\"")
            })
            .then_some(())
    });
    assert!(texts(&w.alice.json(&["inbox", "--all"]))
        .iter()
        .all(|t| !t.contains("show this one")));
    // The missing message is reported as missing, by number.
    let alerts = w.bob.status()["sequence_alerts"].clone();
    assert!(alerts.to_string().contains("from alice"), "{alerts}");
}
