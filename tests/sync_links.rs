//! Sync over emulated links (`common::link`): real `ferry relay` and `ferry daemon` processes, a
//! device reaching the relay through the link emulator instead of loopback. An initial sync
//! under the `mobile` profile that loses the link for two seconds in the middle, and a device
//! whose address changes in the middle of one (Wi-Fi to LTE).
//!
//! Each link is seeded, so its losses and jitter replay; waits are for conditions, bounded.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::link::{Link, Profile};
use common::{
    Daemon, Device, Relay, TIMEOUT, call, count, status, stderr, wait_caught_up, wait_for_ok,
};
use serde_json::{Value, json};
use std::time::Duration;

/// Records the relay holds before the device behind the link starts: 16 ranges of `PAGE`.
const RECORDS: u64 = 4000;
/// The device's `download_changes`: small pages, so that the sync is many ranges long.
const PAGE: u64 = 250;

/// `n` records of about 250 bytes each as JSON Lines, their text as random as a link sees
/// real data (compression does not make it vanish).
fn jsonl(n: u64) -> String {
    let mut rng = common::link::Rng::new(n);
    (0..n)
        .map(|i| {
            let text: String = (0..12).map(|_| format!("{:016x}", rng.next_u64())).collect();
            json!({ "collection": "Item", "id": format!("item-{i:05}"), "fields": { "n": i, "text": text } })
                .to_string()
                + "\n"
        })
        .collect()
}

/// A relay whose log holds `RECORDS` changes, written by a device that has gone offline since.
fn relay_with_records() -> (tempfile::TempDir, Relay) {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(&tmp.path().join("relay"), None);
    let writer = Device::new();
    writer.join(&relay);
    let out = writer.ferry_with_input(&["import"], jsonl(RECORDS).as_bytes());
    assert!(out.status.success(), "import: {}", stderr(&out));
    let daemon = writer.start_daemon_logged();
    wait_caught_up(&daemon, RECORDS);
    let exit = daemon.terminate();
    assert!(exit.success(), "the writer's daemon: {exit}");
    (tmp, relay)
}

/// A new device registered with `relay` that reaches it through `link`, with small pages. It
/// reads the relay's log page by page rather than bootstrapping from a snapshot
/// (`sync.snapshot = false`): the log's download is what these tests are about.
fn behind_link(relay: &Relay, link: &Link) -> Device {
    let device = Device::new();
    device.join(relay);
    device.edit_config(|text| {
        [
            (
                format!("\nrelay = \"{}\"", relay.addr),
                format!("\nrelay = \"{}\"", link.addr()),
            ),
            (
                "\ndownload_changes = 2000".into(),
                format!("\ndownload_changes = {PAGE}"),
            ),
            ("\nsnapshot = true".into(), "\nsnapshot = false".into()),
        ]
        .iter()
        .fold(text.to_string(), |text, (from, to)| {
            assert!(text.contains(from), "no {from:?} in the config");
            text.replacen(from, to, 1)
        })
    });
    device
}

fn cursor(daemon: &Daemon) -> u64 {
    count(&status(daemon)["sync"]["cursor"])
}

/// Waits until the device's initial sync is under way: some of the log applied, not all.
fn wait_mid_sync(daemon: &Daemon) -> u64 {
    let at = wait_for_ok("the initial sync to be under way", TIMEOUT, || {
        let c = cursor(daemon);
        (c >= RECORDS / 4).then_some(c).ok_or(format!("cursor {c}"))
    });
    assert!(
        at < RECORDS,
        "the sync was over before the test could step in"
    );
    at
}

/// The SyncLog entries of the device that failed.
fn failed_rounds(daemon: &Daemon) -> Vec<Value> {
    let log = call(daemon, "log", json!({ "limit": 10000 }));
    log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["status"] == json!("failed"))
        .cloned()
        .collect()
}

/// An initial sync under `mobile` that loses the link for 2 s once it is under way; returns the
/// device's failed rounds.
fn initial_sync_through_an_outage(seed: u64, edit: impl Fn(&str) -> String) -> Vec<Value> {
    let (_tmp, relay) = relay_with_records();
    let link = Link::start(
        relay.addr.parse().unwrap(),
        Profile::named("mobile").unwrap(),
        seed,
    );
    let device = behind_link(&relay, &link);
    device.edit_config(edit);
    let daemon = device.start_daemon_logged();

    wait_mid_sync(&daemon);
    link.outage(Duration::from_secs(2));
    wait_caught_up(&daemon, RECORDS);

    let s = status(&daemon);
    assert_eq!(count(&s["documents"]), RECORDS, "{s}");
    // Every log entry was applied once: what was applied before the outage (the cursor holds
    // it) was not sent again, whether the connection lived through the outage or not.
    assert_eq!(count(&s["sync"]["downloaded"]), RECORDS, "{s}");
    assert!(link.stats().blacked_out > 0, "the outage met no traffic");
    failed_rounds(&daemon)
}

#[test]
fn an_initial_sync_over_mobile_resumes_after_a_two_second_outage_applying_nothing_twice() {
    // The tests' request timeout (2 s) usually gives up during the outage (when a range is
    // out): the session ends and the device reconnects, downloading again from its cursor.
    // Either way nothing is applied twice (checked inside).
    initial_sync_through_an_outage(0x5eed_0001, str::to_string);
}

#[test]
fn with_the_default_timers_a_two_second_outage_ends_no_session() {
    // The shipped request timeout (30 s) and QUIC idle timeout (5 s, keep-alive every 1 s)
    // outlast the outage: QUIC resends what was lost and the same session goes on.
    let failed = initial_sync_through_an_outage(0x5eed_0003, |text| {
        let tests = "\nrequest_timeout_ms = 2000";
        assert!(text.contains(tests), "no {tests:?} in the config");
        text.replacen(tests, "\nrequest_timeout_ms = 30000", 1)
    });
    assert_eq!(failed, Vec::<Value>::new());
}

#[test]
fn a_device_whose_address_changes_mid_sync_keeps_its_connection_and_syncs_on() {
    let (_tmp, relay) = relay_with_records();
    let link = Link::start(
        relay.addr.parse().unwrap(),
        Profile::named("broadband").unwrap(),
        0x5eed_0002,
    );
    let device = behind_link(&relay, &link);
    let daemon = device.start_daemon_logged();

    wait_mid_sync(&daemon);
    link.rebind();
    wait_caught_up(&daemon, RECORDS);

    // A write after the move reaches the device too, pushed on the same connection.
    let writer = Device::new();
    writer.join(&relay);
    let writer_daemon = writer.start_daemon_logged();
    call(
        &writer_daemon,
        "put",
        json!({ "collection": "Item", "id": "after-the-move", "fields": { "n": 1 } }),
    );
    wait_caught_up(&daemon, RECORDS + 1);

    let s = status(&daemon);
    assert_eq!(count(&s["sync"]["downloaded"]), RECORDS + 1, "{s}");
    // The relay followed the device to its new address (QUIC connection migration): no
    // session ended, so nothing reconnected.
    assert_eq!(failed_rounds(&daemon), Vec::<Value>::new());
}
