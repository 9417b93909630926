//! `chat-cli doctor`: what stands between the user and a working chat, one
//! check per line (`ok`, `warn` or `FAIL`), each problem with its fix.
//!
//! ```text
//! agentd       answers on its socket?            (chat-cli ──► agentd)
//! relay        agentd connected and logged in?   (agentd's status)
//! certificate  the relay presents the pinned one? (agentd's last attempt)
//! clock        ours against the relay's          (a Time request now)
//! files        home 0700, files in it 0600       (read here, same user)
//! key          unlocked?                         (agentd's status)
//! ```
//!
//! The file modes are read by chat-cli itself, so they are checked even
//! when agentd is not running. Every text that came from agentd or the relay
//! is shown through [`output::sanitize`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use securechat_client::Paths;
use securechat_common::ipc::{ConnectionState, DoctorInfo, IpcRequest, IpcResponse, StatusInfo};
use serde::Serialize;

use crate::{connect, output, status, Failure};

/// A clock further off than this gets TOTP codes refused (the relay takes
/// the current 30-second step and its neighbours only).
const CLOCK_FAIL_MS: u64 = 30_000;

/// A clock further off than this is worth fixing before it gets worse.
const CLOCK_WARN_MS: u64 = 5_000;

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    result: Outcome,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

impl Check {
    fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            check,
            result: Outcome::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(check: &'static str, detail: impl Into<String>, fix: Option<String>) -> Self {
        Self {
            check,
            result: Outcome::Warn,
            detail: detail.into(),
            fix,
        }
    }

    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            result: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Run every check, print the report, and fail when any check failed.
pub(crate) async fn run(paths: &Paths, json: bool) -> Result<(), Failure> {
    let mut checks = Vec::new();
    let mut home = paths.home.clone();
    match ask_agent(paths).await {
        Ok((socket, s, d)) => {
            checks.push(Check::ok(
                "agentd",
                format!("agentd {} answers on {socket}", s.agent_version),
            ));
            home = s.home.clone().into();
            checks.push(relay(&s, &d));
            checks.push(certificate(&s, &d));
            checks.push(clock(&d));
            checks.push(files(&home));
            checks.push(key(&s));
        }
        Err(e) => {
            // The reason, then how to start agentd when it says so.
            let text = format!("{:#}", e.error);
            let (detail, fix) = match text.split_once('\n') {
                Some((reason, how)) => (reason.to_string(), how.to_string()),
                None => (
                    text,
                    "start agentd, then run `chat-cli doctor` again".into(),
                ),
            };
            checks.push(Check::fail("agentd", detail, fix));
            let skipped = "not checked: agentd is not answering";
            for name in ["relay", "certificate", "clock"] {
                checks.push(Check::warn(name, skipped, None));
            }
            checks.push(files(&home));
            checks.push(Check::warn("key", skipped, None));
        }
    }
    let failed = checks.iter().filter(|c| c.result == Outcome::Fail).count();
    if json {
        let doc = serde_json::json!({ "response": "doctor", "ok": failed == 0, "checks": checks });
        println!("{doc}");
    } else {
        let mut out = String::new();
        for c in &checks {
            let tag = match c.result {
                Outcome::Ok => "ok  ",
                Outcome::Warn => "warn",
                Outcome::Fail => "FAIL",
            };
            out += &format!("{tag}  {:<12} {}\n", c.check, indent(&c.detail));
            if let Some(fix) = &c.fix {
                out += &format!("      {:<12} fix: {}\n", "", indent(fix));
            }
        }
        print!("{}", output::sanitize(&out));
    }
    if failed > 0 {
        let mut f = Failure::from(anyhow::anyhow!("{failed} check(s) failed"));
        if json {
            f.json = Some(serde_json::json!({ "kind": "doctor", "failed": failed }));
        }
        return Err(f);
    }
    Ok(())
}

/// Later lines of a multi-line text, lined up under the first.
fn indent(text: &str) -> String {
    text.replace('\n', &format!("\n{:19}", ""))
}

/// agentd's socket, status and doctor facts.
async fn ask_agent(paths: &Paths) -> Result<(String, StatusInfo, DoctorInfo), Failure> {
    let mut client = connect(paths).await?;
    let s = status(&mut client).await?;
    let d = match client.request(&IpcRequest::Doctor).await? {
        IpcResponse::Doctor(d) => *d,
        other => return Err(anyhow::anyhow!("unexpected answer from agentd: {other:?}").into()),
    };
    Ok((s.socket.clone(), s, d))
}

fn relay(s: &StatusInfo, d: &DoctorInfo) -> Check {
    let relay = d.relay.as_deref().unwrap_or("?");
    let user = s.username.as_deref().unwrap_or("<user>");
    match s.connection {
        ConnectionState::NoRelay => Check::fail(
            "relay",
            "agentd has no relay configured",
            "restart agentd with --relay HOST:PORT --relay-fingerprint SHA256 (the relay prints \
             both at start)",
        ),
        ConnectionState::LoggedIn => Check::ok(
            "relay",
            format!("connected to {relay}, logged in as {user}"),
        ),
        ConnectionState::Connected if s.login_needed => Check::fail(
            "relay",
            format!("connected to {relay}, but the session expired or was revoked"),
            format!("chat-cli login {user}"),
        ),
        ConnectionState::Connected if !s.has_key || s.username.is_none() => Check::warn(
            "relay",
            format!("connected to {relay}, no account yet"),
            Some("chat-cli register <user> --email <addr>, then chat-cli verify <code>".into()),
        ),
        ConnectionState::Connected => Check::warn(
            "relay",
            format!("connected to {relay}, not logged in"),
            Some(format!("chat-cli login {user}")),
        ),
        _ => {
            let why = s.last_error.as_deref().unwrap_or("no connection yet");
            let what = if s.relays.is_empty() {
                format!("the relay at {relay}")
            } else {
                format!("any of the relays {}", s.relays.join(", "))
            };
            Check::fail(
                "relay",
                format!("agentd cannot reach {what}: {why}"),
                "check that the relay runs and that UDP to its port gets through (firewall, \
                 address in agentd.toml); agentd keeps retrying by itself",
            )
        }
    }
}

fn certificate(s: &StatusInfo, d: &DoctorInfo) -> Check {
    if let Some(refused) = &d.certificate_rejected {
        return Check::fail(
            "certificate",
            "the relay presented a certificate agentd does not trust",
            refused.message.clone(),
        );
    }
    let trusted = match d.relay_trust.as_deref() {
        Some("ca") => "a certificate issued by the CA given with --relay-cert".to_string(),
        Some(pin) => format!("the pinned certificate {pin}"),
        None => return Check::warn("certificate", "no relay configured", None),
    };
    match s.connection {
        ConnectionState::Connected | ConnectionState::LoggedIn => {
            Check::ok("certificate", format!("the relay presents {trusted}"))
        }
        _ => Check::warn(
            "certificate",
            format!("not checked: not connected (agentd expects {trusted})"),
            None,
        ),
    }
}

fn clock(d: &DoctorInfo) -> Check {
    let (Some(offset), Some(rtt)) = (d.clock_offset_ms, d.clock_rtt_ms) else {
        let why = d.clock_error.as_deref().unwrap_or("unknown");
        return Check::warn("clock", format!("not compared with the relay: {why}"), None);
    };
    let off = offset.unsigned_abs();
    let how = if offset > 0 { "behind" } else { "ahead of" };
    let detail = format!(
        "this machine's clock is {}.{:03} s {how} the relay's (measured ±{} ms)",
        off / 1000,
        off % 1000,
        rtt / 2 + 1
    );
    let fix = "set the clock right, e.g. `timedatectl set-ntp true` (or fix the relay host's \
               clock if it is the one that is wrong)"
        .to_string();
    if off > CLOCK_FAIL_MS {
        Check::fail(
            "clock",
            format!("{detail}: TOTP codes made here are refused"),
            fix,
        )
    } else if off > CLOCK_WARN_MS {
        Check::warn("clock", detail, Some(fix))
    } else {
        Check::ok("clock", detail)
    }
}

/// agentd's home must be 0700 and everything in it reachable by its user
/// only (files 0600, directories 0700).
fn files(home: &Path) -> Check {
    let meta = match std::fs::metadata(home) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::warn(
                "files",
                format!("{} does not exist yet (agentd makes it)", home.display()),
                None,
            )
        }
        Err(e) => {
            return Check::fail(
                "files",
                format!("cannot read {}: {e}", home.display()),
                format!("check the ownership of {}", home.display()),
            )
        }
    };
    let mut wrong = Vec::new();
    let mut fixes = Vec::new();
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        wrong.push(format!("{} is {mode:04o}", home.display()));
        fixes.push(format!("chmod 700 {}", home.display()));
    }
    let mut seen = 0;
    let mut dirs = vec![home.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let path = entry.path();
            let mode = meta.permissions().mode() & 0o777;
            seen += 1;
            if meta.is_dir() {
                if mode & 0o077 != 0 {
                    wrong.push(format!("{} is {mode:04o}", path.display()));
                    fixes.push(format!("chmod 700 {}", path.display()));
                }
                dirs.push(path);
            } else if mode & 0o077 != 0 {
                wrong.push(format!("{} is {mode:04o}", path.display()));
                fixes.push(format!("chmod 600 {}", path.display()));
            }
        }
    }
    if wrong.is_empty() {
        Check::ok(
            "files",
            format!(
                "{} is 0700 and its {seen} entries are private to you",
                home.display()
            ),
        )
    } else {
        Check::fail(
            "files",
            format!(
                "readable by others (the private key and inbox must not be): {}",
                wrong.join(", ")
            ),
            fixes.join("; "),
        )
    }
}

fn key(s: &StatusInfo) -> Check {
    match (&s.fingerprint, s.locked, s.has_key) {
        (_, true, _) => Check::fail(
            "key",
            "the identity key is locked (passphrase-protected, not unlocked since agentd \
             started): nothing can be sent, received or resumed",
            "chat-cli unlock",
        ),
        (Some(fp), _, _) => Check::ok("key", format!("identity key unlocked: {fp}")),
        _ => Check::warn(
            "key",
            "no identity key yet",
            Some("chat-cli register <user> --email <addr>".into()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_off_by_more_than_a_totp_step_fails() {
        let at = |offset: i64| {
            clock(&DoctorInfo {
                relay: None,
                relay_trust: None,
                certificate_rejected: None,
                clock_offset_ms: Some(offset),
                clock_rtt_ms: Some(2),
                clock_error: None,
            })
            .result
        };
        assert_eq!(at(120), Outcome::Ok);
        assert_eq!(at(-7_000), Outcome::Warn);
        assert_eq!(at(45_000), Outcome::Fail);
        assert_eq!(at(-45_000), Outcome::Fail);
    }

    #[test]
    fn a_group_readable_file_in_the_home_fails_with_its_chmod() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        let key = home.join("identity.key");
        std::fs::write(&key, b"k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(files(&home).result, Outcome::Ok);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = files(&home);
        assert_eq!(c.result, Outcome::Fail);
        assert_eq!(c.fix, Some(format!("chmod 600 {}", key.display())));
    }
}
