//! The `ferry` binary as people use it, without a daemon and through one.

mod common;

use common::{Device, stderr, stdout};
use serde_json::{Value, json};

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
        stderr(&out).contains("line 1 is over 4096 bytes"),
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
