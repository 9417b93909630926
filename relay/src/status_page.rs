//! The status page (`GET /`): counts only, live without reloading.
//!
//! The page is `status_page.html` with its style (`status_page.css`) and
//! script (`status_page.js`) inlined, and the tables filled in here from a
//! [`StatusReport`]. The script polls `/status.json` every 1.5 s, writes each
//! number into the element whose `id` is its key there, and draws the
//! messages-per-second chart (accepted and delivered, last ten minutes) as
//! inline SVG. Nothing is loaded from anywhere else: the
//! Content-Security-Policy allows the one script and the one style by their
//! SHA-256 and fetches from this origin only.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

use crate::status::StatusReport;

const TEMPLATE: &str = include_str!("status_page.html");
const STYLE: &str = include_str!("status_page.css");
const SCRIPT: &str = include_str!("status_page.js");

/// The rows of the page's tables: `(key in status.json, label)`. Each key
/// becomes the `id` of the cell that shows its value.
const NOW: &[(&str, &str)] = &[
    ("open_connections", "Open connections"),
    ("online_users", "Online users"),
    ("accounts", "Accounts"),
    ("pending_registrations", "Pending registrations"),
    ("queued_messages", "Queued messages"),
    ("queued_bytes", "Queued bytes"),
    (
        "password_checks_in_use",
        "Password checks running or waiting",
    ),
    ("uptime_secs", "Uptime"),
];

const SINCE_START: &[(&str, &str)] = &[
    ("messages_accepted", "Messages accepted"),
    ("messages_delivered", "Messages delivered"),
    ("logins_ok", "Logins"),
];

const ERRORS: &[(&str, &str)] = &[
    (
        "logins_failed",
        "Logins refused: wrong credentials or signature",
    ),
    ("logins_rate_limited", "Logins refused: rate limited"),
    ("resumes_failed", "Session resumes refused"),
    (
        "attempt_refusals",
        "Attempts refused: too many from one source",
    ),
    (
        "password_guess_refusals",
        "Password checks refused: guessing limit",
    ),
    ("busy_refusals", "Refused: relay busy (password checks)"),
    (
        "refused_connections_relay_full",
        "Connections refused: relay at its limit",
    ),
    (
        "refused_connections_source_full",
        "Connections refused: too many from one source",
    ),
    (
        "unauthenticated_timeouts",
        "Connections closed: no login in time",
    ),
    (
        "sessions_ended",
        "Connections closed: session revoked or expired",
    ),
    (
        "bad_frame_closes",
        "Connections closed: too many bad frames",
    ),
    ("send_rate_refusals", "Sends refused: sending too fast"),
    ("quota_refusals", "Sends refused: recipient's queue full"),
    (
        "sender_share_refusals",
        "Sends refused: sender's share of a queue full",
    ),
    ("rejected_frames_malformed", "Frames rejected: malformed"),
    ("rejected_frames_oversized", "Frames rejected: too large"),
    (
        "rejected_frames_unsupported_version",
        "Frames rejected: other protocol version",
    ),
    (
        "rejected_frames_unknown",
        "Frames rejected: unknown request",
    ),
];

/// The Content-Security-Policy: nothing from elsewhere, only this page's
/// own script and style, fetches to this origin only.
static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        csp_hash(SCRIPT),
        csp_hash(STYLE)
    )
});

fn csp_hash(inline: &str) -> String {
    format!(
        "sha256-{}",
        base64(&securechat_common::crypto::sha256(inline.as_bytes()))
    )
}

/// Standard base64 with padding, as CSP hash sources are written (the one
/// use in the relay; not worth a dependency).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The page for `report`, with its security headers.
pub(crate) fn render(report: &StatusReport) -> Response {
    let values = serde_json::to_value(report).unwrap_or_default();
    let rows = |rows: &[(&str, &str)]| {
        let mut html = String::new();
        for (key, label) in rows {
            let value = values.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
            let shown = if *key == "uptime_secs" {
                uptime(value)
            } else {
                value.to_string()
            };
            html.push_str(&format!(
                "<tr><th>{label}</th><td id=\"{key}\">{shown}</td></tr>\n"
            ));
        }
        html
    };
    let page = TEMPLATE
        .replace("{{style}}", STYLE)
        .replace("{{script}}", SCRIPT)
        .replace("{{now}}", &rows(NOW))
        .replace("{{since_start}}", &rows(SINCE_START))
        .replace("{{errors}}", &rows(ERRORS));
    (
        [
            (header::CONTENT_SECURITY_POLICY, CSP.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(page),
    )
        .into_response()
}

/// Uptime as the page shows it; the script formats it the same way.
fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}h {m:02}m")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_template_has_every_slot_and_loads_nothing_from_elsewhere() {
        for slot in [
            "{{style}}",
            "{{script}}",
            "{{now}}",
            "{{since_start}}",
            "{{errors}}",
        ] {
            assert!(TEMPLATE.contains(slot), "{slot}");
        }
        for text in [TEMPLATE, STYLE, SCRIPT] {
            assert!(!text.contains("http:") && !text.contains("https:"));
            assert!(!text.contains("@import") && !text.contains("url("));
        }
    }

    #[test]
    fn base64_matches_the_standard_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn uptime_reads_like_a_clock() {
        assert_eq!(uptime(3_725), "01:02:05");
        assert_eq!(uptime(2 * 86_400 + 3_600), "2d 01h 00m");
    }
}
