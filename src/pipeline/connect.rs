//! Connecting: Redis (the marker, the offsets, whether Redis is fit for the
//! agent at all) and Kafka (metadata, the assignment, partitions that appear
//! or vanish later).

use super::catch_up::Progress;
use super::{await_alive, stored_starts, Flow, Pipeline, Reported, State};
use crate::backoff::Backoff;
use crate::batch::PartitionId;
use crate::checkpoint::Start;
use crate::codec;
use crate::sink::SinkError;
use crate::source::Source;
use std::time::Duration;
use tracing::{debug, error, info, warn};

/// Metadata is read this often while a configured topic does not exist.
const MISSING_TOPIC_LOOK_EVERY: Duration = Duration::from_secs(5);

impl Pipeline<'_> {
    /// The state once an unreachable service answers again.
    pub(super) fn reachable_state(&self) -> State {
        super::status::reachable_state(self.resync.is_some(), self.caught_up)
    }

    /// Adopts or creates the marker and loads offsets, retrying until Redis
    /// answers.
    pub(super) async fn connect_redis(&mut self) -> Flow {
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
    pub(super) async fn unfit_redis(&mut self) -> Option<String> {
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
    pub(super) async fn redis_refuses(&mut self, e: &SinkError) {
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
    pub(super) async fn redis_fine(&mut self) {
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
    pub(super) async fn discover_and_assign(&mut self, source: &Source) -> Flow {
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
                    self.progress = Progress::new();
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
    pub(super) fn note_missing_topics(&mut self, found: &[PartitionId]) {
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
    pub(super) fn in_scope(&self, partitions: Vec<PartitionId>) -> Vec<PartitionId> {
        partitions
            .into_iter()
            .filter(|&(topic_idx, p)| self.settings.topics[topic_idx].wants_partition(p))
            .collect()
    }

    /// Adds partitions that appeared since the last look (a topic grew or was
    /// created after start). Metadata is read in the background; this only
    /// starts a request or takes the answer of the previous one.
    pub(super) fn discover_new(&mut self, source: &Source) {
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
}
