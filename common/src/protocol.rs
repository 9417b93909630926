//! The relay wire protocol: typed messages exchanged between agentd and the relay.
//!
//! # Transport
//!
//! Everything runs over one QUIC connection (TLS 1.3, ALPN [`ALPN`]). The
//! protocol uses QUIC streams rather than request ids:
//!
//! * **Requests**: for each request the client opens a bidirectional stream,
//!   writes exactly one [`Request`] frame and finishes its send side. The relay
//!   answers with exactly one [`Response`] frame and finishes. Requests may run
//!   concurrently; their order only matters where noted below.
//! * **Pushes**: after a successful login the relay opens one unidirectional
//!   stream towards the client and writes [`Push`] frames on it for as long as
//!   the connection lives (queued messages first, then new ones as they arrive).
//!
//! Every frame is encoded by [`crate::codec`]: a length prefix, the protocol
//! version, then the postcard body.
//!
//! # Flow
//!
//! ```text
//! agentd                                   relay
//!   │ Register{user,email,password,key} ──► │  stores pending account, emails a code
//!   │ ◄── RegisterPending{expires_in}        │
//!   │ Verify{user,code} ──────────────────► │  activates, creates the TOTP secret
//!   │ ◄── Verified{otpauth_uri}              │
//!   │ Challenge ──────────────────────────► │  fresh nonce, kept per connection
//!   │ ◄── Challenge{nonce}                   │
//!   │ Login{user,password,totp,sig} ──────► │  sig over login_transcript(nonce, TLS exporter)
//!   │ ◄── LoggedIn{token,unread}             │
//!   │ ◄═══ Push::Deliver{envelope,..} ══════ │  (uni stream)
//!   │ Ack{id,outcome} ────────────────────► │  relay deletes the message
//!   │ AckMany{[(id,outcome)…]} ───────────► │  … or many, in one commit
//!   │ Send{envelope} ─────────────────────► │  committed to disk before the reply
//!   │ ◄── Stored{id}                         │
//!   │ WatchPresence{contacts} ────────────► │  whose comings and goings to push
//!   │ ◄── Online{those online now}           │
//!   │ ◄═══ Push::Presence{user,online} ═════ │  for watched users only
//! ```
//!
//! A reconnecting agent uses `Challenge` + [`Request::Resume`] with its session
//! token instead of the password and TOTP code.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::envelope::{Envelope, MessageId};

/// Version of this protocol; every frame carries it and a mismatch is refused.
pub const PROTOCOL_VERSION: u8 = 3;

/// The TLS ALPN identifier of this protocol version.
pub const ALPN: &[u8] = b"securechat/1";

/// Label for the TLS keying-material exporter that binds login signatures to
/// one connection (RFC 5705 / RFC 8446 section 7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-securechat-login";

/// Length of the exported keying material and of challenge nonces, in bytes.
pub const BINDING_LEN: usize = 32;

/// A request from agentd to the relay; one per bidirectional stream.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Start registering an account; the relay emails a one-time code.
    Register {
        /// Wanted username (see [`crate::limits::validate_username`]).
        username: String,
        /// Address the one-time code is mailed to.
        email: String,
        /// The account password; hashed with argon2id by the relay.
        password: Zeroizing<String>,
        /// The account's RSA public key, X.509 SubjectPublicKeyInfo DER.
        public_key: Vec<u8>,
    },
    /// Finish a registration with the emailed code.
    Verify {
        /// The username given to `Register`.
        username: String,
        /// The six-digit code from the mail.
        code: Zeroizing<String>,
    },
    /// Ask for a fresh login challenge for this connection.
    Challenge,
    /// Full multi-factor login.
    Login {
        /// Account name.
        username: String,
        /// Account password.
        password: Zeroizing<String>,
        /// Current TOTP code.
        totp: Zeroizing<String>,
        /// RSA-PSS signature over [`crate::crypto::login_transcript`].
        signature: Vec<u8>,
    },
    /// Resume a session on a new connection with a token from an earlier login.
    Resume {
        /// Account name.
        username: String,
        /// The session token returned by `LoggedIn`.
        token: Zeroizing<Vec<u8>>,
        /// RSA-PSS signature over [`crate::crypto::login_transcript`].
        signature: Vec<u8>,
    },
    /// Revoke this connection's session token.
    Logout,
    /// Look up a user's public key in the directory.
    LookupKey {
        /// Whose key.
        username: String,
    },
    /// Replace the account's public key. Needs a full login (not a resume) on
    /// this connection within [`crate::limits::FRESH_LOGIN_SECS`].
    PublishKey {
        /// The new key, SubjectPublicKeyInfo DER.
        public_key: Vec<u8>,
        /// Signature by the *new* key over [`crate::crypto::login_transcript`]
        /// with a fresh challenge: proves possession of it.
        signature: Vec<u8>,
    },
    /// Store a sealed envelope for its recipient.
    Send {
        /// The sealed, signed message; `sender` must be the logged-in user.
        envelope: Envelope,
    },
    /// Confirm a pushed message; the relay deletes it from the queue.
    Ack {
        /// The message id.
        id: MessageId,
        /// Whether the agent kept it or rejected it.
        outcome: AckOutcome,
    },
    /// List the users connected right now.
    Online,
    /// Ask for the relay's clock (no login needed), so that an agent can
    /// tell its user that its own clock is off (TOTP codes fail then).
    /// Added after version 2 was fixed, as the last variant: a relay that
    /// predates it answers `BadRequest`.
    Time,
    /// A page of the user directory, in name order, after `after`: what
    /// a broadcast is sealed for. Needs a login.
    Directory {
        /// The last name of the previous page; `None` for the first.
        after: Option<String>,
    },
    /// Confirm many pushed messages at once: the relay deletes them all in
    /// one durable commit (one stream and one fsync for the lot, where
    /// [`Request::Ack`] costs one of each per message). At most
    /// [`crate::limits::MAX_ACK_BATCH`] entries; a larger batch is refused
    /// whole with `BadRequest`. Ids that are not queued (acked before) are
    /// ignored, as by `Ack`.
    ///
    /// Added after version 3 was fixed, as the last variant, so the tags of
    /// the others stay: a relay that predates it answers `BadRequest`, and
    /// the agent falls back to one `Ack` per message. The version stays 3,
    /// since bumping it would make old and new peers refuse each other's
    /// every frame instead.
    AckMany {
        /// Each message id with what the agent did with it.
        acks: Vec<(MessageId, AckOutcome)>,
    },
    /// Whose comings and goings to push on this connection
    /// ([`Push::Presence`]): replaces the list given before, at most
    /// [`crate::limits::MAX_WATCH`] valid usernames (else `BadRequest`, and
    /// the old list stays). Needs a login; a new connection watches nobody.
    /// Answered with [`Response::Online`]: those of them online now.
    ///
    /// An agent watches its contacts. Pushing every change to every online
    /// user would cost the relay a write per user for each login (a
    /// thousand users logging in, a million pushes) and tell everyone
    /// about everyone. Added as the last variant, like `AckMany`: a relay
    /// that predates it answers `BadRequest` (and pushes every change).
    WatchPresence {
        /// The usernames to watch.
        users: Vec<String>,
    },
}

/// Most entries in one [`Response::Directory`] page.
pub const DIRECTORY_PAGE: usize = 128;

/// What the recipient did with a pushed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AckOutcome {
    /// Verified, decrypted and stored in the recipient's inbox.
    Stored,
    /// Failed verification or decryption; dropped so it cannot block the queue.
    Rejected,
}

impl std::fmt::Debug for Request {
    // Hand-written so that passwords, codes and tokens never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Register {
                username, email, ..
            } => f
                .debug_struct("Register")
                .field("username", username)
                .field("email", email)
                .finish_non_exhaustive(),
            Request::Verify { username, .. } => f
                .debug_struct("Verify")
                .field("username", username)
                .finish_non_exhaustive(),
            Request::Challenge => f.write_str("Challenge"),
            Request::Login { username, .. } => f
                .debug_struct("Login")
                .field("username", username)
                .finish_non_exhaustive(),
            Request::Resume { username, .. } => f
                .debug_struct("Resume")
                .field("username", username)
                .finish_non_exhaustive(),
            Request::Logout => f.write_str("Logout"),
            Request::LookupKey { username } => f
                .debug_struct("LookupKey")
                .field("username", username)
                .finish(),
            Request::PublishKey { .. } => f.write_str("PublishKey"),
            Request::Send { envelope } => f
                .debug_struct("Send")
                .field("id", &envelope.id)
                .field("kind", &envelope.kind)
                .field("recipients", &envelope.recipient_count())
                .finish_non_exhaustive(),
            Request::Ack { id, outcome } => f
                .debug_struct("Ack")
                .field("id", id)
                .field("outcome", outcome)
                .finish(),
            Request::Online => f.write_str("Online"),
            Request::Time => f.write_str("Time"),
            Request::Directory { after } => {
                f.debug_struct("Directory").field("after", after).finish()
            }
            Request::AckMany { acks } => f
                .debug_struct("AckMany")
                .field("acks", &acks.len())
                .finish_non_exhaustive(),
            Request::WatchPresence { users } => f
                .debug_struct("WatchPresence")
                .field("users", &users.len())
                .finish_non_exhaustive(),
        }
    }
}

/// The relay's answer to one [`Request`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Registration started; a code was mailed (or written to the outbox).
    RegisterPending {
        /// Seconds until the code expires.
        expires_in_secs: u64,
    },
    /// The account is active; here is its TOTP secret.
    Verified {
        /// `otpauth://totp/...` URI for authenticator apps.
        otpauth_uri: Zeroizing<String>,
        /// The same secret, base32, for manual entry.
        secret_base32: Zeroizing<String>,
    },
    /// A fresh challenge nonce for this connection.
    Challenge {
        /// [`BINDING_LEN`] random bytes.
        nonce: Vec<u8>,
    },
    /// Login or resume succeeded.
    LoggedIn {
        /// The account name.
        username: String,
        /// A new session token after a full login; `None` after a resume.
        token: Option<Zeroizing<Vec<u8>>>,
        /// Unix seconds when the session expires.
        session_expires_unix: u64,
        /// Entries waiting in the queue (messages, and notices of our own
        /// messages that expired undelivered); they follow on the push stream.
        unread: u64,
    },
    /// The request succeeded and carries no data.
    Ok,
    /// A directory entry.
    Key {
        /// Whose key.
        username: String,
        /// SubjectPublicKeyInfo DER.
        public_key: Vec<u8>,
    },
    /// The envelope is durably stored (or was already: `duplicate`).
    Stored {
        /// The envelope's id.
        id: MessageId,
        /// True if this id had been stored before; nothing was added.
        duplicate: bool,
    },
    /// Users connected now, sorted.
    Online {
        /// Usernames.
        users: Vec<String>,
    },
    /// The request failed.
    Error(ErrorReply),
    /// Answer to [`Request::Time`]: the relay's clock, Unix milliseconds.
    Time {
        /// Unix milliseconds when the relay answered.
        unix_ms: u64,
    },
    /// A page of the directory (answer to [`Request::Directory`]).
    Directory {
        /// At most [`DIRECTORY_PAGE`] users, in name order.
        users: Vec<DirectoryEntry>,
        /// More users follow: ask again with the last name as `after`.
        more: bool,
    },
    /// Answer to a `Send` of an envelope with several recipients: it was
    /// split into one copy per recipient, each queued (or refused) on its
    /// own, all in one durable commit.
    Fanout {
        /// The envelope's id.
        id: MessageId,
        /// Recipients it is queued for now (duplicates included).
        stored: Vec<String>,
        /// Recipients it was refused for, with why.
        refused: Vec<Refusal>,
    },
}

/// One user in the directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    /// Account name.
    pub username: String,
    /// SubjectPublicKeyInfo DER.
    pub public_key: Vec<u8>,
}

/// A recipient a [`Response::Fanout`] did not queue for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The recipient.
    pub user: String,
    /// Why.
    pub error: ErrorReply,
}

impl std::fmt::Debug for Response {
    // Hand-written so that TOTP secrets and tokens never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Response::RegisterPending { expires_in_secs } => f
                .debug_struct("RegisterPending")
                .field("expires_in_secs", expires_in_secs)
                .finish(),
            Response::Verified { .. } => f.write_str("Verified"),
            Response::Challenge { .. } => f.write_str("Challenge"),
            Response::LoggedIn {
                username, unread, ..
            } => f
                .debug_struct("LoggedIn")
                .field("username", username)
                .field("unread", unread)
                .finish_non_exhaustive(),
            Response::Ok => f.write_str("Ok"),
            Response::Key { username, .. } => f
                .debug_struct("Key")
                .field("username", username)
                .finish_non_exhaustive(),
            Response::Stored { id, duplicate } => f
                .debug_struct("Stored")
                .field("id", id)
                .field("duplicate", duplicate)
                .finish(),
            Response::Online { users } => f.debug_struct("Online").field("users", users).finish(),
            Response::Error(e) => f.debug_tuple("Error").field(e).finish(),
            Response::Time { unix_ms } => f.debug_struct("Time").field("unix_ms", unix_ms).finish(),
            Response::Directory { users, more } => f
                .debug_struct("Directory")
                .field("users", &users.len())
                .field("more", more)
                .finish(),
            Response::Fanout {
                id,
                stored,
                refused,
            } => f
                .debug_struct("Fanout")
                .field("id", id)
                .field("stored", &stored.len())
                .field("refused", refused)
                .finish(),
        }
    }
}

/// A message the relay pushes on its unidirectional stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Push {
    /// A queued envelope for the logged-in user; answer with [`Request::Ack`].
    Deliver {
        /// The envelope as the sender submitted it.
        envelope: Envelope,
        /// When the relay stored it, by the relay's clock (Unix seconds).
        /// Shown beside the sender's own timestamp when the two disagree.
        received_unix: u64,
    },
    /// A user this connection watches ([`Request::WatchPresence`]) came
    /// online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Online now (`true`) or gone (`false`).
        online: bool,
    },
    /// A message this user sent was never delivered: it waited on the relay
    /// for the whole retention time and was removed. Queued like a message:
    /// answer with [`Request::Ack`] for `notice`.
    Expired {
        /// The id to acknowledge this notice with.
        notice: MessageId,
        /// The expired message's id.
        id: MessageId,
        /// Its recipient.
        recipient: String,
        /// When the relay had stored it (Unix seconds).
        stored_unix: u64,
    },
}

/// A typed error from the relay, with a human explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// What happened and, where useful, what to do about it.
    pub message: String,
}

impl ErrorReply {
    /// Build an error reply.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

impl std::error::Error for ErrorReply {}

/// Why a request failed.
///
/// On the wire postcard encodes the variant index; the snake_case names are
/// what JSON output (chat-cli `--json`) shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame could not be decoded, or the request makes no sense here.
    BadRequest,
    /// The frame exceeded [`crate::limits::MAX_FRAME_LEN`].
    FrameTooLarge,
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// The username breaks the documented rules.
    InvalidUsername,
    /// The email address is not plausible.
    InvalidEmail,
    /// The password is too short or too long.
    WeakPassword,
    /// The public key is not an RSA key of an allowed size.
    InvalidPublicKey,
    /// The username is taken (or a registration for it is pending).
    UsernameTaken,
    /// No pending registration for this username (never started, or expired).
    NoPendingRegistration,
    /// The emailed code is wrong.
    WrongCode,
    /// The emailed code has expired; register again.
    CodeExpired,
    /// Too many wrong codes or logins; wait or start over.
    TooManyAttempts,
    /// The relay could not send the verification mail.
    MailFailed,
    /// Unknown user, wrong password, or a wrong or already used TOTP code
    /// (deliberately not told apart).
    InvalidCredentials,
    /// The TOTP code is wrong. Not sent by the relay since a wrong code
    /// gets [`ErrorCode::InvalidCredentials`]; kept for the wire numbering.
    InvalidTotp,
    /// The TOTP code was already used. Not sent by the relay since a used
    /// code gets [`ErrorCode::InvalidCredentials`]; kept for the wire numbering.
    TotpReused,
    /// The signature over the challenge does not verify with the account key.
    InvalidSignature,
    /// Ask for a `Challenge` first (each challenge is good for one attempt).
    NoChallenge,
    /// The session token is unknown, revoked or expired; log in again.
    SessionExpired,
    /// This request needs a logged-in connection.
    NotAuthenticated,
    /// This request needs a full login (password + TOTP) on this connection.
    FreshLoginRequired,
    /// No such user.
    UnknownUser,
    /// The envelope's sender is not the logged-in user.
    NotSender,
    /// The envelope is larger than allowed.
    MessageTooLarge,
    /// The recipient cannot take more messages from this sender now (its
    /// queue, or the sender's share of it, is full); retry later.
    QuotaExceeded,
    /// Too many attempts in a short time; wait and retry.
    RateLimited,
    /// The relay is shutting down; reconnect later.
    ShuttingDown,
    /// Something failed on the relay; the log says what.
    Internal,
    /// The relay is too busy to take this request now (its password checks
    /// are all taken); retry in a moment.
    Busy,
}
