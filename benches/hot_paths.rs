//! Criterion benchmarks of the local write and read hot paths: building a record document,
//! saving and loading it, reading it as its strategy shows it, decoding a received change and
//! running conflict detection on it, and a store write on the in-memory engine and on sled. Records have the
//! shape every benchmark uses (`workload::record_fields`). Also issuing and verifying an access
//! token, which the relay does on every connection.

// A benchmark stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod workload;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ferry::clock::SystemClock;
use ferry::record::{Fields, Record};
use ferry::resolve::{self, Policy};
use ferry::store::kv::{MemoryKv, SledKv};
use ferry::store::{Store, StoreOptions, Write};
use serde_json::json;
use std::hint::black_box;
use std::sync::Arc;
use workload::record_fields as fields;

const DEVICE: &str = "0123456789abcdef0123456789abcdef";

fn actor() -> automerge::ActorId {
    automerge::ActorId::from(&[7u8; 16][..])
}

/// Encrypting and decrypting one field value (a 20-character string, as the benchmark records
/// hold), with its associated data.
fn crypt_benches(c: &mut Criterion) {
    use ferry::crypt::{AccountKey, FieldAt};
    // Derived once, outside the measurement: Argon2id is meant to be slow.
    let key = AccountKey::derive(b"benchmark passphrase", "default").unwrap();
    let at = FieldAt {
        collection: "Customer",
        id: "c000000001",
        field: "s5",
    };
    let value = fields(1)["s5"].clone();
    c.bench_function("crypt/seal_field", |b| {
        b.iter(|| black_box(key.seal(at, &value).unwrap()))
    });
    let sealed = key.seal(at, &value).unwrap();
    c.bench_function("crypt/open_field", |b| {
        b.iter(|| black_box(key.open(at, &sealed).unwrap()))
    });
}

fn record_benches(c: &mut Criterion) {
    let f = fields(1);
    c.bench_function("record/create_10_fields", |b| {
        b.iter(|| {
            let mut r = Record::new(&actor());
            black_box(r.put(&f, 1).unwrap());
        })
    });
    let mut r = Record::new(&actor());
    r.put(&f, 1).unwrap();
    c.bench_function("record/save", |b| b.iter(|| black_box(r.save())));
    let bytes = r.save();
    c.bench_function("record/load", |b| {
        b.iter(|| black_box(Record::load(&bytes, &actor()).unwrap()))
    });
    let mut loaded = Record::load(&bytes, &actor()).unwrap();
    c.bench_function("record/to_json", |b| b.iter(|| black_box(loaded.fields())));
    let merge = Policy::default();
    c.bench_function("resolve/view_merge", |b| {
        b.iter(|| black_box(resolve::view(&mut loaded, &merge)))
    });
    let change = loaded.heads()[0];
    let change_bytes = loaded
        .doc_mut()
        .get_change_by_hash(&change)
        .unwrap()
        .raw_bytes()
        .to_vec();
    c.bench_function("record/decode_change", |b| {
        b.iter(|| black_box(ferry::record::decode_change(&change_bytes).unwrap()))
    });
    c.bench_function("resolve/detect_fast_forward", |b| {
        let doc = loaded.automerge();
        b.iter(|| {
            let at = resolve::LogPosition {
                seq: 1,
                collection: "C",
                record: "r",
            };
            black_box(resolve::detect(doc, &[], &change, at, &merge))
        })
    });
    c.bench_function("record/update_one_field", |b| {
        b.iter_batched(
            || Record::load(&bytes, &actor()).unwrap(),
            |mut r| {
                let mut patch = Fields::new();
                patch.insert("i3".into(), json!(43));
                black_box(r.patch(&patch, &[], 2).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
}

/// Benchmarks creating records one by one in `store`, flushing after each when `flush` is set.
/// `n` numbers the records across benchmarks, so every write creates a new record.
fn bench_creates(c: &mut Criterion, name: &str, store: &Store, n: &mut u64, flush: bool) {
    c.bench_function(name, |b| {
        b.iter(|| {
            *n += 1;
            let write = Write::Put {
                collection: "Customer".into(),
                id: Some(format!("c{n}")),
                fields: fields(*n),
            };
            black_box(store.write(write).unwrap());
            if flush {
                store.flush().unwrap();
            }
        })
    });
}

fn store_benches(c: &mut Criterion) {
    let open = |kv: Box<dyn ferry::store::kv::Kv>| {
        Store::open(kv, DEVICE, StoreOptions::default(), Arc::new(SystemClock)).unwrap()
    };
    let mut n = 0;
    let mem = open(Box::new(MemoryKv::new()));
    bench_creates(c, "store/memory/create", &mem, &mut n, false);
    let dir = tempfile::tempdir().unwrap();
    let sled = open(Box::new(SledKv::open(dir.path(), 32 << 20).unwrap()));
    let first_sled_id = format!("c{}", n + 1);
    bench_creates(c, "store/sled/create_unflushed", &sled, &mut n, false);
    bench_creates(c, "store/sled/create_flushed", &sled, &mut n, true);
    let last_id = format!("c{n}");
    c.bench_function("store/sled/get_cached", |b| {
        b.iter(|| black_box(sled.get("Customer", &last_id).unwrap()))
    });
    c.bench_function("store/sled/get_uncached", |b| {
        b.iter(|| black_box(sled.get("Customer", &first_sled_id).unwrap()))
    });
}

/// Records in the store the read benchmarks page through: 100 of them share each `i4` value.
const READ_RECORDS: u64 = 50_000;

/// Reads answered from the records' views: a `list` page, and a page of a query an index
/// serves, unordered and ordered (what `get`, `list` and queries cost in the store, without the
/// socket).
fn read_benches(c: &mut Criterion) {
    use ferry::query::{Condition, Direction, Op, Query};
    let dir = tempfile::tempdir().unwrap();
    let mut options = StoreOptions::default();
    options.indexes.insert(
        "Customer".into(),
        vec![vec!["i4".into()], vec!["i4".into(), "i3".into()]],
    );
    let store = Store::open(
        Box::new(SledKv::open(dir.path(), 64 << 20).unwrap()),
        DEVICE,
        options,
        Arc::new(SystemClock),
    )
    .unwrap();
    for first in (0..READ_RECORDS).step_by(1000) {
        let writes = (first..first + 1000)
            .map(|n| Write::Put {
                collection: "Customer".into(),
                id: Some(workload::record_id(n)),
                fields: fields(n),
            })
            .collect();
        store.write_all(writes).unwrap();
    }
    store.flush().unwrap();
    let middle = workload::record_id(READ_RECORDS / 2);
    c.bench_function("store/sled/list_100", |b| {
        b.iter(|| black_box(store.list("Customer", Some(&middle), 100).unwrap()))
    });
    // Each query asks for another value, so that its records are not the ones just read.
    let queries = |order_by: Option<&str>| -> Vec<Query> {
        (0..500)
            .map(|n| {
                let equal = Condition {
                    field: "i4".into(),
                    op: Op::Eq,
                    value: Some(json!(-n)),
                };
                let order = order_by.map(|field| (field.to_owned(), Direction::Asc));
                Query::new(vec![equal], order).unwrap()
            })
            .collect()
    };
    for (name, order_by) in [
        ("store/sled/query_index_100", None),
        ("store/sled/query_index_ordered_100", Some("i3")),
    ] {
        let queries = queries(order_by);
        let mut next = queries.iter().cycle();
        c.bench_function(name, |b| {
            b.iter(|| {
                let query = next.next().unwrap();
                black_box(store.query("Customer", query, None, 100).unwrap())
            })
        });
    }
}

fn token_benches(c: &mut Criterion) {
    use ferry::auth::token::{KeyRing, SigningKeyEntry, TokenPolicy, issue_access, verify_access};
    const NOW: u64 = 1_700_000_000;
    let policy = TokenPolicy::default();
    let mut ring = KeyRing::default();
    // A ring after a rotation: the lookup walks past a retired key.
    ring.insert(SigningKeyEntry::from_seed("k1".into(), [1; 32], NOW - 10));
    ring.rotate(
        SigningKeyEntry::from_seed("k2".into(), [2; 32], NOW),
        NOW,
        &policy,
    );
    let issue = || issue_access(&ring, &policy, "alice", DEVICE, DEVICE, NOW, [3; 16]).unwrap();
    c.bench_function("token/issue_access", |b| b.iter(|| black_box(issue())));
    let (token, _) = issue();
    c.bench_function("token/verify_access", |b| {
        b.iter(|| black_box(verify_access(&ring, &policy, &token, NOW).unwrap()))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = crypt_benches, record_benches, store_benches, read_benches, token_benches
}
criterion_main!(benches);
