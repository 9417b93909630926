//! The relay's HTTP listener as an operator's tools see it: `/metrics`
//! parsed after a known sequence of actions (each counter checked), the
//! exposition format's lines, `/healthz`, and the status page: live ids
//! matching `/status.json`, nothing loaded from elsewhere, a CSP header, and
//! the messages-per-second series.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use securechat_client::relay::RelayClient;
use securechat_common::codec;
use securechat_common::protocol::{
    AckOutcome, ErrorCode, Push, Request, Response, PROTOCOL_VERSION,
};
use securechat_common::PublicKey;
use securechat_testkit::relay::test_config;
use securechat_testkit::{
    error_code, http_get, next_queued, raw_request, SmtpServer, TestRelay, TestUser,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

/// One HTTP/1.0 GET: (status code, lowercase header lines, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<String>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers = lines.map(str::to_ascii_lowercase).collect();
    (status.parse().unwrap(), headers, body.to_string())
}

/// The samples of an exposition, `series → value`, after checking that
/// every sample's family was introduced by `# HELP` and `# TYPE` lines and
/// that every line is a comment or `series value`.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut helped = BTreeSet::new();
    let mut typed = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.is_empty(), "{line}");
            helped.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            typed.insert(name.to_string(), kind.to_string());
        } else {
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(typed.contains_key(family), "no # TYPE for {line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            assert!(
                samples.insert(series.to_string(), value).is_none(),
                "twice: {line}"
            );
        }
    }
    samples
}

async fn lookup(client: &RelayClient, name: &str) -> PublicKey {
    match client
        .call(&Request::LookupKey {
            username: name.into(),
        })
        .await
        .unwrap()
    {
        Response::Key { public_key, .. } => PublicKey::from_der(&public_key).unwrap(),
        other => panic!("lookup: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_count_a_known_sequence_of_actions() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), Some(&smtp)))
        .await
        .unwrap();
    let status = relay.status_addr().unwrap();

    // Before anything: every family is there, every counter at zero.
    let (code, headers, body) = get(status, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        headers
            .iter()
            .any(|h| h.starts_with("content-type: text/plain; version=0.0.4")),
        "{headers:?}"
    );
    let before = parse_exposition(&body);
    assert_eq!(before["securechat_relay_logins_total{outcome=\"ok\"}"], 0.0);
    assert_eq!(
        before["securechat_relay_commit_duration_seconds_count"],
        0.0
    );

    // register (two users), login ok (both), a failed login, a send, a
    // delivery, a malformed frame.
    let mut alice = TestUser::new("alice").unwrap();
    let mut bob = TestUser::new("bob").unwrap();
    let a = relay.connect().await.unwrap();
    alice.register(&a, &smtp).await.unwrap();
    bob.register(&a, &smtp).await.unwrap();
    alice.login(&a).await.unwrap();
    let b = relay.connect().await.unwrap();
    bob.login(&b).await.unwrap();

    let guesser = relay.connect().await.unwrap();
    let code = bob.totp_at_step(bob.step_now()).unwrap();
    let wrong = guesser
        .login("bob", "not bob's password", &code, &bob.key)
        .await;
    assert!(wrong.is_err(), "a wrong password logged in");

    let bob_key = lookup(&a, "bob").await;
    let env = alice.seal_to("bob", &bob_key, b"counted").unwrap();
    let stored = a
        .call(&Request::Send {
            envelope: env.clone(),
        })
        .await
        .unwrap();
    assert!(matches!(
        stored,
        Response::Stored {
            duplicate: false,
            ..
        }
    ));
    // The push stream shows up with its first message.
    let mut pushes = tokio::time::timeout(WAIT, b.accept_pushes())
        .await
        .unwrap()
        .unwrap();
    let pushed = next_queued(&mut pushes, WAIT).await.unwrap();
    let Push::Deliver { envelope, .. } = pushed else {
        panic!("push: {pushed:?}");
    };
    assert_eq!(envelope.id, env.id);
    let acked = b
        .call(&Request::Ack {
            id: env.id,
            outcome: AckOutcome::Stored,
        })
        .await
        .unwrap();
    assert_eq!(acked, Response::Ok);

    // A real request with bytes after it: malformed. (A request kind
    // this build does not know is counted apart, as `unknown`.)
    let mut frame = codec::encode(&Request::Online).unwrap().to_vec();
    frame.extend_from_slice(b"xx");
    let len = u32::try_from(frame.len() - 4).unwrap();
    frame[..4].copy_from_slice(&len.to_be_bytes());
    let answer = raw_request(&guesser, &frame).await.unwrap();
    let Response::Error(e) = answer else {
        panic!("a malformed frame answered {answer:?}");
    };
    assert_eq!(e.code, ErrorCode::BadRequest);
    let unknown = [&[0, 0, 0, 2, PROTOCOL_VERSION][..], &[0x7f]].concat();
    assert!(matches!(
        raw_request(&guesser, &unknown).await.unwrap(),
        Response::Error(_)
    ));

    let (_, _, body) = get(status, "/metrics").await;
    let m = parse_exposition(&body);
    let expect = [
        ("securechat_relay_store_up", 1.0),
        ("securechat_relay_accounts", 2.0),
        ("securechat_relay_pending_registrations", 0.0),
        ("securechat_relay_open_connections", 3.0),
        ("securechat_relay_online_users", 2.0),
        ("securechat_relay_queued_messages", 0.0),
        ("securechat_relay_queued_bytes", 0.0),
        ("securechat_relay_messages_accepted_total", 1.0),
        ("securechat_relay_messages_delivered_total", 1.0),
        ("securechat_relay_logins_total{outcome=\"ok\"}", 2.0),
        (
            "securechat_relay_logins_total{outcome=\"bad_credentials\"}",
            1.0,
        ),
        (
            "securechat_relay_logins_total{outcome=\"bad_signature\"}",
            0.0,
        ),
        (
            "securechat_relay_logins_total{outcome=\"rate_limited\"}",
            0.0,
        ),
        ("securechat_relay_resumes_total{outcome=\"ok\"}", 0.0),
        (
            "securechat_relay_rejected_frames_total{reason=\"malformed\"}",
            1.0,
        ),
        (
            "securechat_relay_rejected_frames_total{reason=\"oversized\"}",
            0.0,
        ),
        (
            "securechat_relay_rejected_frames_total{reason=\"unknown\"}",
            1.0,
        ),
        ("securechat_relay_refusals_total{limit=\"quota\"}", 0.0),
        ("securechat_relay_refusals_total{limit=\"send_rate\"}", 0.0),
        ("securechat_relay_refusals_total{limit=\"busy\"}", 0.0),
        // One commit for the send, one for the ack: they came one by one.
        ("securechat_relay_commit_duration_seconds_count", 2.0),
        (
            "securechat_relay_commit_duration_seconds_bucket{le=\"+Inf\"}",
            2.0,
        ),
    ];
    for (series, value) in expect {
        assert_eq!(m.get(series), Some(&value), "{series} in\n{body}");
    }
    // Buckets are cumulative, in order of their bounds.
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("securechat_relay_commit_duration_seconds_bucket"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(buckets.len() > 5 && buckets.windows(2).all(|w| w[0] <= w[1]));
    assert!(m["securechat_relay_commit_duration_seconds_sum"] > 0.0);
    for line in body.lines() {
        assert!(!line.contains("alice") && !line.contains("bob"), "{line}");
    }

    // The status page's numbers agree.
    let json: serde_json::Value =
        serde_json::from_str(&http_get(status, "/status.json").await.unwrap()).unwrap();
    assert_eq!(json["logins_ok"], 2);
    assert_eq!(json["logins_failed"], 1);
    assert_eq!(json["rejected_frames_malformed"], 1);
    assert_eq!(json["messages_delivered"], 1);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn healthz_says_ok_while_the_store_answers() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), None))
        .await
        .unwrap();
    let (code, _, body) = get(relay.status_addr().unwrap(), "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _, _) = get(relay.status_addr().unwrap(), "/no-such-page").await;
    assert_eq!(code, 404);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn the_status_page_is_self_contained_and_every_count_is_live() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), None))
        .await
        .unwrap();
    let status = relay.status_addr().unwrap();
    let _connected = relay.connect().await.unwrap();
    let (code, headers, page) = get(status, "/").await;
    assert_eq!(code, 200);

    // Nothing from elsewhere: no src/href to another host, a CSP that
    // forbids it anyway.
    let lower = page.to_ascii_lowercase();
    for attr in ["src=", "href="] {
        for (i, _) in lower.match_indices(attr) {
            let value = &lower[i + attr.len()..];
            let value = value.split(['>', ' ']).next().unwrap();
            assert!(
                !value.contains("http") && !value.contains("//"),
                "{attr}{value}"
            );
        }
    }
    assert!(!lower.contains("<link") && !lower.contains("@import"));
    let csp = headers
        .iter()
        .find_map(|h| h.strip_prefix("content-security-policy: "))
        .expect("a Content-Security-Policy header");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("http"),
        "{csp}"
    );

    // Every count sits in an element whose id is its key in status.json,
    // and every number there has its element.
    let json: serde_json::Value =
        serde_json::from_str(&http_get(status, "/status.json").await.unwrap()).unwrap();
    let numbers: BTreeSet<&str> = json
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.is_u64())
        .map(|(k, _)| k.as_str())
        .collect();
    let cells: BTreeSet<&str> = page
        .match_indices("<td id=\"")
        .map(|(i, m)| {
            let rest = &page[i + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert_eq!(cells, numbers);
    assert!(
        page.contains("<td id=\"open_connections\">1</td>"),
        "the page shows the open connection"
    );
    assert!(page.contains("fetch(\"/status.json\""), "the page polls");

    // The chart's series: one point per second, filled by the relay.
    let chart = &json["chart"];
    assert_eq!(chart["interval_secs"], 1);
    assert!(chart["accepted"].is_array() && chart["delivered"].is_array());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let json: serde_json::Value =
        serde_json::from_str(&http_get(status, "/status.json").await.unwrap()).unwrap();
    let points = json["chart"]["accepted"].as_array().unwrap();
    assert!(!points.is_empty(), "no point after 2.5 s: {json}");
    assert_eq!(
        points.len(),
        json["chart"]["delivered"].as_array().unwrap().len()
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_login_is_counted_by_its_outcome() {
    // Unknown user, wrong signature and rate limits end up in their own
    // series; here the unknown user, from the status page's angle.
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(test_config(dir.path(), None))
        .await
        .unwrap();
    let c = relay.connect().await.unwrap();
    let nobody = TestUser::new("nobody").unwrap();
    let r = c
        .login("nobody", "whatever password", "123456", &nobody.key)
        .await;
    assert_eq!(
        error_code(r.map(|_| Response::Ok)),
        Ok(ErrorCode::InvalidCredentials)
    );
    let (_, _, body) = get(relay.status_addr().unwrap(), "/metrics").await;
    let m = parse_exposition(&body);
    assert_eq!(
        m["securechat_relay_logins_total{outcome=\"bad_credentials\"}"],
        1.0
    );
    relay.stop().await.unwrap();
}
