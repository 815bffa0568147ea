//! What the agent says about itself: the state readers see, the status hash,
//! systemd's STATUS= line, the runtime file, the metrics, and commits to
//! `kafka.commit_group`.

use super::Pipeline;
use crate::batch::PartitionId;
use crate::checkpoint::Start;
use crate::sink::SinkError;
use crate::source::Source;
use std::collections::BTreeMap;
use std::time::Instant;
use tracing::debug;

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

/// The state readers see, from what the loop is doing (`state`): live once
/// caught up; a missing topic or a stuck partition is shown over a state
/// that would otherwise claim all is mirrored.
fn shown_state(state: State, caught_up: bool, topic_missing: bool, any_stuck: bool) -> State {
    let state = if caught_up && state == State::CatchingUp {
        State::Live
    } else {
        state
    };
    match state {
        State::Live | State::CatchingUp | State::Rehydrating if topic_missing => {
            State::WaitingForTopic
        }
        State::Live if any_stuck => State::PartitionStuck,
        other => other,
    }
}

/// The state once an unreachable service answers again.
pub(super) fn reachable_state(resyncing: bool, caught_up: bool) -> State {
    if resyncing {
        State::Resyncing
    } else if caught_up {
        State::Live
    } else {
        State::CatchingUp
    }
}

/// Status fields written once per tick, only when they changed.
#[derive(Debug, Default)]
pub(super) struct Reported {
    pub(super) partition_lag: BTreeMap<PartitionId, u64>,
    pub(super) last_contact_ms: Option<i64>,
    /// Next offsets last committed to `kafka.commit_group`.
    pub(super) committed: BTreeMap<PartitionId, i64>,
}

impl Pipeline<'_> {
    /// Once per tick: per-partition lag and the last Kafka contact to the
    /// status hash (fields that changed only) and to the metrics.
    pub(super) async fn report(&mut self, source: &Source) {
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
        for (partition, at) in &self.oversize.stuck {
            if self.reported_stuck.get(partition) != Some(at) {
                let topic = &self.settings.topics[partition.0].name;
                fields.push((format!("stuck.{topic}/{}", partition.1), at.to_string()));
            }
        }
        for partition in self.reported_stuck.keys() {
            if !self.oversize.stuck.contains_key(partition) {
                let topic = &self.settings.topics[partition.0].name;
                stuck_gone.push(format!("stuck.{topic}/{}", partition.1));
            }
        }
        if !stuck_gone.is_empty() {
            let gone: Vec<&str> = stuck_gone.iter().map(String::as_str).collect();
            if self.sink.clear_status(&gone).await.is_ok() {
                self.reported_stuck
                    .retain(|p, _| self.oversize.stuck.contains_key(p));
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
                self.reported_stuck = self.oversize.stuck.clone();
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
    pub(super) fn commit_applied(&mut self, source: &Source) {
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

    pub(super) async fn set_state(&mut self, state: State) {
        self.state = state;
        self.write_state().await;
    }

    /// The state as readers should see it.
    pub(super) fn shown_state(&self) -> State {
        shown_state(
            self.state,
            self.caught_up,
            !self.missing_topics.is_empty(),
            !self.oversize.stuck.is_empty(),
        )
    }

    /// Writes `state` to the status hash when it changed, with the reason
    /// when Redis refuses writes (best effort: Redis may refuse this write
    /// too, and then the metrics, systemd's STATUS= line and the runtime
    /// file say it).
    pub(super) async fn write_state(&mut self) {
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
                        if reported != 0 && !self.oversize.stuck.contains_key(&partition) {
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
    pub(super) fn write_runtime_file(&self, state: State) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status` never claims more than is true: `live` only when caught up
    /// with every configured topic there and no partition stuck; an outage
    /// is never hidden behind a missing topic.
    #[test]
    fn the_shown_state_never_claims_more_than_is_true() {
        use State::*;
        assert_eq!(shown_state(CatchingUp, false, false, false), CatchingUp);
        assert_eq!(shown_state(CatchingUp, true, false, false), Live);
        assert_eq!(shown_state(Live, true, true, false), WaitingForTopic);
        assert_eq!(
            shown_state(Rehydrating, false, true, false),
            WaitingForTopic
        );
        assert_eq!(shown_state(CatchingUp, true, false, true), PartitionStuck);
        assert_eq!(shown_state(Live, true, true, true), WaitingForTopic);
        for outage in [KafkaUnreachable, RedisUnreachable, Resyncing, Starting] {
            for (missing, stuck) in [(false, false), (true, true)] {
                assert_eq!(shown_state(outage, true, missing, stuck), outage);
            }
        }
    }

    #[test]
    fn an_answering_service_resumes_what_was_interrupted() {
        assert_eq!(reachable_state(true, true), State::Resyncing);
        assert_eq!(reachable_state(false, true), State::Live);
        assert_eq!(reachable_state(false, false), State::CatchingUp);
    }
}
