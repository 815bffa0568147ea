//! postcard's own decoder with the depth cap enforced while it decodes:
//! the postcard input format (a bare postcard [`Value`]) and stored format
//! 1 (`StoredRecord` as postcard encodes it; FORMAT.md, "postcard layout,
//! version 1"). postcard decodes recursively, once per level, so the cap
//! is checked before each level: a stack overflow aborts the agent, it is
//! not an error.

use super::wire::tag;
use super::{DecodeError, StoredRecord, Value, MAX_DEPTH};
use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, Error as _, SeqAccess, Unexpected, VariantAccess,
    Visitor,
};
use serde::Deserialize;
use std::cell::Cell;
use std::fmt;

/// Stored format 1 after its two header bytes.
pub(super) fn decode_v1(bytes: &[u8]) -> Result<StoredRecord, DecodeError> {
    with_depth_cap(bytes, |deserializer, seed| {
        let ts_ms = Option::<i64>::deserialize(&mut *deserializer)?;
        let value = seed.deserialize(deserializer)?;
        Ok(StoredRecord { ts_ms, value })
    })
}

/// The postcard input format: a bare postcard [`Value`].
pub(super) fn decode_bare(payload: &[u8]) -> Result<Value, DecodeError> {
    with_depth_cap(payload, |deserializer, seed| seed.deserialize(deserializer))
}

type PostcardDeserializer<'de> = ::postcard::Deserializer<'de, ::postcard::de_flavors::Slice<'de>>;

/// Runs postcard's own decoder over `bytes` (what `postcard::from_bytes`
/// does, trailing bytes ignored as there) with [`ValueSeed`]s in place of
/// `Value`'s derived `Deserialize`: the same bytes accepted, the same
/// errors, except that nesting past [`MAX_DEPTH`] is
/// [`DecodeError::TooDeep`], found before postcard recurses into it.
fn with_depth_cap<'de, T>(
    bytes: &'de [u8],
    decode: impl FnOnce(&mut PostcardDeserializer<'de>, ValueSeed<'_>) -> Result<T, ::postcard::Error>,
) -> Result<T, DecodeError> {
    let too_deep = Cell::new(false);
    let mut deserializer = ::postcard::Deserializer::from_bytes(bytes);
    let seed = ValueSeed {
        depth: 0,
        too_deep: &too_deep,
    };
    decode(&mut deserializer, seed).map_err(|e| {
        if too_deep.get() {
            DecodeError::TooDeep
        } else {
            DecodeError::Postcard(e.to_string())
        }
    })
}

/// A [`Value`] at `depth`, decoded exactly as its derived `Deserialize`
/// would (same calls on the deserializer, so postcard reads the same bytes
/// and reports the same errors), but refused past [`MAX_DEPTH`] before its
/// tag is read: it sets `too_deep` and fails, and the error unwinds.
#[derive(Clone, Copy)]
struct ValueSeed<'a> {
    depth: usize,
    too_deep: &'a Cell<bool>,
}

const VARIANTS: &[&str] = &[
    "Null", "Bool", "Int", "Float", "String", "Bytes", "List", "Map", "Decimal",
];

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        if self.depth > MAX_DEPTH {
            self.too_deep.set(true);
            return Err(D::Error::custom("nesting too deep"));
        }
        deserializer.deserialize_enum("Value", VARIANTS, self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("enum Value")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (index, variant) = data.variant::<u32>()?;
        let inner = ValueSeed {
            depth: self.depth + 1,
            ..self
        };
        let unknown = || {
            A::Error::invalid_value(
                Unexpected::Unsigned(index.into()),
                &"variant index 0 <= i < 9",
            )
        };
        Ok(match u8::try_from(index).map_err(|_| unknown())? {
            tag::NULL => {
                variant.unit_variant()?;
                Value::Null
            }
            tag::BOOL => Value::Bool(variant.newtype_variant()?),
            tag::INT => Value::Int(variant.newtype_variant()?),
            tag::FLOAT => Value::Float(variant.newtype_variant()?),
            tag::STRING => Value::String(variant.newtype_variant()?),
            tag::BYTES => Value::Bytes(variant.newtype_variant()?),
            tag::LIST => Value::List(variant.newtype_variant_seed(Items(inner))?),
            tag::MAP => Value::Map(variant.newtype_variant_seed(Entries(inner))?),
            tag::DECIMAL => {
                let (mantissa, scale) = variant.struct_variant(&["mantissa", "scale"], Decimal)?;
                Value::Decimal { mantissa, scale }
            }
            _ => return Err(unknown()),
        })
    }
}

/// What serde preallocates for a sequence at most (its `size_hint::cautious`).
fn cautious<T>(hint: Option<usize>) -> usize {
    hint.unwrap_or(0)
        .min(1024 * 1024 / std::mem::size_of::<T>())
}

/// A `Vec<Value>`, items at the seed's depth.
struct Items<'a>(ValueSeed<'a>);

impl<'de> DeserializeSeed<'de> for Items<'_> {
    type Value = Vec<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Value>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Items<'_> {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        let mut items = Vec::with_capacity(cautious::<Value>(seq.size_hint()));
        while let Some(item) = seq.next_element_seed(self.0)? {
            items.push(item);
        }
        Ok(items)
    }
}

/// A `Vec<(String, Value)>`, values at the seed's depth.
struct Entries<'a>(ValueSeed<'a>);

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = Vec<(String, Value)>;

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Vec<(String, Value)>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = Vec<(String, Value)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<(String, Value)>, A::Error> {
        let mut entries = Vec::with_capacity(cautious::<(String, Value)>(seq.size_hint()));
        while let Some(entry) = seq.next_element_seed(Entry(self.0))? {
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// One `(String, Value)` tuple.
struct Entry<'a>(ValueSeed<'a>);

impl<'de> DeserializeSeed<'de> for Entry<'_> {
    type Value = (String, Value);

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<(String, Value), D::Error> {
        deserializer.deserialize_tuple(2, self)
    }
}

impl<'de> Visitor<'de> for Entry<'_> {
    type Value = (String, Value);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tuple of size 2")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(String, Value), A::Error> {
        let key = seq
            .next_element::<String>()?
            .ok_or_else(|| A::Error::invalid_length(0, &self))?;
        let value = seq
            .next_element_seed(self.0)?
            .ok_or_else(|| A::Error::invalid_length(1, &self))?;
        Ok((key, value))
    }
}

/// `Value::Decimal`'s two fields.
struct Decimal;

impl<'de> Visitor<'de> for Decimal {
    type Value = (i64, u8);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct variant Value::Decimal")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(i64, u8), A::Error> {
        let mantissa = seq
            .next_element()?
            .ok_or_else(|| A::Error::invalid_length(0, &self))?;
        let scale = seq
            .next_element()?
            .ok_or_else(|| A::Error::invalid_length(1, &self))?;
        Ok((mantissa, scale))
    }
}
