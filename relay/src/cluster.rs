//! Several relays on one Redis: who is online where, and the wake-ups and
//! presence news between relays.
//!
//! ```text
//!  relay A: login(bob) ──► bus task ──► script: sc:online[bob] = "A:7", PUBLISH sc:presence "J bob A:7 0"
//!  relay B: Send(for bob) ──► enqueue script ──► PUBLISH sc:wake "bob"
//!  every relay: SUBSCRIBE sc:wake, sc:presence ──► hub.notify / hub.remote_join / hub.remote_leave
//!  every relay: heartbeat ZADD sc:relays; the users of a relay silent for 15 s are logged out
//! ```
//!
//! The newest login of a user wins across relays as on one: a relay that
//! hears another relay took a user's login closes its own connection of
//! that user ("superseded"). Logins and logouts of one relay go through one
//! task, in order, so a connection's logout never overtakes its login.
//!
//! While the subscription is down (Redis restarting), news is missed: on
//! subscribing again the relay reads who is online afresh and wakes every
//! local push task, which re-reads its queue.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;

/// How often a relay says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A relay silent for this long is taken as dead: its users go offline.
const DEAD_AFTER: Duration = Duration::from_secs(15);
/// Wait before reconnecting after Redis went away.
const RETRY: Duration = Duration::from_secs(1);

/// ARGV: user, holder → the login's number. Logins are numbered in the
/// order Redis runs them, so every relay agrees which one is the latest.
const LOGIN: &str = r#"
local seq = redis.call('INCR', 'sc:online_seq')
local prev = redis.call('HGET', 'sc:online', ARGV[1])
redis.call('HSET', 'sc:online', ARGV[1], ARGV[2])
local was = '0'
if prev then was = '1' end
redis.call('PUBLISH', 'sc:presence', 'J ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. was .. ' ' .. seq)
return seq
"#;

const LOGOUT: &str = r#"
if redis.call('HGET', 'sc:online', ARGV[1]) == ARGV[2] then
  redis.call('HDEL', 'sc:online', ARGV[1])
  redis.call('PUBLISH', 'sc:presence', 'L ' .. ARGV[1] .. ' ' .. ARGV[2])
end
return 1
"#;

/// ARGV: this relay, now (ms), dead-after (ms). Marks this relay alive and
/// logs out the users of relays that have gone silent.
const HEARTBEAT_SCRIPT: &str = r#"
redis.call('ZADD', 'sc:relays', ARGV[2], ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', 'sc:relays', '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
if #dead == 0 then return 0 end
local gone = {}
for _, r in ipairs(dead) do gone[r] = true; redis.call('ZREM', 'sc:relays', r) end
local all = redis.call('HGETALL', 'sc:online')
local n = 0
for i = 1, #all, 2 do
  local user, holder = all[i], all[i + 1]
  local relay = string.match(holder, '^([^:]+):')
  if relay and gone[relay] then
    redis.call('HDEL', 'sc:online', user)
    redis.call('PUBLISH', 'sc:presence', 'L ' .. user .. ' ' .. holder)
    n = n + 1
  end
end
return n
"#;

/// The online users of every live relay.
const ONLINE: &str = r#"
local live = {}
for _, r in ipairs(redis.call('ZRANGEBYSCORE', 'sc:relays', tonumber(ARGV[1]) - tonumber(ARGV[2]), '+inf')) do
  live[r] = true
end
live[ARGV[3]] = true
local all = redis.call('HGETALL', 'sc:online')
local out = {}
for i = 1, #all, 2 do
  local relay = string.match(all[i + 1], '^([^:]+):')
  if relay and live[relay] then out[#out + 1] = all[i] end
end
return out
"#;

enum Event {
    Login { user: String, conn_id: u64 },
    Logout { user: String, conn_id: u64 },
}

/// This relay's handle on the shared presence.
pub(crate) struct Cluster {
    /// This relay's id in holders ("<id>:<conn>"), random per start.
    id: String,
    events: mpsc::UnboundedSender<Event>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cluster({})", self.id)
    }
}

impl Cluster {
    /// Start the bus task and the subscriber for `hub`; both stop with
    /// `stop`.
    pub(crate) fn start(
        client: redis::Client,
        hub: Arc<Hub>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let id = format!("{:016x}", rand_id());
        let (events, rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Self {
            id: id.clone(),
            events,
        });
        tokio::spawn(bus(
            client.clone(),
            id.clone(),
            Arc::clone(&hub),
            rx,
            stop.clone(),
        ));
        tokio::spawn(subscriber(client, id, hub, stop));
        cluster
    }

    /// `user` logged in on this relay's connection `conn_id`.
    pub(crate) fn login(&self, user: &str, conn_id: u64) {
        let _ = self.events.send(Event::Login {
            user: user.to_string(),
            conn_id,
        });
    }

    /// `user`'s live connection `conn_id` on this relay ended.
    pub(crate) fn logout(&self, user: &str, conn_id: u64) {
        let _ = self.events.send(Event::Logout {
            user: user.to_string(),
            conn_id,
        });
    }
}

fn rand_id() -> u64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // Only uniqueness matters; the time and pid are a fine fallback.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(bytes)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Apply logins and logouts in order, and beat the heart.
async fn bus(
    client: redis::Client,
    id: String,
    hub: Arc<Hub>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    stop: CancellationToken,
) {
    let login = redis::Script::new(LOGIN);
    let logout = redis::Script::new(LOGOUT);
    let heartbeat = redis::Script::new(HEARTBEAT_SCRIPT);
    // Reconnects by itself once it has connected the first time.
    let mut con = loop {
        match client.get_connection_manager().await {
            Ok(con) => break con,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Redis for presence; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    };
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            // Events first: the logouts of a relay shutting down still go out.
            biased;
            event = rx.recv() => match event {
                Some(event) => Some(event),
                None => return,
            },
            () = stop.cancelled() => return,
            _ = tick.tick() => None,
        };
        // An event is retried until Redis takes it: a lost logout would
        // leave the user online for ever.
        loop {
            let c = &mut con;
            let result: redis::RedisResult<i64> = match &event {
                None => {
                    heartbeat
                        .arg(&id)
                        .arg(now_ms())
                        .arg(DEAD_AFTER.as_millis() as u64)
                        .invoke_async(c)
                        .await
                }
                Some(Event::Login { user, conn_id }) => {
                    login
                        .arg(user)
                        .arg(format!("{id}:{conn_id}"))
                        .invoke_async(c)
                        .await
                }
                Some(Event::Logout { user, conn_id }) => {
                    logout
                        .arg(user)
                        .arg(format!("{id}:{conn_id}"))
                        .invoke_async(c)
                        .await
                }
            };
            match result {
                Ok(n) => {
                    match &event {
                        None if n > 0 => {
                            tracing::info!(users = n, "a relay went silent; its users are offline");
                        }
                        Some(Event::Login { user, conn_id }) => {
                            hub.login_recorded(user, *conn_id, n.unsigned_abs());
                        }
                        _ => {}
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "presence update failed; retrying");
                    if event.is_none() {
                        break;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
    }
}

/// Hear the other relays: wake-ups and presence news.
async fn subscriber(client: redis::Client, id: String, hub: Arc<Hub>, stop: CancellationToken) {
    let online = redis::Script::new(ONLINE);
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = listen(&client, &id, &hub, &online) => r,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "lost the Redis subscription; resubscribing");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn listen(
    client: &redis::Client,
    id: &str,
    hub: &Hub,
    online: &redis::Script,
) -> redis::RedisResult<()> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe("sc:wake").await?;
    pubsub.subscribe("sc:presence").await?;
    // Subscribed: read who is online now and look at every queue, for
    // what happened while the subscription was down.
    let mut con = client.get_multiplexed_async_connection().await?;
    let users: Vec<String> = online
        .arg(now_ms())
        .arg(DEAD_AFTER.as_millis() as u64)
        .arg(id)
        .invoke_async(&mut con)
        .await?;
    drop(con);
    hub.reset_global(users);
    hub.notify_all();
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let Ok(payload) = msg.get_payload::<String>() else {
            continue;
        };
        match msg.get_channel_name() {
            "sc:wake" => hub.notify(&payload),
            "sc:presence" => {
                let fields: Vec<&str> = payload.split(' ').take(5).collect();
                match fields.as_slice() {
                    ["J", user, holder, was, seq] => {
                        let mine = holder.split(':').next() == Some(id);
                        let seq = seq.parse().unwrap_or(u64::MAX);
                        hub.remote_join(user, mine, *was == "1", seq);
                    }
                    ["L", user, _] => hub.remote_leave(user),
                    _ => tracing::warn!("an unreadable presence message on Redis; ignored"),
                }
            }
            _ => {}
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Io,
        "the subscription ended",
    )))
}
