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

use crate::batch::{Batch, Op, SkipReason};
use crate::checkpoint::{offset_field, StoredOffsets};
use crate::codec::Fields;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use std::time::Duration;

/// How long one Redis call may take before the connection counts as down.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

const APPLY_SCRIPT: &str = r#"
-- KEYS[1] marker, KEYS[2] offsets hash, KEYS[3] status hash, KEYS[4] resync
-- seen set, KEYS[5] field table, KEYS[6..] data keys: first n_sets keys to
-- SET, then n_dels keys to DEL, then keys with an op each.
-- ARGV[1] token, ARGV[2] n_offsets, ARGV[3] n_counters, ARGV[4] now_ms,
-- ARGV[5] channel to PUBLISH changes on ('' for none), ARGV[6] n_fields,
-- ARGV[7] n_sets, ARGV[8] n_dels,
-- then n_fields (number, name) pairs of the field table that the values
-- use, n_offsets (field, next offset) pairs, n_counters (name, delta) pairs,
-- n_sets values, then one (op, value) pair per remaining key: op "s" = SET
-- value, "d" = DEL, "x<ms>" = SET value expiring at Unix time <ms>. During
-- a resync: the same op in upper case ("S", "D", "X<ms>") also adds the key
-- to the seen set (removes it for "D"); "n" / "u" only add / remove it,
-- writing nothing.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('EDGECACHE_LOST marker missing or replaced')
end
local channel = ARGV[5]
-- 'set ' or 'del ' and each key of KEYS[from..to] on the channel, if any.
local function publish(kind, from, to)
  if channel ~= '' then
    for j = from, to do
      redis.call('PUBLISH', channel, kind .. KEYS[j])
    end
  end
end
local n_fields = tonumber(ARGV[6])
local a = 9
-- Every check before the first write: a script that errors keeps what it
-- already wrote.
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
if n_fields > 0 then
  redis.call('HSET', KEYS[5], unpack(ARGV, 9, a - 1))
end
for i = 1, tonumber(ARGV[2]) do
  redis.call('HSET', KEYS[2], ARGV[a], ARGV[a + 1])
  a = a + 2
end
for i = 1, tonumber(ARGV[3]) do
  redis.call('HINCRBY', KEYS[3], ARGV[a], ARGV[a + 1])
  a = a + 2
end
-- Plain writes, many keys per call (a call from Lua costs more than a key);
-- unpack() is bounded by Lua's C stack, hence chunks.
local k = 6
local n = tonumber(ARGV[7])
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
publish('set ', k, k + n - 1)
a = a + n
k = k + n
n = tonumber(ARGV[8])
done = 0
while done < n do
  local chunk = math.min(n - done, 500)
  redis.call('DEL', unpack(KEYS, k + done, k + done + chunk - 1))
  done = done + chunk
end
publish('del ', k, k + n - 1)
k = k + n
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
    else
      redis.call('SET', KEYS[k], ARGV[a + 1], 'PXAT', string.sub(op, 2))
    end
    if c ~= lower then
      redis.call(lower == 'd' and 'SREM' or 'SADD', KEYS[4], KEYS[k])
    end
    publish(lower == 'd' and 'del ' or 'set ', k, k)
  end
  a = a + 2
end
redis.call('HSET', KEYS[3], 'last_applied_ms', ARGV[4])
return #KEYS - 5
"#;

/// The end of a resync: of one page of keys under a resynced topic's
/// prefix, deletes those the re-read did not see. Marker-checked like an
/// apply, and atomic per page.
const SWEEP_SCRIPT: &str = r#"
-- KEYS[1] marker, KEYS[2] seen set, KEYS[3] status hash, KEYS[4..] candidates
-- ARGV[1] token, ARGV[2] channel ('' for none)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('EDGECACHE_LOST marker missing or replaced')
end
local n = 0
for k = 4, #KEYS do
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

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Redis unreachable: {0}")]
    Unreachable(String),
    #[error("Redis lost the agent's state (marker missing): rehydrate")]
    Lost,
    #[error("Redis refused the request: {0}")]
    Refused(String),
}

impl From<redis::RedisError> for SinkError {
    fn from(e: redis::RedisError) -> Self {
        let text = e.to_string();
        if text.contains("EDGECACHE_LOST") {
            if text.contains("field") {
                tracing::warn!("Redis's field table changed under the agent: {text}");
            }
            SinkError::Lost
        } else if e.is_io_error()
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
            SinkError::Refused(format!(
                "authentication failed (check the user and password in redis.url or redis.password_file): {e}"
            ))
        } else {
            SinkError::Refused(e.to_string())
        }
    }
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
            .map_err(|e| SinkError::Refused(e.to_string()))?;
        if let Some(password) = password {
            info.redis.password = Some(password.to_owned());
        }
        let client = Client::open(info).map_err(|e| SinkError::Refused(e.to_string()))?;
        Ok(Sink {
            client,
            connection: None,
            keys: MetaKeys::new(namespace),
            token: String::new(),
            apply: Script::new(APPLY_SCRIPT),
            init: Script::new(INIT_SCRIPT),
            sweep: Script::new(SWEEP_SCRIPT),
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
                    .key(&self.keys.status);
                for key in &keys {
                    invocation.key(key.as_slice());
                }
                invocation
                    .arg(&self.token)
                    .arg(self.publish_channel.as_deref().unwrap_or(""));
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

    /// True while Redis still holds our marker. Cheap; called when idle so a
    /// flushed Redis is noticed even when no records arrive (G4).
    pub async fn still_ours(&mut self) -> Result<bool, SinkError> {
        let key = self.keys.marker.clone();
        let current: Option<String> = self
            .call(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await })
            .await?;
        Ok(current.as_deref() == Some(self.token.as_str()))
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
        let counts = batch.counts();
        let counters: Vec<(&str, u64)> =
            [("records", counts.records), ("filtered", counts.filtered)]
                .into_iter()
                .chain(
                    SkipReason::ALL
                        .iter()
                        .map(|r| (r.counter(), counts.skipped[*r as usize])),
                )
                .filter(|(_, n)| *n > 0)
                .collect();
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
        let n_general = batch.n_ops() - n_sets - n_dels;
        let n_keys = 5 + batch.n_ops();
        let n_args =
            8 + 2 * (used.len() + batch.next_offsets().len() + counters.len() + n_general) + n_sets;
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
            .arg(batch.next_offsets().len())
            .arg(counters.len())
            .arg(now_ms())
            .arg(self.publish_channel.as_deref().unwrap_or(""))
            .arg(used.len())
            .arg(n_sets)
            .arg(n_dels);
        for (id, name) in used {
            command.arg(id).arg(name);
        }
        for (&(topic_idx, partition), next) in batch.next_offsets() {
            command
                .arg(offset_field(&self.topic_names[topic_idx], partition))
                .arg(next);
        }
        for (name, delta) in counters {
            command.arg(name).arg(delta);
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
        if matches!(result, Err(SinkError::Unreachable(_))) {
            self.connection = None;
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

    /// Reads one key's raw bytes (for `edgecache get`).
    pub async fn get_raw(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, SinkError> {
        let key = key.to_vec();
        self.call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    /// Reads the status hash (for `edgecache status` and tests).
    pub async fn status(&mut self) -> Result<Vec<(String, String)>, SinkError> {
        let key = self.keys.status.clone();
        self.call(|mut c| async move { redis::cmd("HGETALL").arg(&key).query_async(&mut c).await })
            .await
    }

    /// Whether Redis persists to an append-only file (G3); `None` if the
    /// server does not let us ask (CONFIG may be renamed or denied by ACL).
    pub async fn aof_enabled(&mut self) -> Option<bool> {
        let reply: Result<Vec<String>, SinkError> = self
            .call(|mut c| async move {
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("appendonly")
                    .query_async(&mut c)
                    .await
            })
            .await;
        reply.ok()?.get(1).map(|v| v == "yes")
    }
}

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
