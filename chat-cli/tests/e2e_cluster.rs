//! End to end on several relays: two relay processes on one real
//! redis-server (started on a free loopback port), sharing one certificate,
//! and agentd given both relays (`--relay A,B`), driven through chat-cli as
//! a user would.
//!
//! * alice's agent on relay A and bob's on relay B talk both ways, live;
//! * relay A is killed with SIGKILL: alice's agent resumes on relay B and
//!   carries on, and what was queued for bob before the kill is delivered;
//! * Redis is killed and restarted: every message the relays acknowledged
//!   is still delivered.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{wait_for, Agent, Relay};
use securechat_testkit::redis::RedisServer;

/// Relay A, and relay B with A's certificate (one pin for both), on `redis`.
fn two_relays(dir: &std::path::Path, redis: &RedisServer) -> (Relay, Relay) {
    let url = redis.url();
    for name in ["a", "b"] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
    }
    let a = Relay::start_with(&dir.join("a"), &["--redis", &url]);
    let tls = dir.join("a").join("relay").join("tls");
    let (cert, key) = (tls.join("cert.pem"), tls.join("key.pem"));
    let b = Relay::start_with(
        &dir.join("b"),
        &[
            "--redis",
            &url,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(a.fingerprint, b.fingerprint, "one certificate for both");
    (a, b)
}

/// Which relay agentd is connected to now, from `chat-cli status`.
fn relay_in_use(agent: &Agent) -> String {
    agent.status()["relay"].as_str().unwrap_or("").to_string()
}

#[test]
fn users_on_two_relays_talk_and_survive_a_relay_and_redis_dying() {
    let tmp = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start().unwrap();
    let (mut a, b) = two_relays(tmp.path(), &redis);
    let list_ab = format!("{},{}", a.addr, b.addr);
    let list_ba = format!("{},{}", b.addr, a.addr);
    let mut alice = Agent::start_pinned(tmp.path(), "alice", &list_ab, &a.fingerprint);
    let mut bob = Agent::start_pinned(tmp.path(), "bob", &list_ba, &b.fingerprint);
    alice.onboard(&a);
    bob.onboard(&b);
    alice.wait_logged_in();
    bob.wait_logged_in();
    assert!(relay_in_use(&alice).contains(&a.addr), "{}", alice.status());
    assert!(relay_in_use(&bob).contains(&b.addr), "{}", bob.status());

    // Live, both ways, across the relays.
    alice.send("bob", "hello from relay A");
    bob.wait_message("alice", "hello from relay A");
    bob.send("alice", "hello from relay B");
    alice.wait_message("bob", "hello from relay B");
    let names = alice.online_users();
    assert!(
        names.iter().any(|u| u == "bob"),
        "alice (on A) sees bob (on B): {names:?}"
    );

    // bob goes away; alice queues messages for him through relay A, then A
    // dies without a chance to say anything.
    bob.stop();
    for i in 0..5 {
        alice.send("bob", &format!("queued {i}"));
    }
    a.kill9();

    // alice's agent resumes on B and carries on.
    wait_for("alice's agent to move to relay B", || {
        let status = alice.status();
        (status["connection"] == "logged_in" && relay_in_use(&alice).contains(&b.addr))
            .then_some(())
    });
    alice.send("bob", "sent through B after A died");

    // bob comes back (to B, the first of his list): everything is there.
    bob.restart();
    for i in 0..5 {
        bob.wait_message("alice", &format!("queued {i}"));
    }
    bob.wait_message("alice", "sent through B after A died");

    // Redis dies (SIGKILL) and comes back from its append-only file: what
    // the relay acknowledged before is still delivered.
    bob.stop();
    for i in 0..5 {
        alice.send("bob", &format!("before redis restart {i}"));
    }
    redis.restart().unwrap();
    alice.send("bob", "after redis restart");
    bob.restart();
    for i in 0..5 {
        bob.wait_message("alice", &format!("before redis restart {i}"));
    }
    bob.wait_message("alice", "after redis restart");
    // And live again once the relays have resubscribed.
    bob.wait_logged_in();
    bob.send("alice", "still live");
    alice.wait_message("bob", "still live");
}
