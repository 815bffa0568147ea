//! The hash store (FORMAT.md, "The hash store"): a JSON object as a Redis
//! hash of its top-level fields, and the packed (name, value) pairs a batch
//! carries them in.

use super::render::put_json_text;
use super::{hex, DecodeError, Value};

/// The hash store's fields of a record, packed for the batch as
/// (name, value) pairs, each part a little-endian `u32` length and its
/// bytes. Empty for `{}`: Redis has no empty hash, so the record deletes
/// the key (FORMAT.md). Duplicate names stay; `HSET` keeps the last value.
pub(super) fn put_hash(out: &mut Vec<u8>, value: &Value) -> Result<(), DecodeError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{
        decode_input, encode_store, stored_to_json, Fields, InputFormat, StoreFormat,
    };

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
