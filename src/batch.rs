//! The coalescing batch: what one Redis transaction will apply.
//!
//! Latest record per key wins and a tombstone means delete (G1), so a key
//! appears at most once per transaction and the order across keys no longer
//! matters. Every record, applied or skipped, advances its partition's next
//! offset, which is written in the same transaction (G2).
//!
//! Bounded twice (G5): at most `max_records` distinct keys (the map is a
//! fixed-capacity heapless map) and at most `max_bytes` of keys and values.

use crate::codec::MAX_FIELDS;
use crate::config::BATCH_CAPACITY;
use heapless::FnvIndexMap;
use std::collections::BTreeMap;

/// What happens to one Redis key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Set(Vec<u8>),
    /// Set, expiring at this Unix time in milliseconds (per-topic TTL).
    SetUntil(Vec<u8>, i64),
    /// The hash store: replace the key with a hash of these fields (packed
    /// by `codec::encode_store`, never empty), expiring at the given Unix
    /// time in milliseconds if any.
    Hash(Vec<u8>, Option<i64>),
    Delete,
    /// Resync only: the key exists in Kafka (a record below the partition's
    /// stored offset, whose value Redis already has). Nothing is written;
    /// the key is noted as seen so the final sweep keeps it.
    Seen,
    /// Resync only: the key's latest old record is a tombstone.
    Unseen,
}

/// Why a record was skipped; also the name of its counter in the status hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Undecodable,
    NoKey,
    Oversize,
}

impl SkipReason {
    pub const ALL: [SkipReason; 3] = [
        SkipReason::Undecodable,
        SkipReason::NoKey,
        SkipReason::Oversize,
    ];

    pub fn counter(self) -> &'static str {
        match self {
            SkipReason::Undecodable => "skipped_undecodable",
            SkipReason::NoKey => "skipped_no_key",
            SkipReason::Oversize => "skipped_oversize",
        }
    }
}

/// Counters a batch adds to `<ns>:status` when it is applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub records: u64,
    pub skipped: [u64; 3],
    /// Records outside the topic's key filters: not applied, offset advanced.
    pub filtered: u64,
    /// Old records a resync read again only to note their keys (progress
    /// only; not a status counter).
    pub noted: u64,
}

/// A partition, named by the index of its topic in the configuration.
pub type PartitionId = (usize, i32);

#[derive(Debug)]
pub struct Batch {
    ops: Box<FnvIndexMap<Vec<u8>, Op, BATCH_CAPACITY>>,
    /// Next offset to read per partition touched by this batch. Bounded by
    /// the number of assigned partitions, not by the data.
    next_offsets: BTreeMap<PartitionId, i64>,
    counts: Counts,
    /// The same counters per partition: stored next to each partition's
    /// offset, in the same command, so a torn append-only file can never
    /// keep one without the other.
    partition_counts: BTreeMap<PartitionId, Counts>,
    n_bytes: usize,
    max_records: usize,
    max_bytes: usize,
    /// The oldest Kafka timestamp among the records put (ms since the
    /// epoch), for the metrics' record age.
    oldest_ts_ms: Option<i64>,
    /// Field-table numbers the batch's values refer to (a bit per number):
    /// the apply script writes those entries with the values.
    fields: [u64; MAX_FIELDS / 64],
}

impl Batch {
    /// `max_records` as `Limits::from_budget` clamps it (a larger one
    /// stops at the map's fixed capacity, and 0 holds one record as 1 does).
    pub fn new(max_records: usize, max_bytes: usize) -> Batch {
        Batch {
            ops: Box::default(),
            next_offsets: BTreeMap::new(),
            counts: Counts::default(),
            partition_counts: BTreeMap::new(),
            n_bytes: 0,
            max_records,
            max_bytes,
            oldest_ts_ms: None,
            fields: [0; MAX_FIELDS / 64],
        }
    }

    /// True when a record of this size might not fit: flush first.
    pub fn is_full_for(&self, key_len: usize, value_len: usize) -> bool {
        !self.ops.is_empty()
            && (self.ops.len() >= self.max_records
                || self.ops.len() == self.ops.capacity()
                || self.n_bytes + key_len + value_len > self.max_bytes)
    }

    /// Records the latest operation for `key` at `offset` of `partition`.
    /// The caller checks [`Batch::is_full_for`] first; a single record larger
    /// than `max_bytes` still fits into an empty batch (the value-size cap is
    /// well below `max_bytes`).
    pub fn put(&mut self, partition: PartitionId, offset: i64, key: Vec<u8>, op: Op) {
        let added = key.len() + op_len(&op);
        match self.ops.get_mut(&key) {
            Some(existing) => {
                self.n_bytes = self.n_bytes - op_len(existing) + op_len(&op);
                *existing = op;
            }
            None => {
                self.n_bytes += added;
                if self.ops.insert(key, op).is_err() {
                    // Unreachable when callers honour is_full_for; losing a
                    // record silently would break G1, so refuse loudly.
                    panic!("batch over its fixed capacity: caller skipped is_full_for");
                }
            }
        }
        self.counts.records += 1;
        self.partition_counts.entry(partition).or_default().records += 1;
        self.advance(partition, offset);
    }

    /// Notes a key during a resync's re-read of old records (see
    /// [`Op::Seen`]). Neither counted as applied nor advancing an offset:
    /// the stored offset is already past these records. The caller checks
    /// [`Batch::is_full_for`] first, as for [`Batch::put`].
    pub fn note(&mut self, key: Vec<u8>, seen: bool) {
        let op = if seen { Op::Seen } else { Op::Unseen };
        self.counts.noted += 1;
        match self.ops.get_mut(&key) {
            // A write already in hand for this key (possible only when a key
            // appears in two partitions) must not be lost; it marks the key
            // seen or unseen itself.
            Some(Op::Set(_) | Op::SetUntil(..) | Op::Hash(..) | Op::Delete) => {}
            Some(existing) => *existing = op,
            None => {
                self.n_bytes += key.len();
                if self.ops.insert(key, op).is_err() {
                    panic!("batch over its fixed capacity: caller skipped is_full_for");
                }
            }
        }
    }

    /// Counts a record outside the agent's scope; its offset advances.
    pub fn filter_out(&mut self, partition: PartitionId, offset: i64) {
        self.counts.filtered += 1;
        self.partition_counts.entry(partition).or_default().filtered += 1;
        self.advance(partition, offset);
    }

    /// Counts a skipped record; its offset still advances (G7).
    pub fn skip(&mut self, partition: PartitionId, offset: i64, reason: SkipReason) {
        self.counts.skipped[reason as usize] += 1;
        self.partition_counts.entry(partition).or_default().skipped[reason as usize] += 1;
        self.advance(partition, offset);
    }

    fn advance(&mut self, partition: PartitionId, offset: i64) {
        let next = self.next_offsets.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    pub fn is_empty(&self) -> bool {
        self.next_offsets.is_empty() && self.ops.is_empty()
    }

    pub fn ops(&self) -> impl Iterator<Item = (&Vec<u8>, &Op)> {
        self.ops.iter()
    }

    pub fn n_ops(&self) -> usize {
        self.ops.len()
    }

    pub fn next_offsets(&self) -> &BTreeMap<PartitionId, i64> {
        &self.next_offsets
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// [`Batch::counts`] of one partition (zero for one not touched).
    pub fn partition_counts(&self, partition: PartitionId) -> Counts {
        self.partition_counts
            .get(&partition)
            .copied()
            .unwrap_or_default()
    }

    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }

    /// Notes a put record's Kafka timestamp (see [`Batch::oldest_ts_ms`]).
    pub fn note_timestamp(&mut self, ts_ms: i64) {
        self.oldest_ts_ms = Some(self.oldest_ts_ms.map_or(ts_ms, |t| t.min(ts_ms)));
    }

    /// The oldest timestamp noted since the batch was cleared.
    pub fn oldest_ts_ms(&self) -> Option<i64> {
        self.oldest_ts_ms
    }

    /// Notes that a value in the batch refers to field number `id`.
    pub fn use_field(&mut self, id: u32) {
        let id = id as usize;
        if let Some(word) = self.fields.get_mut(id / 64) {
            *word |= 1 << (id % 64);
        }
    }

    /// The field numbers noted by [`Batch::use_field`], ascending.
    pub fn fields(&self) -> impl Iterator<Item = u32> + '_ {
        self.fields.iter().enumerate().flat_map(|(at, &word)| {
            (0..64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| (at * 64 + bit) as u32)
        })
    }

    pub fn clear(&mut self) {
        self.oldest_ts_ms = None;
        self.fields = [0; MAX_FIELDS / 64];
        self.ops.clear();
        self.next_offsets.clear();
        self.counts = Counts::default();
        self.partition_counts.clear();
        self.n_bytes = 0;
    }
}

pub fn op_len(op: &Op) -> usize {
    match op {
        Op::Set(value) | Op::SetUntil(value, _) | Op::Hash(value, _) => value.len(),
        Op::Delete | Op::Seen | Op::Unseen => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &str) -> Op {
        Op::Set(v.as_bytes().to_vec())
    }

    #[test]
    fn latest_per_key_wins_and_tombstone_deletes() {
        let mut batch = Batch::new(16, 1 << 20);
        batch.put((0, 0), 10, b"a".to_vec(), set("1"));
        batch.put((0, 0), 11, b"b".to_vec(), set("2"));
        batch.put((0, 0), 12, b"a".to_vec(), Op::Delete);
        batch.put((0, 1), 7, b"c".to_vec(), Op::Delete);
        batch.put((0, 1), 8, b"c".to_vec(), set("3"));
        let ops: Vec<_> = batch.ops().map(|(k, o)| (k.clone(), o.clone())).collect();
        assert_eq!(
            ops,
            vec![
                (b"a".to_vec(), Op::Delete),
                (b"b".to_vec(), set("2")),
                (b"c".to_vec(), set("3")),
            ]
        );
        assert_eq!(batch.next_offsets()[&(0, 0)], 13);
        assert_eq!(batch.next_offsets()[&(0, 1)], 9);
        assert_eq!(batch.counts().records, 5);
        assert_eq!(batch.n_bytes(), 1 + 1 + 1 + 1 + 1);
    }

    #[test]
    fn skipped_records_advance_offsets_and_count() {
        let mut batch = Batch::new(16, 1 << 20);
        batch.skip((1, 2), 40, SkipReason::NoKey);
        batch.skip((1, 2), 41, SkipReason::Oversize);
        assert!(!batch.is_empty());
        assert_eq!(batch.n_ops(), 0);
        assert_eq!(batch.next_offsets()[&(1, 2)], 42);
        assert_eq!(batch.counts().skipped, [0, 1, 1]);
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!(batch.counts(), Counts::default());
    }

    #[test]
    fn caps_on_records_and_bytes() {
        let mut batch = Batch::new(2, 10);
        assert!(
            !batch.is_full_for(100, 100),
            "an empty batch takes anything"
        );
        batch.put((0, 0), 0, b"k1".to_vec(), set("vvv"));
        assert!(batch.is_full_for(2, 4), "5 + 6 bytes > 10");
        assert!(!batch.is_full_for(2, 3));
        batch.put((0, 0), 1, b"k2".to_vec(), set("v"));
        assert!(batch.is_full_for(0, 0), "two records is the cap");
        // Overwriting a key replaces its bytes rather than adding them.
        batch.put((0, 0), 2, b"k1".to_vec(), set("v"));
        assert_eq!(batch.n_bytes(), 6);
    }
}
