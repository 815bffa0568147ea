//! The once-a-second checks run between records: the marker and apply
//! sequence in Redis, Redis's fitness and read functions, the broker's
//! reachability, topic configurations and IDs.

use super::{liveness, Flow, Pipeline, Reload, State, TICK};
use crate::sink::Held;
use crate::source::Source;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

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

impl Pipeline<'_> {
    /// Idle-time checks, once per tick.
    pub(super) async fn housekeeping(&mut self, source: &Source) -> Flow {
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
                    if self.follow(source, Flow::Reload(Reload::Lost)).await == Flow::Stop {
                        return Flow::Stop;
                    }
                }
                Ok(Held::Diverged) => {
                    let why = format!("its apply sequence is not {}", self.sink.seq());
                    let flow = Flow::Reload(Reload::Diverged(why));
                    if self.follow(source, flow).await == Flow::Stop {
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
        if source.brokers_down() && self.oversize.refused_recently() {
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
            if self.idle() && self.lag == Some(0) {
                let flow = self.missed_deletes(source).await;
                if self.follow(source, flow).await == Flow::Stop {
                    return Flow::Stop;
                }
            }
        }
        self.write_state().await;
        self.report(source).await;
        Flow::Continue
    }

    /// Reads topics' `delete.retention.ms` in the background: at start, then
    /// every `RETENTION_REFRESH` (an operator may change it).
    pub(super) fn poll_retention(&mut self, source: &Source) {
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

    /// Reads the topics' IDs again every `partition_discovery_secs`, in the
    /// background.
    pub(super) async fn poll_topic_ids(&mut self, source: &Source) {
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
    pub(super) async fn compare_topic_ids(&mut self, ids: Vec<Option<String>>) {
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
}
