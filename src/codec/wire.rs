//! The wire primitives of stored format 2 (FORMAT.md, "Primitive rules"),
//! which are postcard's own: the tags of [`Value`]'s variants, the one
//! varint reader and writer, zigzag, and length-prefixed strings. Every
//! other file of the codec writes and reads postcard-shaped bytes through
//! these.
//!
//! [`Value`]: super::Value

use super::DecodeError;

/// postcard's encoding of each [`Value`](super::Value) variant's tag (its
/// index).
pub(super) mod tag {
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

/// postcard's varint: unsigned LEB128.
pub(super) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub(super) fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

pub(super) fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Lists and maps are written before their length is known: one byte is
/// reserved, which holds counts below 128; larger counts shift the rest.
pub(super) fn patch_count(out: &mut Vec<u8>, at: usize, count: u64) {
    if count < 0x80 {
        out[at] = count as u8;
    } else {
        let mut varint = Vec::with_capacity(10);
        put_varint(&mut varint, count);
        out.splice(at..at + 1, varint);
    }
}

/// A tagged Int: the zigzag varint.
pub(super) fn put_int(out: &mut Vec<u8>, i: i64) {
    out.push(tag::INT);
    put_varint(out, zigzag(i));
}

/// A tagged Float: 8 bytes little endian.
pub(super) fn put_float(out: &mut Vec<u8>, f: f64) {
    out.push(tag::FLOAT);
    out.extend_from_slice(&f.to_le_bytes());
}

/// A tagged Decimal: the mantissa's zigzag varint, then the scale byte.
pub(super) fn put_decimal(out: &mut Vec<u8>, mantissa: i64, scale: u8) {
    out.push(tag::DECIMAL);
    put_varint(out, zigzag(mantissa));
    out.push(scale);
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

pub(super) fn malformed(what: String) -> DecodeError {
    DecodeError::Postcard(what)
}

/// Reads the primitives from outside bytes; every read past the end or of
/// a malformed primitive is an error.
#[derive(Debug)]
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or_else(|| malformed("length beyond the end".into()))?;
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    pub(super) fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// postcard's varint of a u64: at most 10 bytes, no bits beyond 64
    /// (the tenth byte is 0 or 1), as postcard's own decoder checks. Longer
    /// or overflowing varints are errors, not truncated.
    pub(super) fn varint(&mut self) -> Result<u64, DecodeError> {
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

    pub(super) fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.varint()?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| malformed("string is not UTF-8".into()))
    }

    /// A count of items, each at least one byte: a count beyond the bytes
    /// left is an error before anything is allocated for it.
    pub(super) fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or_else(|| malformed(format!("count {n} beyond the end")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Value;

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

    /// The one varint reader accepts what the writer writes and, like
    /// postcard's own decoder, nothing longer than 10 bytes or beyond 64
    /// bits; zigzag round-trips.
    #[test]
    fn varints_round_trip_and_overflow_is_an_error() {
        for n in [
            0,
            1,
            127,
            128,
            300,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            let mut reader = Reader { bytes: &out };
            assert_eq!(reader.varint(), Ok(n));
            assert!(reader.bytes.is_empty());
            // postcard agrees on every byte.
            assert_eq!(postcard::from_bytes::<u64>(&out).unwrap(), n);
        }
        for i in [0, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(i)), i);
        }
        let too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        let too_long = [0x80; 11];
        for bad in [&too_big[..], &too_long[..], &[0x80][..], &[][..]] {
            assert!(Reader { bytes: bad }.varint().is_err(), "{bad:?}");
            assert!(postcard::from_bytes::<u64>(bad).is_err(), "{bad:?}");
        }
    }
}
