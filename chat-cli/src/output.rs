//! How answers look: human text, or the response as JSON with `--json`.

use std::time::{Duration, UNIX_EPOCH};

use securechat_common::ipc::{
    ConnectionState, FingerprintInfo, InboxMessage, IpcResponse, StatusInfo,
};

/// Unix milliseconds as an RFC 3339 UTC timestamp.
pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One inbox line.
pub fn message(m: &InboxMessage) -> String {
    let mut text = m.text.replace('\n', "\n    ");
    if text.is_empty() {
        text = "(empty message)".into();
    }
    format!("[{}] {}: {}", time(m.sent_ms), m.from, text)
}

/// A QR code for the terminal.
pub fn qr(data: &str) -> Option<String> {
    let code = qrcode::QrCode::new(data.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

fn status(s: &StatusInfo) -> String {
    let mut out = String::new();
    let conn = match s.connection {
        ConnectionState::NoRelay => "no relay configured",
        ConnectionState::Disconnected => "disconnected (reconnecting)",
        ConnectionState::Connected => "connected, not logged in",
        ConnectionState::LoggedIn => "connected and logged in",
        _ => "unknown",
    };
    out += &format!("agentd {}\n", s.agent_version);
    out += &format!("home:        {}\n", s.home);
    out += &format!("socket:      {}\n", s.socket);
    out += &format!("relay:       {}\n", s.relay.as_deref().unwrap_or("(none)"));
    out += &format!("connection:  {conn}\n");
    out += &format!(
        "account:     {}\n",
        s.username.as_deref().unwrap_or("(none)")
    );
    let key = match (&s.fingerprint, s.locked, s.has_key) {
        (Some(fp), _, _) => fp.clone(),
        (None, true, _) => "locked (run `chat-cli unlock`)".into(),
        _ => "(none yet; `chat-cli register` makes one)".into(),
    };
    out += &format!("key:         {key}\n");
    out += &format!("unread:      {}\n", s.unread);
    if s.login_needed {
        out += "LOGIN NEEDED: the session expired or was revoked; run `chat-cli login <user>`\n";
    }
    if let Some(e) = &s.last_error {
        out += &format!("last error:  {e}\n");
    }
    for h in &s.held {
        out += &format!("held:        {} from {}: {}\n", h.id, h.from, h.reason);
    }
    for r in &s.rejected {
        out += &format!(
            "rejected:    [{}] {} from {}: {}\n",
            time(r.at_ms),
            r.id,
            r.from,
            r.reason
        );
    }
    out
}

fn fingerprint(f: &FingerprintInfo) -> String {
    if f.own {
        return format!(
            "your key{}: {}\n",
            f.user
                .as_ref()
                .map(|u| format!(" ({u})"))
                .unwrap_or_default(),
            f.pinned.as_deref().unwrap_or("?")
        );
    }
    let user = f.user.as_deref().unwrap_or("?");
    let mut out = format!(
        "{user} pinned:    {}\n",
        f.pinned.as_deref().unwrap_or("(not pinned yet)")
    );
    out += &format!(
        "{user} directory: {}\n",
        f.directory.as_deref().unwrap_or("(relay not reachable)")
    );
    if let (Some(p), Some(d)) = (&f.pinned, &f.directory) {
        if p != d {
            out += &format!(
                "WARNING: the key changed; check it with {user}, then `chat-cli trust {user}`\n"
            );
        }
    }
    out
}

/// The human rendering of a response.
pub fn human(resp: &IpcResponse) -> String {
    match resp {
        IpcResponse::Ok => "ok\n".into(),
        IpcResponse::RegisterPending {
            username,
            expires_in_secs,
            fingerprint,
        } => format!(
            "Registration of {username} started; a code was mailed (valid {} minutes).\n\
             Your key: {fingerprint}\nNext: chat-cli verify <code>\n",
            expires_in_secs / 60
        ),
        IpcResponse::Verified {
            username,
            otpauth_uri,
            secret_base32,
        } => {
            let mut out = format!(
                "Account {username} is active. Add this TOTP secret to your authenticator app:\n\n"
            );
            if let Some(code) = qr(otpauth_uri) {
                out += &code;
                out += "\n";
            }
            out += &format!(
                "{} \nsecret: {} \n",
                otpauth_uri.as_str(),
                secret_base32.as_str()
            );
            out += &format!("Next: chat-cli login {username}\n");
            out
        }
        IpcResponse::LoggedIn { username, unread } => format!(
            "Logged in as {username}; {unread} message(s) waiting. agentd keeps the session.\n"
        ),
        IpcResponse::Status(s) => status(s),
        IpcResponse::Sent(s) => format!(
            "sent to {} (id {}){}\n",
            s.to,
            s.id,
            if s.duplicate { ", already stored" } else { "" }
        ),
        IpcResponse::Broadcast { sent, failed } => {
            let mut out = format!("sent to {} user(s)\n", sent.len());
            for s in sent {
                out += &format!("  {} (id {})\n", s.to, s.id);
            }
            for f in failed {
                out += &format!("  NOT sent to {}: {}\n", f.to, f.error.message);
            }
            out
        }
        IpcResponse::Inbox { messages } => {
            if messages.is_empty() {
                return "no new messages\n".into();
            }
            messages.iter().map(|m| message(m) + "\n").collect()
        }
        IpcResponse::Online { users } => {
            if users.is_empty() {
                "nobody online\n".into()
            } else {
                users.iter().map(|u| format!("{u}\n")).collect()
            }
        }
        IpcResponse::Fingerprint(f) => fingerprint(f),
        IpcResponse::Trusted {
            user,
            fingerprint,
            released,
        } => format!(
            "trusting {user}'s key {fingerprint}; {released} held message(s) moved to the inbox\n"
        ),
        IpcResponse::KeyRotated {
            old_fingerprint,
            new_fingerprint,
        } => format!(
            "new key published: {new_fingerprint}\n(old key {old_fingerprint} kept to read older \
             messages). Your contacts must run `chat-cli trust <you>`.\n"
        ),
        IpcResponse::Message(m) => message(m) + "\n",
        IpcResponse::Hello { agent_version, .. } => format!("agentd {agent_version}\n"),
        IpcResponse::Error(e) => format!("error: {}\n", e.message),
        other => format!("{other:?}\n"),
    }
}
