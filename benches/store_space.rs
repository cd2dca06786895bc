//! Where the device store's disk space goes: the sled engine (`store::kv::SledKv`, with its
//! chunking of long values and its compaction into a fresh generation) measured against the
//! live data it holds, at several sizes and for two shapes of data, many small records or a few
//! large ones (kept in chunks).
//!
//! For each shape, size and run, on a fresh temp dir: the records are written in random order
//! (one batch each, flushed as the store's group commit does), then all rewritten once (churn),
//! then the store is compacted (`Kv::compact`, what the daemon runs) and opened again. After
//! each phase it reports sled's own size (`size_on_disk`), the blocks the directory takes (`du`)
//! and the live bytes (`live_bytes`: every key and value). For the compaction it also reports
//! the bytes the copy wrote (`/proc/self/io`) and how long it took, and after the reopen the
//! bytes of sled's tree nodes as sled itself counts them (its `space_amplification`), which
//! tells per-key and per-node overhead apart from old versions left in its log.
//!
//! `cargo bench --bench store_space [-- --mib 1 --mib 10 --mib 50 --runs 3]` prints one JSON
//! object per phase on standard output and a table on standard error; see benches/README.md.
//! Without `--bench` (as `cargo test --all-targets` runs it) it does one quick run at 1 MiB,
//! checking that every phase keeps every pair.

// A benchmark stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;
mod workload;

use ferry::store::kv::{Batch, Kv, SledKv};
use serde_json::json;
use std::path::Path;
use workload::Rng;

const USAGE: &str = "\
usage: cargo bench --bench store_space -- [OPTIONS]

  --mib N    live data per run, in MiB; repeat for several sizes (default: 1, 10 and 50)
  --runs N   runs of each shape and size (default 3: sled's layout varies from run to run)";

/// The store's default cache (`store.cache_bytes`) does not change the layout on disk; this
/// keeps the runs' memory small.
const CACHE_BYTES: u64 = 64 << 20;
/// sled 0.34's log segment (its default, which the store keeps).
const SEGMENT_BYTES: u64 = 512 << 10;

struct Shape {
    name: &'static str,
    value_bytes: usize,
    /// Records written between two flushes.
    per_flush: usize,
}

const SHAPES: [Shape; 2] = [
    // About the size of a record's saved document (see benches/workload).
    Shape {
        name: "small records (250 B)",
        value_bytes: 250,
        per_flush: 100,
    },
    // Large values, kept by the engine in chunks.
    Shape {
        name: "large records (1 MiB)",
        value_bytes: 1 << 20,
        per_flush: 1,
    },
];

fn key(n: usize) -> Vec<u8> {
    format!("d/Customer/c{n:09}").into_bytes()
}

/// The value of record `n` in `round`: bytes that differ from round to round.
fn value(n: usize, round: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new((n as u64) << 8 | round);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The records `0..n` in a random order (Fisher-Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

/// Bytes this process has written so far.
fn written_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("read /proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("wchar in /proc/self/io")
}

struct Run<'a> {
    shape: &'a Shape,
    mib: u64,
    run: u64,
    records: usize,
    live: u64,
}

impl Run<'_> {
    fn report(&self, phase: &str, kv: &SledKv, dir: &Path, extra: serde_json::Value) {
        kv.flush().expect("flush");
        let live = kv.live_bytes().expect("live bytes");
        assert_eq!(live, self.live, "{phase}: the live bytes are those written");
        let sled_bytes = kv.size_on_disk().expect("size on disk");
        let (du, _) = harness::disk_usage(dir);
        let ratio = |b: u64| (b as f64 / live as f64 * 100.0).round() / 100.0;
        let mut line = json!({
            "shape": self.shape.name,
            "mib": self.mib,
            "run": self.run,
            "records": self.records,
            "phase": phase,
            "live_bytes": live,
            "sled_bytes": sled_bytes,
            "sled_x": ratio(sled_bytes),
            "du_bytes": du,
            "du_x": ratio(du),
        });
        if let (Some(line), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
            line.extend(extra.clone());
        }
        println!("{line}");
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        eprintln!(
            "{:22} {:>3} MiB run {}  {:10}  sled {:7.1} MiB {:5.2}x  du {:7.1} MiB {:5.2}x  {}",
            self.shape.name,
            self.mib,
            self.run,
            phase,
            mib(sled_bytes),
            ratio(sled_bytes),
            mib(du),
            ratio(du),
            extra
                .as_object()
                .map(|o| o
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join("  "))
                .unwrap_or_default()
        );
    }

    fn write_all(&self, kv: &SledKv, round: u64) {
        for (i, n) in shuffled(self.records, self.run << 8 | round)
            .into_iter()
            .enumerate()
        {
            let mut batch = Batch::default();
            batch.put(key(n), value(n, round, self.shape.value_bytes));
            kv.apply(batch).expect("apply");
            if (i + 1) % self.shape.per_flush == 0 {
                kv.flush().expect("flush");
            }
        }
    }

    /// Every record holds its value of `round`.
    fn check(&self, kv: &SledKv, round: u64) {
        let pairs = kv.range(b"", &[0xff], usize::MAX).expect("range");
        assert_eq!(pairs.len(), self.records);
        for (n, (k, v)) in pairs.into_iter().enumerate() {
            assert_eq!(k, key(n));
            assert!(v == value(n, round, self.shape.value_bytes), "record {n}");
        }
    }

    fn measure(&self) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("store");
        let kv = SledKv::open(&dir, CACHE_BYTES).expect("open");
        self.write_all(&kv, 0);
        self.report("written", &kv, &dir, json!({}));
        self.write_all(&kv, 1);
        self.report("rewritten", &kv, &dir, json!({}));
        let before = written_bytes();
        let started = std::time::Instant::now();
        kv.compact().expect("compact");
        let took = started.elapsed();
        let copy = written_bytes() - before;
        self.report(
            "compacted",
            &kv,
            &dir,
            json!({
                "copy_wrote_x": (copy as f64 / self.live as f64 * 100.0).round() / 100.0,
                "compact_ms": took.as_millis() as u64,
            }),
        );
        drop(kv);
        let kv = SledKv::open(&dir, CACHE_BYTES).expect("reopen");
        self.check(&kv, 1);
        drop(kv);
        // The tree's nodes as sled counts them: `space_amplification` divides its files by
        // their bytes plus one segment.
        let db = sled::Config::new()
            .path(SledKv::current_dir(&dir).expect("current dir"))
            .cache_capacity(CACHE_BYTES)
            .open()
            .expect("open with sled");
        let on_disk = db.size_on_disk().expect("size on disk") as f64;
        let nodes = (on_disk / db.space_amplification().expect("amplification")) as u64;
        let nodes = nodes.saturating_sub(SEGMENT_BYTES);
        drop(db);
        let kv = SledKv::open(&dir, CACHE_BYTES).expect("reopen");
        self.report(
            "reopened",
            &kv,
            &dir,
            json!({ "nodes_x": (nodes as f64 / self.live as f64 * 100.0).round() / 100.0 }),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; without it this is a test run: one quick pass.
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut sizes = Vec::new();
    let mut runs = 3;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a whole number\n{USAGE}"))
        };
        match arg.as_str() {
            "--bench" => {}
            "--mib" => sizes.push(number()),
            "--runs" => runs = number(),
            "--help" | "-h" => {
                eprintln!("{USAGE}");
                return;
            }
            // A test run may get the test harness's own arguments: not ours to refuse.
            _ if smoke => eprintln!("store_space: ignoring argument {arg:?} in a test run"),
            other => panic!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if smoke {
        sizes = vec![1];
        runs = 1;
    } else if sizes.is_empty() {
        sizes = vec![1, 10, 50];
    }
    for shape in &SHAPES {
        for &mib in &sizes {
            let records = ((mib << 20) as usize / (shape.value_bytes + key(0).len())).max(1);
            let live = records as u64 * (shape.value_bytes + key(0).len()) as u64;
            for run in 0..runs {
                Run {
                    shape,
                    mib,
                    run,
                    records,
                    live,
                }
                .measure();
            }
        }
    }
}
