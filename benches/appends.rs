//! The relay's append throughput on PostgreSQL, in process: relay stores (`RelayStore`, each over
//! its own `PgStorage` with its own connection pool, as separate relay processes have) appending
//! devices' uploads to a private PostgreSQL server started for the benchmark, durable as a
//! production one (fsync on), a fresh database per configuration. No QUIC: it measures the
//! relay's validation and staging and the database.
//!
//! Eight devices, each a thread with its own Automerge actor: device i uploads through relay
//! i % R to space i % S, in append calls of `--batch` changes, creates of new records (with
//! `--updates`, alternately a batch of creates and a batch of edits of those records). Every
//! change is prepared before the timed window, which times only the append calls. Every outcome
//! must be `Stored` and each space's head must equal the changes sent to it.
//!
//! Per configuration (R relays x S spaces): append calls and changes per second, p50/p99 of one
//! append call, appends staged again because another relay appended to the space first (the
//! database's rolled-back transactions: `pg_stat_database.xact_rollback`), CPU seconds of the
//! benchmark process (relays and devices) and of the PostgreSQL server's processes, the
//! database's bytes per change, and what limits the run (the database's CPU, the relays' CPU,
//! or neither: waiting on locks and fsync).
//!
//! A fresh database's tables are not analyzed until autovacuum's next round (a minute by default),
//! so its plans are made from statistics of near-empty tables for the first minute; `--analyze`
//! makes autovacuum run every second.
//!
//! `cargo bench --bench appends [-- --changes N --batch N --relays R --spaces S --updates
//! --analyze]`
//! prints one JSON object per configuration on standard output and a summary on standard error;
//! see benches/README.md. Without `--bench` (as `cargo test --all-targets` runs it) it runs each
//! configuration once on a few hundred changes.

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

use common::postgres::PgServer;
use ferry::record::Record;
use ferry::relay::storage::PgStorage;
use ferry::relay::storage::StorageError;
use ferry::relay::store::{RelayStore, RelayStoreError, RelayStoreOptions};
use ferry_proto::wire::{ChangeOutcome, UploadChange};
use harness::{latency, per_second, postgres_cpu, proc_stat, secs};
use serde_json::{Value, json};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: cargo bench --bench appends -- [OPTIONS]

  --changes N   changes each device uploads (default 5000)
  --batch N     changes per append call (default 100)
  --relays R    relay stores on the database; repeat for several (default: 1 and 3)
  --spaces S    spaces the devices upload to; repeat for several (default: 1 and 16)
  --updates     half the changes edit records the device created in its previous call
  --analyze     autovacuum every second on the server (autovacuum_naptime = 1s; default one
                minute), so that the tables' statistics, and the plans made from them, follow
                the tables as they grow within the run";

/// Devices (threads) uploading at once.
const DEVICES: usize = 8;
/// The relay's default pool of connections to the database (`relay.postgres_pool_size`).
const POOL_SIZE: usize = 16;
/// Used together by the relays and the database above this share of the machine's cores, the
/// run is limited by CPU.
const SATURATED: f64 = 0.85;

struct Options {
    changes: usize,
    batch: usize,
    relays: Vec<usize>,
    spaces: Vec<usize>,
    updates: bool,
    analyze: bool,
    smoke: bool,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `cargo bench` passes `--bench`; without it this is a test run: a quick smoke pass.
        let smoke = !args.iter().any(|a| a == "--bench");
        let mut o = Options {
            changes: 5000,
            batch: 100,
            relays: Vec::new(),
            spaces: Vec::new(),
            updates: false,
            analyze: false,
            smoke,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut number = |name: &str| -> Result<usize, String> {
                let v = it.next().ok_or(format!("{name} needs a value"))?;
                match v.parse() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{name} {v:?}: expected a whole number above 0")),
                }
            };
            match arg.as_str() {
                "--bench" => {}
                "--changes" => o.changes = number(arg)?,
                "--batch" => o.batch = number(arg)?,
                "--relays" => o.relays.push(number(arg)?),
                "--spaces" => o.spaces.push(number(arg)?),
                "--updates" => o.updates = true,
                "--analyze" => o.analyze = true,
                "--help" | "-h" => return Err(String::new()),
                // A test run may get the test harness's own arguments: not ours to refuse.
                _ if smoke => eprintln!("appends: ignoring argument {arg:?} in a test run"),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if o.relays.is_empty() {
            o.relays = vec![1, 3];
        }
        if o.spaces.is_empty() {
            o.spaces = vec![1, 16];
        }
        if o.smoke {
            // A few hundred changes in all, in several calls per device.
            o.changes = o.changes.min(40);
            o.batch = o.batch.min(10);
        }
        Ok(o)
    }
}

/// One device's uploads, call by call, prepared before the timed window.
struct DeviceWork {
    /// The device id the relay logs the changes under (its actor).
    origin: String,
    calls: Vec<Vec<UploadChange>>,
}

fn actor(device: usize) -> automerge::ActorId {
    automerge::ActorId::from(&[device as u8 + 1; 16][..])
}

/// Device `device`'s `changes` changes in calls of `batch`: creates of its own records (ids
/// disjoint from every other device's), and with `updates` each call of creates followed by a
/// call editing `s1` of those same records.
fn prepare(device: usize, changes: usize, batch: usize, updates: bool) -> DeviceWork {
    let actor = actor(device);
    let mut calls = Vec::new();
    let (mut entry, mut made, mut next_record) = (0u64, 0usize, 0u64);
    let mut upload = |record: u64, bytes: &[u8]| {
        entry += 1;
        UploadChange {
            entry,
            collection: workload::COLLECTION.into(),
            record: workload::record_id(record),
            change: bytes.to_vec(),
        }
    };
    while made < changes {
        let creates = if updates {
            batch.min((changes - made).div_ceil(2))
        } else {
            batch.min(changes - made)
        };
        let mut records = Vec::with_capacity(creates);
        let mut call = Vec::with_capacity(creates);
        for _ in 0..creates {
            let n = device as u64 * 100_000_000 + next_record;
            next_record += 1;
            let mut record = Record::new(&actor);
            let written = record
                .put(&workload::record_fields(n), 1_700_000_000_000 + n)
                .expect("build a record")
                .expect("a create is a change");
            call.push(upload(n, written.change.raw_bytes()));
            records.push((n, record));
        }
        made += call.len();
        calls.push(call);
        if updates && made < changes {
            let edits = records.len().min(changes - made);
            let mut call = Vec::with_capacity(edits);
            for (n, record) in records.iter_mut().take(edits) {
                let fields = serde_json::json!({ "s1": format!("edited-{n:015}") });
                let fields = fields.as_object().cloned().unwrap_or_default();
                let written = record
                    .patch(&fields, &[], 1_700_000_001_000 + *n)
                    .expect("patch")
                    .expect("a patch is a change");
                call.push(upload(*n, written.change.raw_bytes()));
            }
            made += call.len();
            calls.push(call);
        }
    }
    DeviceWork {
        origin: actor.to_hex_string(),
        calls,
    }
}

fn space_name(s: usize) -> String {
    format!("bench-{s}")
}

// ---------------------------------------------------------------------------------------------
// CPU time from /proc.

/// Seconds of CPU in `ticks` (USER_HZ, 100 on Linux).
fn tick_secs(ticks: u64) -> f64 {
    ticks as f64 / 100.0
}

/// CPU ticks this process has used (all threads, the ended ones too).
fn own_cpu() -> u64 {
    proc_stat(std::process::id()).expect("/proc/self/stat").0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The database.

fn number(server: &PgServer, database: &str, sql: &str) -> u64 {
    let out = server.sql(database, sql);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{sql}: {out:?}"))
}

/// Waits until no session but the asking one is on `database`: every session's statistics are
/// then counted (a session reports them when it ends).
fn sessions_ended(server: &PgServer, database: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while number(
        server,
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}' \
             AND pid <> pg_backend_pid()"
        ),
    ) > 0
    {
        assert!(
            Instant::now() < deadline,
            "the relays' sessions on {database} did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Transactions rolled back on `database` so far, once every other session has ended.
fn rollbacks(server: &PgServer, database: &str) -> u64 {
    sessions_ended(server, database);
    number(
        server,
        database,
        "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()",
    )
}

// ---------------------------------------------------------------------------------------------
// One configuration.

struct DeviceRun {
    latencies: Vec<Duration>,
    /// Calls the relay answered with an error after staging them again `RESTAGES` times
    /// (another relay kept appending first), sent again as a device does.
    sent_again: u64,
    finished: Instant,
}

fn run(server: &PgServer, o: &Options, relays: usize, spaces: usize, work: &[DeviceWork]) -> Value {
    let database = server.create_database();
    let mut options = server.options(&database);
    options.pool_size = POOL_SIZE;
    // Migrated by a first engine, closed again so that its sessions' statistics are counted
    // before the run.
    drop(PgStorage::open(&options).expect("migrate the database"));
    let empty_bytes = number(
        server,
        &database,
        "SELECT pg_database_size(current_database())",
    );
    let rollbacks_before = rollbacks(server, &database);
    let stores: Vec<Arc<RelayStore>> = (0..relays)
        .map(|_| {
            let storage = PgStorage::open(&options).expect("open the database");
            Arc::new(RelayStore::open(
                Arc::new(storage),
                RelayStoreOptions::default(),
            ))
        })
        .collect();
    let start = Arc::new(Barrier::new(DEVICES + 1));
    let (runs, window, relay_ticks, server_ticks) = std::thread::scope(|scope| {
        let threads: Vec<_> = work
            .iter()
            .enumerate()
            .map(|(i, device)| {
                let relay = Arc::clone(&stores[i % relays]);
                let space = space_name(i % spaces);
                let start = Arc::clone(&start);
                scope.spawn(move || {
                    let mut latencies = Vec::with_capacity(device.calls.len());
                    let mut sent_again = 0;
                    start.wait();
                    for call in &device.calls {
                        let began = Instant::now();
                        let results = loop {
                            match relay.append(&space, &device.origin, call) {
                                Ok(results) => break results,
                                Err(RelayStoreError::Storage(StorageError::HeadMoved {
                                    ..
                                })) => sent_again += 1,
                                Err(e) => panic!("device {i}: append to {space}: {e}"),
                            }
                        };
                        latencies.push(began.elapsed());
                        assert_eq!(results.len(), call.len());
                        for (result, upload) in results.iter().zip(call) {
                            assert_eq!(result.entry, upload.entry);
                            assert!(
                                matches!(result.outcome, ChangeOutcome::Stored { .. }),
                                "device {i}: change {} to {space}: {:?}",
                                upload.entry,
                                result.outcome
                            );
                        }
                    }
                    DeviceRun {
                        latencies,
                        sent_again,
                        finished: Instant::now(),
                    }
                })
            })
            .collect();
        let (cpu_before, server_before) = (own_cpu(), postgres_cpu(&server.dir().join("data")));
        let began = Instant::now();
        start.wait();
        let runs: Vec<DeviceRun> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let ended = runs.iter().map(|r| r.finished).max().unwrap();
        let (cpu_after, server_after) = (own_cpu(), postgres_cpu(&server.dir().join("data")));
        (
            runs,
            ended - began,
            cpu_after - cpu_before,
            server_after.saturating_sub(server_before),
        )
    });

    // Each space holds exactly what was sent to it.
    let mut sent = vec![0u64; spaces];
    for (i, device) in work.iter().enumerate() {
        sent[i % spaces] += device.calls.iter().map(|c| c.len() as u64).sum::<u64>();
    }
    for (s, &want) in sent.iter().enumerate() {
        let head = stores[0].head(&space_name(s)).expect("head");
        assert_eq!(head, want, "space {}: head after the run", space_name(s));
    }
    drop(stores);
    let restaged = rollbacks(server, &database) - rollbacks_before;
    let bytes = number(
        server,
        &database,
        "SELECT pg_database_size(current_database())",
    );
    let records = number(
        server,
        &database,
        "SELECT count(*) FROM (SELECT DISTINCT space, collection, record FROM record_changes) r",
    );
    // Where the bytes are: each table with its indexes and TOAST, the larger ones first.
    let tables: serde_json::Map<String, Value> = server
        .sql(
            &database,
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class \
             WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace \
             ORDER BY 2 DESC",
        )
        .lines()
        .filter_map(|line| {
            let (name, bytes) = line.split_once('|')?;
            Some((name.to_owned(), json!(bytes.trim().parse::<u64>().ok()?)))
        })
        .collect();
    server.drop_database(&database);

    let changes: u64 = sent.iter().sum();
    let mut latencies: Vec<Duration> = runs.iter().flat_map(|r| r.latencies.clone()).collect();
    let appends = latencies.len() as u64;
    let sent_again: u64 = runs.iter().map(|r| r.sent_again).sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let seconds = window.as_secs_f64().max(1e-9);
    let relay_cpu = tick_secs(relay_ticks);
    let database_cpu = tick_secs(server_ticks);
    let (relay_cores, database_cores) = (relay_cpu / seconds, database_cpu / seconds);
    let limit = if relay_cores + database_cores >= SATURATED * cores {
        if database_cores >= relay_cores {
            format!(
                "CPU: the machine's {cores} cores are busy, mostly with the database \
                 ({database_cores:.2} cores against the relays' {relay_cores:.2})"
            )
        } else {
            format!(
                "CPU: the machine's {cores} cores are busy, mostly with the relays \
                 ({relay_cores:.2} cores against the database's {database_cores:.2})"
            )
        }
    } else {
        format!(
            "waiting: locks and fsync (relays {relay_cores:.2} and database \
             {database_cores:.2} of {cores} cores)"
        )
    };
    json!({
        "bench": "appends",
        "storage": "postgres",
        "relays": relays,
        "spaces": spaces,
        "spaces_used": spaces.min(DEVICES),
        "devices": DEVICES,
        "changes_per_device": o.changes,
        "batch": o.batch,
        "updates": o.updates,
        "analyze": o.analyze,
        "changes": changes,
        "records": records,
        "appends": appends,
        "seconds": secs(window),
        "appends_per_s": per_second(appends, window),
        "changes_per_s": per_second(changes, window),
        "append_latency_us": latency(&mut latencies),
        "restaged": restaged,
        "sent_again": sent_again,
        "cpu_s": { "relays": relay_cpu, "database": database_cpu },
        "cpu_cores": {
            "relays": (relay_cores * 100.0).round() / 100.0,
            "database": (database_cores * 100.0).round() / 100.0,
            "machine": cores,
        },
        "database_bytes": bytes,
        "database_bytes_empty": empty_bytes,
        "database_bytes_per_change": (bytes - empty_bytes) / changes.max(1),
        "database_bytes_per_record": (bytes - empty_bytes) / records.max(1),
        "table_bytes": tables,
        "limit": limit,
        "load_average": load_average(),
        "smoke": o.smoke,
    })
}

fn summary(r: &Value) -> String {
    let us = |k: &str| r["append_latency_us"][k].as_f64().unwrap_or(0.0) / 1000.0;
    format!(
        "{} relay(s), {} space(s) ({} used): {} changes in {} calls in {:.2} s: {} appends/s, \
         {} changes/s; one call p50 {:.1} ms, p99 {:.1} ms; restaged {}, sent again {}; CPU \
         relays {:.2} s, database {:.2} s; database {} bytes/change, {} bytes/record; \
         limited by {}",
        r["relays"],
        r["spaces"],
        r["spaces_used"],
        r["changes"],
        r["appends"],
        r["seconds"].as_f64().unwrap_or(0.0),
        r["appends_per_s"],
        r["changes_per_s"],
        us("p50"),
        us("p99"),
        r["restaged"],
        r["sent_again"],
        r["cpu_s"]["relays"].as_f64().unwrap_or(0.0),
        r["cpu_s"]["database"].as_f64().unwrap_or(0.0),
        r["database_bytes_per_change"],
        r["database_bytes_per_record"],
        r["limit"].as_str().unwrap_or(""),
    )
}

fn main() {
    let o = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("appends: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    eprintln!(
        "appends: {} build, {DEVICES} devices x {} changes in calls of {}{}, load average {}",
        if cfg!(debug_assertions) {
            "debug (numbers mean nothing)"
        } else {
            "release"
        },
        o.changes,
        o.batch,
        if o.updates {
            ", creates and updates"
        } else {
            ", creates"
        },
        load_average(),
    );
    let prepared = Instant::now();
    let work: Vec<DeviceWork> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..DEVICES)
            .map(|i| scope.spawn(move || prepare(i, o.changes, o.batch, o.updates)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    eprintln!(
        "appends: changes prepared in {:.1} s",
        prepared.elapsed().as_secs_f64()
    );
    let server = PgServer::durable();
    if o.analyze {
        server.sql("postgres", "ALTER SYSTEM SET autovacuum_naptime = '1s'");
        server.sql("postgres", "SELECT pg_reload_conf()");
    }
    for &relays in &o.relays {
        for &spaces in &o.spaces {
            let result = run(server, &o, relays, spaces, &work);
            println!("{result}");
            eprintln!("appends: {}", summary(&result));
        }
    }
}
