//! The agent's shared state: keys, the current relay connection, the store,
//! and the events chat-cli can watch.
//!
//! One [`Agent`] lives behind an `Arc`; the connection manager, the push
//! handler and every IPC connection share it. The connection is published
//! through a `watch` channel so that a request can wait (bounded) for the
//! manager to reconnect instead of failing at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use securechat_common::ipc::{
    ConnectionState, IpcError, IpcErrorKind, KeyChange, RetryInfo, SendOutcome, StatusInfo,
    INTERRUPTED_SENDS_KEPT,
};
use securechat_common::protocol::{ErrorCode, Request, Response};
use securechat_common::{IdentityKey, PublicKey};
use tokio::sync::{watch, Notify};

use crate::config::{AgentConfig, RelayAddr};
use crate::keystore::{self, InboxKey, KeyStoreError, Loaded, LockedKey, Sealer};
use crate::store::{Store, StoreError};
use securechat_client::relay::{CertRejection, ClientError, RelayClient};

/// How long a request waits for the relay connection to come back.
const READY_WAIT: Duration = Duration::from_secs(10);

/// What to do about a passphrase-protected key that is not unlocked yet.
pub(crate) const LOCKED_HINT: &str = "the identity key is locked; run: chat-cli unlock";

/// The identity key's state.
pub(crate) enum Keys {
    /// No key yet.
    Missing,
    /// Encrypted on disk; waits for `unlock`.
    Locked(LockedKey),
    /// Usable.
    Ready(ReadyKeys),
}

/// Unlocked keys.
#[derive(Clone)]
pub(crate) struct ReadyKeys {
    /// The current identity key.
    pub current: Arc<IdentityKey>,
    /// Keys replaced by rotation, newest last.
    pub old: Vec<Arc<IdentityKey>>,
    /// The new key of a rotation a crash interrupted (`identity.key.new`),
    /// until the relay shows which key it holds (see `rotation`).
    pub pending: Option<Arc<IdentityKey>>,
    /// Re-encrypts key files when a passphrase is set.
    pub sealer: Option<Arc<Sealer>>,
    /// Encrypts the inbox at rest.
    pub inbox: InboxKey,
}

impl ReadyKeys {
    /// Every key file with its plaintext, for [`keystore::reseal_all`].
    pub(crate) fn files(
        &self,
        paths: &securechat_client::Paths,
    ) -> Result<keystore::KeyFiles, KeyStoreError> {
        let mut files = vec![(
            paths.identity_key(),
            keystore::identity_payload(&self.current)?,
        )];
        for k in &self.old {
            files.push((
                keystore::archive_path(&paths.old_keys(), k),
                keystore::identity_payload(k)?,
            ));
        }
        if let Some(k) = &self.pending {
            files.push((paths.pending_key(), keystore::identity_payload(k)?));
        }
        files.push((paths.inbox_key(), self.inbox.payload()));
        Ok(files)
    }
}

/// Open every key file with `passphrase`: the identity key, archived and
/// pending keys, and the inbox key (made now if there is none yet). Files of
/// the first, weaker key derivation are first rewritten under today's (same
/// passphrase, all files at once; see [`keystore::reseal_all`]). The caller
/// holds the rotation guard.
pub(crate) fn unlock_keys(
    paths: &securechat_client::Paths,
    store: &Store,
    locked: &LockedKey,
    passphrase: &str,
) -> Result<ReadyKeys, KeyStoreError> {
    let (key, mut sealer) = locked.unlock(passphrase)?;
    let old = keystore::load_old_keys(&paths.old_keys(), Some(&sealer))?;
    let inbox = match keystore::load_inbox_key(&paths.inbox_key(), Some(&sealer))? {
        Some(k) => k,
        None => InboxKey::generate()?,
    };
    let mut keys = ReadyKeys {
        current: Arc::new(key),
        old: old.into_iter().map(Arc::new).collect(),
        pending: load_pending(paths, Some(&sealer)),
        sealer: None,
        inbox,
    };
    if sealer.is_outdated() {
        sealer = Sealer::new(passphrase)?;
        keystore::reseal_all(paths, &keys.files(paths)?, Some(&sealer))?;
        tracing::info!("key files re-encrypted with the current passphrase key derivation");
    }
    // On disk (made now if new, under the passphrase) before anything uses it.
    keys.inbox = open_inbox(paths, store, Some(&sealer))?;
    keys.sealer = Some(Arc::new(sealer));
    Ok(keys)
}

/// Load (or make) the inbox key with the identity's protection, and encrypt
/// inbox records an earlier version left in plain text.
pub(crate) fn open_inbox(
    paths: &securechat_client::Paths,
    store: &Store,
    sealer: Option<&Sealer>,
) -> Result<InboxKey, KeyStoreError> {
    let key = keystore::load_or_create_inbox_key(&paths.inbox_key(), sealer)?;
    match store.seal_legacy_inbox(&key) {
        Ok(0) => {}
        Ok(n) => tracing::info!("encrypted {n} inbox message(s) stored by an earlier version"),
        Err(e) => tracing::error!("encrypting the inbox of an earlier version: {e}"),
    }
    Ok(key)
}

/// The relay connection as the rest of the agent sees it.
#[derive(Clone, Default)]
pub(crate) struct Conn {
    pub client: Option<Arc<RelayClient>>,
    pub logged_in: bool,
    /// The last attempt found a relay whose certificate was refused: the
    /// answer to requests until a connection succeeds.
    pub refused: Option<IpcError>,
}

#[derive(Default)]
struct Flags {
    login_needed: bool,
    /// The last error and when it happened (Unix ms).
    last_error: Option<(String, u64)>,
    /// Why the last connection attempt failed, and when the next starts.
    retry: Option<(String, std::time::Instant)>,
}

/// Shared agent state.
pub struct Agent {
    pub(crate) config: AgentConfig,
    pub(crate) store: Store,
    keys: Mutex<Keys>,
    conn: watch::Sender<Conn>,
    /// Which relay of the configured list is in use, or being tried (an
    /// index into its `addrs`; set by the connection manager).
    relay_at: AtomicUsize,
    flags: Mutex<Flags>,
    /// The journal's newest cursor: `Events` streams wait on it.
    pub(crate) journal: watch::Sender<u64>,
    /// Wakes the receipt sender (a message was stored, or we logged in).
    pub(crate) receipts_due: Notify,
    /// Wakes the presence watcher: a key was pinned (a new contact).
    pub(crate) contacts_changed: Notify,
    pub(crate) reconnect: Notify,
    /// Serialises register/login/rotate/trust so they don't interleave.
    pub(crate) op_lock: tokio::sync::Mutex<()>,
    /// Serialises finishing or undoing an interrupted rotation (short, no I/O
    /// with the relay while held).
    rotation: Mutex<()>,
    /// One send at a time per recipient (see `commands::send_one`).
    send_lanes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sends whose chat-cli stopped listening, newest last, for `status`.
    interrupted_sends: Mutex<VecDeque<SendOutcome>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("home", &self.config.paths.home)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An [`IpcError`] of `kind`.
pub(crate) fn err(kind: IpcErrorKind, message: impl Into<String>) -> IpcError {
    IpcError::new(kind, message)
}

impl From<StoreError> for IpcError {
    fn from(e: StoreError) -> Self {
        tracing::error!("store: {e}");
        err(
            IpcErrorKind::Storage,
            format!("agentd's database failed: {e}"),
        )
    }
}

impl From<KeyStoreError> for IpcError {
    fn from(e: KeyStoreError) -> Self {
        match e {
            KeyStoreError::WrongPassphrase => {
                err(IpcErrorKind::WrongPassphrase, "wrong passphrase")
            }
            other => {
                tracing::error!("key store: {other}");
                err(IpcErrorKind::Storage, format!("key file: {other}"))
            }
        }
    }
}

/// What a failed relay request tells chat-cli.
pub(crate) fn relay_error(e: ClientError) -> IpcError {
    {
        match e {
            ClientError::Relay(reply) => {
                let kind = match reply.code {
                    ErrorCode::SessionExpired | ErrorCode::NotAuthenticated => {
                        IpcErrorKind::LoginNeeded
                    }
                    _ => IpcErrorKind::Relay,
                };
                let mut out = err(kind, format!("the relay refused: {}", reply.message));
                out.relay_code = Some(reply.code);
                out
            }
            ClientError::CertificateRejected { addr, rejection } => {
                let addr = addr.to_string();
                certificate_refused(&addr, &addr, &rejection)
            }
            ClientError::Connect { .. }
            | ClientError::Refused { .. }
            | ClientError::Connection(_)
            | ClientError::Stream(_) => err(
                IpcErrorKind::RelayUnavailable,
                format!("{e}; agentd keeps reconnecting, try again shortly"),
            ),
            other => err(IpcErrorKind::Internal, other.to_string()),
        }
    }
}

/// What a refused relay certificate means and how to re-pin it after
/// checking; `relay` is the `HOST:PORT` of the relay that presented it,
/// `list` the whole `--relay` setting (the same for a single relay).
pub(crate) fn certificate_refused(relay: &str, list: &str, rejection: &CertRejection) -> IpcError {
    let check = "check the certificate on the relay host with `relay fingerprint --data-dir DIR`";
    let (what, fix) = match rejection {
        CertRejection::PinMismatch {
            expected,
            presented,
        } => {
            let presented = hex::encode(presented);
            (
                format!(
                    "the relay at {relay} presented a different certificate than the pinned one; \
                     agentd refused it and sent nothing.\n  \
                     pinned:    sha256:{}\n  presented: sha256:{presented}\n\
                     This is expected if the relay's certificate was replaced (for example a \
                     new data directory); otherwise someone may be intercepting the connection.",
                    hex::encode(expected)
                ),
                format!(
                    "To re-pin: {check}; only if it prints sha256:{presented}, restart agentd \
                     with `--relay {list} --relay-fingerprint sha256:{presented}`."
                ),
            )
        }
        CertRejection::UnknownIssuer => (
            format!(
                "the certificate of the relay at {relay} is not signed by the CA given with \
                 --relay-cert; agentd refused it and sent nothing."
            ),
            format!(
                "Give the CA that issued it with --relay-cert, or pin the certificate instead: \
                 {check}, then restart agentd with `--relay {list} --relay-fingerprint \
                 sha256:...` (the fingerprint it printed)."
            ),
        ),
        CertRejection::NameMismatch {
            expected,
            presented,
        } => (
            format!(
                "the certificate of the relay at {relay} is not valid for the name {expected} \
                 (it is for: {}); agentd refused it and sent nothing.",
                if presented.is_empty() {
                    "names that could not be read".to_string()
                } else {
                    presented.join(", ")
                }
            ),
            format!(
                "Use a name the certificate carries in --relay, or pin the certificate instead: \
                 {check}, then restart agentd with `--relay {list} --relay-fingerprint \
                 sha256:...` (the fingerprint it printed)."
            ),
        ),
        other => (
            format!(
                "the certificate of the relay at {relay} was refused ({other}); agentd sent \
                 nothing."
            ),
            format!(
                "Have the relay's certificate fixed, or pin it instead: {check}, then restart \
                 agentd with `--relay {list} --relay-fingerprint sha256:...` (the fingerprint \
                 it printed)."
            ),
        ),
    };
    // One pin (or CA) covers every relay of a list: re-pinning for one
    // that alone changed would lock out the others.
    let shared = if list == relay {
        String::new()
    } else {
        format!(
            " Every relay of {list} must present that certificate (or one from the same CA): \
             if only {relay} changed, give it the others' certificate (relay --cert/--key) \
             instead of re-pinning."
        )
    };
    err(
        IpcErrorKind::CertificateRejected,
        format!(
            "{what}\n{fix}{shared} (As a service: set the new SECURECHAT_RELAY_FINGERPRINT in \
             ~/.config/securechat/agentd.env, then `systemctl --user restart \
             securechat-agentd`.) Until then agentd retries only slowly."
        ),
    )
}

/// The pending key of an interrupted rotation, if one is on disk and opens.
/// A file that does not open is left alone (and reported): it may be the
/// only copy of the key the relay holds.
pub(crate) fn load_pending(
    paths: &securechat_client::Paths,
    sealer: Option<&Sealer>,
) -> Option<Arc<IdentityKey>> {
    let path = paths.pending_key();
    match keystore::load_pending(&path, sealer) {
        Ok(Some(k)) => {
            tracing::warn!(
                "a key rotation was interrupted; the next connection to the relay finishes or \
                 undoes it (new key {})",
                k.public_key().fingerprint()
            );
            Some(Arc::new(k))
        }
        Ok(None) => None,
        Err(e) => {
            tracing::error!("{}: {e}; leaving it in place", path.display());
            None
        }
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agent {
    /// Load keys (repairing what a crash left half done) and take the store.
    /// `store` must be open: its lock keeps a second agentd out of the home.
    pub(crate) fn new(config: AgentConfig, store: Store) -> Result<Self, KeyStoreError> {
        let paths = &config.paths;
        for dir in [paths.home.clone(), paths.old_keys()] {
            match crate::files::remove_stale_temporaries(&dir) {
                Ok(0) => {}
                Ok(n) => tracing::info!("removed {n} temporary file(s) left in {}", dir.display()),
                Err(e) => tracing::warn!("cleaning {}: {e}", dir.display()),
            }
        }
        keystore::recover_reseal(paths)?;
        let keys = match keystore::load_identity(&paths.identity_key())? {
            Loaded::Missing => Keys::Missing,
            Loaded::Locked(l) => Keys::Locked(l),
            Loaded::Plain(k) => {
                let old = keystore::load_old_keys(&paths.old_keys(), None)?;
                Keys::Ready(ReadyKeys {
                    current: Arc::new(k),
                    old: old.into_iter().map(Arc::new).collect(),
                    pending: load_pending(paths, None),
                    sealer: None,
                    inbox: open_inbox(paths, &store, None)?,
                })
            }
        };
        if matches!(keys, Keys::Missing) && paths.pending_key().exists() {
            tracing::warn!(
                "{} exists without {}; keeping it untouched",
                paths.pending_key().display(),
                paths.identity_key().display()
            );
        }
        let head = store.journal_head().unwrap_or(0);
        Ok(Self {
            config,
            journal: watch::Sender::new(head),
            receipts_due: Notify::new(),
            contacts_changed: Notify::new(),
            store,
            keys: Mutex::new(keys),
            conn: watch::Sender::new(Conn::default()),
            relay_at: AtomicUsize::new(0),
            flags: Mutex::new(Flags::default()),
            reconnect: Notify::new(),
            op_lock: tokio::sync::Mutex::new(()),
            rotation: Mutex::new(()),
            send_lanes: Mutex::new(HashMap::new()),
            interrupted_sends: Mutex::new(VecDeque::new()),
        })
    }

    /// Tell `Events` streams that the journal grew.
    /// Run database or file work on tokio's blocking pool, so that a
    /// commit's fsync never holds up a runtime thread (and with it other
    /// connections' requests). `Err` only if the task panicked or was
    /// cancelled; what `f` returns is the caller's to check.
    pub(crate) async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Agent) -> T + Send + 'static,
    {
        let agent = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&agent))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))
    }

    pub(crate) fn journal_changed(&self) {
        match self.store.journal_head() {
            Ok(head) => {
                self.journal.send_replace(head);
            }
            Err(e) => tracing::error!("store: {e}"),
        }
    }

    pub(crate) fn rotation_guard(&self) -> MutexGuard<'_, ()> {
        lock(&self.rotation)
    }

    /// Ask the connection manager for a fresh connection (after logout,
    /// rotate-key, unlock). A request made while it is busy connecting is
    /// kept (a stored permit) rather than lost, and acted on once it
    /// listens again.
    pub(crate) fn request_reconnect(&self) {
        self.reconnect.notify_one();
    }

    /// The lock that orders sends to `user`.
    pub(crate) fn send_lane(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut lanes = lock(&self.send_lanes);
        if lanes.len() > 1024 {
            lanes.retain(|_, lane| Arc::strong_count(lane) > 1);
        }
        lanes.entry(user.to_string()).or_default().clone()
    }

    /// Record (or update, by id) a send whose chat-cli stopped listening,
    /// so that `status` can tell the user how it ended.
    pub(crate) fn note_interrupted_send(&self, outcome: SendOutcome) {
        let mut sends = lock(&self.interrupted_sends);
        sends.retain(|s| s.id != outcome.id);
        if sends.len() >= INTERRUPTED_SENDS_KEPT {
            sends.pop_front();
        }
        sends.push_back(outcome);
    }

    /// The unlocked keys, or why there are none.
    pub(crate) fn ready_keys(&self) -> Result<ReadyKeys, IpcError> {
        match &*lock(&self.keys) {
            Keys::Ready(k) => Ok(k.clone()),
            Keys::Locked(_) => Err(err(IpcErrorKind::Locked, LOCKED_HINT)),
            Keys::Missing => Err(err(
                IpcErrorKind::NotRegistered,
                "no identity key yet; run `chat-cli register <user> --email <addr>`",
            )),
        }
    }

    pub(crate) fn set_keys(&self, keys: Keys) {
        *lock(&self.keys) = keys;
    }

    pub(crate) fn locked_key(&self) -> Option<LockedKey> {
        match &*lock(&self.keys) {
            Keys::Locked(l) => Some(l.clone()),
            _ => None,
        }
    }

    /// The account name, once known.
    pub(crate) fn username(&self) -> Option<String> {
        self.store.setting("username").ok().flatten()
    }

    pub(crate) fn conn(&self) -> Conn {
        self.conn.borrow().clone()
    }

    /// Follow the relay connection as it comes, logs in and goes.
    pub(crate) fn subscribe_conn(&self) -> watch::Receiver<Conn> {
        self.conn.subscribe()
    }

    /// Pin `der` as `user`'s key (replacing any pin) and tell the presence
    /// watcher that the contacts changed.
    pub(crate) fn set_pin(&self, user: &str, der: &[u8]) -> Result<(), StoreError> {
        self.store.set_pin(user, der)?;
        self.contacts_changed.notify_one();
        Ok(())
    }

    /// The connection manager now uses (or tries) relay `at` of the list.
    pub(crate) fn set_relay_at(&self, at: usize) {
        self.relay_at.store(at, Ordering::Relaxed);
    }

    /// The relay in use, or being tried now; `None` without a relay.
    pub(crate) fn relay_in_use(&self) -> Option<&RelayAddr> {
        let addrs = &self.config.relay.as_ref()?.addrs;
        addrs
            .get(self.relay_at.load(Ordering::Relaxed))
            .or(addrs.first())
    }

    /// A connection attempt failed and the next relay of the list is tried
    /// at once: no wait to report.
    pub(crate) fn clear_retry(&self) {
        lock(&self.flags).retry = None;
    }

    pub(crate) fn set_conn(&self, client: Option<Arc<RelayClient>>, logged_in: bool) {
        self.conn.send_replace(Conn {
            client,
            logged_in,
            refused: None,
        });
    }

    /// Record whether the last connection attempt refused the relay's
    /// certificate (`None`: it failed for another reason).
    pub(crate) fn set_refused(&self, refused: Option<IpcError>) {
        self.conn.send_modify(|c| c.refused = refused);
    }

    pub(crate) fn set_logged_in(&self, logged_in: bool) {
        self.conn.send_modify(|c| c.logged_in = logged_in);
        if logged_in {
            self.set_login_needed(false);
            self.receipts_due.notify_one();
        }
    }

    pub(crate) fn set_login_needed(&self, v: bool) {
        lock(&self.flags).login_needed = v;
    }

    pub(crate) fn note_error(&self, e: impl std::fmt::Display) {
        let text = e.to_string();
        tracing::warn!("relay: {text}");
        lock(&self.flags).last_error = Some((text, now_ms()));
    }

    /// A connection attempt failed for `reason` (a few words, for the
    /// `relay:` line of `status`); the next one starts after `delay`.
    pub(crate) fn note_retry(&self, reason: impl Into<String>, delay: Duration) {
        let at = std::time::Instant::now() + delay;
        lock(&self.flags).retry = Some((reason.into(), at));
    }

    /// Connected again: earlier connection errors are history.
    pub(crate) fn clear_errors(&self) {
        let mut flags = lock(&self.flags);
        flags.last_error = None;
        flags.retry = None;
    }

    fn relay_configured(&self) -> Result<(), IpcError> {
        match self.config.relay {
            Some(_) => Ok(()),
            None => Err(err(
                IpcErrorKind::NoRelay,
                "agentd has no relay configured; restart it with --relay HOST:PORT \
                 --relay-fingerprint SHA256 (or set them in agentd.toml)",
            )),
        }
    }

    fn unavailable(&self) -> IpcError {
        if let Some(refused) = self.conn.borrow().refused.clone() {
            return refused;
        }
        let why = lock(&self.flags)
            .last_error
            .clone()
            .map(|(text, _)| text)
            .unwrap_or_else(|| "no connection yet".into());
        err(
            IpcErrorKind::RelayUnavailable,
            format!("agentd cannot reach the relay right now ({why}); it keeps retrying"),
        )
    }

    /// A connection to the relay, logged in or not (waits a bounded time).
    pub(crate) async fn any_client(&self) -> Result<Arc<RelayClient>, IpcError> {
        self.relay_configured()?;
        let mut rx = self.conn.subscribe();
        let ready = rx.wait_for(|c| c.client.is_some() || c.refused.is_some());
        let client = match tokio::time::timeout(READY_WAIT, ready).await {
            Ok(Ok(c)) => c.client.clone(),
            _ => None,
        };
        client.ok_or_else(|| self.unavailable())
    }

    /// A logged-in connection and the account name (waits a bounded time
    /// for a reconnect; fails at once when no session exists).
    pub(crate) async fn logged_in_client(&self) -> Result<(Arc<RelayClient>, String), IpcError> {
        self.relay_configured()?;
        let not_logged_in = || {
            if lock(&self.flags).login_needed {
                err(
                    IpcErrorKind::LoginNeeded,
                    "the session expired or was revoked; run `chat-cli login <user>`",
                )
            } else {
                err(
                    IpcErrorKind::NotLoggedIn,
                    "not logged in; run `chat-cli login <user>`",
                )
            }
        };
        // Without an unlocked key no session can be resumed: say why at once.
        self.ready_keys()?;
        let has_session = self.config.paths.session().exists();
        let conn = self.conn();
        if !conn.logged_in && (!has_session || lock(&self.flags).login_needed) {
            return Err(not_logged_in());
        }
        let mut rx = self.conn.subscribe();
        let ready = tokio::time::timeout(
            READY_WAIT,
            rx.wait_for(|c| (c.client.is_some() && c.logged_in) || c.refused.is_some()),
        )
        .await;
        let client = match ready {
            Ok(Ok(c)) => c.client.clone(),
            _ => None,
        };
        let Some(client) = client else {
            if lock(&self.flags).login_needed {
                return Err(not_logged_in());
            }
            return Err(self.unavailable());
        };
        let user = self.username().ok_or_else(not_logged_in)?;
        Ok((client, user))
    }

    /// Look up `user` in the directory.
    pub(crate) async fn directory_key(
        &self,
        client: &RelayClient,
        user: &str,
    ) -> Result<PublicKey, ClientError> {
        let req = Request::LookupKey {
            username: user.to_string(),
        };
        match client.call(&req).await? {
            Response::Key { public_key, .. } => Ok(PublicKey::from_der(&public_key)?),
            other => Err(ClientError::Unexpected(format!(
                "wanted Key, got {other:?}"
            ))),
        }
    }

    /// The key to seal for `user`: the pinned one, pinned now on first use;
    /// a directory key that differs from the pin is refused.
    pub(crate) async fn recipient_key(
        self: &Arc<Self>,
        client: &RelayClient,
        user: &str,
    ) -> Result<PublicKey, IpcError> {
        let current = self
            .directory_key(client, user)
            .await
            .map_err(relay_error)?;
        // The usual case, the pinned key again, is a read; a first pin or
        // a change (which may write) goes to the blocking pool.
        if self.store.pin(user)?.as_deref() == Some(current.as_der()) {
            return Ok(current);
        }
        let user = user.to_string();
        self.blocking(move |a| a.check_pin(&user, current)).await?
    }

    /// `current` (the directory's key for `user`) if it is the pinned one,
    /// pinned now on first use; a key that differs from the pin is refused.
    pub(crate) fn check_pin(&self, user: &str, current: PublicKey) -> Result<PublicKey, IpcError> {
        match self.store.pin(user)? {
            None => {
                self.set_pin(user, current.as_der())?;
                tracing::info!(
                    "pinned the key of {user} on first use: {}",
                    current.fingerprint()
                );
                Ok(current)
            }
            Some(der) if der == current.as_der() => Ok(current),
            Some(der) => {
                let pinned = PublicKey::from_der(&der)
                    .map(|k| k.fingerprint().to_string())
                    .unwrap_or_else(|_| "(unreadable)".into());
                let now = current.fingerprint().to_string();
                let mut e = err(
                    IpcErrorKind::KeyChanged,
                    format!(
                        "the key of {user} has CHANGED and nothing was sent.\n  \
                         pinned:    {pinned}\n  directory: {now}\n\
                         This is expected if {user} ran rotate-key; otherwise the relay may be \
                         lying. Check the new fingerprint with {user} out of band, then run \
                         `chat-cli trust {user}`."
                    ),
                );
                e.key_change = Some(KeyChange {
                    user: user.to_string(),
                    pinned,
                    current: now,
                });
                Err(e)
            }
        }
    }

    /// Current status, for `chat-cli status`.
    pub(crate) fn status(&self) -> Result<StatusInfo, IpcError> {
        let conn = self.conn();
        let (locked, has_key, fingerprint) = match &*lock(&self.keys) {
            Keys::Missing => (false, false, None),
            Keys::Locked(_) => (true, true, None),
            Keys::Ready(k) => (
                false,
                true,
                Some(k.current.public_key().fingerprint().to_string()),
            ),
        };
        let flags = lock(&self.flags);
        let connection = match (&self.config.relay, &conn.client, conn.logged_in) {
            (None, _, _) => ConnectionState::NoRelay,
            (_, None, _) => ConnectionState::Disconnected,
            (_, Some(_), false) => ConnectionState::Connected,
            (_, Some(_), true) => ConnectionState::LoggedIn,
        };
        Ok(StatusInfo {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            home: self.config.paths.home.display().to_string(),
            socket: self.config.paths.socket.display().to_string(),
            relay: self.relay_in_use().map(|r| r.display.clone()),
            relays: match &self.config.relay {
                Some(r) if r.addrs.len() > 1 => r.addrs.iter().map(|a| a.display.clone()).collect(),
                _ => Vec::new(),
            },
            connection,
            username: self.username(),
            login_needed: flags.login_needed,
            locked,
            has_key,
            fingerprint,
            unread: self.store.unread_count()?,
            held: self
                .store
                .held_newest(securechat_common::ipc::STATUS_HELD_SHOWN)?,
            held_count: self.store.held_count()?,
            sequence_alerts: self.store.sequence_alerts()?,
            rejected: self.store.rejected_list()?,
            last_error: flags.last_error.as_ref().map(|(text, _)| text.clone()),
            last_error_ms: flags.last_error.as_ref().map(|(_, at)| *at),
            retry: match (&conn.client, &flags.retry) {
                (None, Some((reason, at))) => Some(RetryInfo {
                    reason: reason.clone(),
                    in_ms: at
                        .saturating_duration_since(std::time::Instant::now())
                        .as_millis() as u64,
                }),
                _ => None,
            },
            interrupted_sends: lock(&self.interrupted_sends).iter().cloned().collect(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use securechat_common::KeySize;

    #[test]
    fn unlocking_a_first_format_key_rewrites_every_file_and_makes_the_inbox_key() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = securechat_client::Paths::in_home(tmp.path().to_path_buf());
        let key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
        std::fs::write(paths.identity_key(), keystore::v1_file(&key, "old pass")).unwrap();
        let store = Store::open(&paths.database()).unwrap();
        let Loaded::Locked(locked) = keystore::load_identity(&paths.identity_key()).unwrap() else {
            panic!("encrypted")
        };
        assert!(matches!(
            unlock_keys(&paths, &store, &locked, "wrong"),
            Err(KeyStoreError::WrongPassphrase)
        ));
        let keys = unlock_keys(&paths, &store, &locked, "old pass").unwrap();
        assert_eq!(keys.current.public_key(), key.public_key());
        assert!(!keys.sealer.as_ref().unwrap().is_outdated());
        for file in [paths.identity_key(), paths.inbox_key()] {
            let data = std::fs::read(&file).unwrap();
            assert!(data.starts_with(b"SCKEY2"), "{}", file.display());
        }
        // Both open again with the same passphrase, to the same keys.
        let Loaded::Locked(again) = keystore::load_identity(&paths.identity_key()).unwrap() else {
            panic!("still encrypted")
        };
        let keys2 = unlock_keys(&paths, &store, &again, "old pass").unwrap();
        assert_eq!(keys2.current.public_key(), key.public_key());
        assert_eq!(keys2.inbox.as_bytes(), keys.inbox.as_bytes());
    }
}
