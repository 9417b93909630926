//! The local protocol between `chat-cli` and `agentd` (no I/O here).
//!
//! chat-cli connects to agentd's local socket (a Unix socket in a 0700
//! directory; agentd refuses peers with another uid) and speaks JSON lines:
//! one [`IpcRequest`] per line, answered by one [`IpcResponse`] per line.
//!
//! ```text
//! chat-cli                                agentd
//!   │ {"request":"hello","version":1} ──► │  version check first; a mismatch is
//!   │ ◄── {"response":"hello",...}         │  a typed `version_mismatch` error
//!   │ {"request":"send","to":"bob",...} ─► │  seal, sign, wait for the relay's Stored
//!   │ ◄── {"response":"sent",...}          │
//!   │ {"request":"send",...,               │  a cancellable send: the id first,
//!   │   "cancellable":true} ─────────────► │  then the result; a `cancel` line in
//!   │ ◄── {"response":"accepted","id":..}  │  between withdraws the message if it
//!   │ ◄── {"response":"sent",...}          │  has not gone to the relay yet
//!   │ {"request":"inbox","all":false} ───► │  one `message` line per inbox item,
//!   │ ◄── {"response":"message",...} ...   │  then `end`; nothing is marked read
//!   │ ◄── {"response":"end","count":2}     │
//!   │ {"request":"mark_read","ids":[..]} ► │  once chat-cli has shown them
//!   │ ◄── {"response":"ok"}                │
//!   │ {"request":"events"} ──────────────► │  `events` with the journal's head, then
//!   │ ◄── {"response":"event",...} ...     │  one `event` line per event until
//!   │ {"request":"mark_read","ids":[..]} ► │  chat-cli hangs up; it marks messages
//!                                          │  read once shown
//! ```
//!
//! Lists are streamed one item per line, never as one reply, so that no
//! number or size of messages can push a reply over the line limit; and a
//! message counts as read only after the client has it, so a client that
//! dies half way loses nothing.
//!
//! Errors cross the socket as [`IpcError`] with a machine-readable
//! [`IpcErrorKind`], never as bare strings. Every line on either side is
//! bounded by [`MAX_LINE_LEN`]; a longer line ends the connection.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::limits::MAX_MESSAGE_LEN;
use crate::protocol::ErrorCode;

/// Version of this local protocol; the first request ([`IpcRequest::Hello`])
/// carries it and agentd refuses any other. Version 3 added the cancellable
/// `Send` (answered `Accepted` first), `Cancel` and `Doctor`; version 4
/// `History`, `Contacts`, `Events` and the broadcast flag on messages.
pub const IPC_VERSION: u32 = 4;

/// Longest JSON line either side accepts, newline included.
///
/// Sized for the worst message: JSON escapes a control character as six
/// bytes (`\u001b`), so a body of [`MAX_MESSAGE_LEN`] such characters takes
/// six times its size, plus room for the other fields.
pub const MAX_LINE_LEN: usize = 6 * MAX_MESSAGE_LEN + 64 * 1024;

/// Most message ids one [`IpcRequest::MarkRead`] carries.
pub const MAX_MARK_READ: usize = 1024;

/// A request from chat-cli to agentd.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
#[non_exhaustive]
pub enum IpcRequest {
    /// Must come first on every connection.
    Hello {
        /// [`IPC_VERSION`] of the client.
        version: u32,
    },
    /// Start registering an account (creates the identity key if needed).
    Register {
        /// Wanted username.
        username: String,
        /// Where the relay mails the one-time code.
        email: String,
        /// The account password.
        password: Zeroizing<String>,
    },
    /// Finish the registration with the mailed code.
    Verify {
        /// The six-digit code.
        code: Zeroizing<String>,
    },
    /// Full multi-factor login; agentd keeps the session from then on.
    Login {
        /// Account name.
        username: String,
        /// Account password.
        password: Zeroizing<String>,
        /// Current TOTP code.
        totp: Zeroizing<String>,
    },
    /// End the session on the relay and forget the token.
    Logout,
    /// What agentd is doing.
    Status,
    /// Send one message.
    ///
    /// With `cancellable`, agentd answers `Accepted { id }` at once and the
    /// result (`Sent` or an error) later. Meanwhile the client may send a
    /// `Cancel` line: agentd answers `Cancelled` if the message had not gone
    /// to the relay yet (nothing is sent, ever), or `Sending` if it had (the
    /// relay may store and deliver it; `Status` shows how it ended). A client
    /// that hangs up cancels nothing: agentd finishes the send.
    Send {
        /// Recipient username.
        to: String,
        /// Message text.
        text: String,
        /// Answer `Accepted` first and take a `Cancel` while waiting.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cancellable: bool,
    },
    /// Withdraw the message of a running cancellable `Send` on this
    /// connection (see there); anywhere else it is a `bad_request`.
    Cancel,
    /// Facts for `chat-cli doctor`: how the relay's certificate is trusted,
    /// a refusal of it, and the relay's clock against ours.
    Doctor,
    /// Send one message to every other registered user (sealed once, its
    /// key wrapped for each); offline users get it when they come back.
    Broadcast {
        /// Message text.
        text: String,
    },
    /// Read the local inbox: answered with one `Message` line per message,
    /// oldest first, then `End`. Nothing is marked read; send `MarkRead`
    /// for the messages once they are shown.
    Inbox {
        /// Include messages already read.
        all: bool,
        /// Only messages from this user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// Mark inbox messages read (after the client has shown them). Inside an
    /// `Events` stream it gets no answer.
    MarkRead {
        /// Message ids (32 hex digits), at most [`MAX_MARK_READ`].
        ids: Vec<String>,
    },
    /// Messages held because their sender's key changed: one `Held` line
    /// each, then `End`.
    Held,
    /// Users connected to the relay now.
    Online,
    /// A key fingerprint: our own (no user), or a contact's pinned and
    /// directory keys.
    Fingerprint {
        /// Whose key; `None` for our own.
        user: Option<String>,
    },
    /// Pin the contact's directory key, but only if its fingerprint is the
    /// one given (the one the user checked), and release the held messages
    /// that key signed.
    Trust {
        /// The contact.
        user: String,
        /// The fingerprint the user checked (64 hex digits; spaces, colons
        /// and a `sha256:` prefix are ignored).
        fingerprint: String,
    },
    /// Make a new key pair and publish it after a fresh MFA login.
    RotateKey {
        /// Account password.
        password: Zeroizing<String>,
        /// Current TOTP code.
        totp: Zeroizing<String>,
    },
    /// Decrypt the passphrase-protected identity key.
    Unlock {
        /// The key passphrase.
        passphrase: Zeroizing<String>,
    },
    /// Protect the identity key with a passphrase (`None` removes it).
    SetPassphrase {
        /// The new passphrase.
        passphrase: Option<Zeroizing<String>>,
    },
    /// A conversation both ways, oldest first: one `Entry` line per
    /// message, then `End`. Nothing is marked read.
    History {
        /// The contact; `None` for the room (broadcasts sent and received).
        with: Option<String>,
        /// The newest this many.
        limit: u32,
    },
    /// Every contact with a pinned key: one `Contact` line each, then `End`.
    Contacts,
    /// Follow agentd's event journal: answered `Events { head }`, then one
    /// `Event` line per event after `after` (the cursor of the last event
    /// the client has; `None` for only what happens from now on), old ones
    /// first, then new ones as they happen, until the client hangs up.
    Events {
        /// Resume after this cursor.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
}

impl std::fmt::Debug for IpcRequest {
    // Hand-written so passwords, codes and passphrases never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            IpcRequest::Hello { version } => return write!(f, "Hello {{ version: {version} }}"),
            IpcRequest::Register { username, .. } => {
                return write!(f, "Register {{ username: {username:?}, .. }}")
            }
            IpcRequest::Verify { .. } => "Verify",
            IpcRequest::Login { username, .. } => {
                return write!(f, "Login {{ username: {username:?}, .. }}")
            }
            IpcRequest::Logout => "Logout",
            IpcRequest::Status => "Status",
            IpcRequest::Send { to, .. } => return write!(f, "Send {{ to: {to:?}, .. }}"),
            IpcRequest::Broadcast { .. } => "Broadcast",
            IpcRequest::Inbox { all, from } => {
                return write!(f, "Inbox {{ all: {all}, from: {from:?} }}")
            }
            IpcRequest::MarkRead { ids } => return write!(f, "MarkRead {{ {} ids }}", ids.len()),
            IpcRequest::Held => "Held",
            IpcRequest::Online => "Online",
            IpcRequest::Fingerprint { user } => {
                return write!(f, "Fingerprint {{ user: {user:?} }}")
            }
            IpcRequest::Trust { user, fingerprint } => {
                return write!(
                    f,
                    "Trust {{ user: {user:?}, fingerprint: {fingerprint:?} }}"
                )
            }
            IpcRequest::RotateKey { .. } => "RotateKey",
            IpcRequest::Unlock { .. } => "Unlock",
            IpcRequest::SetPassphrase { .. } => "SetPassphrase",
            IpcRequest::Cancel => "Cancel",
            IpcRequest::Doctor => "Doctor",
            IpcRequest::History { with, limit } => {
                return write!(f, "History {{ with: {with:?}, limit: {limit} }}")
            }
            IpcRequest::Contacts => "Contacts",
            IpcRequest::Events { after } => return write!(f, "Events {{ after: {after:?} }}"),
        };
        f.write_str(name)
    }
}

/// agentd's answer to one [`IpcRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
#[non_exhaustive]
pub enum IpcResponse {
    /// Answer to `Hello`.
    Hello {
        /// agentd's [`IPC_VERSION`].
        version: u32,
        /// agentd's package version.
        agent_version: String,
    },
    /// Done; nothing to report.
    Ok,
    /// A code was mailed; run `verify` with it.
    RegisterPending {
        /// Account name being registered.
        username: String,
        /// Seconds until the code expires.
        expires_in_secs: u64,
        /// Fingerprint of the identity key sent to the relay.
        fingerprint: String,
    },
    /// The account is active.
    Verified {
        /// Account name.
        username: String,
        /// TOTP secret as an otpauth URI (for authenticator apps).
        otpauth_uri: Zeroizing<String>,
        /// The same secret, base32.
        secret_base32: Zeroizing<String>,
    },
    /// Logged in; agentd resumes this session by itself from now on.
    LoggedIn {
        /// Account name.
        username: String,
        /// Messages waiting on the relay.
        unread: u64,
    },
    /// agentd's state.
    Status(Box<StatusInfo>),
    /// The relay has durably stored the message.
    Sent(SentInfo),
    /// Result of a broadcast, per recipient.
    Broadcast {
        /// Delivered to the relay.
        sent: Vec<SentInfo>,
        /// Not sent, with the reason.
        failed: Vec<BroadcastFailure>,
    },
    /// The end of a streamed list (`Inbox`, `Held`).
    End {
        /// How many items were sent.
        count: u64,
    },
    /// One held message, in the answer to `Held`.
    Held(Problem),
    /// Users online now.
    Online {
        /// Usernames, sorted.
        users: Vec<String>,
    },
    /// A key fingerprint.
    Fingerprint(FingerprintInfo),
    /// A contact's key is trusted now.
    Trusted {
        /// The contact.
        user: String,
        /// Fingerprint now pinned.
        fingerprint: String,
        /// Held messages verified and moved to the inbox.
        released: u64,
    },
    /// The identity key was replaced.
    KeyRotated {
        /// Fingerprint of the previous key (kept to open older messages).
        old_fingerprint: String,
        /// Fingerprint of the new, published key.
        new_fingerprint: String,
    },
    /// One inbox message, in the answer to `Inbox`.
    Message(InboxMessage),
    /// The request failed.
    Error(IpcError),
    /// A cancellable `Send` was taken as this message id; its result follows.
    Accepted {
        /// Message id (32 hex digits).
        id: String,
    },
    /// The message was withdrawn before it went to the relay: it is not
    /// sent and never will be.
    Cancelled {
        /// Message id.
        id: String,
    },
    /// Too late to cancel: the message has gone to the relay, which may
    /// store and deliver it. agentd finishes the send and `Status` lists its
    /// outcome under `interrupted_sends`.
    Sending {
        /// Message id.
        id: String,
    },
    /// Answer to `Doctor`.
    Doctor(Box<DoctorInfo>),
    /// One message of a conversation, in the answer to `History`.
    Entry(HistoryEntry),
    /// One contact, in the answer to `Contacts`.
    Contact(ContactInfo),
    /// The start of an `Events` stream: the journal's newest cursor now.
    Events {
        /// Cursor of the newest event in the journal (0: none yet).
        head: u64,
    },
    /// One event of an `Events` stream.
    Event(EventRecord),
}

/// Where a sent message stands for one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeliveryState {
    /// Handed to the relay; no answer yet (or agentd stopped before it came).
    Sending,
    /// The relay has stored it for the recipient.
    Queued,
    /// The recipient's agent has stored it (a signed receipt came back).
    Delivered,
    /// Not sent: refused, or failed before the relay took it.
    Failed,
    /// It waited on the relay for the whole retention time and was removed
    /// undelivered.
    Expired,
}

impl DeliveryState {
    /// The word shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Sending => "sending",
            DeliveryState::Queued => "queued",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Expired => "expired",
        }
    }
}

/// One recipient of a sent message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientState {
    /// The recipient.
    pub user: String,
    /// Where it stands.
    pub state: DeliveryState,
    /// When it got there, Unix milliseconds.
    pub at_ms: u64,
    /// Why, for `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A message this agent sent, as kept in its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMessage {
    /// Message id (32 hex digits).
    pub id: String,
    /// Sent to everyone.
    pub broadcast: bool,
    /// The text.
    pub text: String,
    /// When it was sealed, Unix milliseconds.
    pub sent_ms: u64,
    /// Each recipient and where the message stands for them.
    pub recipients: Vec<RecipientState>,
}

impl SentMessage {
    /// A message about to be handed to the relay: every recipient `sending`.
    pub fn sending(id: String, broadcast: bool, text: String, at_ms: u64, to: &[String]) -> Self {
        Self {
            id,
            broadcast,
            text,
            sent_ms: at_ms,
            recipients: to
                .iter()
                .map(|user| RecipientState {
                    user: user.clone(),
                    state: DeliveryState::Sending,
                    at_ms,
                    detail: None,
                })
                .collect(),
        }
    }

    /// The least advanced state over all recipients (a broadcast counts as
    /// delivered once everyone has it).
    pub fn state(&self) -> DeliveryState {
        let rank = |s: DeliveryState| match s {
            DeliveryState::Failed => 0,
            DeliveryState::Expired => 1,
            DeliveryState::Sending => 2,
            DeliveryState::Queued => 3,
            DeliveryState::Delivered => 4,
        };
        self.recipients
            .iter()
            .map(|r| r.state)
            .min_by_key(|s| rank(*s))
            .unwrap_or(DeliveryState::Sending)
    }
}

/// One message in a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "direction", rename_all = "snake_case")]
pub enum HistoryEntry {
    /// Received.
    In(InboxMessage),
    /// Sent by us.
    Out(SentMessage),
}

impl HistoryEntry {
    /// When it was written, by its sender's clock (Unix milliseconds).
    pub fn sent_ms(&self) -> u64 {
        match self {
            HistoryEntry::In(m) => m.sent_ms,
            HistoryEntry::Out(m) => m.sent_ms,
        }
    }
}

/// How far a contact's pinned key is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TrustState {
    /// Pinned on first use, never compared out of band.
    FirstUse,
    /// Pinned with `chat-cli trust` after comparing fingerprints.
    Verified,
    /// Messages are held because a different key signed them: the contact
    /// rotated their key, or someone pretends to be them.
    Changed,
}

/// A contact whose key agentd has pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactInfo {
    /// The contact.
    pub user: String,
    /// Fingerprint of the pinned key.
    pub fingerprint: String,
    /// How far it is trusted.
    pub trust: TrustState,
    /// Messages held from them (see `held`).
    pub held: u64,
    /// The last time they were seen: a message from them, or online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
}

/// Something that happened, as the `Events` stream reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A message arrived and is in the inbox.
    Message(InboxMessage),
    /// `from` has stored our message `id` (a signed receipt).
    Receipt {
        /// Our message.
        id: String,
        /// The recipient who stored it.
        from: String,
        /// When agentd took the receipt, Unix milliseconds.
        at_ms: u64,
    },
    /// Our message `id` to `to` waited on the relay for its whole retention
    /// time and was removed undelivered.
    Expired {
        /// Our message.
        id: String,
        /// Its recipient.
        to: String,
        /// When agentd heard of it, Unix milliseconds.
        at_ms: u64,
    },
    /// A user came online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Online now.
        online: bool,
        /// When agentd heard of it, Unix milliseconds.
        at_ms: u64,
    },
}

/// An [`Event`] with its place in agentd's journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Grows by one per event and survives agentd restarts: resume an
    /// `Events` stream after the last cursor seen, and nothing is lost or
    /// repeated.
    pub cursor: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// What agentd knows for `chat-cli doctor` beyond its `Status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorInfo {
    /// The relay's address as configured, if one is; of several, the one
    /// in use (or being tried now).
    pub relay: Option<String>,
    /// How the relay's certificate is trusted: `sha256:<hex>` of the pinned
    /// certificate, or `ca` for a CA certificate given with `--relay-cert`.
    pub relay_trust: Option<String>,
    /// The last connection attempt refused the relay's certificate: what it
    /// presented and how to re-pin after checking.
    pub certificate_rejected: Option<IpcError>,
    /// The relay's clock minus ours, milliseconds (positive: ours is behind),
    /// measured now over the open relay connection.
    pub clock_offset_ms: Option<i64>,
    /// The round trip of that measurement, milliseconds (the offset is
    /// uncertain by half of it).
    pub clock_rtt_ms: Option<u64>,
    /// Why the clock could not be compared, when it could not.
    pub clock_error: Option<String>,
}

/// How a send whose chat-cli went away (interrupted, or hung up) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SendState {
    /// Still waiting for the relay's answer.
    Sending,
    /// The relay stored it: it will be delivered.
    Stored,
    /// It was not sent (refused, or failed before it went to the relay).
    NotSent,
    /// The relay connection broke before it answered: the relay may have
    /// stored it (and then delivers it) or not.
    Unknown,
}

/// A send that finished (or not yet) after its chat-cli stopped listening.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOutcome {
    /// Message id (32 hex digits).
    pub id: String,
    /// Recipient.
    pub to: String,
    /// Where it stands.
    pub state: SendState,
    /// The error, for `not_sent` and `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When it was last updated, Unix milliseconds.
    pub at_ms: u64,
}

/// How many interrupted sends `Status` remembers (since agentd started).
pub const INTERRUPTED_SENDS_KEPT: usize = 16;

/// One message handed to the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentInfo {
    /// Recipient.
    pub to: String,
    /// Message id (32 hex digits).
    pub id: String,
    /// The relay had this id already.
    pub duplicate: bool,
}

/// A broadcast recipient that was skipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BroadcastFailure {
    /// Recipient.
    pub to: String,
    /// Why.
    pub error: IpcError,
}

/// A message in the local inbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    /// Message id (32 hex digits).
    pub id: String,
    /// Sender.
    pub from: String,
    /// Sender's timestamp, Unix milliseconds (the sender's clock: it may be
    /// wrong; see [`InboxMessage::clock_skewed`]).
    pub sent_ms: u64,
    /// When the relay stored it, by the relay's clock, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_ms: Option<u64>,
    /// When agentd stored it, Unix milliseconds.
    pub received_ms: u64,
    /// The decrypted text.
    pub text: String,
    /// Whether it had been shown before this answer.
    pub read: bool,
    /// The sender's sequence number for messages to us.
    #[serde(default)]
    pub seq: u64,
    /// Messages from this sender that should have come before this one and
    /// have not arrived (the relay dropped or is holding them back).
    #[serde(default)]
    pub missing_before: u64,
    /// It arrived after later messages from the same sender (reordered, or
    /// delayed by the relay).
    #[serde(default)]
    pub late: bool,
    /// The sender sent it to everyone (signed: the relay cannot change it).
    #[serde(default)]
    pub broadcast: bool,
}

/// How far the sender's clock may be from the relay's before a message shows
/// both times.
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

impl InboxMessage {
    /// True when the sender's timestamp is more than [`CLOCK_SKEW_MS`] from
    /// the relay's receive time (or from agentd's, when the relay's is
    /// unknown).
    pub fn clock_skewed(&self) -> bool {
        let reference = self.relay_ms.unwrap_or(self.received_ms);
        self.sent_ms.abs_diff(reference) > CLOCK_SKEW_MS
    }
}

/// A key's fingerprints as agentd sees them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintInfo {
    /// Whose key (our own username, if known, when asked for our own).
    pub user: Option<String>,
    /// True when this is our own identity key.
    pub own: bool,
    /// The pinned (trusted) fingerprint, or our own key's.
    pub pinned: Option<String>,
    /// What the relay's directory says now, if it could be asked.
    pub directory: Option<String>,
}

/// How agentd's relay connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConnectionState {
    /// No relay configured.
    NoRelay,
    /// Not connected; retrying with backoff.
    Disconnected,
    /// Connected but not logged in.
    Connected,
    /// Connected and logged in (pushes flow).
    LoggedIn,
}

/// A message kept out of the inbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Message id.
    pub id: String,
    /// Claimed sender.
    pub from: String,
    /// What was wrong.
    pub reason: String,
    /// When, Unix milliseconds.
    pub at_ms: u64,
}

/// agentd's state, for `chat-cli status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// agentd's package version.
    pub agent_version: String,
    /// Home directory.
    pub home: String,
    /// Local socket path.
    pub socket: String,
    /// Relay address, if configured; with several relays, the one in use
    /// (or being tried now).
    pub relay: Option<String>,
    /// Every configured relay in the order agentd tries them, when there
    /// are several (they share one state; agentd moves on when one fails).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<String>,
    /// Connection state.
    pub connection: ConnectionState,
    /// Account name, once registered or logged in.
    pub username: Option<String>,
    /// The session expired or was revoked: run `chat-cli login`.
    pub login_needed: bool,
    /// The identity key is passphrase-protected and not unlocked yet.
    pub locked: bool,
    /// Whether an identity key exists.
    pub has_key: bool,
    /// Fingerprint of the identity key, when unlocked.
    pub fingerprint: Option<String>,
    /// Unread inbox messages.
    pub unread: u64,
    /// The newest messages held because the sender's key changed (run
    /// `trust`); at most [`STATUS_HELD_SHOWN`], `held_count` has them all.
    pub held: Vec<Problem>,
    /// How many messages are held in all (`chat-cli held` lists them).
    #[serde(default)]
    pub held_count: u64,
    /// Recent gaps and replays in senders' message sequences (the relay
    /// dropped, reordered or replayed messages).
    #[serde(default)]
    pub sequence_alerts: Vec<Problem>,
    /// Recently rejected messages (bad signature, tampered, misaddressed).
    pub rejected: Vec<Problem>,
    /// The last connection error, if any; cleared once agentd is connected
    /// (and, with a session, logged in) again.
    pub last_error: Option<String>,
    /// When `last_error` happened (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_ms: Option<u64>,
    /// While disconnected: why the last attempt to reach the relay failed,
    /// and when the next one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryInfo>,
    /// Sends whose chat-cli was interrupted or went away before the result,
    /// newest last (at most [`INTERRUPTED_SENDS_KEPT`], since agentd started).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interrupted_sends: Vec<SendOutcome>,
}

/// agentd's next attempt to reach the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryInfo {
    /// Why the last attempt failed, in a few words (`cannot resolve: …`).
    pub reason: String,
    /// Milliseconds until the next attempt.
    pub in_ms: u64,
}

/// How many held messages `status` lists; `chat-cli held` shows all.
pub const STATUS_HELD_SHOWN: usize = 20;

/// A typed error sent over the socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcError {
    /// Machine-readable reason.
    pub kind: IpcErrorKind,
    /// What happened and what to do about it.
    pub message: String,
    /// The relay's error code, when the relay refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_code: Option<ErrorCode>,
    /// Details of a changed key, for [`IpcErrorKind::KeyChanged`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_change: Option<KeyChange>,
}

impl IpcError {
    /// An error without details.
    pub fn new(kind: IpcErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            relay_code: None,
            key_change: None,
        }
    }
}

impl std::fmt::Display for IpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for IpcError {}

/// The pinned and the new key of a contact whose key changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChange {
    /// The contact.
    pub user: String,
    /// Fingerprint pinned earlier.
    pub pinned: String,
    /// Fingerprint the directory shows now.
    pub current: String,
}

/// Why an IPC request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum IpcErrorKind {
    /// The client speaks another [`IPC_VERSION`].
    VersionMismatch,
    /// The line is not a valid request, or `Hello` did not come first.
    BadRequest,
    /// The line is longer than [`MAX_LINE_LEN`].
    TooLarge,
    /// The connecting process belongs to another user.
    PermissionDenied,
    /// No account yet: run `register` (and `verify`).
    NotRegistered,
    /// There is no pending registration to verify.
    NoPendingRegistration,
    /// Not logged in: run `login`.
    NotLoggedIn,
    /// Already logged in; `logout` first.
    AlreadyLoggedIn,
    /// The session expired or was revoked; run `login` again.
    LoginNeeded,
    /// The identity key is passphrase-protected; run `unlock`.
    Locked,
    /// The passphrase is wrong.
    WrongPassphrase,
    /// agentd has no relay configured.
    NoRelay,
    /// agentd cannot reach the relay right now (it keeps retrying).
    RelayUnavailable,
    /// The relay refused; see `relay_code`.
    Relay,
    /// A contact's key differs from the pinned one; run `trust`.
    KeyChanged,
    /// The message cannot be sealed or a key is unusable.
    Crypto,
    /// Reading or writing agentd's files failed.
    Storage,
    /// Invalid input (username, message size, ...).
    InvalidInput,
    /// Anything else; agentd's log says more.
    Internal,
    /// The directory's key for a contact does not have the fingerprint the
    /// user gave to `trust`; nothing was pinned.
    FingerprintMismatch,
    /// The relay's TLS certificate was refused (not the pinned one, not
    /// issued by the trusted CA, or not valid for the name); agentd retries
    /// only slowly until someone checks the relay and re-pins it.
    CertificateRejected,
}

/// Why a line could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// The line exceeds [`MAX_LINE_LEN`].
    #[error("line of {0} bytes exceeds the limit of {MAX_LINE_LEN} bytes")]
    TooLarge(usize),
    /// The line is not valid JSON for the expected type.
    #[error("malformed line: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encode a message as one JSON line, newline included.
pub fn encode_line<T: Serialize>(msg: &T) -> Result<Vec<u8>, LineError> {
    let mut out = serde_json::to_vec(msg)?;
    out.push(b'\n');
    if out.len() > MAX_LINE_LEN {
        return Err(LineError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Decode one line (with or without its trailing newline).
pub fn decode_line<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, LineError> {
    if line.len() > MAX_LINE_LEN {
        return Err(LineError::TooLarge(line.len()));
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    Ok(serde_json::from_slice(line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let reqs = [
            IpcRequest::Hello {
                version: IPC_VERSION,
            },
            IpcRequest::Send {
                to: "bob".into(),
                text: "hi\nthere".into(),
                cancellable: false,
            },
            IpcRequest::Send {
                to: "bob".into(),
                text: "hi".into(),
                cancellable: true,
            },
            IpcRequest::Cancel,
            IpcRequest::Doctor,
            IpcRequest::Login {
                username: "alice".into(),
                password: Zeroizing::new("pw".into()),
                totp: Zeroizing::new("123456".into()),
            },
            IpcRequest::Events { after: Some(7) },
            IpcRequest::Inbox {
                all: true,
                from: Some("bob".into()),
            },
            IpcRequest::MarkRead {
                ids: vec!["00".repeat(16)],
            },
        ];
        for req in reqs {
            let line = encode_line(&req).unwrap();
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            assert_eq!(decode_line::<IpcRequest>(&line).unwrap(), req);
        }
        let hello = String::from_utf8(encode_line(&IpcRequest::Status).unwrap()).unwrap();
        assert_eq!(hello, "{\"request\":\"status\"}\n");
    }

    #[test]
    fn a_send_without_cancellable_is_the_old_single_answer_send() {
        let req: IpcRequest = decode_line(br#"{"request":"send","to":"bob","text":"hi"}"#).unwrap();
        assert_eq!(
            req,
            IpcRequest::Send {
                to: "bob".into(),
                text: "hi".into(),
                cancellable: false
            }
        );
        let line = encode_line(&req).unwrap();
        assert!(!String::from_utf8(line).unwrap().contains("cancellable"));
    }

    #[test]
    fn errors_are_typed() {
        let mut e = IpcError::new(IpcErrorKind::KeyChanged, "changed");
        e.key_change = Some(KeyChange {
            user: "bob".into(),
            pinned: "aa".into(),
            current: "bb".into(),
        });
        let line = encode_line(&IpcResponse::Error(e.clone())).unwrap();
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(text.contains("\"kind\":\"key_changed\""), "{text}");
        assert_eq!(
            decode_line::<IpcResponse>(&line).unwrap(),
            IpcResponse::Error(e)
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_and_oversize_is_refused() {
        let req = IpcRequest::Login {
            username: "alice".into(),
            password: Zeroizing::new("hunter22".into()),
            totp: Zeroizing::new("123456".into()),
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains("hunter22") && !shown.contains("123456"));
        let big = vec![b'x'; MAX_LINE_LEN + 1];
        assert!(matches!(
            decode_line::<IpcRequest>(&big),
            Err(LineError::TooLarge(_))
        ));
        assert!(decode_line::<IpcRequest>(b"{\"request\":\"nope\"}").is_err());
    }

    #[test]
    fn the_worst_message_fits_one_line() {
        // Every byte a control character: JSON's most expensive escape.
        let text: String = std::iter::repeat_n('\u{1}', MAX_MESSAGE_LEN).collect();
        let msg = InboxMessage {
            id: "ab".repeat(16),
            from: "a".repeat(32),
            sent_ms: u64::MAX,
            relay_ms: Some(u64::MAX),
            received_ms: u64::MAX,
            text: text.clone(),
            read: false,
            seq: u64::MAX,
            missing_before: u64::MAX,
            late: true,
            broadcast: true,
        };
        let line = encode_line(&IpcResponse::Message(msg)).unwrap();
        assert!(line.len() > 6 * MAX_MESSAGE_LEN);
        let send = IpcRequest::Send {
            to: "a".repeat(32),
            text,
            cancellable: true,
        };
        encode_line(&send).unwrap();
        let ids = IpcRequest::MarkRead {
            ids: vec!["ab".repeat(16); MAX_MARK_READ],
        };
        encode_line(&ids).unwrap();
    }
}
