//! Criterion benchmarks of the relay store on sled, reported per change: appending creates (the
//! shared benchmark record shape), appending updates that fast-forward their record (conflict
//! detection's fast path: no detection runs, but validation applies the change to the record's
//! document, loaded when the cache no longer holds it), appending updates concurrent with the
//! record's last change to the same field (detection's slow path: `resolve::detect` finds an
//! update_update conflict), and reading the log back in pages of 1,000. Appends go in batches of
//! 500, each flushed, as devices upload them, each under its writer's own device id.

// A benchmark stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod workload;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry::record::Record;
use ferry::relay::storage::KvStorage;
use ferry::relay::store::{RelayStore, RelayStoreOptions};
use ferry::store::kv::SledKv;
use ferry_proto::wire::{ChangeOutcome, UploadChange};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 500;
/// Records in the pool of prepared changes; a sample needing more uses the pool again in
/// another space.
const POOL: u64 = 10_000;

/// Each record's changes: its create by device A, an update of `s1` by A after it, and an
/// update of `s1` by device B that saw only the create (concurrent with A's update).
struct Pool {
    create: Vec<UploadChange>,
    update: Vec<UploadChange>,
    concurrent: Vec<UploadChange>,
}

fn upload(n: u64, bytes: &[u8]) -> UploadChange {
    UploadChange {
        entry: n,
        collection: workload::COLLECTION.into(),
        record: workload::record_id(n),
        change: bytes.to_vec(),
    }
}

fn pool() -> Pool {
    let (a, b) = (
        automerge::ActorId::from(&[7u8; 16][..]),
        automerge::ActorId::from(&[8u8; 16][..]),
    );
    let mut pool = Pool {
        create: Vec::new(),
        update: Vec::new(),
        concurrent: Vec::new(),
    };
    for n in 0..POOL {
        let mut on_a = Record::new(&a);
        let created = on_a
            .put(&workload::record_fields(n), 1_700_000_000_000)
            .expect("build a record")
            .expect("a create is a change");
        let created = created.change.raw_bytes().to_vec();
        let mut on_b = Record::new(&b);
        on_b.apply_changes(std::slice::from_ref(&created))
            .expect("B applies the create");
        let s1 = |record: &mut Record, value: &str| {
            let fields = serde_json::json!({ "s1": value });
            let fields = fields.as_object().cloned().unwrap_or_default();
            let written = record
                .patch(&fields, &[], 1_700_000_000_001)
                .expect("patch")
                .expect("a patch is a change");
            written.change.raw_bytes().to_vec()
        };
        let updated = s1(&mut on_a, "from a");
        let concurrent = s1(&mut on_b, "from b");
        pool.create.push(upload(n, &created));
        pool.update.push(upload(n, &updated));
        pool.concurrent.push(upload(n, &concurrent));
    }
    pool
}

fn append_all(relay: &RelayStore, space: &str, changes: &[UploadChange]) {
    for batch in changes.chunks(BATCH) {
        // Each slice of the pool is one device's changes.
        let author = ferry::record::decode_change(&batch[0].change)
            .expect("a pool change decodes")
            .actor_id()
            .to_hex_string();
        let results = relay.append(space, &author, batch).expect("append");
        assert!(
            results
                .iter()
                .all(|r| matches!(r.outcome, ChangeOutcome::Stored { .. })),
            "every change is stored"
        );
    }
}

fn open_relay() -> (tempfile::TempDir, RelayStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let kv = SledKv::open(dir.path(), 64 << 20).expect("open sled");
    let storage = Arc::new(KvStorage::new(Arc::new(kv)));
    let relay = RelayStore::open(storage, RelayStoreOptions::default());
    (dir, relay)
}

/// Times appending `iters` changes of `timed`, after `before` (untimed) brought each record to
/// where they apply; the pool is used again in a new space as often as `iters` needs.
fn timed_appends(
    iters: u64,
    before: &[&[UploadChange]],
    timed: &[UploadChange],
) -> (Duration, RelayStore, tempfile::TempDir) {
    let (dir, relay) = open_relay();
    let mut left = iters as usize;
    let mut elapsed = Duration::ZERO;
    let mut pass = 0;
    while left > 0 {
        let n = left.min(timed.len());
        let space = format!("bench-{pass}");
        for changes in before {
            append_all(&relay, &space, &changes[..n]);
        }
        let started = Instant::now();
        append_all(&relay, &space, &timed[..n]);
        elapsed += started.elapsed();
        left -= n;
        pass += 1;
    }
    (elapsed, relay, dir)
}

fn relay_benches(c: &mut Criterion) {
    let pool = pool();
    let mut group = c.benchmark_group("relay_append");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(1));
    group.bench_function("create", |b| {
        b.iter_custom(|iters| timed_appends(iters, &[], &pool.create).0)
    });
    group.bench_function("update_fast_forward", |b| {
        b.iter_custom(|iters| timed_appends(iters, &[&pool.create], &pool.update).0)
    });
    group.bench_function("update_concurrent_conflict", |b| {
        b.iter_custom(|iters| {
            let (elapsed, relay, _dir) =
                timed_appends(iters, &[&pool.create, &pool.update], &pool.concurrent);
            let found: u64 = relay
                .conflict_counts("bench-0")
                .expect("counts")
                .iter()
                .map(|c| c.detected)
                .sum();
            assert_eq!(
                found,
                iters.min(POOL),
                "every concurrent update is a conflict"
            );
            elapsed
        })
    });
    group.finish();

    let (_dir, relay) = open_relay();
    append_all(&relay, "bench", &pool.create);
    let mut group = c.benchmark_group("relay_read_since");
    group.throughput(Throughput::Elements(POOL));
    group.bench_function("pages_of_1000", |b| {
        b.iter(|| {
            let (mut after, mut read) = (0, 0usize);
            loop {
                let slice = relay
                    .read_since("bench", after, 1000, 4 << 20)
                    .expect("read");
                if slice.entries.is_empty() {
                    break;
                }
                read += slice.entries.len();
                after = slice.through;
            }
            assert_eq!(read as u64, POOL);
        })
    });
    group.finish();
}

criterion_group!(benches, relay_benches);
criterion_main!(benches);
