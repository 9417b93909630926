//! Live counters and the relay's HTTP listener (`--status-listen`).
//!
//! | path | what |
//! |---|---|
//! | `GET /` | the status page (`status_page`): polls `/status.json` and redraws |
//! | `GET /status.json` | [`StatusReport`]: every count, and the messages-per-second series |
//! | `GET /metrics` | the same counters in the Prometheus text format ([`crate::metrics`]) |
//! | `GET /healthz` | `200 ok` when the store answers, `503` otherwise |
//!
//! None of them shows a username, address or secret — only counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use crate::metrics::{
    Exposition, FrameRejection, LoginOutcome, MetricType, RateSeries, ResumeOutcome,
};
use crate::shared::Shared;
use crate::store::{blocking, StoreCounts};

pub use crate::metrics::{ConnectionGuard, Stats};

/// The numbers on the status page, as `/status.json` serves them: every
/// count is a top-level number, and the page shows each in the element
/// whose `id` is its key.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// Active accounts.
    pub accounts: u64,
    /// Registrations waiting for their code.
    pub pending_registrations: u64,
    /// Users with a logged-in connection.
    pub online_users: u64,
    /// QUIC connections open.
    pub open_connections: u64,
    /// Messages waiting in queues.
    pub queued_messages: u64,
    /// Bytes waiting in queues.
    pub queued_bytes: u64,
    /// Messages accepted since start.
    pub messages_accepted: u64,
    /// Messages delivered (acknowledged) since start.
    pub messages_delivered: u64,
    /// Password checks (argon2) running or waiting now.
    pub password_checks_in_use: u64,
    /// Requests answered `Busy` since start (password workers all taken).
    pub busy_refusals: u64,
    /// Connections refused since start: the relay held its maximum.
    pub refused_connections_relay_full: u64,
    /// Connections refused since start: their source held its maximum.
    pub refused_connections_source_full: u64,
    /// Connections closed since start for not logging in in time.
    pub unauthenticated_timeouts: u64,
    /// Sends refused since start: the sender's rate limit.
    pub send_rate_refusals: u64,
    /// Sends refused since start: the recipient's queue was full.
    pub quota_refusals: u64,
    /// Sends refused since start: the sender held its share of the queue.
    pub sender_share_refusals: u64,
    /// Connections closed since start because their session was revoked
    /// (a logout elsewhere) or expired.
    pub sessions_ended: u64,
    /// Password logins that succeeded since start.
    pub logins_ok: u64,
    /// Password logins refused since start for wrong credentials or a
    /// wrong signature.
    pub logins_failed: u64,
    /// Password logins refused since start by a rate limit.
    pub logins_rate_limited: u64,
    /// Session resumes refused since start.
    pub resumes_failed: u64,
    /// Attempts (login, register, verify) refused since start by the
    /// per-source limit.
    pub attempt_refusals: u64,
    /// Password checks refused since start by the guessing limits.
    pub password_guess_refusals: u64,
    /// Request frames rejected since start: not a valid frame.
    pub rejected_frames_malformed: u64,
    /// Request frames rejected since start: over the size limit.
    pub rejected_frames_oversized: u64,
    /// Request frames rejected since start: another protocol version.
    pub rejected_frames_unsupported_version: u64,
    /// Request frames rejected since start: a request kind this relay does
    /// not know.
    pub rejected_frames_unknown: u64,
    /// Connections closed since start for sending too many bad frames.
    pub bad_frame_closes: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Messages accepted and delivered per second over the last minutes.
    pub chart: RateSeries,
}

/// Gather the current numbers.
pub(crate) async fn report(shared: &Shared) -> Result<StatusReport, crate::store::StoreError> {
    let counts: StoreCounts = blocking(&shared.store, |s| s.counts()).await?;
    Ok(report_with(shared, &counts))
}

fn report_with(shared: &Shared, counts: &StoreCounts) -> StatusReport {
    let stats = &shared.stats;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    StatusReport {
        accounts: counts.accounts,
        pending_registrations: counts.pending_registrations,
        online_users: shared.hub.len() as u64,
        open_connections: load(&stats.open_connections),
        queued_messages: counts.queued_messages,
        queued_bytes: counts.queued_bytes,
        messages_accepted: load(&stats.accepted),
        messages_delivered: load(&stats.delivered),
        password_checks_in_use: shared.passwords.in_use() as u64,
        busy_refusals: load(&stats.busy_refusals),
        refused_connections_relay_full: load(&stats.refused_relay_full),
        refused_connections_source_full: load(&stats.refused_source_full),
        unauthenticated_timeouts: load(&stats.login_timeouts),
        send_rate_refusals: load(&stats.send_rate_refusals),
        quota_refusals: load(&stats.quota_refusals),
        sender_share_refusals: load(&stats.sender_share_refusals),
        sessions_ended: load(&stats.sessions_ended),
        logins_ok: stats.logins.get(LoginOutcome::Ok),
        logins_failed: stats.logins.get(LoginOutcome::BadCredentials)
            + stats.logins.get(LoginOutcome::BadSignature),
        logins_rate_limited: stats.logins.get(LoginOutcome::RateLimited),
        resumes_failed: ResumeOutcome::ALL_FAILED
            .iter()
            .map(|k| stats.resumes.get(*k))
            .sum(),
        attempt_refusals: load(&stats.attempt_refusals),
        password_guess_refusals: load(&stats.guess_refusals),
        rejected_frames_malformed: stats.rejected_frames.get(FrameRejection::Malformed),
        rejected_frames_oversized: stats.rejected_frames.get(FrameRejection::Oversized),
        rejected_frames_unsupported_version: stats
            .rejected_frames
            .get(FrameRejection::UnsupportedVersion),
        rejected_frames_unknown: stats.rejected_frames.get(FrameRejection::Unknown),
        bad_frame_closes: load(&stats.bad_frame_closes),
        uptime_secs: stats.started.elapsed().as_secs(),
        chart: shared.rates.series(),
    }
}

/// The listener's routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(html))
        .route("/status.json", get(json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(shared)
}

fn unavailable(e: crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "status page: cannot read the store");
    (StatusCode::SERVICE_UNAVAILABLE, "status unavailable\n").into_response()
}

/// Answers that hold live numbers are never cached.
const NO_STORE: (header::HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

async fn json(State(shared): State<Arc<Shared>>) -> Response {
    match report(&shared).await {
        Ok(r) => match serde_json::to_string_pretty(&r) {
            Ok(body) => {
                ([(header::CONTENT_TYPE, "application/json"), NO_STORE], body).into_response()
            }
            Err(e) => {
                tracing::warn!(error = %e, "status page: cannot encode");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        },
        Err(e) => unavailable(e),
    }
}

async fn html(State(shared): State<Arc<Shared>>) -> Response {
    match report(&shared).await {
        Ok(r) => crate::status_page::render(&r),
        Err(e) => unavailable(e),
    }
}

/// How long `/healthz` waits for the store.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let answered =
        tokio::time::timeout(HEALTH_TIMEOUT, blocking(&shared.store, |s| s.counts())).await;
    match answered {
        Ok(Ok(_)) => (StatusCode::OK, [NO_STORE], "ok\n").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: the store failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [NO_STORE],
                "store failed\n",
            )
                .into_response()
        }
        Err(_) => {
            tracing::warn!("health check: the store did not answer in time");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [NO_STORE],
                "store not answering\n",
            )
                .into_response()
        }
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    // A failing store still leaves the relay's own counters worth scraping;
    // `securechat_relay_store_up` says which case this is.
    let counts = blocking(&shared.store, |s| s.counts()).await;
    if let Err(e) = &counts {
        tracing::warn!(error = %e, "metrics: cannot read the store");
    }
    let body = exposition(&shared, counts.as_ref().ok());
    (
        [
            (header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE),
            NO_STORE,
        ],
        body,
    )
        .into_response()
}

/// Every metric as exposition text; the store's gauges only if `counts`.
fn exposition(shared: &Shared, counts: Option<&StoreCounts>) -> String {
    use MetricType::{Counter, Gauge};
    let stats = &shared.stats;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut e = Exposition::default();
    e.single(
        "securechat_relay_store_up",
        Gauge,
        "1 if the store answered this scrape, 0 if not (the store gauges are then missing).",
        u64::from(counts.is_some()),
    );
    e.single(
        "securechat_relay_open_connections",
        Gauge,
        "QUIC connections open now.",
        load(&stats.open_connections),
    );
    e.single(
        "securechat_relay_online_users",
        Gauge,
        "Users with a logged-in connection now.",
        shared.hub.len() as u64,
    );
    e.single(
        "securechat_relay_password_checks_in_use",
        Gauge,
        "Password checks (argon2) running or waiting now.",
        shared.passwords.in_use() as u64,
    );
    if let Some(c) = counts {
        e.single(
            "securechat_relay_accounts",
            Gauge,
            "Active accounts.",
            c.accounts,
        );
        e.single(
            "securechat_relay_pending_registrations",
            Gauge,
            "Registrations waiting for their emailed code.",
            c.pending_registrations,
        );
        e.single(
            "securechat_relay_queued_messages",
            Gauge,
            "Messages waiting in all queues.",
            c.queued_messages,
        );
        e.single(
            "securechat_relay_queued_bytes",
            Gauge,
            "Envelope bytes waiting in all queues.",
            c.queued_bytes,
        );
    }
    e.single(
        "securechat_relay_messages_accepted_total",
        Counter,
        "Messages accepted (durably stored, duplicates not counted) since start.",
        load(&stats.accepted),
    );
    e.single(
        "securechat_relay_messages_delivered_total",
        Counter,
        "Messages delivered (acknowledged by their recipient) since start.",
        load(&stats.delivered),
    );
    e.labelled(
        "securechat_relay_logins_total",
        "Password logins since start, by outcome.",
        "outcome",
        &stats.logins.snapshot(),
    );
    e.labelled(
        "securechat_relay_resumes_total",
        "Session resumes since start, by outcome.",
        "outcome",
        &stats.resumes.snapshot(),
    );
    e.labelled(
        "securechat_relay_rejected_frames_total",
        "Request frames that could not be read since start, by reason.",
        "reason",
        &stats.rejected_frames.snapshot(),
    );
    e.labelled(
        "securechat_relay_refusals_total",
        "Requests and connections refused by a limit since start, by limit.",
        "limit",
        &[
            ("source_attempts", load(&stats.attempt_refusals)),
            ("password_guesses", load(&stats.guess_refusals)),
            ("busy", load(&stats.busy_refusals)),
            ("relay_connections", load(&stats.refused_relay_full)),
            ("source_connections", load(&stats.refused_source_full)),
            ("send_rate", load(&stats.send_rate_refusals)),
            ("quota", load(&stats.quota_refusals)),
            ("sender_share", load(&stats.sender_share_refusals)),
        ],
    );
    e.labelled(
        "securechat_relay_connections_closed_total",
        "Connections the relay closed since start, by reason.",
        "reason",
        &[
            ("login_timeout", load(&stats.login_timeouts)),
            ("session_ended", load(&stats.sessions_ended)),
            ("bad_frames", load(&stats.bad_frame_closes)),
        ],
    );
    e.histogram(
        "securechat_relay_commit_duration_seconds",
        "Time of each durable group commit of sends and acks (transaction and fsync).",
        &shared.commit_latency.snapshot(),
    );
    e.single(
        "securechat_relay_uptime_seconds",
        Gauge,
        "Seconds since the relay started.",
        stats.started.elapsed().as_secs(),
    );
    e.finish()
}

/// Sample the accepted and delivered totals into the status page's rate
/// history, once per interval, until `stop`.
pub(crate) async fn sample_rates(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(shared.rates.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = &shared.stats;
        shared.rates.sample(
            stats.accepted.load(Ordering::Relaxed),
            stats.delivered.load(Ordering::Relaxed),
        );
    }
}
