//! `ferry demo`: the main job, end to end on the embedded default. It starts a real daemon on a
//! data directory, drives it through its socket like an app would (bulk import, single writes,
//! patch, delete, reads, history, a subscriber), stops it cleanly, reopens the store and checks
//! that every acknowledged write is there. Then it starts a relay on loopback, restarts the daemon
//! syncing with it next to a second, empty device, and checks that the second device receives
//! everything and sees a new write live. It prints what it measured and fails loudly otherwise.
//!
//! Must not touch: anything the daemon's own code paths do not; it is a client only.

use crate::config::Config;
use crate::daemon;
use crate::datadir::DataDir;
use crate::ipc::Client;
use crate::relay;
use crate::service::Service;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const EXAMPLE_CONFIG: &str = include_str!("../config.example.toml");
const START_TIMEOUT: Duration = Duration::from_secs(30);
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// A server (daemon or relay) running on its own thread and runtime, until stopped.
struct Running<T> {
    ready: T,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl<T: Send + 'static> Running<T> {
    /// Runs `serve(stop, ready)` on a new thread and waits until it says it is ready.
    fn start<F, Fut>(what: &str, serve: F) -> Result<Self, String>
    where
        F: FnOnce(tokio::sync::oneshot::Receiver<()>, std::sync::mpsc::Sender<T>) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let rt = daemon::runtime().map_err(|e| e.to_string())?;
            rt.block_on(serve(stop_rx, ready_tx))
        });
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(ready) => Ok(Running {
                ready,
                stop,
                thread,
            }),
            Err(_) => Err(match thread.join() {
                Ok(Err(e)) => format!("the {what} did not start: {e}"),
                _ => format!("the {what} did not start within {START_TIMEOUT:?}"),
            }),
        }
    }

    fn stop(self, what: &str) -> Result<(), String> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| format!("the {what} thread panicked"))?
            .map_err(|e| format!("the {what} did not stop cleanly: {e}"))
    }
}

fn start_daemon(dir: &DataDir, config: &Config) -> Result<Running<PathBuf>, String> {
    dir.init(EXAMPLE_CONFIG).map_err(|e| e.to_string())?;
    let (dir, config) = (dir.clone(), config.clone());
    Running::start("daemon", move |stop, ready| async move {
        daemon::run(
            &dir,
            &config,
            async {
                let _ = stop.await;
            },
            |socket| {
                let _ = ready.send(socket.to_owned());
            },
        )
        .await
        .map_err(|e| e.to_string())
    })
}

fn start_relay(dir: &DataDir, config: &Config) -> Result<Running<relay::Listening>, String> {
    let (dir, config) = (dir.clone(), config.clone());
    Running::start("relay", move |stop, ready| async move {
        relay::run(
            &dir,
            &config,
            Some("127.0.0.1:0"),
            async {
                let _ = stop.await;
            },
            |listening| {
                let _ = ready.send(listening.clone());
            },
        )
        .await
        .map_err(|e| e.to_string())
    })
}

pub fn run(dir: &DataDir, config: &Config, records: usize, as_json: bool) -> Result<(), String> {
    let records = records.max(1);
    let daemon = start_daemon(dir, config)?;
    let outcome = drive(&daemon.ready, records);
    let stopped = daemon.stop("daemon");
    let mut report = outcome?;
    stopped?;

    // Reopen the store without the daemon: everything acknowledged must be on disk.
    let open = daemon::open_store(dir, config).map_err(|e| e.to_string())?;
    let service = Service::new(open.store, daemon::service_options(dir, config, false));
    let status = service
        .call("status", json!({}))
        .map_err(|e| e.to_string())?;
    let expected_docs = records as u64 + 1;
    let pending = at(&status, "/queue/pending").as_u64().unwrap_or(0);
    let expected_queue = records as u64 + 3;
    let documents = at(&status, "/documents");
    if documents.as_u64() != Some(expected_docs) || pending != expected_queue {
        return Err(format!(
            "after restart the store holds {documents} documents and {pending} pending changes; expected {expected_docs} and {expected_queue}",
        ));
    }
    let sample = service
        .call("get", json!({ "collection": "Customer", "id": "demo-1" }))
        .map_err(|e| e.to_string())?;
    if at(&sample, "/fields/tier") != "gold" {
        return Err(format!("demo-1 lost its patch after restart: {sample}"));
    }
    report.insert(
        "after_restart".into(),
        json!({ "documents": documents, "pending_changes": pending,
                "store_bytes": at(&status, "/store_bytes") }),
    );
    drop(service);
    drop(open.lock);
    report.insert(
        "sync".into(),
        Value::Object(sync(dir, config, expected_docs)?),
    );
    let report = Value::Object(report);
    if as_json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    Ok(())
}

fn drive(socket: &std::path::Path, records: usize) -> Result<Map<String, Value>, String> {
    let connect = || Client::connect(socket).map_err(|e| format!("cannot connect: {e}"));
    let mut app = connect()?;
    let mut watcher = connect()?;
    let call = |c: &mut Client, m: &str, p: Value| c.call(m, p).map_err(|e| format!("{m}: {e}"));
    call(
        &mut watcher,
        "subscribe",
        json!({ "collection": "Customer" }),
    )?;

    let started = Instant::now();
    let mut imported = 0;
    for chunk in (0..records).collect::<Vec<_>>().chunks(2000) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|n| json!({ "collection": "Invoice", "id": format!("inv-{n:06}"), "fields": invoice(*n) }))
            .collect();
        let r = call(&mut app, "import", json!({ "records": batch }))?;
        imported += at(&r, "/imported").as_u64().unwrap_or(0);
    }
    let import_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    call(
        &mut app,
        "put",
        json!({ "collection": "Customer", "id": "demo-1",
        "fields": { "name": "Ada Lovelace", "email": "ada@example.com", "tags": ["vip"] } }),
    )?;
    call(
        &mut app,
        "patch",
        json!({ "collection": "Customer", "id": "demo-1",
        "fields": { "tier": "gold" } }),
    )?;
    let single_write_ms = started.elapsed().as_secs_f64() * 500.0;
    call(
        &mut app,
        "delete",
        json!({ "collection": "Invoice", "id": "inv-000000" }),
    )?;

    let started = Instant::now();
    let got = call(
        &mut app,
        "get",
        json!({ "collection": "Customer", "id": "demo-1" }),
    )?;
    let read_ms = started.elapsed().as_secs_f64() * 1000.0;
    if at(&got, "/fields/tier") != "gold" || at(&got, "/fields/tags") != &json!(["vip"]) {
        return Err(format!("read back something else: {got}"));
    }
    let history = call(
        &mut app,
        "history",
        json!({ "collection": "Customer", "id": "demo-1" }),
    )?;
    let page = call(
        &mut app,
        "list",
        json!({ "collection": "Invoice", "limit": 3 }),
    )?;
    let first = at(&page, "/records/0");
    if at(first, "/id") != "inv-000001" {
        return Err(format!("the deleted invoice still lists: {first}"));
    }

    watcher
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut notified = Vec::new();
    while notified.len() < 2 {
        let n = watcher
            .next_notification()
            .map_err(|e| format!("the subscriber was not told of a change: {e}"))?;
        notified.push(
            at(&n, "/params/operation")
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    if notified != ["create", "update"] {
        return Err(format!(
            "the subscriber saw {notified:?}, expected create then update"
        ));
    }
    let status = call(&mut app, "status", json!({}))?;
    Ok(Map::from_iter([
        ("records_imported".into(), json!(imported)),
        ("import_seconds".into(), json!(import_secs)),
        (
            "import_records_per_second".into(),
            json!(imported as f64 / import_secs.max(1e-9)),
        ),
        ("single_write_ms".into(), json!(single_write_ms)),
        ("read_ms".into(), json!(read_ms)),
        ("history".into(), at(&history, "/changes").clone()),
        ("subscriber_saw".into(), json!(notified)),
        ("status".into(), status),
    ]))
}

/// A relay on loopback; this device syncing with it, and a second, empty device next to it.
fn sync(dir: &DataDir, config: &Config, expected_docs: u64) -> Result<Map<String, Value>, String> {
    let resolve =
        |name: &str| DataDir::resolve(Some(&dir.path().join(name))).map_err(|e| e.to_string());
    let relay_dir = resolve("relay")?;
    let relay = start_relay(&relay_dir, config)?;
    let mut synced = config.clone();
    synced.sync.relay = relay.ready.listen.to_string();
    synced.sync.fingerprint = relay.ready.fingerprint.to_string();
    let device_b = resolve("device-b")?;
    device_b.init(EXAMPLE_CONFIG).map_err(|e| e.to_string())?;
    // As an operator and two users would: an account, a code each, and `ferry register`.
    let mut operator = Client::connect(&relay::admin::socket_path(&relay_dir))
        .map_err(|e| format!("cannot reach the relay's operator socket: {e}"))?;
    let account = synced.sync.space.clone();
    operator
        .call("account.add", json!({ "name": account }))
        .map_err(|e| format!("account.add: {e}"))?;
    for device in [dir, &device_b] {
        let code = operator
            .call("enrol", json!({ "account": account }))
            .map_err(|e| format!("enrol: {e}"))?;
        let key = device.identity().map_err(|e| e.to_string())?;
        let code = ferry_proto::wire::Secret::new(at(&code, "/code").as_str().unwrap_or_default());
        daemon::runtime()
            .map_err(|e| e.to_string())?
            .block_on(crate::engine::register_device(
                device.path(),
                key.signing_key().clone(),
                &synced.sync,
                code,
            ))
            .map_err(|e| format!("registering {}: {e}", device.path().display()))?;
    }
    let started = Instant::now();
    let a = start_daemon(dir, &synced)?;
    let b = start_daemon(&device_b, &synced)?;
    let outcome = watch_sync(&a.ready, &b.ready, expected_docs, started);
    let fingerprint = relay.ready.fingerprint.to_string();
    let stopped = [
        b.stop("second daemon"),
        a.stop("daemon"),
        relay.stop("relay"),
    ];
    let mut report = outcome?;
    stopped.into_iter().collect::<Result<Vec<()>, String>>()?;
    report.insert("relay_fingerprint".into(), json!(fingerprint));
    Ok(report)
}

fn watch_sync(
    a_socket: &std::path::Path,
    b_socket: &std::path::Path,
    expected_docs: u64,
    started: Instant,
) -> Result<Map<String, Value>, String> {
    let connect =
        |s: &std::path::Path| Client::connect(s).map_err(|e| format!("cannot connect: {e}"));
    let (mut a, mut b, mut watcher) = (connect(a_socket)?, connect(b_socket)?, connect(b_socket)?);
    let status = |c: &mut Client| {
        c.call("status", json!({}))
            .map_err(|e| format!("status: {e}"))
    };
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let b_status = loop {
        let s = status(&mut b)?;
        let documents = at(&s, "/documents");
        if documents.as_u64() == Some(expected_docs)
            && at(&s, "/sync/up_to_date").as_bool() == Some(true)
        {
            break s;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the second device holds {documents} of {expected_docs} records after {SYNC_TIMEOUT:?}: {}",
                at(&s, "/sync")
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let initial_sync_secs = started.elapsed().as_secs_f64();
    watcher
        .call("subscribe", json!({ "collection": "Customer" }))
        .map_err(|e| format!("subscribe: {e}"))?;
    watcher
        .set_read_timeout(Some(SYNC_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let written = Instant::now();
    a.call(
        "patch",
        json!({ "collection": "Customer", "id": "demo-1", "fields": { "tier": "platinum" } }),
    )
    .map_err(|e| format!("patch: {e}"))?;
    let seen = watcher
        .next_notification()
        .map_err(|e| format!("the second device was not told of the new write: {e}"))?;
    let propagation_ms = written.elapsed().as_secs_f64() * 1000.0;
    let got = b
        .call("get", json!({ "collection": "Customer", "id": "demo-1" }))
        .map_err(|e| format!("get: {e}"))?;
    if at(&got, "/fields/tier") != "platinum" || at(&seen, "/params/origin") != "remote" {
        return Err(format!("the second device saw {seen} and holds {got}"));
    }
    let a_status = status(&mut a)?;
    Ok(Map::from_iter([
        ("initial_sync_seconds".into(), json!(initial_sync_secs)),
        (
            "initial_sync_records_per_second".into(),
            json!(expected_docs as f64 / initial_sync_secs.max(1e-9)),
        ),
        ("propagation_ms".into(), json!(propagation_ms)),
        ("device_a".into(), at(&a_status, "/sync").clone()),
        ("device_b".into(), at(&b_status, "/sync").clone()),
    ]))
}

/// What `value` holds at `pointer`, `Null` when nothing is there: what indexing a `Value` reads,
/// with no way to panic.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value.pointer(pointer).unwrap_or(&Value::Null)
}

fn invoice(n: usize) -> Value {
    json!({
        "number": format!("INV-{n:08}"), "customer": format!("customer-{}", n % 997),
        "currency": "EUR", "status": "open", "note": "net 30, thank you for your business",
        "amount_cents": (n * 137) % 1_000_000, "lines": n % 17, "year": 2026,
        "month": n % 12 + 1, "day": n % 28 + 1
    })
}

fn print_report(r: &Value) {
    println!(
        "ferry demo: a daemon on {} (device {})",
        at(r, "/status/data_dir").as_str().unwrap_or(""),
        at(r, "/status/device_id").as_str().unwrap_or("")
    );
    println!(
        "  imported {} records of 10 fields in {:.2}s ({:.0} records/s)",
        at(r, "/records_imported"),
        at(r, "/import_seconds").as_f64().unwrap_or(0.0),
        at(r, "/import_records_per_second").as_f64().unwrap_or(0.0)
    );
    println!(
        "  single durable write {:.2} ms, read {:.2} ms",
        at(r, "/single_write_ms").as_f64().unwrap_or(0.0),
        at(r, "/read_ms").as_f64().unwrap_or(0.0)
    );
    for c in at(r, "/history").as_array().into_iter().flatten() {
        println!(
            "  history of Customer/demo-1: {} {}",
            at(c, "/operation").as_str().unwrap_or(""),
            at(c, "/fields")
        );
    }
    println!("  subscriber saw: {}", at(r, "/subscriber_saw"));
    let a = at(r, "/after_restart");
    println!(
        "  after a clean stop and reopen: {} documents, {} changes queued for upload, {} bytes on disk",
        at(a, "/documents"),
        at(a, "/pending_changes"),
        at(a, "/store_bytes")
    );
    let s = at(r, "/sync");
    println!(
        "  sync through a relay on {} (fingerprint {}…):",
        at(s, "/device_a/relay").as_str().unwrap_or(""),
        at(s, "/relay_fingerprint")
            .as_str()
            .unwrap_or("")
            .get(..23)
            .unwrap_or("")
    );
    println!(
        "    a second, empty device held all {} records {:.2}s after both started ({:.0} records/s)",
        at(r, "/after_restart/documents"),
        at(s, "/initial_sync_seconds").as_f64().unwrap_or(0.0),
        at(s, "/initial_sync_records_per_second")
            .as_f64()
            .unwrap_or(0.0)
    );
    println!(
        "    a new write on the first device reached the second's subscriber in {:.1} ms",
        at(s, "/propagation_ms").as_f64().unwrap_or(0.0)
    );
    println!("demo OK");
}
