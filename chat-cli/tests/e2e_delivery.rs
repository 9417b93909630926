//! What agentd keeps and tells about delivery, seen on its local socket as
//! chat-cli sees it: sent messages and their states, signed receipts,
//! contacts, and the event journal across an agentd restart.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use common::{wait_for, world, Agent};
use securechat_common::ipc::IPC_VERSION;
use serde_json::{json, Value};

/// A greeted connection to an agentd's socket.
struct Ipc {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Ipc {
    fn open(agent: &Agent) -> Self {
        let stream = UnixStream::connect(agent.socket()).unwrap();
        stream.set_read_timeout(Some(common::WAIT)).unwrap();
        let mut ipc = Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        };
        let hello = ipc.call(&json!({"request": "hello", "version": IPC_VERSION}));
        assert_eq!(hello["response"], "hello", "{hello}");
        ipc
    }

    fn send(&mut self, req: &Value) {
        let mut line = req.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).unwrap();
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "agentd closed the connection");
        serde_json::from_str(&line).unwrap()
    }

    fn call(&mut self, req: &Value) -> Value {
        self.send(req);
        self.read()
    }

    /// The lines of a streamed answer, up to its `end`.
    fn list(&mut self, req: &Value) -> Vec<Value> {
        self.send(req);
        let mut out = Vec::new();
        loop {
            let v = self.read();
            match v["response"].as_str() {
                Some("end") => return out,
                Some("error") => panic!("{req}: {v}"),
                _ => out.push(v),
            }
        }
    }
}

fn history(agent: &Agent, with: Option<&str>) -> Vec<Value> {
    Ipc::open(agent).list(&json!({"request": "history", "with": with, "limit": 50}))
}

/// The state of our message with `text` in the conversation with `with`.
fn state_of(agent: &Agent, with: &str, text: &str) -> Option<String> {
    history(agent, Some(with))
        .into_iter()
        .find(|e| e["direction"] == "out" && e["text"] == text)
        .map(|e| e["recipients"][0]["state"].as_str().unwrap().to_string())
}

#[test]
fn a_receipt_turns_a_sent_message_delivered_and_history_shows_both_ways() {
    let w = world();
    w.alice.send("bob", "hello bob");
    w.bob.wait_message("alice", "hello bob");
    wait_for("bob's receipt to reach alice", || {
        (state_of(&w.alice, "bob", "hello bob").as_deref() == Some("delivered")).then_some(())
    });
    w.bob.send("alice", "hi alice");
    w.alice.wait_message("bob", "hi alice");
    let both: Vec<(String, String)> = history(&w.alice, Some("bob"))
        .iter()
        .map(|e| {
            (
                e["direction"].as_str().unwrap().to_string(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        both,
        [
            ("out".to_string(), "hello bob".to_string()),
            ("in".to_string(), "hi alice".to_string())
        ]
    );
    // Nothing of it is in the room.
    assert!(history(&w.alice, None).is_empty());
    // The receipt is not a message.
    let inbox = w.alice.json(&["inbox", "--all"]);
    assert_eq!(inbox["messages"].as_array().unwrap().len(), 1, "{inbox}");
}

#[test]
fn a_message_for_someone_offline_is_queued_then_delivered() {
    let mut w = world();
    w.alice.send("bob", "warm up");
    w.bob.wait_message("alice", "warm up");
    w.bob.stop();
    w.alice.send("bob", "while you were out");
    assert_eq!(
        state_of(&w.alice, "bob", "while you were out").as_deref(),
        Some("queued")
    );
    w.bob.restart();
    wait_for("the receipt after bob came back", || {
        (state_of(&w.alice, "bob", "while you were out").as_deref() == Some("delivered"))
            .then_some(())
    });
}

#[test]
fn empty_messages_are_refused_and_nothing_is_kept() {
    let w = world();
    for text in ["", "   ", "\n"] {
        let e = Ipc::open(&w.alice).call(&json!({"request": "send", "to": "bob", "text": text}));
        assert_eq!(e["response"], "error", "{e}");
        assert_eq!(e["kind"], "invalid_input", "{e}");
        let e = Ipc::open(&w.alice).call(&json!({"request": "broadcast", "text": text}));
        assert_eq!(e["kind"], "invalid_input", "{e}");
    }
    assert!(history(&w.alice, Some("bob")).is_empty());
    assert!(history(&w.alice, None).is_empty());
}

#[test]
fn contacts_list_pins_with_their_trust_and_last_seen() {
    let w = world();
    w.alice.send("bob", "pin me");
    w.bob.wait_message("alice", "pin me");
    let contacts = |agent: &Agent| Ipc::open(agent).list(&json!({"request": "contacts"}));
    let alices = contacts(&w.alice);
    assert_eq!(alices.len(), 1, "{alices:?}");
    assert_eq!(alices[0]["user"], "bob");
    assert_eq!(alices[0]["trust"], "first_use");
    let bobs = contacts(&w.bob);
    assert_eq!(bobs[0]["user"], "alice");
    assert!(bobs[0]["last_seen_ms"].as_u64().unwrap() > 0, "{bobs:?}");
    w.alice.trust_directory_key("bob");
    assert_eq!(contacts(&w.alice)[0]["trust"], "verified");
}

#[test]
fn events_resume_after_an_agentd_restart_without_loss_or_repeats() {
    let mut w = world();
    let mut events = Ipc::open(&w.alice);
    let start = events.call(&json!({"request": "events"}));
    assert_eq!(start["response"], "events", "{start}");
    w.bob.send("alice", "first");
    let next_message = |ipc: &mut Ipc| loop {
        let v = ipc.read();
        assert_eq!(v["response"], "event", "{v}");
        if v["event"] == "message" {
            return v;
        }
    };
    let first = next_message(&mut events);
    assert_eq!(first["text"], "first");
    let cursor = first["cursor"].as_u64().unwrap();
    drop(events);

    w.alice.stop();
    w.bob.send("alice", "second");
    w.alice.restart();
    let mut events = Ipc::open(&w.alice);
    events.call(&json!({"request": "events", "after": cursor}));
    let second = next_message(&mut events);
    assert_eq!(second["text"], "second", "the first one is not repeated");
    assert!(second["cursor"].as_u64().unwrap() > cursor);
    w.bob.send("alice", "third");
    assert_eq!(next_message(&mut events)["text"], "third");
}

#[test]
fn a_broadcast_reaches_everyone_marked_as_such_even_those_offline() {
    let w = world();
    let mut carol = Agent::start(w.tmp.path(), "carol", &w.relay);
    carol.onboard(&w.relay);
    carol.stop();
    let sent = w.alice.json(&["broadcast", "hello everyone"]);
    let to: Vec<&str> = sent["sent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["to"].as_str().unwrap())
        .collect();
    assert_eq!(to, ["bob", "carol"], "{sent}");
    w.bob.wait_message("alice", "hello everyone");
    carol.restart();
    carol.wait_message("alice", "hello everyone");
    for agent in [&w.bob, &carol] {
        let inbox = agent.json(&["inbox", "--all"]);
        assert_eq!(inbox["messages"][0]["broadcast"], true, "{inbox}");
        // In the room, not in the private conversation.
        assert_eq!(history(agent, None).len(), 1);
        assert!(history(agent, Some("alice")).is_empty());
    }
    wait_for("both receipts", || {
        let room = history(&w.alice, None);
        let states: Vec<&str> = room[0]["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["state"].as_str().unwrap())
            .collect();
        (states == ["delivered", "delivered"]).then_some(())
    });
}

#[test]
fn a_message_that_expires_on_the_relay_is_reported_to_its_sender() {
    let tmp = tempfile::tempdir().unwrap();
    let relay =
        common::Relay::start_with(tmp.path(), &["--retention", "3s", "--sweep-interval", "1s"]);
    let mut alice = Agent::start(tmp.path(), "alice", &relay);
    let mut bob = Agent::start(tmp.path(), "bob", &relay);
    alice.onboard(&relay);
    bob.onboard(&relay);
    alice.send("bob", "pin");
    bob.wait_message("alice", "pin");
    bob.stop();
    let mut events = Ipc::open(&alice);
    events.call(&json!({"request": "events"}));
    alice.send("bob", "nobody reads this");
    let expired = loop {
        let v = events.read();
        if v["event"] == "expired" {
            break v;
        }
    };
    assert_eq!(expired["to"], "bob", "{expired}");
    assert_eq!(
        state_of(&alice, "bob", "nobody reads this").as_deref(),
        Some("expired")
    );
    // Gone for good: bob never gets it, and alice is told once.
    bob.restart();
    alice.send("bob", "after it expired");
    bob.wait_message("alice", "after it expired");
    let inbox = bob.json(&["inbox", "--all"]);
    assert!(!inbox.to_string().contains("nobody reads this"), "{inbox}");
}

#[test]
fn contacts_hear_who_comes_and_goes() {
    let mut w = world();
    // bob becomes alice's contact when she first writes to him (his key is
    // pinned): from then on her agent asks the relay for his comings and
    // goings.
    w.alice.send("bob", "hello");
    w.bob.wait_message("alice", "hello");
    let mut events = Ipc::open(&w.alice);
    events.call(&json!({"request": "events"}));
    let next_presence = |ipc: &mut Ipc| loop {
        let v = ipc.read();
        if v["event"] == "presence" {
            return (
                v["user"].as_str().unwrap().to_string(),
                v["online"].as_bool().unwrap(),
            );
        }
    };
    w.bob.stop();
    assert_eq!(next_presence(&mut events), ("bob".to_string(), false));
    w.bob.restart();
    assert_eq!(next_presence(&mut events), ("bob".to_string(), true));
}
