//! The field table of stored format 2 ([`Fields`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Most names the field table holds; later names are stored inline. Bounds
/// the table's memory (names are at most [`MAX_FIELD_NAME`] bytes) whatever
/// the data: a map keyed by device id fills it once, then costs nothing.
pub const MAX_FIELDS: usize = 1024;
/// Longest object key that goes into the field table.
pub const MAX_FIELD_NAME: usize = 64;

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
    pub(super) fn key_ref(&mut self, name: &str) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_stored, to_json_lossy, transcode, InputFormat, StoreFormat};

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
}
