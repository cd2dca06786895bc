//! A new device joining a space whose records were each edited many times: the bytes it is sent
//! and the time it takes to be in sync, bootstrapping from the relay's snapshot pages against
//! replaying the whole log, and both against joining a space whose records were written once.
//! In process: the relay store on sled (its size on disk reported), the joining device's store
//! in memory; every page is encoded as the frame the session would send (zstd when it pays), and
//! the frame's bytes counted.
//!
//! `cargo bench --bench snapshot` runs 10,000 records edited 100 times (`--records N`,
//! `--edits N` to change it). Under `cargo test` it runs 200 records edited 10 times, to check
//! that the harness works; those numbers mean nothing.

// A benchmark stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod workload;

use ferry::clock::SystemClock;
use ferry::record::Record;
use ferry::relay::storage::KvStorage;
use ferry::relay::store::{LogRetention, RelayStore, RelayStoreOptions};
use ferry::store::kv::{MemoryKv, SledKv};
use ferry::store::{Store, StoreOptions};
use ferry_proto::session::SessionConfig;
use ferry_proto::wire::{ChangeOutcome, Message, UploadChange, encode_frame};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 1_000;
const WRITER: [u8; 16] = [7; 16];
const JOINER: &str = "0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d";

/// Appends every record's changes, `edits` per record after its create, record after record
/// (so the relay's document cache holds the record being edited, as it would for a device
/// editing a few records at a time).
fn write_space(relay: &RelayStore, space: &str, records: u64, edits: u64) {
    let actor = automerge::ActorId::from(&WRITER[..]);
    let author = actor.to_hex_string();
    let mut pending: Vec<UploadChange> = Vec::with_capacity(BATCH);
    let flush = |pending: &mut Vec<UploadChange>| {
        let results = relay.append(space, &author, pending).expect("append");
        assert!(
            results
                .iter()
                .all(|r| matches!(r.outcome, ChangeOutcome::Stored { .. })),
            "every change is stored"
        );
        pending.clear();
    };
    for n in 0..records {
        let mut record = Record::new(&actor);
        let mut changes = vec![
            record
                .put(&workload::record_fields(n), 1_700_000_000_000)
                .expect("create")
                .expect("a create is a change")
                .change,
        ];
        for e in 0..edits {
            let fields = serde_json::json!({ "i1": e, "s1": format!("edit {e} of {n}") });
            let fields = fields.as_object().cloned().unwrap_or_default();
            changes.push(
                record
                    .patch(&fields, &[], 1_700_000_000_001 + e)
                    .expect("patch")
                    .expect("a patch is a change")
                    .change,
            );
        }
        for change in changes {
            pending.push(UploadChange {
                entry: pending.len() as u64,
                collection: workload::COLLECTION.into(),
                record: workload::record_id(n),
                change: change.raw_bytes().to_vec(),
            });
            if pending.len() == BATCH {
                flush(&mut pending);
            }
        }
    }
    if !pending.is_empty() {
        flush(&mut pending);
    }
}

fn joiner() -> Store {
    Store::open(
        Box::new(MemoryKv::new()),
        JOINER,
        StoreOptions::default(),
        Arc::new(SystemClock),
    )
    .expect("open the joining device's store")
}

fn frame_bytes(message: &Message) -> u64 {
    encode_frame(message).expect("encode a frame").len() as u64
}

struct Joined {
    bytes: u64,
    frames: u64,
    took: Duration,
}

/// A fresh device reads the whole log, in `Changes` pages as the relay sends them.
fn replay(relay: &RelayStore, space: &str, config: &SessionConfig) -> Joined {
    let store = joiner();
    let started = Instant::now();
    let (mut bytes, mut frames, mut cursor) = (0, 0, 0);
    let head = relay.head(space).expect("head");
    while cursor < head {
        let slice = relay
            .read_since(
                space,
                cursor,
                config.max_download_changes as usize,
                config.max_frame_bytes as usize / 2,
            )
            .expect("read the log");
        let message = Message::Changes {
            after: slice.after,
            through: slice.through,
            head: slice.head,
            pushed: false,
            entries: slice.entries,
        };
        bytes += frame_bytes(&message);
        frames += 1;
        let Message::Changes {
            through, entries, ..
        } = message
        else {
            unreachable!()
        };
        store.apply_remote(&entries, through).expect("apply");
        store.flush().expect("flush");
        cursor = through;
    }
    Joined {
        bytes,
        frames,
        took: started.elapsed(),
    }
}

/// A fresh device takes the snapshot's pages, then reads the log after them.
fn bootstrap(relay: &RelayStore, space: &str, config: &SessionConfig) -> Joined {
    let store = joiner();
    let started = Instant::now();
    let (mut bytes, mut frames) = (0, 0);
    let mut after = None;
    loop {
        let page = relay
            .snapshot_page(
                space,
                after.as_ref(),
                config.max_snapshot_records,
                config.max_frame_bytes as usize / 2,
                None,
            )
            .expect("read a snapshot page");
        let message = Message::SnapshotPage {
            head: page.head,
            horizon: page.horizon,
            records: page.records.clone(),
            last: page.last.clone(),
            complete: page.complete,
        };
        bytes += frame_bytes(&message);
        frames += 1;
        after.clone_from(&page.last);
        let done = store.apply_snapshot_page(&page).expect("apply a page");
        store.flush().expect("flush");
        if done.complete {
            break;
        }
    }
    let cursor = store.sync_cursor().expect("cursor");
    assert_eq!(
        cursor,
        relay.head(space).expect("head"),
        "nothing to replay"
    );
    Joined {
        bytes,
        frames,
        took: started.elapsed(),
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).expect("read dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (records, edits) = if bench {
        (arg("--records", 10_000), arg("--edits", 100))
    } else {
        (200, 10)
    };
    let config = SessionConfig::default();
    let dir = tempfile::tempdir().expect("temp dir");
    let kv = SledKv::open(dir.path(), 64 << 20).expect("open sled");
    let relay = RelayStore::open(
        Arc::new(KvStorage::new(Arc::new(kv))),
        RelayStoreOptions::default(),
    );
    let started = Instant::now();
    write_space(&relay, "edited", records, edits);
    write_space(&relay, "once", records, 0);
    relay.flush().expect("flush");
    eprintln!(
        "{records} records, {edits} edits each: spaces written in {:.1} s; relay on disk {} MiB \
         (log bytes: edited {} MiB, once {} MiB)",
        started.elapsed().as_secs_f64(),
        dir_bytes(dir.path()) >> 20,
        relay.log_bytes("edited").expect("log bytes") >> 20,
        relay.log_bytes("once").expect("log bytes") >> 20,
    );
    let runs = [
        ("edited", "replay", replay(&relay, "edited", &config)),
        ("edited", "snapshot", bootstrap(&relay, "edited", &config)),
        ("once", "replay", replay(&relay, "once", &config)),
        ("once", "snapshot", bootstrap(&relay, "once", &config)),
    ];
    for (space, how, joined) in &runs {
        eprintln!(
            "{space:>6} {how:>8}: {:>12} bytes in {:>5} frames, {:>8.2} s",
            joined.bytes,
            joined.frames,
            joined.took.as_secs_f64()
        );
        println!(
            "{}",
            serde_json::json!({
                "records": records, "edits": edits, "space": space, "join": how,
                "bytes": joined.bytes, "frames": joined.frames,
                "seconds": joined.took.as_secs_f64(),
            })
        );
    }
    let (edited_replay, edited_snapshot, once_replay) = (&runs[0].2, &runs[1].2, &runs[2].2);
    eprintln!(
        "snapshot vs replay of the edited space: {:.1}x fewer bytes, {:.1}x less time; \
         snapshot of the edited space vs replay of the written-once one: {:.2}x the bytes, \
         {:.2}x the time",
        edited_replay.bytes as f64 / edited_snapshot.bytes as f64,
        edited_replay.took.as_secs_f64() / edited_snapshot.took.as_secs_f64(),
        edited_snapshot.bytes as f64 / once_replay.bytes as f64,
        edited_snapshot.took.as_secs_f64() / once_replay.took.as_secs_f64(),
    );
    assert!(
        edited_snapshot.bytes < edited_replay.bytes,
        "a snapshot of an edited space sends less than its log"
    );
    let keep = arg("--keep-entries", 10_000.min(records * edits / 10).max(1));
    let flatten = !std::env::args().any(|a| a == "--keep-history");
    compact(
        relay,
        dir.path(),
        (keep, flatten),
        records,
        edits,
        once_replay,
    );
}

/// The relay's disk before and after compacting the edited space to its last `keep` entries,
/// flattening the histories wholly below them unless `--keep-history` (and after reopening
/// sled, which reclaims freed space as it goes), and a device bootstrapping from the compacted
/// space, against `once`, a device replaying the space written once.
fn compact(
    relay: RelayStore,
    dir: &std::path::Path,
    (keep, flatten): (u64, bool),
    records: u64,
    edits: u64,
    once: &Joined,
) {
    let before = dir_bytes(dir);
    let log_before = relay.log_bytes("edited").expect("log bytes");
    let started = Instant::now();
    let done = relay
        .compact_log(
            "edited",
            ferry::clock::now_ms(),
            LogRetention {
                keep_log_days: 0,
                keep_log_entries: keep,
                flatten_history: flatten,
            },
        )
        .expect("compact")
        .expect("something to compact");
    relay.flush().expect("flush");
    let took = started.elapsed();
    let after = dir_bytes(dir);
    let started = Instant::now();
    relay.reclaim_space().expect("reclaim space");
    let reclaim_took = started.elapsed();
    let reclaimed = dir_bytes(dir);
    drop(relay);
    let kv = SledKv::open(dir, 64 << 20).expect("reopen sled");
    let relay = RelayStore::open(
        Arc::new(KvStorage::new(Arc::new(kv))),
        RelayStoreOptions::default(),
    );
    let reopened = dir_bytes(dir);
    let joined = bootstrap(&relay, "edited", &SessionConfig::default());
    eprintln!(
        "compaction of the edited space to its last {keep} entries (horizon {}, {} bases saved, \
         {} histories flattened) in {:.1} s: log bytes {} -> {} MiB; relay on disk {} MiB -> {} \
         MiB, {} MiB once its store is rewritten ({:.1} s), {} MiB reopened; a bootstrap from it: \
         {} bytes in {:.2} s, {:.2}x the bytes and {:.2}x the time of replaying the space written \
         once",
        done.horizon,
        done.bases_saved,
        done.flattened,
        took.as_secs_f64(),
        log_before >> 20,
        done.bytes_after >> 20,
        before >> 20,
        after >> 20,
        reclaimed >> 20,
        reclaim_took.as_secs_f64(),
        reopened >> 20,
        joined.bytes,
        joined.took.as_secs_f64(),
        joined.bytes as f64 / once.bytes as f64,
        joined.took.as_secs_f64() / once.took.as_secs_f64(),
    );
    println!(
        "{}",
        serde_json::json!({
            "records": records, "edits": edits, "compacted_to_entries": keep,
            "flattened": done.flattened, "bootstrap_bytes": joined.bytes,
            "bootstrap_seconds": joined.took.as_secs_f64(),
            "seconds": took.as_secs_f64(), "log_bytes_before": log_before,
            "log_bytes_after": done.bytes_after, "disk_bytes_before": before,
            "disk_bytes_after": after, "disk_bytes_rewritten": reclaimed,
            "rewrite_seconds": reclaim_took.as_secs_f64(), "disk_bytes_reopened": reopened,
        })
    );
    assert!(done.bytes_after < log_before, "compaction frees log bytes");
}
