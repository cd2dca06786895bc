//! Queries on a device's store (`list` with `where` and `order_by`): for random records and
//! random queries, the pages a query gives, read one after another through their `next`, hold
//! exactly the records a plain oracle (written here, sharing no code with `ferry::query`) finds
//! and orders, at every page size, whether a secondary index answers (any of several index
//! sets on the collection) or a scan; deleted records never show; conditions on encrypted
//! fields are refused.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::StepClock;
use ferry::query::{Condition, Direction, Op, Query};
use ferry::resolve::{Policies, Policy};
use ferry::store::kv::MemoryKv;
use ferry::store::{Store, StoreError, StoreOptions, Write};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A record's `n`: an integer, a string, or absent; `s`: a short string.
#[derive(Debug, Clone)]
struct Rec {
    n: Option<Value>,
    s: String,
    deleted: bool,
}

fn rec() -> impl Strategy<Value = Rec> {
    (
        prop_oneof![
            Just(None),
            (-3i64..4).prop_map(|n| Some(json!(n))),
            "[ab]{0,2}".prop_map(|s| Some(json!(s))),
        ],
        "[ab]{1,2}",
        prop::bool::weighted(0.15),
    )
        .prop_map(|(n, s, deleted)| Rec { n, s, deleted })
}

fn condition() -> impl Strategy<Value = Condition> {
    let scalar = prop_oneof![
        (-3i64..4).prop_map(|n| json!(n)),
        "[ab]{0,2}".prop_map(|s| json!(s))
    ];
    let op = prop_oneof![
        Just(Op::Eq),
        Just(Op::Lt),
        Just(Op::Le),
        Just(Op::Gt),
        Just(Op::Ge),
        Just(Op::In),
        Just(Op::Exists),
    ];
    (
        prop_oneof![Just("n"), Just("s")],
        op,
        scalar.clone(),
        prop::collection::vec(scalar, 0..3),
        any::<bool>(),
    )
        .prop_map(|(field, op, value, values, exists)| Condition {
            field: field.into(),
            op,
            value: Some(match op {
                Op::In => Value::Array(values),
                Op::Exists => json!(exists),
                _ => value,
            }),
        })
}

/// The oracle's view of one value: which kind it is (its rank in an order) and how it compares.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
enum Key {
    Missing,
    Int(i64),
    Text(String),
}

fn key(v: Option<&Value>) -> Key {
    match v {
        None => Key::Missing,
        Some(Value::Number(n)) => Key::Int(n.as_i64().unwrap()),
        Some(Value::String(s)) => Key::Text(s.clone()),
        Some(other) => panic!("no {other} in these records"),
    }
}

fn oracle_holds(c: &Condition, field: Option<&Value>) -> bool {
    let value = c.value.as_ref().unwrap();
    let same_kind = |a: &Key, b: &Key| {
        matches!(
            (a, b),
            (Key::Int(_), Key::Int(_)) | (Key::Text(_), Key::Text(_))
        )
    };
    let (have, want) = (
        key(field),
        key(Some(value).filter(|v| !v.is_array() && !v.is_boolean())),
    );
    match c.op {
        Op::Exists => field.is_some() == value.as_bool().unwrap(),
        Op::In => value
            .as_array()
            .unwrap()
            .iter()
            .any(|v| key(Some(v)) == have && same_kind(&have, &key(Some(v)))),
        _ if !same_kind(&have, &want) => false,
        Op::Eq => have == want,
        Op::Lt => have < want,
        Op::Le => have <= want,
        Op::Gt => have > want,
        Op::Ge => have >= want,
    }
}

/// The index sets a collection may have: none, one field, two, a compound one either way.
fn index_set(which: usize) -> Vec<Vec<String>> {
    let sets: [&[&[&str]]; 5] = [
        &[],
        &[&["n"]],
        &[&["s"], &["n"]],
        &[&["s", "n"]],
        &[&["n", "s"]],
    ];
    sets[which]
        .iter()
        .map(|index| index.iter().map(|f| (*f).to_owned()).collect())
        .collect()
}

fn store(policies: Policies, indexes: Vec<Vec<String>>) -> Store {
    Store::open(
        Box::new(MemoryKv::new()),
        common::TEST_DEVICE,
        StoreOptions {
            policies,
            indexes: BTreeMap::from([("C".to_owned(), indexes)]),
            ..StoreOptions::default()
        },
        StepClock::new(),
    )
    .unwrap()
}

proptest! {
    #![proptest_config(common::proptest_config(64))]
    #[test]
    fn query_pages_hold_what_the_oracle_finds_in_its_order(
        records in prop::collection::vec(rec(), 0..40),
        conditions in prop::collection::vec(condition(), 0..3),
        order in prop_oneof![Just(None), Just(Some("n")), Just(Some("s"))],
        desc in any::<bool>(),
        page in 1usize..7,
        indexes in 0usize..5,
    ) {
        let store = store(Policies::default(), index_set(indexes));
        let mut live = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            let id = format!("r{i:02}");
            let mut f = serde_json::Map::new();
            if let Some(n) = &r.n {
                f.insert("n".into(), n.clone());
            }
            f.insert("s".into(), json!(r.s));
            store.write(Write::Put { collection: "C".into(), id: Some(id.clone()), fields: f.clone() }).unwrap();
            if r.deleted {
                store.write(Write::Delete { collection: "C".into(), id: id.clone() }).unwrap();
            } else {
                live.insert(id, f);
            }
        }
        let direction = if desc { Direction::Desc } else { Direction::Asc };
        let query = Query::new(conditions.clone(), order.map(|f| (f.to_owned(), direction))).unwrap();

        let mut expected: Vec<(&String, &serde_json::Map<String, Value>)> = live
            .iter()
            .filter(|(_, f)| conditions.iter().all(|c| oracle_holds(c, f.get(&c.field))))
            .collect();
        if let Some(field) = order {
            expected.sort_by(|a, b| {
                let by = key(a.1.get(field))
                    .partial_cmp(&key(b.1.get(field)))
                    .unwrap_or(Ordering::Equal)
                    .then_with(|| a.0.cmp(b.0));
                if desc { by.reverse() } else { by }
            });
        }
        let expected: Vec<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();

        let mut got: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let found = store.query("C", &query, after.as_deref(), page).unwrap();
            if indexes == 0 {
                prop_assert_eq!(found.plan.as_str(), "scan");
            }
            if indexes == 1 && conditions.iter().any(|c| c.field == "n" && c.op == Op::Eq) {
                prop_assert_eq!(found.plan.as_str(), "index:n");
            }
            prop_assert!(found.records.len() <= page);
            got.extend(found.records.into_iter().map(|r| r.id));
            match found.next {
                Some(next) => after = Some(next),
                None => break,
            }
            prop_assert!(got.len() <= live.len(), "pages never end");
        }
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn conditions_and_orders_on_encrypted_fields_are_refused() {
    let sealed = Policy {
        encrypted: Arc::new(["secret".to_owned()].into()),
        ..Policy::default()
    };
    let store = store(
        Policies {
            default: Policy::default(),
            collections: BTreeMap::from([("C".to_owned(), sealed)]),
        },
        Vec::new(),
    );
    let on_secret = Condition {
        field: "secret".into(),
        op: Op::Eq,
        value: Some(json!("x")),
    };
    for query in [
        Query::new(vec![on_secret], None).unwrap(),
        Query::new(Vec::new(), Some(("secret".into(), Direction::Asc))).unwrap(),
    ] {
        match store.query("C", &query, None, 10) {
            Err(StoreError::Query(e)) => assert!(e.to_string().contains("encrypted"), "{e}"),
            other => panic!("a query on an encrypted field: {other:?}"),
        }
    }
}
