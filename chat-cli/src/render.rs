//! How conversations, contacts and events look as text: the lines of
//! `history`, `contacts`, `events` and of the chat screen.
//!
//! Everything returned here still holds other people's text as it came;
//! callers print it through [`crate::output::sanitize`].

use securechat_common::ipc::{
    ContactInfo, DeliveryState, Event, HistoryEntry, InboxMessage, SentMessage, TrustState,
};

use crate::when;

/// How a time is written on a line.
#[derive(Clone, Copy, Debug)]
pub enum Stamp {
    /// `[2026-12-03 14:02]`: history, inbox, events.
    Full,
    /// `14:02` (the date too when it is not today): chat lines.
    Clock {
        /// Now, Unix milliseconds.
        now_ms: u64,
    },
}

impl Stamp {
    fn time(self, ms: u64) -> String {
        match self {
            Stamp::Full => when::full(ms),
            Stamp::Clock { now_ms } => when::clock(ms, now_ms),
        }
    }

    fn wrap(self, inner: String) -> String {
        match self {
            Stamp::Full => format!("[{inner}]"),
            Stamp::Clock { .. } => inner,
        }
    }

    /// When `ms` happened, written this way.
    pub fn show(self, ms: u64) -> String {
        self.wrap(self.time(ms))
    }

    /// When a message was written: by the sender's clock, or, when that
    /// clock is more than a few minutes from the relay's, the relay's
    /// receive time with the sender's beside it.
    pub fn message(self, m: &InboxMessage) -> String {
        let inner = match m.relay_ms {
            Some(relay) if m.clock_skewed() => format!(
                "{} (sender's clock: {})",
                self.time(relay),
                self.time(m.sent_ms)
            ),
            _ => self.time(m.sent_ms),
        };
        self.wrap(inner)
    }
}

/// The first line of `text`, cut to `max` characters with `…`: enough to
/// recognise a message in a receipt.
pub fn short(text: &str, max: usize) -> String {
    let first = text.lines().next().unwrap_or("");
    let cut: String = first.chars().take(max).collect();
    if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// A message id shortened for people (ids are 32 hex digits).
pub fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

/// A received message: notes for missing messages first, then
/// `{when} {label}{from}: {text}`, continuation lines indented.
pub fn incoming(m: &InboxMessage, stamp: Stamp, label: &str) -> String {
    let mut out = String::new();
    if m.missing_before > 0 {
        out += &format!(
            "! {} earlier message(s) from {} never arrived (the relay dropped or is holding them)\n",
            m.missing_before, m.from
        );
    }
    let mut text = m.text.replace('\n', "\n    ");
    if text.is_empty() {
        text = "(empty message)".into();
    }
    out += &format!("{} {label}{}: {text}", stamp.message(m), m.from);
    if m.late {
        out += "  (arrived late, after newer messages)";
    }
    out
}

/// Whom a sent message went to: `everyone`, or its recipient.
fn recipients(m: &SentMessage) -> String {
    if m.broadcast {
        return "everyone".into();
    }
    let names: Vec<&str> = m.recipients.iter().map(|r| r.user.as_str()).collect();
    if names.is_empty() {
        "?".into()
    } else {
        names.join(", ")
    }
}

/// Where a sent message stands: one word for one recipient, and for a
/// broadcast how many have it; failures with their reason.
pub fn delivery(m: &SentMessage) -> String {
    let state = m.state();
    let mut out = state.as_str().to_string();
    let n = m.recipients.len();
    if m.broadcast && n > 0 {
        let delivered = m
            .recipients
            .iter()
            .filter(|r| r.state == DeliveryState::Delivered)
            .count();
        if delivered == n {
            out = format!("delivered to all {n}");
        } else {
            out += &format!("; delivered to {delivered} of {n}");
        }
    }
    for r in &m.recipients {
        if r.state == DeliveryState::Failed {
            match (&r.detail, m.broadcast) {
                (Some(d), true) => out += &format!("; {}: {d}", r.user),
                (Some(d), false) => out += &format!(": {d}"),
                (None, true) => out += &format!("; failed for {}", r.user),
                (None, false) => {}
            }
        }
    }
    out
}

/// A sent message: `{when} you → {to}: {text}  [{state}]`.
pub fn outgoing(m: &SentMessage, stamp: Stamp) -> String {
    let text = m.text.replace('\n', "\n    ");
    format!(
        "{} you → {}: {text}  [{}]",
        stamp.show(m.sent_ms),
        recipients(m),
        delivery(m)
    )
}

/// One line (or a few, for a long message) of `history`.
pub fn entry(e: &HistoryEntry, stamp: Stamp) -> String {
    match e {
        HistoryEntry::In(m) => incoming(m, stamp, ""),
        HistoryEntry::Out(m) => outgoing(m, stamp),
    }
}

/// A contact: name, trust, last seen, then the fingerprint indented.
pub fn contact(c: &ContactInfo) -> String {
    let trust = match c.trust {
        TrustState::FirstUse => format!(
            "pinned on first use (not verified: compare `chat-cli fingerprint {}` with them)",
            c.user
        ),
        TrustState::Verified => "verified".into(),
        TrustState::Changed => format!(
            "KEY CHANGED: messages are held; check the new key with them, then `chat-cli \
             trust {}`",
            c.user
        ),
        _ => "unknown trust state (a newer agentd; upgrade chat-cli)".into(),
    };
    let seen = match c.last_seen_ms {
        Some(ms) => format!("last seen {}", when::full(ms)),
        None => "not seen yet".into(),
    };
    let held = if c.held > 0 {
        format!(", {} held message(s) (`chat-cli held`)", c.held)
    } else {
        String::new()
    };
    format!(
        "{}: {trust}; {seen}{held}\n    key {}",
        c.user, c.fingerprint
    )
}

/// One event on one line (a message's line breaks shown as `\n`).
pub fn event(e: &Event) -> String {
    match e {
        Event::Message(m) => format!(
            "{} message from {}{}: {}",
            Stamp::Full.message(m),
            m.from,
            if m.broadcast { " to everyone" } else { "" },
            m.text.replace('\n', "\\n")
        ),
        Event::Receipt { id, from, at_ms } => format!(
            "{} delivered: {from} has your message {id}",
            Stamp::Full.show(*at_ms)
        ),
        Event::Expired { id, to, at_ms } => format!(
            "{} expired: your message {id} to {to} waited on the relay too long and was \
             removed undelivered",
            Stamp::Full.show(*at_ms)
        ),
        Event::Presence {
            user,
            online,
            at_ms,
        } => format!(
            "{} presence: {user} {}",
            Stamp::Full.show(*at_ms),
            if *online { "is online" } else { "went offline" }
        ),
        _ => "an event this chat-cli does not know (agentd is newer; upgrade chat-cli)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use securechat_common::ipc::RecipientState;

    fn msg(text: &str) -> InboxMessage {
        InboxMessage {
            id: "ab".repeat(16),
            from: "bob".into(),
            sent_ms: 1_700_000_000_000,
            relay_ms: Some(1_700_000_000_100),
            received_ms: 1_700_000_000_200,
            text: text.into(),
            read: false,
            seq: 1,
            missing_before: 0,
            late: false,
            broadcast: false,
        }
    }

    fn sent(states: &[(&str, DeliveryState)], broadcast: bool) -> SentMessage {
        SentMessage {
            id: "cd".repeat(16),
            broadcast,
            text: "lunch?".into(),
            sent_ms: 1_700_000_000_000,
            recipients: states
                .iter()
                .map(|(u, s)| RecipientState {
                    user: (*u).into(),
                    state: *s,
                    at_ms: 1_700_000_000_000,
                    detail: None,
                })
                .collect(),
        }
    }

    #[test]
    fn messages_show_time_sender_and_text() {
        let now = 1_700_000_100_000;
        assert_eq!(
            incoming(&msg("hi"), Stamp::Clock { now_ms: now }, "(private) "),
            "22:13 (private) bob: hi"
        );
        assert_eq!(
            incoming(&msg("two\nlines"), Stamp::Full, ""),
            "[2023-11-14 22:13] bob: two\n    lines"
        );
    }

    #[test]
    fn a_skewed_sender_clock_shows_both_times() {
        let mut m = msg("hi");
        m.sent_ms -= 3_600_000;
        assert_eq!(
            Stamp::Full.message(&m),
            "[2023-11-14 22:13 (sender's clock: 2023-11-14 21:13)]"
        );
        // Within a few minutes: only the sender's.
        m.sent_ms = m.relay_ms.unwrap_or(0) - 60_000;
        assert_eq!(Stamp::Full.message(&m), "[2023-11-14 22:12]");
    }

    #[test]
    fn sent_messages_show_their_state() {
        use DeliveryState::*;
        let one = sent(&[("bob", Queued)], false);
        assert_eq!(
            outgoing(&one, Stamp::Full),
            "[2023-11-14 22:13] you → bob: lunch?  [queued]"
        );
        let all = sent(&[("bob", Delivered), ("carol", Queued)], true);
        assert_eq!(delivery(&all), "queued; delivered to 1 of 2");
        assert!(outgoing(&all, Stamp::Full).contains("you → everyone: lunch?"));
        let done = sent(&[("bob", Delivered), ("carol", Delivered)], true);
        assert_eq!(delivery(&done), "delivered to all 2");
        let mut failed = sent(&[("bob", Failed)], false);
        failed.recipients[0].detail = Some("no such user".into());
        assert_eq!(delivery(&failed), "failed: no such user");
    }

    #[test]
    fn events_are_one_line_each() {
        let line = event(&Event::Message(msg("a\nb")));
        assert_eq!(line, "[2023-11-14 22:13] message from bob: a\\nb");
        let line = event(&Event::Presence {
            user: "carol".into(),
            online: false,
            at_ms: 1_700_000_000_000,
        });
        assert_eq!(line, "[2023-11-14 22:13] presence: carol went offline");
    }

    #[test]
    fn short_text_is_cut_at_the_first_line() {
        assert_eq!(short("hello", 10), "hello");
        assert_eq!(short("hello world", 5), "hello…");
        assert_eq!(short("one\ntwo", 10), "one…");
        assert_eq!(short_id(&"ab".repeat(16)), "abababab");
    }
}
