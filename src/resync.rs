//! Missed deletes and the resync that repairs them (design.md §5).
//!
//! A compacted topic keeps a tombstone only `delete.retention.ms` after the
//! cleaner reached it; then the tombstone and the records it deleted are
//! gone. A gateway that stopped reading for longer than that may never see
//! some deletes, and their keys would stay in Redis forever. Likewise when
//! a partition's stored offset fell below the log start (records deleted by
//! retention or DeleteRecords).
//!
//! Detection: the agent remembers when it last knew every partition read
//! to its end (`caught_up_ms` in the status hash, or the marker's creation
//! time). A tombstone written after that moment stays in the log at least
//! `delete.retention.ms`, so reading to the end again sooner sees it. When
//! the agent is caught up again later than that, or a stored offset is
//! below the log start, the topic is resynced.
//!
//! Resync, without readers ever seeing a half-built or older state: the
//! topic's partitions are read again from the earliest offset. Records below
//! the stored offset are not applied again (Redis has them or newer); their
//! keys are only noted in a seen set (`<ns>:seen`: added for a value,
//! removed for a tombstone). Records from the stored offset on are applied
//! as usual and tracked in the same set. Once caught up, a sweep deletes the
//! keys under the topic's prefix that are not in the set. Readers meanwhile
//! see the last state, then the stale keys disappear. SWAPDB into a staging
//! database would also give that, but it swaps whole databases, and the
//! agent shares its database with other apps' keys (G8).
//!
//! An interrupted resync is simply done again: `caught_up_ms` only moves
//! once it completed, and the seen set is emptied when one starts.

use crate::batch::PartitionId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// A resync in progress.
#[derive(Debug)]
pub struct Resync {
    /// Topic indexes being resynced.
    pub topics: BTreeSet<usize>,
    /// Per partition of those topics: the stored next offset when the resync
    /// began. Records below it are only noted, never applied again.
    pub shadow_until: BTreeMap<PartitionId, i64>,
    /// Wall-clock start (Unix ms): what `caught_up_ms` becomes when done,
    /// since deletes written during the re-read may only be seen then.
    pub started_ms: i64,
    pub started: Instant,
    /// The topics are other topics than the stored offsets were taken from
    /// (deleted and recreated): everything is written again, nothing is
    /// only noted, and the pending resync is kept in Redis until it is done.
    pub lineage: BTreeSet<usize>,
}

impl Resync {
    /// True for a record the resync re-reads only to note its key.
    pub fn is_shadow(&self, partition: PartitionId, offset: i64) -> bool {
        self.shadow_until
            .get(&partition)
            .is_some_and(|&until| offset < until)
    }
}

/// Gaps shorter than this never count as missed deletes. While live the
/// agent is caught up every second or so; a topic whose tombstones live
/// less than this cannot be followed reliably by any consumer, and treating
/// it as missed would resync without end.
pub const MIN_GAP_MS: i64 = 10_000;

/// Topics whose tombstones may have been removed since `caught_up_ms`:
/// those with a `delete.retention.ms` not longer than the time since (and
/// only when that is at least [`MIN_GAP_MS`]). `retention` is per topic,
/// `None` for a topic that is not compacted.
pub fn retention_exceeded(
    now_ms: i64,
    caught_up_ms: i64,
    retention: &[Option<i64>],
) -> BTreeSet<usize> {
    let away = now_ms - caught_up_ms;
    if away < MIN_GAP_MS {
        return BTreeSet::new();
    }
    retention
        .iter()
        .enumerate()
        .filter_map(|(topic, ms)| ms.filter(|&ms| away >= ms).map(|_| topic))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceeded_only_for_compacted_topics_past_their_retention() {
        let retention = [Some(20_000), None, Some(86_400_000), Some(15_000)];
        assert_eq!(
            retention_exceeded(100_000, 70_000, &retention),
            BTreeSet::from([0, 3])
        );
        assert_eq!(
            retention_exceeded(100_000, 85_000, &retention),
            BTreeSet::from([3])
        );
        assert_eq!(
            retention_exceeded(100_000, 86_000, &retention),
            BTreeSet::new()
        );
        // Short gaps never count, however short the retention.
        let tiny = [Some(1_000)];
        assert_eq!(retention_exceeded(100_000, 95_000, &tiny), BTreeSet::new());
        assert_eq!(
            retention_exceeded(100_000, 90_000, &tiny),
            BTreeSet::from([0])
        );
    }

    #[test]
    fn shadow_range_is_below_the_stored_offset() {
        let resync = Resync {
            topics: BTreeSet::from([0]),
            shadow_until: BTreeMap::from([((0, 0), 10), ((0, 1), 0)]),
            lineage: BTreeSet::new(),
            started_ms: 0,
            started: Instant::now(),
        };
        assert!(resync.is_shadow((0, 0), 9));
        assert!(!resync.is_shadow((0, 0), 10));
        assert!(!resync.is_shadow((0, 1), 0));
        assert!(!resync.is_shadow((1, 0), 0));
    }
}
