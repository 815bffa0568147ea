//! Decoding what arrives from Kafka and encoding what is stored in Redis.
//!
//! This is the only module that derives serde for stored data; FORMAT.md is
//! the normative description of the bytes produced here, and
//! `postcard::tests::format_md_vectors` checks its hex vectors.
//!
//! Every decoder here sees outside bytes, so none of them may panic: bad
//! input is an [`DecodeError`] and the pipeline skips and counts the record.
//!
//! One file per job:
//! - `wire`: the primitives (tags, the varint reader and writer, zigzag).
//! - `value`: the value model ([`Value`]) and exact decimals.
//! - `fields`: the field table of stored format 2 ([`Fields`]).
//! - `json`: JSON input parsed into a [`Value`].
//! - `transcode`: the fast path, JSON written as stored format 2 while parsed.
//! - `postcard`: the postcard store, stored format 2 written and read.
//! - `postcard_serde`: postcard's own decoder with the depth cap: the
//!   postcard input format and stored format 1.
//! - `hash`: the hash store.
//! - `render`: a [`Value`] as JSON, for the json store and `edgecache get`.
//!
//! This file holds the entry points the rest of the crate calls and the
//! error type.

use serde::{Deserialize, Serialize};
use std::fmt;

mod fields;
mod hash;
mod json;
mod postcard;
mod postcard_serde;
mod render;
mod transcode;
mod value;
mod wire;

pub use fields::{Fields, MAX_FIELDS, MAX_FIELD_NAME};
pub use hash::{hash_pairs, hash_text_is_json, hash_to_json, pack_hash_pairs};
pub use postcard::{decode_stored, StoredRecord};
pub use render::{hex, to_json_lossy};
pub use value::{decimal_to_f64, Value};

/// First byte of every postcard-stored value. Chosen so a stored value is
/// never valid UTF-8 at its start, which tells it apart from JSON or text.
pub const MAGIC: u8 = 0xEC;
/// Version of the stored layout after the magic byte, as written: 2, whose
/// object keys refer to the namespace's field table ([`Fields`]). Version 1
/// (keys inline) is still read.
pub const FORMAT_VERSION: u8 = 2;
/// The first stored layout: like version 2 but every object key inline.
pub const FORMAT_V1: u8 = 1;
/// Deepest nesting of lists and maps accepted from outside. Bounds the stack
/// used by every recursive walk below (decode, transcode, print).
pub const MAX_DEPTH: usize = 64;

/// How record values arrive on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// UTF-8 JSON text.
    Json,
    /// A bare postcard-encoded [`Value`] (FORMAT.md, "Value").
    Postcard,
    /// Opaque bytes.
    Raw,
}

/// How values are written to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreFormat {
    /// `[MAGIC, FORMAT_VERSION] ++ postcard(StoredRecord)`.
    Postcard,
    /// Compact JSON text of the value (no timestamp).
    Json,
    /// The record's value bytes exactly as they arrived (after validation).
    Raw,
    /// A JSON object as a Redis hash: one hash field per top-level field,
    /// its value as text any client reads (FORMAT.md, "The hash store").
    /// In a batch the fields travel packed ([`hash_pairs`]).
    Hash,
}

impl fmt::Display for InputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputFormat::Json => "json",
            InputFormat::Postcard => "postcard",
            InputFormat::Raw => "raw",
        })
    }
}

impl fmt::Display for StoreFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreFormat::Postcard => "postcard",
            StoreFormat::Json => "json",
            StoreFormat::Raw => "raw",
            StoreFormat::Hash => "hash",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("invalid postcard value: {0}")]
    Postcard(String),
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("not an edgecache stored value (bad magic byte)")]
    BadMagic,
    #[error("stored format version {0} is newer than this binary understands")]
    UnknownVersion(u8),
    #[error("bytes cannot be stored as JSON")]
    BytesInJson,
    #[error("field number {0} is not in the field table (<namespace>:fields)")]
    UnknownField(u32),
    #[error("the hash store takes JSON objects only, not {0}")]
    NotAnObject(&'static str),
    #[error("hash field {0} is not valid UTF-8")]
    HashNotUtf8(String),
}

/// Parses one record value as its topic's input format.
pub fn decode_input(format: InputFormat, payload: &[u8]) -> Result<Value, DecodeError> {
    match format {
        InputFormat::Json => json::decode_json(payload),
        InputFormat::Postcard => postcard_serde::decode_bare(payload),
        InputFormat::Raw => Ok(Value::Bytes(payload.to_vec())),
    }
}

/// Encodes a decoded record for Redis. `payload` is the original value bytes,
/// kept verbatim by the raw store format; `fields` is the namespace's field
/// table, which the postcard format refers to (and may add to).
pub fn encode_store(
    format: StoreFormat,
    value: &Value,
    payload: &[u8],
    ts_ms: Option<i64>,
    fields: &mut Fields,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    out.clear();
    match format {
        StoreFormat::Raw => out.extend_from_slice(payload),
        StoreFormat::Json => render::put_json_text(out, value)?,
        StoreFormat::Postcard => {
            postcard::put_header(out, ts_ms);
            postcard::put_value(out, value, fields, 0)?;
        }
        StoreFormat::Hash => hash::put_hash(out, value)?,
    }
    Ok(())
}

/// Decodes a record value and encodes it for Redis in one step; what the
/// pipeline calls. Same bytes and errors as [`decode_input`] followed by
/// [`encode_store`]. JSON stored as postcard (the default pair) takes a
/// direct path that writes the postcard bytes while parsing, without
/// building a [`Value`]: no allocation per string, list or map. Anything
/// that path does not handle (an error, a duplicate object key, nesting past
/// the cap, objects with many keys) is redone by the two-step path, which
/// then decides the outcome.
pub fn transcode(
    input: InputFormat,
    store: StoreFormat,
    payload: &[u8],
    ts_ms: Option<i64>,
    fields: &mut Fields,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    if input == InputFormat::Json
        && store == StoreFormat::Postcard
        && transcode::json_to_stored(payload, ts_ms, fields, out)
    {
        return Ok(());
    }
    let value = decode_input(input, payload)?;
    encode_store(store, &value, payload, ts_ms, fields, out)
}

/// Renders whatever a key holds as JSON, given the store format of the topic
/// that wrote it and the namespace's field table. Used by `edgecache get`.
pub fn stored_to_json(
    format: StoreFormat,
    bytes: &[u8],
    fields: &Fields,
) -> Result<(serde_json::Value, Option<i64>), DecodeError> {
    match format {
        StoreFormat::Postcard => {
            let record = decode_stored(bytes, fields)?;
            Ok((to_json_lossy(&record.value), record.ts_ms))
        }
        StoreFormat::Json => {
            let json =
                serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
            Ok((json, None))
        }
        // `bytes` packed as the batch packs them (`pack_hash_pairs`).
        StoreFormat::Hash => Ok((hash_to_json(hash_pairs(bytes))?, None)),
        // Raw values print as the JSON they contain when they are JSON,
        // otherwise as a string (text) or a hex string (binary).
        StoreFormat::Raw => Ok((
            serde_json::from_slice(bytes).unwrap_or_else(|_| match std::str::from_utf8(bytes) {
                Ok(text) => serde_json::Value::String(text.to_owned()),
                Err(_) => serde_json::Value::String(hex(bytes)),
            }),
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(
            decode_input(InputFormat::Json, b"{\"a\":"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode_input(InputFormat::Postcard, &[0xff, 0xff, 0xff]),
            Err(DecodeError::Postcard(_))
        ));
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert!(decode_input(InputFormat::Json, deep.as_bytes()).is_err());
        let none = Fields::new();
        assert_eq!(decode_stored(b"{}", &none), Err(DecodeError::BadMagic));
        assert_eq!(
            decode_stored(&[MAGIC, 9, 0], &none),
            Err(DecodeError::UnknownVersion(9))
        );
        // A map whose one key is field number 3, which the table lacks.
        assert_eq!(
            decode_stored(&[MAGIC, FORMAT_VERSION, 0, 7, 1, 4, 0], &none),
            Err(DecodeError::UnknownField(3))
        );
        for bad in [
            &[MAGIC, FORMAT_VERSION][..],
            &[MAGIC, FORMAT_VERSION, 2, 0],
            &[MAGIC, FORMAT_VERSION, 0, 1, 2],
            &[MAGIC, FORMAT_VERSION, 0, 0, 0],
            &[MAGIC, FORMAT_VERSION, 0, 6, 200, 1],
            &[MAGIC, FORMAT_VERSION, 0, 4, 1, 0xff],
            &[
                MAGIC,
                FORMAT_VERSION,
                0,
                2,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x7f,
            ],
            &[MAGIC, FORMAT_VERSION, 0, 9],
        ] {
            assert!(
                matches!(decode_stored(bad, &none), Err(DecodeError::Postcard(_))),
                "{}",
                hex(bad)
            );
        }
        let bytes = Value::Bytes(vec![1]);
        let mut out = Vec::new();
        assert_eq!(
            encode_store(
                StoreFormat::Json,
                &bytes,
                b"\x01",
                None,
                &mut Fields::new(),
                &mut out
            ),
            Err(DecodeError::BytesInJson)
        );
    }

    /// Inputs the fuzzers (fuzz/) found changing on the way through.
    #[test]
    fn fuzz_regressions_numbers_keep_their_bits() {
        for text in ["-0", "-0.0", "7.2911220195562235e-304", "[-0.0,1e-320]"] {
            let expected: serde_json::Value = serde_json::from_str(text).unwrap();
            let value = decode_input(InputFormat::Json, text.as_bytes()).unwrap();
            let mut out = Vec::new();
            for store in [StoreFormat::Postcard, StoreFormat::Json] {
                let mut fields = Fields::new();
                encode_store(store, &value, text.as_bytes(), None, &mut fields, &mut out).unwrap();
                let (shown, _) = stored_to_json(store, &out, &fields).unwrap();
                // Display strings differ between -0.0 and 0.0; == does not.
                assert_eq!(
                    shown.to_string(),
                    expected.to_string(),
                    "{text} via {store}"
                );
            }
        }
        // serde_json without float_roundtrip parsed this 1 ULP off.
        let text = "7.2911220195562235e-304";
        let value = decode_input(InputFormat::Json, text.as_bytes()).unwrap();
        assert_eq!(value, Value::Float(text.parse().unwrap()));
    }

    #[test]
    fn json_store_and_raw_store() {
        let payload = br#"{"t": 21.5, "on": true}"#;
        let value = decode_input(InputFormat::Json, payload).unwrap();
        let mut out = Vec::new();
        let mut fields = Fields::new();
        encode_store(
            StoreFormat::Json,
            &value,
            payload,
            Some(5),
            &mut fields,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, br#"{"t":21.5,"on":true}"#);
        encode_store(
            StoreFormat::Raw,
            &value,
            payload,
            Some(5),
            &mut fields,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, payload);
        assert!(fields.is_empty(), "only the postcard format uses the table");
        let (json, ts) = stored_to_json(StoreFormat::Raw, b"\xff\x00", &fields).unwrap();
        assert_eq!((json, ts), (serde_json::json!("ff00"), None));
    }
}
