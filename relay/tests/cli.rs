//! The `relay` binary as a user and a setup script see it: `--help`,
//! `relay fingerprint`, the start-up lines on stdout, and a clean exit on
//! SIGTERM.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");

#[test]
fn help_documents_the_flags_and_defaults() {
    let out = Command::new(RELAY).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--data-dir",
        "--listen",
        "--status-listen",
        "--smtp-url",
        "--smtp-url-file",
        "SECURECHAT_SMTP_URL",
        "--mail-from",
        "--cert",
        "--key",
        "--retention",
        "--quota-messages",
        "--quota-bytes",
        "--max-connections",
        "--max-connections-per-source",
        "--unauthenticated-timeout",
        "--sender-share-percent",
        "--sends-per-minute",
        "--argon2-workers",
        "--argon2-queue",
        "--code-ttl",
        "Default: 10m",
        "--session-ttl",
        "Default: 30d",
        "--log-level",
        "Default: info",
        "RUST_LOG",
        "fingerprint",
        "127.0.0.1:7443",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn prints_start_lines_matching_fingerprint_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fp = Command::new(RELAY)
        .arg("fingerprint")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        fp.status.success(),
        "{}",
        String::from_utf8_lossy(&fp.stderr)
    );
    let fp = String::from_utf8(fp.stdout).unwrap().trim().to_string();
    let hex = fp.strip_prefix("sha256:").expect("sha256: prefix");
    assert_eq!(hex.len(), 64);
    assert!(hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nstatus_listen = \"off\"\nretention = \"7d\"\n",
    )
    .unwrap();
    let mut child = Command::new(RELAY)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("relay: listening on ")
        .expect("listening line");
    assert!(addr.parse::<std::net::SocketAddr>().is_ok(), "{first}");
    assert_eq!(
        lines.next().unwrap().unwrap(),
        format!("relay: certificate {fp}")
    );
    let third = lines.next().unwrap().unwrap();
    assert_eq!(
        third,
        format!(
            "relay: no SMTP configured; verification mails go to {}",
            data.join("outbox").display()
        )
    );

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "relay exited with {status}");
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(RELAY)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relay.toml") && err.contains("lisen"), "{err}");
}

#[test]
fn nonsense_settings_are_refused_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cases: &[(&[&str], &str)] = &[
        (&["--retention", "0"], "--retention"),
        (&["--retention", "0s"], "--retention"),
        (&["--retention", "200y"], "--retention"),
        (&["--retention", "soon"], "--retention"),
        (&["--quota-messages", "0"], "--quota-messages"),
        (&["--quota-bytes", "0"], "--quota-bytes"),
        (&["--session-ttl", "0"], "--session-ttl"),
        (&["--code-ttl", "0"], "--code-ttl"),
        (&["--code-ttl", "ten minutes"], "--code-ttl"),
        (&["--max-connections", "0"], "--max-connections"),
        (
            &["--max-connections-per-source", "0"],
            "--max-connections-per-source",
        ),
        (
            &["--unauthenticated-timeout", "0"],
            "--unauthenticated-timeout",
        ),
        (
            &["--unauthenticated-timeout", "soon"],
            "--unauthenticated-timeout",
        ),
        (&["--sender-share-percent", "0"], "--sender-share-percent"),
        (&["--sender-share-percent", "101"], "--sender-share-percent"),
        (&["--sends-per-minute", "0"], "--sends-per-minute"),
        (&["--argon2-workers", "0"], "--argon2-workers"),
        (&["--log-level", "loud=="], "--log-level"),
    ];
    for (args, flag) in cases {
        let out = Command::new(RELAY)
            .args(*args)
            .arg("--data-dir")
            .arg(&data)
            .arg("fingerprint")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was taken");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!data.exists(), "{args:?} made the data directory");
    }

    // The same from the config file names its key.
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "quota_messages = 0\n").unwrap();
    let out = Command::new(RELAY)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .arg("fingerprint")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`quota_messages` in the config file") && stderr.contains("at least 1"),
        "{stderr}"
    );
}
