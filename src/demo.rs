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
use crate::engine::SyncStatus;
use crate::ipc::Client;
use crate::ipc::{DaemonStatus, Notification};
use crate::record::{Fields, HistoryEntry};
use crate::relay;
use crate::service::api::{self, Method};
use crate::service::{Origin, Service};
use ferry_proto::Operation;
use serde::Serialize;
use serde_json::{Value, json};
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

/// What the demo measured, printed for people or, with `--json`, as JSON.
#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    local: Local,
    after_restart: AfterRestart,
    sync: Synced,
}

/// The daemon driven through its socket.
#[derive(Serialize)]
struct Local {
    records_imported: usize,
    import_seconds: f64,
    import_records_per_second: f64,
    single_write_ms: f64,
    read_ms: f64,
    history: Vec<HistoryEntry>,
    subscriber_saw: Vec<Operation>,
    status: DaemonStatus,
}

/// The store reopened without the daemon.
#[derive(Serialize)]
struct AfterRestart {
    documents: u64,
    pending_changes: u64,
    store_bytes: Option<u64>,
}

/// Two devices syncing through a relay on loopback.
#[derive(Serialize)]
struct Synced {
    initial_sync_seconds: f64,
    initial_sync_records_per_second: f64,
    propagation_ms: f64,
    device_a: Option<SyncStatus>,
    device_b: Option<SyncStatus>,
    relay_fingerprint: String,
}

pub fn run(dir: &DataDir, config: &Config, records: usize, as_json: bool) -> Result<(), String> {
    let records = records.max(1);
    let daemon = start_daemon(dir, config)?;
    let outcome = drive(&daemon.ready, records);
    let stopped = daemon.stop("daemon");
    let local = outcome?;
    stopped?;

    // Reopen the store without the daemon: everything acknowledged must be on disk.
    let open = daemon::open_store(dir, config).map_err(|e| e.to_string())?;
    let service = Service::new(open.store, daemon::service_options(dir, config, false));
    let status = service
        .call(api::StatusParams {})
        .map_err(|e| e.to_string())?;
    let expected_docs = records as u64 + 1;
    let expected_queue = records as u64 + 3;
    let (documents, pending) = status
        .contents
        .map_or((0, 0), |c| (c.documents, c.queue.pending));
    if documents != expected_docs || pending != expected_queue {
        return Err(format!(
            "after restart the store holds {documents} documents and {pending} pending changes; expected {expected_docs} and {expected_queue}",
        ));
    }
    let sample = service
        .call(api::GetParams::new("Customer", "demo-1"))
        .map_err(|e| e.to_string())?;
    if sample.fields.get("tier") != Some(json!("gold")) {
        return Err(format!(
            "demo-1 lost its patch after restart: {:?}",
            sample.fields
        ));
    }
    let after_restart = AfterRestart {
        documents,
        pending_changes: pending,
        store_bytes: status.store_bytes,
    };
    drop(service);
    drop(open.lock);
    let report = Report {
        local,
        after_restart,
        sync: sync(dir, config, expected_docs)?,
    };
    if as_json {
        match serde_json::to_string(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return Err(format!("the report cannot be written as JSON: {e}")),
        }
    } else {
        print_report(&report);
    }
    Ok(())
}

fn drive(socket: &std::path::Path, records: usize) -> Result<Local, String> {
    let connect = || Client::connect(socket).map_err(|e| format!("cannot connect: {e}"));
    let mut app = connect()?;
    let mut watcher = connect()?;
    fn call<M: Method>(c: &mut Client, params: M) -> Result<M::Answer, String> {
        c.request(params).map_err(|e| format!("{}: {e}", M::NAME))
    }
    call(
        &mut watcher,
        api::SubscribeParams {
            collection: Some("Customer".into()),
            ..api::SubscribeParams::default()
        },
    )?;

    let started = Instant::now();
    let mut imported = 0;
    for chunk in (0..records).collect::<Vec<_>>().chunks(2000) {
        let batch = chunk
            .iter()
            .map(|n| api::ImportRecord {
                collection: "Invoice".into(),
                id: Some(format!("inv-{n:06}")),
                fields: invoice(*n),
            })
            .collect();
        imported += call(&mut app, api::ImportParams { records: batch })?.imported;
    }
    let import_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    call(
        &mut app,
        api::PutParams {
            collection: "Customer".into(),
            id: Some("demo-1".into()),
            fields: fields(
                json!({ "name": "Ada Lovelace", "email": "ada@example.com", "tags": ["vip"] }),
            ),
        },
    )?;
    call(
        &mut app,
        api::PatchParams {
            collection: "Customer".into(),
            id: "demo-1".into(),
            fields: fields(json!({ "tier": "gold" })),
            unset: Vec::new(),
        },
    )?;
    let single_write_ms = started.elapsed().as_secs_f64() * 500.0;
    call(&mut app, api::DeleteParams::new("Invoice", "inv-000000"))?;

    let started = Instant::now();
    let got = call(&mut app, api::GetParams::new("Customer", "demo-1"))?;
    let read_ms = started.elapsed().as_secs_f64() * 1000.0;
    if got.fields.get("tier") != Some(json!("gold"))
        || got.fields.get("tags") != Some(json!(["vip"]))
    {
        return Err(format!("read back something else: {:?}", got.fields));
    }
    let history = call(&mut app, api::HistoryParams::new("Customer", "demo-1"))?;
    let page = call(
        &mut app,
        api::ListParams::page("Invoice".into(), Some(3), None),
    )?;
    let first = page.records.first().map(|r| r.id.as_str());
    if first != Some("inv-000001") {
        return Err(format!("the deleted invoice still lists: {first:?}"));
    }

    watcher
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut notified = Vec::new();
    while notified.len() < 2 {
        let note = watcher
            .next_event()
            .map_err(|e| format!("the subscriber was not told of a change: {e}"))?;
        if let Notification::Change(change) = note {
            notified.push(change.event.change.operation);
        }
    }
    if notified != [Operation::Create, Operation::Update] {
        return Err(format!(
            "the subscriber saw {notified:?}, expected create then update"
        ));
    }
    let status = app.status().map_err(|e| format!("status: {e}"))?;
    Ok(Local {
        records_imported: imported,
        import_seconds: import_secs,
        import_records_per_second: imported as f64 / import_secs.max(1e-9),
        single_write_ms,
        read_ms,
        history: history.changes,
        subscriber_saw: notified,
        status,
    })
}

/// A relay on loopback; this device syncing with it, and a second, empty device next to it.
fn sync(dir: &DataDir, config: &Config, expected_docs: u64) -> Result<Synced, String> {
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
    relay::admin::request(
        &mut operator,
        relay::admin::AccountAdd {
            name: account.clone(),
        },
    )
    .map_err(|e| format!("account.add: {e}"))?;
    for device in [dir, &device_b] {
        let code = relay::admin::request(
            &mut operator,
            relay::admin::Enrol {
                account: account.clone(),
                hours: None,
            },
        )
        .map_err(|e| format!("enrol: {e}"))?;
        let key = device.identity().map_err(|e| e.to_string())?;
        let code = ferry_proto::wire::Secret::new(code.code);
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
    let fingerprint = relay.ready.fingerprint.to_string();
    let outcome = watch_sync(&a.ready, &b.ready, expected_docs, started, fingerprint);
    let stopped = [
        b.stop("second daemon"),
        a.stop("daemon"),
        relay.stop("relay"),
    ];
    let report = outcome?;
    stopped.into_iter().collect::<Result<Vec<()>, String>>()?;
    Ok(report)
}

fn watch_sync(
    a_socket: &std::path::Path,
    b_socket: &std::path::Path,
    expected_docs: u64,
    started: Instant,
    relay_fingerprint: String,
) -> Result<Synced, String> {
    let connect =
        |s: &std::path::Path| Client::connect(s).map_err(|e| format!("cannot connect: {e}"));
    let (mut a, mut b, mut watcher) = (connect(a_socket)?, connect(b_socket)?, connect(b_socket)?);
    let status = |c: &mut Client| c.status().map_err(|e| format!("status: {e}"));
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let b_status = loop {
        let s = status(&mut b)?;
        let documents = s.status.contents.as_ref().map_or(0, |c| c.documents);
        if documents == expected_docs && s.sync.as_ref().is_some_and(|s| s.up_to_date) {
            break s;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the second device holds {documents} of {expected_docs} records after {SYNC_TIMEOUT:?}: {:?}",
                s.sync
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let initial_sync_secs = started.elapsed().as_secs_f64();
    watcher
        .request(api::SubscribeParams {
            collection: Some("Customer".into()),
            ..api::SubscribeParams::default()
        })
        .map_err(|e| format!("subscribe: {e}"))?;
    watcher
        .set_read_timeout(Some(SYNC_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let written = Instant::now();
    let patched = a
        .request(api::PatchParams {
            collection: "Customer".into(),
            id: "demo-1".into(),
            fields: fields(json!({ "tier": "platinum" })),
            unset: Vec::new(),
        })
        .map_err(|e| format!("patch: {e}"))?;
    // Changes the second device applied before the subscription but made durable after it are
    // announced to it too: the new write is the event that ends at its heads.
    let told_by = Instant::now() + SYNC_TIMEOUT;
    let seen = loop {
        let seen = watcher
            .next_event()
            .map_err(|e| format!("the second device was not told of the new write: {e}"))?;
        let is_the_write = matches!(&seen, Notification::Change(c)
            if c.event.change.id == patched.id && c.event.change.heads == patched.heads);
        if is_the_write {
            break seen;
        }
        if Instant::now() > told_by {
            return Err(format!(
                "the second device was not told of the new write within {SYNC_TIMEOUT:?}; \
                 last told of {seen:?}"
            ));
        }
    };
    let propagation_ms = written.elapsed().as_secs_f64() * 1000.0;
    let got = b
        .request(api::GetParams::new("Customer", "demo-1"))
        .map_err(|e| format!("get: {e}"))?;
    let remote =
        matches!(&seen, Notification::Change(c) if c.event.change.origin == Origin::Remote);
    if got.fields.get("tier") != Some(json!("platinum")) || !remote {
        return Err(format!(
            "the second device saw {seen:?} and holds {:?}",
            got.fields
        ));
    }
    let a_status = status(&mut a)?;
    Ok(Synced {
        initial_sync_seconds: initial_sync_secs,
        initial_sync_records_per_second: expected_docs as f64 / initial_sync_secs.max(1e-9),
        propagation_ms,
        device_a: a_status.sync,
        device_b: b_status.sync,
        relay_fingerprint,
    })
}

/// A JSON object literal as record fields.
fn fields(value: Value) -> Fields {
    match value {
        Value::Object(fields) => fields,
        _ => Fields::new(),
    }
}

fn invoice(n: usize) -> Fields {
    fields(json!({
        "number": format!("INV-{n:08}"), "customer": format!("customer-{}", n % 997),
        "currency": "EUR", "status": "open", "note": "net 30, thank you for your business",
        "amount_cents": (n * 137) % 1_000_000, "lines": n % 17, "year": 2026,
        "month": n % 12 + 1, "day": n % 28 + 1
    }))
}

fn print_report(r: &Report) {
    let local = &r.local;
    println!(
        "ferry demo: a daemon on {} (device {})",
        local.status.status.data_dir.display(),
        local.status.status.device_id
    );
    println!(
        "  imported {} records of 10 fields in {:.2}s ({:.0} records/s)",
        local.records_imported, local.import_seconds, local.import_records_per_second
    );
    println!(
        "  single durable write {:.2} ms, read {:.2} ms",
        local.single_write_ms, local.read_ms
    );
    for c in &local.history {
        println!(
            "  history of Customer/demo-1: {} {}",
            c.operation,
            json!(c.fields)
        );
    }
    println!("  subscriber saw: {}", json!(local.subscriber_saw));
    let a = &r.after_restart;
    println!(
        "  after a clean stop and reopen: {} documents, {} changes queued for upload, {} bytes on disk",
        a.documents,
        a.pending_changes,
        json!(a.store_bytes)
    );
    let s = &r.sync;
    println!(
        "  sync through a relay on {} (fingerprint {}…):",
        s.device_a.as_ref().map_or("", |d| d.relay.as_str()),
        s.relay_fingerprint.get(..23).unwrap_or("")
    );
    println!(
        "    a second, empty device held all {} records {:.2}s after both started ({:.0} records/s)",
        a.documents, s.initial_sync_seconds, s.initial_sync_records_per_second
    );
    println!(
        "    a new write on the first device reached the second's subscriber in {:.1} ms",
        s.propagation_ms
    );
    println!("demo OK");
}
