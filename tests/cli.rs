//! The `ferry` binary as people use it, without a daemon and through one.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Device, OTHER_DEVICE, Relayed, TIMEOUT, put, stderr, stdout, wait_for};
use serde_json::{Value, json};
use std::process::Output;

#[test]
fn put_get_round_trip_without_and_with_a_daemon() {
    let dev = Device::new();
    let out = dev.ferry(&["put", "Customer/42", "--data", r#"{"name":"Ada","n":1}"#]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "create Customer/42");

    let daemon = dev.start_daemon();
    let out = dev.ferry(&["--json", "get", "Customer/42"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["fields"], json!({"name": "Ada", "n": 1}));
    let status = daemon.terminate();
    assert!(status.success(), "daemon exit: {status}");
}

#[test]
fn exit_codes_tell_usage_not_found_and_failure_apart() {
    let dev = Device::new();
    assert_eq!(dev.ferry(&["get", "Customer/nope"]).status.code(), Some(3));
    assert_eq!(dev.ferry(&["get", "Customer"]).status.code(), Some(2));
    assert_eq!(
        dev.ferry(&["put", "Customer/1", "--data", "[1]"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        dev.ferry(&["put", "Customer/1", "--data", "{bad"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(dev.ferry(&["frobnicate"]).status.code(), Some(2));
    let missing = dev.data_dir.join("nope");
    let out = std::process::Command::new(common::ferry_bin())
        .args(["--data-dir", missing.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("ferry init"), "{}", stderr(&out));
}

#[test]
fn input_is_bounded_by_the_message_limit_and_import_splits_calls_to_fit() {
    let dev = Device::new();
    std::fs::write(
        dev.data_dir.join("config.toml"),
        "[ipc]\nmax_message_bytes = 4096\n",
    )
    .unwrap();
    let daemon = dev.start_daemon();

    // 100 records of ~200 bytes: 20 KB in all, five times the limit, in one batch of 1000.
    let filler = "x".repeat(150);
    let mut lines = String::new();
    for i in 0..100 {
        lines += &json!({"collection": "Note", "id": format!("n{i}"), "fields": {"text": filler}})
            .to_string();
        lines += "\n";
    }
    let out = dev.ferry_with_input(&["import", "-"], lines.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = dev.ferry(&["--json", "ls", "Note", "--limit", "1000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        listed["records"].as_array().map(Vec::len),
        Some(100),
        "{listed}"
    );

    let long_line =
        json!({"collection": "Note", "id": "big", "fields": {"text": "y".repeat(5000)}});
    let out = dev.ferry_with_input(&["import", "-"], format!("{long_line}\n").as_bytes());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("line 1 refused: it is over 4096 bytes"),
        "{}",
        stderr(&out)
    );

    let big_fields = json!({"text": "y".repeat(5000)}).to_string();
    let out = dev.ferry_with_input(&["put", "Note/big"], big_fields.as_bytes());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("standard input is over 4096 bytes"),
        "{}",
        stderr(&out)
    );
    assert!(daemon.terminate().success());
}

#[track_caller]
fn succeeded(out: &Output) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    stdout(out)
}

#[track_caller]
fn json_of(out: &Output) -> Value {
    serde_json::from_str(&succeeded(out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)))
}

/// `out` failed with exit code `code` and its error names each of `words`.
#[track_caller]
fn failed_with(out: &Output, code: i32, words: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "{}", stderr(out));
    for word in words {
        assert!(stderr(out).contains(word), "{word:?} in {}", stderr(out));
    }
}

/// The line of `text` that holds every one of `words`.
#[track_caller]
fn line_with<'a>(text: &'a str, words: &[&str]) -> &'a str {
    text.lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no line with {words:?} in:\n{text}"))
}

/// Which side of the `name` conflict (server "Bea", client "Grace") the record shows now.
fn shown_side(dev: &Device) -> &'static str {
    match json_of(&dev.ferry(&["--json", "get", "Customer/1"]))["fields"]["name"].as_str() {
        Some("Grace") => "client",
        Some("Bea") => "server",
        other => panic!("Customer/1 shows name {other:?}"),
    }
}

#[test]
fn conflicts_are_listed_shown_and_resolved_on_the_store() {
    let (dev, id) = Device::with_conflict();

    let table = succeeded(&dev.ferry(&["conflicts"]));
    let header = table.lines().next().unwrap_or_default();
    for column in [
        "ID", "KIND", "RECORD", "STATUS", "STRATEGY", "FIELDS", "SERVER", "CLIENT",
    ] {
        assert!(header.contains(column), "{column} in {header:?}");
    }
    let row = line_with(&table, &[&id]);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[..6],
        [
            id.as_str(),
            "update_update",
            "Customer/1",
            "open",
            "manual",
            "name"
        ],
        "{row}"
    );
    assert!(
        row.contains(&OTHER_DEVICE[..8]),
        "the server side's device: {row}"
    );
    assert_eq!(table.lines().count(), 2, "{table}");

    let listed = json_of(&dev.ferry(&["--json", "conflicts", "--collection", "Customer"]));
    assert_eq!(listed["conflicts"][0]["id"], json!(id), "{listed}");
    assert_eq!(listed["conflicts"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed["next"], Value::Null);
    let none = dev.ferry(&["conflicts", "--status", "resolved"]);
    assert_eq!(succeeded(&none), "", "no resolved conflicts yet");
    let elsewhere = json_of(&dev.ferry(&["--json", "conflicts", "--collection", "Invoice"]));
    assert_eq!(elsewhere["conflicts"], json!([]));
    let all = json_of(&dev.ferry(&["--json", "conflicts", "--status", "all"]));
    assert_eq!(all["conflicts"].as_array().map(Vec::len), Some(1), "{all}");

    let shown = json_of(&dev.ferry(&["--json", "conflicts", "show", &id]));
    assert_eq!(shown["kind"], "update_update");
    assert_eq!(shown["status"], "open");
    assert_eq!(shown["fields"].as_array().map(Vec::len), Some(1), "{shown}");
    assert_eq!(shown["fields"][0]["path"], json!(["name"]));
    assert_eq!(shown["fields"][0]["server"], "Bea");
    assert_eq!(shown["fields"][0]["client"], "Grace");
    assert_eq!(shown["server"]["device"], OTHER_DEVICE);
    assert_eq!(shown["client"]["record"], "1");

    let text = succeeded(&dev.ferry(&["conflicts", "show", &id]));
    assert!(text.starts_with(&format!("conflict {id}\n")), "{text}");
    line_with(&text, &["kind", "update_update"]);
    line_with(&text, &["server", "Customer/1", OTHER_DEVICE]);
    line_with(&text, &["client", "Customer/1"]);
    line_with(&text, &["PATH", "SERVER", "CLIENT", "SHOWN"]);
    let field: Vec<&str> = line_with(&text, &["\"Bea\""]).split_whitespace().collect();
    assert_eq!(
        field,
        ["name", "\"Bea\"", "\"Grace\"", shown_side(&dev)],
        "{text}"
    );
    assert!(!text.contains("resolution"), "{text}");

    let status = succeeded(&dev.ferry(&["status"]));
    line_with(&status, &["conflicts: 1 open"]);
    let queue = succeeded(&dev.ferry(&["queue"]));
    line_with(&queue, &["Customer/1", &format!("conflict={id}")]);
    let queue = json_of(&dev.ferry(&["--json", "queue"]));
    assert_eq!(queue["entries"][0]["conflict"], json!(id), "{queue}");

    // Bad input: an unknown id is "not found" (3); a bad --take, merge without fields and
    // fields that are not JSON are usage errors (2).
    failed_with(&dev.ferry(&["conflicts", "show", "nope"]), 3, &["nope"]);
    failed_with(
        &dev.ferry(&["conflicts", "resolve", "nope", "--take", "server"]),
        3,
        &["nope"],
    );
    failed_with(
        &dev.ferry(&["conflicts", "resolve", &id, "--take", "sideways"]),
        2,
        &["sideways", "server", "client", "merge"],
    );
    failed_with(
        &dev.ferry(&["conflicts", "resolve", &id, "--take", "merge"]),
        2,
        &["--data"],
    );
    failed_with(
        &dev.ferry(&[
            "conflicts",
            "resolve",
            &id,
            "--take",
            "merge",
            "--data",
            "{bad",
        ]),
        2,
        &["not valid JSON"],
    );
    failed_with(
        &dev.ferry(&["conflicts", "--status", "closed"]),
        2,
        &["closed"],
    );

    let resolved = succeeded(&dev.ferry(&["conflicts", "resolve", &id, "--take", "server"]));
    line_with(&resolved, &[&format!("resolved {id}: took server")]);
    line_with(&resolved, &["update Customer/1"]);
    assert_eq!(shown_side(&dev), "server");
    let text = succeeded(&dev.ferry(&["conflicts", "show", &id]));
    line_with(&text, &["status", "open (resolving)"]);
    line_with(&text, &["resolving: took server by"]);
    failed_with(
        &dev.ferry(&["conflicts", "resolve", &id, "--take", "client"]),
        1,
        &[&id, "already"],
    );
}

#[test]
fn conflicts_resolve_through_the_daemon_with_merged_fields() {
    let (dev, id) = Device::with_conflict();
    let daemon = dev.start_daemon();

    let listed = json_of(&dev.ferry(&["--json", "conflicts"]));
    assert_eq!(listed["conflicts"][0]["id"], json!(id), "{listed}");
    let status = json_of(&dev.ferry(&["--json", "status"]));
    assert_eq!(status["daemon"], json!(true));
    assert_eq!(status["conflicts"]["open"], json!(1), "{status}");

    let merged = json!({"name": "Bea Grace", "email": "bg@example.com"});
    let r = json_of(&dev.ferry(&[
        "--json",
        "conflicts",
        "resolve",
        &id,
        "--take",
        "merge",
        "--data",
        &merged.to_string(),
    ]));
    assert_eq!(r["conflict"]["id"], json!(id), "{r}");
    assert_eq!(r["conflict"]["resolving"]["take"], "merge", "{r}");
    assert_eq!(r["writes"][0]["collection"], "Customer", "{r}");
    assert_eq!(r["writes"][0]["id"], "1", "{r}");
    assert_eq!(r["writes"][0]["operation"], "update", "{r}");
    let record = json_of(&dev.ferry(&["--json", "get", "Customer/1"]));
    assert_eq!(record["fields"], merged);

    let table = succeeded(&dev.ferry(&["conflicts"]));
    line_with(&table, &[&id, "open (resolving)"]);
    assert!(daemon.terminate().success());
}

#[test]
fn a_unique_clash_shows_both_records_and_resolves_to_one() {
    let dev = Device::new();
    dev.edit_config(|text| format!("{text}\n[collections.Customer]\nunique = [[\"email\"]]\n"));
    let email = json!({"email": "x@example.com"});
    let id = dev.with_store(|store| {
        let mut relayed = Relayed::new(ferry::store::StoreOptions::default());
        relayed
            .other
            .write(put(
                "Customer",
                "a",
                json!({"name": "Ada", "email": email["email"]}),
            ))
            .expect("the other device's record");
        store
            .write(put(
                "Customer",
                "b",
                json!({"name": "Bea", "email": email["email"]}),
            ))
            .expect("the local record");
        relayed.sync(store, |entries, through| {
            store.apply_remote(entries, through).expect("apply the log");
        });
        let ids = store.record_conflicts("Customer", "b").expect("conflicts");
        assert_eq!(ids.len(), 1, "{ids:?}");
        ids[0].clone()
    });

    let listed = json_of(&dev.ferry(&["--json", "conflicts"]));
    let conflict = &listed["conflicts"][0];
    assert_eq!(conflict["id"], json!(id), "{listed}");
    assert_eq!(conflict["kind"], "unique");
    assert_eq!(conflict["server"]["record"], "a");
    assert_eq!(conflict["client"]["record"], "b");
    let row = line_with(&succeeded(&dev.ferry(&["conflicts"])), &[&id]).to_owned();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..3], ["unique", "Customer/b"], "{row}");
    assert_eq!(cells[5], "email", "the constraint's fields: {row}");

    let text = succeeded(&dev.ferry(&["conflicts", "show", &id]));
    line_with(&text, &["server", "Customer/a", OTHER_DEVICE]);
    line_with(&text, &["client", "Customer/b"]);
    line_with(
        &text,
        &[
            "unique",
            "email",
            "x@example.com",
            "first by Customer/a, then by Customer/b",
        ],
    );
    let differing: Vec<&str> = line_with(&text, &["\"Ada\""]).split_whitespace().collect();
    assert_eq!(differing, ["name", "\"Ada\"", "\"Bea\""], "{text}");

    let resolved = succeeded(&dev.ferry(&["conflicts", "resolve", &id, "--take", "client"]));
    line_with(&resolved, &["delete Customer/a"]);
    assert_eq!(dev.ferry(&["get", "Customer/a"]).status.code(), Some(3));
    let kept = json_of(&dev.ferry(&["--json", "get", "Customer/b"]));
    assert_eq!(
        kept["fields"],
        json!({"name": "Bea", "email": "x@example.com"})
    );
}

/// JSON Lines of `count` Note records, `n1` to `n{count}`, line `bad` (1-based) replaced by
/// `bad_line`.
fn note_lines(count: usize, bad: usize, bad_line: &Value) -> String {
    (1..=count)
        .map(|n| {
            let line = if n == bad {
                bad_line.clone()
            } else {
                json!({"collection": "Note", "id": format!("n{n}"), "fields": {"n": n}})
            };
            format!("{line}\n")
        })
        .collect()
}

fn listed(dev: &Device, collection: &str) -> usize {
    let out = dev.ferry(&["--json", "ls", collection, "--limit", "100000"]);
    json_of(&out)["records"].as_array().map_or(0, Vec::len)
}

#[test]
fn import_names_file_lines_and_says_which_landed() {
    let dev = Device::new();
    // Vault's field needs an account key this device does not have: only the daemon finds
    // that out, so the refused line must be found by splitting the calls.
    dev.edit_config(|text| format!("{text}\n[collections.Vault]\nencrypted = [\"iban\"]\n"));
    let daemon = dev.start_daemon();

    // A line the CLI itself can check: a reserved field name on line 2501 of 3000.
    let reserved = json!({"collection": "Note", "id": "bad", "fields": {"$x": 1}});
    let file = dev.data_dir.with_file_name("notes.jsonl");
    std::fs::write(&file, note_lines(3000, 2501, &reserved)).unwrap();
    let out = dev.ferry(&["import", file.to_str().unwrap()]);
    failed_with(
        &out,
        2,
        &["line 2501 refused", "reserved", "1 line refused (2501)"],
    );
    line_with(
        &stdout(&out),
        &["imported lines 1-2500, 2502-3000", "2999 records"],
    );
    assert_eq!(
        listed(&dev, "Note"),
        2999,
        "ls pages past the per-call limit"
    );

    // A line only the daemon refuses, in the middle of a call; a blank line and bad JSON too.
    let secret = json!({"collection": "Vault", "id": "v", "fields": {"iban": "DE00"}});
    let mut text = note_lines(40, 17, &secret);
    text = text
        .replacen("\n", "\n\n", 1)
        .replace(r#"{"n":30},"#, r#"{"n":30,"#);
    let out = dev.ferry_with_input(&["--json", "import", "-", "--batch", "25"], text.as_bytes());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["imported"], 39 - 1, "{report}");
    assert_eq!(
        report["imported_lines"],
        json!([[1, 17], [19, 30], [32, 41]]),
        "line 2 is blank: the file's lines are shifted by one after it; {report}"
    );
    let refused: Vec<(u64, &str)> = report["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["error"].as_str().unwrap()))
        .collect();
    assert_eq!(refused.len(), 2, "{report}");
    assert_eq!(refused[0].0, 18, "{report}");
    assert!(refused[0].1.contains("account key"), "{report}");
    assert_eq!(refused[1].0, 31, "{report}");
    assert!(refused[1].1.contains("not valid JSON"), "{report}");
    assert!(daemon.terminate().success());
}

#[test]
fn import_atomic_imports_the_whole_file_or_nothing() {
    let dev = Device::new();
    let reserved = json!({"collection": "Note", "id": "bad", "fields": {"$x": 1}});
    let out = dev.ferry_with_input(
        &["import", "--atomic", "--batch", "100"],
        note_lines(3000, 2501, &reserved).as_bytes(),
    );
    failed_with(
        &out,
        2,
        &["line 2501 refused", "nothing was imported (--atomic)"],
    );
    line_with(&stdout(&out), &["not imported: lines 1-2500, 2502-3000"]);
    assert_eq!(dev.ferry(&["ls", "Note"]).status.code(), Some(0));
    assert_eq!(listed(&dev, "Note"), 0, "{}", stdout(&out));

    let good = json!({"collection": "Note", "id": "n2501", "fields": {"n": 2501}});
    let out = dev.ferry_with_input(
        &["import", "--atomic"],
        note_lines(3000, 2501, &good).as_bytes(),
    );
    line_with(&succeeded(&out), &["imported lines 1-3000", "3000 records"]);
    assert_eq!(listed(&dev, "Note"), 3000);
}

#[test]
fn queue_lists_newest_first_and_pages_both_ways() {
    let dev = Device::new();
    for n in 1..=5 {
        let data = json!({"n": n}).to_string();
        succeeded(&dev.ferry(&["put", &format!("Note/n{n}"), "--data", &data]));
    }
    let ids = |out: &Output| -> Vec<String> {
        succeeded(out)
            .lines()
            .map(|l| l.split('\t').nth(3).unwrap_or_default().to_owned())
            .collect()
    };
    let newest = dev.ferry(&["queue", "--limit", "2"]);
    assert_eq!(ids(&newest), ["Note/n5", "Note/n4"]);
    let more = line_with(&stderr(&newest), &["more: ferry queue --before"]).to_owned();
    let before = more.rsplit(' ').next().unwrap();
    assert_eq!(
        ids(&dev.ferry(&["queue", "--before", before])),
        ["Note/n3", "Note/n2", "Note/n1"]
    );
    assert_eq!(
        ids(&dev.ferry(&["queue", "--oldest-first", "--limit", "2"])),
        ["Note/n1", "Note/n2"]
    );
    let json = json_of(&dev.ferry(&["--json", "queue", "--status", "pending"]));
    assert_eq!(json["entries"][0]["object_id"], "n5", "{json}");
}

#[test]
fn errors_speak_to_people_without_protocol_prefixes() {
    let dev = Device::new();
    let out = dev.ferry(&["queue", "--status", "bogus"]);
    failed_with(
        &out,
        2,
        &["bogus", "use pending, processing, completed or failed"],
    );
    assert!(!stderr(&out).contains("invalid params"), "{}", stderr(&out));
    let out = dev.ferry(&["put", "bad name/1", "--data", "{}"]);
    failed_with(&out, 2, &["collection name"]);
    assert!(!stderr(&out).contains("invalid params"), "{}", stderr(&out));
}

/// A loopback UDP port with nothing listening on it.
fn dead_relay_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
    let addr = socket.local_addr().expect("its address");
    drop(socket);
    addr.to_string()
}

/// A well-formed certificate fingerprint no relay has.
const UNKNOWN_FINGERPRINT: &str = "00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:\
     00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff";

/// A running `ferry` command whose standard error is read line by line; killed when dropped.
struct Watched {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watched {
    fn start(mut command: std::process::Command) -> Watched {
        use std::io::BufRead as _;
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watched {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a line of standard error holding every one of `words`.
    fn line_with(&mut self, words: &[&str]) -> String {
        common::wait_for_ok(
            &format!("a line with {words:?} on standard error"),
            common::TIMEOUT,
            || {
                self.seen.extend(self.lines.try_iter());
                self.seen
                    .iter()
                    .find(|l| words.iter().all(|w| l.contains(w)))
                    .cloned()
                    .ok_or_else(|| self.seen.join("\n"))
            },
        )
    }

    /// Waits (bounded) for the command to exit.
    fn exit(&mut self) -> std::process::ExitStatus {
        common::wait_for_ok("the command to exit", common::TIMEOUT, || {
            match self.child.try_wait().expect("wait for ferry") {
                Some(status) => Ok(status),
                None => Err("still running".into()),
            }
        })
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn register_and_sync_say_they_wait_for_a_relay_that_does_not_answer() {
    let relay = dead_relay_address();
    let dev = Device::new();
    let register = dev.command(&[
        "register",
        "--relay",
        &relay,
        "--fingerprint",
        UNKNOWN_FINGERPRINT,
        "--code",
        "default/K7Q2",
    ]);
    Watched::start(register).line_with(&["waiting for relay", &relay]);

    dev.edit_config(|text| {
        text.replacen("\nrelay = \"\"", &format!("\nrelay = \"{relay}\""), 1)
            .replacen(
                "\nfingerprint = \"\"",
                &format!("\nfingerprint = \"{UNKNOWN_FINGERPRINT}\""),
                1,
            )
    });
    let _daemon = dev.start_daemon_logged();
    Watched::start(dev.command(&["sync"])).line_with(&["waiting for relay", &relay]);
}

#[test]
fn a_daemon_starting_while_a_command_holds_the_data_directory_waits_for_it() {
    let dev = Device::new();
    let dir = ferry::datadir::DataDir::resolve(Some(&dev.data_dir)).unwrap();
    let held = dir
        .lock()
        .expect("the test takes the lock, as a CLI command would");
    let mut daemon = dev.spawn_daemon(std::process::Stdio::from(
        std::fs::File::create(dev.log_path()).unwrap(),
    ));
    common::wait_for(
        "the daemon to say it waits for the lock",
        common::TIMEOUT,
        || std::fs::read_to_string(dev.log_path()).is_ok_and(|log| log.contains("waiting up to")),
    );
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited instead of waiting"
    );
    drop(held);
    common::wait_for("the daemon's socket", common::TIMEOUT, || {
        ferry::ipc::Client::connect(&dev.socket()).is_ok()
    });
    let out = dev.ferry(&["put", "Note/1", "--data", "{}"]);
    succeeded(&out);
    daemon.kill();
}

#[test]
fn a_command_waits_while_another_holds_the_data_directory() {
    let dev = Device::new();
    let dir = ferry::datadir::DataDir::resolve(Some(&dev.data_dir)).unwrap();
    let held = dir
        .lock()
        .expect("the test takes the lock, as a CLI command would");
    let mut put = Watched::start(dev.command(&["put", "Note/1", "--data", "{}"]));
    put.line_with(&[
        "waiting for the data directory",
        "in use by another ferry process",
    ]);
    drop(held);
    assert!(put.exit().success(), "{:?}", put.seen);
    succeeded(&dev.ferry(&["get", "Note/1"]));
}

/// Shell completions and the manual page come from the command line's own definitions, and
/// need no data directory.
#[test]
fn completions_and_the_manual_page_describe_every_command() {
    let run = |args: &[&str]| {
        std::process::Command::new(common::ferry_bin())
            .args(args)
            .env("FERRY_DATA_DIR", "/nonexistent/ferry-data")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run ferry")
    };
    let bash = succeeded(&run(&["completions", "bash"]));
    for command in [
        "import",
        "export",
        "conflicts",
        "relay",
        "doctor",
        "completions",
    ] {
        assert!(bash.contains(command), "bash completion lacks {command}");
    }
    // The script is valid bash.
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("ferry.bash");
    std::fs::write(&script, &bash).unwrap();
    let checked = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("run bash -n");
    assert!(checked.status.success(), "{}", stderr(&checked));
    assert!(succeeded(&run(&["completions", "zsh"])).starts_with("#compdef ferry"));
    assert!(succeeded(&run(&["completions", "fish"])).contains("complete -c ferry"));
    failed_with(&run(&["completions", "tcsh"]), 2, &["tcsh", "bash"]);

    let page = succeeded(&run(&["man"]));
    assert!(page.contains(".TH ferry 1"), "{page}");
    for command in ["import", "doctor", "completions", "man"] {
        assert!(page.contains(command), "the manual page lacks {command}");
    }
}

/// `ferry init` on an empty directory made beforehand (by `mkdir`, open to others) makes it
/// owner-only and initialises it; a directory open to others that holds anything is refused.
#[test]
fn init_takes_an_empty_directory_made_beforehand() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let made = tmp.path().join("made");
    std::fs::create_dir(&made).unwrap();
    std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o755)).unwrap();
    let init = |dir: &std::path::Path| {
        std::process::Command::new(common::ferry_bin())
            .arg("--data-dir")
            .arg(dir)
            .arg("init")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run ferry init")
    };
    succeeded(&init(&made));
    let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    let used = tmp.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("notes.txt"), "mine").unwrap();
    std::fs::set_permissions(&used, std::fs::Permissions::from_mode(0o755)).unwrap();
    failed_with(&init(&used), 1, &["open to other users", "chmod 700"]);
}

/// `ferry ls` with a query says how it was answered: a scan of the collection until the config
/// gives it an index, which the daemon builds when it starts, then the index, with the same
/// records in the same order.
#[test]
fn ls_with_a_query_says_which_plan_answered_it() {
    let dev = Device::new();
    for (id, customer, year) in [
        ("i1", "c42", 2023),
        ("i2", "c42", 2025),
        ("i3", "c7", 2024),
        ("i4", "c42", 2024),
    ] {
        let data = json!({"customer": customer, "year": year}).to_string();
        succeeded(&dev.ferry(&["put", &format!("Invoice/{id}"), "--data", &data]));
    }
    let query = [
        "--json",
        "ls",
        "Invoice",
        "--where",
        "customer=c42",
        "--where",
        "year>=2024",
        "--order-by",
        "year",
    ];
    let scanned = json_of(&dev.ferry(&query));
    assert_eq!(scanned["plan"], "scan");
    let ids = |page: &Value| -> Vec<String> {
        let records = page["records"].as_array().cloned().unwrap_or_default();
        records
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(ids(&scanned), ["i4", "i2"]);

    dev.edit_config(|text| {
        format!("{text}\n[collections.Invoice]\nindex = [[\"customer\", \"year\"]]\n")
    });
    let daemon = dev.start_daemon();
    let indexed = json_of(&dev.ferry(&query));
    assert_eq!(indexed["plan"], "index:customer,year");
    assert_eq!(ids(&indexed), ids(&scanned));
    let text = dev.ferry(&query[1..]);
    assert!(
        !stderr(&text).contains("no index serves"),
        "{}",
        stderr(&text)
    );
    let status = daemon.terminate();
    assert!(status.success(), "daemon exit: {status}");
}

/// Without a daemon, `status` shows the live bytes last counted, kept in the store with when
/// they were counted, rather than reading every key again; it counts them only when none are
/// kept.
#[test]
fn a_status_without_a_daemon_shows_the_live_bytes_last_counted() {
    let dev = Device::new();
    succeeded(&dev.ferry(&["put", "Customer/c0", "--data", r#"{"name":"Ada"}"#]));
    let first = json_of(&dev.ferry(&["--json", "status"]));
    let (Some(live), Some(counted)) = (
        first["live_bytes"].as_u64(),
        first["live_bytes_measured_ms"].as_u64(),
    ) else {
        panic!("no live bytes counted: {first}");
    };
    assert!(live > 0, "{first}");
    let data = json!({"name": "Grace", "notes": "x".repeat(2000)}).to_string();
    succeeded(&dev.ferry(&["put", "Customer/c1", "--data", &data]));
    let again = json_of(&dev.ferry(&["--json", "status"]));
    assert_eq!(again["live_bytes"].as_u64(), Some(live), "{again}");
    assert_eq!(
        again["live_bytes_measured_ms"].as_u64(),
        Some(counted),
        "{again}"
    );
    assert_eq!(again["documents"], json!(2), "{again}");
    assert!(
        line_with(&succeeded(&dev.ferry(&["status"])), &["on disk"]).contains("counted"),
        "the text says when the live bytes were counted"
    );
    // A daemon counts them again when it starts, and keeps what it counted.
    let daemon = dev.start_daemon();
    let mut last = Value::Null;
    wait_for("the daemon to count the live bytes", TIMEOUT, || {
        last = json_of(&dev.ferry(&["--json", "status"]));
        last["live_bytes"].as_u64().is_some_and(|n| n > live + 2000)
    });
    assert!(daemon.terminate().success());
    let stopped = json_of(&dev.ferry(&["--json", "status"]));
    assert_eq!(stopped["live_bytes"], last["live_bytes"], "{stopped}");
}

#[test]
fn space_tells_where_a_stopped_stores_bytes_go() {
    let dev = Device::new();
    for n in 0..3 {
        let data = json!({"name": "Ada", "n": n}).to_string();
        succeeded(&dev.ferry(&["put", &format!("Customer/c{n}"), "--data", &data]));
    }
    let report = json_of(&dev.ferry(&["--json", "space"]));
    let store = &report["stores"][0];
    assert_eq!(store["store"], "device", "{report}");
    let kinds: Vec<&Value> = store["kinds"].as_array().unwrap().iter().collect();
    let kind = |name: &str| {
        kinds
            .iter()
            .find(|k| k["kind"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    // A record's document and view are one key; the pending index keeps 64 entries a key.
    for name in ["records", "queue_entries", "change_feed"] {
        assert_eq!(kind(name)["keys"], 3, "{name}: {report}");
    }
    assert_eq!(kind("pending_index")["keys"], 1, "{report}");
    let sum = |field: &str| -> u64 { kinds.iter().map(|k| k[field].as_u64().unwrap()).sum() };
    let live = store["live_bytes"].as_u64().unwrap();
    assert_eq!(live, sum("key_bytes") + sum("value_bytes"));
    assert_eq!(store["checksum_bytes"].as_u64().unwrap(), sum("keys") * 4);
    assert!(store["journal_bytes"].as_u64().unwrap() > 0, "{report}");
    assert!(store["disk_bytes"].as_u64().unwrap() > live, "{report}");
    let sizes: Vec<u64> = kinds
        .iter()
        .map(|k| k["key_bytes"].as_u64().unwrap() + k["value_bytes"].as_u64().unwrap())
        .collect();
    assert!(
        sizes.windows(2).all(|w| w[0] >= w[1]),
        "largest first: {report}"
    );
    let text = succeeded(&dev.ferry(&["space"]));
    assert!(line_with(&text, &["device store", "on disk"]).contains("live"));
    // Compacting keeps every key and value.
    let compacted = json_of(&dev.ferry(&["--json", "space", "--compact"]));
    assert_eq!(
        compacted["stores"][0]["kinds"], store["kinds"],
        "{compacted}"
    );
    assert_eq!(
        json_of(&dev.ferry(&["--json", "ls", "Customer"]))["records"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // It opens the store itself: not while the daemon holds it.
    let daemon = dev.start_daemon();
    failed_with(&dev.ferry(&["space"]), 1, &["stop the daemon or relay"]);
    assert!(daemon.terminate().success());

    let tmp = tempfile::tempdir().unwrap();
    let relay = tmp.path().join("relay");
    std::fs::create_dir(&relay).unwrap();
    std::fs::set_permissions(&relay, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let operator = common::Operator(&relay);
    operator.add_account("team");
    let report = json_of(&operator.ferry(&["--json", "space"]));
    let store = &report["stores"][0];
    assert_eq!(store["store"], "relay", "{report}");
    assert!(
        store["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kind"] == "accounts" && k["keys"].as_u64() > Some(0)),
        "{report}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    failed_with(
        &common::Operator(&empty).ferry(&["space"]),
        1,
        &["holds no store"],
    );
}
