//! The record shape every benchmark uses, local and sync alike, so their numbers compare: 10
//! fields, 5 strings of about 20 characters and 5 integers, all derived from the record's number
//! so a workload is the same on every run and every device.
#![allow(dead_code)]

use serde_json::{Map, Value, json};

/// The collection benchmark records go to.
pub const COLLECTION: &str = "Customer";

/// The id of record `n`: fixed width, so id order is number order.
pub fn record_id(n: u64) -> String {
    format!("c{n:09}")
}

/// The fields of record `n`: 5 strings (20 characters each) and 5 integers.
pub fn record_fields(n: u64) -> Map<String, Value> {
    let h = mix(n);
    let v = json!({
        "s1": format!("name-{n:015}"),
        "s2": format!("{:05} Harbour Street", h % 100_000),
        "s3": format!("ref-{h:016x}"),
        "s4": format!("u{:07}@example.org", n % 10_000_000),
        "s5": format!("status-active-{:06}", (h >> 20) % 1_000_000),
        "i1": n,
        "i2": n * 7,
        "i3": (h >> 8) % 1_000_000,
        "i4": -((h % 500) as i64),
        "i5": 1_700_000_000 + n,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Record `n` as the `import` method and `ferry import` take it.
pub fn import_record(n: u64) -> Value {
    json!({ "collection": COLLECTION, "id": record_id(n), "fields": record_fields(n) })
}

/// SplitMix64: a fixed, well-mixed function of `x`, also used as a seeded random stream.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded random stream (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Bytes of record `n` as `ferry export` writes it: `{"collection":..,"fields":{..},"id":..}`,
/// compact, without the line's newline (the order of the fields does not change the count).
pub fn json_bytes(n: u64) -> u64 {
    serde_json::to_string(&import_record(n)).map_or(0, |s| s.len() as u64)
}

/// The mean of `json_bytes` over records `0..records`.
pub fn mean_json_bytes(records: u64) -> f64 {
    let total: u64 = (0..records).map(json_bytes).sum();
    total as f64 / records.max(1) as f64
}
