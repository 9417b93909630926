//! Rate limits that hold across several relays on one Redis: attempts per
//! source, sends per sender, and password guessing per (account, source)
//! and per account, counted in Redis.
//!
//! Attempts and sends are counted in a sliding window estimated from two
//! fixed windows' counters (this one's count plus the last one's, weighted
//! by how much of it still overlaps): two small keys per sender or source
//! whatever the limit. A check reads them (a read costs Redis no fsync);
//! the relay's own events are added to them every [`FLUSH_EVERY`] in one
//! pipeline, and counted locally until then. A write per send would cost a
//! send one more fsync of Redis's append-only file: with one client, that
//! took a third off the send rate.
//!
//! Each relay still checks its own [`ratelimit`](crate::ratelimit) limiters
//! first (no round trip for what one relay already refuses); these counts
//! then make a client that spreads its attempts over the relays meet the
//! same limits as on one relay.
//!
//! If Redis cannot be reached the check is skipped with a warning: the
//! relay's own limits still hold, and every request that needs the store
//! fails anyway until Redis is back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ratelimit::{Limit, LoginLimits, Refusal, Source};

/// How often this relay's counted events are added to Redis's counters:
/// the other relays see them this much later at most.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// ARGV: pair key, account key, now ms, free failures, first delay ms, max
/// delay ms, forget after ms, per-account max, per-account window ms,
/// member → {0} taken, {1, ms} pair refused, {2, ms} account refused.
const GUESS_BEGIN: &str = r#"
local pair, acct, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local free, first, maxd, forget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local amax, awin = tonumber(ARGV[8]), tonumber(ARGV[9])
local p = redis.call('HMGET', pair, 'f', 'l', 'b')
local failures, blocked = 0, 0
if p[1] then
  failures, blocked = tonumber(p[1]), tonumber(p[3])
  if now - tonumber(p[2]) >= forget and blocked <= now then failures, blocked = 0, 0 end
end
if blocked > now then return {1, blocked - now} end
redis.call('ZREMRANGEBYSCORE', acct, '-inf', now - awin)
if redis.call('ZCARD', acct) >= amax then
  local f = redis.call('ZRANGE', acct, 0, 0, 'WITHSCORES')
  local wait = awin
  if f[2] then wait = tonumber(f[2]) + awin - now end
  return {2, math.max(wait, 0)}
end
failures = failures + 1
blocked = 0
if failures > free then
  local d = first * (2 ^ (failures - free - 1))
  if d > maxd then d = maxd end
  blocked = now + d
end
redis.call('HSET', pair, 'f', failures, 'l', now, 'b', blocked)
redis.call('PEXPIRE', pair, forget + maxd)
redis.call('ZADD', acct, now, ARGV[10])
redis.call('PEXPIRE', acct, awin)
return {0}
"#;

/// ARGV: pair key, account key → forget the pair, take back the attempt.
const GUESS_SUCCEEDED: &str = r#"
redis.call('DEL', ARGV[1])
redis.call('ZPOPMAX', ARGV[2])
return 1
"#;

/// The limits shared through Redis.
pub(crate) struct SharedLimits {
    /// Reconnects by itself after Redis went away.
    con: redis::aio::ConnectionManager,
    /// Events counted here and not yet added in Redis: counter key → (count,
    /// the key's lifetime in ms).
    pending: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    guess_begin: redis::Script,
    guess_succeeded: redis::Script,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedLimits")
    }
}

/// A unique member for a sorted set of events (two events in one
/// millisecond must both count).
fn member(now_ms: u64) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{now_ms}-{}-{n}", std::process::id())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SharedLimits {
    /// The limits, with a task that adds the counted events to Redis until
    /// `stop` (and once more then).
    pub(crate) async fn start(
        client: &redis::Client,
        stop: CancellationToken,
    ) -> redis::RedisResult<Arc<Self>> {
        let limits = Arc::new(Self {
            con: client.get_connection_manager().await?,
            pending: std::sync::Mutex::default(),
            guess_begin: redis::Script::new(GUESS_BEGIN),
            guess_succeeded: redis::Script::new(GUESS_SUCCEEDED),
        });
        let flusher = Arc::clone(&limits);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    () = stop.cancelled() => true,
                    _ = tick.tick() => false,
                };
                flusher.flush().await;
                if stopping {
                    return;
                }
            }
        });
        Ok(limits)
    }

    /// Add the events counted here to Redis's counters, in one pipeline.
    async fn flush(&self) {
        let pending = std::mem::take(&mut *crate::lock(&self.pending));
        if pending.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (key, (count, lifetime_ms)) in &pending {
            pipe.cmd("INCRBY").arg(key).arg(*count).ignore();
            pipe.cmd("PEXPIRE").arg(key).arg(*lifetime_ms).ignore();
        }
        let result: redis::RedisResult<()> = pipe.query_async(&mut self.con.clone()).await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not add this relay's counts to the shared limits; they are counted again");
            let mut again = crate::lock(&self.pending);
            for (key, (count, lifetime_ms)) in pending {
                again.entry(key).or_insert((0, lifetime_ms)).0 += count;
            }
        }
    }

    /// Count one event of `kind` for `key` at `now_ms` unless `limit` is
    /// reached across the relays; `Err` is how long until one is allowed.
    pub(crate) async fn acquire(
        &self,
        kind: &str,
        key: &str,
        limit: Limit,
        now_ms: u64,
    ) -> Result<(), Duration> {
        let window = ms(limit.window).max(1);
        let idx = now_ms / window;
        let elapsed = now_ms - idx * window;
        let base = format!("sc:rl:{kind}:{key}");
        let (prev_key, cur_key) = (
            format!("{base}:{}", idx.saturating_sub(1)),
            format!("{base}:{idx}"),
        );
        let result: redis::RedisResult<(Option<u64>, Option<u64>)> = async {
            redis::cmd("MGET")
                .arg(&prev_key)
                .arg(&cur_key)
                .query_async(&mut self.con.clone())
                .await
        }
        .await;
        let (prev, cur) = match result {
            Ok((prev, cur)) => (prev.unwrap_or(0), cur.unwrap_or(0)),
            Err(e) => {
                tracing::warn!(error = %e, kind, "shared rate limit unavailable; this relay's own limit applies");
                return Ok(());
            }
        };
        let mut pending = crate::lock(&self.pending);
        let local = |k: &str| pending.get(k).map_or(0, |(n, _)| *n);
        let (prev, cur) = (prev + local(&prev_key), cur + local(&cur_key));
        let max = u64::from(limit.max);
        // prev * (window - elapsed) / window + cur + 1 > max, in integers.
        let weighted = u128::from(prev) * u128::from(window - elapsed);
        let room = u128::from(max.saturating_sub(cur + 1)) * u128::from(window);
        if cur + 1 > max || weighted > room {
            // The next window starts without this one; before that, the
            // last window's weight may drop enough.
            let mut wait = window - elapsed;
            if prev > 0 && cur < max {
                let left = u128::from(max - cur - 1) * u128::from(window) / u128::from(prev);
                let enough = u128::from(window).saturating_sub(left);
                if enough > u128::from(elapsed) && enough < u128::from(window) {
                    wait = u64::try_from(enough).unwrap_or(window) - elapsed;
                }
            }
            return Err(Duration::from_millis(wait.max(1)));
        }
        pending.entry(cur_key).or_insert((0, window * 2)).0 += 1;
        Ok(())
    }

    fn guess_keys(scope: &str, account: &str, source: Source) -> (String, String) {
        (
            format!("sc:gl:{scope}:{{{account}}}:{source}"),
            format!("sc:ga:{scope}:{{{account}}}"),
        )
    }

    /// The shared half of [`GuessLimiter::begin`](crate::ratelimit::GuessLimiter::begin).
    pub(crate) async fn guess_begin(
        &self,
        scope: &str,
        account: &str,
        source: Source,
        limits: LoginLimits,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let (pair, acct) = Self::guess_keys(scope, account, source);
        let result: redis::RedisResult<Vec<i64>> = async {
            self.guess_begin
                .arg(&pair)
                .arg(&acct)
                .arg(now_ms)
                .arg(limits.free_failures)
                .arg(ms(limits.first_delay))
                .arg(ms(limits.max_delay))
                .arg(ms(limits.forget_after))
                .arg(limits.per_account.max)
                .arg(ms(limits.per_account.window))
                .arg(member(now_ms))
                .invoke_async(&mut self.con.clone())
                .await
        }
        .await;
        let wait = |ms: Option<&i64>| Duration::from_millis(ms.map_or(0, |m| m.unsigned_abs()));
        match result {
            Ok(answer) => match answer.first() {
                Some(1) => Err(Refusal::Pair {
                    retry_after: wait(answer.get(1)),
                }),
                Some(2) => Err(Refusal::Account {
                    retry_after: wait(answer.get(1)),
                }),
                _ => Ok(()),
            },
            Err(e) => {
                tracing::warn!(error = %e, "shared guess limit unavailable; this relay's own limit applies");
                Ok(())
            }
        }
    }

    /// The shared half of [`GuessLimiter::succeeded`](crate::ratelimit::GuessLimiter::succeeded).
    pub(crate) async fn guess_succeeded(&self, scope: &str, account: &str, source: Source) {
        let (pair, acct) = Self::guess_keys(scope, account, source);
        let result: redis::RedisResult<i64> = async {
            self.guess_succeeded
                .arg(&pair)
                .arg(&acct)
                .invoke_async(&mut self.con.clone())
                .await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not clear a shared guess count");
        }
    }
}
