//! A record: one Automerge document holding one JSON object, and the mapping between the two.
//!
//! Owns: JSON <-> Automerge conversion (objects to maps, arrays to lists, strings, integers,
//! floats, booleans, null), the minimal set of operations that turns one record state into
//! another, tombstones, and reading a record's history. Every write is one Automerge change
//! stamped with the writing device's actor, the time, and its operation as the change message.
//!
//! Must not touch: storage, queues, sockets. Time comes in as an argument.
//!
//! Reserved names: top-level fields whose name starts with `$` belong to Ferry (`$deleted` marks a
//! tombstone). Writes that use them are refused, and reads never show them.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, AutoCommit, Automerge, Change, ChangeHash, ObjId, ObjType, PatchAction, Prop,
};
use automerge::{ROOT, ReadDoc, ScalarValue, TextEncoding, Value as AmValue, hydrate};
use ferry_proto::{Limits, Operation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::collections::BTreeSet;
use std::sync::Arc;

use crate::crypt::SEALED_KEY;

pub mod first_change;

/// Root key whose value `true` marks a deleted record. A delete is a change like any other, so a
/// concurrent update elsewhere meets it and the conflict can be seen.
pub const DELETED_KEY: &str = "$deleted";

/// Root key every resolution writes (the conflict's id), so that a resolution is a change even
/// where it keeps the record exactly as it was.
pub const RESOLVED_KEY: &str = "$resolved";

/// The JSON object form of a record's fields.
pub type Fields = Map<String, Value>;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("field name {name:?} is reserved: names starting with `$` belong to Ferry")]
    ReservedField { name: String },
    #[error("the record nests objects and arrays deeper than {max} levels: flatten it")]
    TooDeep { max: usize },
    #[error("the record is {len} bytes as JSON, over the limit of {max}: split it into records")]
    TooLarge { len: usize, max: usize },
    #[error("stored record cannot be read as an Automerge document: {0}")]
    Corrupt(String),
    #[error("Automerge refused the operation: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("received bytes are not a valid Automerge change ({0}): fetch the change again")]
    InvalidChange(String),
    #[error(
        "{count} change(s) depend on changes this document does not hold (first missing: {first}): apply those first"
    )]
    MissingDependencies { count: usize, first: String },
    #[error(
        "Automerge failed applying the change ({0}): the change is malformed; the record must be loaded again"
    )]
    ApplyPanicked(String),
    #[error(
        "the change leaves a document Automerge cannot load again once saved ({0}): the change is malformed; the record must be loaded again"
    )]
    NotReloadable(String),
    #[error(
        "the document is not a JSON-shaped record: {0} (Ferry records hold JSON values: maps, lists, strings, numbers, booleans and null)"
    )]
    NotJsonShaped(String),
}

impl RecordError {
    /// The document the error came from was left empty, not as it was before the change: the
    /// caller loads it again before using it.
    pub fn needs_reload(&self) -> bool {
        matches!(
            self,
            RecordError::ApplyPanicked(_) | RecordError::NotReloadable(_)
        )
    }
}

const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// A whole document, as `save` writes it.
pub const CHUNK_DOCUMENT: u8 = 0;
/// One uncompressed change, as `Change::raw_bytes` gives it.
pub const CHUNK_CHANGE: u8 = 1;

/// Checks the framing of Automerge binary data before Automerge parses it: every chunk has the
/// magic bytes, one of the `allowed` types, a length within the input, and a checksum that
/// matches its contents. Ferry writes only document and uncompressed change chunks; refusing the
/// others keeps malformed input away from Automerge 0.12's bundle decoder, which can allocate
/// gigabytes on a corrupt length (found by fuzzing), and from inflating compressed chunks.
pub fn check_chunks(mut bytes: &[u8], allowed: &[u8]) -> Result<(), RecordError> {
    use sha2::Digest as _;
    let corrupt = |what: String| Err(RecordError::Corrupt(what));
    if bytes.is_empty() {
        return corrupt("no Automerge data".into());
    }
    while !bytes.is_empty() {
        // A chunk header: 4 magic bytes, a 4-byte checksum, the type, then the length.
        let Some((magic, rest)) = bytes.split_first_chunk::<4>() else {
            return corrupt("not an Automerge chunk (bad magic bytes)".into());
        };
        let (Some((checksum, rest)), true) = (rest.split_first_chunk::<4>(), *magic == CHUNK_MAGIC)
        else {
            return corrupt("not an Automerge chunk (bad magic bytes)".into());
        };
        let Some((&chunk_type, after_type)) = rest.split_first() else {
            return corrupt("not an Automerge chunk (bad magic bytes)".into());
        };
        if !allowed.contains(&chunk_type) {
            return corrupt(format!(
                "Automerge chunk type {chunk_type} is not accepted here"
            ));
        }
        let Some((len, len_bytes)) = read_uleb128(after_type) else {
            return corrupt("Automerge chunk length is malformed".into());
        };
        let Some((data, next)) = usize::try_from(len)
            .ok()
            .and_then(|len| after_type.get(len_bytes..)?.split_at_checked(len))
        else {
            return corrupt(format!("Automerge chunk of {len} bytes is truncated"));
        };
        let mut hasher = sha2::Sha256::new();
        hasher.update([chunk_type]);
        hasher.update(uleb128(data.len() as u64));
        hasher.update(data);
        if hasher.finalize().get(..4) != Some(&checksum[..]) {
            return corrupt("Automerge chunk checksum does not match its contents".into());
        }
        bytes = next;
    }
    Ok(())
}

/// The hash (hex) of one Automerge change given as its raw bytes: the SHA-256 its chunk header's
/// checksum is the start of, which is how Automerge names the change. `None` for anything but
/// one well-formed change chunk.
pub fn chunk_hash(bytes: &[u8]) -> Option<String> {
    Some(crate::hex::encode(&chunk_hash_bytes(bytes)?))
}

/// `chunk_hash` as the hash's 32 bytes.
pub fn chunk_hash_bytes(bytes: &[u8]) -> Option<[u8; 32]> {
    use sha2::Digest as _;
    check_chunks(bytes, &[CHUNK_CHANGE]).ok()?;
    let (len, len_bytes) = read_uleb128(bytes.get(9..)?)?;
    let data = bytes.get(9 + len_bytes..)?;
    if data.len() as u64 != len {
        return None;
    }
    let mut hasher = sha2::Sha256::new();
    hasher.update([CHUNK_CHANGE]);
    hasher.update(uleb128(len));
    hasher.update(data);
    Some(hasher.finalize().into())
}

fn read_uleb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn uleb128(value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    first_change::write_uleb(&mut out, value);
    out
}

/// Runs an Automerge decoder on bytes from disk or the network. Automerge 0.12's column decoder
/// can panic on malformed input (found by fuzzing `Record::load`; a saved crasher is in
/// fuzz/regressions/record_document), so a panic here is turned into `Corrupt` rather than
/// taking the process down.
fn decode_untrusted<T>(
    decode: impl FnOnce() -> Result<T, automerge::AutomergeError> + std::panic::UnwindSafe,
) -> Result<T, RecordError> {
    match std::panic::catch_unwind(decode) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(RecordError::Corrupt(e.to_string())),
        Err(_) => Err(RecordError::Corrupt(
            "the Automerge decoder failed on malformed bytes".into(),
        )),
    }
}

/// Whether every operation of `change` sets a scalar value (of a type Automerge knows) under a
/// top-level key no other operation of it uses, with no earlier operation it overwrites, and if
/// so whether one of them sets `$deleted` to true. On an empty document such a change has nothing
/// to refer to that could be missing, so it applies; the `remote_change` fuzz target checks that
/// against applying it.
fn top_level_scalars_only(change: &Change) -> Option<PlainFirst> {
    use automerge::legacy::{Key, ObjectId, OpType};
    let expanded = std::panic::catch_unwind(|| change.decode()).ok()?;
    let mut keys = std::collections::HashSet::with_capacity(expanded.operations.len());
    let mut deleted = false;
    let mut fields = Fields::new();
    for op in &expanded.operations {
        let OpType::Put(value) = &op.action else {
            return None;
        };
        let Key::Map(key) = &op.key else {
            return None;
        };
        let plain = matches!(op.obj, ObjectId::Root)
            && !op.insert
            && op.pred.is_empty()
            && !matches!(value, ScalarValue::Unknown { .. })
            && keys.insert(key.clone());
        if !plain {
            return None;
        }
        if key.as_str() == DELETED_KEY {
            deleted = matches!(value, ScalarValue::Boolean(true));
        } else if !key.starts_with('$') {
            fields.insert(key.to_string(), from_scalar(value));
        }
    }
    Some(PlainFirst { deleted, fields })
}

/// A new record's first change that only sets scalar values under distinct top-level keys (a
/// record created with scalar fields: the bulk of an initial sync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainFirst {
    /// It sets `$deleted` to true: the record it creates is a tombstone.
    pub deleted: bool,
    /// The fields it sets, as the record's view shows them (one change meets no other).
    pub fields: Fields,
}

impl PlainFirst {
    /// `change` as a plain first change: sequence number 1, no dependencies, and only new
    /// top-level scalars (see `top_level_scalars_only`). Such a change applies to an empty
    /// document, and its bytes are that document as they are: Automerge loads a change chunk
    /// as the document holding that change, so a device keeps it without applying and saving it.
    pub fn of(change: &Change) -> Option<PlainFirst> {
        if change.seq() != 1 || !change.deps().is_empty() {
            return None;
        }
        top_level_scalars_only(change)
    }
}

/// The time a change made at `now_ms` carries (Automerge's is signed; a later one saturates).
pub fn change_time(now_ms: u64) -> i64 {
    i64::try_from(now_ms).unwrap_or(i64::MAX)
}

/// The text a panic carried, for an error message.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// Whether `bytes` are exactly one change chunk, told from its header alone (the checksum and
/// the operations are not checked): a record's base that is its first change rather than a
/// saved document.
pub fn is_one_change(bytes: &[u8]) -> bool {
    let Some((magic, rest)) = bytes.split_first_chunk::<4>() else {
        return false;
    };
    let Some((&chunk_type, after_type)) = rest.get(4..).and_then(|r| r.split_first()) else {
        return false;
    };
    *magic == CHUNK_MAGIC
        && chunk_type == CHUNK_CHANGE
        && read_uleb128(after_type).is_some_and(|(len, len_bytes)| {
            usize::try_from(len).is_ok_and(|len| after_type.len() == len_bytes.saturating_add(len))
        })
}

/// Decodes one change received from another device or the relay. Only an uncompressed change
/// chunk is accepted, for the same reasons `check_chunks` gives for documents.
pub fn decode_change(bytes: &[u8]) -> Result<Change, RecordError> {
    check_chunks(bytes, &[CHUNK_CHANGE]).map_err(|e| RecordError::InvalidChange(e.to_string()))?;
    let change = std::panic::catch_unwind(|| Change::try_from(bytes)).map_err(|_| {
        RecordError::InvalidChange("the Automerge decoder failed on malformed bytes".into())
    })?;
    change.map_err(|e| RecordError::InvalidChange(e.to_string()))
}

/// What the header of one change says, read without decoding its operations: enough to place
/// the change in a record's history (which changes it follows, whose it is) when nothing needs
/// applying, as with a device's own changes coming back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeHeader {
    pub hash: ChangeHash,
    pub deps: Vec<ChangeHash>,
    pub actor: ActorId,
    pub seq: u64,
    pub message: Option<String>,
}

/// Reads the header of one uncompressed change chunk (the fields before its operation columns,
/// in Automerge's order: dependencies, actor, sequence number, first operation, time, message)
/// and its hash. Checks the chunk's framing and checksum as `decode_change` does, but not the
/// operations: a change that passes here may still fail to decode.
pub fn change_header(bytes: &[u8]) -> Result<ChangeHeader, RecordError> {
    use sha2::Digest as _;
    let invalid = |what: &str| RecordError::InvalidChange(format!("change header: {what}"));
    check_chunks(bytes, &[CHUNK_CHANGE]).map_err(|e| RecordError::InvalidChange(e.to_string()))?;
    // After the magic bytes, checksum and type (9 bytes): the body's length, then the body.
    let (len, len_bytes) = bytes
        .get(9..)
        .and_then(read_uleb128)
        .ok_or_else(|| invalid("no length"))?;
    let body = bytes
        .get(9 + len_bytes..)
        .filter(|body| body.len() as u64 == len)
        .ok_or_else(|| invalid("one change chunk expected"))?;
    let mut hasher = sha2::Sha256::new();
    hasher.update([CHUNK_CHANGE]);
    hasher.update(uleb128(len));
    hasher.update(body);
    let hash = ChangeHash(hasher.finalize().into());

    let mut rest = body;
    let uleb = |rest: &mut &[u8], what: &str| -> Result<u64, RecordError> {
        let (value, used) = read_uleb128(rest).ok_or_else(|| invalid(what))?;
        *rest = rest.get(used..).unwrap_or_default();
        Ok(value)
    };
    let take = |rest: &mut &[u8], n: u64, what: &str| -> Result<Vec<u8>, RecordError> {
        let n = usize::try_from(n).map_err(|_| invalid(what))?;
        let (taken, after) = rest.split_at_checked(n).ok_or_else(|| invalid(what))?;
        *rest = after;
        Ok(taken.to_vec())
    };
    let dep_count = uleb(&mut rest, "dependency count")?;
    let mut deps = Vec::new();
    for _ in 0..dep_count {
        let dep = take(&mut rest, 32, "dependency")?;
        deps.push(ChangeHash::try_from(dep.as_slice()).map_err(|_| invalid("dependency"))?);
    }
    let actor_len = uleb(&mut rest, "actor length")?;
    let actor = ActorId::from(take(&mut rest, actor_len, "actor")?);
    let seq = uleb(&mut rest, "sequence number")?;
    let _start_op = uleb(&mut rest, "first operation")?;
    // The time is signed LEB128, which reads as unsigned just as far.
    let _time = uleb(&mut rest, "time")?;
    let message_len = uleb(&mut rest, "message length")?;
    let message = String::from_utf8(take(&mut rest, message_len, "message")?)
        .map_err(|_| invalid("the message is not UTF-8"))?;
    Ok(ChangeHeader {
        hash,
        deps,
        actor,
        seq,
        message: (!message.is_empty()).then_some(message),
    })
}

/// A change's message: its operation (`put`, `patch`, `delete`, ...) on the first line; a
/// conflict's resolution adds a second line, `resolve <conflict id> <take>`, which every device
/// reads back to know the conflict settled.
pub fn operation_of(message: Option<&str>) -> &str {
    message.and_then(|m| m.lines().next()).unwrap_or("unknown")
}

/// The message of the change that writes a purged record again as a new history
/// (`Record::restore`).
pub const RESTORE_OPERATION: &str = "restore";

/// The message of the change the relay writes to start a record's history again from what it
/// shows, once its whole history is older than the log's horizon (`Record::flatten`). Devices
/// cannot write it: the relay refuses an upload that names it.
pub const FLATTEN_OPERATION: &str = "flatten";

/// The conflict id and the take word a resolution's message names (see [`operation_of`]).
pub fn resolved_conflict(message: Option<&str>) -> Option<(&str, &str)> {
    let line = message?.lines().nth(1)?;
    let mut words = line.split(' ');
    if words.next()? != "resolve" {
        return None;
    }
    Some((words.next()?, words.next()?))
}

/// The message of a change made by `operation` that resolves `conflict` taking `take`.
pub fn resolution_message(operation: &str, conflict: &str, take: &str) -> String {
    format!("{operation}\nresolve {conflict} {take}")
}

/// The result of a write that changed the record.
#[derive(Debug)]
pub struct Written {
    pub operation: Operation,
    pub change: Change,
}

/// One entry of a record's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    /// The change hash, hex.
    pub hash: String,
    /// The writing device's actor id, hex.
    pub device: String,
    /// Sequence number of this change among the device's changes to the record.
    pub seq: u64,
    /// Unix milliseconds as the writing device's clock had it.
    pub time: i64,
    /// `create`, `update` or `delete`; `unknown` for changes written by another program.
    pub operation: String,
    /// Top-level fields the change set or removed.
    pub fields: Vec<String>,
}

/// Checks a record's fields before any of them is written: reserved names, depth and size.
pub fn validate_fields(fields: &Fields, limits: &Limits) -> Result<(), RecordError> {
    if let Some(name) = fields.keys().find(|k| k.starts_with('$')) {
        return Err(RecordError::ReservedField { name: name.clone() });
    }
    if fields.values().any(crate::crypt::refuses_sealed) {
        return Err(RecordError::ReservedField {
            name: SEALED_KEY.into(),
        });
    }
    validate_shape(fields, limits)
}

/// `validate_fields` without the checks on names: for a record's whole state after a write,
/// which holds encrypted fields as markers.
pub fn validate_shape(fields: &Fields, limits: &Limits) -> Result<(), RecordError> {
    // The record's own object is level 1.
    for value in fields.values() {
        check_depth(value, 2, limits.max_depth)?;
    }
    let len = serde_json::to_vec(fields).map_or(usize::MAX, |v| v.len());
    if len > limits.max_record_bytes {
        return Err(RecordError::TooLarge {
            len,
            max: limits.max_record_bytes,
        });
    }
    Ok(())
}

fn check_depth(value: &Value, depth: usize, max: usize) -> Result<(), RecordError> {
    let children: Box<dyn Iterator<Item = &Value>> = match value {
        Value::Object(m) => Box::new(m.values()),
        Value::Array(a) => Box::new(a.iter()),
        _ => return Ok(()),
    };
    if depth > max {
        return Err(RecordError::TooDeep { max });
    }
    for child in children {
        check_depth(child, depth + 1, max)?;
    }
    Ok(())
}

/// A record document, loaded in memory.
pub struct Record {
    doc: AutoCommit,
    /// Top-level fields written as Automerge text (character-level merging).
    text: Arc<BTreeSet<String>>,
}

impl Record {
    /// A record that does not exist yet; its first write makes it.
    pub fn new(actor: &ActorId) -> Self {
        Record {
            doc: AutoCommit::new().with_actor(actor.clone()),
            text: Arc::default(),
        }
    }

    pub fn load(bytes: &[u8], actor: &ActorId) -> Result<Self, RecordError> {
        check_chunks(bytes, &[CHUNK_DOCUMENT, CHUNK_CHANGE])?;
        let doc = decode_untrusted(|| AutoCommit::load(bytes))?;
        Ok(Record {
            doc: doc.with_actor(actor.clone()),
            text: Arc::default(),
        })
    }

    /// A document made by any Automerge program, taken in whole with its history: its changes
    /// in an order that applies (each after its dependencies). Refused unless every value it
    /// shows is JSON (maps, lists, text, strings, numbers, booleans, null; `$deleted` a
    /// boolean): counters, timestamps, bytes and tables have no JSON form Ferry could write back.
    pub fn import(bytes: &[u8], actor: &ActorId) -> Result<(Record, Vec<Change>), RecordError> {
        let mut record = Record::load(bytes, actor)?;
        check_json_shaped(&record.doc, &ROOT, "")?;
        if let Ok(Some((value, _))) = record.doc.get(ROOT, DELETED_KEY)
            && !matches!(value, AmValue::Scalar(ref s) if matches!(**s, ScalarValue::Boolean(_)))
        {
            return Err(RecordError::NotJsonShaped(format!(
                "`{DELETED_KEY}` is not a boolean"
            )));
        }
        let changes = record.changes_after(&[])?;
        if changes.is_empty() {
            return Err(RecordError::NotJsonShaped(
                "the document holds no change".into(),
            ));
        }
        Ok((record, changes))
    }

    /// Writes the named top-level string fields as Automerge text from now on.
    pub fn with_text_fields(mut self, text: Arc<BTreeSet<String>>) -> Self {
        self.text = text;
        self
    }

    /// The document for reading, with nothing uncommitted.
    pub fn automerge(&mut self) -> &Automerge {
        self.doc.document()
    }

    /// The whole document with its history, in Automerge's binary format.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// True once any change has been written or received.
    pub fn exists(&mut self) -> bool {
        !self.doc.get_heads().is_empty()
    }

    pub fn is_deleted(&self) -> bool {
        matches!(
            self.doc.get(ROOT, DELETED_KEY),
            Ok(Some((AmValue::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Boolean(true))
        )
    }

    /// Exists and is not a tombstone.
    pub fn is_live(&mut self) -> bool {
        self.exists() && !self.is_deleted()
    }

    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The record's fields as JSON (reserved fields left out).
    pub fn fields(&self) -> Fields {
        let mut out = read_map(&self.doc, &ROOT);
        out.retain(|k, _| !k.starts_with('$'));
        out
    }

    /// Create or replace: afterwards the record holds exactly `fields`. Only the parts that differ
    /// are written, so a replace that changes one field conflicts with nobody else's fields.
    pub fn put(&mut self, fields: &Fields, now_ms: u64) -> Result<Option<Written>, RecordError> {
        if !self.exists() && self.doc.pending_ops() == 0 {
            // A new record's fields go in as one batch: the same operations, a fraction of
            // the cost of writing them one by one.
            let mut root = hydrate_map(fields, Some(&self.text), self.doc.text_encoding())?;
            root.insert(
                DELETED_KEY.to_owned(),
                hydrate::Value::Scalar(ScalarValue::Boolean(false)),
            );
            self.doc.init_root_from_hydrate(&root.into())?;
            return self.commit(Operation::Create.as_str(), Operation::Create, now_ms);
        }
        let operation = self.begin_write();
        self.replace_fields(fields)?;
        self.commit(operation.as_str(), operation, now_ms)
    }

    /// Stages the root fields as exactly `fields`, writing only what differs.
    fn replace_fields(&mut self, fields: &Fields) -> Result<(), RecordError> {
        let text = Arc::clone(&self.text);
        write_map(
            &mut self.doc,
            &ROOT,
            fields,
            Replace::RootFields,
            style(false, &text),
        )
    }

    /// Merge `set` into the record's fields and remove the fields named in `unset`. The record
    /// must be live (the caller checks).
    pub fn patch(
        &mut self,
        set: &Fields,
        unset: &[String],
        now_ms: u64,
    ) -> Result<Option<Written>, RecordError> {
        if let Some(name) = unset.iter().find(|k| k.starts_with('$')) {
            return Err(RecordError::ReservedField { name: name.clone() });
        }
        // A field both set and unset ends up set: writing over it is enough, and deleting it first
        // would make a change even when the value is already there.
        for key in unset.iter().filter(|k| !set.contains_key(k.as_str())) {
            if self.doc.get(ROOT, key.as_str())?.is_some() {
                self.doc.delete(ROOT, key.as_str())?;
            }
        }
        let text = Arc::clone(&self.text);
        write_map(&mut self.doc, &ROOT, set, Replace::No, style(false, &text))?;
        self.commit("update", Operation::Update, now_ms)
    }

    /// Mark the record deleted. Its fields stay in the document, so that a concurrent update can
    /// bring the record back whole.
    pub fn delete(&mut self, now_ms: u64) -> Result<Option<Written>, RecordError> {
        self.write_deleted(true)?;
        self.commit("delete", Operation::Delete, now_ms)
    }

    /// Writes `$deleted` as a new operation even when the value is already there: a delete (or
    /// a re-create) must come after every write it saw, or a delete an update outlived would
    /// still be outlived by that update.
    fn write_deleted(&mut self, deleted: bool) -> Result<(), RecordError> {
        if self.doc.get(ROOT, DELETED_KEY)?.is_some() {
            self.doc.delete(ROOT, DELETED_KEY)?;
        }
        self.doc.put(ROOT, DELETED_KEY, deleted)?;
        Ok(())
    }

    /// A write on a record whose shown state (`shown`, as its strategy settles concurrent values)
    /// is not what Automerge's merge gives: only the fields whose shown value differs from the
    /// wanted one are written (each then replaces every concurrent value it saw), and fields
    /// absent from `target` are removed only when `replace` (a put) or named in `unset`. Fields
    /// the write leaves alone keep their concurrent values, so a value written elsewhere at the
    /// same time is never overwritten by a write that did not ask for that field.
    pub fn write_over(
        &mut self,
        shown: &Fields,
        shown_live: bool,
        target: &Fields,
        removal: Removal<'_>,
        now_ms: u64,
    ) -> Result<Option<Written>, RecordError> {
        let operation = if shown_live {
            Operation::Update
        } else {
            self.write_deleted(false)?;
            Operation::Create
        };
        let removed: Vec<&String> = match removal {
            Removal::Absent => shown.keys().filter(|k| !target.contains_key(*k)).collect(),
            Removal::Named(names) => names
                .iter()
                .filter(|k| !target.contains_key(*k) && shown.contains_key(*k))
                .collect(),
        };
        for key in removed {
            if key.starts_with('$') {
                return Err(RecordError::ReservedField { name: key.clone() });
            }
            self.doc.delete(ROOT, key.as_str())?;
        }
        let text = Arc::clone(&self.text);
        for (key, value) in target {
            let unchanged = shown.get(key).is_some_and(|old| {
                same_values(std::slice::from_ref(old), std::slice::from_ref(value))
            });
            if !unchanged {
                write_at_key(&mut self.doc, &ROOT, key, value, style(true, &text))?;
            }
        }
        self.commit(operation.as_str(), operation, now_ms)
    }

    /// Makes the document hold exactly `fields` and the `deleted` state, whatever Automerge's own
    /// merge shows now: keys still holding concurrent values are written even where the value
    /// Automerge picks is already right, so that the change settles them. Used when the record
    /// shows a state its strategy chose over Automerge's merge (the write must build on what the
    /// writer saw), and for resolutions, whose `message` names the conflict; a resolution always
    /// makes a change (it writes `RESOLVED_KEY`).
    pub fn materialize(
        &mut self,
        fields: &Fields,
        deleted: bool,
        operation: Operation,
        resolution: Option<(&str, String)>,
        now_ms: u64,
    ) -> Result<Option<Written>, RecordError> {
        let text = Arc::clone(&self.text);
        let style = style(true, &text);
        if deleted {
            // A tombstone keeps its fields, so that a concurrent update can bring it back whole.
            write_map(&mut self.doc, &ROOT, fields, Replace::No, style)?;
        } else {
            write_map(&mut self.doc, &ROOT, fields, Replace::RootFields, style)?;
        }
        self.write_deleted(deleted)?;
        let message = match resolution {
            Some((conflict, message)) => {
                self.doc.put(ROOT, RESOLVED_KEY, conflict)?;
                message
            }
            None => operation.as_str().to_owned(),
        };
        self.commit(&message, operation, now_ms)
    }

    /// Writes a purged record again as a new history, on an empty document: exactly `fields`,
    /// and `deleted` as its device showed it, in one change whose message is
    /// [`RESTORE_OPERATION`] (PROTOCOL.md, section 5.8).
    pub fn restore_purged(
        &mut self,
        fields: &Fields,
        deleted: bool,
        now_ms: u64,
    ) -> Result<Option<Written>, RecordError> {
        self.replace_fields(fields)?;
        self.doc.put(ROOT, DELETED_KEY, deleted)?;
        let operation = if deleted {
            Operation::Delete
        } else {
            Operation::Create
        };
        self.commit(RESTORE_OPERATION, operation, now_ms)
    }

    /// Writes a record's history again as one change on an empty document: exactly `fields`,
    /// live, in a change whose message is [`FLATTEN_OPERATION`] (PROTOCOL.md, section 5.8).
    pub fn flatten(
        &mut self,
        fields: &Fields,
        now_ms: u64,
    ) -> Result<Option<Written>, RecordError> {
        self.replace_fields(fields)?;
        self.doc.put(ROOT, DELETED_KEY, false)?;
        self.commit(FLATTEN_OPERATION, Operation::Create, now_ms)
    }

    /// The flatten change the document's history starts with, if it starts with one (a history
    /// the relay started again, PROTOCOL.md section 5.8).
    pub fn flatten_change(&mut self) -> Option<ChangeHash> {
        self.doc
            .get_changes(&[])
            .iter()
            .find(|change| {
                change.deps().is_empty() && operation_of(change.message()) == FLATTEN_OPERATION
            })
            .map(|change| change.hash())
    }

    /// Whether any key or list position of the document, at any depth, holds concurrent values
    /// (what a strategy settles at read time, and a flattened history could not keep).
    pub fn has_concurrent_values(&self) -> Result<bool, RecordError> {
        let doc = &self.doc;
        let mut objects = vec![ROOT];
        while let Some(obj) = objects.pop() {
            let (keys, positions): (Vec<String>, usize) = match doc.object_type(&obj) {
                Ok(ObjType::Map | ObjType::Table) => (doc.keys(&obj).collect(), 0),
                Ok(ObjType::List) => (Vec::new(), doc.length(&obj)),
                // Concurrent edits of a text merge into one sequence: nothing to settle.
                Ok(ObjType::Text) => continue,
                Err(e) => return Err(e.into()),
            };
            let props = keys
                .into_iter()
                .map(Prop::Map)
                .chain((0..positions).map(Prop::Seq));
            for prop in props {
                let values = doc.get_all(&obj, prop)?;
                if values.len() > 1 {
                    return Ok(true);
                }
                for (value, id) in values {
                    if let AmValue::Object(_) = value {
                        objects.push(id);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Starts a put: a put on a missing or deleted record is a create, and clears the tombstone.
    fn begin_write(&mut self) -> Operation {
        if self.is_live() {
            return Operation::Update;
        }
        // The explicit `false` also gives a create with no fields an operation to carry.
        let _ = self.doc.put(ROOT, DELETED_KEY, false);
        Operation::Create
    }

    fn commit(
        &mut self,
        message: &str,
        operation: Operation,
        now_ms: u64,
    ) -> Result<Option<Written>, RecordError> {
        let time = change_time(now_ms);
        let options = CommitOptions::default()
            .with_message(message)
            .with_time(time);
        if self.doc.commit_with(options).is_none() {
            return Ok(None);
        }
        let change = self
            .doc
            .get_last_local_change()
            .ok_or_else(|| RecordError::Corrupt("committed change not found".into()))?;
        Ok(Some(Written { operation, change }))
    }

    /// Drops uncommitted operations (after a failed write).
    pub fn rollback(&mut self) {
        self.doc.rollback();
    }

    /// Every change of the record, oldest first, with the top-level fields each one touched.
    /// The changes this document holds that `have` does not cover, in an order they apply in.
    /// Inside `catch_unwind` for the reason `history` gives: the document may come from
    /// elsewhere (a snapshot page).
    pub fn changes_after(&mut self, have: &[ChangeHash]) -> Result<Vec<Change>, RecordError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.doc.get_changes(have)))
            .map_err(|panic| {
                RecordError::Corrupt(format!(
                    "its changes cannot be read ({})",
                    panic_message(&*panic)
                ))
            })
    }

    pub fn history(&mut self) -> Result<Vec<HistoryEntry>, RecordError> {
        // Automerge 0.12 can panic reading the changes of a document that loaded but holds
        // inconsistent ones (a change logged before every change was checked).
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let changes = self.doc.get_changes(&[]);
            changes
                .iter()
                .map(|change| {
                    let fields = self.fields_touched(change);
                    HistoryEntry {
                        hash: change.hash().to_string(),
                        device: change.actor_id().to_hex_string(),
                        seq: change.seq(),
                        time: change.timestamp(),
                        operation: operation_of(change.message()).to_owned(),
                        fields,
                    }
                })
                .collect()
        }))
        .map_err(|panic| {
            RecordError::Corrupt(format!(
                "its changes cannot be read ({})",
                panic_message(&*panic)
            ))
        })
    }

    fn fields_touched(&mut self, change: &Change) -> Vec<String> {
        let patches = self.doc.diff(change.deps(), &[change.hash()]);
        let mut names = BTreeSet::new();
        for patch in patches {
            let top = match (patch.path.first(), &patch.action) {
                (Some((_, Prop::Map(key))), _) => Some(key.clone()),
                (None, PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key }) => {
                    Some(key.clone())
                }
                (
                    None,
                    PatchAction::Conflict {
                        prop: Prop::Map(key),
                    },
                ) => Some(key.clone()),
                _ => None,
            };
            if let Some(name) = top.filter(|n| !n.starts_with('$')) {
                names.insert(name);
            }
        }
        names.into_iter().collect()
    }

    /// Applies changes received from elsewhere, in any order. Changes already in the document are
    /// skipped, so applying the same changes twice is harmless. Returns whether the document
    /// changed. On any error the document is left exactly as it was: every change is decoded and
    /// its dependencies are checked (against the document and the other changes given) before
    /// Automerge sees any of them, because Automerge would otherwise keep a change with missing
    /// dependencies queued out of sight instead of refusing it.
    pub fn apply_changes(&mut self, changes: &[Vec<u8>]) -> Result<bool, RecordError> {
        let decoded = changes
            .iter()
            .map(|bytes| decode_change(bytes))
            .collect::<Result<Vec<_>, _>>()?;
        self.apply_decoded(decoded)
    }

    /// As `apply_changes`, for changes already decoded (with `decode_change`).
    pub fn apply_decoded(&mut self, changes: Vec<Change>) -> Result<bool, RecordError> {
        let fresh: Vec<Change> = changes
            .into_iter()
            .filter(|c| self.doc.get_change_meta_by_hash(&c.hash()).is_none())
            .collect();
        if fresh.is_empty() {
            return Ok(false);
        }
        let incoming: std::collections::HashSet<ChangeHash> =
            fresh.iter().map(Change::hash).collect();
        let mut missing = Vec::new();
        for change in &fresh {
            for dep in change.deps() {
                if !incoming.contains(dep) && self.doc.get_change_meta_by_hash(dep).is_none() {
                    missing.push(*dep);
                }
            }
        }
        if let Some(first) = missing.first() {
            return Err(RecordError::MissingDependencies {
                count: missing.len(),
                first: first.to_string(),
            });
        }
        let before = self.doc.get_heads();
        // Automerge 0.12 panics on some changes that decode fine, such as an operation on an
        // object the document does not have ("Missing from Index"). After a panic the document's
        // state is unknown, so it is replaced by an empty one and the caller loads it again.
        let doc = &mut self.doc;
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply_changes(fresh)));
        match applied {
            Ok(Ok(())) => Ok(self.doc.get_heads() != before),
            Ok(Err(e)) => {
                self.restore(&before)?;
                Err(e.into())
            }
            Err(panic) => {
                let actor = self.doc.get_actor().clone();
                self.doc = AutoCommit::new().with_actor(actor);
                Err(RecordError::ApplyPanicked(panic_message(panic.as_ref())))
            }
        }
    }

    /// As `apply_decoded`, and the document, saved, must load again. Automerge 0.12 built
    /// without debug assertions (as it ships) applies some malformed changes without complaint
    /// and saves a document it cannot load: an actor's change not built on its previous one (it
    /// has none as a dependency, direct or not), or one numbering its operations no higher than
    /// those of a change it is built on or of its actor's previous change (the hostile uploads
    /// of `tests/relay_store.rs::a_change_that_leaves_a_document_that_cannot_be_loaded_is_refused`).
    /// No check of a change's fields on its own finds every such shape, so the saved document
    /// is loaded. Changes that all start their actor's sequence and depend on nothing (a new
    /// record's first change, the bulk of an initial sync) have no order to break and skip it.
    /// On `NotReloadable` the document is left empty, as after a panic: the caller loads it
    /// again (`RecordError::needs_reload`).
    pub fn apply_reloadable(&mut self, changes: Vec<Change>) -> Result<bool, RecordError> {
        let first_changes = changes.iter().all(|c| c.seq() == 1 && c.deps().is_empty());
        let changed = self.apply_decoded(changes)?;
        if !changed || first_changes {
            return Ok(changed);
        }
        let actor = self.doc.get_actor().clone();
        let doc = &mut self.doc;
        let reloaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.save()))
            .map_err(|panic| panic_message(panic.as_ref()))
            .and_then(|saved| match Record::load(&saved, &actor) {
                Ok(_) => Ok(()),
                Err(RecordError::Corrupt(why)) => Err(why),
                Err(e) => Err(e.to_string()),
            });
        match reloaded {
            Ok(()) => Ok(changed),
            Err(why) => {
                self.doc = AutoCommit::new().with_actor(actor);
                Err(RecordError::NotReloadable(why))
            }
        }
    }

    /// Checks that `change` applies as the first change of a new record, without keeping the
    /// record. A change that only sets scalar values under distinct top-level keys, with
    /// nothing before them (a record created with scalar fields: the bulk of new records), is
    /// checked by its shape, which takes a sixth of the time applying it does (see
    /// `top_level_scalars_only`); any other is applied to a bare Automerge document
    /// (`apply_decoded` explains the guard).
    pub fn check_first(change: Change) -> Result<(), RecordError> {
        if let Some(dep) = change.deps().first() {
            return Err(RecordError::MissingDependencies {
                count: change.deps().len(),
                first: dep.to_string(),
            });
        }
        if top_level_scalars_only(&change).is_some() {
            return Ok(());
        }
        Self::apply_first(change)
    }

    /// `check_first` without the shortcut: `change` applied to a bare Automerge document.
    pub fn apply_first(change: Change) -> Result<(), RecordError> {
        let mut doc = Automerge::new();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply_changes([change])))
        {
            Ok(applied) => Ok(applied?),
            Err(panic) => Err(RecordError::ApplyPanicked(panic_message(panic.as_ref()))),
        }
    }

    /// The sequence number of `actor`'s latest change to this record (0 when it has none): the
    /// next change of that actor must have this plus one. Automerge 0.12 rebuilds the change
    /// from the document's columns to answer, which can panic on a document some other device's
    /// change left inconsistent (seen in release builds): that is `ApplyPanicked`, and the
    /// document must be loaded again.
    pub fn last_seq_of(&mut self, actor: &ActorId) -> Result<u64, RecordError> {
        let own = self.doc.get_actor().clone();
        self.doc.set_actor(actor.clone());
        let seq = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.doc.get_last_local_change().map_or(0, |c| c.seq())
        }));
        self.doc.set_actor(own);
        seq.map_err(|panic| RecordError::ApplyPanicked(panic_message(panic.as_ref())))
    }

    /// Puts the document back to `heads` after Automerge failed half way through applying
    /// changes. Rebuilding from the change graph is slow but only runs on this error path.
    fn restore(&mut self, heads: &[ChangeHash]) -> Result<(), RecordError> {
        let actor = self.doc.get_actor().clone();
        let doc = if heads.is_empty() {
            AutoCommit::new()
        } else {
            self.doc.fork_at(heads)?
        };
        self.doc = doc.with_actor(actor);
        Ok(())
    }

    /// Whether the record holds the change `hash`.
    pub fn has_change(&mut self, hash: &ChangeHash) -> bool {
        self.doc.get_change_by_hash(hash).is_some()
    }

    /// The record as it was at `heads` (every change they cover, and no other), writing as the
    /// same actor: a write to it is concurrent with the changes made since. Each of `heads` must
    /// be one of the record's changes (`has_change`).
    pub fn fork_at(&mut self, heads: &[ChangeHash]) -> Result<Record, RecordError> {
        let actor = self.doc.get_actor().clone();
        Ok(Record {
            doc: self.doc.fork_at(heads)?.with_actor(actor),
            text: self.text.clone(),
        })
    }

    /// A copy of the record (every change it holds) that writes as `actor`.
    pub fn fork_as(&mut self, actor: &ActorId) -> Record {
        Record {
            doc: self.doc.fork().with_actor(actor.clone()),
            text: self.text.clone(),
        }
    }

    /// The latest change this record holds from its own actor (the one it writes as), if any.
    pub fn own_last_change(&mut self) -> Option<ChangeHash> {
        let actor = self.doc.get_actor().clone();
        self.doc
            .get_changes(&[])
            .into_iter()
            .filter(|c| c.actor_id() == &actor)
            .max_by_key(|c| c.seq())
            .map(|c| c.hash())
    }

    /// The Automerge document itself, for callers that need Automerge's own API.
    pub fn doc_mut(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }
}

/// Which fields a `write_over` removes.
#[derive(Clone, Copy)]
pub enum Removal<'a> {
    /// Every shown field the target does not hold (a put: the record becomes the target).
    Absent,
    /// These fields (a patch's `unset`).
    Named(&'a [String]),
}

/// How `write_map` treats keys that the new value does not mention.
#[derive(Clone, Copy, PartialEq)]
enum Replace {
    /// Keep them (patch).
    No,
    /// Remove them: the map becomes exactly the new value.
    All,
    /// Remove them except Ferry's reserved root keys.
    RootFields,
}

/// How values are written.
#[derive(Clone, Copy)]
struct Style<'a> {
    /// Write keys that hold concurrent values even when the value Automerge shows is equal, so
    /// that the change settles them.
    settle: bool,
    /// String fields of this map to write as Automerge text (only the record's top level has any).
    text: Option<&'a BTreeSet<String>>,
}

fn style(settle: bool, text: &BTreeSet<String>) -> Style<'_> {
    Style {
        settle,
        text: Some(text),
    }
}

impl Style<'_> {
    fn nested(self) -> Self {
        Style { text: None, ..self }
    }
}

fn write_map(
    doc: &mut AutoCommit,
    obj: &ObjId,
    fields: &Fields,
    replace: Replace,
    style: Style<'_>,
) -> Result<(), RecordError> {
    if replace != Replace::No {
        let stale: Vec<String> = doc
            .keys(obj)
            .filter(|k| !fields.contains_key(k))
            .filter(|k| !(replace == Replace::RootFields && k.starts_with('$')))
            .collect();
        for key in stale {
            doc.delete(obj, key.as_str())?;
        }
    }
    for (key, value) in fields {
        write_at_key(doc, obj, key, value, style)?;
    }
    Ok(())
}

/// Writes `value` at `key`, doing nothing where the document already holds an equal value, and
/// updating a nested map in place rather than replacing it.
fn write_at_key(
    doc: &mut AutoCommit,
    obj: &ObjId,
    key: &str,
    value: &Value,
    style: Style<'_>,
) -> Result<(), RecordError> {
    let existing = if style.settle && doc.get_all(obj, key)?.len() > 1 {
        // Treat the key as empty, so the value is written and replaces every concurrent one.
        None
    } else {
        doc.get(obj, key)?.map(|(v, id)| (v.to_owned(), id))
    };
    let nested = style.nested();
    match (value, existing) {
        (Value::Object(map), existing) if map.contains_key(SEALED_KEY) => {
            // An encrypted field: its envelope is one bytes scalar, so concurrent writes settle
            // it as a whole value like any scalar. (Users cannot write the marker; it comes from
            // a read of the document, and a bytes value read anywhere is written back as one.)
            write_scalar(
                doc,
                obj,
                key,
                ScalarValue::Bytes(sealed_bytes(value)?),
                existing,
            )
        }
        (Value::Object(map), Some((AmValue::Object(ObjType::Map), id))) => {
            write_map(doc, &id, map, Replace::All, nested)
        }
        (Value::Object(map), _) => {
            let id = doc.put_object(obj, key, ObjType::Map)?;
            write_map(doc, &id, map, Replace::All, nested)
        }
        (Value::Array(items), existing) => {
            if let Some((AmValue::Object(ObjType::List), id)) = &existing
                && same_values(&read_list(doc, id), items)
            {
                return Ok(());
            }
            let id = doc.put_object(obj, key, ObjType::List)?;
            insert_items(doc, &id, items, nested)
        }
        (Value::String(text), existing) if style.text.is_some_and(|t| t.contains(key)) => {
            let id = match existing {
                Some((AmValue::Object(ObjType::Text), id)) => id,
                _ => doc.put_object(obj, key, ObjType::Text)?,
            };
            // Only the characters that differ are written, so concurrent edits to other parts
            // of the text both survive.
            doc.update_text(&id, text)?;
            Ok(())
        }
        (scalar, existing) => write_scalar(doc, obj, key, to_scalar(scalar), existing),
    }
}

fn write_scalar(
    doc: &mut AutoCommit,
    obj: &ObjId,
    key: &str,
    new: ScalarValue,
    existing: Option<(AmValue<'_>, ObjId)>,
) -> Result<(), RecordError> {
    if let Some((AmValue::Scalar(old), _)) = &existing {
        if same_scalar(old.as_ref(), &new) {
            return Ok(());
        }
        if old.as_ref() == &new {
            // Automerge skips a put of a value equal to the current one, and `0.0 ==
            // -0.0`: remove the old value first so that the new sign is written.
            doc.delete(obj, key)?;
        }
    }
    doc.put(obj, key, new)?;
    Ok(())
}

/// Scalar equality as JSON sees it: `==` on floats would take `0.0` and `-0.0` for the same value
/// and skip the write, leaving the record with the old sign.
fn same_scalar(a: &ScalarValue, b: &ScalarValue) -> bool {
    match (a, b) {
        (ScalarValue::F64(x), ScalarValue::F64(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

/// `same_scalar`'s rule for JSON values, element by element.
fn same_values(a: &[Value], b: &[Value]) -> bool {
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
                x.as_f64().map(f64::to_bits) == y.as_f64().map(f64::to_bits)
            }
            (Value::Array(x), Value::Array(y)) => same_values(x, y),
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            _ => a == b,
        }
    }
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
}

/// The bytes a marker (`crate::crypt::marker`) stands for.
fn sealed_bytes(marker: &Value) -> Result<Vec<u8>, RecordError> {
    crate::crypt::marker_bytes(marker).ok_or_else(|| {
        RecordError::Corrupt("a value holds a malformed encrypted-value marker".into())
    })
}

fn insert_items(
    doc: &mut AutoCommit,
    list: &ObjId,
    items: &[Value],
    style: Style<'_>,
) -> Result<(), RecordError> {
    for (index, item) in items.iter().enumerate() {
        match item {
            Value::Object(map) if map.contains_key(SEALED_KEY) => {
                doc.insert(list, index, ScalarValue::Bytes(sealed_bytes(item)?))?
            }
            Value::Object(map) => {
                let id = doc.insert_object(list, index, ObjType::Map)?;
                write_map(doc, &id, map, Replace::All, style)?;
            }
            Value::Array(inner) => {
                let id = doc.insert_object(list, index, ObjType::List)?;
                insert_items(doc, &id, inner, style)?;
            }
            scalar => doc.insert(list, index, to_scalar(scalar))?,
        }
    }
    Ok(())
}

/// `fields` as the operations `write_map` would write into an empty map, for one batch: the
/// fields named in `text` (at the root only) as text objects, encrypted values as bytes.
fn hydrate_map(
    fields: &Fields,
    text: Option<&BTreeSet<String>>,
    encoding: TextEncoding,
) -> Result<std::collections::HashMap<String, hydrate::Value>, RecordError> {
    fields
        .iter()
        .map(|(key, value)| {
            let value = match value {
                Value::String(s) if text.is_some_and(|t| t.contains(key)) => {
                    hydrate::Value::Text(hydrate::Text::new(encoding, s))
                }
                value => hydrate_value(value, encoding)?,
            };
            Ok((key.clone(), value))
        })
        .collect()
}

fn hydrate_value(value: &Value, encoding: TextEncoding) -> Result<hydrate::Value, RecordError> {
    Ok(match value {
        Value::Object(map) if map.contains_key(SEALED_KEY) => {
            hydrate::Value::Scalar(ScalarValue::Bytes(sealed_bytes(value)?))
        }
        Value::Object(map) => hydrate::Value::Map(hydrate_map(map, None, encoding)?.into()),
        Value::Array(items) => hydrate::Value::List(
            items
                .iter()
                .map(|item| hydrate_value(item, encoding))
                .collect::<Result<Vec<_>, _>>()?
                .into(),
        ),
        scalar => hydrate::Value::Scalar(to_scalar(scalar)),
    })
}

/// JSON scalar to Automerge scalar. Integers keep their exact type: i64 where it fits, u64 above.
fn to_scalar(value: &Value) -> ScalarValue {
    match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::String(s) => ScalarValue::Str(s.as_str().into()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::Array(_) | Value::Object(_) => ScalarValue::Null,
    }
}

fn read_map(doc: &AutoCommit, obj: &ObjId) -> Fields {
    let mut out = Map::new();
    for key in doc.keys(obj) {
        if let Ok(Some((value, id))) = doc.get(obj, key.as_str()) {
            out.insert(key, read_value(doc, value, &id));
        }
    }
    out
}

fn read_list(doc: &AutoCommit, obj: &ObjId) -> Vec<Value> {
    (0..doc.length(obj))
        .filter_map(|i| doc.get(obj, i).ok().flatten())
        .map(|(value, id)| read_value(doc, value, &id))
        .collect()
}

fn read_value(doc: &AutoCommit, value: AmValue<'_>, id: &ObjId) -> Value {
    match value {
        AmValue::Object(ObjType::Map | ObjType::Table) => Value::Object(read_map(doc, id)),
        AmValue::Object(ObjType::List) => Value::Array(read_list(doc, id)),
        AmValue::Object(ObjType::Text) => Value::String(doc.text(id).unwrap_or_default()),
        AmValue::Scalar(s) => from_scalar(&s),
    }
}

/// Refuses a value under `obj` (at `path`) that has no JSON form: a table, a counter, a
/// timestamp, bytes or an unknown scalar.
fn check_json_shaped(doc: &AutoCommit, obj: &ObjId, path: &str) -> Result<(), RecordError> {
    let refuse =
        |at: String, what: &str| Err(RecordError::NotJsonShaped(format!("`{at}` holds {what}")));
    let check = |at: String, value: AmValue<'_>, id: ObjId| -> Result<(), RecordError> {
        match value {
            AmValue::Object(ObjType::Map | ObjType::List) => check_json_shaped(doc, &id, &at),
            AmValue::Object(ObjType::Text) => Ok(()),
            AmValue::Object(ObjType::Table) => refuse(at, "a table"),
            AmValue::Scalar(s) => match s.as_ref() {
                ScalarValue::Counter(_) => refuse(at, "a counter"),
                ScalarValue::Timestamp(_) => refuse(at, "a timestamp"),
                ScalarValue::Bytes(_) => refuse(at, "bytes"),
                ScalarValue::Unknown { .. } => refuse(at, "a value of an unknown type"),
                ScalarValue::F64(f) if !f.is_finite() => refuse(at, "a number JSON cannot hold"),
                _ => Ok(()),
            },
        }
    };
    match doc.object_type(obj) {
        Ok(ObjType::List) => {
            for index in 0..doc.length(obj) {
                if let Ok(Some((value, id))) = doc.get(obj, index) {
                    check(format!("{path}[{index}]"), value, id)?;
                }
            }
        }
        _ => {
            for key in doc.keys(obj) {
                if let Ok(Some((value, id))) = doc.get(obj, key.as_str()) {
                    let at = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    check(at, value, id)?;
                }
            }
        }
    }
    Ok(())
}

/// Automerge scalar to JSON. A bytes value (an encrypted field's envelope) becomes its marker,
/// which the store opens before anyone reads it. Types Ferry never writes (counters,
/// timestamps) come from other Automerge programs and map to the nearest JSON value.
pub(crate) fn from_scalar(value: &ScalarValue) -> Value {
    match value {
        ScalarValue::Null | ScalarValue::Unknown { .. } => Value::Null,
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Str(s) => Value::String(s.to_string()),
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Value::Number((*i).into()),
        ScalarValue::Uint(u) => Value::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        ScalarValue::Counter(c) => Value::Number(i64::from(c).into()),
        // Ferry writes bytes for encrypted fields only, so every bytes value is taken for one: a
        // damaged or foreign one then fails to decrypt visibly instead of passing for data.
        ScalarValue::Bytes(b) => crate::crypt::marker(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn actor(n: u8) -> ActorId {
        ActorId::from(&[n; 16][..])
    }

    fn obj(v: Value) -> Fields {
        match v {
            Value::Object(m) => m,
            _ => panic!("test value must be an object"),
        }
    }

    #[test]
    fn one_change_is_told_from_a_saved_document_and_from_several_changes() {
        let mut record = Record::new(&actor(1));
        let first = record
            .put(&obj(json!({"a": 1})), 1_000)
            .unwrap()
            .unwrap()
            .change;
        let first = first.raw_bytes().to_vec();
        assert!(is_one_change(&first));
        let second = record
            .put(&obj(json!({"a": 2})), 1_001)
            .unwrap()
            .unwrap()
            .change;
        assert!(!is_one_change(
            &[first.as_slice(), second.raw_bytes()].concat()
        ));
        assert!(!is_one_change(&record.save()));
        assert!(!is_one_change(&first[..first.len() - 1]));
        assert!(!is_one_change(&[first.as_slice(), &[0]].concat()));
        assert!(!is_one_change(&[]));
    }

    proptest::proptest! {
        /// A change header read by hand says what Automerge reads in the whole change: for
        /// creates, updates on top of several concurrent changes, deletes, resolutions' messages.
        #[test]
        fn a_change_header_matches_the_decoded_change(
            writes in proptest::collection::vec(
                (0u8..3, proptest::collection::btree_map("[a-z]{1,3}", 0i64..1000, 0..5), 0u8..4),
                1..8,
            ),
        ) {
            let mut devices = [Record::new(&actor(1)), Record::new(&actor(2)), Record::new(&actor(3))];
            let mut now = 1_000;
            for (device, fields, op) in writes {
                now += 1;
                let record = &mut devices[usize::from(device)];
                let fields: Fields = fields.into_iter().map(|(k, v)| (k, json!(v))).collect();
                let written = match op {
                    0 => record.delete(now).unwrap(),
                    _ => record.put(&fields, now).unwrap(),
                };
                let Some(written) = written else { continue };
                let change = written.change;
                let header = change_header(change.raw_bytes()).unwrap();
                proptest::prop_assert_eq!(header.hash, change.hash());
                proptest::prop_assert_eq!(&header.deps, &change.deps().to_vec());
                proptest::prop_assert_eq!(&header.actor, change.actor_id());
                proptest::prop_assert_eq!(header.seq, change.seq());
                proptest::prop_assert_eq!(header.message.as_deref(), change.message());
                // Everyone hears of it, so that later changes depend on several.
                for other in devices.iter_mut() {
                    other.apply_changes(&[change.raw_bytes().to_vec()]).unwrap();
                }
            }
        }
    }

    #[test]
    fn a_change_header_refuses_what_is_not_one_change() {
        let mut r = Record::new(&actor(1));
        let change = r.put(&obj(json!({"a": 1})), 5).unwrap().unwrap().change;
        let bytes = change.raw_bytes().to_vec();
        assert!(change_header(&bytes[..bytes.len() - 1]).is_err());
        assert!(change_header(&[bytes.clone(), bytes.clone()].concat()).is_err());
        assert!(change_header(&r.save()).is_err());
        assert!(change_header(&[]).is_err());
    }

    #[test]
    fn every_json_type_round_trips_through_save_and_load() {
        let fields = obj(json!({
            "s": "héllo wörld ✓ 🚢 \u{0} \"quoted\"",
            "i": -42, "big": 18446744073709551615u64, "min": i64::MIN,
            "f": 1.5, "f0": 1.0, "tiny": 1e-300,
            "t": true, "n": null,
            "arr": [1, "two", [3, [4]], {"five": 5}, null],
            "nested": {"a": {"b": {"c": {"d": []}}}},
            "empty_obj": {}, "": "empty key"
        }));
        let mut r = Record::new(&actor(1));
        let w = r.put(&fields, 1000).unwrap().unwrap();
        assert_eq!(w.operation, Operation::Create);
        let bytes = r.save();
        let back = Record::load(&bytes, &actor(2)).unwrap();
        assert_eq!(back.fields(), fields);
        assert_eq!(
            serde_json::to_string(&back.fields()).unwrap(),
            serde_json::to_string(&fields).unwrap()
        );
    }

    /// A new record's fields go in as one batch (`init_root_from_hydrate`): its first change,
    /// loaded as the document the store keeps, shows the fields, a text field as text.
    #[test]
    fn a_new_records_first_change_loads_as_its_document_with_its_text_fields() {
        let text: Arc<BTreeSet<String>> = Arc::new(["notes".to_owned()].into());
        let fields = obj(json!({"notes": "héllo 🚢", "n": 1, "l": ["x", {"k": 2.5}]}));
        let mut r = Record::new(&actor(1)).with_text_fields(text.clone());
        let w = r.put(&fields, 1).unwrap().unwrap();
        assert_eq!(w.operation, Operation::Create);
        let mut back = Record::load(w.change.raw_bytes(), &actor(2))
            .unwrap()
            .with_text_fields(text);
        assert_eq!(back.fields(), fields);
        assert!(back.is_live());
        let (notes, _) = back.doc.get(ROOT, "notes").unwrap().unwrap();
        assert!(matches!(notes, AmValue::Object(ObjType::Text)));
        // Written again on the loaded document, only the characters that differ change.
        let w = back
            .patch(&obj(json!({"notes": "héllo 🚢!"})), &[], 2)
            .unwrap()
            .unwrap();
        assert_eq!(w.change.len(), 1);
    }

    #[test]
    fn bytes_values_read_as_markers_are_written_back_as_bytes_at_any_depth() {
        let mut r = Record::new(&actor(1));
        r.put(&obj(json!({"list": [0], "map": {"k": 0}})), 1)
            .unwrap();
        let doc = r.doc_mut();
        doc.put(ROOT, "top", ScalarValue::Bytes(vec![1, 2, 3]))
            .unwrap();
        let (_, list) = doc.get(ROOT, "list").unwrap().unwrap();
        doc.put(&list, 0, ScalarValue::Bytes(vec![4])).unwrap();
        let (_, map) = doc.get(ROOT, "map").unwrap().unwrap();
        doc.put(&map, "k", ScalarValue::Bytes(vec![5])).unwrap();
        doc.commit();
        let read = r.fields();
        assert_eq!(read["top"], crate::crypt::marker(&[1, 2, 3]));
        let mut copy = Record::new(&actor(2));
        copy.materialize(&read, false, Operation::Create, None, 1)
            .unwrap();
        let saved = copy.save();
        let loaded = Record::load(&saved, &actor(2)).unwrap();
        assert_eq!(loaded.fields(), read);
        let (value, _) = loaded.doc.get(ROOT, "top").unwrap().unwrap();
        assert!(matches!(value, AmValue::Scalar(s) if matches!(s.as_ref(), ScalarValue::Bytes(_))));
        assert!(matches!(
            validate_fields(&read, &Limits::default()),
            Err(RecordError::ReservedField { .. })
        ));
    }

    #[test]
    fn replace_writes_only_what_differs() {
        let mut r = Record::new(&actor(1));
        r.put(&obj(json!({"a": 1, "b": {"x": 1, "y": 2}, "c": [1]})), 1)
            .unwrap();
        let w = r
            .put(&obj(json!({"a": 1, "b": {"x": 1, "y": 3}, "c": [1]})), 2)
            .unwrap()
            .unwrap();
        assert_eq!(w.operation, Operation::Update);
        assert_eq!(w.change.len(), 1, "only b.y is written");
        assert!(
            r.put(&obj(json!({"a": 1, "b": {"x": 1, "y": 3}, "c": [1]})), 3)
                .unwrap()
                .is_none()
        );
        r.put(&obj(json!({"c": [2]})), 4).unwrap().unwrap();
        assert_eq!(r.fields(), obj(json!({"c": [2]})));
    }

    #[test]
    fn zero_and_negative_zero_are_different_values() {
        let mut r = Record::new(&actor(1));
        r.put(&obj(json!({"z": -0.0, "l": [-0.0], "m": {"z": -0.0}})), 1)
            .unwrap();
        let w = r
            .put(&obj(json!({"z": 0.0, "l": [0.0], "m": {"z": 0.0}})), 2)
            .unwrap();
        assert!(w.is_some(), "0.0 over -0.0 is a change");
        let f = r.fields();
        for v in [&f["z"], &f["l"][0], &f["m"]["z"]] {
            assert!(v.as_f64().unwrap().is_sign_positive(), "{f:?}");
        }
        let again = r.put(&obj(json!({"z": 0.0, "l": [0.0], "m": {"z": 0.0}})), 3);
        assert!(again.unwrap().is_none());
    }

    #[test]
    fn patch_and_unset() {
        let mut r = Record::new(&actor(1));
        r.put(&obj(json!({"a": 1, "b": 2})), 1).unwrap();
        r.patch(&obj(json!({"c": 3})), &["a".into()], 2)
            .unwrap()
            .unwrap();
        assert_eq!(r.fields(), obj(json!({"b": 2, "c": 3})));
        assert!(
            r.patch(&obj(json!({"b": 2})), &["b".into()], 3)
                .unwrap()
                .is_none(),
            "a field both set (to its value) and unset is left as it is"
        );
        assert!(matches!(
            r.patch(&Fields::new(), &["$deleted".into()], 3),
            Err(RecordError::ReservedField { .. })
        ));
    }

    #[test]
    fn delete_is_a_tombstone_and_put_revives() {
        let mut r = Record::new(&actor(1));
        r.put(&obj(json!({"a": 1})), 1).unwrap();
        let w = r.delete(2).unwrap().unwrap();
        assert_eq!(w.operation, Operation::Delete);
        assert!(r.exists() && r.is_deleted() && !r.is_live());
        let w = r.put(&obj(json!({"b": 2})), 3).unwrap().unwrap();
        assert_eq!(w.operation, Operation::Create);
        assert!(r.is_live());
        assert_eq!(r.fields(), obj(json!({"b": 2})));
        let ops: Vec<_> = r
            .history()
            .unwrap()
            .into_iter()
            .map(|h| h.operation)
            .collect();
        assert_eq!(ops, ["create", "delete", "create"]);
    }

    #[test]
    fn empty_create_still_creates() {
        let mut r = Record::new(&actor(1));
        assert!(!r.exists());
        r.put(&Fields::new(), 1).unwrap().unwrap();
        assert!(r.is_live());
    }

    #[test]
    fn history_names_device_time_and_fields() {
        let mut r = Record::new(&actor(1));
        r.put(&obj(json!({"name": "Ada", "email": "a@x"})), 100)
            .unwrap();
        let mut other = Record::load(&r.save(), &actor(2)).unwrap();
        other
            .patch(&obj(json!({"email": "ada@x"})), &[], 200)
            .unwrap();
        let h = other.history().unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].device, "01".repeat(16));
        assert_eq!(h[0].fields, ["email", "name"]);
        assert_eq!(h[0].time, 100);
        assert_eq!(h[1].device, "02".repeat(16));
        assert_eq!(h[1].fields, ["email"]);
        assert_eq!(h[1].operation, "update");
    }

    #[test]
    fn chunk_framing_is_checked_before_automerge_parses() {
        let mut r = Record::new(&actor(1));
        r.put(&obj(json!({"a": 1})), 1).unwrap();
        let doc = r.save();
        check_chunks(&doc, &[CHUNK_DOCUMENT]).unwrap();
        let change = r
            .doc_mut()
            .get_last_local_change()
            .unwrap()
            .raw_bytes()
            .to_vec();
        check_chunks(&change, &[CHUNK_CHANGE]).unwrap();
        let mut both = doc.clone();
        both.extend_from_slice(&change);
        check_chunks(&both, &[CHUNK_DOCUMENT, CHUNK_CHANGE]).unwrap();
        assert!(
            check_chunks(&change, &[CHUNK_DOCUMENT]).is_err(),
            "type not allowed"
        );
        assert!(
            check_chunks(&doc[..doc.len() - 1], &[CHUNK_DOCUMENT]).is_err(),
            "truncated"
        );
        let mut flipped = doc.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(
            check_chunks(&flipped, &[CHUNK_DOCUMENT]).is_err(),
            "checksum"
        );
        assert!(matches!(
            Record::load(&flipped, &actor(1)),
            Err(RecordError::Corrupt(_))
        ));
        assert!(check_chunks(&[], &[CHUNK_DOCUMENT]).is_err());
        assert_eq!(read_uleb128(&uleb128(300)), Some((300, 2)));
        assert_eq!(read_uleb128(&[0x80; 11]), None);
    }

    fn change_bytes(w: Option<Written>) -> Vec<u8> {
        w.unwrap().change.raw_bytes().to_vec()
    }

    #[test]
    fn remote_changes_apply_in_any_order_once() {
        let mut a = Record::new(&actor(1));
        let first = change_bytes(a.put(&obj(json!({"n": 1})), 1).unwrap());
        let second = change_bytes(a.patch(&obj(json!({"m": 2})), &[], 2).unwrap());
        let mut b = Record::new(&actor(2));
        assert!(b.apply_changes(&[second.clone(), first.clone()]).unwrap());
        assert_eq!(b.heads(), a.heads());
        assert_eq!(b.fields(), a.fields());
        assert!(!b.apply_changes(&[first, second]).unwrap(), "already held");
        assert_eq!(b.save(), a.save());
    }

    #[test]
    fn a_change_with_missing_dependencies_leaves_the_document_as_it_was() {
        let mut a = Record::new(&actor(1));
        let first = change_bytes(a.put(&obj(json!({"n": 1})), 1).unwrap());
        let second = change_bytes(a.patch(&obj(json!({"m": 2})), &[], 2).unwrap());
        let third = change_bytes(a.patch(&obj(json!({"k": 3})), &[], 3).unwrap());
        let mut b = Record::new(&actor(2));
        b.apply_changes(std::slice::from_ref(&first)).unwrap();
        let before = b.save();
        let err = b.apply_changes(std::slice::from_ref(&third)).unwrap_err();
        assert!(
            matches!(err, RecordError::MissingDependencies { count: 1, .. }),
            "{err}"
        );
        assert_eq!(b.save(), before);
        assert!(b.apply_changes(&[third, second]).unwrap());
        assert_eq!(b.heads(), a.heads());
    }

    #[test]
    fn malformed_change_bytes_are_refused() {
        let mut a = Record::new(&actor(1));
        let change = change_bytes(a.put(&obj(json!({"n": 1})), 1).unwrap());
        let mut b = Record::new(&actor(2));
        for bad in [vec![], change[..change.len() - 1].to_vec(), a.save()] {
            assert!(matches!(
                b.apply_changes(&[change.clone(), bad.clone()]),
                Err(RecordError::InvalidChange(_))
            ));
            assert!(decode_change(&bad).is_err());
        }
        assert!(!b.exists(), "nothing applied");
        assert_eq!(decode_change(&change).unwrap().hash(), a.heads()[0]);
        assert_eq!(chunk_hash(&change), Some(a.heads()[0].to_string()));
        assert_eq!(chunk_hash(&a.save()), None);
    }

    #[test]
    fn validation() {
        let l = Limits {
            max_depth: 3,
            max_record_bytes: 64,
            ..Limits::default()
        };
        assert!(validate_fields(&obj(json!({"a": [[1]]})), &l).is_ok());
        assert!(matches!(
            validate_fields(&obj(json!({"a": [[[1]]]})), &l),
            Err(RecordError::TooDeep { max: 3 })
        ));
        assert!(matches!(
            validate_fields(&obj(json!({"$x": 1})), &l),
            Err(RecordError::ReservedField { .. })
        ));
        assert!(matches!(
            validate_fields(&obj(json!({"a": "x".repeat(100)})), &l),
            Err(RecordError::TooLarge { .. })
        ));
    }
}
