//! Decoding what arrives from Kafka and encoding what is stored in Redis.
//!
//! This is the only module that derives serde for stored data; FORMAT.md is
//! the normative description of the bytes produced here, and the unit tests
//! at the bottom check its hex vectors.
//!
//! Every decoder here sees outside bytes, so none of them may panic: bad
//! input is an [`DecodeError`] and the pipeline skips and counts the record.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// First byte of every postcard-stored value. Chosen so a stored value is
/// never valid UTF-8 at its start, which tells it apart from JSON or text.
pub const MAGIC: u8 = 0xEC;
/// Version of the stored layout after the magic byte, as written: 2, whose
/// object keys refer to the namespace's field table ([`Fields`]). Version 1
/// (keys inline) is still read.
pub const FORMAT_VERSION: u8 = 2;
/// The first stored layout: like version 2 but every object key inline.
pub const FORMAT_V1: u8 = 1;
/// Most names the field table holds; later names are stored inline. Bounds
/// the table's memory (names are at most [`MAX_FIELD_NAME`] bytes) whatever
/// the data: a map keyed by device id fills it once, then costs nothing.
pub const MAX_FIELDS: usize = 1024;
/// Longest object key that goes into the field table.
pub const MAX_FIELD_NAME: usize = 64;
/// Deepest nesting of lists and maps accepted from outside. Bounds the stack
/// used by every recursive walk below (decode, transcode, print).
pub const MAX_DEPTH: usize = 64;

/// A small self-describing value. postcard itself carries no type tags, so
/// this enum provides them: the variant index is the tag on the wire.
///
/// The order of variants is part of the stored format: never reorder,
/// only append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    /// Keys keep their input order; duplicates are kept as given.
    Map(Vec<(String, Value)>),
    /// `mantissa / 10^scale`, for JSON numbers with a short decimal form
    /// (21.3 is 3 bytes here, 8 as a Float). Chosen only when the division
    /// gives back exactly the same f64, so it is lossless.
    Decimal {
        mantissa: i64,
        scale: u8,
    },
}

/// Largest scale tried; 10^15 and below are exact in f64, so encoder and
/// decoder compute bit-identical results.
const MAX_DECIMAL_SCALE: u8 = 15;

impl Value {
    /// The most compact exact representation of a float.
    pub fn from_f64(f: f64) -> Value {
        if f.is_finite() && f.abs() < 9.0e15 {
            let mut power = 1.0_f64;
            for scale in 0..=MAX_DECIMAL_SCALE {
                let scaled = f * power;
                if scaled.abs() >= 9.0e15 {
                    break;
                }
                let mantissa = scaled.round() as i64;
                // Compared as a reader decodes it and bit for bit: -0.0
                // equals 0.0 but has no integer mantissa, so it stays a Float.
                if decimal_to_f64(mantissa, scale).to_bits() == f.to_bits() {
                    return Value::Decimal { mantissa, scale };
                }
                power *= 10.0;
            }
        }
        Value::Float(f)
    }
}

/// The f64 a Decimal stands for.
pub fn decimal_to_f64(mantissa: i64, scale: u8) -> f64 {
    mantissa as f64 / 10f64.powi(scale.min(MAX_DECIMAL_SCALE) as i32)
}

/// What is stored after the two header bytes in the postcard format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// The Kafka record timestamp (ms since the Unix epoch), if it had one.
    pub ts_ms: Option<i64>,
    pub value: Value,
}

/// The field table of stored format 2: object keys ("field names") by
/// number, so a key that every record repeats ("temp_c", "battery_v") is
/// stored once per namespace, in the Redis hash `<ns>:fields` (number in
/// decimal → name), and in each value as a one- or two-byte number.
///
/// The agent loads the table when it adopts or creates its marker and only
/// ever adds to it. Every apply script carries the entries its values use
/// and writes them in the same atomic step (refusing the batch if Redis has
/// another name under a number), so a value is never readable before the
/// names it refers to, whatever Redis lost or restored meanwhile.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    /// Name by number; `None` for a number Redis did not hold (a gap left
    /// by a restored snapshot), never reused.
    names: Vec<Option<Box<str>>>,
    index: HashMap<Box<str>, u32, BuildHasherDefault<Fnv>>,
    /// Numbers referred to since [`Fields::clear_used`]: the entries the
    /// record being encoded needs in Redis.
    used: Vec<u32>,
}

impl Fields {
    pub fn new() -> Fields {
        Fields::default()
    }

    /// The table as Redis holds it (`HGETALL <ns>:fields`). Entries that
    /// no agent of this version writes (a number that is not decimal or not
    /// below [`MAX_FIELDS`], a name too long) are left out: values that use
    /// them fail to decode rather than decode wrong.
    pub fn from_pairs<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Fields {
        let mut fields = Fields::new();
        for (number, name) in pairs {
            let Ok(id) = number.parse::<u32>() else {
                continue;
            };
            if id as usize >= MAX_FIELDS || name.len() > MAX_FIELD_NAME {
                continue;
            }
            let at = id as usize;
            if fields.names.len() <= at {
                fields.names.resize(at + 1, None);
            }
            let name: Box<str> = name.into();
            fields.index.entry(name.clone()).or_insert(id);
            fields.names[at] = Some(name);
        }
        fields
    }

    /// The name stored under `id`.
    pub fn name(&self, id: u32) -> Option<&str> {
        self.names.get(id as usize)?.as_deref()
    }

    /// How many names the table holds.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The number for `name`, adding it when there is room; `None` means
    /// the key is stored inline. Every number returned is noted as used.
    fn key_ref(&mut self, name: &str) -> Option<u32> {
        let id = match self.index.get(name) {
            Some(&id) => id,
            None => {
                if name.len() > MAX_FIELD_NAME || self.names.len() >= MAX_FIELDS {
                    return None;
                }
                let id = self.names.len() as u32;
                let name: Box<str> = name.into();
                self.names.push(Some(name.clone()));
                self.index.insert(name, id);
                id
            }
        };
        self.used.push(id);
        Some(id)
    }

    /// Numbers used since the last [`Fields::clear_used`] (repeats included).
    pub fn used(&self) -> &[u32] {
        &self.used
    }

    pub fn clear_used(&mut self) {
        self.used.clear();
    }
}

/// FNV-1a, for the field table's lookups: one per object key of every
/// record, on names of a few bytes, where SipHash's setup cost dominates.
/// The table is capped at [`MAX_FIELDS`] entries, so even names chosen to
/// collide cost at most a bounded scan.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

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
        InputFormat::Json => decode_json(payload),
        InputFormat::Postcard => {
            if postcard_too_deep(payload, false) {
                return Err(DecodeError::TooDeep);
            }
            let value: Value =
                postcard::from_bytes(payload).map_err(|e| DecodeError::Postcard(e.to_string()))?;
            check_depth(&value, 0)?;
            Ok(value)
        }
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
        StoreFormat::Json => put_json_text(out, value)?,
        StoreFormat::Postcard => {
            put_header(out, ts_ms);
            put_value(out, value, fields, 0)?;
        }
        StoreFormat::Hash => put_hash(out, value)?,
    }
    Ok(())
}

/// The hash store's fields of a record, packed for the batch as
/// (name, value) pairs, each part a little-endian `u32` length and its
/// bytes. Empty for `{}`: Redis has no empty hash, so the record deletes
/// the key (FORMAT.md). Duplicate names stay; `HSET` keeps the last value.
fn put_hash(out: &mut Vec<u8>, value: &Value) -> Result<(), DecodeError> {
    let Value::Map(entries) = value else {
        return Err(DecodeError::NotAnObject(match value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) | Value::Decimal { .. } => "a number",
            Value::String(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "an array",
            Value::Map(_) => unreachable!(),
        }));
    };
    let mut text = Vec::new();
    for (name, item) in entries {
        text.clear();
        match item {
            Value::String(s) if !hash_text_is_json(s.as_bytes()) => {
                text.extend_from_slice(s.as_bytes())
            }
            _ => put_json_text(&mut text, item)?,
        }
        put_hash_part(out, name.as_bytes());
        put_hash_part(out, &text);
    }
    Ok(())
}

fn put_hash_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_le_bytes());
    out.extend_from_slice(part);
}

/// Packs (name, value) pairs as [`encode_store`] packs the hash store's
/// fields; for a hash read back from Redis.
pub fn pack_hash_pairs<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
{
    let mut out = Vec::new();
    for (name, text) in pairs {
        put_hash_part(&mut out, name);
        put_hash_part(&mut out, text);
    }
    out
}

/// The (name, value) pairs [`encode_store`] packed for the hash store.
pub fn hash_pairs(packed: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    fn part<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let (bytes, tail) = tail.split_at_checked(u32::from_le_bytes(*len) as usize)?;
        *rest = tail;
        Some(bytes)
    }
    let mut rest = packed;
    std::iter::from_fn(move || Some((part(&mut rest)?, part(&mut rest)?)))
}

/// Whether a hash field's stored text is read as JSON (FORMAT.md, "The hash
/// store"): what every non-string value's JSON text starts with, or a JSON
/// word. A string whose own text passes this test is stored quoted; every
/// other string is stored as its bare text, which `HGET` returns as is.
pub fn hash_text_is_json(text: &[u8]) -> bool {
    matches!(text.first(), Some(b'"' | b'{' | b'[' | b'-' | b'0'..=b'9'))
        || matches!(text, b"true" | b"false" | b"null")
}

/// Renders a hash store key's fields (in `HGETALL` order) as the JSON object
/// `edgecache get` prints.
pub fn hash_to_json<'a, I>(pairs: I) -> Result<serde_json::Value, DecodeError>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
{
    let mut object = serde_json::Map::new();
    for (name, text) in pairs {
        let name = std::str::from_utf8(name)
            .map_err(|_| DecodeError::HashNotUtf8(format!("name {}", hex(name))))?;
        let value = if hash_text_is_json(text) {
            serde_json::from_slice(text)
                .map_err(|e| DecodeError::Json(format!("field {name:?}: {e}")))?
        } else {
            serde_json::Value::String(
                std::str::from_utf8(text)
                    .map_err(|_| DecodeError::HashNotUtf8(format!("{name:?}")))?
                    .to_owned(),
            )
        };
        object.insert(name.to_owned(), value);
    }
    Ok(serde_json::Value::Object(object))
}

/// Compact JSON text of a value, appended to `out`: the json store.
fn put_json_text(out: &mut Vec<u8>, value: &Value) -> Result<(), DecodeError> {
    let start = out.len();
    if !put_json(out, value)? {
        out.truncate(start);
        let json = to_json(value)?;
        // Writing into a Vec cannot fail.
        serde_json::to_writer(&mut *out, &json).expect("serialising JSON to memory");
    }
    Ok(())
}

/// `[MAGIC, FORMAT_VERSION]` and the `ts_ms` option.
fn put_header(out: &mut Vec<u8>, ts_ms: Option<i64>) {
    out.extend_from_slice(&[MAGIC, FORMAT_VERSION]);
    match ts_ms {
        None => out.push(0),
        Some(ts) => {
            out.push(1);
            put_varint(out, zigzag(ts));
        }
    }
}

/// One [`Value`] in stored format 2 (FORMAT.md): postcard's encoding of
/// the enum, except that a map key is a field reference.
fn put_value(
    out: &mut Vec<u8>,
    value: &Value,
    fields: &mut Fields,
    depth: usize,
) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    match value {
        Value::Null => out.push(tag::NULL),
        Value::Bool(b) => out.extend_from_slice(&[tag::BOOL, *b as u8]),
        Value::Int(i) => {
            out.push(tag::INT);
            put_varint(out, zigzag(*i));
        }
        Value::Float(f) => {
            out.push(tag::FLOAT);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::String(s) => {
            out.push(tag::STRING);
            put_str(out, s);
        }
        Value::Bytes(b) => {
            out.push(tag::BYTES);
            put_varint(out, b.len() as u64);
            out.extend_from_slice(b);
        }
        Value::List(items) => {
            out.push(tag::LIST);
            put_varint(out, items.len() as u64);
            for item in items {
                put_value(out, item, fields, depth + 1)?;
            }
        }
        Value::Map(entries) => {
            out.push(tag::MAP);
            put_varint(out, entries.len() as u64);
            for (key, item) in entries {
                put_key(out, key, fields);
                put_value(out, item, fields, depth + 1)?;
            }
        }
        Value::Decimal { mantissa, scale } => {
            out.push(tag::DECIMAL);
            put_varint(out, zigzag(*mantissa));
            out.push(*scale);
        }
    }
    Ok(())
}

/// A map key in format 2: the varint of its field number + 1, or `00` and
/// the name inline (too long, or the table is full).
fn put_key(out: &mut Vec<u8>, key: &str, fields: &mut Fields) {
    match fields.key_ref(key) {
        Some(id) => put_varint(out, u64::from(id) + 1),
        None => {
            out.push(0);
            put_str(out, key);
        }
    }
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
        && json_to_stored(payload, ts_ms, fields, out)
    {
        return Ok(());
    }
    let value = decode_input(input, payload)?;
    encode_store(store, &value, payload, ts_ms, fields, out)
}

/// postcard's encoding of each [`Value`] variant's tag (its index).
mod tag {
    pub const NULL: u8 = 0;
    pub const BOOL: u8 = 1;
    pub const INT: u8 = 2;
    pub const FLOAT: u8 = 3;
    pub const STRING: u8 = 4;
    pub const BYTES: u8 = 5;
    pub const LIST: u8 = 6;
    pub const MAP: u8 = 7;
    pub const DECIMAL: u8 = 8;
}

/// The fast path of [`transcode`]: `[MAGIC, FORMAT_VERSION]` and the
/// postcard of `StoredRecord`, written as serde_json parses. False when the
/// two-step path must decide (see [`transcode`]); `out` is then garbage.
fn json_to_stored(
    payload: &[u8],
    ts_ms: Option<i64>,
    fields: &mut Fields,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    put_header(out, ts_ms);
    // Reading bytes, serde_json checks UTF-8 string by string; one check of
    // the whole payload is cheaper, and for valid UTF-8 both readers give
    // the same result (invalid UTF-8 is left to the two-step path).
    let Ok(text) = std::str::from_utf8(payload) else {
        return false;
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    Transcoder {
        out,
        fields,
        depth: 0,
    }
    .deserialize(&mut deserializer)
    .and_then(|()| deserializer.end())
    .is_ok()
}

/// postcard's varint: unsigned LEB128.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

/// Lists and maps are written before their length is known: one byte is
/// reserved, which holds counts below 128; larger counts shift the rest.
fn patch_count(out: &mut Vec<u8>, at: usize, count: u64) {
    if count < 0x80 {
        out[at] = count as u8;
    } else {
        let mut varint = Vec::with_capacity(10);
        put_varint(&mut varint, count);
        out.splice(at..at + 1, varint);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A JSON number that is not an i64: the same choice as `Value::from_f64`.
fn put_f64(out: &mut Vec<u8>, f: f64) {
    if let Value::Decimal { mantissa, scale } = Value::from_f64(f) {
        out.push(tag::DECIMAL);
        put_varint(out, zigzag(mantissa));
        out.push(scale);
    } else {
        out.push(tag::FLOAT);
        out.extend_from_slice(&f.to_le_bytes());
    }
}

/// Why the fast path gave up; never shown (the two-step path redoes it).
fn give_up<E: serde::de::Error>() -> E {
    E::custom("left to the two-step path")
}

/// Writes one JSON value at `depth` as a postcard [`Value`].
struct Transcoder<'a> {
    out: &'a mut Vec<u8>,
    fields: &'a mut Fields,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Transcoder<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.depth > MAX_DEPTH {
            return Err(give_up::<D::Error>());
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Transcoder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.push(tag::NULL);
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.out.extend_from_slice(&[tag::BOOL, b as u8]);
        Ok(())
    }

    fn visit_i64<E>(self, i: i64) -> Result<(), E> {
        self.out.push(tag::INT);
        put_varint(self.out, zigzag(i));
        Ok(())
    }

    fn visit_u64<E>(self, u: u64) -> Result<(), E> {
        match i64::try_from(u) {
            Ok(i) => {
                self.out.push(tag::INT);
                put_varint(self.out, zigzag(i));
            }
            Err(_) => put_f64(self.out, u as f64),
        }
        Ok(())
    }

    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        if f.is_finite() {
            put_f64(self.out, f);
        } else {
            self.out.push(tag::NULL);
        }
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        self.out.push(tag::STRING);
        put_str(self.out, s);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.extend_from_slice(&[tag::LIST, 0]);
        let count_at = self.out.len() - 1;
        let mut count = 0u64;
        while seq
            .next_element_seed(Transcoder {
                out: &mut *self.out,
                fields: &mut *self.fields,
                depth: self.depth + 1,
            })?
            .is_some()
        {
            count += 1;
        }
        patch_count(self.out, count_at, count);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.extend_from_slice(&[tag::MAP, 0]);
        let count_at = self.out.len() - 1;
        // Where each key's bytes are in `out`, to find a duplicate key (its
        // value must replace the first one's in place, which this path
        // cannot do). Only positions before the current key are kept, and
        // nothing before them moves.
        let mut keys = [(0usize, 0usize); LINEAR_KEY_SCAN];
        let mut count = 0usize;
        while let Some((start, end)) =
            map.next_key_seed(KeyWriter(&mut *self.out, &mut *self.fields))?
        {
            if count == LINEAR_KEY_SCAN {
                return Err(give_up::<A::Error>());
            }
            let key = &self.out[start..end];
            if keys[..count].iter().any(|&(s, e)| &self.out[s..e] == key) {
                return Err(give_up::<A::Error>());
            }
            keys[count] = (start, end);
            count += 1;
            map.next_value_seed(Transcoder {
                out: &mut *self.out,
                fields: &mut *self.fields,
                depth: self.depth + 1,
            })?;
        }
        patch_count(self.out, count_at, count as u64);
        Ok(())
    }
}

/// Writes an object key (see [`put_key`]); returns where its bytes are.
/// A name always gets the same bytes within a record (the table only
/// grows), so equal bytes mean a duplicate key.
struct KeyWriter<'a>(&'a mut Vec<u8>, &'a mut Fields);

impl<'de> DeserializeSeed<'de> for KeyWriter<'_> {
    type Value = (usize, usize);

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<(usize, usize), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyWriter<'_> {
    type Value = (usize, usize);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, s: &str) -> Result<(usize, usize), E> {
        let start = self.0.len();
        put_key(self.0, s, self.1);
        Ok((start, self.0.len()))
    }
}

/// Decodes a postcard-stored value (header included). `fields` is the
/// namespace's field table, read after the value (names are written no
/// later than the values that use them); format 1 values do not use it.
pub fn decode_stored(bytes: &[u8], fields: &Fields) -> Result<StoredRecord, DecodeError> {
    match bytes {
        [MAGIC, FORMAT_V1, rest @ ..] => {
            if postcard_too_deep(rest, true) {
                return Err(DecodeError::TooDeep);
            }
            let record: StoredRecord =
                postcard::from_bytes(rest).map_err(|e| DecodeError::Postcard(e.to_string()))?;
            check_depth(&record.value, 0)?;
            Ok(record)
        }
        [MAGIC, FORMAT_VERSION, rest @ ..] => {
            let mut reader = Reader {
                bytes: rest,
                fields,
            };
            let ts_ms = match reader.varint()? {
                0 => None,
                1 => Some(unzigzag(reader.varint()?)),
                n => return Err(malformed(format!("timestamp option {n}"))),
            };
            let value = reader.value(0)?;
            if !reader.bytes.is_empty() {
                return Err(malformed(format!(
                    "{} bytes after the value",
                    reader.bytes.len()
                )));
            }
            Ok(StoredRecord { ts_ms, value })
        }
        [MAGIC, version, ..] => Err(DecodeError::UnknownVersion(*version)),
        _ => Err(DecodeError::BadMagic),
    }
}

fn malformed(what: String) -> DecodeError {
    DecodeError::Postcard(what)
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Reads stored format 2. Recursion is bounded by [`MAX_DEPTH`], checked
/// before each level, so hostile bytes cannot exhaust the stack.
struct Reader<'a> {
    bytes: &'a [u8],
    fields: &'a Fields,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or_else(|| malformed("length beyond the end".into()))?;
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// postcard's varint of a u64: at most 10 bytes, no bits beyond 64.
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut n = 0u64;
        for i in 0..10 {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && bits > 1 {
                break;
            }
            n |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(malformed("bad varint".into()))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.varint()?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| malformed("string is not UTF-8".into()))
    }

    /// A count of items, each at least one byte: a count beyond the bytes
    /// left is an error before anything is allocated for it.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or_else(|| malformed(format!("count {n} beyond the end")))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let tag = self.varint()?;
        Ok(match tag {
            0 => Value::Null,
            1 => match self.byte()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(malformed(format!("bool byte {b}"))),
            },
            2 => Value::Int(unzigzag(self.varint()?)),
            3 => {
                let bytes: [u8; 8] = self.take(8)?.try_into().expect("8 bytes taken");
                Value::Float(f64::from_le_bytes(bytes))
            }
            4 => Value::String(self.string()?),
            5 => {
                let len = self.varint()?;
                Value::Bytes(self.take(len)?.to_vec())
            }
            6 => {
                let n = self.count()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::List(items)
            }
            7 => {
                let n = self.count()?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let key = match self.varint()? {
                        0 => self.string()?,
                        n => {
                            let id = u32::try_from(n - 1).unwrap_or(u32::MAX);
                            self.fields
                                .name(id)
                                .ok_or(DecodeError::UnknownField(id))?
                                .to_owned()
                        }
                    };
                    entries.push((key, self.value(depth + 1)?));
                }
                Value::Map(entries)
            }
            8 => {
                let mantissa = unzigzag(self.varint()?);
                let scale = self.byte()?;
                Value::Decimal { mantissa, scale }
            }
            other => return Err(malformed(format!("unknown tag {other}"))),
        })
    }
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

/// Parses JSON text straight into a [`Value`], with no `serde_json::Value`
/// tree in between (that tree, an `IndexMap` per object, cost about a third
/// of the agent's CPU during a rehydrate; BENCHMARKS.md).
///
/// The result is exactly what parsing into `serde_json::Value` (with
/// `preserve_order`) and converting would give, errors included: the same
/// parser reports the same syntax and recursion-limit errors, a duplicate
/// object key keeps its first position with the last value (as `IndexMap`
/// does), and anything nested deeper than [`MAX_DEPTH`] is still parsed
/// (and dropped) so that a syntax error later in the text, or serde_json's
/// own recursion limit, wins over [`DecodeError::TooDeep`], as before.
fn decode_json(payload: &[u8]) -> Result<Value, DecodeError> {
    let too_deep = Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let value = JsonSeed {
        depth: 0,
        too_deep: &too_deep,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value))
    .map_err(|e| DecodeError::Json(e.to_string()))?;
    if too_deep.get() {
        return Err(DecodeError::TooDeep);
    }
    Ok(value)
}

/// Objects with more keys than this find duplicates through a hash index
/// instead of a linear scan, so a huge object cannot cost quadratic time.
const LINEAR_KEY_SCAN: usize = 16;

/// One JSON value at `depth`; sets `too_deep` instead of failing so that
/// parsing goes on (see [`decode_json`]), and collects nothing once set.
#[derive(Clone, Copy)]
struct JsonSeed<'a> {
    depth: usize,
    too_deep: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for JsonSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        // Past the cap the text is still parsed through deserialize_any (not
        // IgnoredAny, which skips without serde_json's recursion limit) so
        // the errors stay the same; the value is thrown away.
        if self.depth > MAX_DEPTH {
            self.too_deep.set(true);
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }

    /// u64 beyond i64 becomes a float, as in JavaScript.
    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::from_f64(u as f64),
        })
    }

    /// serde_json turns a non-finite float into null (its `Number` cannot
    /// hold one; its parser does not produce one either).
    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(if f.is_finite() {
            Value::from_f64(f)
        } else {
            Value::Null
        })
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let item = JsonSeed {
            depth: self.depth + 1,
            ..self
        };
        let mut items = Vec::new();
        while let Some(value) = seq.next_element_seed(item)? {
            if !self.too_deep.get() {
                items.push(value);
            }
        }
        Ok(Value::List(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let field = JsonSeed {
            depth: self.depth + 1,
            ..self
        };
        let mut fields: Vec<(String, Value)> = Vec::new();
        let mut index: Option<HashMap<String, usize>> = None;
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(field)?;
            if self.too_deep.get() {
                continue;
            }
            let existing = match &index {
                Some(index) => index.get(&key).copied(),
                None => fields.iter().position(|(k, _)| *k == key),
            };
            match existing {
                Some(at) => fields[at].1 = value,
                None => {
                    if let Some(index) = &mut index {
                        index.insert(key.clone(), fields.len());
                    }
                    fields.push((key, value));
                    if index.is_none() && fields.len() > LINEAR_KEY_SCAN {
                        let all = fields.iter().enumerate();
                        index = Some(all.map(|(at, (k, _))| (k.clone(), at)).collect());
                    }
                }
            }
        }
        Ok(Value::Map(fields))
    }
}

fn check_depth(value: &Value, depth: usize) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    match value {
        Value::List(items) => items.iter().try_for_each(|v| check_depth(v, depth + 1)),
        Value::Map(fields) => fields
            .iter()
            .try_for_each(|(_, v)| check_depth(v, depth + 1)),
        _ => Ok(()),
    }
}

/// True when postcard bytes nest lists/maps deeper than [`MAX_DEPTH`]
/// (the same rule as [`check_depth`]). postcard decodes a [`Value`] by
/// recursing once per level before `check_depth` could look, so a record of
/// a million nested lists would overflow the stack and abort the agent; this
/// walk is iterative and runs first. It follows FORMAT.md's layout (after the
/// `ts_ms` option when `with_timestamp`) only to find the nesting: where it
/// cannot follow the bytes, postcard rejects them anyway, so it says false.
fn postcard_too_deep(bytes: &[u8], with_timestamp: bool) -> bool {
    fn varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..70).step_by(7) {
            let (&byte, rest) = bytes.split_first()?;
            *bytes = rest;
            n |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            if byte & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }
    fn skip(bytes: &mut &[u8], n: u64) -> Option<()> {
        let n = usize::try_from(n).ok().filter(|n| *n <= bytes.len())?;
        *bytes = &bytes[n..];
        Some(())
    }
    fn walk(mut bytes: &[u8], with_timestamp: bool) -> Option<bool> {
        if with_timestamp && varint(&mut bytes)? == 1 {
            varint(&mut bytes)?;
        }
        // Per open level: values still to read, and whether each is a map
        // entry (a String key first). The bottom entry is the top value.
        let mut levels: Vec<(u64, bool)> = vec![(1, false)];
        while let Some(level) = levels.last_mut() {
            if level.0 == 0 {
                levels.pop();
                continue;
            }
            level.0 -= 1;
            if level.1 {
                let key_len = varint(&mut bytes)?;
                skip(&mut bytes, key_len)?;
            }
            // The value about to be read sits at depth levels.len() - 1.
            if levels.len() - 1 > MAX_DEPTH {
                return Some(true);
            }
            match varint(&mut bytes)? {
                0 => {}
                1 => skip(&mut bytes, 1)?,
                2 => {
                    varint(&mut bytes)?;
                }
                3 => skip(&mut bytes, 8)?,
                4 | 5 => {
                    let len = varint(&mut bytes)?;
                    skip(&mut bytes, len)?;
                }
                tag @ (6 | 7) => {
                    let count = varint(&mut bytes)?;
                    levels.push((count, tag == 7));
                }
                8 => {
                    varint(&mut bytes)?;
                    skip(&mut bytes, 1)?;
                }
                _ => return None,
            }
        }
        Some(false)
    }
    walk(bytes, with_timestamp).unwrap_or(false)
}

/// Strict conversion for the JSON store format: bytes and non-finite floats
/// have no JSON form, so such records are rejected rather than altered.
fn to_json(value: &Value) -> Result<serde_json::Value, DecodeError> {
    Ok(match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .ok_or_else(|| DecodeError::Json(format!("{f} has no JSON form")))?,
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Bytes(_) => return Err(DecodeError::BytesInJson),
        Value::Decimal { mantissa, scale } => {
            return to_json(&Value::Float(decimal_to_f64(*mantissa, *scale)))
        }
        Value::List(items) => {
            serde_json::Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Value::Map(fields) => serde_json::Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), to_json(v)?)))
                .collect::<Result<_, DecodeError>>()?,
        ),
    })
}

/// The JSON store's bytes for `value` written straight from it: what
/// `serde_json::to_writer(to_json(value))` writes, without building that
/// tree (a String copy per string, an IndexMap with a hash per object key):
/// about a third of the agent's CPU per record with store = json. Same
/// errors, found in the same depth-first order. False when an object has a
/// repeated key: serde_json's map keeps its first position and last value,
/// and the caller leaves that rare case to the tree.
fn put_json(out: &mut Vec<u8>, value: &Value) -> Result<bool, DecodeError> {
    // Writing into a Vec cannot fail.
    fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
        serde_json::to_writer(&mut *out, v).expect("serialising JSON to memory");
    }
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) => write(out, i),
        Value::Float(f) => {
            if !f.is_finite() {
                return Err(DecodeError::Json(format!("{f} has no JSON form")));
            }
            write(out, f)
        }
        Value::Decimal { mantissa, scale } => {
            return put_json(out, &Value::Float(decimal_to_f64(*mantissa, *scale)))
        }
        Value::String(s) => write(out, s.as_str()),
        Value::Bytes(_) => return Err(DecodeError::BytesInJson),
        Value::List(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if !put_json(out, item)? {
                    return Ok(false);
                }
            }
            out.push(b']');
        }
        Value::Map(entries) => {
            let repeated = if entries.len() <= 16 {
                entries
                    .iter()
                    .enumerate()
                    .any(|(i, (k, _))| entries[..i].iter().any(|(seen, _)| seen == k))
            } else {
                let mut seen = std::collections::HashSet::with_capacity(entries.len());
                !entries.iter().all(|(k, _)| seen.insert(k.as_str()))
            };
            if repeated {
                return Ok(false);
            }
            out.push(b'{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(out, key.as_str());
                out.push(b':');
                if !put_json(out, item)? {
                    return Ok(false);
                }
            }
            out.push(b'}');
        }
    }
    Ok(true)
}

/// Display conversion for `edgecache get`: bytes print as a hex string and
/// non-finite floats as null, so any stored value can be shown.
pub fn to_json_lossy(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Bytes(b) => serde_json::Value::String(hex(b)),
        Value::Decimal { mantissa, scale } => {
            to_json_lossy(&Value::Float(decimal_to_f64(*mantissa, *scale)))
        }
        Value::List(items) => serde_json::Value::Array(items.iter().map(to_json_lossy).collect()),
        Value::Map(fields) => serde_json::Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), to_json_lossy(v)))
                .collect(),
        ),
    }
}

/// Lowercase hex, used for binary values and in log lines about bad keys.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON path before `decode_json`: parse into `serde_json::Value`,
    /// then convert. Kept as the oracle that `decode_json` must match.
    fn reference_decode(payload: &[u8]) -> Result<Value, DecodeError> {
        let json: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
        from_json(json, 0)
    }

    fn from_json(json: serde_json::Value, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        Ok(match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                // u64 beyond i64 and all fractions become floats, as in JavaScript.
                None => Value::from_f64(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(items) => Value::List(
                items
                    .into_iter()
                    .map(|item| from_json(item, depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
            serde_json::Value::Object(fields) => Value::Map(
                fields
                    .into_iter()
                    .map(|(k, v)| Ok((k, from_json(v, depth + 1)?)))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    fn from_hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// The stored bytes by both paths, checked equal; the direct path must
    /// be the one that produced them.
    /// Both start from an empty field table, which is returned.
    fn store_postcard(json: &str, ts_ms: Option<i64>) -> (Vec<u8>, Fields) {
        let value = decode_input(InputFormat::Json, json.as_bytes()).unwrap();
        let mut out = Vec::new();
        let mut fields = Fields::new();
        encode_store(
            StoreFormat::Postcard,
            &value,
            json.as_bytes(),
            ts_ms,
            &mut fields,
            &mut out,
        )
        .unwrap();
        let mut direct = Vec::new();
        let mut direct_fields = Fields::new();
        assert!(
            json_to_stored(json.as_bytes(), ts_ms, &mut direct_fields, &mut direct),
            "{json} left the direct path"
        );
        assert_eq!(hex(&direct), hex(&out), "{json}");
        (out, fields)
    }

    /// The vectors of FORMAT.md, section "Test vectors". If one of these
    /// changes, the stored format changed: bump FORMAT_VERSION instead.
    #[test]
    fn format_md_vectors() {
        let format_md = include_str!("../FORMAT.md");
        let (mut n_checked, mut n_written) = (0, 0);
        for line in format_md.lines() {
            // Vector lines look like: | `{"on":true}` | 1700000000000 | `ec 01 ...` |
            // Format 2 rows have a fourth column: the field table.
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if !(5..=6).contains(&cells.len())
                || !cells[1].starts_with('`')
                || !cells[3].starts_with('`')
            {
                continue;
            }
            let json = cells[1].trim_matches('`');
            let ts = match cells[2] {
                "none" => None,
                n => Some(n.parse().unwrap()),
            };
            let expected = from_hex(cells[3].trim_matches('`'));
            // Format 1 vectors are only read now; format 2 ones are also
            // written, each starting from an empty field table.
            let fields = if expected[1] == FORMAT_VERSION {
                let (stored, fields) = store_postcard(json, ts);
                assert_eq!(hex(&stored), hex(&expected), "vector for {json}");
                let table: Vec<String> = (0..fields.len() as u32)
                    .map(|id| format!("{id} = \"{}\"", fields.name(id).unwrap()))
                    .collect();
                let table = if table.is_empty() {
                    "(empty)".to_owned()
                } else {
                    table.join(", ")
                };
                assert_eq!(
                    cells.get(4).copied(),
                    Some(table.as_str()),
                    "table for {json}"
                );
                n_written += 1;
                fields
            } else {
                Fields::new()
            };
            let record = decode_stored(&expected, &fields).unwrap();
            assert_eq!(record.ts_ms, ts);
            let original: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(to_json_lossy(&record.value), original);
            n_checked += 1;
        }
        assert!(n_checked >= 10, "FORMAT.md lost its vectors ({n_checked})");
        assert!(n_written >= 5, "FORMAT.md lost its format 2 vectors");
    }

    #[test]
    fn round_trip_every_variant() {
        let value = Value::Map(vec![
            ("n".into(), Value::Null),
            ("b".into(), Value::Bool(false)),
            ("i".into(), Value::Int(-300)),
            ("f".into(), Value::Float(1.5)),
            ("s".into(), Value::String("héllo".into())),
            ("y".into(), Value::Bytes(vec![0, 255])),
            ("l".into(), Value::List(vec![Value::Int(1), Value::Null])),
            ("d".into(), Value::from_f64(-21.3)),
        ]);
        let mut out = Vec::new();
        let mut fields = Fields::new();
        encode_store(
            StoreFormat::Postcard,
            &value,
            b"",
            Some(-1),
            &mut fields,
            &mut out,
        )
        .unwrap();
        assert_eq!(fields.len(), 8);
        let back = decode_stored(&out, &fields).unwrap();
        assert_eq!(back.value, value);
        assert_eq!(back.ts_ms, Some(-1));
        // The bare value is also what the postcard input format accepts.
        let bare = postcard::to_allocvec(&value).unwrap();
        assert_eq!(decode_input(InputFormat::Postcard, &bare).unwrap(), value);
    }

    #[test]
    fn field_table_is_capped_and_other_keys_stay_inline() {
        let mut fields = Fields::new();
        for i in 0..MAX_FIELDS {
            assert_eq!(fields.key_ref(&format!("f{i}")), Some(i as u32));
        }
        // Past the cap, and names too long, are stored inline; a duplicate
        // of an inline key is still found (the direct path gives up).
        let long = "x".repeat(MAX_FIELD_NAME + 1);
        for json in [
            format!(r#"{{"f0":1,"new":2,"{long}":3}}"#),
            format!(r#"{{"f0":1,"new":2,"{long}":3,"new":4}}"#),
        ] {
            let mut out = Vec::new();
            let (json_in, store) = (InputFormat::Json, StoreFormat::Postcard);
            transcode(json_in, store, json.as_bytes(), None, &mut fields, &mut out).unwrap();
            assert_eq!(fields.len(), MAX_FIELDS);
            let record = decode_stored(&out, &fields).unwrap();
            let expected: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(to_json_lossy(&record.value), expected);
        }
        // As loaded from Redis: entries no agent writes are left out, a gap
        // stays a gap, and new names are numbered after the highest.
        let pairs = [
            ("0", "a"),
            ("5", "b"),
            ("x", "c"),
            ("1024", "d"),
            ("2", &long),
        ];
        let mut loaded = Fields::from_pairs(pairs.map(|(n, s)| (n.to_owned(), s.to_owned())));
        assert_eq!((loaded.name(0), loaded.name(5)), (Some("a"), Some("b")));
        assert_eq!(
            (loaded.name(1), loaded.name(2), loaded.len()),
            (None, None, 2)
        );
        assert_eq!(loaded.key_ref("e"), Some(6));
        assert_eq!(loaded.key_ref("a"), Some(0));
        assert_eq!(loaded.used(), &[6, 0]);
    }

    #[test]
    fn decimals_are_exact_and_compact() {
        for f in [
            21.3,
            -0.1,
            1e-7,
            45.25,
            123456.789,
            0.30000000000000004,
            1e300,
            2.5e-300,
        ] {
            let value = Value::from_f64(f);
            let back = match value {
                Value::Decimal { mantissa, scale } => decimal_to_f64(mantissa, scale),
                Value::Float(g) => g,
                ref other => panic!("{other:?}"),
            };
            assert_eq!(back.to_bits(), f.to_bits(), "{f} -> {value:?}");
        }
        assert_eq!(
            Value::from_f64(21.3),
            Value::Decimal {
                mantissa: 213,
                scale: 1
            }
        );
        assert!(matches!(Value::from_f64(1e300), Value::Float(_)));
    }

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

    /// Edge cases and generated documents (fixed seed) for the JSON paths.
    fn json_cases() -> Vec<String> {
        let deep = |n: usize, inner: &str| "[".repeat(n) + inner + &"]".repeat(n);
        let mut cases: Vec<String> = [
            r#"{"device":"sensor-1","temp_c":21.3,"rssi":-67,"online":true,"alarms":[]}"#,
            r#"{"a":1,"b":2,"a":3}"#,
            r#"{"a":{"x":1},"a":null,"b":[1,{"c":2,"c":3}]}"#,
            "18446744073709551615",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-0",
            "-0.0",
            "1.0",
            "1e2",
            "0.30000000000000004",
            "1e300",
            "1e400",
            "-1e-400",
            r#""esc\u00e9\n\"q\"""#,
            r#""\ud800""#,
            "  null  ",
            "true false",
            "[1,2,",
            "{\"a\"}",
            "",
            "{}",
            "[]",
            "\u{feff}{}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for n in [
            MAX_DEPTH - 1,
            MAX_DEPTH,
            MAX_DEPTH + 1,
            MAX_DEPTH + 2,
            127,
            128,
            129,
            200,
        ] {
            cases.push(deep(n, ""));
            cases.push(deep(n, "1"));
            cases.push(deep(n, "1") + ",");
            cases.push(format!("[{},x]", deep(n, "")));
        }
        let big: Vec<String> = (0..40).map(|i| format!("\"k{}\":{i}", i % 23)).collect();
        cases.push(format!("{{{}}}", big.join(",")));
        // Generated documents: nested maps and lists of mixed scalars with
        // repeated keys, from a fixed seed.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        fn gen(next: &mut dyn FnMut(u64) -> u64, depth: u32) -> String {
            match if depth > 4 { next(6) } else { next(8) } {
                0 => "null".into(),
                1 => (next(2) == 0).to_string(),
                2 => format!("{}", next(u64::MAX) as i64),
                3 => format!("{}.{}", next(100000) as i64 - 50000, next(1000)),
                4 => format!("{}e{}", next(1000), next(40) as i64 - 20),
                5 => format!("\"s{}\"", next(100)),
                6 => {
                    let items: Vec<String> = (0..next(5)).map(|_| gen(next, depth + 1)).collect();
                    format!("[{}]", items.join(","))
                }
                _ => {
                    let fields: Vec<String> = (0..next(6))
                        .map(|_| format!("\"f{}\":{}", next(4), gen(next, depth + 1)))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }
            }
        }
        let many: Vec<String> = (0..200).map(|i| format!("{i}.5")).collect();
        cases.push(format!("[{}]", many.join(",")));
        cases.push(format!(
            "{{\"long\":\"{}\",\"x\":[[{}]]}}",
            "é".repeat(100),
            many.join(",")
        ));
        // Keys after a count that needed more than one byte (the bytes
        // before them moved), with and without a duplicate.
        cases.push(format!("{{\"a\":[{}],\"b\":1,\"a\":2}}", many.join(",")));
        cases.push(format!("{{\"a\":[{}],\"b\":1,\"c\":2}}", many.join(",")));
        let wide: Vec<String> = (0..17).map(|i| format!("\"k{i}\":{i}")).collect();
        cases.push(format!("{{{}}}", wide.join(",")));
        cases.push(format!("{{{}}}", wide[..16].join(",")));
        for _ in 0..2000 {
            cases.push(gen(&mut next, 0));
        }
        cases
    }

    /// The direct path writes these tags itself: they must be the variant
    /// indexes serde gives `Value`.
    #[test]
    fn direct_path_tags_are_the_value_variant_indexes() {
        let tags = [
            (Value::Null, tag::NULL),
            (Value::Bool(true), tag::BOOL),
            (Value::Int(1), tag::INT),
            (Value::Float(0.5), tag::FLOAT),
            (Value::String(String::new()), tag::STRING),
            (Value::List(vec![]), tag::LIST),
            (Value::Map(vec![]), tag::MAP),
            (
                Value::Decimal {
                    mantissa: 1,
                    scale: 1,
                },
                tag::DECIMAL,
            ),
        ];
        for (value, tag) in tags {
            assert_eq!(postcard::to_allocvec(&value).unwrap()[0], tag, "{value:?}");
        }
    }

    /// `decode_json` against the old two-step path, value and error alike.
    #[test]
    fn direct_json_decoding_matches_the_serde_json_value_path() {
        for case in &json_cases() {
            let direct = decode_json(case.as_bytes());
            let reference = reference_decode(case.as_bytes());
            // Compare the Debug text, not ==, so -0.0 and 0.0 are told apart.
            assert_eq!(
                format!("{direct:?}"),
                format!("{reference:?}"),
                "input {case}"
            );
        }
    }

    /// postcard decodes recursively, so nesting must be refused before it
    /// runs: a stack overflow aborts the agent, it is not an error. Found by
    /// fuzz/postcard_input with inputs over 4 KiB.
    #[test]
    fn deep_postcard_nesting_is_an_error_not_a_stack_overflow() {
        // 2 MB each: `06 01` is a one-element List, `07 01 01 6b` a
        // one-entry Map with key "k".
        for level in [&[6u8, 1][..], &[7, 1, 1, b'k']] {
            let mut bare = level.repeat(1_000_000 / level.len() * 2);
            bare.push(0);
            assert_eq!(
                decode_input(InputFormat::Postcard, &bare),
                Err(DecodeError::TooDeep)
            );
            // Format 1 goes through postcard's decoder, format 2 through
            // edgecache's own (where the map key is a field reference).
            let mut fields = Fields::new();
            let id = fields.key_ref("k").unwrap();
            let v2_level = [7, 1, id as u8 + 1];
            let v2_bare = if level[0] == 7 {
                v2_level.repeat(1_000_000 / 3 * 2)
            } else {
                bare.clone()
            };
            for (version, bare) in [(FORMAT_V1, &bare), (FORMAT_VERSION, &v2_bare)] {
                let mut stored = vec![MAGIC, version, 0];
                stored.extend_from_slice(bare);
                assert_eq!(decode_stored(&stored, &fields), Err(DecodeError::TooDeep));
                assert_eq!(
                    stored_to_json(StoreFormat::Postcard, &stored, &fields).map(|_| ()),
                    Err(DecodeError::TooDeep)
                );
            }
        }
    }

    /// `transcode` (with its direct JSON -> postcard path) against decoding
    /// and encoding in two steps: same bytes, same errors, every format.
    #[test]
    fn transcode_matches_decode_then_encode() {
        let formats = [StoreFormat::Postcard, StoreFormat::Json, StoreFormat::Raw];
        let mut payloads: Vec<Vec<u8>> = json_cases().into_iter().map(String::into_bytes).collect();
        // Invalid UTF-8, inside and outside strings.
        payloads.extend([
            b"\"\xff\"".to_vec(),
            b"[1,\"a\xc3\"]".to_vec(),
            b"\xff".to_vec(),
            b"{\"k\":1} \xff".to_vec(),
        ]);
        for (i, payload) in payloads.iter().enumerate() {
            let case = String::from_utf8_lossy(payload);
            let ts = [
                None,
                Some(0),
                Some(-1),
                Some(1_767_225_600_000),
                Some(i64::MIN),
            ][i % 5];
            for store in formats {
                let mut direct = vec![1, 2, 3];
                let mut fields = Fields::new();
                let direct_result = transcode(
                    InputFormat::Json,
                    store,
                    payload,
                    ts,
                    &mut fields,
                    &mut direct,
                );
                // The table as transcode left it: when the direct path gave
                // up midway it numbered names in its own order, and the
                // bytes can only match with the same numbers.
                let mut fields = fields.clone();
                let mut two_step = Vec::new();
                let two_step_result = decode_input(InputFormat::Json, payload)
                    .and_then(|v| encode_store(store, &v, payload, ts, &mut fields, &mut two_step));
                assert_eq!(direct_result, two_step_result, "input {case} ({store})");
                if two_step_result.is_ok() {
                    assert_eq!(hex(&direct), hex(&two_step), "input {case} ({store})");
                }
            }
        }
    }

    /// The json store's direct writer against the serde_json tree it
    /// replaces: same bytes, same errors, on every JSON case and on values
    /// no JSON input gives (bytes, non-finite floats, repeated keys deep down).
    #[test]
    fn put_json_matches_the_serde_json_tree() {
        let mut values: Vec<Value> = json_cases()
            .iter()
            .filter_map(|c| decode_input(InputFormat::Json, c.as_bytes()).ok())
            .collect();
        let dup = Value::Map(vec![
            ("a".into(), Value::Int(1)),
            ("b".into(), Value::Int(2)),
            ("a".into(), Value::Int(3)),
        ]);
        let many: Vec<(String, Value)> = (0..40)
            .map(|i| (format!("k{}", i % 39), Value::Int(i)))
            .collect();
        values.extend([
            Value::Bytes(vec![1]),
            Value::Float(f64::NAN),
            Value::Float(f64::NEG_INFINITY),
            Value::Float(-0.0),
            Value::Decimal {
                mantissa: -215,
                scale: 1,
            },
            Value::List(vec![Value::Int(1), Value::Bytes(vec![]), dup.clone()]),
            Value::List(vec![Value::Int(1), dup.clone(), Value::Bytes(vec![])]),
            Value::Map(vec![("x".into(), dup), ("y".into(), Value::Null)]),
            Value::Map(many),
            Value::String("\u{1}\"\\\u{7f}é😀".into()),
        ]);
        for value in values {
            let mut direct = Vec::new();
            let direct_result = put_json(&mut direct, &value);
            let tree = to_json(&value)
                .map(|j| serde_json::to_vec(&j).expect("serialising JSON to memory"));
            match (direct_result, tree) {
                (Ok(true), Ok(bytes)) => assert_eq!(direct, bytes, "{value:?}"),
                // Repeated keys: the caller redoes it with the tree.
                (Ok(false), _) => {}
                (Err(a), Err(b)) => assert_eq!(a, b, "{value:?}"),
                (a, b) => panic!("{value:?}: direct {a:?}, tree {b:?}"),
            }
        }
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

    /// The hash store's texts (FORMAT.md): strings bare unless they would
    /// read as JSON, everything else compact JSON; `{}` packs to nothing;
    /// a value that is not an object is refused.
    #[test]
    fn hash_store_texts() {
        let text = r#"{"s":"online","n":21.5,"q":"1.0","t":"true","e":"","o":{"a":[1]},"b":false,"z":null,"u":"tru"}"#;
        let value = decode_input(InputFormat::Json, text.as_bytes()).unwrap();
        let mut fields = Fields::new();
        let mut out = Vec::new();
        encode_store(StoreFormat::Hash, &value, b"", None, &mut fields, &mut out).unwrap();
        let pairs: Vec<(&[u8], &[u8])> = hash_pairs(&out).collect();
        let expected: [(&[u8], &[u8]); 9] = [
            (b"s", b"online"),
            (b"n", b"21.5"),
            (b"q", b"\"1.0\""),
            (b"t", b"\"true\""),
            (b"e", b""),
            (b"o", br#"{"a":[1]}"#),
            (b"b", b"false"),
            (b"z", b"null"),
            (b"u", b"tru"),
        ];
        assert_eq!(pairs, expected);
        let (shown, ts) = stored_to_json(StoreFormat::Hash, &out, &fields).unwrap();
        assert_eq!(shown.to_string(), text);
        assert_eq!(ts, None);
        encode_store(
            StoreFormat::Hash,
            &Value::Map(vec![]),
            b"",
            None,
            &mut fields,
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
        for (json, what) in [
            ("[1]", "an array"),
            ("1", "a number"),
            ("\"x\"", "a string"),
        ] {
            let value = decode_input(InputFormat::Json, json.as_bytes()).unwrap();
            assert_eq!(
                encode_store(StoreFormat::Hash, &value, b"", None, &mut fields, &mut out),
                Err(DecodeError::NotAnObject(what))
            );
        }
        // Another writer's text that claims to be JSON and is not.
        let bad = pack_hash_pairs([(b"a".as_slice(), b"{".as_slice())]);
        assert!(stored_to_json(StoreFormat::Hash, &bad, &fields).is_err());
    }
}
