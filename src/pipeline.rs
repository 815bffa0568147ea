//! The loop: poll -> decode -> map key -> coalesce -> apply, one task.
//!
//! Batching is adaptive: after the first record arrives, everything librdkafka
//! already buffered is taken (up to the batch caps) and the batch is applied
//! at once when nothing more is waiting. A slow trickle gives per-record
//! latency, a backlog gives large transactions; there is no fixed linger.
//!
//! Backpressure (G6): while a batch cannot be applied, the loop does not poll
//! Kafka; librdkafka stops fetching once its budgeted queue is full. The batch
//! is kept and retried with backoff; positions only advance after Redis
//! acknowledged the transaction that stores them.

use crate::backoff::Backoff;
use crate::batch::{Batch, Op, PartitionId, SkipReason};
use crate::checkpoint::{Start, StoredOffsets};
use crate::codec::{self, Fields};
use crate::config::{Settings, MAX_KEY_BYTES};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::priority::Priority;
use crate::resync::{self, Resync};
use crate::sink::{Held, PendingApply, Sink, SinkError};
use crate::source::{Event, Incoming, Source, SourceError};
use futures_util::FutureExt;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

/// How often the idle checks run: marker still there (G4), partitions,
/// caught-up state, Kafka reachability.
const TICK: Duration = Duration::from_secs(1);
/// How often a progress line is logged while catching up.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// At most this many bad-record lines per window; the rest are counted.
const BAD_RECORD_LOG_LIMIT: u32 = 20;
const BAD_RECORD_LOG_WINDOW: Duration = Duration::from_secs(10);
/// `caught_up_ms` is written to the status hash at most this often (an
/// older value only makes the missed-delete check more cautious).
const CAUGHT_UP_WRITE_EVERY: Duration = Duration::from_secs(10);
/// Topic configurations (`delete.retention.ms`) are read again this often,
/// and a failed read is retried after `RETENTION_RETRY`.
const RETENTION_REFRESH: Duration = Duration::from_secs(600);
const RETENTION_RETRY: Duration = Duration::from_secs(10);
/// How often a running agent checks again that Redis does not evict and
/// lets it do what it needs.
const FIT_CHECK_EVERY: Duration = Duration::from_secs(30);
/// How often a running agent checks that the read functions are still
/// loaded (a FUNCTION FLUSH, or a Redis that lost its functions but not
/// the data, would leave every `FCALL_RO edgecache_get` failing).
const FUNCTIONS_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Metadata is read this often while a configured topic does not exist.
const MISSING_TOPIC_LOOK_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("metrics.listen: cannot listen on {0}: {1}")]
    MetricsListen(std::net::SocketAddr, std::io::Error),
    /// Redis is set up so that the agent cannot keep its promises (an
    /// evicting `maxmemory-policy`, a missing ACL permission): restarting
    /// does not help, so the agent stops (exit 78, like a bad configuration).
    #[error("{0}")]
    RedisUnfit(String),
}

/// What the agent is doing; written to `<ns>:status` field `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    /// A configured topic does not exist (yet); the others are mirrored.
    WaitingForTopic,
    /// Every partition is mirrored live but one or more whose next record
    /// batch is larger than the agent may receive (see `stuck.*` fields).
    PartitionStuck,
    Rehydrating,
    CatchingUp,
    Live,
    KafkaUnreachable,
    RedisUnreachable,
    /// Re-reading topics whose deletes may have been missed (see `resync`).
    Resyncing,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::WaitingForTopic => "waiting-for-topic",
            State::PartitionStuck => "partition-stuck",
            State::Rehydrating => "rehydrating",
            State::CatchingUp => "catching-up",
            State::Live => "live",
            State::KafkaUnreachable => "kafka-unreachable",
            State::RedisUnreachable => "redis-unreachable",
            State::Resyncing => "resyncing",
        }
    }
}

/// Whether the loop goes on.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// The batch was dropped and every partition restarted from the earliest
    /// offset: records already in hand belong to the old assignment.
    Rehydrated,
    Stop,
}

/// Why the agent re-reads its positions from Redis.
#[derive(Debug)]
enum Reload {
    /// The marker is gone or another.
    Lost,
    /// The marker is ours but Redis holds another apply than the agent last
    /// wrote.
    Diverged(String),
}

/// Runs the agent until `shutdown` completes.
pub async fn run(settings: &Settings, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        // Keep the sender alive so receivers see `true`, not a closed channel.
        std::future::pending::<()>().await
    };
    let topic_names: Vec<String> = settings.topics.iter().map(|t| t.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(topic_names.clone()));
    // Bound before anything connects; nothing is bound when not configured (G8).
    if let Some(addr) = settings.metrics_listen {
        let listener = crate::metrics::bind(addr)
            .await
            .map_err(|e| RunError::MetricsListen(addr, e))?;
        info!(%addr, "serving metrics on http://{addr}/metrics");
        tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
    }
    let source = Source::new(
        &crate::source::consumer_properties(settings),
        topic_names.clone(),
    )?;
    let mut sink = Sink::new(
        &settings.redis.url,
        settings.redis.password.as_ref().map(|p| p.0.as_str()),
        &settings.redis.namespace,
        topic_names,
        settings.redis.publish_channel.clone(),
    )?;
    sink.set_read_functions(crate::functions::library(
        &settings.redis.namespace,
        &settings.topics,
    ));
    let mut pipeline = Pipeline {
        settings,
        sink,
        batch: Batch::new(
            settings.limits.max_batch_records,
            settings.limits.max_batch_bytes,
        ),
        positions: BTreeMap::new(),
        stored: StoredOffsets::default(),
        stop: stop_rx,
        state: State::Starting,
        written_state: None,
        notified_state: None,
        notify: Notifier::from_env(),
        ready_by: Instant::now() + settings.agent.ready_timeout,
        lag: None,
        written_lag: None,
        progress_at: Instant::now(),
        progress_records: 0,
        caught_up: false,
        priority: Priority::new(settings.agent.catch_up_nice),
        catch_up_started: Instant::now(),
        records_since_start: 0,
        last_apply: Instant::now(),
        discovery: Poller::from_answer(Instant::now()),
        bad_logged: 0,
        bad_suppressed: 0,
        bad_window: Instant::now(),
        encoded: Vec::new(),
        fields: Fields::new(),
        in_flight: None,
        spare: None,
        metrics,
        reported: Reported::default(),
        resync: None,
        caught_up_ms: 0,
        caught_up_written: None,
        retention: None,
        retention_poll: Poller::from_start(None),
        log_start_unchecked: BTreeMap::new(),
        redis_problem: None,
        retrying: false,
        lineage_due: BTreeSet::new(),
        stored_ids: BTreeMap::new(),
        new_ids: BTreeMap::new(),
        topic_ids: Poller::from_start(None),
        oversize_seen: 0,
        isolating: None,
        stuck: BTreeMap::new(),
        stuck_log_end: BTreeMap::new(),
        stuck_task: None,
        last_stuck_at: None,
        last_refused_at: None,
        last_log_end: Instant::now()
            .checked_sub(TICK * 10)
            .unwrap_or_else(Instant::now),
        reported_stuck: BTreeMap::new(),
        fit_checked: Instant::now(),
        functions_checked: Instant::now(),
        lineage_suspect: BTreeSet::new(),
        unfit: None,
        missing_topics: Vec::new(),
        runtime_file: std::env::var_os("RUNTIME_DIRECTORY")
            .map(|dir| std::path::PathBuf::from(dir).join(crate::sink::RUNTIME_STATUS_FILE)),
        written_runtime: None,
    };
    // After Source::new, so librdkafka's threads exist and are set too.
    pipeline.priority.set(true);
    tokio::select! {
        _ = signal => unreachable!("the signal future never completes"),
        result = pipeline.run(&source) => result,
    }?;
    match pipeline.unfit.take() {
        Some(why) => Err(RunError::RedisUnfit(why)),
        None => Ok(()),
    }
}

/// The Redis key of a record: the topic's prefix, then the Kafka key.
fn redis_key(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    let mut redis_key = Vec::with_capacity(prefix.len() + key.len());
    redis_key.extend_from_slice(prefix);
    redis_key.extend_from_slice(key);
    redis_key
}

/// Partitions that start at a stored offset, and that offset.
fn stored_starts(starts: &[(PartitionId, Start)]) -> BTreeMap<PartitionId, i64> {
    starts
        .iter()
        .filter_map(|&(p, s)| match s {
            Start::At(next) => Some((p, next)),
            Start::Earliest => None,
        })
        .collect()
}

/// Tells systemd the loop is alive (WATCHDOG=1), and READY=1 once the start
/// timeout passed even if not caught up: a WAN outage at boot must not fail
/// the unit. Called from every place the loop waits.
fn liveness(notify: &mut Notifier, ready_by: Instant, state: State) {
    notify.watchdog();
    if !notify.is_ready() && Instant::now() >= ready_by {
        notify.ready(&format!("started; not caught up yet ({})", state.as_str()));
    }
}

/// Awaits `fut` while pinging systemd every second; `None` if shutdown was
/// asked first.
async fn await_alive<T>(
    fut: impl Future<Output = T>,
    notify: &mut Notifier,
    ready_by: Instant,
    state: State,
    stop: &mut watch::Receiver<bool>,
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopping| *stopping) => return None,
            out = &mut fut => return Some(out),
            _ = tokio::time::sleep(Duration::from_secs(1)) => liveness(notify, ready_by, state),
        }
    }
}

/// A batch sent by [`Pipeline::send`], kept until Redis confirmed it: an
/// unreachable Redis means applying it again, before any later batch.
struct InFlight {
    batch: Batch,
    started: Instant,
    pending: PendingApply,
}

struct Pipeline<'s> {
    settings: &'s Settings,
    sink: Sink,
    batch: Batch,
    /// Every assigned partition and where reading (re)started or, after an
    /// apply, the next offset Redis holds for it.
    positions: BTreeMap<PartitionId, Start>,
    stored: StoredOffsets,
    stop: watch::Receiver<bool>,
    state: State,
    written_state: Option<State>,
    /// The last STATUS= line sent to systemd.
    notified_state: Option<String>,
    notify: Notifier,
    /// When READY=1 is due even if not caught up (`agent.ready_timeout_secs`).
    ready_by: Instant,
    /// Last computed lag and the value last written to the status hash.
    lag: Option<u64>,
    written_lag: Option<u64>,
    progress_at: Instant,
    progress_records: u64,
    caught_up: bool,
    /// Niceness: raised while not caught up (src/priority.rs).
    priority: Priority,
    catch_up_started: Instant,
    records_since_start: u64,
    last_apply: Instant,
    /// Broker metadata (partitions) read in the background; see
    /// [`Pipeline::discover_new`].
    discovery: Poller<Result<Vec<PartitionId>, SourceError>>,
    bad_logged: u32,
    bad_suppressed: u64,
    bad_window: Instant,
    /// Reused encode buffer.
    encoded: Vec<u8>,
    /// The namespace's field table (stored format 2), as loaded with the
    /// marker and grown by the values encoded since.
    fields: Fields,
    /// The batch sent to Redis whose reply is still to come (at most one;
    /// see [`Pipeline::send`]).
    in_flight: Option<InFlight>,
    /// An empty batch to swap in when one is taken out (keeps the batch's
    /// fixed-capacity map allocated once).
    spare: Option<Batch>,
    resync: Option<Resync>,
    /// When every partition was last known read to its end (Unix ms); see
    /// `resync`.
    caught_up_ms: i64,
    caught_up_written: Option<Instant>,
    /// Per topic `delete.retention.ms` (`None`: not compacted); `None`
    /// until the broker told us.
    retention: Option<Vec<Option<i64>>>,
    retention_poll: Poller<Result<Vec<Option<i64>>, SourceError>>,
    /// Stored offsets still to compare with the log start once watermarks
    /// arrive.
    log_start_unchecked: BTreeMap<PartitionId, i64>,
    /// Counters for the metrics endpoint (kept even when it is off: a few
    /// relaxed adds per batch).
    metrics: Arc<Metrics>,
    /// Per-partition lag and last Kafka contact as last written to the
    /// status hash.
    reported: Reported,
    /// Why Redis does not take writes (a Redis error code such as `OOM`,
    /// `MISCONF`, `READONLY`, `NOPERM`, or `unreachable`), the error text,
    /// and since when (Unix ms); `None` while it does.
    redis_problem: Option<(String, String, i64)>,
    /// True while a batch Redis refused waits in `apply_retrying`.
    retrying: bool,
    /// Topic IDs the stored offsets were taken from (`topic_id.<topic>` in
    /// the status hash).
    stored_ids: BTreeMap<String, String>,
    /// IDs of recreated topics, written once their resync is noted.
    new_ids: BTreeMap<usize, String>,
    topic_ids: Poller<Result<Vec<Option<String>>, SourceError>>,
    /// Fetch responses over `receive.message.max.bytes` seen so far.
    oversize_seen: u64,
    /// The search for the partition whose record batch is too large.
    isolating: Option<Isolating>,
    /// Partitions paused because their next record batch is larger than the
    /// agent may receive, and the offset each is stuck at.
    stuck: BTreeMap<PartitionId, i64>,
    /// Their log ends, asked of the broker (paused partitions are not
    /// fetched, so librdkafka's watermarks for them go stale).
    stuck_log_end: BTreeMap<PartitionId, i64>,
    stuck_task: Option<LogEndTask>,
    last_stuck_at: Option<Instant>,
    /// When librdkafka last refused an oversized response: the dropped
    /// connection that follows is that, not a broker outage.
    last_refused_at: Option<Instant>,
    last_log_end: Instant,
    /// `stuck.<topic>/<p>` fields as last written to the status hash.
    reported_stuck: BTreeMap<PartitionId, i64>,
    /// When Redis's eviction policy and the agent's permissions were last
    /// checked.
    fit_checked: Instant,
    /// When the read functions were last seen loaded.
    functions_checked: Instant,
    /// Topics found to be of another lineage whose resync is yet to start.
    lineage_due: BTreeSet<usize>,
    /// Partitions whose log end was below the stored offset at the last
    /// tick (acted on when it holds for two ticks in a row).
    lineage_suspect: BTreeSet<PartitionId>,
    /// Set when Redis is set up so the agent must not run; ends the run.
    unfit: Option<String>,
    /// Configured topics the broker does not have (yet).
    missing_topics: Vec<String>,
    /// `$RUNTIME_DIRECTORY/status.json` under systemd: the state where
    /// `edgecache status` finds it when Redis refuses the status hash.
    runtime_file: Option<std::path::PathBuf>,
    written_runtime: Option<(State, Option<String>)>,
}

/// Status fields written once per tick, only when they changed.
#[derive(Debug, Default)]
struct Reported {
    partition_lag: BTreeMap<PartitionId, u64>,
    last_contact_ms: Option<i64>,
    /// Next offsets last committed to `kafka.commit_group`.
    committed: BTreeMap<PartitionId, i64>,
}

type LogEndTask = tokio::task::JoinHandle<Result<Vec<(PartitionId, i64)>, SourceError>>;

/// The search for the partition whose next record batch librdkafka refuses
/// (larger than `receive.message.max.bytes`). The refused response drops
/// the broker connection, so every partition fetched over it stalls: all
/// are paused, then resumed one at a time; the one whose resumption brings
/// the error back stays paused.
#[derive(Debug)]
struct Isolating {
    to_probe: Vec<PartitionId>,
    probe: Option<(PartitionId, Instant)>,
}

/// How long a resumed partition must go without a refused response to be
/// cleared.
const PROBE_FOR: Duration = Duration::from_secs(6);

/// A background request repeated every so often (topic configurations,
/// topic IDs, partition metadata): started when none is out and it is due,
/// its answer taken once its task has finished, so the loop never waits on
/// the broker. At most one request is out at a time.
#[derive(Debug)]
struct Poller<T> {
    /// Where the interval counts from: the last start, or with
    /// `from_answer` the last answer; `None`: due at once.
    since: Option<Instant>,
    from_answer: bool,
    /// Start at the next chance, however recent `since` is.
    forced: bool,
    task: Option<tokio::task::JoinHandle<T>>,
}

impl<T> Poller<T> {
    /// The interval counts from each start.
    fn from_start(since: Option<Instant>) -> Self {
        Poller {
            since,
            from_answer: false,
            forced: false,
            task: None,
        }
    }

    /// The interval counts from each answer.
    fn from_answer(since: Instant) -> Self {
        Poller {
            from_answer: true,
            ..Poller::from_start(Some(since))
        }
    }

    /// The interval counts from now (the same request was just made
    /// another way).
    fn restart_clock(&mut self) {
        self.since = Some(Instant::now());
    }

    /// Starts a request at the next [`Poller::poll`] with none out.
    fn force(&mut self) {
        self.forced = true;
    }

    /// One step, never waiting: with no request out, starts one (`start`)
    /// if forced or `every` has passed; with one out and finished, returns
    /// its answer (`None` while none is ready).
    fn poll(
        &mut self,
        every: Duration,
        start: impl FnOnce() -> tokio::task::JoinHandle<T>,
    ) -> Option<Result<T, tokio::task::JoinError>> {
        match self.task.take() {
            None => {
                if self.forced || self.since.is_none_or(|at| at.elapsed() >= every) {
                    self.forced = false;
                    if !self.from_answer {
                        self.since = Some(Instant::now());
                    }
                    self.task = Some(start());
                }
                None
            }
            Some(task) if !task.is_finished() => {
                self.task = Some(task);
                None
            }
            Some(task) => {
                if self.from_answer {
                    self.since = Some(Instant::now());
                }
                // The task has finished, so this does not wait.
                task.now_or_never()
            }
        }
    }
}

impl Pipeline<'_> {
    async fn run(&mut self, source: &Source) -> Result<(), RunError> {
        self.run_until_stopped(source).await;
        self.shutdown().await;
        Ok(())
    }

    async fn run_until_stopped(&mut self, source: &Source) {
        if self.connect_redis().await == Flow::Stop {
            return;
        }
        match self.sink.server_settings().await {
            Some(server) if !server.appendonly && !server.snapshots => warn!(
                "Redis persistence is off (appendonly no, no save): a Redis restart loses \
                 the cache and the agent rehydrates everything from Kafka; see the \
                 README's Redis drop-in"
            ),
            Some(server) if !server.appendonly => warn!(
                "Redis persists by RDB snapshots only (appendonly no): after a crash Redis \
                 comes back as of its last snapshot, and readers see those older values \
                 until the agent, which notices within a second, has read the rest again; \
                 see the README's Redis drop-in"
            ),
            _ => {}
        }
        if self.discover_and_assign(source).await == Flow::Stop {
            return;
        }
        // A lineage resync a stop interrupted: finish it.
        self.lineage_due
            .extend(self.stored.lineage_pending.iter().copied());
        // Before the first record is taken: is each topic still the one the
        // stored offsets were taken from?
        self.topic_ids.restart_clock();
        let mut stop = self.stop.clone();
        let ids = await_alive(
            source.topic_ids_task(),
            &mut self.notify,
            self.ready_by,
            self.state,
            &mut stop,
        )
        .await;
        match ids {
            None => return,
            Some(Ok(Ok(ids))) => self.compare_topic_ids(ids).await,
            Some(Ok(Err(e))) => warn!("reading topic IDs: {e}; will retry"),
            Some(Err(e)) => warn!("reading topic IDs: {e}; will retry"),
        }

        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = self.stop.clone();
        'outer: loop {
            let flow = tokio::select! {
                biased;
                _ = stop.changed() => Flow::Stop,
                _ = tick.tick() => {
                    self.housekeeping(source).await
                }
                event = source.recv() => self.handle(source, event).await,
            };
            if flow == Flow::Stop {
                break;
            }
            // Take what is already buffered, up to the batch caps.
            while !self.batch.is_full_for(0, 0) {
                let Some(event) = source.try_recv() else {
                    break;
                };
                match self.handle(source, event).await {
                    Flow::Stop => break 'outer,
                    Flow::Rehydrated | Flow::Continue => {}
                }
            }
            // A full batch stopped the loop above, so more records are
            // probably buffered: send it and decode them while Redis runs
            // its script. Otherwise everything buffered is in the batch:
            // apply it and wait, so state and lag are current when idle.
            let flow = if self.batch.is_full_for(0, 0) {
                self.send(source).await
            } else {
                self.flush(source).await
            };
            if flow == Flow::Stop {
                break;
            }
        }
    }

    /// The state once an unreachable service answers again.
    fn reachable_state(&self) -> State {
        if self.resync.is_some() {
            State::Resyncing
        } else if self.caught_up {
            State::Live
        } else {
            State::CatchingUp
        }
    }

    /// Waits `delay`, or less if shutdown is asked; returns Stop then.
    /// Retry loops wait here, so the watchdog is pinged here too: a loop
    /// that is alive and retrying is not wedged.
    async fn pause(&mut self, delay: Duration) -> Flow {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            liveness(&mut self.notify, self.ready_by, self.state);
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Flow::Continue;
            }
            let step = (deadline - now).min(Duration::from_secs(1));
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = stop.wait_for(|stopping| *stopping) => return Flow::Stop,
                _ = tokio::time::sleep(step) => {}
            }
        }
    }

    /// Adopts or creates the marker and loads offsets, retrying until Redis
    /// answers.
    async fn connect_redis(&mut self) -> Flow {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            // Before anything is written (the marker): Redis as it is set up
            // may not be fit for the agent at all.
            if let Some(why) = self.unfit_redis().await {
                error!("{why}");
                self.unfit = Some(why);
                return Flow::Stop;
            }
            let mut stop = self.stop.clone();
            // Redis calls time out after seconds; keep systemd informed meanwhile.
            let outcome = await_alive(
                self.sink.init(),
                &mut self.notify,
                self.ready_by,
                self.state,
                &mut stop,
            )
            .await;
            let Some(outcome) = outcome else {
                return Flow::Stop;
            };
            match outcome {
                Ok(outcome) => {
                    if outcome.fresh {
                        // The status hash went with the old marker.
                        self.written_state = None;
                        self.written_lag = None;
                        self.reported = Reported::default();
                        info!("Redis holds no edgecache state: rehydrating every partition from the earliest offset");
                        self.state = State::Rehydrating;
                    } else {
                        info!(
                            n_partitions = outcome.offsets.next.len(),
                            "resuming from the offsets stored in Redis"
                        );
                        self.state = State::CatchingUp;
                    }
                    for field in &outcome.offsets.ignored {
                        warn!(field, "ignoring an offsets field of no configured topic");
                    }
                    self.stored = outcome.offsets;
                    // Only here is the table replaced: no batch is pending
                    // (at start, or a rehydrate dropped it), so no value
                    // encoded with the old table can still be applied.
                    self.fields = outcome.fields;
                    self.caught_up_ms = outcome.caught_up_ms;
                    self.caught_up_written = None;
                    self.stored_ids = match self.sink.topic_ids().await {
                        Ok(ids) => ids.into_iter().collect(),
                        Err(e) => {
                            warn!("{e}; retrying");
                            if self.pause(backoff.next_delay()).await == Flow::Stop {
                                return Flow::Stop;
                            }
                            continue;
                        }
                    };
                    self.redis_fine().await;
                    self.write_state().await;
                    return Flow::Continue;
                }
                Err(e) => {
                    warn!("{e}; retrying");
                    self.redis_refuses(&e).await;
                    if self.pause(backoff.next_delay()).await == Flow::Stop {
                        return Flow::Stop;
                    }
                }
            }
        }
    }

    /// Why the agent must not run against this Redis, if it must not: an
    /// evicting `maxmemory-policy` (unless `redis.allow_eviction`) or a
    /// permission the agent's user lacks. Checked at every (re)connect.
    async fn unfit_redis(&mut self) -> Option<String> {
        let redis = &self.settings.redis;
        let any_ttl = self.settings.topics.iter().any(|t| t.ttl_ms.is_some());
        if let Some(server) = self.sink.server_settings().await {
            if server.may_evict(any_ttl) && !redis.allow_eviction {
                return Some(format!(
                    "Redis's maxmemory-policy is {}: Redis may evict mirrored keys, and readers \
                     would miss them with nothing to tell; set `maxmemory-policy noeviction` \
                     (systemd/redis-edgecache.conf does), or accept it with \
                     `redis.allow_eviction = true`",
                    server.maxmemory_policy
                ));
            }
        }
        let prefixes: Vec<(Vec<u8>, bool)> = self
            .settings
            .topics
            .iter()
            .map(|t| (t.key_prefix.clone(), t.store == codec::StoreFormat::Hash))
            .collect();
        match self.sink.denied_command(&prefixes).await {
            Ok(None) => None,
            Ok(Some(command)) => Some(format!(
                "the agent's Redis user may not run `{command}`: grant it (see the README's \
                 Redis ACL file, systemd/redis-edgecache.acl)"
            )),
            Err(SinkError::Refused { code, message }) if code == "NOPERM" => Some(format!(
                "the agent's Redis user may not run scripts (EVAL): {message}"
            )),
            Err(e) => {
                debug!("could not check the agent's Redis permissions: {e}");
                None
            }
        }
    }

    /// Redis refused a write or cannot be reached: state, reason and since
    /// when go to the metrics, systemd, the runtime file and, where Redis
    /// still takes that write, the status hash.
    async fn redis_refuses(&mut self, e: &SinkError) {
        self.metrics.redis_error();
        let reason = e.reason().to_owned();
        let since = match &self.redis_problem {
            Some((held, _, since)) if *held == reason => *since,
            _ => crate::sink::now_ms(),
        };
        self.redis_problem = Some((reason, e.to_string(), since));
        self.state = State::RedisUnreachable;
        self.write_state().await;
    }

    /// Redis takes writes again: clear the reason (also one a previous run
    /// of the agent left in the status hash, at every connect).
    async fn redis_fine(&mut self) {
        let had_problem = self.redis_problem.take().is_some();
        if had_problem || self.written_state.is_none() {
            if had_problem {
                info!("Redis takes writes again");
            }
            self.written_state = None;
            let _ = self
                .sink
                .clear_status(&["redis_error", "redis_error_since_ms", "redis_error_message"])
                .await;
        }
        if self.state == State::RedisUnreachable {
            self.state = self.reachable_state();
        }
    }

    /// Reads topic metadata (retrying until Kafka answers) and assigns every
    /// partition at its stored offset.
    async fn discover_and_assign(&mut self, source: &Source) -> Flow {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            let mut stop = self.stop.clone();
            // A metadata request may wait many seconds for an absent broker.
            let found = await_alive(
                source.discover(),
                &mut self.notify,
                self.ready_by,
                self.state,
                &mut stop,
            )
            .await;
            let Some(found) = found else {
                return Flow::Stop;
            };
            match found {
                Ok(partitions) => {
                    let partitions = self.in_scope(partitions);
                    for (topic_idx, topic) in self.settings.topics.iter().enumerate() {
                        let n = partitions.iter().filter(|p| p.0 == topic_idx).count();
                        if n > 0 {
                            info!(topic = %topic.name, n_partitions = n, "assigning");
                        }
                    }
                    self.note_missing_topics(&partitions);
                    self.positions = partitions
                        .iter()
                        .map(|&p| (p, self.stored.start(p.0, p.1)))
                        .collect();
                    let starts: Vec<_> = self.positions.iter().map(|(&p, &s)| (p, s)).collect();
                    if let Err(e) = source.assign(&starts) {
                        error!("{e}");
                    }
                    self.log_start_unchecked = stored_starts(&starts);
                    self.discovery.restart_clock();
                    self.catch_up_started = Instant::now();
                    return Flow::Continue;
                }
                Err(e) => {
                    self.set_state(State::KafkaUnreachable).await;
                    // Metrics and the status hash show a broker that never
                    // answered, too.
                    self.report(source).await;
                    warn!("{e}; retrying");
                    if self.pause(backoff.next_delay()).await == Flow::Stop {
                        return Flow::Stop;
                    }
                }
            }
        }
    }

    /// Notes which configured topics have no partitions in `found` (they
    /// do not exist, or none of their configured partitions does): state
    /// `waiting-for-topic`, and metadata is read every few seconds until
    /// they appear.
    fn note_missing_topics(&mut self, found: &[PartitionId]) {
        let missing: Vec<String> = self
            .settings
            .topics
            .iter()
            .enumerate()
            .filter(|(idx, _)| !found.iter().any(|p| p.0 == *idx))
            .map(|(_, t)| t.name.clone())
            .collect();
        for topic in &missing {
            if !self.missing_topics.contains(topic) {
                warn!(%topic, "topic does not exist (or has none of the configured partitions); waiting for it");
            }
        }
        for topic in &self.missing_topics {
            if !missing.contains(topic) {
                info!(%topic, "topic appeared");
            }
        }
        self.missing_topics = missing;
    }

    /// Drops partitions outside a topic's configured `partitions` list.
    fn in_scope(&self, partitions: Vec<PartitionId>) -> Vec<PartitionId> {
        partitions
            .into_iter()
            .filter(|&(topic_idx, p)| self.settings.topics[topic_idx].wants_partition(p))
            .collect()
    }

    async fn handle(&mut self, source: &Source, event: Event<'_>) -> Flow {
        match event {
            Event::Record(incoming) => self.handle_record(source, incoming).await,
            Event::EndOfPartition | Event::Foreign => Flow::Continue,
            Event::Error(e) => {
                self.metrics.kafka_error();
                warn!("Kafka: {e}");
                Flow::Continue
            }
        }
    }

    async fn handle_record(&mut self, source: &Source, incoming: Incoming<'_>) -> Flow {
        if source.brokers_down() {
            source.mark_reachable();
        }
        let partition = incoming.partition();
        let offset = incoming.offset();
        match self.positions.get(&partition) {
            // Prefetched before a reassignment, or already in Redis.
            Some(Start::At(next)) if offset < *next => return Flow::Continue,
            Some(_) => {}
            None => return Flow::Continue,
        }
        if self
            .resync
            .as_ref()
            .is_some_and(|r| r.is_shadow(partition, offset))
        {
            return self.note(source, &incoming).await;
        }
        let topic = &self.settings.topics[partition.0];
        let key = match incoming.key() {
            None => return self.skip(partition, offset, SkipReason::NoKey, "record has no key"),
            Some(key) if key.len() > MAX_KEY_BYTES => {
                return self.skip(partition, offset, SkipReason::Oversize, "key too long")
            }
            Some(key) => key,
        };
        if !topic.wants_key(key) {
            self.batch.filter_out(partition, offset);
            return Flow::Continue;
        }
        let op = match incoming.payload() {
            None => Op::Delete,
            Some(payload) if payload.len() > self.settings.limits.max_value_bytes => {
                return self.skip(
                    partition,
                    offset,
                    SkipReason::Oversize,
                    "value over the size cap",
                )
            }
            Some(payload) => {
                self.fields.clear_used();
                let encoded = codec::transcode(
                    topic.input,
                    topic.store,
                    payload,
                    incoming.timestamp_ms(),
                    &mut self.fields,
                    &mut self.encoded,
                );
                if let Err(e) = encoded {
                    let why = e.to_string();
                    return self.skip(partition, offset, SkipReason::Undecodable, &why);
                }
                let hash = topic.store == codec::StoreFormat::Hash;
                match topic.ttl_ms {
                    // `{}`: Redis has no empty hash, the key goes.
                    _ if hash && self.encoded.is_empty() => Op::Delete,
                    None if hash => Op::Hash(self.encoded.clone(), None),
                    None => Op::Set(self.encoded.clone()),
                    Some(ttl_ms) => {
                        let now = crate::sink::now_ms();
                        // Saturating: a far-future timestamp (Kafka takes any
                        // up to i64::MAX) must give the longest expiry, not
                        // wrap around to the past and delete the key. Redis's
                        // `SET ... PXAT` takes any positive 64-bit time.
                        let expire_at = incoming
                            .timestamp_ms()
                            .unwrap_or(now)
                            .saturating_add(ttl_ms);
                        if expire_at <= now {
                            // Already older than its TTL: the key must not exist.
                            Op::Delete
                        } else if hash {
                            Op::Hash(self.encoded.clone(), Some(expire_at))
                        } else {
                            Op::SetUntil(self.encoded.clone(), expire_at)
                        }
                    }
                }
            }
        };
        let redis_key = redis_key(&topic.key_prefix, key);
        let value_len = crate::batch::op_len(&op);
        if self.batch.is_full_for(redis_key.len(), value_len) {
            match self.send(source).await {
                Flow::Continue => {}
                // The record belongs to the old assignment or we are stopping.
                other => return other,
            }
        }
        // After any flush above: the names this value uses go with the
        // batch that holds it.
        if matches!(op, Op::Set(_) | Op::SetUntil(..) | Op::Hash(..)) {
            for &id in self.fields.used() {
                self.batch.use_field(id);
            }
        }
        if let Some(ts_ms) = incoming.timestamp_ms() {
            self.batch.note_timestamp(ts_ms);
        }
        self.batch.put(partition, offset, redis_key, op);
        Flow::Continue
    }

    /// A record a resync re-reads below the stored offset: Redis already has
    /// it or something newer, so only its key is noted (seen for a value,
    /// unseen for a tombstone). Records the agent skips or filters out are
    /// not noted, so the sweep removes such keys.
    async fn note(&mut self, source: &Source, incoming: &Incoming<'_>) -> Flow {
        let topic = &self.settings.topics[incoming.topic_idx];
        let Some(key) = incoming.key() else {
            return Flow::Continue;
        };
        if key.len() > MAX_KEY_BYTES || !topic.wants_key(key) {
            return Flow::Continue;
        }
        let redis_key = redis_key(&topic.key_prefix, key);
        let seen = incoming.payload().is_some();
        if self.batch.is_full_for(redis_key.len(), 0) {
            match self.send(source).await {
                Flow::Continue => {}
                other => return other,
            }
        }
        self.batch.note(redis_key, seen);
        Flow::Continue
    }

    fn skip(&mut self, partition: PartitionId, offset: i64, reason: SkipReason, why: &str) -> Flow {
        self.batch.skip(partition, offset, reason);
        if self.bad_window.elapsed() > BAD_RECORD_LOG_WINDOW {
            if self.bad_suppressed > 0 {
                warn!(
                    n = self.bad_suppressed,
                    "more bad records skipped (not logged one by one)"
                );
            }
            self.bad_window = Instant::now();
            self.bad_logged = 0;
            self.bad_suppressed = 0;
        }
        if self.bad_logged < BAD_RECORD_LOG_LIMIT {
            self.bad_logged += 1;
            let topic = &self.settings.topics[partition.0].name;
            warn!(
                topic = %topic,
                partition = partition.1,
                offset,
                reason = reason.counter(),
                "skipping record: {why}"
            );
        } else {
            self.bad_suppressed += 1;
        }
        Flow::Continue
    }

    /// Applies the batch and waits for Redis's reply, after the batch in
    /// flight; retries until Redis takes it (G6), or rehydrates when Redis
    /// lost our state (G4).
    async fn flush(&mut self, source: &Source) -> Flow {
        let flow = self.settle_in_flight(source).await;
        if flow != Flow::Continue || self.batch.is_empty() {
            return flow;
        }
        let mut batch = self.take_batch();
        let flow = self.apply_retrying(source, &mut batch, None).await;
        self.return_batch(batch);
        flow
    }

    /// Sends the batch without waiting for Redis's reply, so the next batch
    /// is decoded while Redis runs this one's script (during a rehydrate
    /// the two take similar time, on different cores). The batch sent
    /// before is settled first: one apply at most is in flight, so batches
    /// reach Redis in order and one that failed is applied again before
    /// any later one.
    async fn send(&mut self, source: &Source) -> Flow {
        let flow = self.settle_in_flight(source).await;
        if flow != Flow::Continue || self.batch.is_empty() {
            return flow;
        }
        let mut batch = self.take_batch();
        match self.sink.submit(&batch, &self.fields).await {
            Ok(pending) => {
                self.in_flight = Some(InFlight {
                    batch,
                    started: Instant::now(),
                    pending,
                });
                // Let the connection's task write the command now rather
                // than when this task next waits, maybe a batch later.
                tokio::task::yield_now().await;
                Flow::Continue
            }
            Err(e) => {
                let flow = self.apply_retrying(source, &mut batch, Some(e)).await;
                self.return_batch(batch);
                flow
            }
        }
    }

    /// Waits for the batch in flight, if any, and settles it.
    async fn settle_in_flight(&mut self, source: &Source) -> Flow {
        let Some(InFlight {
            mut batch,
            started,
            mut pending,
        }) = self.in_flight.take()
        else {
            return Flow::Continue;
        };
        let mut stop = self.stop.clone();
        let result = tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                // Shutdown gives it a last chance.
                self.in_flight = Some(InFlight { batch, started, pending });
                return Flow::Stop;
            }
            joined = &mut pending => crate::sink::finish(joined),
        };
        self.sink.settle(&result);
        let flow = match result {
            Ok(()) => {
                self.applied(source, &batch, started).await;
                Flow::Continue
            }
            Err(e) => self.apply_retrying(source, &mut batch, Some(e)).await,
        };
        self.return_batch(batch);
        flow
    }

    /// Applies `batch` until Redis takes it; `failed` is the error of an
    /// attempt already made.
    async fn apply_retrying(
        &mut self,
        source: &Source,
        batch: &mut Batch,
        mut failed: Option<SinkError>,
    ) -> Flow {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let started = Instant::now();
            let result = match failed.take() {
                Some(e) => Err(e),
                None => {
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return Flow::Stop,
                        result = self.sink.apply(batch, &self.fields) => result,
                    }
                }
            };
            match result {
                Ok(()) => {
                    self.applied(source, batch, started).await;
                    return Flow::Continue;
                }
                Err(SinkError::Lost) => return self.rehydrate(source, Reload::Lost).await,
                Err(SinkError::Diverged(why)) => {
                    return self.rehydrate(source, Reload::Diverged(why)).await
                }
                Err(e) => {
                    if self.redis_problem.as_ref().map(|p| p.0.as_str()) != Some(e.reason()) {
                        warn!("{e}; keeping the batch and retrying");
                    }
                    self.redis_refuses(&e).await;
                    // Lag and the metrics stay current while the batch waits.
                    self.lag = self.lag(source).or(self.lag);
                    self.retrying = true;
                    self.report(source).await;
                    self.retrying = false;
                    if self.pause(backoff.next_delay()).await == Flow::Stop {
                        return Flow::Stop;
                    }
                }
            }
        }
    }

    /// Bookkeeping once Redis applied `batch`.
    async fn applied(&mut self, source: &Source, batch: &Batch, started: Instant) {
        self.metrics.applied(batch, started.elapsed());
        if self.caught_up {
            self.metrics
                .live_records_aged(batch.oldest_ts_ms(), batch.counts().records);
        }
        debug!(
            n_ops = batch.n_ops(),
            n_records = batch.counts().records,
            micros = started.elapsed().as_micros() as u64,
            "applied"
        );
        for (&partition, &next) in batch.next_offsets() {
            self.positions.insert(partition, Start::At(next));
        }
        let counts = batch.counts();
        self.records_since_start += counts.records + counts.noted;
        self.last_apply = Instant::now();
        if self.redis_problem.is_some() || self.state == State::RedisUnreachable {
            self.redis_fine().await;
            self.write_state().await;
        }
        if !self.caught_up && !source.brokers_down() && self.applied_all_fetched(source) {
            self.go_live();
            self.write_state().await;
        }
    }

    /// The batch to apply, leaving an empty one to fill.
    fn take_batch(&mut self) -> Batch {
        let limits = &self.settings.limits;
        let empty = self
            .spare
            .take()
            .unwrap_or_else(|| Batch::new(limits.max_batch_records, limits.max_batch_bytes));
        std::mem::replace(&mut self.batch, empty)
    }

    fn return_batch(&mut self, mut batch: Batch) {
        batch.clear();
        self.spare = Some(batch);
    }

    /// Nothing waits to be applied or confirmed.
    fn idle(&self) -> bool {
        self.batch.is_empty() && self.in_flight.is_none()
    }

    /// Redis no longer holds what the agent wrote: drop the batches in
    /// hand, adopt (or recreate) the marker, and read every partition again
    /// from the offsets Redis holds now (the earliest when it holds none).
    /// A resync in progress starts again from there.
    async fn rehydrate(&mut self, source: &Source, why: Reload) -> Flow {
        match &why {
            Reload::Lost => {
                warn!("Redis lost the agent's state (flushed, restarted without persistence, or replaced): rehydrating from the offsets it holds, or the earliest");
                self.metrics.rehydrated();
            }
            Reload::Diverged(detail) => {
                warn!("Redis changed under the agent ({detail}): restored from an older snapshot or backup, a replica promoted, or a torn append-only file; resuming from the offsets Redis holds now");
                self.metrics.diverged();
            }
        }
        self.batch.clear();
        // Its script fails on the marker or sequence check if it has not run yet.
        self.in_flight = None;
        let resync = self.resync.take();
        self.sink.abandon_resync();
        if self.connect_redis().await == Flow::Stop {
            return Flow::Stop;
        }
        if matches!(why, Reload::Diverged(_)) {
            self.sink.bump_status("redis_divergences").await;
        }
        for (partition, start) in self.positions.iter_mut() {
            *start = self.stored.start(partition.0, partition.1);
        }
        self.reassign(source);
        let starts: Vec<_> = self.positions.iter().map(|(&p, &s)| (p, s)).collect();
        self.log_start_unchecked = stored_starts(&starts);
        self.restart_catch_up();
        self.written_lag = None;
        let mut lineage = self.stored.lineage_pending.clone();
        let mut topics = lineage.clone();
        if let Some(resync) = resync {
            if self.stored.next.is_empty() {
                info!("the resync is moot: everything is read again anyway");
            } else {
                topics.extend(resync.topics);
                lineage.extend(resync.lineage);
            }
        }
        if !topics.is_empty() && self.start_resync(source, topics, lineage).await == Flow::Stop {
            return Flow::Stop;
        }
        self.write_state().await;
        Flow::Rehydrated
    }

    /// Idle-time checks, once per tick.
    async fn housekeeping(&mut self, source: &Source) -> Flow {
        liveness(&mut self.notify, self.ready_by, self.state);
        // G4: notice a flushed Redis even when no records arrive.
        if self.last_apply.elapsed() >= TICK {
            match self.sink.held().await {
                Ok(Held::Ours) => {
                    if self
                        .redis_problem
                        .as_ref()
                        .is_some_and(|p| p.0 == "unreachable")
                    {
                        self.redis_fine().await;
                    }
                }
                Ok(Held::Lost) => {
                    if self.rehydrate(source, Reload::Lost).await == Flow::Stop {
                        return Flow::Stop;
                    }
                }
                Ok(Held::Diverged) => {
                    let why = format!("its apply sequence is not {}", self.sink.seq());
                    if self.rehydrate(source, Reload::Diverged(why)).await == Flow::Stop {
                        return Flow::Stop;
                    }
                }
                Err(e) => {
                    if self.state != State::RedisUnreachable {
                        warn!("{e}");
                    }
                    self.redis_refuses(&e).await;
                }
            }
        }
        // Redis may be reconfigured (CONFIG SET) or replaced without losing
        // our state: its eviction policy and our permissions, again.
        if self.fit_checked.elapsed() >= FIT_CHECK_EVERY && self.redis_problem.is_none() {
            self.fit_checked = Instant::now();
            if let Some(why) = self.unfit_redis().await {
                error!("{why}");
                self.unfit = Some(why);
                return Flow::Stop;
            }
        }
        if self.functions_checked.elapsed() >= FUNCTIONS_CHECK_EVERY && self.redis_problem.is_none()
        {
            self.functions_checked = Instant::now();
            self.sink.ensure_read_functions().await;
        }
        self.isolate_oversize(source);
        self.poll_topic_ids(source).await;
        // Statistics have shown a broker connection up for a while since
        // librdkafka last said all were down.
        if source.brokers_down() && source.settled() {
            source.mark_reachable();
        }
        self.discover_new(source);
        let refusal_explains_it = self
            .last_refused_at
            .is_some_and(|at| at.elapsed() < PROBE_FOR);
        if source.brokers_down() && refusal_explains_it {
            source.mark_reachable();
        }
        if source.brokers_down() && self.state != State::RedisUnreachable {
            if self.state != State::KafkaUnreachable {
                warn!("Kafka unreachable: Redis keeps serving the last state; reconnecting");
            }
            self.state = State::KafkaUnreachable;
        } else {
            if self.state == State::KafkaUnreachable {
                info!("Kafka reachable again");
                self.state = self.reachable_state();
            }
            if !self.caught_up && self.idle() {
                self.check_caught_up(source);
            } else if self.caught_up {
                self.lag = self.lag(source).or(self.lag);
            }
            self.poll_retention(source);
            if self.idle() && self.check_lineage(source).await == Flow::Stop {
                return Flow::Stop;
            }
            if self.idle() && self.lag == Some(0) && self.missed_deletes(source).await == Flow::Stop
            {
                return Flow::Stop;
            }
        }
        self.write_state().await;
        self.report(source).await;
        Flow::Continue
    }

    /// Once per tick: per-partition lag and the last Kafka contact to the
    /// status hash (fields that changed only) and to the metrics.
    async fn report(&mut self, source: &Source) {
        // During a resync the positions are those of the re-read, below the
        // offsets Redis holds: the group keeps the last committed ones.
        if self.settings.kafka.commit_group.is_some() && self.resync.is_none() {
            self.commit_applied(source);
        }
        let partition_lag = self.partition_lag(source);
        let last_contact_ms = source.last_contact_ms();
        self.metrics.set_kafka_client_errors(source.client_errors());
        self.metrics.tick(
            self.lag,
            partition_lag.clone(),
            source.fetch_queue(),
            last_contact_ms,
        );
        if self
            .redis_problem
            .as_ref()
            .is_some_and(|p| p.0 == "unreachable")
        {
            return;
        }
        // The heartbeat: `edgecache status` trusts the hash only while this
        // is recent (the agent may be stopped, or Redis refuse its writes).
        let mut fields: Vec<(String, String)> =
            vec![("updated_ms".to_owned(), crate::sink::now_ms().to_string())];
        let mut changed = Vec::new();
        for (partition, lag) in partition_lag.unwrap_or_default() {
            if self.reported.partition_lag.get(&partition) != Some(&lag) {
                let (topic_idx, p) = partition;
                let topic = &self.settings.topics[topic_idx].name;
                fields.push((format!("lag.{topic}/{p}"), lag.to_string()));
                changed.push((partition, lag));
            }
        }
        let mut stuck_gone: Vec<String> = self
            .reported
            .partition_lag
            .keys()
            .filter(|p| !self.positions.contains_key(p))
            .map(|p| format!("lag.{}/{}", self.settings.topics[p.0].name, p.1))
            .collect();
        for (partition, at) in &self.stuck {
            if self.reported_stuck.get(partition) != Some(at) {
                let topic = &self.settings.topics[partition.0].name;
                fields.push((format!("stuck.{topic}/{}", partition.1), at.to_string()));
            }
        }
        for partition in self.reported_stuck.keys() {
            if !self.stuck.contains_key(partition) {
                let topic = &self.settings.topics[partition.0].name;
                stuck_gone.push(format!("stuck.{topic}/{}", partition.1));
            }
        }
        if !stuck_gone.is_empty() {
            let gone: Vec<&str> = stuck_gone.iter().map(String::as_str).collect();
            if self.sink.clear_status(&gone).await.is_ok() {
                self.reported_stuck
                    .retain(|p, _| self.stuck.contains_key(p));
                let positions = &self.positions;
                self.reported
                    .partition_lag
                    .retain(|p, _| positions.contains_key(p));
            }
        }
        let contact_changed =
            last_contact_ms.is_some() && last_contact_ms != self.reported.last_contact_ms;
        if let (true, Some(ms)) = (contact_changed, last_contact_ms) {
            fields.push(("last_kafka_contact_ms".to_owned(), ms.to_string()));
        }
        let fields: Vec<(&str, String)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        match self.sink.set_status(&fields).await {
            Ok(()) => {
                self.reported_stuck = self.stuck.clone();
                self.reported.partition_lag.extend(changed);
                if contact_changed {
                    self.reported.last_contact_ms = last_contact_ms;
                }
                // Only with nothing waiting: a batch in hand is the apply's
                // to clear.
                if self.redis_problem.is_some() && self.idle() && !self.retrying {
                    self.redis_fine().await;
                    self.write_state().await;
                }
            }
            // Redis refuses writes while nothing is being applied: say so.
            Err(e @ SinkError::Refused { .. }) if self.idle() && !self.retrying => {
                self.redis_refuses(&e).await
            }
            Err(_) => {}
        }
    }

    /// Commits the positions Redis holds that moved since the last commit to
    /// `kafka.commit_group`: once a tick rather than after every apply, so a
    /// rehydrate at 100k records/s costs one OffsetCommit a second, not a
    /// thousand. For dashboards only; resume reads Redis (G2).
    fn commit_applied(&mut self, source: &Source) {
        let moved: Vec<(PartitionId, i64)> = self
            .positions
            .iter()
            .filter_map(|(&partition, start)| match start {
                Start::At(next) if self.reported.committed.get(&partition) != Some(next) => {
                    Some((partition, *next))
                }
                _ => None,
            })
            .collect();
        if moved.is_empty() {
            return;
        }
        match source.commit(&moved) {
            Ok(()) => self.reported.committed.extend(moved),
            Err(e) => debug!("commit to kafka.commit_group not queued: {e}"),
        }
    }

    /// Reads topics' `delete.retention.ms` in the background: at start, then
    /// every `RETENTION_REFRESH` (an operator may change it).
    fn poll_retention(&mut self, source: &Source) {
        let every = if self.retention.is_some() {
            RETENTION_REFRESH
        } else {
            RETENTION_RETRY
        };
        match self.retention_poll.poll(every, || source.retention_task()) {
            Some(Ok(Ok(retention))) => {
                if self.retention.as_ref() != Some(&retention) {
                    debug!(?retention, "delete.retention.ms per topic");
                }
                self.retention = Some(retention);
            }
            Some(Ok(Err(e))) => debug!("reading topic configurations: {e}; will retry"),
            _ => {}
        }
    }

    /// Once per tick: finds and pauses partitions whose next record batch
    /// librdkafka refuses as too large (see [`Isolating`]), so the others
    /// keep flowing; asks the broker for the stuck ones' log ends.
    fn isolate_oversize(&mut self, source: &Source) {
        let seen = source.oversize_responses();
        if seen > self.oversize_seen {
            self.last_refused_at = Some(Instant::now());
        }
        // A fetch sent before a partition was paused may still be refused:
        // errors right after a partition was found are not news.
        let refused = seen > self.oversize_seen
            && self
                .last_stuck_at
                .is_none_or(|at| at.elapsed() >= PROBE_FOR);
        self.oversize_seen = seen;
        match self.isolating.take() {
            None if refused => {
                let candidates: Vec<PartitionId> = self
                    .positions
                    .keys()
                    .filter(|p| !self.stuck.contains_key(p))
                    .copied()
                    .collect();
                warn!(
                    n_partitions = candidates.len(),
                    "a record batch is larger than the agent may receive \
                     (receive.message.max.bytes, from agent.memory_budget_mib): \
                     pausing the partitions to find which one"
                );
                if let Err(e) = source.pause(&candidates, true) {
                    error!("{e}");
                    return;
                }
                // Partitions read to their end cannot hold the batch: resume
                // them at once. Probed last to first, so those known to have
                // records waiting go first.
                let (idle, mut to_probe): (Vec<PartitionId>, Vec<PartitionId>) =
                    candidates.into_iter().partition(|&p| {
                        matches!(
                            (source.fetched_watermarks(p), self.positions.get(&p)),
                            (Some((_, high)), Some(Start::At(next))) if *next >= high
                        )
                    });
                let _ = source.pause(&idle, false);
                to_probe.sort_by_key(|&p| {
                    let waiting = match (source.fetched_watermarks(p), self.positions.get(&p)) {
                        (Some((_, high)), Some(Start::At(next))) => high > *next,
                        _ => false,
                    };
                    waiting
                });
                self.isolating = Some(Isolating {
                    to_probe,
                    probe: None,
                });
            }
            None => {}
            Some(mut isolating) => {
                if let Some((partition, since)) = isolating.probe {
                    if refused {
                        let _ = source.pause(&[partition], true);
                        let at = match self.positions.get(&partition) {
                            Some(Start::At(next)) => *next,
                            _ => source
                                .fetched_watermarks(partition)
                                .map_or(0, |(low, _)| low),
                        };
                        error!(
                            topic = %self.settings.topics[partition.0].name,
                            partition = partition.1,
                            offset = at,
                            "partition stopped: its record batch at this offset is larger than \
                             the agent may receive; raise agent.memory_budget_mib (the largest \
                             response is printed by check-config as receive.message.max.bytes) \
                             and restart. The other partitions go on."
                        );
                        self.stuck.insert(partition, at);
                        self.last_stuck_at = Some(Instant::now());
                        isolating.probe = None;
                    } else if since.elapsed() >= PROBE_FOR {
                        isolating.probe = None;
                    }
                }
                if isolating.probe.is_none() {
                    match isolating.to_probe.pop() {
                        Some(partition) => {
                            let _ = source.pause(&[partition], false);
                            isolating.probe = Some((partition, Instant::now()));
                        }
                        None => {
                            info!(n_stuck = self.stuck.len(), "oversized record search done");
                            // The refused responses looked like a broker
                            // outage; the connection is fine once the batch
                            // is no longer asked for.
                            source.mark_reachable();
                            return;
                        }
                    }
                }
                self.isolating = Some(isolating);
            }
        }
        match self.stuck_task.take() {
            Some(task) if !task.is_finished() => self.stuck_task = Some(task),
            Some(task) => {
                if let Some(Ok(Ok(ends))) = task.now_or_never() {
                    self.stuck_log_end.extend(ends);
                }
            }
            None if !self.stuck.is_empty() && self.last_log_end.elapsed() >= TICK * 10 => {
                self.last_log_end = Instant::now();
                self.stuck_task = Some(source.log_end_task(self.stuck.keys().copied().collect()));
            }
            None => {}
        }
    }

    /// Reads the topics' IDs again every `partition_discovery_secs`, in the
    /// background.
    async fn poll_topic_ids(&mut self, source: &Source) {
        let every = self.settings.agent.partition_discovery;
        match self.topic_ids.poll(every, || source.topic_ids_task()) {
            Some(Ok(Ok(ids))) => self.compare_topic_ids(ids).await,
            Some(Ok(Err(e))) => debug!("reading topic IDs: {e}; will retry"),
            _ => {}
        }
    }

    /// Kafka's side of lineage by topic ID (KIP-516): a topic whose ID is
    /// not the one its stored offsets were taken from was deleted and
    /// created again, whatever its offsets look like. A topic seen for the
    /// first time has its ID recorded.
    async fn compare_topic_ids(&mut self, ids: Vec<Option<String>>) {
        for (idx, id) in ids.into_iter().enumerate() {
            let Some(id) = id else { continue };
            let name = self.settings.topics[idx].name.clone();
            match self.stored_ids.get(&name) {
                Some(stored) if *stored == id => {}
                Some(stored) => {
                    warn!(
                        topic = %name,
                        stored = %stored,
                        now = %id,
                        "the topic's ID changed: it was deleted and created again"
                    );
                    self.lineage_due.insert(idx);
                    self.new_ids.insert(idx, id);
                    // Its partitions may have changed too.
                    self.discovery.force();
                }
                None => {
                    if self.sink.set_topic_id(&name, &id).await.is_ok() {
                        self.stored_ids.insert(name, id);
                    }
                }
            }
        }
    }

    /// Kafka's side of lineage: a partition whose log ends below the offset
    /// Redis holds for it is not the log those offsets were taken from (the
    /// topic was deleted and recreated, or truncated), so its topic is
    /// written again from the start and swept. The log end is the one of
    /// librdkafka's last fetch response, never older than a record already
    /// delivered; two ticks in a row must agree. Also starts resyncs found
    /// pending in Redis or postponed.
    async fn check_lineage(&mut self, source: &Source) -> Flow {
        let mut topics = std::mem::take(&mut self.lineage_due);
        let mut suspect = BTreeSet::new();
        for (&partition, start) in &self.positions {
            let Start::At(next) = *start else {
                continue;
            };
            let Some((_, high)) = source.fetched_watermarks(partition) else {
                continue;
            };
            if high >= 0 && high < next {
                suspect.insert(partition);
                if self.lineage_suspect.contains(&partition) {
                    warn!(
                        topic = %self.settings.topics[partition.0].name,
                        partition = partition.1,
                        stored = next,
                        log_end = high,
                        "the log ends below the offset stored in Redis: the topic was recreated or truncated"
                    );
                    topics.insert(partition.0);
                }
            }
        }
        self.lineage_suspect = suspect;
        if let Some(resync) = &self.resync {
            topics.retain(|t| !resync.lineage.contains(t));
        }
        if topics.is_empty() {
            return Flow::Continue;
        }
        self.lineage_suspect.retain(|p| !topics.contains(&p.0));
        self.start_resync(source, topics.clone(), topics).await
    }

    /// Runs while every partition is read to its end: finishes a resync in
    /// progress, or checks whether deletes may have been missed since the
    /// agent was last caught up (see `resync`) and starts one, or else
    /// moves `caught_up_ms` to now.
    async fn missed_deletes(&mut self, source: &Source) -> Flow {
        if self.resync.is_some() {
            return self.finish_resync(source).await;
        }
        // Watermarks right after a reconnect may predate the outage; and
        // without the topics' retention there is nothing to compare with.
        if !source.settled() {
            return Flow::Continue;
        }
        let Some(retention) = &self.retention else {
            return Flow::Continue;
        };
        let now = crate::sink::now_ms();
        let mut topics = resync::retention_exceeded(now, self.caught_up_ms, retention);
        for &topic in &topics {
            warn!(
                topic = %self.settings.topics[topic].name,
                away_s = (now - self.caught_up_ms) / 1000,
                delete_retention_s = retention[topic].unwrap_or_default() / 1000,
                "not caught up for longer than the topic keeps tombstones: deletes may have been missed"
            );
        }
        let unchecked: Vec<PartitionId> = self.log_start_unchecked.keys().copied().collect();
        for (partition, mark) in source.watermarks(&unchecked) {
            let Some(stored) = self.log_start_unchecked.remove(&partition) else {
                continue;
            };
            if stored < mark.low {
                warn!(
                    topic = %self.settings.topics[partition.0].name,
                    partition = partition.1,
                    stored,
                    log_start = mark.low,
                    "the stored offset is below the log start: records were deleted unread"
                );
                topics.insert(partition.0);
            }
        }
        if !topics.is_empty() {
            return self.start_resync(source, topics, BTreeSet::new()).await;
        }
        self.caught_up_ms = now;
        if self
            .caught_up_written
            .is_none_or(|at| at.elapsed() >= CAUGHT_UP_WRITE_EVERY)
        {
            self.write_caught_up().await;
        }
        Flow::Continue
    }

    async fn write_caught_up(&mut self) {
        let field = [("caught_up_ms", self.caught_up_ms.to_string())];
        if self.sink.set_status(&field).await.is_ok() {
            self.caught_up_written = Some(Instant::now());
        }
    }

    /// Assigns every partition at its position, dropping what librdkafka
    /// prefetched and its watermarks (stale ones could declare a re-read
    /// caught up).
    fn reassign(&mut self, source: &Source) {
        let starts: Vec<_> = self.positions.iter().map(|(&p, &s)| (p, s)).collect();
        if let Err(e) = source.assign(&starts) {
            error!("{e}");
        }
        source.forget_watermarks();
        // A new assignment resumes every partition: an oversized batch is
        // found again if it is still ahead.
        self.stuck.clear();
        self.stuck_log_end.clear();
        self.isolating = None;
    }

    /// Starts counting a new catch-up (rehydrate or resync) for the progress
    /// lines and the caught-up check.
    fn restart_catch_up(&mut self) {
        self.caught_up = false;
        self.priority.set(true);
        self.catch_up_started = Instant::now();
        self.records_since_start = 0;
        self.progress_at = Instant::now();
        self.progress_records = 0;
    }

    fn prefixes(&self, topics: &BTreeSet<usize>) -> Vec<Vec<u8>> {
        topics
            .iter()
            .map(|&t| self.settings.topics[t].key_prefix.clone())
            .collect()
    }

    /// Re-reads `topics` from the earliest offset, noting keys below the
    /// stored offsets and tracking writes from there on. For the topics in
    /// `lineage` (another topic than the stored offsets were taken from)
    /// every record is written again instead, and the pending resync is
    /// noted in Redis first so that a restart finishes it. Joins a resync
    /// already in progress.
    async fn start_resync(
        &mut self,
        source: &Source,
        topics: BTreeSet<usize>,
        lineage: BTreeSet<usize>,
    ) -> Flow {
        let (mut all, mut all_lineage, mut shadow_until) = match self.resync.take() {
            Some(r) => (r.topics, r.lineage, r.shadow_until),
            None => Default::default(),
        };
        all.extend(topics.iter().copied());
        all_lineage.extend(lineage.iter().copied());
        let names = |set: &BTreeSet<usize>| -> Vec<String> {
            set.iter()
                .map(|&t| self.settings.topics[t].name.clone())
                .collect()
        };
        if !lineage.is_empty() {
            if let Err(e) = self.sink.mark_lineage(&names(&lineage), true).await {
                warn!("{e}; will try the resync again");
                self.lineage_due.extend(lineage);
                return Flow::Continue;
            }
            // Only now: a stop from here on finds the resync pending.
            for &topic in &lineage {
                if let Some(id) = self.new_ids.remove(&topic) {
                    let name = self.settings.topics[topic].name.clone();
                    if self.sink.set_topic_id(&name, &id).await.is_ok() {
                        self.stored_ids.insert(name, id);
                    } else {
                        self.new_ids.insert(topic, id);
                    }
                }
            }
        }
        let prefixes = self.prefixes(&all);
        if let Err(e) = self.sink.begin_resync(prefixes).await {
            warn!("{e}; will try the resync again");
            self.lineage_due.extend(all_lineage);
            return Flow::Continue;
        }
        for (partition, start) in self.positions.iter_mut() {
            if all_lineage.contains(&partition.0) {
                shadow_until.remove(partition);
                *start = Start::Earliest;
            } else if topics.contains(&partition.0) {
                if let Start::At(next) = *start {
                    shadow_until.insert(*partition, next);
                }
                *start = Start::Earliest;
            }
        }
        self.reassign(source);
        if lineage.is_empty() {
            warn!(
                topics = ?names(&topics),
                "resync: reading again from the earliest offset; keys not seen again will be removed"
            );
        } else {
            for _ in &lineage {
                self.metrics.lineage_resynced();
            }
            self.sink.bump_status("lineage_resyncs").await;
            warn!(
                topics = ?names(&lineage),
                "the topic is not the one the stored offsets were taken from (deleted and recreated?): \
                 writing it again from its earliest offset; keys it no longer has will be removed"
            );
        }
        self.resync = Some(Resync {
            topics: all,
            shadow_until,
            started_ms: crate::sink::now_ms(),
            started: Instant::now(),
            lineage: all_lineage,
        });
        self.state = State::Resyncing;
        self.restart_catch_up();
        self.lag = None;
        self.write_state().await;
        Flow::Continue
    }

    /// The re-read reached the end of every partition: remove the keys it did
    /// not see, then go live. On a Redis error the sweep runs again on the
    /// next tick (writes stay tracked until it completed).
    async fn finish_resync(&mut self, source: &Source) -> Flow {
        let Some(resync) = &self.resync else {
            return Flow::Continue;
        };
        let prefixes = self.prefixes(&resync.topics);
        let lineage: Vec<String> = resync
            .lineage
            .iter()
            .map(|&t| self.settings.topics[t].name.clone())
            .collect();
        let mut removed = 0;
        for prefix in &prefixes {
            match self.sink.sweep(prefix).await {
                Ok(n) => removed += n,
                Err(SinkError::Lost) => return self.rehydrate(source, Reload::Lost).await,
                Err(SinkError::Diverged(why)) => {
                    return self.rehydrate(source, Reload::Diverged(why)).await
                }
                Err(e) => {
                    warn!("{e}; will sweep again");
                    return Flow::Continue;
                }
            }
        }
        if let Err(e) = self.sink.end_resync().await {
            warn!("{e}; will sweep again");
            return Flow::Continue;
        }
        if !lineage.is_empty() {
            if let Err(e) = self.sink.mark_lineage(&lineage, false).await {
                warn!("{e}; will sweep again");
                return Flow::Continue;
            }
        }
        let Some(resync) = self.resync.take() else {
            return Flow::Continue;
        };
        for (partition, until) in resync.shadow_until {
            if let Some(start @ Start::Earliest) = self.positions.get_mut(&partition) {
                *start = Start::At(until);
            }
        }
        info!(
            n_removed = removed,
            seconds = format!("{:.1}", resync.started.elapsed().as_secs_f64()),
            "resync done: removed the keys whose deletes were missed"
        );
        self.caught_up_ms = resync.started_ms;
        self.write_caught_up().await;
        self.state = State::CatchingUp;
        self.check_caught_up(source);
        Flow::Continue
    }

    /// Adds partitions that appeared since the last look (a topic grew or was
    /// created after start). Metadata is read in the background; this only
    /// starts a request or takes the answer of the previous one.
    fn discover_new(&mut self, source: &Source) {
        let mut every = self.settings.agent.partition_discovery;
        if !self.missing_topics.is_empty() {
            every = every.min(MISSING_TOPIC_LOOK_EVERY);
        }
        let Some(Ok(Ok(found))) = self.discovery.poll(every, || source.discover_task()) else {
            return;
        };
        source.mark_reachable();
        let found = self.in_scope(found);
        self.note_missing_topics(&found);
        // Kafka never takes partitions away from a topic: fewer
        // means it was deleted and created again with fewer. Those
        // positions go (they would never report a watermark, so
        // nothing would ever count as caught up) and the topic is
        // rewritten.
        let vanished: Vec<PartitionId> = self
            .positions
            .keys()
            .filter(|p| found.iter().any(|f| f.0 == p.0) && !found.contains(p))
            .copied()
            .collect();
        if !vanished.is_empty() && !self.idle() {
            // A batch in hand may still name them: look again.
            self.discovery.force();
        } else if !vanished.is_empty() {
            for partition in &vanished {
                warn!(
                    topic = %self.settings.topics[partition.0].name,
                    partition = partition.1,
                    "partition no longer exists: the topic was created again with fewer partitions"
                );
                self.positions.remove(partition);
                self.lineage_due.insert(partition.0);
            }
            self.reassign(source);
        }
        let new: Vec<(PartitionId, Start)> = found
            .into_iter()
            .filter(|p| !self.positions.contains_key(p))
            .map(|p| (p, self.stored.start(p.0, p.1)))
            .collect();
        if new.is_empty() {
            return;
        }
        info!(n_partitions = new.len(), "new partitions found; assigning");
        match source.add(&new) {
            Ok(()) => {
                self.log_start_unchecked.extend(stored_starts(&new));
                self.positions.extend(new);
                self.caught_up = false;
                self.priority.set(true);
            }
            Err(e) => error!("{e}"),
        }
    }

    /// Records Kafka has that Redis does not yet, summed over partitions,
    /// from the watermarks librdkafka last reported; `None` until every
    /// assigned partition has reported. A partition whose librdkafka
    /// position passed the watermark with nothing queued counts as done
    /// (trailing transaction markers occupy offsets but never reach us).
    fn lag(&self, source: &Source) -> Option<u64> {
        let partition_lag = self.partition_lag(source)?;
        Some(partition_lag.iter().map(|(_, lag)| lag).sum())
    }

    /// [`Pipeline::lag`] per partition.
    fn partition_lag(&self, source: &Source) -> Option<Vec<(PartitionId, u64)>> {
        let partitions: Vec<PartitionId> = self.positions.keys().copied().collect();
        let marks = source.watermarks(&partitions);
        if partitions.is_empty() || marks.len() < partitions.len() {
            return None;
        }
        let lags = marks
            .iter()
            .map(|(p, mark)| {
                let next = match self.positions.get(p) {
                    Some(Start::At(next)) => *next,
                    _ => mark.low,
                };
                if let Some(&end) = self.stuck_log_end.get(p) {
                    return Some((*p, (end - next).max(0) as u64));
                }
                // Past the log end: a recreated topic (see
                // `check_lineage`), or statistics older than the last
                // fetch. Either way the lag is not known.
                if next > mark.high && source.fetched_watermarks(*p).is_none_or(|(_, h)| next > h) {
                    return None;
                }
                let lag = if mark.app_offset >= mark.high && mark.queued == 0 {
                    0
                } else {
                    (mark.high - next).max(0) as u64
                };
                Some((*p, lag))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(lags)
    }

    /// Caught up when the lag is zero with nothing in hand; logs progress
    /// every few seconds until then.
    fn check_caught_up(&mut self, source: &Source) {
        let Some(partition_lag) = self.partition_lag(source) else {
            return;
        };
        self.lag = Some(partition_lag.iter().map(|(_, lag)| lag).sum());
        // Stuck partitions cannot move until the budget is raised: they are
        // reported (state `partition-stuck`), not waited for.
        let lag: u64 = partition_lag
            .iter()
            .filter(|(p, _)| !self.stuck.contains_key(p))
            .map(|(_, lag)| lag)
            .sum();
        if lag > 0 {
            let elapsed = self.progress_at.elapsed();
            if elapsed >= PROGRESS_EVERY {
                let applied = self.records_since_start - self.progress_records;
                let rate = applied as f64 / elapsed.as_secs_f64();
                let eta = if rate > 0.0 {
                    format!("{:.0}s", lag as f64 / rate)
                } else {
                    "unknown".to_owned()
                };
                info!(
                    n_records = self.records_since_start,
                    records_per_s = rate as u64,
                    lag,
                    eta = %eta,
                    "catching up"
                );
                self.progress_at = Instant::now();
                self.progress_records = self.records_since_start;
            }
            return;
        }
        self.go_live();
    }

    /// Caught up without waiting for the tick and the once-a-second
    /// statistics: right after an apply, every partition's next offset in
    /// Redis reached the high watermark of the last fetch response for it
    /// (librdkafka's cached value, no request). Those records were fetched
    /// with or before that response, so this is the tick's rule on fresher
    /// numbers. A partition that never delivered a record counts when it is
    /// empty (low = high). Trailing transaction markers or an open
    /// transaction keep next below the high mark: the tick's check, which
    /// knows librdkafka's position and the last stable offset, covers those.
    fn applied_all_fetched(&self, source: &Source) -> bool {
        !self.positions.is_empty()
            && self.positions.iter().all(|(&partition, start)| {
                if self.stuck.contains_key(&partition) {
                    return true;
                }
                match (source.fetched_watermarks(partition), start) {
                    // Above the log end is another lineage, not caught up
                    // (`check_lineage`).
                    (Some((_, high)), Start::At(next)) => *next == high,
                    (Some((low, high)), Start::Earliest) => low >= high,
                    (None, _) => false,
                }
            })
    }

    fn go_live(&mut self) {
        if self.resync.is_some() {
            // Live only after the sweep (`finish_resync`).
            return;
        }
        let seconds = self.catch_up_started.elapsed().as_secs_f64();
        info!(
            n_records = self.records_since_start,
            seconds = format!("{seconds:.1}"),
            "caught up; live"
        );
        self.caught_up = true;
        self.priority.set(false);
        self.lag = Some(0);
        self.state = State::Live;
        self.notify.ready("live: caught up");
        // `caught_up_ms` moves on only once the missed-deletes check could
        // not have wanted a resync: nothing was stored (all read from the
        // earliest offset) or the gap is too short to count. Otherwise the
        // check does it, seconds later.
        let now = crate::sink::now_ms();
        if self.stored.next.is_empty() || now - self.caught_up_ms < resync::MIN_GAP_MS {
            self.caught_up_ms = now;
            self.caught_up_written = None;
        }
    }

    async fn set_state(&mut self, state: State) {
        self.state = state;
        self.write_state().await;
    }

    /// The state as readers should see it.
    fn shown_state(&self) -> State {
        let state = if self.caught_up && self.state == State::CatchingUp {
            State::Live
        } else {
            self.state
        };
        match state {
            State::Live | State::CatchingUp | State::Rehydrating
                if !self.missing_topics.is_empty() =>
            {
                State::WaitingForTopic
            }
            State::Live if !self.stuck.is_empty() => State::PartitionStuck,
            other => other,
        }
    }

    /// Writes `state` to the status hash when it changed, with the reason
    /// when Redis refuses writes (best effort: Redis may refuse this write
    /// too, and then the metrics, systemd's STATUS= line and the runtime
    /// file say it).
    async fn write_state(&mut self) {
        let state = self.shown_state();
        self.metrics.set_state(state);
        let line = match (&self.redis_problem, state) {
            (Some((reason, _, _)), State::RedisUnreachable) => {
                format!("{}: {reason}", state.as_str())
            }
            (_, State::WaitingForTopic) => {
                format!("{}: {}", state.as_str(), self.missing_topics.join(", "))
            }
            _ => state.as_str().to_owned(),
        };
        if self.notified_state.as_deref() != Some(line.as_str()) {
            self.notify.status(&line);
            self.notified_state = Some(line);
        }
        let reason = self.redis_problem.as_ref().map(|p| p.0.clone());
        if self.written_runtime.as_ref() != Some(&(state, reason.clone())) {
            self.write_runtime_file(state);
            self.written_runtime = Some((state, reason));
        }
        // An unreachable Redis would only make this wait for the timeout.
        if self
            .redis_problem
            .as_ref()
            .is_some_and(|p| p.0 == "unreachable")
        {
            return;
        }
        if self.lag != self.written_lag {
            if let Some(lag) = self.lag {
                // A total of 0 goes with per-partition fields of 0, so the
                // hash never shows a partition behind next to no lag (the
                // next tick would, but the agent may stop before it).
                let mut fields = vec![("lag".to_owned(), lag.to_string())];
                let mut zeroed = Vec::new();
                if lag == 0 {
                    for (&partition, &reported) in &self.reported.partition_lag {
                        if reported != 0 && !self.stuck.contains_key(&partition) {
                            let topic = &self.settings.topics[partition.0].name;
                            fields.push((format!("lag.{topic}/{}", partition.1), "0".to_owned()));
                            zeroed.push(partition);
                        }
                    }
                }
                let fields: Vec<(&str, String)> = fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.clone()))
                    .collect();
                if self.sink.set_status(&fields).await.is_ok() {
                    self.written_lag = self.lag;
                    for partition in zeroed {
                        self.reported.partition_lag.insert(partition, 0);
                    }
                }
            }
        }
        if self.written_state == Some(state) {
            return;
        }
        let mut fields = vec![
            ("state", state.as_str().to_owned()),
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("state_since_ms", crate::sink::now_ms().to_string()),
            ("updated_ms", crate::sink::now_ms().to_string()),
            ("waiting_for_topics", self.missing_topics.join(",")),
        ];
        if state == State::Live && self.caught_up_written.is_none() {
            fields.push(("caught_up_ms", self.caught_up_ms.to_string()));
        }
        if let Some((reason, message, since)) = &self.redis_problem {
            fields.push(("redis_error", reason.clone()));
            fields.push(("redis_error_message", message.clone()));
            fields.push(("redis_error_since_ms", since.to_string()));
        }
        if self.sink.set_status(&fields).await.is_ok() {
            self.written_state = Some(state);
            if state == State::Live && self.caught_up_written.is_none() {
                self.caught_up_written = Some(Instant::now());
            }
        }
    }

    /// Under systemd (`RuntimeDirectory=`), the state also goes to a small
    /// file, readable by `edgecache status` when Redis refuses the status
    /// hash. Best effort.
    fn write_runtime_file(&self, state: State) {
        let Some(path) = &self.runtime_file else {
            return;
        };
        let (reason, message, since) = match &self.redis_problem {
            Some((reason, message, since)) => (reason.as_str(), message.as_str(), *since),
            None => ("", "", 0),
        };
        let text = serde_json::json!({
            "namespace": self.settings.redis.namespace,
            "state": state.as_str(),
            "redis_error": reason,
            "redis_error_message": message,
            "redis_error_since_ms": since,
            "waiting_for_topics": self.missing_topics,
            "updated_ms": crate::sink::now_ms(),
            "pid": std::process::id(),
        })
        .to_string();
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            // Readable by the operator's `edgecache status`; no secrets in it.
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
            std::fs::rename(&tmp, path)
        });
        if let Err(e) = written {
            debug!("runtime status file {}: {e}", path.display());
        }
    }

    /// Finishes the batch in flight and the one in hand if Redis takes
    /// them within two seconds, otherwise abandons them: their offsets were
    /// not stored, so they are read again after the restart and nothing is
    /// lost. The one in hand is never applied without the one before it.
    async fn shutdown(&mut self) {
        self.notify.stopping();
        // Only reached once shutdown was asked; a Redis known to be down is
        // not worth the two seconds.
        if self.state != State::RedisUnreachable && !self.idle() {
            let finished = tokio::time::timeout(Duration::from_secs(2), async {
                if let Some(in_flight) = self.in_flight.take() {
                    let result = crate::sink::finish(in_flight.pending.await);
                    self.sink.settle(&result);
                    result?;
                }
                if !self.batch.is_empty() {
                    self.sink.apply(&self.batch, &self.fields).await?;
                }
                Ok::<(), SinkError>(())
            })
            .await;
            match finished {
                Ok(Ok(())) => info!("applied the last batch"),
                _ => info!("abandoned the in-flight batch; it is read again after restart"),
            }
        }
        // Refusing to run against this Redis means writing nothing to it.
        if self.unfit.is_none() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.sink.set_status(&[("state", "stopped".to_owned())]),
            )
            .await;
        }
        info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts when due (at once without a clock), never two at once, the
    /// answer only once finished, then not again before the interval
    /// unless forced; `from_answer` counts the interval from the answer.
    #[test]
    fn poller_starts_when_due_and_takes_finished_answers() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let every = Duration::from_secs(3600);
            let mut poller = Poller::from_start(None);
            assert!(poller.poll(every, || tokio::spawn(async { 7 })).is_none());
            assert!(poller.task.is_some());
            while !poller.task.as_ref().unwrap().is_finished() {
                tokio::task::yield_now().await;
            }
            let answer = poller.poll(every, || unreachable!("one out already"));
            assert_eq!(answer.map(Result::unwrap), Some(7));
            assert!(poller.poll(every, || unreachable!("not due")).is_none());
            poller.force();
            assert!(poller.poll(every, || tokio::spawn(async { 8 })).is_none());
            assert!(poller.task.is_some() && !poller.forced);

            let start = Instant::now();
            let mut poller = Poller::from_answer(start);
            let due = Duration::ZERO;
            assert!(poller.poll(due, || tokio::spawn(async { 9 })).is_none());
            assert_eq!(poller.since, Some(start));
            while !poller.task.as_ref().unwrap().is_finished() {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                poller.poll(every, || unreachable!()).map(Result::unwrap),
                Some(9)
            );
            assert!(poller.since > Some(start));
            assert!(poller.poll(every, || unreachable!("not due")).is_none());
        });
    }
}
