//! The IPC socket driven by real client processes (a Python script, `ferry watch`), and bad
//! input from the socket, the data directory and the disk. Every bad input must get a clear
//! error that names the problem; none may lose or damage an acknowledged write, and none may
//! reach a panic.

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
    Device, FaultyKv, Relayed, TIMEOUT, Tmpfs, ferry_bin, signal, stderr, stdout, wait_for,
};
use ferry::clock::SystemClock;
use ferry::service::{Service, ServiceOptions, api, code};
use ferry::store::{Store, StoreOptions};
use ferry_proto::Operation;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A raw connection to the daemon's socket: bytes in, JSON lines out.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let stream = UnixStream::connect(socket).expect("connect to the daemon's socket");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        Raw {
            reader: BufReader::new(stream.try_clone().expect("clone the stream")),
            writer: stream,
            next_id: 1,
        }
    }

    /// Sends `bytes` and a newline.
    fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer
            .write_all(bytes.as_ref())
            .and_then(|()| self.writer.write_all(b"\n"))
            .expect("write to the socket");
    }

    /// The next message from the daemon, or `None` once it has closed the connection.
    fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("the daemon sent something not JSON ({e}): {line}")),
            ),
            Err(e) => panic!("reading from the socket: {e}"),
        }
    }

    fn reply(&mut self) -> Value {
        self.read().expect("the daemon closed the connection")
    }

    /// Sends one line and returns the reply.
    fn exchange(&mut self, line: impl AsRef<[u8]>) -> Value {
        self.send(line);
        self.reply()
    }

    /// Calls `method` with a fresh id and returns the whole reply (checking its id).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let reply = self.exchange(request.to_string());
        assert_eq!(reply["id"], json!(id), "reply to {request}: {reply}");
        reply
    }

    /// Calls `method`, which must succeed, and returns its result.
    #[track_caller]
    fn ok(&mut self, method: &str, params: Value) -> Value {
        let reply = self.call(method, params.clone());
        assert!(
            reply.get("error").is_none() && reply.get("result").is_some(),
            "{method} {params}: {reply}"
        );
        reply["result"].clone()
    }

    /// Calls `method`, which must fail with `code` and a message naming each of `words`.
    #[track_caller]
    fn refused(&mut self, method: &str, params: Value, code: i64, words: &[&str]) {
        let reply = self.call(method, params);
        let id = reply["id"].clone();
        assert_error(&reply, &id, code, words);
    }

    /// Checks that the connection still answers.
    #[track_caller]
    fn still_works(&mut self) {
        let status = self.ok("status", json!({}));
        assert_eq!(status["daemon"], json!(true), "{status}");
    }
}

/// `reply` is a JSON-RPC error for request `id` with `code`, and its message names every one of
/// `words`.
#[track_caller]
fn assert_error(reply: &Value, id: &Value, code: i64, words: &[&str]) {
    assert_eq!(reply["jsonrpc"], "2.0", "{reply}");
    assert_eq!(&reply["id"], id, "reply id: {reply}");
    assert!(reply.get("result").is_none(), "expected an error: {reply}");
    assert_eq!(reply["error"]["code"], json!(code), "error code: {reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    for word in words {
        assert!(
            message.contains(word),
            "the message {message:?} should name {word:?}"
        );
    }
}

/// Runs a command to completion, killing it (and failing) if it runs past the timeout.
fn run_bounded(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(out) => out.expect("wait for the command"),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("{what} still running after {TIMEOUT:?}");
        }
    }
}

/// The command failed with exit code `exit`, a message naming each of `words`, and no panic.
#[track_caller]
fn assert_fails(out: &Output, exit: i32, words: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(exit), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "a panic: {err}");
    for word in words {
        assert!(err.contains(word), "stderr should name {word:?}: {err}");
    }
}

/// Reads a child's stderr on a thread, line by line, so it never blocks on a full pipe.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let pipe = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Everything left on a stderr channel once the process has exited.
fn rest(lines: &mpsc::Receiver<String>) -> String {
    let mut all = String::new();
    while let Ok(line) = lines.recv_timeout(TIMEOUT) {
        all.push_str(&line);
        all.push('\n');
    }
    all
}

fn write_config(dev: &Device, text: &str) {
    std::fs::write(dev.data_dir.join("config.toml"), text).expect("write config.toml");
}

/// `ferry --json get`: the record's fields, or `None` when it does not exist (exit code 3).
fn ferry_get(dev: &Device, address: &str) -> Option<Value> {
    let out = dev.ferry(&["--json", "get", address]);
    match out.status.code() {
        Some(0) => {
            let v: Value = serde_json::from_str(&stdout(&out)).expect("get prints JSON");
            Some(v["fields"].clone())
        }
        Some(3) => None,
        _ => panic!("ferry get {address}: {}", stderr(&out)),
    }
}

fn ferry_json(dev: &Device, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = dev.ferry(&all);
    assert!(out.status.success(), "ferry {args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("JSON output")
}

// ---------------------------------------------------------------------------------------------
// Real client processes

/// tests/ipc_client.py (standard library only) subscribes on one connection, writes on another
/// (put, patch, get, list, delete, a batch with a notification and an unknown method) and checks
/// the change notifications; the resulting state is then read back with the `ferry` binary.
#[test]
fn python_client_writes_reads_and_receives_its_changes() {
    let dev = Device::new();
    let daemon = dev.start_daemon();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ipc_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(&daemon.socket).arg("Note");
    let out = run_bounded(cmd);
    assert!(
        out.status.success(),
        "ipc_client.py failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let summary: Value = serde_json::from_str(&stdout(&out)).expect("a JSON summary");
    let generated = summary["generated_id"].as_str().expect("generated id");
    assert_eq!(generated.len(), 26, "a time-ordered id: {generated}");

    let seen: Vec<(String, String)> = summary["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .map(|n| {
            let field = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
            (field("operation"), field("id"))
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("create", "a"),
        ("create", generated),
        ("update", "a"),
        ("create", "b"),
        ("create", "c"),
        ("delete", "b"),
    ]
    .iter()
    .map(|(o, i)| (o.to_string(), i.to_string()))
    .collect();
    assert_eq!(seen, expected);
    let mut listed = vec!["a", "c", generated];
    listed.sort();
    assert_eq!(summary["listed"], json!(listed));
    assert_eq!(summary["not_found"]["code"], json!(code::NOT_FOUND));

    // The state, as the `ferry` binary sees it through the same daemon.
    assert_eq!(ferry_get(&dev, "Note/a"), Some(json!({"n": 2})));
    assert_eq!(ferry_get(&dev, "Note/b"), None);
    assert_eq!(ferry_get(&dev, "Note/c"), Some(json!({"quiet": true})));
    assert_eq!(
        ferry_get(&dev, &format!("Note/{generated}")),
        Some(json!({"title": "no id given"}))
    );
    assert_eq!(
        ferry_get(&dev, "Elsewhere/x"),
        Some(json!({"ignored": true}))
    );
    let a = ferry_json(&dev, &["get", "Note/a"]);
    let last_a = summary["notifications"][2]["heads"].clone();
    assert_eq!(
        a["heads"], last_a,
        "the notification carried the record's heads"
    );
    // Seven changes: the six the script watched plus Elsewhere/x; each one queued once.
    let queue = ferry_json(&dev, &["queue"]);
    assert_eq!(queue["counts"]["pending"], json!(7), "{queue}");

    let status = daemon.terminate();
    assert!(status.success(), "daemon exit: {status}");
}

/// The Python client library (`clients/python`) passes its own tests against this build's
/// daemon.
#[test]
fn the_python_client_library_passes_its_tests() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "unittest",
        "discover",
        "-s",
        "clients/python/tests",
        "-t",
        "clients/python",
    ])
    .current_dir(root)
    .env("FERRY_BIN", ferry_bin());
    let out = run_bounded(cmd);
    assert!(
        out.status.success(),
        "the Python client's tests failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// The Node.js client library (`clients/node`, TypeScript) compiles and passes its own tests
/// against this build's daemon (`scripts/test` installs its compiler with `npm ci`).
#[test]
fn the_node_client_library_passes_its_tests() {
    let mut cmd = Command::new("npm");
    cmd.args(["--prefix", "clients/node", "test"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("FERRY_BIN", ferry_bin());
    let out = run_bounded(cmd);
    assert!(
        out.status.success(),
        "the Node.js client's tests failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// `ferry watch --count N --json` as a real subscriber process prints exactly the N changes to
/// its collection, in order, and exits 0.
#[test]
fn ferry_watch_prints_exactly_the_changes_of_its_collection() {
    let dev = Device::new();
    let daemon = dev.start_daemon();
    let mut watch = dev
        .command(&["--json", "watch", "Task", "--count", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry watch");
    let lines = stderr_lines(&mut watch);
    let first = lines.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
        let _ = watch.kill();
        panic!("ferry watch did not say it was watching within {TIMEOUT:?}")
    });
    assert_eq!(first, "watching");

    let writes: [&[&str]; 5] = [
        &["put", "Task/1", "--data", r#"{"title":"write tests"}"#],
        &["put", "Other/1", "--data", r#"{"not":"watched"}"#],
        &["patch", "Task/1", "--data", r#"{"done":true}"#],
        &["put", "Task/2", "--data", r#"{"title":"run them"}"#],
        &["rm", "Task/1"],
    ];
    let mut heads = Vec::new();
    for args in writes {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = dev.ferry(&all);
        assert!(out.status.success(), "ferry {args:?}: {}", stderr(&out));
        let applied: Value = serde_json::from_str(&stdout(&out)).unwrap();
        if applied["collection"] == "Task" {
            heads.push(applied["heads"].clone());
        }
    }

    wait_for("ferry watch to exit", TIMEOUT, || {
        watch.try_wait().expect("wait for watch").is_some()
    });
    let out = watch.wait_with_output().expect("watch output");
    assert!(out.status.success(), "watch exit: {}", rest(&lines));
    let device = ferry_json(&dev, &["status"])["device_id"].clone();
    let printed: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON notification per line"))
        .collect();
    let expected = [
        ("create", "1"),
        ("update", "1"),
        ("create", "2"),
        ("delete", "1"),
    ];
    assert_eq!(printed.len(), expected.len(), "{printed:?}");
    for ((n, (operation, id)), heads) in printed.iter().zip(expected).zip(heads) {
        assert_eq!(n["jsonrpc"], "2.0", "{n}");
        assert_eq!(n["method"], "change", "{n}");
        let p = &n["params"];
        assert_eq!(
            (&p["operation"], &p["collection"], &p["id"]),
            (&json!(operation), &json!("Task"), &json!(id)),
            "{n}"
        );
        assert_eq!(p["heads"], heads, "{n}");
        assert_eq!(p["device"], device, "{n}");
    }
    assert!(daemon.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// Bad input on the socket

const SMALL_LIMITS: &str = r#"
[store]
allow_undeclared_collections = false

[limits]
max_collection_bytes = 16
max_id_bytes = 32
max_record_bytes = 2048
max_depth = 4

[ipc]
max_message_bytes = 8192
max_import_records = 3
max_list_limit = 10

[collections.Note]
[collections.Other]
[collections.Nnnnnnnnnnnnnnnn]
"#;

/// The acknowledged writes a test has made, as it expects to read them back.
#[derive(Default)]
struct Acknowledged {
    records: BTreeMap<(String, String), Value>,
    changes: usize,
}

impl Acknowledged {
    fn put(&mut self, raw: &mut Raw, collection: &str, id: &str, fields: Value) {
        let r = raw.ok(
            "put",
            json!({ "collection": collection, "id": id, "fields": fields }),
        );
        assert!(r["operation"].is_string(), "{r}");
        self.changes += 1;
        self.records.insert((collection.into(), id.into()), fields);
    }

    /// Every acknowledged record reads back exactly as written, through `raw`.
    #[track_caller]
    fn check(&self, raw: &mut Raw) {
        for ((collection, id), fields) in &self.records {
            let r = raw.ok("get", json!({ "collection": collection, "id": id }));
            assert_eq!(&r["fields"], fields, "{collection}/{id}");
        }
    }
}

fn request(id: u64, method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
}

fn notification(method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "method": method, "params": params })
}

/// Every kind of malformed or out-of-bounds input on the socket gets the right JSON-RPC error
/// code and a message naming the problem, the connection keeps working where it can, and every
/// write acknowledged before, during and after is intact, also once the daemon has stopped.
#[test]
fn bad_input_on_the_socket_gets_clear_errors_and_loses_nothing() {
    let dev = Device::new();
    write_config(&dev, SMALL_LIMITS);
    let mut daemon = dev.start_daemon();
    let daemon_log = stderr_lines(&mut daemon.child);
    let mut raw = Raw::connect(&daemon.socket);
    let mut acked = Acknowledged::default();

    acked.put(&mut raw, "Note", "keep1", json!({"title": "kept", "n": 1}));
    acked.put(&mut raw, "Note", "keep2", json!({"nested": {"a": [1, 2]}}));
    acked.put(&mut raw, "Other", "o1", json!({"x": true}));

    // The envelope.
    let null = Value::Null;
    let reply = raw.exchange(r#"{"jsonrpc": "2.0", "id": 1, "method": "#);
    assert_error(&reply, &null, code::PARSE_ERROR, &["not valid JSON"]);
    raw.still_works();
    for not_an_object in ["42", r#""put""#, "null", "true"] {
        let reply = raw.exchange(not_an_object);
        assert_error(&reply, &null, code::INVALID_REQUEST, &["JSON object"]);
    }
    raw.still_works();
    let reply = raw.exchange(r#"{"id": 5, "method": "status"}"#);
    assert_error(
        &reply,
        &json!(5),
        code::INVALID_REQUEST,
        &["`jsonrpc`", "2.0"],
    );
    for version in [r#""1.0""#, "2.0", "2", r#""2.0 ""#] {
        let line = format!(r#"{{"jsonrpc": {version}, "id": 6, "method": "status"}}"#);
        let reply = raw.exchange(line);
        assert_error(&reply, &json!(6), code::INVALID_REQUEST, &["`jsonrpc`"]);
    }
    let reply = raw.exchange(r#"{"jsonrpc": "2.0", "id": 7}"#);
    assert_error(&reply, &json!(7), code::INVALID_REQUEST, &["`method`"]);
    let reply = raw.exchange(r#"{"jsonrpc": "2.0", "id": 8, "method": 5}"#);
    assert_error(&reply, &json!(8), code::INVALID_REQUEST, &["`method`"]);
    // An id that cannot be read is answered with id null.
    let reply = raw.exchange(r#"{"jsonrpc": "2.0", "id": {"a": 1}, "method": "status"}"#);
    assert_error(&reply, &null, code::INVALID_REQUEST, &["`id`"]);
    for params in ["[1, 2]", r#""Note""#, "3"] {
        let line = format!(r#"{{"jsonrpc": "2.0", "id": 9, "method": "get", "params": {params}}}"#);
        let reply = raw.exchange(line);
        assert_error(
            &reply,
            &json!(9),
            code::INVALID_PARAMS,
            &["params", "object"],
        );
    }
    let reply = raw.exchange(r#"{"jsonrpc": "2.0", "id": 10, "method": "status", "colour": 1}"#);
    assert_error(&reply, &json!(10), code::INVALID_REQUEST, &["colour"]);
    raw.refused(
        "frobnicate",
        json!({}),
        code::METHOD_NOT_FOUND,
        &["frobnicate", "put"],
    );
    raw.still_works();

    // Params: wrong types, missing fields, unknown fields. The message names the param.
    let wrong_types = [
        (
            "put",
            json!({"collection": 5, "fields": {}}),
            "`collection`",
        ),
        (
            "put",
            json!({"collection": "Note", "id": 7, "fields": {}}),
            "`id`",
        ),
        (
            "put",
            json!({"collection": "Note", "id": "w", "fields": "oops"}),
            "`fields`",
        ),
        (
            "patch",
            json!({"collection": "Note", "id": "keep1", "unset": "n"}),
            "`unset`",
        ),
        (
            "list",
            json!({"collection": "Note", "limit": "ten"}),
            "`limit`",
        ),
        (
            "list",
            json!({"collection": "Note", "limit": -1}),
            "`limit`",
        ),
        ("queue", json!({"after": "yesterday"}), "`after`"),
        ("retry", json!({"ids": "all"}), "`ids`"),
        ("subscribe", json!({"collection": 5}), "`collection`"),
        (
            "unsubscribe",
            json!({"subscription": "one"}),
            "`subscription`",
        ),
        (
            "import",
            json!({"records": [{"collection": "Note", "id": "i0", "fields": {}},
                               {"collection": "Note", "id": "i1", "fields": 3}]}),
            "`records[1].fields`",
        ),
    ];
    for (method, params, names) in wrong_types {
        raw.refused(method, params, code::INVALID_PARAMS, &[names, "invalid"]);
    }
    let missing = [
        ("put", json!({"collection": "Note"}), "`fields`"),
        ("put", json!({"fields": {}}), "`collection`"),
        ("get", json!({"collection": "Note"}), "`id`"),
        ("get", Value::Null, "`collection`"),
        ("unsubscribe", json!({}), "`subscription`"),
        ("import", json!({}), "`records`"),
    ];
    for (method, params, names) in missing {
        raw.refused(
            method,
            params,
            code::INVALID_PARAMS,
            &["missing field", names],
        );
    }
    let unknown = [
        (
            "put",
            json!({"collection": "Note", "id": "u", "fields": {}, "colour": 1}),
            "`colour`",
        ),
        (
            "get",
            json!({"collection": "Note", "id": "keep1", "fields": {}}),
            "`fields`",
        ),
        ("status", json!({"verbose": true}), "`verbose`"),
        ("subscribe", json!({"colection": "Note"}), "`colection`"),
    ];
    for (method, params, names) in unknown {
        raw.refused(
            method,
            params,
            code::INVALID_PARAMS,
            &["unknown field", names],
        );
    }
    raw.refused(
        "retry",
        json!({"ids": [1], "all_failed": true}),
        code::INVALID_PARAMS,
        &["`ids`", "`all_failed"],
    );
    raw.refused(
        "queue",
        json!({"status": "bogus"}),
        code::INVALID_PARAMS,
        &["bogus"],
    );
    for limit in [0, 11] {
        let params = json!({"collection": "Note", "limit": limit});
        raw.refused("list", params, code::INVALID_PARAMS, &["limit", "1 to 10"]);
    }

    // Addresses: collection names and ids, on writes and reads.
    let bad_collections = [
        ("1abc", "1abc"),
        ("a b", "a b"),
        ("Note/x", "Note/x"),
        ("", "empty"),
        ("Nnnnnnnnnnnnnnnnn", "17 bytes, over the limit of 16"),
    ];
    for (collection, names) in bad_collections {
        let fields = json!({"collection": collection, "id": "x", "fields": {}});
        raw.refused("put", fields, code::INVALID_PARAMS, &["collection", names]);
        let address = json!({"collection": collection, "id": "x"});
        raw.refused("get", address, code::INVALID_PARAMS, &["collection", names]);
    }
    let long_id = "i".repeat(33);
    let bad_ids = [
        (long_id.as_str(), "33 bytes, over the limit of 32"),
        ("a\u{7}b", "control character (U+0007)"),
        ("line\nbreak", "control character (U+000A)"),
        ("", "empty"),
    ];
    for (id, names) in bad_ids {
        let fields = json!({"collection": "Note", "id": id, "fields": {}});
        raw.refused("put", fields, code::INVALID_PARAMS, &["record id", names]);
        let address = json!({"collection": "Note", "id": id});
        raw.refused(
            "delete",
            address.clone(),
            code::INVALID_PARAMS,
            &["record id", names],
        );
        raw.refused(
            "history",
            address,
            code::INVALID_PARAMS,
            &["record id", names],
        );
    }
    // The bounds themselves are allowed.
    let longest_id = "i".repeat(32);
    acked.put(&mut raw, "Note", &longest_id, json!({"at": "the id limit"}));
    let longest_collection = "Nnnnnnnnnnnnnnnn";
    assert_eq!(longest_collection.len(), 16);
    acked.put(&mut raw, longest_collection, "x", json!({}));
    raw.refused(
        "put",
        json!({"collection": "Invoice", "id": "1", "fields": {}}),
        code::UNKNOWN_COLLECTION,
        &["\"Invoice\"", "not declared", "[collections.Invoice]"],
    );

    // Record contents: reserved names, depth, size.
    raw.refused(
        "put",
        json!({"collection": "Note", "id": "r", "fields": {"$type": "x"}}),
        code::INVALID_PARAMS,
        &["\"$type\"", "reserved"],
    );
    raw.refused(
        "patch",
        json!({"collection": "Note", "id": "keep1", "fields": {"$x": 1}}),
        code::INVALID_PARAMS,
        &["\"$x\"", "reserved"],
    );
    raw.refused(
        "patch",
        json!({"collection": "Note", "id": "keep1", "unset": ["$x"]}),
        code::INVALID_PARAMS,
        &["\"$x\"", "reserved"],
    );
    acked.put(&mut raw, "Note", "deep4", json!({"a": [[[1]]]}));
    raw.refused(
        "put",
        json!({"collection": "Note", "id": "deep5", "fields": {"a": [[[[1]]]]}}),
        code::INVALID_PARAMS,
        &["deeper than 4 levels"],
    );
    raw.refused(
        "patch",
        json!({"collection": "Note", "id": "keep2", "fields": {"b": {"c": {"d": {"e": {}}}}}}),
        code::INVALID_PARAMS,
        &["deeper than 4 levels"],
    );
    // {"blob":"..."} is 11 bytes plus the string.
    acked.put(
        &mut raw,
        "Note",
        "big",
        json!({"blob": "x".repeat(2048 - 11)}),
    );
    raw.refused(
        "put",
        json!({"collection": "Note", "id": "big", "fields": {"blob": "y".repeat(2048 - 10)}}),
        code::TOO_LARGE,
        &["2049 bytes", "over the limit of 2048"],
    );
    // A patch that would make a record too big leaves it exactly as it was, also in the
    // daemon's memory: the next patch applies to the stored record.
    acked.put(&mut raw, "Note", "grow", json!({"a": "x".repeat(1500)}));
    let before = raw.ok("get", json!({"collection": "Note", "id": "grow"}));
    raw.refused(
        "patch",
        json!({"collection": "Note", "id": "grow", "fields": {"b": "y".repeat(1000)}}),
        code::TOO_LARGE,
        &["over the limit of 2048"],
    );
    assert_eq!(
        raw.ok("get", json!({"collection": "Note", "id": "grow"})),
        before
    );
    let patched = raw.ok(
        "patch",
        json!({"collection": "Note", "id": "grow", "fields": {"b": "small"}}),
    );
    assert_eq!(patched["operation"], "update");
    acked.changes += 1;
    acked.records.insert(
        ("Note".into(), "grow".into()),
        json!({"a": "x".repeat(1500), "b": "small"}),
    );
    let history = raw.ok("history", json!({"collection": "Note", "id": "grow"}));
    assert_eq!(
        history["changes"].as_array().map(Vec::len),
        Some(2),
        "{history}"
    );

    // Writes to records that do not exist.
    raw.refused(
        "patch",
        json!({"collection": "Note", "id": "nope", "fields": {"a": 1}}),
        code::NOT_FOUND,
        &["Note/nope", "not found"],
    );
    raw.refused(
        "delete",
        json!({"collection": "Note", "id": "nope"}),
        code::NOT_FOUND,
        &["Note/nope"],
    );

    // Imports: over the per-call bound, and all-or-nothing.
    let records: Vec<Value> = (0..4)
        .map(|i| json!({"collection": "Note", "id": format!("i{i}"), "fields": {}}))
        .collect();
    raw.refused(
        "import",
        json!({ "records": records }),
        code::TOO_LARGE,
        &["4 records", "limit of 3"],
    );
    raw.refused(
        "import",
        json!({"records": [{"collection": "Note", "id": "imp1", "fields": {"ok": 1}},
                           {"collection": "Note", "id": "imp2", "fields": {"$bad": 1}}]}),
        code::INVALID_PARAMS,
        &["\"$bad\""],
    );
    raw.refused(
        "import",
        json!({"records": [{"collection": "Note", "id": "imp1", "fields": {"ok": 1}},
                           {"collection": "Invoice", "id": "imp2", "fields": {}}]}),
        code::UNKNOWN_COLLECTION,
        &["\"Invoice\""],
    );
    raw.refused(
        "get",
        json!({"collection": "Note", "id": "imp1"}),
        code::NOT_FOUND,
        &["Note/imp1"],
    );

    // Subscriptions.
    raw.refused(
        "unsubscribe",
        json!({"subscription": 99}),
        code::NOT_FOUND,
        &["no subscription 99"],
    );

    // A line over ipc.max_message_bytes is discarded with an error; the connection goes on.
    let huge = request(
        77,
        "put",
        json!({"collection": "Note", "id": "huge", "fields": {"blob": "z".repeat(10_000)}}),
    );
    let reply = raw.exchange(huge.to_string());
    assert_error(
        &reply,
        &null,
        code::TOO_LARGE,
        &["over 8192 bytes", "split it"],
    );
    raw.still_works();
    raw.refused(
        "get",
        json!({"collection": "Note", "id": "huge"}),
        code::NOT_FOUND,
        &[],
    );

    // Batches.
    let reply = raw.exchange("[]");
    assert_error(&reply, &null, code::INVALID_REQUEST, &["empty batch"]);
    let batch = json!([
        request(
            100,
            "put",
            json!({"collection": "Note", "id": "b1", "fields": {"in": "batch"}})
        ),
        request(101, "nope", json!({})),
        5,
        notification(
            "put",
            json!({"collection": "Note", "id": "b2", "fields": {"quiet": 1}})
        ),
        request(
            102,
            "put",
            json!({"collection": "Note", "id": "b3", "fields": "bad"})
        ),
        request(103, "get", json!({"collection": "Note", "id": "keep1"})),
    ]);
    let replies = raw.exchange(batch.to_string());
    let replies = replies
        .as_array()
        .expect("a batch is answered with an array");
    assert_eq!(
        replies.len(),
        5,
        "one reply per request, none for the notification"
    );
    assert_eq!(replies[0]["id"], 100);
    assert_eq!(
        replies[0]["result"]["operation"], "create",
        "{}",
        replies[0]
    );
    assert_error(
        &replies[1],
        &json!(101),
        code::METHOD_NOT_FOUND,
        &["\"nope\""],
    );
    assert_error(&replies[2], &null, code::INVALID_REQUEST, &["JSON object"]);
    assert_error(
        &replies[3],
        &json!(102),
        code::INVALID_PARAMS,
        &["`fields`"],
    );
    assert_eq!(replies[4]["id"], 103);
    assert_eq!(
        replies[4]["result"]["fields"],
        json!({"title": "kept", "n": 1})
    );
    acked.changes += 2;
    acked
        .records
        .insert(("Note".into(), "b1".into()), json!({"in": "batch"}));
    acked
        .records
        .insert(("Note".into(), "b2".into()), json!({"quiet": 1}));
    raw.refused(
        "get",
        json!({"collection": "Note", "id": "b3"}),
        code::NOT_FOUND,
        &[],
    );

    // Notifications (no id) get no reply, even when they fail: the next line the daemon sends
    // answers the request after them.
    raw.send(
        notification(
            "put",
            json!({"collection": "Note", "id": "n1", "fields": {"n": 1}}),
        )
        .to_string(),
    );
    raw.send(notification("frobnicate", json!({})).to_string());
    raw.send(notification("put", json!({"collection": 5})).to_string());
    raw.send(
        json!([
            notification("status", json!({})),
            notification("nope", json!({}))
        ])
        .to_string(),
    );
    raw.send(request(200, "get", json!({"collection": "Note", "id": "n1"})).to_string());
    let reply = raw.reply();
    assert_eq!(
        reply["id"], 200,
        "the first reply after the notifications: {reply}"
    );
    assert_eq!(reply["result"]["fields"], json!({"n": 1}));
    acked.changes += 1;
    acked
        .records
        .insert(("Note".into(), "n1".into()), json!({"n": 1}));

    // Bytes that are not UTF-8 are discarded with an error; the connection goes on.
    raw.send(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"put\",\"params\":{\"collection\":\"Note\",\"id\":\"\xff\xfe\",\"fields\":{}}}");
    let reply = raw.reply();
    assert_error(&reply, &null, code::PARSE_ERROR, &["not UTF-8"]);
    raw.still_works();

    // Nothing acknowledged was lost or changed, on the socket and through the binary, and the
    // queue holds one entry per acknowledged change and none for a refused write.
    acked.check(&mut raw);
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon still runs"
    );
    let queue = raw.ok("queue", json!({"limit": 1000}));
    assert_eq!(queue["counts"]["pending"], json!(acked.changes), "{queue}");
    for entry in queue["entries"].as_array().unwrap() {
        let key = (
            entry["model_name"].as_str().unwrap().to_owned(),
            entry["object_id"].as_str().unwrap().to_owned(),
        );
        assert!(
            acked.records.contains_key(&key),
            "queued but refused: {key:?}"
        );
    }
    drop(raw);
    let status = daemon.terminate();
    assert!(status.success(), "daemon exit: {status}");
    let log = rest(&daemon_log);
    assert!(!log.contains("panicked"), "the daemon panicked: {log}");

    // And after the daemon stopped, the store itself holds every acknowledged write.
    for ((collection, id), fields) in &acked.records {
        assert_eq!(
            ferry_get(&dev, &format!("{collection}/{id}")).as_ref(),
            Some(fields),
            "{collection}/{id}"
        );
    }
}

/// An app may send many requests without waiting for the answers: writes are applied in the
/// order they were sent and each is answered (by id, in any order) once durable; a read sent
/// after writes sees them; a batch's writes are answered together with the batch.
#[test]
fn pipelined_requests_are_applied_in_order_and_each_answered_once() {
    let dev = Device::new();
    let mut daemon = dev.start_daemon();
    let mut raw = Raw::connect(&daemon.socket);
    const WRITES: u64 = 300;
    // Many writes to one record, and one to a record each, sent without reading an answer;
    // then a read of the record they all wrote.
    let mut lines = String::new();
    for n in 1..=WRITES {
        let put =
            |id: &str, fields: Value| json!({"collection": "Note", "id": id, "fields": fields});
        lines += &format!("{}\n", request(n, "put", put("same", json!({"n": n}))));
        lines += &format!(
            "{}\n",
            request(WRITES + n, "put", put(&format!("r{n}"), json!({"n": n})))
        );
    }
    lines += &format!(
        "{}\n",
        request(0, "get", json!({"collection": "Note", "id": "same"}))
    );
    raw.writer.write_all(lines.as_bytes()).unwrap();
    let mut answered = BTreeMap::new();
    while answered.len() < 2 * WRITES as usize + 1 {
        let reply = raw.reply();
        assert!(reply.get("result").is_some(), "{reply}");
        let id = reply["id"].as_u64().expect("a numeric id");
        assert!(answered.insert(id, reply).is_none(), "{id} answered twice");
    }
    assert_eq!(
        answered.keys().copied().collect::<Vec<_>>(),
        (0..=2 * WRITES).collect::<Vec<_>>()
    );
    // The get was sent last: it sees the last of the writes to its record.
    assert_eq!(answered[&0]["result"]["fields"], json!({"n": WRITES}));

    // A batch mixing writes and a read: the read sees the writes before it.
    let batch = json!([
        request(
            1001,
            "put",
            json!({"collection": "Note", "id": "b", "fields": {"v": 1}})
        ),
        request(
            1002,
            "patch",
            json!({"collection": "Note", "id": "b", "fields": {"w": 2}})
        ),
        request(1003, "get", json!({"collection": "Note", "id": "b"})),
        request(1004, "delete", json!({"collection": "Note", "id": "r1"})),
    ]);
    let replies = raw.exchange(batch.to_string());
    let replies = replies
        .as_array()
        .expect("a batch is answered with an array");
    let ids: Vec<_> = replies.iter().map(|r| r["id"].clone()).collect();
    assert_eq!(ids, [1001, 1002, 1003, 1004].map(|n| json!(n)).to_vec());
    assert_eq!(replies[2]["result"]["fields"], json!({"v": 1, "w": 2}));

    // Pipelined writes that fail among writes that succeed (applied together where they
    // arrive together): each failing one gets its own error, and nothing of it is written; the
    // others are answered and written as if each had been sent alone.
    let mut lines = String::new();
    for n in 0..100u64 {
        let (method, id) = if n % 3 == 1 {
            ("patch", format!("missing{n}"))
        } else {
            ("put", format!("mixed{n}"))
        };
        let params = json!({"collection": "Mixed", "id": id, "fields": {"n": n}});
        lines += &format!("{}\n", request(2000 + n, method, params));
    }
    raw.writer.write_all(lines.as_bytes()).unwrap();
    let mut answered = BTreeMap::new();
    while answered.len() < 100 {
        let reply = raw.reply();
        let id = reply["id"].as_u64().expect("a numeric id");
        assert!(
            answered.insert(id - 2000, reply).is_none(),
            "{id} answered twice"
        );
    }
    for (n, reply) in &answered {
        if n % 3 == 1 {
            assert_eq!(reply["error"]["code"], json!(code::NOT_FOUND), "{reply}");
        } else {
            assert!(reply.get("result").is_some(), "{reply}");
        }
    }
    let listed = raw
        .exchange(request(2100, "list", json!({"collection": "Mixed", "limit": 1000})).to_string());
    let ids: BTreeSet<String> = listed["result"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["id"].as_str().expect("an id").to_owned())
        .collect();
    let written: BTreeSet<String> = (0..100u64)
        .filter(|n| n % 3 != 1)
        .map(|n| format!("mixed{n}"))
        .collect();
    assert_eq!(ids, written);

    // Many connections that each wrote stay open without holding anything that later
    // writes or reads on other connections need.
    let held: Vec<Raw> = (0..48)
        .map(|n| {
            let mut raw = Raw::connect(&daemon.socket);
            raw.ok(
                "put",
                json!({"collection": "Held", "id": format!("h{n}"), "fields": {"n": n}}),
            );
            raw
        })
        .collect();
    let mut last = Raw::connect(&daemon.socket);
    last.ok(
        "put",
        json!({"collection": "Held", "id": "last", "fields": {}}),
    );
    assert_eq!(
        last.ok("list", json!({"collection": "Held", "limit": 100}))["records"]
            .as_array()
            .unwrap()
            .len(),
        49
    );
    drop((held, last));

    // Everything answered was durable: a restart (SIGKILL) keeps it.
    daemon.kill();
    let daemon = dev.start_daemon();
    let mut raw = Raw::connect(&daemon.socket);
    let same = raw.ok("get", json!({"collection": "Note", "id": "same"}));
    assert_eq!(same["fields"], json!({"n": WRITES}));
    let page = raw.ok("list", json!({"collection": "Note", "limit": 1000}));
    assert_eq!(
        page["records"].as_array().unwrap().len(),
        WRITES as usize + 1,
        "every record but the deleted one, and 'same' and 'b'"
    );
    assert!(daemon.terminate().success());
}

/// Every change carries its number in the store's change feed; a subscriber that gives
/// `since` first gets every change after it (with the record's fields when it asks), then the
/// live ones, none twice, also after a restart; one asking for changes the feed no longer keeps
/// is told to re-read.
#[test]
fn a_subscriber_resumes_from_the_change_feed_without_missing_anything() {
    let dev = Device::new();
    write_config(&dev, "[store]\nkeep_feed_changes = 3\n");
    let mut daemon = dev.start_daemon();
    let mut writer = Raw::connect(&daemon.socket);
    let put = |writer: &mut Raw, id: &str, n: u64| {
        let written = writer.ok(
            "put",
            json!({"collection": "Note", "id": id, "fields": {"n": n}}),
        );
        written["seq"]
            .as_u64()
            .expect("a write result's feed number")
    };
    let seqs: Vec<u64> = (0..4)
        .map(|n| put(&mut writer, &format!("n{n}"), n))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    let mut watcher = Raw::connect(&daemon.socket);
    let answer = watcher.ok(
        "subscribe",
        json!({"collection": "Note", "since": seqs[1], "fields": true}),
    );
    assert_eq!(answer["seq"], json!(seqs[3]));
    let next_change = |watcher: &mut Raw| {
        let note = watcher.read().expect("a notification");
        assert_eq!(note["method"], json!("change"), "{note}");
        note["params"].clone()
    };
    // What the feed holds after `since`, then a live change, then a delete (fields null).
    for (n, seq) in [(2, seqs[2]), (3, seqs[3])] {
        let change = next_change(&mut watcher);
        assert_eq!(change["seq"], json!(seq), "{change}");
        assert_eq!(change["fields"], json!({"n": n}), "{change}");
    }
    let live = put(&mut writer, "n4", 4);
    let change = next_change(&mut watcher);
    assert_eq!(
        (change["seq"].as_u64(), change["id"].clone()),
        (Some(live), json!("n4"))
    );
    writer.ok("delete", json!({"collection": "Note", "id": "n4"}));
    let change = next_change(&mut watcher);
    assert_eq!(change["operation"], json!("delete"));
    assert_eq!(change["fields"], Value::Null);
    let last = change["seq"].as_u64().unwrap();

    // After a restart the feed goes on from where it was.
    daemon.kill();
    let daemon = dev.start_daemon();
    let mut writer = Raw::connect(&daemon.socket);
    let after_restart = put(&mut writer, "n5", 5);
    assert!(after_restart > last);
    let mut watcher = Raw::connect(&daemon.socket);
    watcher.ok("subscribe", json!({"since": last}));
    let change = next_change(&mut watcher);
    assert_eq!(change["seq"], json!(after_restart));
    assert!(
        change.get("fields").is_none(),
        "fields only when asked: {change}"
    );

    // Past keep_feed_changes the oldest go (the daemon prunes at start): asking for them is
    // refused with what to do instead.
    let daemon = {
        drop((writer, watcher));
        let mut daemon = daemon;
        daemon.kill();
        dev.start_daemon()
    };
    // Each probe on its own connection: a subscription that is granted sends notifications.
    wait_for("the feed to be pruned", TIMEOUT, || {
        Raw::connect(&daemon.socket)
            .call("subscribe", json!({"since": seqs[0]}))
            .get("error")
            .is_some()
    });
    let mut raw = Raw::connect(&daemon.socket);
    raw.refused(
        "subscribe",
        json!({"since": seqs[0]}),
        code::INVALID_STATE,
        &["no longer kept", "re-read"],
    );
    raw.ok("subscribe", json!({"since": last}));
    let status = daemon.terminate();
    assert!(status.success(), "the daemon stopped with {status}");
}

/// Several connections pipelining writes at once: a subscriber hears of every acknowledged
/// change exactly once, in feed order, though the writes are answered (and announced) by
/// whichever connection waited for them; a `since` this device never gave is refused.
#[test]
fn a_subscriber_hears_of_every_acknowledged_change_once_and_in_order() {
    const WRITERS: usize = 6;
    const EACH: usize = 100;
    let dev = Device::new();
    let daemon = dev.start_daemon();
    let mut watcher = Raw::connect(&daemon.socket);
    let start = watcher.ok("subscribe", json!({}))["seq"].as_u64().unwrap();
    let acked: Vec<u64> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let socket = daemon.socket.clone();
                s.spawn(move || {
                    let mut raw = Raw::connect(&socket);
                    let mut lines = String::new();
                    for i in 0..EACH {
                        let id = format!("w{w}-{i}");
                        let put = json!({"collection": "Note", "id": id, "fields": {"i": i}});
                        lines += &format!("{}\n", request(i as u64 + 1, "put", put));
                    }
                    raw.writer.write_all(lines.as_bytes()).unwrap();
                    (0..EACH)
                        .map(|_| {
                            let reply = raw.reply();
                            reply["result"]["seq"]
                                .as_u64()
                                .unwrap_or_else(|| panic!("{reply}"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(acked.len(), WRITERS * EACH);
    let heard: Vec<u64> = (0..acked.len())
        .map(|_| {
            let note = watcher.read().expect("a notification");
            assert_eq!(note["method"], json!("change"), "{note}");
            note["params"]["seq"].as_u64().unwrap()
        })
        .collect();
    assert!(
        heard.windows(2).all(|w| w[0] < w[1]),
        "in feed order, none twice: {heard:?}"
    );
    let mut acked_sorted = acked.clone();
    acked_sorted.sort_unstable();
    assert_eq!(
        heard, acked_sorted,
        "every acknowledged change, and only those"
    );
    assert!(heard.iter().all(|&seq| seq > start));

    let mut raw = Raw::connect(&daemon.socket);
    raw.refused(
        "subscribe",
        json!({"since": heard[heard.len() - 1] + 1000}),
        code::INVALID_STATE,
        &["no change", "re-read"],
    );
    assert!(daemon.terminate().success());
}

/// Connections over ipc.max_connections are refused with a clear error, and the ones in use go
/// on working; closing one makes room again.
#[test]
fn connections_over_the_limit_are_refused_with_a_clear_error() {
    let dev = Device::new();
    write_config(&dev, "[ipc]\nmax_connections = 3\n");
    let daemon = dev.start_daemon();
    let status_line = request(1, "status", json!({})).to_string();
    // Tries a connection: the reply to a status request, or, for a refused connection, the
    // error the daemon sends at once.
    let attempt = || {
        let mut raw = Raw::connect(&daemon.socket);
        let _ = raw.writer.write_all(format!("{status_line}\n").as_bytes());
        let reply = raw.reply();
        (raw, reply)
    };
    // The probe `start_daemon` used frees its slot once the daemon sees it closed.
    let mut held = Vec::new();
    wait_for("three connections to be served", TIMEOUT, || {
        let (raw, reply) = attempt();
        if reply.get("result").is_some() {
            held.push(raw);
        } else {
            assert_error(&reply, &Value::Null, code::BUSY, &[]);
        }
        held.len() == 3
    });

    let (mut refused, reply) = attempt();
    assert_error(
        &reply,
        &Value::Null,
        code::BUSY,
        &["already serves 3 connections", "ipc.max_connections"],
    );
    // The daemon closes a refused connection once the app has read why and closed its end,
    // or after a short while.
    assert_eq!(refused.read(), None, "a refused connection is closed");
    let out = dev.ferry(&["status"]);
    assert_fails(&out, 1, &["3 connections", "ipc.max_connections"]);
    for raw in &mut held {
        raw.still_works();
    }

    held.pop();
    wait_for("a slot to be free again", TIMEOUT, || {
        let (raw, reply) = attempt();
        let served = reply.get("result").is_some();
        if served {
            held.push(raw);
        }
        served
    });
    assert_eq!(held.len(), 3);
    drop(held);
    assert!(daemon.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// The data directory

/// A second daemon on a data directory in use exits with a message saying so; the first keeps
/// serving, its socket untouched.
#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let dev = Device::new();
    let out = dev.ferry(&["put", "Note/1", "--data", r#"{"n":1}"#]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut daemon = dev.start_daemon();

    let out = run_bounded(dev.command(&["daemon"]));
    let pid = format!("pid {}", daemon.child.id());
    assert_fails(&out, 1, &["is in use by another ferry process", &pid]);

    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the first daemon still runs"
    );
    assert!(
        dev.socket().exists(),
        "the first daemon's socket is still there"
    );
    assert_eq!(ferry_get(&dev, "Note/1"), Some(json!({"n": 1})));
    let out = dev.ferry(&["put", "Note/2", "--data", r#"{"n":2}"#]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ferry_get(&dev, "Note/2"), Some(json!({"n": 2})));
    assert!(daemon.terminate().success());
}

/// A data directory that is missing, or whose identity key, store or config is damaged, or
/// that other users can open: each command says what is wrong (and what to do) and exits 1,
/// without a panic and without touching what is there.
#[test]
fn missing_or_corrupt_data_dirs_give_clear_errors() {
    // Missing: the commands say to run `ferry init`, and create nothing.
    let dev = Device::new();
    let missing = dev.data_dir.with_file_name("nope");
    let at = |dir: &Path, args: &[&str]| {
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("--data-dir").arg(dir).args(args);
        cmd.env_remove("FERRY_CONFIG").env_remove("RUST_LOG");
        run_bounded(cmd)
    };
    for args in [
        &["get", "Note/1"][..],
        &["put", "Note/1", "--data", "{}"],
        &["ls"],
        &["status"],
    ] {
        let out = at(&missing, args);
        assert_fails(&out, 1, &["does not exist", "ferry init"]);
    }
    assert!(!missing.exists());

    // A healthy device to damage, one part at a time.
    let out = dev.ferry(&["put", "Note/1", "--data", r#"{"n":1}"#]);
    assert!(out.status.success(), "{}", stderr(&out));
    let check_refused = |words: &[&str]| {
        assert_fails(&dev.ferry(&["get", "Note/1"]), 1, words);
        assert_fails(&run_bounded(dev.command(&["daemon"])), 1, words);
    };
    let intact = || assert_eq!(ferry_get(&dev, "Note/1"), Some(json!({"n": 1})));

    let key = dev.data_dir.join("identity.key");
    let good_key = std::fs::read(&key).unwrap();
    let split_char = format!("a{}b", "é".repeat(31));
    let damaged_keys: [&[u8]; 5] = [
        b"not a key",
        b"",
        split_char.as_bytes(),
        &[0xff; 64],
        &[b'g'; 64],
    ];
    for damaged in damaged_keys {
        std::fs::write(&key, damaged).unwrap();
        check_refused(&["identity key", "is damaged"]);
    }
    std::fs::write(&key, &good_key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    check_refused(&["readable by other users", "chmod 600"]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    intact();

    // Garbage in the store's files. The bytes come from a fixed-seed generator, so a failure
    // replays exactly.
    let garbage = |len: usize| -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let store = dev.data_dir.join("store");
    let store_name = store.display().to_string();
    // Depending on what sled finds (a snapshot or none), the message says the store "cannot be
    // read" or "holds data but no readable records"; both say it is corrupt and name it.
    let flipped = |good: &[u8]| -> Vec<u8> {
        let mut bytes = good.to_vec();
        bytes.iter_mut().step_by(7).for_each(|b| *b ^= 0x5a);
        bytes
    };
    type Damage<'a> = &'a dyn Fn(&[u8]) -> Vec<u8>;
    let damages: [(&str, Damage); 4] = [
        ("db", &|_| garbage(4096)),
        ("db", &flipped),
        ("db", &|good| vec![0; good.len()]),
        ("conf", &|_| garbage(4096)),
    ];
    for (file, damage) in damages {
        let path = store.join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, damage(&good)).unwrap();
        check_refused(&["store is corrupt", &store_name]);
        std::fs::write(&path, &good).unwrap();
        intact();
    }

    // A config file that is not TOML, or has an unknown key.
    let config = dev.data_dir.join("config.toml");
    let good_config = std::fs::read(&config).unwrap();
    for (text, words) in [
        (&b"[store\x00\xff"[..], &["config file", "config.toml"][..]),
        (
            b"[store]\ncache_doc = 5\n",
            &["config.toml", "is not valid", "cache_doc"],
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        check_refused(words);
    }
    std::fs::write(&config, &good_config).unwrap();

    // A data directory other users can open.
    std::fs::set_permissions(&dev.data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    check_refused(&["is open to other users (mode 755)", "chmod 700"]);
    std::fs::set_permissions(&dev.data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    intact();

    // A fresh data directory whose store directory holds only garbage.
    let fresh = Device::new();
    std::fs::create_dir(fresh.data_dir.join("store")).unwrap();
    std::fs::write(fresh.data_dir.join("store/db"), garbage(1000)).unwrap();
    let out = fresh.ferry(&["put", "Note/1", "--data", "{}"]);
    assert_fails(&out, 1, &["store is corrupt"]);
}

// ---------------------------------------------------------------------------------------------
// A full disk

const DEVICE: &str = "00112233445566778899aabbccddeeff";

fn open_service(kv: &FaultyKv, daemon: bool) -> Service {
    let store = Store::open(
        Box::new(kv.clone()),
        DEVICE,
        StoreOptions::default(),
        Arc::new(SystemClock),
    )
    .expect("open the store");
    Service::new(
        Arc::new(store),
        ServiceOptions {
            data_dir: PathBuf::from("/nonexistent"),
            socket: PathBuf::from("/nonexistent/ferry.sock"),
            max_import_records: 100,
            max_list_limit: 1000,
            group_commit_max: 16,
            daemon,
        },
    )
}

#[track_caller]
fn assert_disk_full<T: std::fmt::Debug>(result: Result<T, ferry::service::ApiError>) {
    let err = result.expect_err("the write should hit the full disk");
    assert_eq!(err.code, code::DISK_FULL, "{err:?}");
    assert!(err.message.contains("disk is full"), "{err:?}");
    assert!(err.message.contains("No space left"), "{err:?}");
}

/// A JSON object literal as record fields.
fn object(value: Value) -> ferry::record::Fields {
    match value {
        Value::Object(fields) => fields,
        other => panic!("{other} is not an object"),
    }
}

/// A `put` of a Note.
fn note(id: &str, fields: Value) -> api::PutParams {
    api::PutParams {
        collection: "Note".into(),
        id: Some(id.to_owned()),
        fields: object(fields),
    }
}

fn fields_of(service: &Service, id: &str) -> Option<Value> {
    match service.call(api::GetParams::new("Note", id)) {
        Ok(r) => Some(Value::Object(r.fields.parse().unwrap())),
        Err(e) if e.code == code::NOT_FOUND => None,
        Err(e) => panic!("get Note/{id}: {e:?}"),
    }
}

fn queued_ids(service: &Service) -> Vec<String> {
    let q = service
        .call(api::QueueParams {
            limit: Some(10_000),
            ..Default::default()
        })
        .unwrap();
    q.entries.into_iter().map(|e| e.object_id).collect()
}

/// The write that fills the disk gets -32004 "disk is full"; earlier acknowledged writes are
/// intact, the failed write left no queue entry and no half-changed record (also in the cache),
/// and once space is free writes succeed again. Run with per-call flushes and with the daemon's
/// group commit (several writers at once).
#[test]
fn a_full_disk_refuses_the_write_and_keeps_everything_acknowledged() {
    for daemon in [false, true] {
        let kv = FaultyKv::new(60_000);
        let service = open_service(&kv, daemon);
        let blob = "x".repeat(1000);

        // Writers fill the disk; each stops at its first refused write.
        let writers = if daemon { 4 } else { 1 };
        let acked: Vec<(String, Value)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..writers)
                .map(|w| {
                    let (service, blob) = (&service, &blob);
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        for i in 0..1000 {
                            let id = format!("w{w}-{i:04}");
                            let fields = json!({"i": i, "blob": blob});
                            match service.call(note(&id, fields.clone())) {
                                Ok(r) => {
                                    assert_eq!(r.operation, Some(Operation::Create));
                                    mine.push((id, fields));
                                }
                                Err(e) => {
                                    assert_disk_full::<()>(Err(e));
                                    // Not half-created.
                                    assert_eq!(fields_of(service, &id), None);
                                    return mine;
                                }
                            }
                        }
                        panic!("writer {w}: the disk never filled up");
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("writer"))
                .collect()
        });
        assert!(acked.len() >= 5, "only {} writes fitted", acked.len());

        // While full: every kind of write is refused and changes nothing; reads go on.
        let (first, first_fields) = acked[0].clone();
        let heads = service
            .call(api::GetParams::new("Note", &first))
            .unwrap()
            .heads;
        let patch = api::PatchParams {
            collection: "Note".into(),
            id: first.clone(),
            fields: object(json!({"i": -1})),
            unset: vec!["blob".into()],
        };
        assert_disk_full(service.call(patch.clone()));
        assert_disk_full(service.call(api::DeleteParams::new("Note", &first)));
        assert_disk_full(service.call(api::ImportParams {
            records: vec![api::ImportRecord {
                collection: "Note".into(),
                id: Some("imp".into()),
                fields: Default::default(),
            }],
        }));
        let now = service.call(api::GetParams::new("Note", &first)).unwrap();
        assert_eq!(Value::Object(now.fields.parse().unwrap()), first_fields);
        assert_eq!(now.heads, heads);
        assert_eq!(fields_of(&service, "imp"), None);
        for (id, fields) in &acked {
            assert_eq!(fields_of(&service, id).as_ref(), Some(fields), "Note/{id}");
        }
        let mut queued = queued_ids(&service);
        let mut expected: Vec<String> = acked.iter().map(|(id, _)| id.clone()).collect();
        queued.sort();
        expected.sort();
        assert_eq!(queued, expected, "one queue entry per acknowledged write");
        service
            .call(api::StatusParams {})
            .expect("status while full");

        // Space is freed: the refused patch applies to the stored record, as one new change.
        kv.free_space();
        let r = service.call(patch).expect("patch after freeing space");
        assert_eq!(r.operation, Some(Operation::Update));
        assert_eq!(fields_of(&service, &first), Some(json!({"i": -1})));
        let history = service
            .call(api::HistoryParams::new("Note", &first))
            .unwrap();
        assert_eq!(history.changes.len(), 2, "{history:?}");
        let r = service.call(note("imp", json!({}))).unwrap();
        assert_eq!(
            r.operation,
            Some(Operation::Create),
            "the refused import left nothing behind"
        );

        // A flush that fails on a full disk is refused with the same code.
        kv.disk.flush_fails.store(true, Ordering::SeqCst);
        let result = service.call(note("unflushed", json!({})));
        if daemon {
            let message = result.as_ref().map_err(|e| e.message.clone()).unwrap_err();
            assert!(
                message.contains("applied but could not be made durable"),
                "{message}"
            );
        }
        assert_disk_full(result);
        kv.disk.flush_fails.store(false, Ordering::SeqCst);
        service.shutdown().expect("shut down");

        // A power cut, then a fresh start: everything acknowledged is there.
        kv.inner.crash();
        let service = open_service(&kv, daemon);
        for (id, fields) in &acked[1..] {
            assert_eq!(fields_of(&service, id).as_ref(), Some(fields), "Note/{id}");
        }
        assert_eq!(fields_of(&service, &first), Some(json!({"i": -1})));
        assert_eq!(fields_of(&service, "imp"), Some(json!({})));
        // The write whose flush failed was applied, not acknowledged; the shutdown's flush
        // made it durable, as the error message warned it might be.
        assert_eq!(fields_of(&service, "unflushed"), Some(json!({})));
        assert_eq!(queued_ids(&service).len(), acked.len() + 3);
        service.shutdown().unwrap();
    }
}

/// The real sled engine on a small tmpfs: the write that fills it gets -32004, everything
/// acknowledged before survives (the refused patch of a record does not show), and `status` (its
/// `storage` and the `disk_free` alert) says the disk is full. Once space is added, the same daemon, never restarted, takes writes again within
/// a bounded wait: everything acknowledged is there, the failed write is absent (no record, no
/// queue entry), and `status` says the storage is fine again.
#[test]
fn a_full_disk_with_the_real_store() {
    let dev = Device::new();
    let tmpfs = match Tmpfs::mount(&dev.data_dir.join("store"), "2m") {
        Ok(t) => t,
        Err(reason) => {
            println!("SKIPPED a_full_disk_with_the_real_store: {reason}");
            eprintln!("SKIPPED a_full_disk_with_the_real_store: {reason}");
            return;
        }
    };
    let mut daemon = dev.start_daemon();
    let log = stderr_lines(&mut daemon.child);
    let mut raw = Raw::connect(&daemon.socket);
    assert_eq!(
        raw.ok("status", json!({}))["storage"],
        json!({"state": "ok"})
    );
    let blob = "x".repeat(4000);
    let mut acked = Vec::new();
    let failed = loop {
        let id = format!("r{:04}", acked.len());
        assert!(acked.len() < 2000, "a 2 MiB disk never filled up");
        let reply = raw.call(
            "put",
            json!({"collection": "Note", "id": id, "fields": {"blob": blob, "id": id}}),
        );
        if reply.get("error").is_some() {
            assert_error(&reply, &reply["id"], code::DISK_FULL, &["disk is full"]);
            break id;
        }
        acked.push(id);
    };
    assert!(acked.len() >= 5, "only {} writes fitted", acked.len());
    // Reads may be refused too for now (sled cannot open on a disk with no room at all), but a
    // write is refused with the same clear error, and the status says why.
    let patch = json!({"collection": "Note", "id": acked[0], "fields": {"more": blob}});
    raw.refused("patch", patch, code::DISK_FULL, &["disk is full"]);
    let status = raw.ok("status", json!({}));
    assert_eq!(status["storage"]["state"], "disk_full", "{status}");
    assert!(status["storage"]["since_ms"].as_u64().is_some(), "{status}");
    wait_for(
        "the disk_free alert to say the disk is full",
        TIMEOUT,
        || {
            let status = raw.ok("status", json!({}));
            status["alerts"].as_array().is_some_and(|alerts| {
                alerts.iter().any(|a| {
                    a["kind"] == "disk_free"
                        && a["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("disk is full"))
                })
            })
        },
    );

    tmpfs.resize("16m");
    wait_for("the daemon to take writes again", TIMEOUT, || {
        raw.ok("status", json!({}))["storage"]["state"] == "ok"
    });
    let status = raw.ok("status", json!({}));
    let alerts = status["alerts"].as_array().cloned().unwrap_or_default();
    assert!(
        !alerts.iter().any(|a| a["kind"] == "disk_free"),
        "the full-disk alert cleared: {status}"
    );
    for id in &acked {
        let r = raw.ok("get", json!({"collection": "Note", "id": id}));
        assert_eq!(r["fields"], json!({"blob": blob, "id": id}), "Note/{id}");
    }
    raw.refused(
        "get",
        json!({"collection": "Note", "id": failed}),
        code::NOT_FOUND,
        &[],
    );
    let object_ids = |queue: &Value| -> Vec<String> {
        queue["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["object_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        object_ids(&raw.ok("queue", json!({"limit": 10_000}))),
        acked,
        "one queue entry per acknowledged write, in order"
    );
    let r = raw.ok(
        "put",
        json!({"collection": "Note", "id": failed, "fields": {"at": "last"}}),
    );
    assert_eq!(r["operation"], "create");
    let mut expected = acked.clone();
    expected.push(failed.clone());
    assert_eq!(
        object_ids(&raw.ok("queue", json!({"limit": 10_000}))),
        expected
    );
    drop(raw);
    assert!(daemon.terminate().success());
    let shutdown_log = rest(&log);
    assert!(!shutdown_log.contains("panicked"), "{shutdown_log}");
    assert!(
        shutdown_log.contains("writes are taken again"),
        "{shutdown_log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Conflicts

/// The three conflict methods over a daemon's socket: a conflict is listed and read as every
/// device records it, bad requests name their problem with a stable code, and a resolution
/// writes the chosen side once; a second one is refused as settled.
#[test]
fn conflict_methods_answer_over_the_socket_and_refuse_bad_requests() {
    let (dev, id) = Device::with_conflict();
    let daemon = dev.start_daemon();
    let mut raw = Raw::connect(&daemon.socket);

    let listed = raw.ok("conflicts.list", json!({}));
    assert_eq!(
        listed["conflicts"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(listed["conflicts"][0]["id"], json!(id));
    assert_eq!(listed["next"], Value::Null);
    for (params, count) in [
        (json!({"status": "all"}), 1),
        (json!({"status": "resolved"}), 0),
        (json!({"collection": "Invoice"}), 0),
        (json!({"after": id}), 0),
    ] {
        let r = raw.ok("conflicts.list", params.clone());
        assert_eq!(
            r["conflicts"].as_array().map(Vec::len),
            Some(count),
            "{params}: {r}"
        );
    }
    let conflict = raw.ok("conflicts.get", json!({"id": id}));
    assert_eq!(conflict, listed["conflicts"][0]);
    assert_eq!(conflict["kind"], "update_update");
    assert_eq!(conflict["collection"], "Customer");
    assert_eq!(conflict["record"], "1");
    assert_eq!(conflict["status"], "open");
    assert_eq!(conflict["fields"][0]["server"], "Bea");
    assert_eq!(conflict["fields"][0]["client"], "Grace");
    let status = raw.ok("status", json!({}));
    assert_eq!(status["conflicts"]["open"], json!(1), "{status}");

    let bad = code::INVALID_PARAMS;
    raw.refused(
        "conflicts.list",
        json!({"status": "closed"}),
        bad,
        &["closed", "open"],
    );
    raw.refused("conflicts.list", json!({"limit": 0}), bad, &["limit"]);
    raw.refused("conflicts.get", json!({}), bad, &["id"]);
    raw.refused(
        "conflicts.get",
        json!({"id": "nope"}),
        code::NOT_FOUND,
        &["nope"],
    );
    raw.refused(
        "conflicts.resolve",
        json!({"id": "nope", "take": "server"}),
        code::NOT_FOUND,
        &["nope"],
    );
    raw.refused(
        "conflicts.resolve",
        json!({"id": id, "take": "merge"}),
        bad,
        &[&id, "data"],
    );
    raw.refused(
        "conflicts.resolve",
        json!({"id": id, "take": "sideways"}),
        bad,
        &["take", "sideways"],
    );
    raw.refused(
        "conflicts.resolve",
        json!({"id": id, "take": "merge", "data": [1]}),
        bad,
        &["data"],
    );
    // None of the refusals wrote anything.
    assert_eq!(raw.ok("conflicts.get", json!({"id": id})), conflict);

    let resolved = raw.ok("conflicts.resolve", json!({"id": id, "take": "client"}));
    assert_eq!(resolved["conflict"]["id"], json!(id), "{resolved}");
    assert_eq!(resolved["conflict"]["resolving"]["take"], "client");
    assert_eq!(resolved["writes"][0]["collection"], "Customer");
    assert_eq!(resolved["writes"][0]["id"], "1");
    let record = raw.ok("get", json!({"collection": "Customer", "id": "1"}));
    assert_eq!(record["fields"]["name"], "Grace", "{record}");
    assert_eq!(record["conflicts"], json!([id]), "{record}");
    raw.refused(
        "conflicts.resolve",
        json!({"id": id, "take": "server"}),
        code::CONFLICT_SETTLED,
        &[&id, "already"],
    );
    raw.still_works();
    assert!(daemon.terminate().success());
}

/// The next notification on `client` that satisfies `wanted`, and every one before it.
fn notifications_until(
    client: &mut ferry::ipc::Client,
    wanted: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let n = client
            .next_notification()
            .unwrap_or_else(|e| panic!("no notification after {seen:?}: {e}"));
        let done = wanted(&n);
        seen.push(n);
        if done {
            return seen;
        }
    }
}

fn is_conflict_on(record: &'static str) -> impl Fn(&Value) -> bool {
    move |n| n["method"] == "conflict" && n["params"]["record"] == record
}

/// A subscription hears of conflicts as sync finds them and as they are resolved, through the
/// same filter as changes: a subscriber to one record gets nothing about another. The socket
/// server runs in this process, so the relay's log entries can be applied through its service as
/// the sync engine applies them.
#[test]
fn subscriptions_deliver_conflicts_through_their_filter() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut collections = BTreeMap::new();
    collections.insert(
        "Customer".to_owned(),
        ferry::resolve::Policy::of(ferry::resolve::Strategy::Manual),
    );
    let options = StoreOptions {
        policies: ferry::resolve::Policies {
            default: ferry::resolve::Policy::default(),
            collections,
        },
        ..StoreOptions::default()
    };
    let store = Arc::new(
        Store::open(
            Box::new(ferry::store::kv::MemoryKv::new()),
            DEVICE,
            options,
            Arc::new(SystemClock),
        )
        .expect("open the store"),
    );
    let socket = tmp.path().join("ferry.sock");
    let service = Arc::new(Service::new(
        store.clone(),
        ServiceOptions {
            data_dir: tmp.path().to_owned(),
            socket: socket.clone(),
            max_import_records: 100,
            max_list_limit: 1000,
            group_commit_max: 16,
            daemon: true,
        },
    ));
    let runtime = ferry::daemon::runtime().expect("a runtime");
    let listener = runtime
        .block_on(async { tokio::net::UnixListener::bind(&socket) })
        .expect("bind the socket");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = runtime.spawn(ferry::ipc::serve(
        listener,
        service.clone(),
        ferry::ipc::ServerOptions {
            max_message_bytes: 1 << 20,
            max_connections: 8,
            sync: None,
            alerts: None,
        },
        stopped,
    ));
    let subscriber = |filter: Value| {
        let mut client = ferry::ipc::Client::connect(&socket).expect("connect");
        client
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let r = client.call("subscribe", filter).expect("subscribe");
        (client, r["subscription"].clone())
    };
    let (mut everything, everything_id) = subscriber(json!({}));
    let (mut record_2, record_2_id) = subscriber(json!({"collection": "Customer", "id": "2"}));
    let (mut invoices, _) = subscriber(json!({"collection": "Invoice"}));
    // `ferry watch` on one record, through the same socket.
    let watch_config = tmp.path().join("watch.toml");
    std::fs::write(
        &watch_config,
        format!("[ipc]\nsocket = {:?}\n", socket.display().to_string()),
    )
    .expect("write the watcher's config");
    let mut watch = Command::new(ferry_bin())
        .arg("--data-dir")
        .arg(tmp.path().join("watcher"))
        .arg("--config")
        .arg(&watch_config)
        .args(["watch", "Customer", "--id", "2"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry watch");
    let watch_err = stderr_lines(&mut watch);
    let watch_out = {
        let pipe = watch.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    };
    if watch_err.recv_timeout(TIMEOUT).as_deref() != Ok("watching") {
        let _ = watch.kill();
        panic!("ferry watch did not start: {}", rest(&watch_err));
    }

    let mut relayed = Relayed::new(StoreOptions::default());
    let apply = |entries: &[ferry_proto::wire::LogEntry], through| {
        service
            .apply_remote(entries.to_vec(), through)
            .expect("apply the log");
    };
    relayed.same_field_conflict(&store, "Customer", "1", "name", apply);
    relayed.same_field_conflict(&store, "Customer", "2", "name", apply);
    let conflict_of = |record| {
        let ids = store
            .record_conflicts("Customer", record)
            .expect("conflicts");
        assert_eq!(ids.len(), 1, "Customer/{record}: {ids:?}");
        ids[0].clone()
    };
    let (first, second) = (conflict_of("1"), conflict_of("2"));

    let heard: Vec<Value> = notifications_until(&mut everything, is_conflict_on("2"))
        .into_iter()
        .filter(|n| n["method"] == "conflict")
        .collect();
    assert_eq!(heard.len(), 2, "{heard:?}");
    for (n, (id, record)) in heard.iter().zip([(&first, "1"), (&second, "2")]) {
        assert_eq!(
            n["params"],
            json!({
                "subscription": everything_id, "id": id, "kind": "update_update",
                "collection": "Customer", "record": record, "status": "open",
                "winner": null, "resolving": false,
            }),
            "{n}"
        );
    }

    for n in notifications_until(&mut record_2, is_conflict_on("2")) {
        let about = if n["method"] == "conflict" {
            "record"
        } else {
            "id"
        };
        assert_eq!(
            n["params"][about], "2",
            "a notification past the filter: {n}"
        );
        assert_eq!(n["params"]["subscription"], record_2_id, "{n}");
    }

    let mut printed = Vec::new();
    while !printed
        .last()
        .is_some_and(|l: &String| l.starts_with("conflict "))
    {
        match watch_out.recv_timeout(TIMEOUT) {
            Ok(line) => printed.push(line),
            Err(_) => {
                let _ = watch.kill();
                panic!("ferry watch printed no conflict: {printed:?}");
            }
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        printed.last(),
        Some(&format!("conflict open update_update Customer/2 {second}")),
        "{printed:?}"
    );
    for line in &printed[..printed.len() - 1] {
        assert!(
            line.starts_with("change ") && line.contains(" Customer/2 by "),
            "{printed:?}"
        );
    }

    // Resolving on another connection: the record's subscriber hears that it is resolving.
    let mut app = ferry::ipc::Client::connect(&socket).expect("connect");
    app.call("conflicts.resolve", json!({"id": second, "take": "server"}))
        .expect("resolve");
    let resolving = notifications_until(&mut record_2, is_conflict_on("2"));
    let last = resolving.last().map(|n| &n["params"]);
    assert_eq!(
        last.map(|p| &p["id"]),
        Some(&json!(second)),
        "{resolving:?}"
    );
    assert_eq!(
        last.map(|p| &p["resolving"]),
        Some(&json!(true)),
        "{resolving:?}"
    );

    // Nothing reached the subscriber to another collection: the first notification it gets is
    // for the invoice written now.
    app.call(
        "put",
        json!({"collection": "Invoice", "id": "9", "fields": {"n": 9}}),
    )
    .expect("put");
    let n = invoices.next_notification().expect("a notification");
    assert_eq!(
        (&n["method"], &n["params"]["id"]),
        (&json!("change"), &json!("9")),
        "{n}"
    );

    let _ = stop.send(true);
    drop((everything, record_2, invoices, app));
    runtime.block_on(server).expect("the server stops");
}
