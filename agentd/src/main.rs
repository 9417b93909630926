//! `agentd`: parses the command line and `agentd.toml`, then runs the daemon.
// The doc comments on the CLI types are `--help` text, written for a
// terminal rather than rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use securechat_agentd::config::parse_relay_list;
use securechat_agentd::{AgentConfig, ConfigFile, Paths, RelaySettings};
use securechat_client::relay::{parse_ca_pem, parse_fingerprint, ServerTrust};
use securechat_common::KeySize;

/// The securechat agent: one per user, keeps your key and your inbox.
///
/// agentd holds your private key, keeps one connection to the relay open
/// (reconnecting and resuming your session by itself), receives, verifies and
/// stores messages, and serves `chat-cli` over a local socket that only your
/// user can reach.
///
/// First start (the relay prints its address and certificate fingerprint):
///
///   agentd --relay relay.example.org:7443 --relay-fingerprint sha256:3f2a…
///
/// The relay settings are saved to <home>/agentd.toml, so later starts need no
/// flags. Then, in another terminal: `chat-cli register alice --email …`.
///
/// After the relay's certificate changed (and you checked the new one on the
/// relay host), `agentd --relay-fingerprint sha256:…` alone re-pins the saved
/// relay.
///
/// Several relays that share one state (relays started with the same
/// `--redis`), for when one goes down:
///
///   agentd --relay a.example.org:7443,b.example.org:7443 --relay-fingerprint sha256:3f2a…
///
/// agentd uses one at a time and moves on to the next when it loses it or
/// cannot reach it; your session resumes there. The one pin (or CA) applies
/// to every relay of the list, so they must present one certificate (copy it
/// with the relay's --cert/--key) or certificates from one CA (--relay-cert).
#[derive(Debug, Parser)]
#[command(name = "agentd", version, verbatim_doc_comment)]
struct Args {
    /// Home directory for keys, inbox and session [default: $XDG_DATA_HOME/securechat].
    /// When given, the socket is <home>/agent.sock unless --socket names another.
    #[arg(long, env = "SECURECHAT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    /// Relay address, HOST:PORT (UDP); or several relays that share one state
    /// (one Redis) and one certificate or CA, HOST:PORT,HOST:PORT, tried in
    /// turn: agentd moves to the next when one fails.
    #[arg(long, env = "SECURECHAT_RELAY", value_name = "HOST:PORT[,…]")]
    relay: Option<String>,

    /// SHA-256 of the relay certificate, as printed by the relay at start or
    /// by `relay fingerprint` (`sha256:` prefix, spaces and colons allowed);
    /// with several relays, every one must present this certificate.
    /// Without --relay it re-pins the relay saved in agentd.toml.
    #[arg(
        long,
        env = "SECURECHAT_RELAY_FINGERPRINT",
        value_name = "SHA256",
        conflicts_with = "relay_cert"
    )]
    relay_fingerprint: Option<String>,

    /// PEM file with the CA certificate of a relay that has a proper certificate
    /// (with several relays: the CA that issued all of theirs).
    #[arg(long, value_name = "FILE")]
    relay_cert: Option<PathBuf>,

    /// The local socket chat-cli talks to [default: $XDG_RUNTIME_DIR/securechat/agent.sock,
    /// or <home>/agent.sock]. Give chat-cli the same SECURECHAT_SOCKET.
    #[arg(long, env = "SECURECHAT_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Configuration file [default: <home>/agentd.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// RSA size of newly generated identity keys: 2048, 3072 or 4096.
    #[arg(long, value_name = "BITS")]
    key_bits: Option<usize>,

    /// Do not save the relay flags to agentd.toml.
    #[arg(long)]
    no_save_config: bool,

    /// Without a command, agentd runs the daemon.
    #[command(subcommand)]
    command: Option<Command>,
}

/// What agentd can print instead of running.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a shell completion script for bash, zsh or fish.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `agentd man | man -l -`).
    Man,
}

fn main() -> Result<()> {
    // Before any thread starts: this reads and clears LISTEN_FDS/LISTEN_PID.
    let activated = listenfd::ListenFd::from_env()
        .take_unix_listener(0)
        .context("taking the socket systemd passed (LISTEN_FDS)")?;
    let args = Args::parse();
    // Made from the definitions above, before any setting is read.
    match args.command {
        Some(Command::Completions { shell }) => {
            let mut cmd = <Args as clap::CommandFactory>::command();
            // Into memory first: the generator panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "agentd", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)?;
            return Ok(());
        }
        Some(Command::Man) => {
            let cmd = <Args as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?;
            return Ok(());
        }
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not for journald or a file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut paths = Paths::resolve(args.home.clone())?;
    if let Some(socket) = &args.socket {
        paths.socket = socket.clone();
    }
    let config_path = args.config.clone().unwrap_or_else(|| paths.config_file());
    let mut file = match std::fs::read_to_string(&config_path) {
        Ok(text) => toml::from_str::<ConfigFile>(&text)
            .with_context(|| format!("reading {}", config_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ConfigFile::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", config_path.display())),
    };
    let pin_given = args.relay_fingerprint.is_some() || args.relay_cert.is_some();
    let flags_given = args.relay.is_some() || pin_given;
    if let Some(relay) = &args.relay {
        // Saved as one string in a tidy form ("a:7443,b:7443"), which reads
        // back as the same list; a bad entry is refused before anything is
        // saved.
        let addrs = parse_relay_list(relay).map_err(anyhow::Error::msg)?;
        let tidy: Vec<&str> = addrs.iter().map(|a| a.display.as_str()).collect();
        file.relay = Some(tidy.join(","));
        file.relay_fingerprint = args.relay_fingerprint.clone();
        file.relay_cert = args.relay_cert.clone();
    } else if pin_given {
        // A new pin alone is for the relay already saved: a user re-pinning
        // after a certificate change must not be left with the old one.
        let Some(saved) = &file.relay else {
            bail!(
                "--relay-fingerprint / --relay-cert (or SECURECHAT_RELAY_FINGERPRINT) need a \
                 relay, and {} names none: add --relay HOST:PORT",
                config_path.display()
            );
        };
        let new = match (&args.relay_fingerprint, &args.relay_cert) {
            (Some(fp), _) => format!("fingerprint {fp}"),
            (None, Some(cert)) => format!("the CA in {}", cert.display()),
            (None, None) => String::new(),
        };
        tracing::info!(
            "re-pinning the saved relay {saved}: its certificate (each one's, for a list) must \
             now match {new}"
        );
        file.relay_fingerprint = args.relay_fingerprint.clone();
        file.relay_cert = args.relay_cert.clone();
    }
    if let Some(bits) = args.key_bits {
        file.key_bits = Some(bits);
    }
    let key_size = match file.key_bits {
        None => KeySize::default(),
        Some(bits) => KeySize::from_bits(bits)
            .with_context(|| format!("--key-bits {bits}: use 2048, 3072 or 4096"))?,
    };
    let relay = match &file.relay {
        None => None,
        Some(list) => {
            // Only the form is checked here: the names are looked up at each
            // connection attempt, so a relay that does not resolve yet is
            // retried rather than fatal.
            let addrs = parse_relay_list(list).map_err(|e| {
                anyhow::anyhow!("{e} (the relay setting in {})", config_path.display())
            })?;
            let trust = match (&file.relay_fingerprint, &file.relay_cert) {
                (Some(fp), _) => ServerTrust::Fingerprint(parse_fingerprint(fp)?),
                (None, Some(cert)) => {
                    let pem = std::fs::read(cert)
                        .with_context(|| format!("reading {}", cert.display()))?;
                    ServerTrust::CaCert(parse_ca_pem(&pem)?)
                }
                (None, None) => bail!(
                    "the relay's certificate must be pinned: add --relay-fingerprint SHA256 \
                     (the relay prints it at start; `relay fingerprint` shows it) or \
                     --relay-cert FILE"
                ),
            };
            Some(RelaySettings { addrs, trust })
        }
    };
    if flags_given && !args.no_save_config {
        securechat_agentd::files::ensure_private_dir(&paths.home)
            .with_context(|| format!("creating {}", paths.home.display()))?;
        let text = toml::to_string(&file).context("encoding agentd.toml")?;
        securechat_agentd::files::write_private(&config_path, text.as_bytes())
            .with_context(|| format!("writing {}", config_path.display()))?;
    }
    let config = AgentConfig {
        paths,
        relay,
        key_size,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        securechat_agentd::run_with(config, activated, shutdown_signal())
            .await
            .context("agentd failed")
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
