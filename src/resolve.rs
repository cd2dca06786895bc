//! Conflict resolution: what a record shows when concurrent changes disagree, and which conflicts
//! a change brings when it meets the changes the relay logged before it.
//!
//! Owns: the strategies (`merge`, `lww`, `manual`) and delete rules of a collection, the record
//! view they give, conflict detection on one record's change graph, and the conflict entry type.
//! Every result is a function of a record's changes and of the relay's log order, which are the
//! same on every device, so every device shows the same values and finds the same conflicts. No
//! strategy writes anything to settle a conflict: the winner is computed where it is read, and a
//! later local write on the record makes it explicit.
//!
//! Must not touch: storage, the network, clocks. What a run of changes does to conflict entries
//! and to the unique-value index (which spans records) is `ledger`'s; its keepers store it.

pub mod ledger;

use crate::record::{
    DELETED_KEY, Fields, RESTORE_OPERATION, Record, from_scalar, operation_of, resolved_conflict,
};
use automerge::Value as AmValue;
use automerge::{Automerge, ChangeHash, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

/// How a collection settles concurrent writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Field by field: concurrent writes to different fields all survive; of concurrent writes to
    /// one field, the latest (change time, then device id) is shown and the other is reported.
    #[default]
    Merge,
    /// Record by record: of concurrent changes, the record as the latest writer left it is shown
    /// whole, and the values it overwrote are reported.
    Lww,
    /// As `merge` for what is shown meanwhile, but every same-field, update-delete and
    /// delete-update conflict waits in the conflict queue for a person or an app to settle.
    Manual,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Merge => "merge",
            Strategy::Lww => "lww",
            Strategy::Manual => "manual",
        }
    }
}

/// What a record shows when a delete and an update were concurrent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteRule {
    /// The record stays (or comes back) with the update's fields: nothing is lost.
    KeepUpdate,
    /// The record stays deleted.
    KeepDelete,
    /// Whichever was written later (change time, then device id).
    Latest,
    /// Queued for a person; meanwhile the record shows the update.
    Queue,
}

impl DeleteRule {
    pub fn default_for(strategy: Strategy) -> Self {
        match strategy {
            Strategy::Merge => DeleteRule::KeepUpdate,
            Strategy::Lww => DeleteRule::Latest,
            Strategy::Manual => DeleteRule::Queue,
        }
    }
}

/// A collection's conflict settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub strategy: Strategy,
    pub on_delete: DeleteRule,
    /// Unique constraints: each is a list of top-level fields whose values together must not be
    /// held by two live records of the collection.
    pub unique: Vec<Vec<String>>,
    /// Top-level fields stored as Automerge text, so concurrent edits merge character by
    /// character instead of one replacing the other.
    pub text: Arc<BTreeSet<String>>,
    /// Top-level fields stored encrypted with the account key (`crate::crypt`). Each is one
    /// bytes value, so concurrent writes settle it as a whole value under every strategy.
    pub encrypted: Arc<BTreeSet<String>>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::of(Strategy::Merge)
    }
}

impl Policy {
    pub fn of(strategy: Strategy) -> Self {
        Policy {
            strategy,
            on_delete: DeleteRule::default_for(strategy),
            unique: Vec::new(),
            text: Arc::default(),
            encrypted: Arc::default(),
        }
    }
}

/// Every collection's policy; collections not named get the default.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub default: Policy,
    pub collections: BTreeMap<String, Policy>,
}

impl Policies {
    pub fn of(&self, collection: &str) -> &Policy {
        self.collections.get(collection).unwrap_or(&self.default)
    }
}

/// Orders concurrent writes: the later change time wins, and the device id breaks ties, so every
/// device picks the same winner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub time: i64,
    pub actor: Vec<u8>,
}

impl Stamp {
    pub fn device(&self) -> String {
        crate::hex::encode(&self.actor)
    }
}

/// The conflict a change resolves and how, from its message (`record::resolved_conflict`).
pub fn resolution_of(message: Option<&str>) -> Option<(&str, Take)> {
    let (id, take) = resolved_conflict(message)?;
    Some((id, Take::parse(take)?))
}

/// What a record shows, after its collection's strategy has settled any conflicts.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub fields: Fields,
    pub deleted: bool,
    /// False before the record's first change.
    pub exists: bool,
    /// True when the document as Automerge merges it already shows exactly this: no conflict is
    /// being settled at read time, so a write can be the plain minimal diff.
    pub exact: bool,
    /// True when this is the state of some of the record's heads only (under `lww`, or where
    /// concurrent resolutions of a conflict lost): a write must then make the whole shown state
    /// explicit, or merging the heads would bring the hidden ones back.
    pub partial: bool,
}

impl View {
    pub fn is_live(&self) -> bool {
        self.exists && !self.deleted
    }
}

/// The record as its policy shows it.
pub fn view(record: &mut Record, policy: &Policy) -> View {
    view_at(record.automerge(), None, policy)
}

/// Whether the record, as its policy shows it, is deleted: `view`'s answer without reading the
/// fields.
pub fn is_deleted(record: &mut Record, policy: &Policy) -> bool {
    let doc = record.automerge();
    deleted_at(doc, &doc.get_heads(), policy)
}

/// The record as its policy shows it, counting only the changes up to `heads` (all of them when
/// `None`).
pub fn view_at(doc: &Automerge, heads: Option<&[ChangeHash]>, policy: &Policy) -> View {
    let all_heads = match heads {
        Some(h) => h.to_vec(),
        None => doc.get_heads(),
    };
    if all_heads.is_empty() {
        return View {
            fields: Fields::new(),
            deleted: false,
            exists: false,
            exact: true,
            partial: false,
        };
    }
    let visible = visible_heads(doc, &all_heads, policy);
    let scoped = visible.as_deref().or(heads);
    let mut reader = Reader::new(doc, scoped);
    let mut fields = reader.map(&ROOT);
    fields.retain(|k, _| !k.starts_with('$'));
    let (deleted, overridden) = deleted_state(doc, &mut reader, policy);
    View {
        fields,
        deleted,
        exists: true,
        exact: visible.is_none() && !reader.multi && !overridden,
        partial: visible.is_some(),
    }
}

/// The heads whose state is shown, when that is not simply all of them: under `lww` the latest
/// head; and when two resolutions of one conflict were concurrent, all heads but the losing
/// resolutions.
fn visible_heads(
    doc: &Automerge,
    heads: &[ChangeHash],
    policy: &Policy,
) -> Option<Vec<ChangeHash>> {
    if heads.len() < 2 {
        return None;
    }
    let mut remaining: Vec<(ChangeHash, Stamp)> =
        heads.iter().map(|h| (*h, change_stamp(doc, h))).collect();
    let mut best_resolution: BTreeMap<String, Stamp> = BTreeMap::new();
    let mut resolution_of_head = Vec::new();
    for (hash, stamp) in &remaining {
        let id = doc
            .get_change_meta_by_hash(hash)
            .and_then(|m| resolution_of(m.message.as_deref()).map(|(id, _)| id.to_owned()));
        if let Some(id) = &id {
            let best = best_resolution.entry(id.clone()).or_insert(stamp.clone());
            if *stamp > *best {
                *best = stamp.clone();
            }
        }
        resolution_of_head.push(id);
    }
    let before = remaining.len();
    let mut resolutions = resolution_of_head.iter();
    remaining.retain(|(_, stamp)| {
        resolutions
            .next()
            .and_then(Option::as_ref)
            .is_none_or(|id| best_resolution.get(id) == Some(stamp))
    });
    if policy.strategy == Strategy::Lww && remaining.len() > 1 {
        remaining.sort_by(|a, b| b.1.cmp(&a.1));
        let deleted_at = |h: &ChangeHash| raw_deleted(doc, Some(std::slice::from_ref(h)));
        let latest = remaining.first().map(|(h, _)| *h);
        let chosen = match policy.on_delete {
            DeleteRule::Latest | DeleteRule::Queue => latest,
            DeleteRule::KeepUpdate => remaining
                .iter()
                .find(|(h, _)| !deleted_at(h))
                .map(|(h, _)| *h)
                .or(latest),
            DeleteRule::KeepDelete => remaining
                .iter()
                .find(|(h, _)| deleted_at(h))
                .map(|(h, _)| *h)
                .or(latest),
        };
        return chosen.map(|h| vec![h]);
    }
    (remaining.len() != before).then(|| remaining.into_iter().map(|(h, _)| h).collect())
}

/// Whether the record is deleted as its policy shows it at `heads`.
fn deleted_at(doc: &Automerge, heads: &[ChangeHash], policy: &Policy) -> bool {
    let visible = visible_heads(doc, heads, policy);
    let mut reader = Reader::new(doc, Some(visible.as_deref().unwrap_or(heads)));
    deleted_state(doc, &mut reader, policy).0
}

fn raw_deleted(doc: &Automerge, heads: Option<&[ChangeHash]>) -> bool {
    let mut reader = Reader::new(doc, heads);
    reader
        .winner(&ROOT, DELETED_KEY)
        .is_some_and(|(v, _)| is_true(&v))
}

fn is_true(value: &AmValue<'_>) -> bool {
    matches!(value, AmValue::Scalar(s) if matches!(s.as_ref(), ScalarValue::Boolean(true)))
}

/// Whether the record is deleted, and whether that overrides what the latest `$deleted` value
/// says (a delete that a concurrent update outlives, or the reverse). Every delete among the
/// key's concurrent values counts, not only the latest: an update made concurrently may have
/// written `$deleted = false` (a create, or a write that made a shown state explicit), and the
/// collection's delete rule, not the clocks, decides between the two.
fn deleted_state(doc: &Automerge, reader: &mut Reader<'_>, policy: &Policy) -> (bool, bool) {
    let values = reader.all(&ROOT, Prop::Map(DELETED_KEY.to_owned()));
    if values.len() > 1 {
        reader.multi = true;
    }
    let stamped: Vec<(bool, Stamp, &ObjId)> = values
        .iter()
        .map(|(v, op)| (is_true(v), op_stamp(doc, op), op))
        .collect();
    let latest_says = stamped
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1))
        .is_some_and(|(deleted, _, _)| *deleted);
    if policy.strategy == Strategy::Lww {
        // Under lww the head shown was already chosen by the delete rule.
        return (latest_says, false);
    }
    let Some(delete) = stamped
        .iter()
        .filter(|(deleted, _, _)| *deleted)
        .max_by(|a, b| a.1.cmp(&b.1))
        .and_then(|(_, _, op)| doc.hash_for_opid(op))
    else {
        return (false, false);
    };
    let latest_update = concurrent_changes(doc, &delete, reader.at)
        .into_iter()
        .filter(|(_, operation, _)| operation != "delete")
        .map(|(_, _, stamp)| stamp)
        .max();
    let deleted = match (latest_update, policy.on_delete) {
        (None, _) | (Some(_), DeleteRule::KeepDelete) => true,
        (Some(_), DeleteRule::KeepUpdate | DeleteRule::Queue) => false,
        (Some(update), DeleteRule::Latest) => change_stamp(doc, &delete) > update,
    };
    (deleted, deleted != latest_says)
}

/// The changes (hash, operation, stamp) that are neither ancestors nor descendants of `change`,
/// among the ancestors of `heads` (all changes when `None`).
fn concurrent_changes(
    doc: &Automerge,
    change: &ChangeHash,
    heads: Option<&[ChangeHash]>,
) -> Vec<(ChangeHash, String, Stamp)> {
    let later = doc.get_changes_meta(std::slice::from_ref(change));
    if later.is_empty() {
        return Vec::new();
    }
    let mut descendants: HashSet<ChangeHash> = HashSet::from([*change]);
    loop {
        let before = descendants.len();
        for meta in &later {
            if !descendants.contains(&meta.hash)
                && meta.deps.iter().any(|d| descendants.contains(d))
            {
                descendants.insert(meta.hash);
            }
        }
        if descendants.len() == before {
            break;
        }
    }
    let within = heads.map(|h| ancestors(doc, h));
    later
        .iter()
        .filter(|m| !descendants.contains(&m.hash))
        .filter(|m| within.as_ref().is_none_or(|w| w.contains(&m.hash)))
        .map(|m| {
            (
                m.hash,
                operation_of(m.message.as_deref()).to_owned(),
                Stamp {
                    time: m.timestamp,
                    actor: m.actor.to_bytes().to_vec(),
                },
            )
        })
        .collect()
}

/// `heads` and every change they depend on, directly or not.
fn ancestors(doc: &Automerge, heads: &[ChangeHash]) -> HashSet<ChangeHash> {
    let mut seen: HashSet<ChangeHash> = HashSet::new();
    let mut stack: Vec<ChangeHash> = heads.to_vec();
    while let Some(hash) = stack.pop() {
        if !seen.insert(hash) {
            continue;
        }
        if let Some(meta) = doc.get_change_meta_by_hash(&hash) {
            stack.extend(meta.deps.iter().filter(|d| !seen.contains(d)));
        }
    }
    seen
}

/// The stamp of a whole change.
pub fn change_stamp(doc: &Automerge, hash: &ChangeHash) -> Stamp {
    doc.get_change_meta_by_hash(hash)
        .map(|m| Stamp {
            time: m.timestamp,
            actor: m.actor.to_bytes().to_vec(),
        })
        .unwrap_or(Stamp {
            time: i64::MIN,
            actor: Vec::new(),
        })
}

/// The stamp of the change that wrote an operation.
fn op_stamp(doc: &Automerge, op: &ObjId) -> Stamp {
    let actor = match op {
        ObjId::Id(_, actor, _) => actor.to_bytes().to_vec(),
        ObjId::Root => Vec::new(),
    };
    let time = doc
        .hash_for_opid(op)
        .and_then(|h| doc.get_change_meta_by_hash(&h))
        .map_or(i64::MIN, |m| m.timestamp);
    Stamp { time, actor }
}

/// Reads a document, at given heads or at its current ones, settling each key that holds
/// concurrent values by stamp.
struct Reader<'a> {
    doc: &'a Automerge,
    at: Option<&'a [ChangeHash]>,
    /// Some key held more than one value.
    multi: bool,
}

impl<'a> Reader<'a> {
    fn new(doc: &'a Automerge, at: Option<&'a [ChangeHash]>) -> Self {
        Reader {
            doc,
            at,
            multi: false,
        }
    }

    fn all(&self, obj: &ObjId, prop: Prop) -> Vec<(AmValue<'a>, ObjId)> {
        let values = match self.at {
            Some(heads) => self.doc.get_all_at(obj, prop, heads),
            None => self.doc.get_all(obj, prop),
        };
        values.unwrap_or_default()
    }

    fn winner(&mut self, obj: &ObjId, prop: impl Into<Prop>) -> Option<(AmValue<'a>, ObjId)> {
        let mut values = self.all(obj, prop.into());
        if values.len() < 2 {
            return values.pop();
        }
        self.multi = true;
        values
            .into_iter()
            .max_by_key(|(_, op)| op_stamp(self.doc, op))
    }

    fn keys(&self, obj: &ObjId) -> Vec<String> {
        match self.at {
            Some(heads) => self.doc.keys_at(obj, heads).collect(),
            None => self.doc.keys(obj).collect(),
        }
    }

    fn length(&self, obj: &ObjId) -> usize {
        match self.at {
            Some(heads) => self.doc.length_at(obj, heads),
            None => self.doc.length(obj),
        }
    }

    fn map(&mut self, obj: &ObjId) -> Fields {
        // One pass over the map; only a key that holds concurrent values is looked up again,
        // to settle them.
        let range = match self.at {
            Some(heads) => self.doc.map_range_at(obj, .., heads),
            None => self.doc.map_range(obj, ..),
        };
        let entries: Vec<(String, bool, AmValue<'a>, ObjId)> = range
            .map(|item| {
                let id = item.id();
                (item.key.into_owned(), item.conflict, item.value.into(), id)
            })
            .collect();
        let mut out = Fields::new();
        for (key, concurrent, value, id) in entries {
            let (value, id) = if concurrent {
                match self.winner(obj, key.as_str()) {
                    Some(won) => won,
                    None => continue,
                }
            } else {
                (value, id)
            };
            let value = self.value(value, &id);
            out.insert(key, value);
        }
        out
    }

    fn list(&mut self, obj: &ObjId) -> Vec<Value> {
        let mut out = Vec::new();
        for index in 0..self.length(obj) {
            if let Some((value, id)) = self.winner(obj, index) {
                let value = self.value(value, &id);
                out.push(value);
            }
        }
        out
    }

    fn value(&mut self, value: AmValue<'a>, id: &ObjId) -> Value {
        match value {
            AmValue::Object(ObjType::Map | ObjType::Table) => Value::Object(self.map(id)),
            AmValue::Object(ObjType::List) => Value::Array(self.list(id)),
            AmValue::Object(ObjType::Text) => {
                let text = match self.at {
                    Some(heads) => self.doc.text_at(id, heads),
                    None => self.doc.text(id),
                };
                Value::String(text.unwrap_or_default())
            }
            AmValue::Scalar(s) => from_scalar(&s),
        }
    }
}

/// The kinds of conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictKind {
    /// Both sides changed the same field.
    UpdateUpdate,
    /// Updated offline, deleted on the relay.
    UpdateDelete,
    /// Deleted offline, updated on the relay.
    DeleteUpdate,
    /// Two live records hold the same value of a unique constraint.
    Unique,
}

impl ConflictKind {
    pub const ALL: [ConflictKind; 4] = [
        ConflictKind::UpdateUpdate,
        ConflictKind::UpdateDelete,
        ConflictKind::DeleteUpdate,
        ConflictKind::Unique,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::UpdateUpdate => "update_update",
            ConflictKind::UpdateDelete => "update_delete",
            ConflictKind::DeleteUpdate => "delete_update",
            ConflictKind::Unique => "unique",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictStatus {
    /// The strategy settled it; it is kept for the record.
    AutoResolved,
    /// Waiting in the conflict queue.
    Open,
    /// Settled by a person or an app (or, for a unique clash, by an edit that ended it).
    Resolved,
}

impl ConflictStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictStatus::AutoResolved => "auto_resolved",
            ConflictStatus::Open => "open",
            ConflictStatus::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::AutoResolved, Self::Open, Self::Resolved]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// Which version a resolution keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Take {
    /// The version the relay had first (for a unique clash: the record that held the value first).
    Server,
    /// The version that arrived later, from the device that was offline (for a unique clash: the
    /// record that took the value second).
    Client,
    /// Fields supplied by whoever resolves it (for a unique clash: one record made of both).
    Merge,
}

impl Take {
    pub fn as_str(self) -> &'static str {
        match self {
            Take::Server => "server",
            Take::Client => "client",
            Take::Merge => "merge",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Take::Server, Take::Client, Take::Merge]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// One side of a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Side {
    /// The record this side is about (for a unique clash the two differ).
    pub record: String,
    /// The change hashes (hex) that make this side: the relay's heads before the conflicting
    /// change for `server`, the conflicting change for `client`.
    pub changes: Vec<String>,
    /// The device that wrote this side's latest change, hex.
    pub device: String,
    /// That change's time, Unix milliseconds as its device's clock had it.
    pub time: i64,
    pub deleted: bool,
    /// The record's fields as this side left them.
    pub fields: Fields,
}

/// One field both sides wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldConflict {
    /// Path from the record's root: field names, and list indexes as numbers.
    pub path: Vec<Value>,
    /// `None` when the side removed the field.
    pub server: Option<Value>,
    pub client: Option<Value>,
    /// The side whose value the record shows, where the strategy settled it.
    pub winner: Option<Take>,
}

/// How a conflict was settled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// `None` when an edit ended a unique clash (a record deleted, or its value changed).
    pub take: Option<Take>,
    /// The device that resolved it, hex; `None` when an edit ended a unique clash.
    pub device: Option<String>,
    pub time: i64,
    /// The resolving change (hex), when one did.
    pub change: Option<String>,
}

/// A conflict, as every device records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// Derived from the changes involved, so every device gives a conflict the same id.
    pub id: String,
    pub kind: ConflictKind,
    pub collection: String,
    /// The record the conflicting change was written to (for a unique clash: the record that
    /// took the value second, which is the one flagged).
    pub record: String,
    /// The collection's strategy when the conflict was found.
    pub strategy: Strategy,
    pub status: ConflictStatus,
    /// The relay log position of the change that brought the conflict.
    pub seq: u64,
    pub server: Side,
    pub client: Side,
    /// The side the record shows, for a conflict the strategy settled.
    pub winner: Option<Take>,
    /// The fields the sides disagree on.
    pub fields: Vec<FieldConflict>,
    /// For a unique clash: the constraint's fields and the value both records hold.
    pub unique: Option<UniqueClash>,
    pub resolution: Option<Resolution>,
    /// A resolution this device wrote that the relay has not logged back yet (this device's own
    /// view; it becomes `resolution` when the resolving change comes back in the log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolving: Option<Resolution>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UniqueClash {
    pub fields: Vec<String>,
    pub value: Vec<Value>,
}

/// A stable id from the parts that identify a conflict.
pub fn conflict_id(parts: &[&[u8]]) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    let (id, _) = digest.split_first_chunk::<8>().unwrap_or((&[0; 8], &[]));
    crate::hex::encode(id)
}

/// What meeting the changes logged before it means for one change.
#[derive(Debug, Default)]
pub struct Detection {
    /// The heads of the record's logged changes, this one included.
    pub logged_heads: Vec<ChangeHash>,
    pub conflict: Option<Conflict>,
    /// The conflict this change resolves, if it is a resolution, with how.
    pub resolves: Option<(String, Resolution)>,
}

/// The latest stamp among `heads`.
pub fn heads_stamp(doc: &Automerge, heads: &[ChangeHash]) -> Stamp {
    heads
        .iter()
        .map(|h| change_stamp(doc, h))
        .max()
        .unwrap_or(Stamp {
            time: i64::MIN,
            actor: Vec::new(),
        })
}

/// One side of a conflict: a record as `heads` left it.
pub fn side(doc: &Automerge, record: &str, heads: &[ChangeHash], view: View) -> Side {
    let stamp = heads_stamp(doc, heads);
    Side {
        record: record.to_owned(),
        changes: heads.iter().map(ToString::to_string).collect(),
        device: stamp.device(),
        time: stamp.time,
        deleted: view.deleted,
        fields: view.fields,
    }
}

/// Where a change sits in the relay's log, and which record it belongs to.
pub struct LogPosition<'a> {
    pub seq: u64,
    pub collection: &'a str,
    pub record: &'a str,
}

/// Classifies `change` (already in `doc`) against the record's changes the relay logged before it
/// (those up to `logged`). A change that builds on all of them conflicts with nothing; otherwise
/// the changes it did not see are its concurrent ones, and their overlap with it decides the
/// conflict, if any.
pub fn detect(
    doc: &Automerge,
    logged: &[ChangeHash],
    change: &ChangeHash,
    at: LogPosition<'_>,
    policy: &Policy,
) -> Detection {
    let Some(meta) = doc.get_change_meta_by_hash(change) else {
        return Detection {
            logged_heads: logged.to_vec(),
            ..Detection::default()
        };
    };
    let message = meta.message.as_deref().map(str::to_owned);
    let deps: BTreeSet<ChangeHash> = meta.deps.iter().copied().collect();
    let stamp = Stamp {
        time: meta.timestamp,
        actor: meta.actor.to_bytes().to_vec(),
    };
    let resolves = resolution_of(message.as_deref()).map(|(id, take)| {
        (
            id.to_owned(),
            Resolution {
                take: Some(take),
                device: Some(stamp.device()),
                time: stamp.time,
                change: Some(change.to_string()),
            },
        )
    });
    let logged_set: BTreeSet<ChangeHash> = logged.iter().copied().collect();
    if deps == logged_set {
        // A purged record's first change after its purge entry, written as a restoration.
        let restored = (logged.is_empty() && is_restoration(message.as_deref()))
            .then(|| restoration(doc, change, at, policy));
        return Detection {
            logged_heads: vec![*change],
            conflict: restored,
            resolves,
        };
    }
    if ancestors(doc, logged).contains(change) {
        // Logged already (the same entries applied again after a crash): nothing new.
        return Detection {
            logged_heads: logged.to_vec(),
            ..Detection::default()
        };
    }
    let seen = ancestors(doc, std::slice::from_ref(change));
    let mut logged_heads: Vec<ChangeHash> = logged
        .iter()
        .filter(|h| !seen.contains(h))
        .copied()
        .collect();
    logged_heads.push(*change);
    logged_heads.sort();
    // The logged changes this one did not see.
    let unseen = unseen_logged(doc, logged, &seen);
    if unseen.is_empty() {
        return Detection {
            logged_heads,
            conflict: None,
            resolves,
        };
    }
    let competing = resolves.as_ref().is_some_and(|(id, _)| {
        unseen.iter().any(|h| {
            doc.get_change_meta_by_hash(h)
                .and_then(|m| resolution_of(m.message.as_deref()).map(|(other, _)| other == id))
                .unwrap_or(false)
        })
    });
    if competing {
        // Two resolutions of one conflict: the later one is shown (see `visible_heads`), which is
        // how the conflict ends, not a new one.
        return Detection {
            logged_heads,
            conflict: None,
            resolves,
        };
    }
    let conflict = classify(doc, logged, change, &unseen, &logged_heads, &at, policy);
    Detection {
        logged_heads,
        conflict,
        resolves,
    }
}

/// The logged changes (ancestors of `logged`) not in `seen`.
fn unseen_logged(
    doc: &Automerge,
    logged: &[ChangeHash],
    seen: &HashSet<ChangeHash>,
) -> HashSet<ChangeHash> {
    let mut unseen = HashSet::new();
    let mut stack: Vec<ChangeHash> = logged
        .iter()
        .filter(|h| !seen.contains(h))
        .copied()
        .collect();
    while let Some(hash) = stack.pop() {
        if !unseen.insert(hash) {
            continue;
        }
        if let Some(meta) = doc.get_change_meta_by_hash(&hash) {
            stack.extend(
                meta.deps
                    .iter()
                    .filter(|d| !seen.contains(d) && !unseen.contains(d)),
            );
        }
    }
    unseen
}

fn classify(
    doc: &Automerge,
    logged: &[ChangeHash],
    change: &ChangeHash,
    unseen: &HashSet<ChangeHash>,
    logged_heads: &[ChangeHash],
    at: &LogPosition<'_>,
    policy: &Policy,
) -> Option<Conflict> {
    let operations: Vec<(ChangeHash, String, Stamp)> = unseen
        .iter()
        .map(|h| {
            let meta = doc.get_change_meta_by_hash(h);
            let operation = operation_of(meta.as_ref().and_then(|m| m.message.as_deref()));
            (*h, operation.to_owned(), change_stamp(doc, h))
        })
        .collect();
    let change_operation = doc
        .get_change_meta_by_hash(change)
        .map(|m| operation_of(m.message.as_deref()).to_owned())
        .unwrap_or_default();
    let client_deletes = change_operation == "delete";
    let unseen_deletes = operations.iter().any(|(_, op, _)| op == "delete");
    let unseen_updates = operations.iter().any(|(_, op, _)| op != "delete");
    let server_deleted = deleted_at(doc, logged, policy);
    let kind = if client_deletes && !server_deleted && unseen_updates {
        ConflictKind::DeleteUpdate
    } else if !client_deletes && server_deleted && unseen_deletes {
        ConflictKind::UpdateDelete
    } else {
        ConflictKind::UpdateUpdate
    };
    // Concurrent writes to different fields (the usual case) are settled by the field-level
    // walk alone, before either side's whole record is read.
    let contested_fields = (kind == ConflictKind::UpdateUpdate && policy.strategy != Strategy::Lww)
        .then(|| contested(doc, logged_heads, change, unseen));
    if contested_fields.as_ref().is_some_and(Vec::is_empty) {
        return None;
    }
    let server_view = view_at(doc, Some(logged), policy);
    let client_heads = [*change];
    let client_view = view_at(doc, Some(&client_heads), &Policy::of(Strategy::Merge));
    let fields = contested_fields
        .unwrap_or_else(|| differing_fields(&server_view.fields, &client_view.fields));
    if kind == ConflictKind::UpdateUpdate && fields.is_empty() {
        return None;
    }
    let server_stamp = heads_stamp(doc, logged);
    let client_stamp = change_stamp(doc, change);
    let mut unseen_sorted: Vec<String> = unseen.iter().map(ToString::to_string).collect();
    unseen_sorted.sort();
    let id = conflict_id(&[
        kind.as_str().as_bytes(),
        at.collection.as_bytes(),
        at.record.as_bytes(),
        change.as_ref(),
        unseen_sorted.join(",").as_bytes(),
    ]);
    let (status, winner) = match (kind, policy.strategy, policy.on_delete) {
        (ConflictKind::UpdateUpdate, Strategy::Manual, _) => (ConflictStatus::Open, None),
        (ConflictKind::UpdateUpdate, Strategy::Lww, _) => (
            ConflictStatus::AutoResolved,
            Some(if client_stamp > server_stamp {
                Take::Client
            } else {
                Take::Server
            }),
        ),
        (ConflictKind::UpdateUpdate, Strategy::Merge, _) => {
            let first = fields.first().and_then(|f| f.winner);
            let same = fields.iter().all(|f| f.winner == first);
            (
                ConflictStatus::AutoResolved,
                if same { first } else { None },
            )
        }
        (_, _, DeleteRule::Queue) => (ConflictStatus::Open, None),
        _ => {
            let client_wins = deleted_at(doc, logged_heads, policy) == client_view.deleted;
            (
                ConflictStatus::AutoResolved,
                Some(if client_wins {
                    Take::Client
                } else {
                    Take::Server
                }),
            )
        }
    };
    Some(Conflict {
        id,
        kind,
        collection: at.collection.to_owned(),
        record: at.record.to_owned(),
        strategy: policy.strategy,
        status,
        seq: at.seq,
        server: side(doc, at.record, logged, server_view),
        client: side(doc, at.record, &client_heads, client_view),
        winner,
        fields,
        unique: None,
        resolution: None,
        resolving: None,
    })
}

/// Whether `change`'s message makes it a purged record's restoration.
pub fn is_restoration(message: Option<&str>) -> bool {
    operation_of(message) == RESTORE_OPERATION
}

/// The conflict a restoration brings, as its record's first change after a purge entry (`change`,
/// already in `doc`, which holds nothing else): an update that met a delete the relay purged.
/// The server side is the purged record (deleted; its history is gone), the client side the
/// restored fields; the restoring device wrote `$deleted` as its collection's delete rule
/// settled its edit against the delete, so that is the winner, and `queue` leaves it open. A
/// function of the change alone: every device and the relay find the same entry.
pub fn restoration(
    doc: &Automerge,
    change: &ChangeHash,
    at: LogPosition<'_>,
    policy: &Policy,
) -> Conflict {
    let heads = [*change];
    let client = side(
        doc,
        at.record,
        &heads,
        view_at(doc, Some(&heads), &Policy::of(Strategy::Merge)),
    );
    let server = Side {
        record: at.record.to_owned(),
        changes: Vec::new(),
        device: String::new(),
        time: 0,
        deleted: true,
        fields: Fields::new(),
    };
    let kind = ConflictKind::UpdateDelete;
    let (status, winner) = if policy.on_delete == DeleteRule::Queue {
        (ConflictStatus::Open, None)
    } else if client.deleted {
        (ConflictStatus::AutoResolved, Some(Take::Server))
    } else {
        (ConflictStatus::AutoResolved, Some(Take::Client))
    };
    Conflict {
        id: conflict_id(&[
            kind.as_str().as_bytes(),
            at.collection.as_bytes(),
            at.record.as_bytes(),
            change.as_ref(),
            RESTORE_OPERATION.as_bytes(),
        ]),
        kind,
        collection: at.collection.to_owned(),
        record: at.record.to_owned(),
        strategy: policy.strategy,
        status,
        seq: at.seq,
        fields: differing_fields(&server.fields, &client.fields),
        server,
        client,
        winner,
        unique: None,
        resolution: None,
        resolving: None,
    }
}

/// Top-level fields whose values differ between two versions of a record.
pub fn differing_fields(server: &Fields, client: &Fields) -> Vec<FieldConflict> {
    let names: BTreeSet<&String> = server.keys().chain(client.keys()).collect();
    names
        .into_iter()
        .filter(|name| server.get(*name) != client.get(*name))
        .map(|name| FieldConflict {
            path: vec![Value::String(name.clone())],
            server: server.get(name).cloned(),
            client: client.get(name).cloned(),
            winner: None,
        })
        .collect()
}

/// The keys where `change` and a change in `unseen` both left a value that nobody has overwritten,
/// at `heads`: Automerge's own notion of a conflict, so writes to different fields (nested ones
/// included) never count. Keys where both wrote an equal value do not count either.
fn contested(
    doc: &Automerge,
    heads: &[ChangeHash],
    change: &ChangeHash,
    unseen: &HashSet<ChangeHash>,
) -> Vec<FieldConflict> {
    let mut reader = Reader::new(doc, Some(heads));
    let mut out = Vec::new();
    let mut path = Vec::new();
    walk_contested(&mut reader, &ROOT, &mut path, change, unseen, &mut out);
    out
}

fn walk_contested(
    reader: &mut Reader<'_>,
    obj: &ObjId,
    path: &mut Vec<Value>,
    change: &ChangeHash,
    unseen: &HashSet<ChangeHash>,
    out: &mut Vec<FieldConflict>,
) {
    let is_map = matches!(
        reader.doc.object_type(obj),
        Ok(ObjType::Map | ObjType::Table)
    );
    let props: Vec<Prop> = if is_map {
        reader
            .keys(obj)
            .into_iter()
            .filter(|k| !(path.is_empty() && k.starts_with('$')))
            .map(Prop::Map)
            .collect()
    } else if matches!(reader.doc.object_type(obj), Ok(ObjType::List)) {
        (0..reader.length(obj)).map(Prop::Seq).collect()
    } else {
        Vec::new()
    };
    for prop in props {
        let values = reader.all(obj, prop.clone());
        path.push(match &prop {
            Prop::Map(k) => Value::String(k.clone()),
            Prop::Seq(i) => Value::from(*i),
        });
        if values.len() > 1 {
            let by_change: Vec<(Option<ChangeHash>, Stamp, Value)> = values
                .iter()
                .map(|(v, op)| {
                    let value = reader.value(v.clone(), op);
                    (
                        reader.doc.hash_for_opid(op),
                        op_stamp(reader.doc, op),
                        value,
                    )
                })
                .collect();
            let client = by_change
                .iter()
                .find(|(h, _, _)| h.as_ref() == Some(change));
            let server = by_change
                .iter()
                .filter(|(h, _, _)| h.is_some_and(|h| unseen.contains(&h)))
                .max_by(|a, b| a.1.cmp(&b.1));
            if let (Some(client), Some(server)) = (client, server)
                && client.2 != server.2
            {
                out.push(FieldConflict {
                    path: path.clone(),
                    server: Some(server.2.clone()),
                    client: Some(client.2.clone()),
                    winner: Some(if client.1 > server.1 {
                        Take::Client
                    } else {
                        Take::Server
                    }),
                });
            }
        } else if let Some((AmValue::Object(_), id)) = values.into_iter().next() {
            walk_contested(reader, &id, path, change, unseen, out);
        }
        path.pop();
    }
}

/// The values a live record holds for each of its collection's unique constraints, by the
/// constraint's index; constraints with a field missing or null are left out (nothing to clash).
pub fn unique_values(view: &View, policy: &Policy) -> Vec<(usize, Vec<Value>)> {
    if !view.is_live() {
        return Vec::new();
    }
    policy
        .unique
        .iter()
        .enumerate()
        .filter_map(|(index, fields)| {
            let values: Option<Vec<Value>> = fields
                .iter()
                .map(|f| view.fields.get(f).filter(|v| !v.is_null()).cloned())
                .collect();
            values.map(|v| (index, v))
        })
        .collect()
}
