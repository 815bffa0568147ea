//! Partitions whose next record batch is larger than the agent may receive:
//! found by pausing and probing, then reported as stuck while the others
//! flow.

use super::{Pipeline, TICK};
use crate::batch::PartitionId;
use crate::checkpoint::Start;
use crate::source::Source;
use futures_util::FutureExt;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// The search for the partition whose next record batch librdkafka refuses
/// (larger than `receive.message.max.bytes`). The refused response drops
/// the broker connection, so every partition fetched over it stalls: all
/// are paused, then resumed one at a time; the one whose resumption brings
/// the error back stays paused.
#[derive(Debug)]
pub(super) struct Isolating {
    to_probe: Vec<PartitionId>,
    probe: Option<(PartitionId, Instant)>,
}

/// How long a resumed partition must go without a refused response to be
/// cleared.
pub(super) const PROBE_FOR: Duration = Duration::from_secs(6);

impl Pipeline<'_> {
    /// Once per tick: finds and pauses partitions whose next record batch
    /// librdkafka refuses as too large (see [`Isolating`]), so the others
    /// keep flowing; asks the broker for the stuck ones' log ends.
    pub(super) fn isolate_oversize(&mut self, source: &Source) {
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
}
