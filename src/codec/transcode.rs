//! The fast path of [`transcode`](super::transcode)(super::transcode): JSON text written
//! as stored format 2 while serde_json parses it, without a [`Value`].

use super::fields::Fields;
use super::json::LINEAR_KEY_SCAN;
use super::postcard::{put_header, put_key};
use super::wire::{patch_count, put_decimal, put_float, put_int, put_str, tag};
use super::{Value, MAX_DEPTH};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// The fast path of [`transcode`](super::transcode): `[MAGIC, FORMAT_VERSION]` and the
/// postcard of `StoredRecord`, written as serde_json parses. False when the
/// two-step path must decide (see [`transcode`](super::transcode)); `out` is then garbage.
pub(super) fn json_to_stored(
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

/// A JSON number that is not an i64: the same choice as `Value::from_f64`.
fn put_f64(out: &mut Vec<u8>, f: f64) {
    if let Value::Decimal { mantissa, scale } = Value::from_f64(f) {
        put_decimal(out, mantissa, scale);
    } else {
        put_float(out, f);
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
        put_int(self.out, i);
        Ok(())
    }

    fn visit_u64<E>(self, u: u64) -> Result<(), E> {
        match i64::try_from(u) {
            Ok(i) => put_int(self.out, i),
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

#[cfg(test)]
mod tests {
    use crate::codec::json::tests::json_cases;
    use crate::codec::{
        decode_input, encode_store, hex, transcode, Fields, InputFormat, StoreFormat,
    };

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
}
