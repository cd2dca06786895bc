//! The relay's change logs and documents: per space, a totally ordered change log and every
//! record's document.
//!
//! Owns: appending uploaded changes (validation, deduplication by change hash, the
//! causal-closure rule, sequence numbers, one atomic commit per call), reading the log,
//! materialising documents on demand into a bounded cache, and counting the conflicts changes
//! bring as they meet in the log. What is kept, and how, is `relay::storage`'s: this module
//! stages each append and hands it over as one [`Append`], staged against the head it read.
//!
//! Validation: a change is logged only if it is written under the uploader's own actor (its
//! device id; the web actor's for the relay's HTTP writes), its sequence number is exactly one
//! more than that actor's last on the record (no gap, no reuse), and it applies to the record's
//! document (the relay's own copy, kept current in the cache; a new record's first change is
//! checked on its own, `Record::check_first`) without error or panic, leaving a document that
//! loads again once saved (`Record::apply_reloadable`). So every logged change can be applied by
//! every device, in log order, and the documents it makes can be stored. A refused change is answered
//! `Rejected{InvalidChange}` (kind `validation`) with the reason as its message; nothing of it is
//! written, and a later change of the same upload built on it is refused with that reason.
//!
//! Conflicts: as each change is logged, the relay meets it with the changes logged before it,
//! as every device does when it applies the log, through the same detection and the same
//! ledger (`resolve::ledger`) under its config's collection policies; it keeps the entries (open,
//! auto-resolved, resolved when a resolution is logged), the unique-value index and the counts in
//! the same commit as the change. So the relay lists the conflicts devices hold, under the same
//! ids, without replaying anything (the HTTP web actor's views). It is cheap by design: a change
//! whose dependencies are exactly the record's logged heads (a fast-forward, the common case)
//! conflicts with nothing, and is looked at only if its message makes it a resolution.
//!
//! What a record keeps: a base (a saved document, or its first change as it is), a tail (the
//! seqs of the changes logged since, whose bytes are in the log; once `compact_after` of them
//! pile up the document is saved as the new base, so appending never re-saves a whole document
//! per change), and its logged heads from its second change on (a record with one change has it
//! as its only head, so an initial upload of many records stores none; records logged before
//! heads were kept have their heads read from their document the first time they are needed).
//!
//! Storage other relays append to too (`LogStorage::shared`): a cached document is trusted only
//! at the head the cache last saw; before a space's cached documents are read, those of records
//! logged since by others are dropped, and an append refused because another relay committed
//! first is staged again, as is one that commits nothing (every change refused) when the log
//! moved while it was staged. On embedded storage none of this reads anything.
//!
//! Must not touch: the network, sessions or authentication (the caller has decided that `origin`
//! may write to `space`), the device's store, and storage keys or engines.

use crate::clock::{Clock, SystemClock};
use crate::record::first_change;
use crate::record::{
    FLATTEN_OPERATION, Fields, PlainFirst, Record, RecordError, decode_change, operation_of,
};
use crate::relay::created::{CreatedRow, CreatedRows};
use crate::relay::recent::RecentLogs;
use crate::relay::storage::{
    Append, ChangeKey, Compaction, Flattened, LogCompaction, LogStorage, LoggedChange, RecordKey,
    StorageError, Tombstone, UniqueValue,
};
use crate::resolve::ledger::{
    ConflictState, Counter, EncodeError, HeldValues, Holders, Ledger, UniqueCheck,
};
use crate::resolve::{
    self, Conflict, ConflictKind, ConflictStatus, LogPosition, Policies, Policy, Side,
};
use automerge::{ActorId, Change, ChangeHash};
use ferry_proto::wire::{
    ChangeOutcome, ChangeResult, ErrorCode, HeadsHasher, IndexPosition, IndexValue, LogEntry,
    RecordName, SnapshotPage, SnapshotRecord, UniqueHolders, UniqueIndexPage, UploadChange,
};
use ferry_proto::{AddressError, Limits, validate_collection, validate_record_id};
use lru::LruCache;
use parking_lot::FairMutex;
use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use crate::relay::storage::RelayConflictCount;

#[derive(Debug, thiserror::Error)]
pub enum RelayStoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    InvalidSpace(String),
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error("the stored document cannot be loaded: {0}")]
    Record(#[from] RecordError),
    #[error(
        "the space's log holds no change of {collection}/{record}: there is nothing to rebuild"
    )]
    NoSuchRecord { collection: String, record: String },
    #[error(
        "{collection}/{record} cannot be rebuilt from the log: its first change (seq {first}) was \
         compacted away (the log starts after seq {horizon}), so only its stored document held \
         it. Restore the relay's data directory from a backup; the devices that synced the \
         record still hold it whole"
    )]
    Compacted {
        collection: String,
        record: String,
        first: u64,
        horizon: u64,
    },
    #[error("{collection}/{record} cannot be rebuilt from the log: {reason}")]
    Unrebuildable {
        collection: String,
        record: String,
        reason: String,
    },
}

#[derive(Clone)]
pub struct RelayStoreOptions {
    /// How many documents stay loaded in memory.
    pub doc_cache_docs: usize,
    /// Appended changes per record after which its document is saved as a new base.
    pub compact_after: usize,
    pub limits: Limits,
    /// Each collection's conflict policy (the relay config's `[collections]`): the strategy and
    /// delete rule detection classifies under, and the unique constraints checked as changes
    /// are logged.
    pub policies: Policies,
    /// What a change that leaves its record deleted is timed by, for `tombstone_days`.
    pub clock: Arc<dyn Clock>,
}

impl Default for RelayStoreOptions {
    fn default() -> Self {
        RelayStoreOptions {
            doc_cache_docs: 1024,
            compact_after: 32,
            limits: Limits::default(),
            policies: Policies::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for RelayStoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayStoreOptions")
            .field("doc_cache_docs", &self.doc_cache_docs)
            .field("compact_after", &self.compact_after)
            .field("limits", &self.limits)
            .field("policies", &self.policies)
            .finish_non_exhaustive()
    }
}

pub use ferry_proto::session::LogSlice;

/// How much of a space's log the relay keeps (the relay config's `keep_log_days` and
/// `keep_log_entries`; 0: no bound). An entry is kept while it is both younger than
/// `keep_log_days` and among the last `keep_log_entries`; the rest, once the records' bases hold
/// them, is dropped (PROTOCOL.md, section 5.8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogRetention {
    pub keep_log_days: u64,
    pub keep_log_entries: u64,
    /// A record whose every logged change falls below the horizon has its history started
    /// again as one flatten change instead of its whole document being kept as its base
    /// (`relay.flatten_history`, PROTOCOL.md section 5.8).
    pub flatten_history: bool,
}

/// How often, at most, a space's head is noted with the time (what `keep_log_days` is measured
/// by): an entry is dropped by age at most this much later than it could be.
const TIME_MARK_EVERY_MS: u64 = 3_600_000;

const DAY_MS: u64 = 86_400_000;

/// Records whose bases one compaction step saves.
const BASES_PER_STEP: usize = 256;
/// Records the sweep for histories to flatten looks at in one compaction pass: a larger space
/// is swept over several passes.
const FLATTEN_SCAN: usize = 100_000;

/// Tombstone notes one purge step looks at.
const PURGES_PER_STEP: usize = 256;

/// What one compaction of a space did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogCompacted {
    /// The space's horizon now.
    pub horizon: u64,
    /// Records whose documents were saved as their bases so that the entries could go.
    pub bases_saved: usize,
    /// Records whose history was started again as one flatten change.
    pub flattened: usize,
    /// The space's log bytes (its quota) before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

type DocKey = (String, String, String);

/// What a rebuild of a record's document from the log did (`RelayStore::rebuild_record`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordRebuilt {
    pub space: String,
    pub collection: String,
    pub record: String,
    /// The log entries the document was rebuilt from: how many, the first and the last seq.
    pub changes: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The rebuilt document's heads (hex): the record's logged heads.
    pub heads: Vec<String>,
    /// The record's conflict entries, read back whole.
    pub conflicts: usize,
    /// The space's conflict entries were damaged too and were rebuilt from its whole log.
    pub conflicts_rebuilt: bool,
}

/// A digest of a range of a space's records' logged heads (see `ferry_proto::wire::HeadsHasher`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadsPage {
    /// The log's head the digest is as of.
    pub head: u64,
    pub records: u32,
    /// The last record digested.
    pub last: Option<RecordName>,
    /// No record follows `last`.
    pub complete: bool,
    pub digest: [u8; 32],
}

/// What one `append` call has staged so far, so later changes of the call see earlier ones.
struct Staging {
    /// What the call will commit.
    append: Append,
    /// Changes stored earlier in this call, by record and hash, with their seq.
    added: HashMap<ChangeKey, u64>,
    /// The dedup index's answer, read before staging, for every change of the call and each of
    /// its dependencies: those logged before the call, with their seq.
    logged: HashMap<ChangeKey, u64>,
    /// The tails of the call's records that the space held before the call, read before
    /// staging; a record not in it (nor in `tails`) is new.
    held: HashMap<RecordKey, Vec<u64>>,
    /// Changes refused in this call for what they are (not for a missing dependency), by
    /// record and hash, with the reason: a later change of the call built on one is refused too.
    refused: HashMap<ChangeKey, String>,
    /// Records touched in this call, with their tail seqs, this call's included.
    tails: HashMap<RecordKey, Vec<u64>>,
    /// Documents of the records this call touched, kept current with its stored changes.
    docs: HashMap<RecordKey, Record>,
    /// Conflict entries, the unique index and the counts, as this call's changes move them.
    ledger: Ledger,
    /// Records this call creates with a plain first change, by the seq of that change's entry,
    /// with the change's time (for `CreatedRows`, when the relay keeps them).
    created_plain: Vec<(u64, RecordKey, PlainFirst, i64)>,
}

impl Staging {
    fn new(head: u64) -> Self {
        Staging {
            append: Append::new(head),
            added: HashMap::new(),
            logged: HashMap::new(),
            held: HashMap::new(),
            refused: HashMap::new(),
            tails: HashMap::new(),
            docs: HashMap::new(),
            ledger: Ledger::default(),
            created_plain: Vec::new(),
        }
    }
}

/// What this relay knows of a space, kept under the space's lock.
#[derive(Default)]
struct SpaceState {
    /// With storage other relays share: the head the space's cached documents are known to be
    /// current at (`None`: not known yet, so none of them is trusted).
    cached_at: Option<u64>,
    /// Appends left to hold the space from their first staging: other relays were found
    /// appending to it (see `CONTENDED_APPENDS`).
    contended: u32,
    /// Where the sweep for histories to flatten stopped (`flatten_settled`).
    flatten_after: Option<RecordName>,
}

/// Log entries another relay appended that a catch-up reads to find the records whose cached
/// documents they made stale; past this many it drops the space's documents instead.
const CATCH_UP_ENTRIES: u64 = 4096;

/// Times an append is staged again when another relay moved the space's head meanwhile, before
/// the upload is answered with the error (and the device sends it again). Each time means
/// another relay committed, so only a space many relays append to at full speed reaches it.
pub const RESTAGES: usize = 32;

/// Appends to a space held from their first staging (`LogStorage::hold_space`) after one that
/// had to be staged again, before one tries without.
const CONTENDED_APPENDS: u32 = 16;

/// A space this relay holds, released when dropped (on every return of the append).
struct HeldSpace<'s> {
    storage: &'s dyn LogStorage,
    space: &'s str,
}

impl<'s> HeldSpace<'s> {
    /// Holds the space; `None` when the engine has nothing to hold or holding it failed (the
    /// append is staged again all the same).
    fn take(storage: &'s dyn LogStorage, space: &'s str) -> Option<Self> {
        match storage.hold_space(space) {
            Ok(true) => Some(HeldSpace { storage, space }),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(space, error = %e, "cannot hold the space; staging again without");
                None
            }
        }
    }
}

impl Drop for HeldSpace<'_> {
    fn drop(&mut self) {
        self.storage.release_space(self.space);
    }
}

/// Records a snapshot page reads from storage at once: one round trip each for their bases,
/// tails and conflict entries, and no more read than a page of large records can hold.
const SNAPSHOT_READ_AHEAD: usize = 128;

/// What `snapshot_record` needs of some records, read for all of them at once.
#[derive(Default)]
struct RecordParts {
    /// The records read, whatever they hold.
    read: std::collections::HashSet<RecordKey>,
    bases: HashMap<RecordKey, Vec<u8>>,
    tails: HashMap<RecordKey, Vec<u64>>,
    conflicts: HashMap<RecordKey, Vec<Conflict>>,
}

pub struct RelayStore {
    storage: Arc<dyn LogStorage>,
    /// Other relays append to the same storage (`LogStorage::shared`): the space's head is
    /// checked against what the cache saw before a cached document is trusted.
    shared: bool,
    options: RelayStoreOptions,
    /// The actor of the relay's documents, and of the flatten changes it writes.
    actor: ActorId,
    /// Each space's lock: appends to a space are staged one at a time, and a document is not
    /// read between an append's commit and its cache update. Fair: handed to callers in the
    /// order they asked, so that a device's upload waits behind the others once each rather than
    /// behind whichever keeps winning the race.
    spaces: Mutex<HashMap<String, Arc<FairMutex<SpaceState>>>>,
    cache: Mutex<LruCache<DocKey, Record>>,
    /// The newest entries appended through this store, which live readers ask for next.
    recent: RecentLogs,
    /// Documents read from storage (base and tail) since the store was opened.
    docs_loaded: AtomicU64,
    /// Where the rows of records created with a plain first change go, for the `records`
    /// materializer (PostgreSQL storage only).
    created: Option<Arc<CreatedRows>>,
    /// Conflicts found in appended changes since the store was opened, in `ConflictKind::ALL`
    /// order (the per-space counters in storage are the durable record).
    conflicts_found: [AtomicU64; ConflictKind::ALL.len()],
}

impl RelayStore {
    pub fn open(storage: Arc<dyn LogStorage>, options: RelayStoreOptions) -> Self {
        let capacity = NonZeroUsize::new(options.doc_cache_docs).unwrap_or(NonZeroUsize::MIN);
        RelayStore {
            shared: storage.shared(),
            storage,
            options,
            actor: ActorId::from(&[0u8; 16][..]),
            spaces: Mutex::new(HashMap::new()),
            cache: Mutex::new(LruCache::new(capacity)),
            recent: RecentLogs::default(),
            docs_loaded: AtomicU64::new(0),
            conflicts_found: Default::default(),
            created: None,
        }
    }

    /// Hands the rows of the records this store's appends create with a plain first change to
    /// `rows`, once committed (see `CreatedRows`).
    pub fn hand_created_to(mut self, rows: Arc<CreatedRows>) -> Self {
        self.created = Some(rows);
        self
    }

    /// The space's lock.
    fn space(&self, space: &str) -> Result<Arc<FairMutex<SpaceState>>, RelayStoreError> {
        check_space(space)?;
        let mut spaces = lock(&self.spaces);
        Ok(spaces.entry(space.to_owned()).or_default().clone())
    }

    /// Before cached documents of the space are read (under its lock): with shared storage,
    /// those of records other relays appended to since the cache last saw the head are dropped,
    /// so that they are read again. Embedded storage has no other writer: nothing is read.
    fn current(&self, space: &str, state: &mut SpaceState) -> Result<(), RelayStoreError> {
        if self.shared {
            let head = self.storage.head(space)?;
            self.catch_up(space, state, head)?;
        }
        Ok(())
    }

    /// `current` with the head already read under the space's lock: the cached documents of
    /// the records logged between what the cache saw and `head` are dropped (all of the
    /// space's when that is too many to read, partly compacted away, or the log went back).
    fn catch_up(
        &self,
        space: &str,
        state: &mut SpaceState,
        head: u64,
    ) -> Result<(), RelayStoreError> {
        if !self.shared || state.cached_at == Some(head) {
            return Ok(());
        }
        let moved = match state.cached_at {
            Some(at) if at < head && head - at <= CATCH_UP_ENTRIES => {
                self.records_logged(space, at, head)?
            }
            _ => None,
        };
        let mut cache = lock(&self.cache);
        match moved {
            Some(records) => {
                for (collection, record) in records {
                    cache.pop(&(space.to_owned(), collection, record));
                }
            }
            None => {
                let stale: Vec<DocKey> = cache
                    .iter()
                    .filter(|(key, _)| key.0 == space)
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in stale {
                    cache.pop(&key);
                }
            }
        }
        drop(cache);
        if state.cached_at.is_some_and(|at| at > head) {
            // The database went back (restored, or failed over to a replica that missed
            // commits): seqs this relay remembers may now name other entries.
            self.recent.forget(space);
        }
        state.cached_at = Some(head);
        Ok(())
    }

    /// The records of the log entries in (`after`, `through`]; `None` when some of them are
    /// no longer in the log (compacted away meanwhile).
    fn records_logged(
        &self,
        space: &str,
        after: u64,
        through: u64,
    ) -> Result<Option<BTreeSet<RecordKey>>, RelayStoreError> {
        let mut records = BTreeSet::new();
        let mut at = after;
        while at < through {
            let entries = self.storage.read_log(space, at, 1024, 4 << 20)?;
            if entries
                .first()
                .is_none_or(|e| Some(e.seq) != at.checked_add(1))
            {
                return Ok(None);
            }
            for entry in entries {
                if entry.seq > through {
                    break;
                }
                at = entry.seq;
                records.insert((entry.collection, entry.record));
            }
        }
        Ok(Some(records))
    }

    /// Makes everything appended durable (`append` already does before it returns).
    pub fn flush(&self) -> Result<(), RelayStoreError> {
        Ok(self.storage.flush()?)
    }

    /// The last seq of the space's log (0 when empty).
    pub fn head(&self, space: &str) -> Result<u64, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.head(space)?)
    }

    /// Appends uploaded changes to the space's log, in order, and answers each. The whole call is
    /// one atomic commit, durable before returning: a `Stored` answer is durable. A change whose
    /// dependencies are not in the log (for its record) nor earlier in this call is refused with
    /// `MissingDependencies`, so a device reading the log in order can always apply it. When the
    /// log moved on while the call was staged (another relay appended to the space), nothing is
    /// written and the call fails with `StorageError::HeadMoved`: the upload is answered with an
    /// error and sent again.
    pub fn append(
        &self,
        space: &str,
        origin: &str,
        changes: &[UploadChange],
    ) -> Result<Vec<ChangeResult>, RelayStoreError> {
        self.append_importing(space, origin, changes, &|_| false)
    }

    /// `append`, where a change under an actor other than `origin`'s is logged too when
    /// `imported` says the actor is no device's (nor the web actor's): a change of an Automerge
    /// document made elsewhere, which a device of the space brings in with its history
    /// (`ferry import --format automerge`). Every other rule holds for it.
    pub fn append_importing(
        &self,
        space: &str,
        origin: &str,
        changes: &[UploadChange],
        imported: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<ChangeResult>, RelayStoreError> {
        let state = self.space(space)?;
        let mut state = state.lock();
        let mut restaged = 0;
        let mut held: Option<HeldSpace<'_>> = None;
        let contended = state.contended > 0;
        loop {
            // While other relays append to the space too, staging is done with their commits
            // held off, so that it commits: staging again and again, each time lost to another
            // relay's commit, would waste the work and could end in an error.
            if held.is_none() && (contended || restaged > 0) {
                held = HeldSpace::take(self.storage.as_ref(), space);
            }
            match self.append_once(space, origin, changes, imported, &mut state) {
                // Another relay appended to the space while this call was staged: staged again
                // on what it logged.
                Err(RelayStoreError::Storage(StorageError::HeadMoved { .. }))
                    if restaged < RESTAGES =>
                {
                    restaged += 1;
                }
                done => {
                    state.contended = if restaged > 0 {
                        CONTENDED_APPENDS
                    } else {
                        state.contended.saturating_sub(1)
                    };
                    return done;
                }
            }
        }
    }

    /// One staging and commit of `append`, under the space's lock.
    fn append_once(
        &self,
        space: &str,
        origin: &str,
        changes: &[UploadChange],
        imported: &dyn Fn(&str) -> bool,
        state: &mut SpaceState,
    ) -> Result<Vec<ChangeResult>, RelayStoreError> {
        let head = self.storage.head(space)?;
        self.catch_up(space, state, head)?;
        let mut staging = Staging::new(head);
        // A new space's conflict state is complete from its first change on.
        staging.append.conflicts_complete = head == 0;
        let decoded = self.look_up(space, changes, &mut staging)?;
        let mut results = Vec::with_capacity(changes.len());
        for (upload, change) in changes.iter().zip(decoded) {
            let outcome = self.stage(space, origin, imported, upload, change, &mut staging)?;
            results.push(ChangeResult {
                entry: upload.entry,
                outcome,
            });
        }
        for ((collection, record), tail) in &staging.tails {
            if tail.len() >= self.options.compact_after.max(1) {
                let loaded = staging.docs.get_mut(&(collection.clone(), record.clone()));
                match self.compact(space, collection, record, tail, loaded, &staging.append) {
                    Ok(base) => staging.append.compactions.push(Compaction {
                        record: (collection.clone(), record.clone()),
                        base,
                        tail: tail.clone(),
                    }),
                    // The changes are in the log either way; the record keeps its tail and is
                    // tried again on its next append.
                    Err(RelayStoreError::Record(e)) => {
                        tracing::warn!(space, collection, record, error = %e, "compaction failed");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let ledger = std::mem::take(&mut staging.ledger);
        let found = ledger_into_append(space, &ledger, &mut staging.append);
        staging.append.conflicts.clone_from(&found);
        {
            // A touched record's document comes back below from `staging.docs`, which holds every
            // change of this call; one dropped after a failed apply, or after a failed commit, is
            // read again when needed.
            let mut cache = lock(&self.cache);
            for (collection, record) in staging.tails.keys() {
                cache.pop(&(space.to_owned(), collection.clone(), record.clone()));
            }
        }
        if staging.append.entries.is_empty() && staging.append.compactions.is_empty() {
            // Nothing to commit, so no commit can find the log moved: a refusal staged against
            // a document this relay cached while another relay appended the change it depends
            // on (already in the dedup index) would be final. Staged again on what is logged.
            if self.shared {
                let now = self.storage.head(space)?;
                if now != head {
                    return Err(StorageError::HeadMoved {
                        staged: head,
                        head: now,
                    }
                    .into());
                }
            }
            return Ok(results);
        }
        let committed: Vec<LogEntry> = (staging.append.after.saturating_add(1)..)
            .zip(&staging.append.entries)
            .map(|(seq, entry)| LogEntry {
                seq,
                collection: entry.collection.clone(),
                record: entry.record.clone(),
                change: entry.change.clone(),
            })
            .collect();
        let new_head = head.saturating_add(committed.len() as u64);
        self.storage.append(space, staging.append)?;
        self.recent.committed(space, committed);
        if let Some(created) = &self.created {
            created.committed(space, created_rows(staging.created_plain));
        }
        if self.shared {
            state.cached_at = Some(new_head);
        }
        // Validation loaded every document the call touched, each holding what storage now
        // holds: they stay cached for the next change to the same records.
        let mut cache = lock(&self.cache);
        for ((collection, record), doc) in staging.docs {
            cache.put((space.to_owned(), collection, record), doc);
        }
        drop(cache);
        for (kind, _, found) in found {
            if let Some(i) = ConflictKind::ALL.iter().position(|k| *k == kind)
                && let Some(counter) = self.conflicts_found.get(i)
            {
                counter.fetch_add(found, Ordering::Relaxed);
            }
        }
        Ok(results)
    }

    /// Decodes the call's changes and reads, in one go each, what staging them asks storage
    /// (the dedup index for every change and dependency, the tails of the records the space
    /// holds) into `staging`: one round trip each instead of several per change, which is what
    /// an engine behind a network costs. Returns each change decoded, or why it is refused.
    fn look_up(
        &self,
        space: &str,
        changes: &[UploadChange],
        staging: &mut Staging,
    ) -> Result<Vec<Result<Change, String>>, RelayStoreError> {
        let limits = &self.options.limits;
        let mut keys: Vec<ChangeKey> = Vec::new();
        let mut records: BTreeSet<RecordKey> = BTreeSet::new();
        let decoded = changes
            .iter()
            .map(|upload| {
                validate_collection(&upload.collection, limits)
                    .and_then(|()| validate_record_id(&upload.record, limits))
                    .map_err(|e| e.to_string())?;
                let change = decode_change(&upload.change).map_err(|e| e.to_string())?;
                let key = |hash: [u8; 32]| (upload.collection.clone(), upload.record.clone(), hash);
                keys.push(key(change.hash().0));
                keys.extend(change.deps().iter().map(|dep| key(dep.0)));
                records.insert((upload.collection.clone(), upload.record.clone()));
                Ok(change)
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        staging.logged = self.storage.change_seqs(space, &keys)?;
        let records: Vec<RecordKey> = records.into_iter().collect();
        staging.held = self.storage.tails_of(space, &records)?;
        Ok(decoded)
    }

    fn stage(
        &self,
        space: &str,
        origin: &str,
        imported: &dyn Fn(&str) -> bool,
        upload: &UploadChange,
        change: Result<Change, String>,
        staging: &mut Staging,
    ) -> Result<ChangeOutcome, RelayStoreError> {
        let rejected = |code: ErrorCode, message: String| ChangeOutcome::Rejected { code, message };
        let change = match change {
            Ok(c) => c,
            Err(reason) => return Ok(rejected(ErrorCode::InvalidChange, reason)),
        };
        // A device writes every change under its own actor (its device id), so a change under
        // another device's actor is someone else's change passed off as the uploader's, or a
        // change its author never uploaded: either way not the uploader's to log. An actor that
        // is no device's wrote an imported document.
        let actor = change.actor_id().to_hex_string();
        if actor != origin && !imported(&actor) {
            return Ok(rejected(
                ErrorCode::InvalidChange,
                format!(
                    "the change is written under actor {actor}, not under the \
                     uploading device's own ({origin}): a device uploads only its own changes"
                ),
            ));
        }
        // Changes are identified per record: two records can hold byte-identical changes (the
        // same device creating both with the same fields in the same millisecond), and each
        // record's document needs its own.
        let (collection, record) = (upload.collection.as_str(), upload.record.as_str());
        let change_key = |hash: [u8; 32]| (collection.to_owned(), record.to_owned(), hash);
        let hash = change.hash().0;
        if let Some(seq) = staging.added.get(&change_key(hash)) {
            return Ok(ChangeOutcome::Duplicate { seq: *seq });
        }
        if let Some(seq) = staging.logged.get(&change_key(hash)) {
            return Ok(ChangeOutcome::Duplicate { seq: *seq });
        }
        let refuse = |staging: &mut Staging, reason: String| {
            staging.refused.insert(change_key(hash), reason.clone());
            Ok(rejected(ErrorCode::InvalidChange, reason))
        };
        if operation_of(change.message()) == FLATTEN_OPERATION {
            let reason = format!(
                "the change names the operation {FLATTEN_OPERATION:?}, which only the relay \
                 writes: write the record with put, patch or delete"
            );
            return refuse(staging, reason);
        }
        for dep in change.deps() {
            if let Some(reason) = staging.refused.get(&change_key(dep.0)) {
                let reason =
                    format!("the change depends on {dep}, refused in this upload ({reason})");
                return refuse(staging, reason);
            }
            let held = staging.added.contains_key(&change_key(dep.0))
                || staging.logged.contains_key(&change_key(dep.0));
            if !held {
                return Ok(rejected(
                    ErrorCode::MissingDependencies,
                    format!(
                        "the change depends on {dep}, which the relay does not hold for \
                         {collection}/{record}"
                    ),
                ));
            }
        }
        let record_key = (upload.collection.clone(), upload.record.clone());
        let stamp = (change.hash(), change.timestamp());
        let new_record = match staging.tails.get(&record_key) {
            Some(_) => false,
            None => match staging.held.remove(&record_key) {
                Some(tail) => {
                    staging.tails.insert(record_key.clone(), tail);
                    false
                }
                None => true,
            },
        };
        let seq = staging.append.next_seq();
        let refused_for =
            |e: RecordError| format!("the change cannot be applied to {collection}/{record}: {e}");
        if new_record {
            // A new record's first change is its base, as it is: no tail needed. It has no
            // dependencies (none can be held yet), so it meets nothing. Its document is not
            // kept: loading it again from its base costs no more than keeping it would.
            if (change.seq() != 1 || !change.deps().is_empty())
                && let Some(purged) = self.storage.purged_at(space, collection, record)?
            {
                return Ok(record_purged(collection, record, purged));
            }
            if change.seq() != 1 {
                let reason = sequence_refusal(collection, record, change.seq(), 0);
                return refuse(staging, reason);
            }
            // A plain first change applies as it is (`Record::check_first` checks it by this
            // same shape): its fields are decoded once, here, by hand when it is laid out as a
            // device writes one.
            let plain = first_change::decode(&upload.change)
                .map(|first| first.plain)
                .or_else(|| PlainFirst::of(&change));
            let deleted = plain.as_ref().is_some_and(|first| first.deleted);
            let restored = resolve::is_restoration(change.message()).then(|| change.clone());
            if plain.is_none()
                && let Err(e) = Record::check_first(change)
            {
                return refuse(staging, refused_for(e));
            }
            // A purged record written again: its first change brings the conflict every device
            // finds when it meets it.
            let detection = match restored {
                Some(change) => {
                    let mut doc = Record::new(&self.actor);
                    if let Err(e) = doc.apply_reloadable(vec![change.clone()]) {
                        return refuse(staging, refused_for(e));
                    }
                    let at = LogPosition {
                        seq,
                        collection,
                        record,
                    };
                    detection(&mut doc, &change, &[], at, self.policy(collection))
                }
                None => None,
            };
            staging
                .append
                .created
                .insert(record_key.clone(), upload.change.clone());
            if let Some(plain) = plain.filter(|_| self.created.is_some()) {
                staging
                    .created_plain
                    .push((seq, record_key.clone(), plain, stamp.1));
            }
            staging.tails.insert(record_key.clone(), Vec::new());
            if let Some(detection) = detection {
                let state = SpaceConflicts {
                    storage: self.storage.as_ref(),
                    space,
                };
                staging.ledger.meet(&state, detection)?;
            }
            if deleted {
                self.note_tombstone(seq, &record_key, vec![hash], staging);
            }
            log(origin, upload, seq, hash, staging);
            self.check_unique(space, seq, &record_key, stamp, staging)?;
            return Ok(ChangeOutcome::Stored { seq });
        }
        let mut doc = match staging.docs.remove(&record_key) {
            Some(doc) => doc,
            None => self.record_doc(space, &record_key, staging)?,
        };
        let last = match doc.last_seq_of(change.actor_id()) {
            Ok(last) => last,
            // The document is dropped, not put back: the next change loads it again.
            Err(e) => return refuse(staging, refused_for(e)),
        };
        if change.seq() != last + 1 {
            staging.docs.insert(record_key, doc);
            if let Some(purged) = self.purged_dependency(space, collection, record, &change)? {
                return Ok(record_purged(collection, record, purged));
            }
            let reason = sequence_refusal(collection, record, change.seq(), last);
            return refuse(staging, reason);
        }
        // Applied on the relay's own copy of the document before anything is logged, so that
        // every logged change is one every device can apply and keep: the document it leaves
        // must load again once saved (`Record::apply_reloadable`).
        let before = doc.heads();
        if let Err(e) = doc.apply_reloadable(vec![change.clone()]) {
            // A document left empty is dropped, not put back: the next change loads it again.
            if !e.needs_reload() {
                staging.docs.insert(record_key, doc);
            }
            if let Some(purged) = self.purged_dependency(space, collection, record, &change)? {
                return Ok(record_purged(collection, record, purged));
            }
            return refuse(staging, refused_for(e));
        }
        let met = self.meet(space, seq, &record_key, &change, before, &mut doc, staging);
        if doc.is_deleted() {
            let heads = doc.heads().iter().map(|h| h.0).collect();
            self.note_tombstone(seq, &record_key, heads, staging);
        }
        staging.docs.insert(record_key.clone(), doc);
        met?;
        log(origin, upload, seq, hash, staging);
        staging.append.tails.push((record_key.clone(), seq));
        if let Some(tail) = staging.tails.get_mut(&record_key) {
            tail.push(seq);
        }
        self.check_unique(space, seq, &record_key, stamp, staging)?;
        Ok(ChangeOutcome::Stored { seq })
    }

    fn policy(&self, collection: &str) -> &Policy {
        self.options.policies.of(collection)
    }

    /// Notes that the change at `seq` left the record deleted, for `purge_tombstones`.
    fn note_tombstone(
        &self,
        seq: u64,
        (collection, record): &RecordKey,
        heads: Vec<[u8; 32]>,
        staging: &mut Staging,
    ) {
        staging.append.tombstones.push(Tombstone {
            seq,
            collection: collection.clone(),
            record: record.clone(),
            heads,
            time_ms: self.options.clock.now_ms(),
        });
    }

    /// The seq of the purge entry that ended the history `change` builds on, when it builds on
    /// one: a dependency logged at or before the record's last purge entry.
    fn purged_dependency(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        change: &Change,
    ) -> Result<Option<u64>, RelayStoreError> {
        let Some(purged) = self.storage.purged_at(space, collection, record)? else {
            return Ok(None);
        };
        for dep in change.deps() {
            if self
                .storage
                .change_seq(space, collection, record, &dep.0)?
                .is_some_and(|seq| seq < purged)
            {
                return Ok(Some(purged));
            }
        }
        Ok(None)
    }

    /// For a collection with unique constraints: moves the record's values in the relay's
    /// unique index to what its document (all logged changes, this one included) now holds; a
    /// value another live record already holds is a `unique` conflict, found as devices find it.
    fn check_unique(
        &self,
        space: &str,
        seq: u64,
        record_key: &RecordKey,
        (change, time): (ChangeHash, i64),
        staging: &mut Staging,
    ) -> Result<(), RelayStoreError> {
        let policy = self.options.policies.of(&record_key.0);
        if policy.unique.is_empty() {
            return Ok(());
        }
        let values = {
            let doc = self.staged_doc(space, record_key, staging)?;
            resolve::unique_values(&resolve::view(doc, policy), policy)
        };
        let at = UniqueCheck {
            key: record_key,
            change,
            seq,
            time,
            policy,
        };
        let mut ledger = std::mem::take(&mut staging.ledger);
        let state = SpaceConflicts {
            storage: self.storage.as_ref(),
            space,
        };
        let moved = ledger.move_unique(
            &state,
            at,
            values,
            |_| false,
            |id| {
                let key = (record_key.0.clone(), id.to_owned());
                Ok(logged_side(
                    self.staged_doc(space, &key, staging)?,
                    id,
                    policy,
                ))
            },
        );
        staging.ledger = ledger;
        moved
    }

    /// The record's document as this call has it so far, kept in `staging`.
    fn staged_doc<'s>(
        &self,
        space: &str,
        record_key: &RecordKey,
        staging: &'s mut Staging,
    ) -> Result<&'s mut Record, RelayStoreError> {
        if !staging.docs.contains_key(record_key) {
            let doc = self.record_doc(space, record_key, staging)?;
            staging.docs.insert(record_key.clone(), doc);
        }
        staging
            .docs
            .get_mut(record_key)
            .ok_or_else(|| corrupt("record", format!("{record_key:?} was just loaded")).into())
    }

    /// Meets an existing record's new change, already applied to `doc`, with the changes logged
    /// before it (whose heads are `before`): moves the record's heads, and takes what detection
    /// finds (under the collection's policy, as devices run it) into the ledger. A change built
    /// on exactly the logged heads conflicts with nothing; it is looked at only if it is a
    /// resolution.
    #[allow(clippy::too_many_arguments)]
    fn meet(
        &self,
        space: &str,
        seq: u64,
        record_key: &RecordKey,
        change: &Change,
        before: Vec<ChangeHash>,
        doc: &mut Record,
        staging: &mut Staging,
    ) -> Result<(), RelayStoreError> {
        let (collection, record) = (record_key.0.as_str(), record_key.1.as_str());
        staging.append.heads.insert(
            record_key.clone(),
            doc.heads().iter().map(|h| h.0).collect(),
        );
        let at = LogPosition {
            seq,
            collection,
            record,
        };
        let policy = self.options.policies.of(collection);
        let Some(detection) = detection(doc, change, &before, at, policy) else {
            return Ok(());
        };
        let state = SpaceConflicts {
            storage: self.storage.as_ref(),
            space,
        };
        staging.ledger.meet(&state, detection)
    }

    /// The space's conflict entries in id order after `after`, those with `status` only when
    /// given, up to `limit`.
    pub fn conflicts(
        &self,
        space: &str,
        status: Option<ConflictStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Conflict>, RelayStoreError> {
        check_space(space)?;
        let open_only = status == Some(ConflictStatus::Open);
        let mut out = Vec::new();
        let mut after = after.map(str::to_owned);
        while out.len() < limit {
            let page = self
                .storage
                .conflicts(space, open_only, after.as_deref(), 256)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            out.extend(
                page.into_iter()
                    .filter(|c| status.is_none_or(|s| s == c.status))
                    .take(limit - out.len()),
            );
        }
        Ok(out)
    }

    /// Whether the space's conflict entries cover its whole log: false for a log kept before
    /// the relay kept them, until `rebuild_conflicts` has run.
    pub fn conflicts_complete(&self, space: &str) -> Result<bool, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.head(space)? == 0 || self.storage.conflicts_complete(space)?)
    }

    /// Finds the conflicts of the space's whole log, as devices found them, for a log kept
    /// before the relay kept conflict entries: replays the log in order on fresh documents,
    /// through the same detection and ledger as appends, and writes the entries and the unique
    /// index it finds in one commit (the counts were kept all along). Appends go on meanwhile;
    /// what they log is replayed too before the commit. Returns the conflicts found, or `None`
    /// when `stop` turned true first (checked between pages; nothing is written). Holds every
    /// document of the space in memory while it runs: a one-time cost per space.
    pub fn rebuild_conflicts(
        &self,
        space: &str,
        stop: impl Fn() -> bool,
    ) -> Result<Option<usize>, RelayStoreError> {
        check_space(space)?;
        let mut replay = Replay::default();
        loop {
            let head = self.storage.head(space)?;
            while replay.through < head {
                if stop() {
                    return Ok(None);
                }
                let entries = self
                    .storage
                    .read_log(space, replay.through, 1024, 8 << 20)?;
                let Some(last) = entries.last().map(|e| e.seq) else {
                    break;
                };
                for entry in entries {
                    self.replay(&mut replay, entry)?;
                }
                replay.through = last;
            }
            let mut append = Append::new(replay.through);
            ledger_into_append(space, &replay.ledger, &mut append);
            append.conflicts_complete = true;
            let found = replay.ledger.entries().filter(|(_, found)| *found).count();
            match self.storage.append(space, append) {
                Ok(()) => return Ok(Some(found)),
                Err(StorageError::HeadMoved { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One log entry of a rebuild: applied to its record's document, then met as an append
    /// meets it. An entry that cannot be applied, or leaves a document that does not load again
    /// (a log written before every change was validated), is left out, as devices leave it out.
    fn replay(&self, replay: &mut Replay, entry: LogEntry) -> Result<(), RelayStoreError> {
        let key = (entry.collection, entry.record);
        if entry.change.is_empty() {
            // A purge entry: the record's next change starts a new history.
            replay.docs.remove(&key);
            replay.unreadable.remove(&key);
            return Ok(());
        }
        if replay.unreadable.contains(&key) {
            return Ok(());
        }
        let Ok(change) = decode_change(&entry.change) else {
            return Ok(());
        };
        let policy = self.options.policies.of(&key.0);
        let doc = replay
            .docs
            .entry(key.clone())
            .or_insert_with(|| Record::new(&self.actor));
        let before = doc.heads();
        if let Err(e) = doc.apply_reloadable(vec![change.clone()]) {
            tracing::warn!(collection = key.0, record = key.1, seq = entry.seq, error = %e,
                "a logged change cannot be applied while conflicts are rebuilt: left out");
            if e.needs_reload() {
                // The document may be half-changed: its record's conflicts are not looked for.
                replay.docs.remove(&key);
                replay.unreadable.insert(key);
            }
            return Ok(());
        }
        let at = LogPosition {
            seq: entry.seq,
            collection: &key.0,
            record: &key.1,
        };
        if let Some(detection) = detection(doc, &change, &before, at, policy) {
            replay.ledger.meet(&NoConflicts, detection)?;
        }
        if policy.unique.is_empty() {
            return Ok(());
        }
        let values = resolve::unique_values(&resolve::view(doc, policy), policy);
        let at = UniqueCheck {
            key: &key,
            change: change.hash(),
            seq: entry.seq,
            time: change.timestamp(),
            policy,
        };
        let Replay { docs, ledger, .. } = replay;
        ledger.move_unique(
            &NoConflicts,
            at,
            values,
            |_| false,
            |id| {
                let other = (key.0.clone(), id.to_owned());
                let doc = docs.get_mut(&other).ok_or_else(|| {
                    corrupt(
                        "record",
                        format!("{}/{id} holds a value but was never logged", key.0),
                    )
                })?;
                Ok(logged_side(doc, id, policy))
            },
        )
    }

    /// The actor the space's HTTP writes are made under (see `LogStorage::web_actor`).
    pub fn web_actor(&self, space: &str, candidate: &str) -> Result<String, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.web_actor(space, candidate)?)
    }

    /// One of the space's conflict entries.
    pub fn conflict(&self, space: &str, id: &str) -> Result<Option<Conflict>, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.conflict(space, id)?)
    }

    /// The conflict a logged change (hex hash) brought, if any.
    pub fn change_conflict(
        &self,
        space: &str,
        change: &str,
    ) -> Result<Option<String>, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.change_conflict(space, change)?)
    }

    /// The record's logged heads as stored; for a record with one change (whose heads are not
    /// stored) that change; for a record logged before heads were kept, as its document has
    /// them (read into the cache). Runs under the space's lock.
    fn logged_heads(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Vec<[u8; 32]>, RelayStoreError> {
        if let Some(heads) = self.storage.record_heads(space, collection, record)? {
            return Ok(heads);
        }
        // A base that is one change (not a saved document) is the record's only change: a
        // record with a tail has its heads stored. Hashing the chunk is all that takes, not
        // decoding the change.
        if let Some(first) = self.storage.base_change_hash(space, collection, record)? {
            return Ok(vec![first]);
        }
        Ok(self
            .cached_doc(space, collection, record, |doc| {
                doc.heads().iter().map(|h| h.0).collect()
            })?
            .unwrap_or_default())
    }

    /// The record's document with every change logged so far, this call's staged ones included:
    /// from the cache when it holds it, otherwise loaded from its base and tail.
    fn record_doc(
        &self,
        space: &str,
        record_key: &RecordKey,
        staging: &Staging,
    ) -> Result<Record, RelayStoreError> {
        let (collection, record) = (record_key.0.as_str(), record_key.1.as_str());
        // A record this call has not written to (the other side of a unique clash) has its
        // tail in storage only.
        let stored;
        let tail = match staging.tails.get(record_key) {
            Some(tail) => tail.as_slice(),
            None => {
                stored = self.storage.tail(space, collection, record)?;
                stored.as_slice()
            }
        };
        let cached =
            lock(&self.cache).pop(&(space.to_owned(), record_key.0.clone(), record_key.1.clone()));
        match cached {
            // A cached document holds what storage holds; this call's changes are added to it.
            Some(mut doc) => {
                let staged: Vec<Vec<u8>> = tail
                    .iter()
                    .filter_map(|&seq| staging.append.change_at(seq))
                    .map(<[u8]>::to_vec)
                    .collect();
                match doc.apply_changes(&staged) {
                    Ok(_) => Ok(doc),
                    // Another relay logged changes of the record after this call read the
                    // head, and this call's changes build on them: staged again on the log
                    // as it is now (the append's commit would be refused anyway).
                    Err(RecordError::MissingDependencies { .. }) if self.shared => {
                        Err(StorageError::HeadMoved {
                            staged: staging.append.after,
                            head: self.storage.head(space)?,
                        }
                        .into())
                    }
                    Err(e) => Err(e.into()),
                }
            }
            None => Ok(self
                .load_doc(space, collection, record, tail, &staging.append)?
                .ok_or_else(|| {
                    corrupt(
                        "record base",
                        format!("{collection}/{record} has logged changes but no base"),
                    )
                })?),
        }
    }

    /// Loads a record's document from its base and the tail changes `tail`, reading both from
    /// the append being staged or from storage. `None` when the record has no base.
    fn load_doc(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        tail: &[u64],
        append: &Append,
    ) -> Result<Option<Record>, RelayStoreError> {
        // A record created in this append has its base only in the append so far.
        let created = append
            .created
            .get(&(collection.to_owned(), record.to_owned()));
        let base = match created {
            Some(bytes) => bytes.clone(),
            None => match self.storage.base(space, collection, record)? {
                Some(bytes) => bytes,
                None => return Ok(None),
            },
        };
        self.assemble_doc((space, collection, record), &base, tail, append)
            .map(Some)
    }

    /// The record's document from its base and the changes its tail names.
    fn assemble_doc(
        &self,
        (space, collection, record): (&str, &str, &str),
        base: &[u8],
        tail: &[u64],
        append: &Append,
    ) -> Result<Record, RelayStoreError> {
        self.docs_loaded.fetch_add(1, Ordering::Relaxed);
        let changes = tail
            .iter()
            .map(|&seq| Ok((seq, self.change_at(space, seq, append)?)))
            .collect::<Result<Vec<_>, RelayStoreError>>()?;
        Ok(assemble(
            base,
            changes,
            &self.actor,
            (space, collection, record),
        )?)
    }

    /// The record's document, including the tail changes `tail` (those this append stages
    /// too), saved as its new base. `loaded` is the document detection already holds with all
    /// of them, if it does.
    fn compact(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        tail: &[u64],
        loaded: Option<&mut Record>,
        append: &Append,
    ) -> Result<Vec<u8>, RelayStoreError> {
        match loaded {
            Some(doc) => Ok(doc.save()),
            None => Ok(self
                .load_doc(space, collection, record, tail, append)?
                .ok_or_else(|| {
                    corrupt(
                        "record base",
                        format!("{collection}/{record} has logged changes but no base"),
                    )
                })?
                .save()),
        }
    }

    /// The change bytes at `seq`, from the append being staged or from storage.
    fn change_at(
        &self,
        space: &str,
        seq: u64,
        append: &Append,
    ) -> Result<Vec<u8>, RelayStoreError> {
        if let Some(change) = append.change_at(seq) {
            return Ok(change.to_vec());
        }
        self.storage.change_at(space, seq)?.ok_or_else(|| {
            corrupt(
                "log entry",
                format!("seq {seq} is named by a record but missing"),
            )
            .into()
        })
    }

    /// Documents read from storage (base and tail) since the store was opened. Appends that only
    /// fast-forward records load none.
    pub fn documents_loaded(&self) -> u64 {
        self.docs_loaded.load(Ordering::Relaxed)
    }

    /// Conflicts found in appended changes since the store was opened, per kind, all spaces.
    pub fn conflicts_found(&self) -> [(ConflictKind, u64); ConflictKind::ALL.len()] {
        let mut found = ConflictKind::ALL.map(|kind| (kind, 0));
        for ((_, n), counter) in found.iter_mut().zip(&self.conflicts_found) {
            *n = counter.load(Ordering::Relaxed);
        }
        found
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, RelayStoreError> {
        Ok(self.storage.size_on_disk()?)
    }

    /// Digests the logged heads of up to `max_records` records of the space after `after`, in
    /// (collection, id) order (the answer to a device's `CheckHeads`). Appends to the space wait
    /// meanwhile, so the digest is of one log prefix: `head`'s. Reads no document, except for
    /// records logged before their heads were kept.
    pub fn heads_digest(
        &self,
        space: &str,
        after: Option<&RecordName>,
        max_records: u32,
        collections: Option<&BTreeSet<String>>,
    ) -> Result<HeadsPage, RelayStoreError> {
        let state = self.space(space)?;
        let mut state = state.lock();
        let head = self.storage.head(space)?;
        self.catch_up(space, &mut state, head)?;
        let wanted = max_records.max(1) as usize;
        let mut page = self
            .storage
            .record_names(space, after, wanted.saturating_add(1))?;
        let complete = page.len() <= wanted;
        page.truncate(wanted);
        let mut hasher = HeadsHasher::default();
        let mut last = None;
        for name in page {
            if collections.is_none_or(|c| c.contains(&name.collection)) {
                let mut heads = self.logged_heads(space, &name.collection, &name.record)?;
                hasher.record(&name.collection, &name.record, &mut heads);
            }
            last = Some(name);
        }
        let (records, digest) = hasher.finish();
        Ok(HeadsPage {
            head,
            records,
            last,
            complete,
            digest,
        })
    }

    /// Up to `max_records` records of the space after `after`, in (collection, id) order, each
    /// with its document and its conflict entries: a page of a snapshot (PROTOCOL.md, 5.8), as
    /// of `head`, appends to the space waiting meanwhile. The page stops before `max_bytes` of
    /// documents and entries, with at least one record. A record's base with no tail is sent as
    /// it is (a saved document, or its first change: both load as a document), so only records
    /// with changes since their base are loaded, and none is put in the cache: a snapshot of a
    /// large space would otherwise push out the documents appends need. While the space's
    /// conflict entries are incomplete (see `conflicts_complete`) the answer is an empty last
    /// page at head 0: the device reads the log. With `collections`, only their records are
    /// sent (PROTOCOL.md, 5.9): the others count as gone through, and `last` names the last
    /// record the page went through, sent or not.
    pub fn snapshot_page(
        &self,
        space: &str,
        after: Option<&RecordName>,
        max_records: u32,
        max_bytes: usize,
        collections: Option<&BTreeSet<String>>,
    ) -> Result<SnapshotPage, RelayStoreError> {
        let state = self.space(space)?;
        let mut state = state.lock();
        let head = self.storage.head(space)?;
        self.catch_up(space, &mut state, head)?;
        if head > 0 && !self.storage.conflicts_complete(space)? {
            // The conflict entries to send with the documents are not all kept yet (a log kept
            // before, until `rebuild_conflicts` has run): the last page, empty, at head 0, so
            // the device reads the whole log instead.
            return Ok(SnapshotPage {
                head: 0,
                horizon: 0,
                records: Vec::new(),
                last: None,
                complete: true,
            });
        }
        let wanted = max_records.max(1) as usize;
        let names = self
            .storage
            .record_names(space, after, wanted.saturating_add(1))?;
        let mut page = SnapshotPage {
            head,
            horizon: self.storage.horizon(space)?,
            records: Vec::new(),
            last: None,
            complete: true,
        };
        let sent = |name: &RecordName| collections.is_none_or(|c| c.contains(&name.collection));
        let mut bytes = 0usize;
        let mut parts = RecordParts::default();
        for (scanned, name) in names.iter().enumerate() {
            if scanned >= wanted {
                page.complete = false;
                break;
            }
            if !sent(name) {
                // Not sent, but covered: the next page goes on after it.
                page.last = Some(name.clone());
                continue;
            }
            let key = (name.collection.clone(), name.record.clone());
            if !parts.read.contains(&key) {
                let ahead: Vec<RecordKey> = names
                    .iter()
                    .take(wanted)
                    .skip(scanned)
                    .filter(|name| sent(name))
                    .take(SNAPSHOT_READ_AHEAD)
                    .map(|name| (name.collection.clone(), name.record.clone()))
                    .collect();
                parts = self.record_parts(space, ahead)?;
            }
            let record = self.snapshot_record(space, name, &mut parts)?;
            bytes = bytes
                .saturating_add(record.document.len())
                .saturating_add(record.conflicts.len());
            if bytes > max_bytes && !page.records.is_empty() {
                page.complete = false;
                break;
            }
            page.records.push(record);
            page.last = Some(name.clone());
        }
        Ok(page)
    }

    /// What snapshots of `records` need from storage, read for all of them at once.
    fn record_parts(
        &self,
        space: &str,
        records: Vec<RecordKey>,
    ) -> Result<RecordParts, RelayStoreError> {
        Ok(RecordParts {
            bases: self.storage.bases_of(space, &records)?,
            tails: self.storage.tails_of(space, &records)?,
            conflicts: self.storage.conflicts_of(space, &records)?,
            read: records.into_iter().collect(),
        })
    }

    /// A page of the space's unique-value index (PROTOCOL.md, 5.8), as of `head`, appends to the
    /// space waiting meanwhile: the holders of up to `max_values` values after `after`, in
    /// (collection, constraint, value) order, over the constraints of the relay's policies;
    /// once no value is left, the space's conflict entries of kind `unique` after it, up to
    /// `max_values` entries looked through, in id order. A device that bootstrapped from a
    /// snapshot takes these instead of meeting the log's unique moves the pages already hold.
    /// The page stops before `max_bytes`, with at least one value. While the space's conflict
    /// entries are incomplete the answer is an empty last page at head 0, as for `snapshot_page`.
    pub fn unique_index_page(
        &self,
        space: &str,
        after: Option<&IndexPosition>,
        max_values: u32,
        max_bytes: usize,
        collections: Option<&BTreeSet<String>>,
    ) -> Result<UniqueIndexPage, RelayStoreError> {
        let state = self.space(space)?;
        let mut state = state.lock();
        let head = self.storage.head(space)?;
        self.catch_up(space, &mut state, head)?;
        let mut page = UniqueIndexPage {
            head,
            values: Vec::new(),
            conflicts: b"[]".to_vec(),
            last: None,
            complete: true,
        };
        if head > 0 && !self.storage.conflicts_complete(space)? {
            page.head = 0;
            return Ok(page);
        }
        let wanted = max_values.max(1) as usize;
        let after_conflict = match after {
            Some(IndexPosition::Conflict(id)) => Some(id.as_str()),
            _ => {
                let after_value = match after {
                    Some(IndexPosition::Value(value)) => Some(value),
                    _ => None,
                };
                let mut bytes = 0usize;
                for (collection, constraint) in self.unique_constraints(space, collections)? {
                    let from = after_value
                        .filter(|v| {
                            (v.collection.as_str(), v.constraint as usize)
                                == (collection.as_str(), constraint)
                        })
                        .map(|v| v.value.as_str());
                    if after_value.is_some_and(|v| {
                        (collection.as_str(), constraint)
                            < (v.collection.as_str(), v.constraint as usize)
                    }) {
                        continue;
                    }
                    let room = wanted.saturating_sub(page.values.len());
                    for (value, holders) in self.storage.unique_holders_after(
                        space,
                        &collection,
                        constraint,
                        from,
                        room,
                    )? {
                        let holders =
                            serde_json::to_vec(&holders).map_err(|e| StorageError::Encode {
                                what: "unique value holders",
                                detail: e.to_string(),
                            })?;
                        bytes = bytes
                            .saturating_add(value.len())
                            .saturating_add(holders.len());
                        if bytes > max_bytes && !page.values.is_empty() {
                            page.complete = false;
                            return Ok(page);
                        }
                        let value = IndexValue {
                            collection: collection.clone(),
                            constraint: u32::try_from(constraint).unwrap_or(u32::MAX),
                            value,
                        };
                        page.last = Some(IndexPosition::Value(value.clone()));
                        page.values.push(UniqueHolders { value, holders });
                    }
                    if page.values.len() >= wanted {
                        break;
                    }
                }
                if !page.values.is_empty() {
                    // The next page starts after the last value sent: values, or the entries.
                    page.complete = false;
                    return Ok(page);
                }
                None
            }
        };
        let scanned = self
            .storage
            .conflicts(space, false, after_conflict, wanted)?;
        page.complete = scanned.len() < wanted;
        page.last = scanned
            .last()
            .map(|c| IndexPosition::Conflict(c.id.clone()))
            .or_else(|| after.cloned());
        let unique: Vec<&Conflict> = scanned
            .iter()
            .filter(|c| {
                c.kind == ConflictKind::Unique
                    && collections.is_none_or(|names| names.contains(&c.collection))
            })
            .collect();
        page.conflicts = serde_json::to_vec(&unique).map_err(|e| StorageError::Encode {
            what: "conflict entries",
            detail: e.to_string(),
        })?;
        Ok(page)
    }

    /// The space's unique constraints as (collection, constraint index), in order: those of
    /// the collections its policies name, and, when the default policy has any, those of every
    /// other collection the space holds.
    fn unique_constraints(
        &self,
        space: &str,
        collections: Option<&BTreeSet<String>>,
    ) -> Result<Vec<(String, usize)>, RelayStoreError> {
        let policies = &self.options.policies;
        let mut names: BTreeSet<String> = policies
            .collections
            .iter()
            .filter(|(_, policy)| !policy.unique.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        if !policies.default.unique.is_empty() {
            names.extend(
                self.storage
                    .collections(space)?
                    .into_iter()
                    .map(|(name, _)| name)
                    .filter(|name| !policies.collections.contains_key(name)),
            );
        }
        Ok(names
            .into_iter()
            .filter(|name| collections.is_none_or(|c| c.contains(name)))
            .flat_map(|name| {
                let count = policies.of(&name).unique.len();
                (0..count).map(move |constraint| (name.clone(), constraint))
            })
            .collect())
    }

    /// One record of a snapshot page, under the space's lock.
    /// The record's snapshot, from `parts` (which `record_parts` read for it) or the cache.
    fn snapshot_record(
        &self,
        space: &str,
        name: &RecordName,
        parts: &mut RecordParts,
    ) -> Result<SnapshotRecord, RelayStoreError> {
        let (collection, record) = (name.collection.as_str(), name.record.as_str());
        let key = (collection.to_owned(), record.to_owned());
        let doc_key = (space.to_owned(), collection.to_owned(), record.to_owned());
        let cached = lock(&self.cache).get_mut(&doc_key).map(|doc| doc.save());
        let document = match cached {
            Some(document) => document,
            None => {
                let missing = || {
                    corrupt(
                        "record base",
                        format!("{collection}/{record} is listed but has no base"),
                    )
                };
                let base = parts.bases.remove(&key).ok_or_else(missing)?;
                let tail = parts.tails.remove(&key).unwrap_or_default();
                if tail.is_empty() {
                    base
                } else {
                    let at = (space, collection, record);
                    self.assemble_doc(at, &base, &tail, &Append::default())?
                        .save()
                }
            }
        };
        let conflicts = parts.conflicts.remove(&key).unwrap_or_default();
        let conflicts = serde_json::to_vec(&conflicts).map_err(|e| StorageError::Encode {
            what: "conflict entries",
            detail: e.to_string(),
        })?;
        Ok(SnapshotRecord {
            collection: name.collection.clone(),
            record: name.record.clone(),
            document,
            conflicts,
        })
    }

    /// Compacts the space's log as `retention` allows at `now_ms` (the relay's clock): notes
    /// the head with the time (at most hourly), saves as their bases the documents of the
    /// records whose tails reach below the new horizon, then drops the entries up to it (their
    /// dedup index kept, so an old change uploaded again is still a `Duplicate`), taking their
    /// bytes off the space's quota. `None` when nothing is to be dropped, or while the space's
    /// conflict entries are being rebuilt from its whole log. Appends to the space wait only
    /// while bases are saved, a few hundred records at a time.
    pub fn compact_log(
        &self,
        space: &str,
        now_ms: u64,
        retention: LogRetention,
    ) -> Result<Option<LogCompacted>, RelayStoreError> {
        check_space(space)?;
        if retention == LogRetention::default() || !self.conflicts_complete(space)? {
            return Ok(None);
        }
        let head = self.storage.head(space)?;
        let before = self.storage.horizon(space)?;
        let marks = self.storage.time_marks(space)?;
        let mark = (retention.keep_log_days > 0
            && head > before
            && marks.last().is_none_or(|&(time, at)| {
                at < head && now_ms.saturating_sub(time) >= TIME_MARK_EVERY_MS
            }))
        .then_some((now_ms, head));
        let by_entries = (retention.keep_log_entries > 0)
            .then(|| head.saturating_sub(retention.keep_log_entries));
        let by_age = (retention.keep_log_days > 0).then(|| {
            let cutoff = now_ms.saturating_sub(retention.keep_log_days.saturating_mul(DAY_MS));
            marks
                .iter()
                .filter(|(time, _)| *time <= cutoff)
                .map(|&(_, at)| at)
                .max()
                .unwrap_or(0)
        });
        let target = by_entries.into_iter().chain(by_age).max().unwrap_or(0);
        if target <= before {
            let noted = match mark {
                Some(_) => self.storage.compact_log(
                    space,
                    LogCompaction {
                        after: head,
                        mark,
                        ..LogCompaction::default()
                    },
                ),
                None => Ok(()),
            };
            return match noted {
                // An append landed meanwhile: the next pass notes the head it left.
                Ok(()) | Err(StorageError::HeadMoved { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            };
        }
        let bytes_before = self.storage.log_bytes(space)?;
        let flatten_at = retention.flatten_history.then_some(now_ms);
        let (bases_saved, mut flattened) = self.save_bases_through(space, target, flatten_at)?;
        if retention.flatten_history {
            flattened = flattened.saturating_add(self.flatten_settled(space, target, now_ms)?);
        }
        // Appends may land meanwhile: they only add entries above the head, so the step is
        // staged again on the new head.
        loop {
            let step = LogCompaction {
                after: self.storage.head(space)?,
                bases: Vec::new(),
                horizon: target,
                mark,
            };
            match self.storage.compact_log(space, step) {
                Ok(()) => break,
                Err(StorageError::HeadMoved { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(LogCompacted {
            horizon: self.storage.horizon(space)?,
            bases_saved,
            flattened,
            bytes_before,
            bytes_after: self.storage.log_bytes(space)?,
        }))
    }

    /// Purges the space's tombstones older than `tombstone_ms` at `now_ms` (the relay's clock;
    /// 0: never), PROTOCOL.md section 5.8: each record whose last logged change left it
    /// deleted, as its collection's policy shows it, at least that long ago gets a purge entry in
    /// the log, and its document, tail, logged heads, unique values and conflict entries go,
    /// a purge marker kept. Notes of records changed since are dropped. Appends to the space wait
    /// only while a step of a few hundred notes is staged. Returns how many records were purged.
    pub fn purge_tombstones(
        &self,
        space: &str,
        now_ms: u64,
        tombstone_ms: u64,
    ) -> Result<usize, RelayStoreError> {
        let state = self.space(space)?;
        if tombstone_ms == 0 {
            return Ok(0);
        }
        let cutoff = now_ms.saturating_sub(tombstone_ms);
        let mut purged = 0usize;
        loop {
            let mut state = state.lock();
            let head = self.storage.head(space)?;
            self.catch_up(space, &mut state, head)?;
            let notes = self.storage.tombstones(space, PURGES_PER_STEP)?;
            let mut more = notes.len() >= PURGES_PER_STEP;
            let mut append = Append::new(head);
            for note in notes {
                // Notes are in log order, and so, but for a clock set back, in time order.
                if note.time_ms > cutoff {
                    more = false;
                    break;
                }
                append.tombstones_done.push(note.seq);
                let (collection, record) = (note.collection.as_str(), note.record.as_str());
                let key = (note.collection.clone(), note.record.clone());
                if append.purged.iter().any(|(k, _)| *k == key)
                    || !self.storage.has_base(space, collection, record)?
                {
                    continue;
                }
                let mut heads = self.logged_heads(space, collection, record)?;
                heads.sort_unstable();
                let mut noted = note.heads.clone();
                noted.sort_unstable();
                if heads != noted {
                    continue;
                }
                let policy = self.policy(collection);
                let deleted = self
                    .cached_doc(space, collection, record, |doc| {
                        resolve::is_deleted(doc, policy)
                    })?
                    .unwrap_or(false);
                if !deleted {
                    continue;
                }
                append.purged.push((key, append.next_seq()));
                append.entries.push(LoggedChange {
                    collection: note.collection,
                    record: note.record,
                    origin: String::new(),
                    hash: [0; 32],
                    change: Vec::new(),
                });
            }
            if append.is_empty() {
                return Ok(purged);
            }
            let committed: Vec<LogEntry> = append
                .purged
                .iter()
                .map(|((collection, record), seq)| {
                    LogEntry::purge(*seq, collection.clone(), record.clone())
                })
                .collect();
            let dropped: Vec<RecordKey> = append.purged.iter().map(|(k, _)| k.clone()).collect();
            let new_head = append.next_seq().saturating_sub(1);
            self.storage.append(space, append)?;
            if self.shared {
                state.cached_at = Some(new_head);
            }
            purged = purged.saturating_add(committed.len());
            if !committed.is_empty() {
                self.recent.committed(space, committed);
            }
            let mut cache = lock(&self.cache);
            for (collection, record) in dropped {
                cache.pop(&(space.to_owned(), collection, record));
            }
            drop(cache);
            if !more {
                return Ok(purged);
            }
        }
    }

    /// The seq of the purge entry that last ended the record's history, if one did.
    pub fn purged_at(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<u64>, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.purged_at(space, collection, record)?)
    }

    /// The seq the record's change `hash` was logged at, if it was.
    pub fn change_seq(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        hash: &ChangeHash,
    ) -> Result<Option<u64>, RelayStoreError> {
        check_space(space)?;
        Ok(self
            .storage
            .change_seq(space, collection, record, &hash.0)?)
    }

    /// Saves as their bases the documents of the records whose tails name entries at or below
    /// `seq`, a step at a time under the space's lock. With `flatten_at` (the relay's clock),
    /// a record whose every change is at or below `seq` and that `flattened` accepts has its
    /// history started again instead: a flatten entry appended, its change the record's base,
    /// its old tail dropped. Returns how many bases were saved and how many were flattened.
    fn save_bases_through(
        &self,
        space: &str,
        seq: u64,
        flatten_at: Option<u64>,
    ) -> Result<(usize, usize), RelayStoreError> {
        let state = self.space(space)?;
        let (mut saved, mut flattened) = (0usize, 0usize);
        loop {
            let mut state = state.lock();
            // Bases are read as of this head: a compaction staged against it is refused if
            // another relay appended meanwhile.
            let head = self.storage.head(space)?;
            self.catch_up(space, &mut state, head)?;
            let records = self.storage.tails_through(space, seq, BASES_PER_STEP)?;
            if records.is_empty() {
                return Ok((saved, flattened));
            }
            let mut bases = Vec::with_capacity(records.len());
            let mut append = Append::new(head);
            let mut fresh_docs = Vec::new();
            for (collection, record) in records {
                let tail = self.storage.tail(space, &collection, &record)?;
                let doc_key = (space.to_owned(), collection.clone(), record.clone());
                // A tail names every change since the record's first: with one, the record
                // has more than one change to flatten.
                let whole_history_below = tail.last().is_some_and(|&last| last <= seq);
                if let Some(now_ms) = flatten_at
                    && whole_history_below
                    && let Some(fresh) = self.stage_flatten(
                        space,
                        (&collection, &record),
                        &tail,
                        now_ms,
                        &mut append,
                    )?
                {
                    fresh_docs.push((doc_key, fresh));
                    continue;
                }
                let cached = lock(&self.cache).get_mut(&doc_key).map(|doc| doc.save());
                let base = match cached {
                    Some(base) => base,
                    None => self
                        .load_doc(space, &collection, &record, &tail, &Append::default())?
                        .ok_or_else(|| {
                            corrupt(
                                "record base",
                                format!("{collection}/{record} has a tail but no base"),
                            )
                        })?
                        .save(),
                };
                bases.push(Compaction {
                    record: (collection, record),
                    base,
                    tail,
                });
            }
            flattened = flattened.saturating_add(fresh_docs.len());
            let after = self.commit_flattens(space, &mut state, append, fresh_docs)?;
            saved = saved.saturating_add(bases.len());
            if !bases.is_empty() {
                self.storage.compact_log(
                    space,
                    LogCompaction {
                        after,
                        bases,
                        ..LogCompaction::default()
                    },
                )?;
            }
        }
    }

    /// Stages in `append` the flatten entry of the record, whose tail is `tail`, when
    /// `flattened` accepts it and it has no open conflict; returns its new document.
    fn stage_flatten(
        &self,
        space: &str,
        (collection, record): (&str, &str),
        tail: &[u64],
        now_ms: u64,
        append: &mut Append,
    ) -> Result<Option<Record>, RelayStoreError> {
        if self.has_open_conflict(space, collection, record)? {
            return Ok(None);
        }
        let flat = self
            .cached_doc(space, collection, record, |doc| {
                self.flattened(collection, doc, now_ms)
            })?
            .flatten();
        let Some((mut fresh, change)) = flat else {
            return Ok(None);
        };
        let key = (collection.to_owned(), record.to_owned());
        append.flattened.push(Flattened {
            record: key.clone(),
            seq: append.next_seq(),
            tail: tail.to_vec(),
        });
        append.entries.push(LoggedChange {
            collection: key.0.clone(),
            record: key.1.clone(),
            origin: String::new(),
            hash: change.hash().0,
            change: change.raw_bytes().to_vec(),
        });
        append
            .created
            .insert(key.clone(), change.raw_bytes().to_vec());
        append
            .heads
            .insert(key, fresh.heads().iter().map(|h| h.0).collect());
        Ok(Some(fresh))
    }

    /// Commits `append`'s flatten entries (none: nothing) under the space's lock, hands them
    /// to live readers and caches the new documents; returns the head after them.
    fn commit_flattens(
        &self,
        space: &str,
        state: &mut SpaceState,
        append: Append,
        fresh_docs: Vec<(DocKey, Record)>,
    ) -> Result<u64, RelayStoreError> {
        let head = append.after;
        if append.entries.is_empty() {
            return Ok(head);
        }
        let committed: Vec<LogEntry> = (head.saturating_add(1)..)
            .zip(&append.entries)
            .map(|(seq, e)| LogEntry {
                seq,
                collection: e.collection.clone(),
                record: e.record.clone(),
                change: e.change.clone(),
            })
            .collect();
        let after = append.next_seq().saturating_sub(1);
        self.storage.append(space, append)?;
        if self.shared {
            state.cached_at = Some(after);
        }
        self.recent.committed(space, committed);
        let mut cache = lock(&self.cache);
        for (key, doc) in fresh_docs {
            cache.put(key, doc);
        }
        Ok(after)
    }

    /// Flattens, a step at a time, the records of the space whose every change is at or below
    /// `horizon` that compaction does not meet because their bases hold every change already
    /// (no tail): up to `FLATTEN_SCAN` records a pass, from where the last pass stopped, so
    /// that a large space is swept over several passes. Returns how many were flattened.
    fn flatten_settled(
        &self,
        space: &str,
        horizon: u64,
        now_ms: u64,
    ) -> Result<usize, RelayStoreError> {
        let state = self.space(space)?;
        let mut flattened = 0usize;
        let mut looked = 0usize;
        while looked < FLATTEN_SCAN {
            let mut state = state.lock();
            let head = self.storage.head(space)?;
            self.catch_up(space, &mut state, head)?;
            let names =
                self.storage
                    .record_names(space, state.flatten_after.as_ref(), BASES_PER_STEP)?;
            let Some(last) = names.last().cloned() else {
                // The sweep starts again from the space's first record next pass.
                state.flatten_after = None;
                break;
            };
            looked = looked.saturating_add(names.len());
            let keys: Vec<RecordKey> = names
                .into_iter()
                .map(|n| (n.collection, n.record))
                .collect();
            let tails = self.storage.tails_of(space, &keys)?;
            let mut append = Append::new(head);
            let mut fresh_docs = Vec::new();
            for key in keys {
                let (collection, record) = (key.0.as_str(), key.1.as_str());
                // Records with a tail are compaction's (`save_bases_through`).
                if tails.get(&key).is_none_or(|tail| !tail.is_empty())
                    || !self.settled_below(space, (collection, record), horizon)?
                {
                    continue;
                }
                let doc_key = (space.to_owned(), key.0.clone(), key.1.clone());
                if let Some(fresh) =
                    self.stage_flatten(space, (collection, record), &[], now_ms, &mut append)?
                {
                    fresh_docs.push((doc_key, fresh));
                }
            }
            let staged = fresh_docs.len();
            match self.commit_flattens(space, &mut state, append, fresh_docs) {
                Ok(_) => {
                    flattened = flattened.saturating_add(staged);
                    state.flatten_after = Some(last);
                }
                // Another relay appended meanwhile: the next pass looks at these again.
                Err(RelayStoreError::Storage(StorageError::HeadMoved { .. })) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(flattened)
    }

    /// Whether the record has more than one change, all logged at or below `horizon`, and is
    /// not already one flatten change: its logged heads name its last changes.
    fn settled_below(
        &self,
        space: &str,
        (collection, record): (&str, &str),
        horizon: u64,
    ) -> Result<bool, RelayStoreError> {
        // No heads kept: a record with one change.
        let Some(heads) = self.storage.record_heads(space, collection, record)? else {
            return Ok(false);
        };
        let mut seqs = Vec::with_capacity(heads.len());
        for head in &heads {
            match self.storage.change_seq(space, collection, record, head)? {
                Some(seq) if seq <= horizon => seqs.push(seq),
                _ => return Ok(false),
            }
        }
        // Its one head is the flatten entry that started its history: nothing to flatten.
        Ok(match seqs.as_slice() {
            [only] => self.storage.purged_at(space, collection, record)? != Some(*only),
            _ => true,
        })
    }

    fn has_open_conflict(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<bool, RelayStoreError> {
        Ok(self
            .storage
            .record_conflicts(space, collection, record)?
            .iter()
            .any(|c| c.status == ConflictStatus::Open))
    }

    /// The record's history written again as one flatten change on a new document (the
    /// relay's actor), with that document: `None` when the record cannot be flattened without
    /// changing what it shows or how a later change merges. A deleted record waits for
    /// `tombstone_days` instead; a value with concurrent values, or an open conflict, waits
    /// for the write that settles it; a collection with unique constraints keeps its history,
    /// as the unique-value index moves with entries across records.
    fn flattened(
        &self,
        collection: &str,
        doc: &mut Record,
        now_ms: u64,
    ) -> Option<(Record, automerge::Change)> {
        let policy = self.policy(collection);
        if !policy.unique.is_empty()
            || resolve::is_deleted(doc, policy)
            || doc.has_concurrent_values().unwrap_or(true)
        {
            return None;
        }
        let shown = resolve::view(doc, policy);
        let mut fresh = Record::new(&self.actor).with_text_fields(policy.text.clone());
        let written = fresh.flatten(&shown.fields, now_ms).ok()??;
        let again = resolve::view(&mut fresh, policy);
        (again.fields == shown.fields && !again.deleted).then_some((fresh, written.change))
    }

    /// Rebuilds the record's document from its log entries, for a stored document (or tail, or
    /// the index of its tail) that is damaged: every change the dedup index lists for the
    /// record, read from the log, checked against the hash the index names, applied in log
    /// order to a new document, which must load again once saved and have exactly the heads
    /// those changes leave (and the record's stored heads, where they are readable). The
    /// document is then committed as the record's base, with those heads, in an append of no
    /// entry, replacing its tail; the cached copy is dropped, so the next read serves it. The
    /// record's conflict entries are read back; if they are damaged too and the space's log is
    /// whole, the space's conflict entries are rebuilt from it (`rebuild_conflicts`). Refused,
    /// with nothing written, when the log no longer holds the record's first change (compacted
    /// away), or when a log entry it needs is itself damaged.
    pub fn rebuild_record(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<RecordRebuilt, RelayStoreError> {
        check_space(space)?;
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(record, &self.options.limits)?;
        let unrebuildable = |reason: String| RelayStoreError::Unrebuildable {
            collection: collection.to_owned(),
            record: record.to_owned(),
            reason,
        };
        let state = self.space(space)?;
        let appends = state.lock();
        let mut logged = self.storage.record_changes(space, collection, record)?;
        // An ended history's changes stay in the index (as duplicates) but are not the
        // record's. A flatten entry (a change, unlike a purge entry) starts the new history.
        if let Some(ended) = self.storage.purged_at(space, collection, record)? {
            logged.retain(|&(_, seq)| seq >= ended);
        }
        let (Some(&(_, first_seq)), Some(&(_, last_seq))) = (logged.first(), logged.last()) else {
            return Err(RelayStoreError::NoSuchRecord {
                collection: collection.to_owned(),
                record: record.to_owned(),
            });
        };
        let horizon = self.storage.horizon(space)?;
        if first_seq <= horizon {
            return Err(RelayStoreError::Compacted {
                collection: collection.to_owned(),
                record: record.to_owned(),
                first: first_seq,
                horizon,
            });
        }
        let mut changes = Vec::with_capacity(logged.len());
        for &(hash, seq) in &logged {
            let bytes = self.storage.change_at(space, seq)?.ok_or_else(|| {
                unrebuildable(format!(
                    "log entry {seq}, which the record's change index names, is missing"
                ))
            })?;
            let change = decode_change(&bytes)
                .map_err(|e| unrebuildable(format!("log entry {seq} is not a change: {e}")))?;
            if change.hash().0 != hash {
                return Err(unrebuildable(format!(
                    "log entry {seq} holds another change than the record's change index names"
                )));
            }
            changes.push(change);
        }
        // The heads the logged changes leave: those no other change of the record is built on.
        let built_on: std::collections::HashSet<ChangeHash> = changes
            .iter()
            .flat_map(|c| c.deps().iter().copied())
            .collect();
        let mut expected: Vec<[u8; 32]> = changes
            .iter()
            .map(Change::hash)
            .filter(|h| !built_on.contains(h))
            .map(|h| h.0)
            .collect();
        expected.sort_unstable();
        // Stored heads that are damaged are written again below; readable ones that differ
        // mean the log and the record disagree, which a rebuild must not paper over.
        match self.storage.record_heads(space, collection, record) {
            Ok(Some(mut stored)) => {
                stored.sort_unstable();
                if stored != expected {
                    return Err(unrebuildable(
                        "its stored heads are not those its logged changes leave".into(),
                    ));
                }
            }
            Ok(None) | Err(StorageError::Damaged { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut doc = Record::new(&self.actor);
        doc.apply_reloadable(changes).map_err(|e| {
            unrebuildable(format!("its logged changes do not make a document: {e}"))
        })?;
        let base = doc.save();
        let mut reloaded = Record::load(&base, &self.actor)
            .map_err(|e| unrebuildable(format!("the rebuilt document does not load again: {e}")))?;
        let mut heads: Vec<[u8; 32]> = reloaded.heads().iter().map(|h| h.0).collect();
        heads.sort_unstable();
        if heads != expected {
            return Err(unrebuildable(
                "the rebuilt document's heads are not those its logged changes leave".into(),
            ));
        }
        // One commit with no entry: the base, with every logged change in it, so no tail key of
        // the record is left, damaged or not; and its heads.
        let record_key = (collection.to_owned(), record.to_owned());
        let mut append = Append::new(self.storage.head(space)?);
        append.compactions.push(Compaction {
            record: record_key.clone(),
            base,
            tail: logged.iter().map(|&(_, seq)| seq).collect(),
        });
        append.heads.insert(record_key, heads.clone());
        self.storage.append(space, append)?;
        lock(&self.cache).pop(&(space.to_owned(), collection.to_owned(), record.to_owned()));
        drop(appends);
        let (conflicts, conflicts_rebuilt) =
            match self.storage.record_conflicts(space, collection, record) {
                Ok(conflicts) => (conflicts.len(), false),
                Err(StorageError::Damaged { .. }) if horizon == 0 => {
                    self.rebuild_conflicts(space, || false)?;
                    let conflicts = self.storage.record_conflicts(space, collection, record)?;
                    (conflicts.len(), true)
                }
                Err(e) => return Err(e.into()),
            };
        Ok(RecordRebuilt {
            space: space.to_owned(),
            collection: collection.to_owned(),
            record: record.to_owned(),
            changes: logged.len(),
            first_seq,
            last_seq,
            heads: heads
                .into_iter()
                .map(|h| ChangeHash(h).to_string())
                .collect(),
            conflicts,
            conflicts_rebuilt,
        })
    }

    /// After log compactions: has storage free the disk the dropped entries still take
    /// (`LogStorage::reclaim_space`); returns the bytes on disk before and after.
    pub fn reclaim_space(&self) -> Result<(u64, u64), RelayStoreError> {
        Ok(self.storage.reclaim_space()?)
    }

    /// The space's compaction horizon: the log up to it is no longer kept (0: all of it is).
    pub fn horizon(&self, space: &str) -> Result<u64, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.horizon(space)?)
    }

    /// Bytes of the space's log entries: what the account's quota is measured against.
    pub fn log_bytes(&self, space: &str) -> Result<u64, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.log_bytes(space)?)
    }

    /// Conflicts found in the space's log so far, all kinds and collections together.
    pub fn conflicts_total(&self, space: &str) -> Result<u64, RelayStoreError> {
        Ok(self
            .conflict_counts(space)?
            .iter()
            .map(|c| c.detected)
            .sum())
    }

    /// The conflicts found in the space's log so far, per kind and collection, under the relay's
    /// `merge` policy (and unique clashes in the collections the relay's config declares).
    pub fn conflict_counts(&self, space: &str) -> Result<Vec<RelayConflictCount>, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.conflict_counts(space)?)
    }

    /// Log entries with seq > `after`, in order, up to `max_changes` entries and `max_bytes` of
    /// change data (at least one entry). A device is sent its own changes too: where they sit in
    /// the log decides, on every device alike, which side of a conflict was first.
    pub fn read_since(
        &self,
        space: &str,
        after: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<LogSlice, RelayStoreError> {
        let head = self.head(space)?;
        let entries = match self.recent.read(space, after, max_changes, max_bytes) {
            Some(entries) => entries,
            None => self
                .storage
                .read_log(space, after, max_changes, max_bytes)?,
        };
        // Read after the entries: a compaction between the two raises the horizon, so entries
        // read past a gap it left are never served as if nothing were missing.
        let horizon = self.storage.horizon(space)?;
        if after < horizon {
            // The entries after `after` are gone in part: the reader must bootstrap.
            return Ok(LogSlice {
                after,
                through: after,
                head,
                horizon,
                entries: Vec::new(),
            });
        }
        let through = entries.last().map_or(after, |e| e.seq);
        // Entries appended since the head was read raise it; a cursor past the log does not,
        // so that the session can tell the device the relay lost part of its log.
        Ok(LogSlice {
            after,
            through,
            head: entries.last().map_or(head, |e| head.max(e.seq)),
            horizon,
            entries,
        })
    }

    /// Runs `f` on the record's document, loading it into the cache if needed.
    fn with_doc<T>(
        &self,
        space: &str,
        collection: &str,
        id: &str,
        f: impl FnOnce(&mut Record) -> T,
    ) -> Result<Option<T>, RelayStoreError> {
        check_space(space)?;
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        // The space's lock keeps an append from landing between reading the base and the tail.
        let state = self.space(space)?;
        let mut state = state.lock();
        self.current(space, &mut state)?;
        self.cached_doc(space, collection, id, f)
    }

    /// `with_doc` under the space's lock, already held.
    fn cached_doc<T>(
        &self,
        space: &str,
        collection: &str,
        id: &str,
        f: impl FnOnce(&mut Record) -> T,
    ) -> Result<Option<T>, RelayStoreError> {
        let doc_key = (space.to_owned(), collection.to_owned(), id.to_owned());
        let mut cache = lock(&self.cache);
        if let Some(doc) = cache.get_mut(&doc_key) {
            return Ok(Some(f(doc)));
        }
        let tail = self.storage.tail(space, collection, id)?;
        let Some(mut doc) = self.load_doc(space, collection, id, &tail, &Append::default())? else {
            return Ok(None);
        };
        let out = f(&mut doc);
        cache.put(doc_key, doc);
        Ok(Some(out))
    }

    /// A live record's fields; `None` if it does not exist or is deleted.
    pub fn record(
        &self,
        space: &str,
        collection: &str,
        id: &str,
    ) -> Result<Option<Fields>, RelayStoreError> {
        Ok(self
            .with_doc(space, collection, id, |doc| {
                doc.is_live().then(|| doc.fields())
            })?
            .flatten())
    }

    /// The record as `policy` shows it (the same view a device with that policy shows), with
    /// its heads; `None` if the space has no such record.
    pub fn view(
        &self,
        space: &str,
        collection: &str,
        id: &str,
        policy: &Policy,
    ) -> Result<Option<(resolve::View, Vec<String>)>, RelayStoreError> {
        self.with_doc(space, collection, id, |doc| {
            let heads = doc.heads().iter().map(|h| h.to_string()).collect();
            (resolve::view(doc, policy), heads)
        })
    }

    /// A copy of the record's document, every logged change in it, that writes as `actor`: what
    /// the relay's web actor builds its changes on. `None` if the space has no such record.
    pub fn fork_as(
        &self,
        space: &str,
        collection: &str,
        id: &str,
        actor: &ActorId,
    ) -> Result<Option<Record>, RelayStoreError> {
        self.with_doc(space, collection, id, |doc| doc.fork_as(actor))
    }

    /// The record's changes, oldest first; `None` if the space has no such record.
    pub fn history(
        &self,
        space: &str,
        collection: &str,
        id: &str,
    ) -> Result<Option<Vec<crate::record::HistoryEntry>>, RelayStoreError> {
        Ok(self
            .with_doc(space, collection, id, Record::history)?
            .transpose()?)
    }

    /// The record's whole document, as Automerge saves it.
    pub fn document_bytes(
        &self,
        space: &str,
        collection: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>, RelayStoreError> {
        self.with_doc(space, collection, id, Record::save)
    }

    /// The record's heads, hex.
    pub fn heads(
        &self,
        space: &str,
        collection: &str,
        id: &str,
    ) -> Result<Option<Vec<String>>, RelayStoreError> {
        self.with_doc(space, collection, id, |doc| {
            doc.heads().iter().map(|h| h.to_string()).collect()
        })
    }

    /// Collections of the space with their record counts (deleted records included).
    pub fn collections(&self, space: &str) -> Result<Vec<(String, u64)>, RelayStoreError> {
        check_space(space)?;
        Ok(self.storage.collections(space)?)
    }

    /// Record ids of a collection in id order, after `after`.
    pub fn records(
        &self,
        space: &str,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, RelayStoreError> {
        check_space(space)?;
        validate_collection(collection, &self.options.limits)?;
        Ok(self.storage.records(space, collection, after, limit)?)
    }
}

/// A record's document: its base with its tail changes (`(seq, change)`, in log order)
/// applied. A log written before every change was validated may hold changes that cannot be
/// applied: the document is then what the others make, as on devices, which quarantine such
/// entries, so that one bad change does not make the record unusable.
pub fn assemble(
    base: &[u8],
    tail: Vec<(u64, Vec<u8>)>,
    actor: &ActorId,
    (space, collection, record): (&str, &str, &str),
) -> Result<Record, RecordError> {
    let mut doc = Record::load(base, actor)?;
    let (seqs, changes): (Vec<u64>, Vec<Vec<u8>>) = tail.into_iter().unzip();
    if doc.apply_changes(&changes).is_ok() {
        return Ok(doc);
    }
    let mut doc = Record::load(base, actor)?;
    let mut applied = Vec::with_capacity(changes.len());
    for (change, seq) in changes.into_iter().zip(seqs) {
        match doc.apply_changes(std::slice::from_ref(&change)) {
            Ok(_) => applied.push(change),
            Err(e) => {
                tracing::warn!(space, collection, record, seq, error = %e,
                    "a logged change cannot be applied to its record's document: left out");
                if e.needs_reload() {
                    doc = Record::load(base, actor)?;
                    doc.apply_changes(&applied)?;
                }
            }
        }
    }
    Ok(doc)
}

/// The space's conflict state in storage, as the ledger reads it.
struct SpaceConflicts<'a> {
    storage: &'a dyn LogStorage,
    space: &'a str,
}

impl ConflictState for SpaceConflicts<'_> {
    type Error = RelayStoreError;

    fn conflict(&self, id: &str) -> Result<Option<Conflict>, RelayStoreError> {
        Ok(self.storage.conflict(self.space, id)?)
    }

    fn held(&self, record: &RecordKey) -> Result<HeldValues, RelayStoreError> {
        Ok(self
            .storage
            .unique_values(self.space, &record.0, &record.1)?
            .unwrap_or_default())
    }

    fn holders(&self, value: &UniqueValue) -> Result<Holders, RelayStoreError> {
        Ok(self.storage.unique_holders(self.space, value)?)
    }
}

impl From<EncodeError> for RelayStoreError {
    fn from(e: EncodeError) -> Self {
        RelayStoreError::Storage(StorageError::Encode {
            what: "a unique value",
            detail: e.0,
        })
    }
}

/// Adds what `ledger` holds to `append` (the conflict entries, the changes that brought new ones,
/// the unique index's moves); returns the conflicts found, by kind and collection.
fn ledger_into_append(
    space: &str,
    ledger: &Ledger,
    append: &mut Append,
) -> Vec<(ConflictKind, String, u64)> {
    for (conflict, found) in ledger.entries() {
        if found {
            tracing::info!(
                space,
                collection = conflict.collection,
                record = conflict.record,
                seq = conflict.seq,
                kind = conflict.kind.as_str(),
                conflict = %conflict.id,
                fields = conflict.fields.len(),
                "conflict found"
            );
            if let Some(change) = conflict.client.changes.first() {
                append
                    .conflict_changes
                    .push((change.clone(), conflict.id.clone()));
            }
        }
        append.conflict_entries.push(conflict.clone());
    }
    append
        .held
        .extend(ledger.held().map(|(k, v)| (k.clone(), v.clone())));
    append
        .holders
        .extend(ledger.holders().map(|(k, v)| (k.clone(), v.clone())));
    ledger
        .counters()
        .filter(|(counter, ..)| *counter == Counter::Detected)
        .map(|(_, kind, collection, n)| (kind, collection.to_owned(), n))
        .collect()
}

/// What detection finds for `change`, just applied to `doc`, against the record's changes
/// logged before it (whose heads are `before`): nothing to look at for a change built on
/// exactly those heads, unless its message makes it a resolution.
fn detection(
    doc: &mut Record,
    change: &Change,
    before: &[ChangeHash],
    at: LogPosition<'_>,
    policy: &Policy,
) -> Option<resolve::Detection> {
    let deps: BTreeSet<&ChangeHash> = change.deps().iter().collect();
    let fast_forward = deps == before.iter().collect::<BTreeSet<_>>();
    let restoration = before.is_empty() && resolve::is_restoration(change.message());
    if fast_forward && resolve::resolution_of(change.message()).is_none() && !restoration {
        return None;
    }
    Some(resolve::detect(
        doc.automerge(),
        before,
        &change.hash(),
        at,
        policy,
    ))
}

/// The answer to a change built on a history the relay purged at seq `purged`.
fn record_purged(collection: &str, record: &str, purged: u64) -> ChangeOutcome {
    ChangeOutcome::Rejected {
        code: ErrorCode::RecordPurged,
        message: format!(
            "the history of {collection}/{record} that the change builds on ended at seq \
             {purged} (the record was purged, or its history flattened): download the log, whose \
             entry there has the device write its edit again on the record's new history"
        ),
    }
}

/// A record's side in a unique clash: as its document (every logged change) shows it.
fn logged_side(doc: &mut Record, id: &str, policy: &Policy) -> Side {
    let heads = doc.heads();
    let view = resolve::view(doc, policy);
    resolve::side(doc.automerge(), id, &heads, view)
}

/// A rebuild of a space's conflicts, as far as it has replayed the log.
#[derive(Default)]
struct Replay {
    through: u64,
    docs: HashMap<RecordKey, Record>,
    /// Records a change left half-applied: their conflicts are not looked for.
    unreadable: std::collections::HashSet<RecordKey>,
    ledger: Ledger,
}

/// Conflict state that holds nothing: a rebuild starts from it.
struct NoConflicts;

impl ConflictState for NoConflicts {
    type Error = RelayStoreError;

    fn conflict(&self, _: &str) -> Result<Option<Conflict>, RelayStoreError> {
        Ok(None)
    }

    fn held(&self, _: &RecordKey) -> Result<HeldValues, RelayStoreError> {
        Ok(Vec::new())
    }

    fn holders(&self, _: &UniqueValue) -> Result<Holders, RelayStoreError> {
        Ok(Holders::default())
    }
}

/// Stages a stored change's log entry (and with it its place in the dedup index).
/// The `records` rows of the records an append created with a plain first change: their fields
/// as the materializer shows such a record (`relay::materializer`). One whose fields cannot be
/// written as JSON is left to the materializer, which says why.
fn created_rows(created: Vec<(u64, RecordKey, PlainFirst, i64)>) -> Vec<(u64, CreatedRow)> {
    created
        .into_iter()
        .filter_map(|(seq, key, plain, updated_ms)| {
            let fields = serde_json::to_string(&plain.fields).ok()?;
            let row = CreatedRow {
                key,
                fields,
                deleted: plain.deleted,
                updated_ms,
            };
            Some((seq, row))
        })
        .collect()
}

fn log(origin: &str, upload: &UploadChange, seq: u64, hash: [u8; 32], staging: &mut Staging) {
    staging.append.entries.push(LoggedChange {
        collection: upload.collection.clone(),
        record: upload.record.clone(),
        origin: origin.to_owned(),
        hash,
        change: upload.change.clone(),
    });
    staging.added.insert(
        (upload.collection.clone(), upload.record.clone(), hash),
        seq,
    );
}

/// Why a change with sequence number `seq` does not follow its actor's `last` on the record.
fn sequence_refusal(collection: &str, record: &str, seq: u64, last: u64) -> String {
    if seq <= last {
        format!(
            "the change has sequence number {seq}, which its actor already used on \
             {collection}/{record} (its last is {last})"
        )
    } else {
        format!(
            "the change has sequence number {seq}, but its actor's last change to \
             {collection}/{record} is number {last}: a change must follow the one before"
        )
    }
}

fn check_space(space: &str) -> Result<(), RelayStoreError> {
    ferry_proto::session::validate_space(space).map_err(RelayStoreError::InvalidSpace)
}

fn corrupt(what: &'static str, detail: String) -> StorageError {
    StorageError::Corrupt { what, detail }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every holder leaves the data whole before anything can panic (cached documents are
    // replaced, not edited, on append).
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
