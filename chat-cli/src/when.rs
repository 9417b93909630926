//! How times are shown: one place turns Unix milliseconds into text, in
//! the local time zone or, with `--utc`, in UTC.
//!
//! The zone is chosen once, when the command line has been read
//! ([`use_zone`]); until then (in unit tests) times are shown in UTC, so
//! that tests do not depend on the machine's zone. The local zone comes
//! from `TZ` or `/etc/localtime` (jiff's rules); when neither says
//! anything usable, UTC.

use std::sync::OnceLock;

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// The zone chosen for this run, and the zone itself once a time is shown.
static CHOSEN: OnceLock<Zone> = OnceLock::new();
static ZONE: OnceLock<TimeZone> = OnceLock::new();

/// Which zone times are shown in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// The machine's zone (`TZ`, else `/etc/localtime`).
    Local,
    /// Coordinated Universal Time.
    Utc,
}

/// Show every time of this run in `zone`. Only the first call counts.
/// The local zone is looked up only when the first time is shown: most
/// commands (`send`, an empty `inbox`) show none and should not pay for it.
pub fn use_zone(zone: Zone) {
    let _ = CHOSEN.set(zone);
}

fn zone() -> TimeZone {
    ZONE.get_or_init(|| match CHOSEN.get() {
        Some(Zone::Local) => local_zone(),
        Some(Zone::Utc) | None => TimeZone::UTC,
    })
    .clone()
}

/// The machine's zone. Without `TZ`, `/etc/localtime` is read directly:
/// jiff's own lookup lists the whole zoneinfo tree first (dozens of
/// directories, milliseconds on every run) to learn a name we never print.
fn local_zone() -> TimeZone {
    // Any `TZ`, even an empty one, is left to jiff's rules.
    if std::env::var_os("TZ").is_none() {
        if let Ok(tz) = std::fs::read("/etc/localtime")
            .map_err(|_| ())
            .and_then(|data| TimeZone::tzif("Local", &data).map_err(|_| ()))
        {
            return tz;
        }
    }
    TimeZone::try_system().unwrap_or(TimeZone::UTC)
}

/// `ms` as a point in time, if a calendar can show it (a peer's clock is
/// not ours to trust: any number may arrive).
fn timestamp(ms: u64) -> Option<Timestamp> {
    Timestamp::from_millisecond(i64::try_from(ms).ok()?).ok()
}

fn invalid(ms: u64) -> String {
    format!("invalid time ({ms} ms)")
}

/// Date and time to the minute, `2026-12-03 14:02`: for history, inbox
/// and status lines.
pub fn full(ms: u64) -> String {
    match timestamp(ms) {
        Some(t) => t.to_zoned(zone()).strftime("%Y-%m-%d %H:%M").to_string(),
        None => invalid(ms),
    }
}

/// The time of day, `14:02`, for a chat line; the full date and time when
/// `ms` is not on the same day as `now_ms` (an old message, or a sender
/// whose clock is off by days).
pub fn clock(ms: u64, now_ms: u64) -> String {
    let (Some(t), Some(now)) = (timestamp(ms), timestamp(now_ms)) else {
        return full(ms);
    };
    let tz = zone();
    let (t, now) = (t.to_zoned(tz.clone()), now.to_zoned(tz));
    if t.date() == now.date() {
        t.strftime("%H:%M").to_string()
    } else {
        full(ms)
    }
}

/// Now, Unix milliseconds.
pub fn now_ms() -> u64 {
    u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_show_to_the_minute_and_nonsense_is_said_to_be_invalid() {
        // Unit tests run before any zone is chosen: UTC.
        assert_eq!(full(1_700_000_000_000), "2023-11-14 22:13");
        assert_eq!(full(0), "1970-01-01 00:00");
        assert!(full(u64::MAX).starts_with("invalid time"));
        assert!(full(317_000_000_000_000_000).starts_with("invalid time"));
        // Near the end of year 9999 still shows (jiff stops a day short of
        // it, to leave room for any zone's offset).
        assert_eq!(full(253_402_127_999_000), "9999-12-29 23:59");
    }

    #[test]
    fn a_chat_line_shows_the_date_only_for_another_day() {
        let now = 1_700_000_000_000; // 22:13 UTC
        assert_eq!(clock(now - 60_000, now), "22:12");
        assert_eq!(clock(now - 86_400_000, now), "2023-11-13 22:13");
        assert!(clock(u64::MAX, now).starts_with("invalid time"));
    }
}
