//! The store's side of sync: upload batches in priority order within their limits, the relay's
//! answers and lost connections moving queue entries, recovery after a crash, and remote changes
//! applied idempotently, atomically with the download cursor, convergently between devices, and
//! without losing a local write made at the same time.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Engine, StepClock, TestStore, fields, open_test_store, put};
use ferry::service::{Origin, Service, ServiceOptions, api};
use ferry::store::kv::{Batch, Kv, MemoryKv};
use ferry::store::sync::{RefusedEntry, UploadSummary};
use ferry::store::{BatchLimits, RetryPolicy, Store, StoreError, StoreOptions, Write, keys};
use ferry_proto::QueueStatus;
use ferry_proto::session::OwnEntry;
use ferry_proto::wire::{ChangeOutcome, ChangeResult, ErrorCode, ErrorKind, LogEntry};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

const OTHER_DEVICE: &str = "fedcba9876543210fedcba9876543210";

fn patch(collection: &str, id: &str, v: Value) -> Write {
    Write::Patch {
        collection: collection.into(),
        id: id.into(),
        set: fields(v),
        unset: Vec::new(),
    }
}

fn queue_id(store: &Store, write: Write) -> u64 {
    store
        .write(write)
        .expect("write")
        .queue_id
        .expect("a change")
}

fn ids(entries: &[ferry_proto::SyncQueueEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.id).collect()
}

fn status_of(store: &Store, id: u64) -> ferry_proto::SyncQueueEntry {
    store
        .queue(None, Some(id - 1), 1)
        .expect("queue")
        .into_iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("entry {id} missing"))
}

fn other_store(kv: &MemoryKv) -> Store {
    Store::open(
        Box::new(kv.clone()),
        OTHER_DEVICE,
        StoreOptions::default(),
        StepClock::new(),
    )
    .expect("open the other device's store")
}

/// A device's store after `writes`, each its own change.
fn written(writes: Vec<Write>) -> TestStore {
    let origin = TestStore::new(Engine::Memory, StoreOptions::default());
    for write in writes {
        origin.store().write(write).unwrap();
    }
    origin
}

/// A store's queued changes from entry `after` on, as a relay log would carry them.
fn as_log(store: &Store, after: u64, first_seq: u64) -> Vec<LogEntry> {
    store
        .queue(None, Some(after), usize::MAX)
        .expect("queue")
        .into_iter()
        .enumerate()
        .map(|(i, e)| LogEntry {
            seq: first_seq + i as u64,
            collection: e.model_name,
            record: e.object_id,
            change: e.data,
        })
        .collect()
}

fn rejected(entry: u64, code: ErrorCode) -> ChangeResult {
    ChangeResult {
        entry,
        outcome: ChangeOutcome::Rejected {
            code,
            message: format!("{code:?}"),
        },
    }
}

fn stored(entry: u64, seq: u64) -> ChangeResult {
    ChangeResult {
        entry,
        outcome: ChangeOutcome::Stored { seq },
    }
}

#[test]
fn upload_batches_take_priority_then_age_within_their_limits() {
    let options = StoreOptions {
        priorities: BTreeMap::from([("Urgent".into(), 10), ("Later".into(), -5)]),
        ..StoreOptions::default()
    };
    let t = TestStore::new(Engine::Memory, options);
    let s = t.store();
    let a = queue_id(s, put("Job", "a", json!({"n": 1})));
    let later = queue_id(s, put("Later", "l", json!({"n": 2})));
    let x = queue_id(s, put("Urgent", "x", json!({"n": 3})));
    let b = queue_id(s, put("Job", "b", json!({"n": 4})));
    let z = queue_id(s, put("Urgent", "z", json!({"n": 5})));

    let first = s
        .next_upload_batch(BatchLimits::of(2, usize::MAX))
        .unwrap()
        .entries;
    assert_eq!(ids(&first), [x, z]);
    assert!(first.iter().all(|e| e.status == QueueStatus::Processing));
    // A byte limit smaller than any change still lets one entry through.
    let second = s.next_upload_batch(BatchLimits::of(10, 1)).unwrap().entries;
    assert_eq!(ids(&second), [a]);
    let size = second[0].data.len();
    let third = s
        .next_upload_batch(BatchLimits::of(10, 2 * size + size / 2))
        .unwrap()
        .entries;
    assert_eq!(ids(&third), [b, later]);
    assert!(
        s.next_upload_batch(BatchLimits::of(10, usize::MAX))
            .unwrap()
            .entries
            .is_empty()
    );
    let counts = s.queue_counts().unwrap();
    assert_eq!((counts.pending, counts.processing), (0, 5));
    assert_eq!(status_of(s, x).status, QueueStatus::Processing);
}

#[test]
fn finishing_an_upload_settles_each_outcome_in_one_go() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let s = t.store();
    let entries: Vec<u64> = (0..4)
        .map(|n| queue_id(s, put("Job", &n.to_string(), json!({"n": n}))))
        .collect();
    let waiting = queue_id(s, put("Job", "waiting", json!({})));
    let batch = s
        .next_upload_batch(BatchLimits::of(4, usize::MAX))
        .unwrap()
        .entries;
    assert_eq!(ids(&batch), entries);

    let results = [
        stored(entries[0], 1),
        ChangeResult {
            entry: entries[1],
            outcome: ChangeOutcome::Duplicate { seq: 1 },
        },
        rejected(entries[2], ErrorCode::MissingDependencies),
        rejected(entries[3], ErrorCode::InvalidChange),
        stored(999, 2),
        stored(waiting, 3),
    ];
    let summary = s
        .finish_upload(&results, &RetryPolicy::immediate(5))
        .unwrap();
    assert_eq!(
        summary,
        UploadSummary {
            completed: 2,
            failed: 1,
            retrying: 1,
            written_again: 0,
            ignored: vec![999, waiting],
            refused: vec![
                RefusedEntry {
                    entry: entries[2],
                    collection: "Job".into(),
                    record: "2".into(),
                    error: "validation: MissingDependencies".into(),
                    failed: false,
                },
                RefusedEntry {
                    entry: entries[3],
                    collection: "Job".into(),
                    record: "3".into(),
                    error: "validation: InvalidChange".into(),
                    failed: true,
                },
            ],
        }
    );
    assert_eq!(status_of(s, entries[0]).status, QueueStatus::Completed);
    assert_eq!(status_of(s, entries[1]).status, QueueStatus::Completed);
    let retry = status_of(s, entries[2]);
    assert_eq!((retry.status, retry.retry_count), (QueueStatus::Pending, 1));
    assert_eq!(
        retry.last_error.as_deref(),
        Some("validation: MissingDependencies")
    );
    let refused = status_of(s, entries[3]);
    assert_eq!(
        (refused.status, refused.retry_count),
        (QueueStatus::Failed, 0)
    );
    assert_eq!(
        refused.last_error.as_deref(),
        Some("validation: InvalidChange")
    );
    assert_eq!(status_of(s, waiting).status, QueueStatus::Pending);
    assert_eq!(
        ids(&s
            .next_upload_batch(BatchLimits::of(10, usize::MAX))
            .unwrap()
            .entries),
        [entries[2], waiting],
        "the retried entry keeps its place by age"
    );
    // An answer that arrives twice changes nothing the second time.
    let again = s
        .finish_upload(&results[..1], &RetryPolicy::immediate(5))
        .unwrap();
    assert_eq!(again.ignored, [entries[0]]);
}

#[test]
fn an_abandoned_upload_blames_only_an_entry_that_was_alone() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let s = t.store();
    let retries = RetryPolicy::immediate(2);
    let id = queue_id(s, put("Job", "1", json!({})));
    let other = queue_id(s, put("Job", "2", json!({})));
    let waiting = queue_id(s, put("Job", "3", json!({})));
    let next = |n| {
        ids(&s
            .next_upload_batch(BatchLimits::of(n, usize::MAX))
            .unwrap()
            .entries)
    };
    assert_eq!(next(2), [id, other]);
    // A batch of two gets no answer: neither is to blame, and each goes alone next time.
    let summary = s
        .abandon_upload(
            &[id, other, waiting],
            "timeout: no answer",
            ErrorKind::Timeout,
            &retries,
        )
        .unwrap();
    assert_eq!((summary.retrying, summary.failed), (2, 0));
    assert_eq!(summary.ignored, [waiting], "not in an upload: skipped");
    let e = status_of(s, id);
    assert_eq!((e.status, e.retry_count), (QueueStatus::Pending, 0));
    assert_eq!(e.last_error.as_deref(), Some("timeout: no answer"));
    assert_eq!(next(10), [id], "a suspect goes alone");
    // The network failing under it is not its fault either.
    s.abandon_upload(&[id], "network: reset", ErrorKind::Network, &retries)
        .unwrap();
    assert_eq!(status_of(s, id).retry_count, 0);
    assert_eq!(next(10), [id]);
    // Alone and not answered: one retry counted, then failed once they run out.
    s.abandon_upload(&[id], "timeout: no answer", ErrorKind::Timeout, &retries)
        .unwrap();
    assert_eq!(status_of(s, id).retry_count, 1);
    assert_eq!(next(10), [id]);
    let summary = s
        .abandon_upload(&[id], "timeout: no answer", ErrorKind::Timeout, &retries)
        .unwrap();
    assert_eq!((summary.retrying, summary.failed), (0, 1));
    let e = status_of(s, id);
    assert_eq!((e.status, e.retry_count), (QueueStatus::Failed, 2));
    assert_eq!(
        next(10),
        [other],
        "a failed entry is not uploaded again; the other suspect still goes alone"
    );
    s.finish_upload(&[stored(other, 1)], &retries).unwrap();
    assert_eq!(next(10), [waiting], "the rest goes in full batches again");
}

#[test]
fn a_batch_that_keeps_failing_is_halved_until_the_culprit_is_alone() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let s = t.store();
    let retries = RetryPolicy::immediate(10);
    let entries: Vec<u64> = (0..8)
        .map(|n| queue_id(s, put("Job", &n.to_string(), json!({"n": n}))))
        .collect();
    let culprit = entries[5];
    let mut sizes = Vec::new();
    let mut stored_count = 0;
    for seq in 1.. {
        let batch = ids(&s
            .next_upload_batch(BatchLimits::of(100, usize::MAX))
            .unwrap()
            .entries);
        if batch.is_empty() {
            break;
        }
        assert!(seq < 40, "the culprit was never isolated: {sizes:?}");
        sizes.push(batch.len());
        if batch.contains(&culprit) {
            // Whatever holds the culprit breaks the connection.
            s.abandon_upload(&batch, "server: closed", ErrorKind::Server, &retries)
                .unwrap();
        } else {
            let results: Vec<_> = batch.iter().map(|&e| stored(e, seq)).collect();
            stored_count += s.finish_upload(&results, &retries).unwrap().completed;
        }
    }
    assert_eq!(
        stored_count, 7,
        "every innocent entry got through: {sizes:?}"
    );
    let e = status_of(s, culprit);
    assert_eq!((e.status, e.retry_count), (QueueStatus::Failed, 10));
    // 8 fail; 4 pass and 4 fail; 2 fail; 1 passes and the culprit fails alone until it runs out
    // of retries; the last 2 pass.
    let mut expected = vec![8, 4, 4, 2, 1];
    expected.extend([1; 10]);
    expected.push(2);
    assert_eq!(sizes, expected);
}

#[test]
fn a_refused_entry_backs_off_exponentially_without_holding_back_others() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let s = t.store();
    let retries = RetryPolicy {
        max_retries: 5,
        backoff_initial_ms: 1_000,
        backoff_max_ms: 8_000,
    };
    let a = queue_id(s, put("Job", "x", json!({"v": 1})));
    let a_later = queue_id(s, put("Job", "x", json!({"v": 2})));
    let other = queue_id(s, put("Job", "y", json!({"v": 1})));
    let next = || {
        ids(&s
            .next_upload_batch(BatchLimits::of(100, usize::MAX))
            .unwrap()
            .entries)
    };
    let mut waits = Vec::new();
    for attempt in 1..=4u32 {
        let batch = next();
        assert_eq!(batch[0], a, "attempt {attempt}: {batch:?}");
        let mut results = vec![rejected(a, ErrorCode::Overloaded)];
        // What follows `a` on its record waits with it; it is handed back.
        results.extend(
            batch[1..]
                .iter()
                .map(|&e| rejected(e, ErrorCode::Overloaded)),
        );
        let now = t.clock().peek();
        s.finish_upload(&results[..1], &retries).unwrap();
        let back: Vec<u64> = batch[1..].to_vec();
        if !back.is_empty() {
            s.abandon_upload(&back, "network: gone", ErrorKind::Network, &retries)
                .unwrap();
        }
        let due = s.next_upload_due().expect("a retry is due later");
        waits.push(due - now);
        // While `a` waits, the other record's entry goes; `a`'s later change waits with it.
        let meanwhile = next();
        assert!(
            !meanwhile.contains(&a) && !meanwhile.contains(&a_later),
            "{meanwhile:?}"
        );
        if !meanwhile.is_empty() {
            let results: Vec<_> = meanwhile.iter().map(|&e| stored(e, 1)).collect();
            s.finish_upload(&results, &retries).unwrap();
        }
        t.clock().advance(due - t.clock().peek() + 1);
    }
    assert_eq!(status_of(s, other).status, QueueStatus::Completed);
    // [d/2, d] with d = 1, 2, 4, 8 (the ceiling) seconds.
    for (wait, ceiling) in waits.iter().zip([1_000, 2_000, 4_000, 8_000]) {
        assert!(
            (ceiling / 2..=ceiling + 2).contains(wait),
            "{waits:?} against a ceiling of {ceiling}"
        );
    }
}

#[test]
fn a_change_no_frame_can_carry_is_refused_and_the_rest_goes() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let s = t.store();
    let small = queue_id(s, put("Job", "a", json!({"v": 1})));
    let big = queue_id(s, put("Job", "b", json!({"blob": "x".repeat(4_000)})));
    let after = queue_id(s, put("Job", "c", json!({"v": 1})));
    let batch = s
        .next_upload_batch(BatchLimits {
            max_changes: 100,
            max_bytes: usize::MAX,
            max_change_bytes: 2_000,
        })
        .unwrap();
    assert_eq!(ids(&batch.entries), [small, after]);
    assert_eq!(ids(&batch.refused), [big]);
    let e = status_of(s, big);
    assert_eq!(e.status, QueueStatus::Failed);
    let error = e.last_error.unwrap_or_default();
    assert!(
        error.starts_with("validation: the change is") && error.contains("sync.max_frame_bytes"),
        "{error}"
    );
    let counts = s.queue_counts().unwrap();
    assert_eq!((counts.processing, counts.failed), (2, 1));
}

#[test]
fn uploads_cut_off_by_a_crash_are_uploaded_again() {
    let mut t = TestStore::new(Engine::Memory, StoreOptions::default());
    let a = queue_id(t.store(), put("Job", "a", json!({})));
    let b = queue_id(t.store(), put("Job", "b", json!({})));
    t.store().flush().unwrap();
    let take = |t: &TestStore, max| {
        ids(&t
            .store()
            .next_upload_batch(BatchLimits::of(max, usize::MAX))
            .unwrap()
            .entries)
    };
    assert_eq!(take(&t, 1), [a]);
    // In flight: shown as such, and not taken again.
    assert_eq!(status_of(t.store(), a).status, QueueStatus::Processing);
    assert_eq!(take(&t, 10), [b]);
    // Stored, an entry in flight stays pending, flushed or not: after a crash both go again.
    t.store().flush().unwrap();
    assert!(t.crash());
    assert_eq!(status_of(t.store(), a).status, QueueStatus::Pending);
    assert_eq!(t.store().recover_interrupted().unwrap(), 0);
    assert_eq!(take(&t, 10), [a, b]);

    // A store that kept entries as `Processing` (an explicit move, or an earlier version) has
    // them requeued when it opens after a crash.
    assert!(t.crash());
    t.store()
        .queue_transition(&[a], &ferry::store::QueueAction::Start)
        .unwrap();
    t.store().flush().unwrap();
    assert!(t.crash());
    assert_eq!(status_of(t.store(), a).status, QueueStatus::Processing);
    assert_eq!(t.store().recover_interrupted().unwrap(), 1);
    assert_eq!(take(&t, 10), [a, b]);
}

#[test]
fn a_store_from_before_the_pending_index_gets_one_when_opened() {
    let kv = MemoryKv::new();
    let clock = StepClock::new();
    let store = open_test_store(Box::new(kv.clone()), StoreOptions::default(), &clock);
    let a = queue_id(&store, put("Job", "a", json!({})));
    let b = queue_id(&store, put("Job", "b", json!({})));
    store.flush().unwrap();
    drop(store);
    let mut strip = Batch::default();
    for (key, _) in kv
        .range(keys::PENDING, &keys::prefix_end(keys::PENDING), usize::MAX)
        .unwrap()
    {
        strip.remove(key);
    }
    strip.remove(keys::META_PENDING_INDEX.to_vec());
    kv.apply(strip).unwrap();
    let store = open_test_store(Box::new(kv.clone()), StoreOptions::default(), &clock);
    assert_eq!(
        ids(&store
            .next_upload_batch(BatchLimits::of(10, usize::MAX))
            .unwrap()
            .entries),
        [a, b]
    );
}

#[test]
fn remote_changes_apply_once_and_make_no_queue_entries() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let origin = t.store();
    origin
        .write(put("Note", "n", json!({"text": "hi"})))
        .unwrap();
    origin
        .write(patch("Note", "n", json!({"more": 1})))
        .unwrap();
    origin
        .write(Write::Delete {
            collection: "Note".into(),
            id: "n".into(),
        })
        .unwrap();
    origin.write(put("Note", "m", json!({"x": 1}))).unwrap();
    let log = as_log(origin, 0, 1);

    let receiver = other_store(&MemoryKv::new());
    assert_eq!(receiver.sync_cursor().unwrap(), 0);
    let applied = receiver.apply_remote(&log[..2], 2).unwrap().applied;
    assert_eq!(applied.len(), 1, "two changes, one record");
    assert_eq!(applied[0].operation, ferry_proto::Operation::Create);
    assert_eq!(applied[0].device, common::TEST_DEVICE);
    let applied = receiver.apply_remote(&log, 4).unwrap().applied;
    let summary: Vec<_> = applied
        .iter()
        .map(|a| (a.id.as_str(), a.operation, a.deleted))
        .collect();
    assert_eq!(
        summary,
        [
            ("n", ferry_proto::Operation::Delete, true),
            ("m", ferry_proto::Operation::Create, false)
        ]
    );
    assert!(
        receiver.apply_remote(&log, 4).unwrap().applied.is_empty(),
        "idempotent"
    );
    assert_eq!(receiver.sync_cursor().unwrap(), 4);
    assert!(receiver.queue(None, None, 10).unwrap().is_empty());
    for id in ["n", "m"] {
        assert_eq!(
            receiver.export_doc("Note", id).unwrap(),
            origin.export_doc("Note", id).unwrap()
        );
    }
    assert!(matches!(
        receiver.get("Note", "n"),
        Err(StoreError::NotFound { .. })
    ));
    // An older answer arriving late does not move the cursor back.
    receiver.apply_remote(&log[..1], 1).unwrap();
    assert_eq!(receiver.sync_cursor().unwrap(), 4);
}

#[test]
fn a_record_another_device_created_is_kept_as_its_change_and_behaves_as_any_other() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let origin = t.store();
    origin
        .write(put("Doc", "d", json!({"title": "first", "n": 1})))
        .unwrap();
    let log = as_log(origin, 0, 1);
    let kv = MemoryKv::new();
    let receiver = other_store(&kv);
    let applied = receiver.apply_remote(&log, 1).unwrap().applied;
    assert_eq!(
        (applied.len(), applied[0].operation, applied[0].deleted),
        (1, ferry_proto::Operation::Create, false)
    );
    assert_eq!(applied[0].heads, origin.get("Doc", "d").unwrap().heads);
    // Kept as it came: the change's own bytes are the record's document, stored in the short
    // form its view implies.
    let keyspace =
        ferry::store::paired::Paired::open(Box::new(kv.clone()), ferry::store::implied::expand)
            .unwrap();
    assert_eq!(
        keyspace.get(&keys::doc("Doc", "d")).unwrap().as_deref(),
        Some(&log[0].change[..])
    );
    let pair = kv.get(&keys::doc("Doc", "d")).unwrap().unwrap();
    let view = keyspace.get(&keys::view("Doc", "d")).unwrap().unwrap();
    assert!(
        pair.len() < view.len() + 64,
        "pair {} bytes, view {}",
        pair.len(),
        view.len()
    );
    assert_eq!(
        receiver.get("Doc", "d").unwrap(),
        origin.get("Doc", "d").unwrap()
    );
    assert_eq!(receiver.history("Doc", "d").unwrap().len(), 1);
    // Both go on writing to it, concurrently, and meet each other's changes as usual.
    receiver
        .write(patch("Doc", "d", json!({"n": 2, "by_receiver": true})))
        .unwrap();
    origin
        .write(patch("Doc", "d", json!({"title": "second"})))
        .unwrap();
    receiver.apply_remote(&as_log(origin, 1, 2), 2).unwrap();
    origin.apply_remote(&as_log(&receiver, 0, 3), 3).unwrap();
    let (a, b) = (
        origin.get("Doc", "d").unwrap(),
        receiver.get("Doc", "d").unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(
        (
            &a.fields.get("title").unwrap(),
            &a.fields.get("n").unwrap(),
            &a.fields.get("by_receiver").unwrap()
        ),
        (&json!("second"), &json!(2), &json!(true))
    );
}

#[test]
fn two_devices_exchanging_changes_converge() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let a = t.store();
    let b = other_store(&MemoryKv::new());
    a.write(put("Doc", "shared", json!({"title": "a", "n": 1})))
        .unwrap();
    b.apply_remote(&as_log(a, 0, 1), 1).unwrap();
    let (a_mark, b_mark) = (a.queue(None, None, 100).unwrap().len() as u64, 0);
    // Concurrent edits, including to the same field, and records only one side has.
    a.write(patch(
        "Doc",
        "shared",
        json!({"title": "from a", "a": true}),
    ))
    .unwrap();
    a.write(put("Doc", "only-a", json!({"v": 1}))).unwrap();
    b.write(patch(
        "Doc",
        "shared",
        json!({"title": "from b", "b": true}),
    ))
    .unwrap();
    b.write(put("Doc", "only-b", json!({"v": 2}))).unwrap();
    b.apply_remote(&as_log(a, a_mark, 2), 3).unwrap();
    a.apply_remote(&as_log(&b, b_mark, 4), 5).unwrap();
    // Same heads, fields and set of changes. The saved bytes may still differ: Automerge saves
    // concurrent changes in the order each document received them.
    for id in ["shared", "only-a", "only-b"] {
        assert_eq!(a.get("Doc", id).unwrap(), b.get("Doc", id).unwrap(), "{id}");
        let changes = |s: &Store| {
            let mut hashes: Vec<String> = s
                .history("Doc", id)
                .unwrap()
                .into_iter()
                .map(|h| h.hash)
                .collect();
            hashes.sort();
            hashes
        };
        assert_eq!(changes(a), changes(&b), "{id}");
    }
    let shared = a.get("Doc", "shared").unwrap().fields.parse().unwrap();
    assert_eq!(
        (shared["a"].clone(), shared["b"].clone()),
        (json!(true), json!(true))
    );
}

#[test]
fn the_cursor_lands_with_the_documents_or_not_at_all() {
    let origin = written(vec![
        put("Note", "1", json!({"a": 1})),
        patch("Note", "1", json!({"b": 2})),
    ]);
    let log = as_log(origin.store(), 0, 1);
    let kv = MemoryKv::new();
    let receiver = other_store(&kv);
    receiver.apply_remote(&log, 2).unwrap();
    kv.crash();
    let receiver = other_store(&kv);
    assert_eq!(
        receiver.sync_cursor().unwrap(),
        0,
        "not flushed: cursor gone"
    );
    assert!(
        receiver.export_doc("Note", "1").is_err(),
        "and so is the record"
    );

    receiver.apply_remote(&log, 2).unwrap();
    receiver.flush().unwrap();
    kv.crash();
    let receiver = other_store(&kv);
    assert_eq!(receiver.sync_cursor().unwrap(), 2);
    assert_eq!(
        receiver.get("Note", "1").unwrap().fields,
        fields(json!({"a": 1, "b": 2}))
    );
}

#[test]
fn a_local_write_during_a_remote_apply_keeps_both() {
    const ROUNDS: u64 = 50;
    let origin = TestStore::new(Engine::Memory, StoreOptions::default());
    let o = origin.store();
    o.write(put("Doc", "r", json!({"remote": 0}))).unwrap();
    for n in 1..=ROUNDS {
        o.write(patch("Doc", "r", json!({"remote": n}))).unwrap();
    }
    let log = as_log(o, 0, 1);
    let options = StoreOptions {
        cache_docs: 1,
        ..StoreOptions::default()
    };
    let device = Store::open(
        Box::new(MemoryKv::new()),
        OTHER_DEVICE,
        options,
        StepClock::new(),
    )
    .unwrap();
    device.apply_remote(&log[..1], 1).unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for (i, entry) in log.iter().enumerate().skip(1) {
                device
                    .apply_remote(std::slice::from_ref(entry), i as u64 + 1)
                    .unwrap();
            }
        });
        scope.spawn(|| {
            for n in 1..=ROUNDS {
                device
                    .write(patch("Doc", "r", json!({"local": n})))
                    .unwrap();
                // Another record between, so the small cache has to evict `r`.
                device.write(put("Doc", "other", json!({"n": n}))).unwrap();
            }
        });
    });
    let r = device.get("Doc", "r").unwrap().fields;
    assert_eq!(r, fields(json!({"remote": ROUNDS, "local": ROUNDS})));
    let history = device.history("Doc", "r").unwrap();
    assert_eq!(history.len() as u64, 1 + ROUNDS + ROUNDS);
    let queued = device
        .queue(None, None, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| e.object_id == "r")
        .count();
    assert_eq!(queued as u64, ROUNDS, "only the local changes are queued");
}

#[test]
fn the_service_applies_remote_changes_through_its_committer_and_says_so() {
    let origin = TestStore::new(Engine::Memory, StoreOptions::default());
    origin
        .store()
        .write(put("Note", "1", json!({"a": 1})))
        .unwrap();
    let log = as_log(origin.store(), 0, 7);
    let kv = MemoryKv::new();
    let service = Service::new(
        Arc::new(other_store(&kv)),
        ServiceOptions {
            data_dir: "unused".into(),
            socket: "unused".into(),
            max_import_records: 10,
            max_list_limit: 10,
            group_commit_max: 8,
            daemon: true,
        },
    );
    let mut events = service.subscribe_events();
    let applied = service.apply_remote(log.clone(), 7).unwrap().applied;
    assert_eq!(applied.len(), 1);
    kv.crash();
    assert_eq!(
        service.store().sync_cursor().unwrap(),
        7,
        "durable when answered"
    );
    let event = events.try_recv().unwrap();
    assert_eq!(event.origin, Origin::Remote);
    assert_eq!(event.device, common::TEST_DEVICE);
    assert_eq!(
        serde_json::to_value(&event).unwrap()["origin"],
        json!("remote")
    );
    service.call(patch_note(json!({"b": 2}))).unwrap();
    let event = events.try_recv().unwrap();
    assert_eq!(
        (event.origin, event.device.as_str()),
        (Origin::Local, OTHER_DEVICE)
    );
    assert!(service.apply_remote(log, 7).unwrap().applied.is_empty());
    assert!(events.try_recv().is_err(), "nothing changed, nothing said");
    let queue = service.call(api::QueueParams::default()).unwrap();
    assert_eq!(queue.counts.pending, 1);
    service.shutdown().unwrap();
}

/// The queue counts as a count of every entry would give them.
fn counted(store: &Store) -> ferry::store::QueueCounts {
    let mut counts = ferry::store::QueueCounts::default();
    for entry in store.queue(None, None, usize::MAX).unwrap() {
        counts.count(entry.status);
    }
    counts
}

#[test]
fn queue_counts_stay_right_through_every_kind_of_move() {
    let t = TestStore::new(Engine::Memory, StoreOptions::default());
    let s = t.store();
    assert_eq!(s.queue_counts().unwrap(), counted(s), "the first ask scans");
    let entries: Vec<u64> = (0..6)
        .map(|n| queue_id(s, put("Job", &n.to_string(), json!({"n": n}))))
        .collect();
    assert_eq!(s.queue_counts().unwrap(), counted(s), "after local writes");
    s.next_upload_batch(BatchLimits::of(4, usize::MAX)).unwrap();
    assert_eq!(
        s.queue_counts().unwrap(),
        counted(s),
        "after taking a batch"
    );
    s.finish_upload(
        &[
            stored(entries[0], 1),
            rejected(entries[1], ErrorCode::InvalidChange),
            rejected(entries[2], ErrorCode::Overloaded),
        ],
        &RetryPolicy::immediate(5),
    )
    .unwrap();
    assert_eq!(
        s.queue_counts().unwrap(),
        counted(s),
        "after an upload's answers"
    );
    s.abandon_upload(
        &[entries[3]],
        "timeout: no answer",
        ErrorKind::Timeout,
        &RetryPolicy::immediate(5),
    )
    .unwrap();
    assert_eq!(
        s.queue_counts().unwrap(),
        counted(s),
        "after an abandoned upload"
    );
    s.queue_transition(&[entries[1]], &ferry::store::QueueAction::Retry)
        .unwrap();
    assert_eq!(s.queue_counts().unwrap(), counted(s), "after a retry");
    s.next_upload_batch(BatchLimits::of(10, usize::MAX))
        .unwrap();
    s.recover_interrupted().unwrap();
    let counts = s.queue_counts().unwrap();
    assert_eq!(counts, counted(s), "after recovering interrupted uploads");
    assert_eq!(
        (
            counts.pending,
            counts.processing,
            counts.completed,
            counts.failed
        ),
        (5, 0, 1, 0)
    );
}

/// Log entries as a relay that did not validate uploads could have logged them (see
/// `a_log_entry_that_cannot_be_applied_is_quarantined_and_the_rest_applied`).
fn forged(entry: &LogEntry, seq: u64, forgery: ferry::fuzzing::Forgery) -> LogEntry {
    let change = ferry::record::decode_change(&entry.change).unwrap();
    LogEntry {
        seq,
        change: ferry::fuzzing::forge(&change, forgery).unwrap(),
        ..entry.clone()
    }
}

fn renumbered(entry: &LogEntry, seq: u64) -> LogEntry {
    LogEntry {
        seq,
        ..entry.clone()
    }
}

#[test]
fn a_log_entry_that_cannot_be_applied_is_quarantined_and_the_rest_applied() {
    use ferry::fuzzing::Forgery;
    let origin = written(vec![
        put("Note", "1", json!({"a": 1})),
        patch("Note", "1", json!({"b": 2})),
        put("Note", "2", json!({"c": 3})),
    ]);
    let good = as_log(origin.store(), 0, 1);
    let mut truncated = renumbered(&good[2], 5);
    truncated.change.pop();
    let kills = forged(&good[1], 2, Forgery::MissingObject);
    let log = vec![
        renumbered(&good[0], 1),
        // Automerge panics applying it.
        kills.clone(),
        renumbered(&good[1], 3),
        // The same actor and sequence number as the entry before: a second "seq 2".
        forged(&good[1], 4, Forgery::Time(1)),
        // Not a change at all.
        truncated,
        renumbered(&good[2], 6),
        // Built on the entry that could not be applied.
        forged(
            &good[1],
            7,
            Forgery::Deps(vec![
                ferry::record::decode_change(&kills.change).unwrap().hash(),
            ]),
        ),
    ];
    let kv = MemoryKv::new();
    let receiver = other_store(&kv);
    let outcome = receiver.apply_remote(&log, 7).unwrap();
    let seqs: Vec<u64> = outcome.quarantined.iter().map(|q| q.seq).collect();
    assert_eq!(
        seqs,
        [5, 2, 4, 7],
        "decoding first, then per record in log order"
    );
    for q in &outcome.quarantined {
        assert!(!q.reason.is_empty());
        assert_eq!(q.collection, "Note");
    }
    receiver.flush().unwrap();
    kv.crash();
    let receiver = other_store(&kv);
    assert_eq!(
        receiver.sync_cursor().unwrap(),
        7,
        "the device moved past them"
    );
    assert_eq!(
        receiver.get("Note", "1").unwrap().fields,
        fields(json!({"a": 1, "b": 2}))
    );
    assert_eq!(
        receiver.get("Note", "2").unwrap().fields,
        fields(json!({"c": 3}))
    );
    let (count, kept) = receiver.quarantined(10).unwrap();
    assert_eq!(count, 4);
    assert_eq!(
        kept.iter()
            .map(|q| (q.seq, q.record.as_str()))
            .collect::<Vec<_>>(),
        [(2, "1"), (4, "1"), (5, "2"), (7, "1")]
    );
    assert_eq!(kept[0].change, kills.change, "kept as the relay sent it");
    assert!(
        kept[0].reason.contains("Automerge failed"),
        "{}",
        kept[0].reason
    );

    // Later entries apply as usual.
    origin
        .store()
        .write(patch("Note", "1", json!({"d": 4})))
        .unwrap();
    let next = as_log(origin.store(), 3, 8);
    let outcome = receiver.apply_remote(&next, 8).unwrap();
    assert!(outcome.quarantined.is_empty());
    assert_eq!(
        receiver.get("Note", "1").unwrap().fields,
        fields(json!({"a": 1, "b": 2, "d": 4}))
    );
}

/// A snapshot page loads its new records a few hundred at a time and keeps their documents only
/// where they are read again: a quarantined entry that a document in the middle of a large page
/// holds (past the first few hundred records) is released all the same, and every record reads
/// back.
#[test]
fn a_large_snapshot_page_releases_the_quarantined_entries_its_documents_hold() {
    let count = 1700;
    let held = "0600";
    let mut writes: Vec<Write> = (0..count)
        .map(|i| put("Note", &format!("{i:04}"), json!({ "i": i })))
        .collect();
    writes.push(patch("Note", held, json!({"j": 1})));
    let origin = written(writes);
    let log = as_log(origin.store(), 0, 1);
    let head = log.len() as u64;
    let receiver = other_store(&MemoryKv::new());
    // The patch alone, before the record it builds on: its dependencies are missing.
    let patch_entry = log.last().unwrap().clone();
    let outcome = receiver.apply_remote(&[patch_entry], head).unwrap();
    assert_eq!(outcome.quarantined.len(), 1);

    let records: Vec<ferry_proto::wire::SnapshotRecord> = (0..count)
        .map(|i| {
            let id = format!("{i:04}");
            ferry_proto::wire::SnapshotRecord {
                collection: "Note".into(),
                document: origin.store().export_doc("Note", &id).unwrap(),
                record: id,
                conflicts: b"[]".to_vec(),
            }
        })
        .collect();
    let page = ferry_proto::wire::SnapshotPage {
        head,
        horizon: head,
        last: records.last().map(|r| ferry_proto::wire::RecordName {
            collection: r.collection.clone(),
            record: r.record.clone(),
        }),
        records,
        complete: true,
    };
    receiver.apply_snapshot_page(&page).unwrap();
    assert_eq!(
        receiver.quarantined(10).unwrap().0,
        0,
        "the page's document of Note/{held} holds the quarantined change"
    );
    assert_eq!(
        receiver.get("Note", held).unwrap().fields,
        fields(json!({"i": 600, "j": 1}))
    );
    let (listed, next) = receiver.list("Note", None, 2 * count).unwrap();
    assert!(next.is_none());
    assert_eq!(listed.len(), count);
    for (i, view) in listed.iter().enumerate() {
        assert_eq!(view.fields.get("i"), Some(json!(i)), "Note/{}", view.id);
    }
}

/// Quarantined entries are pruned once the relay no longer needs the device to keep them: when
/// their record's history is purged, by a purge entry met in the log or found in a snapshot.
#[test]
fn quarantined_entries_go_with_their_records_purged_history() {
    use ferry::fuzzing::Forgery;
    let origin = written(vec![
        put("Note", "1", json!({"a": 1})),
        patch("Note", "1", json!({"b": 2})),
        put("Note", "2", json!({"c": 3})),
    ]);
    let good = as_log(origin.store(), 0, 1);
    let mut truncated = renumbered(&good[2], 4);
    truncated.change.pop();
    let log = vec![
        renumbered(&good[0], 1),
        forged(&good[1], 2, Forgery::MissingObject),
        renumbered(&good[2], 3),
        truncated,
    ];
    let receiver = other_store(&MemoryKv::new());
    let outcome = receiver.apply_remote(&log, 4).unwrap();
    assert_eq!(outcome.quarantined.len(), 2);
    assert_eq!(receiver.quarantined(10).unwrap().0, 2);

    let purge = LogEntry::purge(5, "Note".into(), "1".into());
    receiver.apply_remote(&[purge], 5).unwrap();
    let (count, kept) = receiver.quarantined(10).unwrap();
    assert_eq!(count, 1, "Note/1's entry goes with its history");
    assert_eq!((kept[0].seq, kept[0].record.as_str()), (4, "2"));

    // A snapshot past Note/2's purge entry: the page no longer lists it.
    let page = ferry_proto::wire::SnapshotPage {
        head: 7,
        horizon: 7,
        records: Vec::new(),
        last: None,
        complete: true,
    };
    receiver.apply_snapshot_page(&page).unwrap();
    assert!(matches!(
        receiver.get("Note", "2"),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(receiver.quarantined(10).unwrap().0, 0);
}

#[test]
fn a_change_under_this_devices_actor_that_it_does_not_hold_is_not_taken_for_its_own() {
    use ferry::fuzzing::Forgery;
    // The other device writes Note/1 and, offline, changes it; someone else uploaded a change
    // under its actor with the same sequence number first, which an old relay logged.
    let kv = MemoryKv::new();
    let device = other_store(&kv);
    device.write(put("Note", "1", json!({"a": 1}))).unwrap();
    let created = as_log(&device, 0, 1);
    device.apply_remote(&created, 1).unwrap();
    device.write(patch("Note", "1", json!({"a": 2}))).unwrap();
    let own = as_log(&device, 1, 3);
    let impostor = forged(&own[0], 2, Forgery::Time(1));
    let outcome = device
        .apply_remote(&[impostor.clone(), own[0].clone()], 3)
        .unwrap();
    let seqs: Vec<u64> = outcome.quarantined.iter().map(|q| q.seq).collect();
    assert_eq!(seqs, [2], "the impostor is not its own write coming back");
    assert_eq!(
        device.get("Note", "1").unwrap().fields,
        fields(json!({"a": 2}))
    );

    // A device that never wrote applies the impostor, and quarantines the real change: both
    // devices say which entry they left out.
    let kv = MemoryKv::new();
    let other = Store::open(
        Box::new(kv.clone()),
        common::OTHER_DEVICE,
        StoreOptions::default(),
        StepClock::new(),
    )
    .unwrap();
    let outcome = other
        .apply_remote(&[created[0].clone(), impostor, own[0].clone()], 3)
        .unwrap();
    let seqs: Vec<u64> = outcome.quarantined.iter().map(|q| q.seq).collect();
    assert_eq!(seqs, [3]);
}

#[test]
fn a_change_automerge_panics_on_leaves_the_committer_and_later_writes_working() {
    let origin = written(vec![
        put("Note", "1", json!({"a": 1})),
        patch("Note", "1", json!({"b": 2})),
    ]);
    let good = as_log(origin.store(), 0, 1);
    let kills = forged(&good[1], 2, ferry::fuzzing::Forgery::MissingObject);
    let service = Service::new(
        Arc::new(other_store(&MemoryKv::new())),
        ServiceOptions {
            data_dir: "unused".into(),
            socket: "unused".into(),
            max_import_records: 10,
            max_list_limit: 10,
            group_commit_max: 8,
            daemon: true,
        },
    );
    let outcome = service
        .apply_remote(vec![good[0].clone(), kills], 2)
        .unwrap();
    assert_eq!(outcome.quarantined.len(), 1);
    // The committer thread lives on: local writes and the rest of the log go through it.
    service.call(patch_note(json!({"c": 3}))).unwrap();
    service
        .apply_remote(vec![renumbered(&good[1], 3)], 3)
        .unwrap();
    let status = service.call(api::StatusParams {}).unwrap();
    let quarantined = status.contents.expect("the store's contents").quarantined;
    assert_eq!(quarantined.count, 1);
    assert_eq!(quarantined.entries[0].seq, 2);
    let record = service.call(api::GetParams::new("Note", "1")).unwrap();
    assert_eq!(
        Value::Object(record.fields.parse().unwrap()),
        json!({"a": 1, "b": 2, "c": 3})
    );
}

/// A `patch` of Note/1 setting `set`.
fn patch_note(set: Value) -> api::PatchParams {
    api::PatchParams {
        collection: "Note".into(),
        id: "1".into(),
        fields: set.as_object().cloned().expect("an object"),
        unset: Vec::new(),
    }
}

#[test]
fn an_entry_leaving_a_document_that_cannot_be_loaded_is_quarantined_and_the_record_stays_readable()
{
    // Simulation seed 14's log, as a relay that did not reload documents logged it: the second
    // hostile change applies, but the document it leaves cannot be loaded once saved.
    let [created, first, second] = common::seed_14_changes();
    let entry = |seq: u64, change: &[u8]| LogEntry {
        seq,
        collection: "Note".into(),
        record: "1".into(),
        change: change.to_vec(),
    };
    let mut honest = ferry::record::Record::new(&automerge::ActorId::from(&[7u8; 16][..]));
    honest
        .apply_changes(&[created.clone(), first.clone()])
        .unwrap();
    let after = honest
        .patch(&fields(json!({"total": 1})), &[], 1)
        .unwrap()
        .unwrap()
        .change;
    let log = [
        entry(1, &created),
        entry(2, &first),
        entry(3, &second),
        entry(4, after.raw_bytes()),
    ];

    // One device gets the whole log in one page, another one entry at a time: both leave the
    // entry out, store a document that loads, and go on.
    for pages in [vec![&log[..]], log.chunks(1).collect()] {
        let kv = MemoryKv::new();
        let receiver = other_store(&kv);
        let mut quarantined = Vec::new();
        for page in pages {
            let through = page.last().unwrap().seq;
            let outcome = receiver.apply_remote(page, through).unwrap();
            quarantined.extend(outcome.quarantined);
        }
        assert_eq!(quarantined.iter().map(|q| q.seq).collect::<Vec<_>>(), [3]);
        assert!(
            quarantined[0].reason.contains("cannot load again"),
            "{}",
            quarantined[0].reason
        );
        receiver.flush().unwrap();
        kv.crash();
        let receiver = other_store(&kv);
        assert_eq!(receiver.sync_cursor().unwrap(), 4);
        assert_eq!(
            receiver.get("Note", "1").unwrap().fields,
            fields(json!({"city": "v2", "total": 1}))
        );
        assert_eq!(receiver.quarantined(10).unwrap().0, 1);
    }
}

#[test]
fn own_entries_left_out_by_the_relay_are_rebuilt_from_the_queue_in_log_order() {
    let device = written(vec![
        put("Doc", "a", json!({"n": 1})),
        put("Doc", "b", json!({"n": 2})),
    ]);
    let store = device.store();
    let uploaded = as_log(store, 0, 2);
    let first = uploaded[0].clone();
    let second = uploaded[1].clone();
    // The relay sent entry 1 (another device's) and 4, and left out 2 and 3, this device's.
    let others = written(vec![
        put("Doc", "c", json!({"n": 3})),
        put("Doc", "d", json!({"n": 4})),
    ]);
    let mut from_relay = as_log(others.store(), 0, 1);
    from_relay[1].seq = 4;
    let own = [OwnEntry { seq: 2, entry: 1 }, OwnEntry { seq: 3, entry: 2 }];
    let merged = store.with_own_entries(from_relay.clone(), &own).unwrap();
    let seqs: Vec<u64> = merged.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!((&merged[1], &merged[2]), (&first, &second));
    assert_eq!((&merged[0], &merged[3]), (&from_relay[0], &from_relay[1]));

    // A queue entry that is gone cannot stand in for its log entry: the session must end.
    let gone = OwnEntry { seq: 9, entry: 99 };
    assert!(matches!(
        store.with_own_entries(Vec::new(), &[gone]),
        Err(StoreError::OwnEntryGone { seq: 9, entry: 99 })
    ));
}

#[test]
fn completed_entries_keep_their_changes_hash_and_own_entries_read_the_change_from_the_document() {
    let device = written(vec![
        put("Doc", "a", json!({"n": 1})),
        put("Doc", "b", json!({"n": 2})),
        patch("Doc", "b", json!({"n": 3})),
    ]);
    let store = device.store();
    let uploaded = as_log(store, 0, 1);
    let batch = store
        .next_upload_batch(BatchLimits::of(10, usize::MAX))
        .unwrap()
        .entries;
    let results: Vec<ChangeResult> = batch.iter().map(|e| stored(e.id, e.id)).collect();
    assert_eq!(
        store
            .finish_upload(&results, &RetryPolicy::immediate(5))
            .unwrap()
            .completed,
        3
    );
    // Completed, each entry keeps its change until the change comes back in the log.
    let entries = store.queue(None, None, 10).unwrap();
    assert!(entries.iter().all(|e| e.status == QueueStatus::Completed));
    let held: Vec<Vec<u8>> = entries.into_iter().map(|e| e.data).collect();
    let changes: Vec<Vec<u8>> = uploaded.iter().map(|e| e.change.clone()).collect();
    assert_eq!(held, changes);
    let own: Vec<OwnEntry> = (1..=3).map(|id| OwnEntry { seq: id, entry: id }).collect();
    assert_eq!(store.with_own_entries(Vec::new(), &own).unwrap(), uploaded);
    // Back, they keep their changes' hashes and lengths only.
    for (entry, change) in store.queue(None, None, 10).unwrap().iter().zip(&uploaded) {
        assert_eq!(entry.data.len(), 37);
        let held = ferry::store::completed::Held::of(&entry.data);
        assert_eq!(held.change_bytes(), change.change.len());
        assert_eq!(
            held.hash(),
            ferry::record::change_header(&change.change)
                .ok()
                .map(|h| h.hash)
        );
    }
    // Read again (a download asking for the same span), they come from the documents: a
    // record made by one change, and one whose document holds two.
    assert_eq!(store.with_own_entries(Vec::new(), &own).unwrap(), uploaded);
}

/// A device syncing only `Customer` that adds `Invoice` reads the log from its start again:
/// the entries of `Customer` it applied before are passed over, the invoices arrive, the
/// customers and their conflict stay as they were, and the backfill ends once the log is read
/// to where the device had read it.
#[test]
fn a_collection_added_to_sync_is_backfilled_without_applying_the_others_twice() {
    let origin = written(vec![put("Customer", "c", json!({"v": 0}))]);
    let x = origin.store();
    let created = as_log(x, 0, 1);
    let y = Store::open(
        Box::new(MemoryKv::new()),
        "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c",
        StoreOptions::default(),
        StepClock::new(),
    )
    .unwrap();
    y.apply_remote(&created, 1).unwrap();
    // Concurrent edits of one field: an update-update conflict.
    x.write(patch("Customer", "c", json!({"v": "x"}))).unwrap();
    y.write(patch("Customer", "c", json!({"v": "y"}))).unwrap();
    x.write(put("Invoice", "i", json!({"n": 1}))).unwrap();
    let mut log = created;
    log.push(renumbered(&as_log(x, 1, 2)[0], 2));
    log.push(renumbered(&as_log(&y, 0, 3)[0], 3));
    log.push(renumbered(&as_log(x, 2, 4)[0], 4));
    assert_eq!(log[3].collection, "Invoice");

    let only = |names: &[&str]| StoreOptions {
        synced_collections: Some(names.iter().map(|n| n.to_string()).collect()),
        ..StoreOptions::default()
    };
    let kv = MemoryKv::new();
    let open = |options: StoreOptions| {
        Store::open(
            Box::new(kv.clone()),
            OTHER_DEVICE,
            options,
            StepClock::new(),
        )
        .unwrap()
    };
    let receiver = open(only(&["Customer"]));
    // What the relay sends a session syncing Customer: its entries, the cursor to the head.
    let customers: Vec<LogEntry> = log
        .iter()
        .filter(|e| e.collection == "Customer")
        .cloned()
        .collect();
    receiver.apply_remote(&customers, 4).unwrap();
    let detected = |store: &Store| -> u64 {
        store
            .conflict_counts()
            .unwrap()
            .iter()
            .map(|c| c.detected)
            .sum()
    };
    assert_eq!(detected(&receiver), 1);
    assert_eq!(receiver.sync_cursor().unwrap(), 4);
    let shown = receiver.get("Customer", "c").unwrap().fields;
    receiver.flush().unwrap();
    drop(receiver);

    let receiver = open(only(&["Customer", "Invoice"]));
    assert_eq!(receiver.sync_cursor().unwrap(), 0, "the log is read again");
    let backfill = receiver.backfill().unwrap().expect("a backfill");
    assert_eq!(backfill.through, 4);
    receiver.apply_remote(&log[..2], 2).unwrap();
    assert!(receiver.backfill().unwrap().is_some(), "not read to 4 yet");
    receiver.apply_remote(&log[2..], 4).unwrap();
    assert_eq!(receiver.backfill().unwrap(), None);
    assert_eq!(detected(&receiver), 1, "the conflict is not found twice");
    assert_eq!(receiver.conflicts(None, None, None, 10).unwrap().len(), 1);
    assert_eq!(receiver.get("Customer", "c").unwrap().fields, shown);
    assert_eq!(
        receiver.get("Invoice", "i").unwrap().fields,
        fields(json!({"n": 1}))
    );
    // Writes to a collection it does not sync are refused.
    drop(receiver);
    let receiver = open(only(&["Invoice"]));
    assert!(matches!(
        receiver.write(put("Customer", "d", json!({}))),
        Err(StoreError::NotSynced(_))
    ));
}
