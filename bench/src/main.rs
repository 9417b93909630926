//! securechat-bench: load for relays, measured beside Redis.
//!
//! It registers and logs in simulated users through the real protocol over
//! real QUIC, then measures, in order: full MFA logins, end-to-end latency at
//! a fixed offered rate, durable send throughput, a queue drain, and idle
//! sessions (with session resumes). With `--compare-redis` it runs
//! redis-server (`appendfsync always`) and redis-benchmark at the same
//! concurrency in the same run.
#![forbid(unsafe_code)]

mod redis;
mod stats;
mod target;
mod users;
mod workloads;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::target::Target;
use crate::users::{Identity, Template};
use crate::workloads::{DrainResult, E2eResult, IdleResult, SendResult, Session};

/// Load a securechat relay with simulated users and measure it (beside Redis).
///
/// Without --relay it starts its own relay (the `relay` program beside this
/// one, or on PATH) on embedded defaults in a temporary directory, with its
/// limits raised so that none refuses the load. With --relay it loads relays
/// that already run: give their certificate with --relay-fingerprint and the
/// folder their verification mail goes to with --relay-outbox (a relay
/// without --smtp-url writes it to DATA_DIR/outbox/); their limits must
/// allow the load (--sends-per-minute, --attempts-per-minute,
/// --max-connections-per-source, --quota-messages, --sender-share-percent).
///
/// Each connection is one simulated user sending to its own recipient.
/// Keys: one RSA-2048 key is made once and used by every simulated user; one
/// envelope is sealed per sender and sent again under fresh ids (the relay
/// does not check signatures, so its work is the same).
///
/// Build it in release mode for real figures:
///   cargo build --release --bins && target/release/securechat-bench --compare-redis
#[derive(Debug, Parser)]
#[command(name = "securechat-bench", version, verbatim_doc_comment)]
struct Cli {
    /// A running relay to load, HOST:PORT (repeat for several relays;
    /// connections go round-robin). Default: start one.
    #[arg(long = "relay", value_name = "ADDR")]
    relays: Vec<String>,

    /// The relays' certificate, `sha256:<hex>` (`relay fingerprint`). Needed with --relay.
    #[arg(long, value_name = "SHA256", requires = "relays")]
    relay_fingerprint: Option<String>,

    /// Where the relays write verification mail (their DATA_DIR/outbox).
    /// Needed with --relay.
    #[arg(long, value_name = "DIR", requires = "relays")]
    relay_outbox: Option<PathBuf>,

    /// A relay's process id, to report its memory per idle session.
    #[arg(long, value_name = "PID", requires = "relays")]
    relay_pid: Option<u32>,

    /// The relay program to start when no --relay is given.
    #[arg(long, value_name = "FILE", conflicts_with = "relays")]
    relay_bin: Option<PathBuf>,

    /// Connections, each a logged-in user sending to its own recipient.
    #[arg(long, value_name = "N", default_value_t = 16)]
    connections: usize,

    /// Requests in flight on each connection (one QUIC stream each).
    #[arg(long, value_name = "K", default_value_t = 1)]
    in_flight: usize,

    /// Messages the durable-send run sends in all.
    #[arg(long, value_name = "M", default_value_t = 20_000)]
    messages: usize,

    /// Message body size in bytes (the envelope adds its header, a wrapped
    /// key and a signature: about 600 bytes with RSA-2048).
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    size: usize,

    /// Offered rate of the end-to-end run, messages per second.
    #[arg(long, value_name = "R", default_value_t = 1000)]
    rate: u32,

    /// How long the end-to-end run offers its rate (e.g. 5s).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    e2e_duration: humantime::Duration,

    /// Messages queued for the drain run.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    drain: usize,

    /// Logged-in sessions held open at once for the idle run.
    #[arg(long, value_name = "N", default_value_t = 500)]
    idle: usize,

    /// Runs to do (repeat or comma-separate). Default: all.
    #[arg(long, value_name = "RUN", value_delimiter = ',')]
    only: Vec<Run>,

    /// Also start redis-server (appendfsync always) and run redis-benchmark
    /// (LPUSH, values as large as the envelopes) at the same concurrency, and
    /// report the ratio. Needs redis-server and redis-benchmark on PATH.
    #[arg(long)]
    compare_redis: bool,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Run {
    /// Durable sends: throughput and latency.
    Send,
    /// End-to-end latency at the offered --rate.
    E2e,
    /// A recipient drains --drain queued messages.
    Drain,
    /// --idle sessions held open: memory; session resumes per second.
    Idle,
}

/// Everything measured, as `--json` prints it.
#[derive(Debug, Default, Serialize)]
struct Report {
    relays: usize,
    connections: usize,
    in_flight: usize,
    size: usize,
    envelope_bytes: usize,
    logins_per_s: Option<f64>,
    send_msgs_per_s: Option<f64>,
    send_p50_ms: Option<f64>,
    send_p99_ms: Option<f64>,
    send_max_ms: Option<f64>,
    e2e_offered_per_s: Option<f64>,
    e2e_sent: Option<usize>,
    e2e_received: Option<usize>,
    e2e_p50_ms: Option<f64>,
    e2e_p99_ms: Option<f64>,
    e2e_max_ms: Option<f64>,
    drain_messages: Option<usize>,
    drain_msgs_per_s: Option<f64>,
    drain_pushed_per_s: Option<f64>,
    idle_sessions: Option<usize>,
    idle_rss_bytes: Option<u64>,
    idle_rss_bytes_per_conn: Option<f64>,
    resumes_per_s: Option<f64>,
    redis_msgs_per_s: Option<f64>,
    redis_p50_ms: Option<f64>,
    redis_p99_ms: Option<f64>,
    ratio_vs_redis: Option<f64>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("securechat-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("securechat-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.connections == 0 || cli.in_flight == 0 || cli.rate == 0 {
        bail!("--connections, --in-flight and --rate must be at least 1");
    }
    if cli.size == 0 || cli.size > securechat_common::limits::MAX_MESSAGE_LEN {
        bail!(
            "--size must be 1 to {} bytes (the largest message)",
            securechat_common::limits::MAX_MESSAGE_LEN
        );
    }
    let runs = if cli.only.is_empty() {
        vec![Run::E2e, Run::Send, Run::Drain, Run::Idle]
    } else {
        cli.only.clone()
    };
    raise_open_files(cli.connections * 2 + cli.idle + 64);

    let target = Arc::new(if cli.relays.is_empty() {
        progress(&cli, "starting a relay");
        Target::start_own(cli.relay_bin.as_deref()).await?
    } else {
        Target::external(
            &cli.relays,
            cli.relay_fingerprint
                .as_deref()
                .context("--relay needs --relay-fingerprint (`relay fingerprint` prints it)")?,
            cli.relay_outbox
                .clone()
                .context("--relay needs --relay-outbox (the relay's <data-dir>/outbox)")?,
            cli.relay_pid,
        )?
    });
    let result = measure(&cli, &runs, &target).await;
    if let Ok(target) = Arc::try_unwrap(target) {
        target.stop().await;
    }
    let report = result?;
    if cli.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure(cli: &Cli, runs: &[Run], target: &Arc<Target>) -> anyhow::Result<Report> {
    let id = Identity::generate()?;
    let tag = run_tag()?;
    let n = cli.connections;
    let mut names: Vec<String> = (0..n).map(|i| format!("b{tag}s{i}")).collect();
    names.extend((0..n).map(|i| format!("b{tag}r{i}")));
    names.push(format!("b{tag}drain"));
    if runs.contains(&Run::Idle) {
        names.extend((0..cli.idle).map(|i| format!("b{tag}i{i}")));
    }
    let users = names.len();
    progress(cli, &format!("registering and logging in {users} users"));
    // Senders, recipients and the drain user stay connected.
    let keep = 2 * n + 1;
    let (sessions, idlers, login_time) = workloads::sign_up(target, &id, names, keep).await?;
    let mut sessions = sessions.into_iter();
    let senders: Vec<Session> = sessions.by_ref().take(n).collect();
    let recipients: Vec<Session> = sessions.by_ref().take(n).collect();
    let drainer = sessions.next().context("the drain user")?;

    let mut report = Report {
        relays: target.addrs.len(),
        connections: n,
        in_flight: cli.in_flight,
        size: cli.size,
        logins_per_s: Some(stats::rate(users, login_time)),
        ..Report::default()
    };
    let direct: Vec<Arc<Template>> = senders
        .iter()
        .zip(&recipients)
        .map(|(s, r)| Template::seal(&id, &s.user.name, &r.user.name, cli.size).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    report.envelope_bytes = direct.first().map_or(0, |t| t.wire_len());

    if runs.contains(&Run::E2e) {
        progress(
            cli,
            &format!("end to end at {} msg/s for {}", cli.rate, cli.e2e_duration),
        );
        let pairs: Vec<_> = senders
            .iter()
            .zip(&direct)
            .zip(&recipients)
            .map(|((s, t), r)| (Arc::clone(&s.conn), Arc::clone(t), Arc::clone(&r.conn)))
            .collect();
        let e: E2eResult = workloads::end_to_end(&pairs, cli.rate, cli.e2e_duration.into()).await?;
        report.e2e_offered_per_s = Some(e.offered_per_s);
        report.e2e_sent = Some(e.sent);
        report.e2e_received = Some(e.received);
        report.e2e_p50_ms = Some(e.latency.p50_ms);
        report.e2e_p99_ms = Some(e.latency.p99_ms);
        report.e2e_max_ms = Some(e.latency.max_ms);
    }
    // From here on the recipients are offline: sends only queue.
    for r in &recipients {
        r.conn.close("recipient goes offline").await;
    }
    drop(recipients);

    let with_conns = |templates: &[Arc<Template>]| -> Vec<_> {
        senders
            .iter()
            .zip(templates)
            .map(|(s, t)| (Arc::clone(&s.conn), Arc::clone(t)))
            .collect::<Vec<_>>()
    };
    if runs.contains(&Run::Send) {
        progress(
            cli,
            &format!(
                "{} durable sends, {n} connections x {} in flight",
                cli.messages, cli.in_flight
            ),
        );
        let s: SendResult =
            workloads::send(&with_conns(&direct), cli.in_flight, cli.messages).await?;
        report.send_msgs_per_s = Some(s.msgs_per_s);
        report.send_p50_ms = Some(s.latency.p50_ms);
        report.send_p99_ms = Some(s.latency.p99_ms);
        report.send_max_ms = Some(s.latency.max_ms);
    }

    if runs.contains(&Run::Drain) && cli.drain > 0 {
        progress(
            cli,
            &format!("queueing {} messages for the drain", cli.drain),
        );
        drainer.conn.close("goes offline to have a queue").await;
        let to_drainer: Vec<Arc<Template>> = senders
            .iter()
            .map(|s| Template::seal(&id, &s.user.name, &drainer.user.name, cli.size).map(Arc::new))
            .collect::<anyhow::Result<_>>()?;
        workloads::send(&with_conns(&to_drainer), 16, cli.drain).await?;
        progress(cli, "draining");
        let d: DrainResult = workloads::drain(target, &id, &drainer.user, cli.drain).await?;
        report.drain_messages = Some(d.messages);
        report.drain_msgs_per_s = Some(d.acked_per_s);
        report.drain_pushed_per_s = Some(d.pushed_per_s);
    }
    for s in &senders {
        s.conn.close("bench done").await;
    }

    if runs.contains(&Run::Idle) {
        progress(cli, &format!("holding {} idle sessions", idlers.len()));
        let i: IdleResult = workloads::idle(target, &id, idlers).await?;
        report.idle_sessions = Some(i.sessions);
        report.idle_rss_bytes = i.rss_bytes;
        report.idle_rss_bytes_per_conn = i.rss_bytes_per_conn;
        report.resumes_per_s = Some(i.resumes_per_s);
    }

    if cli.compare_redis {
        progress(
            cli,
            "redis-server (appendfsync always) with redis-benchmark LPUSH",
        );
        let redis = redis::Redis::start().await?;
        let r = redis
            .lpush(n, cli.in_flight, cli.messages, report.envelope_bytes.max(1))
            .await;
        redis.stop().await;
        let r = r?;
        report.redis_msgs_per_s = Some(r.msgs_per_s);
        report.redis_p50_ms = Some(r.p50_ms);
        report.redis_p99_ms = Some(r.p99_ms);
        report.ratio_vs_redis = report
            .send_msgs_per_s
            .map(|ours| ours / r.msgs_per_s.max(1e-9));
    }
    Ok(report)
}

fn progress(cli: &Cli, what: &str) {
    if !cli.json {
        eprintln!("securechat-bench: {what}");
    }
}

/// A tag that keeps this run's usernames apart from earlier runs' on the
/// same relay.
fn run_tag() -> anyhow::Result<String> {
    let bytes: [u8; 3] = securechat_common::crypto::random_bytes()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Every connection is a UDP socket: raise the soft limit on open files
/// towards the hard one when the run needs more than it allows.
fn raise_open_files(needed: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let want = needed as u64;
    if limit.current.is_some_and(|c| c < want) {
        limit.current = Some(limit.maximum.map_or(want, |m| m.min(want)));
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            eprintln!("securechat-bench: cannot raise the open-files limit: {e}");
        }
    }
}

fn print_table(r: &Report) {
    let rate = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.0} {unit}"));
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} ms"));
    let row = |what: &str, rate: String, p50: Option<f64>, p99: Option<f64>, max: Option<f64>| {
        println!(
            "{what:<36} {rate:>14} {:>10} {:>10} {:>10}",
            ms(p50),
            ms(p99),
            ms(max)
        );
    };
    println!(
        "relays {}, {} connections x {} in flight, body {} B (envelope {} B)",
        r.relays, r.connections, r.in_flight, r.size, r.envelope_bytes
    );
    println!(
        "{:<36} {:>14} {:>10} {:>10} {:>10}",
        "", "rate", "p50", "p99", "max"
    );
    if r.send_msgs_per_s.is_some() {
        row(
            "durable send",
            rate(r.send_msgs_per_s, "msg/s"),
            r.send_p50_ms,
            r.send_p99_ms,
            r.send_max_ms,
        );
    }
    if r.redis_msgs_per_s.is_some() {
        row(
            "redis LPUSH, appendfsync always",
            rate(r.redis_msgs_per_s, "req/s"),
            r.redis_p50_ms,
            r.redis_p99_ms,
            None,
        );
        if let Some(ratio) = r.ratio_vs_redis {
            println!("{:<36} {ratio:>14.2}", "ratio vs redis");
        }
    }
    if let (Some(sent), Some(got)) = (r.e2e_sent, r.e2e_received) {
        row(
            &format!("end to end, offered ({got} of {sent} arrived)"),
            rate(r.e2e_offered_per_s, "msg/s"),
            r.e2e_p50_ms,
            r.e2e_p99_ms,
            r.e2e_max_ms,
        );
    }
    if let Some(n) = r.drain_messages {
        println!(
            "{:<36} {:>14}   (all pushed at {})",
            format!("drain of {n}, push + ack"),
            rate(r.drain_msgs_per_s, "msg/s"),
            rate(r.drain_pushed_per_s, "msg/s")
        );
    }
    println!(
        "{:<36} {:>14}",
        "full MFA logins",
        rate(r.logins_per_s, "/s")
    );
    if let Some(n) = r.idle_sessions {
        println!(
            "{:<36} {:>14}",
            "session resumes, each a new connection",
            rate(r.resumes_per_s, "/s")
        );
        println!(
            "{:<36} {:>14}   (relay RSS {})",
            format!("idle sessions: {n}"),
            r.idle_rss_bytes_per_conn
                .map_or("-".into(), |v| format!("{:.1} KiB/conn", v / 1024.0)),
            r.idle_rss_bytes
                .map_or("-".into(), |v| format!("{:.1} MiB", v as f64 / 1_048_576.0))
        );
    }
}
