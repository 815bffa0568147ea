//! JSON input: parsing JSON text straight into a [`Value`].

use super::{DecodeError, Value, MAX_DEPTH};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;

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
pub(super) fn decode_json(payload: &[u8]) -> Result<Value, DecodeError> {
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
pub(super) const LINEAR_KEY_SCAN: usize = 16;

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

#[cfg(test)]
pub(super) mod tests {
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

    /// Edge cases and generated documents (fixed seed) for the JSON paths.
    pub(in crate::codec) fn json_cases() -> Vec<String> {
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
}
