//! The SyncQueue and SyncLog at the store level, and the atomicity of a write with its queue
//! entry: every queue move from every status (allowed moves persist across a reopen, refused ones
//! change nothing, a batch of moves is all or nothing), recovery of interrupted uploads, SyncLog
//! order and paging, and writes that are lost in a crash, refused, or fail in the engine leaving
//! no document, no queue entry and no cached trace behind.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{
    Engine, FaultyKv, StepClock, TestStore, assert_queue_matches_history, fields, open_test_store,
    put,
};
use ferry::record::{Fields, RecordError};
use ferry::store::{QueueAction, Store, StoreError, StoreOptions, Write};
use ferry_proto::{
    Direction, Operation, QueueStatus, SyncLogEntry, SyncOutcome, SyncQueueEntry, TransitionError,
};
use serde_json::{Value, json};

fn patch(collection: &str, id: &str, set: Value, unset: &[&str]) -> Write {
    Write::Patch {
        collection: collection.into(),
        id: id.into(),
        set: fields(set),
        unset: unset.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn delete(collection: &str, id: &str) -> Write {
    Write::Delete {
        collection: collection.into(),
        id: id.into(),
    }
}

fn queue(store: &Store) -> Vec<SyncQueueEntry> {
    store.queue(None, None, usize::MAX).expect("queue")
}

fn entry(store: &Store, id: u64) -> SyncQueueEntry {
    store
        .queue(None, Some(id - 1), 1)
        .expect("queue")
        .into_iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("queue entry {id} is missing"))
}

fn sled() -> TestStore {
    TestStore::new(Engine::Sled, StoreOptions::default())
}

fn memory(options: StoreOptions) -> TestStore {
    TestStore::new(Engine::Memory, options)
}

/// Makes a record and returns its queue entry's id.
fn new_entry(store: &Store, id: &str) -> u64 {
    let applied = store
        .write(put("Job", id, json!({ "n": id })))
        .expect("put");
    applied.queue_id.expect("a queue entry")
}

/// Drives a fresh pending entry into `status`.
fn bring_to(store: &Store, id: u64, status: QueueStatus) {
    let moves: &[QueueAction] = match status {
        QueueStatus::Pending => &[],
        QueueStatus::Processing => &[QueueAction::Start],
        QueueStatus::Completed => &[QueueAction::Start, QueueAction::Complete],
        QueueStatus::Failed => &[
            QueueAction::Start,
            QueueAction::Fail {
                error: "setup: relay said no".into(),
                max_retries: 1,
            },
        ],
    };
    for m in moves {
        store.queue_transition(&[id], m).expect("setup move");
    }
    assert_eq!(entry(store, id).status, status);
}

/// What an action does to an entry in `from`, or `None` when it is refused.
fn expected_move(from: &SyncQueueEntry, action: &QueueAction, now: u64) -> Option<SyncQueueEntry> {
    let mut e = from.clone();
    e.updated_at = now;
    match (action, from.status) {
        (QueueAction::Start, QueueStatus::Pending) => e.status = QueueStatus::Processing,
        (QueueAction::Complete, QueueStatus::Processing) => {
            e.status = QueueStatus::Completed;
            e.last_error = None;
        }
        (QueueAction::Fail { error, max_retries }, QueueStatus::Processing) => {
            e.retry_count += 1;
            e.last_error = Some(error.clone());
            e.status = if e.retry_count >= *max_retries {
                QueueStatus::Failed
            } else {
                QueueStatus::Pending
            };
        }
        (QueueAction::Retry, QueueStatus::Failed) => {
            e.status = QueueStatus::Pending;
            e.retry_count = 0;
        }
        (QueueAction::RequeueInterrupted, QueueStatus::Processing) => {
            e.status = QueueStatus::Pending
        }
        _ => return None,
    }
    Some(e)
}

fn actions() -> Vec<QueueAction> {
    vec![
        QueueAction::Start,
        QueueAction::Complete,
        QueueAction::Fail {
            error: "network: relay unreachable".into(),
            max_retries: 3,
        },
        QueueAction::Fail {
            error: "server: 500".into(),
            max_retries: 1,
        },
        QueueAction::Retry,
        QueueAction::RequeueInterrupted,
    ]
}

#[test]
fn every_action_from_every_status_moves_or_is_refused_and_moves_persist() {
    let mut s = sled();
    let mut expected_after = Vec::new();
    let mut allowed = 0;
    for (n, action) in actions().into_iter().enumerate() {
        for status in QueueStatus::ALL {
            let id = new_entry(s.store(), &format!("{n}-{}", status.as_str()));
            bring_to(s.store(), id, status);
            let before = entry(s.store(), id);
            let queue_before = queue(s.store());
            let now = s.clock.peek();
            let result = s.store().queue_transition(&[id], &action);
            match expected_move(&before, &action, now) {
                Some(want) => {
                    allowed += 1;
                    let got = result
                        .unwrap_or_else(|e| panic!("{action:?} from {status:?} was refused: {e}"));
                    assert_eq!(
                        got,
                        std::slice::from_ref(&want),
                        "{action:?} from {status:?}"
                    );
                    assert_eq!(entry(s.store(), id), want, "{action:?} from {status:?}");
                    assert_eq!(want.created_at, before.created_at);
                    assert_eq!(want.data, before.data);
                    expected_after.push(want);
                }
                None => {
                    match result {
                        Err(StoreError::Transition(TransitionError { id: e, from, .. })) => {
                            assert_eq!((e, from), (id, status.as_str()), "{action:?}");
                        }
                        other => panic!("{action:?} from {status:?}: {other:?}"),
                    }
                    assert_eq!(
                        queue(s.store()),
                        queue_before,
                        "a refused move changed the queue"
                    );
                    expected_after.push(before);
                }
            }
        }
    }
    // Start from pending; complete, fail (twice) and requeue from processing; retry from failed.
    assert_eq!(allowed, 6);
    s.reopen();
    assert_eq!(queue(s.store()), expected_after, "after reopen");
}

#[test]
fn a_batch_of_moves_with_one_illegal_move_changes_nothing() {
    let mut s = sled();
    let a = new_entry(s.store(), "a");
    let b = new_entry(s.store(), "b");
    let c = new_entry(s.store(), "c");
    bring_to(s.store(), c, QueueStatus::Completed);
    let p = new_entry(s.store(), "p");
    bring_to(s.store(), p, QueueStatus::Processing);
    s.reopen();
    let before = queue(s.store());

    let refused = [
        (vec![a, b, c], QueueAction::Start),
        (vec![c, a], QueueAction::Start),
        (
            vec![p, a],
            QueueAction::Fail {
                error: "x".into(),
                max_retries: 5,
            },
        ),
        (vec![p, c], QueueAction::RequeueInterrupted),
        (vec![p, a], QueueAction::Complete),
    ];
    for (ids, action) in &refused {
        let r = s.store().queue_transition(ids, action);
        assert!(
            matches!(r, Err(StoreError::Transition(_))),
            "{ids:?} {action:?}: {r:?}"
        );
        assert_eq!(
            queue(s.store()),
            before,
            "{ids:?} {action:?} changed the queue"
        );
    }
    let r = s.store().queue_transition(&[a, 9_999], &QueueAction::Start);
    assert!(
        matches!(r, Err(StoreError::QueueEntryNotFound(9_999))),
        "{r:?}"
    );
    assert_eq!(queue(s.store()), before);
    s.reopen();
    assert_eq!(
        queue(s.store()),
        before,
        "refused moves left nothing on disk"
    );

    // The legal part of the same batch works on its own, every entry of it.
    let moved = s
        .store()
        .queue_transition(&[a, b], &QueueAction::Start)
        .expect("start a and b");
    assert_eq!(moved.len(), 2);
    s.reopen();
    for id in [a, b] {
        assert_eq!(entry(s.store(), id).status, QueueStatus::Processing);
    }
    assert_eq!(entry(s.store(), c).status, QueueStatus::Completed);
}

#[test]
fn failures_count_up_to_failed_and_a_manual_retry_starts_over() {
    let mut s = sled();
    let id = new_entry(s.store(), "flaky");
    let fail = |n: u32| QueueAction::Fail {
        error: format!("attempt {n} failed"),
        max_retries: 3,
    };
    for attempt in 1..=3 {
        s.store()
            .queue_transition(&[id], &QueueAction::Start)
            .expect("start");
        s.reopen();
        s.store()
            .queue_transition(&[id], &fail(attempt))
            .expect("fail");
        s.reopen();
        let e = entry(s.store(), id);
        assert_eq!(e.retry_count, attempt);
        assert_eq!(e.last_error, Some(format!("attempt {attempt} failed")));
        let want = if attempt < 3 {
            QueueStatus::Pending
        } else {
            QueueStatus::Failed
        };
        assert_eq!(e.status, want, "after {attempt} failures");
    }
    let r = s.store().queue_transition(&[id], &QueueAction::Start);
    assert!(
        matches!(r, Err(StoreError::Transition(_))),
        "failed is not picked up"
    );
    s.store()
        .queue_transition(&[id], &QueueAction::Retry)
        .expect("retry");
    s.reopen();
    let e = entry(s.store(), id);
    assert_eq!((e.status, e.retry_count), (QueueStatus::Pending, 0));
    s.store()
        .queue_transition(&[id], &QueueAction::Start)
        .expect("start");
    s.store()
        .queue_transition(&[id], &QueueAction::Complete)
        .expect("complete");
    s.reopen();
    let e = entry(s.store(), id);
    assert_eq!((e.status, e.last_error), (QueueStatus::Completed, None));
}

#[test]
fn interrupted_uploads_go_back_to_pending_after_a_reopen() {
    let mut s = sled();
    let mut ids = Vec::new();
    for status in QueueStatus::ALL {
        for n in 0..2 {
            let id = new_entry(s.store(), &format!("{}-{n}", status.as_str()));
            bring_to(s.store(), id, status);
            ids.push((id, status));
        }
    }
    s.reopen();
    let before = queue(s.store());
    assert_eq!(s.store().recover_interrupted().expect("recover"), 2);
    for (id, status) in &ids {
        let want = match status {
            QueueStatus::Processing => QueueStatus::Pending,
            other => *other,
        };
        let e = entry(s.store(), *id);
        assert_eq!(e.status, want, "entry {id} was {status:?}");
        let old = before.iter().find(|b| b.id == *id).expect("entry");
        assert_eq!(
            (e.retry_count, &e.last_error),
            (old.retry_count, &old.last_error)
        );
    }
    assert_eq!(s.store().recover_interrupted().expect("recover"), 0);
    s.reopen();
    assert_eq!(s.store().queue_counts().expect("counts").processing, 0);
    assert_eq!(s.store().queue_counts().expect("counts").pending, 4);

    // recover_interrupted makes its moves durable itself: a crash right after keeps them.
    let mut m = memory(StoreOptions::default());
    let id = new_entry(m.store(), "x");
    bring_to(m.store(), id, QueueStatus::Processing);
    m.store().flush().expect("flush");
    assert!(m.crash());
    assert_eq!(entry(m.store(), id).status, QueueStatus::Processing);
    assert_eq!(m.store().recover_interrupted().expect("recover"), 1);
    assert!(m.crash());
    assert_eq!(entry(m.store(), id).status, QueueStatus::Pending);
}

fn log_entry(n: u64) -> SyncLogEntry {
    SyncLogEntry {
        id: 0,
        timestamp: 1_000 + n,
        direction: if n.is_multiple_of(2) {
            Direction::Upload
        } else {
            Direction::Download
        },
        records_processed: n * 10,
        status: match n % 3 {
            0 => SyncOutcome::Success,
            1 => SyncOutcome::Partial,
            _ => SyncOutcome::Failed,
        },
        error_message: (n % 3 == 2).then(|| format!("error {n}")),
        user_id: (n % 2 == 1).then(|| "user-1".to_owned()),
        device_id: common::TEST_DEVICE.into(),
        conflicts: n / 2,
    }
}

#[test]
fn the_log_is_newest_first_pages_with_before_and_survives_reopen() {
    let mut s = sled();
    assert!(s.store().log(None, 10).expect("log").is_empty());
    let mut appended = Vec::new();
    for n in 1..=7 {
        let e = s.store().log_append(log_entry(n)).expect("append");
        assert_eq!(e.id, n, "log ids count from 1");
        assert_eq!(
            e,
            SyncLogEntry {
                id: n,
                ..log_entry(n)
            }
        );
        appended.push(e);
    }
    let newest_first: Vec<SyncLogEntry> = appended.iter().rev().cloned().collect();
    let ids = |entries: Vec<SyncLogEntry>| entries.iter().map(|e| e.id).collect::<Vec<_>>();
    for _ in 0..2 {
        let store = s.store();
        assert_eq!(store.log(None, 100).expect("log"), newest_first);
        assert_eq!(ids(store.log(None, 3).expect("log")), [7, 6, 5]);
        assert_eq!(ids(store.log(Some(5), 3).expect("log")), [4, 3, 2]);
        assert_eq!(ids(store.log(Some(2), 3).expect("log")), [1]);
        assert!(store.log(Some(1), 3).expect("log").is_empty());
        assert_eq!(ids(store.log(Some(100), 2).expect("log")), [7, 6]);
        assert!(store.log(None, 0).expect("log").is_empty());
        // Paging with `before` = the last id of each page visits every entry once.
        let mut paged = Vec::new();
        let mut before = None;
        loop {
            let page = store.log(before, 2).expect("log page");
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            paged.extend(page);
        }
        assert_eq!(paged, newest_first);
        s.reopen();
    }
    let e = s.store().log_append(log_entry(8)).expect("append");
    assert_eq!(e.id, 8, "ids continue after a reopen");
    assert_eq!(ids(s.store().log(None, 2).expect("log")), [8, 7]);

    // An append that was never flushed is lost in a crash, and the ids carry on from what stayed.
    let mut m = memory(StoreOptions::default());
    m.store().log_append(log_entry(1)).expect("append");
    m.store().flush().expect("flush");
    m.store().log_append(log_entry(2)).expect("append");
    assert!(m.crash());
    assert_eq!(ids(m.store().log(None, 10).expect("log")), [1]);
    assert_eq!(m.store().log_append(log_entry(3)).expect("append").id, 2);
}

// ---- Atomicity of a write and its queue entry ----

/// Everything a reader can see of the store, to compare before and after a write that must
/// leave no trace.
#[derive(Debug, PartialEq)]
struct Snapshot {
    collections: Vec<(String, u64)>,
    queue: Vec<SyncQueueEntry>,
    records: Vec<RecordSnapshot>,
}

/// A record's address, its fields and heads when live, and its history length when it exists.
#[derive(Debug, PartialEq)]
struct RecordSnapshot {
    collection: String,
    id: String,
    view: Option<(Fields, Vec<String>)>,
    history: Option<usize>,
}

fn snapshot(store: &Store, addresses: &[(&str, &str)]) -> Snapshot {
    Snapshot {
        collections: store.collections().expect("collections"),
        queue: queue(store),
        records: addresses
            .iter()
            .map(|(c, id)| {
                let view = store
                    .get(c, id)
                    .ok()
                    .map(|v| (v.fields.parse().unwrap(), v.heads));
                let history = store.history(c, id).ok().map(|h| h.len());
                RecordSnapshot {
                    collection: (*c).to_owned(),
                    id: (*id).to_owned(),
                    view,
                    history,
                }
            })
            .collect(),
    }
}

#[test]
fn a_write_and_its_queue_entry_survive_or_vanish_together() {
    let mut m = memory(StoreOptions::default());
    let addresses = [("Customer", "kept"), ("Customer", "lost")];
    m.store()
        .write(put("Customer", "kept", json!({"name": "Ada"})))
        .expect("put");
    m.store().flush().expect("flush");
    let flushed = snapshot(m.store(), &addresses);
    assert_eq!(flushed.queue.len(), 1);

    // Applied and visible, but not flushed: a create, an update and a delete.
    m.store()
        .write(put("Customer", "lost", json!({"name": "Bob"})))
        .expect("put");
    m.store()
        .write(patch("Customer", "kept", json!({"email": "a@x"}), &[]))
        .expect("patch");
    m.store().write(delete("Customer", "lost")).expect("delete");
    let visible = snapshot(m.store(), &addresses);
    assert_eq!(visible.queue.len(), 4);
    assert_eq!(visible.records[1].history, Some(2), "lost has two changes");
    assert_queue_matches_history(m.store(), &addresses);

    assert!(m.crash());
    assert_eq!(
        snapshot(m.store(), &addresses),
        flushed,
        "after the crash only the flushed write remains, with its entry"
    );
    assert_queue_matches_history(m.store(), &addresses);

    // The store carries on from the flushed state.
    let a = m
        .store()
        .write(patch("Customer", "kept", json!({"email": "b@x"}), &[]))
        .expect("patch");
    assert_eq!(a.operation, Some(Operation::Update));
    let a = m
        .store()
        .write(put("Customer", "lost", json!({"name": "Cy"})))
        .expect("put");
    assert_eq!(a.operation, Some(Operation::Create));
    m.store().flush().expect("flush");
    assert!(m.crash());
    let after = snapshot(m.store(), &addresses);
    assert_eq!(after.queue.len(), 3);
    assert_eq!(
        m.store()
            .get("Customer", "kept")
            .expect("get")
            .fields
            .parse()
            .unwrap(),
        fields(json!({"name": "Ada", "email": "b@x"}))
    );
    assert_queue_matches_history(m.store(), &addresses);
}

fn deeper_than_default() -> Value {
    let mut v = json!(1);
    for _ in 0..40 {
        v = json!([v]);
    }
    v
}

#[test]
fn a_batch_with_an_invalid_write_writes_nothing_and_the_store_carries_on() {
    for cache_docs in [1, 2, 1024] {
        let options = StoreOptions {
            cache_docs,
            ..StoreOptions::default()
        };
        let kv = FaultyKv::new(usize::MAX);
        let clock = StepClock::new();
        let store = open_test_store(Box::new(kv.clone()), options, &clock);
        let addresses = [("C", "y"), ("C", "x"), ("D", "z"), ("C", "w")];
        store.write(put("C", "y", json!({"a": 1}))).expect("put y");
        store.flush().expect("flush");
        // Load y into the cache, where a failed batch could leave its change behind.
        store.get("C", "y").expect("get y");
        let before = snapshot(&store, &addresses);

        let failing: Vec<(Vec<Write>, &str)> = vec![
            (
                vec![
                    put("C", "x", json!({"x": 1})),
                    patch("C", "y", json!({"b": 2}), &[]),
                    put("D", "z", json!({"$bad": 1})),
                ],
                "reserved",
            ),
            (
                vec![
                    patch("C", "y", json!({"b": 2}), &[]),
                    patch("C", "y", json!({}), &["$deleted"]),
                ],
                "reserved",
            ),
            (
                vec![
                    put("C", "x", json!({"x": 1})),
                    delete("C", "y"),
                    delete("C", "w"),
                ],
                "not found",
            ),
            (
                vec![
                    patch("C", "y", json!({"b": 2}), &[]),
                    put("C", "", json!({})),
                ],
                "address",
            ),
            (
                vec![
                    Write::Put {
                        collection: "D".into(),
                        id: None,
                        fields: fields(json!({"generated": true})),
                    },
                    put("C", "y", json!({"deep": deeper_than_default()})),
                ],
                "too deep",
            ),
        ];
        for (writes, why) in failing {
            let r = store.write_all(writes);
            let ok = match (why, &r) {
                ("reserved", Err(StoreError::Record(RecordError::ReservedField { .. }))) => true,
                ("not found", Err(StoreError::NotFound { collection, id })) => {
                    (collection.as_str(), id.as_str()) == ("C", "w")
                }
                ("address", Err(StoreError::Address(_))) => true,
                ("too deep", Err(StoreError::Record(RecordError::TooDeep { .. }))) => true,
                _ => false,
            };
            assert!(ok, "cache {cache_docs}, {why}: {r:?}");
            assert_eq!(
                snapshot(&store, &addresses),
                before,
                "cache {cache_docs}: a refused batch ({why}) left a trace"
            );
        }

        // The engine refuses a valid batch: nothing is written and nothing stays cached.
        kv.fill_disk();
        let r = store.write_all(vec![
            patch("C", "y", json!({"b": 2}), &[]),
            put("C", "x", json!({"x": 1})),
        ]);
        assert!(matches!(r, Err(StoreError::Storage(_))), "{r:?}");
        kv.free_space();
        assert_eq!(snapshot(&store, &addresses), before, "cache {cache_docs}");

        // The records of the failed batches take new writes as if those batches never were.
        let a = store
            .write(patch("C", "y", json!({"c": 3}), &[]))
            .expect("patch y");
        assert_eq!(a.operation, Some(Operation::Update));
        assert_eq!(
            store.get("C", "y").expect("y").fields.parse().unwrap(),
            fields(json!({"a": 1, "c": 3})),
            "cache {cache_docs}: y holds a change from a failed batch"
        );
        let a = store.write(put("C", "x", json!({"x": 1}))).expect("put x");
        assert_eq!(a.operation, Some(Operation::Create));
        assert_eq!(store.history("C", "y").expect("history").len(), 2);
        assert_eq!(store.history("C", "x").expect("history").len(), 1);
        assert_eq!(queue(&store).len(), 3);
        assert_queue_matches_history(&store, &addresses);
    }
}

#[test]
fn a_batch_touching_more_records_than_the_cache_holds_keeps_every_change() {
    for cache_docs in [1, 2] {
        let mut m = memory(StoreOptions {
            cache_docs,
            ..StoreOptions::default()
        });
        m.store()
            .write(put("C", "old", json!({"v": 0})))
            .expect("put");
        let applied = m
            .store()
            .write_all(vec![
                put("C", "new", json!({"a": 1})),
                patch("C", "old", json!({"c": 1}), &[]),
                put("C", "other1", json!({})),
                put("C", "other2", json!({})),
                patch("C", "new", json!({"b": 2}), &[]),
                patch("C", "old", json!({"d": 1}), &[]),
            ])
            .unwrap_or_else(|e| panic!("cache {cache_docs}: {e}"));
        let ops: Vec<_> = applied.iter().map(|a| a.operation).collect();
        assert_eq!(
            ops,
            [
                Some(Operation::Create),
                Some(Operation::Update),
                Some(Operation::Create),
                Some(Operation::Create),
                Some(Operation::Update),
                Some(Operation::Update),
            ]
        );
        m.store().flush().expect("flush");
        for crash in [false, true] {
            if crash {
                assert!(m.crash());
            }
            let store = m.store();
            assert_eq!(
                store.get("C", "new").expect("new").fields.parse().unwrap(),
                fields(json!({"a": 1, "b": 2})),
                "cache {cache_docs}, crash {crash}"
            );
            assert_eq!(
                store.get("C", "old").expect("old").fields.parse().unwrap(),
                fields(json!({"v": 0, "c": 1, "d": 1})),
                "cache {cache_docs}, crash {crash}"
            );
            assert_eq!(store.history("C", "new").expect("history").len(), 2);
            assert_eq!(store.history("C", "old").expect("history").len(), 3);
            assert_queue_matches_history(
                store,
                &[("C", "new"), ("C", "old"), ("C", "other1"), ("C", "other2")],
            );
        }
    }
}

#[test]
fn old_completed_entries_and_old_log_entries_are_forgotten_and_nothing_else() {
    let m = sled();
    let store = m.store();
    let ids: Vec<u64> = (0..6).map(|n| new_entry(store, &format!("j{n}"))).collect();
    // j0..j3 complete early; j4 stays pending, j5 fails for good.
    store
        .queue_transition(&ids[..4], &QueueAction::Start)
        .unwrap();
    store
        .queue_transition(&ids[..4], &QueueAction::Complete)
        .unwrap();
    store
        .queue_transition(&ids[5..], &QueueAction::Start)
        .unwrap();
    store
        .queue_transition(
            &ids[5..],
            &QueueAction::Fail {
                error: "validation: refused".into(),
                max_retries: 0,
            },
        )
        .unwrap();
    for n in 0..3 {
        store.log_append(log_entry(n)).unwrap();
    }
    let cutoff = m.clock.peek();
    let late = new_entry(store, "late");
    store
        .queue_transition(&[late], &QueueAction::Start)
        .unwrap();
    store
        .queue_transition(&[late], &QueueAction::Complete)
        .unwrap();
    store
        .log_append(SyncLogEntry {
            timestamp: cutoff + 10,
            ..log_entry(3)
        })
        .unwrap();

    // At most two at a time, oldest first.
    assert_eq!(store.prune_history(cutoff, cutoff, 2).unwrap(), (2, 2));
    assert_eq!(store.prune_history(cutoff, cutoff, 100).unwrap(), (2, 1));
    assert_eq!(store.prune_history(cutoff, cutoff, 100).unwrap(), (0, 0));
    let left: Vec<u64> = queue(store).iter().map(|e| e.id).collect();
    assert_eq!(
        left,
        vec![ids[4], ids[5], late],
        "pending, failed and recent stay"
    );
    let counts = store.queue_counts().unwrap();
    assert_eq!((counts.pending, counts.failed, counts.completed), (1, 1, 1));
    let logs = store.log(None, 10).unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].timestamp, cutoff + 10);
    // The records keep their changes: only the queue's copies went.
    assert_eq!(store.history("Job", "j0").unwrap().len(), 1);
}
