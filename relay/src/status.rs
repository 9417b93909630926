//! Live counters and the HTTP status page.
//!
//! `GET /` is a small HTML page that refreshes itself every 5 seconds;
//! `GET /status.json` has the same numbers for machines. Neither shows a
//! username, address or secret — only counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use crate::server::Shared;
use crate::store::{blocking, StoreCounts};

/// Counters kept since start.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
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

/// The numbers on the status page.
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
    /// Seconds since start.
    pub uptime_secs: u64,
}

/// Gather the current numbers.
pub(crate) async fn report(shared: &Shared) -> Result<StatusReport, crate::store::StoreError> {
    let counts: StoreCounts = blocking(&shared.store, |s| s.counts()).await?;
    let stats = &shared.stats;
    Ok(StatusReport {
        accounts: counts.accounts,
        pending_registrations: counts.pending_registrations,
        online_users: shared.hub.len() as u64,
        open_connections: stats.open_connections.load(Ordering::Relaxed),
        queued_messages: counts.queued_messages,
        queued_bytes: counts.queued_bytes,
        messages_accepted: stats.accepted.load(Ordering::Relaxed),
        messages_delivered: stats.delivered.load(Ordering::Relaxed),
        password_checks_in_use: shared.passwords.in_use() as u64,
        busy_refusals: stats.busy_refusals.load(Ordering::Relaxed),
        refused_connections_relay_full: stats.refused_relay_full.load(Ordering::Relaxed),
        refused_connections_source_full: stats.refused_source_full.load(Ordering::Relaxed),
        unauthenticated_timeouts: stats.login_timeouts.load(Ordering::Relaxed),
        send_rate_refusals: stats.send_rate_refusals.load(Ordering::Relaxed),
        quota_refusals: stats.quota_refusals.load(Ordering::Relaxed),
        sender_share_refusals: stats.sender_share_refusals.load(Ordering::Relaxed),
        sessions_ended: stats.sessions_ended.load(Ordering::Relaxed),
        uptime_secs: stats.started.elapsed().as_secs(),
    })
}

/// The status page routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(html))
        .route("/status.json", get(json))
        .with_state(shared)
}

fn unavailable(e: crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "status page: cannot read the store");
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "status unavailable\n",
    )
        .into_response()
}

async fn json(State(shared): State<Arc<Shared>>) -> Response {
    match report(&shared).await {
        Ok(r) => match serde_json::to_string_pretty(&r) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => {
                tracing::warn!(error = %e, "status page: cannot encode");
                axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        },
        Err(e) => unavailable(e),
    }
}

async fn html(State(shared): State<Arc<Shared>>) -> Response {
    let r = match report(&shared).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    // Each value cell's id is its key in /status.json, so scripts and the
    // browser test find a count without reading labels.
    let rows = [
        ("accounts", "Accounts", r.accounts.to_string()),
        (
            "pending_registrations",
            "Pending registrations",
            r.pending_registrations.to_string(),
        ),
        ("online_users", "Online users", r.online_users.to_string()),
        (
            "open_connections",
            "Open connections",
            r.open_connections.to_string(),
        ),
        (
            "queued_messages",
            "Queued messages",
            r.queued_messages.to_string(),
        ),
        ("queued_bytes", "Queued bytes", r.queued_bytes.to_string()),
        (
            "messages_accepted",
            "Messages accepted since start",
            r.messages_accepted.to_string(),
        ),
        (
            "messages_delivered",
            "Messages delivered since start",
            r.messages_delivered.to_string(),
        ),
        (
            "password_checks_in_use",
            "Password checks running or waiting",
            r.password_checks_in_use.to_string(),
        ),
        (
            "busy_refusals",
            "Refused since start: relay busy (password checks)",
            r.busy_refusals.to_string(),
        ),
        (
            "refused_connections_relay_full",
            "Refused since start: relay at its connection limit",
            r.refused_connections_relay_full.to_string(),
        ),
        (
            "refused_connections_source_full",
            "Refused since start: too many connections from one source",
            r.refused_connections_source_full.to_string(),
        ),
        (
            "unauthenticated_timeouts",
            "Closed since start: no login in time",
            r.unauthenticated_timeouts.to_string(),
        ),
        (
            "send_rate_refusals",
            "Refused since start: sending too fast",
            r.send_rate_refusals.to_string(),
        ),
        (
            "quota_refusals",
            "Refused since start: recipient's queue full",
            r.quota_refusals.to_string(),
        ),
        (
            "sender_share_refusals",
            "Refused since start: sender's share of a queue full",
            r.sender_share_refusals.to_string(),
        ),
        (
            "sessions_ended",
            "Closed since start: session revoked or expired",
            r.sessions_ended.to_string(),
        ),
        ("uptime_secs", "Uptime", uptime(r.uptime_secs)),
    ];
    let mut table = String::new();
    for (id, name, value) in rows {
        table.push_str(&format!(
            "<tr><th>{name}</th><td id=\"{id}\">{value}</td></tr>\n"
        ));
    }
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>securechat relay</title>\
         <style>body{{font-family:sans-serif;margin:2em}}th{{text-align:left;padding-right:2em}}\
         td{{text-align:right;font-variant-numeric:tabular-nums}}</style></head>\n\
         <body><h1>securechat relay</h1>\n<table>\n{table}</table>\n\
         <p>Refreshes every 5 seconds. Machine-readable: <a href=\"/status.json\">/status.json</a></p>\
         </body></html>\n"
    ))
    .into_response()
}

fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}h {m:02}m")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}
