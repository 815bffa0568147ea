//! The Redis side. The only module that imports `redis`.
//!
//! Delivery rule: a batch's writes and the offsets that cover them are
//! applied by ONE server-side script, which Redis runs atomically like a
//! MULTI/EXEC transaction (G2). The script first checks that the agent's
//! marker key still holds this agent's token and refuses to write anything if
//! not (G4): a FLUSHALL, a restart without persistence or a new instance can
//! therefore never be followed by a write that recreates offsets at a late
//! position. A plain MULTI/EXEC cannot make that check inside the
//! transaction on a shared connection (WATCH is per connection); the script
//! can, in the same round trip.
//!
//! Errors are split by what the caller must do: [`SinkError::Unreachable`]
//! means keep the batch and retry; [`SinkError::Lost`] means Redis no longer
//! holds our state, so drop the batch and rehydrate.

use crate::batch::{Batch, Op};
use crate::checkpoint::{lineage_field, offset_field, StoredOffsets};
use crate::codec::{self, Fields};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use std::time::Duration;

/// How long one Redis call may take before the connection counts as down.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

const APPLY_SCRIPT: &str = r#"
-- KEYS[1] marker, KEYS[2] offsets hash, KEYS[3] status hash, KEYS[4] resync
-- seen set, KEYS[5] field table, KEYS[6..] data keys: first n_sets keys to
-- SET, then n_dels keys to DEL, then keys with an op each.
-- ARGV[1] token, ARGV[2] the apply sequence number Redis must hold,
-- ARGV[3] n_parts, ARGV[4] now_ms, ARGV[5] channel to PUBLISH changes on
-- ('' for none), ARGV[6] n_fields, ARGV[7] n_sets, ARGV[8] n_dels,
-- then n_fields (number, name) pairs of the field table that the values
-- use, n_parts (offset field, next offset, then the five counters added:
-- records filtered skipped_undecodable skipped_no_key skipped_oversize)
-- septuples, n_sets values, then one (op, value) pair per remaining key:
-- op "s" = SET value, "d" = DEL, "x<ms>" = SET value expiring at Unix time
-- <ms>; "h<n>" or "h<n>:<ms>" = replace the key with a hash (the hash
-- store) of the n (field, value) pairs that follow the op instead of one
-- value, expiring at <ms> if given. During a resync: the same op in upper
-- case ("S", "D", "X<ms>", "H<n>") also adds the key to the seen set
-- (removes it for "D"); "n" / "u" only add / remove it, writing nothing.
--
-- Redis keeps what a script wrote before an error, and a torn append-only
-- file can keep any prefix of its effects. So: every check comes before
-- the first write, and the writes go data first, then ONE HSET with every
-- offset, per-partition counter and the sequence number, then the totals.
-- Any prefix leaves data ahead of its offsets (read again, harmless), never
-- offsets or counters ahead of data.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('EDGECACHE_LOST marker missing or replaced')
end
local kinds = {'hash', 'hash', 'set', 'hash'}
for i = 2, 5 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= kinds[i - 1] then
    return redis.error_reply('EDGECACHE_WRONGTYPE ' .. KEYS[i] .. ' is a ' .. t .. ', not a ' .. kinds[i - 1])
  end
end
local seq = redis.call('HGET', KEYS[2], 'seq') or '0'
if seq ~= ARGV[2] then
  return redis.error_reply('EDGECACHE_DIVERGED Redis holds apply ' .. seq .. ', the agent last wrote ' .. ARGV[2])
end
local channel = ARGV[5]
if channel ~= '' and redis.acl_check_cmd and not redis.acl_check_cmd('PUBLISH', channel, 'x') then
  return redis.error_reply('EDGECACHE_NOPERM no permission to PUBLISH on channel ' .. channel)
end
local n_fields = tonumber(ARGV[6])
local a = 9
for i = 1, n_fields do
  local held = redis.call('HGET', KEYS[5], ARGV[a])
  if held and held ~= ARGV[a + 1] then
    -- Someone else changed the table, so values already stored may read
    -- wrong: give up the state (the marker) and let the agent rewrite all.
    redis.call('DEL', KEYS[1])
    return redis.error_reply('EDGECACHE_LOST field ' .. ARGV[a] .. ' names something else in Redis')
  end
  a = a + 2
end
local fields_end = a - 1
-- Counters: the partitions' own (absolute, next to their offsets) and the
-- totals in the status hash, read and checked before anything is written.
local n_parts = tonumber(ARGV[3])
local totals = {0, 0, 0, 0, 0}
local names = {'records', 'filtered', 'skipped_undecodable', 'skipped_no_key', 'skipped_oversize'}
local held_totals = redis.call('HMGET', KEYS[3], unpack(names))
for i = 1, 5 do
  if held_totals[i] then
    totals[i] = tonumber(held_totals[i])
    if not totals[i] then
      return redis.error_reply('EDGECACHE_WRONGTYPE ' .. KEYS[3] .. ' field ' .. names[i] .. ' is not a number')
    end
  end
end
-- Per partition: its offset and its counters (field '<counter>@<topic>/<p>'),
-- absolute, all in the one HSET below.
local offsets = {'seq', string.format('%d', tonumber(seq) + 1)}
for i = 1, n_parts do
  offsets[#offsets + 1] = ARGV[a]
  offsets[#offsets + 1] = ARGV[a + 1]
  for j = 1, 5 do
    local added = tonumber(ARGV[a + 1 + j])
    if added > 0 then
      local field = names[j] .. '@' .. ARGV[a]
      local held = redis.call('HGET', KEYS[2], field)
      local count = tonumber(held or '0')
      if not count then
        return redis.error_reply('EDGECACHE_WRONGTYPE ' .. KEYS[2] .. ' field ' .. field .. ' is not a number')
      end
      offsets[#offsets + 1] = field
      offsets[#offsets + 1] = string.format('%d', count + added)
      totals[j] = totals[j] + added
    end
  end
  a = a + 7
end
-- Writes. Names before the values that use them.
if n_fields > 0 then
  redis.call('HSET', KEYS[5], unpack(ARGV, 9, fields_end))
end
-- Plain writes, many keys per call (a call from Lua costs more than a key);
-- unpack() is bounded by Lua's C stack, hence chunks.
local k = 6
local n = tonumber(ARGV[7])
local sets_from, sets_to = k, k + n - 1
local done = 0
while done < n do
  local chunk = math.min(n - done, 500)
  local args = {}
  for j = 0, chunk - 1 do
    args[2 * j + 1] = KEYS[k + done + j]
    args[2 * j + 2] = ARGV[a + done + j]
  end
  redis.call('MSET', unpack(args))
  done = done + chunk
end
a = a + n
k = k + n
n = tonumber(ARGV[8])
local dels_from, dels_to = k, k + n - 1
done = 0
while done < n do
  local chunk = math.min(n - done, 500)
  redis.call('DEL', unpack(KEYS, k + done, k + done + chunk - 1))
  done = done + chunk
end
k = k + n
-- How many ARGV an op takes, itself included.
local function width(op)
  local c = string.sub(op, 1, 1)
  if c == 'h' or c == 'H' then
    return 1 + 2 * tonumber(string.match(op, '^.(%d+)'))
  end
  return 2
end
local general_from, general_a = k, a
for k = k, #KEYS do
  local op = ARGV[a]
  local c = string.sub(op, 1, 1)
  if c == 'n' then
    redis.call('SADD', KEYS[4], KEYS[k])
  elseif c == 'u' then
    redis.call('SREM', KEYS[4], KEYS[k])
  else
    local lower = string.lower(c)
    if lower == 'd' then
      redis.call('DEL', KEYS[k])
    elseif lower == 's' then
      redis.call('SET', KEYS[k], ARGV[a + 1])
    elseif lower == 'h' then
      -- The whole hash replaced: fields the record no longer has go too.
      local pairs_n, at = string.match(op, '^.(%d+):?(%d*)$')
      pairs_n = tonumber(pairs_n)
      redis.call('DEL', KEYS[k])
      done = 0
      while done < pairs_n do
        local chunk = math.min(pairs_n - done, 500)
        redis.call('HSET', KEYS[k], unpack(ARGV, a + 1 + 2 * done, a + 2 * (done + chunk)))
        done = done + chunk
      end
      if at ~= '' then
        redis.call('PEXPIREAT', KEYS[k], at)
      end
    else
      redis.call('SET', KEYS[k], ARGV[a + 1], 'PXAT', string.sub(op, 2))
    end
    if c ~= lower then
      redis.call(lower == 'd' and 'SREM' or 'SADD', KEYS[4], KEYS[k])
    end
  end
  a = a + width(op)
end
redis.call('HSET', KEYS[2], unpack(offsets))
redis.call('HSET', KEYS[3],
  'records', string.format('%d', totals[1]), 'filtered', string.format('%d', totals[2]),
  'skipped_undecodable', string.format('%d', totals[3]), 'skipped_no_key', string.format('%d', totals[4]),
  'skipped_oversize', string.format('%d', totals[5]), 'last_applied_ms', ARGV[4])
-- Notifications last: a reader woken by one finds the write done.
if channel ~= '' then
  for j = sets_from, sets_to do
    redis.call('PUBLISH', channel, 'set ' .. KEYS[j])
  end
  for j = dels_from, dels_to do
    redis.call('PUBLISH', channel, 'del ' .. KEYS[j])
  end
  a = general_a
  for j = general_from, #KEYS do
    local c = string.lower(string.sub(ARGV[a], 1, 1))
    if c ~= 'n' and c ~= 'u' then
      redis.call('PUBLISH', channel, (c == 'd' and 'del ' or 'set ') .. KEYS[j])
    end
    a = a + width(ARGV[a])
  end
end
return #KEYS - 5
"#;

/// The end of a resync: of one page of keys under a resynced topic's
/// prefix, deletes those the re-read did not see. Marker-checked like an
/// apply, and atomic per page.
const SWEEP_SCRIPT: &str = r#"
-- KEYS[1] marker, KEYS[2] seen set, KEYS[3] status hash, KEYS[4] offsets
-- hash, KEYS[5..] candidates
-- ARGV[1] token, ARGV[2] channel ('' for none), ARGV[3] apply sequence
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('EDGECACHE_LOST marker missing or replaced')
end
if redis.call('TYPE', KEYS[4])['ok'] == 'hash' and (redis.call('HGET', KEYS[4], 'seq') or '0') ~= ARGV[3] then
  -- A seen set from another time would delete keys Kafka still has.
  return redis.error_reply('EDGECACHE_DIVERGED Redis changed under the agent')
end
local n = 0
for k = 5, #KEYS do
  if redis.call('SISMEMBER', KEYS[2], KEYS[k]) == 0 then
    n = n + redis.call('DEL', KEYS[k])
    if ARGV[2] ~= '' then
      redis.call('PUBLISH', ARGV[2], 'del ' .. KEYS[k])
    end
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[3], 'swept', n)
end
return n
"#;

/// Adopt the marker if it exists; otherwise create it and drop any offsets
/// and counters left without one, since they no longer describe what Redis
/// holds. The field table stays: values still in Redis may refer to it, and
/// the agent only adds to it.
const INIT_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  return {current, 0}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return {ARGV[1], 1}
"#;

/// Sets the totals in the status hash to the sums of the per-partition
/// counters, the ones that move with the offsets. Run at every (re)connect:
/// a torn append-only file can replay part of a transaction, and only the
/// per-partition counters are kept exact through that. Offsets written by
/// an agent without per-partition counters keep their totals as one entry;
/// without any offsets (a foreign app deleted them) every total is 0, since
/// everything is read and counted again.
const RECONCILE_SCRIPT: &str = r#"
-- KEYS[1] marker, KEYS[2] offsets hash, KEYS[3] status hash; ARGV[1] token
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('EDGECACHE_LOST marker missing or replaced')
end
local names = {'records', 'filtered', 'skipped_undecodable', 'skipped_no_key', 'skipped_oversize'}
local totals = {0, 0, 0, 0, 0}
local found = false
local index = {}
for i = 1, 5 do
  index[names[i]] = i
end
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local at = string.find(all[i], '@', 1, true)
  if at then
    found = true
    local j = index[string.sub(all[i], 1, at - 1)]
    if j then
      totals[j] = totals[j] + (tonumber(all[i + 1]) or 0)
    end
  end
end
-- Offsets without per-partition counters were written by an older agent:
-- keep its totals. No offsets at all: nothing is counted as applied.
if not found and #all > 0 then
  local held = redis.call('HMGET', KEYS[3], unpack(names))
  local any = false
  for i = 1, 5 do
    totals[i] = tonumber(held[i]) or 0
    any = any or totals[i] > 0
  end
  if any then
    local kept = {}
    for i = 1, 5 do
      kept[#kept + 1] = names[i] .. '@before-per-partition-counters'
      kept[#kept + 1] = string.format('%d', totals[i])
    end
    redis.call('HSET', KEYS[2], unpack(kept))
  end
end
redis.call('HSET', KEYS[3],
  'records', string.format('%d', totals[1]), 'filtered', string.format('%d', totals[2]),
  'skipped_undecodable', string.format('%d', totals[3]), 'skipped_no_key', string.format('%d', totals[4]),
  'skipped_oversize', string.format('%d', totals[5]))
return 1
"#;

/// The idle check: is the marker ours, and which apply does Redis hold?
const CHECK_SCRIPT: &str = r#"
-- KEYS[1] marker, KEYS[2] offsets hash; ARGV[1] token
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0, '0'}
end
if redis.call('TYPE', KEYS[2])['ok'] ~= 'hash' then
  return {1, '0'}
end
return {1, redis.call('HGET', KEYS[2], 'seq') or '0'}
"#;

/// Asks Redis, as the agent's own user, whether each command the agent
/// needs is allowed (`redis.acl_check_cmd`, Redis 7): ARGV holds the
/// commands, each as its word count followed by its words. Returns the
/// first denied one as text, '' when all are allowed, or 'unsupported' on a
/// Redis without the function.
const PERMISSIONS_SCRIPT: &str = r#"
if not redis.acl_check_cmd then
  return 'unsupported'
end
local a = 1
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  local words = {}
  for i = 1, n do
    words[i] = ARGV[a + i]
  end
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(words))
  if not ok or not allowed then
    return table.concat(words, ' ')
  end
  a = a + n + 1
end
return ''
"#;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Redis unreachable: {0}")]
    Unreachable(String),
    #[error("Redis lost the agent's state (marker missing): rehydrate")]
    Lost,
    /// Redis holds another apply than the agent last wrote: it went back in
    /// time (an older snapshot, a promoted replica, a torn append-only file)
    /// or a write the agent saw fail was in fact applied.
    #[error("Redis changed under the agent: {0}")]
    Diverged(String),
    /// Redis answered with an error; `code` is its error code (`OOM`,
    /// `MISCONF`, `READONLY`, `NOPERM`, `WRONGTYPE`, ...), the first word
    /// of the reply, never matched against the rest of the text.
    #[error("Redis refused the request: {message}")]
    Refused { code: String, message: String },
}

impl SinkError {
    fn refused(code: &str, message: impl Into<String>) -> SinkError {
        SinkError::Refused {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// Why writes do not go through, for the status hash: a Redis error
    /// code, or `unreachable`.
    pub fn reason(&self) -> &str {
        match self {
            SinkError::Unreachable(_) => "unreachable",
            SinkError::Lost => "lost",
            SinkError::Diverged(_) => "diverged",
            SinkError::Refused { code, .. } => code,
        }
    }
}

impl From<redis::RedisError> for SinkError {
    fn from(e: redis::RedisError) -> Self {
        // Our scripts' own errors carry a fixed code as the reply's first word.
        match e.code() {
            Some("EDGECACHE_LOST") => {
                if let Some(detail) = e.detail().filter(|d| d.starts_with("field")) {
                    tracing::warn!("Redis's field table changed under the agent: {detail}");
                }
                return SinkError::Lost;
            }
            Some("EDGECACHE_DIVERGED") => {
                return SinkError::Diverged(e.detail().unwrap_or_default().to_owned())
            }
            Some("EDGECACHE_WRONGTYPE") => {
                return SinkError::refused("WRONGTYPE", e.detail().unwrap_or_default())
            }
            Some("EDGECACHE_NOPERM") => {
                return SinkError::refused("NOPERM", e.detail().unwrap_or_default())
            }
            _ => {}
        }
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || matches!(
                e.kind(),
                redis::ErrorKind::BusyLoadingError | redis::ErrorKind::TryAgain
            )
        {
            SinkError::Unreachable(e.to_string())
        } else if e.kind() == redis::ErrorKind::AuthenticationFailed {
            SinkError::refused(
                "NOAUTH",
                format!(
                "authentication failed (check the user and password in redis.url or redis.password_file): {e}"
            ),
            )
        } else {
            let code = e.code().unwrap_or("ERR").to_owned();
            SinkError::Refused {
                code,
                message: e.to_string(),
            }
        }
    }
}

/// What the idle check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Redis holds the agent's state as the agent last wrote it.
    Ours,
    /// The marker is gone or another: rehydrate.
    Lost,
    /// The marker is ours but the apply sequence is another.
    Diverged,
}

/// An apply sent by [`Sink::submit`], its reply still to come.
pub type PendingApply = tokio::task::JoinHandle<Result<(), SinkError>>;

/// The outcome of a [`PendingApply`].
pub fn finish(
    joined: Result<Result<(), SinkError>, tokio::task::JoinError>,
) -> Result<(), SinkError> {
    joined.unwrap_or_else(|e| Err(SinkError::Unreachable(format!("apply task ended: {e}"))))
}

/// Runs an apply command. A Redis that restarted or ran SCRIPT FLUSH no
/// longer has the script cached: then it loads it and sends the same
/// command again.
async fn run_apply(
    mut connection: MultiplexedConnection,
    command: redis::Cmd,
) -> Result<(), SinkError> {
    let mut result = command.query_async::<i64>(&mut connection).await;
    if matches!(&result, Err(e) if e.kind() == redis::ErrorKind::NoScriptError) {
        let loaded = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(APPLY_SCRIPT)
            .query_async::<String>(&mut connection)
            .await;
        result = match loaded {
            Ok(_) => command.query_async::<i64>(&mut connection).await,
            Err(e) => Err(e),
        };
    }
    result.map(|_| ()).map_err(SinkError::from)
}

/// What [`Sink::init`] found.
#[derive(Debug)]
pub struct InitOutcome {
    /// True when the marker was missing: Redis holds none of our state.
    pub fresh: bool,
    pub offsets: StoredOffsets,
    /// When the agent last knew every partition read to its end
    /// (`caught_up_ms` in the status hash), or else when the marker was
    /// created: the start of the window in which deletes may have been
    /// missed.
    pub caught_up_ms: i64,
    /// The field table Redis holds (`<ns>:fields`).
    pub fields: Fields,
}

/// Keys of the agent's own meta data.
#[derive(Debug, Clone)]
pub struct MetaKeys {
    pub marker: String,
    pub offsets: String,
    pub status: String,
    /// During a resync: the keys seen again (a set).
    pub seen: String,
    /// The field table of stored format 2 (a hash, number → name).
    pub fields: String,
}

impl MetaKeys {
    pub fn new(namespace: &str) -> MetaKeys {
        MetaKeys {
            marker: format!("{namespace}:marker"),
            offsets: format!("{namespace}:offsets"),
            status: format!("{namespace}:status"),
            seen: format!("{namespace}:seen"),
            fields: format!("{namespace}:fields"),
        }
    }
}

#[derive(Debug)]
pub struct Sink {
    client: Client,
    connection: Option<MultiplexedConnection>,
    keys: MetaKeys,
    token: String,
    apply: Script,
    init: Script,
    sweep: Script,
    reconcile: Script,
    check: Script,
    /// The apply sequence number Redis holds as far as the agent knows: the
    /// one it loaded or last wrote (see `checkpoint::SEQ_FIELD`).
    seq: u64,
    topic_names: Vec<String>,
    publish_channel: Option<String>,
    /// Key prefixes of the topics being resynced: their writes also update
    /// the seen set.
    tracked: Vec<Vec<u8>>,
    /// The read functions' library (crate::functions), loaded by `init`.
    read_functions: Option<String>,
}

impl Sink {
    /// Parses the URL; connects lazily on first use, so a Redis that is down
    /// at start is retried like one that goes down later.
    pub fn new(
        url: &str,
        password: Option<&str>,
        namespace: &str,
        topic_names: Vec<String>,
        publish_channel: Option<String>,
    ) -> Result<Sink, SinkError> {
        use redis::IntoConnectionInfo;
        let mut info = url
            .into_connection_info()
            .map_err(|e| SinkError::refused("CONFIG", e.to_string()))?;
        if let Some(password) = password {
            info.redis.password = Some(password.to_owned());
        }
        let client = Client::open(info).map_err(|e| SinkError::refused("CONFIG", e.to_string()))?;
        Ok(Sink {
            client,
            connection: None,
            keys: MetaKeys::new(namespace),
            token: String::new(),
            apply: Script::new(APPLY_SCRIPT),
            init: Script::new(INIT_SCRIPT),
            sweep: Script::new(SWEEP_SCRIPT),
            reconcile: Script::new(RECONCILE_SCRIPT),
            check: Script::new(CHECK_SCRIPT),
            seq: 0,
            topic_names,
            publish_channel,
            tracked: Vec::new(),
            read_functions: None,
        })
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, SinkError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        // TCP_NODELAY: with Nagle's algorithm on (redis-rs's default) the
        // tail of an apply script's command waits for Redis to ACK its head,
        // and Redis delays that ACK (40 ms on Linux) while it waits for the
        // rest: 96-record applies took 25-70 ms instead of under 1 ms, and
        // live latency at 20k records/s had a p99 of 60-350 ms
        // (BENCHMARKS.md). Unix sockets are not affected.
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CALL_TIMEOUT)
            .set_response_timeout(CALL_TIMEOUT)
            .set_tcp_settings(tcp);
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }

    /// Runs a call; on a connection failure forgets the connection so the
    /// next call reconnects.
    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, SinkError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let connection = self.connection().await?;
        let result = f(connection).await.map_err(SinkError::from);
        if matches!(result, Err(SinkError::Unreachable(_))) {
            self.connection = None;
        }
        result
    }

    /// Adopts or creates the marker, then reads the stored offsets.
    pub async fn init(&mut self) -> Result<InitOutcome, SinkError> {
        let candidate = new_token();
        let keys = self.keys.clone();
        let init = self.init.clone();
        let (token, created): (String, i64) = self
            .call(|mut c| async move {
                init.key(&keys.marker)
                    .key(&keys.offsets)
                    .key(&keys.status)
                    .key(&keys.seen)
                    .arg(&candidate)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        self.token = token;
        self.install_read_functions().await?;
        let offsets = self.load_offsets().await?;
        self.seq = offsets.seq;
        let keys = self.keys.clone();
        let reconcile = self.reconcile.clone();
        let token = self.token.clone();
        self.call(|mut c| async move {
            reconcile
                .key(&keys.marker)
                .key(&keys.offsets)
                .key(&keys.status)
                .arg(&token)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await?;
        let key = self.keys.status.clone();
        let stored: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("HGET")
                    .arg(&key)
                    .arg("caught_up_ms")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let marker_ms = token_ms(&self.token).unwrap_or_else(now_ms);
        let caught_up_ms = stored
            .and_then(|v| v.parse::<i64>().ok())
            .map_or(marker_ms, |ms| ms.max(marker_ms));
        let fields = self.fields().await?;
        Ok(InitOutcome {
            fresh: created == 1,
            offsets,
            caught_up_ms,
            fields,
        })
    }

    /// Reads the field table (`<ns>:fields`). Read it after the values it
    /// is needed for: names are written no later than the values using them.
    /// Has `init` load this Redis Functions library (crate::functions).
    pub fn set_read_functions(&mut self, library: String) {
        self.read_functions = Some(library);
    }

    /// Loads the read functions, replacing any older edgecache library (a
    /// function name can belong to one library only), in one transaction so
    /// callers never see them missing. At every `init`: at start, and when
    /// Redis lost everything (the library may have gone with it). A Redis
    /// that refuses (before 7.0, or an ACL without FUNCTION) costs the
    /// readers their functions, not the mirror: a warning, not an error.
    async fn install_read_functions(&mut self) -> Result<(), SinkError> {
        let Some(library) = self.read_functions.clone() else {
            return Ok(());
        };
        let result = self
            .call(|mut c| async move {
                let listed: redis::Value = redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg("edgecache_*")
                    .query_async(&mut c)
                    .await?;
                let mut transaction = redis::pipe();
                transaction.atomic();
                for name in library_names(&listed) {
                    if name.starts_with("edgecache_") && name != crate::functions::LIBRARY_NAME {
                        transaction.cmd("FUNCTION").arg("DELETE").arg(name).ignore();
                    }
                }
                transaction
                    .cmd("FUNCTION")
                    .arg("LOAD")
                    .arg("REPLACE")
                    .arg(&library)
                    .ignore();
                transaction.query_async::<()>(&mut c).await
            })
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(e @ SinkError::Unreachable(_)) | Err(e @ SinkError::Lost) => Err(e),
            Err(e) => {
                tracing::warn!("cannot install the read functions (FCALL_RO edgecache_get): {e}");
                Ok(())
            }
        }
    }

    /// Loads the read functions again if they are gone (FUNCTION FLUSH);
    /// best effort: a Redis that does not answer or refuses is dealt with
    /// by the apply path, and the functions are not the mirror.
    pub async fn ensure_read_functions(&mut self) {
        if self.read_functions.is_none() {
            return;
        }
        let listed = self
            .call(|mut c| async move {
                redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg(crate::functions::LIBRARY_NAME)
                    .query_async::<redis::Value>(&mut c)
                    .await
            })
            .await;
        match listed {
            Ok(listed) if library_names(&listed).is_empty() => {
                tracing::warn!(
                    "the read functions were gone from Redis (FUNCTION FLUSH?); loading them again"
                );
                let _ = self.install_read_functions().await;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("checking the read functions: {e}"),
        }
    }

    pub async fn fields(&mut self) -> Result<Fields, SinkError> {
        let key = self.keys.fields.clone();
        let pairs: Vec<(String, String)> = self
            .call(|mut c| async move { redis::cmd("HGETALL").arg(&key).query_async(&mut c).await })
            .await?;
        Ok(Fields::from_pairs(pairs))
    }

    /// Starts a resync of the topics with these key prefixes: an empty seen
    /// set (one left by an interrupted resync would keep stale keys), and
    /// from now on their writes are tracked in it.
    pub async fn begin_resync(&mut self, prefixes: Vec<Vec<u8>>) -> Result<(), SinkError> {
        self.drop_seen().await?;
        self.tracked = prefixes;
        Ok(())
    }

    /// Drops the seen set, then stops tracking. Tracking stops only once the
    /// set is gone: if the DEL fails the pipeline sweeps again, and writes
    /// made meanwhile must be in the set or that sweep would delete them.
    pub async fn end_resync(&mut self) -> Result<(), SinkError> {
        self.drop_seen().await?;
        self.tracked.clear();
        Ok(())
    }

    async fn drop_seen(&mut self) -> Result<(), SinkError> {
        let key = self.keys.seen.clone();
        self.call(
            |mut c| async move { redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await },
        )
        .await
    }

    /// Forgets a resync without touching Redis (it lost our state anyway).
    pub fn abandon_resync(&mut self) {
        self.tracked.clear();
    }

    /// Deletes every key under `prefix` that the resync did not see again;
    /// returns how many. Keys are listed with SCAN (which never blocks Redis
    /// for long) and each page is checked and deleted by one script.
    pub async fn sweep(&mut self, prefix: &[u8]) -> Result<u64, SinkError> {
        let pattern = scan_pattern(prefix);
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .call(|mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(SWEEP_PAGE)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            if !keys.is_empty() {
                // A clone (the script is its source and hash) so the
                // invocation does not borrow `self` across `call`.
                let sweep = self.sweep.clone();
                let mut invocation = sweep.prepare_invoke();
                invocation
                    .key(&self.keys.marker)
                    .key(&self.keys.seen)
                    .key(&self.keys.status)
                    .key(&self.keys.offsets);
                for key in &keys {
                    invocation.key(key.as_slice());
                }
                invocation
                    .arg(&self.token)
                    .arg(self.publish_channel.as_deref().unwrap_or(""))
                    .arg(self.seq);
                let n: u64 = self
                    .call(|mut c| async move { invocation.invoke_async(&mut c).await })
                    .await?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    async fn load_offsets(&mut self) -> Result<StoredOffsets, SinkError> {
        let key = self.keys.offsets.clone();
        let fields: Vec<(String, String)> = self
            .call(|mut c| async move {
                redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async::<Vec<(String, String)>>(&mut c)
                    .await
            })
            .await?;
        Ok(StoredOffsets::parse(&self.topic_names, fields))
    }

    /// Whether Redis still holds our marker and the apply the agent last
    /// wrote. Cheap; called when idle so a flushed Redis or one that went
    /// back in time is noticed even when no records arrive (G4).
    pub async fn held(&mut self) -> Result<Held, SinkError> {
        let keys = self.keys.clone();
        let check = self.check.clone();
        let token = self.token.clone();
        let (ours, seq): (i64, String) = self
            .call(|mut c| async move {
                check
                    .key(&keys.marker)
                    .key(&keys.offsets)
                    .arg(&token)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(if ours == 0 {
            Held::Lost
        } else if seq.parse::<u64>().ok() != Some(self.seq) {
            Held::Diverged
        } else {
            Held::Ours
        })
    }

    /// The apply sequence number the agent expects Redis to hold.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Applies a batch atomically with its offsets and counters (G2, G4)
    /// and waits for Redis's reply.
    /// Awaited in place, not spawned: the live path applies small batches
    /// one at a time, and a task hand-off per batch is one more wake-up on a
    /// busy CPU.
    pub async fn apply(&mut self, batch: &Batch, fields: &Fields) -> Result<(), SinkError> {
        let connection = self.connection().await?;
        let command = self.apply_command(batch, fields);
        let result = run_apply(connection, command).await;
        self.settle(&result);
        result
    }

    /// Sends a batch's apply script from a task of its own and returns
    /// without waiting for the reply, so the caller can prepare the next
    /// batch while Redis runs this one. Order is the caller's: it submits
    /// nothing else before this one's reply. Pass the reply (through
    /// [`finish`]) to [`Sink::settle`].
    pub async fn submit(
        &mut self,
        batch: &Batch,
        fields: &Fields,
    ) -> Result<PendingApply, SinkError> {
        let connection = self.connection().await?;
        let command = self.apply_command(batch, fields);
        Ok(tokio::spawn(run_apply(connection, command)))
    }

    /// The EVALSHA of [`APPLY_SCRIPT`] for a batch, built directly:
    /// redis-rs's `ScriptInvocation` keeps every key and argument in a `Vec`
    /// of its own and copies them all again into the command, two
    /// allocations and two copies per record that showed up in the
    /// rehydrate profile (BENCHMARKS.md).
    fn apply_command(&self, batch: &Batch, fields: &Fields) -> redis::Cmd {
        // The table entries the values refer to. A number the table lacks
        // cannot be in a value (numbers are only handed out with a name).
        let used: Vec<(u32, &str)> = batch
            .fields()
            .filter_map(|id| Some((id, fields.name(id)?)))
            .collect();
        // Keys of topics being resynced need the seen set too: they take
        // the general path, with an op each.
        let tracked = |key: &[u8]| {
            !self.tracked.is_empty() && self.tracked.iter().any(|prefix| key.starts_with(prefix))
        };
        // 0: a plain SET, 1: a plain DEL, 2: the rest; keys go in that order.
        let group = |key: &[u8], op: &Op| match op {
            _ if tracked(key) => 2,
            Op::Set(_) => 0,
            Op::Delete => 1,
            _ => 2,
        };
        let n_sets = batch.ops().filter(|(k, op)| group(k, op) == 0).count();
        let n_dels = batch.ops().filter(|(k, op)| group(k, op) == 1).count();
        // An op and its value, or a hash op and its (field, value) pairs.
        let general_args: usize = batch
            .ops()
            .filter(|(k, op)| group(k, op) == 2)
            .map(|(_, op)| match op {
                Op::Hash(packed, _) => 1 + 2 * codec::hash_pairs(packed).count(),
                _ => 2,
            })
            .sum();
        let n_keys = 5 + batch.n_ops();
        let n_args = 8 + 2 * used.len() + general_args + 7 * batch.next_offsets().len() + n_sets;
        // Every key and value plus a few bytes per op and the meta arguments.
        let n_bytes = batch.n_bytes() + 24 * batch.n_ops() + 512;
        let mut command = redis::Cmd::with_capacity(3 + n_keys + n_args, n_bytes);
        command
            .arg("EVALSHA")
            .arg(self.apply.get_hash())
            .arg(n_keys)
            .arg(&self.keys.marker)
            .arg(&self.keys.offsets)
            .arg(&self.keys.status)
            .arg(&self.keys.seen)
            .arg(&self.keys.fields);
        for which in 0..3 {
            for (key, _) in batch.ops().filter(|(k, op)| group(k, op) == which) {
                command.arg(key.as_slice());
            }
        }
        command
            .arg(&self.token)
            .arg(self.seq)
            .arg(batch.next_offsets().len())
            .arg(now_ms())
            .arg(self.publish_channel.as_deref().unwrap_or(""))
            .arg(used.len())
            .arg(n_sets)
            .arg(n_dels);
        for (id, name) in used {
            command.arg(id).arg(name);
        }
        for (&(topic_idx, partition), next) in batch.next_offsets() {
            let topic = &self.topic_names[topic_idx];
            let c = batch.partition_counts((topic_idx, partition));
            command
                .arg(offset_field(topic, partition))
                .arg(next)
                .arg(c.records)
                .arg(c.filtered)
                .arg(c.skipped[0])
                .arg(c.skipped[1])
                .arg(c.skipped[2]);
        }
        for (_, op) in batch.ops().filter(|(k, op)| group(k, op) == 0) {
            if let Op::Set(value) = op {
                command.arg(value.as_slice());
            }
        }
        for (key, op) in batch.ops().filter(|(k, op)| group(k, op) == 2) {
            match (op, tracked(key)) {
                (Op::Set(value), false) => command.arg("s").arg(value.as_slice()),
                (Op::Set(value), true) => command.arg("S").arg(value.as_slice()),
                (Op::SetUntil(value, at_ms), false) => {
                    command.arg(format!("x{at_ms}")).arg(value.as_slice())
                }
                (Op::SetUntil(value, at_ms), true) => {
                    command.arg(format!("X{at_ms}")).arg(value.as_slice())
                }
                (Op::Hash(packed, until), tracked) => {
                    let n = codec::hash_pairs(packed).count();
                    let letter = if tracked { 'H' } else { 'h' };
                    match until {
                        None => command.arg(format!("{letter}{n}")),
                        Some(at_ms) => command.arg(format!("{letter}{n}:{at_ms}")),
                    };
                    for (name, text) in codec::hash_pairs(packed) {
                        command.arg(name).arg(text);
                    }
                    &mut command
                }
                (Op::Delete, false) => command.arg("d").arg(""),
                (Op::Delete, true) => command.arg("D").arg(""),
                (Op::Seen, _) => command.arg("n").arg(""),
                (Op::Unseen, _) => command.arg("u").arg(""),
            };
        }
        command
    }

    /// Takes note of an apply's outcome: after a connection failure the
    /// next call reconnects.
    pub fn settle(&mut self, result: &Result<(), SinkError>) {
        match result {
            Ok(()) => self.seq += 1,
            Err(SinkError::Unreachable(_)) => self.connection = None,
            Err(_) => {}
        }
    }

    /// Sets fields of the status hash (state, errors); best effort.
    pub async fn set_status(&mut self, fields: &[(&str, String)]) -> Result<(), SinkError> {
        let key = self.keys.status.clone();
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.call(|mut c| async move {
            redis::cmd("HSET")
                .arg(&key)
                .arg(fields)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Removes fields of the status hash; best effort.
    pub async fn clear_status(&mut self, fields: &[&str]) -> Result<(), SinkError> {
        let key = self.keys.status.clone();
        let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        self.call(|mut c| async move {
            redis::cmd("HDEL")
                .arg(&key)
                .arg(fields)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Adds one to a counter of the status hash that no apply writes (how
    /// often something happened to the agent); best effort.
    pub async fn bump_status(&mut self, field: &str) {
        let key = self.keys.status.clone();
        let field = field.to_owned();
        let _ = self
            .call(|mut c| async move {
                redis::cmd("HINCRBY")
                    .arg(&key)
                    .arg(field)
                    .arg(1)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
    }

    /// The topic IDs the stored offsets were taken from (topic → ID), kept
    /// in the status hash as `topic_id.<topic>`: it goes with the offsets
    /// when Redis loses the agent's state, and readers may see it.
    pub async fn topic_ids(&mut self) -> Result<Vec<(String, String)>, SinkError> {
        Ok(self
            .status()
            .await?
            .into_iter()
            .filter_map(|(field, id)| Some((field.strip_prefix(TOPIC_ID_FIELD)?.to_owned(), id)))
            .collect())
    }

    /// Records the topic ID the offsets of `topic` are taken from.
    pub async fn set_topic_id(&mut self, topic: &str, id: &str) -> Result<(), SinkError> {
        let key = self.keys.status.clone();
        let (topic, id) = (format!("{TOPIC_ID_FIELD}{topic}"), id.to_owned());
        self.call(|mut c| async move {
            redis::cmd("HSET")
                .arg(&key)
                .arg(topic)
                .arg(id)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Notes in the offsets hash that these topics' lineage resync is
    /// pending (`on`), or done: a restart then finishes a pending one.
    pub async fn mark_lineage(&mut self, topics: &[String], on: bool) -> Result<(), SinkError> {
        let key = self.keys.offsets.clone();
        let fields: Vec<String> = topics.iter().map(|t| lineage_field(t)).collect();
        self.call(|mut c| async move {
            let mut command = redis::cmd(if on { "HSET" } else { "HDEL" });
            command.arg(&key);
            for field in &fields {
                command.arg(field);
                if on {
                    command.arg(1);
                }
            }
            command.query_async::<()>(&mut c).await
        })
        .await
    }

    /// Reads one key's raw bytes (for `edgecache get`).
    pub async fn get_raw(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, SinkError> {
        let key = key.to_vec();
        self.call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    /// The fields of a hash store key in `HGETALL` order, packed as
    /// `codec::pack_hash_pairs` packs them; None if the key does not exist.
    /// A key of another type gives Redis's `WRONGTYPE` refusal.
    pub async fn get_hash(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, SinkError> {
        let key = key.to_vec();
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = self
            .call(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        Ok((!pairs.is_empty()).then(|| {
            codec::pack_hash_pairs(pairs.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
        }))
    }

    /// Why Redis would refuse the agent's writes now, read from `INFO` (for
    /// `edgecache status` when the status hash is not being updated): a
    /// failed append-only or snapshot write (`MISCONF`), a replica
    /// (`READONLY`), memory at `maxmemory` without eviction (`OOM`).
    pub async fn write_refusal(&mut self) -> Option<String> {
        let info: String = self
            .call(|mut c| async move {
                redis::cmd("INFO")
                    .arg("persistence")
                    .arg("replication")
                    .arg("memory")
                    .query_async(&mut c)
                    .await
            })
            .await
            .ok()?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let number = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok());
        if field("aof_last_write_status") == Some("err") {
            return Some("MISCONF (the append-only file cannot be written)".into());
        }
        if field("rdb_last_bgsave_status") == Some("err") {
            return Some("MISCONF (the last RDB snapshot failed; Redis refuses writes while stop-writes-on-bgsave-error is on)".into());
        }
        if field("role") == Some("slave") {
            return Some("READONLY (Redis is a replica)".into());
        }
        let (used, max) = (number("used_memory")?, number("maxmemory")?);
        if max > 0 && used >= max && field("maxmemory_policy") == Some("noeviction") {
            return Some("OOM (used_memory at maxmemory, noeviction)".into());
        }
        None
    }

    /// Reads the status hash (for `edgecache status` and tests).
    pub async fn status(&mut self) -> Result<Vec<(String, String)>, SinkError> {
        let key = self.keys.status.clone();
        self.call(|mut c| async move { redis::cmd("HGETALL").arg(&key).query_async(&mut c).await })
            .await
    }

    /// Redis's settings the agent's guarantees depend on; `None` if the
    /// server does not let us ask (CONFIG may be renamed or denied by ACL).
    pub async fn server_settings(&mut self) -> Option<ServerSettings> {
        let reply: Result<Vec<String>, SinkError> = self
            .call(|mut c| async move {
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("appendonly")
                    .arg("save")
                    .arg("maxmemory-policy")
                    .query_async(&mut c)
                    .await
            })
            .await;
        let pairs = reply.ok()?;
        let get = |name: &str| {
            pairs
                .chunks(2)
                .find(|pair| pair[0] == name)
                .and_then(|pair| pair.get(1).cloned())
        };
        Some(ServerSettings {
            appendonly: get("appendonly")? == "yes",
            snapshots: !get("save")?.trim().is_empty(),
            maxmemory_policy: get("maxmemory-policy")?,
        })
    }

    /// Checks, as the agent's Redis user, that every command the agent needs
    /// is allowed on its keys and channel. Returns the first denied command
    /// (with the key or channel it was asked for), or `None`. A Redis that
    /// cannot answer (before 7.0) passes: the first denied write then shows
    /// in the status.
    pub async fn denied_command(
        &mut self,
        prefixes: &[(Vec<u8>, bool)],
    ) -> Result<Option<String>, SinkError> {
        let k = &self.keys;
        let mut checks: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut add = |words: &[&[u8]]| checks.push(words.iter().map(|w| w.to_vec()).collect());
        add(&[b"GET", k.marker.as_bytes()]);
        add(&[b"SET", k.marker.as_bytes(), b"x"]);
        add(&[b"DEL", k.marker.as_bytes()]);
        for hash in [&k.offsets, &k.status, &k.fields] {
            add(&[b"HGETALL", hash.as_bytes()]);
            add(&[b"HGET", hash.as_bytes(), b"f"]);
            add(&[b"HMGET", hash.as_bytes(), b"f"]);
            add(&[b"HSET", hash.as_bytes(), b"f", b"v"]);
            add(&[b"HDEL", hash.as_bytes(), b"f"]);
            add(&[b"HINCRBY", hash.as_bytes(), b"f", b"1"]);
            add(&[b"DEL", hash.as_bytes()]);
            add(&[b"TYPE", hash.as_bytes()]);
        }
        add(&[b"SADD", k.seen.as_bytes(), b"x"]);
        add(&[b"SREM", k.seen.as_bytes(), b"x"]);
        add(&[b"SISMEMBER", k.seen.as_bytes(), b"x"]);
        add(&[b"TYPE", k.seen.as_bytes()]);
        add(&[b"DEL", k.seen.as_bytes()]);
        for (prefix, hash) in prefixes {
            let mut key = prefix.clone();
            key.extend_from_slice(b"edgecache-probe");
            if *hash {
                add(&[b"HSET", &key, b"f", b"v"]);
                add(&[b"PEXPIREAT", &key, b"1"]);
                add(&[b"HGETALL", &key]);
            } else {
                add(&[b"MSET", &key, b"v"]);
                add(&[b"SET", &key, b"v", b"PXAT", b"1"]);
                add(&[b"GET", &key]);
            }
            add(&[b"DEL", &key]);
        }
        add(&[b"SCAN", b"0"]);
        add(&[b"EVALSHA", self.apply.get_hash().as_bytes(), b"0"]);
        add(&[b"SCRIPT", b"LOAD", b"return 1"]);
        if let Some(channel) = &self.publish_channel {
            add(&[b"PUBLISH", channel.as_bytes(), b"x"]);
        }
        let mut command = redis::cmd("EVAL");
        command.arg(PERMISSIONS_SCRIPT).arg(0);
        for words in &checks {
            command.arg(words.len());
            for word in words {
                command.arg(word.as_slice());
            }
        }
        let denied: String = self
            .call(|mut c| async move { command.query_async(&mut c).await })
            .await?;
        Ok(match denied.as_str() {
            "" | "unsupported" => None,
            _ => Some(denied),
        })
    }
}

/// See [`Sink::server_settings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub appendonly: bool,
    /// RDB snapshots configured (`save` not empty).
    pub snapshots: bool,
    pub maxmemory_policy: String,
}

impl ServerSettings {
    /// Whether Redis may evict keys the agent wrote. `volatile-*` policies
    /// evict only keys with an expiry, which the agent sets only for topics
    /// with `ttl_secs`.
    pub fn may_evict(&self, any_ttl: bool) -> bool {
        match self.maxmemory_policy.as_str() {
            "noeviction" => false,
            policy if policy.starts_with("volatile-") => any_ttl,
            _ => true,
        }
    }
}

/// The file in `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`) where
/// the agent keeps its state for `edgecache status`, since Redis may refuse
/// to take the status hash (OOM, MISCONF, READONLY).
pub const RUNTIME_STATUS_FILE: &str = "status.json";

/// Prefix of the status hash fields holding topic IDs.
const TOPIC_ID_FIELD: &str = "topic_id.";

/// Keys per SCAN page (and per sweep script) at the end of a resync.
const SWEEP_PAGE: usize = 500;

/// A SCAN MATCH pattern for every key starting with `prefix`: glob
/// characters in the prefix are escaped.
fn scan_pattern(prefix: &[u8]) -> Vec<u8> {
    let mut pattern = Vec::with_capacity(prefix.len() + 1);
    for &b in prefix {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            pattern.push(b'\\');
        }
        pattern.push(b);
    }
    pattern.push(b'*');
    pattern
}

/// When a marker token was made (its leading milliseconds).
fn token_ms(token: &str) -> Option<i64> {
    token.split_once('-')?.0.parse().ok()
}

/// A token unique enough to tell this marker from one set by another run:
/// time plus process id, no randomness source needed.
fn new_token() -> String {
    format!("{}-{}", now_ms(), std::process::id())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `library_name` of each entry of a FUNCTION LIST reply (RESP2 flat
/// pairs or RESP3 maps).
fn library_names(listed: &redis::Value) -> Vec<String> {
    let redis::Value::Array(libraries) = listed else {
        return Vec::new();
    };
    libraries
        .iter()
        .filter_map(|library| {
            let pairs: Vec<(&redis::Value, &redis::Value)> = match library {
                redis::Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|p| Some((p.first()?, p.get(1)?)))
                    .collect(),
                redis::Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
                _ => return None,
            };
            pairs.into_iter().find_map(|(k, v)| {
                let k: String = redis::from_redis_value(k).ok()?;
                (k == "library_name").then(|| redis::from_redis_value(v).ok())?
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_pattern_escapes_glob_characters() {
        assert_eq!(scan_pattern(b"device:"), b"device:*");
        assert_eq!(scan_pattern(b"a*b?[c]\\"), b"a\\*b\\?\\[c\\]\\\\*");
    }

    #[test]
    fn token_time() {
        assert_eq!(token_ms("1795746333420-4242"), Some(1_795_746_333_420));
        assert_eq!(token_ms("garbage"), None);
        let token = new_token();
        assert!(token_ms(&token).unwrap() <= now_ms());
    }
}
