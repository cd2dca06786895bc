//! Crash safety of the real daemon. `ferry daemon` is killed with SIGKILL at random points while
//! several apps write through its socket, again and again on one data directory, so that damage
//! would accumulate as it would on a real device. After every kill the store must hold every
//! acknowledged write intact, nothing that was never written, and the SyncQueue exactly one entry
//! per change.
//!
//! After a kill the next daemon recovers the store, and the writes since the last check are
//! checked through its socket (the records they touched, the queue entries added since). Every
//! `FULL_CHECK_EVERY` kills and at the end, the store is opened in-process and checked whole:
//! every record, every queue entry, and that entries checked before are unchanged.
//!
//! `FERRY_CRASH_SEED=<u64>` replays a run's choices (operations, contents, kill delays);
//! `FERRY_CRASH_KILLS=<n>` sets the number of kills (default 200). Where exactly a kill lands
//! also depends on timing, so a replay hits the same kind of moments rather than the same bytes.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Daemon, Device, TIMEOUT};
use ferry::config::Config;
use ferry::datadir::DataDir;
use ferry::ipc::{Client, ClientError};
use ferry::service::{ApiError, QueueView, Service, code};
use ferry_proto::QueueStatus;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Map, Value, json};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const DEFAULT_KILLS: usize = 200;
const COLLECTIONS: [&str; 3] = ["Note", "Task", "Contact"];
/// Every this many kills, the whole store is checked, not only what the last writers touched.
const FULL_CHECK_EVERY: usize = 50;
/// One kill in this many lands while the daemon is starting (opening and recovering the store).
const STARTUP_KILL_ONE_IN: u32 = 7;
/// Upper bound of the delay of a startup kill, from spawning the daemon.
/// (A debug build takes about 50 ms to start.)
const STARTUP_KILL_MAX_US: u64 = 60_000;

type Fields = Map<String, Value>;
/// (collection, id)
type Key = (String, String);
/// A record as a check found it: its state and every change.
type Found = (State, Vec<Change>);
/// A JSON-RPC method call, through the socket or in-process.
type Call<'a> = dyn FnMut(&str, Value) -> Result<Value, ApiError> + 'a;

#[derive(Clone, Debug, PartialEq)]
enum State {
    Live(Fields),
    Deleted,
}

/// One change of a record, as acknowledged or as found by a check.
#[derive(Clone, Debug)]
struct Change {
    /// `None` for a change acknowledged by `import`, whose reply does not name changes.
    hash: Option<String>,
    op: &'static str,
}

/// What a record must be: its last acknowledged (or last checked) state and every change so far.
#[derive(Clone, Debug)]
struct Rec {
    /// The writer slot that writes this record; records are split between writers by it, so each
    /// record is written by one thread at a time and its acknowledged order is known.
    owner: usize,
    state: State,
    history: Vec<Change>,
}

/// A verified SyncQueue entry.
#[derive(Clone, Debug, PartialEq)]
struct QueueItem {
    key: Key,
    hash: String,
    op: String,
}

/// A write that was sent but not answered before the kill: it may have landed, whole, or not.
#[derive(Clone, Debug)]
struct InFlight {
    what: String,
    /// The record, its state if the write landed, the change's operation.
    effects: Vec<(Key, State, &'static str)>,
    owner: usize,
}

/// An acknowledged put, patch or delete: its queue entry must hold exactly its change.
#[derive(Clone, Debug)]
struct Acked {
    queue_id: u64,
    key: Key,
    hash: String,
}

/// Writes since the last check, waiting to be checked.
#[derive(Default)]
struct Unchecked {
    /// The kill cycle the writes were made in.
    cycle: usize,
    touched: BTreeSet<Key>,
    acked: Vec<Acked>,
    in_flight: Vec<InFlight>,
}

#[derive(Default)]
struct Model {
    records: BTreeMap<Key, Rec>,
    /// Queue entries up to `queue_checked`, as last verified.
    queue: BTreeMap<u64, QueueItem>,
    queue_checked: u64,
    unchecked: Option<Unchecked>,
}

#[derive(Default)]
struct Stats {
    writes_acked: u64,
    in_flight: u64,
    in_flight_landed: u64,
    startup_kills: u64,
    full_checks: u64,
}

enum Scope {
    /// The records touched since the last check and the queue entries added since.
    Recent,
    /// Every record and every queue entry.
    Full,
}

/// Says how to replay when anything panics: a failed check, a daemon that no longer starts.
struct ReplayHint {
    test: &'static str,
    seed: u64,
    kills: usize,
    cycle: Cell<usize>,
}

impl ReplayHint {
    fn text(&self) -> String {
        format!(
            "replay with: FERRY_CRASH_SEED={} FERRY_CRASH_KILLS={} cargo test --test crash {} -- --nocapture",
            self.seed, self.kills, self.test
        )
    }
}

impl Drop for ReplayHint {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} FAILED with seed {} at kill {} of {}; {}",
                self.test,
                self.seed,
                self.cycle.get(),
                self.kills,
                self.text()
            );
        }
    }
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T>
where
    T::Err: std::fmt::Display,
{
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={text:?} is not a number: {e}")),
    )
}

#[test]
fn acknowledged_writes_survive_sigkill_at_random_points() {
    let seed: u64 = env_number("FERRY_CRASH_SEED").unwrap_or_else(|| rand::rng().random());
    let kills: usize = env_number("FERRY_CRASH_KILLS").unwrap_or(DEFAULT_KILLS);
    eprintln!("crash test: seed {seed}, {kills} kills (FERRY_CRASH_SEED={seed} replays)");
    let hint = ReplayHint {
        test: "acknowledged_writes_survive_sigkill",
        seed,
        kills,
        cycle: Cell::new(0),
    };
    let started = Instant::now();
    let device = Device::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    let mut stats = Stats::default();
    let counter = AtomicU64::new(1);
    let mut next_full_check = FULL_CHECK_EVERY;

    for cycle in 1..=kills {
        hint.cycle.set(cycle);
        if rng.random_ratio(1, STARTUP_KILL_ONE_IN) {
            kill_during_startup(&device, &mut rng);
            stats.startup_kills += 1;
            continue;
        }
        if cycle >= next_full_check {
            // Opening the store in-process, as a CLI command without a daemon does.
            check_directly(&device, &mut model, Scope::Full, &hint, &mut stats);
            next_full_check += FULL_CHECK_EVERY;
        }
        let mut daemon = device.start_daemon();
        if model.unchecked.is_some() {
            let mut client = daemon.client();
            client
                .set_read_timeout(Some(TIMEOUT))
                .expect("read timeout");
            let mut call = socket_call(&mut client);
            check(&mut model, &mut call, Scope::Recent, &hint, &mut stats);
        }
        // Every cycle that writes has first checked the writes before it.
        assert!(model.unchecked.is_none());
        let writes = Writes {
            cycle,
            seed,
            counter: &counter,
            hint: &hint,
        };
        write_until_killed(&mut daemon, &writes, &mut model, &mut rng, &mut stats);
    }

    hint.cycle.set(kills);
    check_directly(&device, &mut model, Scope::Full, &hint, &mut stats);
    eprintln!(
        "crash test: seed {seed}: {kills} kills ({} during startup), {} acknowledged writes, \
         {} in flight at a kill ({} of them landed), {} records, {} queue entries, \
         {} full checks, {:.1?}",
        stats.startup_kills,
        stats.writes_acked,
        stats.in_flight,
        stats.in_flight_landed,
        model.records.len(),
        model.queue.len(),
        stats.full_checks,
        started.elapsed()
    );
}

/// Starts the daemon and kills it after a random delay, mostly while it opens and recovers the
/// store, before any app can write.
fn kill_during_startup(device: &Device, rng: &mut StdRng) {
    let delay = Duration::from_micros(rng.random_range(0..=STARTUP_KILL_MAX_US));
    let mut daemon = device.spawn_daemon(Stdio::null());
    std::thread::sleep(delay);
    daemon.kill();
}

/// What the writers of one kill cycle share.
struct Writes<'a> {
    cycle: usize,
    seed: u64,
    counter: &'a AtomicU64,
    hint: &'a ReplayHint,
}

/// Runs two or three writers against the daemon, each on its own share of the records and its own
/// connection, and kills the daemon after a random delay. The model takes every acknowledged
/// write; the unanswered ones wait in `model.unchecked` for the next check.
fn write_until_killed(
    daemon: &mut Daemon,
    writes: &Writes,
    model: &mut Model,
    rng: &mut StdRng,
    stats: &mut Stats,
) {
    let writers = rng.random_range(2..=3usize);
    let delay = kill_delay(rng);
    let mut parts: Vec<BTreeMap<Key, Rec>> = vec![BTreeMap::new(); writers];
    for (key, rec) in std::mem::take(&mut model.records) {
        parts[rec.owner % writers].insert(key, rec);
    }
    let writer_seeds: Vec<u64> = (0..writers).map(|_| rng.random()).collect();
    let reports: Vec<WriterReport> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .zip(writer_seeds)
            .enumerate()
            .map(|(slot, (records, writer_seed))| {
                let writer = Writer {
                    slot,
                    cycle: writes.cycle,
                    seed: writes.seed,
                    rng: StdRng::seed_from_u64(writer_seed),
                    counter: writes.counter,
                    socket: daemon.socket.clone(),
                };
                s.spawn(move || writer.run(records))
            })
            .collect();
        std::thread::sleep(delay);
        daemon.kill();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect()
    });

    let mut unchecked = Unchecked {
        cycle: writes.cycle,
        ..Unchecked::default()
    };
    let mut refused = Vec::new();
    for report in reports {
        model.records.extend(report.records);
        stats.writes_acked += report.acked_writes;
        unchecked.touched.extend(report.touched);
        unchecked.acked.extend(report.acked);
        if let Some(f) = report.in_flight {
            unchecked
                .touched
                .extend(f.effects.iter().map(|e| e.0.clone()));
            unchecked.in_flight.push(f);
            stats.in_flight += 1;
        }
        refused.extend(report.refused);
    }
    assert!(
        refused.is_empty(),
        "seed {}, kill {}: the daemon refused valid writes:\n  {}\n{}",
        writes.seed,
        writes.cycle,
        refused.join("\n  "),
        writes.hint.text()
    );
    model.unchecked = Some(unchecked);
}

/// When to kill, counted from the moment the writers start: some right away (while they connect
/// and send their first writes), most while they are busy.
fn kill_delay(rng: &mut StdRng) -> Duration {
    let micros = match rng.random_range(0..20) {
        0..=2 => rng.random_range(0..=2_000),
        3..=7 => rng.random_range(2_000..=20_000),
        _ => rng.random_range(20_000..=120_000),
    };
    Duration::from_micros(micros)
}

/// A daemon killed while it created its store, after sled's own first write but before the
/// store's stamp, acknowledged nothing: the next start creates the store again instead of
/// refusing it as one that lost its data (the `store.creating` marker beside it says which).
#[test]
fn a_store_whose_creation_was_cut_short_is_created_again() {
    let device = Device::new();
    let store = device.data_dir.join("store");
    drop(common::open_sled(&store));
    std::fs::write(store.with_extension("creating"), b"").unwrap();
    let daemon = device.start_daemon();
    let mut client = daemon.client();
    let put = client.call(
        "put",
        json!({"collection": "Note", "id": "1", "fields": {"v": 1}}),
    );
    assert!(put.is_ok(), "{put:?}");
    assert!(daemon.terminate().success());
    assert!(!store.with_extension("creating").exists());
}

/// A clean stop (SIGTERM) after acknowledged writes keeps all of them and removes the socket.
#[test]
fn sigterm_after_acknowledged_writes_keeps_them_and_removes_the_socket() {
    let seed: u64 = env_number("FERRY_CRASH_SEED").unwrap_or_else(|| rand::rng().random());
    eprintln!("sigterm test: seed {seed}");
    let hint = ReplayHint {
        test: "sigterm_after_acknowledged_writes",
        seed,
        kills: 0,
        cycle: Cell::new(0),
    };
    let device = Device::new();
    let daemon = device.start_daemon();
    let counter = AtomicU64::new(1);
    let writer = Writer {
        slot: 0,
        cycle: 1,
        seed,
        rng: StdRng::seed_from_u64(seed),
        counter: &counter,
        socket: daemon.socket.clone(),
    };
    let report = writer.run_for(BTreeMap::new(), 60);
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert!(report.in_flight.is_none(), "a write went unanswered");
    assert_eq!(report.acked_writes, 60);
    let status = daemon.terminate();
    assert!(status.success(), "daemon exit after SIGTERM: {status}");
    assert!(
        !device.socket().exists(),
        "the socket file is still there after a clean stop"
    );
    let mut model = Model {
        records: report.records,
        ..Model::default()
    };
    let mut stats = Stats::default();
    check_directly(&device, &mut model, Scope::Full, &hint, &mut stats);
    // Everything was acknowledged, so the check above compared every record exactly; make sure
    // it had something to compare.
    assert!(model.queue.len() >= 60, "queue: {}", model.queue.len());
}

// ---------------------------------------------------------------------------------------------
// Writers

struct Writer<'a> {
    slot: usize,
    cycle: usize,
    seed: u64,
    rng: StdRng,
    counter: &'a AtomicU64,
    socket: std::path::PathBuf,
}

struct WriterReport {
    records: BTreeMap<Key, Rec>,
    touched: BTreeSet<Key>,
    acked: Vec<Acked>,
    acked_writes: u64,
    in_flight: Option<InFlight>,
    /// Error replies to valid writes: never expected.
    refused: Vec<String>,
}

/// A write about to be sent: the call, and what it does to which record.
struct Planned {
    method: &'static str,
    params: Value,
    effects: Vec<(Key, State, &'static str)>,
}

impl Writer<'_> {
    /// Writes until the connection breaks.
    fn run(self, records: BTreeMap<Key, Rec>) -> WriterReport {
        self.run_for(records, u64::MAX)
    }

    /// Writes until the connection breaks or `limit` writes were acknowledged.
    fn run_for(mut self, records: BTreeMap<Key, Rec>, limit: u64) -> WriterReport {
        let mut report = WriterReport {
            records,
            touched: BTreeSet::new(),
            acked: Vec::new(),
            acked_writes: 0,
            in_flight: None,
            refused: Vec::new(),
        };
        let Ok(mut client) = Client::connect(&self.socket) else {
            // Killed before this writer got in.
            return report;
        };
        // A daemon that hangs instead of dying shows as an unanswered write, never as a hang.
        client
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let mut all: Vec<Key> = report.records.keys().cloned().collect();
        let mut live: Vec<Key> = report
            .records
            .iter()
            .filter(|(_, r)| matches!(r.state, State::Live(_)))
            .map(|(k, _)| k.clone())
            .collect();
        while report.acked_writes < limit {
            let planned = self.plan(&report.records, &all, &live);
            match client.call(planned.method, planned.params.clone()) {
                Ok(reply) => {
                    if let Err(e) = self.acknowledge(&planned, &reply, &mut report) {
                        report.refused.push(e);
                        return report;
                    }
                    for (key, state, _) in &planned.effects {
                        if !all.contains(key) {
                            all.push(key.clone());
                        }
                        let is_live = live.iter().position(|k| k == key);
                        match (state, is_live) {
                            (State::Live(_), None) => live.push(key.clone()),
                            (State::Deleted, Some(i)) => {
                                live.swap_remove(i);
                            }
                            _ => {}
                        }
                    }
                }
                Err(ClientError::Io(_)) => {
                    // The daemon is gone; this write may or may not have landed.
                    report.in_flight = Some(InFlight {
                        what: format!("{} {}", planned.method, planned.params),
                        effects: planned.effects,
                        owner: self.slot,
                    });
                    return report;
                }
                Err(e) => {
                    report
                        .refused
                        .push(format!("{} {} -> {e}", planned.method, planned.params));
                    return report;
                }
            }
        }
        report
    }

    fn plan(&mut self, records: &BTreeMap<Key, Rec>, all: &[Key], live: &[Key]) -> Planned {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let roll = self.rng.random_range(0..100);
        if roll < 12 && !all.is_empty() {
            // Replace an existing record, or bring a deleted one back.
            let key = all[self.rng.random_range(0..all.len())].clone();
            let fields = self.content(n);
            let op = match records[&key].state {
                State::Live(_) => "update",
                State::Deleted => "create",
            };
            return Planned {
                method: "put",
                params: json!({"collection": key.0, "id": key.1, "fields": fields}),
                effects: vec![(key, State::Live(fields), op)],
            };
        }
        if roll < 32 && !live.is_empty() {
            let key = live[self.rng.random_range(0..live.len())].clone();
            let State::Live(mut fields) = records[&key].state.clone() else {
                unreachable!("{key:?} is listed as live")
            };
            let mut set = Fields::new();
            set.insert("n".into(), json!(n));
            set.insert("patched_in".into(), json!(self.cycle));
            let unset: Vec<String> = if self.rng.random_ratio(1, 3) {
                vec!["note".into()]
            } else {
                vec![]
            };
            for name in &unset {
                fields.remove(name);
            }
            fields.extend(set.clone());
            return Planned {
                method: "patch",
                params: json!({"collection": key.0, "id": key.1, "fields": set, "unset": unset}),
                effects: vec![(key, State::Live(fields), "update")],
            };
        }
        if roll < 42 && !live.is_empty() {
            let key = live[self.rng.random_range(0..live.len())].clone();
            return Planned {
                method: "delete",
                params: json!({"collection": key.0, "id": key.1}),
                effects: vec![(key, State::Deleted, "delete")],
            };
        }
        if roll < 47 {
            let count = self.rng.random_range(2..=5);
            let mut effects = Vec::new();
            let mut list = Vec::new();
            for i in 0..count {
                let key = self.new_key(n, i);
                let fields = self.content(n);
                list.push(json!({"collection": key.0, "id": key.1, "fields": fields}));
                effects.push((key, State::Live(fields), "create"));
            }
            return Planned {
                method: "import",
                params: json!({ "records": list }),
                effects,
            };
        }
        let key = self.new_key(n, 0);
        let fields = self.content(n);
        Planned {
            method: "put",
            params: json!({"collection": key.0, "id": key.1, "fields": fields}),
            effects: vec![(key, State::Live(fields), "create")],
        }
    }

    fn new_key(&mut self, n: u64, i: usize) -> Key {
        let collection = COLLECTIONS[self.rng.random_range(0..COLLECTIONS.len())];
        (
            collection.to_owned(),
            format!("k{}-w{}-{n}-{i}", self.cycle, self.slot),
        )
    }

    /// Record content derived from the seed and the write number.
    fn content(&mut self, n: u64) -> Fields {
        let len = self.rng.random_range(0..160u64);
        let text: String = (0..len)
            .map(|i| char::from(b'a' + ((self.seed ^ n).wrapping_add(i * 7) % 26) as u8))
            .collect();
        let tags: Vec<Value> = (0..n % 4).map(|i| json!(format!("t{}", n + i))).collect();
        let Value::Object(fields) = json!({
            "n": n,
            "seed": self.seed.to_string(),
            "text": text,
            "note": format!("written by writer {} in cycle {}", self.slot, self.cycle),
            "ratio": n as f64 + 0.25,
            "tags": tags,
            "meta": {"odd": n % 2 == 1, "mod7": n % 7, "none": null},
        }) else {
            unreachable!()
        };
        fields
    }

    /// Records an answered write in the writer's model, after checking the reply.
    fn acknowledge(
        &self,
        planned: &Planned,
        reply: &Value,
        report: &mut WriterReport,
    ) -> Result<(), String> {
        let bad = |why: &str| format!("{} {} -> {reply}: {why}", planned.method, planned.params);
        if planned.method == "import" {
            let ids: Vec<&str> = planned.effects.iter().map(|e| e.0.1.as_str()).collect();
            if reply["ids"] != json!(ids) || reply["changed"] != json!(ids.len()) {
                return Err(bad("the reply does not match the import"));
            }
            for (key, state, op) in &planned.effects {
                report.touched.insert(key.clone());
                report.records.insert(
                    key.clone(),
                    Rec {
                        owner: self.slot,
                        state: state.clone(),
                        history: vec![Change { hash: None, op }],
                    },
                );
            }
        } else {
            let (key, state, op) = &planned.effects[0];
            let heads = reply["heads"].as_array().cloned().unwrap_or_default();
            let (Some(queue_id), [Value::String(hash)]) =
                (reply["queue_id"].as_u64(), heads.as_slice())
            else {
                return Err(bad("expected one head and a queue_id"));
            };
            if reply["operation"] != json!(op) || reply["id"] != json!(key.1) {
                return Err(bad(&format!("expected operation {op} on {}", key.1)));
            }
            report.touched.insert(key.clone());
            let rec = report.records.entry(key.clone()).or_insert_with(|| Rec {
                owner: self.slot,
                state: State::Deleted,
                history: Vec::new(),
            });
            rec.state = state.clone();
            rec.history.push(Change {
                hash: Some(hash.clone()),
                op,
            });
            report.acked.push(Acked {
                queue_id,
                key: key.clone(),
                hash: hash.clone(),
            });
        }
        report.acked_writes += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Checks

fn socket_call(client: &mut Client) -> impl FnMut(&str, Value) -> Result<Value, ApiError> + '_ {
    move |method, params| match client.call(method, params) {
        Ok(v) => Ok(v),
        Err(ClientError::Api(e)) => Err(e),
        Err(e) => panic!("the daemon stopped answering during a check: {e}"),
    }
}

/// Opens the store in-process (taking the data directory's lock, as a CLI command without a
/// daemon does) and checks it.
fn check_directly(
    device: &Device,
    model: &mut Model,
    scope: Scope,
    hint: &ReplayHint,
    stats: &mut Stats,
) {
    let dir = DataDir::resolve(Some(&device.data_dir)).expect("data dir");
    let config = Config::load(&dir.config_path(), false).expect("config");
    let open = ferry::daemon::open_store(&dir, &config).unwrap_or_else(|e| {
        panic!(
            "seed {}: the store does not open after kill {}: {e}\n{}",
            hint.seed,
            hint.cycle.get(),
            hint.text()
        )
    });
    let service = Service::new(
        open.store.clone(),
        ferry::daemon::service_options(&dir, &config, false),
    );
    let mut call = |method: &str, params: Value| ferry::ipc::call_json(&service, method, params);
    check(model, &mut call, scope, hint, stats);
    drop(service);
    drop(open);
}

/// Checks the store against the model, then makes the model what was found (so that in-flight
/// writes that landed count from now on). Panics with every problem found.
fn check(model: &mut Model, call: &mut Call, scope: Scope, hint: &ReplayHint, stats: &mut Stats) {
    let unchecked = model.unchecked.take().unwrap_or_default();
    let mut problems = Vec::new();
    let full = matches!(scope, Scope::Full);
    if full {
        stats.full_checks += 1;
    }

    // In-flight writes by record.
    let mut in_flight: BTreeMap<&Key, (usize, &State, &'static str, usize)> = BTreeMap::new();
    for (index, f) in unchecked.in_flight.iter().enumerate() {
        for (key, state, op) in &f.effects {
            in_flight.insert(key, (index, state, op, f.owner));
        }
    }
    let keys: BTreeSet<Key> = if full {
        model
            .records
            .keys()
            .chain(unchecked.touched.iter())
            .cloned()
            .collect()
    } else {
        unchecked.touched.clone()
    };

    // Records.
    let mut landed = vec![BTreeSet::new(); unchecked.in_flight.len()];
    for key in &keys {
        let expected = model.records.get(key);
        let flying = in_flight.get(key).copied();
        match check_record(call, key, expected, flying.map(|f| (f.1, f.2))) {
            Ok((found, in_flight_landed)) => {
                if in_flight_landed && let Some((index, ..)) = flying {
                    landed[index].insert(key.clone());
                }
                match found {
                    Some((state, history)) => {
                        let owner = expected.map_or_else(|| flying.map_or(0, |f| f.3), |r| r.owner);
                        model.records.insert(
                            key.clone(),
                            Rec {
                                owner,
                                state,
                                history,
                            },
                        );
                    }
                    None => {
                        model.records.remove(key);
                    }
                }
            }
            Err(problem) => problems.push(format!("{}/{}: {problem}", key.0, key.1)),
        }
    }
    for (f, landed) in unchecked.in_flight.iter().zip(&landed) {
        if !landed.is_empty() {
            stats.in_flight_landed += 1;
        }
        if !landed.is_empty() && landed.len() != f.effects.len() {
            problems.push(format!(
                "the unanswered write `{}` landed only in part: {landed:?}",
                f.what
            ));
        }
    }

    // Nothing else: document counts per collection, and in a full check every live record.
    match call("collections", json!({})) {
        Ok(reply) => {
            let mut found: BTreeMap<String, u64> = BTreeMap::new();
            for c in reply["collections"].as_array().into_iter().flatten() {
                let name = c["name"].as_str().unwrap_or_default().to_owned();
                found.insert(name, c["documents"].as_u64().unwrap_or_default());
            }
            let mut expected: BTreeMap<String, u64> = BTreeMap::new();
            for key in model.records.keys() {
                *expected.entry(key.0.clone()).or_default() += 1;
            }
            if found != expected {
                problems.push(format!(
                    "documents per collection: found {found:?}, expected {expected:?}"
                ));
            }
        }
        Err(e) => problems.push(format!("collections: {e}")),
    }
    if full {
        for collection in COLLECTIONS {
            match list_all(call, collection) {
                Ok(found) => {
                    let expected: BTreeSet<String> = model
                        .records
                        .iter()
                        .filter(|(k, r)| k.0 == collection && matches!(r.state, State::Live(_)))
                        .map(|(k, _)| k.1.clone())
                        .collect();
                    if found != expected {
                        problems.push(format!(
                            "live records of {collection}: unexpected {:?}, missing {:?}",
                            found.difference(&expected).collect::<Vec<_>>(),
                            expected.difference(&found).collect::<Vec<_>>()
                        ));
                    }
                }
                Err(e) => problems.push(format!("list {collection}: {e}")),
            }
        }
    }

    check_queue(call, model, &unchecked, &keys, full, &mut problems);

    if !problems.is_empty() {
        let when = match hint.cycle.get() {
            0 => "after a clean stop".to_owned(),
            kill => format!("after kill {kill}"),
        };
        let writes = match unchecked.cycle {
            0 => String::new(),
            cycle => format!(" of the writes made in cycle {cycle}"),
        };
        panic!(
            "seed {}: {when} ({} check{writes}), the store is not as acknowledged:\n  {}\n{}",
            hint.seed,
            if full { "full" } else { "recent" },
            problems.join("\n  "),
            hint.text()
        );
    }
}

/// Compares one record with what was acknowledged (and, when a write to it was in flight, with
/// that write having landed). Returns what was found: `None` when the record does not exist, and
/// whether the in-flight write landed.
fn check_record(
    call: &mut Call,
    key: &Key,
    expected: Option<&Rec>,
    flying: Option<(&State, &'static str)>,
) -> Result<(Option<Found>, bool), String> {
    let address = json!({"collection": key.0, "id": key.1});
    let history = match call("history", address.clone()) {
        Ok(reply) => {
            let changes = reply["changes"].as_array().cloned().unwrap_or_default();
            let mut out = Vec::new();
            for c in changes {
                let op = match c["operation"].as_str() {
                    Some("create") => "create",
                    Some("update") => "update",
                    Some("delete") => "delete",
                    other => return Err(format!("a change with operation {other:?}")),
                };
                out.push(Change {
                    hash: c["hash"].as_str().map(str::to_owned),
                    op,
                });
            }
            Some(out)
        }
        Err(e) if e.code == code::NOT_FOUND => None,
        Err(e) => return Err(format!("history: {e}")),
    };
    let (state, heads) = match call("get", address) {
        Ok(reply) => {
            let Some(fields) = reply["fields"].as_object() else {
                return Err(format!("get replied {reply}"));
            };
            (Some(State::Live(fields.clone())), reply["heads"].clone())
        }
        Err(e) if e.code == code::NOT_FOUND => (None, Value::Null),
        Err(e) => return Err(format!("get: {e}")),
    };
    let Some(history) = history else {
        if state.is_some() {
            return Err("readable but has no history".into());
        }
        return match expected {
            None => Ok((None, false)),
            Some(rec) => Err(format!(
                "missing; acknowledged with {} changes, last state {:?}",
                rec.history.len(),
                rec.state
            )),
        };
    };
    let state = state.unwrap_or(State::Deleted);
    if let (State::Live(_), Some(last)) = (&state, history.last())
        && heads != json!([last.hash])
    {
        return Err(format!(
            "heads {heads} are not the last change {:?}",
            last.hash
        ));
    }
    let base: &[Change] = expected.map_or(&[], |r| r.history.as_slice());
    let base_state = expected.map(|r| &r.state);
    let prefix_ok = history.len() >= base.len()
        && base
            .iter()
            .zip(&history)
            .all(|(want, got)| want.op == got.op && (want.hash.is_none() || want.hash == got.hash));
    let describe = || {
        let found: Vec<String> = history
            .iter()
            .map(|c| format!("{} {}", c.op, c.hash.as_deref().unwrap_or("?")))
            .collect();
        let wanted: Vec<String> = base
            .iter()
            .map(|c| format!("{} {}", c.op, c.hash.as_deref().unwrap_or("(import)")))
            .collect();
        format!("history {found:?}, acknowledged {wanted:?}")
    };
    if !prefix_ok {
        return Err(format!(
            "acknowledged changes are missing or altered: {}",
            describe()
        ));
    }
    let landed = match (history.len() - base.len(), flying) {
        (0, _) => {
            if base_state != Some(&state) {
                return Err(format!(
                    "content is {state:?}, acknowledged {base_state:?}; {}",
                    describe()
                ));
            }
            false
        }
        (1, Some((flying_state, flying_op))) => {
            let last = history.last().map(|c| c.op);
            if last != Some(flying_op) || flying_state != &state {
                return Err(format!(
                    "one change more than acknowledged, but not the unanswered write: content \
                     {state:?}, expected {flying_state:?} ({flying_op}); {}",
                    describe()
                ));
            }
            true
        }
        (extra, _) => {
            return Err(format!(
                "{extra} changes nobody wrote (or whose write was not the last one sent): {}",
                describe()
            ));
        }
    };
    Ok((Some((state, history)), landed))
}

fn list_all(call: &mut Call, collection: &str) -> Result<BTreeSet<String>, ApiError> {
    let mut out = BTreeSet::new();
    let mut after: Option<String> = None;
    loop {
        let reply = call(
            "list",
            json!({"collection": collection, "limit": 1000, "after": after}),
        )?;
        for r in reply["records"].as_array().into_iter().flatten() {
            out.insert(r["id"].as_str().unwrap_or_default().to_owned());
        }
        match reply["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok(out),
        }
    }
}

/// The queue must hold exactly one entry per change: for each record checked, the change hashes
/// of its entries are its history's, each once; every acknowledged write's entry holds its change;
/// entries already verified are unchanged, and no entry belongs to a record nobody wrote.
fn check_queue(
    call: &mut Call,
    model: &mut Model,
    unchecked: &Unchecked,
    keys: &BTreeSet<Key>,
    full: bool,
    problems: &mut Vec<String>,
) {
    let mut after = if full {
        None
    } else {
        Some(model.queue_checked)
    };
    let mut read: BTreeMap<u64, QueueItem> = BTreeMap::new();
    loop {
        let reply = match call("queue", json!({"after": after, "limit": 10_000})) {
            Ok(reply) => reply,
            Err(e) => {
                problems.push(format!("queue: {e}"));
                return;
            }
        };
        let entries: Vec<QueueView> = match serde_json::from_value(reply["entries"].clone()) {
            Ok(entries) => entries,
            Err(e) => {
                problems.push(format!("queue entries unreadable: {e}"));
                return;
            }
        };
        if entries.is_empty() {
            break;
        }
        for e in entries {
            if after.is_some_and(|a| e.id <= a) {
                // Entries come in key order; an id out of order means one is stored under another
                // entry's key. Stop here rather than page through it forever.
                problems.push(format!(
                    "queue entry {} comes after entry {after:?}: entry ids and keys disagree",
                    e.id
                ));
                return;
            }
            after = Some(e.id);
            if e.status != QueueStatus::Pending {
                problems.push(format!("queue entry {} is {:?}", e.id, e.status));
            }
            let Some(hash) = e.change else {
                problems.push(format!("queue entry {} holds no readable change", e.id));
                continue;
            };
            read.insert(
                e.id,
                QueueItem {
                    key: (e.model_name, e.object_id),
                    hash,
                    op: e.operation.as_str().to_owned(),
                },
            );
        }
    }

    let mut queue = if full {
        // Entries verified before must be just as they were.
        for (id, old) in &model.queue {
            match read.get(id) {
                Some(now) if now == old => {}
                now => problems.push(format!("queue entry {id} was {old:?}, now {now:?}")),
            }
        }
        read
    } else {
        let mut queue = std::mem::take(&mut model.queue);
        queue.extend(read);
        queue
    };

    for a in &unchecked.acked {
        match queue.get(&a.queue_id) {
            Some(item) if item.key == a.key && item.hash == a.hash => {}
            item => problems.push(format!(
                "acknowledged write {} to {}/{} has queue entry {:?}, expected its change {}",
                a.queue_id, a.key.0, a.key.1, item, a.hash
            )),
        }
    }

    let mut by_key: BTreeMap<&Key, Vec<(&str, &str)>> = BTreeMap::new();
    for item in queue.values() {
        by_key
            .entry(&item.key)
            .or_default()
            .push((item.hash.as_str(), item.op.as_str()));
    }
    for (key, entries) in &by_key {
        if !model.records.contains_key(*key) {
            problems.push(format!(
                "queue entries {entries:?} for {}/{}, which nobody wrote",
                key.0, key.1
            ));
        }
    }
    for key in keys {
        let Some(rec) = model.records.get(key) else {
            continue;
        };
        let mut found: Vec<(&str, &str)> = by_key.get(key).cloned().unwrap_or_default();
        let mut expected: Vec<(&str, &str)> = rec
            .history
            .iter()
            .map(|c| (c.hash.as_deref().unwrap_or("?"), c.op))
            .collect();
        found.sort_unstable();
        expected.sort_unstable();
        if found != expected {
            problems.push(format!(
                "{}/{}: queue holds {found:?}, history is {expected:?}",
                key.0, key.1
            ));
        }
    }
    model.queue_checked = queue.keys().next_back().copied().unwrap_or(0);
    model.queue = std::mem::take(&mut queue);
}
