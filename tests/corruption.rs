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

use common::{Daemon, Device, Relay, TIMEOUT, call, status, stdout, wait_converged, wait_for_ok};
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

/// Flips `count` bytes, chosen by `seed` among those the log holds data in (sled's file has
/// long runs of zeros where nothing was written yet), each to another value.
fn flip_bytes(path: &Path, count: usize, seed: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    let written: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != 0).collect();
    assert!(written.len() > count, "{} bytes written", written.len());
    let mut rng = Rng(seed | 1);
    for _ in 0..count {
        let at = written[(rng.next() % written.len() as u64) as usize];
        bytes[at] ^= (rng.next() % 255 + 1) as u8;
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

/// The steps: 50 records synced, 5 written while the relay is down (acknowledged,
/// queued), the daemon stopped cleanly, then `damage` done to the stopped store. The damage
/// must be found at the next start and reported; after `ferry doctor --repair` and with the
/// relay back, the device and the relay hold all 55 records.
fn damaged_store_is_found_and_repaired(what: &str, damage: impl FnOnce(&Path)) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay_dir = tmp.path().join("relay");
    let mut relay = Relay::start(&relay_dir, None);
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

    // With the relay back, every record is there, on the device and in the relay's log.
    let _relay = Relay::start(&relay_dir, Some(port));
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
    b.join(&_relay);
    let other = b.start_daemon();
    wait_converged(&[&daemon, &other], SYNCED + OFFLINE);
    assert_eq!(status(&other)["documents"], json!(SYNCED + OFFLINE));
}

/// The issue: 64 bytes flipped across the data file.
#[test]
fn sixty_four_flipped_bytes_are_found_and_nothing_acknowledged_is_lost() {
    for seed in [1, 2] {
        damaged_store_is_found_and_repaired(&format!("64 bytes flipped, seed {seed}"), |path| {
            flip_bytes(path, 64, seed)
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
