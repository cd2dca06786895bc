//! The device's durable state: record documents, the SyncQueue, the SyncLog and metadata.
//!
//! Owns: key layout, the rule that a local write and its queue entry land in one atomic batch
//! (with the record's view, `views`, as every batch that changes a document),
//! the bounded cache of loaded documents, queue/log bookkeeping, the space bound (live bytes
//! measured, compaction asked of the engine), and going back to what is durable after a flush
//! failed for lack of space. Durability is explicit:
//! `write` makes a change visible, `flush` makes everything written so far durable, and callers
//! acknowledge a write only after the flush that covers it (see `daemon::committer`).
//!
//! Damage (`health`): every new queue entry is also journaled outside sled with its batch, so an
//! acknowledged change survives sled silently dropping the end of its log; why a journal rather
//! than a sidecar that only counts: the count finds the loss, the journal also keeps the
//! changes, for one extra `fdatasync` per flush (the group commit shares it, as it shares
//! sled's). An open compares the journal with the data and records what is wrong (`mdamage`)
//! until `repair`.
//!
//! Must not touch: sockets, JSON-RPC, the CLI. It knows records only through `record`.

pub mod completed;
pub mod conflicts;
mod doc_counts;
pub mod feed;
mod fields_text;
pub use fields_text::{FieldsText, NotFields};

use feed::{FeedChange, Origin};
pub mod health;
pub(crate) mod history;
pub mod implied;
mod import;
mod index;
pub mod keys;
pub mod kv;
pub mod packed;
pub mod paired;
pub mod partial;
pub mod pending_buckets;
pub mod query;
mod set_aside;
pub mod snapshot;
pub mod sync;
mod views;

pub use sync::{BatchLimits, LastKnownSync, RefusedEntry, RetryPolicy, UploadBatch};

use crate::clock::Clock;
use crate::crypt::Keyring;
use crate::record::first_change::{self, EncodedChange};
use crate::record::{
    Fields, HistoryEntry, Record, RecordError, Removal, change_header, validate_fields,
    validate_shape,
};
use crate::resolve::{self, Policies};
use automerge::{ActorId, ChangeHash};
use ferry_proto::{
    AddressError, IdGenerator, Limits, Operation, QueueStatus, SyncLogEntry, SyncQueueEntry,
    TransitionError, validate_collection, validate_record_id,
};
use kv::{Batch, Kv, KvError};
use lru::LruCache;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The store format this build writes. Format 2 added what format 1 builds cannot read: record
/// pairs holding a short form of their document (`paired`, `implied`) and the pending index in
/// buckets (`pending_buckets`). Format 3 added the queue's history (`history`), whose ids a
/// format 2 build would not see and so would give again. Format 4 keeps each collection's
/// document count (`doc_counts`), which a format 3 build would leave wrong. Format 5 keeps the
/// queue's counts by status (`keys::META_QUEUE_COUNTS`), which a format 4 build would leave
/// wrong.
const FORMAT_VERSION: &[u8] = b"5";

/// Formats this build opens; an older one is marked with `FORMAT_VERSION` before anything is
/// written, so that an older build refuses the store instead of reading new pairs as damage.
const READABLE_FORMATS: [&[u8]; 5] = [b"1", b"2", b"3", b"4", FORMAT_VERSION];

/// A queue entry's change longer than this is kept under its own key (`keys::queue_change`).
pub const INLINE_CHANGE_BYTES: usize = 2048;

/// Below this many new records a batch writes builds them in turn (where they are staged, or on
/// the thread preparing the batch) rather than on every core.
const MIN_PARALLEL: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Storage(#[from] KvError),
    #[error("{collection}/{id} not found")]
    NotFound { collection: String, id: String },
    #[error("{collection}/{id} already exists: import the document under a new id")]
    Exists { collection: String, id: String },
    #[error("the document cannot be imported: {0}")]
    ImportRefused(String),
    #[error("collection {0:?} is not declared in the config: add a [collections.{0}] section")]
    UnknownCollection(String),
    #[error(
        "collection {0:?} is not synced on this device (sync.collections): add it there to sync \
         and write it here, or write it on a device that syncs it"
    )]
    NotSynced(String),
    #[error(transparent)]
    Query(#[from] crate::query::QueryError),
    #[error(
        "this data directory belongs to device {stored}, but the identity key is device {given}: use the data directory's own key"
    )]
    WrongDevice { stored: String, given: String },
    #[error(
        "the data directory has store format {0:?}, which this version of ferry cannot read \
         (it reads formats 1 to {newest}): it was written by a newer ferry; run that version or a \
         newer one",
        newest = String::from_utf8_lossy(FORMAT_VERSION)
    )]
    UnsupportedFormat(String),
    #[error("queue entry {0} not found")]
    QueueEntryNotFound(u64),
    #[error(
        "the relay left log entry {seq} out as this device's own upload (queue entry {entry}), \
         which the queue no longer holds: the session ends, and the next one downloads the \
         entry whole"
    )]
    OwnEntryGone { seq: u64, entry: u64 },
    #[error("conflict {0} not found: `ferry conflicts` lists the open ones")]
    ConflictNotFound(String),
    #[error("conflict {id} is already {status}: there is nothing left to resolve")]
    ConflictSettled { id: String, status: &'static str },
    #[error(
        "resolving conflict {0} with `merge` needs the resolved fields: pass them as data (--data JSON)"
    )]
    MergeNeedsData(String),
    #[error(
        "writing {address} makes a change of {len} bytes, over the {max} bytes one sync frame \
         carries (sync.max_frame_bytes): it could never reach other devices, so nothing was \
         written; write the record in smaller parts, or raise sync.max_frame_bytes on every \
         device and relay.max_frame_bytes on the relay"
    )]
    ChangeTooLarge {
        address: String,
        len: usize,
        max: usize,
    },
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(
        "{work} failed unexpectedly ({message}): nothing of it was written; the daemon goes on, please report this as a bug"
    )]
    Panicked { work: &'static str, message: String },
    #[error(
        "the relay's snapshot page holds {0}: nothing of the page was kept; sync again, and \
         report it if it happens again"
    )]
    Snapshot(String),
    #[error("stored {what} cannot be decoded ({detail}): the store is damaged")]
    Decode { what: &'static str, detail: String },
    #[error(
        "{what} cannot be encoded ({detail}): nothing was written; please report this as a bug"
    )]
    Encode { what: &'static str, detail: String },
    #[error(transparent)]
    Field(#[from] crate::crypt::FieldError),
    #[error(
        "version {version} is not one of {collection}/{id}'s changes: read the record again and \
         use the version it has now"
    )]
    UnknownVersion {
        collection: String,
        id: String,
        version: String,
    },
}

/// Per-store settings, from the config.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub limits: Limits,
    /// How many documents stay loaded in memory.
    pub cache_docs: usize,
    /// Upload priority per collection; collections not named get 0.
    pub priorities: BTreeMap<String, i32>,
    /// When set, only these collections may be written.
    pub declared_collections: Option<BTreeSet<String>>,
    /// When set, only these collections are synced (`sync.collections`), and only they may be
    /// written: a write elsewhere would never be brought up to date.
    pub synced_collections: Option<BTreeSet<String>>,
    /// How each collection settles conflicts.
    pub policies: Policies,
    /// Each collection's secondary indexes, each a list of top-level fields (`index`).
    pub indexes: BTreeMap<String, Vec<Vec<String>>>,
    /// The account key encrypted fields are sealed and opened with; shared with whoever sets it.
    pub keyring: Arc<crate::crypt::Keyring>,
    /// The largest change a local write may make: one a sync frame can carry. A larger change
    /// could never reach the relay, so the write is refused instead of being queued for ever.
    pub max_change_bytes: usize,
}

impl StoreOptions {
    /// Whether this device syncs `collection` (`synced_collections`; all when unset).
    pub fn syncs(&self, collection: &str) -> bool {
        self.synced_collections
            .as_ref()
            .is_none_or(|synced| synced.contains(collection))
    }

    /// Checks a write before it touches any document: its address, that its collection may be
    /// written, and its fields' names, depth and size. Needs nothing but the options, so a client
    /// with the same config (`ferry import`) finds the records at fault before it sends any.
    /// `id: None` stands for an id still to be generated, which is always valid.
    pub fn check_write(
        &self,
        collection: &str,
        id: Option<&str>,
        fields: Option<&Fields>,
    ) -> Result<(), StoreError> {
        validate_collection(collection, &self.limits)?;
        if let Some(id) = id {
            validate_record_id(id, &self.limits)?;
        }
        if let Some(declared) = &self.declared_collections
            && !declared.contains(collection)
        {
            return Err(StoreError::UnknownCollection(collection.to_owned()));
        }
        if !self.syncs(collection) {
            return Err(StoreError::NotSynced(collection.to_owned()));
        }
        if let Some(fields) = fields {
            validate_fields(fields, &self.limits)?;
        }
        Ok(())
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            limits: Limits::default(),
            cache_docs: 1024,
            priorities: BTreeMap::new(),
            declared_collections: None,
            synced_collections: None,
            policies: Policies::default(),
            indexes: BTreeMap::new(),
            keyring: Arc::default(),
            max_change_bytes: ferry_proto::wire::max_change_bytes(
                ferry_proto::session::SessionConfig::default().max_frame_bytes as usize,
            ),
        }
    }
}

/// A local write, as an app asks for it.
#[derive(Debug, Clone)]
pub enum Write {
    /// Create or replace. With no id, a time-ordered id is generated.
    Put {
        collection: String,
        id: Option<String>,
        fields: Fields,
    },
    Patch {
        collection: String,
        id: String,
        set: Fields,
        unset: Vec<String>,
    },
    Delete {
        collection: String,
        id: String,
    },
}

/// What a write did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Applied {
    pub collection: String,
    pub id: String,
    /// `None` when the record already held exactly this content.
    pub operation: Option<Operation>,
    /// The record's heads afterwards, hex.
    pub heads: Vec<String>,
    /// The SyncQueue entry holding the change.
    pub queue_id: Option<u64>,
    /// Its number in the change feed; `None` when nothing changed.
    #[serde(default)]
    pub seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordView {
    pub collection: String,
    pub id: String,
    /// As the record's view keeps them: `parse` or `pick` for values.
    pub fields: FieldsText,
    pub heads: Vec<String>,
    /// Open conflicts that flag the record (its fields are then a provisional value).
    pub conflicts: Vec<String>,
}

/// The space measure kept in the store (`keys::META_SPACE`); none when absent or unreadable.
fn kept_space(kv: &dyn Kv) -> Option<SpaceUse> {
    let stored = kv.get(keys::META_SPACE).ok().flatten()?;
    let [store_bytes, live_bytes, measured_at_ms] = u64s_from_stored(&stored)?;
    Some(SpaceUse {
        store_bytes,
        live_bytes,
        measured_at_ms,
    })
}

/// What the store takes on disk against the data it holds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct SpaceUse {
    /// The engine's files.
    pub store_bytes: u64,
    /// Every key and value held: what a fresh copy of the store would hold.
    pub live_bytes: u64,
    /// When both were measured (Unix ms).
    pub measured_at_ms: u64,
}

impl SpaceUse {
    /// Whether the store takes more than `SPACE_FACTOR` times its live data plus
    /// `SPACE_FLOOR_BYTES`.
    pub fn over_bound(&self) -> bool {
        self.store_bytes > space_bound(self.live_bytes)
    }
}

/// How many times its live data the store may take on disk before it is compacted. Right after a
/// compaction sled takes 1.7 to 2.2 times the live data from 10 MiB on, less the larger the
/// store (`benches/store_space.rs`). Its tree nodes hold the live data at 1.01x; the rest is old
/// versions in its log: even a fresh copy writes 3 to 6 times the data there (each insert logged
/// as a fragment of its node, the node rewritten whole every 10 fragments and at each split), and
/// sled 0.34 reclaims a log segment only once at most half of it is live (a fixed threshold; its
/// `segment_cleanup_threshold` setting does nothing). That is why `store::kv` flushes the copy
/// every 256 KiB: sled then reuses the segments the copy has superseded instead of growing its
/// file (unflushed, the copy took 1.9 to 2.7 times the live data, and 2 was out of reach).
pub const SPACE_FACTOR: u64 = 2;

/// What a store may take beyond `SPACE_FACTOR` times its live data before it is compacted: the
/// engine's own files and the log segments it keeps in use whatever the data, which a tiny store
/// needs too (a store of 1 MiB takes 3 to 4.5 MiB right after a compaction), and the rest of a
/// store of about 10 MiB (2.2x right after a compaction).
pub const SPACE_FLOOR_BYTES: u64 = 8 << 20;

/// What a first copy of a store of `ASSUME_COPY_FROM_LIVE_BYTES` or more live bytes is expected
/// to take per live byte beyond the floor, in thousandths: the least measured (a 1,000,000-record
/// device store after its upload, 1.73; the same store right after its import took 2.25, a
/// relay's 2.9; `store_space`'s 1.7 to 2.2 from 10 MiB on). Copies that fall short of it are
/// made; only ones that even this would not make a fifth smaller are left out.
const ASSUMED_COPY_PER_MILLE: u64 = 1700;

/// From how much live data a store's first copy is judged by `ASSUMED_COPY_PER_MILLE`: below,
/// a copy takes under a second or two, and is simply tried.
const ASSUME_COPY_FROM_LIVE_BYTES: u64 = 64 << 20;

/// Live bytes are measured again (a full scan) at least this often when the space is checked.
const MEASURE_SPACE_EVERY_MS: u64 = 10 * 60 * 1000;

fn space_bound(live_bytes: u64) -> u64 {
    live_bytes
        .saturating_mul(SPACE_FACTOR)
        .saturating_add(SPACE_FLOOR_BYTES)
}

/// A compaction `Store::bound_space` made.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Compacted {
    pub before: SpaceUse,
    pub after: SpaceUse,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueCounts {
    pub pending: u64,
    pub processing: u64,
    pub completed: u64,
    pub failed: u64,
}

/// The queue's counts as `Store::queue_counts` gives them, and how many of the entries they count
/// processing are in an upload: those are stored pending, and the counts stored
/// (`keys::META_QUEUE_COUNTS`) count them there.
#[derive(Debug, Clone, Copy, Default)]
struct QueueTally {
    shown: QueueCounts,
    in_flight: u64,
}

impl QueueTally {
    /// The counts a read of the stored queue gives.
    fn stored(&self) -> QueueCounts {
        QueueCounts {
            pending: self.shown.pending.saturating_add(self.in_flight),
            processing: self.shown.processing.saturating_sub(self.in_flight),
            ..self.shown
        }
    }
}

impl QueueCounts {
    /// Counts one more entry of `status`.
    pub fn count(&mut self, status: QueueStatus) {
        *match status {
            QueueStatus::Pending => &mut self.pending,
            QueueStatus::Processing => &mut self.processing,
            QueueStatus::Completed => &mut self.completed,
            QueueStatus::Failed => &mut self.failed,
        } += 1;
    }

    /// Entries not completed: the changes the journal keeps a copy of.
    pub fn not_completed(&self) -> u64 {
        self.pending + self.processing + self.failed
    }

    fn to_stored(self) -> Vec<u8> {
        u64s_to_stored(&[self.pending, self.processing, self.completed, self.failed])
    }

    /// `None` unless `bytes` are what `to_stored` writes.
    fn from_stored(bytes: &[u8]) -> Option<Self> {
        let [pending, processing, completed, failed] = u64s_from_stored(bytes)?;
        Some(QueueCounts {
            pending,
            processing,
            completed,
            failed,
        })
    }
}

/// `numbers` as stored: big-endian, one after another.
fn u64s_to_stored(numbers: &[u64]) -> Vec<u8> {
    numbers.iter().flat_map(|n| n.to_be_bytes()).collect()
}

/// The `N` numbers `u64s_to_stored` wrote; `None` unless `bytes` are exactly that.
fn u64s_from_stored<const N: usize>(bytes: &[u8]) -> Option<[u64; N]> {
    let (numbers, rest) = bytes.as_chunks::<8>();
    let numbers: &[[u8; 8]; N] = numbers.try_into().ok()?;
    rest.is_empty().then(|| numbers.map(u64::from_be_bytes))
}

/// The queue's counts as the last batch that moved its entries stored them, if they are there
/// and read (anything else is counted again when asked).
fn stored_queue_counts(kv: &dyn Kv) -> Option<QueueCounts> {
    let bytes = kv.get(keys::META_QUEUE_COUNTS).ok()??;
    QueueCounts::from_stored(&bytes)
}

/// A state change asked of queue entries.
#[derive(Debug, Clone)]
pub enum QueueAction {
    Start,
    Complete,
    Fail { error: String, max_retries: u32 },
    Retry,
    RequeueInterrupted,
}

type CacheKey = (String, String);

pub struct Store {
    kv: Box<dyn Kv>,
    actor: ActorId,
    device_id: String,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    cache: Mutex<LruCache<CacheKey, Record>>,
    ids: Mutex<IdGenerator>,
    next_queue_id: AtomicU64,
    next_log_id: AtomicU64,
    next_feed_seq: AtomicU64,
    /// The last feed number whose batch landed, and the last one a flush made durable since.
    feed_landed: AtomicU64,
    feed_durable: AtomicU64,
    /// Held by every read-then-write of existing queue entries, so two uploaders or an uploader
    /// and a retry never move the same entry from the same old state twice.
    /// Taken by every batch that moves queue entries, so that moves happen in order. It holds
    /// the queue's counts by status, as stored when the store opened or once `queue_counts` has
    /// scanned them (then each such batch keeps them up to date, in memory and stored), so that
    /// asking for them is not a scan of the whole queue.
    queue_lock: Mutex<Option<QueueTally>>,
    /// Entries held apart after failed uploads. Taken after `queue_lock` when both are held.
    upload_holds: Mutex<sync::UploadHolds>,
    /// Entries taken into an upload and not answered yet, as they are now (`Processing`),
    /// by id. Stored, they stay `Pending`: an upload cut off by a crash is uploaded again
    /// either way (the relay answers `Duplicate`), so a move to `Processing` and back would be
    /// two writes of every entry that say nothing the next start needs. Every read of the
    /// queue shows them as they are here. Taken after `queue_lock` and `upload_holds`.
    in_flight: Mutex<HashMap<u64, SyncQueueEntry>>,
    /// How many conflicts are open, kept with every batch that opens or closes one, so that
    /// reading a record (which names its open conflicts) reads nothing more when none is open.
    open_conflicts: AtomicU64,
    /// The last measure of the space used (live bytes take a full scan).
    space: Mutex<Option<SpaceUse>>,
    /// The measure kept in the store when it was opened (`keys::META_SPACE`): what an earlier
    /// process counted, shown with its time until this one counts.
    space_kept: Option<SpaceUse>,
    /// The size on disk right after the last compaction (0 before any).
    compacted_to: AtomicU64,
    /// How much the store must grow past `compacted_to` before it is compacted again.
    regrow_bytes: AtomicU64,
    /// What opens found wrong, until a repair (`health`).
    damage: Mutex<Option<health::Damage>>,
    /// Keys whose values failed their checksum when read.
    seen_damaged: Arc<Mutex<BTreeSet<Vec<u8>>>>,
    /// The journal's size past which it is rewritten.
    journal_limit: AtomicU64,
    /// The records the journal holds (a change journaled twice counts twice): beside the queue's
    /// counts, what a rewrite would leave out (`bound_journal`).
    journal_records: AtomicU64,
}

impl Store {
    /// Opens a store over `kv` for the device `device_id` (hex; its bytes are the Automerge
    /// actor). A new store is stamped with the device; an existing one must match it.
    pub fn open(
        kv: Box<dyn Kv>,
        device_id: &str,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let actor = ActorId::from(crate::hex::decode(device_id).unwrap_or_default().as_slice());
        match kv.get(keys::META_DEVICE)? {
            Some(stored) if stored != device_id.as_bytes() => {
                return Err(StoreError::WrongDevice {
                    stored: String::from_utf8_lossy(&stored).into_owned(),
                    given: device_id.to_owned(),
                });
            }
            Some(_) => {}
            None => {
                let mut batch = Batch::default();
                batch.put(keys::META_DEVICE.to_vec(), device_id.as_bytes().to_vec());
                batch.put(keys::META_FORMAT.to_vec(), FORMAT_VERSION.to_vec());
                batch.put(keys::META_PENDING_INDEX.to_vec(), Vec::new());
                batch.put(keys::META_QUEUE_CHANGES.to_vec(), Vec::new());
                batch.put(
                    keys::META_QUEUE_COUNTS.to_vec(),
                    QueueCounts::default().to_stored(),
                );
                batch.put(
                    keys::META_VIEWS.to_vec(),
                    Store::views_marker(&options.policies)?,
                );
                kv.apply(batch)?;
                kv.flush()?;
            }
        }
        match kv.get(keys::META_FORMAT)? {
            Some(v) if v == FORMAT_VERSION => {}
            Some(v) if READABLE_FORMATS.contains(&v.as_slice()) => {
                let mut batch = Batch::default();
                batch.put(keys::META_FORMAT.to_vec(), FORMAT_VERSION.to_vec());
                kv.apply(batch)?;
                kv.flush()?;
            }
            other => {
                let found = other.map(|v| String::from_utf8_lossy(&v).into_owned());
                return Err(StoreError::UnsupportedFormat(found.unwrap_or_default()));
            }
        }
        let paired: Box<dyn Kv> = Box::new(paired::Paired::open(kv, implied::expand)?);
        let counted: Box<dyn Kv> = Box::new(doc_counts::Counted::open(paired)?);
        let kv: Box<dyn Kv> = Box::new(pending_buckets::Buckets::open(counted)?);
        sync::ensure_pending_index(kv.as_ref())?;
        move_long_changes(kv.as_ref())?;
        let (found, journal) = health::check_at_open(kv.as_ref(), clock.now_ms())?;
        // An id the queue lost is still the journal's: it is never given to another change.
        let next_queue_id = next_queue_id(kv.as_ref())?.max(journal.next_id);
        let next_log_id = next_seq(kv.as_ref(), keys::LOG)?;
        let next_feed_seq = Self::next_feed_seq(kv.as_ref())?;
        let kv_journal_bytes = kv.journal_bytes();
        let space_kept = kept_space(kv.as_ref());
        let open_conflicts =
            kv.count(keys::CONFLICT_OPEN, &keys::prefix_end(keys::CONFLICT_OPEN))?;
        let capacity = NonZeroUsize::new(options.cache_docs.max(1)).unwrap_or(NonZeroUsize::MIN);
        // Nothing is in an upload yet.
        let queue_tally = stored_queue_counts(kv.as_ref()).map(|shown| QueueTally {
            shown,
            in_flight: 0,
        });
        let (kv, seen_damaged) = health::Watched::new(kv);
        let store = Store {
            kv: Box::new(kv),
            actor,
            device_id: device_id.to_owned(),
            options,
            clock,
            cache: Mutex::new(LruCache::new(capacity)),
            ids: Mutex::new(IdGenerator::new()),
            next_queue_id: AtomicU64::new(next_queue_id),
            next_log_id: AtomicU64::new(next_log_id),
            next_feed_seq: AtomicU64::new(next_feed_seq),
            // What an open finds is what was durable.
            feed_landed: AtomicU64::new(next_feed_seq.saturating_sub(1)),
            feed_durable: AtomicU64::new(next_feed_seq.saturating_sub(1)),
            queue_lock: Mutex::new(queue_tally),
            upload_holds: Mutex::new(sync::UploadHolds::default()),
            in_flight: Mutex::new(HashMap::new()),
            open_conflicts: AtomicU64::new(open_conflicts),
            space: Mutex::new(None),
            space_kept,
            compacted_to: AtomicU64::new(0),
            regrow_bytes: AtomicU64::new(SPACE_FLOOR_BYTES),
            damage: Mutex::new(None),
            seen_damaged,
            journal_limit: AtomicU64::new(health::journal_start_limit(kv_journal_bytes)),
            journal_records: AtomicU64::new(journal.records),
        };
        store.note_damage(found)?;
        store.note_synced_collections()?;
        store.rebuild_views()?;
        store.build_indexes()?;
        Ok(store)
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    fn lock_queue(&self) -> MutexGuard<'_, Option<QueueTally>> {
        self.queue_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_holds(&self) -> MutexGuard<'_, sync::UploadHolds> {
        self.upload_holds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_in_flight(&self) -> MutexGuard<'_, HashMap<u64, SyncQueueEntry>> {
        // Entries go in and out whole under the lock: a poisoned map holds nothing half-done.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries whose move out of flight has landed in storage.
    fn land(&self, ids: &[u64]) {
        let mut in_flight = self.lock_in_flight();
        for id in ids {
            in_flight.remove(id);
        }
    }

    /// The entry as it is now: the in-flight version of one taken into an upload.
    fn as_now(&self, entry: SyncQueueEntry) -> SyncQueueEntry {
        match self.lock_in_flight().get(&entry.id) {
            Some(flying) => SyncQueueEntry {
                data: entry.data,
                ..flying.clone()
            },
            None => entry,
        }
    }

    /// Applies a batch that moves queue entries, and `delta` (its moves) to the counts, under the
    /// queue lock the caller holds.
    fn apply_queue_batch(
        &self,
        tally: &mut Option<QueueTally>,
        mut batch: Batch,
        delta: CountDelta,
    ) -> Result<(), StoreError> {
        self.settle_views(&mut batch)?;
        let moved = tally.map(|mut moved| {
            delta.apply_to(&mut moved);
            moved
        });
        match moved {
            Some(moved) if delta.moves_stored() => {
                batch.put(keys::META_QUEUE_COUNTS.to_vec(), moved.stored().to_stored());
            }
            Some(_) => {}
            // Counts not known here would be left behind by this batch's moves.
            None if !batch.is_empty() => batch.remove(keys::META_QUEUE_COUNTS.to_vec()),
            None => {}
        }
        if !batch.is_empty() {
            self.kv.apply(batch)?;
        }
        *tally = moved;
        Ok(())
    }

    fn lock_cache(&self) -> MutexGuard<'_, LruCache<CacheKey, Record>> {
        // Every mutation of a cached document is followed by a write or an eviction before the
        // lock is released, so a poisoned cache holds nothing half-done worth refusing.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one write atomically with its queue entry. Visible at once, durable after `flush`.
    pub fn write(&self, write: Write) -> Result<Applied, StoreError> {
        let mut results = self.write_all(vec![write])?;
        Ok(results.remove(0))
    }

    /// Applies many writes as one atomic batch: every one of them lands, or none. If any write is
    /// invalid, nothing is written and the error names it.
    ///
    /// Records that do not exist yet (the bulk-import case) are built on all cores; everything
    /// else runs in order under the cache lock.
    pub fn write_all(&self, writes: Vec<Write>) -> Result<Vec<Applied>, StoreError> {
        self.write_all_at(writes.into_iter().map(|w| (w, None)).collect())
    }

    /// `write_all`, where a write may name the version (the heads) of its record it was made
    /// on: it is then built on the record as it was at that version, so it meets every change
    /// made since as a concurrent one, through the same detection as a device's offline edit.
    /// (The record's own actor's latest change is kept under it too: an actor's changes must
    /// follow one another.)
    pub fn write_all_at(
        &self,
        writes: Vec<(Write, Option<Vec<ChangeHash>>)>,
    ) -> Result<Vec<Applied>, StoreError> {
        let now = self.clock.now_ms();
        let (resolved, invalid) = self.resolve_all(writes, now);
        self.commit_writes(resolved, invalid, None, now)
    }

    /// Makes writes ready for `write_prepared` without taking the store's locks: each gets its
    /// address (generating ids) and is checked, and the documents of the records they create
    /// are built on every core. A committer prepares its next batch this way while the one
    /// before is applied.
    pub fn prepare_writes(&self, writes: Vec<Write>) -> PreparedWrites {
        let now = self.clock.now_ms();
        let (resolved, invalid) =
            self.resolve_all(writes.into_iter().map(|w| (w, None)).collect(), now);
        // What cannot be built here is built again where it is staged, which reports it in order.
        let fresh = self
            .fresh_candidates(&resolved, 1, |_| false)
            .and_then(|candidates| self.build_fresh(&candidates, now))
            .unwrap_or_default();
        PreparedWrites {
            resolved,
            invalid,
            fresh,
            now,
        }
    }

    /// `write_all` of prepared writes: the same atomic batch, with the same errors. A record
    /// prepared as new that a batch applied meanwhile created is written on what it holds.
    pub fn write_prepared(&self, prepared: PreparedWrites) -> Result<Vec<Applied>, StoreError> {
        let PreparedWrites {
            resolved,
            invalid,
            fresh,
            now,
        } = prepared;
        self.commit_writes(resolved, invalid, Some(fresh), now)
    }

    /// Stages and applies resolved writes as one batch; `fresh`, the records built as new
    /// outside the cache lock (checked again under it), or `None` to build them here.
    fn commit_writes(
        &self,
        resolved: Vec<Resolved>,
        invalid: Option<StoreError>,
        fresh: Option<HashMap<usize, Staged>>,
        now: u64,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut cache = self.lock_cache();
        let fresh = match fresh {
            Some(mut fresh) => {
                let mut stale = Vec::new();
                for &index in fresh.keys() {
                    let Some(r) = resolved.get(index) else {
                        stale.push(index);
                        continue;
                    };
                    if cache.contains(&r.key)
                        || self.kv.get(&keys::doc(&r.key.0, &r.key.1))?.is_some()
                    {
                        stale.push(index);
                    }
                }
                for index in stale {
                    fresh.remove(&index);
                }
                fresh
            }
            None => {
                let candidates = self.fresh_candidates(&resolved, 1, |key| cache.contains(key))?;
                self.build_fresh(&candidates, now)?
            }
        };
        let mut working = WorkingSet::default();
        let (batch, delta, applied) =
            self.stage_all(&mut cache, &mut working, resolved, fresh, now)?;
        // Errors are reported in batch order: an invalid write counts only if every write
        // before it could be staged.
        if let Some(e) = invalid {
            return Err(e);
        }
        let mut queue = self.lock_queue();
        self.apply_queue_batch(&mut queue, batch, delta)?;
        drop(queue);
        self.feed_landed(applied.iter().filter_map(|a| a.seq));
        // Only now that the batch has landed may its documents serve later writes. On any error
        // above they are dropped with the working set instead, so the next write starts from what
        // is stored.
        for (key, record) in working.into_cacheable() {
            cache.put(key, record);
        }
        Ok(applied)
    }

    /// Gives every write its address (generating ids) and checks addresses and fields, up to the
    /// first invalid write, which is returned beside the writes before it.
    fn resolve_all(
        &self,
        writes: Vec<(Write, Option<Vec<ChangeHash>>)>,
        now: u64,
    ) -> (Vec<Resolved>, Option<StoreError>) {
        let mut resolved = Vec::with_capacity(writes.len());
        for (write, base) in writes {
            match self.resolve(write, now) {
                Ok(r) => resolved.push(Resolved { base, ..r }),
                Err(e) => return (resolved, Some(e)),
            }
        }
        (resolved, None)
    }

    fn resolve(&self, write: Write, now: u64) -> Result<Resolved, StoreError> {
        let (key, change) = split_write(write, || self.new_id(now));
        self.options
            .check_write(&key.0, Some(&key.1), change.fields())?;
        Ok(Resolved {
            key,
            change,
            base: None,
        })
    }

    fn stage_all(
        &self,
        cache: &mut LruCache<CacheKey, Record>,
        working: &mut WorkingSet,
        resolved: Vec<Resolved>,
        mut fresh: HashMap<usize, Staged>,
        now: u64,
    ) -> Result<(Batch, CountDelta, Vec<Applied>), StoreError> {
        for r in &resolved {
            *working.uses.entry(r.key.clone()).or_insert(0) += 1;
        }
        let mut batch = Batch::default();
        let mut delta = CountDelta::default();
        let mut applied = Vec::with_capacity(resolved.len());
        let mut unlogged = HashMap::new();
        for (index, Resolved { key, change, base }) in resolved.into_iter().enumerate() {
            let staged = match fresh.remove(&index) {
                Some(staged) => staged,
                None => {
                    let record = working.take(&key, cache, || self.load_or_new(&key))?;
                    let policy = self.options.policies.of(&key.0);
                    let limits = &self.options.limits;
                    let keyring = &self.options.keyring;
                    let staged = match base {
                        Some(base) => {
                            mutate_at(record, &key, change, &base, now, limits, policy, keyring)?
                        }
                        None => mutate(record, &key, change, now, limits, policy, keyring)?,
                    };
                    working.used(&key);
                    staged
                }
            };
            if let Some((_, change, _)) = &staged.written
                && change.len() > self.options.max_change_bytes
            {
                return Err(StoreError::ChangeTooLarge {
                    address: format!("{}/{}", key.0, key.1),
                    len: change.len(),
                    max: self.options.max_change_bytes,
                });
            }
            self.stage_unlogged(&mut unlogged, &mut batch, &key, &staged)?;
            applied.push(self.finish(key, staged, now, &mut batch, &mut delta)?);
        }
        Ok((batch, delta, applied))
    }

    /// The puts that create records absent from storage and from the cache (`in_cache`), each
    /// named once in the batch: those `build_fresh` may build apart. None below `at_least`.
    fn fresh_candidates<'r>(
        &self,
        resolved: &'r [Resolved],
        at_least: usize,
        in_cache: impl Fn(&CacheKey) -> bool,
    ) -> Result<Vec<(usize, &'r Resolved)>, StoreError> {
        if resolved.len() < at_least.max(1) {
            return Ok(Vec::new());
        }
        let mut uses: HashMap<&CacheKey, u32> = HashMap::with_capacity(resolved.len());
        for r in resolved {
            *uses.entry(&r.key).or_insert(0) += 1;
        }
        let mut candidates = Vec::new();
        for (index, r) in resolved.iter().enumerate() {
            if matches!(r.change, Change::Put(_))
                && r.base.is_none()
                && uses.get(&r.key) == Some(&1)
                && !in_cache(&r.key)
                && self.kv.get(&keys::doc(&r.key.0, &r.key.1))?.is_none()
            {
                candidates.push((index, r));
            }
        }
        if candidates.len() < at_least {
            candidates.clear();
        }
        Ok(candidates)
    }

    /// Builds the documents of `fresh_candidates`, on every core when there are a few. Returns
    /// them by their index in the batch.
    fn build_fresh(
        &self,
        candidates: &[(usize, &Resolved)],
        now: u64,
    ) -> Result<HashMap<usize, Staged>, StoreError> {
        if candidates.is_empty() {
            return Ok(HashMap::new());
        }
        let chunk = candidates
            .len()
            .div_ceil(rayon::current_num_threads())
            .max(1);
        let limits = &self.options.limits;
        let build = |indices: &[(usize, &Resolved)]| -> Result<Vec<(usize, Staged)>, StoreError> {
            indices
                .iter()
                .map(|&(i, r)| Ok((i, self.build_new(r, now, limits)?)))
                .collect()
        };
        // On the pool's threads, started once: a thread started for each batch cost as much as
        // building several records. A panic fails the batch, not the caller's thread.
        let built: Vec<Result<Vec<(usize, Staged)>, StoreError>> =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if candidates.len() < MIN_PARALLEL {
                    vec![build(candidates)]
                } else {
                    candidates.par_chunks(chunk).map(build).collect()
                }
            }))
            .unwrap_or_else(|_| {
                vec![Err(StoreError::Decode {
                    what: "record",
                    detail: "building a document panicked".into(),
                })]
            });
        let mut out = HashMap::with_capacity(candidates.len());
        for part in built {
            out.extend(part?);
        }
        Ok(out)
    }

    /// A put creating a record, staged: its first change encoded directly when its fields are
    /// plain scalars (`record::first_change`: the same bytes, without an Automerge document),
    /// else written by Automerge.
    fn build_new(&self, r: &Resolved, now: u64, limits: &Limits) -> Result<Staged, StoreError> {
        let policy = self.policy(&r.key.0);
        let time_ms = crate::record::change_time(now);
        if let Change::Put(fields) = &r.change
            && policy.encrypted.is_empty()
            && let Some(first) = first_change::encode(
                &self.actor,
                time_ms,
                Operation::Create.as_str(),
                fields,
                &policy.text,
            )
        {
            return Staged::of_first_change(first, (&self.actor, time_ms), fields, policy);
        }
        let mut record = self.new_record(&r.key.0);
        let keyring = &self.options.keyring;
        mutate(
            &mut record,
            &r.key,
            r.change.clone(),
            now,
            limits,
            policy,
            keyring,
        )
    }

    /// Adds a staged write's document and queue entry to the batch.
    fn finish(
        &self,
        key: CacheKey,
        staged: Staged,
        now: u64,
        batch: &mut Batch,
        delta: &mut CountDelta,
    ) -> Result<Applied, StoreError> {
        let (collection, id) = key;
        let Some((operation, change, doc)) = staged.written else {
            return Ok(Applied {
                collection,
                id,
                operation: None,
                heads: staged.heads,
                queue_id: None,
                seq: None,
            });
        };
        match staged.view {
            Some(view) => {
                let (doc_key, view_key) =
                    (keys::doc(&collection, &id), keys::view(&collection, &id));
                batch.put_record(doc_key, doc, view_key, view, staged.short);
            }
            None => batch.put(keys::doc(&collection, &id), doc),
        }
        let queue_id =
            self.stage_local_change(&collection, &id, operation, change, now, batch, delta)?;
        let seq = self.stage_feed(
            batch,
            FeedChange {
                seq: 0,
                collection: collection.clone(),
                id: id.clone(),
                operation,
                heads: staged.heads.clone(),
                device: self.device_id.clone(),
                origin: Origin::Local,
            },
        )?;
        Ok(Applied {
            collection,
            id,
            operation: Some(operation),
            heads: staged.heads,
            queue_id: Some(queue_id),
            seq: Some(seq),
        })
    }

    fn new_id(&self, now: u64) -> String {
        let mut random = [0u8; 10];
        // Without OS randomness the id is still unique on this device: the generator increments.
        let _ = getrandom::fill(&mut random);
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next(now, random)
    }

    fn priority(&self, collection: &str) -> i32 {
        self.options
            .priorities
            .get(collection)
            .copied()
            .unwrap_or(0)
    }

    fn load_or_new(&self, key: &CacheKey) -> Result<Record, StoreError> {
        match self.load(&key.0, &key.1)? {
            Some(record) => Ok(record),
            None => Ok(self.new_record(&key.0)),
        }
    }

    /// Queues a local change of a record for upload, in `batch`: its queue entry, and its copy
    /// in the journal. Returns the entry's id.
    #[allow(clippy::too_many_arguments)]
    fn stage_local_change(
        &self,
        collection: &str,
        id: &str,
        operation: Operation,
        change: Vec<u8>,
        now: u64,
        batch: &mut Batch,
        delta: &mut CountDelta,
    ) -> Result<u64, StoreError> {
        let queue_id = self.next_queue_id.fetch_add(1, Ordering::SeqCst);
        let entry = SyncQueueEntry {
            id: queue_id,
            operation,
            model_name: collection.to_owned(),
            object_id: id.to_owned(),
            data: change,
            status: QueueStatus::Pending,
            retry_count: 0,
            last_error: None,
            created_at: now,
            updated_at: now,
            priority: self.priority(collection),
        };
        stage_entry(batch, delta, None, &entry)?;
        // Kept outside the data too until it is uploaded: what a damaged data file loses is
        // restored from there (`health`).
        batch.journal(encode(&entry, "journaled change")?);
        // Counted when staged: a batch that then fails only makes the next rewrite come sooner.
        self.journal_records.fetch_add(1, Ordering::SeqCst);
        Ok(queue_id)
    }

    fn new_record(&self, collection: &str) -> Record {
        Record::new(&self.actor).with_text_fields(self.policy(collection).text.clone())
    }

    fn load(&self, collection: &str, id: &str) -> Result<Option<Record>, StoreError> {
        match self.kv.get(&keys::doc(collection, id))? {
            Some(bytes) => Ok(Some(self.parse(collection, &bytes)?)),
            None => Ok(None),
        }
    }

    fn parse(&self, collection: &str, bytes: &[u8]) -> Result<Record, StoreError> {
        let record = Record::load(bytes, &self.actor)?;
        Ok(record.with_text_fields(self.policy(collection).text.clone()))
    }

    fn policy(&self, collection: &str) -> &resolve::Policy {
        self.options.policies.of(collection)
    }

    /// Runs `f` on the record without disturbing the cache's contents on a miss, so that scans
    /// do not evict the documents being written.
    fn with_record<T>(
        &self,
        collection: &str,
        id: &str,
        f: impl FnOnce(&mut Record) -> T,
    ) -> Result<Option<T>, StoreError> {
        let mut cache = self.lock_cache();
        let key = (collection.to_owned(), id.to_owned());
        if let Some(record) = cache.get_mut(&key) {
            return Ok(Some(f(record)));
        }
        Ok(self.load(collection, id)?.map(|mut r| f(&mut r)))
    }

    /// Makes every write so far durable. When that fails for lack of space, the store goes
    /// back to what was durable (see `reopen_storage`) and refuses writes until `resume_writes`.
    pub fn flush(&self) -> Result<(), StoreError> {
        // What had landed before the flush began is durable once it succeeds.
        let landed = self.feed_landed.load(Ordering::SeqCst);
        let flushed = self.kv.flush();
        if flushed.is_ok() {
            self.feed_durable.fetch_max(landed, Ordering::SeqCst);
        }
        if let Err(KvError::DiskFull(_)) = &flushed
            && let Err(e) = self.reopen_storage()
        {
            tracing::warn!(error = %e, "the store could not go back to what is durable yet");
        }
        Ok(flushed?)
    }

    /// The account key this store seals and opens encrypted fields with.
    pub fn keyring(&self) -> &Keyring {
        &self.options.keyring
    }

    /// A live record.
    pub fn get(&self, collection: &str, id: &str) -> Result<RecordView, StoreError> {
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        let mut found = self
            .view_of(collection, id)?
            .ok_or_else(|| not_found(&(collection.to_owned(), id.to_owned())))?;
        found.conflicts = self.record_conflicts(collection, id)?;
        Ok(found)
    }

    /// Whether the record exists and is not deleted, as its collection's strategy shows it. Reads
    /// no field values, so it needs no account key.
    pub fn is_live(&self, collection: &str, id: &str) -> Result<bool, StoreError> {
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        self.view_is_live(collection, id)
    }

    /// Live records of a collection in id order, starting after `after`. The second value is the
    /// `after` of the next page, or `None` when this page is the last.
    pub fn list(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<RecordView>, Option<String>), StoreError> {
        validate_collection(collection, &self.options.limits)?;
        // One record past the page tells whether there is a next page.
        let mut out = self.list_views(collection, after, limit.saturating_add(1))?;
        let next = if out.len() > limit {
            out.truncate(limit);
            out.last().map(|v| v.id.clone())
        } else {
            None
        };
        Ok((out, next))
    }

    /// Collection names that hold at least one document (live or deleted), with their document
    /// counts, in name order: the counts kept with the writes (`doc_counts`), not a walk.
    pub fn collections(&self) -> Result<Vec<(String, u64)>, StoreError> {
        doc_counts::read(self.kv.as_ref())
    }

    /// Every change of a record, deleted or not.
    pub fn history(&self, collection: &str, id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        Ok(self
            .with_record(collection, id, |r| r.history())?
            .ok_or_else(|| not_found(&(collection.to_owned(), id.to_owned())))??)
    }

    /// The record's Automerge document, as any Automerge implementation can load it.
    pub fn export_doc(&self, collection: &str, id: &str) -> Result<Vec<u8>, StoreError> {
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        self.with_record(collection, id, |r| r.save())?
            .ok_or_else(|| not_found(&(collection.to_owned(), id.to_owned())))
    }

    /// Queue entries in id order, optionally of one status, starting after `after`, with their
    /// changes; a completed entry with what it keeps of its change (`completed::Held`).
    pub fn queue(
        &self,
        status: Option<QueueStatus>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<SyncQueueEntry>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.scan_queue_of(status, after, |entry| {
            if status.is_none_or(|s| s == entry.status) {
                out.push(entry);
            }
            out.len() < limit
        })?;
        out.into_iter()
            .map(|e| match completed::Held::of(&e.data) {
                completed::Held::Completed { .. } => Ok(e),
                _ => self.with_change(e),
            })
            .collect()
    }

    /// The entry with its change, when that is kept under its own key.
    pub(crate) fn with_change(
        &self,
        mut entry: SyncQueueEntry,
    ) -> Result<SyncQueueEntry, StoreError> {
        if let completed::Held::Completed { hash, .. } = completed::Held::of(&entry.data) {
            entry.data = self
                .change_in_document(&entry.model_name, &entry.object_id, &hash)?
                .ok_or_else(|| StoreError::Decode {
                    what: "queue entry",
                    detail: format!(
                        "entry {} is completed and its record's document no longer holds its \
                         change",
                        entry.id
                    ),
                })?;
        } else if entry.data.is_empty() {
            entry.data =
                self.kv
                    .get(&keys::queue_change(entry.id))?
                    .ok_or_else(|| StoreError::Decode {
                        what: "queue entry",
                        detail: format!("entry {} has no change", entry.id),
                    })?;
        }
        Ok(entry)
    }

    /// The change `hash` as the record's document holds it; `None` when it holds no such change
    /// (or there is no document).
    pub(crate) fn change_in_document(
        &self,
        collection: &str,
        id: &str,
        hash: &ChangeHash,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(document) = self.kv.get(&keys::doc(collection, id))? else {
            return Ok(None);
        };
        // A record made by one change: that change is its document.
        if let Ok(header) = change_header(&document) {
            return Ok((header.hash == *hash).then_some(document));
        }
        use automerge::ReadDoc as _;
        let mut record = self.parse(collection, &document)?;
        Ok(record
            .automerge()
            .get_change_by_hash(hash)
            .map(|change| change.raw_bytes().to_vec()))
    }

    /// Queue entries newest first, optionally of one status, older than `before`.
    pub fn queue_newest(
        &self,
        status: Option<QueueStatus>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<SyncQueueEntry>, StoreError> {
        let mut out = Vec::new();
        let end = before.map_or_else(|| keys::prefix_end(keys::QUEUE), keys::queue);
        self.scan_back(keys::QUEUE, end, limit, |bytes| {
            let entry = self.as_now(decode(bytes, "queue entry")?);
            if status.is_none_or(|s| s == entry.status) {
                out.push(entry);
            }
            Ok(out.len())
        })?;
        if !history::may_hold(status) {
            return Ok(out);
        }
        // The newest `limit` of each side hold the newest `limit` of both.
        let older = history::newest(self.kv.as_ref(), before, limit, |entry| {
            status.is_none_or(|s| s == entry.status)
        })?;
        out.extend(older);
        out.sort_unstable_by_key(|entry| std::cmp::Reverse(entry.id));
        out.truncate(limit);
        Ok(out)
    }

    /// Calls `visit` on the values under `prefix` with keys below `end`, greatest key first,
    /// until it says it holds `limit` of them.
    fn scan_back(
        &self,
        prefix: &[u8],
        mut end: Vec<u8>,
        limit: usize,
        mut visit: impl FnMut(&[u8]) -> Result<usize, StoreError>,
    ) -> Result<(), StoreError> {
        let mut held = 0;
        while held < limit {
            let Some(key) = self.kv.last_key(prefix, &end)? else {
                break;
            };
            if let Some(bytes) = self.kv.get(&key)? {
                held = visit(&bytes)?;
            }
            end = key;
        }
        Ok(())
    }

    /// The ids of every entry in `status`.
    pub fn queue_ids(&self, status: QueueStatus) -> Result<Vec<u64>, StoreError> {
        let mut ids = Vec::new();
        self.scan_queue_of(Some(status), None, |entry| {
            if entry.status == status {
                ids.push(entry.id);
            }
            true
        })?;
        Ok(ids)
    }

    /// Counts entries by status: as stored with the queue's last move (or, when they are not
    /// there, by a scan of the queue), then kept up to date.
    pub fn queue_counts(&self) -> Result<QueueCounts, StoreError> {
        let mut queue = self.lock_queue();
        if let Some(tally) = *queue {
            return Ok(tally.shown);
        }
        let shown = self.scan_queue_counts()?;
        let in_flight = self.lock_in_flight().len() as u64;
        let tally = QueueTally { shown, in_flight };
        // Kept, so that the next open need not count them again; while writes are refused
        // (a full disk) they are still shown, and counted again at the next open.
        let mut batch = Batch::default();
        batch.put(keys::META_QUEUE_COUNTS.to_vec(), tally.stored().to_stored());
        if let Err(e) = self.kv.apply(batch) {
            tracing::debug!(error = %e, "could not keep the queue's counts");
        }
        *queue = Some(tally);
        Ok(shown)
    }

    /// Counts entries by status, reading the queue a page at a time.
    fn scan_queue_counts(&self) -> Result<QueueCounts, StoreError> {
        let mut counts = QueueCounts::default();
        self.scan_queue(None, |entry| {
            counts.count(entry.status);
            true
        })?;
        Ok(counts)
    }

    /// Calls `visit` on each queue entry after `after`, its history's included, in id order,
    /// while it returns true. Memory stays bounded by one page whatever the queue's length.
    /// The history's entries are completed, never in flight: they are read as stored.
    fn scan_queue(
        &self,
        after: Option<u64>,
        mut visit: impl FnMut(SyncQueueEntry) -> bool,
    ) -> Result<(), StoreError> {
        let kv = self.kv.as_ref();
        let mut history = history::Walk::after(after);
        let mut stopped = false;
        let mut failed = None;
        self.scan_live_queue(after, |entry| {
            loop {
                match history.next_below(kv, Some(entry.id)) {
                    Ok(Some(old)) => {
                        if !visit(old) {
                            stopped = true;
                            return false;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        return false;
                    }
                }
            }
            stopped = !visit(entry);
            !stopped
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        while !stopped && let Some(old) = history.next_below(kv, None)? {
            stopped = !visit(old);
        }
        Ok(())
    }

    /// `scan_queue` for the entries of `status` (any, for `None`): the history is read only
    /// when it may hold some.
    fn scan_queue_of(
        &self,
        status: Option<QueueStatus>,
        after: Option<u64>,
        visit: impl FnMut(SyncQueueEntry) -> bool,
    ) -> Result<(), StoreError> {
        if history::may_hold(status) {
            self.scan_queue(after, visit)
        } else {
            self.scan_live_queue(after, visit)
        }
    }

    /// The queue entry `id`, under its own key or in the history.
    fn queue_entry(&self, id: u64) -> Result<Option<SyncQueueEntry>, StoreError> {
        match self.kv.get(&keys::queue(id))? {
            Some(bytes) => decode(&bytes, "queue entry").map(Some),
            None => history::entry(self.kv.as_ref(), id),
        }
    }

    /// `scan_queue` without the history: the entries still under their own keys, which are all
    /// those not completed.
    fn scan_live_queue(
        &self,
        after: Option<u64>,
        mut visit: impl FnMut(SyncQueueEntry) -> bool,
    ) -> Result<(), StoreError> {
        const PAGE: usize = 512;
        let mut start = after.map_or_else(|| keys::QUEUE.to_vec(), |id| keys::queue(id + 1));
        let end = keys::prefix_end(keys::QUEUE);
        loop {
            let page = self.kv.range(&start, &end, PAGE)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            start = keys::after(last);
            for (_, bytes) in page {
                if !visit(self.as_now(decode(&bytes, "queue entry")?)) {
                    return Ok(());
                }
            }
        }
    }

    /// Moves the given entries to a new state, all in one atomic batch: if any move is not
    /// allowed, none is made. An id named twice is moved once. Durable after `flush`.
    pub fn queue_transition(
        &self,
        ids: &[u64],
        action: &QueueAction,
    ) -> Result<Vec<SyncQueueEntry>, StoreError> {
        let mut queue = self.lock_queue();
        let now = self.clock.now_ms();
        let mut batch = Batch::default();
        let mut delta = CountDelta::default();
        let mut updated = Vec::with_capacity(ids.len());
        let mut landed = Vec::new();
        let mut seen = BTreeSet::new();
        for &id in ids.iter().filter(|&&id| seen.insert(id)) {
            let flying = self.lock_in_flight().get(&id).cloned();
            let in_flight = flying.is_some();
            let mut entry = match flying {
                Some(entry) => entry,
                None => self
                    .queue_entry(id)?
                    .ok_or(StoreError::QueueEntryNotFound(id))?,
            };
            let old = entry.status;
            match action {
                QueueAction::Start => entry.start(now),
                QueueAction::Complete => entry.complete(now),
                QueueAction::Fail { error, max_retries } => {
                    entry.fail(error.clone(), *max_retries, now)
                }
                QueueAction::Retry => {
                    self.lock_holds().release(id);
                    entry.retry(now)
                }
                QueueAction::RequeueInterrupted => entry.requeue_interrupted(now),
            }?;
            if in_flight {
                stage_landing(&mut batch, &mut delta, &entry)?;
                landed.push(id);
            } else {
                stage_entry(&mut batch, &mut delta, Some(old), &entry)?;
            }
            updated.push(entry);
        }
        self.apply_queue_batch(&mut queue, batch, delta)?;
        self.land(&landed);
        Ok(updated)
    }

    /// Forgets completed queue entries last updated before `cutoff_ms`, and SyncLog entries
    /// older than `log_cutoff_ms`, at most `max` of each per call (oldest first), so that a
    /// device's history does not grow for ever. Pending, processing and failed entries are never
    /// touched. Returns how many queue and log entries went. Durable after `flush`.
    pub fn prune_history(
        &self,
        cutoff_ms: u64,
        log_cutoff_ms: u64,
        max: usize,
    ) -> Result<(usize, usize), StoreError> {
        let mut queue = self.lock_queue();
        let mut batch = Batch::default();
        let mut delta = CountDelta::default();
        let mut start = keys::QUEUE.to_vec();
        let end = keys::prefix_end(keys::QUEUE);
        let mut pruned = history::stage_prune(self.kv.as_ref(), &mut batch, cutoff_ms, max)?;
        *delta.slot(QueueStatus::Completed) -= pruned as i64;
        'scan: loop {
            let page = self.kv.range(&start, &end, 1024)?;
            let Some((last, _)) = page.last() else { break };
            start = [last.as_slice(), &[0]].concat();
            for (key, bytes) in &page {
                let entry: SyncQueueEntry = decode(bytes, "queue entry")?;
                // Ids grow with time: past the cutoff, nothing later can be older.
                if entry.created_at >= cutoff_ms || pruned == max {
                    break 'scan;
                }
                if entry.status == QueueStatus::Completed && entry.updated_at < cutoff_ms {
                    batch.remove(key.clone());
                    batch.remove(keys::queue_change(entry.id));
                    *delta.slot(QueueStatus::Completed) -= 1;
                    pruned += 1;
                }
            }
        }
        if pruned > 0 {
            // The journal goes first: once the entries leave the queue, a journal still holding
            // them would have the next open take them for unsynced changes the queue lost. The
            // rewrite makes what was applied before it durable; the removal is durable after
            // the next flush, and until then the queue still holds what the journal left out.
            self.rewrite_journal_locked()?;
        }
        self.apply_queue_batch(&mut queue, batch, delta)?;
        drop(queue);
        let mut batch = Batch::default();
        let old_logs = self
            .kv
            .range(keys::LOG, &keys::prefix_end(keys::LOG), max)?;
        let mut logs_pruned = 0;
        for (key, bytes) in &old_logs {
            let entry: SyncLogEntry = decode(bytes, "SyncLog entry")?;
            if entry.timestamp >= log_cutoff_ms {
                break;
            }
            batch.remove(key.clone());
            logs_pruned += 1;
        }
        if !batch.is_empty() {
            self.kv.apply(batch)?;
        }
        if pruned + logs_pruned > 0 {
            // The live data shrank (the one way it does): the next `bound_space` measures it
            // again rather than judge the size on disk against the old figure.
            *self.lock_space() = None;
        }
        Ok((pruned, logs_pruned))
    }

    /// After an unclean stop, entries caught mid-upload go back to pending. Returns how many.
    pub fn recover_interrupted(&self) -> Result<usize, StoreError> {
        let ids = self.queue_ids(QueueStatus::Processing)?;
        self.queue_transition(&ids, &QueueAction::RequeueInterrupted)?;
        self.flush()?;
        Ok(ids.len())
    }

    /// Appends a SyncLog entry (its `id` is assigned here). Durable after `flush`.
    pub fn log_append(&self, mut entry: SyncLogEntry) -> Result<SyncLogEntry, StoreError> {
        entry.id = self.next_log_id.fetch_add(1, Ordering::SeqCst);
        let mut batch = Batch::default();
        batch.put(keys::log(entry.id), encode(&entry, "sync log entry")?);
        self.kv.apply(batch)?;
        Ok(entry)
    }

    /// SyncLog entries, newest first, older than `before`.
    pub fn log(&self, before: Option<u64>, limit: usize) -> Result<Vec<SyncLogEntry>, StoreError> {
        let end = before.map_or_else(|| keys::prefix_end(keys::LOG), keys::log);
        let mut out = Vec::new();
        self.scan_back(keys::LOG, end, limit, |bytes| {
            out.push(decode_log_entry(bytes)?);
            Ok(out.len())
        })?;
        Ok(out)
    }

    /// A sync cursor (how far this device has read a peer's change log), if one was saved.
    pub fn cursor(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.kv.get(&keys::cursor(name))?)
    }

    /// Saves a sync cursor. Durable after `flush`: advance it only after the changes it covers
    /// are durable, so a crash can make a device read changes again but never skip them.
    pub fn set_cursor(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.put(keys::cursor(name), value.to_vec());
        Ok(self.kv.apply(batch)?)
    }

    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.kv.size_on_disk()?)
    }

    pub fn live_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.kv.live_bytes()?)
    }

    /// Rewrites the store compactly now, whatever its size (`bound_space` does so only past its
    /// bound): for `ferry space --compact` on a stopped store.
    pub fn compact(&self) -> Result<(), StoreError> {
        self.kv.compact()?;
        *self.lock_space() = None;
        Ok(())
    }

    /// The live bytes by kind of key (`keys::Kind`), and the journal's bytes beside them: where
    /// the store's space goes, next to `size_on_disk`. A full scan, reading no long value.
    pub fn live_bytes_by_kind(&self) -> Result<(Vec<kv::KeyKind>, u64), StoreError> {
        let kinds = kv::sizes_by(&*self.kv, &|key| keys::Kind::of(key).name())?;
        Ok((kinds, self.kv.journal_bytes()))
    }

    /// Measures the space the store takes and the live data it holds (a full scan), and keeps
    /// the measure in the store (durable with the next flush; not at all when the store takes
    /// no write: the measure is still returned).
    pub fn measure_space(&self) -> Result<SpaceUse, StoreError> {
        let live_bytes = self.kv.live_bytes()?;
        let space = SpaceUse {
            store_bytes: self.kv.size_on_disk()?,
            live_bytes,
            measured_at_ms: self.clock.now_ms(),
        };
        *self.lock_space() = Some(space);
        let mut batch = Batch::default();
        let kept = [space.store_bytes, space.live_bytes, space.measured_at_ms];
        batch.put(keys::META_SPACE.to_vec(), u64s_to_stored(&kept));
        if let Err(e) = self.kv.apply(batch) {
            tracing::debug!(error = %e, "the space measure was not kept in the store");
        }
        Ok(space)
    }

    /// The last measure of `measure_space` in this process, if any.
    pub fn last_space(&self) -> Option<SpaceUse> {
        *self.lock_space()
    }

    /// The last measure of the space, this process's or else the one kept in the store by an
    /// earlier one (its `measured_at_ms` says when).
    pub fn last_space_kept(&self) -> Option<SpaceUse> {
        self.last_space().or(self.space_kept)
    }

    fn lock_space(&self) -> MutexGuard<'_, Option<SpaceUse>> {
        self.space.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the store within `SPACE_FACTOR` times its live data plus `SPACE_FLOOR_BYTES`: when
    /// it takes more, its engine rewrites it compactly (a pause for every other call of the
    /// store, about as long as copying the live data), unless it has not grown enough since the
    /// last compaction (which could not do better): by the floor, or, when that compaction left
    /// it over its bound, by half the size it left; or a copy is not expected to save a fifth
    /// of it (`copy_would_shrink`). Cheap otherwise: the size on disk is
    /// compared with the live bytes last measured, which are measured again when that bound is
    /// passed or the measure is old. Never while the disk is full (that would make writes
    /// durable that were refused).
    pub fn bound_space(&self) -> Result<Option<Compacted>, StoreError> {
        if self.kv.disk_full_since().is_some() {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        let fresh = self
            .last_space()
            .filter(|last| now.saturating_sub(last.measured_at_ms) < MEASURE_SPACE_EVERY_MS);
        let size = self.kv.size_on_disk()?;
        if let Some(last) = fresh
            && size <= space_bound(last.live_bytes)
        {
            return Ok(None);
        }
        // Checked before measuring: the measure is a full scan, and would not change the answer.
        let compacted_to = self.compacted_to.load(Ordering::SeqCst);
        let regrown = |bytes: u64| {
            compacted_to == 0
                || bytes > compacted_to.saturating_add(self.regrow_bytes.load(Ordering::SeqCst))
        };
        if !regrown(size) {
            return Ok(None);
        }
        let before = self.measure_space()?;
        if !before.over_bound()
            || !regrown(before.store_bytes)
            || !self.copy_would_shrink(&before)?
        {
            return Ok(None);
        }
        self.kv.compact()?;
        let after = self.measure_space()?;
        self.compacted_to.store(after.store_bytes, Ordering::SeqCst);
        self.note_copy_ratio(&after)?;
        // A copy sled could not bring under the bound (at a million small records it takes 2.2
        // times their bytes, as much as before the copy) does no better until the store has
        // grown by a good part of itself: tried again each time it grew by the floor, a store
        // taking an import of a million records was copied whole, everything paused, three
        // times in three minutes, each copy as large as the store it replaced.
        let regrow = if after.over_bound() {
            (after.store_bytes / 2).max(SPACE_FLOOR_BYTES)
        } else {
            SPACE_FLOOR_BYTES
        };
        self.regrow_bytes.store(regrow, Ordering::SeqCst);
        Ok(Some(Compacted { before, after }))
    }

    /// Whether a copy of the store is expected to take at least a fifth less than it does now,
    /// going by what the last copy took against the live data it held (kept across restarts).
    /// A fresh sled copy of small records takes 1.7 to 2.9 times their bytes, at or above the
    /// bound, and the regrowth rule above is forgotten at a restart: a store a copy cannot
    /// bring under the bound was copied whole again at the first check after each restart (at
    /// a million records about 35 s of CPU, everything paused, a second engine's memory held
    /// meanwhile). Before the first compaction, a store of `ASSUME_COPY_FROM_LIVE_BYTES` or more
    /// is expected to copy as well as the best copy measured (`ASSUMED_COPY_PER_MILLE`); a
    /// smaller one is cheap to copy and worth trying.
    fn copy_would_shrink(&self, now: &SpaceUse) -> Result<bool, StoreError> {
        let recorded = self
            .kv
            .get(keys::META_COPY_RATIO)?
            // Damaged: as if unknown, and the compaction writes it again.
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map(u64::from_be_bytes);
        let per_mille = match recorded {
            Some(per_mille) => per_mille,
            None if now.live_bytes >= ASSUME_COPY_FROM_LIVE_BYTES => ASSUMED_COPY_PER_MILLE,
            None => return Ok(true),
        };
        let expected = (u128::from(now.live_bytes) * u128::from(per_mille) / 1000)
            .saturating_add(u128::from(SPACE_FLOOR_BYTES));
        let saving = u128::from(now.store_bytes).saturating_sub(expected);
        Ok(saving >= u128::from(now.store_bytes / 5))
    }

    /// Keeps what a compaction left on disk per live byte beyond the floor, for
    /// `copy_would_shrink`.
    fn note_copy_ratio(&self, after: &SpaceUse) -> Result<(), StoreError> {
        let beyond_floor = after.store_bytes.saturating_sub(SPACE_FLOOR_BYTES);
        let per_mille = u128::from(beyond_floor) * 1000 / u128::from(after.live_bytes.max(1));
        let per_mille = u64::try_from(per_mille).unwrap_or(u64::MAX);
        let mut batch = Batch::default();
        batch.put(
            keys::META_COPY_RATIO.to_vec(),
            per_mille.to_be_bytes().to_vec(),
        );
        Ok(self.kv.apply(batch)?)
    }

    /// Whether writes are refused because the disk is full, and since when (Unix ms).
    pub fn disk_full_since(&self) -> Option<u64> {
        self.kv.disk_full_since()
    }

    /// After a write failed for lack of space: opens what is durable again and rebuilds from it
    /// everything the store keeps in memory (loaded documents, next ids, queue counts, open
    /// conflicts, the space measure), so reads show only what was acknowledged: what was applied
    /// but never flushed was never acknowledged, and goes. Writes stay refused until
    /// `resume_writes`. Does nothing unless writes are refused for a full disk.
    pub fn reopen_storage(&self) -> Result<(), StoreError> {
        let mut cache = self.lock_cache();
        let mut queue = self.lock_queue();
        if self.kv.disk_full_since().is_none() {
            return Ok(());
        }
        // What is held in memory may show writes that never became durable: it goes whether or
        // not the engine opens again (sled cannot open on a disk with no room at all; reads
        // then fail too until there is some).
        cache.clear();
        *queue = None;
        *self.lock_space() = None;
        if !self.kv.reopen()? {
            return Ok(());
        }
        let kv = self.kv.as_ref();
        self.next_queue_id
            .store(next_queue_id(kv)?, Ordering::SeqCst);
        self.next_log_id
            .store(next_seq(kv, keys::LOG)?, Ordering::SeqCst);
        let open = kv.count(keys::CONFLICT_OPEN, &keys::prefix_end(keys::CONFLICT_OPEN))?;
        self.open_conflicts.store(open, Ordering::SeqCst);
        Ok(())
    }

    /// Takes writes again after the disk filled up (call it once the disk has room). Entries
    /// caught mid-upload go back to pending, as after an unclean stop: an upload in flight when
    /// the store went back to what was durable may have been recorded or not, and uploading a
    /// change twice is harmless. Returns how many were requeued.
    pub fn resume_writes(&self) -> Result<usize, StoreError> {
        self.reopen_storage()?;
        self.kv.resume_writes()?;
        self.recover_interrupted()
    }
}

/// The documents a batch is writing. They are taken out of the cache for the length of the batch,
/// so that the cache cannot evict a document, and the changes staged on it, half way through; and
/// they go back into it only once the batch has landed. A document loaded from storage is kept only
/// until its last write in the batch, so a large import does not hold every document it touches.
#[derive(Default)]
struct WorkingSet {
    /// How many writes of the batch name each record (counted down as they are staged).
    uses: HashMap<CacheKey, u32>,
    /// Documents still needed by later writes of the batch, or taken from the cache.
    records: HashMap<CacheKey, (Record, bool)>,
}

impl WorkingSet {
    fn take(
        &mut self,
        key: &CacheKey,
        cache: &mut LruCache<CacheKey, Record>,
        load: impl FnOnce() -> Result<Record, StoreError>,
    ) -> Result<&mut Record, StoreError> {
        let entry = match self.records.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match cache.pop(key) {
                Some(record) => e.insert((record, true)),
                None => e.insert((load()?, false)),
            },
        };
        Ok(&mut entry.0)
    }

    /// One write of the batch to `key` is staged; drop a stored document after its last one.
    fn used(&mut self, key: &CacheKey) {
        let left = self.uses.get_mut(key).map_or(0, |n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left == 0
            && self
                .records
                .get(key)
                .is_some_and(|(_, from_cache)| !from_cache)
        {
            self.records.remove(key);
        }
    }

    /// Forgets the record's document (one a failed apply may have left broken): the next
    /// `take` loads it from storage again.
    fn discard(&mut self, key: &CacheKey) {
        self.records.remove(key);
    }

    /// The documents to put back into the cache once the batch has landed.
    fn into_cacheable(self) -> impl Iterator<Item = (CacheKey, Record)> {
        self.records
            .into_iter()
            .map(|(key, (record, _))| (key, record))
    }
}

/// Writes made ready to commit outside the store's locks (`Store::prepare_writes`).
pub struct PreparedWrites {
    resolved: Vec<Resolved>,
    /// The first write that could not be resolved; those after it were not looked at.
    invalid: Option<StoreError>,
    /// Documents of new records, by index in `resolved`, built as if nothing held them.
    fresh: HashMap<usize, Staged>,
    now: u64,
}

/// A write with its address settled and its input checked.
struct Resolved {
    key: CacheKey,
    change: Change,
    /// The version the write was made on, when not the record's current one.
    base: Option<Vec<ChangeHash>>,
}

#[derive(Clone)]
enum Change {
    Put(Fields),
    Patch(Fields, Vec<String>),
    Delete,
}

impl Change {
    /// The fields the change sets.
    fn fields(&self) -> Option<&Fields> {
        match self {
            Change::Put(fields) | Change::Patch(fields, _) => Some(fields),
            Change::Delete => None,
        }
    }
}

/// A write's record and what it does to it; a put with no id gets `new_id()`.
fn split_write(write: Write, new_id: impl FnOnce() -> String) -> (CacheKey, Change) {
    match write {
        Write::Put {
            collection,
            id,
            fields,
        } => {
            let id = id.unwrap_or_else(new_id);
            ((collection, id), Change::Put(fields))
        }
        Write::Patch {
            collection,
            id,
            set,
            unset,
        } => ((collection, id), Change::Patch(set, unset)),
        Write::Delete { collection, id } => ((collection, id), Change::Delete),
    }
}

/// Builds one write as a change to `record`, a document its caller keeps and writes as its own
/// actor (the relay's web actor, on its copy of a record): the change `write_all_at` makes for
/// the same write, checked the same way, at `base` when given. A put must name its record.
/// `None` when the record already holds what the write asks for.
pub fn build_change(
    record: &mut Record,
    write: Write,
    base: Option<&[ChangeHash]>,
    now: u64,
    options: &StoreOptions,
) -> Result<Option<(Operation, Vec<u8>)>, StoreError> {
    let (key, change) = split_write(write, String::new);
    options.check_write(&key.0, Some(&key.1), change.fields())?;
    let policy = options.policies.of(&key.0);
    let (limits, keyring) = (&options.limits, &options.keyring);
    let staged = match base {
        Some(base) => mutate_at(record, &key, change, base, now, limits, policy, keyring)?,
        None => mutate(record, &key, change, now, limits, policy, keyring)?,
    };
    Ok(staged
        .written
        .map(|(operation, change, _)| (operation, change)))
}

/// A write applied to its document, not yet in a batch.
#[derive(Debug, PartialEq)]
struct Staged {
    /// Operation, the change's bytes, and the whole document saved; `None` if nothing changed.
    written: Option<(Operation, Vec<u8>, Vec<u8>)>,
    /// The record's view afterwards (`views`), when it changed.
    view: Option<Vec<u8>>,
    /// The document's short form its view implies (`implied`), for a new record's first change.
    short: Option<Vec<u8>>,
    heads: Vec<String>,
    /// The record's heads before and after the write.
    before: Vec<ChangeHash>,
    after: Vec<ChangeHash>,
}

impl Staged {
    /// Stages a written record's document, its view under `policy`, and its heads; `before`
    /// are the heads it had.
    fn of(
        record: &mut Record,
        before: Vec<ChangeHash>,
        written: Option<crate::record::Written>,
        policy: &resolve::Policy,
    ) -> Result<Self, StoreError> {
        let after = record.heads();
        let view = match written {
            Some(_) => Some(views::of_record(record, policy)?),
            None => None,
        };
        let written = written.map(|w| {
            let change = w.change.raw_bytes().to_vec();
            // A record's first change is its whole document, and loads as one.
            let document = if before.is_empty() {
                change.clone()
            } else {
                record.save()
            };
            (w.operation, change, document)
        });
        Ok(Staged {
            written,
            view,
            short: None,
            heads: after.iter().map(ToString::to_string).collect(),
            before,
            after,
        })
    }

    /// Stages a new record whose first change by `actor` at `time_ms`, setting `fields`, was
    /// encoded directly: the change is its whole document, which its view implies.
    fn of_first_change(
        first: EncodedChange,
        (actor, time_ms): (&ActorId, i64),
        fields: &Fields,
        policy: &resolve::Policy,
    ) -> Result<Self, StoreError> {
        let view = views::of_new_record(fields, first.hash, policy)?;
        let message = Operation::Create.as_str();
        Ok(Staged {
            // `first` was encoded from `fields`, which the view holds.
            short: implied::short_form(actor, time_ms, message),
            view: Some(view),
            written: Some((Operation::Create, first.bytes.clone(), first.bytes)),
            heads: vec![first.hash.to_string()],
            before: Vec::new(),
            after: vec![first.hash],
        })
    }
}

/// Applies one change to a record in memory, on top of what the record shows under its policy.
/// Where that is Automerge's own merge (the usual case) the write is the plain minimal diff.
/// Where the strategy settles concurrent values at read time, the write changes only the fields
/// it asks for, each relative to its shown value; where the record shows some of its heads only
/// (lww), the write makes the whole shown state explicit. On error the record is rolled back; the
/// batch it belongs to is abandoned with its working set.
fn mutate(
    record: &mut Record,
    key: &CacheKey,
    change: Change,
    now: u64,
    limits: &Limits,
    policy: &resolve::Policy,
    keyring: &Keyring,
) -> Result<Staged, StoreError> {
    let before = record.heads();
    let shown = resolve::view(record, policy);
    let live = shown.is_live();
    let seal = |fields: &mut Fields| {
        keyring.seal_fields(&policy.encrypted, &key.0, &key.1, &shown.fields, fields)
    };
    let change = match change {
        Change::Put(mut fields) => {
            seal(&mut fields)?;
            Change::Put(fields)
        }
        Change::Patch(mut set, unset) => {
            seal(&mut set)?;
            Change::Patch(set, unset)
        }
        Change::Delete => Change::Delete,
    };
    let operation = if live {
        Operation::Update
    } else {
        Operation::Create
    };
    let written = match change {
        Change::Patch(..) | Change::Delete if !live => return Err(not_found(key)),
        Change::Put(fields) if shown.exact => record.put(&fields, now),
        Change::Put(fields) if shown.partial => {
            record.materialize(&fields, false, operation, None, now)
        }
        Change::Put(fields) => {
            record.write_over(&shown.fields, live, &fields, Removal::Absent, now)
        }
        Change::Patch(set, unset) => {
            let written = if shown.exact {
                record.patch(&set, &unset, now)
            } else if shown.partial {
                let mut fields = shown.fields;
                for name in &unset {
                    fields.remove(name);
                }
                fields.extend(set);
                record.materialize(&fields, false, Operation::Update, None, now)
            } else {
                record.write_over(&shown.fields, live, &set, Removal::Named(&unset), now)
            };
            written.and_then(|w| {
                if w.is_some() {
                    validate_shape(&resolve::view(record, policy).fields, limits)?;
                }
                Ok(w)
            })
        }
        Change::Delete if shown.partial => {
            record.materialize(&shown.fields, true, Operation::Delete, None, now)
        }
        Change::Delete => record.delete(now),
    };
    let written = written.inspect_err(|_| record.rollback())?;
    Staged::of(record, before, written, policy)
}

/// `mutate` on the record as it was at `base` (with its own actor's latest change): the change
/// is built there, then applied to the record, beside the changes made since.
#[allow(clippy::too_many_arguments)]
fn mutate_at(
    record: &mut Record,
    key: &CacheKey,
    change: Change,
    base: &[ChangeHash],
    now: u64,
    limits: &Limits,
    policy: &resolve::Policy,
    keyring: &Keyring,
) -> Result<Staged, StoreError> {
    if let Some(unknown) = base.iter().find(|h| !record.has_change(h)) {
        return Err(StoreError::UnknownVersion {
            collection: key.0.clone(),
            id: key.1.clone(),
            version: unknown.to_string(),
        });
    }
    let before = record.heads();
    let mut at: Vec<ChangeHash> = base.to_vec();
    at.extend(record.own_last_change());
    at.sort();
    at.dedup();
    if at == before {
        return mutate(record, key, change, now, limits, policy, keyring);
    }
    let mut fork = record.fork_at(&at)?;
    let staged = mutate(&mut fork, key, change, now, limits, policy, keyring)?;
    let Some((operation, change, _)) = staged.written else {
        return Ok(Staged {
            written: None,
            view: None,
            short: None,
            heads: before.iter().map(ToString::to_string).collect(),
            after: before.clone(),
            before,
        });
    };
    record.apply_changes(std::slice::from_ref(&change))?;
    let after = record.heads();
    Ok(Staged {
        written: Some((operation, change, record.save())),
        view: Some(views::of_record(record, policy)?),
        short: None,
        heads: after.iter().map(ToString::to_string).collect(),
        before,
        after,
    })
}

/// How a batch moves the queue's counts by status.
#[derive(Debug, Default)]
struct CountDelta {
    pending: i64,
    processing: i64,
    completed: i64,
    failed: i64,
    /// Entries counted processing while stored pending: taken into an upload, or landed.
    in_flight: i64,
}

impl CountDelta {
    fn slot(&mut self, status: QueueStatus) -> &mut i64 {
        match status {
            QueueStatus::Pending => &mut self.pending,
            QueueStatus::Processing => &mut self.processing,
            QueueStatus::Completed => &mut self.completed,
            QueueStatus::Failed => &mut self.failed,
        }
    }

    /// An entry taken into an upload: shown processing, still stored pending.
    fn take_into_flight(&mut self) {
        self.pending -= 1;
        self.processing += 1;
        self.in_flight += 1;
    }

    /// An entry back from an upload, before its stored move is counted: shown pending again.
    fn land_from_flight(&mut self) {
        self.pending += 1;
        self.processing -= 1;
        self.in_flight -= 1;
    }

    fn apply_to(&self, tally: &mut QueueTally) {
        let add = |count: &mut u64, by: i64| *count = count.saturating_add_signed(by);
        let counts = &mut tally.shown;
        add(&mut counts.pending, self.pending);
        add(&mut counts.processing, self.processing);
        add(&mut counts.completed, self.completed);
        add(&mut counts.failed, self.failed);
        add(&mut tally.in_flight, self.in_flight);
    }

    /// Whether the counts as stored move: an entry taken into an upload moves only in memory.
    fn moves_stored(&self) -> bool {
        self.pending + self.in_flight != 0
            || self.processing - self.in_flight != 0
            || self.completed != 0
            || self.failed != 0
    }
}

/// Adds a queue entry, whose status was `old` (`None` for a new entry), to the batch together with
/// the pending index change its move calls for, so the index never disagrees with the queue, and
/// counts the move in `delta`.
fn stage_entry(
    batch: &mut Batch,
    delta: &mut CountDelta,
    old: Option<QueueStatus>,
    entry: &SyncQueueEntry,
) -> Result<(), StoreError> {
    if let Some(old) = old {
        *delta.slot(old) -= 1;
    }
    *delta.slot(entry.status) += 1;
    let was_pending = old == Some(QueueStatus::Pending);
    let is_pending = entry.status == QueueStatus::Pending;
    if was_pending && !is_pending {
        batch.remove(keys::pending(entry.priority, entry.id));
    } else if is_pending && !was_pending {
        batch.put(keys::pending(entry.priority, entry.id), Vec::new());
    }
    if entry.data.len() <= INLINE_CHANGE_BYTES {
        batch.put(keys::queue(entry.id), encode(entry, "queue entry")?);
        return Ok(());
    }
    // A long change is written once, with its new entry; a move rewrites the rest only.
    if old.is_none() {
        batch.put(keys::queue_change(entry.id), entry.data.clone());
    }
    batch.put(
        keys::queue(entry.id),
        encode(&without_change(entry), "queue entry")?,
    );
    Ok(())
}

/// Stages the move of an entry that was in flight: stored `Pending` (with its pending key),
/// counted `Processing`.
fn stage_landing(
    batch: &mut Batch,
    delta: &mut CountDelta,
    entry: &SyncQueueEntry,
) -> Result<(), StoreError> {
    stage_entry(batch, delta, Some(QueueStatus::Pending), entry)?;
    delta.land_from_flight();
    Ok(())
}

/// The entry as stored when its change is under its own key.
fn without_change(entry: &SyncQueueEntry) -> SyncQueueEntry {
    SyncQueueEntry {
        data: Vec::new(),
        model_name: entry.model_name.clone(),
        object_id: entry.object_id.clone(),
        last_error: entry.last_error.clone(),
        ..*entry
    }
}

/// Calls `visit` with the raw queue entries a page at a time, in id order: for the one-time
/// upgrades `open` runs on the KV before a `Store` exists.
fn queue_pages(
    kv: &dyn Kv,
    mut visit: impl FnMut(Vec<kv::Pair>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    const PAGE: usize = 512;
    let mut start = keys::QUEUE.to_vec();
    let end = keys::prefix_end(keys::QUEUE);
    loop {
        let page = kv.range(&start, &end, PAGE)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        start = keys::after(last);
        visit(page)?;
    }
}

/// Moves the long changes of a store made before they had their own keys out of their entries.
/// Runs once: the marker key is written in the same batch.
fn move_long_changes(kv: &dyn Kv) -> Result<(), StoreError> {
    if kv.get(keys::META_QUEUE_CHANGES)?.is_some() {
        return Ok(());
    }
    queue_pages(kv, |page| {
        let mut batch = Batch::default();
        for (key, bytes) in page {
            let entry: SyncQueueEntry = decode(&bytes, "queue entry")?;
            if entry.data.len() > INLINE_CHANGE_BYTES {
                batch.put(keys::queue_change(entry.id), entry.data.clone());
                batch.put(key, encode(&without_change(&entry), "queue entry")?);
            }
        }
        // Each page lands whole; a page moved before a crash is simply found moved again.
        if !batch.is_empty() {
            kv.apply(batch)?;
        }
        Ok(())
    })?;
    let mut batch = Batch::default();
    batch.put(keys::META_QUEUE_CHANGES.to_vec(), Vec::new());
    kv.apply(batch)?;
    Ok(kv.flush()?)
}

fn not_found(key: &CacheKey) -> StoreError {
    StoreError::NotFound {
        collection: key.0.clone(),
        id: key.1.clone(),
    }
}

/// The id the next queue entry gets: after every entry the queue and its history hold.
fn next_queue_id(kv: &dyn Kv) -> Result<u64, StoreError> {
    Ok(next_seq(kv, keys::QUEUE)?.max(history::ids_below(kv)?))
}

fn next_seq(kv: &dyn Kv, prefix: &[u8]) -> Result<u64, StoreError> {
    let last = kv.last_key(prefix, &keys::prefix_end(prefix))?;
    last.map_or(Ok(1), |k| keys::seq_of(&k, prefix.len()).map(|n| n + 1))
}

fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|e| StoreError::Encode {
        what,
        detail: e.to_string(),
    })
}

fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Decode {
        what,
        detail: e.to_string(),
    })
}

/// A SyncLog entry, also in the layout written before conflicts were counted (the same fields
/// without the last), which reads as no conflicts.
fn decode_log_entry(bytes: &[u8]) -> Result<SyncLogEntry, StoreError> {
    decode(bytes, "log entry").or_else(|e| {
        let mut padded = bytes.to_vec();
        padded.push(0);
        postcard::from_bytes(&padded).map_err(|_| e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use kv::MemoryKv;

    /// An engine that says it takes what the test sets, and that a compaction leaves it at what
    /// the test sets: sled's sizes, without writing hundreds of MiB.
    #[derive(Clone, Default)]
    struct Sized {
        inner: MemoryKv,
        size: Arc<AtomicU64>,
        after_compaction: Arc<AtomicU64>,
        compactions: Arc<AtomicU64>,
        /// The live bytes it says it holds; 0: what it really holds.
        live: Arc<AtomicU64>,
    }

    impl Sized {
        /// Says it takes `size` bytes for `live` live bytes (0: what it really holds).
        fn set(&self, size: u64, live: u64) {
            self.size.store(size, Ordering::SeqCst);
            self.live.store(live, Ordering::SeqCst);
        }

        fn compactions(&self) -> u64 {
            self.compactions.load(Ordering::SeqCst)
        }
    }

    impl Kv for Sized {
        fn size_on_disk(&self) -> Result<u64, KvError> {
            Ok(self.size.load(Ordering::SeqCst))
        }
        fn live_bytes(&self) -> Result<u64, KvError> {
            match self.live.load(Ordering::SeqCst) {
                0 => self.inner.live_bytes(),
                live => Ok(live),
            }
        }
        fn compact(&self) -> Result<(), KvError> {
            self.compactions.fetch_add(1, Ordering::SeqCst);
            let after = self.after_compaction.load(Ordering::SeqCst);
            self.size.store(after, Ordering::SeqCst);
            self.inner.flush()
        }
        kv::forward_to_inner!(
            get,
            range,
            last_key,
            count,
            apply,
            flush,
            key_sizes,
            journal,
            journal_bytes,
            rewrite_journal,
        );
    }

    /// A compaction that leaves the store over its bound is tried again only once the store
    /// has grown by half, not by the floor alone; one that gets it under, after the floor.
    #[test]
    fn a_compaction_that_could_not_reach_the_bound_waits_for_the_store_to_grow_by_half() {
        const MIB: u64 = 1 << 20;
        let kv = Sized::default();
        let store = open(&kv);
        store
            .write(Write::Put {
                collection: "Note".into(),
                id: Some("a".into()),
                fields: fields(serde_json::json!({"n": 1})),
            })
            .unwrap();
        // Over the bound (8 MiB and twice a few hundred bytes), and still over once compacted.
        kv.set(120 * MIB, 0);
        kv.after_compaction.store(100 * MIB, Ordering::SeqCst);
        assert!(store.bound_space().unwrap().is_some());
        assert_eq!(kv.compactions(), 1);
        kv.set(100 * MIB + SPACE_FLOOR_BYTES + MIB, 0);
        assert!(
            store.bound_space().unwrap().is_none(),
            "grown by the floor only"
        );
        kv.set(150 * MIB, 0);
        assert!(
            store.bound_space().unwrap().is_none(),
            "grown by half, not more"
        );
        kv.set(150 * MIB + 1, 0);
        assert!(store.bound_space().unwrap().is_some());
        assert_eq!(kv.compactions(), 2);
        // Now a compaction gets it under: the floor is enough growth again.
        kv.after_compaction.store(MIB, Ordering::SeqCst);
        kv.set(160 * MIB, 0);
        assert!(store.bound_space().unwrap().is_some());
        kv.set(MIB + SPACE_FLOOR_BYTES + MIB, 0);
        assert!(store.bound_space().unwrap().is_some());
        assert_eq!(kv.compactions(), 4);
    }

    /// A store over its bound is not copied when the last copy says a copy would save less
    /// than a fifth of it, also after a restart; it is once its live data shrank enough.
    #[test]
    fn a_copy_that_would_not_save_a_fifth_is_not_made_even_after_a_restart() {
        const MIB: u64 = 1 << 20;
        let kv = Sized::default();
        // 150 MiB for 50 live (the bound is 108): copied, to 100 MiB, 1.84 times the live data
        // beyond the floor.
        kv.set(150 * MIB, 50 * MIB);
        kv.after_compaction.store(100 * MIB, Ordering::SeqCst);
        assert!(open(&kv).bound_space().unwrap().is_some());
        assert_eq!(kv.compactions(), 1);
        // After a restart, 120 MiB is over the bound, but a copy would take about 100.
        kv.set(120 * MIB, 50 * MIB);
        let store = open(&kv);
        assert!(store.bound_space().unwrap().is_none());
        assert_eq!(kv.compactions(), 1, "a copy saving a sixth is not made");
        // With 30 MiB live a copy would take about 63: made.
        kv.set(120 * MIB, 30 * MIB);
        assert!(store.bound_space().unwrap().is_some());
        assert_eq!(kv.compactions(), 2);
    }

    /// Before any compaction, a large store is copied only when even the best copy measured
    /// would save a fifth of it; a small one is copied whenever it is over its bound.
    #[test]
    fn a_large_store_is_not_copied_the_first_time_unless_a_good_copy_would_save_a_fifth() {
        const MIB: u64 = 1 << 20;
        let kv = Sized::default();
        // 100 MiB live in 210 (the bound is 208): a copy at 1.7 times would take 178.
        kv.set(210 * MIB, 100 * MIB);
        kv.after_compaction.store(180 * MIB, Ordering::SeqCst);
        assert!(open(&kv).bound_space().unwrap().is_none());
        assert_eq!(kv.compactions(), 0);
        // In 240, a copy at 1.7 times would save more than a fifth: made.
        kv.set(240 * MIB, 100 * MIB);
        assert!(open(&kv).bound_space().unwrap().is_some());
        assert_eq!(kv.compactions(), 1);
        // A small store over its bound is copied whatever a copy is expected to save.
        let kv = Sized::default();
        kv.set(20 * MIB, 5 * MIB);
        kv.after_compaction.store(19 * MIB, Ordering::SeqCst);
        assert!(open(&kv).bound_space().unwrap().is_some());
    }

    const DEVICE: &str = "000102030405060708090a0b0c0d0e0f";

    /// A store over `kv` with the default options (also for the other store modules' tests).
    pub(in crate::store) fn open(kv: &(impl Kv + Clone + 'static)) -> Store {
        Store::open(
            Box::new(kv.clone()),
            DEVICE,
            StoreOptions::default(),
            Arc::new(SystemClock),
        )
        .unwrap()
    }

    /// A store of format 1 to 4 opens and is marked with this build's format at once, so that
    /// an older build refuses it from then on; a format this build does not know is refused with
    /// an error naming it, before anything is written.
    #[test]
    fn an_older_format_is_marked_current_and_a_newer_one_is_refused() {
        let kv = MemoryKv::default();
        drop(open(&kv));
        for older in [b"1", b"2", b"3", b"4"] {
            let mut batch = Batch::default();
            batch.put(keys::META_FORMAT.to_vec(), older.to_vec());
            kv.apply(batch).unwrap();
            drop(open(&kv));
            assert_eq!(
                kv.get(keys::META_FORMAT).unwrap(),
                Some(FORMAT_VERSION.to_vec())
            );
        }

        let mut batch = Batch::default();
        batch.put(keys::META_FORMAT.to_vec(), b"6".to_vec());
        kv.apply(batch).unwrap();
        let opened = Store::open(
            Box::new(kv.clone()),
            DEVICE,
            StoreOptions::default(),
            Arc::new(SystemClock),
        );
        match opened {
            Err(error @ StoreError::UnsupportedFormat(_)) => {
                assert!(error.to_string().contains("\"6\""), "{error}");
                assert!(
                    error.to_string().contains("it reads formats 1 to 5)"),
                    "{error}"
                );
            }
            Err(other) => panic!("expected UnsupportedFormat, got {other}"),
            Ok(_) => panic!("a store of format 6 opened"),
        }
        assert_eq!(kv.get(keys::META_FORMAT).unwrap(), Some(b"6".to_vec()));
    }

    fn fields(v: serde_json::Value) -> Fields {
        match v {
            serde_json::Value::Object(m) => m,
            _ => Fields::new(),
        }
    }

    /// A batch big enough to build new records in parallel, mixing new records, repeated ids,
    /// patches of records made earlier in the batch and of stored ones, with a tiny cache, ends
    /// exactly as the same writes applied one at a time.
    #[test]
    fn a_large_mixed_batch_equals_the_same_writes_one_by_one() {
        let writes = |round: u64| -> Vec<Write> {
            let mut w = Vec::new();
            for n in 0..300u64 {
                let id = format!("r{}", n % 250);
                w.push(match n % 7 {
                    3 if n > 250 => Write::Patch {
                        collection: "C".into(),
                        // An id that an earlier put of the batch (n % 7 != 5) created.
                        id: format!("r{}", (n * 3 % 250) / 7 * 7),
                        set: fields(serde_json::json!({ "patched": n, "round": round })),
                        unset: vec!["v".into()],
                    },
                    5 => Write::Put {
                        collection: "D".into(),
                        id: None,
                        fields: fields(serde_json::json!({ "n": n })),
                    },
                    _ => Write::Put {
                        collection: "C".into(),
                        id: Some(id),
                        fields: fields(serde_json::json!({ "v": n, "round": round })),
                    },
                });
            }
            w
        };
        let options = StoreOptions {
            cache_docs: 2,
            ..StoreOptions::default()
        };
        let open = |kv: &MemoryKv| {
            Store::open(
                Box::new(kv.clone()),
                DEVICE,
                options.clone(),
                Arc::new(SystemClock),
            )
            .unwrap()
        };
        let (batched_kv, single_kv) = (MemoryKv::new(), MemoryKv::new());
        let (batched, single) = (open(&batched_kv), open(&single_kv));
        for round in 0..2 {
            let a = batched.write_all(writes(round)).unwrap();
            let b: Vec<Applied> = writes(round)
                .into_iter()
                .map(|w| single.write(w).unwrap())
                .collect();
            let summary = |v: &[Applied]| -> Vec<_> {
                v.iter()
                    .filter(|a| a.collection == "C")
                    .map(|a| (a.id.clone(), a.operation))
                    .collect()
            };
            assert_eq!(summary(&a), summary(&b), "round {round}");
        }
        let (records_a, _) = batched.list("C", None, 1000).unwrap();
        let (records_b, _) = single.list("C", None, 1000).unwrap();
        let strip =
            |v: Vec<RecordView>| -> Vec<_> { v.into_iter().map(|r| (r.id, r.fields)).collect() };
        assert_eq!(strip(records_a), strip(records_b));
        let ops = |s: &Store| -> Vec<_> {
            s.queue(None, None, usize::MAX)
                .unwrap()
                .into_iter()
                .filter(|e| e.model_name == "C")
                .map(|e| (e.object_id, e.operation))
                .collect()
        };
        assert_eq!(ops(&batched), ops(&single));
        for id in ["r0", "r100", "r249"] {
            assert_eq!(
                batched.history("C", id).unwrap().len(),
                single.history("C", id).unwrap().len(),
                "{id}"
            );
        }
        assert_eq!(
            batched.collections().unwrap(),
            single.collections().unwrap()
        );
    }

    /// A long change is kept under its own key, written once: moving its entry rewrites only the
    /// entry's small value. A store whose entries hold long changes inline (as older versions
    /// wrote them) gets them moved when it is opened, and reads the same.
    #[test]
    fn a_long_change_is_kept_apart_from_its_entry_and_older_stores_are_moved_over() {
        let kv = MemoryKv::new();
        let store = open(&kv);
        let mut x = 7u32;
        let text: String = (0..4 * INLINE_CHANGE_BYTES)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                char::from(b'a' + (x >> 16) as u8 % 26)
            })
            .collect();
        let applied = store
            .write(Write::Put {
                collection: "C".into(),
                id: Some("long".into()),
                fields: fields(serde_json::json!({ "text": text })),
            })
            .unwrap();
        let id = applied.queue_id.unwrap();
        let entry = store.queue(None, None, 10).unwrap().remove(0);
        assert!(entry.data.len() > INLINE_CHANGE_BYTES);
        let stored = |kv: &MemoryKv| -> SyncQueueEntry {
            decode(&kv.get(&keys::queue(id)).unwrap().unwrap(), "queue entry").unwrap()
        };
        assert!(stored(&kv).data.is_empty());
        assert_eq!(
            kv.get(&keys::queue_change(id)).unwrap(),
            Some(entry.data.clone())
        );
        store.queue_transition(&[id], &QueueAction::Start).unwrap();
        assert!(
            stored(&kv).data.is_empty(),
            "a move leaves the change where it is"
        );
        let moved = store.queue(None, None, 10).unwrap().remove(0);
        assert_eq!(
            (moved.status, &moved.data),
            (QueueStatus::Processing, &entry.data)
        );

        let mut older = Batch::default();
        older.put(keys::queue(id), encode(&moved, "queue entry").unwrap());
        older.remove(keys::queue_change(id));
        older.remove(keys::META_QUEUE_CHANGES.to_vec());
        kv.apply(older).unwrap();
        drop(store);
        let store = open(&kv);
        assert_eq!(store.queue(None, None, 10).unwrap(), vec![moved.clone()]);
        assert!(stored(&kv).data.is_empty());
        assert_eq!(kv.get(&keys::queue_change(id)).unwrap(), Some(moved.data));
        assert!(kv.get(keys::META_QUEUE_CHANGES).unwrap().is_some());
    }

    #[test]
    fn an_entry_named_twice_in_one_transition_moves_once() {
        let store = open(&MemoryKv::new());
        let applied = store
            .write(Write::Put {
                collection: "C".into(),
                id: Some("1".into()),
                fields: Fields::new(),
            })
            .unwrap();
        let id = applied.queue_id.unwrap();
        store
            .queue_transition(&[id, id], &QueueAction::Start)
            .unwrap();
        let fail = QueueAction::Fail {
            error: "network".into(),
            max_retries: 5,
        };
        let moved = store.queue_transition(&[id, id], &fail).unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(store.queue(None, None, 10).unwrap()[0].retry_count, 1);
    }

    #[test]
    fn cursors_survive_reopen_only_once_flushed() {
        let kv = MemoryKv::new();
        let store = open(&kv);
        assert_eq!(store.cursor("relay").unwrap(), None);
        store.set_cursor("relay", b"41").unwrap();
        store.flush().unwrap();
        store.set_cursor("relay", b"42").unwrap();
        kv.crash();
        let store = open(&kv);
        assert_eq!(store.cursor("relay").unwrap().as_deref(), Some(&b"41"[..]));
    }

    #[test]
    fn log_entries_written_before_conflicts_were_counted_still_read() {
        use ferry_proto::{Direction, SyncOutcome};
        let old = postcard::to_stdvec(&(
            3u64,
            1_000u64,
            Direction::Download,
            5u64,
            SyncOutcome::Success,
            None::<String>,
            None::<String>,
            "dev".to_owned(),
        ))
        .unwrap();
        let entry = decode_log_entry(&old).unwrap();
        assert_eq!(
            (entry.id, entry.records_processed, entry.conflicts),
            (3, 5, 0)
        );
        assert!(decode_log_entry(&old[..old.len() - 1]).is_err());
    }

    #[test]
    fn a_store_belongs_to_one_device() {
        let kv = MemoryKv::new();
        drop(open(&kv));
        let other = Store::open(
            Box::new(kv),
            "ffffffffffffffffffffffffffffffff",
            StoreOptions::default(),
            Arc::new(SystemClock),
        );
        assert!(matches!(other, Err(StoreError::WrongDevice { .. })));
    }

    fn note(id: &str, n: u64) -> Write {
        Write::Put {
            collection: "Note".into(),
            id: Some(id.into()),
            fields: fields(serde_json::json!({ "n": n })),
        }
    }

    /// Puts prepared as creating new records while a batch applied meanwhile created one of
    /// them: that one takes its put on top of what it holds (both changes kept, one history),
    /// the others are created as prepared.
    #[test]
    fn a_record_created_after_its_put_was_prepared_takes_the_put_on_top() {
        let store = open(&MemoryKv::default());
        let prepared = store.prepare_writes((0..6).map(|n| note(&format!("n{n}"), n)).collect());
        assert_eq!(
            prepared.fresh.len(),
            6,
            "every record was new when prepared"
        );
        store.write(note("n0", 100)).unwrap();
        let applied = store.write_prepared(prepared).unwrap();
        assert_eq!(applied.len(), 6);
        let view = store.get("Note", "n0").unwrap();
        assert_eq!(view.fields.get("n"), Some(serde_json::json!(0)));
        assert_eq!(view.heads.len(), 1);
        assert_eq!(store.history("Note", "n0").unwrap().len(), 2);
        for n in 1..6 {
            let id = format!("n{n}");
            assert_eq!(
                store.get("Note", &id).unwrap().fields.get("n"),
                Some(serde_json::json!(n))
            );
            assert_eq!(store.history("Note", &id).unwrap().len(), 1);
        }
    }

    mod encoded_first_change {
        use super::*;
        use proptest::prelude::*;

        fn scalar_or_nested() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::Bool),
                any::<i64>().prop_map(|i| serde_json::json!(i)),
                any::<u64>().prop_map(|u| serde_json::json!(u)),
                (-1e6f64..1e6).prop_map(|f| serde_json::json!(f)),
                ".{0,12}".prop_map(serde_json::Value::String),
                Just(serde_json::json!({"nested": [1, "two"]})),
            ]
        }

        proptest! {
            /// A new record staged from its directly encoded first change holds exactly what
            /// Automerge's build of the same put holds (change, document, view, heads), under
            /// every strategy; fields Automerge must build (text, nested) still build.
            #[test]
            fn equals_automerges_build_of_the_same_put(
                entries in proptest::collection::vec(("[a-e]{1,3}", scalar_or_nested()), 0..12),
                strategy in 0usize..3,
                text in proptest::option::of("[a-e]{1,3}"),
            ) {
                let strategy = [
                    resolve::Strategy::Merge,
                    resolve::Strategy::Lww,
                    resolve::Strategy::Manual,
                ][strategy];
                let mut policy = resolve::Policy::of(strategy);
                policy.text = Arc::new(text.into_iter().collect());
                let mut options = StoreOptions::default();
                options.policies.collections.insert("Note".into(), policy.clone());
                let store = Store::open(
                    Box::new(MemoryKv::default()),
                    DEVICE,
                    options,
                    Arc::new(SystemClock),
                )
                .unwrap();
                let fields: Fields = entries.into_iter().collect();
                let key = ("Note".to_owned(), "n1".to_owned());
                let put = Resolved {
                    key: key.clone(),
                    change: Change::Put(fields.clone()),
                    base: None,
                };
                let limits = &store.options.limits;
                let mut built = store.build_new(&put, 1_765_000_000_000, limits).unwrap();
                // A first change the encoder wrote has the short form its view implies.
                let short = built.short.take();
                let by_encoder = fields.iter().all(|(name, value)| {
                    !value.is_object() && !value.is_array() && !policy.text.contains(name)
                });
                prop_assert_eq!(short.is_some(), by_encoder);
                if let (Some(short), Some(view), Some((_, _, document))) =
                    (&short, &built.view, &built.written)
                {
                    prop_assert_eq!(implied::expand(short, view), Some(document.clone()));
                }
                let mut record = store.new_record("Note");
                let by_automerge = mutate(
                    &mut record,
                    &key,
                    Change::Put(fields),
                    1_765_000_000_000,
                    limits,
                    &policy,
                    &store.options.keyring,
                )
                .unwrap();
                prop_assert_eq!(built, by_automerge);
            }
        }
    }
}
