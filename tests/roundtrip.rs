//! Every JSON value type through the real `ferry` binary (without a daemon and through one):
//! put, `get --json`, `export` as JSON, JSON Lines and Automerge bytes, and `import` into a fresh
//! device. Values must come back exactly: integers stay integers, floats stay floats bit for bit.
//! A property test drives arbitrary JSON through `ferry::record::Record` at the library level.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use automerge::{AutoCommit, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value as AmValue};
use common::{Device, assert_json_same, json_difference, stderr, stdout};
use ferry::record::{DELETED_KEY, Fields, Record, RecordError, validate_fields};
use ferry_proto::{Limits, Operation};
use proptest::prelude::*;
use serde_json::{Map, Number, Value, json};
use std::collections::BTreeMap;
use std::process::Output;

const COLLECTION: &str = "Types";

#[track_caller]
fn succeeded(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        stderr(out)
    );
    stdout(out)
}

#[track_caller]
fn parse_json(text: &str, what: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"))
}

/// `levels` nested containers around `innermost`: as a field value, the record holding it is
/// `levels + 1` deep. `shape` picks objects (`o`), arrays (`a`) or both alternating (`m`).
fn nested(levels: usize, shape: char, innermost: Value) -> Value {
    let mut value = innermost;
    for level in (0..levels).rev() {
        let object = match shape {
            'o' => true,
            'a' => false,
            _ => level % 2 == 0,
        };
        value = if object {
            json!({ format!("level{}", level + 2): value })
        } else {
            json!([value])
        };
    }
    value
}

/// Records holding every JSON type, each at most `max_depth` deep (the record is level 1).
fn corpus(max_depth: usize) -> Vec<(String, Value)> {
    let at_limit = max_depth - 1;
    let records = [
        (
            "strings",
            json!({
                "ascii": "plain text",
                "unicode": "héllo wörld ✓ ж 中文 עברית",
                "astral": "🚢 𝄞 😀 \u{10FFFF} \u{1F600}",
                "escapes": "quote \" backslash \\ slash / newline \n return \r tab \t \u{8} \u{c}",
                "controls": "\u{1}\u{1f}\u{7f}\u{9f}",
                "nul": "a\u{0}b\u{0}",
                "empty": "",
                "separators": "\u{2028}\u{2029}\u{feff}",
                "long": "x".repeat(10_000),
            }),
        ),
        (
            "integers",
            json!({
                "zero": 0,
                "one": 1,
                "minus_one": -1,
                "i64_min": i64::MIN,
                "i64_max": i64::MAX,
                "above_i64": i64::MAX as u64 + 1,
                "u64_max": u64::MAX,
                "beyond_f64_precision": -9_007_199_254_740_993_i64,
            }),
        ),
        (
            "floats",
            json!({
                "one": 1.0,
                "neg_zero": -0.0,
                "zero": 0.0,
                "tiny": 1e-300,
                "huge": 1.5e300,
                "half": 0.5,
                "tenth": 0.1,
                "negative": -2.5,
                "smallest_subnormal": 5e-324,
                "max": f64::MAX,
                "lowest": f64::MIN,
                "min_positive": f64::MIN_POSITIVE,
                "integral_above_2_53": 9_007_199_254_740_994.0,
            }),
        ),
        ("literals", json!({ "t": true, "f": false, "n": null })),
        (
            "arrays",
            json!({
                "mixed": [1, -1, 1.5, -0.0, "two", "", true, false, null, [], {}, [1, [2.0, ["3"]]],
                          {"k": [null, {"deeper": u64::MAX}]}],
                "empty": [],
                "nested_empty": [[], [[]], {}, [{}]],
                "strings": ["", "🚢", "\u{0}"],
                "numbers": [i64::MIN, u64::MAX, 1.0, 0, -0.0],
            }),
        ),
        (
            "objects",
            json!({
                "empty": {},
                "": "the empty key",
                "nested": {"": {"": ""}, "a": {"b": {"c": {}}},
                           "$inner": "only top-level names starting with $ are reserved"},
                "unicode key é 🚢": 1,
                "key with \"quotes\", \\ and \n": 2,
            }),
        ),
        ("empty", json!({})),
        (
            "ünï/cødé 🚢 id",
            json!({ "id_has": "a slash, spaces and astral characters" }),
        ),
        (
            "deep_objects",
            json!({ "v": nested(at_limit, 'o', json!("bottom")) }),
        ),
        (
            "deep_arrays",
            json!({ "v": nested(at_limit, 'a', json!(1.5)) }),
        ),
        (
            "deep_mixed",
            json!({ "v": nested(at_limit, 'm', json!(null)), "w": nested(at_limit - 1, 'a', json!({})) }),
        ),
    ];
    records
        .into_iter()
        .map(|(id, fields)| (id.to_owned(), fields))
        .collect()
}

/// Records one level deeper than `max_depth`: each must be refused.
fn too_deep(max_depth: usize) -> Vec<Value> {
    vec![
        json!({ "v": nested(max_depth, 'o', json!("bottom")) }),
        json!({ "v": nested(max_depth, 'a', json!(1)) }),
        json!({ "v": nested(max_depth, 'm', json!(null)) }),
        // An empty container is a level of its own.
        json!({ "v": nested(max_depth - 1, 'a', json!([])) }),
        json!({ "ok": 1, "v": nested(max_depth - 1, 'o', json!({})) }),
    ]
}

fn configured_limits(dev: &Device) -> Limits {
    ferry::config::Config::load(&dev.data_dir.join("config.toml"), true)
        .expect("the device's config loads")
        .limits
}

/// The result of `ferry --json put|patch` (the operation is `null` when nothing changed).
fn write(dev: &Device, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = dev.ferry(&full);
    parse_json(&succeeded(&out, &format!("{args:?}")), "write result")
}

fn put(dev: &Device, address: &str, fields: &Value) -> Value {
    write(dev, &["put", address, "--data", &fields.to_string()])
}

fn get_fields(dev: &Device, collection: &str, id: &str) -> Value {
    let address = format!("{collection}/{id}");
    let out = dev.ferry(&["--json", "get", &address]);
    let view = parse_json(&succeeded(&out, &format!("get {address}")), "get");
    assert_eq!(view["collection"], json!(collection));
    assert_eq!(view["id"], json!(id));
    view["fields"].clone()
}

/// The records of a `{"collection","id","fields"}` export, strictly compared with `expected`.
fn check_export_records(got: &[Value], expected: &[(String, String, Value)], what: &str) {
    let got_addresses: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("collection"), s("id"))
        })
        .collect();
    let expected_addresses: Vec<(String, String)> = expected
        .iter()
        .map(|(c, id, _)| (c.clone(), id.clone()))
        .collect();
    assert_eq!(
        got_addresses, expected_addresses,
        "{what}: records or order"
    );
    for (record, (c, id, fields)) in got.iter().zip(expected) {
        let keys: Vec<&String> = record.as_object().expect("record object").keys().collect();
        assert_eq!(keys, ["collection", "fields", "id"], "{what}: {c}/{id}");
        assert_json_same(&record["fields"], fields, &format!("{what}: {c}/{id}"));
    }
}

fn jsonl_records(text: &str) -> Vec<Value> {
    text.lines().map(|l| parse_json(l, "export line")).collect()
}

/// Checks an Automerge document as Automerge itself reads it: the root holds `fields` plus the
/// `$deleted: false` marker, with integers as Automerge ints (uints above i64), floats as f64,
/// strings as plain strings, objects as maps and arrays as lists.
fn check_document(doc: &AutoCommit, fields: &Value) -> Result<(), String> {
    let Value::Object(map) = fields else {
        return Err("fields are not an object".into());
    };
    match doc.get(ROOT, DELETED_KEY) {
        Ok(Some((AmValue::Scalar(s), _))) if *s == ScalarValue::Boolean(false) => {}
        other => return Err(format!("root {DELETED_KEY}: {other:?}")),
    }
    check_map(doc, &ROOT, map, "$", Some(DELETED_KEY))
}

fn check_map(
    doc: &AutoCommit,
    obj: &ObjId,
    expected: &Map<String, Value>,
    path: &str,
    reserved: Option<&str>,
) -> Result<(), String> {
    let keys: Vec<String> = doc
        .keys(obj)
        .filter(|k| Some(k.as_str()) != reserved)
        .collect();
    let expected_keys: Vec<String> = expected.keys().cloned().collect();
    if keys != expected_keys {
        return Err(format!("{path}: keys {keys:?}, expected {expected_keys:?}"));
    }
    for (key, value) in expected {
        let found = doc.get(obj, key.as_str()).map_err(|e| e.to_string())?;
        check_value(doc, found, value, &format!("{path}[{key:?}]"))?;
    }
    Ok(())
}

fn check_value(
    doc: &AutoCommit,
    found: Option<(AmValue<'_>, ObjId)>,
    expected: &Value,
    path: &str,
) -> Result<(), String> {
    let Some((value, id)) = found else {
        return Err(format!("{path}: missing"));
    };
    let wrong = |value: &AmValue<'_>| Err(format!("{path}: {value:?}, expected {expected}"));
    match (expected, &value) {
        (Value::Object(map), AmValue::Object(ObjType::Map)) => check_map(doc, &id, map, path, None),
        (Value::Array(items), AmValue::Object(ObjType::List)) => {
            if doc.length(&id) != items.len() {
                return wrong(&value);
            }
            for (i, item) in items.iter().enumerate() {
                let found = doc.get(&id, i).map_err(|e| e.to_string())?;
                check_value(doc, found, item, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (scalar, AmValue::Scalar(s)) => {
            let same = match (scalar, s.as_ref()) {
                (Value::Null, ScalarValue::Null) => true,
                (Value::Bool(a), ScalarValue::Boolean(b)) => a == b,
                (Value::String(a), ScalarValue::Str(b)) => a.as_str() == b.as_str(),
                (Value::Number(n), ScalarValue::Int(i)) => n.as_i64() == Some(*i),
                (Value::Number(n), ScalarValue::Uint(u)) => {
                    n.as_i64().is_none() && n.as_u64() == Some(*u)
                }
                (Value::Number(n), ScalarValue::F64(f)) => {
                    n.is_f64() && n.as_f64().map(f64::to_bits) == Some(f.to_bits())
                }
                _ => false,
            };
            if same { Ok(()) } else { wrong(&value) }
        }
        _ => wrong(&value),
    }
}

/// The whole round trip on one device, with or without its daemon running.
fn round_trip(with_daemon: bool) {
    let dev = Device::new();
    let limits = configured_limits(&dev);
    assert!(limits.max_depth >= 4, "the corpus needs max_depth >= 4");
    let daemon = with_daemon.then(|| dev.start_daemon());
    let status = parse_json(
        &succeeded(&dev.ferry(&["--json", "status"]), "status"),
        "status",
    );
    assert_eq!(
        status["daemon"],
        json!(with_daemon),
        "commands must take the intended path"
    );

    // Everything we expect the device to hold: (collection, id) -> fields.
    let mut expected: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut changes = 0;
    for (id, fields) in corpus(limits.max_depth) {
        let address = format!("{COLLECTION}/{id}");
        let r = put(&dev, &address, &fields);
        assert_eq!(r["operation"], json!("create"), "put {address}: {r}");
        assert_eq!(r["id"], json!(id));
        changes += 1;
        expected.insert((COLLECTION.into(), id), fields);
    }
    let copy = expected[&(COLLECTION.to_owned(), "strings".to_owned())].clone();
    put(&dev, "Zeta/copy", &copy);
    changes += 1;
    expected.insert(("Zeta".into(), "copy".into()), copy);
    let generated = json!({"generated": true, "n": 1.5});
    let r = put(&dev, COLLECTION, &generated);
    assert_eq!(r["operation"], json!("create"));
    let generated_id = r["id"].as_str().expect("a generated id").to_owned();
    changes += 1;
    expected.insert((COLLECTION.into(), generated_id), generated);

    // Putting the same content again changes nothing.
    for ((c, id), fields) in &expected {
        let r = put(&dev, &format!("{c}/{id}"), fields);
        assert_eq!(
            r["operation"],
            Value::Null,
            "identical put of {c}/{id}: {r}"
        );
    }

    // Number kinds are part of the value: 1, 1.0, 0.0 and -0.0 are four different contents.
    let kinds = [
        (json!({"v": 1, "a": [1]}), "create"),
        (json!({"v": 1.0, "a": [1]}), "update"),
        (json!({"v": 1.0, "a": [1.0]}), "update"),
        (json!({"v": 1, "a": [1.0]}), "update"),
        (json!({"v": -0.0, "a": [1.0]}), "update"),
        (json!({"v": 0.0, "a": [1.0]}), "update"),
        (json!({"v": 0.0, "a": [-0.0]}), "update"),
        (json!({"v": 0.0, "a": [0.0]}), "update"),
        (json!({"v": 0.0, "a": [0.0]}), "unchanged"),
        (json!({"v": u64::MAX, "a": [i64::MIN]}), "update"),
        (
            json!({"v": u64::MAX as f64, "a": [i64::MIN as f64]}),
            "update",
        ),
    ];
    for (fields, operation) in kinds {
        let r = put(&dev, &format!("{COLLECTION}/kinds"), &fields);
        let got = r["operation"].as_str().unwrap_or("unchanged");
        assert_eq!(got, operation, "put {fields}");
        changes += usize::from(operation != "unchanged");
        assert_json_same(
            &get_fields(&dev, COLLECTION, "kinds"),
            &fields,
            &format!("kinds after put {fields}"),
        );
        expected.insert((COLLECTION.into(), "kinds".into()), fields);
    }

    // One level too deep is refused with exit 2 and writes nothing: not as a new record, not
    // over an existing one, not through patch.
    for (n, fields) in too_deep(limits.max_depth).iter().enumerate() {
        let data = fields.to_string();
        let address = format!("{COLLECTION}/too_deep_{n}");
        let out = dev.ferry(&["put", &address, "--data", &data]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "put {address}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("deeper than"),
            "put {address}: {}",
            stderr(&out)
        );
        assert_eq!(dev.ferry(&["get", &address]).status.code(), Some(3));
        let existing = format!("{COLLECTION}/strings");
        for args in [
            ["put", existing.as_str(), "--data", data.as_str()],
            ["patch", existing.as_str(), "--data", data.as_str()],
        ] {
            let out = dev.ferry(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        }
    }
    let queue = parse_json(
        &succeeded(&dev.ferry(&["--json", "queue", "--limit", "1000"]), "queue"),
        "queue",
    );
    assert_eq!(queue["counts"]["pending"], json!(changes), "queue: {queue}");

    // get --json gives back exactly what was put.
    for ((c, id), fields) in &expected {
        assert_json_same(&get_fields(&dev, c, id), fields, &format!("get {c}/{id}"));
    }

    let all: Vec<(String, String, Value)> = expected
        .iter()
        .map(|((c, id), f)| (c.clone(), id.clone(), f.clone()))
        .collect();
    let types: Vec<_> = all
        .iter()
        .filter(|(c, _, _)| c == COLLECTION)
        .cloned()
        .collect();

    // export --format json: one array, collections and ids in byte order.
    let out = dev.ferry(&["export", "--format", "json"]);
    let array = parse_json(&succeeded(&out, "export json"), "export json");
    check_export_records(array.as_array().expect("an array"), &all, "export json");

    // export --format jsonl: one record per line, whole store and one collection.
    let jsonl = succeeded(&dev.ferry(&["export", "--format", "jsonl"]), "export jsonl");
    check_export_records(&jsonl_records(&jsonl), &all, "export jsonl");
    let out = dev.ferry(&["export", COLLECTION, "--format", "jsonl"]);
    let text = succeeded(&out, "export collection jsonl");
    check_export_records(&jsonl_records(&text), &types, "export Types jsonl");

    // One record as JSON, and as the raw Automerge document.
    for (c, id, fields) in &all {
        let address = format!("{c}/{id}");
        let out = dev.ferry(&["export", &address, "--format", "json"]);
        let one = parse_json(&succeeded(&out, "export one json"), "export one");
        check_export_records(
            one.as_array().expect("an array"),
            &[(c.clone(), id.clone(), fields.clone())],
            &format!("export {address} json"),
        );
        let out = dev.ferry(&["export", &address, "--format", "automerge"]);
        assert!(out.status.success(), "export {address}: {}", stderr(&out));
        let doc = AutoCommit::load(&out.stdout)
            .unwrap_or_else(|e| panic!("export {address}: Automerge cannot load it: {e}"));
        if let Err(e) = check_document(&doc, fields) {
            panic!("export {address} as Automerge: {e}");
        }
    }

    // import of the JSON Lines export into a fresh device gives the same records.
    let fresh = Device::new();
    let fresh_daemon = with_daemon.then(|| fresh.start_daemon());
    let file = fresh.data_dir.join("export.jsonl");
    let out = dev.ferry(&[
        "export",
        "--format",
        "jsonl",
        "--out",
        file.to_str().expect("utf-8 path"),
    ]);
    succeeded(&out, "export --out");
    assert_eq!(
        std::fs::read_to_string(&file).expect("export file"),
        jsonl,
        "--out writes what standard output gets"
    );
    let out = fresh.ferry(&["--json", "import", file.to_str().expect("utf-8 path")]);
    let r = parse_json(&succeeded(&out, "import"), "import result");
    assert_eq!(r["imported"], json!(all.len()), "{r}");
    assert_eq!(r["changed"], json!(all.len()), "{r}");
    let again = succeeded(&fresh.ferry(&["export", "--format", "jsonl"]), "export");
    assert_eq!(again, jsonl, "the imported device exports the same bytes");
    check_export_records(&jsonl_records(&again), &all, "export after import");
    for (c, id, fields) in &all {
        assert_json_same(
            &get_fields(&fresh, c, id),
            fields,
            &format!("imported {c}/{id}"),
        );
    }

    for d in [daemon, fresh_daemon].into_iter().flatten() {
        let status = d.terminate();
        assert!(status.success(), "daemon exit: {status}");
    }
}

#[test]
fn every_json_type_round_trips_without_a_daemon() {
    round_trip(false);
}

#[test]
fn every_json_type_round_trips_through_the_daemon() {
    round_trip(true);
}

#[test]
fn the_configured_depth_limit_is_the_one_enforced() {
    let dev = Device::new();
    let config = dev.data_dir.join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(
        text.contains("max_depth = 32"),
        "config.example.toml changed"
    );
    std::fs::write(&config, text.replace("max_depth = 32", "max_depth = 4")).expect("config");
    assert_eq!(configured_limits(&dev).max_depth, 4);
    let ok = json!({"v": nested(3, 'm', json!(1))});
    let over = json!({"v": nested(4, 'm', json!(1))});
    for with_daemon in [false, true] {
        let daemon = with_daemon.then(|| dev.start_daemon());
        let address = format!("{COLLECTION}/d{with_daemon}");
        assert_eq!(put(&dev, &address, &ok)["operation"], json!("create"));
        assert_json_same(
            &get_fields(&dev, COLLECTION, &format!("d{with_daemon}")),
            &ok,
            "at the limit",
        );
        let out = dev.ferry(&["put", &address, "--data", &over.to_string()]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("deeper than 4 levels"),
            "{}",
            stderr(&out)
        );
        if let Some(d) = daemon {
            assert!(d.terminate().success());
        }
    }
}

// ---- Library level: arbitrary JSON through `Record` ----

fn leaf() -> impl Strategy<Value = Value> {
    let special_floats = prop::sample::select(vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.1,
        1e-300,
        1.5e300,
        5e-324,
        f64::MAX,
        f64::MIN,
        f64::MIN_POSITIVE,
        9_007_199_254_740_993.0,
    ]);
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (i64::MAX as u64..=u64::MAX).prop_map(Value::from),
        prop::sample::select(vec![0_i64, 1, -1, i64::MIN, i64::MAX]).prop_map(Value::from),
        any::<f64>().prop_filter_map("JSON floats are finite", |f| Number::from_f64(f)
            .map(Value::Number)),
        special_floats.prop_map(|f| Value::Number(Number::from_f64(f).expect("finite"))),
        any::<String>().prop_map(Value::String),
        "[a-z🚢\u{0}\"\\\\]{0,4}".prop_map(Value::String),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-c$]{0,2}"]
}

/// Values at most `levels` containers deep.
fn value(levels: u32) -> impl Strategy<Value = Value> {
    leaf().prop_recursive(levels, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Record fields: top-level names never start with `$` (those are Ferry's).
fn fields(levels: u32) -> impl Strategy<Value = Fields> {
    prop::collection::btree_map(
        key().prop_filter("reserved", |k| !k.starts_with('$')),
        value(levels),
        0..8,
    )
    .prop_map(|m| m.into_iter().collect())
}

/// How many levels deep a record with these fields is (the record is level 1; an empty container
/// is a level too).
fn record_depth(fields: &Fields) -> usize {
    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    1 + fields.values().map(depth).max().unwrap_or(0)
}

fn actor(n: u8) -> automerge::ActorId {
    automerge::ActorId::from(&[n; 16][..])
}

fn same(a: &Fields, b: &Fields) -> Result<(), TestCaseError> {
    match json_difference(&Value::Object(a.clone()), &Value::Object(b.clone())) {
        None => Ok(()),
        Some(diff) => Err(TestCaseError::fail(diff)),
    }
}

proptest! {
    #![proptest_config(common::proptest_config(256))]

    /// Put, save, load and replace keep every value exactly, the document reads the same through
    /// Automerge itself, and a put of identical content writes no change.
    #[test]
    fn arbitrary_json_round_trips_through_a_record(a in fields(5), b in fields(5)) {
        prop_assert!(validate_fields(&a, &Limits::default()).is_ok());
        let mut record = Record::new(&actor(1));
        let written = record.put(&a, 1_000).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(written.map(|w| w.operation), Some(Operation::Create));
        same(&record.fields(), &a)?;

        let mut loaded = Record::load(&record.save(), &actor(2))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(loaded.is_live());
        same(&loaded.fields(), &a)?;
        check_document(loaded.doc_mut(), &Value::Object(a.clone())).map_err(TestCaseError::fail)?;
        prop_assert!(loaded.put(&a, 2_000).map_err(|e| TestCaseError::fail(e.to_string()))?.is_none(),
            "identical put wrote a change");

        let identical = json_difference(&Value::Object(a.clone()), &Value::Object(b.clone())).is_none();
        let written = loaded.put(&b, 3_000).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(written.map(|w| w.operation), (!identical).then_some(Operation::Update));
        same(&loaded.fields(), &b)?;

        // The same values with their numbers in the other kind are a different content.
        let twisted = match common::look_alike(&Value::Object(b.clone())) {
            Value::Object(m) => m,
            _ => unreachable!("look_alike keeps an object an object"),
        };
        let differs = json_difference(&Value::Object(b.clone()), &Value::Object(twisted.clone())).is_some();
        let written = loaded.put(&twisted, 4_000).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(written.map(|w| w.operation), differs.then_some(Operation::Update));
        same(&loaded.fields(), &twisted)?;
        let b = twisted;
        let changes = 1 + usize::from(!identical) + usize::from(differs);

        let mut reloaded = Record::load(&loaded.save(), &actor(3))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        same(&reloaded.fields(), &b)?;
        check_document(reloaded.doc_mut(), &Value::Object(b.clone())).map_err(TestCaseError::fail)?;
        prop_assert_eq!(reloaded.history().unwrap().len(), changes);
    }

    /// The depth check refuses exactly the records deeper than the limit.
    #[test]
    fn depth_limit_matches_the_record_depth(f in fields(6), max_depth in 1_usize..7) {
        let limits = Limits { max_depth, ..Limits::default() };
        let result = validate_fields(&f, &limits);
        if record_depth(&f) <= max_depth {
            prop_assert!(result.is_ok(), "depth {} refused at max {}: {:?}", record_depth(&f), max_depth, result);
        } else {
            prop_assert!(matches!(result, Err(RecordError::TooDeep { max }) if max == max_depth),
                "depth {} at max {}: {:?}", record_depth(&f), max_depth, result);
        }
    }
}
