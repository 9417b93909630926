//! # securechat-client
//!
//! What every program that talks to securechat shares, so that none of them
//! depends on another program's crate:
//!
//! * [`relay`] — the QUIC client for the relay protocol (agentd, the load
//!   tool `securechat-bench`, the test kit).
//! * [`ipc`] / [`lines`] — the client of agentd's local socket and its
//!   bounded JSON-line I/O (chat-cli; agentd's server reads the same lines).
//! * [`paths`] — where agentd's home and socket are, the one rule agentd and
//!   chat-cli both follow.
#![forbid(unsafe_code)]

pub mod ipc;
pub mod lines;
pub mod paths;
pub mod relay;

pub use paths::Paths;
