//! # securechat-relay
//!
//! The relay: a QUIC server that registers accounts, logs users in with three
//! factors, publishes their public keys and holds sealed envelopes until
//! their recipient takes them. It never sees a plaintext message or a
//! private key.
//!
//! ```text
//!                 ┌──────────────────────── relay ─────────────────────────┐
//!  agentd ══QUIC══╪► connection ─► handlers ─┬─► accounts (argon2id, TOTP) │
//!   (TLS 1.3,     │   │  ▲                   ├─► mail (SMTP / outbox)      │
//!    ALPN         │   │  └── push task ◄─ hub (who is online, wake-ups)   │
//!    securechat/1)│   │                      └─► store ─► relay.redb       │
//!                 │   └─ rate limits                                      │
//!                 │  status page (HTTP) ─► counts only                    │
//!                 └────────────────────────────────────────────────────────┘
//! ```
//!
//! * [`config`] — the typed [`Config`] and its defaults.
//! * [`server`] — [`Relay::bind`], [`Relay::run`]: accept loop and shutdown.
//! * `admission` — connection caps, in all and per source.
//! * `connection` — one QUIC connection: request streams, login state and
//!   its deadlines, pushes.
//! * [`close`] — the close codes and reasons a client can be sent.
//! * `handlers` — one function per request kind.
//! * [`accounts`] — password hashes, TOTP, emailed codes, session tokens.
//! * [`password_pool`] — the threads that run argon2, with a bounded queue.
//! * [`store`] — the [`store::Store`] trait, its redb backend, and the
//!   [`store::QueueWriter`] that group-commits sends and acks.
//! * [`mail`] — verification mail over SMTP or into an outbox folder.
//! * [`hub`] — online users; the newest connection of a user wins.
//! * [`ratelimit`] — sliding-window limits per address and per account.
//! * [`status`] — counters and the HTTP status page.
//! * [`tls`] — certificate loading / self-signed generation, QUIC server config.
//!
//! The protocol itself (frames, messages, flow) lives in `securechat_common`.
#![forbid(unsafe_code)]

pub mod accounts;
mod admission;
pub mod clock;
pub mod close;
pub mod config;
mod connection;
mod handlers;
pub mod hub;
pub mod mail;
pub mod password_pool;
pub mod ratelimit;
pub mod server;
pub mod status;
pub mod store;
pub mod tls;

pub use config::Config;
pub use server::{run, Relay, RelayError, SHUTDOWN_REASON};
