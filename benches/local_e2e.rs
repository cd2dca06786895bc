//! End-to-end local benchmark: real `ferry daemon` processes on real sled stores in temp dirs,
//! driven through the Unix socket exactly as apps drive them.
//!
//! For each record count N it measures: `import` through the socket (the JSON-RPC method, and
//! the `ferry import FILE` command with and without a daemon), single durable `put`s on one
//! connection and on several at once (group commit), random `get`s beside a round trip to an
//! echo thread (what the socket alone costs on the host), paging with `list`, the
//! store's size on disk per record, and the daemon's resident memory.
//!
//! `cargo bench --bench local_e2e [-- --records 10000 --records 100000 --batch 2000 ...]`
//! prints one JSON object per N on standard output and a summary on standard error; see
//! benches/README.md. Without `--bench` (as `cargo test --all-targets` runs it) it does a quick
//! smoke run of every phase on a few hundred records.
//!
//! Daemons never outlive the benchmark: each one is a guard that kills it when dropped (also
//! while a panic unwinds), and SIGINT/SIGTERM/SIGHUP stop every running daemon before the
//! benchmark itself stops.

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

use common::Device;
use ferry::ipc::Client;
use ferry::service::api::ListParams;
use harness::{
    Running, call, check_interrupted, disk_usage, install_signal_handlers, latency, memory_kib,
    per_second, request, secs, space, space_compacted, space_lines, space_per_record,
};
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;
use workload::{COLLECTION, Rng, import_record, mean_json_bytes, record_fields, record_id};

const USAGE: &str = "\
usage: cargo bench --bench local_e2e -- [OPTIONS]

  --records N       records per run; repeat for several runs (default: 10000 and 100000)
  --batch N         records per `import` call, and `ferry import --batch` (default 2000)
  --singles N       single `put` calls, on one connection and again spread over the
                    concurrent connections (default: min(N, 10000))
  --connections N   concurrent connections for the group-commit run (default 4)
  --in-flight N     puts each connection keeps unanswered in the pipelined runs (default 64)
  --reads N         random `get` calls (default 10000)
  --page N          records per `list` page (default 100)
  --queries N       `list` queries of each kind (0: none): 100 records with one field equal to a value
                    about 1 in 500 records hold, and the same ordered by another field
                    (default 20)
  --seed N          seed of the random reads (default: FERRY_BENCH_SEED, else from the clock)
  --skip-cli        skip the two `ferry import FILE` runs
  --skip-reads      skip the random `get`s, the `list` of every record and the queries
  --skip-puts       skip the four runs of single `put`s (the store then holds the N records
                    alone)
  --config FILE     use FILE as every device's config.toml (default: `ferry init`'s)";

struct Options {
    records: Vec<u64>,
    batch: u64,
    singles: Option<u64>,
    connections: u64,
    in_flight: u64,
    reads: u64,
    page: u64,
    queries: u64,
    seed: u64,
    skip_cli: bool,
    skip_reads: bool,
    skip_puts: bool,
    config: Option<std::path::PathBuf>,
    smoke: bool,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `cargo bench` passes `--bench`; without it this is a test run: a quick smoke pass.
        let smoke = !args.iter().any(|a| a == "--bench");
        let seed = match std::env::var("FERRY_BENCH_SEED") {
            Ok(s) => s
                .parse()
                .map_err(|_| format!("FERRY_BENCH_SEED={s:?} is not a number"))?,
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        };
        let mut o = Options {
            records: Vec::new(),
            batch: 2000,
            singles: None,
            connections: 4,
            in_flight: 64,
            reads: 10_000,
            page: 100,
            queries: 20,
            seed,
            skip_cli: false,
            skip_reads: false,
            skip_puts: false,
            config: None,
            smoke,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| -> Result<u64, String> {
                let v = it.next().ok_or(format!("{name} needs a value"))?;
                v.parse()
                    .map_err(|_| format!("{name} {v:?}: expected a whole number"))
            };
            match arg.as_str() {
                "--bench" => {}
                "--records" => o.records.push(value(arg)?),
                "--batch" => o.batch = value(arg)?,
                "--singles" => o.singles = Some(value(arg)?),
                "--connections" => o.connections = value(arg)?,
                "--in-flight" => o.in_flight = value(arg)?,
                "--reads" => o.reads = value(arg)?,
                "--page" => o.page = value(arg)?,
                "--queries" => o.queries = value(arg)?,
                "--seed" => o.seed = value(arg)?,
                "--skip-cli" => o.skip_cli = true,
                "--skip-reads" => o.skip_reads = true,
                "--skip-puts" => o.skip_puts = true,
                "--config" => {
                    let file = it.next().ok_or("--config needs a file")?;
                    let text = std::fs::read_to_string(file)
                        .map_err(|e| format!("--config {file}: {e}"))?;
                    ferry::config::Config::parse(&text, std::path::Path::new(file))
                        .map_err(|e| format!("--config {file}: {e}"))?;
                    o.config = Some(file.into());
                }
                "--help" | "-h" => return Err(String::new()),
                // A test run may get the test harness's own arguments: not ours to refuse.
                _ if smoke => eprintln!("local_e2e: ignoring argument {arg:?} in a test run"),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if o.smoke {
            o.records = vec![300];
            o.batch = o.batch.min(100);
            o.singles = Some(o.singles.unwrap_or(40).min(40));
            o.reads = o.reads.min(100);
            o.page = o.page.min(50);
            o.queries = o.queries.min(3);
        } else if o.records.is_empty() {
            o.records = vec![10_000, 100_000];
        }
        // ipc.max_import_records and ipc.max_list_limit, at their defaults.
        if !(1..=10_000).contains(&o.batch) {
            return Err("--batch must be 1 to 10000 (the daemon's max_import_records)".into());
        }
        if !(1..=1000).contains(&o.page) {
            return Err("--page must be 1 to 1000 (the daemon's max_list_limit)".into());
        }
        if o.connections == 0
            || o.in_flight == 0
            || o.records.contains(&0)
            || o.reads == 0
            || o.singles == Some(0)
        {
            return Err(
                "--records, --singles, --connections, --in-flight and --reads must be at least 1"
                    .into(),
            );
        }
        Ok(o)
    }
}

fn main() {
    let options = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("local_e2e: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    install_signal_handlers();
    eprintln!(
        "local_e2e: {} build, ferry binary {}, seed {} (replay with FERRY_BENCH_SEED={})",
        if cfg!(debug_assertions) {
            "DEBUG (numbers are not meaningful)"
        } else {
            "release"
        },
        common::ferry_bin(),
        options.seed,
        options.seed
    );
    for &n in &options.records {
        let result = run(n, &options);
        println!("{result}");
        summarize(&result);
    }
}

fn documents(client: &mut Client) -> (u64, u64) {
    let status = call(client, "status", json!({}));
    (
        status["documents"].as_u64().expect("status.documents"),
        status["store_bytes"].as_u64().expect("status.store_bytes"),
    )
}

// ---------------------------------------------------------------------------------------------
// The phases.

/// `import` calls of `batch` records each over one connection.
fn import_rpc(client: &mut Client, n: u64, batch: u64) -> Value {
    let mut batches = Vec::new();
    let started = Instant::now();
    let mut next = 0;
    while next < n {
        check_interrupted();
        let end = (next + batch).min(n);
        let records: Vec<Value> = (next..end).map(import_record).collect();
        let t = Instant::now();
        let r = call(client, "import", json!({ "records": records }));
        batches.push(t.elapsed());
        assert_eq!(r["imported"], json!(end - next), "import reply: {r}");
        next = end;
    }
    let elapsed = started.elapsed();
    json!({
        "records": n,
        "batch": batch,
        "seconds": secs(elapsed),
        "records_per_s": per_second(n, elapsed),
        "batch_latency_us": latency(&mut batches),
    })
}

/// Runs `work` on `connections` workers at once, each on its own connection (made by
/// `connect`) and its share of the `count` records numbered from `first`: the latency samples
/// they return and the time from their common start.
fn timed_workers<C: Send>(
    first: u64,
    count: u64,
    connections: u64,
    connect: impl Fn() -> C,
    work: impl Fn(C, std::ops::Range<u64>) -> Vec<std::time::Duration> + Sync,
) -> (Vec<std::time::Duration>, std::time::Duration) {
    check_interrupted();
    let per = count.div_ceil(connections);
    // Connected before any worker starts: a worker must never wait at the barrier for one
    // that will not come.
    let clients: Vec<C> = (0..connections).map(|_| connect()).collect();
    let barrier = std::sync::Barrier::new(connections as usize + 1);
    let (samples, elapsed) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..connections)
            .zip(clients)
            .map(|(c, client)| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    let to = (first + (c + 1) * per).min(first + count);
                    let from = (first + c * per).min(to);
                    barrier.wait();
                    work(client, from..to)
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let mut samples = Vec::new();
        for w in workers {
            samples.extend(w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        (samples, started.elapsed())
    });
    assert_eq!(samples.len() as u64, count, "every put was answered");
    (samples, elapsed)
}

/// `count` single `put`s of new records numbered from `first`, one at a time on each of
/// `connections` connections at once; each returns only once its write is durable.
fn single_writes(daemon: &Running, first: u64, count: u64, connections: u64) -> Value {
    let (mut samples, elapsed) = timed_workers(
        first,
        count,
        connections,
        || daemon.client(),
        |mut client, records| {
            records
                .map(|i| {
                    let params = json!({
                        "collection": COLLECTION, "id": record_id(i), "fields": record_fields(i)
                    });
                    let t = Instant::now();
                    call(&mut client, "put", params);
                    t.elapsed()
                })
                .collect()
        },
    );
    json!({
        "writes": count,
        "connections": connections,
        "seconds": secs(elapsed),
        "writes_per_s": per_second(count, elapsed),
        "latency_us": latency(&mut samples),
    })
}

/// `count` single `put`s of new records numbered from `first`, spread over `connections`
/// connections at once, each keeping `in_flight` of them sent and not yet answered (JSON-RPC
/// over the raw socket: the answers come by id, each once its write is durable).
fn pipelined_writes(
    daemon: &Running,
    first: u64,
    count: u64,
    connections: u64,
    in_flight: u64,
) -> Value {
    use std::io::BufRead as _;
    let (mut samples, elapsed) = timed_workers(
        first,
        count,
        connections,
        || std::os::unix::net::UnixStream::connect(daemon.socket()).expect("connect"),
        |stream, records| {
            let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone the stream"));
            let mut writer = std::io::BufWriter::new(stream);
            let mut sent_at = std::collections::HashMap::new();
            let total = (records.end - records.start) as usize;
            let mut samples = Vec::with_capacity(total);
            let mut line = String::new();
            let mut next = records.start;
            while samples.len() < total {
                while next < records.end && sent_at.len() < in_flight as usize {
                    let request = json!({
                        "jsonrpc": "2.0", "id": next, "method": "put",
                        "params": {
                            "collection": COLLECTION, "id": record_id(next),
                            "fields": record_fields(next)
                        }
                    });
                    writeln!(writer, "{request}").expect("send a put");
                    sent_at.insert(next, Instant::now());
                    next += 1;
                }
                writer.flush().expect("send the puts");
                line.clear();
                reader.read_line(&mut line).expect("read an answer");
                let reply: Value = serde_json::from_str(&line).expect("a JSON answer");
                assert!(reply.get("result").is_some(), "put refused: {reply}");
                let id = reply["id"].as_u64().expect("the answer's id");
                let t = sent_at.remove(&id).expect("an answer to a put in flight");
                samples.push(t.elapsed());
            }
            samples
        },
    );
    json!({
        "writes": count,
        "connections": connections,
        "in_flight": in_flight,
        "seconds": secs(elapsed),
        "writes_per_s": per_second(count, elapsed),
        "latency_us": latency(&mut samples),
    })
}

/// `reads` `get`s of random records among the first `n` (all of which exist).
fn random_gets(client: &mut Client, n: u64, reads: u64, seed: u64) -> Value {
    check_interrupted();
    let mut rng = Rng::new(seed);
    let mut samples = Vec::with_capacity(reads as usize);
    let started = Instant::now();
    for _ in 0..reads {
        let k = rng.below(n);
        let id = record_id(k);
        let t = Instant::now();
        let r = call(client, "get", json!({ "collection": COLLECTION, "id": id }));
        samples.push(t.elapsed());
        assert_eq!(r["fields"]["i1"], json!(k), "get {id} returned {r}");
    }
    let elapsed = started.elapsed();
    json!({
        "gets": reads,
        "seconds": secs(elapsed),
        "gets_per_s": per_second(reads, elapsed),
        "latency_us": latency(&mut samples),
    })
}

/// What a round trip over a Unix socket costs on this host without the daemon: `calls` calls
/// of the same client to a thread that reads each line, parses it for its id and answers an
/// empty result. `get` can only be this much faster than it; the rest of its latency is the
/// daemon's (this floor moves with the host far more than the daemon's share does).
fn socket_floor(dir: &Path, calls: u64) -> Value {
    use std::io::BufRead as _;
    check_interrupted();
    let path = dir.join("floor.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let echo = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 {
            let request: Value = serde_json::from_str(&line).unwrap();
            let reply = json!({ "jsonrpc": "2.0", "id": request["id"], "result": {} });
            writer.write_all(format!("{reply}\n").as_bytes()).unwrap();
            line.clear();
        }
    });
    let mut client = Client::connect(&path).unwrap();
    let mut samples = Vec::with_capacity(calls as usize);
    let started = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        call(&mut client, "echo", json!({}));
        samples.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    drop(client);
    echo.join().unwrap();
    json!({
        "calls": calls,
        "calls_per_s": per_second(calls, elapsed),
        "latency_us": latency(&mut samples),
    })
}

/// The whole collection, page after page of `list`.
fn list_all(client: &mut Client, expected: u64, page: u64) -> Value {
    check_interrupted();
    let mut samples = Vec::new();
    let mut after = None;
    let mut seen = 0;
    let started = Instant::now();
    loop {
        let params = ListParams::page(COLLECTION.to_owned(), Some(page as usize), after);
        let t = Instant::now();
        let r = request(client, params);
        samples.push(t.elapsed());
        seen += r.records.len() as u64;
        after = r.next;
        if after.is_none() {
            break;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(seen, expected, "list returned every record once");
    json!({
        "page": page,
        "pages": samples.len(),
        "records": seen,
        "seconds": secs(elapsed),
        "records_per_s": per_second(seen, elapsed),
        "page_latency_us": latency(&mut samples),
    })
}

/// `queries` queries through `list`, each for 100 records whose `i4` (one of 500 values) is a
/// random one, unordered (the scan stops at the page) and ordered by `i3` (the scan reads the
/// whole collection); the latency of each kind and how the daemon answered (`plan`).
fn queries(client: &mut Client, queries: u64, seed: u64) -> Value {
    check_interrupted();
    let mut rng = Rng::new(seed ^ 0x0051_5545_5259);
    let mut kind = |order_by: Option<&str>| {
        let mut samples = Vec::with_capacity(queries as usize);
        let (mut plan, mut found) = (Value::Null, 0u64);
        for _ in 0..queries {
            let value = -(rng.below(500) as i64);
            let mut params = json!({
                "collection": COLLECTION,
                "limit": 100,
                "where": [{ "field": "i4", "op": "=", "value": value }],
            });
            if let Some(field) = order_by {
                params["order_by"] = json!(field);
            }
            let t = Instant::now();
            let r = call(client, "list", params);
            samples.push(t.elapsed());
            let records = r["records"].as_array().expect("list.records");
            assert!(
                records
                    .iter()
                    .all(|rec| rec["fields"]["i4"] == json!(value)),
                "a query's answer holds a record that does not meet it"
            );
            found += records.len() as u64;
            plan = r["plan"].clone();
        }
        json!({
            "queries": queries,
            "plan": plan,
            "records_per_query": found / queries.max(1),
            "latency_us": latency(&mut samples),
        })
    };
    let unordered = kind(None);
    let ordered = kind(Some("i3"));
    json!({ "equality": unordered, "equality_ordered": ordered })
}

/// `ferry --json import FILE --batch B` on a fresh device, with a daemon (through its socket)
/// or without (the command opens the store itself).
fn import_cli(file: &Path, n: u64, o: &Options, with_daemon: bool) -> Value {
    let batch = o.batch;
    let device = new_device(o);
    let daemon = with_daemon.then(|| Running::start(&device));
    check_interrupted();
    let batch_arg = batch.to_string();
    let file_arg = file.to_str().expect("UTF-8 temp path");
    let started = Instant::now();
    let out = device.ferry(&["--json", "import", file_arg, "--batch", &batch_arg]);
    let elapsed = started.elapsed();
    check_interrupted();
    assert!(
        out.status.success(),
        "ferry import failed: {}",
        common::stderr(&out)
    );
    let reply: Value = serde_json::from_str(&common::stdout(&out)).expect("import --json output");
    assert_eq!(reply["imported"], json!(n), "ferry import: {reply}");
    let mut result = json!({
        "records": n,
        "batch": batch,
        "daemon": with_daemon,
        "seconds": secs(elapsed),
        "records_per_s": per_second(n, elapsed),
        "command_reported_seconds": reply["seconds"],
    });
    if let Some(daemon) = daemon {
        let (rss, hwm) = memory_kib(daemon.pid());
        result["daemon_rss_kib"] = json!({ "current": rss, "peak": hwm });
        let mut client = daemon.client();
        assert_eq!(documents(&mut client).0, n, "documents after ferry import");
        drop(client);
        let status = daemon.stop();
        assert!(status.success(), "daemon exit: {status}");
    }
    result
}

/// `ferry export Customer --format jsonl --out FILE` on `device` (through the socket when its
/// daemon runs, else on the store itself): the rate, and the bytes of a record as written.
fn export(device: &Device, expected: u64, daemon: bool) -> Value {
    check_interrupted();
    let tmp = tempfile::tempdir().expect("temp dir");
    let file = tmp.path().join("export.jsonl");
    let file_arg = file.to_str().expect("UTF-8 temp path");
    let started = Instant::now();
    let out = device.ferry(&["export", COLLECTION, "--format", "jsonl", "--out", file_arg]);
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "ferry export failed: {}",
        common::stderr(&out)
    );
    let bytes = std::fs::metadata(&file).expect("the export's file").len();
    let lines = {
        use std::io::BufRead as _;
        let reader = std::io::BufReader::new(std::fs::File::open(&file).expect("open export"));
        let mut lines = 0u64;
        for line in reader.lines() {
            let line = line.expect("read the export");
            assert!(line.starts_with("{\"collection\":"), "export line {line}");
            lines += 1;
        }
        lines
    };
    assert_eq!(lines, expected, "ferry export wrote every record once");
    json!({
        "records": lines,
        "daemon": daemon,
        "seconds": secs(elapsed),
        "records_per_s": per_second(lines, elapsed),
        "bytes": bytes,
        // A line's bytes but its newline: the record's JSON size.
        "json_bytes_per_record": (bytes - lines) as f64 / lines.max(1) as f64,
    })
}

/// A fresh device, with the `--config` file when one was given.
fn new_device(o: &Options) -> Device {
    let device = Device::new();
    if let Some(config) = &o.config {
        std::fs::copy(config, device.data_dir.join("config.toml")).expect("copy --config");
    }
    device
}

/// Every phase for `n` records.
fn run(n: u64, o: &Options) -> Value {
    eprintln!("local_e2e: N = {n}");
    let singles = if o.skip_puts {
        0
    } else {
        o.singles.unwrap_or(n.min(10_000))
    };
    let device = new_device(o);
    let daemon = Running::start(&device);
    let pid = daemon.pid();
    // (phase, VmRSS, VmHWM) of the daemon after each phase.
    let mut memory = Vec::new();
    let mut snapshot = |phase: &str| {
        let (rss, peak) = memory_kib(pid);
        memory.push(json!({ "after": phase, "rss": rss, "peak": peak }));
    };
    snapshot("start");
    let mut client = daemon.client();

    eprintln!("  import through the socket ...");
    let import = import_rpc(&mut client, n, o.batch);
    snapshot("import");
    let (docs, status_bytes) = documents(&mut client);
    assert_eq!(docs, n, "documents after import");

    let mut result = json!({
        "records": n,
        "seed": o.seed,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "cpus": std::thread::available_parallelism().map_or(0, |p| p.get()),
        "import_rpc": import,
    });
    if !o.skip_reads {
        eprintln!("  random gets and list pages ...");
        result["random_get"] = random_gets(&mut client, n, o.reads, o.seed);
        result["socket_floor"] = socket_floor(device.data_dir.parent().unwrap(), o.reads);
        snapshot("get");
        result["list"] = list_all(&mut client, n, o.page);
        snapshot("list");
        if o.queries > 0 {
            eprintln!("  queries ...");
            result["query"] = queries(&mut client, o.queries, o.seed);
            snapshot("query");
        }
    }

    if !o.skip_puts {
        eprintln!("  single writes ...");
        result["put_1_connection"] = single_writes(&daemon, n, singles, 1);
        snapshot("put_1_connection");
        result["put_concurrent"] = single_writes(&daemon, n + singles, singles, o.connections);
        snapshot("put_concurrent");
        eprintln!("  pipelined writes ...");
        result["put_pipelined_1_connection"] =
            pipelined_writes(&daemon, n + 2 * singles, singles, 1, o.in_flight);
        snapshot("put_pipelined_1_connection");
        result["put_pipelined_concurrent"] = pipelined_writes(
            &daemon,
            n + 3 * singles,
            singles,
            o.connections,
            o.in_flight,
        );
        snapshot("put_pipelined_concurrent");
    }
    let total = n + 4 * singles;
    let (docs_end, status_bytes_end) = documents(&mut client);
    assert_eq!(docs_end, total, "documents after the single writes");
    eprintln!("  ferry export ...");
    result["export_daemon"] = export(&device, total, true);
    snapshot("export");
    drop(client);
    let status = daemon.stop();
    assert!(status.success(), "daemon exit: {status}");
    let store = device.data_dir.join("store");
    let (du_bytes, apparent_bytes) = disk_usage(&store);
    // The record's JSON size: what the workload's records weigh as export writes them (the
    // export's own lines are checked to match).
    let json_bytes = mean_json_bytes(total);
    let exported = result["export_daemon"]["json_bytes_per_record"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        (exported - json_bytes).abs() < 0.01,
        "export wrote {exported} bytes a record, the workload's JSON is {json_bytes}"
    );
    let report = space(&device.data_dir);
    result["space"] = space_per_record(&report, "device", total, json_bytes);
    result["space_report"] = report;
    result["space_compacted"] = space_per_record(
        &space_compacted(&device.data_dir),
        "device",
        total,
        json_bytes,
    );
    eprintln!("  ferry export, no daemon ...");
    result["export_direct"] = export(&device, total, false);

    result["store"] = json!({
        "status_store_bytes_after_import": status_bytes,
        "status_bytes_per_record_after_import": status_bytes / n,
        "documents_at_stop": total,
        "status_store_bytes_at_stop": status_bytes_end,
        "du_bytes_after_clean_stop": du_bytes,
        "apparent_bytes_after_clean_stop": apparent_bytes,
        "du_bytes_per_record": du_bytes / total,
    });
    result["daemon_rss_kib"] = json!(memory);
    drop(device);

    if !o.skip_cli {
        eprintln!("  ferry import FILE ...");
        let tmp = tempfile::tempdir().expect("temp dir");
        let file = tmp.path().join("records.jsonl");
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file).expect("create jsonl"));
        for k in 0..n {
            writeln!(w, "{}", import_record(k)).expect("write jsonl");
        }
        w.flush().expect("flush jsonl");
        drop(w);
        result["import_cli_daemon"] = import_cli(&file, n, o, true);
        result["import_cli_direct"] = import_cli(&file, n, o, false);
    }
    result
}

/// The human-readable summary of one run, on standard error.
fn summarize(r: &Value) {
    let n = r["records"].as_u64().unwrap_or(0);
    let mib = |kib: &Value| kib.as_f64().unwrap_or(0.0) / 1024.0;
    let time = |us: &Value| {
        let us = us.as_f64().unwrap_or(0.0);
        if us >= 1000.0 {
            format!("{:.2} ms", us / 1000.0)
        } else {
            format!("{us:.0} us")
        }
    };
    let lat = |v: &Value| format!("p50 {}, p99 {}", time(&v["p50"]), time(&v["p99"]));
    let seconds = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut lines = vec![format!(
        "\n== local_e2e, {n} records ({} build) ==",
        r["build"].as_str().unwrap_or("?")
    )];
    let mut row = |label: String, rate: &Value, unit: &str, extra: String| {
        lines.push(format!("{label:<36} {rate:>8} {unit:<10} {extra}"));
    };
    let i = &r["import_rpc"];
    row(
        format!("import method, batch {}", i["batch"]),
        &i["records_per_s"],
        "records/s",
        format!(
            "{:.2} s; per call {}",
            seconds(&i["seconds"]),
            lat(&i["batch_latency_us"])
        ),
    );
    for (key, label) in [
        ("import_cli_daemon", "ferry import FILE (daemon running)"),
        ("import_cli_direct", "ferry import FILE (no daemon)"),
    ] {
        let c = &r[key];
        if c.is_object() {
            row(
                label.into(),
                &c["records_per_s"],
                "records/s",
                format!("{:.2} s", seconds(&c["seconds"])),
            );
        }
    }
    for (key, label) in [
        ("export_daemon", "ferry export (daemon running)"),
        ("export_direct", "ferry export (no daemon)"),
    ] {
        let e = &r[key];
        if e.is_object() {
            row(
                label.into(),
                &e["records_per_s"],
                "records/s",
                format!(
                    "{:.2} s; {:.1} bytes of JSON a record",
                    seconds(&e["seconds"]),
                    e["json_bytes_per_record"].as_f64().unwrap_or(0.0)
                ),
            );
        }
    }
    for key in [
        "put_1_connection",
        "put_concurrent",
        "put_pipelined_1_connection",
        "put_pipelined_concurrent",
    ] {
        let p = &r[key];
        if !p.is_object() {
            continue;
        }
        let pipelined = match p["in_flight"].as_u64() {
            Some(n) => format!(", {n} in flight each"),
            None => String::new(),
        };
        row(
            format!(
                "put x{}, {} connection(s){pipelined}",
                p["writes"], p["connections"]
            ),
            &p["writes_per_s"],
            "writes/s",
            lat(&p["latency_us"]),
        );
    }
    let g = &r["random_get"];
    if g.is_object() {
        row(
            format!("get x{}, random records", g["gets"]),
            &g["gets_per_s"],
            "gets/s",
            lat(&g["latency_us"]),
        );
        let f = &r["socket_floor"];
        row(
            format!("round trip x{} to an echo thread", f["calls"]),
            &f["calls_per_s"],
            "calls/s",
            lat(&f["latency_us"]),
        );
        let l = &r["list"];
        row(
            format!("list, {} pages of {}", l["pages"], l["page"]),
            &l["records_per_s"],
            "records/s",
            format!("per page {}", lat(&l["page_latency_us"])),
        );
    }
    for (name, q) in [
        ("where i4 = v, 100 records", &r["query"]["equality"]),
        (
            "where i4 = v order by i3, 100",
            &r["query"]["equality_ordered"],
        ),
    ] {
        if !q.is_object() {
            continue;
        }
        row(
            format!("query {name} ({})", q["plan"].as_str().unwrap_or("?")),
            &q["records_per_query"],
            "records/query",
            lat(&q["latency_us"]),
        );
    }
    let st = &r["store"];
    lines.push(format!(
        "store on disk: {} bytes/record (du of store/ after a clean stop, {} records); \
         status.store_bytes after import: {} bytes/record",
        st["du_bytes_per_record"],
        st["documents_at_stop"],
        st["status_bytes_per_record_after_import"]
    ));
    if r["space"].is_object() {
        lines.extend(space_lines("device store", &r["space"]));
        lines.extend(space_lines("compacted", &r["space_compacted"]));
    }
    let memory = r["daemon_rss_kib"].as_array().cloned().unwrap_or_default();
    let phases: Vec<String> = memory
        .iter()
        .map(|m| {
            format!(
                "{} {:.1} (peak {:.1})",
                m["after"].as_str().unwrap_or("?"),
                mib(&m["rss"]),
                mib(&m["peak"])
            )
        })
        .collect();
    lines.push(format!("daemon RSS in MiB after: {}", phases.join("; ")));
    let peak = memory.last().map_or(Value::Null, |m| m["peak"].clone());
    if n >= 100_000 {
        let per_100k = seconds(&i["seconds"]) * 100_000.0 / n as f64;
        let peak_mb = mib(&peak) * 1.048_576;
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        lines.push(format!(
            "aims: import of 100,000 records under 10 s: {} ({per_100k:.2} s); \
             RSS under 150 MB: {} (peak {peak_mb:.1} MB)",
            verdict(per_100k < 10.0),
            verdict(peak_mb < 150.0)
        ));
    }
    eprintln!("{}", lines.join("\n"));
}
