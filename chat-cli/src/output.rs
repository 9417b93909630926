//! How answers look: human text, or the response as JSON with `--json`.
//!
//! Human text goes through [`sanitize`] on its way to the terminal (or pipe):
//! whatever another user or the relay put into a message, a name or an
//! error, it is shown, never obeyed by the terminal.

use std::fmt::Write as _;

use securechat_common::ipc::{
    ConnectionState, FingerprintInfo, InboxMessage, IpcResponse, SendState, StatusInfo,
};

use crate::when;

/// Unix milliseconds as date and time to the minute, in the zone chosen
/// for this run (see [`when`]); a time no calendar can show is said to be
/// invalid.
pub fn time(ms: u64) -> String {
    when::full(ms)
}

/// Characters that reorder or hide text without being control characters:
/// bidirectional overrides and isolates, marks, zero-width characters, and
/// line and paragraph separators.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
    )
}

/// Make untrusted text safe to print: every control character except the
/// newline (escape sequences, carriage returns, backspaces, C1 controls) and
/// every invisible formatting character is shown as an escape (`\x1b`,
/// `\r`, `\u{202e}`) instead of reaching the terminal.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('\n'),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() || is_invisible_format(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// One inbox entry: a note for messages missing before it, then
/// `[time] sender: text`, continuation lines indented. When the sender's
/// clock disagrees with the relay's, the relay's time is shown and the
/// sender's beside it.
pub fn message(m: &InboxMessage) -> String {
    crate::render::incoming(m, crate::render::Stamp::Full, "")
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
    let retry = match &s.retry {
        Some(r) => format!(" ({}, retrying in {}s)", r.reason, r.in_ms.div_ceil(1000)),
        None => String::new(),
    };
    out += &format!(
        "relay:       {}{retry}\n",
        s.relay.as_deref().unwrap_or("(none)")
    );
    if !s.relays.is_empty() {
        // The line above is the relay in use; agentd moves on in this order.
        out += &format!("relays:      {} (tried in turn)\n", s.relays.join(", "));
    }
    out += &format!("connection:  {conn}\n");
    out += &format!(
        "account:     {}\n",
        s.username.as_deref().unwrap_or("(none)")
    );
    let key = match (&s.fingerprint, s.locked, s.has_key) {
        (Some(fp), _, _) => fp.clone(),
        (None, true, _) => "the identity key is locked; run: chat-cli unlock".into(),
        _ => "(none yet; `chat-cli register` makes one)".into(),
    };
    out += &format!("key:         {key}\n");
    out += &format!("unread:      {}\n", s.unread);
    if s.held_count > 0 {
        out += &format!(
            "held:        {} message(s) from contacts whose key changed\n",
            s.held_count
        );
    }
    if s.login_needed {
        out += "LOGIN NEEDED: the session expired or was revoked; run `chat-cli login <user>`\n";
    }
    if let Some(e) = &s.last_error {
        let at = s
            .last_error_ms
            .map(|t| format!("[{}] ", time(t)))
            .unwrap_or_default();
        out += &format!("last error:  {at}{e}\n");
    }
    for h in &s.held {
        out += &format!("held:        {} from {}: {}\n", h.id, h.from, h.reason);
    }
    if s.held_count > s.held.len() as u64 {
        out += &format!(
            "             … and {} more (`chat-cli held` lists them all)\n",
            s.held_count - s.held.len() as u64
        );
    }
    for a in &s.sequence_alerts {
        out += &format!("ALERT:       [{}] {}\n", time(a.at_ms), a.reason);
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
    for i in &s.interrupted_sends {
        let how = match i.state {
            SendState::Sending => "still waiting for the relay",
            SendState::Stored => "stored by the relay: it will be delivered (do not send again)",
            SendState::NotSent => "NOT sent: send it again",
            SendState::Unknown => {
                "the relay connection broke before it answered: it may have been stored"
            }
            _ => "unknown",
        };
        out += &format!(
            "interrupted: [{}] {} to {}: {how}{}\n",
            time(i.at_ms),
            i.id,
            i.to,
            i.detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
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
                "WARNING: the key changed; check the directory fingerprint with {user}, then \
                 `chat-cli trust {user} <fingerprint>`\n"
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
        IpcResponse::End { .. } => String::new(),
        IpcResponse::Held(h) => format!(
            "[{}] {} from {}: {}\n",
            time(h.at_ms),
            h.id,
            h.from,
            h.reason
        ),
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
        IpcResponse::Accepted { id } | IpcResponse::Sending { id } => {
            format!("sending message {id}\n")
        }
        IpcResponse::Cancelled { id } => format!("cancelled message {id}: not sent\n"),
        IpcResponse::Error(e) => format!("error: {}\n", e.message),
        other => format!("{other:?}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_shown_not_obeyed() {
        let hostile =
            "hi\r[12:00] alice: send me money\x1b]0;pwned\x07\x1b[2J\u{202e}txt.exe\u{9b}";
        let shown = sanitize(hostile);
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown:?}"
        );
        assert!(!shown.contains('\u{202e}'));
        assert!(shown.contains("\\r") && shown.contains("\\x1b") && shown.contains("\\u{202e}"));
        assert!(shown.contains("\\u{9b}") && shown.contains("\\x07"));
        assert_eq!(
            sanitize("plain text, ünïcode ✓\nline two"),
            "plain text, ünïcode ✓\nline two"
        );
    }

    #[test]
    fn any_timestamp_prints() {
        for ms in [0, 1_700_000_000_000, 253_402_300_799_999, u64::MAX] {
            assert!(!time(ms).is_empty());
        }
        assert!(time(u64::MAX).starts_with("invalid time"));
        let m = InboxMessage {
            id: "00".into(),
            from: "bob".into(),
            sent_ms: 317_000_000_000_000_000,
            relay_ms: Some(1_700_000_000_000),
            received_ms: 1_700_000_000_500,
            text: "hi".into(),
            read: false,
            seq: 1,
            missing_before: 2,
            late: true,
            broadcast: false,
        };
        let shown = message(&m);
        assert!(
            shown.contains("2023-11-14 22:13 (sender's clock: invalid time"),
            "{shown}"
        );
        assert!(
            shown.contains("2 earlier message(s) from bob never arrived"),
            "{shown}"
        );
        assert!(shown.contains("arrived late"), "{shown}");
    }
}
