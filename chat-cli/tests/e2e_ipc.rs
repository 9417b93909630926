//! The local socket as a hostile or outdated client sees it: raw bytes on
//! the real agentd's Unix socket, then a normal chat-cli afterwards.
//!
//! Needs the binaries built first: `cargo build --bins`. Needs root too:
//! one test runs chat-cli as another uid, and fails (it does not skip)
//! when it cannot.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use common::{Agent, Relay};
use securechat_common::ipc::{IPC_VERSION, MAX_LINE_LEN};

/// A raw connection to agentd's socket.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(agent: &Agent) -> Self {
        let stream = UnixStream::connect(agent.socket()).unwrap();
        // A bound on every read so a missing answer fails instead of hanging.
        stream.set_read_timeout(Some(common::WAIT)).unwrap();
        Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// Connect and pass the version check.
    fn greeted(agent: &Agent) -> Self {
        let mut raw = Self::connect(agent);
        let hello = raw.call(&format!(r#"{{"request":"hello","version":{IPC_VERSION}}}"#));
        assert_eq!(hello["response"], "hello", "{hello}");
        raw
    }

    /// Write raw bytes; agentd may close early, so a write error is allowed.
    fn write(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
        let _ = self.writer.flush();
    }

    /// One JSON answer line.
    fn read_json(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "agentd closed the connection without an answer");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    /// Write `line` plus a newline and read the answer.
    fn call(&mut self, line: &str) -> serde_json::Value {
        self.write(format!("{line}\n").as_bytes());
        self.read_json()
    }

    /// Assert that agentd closed the connection (end of stream, or a reset
    /// when it left unread bytes behind).
    fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "more after the error: {rest:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

/// An error answer of `kind`.
fn assert_error(v: &serde_json::Value, kind: &str) {
    assert_eq!(v["response"], "error", "{v}");
    assert_eq!(v["kind"], kind, "{v}");
    assert!(!v["message"].as_str().unwrap().is_empty(), "{v}");
}

#[test]
fn bad_clients_get_typed_errors_and_agentd_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let alice = Agent::start(tmp.path(), "alice", &relay);

    // A well-behaved client stays connected through everything below.
    let mut good = Raw::greeted(&alice);

    // Another local protocol version: typed error, connection closed.
    let mut old = Raw::connect(&alice);
    let other = IPC_VERSION + 41;
    let v = old.call(&format!(r#"{{"request":"hello","version":{other}}}"#));
    assert_error(&v, "version_mismatch");
    let message = v["message"].as_str().unwrap();
    assert!(message.contains(&other.to_string()), "{message}");
    assert!(message.contains(&IPC_VERSION.to_string()), "{message}");
    old.assert_closed();

    // A request before the hello.
    let mut eager = Raw::connect(&alice);
    assert_error(&eager.call(r#"{"request":"status"}"#), "bad_request");
    eager.assert_closed();

    // Garbage, invalid UTF-8 and an unknown request as the first line.
    for first in [
        &b"GET / HTTP/1.1\r\n"[..],
        &b"\xff\xfe\x00{\"request\"\n"[..],
        &b"{\"request\":\"format_disk\"}\n"[..],
        &b"\n"[..],
    ] {
        let mut raw = Raw::connect(&alice);
        raw.write(first);
        assert_error(&raw.read_json(), "bad_request");
        raw.assert_closed();
    }

    // After the hello a malformed line is answered and the connection
    // goes on.
    let mut chatty = Raw::greeted(&alice);
    assert_error(&chatty.call("{not json"), "bad_request");
    assert_error(&chatty.call(r#"{"request":"send","to":7}"#), "bad_request");
    let v = chatty.call(r#"{"request":"status"}"#);
    assert_eq!(v["response"], "status", "{v}");

    // A line longer than the limit, before and after the hello: typed
    // error, connection closed, nothing buffered past the limit.
    let huge = vec![b'x'; MAX_LINE_LEN + 4096];
    let mut raw = Raw::connect(&alice);
    raw.write(&huge);
    assert_error(&raw.read_json(), "too_large");
    raw.assert_closed();
    let mut raw = Raw::greeted(&alice);
    let mut line = br#"{"request":"send","to":"bob","text":""#.to_vec();
    line.resize(MAX_LINE_LEN + 10, b'a');
    line.extend_from_slice(b"\"}\n");
    raw.write(&line);
    assert_error(&raw.read_json(), "too_large");
    raw.assert_closed();

    // A client that hangs up in the middle of a line.
    let mut raw = Raw::connect(&alice);
    raw.write(br#"{"request":"hel"#);
    drop(raw);

    // agentd still serves the connection that was open all along, new
    // raw connections, and chat-cli.
    let v = good.call(r#"{"request":"status"}"#);
    assert_eq!(v["response"], "status", "{v}");
    let mut again = Raw::greeted(&alice);
    // No account yet: nothing to read, and it says why.
    let v = again.call(r#"{"request":"inbox","all":true}"#);
    assert_error(&v, "not_registered");
    assert_eq!(alice.status()["has_key"], false);
    let out = alice.cli(&["status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("agentd "));
}

/// The uid this test process runs as (the owner of a file it creates).
fn own_uid(dir: &std::path::Path) -> u32 {
    let probe = dir.join("uid-probe");
    std::fs::write(&probe, b"").unwrap();
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&probe).unwrap())
}

#[test]
fn another_uid_is_refused_by_agentd() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;

    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        own_uid(tmp.path()),
        0,
        "this test must run as root: it starts chat-cli as uid {NOBODY} (nobody) to check \
         that agentd refuses a peer of another user. Run it as root (CI does), e.g. \
         `sudo -E cargo test -p securechat-cli --test e2e_ipc`; it does not skip itself, so \
         that the check cannot silently stop running."
    );
    let relay = Relay::start(tmp.path());
    let alice = Agent::start(tmp.path(), "alice", &relay);

    // Open up everything the file system would refuse, so that only
    // agentd's peer check stands in the way: the directories, the socket,
    // and a chat-cli binary nobody can run wherever the build lives.
    for dir in [tmp.path(), alice.home.as_path()] {
        std::fs::set_permissions(dir, PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(alice.socket(), PermissionsExt::from_mode(0o777)).unwrap();
    let cli = tmp.path().join("chat-cli");
    if std::fs::hard_link(common::bin("chat-cli"), &cli).is_err() {
        std::fs::copy(common::bin("chat-cli"), &cli).unwrap();
    }
    std::fs::set_permissions(&cli, PermissionsExt::from_mode(0o755)).unwrap();

    let out = std::process::Command::new(&cli)
        .arg("--home")
        .arg(&alice.home)
        .args(["--json", "status"])
        .env("HOME", tmp.path())
        .current_dir(tmp.path())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "uid {NOBODY} got an answer: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // agentd itself answered with the typed refusal (not the file system
    // with EACCES, which chat-cli reports as a client error).
    let v: serde_json::Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|_| panic!("stderr is not JSON: {stderr}"));
    assert_eq!(v["error"]["kind"], "permission_denied", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another user"),
        "{v}"
    );
    let log = std::fs::read_to_string(alice.home.with_extension("log")).unwrap();
    assert!(
        log.contains(&format!(
            "refused a local connection from uid Some({NOBODY})"
        )),
        "{log}"
    );

    // The owner is still served.
    assert_eq!(alice.status()["has_key"], false);
}
