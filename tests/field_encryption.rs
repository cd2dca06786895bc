//! Encrypted fields end to end: the account key on real devices (`ferry key`), every read and
//! write path through a collection with `encrypted` fields, values bound to their place, and a
//! relay that stores and forwards them without ever holding them in plaintext.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use automerge::{ReadDoc as _, ScalarValue, Value as AmValue};
use base64::Engine as _;
use common::{Device, Relay, call, status, stderr, stdout, wait_converged};
use ferry::crypt::{AccountKey, FieldError, Keyring};
use ferry::store::kv::MemoryKv;
use ferry::store::{StoreError, StoreOptions, Write};
use ferry_proto::wire::LogEntry;
use serde_json::{Value, json};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;

const PASSPHRASE: &str = "correct horse battery staple";

const ENCRYPTED_SECTION: &str = "\n[collections.People]\nencrypted = [\"secret\", \"card\"]\n";

/// A device whose `People` collection encrypts `secret` and `card`.
fn device() -> Device {
    let device = Device::new();
    device.edit_config(|text| format!("{text}{ENCRYPTED_SECTION}"));
    device
}

fn set_key(device: &Device, passphrase: &str) -> Value {
    let out = device
        .command(&["--json", "key", "set"])
        .env("FERRY_PASSPHRASE", passphrase)
        .output()
        .expect("run ferry key set");
    assert!(out.status.success(), "key set failed: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("key set --json prints JSON")
}

fn key_status(device: &Device) -> Value {
    let out = device.ferry(&["--json", "key", "status"]);
    assert!(out.status.success(), "key status failed: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("key status --json prints JSON")
}

/// Values of every JSON type, each to go through an encrypted field.
fn every_type() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(-42),
        json!(u64::MAX),
        json!(2.5),
        json!(-0.0),
        json!("DE89 3704 0044 0532 0130 00"),
        json!(""),
        json!([1, "two", [3.0], {"four": null}]),
        json!({"number": "4111", "exp": {"m": 12, "y": 2030}}),
    ]
}

fn same_json(a: &Value, b: &Value) -> bool {
    // Compared as text, so `-0.0` and `0.0` stay different.
    serde_json::to_string(a).unwrap() == serde_json::to_string(b).unwrap()
}

#[test]
fn every_json_type_round_trips_through_every_read_and_write_path() {
    let device = device();
    set_key(&device, PASSPHRASE);
    let daemon = device.start_daemon();
    for (i, value) in every_type().into_iter().enumerate() {
        let id = format!("p{i}");
        call(
            &daemon,
            "put",
            json!({"collection": "People", "id": id, "fields": {"secret": value, "name": "plain"}}),
        );
        let got = call(&daemon, "get", json!({"collection": "People", "id": id}));
        assert!(
            same_json(&got["fields"]["secret"], &value),
            "put/get {value}: {got}"
        );
        // A patch replaces the value with another of a different type, then puts it back.
        call(
            &daemon,
            "patch",
            json!({"collection": "People", "id": id, "fields": {"card": value, "secret": "x"}}),
        );
        let got = call(&daemon, "get", json!({"collection": "People", "id": id}));
        assert!(
            same_json(&got["fields"]["card"], &value),
            "patch/get {value}: {got}"
        );
        assert_eq!(got["fields"]["secret"], "x");
        call(
            &daemon,
            "patch",
            json!({"collection": "People", "id": id, "fields": {"secret": value}}),
        );
    }
    let imported: Vec<Value> = every_type()
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"collection": "People", "id": format!("i{i}"), "fields": {"secret": v}}))
        .collect();
    call(&daemon, "import", json!({ "records": imported }));

    let listed = call(
        &daemon,
        "list",
        json!({"collection": "People", "limit": 100}),
    );
    let records = listed["records"].as_array().expect("records");
    assert_eq!(records.len(), 2 * every_type().len());
    for (i, value) in every_type().iter().enumerate() {
        let find = |id: &str| {
            records
                .iter()
                .find(|r| r["id"] == id)
                .unwrap_or_else(|| panic!("{id} listed"))
                .clone()
        };
        assert!(same_json(
            &find(&format!("p{i}"))["fields"]["secret"],
            value
        ));
        assert!(same_json(&find(&format!("p{i}"))["fields"]["card"], value));
        assert!(same_json(
            &find(&format!("i{i}"))["fields"]["secret"],
            value
        ));
    }

    // `ferry export` (JSON) gives plaintext, through the daemon.
    let out = device.ferry(&["export", "People", "--format", "json"]);
    assert!(out.status.success(), "export failed: {}", stderr(&out));
    let exported: Vec<Value> = serde_json::from_str(&stdout(&out)).expect("export JSON");
    for (i, value) in every_type().iter().enumerate() {
        let rec = exported
            .iter()
            .find(|r| r["id"] == format!("i{i}"))
            .expect("exported");
        assert!(same_json(&rec["fields"]["secret"], value));
    }

    // The stored document holds one bytes value with the version byte: never the plaintext.
    let raw = call(
        &daemon,
        "export",
        json!({"collection": "People", "id": "p6"}),
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw["automerge_base64"].as_str().expect("base64"))
        .expect("base64");
    let doc = automerge::AutoCommit::load(&bytes).expect("an Automerge document");
    match doc.get(automerge::ROOT, "secret").expect("read") {
        Some((AmValue::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Bytes(b) => assert_eq!(b.first(), Some(&ferry::crypt::ENVELOPE_V1)),
            other => panic!("expected bytes, got {other:?}"),
        },
        other => panic!("expected a scalar, got {other:?}"),
    }
    assert!(
        !contains(&bytes, b"DE89 3704"),
        "plaintext in the stored document"
    );
}

#[test]
fn an_unchanged_plaintext_writes_no_new_value() {
    let device = device();
    set_key(&device, PASSPHRASE);
    let daemon = device.start_daemon();
    let put = |fields: Value| {
        call(
            &daemon,
            "put",
            json!({"collection": "People", "id": "ada", "fields": fields}),
        )
    };
    put(json!({"secret": "s3cret", "n": 1}));
    let again = put(json!({"secret": "s3cret", "n": 1}));
    assert_eq!(
        again["operation"],
        Value::Null,
        "an identical put makes no change"
    );
    put(json!({"secret": "s3cret", "n": 2}));
    call(
        &daemon,
        "patch",
        json!({"collection": "People", "id": "ada", "fields": {"secret": "s3cret", "n": 3}}),
    );
    let history = call(
        &daemon,
        "history",
        json!({"collection": "People", "id": "ada"}),
    );
    let entries = history["changes"].as_array().expect("entries");
    assert_eq!(entries.len(), 3, "{history}");
    for later in &entries[1..] {
        assert_eq!(later["fields"], json!(["n"]), "only n changed: {history}");
    }
    put(json!({"secret": "other", "n": 3}));
    let history = call(
        &daemon,
        "history",
        json!({"collection": "People", "id": "ada"}),
    );
    let last = history["changes"]
        .as_array()
        .and_then(|e| e.last())
        .cloned();
    assert_eq!(last.expect("an entry")["fields"], json!(["secret"]));
}

#[test]
fn keys_are_derived_alike_moved_by_export_and_damage_is_refused() {
    let (a, b, c) = (device(), device(), device());
    assert_eq!(key_status(&a), json!({"set": false, "fingerprint": null}));
    // No key: a write to an encrypted field fails with what to do, and nothing is written.
    let out = a.ferry(&["put", "People/x", "--data", r#"{"secret": "s"}"#]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ferry key set"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("\"s\""));
    let out = a.ferry(&["put", "People/y", "--data", r#"{"name": "plain"}"#]);
    assert!(
        out.status.success(),
        "plain fields need no key: {}",
        stderr(&out)
    );

    let on_a = set_key(&a, PASSPHRASE);
    let on_b = set_key(&b, PASSPHRASE);
    let fingerprint = on_a["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned();
    assert_eq!(fingerprint.len(), 16);
    assert_eq!(on_a["fingerprint"], on_b["fingerprint"]);
    assert_eq!(
        key_status(&a),
        json!({"set": true, "fingerprint": fingerprint})
    );
    let status_text = stdout(&a.ferry(&["key", "status"]));
    assert!(!status_text.contains(PASSPHRASE));

    let out = a.ferry(&["key", "export"]);
    assert!(out.status.success());
    let line = stdout(&out).trim().to_owned();
    assert!(line.starts_with("ferry-key-v1:"), "{line}");
    let imported = c.ferry_with_input(&["--json", "key", "import"], line.as_bytes());
    assert!(imported.status.success(), "{}", stderr(&imported));
    assert_eq!(key_status(&c)["fingerprint"], fingerprint);

    let mut damaged = line.clone().into_bytes();
    let at = damaged.len() / 2;
    damaged[at] = if damaged[at] == b'x' { b'y' } else { b'x' };
    let d = device();
    let out = d.ferry_with_input(&["key", "import"], &damaged);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    assert_eq!(key_status(&d)["set"], false);

    // Another passphrase is another key, and replacing one needs saying so.
    let out = a
        .command(&["key", "set"])
        .env("FERRY_PASSPHRASE", "another passphrase")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--replace"), "{}", stderr(&out));
    assert_eq!(key_status(&a)["fingerprint"], fingerprint);
}

#[test]
fn a_running_daemon_picks_up_a_key_and_a_wrong_key_is_a_typed_error() {
    let device = device();
    let daemon = device.start_daemon();
    let mut client = daemon.client();
    let write =
        json!({"collection": "People", "id": "ada", "fields": {"secret": "s3cret", "name": "Ada"}});
    match client.call("put", write.clone()) {
        Err(ferry::ipc::ClientError::Api(e)) => {
            assert_eq!(e.code, ferry::service::code::NO_KEY);
            assert!(e.message.contains("ferry key set"), "{}", e.message);
            assert!(!e.message.contains("s3cret"));
        }
        other => panic!("expected the no-key error, got {other:?}"),
    }
    let set = set_key(&device, PASSPHRASE);
    assert_eq!(set["daemon_reloaded"], true);
    call(&daemon, "put", write);
    call(
        &daemon,
        "put",
        json!({"collection": "People", "id": "bob", "fields": {"name": "Bob"}}),
    );

    // The key is replaced: the value written with the old one no longer decrypts.
    let out = device
        .command(&["key", "set", "--replace"])
        .env("FERRY_PASSPHRASE", "another passphrase")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    let fingerprint = key_status(&device)["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    match client.call("get", json!({"collection": "People", "id": "ada"})) {
        Err(ferry::ipc::ClientError::Api(e)) => {
            assert_eq!(e.code, ferry::service::code::UNDECRYPTABLE);
            assert!(e.message.contains("People/ada") && e.message.contains("secret"));
            assert!(e.message.contains(&fingerprint), "{}", e.message);
            assert!(!e.message.contains("s3cret"));
        }
        other => panic!("expected the undecryptable error, got {other:?}"),
    }
    // A listing still shows every record; the field that does not decrypt is a placeholder.
    let listed = call(&daemon, "list", json!({"collection": "People"}));
    let records = listed["records"].as_array().expect("records");
    assert_eq!(records.len(), 2);
    let ada = &records[0]["fields"];
    assert_eq!(ada["name"], "Ada");
    assert_eq!(ada["secret"]["$encrypted"], true);
    assert!(
        ada["secret"]["error"]
            .as_str()
            .unwrap()
            .contains(&fingerprint)
    );
    assert_eq!(
        ada["secret"].as_object().unwrap().len(),
        2,
        "no ciphertext: {ada}"
    );
}

/// A store in this process over memory, with `People.secret` encrypted and `key` set.
fn memory_store(key: AccountKey) -> ferry::store::Store {
    let mut options = StoreOptions::default();
    let config: ferry::config::Config = toml::from_str(ENCRYPTED_SECTION).expect("config");
    options.policies.collections = config
        .collections
        .iter()
        .map(|(name, c)| (name.clone(), c.policy()))
        .collect();
    options.keyring = Arc::new(Keyring::with(Some(key)));
    common::open_test_store(
        Box::new(MemoryKv::new()),
        options,
        &common::StepClock::new(),
    )
}

fn key_from(passphrase: &str) -> AccountKey {
    AccountKey::derive(passphrase.as_bytes(), "default").expect("derive")
}

/// The envelope the store wrote for `collection/id`'s `field`.
fn envelope(store: &ferry::store::Store, id: &str, field: &str) -> Vec<u8> {
    let bytes = store.export_doc("People", id).expect("export");
    let doc = automerge::AutoCommit::load(&bytes).expect("load");
    match doc.get(automerge::ROOT, field).expect("read") {
        Some((AmValue::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Bytes(b) => b.clone(),
            other => panic!("expected bytes, got {other:?}"),
        },
        other => panic!("expected a scalar, got {other:?}"),
    }
}

/// Has `store` receive, as if from another device through the relay, a record `id` whose
/// `secret` holds `bytes`.
fn receive(store: &ferry::store::Store, seq: u64, id: &str, field: &str, bytes: Vec<u8>) {
    use automerge::transaction::Transactable as _;
    let mut doc = automerge::AutoCommit::new().with_actor(automerge::ActorId::from(&[9u8; 16][..]));
    doc.put(automerge::ROOT, "$deleted", false).expect("put");
    doc.put(automerge::ROOT, "name", "moved").expect("put");
    doc.put(automerge::ROOT, field, ScalarValue::Bytes(bytes))
        .expect("put");
    doc.commit_with(
        automerge::transaction::CommitOptions::default()
            .with_message("create")
            .with_time(1),
    );
    let change = doc
        .get_last_local_change()
        .expect("a change")
        .raw_bytes()
        .to_vec();
    let entry = LogEntry {
        seq,
        collection: "People".into(),
        record: id.into(),
        change,
    };
    store.apply_remote(&[entry], seq).expect("apply");
}

#[test]
fn a_value_moved_to_another_record_or_field_or_damaged_does_not_decrypt() {
    let store = memory_store(key_from(PASSPHRASE));
    store
        .write(Write::Put {
            collection: "People".into(),
            id: Some("p1".into()),
            fields: json!({"secret": "s3cret", "card": "4111"})
                .as_object()
                .unwrap()
                .clone(),
        })
        .expect("put");
    let sealed = envelope(&store, "p1", "secret");
    receive(&store, 1, "p2", "secret", sealed.clone());
    receive(&store, 2, "p3", "card", sealed.clone());
    let mut damaged = sealed.clone();
    damaged.truncate(10);
    receive(&store, 3, "p4", "secret", damaged);
    let mut unknown_version = sealed;
    unknown_version[0] = 0x7f;
    receive(&store, 4, "p5", "secret", unknown_version);

    for (id, wrong_key) in [("p2", true), ("p3", true), ("p4", false), ("p5", false)] {
        match store.get("People", id) {
            Err(StoreError::Field(FieldError::WrongKey { id: named, .. })) if wrong_key => {
                assert_eq!(named, id)
            }
            Err(StoreError::Field(FieldError::Damaged { id: named, .. })) if !wrong_key => {
                assert_eq!(named, id)
            }
            other => panic!("{id}: expected a typed decryption error, got {other:?}"),
        }
    }
    let (listed, _) = store.list("People", None, 100).expect("list");
    assert_eq!(listed.len(), 5);
    assert_eq!(listed[0].fields.get("secret").unwrap(), "s3cret");
    for record in &listed[1..] {
        let fields = record.fields.parse().unwrap();
        let shown = fields
            .values()
            .find(|v| v.get("$encrypted").is_some())
            .unwrap_or_else(|| panic!("{} shows a placeholder", record.id));
        assert_eq!(
            shown.as_object().unwrap().len(),
            2,
            "no ciphertext: {shown}"
        );
        assert_eq!(fields["name"], "moved");
    }

    // The same documents under another key: a typed error naming that key.
    let other = key_from("another passphrase");
    let fingerprint = other.fingerprint();
    store.keyring().set(Some(other));
    match store.get("People", "p1") {
        Err(StoreError::Field(FieldError::WrongKey { fingerprint: f, .. })) => {
            assert_eq!(f, fingerprint)
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
    store.keyring().set(None);
    assert!(matches!(
        store.get("People", "p1"),
        Err(StoreError::Field(FieldError::NoKey { .. }))
    ));
}

#[test]
fn a_user_value_cannot_pass_for_an_encrypted_one() {
    let store = memory_store(key_from(PASSPHRASE));
    let forged = json!({"name": {"$sealed": "AQID"}});
    let result = store.write(Write::Put {
        collection: "People".into(),
        id: Some("p1".into()),
        fields: forged.as_object().unwrap().clone(),
    });
    assert!(
        matches!(
            result,
            Err(StoreError::Record(
                ferry::record::RecordError::ReservedField { .. }
            ))
        ),
        "{result:?}"
    );
}

/// Runs `ferry relay` on `dir`, which must refuse to start: a relay that serves instead is
/// killed once the timeout passes, and the test fails.
fn refused_relay(dir: &Path) -> String {
    let mut child = std::process::Command::new(common::ferry_bin())
        .arg("--data-dir")
        .arg(dir)
        .args(["relay", "--listen", "127.0.0.1:0"])
        .env_remove("FERRY_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ferry relay");
    let exited = common::wait_for_ok("ferry relay to refuse", common::TIMEOUT, || {
        match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err("still running".into()),
            Err(e) => Err(format!("cannot wait for it: {e}")),
        }
    });
    let out = child.wait_with_output().expect("relay output");
    assert!(!exited.success(), "ferry relay started");
    stderr(&out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The places in `files` that hold `needle` in any of its plain, base64 or hex forms.
fn found_in(files: &[std::path::PathBuf], needle: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
    let forms = [
        needle.to_owned(),
        b64.encode(needle),
        b64url.encode(needle),
        hex.clone(),
        hex.to_uppercase(),
    ];
    let mut hits = Vec::new();
    for file in files {
        let bytes = std::fs::read(file).unwrap_or_default();
        for form in &forms {
            // A base64 form's last characters depend on what follows it: its first 16 do not.
            let probe = &form.as_bytes()[..form.len().min(16)];
            if contains(&bytes, probe) {
                hits.push(format!("{} ({form})", file.display()));
            }
        }
    }
    hits
}

#[test]
fn the_relay_never_sees_an_encrypted_value() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay_dir = home.path().join("relay");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&relay_dir)
        .expect("create the relay's directory");
    // Debug logging, so that whatever the relay could log about what it handles is logged.
    std::fs::write(relay_dir.join("config.toml"), "[log]\nlevel = \"debug\"\n").expect("config");
    let relay = Relay::start(&relay_dir, None);
    let (a, b) = (device(), device());
    a.join(&relay);
    b.join(&relay);
    set_key(&a, PASSPHRASE);
    set_key(&b, PASSPHRASE);
    let daemon_a = a.start_daemon_logged();
    let daemon_b = b.start_daemon_logged();

    let mut random = [0u8; 12];
    getrandom::fill(&mut random).expect("randomness");
    let canary: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let canary = format!("canary-{canary}");
    let marker = format!("plain-marker-{}", &canary[7..]);
    call(
        &daemon_a,
        "put",
        json!({"collection": "People", "id": "ada", "fields": {"secret": canary, "name": marker}}),
    );
    wait_converged(&[&daemon_a, &daemon_b], 1);
    let on_b = call(
        &daemon_b,
        "get",
        json!({"collection": "People", "id": "ada"}),
    );
    assert_eq!(on_b["fields"]["secret"], canary);
    assert_eq!(on_b["fields"]["name"], marker);
    let status_b = status(&daemon_b);
    assert!(!status_b.to_string().contains(&canary));

    // Flush the relay's store to its files before reading them: stop it.
    drop(relay);
    let mut scanned = files(&relay_dir);
    scanned.push(relay_dir.with_file_name("relay.log"));
    let relay_log = std::fs::read_to_string(relay_dir.with_file_name("relay.log")).unwrap();
    assert!(
        relay_log.contains("DEBUG"),
        "the relay logged at debug level"
    );
    let store_files: Vec<_> = files(&relay_dir)
        .into_iter()
        .filter(|f| f.starts_with(relay_dir.join("relay.db")))
        .collect();
    assert!(
        !found_in(&store_files, &marker).is_empty(),
        "the plain marker is in the relay's store, so the scan reads what the relay stored"
    );
    let hits = found_in(&scanned, &canary);
    assert!(hits.is_empty(), "the canary reached the relay: {hits:?}");
    // The devices' own logs do not hold it either.
    let hits = found_in(&[a.log_path(), b.log_path()], &canary);
    assert!(hits.is_empty(), "the canary is in a device log: {hits:?}");
    // The network leg is not captured: tcpdump is not installed where these tests run, and the
    // leg is QUIC, encrypted by TLS 1.3 on top of the field encryption, so a capture would show
    // neither the canary nor the marker. What the relay holds and logs is what it could leak.
}

#[test]
fn concurrent_writes_to_an_encrypted_field_settle_on_one_whole_value() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start(&home.path().join("relay"), None);
    let (a, b) = (device(), device());
    a.join(&relay);
    b.join(&relay);
    set_key(&a, PASSPHRASE);
    set_key(&b, PASSPHRASE);
    // Both write while their daemons are down: neither saw the other's value.
    let write = |d: &Device, value: &str| {
        let out = d.ferry(&[
            "put",
            "People/ada",
            "--data",
            &json!({"secret": {"iban": value, "holder": value}}).to_string(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    write(&a, "from-a");
    write(&b, "from-b");
    let daemon_a = a.start_daemon();
    let daemon_b = b.start_daemon();
    wait_converged(&[&daemon_a, &daemon_b], 2);
    let read = |d| call(d, "get", json!({"collection": "People", "id": "ada"}))["fields"].clone();
    let (on_a, on_b) = (read(&daemon_a), read(&daemon_b));
    assert_eq!(on_a, on_b);
    let secret = &on_a["secret"];
    assert!(
        secret == &json!({"iban": "from-a", "holder": "from-a"})
            || secret == &json!({"iban": "from-b", "holder": "from-b"}),
        "one whole value, never a mix: {secret}"
    );
}

#[test]
fn exposed_data_directories_and_key_files_are_refused() {
    let device = device();
    set_key(&device, PASSPHRASE);
    let key_path = device.data_dir.join("account.key");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&device.data_dir), 0o700);

    let refused = |args: &[&str], needle: &str| {
        let out = device.ferry(args);
        assert!(!out.status.success(), "{args:?} started");
        let err = stderr(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        &["daemon"],
        &format!("run `chmod 600 {}`", key_path.display()),
    );
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o620)).unwrap();
    refused(&["daemon"], "chmod 600");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&device.data_dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    refused(
        &["daemon"],
        &format!("run `chmod 700 {}`", device.data_dir.display()),
    );
    std::fs::set_permissions(&device.data_dir, std::fs::Permissions::from_mode(0o701)).unwrap();
    refused(&["daemon"], "chmod 700");
    std::fs::set_permissions(&device.data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();

    // The relay: a new data directory is made owner-only; an open one is refused.
    let home = tempfile::tempdir().expect("temp dir");
    let relay_dir = home.path().join("relay");
    drop(Relay::start(&relay_dir, None));
    assert_eq!(mode(&relay_dir), 0o700);
    std::fs::set_permissions(&relay_dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    let err = refused_relay(&relay_dir);
    assert!(
        err.contains(&format!("chmod 700 {}", relay_dir.display())),
        "{err}"
    );
    std::fs::set_permissions(&relay_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let relay_key = relay_dir.join("relay-key.pem");
    std::fs::set_permissions(&relay_key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = refused_relay(&relay_dir);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn conflicts_show_encrypted_values_in_plaintext_and_resolve_with_new_ones() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start(&home.path().join("relay"), None);
    let vault = "\n[collections.Vault]\nstrategy = \"manual\"\nencrypted = [\"secret\"]\n";
    let (a, b) = (device(), device());
    for d in [&a, &b] {
        d.edit_config(|text| format!("{text}{vault}"));
        d.join(&relay);
        set_key(d, PASSPHRASE);
    }
    for (d, value) in [(&a, "from-a"), (&b, "from-b")] {
        let data = json!({"secret": value, "label": "v"}).to_string();
        let out = d.ferry(&["put", "Vault/v1", "--data", &data]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let daemon_a = a.start_daemon();
    let daemon_b = b.start_daemon();
    wait_converged(&[&daemon_a, &daemon_b], 2);

    let listed = call(&daemon_a, "conflicts.list", json!({}));
    let text = listed.to_string();
    assert!(
        !text.contains("$sealed") && !text.contains("$encrypted"),
        "{text}"
    );
    let conflict = &listed["conflicts"][0];
    let sides = [
        conflict["server"]["fields"]["secret"].clone(),
        conflict["client"]["fields"]["secret"].clone(),
    ];
    assert!(
        sides.contains(&json!("from-a")) && sides.contains(&json!("from-b")),
        "{conflict}"
    );
    let id = conflict["id"].as_str().expect("id").to_owned();
    let got = call(&daemon_b, "conflicts.get", json!({ "id": id }));
    let field = got["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["path"] == json!(["secret"])))
        .unwrap_or_else(|| panic!("the secret field is in conflict: {got}"));
    let values = [field["server"].clone(), field["client"].clone()];
    assert!(
        values.contains(&json!("from-a")) && values.contains(&json!("from-b")),
        "{got}"
    );

    let resolved = call(
        &daemon_a,
        "conflicts.resolve",
        json!({"id": id, "take": "merge", "data": {"secret": "settled"}}),
    );
    assert!(!resolved.to_string().contains("$sealed"), "{resolved}");
    wait_converged(&[&daemon_a, &daemon_b], 3);
    for d in [&daemon_a, &daemon_b] {
        let got = call(d, "get", json!({"collection": "Vault", "id": "v1"}));
        assert_eq!(got["fields"], json!({"secret": "settled", "label": "v"}));
    }
}
