//! Offset rules. Delivery rule first: the next offset of each partition is
//! stored in Redis (`<ns>:offsets`, field `<topic>/<partition>`) by the same
//! atomic step as the writes it covers, so Redis never holds data newer than
//! its offsets say nor offsets newer than its data (G2). Resume reads these
//! offsets and seeks there; a partition without one starts at the earliest
//! offset Kafka still has. Kafka consumer-group commits (`kafka.commit_group`)
//! are only for operators' lag tools and are never read back.

use std::collections::{BTreeMap, BTreeSet};

/// The offsets hash field holding the apply sequence number: every apply
/// script checks it holds the number the agent last wrote and writes the
/// next one, in the same command as the offsets. Another number means Redis
/// changed under the agent (restored from a snapshot, a replica promoted, a
/// torn append-only file): the agent re-reads its positions from Redis.
pub const SEQ_FIELD: &str = "seq";

/// The offsets hash field of one of a partition's counters (`records`,
/// `filtered`, `skipped_undecodable`, `skipped_no_key`, `skipped_oversize`;
/// absolute, an integer like every value of the hash), written in the same
/// command as the partition's offset so the two never part:
/// `<counter>@<topic>/<partition>`.
pub fn counter_field(counter: &str, topic: &str, partition: i32) -> String {
    format!("{counter}@{topic}/{partition}")
}

/// The offsets hash field that marks a topic whose Kafka lineage changed
/// (deleted and recreated): its resync must run to the end even across
/// restarts, since the stored offsets no longer say what is missing.
pub fn lineage_field(topic: &str) -> String {
    format!("{topic}:lineage")
}

/// Where a partition's reading starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// No stored offset: the oldest record Kafka still has.
    Earliest,
    /// The stored next offset.
    At(i64),
}

/// The offsets hash field of a partition.
pub fn offset_field(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// Offsets read back from Redis, for the configured topics only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredOffsets {
    /// (topic index, partition) -> next offset.
    pub next: BTreeMap<(usize, i32), i64>,
    /// Fields that could not be understood; reported, then ignored.
    pub ignored: Vec<String>,
    /// The apply sequence number ([`SEQ_FIELD`]; 0 when absent).
    pub seq: u64,
    /// Topics (by index) whose lineage resync has not finished.
    pub lineage_pending: BTreeSet<usize>,
}

impl StoredOffsets {
    /// Parses `HGETALL <ns>:offsets`. Fields of topics no longer configured
    /// are ignored (and left in place: another config may want them again).
    pub fn parse(topic_names: &[String], fields: Vec<(String, String)>) -> StoredOffsets {
        let mut stored = StoredOffsets::default();
        for (field, value) in fields {
            if field == SEQ_FIELD {
                stored.seq = value.parse().unwrap_or(0);
                continue;
            }
            // Per-partition counters are read by the reconcile script only.
            if field.contains('@') {
                continue;
            }
            if let Some(topic) = field.strip_suffix(":lineage") {
                if let Some(idx) = topic_names.iter().position(|t| t == topic) {
                    stored.lineage_pending.insert(idx);
                }
                continue;
            }
            let parsed = field.rsplit_once('/').and_then(|(topic, partition)| {
                let topic_idx = topic_names.iter().position(|t| t == topic)?;
                let partition: i32 = partition.parse().ok().filter(|p| *p >= 0)?;
                let next: i64 = value.parse().ok().filter(|n| *n >= 0)?;
                Some(((topic_idx, partition), next))
            });
            match parsed {
                Some((id, next)) => {
                    stored.next.insert(id, next);
                }
                None => stored.ignored.push(field),
            }
        }
        stored
    }

    pub fn start(&self, topic_idx: usize, partition: i32) -> Start {
        match self.next.get(&(topic_idx, partition)) {
            Some(&next) => Start::At(next),
            None => Start::Earliest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_start() {
        let topics = vec!["a".to_owned(), "b/c".to_owned()];
        let stored = StoredOffsets::parse(
            &topics,
            vec![
                ("a/0".into(), "17".into()),
                ("b/c/2".into(), "5".into()),
                ("gone/0".into(), "3".into()),
                ("a/x".into(), "3".into()),
                ("a/1".into(), "-4".into()),
                ("seq".into(), "42".into()),
                ("records@a/0".into(), "3".into()),
                ("a:lineage".into(), "1".into()),
            ],
        );
        assert_eq!(stored.seq, 42);
        assert!(stored.lineage_pending.contains(&0));
        assert_eq!(stored.start(0, 0), Start::At(17));
        assert_eq!(stored.start(1, 2), Start::At(5));
        assert_eq!(stored.start(0, 1), Start::Earliest);
        assert_eq!(stored.ignored, vec!["gone/0", "a/x", "a/1"]);
        assert_eq!(offset_field("a", 3), "a/3");
    }
}
