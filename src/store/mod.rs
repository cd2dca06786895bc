//! The device's durable state: record documents, the SyncQueue, the SyncLog and metadata.
//!
//! Owns: key layout, the rule that a local write and its queue entry land in one atomic batch,
//! the bounded cache of loaded documents, and queue/log bookkeeping. Durability is explicit:
//! `write` makes a change visible, `flush` makes everything written so far durable, and callers
//! acknowledge a write only after the flush that covers it (see `daemon::committer`).
//!
//! Must not touch: sockets, JSON-RPC, the CLI. It knows records only through `record`.

pub mod keys;
pub mod kv;

use crate::record::{Fields, HistoryEntry, Record, RecordError, validate_fields};
use automerge::ActorId;
use ferry_proto::{
    AddressError, IdGenerator, Limits, Operation, QueueStatus, SyncLogEntry, SyncQueueEntry,
    TransitionError, validate_collection, validate_record_id,
};
use kv::{Batch, Kv, KvError};
use lru::LruCache;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, btree_map};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const FORMAT_VERSION: &[u8] = b"1";

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
    #[error("collection {0:?} is not declared in the config: add a [collections.{0}] section")]
    UnknownCollection(String),
    #[error(
        "this data directory belongs to device {stored}, but the identity key is device {given}: use the data directory's own key"
    )]
    WrongDevice { stored: String, given: String },
    #[error("the data directory has store format {0:?}, which this version of ferry cannot read")]
    UnsupportedFormat(String),
    #[error("queue entry {0} not found")]
    QueueEntryNotFound(u64),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("stored {what} cannot be decoded ({detail}): the store is damaged")]
    Decode { what: &'static str, detail: String },
}

/// Source of the current time, so tests can run on a fake clock.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            limits: Limits::default(),
            cache_docs: 1024,
            priorities: BTreeMap::new(),
            declared_collections: None,
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
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Applied {
    pub collection: String,
    pub id: String,
    /// `None` when the record already held exactly this content.
    pub operation: Option<Operation>,
    /// The record's heads afterwards, hex.
    pub heads: Vec<String>,
    /// The SyncQueue entry holding the change.
    pub queue_id: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecordView {
    pub collection: String,
    pub id: String,
    pub fields: Fields,
    pub heads: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct QueueCounts {
    pub pending: u64,
    pub processing: u64,
    pub completed: u64,
    pub failed: u64,
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
        let actor = ActorId::from(hex_decode(device_id).unwrap_or_default().as_slice());
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
                kv.apply(batch)?;
                kv.flush()?;
            }
        }
        match kv.get(keys::META_FORMAT)? {
            Some(v) if v == FORMAT_VERSION => {}
            other => {
                let found = other.map(|v| String::from_utf8_lossy(&v).into_owned());
                return Err(StoreError::UnsupportedFormat(found.unwrap_or_default()));
            }
        }
        let next_queue_id = next_seq(kv.as_ref(), keys::QUEUE)?;
        let next_log_id = next_seq(kv.as_ref(), keys::LOG)?;
        let capacity = NonZeroUsize::new(options.cache_docs.max(1)).unwrap_or(NonZeroUsize::MIN);
        Ok(Store {
            kv,
            actor,
            device_id: device_id.to_owned(),
            options,
            clock,
            cache: Mutex::new(LruCache::new(capacity)),
            ids: Mutex::new(IdGenerator::new()),
            next_queue_id: AtomicU64::new(next_queue_id),
            next_log_id: AtomicU64::new(next_log_id),
        })
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn limits(&self) -> &Limits {
        &self.options.limits
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
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
    pub fn write_all(&self, writes: Vec<Write>) -> Result<Vec<Applied>, StoreError> {
        let mut cache = self.lock_cache();
        let mut batch = Batch::default();
        let mut working = BTreeMap::new();
        let mut results = Vec::with_capacity(writes.len());
        let mut staged = Ok(());
        for write in writes {
            match self.stage(&mut cache, write, &mut batch, &mut working) {
                Ok(applied) => results.push(applied),
                Err(e) => {
                    staged = Err(e);
                    break;
                }
            }
        }
        let outcome = staged.and_then(|()| {
            if batch.is_empty() {
                Ok(())
            } else {
                self.kv.apply(batch).map_err(StoreError::from)
            }
        });
        // On failure the batch's documents hold changes that never reached storage: they are
        // dropped with the working set, so the next write starts from what is stored.
        outcome?;
        for (key, record) in working {
            cache.put(key, record);
        }
        Ok(results)
    }

    fn stage(
        &self,
        cache: &mut LruCache<CacheKey, Record>,
        write: Write,
        batch: &mut Batch,
        working: &mut BTreeMap<CacheKey, Record>,
    ) -> Result<Applied, StoreError> {
        let now = self.clock.now_ms();
        let (collection, id) = match &write {
            Write::Put { collection, id, .. } => {
                let id = match id {
                    Some(id) => id.clone(),
                    None => self.new_id(now),
                };
                (collection.clone(), id)
            }
            Write::Patch { collection, id, .. } | Write::Delete { collection, id } => {
                (collection.clone(), id.clone())
            }
        };
        self.check_address(&collection, &id)?;
        let key = (collection, id);
        let record = self.working(cache, working, &key)?;
        let written = match write {
            Write::Put { fields, .. } => {
                validate_fields(&fields, &self.options.limits)?;
                record.put(&fields, now)
            }
            Write::Patch { set, unset, .. } => {
                validate_fields(&set, &self.options.limits)?;
                if !record.is_live() {
                    return Err(not_found(&key));
                }
                let written = record.patch(&set, &unset, now)?;
                if written.is_some() {
                    validate_fields(&record.fields(), &self.options.limits)?;
                }
                Ok(written)
            }
            Write::Delete { .. } => {
                if !record.is_live() {
                    return Err(not_found(&key));
                }
                record.delete(now)
            }
        };
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                record.rollback();
                return Err(e.into());
            }
        };
        let heads = record.heads().iter().map(|h| h.to_string()).collect();
        let (collection, id) = key;
        let Some(written) = written else {
            return Ok(Applied {
                collection,
                id,
                operation: None,
                heads,
                queue_id: None,
            });
        };
        batch.put(keys::doc(&collection, &id), record.save());
        let queue_id = self.next_queue_id.fetch_add(1, Ordering::SeqCst);
        let entry = SyncQueueEntry {
            id: queue_id,
            operation: written.operation,
            model_name: collection.clone(),
            object_id: id.clone(),
            data: written.change.raw_bytes().to_vec(),
            status: QueueStatus::Pending,
            retry_count: 0,
            last_error: None,
            created_at: now,
            updated_at: now,
            priority: self.priority(&collection),
        };
        batch.put(keys::queue(queue_id), encode(&entry));
        Ok(Applied {
            collection,
            id,
            operation: Some(written.operation),
            heads,
            queue_id: Some(queue_id),
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

    fn check_address(&self, collection: &str, id: &str) -> Result<(), StoreError> {
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        self.check_declared(collection)
    }

    fn check_declared(&self, collection: &str) -> Result<(), StoreError> {
        match &self.options.declared_collections {
            Some(declared) if !declared.contains(collection) => {
                Err(StoreError::UnknownCollection(collection.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// The document for `key` in a batch's working set: taken out of the cache (or loaded, or
    /// started empty) on first use, and kept out of it until the batch has landed, so that the
    /// cache cannot evict a document, and the changes staged on it, half way through a batch.
    fn working<'w>(
        &self,
        cache: &mut LruCache<CacheKey, Record>,
        working: &'w mut BTreeMap<CacheKey, Record>,
        key: &CacheKey,
    ) -> Result<&'w mut Record, StoreError> {
        match working.entry(key.clone()) {
            btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            btree_map::Entry::Vacant(e) => {
                let record = match cache.pop(key) {
                    Some(record) => record,
                    None => self
                        .load(&key.0, &key.1)?
                        .unwrap_or_else(|| Record::new(&self.actor)),
                };
                Ok(e.insert(record))
            }
        }
    }

    fn load(&self, collection: &str, id: &str) -> Result<Option<Record>, StoreError> {
        match self.kv.get(&keys::doc(collection, id))? {
            Some(bytes) => Ok(Some(Record::load(&bytes, &self.actor)?)),
            None => Ok(None),
        }
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

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        Ok(self.kv.flush()?)
    }

    /// A live record.
    pub fn get(&self, collection: &str, id: &str) -> Result<RecordView, StoreError> {
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        let key = (collection.to_owned(), id.to_owned());
        self.with_record(collection, id, |r| {
            r.is_live().then(|| view(collection, id, r))
        })?
        .flatten()
        .ok_or_else(|| not_found(&key))
    }

    /// Live records of a collection in id order, starting after `after`.
    pub fn list(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<RecordView>, Option<String>), StoreError> {
        validate_collection(collection, &self.options.limits)?;
        let prefix = keys::doc_prefix(collection);
        let mut start = match after {
            Some(id) => keys::after(&keys::doc(collection, id)),
            None => prefix.clone(),
        };
        let end = keys::prefix_end(&prefix);
        let mut out = Vec::new();
        while out.len() < limit {
            let page = self.kv.range(&start, &end, 256)?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            for (key, bytes) in page {
                let id = keys::doc_id(&key, prefix.len())?;
                let key = (collection.to_owned(), id.to_owned());
                let mut cache = self.lock_cache();
                let live = match cache.get_mut(&key) {
                    Some(r) => r.is_live().then(|| view(collection, id, r)),
                    None => {
                        let mut r = Record::load(&bytes, &self.actor)?;
                        r.is_live().then(|| view(collection, id, &mut r))
                    }
                };
                if let Some(v) = live {
                    out.push(v);
                    if out.len() == limit {
                        break;
                    }
                }
            }
        }
        let next = if out.len() == limit {
            out.last().map(|v| v.id.clone())
        } else {
            None
        };
        Ok((out, next))
    }

    /// Collection names that hold at least one document (live or deleted), with their document
    /// counts.
    pub fn collections(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        let mut start = keys::DOC_ALL.to_vec();
        let end = keys::prefix_end(keys::DOC_ALL);
        while let Some((key, _)) = self.kv.range(&start, &end, 1)?.pop() {
            let name = keys::doc_collection(&key)?.to_owned();
            let prefix = keys::doc_prefix(&name);
            let after_collection = keys::prefix_end(&prefix);
            let count = self.kv.count(&prefix, &after_collection)?;
            out.push((name, count));
            start = after_collection;
        }
        Ok(out)
    }

    /// Every change of a record, deleted or not.
    pub fn history(&self, collection: &str, id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        self.with_record(collection, id, |r| r.history())?
            .ok_or_else(|| not_found(&(collection.to_owned(), id.to_owned())))
    }

    /// The record's Automerge document, as any Automerge implementation can load it.
    pub fn export_doc(&self, collection: &str, id: &str) -> Result<Vec<u8>, StoreError> {
        validate_collection(collection, &self.options.limits)?;
        validate_record_id(id, &self.options.limits)?;
        self.with_record(collection, id, |r| r.save())?
            .ok_or_else(|| not_found(&(collection.to_owned(), id.to_owned())))
    }

    /// Queue entries in id order, optionally of one status, starting after `after`.
    pub fn queue(
        &self,
        status: Option<QueueStatus>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<SyncQueueEntry>, StoreError> {
        let mut start = after.map_or_else(|| keys::QUEUE.to_vec(), |id| keys::queue(id + 1));
        let end = keys::prefix_end(keys::QUEUE);
        let mut out = Vec::new();
        while out.len() < limit {
            let page = self.kv.range(&start, &end, 512)?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            for (_, bytes) in page {
                let entry: SyncQueueEntry = decode(&bytes, "queue entry")?;
                if status.is_none_or(|s| s == entry.status) {
                    out.push(entry);
                    if out.len() == limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    pub fn queue_counts(&self) -> Result<QueueCounts, StoreError> {
        let mut counts = QueueCounts::default();
        for entry in self.queue(None, None, usize::MAX)? {
            *match entry.status {
                QueueStatus::Pending => &mut counts.pending,
                QueueStatus::Processing => &mut counts.processing,
                QueueStatus::Completed => &mut counts.completed,
                QueueStatus::Failed => &mut counts.failed,
            } += 1;
        }
        Ok(counts)
    }

    /// Moves the given entries to a new state, all in one atomic batch: if any move is not
    /// allowed, none is made. Durable after `flush`.
    pub fn queue_transition(
        &self,
        ids: &[u64],
        action: &QueueAction,
    ) -> Result<Vec<SyncQueueEntry>, StoreError> {
        let now = self.clock.now_ms();
        let mut batch = Batch::default();
        let mut updated = Vec::with_capacity(ids.len());
        for &id in ids {
            let bytes = self
                .kv
                .get(&keys::queue(id))?
                .ok_or(StoreError::QueueEntryNotFound(id))?;
            let mut entry: SyncQueueEntry = decode(&bytes, "queue entry")?;
            match action {
                QueueAction::Start => entry.start(now),
                QueueAction::Complete => entry.complete(now),
                QueueAction::Fail { error, max_retries } => {
                    entry.fail(error.clone(), *max_retries, now)
                }
                QueueAction::Retry => entry.retry(now),
                QueueAction::RequeueInterrupted => entry.requeue_interrupted(now),
            }?;
            batch.put(keys::queue(id), encode(&entry));
            updated.push(entry);
        }
        if !batch.is_empty() {
            self.kv.apply(batch)?;
        }
        Ok(updated)
    }

    /// After an unclean stop, entries caught mid-upload go back to pending. Returns how many.
    pub fn recover_interrupted(&self) -> Result<usize, StoreError> {
        let ids: Vec<u64> = self
            .queue(Some(QueueStatus::Processing), None, usize::MAX)?
            .iter()
            .map(|e| e.id)
            .collect();
        self.queue_transition(&ids, &QueueAction::RequeueInterrupted)?;
        self.flush()?;
        Ok(ids.len())
    }

    /// Appends a SyncLog entry (its `id` is assigned here). Durable after `flush`.
    pub fn log_append(&self, mut entry: SyncLogEntry) -> Result<SyncLogEntry, StoreError> {
        entry.id = self.next_log_id.fetch_add(1, Ordering::SeqCst);
        let mut batch = Batch::default();
        batch.put(keys::log(entry.id), encode(&entry));
        self.kv.apply(batch)?;
        Ok(entry)
    }

    /// SyncLog entries, newest first, older than `before`.
    pub fn log(&self, before: Option<u64>, limit: usize) -> Result<Vec<SyncLogEntry>, StoreError> {
        let end = before.map_or_else(|| keys::prefix_end(keys::LOG), keys::log);
        let mut out = Vec::new();
        let mut end = end;
        while out.len() < limit {
            let Some(key) = self.kv.last_key(keys::LOG, &end)? else {
                break;
            };
            if let Some(bytes) = self.kv.get(&key)? {
                out.push(decode(&bytes, "log entry")?);
            }
            end = key;
        }
        Ok(out)
    }

    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.kv.size_on_disk()?)
    }
}

fn view(collection: &str, id: &str, record: &mut Record) -> RecordView {
    RecordView {
        collection: collection.to_owned(),
        id: id.to_owned(),
        fields: record.fields(),
        heads: record.heads().iter().map(|h| h.to_string()).collect(),
    }
}

fn not_found(key: &CacheKey) -> StoreError {
    StoreError::NotFound {
        collection: key.0.clone(),
        id: key.1.clone(),
    }
}

fn next_seq(kv: &dyn Kv, prefix: &[u8]) -> Result<u64, StoreError> {
    let last = kv.last_key(prefix, &keys::prefix_end(prefix))?;
    last.map_or(Ok(1), |k| keys::seq_of(&k, prefix.len()).map(|n| n + 1))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
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

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
