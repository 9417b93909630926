//! The `relay` binary as an operator runs it: the SMTP URL from the
//! environment or a private file (its password never in the output), the
//! start-up check of the SMTP server, the settings summary, plain-text logs
//! when stderr is not a terminal, and the fail2ban line of a failed login
//! with its real source address.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use securechat_client::relay::{RelayClient, ServerTrust, PINNED_SERVER_NAME};
use securechat_common::protocol::ErrorCode;
use securechat_testkit::{error_code, SmtpServer, TestUser};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");
const WAIT: Duration = Duration::from_secs(20);

/// A relay process whose stdout and stderr lines arrive on channels.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
}

fn lines_of(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Running {
    /// Start `relay` on loopback ports, status page off, data in `data`.
    fn start(data: &Path, configure: impl FnOnce(&mut Command)) -> Self {
        let mut cmd = Command::new(RELAY);
        cmd.args(["--listen", "127.0.0.1:0", "--status-listen", "off"])
            .arg("--data-dir")
            .arg(data)
            .env_remove("RUST_LOG")
            .env_remove("SECURECHAT_SMTP_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
            seen: Vec::new(),
        }
    }

    /// The next stdout line.
    fn stdout_line(&self) -> String {
        self.stdout.recv_timeout(WAIT).unwrap()
    }

    /// Wait for a stderr line containing `text`; panics with what came.
    fn wait_stderr(&mut self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        if let Some(line) = self.seen.iter().find(|l| l.contains(text)) {
            return line.clone();
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no stderr line with {text:?}; got:\n{}",
            self.seen.join("\n")
        );
    }

    /// SIGTERM, wait, and return every stderr line. Call it after the
    /// first stdout line (or a line logged once the relay runs): only
    /// then does the relay handle SIGTERM rather than die of it.
    fn stop(mut self) -> Vec<String> {
        let killed = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "relay exited with {status}");
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const PASSWORD: &str = "pw-S3CRET-4711";

#[test]
fn the_smtp_url_from_the_environment_is_masked_and_an_unreachable_server_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let url = format!("smtp://relayuser:{PASSWORD}@127.0.0.1:{port}");
    let mut relay = Running::start(&dir.path().join("data"), |c| {
        c.env("SECURECHAT_SMTP_URL", &url);
    });
    assert!(relay.stdout_line().starts_with("relay: listening on "));
    let summary = relay.wait_stderr("settings: listen=");
    assert!(
        summary.contains(&format!("mail=smtp://relayuser:***@127.0.0.1:{port}")),
        "{summary}"
    );
    let warning = relay.wait_stderr("SMTP server check failed");
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(warning.contains("registrations fail"), "{warning}");
    let all = relay.stop().join("\n");
    assert!(!all.contains(PASSWORD), "the password was logged:\n{all}");
    assert!(!all.contains('\u{1b}'), "colour codes in a pipe:\n{all}");
    for key in [
        "retention=30days",
        "quota_messages=10000",
        "session_ttl=30days",
        "code_ttl=10m",
        "max_connections=10000",
        "log_level=info",
    ] {
        assert!(all.contains(key), "the summary lacks {key}:\n{all}");
    }
}

#[test]
fn the_smtp_url_from_a_private_file_is_used_and_an_open_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("smtp-url");
    let port = closed_port();
    std::fs::write(
        &file,
        format!("smtps://relayuser:{PASSWORD}@127.0.0.1:{port}\n"),
    )
    .unwrap();

    // Open to others: refused, naming the flag and the fix; nothing made.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().join("data");
    let out = fingerprint_with_url_file(&file, &data);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--smtp-url-file") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(PASSWORD), "{err}");
    assert!(!data.exists(), "a refused start made the data directory");

    // Private: used, masked.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut relay = Running::start(&data, |c| {
        c.arg("--smtp-url-file").arg(&file);
    });
    let summary = relay.wait_stderr("settings: listen=");
    assert!(
        summary.contains(&format!("mail=smtps://relayuser:***@127.0.0.1:{port}")),
        "{summary}"
    );
    assert!(relay.stdout_line().starts_with("relay: listening on "));
    relay.wait_stderr("SMTP server check failed");
    let all = relay.stop().join("\n");
    assert!(!all.contains(PASSWORD), "the password was logged:\n{all}");

    // Empty: refused.
    std::fs::write(&file, "\n").unwrap();
    let out = fingerprint_with_url_file(&file, &data);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

#[test]
fn a_password_on_the_command_line_gets_a_warning_but_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("smtp://relayuser:{PASSWORD}@127.0.0.1:{}", closed_port());
    let mut relay = Running::start(&dir.path().join("data"), |c| {
        c.args(["--smtp-url", &url]);
    });
    let warning = relay.wait_stderr("process list");
    assert!(warning.contains("SECURECHAT_SMTP_URL"), "{warning}");
    // The warning comes before the relay watches for SIGTERM; the banner after.
    assert!(relay.stdout_line().starts_with("relay: listening on "));
    let all = relay.stop().join("\n");
    assert!(!all.contains(PASSWORD), "{all}");
}

#[test]
fn a_reachable_smtp_server_is_checked_at_start_without_a_warning() {
    let smtp = SmtpServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Running::start(&dir.path().join("data"), |c| {
        c.env("SECURECHAT_SMTP_URL", smtp.url());
    });
    relay.wait_stderr("SMTP server answers");
    let all = relay.stop().join("\n");
    assert!(!all.contains("check failed"), "{all}");
}

#[tokio::test]
async fn a_failed_login_leaves_a_fail2ban_line_with_its_source_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Running::start(&dir.path().join("data"), |_| {});
    let addr: SocketAddr = relay
        .stdout_line()
        .strip_prefix("relay: listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let fingerprint = relay.stdout_line();
    let hex = fingerprint
        .strip_prefix("relay: certificate sha256:")
        .unwrap();
    let fingerprint: [u8; 32] = hex::decode(hex).unwrap().try_into().unwrap();

    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
    let client = RelayClient::connect_from(
        (source, 0).into(),
        addr,
        PINNED_SERVER_NAME,
        ServerTrust::Fingerprint(fingerprint),
    )
    .await
    .unwrap();
    let mallory = TestUser::new("mallory").unwrap();
    for name in [
        "mallory",
        "x\" source=192.0.2.1 reason=ok\nlogin failed: source=192.0.2.2",
    ] {
        let r = client
            .login(name, "a guessed password", "123456", &mallory.key)
            .await;
        assert_eq!(
            error_code(r.map(|_| securechat_common::protocol::Response::Ok)),
            Ok(ErrorCode::InvalidCredentials)
        );
    }

    let line = relay.wait_stderr("user=\"mallory\"");
    assert!(
        line.contains(" WARN ")
            && line.ends_with(
                "login failed: source=127.0.0.7 reason=bad_credentials user=\"mallory\""
            ),
        "{line}"
    );
    let forged = relay.wait_stderr("user=\"x\\\"");
    assert!(
        forged.contains(
            "login failed: source=127.0.0.7 reason=bad_credentials \
             user=\"x\\\" source=192.0.2.1 reason=ok\\nlogin failed: source=192.0.2.2\""
        ),
        "{forged}"
    );
    let all = relay.stop();
    // What fail2ban's filter (README) matches: the address right after
    // "login failed: source=", and only the real one.
    for l in all.iter().filter(|l| l.contains("login failed: ")) {
        let after = l.split("login failed: source=").nth(1).unwrap();
        assert!(after.starts_with("127.0.0.7 reason="), "{l}");
    }
    assert_eq!(
        all.iter().filter(|l| l.contains("login failed: ")).count(),
        2,
        "{all:#?}"
    );
}

/// `relay fingerprint` with `--smtp-url-file`: the settings are checked before
/// anything else, so a bad file is refused without starting a relay.
fn fingerprint_with_url_file(file: &Path, data: &Path) -> std::process::Output {
    Command::new(RELAY)
        .arg("--smtp-url-file")
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .arg("fingerprint")
        .output()
        .unwrap()
}
