//! Logging out and straight back in, as a user does it: `chat-cli logout`
//! followed at once by `chat-cli login` must work the first time, every time
//! (agentd reconnects after a logout; the login must not pick up the
//! connection that is being closed).
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{password, unix_now, Agent, Relay, TOTP_STEP};

/// The lowest TOTP step after `last` that the relay accepts now (the current
/// step ±1; the previous step only early in the current one, so that it is
/// still current when the relay checks it). Waits for the clock when every
/// acceptable step is used up.
fn next_step(last: Option<u64>) -> u64 {
    loop {
        let now = unix_now();
        let step = now / TOTP_STEP;
        let lowest = if now % TOTP_STEP < TOTP_STEP / 2 {
            step - 1
        } else {
            step
        };
        let wanted = last.map_or(lowest, |l| (l + 1).max(lowest));
        if wanted <= step + 1 {
            return wanted;
        }
        std::thread::sleep(Duration::from_secs(TOTP_STEP - now % TOTP_STEP));
    }
}

/// `chat-cli --json login` with the code of `step`; must succeed at once.
fn login(agent: &Agent, step: u64, round: usize) -> serde_json::Value {
    let out = agent.cli_stdin(
        &[
            "--json",
            "login",
            &agent.name,
            "--password-stdin",
            "--totp",
            &agent.totp_at_step(step),
        ],
        &format!("{}\n", password(&agent.name)),
    );
    assert!(
        out.status.success(),
        "login right after logout failed (round {round}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn login_right_after_logout_works_the_first_time() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let mut alice = Agent::start(tmp.path(), "alice", &relay);
    alice.register_and_verify(&relay);
    let mut step = next_step(None);
    login(&alice, step, 0);
    alice.wait_logged_in();

    for round in 1..=3 {
        assert_eq!(alice.json(&["logout"])["response"], "ok");
        // No wait here: the login follows the logout at once.
        step = next_step(Some(step));
        let answer = login(&alice, step, round);
        assert_eq!(answer["response"], "logged_in", "{answer}");
        assert_eq!(answer["username"], "alice", "{answer}");

        // The new session works: a message to herself goes through the relay
        // and comes back on the push stream.
        let text = format!("after logout {round}");
        alice.send("alice", &text);
        alice.wait_message("alice", &text);
        let status = alice.status();
        assert_eq!(status["connection"], "logged_in", "{status}");
        assert_eq!(status["login_needed"], false, "{status}");
    }
}
