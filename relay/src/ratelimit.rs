//! Rate limits: who may try how often.
//!
//! The limiters are pure bookkeeping: callers pass `now` (from the relay's
//! [`Clock`](crate::clock::Clock)), so tests drive them without waiting.
//! Every check that also records does both under one lock, in one call, so
//! concurrent requests cannot slip past a limit between the two.
//!
//! * [`Source`] — what "one client" means: an IPv4 address, or an IPv6 /64
//!   (one customer network gets a /64, so per-address limits would be
//!   trivial to dodge with IPv6).
//! * [`RateLimiter`] — a sliding window per key: attempts per source, sends
//!   per sender.
//! * [`GuessLimiter`] — password guessing, per (account, source) with
//!   growing delays and per account with a ceiling high enough that a
//!   stranger cannot hold it. See [`LoginLimits`] for the numbers.
//!
//! Only password logins (and registration retries, which check a password)
//! go through the [`GuessLimiter`]. A session resume — a 256-bit token plus
//! a fresh signature by the account key — never does: nothing a stranger
//! does to an account's password can keep its owner's agent out.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// One client, for limits: an IPv4 address or an IPv6 /64 prefix. An
/// IPv4-mapped IPv6 address counts as the IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl Source {
    /// The source an address belongs to.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::V4(v4) => write!(f, "{v4}"),
            Source::V6Prefix(prefix) => {
                let net = std::net::Ipv6Addr::from(u128::from(*prefix) << 64);
                write!(f, "{net}/64")
            }
        }
    }
}

/// How many events a key may have within a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Events allowed per window.
    pub max: u32,
    /// Window length.
    pub window: Duration,
}

/// Keys a limiter keeps before it prunes (and, if still full, evicts the
/// oldest tenth): bounds memory whatever names or addresses are thrown at it.
const MAX_KEYS: usize = 100_000;

/// Counts recent events per key and refuses past the limit.
#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: Limit,
    events: Mutex<HashMap<K, VecDeque<Instant>>>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter with this limit.
    pub fn new(limit: Limit) -> Self {
        Self {
            limit,
            events: Mutex::new(HashMap::new()),
        }
    }

    /// The limit this limiter enforces.
    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Check and, if allowed, record one event for `key` at `now`, under
    /// one lock. `Err` carries how long until the next event is allowed.
    pub fn try_acquire(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let window = self.limit.window;
        let mut map = lock(&self.events);
        if !map.contains_key(key) && map.len() >= MAX_KEYS {
            make_room(&mut map, |events| {
                expire(events, now, window);
                events.back().copied()
            });
        }
        let events = map.entry(key.clone()).or_default();
        expire(events, now, window);
        if events.len() >= self.limit.max as usize {
            let retry = events.front().map_or(window, |first| {
                (*first + window).saturating_duration_since(now)
            });
            return Err(retry);
        }
        events.push_back(now);
        Ok(())
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

/// Drop the entries `latest` finds empty (`None`); if that frees less than
/// a tenth of the map, also drop the tenth whose latest event is oldest.
fn make_room<K: Eq + Hash + Clone, V>(
    map: &mut HashMap<K, V>,
    mut latest: impl FnMut(&mut V) -> Option<Instant>,
) {
    let mut ages: Vec<(Instant, K)> = Vec::new();
    map.retain(|key, value| match latest(value) {
        Some(t) => {
            ages.push((t, key.clone()));
            true
        }
        None => false,
    });
    let target = MAX_KEYS - MAX_KEYS / 10;
    if map.len() > target {
        let excess = map.len() - target;
        ages.select_nth_unstable_by_key(excess - 1, |(t, _)| *t);
        for (_, key) in &ages[..excess] {
            map.remove(key);
        }
    }
}

/// The password-guessing limits. The defaults, and what they allow:
///
/// * from one source against one account: 5 failures at once, then a wait
///   of 2 s, and each further failure doubles the wait up to 15 minutes —
///   about 16 guesses in the first hour and 4 an hour after that; the pair
///   is forgotten after an hour without a failure;
/// * against one account from all sources together: 500 failures an hour.
///   Past that, password logins to the account are refused for the rest of
///   the hour; it takes dozens of sources guessing without pause to get
///   there, and even then the owner's agent resumes its session as usual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures one source may have against one account before it has to wait.
    pub free_failures: u32,
    /// The first wait; it doubles with each further failure.
    pub first_delay: Duration,
    /// The longest wait.
    pub max_delay: Duration,
    /// A source's failures against an account are forgotten after this
    /// long without another one.
    pub forget_after: Duration,
    /// Failures against one account from all sources together per window.
    pub per_account: Limit,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            free_failures: 5,
            first_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(15 * 60),
            forget_after: Duration::from_secs(3600),
            per_account: Limit {
                max: 500,
                window: Duration::from_secs(3600),
            },
        }
    }
}

impl LoginLimits {
    /// The wait after the `failures`-th failure of one (account, source)
    /// pair, if any.
    pub fn delay_after(&self, failures: u32) -> Option<Duration> {
        let beyond = failures.checked_sub(self.free_failures)?;
        let factor = 1u32.checked_shl(beyond).unwrap_or(u32::MAX);
        Some(
            self.first_delay
                .checked_mul(factor)
                .unwrap_or(self.max_delay)
                .min(self.max_delay),
        )
    }
}

/// Why the [`GuessLimiter`] refused an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This source has failed too often against this account lately.
    Pair {
        /// How long until it may try again.
        retry_after: Duration,
    },
    /// The account has had too many failures from all sources this window.
    Account {
        /// How long until password logins are taken again.
        retry_after: Duration,
    },
}

/// One source's failures against one account.
#[derive(Clone, Copy, Debug)]
struct Pair {
    failures: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct Guesses {
    pairs: HashMap<(String, Source), Pair>,
    accounts: HashMap<String, VecDeque<Instant>>,
}

/// Password-guessing limits per (account, source) and per account. See
/// [`LoginLimits`] and the [module docs](self).
///
/// An attempt is counted as a failure when it begins ([`begin`](Self::begin)),
/// so concurrent guesses cannot run past the limit; a success takes it back
/// ([`succeeded`](Self::succeeded)) and clears the failures of *that*
/// source only.
#[derive(Debug)]
pub struct GuessLimiter {
    limits: LoginLimits,
    state: Mutex<Guesses>,
}

impl GuessLimiter {
    /// A limiter with these limits.
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            state: Mutex::new(Guesses::default()),
        }
    }

    /// Check whether `source` may try a password for `account` now and, if
    /// so, count the attempt as a failure, in one step under one lock.
    pub fn begin(&self, account: &str, source: Source, now: Instant) -> Result<(), Refusal> {
        let limits = self.limits;
        let mut state = lock(&self.state);
        let Guesses { pairs, accounts } = &mut *state;
        let key = (account.to_string(), source);

        let pair = pairs.get(&key).copied().filter(|p| {
            now.saturating_duration_since(p.last) < limits.forget_after
                || p.blocked_until.is_some_and(|until| until > now)
        });
        if let Some(until) = pair.and_then(|p| p.blocked_until) {
            if until > now {
                return Err(Refusal::Pair {
                    retry_after: until - now,
                });
            }
        }
        let window = limits.per_account.window;
        if let Some(events) = accounts.get_mut(account) {
            expire(events, now, window);
            if events.len() >= limits.per_account.max as usize {
                let retry_after = events.front().map_or(window, |first| {
                    (*first + window).saturating_duration_since(now)
                });
                return Err(Refusal::Account { retry_after });
            }
        }

        if !pairs.contains_key(&key) && pairs.len() >= MAX_KEYS {
            make_room(pairs, |p| {
                let live = now.saturating_duration_since(p.last) < limits.forget_after
                    || p.blocked_until.is_some_and(|until| until > now);
                live.then_some(p.last)
            });
        }
        let failures = pair.map_or(0, |p| p.failures).saturating_add(1);
        pairs.insert(
            key,
            Pair {
                failures,
                last: now,
                blocked_until: limits.delay_after(failures).map(|d| now + d),
            },
        );
        if !accounts.contains_key(account) && accounts.len() >= MAX_KEYS {
            make_room(accounts, |events| {
                expire(events, now, window);
                events.back().copied()
            });
        }
        accounts
            .entry(account.to_string())
            .or_default()
            .push_back(now);
        Ok(())
    }

    /// The attempt `source` began for `account` succeeded: forget this
    /// source's failures against the account and take the attempt back from
    /// the account's count. Other sources' failures stay.
    pub fn succeeded(&self, account: &str, source: Source) {
        let mut state = lock(&self.state);
        state.pairs.remove(&(account.to_string(), source));
        if let Some(events) = state.accounts.get_mut(account) {
            events.pop_back();
            if events.is_empty() {
                state.accounts.remove(account);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn limits_within_the_window_and_recovers_after() {
        let limiter = RateLimiter::new(Limit {
            max: 3,
            window: Duration::from_secs(60),
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.try_acquire(&"a", t0), Ok(()));
        }
        assert_eq!(limiter.try_acquire(&"a", t0 + 59 * SEC), Err(SEC));
        assert_eq!(
            limiter.try_acquire(&"b", t0),
            Ok(()),
            "keys are independent"
        );
        assert_eq!(limiter.try_acquire(&"a", t0 + 60 * SEC), Ok(()));
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_limit() {
        let limiter = RateLimiter::new(Limit {
            max: 50,
            window: Duration::from_secs(60),
        });
        let now = Instant::now();
        let granted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        if limiter.try_acquire(&"k", now).is_ok() {
                            granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.into_inner(), 50);
    }

    #[test]
    fn ipv6_counts_per_64_and_ipv4_per_address() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(Source::of(v4), Source::of(mapped));
        assert_ne!(Source::of(v4), Source::of("192.0.2.8".parse().unwrap()));
        assert_eq!(
            Source::of(IpAddr::V6(Ipv6Addr::LOCALHOST)).to_string(),
            "::/64"
        );
    }

    fn limits() -> LoginLimits {
        LoginLimits {
            free_failures: 3,
            first_delay: 2 * SEC,
            max_delay: 10 * SEC,
            forget_after: 100 * SEC,
            per_account: Limit {
                max: 20,
                window: Duration::from_secs(3600),
            },
        }
    }

    #[test]
    fn delays_grow_per_pair_and_are_capped() {
        let l = limits();
        assert_eq!(l.delay_after(2), None);
        assert_eq!(l.delay_after(3), Some(2 * SEC));
        assert_eq!(l.delay_after(4), Some(4 * SEC));
        assert_eq!(l.delay_after(5), Some(8 * SEC));
        assert_eq!(l.delay_after(6), Some(10 * SEC));
        assert_eq!(l.delay_after(u32::MAX), Some(10 * SEC));

        let g = GuessLimiter::new(l);
        let src = Source::of("192.0.2.1".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            g.begin("alice", src, t0).unwrap();
        }
        assert_eq!(
            g.begin("alice", src, t0 + SEC),
            Err(Refusal::Pair { retry_after: SEC })
        );
        // After the wait, one more try; then the wait doubles.
        g.begin("alice", src, t0 + 2 * SEC).unwrap();
        assert_eq!(
            g.begin("alice", src, t0 + 2 * SEC),
            Err(Refusal::Pair {
                retry_after: 4 * SEC
            })
        );
        // Refused attempts do not count.
        g.begin("alice", src, t0 + 6 * SEC).unwrap();
        assert_eq!(
            g.begin("alice", src, t0 + 6 * SEC),
            Err(Refusal::Pair {
                retry_after: 8 * SEC
            })
        );
        // A long quiet spell forgets the pair.
        let later = t0 + 6 * SEC + 100 * SEC;
        for _ in 0..3 {
            g.begin("alice", src, later).unwrap();
        }
    }

    #[test]
    fn one_source_does_not_delay_another_nor_another_account() {
        let g = GuessLimiter::new(limits());
        let attacker = Source::of("192.0.2.1".parse().unwrap());
        let owner = Source::of("2001:db8::1".parse().unwrap());
        let now = Instant::now();
        for _ in 0..3 {
            g.begin("alice", attacker, now).unwrap();
        }
        assert!(g.begin("alice", attacker, now).is_err());
        assert_eq!(g.begin("alice", owner, now), Ok(()));
        assert_eq!(g.begin("bob", attacker, now), Ok(()));
    }

    #[test]
    fn a_success_clears_its_own_source_only() {
        let g = GuessLimiter::new(limits());
        let attacker = Source::of("192.0.2.1".parse().unwrap());
        let owner = Source::of("192.0.2.2".parse().unwrap());
        let now = Instant::now();
        for _ in 0..3 {
            g.begin("alice", attacker, now).unwrap();
        }
        for _ in 0..2 {
            g.begin("alice", owner, now).unwrap();
        }
        g.begin("alice", owner, now).unwrap();
        g.succeeded("alice", owner);
        assert!(
            g.begin("alice", attacker, now).is_err(),
            "the attacker still waits"
        );
        for _ in 0..3 {
            g.begin("alice", owner, now).unwrap();
        }
    }

    #[test]
    fn the_account_ceiling_counts_all_sources() {
        let g = GuessLimiter::new(limits());
        let now = Instant::now();
        for i in 0..20u8 {
            let src = Source::of(IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)));
            g.begin("alice", src, now + u32::from(i) * SEC).unwrap();
        }
        let fresh = Source::of("203.0.113.9".parse().unwrap());
        assert_eq!(
            g.begin("alice", fresh, now + 20 * SEC),
            Err(Refusal::Account {
                retry_after: Duration::from_secs(3580)
            })
        );
        assert_eq!(g.begin("bob", fresh, now + 20 * SEC), Ok(()));
        assert_eq!(g.begin("alice", fresh, now + 3600 * SEC), Ok(()));
    }

    #[test]
    fn memory_stays_bounded() {
        let limiter = RateLimiter::new(Limit {
            max: 1,
            window: Duration::from_secs(3600),
        });
        let now = Instant::now();
        for i in 0..(MAX_KEYS as u32 + 10) {
            limiter.try_acquire(&i, now).unwrap();
        }
        assert!(lock(&limiter.events).len() <= MAX_KEYS);
    }
}
