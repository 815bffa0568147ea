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

use crate::batch::{Batch, PartitionId};
use crate::checkpoint::{Start, StoredOffsets};
use crate::codec::Fields;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::priority::Priority;
use crate::resync::Resync;
use crate::sink::{Sink, SinkError};
use crate::source::{Event, Source, SourceError};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// How often the idle checks run: marker still there (G4), partitions,
/// caught-up state, Kafka reachability.
const TICK: Duration = Duration::from_secs(1);

mod apply;
mod catch_up;
mod connect;
mod housekeeping;
mod ingest;
mod oversize;
mod poller;
mod resyncing;
mod status;

use apply::InFlight;
use catch_up::Progress;
use ingest::BadRecordLog;
use oversize::Oversize;
use poller::Poller;
use status::Reported;
pub use status::State;

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

/// Whether the loop goes on.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Redis lost or changed what the agent wrote: the records in hand are
    /// dropped on the way up, and the loop rehydrates
    /// ([`Pipeline::follow`]). Jobs below the loop never do it themselves.
    Reload(Reload),
    Stop,
}

/// Why the agent re-reads its positions from Redis.
#[derive(Debug, PartialEq, Eq)]
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
        caught_up: false,
        priority: Priority::new(settings.agent.catch_up_nice),
        progress: Progress::new(),
        last_apply: Instant::now(),
        discovery: Poller::from_answer(Instant::now()),
        bad_records: BadRecordLog::new(),
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
        oversize: Oversize::new(),
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
    caught_up: bool,
    /// Niceness: raised while not caught up (src/priority.rs).
    priority: Priority,
    /// The current catch-up's progress, for its log lines.
    progress: Progress,
    last_apply: Instant,
    /// Broker metadata (partitions) read in the background; see
    /// [`Pipeline::discover_new`].
    discovery: Poller<Result<Vec<PartitionId>, SourceError>>,
    /// Rate limit of the bad-record log lines.
    bad_records: BadRecordLog,
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
    /// Partitions whose record batch is too large: the search and its
    /// findings.
    oversize: Oversize,
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
            if self.follow(source, flow).await == Flow::Stop {
                break;
            }
            // Take what is already buffered, up to the batch caps.
            while !self.batch.is_full_for(0, 0) {
                let Some(event) = source.try_recv() else {
                    break;
                };
                let flow = self.handle(source, event).await;
                if self.follow(source, flow).await == Flow::Stop {
                    break 'outer;
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
            if self.follow(source, flow).await == Flow::Stop {
                break;
            }
        }
    }

    /// Acts on what a job returned: a reload Redis asked for is done here,
    /// at the loop's level, never inside the record path. Continue or Stop.
    async fn follow(&mut self, source: &Source, flow: Flow) -> Flow {
        match flow {
            Flow::Reload(why) => self.rehydrate(source, why).await,
            other => other,
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
