//! `chat-cli chat` on a real terminal (tmux), and the commands around it
//! (`history`, `contacts`, `events`), with the real relay and agentd.
//!
//! Each terminal is a tmux server of its own ([`common::Tmux`]); the tests
//! type into it and read its screen, waiting (bounded) for what a user
//! would see. tmux must be installed: `scripts/test.sh` installs it, and a
//! test without it fails, it does not skip.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_room_talks_both_ways_whispers_lists_and_leaves() {
    let w = world();
    let mut carol = Agent::start(w.tmp.path(), "carol", &w.relay);
    carol.onboard(&w.relay);
    let dir = w.tmp.path();
    let alice = Tmux::chat_cli(dir, "alice", &w.alice.home, &["chat"]);
    let bob = Tmux::chat_cli(dir, "bob", &w.bob.home, &["chat"]);
    let carol_t = Tmux::chat_cli(dir, "carol", &carol.home, &["chat"]);
    for t in [&alice, &bob, &carol_t] {
        t.wait_for("[room]> ");
    }

    // Plain lines go to everyone, both ways.
    alice.line("hello room");
    alice.wait_for("you → everyone: hello room  [queued for 2 users]");
    bob.wait_for("alice: hello room");
    carol_t.wait_for("alice: hello room");
    bob.line("hi alice");
    alice.wait_for("bob: hi alice");
    // Each recipient's agent sends a receipt once it has stored the message.
    alice.wait_for("✓ delivered to bob: “hello room”");
    alice.wait_for("✓ delivered to carol: “hello room”");

    alice.line("/list");
    alice.wait_for("3 online: alice (you), bob, carol");

    // A whisper reaches carol and nobody else.
    alice.line("/whisper carol psst, only for you");
    carol_t.wait_for("(private) alice: psst, only for you");
    alice.line("@carol and this too");
    carol_t.wait_for("(private) alice: and this too");
    alice.wait_for("✓ delivered to carol: “and this too”");
    // Sent after the whispers: once bob has this, he would have had them.
    alice.line("back to everyone");
    bob.wait_for("alice: back to everyone");
    let seen = bob.screen();
    assert!(
        !seen.contains("psst") && !seen.contains("and this too"),
        "bob saw a whisper to carol:\n{seen}"
    );

    // An unknown command is refused and nothing is sent; `//` sends a slash.
    alice.line("/shrug");
    alice.wait_for(
        "unknown command /shrug; /help lists them (start a line with // to send a literal /)",
    );
    alice.line("//shrug");
    bob.wait_for("alice: /shrug");
    assert_eq!(bob.screen().matches("shrug").count(), 1, "{}", bob.screen());

    // Who comes and goes shows as it happens.
    carol.stop();
    alice.wait_for("* carol went offline");
    carol_t.wait_for("agentd went away; reconnecting…");
    carol.restart();
    alice.wait_for("* carol is online");
    carol_t.wait_for("agentd is back");

    // /quit, Ctrl-D and Ctrl-C all leave cleanly.
    alice.line("/quit");
    assert_eq!(alice.exit_status(), 0, "{}", alice.screen());
    bob.press("C-d");
    assert_eq!(bob.exit_status(), 0, "{}", bob.screen());
    carol_t.press("C-c");
    assert_eq!(carol_t.exit_status(), 0, "{}", carol_t.screen());
}

#[test]
fn a_broadcast_waits_for_an_offline_user_and_is_then_delivered() {
    let mut w = world();
    let dir = w.tmp.path().to_path_buf();

    // Refused at once, with the reason: no such user, an empty message.
    let out = w.alice.cli(&["chat", "nosuchuser"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("there is no user nosuchuser on the relay"),
        "{}",
        text(&out.stderr)
    );
    let out = w.alice.cli(&["send", "bob", ""]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("the message is empty"));
    assert_eq!(
        w.alice.json_err(&["broadcast", "  "])["kind"],
        "invalid_input"
    );

    // bob is offline: the broadcast waits on the relay for him.
    w.bob.stop();
    let alice = Tmux::chat_cli(&dir, "alice", &w.alice.home, &["chat"]);
    alice.wait_for("[room]> ");
    alice.line("news while you were out");
    alice.wait_for("you → everyone: news while you were out  [queued for 1 user]");
    let history = text(&w.alice.cli(&["history"]).stdout);
    assert!(
        history.contains("you → everyone: news while you were out  [queued; delivered to 0 of 1]"),
        "{history}"
    );

    w.bob.restart();
    let bob = Tmux::chat_cli(&dir, "bob", &w.bob.home, &["chat"]);
    bob.wait_for("alice: news while you were out");
    alice.wait_for("✓ delivered to bob: “news while you were out”");

    // Both histories show it, alice's with its state.
    let history = text(&w.alice.cli(&["history"]).stdout);
    assert!(
        history.contains("you → everyone: news while you were out  [delivered to all 1]"),
        "{history}"
    );
    let entries = w.alice.json(&["history", "--limit", "5"])["entries"].clone();
    let last = entries.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["direction"], "out", "{last}");
    assert_eq!(last["recipients"][0]["state"], "delivered", "{last}");
    let bobs = text(&w.bob.cli(&["history"]).stdout);
    assert!(bobs.contains("alice: news while you were out"), "{bobs}");

    // A direct conversation: opening it shows what came before; a sent line
    // is queued, then a receipt says delivered.
    alice.line("/to bob");
    alice.wait_for("[bob]> ");
    alice.line("just for you");
    alice.wait_for("you → bob: just for you  [queued]");
    bob.wait_for("(private) alice: just for you");
    alice.wait_for("✓ delivered to bob: “just for you”");
    let history = text(&w.alice.cli(&["history", "bob"]).stdout);
    assert!(
        history.contains("you → bob: just for you  [delivered]"),
        "{history}"
    );
    let contacts = w.alice.json(&["contacts"]);
    let bob_contact = contacts["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user"] == "bob")
        .unwrap_or_else(|| panic!("no bob in {contacts}"))
        .clone();
    assert_eq!(bob_contact["trust"], "first_use", "{bob_contact}");
    let human = text(&w.alice.cli(&["contacts"]).stdout);
    assert!(human.contains("bob: pinned on first use"), "{human}");

    alice.line("/inbox");
    alice.wait_for("no unread messages");
    alice.line("/help");
    alice.wait_for("/whisper <user> <text>  send one line to <user> only");
    alice.line("/quit");
    assert_eq!(alice.exit_status(), 0);
}

/// `chat-cli events --json` for `agent`, its stdout lines and stderr lines
/// on channels.
fn follow_events(
    agent: &Agent,
) -> (
    Spawned,
    mpsc::Receiver<serde_json::Value>,
    mpsc::Receiver<String>,
) {
    let mut child = Command::new(bin("chat-cli"))
        .arg("--home")
        .arg(&agent.home)
        .args(["--json", "events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out_tx, out) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not one JSON object per line: {line:?}: {e}"));
            let _ = out_tx.send(v);
        }
    });
    let (err_tx, err) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    (Spawned(child), out, err)
}

/// Wait for a stderr line containing `text`.
fn wait_line(rx: &mpsc::Receiver<String>, text: &str) {
    loop {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no line with {text:?} on stderr"));
        if line.contains(text) {
            return;
        }
    }
}

/// Events up to and including the message `text`.
fn events_until(rx: &mpsc::Receiver<serde_json::Value>, text: &str) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    loop {
        let v = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no message event {text:?}; events: {seen:?}"));
        let done = v["event"] == "message" && v["text"] == text;
        seen.push(v);
        if done {
            return seen;
        }
    }
}

#[test]
fn events_and_chat_outlive_an_agentd_restart_without_loss_or_repeats() {
    let mut w = world();
    let dir = w.tmp.path().to_path_buf();
    let (_events, events, notes) = follow_events(&w.bob);
    wait_line(&notes, "following agentd's events after cursor");
    let bob = Tmux::chat_cli(&dir, "bob", &w.bob.home, &["chat", "alice"]);
    bob.wait_for("[alice]> ");

    w.alice.send("bob", "first");
    let mut all = events_until(&events, "first");
    bob.wait_for("alice: first");

    w.bob.stop();
    bob.wait_for("agentd went away; reconnecting…");
    wait_line(&notes, "agentd went away");
    // A line typed while agentd is away is not lost: it is back at the prompt.
    bob.line("typed while away");
    bob.wait_for("agentd is away; your line is back at the prompt");
    bob.wait_for_count("[alice]> typed while away", 2);
    w.alice.send("bob", "second, while bob's agentd was down");

    w.bob.restart();
    bob.wait_for("agentd is back");
    wait_line(&notes, "agentd is back; resuming after event");
    all.extend(events_until(&events, "second, while bob's agentd was down"));
    bob.wait_for("alice: second, while bob's agentd was down");
    bob.press("Enter");
    bob.wait_for("you → alice: typed while away  [queued]");
    w.alice.wait_message("bob", "typed while away");

    w.alice.send("bob", "third");
    all.extend(events_until(&events, "third"));
    bob.wait_for("alice: third");

    // Each message exactly once, in cursor order.
    let texts: Vec<&str> = all
        .iter()
        .filter(|v| v["event"] == "message")
        .map(|v| v["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["first", "second, while bob's agentd was down", "third"],
        "{all:?}"
    );
    let cursors: Vec<u64> = all.iter().map(|v| v["cursor"].as_u64().unwrap()).collect();
    assert!(cursors.windows(2).all(|c| c[0] < c[1]), "{cursors:?}");
    let screen = bob.screen();
    assert_eq!(screen.matches("alice: first").count(), 1, "{screen}");

    bob.press("C-d");
    assert_eq!(bob.exit_status(), 0);
}

#[test]
fn from_a_pipe_a_line_waits_for_agentd_to_come_back() {
    use std::io::Write;
    let mut w = world();
    let mut chat = Command::new(bin("chat-cli"))
        .arg("--home")
        .arg(&w.bob.home)
        .args(["chat", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (err_tx, notes) = mpsc::channel();
    let stderr = chat.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    let mut stdin = chat.stdin.take().unwrap();
    wait_line(&notes, "chatting with alice as bob");
    w.bob.stop();
    wait_line(&notes, "agentd went away; reconnecting…");
    writeln!(stdin, "written while agentd was away").unwrap();
    wait_line(&notes, "it goes once agentd is back");
    w.bob.restart();
    wait_line(&notes, "agentd is back");
    w.alice.wait_message("bob", "written while agentd was away");
    drop(stdin);
    let mut chat = Spawned(chat);
    let status = wait_for("chat to end at the end of its input", || {
        chat.0.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
}

#[test]
fn inbox_follow_prints_unread_then_new_messages_and_marks_them_read() {
    let w = world();
    w.alice.send("bob", "before the follow");
    wait_for("bob to have the first message", || {
        let h = w.bob.json(&["history", "alice"]);
        (h["entries"].as_array()?.len() == 1).then_some(())
    });
    let mut child = Command::new(bin("chat-cli"))
        .arg("--home")
        .arg(&w.bob.home)
        .args(["--json", "inbox", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _follow = Spawned(child);
    let (tx, messages) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str::<serde_json::Value>(&line).unwrap());
        }
    });
    let (err_tx, notes) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    let first = messages.recv_timeout(WAIT).unwrap();
    assert_eq!(first["text"], "before the follow", "{first}");
    assert_eq!(first["from"], "alice", "{first}");
    wait_line(&notes, "following new messages");
    w.alice.send("bob", "while following");
    let second = messages.recv_timeout(WAIT).unwrap();
    assert_eq!(second["text"], "while following", "{second}");
    wait_for("both messages to count as read", || {
        (w.bob.status()["unread"] == 0).then_some(())
    });
    assert!(
        messages.try_recv().is_err(),
        "a message printed twice, or a stray line"
    );
}

#[test]
fn events_say_why_a_restarted_agentd_refuses_them_and_resume_once_unlocked() {
    let mut w = world();
    let out = w
        .bob
        .cli_stdin(&["passphrase", "--passphrase-stdin"], "open sesame\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_events, events, notes) = follow_events(&w.bob);
    wait_line(&notes, "following agentd's events after cursor");

    // Restarted, agentd waits for the passphrase: the follow says so.
    w.bob.restart();
    wait_line(&notes, "agentd answers but refuses the events");
    w.alice.send("bob", "kept for after the unlock");
    let out = w
        .bob
        .cli_stdin(&["unlock", "--passphrase-stdin"], "open sesame\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_line(&notes, "agentd is back");
    events_until(&events, "kept for after the unlock");
}
