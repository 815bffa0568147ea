//! Property tests (proptest) of the pure parts: the codec's round trips
//! through its public functions, and the coalescing batch against a naive
//! model. Needs neither Kafka nor Redis. A failure prints the shrunk input;
//! proptest also saves its seed under tests/properties.proptest-regressions,
//! which is worth committing with the fix.

use edgecache::batch::{op_len, Batch, Counts, Op, PartitionId, SkipReason};
use edgecache::codec::{
    decimal_to_f64, decode_input, decode_stored, encode_store, stored_to_json, to_json_lossy,
    DecodeError, Fields, InputFormat, StoreFormat, StoredRecord, Value, FORMAT_V1, FORMAT_VERSION,
    MAGIC, MAX_DEPTH,
};
use proptest::collection::vec;
use proptest::prelude::*;
#[path = "util/strategies.rs"]
mod strategies;
use std::collections::{BTreeMap, HashMap};
use strategies::{any_value, json_text};

/// 512 cases per property (a few seconds in all); PROPTEST_CASES=N for a
/// longer run (RELIABILITY.md).
fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 512;
    }
    config
}

// ---------------------------------------------------------------- codec

/// Values compared by their encoding, so a NaN equals itself.
fn same(a: &Value, b: &Value) -> bool {
    postcard::to_allocvec(a).unwrap() == postcard::to_allocvec(b).unwrap()
}

/// Equal JSON documents, numbers compared as the f64 they denote, bit for
/// bit (so -0.0 is not 0.0), integers exactly. Integers outside i64 are
/// floats in edgecache, as in JavaScript. Object keys in any order.
fn json_equivalent(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match (a, b) {
        (J::Number(x), J::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64().unwrap().to_bits() == y.as_f64().unwrap().to_bits(),
        },
        (J::Array(x), J::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_equivalent(x, y))
        }
        (J::Object(x), J::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equivalent(v, w)))
        }
        _ => a == b,
    }
}

/// Every Decimal edgecache makes has a scale of at most 15 (FORMAT.md),
/// so readers' `10^scale` is exact.
fn numbers_well_formed(value: &Value) -> bool {
    match value {
        Value::Decimal { scale, .. } => *scale <= 15,
        Value::List(items) => items.iter().all(numbers_well_formed),
        Value::Map(fields) => fields.iter().all(|(_, v)| numbers_well_formed(v)),
        _ => true,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Stored postcard (`EC 02` + record, with its field table; and the
    /// `EC 01` format still read) and the bare postcard input format give
    /// back any value and timestamp unchanged.
    #[test]
    fn postcard_store_round_trip(value in any_value(), ts_ms in any::<Option<i64>>()) {
        let mut out = Vec::new();
        let mut fields = Fields::new();
        encode_store(StoreFormat::Postcard, &value, b"", ts_ms, &mut fields, &mut out).unwrap();
        prop_assert_eq!(&out[..2], &[MAGIC, FORMAT_VERSION]);
        let record = decode_stored(&out, &fields).unwrap();
        prop_assert_eq!(record.ts_ms, ts_ms);
        prop_assert!(same(&record.value, &value));
        // `get` can always show it.
        prop_assert_eq!(stored_to_json(StoreFormat::Postcard, &out, &fields).unwrap().1, ts_ms);
        // The same value in the table's later state (it only grows).
        let mut later = fields.clone();
        encode_store(StoreFormat::Postcard, &Value::Map(vec![("zz-new".into(), Value::Null)]), b"", None, &mut later, &mut Vec::new()).unwrap();
        prop_assert!(same(&decode_stored(&out, &later).unwrap().value, &value));

        let mut v1 = vec![MAGIC, FORMAT_V1];
        v1.extend(postcard::to_allocvec(&StoredRecord { ts_ms, value: value.clone() }).unwrap());
        let record = decode_stored(&v1, &Fields::new()).unwrap();
        prop_assert_eq!(record.ts_ms, ts_ms);
        prop_assert!(same(&record.value, &value));

        let bare = postcard::to_allocvec(&value).unwrap();
        prop_assert!(same(&decode_input(InputFormat::Postcard, &bare).unwrap(), &value));
    }

    /// Whatever bytes arrive, decoding is an error or a value, and a value
    /// is always storable as postcard and readable back.
    #[test]
    fn any_bytes_decode_or_error(payload in vec(any::<u8>(), 0..64)) {
        for input in [InputFormat::Json, InputFormat::Postcard, InputFormat::Raw] {
            if let Ok(value) = decode_input(input, &payload) {
                let mut out = Vec::new();
                let mut fields = Fields::new();
                encode_store(StoreFormat::Postcard, &value, &payload, None, &mut fields, &mut out).unwrap();
                prop_assert!(same(&decode_stored(&out, &fields).unwrap().value, &value));
            }
        }
        let fields = Fields::from_pairs([("0".to_owned(), "a".to_owned())]);
        let _ = decode_stored(&payload, &fields);
        for store in [StoreFormat::Postcard, StoreFormat::Json, StoreFormat::Raw] {
            let _ = stored_to_json(store, &payload, &fields);
        }
    }

    /// JSON in, JSON out: through either store format the document `get`
    /// shows is the one produced, every number to the bit.
    #[test]
    fn json_round_trip(text in json_text()) {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(&text);
        let decoded = decode_input(InputFormat::Json, text.as_bytes());
        let original = match parsed {
            Ok(original) => original,
            Err(_) => {
                // Only numbers out of f64's range make the generated text
                // invalid; the codec must refuse it too.
                prop_assert!(matches!(decoded, Err(DecodeError::Json(_))), "{:?}", decoded);
                return Ok(());
            }
        };
        let value = decoded.unwrap();
        prop_assert!(numbers_well_formed(&value), "{:?}", value);
        prop_assert!(json_equivalent(&to_json_lossy(&value), &original));
        let mut out = Vec::new();
        for store in [StoreFormat::Postcard, StoreFormat::Json] {
            let mut fields = Fields::new();
            encode_store(store, &value, text.as_bytes(), None, &mut fields, &mut out).unwrap();
            let (shown, _) = stored_to_json(store, &out, &fields).unwrap();
            prop_assert!(json_equivalent(&shown, &original), "{}: {} vs {}", store, shown, original);
        }
        // The hash store: an object as it is, and any value as the field of
        // one (strings that look like JSON keep their quotes).
        let wrapped = Value::Map(vec![("v".into(), value.clone())]);
        let wrapped_original = serde_json::json!({ "v": original });
        for (value, original) in [(&value, &original), (&wrapped, &wrapped_original)] {
            let mut fields = Fields::new();
            match encode_store(StoreFormat::Hash, value, b"", None, &mut fields, &mut out) {
                Ok(()) => {
                    let (shown, _) = stored_to_json(StoreFormat::Hash, &out, &fields).unwrap();
                    prop_assert!(json_equivalent(&shown, original), "hash: {} vs {}", shown, original);
                }
                Err(e) => {
                    prop_assert!(!original.is_object(), "{}: {}", original, e);
                    prop_assert!(matches!(e, DecodeError::NotAnObject(_)), "{}", e);
                }
            }
        }
    }

    /// Any double becomes a Decimal or a Float that stands for exactly the
    /// same bits (NaNs and -0.0 included).
    #[test]
    fn from_f64_is_exact(
        // Raw bits reach every NaN payload; any::<f64>() favours the edge
        // classes (both zeros, subnormals, infinities).
        f in prop_oneof![any::<u64>().prop_map(f64::from_bits), any::<f64>()],
    ) {
        let bits = f.to_bits();
        match Value::from_f64(f) {
            Value::Decimal { mantissa, scale } => {
                prop_assert!(scale <= 15);
                prop_assert_eq!(decimal_to_f64(mantissa, scale).to_bits(), bits);
            }
            Value::Float(g) => prop_assert_eq!(g.to_bits(), bits),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    /// A double written with at most 15 decimals and under 9e15 in mantissa
    /// is a Decimal, with the smallest scale that gives it back.
    #[test]
    fn short_decimals_are_decimals(mantissa in -(9 * 10i64.pow(14))..(9 * 10i64.pow(14)), scale in 0u8..=15) {
        let f = decimal_to_f64(mantissa, scale);
        match Value::from_f64(f) {
            Value::Decimal { mantissa: m, scale: s } => {
                prop_assert!(s <= scale);
                prop_assert_eq!(decimal_to_f64(m, s).to_bits(), f.to_bits());
                for smaller in 0..s {
                    let scaled = (f * 10f64.powi(i32::from(smaller))).round() as i64;
                    prop_assert_ne!(decimal_to_f64(scaled, smaller).to_bits(), f.to_bits());
                }
            }
            other => prop_assert!(false, "{} became {:?}", f, other),
        }
    }

    /// The nesting cap: all decoders agree, accept up to MAX_DEPTH levels
    /// below the top value, and refuse deeper with an error (no panic, no
    /// stack overflow).
    #[test]
    fn nesting_cap(levels in 0usize..(MAX_DEPTH + 40), use_map in any::<bool>()) {
        // `levels` containers around a null: the null sits at depth `levels`.
        let (open, close, pc_level): (&str, &str, &[u8]) = if use_map {
            ("{\"k\":", "}", &[7, 1, 1, b'k'])
        } else {
            ("[", "]", &[6, 1])
        };
        let json = open.repeat(levels) + "null" + &close.repeat(levels);
        let mut bare = pc_level.repeat(levels);
        bare.push(0);
        let mut stored = vec![MAGIC, FORMAT_V1, 0];
        stored.extend_from_slice(&bare);
        // Format 2: the same with the map key inline (`00` first).
        let mut stored2 = vec![MAGIC, FORMAT_VERSION, 0];
        let level2: &[u8] = if use_map { &[7, 1, 0, 1, b'k'] } else { &[6, 1] };
        stored2.extend(level2.repeat(levels));
        stored2.push(0);

        let results = [
            decode_input(InputFormat::Json, json.as_bytes()),
            decode_input(InputFormat::Postcard, &bare),
            decode_stored(&stored, &Fields::new()).map(|record| record.value),
            decode_stored(&stored2, &Fields::new()).map(|record| record.value),
        ];
        for result in &results {
            if levels <= MAX_DEPTH {
                prop_assert!(result.is_ok(), "{} levels: {:?}", levels, result);
            } else {
                prop_assert_eq!(result, &Err(DecodeError::TooDeep), "{} levels", levels);
            }
        }
    }
}

// ---------------------------------------------------------------- batch

/// One record as the pipeline hands it to the batch.
#[derive(Debug, Clone)]
enum Record {
    Put {
        partition: PartitionId,
        offset: i64,
        key: Vec<u8>,
        op: Op,
    },
    Skip {
        partition: PartitionId,
        offset: i64,
        reason: SkipReason,
    },
    Filtered {
        partition: PartitionId,
        offset: i64,
    },
}

fn any_record() -> impl Strategy<Value = Record> {
    // Few partitions and keys, so they repeat; offsets in any order, since
    // the batch promises max + 1 whatever the order.
    let partition = (0usize..2, 0i32..3);
    let offset = 0i64..1_000;
    let op = prop_oneof![
        3 => vec(any::<u8>(), 0..40).prop_map(Op::Set),
        1 => (vec(any::<u8>(), 0..40), any::<i64>()).prop_map(|(v, t)| Op::SetUntil(v, t)),
        2 => Just(Op::Delete),
    ];
    prop_oneof![
        8 => (partition.clone(), offset.clone(), 0u8..10, 0usize..6, op).prop_map(
            |(partition, offset, key, key_len, op)| Record::Put {
                partition,
                offset,
                // Keys of different lengths: "k3", "k3kk", ...
                key: [b"k".as_slice(), &[b'0' + key], &b"kkkkk"[..key_len]].concat(),
                op,
            }
        ),
        1 => (partition.clone(), offset.clone(), prop::sample::select(SkipReason::ALL.to_vec()))
            .prop_map(|(partition, offset, reason)| Record::Skip { partition, offset, reason }),
        1 => (partition, offset).prop_map(|(partition, offset)| Record::Filtered { partition, offset }),
    ]
}

/// The naive model of one batch: a plain map, latest op per key.
#[derive(Default)]
struct ModelBatch {
    ops: HashMap<Vec<u8>, Op>,
    next_offsets: BTreeMap<PartitionId, i64>,
    counts: Counts,
    n_events: usize,
}

impl ModelBatch {
    fn record(&mut self, record: &Record) {
        self.n_events += 1;
        let (partition, offset) = match record {
            Record::Put {
                partition,
                offset,
                key,
                op,
            } => {
                self.ops.insert(key.clone(), op.clone());
                self.counts.records += 1;
                (partition, offset)
            }
            Record::Skip {
                partition,
                offset,
                reason,
            } => {
                self.counts.skipped[*reason as usize] += 1;
                (partition, offset)
            }
            Record::Filtered { partition, offset } => {
                self.counts.filtered += 1;
                (partition, offset)
            }
        };
        let next = self.next_offsets.entry(*partition).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    fn n_bytes(&self) -> usize {
        self.ops.iter().map(|(k, op)| k.len() + op_len(op)).sum()
    }
}

/// Compares the batch with the model, then applies it to the model of Redis
/// the way the sink does (SET or DEL per key, offsets stored).
fn flush(
    batch: &mut Batch,
    model: &mut ModelBatch,
    redis: &mut HashMap<Vec<u8>, Op>,
    offsets: &mut BTreeMap<PartitionId, i64>,
) -> Result<(), TestCaseError> {
    let got: HashMap<Vec<u8>, Op> = batch.ops().map(|(k, o)| (k.clone(), o.clone())).collect();
    prop_assert_eq!(got.len(), batch.n_ops(), "a key appears once per batch");
    prop_assert_eq!(&got, &model.ops);
    prop_assert_eq!(batch.next_offsets(), &model.next_offsets);
    prop_assert_eq!(batch.counts(), model.counts);
    prop_assert_eq!(batch.n_bytes(), model.n_bytes());
    prop_assert_eq!(batch.is_empty(), model.n_events == 0);
    for (key, op) in got {
        match op {
            Op::Delete => redis.remove(&key),
            op => redis.insert(key, op),
        };
    }
    for (partition, next) in batch.next_offsets() {
        offsets.insert(*partition, *next);
    }
    batch.clear();
    *model = ModelBatch::default();
    prop_assert!(batch.is_empty());
    prop_assert_eq!(batch.counts(), Counts::default());
    prop_assert_eq!(batch.n_bytes(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// The batch against a plain map, driven the way the pipeline drives it
    /// (flush when `is_full_for`, flush at the end): per batch the same ops,
    /// next offsets (max + 1 per partition), counters and byte count; the
    /// caps hold; and the Redis the batches build equals a plain replay of
    /// every record (latest op per key, tombstone deletes, G1).
    #[test]
    fn batch_matches_naive_model(
        records in vec(any_record(), 0..200),
        max_records in 0usize..12,
        max_bytes in 0usize..160,
        kafka_order in any::<bool>(),
    ) {
        // Kafka delivers each partition's offsets in order; the batch's
        // max + 1 rule must also hold for any order, so try both.
        let mut records = records;
        if kafka_order {
            for (idx, record) in records.iter_mut().enumerate() {
                match record {
                    Record::Put { offset, .. }
                    | Record::Skip { offset, .. }
                    | Record::Filtered { offset, .. } => *offset = idx as i64,
                }
            }
        }
        let mut batch = Batch::new(max_records, max_bytes);
        // A max of 0 holds one key, as 1 does: an empty batch takes anything.
        let max_records = max_records.max(1);
        let mut model = ModelBatch::default();
        let mut redis = HashMap::new();
        let mut offsets = BTreeMap::new();
        for record in &records {
            match record {
                Record::Put { partition, offset, key, op } => {
                    if batch.is_full_for(key.len(), op_len(op)) {
                        prop_assert!(batch.n_ops() > 0, "an empty batch takes anything");
                        flush(&mut batch, &mut model, &mut redis, &mut offsets)?;
                    }
                    batch.put(*partition, *offset, key.clone(), op.clone());
                    // At most max_records keys; over max_bytes only when a
                    // single record is larger than the cap on its own.
                    prop_assert!(batch.n_ops() <= max_records);
                    prop_assert!(batch.n_bytes() <= max_bytes || batch.n_ops() == 1);
                }
                Record::Skip { partition, offset, reason } => {
                    batch.skip(*partition, *offset, *reason)
                }
                Record::Filtered { partition, offset } => batch.filter_out(*partition, *offset),
            }
            model.record(record);
        }
        flush(&mut batch, &mut model, &mut redis, &mut offsets)?;

        // The plain replay of everything.
        let mut replay: HashMap<Vec<u8>, Op> = HashMap::new();
        let mut replay_offsets: BTreeMap<PartitionId, i64> = BTreeMap::new();
        for record in &records {
            let (partition, offset) = match record {
                Record::Put { partition, offset, key, op } => {
                    match op {
                        Op::Delete => replay.remove(key),
                        op => replay.insert(key.clone(), op.clone()),
                    };
                    (partition, offset)
                }
                Record::Skip { partition, offset, .. } | Record::Filtered { partition, offset } => {
                    (partition, offset)
                }
            };
            let next = replay_offsets.entry(*partition).or_insert(0);
            *next = (*next).max(offset + 1);
        }
        prop_assert_eq!(redis, replay);
        // Each batch stores its own max + 1, so the stored offsets equal
        // the replay's when offsets arrive in order.
        if kafka_order {
            prop_assert_eq!(offsets, replay_offsets);
        }
    }
}
