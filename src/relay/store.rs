//! The relay's durable state: per space, a totally ordered change log and every record's document.
//!
//! Owns: the relay key layout, appending uploaded changes (validation, deduplication by change
//! hash, the causal-closure rule, sequence numbers, one atomic and flushed batch per call), reading
//! the log, materialising documents on demand into a bounded cache, and counting the conflicts
//! changes bring as they meet in the log.
//!
//! Validation: a change is logged only if it is written under the uploader's own actor (its
//! device id; the web actor's for the relay's HTTP writes), its sequence number is exactly one
//! more than that actor's last on the record (no gap, no reuse), and it applies to the record's
//! document (the relay's own copy, kept current in the cache; a new record's first change is
//! checked on its own, `Record::check_first`) without error or panic. So every
//! logged change can be applied by every device, in log order. A refused change is answered
//! `Rejected{InvalidChange}` (kind `validation`) with the reason as its message; nothing of it is
//! written, and a later change of the same upload built on it is refused with that reason.
//!
//! Conflict detection on the relay is a count for operators, not a decision: devices detect and
//! settle conflicts themselves, with their collections' policies. The relay classifies every
//! change under the `merge` policy, and checks unique constraints only for the collections its
//! own config declares them for (reading the values from the record's document). It is cheap
//! by design: a change whose dependencies are exactly the record's logged heads (a fast-forward,
//! the common case) conflicts with nothing; only a change concurrent with logged ones has
//! `resolve::detect` run against the heads before it.
//!
//! Must not touch: the network, sessions or authentication (the caller has decided that `origin`
//! may write to `space`), and the device's store.
//!
//! Key layout, in one ordered keyspace (a space name holds no control characters, so `\0` ends it;
//! collection names and record ids hold none either):
//! - `l{space}\0{seq u64 BE}` → a log entry: collection, record, origin device, change bytes.
//! - `h{space}\0{collection}\0{record}\0{change hash, 32 bytes}` → `{seq u64 BE}`: the dedup
//!   index, per record (two records may hold byte-identical changes), also used to check that a
//!   change's dependencies are already in the record's log.
//! - `b{space}\0{collection}\0{record}` → the record's base: Automerge chunks (a saved document, or
//!   the record's first change), loadable as they are.
//! - `t{space}\0{collection}\0{record}\0{seq u64 BE}` → empty: a change appended to the record
//!   since its base was written; its bytes are in the log at `seq`. Once a record has
//!   `compact_after` of these, its document is saved as the new base and they are removed, so
//!   appending never re-saves a whole document per change.
//! - `r{space}\0{collection}\0{record}` → the record's logged heads, 32 bytes each, sorted: the heads
//!   before a change, compared with its dependencies to tell a fast-forward from a concurrent
//!   change. Written from a record's second change on: a record with one change has that change
//!   as its base and as its only head, so an initial upload of many records writes none of these
//!   keys. Records logged before this key existed have none; their heads are read from their
//!   document the first time they are needed, and kept from then on.
//! - `c{space}\0{conflict kind}\0{collection}` → `{count u64 BE}`: conflicts found in the space.
//! - `s{space}\0` → `{bytes u64 BE}`: bytes of the space's log entries (the account's quota).
//! - `u{space}\0{collection}\0{constraint index}\0{value JSON}` → the records holding that unique
//!   value (JSON list, in the order they took it); `v{space}\0{collection}\0{record}` → the unique
//!   values a record holds (JSON). Only for collections with unique constraints.

// Lint fixes for this module land with its rewrite.
#![allow(clippy::indexing_slicing)]

use crate::record::{Fields, Record, RecordError, chunk_hash, decode_change};
use crate::resolve::{self, ConflictKind, LogPosition, Policy};
use crate::store::kv::{Batch, Kv, KvError};
use automerge::{ActorId, Change, ChangeHash};
use ferry_proto::wire::{
    ChangeOutcome, ChangeResult, ErrorCode, HeadsHasher, LogEntry, RecordName, UploadChange,
};
use ferry_proto::{AddressError, Limits, validate_collection, validate_record_id};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum RelayStoreError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("stored {what} cannot be decoded ({detail}): the relay's store is damaged")]
    Corrupt { what: &'static str, detail: String },
    #[error("{0}")]
    InvalidSpace(String),
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error("the stored document cannot be loaded: {0}")]
    Record(#[from] RecordError),
}

#[derive(Debug, Clone)]
pub struct RelayStoreOptions {
    /// How many documents stay loaded in memory.
    pub doc_cache_docs: usize,
    /// Appended changes per record after which its document is saved as a new base.
    pub compact_after: usize,
    pub limits: Limits,
    /// Unique constraints by collection (the relay config's `[collections]`), checked as changes
    /// are logged: a record taking a value another live record holds is counted as a `unique`
    /// conflict.
    pub unique: BTreeMap<String, Vec<Vec<String>>>,
}

impl Default for RelayStoreOptions {
    fn default() -> Self {
        RelayStoreOptions {
            doc_cache_docs: 1024,
            compact_after: 32,
            limits: Limits::default(),
            unique: BTreeMap::new(),
        }
    }
}

pub use ferry_proto::session::LogSlice;

#[derive(Serialize, Deserialize)]
struct StoredEntry {
    collection: String,
    record: String,
    origin: String,
    change: Vec<u8>,
}

type DocKey = (String, String, String);

/// A record within a space: (collection, record id).
type RecordKey = (String, String);

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

/// Conflicts of one kind found in one collection of a space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayConflictCount {
    pub kind: ConflictKind,
    pub collection: String,
    pub detected: u64,
}

/// What one `append` call has staged so far, so later changes of the call see earlier ones.
#[derive(Default)]
struct Staging {
    /// Changes stored earlier in this call, by record and hash, with their seq.
    added: HashMap<ChangeKey, u64>,
    /// Changes refused in this call for what they are (not for a missing dependency), by
    /// record and hash, with the reason: a later change of the call built on one is refused too.
    refused: HashMap<ChangeKey, String>,
    /// Records touched in this call, with their appended (tail) seqs, this call's included.
    tails: HashMap<RecordKey, Vec<u64>>,
    /// Records touched in this call, with their logged heads after this call's changes.
    heads: HashMap<RecordKey, Vec<ChangeHash>>,
    /// Documents of the records this call touched, kept current with its stored changes.
    docs: HashMap<RecordKey, Record>,
    /// Conflicts found in this call, by kind and collection.
    conflicts: BTreeMap<(ConflictKind, String), u64>,
    /// Unique-value index entries read or changed in this call: the records holding a value.
    holders: HashMap<Vec<u8>, Vec<String>>,
    /// The unique values each record touched in this call holds, by constraint.
    held: HashMap<RecordKey, Vec<(usize, Vec<serde_json::Value>)>>,
    /// Bytes of the log entries this call adds.
    log_bytes: u64,
}

pub struct RelayStore {
    kv: Arc<dyn Kv>,
    options: RelayStoreOptions,
    /// The relay never writes changes itself; its documents need an actor all the same.
    actor: ActorId,
    /// Each space's head; its lock serialises appends to the space.
    spaces: Mutex<HashMap<String, Arc<Mutex<u64>>>>,
    cache: Mutex<LruCache<DocKey, Record>>,
    /// Documents read from storage (base and tail) since the store was opened.
    docs_loaded: AtomicU64,
    /// Conflicts found in appended changes since the store was opened, in `ConflictKind::ALL`
    /// order (the per-space counters on disk are the durable record).
    conflicts_found: [AtomicU64; ConflictKind::ALL.len()],
}

impl RelayStore {
    pub fn open(kv: Arc<dyn Kv>, options: RelayStoreOptions) -> Result<Self, RelayStoreError> {
        let capacity = NonZeroUsize::new(options.doc_cache_docs).unwrap_or(NonZeroUsize::MIN);
        Ok(RelayStore {
            kv,
            options,
            actor: ActorId::from(&[0u8; 16][..]),
            spaces: Mutex::new(HashMap::new()),
            cache: Mutex::new(LruCache::new(capacity)),
            docs_loaded: AtomicU64::new(0),
            conflicts_found: Default::default(),
        })
    }

    /// The space's head and append lock, reading the head from storage on first use.
    fn space(&self, space: &str) -> Result<Arc<Mutex<u64>>, RelayStoreError> {
        check_space(space)?;
        let mut spaces = lock(&self.spaces);
        if let Some(state) = spaces.get(space) {
            return Ok(state.clone());
        }
        let prefix = key(b'l', &[space]);
        let head = match self.kv.last_key(&prefix, &prefix_end(&prefix))? {
            Some(k) => seq_at(&k, prefix.len())?,
            None => 0,
        };
        let state = Arc::new(Mutex::new(head));
        spaces.insert(space.to_owned(), state.clone());
        Ok(state)
    }

    /// Makes everything appended durable (`append` already does before it returns).
    pub fn flush(&self) -> Result<(), RelayStoreError> {
        Ok(self.kv.flush()?)
    }

    /// The last seq of the space's log (0 when empty).
    pub fn head(&self, space: &str) -> Result<u64, RelayStoreError> {
        let state = self.space(space)?;
        let head = *lock(&state);
        Ok(head)
    }

    /// Appends uploaded changes to the space's log, in order, and answers each. The whole call is
    /// one atomic batch, flushed before returning: a `Stored` answer is durable. A change whose
    /// dependencies are not in the log (for its record) nor earlier in this call is refused with
    /// `MissingDependencies`, so a device reading the log in order can always apply it.
    pub fn append(
        &self,
        space: &str,
        origin: &str,
        changes: &[UploadChange],
    ) -> Result<Vec<ChangeResult>, RelayStoreError> {
        let state = self.space(space)?;
        let mut head = lock(&state);
        let mut batch = Batch::default();
        let mut next = *head + 1;
        let mut staging = Staging::default();
        let mut results = Vec::with_capacity(changes.len());
        for upload in changes {
            let outcome = self.stage(space, origin, upload, next, &mut staging, &mut batch)?;
            if matches!(outcome, ChangeOutcome::Stored { .. }) {
                next += 1;
            }
            results.push(ChangeResult {
                entry: upload.entry,
                outcome,
            });
        }
        for ((collection, record), tail) in &staging.tails {
            if tail.len() >= self.options.compact_after.max(1) {
                let loaded = staging.docs.get_mut(&(collection.clone(), record.clone()));
                match self.compact(space, collection, record, tail, loaded, &mut batch) {
                    Ok(()) => {}
                    // The changes are in the log either way; the record keeps its tail and is
                    // tried again on its next append.
                    Err(RelayStoreError::Record(e)) => {
                        tracing::warn!(space, collection, record, error = %e, "compaction failed");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for ((collection, record), heads) in &staging.heads {
            batch.put(
                key(b'r', &[space, collection, record]),
                heads.iter().flat_map(|h| h.0).collect(),
            );
        }
        for (k, holders) in &staging.holders {
            if holders.is_empty() {
                batch.remove(k.clone());
            } else {
                batch.put(k.clone(), serde_json::to_vec(holders).unwrap_or_default());
            }
        }
        for ((collection, record), held) in &staging.held {
            batch.put(
                key(b'v', &[space, collection, record]),
                serde_json::to_vec(held).unwrap_or_default(),
            );
        }
        for ((kind, collection), found) in &staging.conflicts {
            let counter = key(b'c', &[space, kind.as_str(), collection]);
            let before = self.counter(&counter)?;
            batch.put(
                counter,
                before.saturating_add(*found).to_be_bytes().to_vec(),
            );
        }
        if staging.log_bytes > 0 {
            let before = self.log_bytes(space)?;
            batch.put(
                key(b's', &[space]),
                before
                    .saturating_add(staging.log_bytes)
                    .to_be_bytes()
                    .to_vec(),
            );
        }
        {
            // A touched record's document comes back below from `staging.docs`, which holds every
            // change of this call; one dropped after a failed apply is read again when needed.
            let mut cache = lock(&self.cache);
            for (collection, record) in staging.tails.keys() {
                cache.pop(&(space.to_owned(), collection.clone(), record.clone()));
            }
        }
        let appended = !batch.is_empty();
        if appended {
            self.kv.apply(batch)?;
            // The entries are in the log from here on, flushed or not: the next call must
            // number after them, never over them.
            *head = next - 1;
        }
        // Validation loaded every document the call touched, each holding what storage now
        // holds: they stay cached for the next change to the same records.
        let mut cache = lock(&self.cache);
        for ((collection, record), doc) in staging.docs {
            cache.put((space.to_owned(), collection, record), doc);
        }
        drop(cache);
        if appended {
            for ((kind, _), found) in &staging.conflicts {
                if let Some(i) = ConflictKind::ALL.iter().position(|k| k == kind)
                    && let Some(counter) = self.conflicts_found.get(i)
                {
                    counter.fetch_add(*found, Ordering::Relaxed);
                }
            }
            self.kv.flush()?;
        }
        Ok(results)
    }

    fn stage(
        &self,
        space: &str,
        origin: &str,
        upload: &UploadChange,
        seq: u64,
        staging: &mut Staging,
        batch: &mut Batch,
    ) -> Result<ChangeOutcome, RelayStoreError> {
        let rejected = |code: ErrorCode, message: String| ChangeOutcome::Rejected { code, message };
        let limits = &self.options.limits;
        if let Err(e) = validate_collection(&upload.collection, limits)
            .and_then(|()| validate_record_id(&upload.record, limits))
        {
            return Ok(rejected(ErrorCode::InvalidChange, e.to_string()));
        }
        let change = match decode_change(&upload.change) {
            Ok(c) => c,
            Err(e) => return Ok(rejected(ErrorCode::InvalidChange, e.to_string())),
        };
        // A device writes every change under its own actor (its device id), so a change under
        // another actor is someone else's change passed off as the uploader's, or a change its
        // author never uploaded: either way not the uploader's to log.
        let actor = change.actor_id().to_hex_string();
        if actor != origin {
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
        if let Some(seq) = self.indexed(space, collection, record, &hash)? {
            return Ok(ChangeOutcome::Duplicate { seq });
        }
        let refuse = |staging: &mut Staging, reason: String| {
            staging.refused.insert(change_key(hash), reason.clone());
            Ok(rejected(ErrorCode::InvalidChange, reason))
        };
        for dep in change.deps() {
            if let Some(reason) = staging.refused.get(&change_key(dep.0)) {
                let reason =
                    format!("the change depends on {dep}, refused in this upload ({reason})");
                return refuse(staging, reason);
            }
            let held = staging.added.contains_key(&change_key(dep.0))
                || self.indexed(space, collection, record, &dep.0)?.is_some();
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
        let new_record = match staging.tails.get(&record_key) {
            Some(_) => false,
            None => {
                let base = key(b'b', &[space, collection, record]);
                if self.kv.get(&base)?.is_some() {
                    let tail = self.tail_seqs(space, collection, record)?;
                    staging.tails.insert(record_key.clone(), tail);
                    false
                } else {
                    true
                }
            }
        };
        let refused_for =
            |e: RecordError| format!("the change cannot be applied to {collection}/{record}: {e}");
        if new_record {
            // A new record's first change is its base, as it is: no tail key needed. It has no
            // dependencies (none can be held yet), so it meets nothing. Its document is not
            // kept: loading it again from its base costs no more than keeping it would.
            if change.seq() != 1 {
                let reason = sequence_refusal(collection, record, change.seq(), 0);
                return refuse(staging, reason);
            }
            if let Err(e) = Record::check_first(change) {
                return refuse(staging, refused_for(e));
            }
            batch.put(
                key(b'b', &[space, collection, record]),
                upload.change.clone(),
            );
            staging.tails.insert(record_key.clone(), Vec::new());
            self.log(space, origin, upload, seq, hash, staging, batch);
            self.check_unique(space, seq, &record_key, staging, batch)?;
            return Ok(ChangeOutcome::Stored { seq });
        }
        let mut doc = match staging.docs.remove(&record_key) {
            Some(doc) => doc,
            None => self.record_doc(space, &record_key, staging, batch)?,
        };
        let last = doc.last_seq_of(change.actor_id());
        if change.seq() != last + 1 {
            staging.docs.insert(record_key, doc);
            let reason = sequence_refusal(collection, record, change.seq(), last);
            return refuse(staging, reason);
        }
        // Applied on the relay's own copy of the document before anything is logged, so that
        // every logged change is one every device can apply.
        let before = doc.heads();
        if let Err(e) = doc.apply_decoded(vec![change.clone()]) {
            if !matches!(e, RecordError::ApplyPanicked(_)) {
                staging.docs.insert(record_key, doc);
            }
            return refuse(staging, refused_for(e));
        }
        self.meet(space, seq, &record_key, &change, before, &mut doc, staging);
        staging.docs.insert(record_key.clone(), doc);
        self.log(space, origin, upload, seq, hash, staging, batch);
        batch.put(seq_key(b't', &[space, collection, record], seq), Vec::new());
        if let Some(tail) = staging.tails.get_mut(&record_key) {
            tail.push(seq);
        }
        self.check_unique(space, seq, &record_key, staging, batch)?;
        Ok(ChangeOutcome::Stored { seq })
    }

    /// For a collection with unique constraints: moves the record's values in the relay's
    /// unique index to what its document (all logged changes, this one included) now holds, and
    /// counts a `unique` conflict for each value another live record already holds. Devices find
    /// the same clashes, with their own constraints; the relay's count is for operators.
    fn check_unique(
        &self,
        space: &str,
        seq: u64,
        record_key: &RecordKey,
        staging: &mut Staging,
        batch: &Batch,
    ) -> Result<(), RelayStoreError> {
        let Some(constraints) = self.options.unique.get(&record_key.0) else {
            return Ok(());
        };
        let (collection, record) = (record_key.0.as_str(), record_key.1.as_str());
        let mut doc = match staging.docs.remove(record_key) {
            Some(doc) => doc,
            None => self.record_doc(space, record_key, staging, batch)?,
        };
        let policy = Policy {
            unique: constraints.clone(),
            ..Policy::default()
        };
        let values = resolve::unique_values(&resolve::view(&mut doc, &policy), &policy);
        staging.docs.insert(record_key.clone(), doc);
        let before = match staging.held.get(record_key) {
            Some(held) => held.clone(),
            None => self
                .stored_json(&key(b'v', &[space, collection, record]), "unique values")?
                .unwrap_or_default(),
        };
        if before == values {
            return Ok(());
        }
        let value_key = |(constraint, value): &(usize, Vec<serde_json::Value>)| {
            let value = serde_json::to_string(value).unwrap_or_default();
            key(b'u', &[space, collection, &constraint.to_string(), &value])
        };
        for gone in before.iter().filter(|v| !values.contains(v)) {
            let k = value_key(gone);
            let mut holders = self.holders(staging, &k)?;
            holders.retain(|r| r != record);
            staging.holders.insert(k, holders);
        }
        for new in values.iter().filter(|v| !before.contains(v)) {
            let k = value_key(new);
            let mut holders = self.holders(staging, &k)?;
            if let Some(first) = holders.first() {
                tracing::info!(space, collection, record, seq, holder = %first,
                    "conflict found: a unique value another record holds");
                *staging
                    .conflicts
                    .entry((ConflictKind::Unique, collection.to_owned()))
                    .or_insert(0) += 1;
            }
            holders.push(record.to_owned());
            staging.holders.insert(k, holders);
        }
        staging.held.insert(record_key.clone(), values);
        Ok(())
    }

    fn holders(&self, staging: &Staging, key: &[u8]) -> Result<Vec<String>, RelayStoreError> {
        match staging.holders.get(key) {
            Some(holders) => Ok(holders.clone()),
            None => Ok(self
                .stored_json(key, "unique value index")?
                .unwrap_or_default()),
        }
    }

    fn stored_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, RelayStoreError> {
        match self.kv.get(key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| RelayStoreError::Corrupt {
                        what,
                        detail: e.to_string(),
                    })
            }
        }
    }

    /// Stages the log entry and the dedup index entry of a stored change.
    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        space: &str,
        origin: &str,
        upload: &UploadChange,
        seq: u64,
        hash: [u8; 32],
        staging: &mut Staging,
        batch: &mut Batch,
    ) {
        let (collection, record) = (&upload.collection, &upload.record);
        let entry = StoredEntry {
            collection: collection.clone(),
            record: record.clone(),
            origin: origin.to_owned(),
            change: upload.change.clone(),
        };
        let encoded = encode(&entry);
        staging.log_bytes += encoded.len() as u64;
        batch.put(seq_key(b'l', &[space], seq), encoded);
        batch.put(
            hash_key(space, collection, record, &hash),
            seq.to_be_bytes().to_vec(),
        );
        staging
            .added
            .insert((collection.clone(), record.clone(), hash), seq);
    }

    /// Meets an existing record's new change, already applied to `doc`, with the changes logged
    /// before it (whose heads are `before`): moves the record's heads, and counts the conflict
    /// it brings, if any. A change built on exactly the logged heads conflicts with nothing.
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
    ) {
        let (collection, record) = (record_key.0.as_str(), record_key.1.as_str());
        let hash = change.hash();
        let deps: BTreeSet<ChangeHash> = change.deps().iter().copied().collect();
        staging.heads.insert(record_key.clone(), doc.heads());
        if deps == before.iter().copied().collect::<BTreeSet<_>>() {
            return;
        }
        let at = LogPosition {
            seq,
            collection,
            record,
        };
        let detection = resolve::detect(doc.automerge(), &before, &hash, at, &Policy::default());
        if let Some(conflict) = detection.conflict {
            tracing::info!(
                space,
                collection,
                record,
                seq,
                kind = conflict.kind.as_str(),
                conflict = %conflict.id,
                fields = conflict.fields.len(),
                "conflict found"
            );
            *staging
                .conflicts
                .entry((conflict.kind, collection.to_owned()))
                .or_insert(0) += 1;
        }
    }

    /// The record's logged heads as stored; for a record with one change (whose heads are not
    /// stored, see the key layout) that change; for a record logged before heads were kept, as
    /// its document has them.
    fn logged_heads(
        &self,
        space: &str,
        record_key: &RecordKey,
        staging: &mut Staging,
        batch: &Batch,
    ) -> Result<Vec<ChangeHash>, RelayStoreError> {
        let (collection, record) = (record_key.0.as_str(), record_key.1.as_str());
        if let Some(bytes) = self.kv.get(&key(b'r', &[space, collection, record]))? {
            return bytes
                .chunks(32)
                .map(ChangeHash::try_from)
                .collect::<Result<_, _>>()
                .map_err(|e| RelayStoreError::Corrupt {
                    what: "record heads",
                    detail: e.to_string(),
                });
        }
        let only_base = staging.tails.get(record_key).is_none_or(Vec::is_empty);
        let base_key = key(b'b', &[space, collection, record]);
        let base = match batch.get(&base_key) {
            Some(bytes) => Some(bytes.to_vec()),
            None => self.kv.get(&base_key)?,
        };
        // A base that is one change (not a saved document) with no tail is the record's only
        // change.
        // Hashing the chunk is all that takes, not decoding the change.
        let first = base
            .as_deref()
            .and_then(chunk_hash)
            .and_then(|h| h.parse::<ChangeHash>().ok());
        if only_base && let Some(first) = first {
            return Ok(vec![first]);
        }
        let mut doc = self.record_doc(space, record_key, staging, batch)?;
        let heads = doc.heads();
        staging.docs.insert(record_key.clone(), doc);
        Ok(heads)
    }

    /// The record's document with every change logged so far, this call's staged ones included:
    /// from the cache when it holds it, otherwise loaded from its base and tail.
    fn record_doc(
        &self,
        space: &str,
        record_key: &RecordKey,
        staging: &Staging,
        batch: &Batch,
    ) -> Result<Record, RelayStoreError> {
        let (collection, record) = (record_key.0.as_str(), record_key.1.as_str());
        let tail = staging
            .tails
            .get(record_key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let cached =
            lock(&self.cache).pop(&(space.to_owned(), record_key.0.clone(), record_key.1.clone()));
        match cached {
            // A cached document holds what storage holds; this call's changes are added to it.
            Some(mut doc) => {
                let staged = tail
                    .iter()
                    .filter(|seq| batch.get(&seq_key(b'l', &[space], **seq)).is_some())
                    .map(|&seq| self.change_at(space, seq, batch))
                    .collect::<Result<Vec<_>, _>>()?;
                doc.apply_changes(&staged)?;
                Ok(doc)
            }
            None => self
                .load_doc(space, collection, record, tail, batch)?
                .ok_or(RelayStoreError::Corrupt {
                    what: "record base",
                    detail: format!("{collection}/{record} has logged changes but no base"),
                }),
        }
    }

    /// Loads a record's document from its base and the tail changes `tail`, reading both from
    /// the batch being built or from storage. `None` when the record has no base.
    fn load_doc(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        tail: &[u64],
        batch: &Batch,
    ) -> Result<Option<Record>, RelayStoreError> {
        let base_key = key(b'b', &[space, collection, record]);
        // A record created in this batch has its base only in the batch so far.
        let base = match batch.get(&base_key) {
            Some(bytes) => bytes.to_vec(),
            None => match self.kv.get(&base_key)? {
                Some(bytes) => bytes,
                None => return Ok(None),
            },
        };
        self.docs_loaded.fetch_add(1, Ordering::Relaxed);
        let mut doc = Record::load(&base, &self.actor)?;
        let changes = tail
            .iter()
            .map(|&seq| self.change_at(space, seq, batch))
            .collect::<Result<Vec<_>, _>>()?;
        if doc.apply_changes(&changes).is_ok() {
            return Ok(Some(doc));
        }
        // A log written before every change was validated may hold changes that cannot be
        // applied. The document is then what the others make, as on devices, which quarantine
        // such entries: one bad change must not make the record unusable.
        let mut doc = Record::load(&base, &self.actor)?;
        let mut applied = Vec::with_capacity(changes.len());
        for (change, seq) in changes.into_iter().zip(tail) {
            match doc.apply_changes(std::slice::from_ref(&change)) {
                Ok(_) => applied.push(change),
                Err(e) => {
                    tracing::warn!(space, collection, record, seq, error = %e,
                        "a logged change cannot be applied to its record's document: left out");
                    if matches!(e, RecordError::ApplyPanicked(_)) {
                        doc = Record::load(&base, &self.actor)?;
                        doc.apply_changes(&applied)?;
                    }
                }
            }
        }
        Ok(Some(doc))
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
        Ok(self.kv.size_on_disk()?)
    }

    /// Digests the logged heads of up to `max_records` records of the space after `after`, in
    /// key order (the answer to a device's `CheckHeads`). Appends to the space wait meanwhile,
    /// so the digest is of one log prefix: `head`'s. Reads no document, except for records
    /// logged before their heads were kept.
    pub fn heads_digest(
        &self,
        space: &str,
        after: Option<&RecordName>,
        max_records: u32,
    ) -> Result<HeadsPage, RelayStoreError> {
        let state = self.space(space)?;
        let head = lock(&state);
        let all = key(b'b', &[space]);
        let end = prefix_end(&all);
        let start = match after {
            Some(name) => [key(b'b', &[space, &name.collection, &name.record]), vec![0]].concat(),
            None => all.clone(),
        };
        let wanted = max_records.max(1) as usize;
        let mut page = self.kv.range(&start, &end, wanted + 1)?;
        let complete = page.len() <= wanted;
        page.truncate(wanted);
        let mut hasher = HeadsHasher::default();
        let mut last = None;
        for (k, _) in &page {
            let mut parts = k.get(all.len()..).unwrap_or_default().split(|&b| b == 0);
            let (Some(collection), Some(record)) = (parts.next(), parts.next()) else {
                return Err(RelayStoreError::Corrupt {
                    what: "record key",
                    detail: "a base key without collection and record".into(),
                });
            };
            let name = RecordName {
                collection: String::from_utf8_lossy(collection).into_owned(),
                record: String::from_utf8_lossy(record).into_owned(),
            };
            let record_key = (name.collection.clone(), name.record.clone());
            let heads = self.logged_heads(
                space,
                &record_key,
                &mut Staging::default(),
                &Batch::default(),
            )?;
            let mut heads: Vec<[u8; 32]> = heads.iter().map(|h| h.0).collect();
            hasher.record(&name.collection, &name.record, &mut heads);
            last = Some(name);
        }
        let (records, digest) = hasher.finish();
        Ok(HeadsPage {
            head: *head,
            records,
            last,
            complete,
            digest,
        })
    }

    /// Bytes of the space's log entries: what the account's quota is measured against. A log
    /// written before this count was kept is measured once, by reading it.
    pub fn log_bytes(&self, space: &str) -> Result<u64, RelayStoreError> {
        check_space(space)?;
        if self.kv.get(&key(b's', &[space]))?.is_some() {
            return self.counter(&key(b's', &[space]));
        }
        let prefix = key(b'l', &[space]);
        let end = prefix_end(&prefix);
        let (mut start, mut total) = (prefix.clone(), 0u64);
        loop {
            let page = self.kv.range(&start, &end, 1024)?;
            let Some((last, _)) = page.last() else {
                return Ok(total);
            };
            start = [last.as_slice(), &[0]].concat();
            total = page
                .iter()
                .fold(total, |t, (_, v)| t.saturating_add(v.len() as u64));
        }
    }

    /// Conflicts found in the space's log so far, all kinds and collections together.
    pub fn conflicts_total(&self, space: &str) -> Result<u64, RelayStoreError> {
        Ok(self
            .conflict_counts(space)?
            .iter()
            .map(|c| c.detected)
            .sum())
    }

    fn counter(&self, key: &[u8]) -> Result<u64, RelayStoreError> {
        let Some(value) = self.kv.get(key)? else {
            return Ok(0);
        };
        <[u8; 8]>::try_from(value.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| RelayStoreError::Corrupt {
                what: "counter",
                detail: format!("{} bytes instead of 8", value.len()),
            })
    }

    /// The conflicts found in the space's log so far, per kind and collection, under the relay's
    /// `merge` policy (unique constraints are not checked on the relay).
    pub fn conflict_counts(&self, space: &str) -> Result<Vec<RelayConflictCount>, RelayStoreError> {
        check_space(space)?;
        let prefix = key(b'c', &[space]);
        self.kv
            .range(&prefix, &prefix_end(&prefix), usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let corrupt = || RelayStoreError::Corrupt {
                    what: "conflict counter key",
                    detail: String::from_utf8_lossy(&k).into_owned(),
                };
                let rest = k
                    .get(prefix.len()..k.len().saturating_sub(1))
                    .ok_or_else(corrupt)?;
                let text = std::str::from_utf8(rest).map_err(|_| corrupt())?;
                let (kind, collection) = text.split_once('\0').ok_or_else(corrupt)?;
                let kind = ConflictKind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == kind)
                    .ok_or_else(corrupt)?;
                let detected = <[u8; 8]>::try_from(v.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt())?;
                Ok(RelayConflictCount {
                    kind,
                    collection: collection.to_owned(),
                    detected,
                })
            })
            .collect()
    }

    /// The dedup index entry of a change hash: its seq and record.
    /// The seq at which the record's change `hash` was stored, if it was.
    fn indexed(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        hash: &[u8; 32],
    ) -> Result<Option<u64>, RelayStoreError> {
        let Some(value) = self.kv.get(&hash_key(space, collection, record, hash))? else {
            return Ok(None);
        };
        let seq = <[u8; 8]>::try_from(value.as_slice()).map_err(|_| RelayStoreError::Corrupt {
            what: "change index entry",
            detail: format!("{} bytes instead of 8", value.len()),
        })?;
        Ok(Some(u64::from_be_bytes(seq)))
    }

    fn tail_seqs(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Vec<u64>, RelayStoreError> {
        let prefix = key(b't', &[space, collection, record]);
        self.kv
            .range(&prefix, &prefix_end(&prefix), usize::MAX)?
            .iter()
            .map(|(k, _)| seq_at(k, prefix.len()))
            .collect()
    }

    /// Writes the record's document, including this batch's changes, as its new base and drops
    /// its tail keys (those stored and those `tail` adds in this batch). `loaded` is the document
    /// detection already holds with all of them, if it does.
    fn compact(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        tail: &[u64],
        loaded: Option<&mut Record>,
        batch: &mut Batch,
    ) -> Result<(), RelayStoreError> {
        let saved = match loaded {
            Some(doc) => doc.save(),
            None => self
                .load_doc(space, collection, record, tail, batch)?
                .ok_or(RelayStoreError::Corrupt {
                    what: "record base",
                    detail: format!("{collection}/{record} has logged changes but no base"),
                })?
                .save(),
        };
        batch.put(key(b'b', &[space, collection, record]), saved);
        for &seq in tail {
            batch.remove(seq_key(b't', &[space, collection, record], seq));
        }
        Ok(())
    }

    /// The change bytes at `seq`, from the batch being built or from storage.
    fn change_at(&self, space: &str, seq: u64, batch: &Batch) -> Result<Vec<u8>, RelayStoreError> {
        let key = seq_key(b'l', &[space], seq);
        let bytes = match batch.get(&key) {
            Some(bytes) => bytes.to_vec(),
            None => self.kv.get(&key)?.ok_or(RelayStoreError::Corrupt {
                what: "log entry",
                detail: format!("seq {seq} is named by a record but missing"),
            })?,
        };
        Ok(decode::<StoredEntry>(&bytes, "log entry")?.change)
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
        let max_changes = max_changes.max(1);
        let prefix = key(b'l', &[space]);
        let end = prefix_end(&prefix);
        let mut start = seq_key(b'l', &[space], after.saturating_add(1));
        let mut slice = LogSlice {
            after,
            through: after,
            head,
            entries: Vec::new(),
        };
        let mut bytes = 0usize;
        'scan: while slice.entries.len() < max_changes {
            let page = self
                .kv
                .range(&start, &end, (max_changes - slice.entries.len()).min(256))?;
            let Some((last, _)) = page.last() else { break };
            start = after_key(last);
            for (k, v) in page {
                let seq = seq_at(&k, prefix.len())?;
                let entry: StoredEntry = decode(&v, "log entry")?;
                if !slice.entries.is_empty() && bytes.saturating_add(entry.change.len()) > max_bytes
                {
                    break 'scan;
                }
                bytes = bytes.saturating_add(entry.change.len());
                slice.entries.push(LogEntry {
                    seq,
                    collection: entry.collection,
                    record: entry.record,
                    change: entry.change,
                });
                slice.through = seq;
                if slice.entries.len() == max_changes {
                    break 'scan;
                }
            }
        }
        // Entries appended since the head was read raise it; a cursor past the log does not,
        // so that the session can tell the device the relay lost part of its log.
        if let Some(last) = slice.entries.last() {
            slice.head = slice.head.max(last.seq);
        }
        Ok(slice)
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
        let doc_key = (space.to_owned(), collection.to_owned(), id.to_owned());
        // The space's lock keeps an append from landing between reading the base and the tail.
        let state = self.space(space)?;
        let _appends = lock(&state);
        let mut cache = lock(&self.cache);
        if let Some(doc) = cache.get_mut(&doc_key) {
            return Ok(Some(f(doc)));
        }
        let tail = self.tail_seqs(space, collection, id)?;
        let Some(mut doc) = self.load_doc(space, collection, id, &tail, &Batch::default())? else {
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

    /// The record's changes, oldest first; `None` if the space has no such record.
    pub fn history(
        &self,
        space: &str,
        collection: &str,
        id: &str,
    ) -> Result<Option<Vec<crate::record::HistoryEntry>>, RelayStoreError> {
        self.with_doc(space, collection, id, Record::history)
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
        let all = key(b'b', &[space]);
        let end = prefix_end(&all);
        let mut start = all.clone();
        let mut out = Vec::new();
        while let Some((k, _)) = self.kv.range(&start, &end, 1)?.pop() {
            let rest = k.get(all.len()..).unwrap_or_default();
            let name_len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let name = String::from_utf8_lossy(&rest[..name_len]).into_owned();
            let prefix = key(b'b', &[space, &name]);
            let after_collection = prefix_end(&prefix);
            out.push((name, self.kv.count(&prefix, &after_collection)?));
            start = after_collection;
        }
        Ok(out)
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
        let prefix = key(b'b', &[space, collection]);
        let start = match after {
            Some(id) => after_key(&key(b'b', &[space, collection, id])),
            None => prefix.clone(),
        };
        self.kv
            .range(&start, &prefix_end(&prefix), limit)?
            .into_iter()
            .map(|(k, _)| {
                // The id part ends with the `\0` every key part ends with.
                k.get(prefix.len()..k.len().saturating_sub(1))
                    .and_then(|id| String::from_utf8(id.to_vec()).ok())
                    .ok_or(RelayStoreError::Corrupt {
                        what: "record key",
                        detail: "the id is not text".into(),
                    })
            })
            .collect()
    }
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every holder leaves the data whole before anything can panic (heads are set after their
    // batch lands; cached documents are replaced, not edited, on append).
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// `{kind}{part}\0{part}\0...`: each part ends with `\0`, so one part's keys are contiguous.
fn key(kind: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![kind];
    for part in parts {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k
}

fn seq_key(kind: u8, parts: &[&str], seq: u64) -> Vec<u8> {
    let mut k = key(kind, parts);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A change as the relay identifies it: the record it belongs to and its hash.
type ChangeKey = (String, String, [u8; 32]);

fn hash_key(space: &str, collection: &str, record: &str, hash: &[u8; 32]) -> Vec<u8> {
    let mut k = key(b'h', &[space, collection, record]);
    k.extend_from_slice(hash);
    k
}

fn seq_at(key: &[u8], prefix_len: usize) -> Result<u64, RelayStoreError> {
    key.get(prefix_len..)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or(RelayStoreError::Corrupt {
            what: "log key",
            detail: "sequence of the wrong length".into(),
        })
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    crate::store::keys::prefix_end(prefix)
}

fn after_key(key: &[u8]) -> Vec<u8> {
    crate::store::keys::after(key)
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, RelayStoreError> {
    postcard::from_bytes(bytes).map_err(|e| RelayStoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}
