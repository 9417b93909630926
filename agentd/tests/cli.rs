//! agentd's command line as a user meets it: `--help` teaches, bad settings
//! are refused at start with a clear message and a failing exit status, and
//! nothing is left half-made.
//!
//! These tests also make `cargo test --workspace` build the `agentd` binary,
//! which the end-to-end tests in chat-cli spawn.

use std::process::{Command, Output};

fn agentd(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SECURECHAT_RELAY")
        .env_remove("SECURECHAT_RELAY_FINGERPRINT")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running agentd")
}

#[test]
fn help_names_the_relay_settings() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--help")
        .output()
        .expect("running agentd --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--relay",
        "--relay-fingerprint",
        "--relay-cert",
        "--home",
        "--key-bits",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    // Several relays: the list form, and what the relays of one list share.
    for text in [
        "--relay a.example.org:7443,b.example.org:7443",
        "one state",
        "one certificate",
    ] {
        assert!(help.contains(text), "--help lacks {text:?}:\n{help}");
    }
}

#[test]
fn bad_settings_fail_clearly_and_save_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fp = format!("sha256:{}", "ab".repeat(32));
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--relay",
                "127.0.0.1:7443",
                "--relay-fingerprint",
                "not-hex",
            ],
            "64 hex digits",
        ),
        (
            &[
                "--relay",
                "127.0.0.1:7443",
                "--relay-fingerprint",
                &fp,
                "--key-bits",
                "1000",
            ],
            "2048, 3072 or 4096",
        ),
        (
            &[
                "--relay",
                "127.0.0.1:7443",
                "--relay-cert",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
    ];
    for (i, (args, expect)) in cases.iter().enumerate() {
        let home = tmp.path().join(format!("home{i}"));
        let out = agentd(&home, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(expect),
            "{args:?}: stderr lacks {expect:?}:\n{err}"
        );
        assert!(
            !home.join("agentd.toml").exists(),
            "{args:?}: a refused setting was saved"
        );
    }
}
