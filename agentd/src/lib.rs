//! # securechat-agentd
//!
//! The per-user daemon (work in progress).
#![forbid(unsafe_code)]

pub mod relay_client;
