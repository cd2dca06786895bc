//! Replays every fuzz seed and every saved crasher (fuzz/seeds/TARGET, fuzz/regressions/TARGET)
//! through the decoders, then a few thousand deterministic mutations of the seeds, so that the
//! decoders are exercised on every CI run without a fuzzer. Set FERRY_FUZZ_SEED to replay a run,
//! FERRY_FUZZ_ITERATIONS to run more.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use ferry::fuzzing::TARGETS;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng};
use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read fuzz dir").path();
            let bytes = std::fs::read(&path).expect("read fuzz input");
            out.push((path.display().to_string(), bytes));
        }
    }
    out.sort();
    out
}

fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = data.len();
        match rng.random_range(0..6) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=len);
                let b: u8 = rng.random();
                data.insert(i, b);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                data.remove(i);
            }
            4 => data.truncate(rng.random_range(0..=len)),
            _ if !other.is_empty() => {
                let i = rng.random_range(0..=len);
                let j = rng.random_range(0..other.len());
                let k = rng.random_range(j..=other.len());
                data.splice(i..i, other[j..k].iter().copied());
            }
            _ => {}
        }
    }
    data
}

#[test]
fn seeds_and_crashers_do_not_panic() {
    for (target, run) in TARGETS {
        let inputs = inputs(target);
        assert!(!inputs.is_empty(), "no seeds for fuzz target {target}");
        for (name, bytes) in &inputs {
            let outcome = std::panic::catch_unwind(|| run(bytes));
            assert!(outcome.is_ok(), "{target} panicked on {name}");
        }
    }
}

#[test]
fn mutated_seeds_do_not_panic() {
    let seed = std::env::var("FERRY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let iterations: usize = std::env::var("FERRY_FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    eprintln!("fuzz mutations: FERRY_FUZZ_SEED={seed} FERRY_FUZZ_ITERATIONS={iterations}");
    let mut rng = StdRng::seed_from_u64(seed);
    for (target, run) in TARGETS {
        let inputs = inputs(target);
        for n in 0..iterations {
            let base = &inputs[rng.random_range(0..inputs.len())].1;
            let other = &inputs[rng.random_range(0..inputs.len())].1;
            let data = mutate(&mut rng, base, other);
            let outcome = std::panic::catch_unwind(|| run(&data));
            if outcome.is_err() {
                let dir = std::env::temp_dir().join(format!("ferry-crash-{target}-{seed}-{n}"));
                let _ = std::fs::write(&dir, &data);
                panic!(
                    "{target} panicked on mutation {n} (FERRY_FUZZ_SEED={seed}); input saved to {}: \
                     copy it to fuzz/regressions/{target}/ once fixed",
                    dir.display()
                );
            }
        }
    }
}
