//! The `relay` binary: parse the command line and the TOML config file,
//! build a [`securechat_relay::Config`], run the library until SIGINT/SIGTERM.
// The doc comments on the CLI types are `--help` text, written for a
// terminal rather than rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use securechat_relay::config::{
    DEFAULT_CODE_TTL, DEFAULT_QUOTA_BYTES, DEFAULT_QUOTA_MESSAGES, DEFAULT_RETENTION,
    DEFAULT_SESSION_TTL,
};
use securechat_relay::mail::MailConfig;
use securechat_relay::tls::{TlsIdentity, TlsSource};
use securechat_relay::{Config, Relay};
use serde::Deserialize;

/// securechat relay: registration, MFA login, key directory and durable
/// ciphertext queues over QUIC.
///
/// Settings come from command-line flags, then the TOML file given with
/// --config (same names, with underscores: `listen`, `data_dir`,
/// `status_listen`, `smtp_url`, `smtp_url_file`, `smtp_ca`, `mail_from`,
/// `cert`, `key`, `retention`, `sweep_interval`, `quota_messages`, `quota_bytes`, `code_ttl`,
/// `session_ttl`, `max_connections`, `max_connections_per_source`,
/// `unauthenticated_timeout`, `sender_share_percent`, `sends_per_minute`, `attempts_per_minute`,
/// `argon2_workers`, `argon2_queue`, `log_level`), then the defaults shown
/// below. The SMTP URL may also come from the environment variable
/// SECURECHAT_SMTP_URL (after the flags, before the file), which keeps its
/// password out of the process list. A "source" is one IPv4 address or one
/// IPv6 /64.
///
/// On start the relay prints `relay: listening on ..`,
/// `relay: certificate sha256:..` and, if enabled, the status page URL on
/// stdout; logs go to stderr, starting with a summary of the settings
/// (secrets masked).
#[derive(Debug, Parser)]
#[command(name = "relay", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// TOML config file; flags given on the command line win over it.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    /// Directory for the database (relay.redb), TLS files (tls/) and the mail
    /// outbox (outbox/). Default: $XDG_DATA_HOME/securechat-relay, i.e.
    /// ~/.local/share/securechat-relay.
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,

    /// TLS certificate chain (PEM, leaf first). Default: a self-signed
    /// certificate made on first start in <data-dir>/tls/ (names localhost,
    /// 127.0.0.1, securechat-relay); clients pin its SHA-256.
    #[arg(long, value_name = "FILE", requires = "key", global = true)]
    cert: Option<PathBuf>,

    /// Private key for --cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "cert", global = true)]
    key: Option<PathBuf>,

    /// Keep all state in this Redis instead of <data-dir>/relay.redb:
    /// redis://HOST:PORT (redis://:PASSWORD@HOST:PORT with a password).
    /// Several relays on one Redis serve the same users: a message for a
    /// user on another relay is pushed there at once, and `online`, the
    /// status counts, used TOTP codes and send limits hold across them.
    /// Redis must run with `appendonly yes` and `appendfsync always`; the
    /// relay checks and refuses otherwise. Move an existing relay's data
    /// with `relay migrate`.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    /// Run on a Redis that does not fsync every write (appendfsync
    /// everysec or no AOF): a Redis crash or power loss then loses
    /// messages the relay had acknowledged as stored.
    #[arg(long)]
    redis_accept_data_loss: bool,

    /// With --redis: count a message as stored only once N replicas of the
    /// Redis have it too (Redis WAIT, in the same round trip); a send the
    /// replicas do not confirm within 2 s fails and the sender's agent
    /// retries. Default 0: the primary's fsync'd AOF is enough.
    #[arg(long, value_name = "N")]
    redis_replicas: Option<u32>,

    /// QUIC (UDP) address to listen on. Default: 127.0.0.1:7443 (this
    /// machine only); use 0.0.0.0:7443 or [::]:7443 to serve the network.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// HTTP address of the status page (counts only, no names), or `off`.
    /// Default: 127.0.0.1:7444.
    #[arg(long, value_name = "ADDR|off")]
    status_listen: Option<String>,

    /// SMTP server for verification mail: smtp://host:port (plain),
    /// smtp://host:587?tls=required (STARTTLS), smtps://host:465 (TLS),
    /// optionally with user:password@. A password here is visible to every
    /// user of the machine (ps): put the URL in SECURECHAT_SMTP_URL or
    /// --smtp-url-file instead. Default: none — mails are written as .eml
    /// files into <data-dir>/outbox/.
    #[arg(long, value_name = "URL", conflicts_with = "smtp_url_file")]
    smtp_url: Option<String>,

    /// Read the SMTP URL (see --smtp-url) from FILE, which must not be
    /// readable by other users (chmod 600). With systemd credentials:
    /// `LoadCredential=smtp-url:/etc/securechat/smtp-url` and
    /// `--smtp-url-file %d/smtp-url`.
    #[arg(long, value_name = "FILE")]
    smtp_url_file: Option<PathBuf>,

    /// PEM file of CA certificates to trust for the SMTP server's TLS
    /// certificate, besides the public roots (a mail server with a private
    /// CA). Needs a TLS --smtp-url (smtps:// or ?tls=required).
    #[arg(long, value_name = "FILE")]
    smtp_ca: Option<PathBuf>,

    /// From address of verification mail.
    /// Default: "securechat relay <relay@localhost>".
    #[arg(long, value_name = "ADDR")]
    mail_from: Option<String>,

    /// How long an undelivered message is kept (e.g. 30d, 12h, or seconds).
    /// Default: 30d. The sender is told when one expires.
    #[arg(long, value_name = "DURATION")]
    retention: Option<String>,

    /// How often expired messages, registrations and sessions are swept
    /// (and the senders of expired messages told). Default: 60s.
    #[arg(long, value_name = "DURATION")]
    sweep_interval: Option<String>,

    /// Most messages waiting for one recipient. Default: 10000.
    #[arg(long, value_name = "N")]
    quota_messages: Option<u64>,

    /// Most envelope bytes waiting for one recipient. Default: 268435456 (256 MiB).
    #[arg(long, value_name = "N")]
    quota_bytes: Option<u64>,

    /// How long an emailed verification code is valid. Default: 10m.
    #[arg(long, value_name = "DURATION")]
    code_ttl: Option<String>,

    /// How long a session lasts after a full login (agentd resumes it
    /// without asking). Default: 30d.
    #[arg(long, value_name = "DURATION")]
    session_ttl: Option<String>,

    /// Log level: error, warn, info, debug, trace, or a filter such as
    /// `info,securechat_relay=debug`. RUST_LOG, when set, wins over it.
    /// Default: info.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,

    /// Most QUIC connections open at once; more are refused.
    /// Default: 10000.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Most QUIC connections open at once from one source (an IPv4 address
    /// or an IPv6 /64); more are closed with a reason. Default: 256.
    #[arg(long, value_name = "N")]
    max_connections_per_source: Option<usize>,

    /// How long a connection may stay open without logging in (a successful
    /// register or verify starts the time again). Default: 60s.
    #[arg(long, value_name = "DURATION")]
    unauthenticated_timeout: Option<String>,

    /// Percentage (1-100) of a recipient's quota, in messages and in bytes,
    /// that one sender may fill. Default: 50.
    #[arg(long, value_name = "PERCENT")]
    sender_share_percent: Option<u8>,

    /// Messages one sender may send per minute. Default: 600.
    #[arg(long, value_name = "N")]
    sends_per_minute: Option<u32>,

    /// Logins, session resumes, registrations and verifications one source
    /// may attempt per minute. Default: 30. Raise it when many users share
    /// one address (a NAT) or for load tests.
    #[arg(long, value_name = "N")]
    attempts_per_minute: Option<u32>,

    /// Threads that hash and check passwords (argon2id, 19 MiB each).
    /// Default: the number of cores.
    #[arg(long, value_name = "N")]
    argon2_workers: Option<usize>,

    /// Password checks that may wait for a free worker; past that, logins
    /// and registrations are answered "relay busy, retry in a moment".
    /// Default: 8.
    #[arg(long, value_name = "N")]
    argon2_queue: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the TLS certificate's SHA-256 as `sha256:<64 hex digits>` and
    /// exit; makes the self-signed certificate first if there is none yet.
    Fingerprint,
    /// Print a shell completion script for bash, zsh or fish.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `relay man | man -l -`).
    Man,
    /// Move a relay's whole state from its redb database into Redis.
    ///
    /// Copies accounts and the key directory, pending registrations,
    /// activations, sessions, used TOTP codes and every queued message (with
    /// its position, arrival time, sender, the per-sender shares and the
    /// dedupe index) from DIR/relay.redb into the Redis at URL, in batches,
    /// printing progress and a summary. Then it checks the copy: the totals
    /// and every queue (a sample of 10000 queues past that) must read the same
    /// from both; it fails if not. relay.redb is left as it was.
    ///
    /// Stop the relay first: its database is locked while it runs. The Redis
    /// must hold no securechat data yet (keys sc:*) unless --force; nothing
    /// in Redis is deleted. It should run with `appendonly yes` and
    /// `appendfsync always` (a warning says if not; the relays refuse it).
    ///
    /// Afterwards start the relay, or several relays, with `--redis URL`
    /// and the same --data-dir (its tls/ holds the certificate clients pin,
    /// outbox/ the mail). Keep relay.redb until they run well on Redis.
    Migrate {
        /// The relay's data directory (holding relay.redb), or the .redb
        /// file itself.
        #[arg(long, value_name = "DIR")]
        from_redb: PathBuf,
        /// The Redis to fill: redis://HOST:PORT (redis://:PASSWORD@HOST:PORT
        /// with a password), as the relays will get it with --redis.
        #[arg(long, value_name = "URL")]
        to_redis: String,
        /// Write into a Redis that holds securechat data already, to repeat
        /// a migration that stopped half-way: keys of the same names are
        /// written again, none deleted.
        #[arg(long)]
        force: bool,
    },
}

/// The TOML config file; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    redis: Option<String>,
    redis_accept_data_loss: Option<bool>,
    redis_replicas: Option<u32>,
    listen: Option<SocketAddr>,
    status_listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    smtp_url: Option<String>,
    smtp_url_file: Option<PathBuf>,
    smtp_ca: Option<PathBuf>,
    mail_from: Option<String>,
    retention: Option<String>,
    sweep_interval: Option<String>,
    quota_messages: Option<u64>,
    quota_bytes: Option<u64>,
    code_ttl: Option<String>,
    session_ttl: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    unauthenticated_timeout: Option<String>,
    sender_share_percent: Option<u8>,
    sends_per_minute: Option<u32>,
    attempts_per_minute: Option<u32>,
    argon2_workers: Option<usize>,
    argon2_queue: Option<usize>,
    log_level: Option<String>,
}

/// The environment variable that may hold the SMTP URL.
const SMTP_URL_ENV: &str = "SECURECHAT_SMTP_URL";

/// Longest SMTP URL file read: a URL, not a mailbox.
const MAX_SECRET_FILE: u64 = 4096;

fn parse_duration(what: &str, text: &str) -> anyhow::Result<Duration> {
    if let Ok(secs) = text.trim().parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text.trim())
        .with_context(|| format!("{what}: {text:?} is not a duration like 30d, 12h or 3600"))
}

/// Read a secret from `path` (named `what` in errors), refusing a file
/// that other users may read or change. Its content is never echoed.
fn read_secret_file(what: &str, path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let file = std::fs::File::open(path)
        .with_context(|| format!("{what} {}: cannot open it", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("{what} {}: cannot read its mode", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{what} {}: the file is open to other users (mode {mode:04o}) but holds the \
             SMTP password; make it private with `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    if meta.len() > MAX_SECRET_FILE {
        bail!(
            "{what} {}: {} bytes is too long for an SMTP URL",
            path.display(),
            meta.len()
        );
    }
    let mut text = String::new();
    file.take(MAX_SECRET_FILE)
        .read_to_string(&mut text)
        .with_context(|| format!("{what} {}: not readable UTF-8 text", path.display()))?;
    let url = text.trim();
    if url.is_empty() {
        bail!(
            "{what} {}: the file is empty; write the SMTP URL into it",
            path.display()
        );
    }
    Ok(url.to_string())
}

/// Whether other users may read or change `path` (unknown counts as no:
/// the file was read a moment ago).
fn open_to_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// Whether an SMTP URL carries a password (`user:password@`).
fn has_password(url: &str) -> bool {
    url.split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
        .and_then(|authority| authority.rsplit_once('@'))
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// The SMTP URL from, in order: --smtp-url, --smtp-url-file, the
/// environment, the config file's `smtp_url` or `smtp_url_file`.
fn smtp_url(
    cli: &Cli,
    file: &FileConfig,
    config_path: Option<&Path>,
) -> anyhow::Result<Option<String>> {
    if let Some(url) = &cli.smtp_url {
        if has_password(url) {
            tracing::warn!(
                "--smtp-url holds a password, which every user of this machine can see in \
                 the process list; put the URL in {SMTP_URL_ENV} or --smtp-url-file instead"
            );
        }
        return Ok(Some(url.clone()));
    }
    if let Some(path) = &cli.smtp_url_file {
        return read_secret_file("--smtp-url-file", path).map(Some);
    }
    if let Some(url) = std::env::var(SMTP_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        return Ok(Some(url.trim().to_string()));
    }
    match (&file.smtp_url, &file.smtp_url_file) {
        (Some(_), Some(_)) => {
            bail!("the config file sets both smtp_url and smtp_url_file; keep one")
        }
        (Some(url), None) => {
            if has_password(url) {
                if let Some(path) = config_path {
                    if open_to_others(path) {
                        tracing::warn!(
                            "the config file {} holds the SMTP password and is open to other \
                             users; make it private with `chmod 600`",
                            path.display()
                        );
                    }
                }
            }
            Ok(Some(url.clone()))
        }
        (None, Some(path)) => read_secret_file("smtp_url_file", path).map(Some),
        (None, None) => Ok(None),
    }
}

/// The log filter: RUST_LOG if set, else --log-level / `log_level`, else
/// `info`.
fn log_filter(
    cli: &Cli,
    file: &FileConfig,
) -> anyhow::Result<(tracing_subscriber::EnvFilter, String)> {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let shown = std::env::var("RUST_LOG").unwrap_or_default();
        return Ok((filter, format!("{shown} (from RUST_LOG)")));
    }
    let level = cli
        .log_level
        .clone()
        .or(file.log_level.clone())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
        anyhow::anyhow!(
            "--log-level (`log_level` in the config file) {level:?}: {e}; use error, warn, \
             info, debug, trace, or a filter such as `info,securechat_relay=debug`"
        )
    })?;
    Ok((filter, level))
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    directories::BaseDirs::new()
        .map(|d| d.data_dir().join("securechat-relay"))
        .context("cannot find the home directory for the default data directory; pass --data-dir")
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

fn build_config(cli: &Cli, file: FileConfig) -> anyhow::Result<Config> {
    let smtp_url = smtp_url(cli, &file, cli.config.as_deref())?;
    let data_dir = match cli.data_dir.clone().or(file.data_dir) {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let mut config = Config::new(data_dir);
    config.redis = cli.redis.clone().or(file.redis);
    config.redis_accept_data_loss =
        cli.redis_accept_data_loss || file.redis_accept_data_loss.unwrap_or(false);
    config.redis_replicas = cli.redis_replicas.or(file.redis_replicas).unwrap_or(0);
    if let Some(listen) = cli.listen.or(file.listen) {
        config.listen = listen;
    }
    if let Some(status) = cli.status_listen.clone().or(file.status_listen) {
        config.status_listen = if status == "off" {
            None
        } else {
            Some(status.parse().with_context(|| {
                format!("status_listen: {status:?} is neither an ip:port address nor `off`")
            })?)
        };
    }
    match (cli.cert.clone().or(file.cert), cli.key.clone().or(file.key)) {
        (Some(cert), Some(key)) => config.tls = TlsSource::Files { cert, key },
        (None, None) => {}
        _ => bail!("cert and key must be given together"),
    }
    config.mail = MailConfig {
        smtp_url,
        smtp_ca: cli.smtp_ca.clone().or(file.smtp_ca),
        from: cli
            .mail_from
            .clone()
            .or(file.mail_from)
            .unwrap_or(MailConfig::default().from),
    };
    config.retention = match cli.retention.clone().or(file.retention) {
        Some(text) => parse_duration("--retention", &text)?,
        None => DEFAULT_RETENTION,
    };
    if let Some(text) = cli.sweep_interval.clone().or(file.sweep_interval) {
        config.sweep_interval = parse_duration("--sweep-interval", &text)?;
    }
    config.quota.messages = cli
        .quota_messages
        .or(file.quota_messages)
        .unwrap_or(DEFAULT_QUOTA_MESSAGES);
    config.quota.bytes = cli
        .quota_bytes
        .or(file.quota_bytes)
        .unwrap_or(DEFAULT_QUOTA_BYTES);
    config.code_ttl = match cli.code_ttl.clone().or(file.code_ttl) {
        Some(text) => parse_duration("--code-ttl", &text)?,
        None => DEFAULT_CODE_TTL,
    };
    config.session_ttl = match cli.session_ttl.clone().or(file.session_ttl) {
        Some(text) => parse_duration("--session-ttl", &text)?,
        None => DEFAULT_SESSION_TTL,
    };
    if let Some(n) = cli.max_connections.or(file.max_connections) {
        config.max_connections = n;
    }
    if let Some(n) = cli
        .max_connections_per_source
        .or(file.max_connections_per_source)
    {
        config.max_connections_per_source = n;
    }
    if let Some(text) = cli
        .unauthenticated_timeout
        .clone()
        .or(file.unauthenticated_timeout)
    {
        config.unauthenticated_timeout = parse_duration("--unauthenticated-timeout", &text)?;
    }
    if let Some(percent) = cli.sender_share_percent.or(file.sender_share_percent) {
        config.sender_share_percent = percent;
    }
    if let Some(n) = cli.sends_per_minute.or(file.sends_per_minute) {
        config.sends_per_sender.max = n;
    }
    if let Some(n) = cli.attempts_per_minute.or(file.attempts_per_minute) {
        config.attempts_per_source.max = n;
    }
    if let Some(n) = cli.argon2_workers.or(file.argon2_workers) {
        config.argon2_workers = n;
    }
    if let Some(n) = cli.argon2_queue.or(file.argon2_queue) {
        config.argon2_queue = n;
    }
    config.validate()?;
    Ok(config)
}

/// The database file of `relay migrate --from-redb`: DIR/relay.redb, or
/// the file itself.
fn redb_file(given: &Path) -> anyhow::Result<PathBuf> {
    let path = if given.is_dir() {
        given.join("relay.redb")
    } else {
        given.to_path_buf()
    };
    let meta = std::fs::metadata(&path).with_context(|| {
        format!(
            "no relay database at {}: give --from-redb the relay's data directory (its \
             --data-dir, which holds relay.redb) or the .redb file",
            path.display()
        )
    })?;
    // redb would make an empty file into a new, empty database.
    if meta.len() == 0 {
        bail!(
            "{} is empty, not a relay database: check --from-redb",
            path.display()
        );
    }
    Ok(path)
}

/// `relay migrate`: the work is done by
/// [`securechat_relay::store::migrate::migrate_redb_to_redis`].
async fn migrate(from: &Path, url: String, force: bool) -> anyhow::Result<()> {
    use securechat_relay::store::migrate::{migrate_redb_to_redis, Progress};
    use securechat_relay::store::{RedbStore, RedisStore, StoreError};
    let path = redb_file(from)?;
    let masked = securechat_relay::config::mask_password(&url);
    tokio::task::spawn_blocking(move || {
        let source = RedbStore::open(&path).map_err(|e| match e {
            StoreError::Db(db) if matches!(*db, redb::Error::DatabaseAlreadyOpen) => {
                anyhow::anyhow!(
                    "{} is in use by another process (a running relay?): stop the relay \
                     first, then migrate",
                    path.display()
                )
            }
            other => anyhow::Error::new(other).context(format!("opening {}", path.display())),
        })?;
        let target =
            RedisStore::open(&url).with_context(|| format!("connecting to Redis at {masked}"))?;
        println!("relay migrate: {} → {masked}", path.display());
        let summary = migrate_redb_to_redis(&source, &target, force, |p| match p {
            Progress::Step(line) => println!("  {line}"),
            Progress::Warning(line) => eprintln!("warning: {line}"),
            _ => {}
        })
        .with_context(|| format!("migrating {} to {masked}", path.display()))?;
        println!("relay migrate: done");
        for line in summary.to_string().lines() {
            println!("  {line}");
        }
        println!("next: start the relays with --redis {masked} (and the same --data-dir)");
        Ok::<(), anyhow::Error>(())
    })
    .await
    .context("the migration stopped unexpectedly")?
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed before this
/// returns, so a signal sent as soon as the start-up lines are out (before
/// the relay first polls the future) still stops the relay cleanly.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("signal received");
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Made from the definitions above, before any setting is read.
    match cli.command {
        Some(Command::Completions { shell }) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into memory first: the generator panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "relay", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)?;
            return Ok(());
        }
        Some(Command::Man) => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?;
            return Ok(());
        }
        Some(Command::Migrate {
            from_redb,
            to_redis,
            force,
        }) => return migrate(&from_redb, to_redis, force).await,
        _ => {}
    }
    let file = match &cli.config {
        Some(path) => load_file(path)?,
        None => FileConfig::default(),
    };
    let (filter, level) = log_filter(&cli, &file)?;
    // Colour codes only for a terminal: journald and log files get plain text.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .init();
    let config = build_config(&cli, file)?;

    if let Some(Command::Fingerprint) = cli.command {
        securechat_relay::server::create_private_dir(&config.data_dir)?;
        let identity = TlsIdentity::load_or_create(&config.tls, &config.data_dir)
            .context("loading the TLS certificate")?;
        println!("sha256:{}", hex::encode(identity.fingerprint()));
        return Ok(());
    }

    for line in config.summary() {
        tracing::info!("{line}");
    }
    tracing::info!("settings: log_level={level}");
    let shutdown = shutdown_signal()?;
    let relay = Relay::bind(config).await.context("starting the relay")?;
    // The banner is for whoever started us; if they stopped reading (a
    // closed pipe), the relay serves on rather than dying of it.
    let mut out = std::io::stdout().lock();
    for line in relay.banner() {
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::warn!("cannot print the start-up line {line:?}: {e}");
        }
    }
    drop(out);
    relay.run(shutdown).await.context("running the relay")?;
    Ok(())
}
