//! Rendering a [`Value`] as JSON: strictly for the json store (bytes and
//! non-finite floats are refused), or lossily for `edgecache get`.

use super::{decimal_to_f64, DecodeError, Value};
use serde::Serialize;

/// Compact JSON text of a value, appended to `out`: the json store.
pub(super) fn put_json_text(out: &mut Vec<u8>, value: &Value) -> Result<(), DecodeError> {
    let start = out.len();
    if !put_json(out, value)? {
        out.truncate(start);
        let json = to_json(value)?;
        // Writing into a Vec cannot fail.
        serde_json::to_writer(&mut *out, &json).expect("serialising JSON to memory");
    }
    Ok(())
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
    use crate::codec::json::tests::json_cases;
    use crate::codec::{decode_input, InputFormat};

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
}
