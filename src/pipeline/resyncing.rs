//! Resyncs: reading topics again from their earliest offset when deletes
//! may have been missed or a topic is of another lineage (recreated,
//! truncated), then sweeping the keys not seen again.

use super::catch_up::{Marks, Progress};
use super::{Flow, Pipeline, Reload, State};
use crate::batch::PartitionId;
use crate::checkpoint::Start;
use crate::resync::{self, Resync};
use crate::sink::SinkError;
use crate::source::Source;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// `caught_up_ms` is written to the status hash at most this often (an
/// older value only makes the missed-delete check more cautious).
const CAUGHT_UP_WRITE_EVERY: Duration = Duration::from_secs(10);

/// Partitions whose log, as of librdkafka's last fetch response, ends below
/// the offset Redis holds for them, with that offset and the log end.
fn below_log_end(
    positions: &BTreeMap<PartitionId, Start>,
    kafka: &impl Marks,
) -> BTreeMap<PartitionId, (i64, i64)> {
    positions
        .iter()
        .filter_map(|(&partition, start)| {
            let Start::At(next) = *start else {
                return None;
            };
            let (_, high) = kafka.fetched_watermarks(partition)?;
            (high >= 0 && high < next).then_some((partition, (next, high)))
        })
        .collect()
}

impl Pipeline<'_> {
    /// Kafka's side of lineage: a partition whose log ends below the offset
    /// Redis holds for it is not the log those offsets were taken from (the
    /// topic was deleted and recreated, or truncated), so its topic is
    /// written again from the start and swept. The log end is the one of
    /// librdkafka's last fetch response, never older than a record already
    /// delivered; two ticks in a row must agree. Also starts resyncs found
    /// pending in Redis or postponed.
    pub(super) async fn check_lineage(&mut self, source: &Source) -> Flow {
        let mut topics = std::mem::take(&mut self.lineage_due);
        let suspect = below_log_end(&self.positions, source);
        for (&partition, &(next, high)) in &suspect {
            // Two ticks in a row: one fetch response can be older than the
            // record that moved the stored offset.
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
        let suspect: BTreeSet<PartitionId> = suspect.into_keys().collect();
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
    pub(super) async fn missed_deletes(&mut self, source: &Source) -> Flow {
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

    pub(super) async fn write_caught_up(&mut self) {
        let field = [("caught_up_ms", self.caught_up_ms.to_string())];
        if self.sink.set_status(&field).await.is_ok() {
            self.caught_up_written = Some(Instant::now());
        }
    }

    /// Assigns every partition at its position, dropping what librdkafka
    /// prefetched and its watermarks (stale ones could declare a re-read
    /// caught up).
    pub(super) fn reassign(&mut self, source: &Source) {
        let starts: Vec<_> = self.positions.iter().map(|(&p, &s)| (p, s)).collect();
        if let Err(e) = source.assign(&starts) {
            error!("{e}");
        }
        source.forget_watermarks();
        self.oversize.forget();
    }

    /// Starts counting a new catch-up (rehydrate or resync) for the progress
    /// lines and the caught-up check.
    pub(super) fn restart_catch_up(&mut self) {
        self.caught_up = false;
        self.priority.set(true);
        self.progress = Progress::new();
    }

    pub(super) fn prefixes(&self, topics: &BTreeSet<usize>) -> Vec<Vec<u8>> {
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
    pub(super) async fn start_resync(
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
    pub(super) async fn finish_resync(&mut self, source: &Source) -> Flow {
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
                Err(SinkError::Lost) => return Flow::Reload(Reload::Lost),
                Err(SinkError::Diverged(why)) => return Flow::Reload(Reload::Diverged(why)),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Watermarks;

    struct Fetched(BTreeMap<PartitionId, (i64, i64)>);

    impl Marks for Fetched {
        fn watermarks(&self, _: &[PartitionId]) -> Vec<(PartitionId, Watermarks)> {
            Vec::new()
        }

        fn fetched_watermarks(&self, partition: PartitionId) -> Option<(i64, i64)> {
            self.0.get(&partition).copied()
        }
    }

    /// A recreated or truncated topic: the log ends below the stored
    /// offset. At the end, not fetched yet, or read from the start is not.
    #[test]
    fn a_log_ending_below_the_stored_offset_is_suspect() {
        let positions = BTreeMap::from([
            ((0, 0), Start::At(100)),
            ((0, 1), Start::At(100)),
            ((0, 2), Start::At(100)),
            ((0, 3), Start::Earliest),
            ((0, 4), Start::At(100)),
        ]);
        let kafka = Fetched(BTreeMap::from([
            ((0, 0), (0, 40)),
            ((0, 1), (0, 100)),
            ((0, 3), (0, 5)),
            // librdkafka's "not known yet".
            ((0, 4), (-1, -1)),
        ]));
        assert_eq!(
            below_log_end(&positions, &kafka),
            BTreeMap::from([((0, 0), (100, 40))])
        );
    }
}
