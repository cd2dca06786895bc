//! What a device says about its sync is true, with real processes: status while the relay is
//! dead and while the daemon is stopped, and a queue in which refused and oversized changes fail
//! on their own while the changes around them sync, with `ferry retry` and `ferry sync` telling
//! what happened.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Device, Relay, TIMEOUT, call, status, stderr, stdout, wait_for, wait_for_ok};
use serde_json::{Value, json};

fn put(daemon: &common::Daemon, collection: &str, id: &str, fields: Value) {
    call(
        daemon,
        "put",
        json!({"collection": collection, "id": id, "fields": fields}),
    );
}

fn status_json(device: &Device) -> Value {
    let out = device.ferry(&["--json", "status"]);
    assert!(out.status.success(), "ferry status: {out:?}");
    serde_json::from_str(&stdout(&out)).expect("status JSON")
}

fn reasons(status: &Value) -> Vec<String> {
    status["sync"]["reasons"]
        .as_array()
        .unwrap_or_else(|| panic!("no reasons in {status}"))
        .iter()
        .map(|r| r.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The relay is SIGKILLed under a connected device that then writes: status stops saying "up to
/// date" at once (changes are waiting), says the relay is unreachable within the idle timeout,
/// and, once the daemon is stopped too, still shows the device behind, from the store.
#[test]
fn status_tells_the_truth_while_the_relay_is_dead_and_the_daemon_stopped() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut relay = Relay::start(&tmp.path().join("relay"), None);
    let a = Device::new();
    a.join(&relay);
    let daemon = a.start_daemon();
    put(&daemon, "Note", "first", json!({"n": 1}));
    common::wait_converged(&[&daemon], 1);

    relay.kill();
    for n in 0..3 {
        put(&daemon, "Note", &format!("offline-{n}"), json!({"n": n}));
    }
    let s = status(&daemon);
    assert_eq!(s["sync"]["up_to_date"], json!(false), "{s}");
    assert!(
        reasons(&s).contains(&"pending_uploads".to_owned()),
        "{}",
        s["sync"]
    );
    assert_eq!(s["sync"]["pending_uploads"], json!(3), "{}", s["sync"]);

    // Keep-alives go unanswered: the connection is declared dead well before QUIC's default.
    let dead = wait_for_ok("status to call the relay unreachable", TIMEOUT, || {
        let s = status(&daemon);
        let sync = &s["sync"];
        if sync["state"] != json!("connected") && sync["disconnected_since_ms"].is_u64() {
            Ok(s)
        } else {
            Err(sync.to_string())
        }
    });
    let why = reasons(&dead);
    assert!(
        why.contains(&"disconnected".to_owned()) && why.contains(&"pending_uploads".to_owned()),
        "{why:?}"
    );
    assert_eq!(dead["sync"]["up_to_date"], json!(false));
    let human = stdout(&a.ferry(&["status"]));
    assert!(
        human.contains("3 changes waiting to upload") && human.contains("unreachable since"),
        "{human}"
    );

    assert!(daemon.terminate().success());
    let stopped = status_json(&a);
    let sync = &stopped["sync"];
    assert_eq!(sync["daemon_running"], json!(false), "{stopped}");
    assert_eq!(sync["up_to_date"], json!(false), "{stopped}");
    assert_eq!(sync["pending_uploads"], json!(3), "{stopped}");
    assert_eq!(
        sync["relay_head"],
        json!(1),
        "the last head the relay confirmed"
    );
    assert!(reasons(&stopped).contains(&"daemon_not_running".to_owned()));
    assert!(
        stopped.get("pid").is_none() && stopped.get("uptime_ms").is_none(),
        "no daemon, no pid: {stopped}"
    );
    let human = stdout(&a.ferry(&["status"]));
    assert!(
        human.contains("daemon not running") && human.contains("3 changes waiting to upload"),
        "{human}"
    );
}

/// Deterministic hex that deflate cannot shrink much, so the change stays large.
fn noise(len: usize) -> String {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap_or('0')
        })
        .collect()
}

/// Five writes queued while the relay is down: good, oversized (over the relay's frame limit),
/// good, refused by the relay (an id over its limit), good. When the relay is back, the three
/// good ones sync; the other two fail on their own with their reasons, which status, the
/// SyncLog and the daemon's log all name. `ferry sync --retry-failed` tries them again and
/// fails, naming them; `ferry retry` uploads at once, not at the next interval.
#[test]
fn a_refused_or_oversized_change_fails_alone() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay_dir = tmp.path().join("relay");
    let relay_config = "[relay]\nenrolments_per_minute = 10000\nsign_ins_per_minute = 100000\n\
                        max_frame_bytes = 1048576\n\n[limits]\nmax_id_bytes = 20\n";
    let mut relay = Relay::start_with_config(&relay_dir, None, relay_config);
    let a = Device::new();
    a.join(&relay);
    a.edit_config(|text| {
        text.replacen(
            "\nmax_record_bytes = 1048576",
            "\nmax_record_bytes = 8388608",
            1,
        )
        // Only a request can start an upload between sign-ins.
        .replacen("\ninterval_secs = 60", "\ninterval_secs = 3600", 1)
    });
    relay.kill();
    let daemon = a.start_daemon_logged();
    let long_id = "an-id-over-twenty-bytes";
    put(&daemon, "Note", "good-1", json!({"n": 1}));
    put(&daemon, "Note", "big", json!({"blob": noise(3_000_000)}));
    put(&daemon, "Note", "good-2", json!({"n": 2}));
    put(&daemon, "Note", long_id, json!({"n": 3}));
    put(&daemon, "Note", "good-3", json!({"n": 4}));
    let _relay = Relay::start_with_config(&relay_dir, Some(relay.port), relay_config);

    let settled = wait_for_ok("the queue to settle", TIMEOUT, || {
        let s = status(&daemon);
        let q = &s["queue"];
        if q["completed"] == json!(3) && q["failed"] == json!(2) && s["sync"]["cursor"] == json!(3)
        {
            Ok(s)
        } else {
            Err(json!({"queue": q, "sync": s["sync"]}).to_string())
        }
    });
    let sync = &settled["sync"];
    assert_eq!(sync["relay_head"], json!(3), "{sync}");
    assert_eq!(sync["up_to_date"], json!(false), "{sync}");
    assert_eq!(reasons(&settled), ["failed_uploads"], "{sync}");
    let last_error = sync["last_error"]["message"].as_str().unwrap_or_default();
    assert!(last_error.contains("refused"), "{sync}");

    let failed = call(&daemon, "queue", json!({"status": "failed"}));
    let mut by_record: Vec<(String, String)> = failed["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["object_id"].as_str().unwrap_or_default().to_owned(),
                e["last_error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    by_record.sort();
    assert_eq!(by_record.len(), 2, "{failed}");
    assert_eq!(by_record[0].0, long_id);
    assert!(by_record[0].1.starts_with("validation:"), "{by_record:?}");
    assert_eq!(by_record[1].0, "big");
    assert!(
        by_record[1].1.contains("one sync frame can carry"),
        "{by_record:?}"
    );
    let log = call(&daemon, "log", json!({"limit": 100}));
    let refusals: Vec<&str> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["status"] == json!("failed") && e["direction"] == json!("upload"))
        .filter_map(|e| e["error_message"].as_str())
        .collect();
    for record in ["Note/big", &format!("Note/{long_id}")] {
        assert!(
            refusals.iter().any(|m| m.contains(record)),
            "no SyncLog entry names {record}: {refusals:?}"
        );
    }
    let daemon_log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    assert!(
        daemon_log.contains("a local change was refused") && daemon_log.contains("Note/big"),
        "{daemon_log}"
    );

    // Retried and refused again: `ferry sync` says so and fails.
    let out = a.ferry(&["sync", "--retry-failed"]);
    assert!(!out.status.success(), "{out:?}");
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("Note/big") && said.contains(long_id) && said.contains("refused"),
        "{said}"
    );

    // `ferry retry` starts an upload itself: with a one-hour interval, nothing else would.
    let entry = failed["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["object_id"] == json!(long_id))
        .expect("the refused entry")
        .clone();
    let id = entry["id"].as_u64().expect("entry id");
    let before = call(&daemon, "queue", json!({"status": "failed"}))["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["id"] == json!(id))
        .expect("still failed")["updated_at"]
        .as_u64()
        .expect("updated_at");
    let out = a.ferry(&["retry", &id.to_string()]);
    assert!(out.status.success(), "{out:?}");
    wait_for(
        "the retried entry to be uploaded and refused again",
        TIMEOUT,
        || {
            call(&daemon, "queue", json!({"status": "failed"}))["entries"]
                .as_array()
                .is_some_and(|entries| {
                    entries.iter().any(|e| {
                        e["id"] == json!(id) && e["updated_at"].as_u64().is_some_and(|t| t > before)
                    })
                })
        },
    );
}

/// Each phase of a sync has its own SyncLog entry, stamped when it happened and written then:
/// initialization, upload, download and finalization; two syncs in the same second keep their
/// own entries.
#[test]
fn every_sync_phase_is_logged_when_it_happens() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start(&tmp.path().join("relay"), None);
    let a = Device::new();
    a.join(&relay);
    let daemon = a.start_daemon();
    for n in 0..2 {
        put(&daemon, "Note", &format!("n{n}"), json!({"n": n}));
        let out = a.ferry(&["sync"]);
        assert!(out.status.success(), "{out:?}");
    }
    let log = call(&daemon, "log", json!({"limit": 100}));
    let mut entries: Vec<Value> = log["entries"].as_array().expect("entries").clone();
    entries.reverse();
    let phases: Vec<(String, String, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["direction"].as_str().unwrap_or_default().to_owned(),
                e["status"].as_str().unwrap_or_default().to_owned(),
                e["records_processed"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let uploads: Vec<_> = phases
        .iter()
        .filter(|(d, s, _)| d == "upload" && s == "success")
        .collect();
    assert_eq!(uploads.len(), 2, "one upload entry per sync: {phases:?}");
    assert!(uploads.iter().all(|(_, _, n)| *n == 1), "{phases:?}");
    for phase in ["initialization", "download", "finalization"] {
        assert!(
            phases.iter().any(|(d, s, _)| d == phase && s == "success"),
            "no successful {phase} entry: {phases:?}"
        );
    }
    let times: Vec<u64> = entries
        .iter()
        .map(|e| e["timestamp"].as_u64().expect("timestamp"))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "entries are stamped in the order they happened: {times:?}"
    );
    // The upload of each sync comes before that sync's finalization.
    let first_upload = phases
        .iter()
        .position(|(d, _, _)| d == "upload")
        .expect("an upload");
    assert!(
        phases[first_upload..]
            .iter()
            .any(|(d, _, _)| d == "finalization"),
        "{phases:?}"
    );
}
