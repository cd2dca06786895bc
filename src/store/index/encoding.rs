//! The order-preserving encoding of field values in index keys: the bytes of two values compare
//! as `query::collate` orders the values (missing, null, booleans, numbers, strings, then lists
//! and objects; numbers as numbers, strings by bytes), and equal values (`1` and `1.0`) encode
//! alike, so an equality is one key prefix and a range one key range. Each value is
//! self-delimiting, so several follow one another in a compound index's key. Pure.
//!
//! Owns: the bytes of an encoded value. Must not touch: storage, which keys hold them.

use serde_json::Value;

const MISSING: u8 = 0x01;
const NULL: u8 = 0x02;
const BOOL: u8 = 0x03;
const NUMBER: u8 = 0x04;
const STRING: u8 = 0x05;
const LIST: u8 = 0x06;
const OBJECT: u8 = 0x07;

/// Appends `value` (`None`: the field is missing) to `out`.
pub fn push(out: &mut Vec<u8>, value: Option<&Value>) {
    match value {
        None => out.push(MISSING),
        Some(Value::Null) => out.push(NULL),
        Some(Value::Bool(b)) => out.extend_from_slice(&[BOOL, u8::from(*b)]),
        Some(Value::Number(n)) => {
            let (approx, exact) = crate::query::number_key(n);
            out.push(NUMBER);
            out.extend_from_slice(&float_bits(approx).to_be_bytes());
            // Flipping the sign bit maps i128 order onto u128 order.
            out.extend_from_slice(&((exact as u128) ^ (1 << 127)).to_be_bytes());
        }
        Some(Value::String(s)) => push_bytes(out, STRING, s.as_bytes()),
        // Lists and objects collate by their JSON text.
        Some(Value::Array(_)) => push_bytes(out, LIST, value_text(value).as_bytes()),
        Some(Value::Object(_)) => push_bytes(out, OBJECT, value_text(value).as_bytes()),
    }
}

fn value_text(value: Option<&Value>) -> String {
    value.map(Value::to_string).unwrap_or_default()
}

/// A float's bits in an order where unsigned comparison is the floats' order.
fn float_bits(f: f64) -> u64 {
    let bits = f.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// `0x00` inside the bytes is written `0x00 0xff` and the end `0x00 0x01`: a string sorts
/// before every longer string it starts, and the value after it stays apart.
fn push_bytes(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

/// How many bytes the value at the start of `bytes` takes; `None` when they hold none.
pub fn skip(bytes: &[u8]) -> Option<usize> {
    match *bytes.first()? {
        MISSING | NULL => Some(1),
        BOOL => Some(2),
        NUMBER => Some(1 + 8 + 16),
        STRING | LIST | OBJECT => {
            let mut at = 1;
            loop {
                match (bytes.get(at)?, bytes.get(at + 1)?) {
                    (0x00, 0x01) => return Some(at + 2),
                    (0x00, _) => at += 2,
                    _ => at += 1,
                }
            }
        }
        _ => None,
    }
}

/// The first and the past-the-end byte of the keys of values of `value`'s kind: a range
/// condition holds only within its value's kind.
pub fn kind_range(value: &Value) -> (Vec<u8>, Vec<u8>) {
    let tag = match value {
        Value::Null => NULL,
        Value::Bool(_) => BOOL,
        Value::Number(_) => NUMBER,
        Value::String(_) => STRING,
        Value::Array(_) => LIST,
        Value::Object(_) => OBJECT,
    };
    (vec![tag], vec![tag.saturating_add(1)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::collate;
    use proptest::prelude::*;
    use serde_json::json;

    fn encoded(value: Option<&Value>) -> Vec<u8> {
        let mut out = Vec::new();
        push(&mut out, value);
        out
    }

    fn scalar() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            any::<bool>().prop_map(|b| Some(json!(b))),
            any::<i64>().prop_map(|n| Some(json!(n))),
            any::<u64>().prop_map(|n| Some(json!(n))),
            (-1000i64..1000).prop_map(|n| Some(json!(n))),
            (-1000i32..1000).prop_map(|n| Some(json!(f64::from(n) / 4.0))),
            any::<f64>()
                .prop_filter("JSON holds finite numbers", |f| f.is_finite())
                .prop_map(|f| Some(json!(f))),
            "[a\\x00b]{0,4}".prop_map(|s| Some(json!(s))),
            prop::collection::vec(0u8..3, 0..3).prop_map(|v| Some(json!(v))),
            "[ab]{0,2}".prop_map(|k| Some(json!({ k: 1 }))),
        ]
    }

    proptest! {
        /// Encoded bytes order values as queries order them, and only equal values share bytes,
        /// also when another value follows (a compound key).
        #[test]
        fn bytes_order_values_as_queries_do(a in scalar(), b in scalar(), c in scalar(), d in scalar()) {
            let order = collate(a.as_ref(), b.as_ref());
            prop_assert_eq!(encoded(a.as_ref()).cmp(&encoded(b.as_ref())), order);
            let mut ac = encoded(a.as_ref());
            push(&mut ac, c.as_ref());
            let mut bd = encoded(b.as_ref());
            push(&mut bd, d.as_ref());
            let first = encoded(a.as_ref()).len();
            prop_assert_eq!(skip(&ac), Some(first));
            prop_assert_eq!(skip(ac.get(first..).unwrap_or_default()), Some(ac.len() - first));
            prop_assert_eq!(ac.cmp(&bd), order.then(collate(c.as_ref(), d.as_ref())));
        }
    }

    #[test]
    fn numbers_go_by_value_whatever_their_type() {
        let ordered = [
            json!(-1e300),
            json!(i64::MIN),
            json!(-2.5),
            json!(-1),
            json!(0),
            json!(0.5),
            json!(1),
            json!(9_007_199_254_740_992.0_f64),
            json!(9_007_199_254_740_993_u64),
            json!(u64::MAX),
            json!(1e300),
        ];
        for pair in ordered.windows(2) {
            if let [a, b] = pair {
                assert!(encoded(Some(a)) < encoded(Some(b)), "{a} < {b}");
            }
        }
        assert_eq!(encoded(Some(&json!(1))), encoded(Some(&json!(1.0))));
        assert_eq!(encoded(Some(&json!(-0.0))), encoded(Some(&json!(0))));
        assert!(encoded(Some(&json!("a"))) < encoded(Some(&json!("a\u{0}"))));
        assert!(encoded(None) < encoded(Some(&Value::Null)));
    }
}
