//! What the relay store's tests and the relay storage conformance suite share: devices writing
//! records and uploading their changes to one space.
#![allow(dead_code)]

use crate::common::fields;
use automerge::ActorId;
use ferry::record::Record;
use ferry::relay::store::RelayStore;
use ferry_proto::wire::{ChangeOutcome, ChangeResult, UploadChange};
use serde_json::Value;

pub const SPACE: &str = "team";

pub fn actor(n: u8) -> ActorId {
    ActorId::from(&[n; 16][..])
}

/// The device id of the device writing as `actor(n)`: the relay logs a change only from the
/// device whose actor wrote it.
pub fn dev(n: u8) -> String {
    actor(n).to_hex_string()
}

/// Appends uploads by several writers in order, each run of one writer's changes under its
/// own device id.
pub fn append_by_author(relay: &RelayStore, uploads: &[UploadChange]) -> Vec<ChangeResult> {
    let author = |u: &UploadChange| {
        ferry::record::decode_change(&u.change)
            .unwrap()
            .actor_id()
            .to_hex_string()
    };
    let mut results = Vec::new();
    for run in uploads.chunk_by(|a, b| author(a) == author(b)) {
        results.extend(relay.append(SPACE, &author(&run[0]), run).unwrap());
    }
    results
}

/// A record written on one device, keeping every change's bytes.
pub struct Writer {
    pub record: Record,
    pub changes: Vec<Vec<u8>>,
}

impl Writer {
    pub fn new(n: u8) -> Writer {
        Writer {
            record: Record::new(&actor(n)),
            changes: Vec::new(),
        }
    }

    pub fn put(&mut self, v: Value) -> Vec<u8> {
        let w = self.record.put(&fields(v), 1).unwrap().unwrap();
        self.changes.push(w.change.raw_bytes().to_vec());
        self.changes.last().unwrap().clone()
    }

    pub fn patch(&mut self, v: Value) -> Vec<u8> {
        let w = self.record.patch(&fields(v), &[], 2).unwrap().unwrap();
        self.changes.push(w.change.raw_bytes().to_vec());
        self.changes.last().unwrap().clone()
    }
}

pub fn upload(entry: u64, record: &str, change: &[u8]) -> UploadChange {
    UploadChange {
        entry,
        collection: "Doc".into(),
        record: record.into(),
        change: change.to_vec(),
    }
}

pub fn outcomes(results: &[ChangeResult]) -> Vec<ChangeOutcome> {
    results.iter().map(|r| r.outcome.clone()).collect()
}
