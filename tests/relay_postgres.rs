//! The relay on PostgreSQL (`relay.storage = "postgres"`), beyond the conformance suite that
//! `relay_storage.rs` runs on every engine: the synchronous engine called from tokio workers,
//! `block_in_place` and plain threads; migrations applied once when relays start together, a
//! schema newer than the binary refused, `ferry relay migrate [--check]`; several engines (as
//! several relays) on one database appending in one gapless order and consuming an enrolment
//! code once; damaged rows refused; an unreachable database named as such, and acknowledged appends kept through a
//! crash of the database, after which the engine reconnects; and `ferry relay` itself on a private
//! server, serving two daemons that converge, then, restarted, a third device. Several relays on
//! one database: relay stores validating interleaved and concurrent dependent changes against
//! what the other logged; two `ferry relay` processes pushing each other's changes to their
//! devices (listening connections cut included), ending the sessions of a device revoked through
//! the other, serving a device registered through the other, and presenting one certificate.
//! Faults: devices riding out the database stopped during sync, and an append whose connection
//! is cut inside its transaction never answered `Stored`; a refresh token used again through
//! another relay found reused and its family revoked for both. The `records` table: equal to
//! what every device lists after lww, manual and merge conflicts and deletes, through two relays,
//! resumed from its recorded position after a restart, shown by `ferry relay status`; spaces
//! shared between materializers by lease, purged records' rows dropped, rows made again past a
//! compacted log.

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

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::postgres::{Database, PgServer};
use common::{
    Device, Operator, Relay, device_key, docs, put_doc, stderr, stdout, wait_caught_up,
    wait_converged,
};
use ferry::record::Record;
use ferry::relay::storage::pg::{LISTENER_NAME, MIGRATIONS, PgOptions};
use ferry::relay::storage::{
    AccountRecord, AccountStorage, AccountWrite, Append, EnrolmentRecord, LogStorage, LoggedChange,
    PgStorage, StorageError,
};
use ferry::relay::store::{RelayStore, RelayStoreOptions};
use ferry::transport::{CERT_FILE_NAME, KEY_FILE_NAME, RelayCertificate};
use ferry_proto::session::device_id;
use ferry_proto::wire::{ChangeOutcome, ErrorCode, UploadChange};
use relay_fixtures::{SPACE, actor, dev, outcomes, upload};
use serde_json::json;

fn change(record: &str, n: u64) -> LoggedChange {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&n.to_be_bytes());
    LoggedChange {
        collection: "Doc".into(),
        record: record.into(),
        origin: "dev".into(),
        hash,
        change: n.to_be_bytes().to_vec(),
    }
}

/// Appends one entry at the head, staged again as long as another writer moved the head.
fn append_one(storage: &dyn LogStorage, record: &str, n: u64) {
    loop {
        let mut append = Append::new(storage.head("space").unwrap());
        append.entries.push(change(record, n));
        match storage.append("space", append) {
            Ok(()) => return,
            Err(StorageError::HeadMoved { .. }) => continue,
            Err(e) => panic!("append: {e}"),
        }
    }
}

#[test]
fn calls_work_from_runtime_workers_block_in_place_and_plain_threads() {
    let db = Database::new();
    let storage = Arc::new(db.open());

    let from_thread = storage.clone();
    std::thread::spawn(move || append_one(&*from_thread, "r", 1))
        .join()
        .unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let on_worker = storage.clone();
    let head = runtime.block_on(async move {
        tokio::spawn(async move {
            append_one(&*on_worker, "r", 2);
            let in_place = on_worker.clone();
            tokio::task::block_in_place(move || append_one(&*in_place, "r", 3));
            let head = on_worker.head("space").unwrap();
            // The last handle is dropped on a worker, which must not wait for the engine's
            // runtime there.
            drop(on_worker);
            head
        })
        .await
        .unwrap()
    });
    assert_eq!(head, 3);

    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let on_current = storage.clone();
    current.block_on(async move { append_one(&*on_current, "r", 4) });

    let seqs: Vec<u64> = storage
        .read_log("space", 0, 10, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    let last = Arc::into_inner(storage).expect("the last handle");
    runtime.block_on(async move { tokio::spawn(async move { drop(last) }).await.unwrap() });
}

#[test]
fn relays_starting_together_apply_each_migration_once() {
    for _ in 0..3 {
        let db = Database::new();
        let start = Arc::new(Barrier::new(2));
        let relays: Vec<_> = (0..2)
            .map(|_| {
                let (options, start) = (db.options(), start.clone());
                std::thread::spawn(move || {
                    let storage = PgStorage::connect(&options).unwrap();
                    start.wait();
                    storage.migrate().unwrap()
                })
            })
            .collect();
        let found: Vec<_> = relays.into_iter().map(|r| r.join().unwrap()).collect();
        // One of them applied everything, the other found it applied.
        let applied_first = found.iter().filter(|s| s.applied.is_empty()).count();
        assert_eq!(applied_first, 1, "{found:?}");
        assert_eq!(
            db.sql("SELECT count(*) FROM ferry_schema"),
            MIGRATIONS.len().to_string()
        );
        let storage = db.open();
        let state = storage.schema().unwrap();
        assert!(state.pending.is_empty(), "{state:?}");
        assert_eq!(state.applied.len(), MIGRATIONS.len());
    }
}

#[test]
fn a_schema_newer_than_the_binary_is_refused_saying_to_upgrade() {
    let db = Database::new();
    drop(db.open());
    db.sql("INSERT INTO ferry_schema (version, name) VALUES (9999, 'from_a_later_ferry')");
    let refused = PgStorage::open(&db.options()).err().expect("refused");
    assert!(
        matches!(refused, StorageError::SchemaTooNew { found: 9999, .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("upgrade ferry"), "{refused}");
}

#[test]
fn a_relay_holding_a_space_commits_while_the_other_relays_appends_wait() {
    let db = Database::new();
    let (holder, other) = (Arc::new(db.open()), Arc::new(db.open()));
    append_one(&*holder, "r1", 1);
    assert!(holder.hold_space("space").unwrap());
    let waiting = || {
        db.sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        ) == "1"
    };
    // Another relay's append, staged on head 1, waits for the space.
    let (answer, answered) = std::sync::mpsc::channel();
    let appender = {
        let other = other.clone();
        std::thread::spawn(move || {
            let mut append = Append::new(1);
            append.entries.push(change("r2", 2));
            answer.send(other.append("space", append)).unwrap();
        })
    };
    common::wait_for("the other relay's append to wait", common::TIMEOUT, waiting);
    // The holder commits meanwhile (its appends go through the session that holds the lock),
    // and the other still waits.
    let mut append = Append::new(1);
    append.entries.push(change("r3", 3));
    holder.append("space", append).unwrap();
    assert!(waiting());
    assert!(answered.try_recv().is_err());
    // Released: the other's append goes on, and finds the head moved.
    holder.release_space("space");
    match answered.recv_timeout(common::TIMEOUT).unwrap() {
        Err(StorageError::HeadMoved { staged: 1, head: 2 }) => {}
        other => panic!("expected the head moved, got {other:?}"),
    }
    appender.join().unwrap();
    // Nothing stays held: both append again, the holder's lock gone with its release.
    append_one(&*other, "r4", 4);
    append_one(&*holder, "r5", 5);
    assert_eq!(other.head("space").unwrap(), 4);
    assert_eq!(
        db.sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        "0"
    );
}

#[test]
fn relays_on_one_database_append_in_one_gapless_order() {
    let db = Database::new();
    let relays: Vec<Arc<PgStorage>> = (0..2).map(|_| Arc::new(db.open())).collect();
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let storage = relays[(w % 2) as usize].clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    append_one(&*storage, &format!("r{w}"), w * 100 + i);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    for storage in &relays {
        assert_eq!(storage.head("space").unwrap(), 100);
        let log = storage.read_log("space", 0, 1000, usize::MAX).unwrap();
        let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        let changes: BTreeSet<Vec<u8>> = log.into_iter().map(|e| e.change).collect();
        assert_eq!(changes.len(), 100, "each change logged once");
    }
}

#[test]
fn an_enrolment_code_is_consumed_once_from_two_relays_at_once() {
    let db = Database::new();
    let relays: Vec<Arc<PgStorage>> = (0..2).map(|_| Arc::new(db.open())).collect();
    relays[0]
        .write_accounts(vec![AccountWrite::CreateAccount(AccountRecord {
            name: "team".into(),
            created_ms: 1,
        })])
        .unwrap();
    for code in 0..20u8 {
        relays[0]
            .write_accounts(vec![AccountWrite::Enrolment {
                code_hash: [code; 32],
                record: EnrolmentRecord {
                    account: "team".into(),
                    expires_ms: u64::MAX,
                },
            }])
            .unwrap();
        let start = Arc::new(Barrier::new(2));
        let tries: Vec<_> = relays
            .iter()
            .map(|storage| {
                let (storage, start) = (storage.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    storage.write_accounts(vec![AccountWrite::ConsumeEnrolment([code; 32])])
                })
            })
            .collect();
        let results: Vec<_> = tries.into_iter().map(|t| t.join().unwrap()).collect();
        let used = results
            .iter()
            .filter(|r| matches!(r, Err(StorageError::EnrolmentUsed)))
            .count();
        assert!(
            results.iter().filter(|r| r.is_ok()).count() == 1 && used == 1,
            "code {code}: {results:?}"
        );
    }
    assert_eq!(relays[1].enrolment(&[0; 32]).unwrap(), None);
}

#[test]
fn damaged_rows_are_refused_naming_what_they_held() {
    let db = Database::new();
    let storage = db.open();
    for n in 1..=3 {
        append_one(&storage, "r", n);
    }
    storage
        .write_accounts(vec![AccountWrite::CreateAccount(AccountRecord {
            name: "team".into(),
            created_ms: 1,
        })])
        .unwrap();
    db.sql(
        "UPDATE log_entries SET change = set_byte(change, 7, get_byte(change, 7) # 1) \
         WHERE seq = 2",
    );
    db.sql("UPDATE accounts SET value = value || '\\x00'::bytea");
    let refused = storage.read_log("space", 0, 10, usize::MAX).unwrap_err();
    assert!(
        matches!(&refused, StorageError::Damaged { what: "log entry", position, .. }
            if position == "seq 2"),
        "{refused}"
    );
    assert_eq!(
        storage.read_log("space", 2, 10, usize::MAX).unwrap().len(),
        1
    );
    let refused = storage.account("team").unwrap_err();
    assert!(
        matches!(
            refused,
            StorageError::Damaged {
                what: "account data",
                ..
            }
        ),
        "{refused}"
    );
}

#[test]
fn an_unreachable_database_is_named_as_such() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = PgStorage::open(&PgOptions {
        url: format!("postgres://ferry@127.0.0.1:{port}/nothing"),
        pool_size: 1,
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(5),
    })
    .err()
    .expect("refused");
    assert!(
        matches!(refused, StorageError::Unreachable { .. }),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("relay.postgres_url"),
        "{refused}"
    );
}

#[test]
fn acknowledged_appends_survive_a_database_crash_and_the_engine_reconnects() {
    let server = PgServer::start();
    let database = server.create_database();
    let storage = PgStorage::open(&server.options(&database)).unwrap();
    for n in 1..=20 {
        append_one(&storage, "r", n);
    }
    server.crash();
    let mut append = Append::new(20);
    append.entries.push(change("r", 21));
    let refused = storage.append("space", append).unwrap_err();
    assert!(
        matches!(refused, StorageError::Unreachable { .. }),
        "{refused}"
    );
    server.start_again();
    // The pool drops the connections the crash broke and opens new ones.
    assert_eq!(storage.head("space").unwrap(), 20);
    append_one(&storage, "r", 21);
    drop(storage);
    let reopened = PgStorage::open(&server.options(&database)).unwrap();
    let seqs: Vec<u64> = reopened
        .read_log("space", 0, 100, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=21).collect::<Vec<_>>());
}

#[test]
fn ferry_relay_migrate_checks_and_applies_and_a_relay_refuses_a_newer_schema() {
    let db = Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("relay");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)
        .unwrap();
    std::fs::write(dir.join("config.toml"), db.relay_config()).unwrap();
    let operator = Operator(&dir);

    let check = operator.ferry(&["--json", "relay", "migrate", "--check"]);
    assert!(!check.status.success(), "{check:?}");
    let answer: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(
        answer["pending"],
        json!([
            "0001_relay_storage",
            "0002_relay_certificate",
            "0003_records",
            "0004_base_in_log"
        ]),
        "{answer}"
    );
    assert!(stderr(&check).contains("pending"), "{check:?}");

    let migrate = operator.ferry(&["relay", "migrate"]);
    assert!(migrate.status.success(), "{migrate:?}");
    assert!(
        stdout(&migrate).contains("0001_relay_storage")
            && stdout(&migrate).contains("0002_relay_certificate")
            && stdout(&migrate).contains("0003_records")
            && stdout(&migrate).contains("0004_base_in_log"),
        "{migrate:?}"
    );
    let check = operator.ferry(&["relay", "migrate", "--check"]);
    assert!(check.status.success(), "{check:?}");
    assert!(stdout(&check).contains("up to date"), "{check:?}");
    // Operator commands with no relay running work on the database too.
    operator.add_account("team");
    assert_eq!(db.sql("SELECT name FROM accounts"), "team");

    db.sql("INSERT INTO ferry_schema (version, name) VALUES (9999, 'from_a_later_ferry')");
    let relay = operator
        .command(&["relay", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!relay.status.success(), "{relay:?}");
    assert!(stderr(&relay).contains("upgrade ferry"), "{relay:?}");
}

#[test]
fn a_relay_on_postgres_syncs_devices_and_serves_everything_after_a_restart() {
    let db = Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("relay");
    let mut relay = Relay::start_with_config(&dir, None, &db.relay_config());
    let (a, b) = (Device::new(), Device::new());
    a.join(&relay);
    b.join(&relay);
    let (da, db_) = (a.start_daemon_logged(), b.start_daemon_logged());
    for i in 0..10 {
        put_doc(&da, &format!("a{i}"), json!({ "i": i, "by": "a" }));
        put_doc(&db_, &format!("b{i}"), json!({ "i": i, "by": "b" }));
    }
    wait_converged(&[&da, &db_], 20);
    put_doc(&da, "b0", json!({ "i": 0, "by": "a" }));
    wait_converged(&[&da, &db_], 21);
    let everything = docs(&da);
    assert_eq!(everything.len(), 20);
    assert_eq!(docs(&db_), everything);
    assert!(
        !dir.join("relay.db").exists(),
        "the relay kept nothing in sled"
    );
    assert_eq!(
        db.sql("SELECT head FROM spaces WHERE space = 'default'"),
        "21"
    );

    let port = relay.port;
    assert!(relay.terminate().success(), "{}", relay.log());
    let relay = Relay::start(&dir, Some(port));
    let c = Device::new();
    c.join(&relay);
    let dc = c.start_daemon_logged();
    wait_caught_up(&dc, 21);
    assert_eq!(docs(&dc), everything);
}

/// A relay store with its own engine on `db`, as a relay process has.
fn relay_store(db: &Database) -> RelayStore {
    RelayStore::open(
        Arc::new(db.open()),
        RelayStoreOptions {
            compact_after: 3,
            ..RelayStoreOptions::default()
        },
    )
}

/// Device `n`'s change to its replica of a record, as an upload.
fn edit(replica: &mut Record, entry: u64, record: &str, value: u64) -> UploadChange {
    let written = replica
        .patch(&common::fields(json!({ "v": value })), &[], 2)
        .unwrap()
        .unwrap();
    upload(entry, record, written.change.raw_bytes())
}

#[test]
fn relay_stores_on_one_database_validate_each_change_against_what_the_other_logged() {
    let db = Database::new();
    let relays = [relay_store(&db), relay_store(&db)];
    let names = ["r0", "r1", "r2"];
    // Each record on two devices: device 1 uploads through relay 0, device 2 through relay 1.
    let mut replicas: Vec<[Record; 2]> = names
        .iter()
        .map(|_| {
            let mut first = Record::new(&actor(1));
            first.put(&common::fields(json!({ "v": 0 })), 1).unwrap();
            let second = Record::load(&first.save(), &actor(2)).unwrap();
            [first, second]
        })
        .collect();
    let creations: Vec<UploadChange> = replicas
        .iter_mut()
        .zip(names)
        .map(|([first, _], name)| {
            let change = first.doc_mut().get_changes(&[])[0].raw_bytes().to_vec();
            upload(0, name, &change)
        })
        .collect();
    let r = relays[0].append(SPACE, &dev(1), &creations).unwrap();
    assert!(
        outcomes(&r)
            .iter()
            .all(|o| matches!(o, ChangeOutcome::Stored { .. })),
        "{r:?}"
    );
    let mut stored = creations.len() as u64;

    // In turns, each device builds on what the other just logged through the other relay:
    // every change depends on one the uploading relay did not log itself.
    for round in 0..12u64 {
        let d = (round % 2) as usize;
        let mut batch = Vec::new();
        for (replica, name) in replicas.iter_mut().zip(names) {
            let [first, second] = replica;
            let (to, from) = if d == 0 {
                (first, second)
            } else {
                (second, first)
            };
            to.doc_mut().merge(from.doc_mut()).unwrap();
            batch.push(edit(to, round, name, round + 1));
        }
        let device = dev(d as u8 + 1);
        let got = outcomes(&relays[d].append(SPACE, &device, &batch).unwrap());
        let want: Vec<_> = (1..=names.len() as u64)
            .map(|i| ChangeOutcome::Stored { seq: stored + i })
            .collect();
        assert_eq!(got, want, "round {round}");
        // Sent again through the other relay: a duplicate there too.
        let again = relays[1 - d].append(SPACE, &device, &batch).unwrap();
        assert_eq!(
            outcomes(&again),
            want.iter()
                .map(|o| match o {
                    ChangeOutcome::Stored { seq } => ChangeOutcome::Duplicate { seq: *seq },
                    other => other.clone(),
                })
                .collect::<Vec<_>>()
        );
        stored += names.len() as u64;
        // Both relays read the record as it now is, whichever logged it.
        let merged = replicas[0][d].fields();
        for relay in &relays {
            assert_eq!(
                relay.record(SPACE, "Doc", "r0").unwrap(),
                Some(merged.clone())
            );
        }
    }

    // The causal check sees the other relay's log: a change whose dependency is not logged is
    // refused by both, and stored once it is.
    let [first, _] = &mut replicas[1];
    let (c1, c2) = (edit(first, 1, "r1", 100), edit(first, 2, "r1", 101));
    for relay in &relays {
        let r = relay
            .append(SPACE, &dev(1), std::slice::from_ref(&c2))
            .unwrap();
        assert!(
            matches!(
                &r[0].outcome,
                ChangeOutcome::Rejected {
                    code: ErrorCode::MissingDependencies,
                    ..
                }
            ),
            "{r:?}"
        );
    }
    let r = relays[1].append(SPACE, &dev(1), &[c1]).unwrap();
    assert_eq!(outcomes(&r), [ChangeOutcome::Stored { seq: stored + 1 }]);
    let r = relays[0].append(SPACE, &dev(1), &[c2]).unwrap();
    assert_eq!(outcomes(&r), [ChangeOutcome::Stored { seq: stored + 2 }]);
    stored += 2;

    // Both devices at once, each through its relay, on the same records: appends staged
    // against a head the other relay moved are staged again, never refused (an append is
    // staged again only after the other relay committed, which it does fewer times than
    // `RESTAGES`).
    let per_device = 15u64;
    assert!(per_device < ferry::relay::store::RESTAGES as u64);
    std::thread::scope(|scope| {
        for (d, relay) in relays.iter().enumerate() {
            let mut mine: Vec<Record> = replicas
                .iter_mut()
                .map(|pair| Record::load(&pair[d].save(), &actor(d as u8 + 1)).unwrap())
                .collect();
            scope.spawn(move || {
                for n in 0..per_device {
                    let i = (n as usize) % names.len();
                    let change = edit(&mut mine[i], n, names[i], 1000 + n);
                    let r = relay.append(SPACE, &dev(d as u8 + 1), &[change]).unwrap();
                    assert!(
                        matches!(r[0].outcome, ChangeOutcome::Stored { .. }),
                        "device {d}, change {n}: {r:?}"
                    );
                }
            });
        }
    });
    stored += 2 * per_device;

    let logs: Vec<_> = relays
        .iter()
        .map(|relay| {
            let log = relay
                .read_since(SPACE, 0, usize::MAX / 8, usize::MAX)
                .unwrap();
            assert_eq!(log.head, stored);
            log.entries
        })
        .collect();
    assert_eq!(logs[0], logs[1], "both relays read the same log");
    let seqs: Vec<u64> = logs[0].iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=stored).collect::<Vec<_>>(), "gapless");
    let mut replayed: Vec<Record> = names.iter().map(|_| Record::new(&actor(7))).collect();
    for entry in &logs[0] {
        let i = names.iter().position(|n| *n == entry.record).unwrap();
        replayed[i]
            .apply_changes(std::slice::from_ref(&entry.change))
            .unwrap_or_else(|e| panic!("entry {} applies in log order: {e}", entry.seq));
    }
    for (name, doc) in names.iter().zip(&mut replayed) {
        let heads: Vec<String> = doc.heads().iter().map(|h| h.to_string()).collect();
        for relay in &relays {
            let mut kept = relay.heads(SPACE, "Doc", name).unwrap().unwrap();
            kept.sort();
            let mut want = heads.clone();
            want.sort();
            assert_eq!(kept, want, "{name}");
            assert_eq!(
                relay.record(SPACE, "Doc", name).unwrap(),
                Some(doc.fields())
            );
        }
    }
}

/// Two `ferry relay` processes on `db`, each with its own data directory under `tmp`.
fn two_relays(db: &Database, tmp: &std::path::Path) -> [Relay; 2] {
    ["relay1", "relay2"]
        .map(|name| Relay::start_with_config(&tmp.join(name), None, &db.relay_config()))
}

#[test]
fn a_change_stored_through_one_relay_is_pushed_at_once_to_a_device_on_another() {
    let db = Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let relays = two_relays(&db, tmp.path());
    let (a, b) = (Device::new(), Device::new());
    a.join(&relays[0]);
    b.join(&relays[1]);
    let (da, db_) = (a.start_daemon_logged(), b.start_daemon_logged());
    wait_converged(&[&da, &db_], 0);
    // Each device's session is live on its own relay: what the other relay logs reaches it
    // only if that relay hears of it (the devices' own periodic sync is a minute away).
    put_doc(&da, "from-a", json!({ "by": "a" }));
    wait_converged(&[&da, &db_], 1);
    put_doc(&db_, "from-b", json!({ "by": "b" }));
    wait_converged(&[&da, &db_], 2);
    for i in 0..5 {
        put_doc(&da, &format!("a{i}"), json!({ "i": i }));
        put_doc(&db_, &format!("b{i}"), json!({ "i": i }));
    }
    wait_converged(&[&da, &db_], 12);
    assert_eq!(docs(&da), docs(&db_));
    assert_eq!(docs(&da).len(), 12);

    // Listening connections cut: the relays connect them again (reading the heads they may
    // have missed meanwhile) and pushes go on.
    let listeners = format!("FROM pg_stat_activity WHERE application_name = '{LISTENER_NAME}'");
    for round in 0..3 {
        common::wait_for_ok("both relays listening", common::TIMEOUT, || {
            let n = db.sql(&format!("SELECT count(*) {listeners}"));
            if n == "2" { Ok(()) } else { Err(n) }
        });
        db.sql(&format!("SELECT pg_terminate_backend(pid) {listeners}"));
        put_doc(&da, &format!("after-cut{round}"), json!({ "round": round }));
        wait_converged(&[&da, &db_], 13 + round);
    }
}

#[test]
fn a_device_revoked_through_one_relay_loses_its_session_on_another_and_devices_move_between_relays()
{
    let db = Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let relays = two_relays(&db, tmp.path());
    let (gone, kept, moving) = (Device::new(), Device::new(), Device::new());
    gone.join(&relays[1]);
    kept.join(&relays[0]);
    // Registered through relay 1, then served by relay 2 (which had not seen the device when
    // it registered, nor the tokens relay 1 gave it).
    moving.register_at(
        &relays[0].operator(),
        &relays[0].addr,
        &relays[0].fingerprint,
        "default",
    );
    // Both relays present the certificate the database holds: the pin relay 1 gave fits.
    assert_eq!(relays[0].fingerprint, relays[1].fingerprint);
    moving.set_sync(&relays[1].addr, &relays[0].fingerprint);
    let (dg, dk, dm) = (
        gone.start_daemon_logged(),
        kept.start_daemon_logged(),
        moving.start_daemon_logged(),
    );
    put_doc(&dg, "before", json!({ "n": 1 }));
    put_doc(&dm, "moved", json!({ "n": 2 }));
    wait_converged(&[&dg, &dk, &dm], 2);

    let gone_id = device_id(&device_key(&gone).verifying_key().to_bytes());
    let out = relays[0].operator().ferry(&["relay", "revoke", &gone_id]);
    assert!(out.status.success(), "ferry relay revoke: {}", stderr(&out));
    // Its session is on the other relay: that one hears of the revocation and ends it.
    let error = common::wait_for_ok(
        "the revoked device's session to end",
        common::TIMEOUT,
        || {
            let error = common::status(&dg)["sync"]["last_error"].clone();
            if error["kind"] == json!("authentication") {
                Ok(error)
            } else {
                Err(error.to_string())
            }
        },
    );
    assert!(error.to_string().contains("revoked"), "{error}");
    put_doc(&dk, "kept", json!({ "n": 3 }));
    wait_converged(&[&dk, &dm], 3);
    let ids: Vec<_> = docs(&dm).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["before", "kept", "moved"]);
}

#[test]
fn relays_on_one_database_present_the_first_relays_certificate() {
    let db = Database::new();
    let tmp = tempfile::tempdir().unwrap();
    // The first relay kept a certificate of its own before: devices pinned it, so it is the
    // one the database keeps.
    let first = tmp.path().join("relay1");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&first)
        .unwrap();
    let (cert, key) = RelayCertificate::generate_pem(&[]).unwrap();
    let pinned = RelayCertificate::from_pem(
        cert.as_bytes(),
        &first.join(CERT_FILE_NAME),
        key.as_bytes(),
        &first.join(KEY_FILE_NAME),
    )
    .unwrap()
    .fingerprint()
    .to_string();
    for (name, pem) in [(CERT_FILE_NAME, &cert), (KEY_FILE_NAME, &key)] {
        std::fs::write(first.join(name), pem).unwrap();
        std::fs::set_permissions(
            first.join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let relays = two_relays(&db, tmp.path());
    assert_eq!(relays[0].fingerprint, pinned);
    assert_eq!(relays[1].fingerprint, pinned);
    assert_eq!(db.sql("SELECT count(*) FROM relay_certificate"), "1");
}

#[test]
fn devices_ride_out_a_database_stopped_during_sync_and_lose_nothing_acknowledged() {
    let server = PgServer::start();
    let database = server.create_database();
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_config(
        &tmp.path().join("relay"),
        None,
        &format!(
            "{}postgres_connect_timeout_secs = 2\n",
            server.relay_config(&database)
        ),
    );
    let (a, b) = (Device::new(), Device::new());
    a.join(&relay);
    b.join(&relay);
    let (da, db_) = (a.start_daemon_logged(), b.start_daemon_logged());
    for i in 0..5 {
        put_doc(&da, &format!("before{i}"), json!({ "i": i }));
    }
    wait_converged(&[&da, &db_], 5);

    server.crash();
    // Written while the relay cannot store anything: the device is told the relay failed,
    // keeps its writes and tries again.
    for i in 0..5 {
        put_doc(&da, &format!("during{i}"), json!({ "i": i }));
    }
    let error = common::wait_for_ok(
        "the relay's failure seen by the device",
        common::TIMEOUT,
        || {
            let sync = common::status(&da)["sync"].clone();
            if sync["last_error"]["kind"] == json!("server") {
                Ok(sync)
            } else {
                Err(sync.to_string())
            }
        },
    );
    assert!(common::unsent(&common::status(&da)) > 0, "{error}");

    server.start_again();
    // The relay reconnects by itself, the device's retries land, the other device gets them.
    wait_converged(&[&da, &db_], 10);
    assert_eq!(docs(&da), docs(&db_));
    assert_eq!(docs(&db_).len(), 10);
}

#[test]
fn an_append_that_loses_the_database_mid_transaction_is_never_answered_stored() {
    use std::io::Write as _;
    let db = Database::new();
    let relay = relay_store(&db);
    let mut writer = relay_fixtures::Writer::new(1);
    let first = writer.put(json!({ "n": 1 }));
    let r = relay
        .append(SPACE, &dev(1), &[upload(1, "r", &first)])
        .unwrap();
    assert_eq!(outcomes(&r), [ChangeOutcome::Stored { seq: 1 }]);

    // Another session holds the space's row, so the next append waits inside its transaction,
    // where its connection is cut.
    let mut holder = db.server.session(&db.name);
    let mut input = holder.stdin.take().unwrap();
    writeln!(
        input,
        "BEGIN; SELECT head FROM spaces WHERE space = '{SPACE}' FOR UPDATE;"
    )
    .unwrap();
    input.flush().unwrap();
    let held = "FROM pg_stat_activity WHERE state = 'idle in transaction'";
    common::wait_for("the row held", common::TIMEOUT, || {
        db.sql(&format!("SELECT count(*) {held}")) == "1"
    });
    let second = writer.patch(json!({ "n": 2 }));
    let waiting = "FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
    let answer = std::thread::scope(|scope| {
        let appending = scope.spawn(|| relay.append(SPACE, &dev(1), &[upload(2, "r", &second)]));
        common::wait_for(
            "the append waiting in its transaction",
            common::TIMEOUT,
            || db.sql(&format!("SELECT count(*) {waiting}")) == "1",
        );
        db.sql(&format!("SELECT pg_terminate_backend(pid) {waiting}"));
        appending.join().unwrap()
    });
    assert!(answer.is_err(), "answered {answer:?}");
    writeln!(input, "COMMIT;").unwrap();
    drop(input);
    assert!(holder.wait().unwrap().success());

    assert_eq!(relay.head(SPACE).unwrap(), 1, "nothing of it was written");
    let r = relay
        .append(SPACE, &dev(1), &[upload(2, "r", &second)])
        .unwrap();
    assert_eq!(outcomes(&r), [ChangeOutcome::Stored { seq: 2 }]);
}

#[test]
fn a_refresh_token_used_again_through_another_relay_revokes_its_family_on_every_relay() {
    use ferry::auth::token::{RefreshError, TokenPolicy};
    use ferry::relay::accounts::{Accounts, Denied, os_random};
    use ferry_proto::wire::{Credential, Secret};
    const NOW: u64 = 1_700_000_000_000;
    let db = Database::new();
    let relays = [0, 1, 2].map(|_| {
        Accounts::open(
            Arc::new(db.open()),
            TokenPolicy::default(),
            os_random(),
            NOW,
        )
        .unwrap()
    });
    relays[0].add_account("team", NOW).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let public = key.verifying_key().to_bytes();
    let device = device_id(&public);
    let code = relays[0].enrol("team", 3_600_000, NOW).unwrap().code;
    let admit = |relay: usize, credential: Credential, at: u64| {
        relays[relay].admit(public, &device, "team", &credential, NOW + at)
    };
    let registered = admit(0, Credential::Enrol(Secret::new(code)), 0).unwrap();
    let family = registered.family;
    let first = registered.grant.tokens.unwrap();
    let rotated = admit(0, Credential::Refresh(first.refresh.clone()), 1_000)
        .unwrap()
        .grant
        .tokens
        .unwrap();
    // The first token again, through the other relay: found reused there.
    let reused = admit(1, Credential::Refresh(first.refresh), 2_000);
    assert!(
        matches!(reused, Err(Denied::Refresh(RefreshError::Reused))),
        "{reused:?}"
    );
    // The whole family is revoked for every relay: the rotated tokens stop working too.
    for relay in 0..3 {
        let refused = admit(relay, Credential::Refresh(rotated.refresh.clone()), 3_000);
        assert!(refused.is_err(), "relay {relay}: {refused:?}");
    }
    // The other relays hear of the revocation (`ferry_accounts`): the family's access tokens,
    // checked against what each keeps in memory, stop working there too.
    for relay in [0, 2] {
        assert!(admit(relay, Credential::Access(rotated.access.clone()), 3_000).is_ok());
        relays[relay].family_revoked_elsewhere(&family);
        let refused = admit(relay, Credential::Access(rotated.access.clone()), 3_000);
        assert!(
            refused.is_err(),
            "relay {relay} still takes the family's access token: {refused:?}"
        );
    }
}

/// The collections of the records-table test, one per strategy, as relays and devices declare
/// them.
const STRATEGIES: &str = "\n[collections.Lww]\nstrategy = \"lww\"\n\
    [collections.Manual]\nstrategy = \"manual\"\n[collections.Merge]\nstrategy = \"merge\"\n";
const STRATEGY_COLLECTIONS: [&str; 3] = ["Lww", "Manual", "Merge"];

type Rows = std::collections::BTreeMap<(String, String), (serde_json::Value, bool, u64)>;

/// The `default` space's rows of `records`: (collection, id) -> (fields, deleted, position).
fn records_table(db: &Database) -> Rows {
    let text = db.sql(
        "SELECT coalesce(json_agg(json_build_object('c', collection, 'id', id, 'f', fields, \
         'd', deleted, 'p', log_position)), '[]') FROM records WHERE space = 'default'",
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut table = Rows::new();
    for row in rows {
        let key = (
            row["c"].as_str().unwrap().to_owned(),
            row["id"].as_str().unwrap().to_owned(),
        );
        let value = (
            row["f"].clone(),
            row["d"].as_bool().unwrap(),
            row["p"].as_u64().unwrap(),
        );
        assert!(table.insert(key, value).is_none(), "one row per record");
    }
    table
}

/// The seq of the last log entry of each record of the `default` space.
fn last_entries(db: &Database) -> std::collections::BTreeMap<(String, String), u64> {
    let text = db.sql(
        "SELECT coalesce(json_agg(json_build_object('c', collection, 'id', record, 'p', last)), \
         '[]') FROM (SELECT collection, record, max(seq) AS last FROM log_entries \
         WHERE space = 'default' GROUP BY collection, record) AS t",
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    rows.iter()
        .map(|row| {
            (
                (
                    row["c"].as_str().unwrap().to_owned(),
                    row["id"].as_str().unwrap().to_owned(),
                ),
                row["p"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn wait_materialized(db: &Database, head: u64) {
    common::wait_for_ok(
        &format!("the records table at seq {head}"),
        common::TIMEOUT,
        || {
            let at = db.sql("SELECT position FROM records_progress WHERE space = 'default'");
            if at == head.to_string() {
                Ok(())
            } else {
                Err(at)
            }
        },
    );
}

/// The table holds a row for every record logged, at the seq of its last entry, and its live
/// rows are exactly what each device lists, field for field.
fn assert_table_shows(db: &Database, daemons: &[&common::Daemon]) {
    let table = records_table(db);
    let last = last_entries(db);
    let positions: std::collections::BTreeMap<_, _> = table
        .iter()
        .map(|(key, row)| (key.clone(), row.2))
        .collect();
    assert_eq!(positions, last, "each record's row at its last log entry");
    for daemon in daemons {
        for collection in STRATEGY_COLLECTIONS {
            let page = common::call(
                daemon,
                "list",
                json!({ "collection": collection, "limit": 1000 }),
            );
            let listed: std::collections::BTreeMap<String, serde_json::Value> = page["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["id"].as_str().unwrap().to_owned(), r["fields"].clone()))
                .collect();
            let live: std::collections::BTreeMap<String, serde_json::Value> = table
                .iter()
                .filter(|((c, _), (_, deleted, _))| c == collection && !deleted)
                .map(|((_, id), (fields, _, _))| (id.clone(), fields.clone()))
                .collect();
            assert_eq!(
                live, listed,
                "{collection}: the table's live rows are the list"
            );
        }
    }
}

fn offline_edit(device: &Device, args: &[&str]) {
    let out = device.ferry(args);
    assert!(out.status.success(), "ferry {args:?}: {}", stderr(&out));
}

#[test]
fn the_records_table_matches_what_every_device_shows_after_conflicts_and_deletes() {
    let db = Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let config = format!("{}{STRATEGIES}", db.relay_config());
    let dirs = [tmp.path().join("relay1"), tmp.path().join("relay2")];
    let mut relays = dirs
        .clone()
        .map(|dir| Relay::start_with_config(&dir, None, &config));
    let (a, b) = (Device::new(), Device::new());
    a.join(&relays[0]);
    b.join(&relays[1]);
    for device in [&a, &b] {
        device.edit_config(|text| {
            format!("{text}{STRATEGIES}[collections.Sealed]\nencrypted = [\"pin\"]\n")
        });
        let key = device
            .command(&["key", "set"])
            .env("FERRY_PASSPHRASE", "records table passphrase")
            .output()
            .unwrap();
        assert!(key.status.success(), "{key:?}");
    }
    let (da, db_) = (a.start_daemon_logged(), b.start_daemon_logged());
    for collection in STRATEGY_COLLECTIONS {
        for i in 0..4 {
            common::call(
                &da,
                "put",
                json!({ "collection": collection, "id": format!("r{i}"),
                        "fields": { "n": i, "by": "a" } }),
            );
        }
        common::call(
            &db_,
            "put",
            json!({ "collection": collection, "id": "b0", "fields": { "n": 0, "by": "b" } }),
        );
    }
    wait_converged(&[&da, &db_], 15);
    wait_materialized(&db, 15);
    assert_table_shows(&db, &[&da, &db_]);
    assert!(da.terminate().success());
    assert!(db_.terminate().success());

    // Offline, in every collection: the same field set on both devices, a delete against an
    // update, a plain delete, and different fields of one record.
    for collection in STRATEGY_COLLECTIONS {
        let at = |id: &str| format!("{collection}/{id}");
        offline_edit(&a, &["patch", &at("r0"), "--data", r#"{"n": 100}"#]);
        offline_edit(&b, &["patch", &at("r0"), "--data", r#"{"n": 200}"#]);
        offline_edit(&a, &["rm", &at("r1")]);
        offline_edit(&b, &["patch", &at("r1"), "--data", r#"{"n": 300}"#]);
        offline_edit(&a, &["rm", &at("r2")]);
        offline_edit(&a, &["patch", &at("r3"), "--data", r#"{"by": "a again"}"#]);
        offline_edit(&b, &["patch", &at("r3"), "--data", r#"{"extra": true}"#]);
    }
    let da = a.start_daemon_logged();
    wait_converged(&[&da], 27);
    let db_ = b.start_daemon_logged();
    wait_converged(&[&da, &db_], 36);
    wait_materialized(&db, 36);
    assert_table_shows(&db, &[&da, &db_]);
    let table = records_table(&db);
    for collection in STRATEGY_COLLECTIONS {
        let row = &table[&(collection.to_owned(), "r2".to_owned())];
        assert!(row.1, "{collection}/r2 is deleted: {row:?}");
    }
    let open = db.sql("SELECT count(*) FROM conflicts WHERE open");
    assert_ne!(open, "0", "the manual collection holds open conflicts");

    // Both relays stopped, one started again: it goes on from the position recorded, leaving
    // the rows it wrote before as they are (this one altered behind its back stays so).
    let port = relays[0].port;
    for relay in &mut relays {
        assert!(relay.terminate().success(), "{}", relay.log());
    }
    db.sql("UPDATE records SET fields = '{\"altered\": true}' WHERE collection = 'Merge' AND id = 'b0'");
    let relay = Relay::start(&dirs[0], Some(port));
    common::call(
        &da,
        "put",
        json!({ "collection": "Merge", "id": "r4", "fields": { "n": 4 } }),
    );
    common::call(
        &da,
        "patch",
        json!({ "collection": "Lww", "id": "r0", "fields": { "n": 7 } }),
    );
    wait_converged(&[&da], 38);
    wait_materialized(&db, 38);
    assert_eq!(
        records_table(&db)[&("Merge".to_owned(), "b0".to_owned())].0,
        json!({ "altered": true }),
        "a restarted relay goes on from the recorded position"
    );
    common::call(
        &da,
        "patch",
        json!({ "collection": "Merge", "id": "b0", "fields": { "n": 1 } }),
    );
    wait_converged(&[&da], 39);
    wait_materialized(&db, 39);
    assert_table_shows(&db, &[&da]);

    // An encrypted field is in the table as the envelope the relay holds, never in clear.
    common::call(
        &da,
        "put",
        json!({ "collection": "Sealed", "id": "s1", "fields": { "pin": "4321", "name": "n" } }),
    );
    wait_converged(&[&da], 40);
    wait_materialized(&db, 40);
    let got = common::call(&da, "get", json!({ "collection": "Sealed", "id": "s1" }));
    assert_eq!(
        got["fields"],
        json!({ "pin": "4321", "name": "n" }),
        "{got}"
    );
    let row = &records_table(&db)[&("Sealed".to_owned(), "s1".to_owned())];
    assert_eq!(row.0["name"], json!("n"), "{row:?}");
    assert!(row.0["pin"]["$sealed"].is_string(), "{row:?}");
    assert!(!row.0.to_string().contains("4321"), "{row:?}");

    let status = relay.operator().ferry(&["--json", "relay", "status"]);
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["spaces"],
        json!([{ "space": "default", "head": 40, "materialized": 40, "entries_behind": 0,
                 "seconds_behind": 0.0 }]),
        "{status}"
    );
}

/// The `records` rows of the relay fixtures' space: id -> (fields, deleted, position).
fn fixture_rows(
    db: &Database,
) -> std::collections::BTreeMap<String, (serde_json::Value, bool, u64)> {
    let text = db.sql(&format!(
        "SELECT coalesce(json_agg(json_build_object('id', id, 'f', fields, 'd', deleted, \
         'p', log_position)), '[]') FROM records WHERE space = '{SPACE}'"
    ));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    rows.iter()
        .map(|row| {
            (
                row["id"].as_str().unwrap().to_owned(),
                (
                    row["f"].clone(),
                    row["d"].as_bool().unwrap(),
                    row["p"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// The record as the relay shows it under the default policy: (fields, deleted).
fn relay_view(relay: &RelayStore, id: &str) -> (serde_json::Value, bool) {
    let (view, _) = relay
        .view(SPACE, "Doc", id, &ferry::resolve::Policy::default())
        .unwrap()
        .unwrap();
    (serde_json::Value::Object(view.fields), view.deleted)
}

/// A materializer on `storage` with the default policies, covering `batch_entries` log entries
/// a step.
fn stepping_materializer(
    storage: &Arc<ferry::relay::storage::PgStorage>,
    metrics: &Arc<ferry::relay::metrics::RelayMetrics>,
    batch_entries: usize,
) -> ferry::relay::materializer::Materializer {
    use ferry::relay::materializer::{Materializer, MaterializerOptions};
    Materializer::new(
        storage.clone(),
        ferry::resolve::Policies::default(),
        metrics.clone(),
        MaterializerOptions {
            batch_entries,
            ..MaterializerOptions::default()
        },
    )
}

#[test]
fn the_materializer_shares_spaces_by_lease_drops_purged_records_and_rebuilds_past_compaction() {
    use relay_fixtures::Writer;

    let db = Database::new();
    let relay = relay_store(&db);
    let storage = Arc::new(db.open());
    let metrics = Arc::new(ferry::relay::metrics::RelayMetrics::default());
    // Two entries a step: every catch-up below takes several transactions.
    let materializer = || stepping_materializer(&storage, &metrics, 2);
    let (one, two) = (materializer(), materializer());
    let (_stop, stopped) = tokio::sync::watch::channel(false);

    let mut writers: Vec<Writer> = (0..4).map(|_| Writer::new(1)).collect();
    let mut uploads: Vec<UploadChange> = writers
        .iter_mut()
        .enumerate()
        .map(|(i, w)| upload(0, &format!("r{i}"), &w.put(json!({ "v": i }))))
        .collect();
    let deletion = writers[1].record.delete(3).unwrap().unwrap();
    uploads.push(upload(0, "r1", deletion.change.raw_bytes()));
    uploads.push(upload(0, "r2", &writers[2].patch(json!({ "w": "two" }))));
    relay.append(SPACE, &dev(1), &uploads).unwrap();
    let head = relay.head(SPACE).unwrap();
    assert_eq!(head, 6);

    // A space leased by another relay is left to it; once released, it is taken.
    assert_eq!(
        storage
            .lease_records(SPACE, "another relay", Duration::from_secs(60))
            .unwrap(),
        Some(0)
    );
    assert_eq!(two.catch_up(SPACE, &stopped).unwrap(), None);
    assert!(fixture_rows(&db).is_empty());
    storage.release_records(SPACE, "another relay").unwrap();
    assert_eq!(one.catch_up(SPACE, &stopped).unwrap(), Some(head));
    let rows = fixture_rows(&db);
    let positions: Vec<(&str, u64)> = rows.iter().map(|(id, row)| (id.as_str(), row.2)).collect();
    assert_eq!(positions, [("r0", 1), ("r1", 5), ("r2", 6), ("r3", 4)]);
    for (id, (fields, deleted, _)) in &rows {
        assert_eq!(relay_view(&relay, id), (fields.clone(), *deleted), "{id}");
    }
    assert!(rows["r1"].1, "r1 is deleted");

    // The deleted record purged: its row goes.
    assert_eq!(relay.purge_tombstones(SPACE, u64::MAX / 2, 1).unwrap(), 1);
    let head = relay.head(SPACE).unwrap();
    assert_eq!(two.catch_up(SPACE, &stopped).unwrap(), Some(head));
    let rows = fixture_rows(&db);
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["r0", "r2", "r3"]);

    // The log compacted past the materialized position: the rows are made again from the
    // records' documents.
    let more: Vec<UploadChange> = [0usize, 3]
        .into_iter()
        .map(|i| {
            upload(
                0,
                &format!("r{i}"),
                &writers[i].patch(json!({ "later": i })),
            )
        })
        .collect();
    relay.append(SPACE, &dev(1), &more).unwrap();
    db.sql(&format!(
        "UPDATE records SET fields = '{{\"stale\": true}}' WHERE space = '{SPACE}' AND id = 'r2'"
    ));
    let retention = ferry::relay::store::LogRetention {
        keep_log_days: 0,
        keep_log_entries: 1,
        flatten_history: false,
    };
    relay.compact_log(SPACE, u64::MAX / 2, retention).unwrap();
    let head = relay.head(SPACE).unwrap();
    assert!(
        storage.horizon(SPACE).unwrap() > head - 2,
        "compacted past the position"
    );
    assert_eq!(one.catch_up(SPACE, &stopped).unwrap(), Some(head));
    let rows = fixture_rows(&db);
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["r0", "r2", "r3"]);
    for (id, (fields, deleted, _)) in &rows {
        assert_eq!(relay_view(&relay, id), (fields.clone(), *deleted), "{id}");
    }
    assert_eq!(rows["r0"].2, head - 1);
    assert_eq!(rows["r3"].2, head);

    // A pass reads every space's lag into the metrics.
    let lag = one.pass(&stopped).unwrap();
    assert_eq!(lag.len(), 1);
    assert_eq!((lag[0].head, lag[0].materialized), (head, head));
    let text = metrics.render(&relay);
    assert!(text.contains("ferry_relay_records_lag_entries 0"), "{text}");
}

#[test]
fn rows_of_records_a_relay_created_are_handed_to_its_materializer_as_storage_would_make_them() {
    use ferry::relay::created::CreatedRows;
    use relay_fixtures::Writer;

    let db = Database::new();
    let created = Arc::new(CreatedRows::default());
    let relay = relay_store(&db).hand_created_to(created.clone());
    let storage = Arc::new(db.open());
    let metrics = Arc::new(ferry::relay::metrics::RelayMetrics::default());
    let materializer = |handed: bool| {
        // Three entries a step: a record created in one step and changed in the next, and one
        // created and changed within a step.
        let materializer = stepping_materializer(&storage, &metrics, 3);
        if handed {
            materializer.taking_created_from(created.clone())
        } else {
            materializer
        }
    };
    let (_stop, stopped) = tokio::sync::watch::channel(false);

    let mut writers: Vec<Writer> = (0..6).map(|_| Writer::new(1)).collect();
    let mut uploads: Vec<UploadChange> = writers
        .iter_mut()
        .enumerate()
        .map(|(i, w)| upload(0, &format!("r{i}"), &w.put(json!({ "v": i, "name": "n" }))))
        .collect();
    uploads.insert(
        2,
        upload(0, "r0", &writers[0].patch(json!({ "v": "zero" }))),
    );
    uploads.push(upload(0, "r2", &writers[2].patch(json!({ "w": 2 }))));
    let deletion = writers[4].record.delete(3).unwrap().unwrap();
    uploads.push(upload(0, "r4", deletion.change.raw_bytes()));
    relay.append(SPACE, &dev(1), &uploads).unwrap();
    let head = relay.head(SPACE).unwrap();
    assert_eq!(head, 9);
    assert!(created.bytes() > 0, "the created records' rows are kept");

    assert_eq!(
        materializer(true).catch_up(SPACE, &stopped).unwrap(),
        Some(head)
    );
    assert_eq!(
        created.bytes(),
        0,
        "each row kept was handed over or let go"
    );
    let handed = fixture_rows(&db);
    assert_eq!(handed.len(), 6);
    for (id, (fields, deleted, _)) in &handed {
        assert_eq!(relay_view(&relay, id), (fields.clone(), *deleted), "{id}");
    }
    assert!(handed["r4"].1, "r4 is deleted");

    // The same rows, made from storage alone.
    db.sql(&format!(
        "DELETE FROM records WHERE space = '{SPACE}';
         UPDATE records_progress SET position = 0 WHERE space = '{SPACE}'"
    ));
    assert_eq!(
        materializer(false).catch_up(SPACE, &stopped).unwrap(),
        Some(head)
    );
    assert_eq!(fixture_rows(&db), handed);
}

#[test]
fn a_new_records_base_names_its_log_entry_until_compaction_copies_the_change() {
    use relay_fixtures::Writer;

    let db = Database::new();
    let relay = relay_store(&db);
    let mut writers: Vec<Writer> = (0..3).map(|_| Writer::new(1)).collect();
    let firsts: Vec<Vec<u8>> = writers
        .iter_mut()
        .enumerate()
        .map(|(i, w)| w.put(json!({ "v": i })))
        .collect();
    let uploads: Vec<UploadChange> = firsts
        .iter()
        .enumerate()
        .map(|(i, change)| upload(0, &format!("r{i}"), change))
        .collect();
    relay.append(SPACE, &dev(1), &uploads).unwrap();
    let named = |db: &Database| {
        db.sql(&format!(
            "SELECT count(*) FROM bases WHERE space = '{SPACE}' AND logged_seq IS NOT NULL \
             AND octet_length(base) = 8"
        ))
    };
    assert_eq!(named(&db), "3", "each base names its entry");
    let storage = db.open();
    for (i, change) in firsts.iter().enumerate() {
        assert_eq!(
            storage
                .base(SPACE, "Doc", &format!("r{i}"))
                .unwrap()
                .as_ref(),
            Some(change)
        );
    }

    // Compacted through every entry: the bases hold the changes themselves.
    let head = relay.head(SPACE).unwrap();
    storage
        .compact_log(
            SPACE,
            ferry::relay::storage::LogCompaction {
                after: head,
                horizon: head,
                ..ferry::relay::storage::LogCompaction::default()
            },
        )
        .unwrap();
    assert_eq!(storage.read_log(SPACE, 0, 10, usize::MAX).unwrap(), []);
    assert_eq!(named(&db), "0");
    for (i, change) in firsts.iter().enumerate() {
        assert_eq!(
            storage
                .base(SPACE, "Doc", &format!("r{i}"))
                .unwrap()
                .as_ref(),
            Some(change)
        );
    }
}
