//! # securechat-agentd
//!
//! The per-user daemon: it keeps the private key, one long-lived relay
//! connection, the local inbox and the pinned keys of contacts, and serves
//! chat-cli over a local socket.
//!
//! ```text
//!  chat-cli ─JSON lines─► ipc_server ─► commands ─┐
//!                                                 ├─► Agent (keys, store, conn)
//!  relay ═QUIC═► relay_client ◄─ connection ──────┤        │
//!                   pushes ───► receive ──────────┘        └─► store (redb)
//! ```
//!
//! * [`paths`] — where the home directory and the socket are (chat-cli uses it too).
//! * [`config`] — typed configuration and the `agentd.toml` format.
//! * [`relay_client`] — the QUIC client for the relay protocol.
//! * `connection` — reconnect with backoff, resume the session.
//! * `receive` — verify, open, store, then ack pushed messages.
//! * `commands` — what each chat-cli request does.
//! * `rotation` — finishing or undoing a key rotation a crash interrupted.
//! * [`keystore`] — identity key (optionally passphrase-encrypted), old keys, session.
//! * [`store`] — the encrypted inbox, pins, seen ids, held and rejected
//!   messages, sequence numbers.
//! * `seq` — noticing messages the relay dropped, reordered or replayed.
//! * [`ipc_client`] / [`ipc_io`] — the local socket protocol's client and line I/O.
//!
//! [`run`] is the whole daemon: give it an [`AgentConfig`] and a shutdown
//! future.
#![forbid(unsafe_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinSet;

mod agent;
mod commands;
pub mod config;
mod connection;
pub mod files;
pub mod ipc_client;
pub mod ipc_io;
mod ipc_server;
pub mod keystore;
pub mod paths;
mod receive;
pub mod relay_client;
mod rotation;
mod seq;
pub mod store;

pub use config::{AgentConfig, ConfigFile, RelaySettings};
pub use paths::Paths;

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
    #[error("another agentd is already running on {0}")]
    AlreadyRunning(PathBuf),
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
    let home = &config.paths.home;
    files::ensure_private_dir(home).map_err(|e| AgentError::io(home, e))?;
    let store = store::Store::open(&config.paths.database())?;
    let listener = ipc_server::bind(&config.paths)?;
    let agent = Arc::new(agent::Agent::new(config, store)?);
    tracing::info!(
        "agentd listening on {}",
        agent.config.paths.socket.display()
    );

    let mut tasks = JoinSet::new();
    tasks.spawn(connection::run(agent.clone()));
    tasks.spawn(ipc_server::serve(listener, agent.clone()));
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        Some(r) = tasks.join_next() => tracing::error!("a task ended unexpectedly: {r:?}"),
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(client) = agent.conn().client {
        client.close("agentd shutting down").await;
    }
    Ok(())
}
