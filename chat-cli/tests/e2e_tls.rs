//! A relay with a CA-issued certificate (`relay --cert --key`) and an agent
//! that trusts the CA (`agentd --relay-cert`) instead of pinning a
//! fingerprint: the certificate must be issued by that CA *and* name the
//! host the user gave in `--relay`.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

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

/// Start the relay with the CA-issued certificate; returns it and its port.
fn start_relay(dir: &Path) -> (Child, u16) {
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
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let port = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let addr = line.strip_prefix("relay: listening on ")?;
            addr.trim().rsplit_once(':')?.1.parse().ok()
        })
        .expect("relay printed its address");
    (child, port)
}

fn start_agent(home: &Path, relay: &str, ca: &Path) -> Child {
    let child = Command::new(bin("agentd"))
        .arg("--home")
        .arg(home)
        .args(["--relay", relay, "--key-bits", "2048"])
        .arg("--relay-cert")
        .arg(ca)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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
        &["register", name, "--email", &email, "--password-stdin"],
        &format!("{}\n", password(name)),
    )
}

#[test]
fn ca_issued_relay_certificate_is_checked_by_issuer_and_name() {
    let tmp = tempfile::tempdir().unwrap();
    // The certificate names the relay by its IP address (what --relay says
    // below) and by a DNS name that does not resolve here.
    make_pki(tmp.path(), &["127.0.0.1", "relay.securechat.test"]);
    let (mut relay, port) = start_relay(tmp.path());
    let ca = tmp.path().join("ca.pem");

    // Issuer and name match: the agent reaches the relay and registers.
    let home = tmp.path().join("alice");
    let mut alice = start_agent(&home, &format!("127.0.0.1:{port}"), &ca);
    let out = register(&home, "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    terminate(&mut alice);

    // Right issuer, wrong name: `localhost` is not in the certificate.
    let home = tmp.path().join("bob");
    let mut bob = start_agent(&home, &format!("localhost:{port}"), &ca);
    let out = register(&home, "bob");
    assert!(
        !out.status.success(),
        "a certificate for another name was accepted"
    );
    terminate(&mut bob);

    // Another CA: refused as well.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    make_pki(&other, &["127.0.0.1"]);
    let home = tmp.path().join("carol");
    let mut carol = start_agent(&home, &format!("127.0.0.1:{port}"), &other.join("ca.pem"));
    let out = register(&home, "carol");
    assert!(
        !out.status.success(),
        "a certificate from an unknown CA was accepted"
    );
    terminate(&mut carol);

    terminate(&mut relay);
}
