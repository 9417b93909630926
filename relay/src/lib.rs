//! # securechat-relay
//!
//! The relay: a QUIC server that registers accounts, logs users in with three
//! factors, publishes their public keys and holds sealed envelopes until
//! their recipient takes them. It never sees a plaintext message or a
//! private key.
//!
//! ```text
//!                 ┌──────────────────────── relay ─────────────────────────┐
//!  agentd ══QUIC══╪► admission (caps per source and in all)                │
//!   (TLS 1.3,     │   └► connection ─► handlers ─┬─► accounts (TOTP, ...)  │
//!    ALPN         │       │  ▲  ▲                ├─► password pool (argon2)│
//!    securechat/1)│       │  │  └ logins (per    ├─► mail (SMTP / outbox)  │
//!                 │       │  │    session token) └─► store ─► relay.redb   │
//!                 │       │  │                 (or Redis, with --redis)    │
//!                 │       │  └── push task ◄─ hub ◄─ cluster (Redis)       │
//!                 │       └─ rate limits, login deadline, session expiry   │
//!                 │  status listener (HTTP): page, status.json, /metrics,  │
//!                 │    /healthz ─► counts only                             │
//!                 │  clock (the relay's time; tests move it)               │
//!                 └────────────────────────────────────────────────────────┘
//! ```
//!
//! * [`config`] — the typed [`Config`] and its defaults.
//! * [`server`] — [`Relay::bind`], [`Relay::run`]: accept loop and shutdown.
//! * `shared` — the state every task shares, below all that use it.
//! * `admission` — connection caps, in all and per source.
//! * `connection` — one QUIC connection: request streams, login state and
//!   its deadlines.
//! * `conn_state` — what is known about one connection (login, challenge,
//!   deadline, push task), shared by its task, its handlers and `logins`.
//! * `push` — a logged-in connection's push stream: its queue, and who
//!   comes and goes.
//! * [`close`] — the close codes and reasons a client can be sent.
//! * `handlers` — one function per request kind.
//! * [`accounts`] — password hashes, TOTP, emailed codes, session tokens.
//! * [`password_pool`] — the threads that run argon2, with a bounded queue.
//! * [`store`] — the [`store::Store`] trait, its redb and Redis backends,
//!   and the [`store::QueueWriter`] that group-commits sends and acks.
//! * `cluster` — with several relays on one Redis (`--redis`): who is
//!   online on which relay, and the wake-ups and presence news between them.
//! * `shared_limits` — the rate limits counted in Redis, so they hold
//!   across relays.
//! * [`mail`] — verification mail over SMTP or into an outbox folder.
//! * [`hub`] — online users; the newest connection of a user wins; presence
//!   changes for the connections watching each user.
//! * `logins` — live logins per session token: a logout or an expiry ends
//!   every connection using the token.
//! * [`ratelimit`] — limits per source (an IPv4 address or IPv6 /64) and
//!   per sender, and password-guessing delays per (account, source).
//! * [`clock`] — the relay's time, which tests drive instead of sleeping.
//! * [`status`] — counters and the HTTP listener: status page,
//!   `/status.json`, `/metrics`, `/healthz`.
//! * [`metrics`] — labelled counters, the commit-latency histogram, the
//!   messages-per-second history, and the Prometheus text format.
//! * `status_page` — the live status page (HTML, CSS and script inlined).
//! * [`tls`] — certificate loading / self-signed generation, QUIC server config.
//!
//! The protocol itself (frames, messages, flow) lives in `securechat_common`.
#![forbid(unsafe_code)]

pub mod accounts;
mod admission;
pub mod clock;
mod cluster;
mod shared_limits;
pub use securechat_common::close;
pub mod config;
mod conn_state;
mod connection;
mod handlers;
pub mod hub;
mod logins;
pub mod mail;
pub mod metrics;
pub mod password_pool;
mod push;
pub mod ratelimit;
pub mod server;
mod shared;
pub mod status;
mod status_page;
pub mod store;
pub mod tls;

pub use config::Config;
pub use server::{run, Relay, RelayError, SHUTDOWN_REASON};

/// Lock a mutex, taking it over if a panic poisoned it: every mutex in the
/// relay guards plain values (maps, counters, timestamps) that single
/// inserts and removes keep consistent, so a panic elsewhere must not turn
/// into a second one here.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
