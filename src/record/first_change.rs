//! A new record's first change, encoded without building an Automerge document.
//!
//! A record created with scalar fields (the bulk of every import and of most apps' writes) is
//! one change that sets each field, and `$deleted` to false, at the top level of an empty
//! document. Building it through Automerge (a document, its operations, the commit, then the
//! change encoded again to read its bytes back) costs about 30 µs a record; writing the same
//! bytes here costs a few. The bytes must be exactly Automerge's: a change is named by the hash
//! of its bytes, and Automerge encodes a change again from its operations whenever it sends or
//! saves one. `tests` hold the two encoders to the same bytes over random fields.
//!
//! The layout is Automerge's binary change format: a chunk header (magic bytes, checksum, type,
//! length), then dependencies, actor, sequence number, first operation's counter, time, message,
//! other actors, the columns' directory and the columns. Only the columns a root map of new
//! scalar values fills are written: key strings, insert flags, actions, value metadata, raw
//! values and predecessor counts (empty columns are left out, as Automerge leaves them).

use automerge::{ActorId, ChangeHash};
use serde_json::Value;
use sha2::Digest as _;
use std::collections::BTreeSet;

use super::{CHUNK_CHANGE, CHUNK_MAGIC, DELETED_KEY, Fields, uleb128};

/// Column ids, as Automerge numbers them: (column number << 4) | encoding.
const COLUMN_KEY_STRING: u64 = 21;
const COLUMN_INSERT: u64 = 52;
const COLUMN_ACTION: u64 = 66;
const COLUMN_VALUE_META: u64 = 86;
const COLUMN_VALUE_RAW: u64 = 87;
const COLUMN_PRED_GROUP: u64 = 112;

/// The action that sets a map key.
const ACTION_SET: u64 = 1;

/// Value types in a value's metadata (its low 4 bits; the length in bytes above them).
const TYPE_NULL: u64 = 0;
const TYPE_FALSE: u64 = 1;
const TYPE_TRUE: u64 = 2;
const TYPE_UINT: u64 = 3;
const TYPE_INT: u64 = 4;
const TYPE_FLOAT: u64 = 5;
const TYPE_STRING: u64 = 6;

/// A first change encoded here: its bytes (a whole change chunk) and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChange {
    pub bytes: Vec<u8>,
    pub hash: ChangeHash,
}

/// The change `Record::put` makes on a new record by `actor` with `fields` at `time_ms`, with
/// `message`; `None` when a field is not a plain JSON scalar (objects, arrays, sealed values)
/// or is one of `text_fields` (those become text objects): Automerge builds those.
pub fn encode(
    actor: &ActorId,
    time_ms: i64,
    message: &str,
    fields: &Fields,
    text_fields: &BTreeSet<String>,
) -> Option<EncodedChange> {
    let mut ops: Vec<(&str, &Value)> = Vec::with_capacity(fields.len() + 1);
    const NOT_DELETED: Value = Value::Bool(false);
    for (key, value) in fields {
        if matches!(value, Value::Array(_) | Value::Object(_))
            || text_fields.contains(key)
            || key.starts_with('$')
        {
            return None;
        }
        ops.push((key, value));
    }
    ops.push((DELETED_KEY, &NOT_DELETED));
    // Automerge writes a new map's keys in their byte order.
    ops.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));

    let mut keys = Rle::default();
    let mut metas = Rle::default();
    let mut raw = Vec::new();
    for &(key, value) in &ops {
        keys.push(RleValue::Bytes(key.as_bytes()));
        let meta = write_value(value, &mut raw);
        metas.push(RleValue::Uint(meta));
    }
    let n = ops.len() as u64;
    let mut insert = Vec::new();
    write_uleb(&mut insert, n);
    let mut actions = Rle::default();
    let mut preds = Rle::default();
    for _ in 0..n {
        actions.push(RleValue::Uint(ACTION_SET));
        preds.push(RleValue::Uint(0));
    }
    let columns = [
        (COLUMN_KEY_STRING, keys.finish()),
        (COLUMN_INSERT, insert),
        (COLUMN_ACTION, actions.finish()),
        (COLUMN_VALUE_META, metas.finish()),
        (COLUMN_VALUE_RAW, raw),
        (COLUMN_PRED_GROUP, preds.finish()),
    ];

    let mut body = Vec::with_capacity(64 + columns.iter().map(|c| c.1.len()).sum::<usize>());
    write_uleb(&mut body, 0); // dependencies
    let actor = actor.to_bytes();
    write_uleb(&mut body, actor.len() as u64);
    body.extend_from_slice(actor);
    write_uleb(&mut body, 1); // sequence number
    write_uleb(&mut body, 1); // the first operation's counter
    write_sleb(&mut body, time_ms);
    write_uleb(&mut body, message.len() as u64);
    body.extend_from_slice(message.as_bytes());
    write_uleb(&mut body, 0); // other actors
    let written = columns.iter().filter(|c| !c.1.is_empty());
    write_uleb(&mut body, written.clone().count() as u64);
    for (id, data) in written.clone() {
        write_uleb(&mut body, *id);
        write_uleb(&mut body, data.len() as u64);
    }
    for (_, data) in written {
        body.extend_from_slice(data);
    }

    let length = uleb128(body.len() as u64);
    let mut hasher = sha2::Sha256::new();
    hasher.update([CHUNK_CHANGE]);
    hasher.update(&length);
    hasher.update(&body);
    let digest: [u8; 32] = hasher.finalize().into();
    let mut bytes = Vec::with_capacity(9 + length.len() + body.len());
    bytes.extend_from_slice(&CHUNK_MAGIC);
    bytes.extend_from_slice(&digest[..4]);
    bytes.push(CHUNK_CHANGE);
    bytes.extend_from_slice(&length);
    bytes.extend_from_slice(&body);
    Some(EncodedChange {
        bytes,
        hash: ChangeHash(digest),
    })
}

/// Appends a scalar's raw bytes to `raw` and returns its metadata, as `Record`'s conversion
/// stores it: integers as i64 where they fit, u64 above, other numbers as f64.
fn write_value(value: &Value, raw: &mut Vec<u8>) -> u64 {
    let start = raw.len();
    let kind = match value {
        Value::Null => TYPE_NULL,
        Value::Bool(false) => TYPE_FALSE,
        Value::Bool(true) => TYPE_TRUE,
        Value::String(s) => {
            raw.extend_from_slice(s.as_bytes());
            TYPE_STRING
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                write_sleb(raw, i);
                TYPE_INT
            } else if let Some(u) = n.as_u64() {
                write_uleb(raw, u);
                TYPE_UINT
            } else {
                raw.extend_from_slice(&n.as_f64().unwrap_or(f64::NAN).to_le_bytes());
                TYPE_FLOAT
            }
        }
        // `encode` takes only scalars.
        Value::Array(_) | Value::Object(_) => TYPE_NULL,
    };
    (((raw.len() - start) as u64) << 4) | kind
}

fn write_uleb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn write_sleb(out: &mut Vec<u8>, mut value: i64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let done = (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0);
        if done {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// One value of a run-length encoded column.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RleValue<'a> {
    Uint(u64),
    /// A string, written with its length first.
    Bytes(&'a [u8]),
}

impl RleValue<'_> {
    fn write(self, out: &mut Vec<u8>) {
        match self {
            RleValue::Uint(v) => write_uleb(out, v),
            RleValue::Bytes(b) => {
                write_uleb(out, b.len() as u64);
                out.extend_from_slice(b);
            }
        }
    }
}

/// Automerge's run-length encoding: a run of one value repeated is its count then the value; a
/// stretch of values each unlike the next is minus its length then the values.
#[derive(Default)]
struct Rle<'a> {
    out: Vec<u8>,
    /// Values not yet written: a literal stretch, its last value possibly starting a run.
    literal: Vec<RleValue<'a>>,
    /// A run being counted: its value and length.
    run: Option<(RleValue<'a>, u64)>,
}

impl<'a> Rle<'a> {
    fn push(&mut self, value: RleValue<'a>) {
        if let Some((run_value, count)) = &mut self.run {
            if *run_value == value {
                *count += 1;
                return;
            }
            self.flush_run();
            self.literal.push(value);
            return;
        }
        if self.literal.last() == Some(&value) {
            self.literal.pop();
            self.flush_literal();
            self.run = Some((value, 2));
            return;
        }
        self.literal.push(value);
    }

    fn flush_run(&mut self) {
        if let Some((value, count)) = self.run.take() {
            write_uleb(&mut self.out, count);
            value.write(&mut self.out);
        }
    }

    fn flush_literal(&mut self) {
        if self.literal.is_empty() {
            return;
        }
        write_sleb(&mut self.out, -(self.literal.len() as i64));
        for value in self.literal.drain(..) {
            value.write(&mut self.out);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.flush_run();
        self.flush_literal();
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hex;
    use crate::record::Record;
    use proptest::prelude::*;
    use serde_json::json;

    fn automerge_bytes(actor: &ActorId, time: u64, fields: &Fields) -> (Vec<u8>, ChangeHash) {
        let mut record = Record::new(actor);
        let written = record
            .put(fields, time)
            .expect("a put on a new record")
            .expect("a change");
        (written.change.raw_bytes().to_vec(), written.change.hash())
    }

    fn check(actor: &ActorId, time: u64, fields: &Fields) {
        let encoded = encode(
            actor,
            i64::try_from(time).unwrap_or(i64::MAX),
            "create",
            fields,
            &BTreeSet::new(),
        )
        .expect("scalar fields encode");
        let (bytes, hash) = automerge_bytes(actor, time, fields);
        assert_eq!(
            encoded.bytes,
            bytes,
            "fields {fields:?}: ours {} against Automerge's {}",
            hex::encode(&encoded.bytes),
            hex::encode(&bytes)
        );
        assert_eq!(encoded.hash, hash);
    }

    fn fields(v: Value) -> Fields {
        match v {
            Value::Object(m) => m,
            _ => Fields::new(),
        }
    }

    #[test]
    fn the_same_bytes_as_automerge_for_every_scalar_kind() {
        let actor = ActorId::from(vec![0xab; 16]);
        check(&actor, 1_234_567, &Fields::new());
        check(&actor, 0, &fields(json!({"a": 1})));
        check(
            &actor,
            1_700_000_000_000,
            &fields(json!({
                "s": "hello", "i": -5, "big": 9_223_372_036_854_775_807i64,
                "u": 18_446_744_073_709_551_615u64, "f": 1.5, "neg": -0.25, "t": true,
                "n": null, "e": "", "z": 0, "min": i64::MIN, "!first": 1, " space": 2,
                "é": "ü", "😀": "emoji"
            })),
        );
        // Runs: equal value kinds and lengths next to each other.
        check(
            &actor,
            5,
            &fields(
                json!({"a": "xx", "b": "yy", "c": "zz", "d": 1, "e": 2, "f": "q", "g": null, "h": null}),
            ),
        );
        check(&actor, 5, &fields(json!({"a": null, "b": false})));
    }

    #[test]
    fn fields_automerge_must_build_are_left_to_it() {
        let actor = ActorId::from(vec![1; 16]);
        let none = BTreeSet::new();
        for value in [
            json!({"a": {"b": 1}}),
            json!({"a": [1]}),
            json!({"$deleted": true}),
        ] {
            assert_eq!(encode(&actor, 1, "create", &fields(value), &none), None);
        }
        let text = BTreeSet::from(["notes".to_owned()]);
        assert_eq!(
            encode(&actor, 1, "create", &fields(json!({"notes": "x"})), &text),
            None
        );
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            (0u64..4).prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[a-c]{0,3}".prop_map(Value::String),
            ".{0,40}".prop_map(Value::String),
        ]
    }

    proptest! {
        #[test]
        fn random_fields_encode_as_automerge_encodes_them(
            entries in prop::collection::vec(("[ -~é😀]{0,6}", scalar()), 0..24),
            actor in prop::collection::vec(any::<u8>(), 1..40),
            time in any::<u64>(),
        ) {
            let fields: Fields = entries
                .into_iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .collect();
            check(&ActorId::from(actor), time, &fields);
        }
    }
}
