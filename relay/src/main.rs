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
/// `status_listen`, `smtp_url`, `smtp_ca`, `mail_from`, `cert`, `key`,
/// `retention`, `quota_messages`, `quota_bytes`, `code_ttl`, `session_ttl`,
/// `max_connections`, `max_connections_per_source`,
/// `unauthenticated_timeout`, `sender_share_percent`, `sends_per_minute`,
/// `argon2_workers`, `argon2_queue`), then the defaults shown below. A
/// "source" is one IPv4 address or one IPv6 /64.
///
/// On start the relay prints `relay: listening on ..`,
/// `relay: certificate sha256:..` and, if enabled, the status page URL on
/// stdout; logs go to stderr (filter with RUST_LOG, default `info`).
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
    /// optionally with user:password@. Default: none — mails are written as
    /// .eml files into <data-dir>/outbox/.
    #[arg(long, value_name = "URL")]
    smtp_url: Option<String>,

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
    /// Default: 30d.
    #[arg(long, value_name = "DURATION")]
    retention: Option<String>,

    /// Most messages waiting for one recipient. Default: 10000.
    #[arg(long, value_name = "N")]
    quota_messages: Option<u64>,

    /// Most envelope bytes waiting for one recipient. Default: 268435456 (256 MiB).
    #[arg(long, value_name = "N")]
    quota_bytes: Option<u64>,

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
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    sender_share_percent: Option<u8>,

    /// Messages one sender may send per minute. Default: 600.
    #[arg(long, value_name = "N")]
    sends_per_minute: Option<u32>,

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
}

/// The TOML config file; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    status_listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    smtp_url: Option<String>,
    smtp_ca: Option<PathBuf>,
    mail_from: Option<String>,
    retention: Option<String>,
    quota_messages: Option<u64>,
    quota_bytes: Option<u64>,
    code_ttl: Option<String>,
    session_ttl: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    unauthenticated_timeout: Option<String>,
    sender_share_percent: Option<u8>,
    sends_per_minute: Option<u32>,
    argon2_workers: Option<usize>,
    argon2_queue: Option<usize>,
}

fn parse_duration(what: &str, text: &str) -> anyhow::Result<Duration> {
    if let Ok(secs) = text.trim().parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text.trim())
        .with_context(|| format!("{what}: {text:?} is not a duration like 30d, 12h or 3600"))
}

/// A count that must not be zero (zero would refuse everything).
fn at_least_one<T: PartialEq + From<u8>>(what: &str, n: T) -> anyhow::Result<T> {
    if n == T::from(0) {
        bail!("{what} must be at least 1");
    }
    Ok(n)
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

fn build_config(cli: &Cli) -> anyhow::Result<Config> {
    let file = match &cli.config {
        Some(path) => load_file(path)?,
        None => FileConfig::default(),
    };
    let data_dir = match cli.data_dir.clone().or(file.data_dir) {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let mut config = Config::new(data_dir);
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
        smtp_url: cli.smtp_url.clone().or(file.smtp_url),
        smtp_ca: cli.smtp_ca.clone().or(file.smtp_ca),
        from: cli
            .mail_from
            .clone()
            .or(file.mail_from)
            .unwrap_or(MailConfig::default().from),
    };
    config.retention = match cli.retention.clone().or(file.retention) {
        Some(text) => parse_duration("retention", &text)?,
        None => DEFAULT_RETENTION,
    };
    config.quota.messages = cli
        .quota_messages
        .or(file.quota_messages)
        .unwrap_or(DEFAULT_QUOTA_MESSAGES);
    config.quota.bytes = cli
        .quota_bytes
        .or(file.quota_bytes)
        .unwrap_or(DEFAULT_QUOTA_BYTES);
    config.code_ttl = match file.code_ttl {
        Some(text) => parse_duration("code_ttl", &text)?,
        None => DEFAULT_CODE_TTL,
    };
    config.session_ttl = match file.session_ttl {
        Some(text) => parse_duration("session_ttl", &text)?,
        None => DEFAULT_SESSION_TTL,
    };
    if let Some(n) = cli.max_connections.or(file.max_connections) {
        config.max_connections = at_least_one("max_connections", n)?;
    }
    if let Some(n) = cli
        .max_connections_per_source
        .or(file.max_connections_per_source)
    {
        config.max_connections_per_source = at_least_one("max_connections_per_source", n)?;
    }
    if let Some(text) = cli
        .unauthenticated_timeout
        .clone()
        .or(file.unauthenticated_timeout)
    {
        config.unauthenticated_timeout = parse_duration("unauthenticated_timeout", &text)?;
    }
    if let Some(percent) = cli.sender_share_percent.or(file.sender_share_percent) {
        if !(1..=100).contains(&percent) {
            bail!("sender_share_percent must be 1 to 100, got {percent}");
        }
        config.sender_share_percent = percent;
    }
    if let Some(n) = cli.sends_per_minute.or(file.sends_per_minute) {
        config.sends_per_sender.max = at_least_one("sends_per_minute", n)?;
    }
    if let Some(n) = cli.argon2_workers.or(file.argon2_workers) {
        config.argon2_workers = at_least_one("argon2_workers", n)?;
    }
    if let Some(n) = cli.argon2_queue.or(file.argon2_queue) {
        config.argon2_queue = n;
    }
    Ok(config)
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
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = build_config(&cli)?;

    if let Some(Command::Fingerprint) = cli.command {
        securechat_relay::server::create_private_dir(&config.data_dir)?;
        let identity = TlsIdentity::load_or_create(&config.tls, &config.data_dir)
            .context("loading the TLS certificate")?;
        println!("sha256:{}", hex::encode(identity.fingerprint()));
        return Ok(());
    }

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
