//! Lag and catching up: per-partition lag from librdkafka's watermarks, the
//! caught-up decision, progress lines, and the switch to live.

use super::{Pipeline, State};
use crate::batch::PartitionId;
use crate::checkpoint::Start;
use crate::resync;
use crate::source::{Source, Watermarks};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::info;

/// How often a progress line is logged while catching up.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What the lag and caught-up decisions read of Kafka: librdkafka's cached
/// numbers, never a request. The seam that lets the tests below script
/// Kafka's side.
pub(super) trait Marks {
    /// The last statistics per partition (about once a second); partitions
    /// not reported yet are missing.
    fn watermarks(&self, partitions: &[PartitionId]) -> Vec<(PartitionId, Watermarks)>;
    /// Low and high watermark of the last fetch response for `partition`.
    fn fetched_watermarks(&self, partition: PartitionId) -> Option<(i64, i64)>;
}

impl Marks for Source {
    fn watermarks(&self, partitions: &[PartitionId]) -> Vec<(PartitionId, Watermarks)> {
        Source::watermarks(self, partitions)
    }

    fn fetched_watermarks(&self, partition: PartitionId) -> Option<(i64, i64)> {
        Source::fetched_watermarks(self, partition)
    }
}

/// Records Kafka has that Redis does not yet, per partition, from where
/// each partition is (`positions`); `None` until every partition has
/// reported, or when one is past its log end. Stuck partitions count up to
/// the log end the broker gave for them (`stuck_log_end`).
fn partition_lag(
    positions: &BTreeMap<PartitionId, Start>,
    stuck_log_end: &BTreeMap<PartitionId, i64>,
    kafka: &impl Marks,
) -> Option<Vec<(PartitionId, u64)>> {
    let partitions: Vec<PartitionId> = positions.keys().copied().collect();
    let marks = kafka.watermarks(&partitions);
    if partitions.is_empty() || marks.len() < partitions.len() {
        return None;
    }
    marks
        .iter()
        .map(|(p, mark)| {
            let next = match positions.get(p) {
                Some(Start::At(next)) => *next,
                _ => mark.low,
            };
            if let Some(&end) = stuck_log_end.get(p) {
                return Some((*p, (end - next).max(0) as u64));
            }
            // Past the log end: a recreated topic (see `check_lineage`), or
            // statistics older than the last fetch. Either way the lag is
            // not known.
            if next > mark.high && kafka.fetched_watermarks(*p).is_none_or(|(_, h)| next > h) {
                return None;
            }
            let lag = if mark.app_offset >= mark.high && mark.queued == 0 {
                0
            } else {
                (mark.high - next).max(0) as u64
            };
            Some((*p, lag))
        })
        .collect()
}

/// Whether every partition not stuck has applied all its last fetch
/// response held (see [`Pipeline::applied_all_fetched`]).
fn applied_all_fetched(
    positions: &BTreeMap<PartitionId, Start>,
    stuck: &BTreeMap<PartitionId, i64>,
    kafka: &impl Marks,
) -> bool {
    !positions.is_empty()
        && positions.iter().all(|(&partition, start)| {
            if stuck.contains_key(&partition) {
                return true;
            }
            match (kafka.fetched_watermarks(partition), start) {
                // Above the log end is another lineage, not caught up
                // (`check_lineage`).
                (Some((_, high)), Start::At(next)) => *next == high,
                (Some((low, high)), Start::Earliest) => low >= high,
                (None, _) => false,
            }
        })
}

/// The progress of one catch-up (the start, a rehydrate, a resync), for its
/// log lines.
#[derive(Debug)]
pub(super) struct Progress {
    started: Instant,
    /// Records applied, or noted by a resync, since `started`.
    records: u64,
    /// When the last progress line was logged, and `records` then.
    logged_at: Instant,
    logged_records: u64,
}

impl Progress {
    pub(super) fn new() -> Self {
        Progress {
            started: Instant::now(),
            records: 0,
            logged_at: Instant::now(),
            logged_records: 0,
        }
    }

    pub(super) fn applied(&mut self, records: u64) {
        self.records += records;
    }

    /// A line with the rate and the time left every [`PROGRESS_EVERY`].
    fn log(&mut self, lag: u64) {
        let elapsed = self.logged_at.elapsed();
        if elapsed < PROGRESS_EVERY {
            return;
        }
        let applied = self.records - self.logged_records;
        let rate = applied as f64 / elapsed.as_secs_f64();
        let eta = if rate > 0.0 {
            format!("{:.0}s", lag as f64 / rate)
        } else {
            "unknown".to_owned()
        };
        info!(
            n_records = self.records,
            records_per_s = rate as u64,
            lag,
            eta = %eta,
            "catching up"
        );
        self.logged_at = Instant::now();
        self.logged_records = self.records;
    }
}

impl Pipeline<'_> {
    /// Records Kafka has that Redis does not yet, summed over partitions,
    /// from the watermarks librdkafka last reported; `None` until every
    /// assigned partition has reported. A partition whose librdkafka
    /// position passed the watermark with nothing queued counts as done
    /// (trailing transaction markers occupy offsets but never reach us).
    pub(super) fn lag(&self, source: &Source) -> Option<u64> {
        let partition_lag = self.partition_lag(source)?;
        Some(partition_lag.iter().map(|(_, lag)| lag).sum())
    }

    /// [`Pipeline::lag`] per partition.
    pub(super) fn partition_lag(&self, source: &Source) -> Option<Vec<(PartitionId, u64)>> {
        partition_lag(&self.positions, &self.oversize.stuck_log_end, source)
    }

    /// Caught up when the lag is zero with nothing in hand; logs progress
    /// every few seconds until then.
    pub(super) fn check_caught_up(&mut self, source: &Source) {
        let Some(partition_lag) = self.partition_lag(source) else {
            return;
        };
        self.lag = Some(partition_lag.iter().map(|(_, lag)| lag).sum());
        // Stuck partitions cannot move until the budget is raised: they are
        // reported (state `partition-stuck`), not waited for.
        let lag: u64 = partition_lag
            .iter()
            .filter(|(p, _)| !self.oversize.stuck.contains_key(p))
            .map(|(_, lag)| lag)
            .sum();
        if lag > 0 {
            self.progress.log(lag);
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
    pub(super) fn applied_all_fetched(&self, source: &Source) -> bool {
        applied_all_fetched(&self.positions, &self.oversize.stuck, source)
    }

    pub(super) fn go_live(&mut self) {
        if self.resync.is_some() {
            // Live only after the sweep (`finish_resync`).
            return;
        }
        let seconds = self.progress.started.elapsed().as_secs_f64();
        info!(
            n_records = self.progress.records,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka as scripted by a test: statistics and last fetch responses.
    #[derive(Default)]
    struct Scripted {
        stats: BTreeMap<PartitionId, Watermarks>,
        fetched: BTreeMap<PartitionId, (i64, i64)>,
    }

    impl Scripted {
        fn stats(
            mut self,
            p: PartitionId,
            low: i64,
            high: i64,
            app_offset: i64,
            queued: u64,
        ) -> Self {
            let mark = Watermarks {
                low,
                high,
                app_offset,
                queued,
            };
            self.stats.insert(p, mark);
            self
        }

        fn fetched(mut self, p: PartitionId, low: i64, high: i64) -> Self {
            self.fetched.insert(p, (low, high));
            self
        }
    }

    impl Marks for Scripted {
        fn watermarks(&self, partitions: &[PartitionId]) -> Vec<(PartitionId, Watermarks)> {
            partitions
                .iter()
                .filter_map(|p| self.stats.get(p).map(|m| (*p, *m)))
                .collect()
        }

        fn fetched_watermarks(&self, partition: PartitionId) -> Option<(i64, i64)> {
            self.fetched.get(&partition).copied()
        }
    }

    const A: PartitionId = (0, 0);
    const B: PartitionId = (0, 1);

    fn at(list: &[(PartitionId, Start)]) -> BTreeMap<PartitionId, Start> {
        list.iter().copied().collect()
    }

    #[test]
    fn lag_is_unknown_until_every_partition_reported() {
        let positions = at(&[(A, Start::At(5)), (B, Start::At(0))]);
        let kafka = Scripted::default().stats(A, 0, 10, 5, 5);
        assert_eq!(partition_lag(&positions, &BTreeMap::new(), &kafka), None);
        let kafka = kafka.stats(B, 0, 3, 3, 0);
        assert_eq!(
            partition_lag(&positions, &BTreeMap::new(), &kafka),
            Some(vec![(A, 5), (B, 0)])
        );
        assert_eq!(
            partition_lag(&BTreeMap::new(), &BTreeMap::new(), &kafka),
            None
        );
    }

    #[test]
    fn lag_counts_from_the_log_start_before_the_first_apply() {
        let positions = at(&[(A, Start::Earliest)]);
        let kafka = Scripted::default().stats(A, 40, 100, 40, 60);
        assert_eq!(
            partition_lag(&positions, &BTreeMap::new(), &kafka),
            Some(vec![(A, 60)])
        );
    }

    /// Trailing transaction markers hold offsets that never reach the
    /// agent: librdkafka's position past the high mark with nothing queued
    /// is caught up, even though Redis's next offset is below it.
    #[test]
    fn transaction_markers_do_not_count_as_lag() {
        let positions = at(&[(A, Start::At(98))]);
        let kafka = Scripted::default().stats(A, 0, 100, 100, 0);
        assert_eq!(
            partition_lag(&positions, &BTreeMap::new(), &kafka),
            Some(vec![(A, 0)])
        );
        let kafka = Scripted::default().stats(A, 0, 100, 100, 2);
        assert_eq!(
            partition_lag(&positions, &BTreeMap::new(), &kafka),
            Some(vec![(A, 2)])
        );
    }

    /// A stored offset past the log end (a recreated topic) makes the lag
    /// unknown, not zero, unless a fresher fetch response reaches it.
    #[test]
    fn past_the_log_end_the_lag_is_unknown() {
        let positions = at(&[(A, Start::At(500))]);
        let kafka = Scripted::default().stats(A, 0, 10, 10, 0);
        assert_eq!(partition_lag(&positions, &BTreeMap::new(), &kafka), None);
        let kafka = kafka.fetched(A, 0, 10);
        assert_eq!(partition_lag(&positions, &BTreeMap::new(), &kafka), None);
        // Statistics older than the last fetch response.
        let kafka = Scripted::default()
            .stats(A, 0, 10, 10, 0)
            .fetched(A, 0, 500);
        assert_eq!(
            partition_lag(&positions, &BTreeMap::new(), &kafka),
            Some(vec![(A, 0)])
        );
    }

    /// A stuck partition is not fetched, so its statistics are stale: its
    /// lag runs to the log end the broker gave.
    #[test]
    fn a_stuck_partition_counts_to_its_asked_log_end() {
        let positions = at(&[(A, Start::At(7))]);
        let kafka = Scripted::default().stats(A, 0, 7, 7, 0);
        let log_end = BTreeMap::from([(A, 12)]);
        assert_eq!(
            partition_lag(&positions, &log_end, &kafka),
            Some(vec![(A, 5)])
        );
    }

    #[test]
    fn applied_all_fetched_needs_every_partition_at_its_fetched_end() {
        let none = BTreeMap::new();
        let kafka = Scripted::default().fetched(A, 0, 10).fetched(B, 4, 4);
        // B never delivered a record and is empty: counts.
        let positions = at(&[(A, Start::At(10)), (B, Start::Earliest)]);
        assert!(applied_all_fetched(&positions, &none, &kafka));
        let positions = at(&[(A, Start::At(9)), (B, Start::Earliest)]);
        assert!(!applied_all_fetched(&positions, &none, &kafka));
        // Above the log end is another lineage, not caught up.
        let positions = at(&[(A, Start::At(11)), (B, Start::Earliest)]);
        assert!(!applied_all_fetched(&positions, &none, &kafka));
        // Never fetched: not known.
        let kafka = Scripted::default().fetched(A, 0, 10);
        let positions = at(&[(A, Start::At(10)), (B, Start::At(0))]);
        assert!(!applied_all_fetched(&positions, &none, &kafka));
        // ... unless stuck, which is reported rather than waited for.
        assert!(applied_all_fetched(
            &positions,
            &BTreeMap::from([(B, 0)]),
            &kafka
        ));
        // Nothing assigned is not caught up.
        assert!(!applied_all_fetched(&BTreeMap::new(), &none, &kafka));
    }
}
