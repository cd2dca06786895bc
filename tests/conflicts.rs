//! Conflicts at the store level: devices exchange changes through an in-memory relay log (each
//! device uploads its queue and reads the whole log back, its own changes included, as the real
//! relay sends them), so every detection and resolution rule runs on real stores with one shared
//! step clock: whatever a test does later has the later time.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{StepClock, fields, put};
use ferry::resolve::{ConflictKind, ConflictStatus, DeleteRule, Policies, Policy, Strategy, Take};
use ferry::store::kv::MemoryKv;
use ferry::store::{Store, StoreError, StoreOptions, Write};
use ferry_proto::wire::LogEntry;
use serde_json::{Value, json};
use std::sync::Arc;

const DEVICES: [&str; 3] = [
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
    "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c",
];

struct Net {
    log: Vec<LogEntry>,
    devices: Vec<(Store, usize)>,
}

impl Net {
    fn new(count: usize, policy: Policy) -> Net {
        Net::with_clock(count, policy, StepClock::new())
    }

    fn with_clock(count: usize, policy: Policy, clock: Arc<dyn ferry::clock::Clock>) -> Net {
        let mut collections = std::collections::BTreeMap::new();
        collections.insert("Customer".to_owned(), policy);
        let options = StoreOptions {
            policies: Policies {
                default: Policy::default(),
                collections,
            },
            ..StoreOptions::default()
        };
        let devices = DEVICES[..count]
            .iter()
            .map(|id| {
                let store = Store::open(
                    Box::new(MemoryKv::new()),
                    id,
                    options.clone(),
                    clock.clone(),
                )
                .expect("open");
                (store, 0)
            })
            .collect();
        Net {
            log: Vec::new(),
            devices,
        }
    }

    fn store(&self, device: usize) -> &Store {
        &self.devices[device].0
    }

    fn write(&self, device: usize, write: Write) {
        self.store(device).write(write).expect("write");
    }

    fn upload(&mut self, device: usize) {
        common::upload(&mut self.log, &self.devices[device].0);
    }

    fn download(&mut self, device: usize) -> ferry::store::sync::RemoteOutcome {
        let (store, cursor) = &mut self.devices[device];
        let outcome = store
            .apply_remote(&self.log[*cursor..], self.log.len() as u64)
            .expect("apply");
        *cursor = self.log.len();
        outcome
    }

    /// Every device uploads in turn, then every device reads the log.
    fn sync(&mut self) {
        for d in 0..self.devices.len() {
            self.upload(d);
        }
        for d in 0..self.devices.len() {
            self.download(d);
        }
    }

    fn get(&self, device: usize, id: &str) -> Option<Value> {
        match self.store(device).get("Customer", id) {
            Ok(view) => Some(Value::Object(view.fields.parse().unwrap())),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => panic!("get: {e}"),
        }
    }

    /// The record on every device, which must agree.
    fn agreed(&self, id: &str) -> Option<Value> {
        let first = self.get(0, id);
        for d in 1..self.devices.len() {
            assert_eq!(self.get(d, id), first, "device {d} differs on {id}");
        }
        first
    }

    /// Every conflict on every device, which must agree (local `resolving` notes aside).
    fn conflicts(&self) -> Vec<ferry::resolve::Conflict> {
        let all = |d: usize| {
            let mut list = self
                .store(d)
                .conflicts(None, None, None, 1000)
                .expect("conflicts");
            for c in &mut list {
                c.resolving = None;
            }
            list
        };
        let first = all(0);
        for d in 1..self.devices.len() {
            assert_eq!(all(d), first, "device {d} holds other conflicts");
            assert_eq!(
                self.store(d).conflict_counts().unwrap(),
                self.store(0).conflict_counts().unwrap()
            );
        }
        first
    }
}

fn patch(id: &str, v: Value) -> Write {
    Write::Patch {
        collection: "Customer".into(),
        id: id.into(),
        set: fields(v),
        unset: Vec::new(),
    }
}

fn delete(id: &str) -> Write {
    Write::Delete {
        collection: "Customer".into(),
        id: id.into(),
    }
}

/// Checks that the devices hold one conflict, resolved by `device`'s resolution: two concurrent
/// resolutions end as one, not as a new conflict.
fn resolved_once_by(net: &Net, device: &str) {
    let conflicts = net.conflicts();
    assert_eq!(conflicts.len(), 1, "no new conflict: {conflicts:#?}");
    assert_eq!(conflicts[0].status, ConflictStatus::Resolved);
    let resolution = conflicts[0].resolution.as_ref().expect("a resolution");
    assert_eq!(resolution.device.as_deref(), Some(device));
}

/// Two devices whose records `a` and `b` clash on a unique `email` (merge strategy).
fn email_clash() -> Net {
    let policy = Policy {
        unique: vec![vec!["email".into()]],
        ..Policy::of(Strategy::Merge)
    };
    let mut net = Net::new(2, policy);
    net.write(0, put("Customer", "a", json!({"email": "x@y"})));
    net.write(1, put("Customer", "b", json!({"email": "x@y"})));
    net.sync();
    net
}

/// Two devices that both hold `c1` = {name: "Ada", city: "Oslo"}.
fn two_devices(policy: Policy) -> Net {
    let mut net = Net::new(2, policy);
    net.write(
        0,
        put("Customer", "c1", json!({"name": "Ada", "city": "Oslo"})),
    );
    net.sync();
    assert!(net.conflicts().is_empty());
    net
}

#[test]
fn merge_keeps_both_fields_and_reports_the_overwritten_value() {
    let mut net = two_devices(Policy::of(Strategy::Merge));
    net.write(0, patch("c1", json!({"name": "Ada A", "city": "Bergen"})));
    net.write(1, patch("c1", json!({"name": "Ada B", "tier": 2})));
    net.sync();
    assert_eq!(
        net.agreed("c1"),
        Some(json!({"name": "Ada B", "city": "Bergen", "tier": 2})),
        "the later write to `name` wins; the other fields all survive"
    );
    let conflicts = net.conflicts();
    assert_eq!(conflicts.len(), 1, "{conflicts:#?}");
    let c = &conflicts[0];
    assert_eq!(c.kind, ConflictKind::UpdateUpdate);
    assert_eq!(c.status, ConflictStatus::AutoResolved);
    assert_eq!(c.fields.len(), 1, "only `name` was written by both");
    assert_eq!(c.fields[0].server, Some(json!("Ada A")));
    assert_eq!(c.fields[0].client, Some(json!("Ada B")));
    assert_eq!(c.winner, Some(Take::Client));
    assert_eq!(c.client.device, DEVICES[1]);
    let counts = net.store(0).conflict_counts().unwrap();
    assert_eq!((counts[0].detected, counts[0].auto_resolved), (1, 1));
}

#[test]
fn merge_tie_on_time_is_broken_by_device_id_the_same_way_everywhere() {
    for b_first in [false, true] {
        let mut net = Net::with_clock(2, Policy::of(Strategy::Merge), Arc::new(FIXED_CLOCK));
        net.write(0, put("Customer", "c1", json!({"name": "Ada"})));
        net.sync();
        net.write(0, patch("c1", json!({"name": "A"})));
        net.write(1, patch("c1", json!({"name": "B"})));
        if b_first {
            net.upload(1);
        }
        net.sync();
        assert_eq!(
            net.agreed("c1").unwrap()["name"],
            "B",
            "same time: device 0b.. > 0a.."
        );
        let expected = if b_first { Take::Server } else { Take::Client };
        assert_eq!(net.conflicts()[0].winner, Some(expected));
    }
}

/// Every write at the same moment.
const FIXED_CLOCK: ferry::clock::FixedClock = ferry::clock::FixedClock(1_700_000_000_000);

#[test]
fn merge_keeps_an_update_that_met_a_delete() {
    let mut net = two_devices(Policy::of(Strategy::Merge));
    net.write(0, delete("c1"));
    net.write(1, patch("c1", json!({"tier": 3})));
    net.sync();
    assert_eq!(
        net.agreed("c1"),
        Some(json!({"name": "Ada", "city": "Oslo", "tier": 3})),
        "the record comes back with its fields and the update"
    );
    let c = &net.conflicts()[0];
    assert_eq!(
        c.kind,
        ConflictKind::UpdateDelete,
        "deleted on the relay first"
    );
    assert_eq!(c.status, ConflictStatus::AutoResolved);
    assert_eq!(c.winner, Some(Take::Client));
    // A later write on either device builds on the shown record, and a later delete deletes.
    net.write(0, patch("c1", json!({"tier": 4})));
    net.sync();
    assert_eq!(net.agreed("c1").unwrap()["tier"], 4);
    net.write(1, delete("c1"));
    net.sync();
    assert_eq!(net.agreed("c1"), None);
    assert_eq!(net.conflicts().len(), 1, "no new conflict");
}

#[test]
fn delete_update_is_named_from_the_relays_order() {
    let mut net = two_devices(Policy::of(Strategy::Merge));
    net.write(0, patch("c1", json!({"tier": 3})));
    net.write(1, delete("c1"));
    net.sync();
    assert!(net.agreed("c1").is_some(), "merge keeps the update");
    assert_eq!(net.conflicts()[0].kind, ConflictKind::DeleteUpdate);
}

#[test]
fn lww_shows_the_later_writer_whole() {
    let mut net = two_devices(Policy::of(Strategy::Lww));
    net.write(0, patch("c1", json!({"city": "Bergen"})));
    net.write(1, patch("c1", json!({"name": "Ada B"})));
    net.sync();
    assert_eq!(
        net.agreed("c1"),
        Some(json!({"name": "Ada B", "city": "Oslo"})),
        "B wrote last: its record wins whole, A's city is overwritten"
    );
    let c = &net.conflicts()[0];
    assert_eq!(
        (c.kind, c.status),
        (ConflictKind::UpdateUpdate, ConflictStatus::AutoResolved)
    );
    assert_eq!(c.winner, Some(Take::Client));
    let overwritten: Vec<_> = c.fields.iter().map(|f| f.path[0].clone()).collect();
    assert_eq!(overwritten, [json!("city"), json!("name")]);
    // A write on top makes the shown state explicit: A's city does not come back.
    net.write(0, patch("c1", json!({"tier": 1})));
    net.sync();
    assert_eq!(
        net.agreed("c1"),
        Some(json!({"name": "Ada B", "city": "Oslo", "tier": 1}))
    );
}

#[test]
fn lww_takes_the_later_of_a_delete_and_an_update() {
    let mut net = two_devices(Policy::of(Strategy::Lww));
    net.write(0, patch("c1", json!({"tier": 3})));
    net.write(1, delete("c1"));
    net.sync();
    assert_eq!(net.agreed("c1"), None, "the delete was later");
    let c = &net.conflicts()[0];
    assert_eq!(
        (c.kind, c.winner),
        (ConflictKind::DeleteUpdate, Some(Take::Client))
    );
}

#[test]
fn manual_queues_and_a_resolution_syncs_everywhere() {
    let mut net = Net::new(3, Policy::of(Strategy::Manual));
    net.write(0, put("Customer", "c1", json!({"name": "Ada"})));
    net.sync();
    net.write(0, patch("c1", json!({"name": "Ada A"})));
    net.write(1, patch("c1", json!({"name": "Ada B"})));
    net.sync();
    let open = net.conflicts();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].status, ConflictStatus::Open);
    assert_eq!(
        net.agreed("c1").unwrap()["name"],
        "Ada B",
        "provisional: the later write"
    );
    let flagged = net.store(2).get("Customer", "c1").unwrap();
    assert_eq!(flagged.conflicts, vec![open[0].id.clone()]);

    // The third device resolves it: keep the relay's version.
    let outcome = net
        .store(2)
        .resolve_conflict(&open[0].id, Take::Server, None)
        .unwrap();
    assert!(outcome.conflict.resolving.is_some());
    assert!(matches!(
        net.store(2)
            .resolve_conflict(&open[0].id, Take::Client, None),
        Err(StoreError::ConflictSettled { .. })
    ));
    net.sync();
    assert_eq!(net.agreed("c1").unwrap()["name"], "Ada A");
    let done = net.conflicts();
    assert_eq!(done[0].status, ConflictStatus::Resolved);
    assert_eq!(
        done[0].resolution.as_ref().unwrap().take,
        Some(Take::Server)
    );
    for d in 0..3 {
        assert!(
            net.store(d)
                .get("Customer", "c1")
                .unwrap()
                .conflicts
                .is_empty()
        );
        assert_eq!(net.store(d).open_conflicts().unwrap(), 0);
    }
    let counts = &net.store(1).conflict_counts().unwrap()[0];
    assert_eq!(
        (counts.detected, counts.queued, counts.resolved_manually),
        (1, 1, 1)
    );
    assert!(matches!(
        net.store(0)
            .resolve_conflict(&open[0].id, Take::Client, None),
        Err(StoreError::ConflictSettled { .. })
    ));
    assert!(matches!(
        net.store(0)
            .resolve_conflict("0000000000000000", Take::Client, None),
        Err(StoreError::ConflictNotFound(_))
    ));
}

#[test]
fn concurrent_resolutions_converge_on_the_later_one() {
    let mut net = Net::new(2, Policy::of(Strategy::Manual));
    net.write(
        0,
        put("Customer", "c1", json!({"name": "Ada", "city": "Oslo"})),
    );
    net.sync();
    net.write(0, patch("c1", json!({"name": "A", "city": "Bergen"})));
    net.write(1, patch("c1", json!({"name": "B"})));
    net.sync();
    let id = net.conflicts()[0].id.clone();
    net.store(0)
        .resolve_conflict(&id, Take::Client, None)
        .unwrap();
    net.store(1)
        .resolve_conflict(&id, Take::Server, None)
        .unwrap();
    net.sync();
    let record = net.agreed("c1").unwrap();
    assert_eq!(
        record["name"], "A",
        "B resolved later, taking the server side"
    );
    resolved_once_by(&net, DEVICES[1]);
    // And the record goes on normally.
    net.write(0, patch("c1", json!({"tier": 1})));
    net.sync();
    assert_eq!(net.agreed("c1").unwrap()["tier"], 1);
    assert_eq!(net.conflicts().len(), 1);
}

#[test]
fn manual_queues_update_delete_and_keeps_the_update_meanwhile() {
    let mut net = two_devices(Policy::of(Strategy::Manual));
    net.write(0, delete("c1"));
    net.write(1, patch("c1", json!({"tier": 3})));
    net.sync();
    assert_eq!(net.agreed("c1").unwrap()["tier"], 3);
    let c = net.conflicts().remove(0);
    assert_eq!(
        (c.kind, c.status),
        (ConflictKind::UpdateDelete, ConflictStatus::Open)
    );
    net.store(0)
        .resolve_conflict(&c.id, Take::Server, None)
        .unwrap();
    net.sync();
    assert_eq!(net.agreed("c1"), None, "the relay's version was the delete");
    assert_eq!(net.conflicts()[0].status, ConflictStatus::Resolved);
}

#[test]
fn merge_resolution_needs_data_and_writes_it() {
    let mut net = Net::new(2, Policy::of(Strategy::Manual));
    net.write(0, put("Customer", "c1", json!({"name": "Ada"})));
    net.sync();
    net.write(0, patch("c1", json!({"name": "A"})));
    net.write(1, patch("c1", json!({"name": "B"})));
    net.sync();
    let id = net.conflicts()[0].id.clone();
    assert!(matches!(
        net.store(0).resolve_conflict(&id, Take::Merge, None),
        Err(StoreError::MergeNeedsData(_))
    ));
    net.store(0)
        .resolve_conflict(&id, Take::Merge, Some(fields(json!({"name": "A+B"}))))
        .unwrap();
    net.sync();
    assert_eq!(net.agreed("c1"), Some(json!({"name": "A+B"})));
}

#[test]
fn a_configured_delete_rule_overrides_the_strategys() {
    let policy = Policy {
        on_delete: DeleteRule::KeepDelete,
        ..Policy::of(Strategy::Merge)
    };
    let mut net = two_devices(policy);
    net.write(0, delete("c1"));
    net.write(1, patch("c1", json!({"tier": 3})));
    net.sync();
    assert_eq!(net.agreed("c1"), None);
    assert_eq!(net.conflicts()[0].winner, Some(Take::Server));
}

#[test]
fn unique_clashes_keep_both_records_flag_the_later_and_end_when_resolved() {
    let policy = Policy {
        unique: vec![vec!["email".into()]],
        ..Policy::of(Strategy::Merge)
    };
    let mut net = Net::new(2, policy);
    net.write(
        0,
        put("Customer", "a", json!({"email": "x@y", "name": "A"})),
    );
    net.write(
        1,
        put("Customer", "b", json!({"email": "x@y", "name": "B"})),
    );
    net.sync();
    assert!(
        net.agreed("a").is_some() && net.agreed("b").is_some(),
        "nothing rejected"
    );
    let c = net.conflicts().remove(0);
    assert_eq!(
        (c.kind, c.status),
        (ConflictKind::Unique, ConflictStatus::Open)
    );
    assert_eq!((c.server.record.as_str(), c.record.as_str()), ("a", "b"));
    assert_eq!(c.unique.as_ref().unwrap().value, [json!("x@y")]);
    assert_eq!(
        net.store(0).get("Customer", "b").unwrap().conflicts,
        vec![c.id.clone()]
    );
    assert!(
        net.store(0)
            .get("Customer", "a")
            .unwrap()
            .conflicts
            .is_empty()
    );

    net.store(1)
        .resolve_conflict(&c.id, Take::Server, None)
        .unwrap();
    net.sync();
    assert!(net.agreed("a").is_some());
    assert_eq!(net.agreed("b"), None, "keep the first, delete the later");
    let done = net.conflicts().remove(0);
    assert_eq!(done.status, ConflictStatus::Resolved);
    assert_eq!(done.resolution.unwrap().take, Some(Take::Server));
}

#[test]
fn concurrent_resolutions_of_a_unique_clash_bring_no_new_clash() {
    let mut net = email_clash();
    let id = net.conflicts()[0].id.clone();
    // Opposite choices; device 1 resolves later, and its changes reach the log after device 0's.
    net.store(0)
        .resolve_conflict(&id, Take::Client, None)
        .unwrap();
    net.store(1)
        .resolve_conflict(&id, Take::Server, None)
        .unwrap();
    net.sync();
    assert!(net.agreed("a").is_some(), "the later resolution keeps `a`");
    assert_eq!(net.agreed("b"), None);
    resolved_once_by(&net, DEVICES[1]);
    let counts = net.store(0).conflict_counts().unwrap();
    assert_eq!((counts[0].detected, counts[0].resolved_manually), (1, 1));
}

#[test]
fn a_unique_clash_ends_when_a_value_is_changed() {
    let policy = Policy {
        unique: vec![vec!["first".into(), "last".into()]],
        ..Policy::of(Strategy::Lww)
    };
    let mut net = Net::new(2, policy);
    net.write(
        0,
        put("Customer", "a", json!({"first": "Ada", "last": "L"})),
    );
    net.write(
        1,
        put("Customer", "b", json!({"first": "Ada", "last": "L"})),
    );
    net.write(
        1,
        put("Customer", "c", json!({"first": "Ada", "last": "K"})),
    );
    net.sync();
    let c = net.conflicts();
    assert_eq!(c.len(), 1, "a compound value clashes only whole");
    net.write(0, patch("b", json!({"last": "M"})));
    net.sync();
    let done = net.conflicts().remove(0);
    assert_eq!(done.status, ConflictStatus::Resolved);
    assert_eq!(done.resolution.unwrap().take, None, "ended by an edit");
    assert_eq!(net.store(0).open_conflicts().unwrap(), 0);
}

#[test]
fn replaying_the_log_after_a_crash_finds_nothing_twice() {
    let mut net = two_devices(Policy::of(Strategy::Merge));
    net.write(0, patch("c1", json!({"name": "A"})));
    net.write(1, patch("c1", json!({"name": "B"})));
    net.sync();
    let before = net.store(0).conflict_counts().unwrap();
    let log = net.log.clone();
    let again = net.store(0).apply_remote(&log, log.len() as u64).unwrap();
    assert!(again.conflicts.is_empty());
    assert_eq!(net.store(0).conflict_counts().unwrap(), before);
}

#[test]
fn the_queue_entry_of_a_conflicting_change_names_the_conflict() {
    let mut net = two_devices(Policy::of(Strategy::Merge));
    net.write(0, patch("c1", json!({"name": "A"})));
    net.write(1, patch("c1", json!({"name": "B"})));
    net.sync();
    let id = net.conflicts()[0].id.clone();
    let entries = net.store(1).queue(None, None, 100).unwrap();
    assert_eq!(
        net.store(1).change_conflict(&entries[0].data).unwrap(),
        Some(id)
    );
    for entry in net.store(0).queue(None, None, 100).unwrap() {
        assert_eq!(net.store(0).change_conflict(&entry.data).unwrap(), None);
    }
}

#[test]
fn text_fields_merge_concurrent_edits_character_by_character() {
    let policy = Policy {
        text: Arc::new(["notes".to_owned()].into()),
        ..Policy::of(Strategy::Merge)
    };
    let mut net = Net::new(2, policy);
    net.write(0, put("Customer", "c1", json!({"notes": "hello world"})));
    net.sync();
    net.write(0, patch("c1", json!({"notes": "hello brave world"})));
    net.write(1, patch("c1", json!({"notes": "hello world!"})));
    net.sync();
    assert_eq!(net.agreed("c1").unwrap()["notes"], "hello brave world!");
    assert!(
        net.conflicts().is_empty(),
        "different characters: no conflict"
    );
}

#[test]
fn a_delete_that_an_update_outlives_is_not_announced_as_a_delete() {
    let mut net = two_devices(Policy::of(Strategy::Merge));
    net.write(0, delete("c1"));
    net.write(1, patch("c1", json!({"tier": 3})));
    net.upload(0);
    net.upload(1);
    let outcome = net.download(1);
    let seen: Vec<_> = outcome
        .applied
        .iter()
        .map(|a| (a.operation, a.deleted))
        .collect();
    assert_eq!(seen, [(ferry_proto::Operation::Update, false)]);
    assert_eq!(outcome.conflicts.len(), 1);
    let outcome = net.download(0);
    assert_eq!(outcome.applied[0].operation, ferry_proto::Operation::Create);
}

#[test]
fn the_same_two_records_can_clash_again_after_a_clash_ended() {
    let mut net = email_clash();
    net.write(1, patch("b", json!({"email": "z@y"})));
    net.sync();
    net.write(1, patch("b", json!({"email": "x@y"})));
    net.sync();
    let conflicts = net.conflicts();
    let statuses: Vec<_> = conflicts.iter().map(|c| c.status).collect();
    assert_eq!(conflicts.len(), 2, "{conflicts:#?}");
    assert!(
        statuses.contains(&ConflictStatus::Resolved) && statuses.contains(&ConflictStatus::Open)
    );
    assert_eq!(net.store(0).open_conflicts().unwrap(), 1);
}

#[test]
fn merge_never_rewrites_a_contested_field_a_write_did_not_ask_for() {
    let mut net = two_devices(Policy::of(Strategy::Merge));
    // Enough writes on device 0 that Automerge's own pick between the two `city` values below
    // (by operation counter) is not the one the later time shows.
    for n in 0..5 {
        net.write(0, patch("c1", json!({ "tier": n })));
    }
    net.write(0, patch("c1", json!({"city": "A"})));
    net.write(1, patch("c1", json!({"city": "B"})));
    net.sync();
    assert_eq!(net.agreed("c1").unwrap()["city"], "B");
    net.write(0, patch("c1", json!({"city": "C"})));
    net.write(1, patch("c1", json!({"name": "N"})));
    net.sync();
    let record = net.agreed("c1").unwrap();
    assert_eq!(
        record["city"], "C",
        "device 1 asked only for `name`: {record}"
    );
    assert_eq!(record["name"], "N");
}
