//! The Lua scripts behind [`RedisStore`](super::RedisStore): each store
//! operation is one script, so it is atomic and one round trip.
//!
//! Key layout (`{name}` is the user's hash tag, so one user's keys would sit
//! in one cluster slot):
//!
//! ```text
//!  sc:{u}:acct  string  postcard Account          sc:dir         zset  active names (lex order)
//!  sc:{u}:pend  hash    r=record c=code e=expiry a=attempts   sc:pending  zset  name → expiry
//!  sc:{u}:actv  hash    c=code e=expiry a=attempts            sc:activations zset name → expiry
//!  sc:{u}:totp  string  last accepted TOTP step
//!  sc:sess:HEX  string  postcard Session          sc:sessions    zset  HEX → expiry
//!  sc:{u}:seq   string  last queue position       sc:owners      set   users with queue state
//!  sc:{u}:q     zset    seq → seq (queue order)   sc:totals      hash  m, b over all queues
//!  sc:{u}:qv    hash    seq → postcard QueueItem
//!  sc:{u}:qt    zset    seq → stored unix secs (for the sweep)
//!  sc:{u}:dd    hash    message id → seq (0: delivered, kept for dedupe)
//!  sc:{u}:ddt   zset    message id → stored or acked unix secs (for the sweep)
//!  sc:{u}:tot   hash    m, b waiting
//!  sc:{u}:snd   hash    seq → sender, for messages that count in a share
//!  sc:{u}:shm / shb  hash  sender → messages / bytes waiting from them
//! ```
//!
//! Numbers travel as decimal strings; scripts answer with strings (or
//! integers), never with nil inside an array.

/// The key of `username`'s account record (for the one operation done
/// outside a script: see `set_public_key`).
pub(super) fn account_key(username: &str) -> String {
    format!("sc:{{{username}}}:acct")
}

/// Helpers every script starts with.
const COMMON: &str = r#"
local function k(u, s) return 'sc:{' .. u .. '}:' .. s end
local function num(v) if v then return tonumber(v) else return 0 end end

local function append(o, id, item, now)
  local seq = redis.call('INCR', k(o, 'seq'))
  redis.call('ZADD', k(o, 'q'), seq, seq)
  redis.call('HSET', k(o, 'qv'), seq, item)
  redis.call('ZADD', k(o, 'qt'), now, seq)
  redis.call('HSET', k(o, 'dd'), id, seq)
  redis.call('ZADD', k(o, 'ddt'), now, id)
  redis.call('HINCRBY', k(o, 'tot'), 'm', 1)
  redis.call('HINCRBY', k(o, 'tot'), 'b', #item)
  redis.call('HINCRBY', 'sc:totals', 'm', 1)
  redis.call('HINCRBY', 'sc:totals', 'b', #item)
  redis.call('SADD', 'sc:owners', o)
  return seq
end

-- Store a pending registration of u from a: name, record, code hash,
-- expiry, attempts.
local function put_pending(u, a)
  redis.call('DEL', k(u, 'pend'))
  redis.call('HSET', k(u, 'pend'), 'r', a[2], 'c', a[3], 'e', a[4], 'a', a[5])
  redis.call('ZADD', 'sc:pending', a[4], u)
  return 1
end

-- a: recipient, sender ('' for none), id, item, now, quota messages, quota
-- bytes, share messages, share bytes, '1' to require an account → 0 stored,
-- 1 duplicate, 2 quota, 3 share, 4 unknown recipient. A stored message
-- wakes the recipient's push task on whichever relay holds the connection.
local function enqueue(a)
  local r, s, id, item, now = a[1], a[2], a[3], a[4], tonumber(a[5])
  if a[10] == '1' and redis.call('EXISTS', k(r, 'acct')) == 0 then return 4 end
  if redis.call('HEXISTS', k(r, 'dd'), id) == 1 then return 1 end
  local size = #item
  local t = redis.call('HMGET', k(r, 'tot'), 'm', 'b')
  if num(t[1]) + 1 > tonumber(a[6]) or num(t[2]) + size > tonumber(a[7]) then return 2 end
  if s ~= '' then
    local sm = num(redis.call('HGET', k(r, 'shm'), s))
    local sb = num(redis.call('HGET', k(r, 'shb'), s))
    if sm + 1 > tonumber(a[8]) or sb + size > tonumber(a[9]) then return 3 end
  end
  local seq = append(r, id, item, now)
  if s ~= '' then
    redis.call('HSET', k(r, 'snd'), seq, s)
    redis.call('HINCRBY', k(r, 'shm'), s, 1)
    redis.call('HINCRBY', k(r, 'shb'), s, size)
  end
  redis.call('PUBLISH', 'sc:wake', r)
  return 0
end

-- Remove the entry at seq from o's queue with its counts; returns whether
-- it was there.
local function remove_entry(o, seq)
  local item = redis.call('HGET', k(o, 'qv'), seq)
  if not item then return false end
  local size = #item
  redis.call('HDEL', k(o, 'qv'), seq)
  redis.call('ZREM', k(o, 'q'), seq)
  redis.call('ZREM', k(o, 'qt'), seq)
  if redis.call('HINCRBY', k(o, 'tot'), 'm', -1) <= 0 then
    redis.call('DEL', k(o, 'tot'))
  else
    redis.call('HINCRBY', k(o, 'tot'), 'b', -size)
  end
  redis.call('HINCRBY', 'sc:totals', 'm', -1)
  redis.call('HINCRBY', 'sc:totals', 'b', -size)
  local sender = redis.call('HGET', k(o, 'snd'), seq)
  if sender then
    redis.call('HDEL', k(o, 'snd'), seq)
    if redis.call('HINCRBY', k(o, 'shm'), sender, -1) <= 0 then
      redis.call('HDEL', k(o, 'shm'), sender)
      redis.call('HDEL', k(o, 'shb'), sender)
    else
      redis.call('HINCRBY', k(o, 'shb'), sender, -size)
    end
  end
  return true
end

-- Delete an acknowledged entry of r → 1 removed, 0 not queued.
local function ack(r, id, now)
  local seq = redis.call('HGET', k(r, 'dd'), id)
  if not seq or seq == '0' then return 0 end
  remove_entry(r, seq)
  -- Keep the id (as delivered) so a late resend is still a duplicate.
  redis.call('HSET', k(r, 'dd'), id, '0')
  redis.call('ZADD', k(r, 'ddt'), now, id)
  return 1
end
"#;

/// Prefix `body` with the helpers.
fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{COMMON}\n{body}"))
}

/// Every script, compiled once.
pub(super) struct Scripts {
    pub login_lookup: redis::Script,
    pub complete_login: redis::Script,
    pub resume_lookup: redis::Script,
    pub live_session_unread: redis::Script,
    pub account: redis::Script,
    pub directory: redis::Script,
    pub insert_pending: redis::Script,
    pub replace_pending: redis::Script,
    pub pending: redis::Script,
    pub take_code_attempt: redis::Script,
    pub remove_pending: redis::Script,
    pub activate: redis::Script,
    pub activate_pending: redis::Script,
    pub accept_totp_step: redis::Script,
    pub last_totp_step: redis::Script,
    pub put_session: redis::Script,
    pub session: redis::Script,
    pub remove_session: redis::Script,
    pub enqueue: redis::Script,
    pub ack: redis::Script,
    pub batch: redis::Script,
    pub entries_after: redis::Script,
    pub queue_len: redis::Script,
    pub sweep_scan: redis::Script,
    pub sweep_apply: redis::Script,
    pub counts: redis::Script,
}

impl Scripts {
    pub(super) fn all(&self) -> [&redis::Script; 26] {
        [
            &self.login_lookup,
            &self.complete_login,
            &self.resume_lookup,
            &self.live_session_unread,
            &self.account,
            &self.directory,
            &self.insert_pending,
            &self.replace_pending,
            &self.pending,
            &self.take_code_attempt,
            &self.remove_pending,
            &self.activate,
            &self.activate_pending,
            &self.accept_totp_step,
            &self.last_totp_step,
            &self.put_session,
            &self.session,
            &self.remove_session,
            &self.enqueue,
            &self.ack,
            &self.batch,
            &self.entries_after,
            &self.queue_len,
            &self.sweep_scan,
            &self.sweep_apply,
            &self.counts,
        ]
    }

    /// Whether running `script` twice does no harm: it only reads, or it
    /// is the enqueue (a second run finds the id and stores nothing).
    pub(super) fn retry_safe(&self, script: &redis::Script) -> bool {
        [
            &self.login_lookup,
            &self.resume_lookup,
            &self.live_session_unread,
            &self.account,
            &self.directory,
            &self.pending,
            &self.last_totp_step,
            &self.session,
            &self.enqueue,
            &self.entries_after,
            &self.queue_len,
            &self.sweep_scan,
            &self.counts,
        ]
        .iter()
        .any(|s| s.get_hash() == script.get_hash())
    }

    pub(super) fn new() -> Self {
        Self {
            // ARGV: name → {account or '', step or ''}
            login_lookup: script(
                r#"
local u = ARGV[1]
return {redis.call('GET', k(u, 'acct')) or '', redis.call('GET', k(u, 'totp')) or ''}
"#,
            ),
            // ARGV: name, step, token hash (hex), session record, session
            // expiry → -1 (code used), else the unread count
            complete_login: script(
                r#"
local u = ARGV[1]
local last = redis.call('GET', k(u, 'totp'))
if last and tonumber(ARGV[2]) <= tonumber(last) then return -1 end
redis.call('SET', k(u, 'totp'), ARGV[2])
redis.call('DEL', k(u, 'actv'))
redis.call('ZREM', 'sc:activations', u)
redis.call('SET', 'sc:sess:' .. ARGV[3], ARGV[4])
redis.call('ZADD', 'sc:sessions', ARGV[5], ARGV[3])
return num(redis.call('HGET', k(u, 'tot'), 'm'))
"#,
            ),
            // ARGV: token hash (hex), name → {session or '', account or ''}
            resume_lookup: script(
                r#"
return {redis.call('GET', 'sc:sess:' .. ARGV[1]) or '', redis.call('GET', k(ARGV[2], 'acct')) or ''}
"#,
            ),
            // ARGV: token hash (hex), name → -1 (no session), else the unread count
            live_session_unread: script(
                r#"
if redis.call('EXISTS', 'sc:sess:' .. ARGV[1]) == 0 then return -1 end
return num(redis.call('HGET', k(ARGV[2], 'tot'), 'm'))
"#,
            ),
            // ARGV: name
            account: script("return redis.call('GET', k(ARGV[1], 'acct'))"),
            // ARGV: after ('' for the start), limit → limit+1 names' accounts
            directory: script(
                r#"
local from = '-'
if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
local names = redis.call('ZRANGEBYLEX', 'sc:dir', from, '+', 'LIMIT', 0, tonumber(ARGV[2]) + 1)
local out = {}
for _, n in ipairs(names) do
  local a = redis.call('GET', k(n, 'acct'))
  if a then out[#out + 1] = a end
end
return out
"#,
            ),
            // ARGV: name, record, code hash, expiry, attempts, now
            insert_pending: script(
                r#"
local u = ARGV[1]
if redis.call('EXISTS', k(u, 'acct')) == 1 then return 0 end
local e = redis.call('HGET', k(u, 'pend'), 'e')
if e and tonumber(e) > tonumber(ARGV[6]) then return 0 end
return put_pending(u, ARGV)
"#,
            ),
            // ARGV: name, record, code hash, expiry, attempts, replaced code hash, now
            replace_pending: script(
                r#"
local u = ARGV[1]
if redis.call('EXISTS', k(u, 'acct')) == 1 then return 0 end
local p = redis.call('HMGET', k(u, 'pend'), 'c', 'e')
if not p[1] or tonumber(p[2]) <= tonumber(ARGV[7]) or p[1] ~= ARGV[6] then return 0 end
return put_pending(u, ARGV)
"#,
            ),
            // ARGV: name → {} or {record, attempts}
            pending: script(
                r#"
local p = redis.call('HMGET', k(ARGV[1], 'pend'), 'r', 'a')
if not p[1] then return {} end
return {p[1], p[2]}
"#,
            ),
            // ARGV: name, now, max attempts
            take_code_attempt: script(
                r#"
local u, now, max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local p = redis.call('HMGET', k(u, 'pend'), 'r', 'e', 'a')
if p[1] then
  if now >= tonumber(p[2]) then
    redis.call('DEL', k(u, 'pend'))
    redis.call('ZREM', 'sc:pending', u)
    return {'expired'}
  end
  if tonumber(p[3]) >= max then return {'locked', p[2]} end
  local a = redis.call('HINCRBY', k(u, 'pend'), 'a', 1)
  return {'counted', p[1], tostring(a)}
end
local v = redis.call('HMGET', k(u, 'actv'), 'c', 'e', 'a')
if not v[1] then return {'none'} end
if now >= tonumber(v[2]) then
  redis.call('DEL', k(u, 'actv'))
  redis.call('ZREM', 'sc:activations', u)
  return {'none'}
end
if tonumber(v[3]) >= max then return {'repeat_locked'} end
local acct = redis.call('GET', k(u, 'acct'))
if not acct then
  redis.call('DEL', k(u, 'actv'))
  redis.call('ZREM', 'sc:activations', u)
  return {'none'}
end
local a = redis.call('HINCRBY', k(u, 'actv'), 'a', 1)
return {'repeat', acct, v[1], v[2], tostring(a)}
"#,
            ),
            // ARGV: name
            remove_pending: script(
                r#"
redis.call('DEL', k(ARGV[1], 'pend'))
redis.call('ZREM', 'sc:pending', ARGV[1])
return 1
"#,
            ),
            // ARGV: name, account record
            activate: script(
                r#"
local u = ARGV[1]
if redis.call('EXISTS', k(u, 'acct')) == 1 then return 0 end
redis.call('SET', k(u, 'acct'), ARGV[2])
redis.call('ZADD', 'sc:dir', 0, u)
redis.call('DEL', k(u, 'pend'))
redis.call('ZREM', 'sc:pending', u)
return 1
"#,
            ),
            // ARGV: name, account record, code hash, expiry, attempts
            activate_pending: script(
                r#"
local u = ARGV[1]
if redis.call('EXISTS', k(u, 'acct')) == 1 then return 0 end
local c = redis.call('HGET', k(u, 'pend'), 'c')
if not c or c ~= ARGV[3] then return 0 end
redis.call('DEL', k(u, 'pend'))
redis.call('ZREM', 'sc:pending', u)
redis.call('SET', k(u, 'acct'), ARGV[2])
redis.call('ZADD', 'sc:dir', 0, u)
redis.call('HSET', k(u, 'actv'), 'c', ARGV[3], 'e', ARGV[4], 'a', ARGV[5])
redis.call('ZADD', 'sc:activations', ARGV[4], u)
return 1
"#,
            ),
            // ARGV: name, step
            accept_totp_step: script(
                r#"
local u = ARGV[1]
local last = redis.call('GET', k(u, 'totp'))
if last and tonumber(ARGV[2]) <= tonumber(last) then return 0 end
redis.call('SET', k(u, 'totp'), ARGV[2])
redis.call('DEL', k(u, 'actv'))
redis.call('ZREM', 'sc:activations', u)
return 1
"#,
            ),
            // ARGV: name
            last_totp_step: script("return redis.call('GET', k(ARGV[1], 'totp'))"),
            // ARGV: token hash (hex), record, expiry
            put_session: script(
                r#"
redis.call('SET', 'sc:sess:' .. ARGV[1], ARGV[2])
redis.call('ZADD', 'sc:sessions', ARGV[3], ARGV[1])
return 1
"#,
            ),
            // ARGV: token hash (hex)
            session: script("return redis.call('GET', 'sc:sess:' .. ARGV[1])"),
            // ARGV: token hash (hex)
            remove_session: script(
                r#"
redis.call('DEL', 'sc:sess:' .. ARGV[1])
redis.call('ZREM', 'sc:sessions', ARGV[1])
return 1
"#,
            ),
            // ARGV: recipient, sender ('' for none), id, item, now, quota
            // messages, quota bytes, share messages, share bytes, '1' to
            // require an account → 0 stored, 1 duplicate, 2 quota, 3 share,
            // 4 unknown recipient. A stored message wakes the recipient's
            // push task on whichever relay holds the connection.
            enqueue: script("return enqueue(ARGV)"),
            // ARGV: recipient, id, now → 1 removed, 0 not queued
            ack: script("return ack(ARGV[1], ARGV[2], ARGV[3])"),
            // ARGV: limits (quota messages, quota bytes, share messages,
            // share bytes), then per op 'E' recipient sender id item now, or
            // 'A' recipient id now → one code per op, as enqueue and ack
            // answer. One script for the whole batch: atomic, and one
            // script call instead of one per op.
            batch: script(
                r#"
local out = {}
local i = 5
while i <= #ARGV do
  if ARGV[i] == 'E' then
    out[#out + 1] = enqueue({ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5],
      ARGV[1], ARGV[2], ARGV[3], ARGV[4], '1'})
    i = i + 6
  else
    out[#out + 1] = ack(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  end
end
return out
"#,
            ),
            // ARGV: owner, after, limit → {seq, stored, item, ...}
            entries_after: script(
                r#"
local o = ARGV[1]
local seqs = redis.call('ZRANGEBYSCORE', k(o, 'q'), '(' .. ARGV[2], '+inf', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, seq in ipairs(seqs) do
  local item = redis.call('HGET', k(o, 'qv'), seq)
  if item then
    out[#out + 1] = seq
    out[#out + 1] = redis.call('ZSCORE', k(o, 'qt'), seq) or '0'
    out[#out + 1] = item
  end
end
return out
"#,
            ),
            // ARGV: owner
            queue_len: script("return num(redis.call('HGET', k(ARGV[1], 'tot'), 'm'))"),
            // ARGV: cutoff, limit → {owner, seq, stored, item, ...} for
            // entries stored before the cutoff that have a sender.
            sweep_scan: script(
                r#"
local cutoff, limit = ARGV[1], tonumber(ARGV[2])
local out = {}
for _, o in ipairs(redis.call('SMEMBERS', 'sc:owners')) do
  for _, seq in ipairs(redis.call('ZRANGEBYSCORE', k(o, 'qt'), '-inf', '(' .. cutoff)) do
    if #out >= limit * 4 then return out end
    if redis.call('HEXISTS', k(o, 'snd'), seq) == 1 then
      out[#out + 1] = o
      out[#out + 1] = seq
      out[#out + 1] = redis.call('ZSCORE', k(o, 'qt'), seq)
      out[#out + 1] = redis.call('HGET', k(o, 'qv'), seq) or ''
    end
  end
end
return out
"#,
            ),
            // ARGV: now, cutoff, then (owner, seq, notice id or '', notice
            // item) per scanned entry → {expired, notices, registrations,
            // activations, sessions, notified names...}
            sweep_apply: script(
                r#"
local now, cutoff = tonumber(ARGV[1]), ARGV[2]
local expired, notices = 0, 0
local notified = {}
for i = 3, #ARGV, 4 do
  local o, seq, nid, nitem = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local sender = redis.call('HGET', k(o, 'snd'), seq)
  if sender and remove_entry(o, seq) then
    expired = expired + 1
    if nid ~= '' and redis.call('EXISTS', k(sender, 'acct')) == 1
        and redis.call('HEXISTS', k(sender, 'dd'), nid) == 0 then
      append(sender, nid, nitem, now)
      notices = notices + 1
      if not notified[sender] then
        notified[sender] = true
        redis.call('PUBLISH', 'sc:wake', sender)
      end
    end
  end
end
for _, o in ipairs(redis.call('SMEMBERS', 'sc:owners')) do
  -- Entries with a sender not in the scan arrived since: the next sweep.
  for _, seq in ipairs(redis.call('ZRANGEBYSCORE', k(o, 'qt'), '-inf', '(' .. cutoff)) do
    if redis.call('HEXISTS', k(o, 'snd'), seq) == 0 and remove_entry(o, seq) then
      expired = expired + 1
    end
  end
  local ids = redis.call('ZRANGEBYSCORE', k(o, 'ddt'), '-inf', '(' .. cutoff)
  for _, id in ipairs(ids) do redis.call('HDEL', k(o, 'dd'), id) end
  redis.call('ZREMRANGEBYSCORE', k(o, 'ddt'), '-inf', '(' .. cutoff)
  if redis.call('EXISTS', k(o, 'q')) == 0 and redis.call('EXISTS', k(o, 'dd')) == 0 then
    redis.call('SREM', 'sc:owners', o)
  end
end
local function expire_index(index, drop)
  local names = redis.call('ZRANGEBYSCORE', index, '-inf', now)
  for _, n in ipairs(names) do drop(n) end
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  return #names
end
local regs = expire_index('sc:pending', function(n) redis.call('DEL', k(n, 'pend')) end)
local acts = expire_index('sc:activations', function(n) redis.call('DEL', k(n, 'actv')) end)
local sess = expire_index('sc:sessions', function(n) redis.call('DEL', 'sc:sess:' .. n) end)
local out = {expired, notices, regs, acts, sess}
for n, _ in pairs(notified) do out[#out + 1] = n end
return out
"#,
            ),
            counts: script(
                r#"
local t = redis.call('HMGET', 'sc:totals', 'm', 'b')
return {redis.call('ZCARD', 'sc:dir'), redis.call('ZCARD', 'sc:pending'), num(t[1]), num(t[2])}
"#,
            ),
        }
    }
}
