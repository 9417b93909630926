//! Why the relay closes a connection: the QUIC application close codes and
//! the reasons sent with them, so a client (and its user) can tell what
//! happened and what to do.
//!
//! | code | reason | when |
//! |------|--------|------|
//! | 1 | [`SHUTDOWN_REASON`] | the relay stops |
//! | 2 | [`SUPERSEDED_REASON`] | the same user logged in on a newer connection |
//! | 3 | [`BAD_FRAMES_REASON`] | too many malformed requests |
//! | 4 | [`RELAY_FULL_REASON`], [`SOURCE_FULL_REASON`] | connection caps |
//! | 5 | [`LOGIN_TIMEOUT_REASON`] | no login or resume in time |
//! | 6 | [`LOGGED_OUT_REASON`], [`SESSION_EXPIRED_REASON`] | the session ended |

/// Close code: the relay stops.
pub const SHUTDOWN_CODE: u32 = 1;
/// Sent to every client when the relay stops.
pub const SHUTDOWN_REASON: &[u8] = b"relay shutting down";

/// Close code: a newer login of the same user replaced this connection.
pub const SUPERSEDED_CODE: u32 = 2;
/// Sent to a connection replaced by a newer login.
pub const SUPERSEDED_REASON: &[u8] = b"superseded by a new connection";

/// Close code: the client kept sending frames that do not decode.
pub const BAD_FRAMES_CODE: u32 = 3;
/// Sent to a connection that sent too many malformed requests.
pub const BAD_FRAMES_REASON: &[u8] = b"too many malformed requests";

/// Close code: a connection cap was reached.
pub const TOO_MANY_CONNECTIONS_CODE: u32 = 4;
/// Sent when the relay holds as many connections as it is allowed to.
pub const RELAY_FULL_REASON: &[u8] = b"the relay is at its connection limit; retry later";
/// Sent when the client's address (an IPv4 address or an IPv6 /64) holds
/// as many connections as one source may.
pub const SOURCE_FULL_REASON: &[u8] =
    b"too many connections from your address; close some and retry";

/// Close code: no login or resume within the unauthenticated time limit.
pub const LOGIN_TIMEOUT_CODE: u32 = 5;
/// Sent to a connection that did not log in in time.
pub const LOGIN_TIMEOUT_REASON: &[u8] =
    b"no login within the time limit; reconnect when ready to log in";

/// Close code: the session this connection was logged in with ended.
pub const SESSION_ENDED_CODE: u32 = 6;
/// Sent when the session token was revoked (a logout on another connection).
pub const LOGGED_OUT_REASON: &[u8] = b"session ended: logged out; log in again";
/// Sent when the session token expired while the connection was open.
pub const SESSION_EXPIRED_REASON: &[u8] = b"session ended: it expired; log in again";
