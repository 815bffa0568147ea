//! The value model: [`Value`], the decoded form of every input format, and
//! the exact decimal form of floats.

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
