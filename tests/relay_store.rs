//! The relay's store over the embedded storage: appending (stored, duplicate, missing
//! dependencies, invalid), reading the log in pages without echoing a device's own changes,
//! surviving a reopen from disk with its documents compacted (existing data directories' key
//! layout included); and the relay's conflict counts: concurrent writes to one field count once,
//! to different fields not at all, the counts survive a reopen, and validating a change loads its
//! record's document only when the cache lost it; the bytes each space's log holds (its quota),
//! and the digests of records' logged heads a device compares with its own. The property that
//! any upload order yields a causally closed log runs against every storage engine, in
//! `relay_storage.rs`.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;
mod relay_fixtures;

use common::{fields, open_sled};
use ferry::record::Record;
use ferry::relay::storage::{KvStorage, StorageError};
use ferry::relay::store::{
    LogRetention, RelayConflictCount, RelayStore, RelayStoreError, RelayStoreOptions,
};
use ferry::resolve::{ConflictKind, ConflictStatus, Policies, Policy};
use ferry::store::kv::{Kv, MemoryKv};
use ferry_proto::wire::{ChangeOutcome, ErrorCode, UploadChange};
use relay_fixtures::{SPACE, Writer, actor, append_by_author, dev, outcomes, upload};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The relay store over the embedded storage on `kv`.
fn relay_on(kv: Arc<dyn Kv>, options: RelayStoreOptions) -> RelayStore {
    RelayStore::open(Arc::new(KvStorage::new(kv)), options)
}

fn memory_relay(options: RelayStoreOptions) -> RelayStore {
    relay_on(Arc::new(MemoryKv::new()), options)
}

fn code(outcome: &ChangeOutcome) -> Option<ErrorCode> {
    match outcome {
        ChangeOutcome::Rejected { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn appends_store_deduplicate_and_refuse_what_cannot_be_applied() {
    let relay = memory_relay(RelayStoreOptions::default());
    let mut a = Writer::new(1);
    let a1 = a.put(json!({"n": 1}));
    let a2 = a.patch(json!({"m": 2}));
    let a3 = a.patch(json!({"k": 3}));
    let r = relay
        .append(
            SPACE,
            &dev(1),
            &[upload(10, "a", &a1), upload(11, "a", &a2)],
        )
        .unwrap();
    assert_eq!(r[0].entry, 10);
    assert_eq!(
        outcomes(&r),
        [
            ChangeOutcome::Stored { seq: 1 },
            ChangeOutcome::Stored { seq: 2 }
        ]
    );
    let r = relay
        .append(
            SPACE,
            &dev(1),
            &[
                upload(11, "a", &a2),
                upload(12, "a", &a3),
                upload(12, "a", &a3),
            ],
        )
        .unwrap();
    assert_eq!(
        outcomes(&r),
        [
            ChangeOutcome::Duplicate { seq: 2 },
            ChangeOutcome::Stored { seq: 3 },
            ChangeOutcome::Duplicate { seq: 3 }
        ]
    );
    assert_eq!(relay.head(SPACE).unwrap(), 3);

    let mut b = Writer::new(2);
    let b1 = b.put(json!({"x": 1}));
    let b2 = b.patch(json!({"y": 2}));
    // A dependency later in the same call is not good enough: the log must stay in causal order.
    let r = relay
        .append(SPACE, &dev(2), &[upload(1, "b", &b2), upload(2, "b", &b1)])
        .unwrap();
    assert_eq!(code(&r[0].outcome), Some(ErrorCode::MissingDependencies));
    assert!(ErrorCode::MissingDependencies.is_retryable());
    assert_eq!(r[1].outcome, ChangeOutcome::Stored { seq: 4 });

    let mut truncated = b2.clone();
    truncated.pop();
    let bad_address = UploadChange {
        collection: "1-not-a-name".into(),
        ..upload(5, "b", &b2)
    };
    let r = relay
        .append(
            SPACE,
            &dev(2),
            &[
                upload(3, "b", &truncated),
                upload(4, "b", b"not automerge"),
                bad_address,
                // b2 names b1 as its dependency, which the log holds for record b, not c.
                upload(6, "c", &b2),
            ],
        )
        .unwrap();
    let codes: Vec<_> = outcomes(&r).iter().map(code).collect();
    assert_eq!(
        codes,
        vec![
            Some(ErrorCode::InvalidChange),
            Some(ErrorCode::InvalidChange),
            Some(ErrorCode::InvalidChange),
            Some(ErrorCode::MissingDependencies),
        ]
    );
    assert_eq!(relay.head(SPACE).unwrap(), 4, "nothing refused is logged");
    let r = relay
        .append(SPACE, &dev(2), &[upload(7, "b", &b2)])
        .unwrap();
    assert_eq!(r[0].outcome, ChangeOutcome::Stored { seq: 5 });

    assert_eq!(
        relay.record(SPACE, "Doc", "a").unwrap(),
        Some(a.record.fields())
    );
    assert_eq!(
        relay.heads(SPACE, "Doc", "b").unwrap().unwrap(),
        b.record
            .heads()
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
    );
    assert_eq!(relay.record(SPACE, "Doc", "zzz").unwrap(), None);
    assert_eq!(relay.collections(SPACE).unwrap(), [("Doc".to_owned(), 2)]);
    assert_eq!(relay.records(SPACE, "Doc", Some("a"), 10).unwrap(), ["b"]);
    assert_eq!(relay.head("other-space").unwrap(), 0, "spaces are apart");
    assert!(matches!(
        relay.append("bad\0space", &dev(1), &[]),
        Err(RelayStoreError::InvalidSpace(_))
    ));
}

#[test]
fn reads_page_through_the_log_and_leave_out_the_readers_own_changes() {
    let relay = memory_relay(RelayStoreOptions::default());
    let mut one = Writer::new(1);
    let mut two = Writer::new(2);
    let append = |origin: &str, record: &str, change: Vec<u8>| {
        let r = relay
            .append(SPACE, origin, &[upload(0, record, &change)])
            .unwrap();
        assert!(matches!(r[0].outcome, ChangeOutcome::Stored { .. }));
    };
    // seq 1-3 by dev1, 4-5 by dev2, 6-15 by dev1.
    append(&dev(1), "one", one.put(json!({"n": 0})));
    for n in 1..3 {
        append(&dev(1), "one", one.patch(json!({"n": n})));
    }
    append(&dev(2), "two", two.put(json!({"n": 0})));
    append(&dev(2), "two", two.patch(json!({"n": 1})));
    for n in 3..13 {
        append(&dev(1), "one", one.patch(json!({"n": n})));
    }
    let seqs = |s: &ferry::relay::store::LogSlice| -> Vec<u64> {
        s.entries.iter().map(|e| e.seq).collect()
    };
    let page = relay.read_since(SPACE, 0, 2, usize::MAX).unwrap();
    assert_eq!((seqs(&page), page.through, page.head), (vec![1, 2], 2, 15));
    assert_eq!(page.entries[0].change, one.changes[0]);
    assert_eq!(page.entries[0].record, "one");

    let page = relay.read_since(SPACE, 2, 3, usize::MAX).unwrap();
    assert_eq!((seqs(&page), page.through), (vec![3, 4, 5], 5));
    assert_eq!(
        page.entries[1].record, "two",
        "every device's changes are read"
    );

    // A byte limit smaller than one change still gives one.
    let page = relay.read_since(SPACE, 0, 10, 1).unwrap();
    assert_eq!((seqs(&page), page.through), (vec![1], 1));
    let page = relay.read_since(SPACE, 15, 10, usize::MAX).unwrap();
    assert_eq!((seqs(&page), page.through, page.head), (vec![], 15, 15));
    // A cursor past the log leaves the head where the log ends.
    let page = relay.read_since(SPACE, 20, 10, usize::MAX).unwrap();
    assert_eq!((seqs(&page), page.through, page.head), (vec![], 20, 15));
}

#[test]
fn a_reopened_relay_keeps_its_log_and_documents() {
    let dir = tempfile::tempdir().unwrap();
    let options = RelayStoreOptions {
        compact_after: 4,
        doc_cache_docs: 1,
        ..RelayStoreOptions::default()
    };
    let mut w = Writer::new(1);
    let mut other = Writer::new(2);
    let first = w.put(json!({"n": 0}));
    {
        let relay = relay_on(Arc::new(open_sled(dir.path())), options.clone());
        relay
            .append(SPACE, &dev(1), &[upload(1, "r", &first)])
            .unwrap();
        // Single appends and one batch that crosses the compaction threshold by itself.
        for n in 1..6 {
            let c = w.patch(json!({"n": n}));
            relay.append(SPACE, &dev(1), &[upload(1, "r", &c)]).unwrap();
            assert_eq!(
                relay.record(SPACE, "Doc", "r").unwrap(),
                Some(w.record.fields())
            );
        }
        let batch: Vec<UploadChange> = (6..16)
            .map(|n| upload(n, "r", &w.patch(json!({"n": n}))))
            .collect();
        relay.append(SPACE, &dev(1), &batch).unwrap();
        // A new record whose first batch alone crosses the threshold.
        let mut created = vec![upload(1, "s", &other.put(json!({"s": 0})))];
        created.extend((1..6).map(|n| upload(n, "s", &other.patch(json!({"s": n})))));
        relay.append(SPACE, &dev(2), &created).unwrap();
    }
    let kv = Arc::new(open_sled(dir.path()));
    let relay = relay_on(kv.clone(), options);
    assert_eq!(relay.head(SPACE).unwrap(), 22);
    let all = relay.read_since(SPACE, 0, 100, usize::MAX).unwrap();
    let logged: Vec<Vec<u8>> = all.entries.iter().map(|e| e.change.clone()).collect();
    let mut expected = w.changes.clone();
    expected.extend(other.changes.iter().cloned());
    assert_eq!(logged, expected);
    assert_eq!(
        relay.record(SPACE, "Doc", "r").unwrap(),
        Some(w.record.fields())
    );
    let saved = relay.document_bytes(SPACE, "Doc", "r").unwrap().unwrap();
    assert_eq!(
        Record::load(&saved, &actor(9)).unwrap().heads(),
        w.record.heads()
    );
    // Compaction keeps the tail of changes after the last saved base short.
    for (id, writer) in [("r", &w), ("s", &other)] {
        assert_eq!(
            relay.record(SPACE, "Doc", id).unwrap(),
            Some(writer.record.fields())
        );
        let tail_prefix = format!("t{SPACE}\0Doc\0{id}\0").into_bytes();
        let mut tail_end = tail_prefix.clone();
        tail_end.push(0xff);
        assert!(kv.count(&tail_prefix, &tail_end).unwrap() < 4, "{id}");
    }
    // Deduplication and numbering carry on where they were.
    let r = relay
        .append(
            SPACE,
            &dev(1),
            &[
                upload(1, "r", &first),
                upload(2, "r", &w.patch(json!({"n": 99}))),
            ],
        )
        .unwrap();
    assert_eq!(
        outcomes(&r),
        [
            ChangeOutcome::Duplicate { seq: 1 },
            ChangeOutcome::Stored { seq: 23 }
        ]
    );
}

#[test]
fn a_failed_flush_is_not_acknowledged_and_its_seqs_are_not_reused() {
    let kv = common::FaultyKv::new(usize::MAX);
    let relay = relay_on(Arc::new(kv.clone()), RelayStoreOptions::default());
    let mut w = Writer::new(1);
    let first = w.put(json!({"n": 1}));
    let second = w.patch(json!({"n": 2}));
    kv.disk
        .flush_fails
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        relay.append(SPACE, &dev(1), &[upload(1, "r", &first)]),
        Err(RelayStoreError::Storage(StorageError::Engine(_)))
    ));
    kv.disk
        .flush_fails
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let r = relay
        .append(
            SPACE,
            &dev(1),
            &[upload(1, "r", &first), upload(2, "r", &second)],
        )
        .unwrap();
    assert_eq!(
        outcomes(&r),
        [
            ChangeOutcome::Duplicate { seq: 1 },
            ChangeOutcome::Stored { seq: 2 }
        ],
        "the retried change is found, and numbering goes on after it"
    );
}

/// One device creating two records with the same fields in the same millisecond writes
/// byte-identical first changes: each record must still get its own, and its later changes too.
#[test]
fn identical_changes_of_two_records_are_both_stored() {
    let relay = memory_relay(RelayStoreOptions::default());
    let (mut a, mut b) = (Writer::new(1), Writer::new(1));
    let first_a = a.put(json!({"name": "same"}));
    let first_b = b.put(json!({"name": "same"}));
    assert_eq!(first_a, first_b, "the two creations are the same bytes");
    let r = relay
        .append(
            SPACE,
            &dev(1),
            &[upload(1, "a", &first_a), upload(2, "b", &first_b)],
        )
        .unwrap();
    assert_eq!(
        outcomes(&r),
        vec![
            ChangeOutcome::Stored { seq: 1 },
            ChangeOutcome::Stored { seq: 2 }
        ]
    );
    let later_b = b.patch(json!({"city": "Oslo"}));
    let r = relay
        .append(SPACE, &dev(1), &[upload(3, "b", &later_b)])
        .unwrap();
    assert_eq!(outcomes(&r), vec![ChangeOutcome::Stored { seq: 3 }]);
    let r = relay
        .append(SPACE, &dev(1), &[upload(4, "a", &first_a)])
        .unwrap();
    assert_eq!(outcomes(&r), vec![ChangeOutcome::Duplicate { seq: 1 }]);
    assert_eq!(
        relay.heads(SPACE, "Doc", "b").unwrap(),
        Some(b.record.heads().iter().map(|h| h.to_string()).collect())
    );
}

/// Two devices holding the same record, created by the first.
fn two_writers() -> (Writer, Writer, Vec<u8>) {
    let mut a = Writer::new(1);
    let mut b = Writer::new(2);
    let created = a.put(json!({"title": "draft", "n": 0}));
    b.record
        .apply_changes(std::slice::from_ref(&created))
        .unwrap();
    (a, b, created)
}

#[test]
fn concurrent_writes_to_one_field_count_as_one_update_update_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b, created) = two_writers();
    let a1 = a.patch(json!({"title": "from a"}));
    let b1 = b.patch(json!({"title": "from b"}));
    {
        let relay = relay_on(
            Arc::new(open_sled(dir.path())),
            RelayStoreOptions::default(),
        );
        relay
            .append(
                SPACE,
                &dev(1),
                &[upload(1, "r", &created), upload(2, "r", &a1)],
            )
            .unwrap();
        assert_eq!(relay.conflict_counts(SPACE).unwrap(), []);
        let r = relay
            .append(SPACE, &dev(2), &[upload(1, "r", &b1)])
            .unwrap();
        assert_eq!(outcomes(&r), [ChangeOutcome::Stored { seq: 3 }]);
        // Sent again, the change is a duplicate and is not counted twice.
        relay
            .append(SPACE, &dev(2), &[upload(1, "r", &b1)])
            .unwrap();
        assert_eq!(
            relay.conflict_counts(SPACE).unwrap(),
            [RelayConflictCount {
                kind: ConflictKind::UpdateUpdate,
                collection: "Doc".into(),
                detected: 1,
            }]
        );
        assert_eq!(relay.conflict_counts("other").unwrap(), []);
    }
    // Counted in the append's batch: a reopened relay has the count, and a later conflict on
    // the same record (b writes the field again, still without a's change) adds to it.
    let relay = relay_on(
        Arc::new(open_sled(dir.path())),
        RelayStoreOptions::default(),
    );
    let b2 = b.patch(json!({"title": "from b again"}));
    relay
        .append(SPACE, &dev(2), &[upload(1, "r", &b2)])
        .unwrap();
    let counts = relay.conflict_counts(SPACE).unwrap();
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(counts[0].detected, 2, "{counts:?}");
}

#[test]
fn concurrent_writes_to_different_fields_are_no_conflict() {
    let relay = memory_relay(RelayStoreOptions::default());
    let (mut a, mut b, created) = two_writers();
    let a1 = a.patch(json!({"title": "from a"}));
    let b1 = b.patch(json!({"n": 7}));
    relay
        .append(
            SPACE,
            &dev(1),
            &[upload(1, "r", &created), upload(2, "r", &a1)],
        )
        .unwrap();
    relay
        .append(SPACE, &dev(2), &[upload(1, "r", &b1)])
        .unwrap();
    assert_eq!(relay.conflict_counts(SPACE).unwrap(), []);
    // The relay's document holds both writes all the same.
    assert_eq!(
        relay.record(SPACE, "Doc", "r").unwrap(),
        Some(fields(json!({"title": "from a", "n": 7})))
    );
}

#[test]
fn validating_a_change_loads_its_document_only_when_the_cache_lost_it() {
    // One document cached: records r and s evict each other.
    let relay = memory_relay(RelayStoreOptions {
        doc_cache_docs: 1,
        ..RelayStoreOptions::default()
    });
    let (mut a, mut b, created) = two_writers();
    let mut a_changes = vec![upload(1, "r", &created)];
    a_changes.extend((1..4).map(|n| upload(n + 1, "r", &a.patch(json!({"n": n})))));
    // A first change is checked on a document made for it and not kept; the change after it in
    // the same upload reads the record from its base, once.
    relay.append(SPACE, &dev(1), &a_changes[..2]).unwrap();
    assert_eq!(relay.documents_loaded(), 1);
    relay.append(SPACE, &dev(1), &a_changes[2..]).unwrap();
    // b catches up, then writes after everything logged: a fast-forward.
    b.record.apply_changes(&a.changes).unwrap();
    let b1 = b.patch(json!({"n": 10}));
    relay
        .append(SPACE, &dev(2), &[upload(1, "r", &b1)])
        .unwrap();
    // A change that did not see b's is concurrent with it, and counted.
    let a4 = a.patch(json!({"n": 11}));
    relay
        .append(SPACE, &dev(1), &[upload(1, "r", &a4)])
        .unwrap();
    assert_eq!(
        relay.documents_loaded(),
        1,
        "r was validated on its cached document"
    );
    assert_eq!(relay.conflict_counts(SPACE).unwrap().len(), 1);
    // Another record, changed twice, takes r's place in the cache.
    let mut other = Writer::new(3);
    let s_changes = [other.put(json!({"s": 1})), other.patch(json!({"s": 2}))];
    relay
        .append(
            SPACE,
            &dev(3),
            &[upload(1, "s", &s_changes[0]), upload(2, "s", &s_changes[1])],
        )
        .unwrap();
    assert_eq!(relay.documents_loaded(), 2);
    // r's next change loads its document again; the changes after it find it cached.
    b.record.apply_changes(std::slice::from_ref(&a4)).unwrap();
    let b2 = b.patch(json!({"title": "final"}));
    relay
        .append(SPACE, &dev(2), &[upload(1, "r", &b2)])
        .unwrap();
    assert_eq!(relay.documents_loaded(), 3);
    let a5 = a.patch(json!({"n": 12}));
    let a6 = a.patch(json!({"n": 13}));
    relay
        .append(SPACE, &dev(1), &[upload(1, "r", &a5), upload(2, "r", &a6)])
        .unwrap();
    assert_eq!(relay.documents_loaded(), 3);
    assert_eq!(
        relay.record(SPACE, "Doc", "r").unwrap(),
        Some(fields(json!({"title": "final", "n": 13})))
    );
}

#[test]
fn records_of_a_unique_collection_that_take_a_held_value_are_counted() {
    let relay = memory_relay(RelayStoreOptions {
        policies: unique_email(),
        ..RelayStoreOptions::default()
    });
    let mut a = Writer::new(1);
    let mut b = Writer::new(2);
    let mut c = Writer::new(3);
    let first = a.put(json!({"email": "x@y", "n": 1}));
    let clash = b.put(json!({"email": "x@y", "n": 2}));
    let clash_hash = ferry::record::chunk_hash(&clash).unwrap();
    let other = c.put(json!({"email": "z@y"}));
    append_by_author(&relay, &[upload(1, "a", &first), upload(2, "c", &other)]);
    assert_eq!(relay.conflict_counts(SPACE).unwrap(), []);
    relay
        .append(SPACE, &dev(2), &[upload(1, "b", &clash)])
        .unwrap();
    let unique = |detected| {
        vec![RelayConflictCount {
            kind: ConflictKind::Unique,
            collection: "Doc".into(),
            detected,
        }]
    };
    assert_eq!(relay.conflict_counts(SPACE).unwrap(), unique(1));
    // The clash is kept as devices keep it: open, flagging the record that took the value second.
    let open = relay
        .conflicts(SPACE, Some(ConflictStatus::Open), None, 10)
        .unwrap();
    assert_eq!(open.len(), 1);
    let first_clash = open[0].clone();
    assert_eq!(first_clash.kind, ConflictKind::Unique);
    assert_eq!(
        (
            first_clash.server.record.as_str(),
            first_clash.record.as_str()
        ),
        ("a", "b")
    );
    assert_eq!(
        relay
            .change_conflict(SPACE, &clash_hash)
            .unwrap()
            .as_deref(),
        Some(first_clash.id.as_str())
    );
    // b moves away and back: a second clash. A change that keeps the value counts nothing.
    let away = b.patch(json!({"email": "w@y"}));
    let back = b.patch(json!({"email": "x@y"}));
    let same = b.patch(json!({"n": 3}));
    relay
        .append(
            SPACE,
            &dev(2),
            &[
                upload(2, "b", &away),
                upload(3, "b", &back),
                upload(4, "b", &same),
            ],
        )
        .unwrap();
    assert_eq!(relay.conflict_counts(SPACE).unwrap(), unique(2));
    // Moving away ended the first clash; coming back opened another.
    let resolved = relay.conflict(SPACE, &first_clash.id).unwrap().unwrap();
    assert_eq!(resolved.status, ConflictStatus::Resolved);
    let open = relay
        .conflicts(SPACE, Some(ConflictStatus::Open), None, 10)
        .unwrap();
    assert_eq!(open.len(), 1);
    assert_ne!(open[0].id, first_clash.id);
    // Another collection's equal values are not checked.
    let mut d = Writer::new(4);
    let elsewhere = d.put(json!({"email": "x@y"}));
    relay
        .append(
            SPACE,
            &dev(4),
            &[UploadChange {
                collection: "Note".into(),
                ..upload(1, "d", &elsewhere)
            }],
        )
        .unwrap();
    assert_eq!(relay.conflict_counts(SPACE).unwrap(), unique(2));
}

/// Unique constraints on `Doc.email`.
fn unique_email() -> Policies {
    Policies {
        collections: BTreeMap::from([(
            "Doc".to_owned(),
            Policy {
                unique: vec![vec!["email".to_owned()]],
                ..Policy::default()
            },
        )]),
        ..Policies::default()
    }
}

#[test]
fn a_unique_clash_shows_the_record_that_held_the_value_as_logged_not_as_first_stored() {
    // One cached document: the record holding the value is read back from storage, base and
    // tail, when the clash is found.
    let relay = memory_relay(RelayStoreOptions {
        doc_cache_docs: 1,
        compact_after: 100,
        policies: unique_email(),
        ..RelayStoreOptions::default()
    });
    let mut a = Writer::new(1);
    let mut b = Writer::new(2);
    let mut c = Writer::new(3);
    let created = a.put(json!({"email": "x@y", "n": 1}));
    let edited = a.patch(json!({"n": 2}));
    append_by_author(&relay, &[upload(1, "a", &created), upload(2, "a", &edited)]);
    let other = c.put(json!({"email": "z@y"}));
    append_by_author(&relay, &[upload(1, "c", &other)]);
    let clash = b.put(json!({"email": "x@y"}));
    append_by_author(&relay, &[upload(1, "b", &clash)]);
    let open = relay
        .conflicts(SPACE, Some(ConflictStatus::Open), None, 10)
        .unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].server.record, "a");
    assert_eq!(
        open[0].server.fields,
        fields(json!({"email": "x@y", "n": 2}))
    );
}

#[test]
fn a_log_kept_before_conflict_entries_is_rebuilt_into_the_entries_appends_keep() {
    let kv = Arc::new(MemoryKv::new());
    let options = || RelayStoreOptions {
        doc_cache_docs: 2,
        policies: Policies {
            collections: BTreeMap::from([(
                "Doc".to_owned(),
                Policy {
                    unique: vec![vec!["email".to_owned()]],
                    ..Policy::of(ferry::resolve::Strategy::Manual)
                },
            )]),
            ..Policies::default()
        },
        ..RelayStoreOptions::default()
    };
    let relay = relay_on(kv.clone(), options());
    // Two devices edit one record apart (a same-field conflict), and two records clash on a
    // unique value.
    let mut a = Writer::new(1);
    let mut b = Writer::new(2);
    let created = a.put(json!({"title": "draft", "email": "a@x"}));
    b.record
        .apply_changes(std::slice::from_ref(&created))
        .unwrap();
    let mine = a.patch(json!({"title": "mine"}));
    let theirs = b.patch(json!({"title": "theirs"}));
    let mut c = Writer::new(3);
    let clash = c.put(json!({"email": "a@x"}));
    append_by_author(
        &relay,
        &[
            upload(1, "r", &created),
            upload(2, "r", &mine),
            upload(1, "r", &theirs),
            upload(1, "c", &clash),
        ],
    );
    let kept = relay.conflicts(SPACE, None, None, 100).unwrap();
    assert_eq!(kept.len(), 2, "{kept:#?}");
    assert!(relay.conflicts_complete(SPACE).unwrap());
    drop(relay);
    // The same log as a relay that kept no conflict entries left it.
    let mut forget = ferry::store::kv::Batch::default();
    for prefix in [b'x', b'o', b'k', b'g', b'i', b'y', b'u', b'v'] {
        for (key, _) in kv.range(&[prefix], &[prefix + 1], usize::MAX).unwrap() {
            forget.remove(key);
        }
    }
    kv.apply(forget).unwrap();
    let relay = relay_on(kv.clone(), options());
    assert!(!relay.conflicts_complete(SPACE).unwrap());
    assert_eq!(relay.conflicts(SPACE, None, None, 100).unwrap(), []);
    assert_eq!(relay.rebuild_conflicts(SPACE, || false).unwrap(), Some(2));
    assert!(relay.conflicts_complete(SPACE).unwrap());
    assert_eq!(relay.conflicts(SPACE, None, None, 100).unwrap(), kept);
    let counts = relay.conflict_counts(SPACE).unwrap();
    // The clash ends when c gives the value up, as it would have without the rebuild.
    let away = c.patch(json!({"email": "c@x"}));
    append_by_author(&relay, &[upload(2, "c", &away)]);
    let clash_id = kept
        .iter()
        .find(|c| c.kind == ConflictKind::Unique)
        .unwrap()
        .id
        .clone();
    assert_eq!(
        relay.conflict(SPACE, &clash_id).unwrap().unwrap().status,
        ConflictStatus::Resolved
    );
    // The counts were kept all along: the rebuild does not count the conflicts again.
    assert_eq!(relay.conflict_counts(SPACE).unwrap(), counts);
    // A rebuild told to stop writes nothing.
    assert_eq!(relay.rebuild_conflicts(SPACE, || true).unwrap(), None);
}

#[test]
fn log_bytes_grow_with_each_stored_change_and_a_log_without_the_count_is_measured() {
    let kv = Arc::new(MemoryKv::new());
    let relay = relay_on(kv.clone(), RelayStoreOptions::default());
    assert_eq!(relay.log_bytes(SPACE).unwrap(), 0);
    let mut w = Writer::new(1);
    let first = w.put(json!({"title": "a"}));
    relay
        .append(SPACE, &dev(1), &[upload(1, "r1", &first)])
        .unwrap();
    let one = relay.log_bytes(SPACE).unwrap();
    assert!(one > first.len() as u64, "{one}");
    // A duplicate stores nothing, so it counts nothing.
    relay
        .append(SPACE, &dev(1), &[upload(2, "r1", &first)])
        .unwrap();
    assert_eq!(relay.log_bytes(SPACE).unwrap(), one);
    let second = w.patch(json!({"title": "b"}));
    relay
        .append(SPACE, &dev(1), &[upload(3, "r1", &second)])
        .unwrap();
    let two = relay.log_bytes(SPACE).unwrap();
    assert!(two > one + second.len() as u64 - 1, "{one} then {two}");
    assert_eq!(relay.log_bytes("another").unwrap(), 0);

    // A log kept before the count existed is measured by reading it, to the same total.
    let mut batch = ferry::store::kv::Batch::default();
    batch.remove(format!("s{SPACE}\0").into_bytes());
    kv.apply(batch).unwrap();
    let reopened = relay_on(kv, RelayStoreOptions::default());
    assert_eq!(reopened.log_bytes(SPACE).unwrap(), two);
}

#[test]
fn snapshot_pages_hold_each_records_document_and_conflicts_once_the_entries_are_indexed() {
    let kv = Arc::new(MemoryKv::new());
    let relay = relay_on(kv.clone(), RelayStoreOptions::default());
    let mut a = Writer::new(1);
    let mut b = Writer::new(2);
    let created = a.put(json!({"title": "draft"}));
    b.record
        .apply_changes(std::slice::from_ref(&created))
        .unwrap();
    let mine = a.patch(json!({"title": "mine"}));
    let theirs = b.patch(json!({"title": "theirs"}));
    let other = Writer::new(3).put(json!({"title": "other"}));
    append_by_author(
        &relay,
        &[
            upload(1, "r", &created),
            upload(2, "r", &mine),
            upload(1, "r", &theirs),
            upload(1, "c", &other),
        ],
    );
    let kept = relay.conflicts(SPACE, None, None, 100).unwrap();
    assert_eq!(kept.len(), 1, "{kept:#?}");
    let page = |relay: &RelayStore, after: Option<&str>| {
        let after = after.map(|record| ferry_proto::wire::RecordName {
            collection: "Doc".into(),
            record: record.into(),
        });
        relay
            .snapshot_page(SPACE, after.as_ref(), 1, usize::MAX, None)
            .unwrap()
    };
    // In key order, one record a page, each page as of the head.
    let first = page(&relay, None);
    assert_eq!((first.head, first.complete), (4, false));
    assert_eq!(first.records.len(), 1);
    assert_eq!(first.records[0].record, "c");
    assert_eq!(first.records[0].conflicts, b"[]");
    let second = page(&relay, Some("c"));
    assert_eq!((second.head, second.complete), (4, true));
    let r = &second.records[0];
    assert_eq!(r.record, "r");
    let mut doc = Record::load(&r.document, &actor(9)).unwrap();
    let heads: Vec<String> = doc.heads().iter().map(|h| h.to_string()).collect();
    assert_eq!(Some(heads), relay.heads(SPACE, "Doc", "r").unwrap());
    let sent: Vec<ferry::resolve::Conflict> = serde_json::from_slice(&r.conflicts).unwrap();
    assert_eq!(sent, kept);
    assert!(page(&relay, Some("r")).records.is_empty());
    drop(relay);
    // Entries kept without their index by record (an earlier relay): no snapshot, so that no
    // device takes one without its conflicts, until the space is rebuilt.
    let mut forget = ferry::store::kv::Batch::default();
    for prefix in [b'i', b'y'] {
        for (key, _) in kv.range(&[prefix], &[prefix + 1], usize::MAX).unwrap() {
            forget.remove(key);
        }
    }
    kv.apply(forget).unwrap();
    let relay = relay_on(kv, RelayStoreOptions::default());
    assert!(!relay.conflicts_complete(SPACE).unwrap());
    let refused = page(&relay, None);
    assert_eq!(
        (refused.head, refused.complete, refused.records.len()),
        (0, true, 0)
    );
    assert_eq!(relay.rebuild_conflicts(SPACE, || false).unwrap(), Some(1));
    assert_eq!(page(&relay, Some("c")).records[0].conflicts, r.conflicts);
}

#[test]
fn heads_digests_page_through_the_space_in_record_order() {
    use ferry_proto::wire::{HeadsHasher, RecordName};
    let relay = memory_relay(RelayStoreOptions::default());
    let mut writers: Vec<(String, Writer)> = Vec::new();
    for (n, id) in ["c", "a", "b"].into_iter().enumerate() {
        let mut w = Writer::new(n as u8 + 1);
        let change = w.put(json!({ "n": n }));
        append_by_author(&relay, &[upload(n as u64, id, &change)]);
        writers.push((id.to_string(), w));
    }
    // One record gets a second change, so its heads are kept under their own key.
    let (_, b) = writers.iter_mut().find(|(id, _)| id == "b").unwrap();
    let later = b.patch(json!({ "n": 9 }));
    append_by_author(&relay, &[upload(9, "b", &later)]);

    let mut expected = HeadsHasher::default();
    for id in ["a", "b", "c"] {
        let (_, w) = writers.iter_mut().find(|(i, _)| i == id).unwrap();
        let mut heads: Vec<[u8; 32]> = w.record.heads().iter().map(|h| h.0).collect();
        expected.record("Doc", id, &mut heads);
    }
    let (_, expected) = expected.finish();

    let whole = relay.heads_digest(SPACE, None, 10, None).unwrap();
    assert_eq!(
        (whole.head, whole.records, whole.complete, whole.digest),
        (4, 3, true, expected)
    );
    let first = relay.heads_digest(SPACE, None, 2, None).unwrap();
    let name = |id: &str| RecordName {
        collection: "Doc".into(),
        record: id.into(),
    };
    assert_eq!((first.records, first.complete), (2, false));
    assert_eq!(first.last, Some(name("b")));
    let rest = relay
        .heads_digest(SPACE, first.last.as_ref(), 2, None)
        .unwrap();
    assert_eq!((rest.records, rest.complete), (1, true));
    assert_eq!(rest.last, Some(name("c")));
    assert_ne!(first.digest, whole.digest);
    let past_the_end = relay
        .heads_digest(SPACE, rest.last.as_ref(), 2, None)
        .unwrap();
    assert_eq!((past_the_end.records, past_the_end.complete), (0, true));
}

/// The message of a refusal for what the change is (not retryable), or why it was not one.
fn refusal(outcome: &ChangeOutcome) -> String {
    match outcome {
        ChangeOutcome::Rejected {
            code: ErrorCode::InvalidChange,
            message,
        } => message.clone(),
        other => panic!("expected a validation refusal, got {other:?}"),
    }
}

#[test]
fn a_change_is_logged_only_under_its_uploaders_actor_in_sequence_and_if_it_applies() {
    use ferry::fuzzing::{Forgery, forge};
    use ferry::record::decode_change;
    let relay = memory_relay(RelayStoreOptions::default());
    let (mut a, mut b, created) = two_writers();
    relay
        .append(SPACE, &dev(1), &[upload(1, "r", &created)])
        .unwrap();
    let b1 = b.patch(json!({"title": "from b"}));
    let parsed = |bytes: &[u8]| decode_change(bytes).unwrap();

    // b's change uploaded by device 1, and device 1's change under b's actor: not device 1's.
    let r = relay
        .append(SPACE, &dev(1), &[upload(1, "r", &b1)])
        .unwrap();
    assert!(refusal(&r[0].outcome).contains("not under the uploading device's own"));
    let a1 = a.patch(json!({"n": 1}));
    let as_b = forge(&parsed(&a1), Forgery::Actor(actor(2))).unwrap();
    let r = relay
        .append(SPACE, &dev(1), &[upload(1, "r", &as_b)])
        .unwrap();
    assert!(refusal(&r[0].outcome).contains("not under the uploading device's own"));

    // A sequence number used already, or far ahead.
    let reused = forge(&parsed(&a1), Forgery::Seq(1)).unwrap();
    let jump = forge(&parsed(&a1), Forgery::Seq(1_000_000)).unwrap();
    let r = relay
        .append(
            SPACE,
            &dev(1),
            &[upload(1, "r", &reused), upload(2, "r", &jump)],
        )
        .unwrap();
    assert!(refusal(&r[0].outcome).contains("already used"));
    assert!(refusal(&r[1].outcome).contains("must follow the one before"));
    // A new record whose first change is refused does not come to exist.
    let lone = parsed(&Writer::new(1).put(json!({"n": 1})));
    let second = forge(&lone, Forgery::Seq(2)).unwrap();
    let missing = forge(&lone, Forgery::MissingObject).unwrap();
    let r = relay
        .append(
            SPACE,
            &dev(1),
            &[upload(1, "n", &second), upload(2, "n", &missing)],
        )
        .unwrap();
    assert!(refusal(&r[0].outcome).contains("must follow the one before"));
    assert!(refusal(&r[1].outcome).contains("cannot be applied"));
    assert_eq!(relay.heads(SPACE, "Doc", "n").unwrap(), None);

    // A change Automerge panics on, a change built on it, and good changes around them in one
    // upload: the good ones are logged, the others refused with the reason.
    let broken = forge(&parsed(&a1), Forgery::MissingObject).unwrap();
    let mut on_broken = Writer::new(1);
    on_broken
        .record
        .apply_changes(std::slice::from_ref(&created))
        .unwrap();
    let built_on = forge(
        &parsed(&on_broken.patch(json!({"x": 1}))),
        Forgery::Deps(vec![parsed(&broken).hash()]),
    )
    .unwrap();
    let mut s = Writer::new(1);
    let s1 = s.put(json!({"s": 1}));
    let r = relay
        .append(
            SPACE,
            &dev(1),
            &[
                upload(1, "s", &s1),
                upload(2, "r", &broken),
                upload(3, "r", &built_on),
                upload(4, "r", &a1),
            ],
        )
        .unwrap();
    assert_eq!(r[0].outcome, ChangeOutcome::Stored { seq: 2 });
    assert!(refusal(&r[1].outcome).contains("cannot be applied"));
    assert!(refusal(&r[2].outcome).contains("refused in this upload"));
    assert_eq!(r[3].outcome, ChangeOutcome::Stored { seq: 3 });

    // Nothing of the refused changes is in the log, and the record goes on taking changes.
    let r = relay
        .append(SPACE, &dev(2), &[upload(1, "r", &b1)])
        .unwrap();
    assert_eq!(r[0].outcome, ChangeOutcome::Stored { seq: 4 });
    let logged: Vec<Vec<u8>> = relay
        .read_since(SPACE, 0, 100, usize::MAX)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.change)
        .collect();
    a.record.apply_changes(std::slice::from_ref(&b1)).unwrap();
    assert_eq!(logged, [created, s1, a1, b1]);
    assert_eq!(
        relay.record(SPACE, "Doc", "r").unwrap(),
        Some(a.record.fields())
    );
}

#[test]
fn a_change_that_leaves_a_document_that_cannot_be_loaded_is_refused() {
    use ferry::fuzzing::{Forgery, forge};
    use ferry::record::decode_change;
    let [created, first, second] = common::seed_14_changes();
    let parsed = |bytes: &[u8]| decode_change(bytes).unwrap();
    let bent = |bytes: &[u8], forgeries: Vec<Forgery>| {
        forgeries
            .into_iter()
            .fold(bytes.to_vec(), |bytes, forgery| {
                forge(&parsed(&bytes), forgery).unwrap()
            })
    };

    // Automerge as the product ships it applies the hostile pair, and the document it then
    // saves does not load.
    let mut record = Record::new(&actor(9));
    record
        .apply_changes(&[created.clone(), first.clone(), second.clone()])
        .expect("release Automerge takes the pair");
    assert!(Record::load(&record.save(), &actor(9)).is_err());

    let relay = memory_relay(RelayStoreOptions::default());
    let by = |bytes: &[u8]| parsed(bytes).actor_id().to_hex_string();
    let hostile = by(&first);
    let r = relay
        .append(SPACE, &by(&created), &[upload(1, "r", &created)])
        .unwrap();
    assert_eq!(r[0].outcome, ChangeOutcome::Stored { seq: 1 });
    // The second is the hostile actor's own, next in its sequence, its dependencies logged
    // (none), and it applies: only the document it leaves gives it away.
    let r = relay
        .append(
            SPACE,
            &hostile,
            &[upload(1, "r", &first), upload(2, "r", &second)],
        )
        .unwrap();
    assert_eq!(r[0].outcome, ChangeOutcome::Stored { seq: 2 });
    assert!(
        refusal(&r[1].outcome).contains("cannot load again"),
        "{:?}",
        r[1].outcome
    );

    // The same shapes told apart: numbered after the first yet not built on it; another
    // actor's first change built on the record's first yet numbered within it.
    let unbuilt = bent(&second, vec![Forgery::StartOp(4)]);
    let renumbering = bent(
        &first,
        vec![
            Forgery::Actor(actor(3)),
            Forgery::Deps(vec![parsed(&created).hash()]),
        ],
    );
    let r = relay
        .append(SPACE, &hostile, &[upload(1, "r", &unbuilt)])
        .unwrap();
    assert!(refusal(&r[0].outcome).contains("cannot load again"));
    let r = relay
        .append(SPACE, &dev(3), &[upload(1, "r", &renumbering)])
        .unwrap();
    assert!(refusal(&r[0].outcome).contains("cannot load again"));

    // Built on its first and numbered after it, the hostile actor's second change is logged,
    // and the log makes a document that loads.
    let built = bent(
        &second,
        vec![
            Forgery::StartOp(4),
            Forgery::Deps(vec![parsed(&first).hash()]),
        ],
    );
    let r = relay
        .append(SPACE, &hostile, &[upload(1, "r", &built)])
        .unwrap();
    assert_eq!(r[0].outcome, ChangeOutcome::Stored { seq: 3 });
    let logged: Vec<Vec<u8>> = relay
        .read_since(SPACE, 0, 100, usize::MAX)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.change)
        .collect();
    assert_eq!(logged, [created, first, built]);
    let mut record = Record::new(&actor(9));
    record.apply_changes(&logged).unwrap();
    let loaded = Record::load(&record.save(), &actor(9)).expect("the log's document loads");
    assert_eq!(
        Some(loaded.fields()),
        relay.record(SPACE, "Doc", "r").unwrap()
    );
}

#[test]
fn the_quota_alert_clears_once_compaction_brings_the_space_back_under_its_quota() {
    let runtime = ferry::daemon::runtime().unwrap();
    let _inside = runtime.enter();
    let relay = RelayStore::open(
        Arc::new(KvStorage::new(Arc::new(MemoryKv::new()))),
        RelayStoreOptions::default(),
    );
    let alerts = ferry::relay::alerts::RelayAlerts::new(
        ferry::alerts::AlertsConfig {
            account_quota_bytes: 2000,
            ..Default::default()
        },
        Arc::new(ferry::clock::FixedClock(1_000)),
    );
    let active = || -> Vec<String> {
        alerts
            .active(SPACE)
            .iter()
            .map(|a| a.kind.as_str().to_owned())
            .collect()
    };
    let mut writer = Writer::new(1);
    let mut n = 0;
    while relay.log_bytes(SPACE).unwrap() < 2000 {
        n += 1;
        let change = if n == 1 {
            writer.put(json!({"text": "x".repeat(100)}))
        } else {
            writer.patch(json!({"text": "y".repeat(100), "n": n}))
        };
        relay
            .append(SPACE, &dev(1), &[upload(n, "r", &change)])
            .unwrap();
        alerts.appended(&relay, SPACE);
    }
    assert_eq!(active(), ["storage_quota"]);
    let fields = relay.record(SPACE, "Doc", "r").unwrap();
    let done = relay
        .compact_log(
            SPACE,
            1_000,
            LogRetention {
                keep_log_days: 0,
                keep_log_entries: 2,
                flatten_history: false,
            },
        )
        .unwrap()
        .unwrap();
    assert!(done.bytes_after < 1000, "{done:?}");
    assert_eq!(relay.log_bytes(SPACE).unwrap(), done.bytes_after);
    alerts.compacted(&relay, SPACE);
    assert_eq!(active(), Vec::<String>::new());
    assert_eq!(relay.record(SPACE, "Doc", "r").unwrap(), fields);
}

/// A record whose document and conflict entry are both damaged: its rebuild writes the
/// document again from the log and, the log being whole, the space's conflict entries too, so
/// the record is served with the same fields and the same conflict entry as before.
#[test]
fn a_rebuild_writes_damaged_conflict_entries_again_from_a_whole_log() {
    let kv = Arc::new(MemoryKv::new());
    let relay = relay_on(kv.clone(), RelayStoreOptions::default());
    let mut a = Writer::new(1);
    let mut b = Writer::new(2);
    let created = a.put(json!({"title": "draft"}));
    b.record
        .apply_changes(std::slice::from_ref(&created))
        .unwrap();
    let mine = a.patch(json!({"title": "mine"}));
    let theirs = b.patch(json!({"title": "theirs"}));
    append_by_author(
        &relay,
        &[
            upload(1, "r", &created),
            upload(2, "r", &mine),
            upload(1, "r", &theirs),
        ],
    );
    let conflicts = relay.conflicts(SPACE, None, None, 10).unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:#?}");
    let record = relay.record(SPACE, "Doc", "r").unwrap();
    let id = conflicts[0].id.clone();
    drop(relay);

    let key = |kind: u8, parts: &[&str]| {
        let mut key = vec![kind];
        for part in parts {
            key.extend_from_slice(part.as_bytes());
            key.push(0);
        }
        key
    };
    assert!(kv.damage(&key(b'b', &[SPACE, "Doc", "r"])));
    assert!(kv.damage(&key(b'x', &[SPACE, &id])));
    let relay = relay_on(kv.clone(), RelayStoreOptions::default());
    assert!(matches!(
        relay.conflict(SPACE, &id),
        Err(RelayStoreError::Storage(StorageError::Damaged { .. }))
    ));
    let rebuilt = relay.rebuild_record(SPACE, "Doc", "r").unwrap();
    assert_eq!((rebuilt.changes, rebuilt.conflicts), (3, 1));
    assert!(rebuilt.conflicts_rebuilt);
    assert_eq!(relay.record(SPACE, "Doc", "r").unwrap(), record);
    assert_eq!(relay.conflicts(SPACE, None, None, 10).unwrap(), conflicts);
}
