//! The relay process: binding, the accept loop, background tasks, shutdown.
//!
//! ```text
//!  Relay::bind ── opens store, TLS identity, mailer, UDP + TCP sockets
//!  Relay::run
//!    ├─ accept loop ──► JoinSet<connection task>   (one per QUIC connection)
//!    ├─ queue writer (group commit of sends and acks)
//!    ├─ sweeper (expired messages, registrations, sessions; notices to senders)
//!    ├─ mail check (connects to the SMTP server once; a warning if it fails)
//!    └─ status listener (axum) and its messages-per-second sampler
//!  shutdown future fires
//!    └─ stop accepting → close every connection ("relay shutting down")
//!       → wait (bounded) for in-flight requests and their commits
//!       → stop background tasks; the queue writer commits what is queued → return
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::accounts::{AccountError, Passwords};
use crate::admission::Admission;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::connection;
use crate::hub::Hub;
use crate::logins::LiveLogins;
use crate::mail::{MailError, Mailer};
use crate::metrics::{RateHistory, Stats};
use crate::password_pool::PasswordPool;
use crate::ratelimit::{GuessLimiter, RateLimiter};
use crate::shared::Shared;
use crate::shared_limits::SharedLimits;
use crate::store::writer::queue_writer;
use crate::store::{
    blocking, Durability, QueueLimits, RedbStore, RedisStore, Store, StoreError, WriterTask,
};
use crate::tls::{TlsError, TlsIdentity};

pub use crate::close::{SHUTDOWN_CODE, SHUTDOWN_REASON};

/// The status page's chart: one point per second ...
const RATE_INTERVAL: Duration = Duration::from_secs(1);
/// ... over the last ten minutes.
const RATE_POINTS: usize = 600;

/// Why the relay could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A setting makes no sense (see [`Config::validate`]).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The database could not be opened.
    #[error("database {path}: {source}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// The Redis of `--redis` could not be used.
    #[error("redis {url}: {source}")]
    Redis {
        /// The URL, password masked.
        url: String,
        /// What failed.
        source: StoreError,
    },
    /// The Redis of `--redis` may lose acknowledged messages.
    #[error(
        "refusing to run on Redis {url}: {why}. Fix the Redis configuration, or start the \
         relay with --redis-accept-data-loss if losing acknowledged messages is acceptable"
    )]
    RedisNotDurable {
        /// The URL, password masked.
        url: String,
        /// What is unsafe.
        why: String,
    },
    /// The TLS identity could not be loaded or made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The mail settings are unusable.
    #[error(transparent)]
    Mail(#[from] MailError),
    /// Setting up password hashing failed.
    #[error(transparent)]
    Accounts(#[from] AccountError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
}

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    status: Option<tokio::net::TcpListener>,
    writer: WriterTask,
    fingerprint: [u8; 32],
    /// Stops the presence tasks of a relay on Redis, last.
    cluster_stop: CancellationToken,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("local_addr", &self.local_addr())
            .field("fingerprint", &hex::encode(self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Open the data directory, database and TLS identity and bind the
    /// sockets. Must be called inside a tokio runtime.
    pub async fn bind(config: Config) -> Result<Self, RelayError> {
        config.validate()?;
        let data_dir = config.data_dir.clone();
        create_private_dir(&data_dir)?;
        let db_path = data_dir.join("relay.redb");
        let cluster_stop = CancellationToken::new();
        let mut cluster = None;
        let store: Arc<dyn Store> = if let Some(url) = config.redis.clone() {
            let masked = crate::config::mask_password(&url);
            let accept_loss = config.redis_accept_data_loss;
            let replicas = config.redis_replicas;
            let opened = tokio::task::spawn_blocking(move || {
                let store = RedisStore::open(&url)?.with_replicas(replicas);
                let durability = store.check_durability()?;
                Ok::<_, StoreError>((store, durability))
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))
            .and_then(|r| r);
            let (store, durability) = opened.map_err(|source| RelayError::Redis {
                url: masked.clone(),
                source,
            })?;
            if let Durability::Unsafe(why) = durability {
                if !accept_loss {
                    return Err(RelayError::RedisNotDurable { url: masked, why });
                }
                tracing::warn!(%why, "running on a Redis that may lose acknowledged messages (--redis-accept-data-loss)");
            }
            let client = store.client();
            cluster = Some((client, masked));
            Arc::new(store)
        } else {
            let path = db_path.clone();
            let opened = tokio::task::spawn_blocking(move || RedbStore::open(&path))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))
                .and_then(|r| r);
            Arc::new(opened.map_err(|source| RelayError::Store {
                path: db_path.clone(),
                source,
            })?)
        };
        let identity = TlsIdentity::load_or_create(&config.tls, &data_dir)?;
        let server_config = identity.server_config(config.idle_timeout)?;
        let mailer = Mailer::new(&config.mail, &data_dir)?;
        let (workers, queue) = (config.argon2_workers, config.argon2_queue);
        let passwords = tokio::task::spawn_blocking(move || {
            PasswordPool::new(Passwords::new()?, workers, queue)
        })
        .await
        .map_err(|e| AccountError::Hash(e.to_string()))??;
        let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
            RelayError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let status = match config.status_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RelayError::Bind { addr, source })?,
            ),
            None => None,
        };
        let limits = QueueLimits {
            quota: config.quota,
            sender_share_percent: config.sender_share_percent,
        };
        let (queue, writer) = queue_writer(Arc::clone(&store), limits);
        let (hub, cluster, shared_limits) = match cluster {
            Some((client, masked)) => {
                let limits = SharedLimits::start(&client, cluster_stop.clone())
                    .await
                    .map_err(|e| RelayError::Redis {
                        url: masked.clone(),
                        source: e.into(),
                    })?;
                let hub = Arc::new(Hub::clustered());
                let cluster = Cluster::start(client, Arc::clone(&hub), cluster_stop.clone());
                tracing::info!(redis = %masked, relay = ?cluster, "sharing state with the other relays on this Redis");
                (hub, Some(cluster), Some(limits))
            }
            None => (Arc::new(Hub::default()), None, None),
        };
        let commit_latency = writer.commit_latency();
        let shared = Arc::new(Shared {
            admission: Admission::new(config.max_connections, config.max_connections_per_source),
            source_limiter: RateLimiter::new(config.attempts_per_source),
            login_guesses: GuessLimiter::new(config.login_limits),
            register_guesses: GuessLimiter::new(config.login_limits),
            send_limiter: RateLimiter::new(config.sends_per_sender),
            shared_limits,
            config,
            store,
            queue,
            mailer,
            passwords,
            hub,
            cluster,
            logins: LiveLogins::default(),
            stats: Arc::new(Stats::default()),
            commit_latency,
            rates: RateHistory::new(RATE_INTERVAL, RATE_POINTS),
            next_conn_id: AtomicU64::new(1),
        });
        Ok(Self {
            shared,
            endpoint,
            status,
            writer,
            fingerprint: identity.fingerprint(),
            cluster_stop,
        })
    }

    /// The bound QUIC (UDP) address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// The bound status page address, if enabled.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// SHA-256 of the TLS certificate (DER), which clients pin.
    pub fn cert_fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Where verification mail is written when no SMTP server is configured.
    pub fn outbox_dir(&self) -> Option<&Path> {
        self.shared.mailer.outbox_dir()
    }

    /// The start-up lines the binary prints on stdout (scripts parse them):
    ///
    /// ```text
    /// relay: listening on 127.0.0.1:7443
    /// relay: certificate sha256:<64 lowercase hex digits>
    /// relay: status page http://127.0.0.1:7444/
    /// relay: no SMTP configured; verification mails go to <dir>
    /// ```
    pub fn banner(&self) -> Vec<String> {
        let mut lines = vec![
            format!("relay: listening on {}", self.local_addr()),
            format!(
                "relay: certificate sha256:{}",
                hex::encode(self.fingerprint)
            ),
        ];
        if let Some(addr) = self.status_addr() {
            lines.push(format!("relay: status page http://{addr}/"));
        }
        if let Some(dir) = self.outbox_dir() {
            lines.push(format!(
                "relay: no SMTP configured; verification mails go to {}",
                dir.display()
            ));
        }
        lines
    }

    /// Serve until `shutdown` resolves, then close every connection with a
    /// reason and wait (bounded by the configured grace) for in-flight work.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        let Relay {
            shared,
            endpoint,
            status,
            writer,
            cluster_stop,
            ..
        } = self;
        let grace = shared.config.shutdown_grace;
        let stop_background = CancellationToken::new();
        let mut background = JoinSet::new();
        // Stopped with the other background tasks, after the connections
        // have drained: it still commits whatever they left queued.
        background.spawn(writer.run(stop_background.clone()));
        background.spawn(sweeper(Arc::clone(&shared), stop_background.clone()));
        background.spawn(check_mail(Arc::clone(&shared)));
        if let Some(listener) = status {
            background.spawn(crate::status::sample_rates(
                Arc::clone(&shared),
                stop_background.clone(),
            ));
            let router = crate::status::router(Arc::clone(&shared));
            let stop = stop_background.clone();
            background.spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "status page stopped");
                }
            });
        }

        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = endpoint.accept() => match incoming {
                    // Full: refuse before the handshake, the cheapest answer.
                    Some(incoming) if shared.admission.relay_full() => {
                        shared.stats.refused_relay_full.fetch_add(1, Ordering::Relaxed);
                        incoming.refuse();
                    }
                    Some(incoming) => {
                        connections.spawn(connection::serve(Arc::clone(&shared), incoming));
                    }
                    None => break,
                },
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "connection task failed");
                    }
                }
            }
        }

        tracing::info!(
            connections = connections.len(),
            "shutting down: closing connections"
        );
        endpoint.set_server_config(None);
        endpoint.close(SHUTDOWN_CODE.into(), SHUTDOWN_REASON);
        let drained = tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown grace period over; abandoning remaining requests");
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
        stop_background.cancel();
        if tokio::time::timeout(grace, async {
            while background.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            background.abort_all();
            while background.join_next().await.is_some() {}
        }
        // Last: the connections' logouts are on their way to Redis.
        cluster_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// Bind and serve with `config` until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
    let relay = Relay::bind(config).await?;
    for line in relay.banner() {
        tracing::info!("{line}");
    }
    relay.run(shutdown).await
}

/// Create the data directory if it does not exist, and make it (mode 0700)
/// reachable by the relay's user only, also when it existed already: it
/// holds the TLS key, password hashes, TOTP secrets and mailed codes.
pub fn create_private_dir(dir: &Path) -> Result<(), RelayError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| RelayError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    Ok(())
}

/// Try the SMTP server once at start, so a wrong host, port, TLS setting
/// or password shows in the log now rather than at the first registration.
/// The relay serves on either way: everything but registration works, and
/// the server may come up later.
async fn check_mail(shared: Arc<Shared>) {
    match shared.mailer.check().await {
        Ok(None) => {}
        Ok(Some(server)) => tracing::info!(%server, "SMTP server answers"),
        Err(e) => tracing::warn!(
            "{e}; the relay runs, but registrations fail until the SMTP server can be \
             reached and accepts the login in its URL"
        ),
    }
}

async fn sweeper(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let retention = shared.config.retention.as_secs();
        let now = shared.config.clock.unix_now();
        match blocking(&shared.store, move |s| s.sweep(now, retention)).await {
            Ok(stats) if stats != Default::default() => {
                tracing::info!(
                    expired_messages = stats.expired_messages,
                    expiry_notices = stats.expiry_notices,
                    expired_registrations = stats.expired_registrations,
                    expired_activations = stats.expired_activations,
                    expired_sessions = stats.expired_sessions,
                    "swept expired records"
                );
                // Committed: the senders online now get their notices at once.
                for sender in &stats.notified {
                    shared.hub.notify(sender);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
    }
}
