//! Test harness: the real `relay`, `agentd` and `chat-cli` binaries as
//! separate processes on loopback, each in a temporary directory, and a real
//! SMTP server (in-process, from `securechat-testkit`) that receives the
//! verification mails.
//!
//! Waits are polls with a bounded deadline, never fixed sleeps asserting
//! timing.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The TOTP time step, seconds (the relay accepts the current step ±1, each
/// step at most once per account, in increasing order).
pub const TOTP_STEP: u64 = 30;

/// Generous bound for anything that should happen "soon".
pub const WAIT: Duration = Duration::from_secs(60);

/// Directory holding the built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_chat-cli"));
    exe.parent().unwrap().to_path_buf()
}

/// Path of a built binary; fails with advice when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    path
}

/// Run chat-cli with agentd home `home`, feeding it `stdin`.
pub fn run_cli(home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(bin("chat-cli"))
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Poll `f` until it returns `Some`, or fail after [`WAIT`] with `what`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status();
}

/// Send SIGTERM and wait for the process to exit.
pub fn terminate(child: &mut Child) {
    signal(child, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running relay.
pub struct Relay {
    pub dir: PathBuf,
    smtp: std::sync::Arc<securechat_testkit::smtp::SmtpServer>,
    pub addr: String,
    pub fingerprint: String,
    /// The status page, `http://127.0.0.1:PORT/`.
    pub status_url: String,
    /// Flags added to every start (see [`Relay::start_with`]).
    extra: Vec<String>,
    child: Option<Child>,
}

impl Relay {
    /// Start a relay with its data in `dir/relay` on 127.0.0.1:0.
    pub fn start(dir: &Path) -> Self {
        let smtp = securechat_testkit::smtp::SmtpServer::start()
            .expect("a real SMTP server for the verification mails");
        Self::start_on(dir, "127.0.0.1:0", std::sync::Arc::new(smtp), Vec::new())
    }

    /// Start a relay as [`Relay::start`] does, with `extra` flags (kept
    /// for restarts), e.g. `["--retention", "2s"]`.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let smtp = securechat_testkit::smtp::SmtpServer::start()
            .expect("a real SMTP server for the verification mails");
        let extra = extra.iter().map(|s| s.to_string()).collect();
        Self::start_on(dir, "127.0.0.1:0", std::sync::Arc::new(smtp), extra)
    }

    fn start_on(
        dir: &Path,
        listen: &str,
        smtp: std::sync::Arc<securechat_testkit::smtp::SmtpServer>,
        extra: Vec<String>,
    ) -> Self {
        let data = dir.join("relay");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("relay.log"))
            .unwrap();
        let mut child = Command::new(bin("relay"))
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", listen, "--status-listen", "127.0.0.1:0"])
            .args(["--smtp-url", &smtp.url()])
            .args(
                smtp.ca_file()
                    .map(|ca| format!("--smtp-ca={}", ca.display())),
            )
            .args(["--mail-from", "securechat@example.org"])
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let (mut addr, mut fingerprint, mut status_url) = (None, None, None);
        let deadline = Instant::now() + WAIT;
        while addr.is_none() || fingerprint.is_none() || status_url.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("relay did not print its address, fingerprint and status page");
            if let Some(a) = line.strip_prefix("relay: listening on ") {
                addr = Some(a.trim().to_string());
            }
            if let Some(f) = line.strip_prefix("relay: certificate ") {
                fingerprint = Some(f.trim().to_string());
            }
            if let Some(u) = line.strip_prefix("relay: status page ") {
                status_url = Some(u.trim().to_string());
            }
        }
        Self {
            dir: dir.to_path_buf(),
            smtp,
            addr: addr.unwrap(),
            fingerprint: fingerprint.unwrap(),
            status_url: status_url.unwrap(),
            extra,
            child: Some(child),
        }
    }

    /// Stop gracefully (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Kill without warning (SIGKILL): no connection is closed, nothing
    /// is flushed.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            let _ = c.wait();
        }
    }

    /// Start again on the same address with the same data.
    pub fn restart(&mut self) {
        self.stop();
        let again = Self::start_on(&self.dir, &self.addr, self.smtp.clone(), self.extra.clone());
        assert_eq!(again.fingerprint, self.fingerprint);
        self.status_url = again.status_url.clone();
        self.child = again.into_child();
    }

    fn into_child(mut self) -> Option<Child> {
        self.child.take()
    }

    /// The relay's database file.
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("relay").join("relay.redb")
    }

    /// Put `envelope` straight into `recipient`'s queue through the relay's
    /// store API, as a message sent long ago would sit there. The relay must
    /// be stopped (redb allows one process per file).
    #[allow(dead_code)] // not every test binary uses it
    pub fn enqueue_directly(&self, recipient: &str, envelope: &securechat_common::Envelope) {
        use securechat_relay::store::{Quota, RedbStore, Store as _};
        let store = RedbStore::open(&self.db_path()).unwrap();
        let bytes = postcard::to_stdvec(envelope).unwrap();
        let quota = Quota {
            messages: 1000,
            bytes: 1 << 24,
        };
        store
            .enqueue(recipient, &envelope.id, &bytes, unix_now(), quota)
            .unwrap();
    }

    /// The verification code mailed to `email` (received by the SMTP server).
    pub fn code_for(&self, email: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(self.smtp.wait_for_code(email, WAIT))
            .unwrap_or_else(|e| panic!("verification mail to {email}: {e:#}"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One user's agentd and home directory.
pub struct Agent {
    pub name: String,
    pub home: PathBuf,
    relay_addr: String,
    relay_fp: String,
    child: Option<Child>,
    pub secret: Option<String>,
}

/// The test password of every user.
pub fn password(_name: &str) -> &'static str {
    "correct horse battery staple"
}

impl Agent {
    /// Start agentd for `name` in `dir/name`.
    pub fn start(dir: &Path, name: &str, relay: &Relay) -> Self {
        let mut agent = Self {
            name: name.to_string(),
            home: dir.join(name),
            relay_addr: relay.addr.clone(),
            relay_fp: relay.fingerprint.clone(),
            child: None,
            secret: None,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(self.home.parent().unwrap()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.with_extension("log"))
            .unwrap();
        let child = Command::new(bin("agentd"))
            .arg("--home")
            .arg(&self.home)
            .args(["--relay", &self.relay_addr])
            .args(["--relay-fingerprint", &self.relay_fp])
            .args(["--key-bits", "2048"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for(&format!("{}'s agentd to answer", self.name), || {
            self.cli(&["status"]).status.success().then_some(())
        });
    }

    /// Stop gracefully (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Kill without warning (SIGKILL).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Start again with the same home.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Run chat-cli against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, "")
    }

    /// Run chat-cli with `stdin` as its input.
    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> Output {
        run_cli(&self.home, args, stdin)
    }

    /// `chat-cli register <name> --email <name>@example.org --password-stdin`.
    pub fn register(&self) -> Output {
        let email = format!("{}@example.org", self.name);
        self.cli_stdin(
            &[
                "register",
                &self.name,
                "--email",
                &email,
                "--password-stdin",
            ],
            &format!("{}\n", password(&self.name)),
        )
    }

    /// Run chat-cli with `--json`, require success, parse stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "chat-cli {args:?} failed for {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Run chat-cli with `--json`, require failure, return the error object.
    pub fn json_err(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            !out.status.success(),
            "chat-cli {args:?} should have failed for {}",
            self.name
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap_or_else(|_| {
            panic!(
                "stderr is not JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        v["error"].clone()
    }

    /// Register, verify with the mailed code, and log in with a TOTP code.
    pub fn onboard(&mut self, relay: &Relay) {
        self.register_and_verify(relay);
        self.login(0);
    }

    /// Register and verify with the mailed code (keeps the TOTP secret), not
    /// logged in yet.
    pub fn register_and_verify(&mut self, relay: &Relay) {
        let email = format!("{}@example.org", self.name);
        let out = self.register();
        assert!(
            out.status.success(),
            "register {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let code = relay.code_for(&email);
        let verified = self.json(&["verify", &code]);
        let secret = verified["secret_base32"].as_str().unwrap().to_string();
        assert!(verified["otpauth_uri"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/"));
        self.secret = Some(secret);
    }

    /// Log in with the TOTP code of the current step plus `step_offset`.
    pub fn login(&self, step_offset: u64) {
        let code = self.totp(step_offset);
        let out = self.cli_stdin(
            &["login", &self.name, "--password-stdin", "--totp", &code],
            &format!("{}\n", password(&self.name)),
        );
        assert!(
            out.status.success(),
            "login {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The TOTP code for now plus `step_offset` 30-second steps.
    pub fn totp(&self, step_offset: u64) -> String {
        self.totp_at_step(unix_now() / TOTP_STEP + step_offset)
    }

    /// The TOTP code of 30-second step `step` (Unix seconds / 30).
    pub fn totp_at_step(&self, step: u64) -> String {
        let secret = self.secret.clone().expect("onboarded");
        let bytes = totp_rs::Secret::Encoded(secret).to_bytes().unwrap();
        let totp = totp_rs::TOTP::new_unchecked(
            totp_rs::Algorithm::SHA1,
            6,
            1,
            30,
            bytes,
            None,
            String::new(),
        );
        totp.generate(step * TOTP_STEP)
    }

    /// `chat-cli rotate-key` with a fresh full login (TOTP of the current
    /// step plus `step_offset`); returns the JSON answer.
    pub fn rotate_key(&self, step_offset: u64) -> serde_json::Value {
        let out = self.cli_stdin(
            &[
                "--json",
                "rotate-key",
                "--password-stdin",
                "--totp",
                &self.totp(step_offset),
            ],
            &format!("{}\n", password(&self.name)),
        );
        assert!(
            out.status.success(),
            "rotate-key {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The relay session token agentd stored (`session` file, second line).
    pub fn session_token(&self) -> Vec<u8> {
        let text = std::fs::read_to_string(self.home.join("session")).unwrap();
        let hex_token = text.lines().nth(1).expect("a token line");
        hex::decode(hex_token.trim()).unwrap()
    }

    /// The path of agentd's local socket.
    pub fn socket(&self) -> PathBuf {
        self.home.join("agent.sock")
    }

    /// `chat-cli online`: the users the relay says are online.
    pub fn online_users(&self) -> Vec<String> {
        let online = self.json(&["online"]);
        online["users"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|u| u.as_str().map(str::to_string))
            .collect()
    }

    /// Status as JSON.
    pub fn status(&self) -> serde_json::Value {
        self.json(&["status"])
    }

    /// Wait until agentd is connected and logged in.
    pub fn wait_logged_in(&self) {
        wait_for(&format!("{} to be logged in", self.name), || {
            let out = self.cli(&["--json", "status"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["connection"] == "logged_in").then_some(())
        });
    }

    /// Send, retrying while the relay is unreachable (bounded).
    pub fn send(&self, to: &str, text: &str) {
        wait_for(&format!("{} to send to {to}", self.name), || {
            let out = self.cli(&["--json", "send", to, text]);
            if out.status.success() {
                return Some(());
            }
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(
                err.contains("relay_unavailable"),
                "send {} -> {to} failed: {err}",
                self.name
            );
            None
        });
    }

    /// `chat-cli trust <user> <fingerprint>` with the fingerprint the
    /// directory shows now (what a user does after checking it out of band).
    pub fn trust_directory_key(&self, user: &str) -> serde_json::Value {
        // The directory answers once agentd is (back) online.
        let fp = wait_for(&format!("{}'s directory key for {user}", self.name), || {
            let info = self.json(&["fingerprint", user]);
            info["directory"].as_str().map(str::to_string)
        });
        self.json(&["trust", user, &fp])
    }

    /// Take the next sequence number this agent would use for `to`, as a
    /// message sealed by hand in a test must (agentd is restarted around it:
    /// redb allows one process per file).
    pub fn take_seq(&mut self, to: &str) -> u64 {
        self.stop();
        let seq = {
            let store =
                securechat_agentd::store::Store::open(&self.home.join("agent.redb")).unwrap();
            store.reserve_seq(to).unwrap()
        };
        self.spawn();
        seq
    }

    /// The identity key in this agent's home (plain, as tests keep it).
    pub fn identity_key(&self) -> securechat_common::IdentityKey {
        load_key(&self.home.join("identity.key"))
    }

    /// The envelope this agent would send to `to`, made by hand: sealed to
    /// `to_key`, signed with this agent's key, with the next sequence number
    /// its agentd would use (see [`Agent::take_seq`]) and `timestamp_ms`.
    pub fn seal_by_hand(
        &mut self,
        to: &str,
        to_key: &securechat_common::PublicKey,
        text: &str,
        timestamp_ms: u64,
    ) -> securechat_common::Envelope {
        use securechat_common::envelope::{seal, SealParams};
        let seq = self.take_seq(to);
        let key = self.identity_key();
        let params = SealParams {
            sender_key: &key,
            sender: &self.name,
            recipient: to,
            recipient_key: to_key,
            id: securechat_common::MessageId::random().unwrap(),
            seq,
            timestamp_ms,
        };
        seal(&params, text.as_bytes()).unwrap()
    }

    /// Wait until the inbox (all messages) holds `text`.
    pub fn wait_message(&self, from: &str, text: &str) {
        wait_for(&format!("{} to receive {text:?}", self.name), || {
            let v = self.json(&["inbox", "--all"]);
            v["messages"]
                .as_array()?
                .iter()
                .any(|m| m["from"] == from && m["text"] == text)
                .then_some(())
        });
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A relay and two onboarded users (registered, verified, logged in).
pub struct World {
    /// Holds every process's files; removed on drop.
    pub tmp: tempfile::TempDir,
    pub relay: Relay,
    pub alice: Agent,
    pub bob: Agent,
}

/// Start a relay and onboard alice and bob.
pub fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());
    let mut alice = Agent::start(tmp.path(), "alice", &relay);
    let mut bob = Agent::start(tmp.path(), "bob", &relay);
    alice.onboard(&relay);
    bob.onboard(&relay);
    World {
        tmp,
        relay,
        alice,
        bob,
    }
}

/// An unencrypted identity key file.
pub fn load_key(path: &Path) -> securechat_common::IdentityKey {
    securechat_common::IdentityKey::from_pkcs8(&std::fs::read(path).unwrap()).unwrap()
}

/// The permission bits of a path.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The `SECURECHAT_*` variables a test's own environment must not leak into
/// the binaries it starts (tests set what they mean explicitly).
const SECURECHAT_ENV: [&str; 4] = [
    "SECURECHAT_HOME",
    "SECURECHAT_SOCKET",
    "SECURECHAT_RELAY",
    "SECURECHAT_RELAY_FINGERPRINT",
];

fn apply_env(cmd: &mut Command, env: &[(&str, Option<&str>)]) {
    for var in SECURECHAT_ENV {
        cmd.env_remove(var);
    }
    for (var, value) in env {
        match value {
            Some(v) => cmd.env(var, v),
            None => cmd.env_remove(var),
        };
    }
}

/// A process a test started, killed when dropped (also when the test
/// fails half way); [`Spawned::stop`] ends it gracefully.
pub struct Spawned(pub Child);

impl Spawned {
    /// Send SIGTERM and wait for the process to exit.
    pub fn stop(&mut self) {
        terminate(&mut self.0);
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start agentd with exactly `args` (no `--home` added) and `env` changes
/// (`None` removes a variable); its stderr goes to `log`.
pub fn spawn_agentd(args: &[&str], env: &[(&str, Option<&str>)], log: &Path) -> Spawned {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(bin("agentd"));
    cmd.args(args).env("RUST_LOG", "info");
    apply_env(&mut cmd, env);
    Spawned(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Run agentd with `args` and `env` until it exits (it is expected to
/// refuse to start); bounded by [`WAIT`].
pub fn agentd_refusal(args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
    let mut cmd = Command::new(bin("agentd"));
    cmd.args(args);
    apply_env(&mut cmd, env);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agentd {args:?} kept running; it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Run chat-cli with exactly `args` (no `--home` added) and `env` changes.
pub fn cli_env(args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
    let mut cmd = Command::new(bin("chat-cli"));
    cmd.args(args);
    apply_env(&mut cmd, env);
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// Run chat-cli with a terminal (a pty from util-linux `script`) as its
/// stdin, stdout and stderr, typing `input` into it; the output of the
/// terminal (both streams, and the echo of `input`) is in `stdout`. Bounded
/// by [`WAIT`]: a chat-cli that waits for input it never gets fails the test.
pub fn run_in_terminal(home: &Path, args: &[&str], input: &str) -> Output {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = vec![quote(bin("chat-cli").to_str().unwrap()), "--home".into()];
    line.push(quote(home.to_str().unwrap()));
    line.extend(args.iter().map(|a| quote(a)));
    let mut child = Command::new("timeout")
        .arg(WAIT.as_secs().to_string())
        .args(["script", "-qec", &line.join(" "), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux `script` and coreutils `timeout`, for a terminal");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Start chat-cli with `args` against `home` without waiting for it, its
/// output piped (for tests that interrupt it).
pub fn spawn_cli(home: &Path, args: &[&str]) -> Child {
    Command::new(bin("chat-cli"))
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Press Ctrl-C: SIGINT to `child`.
pub fn interrupt(child: &Child) {
    signal(child, "-INT");
}

impl Agent {
    /// Start agentd for `name` in `dir/name`, reaching the relay at `addr`
    /// (a [`UdpProxy`] in front of it) instead of the relay's own address.
    pub fn start_via(dir: &Path, name: &str, relay: &Relay, addr: &str) -> Self {
        let mut agent = Self {
            name: name.to_string(),
            home: dir.join(name),
            relay_addr: addr.to_string(),
            relay_fp: relay.fingerprint.clone(),
            child: None,
            secret: None,
        };
        agent.spawn();
        agent
    }
}

/// A UDP forwarder between one QUIC client and the relay that can hold back
/// the client's large datagrams: requests with a big body (a `Send`) then
/// never reach the relay, while small ones (directory lookups, acks,
/// keep-alives) do, as on a link that loses large packets. QUIC resends
/// what was held once it lets them through again.
pub struct UdpProxy {
    pub addr: String,
    hold_large: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Client datagrams at least this large are held back by [`UdpProxy`]
/// (QUIC's handshake packets are 1200 bytes: hold only after it).
pub const PROXY_LARGE: usize = 1000;

impl UdpProxy {
    /// Forward 127.0.0.1:<port> to `relay` (threads live until the test ends).
    pub fn start(relay: &str) -> Self {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(relay).unwrap();
        let addr = front.local_addr().unwrap().to_string();
        let hold_large = Arc::new(AtomicBool::new(false));
        let client = Arc::new(Mutex::new(None));
        {
            let (front, back) = (front.try_clone().unwrap(), back.try_clone().unwrap());
            let (client, hold) = (client.clone(), hold_large.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    *client.lock().unwrap() = Some(from);
                    if hold.load(Ordering::SeqCst) && n >= PROXY_LARGE {
                        continue;
                    }
                    let _ = back.send(&buf[..n]);
                }
            });
        }
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf) {
                let to = *client.lock().unwrap();
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to);
                }
            }
        });
        Self { addr, hold_large }
    }

    /// Hold back (or let through again) the client's large datagrams.
    pub fn hold_large(&self, hold: bool) {
        self.hold_large
            .store(hold, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Agent {
    /// Start agentd for `name` in `dir/name` against the relay at `addr`,
    /// pinning `fingerprint` (`sha256:<hex>`): for relays started in the test
    /// process, or a deliberately wrong pin.
    pub fn start_pinned(dir: &Path, name: &str, addr: &str, fingerprint: &str) -> Self {
        let mut agent = Self {
            name: name.to_string(),
            home: dir.join(name),
            relay_addr: addr.to_string(),
            relay_fp: fingerprint.to_string(),
            child: None,
            secret: None,
        };
        agent.spawn();
        agent
    }
}

/// Start a relay that mails its codes to `smtp` (a TLS one is trusted
/// through `--smtp-ca` with its test CA).
pub fn relay_with_smtp(dir: &Path, smtp: securechat_testkit::smtp::SmtpServer) -> Relay {
    Relay::start_on(dir, "127.0.0.1:0", std::sync::Arc::new(smtp), Vec::new())
}

/// A program on a real terminal: a tmux server of its own (a private
/// socket, so tests never meet each other's or a user's tmux), one
/// 120x40 window, keys typed into it and its screen read back.
///
/// The program runs under `sh`, which prints `[exit status N]` when it ends
/// and keeps the window open, so that a test can read how it ended.
pub struct Tmux {
    socket: PathBuf,
    /// What the window runs, for failure messages.
    what: String,
}

/// How the window's shell reports the program's end.
pub const TMUX_EXIT: &str = "[exit status ";

impl Tmux {
    /// Run chat-cli with `--home home` and `args` in a new terminal; the
    /// tmux socket goes in `dir` (named after `name`). Times are shown in
    /// UTC (`TZ=UTC`). Fails, with the fix, when tmux is missing.
    pub fn chat_cli(dir: &Path, name: &str, home: &Path, args: &[&str]) -> Self {
        let version = Command::new("tmux").arg("-V").output();
        assert!(
            version.as_ref().is_ok_and(|o| o.status.success()),
            "tmux is needed to drive chat-cli on a real terminal: run scripts/test.sh, which \
             installs it, or `apt-get install tmux` ({version:?})"
        );
        let socket = dir.join(format!("tmux-{name}.sock"));
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut line = vec![quote(bin("chat-cli").to_str().unwrap()), "--home".into()];
        line.push(quote(home.to_str().unwrap()));
        line.extend(args.iter().map(|a| quote(a)));
        let script = format!(
            "{}; echo \"{TMUX_EXIT}$?]\"; exec sleep 3600",
            line.join(" ")
        );
        let mut cmd = Command::new("tmux");
        cmd.arg("-S")
            .arg(&socket)
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "120",
                "-y",
                "40",
            ])
            .args(["sh", "-c", &script]);
        apply_env(&mut cmd, &[("TZ", Some("UTC"))]);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            socket,
            what: format!("{name}'s chat-cli {args:?}"),
        }
    }

    fn tmux(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux {args:?} for {}: {}",
            self.what,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Type `text` (literally) without pressing Enter.
    pub fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-l", text]);
    }

    /// Press a key by its tmux name: `Enter`, `C-d`, `C-c`, `Up`.
    pub fn press(&self, key: &str) {
        self.tmux(&["send-keys", key]);
    }

    /// Type `line` and press Enter.
    pub fn line(&self, line: &str) {
        self.type_text(line);
        self.press("Enter");
    }

    /// The screen with its scrollback, wrapped lines joined.
    pub fn screen(&self) -> String {
        let out = self.tmux(&["capture-pane", "-p", "-J", "-S", "-"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait until the screen shows `text` (bounded by [`WAIT`]); fails with
    /// the screen.
    pub fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{} never showed {text:?}; the screen:\n{screen}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until the screen shows `text` `n` times in all.
    pub fn wait_for_count(&self, text: &str, n: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.screen();
            if screen.matches(text).count() >= n {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{} never showed {text:?} {n} times; the screen:\n{screen}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait for the program to end; its exit status.
    pub fn exit_status(&self) -> i32 {
        let screen = self.wait_for(TMUX_EXIT);
        let rest = &screen[screen.find(TMUX_EXIT).unwrap() + TMUX_EXIT.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
        let _ = std::fs::remove_file(&self.socket);
    }
}
