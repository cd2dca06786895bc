//! Every conflict kind under every strategy, end to end: two real `ferry daemon` processes sync
//! through a real `ferry relay` over QUIC on loopback. Both devices first hold the same record;
//! then each changes it with its daemon stopped (the CLI writes to the store directly, so the two
//! changes are concurrent), and device A syncs before device B starts, so the relay logs A's side
//! first (the `server` side) and B's second (the `client` side), and B's change is the later one.
//! Each test then checks, on both devices, the record its strategy promises and identical conflict
//! entries; queued conflicts are resolved on one device and must end resolved on both, and two
//! devices resolving one conflict differently while offline must agree on one resolution.
//!
//! The relay is shared by the tests that run at the same time; each test syncs in a space of its
//! own, so the relay's head in that space counts exactly the test's changes.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Daemon, Device, Relay, assert_json_same, call, status, unsent, wait_converged};
use ferry::ipc::ClientError;
use ferry::service::code;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex, PoisonError, Weak};

const COLLECTION: &str = "Customer";

/// A relay process and the directory it keeps its data in, removed once the relay is killed.
struct SharedRelay {
    relay: Relay,
    _home: tempfile::TempDir,
}

/// The relay of the tests running now. It is dropped (killed) with the last test holding it, so
/// no relay outlives the test binary; a test starting after that starts a fresh one.
static RELAY: Mutex<Weak<SharedRelay>> = Mutex::new(Weak::new());

fn shared_relay() -> Arc<SharedRelay> {
    let mut slot = RELAY.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(relay) = slot.upgrade() {
        return relay;
    }
    let home = tempfile::tempdir().expect("temp dir");
    let relay = Arc::new(SharedRelay {
        relay: Relay::start(&home.path().join("relay"), None),
        _home: home,
    });
    *slot = Arc::downgrade(&relay);
    relay
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the config has no {from:?}");
    text.replacen(from, to, 1)
}

/// Which device's offline changes the relay logs first.
#[derive(Clone, Copy)]
enum First {
    A,
    B,
}

/// Two devices syncing in a space of their own, with `Customer` configured by `settings`.
struct Scenario {
    a: Device,
    b: Device,
    relay: Arc<SharedRelay>,
}

impl Scenario {
    fn new(space: &str, settings: &str) -> Scenario {
        let scenario = Scenario {
            a: Device::new(),
            b: Device::new(),
            relay: shared_relay(),
        };
        for device in [&scenario.a, &scenario.b] {
            device.join_account(&scenario.relay.relay, space);
            device.edit_config(|text| format!("{text}\n[collections.{COLLECTION}]\n{settings}\n"));
        }
        scenario
    }

    /// A writes `records`, both devices sync them, and both daemons stop.
    fn share(&self, records: &[(&str, Value)]) {
        let da = self.a.start_daemon_logged();
        let db = self.b.start_daemon_logged();
        for (id, fields) in records {
            call(
                &da,
                "put",
                json!({ "collection": COLLECTION, "id": id, "fields": fields }),
            );
        }
        wait_converged(&[&da, &db], records.len() as u64);
        stop(da);
        stop(db);
    }

    /// Starts the `first` device's daemon and waits until the relay has logged its offline
    /// changes and it holds the log through `first_head`; only then starts the other's, and
    /// waits until both hold the log through `head`. So the first device's side of every
    /// conflict is the one the relay logged first. Returns A's daemon, then B's.
    fn sync(&self, first: First, first_head: u64, head: u64) -> (Daemon, Daemon) {
        let (one, other) = match first {
            First::A => (&self.a, &self.b),
            First::B => (&self.b, &self.a),
        };
        let d_one = one.start_daemon_logged();
        wait_converged(&[&d_one], first_head);
        let d_other = other.start_daemon_logged();
        wait_converged(&[&d_one, &d_other], head);
        match first {
            First::A => (d_one, d_other),
            First::B => (d_other, d_one),
        }
    }

    /// Runs `with` against `device`'s daemon started with no relay configured, so the `changes`
    /// it writes wait in the queue; the daemon stops afterwards and the device is pointed back
    /// at the relay.
    fn offline(&self, device: &Device, changes: u64, with: impl FnOnce(&Daemon)) {
        let (online, offline) = ("\nenabled = true", "\nenabled = false");
        device.edit_config(|text| replace_once(text, online, offline));
        let daemon = device.start_daemon_logged();
        with(&daemon);
        let seen = status(&daemon);
        assert_eq!(
            unsent(&seen),
            changes,
            "the changes wait to be uploaded: {seen}"
        );
        stop(daemon);
        device.edit_config(|text| replace_once(text, offline, online));
    }
}

fn stop(daemon: Daemon) {
    let exit = daemon.terminate();
    assert!(exit.success(), "ferry daemon exited with {exit}");
}

/// Runs a `ferry` data command on a device whose daemon is stopped: the CLI opens the store
/// itself, and the change waits in the device's queue.
fn offline_cli(device: &Device, args: &[&str]) {
    let out = device.ferry(args);
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        common::stderr(&out)
    );
}

/// The record as `get` gives it, or `None` when it does not exist or is deleted.
fn record(daemon: &Daemon, id: &str) -> Option<Value> {
    let params = json!({ "collection": COLLECTION, "id": id });
    match daemon.client().call("get", params) {
        Ok(record) => Some(record),
        Err(ClientError::Api(e)) if e.code == code::NOT_FOUND => None,
        Err(e) => panic!("get {id}: {e}"),
    }
}

/// The record on both devices, which must be the same (fields, heads and conflict flags); `None`
/// when it is deleted on both.
fn agreed_record(a: &Daemon, b: &Daemon, id: &str) -> Option<Value> {
    let on_a = record(a, id);
    let on_b = record(b, id);
    assert_json_same(
        &on_b.clone().unwrap_or(Value::Null),
        &on_a.clone().unwrap_or(Value::Null),
        &format!("record {id} on B vs A"),
    );
    on_a
}

/// The fields both devices show for `id`, `None` when it is deleted on both.
fn agreed_fields(a: &Daemon, b: &Daemon, id: &str) -> Option<Value> {
    agreed_record(a, b, id).map(|r| r["fields"].clone())
}

/// Every conflict entry a device holds, of any status.
fn conflicts(daemon: &Daemon) -> Vec<Value> {
    let page = call(
        daemon,
        "conflicts.list",
        json!({ "status": "all", "limit": 1000 }),
    );
    assert_eq!(page["next"], Value::Null, "{page}");
    page["conflicts"].as_array().expect("conflicts").clone()
}

/// The one conflict entry both devices hold, which must be the same on both, with the same
/// open count and counters in `status`.
fn agreed_conflict(a: &Daemon, b: &Daemon) -> Value {
    let on_a = conflicts(a);
    assert_json_same(
        &Value::Array(conflicts(b)),
        &Value::Array(on_a.clone()),
        "conflicts on B vs A",
    );
    assert_json_same(
        &status(b)["conflicts"],
        &status(a)["conflicts"],
        "status.conflicts on B vs A",
    );
    assert_eq!(on_a.len(), 1, "one conflict: {on_a:?}");
    on_a.into_iter().next().expect("one conflict")
}

fn device_id(daemon: &Daemon) -> Value {
    status(daemon)["device_id"].clone()
}

/// The top-level field names a conflict lists.
fn field_names(conflict: &Value) -> Vec<Value> {
    conflict["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .map(|f| {
            let path = f["path"].as_array().expect("path");
            assert_eq!(path.len(), 1, "a top-level field: {f}");
            path[0].clone()
        })
        .collect()
}

/// Checks the parts of a conflict every scenario pins down: kind, status, winner, the record,
/// which device's change is which side, B's change being the relay's third entry, and which
/// queue entries name the conflict.
fn assert_conflict(
    conflict: &Value,
    (kind, status, winner): (&str, &str, Value),
    (da, db): (&Daemon, &Daemon),
) {
    assert_eq!(conflict["kind"], json!(kind), "{conflict}");
    assert_eq!(conflict["status"], json!(status), "{conflict}");
    assert_eq!(conflict["winner"], winner, "{conflict}");
    assert_eq!(conflict["collection"], json!(COLLECTION), "{conflict}");
    assert_eq!(conflict["server"]["device"], device_id(da), "{conflict}");
    assert_eq!(conflict["client"]["device"], device_id(db), "{conflict}");
    assert_eq!(conflict["seq"], json!(3), "{conflict}");
    assert!(
        conflict["client"]["time"].as_i64() > conflict["server"]["time"].as_i64(),
        "B wrote after A: {conflict}"
    );
    assert_eq!(conflict["resolution"], Value::Null, "{conflict}");
    // For a unique clash too, the change that gave the later record the value names it.
    assert_eq!(queued_conflicts(db), [conflict["id"].clone()], "B's change");
    assert_eq!(
        queued_conflicts(da),
        [Value::Null, Value::Null],
        "A's changes"
    );
}

/// The conflict each of the device's queue entries brought, oldest entry first.
fn queued_conflicts(daemon: &Daemon) -> Vec<Value> {
    let queue = call(daemon, "queue", json!({ "limit": 100 }));
    queue["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["conflict"].clone())
        .collect()
}

/// Resolves `conflict` on `daemon` taking `take` (with `data` for a merge); the reply shows it
/// resolving on this device until the relay logs the resolution back.
fn resolve(daemon: &Daemon, conflict: &Value, take: &str, data: Option<Value>) {
    let mut params = json!({ "id": conflict["id"], "take": take });
    if let Some(data) = data {
        params["data"] = data;
    }
    let reply = call(daemon, "conflicts.resolve", params);
    assert_eq!(reply["conflict"]["status"], json!("open"), "{reply}");
    assert_eq!(
        reply["conflict"]["resolving"]["take"],
        json!(take),
        "{reply}"
    );
}

/// Resolving `conflict` on `daemon` is refused as settled, and changes nothing.
fn assert_settled(daemon: &Daemon, conflict: &Value) {
    let before = conflicts(daemon);
    let params = json!({ "id": conflict["id"], "take": "client" });
    match daemon.client().call("conflicts.resolve", params) {
        Err(ClientError::Api(e)) => assert_eq!(e.code, code::CONFLICT_SETTLED, "{e:?}"),
        other => panic!("resolving a settled conflict: {other:?}"),
    }
    assert_json_same(
        &Value::Array(conflicts(daemon)),
        &Value::Array(before),
        "after a refused resolve",
    );
}

/// Checks the conflict ended resolved on both devices by `resolver` taking `take`, with no other
/// conflict found on the way, and nothing open or flagged any more.
fn assert_resolved(da: &Daemon, db: &Daemon, before: &Value, take: &str, resolver: &Daemon) {
    for daemon in [da, db] {
        assert_settled(daemon, before);
        let open = call(daemon, "conflicts.list", json!({}));
        assert_eq!(open["conflicts"], json!([]), "nothing open: {open}");
    }
    let after = agreed_conflict(da, db);
    assert_eq!(after["id"], before["id"], "{after}");
    assert_eq!(after["status"], json!("resolved"), "{after}");
    assert_eq!(after["resolution"]["take"], json!(take), "{after}");
    assert_eq!(
        after["resolution"]["device"],
        device_id(resolver),
        "{after}"
    );
    assert_eq!(after["resolving"], Value::Null, "{after}");
    assert_eq!(status(da)["conflicts"]["open"], json!(0));
    for id in ["c1", "a", "b"] {
        if let Some(r) = agreed_record(da, db, id) {
            assert_eq!(r["conflicts"], json!([]), "{r}");
        }
    }
}

/// Both devices hold `c1` = {name: Ada, city: Oslo}; offline, A runs the `ferry` command `on_a`
/// and then B runs `on_b`; A syncs first, then B.
fn concurrent(
    space: &str,
    settings: &str,
    on_a: &[&str],
    on_b: &[&str],
) -> (Scenario, Daemon, Daemon) {
    let s = Scenario::new(space, settings);
    s.share(&[("c1", json!({ "name": "Ada", "city": "Oslo" }))]);
    offline_cli(&s.a, on_a);
    offline_cli(&s.b, on_b);
    let (da, db) = s.sync(First::A, 2, 3);
    (s, da, db)
}

fn strategy(name: &str) -> String {
    format!("strategy = \"{name}\"")
}

/// A sets a new name and city, B a new name and a tier.
fn update_update(space: &str, name: &str) -> (Scenario, Daemon, Daemon) {
    concurrent(
        space,
        &strategy(name),
        &[
            "patch",
            "Customer/c1",
            "--data",
            r#"{"name": "Ada A", "city": "Bergen"}"#,
        ],
        &[
            "patch",
            "Customer/c1",
            "--data",
            r#"{"name": "Ada B", "tier": 2}"#,
        ],
    )
}

/// A deletes `c1`, B adds a tier.
fn update_delete(space: &str, name: &str) -> (Scenario, Daemon, Daemon) {
    concurrent(
        space,
        &strategy(name),
        &["rm", "Customer/c1"],
        &["patch", "Customer/c1", "--data", r#"{"tier": 3}"#],
    )
}

/// A adds a tier, B deletes `c1`.
fn delete_update(space: &str, name: &str) -> (Scenario, Daemon, Daemon) {
    concurrent(
        space,
        &strategy(name),
        &["patch", "Customer/c1", "--data", r#"{"tier": 3}"#],
        &["rm", "Customer/c1"],
    )
}

/// A creates `a` and B creates `b`, with the same email, which is unique.
fn unique(space: &str, name: &str) -> (Scenario, Daemon, Daemon) {
    concurrent(
        space,
        &format!("{}\nunique = [[\"email\"]]", strategy(name)),
        &[
            "put",
            "Customer/a",
            "--data",
            r#"{"email": "x@example.com", "name": "A"}"#,
        ],
        &[
            "put",
            "Customer/b",
            "--data",
            r#"{"email": "x@example.com", "name": "B"}"#,
        ],
    )
}

/// A unique clash is queued under every strategy: both records are kept, and only the later
/// one (B's) is flagged.
fn assert_unique_clash(da: &Daemon, db: &Daemon, strategy: &str) -> Value {
    let conflict = agreed_conflict(da, db);
    assert_conflict(&conflict, ("unique", "open", Value::Null), (da, db));
    assert_eq!(conflict["strategy"], json!(strategy), "{conflict}");
    assert_eq!(conflict["record"], json!("b"), "{conflict}");
    assert_eq!(conflict["server"]["record"], json!("a"), "{conflict}");
    assert_eq!(conflict["client"]["record"], json!("b"), "{conflict}");
    assert_eq!(
        conflict["unique"],
        json!({ "fields": ["email"], "value": ["x@example.com"] }),
        "{conflict}"
    );
    let a = agreed_record(da, db, "a").expect("a is kept");
    let b = agreed_record(da, db, "b").expect("b is kept");
    assert_eq!(
        a["fields"],
        json!({ "email": "x@example.com", "name": "A" })
    );
    assert_eq!(a["conflicts"], json!([]), "{a}");
    assert_eq!(
        b["fields"],
        json!({ "email": "x@example.com", "name": "B" })
    );
    assert_eq!(b["conflicts"], json!([conflict["id"]]), "{b}");
    assert_eq!(status(da)["conflicts"]["open"], json!(1));
    conflict
}

#[test]
fn update_update_under_merge_keeps_both_fields_and_the_later_name() {
    let (_s, da, db) = update_update("uu-merge", "merge");
    assert_eq!(
        agreed_fields(&da, &db, "c1"),
        Some(json!({ "name": "Ada B", "city": "Bergen", "tier": 2 }))
    );
    let c = agreed_conflict(&da, &db);
    assert_conflict(
        &c,
        ("update_update", "auto_resolved", json!("client")),
        (&da, &db),
    );
    assert_eq!(
        c["fields"],
        json!([{ "path": ["name"], "server": "Ada A", "client": "Ada B", "winner": "client" }]),
        "only the name was written by both"
    );
    assert_settled(&da, &c);
    assert_settled(&db, &c);
}

#[test]
fn update_update_under_lww_shows_the_later_writer_whole() {
    let (_s, da, db) = update_update("uu-lww", "lww");
    assert_eq!(
        agreed_fields(&da, &db, "c1"),
        Some(json!({ "name": "Ada B", "city": "Oslo", "tier": 2 })),
        "B wrote last: A's city is overwritten"
    );
    let c = agreed_conflict(&da, &db);
    assert_conflict(
        &c,
        ("update_update", "auto_resolved", json!("client")),
        (&da, &db),
    );
    assert_eq!(
        field_names(&c),
        [json!("city"), json!("name"), json!("tier")]
    );
    assert_write_on_top_keeps(
        (&da, &db),
        json!({ "name": "Ada B", "city": "Oslo", "tier": 5 }),
        "A's overwritten city does not come back",
    );
}

/// A's write on top of a settled conflict (`tier` = 5) builds on what the record shows, giving
/// `expected` on both devices, and brings no new conflict.
fn assert_write_on_top_keeps((da, db): (&Daemon, &Daemon), expected: Value, why: &str) {
    let before = agreed_conflict(da, db);
    call(
        da,
        "patch",
        json!({ "collection": COLLECTION, "id": "c1", "fields": { "tier": 5 } }),
    );
    wait_converged(&[da, db], 4);
    assert_eq!(agreed_fields(da, db, "c1"), Some(expected), "{why}");
    assert_json_same(
        &agreed_conflict(da, db),
        &before,
        "the conflict after a write",
    );
}

#[test]
fn update_update_under_manual_waits_and_a_resolution_reaches_both() {
    let (_s, da, db) = update_update("uu-manual", "manual");
    let c = agreed_conflict(&da, &db);
    assert_conflict(&c, ("update_update", "open", Value::Null), (&da, &db));
    let c1 = agreed_record(&da, &db, "c1").expect("c1");
    assert_eq!(
        c1["fields"],
        json!({ "name": "Ada B", "city": "Bergen", "tier": 2 }),
        "meanwhile shown as merge would"
    );
    assert_eq!(c1["conflicts"], json!([c["id"]]), "{c1}");
    let open = call(&da, "conflicts.list", json!({}));
    assert_eq!(open["conflicts"], json!([c]), "listed as open by default");

    resolve(&db, &c, "server", None);
    wait_converged(&[&da, &db], 4);
    assert_resolved(&da, &db, &c, "server", &db);
    assert_eq!(
        agreed_fields(&da, &db, "c1"),
        Some(json!({ "name": "Ada A", "city": "Bergen", "tier": 2 })),
        "the relay's name; the fields only one side wrote stay"
    );
}

#[test]
fn update_delete_under_merge_keeps_the_update() {
    let (_s, da, db) = update_delete("ud-merge", "merge");
    assert_eq!(
        agreed_fields(&da, &db, "c1"),
        Some(json!({ "name": "Ada", "city": "Oslo", "tier": 3 }))
    );
    let c = agreed_conflict(&da, &db);
    assert_conflict(
        &c,
        ("update_delete", "auto_resolved", json!("client")),
        (&da, &db),
    );
    assert_eq!(c["server"]["deleted"], json!(true), "{c}");
    assert_eq!(c["client"]["deleted"], json!(false), "{c}");
    assert_write_on_top_keeps(
        (&da, &db),
        json!({ "name": "Ada", "city": "Oslo", "tier": 5 }),
        "A's own delete does not come back",
    );
}

#[test]
fn update_delete_under_lww_takes_the_later_update() {
    let (_s, da, db) = update_delete("ud-lww", "lww");
    assert_eq!(
        agreed_fields(&da, &db, "c1"),
        Some(json!({ "name": "Ada", "city": "Oslo", "tier": 3 })),
        "B's update came after A's delete"
    );
    let c = agreed_conflict(&da, &db);
    assert_conflict(
        &c,
        ("update_delete", "auto_resolved", json!("client")),
        (&da, &db),
    );
}

#[test]
fn update_delete_under_manual_waits_and_a_resolution_deletes_on_both() {
    let (_s, da, db) = update_delete("ud-manual", "manual");
    let c = agreed_conflict(&da, &db);
    assert_conflict(&c, ("update_delete", "open", Value::Null), (&da, &db));
    let c1 = agreed_record(&da, &db, "c1").expect("the update is shown meanwhile");
    assert_eq!(
        c1["fields"],
        json!({ "name": "Ada", "city": "Oslo", "tier": 3 })
    );
    assert_eq!(c1["conflicts"], json!([c["id"]]), "{c1}");

    resolve(&da, &c, "server", None);
    wait_converged(&[&da, &db], 4);
    assert_resolved(&da, &db, &c, "server", &da);
    assert_eq!(
        agreed_fields(&da, &db, "c1"),
        None,
        "the relay's version was A's delete"
    );
}

#[test]
fn delete_update_under_merge_keeps_the_update() {
    let (_s, da, db) = delete_update("du-merge", "merge");
    assert_eq!(
        agreed_fields(&da, &db, "c1"),
        Some(json!({ "name": "Ada", "city": "Oslo", "tier": 3 }))
    );
    let c = agreed_conflict(&da, &db);
    assert_conflict(
        &c,
        ("delete_update", "auto_resolved", json!("server")),
        (&da, &db),
    );
    assert_eq!(c["client"]["deleted"], json!(true), "{c}");
}

#[test]
fn delete_update_under_lww_takes_the_later_delete() {
    let (_s, da, db) = delete_update("du-lww", "lww");
    assert_eq!(agreed_fields(&da, &db, "c1"), None, "B's delete came last");
    let c = agreed_conflict(&da, &db);
    assert_conflict(
        &c,
        ("delete_update", "auto_resolved", json!("client")),
        (&da, &db),
    );
}

#[test]
fn delete_update_under_manual_waits_and_a_resolution_deletes_on_both() {
    let (_s, da, db) = delete_update("du-manual", "manual");
    let c = agreed_conflict(&da, &db);
    assert_conflict(&c, ("delete_update", "open", Value::Null), (&da, &db));
    let c1 = agreed_record(&da, &db, "c1").expect("the update is shown meanwhile");
    assert_eq!(
        c1["fields"],
        json!({ "name": "Ada", "city": "Oslo", "tier": 3 })
    );

    resolve(&db, &c, "client", None);
    wait_converged(&[&da, &db], 4);
    assert_resolved(&da, &db, &c, "client", &db);
    assert_eq!(agreed_fields(&da, &db, "c1"), None, "B's delete was taken");
}

#[test]
fn unique_under_merge_is_queued_and_taking_the_server_deletes_the_later_record() {
    let (_s, da, db) = unique("unique-merge", "merge");
    let c = assert_unique_clash(&da, &db, "merge");
    resolve(&da, &c, "server", None);
    // The resolution writes both records: the one kept and the one deleted.
    wait_converged(&[&da, &db], 5);
    assert_resolved(&da, &db, &c, "server", &da);
    assert_eq!(
        agreed_fields(&da, &db, "a"),
        Some(json!({ "email": "x@example.com", "name": "A" }))
    );
    assert_eq!(agreed_fields(&da, &db, "b"), None);
}

#[test]
fn unique_under_lww_is_queued_and_taking_the_client_deletes_the_first_record() {
    let (_s, da, db) = unique("unique-lww", "lww");
    let c = assert_unique_clash(&da, &db, "lww");
    resolve(&db, &c, "client", None);
    wait_converged(&[&da, &db], 5);
    assert_resolved(&da, &db, &c, "client", &db);
    assert_eq!(agreed_fields(&da, &db, "a"), None);
    assert_eq!(
        agreed_fields(&da, &db, "b"),
        Some(json!({ "email": "x@example.com", "name": "B" }))
    );
}

#[test]
fn unique_under_manual_is_queued_and_a_merge_keeps_one_record_of_both() {
    let (_s, da, db) = unique("unique-manual", "manual");
    let c = assert_unique_clash(&da, &db, "manual");
    let merged = json!({ "email": "x@example.com", "name": "A and B" });
    resolve(&db, &c, "merge", Some(merged.clone()));
    wait_converged(&[&da, &db], 5);
    assert_resolved(&da, &db, &c, "merge", &db);
    assert_eq!(agreed_fields(&da, &db, "a"), Some(merged));
    assert_eq!(agreed_fields(&da, &db, "b"), None);
}

/// Both devices resolve `c` offline and differently, A taking `a_take` and then B `b_take`, so B's
/// is the later resolution; each resolution writes `changes` changes, to a log of `head`
/// entries. Then they sync, `first` uploading first; the conflict must end resolved by B's
/// resolution on both devices, with no other conflict found.
fn resolve_on_both_offline(
    s: &Scenario,
    (da, db): (Daemon, Daemon),
    c: &Value,
    (a_take, b_take): (&str, &str),
    (changes, head): (u64, u64),
    first: First,
) -> (Daemon, Daemon) {
    let b_id = device_id(&db);
    stop(da);
    stop(db);
    s.offline(&s.a, changes, |d| resolve(d, c, a_take, None));
    s.offline(&s.b, changes, |d| resolve(d, c, b_take, None));
    let (da, db) = s.sync(first, head + changes, head + 2 * changes);
    let after = agreed_conflict(&da, &db);
    assert_eq!(after["id"], c["id"]);
    assert_eq!(after["status"], json!("resolved"), "{after}");
    assert_eq!(after["resolution"]["take"], json!(b_take), "{after}");
    assert_eq!(after["resolution"]["device"], b_id, "{after}");
    assert_eq!(status(&da)["conflicts"]["open"], json!(0));
    (da, db)
}

fn concurrent_resolutions_of_one_update_conflict(space: &str, first: First) {
    let (s, da, db) = update_update(space, "manual");
    let c = agreed_conflict(&da, &db);
    assert_eq!(c["status"], json!("open"), "{c}");
    let (da, db) = resolve_on_both_offline(&s, (da, db), &c, ("client", "server"), (1, 3), first);
    let c1 = agreed_record(&da, &db, "c1").expect("c1");
    assert_eq!(
        c1["fields"],
        json!({ "name": "Ada A", "city": "Bergen", "tier": 2 }),
        "B's resolution, taking the relay's name"
    );
    assert_eq!(c1["conflicts"], json!([]), "{c1}");

    // The record goes on normally, with no new conflict.
    call(
        &da,
        "patch",
        json!({ "collection": COLLECTION, "id": "c1", "fields": { "tier": 5 } }),
    );
    wait_converged(&[&da, &db], 6);
    assert_eq!(
        agreed_fields(&da, &db, "c1"),
        Some(json!({ "name": "Ada A", "city": "Bergen", "tier": 5 }))
    );
    assert_eq!(agreed_conflict(&da, &db)["id"], c["id"]);
}

#[test]
fn concurrent_resolutions_of_one_conflict_converge_on_the_later_one() {
    concurrent_resolutions_of_one_update_conflict("resolve-twice", First::A);
}

#[test]
fn concurrent_resolutions_converge_on_the_later_one_whichever_the_relay_logs_first() {
    concurrent_resolutions_of_one_update_conflict("resolve-twice-reversed", First::B);
}

fn concurrent_resolutions_of_a_unique_clash(space: &str, first: First) {
    let (s, da, db) = unique(space, "manual");
    let c = assert_unique_clash(&da, &db, "manual");
    // A keeps `a` and deletes `b`; B, later, keeps `b` and deletes `a`: two changes each.
    let (da, db) = resolve_on_both_offline(&s, (da, db), &c, ("server", "client"), (2, 3), first);
    assert_eq!(
        agreed_fields(&da, &db, "a"),
        None,
        "B's resolution deletes a"
    );
    let b = agreed_record(&da, &db, "b").expect("B's resolution keeps b");
    assert_eq!(
        b["fields"],
        json!({ "email": "x@example.com", "name": "B" })
    );
    assert_eq!(b["conflicts"], json!([]), "{b}");
}

#[test]
fn concurrent_resolutions_of_a_unique_clash_converge_on_the_later_one() {
    concurrent_resolutions_of_a_unique_clash("unique-resolve-twice", First::A);
}

#[test]
fn concurrent_resolutions_of_a_unique_clash_converge_whichever_the_relay_logs_first() {
    concurrent_resolutions_of_a_unique_clash("unique-resolve-twice-reversed", First::B);
}

#[test]
fn a_unique_clash_ends_on_both_devices_when_the_later_record_changes_its_value() {
    let (_s, da, db) = unique("unique-edit", "lww");
    let c = assert_unique_clash(&da, &db, "lww");
    call(
        &db,
        "patch",
        json!({ "collection": COLLECTION, "id": "b", "fields": { "email": "y@example.com" } }),
    );
    wait_converged(&[&da, &db], 4);
    let after = agreed_conflict(&da, &db);
    assert_eq!(after["id"], c["id"]);
    assert_eq!(after["status"], json!("resolved"), "{after}");
    assert_eq!(
        after["resolution"]["take"],
        Value::Null,
        "ended by an edit: {after}"
    );
    assert_eq!(status(&da)["conflicts"]["open"], json!(0));
    let b = agreed_record(&da, &db, "b").expect("b");
    assert_eq!(
        b["fields"],
        json!({ "email": "y@example.com", "name": "B" })
    );
    assert_eq!(b["conflicts"], json!([]), "{b}");
    assert_settled(&db, &c);
}

#[test]
fn the_same_two_records_clashing_again_after_a_resolution_are_queued_again() {
    let (_s, da, db) = unique("unique-again", "merge");
    let first = assert_unique_clash(&da, &db, "merge");
    resolve(&da, &first, "server", None);
    wait_converged(&[&da, &db], 5);
    assert_resolved(&da, &db, &first, "server", &da);

    // B writes `b` again with the email `a` holds: the constraint is broken once more, so a
    // clash must be open and flag `b`, whatever became of the first one.
    call(
        &db,
        "put",
        json!({ "collection": COLLECTION, "id": "b", "fields": { "email": "x@example.com" } }),
    );
    wait_converged(&[&da, &db], 6);
    let b = agreed_record(&da, &db, "b").expect("b is back");
    assert_eq!(status(&da)["conflicts"]["open"], json!(1), "{b}");
    assert_eq!(b["conflicts"].as_array().map(Vec::len), Some(1), "{b}");
    let all = conflicts(&da);
    assert_eq!(all.len(), 2, "the first clash and the new one: {all:?}");
}
