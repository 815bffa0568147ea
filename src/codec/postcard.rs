//! The postcard store: stored format 2 written and read (FORMAT.md,
//! "postcard layout, version 2"), format 1 still read, and the bare
//! postcard [`Value`] of the postcard input format.
//!
//! Format 1 and the bare value are read by postcard's own decoder
//! (`postcard_serde`). Every reader enforces [`MAX_DEPTH`] while it
//! decodes, before it recurses into a list or map, so hostile bytes cannot
//! exhaust the stack (a stack overflow aborts the agent; it is not an
//! error).

use super::fields::Fields;
use super::postcard_serde;
use super::wire::{
    malformed, put_decimal, put_float, put_int, put_str, put_varint, tag, unzigzag, zigzag, Reader,
};
use super::{DecodeError, Value, FORMAT_V1, FORMAT_VERSION, MAGIC, MAX_DEPTH};
use serde::{Deserialize, Serialize};

/// What is stored after the two header bytes in the postcard format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// The Kafka record timestamp (ms since the Unix epoch), if it had one.
    pub ts_ms: Option<i64>,
    pub value: Value,
}

/// `[MAGIC, FORMAT_VERSION]` and the `ts_ms` option.
pub(super) fn put_header(out: &mut Vec<u8>, ts_ms: Option<i64>) {
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
pub(super) fn put_value(
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
        Value::Int(i) => put_int(out, *i),
        Value::Float(f) => put_float(out, *f),
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
        Value::Decimal { mantissa, scale } => put_decimal(out, *mantissa, *scale),
    }
    Ok(())
}

/// A map key in format 2: the varint of its field number + 1, or `00` and
/// the name inline (too long, or the table is full).
pub(super) fn put_key(out: &mut Vec<u8>, key: &str, fields: &mut Fields) {
    match fields.key_ref(key) {
        Some(id) => put_varint(out, u64::from(id) + 1),
        None => {
            out.push(0);
            put_str(out, key);
        }
    }
}

/// Decodes a postcard-stored value (header included). `fields` is the
/// namespace's field table, read after the value (names are written no
/// later than the values that use them); format 1 values do not use it.
pub fn decode_stored(bytes: &[u8], fields: &Fields) -> Result<StoredRecord, DecodeError> {
    match bytes {
        [MAGIC, FORMAT_V1, rest @ ..] => postcard_serde::decode_v1(rest),
        [MAGIC, FORMAT_VERSION, rest @ ..] => {
            let mut reader = Reader { bytes: rest };
            let ts_ms = match reader.varint()? {
                0 => None,
                1 => Some(unzigzag(reader.varint()?)),
                n => return Err(malformed(format!("timestamp option {n}"))),
            };
            let value = read_value(&mut reader, fields, 0)?;
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

/// One [`Value`] of stored format 2 at `depth`, refused past [`MAX_DEPTH`]
/// before anything of it is read.
fn read_value(
    reader: &mut Reader<'_>,
    fields: &Fields,
    depth: usize,
) -> Result<Value, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let number = reader.varint()?;
    let unknown = || malformed(format!("unknown tag {number}"));
    Ok(match u8::try_from(number).map_err(|_| unknown())? {
        tag::NULL => Value::Null,
        tag::BOOL => match reader.byte()? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(malformed(format!("bool byte {b}"))),
        },
        tag::INT => Value::Int(unzigzag(reader.varint()?)),
        tag::FLOAT => {
            let bytes: [u8; 8] = reader.take(8)?.try_into().expect("8 bytes taken");
            Value::Float(f64::from_le_bytes(bytes))
        }
        tag::STRING => Value::String(reader.string()?),
        tag::BYTES => {
            let len = reader.varint()?;
            Value::Bytes(reader.take(len)?.to_vec())
        }
        tag::LIST => {
            let n = reader.count()?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(read_value(reader, fields, depth + 1)?);
            }
            Value::List(items)
        }
        tag::MAP => {
            let n = reader.count()?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let key = match reader.varint()? {
                    0 => reader.string()?,
                    n => {
                        let id = u32::try_from(n - 1).unwrap_or(u32::MAX);
                        fields
                            .name(id)
                            .ok_or(DecodeError::UnknownField(id))?
                            .to_owned()
                    }
                };
                entries.push((key, read_value(reader, fields, depth + 1)?));
            }
            Value::Map(entries)
        }
        tag::DECIMAL => {
            let mantissa = unzigzag(reader.varint()?);
            let scale = reader.byte()?;
            Value::Decimal { mantissa, scale }
        }
        _ => return Err(unknown()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::transcode::json_to_stored;
    use crate::codec::{
        decode_input, encode_store, hex, stored_to_json, to_json_lossy, InputFormat, StoreFormat,
    };

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
        let format_md = include_str!("../../FORMAT.md");
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
        let bare = ::postcard::to_allocvec(&value).unwrap();
        assert_eq!(decode_input(InputFormat::Postcard, &bare).unwrap(), value);
    }

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
}
