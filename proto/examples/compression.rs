//! Measures what frame compression buys on a realistic download: a `Changes` message of 1,000
//! Automerge changes, each creating a record of 10 fields (5 strings of about 20 characters and
//! 5 integers). Prints the body size raw, with zstd level 1 (what `encode_frame` uses), zstd
//! level 3, gzip level 6 (its usual default) and gzip level 1, and the time to compress and
//! decompress it with each.
//!
//! `cargo run --release -p ferry-proto --example compression`

// An example stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use automerge::transaction::Transactable as _;
use automerge::{ActorId, AutoCommit, ROOT};
use ferry_proto::wire::{LogEntry, Message};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

const RECORDS: u64 = 1_000;
const ROUNDS: usize = 50;

const FIRST: [&str; 8] = [
    "Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiroshi",
];
const LAST: [&str; 8] = [
    "Lindqvist",
    "Okonkwo",
    "Moreau",
    "Castellanos",
    "Nakamura",
    "Petrovic",
    "Whitfield",
    "Adeyemi",
];
const CITIES: [&str; 6] = [
    "Rotterdam",
    "Guadalajara",
    "Wroclaw",
    "Osaka",
    "Nairobi",
    "Porto Alegre",
];

/// A fixed-seed generator, so every run measures the same bytes.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.next() as usize % from.len()]
    }
}

fn record_change(actor: &ActorId, rng: &mut Lcg, n: u64) -> Vec<u8> {
    let mut doc = AutoCommit::new().with_actor(actor.clone());
    let first = rng.pick(&FIRST);
    let last = rng.pick(&LAST);
    let city = rng.pick(&CITIES);
    let strings = [
        ("name", format!("{first} {last}")),
        (
            "email",
            format!("{}.{}@example.org", first, last).to_lowercase(),
        ),
        (
            "phone",
            format!("+31 6 {:04} {:04}", rng.next() % 10_000, n),
        ),
        ("city", format!("{city}, {}", 1000 + rng.next() % 9000)),
        ("street", format!("{} Harbour Lane", 1 + rng.next() % 400)),
    ];
    for (field, value) in strings {
        doc.put(ROOT, field, value)
            .expect("put on a fresh document");
    }
    let ints = [
        ("age", (18 + rng.next() % 70) as i64),
        ("orders", (rng.next() % 200) as i64),
        ("balance_cents", (rng.next() % 10_000_000) as i64),
        ("loyalty_points", (rng.next() % 5000) as i64),
        ("created_ms", 1_764_000_000_000 + (n * 60_000) as i64),
    ];
    for (field, value) in ints {
        doc.put(ROOT, field, value)
            .expect("put on a fresh document");
    }
    let changes = doc.get_changes(&[]);
    assert_eq!(changes.len(), 1, "one commit makes one change");
    changes[0].raw_bytes().to_vec()
}

fn body() -> Vec<u8> {
    let actor = ActorId::from(&[7u8; 16][..]);
    let mut rng = Lcg(42);
    let entries = (1..=RECORDS)
        .map(|seq| LogEntry {
            seq,
            collection: "Customer".into(),
            record: format!("01J{seq:023}"),
            change: record_change(&actor, &mut rng, seq),
        })
        .collect();
    let message = Message::Changes {
        after: 0,
        through: RECORDS,
        head: RECORDS,
        pushed: false,
        entries,
    };
    postcard::to_stdvec(&message).expect("a Message serializes")
}

/// The fastest of `ROUNDS` runs of `f`: the least disturbed by the rest of the machine.
fn fastest<T>(mut f: impl FnMut() -> T) -> (T, Duration) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let value = f();
        best = best.min(start.elapsed());
        out = Some(value);
    }
    (out.expect("ROUNDS > 0"), best)
}

/// The packed bytes, the fastest compression and the fastest decompression.
type Measured = (Vec<u8>, Duration, Duration);
type Codec = Box<dyn Fn(&[u8]) -> Measured>;

fn zstd_codec(level: i32) -> impl Fn(&[u8]) -> Measured {
    move |raw| {
        let (packed, c) = fastest(|| zstd::bulk::compress(raw, level).expect("zstd compress"));
        let (back, d) =
            fastest(|| zstd::bulk::decompress(&packed, raw.len()).expect("zstd decompress"));
        assert_eq!(back, raw);
        (packed, c, d)
    }
}

fn gzip_codec(level: u32) -> impl Fn(&[u8]) -> Measured {
    move |raw| {
        let (packed, c) = fastest(|| {
            let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
            e.write_all(raw).expect("gzip compress");
            e.finish().expect("gzip finish")
        });
        let (back, d) = fastest(|| {
            let mut out = Vec::with_capacity(raw.len());
            GzDecoder::new(&packed[..])
                .read_to_end(&mut out)
                .expect("gzip decompress");
            out
        });
        assert_eq!(back, raw);
        (packed, c, d)
    }
}

fn main() {
    let raw = body();
    println!(
        "Changes body of {RECORDS} record changes: {} bytes",
        raw.len()
    );
    println!("| codec | bytes | % of raw | compress | decompress |");
    println!("|---|---:|---:|---:|---:|");
    println!("| none | {} | 100% | - | - |", raw.len());
    let codecs: [(&str, Codec); 4] = [
        ("zstd level 1 (used)", Box::new(zstd_codec(1))),
        ("zstd level 3", Box::new(zstd_codec(3))),
        ("gzip level 6", Box::new(gzip_codec(6))),
        ("gzip level 1", Box::new(gzip_codec(1))),
    ];
    for (name, codec) in codecs {
        let (packed, c, d) = codec(&raw);
        println!(
            "| {name} | {} | {:.1}% | {:.0} us | {:.0} us |",
            packed.len(),
            100.0 * packed.len() as f64 / raw.len() as f64,
            c.as_secs_f64() * 1e6,
            d.as_secs_f64() * 1e6,
        );
    }
}
