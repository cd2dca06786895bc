//! End-to-end sync benchmark: a real `ferry relay` and real `ferry daemon` processes syncing over
//! QUIC on loopback, each on its own sled store in a temp dir, driven through their Unix sockets
//! exactly as apps drive them.
//!
//! - W1 initial sync: device A holds N records written offline; with the relay and an empty
//!   device B running, A's daemon starts with its sync config; the time until B holds all N.
//! - W2 propagation latency: single-field `patch`es on A, one at a time; the time until B's
//!   subscriber hears of each.
//! - W3 concurrent offline edits: with the relay stopped, A and B edit different fields of the
//!   same records; the relay comes back and both must converge: on both edits of every record
//!   under the `merge` and `manual` strategies, on the later writer's whole record under `lww`.
//!   Run once per strategy (`[collections.Customer] strategy` on both devices), counting the
//!   conflicts each device found.
//!
//! With `--postgres` the relay keeps its data in a PostgreSQL database (a private server the
//! benchmark starts, durable as a production one: fsync on) instead of sled, and with
//! `--relays 2` W1 and W2 run A and B on two relays sharing that database (W3, which stops its one
//! relay, is then left out).
//!
//! With `--profile NAME` every device reaches the relay through the link emulator
//! (`tests/common/link.rs`: `lan`, `broadband`, `mobile`, `bad-3g`, `satellite`) instead of
//! loopback, and W1 also times a third device's initial sync by download alone.
//!
//! `cargo bench --bench sync_e2e [-- --records N --updates N --w3-records N --only w1|w2|w3]`
//! prints one JSON object per workload and size on standard output and a summary on standard
//! error; see benches/README.md. Without `--bench` (as `cargo test --all-targets` runs it) it
//! does a quick smoke run of every workload on a few records.
//!
//! Child processes never outlive the benchmark: each one is a guard that kills it when dropped
//! (also while a panic unwinds), and SIGINT/SIGTERM/SIGHUP stop them all before the benchmark
//! itself stops.

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

use common::link::{Link, PROFILES, Profile};
use common::postgres::PgServer;
use common::{Device, TIMEOUT};
use ferry::ipc::{Client, Notification};
use ferry::service::{ChangeEvent, Origin};
use harness::{
    Guarded, Running, call, check_interrupted, cpu_us, disk_usage, install_signal_handlers,
    latency, memory_kib, per_second, poll_until, postgres_cpu, secs, space, space_compacted,
    space_lines, space_per_record,
};
use serde_json::{Value, json};
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{COLLECTION, import_record, record_id};

const USAGE: &str = "\
usage: cargo bench --bench sync_e2e -- [OPTIONS]

  --records N       W1 records; repeat for several runs (default: 10000 and 100000)
  --updates N       W2 patches, one at a time (default 200)
  --w3-records N    W3 records edited on both devices while offline (default 1000)
  --only W          run only workload W: w1, w2 or w3
  --w3-strategy S   W3 under collection strategy S (merge, lww or manual); repeat for several
                    (default: all three)
  --w3-same-field   W3 with both devices editing the same field (s1) of every record, so that
                    every record is an update-update conflict; runs after the usual W3
  --encrypt-fields K  W1 with K of the 10 fields declared `encrypted` on both devices, which
                    have an account key set (default 0)
  --feed-fields     W1's subscriber on B asks for each record's fields in its notifications
                    (`subscribe` with `fields`), as an app reading the feed would
  --postgres        the relay keeps its data in PostgreSQL (a private server started for the
                    benchmark, fsync on; needs /usr/lib/postgresql/*/bin) instead of sled
  --relays N        W1 and W2 with A on one relay and B on another, N = 2, both on one
                    PostgreSQL database (implies --postgres; W3 is left out; default 1)
  --profile P       devices reach the relay through the link emulator with profile P (lan,
                    broadband, mobile, bad-3g, satellite; default: straight over loopback)
  --seed N          the link emulator's seed (default 1)
  --congestion C    QUIC congestion controller of the relay and the devices: bbr, cubic or
                    new_reno (default: the config's, bbr)
  --device-sled-cache-mb N  the devices' `store.sled_cache_mb` (default: the config's)
  --relay-sled-cache-mb N   the relays' `relay.sled_cache_mb` (default: the config's)
  --log FILTER      log filter for the relay and the daemons (default: info)
  --log-dir DIR     keep the relay's and the daemons' logs in DIR (default: in the temp dirs,
                    removed at the end)";

/// Records per `import` call (at most the daemon's `ipc.max_import_records`, 10,000).
const IMPORT_BATCH: u64 = 5000;
/// How often the waits for a sync condition look at `status`: the resolution of those times.
const POLL: Duration = Duration::from_millis(10);
/// The longest any one workload may take to converge before the benchmark gives up.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long W3's devices may take to converge once the relay is back, before the benchmark
/// fails and says how far they got.
const W3_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    W1,
    W2,
    W3,
}

struct Options {
    records: Vec<u64>,
    updates: u64,
    w3_records: u64,
    w3_strategies: Vec<String>,
    /// Also run W3 with both sides editing one field.
    w3_same_field: bool,
    only: Option<Workload>,
    /// W1's fields declared encrypted.
    encrypt_fields: usize,
    /// W1's subscriber takes each record's fields with its notification.
    feed_fields: bool,
    log: String,
    log_dir: Option<PathBuf>,
    /// The link between every device and the relay; `None`: loopback.
    profile: Option<Profile>,
    seed: u64,
    congestion: Option<String>,
    device_sled_cache_mb: Option<u64>,
    relay_sled_cache_mb: Option<u64>,
    /// Relays keep their data in PostgreSQL.
    postgres: bool,
    /// Relays A and B use (A on the first, B on the last).
    relays: usize,
    smoke: bool,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `cargo bench` passes `--bench`; without it this is a test run: a quick smoke pass.
        let smoke = !args.iter().any(|a| a == "--bench");
        let mut o = Options {
            records: Vec::new(),
            updates: 200,
            w3_records: 1000,
            w3_strategies: Vec::new(),
            w3_same_field: false,
            only: None,
            encrypt_fields: 0,
            feed_fields: false,
            log: "info".into(),
            log_dir: None,
            profile: None,
            seed: 1,
            congestion: None,
            device_sled_cache_mb: None,
            relay_sled_cache_mb: None,
            postgres: false,
            relays: 1,
            smoke,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut text = |name: &str| it.next().ok_or(format!("{name} needs a value"));
            let number = |name: &str, v: &String| -> Result<u64, String> {
                v.parse()
                    .map_err(|_| format!("{name} {v:?}: expected a whole number"))
            };
            match arg.as_str() {
                "--bench" => {}
                "--records" => o.records.push(number(arg, text(arg)?)?),
                "--updates" => o.updates = number(arg, text(arg)?)?,
                "--w3-records" => o.w3_records = number(arg, text(arg)?)?,
                "--w3-strategy" => {
                    let strategy = text(arg)?;
                    if !["merge", "lww", "manual"].contains(&strategy.as_str()) {
                        return Err(format!(
                            "--w3-strategy {strategy:?}: expected merge, lww or manual"
                        ));
                    }
                    o.w3_strategies.push(strategy.clone());
                }
                "--w3-same-field" => o.w3_same_field = true,
                "--feed-fields" => o.feed_fields = true,
                "--encrypt-fields" => {
                    let k = number(arg, text(arg)?)?;
                    if k > 10 {
                        return Err(format!("--encrypt-fields {k}: a record has 10 fields"));
                    }
                    o.encrypt_fields = k as usize;
                }
                "--only" => {
                    o.only = Some(match text(arg)?.as_str() {
                        "w1" => Workload::W1,
                        "w2" => Workload::W2,
                        "w3" => Workload::W3,
                        other => return Err(format!("--only {other:?}: expected w1, w2 or w3")),
                    })
                }
                "--profile" => {
                    let name = text(arg)?;
                    o.profile = Some(Profile::named(name).ok_or(format!(
                        "--profile {name:?}: expected one of {}",
                        PROFILES.join(", ")
                    ))?);
                }
                "--seed" => o.seed = number(arg, text(arg)?)?,
                "--congestion" => {
                    let c = text(arg)?;
                    if !["cubic", "bbr", "new_reno"].contains(&c.as_str()) {
                        return Err(format!(
                            "--congestion {c:?}: expected cubic, bbr or new_reno"
                        ));
                    }
                    o.congestion = Some(c.clone());
                }
                "--device-sled-cache-mb" => {
                    o.device_sled_cache_mb = Some(number(arg, text(arg)?)?);
                }
                "--relay-sled-cache-mb" => {
                    o.relay_sled_cache_mb = Some(number(arg, text(arg)?)?);
                }
                "--postgres" => o.postgres = true,
                "--relays" => {
                    o.relays = match number(arg, text(arg)?)? {
                        1 => 1,
                        2 => 2,
                        n => return Err(format!("--relays {n}: expected 1 or 2")),
                    };
                }
                "--log" => o.log = text(arg)?.clone(),
                "--log-dir" => {
                    let dir = PathBuf::from(text(arg)?);
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("--log-dir {}: {e}", dir.display()))?;
                    o.log_dir = Some(dir);
                }
                "--help" | "-h" => return Err(String::new()),
                // A test run may get the test harness's own arguments: not ours to refuse.
                _ if smoke => eprintln!("sync_e2e: ignoring argument {arg:?} in a test run"),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if o.smoke {
            o.records = vec![300];
            o.updates = o.updates.min(20);
            o.w3_records = o.w3_records.min(50);
        } else if o.records.is_empty() {
            o.records = vec![10_000, 100_000];
        }
        if o.w3_strategies.is_empty() {
            o.w3_strategies = ["merge", "lww", "manual"].map(String::from).to_vec();
        }
        // Relays share what they keep only through a database.
        o.postgres |= o.relays > 1;
        if o.records.contains(&0) || o.updates == 0 || o.w3_records == 0 {
            return Err("--records, --updates and --w3-records must be at least 1".into());
        }
        Ok(o)
    }

    fn runs(&self, w: Workload) -> bool {
        // W3 stops its relay: with B on another one, B would go on syncing.
        self.only.is_none_or(|only| only == w) && !(w == Workload::W3 && self.relays > 1)
    }
}

fn main() {
    let options = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("sync_e2e: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    install_signal_handlers();
    eprintln!(
        "sync_e2e: {} build, ferry binary {}",
        if cfg!(debug_assertions) {
            "DEBUG (numbers are not meaningful)"
        } else {
            "release"
        },
        common::ferry_bin(),
    );
    let emit = |mut result: Value| {
        result["build"] = json!(if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        });
        result["cpus"] = json!(std::thread::available_parallelism().map_or(0, |p| p.get()));
        result["link"] = options.profile.as_ref().map_or(json!(null), |p| {
            json!({
                "profile": p.name,
                "rtt_ms": p.rtt().as_millis() as u64,
                "bottleneck_bps": p.bottleneck_bps(),
                "seed": options.seed,
            })
        });
        result["congestion"] = json!(options.congestion.as_deref().unwrap_or("bbr"));
        result["device_sled_cache_mb"] = json!(options.device_sled_cache_mb);
        result["relay_sled_cache_mb"] = json!(options.relay_sled_cache_mb);
        result["relay_storage"] = json!(if options.postgres { "postgres" } else { "sled" });
        result["relays"] = json!(options.relays);
        println!("{result}");
        summarize(&result);
    };
    if options.runs(Workload::W1) {
        for &n in &options.records {
            emit(initial_sync(n, &options));
        }
    }
    if options.runs(Workload::W2) {
        emit(propagation(options.updates, &options));
    }
    if options.runs(Workload::W3) {
        for same_field in [false, true] {
            if same_field && !options.w3_same_field {
                continue;
            }
            for strategy in &options.w3_strategies {
                emit(offline_edits(
                    options.w3_records,
                    strategy,
                    same_field,
                    &options,
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The processes.

/// A running `ferry relay`; killed when dropped.
struct Relay {
    process: Guarded,
    /// Its data directory, where the operator's commands find it.
    dir: PathBuf,
    /// The address it serves on, as devices write it in `sync.relay`.
    listen: String,
    fingerprint: String,
    /// The link emulator devices reach it through, under `--profile`.
    link: Option<Link>,
    /// Kept open: the relay may write to its standard output again.
    _stdout: std::io::BufReader<ChildStdout>,
}

impl Relay {
    /// Starts a relay on `dir` listening on `listen`, keeping its data in `storage`, and waits
    /// until it serves.
    fn start(dir: &Path, listen: &str, o: &Options, storage: &Storage, log: &Path) -> Relay {
        check_interrupted();
        let mut config = String::new();
        if let Some(congestion) = &o.congestion {
            config += &format!("congestion = {congestion:?}\n");
        }
        if let Some(url) = &storage.url {
            config += &format!("storage = \"postgres\"\npostgres_url = {url:?}\n");
        }
        if let Some(mb) = o.relay_sled_cache_mb {
            config += &format!("sled_cache_mb = {mb}\n");
        }
        if !config.is_empty() {
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(dir)
            .expect("relay data dir");
            std::fs::write(dir.join("config.toml"), format!("[relay]\n{config}"))
                .expect("write the relay's config");
        }
        let log_file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = Command::new(common::ferry_bin())
            .arg("--data-dir")
            .arg(dir)
            .args(["--json", "relay", "--listen", listen])
            .env_remove("FERRY_CONFIG")
            .env("RUST_LOG", &o.log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn ferry relay");
        let mut process = Guarded::new(child);
        let stdout = process.child().stdout.take().expect("the relay's stdout");
        // Read on a thread so that a relay that never gets ready cannot hang the benchmark.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line);
            let _ = tx.send((read, line, reader));
        });
        let (read, line, reader) = rx
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("ferry relay not ready after {TIMEOUT:?}"));
        match read {
            Ok(n) if n > 0 => {}
            _ => panic!(
                "ferry relay exited before it was ready; its log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("relay ready line {line:?}: {e}"));
        let field = |name: &str| {
            ready[name]
                .as_str()
                .unwrap_or_else(|| panic!("relay ready line without {name}: {line}"))
                .to_string()
        };
        let listen = field("listen");
        let link = o.profile.clone().map(|profile| {
            Link::start(
                listen.parse().expect("the relay's address"),
                profile,
                o.seed,
            )
        });
        Relay {
            dir: dir.to_owned(),
            listen,
            fingerprint: field("fingerprint"),
            link,
            process,
            _stdout: reader,
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Where devices send: the link emulator in front of the relay under `--profile`, else the
    /// relay itself.
    fn address(&self) -> String {
        self.link
            .as_ref()
            .map_or_else(|| self.listen.clone(), |l| l.addr().to_string())
    }

    /// SIGTERM and wait for the clean exit (the relay flushes its store).
    fn stop(self) {
        let status = self.process.stop();
        assert!(status.success(), "relay exit: {status}");
    }
}

/// Where the relays of one run keep their data: sled in each one's data directory, or, with
/// `--postgres`, a fresh database of the benchmark's PostgreSQL server, which they share.
struct Storage {
    url: Option<String>,
    database: Option<String>,
    /// The server's CPU time when the database was made (`database_cpu_us`).
    database_cpu_at_start: Option<u64>,
}

impl Storage {
    fn new(o: &Options) -> Storage {
        if !o.postgres {
            return Storage {
                url: None,
                database: None,
                database_cpu_at_start: None,
            };
        }
        let server = PgServer::durable();
        let database = server.create_database();
        let mut storage = Storage {
            url: Some(server.url(&database)),
            database: Some(database),
            database_cpu_at_start: None,
        };
        storage.database_cpu_at_start = storage.database_cpu_us();
        storage
    }

    /// The PostgreSQL server's CPU time so far (every database's, its background processes'
    /// too), in microseconds, when the relays keep their data in it.
    fn database_cpu_us(&self) -> Option<u64> {
        self.database.as_ref()?;
        Some(postgres_cpu(&PgServer::durable().dir().join("data")) * 10_000)
    }

    /// Bytes of the database, when the relays keep their data in one.
    fn database_bytes(&self) -> Option<u64> {
        let database = self.database.as_ref()?;
        let size = PgServer::durable().sql(database, "SELECT pg_database_size(current_database())");
        size.trim().parse().ok()
    }
}

/// The relays A and B use: one, or (`--relays 2`) a second one for B on the same database.
struct Relays {
    first: Relay,
    second: Option<Relay>,
    dirs: [RelayDir; 2],
    storage: Storage,
}

impl Relays {
    fn start(o: &Options, logs: &Logs) -> Relays {
        let dirs = [RelayDir::new(), RelayDir::new()];
        let storage = Storage::new(o);
        let first = Relay::start(
            &dirs[0].path,
            "127.0.0.1:0",
            o,
            &storage,
            &logs.path("relay"),
        );
        let second = (o.relays > 1).then(|| {
            Relay::start(
                &dirs[1].path,
                "127.0.0.1:0",
                o,
                &storage,
                &logs.path("relay2"),
            )
        });
        Relays {
            first,
            second,
            dirs,
            storage,
        }
    }

    /// B's relay.
    fn for_b(&self) -> &Relay {
        self.second.as_ref().unwrap_or(&self.first)
    }

    fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.first)
            .chain(&self.second)
            .map(Relay::pid)
            .collect()
    }

    /// Stops the relays cleanly; their data directories stay until the result is dropped.
    fn stop(self) -> [RelayDir; 2] {
        self.first.stop();
        if let Some(second) = self.second {
            second.stop();
        }
        self.dirs
    }
}

/// CPU time of several processes together.
fn cpu_us_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&pid| cpu_us(pid)).sum()
}

/// A relay's data directory, which the relay creates (owner-only) in a temp dir.
struct RelayDir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl RelayDir {
    fn new() -> RelayDir {
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join("relay");
        RelayDir { _tmp: tmp, path }
    }
}

/// Where the processes of one run write their logs.
struct Logs {
    dir: PathBuf,
    prefix: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Logs {
    fn new(o: &Options, run: &str) -> Logs {
        match &o.log_dir {
            Some(dir) => Logs {
                dir: dir.clone(),
                prefix: format!("{run}-"),
                _tmp: None,
            },
            None => {
                let tmp = tempfile::tempdir().expect("temp dir");
                Logs {
                    dir: tmp.path().to_owned(),
                    prefix: String::new(),
                    _tmp: Some(tmp),
                }
            }
        }
    }

    fn path(&self, process: &str) -> PathBuf {
        self.dir.join(format!("{}{process}.log", self.prefix))
    }
}

/// A fresh device whose daemon logs at the benchmark's level.
fn new_device(o: &Options) -> Device {
    let device = Device::new();
    edit_config(
        &device,
        "\nlevel = \"info\"",
        &format!("\nlevel = {:?}", o.log),
    );
    if let Some(congestion) = &o.congestion {
        edit_config(
            &device,
            "\ncongestion = \"bbr\"",
            &format!("\ncongestion = {congestion:?}"),
        );
    }
    if let Some(mb) = o.device_sled_cache_mb {
        // The first `sled_cache_mb` is the store's (the relay's comes later).
        let path = device.data_dir.join("config.toml");
        let text = std::fs::read_to_string(&path).expect("read config.toml");
        let line = text
            .lines()
            .find(|l| l.starts_with("sled_cache_mb = "))
            .expect("config.toml has a sled_cache_mb");
        edit_config(&device, line, &format!("sled_cache_mb = {mb}"));
    }
    device
}

/// Points the device at the relay (`sync.relay` and `sync.fingerprint`) and registers it in
/// the `default` account.
fn join_relay(device: &Device, relay: &Relay) {
    let operator = common::Operator(&relay.dir);
    operator.add_account("default");
    device.register_at(&operator, &relay.listen, &relay.fingerprint, "default");
    edit_config(
        device,
        "\nrelay = \"\"",
        &format!("\nrelay = {:?}", relay.address()),
    );
    edit_config(
        device,
        "\nfingerprint = \"\"",
        &format!("\nfingerprint = {:?}", relay.fingerprint),
    );
}

/// Gives the benchmark collection the conflict strategy `strategy` (the `[collections]` table
/// `ferry init` writes comes last in config.toml).
fn set_strategy(device: &Device, strategy: &str) {
    let path = device.data_dir.join("config.toml");
    let mut text = std::fs::read_to_string(&path).expect("read config.toml");
    text += &format!("\n[collections.{COLLECTION}]\nstrategy = {strategy:?}\n");
    std::fs::write(&path, text).expect("write config.toml");
}

/// Declares `k` of the benchmark record's fields `encrypted` on each device and sets the same
/// account key on each; returns the fields' names.
fn encrypt_fields(devices: &[&Device], k: usize) -> Vec<String> {
    let names: Vec<String> = workload::record_fields(0)
        .keys()
        .rev()
        .take(k)
        .cloned()
        .collect();
    if names.is_empty() {
        return names;
    }
    for device in devices {
        let path = device.data_dir.join("config.toml");
        let mut text = std::fs::read_to_string(&path).expect("read config.toml");
        text += &format!("\n[collections.{COLLECTION}]\nencrypted = {names:?}\n");
        std::fs::write(&path, text).expect("write config.toml");
        let out = device
            .command(&["key", "set"])
            .env("FERRY_PASSPHRASE", "benchmark passphrase")
            .output()
            .expect("run ferry key set");
        assert!(out.status.success(), "ferry key set: {out:?}");
    }
    names
}

/// Replaces the first `from` in the device's config.toml (the keys `ferry init` wrote).
fn edit_config(device: &Device, from: &str, to: &str) {
    let path = device.data_dir.join("config.toml");
    let text = std::fs::read_to_string(&path).expect("read config.toml");
    assert!(text.contains(from), "config.toml has no {from:?}");
    std::fs::write(&path, text.replacen(from, to, 1)).expect("write config.toml");
}

// ---------------------------------------------------------------------------------------------
// Reading a device's state.

/// The parts of `status` the workloads wait on.
#[derive(Debug)]
struct Status {
    documents: u64,
    /// Queue entries not yet acknowledged by the relay (pending or being uploaded).
    unsent: u64,
    failed: u64,
    connected: bool,
    cursor: u64,
    relay_head: u64,
    up_to_date: bool,
    synced_once: bool,
    uploaded: u64,
    bytes_sent: u64,
    bytes_received: u64,
}

impl Status {
    fn of(client: &mut Client) -> Status {
        let s = call(client, "status", json!({}));
        let num = |v: &Value| {
            v.as_u64()
                .unwrap_or_else(|| panic!("status without a number where expected: {s}"))
        };
        let sync = &s["sync"];
        assert!(
            sync.is_object(),
            "status without sync (no relay configured?): {s}"
        );
        Status {
            documents: num(&s["documents"]),
            unsent: num(&s["queue"]["pending"]) + num(&s["queue"]["processing"]),
            failed: num(&s["queue"]["failed"]),
            connected: sync["state"] == "connected",
            cursor: num(&sync["cursor"]),
            relay_head: num(&sync["relay_head"]),
            up_to_date: sync["up_to_date"] == true,
            synced_once: !sync["last_sync_ms"].is_null(),
            uploaded: num(&sync["uploaded"]),
            bytes_sent: num(&sync["bytes_sent"]),
            bytes_received: num(&sync["bytes_received"]),
        }
    }

    /// Connected, nothing left to upload, and everything the relay said it has is applied.
    fn caught_up(&self) -> bool {
        assert_eq!(self.failed, 0, "queue entries failed to upload: {self:?}");
        self.connected && self.unsent == 0 && self.up_to_date && self.synced_once
    }
}

/// Waits until both devices hold `documents` records and are caught up with the relay.
fn wait_caught_up(what: &str, devices: [&Running; 2], documents: u64) -> Instant {
    let mut clients = devices.map(Running::client);
    poll_until(what, CONVERGE_TIMEOUT, POLL, || {
        clients.iter_mut().all(|c| {
            let s = Status::of(c);
            s.documents == documents && s.caught_up()
        })
    })
}

/// `n` records imported through `client`, numbered from 0.
fn import(client: &mut Client, n: u64) {
    let mut next = 0;
    while next < n {
        check_interrupted();
        let end = (next + IMPORT_BATCH).min(n);
        let records: Vec<Value> = (next..end).map(import_record).collect();
        let r = call(client, "import", json!({ "records": records }));
        assert_eq!(r["imported"], json!(end - next), "import reply: {r}");
        next = end;
    }
}

/// A notification on a subscribed connection.
enum Event {
    Change(ChangeEvent),
    /// The daemon dropped this many change notifications for a slow reader.
    Lagged(u64),
}

/// A connection subscribed to every change of the benchmark's collection on one device.
struct Subscriber(Client);

impl Subscriber {
    fn new(daemon: &Running, fields: bool) -> Subscriber {
        let mut client = daemon.client();
        call(
            &mut client,
            "subscribe",
            json!({ "collection": COLLECTION, "fields": fields }),
        );
        client
            .set_read_timeout(Some(CONVERGE_TIMEOUT))
            .expect("set read timeout");
        Subscriber(client)
    }

    fn next(&mut self) -> Event {
        let n = self.0.next_event().unwrap_or_else(|e| {
            check_interrupted();
            panic!("no change notification: {e}")
        });
        match n {
            Notification::Change(change) => Event::Change(change.event.change),
            Notification::Lagged { missed, .. } => Event::Lagged(missed),
            other => panic!("unexpected notification: {other:?}"),
        }
    }
}

fn is_remote(change: &ChangeEvent) -> bool {
    change.origin == Origin::Remote
}

/// Peak RSS (VmHWM) of a process, in KiB.
fn peak_kib(pid: u32) -> u64 {
    memory_kib(pid).1
}

// ---------------------------------------------------------------------------------------------
// W1: initial sync.

/// CPU microseconds per record of the relay, A and B, and of the three together.
/// CPU per record of the relays, A and B (and their total), and of the PostgreSQL server
/// when there is one (apart from the total, which stays comparable with sled's).
fn per_record(cpu: [u64; 3], database: Option<u64>, n: u64) -> Value {
    json!({
        "relay": cpu[0] / n,
        "a": cpu[1] / n,
        "b": cpu[2] / n,
        "total": cpu.iter().sum::<u64>() / n,
        "database": database.map(|us| us / n),
    })
}

fn initial_sync(n: u64, o: &Options) -> Value {
    eprintln!("sync_e2e: W1 initial sync, N = {n}");
    let logs = Logs::new(o, &format!("w1-{n}"));
    let (a, b) = (new_device(o), new_device(o));
    let encrypted = encrypt_fields(&[&a, &b], o.encrypt_fields);

    eprintln!("  A imports {n} records offline ...");
    let offline = Running::start_logging(&a, &logs.path("a-offline"));
    let started = Instant::now();
    import(&mut offline.client(), n);
    let import_time = started.elapsed();
    let status = offline.stop();
    assert!(status.success(), "A's offline daemon exit: {status}");

    let relays = Relays::start(o, &logs);
    join_relay(&a, &relays.first);
    join_relay(&b, relays.for_b());
    let b_daemon = Running::start_logging(&b, &logs.path("b"));
    let mut b_client = b_daemon.client();
    poll_until("B to connect to the relay", TIMEOUT, POLL, || {
        Status::of(&mut b_client).caught_up()
    });

    // B's subscriber counts the records as they land; `lagged` counts those whose notification
    // the daemon dropped because this reader fell behind, which still landed.
    let mut subscriber = Subscriber::new(&b_daemon, o.feed_fields);
    // Each process's CPU time over the timed window, read the moment B holds everything: what
    // A does once it is done (compacting its store after the upload) is not the sync's.
    let a_pid = Arc::new(std::sync::OnceLock::new());
    let (relay_pids, b_pid) = (relays.pids(), b_daemon.pid());
    let cpu_before = [cpu_us_of(&relay_pids), cpu_us(b_pid)];
    let database_before = relays.storage.database_cpu_us();
    let database_dir = database_before.map(|_| PgServer::durable().dir().join("data"));
    let counter = std::thread::spawn({
        let a_pid = a_pid.clone();
        move || {
            let (mut changes, mut lagged) = (0, 0);
            while changes + lagged < n {
                match subscriber.next() {
                    Event::Change(c) => changes += u64::from(is_remote(&c)),
                    Event::Lagged(missed) => lagged += missed,
                }
            }
            let landed_at = Instant::now();
            let a_cpu = a_pid.get().copied().map_or(0, cpu_us);
            let cpu = [
                cpu_us_of(&relay_pids).saturating_sub(cpu_before[0]),
                a_cpu,
                cpu_us(b_pid).saturating_sub(cpu_before[1]),
            ];
            let database = database_before
                .zip(database_dir)
                .map(|(before, dir)| (postgres_cpu(&dir) * 10_000).saturating_sub(before));
            (landed_at, changes, lagged, cpu, database)
        }
    });

    eprintln!("  A's daemon starts with the relay configured ...");
    let t0 = Instant::now();
    let a_daemon = Running::start_logging(&a, &logs.path("a"));
    let _ = a_pid.set(a_daemon.pid());
    let mut a_client = a_daemon.client();
    // `sync` answers once A has nothing left to upload, and costs A nothing while it waits
    // (polling `status` would: each call counts A's whole queue).
    let uploaded_at = loop {
        call(&mut a_client, "sync", json!({}));
        let at = Instant::now();
        let s = Status::of(&mut a_client);
        if s.uploaded >= n && s.unsent == 0 {
            break at;
        }
    };
    let (landed_at, changes, lagged, window_cpu, window_database) = counter
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let end_to_end = landed_at - t0;
    let upload = uploaded_at - t0;
    wait_caught_up("A and B to settle", [&a_daemon, &b_daemon], n);
    let (sa, sb) = (Status::of(&mut a_client), Status::of(&mut b_client));
    let peaks = (
        peak_kib(relays.first.pid()),
        peak_kib(a_daemon.pid()),
        peak_kib(b_daemon.pid()),
        relays.second.as_ref().map(|r| peak_kib(r.pid())),
    );
    let cpu = [
        cpu_us_of(&relays.pids()),
        cpu_us(a_daemon.pid()),
        cpu_us(b_daemon.pid()),
    ];
    let database_cpu = relays
        .storage
        .database_cpu_us()
        .zip(relays.storage.database_cpu_at_start)
        .map(|(now, start)| now.saturating_sub(start));

    // C joins once the relay holds everything: its initial sync is downloads alone.
    eprintln!("  C joins and downloads the {n} records ...");
    let c = new_device(o);
    join_relay(&c, &relays.first);
    let c_started = Instant::now();
    let c_daemon = Running::start_logging(&c, &logs.path("c"));
    let mut c_client = c_daemon.client();
    poll_until("C to hold every record", CONVERGE_TIMEOUT, POLL, || {
        let s = Status::of(&mut c_client);
        s.documents == n && s.caught_up()
    });
    let c_download = c_started.elapsed();
    let sc = Status::of(&mut c_client);
    let c_peak = peak_kib(c_daemon.pid());
    drop(c_client);
    let status = c_daemon.stop();
    assert!(status.success(), "C's daemon exit: {status}");
    drop((a_client, b_client));
    let link = relays.first.link.as_ref().map(Link::stats).map(|s| {
        json!({
            "packets_forwarded": s.forwarded,
            "lost": s.lost,
            "overflowed": s.overflowed,
            "blacked_out": s.blacked_out,
            "duplicated": s.duplicated,
            "reordered": s.reordered,
        })
    });
    for (name, daemon) in [("A", a_daemon), ("B", b_daemon)] {
        let status = daemon.stop();
        assert!(status.success(), "{name}'s daemon exit: {status}");
    }
    let database_disk = relays.storage.database_bytes();
    // The second directory only when a second relay ran in it.
    let relay_dirs: Vec<PathBuf> = relays
        .dirs
        .iter()
        .take(relays.pids().len())
        .map(|d| d.path.clone())
        .collect();
    let _dirs = relays.stop();
    let du = |p: &Path| disk_usage(p).0;
    let (a_disk, b_disk, relay_disk) = (
        du(&a.data_dir.join("store")),
        du(&b.data_dir.join("store")),
        relay_dirs.iter().map(|p| du(p)).sum::<u64>() + database_disk.unwrap_or(0),
    );
    // Where each store's bytes go, per record, next to the record's JSON size; a relay on
    // PostgreSQL keeps nothing in its directory to account for.
    let json_bytes = workload::mean_json_bytes(n);
    // Then again with each store rewritten compactly: what the engine's old versions take.
    let relay_dir = relay_dirs.first().filter(|_| database_disk.is_none());
    let mut stores = json!({});
    for (suffix, report) in [
        ("", space as fn(&Path) -> Value),
        ("_compacted", space_compacted),
    ] {
        stores[format!("a{suffix}")] =
            space_per_record(&report(&a.data_dir), "device", n, json_bytes);
        stores[format!("b{suffix}")] =
            space_per_record(&report(&b.data_dir), "device", n, json_bytes);
        stores[format!("relay{suffix}")] = relay_dir.map_or(Value::Null, |dir| {
            space_per_record(&report(dir), "relay", n, json_bytes)
        });
    }
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    json!({
        "workload": "w1",
        "space": stores,
        "records": n,
        "encrypted_fields": encrypted,
        "offline_import": { "seconds": secs(import_time), "records_per_s": per_second(n, import_time) },
        "end_to_end": { "seconds": secs(end_to_end), "records_per_s": per_second(n, end_to_end) },
        "upload": {
            "seconds": secs(upload),
            "records_per_s": per_second(n, upload),
        },
        "c_download": {
            "seconds": secs(c_download),
            "records_per_s": per_second(n, c_download),
            "bytes_received": sc.bytes_received,
            "peak_rss_mib": mib(c_peak),
        },
        "b_change_events": {
            "received": changes,
            "dropped_for_slow_reader": lagged,
            "with_fields": o.feed_fields,
            "records_per_s": per_second(changes, end_to_end),
        },
        "link_stats": link,
        "wire": {
            "a_bytes_sent": sa.bytes_sent,
            "a_bytes_received": sa.bytes_received,
            "b_bytes_sent": sb.bytes_sent,
            "b_bytes_received": sb.bytes_received,
            "a_sent_per_record": sa.bytes_sent / n,
            "b_received_per_record": sb.bytes_received / n,
        },
        "peak_rss_mib": {
            "relay": mib(peaks.0),
            "relay2": peaks.3.map(mib),
            "a": mib(peaks.1),
            "b": mib(peaks.2),
        },
        // Over the timed window: from A's start until B holds every record (the relays' CPU
        // summed; the PostgreSQL server's apart, as `database`).
        "cpu_us_per_record": per_record(window_cpu, window_database, n),
        // From each process's start until A and B settled (the relay's and B's include their
        // idle wait before A starts, a few milliseconds; A's its store's compaction once its
        // upload is done).
        "cpu_us_per_record_until_settled": per_record(cpu, database_cpu, n),
        "disk_bytes_after_clean_stop": {
            "a_store": a_disk,
            "b_store": b_disk,
            // The relays' data directories, and with --postgres their database.
            "relay_dir": relay_disk,
            "a_per_record": a_disk / n,
            "b_per_record": b_disk / n,
            "relay_per_record": relay_disk / n,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// W2: propagation latency.

/// Two devices syncing through a relay (or two: `--relays 2`), caught up on `records` records A
/// imported.
struct Pair {
    relays: Relays,
    a: Running,
    b: Running,
    _devices: (Device, Device),
}

impl Pair {
    /// `strategy`, when given, is the benchmark collection's conflict strategy on both devices.
    fn start(records: u64, strategy: Option<&str>, o: &Options, logs: &Logs) -> Pair {
        let relays = Relays::start(o, logs);
        let (a, b) = (new_device(o), new_device(o));
        join_relay(&a, &relays.first);
        join_relay(&b, relays.for_b());
        for device in [&a, &b] {
            if let Some(strategy) = strategy {
                set_strategy(device, strategy);
            }
        }
        let a_daemon = Running::start_logging(&a, &logs.path("a"));
        let b_daemon = Running::start_logging(&b, &logs.path("b"));
        import(&mut a_daemon.client(), records);
        wait_caught_up("B to receive A's records", [&a_daemon, &b_daemon], records);
        Pair {
            relays,
            a: a_daemon,
            b: b_daemon,
            _devices: (a, b),
        }
    }
}

fn propagation(updates: u64, o: &Options) -> Value {
    eprintln!("sync_e2e: W2 propagation latency, {updates} patches");
    let logs = Logs::new(o, "w2");
    let pair = Pair::start(updates, None, o, &logs);
    let mut subscriber = Subscriber::new(&pair.b, false);
    let mut a = pair.a.client();
    let (mut propagated, mut acknowledged) = (Vec::new(), Vec::new());
    for k in 0..updates {
        check_interrupted();
        let id = record_id(k);
        let params =
            json!({ "collection": COLLECTION, "id": id, "fields": { "s1": format!("w2-{k}") } });
        let t0 = Instant::now();
        let reply = call(&mut a, "patch", params);
        acknowledged.push(t0.elapsed());
        assert!(
            reply["heads"].is_array(),
            "patch reply without heads: {reply}"
        );
        // B's event for this patch leaves the record at A's new heads. Matching on them, not on
        // the id alone, skips any late event for the record's import.
        loop {
            match subscriber.next() {
                Event::Change(c)
                    if is_remote(&c) && c.id == id && json!(c.heads) == reply["heads"] =>
                {
                    break;
                }
                Event::Change(_) => {}
                Event::Lagged(missed) => panic!("B's subscriber missed {missed} changes"),
            }
        }
        propagated.push(t0.elapsed());
    }
    let last = record_id(updates - 1);
    let got = call(
        &mut pair.b.client(),
        "get",
        json!({ "collection": COLLECTION, "id": last }),
    );
    assert_eq!(
        got["fields"]["s1"],
        json!(format!("w2-{}", updates - 1)),
        "B's copy of {last}: {got}"
    );
    json!({
        "workload": "w2",
        "patches": updates,
        "propagation_us": latency(&mut propagated),
        "patch_acknowledged_us": latency(&mut acknowledged),
    })
}

// ---------------------------------------------------------------------------------------------
// W3: concurrent offline edits.

/// The values each side writes in W3: A sets s1, B sets i1.
fn a_edit(k: u64) -> Value {
    json!(format!("w3-a-{k}"))
}

fn b_edit(k: u64) -> Value {
    json!(-(k as i64) - 1)
}

/// B's value when it edits s1 too (the same-field variant).
fn b_same_field_edit(k: u64) -> Value {
    json!(format!("w3-b-{k}"))
}

/// Patches one field of records `0..m` on one device, one call at a time.
fn patch_all(daemon: &Running, m: u64, field: &str, value: fn(u64) -> Value) {
    let mut client = daemon.client();
    for k in 0..m {
        let params =
            json!({ "collection": COLLECTION, "id": record_id(k), "fields": { field: value(k) } });
        call(&mut client, "patch", params);
    }
}

/// What W3's records look like on one device.
#[derive(Debug, PartialEq)]
struct Edits {
    /// Each record's (s1, i1), in id order.
    values: Vec<(Value, Value)>,
    /// Records carrying both sides' edits.
    both: u64,
    /// Records carrying exactly one side's edit.
    one: u64,
}

/// `same_field`: B edited s1 (one side's value wins each record) rather than i1.
fn edits(daemon: &Running, same_field: bool) -> Edits {
    let mut client = daemon.client();
    let mut after = Value::Null;
    let mut out = Edits {
        values: Vec::new(),
        both: 0,
        one: 0,
    };
    loop {
        let mut params = json!({ "collection": COLLECTION, "limit": 1000 });
        if !after.is_null() {
            params["after"] = after.clone();
        }
        let page = call(&mut client, "list", params);
        for r in page["records"].as_array().expect("list.records") {
            // i2 is 7 k and neither side edits it: it says which record this is.
            let k = r["fields"]["i2"].as_u64().expect("i2") / 7;
            let (s1, i1) = (&r["fields"]["s1"], &r["fields"]["i1"]);
            let b = if same_field {
                *s1 == b_same_field_edit(k)
            } else {
                *i1 == b_edit(k)
            };
            let a = *s1 == a_edit(k);
            out.both += u64::from(a && b);
            out.one += u64::from(a != b);
            out.values.push((s1.clone(), i1.clone()));
        }
        after = page["next"].clone();
        if after.is_null() {
            return out;
        }
    }
}

/// Whether both devices show the same records, each as the strategy settles W3's edits: both
/// edits under `merge` and `manual` (they touch different fields), one whole side under `lww`;
/// in the same-field variant one side's value under every strategy.
impl Edits {
    fn both_and_one(&self) -> (u64, u64) {
        (self.both, self.one)
    }
}

fn settled_as(strategy: &str, same_field: bool, m: u64, a: &Edits, b: &Edits) -> bool {
    let each = |e: &Edits| match strategy {
        _ if same_field => e.one == m,
        "lww" => e.one == m,
        _ => e.both == m,
    };
    a.values == b.values && each(a) && each(b)
}

/// The conflicts a device found, from `status.conflicts`: (detected, open).
fn conflicts_found(daemon: &Running) -> (u64, u64) {
    let s = call(&mut daemon.client(), "status", json!({}));
    let detected = s["conflicts"]["counts"]
        .as_array()
        .unwrap_or_else(|| panic!("status without conflicts.counts: {s}"))
        .iter()
        .map(|c| c["detected"].as_u64().unwrap_or(0))
        .sum();
    let open = s["conflicts"]["open"]
        .as_u64()
        .unwrap_or_else(|| panic!("status without conflicts.open: {s}"));
    (detected, open)
}

fn offline_edits(m: u64, strategy: &str, same_field: bool, o: &Options) -> Value {
    let variant = if same_field { ", same field" } else { "" };
    eprintln!("sync_e2e: W3 concurrent offline edits, {m} records, strategy {strategy}{variant}");
    let logs = Logs::new(
        o,
        &format!("w3-{strategy}{}", if same_field { "-same" } else { "" }),
    );
    let Pair {
        relays,
        a,
        b,
        _devices,
    } = Pair::start(m, Some(strategy), o, &logs);
    let Relays {
        first: mut relay,
        dirs: [relay_dir, _],
        storage,
        ..
    } = relays;
    let listen = relay.listen.clone();
    // The link stays up while the relay is down, as a device's network does.
    let link = relay.link.take();
    relay.stop();
    let mut clients = [&a, &b].map(Running::client);
    poll_until("A and B to notice the relay left", TIMEOUT, POLL, || {
        clients.iter_mut().all(|c| !Status::of(c).connected)
    });

    let (b_field, b_value): (&str, fn(u64) -> Value) = if same_field {
        ("s1", b_same_field_edit)
    } else {
        ("i1", b_edit)
    };
    eprintln!("  A edits s1 and B edits {b_field} of every record, offline ...");
    let started = Instant::now();
    std::thread::scope(|s| {
        let edits = [
            s.spawn(|| patch_all(&a, m, "s1", a_edit)),
            s.spawn(|| patch_all(&b, m, b_field, b_value)),
        ];
        for e in edits {
            e.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
    });
    let edit_time = started.elapsed();
    for c in &mut clients {
        let s = Status::of(c);
        assert_eq!(s.unsent, m, "edits waiting for the relay: {s:?}");
    }

    eprintln!("  the relay restarts on {listen} ...");
    let t0 = Instant::now();
    let mut relay = Relay::start(
        &relay_dir.path,
        &listen,
        o,
        &storage,
        &logs.path("relay-restarted"),
    );
    relay.link = link;
    let ready = t0.elapsed();
    // Ask both to sync now, as an app does when it knows the relay is back: otherwise each
    // waits out its reconnect backoff (up to sync.backoff_max_ms) and that is what would be
    // measured.
    let converged = std::thread::scope(|s| {
        let nudges = clients.each_mut().map(|c| {
            s.spawn(move || {
                call(c, "sync", json!({}));
            })
        });
        // Converged: nothing left to upload anywhere, both have applied the relay's log as far
        // as they know its head to be, and (checked only then, as it reads every record) both
        // show the same records, settled as the strategy settles them. A head that is not yet known would otherwise let
        // the status alone say so too early.
        let mut clients = [&a, &b].map(Running::client);
        let deadline = Instant::now() + W3_TIMEOUT;
        let mut reconnected = None;
        loop {
            check_interrupted();
            let [sa, sb] = clients.each_mut().map(Status::of);
            if sa.connected && sb.connected {
                reconnected.get_or_insert_with(Instant::now);
            }
            let settled = sa.caught_up()
                && sb.caught_up()
                && sa.cursor == sb.cursor
                && sa.relay_head == sb.relay_head
                && sa.cursor == sa.relay_head;
            // The time is when the status said so; reading every record only confirms it.
            let at = Instant::now();
            if settled
                && settled_as(
                    strategy,
                    same_field,
                    m,
                    &edits(&a, same_field),
                    &edits(&b, same_field),
                )
            {
                let converged = at;
                for n in nudges {
                    n.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                }
                break (reconnected.unwrap_or(converged), converged);
            }
            assert!(
                Instant::now() < deadline,
                "A and B have not converged under {strategy} after {W3_TIMEOUT:?}: records with \
                 both edits / one edit: A {:?}, B {:?} of {m}; A {sa:?}; B {sb:?}",
                edits(&a, same_field).both_and_one(),
                edits(&b, same_field).both_and_one(),
            );
            std::thread::sleep(POLL);
        }
    });
    let (reconnected, converged) = converged;
    let converge = converged - t0;
    let (ea, eb) = (edits(&a, same_field), edits(&b, same_field));
    assert!(
        settled_as(strategy, same_field, m, &ea, &eb),
        "records with both edits / one edit under {strategy}: A {:?}, B {:?} of {m}",
        ea.both_and_one(),
        eb.both_and_one(),
    );
    let (found_a, found_b) = (conflicts_found(&a), conflicts_found(&b));
    drop(clients);
    drop((a, b));
    relay.stop();
    json!({
        "workload": "w3",
        "strategy": strategy,
        "same_field": same_field,
        "records": m,
        "offline_edits": { "seconds": secs(edit_time), "patches": 2 * m },
        "relay_ready_seconds": secs(ready),
        "both_connected_seconds": secs(reconnected - t0),
        "converge": { "seconds": secs(converge), "changes_per_s": per_second(2 * m, converge) },
        "records_with_both_edits": { "a": ea.both, "b": eb.both },
        "records_with_one_edit": { "a": ea.one, "b": eb.one },
        "conflicts": {
            "a": { "detected": found_a.0, "open": found_a.1 },
            "b": { "detected": found_b.0, "open": found_b.1 },
        },
    })
}

// ---------------------------------------------------------------------------------------------
// The summary.

/// ", over the PROFILE link, CONGESTION", or nothing on loopback.
fn on_link(r: &Value) -> String {
    match r["link"]["profile"].as_str() {
        Some(profile) => format!(
            ", {profile} link, {}",
            r["congestion"].as_str().unwrap_or("?")
        ),
        None => String::new(),
    }
}

/// The emulated link's round trip (seconds) and bottleneck (bits per second) of a result.
fn link_of(r: &Value) -> Option<(f64, f64)> {
    let link = &r["link"];
    Some((
        link["rtt_ms"].as_f64()? / 1000.0,
        link["bottleneck_bps"].as_f64()?,
    ))
}

/// The human-readable summary of one result, on standard error, with the targets' verdicts.
fn summarize(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let ms = |v: &Value| f(v) / 1000.0;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let text = match r["workload"].as_str() {
        Some("w1") => {
            let n = f(&r["records"]);
            let rate = f(&r["end_to_end"]["records_per_s"]);
            let relay_mb = f(&r["peak_rss_mib"]["relay"]) * 1.048_576;
            let mut t = format!(
                "== W1 initial sync, {n} records ({} build{}) ==\n\
                 end to end (A's daemon start to B holding all): {rate} records/s ({} s)\n\
                 A's upload done after: {} s ({} records/s)\n\
                 on the wire: A sent {} B/record, B received {} B/record\n\
                 peak RSS MiB: relay {}, A {}, B {}\n\
                 CPU per record, us: relay {}, A {}, B {} (total {}){}\n\
                 on disk after a clean stop, bytes/record: A {}, B {}, relay {}",
                r["build"].as_str().unwrap_or("?"),
                on_link(r),
                r["end_to_end"]["seconds"],
                r["upload"]["seconds"],
                r["upload"]["records_per_s"],
                r["wire"]["a_sent_per_record"],
                r["wire"]["b_received_per_record"],
                r["peak_rss_mib"]["relay"],
                r["peak_rss_mib"]["a"],
                r["peak_rss_mib"]["b"],
                r["cpu_us_per_record"]["relay"],
                r["cpu_us_per_record"]["a"],
                r["cpu_us_per_record"]["b"],
                r["cpu_us_per_record"]["total"],
                match &r["cpu_us_per_record"]["database"] {
                    Value::Null => String::new(),
                    database => format!(", PostgreSQL server {database}"),
                },
                r["disk_bytes_after_clean_stop"]["a_per_record"],
                r["disk_bytes_after_clean_stop"]["b_per_record"],
                r["disk_bytes_after_clean_stop"]["relay_per_record"],
            );
            t += &format!(
                "\nB's change feed{}: {} notifications ({} records/s), {} dropped for a slow reader",
                if r["b_change_events"]["with_fields"] == json!(true) {
                    " with fields"
                } else {
                    ""
                },
                r["b_change_events"]["received"],
                r["b_change_events"]["records_per_s"],
                r["b_change_events"]["dropped_for_slow_reader"],
            );
            t += &format!(
                "\nC's initial sync by download alone: {} s ({} records/s, {} B received, peak RSS {} MiB)",
                r["c_download"]["seconds"],
                r["c_download"]["records_per_s"],
                r["c_download"]["bytes_received"],
                r["c_download"]["peak_rss_mib"],
            );
            if let Some((rtt, bps)) = link_of(r) {
                // The link's floor: the bytes over the bottleneck, plus ten round trips.
                let floor = |bytes: f64| bytes * 8.0 / bps + 10.0 * rtt;
                let wire = f(&r["wire"]["a_bytes_sent"]).max(f(&r["wire"]["b_bytes_received"]));
                let (e2e, c) = (
                    f(&r["end_to_end"]["seconds"]),
                    f(&r["c_download"]["seconds"]),
                );
                let (e2e_floor, c_floor) =
                    (floor(wire), floor(f(&r["c_download"]["bytes_received"])));
                t += &format!(
                    "\nagainst the link (bytes / bandwidth + 10 RTT): end to end {e2e:.1} s = {:.2} x \
                     {e2e_floor:.1} s; C's download {c:.1} s = {:.2} x {c_floor:.1} s; \
                     target <= 1.5 x: {}",
                    e2e / e2e_floor,
                    c / c_floor,
                    verdict(e2e <= 1.5 * e2e_floor && c <= 1.5 * c_floor),
                );
            }
            if n >= 100_000.0 && link_of(r).is_none() {
                t += &format!(
                    "\ntargets: >= 20,000 records/s: {}; relay RSS < 300 MB: {} ({relay_mb:.1} MB)",
                    verdict(rate >= 20_000.0),
                    verdict(relay_mb < 300.0)
                );
            }
            t += &format!(
                "\nA's offline import: {} records/s ({} s)",
                r["offline_import"]["records_per_s"], r["offline_import"]["seconds"],
            );
            for (key, label) in [
                ("a", "A"),
                ("b", "B"),
                ("relay", "relay"),
                ("a_compacted", "A compacted"),
                ("b_compacted", "B compacted"),
                ("relay_compacted", "relay compacted"),
            ] {
                if r["space"][key].is_object() {
                    for line in space_lines(label, &r["space"][key]) {
                        t += &format!("\n{line}");
                    }
                }
            }
            t
        }
        Some("w2") => {
            let p = &r["propagation_us"];
            let a = &r["patch_acknowledged_us"];
            let target = match link_of(r) {
                Some((rtt, _)) => format!(
                    "target: p50 < RTT + 10 ms ({:.0} ms): {}",
                    rtt * 1000.0 + 10.0,
                    verdict(ms(&p["p50"]) < rtt * 1000.0 + 10.0)
                ),
                None => format!("target: p99 < 10 ms: {}", verdict(ms(&p["p99"]) < 10.0)),
            };
            format!(
                "== W2 propagation, {} patches ({} build{}) ==\n\
                 A's patch to B's remote change event: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n\
                 A's patch acknowledged (durable on A): p50 {:.2} ms, p99 {:.2} ms\n\
                 {target}",
                r["patches"],
                r["build"].as_str().unwrap_or("?"),
                on_link(r),
                ms(&p["p50"]),
                ms(&p["p99"]),
                ms(&p["max"]),
                ms(&a["p50"]),
                ms(&a["p99"]),
            )
        }
        Some("w3") => format!(
            "== W3 concurrent offline edits, {} records, strategy {}{} ({} build{}) ==\n\
             edits while offline: {} patches in {} s\n\
             relay restart to ready: {} s; to both reconnected: {} s; to both converged: {} s \
             ({} changes/s)\n\
             records with both edits: A {}, B {}; with one edit: A {}, B {}\n\
             conflicts found: A {} ({} open), B {} ({} open)",
            r["records"],
            r["strategy"].as_str().unwrap_or("?"),
            if r["same_field"] == true {
                ", both on one field"
            } else {
                ""
            },
            r["build"].as_str().unwrap_or("?"),
            on_link(r),
            r["offline_edits"]["patches"],
            r["offline_edits"]["seconds"],
            r["relay_ready_seconds"],
            r["both_connected_seconds"],
            r["converge"]["seconds"],
            r["converge"]["changes_per_s"],
            r["records_with_both_edits"]["a"],
            r["records_with_both_edits"]["b"],
            r["records_with_one_edit"]["a"],
            r["records_with_one_edit"]["b"],
            r["conflicts"]["a"]["detected"],
            r["conflicts"]["a"]["open"],
            r["conflicts"]["b"]["detected"],
            r["conflicts"]["b"]["open"],
        ),
        _ => format!("{r}"),
    };
    eprintln!("\n{text}");
}
