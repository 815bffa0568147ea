//! What the fuzz targets check, shared by them. Each target feeds outside
//! bytes through the same public functions the agent uses; besides "no
//! panic, no crash" (a stack overflow or an abort is a crash too), these
//! oracles check that what the pipeline writes can always be read back by
//! `edgecache get`, unchanged.

use edgecache::checkpoint::StoredOffsets;
use edgecache::codec::{self, DecodeError, Fields, InputFormat, StoreFormat, Value};

const STORES: [StoreFormat; 4] = [
    StoreFormat::Postcard,
    StoreFormat::Json,
    StoreFormat::Raw,
    StoreFormat::Hash,
];

/// One record value through the pipeline's path: decode as `input`, encode
/// for every store format, then decode what was stored as `get` does.
pub fn check_input(input: InputFormat, payload: &[u8]) {
    let ts_ms = Some(i64::from_le_bytes(pad8(payload)));
    // What the pipeline calls, `transcode` (a direct JSON -> postcard path),
    // must give the same bytes and errors as the two steps checked below.
    for store in STORES {
        let (mut direct, mut two_step) = (Vec::new(), Vec::new());
        let mut fields = Fields::new();
        let one_step = codec::transcode(input, store, payload, ts_ms, &mut fields, &mut direct);
        // The same field numbers: the direct path may have numbered names
        // in its own order before it gave up.
        let mut fields = fields.clone();
        let two_steps = codec::decode_input(input, payload).and_then(|value| {
            codec::encode_store(store, &value, payload, ts_ms, &mut fields, &mut two_step)
        });
        assert_eq!(one_step, two_steps, "transcode vs two steps ({store})");
        if two_steps.is_ok() {
            assert_eq!(direct, two_step, "transcode vs two steps ({store})");
        }
    }
    let value = match codec::decode_input(input, payload) {
        Ok(value) => value,
        Err(_) => return,
    };
    // The original JSON, to compare the JSON the agent stores with.
    let original_json: Option<serde_json::Value> = match input {
        InputFormat::Json => {
            Some(serde_json::from_slice(payload).expect("decode_input accepted it"))
        }
        _ => None,
    };
    let mut stored = Vec::new();
    for store in STORES {
        let mut fields = Fields::new();
        if let Err(e) = codec::encode_store(store, &value, payload, ts_ms, &mut fields, &mut stored)
        {
            // The JSON store refuses only what has no JSON form, the hash
            // store that and what is not an object; anything else decoded
            // must be storable.
            let not_an_object = matches!(e, DecodeError::NotAnObject(_));
            assert!(
                store == StoreFormat::Json || store == StoreFormat::Hash,
                "{store} refused {value:?}: {e}"
            );
            if store == StoreFormat::Hash && not_an_object {
                assert!(!matches!(value, Value::Map(_)), "{e}");
                continue;
            }
            assert!(
                has_no_json_form(&value),
                "{store} store refused {value:?}: {e}"
            );
            assert!(
                matches!(e, DecodeError::BytesInJson | DecodeError::Json(_)),
                "{e:?}"
            );
            continue;
        }
        let (shown, shown_ts) = codec::stored_to_json(store, &stored, &fields)
            .unwrap_or_else(|e| panic!("get cannot read what {store} stored: {e}"));
        // `get` prints it; that must not fail either.
        serde_json::to_vec(&shown).expect("printing JSON");
        match store {
            StoreFormat::Postcard => {
                let record =
                    codec::decode_stored(&stored, &fields).expect("decode what was stored");
                assert_eq!(record.ts_ms, ts_ms);
                assert_eq!(shown_ts, ts_ms);
                assert_same(&record.value, &value);
            }
            StoreFormat::Json => {
                let parsed: serde_json::Value =
                    serde_json::from_slice(&stored).expect("the JSON store writes JSON");
                assert!(
                    json_equivalent(&parsed, &codec::to_json_lossy(&value)),
                    "{parsed} vs {value:?}"
                );
            }
            StoreFormat::Raw => assert_eq!(stored, payload),
            StoreFormat::Hash => assert!(
                json_equivalent(&shown, &codec::to_json_lossy(&value)),
                "{shown} vs {value:?}"
            ),
        }
        if let Some(original) = &original_json {
            // JSON in, JSON out: the same document, numbers included (to
            // the bit, -0.0 too), whichever store format kept it.
            assert!(
                json_equivalent(&shown, original),
                "{store}: {shown} vs {original}"
            );
        }
    }
    if input == InputFormat::Postcard {
        // The bare value re-encodes to bytes that decode to the same value.
        let again = postcard::to_allocvec(&value).expect("encode");
        let back = codec::decode_input(InputFormat::Postcard, &again).expect("decode re-encoded");
        assert_same(&back, &value);
    }
}

/// Bytes as read from Redis by `edgecache get`, under every store format,
/// and the same bytes behind a valid postcard header of each version (with
/// a small field table) so the fuzzer does not have to find the header
/// first.
pub fn check_stored(bytes: &[u8]) {
    let table = Fields::from_pairs(
        ["temp_c", "online", "", "é"]
            .iter()
            .enumerate()
            .map(|(id, name)| (id.to_string(), name.to_string())),
    );
    for store in STORES {
        if let Ok((json, _)) = codec::stored_to_json(store, bytes, &table) {
            serde_json::to_vec(&json).expect("printing JSON");
        }
    }
    for version in [codec::FORMAT_V1, codec::FORMAT_VERSION] {
        let mut with_header = vec![codec::MAGIC, version];
        with_header.extend_from_slice(bytes);
        if let Ok(record) = codec::decode_stored(&with_header, &table) {
            // What decodes re-encodes to bytes that decode to the same
            // record (postcard has one encoding per value, bar overlong
            // varints, so compare values).
            let mut again = Vec::new();
            let mut fields = table.clone();
            codec::encode_store(
                StoreFormat::Postcard,
                &record.value,
                &[],
                record.ts_ms,
                &mut fields,
                &mut again,
            )
            .expect("re-encode a decoded record");
            let back = codec::decode_stored(&again, &fields).expect("decode re-encoded");
            assert_eq!(back.ts_ms, record.ts_ms);
            assert_same(&back.value, &record.value);
            let (json, _) = codec::stored_to_json(StoreFormat::Postcard, &with_header, &table)
                .expect("decode_stored accepted it");
            serde_json::to_vec(&json).expect("printing JSON");
        }
    }
}

/// `HGETALL <ns>:offsets` as Redis could return it: the first line is the
/// configured topic names (comma separated), each further line a
/// `field<TAB>value` pair.
pub fn check_offsets(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines();
    let topics: Vec<String> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect();
    let fields: Vec<(String, String)> = lines
        .map(|line| match line.split_once('\t') {
            Some((field, value)) => (field.to_owned(), value.to_owned()),
            None => (line.to_owned(), String::new()),
        })
        .collect();
    let n_fields = fields.len();
    let stored = StoredOffsets::parse(&topics, fields);
    assert!(stored.next.len() + stored.ignored.len() <= n_fields);
    for (&(topic_idx, partition), &next) in &stored.next {
        assert!(topic_idx < topics.len());
        assert!(partition >= 0 && next >= 0, "{partition} {next}");
    }
}

fn pad8(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0; 8];
    let n = bytes.len().min(8);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

/// Values compared by their encoding, so a NaN equals itself.
fn assert_same(a: &Value, b: &Value) {
    assert_eq!(
        postcard::to_allocvec(a).unwrap(),
        postcard::to_allocvec(b).unwrap(),
        "{a:?} vs {b:?}"
    );
}

fn has_no_json_form(value: &Value) -> bool {
    match value {
        Value::Bytes(_) => true,
        Value::Float(f) => !f.is_finite(),
        Value::List(items) => items.iter().any(has_no_json_form),
        Value::Map(fields) => fields.iter().any(|(_, v)| has_no_json_form(v)),
        _ => false,
    }
}

/// Equal JSON documents, numbers compared as the f64 they denote (bit for
/// bit, so -0.0 and 0.0 differ) and integers exactly. Integers outside i64
/// are floats in edgecache, as in JavaScript. Object keys in any order.
pub fn json_equivalent(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match (a, b) {
        (J::Number(x), J::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                x.to_bits() == y.to_bits()
            }
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
