//! `ferry relay` stopping on SIGTERM while devices are connected and writing, one of them frozen
//! (a laptop gone to sleep: its connection is open but nothing answers): it closes the sessions
//! as a shutdown (not as a protocol failure), does not wait on the frozen device, exits, and
//! frees its data directory for a new relay at once.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Device, Relay, call, signal, wait_converged};
use serde_json::json;

#[test]
fn sigterm_closes_sessions_as_a_shutdown_and_frees_the_data_directory() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let home = tmp.path().join("relay");
    let mut relay = Relay::start(&home, None);
    let devices: Vec<Device> = (0..4).map(|_| Device::new()).collect();
    for device in &devices {
        device.join(&relay);
    }
    let daemons: Vec<_> = devices.iter().map(Device::start_daemon_logged).collect();
    for (n, daemon) in daemons.iter().enumerate() {
        call(
            daemon,
            "put",
            json!({"collection": "Note", "id": format!("n{n}"), "fields": {"n": n}}),
        );
    }
    wait_converged(&daemons.iter().collect::<Vec<_>>(), 4);
    let frozen = daemons[3].child.id();
    signal(frozen, libc::SIGSTOP);
    // Writes keep coming while the relay stops, so sessions are busy, not idle. It counts the
    // writes acknowledged.
    let writer = {
        let mut client = daemons[0].client();
        std::thread::spawn(move || {
            (0..200)
                .take_while(|n| {
                    let record = json!({"collection": "Note", "id": format!("w{n}"), "fields": {}});
                    client.call("put", record).is_ok()
                })
                .count() as u64
        })
    };

    let status = relay.terminate();
    signal(frozen, libc::SIGCONT);
    assert!(status.success(), "relay exit: {status}");
    let log = relay.log();
    assert!(
        log.contains("relay stopped; everything flushed"),
        "the relay flushed and stopped:\n{log}"
    );
    let broken: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("broke the protocol"))
        .collect();
    assert!(
        broken.is_empty(),
        "sessions closed as failures: {broken:#?}"
    );

    // The data directory is free at once: a new relay on it and the same port serves, and the
    // devices come back to it with every write.
    let port = relay.port;
    let _relay = Relay::start(&home, Some(port));
    let written = writer.join().expect("writer thread");
    wait_converged(&daemons.iter().collect::<Vec<_>>(), 4 + written);
}
