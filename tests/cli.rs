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
