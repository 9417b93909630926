//! Sliding-window rate limits for login and verification attempts.
//!
//! The limiter is pure bookkeeping: callers pass `now`, so tests need no
//! clock. Two instances are used: attempts per peer IP, and failures per
//! account (a success on the account clears its failures).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many events a key may have within a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Events allowed per window.
    pub max: u32,
    /// Window length.
    pub window: Duration,
}

/// Counts recent events per key and refuses past the limit.
#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: Limit,
    events: Mutex<HashMap<K, VecDeque<Instant>>>,
}

/// Keys beyond which old entries are pruned on insert, to bound memory.
const PRUNE_AT: usize = 10_000;

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter with this limit.
    pub fn new(limit: Limit) -> Self {
        Self {
            limit,
            events: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, VecDeque<Instant>>> {
        // A poisoned map only holds timestamps; keep using it.
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if `key` is at or over the limit at `now`.
    pub fn is_limited(&self, key: &K, now: Instant) -> bool {
        let mut map = self.lock();
        match map.get_mut(key) {
            Some(events) => {
                expire(events, now, self.limit.window);
                events.len() >= self.limit.max as usize
            }
            None => false,
        }
    }

    /// Record one event for `key` at `now`.
    pub fn record(&self, key: &K, now: Instant) {
        let mut map = self.lock();
        if map.len() >= PRUNE_AT {
            let window = self.limit.window;
            map.retain(|_, events| {
                expire(events, now, window);
                !events.is_empty()
            });
        }
        let events = map.entry(key.clone()).or_default();
        expire(events, now, self.limit.window);
        events.push_back(now);
    }

    /// Check and, if allowed, record in one step. `false` = refused.
    pub fn try_acquire(&self, key: &K, now: Instant) -> bool {
        if self.is_limited(key, now) {
            return false;
        }
        self.record(key, now);
        true
    }

    /// Forget `key` (after a success).
    pub fn clear(&self, key: &K) {
        self.lock().remove(key);
    }
}

fn expire(events: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while events
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        events.pop_front();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn limits_within_the_window_and_recovers_after() {
        let limiter = RateLimiter::new(Limit {
            max: 3,
            window: Duration::from_secs(60),
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.try_acquire(&"a", t0));
        }
        assert!(!limiter.try_acquire(&"a", t0 + Duration::from_secs(59)));
        assert!(limiter.try_acquire(&"b", t0), "keys are independent");
        assert!(limiter.try_acquire(&"a", t0 + Duration::from_secs(60)));
    }

    #[test]
    fn clear_forgets_failures() {
        let limiter = RateLimiter::new(Limit {
            max: 1,
            window: Duration::from_secs(60),
        });
        let now = Instant::now();
        limiter.record(&1u32, now);
        assert!(limiter.is_limited(&1, now));
        limiter.clear(&1);
        assert!(!limiter.is_limited(&1, now));
    }
}
