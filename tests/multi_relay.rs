//! Devices that know several relays sharing one PostgreSQL database (real `ferry relay` and
//! `ferry daemon` processes on a private server): a device registered with two relays fails over
//! when its relay is SIGKILLed, keeps syncing both ways, says in `status` which relay it uses,
//! and tries that one first when it starts again. Three relays and four devices spread over
//! them: writes, offline edits bringing conflicts of every kind, deletes, one relay SIGKILLed
//! and started again during uploads and the database restarted during sync; every device ends
//! with the same records and the same conflict entries (same ids), a resolution made on one
//! reaches all, and a device revoked through one relay is refused by every relay. Beneath the
//! processes: three devices appending concurrently through three relay stores, each with its
//! own engine on one database, in random batches and routes, keep one gapless, causally closed
//! log holding every change acknowledged.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;
mod relay_fixtures;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::postgres::{Database, PgServer};
use common::{
    Daemon, Device, Relay, assert_json_same, call, device_key, docs, put_doc, status, stderr,
    stdout, wait_converged,
};
use ferry::record::Record;
use ferry::relay::store::{RelayStore, RelayStoreOptions};
use ferry_proto::session::device_id;
use ferry_proto::wire::{ChangeOutcome, ErrorCode, UploadChange};
use proptest::prelude::*;
use relay_fixtures::{SPACE, actor, dev, upload};
use serde_json::{Value, json};

/// `count` `ferry relay` processes serving `config`, each with its own data directory under
/// `tmp`.
fn start_relays(config: &str, tmp: &std::path::Path, count: usize) -> Vec<Relay> {
    (0..count)
        .map(|i| Relay::start_with_config(&tmp.join(format!("relay{i}")), None, config))
        .collect()
}

/// Starts `relay` again where its devices look for it, after a SIGKILL.
fn restart(relay: &mut Relay, config: &str) {
    relay.kill();
    *relay = Relay::start_with_config(&relay.data_dir.clone(), Some(relay.port), config);
}

fn stop(daemon: Daemon) {
    let exit = daemon.terminate();
    assert!(exit.success(), "ferry daemon exited with {exit}");
}

/// The relay a device's status says it uses, and the address it reached it at.
fn relay_in_use(daemon: &Daemon) -> (Value, Value) {
    let sync = status(daemon)["sync"].clone();
    (sync["relay"].clone(), sync["relay_addr"].clone())
}

#[test]
fn a_device_registered_with_two_relays_fails_over_when_its_relay_is_killed() {
    let db = Database::new();
    let config = db.relay_config();
    let tmp = tempfile::tempdir().unwrap();
    let mut relays = start_relays(&config, tmp.path(), 2);
    let fingerprint = relays[0].fingerprint.clone();
    let addrs = [relays[0].addr.clone(), relays[1].addr.clone()];
    let (moving, other) = (Device::new(), Device::new());
    // No relay in the config: the device syncs with the relays it registered with.
    moving.set_sync("", &fingerprint);
    let code = relays[0].operator().enrol("default");
    let out = moving.ferry(&[
        "--json",
        "register",
        "--relay",
        &addrs[0],
        "--relay",
        &addrs[1],
        "--fingerprint",
        &fingerprint,
        "--code",
        &code,
    ]);
    assert!(out.status.success(), "ferry register: {}", stderr(&out));
    let registered: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(registered["relays"], json!(addrs), "{registered}");
    other.join(&relays[1]);

    let (dm, dother) = (moving.start_daemon_logged(), other.start_daemon_logged());
    put_doc(&dother, "first", json!({ "n": 1 }));
    wait_converged(&[&dm, &dother], 1);
    let sync = status(&dm)["sync"].clone();
    assert_eq!(sync["relays"], json!(addrs), "{sync}");
    assert_eq!(
        relay_in_use(&dm),
        (json!(addrs[0]), json!(addrs[0])),
        "{sync}"
    );

    relays[0].kill();
    // Reaches the moving device only through the other relay, once it has failed over.
    put_doc(&dother, "while-down", json!({ "n": 2 }));
    wait_converged(&[&dm, &dother], 2);
    assert_eq!(relay_in_use(&dm), (json!(addrs[1]), json!(addrs[1])));
    // Its own writes are stored through the relay it moved to.
    put_doc(&dm, "from-moving", json!({ "n": 3 }));
    wait_converged(&[&dm, &dother], 3);
    let ids: Vec<_> = docs(&dother).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["first", "from-moving", "while-down"]);

    // Stopped, the device shows the relay it used last, and tries it first when it starts
    // again, although the first relay is back.
    stop(dm);
    let out = moving.ferry(&["--json", "status"]);
    assert!(out.status.success(), "ferry status: {}", stderr(&out));
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["sync"]["daemon_running"], json!(false), "{shown}");
    assert_eq!(shown["sync"]["relay"], json!(addrs[1]), "{shown}");
    assert_eq!(shown["sync"]["relays"], json!(addrs), "{shown}");
    restart(&mut relays[0], &config);
    let dm = moving.start_daemon_logged();
    put_doc(&dother, "after-restart", json!({ "n": 4 }));
    wait_converged(&[&dm, &dother], 4);
    assert_eq!(relay_in_use(&dm), (json!(addrs[1]), json!(addrs[1])));
}

/// Collections under every strategy, with a unique constraint.
const COLLECTIONS: &str = "
[collections.Note]
strategy = \"merge\"

[collections.Task]
strategy = \"lww\"

[collections.Issue]
strategy = \"manual\"

[collections.Customer]
strategy = \"merge\"
unique = [[\"email\"]]
";

/// Runs a `ferry` data command on a device whose daemon is stopped: the change waits in its
/// queue.
fn offline(device: &Device, args: &[&str]) {
    let out = device.ferry(args);
    assert!(out.status.success(), "ferry {args:?}: {}", stderr(&out));
}

/// Every record of every collection the test writes, as `list` shows them.
fn everything(daemon: &Daemon) -> Value {
    ["Note", "Task", "Issue", "Customer", "Doc"]
        .iter()
        .map(|collection| {
            let page = call(
                daemon,
                "list",
                json!({ "collection": collection, "limit": 1000 }),
            );
            assert_eq!(page["next"], Value::Null, "{page}");
            page["records"].clone()
        })
        .collect()
}

fn all(daemons: &[Daemon]) -> Vec<&Daemon> {
    daemons.iter().collect()
}

fn all_conflicts(daemon: &Daemon) -> Value {
    let page = call(
        daemon,
        "conflicts.list",
        json!({ "status": "all", "limit": 1000 }),
    );
    assert_eq!(page["next"], Value::Null, "{page}");
    page["conflicts"].clone()
}

/// Every device holds the same records and the same conflict entries as the first; returns
/// the entries.
fn assert_agreed(daemons: &[&Daemon]) -> Vec<Value> {
    let (records, conflicts) = (everything(daemons[0]), all_conflicts(daemons[0]));
    for (i, daemon) in daemons.iter().enumerate().skip(1) {
        assert_json_same(&everything(daemon), &records, &format!("records on {i}"));
        assert_json_same(
            &all_conflicts(daemon),
            &conflicts,
            &format!("conflicts on {i}"),
        );
    }
    conflicts.as_array().unwrap().clone()
}

#[test]
fn three_relays_and_four_devices_converge_through_kills_restarts_and_conflicts_of_every_kind() {
    let server = PgServer::start();
    let database = server.create_database();
    let config = format!(
        "{}postgres_connect_timeout_secs = 2\n",
        server.relay_config(&database)
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut relays = start_relays(&config, tmp.path(), 3);
    let fingerprint = relays[0].fingerprint.clone();
    let addrs: Vec<String> = relays.iter().map(|r| r.addr.clone()).collect();
    let devices: Vec<Device> = (0..4).map(|_| Device::new()).collect();
    for (i, device) in devices.iter().enumerate() {
        // Every device knows all three relays, starting with its own: device i uses relay
        // i % 3 (the first and the last share one), registered through it.
        let first = i % 3;
        let known: Vec<&str> = (0..3).map(|k| addrs[(first + k) % 3].as_str()).collect();
        device.set_sync(&known.join(","), &fingerprint);
        device.register_at(
            &relays[first].operator(),
            &addrs[first],
            &fingerprint,
            "default",
        );
        // Small batches: an upload takes several round trips, so a relay killed during one
        // cuts it short.
        device.edit_config(|text| {
            format!(
                "{}{COLLECTIONS}",
                text.replacen("\nbatch_changes = 1000", "\nbatch_changes = 4", 1)
            )
        });
    }
    let start_all = || -> Vec<Daemon> { devices.iter().map(Device::start_daemon_logged).collect() };

    // Shared records, written online.
    let daemons = start_all();
    let put = |daemon: &Daemon, collection: &str, id: &str, fields: Value| {
        call(
            daemon,
            "put",
            json!({ "collection": collection, "id": id, "fields": fields }),
        );
    };
    put(
        &daemons[0],
        "Note",
        "n1",
        json!({ "title": "start", "body": "b" }),
    );
    put(&daemons[1], "Task", "t1", json!({ "state": "open" }));
    put(&daemons[2], "Issue", "i1", json!({ "title": "start" }));
    put(&daemons[3], "Task", "t2", json!({ "state": "open" }));
    put(&daemons[0], "Note", "n2", json!({ "title": "to delete" }));
    let mut head = 5;
    wait_converged(&all(&daemons), head);
    for (i, daemon) in daemons.iter().enumerate() {
        assert_eq!(
            relay_in_use(daemon).0,
            json!(addrs[i % 3]),
            "device {i} on its own relay"
        );
    }
    daemons.into_iter().for_each(stop);

    // Offline edits, concurrent in pairs: one conflict of each kind, and a delete.
    let edits: [(usize, &[&str]); 11] = [
        (0, &["patch", "Note/n1", "--data", r#"{"title": "zero"}"#]),
        (1, &["patch", "Note/n1", "--data", r#"{"title": "one"}"#]),
        (1, &["patch", "Task/t1", "--data", r#"{"state": "one"}"#]),
        (2, &["patch", "Task/t1", "--data", r#"{"state": "two"}"#]),
        (2, &["patch", "Issue/i1", "--data", r#"{"title": "two"}"#]),
        (3, &["patch", "Issue/i1", "--data", r#"{"title": "three"}"#]),
        (3, &["rm", "Task/t2"]),
        (0, &["patch", "Task/t2", "--data", r#"{"state": "zero"}"#]),
        (
            0,
            &[
                "put",
                "Customer/a",
                "--data",
                r#"{"email": "x@example.com"}"#,
            ],
        ),
        (
            2,
            &[
                "put",
                "Customer/b",
                "--data",
                r#"{"email": "x@example.com"}"#,
            ],
        ),
        (1, &["rm", "Note/n2"]),
    ];
    for (device, args) in edits {
        offline(&devices[device], args);
    }
    head += edits.len() as u64;

    // Everyone comes back and writes more; meanwhile relay 0 (in use by devices 0 and 3) is
    // killed during their uploads and started again, then the database restarts.
    let daemons = start_all();
    let writes = 40;
    for k in 0..writes {
        for (i, daemon) in daemons.iter().enumerate() {
            put_doc(daemon, &format!("d{i}-{k:02}"), json!({ "k": k, "by": i }));
        }
        match k {
            10 => {
                relays[0].kill();
                // Its devices fail over to the next relay they know.
                for i in [0, 3] {
                    common::wait_for_ok("a failover", common::TIMEOUT, || {
                        match relay_in_use(&daemons[i]) {
                            (relay, Value::String(_)) if relay != json!(addrs[0]) => Ok(()),
                            seen => Err(format!("device {i}: {seen:?}")),
                        }
                    });
                }
            }
            20 => restart(&mut relays[0], &config),
            25 => server.crash(),
            30 => {
                // Uploads meanwhile were refused for the relay's storage, and kept.
                common::wait_for_ok("the database's loss seen", common::TIMEOUT, || {
                    let errors: Vec<Value> = daemons
                        .iter()
                        .map(|d| status(d)["sync"]["last_error"].clone())
                        .collect();
                    if errors.iter().any(|e| e["kind"] == json!("server")) {
                        Ok(())
                    } else {
                        Err(Value::Array(errors).to_string())
                    }
                });
                server.start_again();
            }
            _ => {}
        }
    }
    head += writes * daemons.len() as u64;
    wait_converged(&all(&daemons), head);

    let conflicts = assert_agreed(&all(&daemons));
    let kinds: BTreeSet<(String, String)> = conflicts
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().to_owned(),
                c["strategy"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("update_update", "merge"),
        ("update_update", "lww"),
        ("update_update", "manual"),
        ("unique", "merge"),
    ] {
        assert!(
            kinds.contains(&(expected.0.into(), expected.1.into())),
            "{expected:?} in {kinds:?}"
        );
    }
    // Which side of the update/delete pair the relay logged first decides its kind.
    assert!(
        kinds.contains(&("update_delete".into(), "lww".into()))
            || kinds.contains(&("delete_update".into(), "lww".into())),
        "{kinds:?}"
    );
    let notes = everything(&daemons[2])[0].clone();
    assert!(
        notes
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"] != json!("n2")),
        "n2 is deleted: {notes}"
    );
    assert_eq!(docs(&daemons[3]).len() as u64, writes * 4);

    // The manual conflict, resolved on device 1, is resolved on every device.
    let manual = conflicts
        .iter()
        .find(|c| c["strategy"] == json!("manual"))
        .unwrap()
        .clone();
    assert_eq!(manual["status"], json!("open"), "{manual}");
    call(
        &daemons[1],
        "conflicts.resolve",
        json!({ "id": manual["id"], "take": "client" }),
    );
    head += 1;
    wait_converged(&all(&daemons), head);
    let after = assert_agreed(&all(&daemons));
    let resolved = after.iter().find(|c| c["id"] == manual["id"]).unwrap();
    assert_eq!(resolved["status"], json!("resolved"), "{resolved}");
    assert_eq!(after.len(), conflicts.len(), "no other conflict found");

    // Device 3, revoked through relay 1, loses its session on relay 0 and is refused by every
    // relay it fails over to; the others keep syncing.
    let revoked = device_id(&device_key(&devices[3]).verifying_key().to_bytes());
    let out = relays[1].operator().ferry(&["relay", "revoke", &revoked]);
    assert!(out.status.success(), "ferry relay revoke: {}", stderr(&out));
    common::wait_for_ok("device 3 refused", common::TIMEOUT, || {
        let sync = status(&daemons[3])["sync"].clone();
        if sync["last_error"]["kind"] == json!("authentication")
            && sync["state"] != json!("connected")
        {
            Ok(())
        } else {
            Err(sync.to_string())
        }
    });
    put_doc(&daemons[0], "after-revocation", json!({ "n": 1 }));
    head += 1;
    wait_converged(&all(&daemons)[..3], head);
}

/// What a device does to its replica of a document before any upload.
#[derive(Debug, Clone)]
enum Step {
    Write {
        doc: usize,
        device: usize,
        field: u8,
        value: i64,
    },
    /// `into` takes in what `from` holds of the document.
    Merge {
        doc: usize,
        into: usize,
        from: usize,
    },
}

const DEVICES: usize = 3;

fn step(docs: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..docs, 0..DEVICES, 0..4u8, any::<i64>()).prop_map(|(doc, device, field, value)| {
            Step::Write { doc, device, field, value }
        }),
        2 => (0..docs, 0..DEVICES, 0..DEVICES)
            .prop_map(|(doc, into, from)| Step::Merge { doc, into, from }),
    ]
}

/// Device `device`'s uploads, in a random order (`order` keys them), sent in batches of
/// `batch` through the relay `route` picks for each batch; a change refused for a dependency
/// not logged yet (another device's, maybe on its way through another relay) is sent again
/// later, as a device retries. Returns each stored change's seq by its upload.
fn upload_all(
    relays: &[RelayStore],
    device: usize,
    mut pending: Vec<UploadChange>,
    batch: usize,
    route: &[u8],
) -> Result<Vec<(UploadChange, u64)>, String> {
    let mut acknowledged = Vec::new();
    let mut routes = route.iter().cycle();
    let uploader = dev(device as u8 + 1);
    // Waiting on other devices' uploads is bounded: they all finish.
    for _ in 0..10_000 {
        if pending.is_empty() {
            return Ok(acknowledged);
        }
        let mut refused = Vec::new();
        for chunk in pending.chunks(batch) {
            let relay = &relays[*routes.next().unwrap() as usize % relays.len()];
            // An error answers the whole batch, which the device sends again.
            let Ok(results) = relay.append(SPACE, &uploader, chunk) else {
                refused.extend_from_slice(chunk);
                continue;
            };
            for (change, result) in chunk.iter().zip(results) {
                match result.outcome {
                    ChangeOutcome::Stored { seq } => acknowledged.push((change.clone(), seq)),
                    ChangeOutcome::Rejected {
                        code: ErrorCode::MissingDependencies,
                        ..
                    } => refused.push(change.clone()),
                    other => return Err(format!("device {device}: unexpected {other:?}")),
                }
            }
        }
        if refused.len() == pending.len() {
            std::thread::yield_now();
        }
        pending = refused;
    }
    Err(format!("device {device}: uploads stopped making progress"))
}

fn concurrent_appends_keep_one_causally_closed_log(
    docs: usize,
    steps: Vec<Step>,
    order: Vec<u32>,
    batch: usize,
    routes: [Vec<u8>; DEVICES],
) -> Result<(), TestCaseError> {
    let mut replicas: Vec<Vec<Record>> = (0..docs)
        .map(|d| {
            let mut first = Record::new(&actor(1));
            first.put(&common::fields(json!({ "doc": d })), 1).unwrap();
            let saved = first.save();
            let mut replicas = vec![first];
            for n in 1..DEVICES {
                replicas.push(Record::load(&saved, &actor(n as u8 + 1)).unwrap());
            }
            replicas
        })
        .collect();
    for s in steps {
        match s {
            Step::Write {
                doc,
                device,
                field,
                value,
            } => {
                replicas[doc][device]
                    .patch(
                        &common::fields(json!({ format!("f{field}"): value })),
                        &[],
                        2,
                    )
                    .unwrap();
            }
            Step::Merge { doc, into, from } if into != from => {
                let mut other = Record::load(&replicas[doc][from].save(), &actor(99)).unwrap();
                replicas[doc][into]
                    .doc_mut()
                    .merge(other.doc_mut())
                    .unwrap();
            }
            Step::Merge { .. } => {}
        }
    }
    // What every document holds once everything is merged, and each device's own changes.
    let mut merged = Vec::new();
    let mut uploads: Vec<Vec<(u32, UploadChange)>> = vec![Vec::new(); DEVICES];
    let mut key = order.iter().cycle();
    for (d, doc_replicas) in replicas.iter_mut().enumerate() {
        let (first, rest) = doc_replicas.split_first_mut().unwrap();
        for other in rest {
            first.doc_mut().merge(other.doc_mut()).unwrap();
        }
        for change in first.doc_mut().get_changes(&[]) {
            let device = (0..DEVICES)
                .find(|n| *change.actor_id() == actor(*n as u8 + 1))
                .unwrap();
            let entry = uploads[device].len() as u64;
            uploads[device].push((
                *key.next().unwrap(),
                upload(entry, &format!("d{d}"), change.raw_bytes()),
            ));
        }
        merged.push(first.heads());
    }
    let total: usize = uploads.iter().map(Vec::len).sum();

    let db = Database::new();
    let relays: Vec<RelayStore> = (0..DEVICES)
        .map(|_| RelayStore::open(Arc::new(db.open()), RelayStoreOptions::default()))
        .collect();
    let acknowledged: Vec<Result<Vec<(UploadChange, u64)>, String>> = std::thread::scope(|s| {
        let threads: Vec<_> = uploads
            .into_iter()
            .zip(&routes)
            .enumerate()
            .map(|(device, (mut keyed, route))| {
                keyed.sort_by_key(|(k, _)| *k);
                let pending = keyed.into_iter().map(|(_, u)| u).collect();
                let relays = &relays;
                s.spawn(move || upload_all(relays, device, pending, batch, route))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut stored = BTreeMap::new();
    for device in acknowledged {
        for (change, seq) in device.map_err(TestCaseError::fail)? {
            prop_assert!(
                stored.insert(seq, change).is_none(),
                "seq {} acknowledged twice",
                seq
            );
        }
    }
    prop_assert_eq!(stored.len(), total);

    // Every relay reads the same log: gapless, each acknowledged change at its seq, and in an
    // order that applies without a missing dependency.
    for relay in &relays {
        prop_assert_eq!(relay.head(SPACE).unwrap(), total as u64);
        // Read a page at a time, as sessions do: a page ends where this relay's own newest
        // entries end, and the next comes from storage.
        let mut log = Vec::new();
        while log.len() < total {
            let page = relay
                .read_since(SPACE, log.len() as u64, usize::MAX / 8, usize::MAX)
                .unwrap();
            prop_assert!(
                !page.entries.is_empty(),
                "a page after {} is empty",
                log.len()
            );
            log.extend(page.entries);
        }
        let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
        prop_assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
        let mut replayed: BTreeMap<String, Record> = BTreeMap::new();
        for entry in &log {
            let change = &stored[&entry.seq];
            prop_assert_eq!(&entry.record, &change.record);
            prop_assert_eq!(&entry.change, &change.change);
            let doc = replayed
                .entry(entry.record.clone())
                .or_insert_with(|| Record::new(&actor(7)));
            prop_assert!(
                doc.apply_changes(std::slice::from_ref(&entry.change))
                    .is_ok(),
                "entry {} cannot be applied in log order",
                entry.seq
            );
        }
        for (d, heads) in merged.iter().enumerate() {
            let replay = replayed.get_mut(&format!("d{d}")).unwrap();
            prop_assert_eq!(&replay.heads(), heads);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(common::proptest_config(12))]

    #[test]
    fn three_relay_stores_on_one_database_keep_one_causally_closed_log_under_concurrent_appends(
        docs in 1..=3usize,
        steps in proptest::collection::vec(step(3), 1..24),
        order in proptest::collection::vec(any::<u32>(), 64),
        batch in 1..5usize,
        routes in [
            proptest::collection::vec(any::<u8>(), 1..8),
            proptest::collection::vec(any::<u8>(), 1..8),
            proptest::collection::vec(any::<u8>(), 1..8),
        ],
    ) {
        let steps = steps
            .into_iter()
            .map(|s| match s {
                Step::Write { doc, device, field, value } => {
                    Step::Write { doc: doc % docs, device, field, value }
                }
                Step::Merge { doc, into, from } => Step::Merge { doc: doc % docs, into, from },
            })
            .collect();
        concurrent_appends_keep_one_causally_closed_log(docs, steps, order, batch, routes)?;
    }
}
