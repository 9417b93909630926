//! The relay's notion of time, in one handle that tests can drive.
//!
//! Every expiry, rate-limit window, TOTP step and connection deadline in the
//! relay reads its time from the [`Clock`] in [`Config`](crate::Config):
//!
//! * [`Clock::system`] (the default) is the wall clock and the monotonic
//!   clock, unchanged;
//! * [`Clock::adjustable`] is the same plus an offset that only grows, set
//!   with [`Clock::advance`]. Tests use it to move the relay past a code's
//!   expiry, a rate-limit delay or a connection deadline at once, instead of
//!   sleeping: [`Clock::sleep_until`] wakes up when the clock is advanced
//!   past its deadline.
//!
//! Time never goes backwards on either kind, so an advanced clock only makes
//! things expire sooner.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// A cheap-to-clone handle on the relay's time. See the [module docs](self).
#[derive(Clone, Default)]
pub struct Clock {
    /// The offset added to the real clocks; `None` for the plain system clock.
    offset: Option<Arc<watch::Sender<Duration>>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.offset {
            None => f.write_str("Clock(system)"),
            Some(offset) => write!(f, "Clock(system + {:?})", *offset.borrow()),
        }
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { offset: None }
    }

    /// The system clock plus an offset that [`advance`](Self::advance) grows.
    pub fn adjustable() -> Self {
        let (offset, _) = watch::channel(Duration::ZERO);
        Self {
            offset: Some(Arc::new(offset)),
        }
    }

    fn offset(&self) -> Duration {
        self.offset
            .as_ref()
            .map_or(Duration::ZERO, |offset| *offset.borrow())
    }

    /// Move this clock (and every clone of it) forward by `by`, waking the
    /// sleepers whose deadline has come. Returns `false` (and changes
    /// nothing) on the system clock, which cannot be moved.
    pub fn advance(&self, by: Duration) -> bool {
        match &self.offset {
            Some(offset) => {
                offset.send_modify(|o| *o += by);
                true
            }
            None => false,
        }
    }

    /// Now, on the monotonic clock: for deadlines and rate-limit windows.
    pub fn now(&self) -> Instant {
        Instant::now() + self.offset()
    }

    /// Seconds since the Unix epoch (0 if the system clock is before 1970):
    /// the unit every stored expiry uses.
    pub fn unix_now(&self) -> u64 {
        (SystemTime::now() + self.offset())
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// Milliseconds since the Unix epoch (0 before 1970): what the relay
    /// tells clients that ask for its time.
    pub fn unix_now_ms(&self) -> u64 {
        (SystemTime::now() + self.offset())
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// Resolve once [`now`](Self::now) has reached `deadline`, either as
    /// time passes or because the clock was advanced.
    pub async fn sleep_until(&self, deadline: Instant) {
        let mut changes = self.offset.as_ref().map(|offset| offset.subscribe());
        loop {
            let now = self.now();
            if now >= deadline {
                return;
            }
            let wait = tokio::time::sleep(deadline - now);
            match changes.as_mut() {
                None => return wait.await,
                Some(changes) => {
                    tokio::select! {
                        () = wait => {}
                        changed = changes.changed() => {
                            if changed.is_err() {
                                // Cannot happen while `self` holds the sender.
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Resolve once [`unix_now`](Self::unix_now) has reached `unix_secs`.
    pub async fn sleep_until_unix(&self, unix_secs: u64) {
        let left = Duration::from_secs(unix_secs.saturating_sub(self.unix_now()));
        // The monotonic and the wall clock run at the same rate (and get the
        // same offset); rounding up to whole seconds keeps `unix_now() >=
        // unix_secs` true when this resolves.
        self.sleep_until(self.now() + left).await;
        while self.unix_now() < unix_secs {
            self.sleep_until(self.now() + Duration::from_millis(100))
                .await;
        }
    }
}

/// Seconds since the Unix epoch on the system clock (0 before 1970).
pub fn unix_now() -> u64 {
    Clock::system().unix_now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_cannot_be_moved() {
        let clock = Clock::system();
        assert!(!clock.advance(Duration::from_secs(60)));
        assert!(clock.unix_now().abs_diff(unix_now()) <= 1);
    }

    #[test]
    fn an_adjustable_clock_moves_every_clone() {
        let clock = Clock::adjustable();
        let clone = clock.clone();
        let before = clock.unix_now();
        let mono = clock.now();
        assert!(clone.advance(Duration::from_secs(3600)));
        assert!(clock.unix_now() >= before + 3600);
        assert!(clock.now() >= mono + Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn sleepers_wake_when_the_clock_is_advanced() {
        let clock = Clock::adjustable();
        let deadline = clock.now() + Duration::from_secs(3600);
        let unix_deadline = clock.unix_now() + 7200;
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(deadline).await }
        });
        let unix_sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until_unix(unix_deadline).await }
        });
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(3600));
        // An hour of real time would be needed without the advance; the
        // outer timeout only keeps a broken clock from hanging the test.
        tokio::time::timeout(Duration::from_secs(10), sleeper)
            .await
            .expect("woken by the advance")
            .expect("sleeper task");
        assert!(!unix_sleeper.is_finished());
        clock.advance(Duration::from_secs(3601));
        tokio::time::timeout(Duration::from_secs(10), unix_sleeper)
            .await
            .expect("woken by the advance")
            .expect("sleeper task");
    }
}
