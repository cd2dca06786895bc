//! Tombstone purging at the store level (PROTOCOL.md, section 5.8): the relay purges a record
//! deleted `tombstone_days` ago by logging a purge entry, and every device drops the record when
//! it meets that entry in log order. A device that held an unsynced edit to it meanwhile writes
//! the record again, as it showed it, as a new history: every device and the relay then show
//! the same fields and hold the same `update_delete` conflict entry (same id). Real device
//! stores and the real relay store; the log is moved between them as the sessions would.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{StepClock, fields};
use ferry::clock::{Clock, FixedClock};
use ferry::relay::storage::KvStorage;
use ferry::relay::store::{LogRetention, RelayStore, RelayStoreOptions};
use ferry::resolve::{Conflict, ConflictKind, ConflictStatus, DeleteRule, Policies, Policy};
use ferry::store::kv::MemoryKv;
use ferry::store::{BatchLimits, RetryPolicy, Store, StoreError, StoreOptions, Write};
use ferry_proto::wire::{ChangeOutcome, ErrorCode, ErrorKind};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

const SPACE: &str = "team";
const A: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
const B: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";
const C: &str = "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c";
const DAY: u64 = 86_400_000;
const T0: u64 = 100 * DAY;

/// `Doc` keeps an update that met a delete (the default), `Kept` keeps the delete.
fn policies() -> Policies {
    let keep_delete = Policy {
        on_delete: DeleteRule::KeepDelete,
        ..Policy::default()
    };
    Policies {
        default: Policy::default(),
        collections: BTreeMap::from([("Kept".to_owned(), keep_delete)]),
    }
}

struct Net {
    relay: RelayStore,
    clock: Arc<dyn Clock>,
}

impl Net {
    fn new() -> Net {
        let relay = RelayStore::open(
            Arc::new(KvStorage::new(Arc::new(MemoryKv::new()))),
            RelayStoreOptions {
                policies: policies(),
                clock: Arc::new(FixedClock(T0)),
                ..RelayStoreOptions::default()
            },
        );
        Net {
            relay,
            clock: StepClock::new(),
        }
    }

    fn device(&self, id: &str) -> Store {
        Store::open(
            Box::new(MemoryKv::new()),
            id,
            StoreOptions {
                policies: policies(),
                ..StoreOptions::default()
            },
            self.clock.clone(),
        )
        .unwrap()
    }

    /// The device's pending changes, answered by the relay and settled on the device; returns
    /// the answers.
    fn upload(&self, store: &Store) -> Vec<ChangeOutcome> {
        let batch = store
            .next_upload_batch(BatchLimits::of(10_000, usize::MAX))
            .unwrap();
        if batch.entries.is_empty() {
            return Vec::new();
        }
        let changes = common::uploads(&batch.entries);
        let results = self
            .relay
            .append(SPACE, store.device_id(), &changes)
            .unwrap();
        store
            .finish_upload(&results, &RetryPolicy::immediate(5))
            .unwrap();
        results.into_iter().map(|r| r.outcome).collect()
    }

    /// The log after the device's cursor, applied a page of `page` entries at a time; returns
    /// how many purged records the device wrote again.
    fn download(&self, store: &Store, page: usize) -> usize {
        let mut restored = 0;
        loop {
            let cursor = store.sync_cursor().unwrap();
            let slice = self
                .relay
                .read_since(SPACE, cursor, page, usize::MAX)
                .unwrap();
            if slice.entries.is_empty() && slice.through == cursor {
                return restored;
            }
            restored += store
                .apply_remote(&slice.entries, slice.through)
                .unwrap()
                .restored;
        }
    }

    /// Compacts the relay's log through all but its last entry.
    fn compact(&self) {
        let retention = LogRetention {
            keep_log_days: 0,
            keep_log_entries: 1,
            flatten_history: false,
        };
        assert!(
            self.relay
                .compact_log(SPACE, T0, retention)
                .unwrap()
                .is_some()
        );
    }

    /// Compacts the relay's log through all but its last entry, flattening the histories
    /// wholly below it; returns how many were flattened.
    fn flatten(&self) -> usize {
        let retention = LogRetention {
            keep_log_days: 0,
            keep_log_entries: 1,
            flatten_history: true,
        };
        self.relay
            .compact_log(SPACE, T0, retention)
            .unwrap()
            .map_or(0, |done| done.flattened)
    }

    /// `store` deletes `Doc/r`, the relay purges it, and `store`, having met the purge entry,
    /// writes it again as `fields`: a new history.
    fn purge_and_write_again(&self, store: &Store, fields: serde_json::Value) {
        store
            .write(Write::Delete {
                collection: "Doc".into(),
                id: "r".into(),
            })
            .unwrap();
        self.upload(store);
        assert_eq!(
            self.relay
                .purge_tombstones(SPACE, T0 + 2 * DAY, DAY)
                .unwrap(),
            1
        );
        self.download(store, 100);
        put(store, "Doc", "r", fields);
    }

    /// A bootstrap from the relay's snapshot, one record a page, then the log after it.
    fn bootstrap(&self, store: &Store) {
        loop {
            let after = store
                .snapshot_pages()
                .unwrap()
                .and_then(|b| b.resume_after());
            let page = self
                .relay
                .snapshot_page(SPACE, after.as_ref(), 1, usize::MAX, None)
                .unwrap();
            if store.apply_snapshot_page(&page).unwrap().complete {
                break;
            }
        }
        self.download(store, 100);
    }
}

/// The answers to one upload of one change: refused as built on a history the relay ended
/// (purged or flattened), which the device keeps until its download meets that.
fn refused_as_built_on_an_ended_history(answers: &[ChangeOutcome]) {
    assert!(
        matches!(
            answers,
            [ChangeOutcome::Rejected {
                code: ErrorCode::RecordPurged,
                ..
            }]
        ),
        "{answers:?}"
    );
}

fn put(store: &Store, collection: &str, id: &str, value: serde_json::Value) {
    store
        .write(Write::Put {
            collection: collection.into(),
            id: Some(id.into()),
            fields: fields(value),
        })
        .unwrap();
}

fn conflicts(store: &Store) -> Vec<Conflict> {
    store.conflicts(None, None, None, 100).unwrap()
}

fn shown(store: &Store, collection: &str, id: &str) -> Option<ferry::record::Fields> {
    match store.get(collection, id) {
        Ok(view) => Some(view.fields.parse().unwrap()),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => panic!("read {collection}/{id}: {e}"),
    }
}

/// A record deleted on A is purged; B, offline with an edit to it, comes back. Whether B
/// uploads before or after it meets the purge entry, and whatever page size the devices read
/// the log in, the record comes back everywhere with B's fields and one `update_delete` entry,
/// the same on every device and the relay; B's edit is neither lost nor left failing.
#[test]
fn a_purged_records_late_edit_comes_back_as_a_new_history_on_every_device() {
    for (uploads_first, page) in [(true, 1), (false, 1), (true, 100), (false, 100)] {
        let net = Net::new();
        let (a, b, c) = (net.device(A), net.device(B), net.device(C));
        put(&a, "Doc", "r", json!({"n": 0, "name": "first"}));
        put(&a, "Doc", "other", json!({"n": 1}));
        net.upload(&a);
        net.download(&b, page);
        net.download(&c, page);
        // B, offline, edits; A deletes.
        b.write(Write::Patch {
            collection: "Doc".into(),
            id: "r".into(),
            set: fields(json!({"late": true})),
            unset: Vec::new(),
        })
        .unwrap();
        a.write(Write::Delete {
            collection: "Doc".into(),
            id: "r".into(),
        })
        .unwrap();
        net.upload(&a);
        net.download(&c, page);
        assert_eq!(shown(&c, "Doc", "r"), None);

        assert_eq!(
            net.relay
                .purge_tombstones(SPACE, T0 + 2 * DAY, DAY)
                .unwrap(),
            1
        );
        for device in [&a, &c] {
            assert_eq!(net.download(device, page), 0);
            assert_eq!(shown(device, "Doc", "r"), None);
            assert!(
                device.export_doc("Doc", "r").is_err(),
                "the document is dropped"
            );
        }

        if uploads_first {
            // The relay refuses the edit as built on a purged history; B keeps it.
            refused_as_built_on_an_ended_history(&net.upload(&b));
            assert_eq!(b.queue_counts().unwrap().failed, 0);
        }
        assert_eq!(net.download(&b, page), 1, "B writes the record again");
        let answers = net.upload(&b);
        assert!(
            answers
                .iter()
                .any(|a| matches!(a, ChangeOutcome::Stored { .. })),
            "{answers:?}"
        );
        // The edit the relay refused is taken over by the restoration, not left failing.
        while !net.upload(&b).is_empty() {}
        let counts = b.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed), (0, 0), "{counts:?}");
        for device in [&a, &b, &c] {
            net.download(device, page);
        }

        let expected = fields(json!({"n": 0, "name": "first", "late": true}));
        let relay_conflicts = net.relay.conflicts(SPACE, None, None, 100).unwrap();
        assert_eq!(relay_conflicts.len(), 1, "{relay_conflicts:?}");
        let entry = &relay_conflicts[0];
        assert_eq!(entry.kind, ConflictKind::UpdateDelete);
        assert_eq!(entry.status, ConflictStatus::AutoResolved);
        assert_eq!(entry.client.fields, expected);
        assert_eq!(
            net.relay.record(SPACE, "Doc", "r").unwrap(),
            Some(expected.clone())
        );
        for (name, device) in [("A", &a), ("B", &b), ("C", &c)] {
            assert_eq!(
                shown(device, "Doc", "r"),
                Some(expected.clone()),
                "{name} (uploads first: {uploads_first}, page {page})"
            );
            let ids: Vec<String> = conflicts(device).into_iter().map(|c| c.id).collect();
            assert_eq!(ids, std::slice::from_ref(&entry.id), "{name}");
            assert_eq!(shown(device, "Doc", "other"), Some(fields(json!({"n": 1}))));
        }
    }
}

/// Under `keep_delete` the late edit does not bring the record back: the restoration keeps it
/// deleted, and the edit's fields stay in the conflict entry every device holds.
#[test]
fn under_keep_delete_a_late_edit_stays_in_the_conflict_entry() {
    let net = Net::new();
    let (a, b) = (net.device(A), net.device(B));
    put(&a, "Kept", "r", json!({"n": 0}));
    net.upload(&a);
    net.download(&b, 100);
    b.write(Write::Patch {
        collection: "Kept".into(),
        id: "r".into(),
        set: fields(json!({"n": 5})),
        unset: Vec::new(),
    })
    .unwrap();
    a.write(Write::Delete {
        collection: "Kept".into(),
        id: "r".into(),
    })
    .unwrap();
    net.upload(&a);
    assert_eq!(
        net.relay
            .purge_tombstones(SPACE, T0 + 2 * DAY, DAY)
            .unwrap(),
        1
    );
    net.download(&b, 100);
    while !net.upload(&b).is_empty() {}
    for device in [&a, &b] {
        net.download(device, 100);
        assert_eq!(shown(device, "Kept", "r"), None);
        let found = conflicts(device);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, ConflictKind::UpdateDelete);
        assert_eq!(found[0].client.fields, fields(json!({"n": 5})));
        assert!(found[0].client.deleted);
    }
    // The restoration left the record deleted: it is purged again in turn.
    assert_eq!(
        net.relay
            .purge_tombstones(SPACE, T0 + 4 * DAY, DAY)
            .unwrap(),
        1
    );
    for device in [&a, &b] {
        net.download(device, 100);
        assert!(conflicts(device).is_empty());
    }
}

/// A device's create, acknowledged by the relay but never met in the log (the device went
/// offline after uploading), whose completed queue entry was pruned since: the relay purged the
/// record (and, in one case, it was written again as a new history) and compacted its log past
/// the purge entry. Bootstrapping from the snapshot, the device takes the record as purged
/// (its create was logged, as its completed entry said), so it neither keeps the old record nor
/// merges the old history into the new one.
#[test]
fn a_device_whose_acknowledged_create_was_pruned_from_its_queue_drops_the_purged_record() {
    for written_again in [false, true] {
        let net = Net::new();
        let (a, b) = (net.device(A), net.device(B));
        put(&a, "Doc", "r", json!({"n": 0}));
        put(&a, "Doc", "kept", json!({"n": 1}));
        net.upload(&a);
        let (pruned, _) = a.prune_history(u64::MAX, 0, 100).unwrap();
        assert_eq!(pruned, 2, "both completed entries are pruned");

        net.download(&b, 100);
        b.write(Write::Delete {
            collection: "Doc".into(),
            id: "r".into(),
        })
        .unwrap();
        net.upload(&b);
        assert_eq!(
            net.relay
                .purge_tombstones(SPACE, T0 + 2 * DAY, DAY)
                .unwrap(),
            1
        );
        net.download(&b, 100);
        if written_again {
            put(&b, "Doc", "r", json!({"m": 2}));
        }
        put(&b, "Doc", "last", json!({"n": 3}));
        net.upload(&b);
        net.compact();

        net.bootstrap(&a);
        let expected = written_again.then(|| fields(json!({"m": 2})));
        assert_eq!(
            shown(&a, "Doc", "r"),
            expected,
            "written again: {written_again}"
        );
        assert_eq!(shown(&a, "Doc", "kept"), Some(fields(json!({"n": 1}))));
        assert_eq!(shown(&a, "Doc", "last"), Some(fields(json!({"n": 3}))));
        let counts = a.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed), (0, 0), "{counts:?}");
        assert!(conflicts(&a).is_empty(), "{:?}", conflicts(&a));
    }
}

/// B created the record on its own and, before that create was uploaded, met A's history of it
/// and edited the merged record; A deleted it and the relay purged it. B meets the purge entry
/// while its create is on its way to the relay (in flight) and its edit still waits: the
/// create is logged as the record's new history, and the restoration of what B showed builds
/// on it rather than beside it (beside it, it would reuse the create's actor sequence and be
/// refused). Every device ends with B's fields and the same entries; nothing stays failing.
#[test]
fn a_restoration_builds_on_a_create_already_on_its_way() {
    let net = Net::new();
    let (a, b) = (net.device(A), net.device(B));
    put(&a, "Doc", "r", json!({"n": 0}));
    net.upload(&a);
    a.write(Write::Delete {
        collection: "Doc".into(),
        id: "r".into(),
    })
    .unwrap();
    net.upload(&a);

    put(&b, "Doc", "r", json!({"own": true}));
    let cursor = b.sync_cursor().unwrap();
    let first = net.relay.read_since(SPACE, cursor, 1, usize::MAX).unwrap();
    b.apply_remote(&first.entries, first.through).unwrap();
    b.write(Write::Patch {
        collection: "Doc".into(),
        id: "r".into(),
        set: fields(json!({"late": true})),
        unset: Vec::new(),
    })
    .unwrap();
    // The create goes out; the edit waits.
    let on_its_way = b.next_upload_batch(BatchLimits::of(1, usize::MAX)).unwrap();
    assert_eq!(on_its_way.entries.len(), 1);

    assert_eq!(
        net.relay
            .purge_tombstones(SPACE, T0 + 2 * DAY, DAY)
            .unwrap(),
        1
    );
    assert_eq!(net.download(&b, 100), 1, "B writes the record again");
    let create = common::uploads(&on_its_way.entries);
    let results = net.relay.append(SPACE, B, &create).unwrap();
    assert!(
        matches!(results[0].outcome, ChangeOutcome::Stored { .. }),
        "the create is the new history's first change: {results:?}"
    );
    b.finish_upload(&results, &RetryPolicy::immediate(5))
        .unwrap();
    let answers = net.upload(&b);
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, ChangeOutcome::Stored { .. })),
        "the restoration is logged after the create: {answers:?}"
    );
    let counts = b.queue_counts().unwrap();
    assert_eq!((counts.pending, counts.failed), (0, 0), "{counts:?}");
    net.download(&a, 100);
    net.download(&b, 100);
    let expected = fields(json!({"n": 0, "own": true, "late": true}));
    assert_eq!(
        net.relay.record(SPACE, "Doc", "r").unwrap(),
        Some(expected.clone())
    );
    for device in [&a, &b] {
        assert_eq!(shown(device, "Doc", "r"), Some(expected.clone()));
        assert_eq!(
            conflicts(device),
            net.relay.conflicts(SPACE, None, None, 100).unwrap()
        );
    }
}

/// A's create reached the relay but its answer was lost; B deleted the record, the relay purged
/// it, B wrote it again, and the log was compacted past all of it. A bootstraps from the
/// snapshot while its create still waits for an answer, so it cannot tell the create was
/// logged: it keeps it beside the page's history, as any create of its own. Sent again, the
/// create is answered `Duplicate` at a seq A's bootstrap went past: the relay ended its history.
/// A then drops it; an edit A made on it meanwhile is refused as built on that history and
/// written again on B's. Every device ends with the relay's heads, and nothing stays waiting.
#[test]
fn a_create_whose_answer_was_lost_goes_with_the_purged_history_once_answered() {
    for edited in [false, true] {
        let net = Net::new();
        let (a, b) = (net.device(A), net.device(B));
        put(&a, "Doc", "r", json!({"n": 0}));
        let lost = a
            .next_upload_batch(BatchLimits::of(10, usize::MAX))
            .unwrap();
        net.relay
            .append(SPACE, A, &common::uploads(&lost.entries))
            .unwrap();
        let ids: Vec<u64> = lost.entries.iter().map(|e| e.id).collect();
        a.abandon_upload(
            &ids,
            "network: reset",
            ErrorKind::Network,
            &RetryPolicy::immediate(5),
        )
        .unwrap();
        if edited {
            patch(&a, "r", json!({"late": true}));
        }

        net.download(&b, 100);
        net.purge_and_write_again(&b, json!({"m": 2}));
        put(&b, "Doc", "last", json!({"n": 3}));
        net.upload(&b);
        net.download(&b, 100);
        net.compact();

        net.bootstrap(&a);
        let answers = net.upload(&a);
        assert!(
            matches!(answers[0], ChangeOutcome::Duplicate { .. }),
            "the create was logged before the purge: {answers:?}"
        );
        // An edit refused as built on the ended history is retried once set aside.
        while !net.upload(&a).is_empty() {}
        let counts = a.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed), (0, 0), "{counts:?}");
        net.download(&a, 100);
        net.download(&b, 100);
        let expected = if edited {
            fields(json!({"m": 2, "late": true}))
        } else {
            fields(json!({"m": 2}))
        };
        let heads = net.relay.heads(SPACE, "Doc", "r").unwrap().unwrap();
        for device in [&a, &b] {
            assert_eq!(
                shown(device, "Doc", "r"),
                Some(expected.clone()),
                "{edited}"
            );
            assert_eq!(device.get("Doc", "r").unwrap().heads, heads, "{edited}");
            assert!(conflicts(device).is_empty(), "{:?}", conflicts(device));
        }
        assert_eq!(net.relay.record(SPACE, "Doc", "r").unwrap(), Some(expected));
    }
}

/// A created the record on its own beside B's create, which it met in the log; its own create
/// was answered `Stored`, but A went offline before meeting it in the log. B deleted the record,
/// the relay purged it, B wrote it again, and the log was compacted past all of it. A's
/// bootstrap takes its answered create as logged, so purged with the history, not as a new
/// history of its own to keep: A ends with the relay's heads.
#[test]
fn an_answered_create_not_met_in_the_log_goes_with_the_purged_history() {
    let net = Net::new();
    let (a, b) = (net.device(A), net.device(B));
    put(&a, "Doc", "r", json!({"a": 1}));
    put(&b, "Doc", "r", json!({"b": 1}));
    net.upload(&b);
    net.download(&a, 100);
    assert!(
        net.upload(&a)
            .iter()
            .all(|o| matches!(o, ChangeOutcome::Stored { .. }))
    );

    net.download(&b, 100);
    net.purge_and_write_again(&b, json!({"m": 2}));
    put(&b, "Doc", "last", json!({"n": 3}));
    net.upload(&b);
    net.compact();

    net.bootstrap(&a);
    assert!(net.upload(&a).is_empty(), "nothing of A's waits");
    let heads = net.relay.heads(SPACE, "Doc", "r").unwrap().unwrap();
    assert_eq!(shown(&a, "Doc", "r"), Some(fields(json!({"m": 2}))));
    assert_eq!(a.get("Doc", "r").unwrap().heads, heads);
    assert!(conflicts(&a).is_empty(), "{:?}", conflicts(&a));
}

/// A holds a conflict entry of the record's first history; B deletes the record, the relay purges
/// it, B writes it again, and the relay flattens that new history as it compacts the log past
/// all of it. A, back past the horizon, bootstraps: the page's document is a flatten it never
/// met, and the conflict entry of the purged history goes with that history, as the relay's did.
#[test]
fn a_conflict_of_a_purged_history_goes_when_its_record_comes_back_flattened() {
    let net = Net::new();
    let (a, b) = (net.device(A), net.device(B));
    put(&a, "Doc", "r", json!({"n": 1}));
    put(&b, "Doc", "r", json!({"n": 2}));
    net.upload(&a);
    net.upload(&b);
    net.download(&a, 100);
    net.download(&b, 100);
    assert_eq!(conflicts(&a).len(), 1, "the two creates meet");

    net.purge_and_write_again(&b, json!({"m": 2}));
    patch(&b, "r", json!({"m": 3}));
    put(&b, "Doc", "last", json!({"n": 3}));
    net.upload(&b);
    assert!(net.flatten() >= 1, "the new history is flattened");

    net.bootstrap(&a);
    let on_relay = net.relay.conflicts(SPACE, None, None, 100).unwrap();
    assert_eq!(conflicts(&a), on_relay);
    assert_eq!(shown(&a, "Doc", "r"), Some(fields(json!({"m": 3}))));
    let heads = net.relay.heads(SPACE, "Doc", "r").unwrap().unwrap();
    assert_eq!(a.get("Doc", "r").unwrap().heads, heads);
    let counts = a.conflict_counts().unwrap();
    let relay_counts = net.relay.conflict_counts(SPACE).unwrap();
    assert_eq!(
        counts.iter().map(|c| c.detected).sum::<u64>(),
        relay_counts.iter().map(|c| c.detected).sum::<u64>(),
        "{counts:?} {relay_counts:?}"
    );
}

fn patch(store: &Store, id: &str, value: serde_json::Value) {
    store
        .write(Write::Patch {
            collection: "Doc".into(),
            id: id.into(),
            set: fields(value),
            unset: Vec::new(),
        })
        .unwrap();
}

/// The heads of the record as the device's document holds them, and how many changes that is.
fn history_len(store: &Store, id: &str) -> usize {
    let saved = store.export_doc("Doc", id).unwrap();
    automerge::Automerge::load(&saved)
        .unwrap()
        .get_changes(&[])
        .len()
}

/// A record edited many times and left alone past the horizon is flattened by the relay: every
/// device that meets the flatten entry drops the old history for the one change, shows the
/// same fields, and writes on the new history; a device offline meanwhile with edits on the old
/// history writes what they changed again on the new one (the relay refused them as built on
/// an ended history), and nothing is lost: every device ends with the same fields and heads.
#[test]
fn a_flattened_history_replaces_the_old_one_on_every_device_and_late_edits_are_written_again() {
    for (uploads_first, page) in [(true, 1), (false, 1), (true, 100), (false, 100)] {
        let net = Net::new();
        let (a, b, c) = (net.device(A), net.device(B), net.device(C));
        put(&a, "Doc", "r", json!({"n": 0, "name": "first", "gone": 1}));
        for n in 1..5 {
            patch(&a, "r", json!({"n": n}));
        }
        put(&a, "Doc", "other", json!({"n": 1}));
        net.upload(&a);
        for device in [&b, &c] {
            net.download(device, page);
            assert_eq!(history_len(device, "r"), 5);
        }
        // B, offline, edits one field, adds one and removes one.
        b.write(Write::Patch {
            collection: "Doc".into(),
            id: "r".into(),
            set: fields(json!({"name": "late", "added": true})),
            unset: vec!["gone".into()],
        })
        .unwrap();
        // Another record keeps the last entry above the horizon.
        patch(&a, "other", json!({"n": 2}));
        net.upload(&a);
        net.download(&a, page);
        assert_eq!(net.flatten(), 1);

        for device in [&a, &c] {
            assert_eq!(
                net.download(device, page),
                0,
                "nothing of theirs to write again"
            );
            assert_eq!(history_len(device, "r"), 1, "the old history is dropped");
            assert_eq!(
                shown(device, "Doc", "r"),
                Some(fields(json!({"n": 4, "name": "first", "gone": 1})))
            );
        }
        if uploads_first {
            refused_as_built_on_an_ended_history(&net.upload(&b));
        }
        assert_eq!(net.download(&b, page), 1, "B writes its edit again");
        assert_eq!(
            shown(&b, "Doc", "r"),
            Some(fields(json!({"n": 4, "name": "late", "added": true})))
        );
        while !net.upload(&b).is_empty() {}
        let counts = b.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed), (0, 0), "{counts:?}");
        // Writes go on on the new history.
        net.download(&a, page);
        patch(&a, "r", json!({"n": 5}));
        net.upload(&a);
        for device in [&a, &b, &c] {
            net.download(device, page);
        }
        let expected = fields(json!({"n": 5, "name": "late", "added": true}));
        let heads = net.relay.heads(SPACE, "Doc", "r").unwrap().unwrap();
        for device in [&a, &b, &c] {
            assert_eq!(shown(device, "Doc", "r"), Some(expected.clone()));
            assert_eq!(device.get("Doc", "r").unwrap().heads, heads);
            assert_eq!(
                history_len(device, "r"),
                3,
                "the flatten change and two edits"
            );
            assert!(conflicts(device).is_empty());
        }
        assert_eq!(net.relay.record(SPACE, "Doc", "r").unwrap(), Some(expected));
    }
}

/// A device offline past the horizon with an edit on a history the relay flattened meanwhile
/// bootstraps from the relay's snapshot: the page's document replaces the old history, the edit
/// waits for the relay's answer (set aside), which refuses it as built on the ended history; it
/// is then written again on the new one, uploaded, and every device ends with the same fields.
#[test]
fn a_device_back_past_the_horizon_writes_its_edits_again_on_a_flattened_history() {
    let net = Net::new();
    let (a, b) = (net.device(A), net.device(B));
    put(&a, "Doc", "r", json!({"n": 0, "name": "first"}));
    for n in 1..4 {
        patch(&a, "r", json!({"n": n}));
    }
    net.upload(&a);
    net.download(&a, 100);
    net.download(&b, 100);
    patch(&b, "r", json!({"name": "offline"}));
    for n in 0..5 {
        put(&a, "Doc", &format!("other{n}"), json!({"n": n}));
    }
    net.upload(&a);
    net.download(&a, 100);
    assert_eq!(net.flatten(), 1);
    // A meets the flatten entry; B's cursor is below the horizon: it bootstraps.
    net.download(&a, 100);
    let cursor = b.sync_cursor().unwrap();
    let slice = net
        .relay
        .read_since(SPACE, cursor, 100, usize::MAX)
        .unwrap();
    assert!(slice.horizon > cursor, "B is past the horizon");
    net.bootstrap(&b);
    // Whether the relay logged B's edit before it flattened the record (its answer lost) only
    // the relay's answer tells: until then the edit is set aside.
    assert_eq!(history_len(&b, "r"), 1);
    refused_as_built_on_an_ended_history(&net.upload(&b));
    assert_eq!(
        history_len(&b, "r"),
        2,
        "the flatten change and B's edit written again"
    );
    assert_eq!(
        shown(&b, "Doc", "r"),
        Some(fields(json!({"n": 3, "name": "offline"})))
    );
    while !net.upload(&b).is_empty() {}
    let counts = b.queue_counts().unwrap();
    assert_eq!((counts.pending, counts.failed), (0, 0), "{counts:?}");
    net.download(&a, 100);
    net.download(&b, 100);
    let heads = net.relay.heads(SPACE, "Doc", "r").unwrap().unwrap();
    for device in [&a, &b] {
        assert_eq!(
            shown(device, "Doc", "r"),
            Some(fields(json!({"n": 3, "name": "offline"})))
        );
        assert_eq!(device.get("Doc", "r").unwrap().heads, heads);
        assert!(conflicts(device).is_empty());
    }
}
