//! Records into the batch: the checks on a record (position, key, size,
//! filters), its encoding for the topic's store, and the Redis operation it
//! becomes; bad records are skipped and counted, never applied.

use super::{redis_key, Flow, Pipeline};
use crate::batch::{Op, PartitionId, SkipReason};
use crate::checkpoint::Start;
use crate::codec::{self, Fields};
use crate::config::TopicSettings;
use crate::config::MAX_KEY_BYTES;
use crate::source::{Incoming, Source};
use std::time::{Duration, Instant};
use tracing::warn;

/// At most this many bad-record lines per window; the rest are counted.
const BAD_RECORD_LOG_LIMIT: u32 = 20;
const BAD_RECORD_LOG_WINDOW: Duration = Duration::from_secs(10);

/// The parts of a Kafka record that decide what it becomes.
#[derive(Debug, Clone, Copy)]
struct Record<'a> {
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    timestamp_ms: Option<i64>,
}

/// What a record becomes.
#[derive(Debug, PartialEq)]
enum Decision<'a> {
    /// The operation on the key `<prefix><Kafka key>`.
    Apply(&'a [u8], Op),
    /// Outside the topic's `only_*` filters: its offset still counts as read.
    FilteredOut,
    /// A bad record: skipped and counted, with why.
    Skip(SkipReason, String),
}

/// The Redis operation a record becomes, with the value encoded for the
/// topic's store into `encoded` (`fields` is the namespace's field table,
/// grown by new names). A tombstone deletes; so does a value already
/// older than the topic's TTL, and an empty object in the hash store
/// (Redis has no empty hash). `now_ms` is only asked with a TTL.
fn decide<'a>(
    topic: &TopicSettings,
    max_value_bytes: usize,
    record: Record<'a>,
    now_ms: impl FnOnce() -> i64,
    fields: &mut Fields,
    encoded: &mut Vec<u8>,
) -> Decision<'a> {
    let key = match record.key {
        None => return Decision::Skip(SkipReason::NoKey, "record has no key".to_owned()),
        Some(key) if key.len() > MAX_KEY_BYTES => {
            return Decision::Skip(SkipReason::Oversize, "key too long".to_owned())
        }
        Some(key) => key,
    };
    if !topic.wants_key(key) {
        return Decision::FilteredOut;
    }
    let payload = match record.payload {
        None => return Decision::Apply(key, Op::Delete),
        Some(payload) if payload.len() > max_value_bytes => {
            return Decision::Skip(SkipReason::Oversize, "value over the size cap".to_owned())
        }
        Some(payload) => payload,
    };
    fields.clear_used();
    let transcoded = codec::transcode(
        topic.input,
        topic.store,
        payload,
        record.timestamp_ms,
        fields,
        encoded,
    );
    if let Err(e) = transcoded {
        return Decision::Skip(SkipReason::Undecodable, e.to_string());
    }
    let hash = topic.store == codec::StoreFormat::Hash;
    let op = match topic.ttl_ms {
        // `{}`: Redis has no empty hash, the key goes.
        _ if hash && encoded.is_empty() => Op::Delete,
        None if hash => Op::Hash(encoded.clone(), None),
        None => Op::Set(encoded.clone()),
        Some(ttl_ms) => {
            let now = now_ms();
            // Saturating: a far-future timestamp (Kafka takes any up to
            // i64::MAX) must give the longest expiry, not wrap around to the
            // past and delete the key. Redis's `SET ... PXAT` takes any
            // positive 64-bit time.
            let expire_at = record.timestamp_ms.unwrap_or(now).saturating_add(ttl_ms);
            if expire_at <= now {
                // Already older than its TTL: the key must not exist.
                Op::Delete
            } else if hash {
                Op::Hash(encoded.clone(), Some(expire_at))
            } else {
                Op::SetUntil(encoded.clone(), expire_at)
            }
        }
    };
    Decision::Apply(key, op)
}

/// Bad-record log lines, at most [`BAD_RECORD_LOG_LIMIT`] per window; the
/// rest are counted and summed up in one line.
#[derive(Debug)]
pub(super) struct BadRecordLog {
    logged: u32,
    suppressed: u64,
    window: Instant,
}

impl BadRecordLog {
    pub(super) fn new() -> Self {
        BadRecordLog {
            logged: 0,
            suppressed: 0,
            window: Instant::now(),
        }
    }

    fn log(
        &mut self,
        topic: &str,
        partition: PartitionId,
        offset: i64,
        reason: SkipReason,
        why: &str,
    ) {
        if self.window.elapsed() > BAD_RECORD_LOG_WINDOW {
            if self.suppressed > 0 {
                warn!(
                    n = self.suppressed,
                    "more bad records skipped (not logged one by one)"
                );
            }
            self.window = Instant::now();
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < BAD_RECORD_LOG_LIMIT {
            self.logged += 1;
            warn!(
                topic = %topic,
                partition = partition.1,
                offset,
                reason = reason.counter(),
                "skipping record: {why}"
            );
        } else {
            self.suppressed += 1;
        }
    }
}

impl Pipeline<'_> {
    pub(super) async fn handle_record(&mut self, source: &Source, incoming: Incoming<'_>) -> Flow {
        if source.brokers_down() {
            source.mark_reachable();
        }
        let partition = incoming.partition();
        let offset = incoming.offset();
        match self.positions.get(&partition) {
            // Prefetched before a reassignment, or already in Redis.
            Some(Start::At(next)) if offset < *next => return Flow::Continue,
            Some(_) => {}
            None => return Flow::Continue,
        }
        if self
            .resync
            .as_ref()
            .is_some_and(|r| r.is_shadow(partition, offset))
        {
            return self.note(source, &incoming).await;
        }
        let topic = &self.settings.topics[partition.0];
        let decision = decide(
            topic,
            self.settings.limits.max_value_bytes,
            Record {
                key: incoming.key(),
                payload: incoming.payload(),
                timestamp_ms: incoming.timestamp_ms(),
            },
            crate::sink::now_ms,
            &mut self.fields,
            &mut self.encoded,
        );
        let (key, op) = match decision {
            Decision::Apply(key, op) => (key, op),
            Decision::FilteredOut => {
                self.batch.filter_out(partition, offset);
                return Flow::Continue;
            }
            Decision::Skip(reason, why) => return self.skip(partition, offset, reason, &why),
        };
        let redis_key = redis_key(&topic.key_prefix, key);
        let value_len = crate::batch::op_len(&op);
        if self.batch.is_full_for(redis_key.len(), value_len) {
            match self.send(source).await {
                Flow::Continue => {}
                // The record belongs to the old assignment or we are stopping.
                other => return other,
            }
        }
        // After any flush above: the names this value uses go with the
        // batch that holds it.
        if matches!(op, Op::Set(_) | Op::SetUntil(..) | Op::Hash(..)) {
            for &id in self.fields.used() {
                self.batch.use_field(id);
            }
        }
        if let Some(ts_ms) = incoming.timestamp_ms() {
            self.batch.note_timestamp(ts_ms);
        }
        self.batch.put(partition, offset, redis_key, op);
        Flow::Continue
    }

    /// A record a resync re-reads below the stored offset: Redis already has
    /// it or something newer, so only its key is noted (seen for a value,
    /// unseen for a tombstone). Records the agent skips or filters out are
    /// not noted, so the sweep removes such keys.
    pub(super) async fn note(&mut self, source: &Source, incoming: &Incoming<'_>) -> Flow {
        let topic = &self.settings.topics[incoming.topic_idx];
        let Some(key) = incoming.key() else {
            return Flow::Continue;
        };
        if key.len() > MAX_KEY_BYTES || !topic.wants_key(key) {
            return Flow::Continue;
        }
        let redis_key = redis_key(&topic.key_prefix, key);
        let seen = incoming.payload().is_some();
        if self.batch.is_full_for(redis_key.len(), 0) {
            match self.send(source).await {
                Flow::Continue => {}
                other => return other,
            }
        }
        self.batch.note(redis_key, seen);
        Flow::Continue
    }

    pub(super) fn skip(
        &mut self,
        partition: PartitionId,
        offset: i64,
        reason: SkipReason,
        why: &str,
    ) -> Flow {
        self.batch.skip(partition, offset, reason);
        let topic = &self.settings.topics[partition.0].name;
        self.bad_records.log(topic, partition, offset, reason, why);
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{InputFormat, StoreFormat};

    fn topic(input: InputFormat, store: StoreFormat, ttl_ms: Option<i64>) -> TopicSettings {
        TopicSettings {
            name: "t".to_owned(),
            key_prefix: b"device:".to_vec(),
            input,
            store,
            only_prefix: None,
            only_matching: None,
            partitions: None,
            ttl_ms,
        }
    }

    fn record<'a>(key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> Record<'a> {
        Record {
            key,
            payload,
            timestamp_ms: Some(1_000),
        }
    }

    /// `decide` with a clock that must not be read.
    fn decide_now<'a>(topic: &TopicSettings, record: Record<'a>, now: Option<i64>) -> Decision<'a> {
        let mut fields = Fields::new();
        let mut encoded = Vec::new();
        let clock = || now.expect("the clock is only read with a TTL");
        decide(topic, 64, record, clock, &mut fields, &mut encoded)
    }

    #[test]
    fn bad_records_are_skipped_with_their_reason() {
        let raw = topic(InputFormat::Raw, StoreFormat::Raw, None);
        let json = topic(InputFormat::Json, StoreFormat::Json, None);
        let long_key = vec![b'k'; MAX_KEY_BYTES + 1];
        let cases = [
            (&raw, record(None, Some(b"v")), SkipReason::NoKey),
            (
                &raw,
                record(Some(&long_key), Some(b"v")),
                SkipReason::Oversize,
            ),
            (
                &raw,
                record(Some(b"k"), Some(&[b'v'; 65])),
                SkipReason::Oversize,
            ),
            (
                &json,
                record(Some(b"k"), Some(b"{not json")),
                SkipReason::Undecodable,
            ),
        ];
        for (topic, record, reason) in cases {
            match decide_now(topic, record, None) {
                Decision::Skip(got, why) => {
                    assert_eq!(got, reason, "{why}");
                    assert!(!why.is_empty());
                }
                other => panic!("{record:?}: {other:?}"),
            }
        }
        // A key at the limit and a value at the cap are fine.
        let key = vec![b'k'; MAX_KEY_BYTES];
        let value = [b'v'; 64];
        let decision = decide_now(&raw, record(Some(&key), Some(&value)), None);
        assert_eq!(decision, Decision::Apply(&key, Op::Set(value.to_vec())));
    }

    #[test]
    fn tombstones_delete_and_filters_keep_the_offset() {
        let mut raw = topic(InputFormat::Raw, StoreFormat::Raw, None);
        let decision = decide_now(&raw, record(Some(b"k"), None), None);
        assert_eq!(decision, Decision::Apply(b"k", Op::Delete));
        raw.only_prefix = Some(b"site-1/".to_vec());
        let decision = decide_now(&raw, record(Some(b"site-2/k"), Some(b"v")), None);
        assert_eq!(decision, Decision::FilteredOut);
        // A tombstone outside the filter is filtered too: the key was never
        // written.
        let decision = decide_now(&raw, record(Some(b"site-2/k"), None), None);
        assert_eq!(decision, Decision::FilteredOut);
        let decision = decide_now(&raw, record(Some(b"site-1/k"), Some(b"v")), None);
        assert_eq!(
            decision,
            Decision::Apply(b"site-1/k", Op::Set(b"v".to_vec()))
        );
    }

    #[test]
    fn a_ttl_expires_from_the_record_time_and_never_wraps() {
        let ttl = topic(InputFormat::Raw, StoreFormat::Raw, Some(500));
        let fresh = Record {
            timestamp_ms: Some(1_000),
            ..record(Some(b"k"), Some(b"v"))
        };
        let decision = decide_now(&ttl, fresh, Some(1_200));
        assert_eq!(
            decision,
            Decision::Apply(b"k", Op::SetUntil(b"v".to_vec(), 1_500))
        );
        // Already older than its TTL: the key must not exist.
        let decision = decide_now(&ttl, fresh, Some(1_500));
        assert_eq!(decision, Decision::Apply(b"k", Op::Delete));
        // No timestamp: from now.
        let untimed = Record {
            timestamp_ms: None,
            ..fresh
        };
        let decision = decide_now(&ttl, untimed, Some(7_000));
        assert_eq!(
            decision,
            Decision::Apply(b"k", Op::SetUntil(b"v".to_vec(), 7_500))
        );
        // A far-future timestamp gives the longest expiry, not the past.
        let future = Record {
            timestamp_ms: Some(i64::MAX - 10),
            ..fresh
        };
        let decision = decide_now(&ttl, future, Some(1_000));
        assert_eq!(
            decision,
            Decision::Apply(b"k", Op::SetUntil(b"v".to_vec(), i64::MAX))
        );
    }

    #[test]
    fn the_hash_store_deletes_an_empty_object() {
        let hash = topic(InputFormat::Json, StoreFormat::Hash, None);
        let decision = decide_now(&hash, record(Some(b"k"), Some(b"{}")), None);
        assert_eq!(decision, Decision::Apply(b"k", Op::Delete));
        match decide_now(&hash, record(Some(b"k"), Some(br#"{"on":true}"#)), None) {
            Decision::Apply(b"k", Op::Hash(packed, None)) => assert!(!packed.is_empty()),
            other => panic!("{other:?}"),
        }
        let hash_ttl = topic(InputFormat::Json, StoreFormat::Hash, Some(500));
        match decide_now(
            &hash_ttl,
            record(Some(b"k"), Some(br#"{"on":1}"#)),
            Some(1_100),
        ) {
            Decision::Apply(b"k", Op::Hash(_, Some(1_500))) => {}
            other => panic!("{other:?}"),
        }
    }
}
