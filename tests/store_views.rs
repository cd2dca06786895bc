//! Record views against their documents. Two devices write at random (puts, patches, deletes,
//! batches, the same records on both while apart), upload to a relay log this test keeps, apply
//! it (in pages of random sizes, so conflicts are found and shown by each collection's strategy:
//! merge with a text and an encrypted field, lww, manual), resolve open conflicts, flush, crash
//! (losing what was not flushed), reopen, and reopen with a collection's policy changed. After
//! every step, on each device, for every record `get` and `is_live` answer what the record's
//! document gives, `list` pages hold what the documents give, every query (equalities, ranges,
//! orders, paged one record at a time) answers from the collection's secondary indexes what
//! filtering and sorting the listed records gives, and `examine` finds nothing wrong (every view
//! equals its document's, every index entry its view's). Reconfiguring adds an index to a
//! collection that holds records (built at open) and drops it again.
//!
//! Replay a failure with the seed it prints: `PROPTEST_RNG_SEED=... cargo test --test store_views`.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use automerge::ActorId;
use common::{StepClock, proptest_config};
use ferry::crypt::{AccountKey, Keyring};
use ferry::query::{Condition, Direction, Op as QueryOp, Query};
use ferry::record::{Fields, Record};
use ferry::resolve::{self, ConflictStatus, Policies, Policy, Take};
use ferry::store::kv::MemoryKv;
use ferry::store::{RecordView, Store, StoreError, StoreOptions, Write};
use ferry_proto::QueueStatus;
use ferry_proto::wire::LogEntry;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, OnceLock};

/// `M`: merge, `t` a text field, `s` encrypted; `L`: lww (merge once reconfigured); `Q`: manual.
const COLLECTIONS: [&str; 3] = ["M", "L", "Q"];
const IDS: [&str; 2] = ["a", "b"];
const FIELDS: [&str; 4] = ["x", "y", "t", "s"];
const DEVICES: [&str; 2] = [
    "0123456789abcdef0123456789abcdef",
    "fedcba9876543210fedcba9876543210",
];

fn keyring() -> Arc<Keyring> {
    static KEY: OnceLock<Arc<Keyring>> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = AccountKey::derive(b"views are documents", "default").expect("derive");
        Arc::new(Keyring::with(Some(key)))
    })
    .clone()
}

fn policies(reconfigured: bool) -> Policies {
    let mut merge = Policy::of(resolve::Strategy::Merge);
    merge.text = Arc::new(BTreeSet::from(["t".to_owned()]));
    merge.encrypted = Arc::new(BTreeSet::from(["s".to_owned()]));
    let mut last = Policy::of(if reconfigured {
        resolve::Strategy::Merge
    } else {
        resolve::Strategy::Lww
    });
    if reconfigured {
        last.text = Arc::new(BTreeSet::from(["y".to_owned()]));
    }
    Policies {
        default: Policy::default(),
        collections: [
            ("M".to_owned(), merge),
            ("L".to_owned(), last),
            ("Q".to_owned(), Policy::of(resolve::Strategy::Manual)),
        ]
        .into(),
    }
}

/// `M` indexed by `x` and by `x, y`; `L` by `y, x` (and by `x` once reconfigured); `Q` by `y`.
fn indexes(reconfigured: bool) -> BTreeMap<String, Vec<Vec<String>>> {
    let fields = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
    let mut last = vec![fields(&["y", "x"])];
    if reconfigured {
        last.push(fields(&["x"]));
    }
    BTreeMap::from([
        ("M".to_owned(), vec![fields(&["x"]), fields(&["x", "y"])]),
        ("L".to_owned(), last),
        ("Q".to_owned(), vec![fields(&["y"])]),
    ])
}

/// A field and the value a write gives it: text and encrypted fields take strings.
fn value(field: usize, n: u8) -> Value {
    match FIELDS[field] {
        "t" | "s" | "y" => json!(format!("v{n}")),
        _ => json!(n),
    }
}

fn fields(set: &[(usize, u8)]) -> Fields {
    set.iter()
        .map(|&(f, n)| (FIELDS[f].to_owned(), value(f, n)))
        .collect()
}

#[derive(Debug, Clone)]
enum WriteOp {
    Put(usize, usize, Vec<(usize, u8)>),
    Patch(usize, usize, Vec<(usize, u8)>, Vec<usize>),
    Delete(usize, usize),
}

impl WriteOp {
    fn write(&self) -> Write {
        match self {
            WriteOp::Put(c, id, set) => Write::Put {
                collection: COLLECTIONS[*c].into(),
                id: Some(IDS[*id].into()),
                fields: fields(set),
            },
            WriteOp::Patch(c, id, set, unset) => Write::Patch {
                collection: COLLECTIONS[*c].into(),
                id: IDS[*id].into(),
                set: fields(set),
                unset: unset.iter().map(|&f| FIELDS[f].to_owned()).collect(),
            },
            WriteOp::Delete(c, id) => Write::Delete {
                collection: COLLECTIONS[*c].into(),
                id: IDS[*id].into(),
            },
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(usize, WriteOp),
    Batch(usize, Vec<WriteOp>),
    Upload(usize),
    /// Applies up to that many log entries after the device's cursor.
    Download(usize, usize),
    Resolve(usize, Index, bool),
    /// Both devices upload (this one first), then both apply the whole log.
    Exchange(usize),
    Flush(usize),
    Crash(usize),
    Reopen(usize),
    Reconfigure(usize),
}

fn write_op() -> impl Strategy<Value = WriteOp> {
    let set = || prop::collection::vec((0..FIELDS.len(), 0u8..4), 1..4);
    prop_oneof![
        6 => (0..COLLECTIONS.len(), 0..IDS.len(), set()).prop_map(|(c, i, s)| WriteOp::Put(c, i, s)),
        4 => (0..COLLECTIONS.len(), 0..IDS.len(), set(), prop::collection::vec(0..FIELDS.len(), 0..2))
            .prop_map(|(c, i, s, u)| WriteOp::Patch(c, i, s, u)),
        2 => (0..COLLECTIONS.len(), 0..IDS.len()).prop_map(|(c, i)| WriteOp::Delete(c, i)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let device = || 0..DEVICES.len();
    prop_oneof![
        12 => (device(), write_op()).prop_map(|(d, w)| Op::Write(d, w)),
        2 => (device(), prop::collection::vec(write_op(), 1..4)).prop_map(|(d, w)| Op::Batch(d, w)),
        6 => device().prop_map(Op::Upload),
        6 => (device(), 1usize..8).prop_map(|(d, n)| Op::Download(d, n)),
        4 => (device(), any::<Index>(), any::<bool>()).prop_map(|(d, i, s)| Op::Resolve(d, i, s)),
        3 => device().prop_map(Op::Exchange),
        2 => device().prop_map(Op::Flush),
        2 => device().prop_map(Op::Crash),
        1 => device().prop_map(Op::Reopen),
        1 => device().prop_map(Op::Reconfigure),
    ]
}

struct Device {
    id: &'static str,
    kv: MemoryKv,
    clock: Arc<StepClock>,
    reconfigured: bool,
    store: Option<Store>,
}

impl Device {
    fn new(id: &'static str) -> Device {
        let mut device = Device {
            id,
            kv: MemoryKv::new(),
            clock: StepClock::new(),
            reconfigured: false,
            store: None,
        };
        device.open();
        device
    }

    fn open(&mut self) {
        let options = StoreOptions {
            policies: policies(self.reconfigured),
            indexes: indexes(self.reconfigured),
            keyring: keyring(),
            cache_docs: 2,
            ..StoreOptions::default()
        };
        let kv = Box::new(self.kv.clone());
        self.store = Some(Store::open(kv, self.id, options, self.clock.clone()).expect("open"));
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("open")
    }

    fn reopen(&mut self) {
        self.store().flush().expect("flush");
        self.store = None;
        self.open();
    }

    fn crash(&mut self) {
        self.store = None;
        self.kv.crash();
        self.open();
    }
}

/// A write's outcome the test accepts: done, or refused for what the record is now.
fn accepted(result: Result<Vec<ferry::store::Applied>, StoreError>) {
    match result {
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => panic!("write failed: {e}"),
    }
}

struct Run {
    devices: Vec<Device>,
    log: Vec<LogEntry>,
    /// The changes logged, per record: as the relay, per record only (two records can take
    /// byte-identical changes: the same fields written by one device in the same millisecond).
    logged: HashSet<(String, String, Vec<u8>)>,
}

impl Run {
    fn step(&mut self, op: &Op) {
        match op {
            Op::Write(d, w) => {
                self.devices[*d].clock.advance(1);
                accepted(self.devices[*d].store().write_all(vec![w.write()]));
            }
            Op::Batch(d, ws) => {
                self.devices[*d].clock.advance(1);
                accepted(
                    self.devices[*d]
                        .store()
                        .write_all(ws.iter().map(WriteOp::write).collect()),
                );
            }
            Op::Upload(d) => {
                // What is uploaded is durable first: a crash never takes back a logged change.
                let store = self.devices[*d].store();
                store.flush().unwrap();
                for entry in store
                    .queue(Some(QueueStatus::Pending), None, 10_000)
                    .unwrap()
                {
                    let logged = (
                        entry.model_name.clone(),
                        entry.object_id.clone(),
                        entry.data.clone(),
                    );
                    if self.logged.insert(logged) {
                        self.log.push(LogEntry {
                            seq: self.log.len() as u64 + 1,
                            collection: entry.model_name,
                            record: entry.object_id,
                            change: entry.data,
                        });
                    }
                }
            }
            Op::Download(d, n) => {
                let store = self.devices[*d].store();
                let cursor = store.sync_cursor().unwrap() as usize;
                let end = (cursor + n).min(self.log.len());
                if end > cursor {
                    let outcome = store
                        .apply_remote(&self.log[cursor..end], end as u64)
                        .unwrap();
                    assert!(outcome.quarantined.is_empty(), "{:?}", outcome.quarantined);
                }
            }
            Op::Resolve(d, pick, server) => {
                let store = self.devices[*d].store();
                let open = store
                    .conflicts(Some(ConflictStatus::Open), None, None, 100)
                    .unwrap();
                let Some(conflict) = open.get(pick.index(open.len().max(1))) else {
                    return;
                };
                if conflict.resolving.is_some() {
                    return;
                }
                let take = if *server { Take::Server } else { Take::Client };
                self.devices[*d].clock.advance(1);
                store.resolve_conflict(&conflict.id, take, None).unwrap();
            }
            Op::Exchange(d) => {
                let other = 1 - *d;
                for op in [
                    Op::Upload(*d),
                    Op::Upload(other),
                    Op::Download(*d, usize::MAX / 2),
                    Op::Download(other, usize::MAX / 2),
                ] {
                    self.step(&op);
                }
            }
            Op::Flush(d) => self.devices[*d].store().flush().unwrap(),
            Op::Crash(d) => self.devices[*d].crash(),
            Op::Reopen(d) => self.devices[*d].reopen(),
            Op::Reconfigure(d) => {
                let device = &mut self.devices[*d];
                device.reconfigured = !device.reconfigured;
                device.reopen();
            }
        }
    }

    fn check(&self) {
        for device in &self.devices {
            check_device(device);
        }
    }
}

/// What `get` must answer for a record, computed from its document as `export` gives it: the
/// fields its policy shows (encrypted ones opened), its heads and its open conflicts. `None`
/// for a missing or deleted record.
fn from_document(
    store: &Store,
    policies: &Policies,
    collection: &str,
    id: &str,
) -> Option<RecordView> {
    let bytes = match store.export_doc(collection, id) {
        Ok(bytes) => bytes,
        Err(StoreError::NotFound { .. }) => return None,
        Err(e) => panic!("export {collection}/{id}: {e}"),
    };
    let policy = policies.of(collection);
    let mut record = Record::load(&bytes, &ActorId::from(&[0u8; 16][..]))
        .unwrap()
        .with_text_fields(policy.text.clone());
    let mut shown = resolve::view(&mut record, policy);
    if !shown.is_live() {
        return None;
    }
    store
        .keyring()
        .open_fields(collection, id, &mut shown.fields, true)
        .unwrap();
    Some(RecordView {
        collection: collection.to_owned(),
        id: id.to_owned(),
        fields: ferry::store::FieldsText::of(&shown.fields).unwrap(),
        heads: record.heads().iter().map(ToString::to_string).collect(),
        conflicts: store.record_conflicts(collection, id).unwrap(),
    })
}

fn check_device(device: &Device) {
    let store = device.store();
    let policies = policies(device.reconfigured);
    for collection in COLLECTIONS {
        let mut expected = Vec::new();
        for id in IDS {
            let from_document = from_document(store, &policies, collection, id);
            match (store.get(collection, id), &from_document) {
                (Ok(got), Some(want)) => assert_eq!(&got, want, "{collection}/{id}"),
                (Err(StoreError::NotFound { .. }), None) => {}
                (got, want) => panic!("{collection}/{id}: get gave {got:?}, the document {want:?}"),
            }
            assert_eq!(
                store.is_live(collection, id).unwrap(),
                from_document.is_some(),
                "{collection}/{id}"
            );
            expected.extend(from_document);
        }
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = store.list(collection, after.as_deref(), 2).unwrap();
            listed.extend(page);
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(listed, expected, "list {collection}");
        check_queries(store, collection, &listed);
    }
    let checkup = store.examine().unwrap();
    assert_eq!(checkup.damage, None, "{checkup:?}");
}

fn condition(field: &str, op: QueryOp, value: Value) -> Condition {
    Condition {
        field: field.into(),
        op,
        value: Some(value),
    }
}

/// Queries on `x` and `y` (the values writes give them, and one past), with the plan each
/// should get in `collection`: `None` where it depends on the configuration, or a scan.
fn queries(collection: &str) -> Vec<(Query, Option<&'static str>)> {
    let mut out = Vec::new();
    for n in 0u8..5 {
        let (x, y) = (json!(n), json!(format!("v{n}")));
        let x_eq = condition("x", QueryOp::Eq, x.clone());
        let y_eq = condition("y", QueryOp::Eq, y.clone());
        let by = |field: &str, direction| Some((field.to_owned(), direction));
        let asc = Direction::Asc;
        let desc = Direction::Desc;
        let plans: [(_, _, Option<&str>); 8] = [
            (
                vec![x_eq.clone()],
                None,
                (collection == "M").then_some("index:x"),
            ),
            (
                vec![condition("x", QueryOp::Ge, x.clone())],
                by("x", desc),
                None,
            ),
            (vec![condition("x", QueryOp::Lt, x.clone())], None, None),
            (vec![x_eq.clone(), y_eq.clone()], None, None),
            (
                vec![y_eq.clone()],
                by("x", asc),
                (collection == "L").then_some("index:y,x"),
            ),
            (
                vec![y_eq.clone(), condition("x", QueryOp::Le, x.clone())],
                by("x", desc),
                None,
            ),
            (
                vec![condition("y", QueryOp::Gt, y.clone())],
                by("y", asc),
                None,
            ),
            (
                vec![condition("x", QueryOp::In, json!([n, 1]))],
                by("y", desc),
                None,
            ),
        ];
        for (conditions, order, plan) in plans {
            let (conditions, order): (Vec<Condition>, Option<(String, Direction)>) =
                (conditions, order);
            out.push((Query::new(conditions, order).unwrap(), plan));
        }
    }
    for direction in [Direction::Asc, Direction::Desc] {
        for field in ["x", "y"] {
            let order = Some((field.to_owned(), direction));
            out.push((Query::new(Vec::new(), order).unwrap(), None));
        }
    }
    let text = condition("t", QueryOp::Exists, json!(true));
    out.push((Query::new(vec![text], None).unwrap(), Some("scan")));
    out
}

/// Every query, read a record per page, gives what filtering and sorting `listed` (the
/// collection's live records) gives, whichever plan answers it.
fn check_queries(store: &Store, collection: &str, listed: &[RecordView]) {
    for (query, plan) in queries(collection) {
        let mut expected: Vec<&RecordView> = listed
            .iter()
            .filter(|r| query.matches(&r.fields.parse().unwrap()))
            .collect();
        expected.sort_by(|a, b| {
            query.compare(
                (&a.fields.parse().unwrap(), &a.id),
                (&b.fields.parse().unwrap(), &b.id),
            )
        });
        let expected: Vec<&RecordView> = expected;
        let mut got: Vec<RecordView> = Vec::new();
        let mut after = None;
        loop {
            let found = store
                .query(collection, &query, after.as_deref(), 1)
                .unwrap();
            if let Some(plan) = plan {
                assert_eq!(found.plan, plan, "{collection} {query:?}");
            }
            // Whole records: an index answers from the copies of views its entries hold.
            got.extend(found.records);
            match found.next {
                Some(next) => after = Some(next),
                None => break,
            }
            assert!(got.len() <= listed.len(), "pages never end: {query:?}");
        }
        let got: Vec<&RecordView> = got.iter().collect();
        assert_eq!(got, expected, "{collection} {query:?}");
    }
}

proptest! {
    #![proptest_config(proptest_config(128))]

    #[test]
    fn views_always_equal_their_documents(ops in prop::collection::vec(op(), 10..60)) {
        let mut run = Run {
            devices: DEVICES.iter().map(|id| Device::new(id)).collect(),
            log: Vec::new(),
            logged: HashSet::new(),
        };
        for op in &ops {
            run.step(op);
            run.check();
        }
    }
}
