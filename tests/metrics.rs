//! Metrics as Prometheus scrapes them: a daemon's `GET /metrics` before and after a scripted
//! session with a real relay process (writes, a sync, a conflict), and the relay's own metrics
//! from a relay run in-process that real daemons sync through. Every exposition is parsed
//! strictly as the 0.0.4 text format; the tests compare counts, never durations.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Daemon, Device, InProcessRelay, Relay, TIMEOUT, call, wait_converged, wait_for_ok};
use ferry::config::Config;
use ferry::datadir::DataDir;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};

/// One sample: its name and labels.
type Key = (String, BTreeMap<String, String>);

/// A parsed exposition: every sample's value.
#[derive(Debug)]
struct Scrape(BTreeMap<Key, f64>);

impl Scrape {
    /// Parses the text format strictly: every sample belongs to the family the last `# TYPE`
    /// line declared (histograms through `_bucket`, `_sum`, `_count`), each family is declared
    /// once with its `# HELP` line first, counters end in `_total`, label values are quoted and
    /// escaped, and no sample is given twice.
    fn parse(text: &str) -> Result<Scrape, String> {
        let mut samples = BTreeMap::new();
        let mut declared = std::collections::BTreeSet::new();
        let mut help: Option<String> = None;
        let mut family: Option<(String, String)> = None;
        for (n, line) in text.lines().enumerate() {
            let at = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest
                    .split_once(' ')
                    .ok_or_else(|| at("HELP without text"))?;
                help = Some(name.to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or_else(|| at("TYPE without type"))?;
                if help.take().as_deref() != Some(name) {
                    return Err(at("TYPE not right after its HELP"));
                }
                if !["counter", "gauge", "histogram"].contains(&kind) {
                    return Err(at("unknown type"));
                }
                if kind == "counter" && !name.ends_with("_total") {
                    return Err(at("a counter not named _total"));
                }
                if !declared.insert(name.to_string()) {
                    return Err(at("family declared twice"));
                }
                family = Some((name.to_string(), kind.to_string()));
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                return Err(at("unexpected comment or blank line"));
            }
            let (name, labels, value) = parse_sample(line).map_err(|e| at(&e))?;
            let (family_name, kind) = family.as_ref().ok_or_else(|| at("sample before TYPE"))?;
            let belongs = match kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name == format!("{family_name}{suffix}")),
                _ => name == *family_name,
            };
            if !belongs {
                return Err(at("sample outside its family"));
            }
            if kind == "histogram" && name.ends_with("_bucket") && !labels.contains_key("le") {
                return Err(at("bucket without le"));
            }
            if samples.insert((name, labels), value).is_some() {
                return Err(at("sample given twice"));
            }
        }
        Ok(Scrape(samples))
    }

    /// The sample's value; 0 when it is absent (a labelled counter that never counted).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0
            .get(&(name.to_string(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    fn has(&self, name: &str) -> bool {
        self.0.keys().any(|(n, _)| n == name)
    }

    /// The sum of all of a family's samples.
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }

    /// The sum of a family's samples whose `label` is not `except`.
    fn sum_except(&self, name: &str, label: &str, except: &str) -> f64 {
        self.0
            .iter()
            .filter(|((n, l), _)| n == name && l.get(label).is_some_and(|v| v != except))
            .map(|(_, v)| v)
            .sum()
    }
}

fn parse_sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err("bad metric name".into());
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end = loop {
            let key_start = chars.peek().map(|(i, _)| *i).ok_or("unclosed labels")?;
            let mut key_end = key_start;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = i;
                    break;
                }
                if !(c.is_ascii_alphanumeric() || c == '_') {
                    return Err("bad label name".into());
                }
            }
            let key = &inner[key_start..key_end];
            if key.is_empty() || chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unclosed label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        _ => return Err("bad escape".into()),
                    },
                    '\n' => return Err("raw newline in a label value".into()),
                    c => value.push(c),
                }
            }
            if labels.insert(key.to_string(), value).is_some() {
                return Err("label given twice".into());
            }
            match chars.next().ok_or("unclosed labels")? {
                (_, ',') => continue,
                (i, '}') => break i,
                _ => return Err("junk between labels".into()),
            }
        };
        rest = &inner[end + 1..];
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok((name.to_string(), labels, value))
}

/// `GET /metrics` over plain HTTP/1.1; checks the status and content type, parses the body.
fn scrape(addr: &str) -> Result<Scrape, String> {
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no end of headers")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("not 200: {head}"));
    }
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .ok_or("no content type")?;
    assert_eq!(content_type, ferry::metrics::CONTENT_TYPE);
    Scrape::parse(body)
}

/// A local address nothing listens on now, for a daemon's `metrics.listen`.
fn free_addr() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    probe.local_addr().expect("its address").to_string()
}

/// Sets the device's `metrics.listen`.
fn set_metrics_listen(device: &Device, listen: &str) {
    device.edit_config(|text| {
        let start = text.find("[metrics]\n").expect("a [metrics] section");
        let (before, after) = text.split_at(start);
        format!(
            "{before}{}",
            after.replacen("\nlisten = \"\"", &format!("\nlisten = \"{listen}\""), 1)
        )
    });
}

/// Makes the device's daemon serve metrics on a free local port; returns its address.
fn serve_metrics(device: &Device) -> String {
    let addr = free_addr();
    set_metrics_listen(device, &addr);
    addr
}

/// Scrapes until `ready` holds (the daemon serves and has got that far), then returns the scrape.
fn scrape_when(addr: &str, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    wait_for_ok(what, TIMEOUT, || {
        let scraped = scrape(addr)?;
        if ready(&scraped) {
            Ok(scraped)
        } else {
            Err(format!("{scraped:?}"))
        }
    })
}

fn put(daemon: &Daemon, id: &str, fields: serde_json::Value) {
    call(
        daemon,
        "put",
        json!({ "collection": "Note", "id": id, "fields": fields }),
    );
}

fn patch(daemon: &Daemon, id: &str, fields: serde_json::Value) {
    call(
        daemon,
        "patch",
        json!({ "collection": "Note", "id": id, "fields": fields }),
    );
}

const SUCCESS: &[(&str, &str)] = &[("outcome", "success")];
const UPDATE_UPDATE: &[(&str, &str)] = &[("kind", "update_update")];

#[test]
fn a_daemons_metrics_follow_writes_syncs_and_a_conflict() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay_dir = home.path().join("relay");
    let mut relay = Relay::start(&relay_dir, None);
    let (a, b) = (Device::new(), Device::new());
    a.join(&relay);
    b.join(&relay);
    let (metrics_a, metrics_b) = (serve_metrics(&a), serve_metrics(&b));
    let (da, db) = (a.start_daemon_logged(), b.start_daemon_logged());

    let connected = |s: &Scrape| s.get("ferry_relay_connected", &[]) == 1.0;
    let before_a = scrape_when(&metrics_a, "A connected", connected);
    let before_b = scrape_when(&metrics_b, "B connected", connected);
    for family in [
        "ferry_sync_duration_seconds_count",
        "ferry_sync_bytes_sent_total",
        "ferry_sync_records_uploaded_total",
        "ferry_queue_entries",
        "ferry_storage_bytes",
        "ferry_quarantined_entries",
    ] {
        assert!(before_a.has(family), "{family} missing: {before_a:?}");
    }
    assert!(before_a.get("ferry_storage_bytes", &[]) > 0.0);
    assert_eq!(before_a.get("ferry_quarantined_entries", &[]), 0.0);

    const N: u64 = 3;
    for i in 0..N {
        put(
            &da,
            &format!("n{i}"),
            json!({ "title": format!("note {i}") }),
        );
    }
    wait_converged(&[&da, &db], N);
    // Counters are sampled as rounds end; the round that reached convergence has ended.
    let after_a = scrape_when(&metrics_a, "A's upload counted", |s| {
        s.get("ferry_sync_records_uploaded_total", &[])
            >= before_a.get("ferry_sync_records_uploaded_total", &[]) + N as f64
    });
    let after_b = scrape_when(&metrics_b, "B's download counted", |s| {
        s.get("ferry_sync_records_downloaded_total", &[])
            >= before_b.get("ferry_sync_records_downloaded_total", &[]) + N as f64
    });
    let grew = |before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]| {
        after.get(name, labels) - before.get(name, labels)
    };
    assert_eq!(
        grew(
            &before_a,
            &after_a,
            "ferry_sync_records_uploaded_total",
            &[]
        ),
        N as f64
    );
    assert_eq!(
        grew(
            &before_b,
            &after_b,
            "ferry_sync_records_downloaded_total",
            &[]
        ),
        N as f64
    );
    assert_eq!(
        grew(
            &before_b,
            &after_b,
            "ferry_sync_records_uploaded_total",
            &[]
        ),
        0.0
    );
    assert!(grew(&before_a, &after_a, "ferry_sync_rounds_total", SUCCESS) >= 1.0);
    assert!(
        grew(
            &before_a,
            &after_a,
            "ferry_sync_duration_seconds_count",
            &[]
        ) >= 1.0
    );
    assert_eq!(
        after_a.get("ferry_sync_duration_seconds_count", &[]),
        after_a.get("ferry_sync_duration_seconds_bucket", &[("le", "+Inf")]),
    );
    assert!(grew(&before_a, &after_a, "ferry_sync_bytes_sent_total", &[]) > 0.0);
    assert!(grew(&before_b, &after_b, "ferry_sync_bytes_received_total", &[]) > 0.0);
    assert_eq!(
        after_a.get("ferry_queue_entries", &[("status", "pending")]),
        0.0
    );
    assert_eq!(
        after_a.get("ferry_queue_entries", &[("status", "completed")]),
        N as f64
    );
    assert_eq!(
        after_b.get("ferry_queue_entries", &[("status", "completed")]),
        0.0
    );
    assert_eq!(after_a.get("ferry_conflicts_total", UPDATE_UPDATE), 0.0);

    // Both devices change one field while the relay is away: a conflict on each.
    relay.kill();
    patch(&da, "n0", json!({ "title": "from A" }));
    patch(&db, "n0", json!({ "title": "from B" }));
    let offline_a = scrape(&metrics_a).expect("scrape while offline");
    assert_eq!(
        offline_a.get("ferry_queue_entries", &[("status", "pending")])
            + offline_a.get("ferry_queue_entries", &[("status", "processing")]),
        1.0
    );
    let _relay = Relay::start(&relay_dir, Some(relay.port));
    wait_converged(&[&da, &db], N + 2);
    for (addr, before) in [(&metrics_a, &after_a), (&metrics_b, &after_b)] {
        let now = scrape_when(addr, "the conflict counted", |s| {
            s.get("ferry_conflicts_total", UPDATE_UPDATE) >= 1.0 && connected(s)
        });
        assert_eq!(now.get("ferry_conflicts_total", UPDATE_UPDATE), 1.0);
        assert_eq!(
            now.get("ferry_queue_entries", &[("status", "pending")]),
            0.0
        );
        assert!(
            now.sum_except("ferry_sync_rounds_total", "outcome", "success")
                > before.sum_except("ferry_sync_rounds_total", "outcome", "success"),
            "losing the relay counts a failed round: {now:?}"
        );
        assert!(grew(before, &now, "ferry_sync_rounds_total", SUCCESS) >= 1.0);
    }
}

#[test]
fn a_bad_metrics_address_stops_the_daemons_start() {
    let device = Device::new();
    set_metrics_listen(&device, "nowhere");
    let out = device.ferry(&["daemon"]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("metrics.listen \"nowhere\""),
        "{}",
        common::stderr(&out)
    );
}

/// Registers `device` in the in-process relay's account `default` (created if missing).
fn register(relay: &InProcessRelay, device: &Device) {
    relay.operator().add_account("default");
    device.register_at(
        &relay.operator(),
        &relay.listening.listen.to_string(),
        &relay.listening.fingerprint.to_string(),
        "default",
    );
}

/// The relay's metrics as a scraper gets them, parsed strictly.
fn scrape_relay(relay: &InProcessRelay) -> Scrape {
    let text = relay.listening.metrics.render();
    Scrape::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn the_relays_metrics_count_stored_changes_sign_ins_and_sessions() {
    let home = tempfile::tempdir().expect("temp dir");
    let dir = DataDir::resolve(Some(&home.path().join("relay"))).expect("data dir");
    let relay = InProcessRelay::start(&dir, "127.0.0.1:0", Config::default());
    let empty = scrape_relay(&relay);
    assert_eq!(empty.get("ferry_relay_changes_stored_total", &[]), 0.0);
    assert_eq!(empty.get("ferry_relay_connected_devices", &[]), 0.0);
    assert!(empty.get("ferry_relay_storage_bytes", &[]) > 0.0);

    let (a, b) = (Device::new(), Device::new());
    register(&relay, &a);
    register(&relay, &b);
    // A code works once: a second device showing it is refused.
    let code = relay.operator().enrol("default");
    let addr = relay.listening.listen.to_string();
    let fingerprint = relay.listening.fingerprint.to_string();
    let register = |device: &Device| {
        device.ferry(&[
            "register",
            "--relay",
            &addr,
            "--fingerprint",
            &fingerprint,
            "--code",
            &code,
        ])
    };
    assert!(register(&Device::new()).status.success());
    assert!(!register(&Device::new()).status.success());
    let signed_up = scrape_relay(&relay);
    assert_eq!(
        signed_up.get("ferry_relay_sign_ins_total", &[("result", "ok")]),
        3.0
    );
    assert_eq!(
        signed_up.get(
            "ferry_relay_sign_ins_total",
            &[("result", "bad_enrolment_code")]
        ),
        1.0
    );

    let (da, db) = (a.start_daemon_logged(), b.start_daemon_logged());
    const N: u64 = 4;
    for i in 0..N {
        put(&da, &format!("r{i}"), json!({ "n": i }));
    }
    wait_converged(&[&da, &db], N);
    let live = scrape_relay(&relay);
    assert_eq!(live.get("ferry_relay_changes_stored_total", &[]), N as f64);
    assert_eq!(live.get("ferry_relay_changes_duplicate_total", &[]), 0.0);
    assert_eq!(live.get("ferry_relay_connected_devices", &[]), 2.0);
    assert_eq!(
        live.get("ferry_relay_sign_ins_total", &[("result", "ok")]),
        5.0,
        "each daemon signed in once: {live:?}"
    );
    // B got the N entries (pushed or downloaded); A gets none of its own changes back.
    assert!(live.get("ferry_relay_log_entries_sent_total", &[]) >= N as f64);
    let requests = |kind: &str| {
        live.get(
            "ferry_relay_sync_request_duration_seconds_count",
            &[("kind", kind)],
        )
    };
    assert!(requests("upload") >= 1.0);
    assert!(requests("download") + requests("push") >= 1.0);
    assert!(live.get("ferry_relay_bytes_received_total", &[]) > 0.0);
    assert!(live.get("ferry_relay_bytes_sent_total", &[]) > 0.0);
    assert!(live.get("ferry_relay_storage_bytes", &[]) > 0.0);

    assert_eq!(live.get("ferry_relay_conflicts_total", UPDATE_UPDATE), 0.0);

    // B changes a field offline that A changes too: the relay finds the conflict.
    assert!(db.terminate().success());
    patch(&da, "r0", json!({ "n": 100 }));
    let out = b.ferry(&["patch", "Note/r0", "--data", r#"{"n": 200}"#]);
    assert!(out.status.success(), "{out:?}");
    let db = b.start_daemon_logged();
    wait_converged(&[&da, &db], N + 2);
    let conflicted = scrape_relay(&relay);
    assert_eq!(
        conflicted.get("ferry_relay_conflicts_total", UPDATE_UPDATE),
        1.0,
        "{conflicted:?}"
    );
    assert_eq!(
        conflicted.get("ferry_relay_changes_stored_total", &[]),
        (N + 2) as f64
    );

    // Sessions that end are counted by outcome, and the devices are no longer connected.
    let sessions_before = conflicted.sum("ferry_relay_sessions_total");
    for daemon in [da, db] {
        assert!(daemon.terminate().success());
    }
    let gone = wait_for_ok("the sessions end", TIMEOUT, || {
        let s = scrape_relay(&relay);
        if s.get("ferry_relay_connected_devices", &[]) == 0.0 {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    assert!(
        gone.sum("ferry_relay_sessions_total") >= sessions_before + 2.0,
        "{gone:?}"
    );
    relay.stop();
}

#[test]
fn the_parser_refuses_what_the_format_does_not_allow() {
    let ok = "# HELP x_total h\n# TYPE x_total counter\nx_total{a=\"1\"} 2\n";
    assert_eq!(
        Scrape::parse(ok).map(|s| s.get("x_total", &[("a", "1")])),
        Ok(2.0)
    );
    for bad in [
        "x_total 1\n",
        "# HELP x h\n# TYPE x counter\nx 1\n",
        "# HELP x_total h\n# TYPE x_total counter\ny_total 1\n",
        "# HELP x_total h\n# TYPE x_total counter\nx_total{a=1} 1\n",
        "# HELP x_total h\n# TYPE x_total counter\nx_total 1\nx_total 1\n",
        "# HELP x h\n# TYPE x histogram\nx_bucket 1\n",
    ] {
        assert!(Scrape::parse(bad).is_err(), "accepted {bad:?}");
    }
}
