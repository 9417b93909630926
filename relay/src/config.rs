//! The relay's typed configuration, with the documented defaults.
//!
//! The binary builds a [`Config`] from its command line and TOML file; the
//! library never reads files or the environment for configuration.
//! [`Config::validate`] refuses values that would make the relay useless
//! (a zero quota, a zero retention); [`Config::summary`] is the start-up
//! log of the effective settings, secrets masked.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::clock::Clock;
use crate::mail::MailConfig;
use crate::ratelimit::{Limit, LoginLimits};
use crate::store::Quota;
use crate::tls::TlsSource;

/// Default QUIC (UDP) listen address: loopback only, port 7443. Use
/// `0.0.0.0:7443` (or `[::]:7443`) to serve other machines.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7443);
/// Default status page (HTTP) address: loopback only, port 7444.
pub const DEFAULT_STATUS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7444);
/// Default queue retention: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default per-recipient quota: messages.
pub const DEFAULT_QUOTA_MESSAGES: u64 = 10_000;
/// Default per-recipient quota: bytes (256 MiB).
pub const DEFAULT_QUOTA_BYTES: u64 = 256 * 1024 * 1024;
/// Default lifetime of an emailed code: 10 minutes.
pub const DEFAULT_CODE_TTL: Duration = Duration::from_secs(600);
/// Default wrong codes allowed per registration.
pub const DEFAULT_MAX_CODE_ATTEMPTS: u32 = 5;
/// Default session lifetime: 30 days.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default cap on open QUIC connections in all.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default cap on open QUIC connections from one source (an IPv4 address or
/// an IPv6 /64): room for an office behind one NAT address.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 256;
/// Default time a connection may stay open without a successful login or
/// resume. A `Register` or `Verify` that succeeds starts the time again.
pub const DEFAULT_UNAUTHENTICATED_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `Send` requests per sender per minute.
pub const DEFAULT_SENDS_PER_MINUTE: u32 = 600;
/// Default share of a recipient's quota (messages and bytes) that one
/// sender may fill: 50 %.
pub const DEFAULT_SENDER_SHARE_PERCENT: u8 = 50;
/// Default password checks that may wait for a free argon2 worker; past it
/// the relay answers `Busy`.
pub const DEFAULT_ARGON2_QUEUE: usize = 8;

/// The longest duration any setting takes: longer is surely a typo, and
/// would overflow the relay's time arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A setting the relay refuses to start with.
#[derive(Debug, thiserror::Error)]
#[error("{flag} (`{key}` in the config file) {problem}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The command-line flag, e.g. `--retention`.
    pub flag: &'static str,
    /// The config file key, e.g. `retention`.
    pub key: &'static str,
    /// What is wrong and what to do.
    pub problem: String,
}

/// Default argon2 workers: one per core the relay may use.
pub fn default_argon2_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Everything the relay needs to run.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Directory for the database, TLS files and mail outbox.
    pub data_dir: PathBuf,
    /// QUIC (UDP) listen address.
    pub listen: SocketAddr,
    /// Status page (HTTP) listen address; `None` disables it.
    pub status_listen: Option<SocketAddr>,
    /// Where the TLS certificate comes from.
    pub tls: TlsSource,
    /// Where verification mail goes.
    pub mail: MailConfig,
    /// How long an undelivered message is kept.
    pub retention: Duration,
    /// Per-recipient queue limits.
    pub quota: Quota,
    /// The percentage (1 to 100) of a recipient's quota, in messages and in
    /// bytes, that one sender may fill.
    pub sender_share_percent: u8,
    /// How long an emailed code is valid.
    pub code_ttl: Duration,
    /// Wrong codes allowed before a registration is locked.
    pub max_code_attempts: u32,
    /// How long a session token is valid.
    pub session_ttl: Duration,
    /// How password guessing is slowed down: growing delays per (account,
    /// source) and a ceiling per account. Never applied to `Resume`.
    pub login_limits: LoginLimits,
    /// Login, register and verify attempts allowed per source (an IPv4
    /// address or an IPv6 /64) per window. Resumes are not counted: a
    /// guesser sharing the owner's address must not use up the owner's.
    pub attempts_per_source: Limit,
    /// Most QUIC connections open at once; more are refused.
    pub max_connections: usize,
    /// Most QUIC connections open at once from one source (an IPv4 address
    /// or an IPv6 /64).
    pub max_connections_per_source: usize,
    /// How long a connection may stay without a successful login or resume
    /// (a successful `Register` or `Verify` starts the time again).
    pub unauthenticated_timeout: Duration,
    /// `Send` requests allowed per sender per window.
    pub sends_per_sender: Limit,
    /// Threads that hash and check passwords (argon2id, 19 MiB each).
    pub argon2_workers: usize,
    /// Password checks that may wait for a worker; more are answered `Busy`.
    pub argon2_queue: usize,
    /// How often expired messages, registrations and sessions are swept.
    pub sweep_interval: Duration,
    /// QUIC idle timeout (clients send keep-alives well within it).
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests and commits.
    pub shutdown_grace: Duration,
    /// The relay's time; tests pass [`Clock::adjustable`] and move it
    /// instead of waiting.
    pub clock: Clock,
    /// Keep all state in this Redis (`redis://HOST:PORT`) instead of
    /// `<data-dir>/relay.redb`, shared with the other relays using it.
    pub redis: Option<String>,
    /// Run on a Redis that does not fsync every write before answering
    /// (acknowledged messages may be lost if it crashes).
    pub redis_accept_data_loss: bool,
    /// Replicas of the Redis that must confirm each batch of messages
    /// before it counts as stored (Redis `WAIT`); 0 waits for none.
    pub redis_replicas: u32,
}

impl Config {
    /// Refuse settings that make no sense: zero where zero would refuse or
    /// delete everything, a share outside 1 to 100 %, durations past
    /// [`MAX_DURATION`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let refuse = |flag: &'static str, key: &'static str, problem: &str| {
            Err(ConfigError {
                flag,
                key,
                problem: problem.to_string(),
            })
        };
        let durations = [
            (
                "--retention",
                "retention",
                self.retention,
                "messages would be deleted as soon as they are stored",
            ),
            (
                "--sweep-interval",
                "sweep_interval",
                self.sweep_interval,
                "the sweep would never pause",
            ),
            (
                "--code-ttl",
                "code_ttl",
                self.code_ttl,
                "every emailed code would have expired on arrival",
            ),
            (
                "--session-ttl",
                "session_ttl",
                self.session_ttl,
                "every session would end as it starts",
            ),
            (
                "--unauthenticated-timeout",
                "unauthenticated_timeout",
                self.unauthenticated_timeout,
                "every connection would be closed before it could log in",
            ),
        ];
        for (flag, key, value, why) in durations {
            if value.is_zero() {
                return refuse(flag, key, &format!("must be more than 0: {why}"));
            }
            if value > MAX_DURATION {
                return refuse(flag, key, "must be at most 100 years");
            }
        }
        let counts = [
            (
                "--quota-messages",
                "quota_messages",
                self.quota.messages,
                "no message could ever be queued",
            ),
            (
                "--quota-bytes",
                "quota_bytes",
                self.quota.bytes,
                "no message could ever be queued",
            ),
            (
                "--max-connections",
                "max_connections",
                self.max_connections as u64,
                "every connection would be refused",
            ),
            (
                "--max-connections-per-source",
                "max_connections_per_source",
                self.max_connections_per_source as u64,
                "every connection would be refused",
            ),
            (
                "--sends-per-minute",
                "sends_per_minute",
                u64::from(self.sends_per_sender.max),
                "nobody could send",
            ),
            (
                "--attempts-per-minute",
                "attempts_per_minute",
                u64::from(self.attempts_per_source.max),
                "nobody could log in or register",
            ),
            (
                "--argon2-workers",
                "argon2_workers",
                self.argon2_workers as u64,
                "no password could be checked",
            ),
        ];
        for (flag, key, value, why) in counts {
            if value == 0 {
                return refuse(flag, key, &format!("must be at least 1: {why}"));
            }
        }
        if !(1..=100).contains(&self.sender_share_percent) {
            return refuse(
                "--sender-share-percent",
                "sender_share_percent",
                &format!("must be 1 to 100, not {}", self.sender_share_percent),
            );
        }
        Ok(())
    }

    /// The effective settings as a few `key=value` log lines; the SMTP URL
    /// with its password masked.
    pub fn summary(&self) -> Vec<String> {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let status = self
            .status_listen
            .map_or_else(|| "off".to_string(), |a| a.to_string());
        let store = match &self.redis {
            Some(url) => format!(
                "{} redis_replicas={}",
                mask_password(url),
                self.redis_replicas
            ),
            None => "redb".to_string(),
        };
        let tls = match &self.tls {
            TlsSource::SelfSigned => "self-signed".to_string(),
            TlsSource::Files { cert, .. } => cert.display().to_string(),
        };
        vec![
            format!(
                "settings: listen={} status_listen={status} data_dir={} store={store} tls={tls} mail={} mail_from={:?}",
                self.listen,
                self.data_dir.display(),
                self.mail.describe(),
                self.mail.from,
            ),
            format!(
                "settings: retention={} sweep_interval={} quota_messages={} quota_bytes={} \
                 sender_share_percent={} code_ttl={} session_ttl={}",
                d(self.retention),
                d(self.sweep_interval),
                self.quota.messages,
                self.quota.bytes,
                self.sender_share_percent,
                d(self.code_ttl),
                d(self.session_ttl),
            ),
            format!(
                "settings: max_connections={} max_connections_per_source={} \
                 unauthenticated_timeout={} sends_per_minute={} attempts_per_minute={} argon2_workers={} \
                 argon2_queue={}",
                self.max_connections,
                self.max_connections_per_source,
                d(self.unauthenticated_timeout),
                self.sends_per_sender.max,
                self.attempts_per_source.max,
                self.argon2_workers,
                self.argon2_queue,
            ),
        ]
    }

    /// The defaults, with data kept in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: DEFAULT_LISTEN,
            status_listen: Some(DEFAULT_STATUS_LISTEN),
            tls: TlsSource::SelfSigned,
            mail: MailConfig::default(),
            retention: DEFAULT_RETENTION,
            quota: Quota {
                messages: DEFAULT_QUOTA_MESSAGES,
                bytes: DEFAULT_QUOTA_BYTES,
            },
            sender_share_percent: DEFAULT_SENDER_SHARE_PERCENT,
            code_ttl: DEFAULT_CODE_TTL,
            max_code_attempts: DEFAULT_MAX_CODE_ATTEMPTS,
            session_ttl: DEFAULT_SESSION_TTL,
            login_limits: LoginLimits::default(),
            attempts_per_source: Limit {
                max: 30,
                window: Duration::from_secs(60),
            },
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            unauthenticated_timeout: DEFAULT_UNAUTHENTICATED_TIMEOUT,
            sends_per_sender: Limit {
                max: DEFAULT_SENDS_PER_MINUTE,
                window: Duration::from_secs(60),
            },
            argon2_workers: default_argon2_workers(),
            argon2_queue: DEFAULT_ARGON2_QUEUE,
            sweep_interval: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            clock: Clock::system(),
            redis: None,
            redis_accept_data_loss: false,
            redis_replicas: 0,
        }
    }
}

/// `url` with the password of its `user:password@` part replaced by `***`.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                url.to_string()
            }
        }
        None => url.to_string(),
    }
}
