//! Relay append throughput: 100 000 single-record create changes (the shared benchmark record
//! shape) appended to one space on sled in batches of 500, each batch flushed, then the whole
//! log read back in pages. Prints changes per second. `RELAY_BENCH_CHANGES` sets the count.

mod workload;

use ferry::record::Record;
use ferry::relay::store::{RelayStore, RelayStoreOptions};
use ferry::store::kv::SledKv;
use ferry_proto::wire::{ChangeOutcome, UploadChange};
use std::sync::Arc;
use std::time::Instant;

const BATCH: usize = 500;

fn main() {
    let count: u64 = std::env::var("RELAY_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let actor = automerge::ActorId::from(&[7u8; 16][..]);
    let built = Instant::now();
    let changes: Vec<UploadChange> = (0..count)
        .map(|n| {
            let mut record = Record::new(&actor);
            let written = record
                .put(&workload::record_fields(n), 1_700_000_000_000)
                .expect("build a record")
                .expect("a create is a change");
            UploadChange {
                entry: n,
                collection: workload::COLLECTION.into(),
                record: workload::record_id(n),
                change: written.change.raw_bytes().to_vec(),
            }
        })
        .collect();
    eprintln!("built {count} changes in {:?}", built.elapsed());

    let dir = tempfile::tempdir().expect("temp dir");
    let kv = SledKv::open(dir.path(), 64 << 20).expect("open sled");
    let relay = RelayStore::open(Arc::new(kv), RelayStoreOptions::default()).expect("open relay");
    let started = Instant::now();
    for batch in changes.chunks(BATCH) {
        let results = relay.append("bench", "device", batch).expect("append");
        assert!(
            results
                .iter()
                .all(|r| matches!(r.outcome, ChangeOutcome::Stored { .. })),
            "every create is stored"
        );
    }
    let append = started.elapsed();
    println!(
        "append: {count} changes in {append:?}, {:.0} changes/s",
        count as f64 / append.as_secs_f64()
    );

    let started = Instant::now();
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
    let elapsed = started.elapsed();
    println!(
        "read_since: {read} changes in {elapsed:?}, {:.0} changes/s",
        read as f64 / elapsed.as_secs_f64()
    );
}
