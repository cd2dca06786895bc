//! A device that signs in like any other and then speaks the sync protocol by hand (a stolen
//! laptop, a modified client), against a real relay process and two real daemons: each change it
//! forges (under another device's actor, another account's, with a reused or skipped sequence
//! number, on a dependency nobody logged, or one Automerge panics on) is refused with its reason
//! and nothing of it is logged, while every good change, its own and everyone else's, syncs. No
//! device stalls or panics, and all end with the same records.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use automerge::{ActorId, Change, ChangeHash};
use common::{
    Device, RawClient, Relay, Runtime, call, docs, enrolment, put_doc, status, wait_converged,
};
use ed25519_dalek::SigningKey;
use ferry::fuzzing::{Forgery, forge};
use ferry::record::{Fields, Record, decode_change};
use ferry_proto::session::device_id;
use ferry_proto::wire::{ChangeOutcome, ChangeResult, ErrorCode, LogEntry, Message, UploadChange};
use serde_json::{Value, json};

/// The hostile device's session.
struct Hostile {
    client: RawClient,
    batch: u64,
}

impl Hostile {
    async fn upload(&mut self, changes: &[(&str, &[u8])]) -> Vec<ChangeResult> {
        self.batch += 1;
        let changes = changes
            .iter()
            .enumerate()
            .map(|(i, (record, change))| UploadChange {
                entry: i as u64,
                collection: "Doc".into(),
                record: (*record).into(),
                change: change.to_vec(),
            })
            .collect();
        self.client
            .send(Message::Upload {
                batch: self.batch,
                changes,
            })
            .await;
        loop {
            match self.client.recv().await {
                Message::UploadAck { batch, results } if batch == self.batch => return results,
                Message::Changes { .. } => {}
                other => panic!("expected the UploadAck, got {other:?}"),
            }
        }
    }
}

fn actor_of(device: &str) -> ActorId {
    ActorId::try_from(device).expect("a device id is its actor in hex")
}

/// Record `Doc/id` as the log has it, written to as `actor`.
fn record_from(log: &[LogEntry], id: &str, actor: &ActorId) -> Record {
    let mut record = Record::new(actor);
    let changes: Vec<Vec<u8>> = log
        .iter()
        .filter(|e| e.collection == "Doc" && e.record == id)
        .map(|e| e.change.clone())
        .collect();
    record.apply_changes(&changes).expect("the log applies");
    record
}

fn patched(record: &mut Record, fields: Value) -> Change {
    let fields: Fields = serde_json::from_value(fields).expect("fields");
    record
        .patch(&fields, &[], 1)
        .expect("a patch")
        .expect("a change")
        .change
}

fn bent(change: &Change, forgeries: impl IntoIterator<Item = Forgery>) -> Vec<u8> {
    let mut bytes = change.raw_bytes().to_vec();
    for forgery in forgeries {
        let change = decode_change(&bytes).expect("a forged change decodes");
        bytes = forge(&change, forgery).expect("Automerge encodes the forgery");
    }
    bytes
}

/// Asserts a refusal of `code` whose message says `says`.
fn refused(result: &ChangeResult, code: ErrorCode, says: &str) {
    match &result.outcome {
        ChangeOutcome::Rejected { code: c, message } => {
            assert_eq!(*c, code, "{message}");
            assert!(message.contains(says), "{message:?} does not say {says:?}");
        }
        other => panic!("expected a refusal saying {says:?}, got {other:?}"),
    }
}

fn stored(result: &ChangeResult) {
    assert!(
        matches!(result.outcome, ChangeOutcome::Stored { .. }),
        "{:?}",
        result.outcome
    );
}

#[test]
fn a_hostile_device_cannot_forge_stall_or_crash_the_others() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start(&tmp.path().join("relay"), None);
    let (a, b) = (Device::new(), Device::new());
    a.join(&relay);
    b.join(&relay);
    let da = a.start_daemon_logged();
    let mut db = b.start_daemon_logged();
    put_doc(&da, "x", json!({ "title": "from a" }));
    wait_converged(&[&da, &db], 1);
    call(
        &db,
        "patch",
        json!({ "collection": "Doc", "id": "x", "fields": { "by_b": 1 } }),
    );
    wait_converged(&[&da, &db], 2);
    let a_id = status(&da)["device_id"]
        .as_str()
        .expect("a's id")
        .to_owned();
    let b_id = status(&db)["device_id"]
        .as_str()
        .expect("b's id")
        .to_owned();

    // B goes offline with its next write to x: the sequence number a forger would take.
    db.kill();
    let out = b.ferry(&["patch", "Doc/x", "--data", r#"{"offline": true}"#]);
    assert!(out.status.success(), "an offline write: {out:?}");

    // M: registered and signed in like any device. Another account has a device too.
    let rt = Runtime::new();
    let m_key = SigningKey::from_bytes(&[0x4d; 32]);
    let m_actor = actor_of(&device_id(m_key.verifying_key().as_bytes()));
    let (client, welcome) = rt.run(
        "M signs in",
        RawClient::sign_in(&relay, &m_key, "default", enrolment(&relay, "default")),
    );
    assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
    let mut m = Hostile { client, batch: 0 };
    relay.operator().add_account("other");
    let other_key = SigningKey::from_bytes(&[0x0a; 32]);
    let (_other, welcome) = rt.run(
        "a device of another account signs in",
        RawClient::sign_in(&relay, &other_key, "other", enrolment(&relay, "other")),
    );
    assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
    let other_actor = actor_of(&device_id(other_key.verifying_key().as_bytes()));

    let (head, log) = rt.run("M downloads the log", m.client.download(0));
    assert_eq!(head, 2);
    let mut x = record_from(&log, "x", &m_actor);
    let good_x = patched(&mut x, json!({ "from_m": 1 }));

    // Each forgery alone, built on x's logged heads.
    let cases = [
        (
            "B's actor with B's next sequence number",
            bent(&good_x, [Forgery::Actor(actor_of(&b_id)), Forgery::Seq(2)]),
            ErrorCode::InvalidChange,
            "not under the uploading device's own",
        ),
        (
            "a second sequence 1 for A's actor, with no dependencies",
            bent(
                &good_x,
                [
                    Forgery::Actor(actor_of(&a_id)),
                    Forgery::Seq(1),
                    Forgery::Deps(Vec::new()),
                ],
            ),
            ErrorCode::InvalidChange,
            "not under the uploading device's own",
        ),
        (
            "another account's device's actor",
            bent(&good_x, [Forgery::Actor(other_actor)]),
            ErrorCode::InvalidChange,
            "not under the uploading device's own",
        ),
        (
            "an operation on an object that does not exist",
            bent(&good_x, [Forgery::MissingObject]),
            ErrorCode::InvalidChange,
            "cannot be applied",
        ),
        (
            "a dependency the relay never logged",
            bent(&good_x, [Forgery::Deps(vec![ChangeHash([9; 32])])]),
            ErrorCode::MissingDependencies,
            "does not hold",
        ),
        (
            "a huge sequence number jump",
            bent(&good_x, [Forgery::Seq(1_000_000)]),
            ErrorCode::InvalidChange,
            "must follow the one before",
        ),
    ];
    for (what, change, code, says) in &cases {
        let results = rt.run(what, m.upload(&[("x", change)]));
        refused(&results[0], *code, says);
    }

    // One upload mixing good and bad changes: the good ones are logged.
    let kill = bent(&good_x, [Forgery::MissingObject]);
    let kill_hash = decode_change(&kill).expect("decodes").hash();
    let on_kill = bent(&good_x, [Forgery::Deps(vec![kill_hash])]);
    let mut y = Record::new(&m_actor);
    let fields: Fields = serde_json::from_value(json!({ "made_by": "m" })).expect("fields");
    let good_y = y.put(&fields, 1).expect("a put").expect("a change").change;
    let as_b = &cases[0].1;
    let results = rt.run(
        "the mixed upload",
        m.upload(&[
            ("y", good_y.raw_bytes()),
            ("x", &kill),
            ("x", &on_kill),
            ("x", good_x.raw_bytes()),
            ("x", as_b),
        ]),
    );
    stored(&results[0]);
    refused(&results[1], ErrorCode::InvalidChange, "cannot be applied");
    refused(
        &results[2],
        ErrorCode::InvalidChange,
        "refused in this upload",
    );
    stored(&results[3]);
    refused(&results[4], ErrorCode::InvalidChange, "not under");

    // Its own sequence number a second time: another change saying it is M's first on x.
    let again = bent(&good_x, [Forgery::Time(7)]);
    let results = rt.run("a reused sequence number", m.upload(&[("x", &again)]));
    refused(&results[0], ErrorCode::InvalidChange, "already used");

    // M's session goes on, and the log holds exactly the good changes.
    let (head, log) = rt.run("M downloads again", m.client.download(2));
    assert_eq!(head, 4);
    let logged: Vec<Vec<u8>> = log.iter().map(|e| e.change.clone()).collect();
    assert_eq!(
        logged,
        [good_y.raw_bytes().to_vec(), good_x.raw_bytes().to_vec()]
    );

    // B comes back with its offline write, A writes on: everything syncs everywhere.
    let db = b.start_daemon_logged();
    put_doc(&da, "after", json!({ "by": "a" }));
    wait_converged(&[&da, &db], 6);
    let on_a = docs(&da);
    assert_eq!(on_a, docs(&db));
    let x_fields = &on_a.iter().find(|(id, _)| id == "x").expect("x").1;
    assert_eq!(
        x_fields,
        &json!({ "title": "from a", "by_b": 1, "from_m": 1, "offline": true })
    );
    assert!(on_a.iter().any(|(id, _)| id == "y"));
    assert!(on_a.iter().any(|(id, _)| id == "after"));
    // x's history names each device for its own changes only.
    let history = call(&da, "history", json!({ "collection": "Doc", "id": "x" }));
    let authors: Vec<(String, u64)> = history["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["device"].as_str().expect("device").to_owned(),
                c["seq"].as_u64().expect("seq"),
            )
        })
        .collect();
    let m_id = m_actor.to_hex_string();
    let mut expected = vec![(a_id, 1), (b_id.clone(), 1), (b_id, 2), (m_id, 1)];
    expected.sort();
    let mut authors_sorted = authors.clone();
    authors_sorted.sort();
    assert_eq!(authors_sorted, expected, "{authors:?}");
    for (daemon, device) in [(&da, &a), (&db, &b)] {
        assert_eq!(status(daemon)["quarantined"]["count"], 0);
        let log = std::fs::read_to_string(device.log_path()).expect("the daemon's log");
        assert!(
            !log.contains("panicked"),
            "a daemon thread panicked:\n{log}"
        );
    }
}

/// A relay log entry as the relay stores it (`relay::store`: postcard, fields in this order).
#[derive(serde::Serialize)]
struct StoredEntry<'a> {
    collection: &'a str,
    record: &'a str,
    origin: &'a str,
    change: &'a [u8],
}

#[test]
fn a_bad_entry_an_older_relay_logged_is_quarantined_and_synced_past() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay_dir = tmp.path().join("relay");
    let mut relay = Relay::start(&relay_dir, None);
    let (a, b) = (Device::new(), Device::new());
    a.join(&relay);
    b.join(&relay);
    let (da, db) = (a.start_daemon_logged(), b.start_daemon_logged());
    put_doc(&da, "x", json!({ "n": 1 }));
    wait_converged(&[&da, &db], 1);

    // A change to x that Automerge panics on, logged at seq 2 by a relay that did not check it.
    let exported = call(&da, "export", json!({ "collection": "Doc", "id": "x" }));
    let document = base64::engine::general_purpose::STANDARD
        .decode(exported["automerge_base64"].as_str().expect("the document"))
        .expect("base64");
    let intruder = ActorId::from(&[0x4d; 16][..]);
    let mut x = Record::load(&document, &intruder).expect("x loads");
    let bad = bent(
        &patched(&mut x, json!({ "n": 2 })),
        [Forgery::MissingObject],
    );
    relay.kill();
    let kv = common::open_sled(&relay_dir.join("relay.db"));
    let mut batch = ferry::store::kv::Batch::default();
    let mut key = b"ldefault\0".to_vec();
    key.extend_from_slice(&2u64.to_be_bytes());
    let entry = StoredEntry {
        collection: "Doc",
        record: "x",
        origin: &intruder.to_hex_string(),
        change: &bad,
    };
    batch.put(key, postcard::to_stdvec(&entry).expect("encode"));
    ferry::store::kv::Kv::apply(&kv, batch).expect("write the old relay's entry");
    ferry::store::kv::Kv::flush(&kv).expect("flush");
    drop(kv);
    common::wait_sled_released(
        &ferry::store::kv::SledKv::current_dir(&relay_dir.join("relay.db"))
            .expect("the relay's store directory"),
    );
    let relay = Relay::start(&relay_dir, Some(relay.port));

    // Both devices pass the entry and go on syncing what comes after it.
    put_doc(&db, "y", json!({ "n": 3 }));
    wait_converged(&[&da, &db], 3);
    assert_eq!(docs(&da), docs(&db));
    assert_eq!(
        docs(&da),
        [
            ("x".to_owned(), json!({ "n": 1 })),
            ("y".to_owned(), json!({ "n": 3 }))
        ]
    );
    for (daemon, device) in [(&da, &a), (&db, &b)] {
        let quarantined = &status(daemon)["quarantined"];
        assert_eq!(quarantined["count"], 1, "{quarantined}");
        assert_eq!(quarantined["entries"][0]["seq"], 2);
        assert_eq!(quarantined["entries"][0]["record"], "x");
        let log = call(daemon, "log", json!({ "limit": 20 }));
        assert!(
            log["entries"].as_array().expect("entries").iter().any(|e| {
                e["status"] == "partial"
                    && e["error_message"]
                        .as_str()
                        .is_some_and(|m| m.contains("quarantined") && m.contains("seq 2"))
            }),
            "the SyncLog names the entry: {log}"
        );
        common::wait_for("the quarantined alert", common::TIMEOUT, || {
            status(daemon)["alerts"]
                .as_array()
                .is_some_and(|alerts| alerts.iter().any(|a| a["kind"] == "quarantined"))
        });
        let out = device.ferry(&["status"]);
        assert!(
            common::stdout(&out).contains("quarantined: 1 log entries"),
            "{out:?}"
        );
    }
    drop(relay);
}
