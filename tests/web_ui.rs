//! The relay's web interface in a real browser: Debian's headless Chromium, driven by Playwright
//! (`tests/browser/web_ui.mjs`, `playwright-core` from npm), against a real relay and two real
//! daemons. A person signs in, sees a record a daemon wrote and its history, sees a record
//! appear live as a daemon writes it, resolves a queued conflict by clicking, and the resolution
//! reaches both daemons; the account's storage alert is shown. A screenshot of each page is saved under the test's temporary
//! directory (`target/tmp/web-ui/`) as the run's artifacts.
//!
//! Needs Debian's `chromium` package and Node.js with npm (`.ci/run` installs them); the test
//! runs `npm ci --prefix tests/browser` itself when `playwright-core` is not installed yet.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Device, Relay, call, wait_converged, wait_for};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const PASSWORD: &str = "a long web password";
const TIMEOUT: Duration = Duration::from_secs(30);

fn browser_script() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/web_ui.mjs"
    ))
}

fn chromium() -> String {
    let path = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&path).exists(),
        "no Chromium at {path}: install Debian's `chromium` package (.ci/run does) or set CHROMIUM"
    );
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !browser_dir.join("node_modules/playwright-core").exists() {
        // The version package-lock.json pins, from the npm registry.
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&browser_dir)
            .output()
            .expect("npm runs (install Node.js and npm)");
        assert!(
            out.status.success(),
            "`npm ci --prefix tests/browser` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    path
}

fn title(daemon: &common::Daemon) -> Value {
    call(daemon, "get", json!({ "collection": "Ticket", "id": "t1" }))["fields"]["title"].clone()
}

fn open_conflicts(daemon: &common::Daemon) -> usize {
    call(daemon, "conflicts.list", json!({ "status": "open" }))["conflicts"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn a_person_signs_in_sees_records_live_and_resolves_a_conflict_that_reaches_the_daemons() {
    let chromium = chromium();
    let home = tempfile::tempdir().expect("temp dir");
    let manual = "[collections.Ticket]\nstrategy = \"manual\"\n";
    let relay = Relay::start_with_config(
        &home.path().join("relay"),
        None,
        &format!(
            "[relay]\nhttp_listen = \"127.0.0.1:0\"\nlogins_per_minute = 1000\n\
             enrolments_per_minute = 1000\nsign_ins_per_minute = 100000\n{manual}\
             [alerts]\naccount_quota_bytes = 300\nmin_disk_free_mb = 0\n"
        ),
    );
    relay
        .operator()
        .add_account_with_password("default", PASSWORD);

    // Two devices share a customer and a ticket, then edit the ticket's title while offline: a
    // queued conflict under `manual`, A's side logged first (server), B's second (client).
    let (a, b) = (Device::new(), Device::new());
    for device in [&a, &b] {
        device.join(&relay);
        device.edit_config(|text| format!("{text}\n{manual}"));
    }
    {
        let (da, db) = (a.start_daemon_logged(), b.start_daemon_logged());
        call(
            &da,
            "put",
            json!({ "collection": "Customer", "id": "c1", "fields": { "name": "Ada Lovelace" } }),
        );
        call(
            &da,
            "put",
            json!({ "collection": "Ticket", "id": "t1", "fields": { "title": "Printer jam" } }),
        );
        wait_converged(&[&da, &db], 2);
        for daemon in [da, db] {
            assert!(daemon.terminate().success());
        }
    }
    for (device, title) in [(&a, "Printer jam (A)"), (&b, "Printer jam (B)")] {
        let data = json!({ "title": title }).to_string();
        let out = device.ferry(&["patch", "Ticket/t1", "--data", &data]);
        assert!(out.status.success(), "offline patch: {out:?}");
    }
    let da = a.start_daemon_logged();
    wait_converged(&[&da], 3);
    let db = b.start_daemon_logged();
    wait_converged(&[&da, &db], 4);
    wait_for("the conflict queued on both daemons", TIMEOUT, || {
        open_conflicts(&da) == 1 && open_conflicts(&db) == 1
    });

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-ui");
    let url = format!("https://{}/", relay.http.as_deref().expect("HTTPS API"));
    let expect = json!({
        "account": "default",
        "password": PASSWORD,
        "record": { "collection": "Customer", "id": "c1", "field": "name", "value": "Ada Lovelace" },
        "live_id": "c9",
        "conflict_values": ["Printer jam (A)", "Printer jam (B)"],
        // The account's log is over its 300-byte quota.
        "alert": "storage_quota",
    });
    let mut browser = Command::new("node")
        .arg(browser_script())
        .env("FERRY_URL", &url)
        .env("FERRY_SHOTS", &shots)
        .env("FERRY_EXPECT", expect.to_string())
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (install Node.js and npm)");
    let mut to_browser = browser.stdin.take().expect("stdin");
    let from_browser = BufReader::new(browser.stdout.take().expect("stdout"));
    let mut said = Vec::new();
    for line in from_browser.lines() {
        let line = line.expect("the browser script's output");
        said.push(line.clone());
        match line.as_str() {
            "await live-write" => {
                call(
                    &da,
                    "put",
                    json!({ "collection": "Customer", "id": "c9", "fields": { "name": "Grace" } }),
                );
            }
            "await resolved" => {
                // The click resolved it at the relay; both daemons get the resolution.
                wait_for("the resolution on both daemons", TIMEOUT, || {
                    open_conflicts(&da) == 0 && open_conflicts(&db) == 0
                });
                for daemon in [&da, &db] {
                    assert_eq!(title(daemon), "Printer jam (B)", "the client side was kept");
                }
            }
            _ => continue,
        }
        writeln!(to_browser, "ok").expect("answer the browser script");
    }
    let output = browser.wait_with_output().expect("the browser script ends");
    assert!(
        output.status.success() && said.last().map(String::as_str) == Some("done"),
        "the browser test failed (screenshots in {}):\n{}\n{}",
        shots.display(),
        said.join("\n"),
        String::from_utf8_lossy(&output.stderr)
    );
    for page in [
        "sign-in",
        "records",
        "record",
        "live-update",
        "conflicts",
        "devices",
        "sync-log",
        "activity",
    ] {
        assert!(
            shots.join(format!("{page}.png")).exists(),
            "no screenshot of {page}"
        );
    }
    println!("screenshots: {}", shots.display());
}
