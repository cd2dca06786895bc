//! Disk use of the real store (sled in a temp dir) against the data it holds, under churn: large
//! records rewritten many times, their queue entries retried (status rewritten again and again),
//! records deleted and the history pruned. The store must stay within twice its live data (the
//! bytes of every key and value) plus a small fixed floor (`SPACE_FLOOR_BYTES`), while it runs
//! and across a reopen.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Device, Engine, TIMEOUT, TestStore, Tmpfs, fields, status, wait_for};
use ferry::store::kv::{Batch, Kv, KvError, SledKv};
use ferry::store::sync::{BatchLimits, RetryPolicy};
use ferry::store::{SPACE_FLOOR_BYTES, Store, StoreOptions, Write};
use ferry_proto::Limits;
use ferry_proto::wire::{ChangeOutcome, ChangeResult, ErrorKind};
use serde_json::json;

/// How many times its live data the store may take, beside the floor.
const FACTOR: u64 = 2;

/// Text that does not compress much, so sizes measure the data and not the compressor.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

fn large_store() -> TestStore {
    TestStore::new(
        Engine::Sled,
        StoreOptions {
            limits: Limits {
                max_record_bytes: 16 << 20,
                ..Limits::default()
            },
            // As with `sync.max_frame_bytes` raised: changes this large are then written.
            max_change_bytes: 16 << 20,
            ..StoreOptions::default()
        },
    )
}

struct Sizes {
    on_disk: u64,
    live: u64,
}

impl Sizes {
    /// The sizes after the store has checked its space, as the daemon has it do now and then.
    fn of(t: &TestStore) -> Sizes {
        let store = t.store();
        store.flush().expect("flush");
        if let Some(c) = store.bound_space().expect("bound the space") {
            println!(
                "compacted: {} -> {} bytes on disk for {} live",
                c.before.store_bytes, c.after.store_bytes, c.after.live_bytes
            );
        }
        Sizes {
            on_disk: store.size_on_disk().expect("size on disk"),
            live: store.live_bytes().expect("live bytes"),
        }
    }

    fn within_bound(&self) -> bool {
        self.on_disk <= FACTOR * self.live + SPACE_FLOOR_BYTES
    }
}

impl std::fmt::Display for Sizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        write!(
            f,
            "{:.1} MB on disk for {:.1} MB live ({:.2}x)",
            mb(self.on_disk),
            mb(self.live),
            self.on_disk as f64 / self.live.max(1) as f64
        )
    }
}

/// Uploads as the daemon makes them, up to a frame of 64 MiB.
const LIMITS: BatchLimits = BatchLimits {
    max_changes: 1000,
    max_bytes: 64 << 20,
    max_change_bytes: 64 << 20,
};

/// Every pending entry goes into an upload that is lost `times` times (each a move to
/// processing and back to pending).
fn retry_uploads(t: &TestStore, times: usize) {
    let store = t.store();
    for _ in 0..times {
        let batch = store.next_upload_batch(LIMITS).expect("batch");
        let ids: Vec<u64> = batch.entries.iter().map(|e| e.id).collect();
        store
            .abandon_upload(
                &ids,
                "network: connection lost",
                ErrorKind::Network,
                &RetryPolicy::immediate(u32::MAX),
            )
            .expect("abandon");
        store.flush().expect("flush");
    }
}

/// Every pending entry is uploaded and stored by the relay.
fn complete_uploads(store: &Store) {
    loop {
        let batch = store.next_upload_batch(LIMITS).expect("batch").entries;
        if batch.is_empty() {
            break;
        }
        let results: Vec<ChangeResult> = batch
            .iter()
            .enumerate()
            .map(|(seq, e)| ChangeResult {
                entry: e.id,
                outcome: ChangeOutcome::Stored { seq: seq as u64 },
            })
            .collect();
        store
            .finish_upload(&results, &RetryPolicy::immediate(10))
            .expect("finish");
    }
    store.flush().expect("flush");
}

/// The churn, with the sizes after each phase (and the worst ratio seen).
fn churn(
    t: &mut TestStore,
    records: u64,
    record_bytes: usize,
    rounds: u64,
) -> Vec<(String, Sizes)> {
    let mut seen = Vec::new();
    for round in 0..rounds {
        for r in 0..records {
            let write = Write::Put {
                collection: "Big".into(),
                id: Some(format!("r{r}")),
                fields: fields(json!({ "body": noise(round * 1000 + r, record_bytes) })),
            };
            t.store().write(write).expect("write a large record");
            t.store().flush().expect("flush");
        }
        retry_uploads(t, 10);
        seen.push((
            format!("round {round}: rewritten and retried"),
            Sizes::of(t),
        ));
    }
    complete_uploads(t.store());
    for r in 0..records {
        t.store()
            .write(Write::Delete {
                collection: "Big".into(),
                id: format!("r{r}"),
            })
            .expect("delete");
    }
    complete_uploads(t.store());
    t.store()
        .prune_history(u64::MAX, u64::MAX, usize::MAX)
        .expect("prune");
    seen.push(("deleted and pruned".into(), Sizes::of(t)));
    t.reopen();
    seen.push(("reopened".into(), Sizes::of(t)));
    seen
}

fn report(name: &str, seen: &[(String, Sizes)]) {
    for (phase, sizes) in seen {
        println!("{name}: {phase}: {sizes}");
    }
}

/// The case seen on a device: one record of 9,000,000 bytes whose upload failed ten times.
#[test]
fn one_large_record_retried_stays_within_the_bound() {
    let mut t = large_store();
    let seen = churn(&mut t, 1, 9_000_000, 1);
    report("9 MB record retried", &seen);
    for (phase, sizes) in &seen {
        assert!(sizes.within_bound(), "{phase}: {sizes}");
    }
}

/// Several records of megabytes, each rewritten many times and retried after each rewrite,
/// then deleted and their history pruned.
#[test]
fn large_records_rewritten_retried_and_deleted_stay_within_the_bound() {
    let mut t = large_store();
    let seen = churn(&mut t, 3, 2_000_000, 6);
    report("3 x 2 MB records, 6 rounds", &seen);
    for (phase, sizes) in &seen {
        assert!(sizes.within_bound(), "{phase}: {sizes}");
    }
}

/// A store over its bound when the daemon starts (its large history pruned: the live data
/// shrank, its files did not) is compacted by the daemon without being asked, and `status`
/// shows the size on disk, the live bytes and when they were measured.
#[test]
fn the_daemon_compacts_a_store_over_its_bound_when_it_starts() {
    let dev = Device::new();
    let before = dev.with_store(|store| {
        for round in 0..8 {
            for r in 0..3u64 {
                let write = Write::Put {
                    collection: "Big".into(),
                    id: Some(format!("r{r}")),
                    fields: fields(json!({ "body": noise(round * 10 + r, 900_000) })),
                };
                store.write(write).expect("write a large record");
                store.flush().expect("flush");
            }
        }
        complete_uploads(store);
        store
            .prune_history(u64::MAX, u64::MAX, usize::MAX)
            .expect("prune");
        store.flush().expect("flush");
        // A measure is kept in the store, as a key the next measure counts: measured twice,
        // the live bytes are what the daemon will count.
        store.measure_space().expect("measure");
        store.measure_space().expect("measure")
    });
    assert!(
        before.over_bound(),
        "the churn left the store within its bound: {before:?}"
    );
    let daemon = dev.start_daemon();
    let mut last = serde_json::Value::Null;
    wait_for("the daemon to compact the store", TIMEOUT, || {
        last = status(&daemon);
        let (Some(on_disk), Some(live)) =
            (last["store_bytes"].as_u64(), last["live_bytes"].as_u64())
        else {
            return false;
        };
        on_disk <= FACTOR * live + SPACE_FLOOR_BYTES
    });
    assert_eq!(
        last["live_bytes"].as_u64(),
        Some(before.live_bytes),
        "{last}"
    );
    assert!(last["live_bytes_measured_ms"].as_u64().is_some(), "{last}");
    assert_eq!(last["storage"], json!({"state": "ok"}), "{last}");
    assert!(daemon.terminate().success());
}

/// A compaction whose copy does not fit on the disk fails alone: the store it was copying
/// stays open through its own cache, holds every pair, takes writes, and opens again as it was.
#[test]
fn a_compaction_that_runs_out_of_space_leaves_the_store_whole_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let _tmpfs = match Tmpfs::mount(&root, "4m") {
        Ok(t) => t,
        Err(reason) => {
            println!("SKIPPED a_compaction_that_runs_out_of_space_...: {reason}");
            eprintln!("SKIPPED a_compaction_that_runs_out_of_space_...: {reason}");
            return;
        }
    };
    let kv = SledKv::open(&root, 1 << 20).unwrap();
    let mut n = 0u64;
    // Less room left than the values hold: a whole copy beside them cannot fit.
    while ferry::alerting::disk_free(&root).unwrap() > n * 50_000 {
        let mut batch = Batch::default();
        batch.put(n.to_be_bytes().to_vec(), noise(n, 50_000).into_bytes());
        kv.apply(batch).unwrap();
        kv.flush().unwrap();
        n += 1;
    }
    let before = kv.range(b"", &[0xff], usize::MAX).unwrap();
    assert_eq!(before.len() as u64, n);
    let refused = kv.compact();
    assert!(
        matches!(refused, Err(KvError::DiskFull(_) | KvError::Io(_))),
        "{refused:?}"
    );
    assert_eq!(kv.range(b"", &[0xff], usize::MAX).unwrap(), before);
    let mut batch = Batch::default();
    batch.put(b"after".to_vec(), b"1".to_vec());
    kv.apply(batch).unwrap();
    kv.flush().unwrap();
    drop(kv);
    let kv = SledKv::open(&root, 1 << 20).unwrap();
    let mut expected = before;
    expected.push((b"after".to_vec(), b"1".to_vec()));
    assert_eq!(kv.range(b"", &[0xff], usize::MAX).unwrap(), expected);
}
