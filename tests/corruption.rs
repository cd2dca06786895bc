//! A device store damaged on disk, with real daemons and a real relay: the damage is found when
//! the daemon opens the store, `ferry status` and the `store_damaged` alert say so, `ferry
//! doctor` says what, and `ferry doctor --repair` repairs it from the relay with nothing
//! acknowledged lost (the unsynced changes sled's recovery dropped come back from the journal).
//! Damage is seeded: a failure names its seed.

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
    Daemon, Device, Operator, Relay, TIMEOUT, call, status, stdout, wait_converged, wait_for_ok,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const SYNCED: u64 = 50;
const OFFLINE: u64 = 5;

fn put(daemon: &Daemon, id: u64) {
    call(
        daemon,
        "put",
        json!({"collection": "Note", "id": format!("n{id:03}"), "fields": {"n": id}}),
    );
}

/// sled's log file of the device's store.
fn sled_file(device: &Device) -> PathBuf {
    ferry::store::kv::SledKv::current_dir(&device.data_dir.join("store"))
        .expect("store dir")
        .join("db")
}

/// xorshift64*, so that the damage depends on the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Flips at least `count` bytes of `path`: one in every copy the file holds of the ids of
/// records chosen by `seed` among `n000` to the last of `records` (keys, and values naming
/// their record), records being chosen until that many bytes are flipped. Where sled put each
/// copy depends on when it flushed, so offsets chosen in the file would hit different data on
/// different runs; the records' every copy is the same data whatever the layout.
fn flip_records(path: &Path, records: u64, count: usize, seed: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut rng = Rng(seed | 1);
    let mut ids: Vec<u64> = (0..records).collect();
    let mut flipped = 0;
    while flipped < count {
        assert!(
            !ids.is_empty(),
            "only {flipped} bytes hold the records' ids"
        );
        let id = ids.swap_remove((rng.next() % ids.len() as u64) as usize);
        let name = format!("n{id:03}");
        let flip = (rng.next() % 255 + 1) as u8;
        let copies: Vec<usize> = bytes
            .windows(name.len())
            .enumerate()
            .filter(|(_, w)| *w == name.as_bytes())
            .map(|(at, _)| at)
            .collect();
        for at in copies {
            bytes[at + name.len() - 1] ^= flip;
            flipped += 1;
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// Cuts the log's last `bytes` bytes of data off, as a disk that lost its last writes would.
fn truncate_tail(path: &Path, bytes: usize) {
    let data = std::fs::read(path).unwrap();
    let end = data.iter().rposition(|&b| b != 0).unwrap() + 1;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(end.saturating_sub(bytes) as u64).unwrap();
}

fn doctor(device: &Device, repair: bool) -> (bool, Value) {
    let args: &[&str] = if repair {
        &["--json", "doctor", "--repair"]
    } else {
        &["--json", "doctor"]
    };
    let out = device.ferry(args);
    let answer = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("doctor's JSON ({e}): {out:?}"));
    (out.status.success(), answer)
}

fn alert_kinds(status: &Value) -> Vec<String> {
    status["alerts"]
        .as_array()
        .map(|alerts| {
            alerts
                .iter()
                .map(|a| a["kind"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A device that synced `SYNCED` records through a relay in `relay_dir`, then wrote `OFFLINE`
/// more while the relay was down (acknowledged, queued), and whose daemon stopped cleanly.
/// Returns it with the relay's port, to start the relay there again.
fn synced_then_offline(relay_dir: &Path) -> (Device, u16) {
    let mut relay = Relay::start(relay_dir, None);
    let port = relay.port;
    let a = Device::new();
    a.join(&relay);
    let daemon = a.start_daemon();
    for id in 0..SYNCED {
        put(&daemon, id);
    }
    wait_converged(&[&daemon], SYNCED);
    relay.kill();
    for id in SYNCED..SYNCED + OFFLINE {
        put(&daemon, id);
    }
    assert!(daemon.terminate().success());
    (a, port)
}

/// The steps: 50 records synced, 5 written while the relay is down (acknowledged,
/// queued), the daemon stopped cleanly, then `damage` done to the stopped store. The damage
/// must be found at the next start and reported; after `ferry doctor --repair` and with the
/// relay back, the device and the relay hold all 55 records.
fn damaged_store_is_found_and_repaired(what: &str, damage: impl FnOnce(&Path)) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay_dir = tmp.path().join("relay");
    let (a, port) = synced_then_offline(&relay_dir);
    damage(&sled_file(&a));

    // The daemon starts, and says the store is damaged: in status, and with an alert.
    let daemon = a.start_daemon();
    let damaged = status(&daemon);
    assert!(damaged["damage"].is_object(), "{what}: {damaged}");
    wait_for_ok("the store_damaged alert", TIMEOUT, || {
        let s = status(&daemon);
        if alert_kinds(&s).contains(&"store_damaged".to_owned()) {
            Ok(())
        } else {
            Err(s["alerts"].to_string())
        }
    });
    let human = stdout(&a.ferry(&["status"]));
    assert!(human.contains("store: DAMAGED"), "{what}: {human}");
    // A repair is refused while the daemon runs.
    let refused = a.ferry(&["doctor", "--repair"]);
    assert!(!refused.status.success(), "{what}: {refused:?}");
    assert!(daemon.terminate().success());

    let (sound, checkup) = doctor(&a, false);
    assert!(!sound, "{what}: doctor says damaged: {checkup}");
    assert!(
        checkup["checkup"]["damage"].is_object(),
        "{what}: {checkup}"
    );
    let (repaired_ok, repaired) = doctor(&a, true);
    assert!(repaired_ok, "{what}: {repaired}");
    assert!(repaired["repaired"].is_object(), "{what}: {repaired}");
    let (sound, after) = doctor(&a, false);
    assert!(sound, "{what}: sound after the repair: {after}");

    all_records_everywhere(what, &a, &relay_dir, port);
}

/// With the relay back, every record is on the device and in the relay's log (a second device
/// reads them all), and the device's store_damaged alert is gone.
fn all_records_everywhere(what: &str, a: &Device, relay_dir: &Path, port: u16) {
    let relay = Relay::start(relay_dir, Some(port));
    let daemon = a.start_daemon();
    wait_converged(&[&daemon], SYNCED + OFFLINE);
    let s = status(&daemon);
    assert!(s.get("damage").is_none(), "{what}: {s}");
    assert_eq!(s["documents"], json!(SYNCED + OFFLINE), "{what}: {s}");
    for id in 0..SYNCED + OFFLINE {
        let record = call(
            &daemon,
            "get",
            json!({"collection": "Note", "id": format!("n{id:03}")}),
        );
        assert_eq!(record["fields"]["n"], json!(id), "{what}: {record}");
    }
    wait_for_ok("the store_damaged alert to clear", TIMEOUT, || {
        let s = status(&daemon);
        if alert_kinds(&s).contains(&"store_damaged".to_owned()) {
            Err(s["alerts"].to_string())
        } else {
            Ok(())
        }
    });
    // A second device reads the same 55 from the relay: nothing damaged was uploaded.
    let b = Device::new();
    b.join(&relay);
    let other = b.start_daemon();
    wait_converged(&[&daemon, &other], SYNCED + OFFLINE);
    assert_eq!(status(&other)["documents"], json!(SYNCED + OFFLINE));
}

/// The issue: 64 bytes flipped across the data file (in every copy of the records chosen).
#[test]
fn sixty_four_flipped_bytes_are_found_and_nothing_acknowledged_is_lost() {
    for seed in [1, 2] {
        damaged_store_is_found_and_repaired(&format!("64 bytes flipped, seed {seed}"), |path| {
            flip_records(path, SYNCED + OFFLINE, 64, seed)
        });
    }
}

/// The log's tail lost, as a disk that dropped its last writes leaves it.
#[test]
fn a_truncated_log_tail_is_found_and_nothing_acknowledged_is_lost() {
    damaged_store_is_found_and_repaired("the last 4 KiB truncated", |path| {
        truncate_tail(path, 4096)
    });
}

/// Values damaged under sled, which takes them as any write (only their own checksums can
/// tell): a synced record's document, an unsynced change's queue entry, and another unsynced
/// change's pending-index key.
#[test]
fn a_damaged_document_queue_entry_and_index_key_are_found_and_nothing_acknowledged_is_lost() {
    damaged_store_is_found_and_repaired("values damaged under sled", |path| {
        let db = sled::open(path.parent().unwrap()).expect("open the device's sled");
        // The pending index keeps 64 entries to a key (`store::pending_buckets`): the one
        // holding this entry's bit.
        let entry = SYNCED + 3;
        let mut pending = b"p\x7f\xff\xff\xff".to_vec();
        pending.extend_from_slice(&(entry - entry % 64).to_be_bytes());
        let mut queue = b"q".to_vec();
        queue.extend_from_slice(&(SYNCED + 2).to_be_bytes());
        for key in [b"d\0Note\0n010".to_vec(), queue, pending] {
            let mut value = db.get(&key).unwrap().expect("stored").to_vec();
            value[0] ^= 0x20;
            db.insert(key, value).unwrap();
        }
        db.flush().unwrap();
    });
}

/// A store sled cannot open at all (its config file overwritten): the daemon refuses to start,
/// `ferry doctor` says why, and `ferry doctor --repair` sets it aside and starts a new one from
/// its journal, whose unsynced changes upload once the relay is back; the rest comes from it.
#[test]
fn a_store_that_cannot_be_opened_is_rebuilt_from_its_journal_and_the_relay() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay_dir = tmp.path().join("relay");
    let (a, port) = synced_then_offline(&relay_dir);
    let conf = sled_file(&a).with_file_name("conf");
    std::fs::write(&conf, b"not sled's config at all").unwrap();

    let refused = a.ferry(&["--json", "doctor"]);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        common::stderr(&refused).contains("cannot open the store"),
        "{refused:?}"
    );
    let (repaired_ok, repaired) = doctor(&a, true);
    assert!(repaired_ok, "{repaired}");
    let restored = repaired["repaired"]["restored"].as_array().unwrap();
    for id in SYNCED..SYNCED + OFFLINE {
        let name = format!("n{id:03}");
        assert!(
            restored.iter().any(|c| c["id"] == json!(name)),
            "{name} is not restored: {repaired}"
        );
    }
    let aside: Vec<_> = std::fs::read_dir(&a.data_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("store.unreadable-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the old store is kept aside");
    all_records_everywhere("an unreadable store", &a, &relay_dir, port);
}

/// The relay's sled directory, to damage with the relay stopped.
fn relay_sled_dir(relay_dir: &Path) -> PathBuf {
    ferry::store::kv::SledKv::current_dir(&relay_dir.join("relay.db")).expect("relay store dir")
}

/// Flips a byte of every value the stopped relay in `relay_dir` stores for each record of
/// `damage` under a key of one of its kinds (the storage layout's first byte: `l` log entry, `b`
/// document, `t` tail, `r` heads), under sled, which takes it as any write: only the value's
/// own checksum can tell. Returns the records' space, once sled has let go of its files.
fn damage_relay_records(relay_dir: &Path, damage: &[(&str, &[u8])]) -> String {
    let dir = relay_sled_dir(relay_dir);
    let db = sled::open(&dir).expect("open the relay's sled");
    let mut damaged = Vec::new();
    for pair in db.iter() {
        let (key, value) = pair.unwrap();
        for (record, kinds) in damage {
            let in_key = format!("\0{record}\0");
            let holds = key.windows(in_key.len()).any(|w| w == in_key.as_bytes())
                || (key.first() == Some(&b'l')
                    && value.windows(record.len()).any(|w| w == record.as_bytes()));
            if holds && key.first().is_some_and(|k| kinds.contains(k)) && !value.is_empty() {
                let mut bad = value.to_vec();
                bad[0] ^= 0x20;
                damaged.push((key.to_vec(), bad));
            }
        }
    }
    let space = damaged
        .iter()
        .find(|(k, _)| k.first() == Some(&b'b'))
        .map(|(k, _)| {
            let rest = &k[1..];
            String::from_utf8(rest[..rest.iter().position(|&c| c == 0).unwrap()].to_vec()).unwrap()
        })
        .expect("a damaged document");
    for (key, bad) in damaged {
        db.insert(key, bad).unwrap();
    }
    db.flush().unwrap();
    drop(db);
    common::wait_sled_released(&dir);
    space
}

/// A relay whose stored values of one record (its document and its log entry) fail their
/// checksum: a device reading them gets a session error naming the space and where, the relay
/// logs it and fires its `store_damaged` alert, and nothing of that record is served.
#[test]
fn a_damaged_relay_document_or_log_entry_is_reported_and_never_served() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay_dir = tmp.path().join("relay");
    let mut relay = Relay::start(&relay_dir, None);
    let port = relay.port;
    let a = Device::new();
    a.join(&relay);
    let daemon = a.start_daemon();
    for id in 0..10 {
        put(&daemon, id);
    }
    wait_converged(&[&daemon], 10);
    assert!(daemon.terminate().success());
    assert!(relay.terminate().success());

    // Every value stored for record n003 (its document, its log entry) gets a byte flipped
    // under sled, which takes it as any write: only the value's own checksum can tell.
    let space = damage_relay_records(&relay_dir, &[("n003", b"lbt")]);

    let relay = Relay::start(&relay_dir, Some(port));
    let b = Device::new();
    b.join(&relay);
    let other = b.start_daemon();
    let failure = wait_for_ok("B's sync to fail on the damaged record", TIMEOUT, || {
        let s = status(&other);
        match s["sync"]["last_error"]["message"].as_str() {
            Some(message) if message.contains("is damaged") => Ok(message.to_owned()),
            _ => Err(s["sync"].to_string()),
        }
    });
    assert!(
        failure.contains(&format!("space {space:?}")) && failure.contains("n003"),
        "{failure}"
    );
    let got = other
        .client()
        .call("get", json!({"collection": "Note", "id": "n003"}));
    assert!(got.is_err(), "n003 was served: {got:?}");
    wait_for_ok("the relay's store_damaged alert", TIMEOUT, || {
        let log = relay.log();
        if log.contains("store_damaged") && log.contains("is damaged") {
            Ok(())
        } else {
            Err(log.lines().rev().take(5).collect::<Vec<_>>().join("\n"))
        }
    });
}

/// A relay whose document of one record (its base, tail and heads) fails its checksum: the
/// session refuses it, `ferry relay rebuild-record` on the running relay rebuilds it from the
/// log, the `store_damaged` alert clears, and a device then downloads the record as written;
/// another record's, rebuilt while the relay is stopped (the command opens its store), too.
#[test]
fn a_damaged_relay_document_is_rebuilt_from_the_log_and_served_right() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay_dir = tmp.path().join("relay");
    let mut relay = Relay::start(&relay_dir, None);
    let port = relay.port;
    let a = Device::new();
    a.join(&relay);
    let daemon = a.start_daemon();
    for id in 0..10 {
        put(&daemon, id);
    }
    call(
        &daemon,
        "put",
        json!({"collection": "Note", "id": "n003", "fields": {"n": 3, "edited": true}}),
    );
    // 11 log entries: n003's second change is its tail.
    wait_converged(&[&daemon], 11);
    assert!(daemon.terminate().success());
    assert!(relay.terminate().success());
    let space = damage_relay_records(&relay_dir, &[("n003", b"btr"), ("n007", b"b")]);

    let rebuild = |record: &str| {
        let out = Operator(&relay_dir).ferry(&[
            "--json",
            "relay",
            "rebuild-record",
            "--space",
            &space,
            "--collection",
            "Note",
            "--record",
            record,
        ]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()
    };
    // With the relay stopped, the command opens its store: n007's document first.
    assert_eq!(rebuild("n007")["changes"], json!(1));

    let mut relay = Relay::start(&relay_dir, Some(port));
    let b = Device::new();
    b.join(&relay);
    let other = b.start_daemon();
    let failure = wait_for_ok("B's sync to fail on the damaged record", TIMEOUT, || {
        let s = status(&other);
        match s["sync"]["last_error"]["message"].as_str() {
            Some(message) if message.contains("is damaged") => Ok(message.to_owned()),
            _ => Err(s["sync"].to_string()),
        }
    });
    assert!(
        failure.contains("rebuild-record") && failure.contains("n003"),
        "{failure}"
    );
    let alert = |transition: &str| {
        relay
            .log()
            .lines()
            .any(|line| line.contains(transition) && line.contains("store_damaged"))
    };
    wait_for_ok("the relay's store_damaged alert", TIMEOUT, || {
        if alert("alert fired") {
            Ok(())
        } else {
            Err(relay.log())
        }
    });

    // On the running relay, through its socket.
    let rebuilt = rebuild("n003");
    assert_eq!(rebuilt["changes"], json!(2), "{rebuilt}");
    wait_for_ok("the store_damaged alert to clear", TIMEOUT, || {
        if alert("alert cleared") {
            Ok(())
        } else {
            Err(relay.log())
        }
    });

    wait_converged(&[&other], 11);
    assert_eq!(status(&other)["documents"], json!(10));
    let record = call(&other, "get", json!({"collection": "Note", "id": "n003"}));
    assert_eq!(
        record["fields"],
        json!({"n": 3, "edited": true}),
        "{record}"
    );
    let record = call(&other, "get", json!({"collection": "Note", "id": "n007"}));
    assert_eq!(record["fields"], json!({"n": 7}), "{record}");
    assert!(relay.terminate().success());
}

/// A relay whose log sled's recovery cut short (bytes flipped in its file) refuses to start,
/// saying which batches are gone: it would otherwise serve a log without changes it
/// acknowledged.
#[test]
fn a_relay_whose_log_lost_acknowledged_batches_refuses_to_start() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay_dir = tmp.path().join("relay");
    let mut relay = Relay::start(&relay_dir, None);
    let a = Device::new();
    a.join(&relay);
    let daemon = a.start_daemon();
    for id in 0..20 {
        put(&daemon, id);
    }
    wait_converged(&[&daemon], 20);
    assert!(daemon.terminate().success());
    assert!(relay.terminate().success());
    flip_records(&relay_sled_dir(&relay_dir).join("db"), 20, 32, 3);

    let mut child = std::process::Command::new(common::ferry_bin())
        .arg("--data-dir")
        .arg(&relay_dir)
        .args(["--json", "relay", "--listen", "127.0.0.1:0"])
        .env_remove("FERRY_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ferry relay");
    let exit = wait_for_ok("the relay to refuse to start", TIMEOUT, || {
        match child.try_wait().unwrap() {
            Some(status) => Ok(status),
            None => Err("still running".to_owned()),
        }
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!exit.success(), "{stderr}");
    assert!(stderr.contains("lost batches"), "{stderr}");
}
