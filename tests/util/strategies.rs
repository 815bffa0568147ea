//! proptest strategies shared by tests/properties.rs and tests/read.rs
//! (included by `#[path]`: a test crate cannot import another's, and the
//! rest of tests/util needs a broker these tests do not).

use edgecache::codec::Value;
use proptest::collection::vec;
use proptest::prelude::*;

/// Any `Value`, including every f64 bit pattern (NaNs, -0.0, subnormals)
/// and Decimals with scales a producer could send but edgecache never makes.
pub fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<u64>().prop_map(|bits| Value::Float(f64::from_bits(bits))),
        any::<f64>().prop_map(Value::from_f64),
        any::<String>().prop_map(Value::String),
        vec(any::<u8>(), 0..24).prop_map(Value::Bytes),
        (any::<i64>(), any::<u8>())
            .prop_map(|(mantissa, scale)| Value::Decimal { mantissa, scale }),
    ];
    leaf.prop_recursive(6, 96, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::List),
            vec((any::<String>(), inner), 0..6).prop_map(Value::Map),
        ]
    })
}

/// JSON number text of every kind a producer sends: integers in and
/// beyond i64, shortest float forms of any finite double, short decimals,
/// and exponent forms that underflow or overflow.
pub fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        (-99_999_999i64..99_999_999, 0usize..=17).prop_map(|(mantissa, scale)| {
            let digits = format!("{:0>width$}", mantissa.unsigned_abs(), width = scale + 1);
            let (int, frac) = digits.split_at(digits.len() - scale);
            let sign = if mantissa < 0 { "-" } else { "" };
            if scale == 0 {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            }
        }),
        (any::<i32>(), -330i32..330).prop_map(|(m, e)| format!("{m}e{e}")),
        Just("-0".to_owned()),
        Just("-0.0".to_owned()),
    ]
}

/// A JSON document as text, nested a few levels.
pub fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        json_number(),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    leaf.prop_recursive(5, 64, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(|items| format!("[{}]", items.join(","))),
            // Short keys, so duplicates happen: the last one wins.
            vec(("[a-c]{0,2}", inner), 0..5).prop_map(|fields| {
                let fields: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}
