//! # securechat-common
//!
//! What the relay and the agent must agree on, and nothing that does I/O:
//!
//! ```text
//!            ┌──────────── protocol ────────────┐
//!  agentd ───┤ Request / Response / Push enums  ├─── relay
//!            │ codec: length + version + body   │
//!            └──────────────────────────────────┘
//!  envelope: seal / open (AES-256-GCM body, RSA-OAEP key wrap, RSA-PSS signature)
//!  crypto:   identity keys, fingerprints, login challenge transcripts
//!  limits:   sizes and input rules both sides enforce
//! ```
//!
//! * [`protocol`] — the typed messages and the protocol flow.
//! * [`codec`] — frames on the wire; bounded, typed decode errors.
//! * [`close`] — why the relay closes a connection: QUIC close codes and reasons.
//! * [`envelope`] — end-to-end sealed messages.
//! * [`crypto`] — keys, signatures, fingerprints (aws-lc-rs).
//! * [`limits`] — shared limits and validation of usernames, emails, passwords.
#![forbid(unsafe_code)]

pub mod close;
pub mod codec;
pub mod crypto;
pub mod envelope;
pub mod ipc;
pub mod limits;
pub mod protocol;

pub use codec::{CodecError, FrameCodec};
pub use crypto::{Fingerprint, IdentityKey, KeySize, PublicKey};
pub use envelope::{Envelope, MessageId};
pub use protocol::{ErrorCode, ErrorReply, Push, Request, Response};
