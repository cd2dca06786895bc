//! Entry points that feed arbitrary bytes to each decoder Ferry has: IPC messages (and the
//! methods they call), stored record documents, stored queue and log entries, and config files.
//! The fuzz targets in `fuzz/` call these, and `tests/fuzz_regressions.rs` replays the checked-in
//! seeds and past crashers through them, so a fixed crash stays fixed.
//!
//! Each function must return normally for every input: an `Err` is fine, a panic is a bug.

use crate::config::Config;
use crate::ipc::{Message, decode_message};
use crate::record::Record;
use crate::service::{Service, ServiceOptions};
use crate::store::kv::MemoryKv;
use crate::store::{Store, StoreOptions, SystemClock};
use ferry_proto::{SyncLogEntry, SyncQueueEntry};
use std::sync::Arc;

const DEVICE: &str = "00112233445566778899aabbccddeeff";

/// One line from the socket, decoded and, if it holds requests, executed against an in-memory
/// store with small limits.
pub fn ipc_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let requests = match decode_message(line) {
        Message::Empty | Message::Invalid(_) => return,
        Message::Single(r) => vec![r],
        Message::Batch(rs) => rs,
    };
    let service = small_service();
    for request in requests.into_iter().flatten() {
        let _ = service.call(&request.method, request.params);
    }
}

fn small_service() -> Service {
    let options = StoreOptions {
        cache_docs: 4,
        ..StoreOptions::default()
    };
    let store = Store::open(
        Box::new(MemoryKv::new()),
        DEVICE,
        options,
        Arc::new(SystemClock),
    );
    let store = match store {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("an empty in-memory store must open: {e}"),
    };
    Service::new(
        store,
        ServiceOptions {
            data_dir: "fuzz".into(),
            socket: "fuzz.sock".into(),
            max_import_records: 64,
            max_list_limit: 64,
            group_commit_max: 8,
            daemon: false,
        },
    )
}

/// A stored record document, as read back from disk.
pub fn record_document(data: &[u8]) {
    let actor = automerge::ActorId::from(&[1u8; 16][..]);
    if let Ok(mut record) = Record::load(data, &actor) {
        let _ = record.fields();
        let _ = record.is_live();
        let _ = record.history();
    }
}

/// Stored SyncQueue and SyncLog entries.
pub fn stored_entries(data: &[u8]) {
    let _ = postcard::from_bytes::<SyncQueueEntry>(data);
    let _ = postcard::from_bytes::<SyncLogEntry>(data);
}

/// A config file.
pub fn config_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, std::path::Path::new("fuzz.toml"));
    }
}

/// A decoder entry point: must return for every input.
pub type EntryPoint = fn(&[u8]);

/// Every entry point by the name of its fuzz target.
pub const TARGETS: &[(&str, EntryPoint)] = &[
    ("ipc_line", ipc_line),
    ("record_document", record_document),
    ("stored_entries", stored_entries),
    ("config_file", config_file),
];
