//! A real SMTP server for tests: Python's aiosmtpd with its Maildir handler.
//!
//! Debian ships it as `python3-aiosmtpd` for the system Python
//! (`/usr/bin/python3`); a `python3` on `PATH` is tried next. The process is
//! killed when the [`SmtpServer`] is dropped.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Pythons tried, in order.
const PYTHONS: [&str; 2] = ["/usr/bin/python3", "python3"];

/// A running aiosmtpd that stores every message in a Maildir.
#[derive(Debug)]
pub struct SmtpServer {
    child: Child,
    addr: SocketAddr,
    maildir: tempfile::TempDir,
    seen: Mutex<HashSet<PathBuf>>,
}

fn python_with_aiosmtpd() -> anyhow::Result<&'static str> {
    for python in PYTHONS {
        let ok = Command::new(python)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(python);
        }
    }
    bail!(
        "no Python with the aiosmtpd module (tried {PYTHONS:?}); \
         install it with `apt-get install python3-aiosmtpd`"
    )
}

impl SmtpServer {
    /// Start a server on a free loopback port and wait until it accepts.
    pub fn start() -> anyhow::Result<Self> {
        let python = python_with_aiosmtpd()?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let maildir = tempfile::tempdir()?;
        let mut child = Command::new(python)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(addr.to_string())
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir.path().join("mail"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {python} -m aiosmtpd"))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("aiosmtpd exited early: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("aiosmtpd did not start listening on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            child,
            addr,
            maildir,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// The URL to give the relay: `smtp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    fn new_dir(&self) -> PathBuf {
        self.maildir.path().join("mail").join("new")
    }

    /// Every message delivered so far, as text.
    pub fn messages(&self) -> Vec<(PathBuf, String)> {
        read_dir_sorted(&self.new_dir())
    }

    /// Wait for a not yet consumed mail to `to` and return its code (the
    /// line `Verification code: NNNNNN`).
    pub async fn wait_for_code(&self, to: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for (path, text) in self.messages() {
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if seen.contains(&path) || !text.contains(to) {
                    continue;
                }
                if let Some(code) = code_in(&text) {
                    seen.insert(path);
                    return Ok(code);
                }
            }
            if Instant::now() > deadline {
                bail!("no verification mail to {to} arrived within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The six-digit code in a mail, from its `Verification code: ` line.
pub fn code_in(mail: &str) -> Option<String> {
    mail.lines().find_map(|line| {
        let code = line.trim_end().strip_prefix("Verification code: ")?;
        (code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())).then(|| code.to_string())
    })
}

fn read_dir_sorted(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, String)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            Some((e.path(), text))
        })
        .collect();
    out.sort();
    out
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
