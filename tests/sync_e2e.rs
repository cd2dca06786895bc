//! Sync end to end with real processes on 127.0.0.1: `ferry relay` and two `ferry daemon`s (A and
//! B) in temp dirs. Writes made while the relay is down, a relay or a daemon killed with SIGKILL
//! in the middle of an upload, concurrent offline edits of one record, deletes, the errors a
//! device shows when it cannot sync, and `ferry sync` itself.
//!
//! Convergence means: both devices report `up_to_date` at the relay's head, their queues hold
//! nothing pending, processing or failed, and they hold the same records with the same heads.
//! The relay's head counts its log entries, so a head equal to the number of changes written
//! shows that no change was logged twice.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{
    Daemon, Device, Relay, TIMEOUT, assert_json_same, call, count, status, stderr, stdout, unsent,
    wait_converged, wait_for,
};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Stdio};

/// Records written in one go by the tests that interrupt an upload: enough for dozens of batches.
const MANY: u64 = 3000;

/// A relay's data directory, which outlives relay processes so a test can kill one and start
/// another on the same data and port.
struct RelayHome {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl RelayHome {
    fn new() -> RelayHome {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("relay");
        RelayHome { _tmp: tmp, dir }
    }

    fn start(&self, port: Option<u16>) -> Relay {
        Relay::start(&self.dir, port)
    }
}

/// Two devices pointed at one relay, with `edit` applied to both configs.
fn devices(relay: &Relay, edit: impl Fn(&str) -> String) -> (Device, Device) {
    let pair = (Device::new(), Device::new());
    for device in [&pair.0, &pair.1] {
        device.join(relay);
        device.edit_config(&edit);
    }
    pair
}

/// Upload batches of 20 changes, so that an upload takes many round trips and a kill lands in
/// the middle of one.
fn small_batches(config: &str) -> String {
    let default = "\nbatch_changes = 1000";
    assert!(config.contains(default), "no {default:?} in the config");
    config.replacen(default, "\nbatch_changes = 20", 1)
}

/// Every live record of `collection`, in id order, as `list` pages them.
fn records(daemon: &Daemon, collection: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = call(
            daemon,
            "list",
            json!({ "collection": collection, "limit": 1000, "after": after }),
        );
        all.extend(page["records"].as_array().expect("records").iter().cloned());
        after = page["next"].clone();
        if after.is_null() {
            return all;
        }
    }
}

/// The same records, fields and heads (so the same Automerge history) on both devices.
fn assert_same_records(a: &Daemon, b: &Daemon, collection: &str, expected: usize) {
    let on_a = records(a, collection);
    assert_eq!(on_a.len(), expected, "records of {collection} on A");
    assert_json_same(
        &Value::Array(records(b, collection)),
        &Value::Array(on_a),
        &format!("{collection} on B vs A"),
    );
}

fn jsonl(n: u64) -> String {
    (0..n)
        .map(|i| {
            json!({ "collection": "Item", "id": format!("item-{i:05}"), "fields": { "n": i } })
                .to_string()
                + "\n"
        })
        .collect()
}

/// Waits until `daemon` has uploaded part of its queue but not all of it: an upload is under way.
fn wait_mid_upload(daemon: &Daemon) {
    wait_for("the upload to be under way", TIMEOUT, || {
        let s = status(daemon);
        count(&s["sync"]["uploaded"]) > 0 && unsent(&s) > 0
    });
}

/// After an interrupted upload of `MANY` records from A: the relay logged each change once, B
/// has exactly A's records, and each record on B has the one change A wrote.
fn assert_many_arrived_once(a: &Daemon, b: &Daemon) {
    wait_converged(&[a, b], MANY);
    let status_a = status(a);
    assert_eq!(status_a["queue"]["completed"], json!(MANY), "{status_a}");
    assert_same_records(a, b, "Item", MANY as usize);
    let device_a = status_a["device_id"].as_str().expect("device id");
    for i in (0..MANY).step_by(97) {
        let id = format!("item-{i:05}");
        let history = call(b, "history", json!({ "collection": "Item", "id": id }));
        let changes = history["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), 1, "history of {id} on B: {history}");
        assert_eq!(changes[0]["device"], json!(device_a), "{history}");
    }
}

fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let mut exit = None;
    wait_for(what, TIMEOUT, || {
        exit = child.try_wait().expect("wait for a child");
        exit.is_some()
    });
    exit.expect("exited")
}

#[test]
fn writes_made_while_the_relay_is_down_reach_the_other_device() {
    let home = RelayHome::new();
    let mut relay = home.start(None);
    let (a, b) = devices(&relay, str::to_string);
    let port = relay.port;
    relay.kill();
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();

    for i in 0..20 {
        call(
            &da,
            "put",
            json!({ "collection": "Note", "id": format!("n{i:02}"), "fields": { "i": i } }),
        );
    }
    call(
        &da,
        "patch",
        json!({ "collection": "Note", "id": "n00", "fields": { "done": true } }),
    );
    wait_for("A to report that the relay is unreachable", TIMEOUT, || {
        let s = status(&da);
        let kind = &s["sync"]["last_error"]["kind"];
        (*kind == json!("timeout") || *kind == json!("network")) && unsent(&s) == 21
    });

    let _relay = home.start(Some(port));
    wait_converged(&[&da, &db], 21);
    assert_same_records(&da, &db, "Note", 20);
    let n00 = call(&db, "get", json!({ "collection": "Note", "id": "n00" }));
    assert_eq!(n00["fields"], json!({ "i": 0, "done": true }), "{n00}");
}

#[test]
fn a_relay_killed_mid_upload_loses_and_duplicates_nothing() {
    let home = RelayHome::new();
    let mut relay = home.start(None);
    let (a, b) = devices(&relay, small_batches);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();

    let input = a.data_dir.with_file_name("items.jsonl");
    std::fs::write(&input, jsonl(MANY)).expect("write the import file");
    let mut import = a
        .command(&["import", input.to_str().expect("utf-8 path")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferry import");
    wait_mid_upload(&da);
    relay.kill();
    let exit = wait_exit(&mut import, "ferry import to finish");
    assert!(exit.success(), "ferry import: {exit}");

    let _relay = home.start(Some(relay.port));
    assert_many_arrived_once(&da, &db);
    // B had nothing to send when the relay died, so only the restarted relay could tell it that
    // its connection was gone (a stateless reset), rather than its idle timeout.
    let log = call(&db, "log", json!({ "limit": 10000 }));
    let reset = log["entries"].as_array().expect("entries").iter().any(|e| {
        e["status"] == json!("failed")
            && e["error_message"]
                .as_str()
                .is_some_and(|m| m.contains("reset"))
    });
    assert!(reset, "B's SyncLog shows no reset connection: {log}");
}

#[test]
fn a_daemon_killed_mid_upload_loses_and_duplicates_nothing() {
    let home = RelayHome::new();
    let relay = home.start(None);
    let (a, b) = devices(&relay, small_batches);
    // Written with no daemon running: acknowledged and durable, all waiting for the upload.
    let out = a.ferry_with_input(&["import"], jsonl(MANY).as_bytes());
    assert!(out.status.success(), "import: {}", stderr(&out));
    let db = b.start_daemon_logged();

    let mut da = a.start_daemon_logged();
    wait_mid_upload(&da);
    da.kill();
    let da = a.start_daemon_logged();
    assert_many_arrived_once(&da, &db);
}

/// Documents the daemon holds in `collection`.
fn documents(daemon: &Daemon, collection: &str) -> u64 {
    let list = call(daemon, "collections", json!({}));
    list["collections"]
        .as_array()
        .expect("collections")
        .iter()
        .find(|c| c["name"] == json!(collection))
        .map_or(0, |c| count(&c["documents"]))
}

#[test]
fn a_new_device_killed_mid_bootstrap_resumes_from_the_snapshot_and_matches_a_replay() {
    let home = RelayHome::new();
    let relay = home.start(None);
    let (a, b) = devices(&relay, str::to_string);
    let out = a.ferry_with_input(&["import"], jsonl(MANY).as_bytes());
    assert!(out.status.success(), "import: {}", stderr(&out));
    let da = a.start_daemon_logged();
    for i in (0..MANY).step_by(300) {
        call(
            &da,
            "patch",
            json!({ "collection": "Item", "id": format!("item-{i:05}"), "fields": { "seen": true } }),
        );
    }
    let head = MANY + MANY.div_ceil(300);
    // B replays the log; C joins later, in snapshot pages of five records.
    let db = b.start_daemon_logged();
    wait_converged(&[&da, &db], head);
    let c = Device::new();
    c.join(&relay);
    c.edit_config(|config| {
        let default = "\nsnapshot_records = 10000";
        assert!(config.contains(default), "no {default:?} in the config");
        config.replacen(default, "\nsnapshot_records = 5", 1)
    });
    let mut dc = c.start_daemon_logged();
    // Records arrive while the cursor is still 0: only a snapshot page brings them so.
    wait_for("C to be part way through its snapshot", TIMEOUT, || {
        let taken = documents(&dc, "Item");
        taken > 0 && taken < MANY && status(&dc)["sync"]["cursor"] == json!(0)
    });
    dc.kill();
    let dc = c.start_daemon_logged();
    wait_converged(&[&da, &db, &dc], head);
    assert_same_records(&db, &dc, "Item", MANY as usize);
    assert_same_records(&da, &dc, "Item", MANY as usize);
}

#[test]
fn an_automerge_document_made_elsewhere_is_imported_with_its_history_and_syncs() {
    use automerge::transaction::Transactable as _;
    let home = RelayHome::new();
    let relay = home.start(None);
    let (a, b) = devices(&relay, str::to_string);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    // Another program's document: two actors, nested values and text.
    let mut doc =
        automerge::AutoCommit::new().with_actor(automerge::ActorId::from(&[0x51; 16][..]));
    doc.put(automerge::ROOT, "name", "Ada").unwrap();
    let note = doc
        .put_object(automerge::ROOT, "note", automerge::ObjType::Text)
        .unwrap();
    doc.splice_text(&note, 0, 0, "engine").unwrap();
    doc.commit();
    let mut other = doc
        .fork()
        .with_actor(automerge::ActorId::from(&[0x52; 16][..]));
    other.put(automerge::ROOT, "age", 37).unwrap();
    other.commit();
    doc.merge(&mut other).unwrap();
    let file = a.data_dir.with_file_name("ada.automerge");
    std::fs::write(&file, doc.save()).unwrap();
    let file = file.to_str().unwrap();

    let out = a.ferry(&[
        "--json",
        "import",
        "--format",
        "automerge",
        file,
        "--into",
        "Person/ada",
    ]);
    assert!(out.status.success(), "import: {}", stderr(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["changes"], json!(2), "{answer}");
    // Twice is refused: the record exists now.
    let again = a.ferry(&[
        "import",
        "--format",
        "automerge",
        file,
        "--into",
        "Person/ada",
    ]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    wait_converged(&[&da, &db], 2);
    let on_b = call(&db, "get", json!({ "collection": "Person", "id": "ada" }));
    assert_eq!(
        on_b["fields"],
        json!({ "name": "Ada", "note": "engine", "age": 37 })
    );
    assert_eq!(on_b["heads"], answer["heads"]);
    let history = call(
        &db,
        "history",
        json!({ "collection": "Person", "id": "ada" }),
    );
    let writers: Vec<Value> = history["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["device"].clone())
        .collect();
    assert_eq!(writers, [json!("51".repeat(16)), json!("52".repeat(16))]);
}

/// `[collections.User]` with `email` unique, appended to a config.
const UNIQUE_EMAIL: &str = "\n[collections.User]\nunique = [[\"email\"]]\n";

#[test]
fn a_new_device_bootstraps_a_space_with_unique_constraints_and_finds_the_same_clashes() {
    let home = RelayHome::new();
    let relay = Relay::start_with_config(
        &home.dir,
        None,
        &format!(
            "[relay]\nenrolments_per_minute = 10000\nsign_ins_per_minute = 100000\n{UNIQUE_EMAIL}"
        ),
    );
    let with_unique = |config: &str| format!("{config}{UNIQUE_EMAIL}");
    let (a, b) = devices(&relay, with_unique);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    // 30 users over 10 addresses: each address taken three times, so two clashes each.
    for i in 0..30 {
        call(
            &da,
            "put",
            json!({ "collection": "User", "id": format!("u{i:02}"), "fields": { "email": format!("e{}", i % 10) } }),
        );
    }
    // B patches records it must hold first: a patch of a record not there yet is refused.
    wait_converged(&[&da, &db], 30);
    // Some let go of their address: the clashes they were in end.
    for i in 20..25 {
        call(
            &db,
            "patch",
            json!({ "collection": "User", "id": format!("u{i:02}"), "fields": { "email": format!("moved{i}") } }),
        );
    }
    wait_converged(&[&da, &db], 35);
    let c = Device::new();
    c.join(&relay);
    c.edit_config(|config| {
        let default = "\nsnapshot_records = 10000";
        assert!(config.contains(default), "no {default:?} in the config");
        with_unique(&config.replacen(default, "\nsnapshot_records = 4", 1))
    });
    let dc = c.start_daemon_logged();
    wait_converged(&[&da, &db, &dc], 35);
    let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
    assert!(
        log.contains("the relay's unique-value index taken"),
        "C bootstrapped with the relay's index: {log}"
    );
    assert_same_records(&db, &dc, "User", 30);
    let found = all_conflicts(&db);
    assert_json_same(&all_conflicts(&dc), &found, "conflicts on C vs B");
    // New clashes with what the snapshot brought, found alike everywhere: the index C took is
    // the one the log built on A and B.
    call(
        &dc,
        "put",
        json!({ "collection": "User", "id": "late-c", "fields": { "email": "e1" } }),
    );
    call(
        &da,
        "put",
        json!({ "collection": "User", "id": "late-a", "fields": { "email": "moved21" } }),
    );
    wait_converged(&[&da, &db, &dc], 37);
    let found = all_conflicts(&da);
    let open = |conflicts: &Value| {
        conflicts.as_array().map_or(0, |c| {
            c.iter().filter(|c| c["status"] == json!("open")).count()
        })
    };
    // Two clashes per address, five ended by the moves, two new.
    assert_eq!(open(&found), 17, "{found}");
    assert_json_same(&all_conflicts(&db), &found, "conflicts on B vs A");
    assert_json_same(&all_conflicts(&dc), &found, "conflicts on C vs A");
}

/// The highest horizon the relay's log says it compacted a log to.
/// Every conflict entry a device holds, open or settled.
fn all_conflicts(daemon: &Daemon) -> Value {
    call(
        daemon,
        "conflicts.list",
        json!({ "status": "all", "limit": 1000 }),
    )["conflicts"]
        .clone()
}

fn compacted_horizon(relay: &Relay) -> u64 {
    relay
        .log()
        .lines()
        .filter(|line| line.contains("log compacted"))
        .filter_map(|line| {
            let digits: String = line
                .split_once("horizon=")?
                .1
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_device_offline_past_the_horizon_bootstraps_again_and_loses_none_of_its_edits() {
    let home = RelayHome::new();
    // The relay keeps the last 10 entries of a log and compacts every second.
    let relay = Relay::start_with_config(
        &home.dir,
        None,
        "[relay]\nenrolments_per_minute = 10000\nsign_ins_per_minute = 100000\n\
         keep_log_entries = 10\ncompact_interval_secs = 1\n",
    );
    let (a, b) = devices(&relay, str::to_string);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    for i in 0..5 {
        call(
            &da,
            "put",
            json!({ "collection": "Doc", "id": format!("d{i}"), "fields": { "v": 0 } }),
        );
    }
    wait_converged(&[&da, &db], 5);
    let exit = db.terminate();
    assert!(exit.success(), "ferry daemon exited with {exit}");

    // B, offline at cursor 5: an edit A makes too (a conflict), one only B makes, a new record.
    for (verb, address, data) in [
        ("patch", "Doc/d0", r#"{"v": "b-offline"}"#),
        ("patch", "Doc/d1", r#"{"note": "from b"}"#),
        ("put", "Doc/fresh", r#"{"v": "new on b"}"#),
    ] {
        let out = b.ferry(&[verb, address, "--data", data]);
        assert!(out.status.success(), "ferry {verb}: {}", stderr(&out));
    }
    // A goes on: 30 more entries, of which the relay keeps the last 10.
    for round in 1..=6 {
        for i in 0..5 {
            call(
                &da,
                "patch",
                json!({ "collection": "Doc", "id": format!("d{i}"), "fields": { "v": round } }),
            );
        }
    }
    wait_converged(&[&da], 35);
    wait_for("the relay to compact the log to 25", TIMEOUT, || {
        compacted_horizon(&relay) == 25
    });

    // B's cursor lies below the horizon: it takes the relay's documents, keeps its queue,
    // uploads it, and ends where A does.
    let db = b.start_daemon_logged();
    wait_converged(&[&da, &db], 38);
    assert_same_records(&da, &db, "Doc", 6);
    let on_a = |id: &str| call(&da, "get", json!({ "collection": "Doc", "id": id }));
    assert_eq!(on_a("d1")["fields"], json!({ "v": 6, "note": "from b" }));
    assert_eq!(on_a("fresh")["fields"], json!({ "v": "new on b" }));
    // B's edit of d0 met A's six: the same conflict entries, same ids, on both devices.
    let found = all_conflicts(&da);
    assert!(
        found.as_array().is_some_and(|c| !c.is_empty()),
        "B's offline edit of d0 conflicts with A's: {found}"
    );
    assert_json_same(&all_conflicts(&db), &found, "conflicts on B vs A");
    let history = call(&da, "history", json!({ "collection": "Doc", "id": "d0" }));
    assert_eq!(
        history["changes"].as_array().map(Vec::len),
        Some(8),
        "d0's history keeps every change, B's included: {history}"
    );
}

/// A record deleted on A is purged by the relay (`tombstone_days`, here about two seconds) while
/// B, offline, holds an edit to it. B comes back: the record returns as a new history with B's
/// fields, with the same `update_delete` conflict entry on both devices, and nothing else of the
/// old history. Head: two creates, the delete, the purge entry and B's restoration.
#[test]
fn a_purged_records_late_edit_comes_back_on_every_device() {
    let home = RelayHome::new();
    let relay = Relay::start_with_config(
        &home.dir,
        None,
        "[relay]\nenrolments_per_minute = 10000\nsign_ins_per_minute = 100000\n\
         tombstone_days = 0.00002\ncompact_interval_secs = 1\n",
    );
    let (a, b) = devices(&relay, str::to_string);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    for (id, fields) in [("r", json!({ "n": 0 })), ("other", json!({ "n": 1 }))] {
        call(
            &da,
            "put",
            json!({ "collection": "Doc", "id": id, "fields": fields }),
        );
    }
    wait_converged(&[&da, &db], 2);
    let exit = db.terminate();
    assert!(exit.success(), "ferry daemon exited with {exit}");
    let out = b.ferry(&["patch", "Doc/r", "--data", r#"{"late": true}"#]);
    assert!(out.status.success(), "ferry patch: {}", stderr(&out));

    call(&da, "delete", json!({ "collection": "Doc", "id": "r" }));
    wait_for("the relay to purge the deleted record", TIMEOUT, || {
        relay.log().contains("deleted records purged")
    });
    wait_converged(&[&da], 4);

    let db = b.start_daemon_logged();
    wait_converged(&[&da, &db], 5);
    assert_same_records(&da, &db, "Doc", 2);
    let r = call(&da, "get", json!({ "collection": "Doc", "id": "r" }));
    assert_eq!(r["fields"], json!({ "n": 0, "late": true }));
    let found = all_conflicts(&da);
    assert_eq!(
        found
            .as_array()
            .map(|c| c.iter().map(|c| c["kind"].clone()).collect::<Vec<_>>()),
        Some(vec![json!("update_delete")]),
        "{found}"
    );
    assert_json_same(&all_conflicts(&db), &found, "conflicts on B vs A");
    let history = call(&db, "history", json!({ "collection": "Doc", "id": "r" }));
    assert_eq!(
        history["changes"].as_array().map(Vec::len),
        Some(1),
        "the old history is gone; the restoration is the record's one change: {history}"
    );
}

/// `sync.collections` set to `names` in a device's config.
fn syncing(names: &[&str]) -> impl Fn(&str) -> String {
    let line = format!(
        "\ncollections = [{}]",
        names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    move |config: &str| {
        assert!(config.contains("\ncollections = []"), "no sync.collections");
        config.replacen("\ncollections = []", &line, 1)
    }
}

fn ids(daemon: &Daemon, collection: &str) -> Vec<String> {
    records(daemon, collection)
        .iter()
        .map(|r| r["id"].as_str().expect("an id").to_owned())
        .collect()
}

/// Three devices syncing different collections (A every one, B `Invoice`, C `Customer`)
/// converge on what they share, each cursor at the relay's head; C cannot write a collection
/// it does not sync; once C adds `Invoice` to its config it backfills every invoice, with the
/// same history as A's, and applies nothing twice.
#[test]
fn devices_syncing_different_collections_converge_on_what_they_share() {
    let home = RelayHome::new();
    let relay = home.start(None);
    let (a, b, c) = (Device::new(), Device::new(), Device::new());
    for device in [&a, &b, &c] {
        device.join(&relay);
    }
    b.edit_config(syncing(&["Invoice"]));
    c.edit_config(syncing(&["Customer"]));
    let (da, db, dc) = (
        a.start_daemon_logged(),
        b.start_daemon_logged(),
        c.start_daemon_logged(),
    );
    let put = |daemon: &Daemon, collection: &str, id: &str| {
        call(
            daemon,
            "put",
            json!({ "collection": collection, "id": id, "fields": { "by": id } }),
        );
    };
    put(&da, "Customer", "c1");
    put(&da, "Invoice", "i1");
    put(&db, "Invoice", "i2");
    put(&dc, "Customer", "c2");
    wait_converged(&[&da, &db, &dc], 4);
    assert_eq!(ids(&da, "Customer"), ["c1", "c2"]);
    assert_eq!(ids(&da, "Invoice"), ["i1", "i2"]);
    assert_eq!(ids(&db, "Invoice"), ["i1", "i2"]);
    assert_eq!(ids(&db, "Customer"), Vec::<String>::new());
    assert_eq!(ids(&dc, "Customer"), ["c1", "c2"]);
    assert_eq!(ids(&dc, "Invoice"), Vec::<String>::new());
    assert_same_records(&da, &db, "Invoice", 2);
    assert_same_records(&da, &dc, "Customer", 2);
    assert_eq!(status(&dc)["sync"]["collections"], json!(["Customer"]));

    match dc.client().call(
        "put",
        json!({ "collection": "Invoice", "id": "i3", "fields": {} }),
    ) {
        Err(ferry::ipc::ClientError::Api(e)) => {
            assert_eq!(e.code, ferry::service::code::UNKNOWN_COLLECTION, "{e:?}");
            assert!(e.message.contains("sync.collections"), "{}", e.message);
        }
        other => panic!("a write to a collection C does not sync: {other:?}"),
    }

    // C adds Invoice: it reads the log again and gets every invoice, as A holds them.
    let exit = dc.terminate();
    assert!(exit.success(), "ferry daemon exited with {exit}");
    c.edit_config(|config| {
        config.replacen(
            "collections = [\"Customer\"]",
            "collections = [\"Customer\", \"Invoice\"]",
            1,
        )
    });
    let dc = c.start_daemon_logged();
    put(&da, "Invoice", "i3");
    wait_converged(&[&da, &db, &dc], 5);
    assert_same_records(&da, &dc, "Invoice", 3);
    assert_same_records(&da, &dc, "Customer", 2);
    assert_same_records(&da, &db, "Invoice", 3);
    let history = call(
        &dc,
        "history",
        json!({ "collection": "Customer", "id": "c2" }),
    );
    assert_eq!(
        history["changes"].as_array().map(Vec::len),
        Some(1),
        "C's own record is not applied again: {history}"
    );
}

#[test]
fn concurrent_offline_edits_of_one_record_merge() {
    let home = RelayHome::new();
    let mut relay = home.start(None);
    let (a, b) = devices(&relay, str::to_string);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    call(
        &da,
        "put",
        json!({ "collection": "Doc", "id": "shared", "fields": { "title": "draft" } }),
    );
    wait_converged(&[&da, &db], 1);

    relay.kill();
    call(
        &da,
        "patch",
        json!({ "collection": "Doc", "id": "shared", "fields": { "x": 1 } }),
    );
    call(
        &db,
        "patch",
        json!({ "collection": "Doc", "id": "shared", "fields": { "y": 2 } }),
    );

    let _relay = home.start(Some(relay.port));
    wait_converged(&[&da, &db], 3);
    let address = json!({ "collection": "Doc", "id": "shared" });
    let on_a = call(&da, "get", address.clone());
    assert_eq!(
        on_a["fields"],
        json!({ "title": "draft", "x": 1, "y": 2 }),
        "{on_a}"
    );
    // Two concurrent changes: the merged document has both as heads, on both devices.
    assert_eq!(on_a["heads"].as_array().map(Vec::len), Some(2), "{on_a}");
    assert_json_same(&call(&db, "get", address), &on_a, "the record on B vs A");
}

#[test]
fn a_delete_reaches_the_other_device() {
    let home = RelayHome::new();
    let relay = home.start(None);
    let (a, b) = devices(&relay, str::to_string);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    let address = json!({ "collection": "Doc", "id": "gone" });
    call(
        &da,
        "put",
        json!({ "collection": "Doc", "id": "gone", "fields": { "v": 1 } }),
    );
    wait_converged(&[&da, &db], 1);

    call(&db, "delete", address.clone());
    wait_converged(&[&da, &db], 2);
    match da.client().call("get", address.clone()) {
        Err(ferry::ipc::ClientError::Api(e)) => {
            assert_eq!(e.code, ferry::service::code::NOT_FOUND, "{e:?}")
        }
        other => panic!("get of a deleted record on A: {other:?}"),
    }
    assert_eq!(records(&da, "Doc"), Vec::<Value>::new());
    let history = call(&da, "history", address);
    let operations: Vec<_> = history["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["operation"].clone())
        .collect();
    assert_eq!(operations, [json!("create"), json!("delete")], "{history}");
}

/// A device whose daemon cannot sync: the kind of error its status shows, a failed SyncLog entry,
/// and `ferry sync` failing with a message that names the problem.
fn assert_sync_fails(device: &Device, kinds: &[&str], words: &str) {
    let daemon = device.start_daemon_logged();
    let mut last = Value::Null;
    wait_for(&format!("a sync error of kind {kinds:?}"), TIMEOUT, || {
        last = status(&daemon)["sync"]["last_error"].clone();
        kinds.iter().any(|k| last["kind"] == json!(k))
    });
    let log = device.ferry(&["--json", "log"]);
    assert!(log.status.success(), "ferry log: {}", stderr(&log));
    let log: Value = serde_json::from_slice(&log.stdout).expect("ferry log --json is JSON");
    let failed: Vec<_> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["status"] == json!("failed"))
        .collect();
    assert!(
        failed
            .iter()
            .any(|e| kinds.iter().any(|k| e["error_message"]
                .as_str()
                .is_some_and(|m| m.starts_with(k)))),
        "no failed SyncLog entry of kind {kinds:?}: {log}"
    );

    let out = device.ferry(&["sync"]);
    assert!(
        !out.status.success(),
        "ferry sync succeeded: {}",
        stdout(&out)
    );
    let message = stderr(&out);
    assert!(
        message.contains("sync failed") && message.contains(words),
        "ferry sync said: {message}"
    );
}

#[test]
fn sync_errors_are_visible_in_status_log_and_cli() {
    let home = RelayHome::new();
    let relay = home.start(None);

    let wrong_pin = Device::new();
    wrong_pin.set_sync(&relay.addr, &"00".repeat(32));
    assert_sync_fails(&wrong_pin, &["authentication"], "fingerprint");

    // A port nothing listens on: bound once to find a free one, then let go.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let nobody = Device::new();
    nobody.set_sync(&format!("127.0.0.1:{port}"), &relay.fingerprint);
    assert_sync_fails(
        &nobody,
        &["timeout", "network"],
        &format!("127.0.0.1:{port}"),
    );
}

#[test]
fn ferry_sync_reports_and_retries_failed() {
    let home = RelayHome::new();
    let relay = home.start(None);
    let (a, b) = devices(&relay, str::to_string);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    call(
        &da,
        "put",
        json!({ "collection": "Doc", "id": "one", "fields": { "v": 1 } }),
    );

    let out = a.ferry(&["sync"]);
    assert!(out.status.success(), "ferry sync: {}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.starts_with("in sync: uploaded ") && said.contains("of the relay's 1"),
        "{said}"
    );

    wait_converged(&[&da, &db], 1);
    let out = b.ferry(&["--json", "sync", "--retry-failed"]);
    assert!(
        out.status.success(),
        "ferry sync --retry-failed: {}",
        stderr(&out)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(reply["retried"], json!([]), "{reply}");
    assert_eq!(reply["report"]["cursor"], json!(1), "{reply}");
    assert_eq!(reply["report"]["relay_head"], json!(1), "{reply}");
    assert_eq!(reply["status"]["up_to_date"], json!(true), "{reply}");
}

/// `ferry sync pause` stops a device syncing (no upload, no download, and its status says
/// why it is not up to date) until `ferry sync resume`; a remembered pause holds across a
/// restart; nothing written meanwhile is lost.
#[test]
fn a_paused_device_syncs_nothing_until_resumed_and_a_remembered_pause_survives_a_restart() {
    let home = RelayHome::new();
    let relay = home.start(None);
    let (a, b) = devices(&relay, str::to_string);
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    let note = |id: &str| json!({ "collection": "Note", "id": id, "fields": { "by": id } });
    call(&da, "put", note("a0"));
    wait_converged(&[&da, &db], 1);

    let out = a.ferry(&["--json", "sync", "pause", "--remember"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let paused: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(paused, json!({ "paused": true, "remembered": true }));
    let paused_status = |daemon: &Daemon| {
        let s = status(daemon);
        s["sync"]["state"] == json!("paused")
            && s["sync"]["up_to_date"] == json!(false)
            && s["sync"]["reasons"]
                .as_array()
                .is_some_and(|r| r.contains(&json!("paused")))
    };
    wait_for("A to say it is paused", TIMEOUT, || paused_status(&da));
    call(&da, "put", note("a1"));
    call(&db, "put", note("b1"));
    // B's write reaches the relay; A's stays in its queue, and A reads nothing.
    wait_converged(&[&db], 2);
    let s = status(&da);
    assert_eq!(unsent(&s), 1, "{s}");
    assert_eq!(s["sync"]["cursor"], json!(1), "{s}");
    let refused = da.client().call("sync", json!({}));
    assert!(
        matches!(&refused, Err(ferry::ipc::ClientError::Api(e)) if e.message.contains("paused")),
        "{refused:?}"
    );
    let out = a.ferry(&["status"]);
    assert!(stdout(&out).contains("sync is paused"), "{}", stdout(&out));

    // The pause was remembered: a restarted daemon starts paused.
    assert!(da.terminate().success());
    let da = a.start_daemon_logged();
    wait_for("A to start paused", TIMEOUT, || paused_status(&da));
    assert_eq!(unsent(&status(&da)), 1);

    let out = a.ferry(&["sync", "resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_converged(&[&da, &db], 3);
    assert_same_records(&da, &db, "Note", 3);

    // Without a daemon only a remembered pause can be asked for.
    assert!(db.terminate().success());
    let out = b.ferry(&["sync", "pause"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--remember"), "{}", stderr(&out));
    let out = b.ferry(&["sync", "pause", "--remember"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let db = b.start_daemon_logged();
    wait_for("B to start paused", TIMEOUT, || paused_status(&db));
}

/// A collection's `priority` orders uploads: changes to the higher-priority collection reach
/// the relay's log, and so another device, before older changes of a lower one, batch by batch.
#[test]
fn higher_priority_collections_are_uploaded_first() {
    let home = RelayHome::new();
    let relay = home.start(None);
    let (a, b) = devices(&relay, |config| {
        small_batches(config) + "\n[collections.Invoice]\npriority = 10\n"
    });
    let da = a.start_daemon_logged();
    let db = b.start_daemon_logged();
    // A writes while paused, oldest first: 40 notes, then 5 invoices.
    let out = a.ferry(&["sync", "pause"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for i in 0..40 {
        call(
            &da,
            "put",
            json!({ "collection": "Note", "id": format!("n{i:02}"), "fields": { "i": i } }),
        );
    }
    for i in 0..5 {
        call(
            &da,
            "put",
            json!({ "collection": "Invoice", "id": format!("i{i}"), "fields": { "i": i } }),
        );
    }
    let queue = call(&da, "queue", json!({ "status": "pending", "limit": 100 }));
    let priorities: Vec<_> = queue["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| (e["model_name"].clone(), e["priority"].clone()))
        .collect();
    assert!(
        priorities.contains(&(json!("Invoice"), json!(10))),
        "{queue}"
    );
    assert!(priorities.contains(&(json!("Note"), json!(0))), "{queue}");

    // B hears of the changes in the relay's log order.
    let mut watcher = db.client();
    watcher
        .call("subscribe", json!({}))
        .expect("subscribe on B");
    let out = a.ferry(&["sync", "resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_converged(&[&da, &db], 45);
    let order: Vec<String> = (0..45)
        .map(|_| {
            let note = watcher.next_notification().expect("a change on B");
            note["params"]["collection"]
                .as_str()
                .expect("collection")
                .to_owned()
        })
        .collect();
    assert_eq!(
        order[..5],
        ["Invoice"; 5],
        "the invoices reach the log first: {order:?}"
    );
    assert!(order[5..].iter().all(|c| c == "Note"), "{order:?}");
}
