//! Entry points that feed arbitrary bytes to each decoder Ferry has: IPC messages (and the
//! methods they call), stored record documents, stored queue and log entries, config files, sync
//! protocol frames, the relay's stored state, access and refresh tokens, the HTTPS API's
//! upload bodies, and changes from elsewhere applied to record documents (on a device and on the
//! relay) or read by hand as a new record's first change. `forge` and `mutate_change` bend
//! valid changes the way a hostile device would, for the tests and the simulation.
//! The fuzz targets in `fuzz/` call these, and `tests/fuzz_regressions.rs` replays the checked-in
//! seeds and past crashers through them, so a fixed crash stays fixed.
//!
//! Each function must return normally for every input: an `Err` is fine, a panic is a bug.
//!
//! Built only with the `fuzzing` feature (enabled by `fuzz/` and by this package's own tests),
//! never into the daemon or the relay.

// A panic here is a finding, which is what a fuzz entry point exists to report: the fixtures
// (in-memory stores, a fixed hex actor, a fixed token) fail only through a bug in Ferry, and the
// round-trip checks fail only when an encoder and its decoder disagree.
#![allow(clippy::panic)]

use crate::auth::token::{KeyRing, RefreshToken, SigningKeyEntry, TokenPolicy};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::ipc::{self, decode_message};
use crate::record::Record;
use crate::relay::storage::{KvStorage, log_blocks};
use crate::relay::store::{RelayStore, RelayStoreOptions};
use crate::resolve::{self, Policy, Strategy};
use crate::service::{Service, ServiceOptions};
use crate::store::kv::{Kv as _, MemoryKv};
use crate::store::{Store, StoreOptions};
use ferry_proto::wire::{FrameReader, Message, decode_frame_body, encode_frame, frame_length};
use ferry_proto::{SyncLogEntry, SyncQueueEntry};
use std::sync::Arc;

const DEVICE: &str = "00112233445566778899aabbccddeeff";

/// The Automerge actor `DEVICE` writes as.
fn device_actor() -> automerge::ActorId {
    match automerge::ActorId::try_from(DEVICE) {
        Ok(actor) => actor,
        Err(e) => panic!("DEVICE is hex: {e}"),
    }
}

/// One line from the socket, decoded and, if it holds requests, executed against an in-memory
/// store with small limits.
pub fn ipc_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let requests = match decode_message(line) {
        ipc::Message::Empty | ipc::Message::Invalid(_) => return,
        ipc::Message::Single(r) => vec![r],
        ipc::Message::Batch(rs) => rs,
    };
    let service = small_service();
    for request in requests.into_iter().flatten() {
        let _ = ipc::call_json(&service, &request.method, request.params);
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

/// A stored record document, as read back from disk, read under every strategy (which settles
/// concurrent values by reading the change graph), and its changes run through conflict
/// detection one by one as if logged in order.
pub fn record_document(data: &[u8]) {
    let actor = automerge::ActorId::from(&[1u8; 16][..]);
    let _ = crate::record::chunk_hash(data);
    if let Ok(mut record) = Record::load(data, &actor) {
        let _ = record.fields();
        let _ = record.is_live();
        let _ = record.history();
        for strategy in [Strategy::Merge, Strategy::Lww, Strategy::Manual] {
            let policy = Policy {
                unique: vec![vec!["a".into()]],
                ..Policy::of(strategy)
            };
            let _ = resolve::unique_values(&resolve::view(&mut record, &policy), &policy);
            let doc = record.automerge();
            let mut logged = Vec::new();
            for meta in doc.get_changes_meta(&[]) {
                let at = resolve::LogPosition {
                    seq: 1,
                    collection: "C",
                    record: "r",
                };
                logged = resolve::detect(doc, &logged, &meta.hash, at, &policy).logged_heads;
            }
        }
    }
}

/// Stored SyncQueue and SyncLog entries, conflict entries, change feed keys, a record's
/// document (whole or in its short form) and view as one value, a bucket of the queue's
/// history, and a relay's log value (a block of entries, or one entry).
pub fn stored_entries(data: &[u8]) {
    let _ = crate::store::feed::unpack(data);
    if let Some(pair) = crate::store::paired::parse(data) {
        let held = pair.document.map_or(0, <[u8]>::len) + pair.view.map_or(0, <[u8]>::len);
        assert!(held <= data.len(), "a pair holds no more than its bytes");
        if let (true, Some(short), Some(view)) = (pair.short, pair.document, pair.view) {
            let _ = crate::store::implied::expand(short, view);
        }
    }
    let _ = postcard::from_bytes::<SyncQueueEntry>(data);
    let _ = postcard::from_bytes::<SyncLogEntry>(data);
    let _ = serde_json::from_slice::<resolve::Conflict>(data);
    log_block(data);
    history_bucket(data);
}

/// A device's stored bucket of its queue's history; one that reads packs again into a value
/// that reads the same.
fn history_bucket(value: &[u8]) {
    use crate::store::{history, keys};
    let key = keys::history(0);
    if let Ok(read) = history::read(&key, value) {
        let again = match history::pack(&read) {
            Ok(packed) => history::read(&key, &packed),
            Err(e) => panic!("what was read must pack again: {e}"),
        };
        match again {
            Ok(again) => assert_eq!(again, read),
            Err(e) => panic!("a packed bucket must read back: {e}"),
        }
    }
}

/// A relay's stored log value, read as a block and as one entry stored alone; a block that reads
/// packs again into a value that reads the same.
fn log_block(value: &[u8]) {
    let mut key = 1000u64.to_be_bytes().to_vec();
    let _ = log_blocks::entries(&key, value, 0);
    key.push(log_blocks::BLOCK_TAG);
    if let Ok(read) = log_blocks::entries(&key, value, 0) {
        // The changes read out by seq are those the whole block holds.
        let mut seqs: Vec<u64> = read.iter().map(|(seq, _)| *seq).collect();
        seqs.extend([0, 1001]);
        seqs.sort_unstable();
        match log_blocks::changes_at(&key, value, 0, &seqs) {
            Ok(changes) => assert!(
                changes
                    .iter()
                    .map(|(seq, change)| (*seq, change.as_slice()))
                    .eq(read.iter().map(|(seq, entry)| (*seq, &*entry.change))),
                "changes read out by seq differ from the block's"
            ),
            Err(e) => panic!("a block that reads must read by seq too: {e}"),
        }
        let stored: Vec<log_blocks::StoredEntry> =
            read.into_iter().map(|(_, entry)| entry).collect();
        let again = match log_blocks::pack(&stored) {
            Ok(packed) => log_blocks::entries(&key, &packed, 0),
            Err(e) => panic!("what was read must pack again: {e}"),
        };
        let again = match again {
            Ok(again) => again,
            Err(e) => panic!("a packed block must read back: {e}"),
        };
        assert_eq!(again.len(), stored.len());
        for ((_, back), entry) in again.iter().zip(&stored) {
            assert_eq!((&back.record, &back.change), (&entry.record, &entry.change));
        }
    }
}

/// A config file.
pub fn config_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, std::path::Path::new("fuzz.toml"));
    }
}

/// A frame limit small enough that the fuzzer reaches it, large enough for several messages.
const FUZZ_MAX_FRAME_BYTES: usize = 4096;
/// How many leading bytes choose the piece sizes the stream is cut into.
const SPLIT_BYTES: usize = 4;

/// Sync frames off the network. The first bytes choose the sizes of the pieces the rest arrives
/// in, as a QUIC stream may deliver it; each piece goes to a `FrameReader` with a small frame
/// limit. The rest, after the four bytes a length would take, is also decoded as one frame body. Every message that decodes must encode and
/// decode back to itself, or a peer would read something other than what was sent.
pub fn sync_frame(data: &[u8]) {
    let (split, stream) = data.split_at(data.len().min(SPLIT_BYTES));
    let mut reader = FrameReader::new(FUZZ_MAX_FRAME_BYTES);
    let mut sizes = split.iter().map(|&b| usize::from(b) + 1).cycle();
    let mut rest = stream;
    'stream: while !rest.is_empty() {
        let size = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let (piece, tail) = rest.split_at(size);
        rest = tail;
        reader.push(piece);
        loop {
            match reader.next_message() {
                Ok(Some(message)) => assert_round_trip(&message),
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
    }
    if let Some(Ok(message)) = stream
        .get(4..)
        .map(|body| decode_frame_body(body, FUZZ_MAX_FRAME_BYTES))
    {
        assert_round_trip(&message);
    }
}

fn assert_round_trip(message: &Message) {
    let frame = match encode_frame(message) {
        Ok(frame) => frame,
        Err(e) => panic!("a decoded message must encode again: {e}"),
    };
    // A decoded body is at most the limit and re-encodes no longer (postcard writes the shortest
    // varints), but it may lose its compression: the flags byte can then be one over.
    let limit = FUZZ_MAX_FRAME_BYTES + 1;
    let Some((header, body)) = frame.split_first_chunk::<4>() else {
        panic!(
            "encode_frame wrote {} bytes, less than a header",
            frame.len()
        );
    };
    assert_eq!(
        frame_length(*header, limit),
        Ok(body.len()),
        "header of {message:?}"
    );
    assert_eq!(decode_frame_body(body, limit).as_ref(), Ok(message));
}

/// A decoder entry point: must return for every input.
pub type EntryPoint = fn(&[u8]);

/// Every entry point by the name of its fuzz target.
pub const TARGETS: &[(&str, EntryPoint)] = &[
    ("ipc_line", ipc_line),
    ("record_document", record_document),
    ("stored_entries", stored_entries),
    ("config_file", config_file),
    ("sync_frame", sync_frame),
    ("relay_store", relay_store),
    ("token_verify", token_verify),
    ("http_upload", http_upload),
    ("remote_change", remote_change),
];

/// The time every fuzzed token is verified at, and issued at by the fixture.
const TOKEN_NOW: u64 = 1_700_000_000;

/// An access token and a refresh token off the network, from the same bytes. The access token
/// is verified against a fixed key ring at a fixed time: only the fixture's own token can
/// verify, so whatever verifies must carry exactly its claims. A refresh token that parses must
/// encode back to the same text, or two texts would name one token.
pub fn token_verify(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let policy = TokenPolicy::default();
    let mut ring = KeyRing::default();
    ring.insert(SigningKeyEntry::from_seed("fuzz".into(), [1; 32], 0));
    let issued = crate::auth::token::issue_access(
        &ring, &policy, "fuzz", DEVICE, DEVICE, TOKEN_NOW, [2; 16],
    );
    let issued = match issued {
        Ok((_, claims)) => claims,
        Err(e) => panic!("the fixture's token must issue: {e}"),
    };
    if let Ok(claims) = crate::auth::token::verify_access(&ring, &policy, &text, TOKEN_NOW) {
        assert_eq!(claims, issued, "a token verified to claims nobody issued");
    }
    if let Ok(refresh) = RefreshToken::parse(&text) {
        assert_eq!(
            refresh.encode(),
            text,
            "a refresh token parsed from another text"
        );
    }
}

/// Arbitrary change bytes applied to an arbitrary record document, on both paths that apply
/// changes from elsewhere: a device applying a relay log entry (`Store::apply_remote`, with the
/// document stored as the record's) and the relay validating an upload (`RelayStore::append`,
/// with the document stored as the record's base, uploaded by the change's own actor so that
/// it gets past the authorship check), and the relay's shortcut check of a new record's first
/// change compared with applying it, and that a change it logs leaves a document that loads
/// again. The input is the document's length (u16, big-endian), the document (none: a new
/// record), then the change. Also that the header of a change Automerge decodes reads the same
/// by hand (`record::change_header`).
pub fn remote_change(data: &[u8]) {
    const SPACE: &str = "fuzz";
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (document, change) = rest.split_at(usize::from(u16::from_be_bytes(*len)).min(rest.len()));
    let stored = |key: Vec<u8>| {
        let kv = MemoryKv::new();
        if !document.is_empty() {
            let mut batch = crate::store::kv::Batch::default();
            batch.put(key, document.to_vec());
            if let Err(e) = kv.apply(batch) {
                panic!("an in-memory store takes a write: {e}");
            }
        }
        kv
    };

    let kv = stored(crate::store::keys::doc("Doc", "r"));
    let store = match Store::open(
        Box::new(kv),
        DEVICE,
        StoreOptions::default(),
        Arc::new(SystemClock),
    ) {
        Ok(store) => store,
        Err(e) => panic!("an in-memory store must open: {e}"),
    };
    let entry = ferry_proto::wire::LogEntry {
        seq: 1,
        collection: "Doc".into(),
        record: "r".into(),
        change: change.to_vec(),
    };
    let _ = store.apply_remote(&[entry], 1);
    let _ = store.get("Doc", "r");
    let _ = store.history("Doc", "r");

    // The header read by hand (how a device places its own changes without decoding them) says
    // what Automerge says of every change Automerge decodes.
    if let Ok(decoded) = crate::record::decode_change(change) {
        match crate::record::change_header(change) {
            Ok(header) => {
                let same = header.hash == decoded.hash()
                    && header.deps == decoded.deps()
                    && &header.actor == decoded.actor_id()
                    && header.seq == decoded.seq()
                    && header.message.as_deref() == decoded.message();
                assert!(same, "the change header {header:?} differs from the change");
            }
            Err(e) => panic!("Automerge decodes a change whose header is refused: {e}"),
        }
    }
    // A new record's first change read by hand (how a device keeps one without Automerge)
    // says exactly what Automerge reads in it.
    if let Some(by_hand) = crate::record::first_change::decode(change) {
        let by_automerge = crate::record::decode_change(change)
            .ok()
            .and_then(|c| crate::record::first_change::FirstChange::of(&c));
        assert_eq!(
            Some(&by_hand),
            by_automerge.as_ref(),
            "a first change read by hand differs from what Automerge reads"
        );
    }

    let kv = stored(format!("b{SPACE}\0Doc\0r\0").into_bytes());
    let relay = RelayStore::open(
        Arc::new(KvStorage::new(Arc::new(kv))),
        RelayStoreOptions::default(),
    );
    let origin = crate::record::decode_change(change)
        .map_or_else(|_| DEVICE.to_owned(), |c| c.actor_id().to_hex_string());
    let upload = ferry_proto::wire::UploadChange {
        entry: 1,
        collection: "Doc".into(),
        record: "r".into(),
        change: change.to_vec(),
    };
    let stored = relay
        .append(SPACE, &origin, &[upload])
        .is_ok_and(|results| {
            results
                .iter()
                .all(|r| matches!(r.outcome, ferry_proto::wire::ChangeOutcome::Stored { .. }))
        });
    let _ = relay.record(SPACE, "Doc", "r");
    let _ = relay.history(SPACE, "Doc", "r");
    // A logged change leaves a document that loads again once saved (a new record's first
    // change, which the relay does not reload, included).
    if stored && let Ok(Some(saved)) = relay.document_bytes(SPACE, "Doc", "r") {
        assert!(
            Record::load(&saved, &device_actor()).is_ok(),
            "the relay logged a change that leaves a document Automerge cannot load"
        );
    }

    // The relay's shortcut for a new record's first change must agree with applying it (the
    // relay refuses a new record's change at any other sequence number than 1 before that).
    if let Ok(change) = crate::record::decode_change(change)
        && change.seq() == 1
        && Record::check_first(change.clone()).is_ok()
    {
        assert!(
            Record::apply_first(change.clone()).is_ok(),
            "a first change passed the relay's check but does not apply"
        );
    }

    // A device keeps a plain first change's bytes as the new record's document, unapplied: they
    // must load as the document holding that change, deleted exactly when it says so.
    if let Ok(decoded) = crate::record::decode_change(change)
        && let Some(plain) = crate::record::PlainFirst::of(&decoded)
    {
        let loaded = Record::load(change, &device_actor());
        assert!(
            loaded
                .as_ref()
                .is_ok_and(|r| r.is_deleted() == plain.deleted),
            "a plain first change does not load as its record's document: {:?}",
            loaded.err()
        );
        if let Ok(mut record) = loaded {
            assert_eq!(record.heads(), vec![decoded.hash()]);
            // The fields a device's view of the record takes from the change, unloaded.
            assert_eq!(
                resolve::view(&mut record, &resolve::Policy::default()).fields,
                plain.fields,
                "a plain first change's fields differ from its document's"
            );
        }
    }
}

/// A way to bend a valid change into one a hostile or broken device might upload. The result is
/// a well-formed change (with its own hash) that says something false or cannot be applied.
#[derive(Debug, Clone)]
pub enum Forgery {
    /// Written under another actor (passed off as that device's).
    Actor(automerge::ActorId),
    /// With another sequence number (a gap, or one already used).
    Seq(u64),
    /// Built on other dependencies (none, or hashes nobody logged).
    Deps(Vec<automerge::ChangeHash>),
    /// Another time: a new change that says the same (same actor and sequence number).
    Time(i64),
    /// Another message (the operation it names, or a resolution's conflict).
    Message(Option<String>),
    /// Another first operation counter (zero is not one), the operations numbered on from it:
    /// below its actor's earlier operations, they are numbers that actor has used already.
    StartOp(u64),
    /// Every operation writes into an object the document does not have: Automerge 0.12
    /// panics applying it ("Missing from Index").
    MissingObject,
}

/// `change` bent by `forgery`, as the bytes a device would upload; `None` if Automerge cannot
/// encode the result.
pub fn forge(change: &automerge::Change, forgery: Forgery) -> Option<Vec<u8>> {
    use automerge::legacy::{ObjectId, OpId};
    let mut expanded = change.decode();
    expanded.hash = None;
    match forgery {
        Forgery::Actor(actor) => {
            let own = expanded.actor_id.clone();
            for op in &mut expanded.operations {
                if let ObjectId::Id(OpId(counter, a)) = &op.obj
                    && *a == own
                {
                    op.obj = ObjectId::Id(OpId(*counter, actor.clone()));
                }
            }
            expanded.actor_id = actor;
        }
        Forgery::Seq(seq) => expanded.seq = seq,
        Forgery::Deps(deps) => expanded.deps = deps,
        Forgery::Time(time) => expanded.time = time,
        Forgery::Message(message) => expanded.message = message,
        Forgery::StartOp(start) => expanded.start_op = std::num::NonZeroU64::new(start)?,
        Forgery::MissingObject => {
            let missing = ObjectId::Id(OpId(u64::from(u32::MAX), expanded.actor_id.clone()));
            for op in &mut expanded.operations {
                op.obj = missing.clone();
            }
        }
    }
    let forged = std::panic::catch_unwind(|| automerge::Change::from(expanded)).ok()?;
    Some(forged.raw_bytes().to_vec())
}

/// One of `Forgery`'s ways, picked by `pick`, with `other` as the actor or dependency it names:
/// the random mutations a hostile participant makes of valid changes.
pub fn mutate_change(change: &automerge::Change, pick: u64, other: [u8; 16]) -> Option<Vec<u8>> {
    let forgery = match pick % 6 {
        0 => Forgery::Actor(automerge::ActorId::from(&other[..])),
        1 => Forgery::Seq(change.seq() + 1 + pick / 6 % 1000),
        2 => Forgery::Seq(1),
        3 => Forgery::Deps(vec![automerge::ChangeHash([other[0]; 32])]),
        4 => Forgery::Time(
            change
                .timestamp()
                .wrapping_add(1 + (pick / 6) as i64 % 1000),
        ),
        _ => Forgery::MissingObject,
    };
    forge(change, forgery)
}

/// The relay's store with one of its stored values replaced by arbitrary bytes: a space holding
/// changes of two records (one compacted into a base, one with a tail), then one stored value,
/// chosen by the first byte, overwritten with the rest; the store is reopened and read and
/// appended to. Damage must come back as errors.
pub fn relay_store(data: &[u8]) {
    const SPACE: &str = "fuzz";
    let Some((&pick, damage)) = data.split_first() else {
        return;
    };
    let kv = MemoryKv::new();
    let options = RelayStoreOptions {
        doc_cache_docs: 1,
        compact_after: 2,
        ..RelayStoreOptions::default()
    };
    let open = |kv: &MemoryKv| {
        RelayStore::open(
            Arc::new(KvStorage::new(Arc::new(kv.clone()))),
            options.clone(),
        )
    };
    let changes = relay_fixture_changes();
    let _ = open(&kv).append(SPACE, DEVICE, &changes);
    let Ok(stored) = kv.range(&[], &[0xff; 8], usize::MAX) else {
        return;
    };
    if let Some((key, _)) = stored.get(pick as usize % stored.len().max(1)) {
        let mut batch = crate::store::kv::Batch::default();
        batch.put(key.clone(), damage.to_vec());
        let _ = kv.apply(batch);
    }
    let store = open(&kv);
    let _ = store.head(SPACE);
    let _ = store.read_since(SPACE, 0, 100, 1 << 20);
    for record in ["a", "b"] {
        let _ = store.record(SPACE, "Doc", record);
        let _ = store.document_bytes(SPACE, "Doc", record);
    }
    let _ = store.collections(SPACE);
    let _ = store.records(SPACE, "Doc", None, 10);
    let _ = store.append(SPACE, DEVICE, &changes);
}

/// Three changes of record `a` (enough to compact it) and one of record `b`, by `DEVICE`.
fn relay_fixture_changes() -> Vec<ferry_proto::wire::UploadChange> {
    let actor = device_actor();
    let mut changes = Vec::new();
    for (record, values) in [("a", &[1, 2, 3][..]), ("b", &[4][..])] {
        let mut doc = Record::new(&actor);
        for &n in values {
            let mut fields = crate::record::Fields::new();
            fields.insert("n".into(), serde_json::json!(n));
            if let Ok(Some(written)) = doc.put(&fields, n) {
                changes.push(ferry_proto::wire::UploadChange {
                    entry: changes.len() as u64 + 1,
                    collection: "Doc".into(),
                    record: record.into(),
                    change: written.change.raw_bytes().to_vec(),
                });
            }
        }
    }
    changes
}

/// An HTTPS upload body, decoded as the route decodes it and, if it is operations, checked and
/// written by a web actor over an in-memory relay (twice, so the second meets the first), with a
/// fixed client id and clock.
pub fn http_upload(data: &[u8]) {
    use crate::relay::web_write::{Planned, UploadOperation, merge, plan};
    const CLIENT: &str = "0f0e0d0c0b0a09080706050403020100";
    const NOW: u64 = 1_750_000_000_000;
    let Ok(operations) = serde_json::from_slice::<Vec<UploadOperation>>(data) else {
        return;
    };
    let kv: Arc<dyn crate::store::kv::Kv> = Arc::new(MemoryKv::new());
    let storage = Arc::new(KvStorage::new(kv));
    let store = Arc::new(RelayStore::open(
        storage.clone(),
        RelayStoreOptions {
            doc_cache_docs: 2,
            ..RelayStoreOptions::default()
        },
    ));
    let accounts = crate::relay::accounts::Accounts::open(
        storage,
        TokenPolicy::default(),
        Arc::new(|bytes: &mut [u8]| {
            bytes.fill(7);
            Ok(())
        }),
        NOW,
    );
    let accounts = match accounts {
        Ok(accounts) => Arc::new(accounts),
        Err(e) => panic!("in-memory accounts must open: {e}"),
    };
    let shared = crate::relay::server::Shared {
        clock: Arc::new(crate::clock::FixedClock(NOW)),
        store,
        accounts,
        metrics: Arc::default(),
        activity: Arc::default(),
        spaces: Arc::default(),
        alerts: crate::relay::alerts::RelayAlerts::new(
            crate::alerts::AlertsConfig::default(),
            Arc::new(crate::clock::FixedClock(NOW)),
        ),
    };
    let policies = resolve::Policies {
        collections: [("Ticket".to_owned(), Policy::of(Strategy::Manual))].into(),
        ..resolve::Policies::default()
    };
    let actors = crate::relay::web_actor::WebActors::new(
        &shared,
        crate::store::StoreOptions {
            policies,
            ..crate::store::StoreOptions::default()
        },
        100,
    );
    for _ in 0..2 {
        let Ok(Planned { outcomes, writes }) = plan(operations.clone(), CLIENT, NOW) else {
            return;
        };
        let expected = outcomes.len();
        if let Ok(written) = actors.write("fuzz", writes, NOW) {
            assert_eq!(
                merge(outcomes, written).len(),
                expected,
                "one result per operation"
            );
        }
    }
}
