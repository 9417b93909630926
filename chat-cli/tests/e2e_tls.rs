//! A relay with a CA-issued certificate (`relay --cert --key`) and an agent
//! that trusts the CA (`agentd --relay-cert`) instead of pinning a
//! fingerprint: the certificate must be issued by that CA *and* name the
//! host the user gave in `--relay`. A refused certificate (wrong CA, wrong
//! name, wrong pin) is a typed `certificate_rejected` error that says how to
//! re-pin; a relay nobody answers for stays `relay_unavailable`.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, password, run_cli, terminate, wait_for};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// Write `ca.pem`, and `relay.crt` + `relay.key` for `names` signed by it.
fn make_pki(dir: &Path, names: &[&str]) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("relay.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("relay.key"), key.serialize_pem()).unwrap();
}

/// Start the relay with the CA-issued certificate; returns it, its port and
/// its certificate fingerprint (`sha256:...`).
fn start_relay(dir: &Path) -> (Child, u16, String) {
    let mut child = Command::new(bin("relay"))
        .arg("--data-dir")
        .arg(dir.join("relay"))
        .arg("--cert")
        .arg(dir.join("relay.crt"))
        .arg("--key")
        .arg(dir.join("relay.key"))
        .args(["--listen", "127.0.0.1:0", "--status-listen", "off"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("relay.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let (mut port, mut fingerprint) = (None, None);
    for line in lines.by_ref() {
        if let Some(addr) = line.strip_prefix("relay: listening on ") {
            port = addr
                .trim()
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok());
        }
        if let Some(fp) = line.strip_prefix("relay: certificate ") {
            fingerprint = Some(fp.trim().to_string());
        }
        if port.is_some() && fingerprint.is_some() {
            break;
        }
    }
    // Keep reading: the relay prints more, and a closed pipe would end it.
    std::thread::spawn(move || lines.for_each(drop));
    (
        child,
        port.expect("relay printed its address"),
        fingerprint.expect("relay printed its certificate fingerprint"),
    )
}

/// How agentd is told to trust the relay.
enum Trust<'a> {
    Ca(&'a Path),
    Pin(&'a str),
}

/// Start agentd (log in `home.log`); waits until it answers.
fn start_agent(home: &Path, relay: &str, trust: Trust<'_>) -> Child {
    std::fs::create_dir_all(home.parent().unwrap()).unwrap();
    let log = std::fs::File::create(home.with_extension("log")).unwrap();
    let mut cmd = Command::new(bin("agentd"));
    cmd.arg("--home")
        .arg(home)
        .args(["--relay", relay, "--key-bits", "2048"]);
    match trust {
        Trust::Ca(ca) => cmd.arg("--relay-cert").arg(ca),
        Trust::Pin(fp) => cmd.args(["--relay-fingerprint", fp]),
    };
    let child = cmd
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for("agentd to answer", || {
        run_cli(home, &["status"], "")
            .status
            .success()
            .then_some(())
    });
    child
}

fn register(home: &Path, name: &str) -> std::process::Output {
    let email = format!("{name}@example.org");
    run_cli(
        home,
        &[
            "--json",
            "register",
            name,
            "--email",
            &email,
            "--password-stdin",
        ],
        &format!("{}\n", password(name)),
    )
}

/// `register`, which must fail: the typed error, whose kind must be `kind`.
fn register_refused(home: &Path, name: &str, kind: &str) -> serde_json::Value {
    let out = register(home, name);
    assert!(!out.status.success(), "register {name} should have failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap_or_else(|_| {
        panic!(
            "stderr is not JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let e = v["error"].clone();
    assert_eq!(e["kind"], kind, "{e}");
    e
}

/// A `certificate_rejected` error that tells how to re-pin after checking.
fn assert_repin_advice(e: &serde_json::Value) {
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("relay fingerprint --data-dir"),
        "{message}"
    );
    assert!(message.contains("--relay-fingerprint sha256:"), "{message}");
}

/// `chat-cli --json status`.
fn status(home: &Path) -> serde_json::Value {
    let out = run_cli(home, &["--json", "status"], "");
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn ca_issued_relay_certificate_is_checked_by_issuer_and_name() {
    let tmp = tempfile::tempdir().unwrap();
    // The certificate names the relay by its IP address (what --relay says
    // below) and by a DNS name that does not resolve here.
    make_pki(tmp.path(), &["127.0.0.1", "relay.securechat.test"]);
    let (mut relay, port, _) = start_relay(tmp.path());
    let ca = tmp.path().join("ca.pem");

    // Issuer and name match: the agent reaches the relay and registers.
    let home = tmp.path().join("alice");
    let mut alice = start_agent(&home, &format!("127.0.0.1:{port}"), Trust::Ca(&ca));
    let out = register(&home, "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    terminate(&mut alice);

    // Right issuer, wrong name: `localhost` is not in the certificate.
    let home = tmp.path().join("bob");
    let mut bob = start_agent(&home, &format!("localhost:{port}"), Trust::Ca(&ca));
    let e = register_refused(&home, "bob", "certificate_rejected");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("not valid for the name localhost"),
        "{message}"
    );
    assert_repin_advice(&e);
    terminate(&mut bob);

    // Another CA: refused as well.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    make_pki(&other, &["127.0.0.1"]);
    let home = tmp.path().join("carol");
    let other_ca = other.join("ca.pem");
    let mut carol = start_agent(&home, &format!("127.0.0.1:{port}"), Trust::Ca(&other_ca));
    let e = register_refused(&home, "carol", "certificate_rejected");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("not signed by the CA"), "{message}");
    assert_repin_advice(&e);
    terminate(&mut carol);

    terminate(&mut relay);
}

#[test]
fn wrong_pin_is_a_certificate_refusal_that_tells_how_to_repin() {
    let tmp = tempfile::tempdir().unwrap();
    make_pki(tmp.path(), &["127.0.0.1"]);
    let (mut relay, port, fingerprint) = start_relay(tmp.path());
    let relay_addr = format!("127.0.0.1:{port}");
    let presented = fingerprint.strip_prefix("sha256:").unwrap().to_string();
    // The right fingerprint with its first digit changed.
    let first = if presented.starts_with('0') { "1" } else { "0" };
    let wrong = format!("{first}{}", &presented[1..]);

    let home = tmp.path().join("dave");
    let started = Instant::now();
    let mut dave = start_agent(&home, &relay_addr, Trust::Pin(&format!("sha256:{wrong}")));
    let e = register_refused(&home, "dave", "certificate_rejected");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("different certificate than the pinned one"),
        "{message}"
    );
    assert!(
        message.contains(&format!("pinned:    sha256:{wrong}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("presented: sha256:{presented}")),
        "{message}"
    );
    assert!(
        message.contains("relay fingerprint --data-dir"),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "--relay {relay_addr} --relay-fingerprint sha256:{presented}"
        )),
        "{message}"
    );

    // `status` keeps the reason in view.
    let s = status(&home);
    assert_eq!(s["connection"], "disconnected", "{s}");
    let last = s["last_error"].as_str().unwrap_or_default();
    assert!(
        last.contains("different certificate than the pinned one"),
        "{s}"
    );
    assert!(last.contains(&presented), "{s}");

    // It does not hammer the relay: after the first refusal the next try
    // waits the longest backoff (at least 7.5 s), so within the first 5 s
    // there is exactly one attempt in the log.
    let window = Duration::from_secs(5);
    std::thread::sleep(window.saturating_sub(started.elapsed()));
    let log = std::fs::read_to_string(home.with_extension("log")).unwrap();
    let attempts = log
        .matches("different certificate than the pinned one")
        .count();
    assert_eq!(
        attempts, 1,
        "agentd retried a refused relay quickly:\n{log}"
    );
    terminate(&mut dave);

    // Re-pinned as the message says: it connects and registers.
    let mut dave = start_agent(&home, &relay_addr, Trust::Pin(&fingerprint));
    let out = register(&home, "dave");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&home)["connection"], "connected");
    terminate(&mut dave);
    terminate(&mut relay);
}

#[test]
fn unreachable_relay_is_relay_unavailable_not_a_certificate_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    // A UDP port nobody listens on.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = tmp.path().join("erin");
    let mut erin = start_agent(
        &home,
        &format!("127.0.0.1:{port}"),
        Trust::Pin(&format!("sha256:{}", "ab".repeat(32))),
    );
    let e = register_refused(&home, "erin", "relay_unavailable");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("retry"), "{message}");
    terminate(&mut erin);
}
