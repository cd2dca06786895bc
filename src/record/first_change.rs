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

use automerge::{ActorId, Change, ChangeHash};
use serde_json::Value;
use sha2::Digest as _;
use std::collections::BTreeSet;

use super::{CHUNK_CHANGE, CHUNK_MAGIC, DELETED_KEY, Fields, PlainFirst, uleb128};

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

/// A change received from elsewhere that creates a record with scalar fields, read by hand:
/// what its header and `PlainFirst` say, without Automerge decoding it.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstChange {
    pub hash: ChangeHash,
    pub actor: ActorId,
    /// As Automerge keeps it: milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub message: Option<String>,
    pub plain: PlainFirst,
}

impl FirstChange {
    /// The same, of a change Automerge decoded.
    pub fn of(change: &Change) -> Option<FirstChange> {
        Some(FirstChange {
            hash: change.hash(),
            actor: change.actor_id().clone(),
            time_ms: change.timestamp(),
            message: change.message().map(str::to_owned),
            plain: PlainFirst::of(change)?,
        })
    }
}

/// `bytes` as a first change in the layout `encode` writes (any fields, any `$deleted`),
/// read without Automerge; `None` for anything else, including every layout Automerge would
/// also read but that is not exactly this one (those go through Automerge and
/// `FirstChange::of`). Whatever this accepts, Automerge decodes to the same change: the
/// `remote_change` fuzz target checks it.
pub fn decode(bytes: &[u8]) -> Option<FirstChange> {
    let rest = bytes.strip_prefix(&CHUNK_MAGIC)?;
    let (checksum, rest) = rest.split_first_chunk::<4>()?;
    let (&CHUNK_CHANGE, rest) = rest.split_first()? else {
        return None;
    };
    let mut reader = Reader(rest);
    let length = reader.uleb()?;
    let length_bytes = rest.get(..rest.len() - reader.0.len())?;
    if reader.0.len() as u64 != length {
        return None;
    }
    let body = reader.0;
    let mut header = Reader(body);
    let no_deps = header.uleb()? == 0;
    let actor_len = usize::try_from(header.uleb()?).ok()?;
    let actor = header.take(actor_len)?;
    let first = header.uleb()? == 1 && header.uleb()? == 1; // sequence number, first counter
    let time_ms = header.sleb()?;
    let message_len = usize::try_from(header.uleb()?).ok()?;
    let message = std::str::from_utf8(header.take(message_len)?).ok()?;
    let no_other_actors = header.uleb()? == 0;
    if !(no_deps && first && no_other_actors) || actor.is_empty() {
        return None;
    }
    let count = header.uleb()?;
    let mut columns: [Option<&[u8]>; 6] = [None; 6];
    let ids = [
        COLUMN_KEY_STRING,
        COLUMN_INSERT,
        COLUMN_ACTION,
        COLUMN_VALUE_META,
        COLUMN_VALUE_RAW,
        COLUMN_PRED_GROUP,
    ];
    let mut lengths = Vec::new();
    let mut last = None;
    for _ in 0..count.min(ids.len() as u64 + 1) {
        let id = header.uleb()?;
        let slot = ids.iter().position(|&known| known == id)?;
        if last.is_some_and(|l| l >= slot) {
            return None;
        }
        last = Some(slot);
        lengths.push((slot, usize::try_from(header.uleb()?).ok()?));
    }
    if lengths.len() as u64 != count {
        return None;
    }
    for (slot, len) in lengths {
        *columns.get_mut(slot)? = Some(header.take(len)?);
    }
    if !header.0.is_empty() {
        return None; // extra bytes
    }
    // Checked once the layout is known to be this one: most changes received are not.
    let mut hasher = sha2::Sha256::new();
    hasher.update([CHUNK_CHANGE]);
    hasher.update(length_bytes);
    hasher.update(body);
    let digest: [u8; 32] = hasher.finalize().into();
    if digest[..4] != checksum[..] {
        return None;
    }

    let [keys, insert, actions, metas, raw, preds] = columns;
    let keys = decode_rle(keys.unwrap_or_default(), Reader::string)?;
    let n = keys.len();
    let all = |column: Option<&[u8]>, value: u64| {
        decode_rle(column.unwrap_or_default(), Reader::uleb)
            .is_some_and(|v| v.len() == n && v.iter().all(|&x| x == value))
    };
    let no_insert = {
        let mut r = Reader(insert.unwrap_or_default());
        // A boolean column: the number of falses, then of trues, alternately.
        n == 0 && r.0.is_empty() || (r.uleb()? == n as u64 && r.0.is_empty())
    };
    if !(no_insert && all(actions, ACTION_SET) && all(preds, 0)) {
        return None;
    }
    let metas = decode_rle(metas.unwrap_or_default(), Reader::uleb)?;
    if metas.len() != n {
        return None;
    }
    let mut raw = Reader(raw.unwrap_or_default());
    let mut deleted = false;
    let mut fields = Fields::new();
    let mut seen = std::collections::HashSet::with_capacity(n);
    for (key, meta) in keys.into_iter().zip(metas) {
        let value = read_value(meta, &mut raw)?;
        if !seen.insert(key) {
            return None;
        }
        if key == DELETED_KEY {
            deleted = value == Value::Bool(true);
        } else if !key.starts_with('$') {
            fields.insert(key.to_owned(), value);
        }
    }
    if !raw.0.is_empty() {
        return None;
    }
    Some(FirstChange {
        hash: ChangeHash(digest),
        actor: ActorId::from(actor),
        time_ms,
        message: (!message.is_empty()).then(|| message.to_owned()),
        plain: PlainFirst { deleted, fields },
    })
}

/// A value as `from_scalar` shows it, of the types `encode` writes; `None` for others (bytes,
/// counters, timestamps: Automerge reads those).
fn read_value(meta: u64, raw: &mut Reader<'_>) -> Option<Value> {
    let len = usize::try_from(meta >> 4).ok()?;
    let bytes = raw.take(len)?;
    let mut value = Reader(bytes);
    let read = match meta & 0xf {
        TYPE_NULL if len == 0 => Value::Null,
        TYPE_FALSE if len == 0 => Value::Bool(false),
        TYPE_TRUE if len == 0 => Value::Bool(true),
        TYPE_UINT => Value::Number(value.uleb()?.into()),
        TYPE_INT => Value::Number(value.sleb()?.into()),
        TYPE_FLOAT => {
            let float = f64::from_le_bytes(value.take(8)?.try_into().ok()?);
            serde_json::Number::from_f64(float).map_or(Value::Null, Value::Number)
        }
        TYPE_STRING => Value::String(std::str::from_utf8(value.take(len)?).ok()?.to_owned()),
        _ => return None,
    };
    value.0.is_empty().then_some(read)
}

/// Every value of a run-length encoded column; `None` for runs of nulls or anything malformed.
fn decode_rle<'a, T: Copy>(
    column: &'a [u8],
    read: impl Fn(&mut Reader<'a>) -> Option<T>,
) -> Option<Vec<T>> {
    let mut reader = Reader(column);
    let mut values = Vec::new();
    while !reader.0.is_empty() {
        let count = reader.sleb()?;
        if count > 0 {
            let value = read(&mut reader)?;
            // A run longer than the column could hold is malformed, not a reason to allocate.
            let count = usize::try_from(count).ok().filter(|&c| c <= MAX_OPS)?;
            values.extend(std::iter::repeat_n(value, count));
        } else if count < 0 {
            for _ in 0..count.unsigned_abs() {
                values.push(read(&mut reader)?);
            }
        } else {
            return None;
        }
        if values.len() > MAX_OPS {
            return None;
        }
    }
    Some(values)
}

/// More operations than any record's first change holds (`Limits` caps its fields far
/// below): a column decoding to more is not read by hand.
const MAX_OPS: usize = 1 << 16;

/// Reads Automerge's integers and strings off the front of a slice. LEB128 integers must be
/// in their shortest form (as Automerge writes them), or are not read.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(taken)
    }

    fn uleb(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && bits > 1 {
                return None;
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                // The shortest form never ends in a zero byte after the first.
                return (i == 0 || byte != 0).then_some(value);
            }
        }
        None
    }

    fn sleb(&mut self) -> Option<i64> {
        let mut value = 0i64;
        let mut shift = 0u32;
        let mut previous = 0u8;
        for i in 0..10 {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            value |= i64::from(byte & 0x7f).checked_shl(shift)?;
            shift += 7;
            if byte & 0x80 == 0 {
                let negative = byte & 0x40 != 0;
                // Not the shortest form: this byte only extends the sign the one before set.
                let redundant = i > 0
                    && ((byte == 0 && previous & 0x40 == 0)
                        || (byte == 0x7f && previous & 0x40 != 0));
                if redundant || (i == 9 && byte != 0 && byte != 0x7f) {
                    return None;
                }
                if negative && shift < 64 {
                    value |= -1i64 << shift;
                }
                return Some(value);
            }
            previous = byte;
        }
        None
    }

    fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.uleb()?).ok()?;
        std::str::from_utf8(self.take(len)?).ok()
    }
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

pub(super) fn write_uleb(out: &mut Vec<u8>, mut value: u64) {
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
            super::super::change_time(time),
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

    /// What Automerge reads in `bytes`, as `decode` would say it.
    fn as_automerge_reads_it(bytes: &[u8]) -> Option<FirstChange> {
        FirstChange::of(&crate::record::decode_change(bytes).ok()?)
    }

    /// A first change made by Automerge itself, with `$deleted` as given and `message`.
    fn automerge_first(fields: &Fields, deleted: bool, message: Option<&str>) -> Vec<u8> {
        use automerge::transaction::{CommitOptions, Transactable as _};
        let mut doc = automerge::AutoCommit::new().with_actor(ActorId::from(vec![7; 16]));
        let mut root = std::collections::HashMap::new();
        for (k, v) in fields {
            root.insert(
                k.clone(),
                automerge::hydrate::Value::Scalar(super::super::to_scalar(v)),
            );
        }
        root.insert(
            DELETED_KEY.to_owned(),
            automerge::hydrate::Value::Scalar(automerge::ScalarValue::Boolean(deleted)),
        );
        doc.init_root_from_hydrate(&root.into())
            .expect("a new document takes its fields");
        let mut options = CommitOptions::default().with_time(42);
        if let Some(m) = message {
            options = options.with_message(m);
        }
        doc.commit_with(options);
        doc.get_last_local_change()
            .expect("the change just made")
            .raw_bytes()
            .to_vec()
    }

    #[test]
    fn a_first_change_reads_as_automerge_reads_it() {
        let some = fields(
            json!({"s": "x", "i": -3, "u": 18_446_744_073_709_551_615u64, "f": 0.5, "b": true, "n": null}),
        );
        for (deleted, message) in [(false, Some("create")), (true, None), (false, Some(""))] {
            let bytes = automerge_first(&some, deleted, message);
            let read = decode(&bytes).expect("a plain first change reads by hand");
            assert_eq!(Some(&read), as_automerge_reads_it(&bytes).as_ref());
            assert_eq!(read.plain.deleted, deleted);
            assert_eq!(read.plain.fields, some);
        }
    }

    #[test]
    fn other_changes_are_left_to_automerge() {
        let actor = ActorId::from(vec![3; 16]);
        let mut record = Record::new(&actor);
        let nested = record
            .put(&fields(json!({"a": {"b": 1}})), 5)
            .unwrap()
            .unwrap();
        assert_eq!(decode(nested.change.raw_bytes()), None);
        let update = record.put(&fields(json!({"a": 2})), 6).unwrap().unwrap();
        assert_eq!(decode(update.change.raw_bytes()), None);
        let mut text = Record::new(&actor)
            .with_text_fields(std::sync::Arc::new(BTreeSet::from(["t".to_owned()])));
        let with_text = text.put(&fields(json!({"t": "abc"})), 5).unwrap().unwrap();
        assert_eq!(decode(with_text.change.raw_bytes()), None);
        // A damaged checksum, trailing bytes, a cut.
        let good = automerge_first(&fields(json!({"a": 1})), false, Some("create"));
        let mut bad = good.clone();
        bad[5] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&[good.as_slice(), &[0]].concat()), None);
        assert_eq!(decode(&good[..good.len() - 1]), None);
    }

    proptest! {
        #[test]
        fn what_encode_writes_decode_reads_as_automerge_does(
            entries in prop::collection::vec(("[ -~é]{0,5}", scalar()), 0..16),
            deleted in any::<bool>(),
        ) {
            let fields: Fields = entries
                .into_iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .collect();
            let ours = encode(&ActorId::from(vec![9; 16]), 7, "create", &fields, &BTreeSet::new())
                .expect("scalars encode");
            let read = decode(&ours.bytes).expect("what encode writes reads back");
            prop_assert_eq!(&read.plain.fields, &fields);
            prop_assert_eq!(read.hash, ours.hash);
            prop_assert_eq!(Some(read), as_automerge_reads_it(&ours.bytes));
            let theirs = automerge_first(&fields, deleted, Some("create"));
            prop_assert_eq!(decode(&theirs), as_automerge_reads_it(&theirs));
        }

        /// Any byte of a change changed (its checksum made good again): read by hand exactly
        /// as Automerge reads it, or not at all.
        #[test]
        fn a_changed_byte_reads_as_automerge_reads_it_or_not_at_all(
            entries in prop::collection::vec(("[a-d]{1,3}", scalar()), 1..8),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let fields: Fields = entries.into_iter().collect();
            let ours = encode(&ActorId::from(vec![9; 16]), 7, "create", &fields, &BTreeSet::new())
                .expect("scalars encode");
            let mut bytes = ours.bytes;
            let at = 8 + at.index(bytes.len() - 8);
            if let Some(b) = bytes.get_mut(at) {
                *b = byte;
            }
            // The checksum is the start of the hash of everything after it.
            let digest = sha2::Sha256::digest(&bytes[8..]);
            bytes[4..8].copy_from_slice(&digest[..4]);
            if let Some(read) = decode(&bytes) {
                prop_assert_eq!(Some(read), as_automerge_reads_it(&bytes));
            }
        }
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
