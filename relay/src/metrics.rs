//! What the relay measures beyond plain counters, and `GET /metrics` in the
//! Prometheus text exposition format (version 0.0.4).
//!
//! * [`ByKind`] — one counter per kind of an outcome ([`LoginOutcome`],
//!   [`ResumeOutcome`], [`FrameRejection`]): a labelled counter family.
//! * [`Histogram`] — the durable-commit latency, observed by the queue
//!   writer around each group commit.
//! * [`RateHistory`] — messages accepted and delivered per second over the
//!   last ten minutes, for the status page's chart, kept by the relay so a
//!   page opened just now shows the history too.
//! * [`Stats`] — the relay's counters since start, shared by every task.
//! * [`Exposition`] — writes metric families as text.
//!
//! The exposition is written by hand rather than with a client library: the
//! relay's counters are already atomics in [`Stats`], and the
//! format is a `# HELP` line, a `# TYPE` line and one `name{labels} value`
//! line per series; a library would add a registry of its own to mirror
//! them into. Every value is a count or a duration, never a name.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the commit-latency buckets: from a lone send
/// on an idle SSD (well under a millisecond) to a stalled disk.
pub const COMMIT_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A closed set of kinds, each with its label value.
pub trait Kind: Copy + PartialEq + 'static {
    /// Every kind, in the order they are exposed.
    const ALL: &'static [Self];
    /// The label value (lowercase, underscores).
    fn label(self) -> &'static str;
}

/// How a password `Login` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Logged in.
    Ok,
    /// Unknown user, wrong password, or a wrong or used TOTP code (one
    /// answer for all three).
    BadCredentials,
    /// Password and code right, signature over the challenge wrong.
    BadSignature,
    /// Refused by a limit: attempts per source or password guesses.
    RateLimited,
    /// Every password worker and queue place taken.
    Busy,
    /// Anything else (no challenge first, an internal error, ...).
    Other,
}

impl Kind for LoginOutcome {
    const ALL: &'static [Self] = &[
        Self::Ok,
        Self::BadCredentials,
        Self::BadSignature,
        Self::RateLimited,
        Self::Busy,
        Self::Other,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::BadCredentials => "bad_credentials",
            Self::BadSignature => "bad_signature",
            Self::RateLimited => "rate_limited",
            Self::Busy => "busy",
            Self::Other => "other",
        }
    }
}

/// How a session `Resume` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// Resumed.
    Ok,
    /// Token unknown, revoked or expired.
    SessionExpired,
    /// Signature over the challenge wrong.
    BadSignature,
    /// Anything else.
    Other,
}

impl ResumeOutcome {
    /// Every outcome but success.
    pub const ALL_FAILED: &'static [Self] =
        &[Self::SessionExpired, Self::BadSignature, Self::Other];
}

impl Kind for ResumeOutcome {
    const ALL: &'static [Self] = &[
        Self::Ok,
        Self::SessionExpired,
        Self::BadSignature,
        Self::Other,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::SessionExpired => "session_expired",
            Self::BadSignature => "bad_signature",
            Self::Other => "other",
        }
    }
}

/// Why a request frame could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameRejection {
    /// Not a valid frame: empty, cut short, trailing bytes, a body that
    /// does not decode.
    Malformed,
    /// Longer than the frame limit.
    Oversized,
    /// Another protocol version.
    UnsupportedVersion,
    /// A request kind (or another enumerated value) this relay does not
    /// know, perhaps from a newer client.
    Unknown,
}

impl Kind for FrameRejection {
    const ALL: &'static [Self] = &[
        Self::Malformed,
        Self::Oversized,
        Self::UnsupportedVersion,
        Self::Unknown,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Oversized => "oversized",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Unknown => "unknown",
        }
    }
}

/// One counter per kind of `K`.
#[derive(Debug)]
pub struct ByKind<K: Kind> {
    counts: Box<[AtomicU64]>,
    kind: PhantomData<K>,
}

impl<K: Kind> Default for ByKind<K> {
    fn default() -> Self {
        Self {
            counts: K::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            kind: PhantomData,
        }
    }
}

impl<K: Kind> ByKind<K> {
    fn index(kind: K) -> usize {
        // Every kind is in ALL; the sets are a handful long.
        K::ALL.iter().position(|k| *k == kind).unwrap_or(0)
    }

    /// Count one of `kind`.
    pub fn add(&self, kind: K) {
        if let Some(c) = self.counts.get(Self::index(kind)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The count of `kind`.
    pub fn get(&self, kind: K) -> u64 {
        self.counts
            .get(Self::index(kind))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// `(label, count)` for every kind.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        K::ALL.iter().map(|k| (k.label(), self.get(*k))).collect()
    }
}

/// A latency histogram with fixed buckets (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A histogram's values at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations at or below it)`, cumulative, ending
    /// with `+Inf` (equal to `count`).
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations, in seconds.
    pub sum_secs: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Record one observation.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The values now. Taken without a lock: a concurrent observation may
    /// show in `count` and not yet in its bucket, which scrapers tolerate;
    /// the `+Inf` bucket is made equal to `count` as the format wants.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let count = self.count.load(Ordering::Relaxed);
        let mut running = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len() + 1);
        for (bound, n) in self.bounds.iter().zip(self.buckets.iter()) {
            running += n.load(Ordering::Relaxed);
            buckets.push((*bound, running.min(count)));
        }
        buckets.push((f64::INFINITY, count));
        HistogramSnapshot {
            buckets,
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count,
        }
    }
}

/// Messages per interval, oldest first, as the status page draws them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RateSeries {
    /// Seconds per point.
    pub interval_secs: u64,
    /// Messages accepted in each interval.
    pub accepted: Vec<u64>,
    /// Messages delivered (acknowledged) in each interval.
    pub delivered: Vec<u64>,
}

/// The last `len` samples of the accepted and delivered totals, one per
/// `interval`; [`RateHistory::series`] turns them into counts per interval.
#[derive(Debug)]
pub struct RateHistory {
    interval: Duration,
    len: usize,
    totals: Mutex<VecDeque<(u64, u64)>>,
}

impl RateHistory {
    /// Keep `len` intervals of `interval` each.
    pub fn new(interval: Duration, len: usize) -> Self {
        Self {
            interval,
            len,
            totals: Mutex::new(VecDeque::with_capacity(len + 1)),
        }
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Record the totals at the end of an interval.
    pub fn sample(&self, accepted: u64, delivered: u64) {
        let mut totals = crate::lock(&self.totals);
        totals.push_back((accepted, delivered));
        // One more sample than intervals: each interval is a difference.
        while totals.len() > self.len + 1 {
            totals.pop_front();
        }
    }

    /// Messages per interval, oldest first.
    pub fn series(&self) -> RateSeries {
        let totals = crate::lock(&self.totals);
        let pairs = totals.iter().zip(totals.iter().skip(1));
        let (accepted, delivered) = pairs
            .map(|(a, b)| (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1)))
            .unzip();
        RateSeries {
            interval_secs: self.interval.as_secs().max(1),
            accepted,
            delivered,
        }
    }
}

/// Metric families written one after another as exposition text.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

/// The metric types used here.
#[derive(Clone, Copy, Debug)]
pub enum MetricType {
    /// Only goes up (since start).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        // HELP text escapes backslash and newline; ours has neither, but
        // the format is kept whatever the text.
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// A metric with one value.
    pub fn single(&mut self, name: &str, kind: MetricType, help: &str, value: u64) {
        self.header(name, help, type_name(kind));
        let _ = writeln!(self.text, "{name} {value}");
    }

    /// A counter family with one label.
    pub fn labelled(&mut self, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        self.header(name, help, "counter");
        for (value_label, value) in values {
            let _ = writeln!(self.text, "{name}{{{label}=\"{value_label}\"}} {value}");
        }
    }

    /// A histogram (`name` without the `_bucket`/`_sum`/`_count` suffix).
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.header(name, help, "histogram");
        for (bound, n) in &h.buckets {
            let le = if bound.is_infinite() {
                "+Inf".to_string()
            } else {
                bound.to_string()
            };
            let _ = writeln!(self.text, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(self.text, "{name}_sum {}", h.sum_secs);
        let _ = writeln!(self.text, "{name}_count {}", h.count);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

fn type_name(kind: MetricType) -> &'static str {
    match kind {
        MetricType::Counter => "counter",
        MetricType::Gauge => "gauge",
    }
}

/// Counters kept since start.
#[derive(Debug)]
pub struct Stats {
    /// When the relay started.
    pub started: Instant,
    /// Envelopes accepted (committed, not duplicates).
    pub accepted: AtomicU64,
    /// Envelopes acknowledged by their recipient.
    pub delivered: AtomicU64,
    /// QUIC connections open now.
    pub open_connections: AtomicU64,
    /// Requests answered `Busy`: every password worker and queue place taken.
    pub busy_refusals: AtomicU64,
    /// Connections refused because the relay held its maximum.
    pub refused_relay_full: AtomicU64,
    /// Connections refused because their source held its maximum.
    pub refused_source_full: AtomicU64,
    /// Connections closed for not logging in within the time limit.
    pub login_timeouts: AtomicU64,
    /// `Send` requests refused: the sender sent too many this minute.
    pub send_rate_refusals: AtomicU64,
    /// `Send` requests refused: the recipient's queue was full.
    pub quota_refusals: AtomicU64,
    /// Live logins ended because their session was revoked or expired.
    pub sessions_ended: AtomicU64,
    /// `Send` requests refused: the sender held its share of the queue.
    pub sender_share_refusals: AtomicU64,
    /// Login, register and verify attempts refused by the per-source limit.
    pub attempt_refusals: AtomicU64,
    /// Password checks refused by the guessing limits (per account and
    /// source, or per account).
    pub guess_refusals: AtomicU64,
    /// Connections closed for sending too many bad frames.
    pub bad_frame_closes: AtomicU64,
    /// Password logins by outcome.
    pub logins: ByKind<LoginOutcome>,
    /// Session resumes by outcome.
    pub resumes: ByKind<ResumeOutcome>,
    /// Request frames that could not be read, by reason.
    pub rejected_frames: ByKind<FrameRejection>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            accepted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            busy_refusals: AtomicU64::new(0),
            refused_relay_full: AtomicU64::new(0),
            refused_source_full: AtomicU64::new(0),
            login_timeouts: AtomicU64::new(0),
            send_rate_refusals: AtomicU64::new(0),
            quota_refusals: AtomicU64::new(0),
            sessions_ended: AtomicU64::new(0),
            sender_share_refusals: AtomicU64::new(0),
            attempt_refusals: AtomicU64::new(0),
            guess_refusals: AtomicU64::new(0),
            bad_frame_closes: AtomicU64::new(0),
            logins: ByKind::default(),
            resumes: ByKind::default(),
            rejected_frames: ByKind::default(),
        }
    }
}

impl Stats {
    /// Count one more open connection until the guard drops.
    pub fn connection_guard(self: &Arc<Self>) -> ConnectionGuard {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(Arc::clone(self))
    }
}

/// Decrements the open-connection count when dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Stats>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::new(&[0.001, 0.01, 0.1]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(2));
        let s = h.snapshot();
        assert_eq!(
            s.buckets,
            vec![(0.001, 1), (0.01, 3), (0.1, 3), (f64::INFINITY, 4)]
        );
        assert_eq!(s.count, 4);
        assert!((s.sum_secs - 2.0105).abs() < 1e-9);
        let mut e = Exposition::default();
        e.histogram("x_seconds", "help", &s);
        let text = e.finish();
        assert!(
            text.contains("x_seconds_bucket{le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("x_seconds_count 4\n"), "{text}");
        assert!(text.starts_with("# HELP x_seconds help\n# TYPE x_seconds histogram\n"));
    }

    #[test]
    fn rate_history_keeps_differences_of_the_last_intervals() {
        let r = RateHistory::new(Duration::from_secs(1), 3);
        assert_eq!(r.series().accepted, Vec::<u64>::new());
        for (a, d) in [(0, 0), (2, 1), (5, 1), (5, 4), (9, 4)] {
            r.sample(a, d);
        }
        let s = r.series();
        assert_eq!(s.accepted, vec![3, 0, 4]);
        assert_eq!(s.delivered, vec![0, 3, 0]);
        assert_eq!(s.interval_secs, 1);
    }

    #[test]
    fn by_kind_counts_each_kind_apart() {
        let c = ByKind::<LoginOutcome>::default();
        c.add(LoginOutcome::Ok);
        c.add(LoginOutcome::Ok);
        c.add(LoginOutcome::RateLimited);
        assert_eq!(c.get(LoginOutcome::Ok), 2);
        assert_eq!(c.get(LoginOutcome::BadCredentials), 0);
        assert_eq!(c.snapshot()[3], ("rate_limited", 1));
    }
}
