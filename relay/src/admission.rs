//! Connection caps: how many QUIC connections the relay holds, in all and
//! per source (an IPv4 address or an IPv6 /64), so that one client — or a
//! crowd — cannot take every connection an honest user needs.
//!
//! ```text
//!  Incoming ── relay full? ──yes──► refuse (no handshake: the cheapest answer)
//!     │ no
//!  handshake ── admit(source) ──refused──► close: "too many connections from your address" / "relay full"
//!     │ Admitted (counted until dropped)
//!  connection task
//! ```
//!
//! Only connections that completed the handshake are counted, so packets
//! with a forged source address cannot use up another client's share. The
//! check before the handshake is a shortcut; `admit` decides, atomically.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::ratelimit::Source;

/// The open-connection counts and their caps.
#[derive(Debug)]
pub(crate) struct Admission {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_source: HashMap<Source, usize>,
}

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// The relay holds as many connections as it may.
    Relay,
    /// This source holds as many connections as one source may.
    Source,
}

/// One admitted connection; counted until dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    admission: Arc<Admission>,
    source: Source,
}

impl Admission {
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            open: Mutex::new(Open::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        crate::lock(&self.open)
    }

    /// Whether the relay is at its total cap now (a shortcut before the
    /// handshake; [`admit`](Self::admit) decides).
    pub(crate) fn relay_full(&self) -> bool {
        self.lock().total >= self.max_total
    }

    /// Count a connection from `source` if both caps allow it: check and
    /// count in one step.
    pub(crate) fn admit(self: &Arc<Self>, source: Source) -> Result<Admitted, Full> {
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(Full::Relay);
        }
        let count = open.per_source.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            return Err(Full::Source);
        }
        *count += 1;
        open.total += 1;
        Ok(Admitted {
            admission: Arc::clone(self),
            source,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_all_and_per_source_and_frees_on_drop() {
        let admission = Admission::new(3, 2);
        let a = Source::of("192.0.2.1".parse().unwrap());
        let b = Source::of("2001:db8::1".parse().unwrap());
        let b_too = Source::of("2001:db8::ffff".parse().unwrap());
        let a1 = admission.admit(a).unwrap();
        let _a2 = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), Full::Source);
        let _b1 = admission.admit(b).unwrap();
        assert!(admission.relay_full());
        assert_eq!(admission.admit(b_too).unwrap_err(), Full::Relay);
        drop(a1);
        assert!(!admission.relay_full());
        assert_eq!(
            admission.admit(b_too).map(|_| ()),
            Ok(()),
            "same /64, one more fits"
        );
        assert!(admission.lock().per_source.len() <= 2);
    }
}
