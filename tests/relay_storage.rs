//! The relay storage conformance suite: the properties every `RelayStorage` engine must have,
//! written once, generic over the engine, and run against each one (the embedded engine on sled
//! in a temporary directory and on the in-memory KV; the PostgreSQL engine on a private server,
//! `common::postgres`). An engine added later gets its own `conformance!` line.
//!
//! The log: appends numbered from the head they were staged against, read back in ranges and
//! byte-bounded pages; an append staged against a head that moved is refused whole; the dedup
//! index is per record (the same bytes under two records are two entries); the causal-closure
//! check (through the relay store, as a property over random upload orders too); records' heads,
//! base + tail and compaction; conflict counts and quota bytes as increments; the unique-value
//! index (its holders and open clashes); conflict entries, their open index and the change that
//! brought each; tombstone purging (a purge entry, the marker, what goes and what stays); a
//! space's web actor, chosen once; a damaged record rebuilt from its log entries (refused once
//! they are compacted away). Accounts: accounts (a name taken once), devices, enrolment codes (consumed once),
//! token families, signing keys, passwords, each commit whole or not at all. And reopening:
//! everything committed is there after a restart.

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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::postgres::PgServer;
use common::{fields, open_sled, proptest_config};
use ferry::auth::token::Family;
use ferry::clock::FixedClock;
use ferry::record::{Record, first_change};
use ferry::relay::storage::{
    AccountRecord, AccountWrite, Append, ClientKind, Compaction, DeviceRecord, EnrolmentRecord,
    Holders, KvStorage, LogCompaction, LoggedChange, PgStorage, RelayConflictCount, RelayStorage,
    StorageError, StoredKey, UniqueValue,
};
use ferry::relay::store::{LogRetention, RelayStore, RelayStoreError, RelayStoreOptions};
use ferry::resolve::{self, Conflict, ConflictKind, ConflictStatus, Side};
use ferry::store::kv::MemoryKv;
use ferry_proto::wire::{ChangeOutcome, ErrorCode, RecordName, UploadChange};
use proptest::prelude::*;
use relay_fixtures::{SPACE, Writer, actor, append_by_author, dev, outcomes, upload};
use serde_json::json;

/// A storage engine under test.
trait Engine {
    /// The engine over this test's data: empty at first, then whatever was committed.
    fn open(&self) -> Arc<dyn RelayStorage>;
    /// The engine as a restart finds it: only what was durable. The caller drops what `open`
    /// gave first.
    fn reopen(&self) -> Arc<dyn RelayStorage>;
    /// Damages the values stored under `keys` (the embedded engine's layout; another engine
    /// damages the rows holding what those keys hold) as a disk would: they then fail their
    /// checksums. The caller drops what `open` gave first.
    fn damage(&self, keys: &[Vec<u8>]);
}

/// The embedded engine on the in-memory KV; a restart loses what was not flushed.
struct Memory(MemoryKv);

impl Memory {
    fn new() -> Self {
        Memory(MemoryKv::new())
    }
}

impl Engine for Memory {
    fn open(&self) -> Arc<dyn RelayStorage> {
        Arc::new(KvStorage::new(Arc::new(self.0.clone())))
    }

    fn reopen(&self) -> Arc<dyn RelayStorage> {
        self.0.crash();
        self.open()
    }

    fn damage(&self, keys: &[Vec<u8>]) {
        for key in keys {
            assert!(self.0.damage(key), "nothing stored under {key:?}");
        }
    }
}

/// The embedded engine on sled in a temporary directory.
struct Sled(tempfile::TempDir);

impl Sled {
    fn new() -> Self {
        Sled(tempfile::tempdir().unwrap())
    }
}

impl Engine for Sled {
    fn open(&self) -> Arc<dyn RelayStorage> {
        Arc::new(KvStorage::new(Arc::new(open_sled(self.0.path()))))
    }

    fn reopen(&self) -> Arc<dyn RelayStorage> {
        self.open()
    }

    fn damage(&self, keys: &[Vec<u8>]) {
        let dir = ferry::store::kv::SledKv::current_dir(self.0.path()).unwrap();
        common::wait_sled_released(&dir);
        let db = ::sled::open(&dir).unwrap();
        for key in keys {
            let mut value = db.get(key).unwrap().expect("stored").to_vec();
            value[0] ^= 0x20;
            db.insert(key.as_slice(), value).unwrap();
        }
        db.flush().unwrap();
    }
}

/// The PostgreSQL engine on a database of its own on the test binary's server; a restart is a
/// new engine on the same database (every commit was durable when it returned).
struct Postgres {
    server: &'static PgServer,
    database: String,
}

impl Postgres {
    fn new() -> Self {
        let server = PgServer::shared();
        Postgres {
            server,
            database: server.create_database(),
        }
    }
}

impl Engine for Postgres {
    fn open(&self) -> Arc<dyn RelayStorage> {
        Arc::new(PgStorage::open(&self.server.options(&self.database)).unwrap())
    }

    fn reopen(&self) -> Arc<dyn RelayStorage> {
        self.open()
    }

    /// A base or heads row gets a flipped bit in its value, a tail row (which holds no value
    /// beside its key) in its checksum.
    fn damage(&self, keys: &[Vec<u8>]) {
        for key in keys {
            let (kind, rest) = key.split_first().unwrap();
            let (names, seq) = match kind {
                b't' => {
                    let (names, seq) = rest.split_at(rest.len() - 8);
                    (names, Some(u64::from_be_bytes(seq.try_into().unwrap())))
                }
                _ => (rest, None),
            };
            let parts: Vec<String> = names
                .split(|&b| b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| String::from_utf8(p.to_vec()).unwrap().replace('\'', "''"))
                .collect();
            let [space, collection, record] = &parts[..] else {
                panic!("not a record's key: {key:?}");
            };
            let row = format!(
                "space = '{space}' AND collection = '{collection}' AND record = '{record}'"
            );
            let sql = match (kind, seq) {
                (b'b', None) => format!(
                    "UPDATE bases SET base = set_byte(base, 0, get_byte(base, 0) # 32) WHERE {row}"
                ),
                (b'r', None) => format!(
                    "UPDATE record_heads SET heads = set_byte(heads, 0, get_byte(heads, 0) # 32) \
                     WHERE {row}"
                ),
                (b't', Some(seq)) => {
                    format!("UPDATE tails SET crc = crc # 1 WHERE {row} AND seq = {seq}")
                }
                _ => panic!("no PostgreSQL row for key {key:?}"),
            };
            let updated = self.server.sql(
                &self.database,
                &format!("WITH d AS ({sql} RETURNING 1) SELECT count(*) FROM d"),
            );
            assert_eq!(updated.trim(), "1", "nothing stored under {key:?}");
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.server.drop_database(&self.database);
    }
}

fn entry(record: &str, origin: &str, n: u8, change: &[u8]) -> LoggedChange {
    LoggedChange {
        collection: "Doc".into(),
        record: record.into(),
        origin: origin.into(),
        hash: [n; 32],
        change: change.to_vec(),
    }
}

fn rec(id: &str) -> (String, String) {
    ("Doc".to_owned(), id.to_owned())
}

/// Appends `changes` (record, change bytes) at the space's head, each under the hash `[n; 32]`
/// for its position n, starting at `first_hash`.
fn append_at_head(
    storage: &dyn RelayStorage,
    space: &str,
    first_hash: u8,
    changes: &[(&str, &[u8])],
) {
    let mut append = Append::new(storage.head(space).unwrap());
    for (n, (record, change)) in (first_hash..).zip(changes) {
        append.entries.push(entry(record, "dev", n, change));
    }
    storage.append(space, append).unwrap();
}

fn log_entries_number_from_the_head_and_read_back_in_ranges(engine: &dyn Engine) {
    let storage = engine.open();
    assert_eq!(storage.head(SPACE).unwrap(), 0);
    assert_eq!(storage.read_log(SPACE, 0, 10, usize::MAX).unwrap(), []);
    append_at_head(&*storage, SPACE, 1, &[("a", b"one"), ("b", b"two")]);
    append_at_head(&*storage, SPACE, 3, &[("a", b"three"), ("a", b"four!")]);
    assert_eq!(storage.head(SPACE).unwrap(), 4);
    let seqs = |entries: &[ferry_proto::wire::LogEntry]| -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    };
    let all = storage.read_log(SPACE, 0, 10, usize::MAX).unwrap();
    assert_eq!(seqs(&all), [1, 2, 3, 4]);
    assert_eq!(
        (all[1].collection.as_str(), all[1].record.as_str()),
        ("Doc", "b")
    );
    assert_eq!(all[3].change, b"four!");
    assert_eq!(
        seqs(&storage.read_log(SPACE, 1, 2, usize::MAX).unwrap()),
        [2, 3]
    );
    assert_eq!(
        seqs(&storage.read_log(SPACE, 4, 10, usize::MAX).unwrap()),
        [0u64; 0]
    );
    // Bytes of change data bound a page, which still holds at least one entry.
    assert_eq!(seqs(&storage.read_log(SPACE, 0, 10, 6).unwrap()), [1, 2]);
    assert_eq!(seqs(&storage.read_log(SPACE, 2, 10, 1).unwrap()), [3]);
    assert_eq!(
        seqs(&storage.read_log(SPACE, 0, 0, usize::MAX).unwrap()),
        [1]
    );
    assert_eq!(
        storage.change_at(SPACE, 3).unwrap().as_deref(),
        Some(&b"three"[..])
    );
    assert_eq!(storage.change_at(SPACE, 5).unwrap(), None);
    // The dedup index answers per record.
    assert_eq!(
        storage.change_seq(SPACE, "Doc", "a", &[3; 32]).unwrap(),
        Some(3)
    );
    assert_eq!(
        storage.change_seq(SPACE, "Doc", "b", &[3; 32]).unwrap(),
        None
    );
    // Many at once, as one; those not logged (here: on another record) are left out.
    let key = |record: &str, n: u8| ("Doc".to_owned(), record.to_owned(), [n; 32]);
    assert_eq!(
        storage
            .change_seqs(SPACE, &[key("a", 3), key("b", 3), key("b", 2), key("a", 4)])
            .unwrap(),
        HashMap::from([(key("a", 3), 3), (key("b", 2), 2), (key("a", 4), 4)])
    );
    assert_eq!(storage.change_seqs(SPACE, &[]).unwrap(), HashMap::new());
    // Spaces are apart, and so are spaces whose names share a prefix.
    assert_eq!(storage.head("team2").unwrap(), 0);
    append_at_head(&*storage, "team2", 1, &[("a", b"elsewhere")]);
    assert_eq!(storage.head("team2").unwrap(), 1);
    assert_eq!(storage.head(SPACE).unwrap(), 4);
    assert_eq!(
        storage.change_seq("team2", "Doc", "a", &[3; 32]).unwrap(),
        None
    );
}

fn an_append_staged_against_a_head_that_moved_is_refused_whole(engine: &dyn Engine) {
    let storage = engine.open();
    let staged = |n: u8| {
        let mut append = Append::new(0);
        append.entries.push(entry("r", "dev", n, &[n]));
        append.created.insert(rec("r"), vec![n]);
        append
            .conflicts
            .push((ConflictKind::UpdateUpdate, "Doc".into(), 1));
        append
    };
    // Two relays staged against the same head: the first to commit wins.
    let (first, second) = (staged(1), staged(2));
    storage.append(SPACE, first).unwrap();
    assert!(matches!(
        storage.append(SPACE, second),
        Err(StorageError::HeadMoved { staged: 0, head: 1 })
    ));
    assert_eq!(storage.head(SPACE).unwrap(), 1);
    assert_eq!(storage.read_log(SPACE, 0, 10, usize::MAX).unwrap().len(), 1);
    assert_eq!(
        storage.change_seq(SPACE, "Doc", "r", &[2; 32]).unwrap(),
        None
    );
    assert_eq!(storage.base(SPACE, "Doc", "r").unwrap(), Some(vec![1]));
    assert_eq!(storage.conflict_counts(SPACE).unwrap()[0].detected, 1);
    // A compaction alone states its head too.
    let mut stale = Append::new(0);
    stale.compactions.push(Compaction {
        record: rec("r"),
        base: vec![9],
        tail: Vec::new(),
    });
    assert!(matches!(
        storage.append(SPACE, stale),
        Err(StorageError::HeadMoved { .. })
    ));
    assert_eq!(storage.base(SPACE, "Doc", "r").unwrap(), Some(vec![1]));
}

fn records_keep_a_base_a_tail_and_heads_and_compaction_replaces_the_tail(engine: &dyn Engine) {
    let storage = engine.open();
    let mut append = Append::new(0);
    append.entries.push(entry("r", "dev", 1, b"first"));
    append.created.insert(rec("r"), b"first".to_vec());
    append.entries.push(entry("r", "dev", 2, b"second"));
    append.tails.push((rec("r"), 2));
    append.heads.insert(rec("r"), vec![[2; 32]]);
    append.entries.push(entry("s", "dev", 3, b"other"));
    append
        .created
        .insert(("Note".into(), "s".into()), b"other".to_vec());
    storage.append(SPACE, append).unwrap();
    assert_eq!(
        storage.base(SPACE, "Doc", "r").unwrap(),
        Some(b"first".to_vec())
    );
    assert_eq!(storage.tail(SPACE, "Doc", "r").unwrap(), [2]);
    assert_eq!(
        storage.record_heads(SPACE, "Doc", "r").unwrap(),
        Some(vec![[2; 32]])
    );
    assert_eq!(storage.record_heads(SPACE, "Note", "s").unwrap(), None);
    assert_eq!(storage.base(SPACE, "Doc", "nothing").unwrap(), None);
    assert_eq!(storage.tail(SPACE, "Doc", "nothing").unwrap(), [0u64; 0]);
    let note = ("Note".to_owned(), "s".to_owned());
    // The bases and tails of many records at once: those held, an empty tail included.
    assert_eq!(
        storage
            .bases_of(SPACE, &[rec("r"), rec("nothing"), note.clone()])
            .unwrap(),
        HashMap::from([
            (rec("r"), b"first".to_vec()),
            (note.clone(), b"other".to_vec())
        ])
    );
    assert_eq!(
        storage
            .tails_of(SPACE, &[rec("r"), rec("nothing"), note.clone(), rec("s")])
            .unwrap(),
        HashMap::from([(rec("r"), vec![2]), (note, vec![])])
    );

    // More tail, then a compaction in the same append that takes all of it.
    let mut append = Append::new(3);
    append.entries.push(entry("r", "dev", 4, b"third"));
    append.tails.push((rec("r"), 4));
    append.heads.insert(rec("r"), vec![[4; 32], [5; 32]]);
    append.compactions.push(Compaction {
        record: rec("r"),
        base: b"saved".to_vec(),
        tail: vec![2, 4],
    });
    storage.append(SPACE, append).unwrap();
    assert_eq!(
        storage.base(SPACE, "Doc", "r").unwrap(),
        Some(b"saved".to_vec())
    );
    assert_eq!(
        storage.base(SPACE, "Note", "s").unwrap(),
        Some(b"other".to_vec())
    );
    assert_eq!(storage.tail(SPACE, "Doc", "r").unwrap(), [0u64; 0]);
    assert_eq!(
        storage.record_heads(SPACE, "Doc", "r").unwrap(),
        Some(vec![[4; 32], [5; 32]])
    );
    // The log keeps every change whatever the bases.
    assert_eq!(
        storage.change_at(SPACE, 2).unwrap().as_deref(),
        Some(&b"second"[..])
    );

    // Records are listed by collection, then id.
    for id in ["q", "a"] {
        let mut append = Append::new(storage.head(SPACE).unwrap());
        append.entries.push(entry(id, "dev", 9, id.as_bytes()));
        append.created.insert(rec(id), id.as_bytes().to_vec());
        storage.append(SPACE, append).unwrap();
    }
    assert_eq!(
        storage.collections(SPACE).unwrap(),
        [("Doc".to_owned(), 3), ("Note".to_owned(), 1)]
    );
    assert_eq!(
        storage.records(SPACE, "Doc", None, 10).unwrap(),
        ["a", "q", "r"]
    );
    assert_eq!(storage.records(SPACE, "Doc", Some("a"), 1).unwrap(), ["q"]);
    let name = |collection: &str, record: &str| RecordName {
        collection: collection.into(),
        record: record.into(),
    };
    assert_eq!(
        storage.record_names(SPACE, None, 10).unwrap(),
        [
            name("Doc", "a"),
            name("Doc", "q"),
            name("Doc", "r"),
            name("Note", "s")
        ]
    );
    assert_eq!(
        storage
            .record_names(SPACE, Some(&name("Doc", "r")), 10)
            .unwrap(),
        [name("Note", "s")]
    );
    assert_eq!(storage.collections("empty").unwrap(), []);
    // Writes of one append land in the order made: a record created and compacted in the same
    // append keeps the compacted base.
    let mut append = Append::new(storage.head(SPACE).unwrap());
    append.entries.push(entry("t", "dev", 5, b"t-first"));
    append.created.insert(rec("t"), b"t-first".to_vec());
    append.entries.push(entry("t", "dev", 6, b"t-second"));
    append.tails.push((rec("t"), 6));
    append.compactions.push(Compaction {
        record: rec("t"),
        base: b"t-saved".to_vec(),
        tail: vec![6],
    });
    storage.append(SPACE, append).unwrap();
    assert_eq!(
        storage.base(SPACE, "Doc", "t").unwrap(),
        Some(b"t-saved".to_vec())
    );
    assert_eq!(storage.tail(SPACE, "Doc", "t").unwrap(), [0u64; 0]);
}

/// `bases_of` answers what `base` answers record by record, for records whose first changes
/// are spread over several appends and log blocks (sizes that split blocks early), records
/// whose base is a saved document, and records the space does not hold, asked in any order.
fn bases_of_many_records_are_each_records_base(engine: &dyn Engine) {
    let storage = engine.open();
    let ids: Vec<String> = (0..200).map(|i| format!("r{i:03}")).collect();
    for (part, chunk) in (0u8..).zip(ids.chunks(70)) {
        let mut append = Append::new(storage.head(SPACE).unwrap());
        for (n, id) in (part * 70..).zip(chunk) {
            // Every seventh change large: blocks end before their 32 entries.
            let size = if n % 7 == 0 {
                3000
            } else {
                40 + usize::from(n)
            };
            let change = vec![n; size];
            append.entries.push(entry(id, "dev", n, &change));
            append.created.insert(rec(id), change);
        }
        storage.append(SPACE, append).unwrap();
    }
    let mut append = Append::new(storage.head(SPACE).unwrap());
    for id in ids.iter().step_by(9) {
        append.compactions.push(Compaction {
            record: rec(id),
            base: format!("saved {id}").into_bytes(),
            tail: Vec::new(),
        });
    }
    storage.append(SPACE, append).unwrap();
    let mut asked: Vec<(String, String)> = ids.iter().map(|id| rec(id)).collect();
    asked.extend([rec("absent"), ("Note".to_owned(), "r001".to_owned())]);
    // An order unlike the log's: by the id's digits reversed.
    asked.sort_by_key(|(_, id)| id.chars().rev().collect::<String>());
    let mut expected = HashMap::new();
    for key in &asked {
        if let Some(base) = storage.base(SPACE, &key.0, &key.1).unwrap() {
            expected.insert(key.clone(), base);
        }
    }
    assert_eq!(expected.len(), ids.len());
    assert_eq!(expected[&rec("r009")], b"saved r009".to_vec());
    assert_eq!(expected[&rec("r010")], vec![10u8; 50]);
    assert_eq!(storage.bases_of(SPACE, &asked).unwrap(), expected);
    // A few at a time, as snapshot pages ask.
    for page in asked.chunks(17) {
        let some = storage.bases_of(SPACE, page).unwrap();
        assert!(
            some.iter()
                .all(|(key, base)| expected.get(key) == Some(base))
        );
        assert_eq!(
            some.len(),
            page.iter()
                .filter(|key| expected.contains_key(*key))
                .count()
        );
    }
}

fn conflict_counts_and_log_bytes_add_up_across_appends(engine: &dyn Engine) {
    let storage = engine.open();
    assert_eq!(storage.log_bytes(SPACE).unwrap(), 0);
    let mut append = Append::new(0);
    append.entries.push(entry("r", "dev", 1, &[7; 100]));
    append.created.insert(rec("r"), vec![7; 100]);
    append
        .conflicts
        .push((ConflictKind::UpdateUpdate, "Doc".into(), 2));
    append
        .conflicts
        .push((ConflictKind::Unique, "Doc".into(), 1));
    storage.append(SPACE, append).unwrap();
    let one = storage.log_bytes(SPACE).unwrap();
    assert!(one >= 100, "{one}");
    let mut append = Append::new(1);
    append.entries.push(entry("r", "dev", 2, &[8; 100]));
    append.tails.push((rec("r"), 2));
    append
        .conflicts
        .push((ConflictKind::UpdateUpdate, "Doc".into(), 3));
    append
        .conflicts
        .push((ConflictKind::DeleteUpdate, "Note".into(), 1));
    storage.append(SPACE, append).unwrap();
    assert!(storage.log_bytes(SPACE).unwrap() >= one + 100);
    let count = |kind, collection: &str, detected| RelayConflictCount {
        kind,
        collection: collection.into(),
        detected,
    };
    let mut counts = storage.conflict_counts(SPACE).unwrap();
    counts.sort_by_key(|c| (c.kind.as_str(), c.collection.clone()));
    let mut expected = vec![
        count(ConflictKind::UpdateUpdate, "Doc", 5),
        count(ConflictKind::Unique, "Doc", 1),
        count(ConflictKind::DeleteUpdate, "Note", 1),
    ];
    expected.sort_by_key(|c| (c.kind.as_str(), c.collection.clone()));
    assert_eq!(counts, expected);
    assert_eq!(storage.conflict_counts("other").unwrap(), []);
    assert_eq!(storage.log_bytes("other").unwrap(), 0);
}

fn the_unique_index_holds_each_values_holders_in_order(engine: &dyn Engine) {
    let storage = engine.open();
    let email = UniqueValue {
        collection: "Doc".into(),
        constraint: 0,
        value: r#"["x@y"]"#.into(),
    };
    let held = vec![(0usize, vec![json!("x@y")])];
    let holders = Holders {
        records: vec!["a".into(), "b".into()],
        open: vec![("c1".into(), "a".into(), "b".into())],
    };
    let mut append = Append::new(0);
    append.entries.push(entry("a", "dev", 1, b"a"));
    append.created.insert(rec("a"), b"a".to_vec());
    append.holders.insert(email.clone(), holders.clone());
    append.held.insert(rec("a"), held.clone());
    storage.append(SPACE, append).unwrap();
    assert_eq!(storage.unique_holders(SPACE, &email).unwrap(), holders);
    assert_eq!(
        storage.unique_values(SPACE, "Doc", "a").unwrap(),
        Some(held)
    );
    // A constraint's values are read in pages, in value order, each with its holders.
    let mut append = Append::new(1);
    append.entries.push(entry("b", "dev", 1, b"b"));
    append.created.insert(rec("b"), b"b".to_vec());
    for (constraint, value) in [(0, r#"["a@y"]"#), (0, r#"["z@y"]"#), (1, r#"["q@y"]"#)] {
        let value = UniqueValue {
            constraint,
            value: value.into(),
            ..email.clone()
        };
        let holders = Holders {
            records: vec!["b".into()],
            open: Vec::new(),
        };
        append.holders.insert(value, holders);
    }
    storage.append(SPACE, append).unwrap();
    let values = |after: Option<&str>, limit| -> Vec<(String, Vec<String>)> {
        storage
            .unique_holders_after(SPACE, "Doc", 0, after, limit)
            .unwrap()
            .into_iter()
            .map(|(value, holders)| (value, holders.records))
            .collect()
    };
    let held_by = |value: &str, records: &[&str]| {
        (
            value.to_owned(),
            records.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        values(None, 2),
        [
            held_by(r#"["a@y"]"#, &["b"]),
            held_by(r#"["x@y"]"#, &["a", "b"])
        ]
    );
    assert_eq!(
        values(Some(r#"["x@y"]"#), 2),
        [held_by(r#"["z@y"]"#, &["b"])]
    );
    assert_eq!(values(Some(r#"["z@y"]"#), 2), []);
    assert_eq!(
        storage
            .unique_holders_after(SPACE, "Doc", 1, None, 10)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        storage
            .unique_holders_after(SPACE, "Other", 0, None, 10)
            .unwrap(),
        []
    );
    assert_eq!(storage.unique_values(SPACE, "Doc", "b").unwrap(), None);
    let other_constraint = UniqueValue {
        constraint: 1,
        ..email.clone()
    };
    assert_eq!(
        storage.unique_holders(SPACE, &other_constraint).unwrap(),
        Holders::default()
    );
    // No holders left: the value is free.
    let mut append = Append::new(2);
    append.entries.push(entry("a", "dev", 2, b"a2"));
    append.tails.push((rec("a"), 2));
    append.holders.insert(email.clone(), Holders::default());
    append.held.insert(rec("a"), Vec::new());
    storage.append(SPACE, append).unwrap();
    assert_eq!(
        storage.unique_holders(SPACE, &email).unwrap(),
        Holders::default()
    );
    assert_eq!(
        storage.unique_values(SPACE, "Doc", "a").unwrap(),
        Some(Vec::new())
    );
}

/// A conflict entry as the ledger hands one over.
fn conflict(id: &str, status: ConflictStatus, change: &str) -> Conflict {
    let side = |record: &str, changes: Vec<String>| Side {
        record: record.into(),
        changes,
        device: "dev".into(),
        time: 1,
        deleted: false,
        fields: fields(json!({"title": id})),
    };
    Conflict {
        id: id.into(),
        kind: ConflictKind::UpdateUpdate,
        collection: "Doc".into(),
        record: "a".into(),
        strategy: resolve::Strategy::Manual,
        status,
        seq: 2,
        server: side("a", vec!["00".into()]),
        client: side("a", vec![change.into()]),
        winner: None,
        fields: Vec::new(),
        unique: None,
        resolution: None,
        resolving: None,
    }
}

fn conflict_entries_are_listed_in_id_order_and_open_ones_by_their_own_index(engine: &dyn Engine) {
    let storage = engine.open();
    let mut append = Append::new(0);
    append.entries.push(entry("a", "dev", 1, b"a"));
    append.created.insert(rec("a"), b"a".to_vec());
    for (id, status) in [
        ("c3", ConflictStatus::Open),
        ("c1", ConflictStatus::AutoResolved),
        ("c2", ConflictStatus::Open),
    ] {
        append
            .conflict_entries
            .push(conflict(id, status, &format!("{id}-change")));
        append
            .conflict_changes
            .push((format!("{id}-change"), id.to_owned()));
    }
    storage.append(SPACE, append).unwrap();
    let ids = |list: Vec<Conflict>| list.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(storage.conflicts(SPACE, false, None, 10).unwrap()),
        ["c1", "c2", "c3"]
    );
    assert_eq!(
        ids(storage.conflicts(SPACE, true, None, 10).unwrap()),
        ["c2", "c3"]
    );
    assert_eq!(
        ids(storage.conflicts(SPACE, false, Some("c1"), 1).unwrap()),
        ["c2"]
    );
    assert_eq!(
        ids(storage.conflicts(SPACE, true, Some("c2"), 10).unwrap()),
        ["c3"]
    );
    assert_eq!(
        storage.conflict(SPACE, "c2").unwrap(),
        Some(conflict("c2", ConflictStatus::Open, "c2-change"))
    );
    assert_eq!(storage.conflict(SPACE, "nope").unwrap(), None);
    assert_eq!(
        storage
            .change_conflict(SPACE, "c3-change")
            .unwrap()
            .as_deref(),
        Some("c3")
    );
    assert_eq!(storage.change_conflict(SPACE, "other").unwrap(), None);
    assert_eq!(storage.conflicts("other", false, None, 10).unwrap(), []);
    // Resolved: out of the open index, in the full list as it stands now.
    let mut append = Append::new(1);
    append.entries.push(entry("a", "dev", 2, b"a2"));
    append.tails.push((rec("a"), 2));
    append
        .conflict_entries
        .push(conflict("c3", ConflictStatus::Resolved, "c3-change"));
    storage.append(SPACE, append).unwrap();
    assert_eq!(
        ids(storage.conflicts(SPACE, true, None, 10).unwrap()),
        ["c2"]
    );
    assert_eq!(
        storage.conflict(SPACE, "c3").unwrap().map(|c| c.status),
        Some(ConflictStatus::Resolved)
    );
    // A refused append leaves no entry behind.
    let mut stale = Append::new(1);
    stale.entries.push(entry("a", "dev", 3, b"a3"));
    stale
        .conflict_entries
        .push(conflict("c4", ConflictStatus::Open, "c4-change"));
    assert!(matches!(
        storage.append(SPACE, stale),
        Err(StorageError::HeadMoved { .. })
    ));
    assert_eq!(storage.conflict(SPACE, "c4").unwrap(), None);
    // Conflict state alone (a rebuild from the log) moves no head, and marks the space's
    // conflicts complete.
    assert!(!storage.conflicts_complete(SPACE).unwrap());
    let mut rebuilt = Append::new(2);
    rebuilt
        .conflict_entries
        .push(conflict("c0", ConflictStatus::Open, "c0-change"));
    rebuilt.conflicts_complete = true;
    storage.append(SPACE, rebuilt).unwrap();
    assert_eq!(storage.head(SPACE).unwrap(), 2);
    assert!(storage.conflicts_complete(SPACE).unwrap());
    assert_eq!(
        ids(storage.conflicts(SPACE, true, None, 10).unwrap()),
        ["c0", "c2"]
    );
    drop(storage);
    let storage = engine.reopen();
    assert_eq!(
        ids(storage.conflicts(SPACE, false, None, 10).unwrap()),
        ["c0", "c1", "c2", "c3"]
    );
    assert!(storage.conflicts_complete(SPACE).unwrap());
    // Each record's entries as they stand now, by their own index (what a snapshot sends).
    let mut on_b = Append::new(2);
    let mut other = conflict("c5", ConflictStatus::Open, "c5-change");
    other.record = "b".into();
    on_b.conflict_entries.push(other.clone());
    storage.append(SPACE, on_b).unwrap();
    let on_a = storage.record_conflicts(SPACE, "Doc", "a").unwrap();
    assert_eq!(ids(on_a.clone()), ["c0", "c1", "c2", "c3"]);
    assert_eq!(
        on_a.iter().find(|c| c.id == "c3").map(|c| c.status),
        Some(ConflictStatus::Resolved)
    );
    assert_eq!(
        storage.record_conflicts(SPACE, "Doc", "b").unwrap(),
        [other.clone()]
    );
    assert_eq!(storage.record_conflicts(SPACE, "Doc", "c").unwrap(), []);
    assert_eq!(storage.record_conflicts("other", "Doc", "a").unwrap(), []);
    // Many records' at once, each in id order; records without entries left out.
    assert_eq!(
        storage
            .conflicts_of(SPACE, &[rec("c"), rec("b"), rec("a")])
            .unwrap(),
        HashMap::from([(rec("a"), on_a), (rec("b"), vec![other])])
    );
}

fn a_spaces_web_actor_is_chosen_once_and_kept(engine: &dyn Engine) {
    let storage = engine.open();
    assert_eq!(storage.web_actor(SPACE, "aa01").unwrap(), "aa01");
    assert_eq!(storage.web_actor(SPACE, "bb02").unwrap(), "aa01");
    assert_eq!(storage.web_actor("other", "cc03").unwrap(), "cc03");
    drop(storage);
    let storage = engine.reopen();
    assert_eq!(storage.web_actor(SPACE, "dd04").unwrap(), "aa01");
}

fn device(id: &str, account: &str) -> DeviceRecord {
    DeviceRecord {
        device: id.into(),
        account: account.into(),
        kind: ClientKind::Device,
        label: String::new(),
        public_key: [3; 32],
        registered_ms: 1,
        revoked_ms: None,
        last_sign_in_ms: 1,
    }
}

fn family(id: &str, device: &str) -> Family {
    Family {
        id: id.into(),
        account: "alice".into(),
        device: device.into(),
        current: [4; 32],
        generation: 0,
        revoked: false,
        expires_s: 100,
    }
}

fn accounts_devices_codes_families_keys_and_passwords_commit_whole(engine: &dyn Engine) {
    let storage = engine.open();
    let alice = AccountRecord {
        name: "alice".into(),
        created_ms: 5,
    };
    let code = [6; 32];
    storage
        .write_accounts(vec![
            AccountWrite::CreateAccount(alice.clone()),
            AccountWrite::Enrolment {
                code_hash: code,
                record: EnrolmentRecord {
                    account: "alice".into(),
                    expires_ms: 50,
                },
            },
            AccountWrite::SigningKey(StoredKey {
                kid: "k1".into(),
                seed: [1; 32],
                created_s: 1,
                retired_s: None,
            }),
            AccountWrite::Password {
                account: "alice".into(),
                phc: "$argon2id$stand-in".into(),
            },
        ])
        .unwrap();
    assert_eq!(storage.account("alice").unwrap(), Some(alice.clone()));
    assert_eq!(storage.account("bob").unwrap(), None);
    assert_eq!(
        storage.password("alice").unwrap().as_deref(),
        Some("$argon2id$stand-in")
    );
    assert_eq!(storage.password("bob").unwrap(), None);
    assert_eq!(
        storage.enrolment(&code).unwrap().map(|e| e.account),
        Some("alice".to_owned())
    );

    // A name is taken once; the refused commit leaves nothing of its other writes.
    assert!(matches!(
        storage.write_accounts(vec![
            AccountWrite::Device(device("d0", "alice")),
            AccountWrite::CreateAccount(AccountRecord {
                name: "alice".into(),
                created_ms: 9,
            }),
        ]),
        Err(StorageError::AccountExists(name)) if name == "alice"
    ));
    assert_eq!(storage.accounts().unwrap(), [alice]);
    assert_eq!(storage.devices().unwrap(), []);

    // A code registers one device: the second commit consuming it is refused whole.
    let register = |id: &str| {
        storage.write_accounts(vec![
            AccountWrite::ConsumeEnrolment(code),
            AccountWrite::Device(device(id, "alice")),
            AccountWrite::Family(family(&format!("f-{id}"), id)),
        ])
    };
    register("d1").unwrap();
    assert!(matches!(register("d2"), Err(StorageError::EnrolmentUsed)));
    assert_eq!(storage.enrolment(&code).unwrap(), None);
    assert_eq!(storage.devices().unwrap(), [device("d1", "alice")]);
    assert_eq!(storage.families().unwrap(), [family("f-d1", "d1")]);

    // Updates replace, removals remove.
    let mut revoked = family("f-d1", "d1");
    revoked.revoked = true;
    storage
        .write_accounts(vec![
            AccountWrite::Family(revoked.clone()),
            AccountWrite::Family(family("f-d0", "d1")),
            AccountWrite::SigningKey(StoredKey {
                kid: "k2".into(),
                seed: [2; 32],
                created_s: 2,
                retired_s: None,
            }),
            AccountWrite::RemoveSigningKey("k1".into()),
            AccountWrite::Device(DeviceRecord {
                revoked_ms: Some(7),
                ..device("d1", "alice")
            }),
            AccountWrite::Device(device("d3", "alice")),
        ])
        .unwrap();
    assert_eq!(storage.family("f-d1").unwrap(), Some(revoked.clone()));
    assert_eq!(storage.family("nope").unwrap(), None);
    assert_eq!(
        storage.families().unwrap(),
        [family("f-d0", "d1"), revoked.clone()],
        "in id order"
    );
    let kids: Vec<String> = storage
        .signing_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(kids, ["k2"]);
    storage
        .write_accounts(vec![
            AccountWrite::RemoveFamily("f-d0".into()),
            AccountWrite::RemoveDevice("d3".into()),
        ])
        .unwrap();
    assert_eq!(storage.families().unwrap(), [revoked]);
    let devices = storage.devices().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].revoked_ms, Some(7));
}

fn everything_committed_is_there_after_a_restart(engine: &dyn Engine) {
    let storage = engine.open();
    let mut append = Append::new(0);
    append.entries.push(entry("r", "dev", 1, b"first"));
    append.created.insert(rec("r"), b"first".to_vec());
    append.entries.push(entry("r", "dev", 2, b"second"));
    append.tails.push((rec("r"), 2));
    append.heads.insert(rec("r"), vec![[2; 32]]);
    append
        .conflicts
        .push((ConflictKind::UpdateUpdate, "Doc".into(), 1));
    storage.append(SPACE, append).unwrap();
    storage
        .write_accounts(vec![
            AccountWrite::CreateAccount(AccountRecord {
                name: "alice".into(),
                created_ms: 5,
            }),
            AccountWrite::Device(device("d1", "alice")),
        ])
        .unwrap();
    let log_bytes = storage.log_bytes(SPACE).unwrap();
    drop(storage);

    let storage = engine.reopen();
    assert_eq!(storage.head(SPACE).unwrap(), 2);
    assert_eq!(storage.read_log(SPACE, 0, 10, usize::MAX).unwrap().len(), 2);
    assert_eq!(
        storage.change_seq(SPACE, "Doc", "r", &[2; 32]).unwrap(),
        Some(2)
    );
    assert_eq!(
        storage.base(SPACE, "Doc", "r").unwrap(),
        Some(b"first".to_vec())
    );
    assert_eq!(storage.tail(SPACE, "Doc", "r").unwrap(), [2]);
    assert_eq!(
        storage.record_heads(SPACE, "Doc", "r").unwrap(),
        Some(vec![[2; 32]])
    );
    assert_eq!(storage.conflict_counts(SPACE).unwrap()[0].detected, 1);
    assert_eq!(storage.log_bytes(SPACE).unwrap(), log_bytes);
    assert!(storage.account("alice").unwrap().is_some());
    assert_eq!(storage.devices().unwrap(), [device("d1", "alice")]);
    // Numbering carries on after what was logged.
    append_at_head(&*storage, SPACE, 3, &[("r", b"third")]);
    assert_eq!(storage.head(SPACE).unwrap(), 3);
}

/// Compaction drops the log up to the horizon only once bases hold it, keeps the dedup index,
/// takes the bytes off the quota, and survives a restart (a log compacted through its head
/// keeps its numbering).
fn the_log_is_compacted_only_through_what_bases_hold(engine: &dyn Engine) {
    let storage = engine.open();
    let mut append = Append::new(0);
    append.entries.push(entry("r", "dev", 1, b"first"));
    append.created.insert(rec("r"), b"first".to_vec());
    append.entries.push(entry("r", "dev", 2, b"second"));
    append.tails.push((rec("r"), 2));
    append.entries.push(entry("s", "dev", 3, b"other"));
    append.created.insert(rec("s"), b"other".to_vec());
    append.entries.push(entry("r", "dev", 4, b"fourth"));
    append.tails.push((rec("r"), 4));
    storage.append(SPACE, append).unwrap();
    let bytes = storage.log_bytes(SPACE).unwrap();
    assert_eq!(storage.horizon(SPACE).unwrap(), 0);
    assert_eq!(storage.tails_through(SPACE, 1, 10).unwrap(), []);
    assert_eq!(storage.tails_through(SPACE, 2, 10).unwrap(), [rec("r")]);

    // Not while r's tail names seq 2, nor against a head that moved.
    let through = |after: u64, horizon: u64| LogCompaction {
        after,
        horizon,
        ..LogCompaction::default()
    };
    assert!(matches!(
        storage.compact_log(SPACE, through(4, 3)),
        Err(StorageError::Uncovered { seq: 2, .. })
    ));
    assert!(matches!(
        storage.compact_log(SPACE, through(3, 1)),
        Err(StorageError::HeadMoved { staged: 3, head: 4 })
    ));
    assert_eq!(storage.horizon(SPACE).unwrap(), 0);
    assert_eq!(storage.read_log(SPACE, 0, 10, usize::MAX).unwrap().len(), 4);

    // r's document saved as its base first: then seqs 1 to 3 go.
    storage
        .compact_log(
            SPACE,
            LogCompaction {
                after: 4,
                bases: vec![Compaction {
                    record: rec("r"),
                    base: b"saved".to_vec(),
                    tail: vec![2, 4],
                }],
                horizon: 3,
                mark: Some((1_000, 4)),
            },
        )
        .unwrap();
    let seqs = |after| -> Vec<u64> {
        storage
            .read_log(SPACE, after, 10, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(storage.horizon(SPACE).unwrap(), 3);
    assert_eq!(storage.head(SPACE).unwrap(), 4);
    assert_eq!(seqs(3), [4]);
    assert_eq!(storage.change_at(SPACE, 2).unwrap(), None);
    assert_eq!(
        storage.change_at(SPACE, 4).unwrap().as_deref(),
        Some(&b"fourth"[..])
    );
    assert_eq!(
        storage.change_seq(SPACE, "Doc", "r", &[2; 32]).unwrap(),
        Some(2),
        "the dedup index outlives the entries"
    );
    assert_eq!(
        storage.base(SPACE, "Doc", "r").unwrap(),
        Some(b"saved".to_vec())
    );
    // s was never changed after its first change, which is its base: that base outlives the
    // log entry holding the same change.
    assert_eq!(
        storage.base(SPACE, "Doc", "s").unwrap(),
        Some(b"other".to_vec())
    );
    assert_eq!(storage.tail(SPACE, "Doc", "r").unwrap(), [0u64; 0]);
    let left = storage.log_bytes(SPACE).unwrap();
    assert!(left > 0 && left < bytes, "{left} of {bytes}");
    assert_eq!(storage.time_marks(SPACE).unwrap(), [(1_000, 4)]);
    // A lower horizon is no step back.
    storage.compact_log(SPACE, through(4, 1)).unwrap();
    assert_eq!(storage.horizon(SPACE).unwrap(), 3);
    drop(storage);

    let storage = engine.reopen();
    assert_eq!(storage.horizon(SPACE).unwrap(), 3);
    assert_eq!(storage.head(SPACE).unwrap(), 4);
    assert_eq!(storage.log_bytes(SPACE).unwrap(), left);
    // Through the head: no entry is left, and no mark at or below the horizon.
    storage.compact_log(SPACE, through(4, 4)).unwrap();
    assert_eq!(storage.read_log(SPACE, 4, 10, usize::MAX).unwrap(), []);
    assert_eq!(storage.log_bytes(SPACE).unwrap(), 0);
    assert_eq!(storage.time_marks(SPACE).unwrap(), []);
    // Freeing the disk keeps everything else. A store this small is far under the garbage
    // floor a rewrite waits for, so it is left as it is.
    let (before, after) = storage.reclaim_space().unwrap();
    assert_eq!(after, before);
    assert_eq!(
        storage.base(SPACE, "Doc", "r").unwrap(),
        Some(b"saved".to_vec())
    );
    assert_eq!(
        storage.base(SPACE, "Doc", "s").unwrap(),
        Some(b"other".to_vec())
    );
    drop(storage);

    let storage = engine.reopen();
    assert_eq!(
        storage.head(SPACE).unwrap(),
        4,
        "numbering survives an empty log"
    );
    append_at_head(&*storage, SPACE, 5, &[("r", b"fifth")]);
    assert_eq!(storage.head(SPACE).unwrap(), 5);
    assert_eq!(
        storage.read_log(SPACE, 4, 10, usize::MAX).unwrap()[0].seq,
        5
    );
    assert_eq!(storage.horizon("other").unwrap(), 0);
}

/// A record's base that is its first change is known by that change's hash, whether the base
/// names its log entry or holds the change itself once compaction dropped the entry; a saved
/// document is not one change.
fn a_base_that_is_one_change_is_known_by_its_hash(engine: &dyn Engine) {
    let storage = engine.open();
    let change = |n: i64| {
        first_change::encode(
            &actor(1),
            n,
            "create",
            &fields(json!({"n": n})),
            &Default::default(),
        )
        .unwrap()
    };
    let (r, s) = (change(1), change(2));
    let mut append = Append::new(0);
    for (id, created) in [("r", &r), ("s", &s)] {
        append.entries.push(LoggedChange {
            hash: created.hash.0,
            ..entry(id, "dev", 0, &created.bytes)
        });
        append.created.insert(rec(id), created.bytes.clone());
    }
    storage.append(SPACE, append).unwrap();
    let hash_of = |id: &str| storage.base_change_hash(SPACE, "Doc", id).unwrap();
    assert_eq!(hash_of("r"), Some(r.hash.0));
    assert_eq!(hash_of("s"), Some(s.hash.0));
    assert_eq!(hash_of("nothing"), None);

    // r's document saved as its base, and the log compacted past both first changes.
    let mut saved = Record::load(&r.bytes, &actor(1)).unwrap();
    storage
        .compact_log(
            SPACE,
            LogCompaction {
                after: 2,
                bases: vec![Compaction {
                    record: rec("r"),
                    base: saved.save(),
                    tail: vec![],
                }],
                horizon: 2,
                mark: None,
            },
        )
        .unwrap();
    assert_eq!(storage.change_at(SPACE, 2).unwrap(), None);
    assert_eq!(hash_of("r"), None);
    assert_eq!(hash_of("s"), Some(s.hash.0));
    assert_eq!(storage.base(SPACE, "Doc", "s").unwrap(), Some(s.bytes));
}

/// Through the relay store: compaction by entries and by age keeps every document as it was,
/// answers reads below the horizon with the horizon, still knows old changes as duplicates,
/// and takes new changes on top.
fn the_relay_store_compacts_by_entries_and_age_and_documents_stay_whole(engine: &dyn Engine) {
    let relay_store = relay(engine.open(), 100);
    let mut writers: Vec<Writer> = (0..4).map(|_| Writer::new(1)).collect();
    let mut entry = 0;
    let mut send = |relay_store: &RelayStore, writers: &mut Vec<Writer>, round: u64| {
        for (i, writer) in writers.iter_mut().enumerate() {
            let change = if round == 0 {
                writer.put(json!({"n": 0, "id": i}))
            } else {
                writer.patch(json!({"n": round}))
            };
            entry += 1;
            let r = relay_store
                .append(SPACE, &dev(1), &[upload(entry, &format!("r{i}"), &change)])
                .unwrap();
            assert!(matches!(r[0].outcome, ChangeOutcome::Stored { .. }));
        }
    };
    let day = 86_400_000u64;
    let t0 = 100 * day;
    let by_age = LogRetention {
        keep_log_days: 2,
        keep_log_entries: 0,
        flatten_history: false,
    };
    // Day 0: 3 rounds (12 entries), noted at day 0.
    for round in 0..3 {
        send(&relay_store, &mut writers, round);
    }
    assert_eq!(relay_store.compact_log(SPACE, t0, by_age).unwrap(), None);
    // Day 1: 2 more rounds (20 entries), noted; at day 2.5 what day 0 noted is old enough,
    // what day 1 noted is not.
    for round in 3..5 {
        send(&relay_store, &mut writers, round);
    }
    assert_eq!(
        relay_store.compact_log(SPACE, t0 + day, by_age).unwrap(),
        None
    );
    let docs = |relay_store: &RelayStore| -> Vec<_> {
        (0..4)
            .map(|i| {
                let id = format!("r{i}");
                (
                    relay_store.heads(SPACE, "Doc", &id).unwrap().unwrap(),
                    relay_store.record(SPACE, "Doc", &id).unwrap().unwrap(),
                )
            })
            .collect()
    };
    let before = docs(&relay_store);
    let bytes = relay_store.log_bytes(SPACE).unwrap();
    let done = relay_store
        .compact_log(SPACE, t0 + 5 * day / 2, by_age)
        .unwrap()
        .unwrap();
    assert_eq!(done.horizon, 12, "the head day 0 noted");
    assert_eq!(done.bases_saved, 4);
    assert_eq!((done.bytes_before, done.bytes_after < bytes), (bytes, true));
    assert_eq!(docs(&relay_store), before);
    // Reads below the horizon say so; reads from it go on.
    let slice = relay_store.read_since(SPACE, 5, 100, usize::MAX).unwrap();
    assert_eq!((slice.horizon, slice.entries.len()), (12, 0));
    let slice = relay_store.read_since(SPACE, 12, 100, usize::MAX).unwrap();
    assert_eq!(slice.entries.len(), 8);
    let page = relay_store
        .snapshot_page(SPACE, None, 10, usize::MAX, None)
        .unwrap();
    assert_eq!((page.horizon, page.head, page.records.len()), (12, 20, 4));
    // An old change sent again is still a duplicate, and edits go on on top.
    let old = writers[0].changes[1].clone();
    let r = relay_store
        .append(SPACE, &dev(1), &[upload(900, "r0", &old)])
        .unwrap();
    assert_eq!(outcomes(&r), [ChangeOutcome::Duplicate { seq: 5 }]);
    send(&relay_store, &mut writers, 5);
    // By entries: the last 6 stay.
    let by_entries = LogRetention {
        keep_log_days: 0,
        keep_log_entries: 6,
        flatten_history: false,
    };
    let done = relay_store
        .compact_log(SPACE, t0 + 3 * day, by_entries)
        .unwrap()
        .unwrap();
    assert_eq!(done.horizon, 18);
    assert_eq!(
        relay_store
            .read_since(SPACE, 18, 100, usize::MAX)
            .unwrap()
            .entries
            .len(),
        6
    );
    for i in 0..4 {
        let fields = relay_store
            .record(SPACE, "Doc", &format!("r{i}"))
            .unwrap()
            .unwrap();
        assert_eq!(fields.get("n"), Some(&json!(5)), "{fields:?}");
    }
    assert_eq!(
        relay_store
            .compact_log(SPACE, t0 + 3 * day, by_entries)
            .unwrap(),
        None
    );
}

/// Three records written by one device: r0 and r1 created and edited three times (seqs 1-9,
/// the creates first), r2 created and edited once more at seq 10, so that a horizon at 9 leaves
/// r0's and r1's whole histories below it.
struct EditedSpace {
    relay_store: RelayStore,
    writers: Vec<Writer>,
    entry: u64,
}

/// Compaction keeping the last entry, flattening what falls below it.
const FLATTEN_ALL_BUT_LAST: LogRetention = LogRetention {
    keep_log_days: 0,
    keep_log_entries: 1,
    flatten_history: true,
};

impl EditedSpace {
    /// The space written through a relay store that saves a base every `compact_after` changes.
    fn new(engine: &dyn Engine, compact_after: usize) -> EditedSpace {
        let mut space = EditedSpace {
            relay_store: relay(engine.open(), compact_after),
            writers: (0..3).map(|_| Writer::new(1)).collect(),
            entry: 0,
        };
        for i in 0..3 {
            let change = space.writers[i].put(json!({"n": 0, "name": format!("r{i}")}));
            space.stored(&format!("r{i}"), &change);
        }
        for round in 1..4 {
            for i in 0..2 {
                let change = space.writers[i].patch(json!({"n": round}));
                space.stored(&format!("r{i}"), &change);
            }
        }
        let change = space.writers[2].patch(json!({"n": 9}));
        assert_eq!(
            space.store("r2", &change),
            ChangeOutcome::Stored { seq: 10 }
        );
        space
    }

    fn store(&mut self, record: &str, change: &[u8]) -> ChangeOutcome {
        self.entry += 1;
        outcomes(
            &self
                .relay_store
                .append(SPACE, &dev(1), &[upload(self.entry, record, change)])
                .unwrap(),
        )
        .remove(0)
    }

    fn stored(&mut self, record: &str, change: &[u8]) {
        let outcome = self.store(record, change);
        assert!(
            matches!(outcome, ChangeOutcome::Stored { .. }),
            "{outcome:?}"
        );
    }

    /// What the three records show.
    fn shown(&self) -> Vec<ferry::record::Fields> {
        (0..3)
            .map(|i| {
                self.relay_store
                    .record(SPACE, "Doc", &format!("r{i}"))
                    .unwrap()
                    .unwrap()
            })
            .collect()
    }
}

/// Flattening: with `flatten_history`, compaction starts again the history of each record whose
/// every change is below the horizon, as one change of the relay's that holds what the record
/// shows, logged as a flatten entry and kept as its base; a record changed above the horizon
/// keeps its history. Old changes stay duplicates, a change built on the old history is refused
/// `RecordPurged`, one built on the new history is logged, and no device may write a flatten
/// change itself.
fn histories_below_the_horizon_are_flattened(engine: &dyn Engine) {
    let mut space = EditedSpace::new(engine, 100);
    let before = space.shown();
    let r2_heads = space
        .relay_store
        .heads(SPACE, "Doc", "r2")
        .unwrap()
        .unwrap();
    let done = space
        .relay_store
        .compact_log(SPACE, 1_000, FLATTEN_ALL_BUT_LAST)
        .unwrap()
        .unwrap();
    assert_eq!((done.horizon, done.flattened, done.bases_saved), (9, 2, 0));
    assert_eq!(
        space.shown(),
        before,
        "flattening changes nothing a record shows"
    );
    assert_eq!(
        space
            .relay_store
            .heads(SPACE, "Doc", "r2")
            .unwrap()
            .unwrap(),
        r2_heads
    );
    // The flatten entries follow the head: one change each, depending on nothing.
    let slice = space
        .relay_store
        .read_since(SPACE, 10, 100, usize::MAX)
        .unwrap();
    let flattened: Vec<_> = slice
        .entries
        .iter()
        .map(|e| {
            (
                e.seq,
                e.record.clone(),
                ferry::record::decode_change(&e.change).unwrap(),
            )
        })
        .collect();
    assert_eq!(flattened.len(), 2);
    for (seq, record, change) in &flattened {
        assert!(change.deps().is_empty(), "entry {seq} of {record}");
        assert_eq!(change.message(), Some("flatten"));
        let heads = space
            .relay_store
            .heads(SPACE, "Doc", record)
            .unwrap()
            .unwrap();
        assert_eq!(heads, vec![change.hash().to_string()]);
    }
    // A snapshot sends each flattened record as its one change.
    let page = space
        .relay_store
        .snapshot_page(SPACE, None, 10, usize::MAX, None)
        .unwrap();
    let r0 = page.records.iter().find(|r| r.record == "r0").unwrap();
    assert!(ferry::record::is_one_change(&r0.document));
    let r2 = page.records.iter().find(|r| r.record == "r2").unwrap();
    assert!(!ferry::record::is_one_change(&r2.document));
    // Old changes are still duplicates; one built on the old history is refused, retryable.
    let old = space.writers[0].changes[1].clone();
    assert_eq!(space.store("r0", &old), ChangeOutcome::Duplicate { seq: 4 });
    let stale = space.writers[0].patch(json!({"n": 100}));
    let refused = space.store("r0", &stale);
    assert!(
        matches!(
            &refused,
            ChangeOutcome::Rejected {
                code: ErrorCode::RecordPurged,
                ..
            }
        ),
        "{refused:?}"
    );
    // A device that took the new history writes on it.
    let mut later = Writer {
        record: Record::load(&r0.document, &actor(1)).unwrap(),
        changes: Vec::new(),
    };
    let change = later.patch(json!({"n": 7}));
    let stored = space.store("r0", &change);
    assert!(matches!(stored, ChangeOutcome::Stored { .. }), "{stored:?}");
    assert_eq!(
        space
            .relay_store
            .record(SPACE, "Doc", "r0")
            .unwrap()
            .unwrap()
            .get("n"),
        Some(&json!(7))
    );
    // Only the relay writes flatten changes.
    let forged = Record::new(&actor(3))
        .flatten(&fields(json!({"n": 1})), 1)
        .unwrap()
        .unwrap()
        .change;
    let refused = space.store("r9", forged.raw_bytes());
    assert!(
        matches!(
            &refused,
            ChangeOutcome::Rejected {
                code: ErrorCode::InvalidChange,
                ..
            }
        ),
        "{refused:?}"
    );
}

/// Flattening reaches the records whose bases hold every change already (saved as they were
/// written, so compaction has no tail of theirs to save): the sweep finds them by their logged
/// heads, and leaves alone a record of one change or one already flattened.
fn settled_histories_are_flattened_by_the_sweep(engine: &dyn Engine) {
    // A base saved after every second change.
    let mut space = EditedSpace::new(engine, 2);
    let before = space.shown();
    let done = space
        .relay_store
        .compact_log(SPACE, 1_000, FLATTEN_ALL_BUT_LAST)
        .unwrap()
        .unwrap();
    assert_eq!(done.flattened, 2, "{done:?}");
    assert_eq!(space.shown(), before);
    for id in ["r0", "r1"] {
        assert_eq!(
            space
                .relay_store
                .heads(SPACE, "Doc", id)
                .unwrap()
                .unwrap()
                .len(),
            1
        );
    }
    // Another pass, once the horizon moved past the flatten entries: nothing left to flatten.
    let change = space.writers[2].patch(json!({"n": 10}));
    space.store("r2", &change);
    let change = space.writers[2].patch(json!({"n": 11}));
    space.store("r2", &change);
    let done = space
        .relay_store
        .compact_log(SPACE, 2_000, FLATTEN_ALL_BUT_LAST)
        .unwrap()
        .unwrap();
    assert_eq!(done.flattened, 0, "{done:?}");
}

/// Tombstones: a record deleted `tombstone_days` ago gets a purge entry in the log (an entry
/// with no change), and its base, tail, heads and conflict entries go while a purge marker and
/// its dedup index stay; a record changed since its delete, or live, stays. A change built on
/// the purged history is answered `RecordPurged`; a restoration, a new history, is logged with
/// an `update_delete` conflict entry; all of it after a restart too.
fn a_record_deleted_long_enough_ago_is_purged_by_a_purge_entry(engine: &dyn Engine) {
    let day = 86_400_000u64;
    let t0 = 100 * day;
    let storage = engine.open();
    let relay_store = RelayStore::open(
        storage.clone(),
        RelayStoreOptions {
            clock: Arc::new(FixedClock(t0)),
            doc_cache_docs: 1,
            ..RelayStoreOptions::default()
        },
    );
    let store = |relay_store: &RelayStore, entry: u64, record: &str, change: &[u8]| {
        outcomes(
            &relay_store
                .append(SPACE, &dev(1), &[upload(entry, record, change)])
                .unwrap(),
        )
        .remove(0)
    };
    // "gone": written, edited concurrently by two devices (a conflict entry), deleted.
    let mut a = Writer::new(1);
    let first = a.put(json!({"n": 0}));
    let mut b = Record::load(&first, &actor(2)).unwrap();
    let b_edit = b
        .patch(&fields(json!({"n": 2})), &[], 3)
        .unwrap()
        .unwrap()
        .change
        .raw_bytes()
        .to_vec();
    let a_edit = a.patch(json!({"n": 1}));
    store(&relay_store, 1, "gone", &first);
    store(&relay_store, 2, "gone", &a_edit);
    let r = relay_store
        .append(SPACE, &dev(2), &[upload(3, "gone", &b_edit)])
        .unwrap();
    assert!(matches!(r[0].outcome, ChangeOutcome::Stored { seq: 3 }));
    assert_eq!(
        relay_store.conflicts(SPACE, None, None, 10).unwrap().len(),
        1
    );
    a.record.apply_changes(&[b_edit]).unwrap();
    // What a device offline since the edits still holds.
    let mut late = Record::load(&a.record.save(), &actor(1)).unwrap();
    let delete = a
        .record
        .delete(4)
        .unwrap()
        .unwrap()
        .change
        .raw_bytes()
        .to_vec();
    assert_eq!(
        store(&relay_store, 4, "gone", &delete),
        ChangeOutcome::Stored { seq: 4 }
    );
    // "back": deleted, then written again; "kept": live.
    let mut back = Writer::new(1);
    store(&relay_store, 5, "back", &back.put(json!({"n": 0})));
    let deleted = back
        .record
        .delete(5)
        .unwrap()
        .unwrap()
        .change
        .raw_bytes()
        .to_vec();
    store(&relay_store, 6, "back", &deleted);
    store(&relay_store, 7, "back", &back.put(json!({"n": 7})));
    let mut kept = Writer::new(1);
    store(&relay_store, 8, "kept", &kept.put(json!({"n": 8})));
    let head = relay_store.head(SPACE).unwrap();
    assert_eq!(head, 8);

    // Not old enough yet; never with 0 days.
    assert_eq!(
        relay_store
            .purge_tombstones(SPACE, t0 + day / 2, day)
            .unwrap(),
        0
    );
    assert_eq!(
        relay_store
            .purge_tombstones(SPACE, t0 + 9 * day, 0)
            .unwrap(),
        0
    );
    assert_eq!(relay_store.head(SPACE).unwrap(), head);
    assert_eq!(
        relay_store
            .purge_tombstones(SPACE, t0 + 2 * day, day)
            .unwrap(),
        1
    );
    assert_eq!(
        relay_store
            .purge_tombstones(SPACE, t0 + 3 * day, day)
            .unwrap(),
        0
    );

    let check = |relay_store: &RelayStore, storage: &dyn RelayStorage| {
        let slice = relay_store.read_since(SPACE, head, 10, usize::MAX).unwrap();
        assert_eq!(slice.entries.len(), 1);
        let purge = &slice.entries[0];
        assert!(purge.is_purge(), "{purge:?}");
        assert_eq!((purge.seq, purge.record.as_str()), (9, "gone"));
        assert_eq!(storage.purged_at(SPACE, "Doc", "gone").unwrap(), Some(9));
        assert_eq!(storage.purged_at(SPACE, "Doc", "back").unwrap(), None);
        assert_eq!(storage.base(SPACE, "Doc", "gone").unwrap(), None);
        assert!(storage.tail(SPACE, "Doc", "gone").unwrap().is_empty());
        assert_eq!(storage.record_heads(SPACE, "Doc", "gone").unwrap(), None);
        assert!(
            storage
                .record_conflicts(SPACE, "Doc", "gone")
                .unwrap()
                .is_empty()
        );
        assert!(
            storage
                .conflicts(SPACE, false, None, 10)
                .unwrap()
                .is_empty()
        );
        assert!(storage.tombstones(SPACE, 10).unwrap().is_empty());
        let names: Vec<String> = storage
            .record_names(SPACE, None, 10)
            .unwrap()
            .into_iter()
            .map(|n| n.record)
            .collect();
        assert_eq!(names, ["back", "kept"]);
        assert_eq!(
            relay_store.record(SPACE, "Doc", "back").unwrap(),
            Some(fields(json!({"n": 7})))
        );
    };
    check(&relay_store, storage.as_ref());

    // An old change sent again is still a duplicate; an edit built on the purged history is
    // refused as such, and is retryable: the device keeps it until it meets the purge entry.
    assert_eq!(
        store(&relay_store, 20, "gone", &first),
        ChangeOutcome::Duplicate { seq: 1 }
    );
    let edit = late
        .patch(&fields(json!({"late": true})), &[], 6)
        .unwrap()
        .unwrap()
        .change
        .raw_bytes()
        .to_vec();
    let ChangeOutcome::Rejected { code, .. } = store(&relay_store, 21, "gone", &edit) else {
        panic!("a change on a purged history was logged");
    };
    assert_eq!(code, ErrorCode::RecordPurged);
    assert!(code.is_retryable());
    assert_eq!(relay_store.head(SPACE).unwrap(), 9);
    drop((relay_store, storage));
    let storage = engine.reopen();
    let relay_store = RelayStore::open(storage.clone(), RelayStoreOptions::default());
    check(&relay_store, storage.as_ref());

    // The device writes the record again as it showed it: a new history, under the same actor,
    // logged with an update_delete conflict entry.
    let mut restored = Record::new(&actor(1));
    let shown = late.fields();
    let change = restored
        .restore_purged(&shown, false, 7)
        .unwrap()
        .unwrap()
        .change
        .raw_bytes()
        .to_vec();
    assert_eq!(
        store(&relay_store, 22, "gone", &change),
        ChangeOutcome::Stored { seq: 10 }
    );
    assert_eq!(
        relay_store.record(SPACE, "Doc", "gone").unwrap(),
        Some(shown)
    );
    let conflicts = relay_store.conflicts(SPACE, None, None, 10).unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let conflict = &conflicts[0];
    assert_eq!(
        (conflict.kind, conflict.seq, conflict.record.as_str()),
        (ConflictKind::UpdateDelete, 10, "gone")
    );
    assert_eq!(conflict.status, ConflictStatus::AutoResolved);
    assert!(conflict.server.deleted && !conflict.client.deleted);
    assert_eq!(conflict.client.fields.get("late"), Some(&json!(true)));
}

/// The embedded engine's key of a record's value: `{kind}{space}\0Doc\0{id}\0`, then `seq`.
fn record_key(kind: u8, id: &str, seq: Option<u64>) -> Vec<u8> {
    let mut key = vec![kind];
    for part in [SPACE, "Doc", id] {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    key.extend(seq.into_iter().flat_map(u64::to_be_bytes));
    key
}

/// A record whose document, tail and heads are damaged on disk is refused naming it, then
/// rebuilt from its log entries: the same fields and heads, served at once and after a restart,
/// taking new changes on top. Once the log is compacted past its first change a rebuild is
/// refused, saying why, and writes nothing.
fn a_damaged_document_is_rebuilt_from_the_log_until_compacted_past_it(engine: &dyn Engine) {
    let storage = engine.open();
    let relay_store = relay(storage.clone(), 3);
    let mut writer = Writer::new(1);
    let mut other = Writer::new(1);
    let mut n = 0;
    let mut send = |relay_store: &RelayStore, record: &str, change: Vec<u8>| {
        n += 1;
        let r = relay_store
            .append(SPACE, &dev(1), &[upload(n, record, &change)])
            .unwrap();
        assert!(
            matches!(r[0].outcome, ChangeOutcome::Stored { .. }),
            "{r:?}"
        );
    };
    send(
        &relay_store,
        "r0",
        writer.put(json!({"n": 0, "name": "zero"})),
    );
    send(&relay_store, "r1", other.put(json!({"n": 100})));
    for round in 1..=5 {
        send(&relay_store, "r0", writer.patch(json!({"n": round})));
    }
    let heads = relay_store.heads(SPACE, "Doc", "r0").unwrap().unwrap();
    let fields = relay_store.record(SPACE, "Doc", "r0").unwrap().unwrap();
    let tail = storage.tail(SPACE, "Doc", "r0").unwrap();
    assert!(!tail.is_empty(), "r0 keeps a tail past its base");
    assert!(storage.record_heads(SPACE, "Doc", "r0").unwrap().is_some());
    drop((relay_store, storage));

    let mut keys = vec![record_key(b'b', "r0", None), record_key(b'r', "r0", None)];
    keys.extend(tail.iter().map(|&seq| record_key(b't', "r0", Some(seq))));
    engine.damage(&keys);
    let storage = engine.reopen();
    let relay_store = relay(storage.clone(), 3);
    let refused = relay_store.record(SPACE, "Doc", "r0").unwrap_err();
    match &refused {
        RelayStoreError::Storage(StorageError::Damaged { record, .. }) => {
            assert_eq!(record.as_ref(), Some(&rec("r0")), "{refused}");
        }
        other => panic!("not refused as damaged: {other}"),
    }
    assert!(refused.to_string().contains("rebuild-record"), "{refused}");

    let rebuilt = relay_store.rebuild_record(SPACE, "Doc", "r0").unwrap();
    assert_eq!(
        (rebuilt.changes, rebuilt.first_seq, rebuilt.last_seq),
        (6, 1, 7)
    );
    assert_eq!(rebuilt.heads, heads);
    assert_eq!(
        relay_store.record(SPACE, "Doc", "r0").unwrap(),
        Some(fields.clone())
    );
    assert_eq!(
        relay_store.heads(SPACE, "Doc", "r0").unwrap(),
        Some(heads.clone())
    );
    assert_eq!(storage.tail(SPACE, "Doc", "r0").unwrap(), Vec::<u64>::new());
    let stored_heads: Vec<String> = storage
        .record_heads(SPACE, "Doc", "r0")
        .unwrap()
        .unwrap()
        .iter()
        .map(|h| automerge::ChangeHash(*h).to_string())
        .collect();
    assert_eq!(stored_heads, heads);
    assert_eq!(storage.head(SPACE).unwrap(), 7, "a rebuild logs nothing");
    assert!(matches!(
        relay_store.rebuild_record(SPACE, "Doc", "nothing"),
        Err(RelayStoreError::NoSuchRecord { .. })
    ));
    drop((relay_store, storage));

    // Durable, and the record takes new changes on top.
    let storage = engine.reopen();
    let relay_store = relay(storage.clone(), 3);
    assert_eq!(
        relay_store.record(SPACE, "Doc", "r0").unwrap(),
        Some(fields.clone())
    );
    send(&relay_store, "r0", writer.patch(json!({"n": 6})));
    let fields = relay_store.record(SPACE, "Doc", "r0").unwrap().unwrap();
    assert_eq!(fields.get("n"), Some(&json!(6)));

    // Compacted past r0's first change: only its base holds it, so a rebuild is refused.
    let compacted = relay_store
        .compact_log(
            SPACE,
            0,
            LogRetention {
                keep_log_days: 0,
                keep_log_entries: 2,
                flatten_history: false,
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(compacted.horizon, 6);
    let refused = relay_store.rebuild_record(SPACE, "Doc", "r0").unwrap_err();
    assert!(
        matches!(
            refused,
            RelayStoreError::Compacted {
                first: 1,
                horizon: 6,
                ..
            }
        ),
        "{refused}"
    );
    assert!(refused.to_string().contains("backup"), "{refused}");
    assert_eq!(
        relay_store.record(SPACE, "Doc", "r0").unwrap(),
        Some(fields)
    );
}

fn relay(storage: Arc<dyn RelayStorage>, compact_after: usize) -> RelayStore {
    RelayStore::open(
        storage,
        RelayStoreOptions {
            compact_after,
            doc_cache_docs: 1,
            ..RelayStoreOptions::default()
        },
    )
}

/// Through the relay store: the same bytes under two records are two entries, a change sent
/// again is a duplicate, a change whose dependency is not logged for its record is refused, and
/// documents read right across compactions and a restart.
fn the_relay_store_deduplicates_per_record_and_keeps_the_log_causally_closed(engine: &dyn Engine) {
    let relay_store = relay(engine.open(), 2);
    let (mut a, mut b) = (Writer::new(1), Writer::new(1));
    let first_a = a.put(json!({"name": "same"}));
    let first_b = b.put(json!({"name": "same"}));
    assert_eq!(first_a, first_b, "the two creations are the same bytes");
    let second_a = a.patch(json!({"n": 1}));
    let r = relay_store
        .append(
            SPACE,
            &dev(1),
            &[
                upload(1, "b", &second_a),
                upload(2, "a", &first_a),
                upload(3, "b", &first_b),
                upload(4, "a", &second_a),
                upload(5, "a", &first_a),
            ],
        )
        .unwrap();
    let got = outcomes(&r);
    assert!(matches!(
        got[0],
        ChangeOutcome::Rejected {
            code: ErrorCode::MissingDependencies,
            ..
        }
    ));
    assert_eq!(
        got[1..],
        [
            ChangeOutcome::Stored { seq: 1 },
            ChangeOutcome::Stored { seq: 2 },
            ChangeOutcome::Stored { seq: 3 },
            ChangeOutcome::Duplicate { seq: 1 },
        ]
    );
    for n in 2..6 {
        let change = a.patch(json!({ "n": n }));
        relay_store
            .append(SPACE, &dev(1), &[upload(n, "a", &change)])
            .unwrap();
    }
    assert_eq!(
        relay_store.record(SPACE, "Doc", "a").unwrap(),
        Some(a.record.fields())
    );
    drop(relay_store);
    let relay_store = relay(engine.reopen(), 2);
    assert_eq!(relay_store.head(SPACE).unwrap(), 7);
    assert_eq!(
        relay_store.record(SPACE, "Doc", "a").unwrap(),
        Some(a.record.fields())
    );
    assert_eq!(
        relay_store.record(SPACE, "Doc", "b").unwrap(),
        Some(b.record.fields())
    );
    let r = relay_store
        .append(SPACE, &dev(1), &[upload(1, "a", &first_a)])
        .unwrap();
    assert_eq!(outcomes(&r), [ChangeOutcome::Duplicate { seq: 1 }]);
}

/// One step of building concurrent histories: a replica of a document writes, or merges in the
/// other replica.
#[derive(Debug, Clone)]
enum Step {
    Write {
        doc: usize,
        replica: usize,
        field: u8,
        value: i64,
    },
    Merge {
        doc: usize,
        into: usize,
    },
}

fn step(docs: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..docs, 0..2usize, 0..4u8, any::<i64>()).prop_map(|(doc, replica, field, value)| {
            Step::Write { doc, replica, field, value }
        }),
        1 => (0..docs, 0..2usize).prop_map(|(doc, into)| Step::Merge { doc, into }),
    ]
}

/// Changes of 2-3 documents, written concurrently on two replicas each, uploaded in a random
/// order and random batches, with refused ones uploaded again the way a device retries:
/// everything ends up stored once, the log replays in order without a missing dependency,
/// and every replayed document has the heads of merging both replicas.
fn any_upload_order_gives_a_causally_closed_log(
    engine: &dyn Engine,
    docs: usize,
    steps: Vec<Step>,
    order: Vec<u32>,
    batch: usize,
) -> Result<(), TestCaseError> {
    let mut replicas: Vec<[Record; 2]> = (0..docs)
        .map(|d| {
            let mut first = Record::new(&actor(1));
            first.put(&fields(json!({"doc": d})), 1).unwrap();
            let second = Record::load(&first.save(), &actor(2)).unwrap();
            [first, second]
        })
        .collect();
    for s in steps {
        match s {
            Step::Write {
                doc,
                replica,
                field,
                value,
            } => {
                let r = &mut replicas[doc % docs][replica];
                r.patch(&fields(json!({ format!("f{field}"): value })), &[], 2)
                    .unwrap();
            }
            Step::Merge { doc, into } => {
                let [a, b] = &mut replicas[doc % docs];
                let (to, from) = if into == 0 { (a, b) } else { (b, a) };
                to.doc_mut().merge(from.doc_mut()).unwrap();
            }
        }
    }
    let mut merged = Vec::new();
    let mut pending = Vec::new();
    for (d, [a, b]) in replicas.iter_mut().enumerate() {
        a.doc_mut().merge(b.doc_mut()).unwrap();
        for change in a.doc_mut().get_changes(&[]) {
            pending.push(upload(0, &format!("d{d}"), change.raw_bytes()));
        }
        merged.push(a.heads());
    }
    let total = pending.len();
    let mut key = order.iter().cycle();
    let mut keyed: Vec<(u32, UploadChange)> = pending
        .drain(..)
        .map(|u| (*key.next().unwrap(), u))
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    pending = keyed.into_iter().map(|(_, u)| u).collect();

    let relay = RelayStore::open(
        engine.open(),
        RelayStoreOptions {
            compact_after: 3,
            ..RelayStoreOptions::default()
        },
    );
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        prop_assert!(rounds <= total + 1, "uploads stopped making progress");
        let mut refused = Vec::new();
        for chunk in pending.chunks(batch) {
            let results = append_by_author(&relay, chunk);
            for (u, r) in chunk.iter().zip(results) {
                match r.outcome {
                    ChangeOutcome::Stored { .. } => {}
                    ChangeOutcome::Rejected {
                        code: ErrorCode::MissingDependencies,
                        ..
                    } => {
                        refused.push(u.clone());
                    }
                    other => prop_assert!(false, "unexpected {other:?}"),
                }
            }
        }
        pending = refused;
    }
    prop_assert_eq!(relay.head(SPACE).unwrap(), total as u64);

    let log = relay
        .read_since(SPACE, 0, usize::MAX / 8, usize::MAX)
        .unwrap();
    prop_assert_eq!(log.entries.len(), total);
    let mut replayed: BTreeMap<String, Record> = BTreeMap::new();
    for entry in &log.entries {
        let doc = replayed
            .entry(entry.record.clone())
            .or_insert_with(|| Record::new(&actor(7)));
        prop_assert!(
            doc.apply_changes(std::slice::from_ref(&entry.change))
                .is_ok(),
            "entry {} cannot be applied in log order",
            entry.seq
        );
    }
    for (d, heads) in merged.iter().enumerate() {
        let id = format!("d{d}");
        let mut replay = replayed.remove(&id).unwrap();
        prop_assert_eq!(&replay.heads(), heads);
        let relay_heads = relay.heads(SPACE, "Doc", &id).unwrap().unwrap();
        let expected: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
        prop_assert_eq!(relay_heads, expected);
    }
    Ok(())
}

/// The suite, run against one engine: `conformance!(module name, engine constructor)`.
macro_rules! conformance {
    ($name:ident, $engine:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn log_entries_number_from_the_head_and_read_back_in_ranges() {
                super::log_entries_number_from_the_head_and_read_back_in_ranges(&$engine);
            }

            #[test]
            fn an_append_staged_against_a_head_that_moved_is_refused_whole() {
                super::an_append_staged_against_a_head_that_moved_is_refused_whole(&$engine);
            }

            #[test]
            fn records_keep_a_base_a_tail_and_heads_and_compaction_replaces_the_tail() {
                super::records_keep_a_base_a_tail_and_heads_and_compaction_replaces_the_tail(
                    &$engine,
                );
            }

            #[test]
            fn bases_of_many_records_are_each_records_base() {
                super::bases_of_many_records_are_each_records_base(&$engine);
            }

            #[test]
            fn conflict_counts_and_log_bytes_add_up_across_appends() {
                super::conflict_counts_and_log_bytes_add_up_across_appends(&$engine);
            }

            #[test]
            fn the_unique_index_holds_each_values_holders_in_order() {
                super::the_unique_index_holds_each_values_holders_in_order(&$engine);
            }

            #[test]
            fn conflict_entries_are_listed_in_id_order_and_open_ones_by_their_own_index() {
                super::conflict_entries_are_listed_in_id_order_and_open_ones_by_their_own_index(
                    &$engine,
                );
            }

            #[test]
            fn a_spaces_web_actor_is_chosen_once_and_kept() {
                super::a_spaces_web_actor_is_chosen_once_and_kept(&$engine);
            }

            #[test]
            fn accounts_devices_codes_families_keys_and_passwords_commit_whole() {
                super::accounts_devices_codes_families_keys_and_passwords_commit_whole(&$engine);
            }

            #[test]
            fn the_log_is_compacted_only_through_what_bases_hold() {
                super::the_log_is_compacted_only_through_what_bases_hold(&$engine);
            }

            #[test]
            fn a_base_that_is_one_change_is_known_by_its_hash() {
                super::a_base_that_is_one_change_is_known_by_its_hash(&$engine);
            }

            #[test]
            fn the_relay_store_compacts_by_entries_and_age_and_documents_stay_whole() {
                super::the_relay_store_compacts_by_entries_and_age_and_documents_stay_whole(
                    &$engine,
                );
            }

            #[test]
            fn histories_below_the_horizon_are_flattened() {
                super::histories_below_the_horizon_are_flattened(&$engine);
            }

            #[test]
            fn settled_histories_are_flattened_by_the_sweep() {
                super::settled_histories_are_flattened_by_the_sweep(&$engine);
            }

            #[test]
            fn a_record_deleted_long_enough_ago_is_purged_by_a_purge_entry() {
                super::a_record_deleted_long_enough_ago_is_purged_by_a_purge_entry(&$engine);
            }

            #[test]
            fn a_damaged_document_is_rebuilt_from_the_log_until_compacted_past_it() {
                super::a_damaged_document_is_rebuilt_from_the_log_until_compacted_past_it(&$engine);
            }

            #[test]
            fn everything_committed_is_there_after_a_restart() {
                super::everything_committed_is_there_after_a_restart(&$engine);
            }

            #[test]
            fn the_relay_store_deduplicates_per_record_and_keeps_the_log_causally_closed() {
                super::the_relay_store_deduplicates_per_record_and_keeps_the_log_causally_closed(
                    &$engine,
                );
            }

            proptest! {
                #![proptest_config(proptest_config(48))]

                #[test]
                fn any_upload_order_gives_a_causally_closed_log(
                    docs in 2..=3usize,
                    steps in proptest::collection::vec(step(3), 1..30),
                    order in proptest::collection::vec(any::<u32>(), 64),
                    batch in 1..6usize,
                ) {
                    super::any_upload_order_gives_a_causally_closed_log(
                        &$engine, docs, steps, order, batch,
                    )?;
                }
            }
        }
    };
}

conformance!(memory, Memory::new());
conformance!(sled, Sled::new());
conformance!(postgres, Postgres::new());
