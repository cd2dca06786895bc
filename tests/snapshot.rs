//! Snapshots at the store level (PROTOCOL.md, section 5.8): a device that bootstraps from the
//! relay's snapshot pages, taken while other devices go on writing and while it writes and
//! uploads itself, and then reads the log after them, ends up with what a device replaying the
//! whole log has: the same heads, fields, conflict entries (same ids) and counts; none of its own
//! writes is lost. With unique constraints it also takes the relay's unique-value index once the
//! pages are in, so the clashes met after it are the replaying device's too. Real device stores
//! and the real relay store; the log is moved between them as the sessions would.

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
use ferry::clock::Clock;
use ferry::record::Record;
use ferry::relay::storage::KvStorage;
use ferry::relay::store::{RelayStore, RelayStoreOptions};
use ferry::resolve::{Policies, Policy};
use ferry::store::kv::MemoryKv;
use ferry::store::{BatchLimits, RetryPolicy, Store, StoreError, StoreOptions, Write};
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

const SPACE: &str = "team";
const WRITERS: [&str; 3] = [
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
    "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c",
];
const JOINER: &str = "0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d";
const REPLAYER: &str = "0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e";
/// `Doc` merges (its conflicts settle themselves), `Task` queues them for a person, `User` holds
/// its field `a` unique.
const COLLECTIONS: [&str; 3] = ["Doc", "Task", "User"];
const RECORDS: usize = 4;

fn policies() -> Policies {
    Policies {
        default: Policy::default(),
        collections: BTreeMap::from([
            (
                "Task".to_owned(),
                Policy::of(ferry::resolve::Strategy::Manual),
            ),
            (
                "User".to_owned(),
                Policy {
                    unique: vec![vec!["a".to_owned()]],
                    ..Policy::default()
                },
            ),
        ]),
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
                // Small, so that pages are served from bases, tails and the cache alike.
                doc_cache_docs: 2,
                compact_after: 3,
                policies: policies(),
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

    /// The device's pending changes, stored by the relay and settled on the device.
    fn upload(&self, store: &Store) {
        let batch = store
            .next_upload_batch(BatchLimits::of(10_000, usize::MAX))
            .unwrap();
        if batch.entries.is_empty() {
            return;
        }
        let changes = common::uploads(&batch.entries);
        let results = self
            .relay
            .append(SPACE, store.device_id(), &changes)
            .unwrap();
        store
            .finish_upload(&results, &RetryPolicy::immediate(5))
            .unwrap();
    }

    /// The log after the device's cursor, applied in pages as downloads would.
    fn download(&self, store: &Store, page: usize) {
        loop {
            let cursor = store.sync_cursor().unwrap();
            let slice = self
                .relay
                .read_since(SPACE, cursor, page, usize::MAX)
                .unwrap();
            if slice.entries.is_empty() && slice.through == cursor {
                return;
            }
            store.apply_remote(&slice.entries, slice.through).unwrap();
        }
    }

    /// One snapshot page after what the device has taken; true once the last is in.
    fn snapshot_page(&self, store: &Store, max_records: u32) -> bool {
        let after = store
            .snapshot_pages()
            .unwrap()
            .and_then(|b| b.resume_after());
        let page = self
            .relay
            .snapshot_page(SPACE, after.as_ref(), max_records, usize::MAX, None)
            .unwrap();
        store.apply_snapshot_page(&page).unwrap().complete
    }

    /// One page of the relay's unique-value index after what the device has taken; true once
    /// the last is in.
    fn index_page(&self, store: &Store, max_values: u32) -> bool {
        let after = store
            .unique_index_pages()
            .unwrap()
            .and_then(|i| i.resume_after());
        let page = self
            .relay
            .unique_index_page(SPACE, after.as_ref(), max_values, usize::MAX, None)
            .unwrap();
        store.apply_unique_index_page(&page).unwrap();
        page.complete
    }
}

#[derive(Debug, Clone)]
enum Step {
    Put {
        writer: usize,
        collection: usize,
        record: usize,
        value: u8,
    },
    Patch {
        writer: usize,
        collection: usize,
        record: usize,
        field: u8,
        value: u8,
    },
    Delete {
        writer: usize,
        collection: usize,
        record: usize,
    },
    Sync {
        writer: usize,
    },
    /// The joining device takes its next snapshot page (of this many records), or, once they
    /// are all in, its next page of the unique-value index (of this many values).
    Page {
        records: u32,
    },
}

/// The joining device writes too: writer `WRITERS.len()`.
fn step() -> impl Strategy<Value = Step> {
    let writer = 0..=WRITERS.len();
    let collection = 0..COLLECTIONS.len();
    let record = 0..RECORDS;
    prop_oneof![
        3 => (writer.clone(), collection.clone(), record.clone(), any::<u8>())
            .prop_map(|(writer, collection, record, value)| Step::Put { writer, collection, record, value }),
        4 => (writer.clone(), collection.clone(), record.clone(), 0..3u8, any::<u8>())
            .prop_map(|(writer, collection, record, field, value)| Step::Patch { writer, collection, record, field, value }),
        1 => (writer.clone(), collection.clone(), record.clone())
            .prop_map(|(writer, collection, record)| Step::Delete { writer, collection, record }),
        3 => writer.prop_map(|writer| Step::Sync { writer }),
        1 => (1..3u32).prop_map(|records| Step::Page { records }),
    ]
}

fn write(store: &Store, write: Write) {
    match store.write(write) {
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => panic!("write: {e}"),
    }
}

/// Heads and fields of every record a store holds (deleted ones included), by key. Reads answer
/// from record views: every one of them must equal what its document gives.
fn records(store: &Store) -> BTreeMap<(String, String), (Vec<String>, Option<serde_json::Value>)> {
    let checkup = store.examine().unwrap();
    assert_eq!(checkup.damage, None, "{checkup:?}");
    let mut out = BTreeMap::new();
    for collection in COLLECTIONS {
        for r in 0..RECORDS {
            let id = format!("r{r}");
            let Ok(doc) = store.export_doc(collection, &id) else {
                continue;
            };
            let actor = automerge::ActorId::from(&[0u8; 16][..]);
            let mut heads: Vec<String> = Record::load(&doc, &actor)
                .unwrap()
                .heads()
                .iter()
                .map(|h| h.to_string())
                .collect();
            heads.sort();
            let fields = match store.get(collection, &id) {
                Ok(view) => Some(serde_json::Value::Object(view.fields.parse().unwrap())),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => panic!("get: {e}"),
            };
            out.insert((collection.to_owned(), id), (heads, fields));
        }
    }
    out
}

fn conflicts(store: &Store) -> Vec<ferry::resolve::Conflict> {
    store.conflicts(None, None, None, 10_000).unwrap()
}

fn run(steps: &[Step], page: usize) -> Result<(), TestCaseError> {
    let net = Net::new();
    let writers: Vec<Store> = WRITERS
        .iter()
        .chain([&JOINER])
        .map(|id| net.device(id))
        .collect();
    let joiner = &writers[WRITERS.len()];
    let replayer = net.device(REPLAYER);
    let mut bootstrapped = false;
    let mut indexed = false;
    for step in steps {
        match step.clone() {
            Step::Put {
                writer,
                collection,
                record,
                value,
            } => write(
                &writers[writer],
                Write::Put {
                    collection: COLLECTIONS[collection].into(),
                    id: Some(format!("r{record}")),
                    // Few values, so that unique values clash.
                    fields: fields(json!({"a": value % 3, "b": format!("v{value}")})),
                },
            ),
            Step::Patch {
                writer,
                collection,
                record,
                field,
                value,
            } => write(
                &writers[writer],
                Write::Patch {
                    collection: COLLECTIONS[collection].into(),
                    id: format!("r{record}"),
                    set: fields(json!({ ["a", "b", "c"][field as usize]: value % 3 })),
                    unset: Vec::new(),
                },
            ),
            Step::Delete {
                writer,
                collection,
                record,
            } => write(
                &writers[writer],
                Write::Delete {
                    collection: COLLECTIONS[collection].into(),
                    id: format!("r{record}"),
                },
            ),
            Step::Sync { writer } => {
                net.upload(&writers[writer]);
                // The joining device uploads while it bootstraps, but reads the log only after.
                if writer < WRITERS.len() || indexed {
                    net.download(&writers[writer], page);
                }
            }
            Step::Page { records } => {
                if !bootstrapped {
                    bootstrapped = net.snapshot_page(joiner, records);
                } else if !indexed {
                    indexed = net.index_page(joiner, records);
                }
            }
        }
    }
    // The pages left are taken as the writers upload what they have left, one page each.
    for writer in &writers {
        if !bootstrapped {
            bootstrapped = net.snapshot_page(joiner, 1);
        }
        net.upload(writer);
    }
    while !bootstrapped {
        bootstrapped = net.snapshot_page(joiner, 2);
    }
    for writer in &writers {
        if !indexed {
            indexed = net.index_page(joiner, 1);
        }
        net.upload(writer);
    }
    while !indexed {
        indexed = net.index_page(joiner, 2);
    }
    net.download(joiner, page);
    // What it wrote after its last upload goes up now, and comes back in the log.
    net.upload(joiner);
    net.download(joiner, page);
    net.download(&replayer, page);
    let queue = joiner.queue_counts().unwrap();
    prop_assert_eq!(
        (queue.pending, queue.processing, queue.failed),
        (0, 0, 0),
        "every write of the joining device was logged"
    );
    prop_assert_eq!(
        joiner.snapshot_pages().unwrap(),
        None,
        "the catch-up is over"
    );
    prop_assert_eq!(joiner.unique_index_pages().unwrap(), None);
    converged(joiner, &replayer)?;
    // Every device takes the value some record may hold already, and the first writer's
    // records let go of theirs: the joining device's unique-value index is the replaying
    // one's if it finds the same clashes, and ends the same.
    let all: Vec<&Store> = writers.iter().chain([&replayer]).collect();
    for (i, store) in all.iter().enumerate() {
        write(
            store,
            Write::Put {
                collection: "User".into(),
                id: Some(format!("late{i}")),
                fields: fields(json!({"a": i % 3})),
            },
        );
    }
    for r in 0..RECORDS {
        write(
            &writers[0],
            Write::Patch {
                collection: "User".into(),
                id: format!("r{r}"),
                set: fields(json!({"a": 10 + r})),
                unset: Vec::new(),
            },
        );
    }
    for store in &all {
        net.upload(store);
    }
    for store in &all {
        net.download(store, page);
    }
    converged(joiner, &replayer)
}

fn converged(joiner: &Store, replayer: &Store) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        joiner.sync_cursor().unwrap(),
        replayer.sync_cursor().unwrap()
    );
    prop_assert_eq!(records(joiner), records(replayer));
    prop_assert_eq!(conflicts(joiner), conflicts(replayer));
    prop_assert_eq!(
        joiner.conflict_counts().unwrap(),
        replayer.conflict_counts().unwrap()
    );
    prop_assert_eq!(
        joiner.open_conflicts().unwrap(),
        replayer.open_conflicts().unwrap()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_snapshot_bootstrap_converges_with_a_full_replay(
        steps in prop::collection::vec(step(), 1..80),
        page in 1..5usize,
    ) {
        run(&steps, page)?;
    }
}
