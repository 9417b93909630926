//! chat-cli's manners, with the real binaries: secrets asked for only once
//! agentd has answered, a hint for typed messages, Ctrl-C during a send
//! that says what became of the message, shell completions and man pages,
//! and `chat-cli doctor`.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Run a built binary with `args`, require success, return stdout.
fn output_of(name: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(bin(name))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn every_binary_prints_completions_for_three_shells_and_a_man_page() {
    let binaries: [(&str, &[&str]); 3] = [
        ("chat-cli", &["send", "inbox", "doctor", "completions"]),
        ("relay", &["fingerprint", "completions", "data-dir"]),
        ("agentd", &["completions", "man", "relay-fingerprint"]),
    ];
    for (name, words) in binaries {
        for shell in ["bash", "zsh", "fish"] {
            let script = output_of(name, &["completions", shell]);
            for word in words {
                assert!(
                    script.contains(word),
                    "{name} completions {shell} lacks {word:?}"
                );
            }
        }
        let man = output_of(name, &["man"]);
        let th = man
            .lines()
            .find(|l| l.starts_with(".TH "))
            .unwrap_or_else(|| panic!("{name} man: no .TH header in {man}"));
        assert!(th.starts_with(&format!(".TH {name} 1")), "{th}");
        assert!(man.contains(".SH NAME") && man.contains(".SH SYNOPSIS"));
        let bad = std::process::Command::new(bin(name))
            .args(["completions", "tcsh"])
            .output()
            .unwrap();
        assert!(!bad.status.success(), "{name} completions tcsh");
    }
}

#[test]
fn secrets_are_asked_for_only_once_agentd_has_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let nobody = tmp.path().join("nobody");

    // No terminal and no --password-stdin: refused at once, whatever else.
    for args in [
        &["login", "alice"][..],
        &["register", "alice", "--email", "a@example.org"],
        &["rotate-key"],
    ] {
        let out = run_cli(&nobody, args, "");
        assert!(!out.status.success(), "{args:?}");
        assert!(
            text(&out.stderr)
                .contains("no terminal to ask for the password; pipe it and pass --password-stdin"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = run_cli(&nobody, &["unlock"], "");
    assert!(text(&out.stderr)
        .contains("no terminal to ask for the passphrase; pipe it and pass --passphrase-stdin"));

    // On a terminal, with agentd not running: no prompt, the reason.
    let out = run_in_terminal(&nobody, &["login", "alice"], "");
    let shown = text(&out.stdout);
    assert!(!out.status.success());
    assert!(shown.contains("agentd is not running"), "{shown}");
    assert!(!shown.contains("Password"), "prompted anyway: {shown}");

    // On a terminal, a login agentd would refuse is refused before the prompt.
    let w = world();
    let out = run_in_terminal(&w.alice.home, &["login", "alice"], "");
    let shown = text(&out.stdout);
    assert!(!out.status.success());
    assert!(shown.contains("already logged in as alice"), "{shown}");
    assert!(!shown.contains("Password"), "prompted anyway: {shown}");
    let out = run_in_terminal(&w.alice.home, &["unlock"], "");
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("not locked; nothing to unlock"));
    // The refusal is typed for scripts too.
    let err = w.alice.json_err(&["login", "alice", "--password-stdin"]);
    assert_eq!(err["kind"], "already_logged_in", "{err}");

    // A login that makes sense is prompted for, on the terminal.
    let mut carol = Agent::start(w.tmp.path(), "carol", &w.relay);
    carol.register_and_verify(&w.relay);
    let input = format!("{}\n{}\n", password("carol"), carol.totp(0));
    let out = run_in_terminal(&carol.home, &["login", "carol"], &input);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("Password: "), "{shown}");
    assert!(shown.contains("TOTP code"), "{shown}");
    carol.wait_logged_in();
}

#[test]
fn send_dash_says_how_to_end_the_text_on_a_terminal_only() {
    let w = world();
    let hint = "Type the message; end with Ctrl-D on a line of its own.";
    let out = run_in_terminal(&w.alice.home, &["send", "bob", "-"], "typed here\n\u{4}");
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains(hint), "{shown}");
    w.bob.wait_message("alice", "typed here");

    let out = w.alice.cli_stdin(&["send", "bob", "-"], "from a pipe\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("Ctrl-D"),
        "{}",
        text(&out.stderr)
    );
    w.bob.wait_message("alice", "from a pipe");
}

/// Start `send` and give it time to be waiting on agentd.
fn send_and_interrupt(home: &std::path::Path, to: &str, message: &str) -> serde_json::Value {
    let child = spawn_cli(home, &["--json", "send", to, message]);
    // Past the connection and the `accepted` answer: chat-cli catches
    // Ctrl-C from there on (a default SIGINT would end it without a word).
    std::thread::sleep(Duration::from_millis(1500));
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let err: serde_json::Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|_| panic!("stderr is not JSON: {}", text(&out.stderr)));
    err["error"].clone()
}

#[test]
fn ctrl_c_while_the_relay_is_down_cancels_the_message_for_good() {
    let mut w = world();
    w.relay.stop();
    wait_for("alice to notice the relay is gone", || {
        (w.alice.status()["connection"] != "logged_in").then_some(())
    });
    let err = send_and_interrupt(&w.alice.home, "bob", "never sent");
    assert_eq!(err["kind"], "cancelled", "{err}");
    let id = err["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains(&format!("the message (id {id}) was not sent")),
        "{err}"
    );

    // Human form of the same: the id and the word cancelled.
    let child = spawn_cli(&w.alice.home, &["send", "bob", "never either"]);
    std::thread::sleep(Duration::from_millis(1500));
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    let said = text(&out.stderr);
    assert!(
        said.starts_with("chat-cli: cancelled: the message (id "),
        "{said}"
    );

    // Back online: later messages arrive, the cancelled ones never do, and
    // no number was used up (bob sees nothing missing).
    w.relay.restart();
    w.alice.wait_logged_in();
    w.alice.send("bob", "after the outage");
    w.bob.wait_message("alice", "after the outage");
    let inbox = w.bob.json(&["inbox", "--all"]);
    let messages = inbox["messages"].as_array().unwrap();
    assert!(messages.iter().all(|m| m["text"] != "never sent"
        && m["text"] != "never either"
        && m["id"] != id.as_str()));
    assert!(messages.iter().all(|m| m["missing_before"] == 0), "{inbox}");
}

#[test]
fn ctrl_c_after_the_message_left_says_it_may_be_delivered_and_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let proxy = UdpProxy::start(&relay.addr);
    let mut alice = Agent::start_via(tmp.path(), "alice", &relay, &proxy.addr);
    let mut bob = Agent::start(tmp.path(), "bob", &relay);
    alice.onboard(&relay);
    bob.onboard(&relay);
    alice.wait_logged_in();
    alice.send("bob", "warm up: pins bob's key");
    bob.wait_message("alice", "warm up: pins bob's key");

    // The directory lookup gets through, the message itself does not.
    proxy.hold_large(true);
    let long = "a message too big for the lossy link ".repeat(60);
    let err = send_and_interrupt(&alice.home, "bob", &long);
    assert_eq!(err["kind"], "interrupted", "{err}");
    let id = err["id"].as_str().unwrap().to_string();
    assert_eq!(
        err["message"].as_str().unwrap(),
        format!(
            "interrupted: the message (id {id}) may still be delivered; check with \
             `chat-cli status` before sending again"
        )
    );
    let status = alice.status();
    let pending = &status["interrupted_sends"][0];
    assert_eq!(pending["id"], id.as_str(), "{status}");
    assert_eq!(pending["state"], "sending", "{status}");
    let shown = text(&alice.cli(&["status"]).stdout);
    assert!(
        shown.contains(&format!("{id} to bob: still waiting")),
        "{shown}"
    );

    // A chat-cli killed outright (no Ctrl-C, no cancel) cancels nothing:
    // agentd finishes what it was asked to send.
    let mut killed = spawn_cli(&alice.home, &["send", "bob", "from a killed chat-cli"]);
    std::thread::sleep(Duration::from_millis(1500));
    killed.kill().unwrap();
    killed.wait().unwrap();
    wait_for("agentd to notice its client went away", || {
        let s = alice.status();
        (s["interrupted_sends"].as_array()?.len() == 2).then_some(())
    });

    // The link recovers: agentd had kept both messages, and they arrive once.
    proxy.hold_large(false);
    bob.wait_message("alice", "from a killed chat-cli");
    wait_for("bob to receive the interrupted message", || {
        let inbox = bob.json(&["inbox", "--all"]);
        inbox["messages"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == id.as_str() && m["text"] == long.as_str())
            .then_some(())
    });
    wait_for("alice's status to say both were stored", || {
        let s = alice.status();
        let sends = s["interrupted_sends"].as_array()?.clone();
        sends.iter().all(|i| i["state"] == "stored").then_some(())
    });
    let inbox = bob.json(&["inbox", "--all"]);
    let messages = inbox["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "each message once: {inbox}");
    assert!(messages.iter().all(|m| m["missing_before"] == 0), "{inbox}");
}

#[test]
fn doctor_says_what_is_wrong_and_how_to_fix_it() {
    let tmp = tempfile::tempdir().unwrap();
    // agentd not running: FAIL with how to start it; files still checked.
    let out = run_cli(&tmp.path().join("nobody"), &["doctor"], "");
    let said = text(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("FAIL  agentd"), "{said}");
    assert!(said.contains("agentd is not running"), "{said}");
    assert!(said.contains("Start it with"), "{said}");

    let w = world();
    let healthy = w.alice.json(&["doctor"]);
    assert_eq!(healthy["ok"], true, "{healthy}");
    let checks = healthy["checks"].as_array().unwrap();
    let names: Vec<_> = checks
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["agentd", "relay", "certificate", "clock", "files", "key"]
    );
    for c in checks {
        assert_eq!(c["result"], "ok", "{c}");
    }
    let clock = &checks[3]["detail"];
    assert!(clock.as_str().unwrap().contains("the relay's"), "{clock}");
    assert!(checks[2]["detail"]
        .as_str()
        .unwrap()
        .contains(&w.relay.fingerprint));
    let out = w.alice.cli(&["doctor"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).starts_with("ok    agentd"),
        "{}",
        text(&out.stdout)
    );

    // A file others can read: FAIL with the chmod that fixes it.
    let key = w.alice.home.join("identity.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = w.alice.cli(&["doctor"]);
    let said = text(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("FAIL  files"), "{said}");
    assert!(
        said.contains(&format!("fix: chmod 600 {}", key.display())),
        "{said}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A locked key: FAIL, fixed by unlock.
    let out = w.bob.cli_stdin(
        &["passphrase", "--passphrase-stdin"],
        "a long enough passphrase\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut bob = w.bob;
    bob.restart();
    let report = {
        let out = bob.cli(&["--json", "doctor"]);
        assert!(!out.status.success());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(report["ok"], false);
    let key = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "key")
        .unwrap()
        .clone();
    assert_eq!(key["result"], "fail", "{report}");
    assert_eq!(key["fix"], "chat-cli unlock", "{report}");
    let out = bob.cli_stdin(
        &["unlock", "--passphrase-stdin"],
        "a long enough passphrase\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    bob.wait_logged_in();
    assert_eq!(bob.json(&["doctor"])["ok"], true);
}

/// One check of a `chat-cli --json doctor` report.
fn doctor_check(agent: &Agent, name: &str) -> serde_json::Value {
    let out = agent.cli(&["--json", "doctor"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("doctor printed no JSON: {}", text(&out.stderr)));
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap()
        .clone();
    assert_eq!(
        out.status.success(),
        report["ok"] == true,
        "exit status and report disagree: {report}"
    );
    check
}

#[test]
fn doctor_fails_a_clock_the_relay_disagrees_with_and_a_refused_certificate() {
    use securechat_common::protocol::{Request, Response};
    use securechat_testkit::relay::{test_config, TestRelay};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let relay = rt
        .block_on(TestRelay::start(test_config(
            &tmp.path().join("relay"),
            None,
        )))
        .unwrap();
    // The relay's clock runs two minutes ahead of this machine's.
    relay.clock().advance(Duration::from_secs(120));
    let before = unix_now() * 1000;
    let told = rt.block_on(async {
        let client = relay.connect().await.unwrap();
        client.call(&Request::Time).await.unwrap()
    });
    let Response::Time { unix_ms } = told else {
        panic!("answer to Time: {told:?}")
    };
    assert!(
        (before + 119_000..before + 130_000).contains(&unix_ms),
        "relay said {unix_ms}, {before} here"
    );

    let pin = format!("sha256:{}", hex::encode(relay.fingerprint()));
    let dave = Agent::start_pinned(tmp.path(), "dave", &relay.addr().to_string(), &pin);
    let clock = wait_for("dave's agentd to compare clocks", || {
        let c = doctor_check(&dave, "clock");
        (c["result"] != "warn").then_some(c)
    });
    assert_eq!(clock["result"], "fail", "{clock}");
    let detail = clock["detail"].as_str().unwrap();
    assert!(detail.contains("behind the relay's"), "{detail}");
    assert!(
        detail.contains("TOTP codes made here are refused"),
        "{detail}"
    );
    assert!(clock["fix"]
        .as_str()
        .unwrap()
        .contains("timedatectl set-ntp true"));
    assert_eq!(doctor_check(&dave, "certificate")["result"], "ok");

    // A pin the relay's certificate does not match: the refusal, both
    // fingerprints and how to re-pin.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let erin = Agent::start_pinned(tmp.path(), "erin", &relay.addr().to_string(), &wrong);
    let cert = wait_for("erin's agentd to refuse the certificate", || {
        let c = doctor_check(&erin, "certificate");
        (c["result"] == "fail").then_some(c)
    });
    let fix = cert["fix"].as_str().unwrap();
    assert!(fix.contains(&pin), "{fix}");
    assert!(fix.contains("relay fingerprint --data-dir"), "{fix}");
    assert_eq!(doctor_check(&erin, "relay")["result"], "fail");
    drop((dave, erin));
    rt.block_on(relay.stop()).unwrap();
}
