//! agentd as a service: it keeps running and says what is wrong (a relay
//! name that does not resolve, a refused certificate, a locked key), a pin
//! alone re-pins the saved relay, chat-cli finds agentd's socket however
//! the two were started (`SECURECHAT_SOCKET`, no `XDG_RUNTIME_DIR`), a
//! second agentd names the first one's socket, and logs to a file carry no
//! colour codes. Real binaries, real relay on loopback.
//!
//! Needs the binaries built first: `cargo build --bins`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{agentd_refusal, cli_env, spawn_agentd, wait_for, Agent, Relay};

/// What agentd prints and `status` shows for a key that waits for `unlock`.
const LOCKED_HINT: &str = "the identity key is locked; run: chat-cli unlock";

/// A syntactically valid pin that matches no certificate.
fn some_pin() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `chat-cli --home HOME --json status`, parsed, if agentd answered.
fn status_of(home: &Path) -> Option<serde_json::Value> {
    let out = cli_env(&["--home", home.to_str().unwrap(), "--json", "status"], &[]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// A refusal to start: non-zero exit; returns stderr.
fn refused(out: &Output) -> String {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "agentd should have refused: {err}");
    err
}

#[test]
fn a_relay_name_that_does_not_resolve_is_retried_and_shown_in_status() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("ann");
    let log = tmp.path().join("ann.log");
    // `.invalid` never resolves (RFC 6761).
    let relay = "relay.invalid:7443";
    let pin = some_pin();
    let mut agentd = spawn_agentd(
        &[
            "--home",
            home.to_str().unwrap(),
            "--relay",
            relay,
            "--relay-fingerprint",
            &pin,
        ],
        &[],
        &log,
    );
    let s = wait_for("status to show the failed lookup", || {
        let s = status_of(&home)?;
        s["retry"]["reason"]
            .as_str()?
            .starts_with("cannot resolve")
            .then_some(s)
    });
    assert_eq!(s["connection"], "disconnected", "{s}");
    assert_eq!(s["relay"], relay, "{s}");
    let last = s["last_error"].as_str().unwrap();
    assert!(
        last.contains(&format!("cannot resolve the relay address {relay}")),
        "{s}"
    );
    assert!(s["last_error_ms"].as_u64().is_some(), "{s}");
    assert!(s["retry"]["in_ms"].as_u64().unwrap() <= 13_000, "{s}");

    // It keeps running and keeps looking the name up.
    wait_for("a second lookup", || {
        let log = std::fs::read_to_string(&log).ok()?;
        (log.matches("cannot resolve the relay address").count() >= 2).then_some(())
    });
    assert!(agentd.running(), "agentd exited");

    // As a person reads it.
    let out = cli_env(&["--home", home.to_str().unwrap(), "status"], &[]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        shown.contains(&format!("relay:       {relay} (cannot resolve: ")),
        "{shown}"
    );
    assert!(shown.contains(", retrying in "), "{shown}");
    assert!(shown.contains("last error:  ["), "{shown}");

    // Its stderr is a file here (as under journald): no colour codes.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("WARN"), "{logged}");
    assert!(
        !logged.contains("\x1b["),
        "colour codes in the log:\n{logged}"
    );
    agentd.stop();
}

#[test]
fn a_pin_without_a_relay_is_refused_or_repins_the_saved_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("bea");
    let home_arg = home.to_str().unwrap();
    let pin = some_pin();

    // No relay saved yet: refused, whether the pin comes as a flag or from
    // the environment (the service's env file), and nothing is written.
    let err = refused(&agentd_refusal(
        &["--home", home_arg, "--relay-fingerprint", &pin],
        &[],
    ));
    assert!(err.contains("add --relay HOST:PORT"), "{err}");
    let err = refused(&agentd_refusal(
        &["--home", home_arg],
        &[("SECURECHAT_RELAY_FINGERPRINT", Some(&pin))],
    ));
    assert!(err.contains("add --relay HOST:PORT"), "{err}");
    assert!(!home.join("agentd.toml").exists());

    // A relay saved with a pin that no longer matches: refused as what it
    // is, kept in status, retried only slowly.
    let relay = Relay::start(tmp.path());
    let presented = relay.fingerprint.clone();
    let hex = presented.strip_prefix("sha256:").unwrap();
    let first = if hex.starts_with('0') { "1" } else { "0" };
    let wrong = format!("sha256:{first}{}", &hex[1..]);
    let mut agentd = spawn_agentd(
        &[
            "--home",
            home_arg,
            "--relay",
            &relay.addr,
            "--relay-fingerprint",
            &wrong,
        ],
        &[],
        &tmp.path().join("bea-1.log"),
    );
    let s = wait_for("status to show the refused certificate", || {
        let s = status_of(&home)?;
        s["last_error"]
            .as_str()?
            .contains("different certificate")
            .then_some(s)
    });
    assert_eq!(s["connection"], "disconnected", "{s}");
    assert!(
        s["retry"]["reason"]
            .as_str()
            .unwrap()
            .contains("certificate refused"),
        "{s}"
    );
    assert!(s["retry"]["in_ms"].as_u64().unwrap() >= 1_000, "{s}");
    agentd.stop();

    // Re-pinned with the pin alone (from the env file, as a service is):
    // applied to the saved relay, said so, saved, and it connects.
    let log = tmp.path().join("bea-2.log");
    let mut agentd = spawn_agentd(
        &["--home", home_arg],
        &[("SECURECHAT_RELAY_FINGERPRINT", Some(&presented))],
        &log,
    );
    let s = wait_for("agentd to connect with the new pin", || {
        let s = status_of(&home)?;
        (s["connection"] == "connected").then_some(s)
    });
    assert!(s["last_error"].is_null(), "{s}");
    assert!(s["retry"].is_null(), "{s}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!("re-pinning the saved relay {}", relay.addr)),
        "{logged}"
    );
    let saved = std::fs::read_to_string(home.join("agentd.toml")).unwrap();
    assert!(saved.contains(&presented), "{saved}");
    assert!(!saved.contains(&wrong), "{saved}");
    agentd.stop();

    // Later starts need no flags.
    let mut agentd = spawn_agentd(&["--home", home_arg], &[], &tmp.path().join("bea-3.log"));
    wait_for("agentd to connect with the saved pin", || {
        (status_of(&home)?["connection"] == "connected").then_some(())
    });
    agentd.stop();
}

/// The environment of a login with `HOME` at `home` and, if given, a
/// runtime directory.
fn login_env<'a>(home: &'a str, runtime: Option<&'a str>) -> Vec<(&'a str, Option<&'a str>)> {
    vec![
        ("HOME", Some(home)),
        ("XDG_DATA_HOME", None),
        ("XDG_RUNTIME_DIR", runtime),
    ]
}

fn json_status(args: &[&str], env: &[(&str, Option<&str>)]) -> serde_json::Value {
    let mut all = vec!["--json", "status"];
    all.extend_from_slice(args);
    let out = cli_env(&all, env);
    assert!(
        out.status.success(),
        "chat-cli status: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn chat_cli_finds_agentd_however_both_were_started() {
    let tmp = tempfile::tempdir().unwrap();
    let user_home = tmp.path().join("home");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&user_home).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let (home_s, run_s) = (user_home.to_str().unwrap(), run.to_str().unwrap());
    let data = user_home.join(".local/share/securechat");
    let service_socket = run.join("securechat/agent.sock");

    // agentd as the user service starts it: a runtime directory, the
    // default home, which it creates (0700).
    let mut agentd = spawn_agentd(
        &[],
        &login_env(home_s, Some(run_s)),
        &tmp.path().join("1.log"),
    );
    let s = wait_for("agentd to answer", || {
        let out = cli_env(&["--json", "status"], &login_env(home_s, Some(run_s)));
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    });
    assert_eq!(s["socket"], service_socket.to_str().unwrap(), "{s}");
    assert_eq!(s["home"], data.to_str().unwrap(), "{s}");
    assert_eq!(common::mode(&data), 0o700);
    assert_eq!(common::mode(service_socket.parent().unwrap()), 0o700);

    // `su -`, cron, ssh: no XDG_RUNTIME_DIR, and chat-cli still finds it.
    let s = json_status(&[], &login_env(home_s, None));
    assert_eq!(s["socket"], service_socket.to_str().unwrap(), "{s}");

    // A second agentd there (it would put its socket in the home) is
    // refused with the running one's socket, not told to start one.
    let err = refused(&agentd_refusal(&[], &login_env(home_s, None)));
    assert!(err.contains("already running"), "{err}");
    assert!(
        err.contains(&format!("serves chat-cli on {}", service_socket.display())),
        "{err}"
    );
    agentd.stop();
    assert!(
        !data.join("agentd.socket").exists(),
        "the socket record outlived agentd"
    );

    // Nothing runs: chat-cli says where it looked.
    let out = cli_env(&["status"], &login_env(home_s, None));
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("agentd is not running"), "{err}");
    assert!(
        err.contains(&data.join("agent.sock").display().to_string()),
        "{err}"
    );

    // The other way round: agentd started without XDG_RUNTIME_DIR keeps its
    // socket in its home; a login shell with one finds it, also without the
    // socket record (an agentd killed before it wrote it).
    let mut agentd = spawn_agentd(&[], &login_env(home_s, None), &tmp.path().join("2.log"));
    let home_socket = data.join("agent.sock");
    wait_for("agentd without a runtime directory to answer", || {
        cli_env(&["status"], &login_env(home_s, Some(run_s)))
            .status
            .success()
            .then_some(())
    });
    std::fs::remove_file(data.join("agentd.socket")).unwrap();
    let s = json_status(&[], &login_env(home_s, Some(run_s)));
    assert_eq!(s["socket"], home_socket.to_str().unwrap(), "{s}");
    agentd.stop();

    // SECURECHAT_SOCKET names the socket for both.
    let named: PathBuf = tmp.path().join("sockets/agent.sock");
    let named_s = named.to_str().unwrap();
    let other_home = tmp.path().join("other");
    let mut agentd = spawn_agentd(
        &["--home", other_home.to_str().unwrap()],
        &[("SECURECHAT_SOCKET", Some(named_s))],
        &tmp.path().join("3.log"),
    );
    let env = [
        ("SECURECHAT_SOCKET", Some(named_s)),
        ("HOME", Some(home_s)),
        ("XDG_RUNTIME_DIR", None),
    ];
    let s = wait_for("agentd on SECURECHAT_SOCKET to answer", || {
        let out = cli_env(&["--json", "status"], &env);
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    });
    assert_eq!(s["socket"], named_s, "{s}");
    assert_eq!(s["home"], other_home.to_str().unwrap(), "{s}");
    // An explicit socket is the only place chat-cli looks.
    let missing = tmp.path().join("sockets/none.sock");
    let out = cli_env(
        &["status"],
        &[("SECURECHAT_SOCKET", Some(missing.to_str().unwrap()))],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("no socket at {})", missing.display())),
        "{err}"
    );
    agentd.stop();

    // A socket directory other users may write to is refused.
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let err = refused(&agentd_refusal(
        &["--home", other_home.to_str().unwrap()],
        &[(
            "SECURECHAT_SOCKET",
            Some(shared.join("a.sock").to_str().unwrap()),
        )],
    ));
    assert!(err.contains("writable by other users"), "{err}");
    assert_eq!(
        common::mode(&shared),
        0o777,
        "agentd changed a directory it does not own"
    );

    // XDG_DATA_HOME moves the default home; agentd creates it (0700), and
    // chat-cli with the same environment finds it.
    let xdg_data = tmp.path().join("xdg-data");
    let env = [
        ("HOME", Some(home_s)),
        ("XDG_DATA_HOME", Some(xdg_data.to_str().unwrap())),
        ("XDG_RUNTIME_DIR", Some(run_s)),
    ];
    let mut agentd = spawn_agentd(&[], &env, &tmp.path().join("4.log"));
    let s = wait_for("agentd in XDG_DATA_HOME to answer", || {
        let out = cli_env(&["--json", "status"], &env);
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    });
    let home = xdg_data.join("securechat");
    assert_eq!(s["home"], home.to_str().unwrap(), "{s}");
    assert_eq!(common::mode(&home), 0o700);
    agentd.stop();
}

#[test]
fn status_forgets_errors_after_reconnecting_and_a_locked_key_says_to_unlock() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(tmp.path());
    let mut alice = Agent::start(tmp.path(), "alice", &relay);
    alice.onboard(&relay);
    alice.wait_logged_in();
    assert!(alice.status()["last_error"].is_null());

    relay.stop();
    let s = wait_for("status to show the lost relay", || {
        let s = alice.status();
        (s["connection"] == "disconnected" && s["last_error"].is_string()).then_some(s)
    });
    assert!(s["retry"]["reason"].is_string(), "{s}");
    relay.restart();
    alice.wait_logged_in();
    let s = alice.status();
    assert!(
        s["last_error"].is_null(),
        "an old error is still shown: {s}"
    );
    assert!(s["last_error_ms"].is_null(), "{s}");
    assert!(s["retry"].is_null(), "{s}");
    let shown = text(&alice.cli(&["status"]).stdout);
    assert!(!shown.contains("last error"), "{shown}");

    // A passphrase-protected key after a restart: the log and status say
    // what to do.
    let out = alice.cli_stdin(&["passphrase", "--passphrase-stdin"], "open sesame\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    alice.restart();
    let log = std::fs::read_to_string(alice.home.with_extension("log")).unwrap();
    assert!(log.contains(LOCKED_HINT), "{log}");
    let shown = text(&alice.cli(&["status"]).stdout);
    assert!(shown.contains(LOCKED_HINT), "{shown}");
    assert_eq!(alice.status()["locked"], true);
    let err = alice.json_err(&["send", "alice", "while locked"]);
    assert_eq!(err["kind"], "locked", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains(LOCKED_HINT),
        "{err}"
    );
    let out = alice.cli_stdin(&["unlock", "--passphrase-stdin"], "open sesame\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    alice.wait_logged_in();
    assert!(alice.status()["last_error"].is_null());
}

/// The relay unit's hint: with `DynamicUser=` its state belongs to a uid no
/// account has, under /var/lib/private (root only). `relay fingerprint` run
/// as root reads the certificate there and changes nothing (owner, mode,
/// content), so the relay can still use it.
#[test]
fn relay_fingerprint_as_root_reads_a_dynamic_users_state_unchanged() {
    use std::os::unix::fs::MetadataExt;
    let id = std::process::Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        text(&id.stdout).trim(),
        "0",
        "this test needs root (README: run the tests as root, as CI does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("private/securechat-relay");
    let fingerprint = |dir: &Path| {
        let out = std::process::Command::new(common::bin("relay"))
            .arg("fingerprint")
            .arg("--data-dir")
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    // The relay's first start made the certificate, as its dynamic user.
    let made = fingerprint(&state);
    let dynamic_uid = 61_234;
    let mut paths = vec![state.clone()];
    for entry in walk(&state) {
        paths.push(entry);
    }
    for p in &paths {
        std::os::unix::fs::chown(p, Some(dynamic_uid), Some(dynamic_uid)).unwrap();
    }
    let snapshot = || {
        paths
            .iter()
            .map(|p| {
                let m = std::fs::metadata(p).unwrap();
                let content = if m.is_file() {
                    std::fs::read(p).unwrap()
                } else {
                    Vec::new()
                };
                (p.clone(), m.uid(), m.gid(), m.mode(), m.mtime(), content)
            })
            .collect::<Vec<_>>()
    };
    let before = snapshot();
    assert_eq!(fingerprint(&state), made);
    assert_eq!(
        snapshot(),
        before,
        "relay fingerprint changed the state directory"
    );
    assert_eq!(
        walk(&state).len() + 1,
        paths.len(),
        "relay fingerprint added files"
    );
}

/// Every file and directory below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// What the units do, without a user manager: `systemd-socket-activate`
/// (from Debian's systemd package, which `scripts/check-units.sh` installs)
/// holds the socket as `securechat-agentd.socket` does and starts agentd at
/// the first chat-cli call; agentd takes the socket over, answers that very
/// call, tells `NOTIFY_SOCKET` it is ready (`Type=notify`), and leaves the
/// socket in place when it stops, for the next call.
#[test]
fn the_first_chat_cli_call_starts_a_socket_activated_agentd_that_reports_ready() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().unwrap();
    let user_home = tmp.path().join("home");
    let run = tmp.path().join("run");
    let socket = run.join("securechat/agent.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    std::fs::create_dir_all(&user_home).unwrap();
    let (home_s, run_s) = (user_home.to_str().unwrap(), run.to_str().unwrap());
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();

    let log = std::fs::File::create(tmp.path().join("agentd.log")).unwrap();
    // It passes on only HOME, PATH, TERM and USER, and what --setenv names.
    let mut activator = common::Spawned(
        std::process::Command::new("systemd-socket-activate")
            .arg("--listen")
            .arg(&socket)
            .arg(format!("--setenv=XDG_RUNTIME_DIR={run_s}"))
            .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
            .arg(common::bin("agentd"))
            .env("HOME", home_s)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("systemd-socket-activate (Debian: apt-get install systemd)"),
    );
    wait_for("the activation socket", || socket.exists().then_some(()));
    assert!(
        !user_home.join(".local/share/securechat").exists(),
        "agentd ran before anyone called"
    );

    // The first call starts agentd and is answered by it.
    let s = json_status(&[], &login_env(home_s, Some(run_s)));
    assert_eq!(s["socket"], socket.to_str().unwrap(), "{s}");
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("agentd to tell NOTIFY_SOCKET");
    let said = text(&buf[..n]);
    assert!(said.lines().any(|l| l == "READY=1"), "{said}");
    assert!(said.contains("STATUS=listening on "), "{said}");

    // systemd-socket-activate became agentd (exec): stop it as systemd would.
    activator.stop();
    assert!(socket.exists(), "agentd removed the socket systemd owns");
    let log = std::fs::read_to_string(tmp.path().join("agentd.log")).unwrap();
    assert!(log.contains("agentd listening on"), "{log}");
    assert!(!log.contains("\x1b["), "{log}");
}
