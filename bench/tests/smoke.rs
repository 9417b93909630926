//! The load tool on a tiny workload, through the built binaries: it starts
//! its own relay and a redis-server, runs every measurement and prints one
//! JSON object with every figure. Speed is not checked here (benchmarks are
//! not timed tests); that every run happened and added up is.

use std::path::PathBuf;
use std::process::Command;

fn relay_bin() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_securechat-bench"));
    let relay = bench.with_file_name("relay");
    assert!(
        relay.exists(),
        "{} is missing: run `cargo build --bins` first",
        relay.display()
    );
    relay
}

#[test]
fn a_tiny_run_reports_every_figure_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_securechat-bench"))
        .arg("--relay-bin")
        .arg(relay_bin())
        .args([
            "--connections",
            "2",
            "--in-flight",
            "2",
            "--messages",
            "200",
        ])
        .args(["--size", "100", "--rate", "100", "--e2e-duration", "1s"])
        .args(["--drain", "150", "--idle", "4", "--compare-redis", "--json"])
        .output()
        .expect("securechat-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "securechat-bench failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let num = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing or not a number in {v}"))
    };
    for key in [
        "send_msgs_per_s",
        "send_p50_ms",
        "send_p99_ms",
        "e2e_p50_ms",
        "e2e_p99_ms",
        "drain_msgs_per_s",
        "idle_rss_bytes_per_conn",
        "logins_per_s",
        "resumes_per_s",
        "redis_msgs_per_s",
        "ratio_vs_redis",
    ] {
        assert!(num(key) >= 0.0, "{key} = {}", num(key));
    }
    assert!(num("send_msgs_per_s") > 0.0);
    assert!(num("send_p50_ms") <= num("send_p99_ms"));
    assert_eq!(num("e2e_sent"), 100.0);
    assert_eq!(num("e2e_received"), 100.0, "every message arrived");
    assert_eq!(num("drain_messages"), 150.0);
    assert_eq!(num("idle_sessions"), 4.0);
    assert!(num("envelope_bytes") > 100.0);
    let ratio = num("send_msgs_per_s") / num("redis_msgs_per_s");
    assert!((num("ratio_vs_redis") - ratio).abs() < 1e-6);
}

#[test]
fn bad_settings_are_refused_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_securechat-bench"))
        .args(["--connections", "0"])
        .output()
        .expect("securechat-bench runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--connections"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_securechat-bench"))
        .args(["--relay", "127.0.0.1:9"])
        .output()
        .expect("securechat-bench runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--relay-fingerprint"), "{stderr}");
}
