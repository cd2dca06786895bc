//! Alerts against real processes: each alert fires on its condition and clears, and every
//! transition reaches `ferry status`, the log and a webhook receiver on loopback.
//!
//! - `sync_failures`: the relay is killed, then started again on its port.
//! - `conflict_rate`: a device edits the same records offline that another edited online; the
//!   device that applies the edits and the relay (for the account) both see it.
//! - `inconsistency`: the relay's data directory is restored from an older copy and takes a new
//!   change under a sequence number the device had already read; then the latest copy is put
//!   back.
//! - `storage_quota` and `disk_free`: thresholds below and above what the disk and the log hold.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Daemon, Device, InProcessRelay, Relay, TIMEOUT, call, status, unsent, wait_for_ok};
use ferry::config::Config;
use ferry::datadir::DataDir;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A webhook receiver on 127.0.0.1: records every JSON body POSTed to `/alerts`.
struct Hook {
    url: String,
    posts: Arc<Mutex<Vec<Value>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Hook {
    fn start() -> Hook {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let posts = Arc::new(Mutex::new(Vec::new()));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("its address");
        let app = axum::Router::new()
            .route("/alerts", axum::routing::post(record))
            .with_state(posts.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Hook {
            url: format!("http://{addr}/alerts"),
            posts,
            _runtime: runtime,
        }
    }

    /// Waits for a post about `kind` in `state` ("fired" or "cleared"), and returns it.
    fn wait(&self, kind: &str, state: &str) -> Value {
        self.wait_from(None, kind, state)
    }

    /// Waits for a post from `device` (any: `None`) about `kind` in `state`.
    fn wait_from(&self, device: Option<&str>, kind: &str, state: &str) -> Value {
        wait_for_ok(&format!("a webhook post: {kind} {state}"), TIMEOUT, || {
            let posts = self.posts.lock().expect("posts");
            posts
                .iter()
                .find(|p| {
                    p["kind"] == kind
                        && p["state"] == state
                        && device.is_none_or(|d| p["device"] == d)
                })
                .cloned()
                .ok_or_else(|| format!("{posts:?}"))
        })
    }

    fn count(&self, kind: &str, state: &str) -> usize {
        let posts = self.posts.lock().expect("posts");
        posts
            .iter()
            .filter(|p| p["kind"] == kind && p["state"] == state)
            .count()
    }
}

async fn record(
    axum::extract::State(posts): axum::extract::State<Arc<Mutex<Vec<Value>>>>,
    axum::Json(body): axum::Json<Value>,
) -> axum::http::StatusCode {
    posts.lock().expect("posts").push(body);
    axum::http::StatusCode::OK
}

/// Sets keys of the device's `[alerts]` section (values as TOML).
fn set_alerts(device: &Device, keys: &[(&str, String)]) {
    device.edit_config(|text| {
        let start = text.find("[alerts]\n").expect("an [alerts] section");
        let (before, mut section) = (text[..start].to_string(), text[start..].to_string());
        for (key, value) in keys {
            let from = section
                .find(&format!("\n{key} = "))
                .unwrap_or_else(|| panic!("no alerts.{key}"));
            let end = section[from + 1..]
                .find('\n')
                .map_or(section.len(), |e| from + 1 + e);
            section.replace_range(from..end, &format!("\n{key} = {value}"));
        }
        format!("{before}{section}")
    });
}

/// Alerts that would fire on any test machine are off unless a test turns them on.
fn quiet_alerts(hook: &Hook) -> Vec<(&'static str, String)> {
    vec![
        ("webhook", format!("{:?}", hook.url)),
        ("min_disk_free_mb", "0".into()),
        ("check_interval_secs", "1".into()),
    ]
}

fn active_kinds(daemon: &Daemon) -> Vec<String> {
    status(daemon)["alerts"]
        .as_array()
        .expect("status lists the alerts")
        .iter()
        .map(|a| a["kind"].as_str().expect("a kind").to_string())
        .collect()
}

fn wait_alerts(daemon: &Daemon, what: &str, expected: &[&str]) {
    wait_for_ok(what, TIMEOUT, || {
        let kinds = active_kinds(daemon);
        if kinds == expected {
            Ok(())
        } else {
            Err(format!("active: {kinds:?}"))
        }
    });
}

fn put(daemon: &Daemon, id: &str, fields: Value) {
    call(
        daemon,
        "put",
        json!({ "collection": "Note", "id": id, "fields": fields }),
    );
}

/// Waits until the daemon has uploaded everything and holds what the relay announced.
fn wait_synced(daemon: &Daemon, what: &str) {
    wait_for_ok(what, TIMEOUT, || {
        let s = status(daemon);
        if unsent(&s) == 0 && s["sync"]["up_to_date"] == json!(true) {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });
}

fn human_status(device: &Device) -> String {
    let out = device.ferry(&["status"]);
    assert!(out.status.success(), "{out:?}");
    common::stdout(&out)
}

/// The daemon's `GET /metrics` body.
fn get_metrics(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics server");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("a read timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    response
}

fn copy_dir(from: &Path, to: &Path) {
    // Owner-only, as the relay requires of its data directory.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(to)
        .expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("an entry");
        let (target, kind) = (
            to.join(entry.file_name()),
            entry.file_type().expect("its type"),
        );
        // The operator's socket is the running relay's, not data.
        if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

#[test]
fn sync_failures_fire_while_the_relay_is_down_and_clear_when_it_is_back() {
    let hook = Hook::start();
    let home = tempfile::tempdir().expect("temp dir");
    let relay_dir = home.path().join("relay");
    let mut relay = Relay::start(&relay_dir, None);
    let device = Device::new();
    device.join(&relay);
    let mut keys = quiet_alerts(&hook);
    keys.push(("sync_failures", "2".into()));
    set_alerts(&device, &keys);
    let daemon = device.start_daemon_logged();
    put(&daemon, "n1", json!({ "title": "one" }));
    wait_synced(&daemon, "the first write synced");
    assert!(active_kinds(&daemon).is_empty());
    assert!(human_status(&device).contains("alerts: none"));

    let port = relay.port;
    relay.kill();
    wait_alerts(&daemon, "sync_failures active", &["sync_failures"]);
    let fired = hook.wait("sync_failures", "fired");
    assert_eq!(fired["threshold"], json!(2.0));
    assert!(fired["value"].as_f64().expect("a value") >= 2.0, "{fired}");
    assert_eq!(fired["device"], status(&daemon)["device_id"], "{fired}");
    let shown = human_status(&device);
    assert!(shown.contains("alert sync_failures: "), "{shown}");
    assert_eq!(hook.count("sync_failures", "cleared"), 0);

    let _relay = Relay::start(&relay_dir, Some(port));
    wait_alerts(&daemon, "sync_failures cleared", &[]);
    let cleared = hook.wait("sync_failures", "cleared");
    assert_eq!(cleared["value"], json!(0.0));
    assert_eq!(hook.count("sync_failures", "fired"), 1, "fires once");
    let log = std::fs::read_to_string(device.log_path()).expect("the daemon's log");
    let lines = |needle: &str| {
        log.lines()
            .filter(|l| l.contains(needle) && l.contains("sync_failures"))
            .count()
    };
    assert_eq!(lines("alert fired"), 1, "{log}");
    assert_eq!(lines("alert cleared"), 1, "{log}");
}

#[test]
fn the_conflict_rate_fires_on_concurrent_offline_edits_and_clears_on_clean_ones() {
    let hook = Hook::start();
    let home = tempfile::tempdir().expect("temp dir");
    // The relay counts the same conflicts per account, as the changes reach its log.
    let relay = Relay::start_with_config(
        &home.path().join("relay"),
        None,
        &format!(
            "[relay]\nenrolments_per_minute = 10000\nsign_ins_per_minute = 100000\n\
             [alerts]\nwebhook = {:?}\nmin_disk_free_mb = 0\nconflict_rate = 0.5\n\
             conflict_window = 2\n",
            hook.url
        ),
    );
    let (online, offline) = (Device::new(), Device::new());
    online.join(&relay);
    offline.join(&relay);
    let mut keys = quiet_alerts(&hook);
    keys.extend([
        ("conflict_rate", "0.5".to_string()),
        ("conflict_window", "2".to_string()),
    ]);
    set_alerts(&online, &keys);
    let watcher = online.start_daemon_logged();
    // Both edit the same two records without seeing each other's edits.
    for id in ["t1", "t2"] {
        let out = offline.ferry(&[
            "put",
            &format!("Note/{id}"),
            "--data",
            r#"{"title": "offline"}"#,
        ]);
        assert!(out.status.success(), "{out:?}");
        put(&watcher, id, json!({ "title": "online" }));
    }
    wait_synced(&watcher, "the online edits synced");
    assert!(active_kinds(&watcher).is_empty());

    let editor = offline.start_daemon_logged();
    wait_alerts(&watcher, "conflict_rate active", &["conflict_rate"]);
    let device_id = status(&watcher)["device_id"]
        .as_str()
        .expect("an id")
        .to_string();
    let fired = hook.wait_from(Some(&device_id), "conflict_rate", "fired");
    assert_eq!(fired["value"], json!(1.0), "both conflicted: {fired}");
    let on_relay = hook.wait_from(Some("relay"), "conflict_rate", "fired");
    assert_eq!(on_relay["space"], "default", "{on_relay}");

    for id in ["t3", "t4"] {
        put(&editor, id, json!({ "title": "new" }));
    }
    wait_alerts(&watcher, "conflict_rate cleared", &[]);
    let cleared = hook.wait_from(Some(&device_id), "conflict_rate", "cleared");
    assert_eq!(cleared["value"], json!(0.0), "{cleared}");
    hook.wait_from(Some("relay"), "conflict_rate", "cleared");
}

#[test]
fn inconsistency_fires_when_the_relay_loses_what_a_device_read_and_clears_when_restored() {
    let hook = Hook::start();
    let home = tempfile::tempdir().expect("temp dir");
    let (relay_dir, older, latest) = (
        home.path().join("relay"),
        home.path().join("relay-older"),
        home.path().join("relay-latest"),
    );
    let mut relay = Relay::start(&relay_dir, None);
    let port = relay.port;
    let (device, other) = (Device::new(), Device::new());
    device.join(&relay);
    other.join(&relay);
    let mut keys = quiet_alerts(&hook);
    keys.push(("sync_failures", "0".into()));
    set_alerts(&device, &keys);
    let daemon = device.start_daemon_logged();
    put(&daemon, "a1", json!({ "v": 1 }));
    wait_synced(&daemon, "a1 synced");

    relay.kill();
    copy_dir(&relay_dir, &older);
    let mut relay = Relay::start(&relay_dir, Some(port));
    put(&daemon, "a2", json!({ "v": 2 }));
    wait_for_ok("a2 synced at head 2", TIMEOUT, || {
        let s = status(&daemon);
        (unsent(&s) == 0 && s["sync"]["cursor"] == json!(2))
            .then_some(())
            .ok_or_else(|| s.to_string())
    });
    // The checks so far compared equal records.
    assert!(active_kinds(&daemon).is_empty());

    // The relay comes back from the older copy: it lost a2, and then logs another device's
    // change as its entry 2, which this device, at cursor 2, never downloads.
    relay.kill();
    std::fs::rename(&relay_dir, &latest).expect("keep the latest copy");
    copy_dir(&older, &relay_dir);
    let mut relay = Relay::start(&relay_dir, Some(port));
    let out = other.ferry(&["put", "Note/b1", "--data", r#"{"v": 3}"#]);
    assert!(out.status.success(), "{out:?}");
    let other_daemon = other.start_daemon_logged();
    wait_synced(&other_daemon, "b1 stored as entry 2");
    drop(other_daemon);
    wait_alerts(&daemon, "inconsistency active", &["inconsistency"]);
    let fired = hook.wait("inconsistency", "fired");
    assert!(
        fired["message"]
            .as_str()
            .is_some_and(|m| m.contains("differ from the relay")),
        "{fired}"
    );

    // The operator puts the latest copy back: the relay holds what the device read again.
    relay.kill();
    std::fs::remove_dir_all(&relay_dir).expect("drop the older copy");
    std::fs::rename(&latest, &relay_dir).expect("restore the latest copy");
    let _relay = Relay::start(&relay_dir, Some(port));
    wait_alerts(&daemon, "inconsistency cleared", &[]);
    hook.wait("inconsistency", "cleared");
}

#[test]
fn disk_free_fires_under_the_threshold_and_clears_under_a_lower_one() {
    let hook = Hook::start();
    let device = Device::new();
    let mut keys = quiet_alerts(&hook);
    // More free space than any disk has.
    keys.push(("min_disk_free_mb", "1000000000000".into()));
    set_alerts(&device, &keys);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|probe| probe.local_addr())
        .expect("a free port")
        .to_string();
    device.edit_config(|text| {
        let start = text.find("[metrics]\n").expect("a [metrics] section");
        let (before, after) = text.split_at(start);
        format!(
            "{before}{}",
            after.replacen("\nlisten = \"\"", &format!("\nlisten = \"{metrics}\""), 1)
        )
    });
    let daemon = device.start_daemon_logged();
    wait_alerts(&daemon, "disk_free active", &["disk_free"]);
    let fired = hook.wait("disk_free", "fired");
    assert_eq!(fired["threshold"], json!(1_000_000_000_000.0));
    assert!(human_status(&device).contains("alert disk_free: "));
    let scraped = get_metrics(&metrics);
    for (kind, active) in [("disk_free", 1), ("sync_failures", 0)] {
        let line = format!("ferry_alerts_active{{kind=\"{kind}\"}} {active}\n");
        assert!(scraped.contains(&line), "{line} in {scraped}");
    }
    drop(daemon);

    // A lower threshold, and a data-directory quota of one byte to show the check ran.
    set_alerts(
        &device,
        &[
            ("min_disk_free_mb", "1".into()),
            ("account_quota_bytes", "1".into()),
        ],
    );
    let daemon = device.start_daemon_logged();
    wait_alerts(&daemon, "only storage_quota active", &["storage_quota"]);
    hook.wait("storage_quota", "fired");
    assert_eq!(hook.count("disk_free", "fired"), 1);
}

/// The relay's active alerts for the account `default`, as the web interface reads them.
fn active(relay: &InProcessRelay) -> Vec<String> {
    relay
        .listening
        .alerts
        .active("default")
        .iter()
        .map(|a| a.kind.as_str().to_string())
        .collect()
}

/// A relay in this process with `alerts` as its thresholds.
fn relay_with(dir: &DataDir, listen: &str, alerts: ferry::alerts::AlertsConfig) -> InProcessRelay {
    let config = Config {
        alerts,
        ..Config::default()
    };
    InProcessRelay::start(dir, listen, config)
}

#[test]
fn the_relay_raises_an_accounts_quota_and_its_disk_free_and_clears_with_new_thresholds() {
    let hook = Hook::start();
    let home = tempfile::tempdir().expect("temp dir");
    let dir = DataDir::resolve(Some(&home.path().join("relay"))).expect("data dir");
    let tight = ferry::alerts::AlertsConfig {
        webhook: hook.url.clone(),
        account_quota_bytes: 600,
        min_disk_free_mb: 1_000_000_000_000,
        check_interval_secs: 1,
        ..Default::default()
    };
    let relay = relay_with(&dir, "127.0.0.1:0", tight);
    let operator = common::Operator(dir.path());
    operator.add_account("default");
    let addr = relay.listening.listen.to_string();
    let fingerprint = relay.listening.fingerprint.to_string();
    let device = Device::new();
    device.set_sync(&addr, &fingerprint);
    device.register_at(&operator, &addr, &fingerprint, "default");
    let daemon = device.start_daemon_logged();
    wait_for_ok("the relay's disk_free", TIMEOUT, || {
        let active = active(&relay);
        (active == ["disk_free"])
            .then_some(())
            .ok_or(format!("{active:?}"))
    });
    let disk = hook.wait("disk_free", "fired");
    assert_eq!(
        (&disk["device"], &disk["space"]),
        (&json!("relay"), &json!(""))
    );
    let mut n = 0;
    while hook.count("storage_quota", "fired") == 0 {
        n += 1;
        assert!(n <= 100, "100 writes and no storage_quota alert");
        put(
            &daemon,
            &format!("n{n}"),
            json!({ "text": "x".repeat(100) }),
        );
        wait_synced(&daemon, "a write stored");
    }
    let quota = hook.wait("storage_quota", "fired");
    assert_eq!(
        (&quota["device"], &quota["space"]),
        (&json!("relay"), &json!("default"))
    );
    assert!(quota["value"].as_f64().expect("bytes") >= 600.0, "{quota}");
    assert_eq!(active(&relay), ["disk_free", "storage_quota"]);
    let metrics = relay.listening.metrics.render();
    assert!(
        metrics.contains("ferry_relay_alerts_active{kind=\"storage_quota\"} 1"),
        "{metrics}"
    );
    relay.stop();

    // Raised thresholds: the next write is measured against them, and nothing is active.
    let raised = ferry::alerts::AlertsConfig {
        webhook: hook.url.clone(),
        account_quota_bytes: 1 << 30,
        min_disk_free_mb: 1,
        ..Default::default()
    };
    let relay = relay_with(&dir, &addr, raised);
    put(&daemon, "after", json!({ "text": "y" }));
    wait_synced(&daemon, "a write after the restart");
    let metrics = relay.listening.metrics.render();
    assert!(
        metrics.contains("ferry_relay_alerts_active{kind=\"storage_quota\"} 0"),
        "{metrics}"
    );
    assert!(active(&relay).is_empty(), "{:?}", active(&relay));
    relay.stop();
}
