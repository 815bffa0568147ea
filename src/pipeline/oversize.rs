//! Partitions whose next record batch is larger than the agent may receive:
//! found by pausing and probing, then reported as stuck while the others
//! flow.

use super::{Pipeline, TICK};
use crate::batch::PartitionId;
use crate::checkpoint::Start;
use crate::source::{Source, SourceError};
use futures_util::FutureExt;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

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

type LogEndTask = tokio::task::JoinHandle<Result<Vec<(PartitionId, i64)>, SourceError>>;

/// What the agent knows of partitions whose next record batch is larger
/// than it may receive.
#[derive(Debug)]
pub(super) struct Oversize {
    /// Fetch responses over `receive.message.max.bytes` seen so far.
    oversize_seen: u64,
    /// The search for the partition whose record batch is too large.
    isolating: Option<Isolating>,
    /// Partitions paused because their next record batch is larger than the
    /// agent may receive, and the offset each is stuck at.
    pub(super) stuck: BTreeMap<PartitionId, i64>,
    /// Their log ends, asked of the broker (paused partitions are not
    /// fetched, so librdkafka's watermarks for them go stale).
    pub(super) stuck_log_end: BTreeMap<PartitionId, i64>,
    stuck_task: Option<LogEndTask>,
    last_stuck_at: Option<Instant>,
    /// When librdkafka last refused an oversized response: the dropped
    /// connection that follows is that, not a broker outage.
    last_refused_at: Option<Instant>,
    last_log_end: Instant,
}

impl Oversize {
    pub(super) fn new() -> Self {
        Oversize {
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
        }
    }

    /// A new assignment resumes every partition: an oversized batch is
    /// found again if it is still ahead.
    pub(super) fn forget(&mut self) {
        self.stuck.clear();
        self.stuck_log_end.clear();
        self.isolating = None;
    }

    /// librdkafka refused an oversized response a moment ago: the dropped
    /// broker connection that follows is that, not an outage.
    pub(super) fn refused_recently(&self) -> bool {
        self.last_refused_at
            .is_some_and(|at| at.elapsed() < PROBE_FOR)
    }
}

impl Pipeline<'_> {
    /// Once per tick: finds and pauses partitions whose next record batch
    /// librdkafka refuses as too large (see [`Isolating`]), so the others
    /// keep flowing; asks the broker for the stuck ones' log ends.
    pub(super) fn isolate_oversize(&mut self, source: &Source) {
        let seen = source.oversize_responses();
        if seen > self.oversize.oversize_seen {
            self.oversize.last_refused_at = Some(Instant::now());
        }
        // A fetch sent before a partition was paused may still be refused:
        // errors right after a partition was found are not news.
        let refused = seen > self.oversize.oversize_seen
            && self
                .oversize
                .last_stuck_at
                .is_none_or(|at| at.elapsed() >= PROBE_FOR);
        self.oversize.oversize_seen = seen;
        match self.oversize.isolating.take() {
            None if refused => {
                let candidates: Vec<PartitionId> = self
                    .positions
                    .keys()
                    .filter(|p| !self.oversize.stuck.contains_key(p))
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
                self.oversize.isolating = Some(Isolating {
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
                        self.oversize.stuck.insert(partition, at);
                        self.oversize.last_stuck_at = Some(Instant::now());
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
                            info!(
                                n_stuck = self.oversize.stuck.len(),
                                "oversized record search done"
                            );
                            // The refused responses looked like a broker
                            // outage; the connection is fine once the batch
                            // is no longer asked for.
                            source.mark_reachable();
                            return;
                        }
                    }
                }
                self.oversize.isolating = Some(isolating);
            }
        }
        match self.oversize.stuck_task.take() {
            Some(task) if !task.is_finished() => self.oversize.stuck_task = Some(task),
            Some(task) => {
                if let Some(Ok(Ok(ends))) = task.now_or_never() {
                    self.oversize.stuck_log_end.extend(ends);
                }
            }
            None if !self.oversize.stuck.is_empty()
                && self.oversize.last_log_end.elapsed() >= TICK * 10 =>
            {
                self.oversize.last_log_end = Instant::now();
                self.oversize.stuck_task =
                    Some(source.log_end_task(self.oversize.stuck.keys().copied().collect()));
            }
            None => {}
        }
    }
}
