//! A model-based test of the store. Random sequences of writes (single and batched, valid and
//! invalid), reads, list paging, queue moves, flushes, reopens and crashes run against the real
//! `Store` (over sled in a temp dir, or over `MemoryKv`) and against a plain in-memory model; after
//! every step the two must agree on every record, every list page, the collection counts, the
//! whole SyncQueue and every record's history.
//!
//! Replay a failure with the seed it prints: `PROPTEST_RNG_SEED=... cargo test --test store_model`.
//! `PROPTEST_CASES` sets the number of cases.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Engine, TestStore, json_difference};
use ferry::record::{Fields, RecordError};
use ferry::store::{Applied, QueueAction, Store, StoreError, StoreOptions, Write};
use ferry_proto::{Limits, Operation, QueueStatus, SyncQueueEntry};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// "Cust" is a prefix of "Customer": the two must not leak into each other.
const COLLECTIONS: [&str; 3] = ["Cust", "Customer", "a.b-c_1"];
const BAD_COLLECTIONS: [&str; 2] = ["1st", "has space"];
const IDS: [&str; 6] = ["1", "10", "2", "a/b", "ü 🚢", "Z"];
const FIELD_NAMES: [&str; 4] = ["a", "b", "c", ""];
const RESERVED_NAME: &str = "$x";
const MAX_DEPTH: usize = 4;

fn bad_ids() -> [String; 3] {
    [String::new(), "tab\there".into(), "x".repeat(257)]
}

/// Field values the writes draw from: different JSON kinds that `==`-style comparisons might
/// confuse (1, 1.0; 0.0, -0.0), nesting up to the depth limit, and one value over it.
fn values() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(1.0),
        json!(0.0),
        json!(-0.0),
        json!(u64::MAX),
        json!("x"),
        json!(""),
        json!("🚢\u{0}"),
        json!(true),
        json!(null),
        json!([]),
        json!([1]),
        json!([1.0]),
        json!({}),
        json!({"n": 1}),
        json!({"n": 1.0, "m": [null]}),
        json!([[["at the limit"]]]),
        too_deep(),
    ]
}

fn too_deep() -> Value {
    json!([[[["one level over the limit"]]]])
}

#[derive(Debug, Clone, Copy)]
enum Coll {
    Good(usize),
    Bad(usize),
}

#[derive(Debug, Clone, Copy)]
enum IdRef {
    Fixed(usize),
    /// The n-th id the store generated so far (a fixed one while there is none).
    Generated(usize),
    Bad(usize),
}

#[derive(Debug, Clone)]
enum WriteOp {
    Put {
        coll: Coll,
        id: Option<IdRef>,
        fields: Fields,
    },
    Patch {
        coll: Coll,
        id: IdRef,
        set: Fields,
        unset: Vec<String>,
    },
    Delete {
        coll: Coll,
        id: IdRef,
    },
}

#[derive(Debug, Clone, Copy)]
enum Move {
    Start,
    Complete,
    Fail(u32),
    Retry,
    Requeue,
}

#[derive(Debug, Clone)]
enum Op {
    Write(WriteOp),
    Batch(Vec<WriteOp>),
    /// Writes a record's current fields again (put, or patch of one field), either as they are
    /// (no change) or with one value swapped for a look-alike of another kind (1 and 1.0, 0.0 and
    /// -0.0), which must be a change.
    Rewrite {
        coll: usize,
        id: IdRef,
        twist: Option<Index>,
        patch: bool,
    },
    Get(usize, IdRef),
    List {
        coll: usize,
        limit: usize,
        after: Option<IdRef>,
    },
    History(usize, IdRef),
    /// Moves the picked entries: among those the move applies to when `targeted` (so that moves
    /// are mostly legal), else among all.
    Queue {
        m: Move,
        picks: Vec<Index>,
        targeted: bool,
    },
    Recover,
    Flush,
    Reopen,
    /// MemoryKv: lose everything not flushed, then reopen. Sled: a clean reopen.
    Crash,
}

// ---- Strategies ----

/// `narrow` keeps to valid addresses among two records, so that the writes of a batch often
/// meet and the batch often lands.
fn coll(narrow: bool) -> BoxedStrategy<Coll> {
    if narrow {
        return Just(Coll::Good(0)).boxed();
    }
    prop_oneof![
        12 => (0..COLLECTIONS.len()).prop_map(Coll::Good),
        1 => (0..BAD_COLLECTIONS.len()).prop_map(Coll::Bad),
    ]
    .boxed()
}

fn id_ref(narrow: bool) -> BoxedStrategy<IdRef> {
    if narrow {
        return prop_oneof![
            4 => (0..2_usize).prop_map(IdRef::Fixed),
            1 => (0..2_usize).prop_map(IdRef::Generated),
        ]
        .boxed();
    }
    prop_oneof![
        10 => (0..IDS.len()).prop_map(IdRef::Fixed),
        3 => (0..8_usize).prop_map(IdRef::Generated),
        1 => (0..3_usize).prop_map(IdRef::Bad),
    ]
    .boxed()
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => prop::sample::select(FIELD_NAMES.to_vec()).prop_map(str::to_owned),
        1 => Just(RESERVED_NAME.to_owned()),
    ]
}

fn field_set() -> impl Strategy<Value = Fields> {
    prop::collection::btree_map(field_name(), prop::sample::select(values()), 0..4)
        .prop_map(|m| m.into_iter().collect())
}

fn write_op(narrow: bool) -> impl Strategy<Value = WriteOp> {
    prop_oneof![
        7 => (coll(narrow), prop::option::weighted(0.85, id_ref(narrow)), field_set())
            .prop_map(|(coll, id, fields)| WriteOp::Put { coll, id, fields }),
        4 => (coll(narrow), id_ref(narrow), field_set(), prop::collection::vec(field_name(), 0..3))
            .prop_map(|(coll, id, set, unset)| {
                // A name both unset and set is written twice; keep the two apart.
                let unset = unset.into_iter().filter(|n| !set.contains_key(n)).collect();
                WriteOp::Patch { coll, id, set, unset }
            }),
        1 => (coll(narrow), id_ref(narrow)).prop_map(|(coll, id)| WriteOp::Delete { coll, id }),
    ]
}

fn queue_move() -> impl Strategy<Value = Move> {
    prop_oneof![
        4 => Just(Move::Start),
        2 => Just(Move::Complete),
        3 => (0..4_u32).prop_map(Move::Fail),
        1 => Just(Move::Retry),
        1 => Just(Move::Requeue),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let good = 0..COLLECTIONS.len();
    prop_oneof![
        30 => write_op(false).prop_map(Op::Write),
        3 => prop::collection::vec(write_op(false), 1..5).prop_map(Op::Batch),
        6 => prop::collection::vec(write_op(true), 2..6).prop_map(Op::Batch),
        10 => (good.clone(), id_ref(false), prop::option::of(any::<Index>()), any::<bool>())
            .prop_map(|(coll, id, twist, patch)| Op::Rewrite { coll, id, twist, patch }),
        4 => (good.clone(), id_ref(false)).prop_map(|(c, id)| Op::Get(c, id)),
        5 => (good.clone(), 1..4_usize, prop::option::of(id_ref(false)))
            .prop_map(|(coll, limit, after)| Op::List { coll, limit, after }),
        3 => (good, id_ref(false)).prop_map(|(c, id)| Op::History(c, id)),
        24 => (queue_move(), prop::collection::vec(any::<Index>(), 1..4), prop::bool::weighted(0.75))
            .prop_map(|(m, picks, targeted)| Op::Queue { m, picks, targeted }),
        2 => Just(Op::Recover),
        4 => Just(Op::Flush),
        3 => Just(Op::Reopen),
        3 => Just(Op::Crash),
    ]
}

// ---- The model ----

#[derive(Debug, Clone, Default)]
struct Doc {
    live: bool,
    fields: Fields,
    /// Changes written to the record: its history length.
    changes: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    operation: Operation,
    collection: String,
    id: String,
    status: QueueStatus,
    retry_count: u32,
    last_error: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct State {
    docs: BTreeMap<(String, String), Doc>,
    /// One entry per change, in the order the changes were written.
    queue: Vec<Entry>,
}

/// Why the store refuses a write.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Refusal {
    NotFound,
    Address,
    Reserved,
    TooDeep,
}

fn refusal_of(e: &StoreError) -> Refusal {
    match e {
        StoreError::NotFound { .. } => Refusal::NotFound,
        StoreError::Address(_) => Refusal::Address,
        StoreError::Record(RecordError::ReservedField { .. }) => Refusal::Reserved,
        StoreError::Record(RecordError::TooDeep { .. }) => Refusal::TooDeep,
        other => panic!("unexpected store error: {other}"),
    }
}

/// A write with its address spelled out.
#[derive(Debug, Clone)]
struct Resolved {
    collection: String,
    /// `None`: the store generates the id.
    id: Option<String>,
    address_ok: bool,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Put(Fields),
    Patch(Fields, Vec<String>),
    Delete,
}

fn same_fields(a: &Fields, b: &Fields) -> bool {
    json_difference(&Value::Object(a.clone()), &Value::Object(b.clone())).is_none()
}

fn fields_refusal(fields: &Fields) -> Option<Refusal> {
    if fields.keys().any(|k| k.starts_with('$')) {
        Some(Refusal::Reserved)
    } else if fields.values().any(|v| *v == too_deep()) {
        Some(Refusal::TooDeep)
    } else {
        None
    }
}

impl State {
    /// Applies one write; `id` is the record's id (the generated one for a put without id).
    fn apply(&mut self, w: &Resolved, id: &str) -> Result<Option<Operation>, Refusal> {
        if !w.address_ok {
            return Err(Refusal::Address);
        }
        let key = (w.collection.clone(), id.to_owned());
        let live = self.docs.get(&key).is_some_and(|d| d.live);
        let (operation, fields) = match &w.kind {
            Kind::Put(fields) => {
                if let Some(r) = fields_refusal(fields) {
                    return Err(r);
                }
                match self.docs.get(&key) {
                    Some(doc) if doc.live && same_fields(&doc.fields, fields) => return Ok(None),
                    Some(doc) if doc.live => (Operation::Update, fields.clone()),
                    _ => (Operation::Create, fields.clone()),
                }
            }
            Kind::Patch(set, unset) => {
                if let Some(r) = fields_refusal(set) {
                    return Err(r);
                }
                if !live {
                    return Err(Refusal::NotFound);
                }
                if unset.iter().any(|k| k.starts_with('$')) {
                    return Err(Refusal::Reserved);
                }
                let old = &self.docs[&key].fields;
                let mut merged = old.clone();
                for name in unset {
                    merged.remove(name);
                }
                merged.extend(set.clone());
                if same_fields(old, &merged) {
                    return Ok(None);
                }
                (Operation::Update, merged)
            }
            Kind::Delete => {
                if !live {
                    return Err(Refusal::NotFound);
                }
                (Operation::Delete, self.docs[&key].fields.clone())
            }
        };
        let doc = self.docs.entry(key).or_default();
        doc.live = operation != Operation::Delete;
        doc.fields = fields;
        doc.changes += 1;
        self.queue.push(Entry {
            operation,
            collection: w.collection.clone(),
            id: id.to_owned(),
            status: QueueStatus::Pending,
            retry_count: 0,
            last_error: None,
        });
        Ok(Some(operation))
    }

    /// Moves the entries at `positions`, all or none.
    fn transition(&mut self, positions: &[usize], m: Move) -> bool {
        let mut next = self.queue.clone();
        for &p in positions {
            let e = &mut next[p];
            let allowed = match (m, e.status) {
                (Move::Start, QueueStatus::Pending) => QueueStatus::Processing,
                (Move::Complete, QueueStatus::Processing) => {
                    e.last_error = None;
                    QueueStatus::Completed
                }
                (Move::Fail(max), QueueStatus::Processing) => {
                    e.retry_count += 1;
                    e.last_error = Some(fail_message(max));
                    if e.retry_count >= max {
                        QueueStatus::Failed
                    } else {
                        QueueStatus::Pending
                    }
                }
                (Move::Retry, QueueStatus::Failed) => {
                    e.retry_count = 0;
                    QueueStatus::Pending
                }
                (Move::Requeue, QueueStatus::Processing) => QueueStatus::Pending,
                _ => return false,
            };
            e.status = allowed;
        }
        self.queue = next;
        true
    }
}

fn fail_message(max: u32) -> String {
    format!("upload failed (max {max})")
}

fn action(m: Move) -> QueueAction {
    match m {
        Move::Start => QueueAction::Start,
        Move::Complete => QueueAction::Complete,
        Move::Fail(max) => QueueAction::Fail {
            error: fail_message(max),
            max_retries: max,
        },
        Move::Retry => QueueAction::Retry,
        Move::Requeue => QueueAction::RequeueInterrupted,
    }
}

struct Run {
    h: TestStore,
    now: State,
    durable: State,
    generated: Vec<String>,
}

impl Run {
    fn collection(&self, c: Coll) -> (String, bool) {
        match c {
            Coll::Good(i) => (COLLECTIONS[i].to_owned(), true),
            Coll::Bad(i) => (BAD_COLLECTIONS[i].to_owned(), false),
        }
    }

    fn id(&self, r: IdRef) -> (String, bool) {
        match r {
            IdRef::Fixed(i) => (IDS[i].to_owned(), true),
            IdRef::Generated(n) if !self.generated.is_empty() => {
                (self.generated[n % self.generated.len()].clone(), true)
            }
            IdRef::Generated(n) => (IDS[n % IDS.len()].to_owned(), true),
            IdRef::Bad(i) => (bad_ids()[i].clone(), false),
        }
    }

    fn resolve(&self, w: &WriteOp) -> (Resolved, Write) {
        let (c, id, kind) = match w {
            WriteOp::Put { coll, id, fields } => (coll, id.as_ref(), Kind::Put(fields.clone())),
            WriteOp::Patch {
                coll,
                id,
                set,
                unset,
            } => (coll, Some(id), Kind::Patch(set.clone(), unset.clone())),
            WriteOp::Delete { coll, id } => (coll, Some(id), Kind::Delete),
        };
        let (collection, collection_ok) = self.collection(*c);
        let (id, id_ok) = match id {
            Some(r) => {
                let (id, ok) = self.id(*r);
                (Some(id), ok)
            }
            None => (None, true),
        };
        let write = match &kind {
            Kind::Put(fields) => Write::Put {
                collection: collection.clone(),
                id: id.clone(),
                fields: fields.clone(),
            },
            Kind::Patch(set, unset) => Write::Patch {
                collection: collection.clone(),
                id: id.clone().unwrap_or_default(),
                set: set.clone(),
                unset: unset.clone(),
            },
            Kind::Delete => Write::Delete {
                collection: collection.clone(),
                id: id.clone().unwrap_or_default(),
            },
        };
        let resolved = Resolved {
            collection,
            id,
            address_ok: collection_ok && id_ok,
            kind,
        };
        (resolved, write)
    }

    /// Runs writes as one batch on both sides and compares the outcome.
    fn writes(&mut self, ops: &[WriteOp]) {
        let (resolved, writes): (Vec<Resolved>, Vec<Write>) =
            ops.iter().map(|w| self.resolve(w)).unzip();
        let result = self.h.store().write_all(writes);
        let mut next = self.now.clone();
        let mut expected = Vec::new();
        let mut refused = None;
        for (n, w) in resolved.iter().enumerate() {
            let id = match (&w.id, &result) {
                (Some(id), _) => id.clone(),
                (None, Ok(applied)) => {
                    let id = applied[n].id.clone();
                    assert_eq!(id.len(), 26, "generated id {id:?}");
                    assert!(
                        !next.docs.contains_key(&(w.collection.clone(), id.clone())),
                        "generated id {id} already names a record"
                    );
                    self.generated.push(id.clone());
                    id
                }
                // Only the address or the fields can refuse a put; the id does not matter.
                (None, Err(_)) => "generated".to_owned(),
            };
            match next.apply(w, &id) {
                Ok(operation) => expected.push((w.collection.clone(), id, operation)),
                Err(r) => {
                    refused = Some(r);
                    break;
                }
            }
        }
        match (result, refused) {
            (Ok(applied), None) => {
                check_applied(&applied, &expected);
                self.now = next;
            }
            (Err(e), Some(r)) => assert_eq!(refusal_of(&e), r, "refusal: {e}"),
            (Ok(applied), Some(r)) => {
                panic!("the model refuses ({r:?}) but the store applied {applied:?}")
            }
            (Err(e), None) => panic!("the store refused ({e}) but the model applies {expected:?}"),
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Write(w) => self.writes(std::slice::from_ref(w)),
            Op::Batch(ws) => self.writes(ws),
            Op::Rewrite {
                coll,
                id,
                twist,
                patch,
            } => {
                let (id_text, _) = self.id(*id);
                let key = (COLLECTIONS[*coll].to_owned(), id_text);
                let mut fields = self
                    .now
                    .docs
                    .get(&key)
                    .map(|d| d.fields.clone())
                    .unwrap_or_default();
                let name = twist.map(|t| t.index(fields.len().max(1)));
                let name = name.and_then(|i| fields.keys().nth(i).cloned());
                if let Some(name) = &name {
                    let swapped = common::look_alike(&fields[name]);
                    fields.insert(name.clone(), swapped);
                }
                let coll = Coll::Good(*coll);
                let w = if *patch {
                    let set = match name.or_else(|| fields.keys().next().cloned()) {
                        Some(n) => Fields::from_iter([(n.clone(), fields[&n].clone())]),
                        None => Fields::new(),
                    };
                    WriteOp::Patch {
                        coll,
                        id: *id,
                        set,
                        unset: Vec::new(),
                    }
                } else {
                    WriteOp::Put {
                        coll,
                        id: Some(*id),
                        fields,
                    }
                };
                self.writes(&[w]);
            }
            Op::Get(c, r) => {
                let (id, ok) = self.id(*r);
                let got = self.h.store().get(COLLECTIONS[*c], &id);
                if ok {
                    check_get(got, self.now.docs.get(&(COLLECTIONS[*c].to_owned(), id)));
                } else {
                    assert!(matches!(got, Err(StoreError::Address(_))), "{got:?}");
                }
            }
            Op::List { coll, limit, after } => {
                let after = after.map(|r| self.id(r).0);
                check_list(self.h.store(), &self.now, COLLECTIONS[*coll], *limit, after);
            }
            Op::History(c, r) => {
                let (id, ok) = self.id(*r);
                let got = self.h.store().history(COLLECTIONS[*c], &id);
                match self.now.docs.get(&(COLLECTIONS[*c].to_owned(), id)) {
                    Some(doc) if ok => assert_eq!(got.expect("history").len(), doc.changes),
                    _ if ok => assert!(matches!(got, Err(StoreError::NotFound { .. })), "{got:?}"),
                    _ => assert!(matches!(got, Err(StoreError::Address(_))), "{got:?}"),
                }
            }
            Op::Queue { m, picks, targeted } => {
                let from = match m {
                    Move::Start => QueueStatus::Pending,
                    Move::Retry => QueueStatus::Failed,
                    _ => QueueStatus::Processing,
                };
                let mut candidates: Vec<usize> = (0..self.now.queue.len())
                    .filter(|&p| !targeted || self.now.queue[p].status == from)
                    .collect();
                if candidates.is_empty() {
                    candidates = (0..self.now.queue.len()).collect();
                }
                if candidates.is_empty() {
                    return;
                }
                let mut positions = Vec::new();
                for p in picks {
                    let p = candidates[p.index(candidates.len())];
                    if !positions.contains(&p) {
                        positions.push(p);
                    }
                }
                let entries = queue(self.h.store());
                let ids: Vec<u64> = positions.iter().map(|&p| entries[p].id).collect();
                let result = self.h.store().queue_transition(&ids, &action(*m));
                let allowed = self.now.transition(&positions, *m);
                match result {
                    Ok(updated) => {
                        assert!(
                            allowed,
                            "the store moved {ids:?} by {m:?}; the model refuses"
                        );
                        let statuses: Vec<_> = updated.iter().map(|e| e.status).collect();
                        let expected: Vec<_> = positions
                            .iter()
                            .map(|&p| self.now.queue[p].status)
                            .collect();
                        assert_eq!(statuses, expected);
                    }
                    Err(StoreError::Transition(_)) => {
                        assert!(
                            !allowed,
                            "the store refused {m:?} on {ids:?}; the model allows"
                        )
                    }
                    Err(e) => panic!("queue_transition: {e}"),
                }
            }
            Op::Recover => {
                let processing = self
                    .now
                    .queue
                    .iter()
                    .filter(|e| e.status == QueueStatus::Processing)
                    .count();
                let n = self.h.store().recover_interrupted().expect("recover");
                assert_eq!(n, processing);
                for e in &mut self.now.queue {
                    if e.status == QueueStatus::Processing {
                        e.status = QueueStatus::Pending;
                    }
                }
                // recover_interrupted flushes.
                self.durable = self.now.clone();
            }
            Op::Flush => {
                self.h.store().flush().expect("flush");
                self.durable = self.now.clone();
            }
            Op::Reopen => {
                self.h.reopen();
                self.durable = self.now.clone();
            }
            Op::Crash => {
                if self.h.crash() {
                    self.now = self.durable.clone();
                } else {
                    self.durable = self.now.clone();
                }
            }
        }
    }
}

fn check_applied(applied: &[Applied], expected: &[(String, String, Option<Operation>)]) {
    assert_eq!(applied.len(), expected.len());
    for (a, (c, id, operation)) in applied.iter().zip(expected) {
        assert_eq!((&a.collection, &a.id), (c, id));
        assert_eq!(a.operation, *operation, "{c}/{id}");
        assert_eq!(a.queue_id.is_some(), operation.is_some(), "{c}/{id}");
        assert!(!a.heads.is_empty(), "{c}/{id} has no heads");
    }
}

fn check_get(got: Result<ferry::store::RecordView, StoreError>, doc: Option<&Doc>) {
    match (got, doc) {
        (Ok(view), Some(doc)) if doc.live => {
            if let Some(diff) = json_difference(
                &Value::Object(view.fields.parse().unwrap()),
                &Value::Object(doc.fields.clone()),
            ) {
                panic!("get {}/{}: {diff}", view.collection, view.id);
            }
            assert!(!view.heads.is_empty());
        }
        (Err(StoreError::NotFound { .. }), doc) if doc.is_none_or(|d| !d.live) => {}
        (got, doc) => panic!("get: store {got:?}, model {doc:?}"),
    }
}

/// Pages through a collection from `after` with `limit`, against the model.
fn check_list(store: &Store, model: &State, collection: &str, limit: usize, after: Option<String>) {
    let live: Vec<(&String, &Fields)> = model
        .docs
        .iter()
        .filter(|((c, id), d)| c == collection && d.live && after.as_ref().is_none_or(|a| id > a))
        .map(|((_, id), d)| (id, &d.fields))
        .collect();
    let mut after = after;
    let mut expected = live.as_slice();
    loop {
        let (page, next) = store
            .list(collection, after.as_deref(), limit)
            .expect("list");
        let want = &expected[..limit.min(expected.len())];
        let ids: Vec<&String> = page.iter().map(|v| &v.id).collect();
        let want_ids: Vec<&String> = want.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids, want_ids,
            "list {collection} after {after:?} limit {limit}"
        );
        for (view, (_, fields)) in page.iter().zip(want) {
            let diff = json_difference(
                &Value::Object(view.fields.parse().unwrap()),
                &Value::Object((*fields).clone()),
            );
            assert!(diff.is_none(), "list {collection}/{}: {diff:?}", view.id);
        }
        let want_next = (expected.len() > limit).then(|| want[limit - 1].0.clone());
        assert_eq!(next, want_next, "list {collection} next");
        expected = &expected[want.len()..];
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert!(expected.is_empty());
}

fn queue(store: &Store) -> Vec<SyncQueueEntry> {
    store.queue(None, None, usize::MAX).expect("queue")
}

/// The whole comparison, after every step.
fn check_all(run: &Run) {
    let store = run.h.store();
    let model = &run.now;
    let mut ids: BTreeSet<String> = IDS.iter().map(|s| (*s).to_owned()).collect();
    ids.extend(run.generated.iter().cloned());
    for c in COLLECTIONS {
        for id in &ids {
            let key = (c.to_owned(), id.clone());
            check_get(store.get(c, id), model.docs.get(&key));
            if !model.docs.contains_key(&key) {
                let h = store.history(c, id);
                assert!(matches!(h, Err(StoreError::NotFound { .. })), "{h:?}");
            }
        }
        check_list(store, model, c, 1000, None);
    }

    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (c, _) in model.docs.keys() {
        *counts.entry(c.clone()).or_default() += 1;
    }
    let counts: Vec<(String, u64)> = counts.into_iter().collect();
    assert_eq!(store.collections().expect("collections"), counts);

    let entries = queue(store);
    assert_eq!(entries.len(), model.queue.len(), "queue length");
    assert!(
        entries.windows(2).all(|w| w[0].id < w[1].id),
        "queue ids increase"
    );
    for (n, (e, m)) in entries.iter().zip(&model.queue).enumerate() {
        let got = Entry {
            operation: e.operation,
            collection: e.model_name.clone(),
            id: e.object_id.clone(),
            status: e.status,
            retry_count: e.retry_count,
            last_error: e.last_error.clone(),
        };
        assert_eq!(&got, m, "queue entry {n}");
    }
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store.queue(None, after, 2).expect("queue page");
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        paged.extend(page);
    }
    assert_eq!(paged, entries, "queue pages");
    let counts = store.queue_counts().expect("queue counts");
    for (status, count) in [
        (QueueStatus::Pending, counts.pending),
        (QueueStatus::Processing, counts.processing),
        (QueueStatus::Completed, counts.completed),
        (QueueStatus::Failed, counts.failed),
    ] {
        let want: Vec<u64> = entries
            .iter()
            .filter(|e| e.status == status)
            .map(|e| e.id)
            .collect();
        assert_eq!(count, want.len() as u64, "{status:?} count");
        let got: Vec<u64> = store
            .queue(Some(status), None, usize::MAX)
            .expect("queue by status")
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(got, want, "{status:?} entries");
    }

    for ((c, id), doc) in &model.docs {
        let history = store.history(c, id).expect("history");
        assert_eq!(history.len(), doc.changes, "history of {c}/{id}");
    }
    let addresses: Vec<(&str, &str)> = model
        .docs
        .keys()
        .map(|(c, id)| (c.as_str(), id.as_str()))
        .collect();
    common::assert_queue_matches_history(store, &addresses);
}

fn run_ops(engine: Engine, cache_docs: usize, ops: &[Op]) {
    let options = StoreOptions {
        limits: Limits {
            max_depth: MAX_DEPTH,
            ..Limits::default()
        },
        cache_docs,
        ..StoreOptions::default()
    };
    let mut run = Run {
        h: TestStore::new(engine, options),
        now: State::default(),
        durable: State::default(),
        generated: Vec::new(),
    };
    check_all(&run);
    for (n, op) in ops.iter().enumerate() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run.step(op);
            check_all(&run);
        }));
        if let Err(panic) = outcome {
            eprintln!("failed at step {n}: {op:?}");
            std::panic::resume_unwind(panic);
        }
    }
}

fn engine() -> impl Strategy<Value = Engine> {
    prop_oneof![Just(Engine::Sled), Just(Engine::Memory)]
}

proptest! {
    #![proptest_config(common::proptest_config(64))]

    #[test]
    fn store_matches_the_model(
        engine in engine(),
        cache_docs in prop::sample::select(vec![1_usize, 2, 1024]),
        ops in prop::collection::vec(op(), 1..64),
    ) {
        run_ops(engine, cache_docs, &ops);
    }
}
