//! # securechat-agentd
//!
//! The per-user daemon: it keeps the private key, one long-lived relay
//! connection, the local inbox and the pinned keys of contacts, and serves
//! chat-cli over a local socket.
//!
//! ```text
//!  chat-cli ─JSON lines─► ipc_server ─► commands ─┐
//!                                                 ├─► Agent (keys, store, conn)
//!  relay ═QUIC═► RelayClient ◄── connection ──────┤        │
//!                   pushes ───► receive ──────────┘        └─► store (redb)
//! ```
//!
//! * [`config`] — typed configuration and the `agentd.toml` format.
//! * `connection` — reconnect with backoff, resume the session.
//! * `receive` — verify, open, store, then ack pushed messages.
//! * `commands` — what each chat-cli request does.
//! * `presence` — telling the relay whose comings and goings to push (our
//!   contacts).
//! * `rotation` — finishing or undoing a key rotation a crash interrupted.
//! * [`keystore`] — identity key (optionally passphrase-encrypted), old keys, session.
//! * [`store`] — the encrypted inbox, pins, seen ids, held and rejected
//!   messages, sequence numbers.
//! * `seq` — noticing messages the relay dropped, reordered or replayed.
//!
//! The relay's QUIC client, the local socket's line I/O and the path rules
//! come from `securechat_client`, which chat-cli shares.
//!
//! [`run`] is the whole daemon: give it an [`AgentConfig`] and a shutdown
//! future.
#![forbid(unsafe_code)]

use std::future::Future;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinSet;

mod agent;
mod commands;
pub mod config;
mod connection;
pub mod files;
mod ipc_server;
pub mod keystore;
mod presence;
mod receipts;
mod receive;
mod rotation;
mod seq;
pub mod store;

pub use config::{AgentConfig, ConfigFile, RelaySettings};
pub use securechat_client::Paths;

/// Why agentd could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A file or directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// Which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another agentd already serves this socket.
    #[error(
        "another agentd is already running on {0}; use that one, or stop it first \
         (`systemctl --user stop securechat-agentd`, or end that process)"
    )]
    AlreadyRunning(PathBuf),
    /// Another agentd holds this home's database.
    #[error(
        "another agentd is already running with the home {home} ({}); use that one \
         (chat-cli finds it), or stop it first (`systemctl --user stop securechat-agentd`, \
         or end that process)",
        match socket {
            Some(s) => format!("it serves chat-cli on {}", s.display()),
            None => "it has not recorded its socket yet".to_string(),
        }
    )]
    HomeInUse {
        /// The home directory.
        home: PathBuf,
        /// The running agentd's socket, as it recorded it.
        socket: Option<PathBuf>,
    },
    /// The socket's directory is writable by other users.
    #[error(
        "{0} is writable by other users, who could replace agentd's socket; name a socket in a \
         directory only you can write (--socket or SECURECHAT_SOCKET)"
    )]
    SocketDirShared(PathBuf),
    /// The database could not be opened (another agentd may hold it).
    #[error("cannot open the database: {0}")]
    Store(#[from] store::StoreError),
    /// The key files could not be read.
    #[error("cannot load the identity key: {0}")]
    Keys(#[from] keystore::KeyStoreError),
}

impl AgentError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Run agentd until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_with(config, None, shutdown).await
}

/// Run agentd until `shutdown` resolves, serving chat-cli on `activated`
/// when systemd opened the socket for it (socket activation) instead of
/// binding `config.paths.socket` itself.
///
/// Once the socket listens, systemd is told that agentd is ready
/// (`Type=notify`; nothing happens when agentd is not a notify service).
pub async fn run_with(
    mut config: AgentConfig,
    activated: Option<UnixListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let home = config.paths.home.clone();
    files::ensure_private_dir(&home).map_err(|e| AgentError::io(&home, e))?;
    let store = match store::Store::open(&config.paths.database()) {
        Ok(store) => store,
        Err(store::StoreError::Db(e)) if matches!(*e, redb::Error::DatabaseAlreadyOpen) => {
            return Err(AgentError::HomeInUse {
                socket: config.paths.recorded_socket(),
                home,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .saturating_sub(store::SEEN_KEEP_MS);
    match store.prune_seen(cutoff) {
        Ok(0) => {}
        Ok(n) => tracing::info!("forgot {n} message id(s) handled too long ago to come back"),
        Err(e) => tracing::warn!("pruning old message ids: {e}"),
    }
    let listener = match activated {
        Some(l) => {
            if let Some(path) = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            {
                config.paths.socket = path;
            }
            let socket = config.paths.socket.clone();
            ipc_server::adopt(l).map_err(|e| AgentError::io(&socket, e))?
        }
        None => ipc_server::bind(&config.paths)?,
    };
    let _running = Running::record(&config.paths);
    let agent = Arc::new(agent::Agent::new(config, store)?);
    let socket = agent.config.paths.socket.display().to_string();
    tracing::info!("agentd listening on {socket}");
    let locked = agent.locked_key().is_some();
    if locked {
        tracing::warn!("{}", agent::LOCKED_HINT);
    }
    let status = if locked {
        format!("listening on {socket}; {}", agent::LOCKED_HINT)
    } else {
        format!("listening on {socket}")
    };
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);

    let mut tasks = JoinSet::new();
    tasks.spawn(connection::run(agent.clone()));
    tasks.spawn(receipts::run(agent.clone()));
    tasks.spawn(presence::run(agent.clone()));
    tasks.spawn(ipc_server::serve(listener, agent.clone()));
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        Some(r) = tasks.join_next() => tracing::error!("a task ended unexpectedly: {r:?}"),
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(client) = agent.conn().client {
        client.close("agentd shutting down").await;
    }
    Ok(())
}

/// Tell systemd about agentd's state; a no-op outside a notify service.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!("telling systemd: {e}");
    }
}

/// `agentd.socket` in the home while agentd runs: the socket's path, for
/// chat-cli's lookup and for the error a second agentd gives. Removed when
/// agentd stops (a crash leaves it; the next start replaces it).
struct Running(PathBuf);

impl Running {
    fn record(paths: &Paths) -> Self {
        let file = paths.running_file();
        let text = format!("{}\n", paths.socket.display());
        if let Err(e) = files::write_private(&file, text.as_bytes()) {
            tracing::warn!("cannot record the socket in {}: {e}", file.display());
        }
        Self(file)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.0.display());
            }
        }
    }
}
