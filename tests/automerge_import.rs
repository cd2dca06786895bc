//! Automerge documents made elsewhere, brought into Ferry with their history
//! (`Store::import_document`, `ferry import --format automerge`): the record shows the
//! document's fields and history, its changes upload under the actors that wrote them, the relay
//! logs them (they are no device's), and another device ends with the same heads. Documents that
//! are not JSON-shaped records, that hold an encrypted field in the clear, or that would
//! overwrite a record are refused with the reason. Real device stores and the real relay store.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use automerge::transaction::Transactable as _;
use automerge::{ActorId, AutoCommit, ObjType, ROOT, ScalarValue};
use common::{StepClock, fields};
use ferry::record::RecordError;
use ferry::relay::storage::KvStorage;
use ferry::relay::store::{RelayStore, RelayStoreOptions};
use ferry::resolve::{Policies, Policy};
use ferry::store::kv::MemoryKv;
use ferry::store::{BatchLimits, RetryPolicy, Store, StoreError, StoreOptions};
use ferry_proto::wire::ChangeOutcome;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const SPACE: &str = "team";
const A: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
const B: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";

fn policies() -> Policies {
    Policies {
        default: Policy::default(),
        collections: BTreeMap::from([(
            "Secret".to_owned(),
            Policy {
                encrypted: Arc::new(BTreeSet::from(["pin".to_owned()])),
                ..Policy::default()
            },
        )]),
    }
}

fn device(id: &str) -> Store {
    Store::open(
        Box::new(MemoryKv::new()),
        id,
        StoreOptions {
            policies: policies(),
            ..StoreOptions::default()
        },
        StepClock::new(),
    )
    .unwrap()
}

/// A document two other programs wrote: one made it (a nested map, a list, text), the other
/// edited a copy, and the first merged it back.
fn foreign_document() -> Vec<u8> {
    let mut doc = AutoCommit::new().with_actor(ActorId::from(&[0x51; 16][..]));
    doc.put(ROOT, "name", "Ada").unwrap();
    doc.put(ROOT, "age", 36).unwrap();
    let address = doc.put_object(ROOT, "address", ObjType::Map).unwrap();
    doc.put(&address, "city", "London").unwrap();
    let tags = doc.put_object(ROOT, "tags", ObjType::List).unwrap();
    doc.insert(&tags, 0, "math").unwrap();
    let note = doc.put_object(ROOT, "note", ObjType::Text).unwrap();
    doc.splice_text(&note, 0, 0, "engine").unwrap();
    doc.commit();
    let mut other = doc.fork().with_actor(ActorId::from(&[0x52; 16][..]));
    other.put(ROOT, "age", 37).unwrap();
    other.commit();
    doc.merge(&mut other).unwrap();
    doc.save()
}

/// The device's pending changes, uploaded as its session would, with the relay logging the
/// changes of actors that are neither A nor B (imported ones).
fn upload(relay: &RelayStore, store: &Store) -> Vec<ChangeOutcome> {
    let batch = store
        .next_upload_batch(BatchLimits::of(10_000, usize::MAX))
        .unwrap();
    let changes = common::uploads(&batch.entries);
    let imported = |actor: &str| actor != A && actor != B;
    let results = relay
        .append_importing(SPACE, store.device_id(), &changes, &imported)
        .unwrap();
    store
        .finish_upload(&results, &RetryPolicy::immediate(5))
        .unwrap();
    results.into_iter().map(|r| r.outcome).collect()
}

#[test]
fn an_imported_document_keeps_its_history_and_reaches_other_devices() {
    let relay = RelayStore::open(
        Arc::new(KvStorage::new(Arc::new(MemoryKv::new()))),
        RelayStoreOptions {
            policies: policies(),
            ..RelayStoreOptions::default()
        },
    );
    let (a, b) = (device(A), device(B));
    let (applied, changes) = a
        .import_document("Person", "ada", &foreign_document())
        .unwrap();
    assert_eq!(changes, 2);
    let expected = fields(json!({
        "name": "Ada", "age": 37, "address": {"city": "London"}, "tags": ["math"], "note": "engine"
    }));
    assert_eq!(
        a.get("Person", "ada").unwrap().fields.parse().unwrap(),
        expected
    );
    let writers: Vec<String> = a
        .history("Person", "ada")
        .unwrap()
        .into_iter()
        .map(|h| h.device)
        .collect();
    assert_eq!(writers, ["51".repeat(16), "52".repeat(16)]);
    assert_eq!(a.queue_counts().unwrap().pending, 2);

    // The relay logs other programs' changes from a device; never a device's own from another.
    let outcomes = upload(&relay, &a);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, ChangeOutcome::Stored { .. })),
        "{outcomes:?}"
    );
    let log = relay.read_since(SPACE, 0, 100, usize::MAX).unwrap();
    b.apply_remote(&log.entries, log.through).unwrap();
    assert_eq!(
        b.get("Person", "ada").unwrap().fields.parse().unwrap(),
        expected
    );
    assert_eq!(b.get("Person", "ada").unwrap().heads, applied.heads);

    // The record goes on like any other: B edits it, A meets the edit.
    b.write(ferry::store::Write::Patch {
        collection: "Person".into(),
        id: "ada".into(),
        set: fields(json!({"age": 38})),
        unset: Vec::new(),
    })
    .unwrap();
    upload(&relay, &b);
    let log = relay
        .read_since(SPACE, log.through, 100, usize::MAX)
        .unwrap();
    a.apply_remote(&log.entries, log.through).unwrap();
    assert_eq!(
        a.get("Person", "ada").unwrap().fields.parse().unwrap()["age"],
        json!(38)
    );

    // A device's changes passed off by another are still refused, imported or not.
    let forged = b.export_doc("Person", "ada").unwrap();
    let c = device("0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c");
    c.import_document("Person", "copy", &forged).unwrap();
    let outcomes = upload(&relay, &c);
    assert!(
        outcomes.iter().any(|o| matches!(
            o,
            ChangeOutcome::Rejected { message, .. } if message.contains("not under the uploading device's own")
        )),
        "B's change under C's upload: {outcomes:?}"
    );
}

#[test]
fn documents_that_are_not_json_records_or_would_overwrite_one_are_refused() {
    let a = device(A);
    let refused = |bytes: &[u8], collection: &str, id: &str| {
        a.import_document(collection, id, bytes).unwrap_err()
    };
    let mut counter = AutoCommit::new();
    counter
        .put(ROOT, "visits", ScalarValue::counter(1))
        .unwrap();
    match refused(&counter.save(), "Person", "c") {
        StoreError::Record(RecordError::NotJsonShaped(why)) => {
            assert!(why.contains("`visits` holds a counter"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let mut nested_bytes = AutoCommit::new();
    let list = nested_bytes
        .put_object(ROOT, "files", ObjType::List)
        .unwrap();
    nested_bytes.insert(&list, 0, vec![1u8, 2, 3]).unwrap();
    match refused(&nested_bytes.save(), "Person", "b") {
        StoreError::Record(RecordError::NotJsonShaped(why)) => {
            assert!(why.contains("`files[0]` holds bytes"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let mut plain_pin = AutoCommit::new();
    plain_pin.put(ROOT, "pin", "1234").unwrap();
    assert!(matches!(
        refused(&plain_pin.save(), "Secret", "s"),
        StoreError::ImportRefused(why) if why.contains("`pin` is encrypted")
    ));
    assert!(matches!(
        refused(b"not automerge", "Person", "x"),
        StoreError::Record(RecordError::Corrupt(_))
    ));
    assert!(matches!(
        refused(&AutoCommit::new().save(), "Person", "empty"),
        StoreError::Record(RecordError::NotJsonShaped(_))
    ));
    a.import_document("Person", "ada", &foreign_document())
        .unwrap();
    assert!(matches!(
        refused(&foreign_document(), "Person", "ada"),
        StoreError::Exists { .. }
    ));
    // Nothing refused left a trace.
    assert_eq!(a.queue_counts().unwrap().pending, 2);
    assert!(a.get("Person", "c").is_err());
}
