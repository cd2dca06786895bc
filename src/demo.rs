//! `ferry demo`: the main job, end to end on the embedded default. It starts a real daemon on a
//! data directory, drives it through its socket like an app would (bulk import, single writes,
//! patch, delete, reads, history, a subscriber), stops it cleanly, reopens the store and checks
//! that every acknowledged write is there. It prints what it measured and fails loudly otherwise.
//!
//! Must not touch: anything the daemon's own code paths do not; it is a client only.

use crate::config::Config;
use crate::daemon;
use crate::datadir::DataDir;
use crate::ipc::Client;
use crate::service::Service;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub fn run(dir: &DataDir, config: &Config, records: usize, as_json: bool) -> Result<(), String> {
    let records = records.max(1);
    dir.init(include_str!("../config.example.toml"))
        .map_err(|e| e.to_string())?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon_dir = dir.clone();
    let daemon_config = config.clone();
    let daemon = std::thread::spawn(move || -> Result<(), String> {
        let rt = daemon::runtime().map_err(|e| e.to_string())?;
        rt.block_on(daemon::run(
            &daemon_dir,
            &daemon_config,
            async {
                let _ = stop_rx.await;
            },
            |socket| {
                let _ = ready_tx.send(socket.to_owned());
            },
        ))
        .map_err(|e| e.to_string())
    });
    let socket = match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(socket) => socket,
        Err(_) => {
            return Err(match daemon.join() {
                Ok(Err(e)) => format!("the daemon did not start: {e}"),
                _ => "the daemon did not start within 30 s".into(),
            });
        }
    };
    let outcome = drive(&socket, records);
    let _ = stop_tx.send(());
    let stopped = daemon
        .join()
        .map_err(|_| "the daemon thread panicked".to_string())?;
    let mut report = outcome?;
    stopped.map_err(|e| format!("the daemon did not stop cleanly: {e}"))?;

    // Reopen the store without the daemon: everything acknowledged must be on disk.
    let open = daemon::open_store(dir, config).map_err(|e| e.to_string())?;
    let service = Service::new(open.store, daemon::service_options(dir, config, false));
    let status = service
        .call("status", json!({}))
        .map_err(|e| e.to_string())?;
    let expected_docs = records as u64 + 1;
    let pending = status["queue"]["pending"].as_u64().unwrap_or(0);
    let expected_queue = records as u64 + 3;
    if status["documents"].as_u64() != Some(expected_docs) || pending != expected_queue {
        return Err(format!(
            "after restart the store holds {} documents and {pending} pending changes; expected {expected_docs} and {expected_queue}",
            status["documents"]
        ));
    }
    let sample = service
        .call("get", json!({ "collection": "Customer", "id": "demo-1" }))
        .map_err(|e| e.to_string())?;
    if sample["fields"]["tier"] != json!("gold") {
        return Err(format!("demo-1 lost its patch after restart: {sample}"));
    }
    report["after_restart"] = json!({ "documents": status["documents"], "pending_changes": pending,
                                      "store_bytes": status["store_bytes"] });
    if as_json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    Ok(())
}

fn drive(socket: &std::path::Path, records: usize) -> Result<Value, String> {
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
        imported += r["imported"].as_u64().unwrap_or(0);
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
    if got["fields"]["tier"] != json!("gold") || got["fields"]["tags"] != json!(["vip"]) {
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
    if page["records"][0]["id"] != json!("inv-000001") {
        return Err(format!(
            "the deleted invoice still lists: {}",
            page["records"][0]
        ));
    }

    watcher
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut notified = Vec::new();
    while notified.len() < 2 {
        let n = watcher
            .next_notification()
            .map_err(|e| format!("the subscriber was not told of a change: {e}"))?;
        notified.push(n["params"]["operation"].as_str().unwrap_or("").to_owned());
    }
    if notified != ["create", "update"] {
        return Err(format!(
            "the subscriber saw {notified:?}, expected create then update"
        ));
    }
    let status = call(&mut app, "status", json!({}))?;
    Ok(json!({
        "records_imported": imported,
        "import_seconds": import_secs,
        "import_records_per_second": imported as f64 / import_secs.max(1e-9),
        "single_write_ms": single_write_ms,
        "read_ms": read_ms,
        "history": history["changes"],
        "subscriber_saw": notified,
        "status": status,
    }))
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
        r["status"]["data_dir"].as_str().unwrap_or(""),
        r["status"]["device_id"].as_str().unwrap_or("")
    );
    println!(
        "  imported {} records of 10 fields in {:.2}s ({:.0} records/s)",
        r["records_imported"],
        r["import_seconds"].as_f64().unwrap_or(0.0),
        r["import_records_per_second"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  single durable write {:.2} ms, read {:.2} ms",
        r["single_write_ms"].as_f64().unwrap_or(0.0),
        r["read_ms"].as_f64().unwrap_or(0.0)
    );
    for c in r["history"].as_array().into_iter().flatten() {
        println!(
            "  history of Customer/demo-1: {} {}",
            c["operation"].as_str().unwrap_or(""),
            c["fields"]
        );
    }
    println!("  subscriber saw: {}", r["subscriber_saw"]);
    let a = &r["after_restart"];
    println!(
        "  after a clean stop and reopen: {} documents, {} changes queued for upload, {} bytes on disk",
        a["documents"], a["pending_changes"], a["store_bytes"]
    );
    println!("demo OK");
}
