//! The relays under load: one the bench starts itself (embedded defaults in
//! a temporary directory, limits raised so that only speed is measured), or
//! relays already running, given with `--relay`.
//!
//! Simulated users register through the real protocol, so the bench needs
//! the verification codes the relay mails: it reads them from the relay's
//! outbox folder (`<data-dir>/outbox/`, where a relay without `--smtp-url`
//! writes its mail).

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use securechat_client::relay::{
    any_local_for, client_endpoint, parse_fingerprint, RelayClient, ServerTrust, PINNED_SERVER_NAME,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Limits of the relay the bench starts: high enough that none of them
/// refuses the load (the figures are about speed, not about the limits,
/// which have their own tests).
const OWN_RELAY_FLAGS: &[&str] = &[
    "--status-listen",
    "off",
    "--log-level",
    "warn",
    "--quota-messages",
    "100000000",
    "--quota-bytes",
    "1099511627776",
    "--sender-share-percent",
    "100",
    "--sends-per-minute",
    "1000000000",
    "--attempts-per-minute",
    "1000000000",
    "--max-connections",
    "1000000",
    "--max-connections-per-source",
    "1000000",
    "--argon2-queue",
    "100000",
    "--unauthenticated-timeout",
    "10m",
];

/// Where the relays are and how to trust them.
pub struct Target {
    /// The relays' QUIC addresses; connections go round-robin.
    pub addrs: Vec<SocketAddr>,
    fingerprint: [u8; 32],
    outbox: Outbox,
    /// The relay process the bench started, if it did.
    own: Option<OwnRelay>,
    /// A relay process to read the resident memory of.
    pid: Option<u32>,
    /// Client endpoints (UDP sockets) shared by the connections, made on
    /// first use: one per connection would cost the load generator a
    /// socket, buffers and a driver task per session, which at 10 000
    /// sessions starved it long before the relay.
    /// By address family: IPv4, IPv6.
    endpoints: Mutex<[Vec<quinn::Endpoint>; 2]>,
}

/// How many client endpoints the connections are spread over, so more than
/// one task reads the load generator's UDP traffic.
const CLIENT_ENDPOINTS: usize = 4;

struct OwnRelay {
    child: Child,
    // Kept for the relay's lifetime: its data directory.
    _dir: tempfile::TempDir,
}

impl Target {
    /// Start a relay with `relay_bin` (or the `relay` next to this program,
    /// or on PATH) in a temporary directory.
    pub async fn start_own(relay_bin: Option<&Path>) -> anyhow::Result<Self> {
        let bin = match relay_bin {
            Some(b) => b.to_path_buf(),
            None => find_relay()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("securechat-bench.")
            .tempdir()
            .context("making a temporary directory for the relay")?;
        let log = std::fs::File::create(dir.path().join("relay.log"))?;
        let mut child = Command::new(&bin)
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0"])
            .args(OWN_RELAY_FLAGS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut fingerprint) = (None, None);
        let read = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line.strip_prefix("relay: listening on ") {
                    addr = Some(a.trim().parse::<SocketAddr>()?);
                } else if let Some(f) = line.strip_prefix("relay: certificate ") {
                    fingerprint = Some(parse_fingerprint(f.trim())?);
                }
                if addr.is_some() && fingerprint.is_some() {
                    return Ok(());
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .context("the relay did not start within 60 s")??;
        let (Some(addr), Some(fingerprint)) = (addr, fingerprint) else {
            bail!(
                "the relay exited before it listened; its log: {}",
                std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default()
            );
        };
        let pid = child.id();
        Ok(Self {
            addrs: vec![addr],
            fingerprint,
            outbox: Outbox::new(dir.path().join("outbox")),
            own: Some(OwnRelay { child, _dir: dir }),
            pid,
            endpoints: Mutex::default(),
        })
    }

    /// Relays that already run.
    pub fn external(
        relays: &[String],
        fingerprint: &str,
        outbox: PathBuf,
        pid: Option<u32>,
    ) -> anyhow::Result<Self> {
        let mut addrs = Vec::new();
        for relay in relays {
            let addr = relay
                .to_socket_addrs()
                .with_context(|| format!("--relay {relay}: not HOST:PORT"))?
                .next()
                .with_context(|| format!("--relay {relay}: the name has no address"))?;
            addrs.push(addr);
        }
        Ok(Self {
            addrs,
            fingerprint: parse_fingerprint(fingerprint)?,
            outbox: Outbox::new(outbox),
            own: None,
            pid,
            endpoints: Mutex::default(),
        })
    }

    /// A new connection to relay number `i` (modulo the count).
    pub async fn connect(&self, i: usize) -> anyhow::Result<RelayClient> {
        let addr = self.addrs[i % self.addrs.len()];
        let endpoint = self.endpoint(i, addr)?;
        Ok(RelayClient::connect_via(
            &endpoint,
            addr,
            PINNED_SERVER_NAME,
            ServerTrust::Fingerprint(self.fingerprint),
        )
        .await?)
    }

    /// Connection `i`'s client endpoint for reaching `peer`: one of
    /// [`CLIENT_ENDPOINTS`] per address family, each opened on first use.
    fn endpoint(&self, i: usize, peer: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let family = &mut endpoints[usize::from(peer.is_ipv6())];
        if family.len() < CLIENT_ENDPOINTS {
            let endpoint = client_endpoint(any_local_for(peer)).context("opening a UDP socket")?;
            family.push(endpoint);
        }
        Ok(family[i % family.len()].clone())
    }

    /// The verification code the relay mailed to `username` (waits for the
    /// mail for up to `within`).
    pub async fn code_for(&self, username: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(code) = self.outbox.code_for(username) {
                return Ok(code);
            }
            if Instant::now() > deadline {
                bail!(
                    "no verification mail for {username} in {} after {within:?}; give the \
                     relay's outbox with --relay-outbox (the relay must run without --smtp-url)",
                    self.outbox.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The resident memory of the relay process, when the bench knows it.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// Stop the relay the bench started (nothing for external ones).
    pub async fn stop(mut self) {
        if let Some(own) = self.own.as_mut() {
            if let Some(pid) = own.child.id() {
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
            if tokio::time::timeout(Duration::from_secs(10), own.child.wait())
                .await
                .is_err()
            {
                let _ = own.child.kill().await;
            }
        }
    }
}

/// The relay's outbox, read as mails arrive: each file once, however many
/// registrations wait (with thousands of simulated users, every waiter
/// listing and reading the folder itself made the set-up quadratic).
struct Outbox {
    dir: PathBuf,
    read: Mutex<OutboxState>,
}

#[derive(Default)]
struct OutboxState {
    /// Files already read.
    seen: HashSet<std::ffi::OsString>,
    /// Username to the code mailed to it.
    codes: HashMap<String, String>,
    last_scan: Option<Instant>,
}

/// How often the folder is listed at most.
const OUTBOX_SCAN: Duration = Duration::from_millis(20);

impl Outbox {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            read: Mutex::default(),
        }
    }

    /// The code mailed to `username`, if its mail has arrived.
    fn code_for(&self, username: &str) -> Option<String> {
        let mut state = self.read.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.codes.contains_key(username)
            && state.last_scan.is_none_or(|t| t.elapsed() >= OUTBOX_SCAN)
        {
            state.last_scan = Some(Instant::now());
            self.scan(&mut state);
        }
        state.codes.get(username).cloned()
    }

    /// Read the mails not read yet. A mail is `<time>-<username>-<suffix>.eml`
    /// (names may hold `-`, so the name is what lies between the first and
    /// the last one).
    fn scan(&self, state: &mut OutboxState) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            if state.seen.contains(&file) {
                continue;
            }
            let name = file.to_string_lossy();
            let Some(user) = name
                .strip_suffix(".eml")
                .and_then(|n| n.rsplit_once('-'))
                .and_then(|(head, _)| head.split_once('-'))
                .map(|(_, user)| user.to_string())
            else {
                continue;
            };
            // A mail still being written has no code line yet: read it again
            // on the next scan.
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if let Some(code) = text.lines().find_map(|l| {
                l.strip_prefix("Verification code: ")
                    .map(|c| c.chars().take_while(char::is_ascii_digit).collect())
            }) {
                state.codes.insert(user, code);
                state.seen.insert(file);
            }
        }
    }
}

/// The `relay` program: beside this one (a cargo build puts them together),
/// else on PATH.
fn find_relay() -> anyhow::Result<PathBuf> {
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let beside = dir.join("relay");
            if beside.is_file() {
                return Ok(beside);
            }
        }
    }
    on_path("relay").context(
        "cannot find the relay program beside securechat-bench or on PATH; build it \
         (`cargo build --release --bins`) or name it with --relay-bin",
    )
}

/// `program` in one of PATH's directories.
pub fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
