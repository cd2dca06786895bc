//! The storage trait the store is written against, and its two engines: sled on disk and an
//! in-memory map for tests. The trait is deliberately narrow (ordered keys, atomic batches, an
//! explicit durability point) so that another engine can replace sled without touching the store.
//!
//! Both engines keep each value with a CRC-32 of its key and bytes (`seal`), so a value damaged
//! on disk is refused when read (`KvError::Damaged`, naming its key) rather than returned. sled
//! drops, without a word, everything after the first record of its log that fails its own
//! checksum when it recovers; what it dropped cannot be read back, so the sled engine keeps a
//! journal beside it (`Journal`): an append-only file, appended to by every `flush` (synced when
//! it carries records), holding the number of the last batch made durable (every batch writes its number into sled too) and the
//! records a batch asks to be kept outside sled (`Batch::journal`: the store's unsynced local
//! changes). At open, a sled holding an older batch than the journal says was made durable has
//! lost data (`Kv::lost`), and the journal's records are there to restore from.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(
        "the disk is full ({0}): free space on the data directory's disk (writes resume by themselves once there is room); this write was not acknowledged"
    )]
    DiskFull(String),
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error(
        "the store is corrupt: {0}; restore the data directory from a backup or another device"
    )]
    Corrupt(String),
    #[error(
        "the value stored under key {} is damaged (its checksum does not match): `ferry doctor` \
         reports what is damaged and `ferry doctor --repair` repairs it",
        printable(.0)
    )]
    Damaged(Vec<u8>),
}

/// A key as text for messages: printable ASCII as is, other bytes as `\xNN`.
pub fn printable(key: &[u8]) -> String {
    key.iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

/// Bytes a sealed value carries after its own: the CRC-32 of its key and value.
pub const SEAL_BYTES: usize = 4;

fn checksum(key: &[u8], value: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(value);
    hasher.finalize()
}

/// The value as an engine stores it: its bytes, then the CRC-32 of its key and bytes (a value
/// moved under another key, or an index key whose bytes changed, fails the check too).
fn seal(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(value.len() + SEAL_BYTES);
    sealed.extend_from_slice(value);
    sealed.extend_from_slice(&checksum(key, value).to_le_bytes());
    sealed
}

/// The value `seal` stored, once its checksum is checked.
fn unseal(key: &[u8], mut sealed: Vec<u8>) -> Result<Vec<u8>, KvError> {
    let Some(at) = sealed.len().checked_sub(SEAL_BYTES) else {
        return Err(KvError::Damaged(key.to_vec()));
    };
    let sum = sealed
        .get(at..)
        .and_then(|b| <[u8; SEAL_BYTES]>::try_from(b).ok())
        .map(u32::from_le_bytes);
    sealed.truncate(at);
    if sum != Some(checksum(key, &sealed)) {
        return Err(KvError::Damaged(key.to_vec()));
    }
    Ok(sealed)
}

/// What an engine found at open that its data lost, and the journal it keeps outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// The last batch the journal says was made durable.
    pub durable: u64,
    /// The last batch the data holds (lower: the batches after it are gone).
    pub found: u64,
}

/// A write of a batch: a key and its new value (`None`: removed).
pub type Op = (Vec<u8>, Option<Vec<u8>>);

/// A shorter form of a record's document that its view implies (`store::implied`), offered with
/// a batch that writes both: valid only while the batch leaves exactly `document` and `view` at
/// the record's keys, which the layer that stores records checks (`store::paired`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortForm {
    pub document: Vec<u8>,
    pub view: Vec<u8>,
    pub short: Vec<u8>,
}

/// Short forms offered with a batch, by document key.
pub type ShortForms = Vec<(Vec<u8>, ShortForm)>;

/// An atomic set of writes: all of them land, or none.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
    journal: Vec<Vec<u8>>,
    short: ShortForms,
    /// Where in `ops` the put later parts are appended to (`extend_growing`) is.
    growing: Option<usize>,
}

impl Batch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    pub fn remove(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    /// Puts `part` at `key` as the first part of a value that later parts may extend
    /// (`extend_growing`), so that many small entries written together take one key.
    pub fn put_growing(&mut self, key: Vec<u8>, part: Vec<u8>) {
        self.growing = Some(self.ops.len());
        self.ops.push((key, Some(part)));
    }

    /// Appends `part` to the value of the last `put_growing` if it then holds at most
    /// `max_bytes`; false, and nothing done, when there is none or it would be longer.
    pub fn extend_growing(&mut self, part: &[u8], max_bytes: usize) -> bool {
        match self.growing.and_then(|at| self.ops.get_mut(at)) {
            Some((_, Some(value))) if value.len() + part.len() <= max_bytes => {
                value.extend_from_slice(part);
                true
            }
            _ => false,
        }
    }

    /// Puts a record's document and view, offering `short`, the shorter form of the document
    /// its view implies, when there is one (see `ShortForm`); a layer that cannot keep it
    /// stores the document as it is.
    pub fn put_record(
        &mut self,
        document_key: Vec<u8>,
        document: Vec<u8>,
        view_key: Vec<u8>,
        view: Vec<u8>,
        short: Option<Vec<u8>>,
    ) {
        if let Some(short) = short {
            let form = ShortForm {
                document: document.clone(),
                view: view.clone(),
                short,
            };
            self.short.push((document_key.clone(), form));
        }
        self.put(document_key, document);
        self.put(view_key, view);
    }

    /// Offers the short forms another batch was offered, for a layer that builds the batch it
    /// passes on (`into_parts`).
    pub(super) fn offer_short(&mut self, forms: ShortForms) {
        self.short.extend(forms);
    }

    /// Asks that `record` be kept outside the engine's data too, durable with the batch's
    /// flush, until `Kv::rewrite_journal` leaves it out (see `Kv::journal`).
    pub fn journal(&mut self, record: Vec<u8>) {
        self.journal.push(record);
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.journal.is_empty()
    }

    /// The batch's puts (with their values) and removals, in order.
    pub fn ops(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.ops.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    /// The batch's puts and removals, in order, the records it journals and the short forms it
    /// offers: for a layer that
    /// stores keys under other keys (`store::paired`) to build the batch it applies.
    pub(super) fn into_parts(self) -> (Vec<Op>, Vec<Vec<u8>>, ShortForms) {
        (self.ops, self.journal, self.short)
    }

    /// The value this batch will leave at `key`, if it writes one: its last put, unless a later
    /// remove undoes it.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.ops
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }
}

pub type Pair = (Vec<u8>, Vec<u8>);

/// The keys of one kind and the bytes they hold, as `Kv::key_sizes` counts them (the engine's
/// checksum of each value, `SEAL_BYTES`, not included).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyKind {
    pub kind: String,
    pub keys: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

/// Every key of `kv` counted under the kind `kind_of` gives it, kinds in the order first met.
/// One full scan; long values are not read, only their lengths.
pub fn sizes_by(
    kv: &dyn Kv,
    kind_of: &dyn Fn(&[u8]) -> &'static str,
) -> Result<Vec<KeyKind>, KvError> {
    let mut kinds: Vec<KeyKind> = Vec::new();
    kv.key_sizes(&mut |key, value| {
        let kind = kind_of(key);
        // A handful of kinds, met in long runs (keys of one kind share a prefix): the last one
        // is almost always the one.
        let at = match kinds.iter().rposition(|k| k.kind == kind) {
            Some(at) => at,
            None => {
                kinds.push(KeyKind {
                    kind: kind.to_owned(),
                    ..KeyKind::default()
                });
                kinds.len() - 1
            }
        };
        if let Some(k) = kinds.get_mut(at) {
            k.keys += 1;
            k.key_bytes += key.len() as u64;
            k.value_bytes += value;
        }
    })?;
    Ok(kinds)
}

/// Ordered key-value storage.
pub trait Kv: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Whether `key` holds a value, without reading it (nor checking it: a damaged value is
    /// held). An engine or layer that can answer without copying the value says so.
    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.get(key)?.is_some())
    }
    /// Up to `limit` pairs with `start <= key < end`, in key order.
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError>;
    /// The greatest key with `start <= key < end`.
    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// How many keys lie in `start <= key < end`.
    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError>;
    /// Applies the batch atomically. It is visible at once but durable only after `flush`.
    fn apply(&self, batch: Batch) -> Result<(), KvError>;
    /// Makes every applied batch durable.
    fn flush(&self) -> Result<(), KvError>;
    fn size_on_disk(&self) -> Result<u64, KvError>;
    /// The bytes of every key and value held (what a fresh copy of the store would need at
    /// least), read by a full scan.
    fn live_bytes(&self) -> Result<u64, KvError> {
        let mut total = 0u64;
        self.key_sizes(&mut |key, value| total += key.len() as u64 + value)?;
        Ok(total)
    }
    /// Hands `each` every key held and its value's length, in key order: what `live_bytes`
    /// adds up, kept apart so that the bytes can be told by kind of key (`sizes_by`). An
    /// engine that keeps long values apart reads only what gives their length.
    fn key_sizes(&self, each: &mut dyn FnMut(&[u8], u64)) -> Result<(), KvError> {
        let mut start = Vec::new();
        loop {
            let page = self.range(&start, &[0xff; 8], 1024)?;
            for (key, value) in &page {
                each(key, value.len() as u64);
            }
            match page.last() {
                Some((last, _)) if page.len() == 1024 => {
                    start.clone_from(last);
                    start.push(0);
                }
                _ => return Ok(()),
            }
        }
    }
    /// Since when (Unix ms) writes fail because the disk is full, if they do. Every later write
    /// and flush is refused until `resume_writes`.
    fn disk_full_since(&self) -> Option<u64> {
        None
    }
    /// After a write failed for lack of space: throws away whatever was applied but not flushed
    /// and opens what is durable again, so reads work and show only that. Writes stay refused.
    /// False when there was nothing to do (no failure, or reopened since it).
    fn reopen(&self) -> Result<bool, KvError> {
        Ok(false)
    }
    /// Takes writes again after a full disk (call it once the disk has room; it reopens first if
    /// `reopen` was not called since the failure).
    fn resume_writes(&self) -> Result<(), KvError> {
        Ok(())
    }
    /// Rewrites the stored data compactly, leaving only the live pairs on disk. Durable and
    /// atomic: a crash leaves the old copy or the new one. Makes everything applied durable.
    fn compact(&self) -> Result<(), KvError> {
        self.flush()
    }
    /// What the open found the data lost: batches made durable that it no longer holds.
    fn lost(&self) -> Option<Lost> {
        None
    }
    /// Hands `each` the records batches asked to keep outside the data (`Batch::journal`) that
    /// are durable, oldest first (a record may appear more than once), reading the journal a
    /// part at a time, so that memory does not grow with it; returns whether the journal was
    /// damaged (the records past the damage still count).
    fn journal(&self, each: &mut dyn FnMut(&[u8])) -> Result<bool, KvError>;
    /// The bytes the journal takes.
    fn journal_bytes(&self) -> u64;
    /// Makes everything applied durable, then replaces the journal's records, atomically, with
    /// those `keep` hands to the function it is given, in order, each written as it comes
    /// (never all held at once). The caller keeps records from being journaled meanwhile (the
    /// store holds its queue lock), as they would not be in the new journal.
    fn rewrite_journal(&self, keep: JournalKeep<'_>) -> Result<(), KvError>;
}

/// Inside `impl Kv for` a layer over another engine (a field `inner`), the methods named, each
/// passed to `inner` as it is: a layer writes out only what it changes.
///
/// `forward_to_inner!(beside_keys)` forwards every method but the five that read and write keys
/// (`get`, `range`, `last_key`, `count`, `apply`): a layer that only lays keys out differently.
macro_rules! forward_to_inner {
    (beside_keys) => {
        $crate::store::kv::forward_to_inner!(
            flush,
            size_on_disk,
            live_bytes,
            key_sizes,
            disk_full_since,
            reopen,
            resume_writes,
            compact,
            lost,
            journal,
            journal_bytes,
            rewrite_journal,
        );
    };
    ($($method:ident),* $(,)?) => { $($crate::store::kv::forward_to_inner!(@ $method);)* };
    (@ get) => {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, $crate::store::kv::KvError> {
            self.inner.get(key)
        }
    };
    (@ contains) => {
        fn contains(&self, key: &[u8]) -> Result<bool, $crate::store::kv::KvError> {
            self.inner.contains(key)
        }
    };
    (@ range) => {
        fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<$crate::store::kv::Pair>, $crate::store::kv::KvError> {
            self.inner.range(start, end, limit)
        }
    };
    (@ last_key) => {
        fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, $crate::store::kv::KvError> {
            self.inner.last_key(start, end)
        }
    };
    (@ count) => {
        fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, $crate::store::kv::KvError> {
            self.inner.count(start, end)
        }
    };
    (@ apply) => {
        fn apply(&self, batch: $crate::store::kv::Batch) -> Result<(), $crate::store::kv::KvError> {
            self.inner.apply(batch)
        }
    };
    (@ flush) => {
        fn flush(&self) -> Result<(), $crate::store::kv::KvError> {
            self.inner.flush()
        }
    };
    (@ size_on_disk) => {
        fn size_on_disk(&self) -> Result<u64, $crate::store::kv::KvError> {
            self.inner.size_on_disk()
        }
    };
    (@ live_bytes) => {
        fn live_bytes(&self) -> Result<u64, $crate::store::kv::KvError> {
            self.inner.live_bytes()
        }
    };
    (@ key_sizes) => {
        fn key_sizes(&self, each: &mut dyn FnMut(&[u8], u64)) -> Result<(), $crate::store::kv::KvError> {
            self.inner.key_sizes(each)
        }
    };
    (@ disk_full_since) => {
        fn disk_full_since(&self) -> Option<u64> {
            self.inner.disk_full_since()
        }
    };
    (@ reopen) => {
        fn reopen(&self) -> Result<bool, $crate::store::kv::KvError> {
            self.inner.reopen()
        }
    };
    (@ resume_writes) => {
        fn resume_writes(&self) -> Result<(), $crate::store::kv::KvError> {
            self.inner.resume_writes()
        }
    };
    (@ compact) => {
        fn compact(&self) -> Result<(), $crate::store::kv::KvError> {
            self.inner.compact()
        }
    };
    (@ lost) => {
        fn lost(&self) -> Option<$crate::store::kv::Lost> {
            self.inner.lost()
        }
    };
    (@ journal) => {
        fn journal(&self, each: &mut dyn FnMut(&[u8])) -> Result<bool, $crate::store::kv::KvError> {
            self.inner.journal(each)
        }
    };
    (@ journal_bytes) => {
        fn journal_bytes(&self) -> u64 {
            self.inner.journal_bytes()
        }
    };
    (@ rewrite_journal) => {
        fn rewrite_journal(&self, keep: $crate::store::kv::JournalKeep<'_>) -> Result<(), $crate::store::kv::KvError> {
            self.inner.rewrite_journal(keep)
        }
    };
}
pub(crate) use forward_to_inner;

/// What `Kv::rewrite_journal` keeps: it calls the function it is given with each record.
pub type JournalKeep<'a> = &'a mut dyn FnMut(&mut dyn FnMut(&[u8])) -> Result<(), KvError>;

/// sled 0.34, one tree, keys prefixed by kind (see `store::keys`).
///
/// Three weaknesses of sled are handled here rather than above the trait:
/// - **Space.** sled writes a tree node (up to about 16 pairs) whole when it consolidates it, and a
///   node larger than a quarter of a log segment goes to a blob file of its own, which it often
///   never deletes: a store of a few large values grew without bound as small neighbours changed.
///   So a value over `CHUNK` bytes is kept as chunks of at most `CHUNK` bytes under reserved keys
///   (`chunk_key`), written in the same batch, and its own key holds an empty value. Nodes then
///   stay small, live in the log, and sled's segment cleaning reclaims their old versions.
/// - **Leftovers.** `compact` copies the live pairs into a fresh sled directory (a generation)
///   and switches to it atomically (see `Generations`), so whatever sled did not reclaim goes.
/// - **A failed log write** (a full disk) leaves sled refusing every later write. `reopen` drops
///   the `sled::Db` and opens the same directory again, from what was durable.
pub struct SledKv {
    generations: Generations,
    cache_bytes: u64,
    engine: RwLock<Engine>,
    /// Serialises batches (a batch reads which chunks the keys it writes held), and holds the
    /// number of the last batch applied.
    writing: Mutex<u64>,
    /// Set when a write or flush failed for lack of space.
    failure: Mutex<Option<Failure>>,
    journal: Journal,
    lost: Option<Lost>,
}

#[derive(Clone, Copy)]
struct Failure {
    /// Unix ms.
    since: u64,
    /// The failed `sled::Db` was replaced by one opened on what is durable.
    reopened: bool,
}

struct Engine {
    /// `None` only after a reopen failed; the next `reopen` tries again.
    db: Option<sled::Db>,
    generation: u64,
    /// Values carry their checksum (`seal`). False only for a store written before they did,
    /// until `open` has copied it into a generation that does.
    sealed: bool,
    /// The keys whose values `db` holds in chunks, so that writing any other key needs no look
    /// for old chunks to remove; `None` when not known (after a batch failed), and every write
    /// looks.
    chunked: Mutex<Option<HashSet<Vec<u8>>>>,
}

/// Values longer than this are stored as chunks of this size. Small enough that a node of 16
/// chunks stays well under sled's blob threshold (a quarter of its 512 KiB segment).
const CHUNK: usize = 4096;
/// The most a chunked value's read reserves before its chunks are there to fill it.
const MAX_UPFRONT_BYTES: usize = 16 << 20;
/// Keys from this byte on hold chunks; the store's layouts never start a key with it.
const RESERVED: u8 = 0xff;
/// The engine's own keys: no chunk prefix starts like them (a key of 2^32 - 1 bytes).
/// The number of the last batch applied (u64 big-endian, sealed).
const BATCH_KEY: &[u8] = &[RESERVED, 0xff, 0xff, 0xff, 0xff, b'b'];
/// Present when every value is sealed.
const SEALED_KEY: &[u8] = &[RESERVED, 0xff, 0xff, 0xff, 0xff, b's'];
/// A batch of the copy `compact` makes, flushed before the next (a long value's chunks spread
/// over as many batches as they fill). Small batches leave the copy compact and memory bounded;
/// each flush lets sled retire the log segments the copy itself has already superseded and write
/// on into them instead of growing its file. 10 MiB of 250 B values copied in unflushed batches:
/// 2.1x its live data with 256 KiB, 3.1x with 8 MiB. Flushed batches of 256 KiB leave 10 to
/// 50 MiB of small or large values at 1.7x to 2.2x where unflushed ones (each at least a whole
/// value) left 1.9x to 2.7x (`benches/store_space.rs`).
const COPY_BATCH_BYTES: usize = 256 << 10;

/// The cache of the fresh sled a compaction copies into: the copy writes in key order and reads
/// nothing back, and each MiB of cache sled fills costs several of memory, so the store is
/// opened again through its own cache once the copy is made.
const COPY_CACHE_BYTES: u64 = 4 << 20;

/// `{RESERVED}{key length u32}{key}`: the prefix of a chunked value's chunks. The length makes
/// the prefixes of two keys disjoint even when one key is a prefix of the other.
fn chunk_prefix(key: &[u8]) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(key.len() + 5);
    prefix.push(RESERVED);
    prefix.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_be_bytes());
    prefix.extend_from_slice(key);
    prefix
}

fn chunk_key(prefix: &[u8], index: usize) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&u32::try_from(index).unwrap_or(u32::MAX).to_be_bytes());
    key
}

/// The part of `start..end` that user keys may occupy.
fn user_range(start: &[u8], end: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let end = end.min(&[RESERVED][..]);
    (start < end).then(|| (start.to_vec(), end.to_vec()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SledKv {
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, KvError> {
        let generations = Generations {
            root: path.to_owned(),
        };
        let generation = generations.settle()?;
        let db = open_db(&generations.dir(generation), cache_bytes)?;
        let sealed = db.contains_key(SEALED_KEY).map_err(from_sled)?;
        let fresh = !sealed && db.first().map_err(from_sled)?.is_none();
        if fresh {
            db.insert(SEALED_KEY, Vec::new()).map_err(from_sled)?;
            db.flush().map_err(from_sled)?;
        }
        let found = batch_number(&db)?;
        let (journal, durable) = Journal::open(&path.join("journal"))?;
        let lost = (durable > found).then_some(Lost { durable, found });
        let kv = SledKv {
            generations,
            cache_bytes,
            engine: RwLock::new(Engine {
                chunked: Mutex::new(chunked_keys(&db).ok()),
                db: Some(db),
                generation,
                sealed: sealed || fresh,
            }),
            // Numbers go on from the highest known, so a batch written after a loss is never
            // taken for one the journal counted before it.
            writing: Mutex::new(found.max(durable)),
            failure: Mutex::new(None),
            journal,
            lost,
        };
        if !(sealed || fresh) {
            // Written before values carried checksums: copied once into a generation that has
            // them (a full disk leaves it as it is, and it is tried again at the next open).
            if let Err(e) = kv.compact() {
                tracing::warn!(error = %e, "could not add checksums to the store's values yet");
            }
        }
        Ok(kv)
    }

    /// The directory holding the sled files in use under `path` (`path` itself, or the generation
    /// a compaction made).
    pub fn current_dir(path: &Path) -> Result<PathBuf, KvError> {
        let generations = Generations {
            root: path.to_owned(),
        };
        Ok(generations.dir(generations.current()?))
    }

    fn read(&self) -> RwLockReadGuard<'_, Engine> {
        // Nothing panics while holding the lock with the engine half-changed: a reopen or a
        // compaction swaps the database in one assignment.
        self.engine.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Engine> {
        self.engine.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_writing(&self) -> MutexGuard<'_, u64> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_failure(&self) -> MutexGuard<'_, Option<Failure>> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a full disk when `result` says so.
    fn watch<T>(&self, result: Result<T, KvError>) -> Result<T, KvError> {
        if let Err(KvError::DiskFull(_)) = &result {
            self.lock_failure().get_or_insert_with(|| Failure {
                since: now_ms(),
                reopened: false,
            });
        }
        result
    }

    /// Opens `dir` through the store's own cache after a compaction closed it. The copy just
    /// dropped (and removed, when it failed) keeps its files, and the disk space they take,
    /// until sled's background threads let go of them; opening needs a little space, so a
    /// full disk is waited out as a lock is (`open_db_waiting`). Should that fail, the store
    /// stays closed and `reopen` tries again, as after a failed write.
    fn open_again(&self, dir: &Path) -> Result<sled::Db, KvError> {
        open_db_waiting(dir, self.cache_bytes, true).inspect_err(|_| {
            self.lock_failure().get_or_insert_with(|| Failure {
                since: now_ms(),
                reopened: false,
            });
        })
    }

    fn refuse_while_full(&self) -> Result<(), KvError> {
        match self.lock_failure().map(|f| f.since) {
            Some(since) => Err(KvError::DiskFull(format!(
                "writes are refused since {since} (Unix ms), when the disk filled up; they \
                 resume by themselves once there is room"
            ))),
            None => Ok(()),
        }
    }
}

impl Engine {
    fn db(&self) -> Result<&sled::Db, KvError> {
        self.db.as_ref().ok_or_else(|| {
            KvError::DiskFull(
                "the store is closed after a failed write and could not be opened again yet; \
                 it reopens by itself"
                    .into(),
            )
        })
    }
}

/// How long an open waits for a `Db` dropped a moment ago to let go of what it holds.
const DROPPED_DB_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens sled in `dir` (see `open_db_waiting`).
fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, KvError> {
    open_db_waiting(dir, cache_bytes, false)
}

/// Opens sled in `dir`. A `Db` of the same directory dropped a moment ago (by `reopen` or a
/// compaction) lets go of its file lock, and of the space of files removed under it, only once
/// sled's background work is done with it: a refused lock is retried for a bounded time, and
/// so is a full disk when `wait_for_space`.
fn open_db_waiting(
    dir: &Path,
    cache_bytes: u64,
    wait_for_space: bool,
) -> Result<sled::Db, KvError> {
    let started = std::time::Instant::now();
    let mut unfinished_removed = false;
    loop {
        let waiting = started.elapsed() < DROPPED_DB_WAIT;
        match try_open_db(dir, cache_bytes) {
            Err(KvError::Io(e)) if waiting && e.contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(KvError::DiskFull(_)) if waiting && wait_for_space => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(KvError::Corrupt(e)) if !unfinished_removed => {
                unfinished_removed = true;
                if !remove_unfinished_snapshots(dir)? {
                    return Err(KvError::Corrupt(e));
                }
            }
            other => return other,
        }
    }
}

/// Removes the snapshot files sled was still writing when its process died
/// (`snap.{lsn}.generating`; a finished one is renamed to `snap.{lsn}`). sled 0.34 reads the
/// last snapshot file by name, unfinished ones included, and refuses to open when that one is
/// cut short; without it, it reads the last complete snapshot and the log after it. True when
/// one was there. Called only after sled refused the directory, so no live `Db` writes it.
fn remove_unfinished_snapshots(dir: &Path) -> Result<bool, KvError> {
    let mut removed = false;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(from_io(e)),
    };
    for entry in entries {
        let entry = entry.map_err(from_io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing a snapshot sled did not finish writing");
            remove_all(&entry.path())?;
            removed = true;
        }
    }
    Ok(removed)
}

fn try_open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, KvError> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .open()
        .map_err(|e| {
            let unreadable = |detail: &str| {
                KvError::Corrupt(format!("{} cannot be read ({detail})", dir.display()))
            };
            match e {
                // What sled says when its files in `dir` cannot be read as a sled store.
                sled::Error::Unsupported(detail) => unreadable(&detail),
                other => match from_sled(other) {
                    KvError::Corrupt(detail) => unreadable(&detail),
                    other => other,
                },
            }
        })
}

/// A value as stored under its own key: its bytes, or (empty) a marker that its chunks hold it.
/// The first chunk starts with the value's length (u64 big-endian), so chunks a crash or a race
/// left past the end are never read as part of it.
fn read_value(
    db: &sled::Db,
    key: &[u8],
    stored: sled::IVec,
    sealed: bool,
) -> Result<Vec<u8>, KvError> {
    let value = read_stored(db, key, stored)?;
    if sealed {
        unseal(key, value)
    } else {
        Ok(value)
    }
}

/// The bytes stored for `key`, its chunks put together.
fn read_stored(db: &sled::Db, key: &[u8], stored: sled::IVec) -> Result<Vec<u8>, KvError> {
    if !stored.is_empty() {
        return Ok(stored.to_vec());
    }
    let mut value = Vec::new();
    let mut len = None;
    for chunk in db.scan_prefix(chunk_prefix(key)).values() {
        let chunk = chunk.map_err(from_sled)?;
        let body = match len {
            Some(_) => &chunk[..],
            None => {
                let (head, body) = chunk
                    .split_first_chunk::<8>()
                    .ok_or_else(|| KvError::Damaged(key.to_vec()))?;
                let total = u64::from_be_bytes(*head);
                let total = usize::try_from(total).map_err(|_| KvError::Damaged(key.to_vec()))?;
                // The length comes from the disk: a damaged one must not size the allocation.
                value.reserve_exact(total.min(MAX_UPFRONT_BYTES));
                len = Some(total);
                body
            }
        };
        value.extend_from_slice(body);
        if len.is_some_and(|total| value.len() >= total) {
            break;
        }
    }
    if let Some(total) = len {
        if value.len() < total {
            return Err(KvError::Damaged(key.to_vec()));
        }
        value.truncate(total);
    }
    Ok(value)
}

/// The length of a value as stored under its own key, reading only the first chunk of a
/// chunked one.
fn value_len(db: &sled::Db, key: &[u8], stored: &[u8], sealed: bool) -> Result<u64, KvError> {
    let seal_bytes = if sealed { SEAL_BYTES as u64 } else { 0 };
    Ok(stored_len(db, key, stored)?.saturating_sub(seal_bytes))
}

fn stored_len(db: &sled::Db, key: &[u8], stored: &[u8]) -> Result<u64, KvError> {
    if !stored.is_empty() {
        return Ok(stored.len() as u64);
    }
    match db.scan_prefix(chunk_prefix(key)).values().next() {
        Some(first) => {
            let first = first.map_err(from_sled)?;
            Ok(first
                .first_chunk::<8>()
                .map_or(0, |head| u64::from_be_bytes(*head)))
        }
        None => Ok(0),
    }
}

/// Stages writing `value` (or removing, for `None`) under `key` in `batch`, removing the chunks
/// of its old value first when it may have had some (`had_chunks`). True when the new value is
/// chunked.
fn stage_put(
    db: &sled::Db,
    batch: &mut sled::Batch,
    key: &[u8],
    value: Option<&[u8]>,
    had_chunks: bool,
    sealed: bool,
) -> Result<bool, KvError> {
    if key.first() == Some(&RESERVED) {
        return Err(KvError::Io(format!(
            "keys starting with byte {RESERVED:#x} are the engine's own: {key:?} cannot be written"
        )));
    }
    if had_chunks {
        for old in db.scan_prefix(chunk_prefix(key)).keys() {
            batch.remove(old.map_err(from_sled)?);
        }
    }
    let Some(value) = value else {
        batch.remove(key);
        return Ok(false);
    };
    let stored = if sealed {
        seal(key, value)
    } else {
        value.to_vec()
    };
    layout(key, &stored, |k, v| {
        batch.insert(k, v);
        Ok(())
    })
}

/// Gives `put` each pair sled holds for `key = value`, in key order: the value itself, or, when
/// it is longer than `CHUNK`, an empty value under `key` and the chunks, the first holding the
/// value's length and then as much of the value as fits. True when the value is chunked.
fn layout(
    key: &[u8],
    value: &[u8],
    mut put: impl FnMut(&[u8], &[u8]) -> Result<(), KvError>,
) -> Result<bool, KvError> {
    let len_bytes = (value.len() as u64).to_be_bytes();
    match value.split_at_checked(CHUNK - len_bytes.len()) {
        Some((head, rest)) if value.len() > CHUNK => {
            let prefix = chunk_prefix(key);
            put(key, &[])?;
            let mut first = len_bytes.to_vec();
            first.extend_from_slice(head);
            put(&chunk_key(&prefix, 0), &first)?;
            for (n, chunk) in rest.chunks(CHUNK).enumerate() {
                put(&chunk_key(&prefix, n + 1), chunk)?;
            }
            Ok(true)
        }
        _ => {
            put(key, value)?;
            Ok(false)
        }
    }
}

/// The keys whose values `db` holds in chunks, read from the chunks' own keys.
fn chunked_keys(db: &sled::Db) -> Result<HashSet<Vec<u8>>, KvError> {
    let mut keys = HashSet::new();
    for chunk in db.range([RESERVED]..).keys() {
        let chunk = chunk.map_err(from_sled)?;
        let Some((len, rest)) = chunk.get(1..).and_then(<[u8]>::split_first_chunk::<4>) else {
            continue;
        };
        if let Some(key) = rest.get(..u32::from_be_bytes(*len) as usize) {
            keys.insert(key.to_vec());
        }
    }
    Ok(keys)
}

fn from_sled(e: sled::Error) -> KvError {
    match e {
        sled::Error::Io(io) => from_io(io),
        sled::Error::Corruption { at, bt: _ } => KvError::Corrupt(format!("sled at {at:?}")),
        other => KvError::Io(other.to_string()),
    }
}

pub(crate) fn from_io(io: std::io::Error) -> KvError {
    if io.raw_os_error() == Some(libc::ENOSPC) || io.kind() == std::io::ErrorKind::StorageFull {
        KvError::DiskFull(io.to_string())
    } else {
        KvError::Io(io.to_string())
    }
}

impl Kv for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let engine = self.read();
        let db = engine.db()?;
        match db.get(key).map_err(from_sled)? {
            Some(stored) => read_value(db, key, stored, engine.sealed).map(Some),
            None => Ok(None),
        }
    }

    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        let engine = self.read();
        engine.db()?.contains_key(key).map_err(from_sled)
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        let Some((start, end)) = user_range(start, end) else {
            return Ok(Vec::new());
        };
        let engine = self.read();
        let db = engine.db()?;
        db.range(start..end)
            .take(limit)
            .map(|r| {
                let (k, v) = r.map_err(from_sled)?;
                let v = read_value(db, &k, v, engine.sealed)?;
                Ok((k.to_vec(), v))
            })
            .collect()
    }

    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let Some((start, end)) = user_range(start, end) else {
            return Ok(None);
        };
        let engine = self.read();
        match engine.db()?.range(start..end).next_back() {
            Some(r) => Ok(Some(r.map_err(from_sled)?.0.to_vec())),
            None => Ok(None),
        }
    }

    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        let Some((start, end)) = user_range(start, end) else {
            return Ok(0);
        };
        let engine = self.read();
        let mut n = 0;
        for key in engine.db()?.range(start..end).keys() {
            key.map_err(from_sled)?;
            n += 1;
        }
        Ok(n)
    }

    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        self.refuse_while_full()?;
        let mut number = self.lock_writing();
        let engine = self.read();
        let db = engine.db()?;
        let mut sled_batch = sled::Batch::default();
        // sled keeps the last write of a key in a batch; so must the chunks.
        let mut last: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
        for (key, value) in &batch.ops {
            last.insert(key, value.as_deref());
        }
        let mut chunked = engine.chunked.lock().unwrap_or_else(|p| p.into_inner());
        let mut now_chunked = Vec::new();
        for (key, value) in &last {
            let had_chunks = chunked.as_ref().is_none_or(|keys| keys.contains(*key));
            if stage_put(db, &mut sled_batch, key, *value, had_chunks, engine.sealed)? {
                now_chunked.push(*key);
            }
        }
        let next = number.saturating_add(1);
        sled_batch.insert(BATCH_KEY, seal(BATCH_KEY, &next.to_be_bytes()));
        let applied = self.watch(db.apply_batch(sled_batch).map_err(from_sled));
        match (&applied, chunked.as_mut()) {
            (Ok(()), Some(keys)) => {
                for key in last.keys() {
                    keys.remove(*key);
                }
                keys.extend(now_chunked.into_iter().map(<[u8]>::to_vec));
            }
            (Ok(()), None) => {}
            // What the failed batch left is not known: look at every write until it is again.
            (Err(_), _) => *chunked = None,
        }
        if applied.is_ok() {
            *number = next;
            self.journal.stage(next, &batch.journal);
        }
        applied
    }

    fn flush(&self) -> Result<(), KvError> {
        self.refuse_while_full()?;
        let engine = self.read();
        let db = engine.db()?;
        self.watch(
            self.journal
                .flush(|| db.flush().map(|_| ()).map_err(from_sled)),
        )
    }

    fn size_on_disk(&self) -> Result<u64, KvError> {
        self.read().db()?.size_on_disk().map_err(from_sled)
    }

    fn key_sizes(&self, each: &mut dyn FnMut(&[u8], u64)) -> Result<(), KvError> {
        let engine = self.read();
        let db = engine.db()?;
        for pair in scan_user_keys(db) {
            let (k, v) = pair?;
            each(&k, value_len(db, &k, &v, engine.sealed)?);
        }
        Ok(())
    }

    fn disk_full_since(&self) -> Option<u64> {
        self.lock_failure().map(|f| f.since)
    }

    fn reopen(&self) -> Result<bool, KvError> {
        let mut number = self.lock_writing();
        if self.lock_failure().is_none_or(|f| f.reopened) {
            return Ok(false);
        }
        let mut engine = self.write();
        let dir = self.generations.dir(engine.generation);
        // The failed database goes first: sled allows one open instance of a directory.
        engine.db = None;
        // Records of batches never made durable were never acknowledged: they go with them.
        self.journal.drop_staged();
        let db = open_db(&dir, self.cache_bytes)?;
        *number = (*number).max(batch_number(&db)?);
        engine.chunked = Mutex::new(chunked_keys(&db).ok());
        engine.db = Some(db);
        if let Some(failure) = self.lock_failure().as_mut() {
            failure.reopened = true;
        }
        Ok(true)
    }

    fn resume_writes(&self) -> Result<(), KvError> {
        self.reopen()?;
        *self.lock_failure() = None;
        Ok(())
    }

    fn compact(&self) -> Result<(), KvError> {
        self.refuse_while_full()?;
        let number = self.lock_writing();
        let mut engine = self.write();
        self.watch(engine.db()?.flush().map(|_| ()).map_err(from_sled))?;
        let next = engine.generation + 1;
        let dir = self.generations.dir(next);
        // The copy reads every page of the store once: through a small cache of its own, not
        // the store's, which sled would fill (at several times its configured size) beside the
        // fresh copy's pages. The store is closed meanwhile (writes wait on `writing`, reads on
        // the engine lock), and opened again through its own cache if the copy fails.
        let current = self.generations.dir(engine.generation);
        engine.db = None;
        let copy_cache = COPY_CACHE_BYTES.min(self.cache_bytes);
        let copied = open_db(&current, copy_cache).and_then(|old| {
            remove_all(&dir)?;
            let fresh = open_db(&dir, copy_cache)?;
            copy_all(&old, &fresh, engine.sealed)?;
            fresh
                .insert(BATCH_KEY, seal(BATCH_KEY, &number.to_be_bytes()))
                .and_then(|_| fresh.insert(SEALED_KEY, Vec::new()))
                .map_err(from_sled)?;
            fresh.flush().map_err(from_sled)?;
            sync_all(&dir)?;
            Ok(fresh)
        });
        // A copy that runs out of space fails alone: the store in use is untouched.
        let fresh = match copied {
            Ok(fresh) => fresh,
            Err(e) => {
                let _ = remove_all(&dir);
                engine.db = Some(self.open_again(&current)?);
                return Err(e);
            }
        };
        if let Err(e) = self.generations.switch_to(next) {
            drop(fresh);
            let _ = remove_all(&dir);
            engine.db = Some(self.open_again(&current)?);
            return Err(e);
        }
        let previous = engine.generation;
        engine.generation = next;
        engine.sealed = true;
        // The switch is durable: the old generation is garbage, removed before the copy is
        // opened again, which needs a little room on a disk the two may have filled. `settle`
        // removes it at the next open if this does not.
        if let Err(e) = self.generations.remove(previous) {
            tracing::warn!(error = %e, "could not remove the store's previous generation");
        }
        // The copy was made through a small cache; the store reads through its own.
        drop(fresh);
        let fresh = self.open_again(&dir)?;
        engine.chunked = Mutex::new(chunked_keys(&fresh).ok());
        engine.db = Some(fresh);
        Ok(())
    }

    fn lost(&self) -> Option<Lost> {
        self.lost.clone()
    }

    fn journal(&self, each: &mut dyn FnMut(&[u8])) -> Result<bool, KvError> {
        self.journal.records(each)
    }

    fn journal_bytes(&self) -> u64 {
        self.journal.bytes()
    }

    fn rewrite_journal(&self, keep: JournalKeep<'_>) -> Result<(), KvError> {
        self.refuse_while_full()?;
        let engine = self.read();
        let db = engine.db()?;
        self.watch(
            self.journal
                .rewrite(keep, || db.flush().map(|_| ()).map_err(from_sled)),
        )
    }
}

/// The number of the last batch `db` holds (0 for a store written before batches had one).
/// A damaged number reads as none: the journal then says batches were lost, the store opens
/// damaged rather than not at all, and the next batch writes the number again.
fn batch_number(db: &sled::Db) -> Result<u64, KvError> {
    let Some(stored) = db.get(BATCH_KEY).map_err(from_sled)? else {
        return Ok(0);
    };
    Ok(unseal(BATCH_KEY, stored.to_vec())
        .ok()
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// How often a scan of the whole store reads a key once more (see `scan_user_keys`).
const RETOUCH_EVERY: usize = 2;

/// Every pair under a user key, in key order, for a scan of the whole store that must not grow
/// the process by what it reads. sled keeps a page it has read in memory until that page's
/// cache shard (one of 256) has queued 64 accesses, whatever the cache's size: a scan that
/// reads each page once holds up to 16,384 pages (about 70 MB of 300-byte records) before it
/// lets any go. Reading every `RETOUCH_EVERY`th key again adds an access to its page, so the
/// queues fill, and pages go, several times as soon. On 1,000,000 records: `ferry space` peaks
/// at 195-197 MB instead of 232-241 (8% slower), a compaction at 234-240 instead of 288.
fn scan_user_keys(
    db: &sled::Db,
) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), KvError>> + '_ {
    db.range(..[RESERVED]).enumerate().map(move |(n, pair)| {
        let (key, value) = pair.map_err(from_sled)?;
        if n % RETOUCH_EVERY == 0 {
            // Read for the access it records: the value is the one just read.
            db.get(&key).map_err(from_sled)?;
        }
        Ok((key, value))
    })
}

/// Copies every pair of `from` (its values sealed or not) into `to`, sealed, in flushed
/// batches (see `COPY_BATCH_BYTES`). A long value's chunks may span batches: nothing reads the
/// copy before it is whole.
fn copy_all(from: &sled::Db, to: &sled::Db, sealed: bool) -> Result<(), KvError> {
    let mut batch = sled::Batch::default();
    let mut bytes = 0;
    for pair in scan_user_keys(from) {
        let (key, stored) = pair?;
        let value = read_value(from, &key, stored, sealed)?;
        // `to` is a fresh copy: no key in it has old chunks.
        layout(&key, &seal(&key, &value), |k, v| {
            batch.insert(k, v);
            bytes += k.len() + v.len();
            if bytes >= COPY_BATCH_BYTES {
                bytes = 0;
                to.apply_batch(std::mem::take(&mut batch))
                    .map_err(from_sled)?;
                to.flush().map_err(from_sled)?;
            }
            Ok(())
        })?;
    }
    to.apply_batch(batch).map_err(from_sled)
}

/// The journal beside sled's files (see the module doc): an append-only file of records
/// framed `{SYNC}{tag u8}{length u32 LE}{CRC-32 of tag, length and payload, LE}{payload}`, tag
/// `MARK` for the number of the last batch a flush made durable (u64 big-endian), `RECORD` for
/// a record a batch asked to keep. A crash in the middle of an append leaves a record that does
/// not check at the tail: it is cut off at open. A record that does not check followed by ones
/// that do is damage: the journal says so, and the records after it still count; reading finds
/// the next record at the next `SYNC` bytes, so a damaged journal is read in one pass. It is
/// read a part at a time (`scan_journal`), never whole.
struct Journal {
    path: PathBuf,
    /// Records of batches applied since the last flush, framed, with the last batch's number.
    staged: Mutex<(Vec<u8>, u64)>,
    /// The file, appended to by one flush at a time.
    file: Mutex<Appending>,
}

struct Appending {
    file: std::fs::File,
    /// The last batch number marked in it.
    marked: u64,
    /// Its length: appends know it without asking the file system.
    len: u64,
}

/// What every frame starts with, so that reading past damage finds the next one.
const SYNC: [u8; 4] = [0xF5, 0x4A, 0x0E, 0x9C];
const MARK: u8 = 1;
const RECORD: u8 = 2;
const FRAME_HEAD: usize = SYNC.len() + 9;
/// How much of the journal a read takes at a time (more only for a longer record).
const READ_AHEAD: usize = 64 << 10;

fn frame(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[tag]);
    hasher.update(&len);
    hasher.update(payload);
    out.extend_from_slice(&SYNC);
    out.push(tag);
    out.extend_from_slice(&len);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payload length a frame's head at the start of `bytes` states, if a head is there.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let head = bytes.get(..FRAME_HEAD)?;
    if head.get(..SYNC.len())? != SYNC {
        return None;
    }
    let tag = *head.get(SYNC.len())?;
    if tag != MARK && tag != RECORD {
        return None;
    }
    let at = SYNC.len() + 1;
    let len = <[u8; 4]>::try_from(head.get(at..at + 4)?).ok()?;
    usize::try_from(u32::from_le_bytes(len)).ok()
}

/// The record framed at the start of `bytes`, if one that checks is there: its tag, payload and
/// framed length.
fn unframe(bytes: &[u8]) -> Option<(u8, &[u8], usize)> {
    let len = frame_len(bytes)?;
    let tag = *bytes.get(SYNC.len())?;
    let at = SYNC.len() + 1;
    let len_bytes = bytes.get(at..at + 4)?;
    let crc = u32::from_le_bytes(<[u8; 4]>::try_from(bytes.get(at + 4..at + 8)?).ok()?);
    let payload = bytes.get(FRAME_HEAD..FRAME_HEAD.checked_add(len)?)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[tag]);
    hasher.update(len_bytes);
    hasher.update(payload);
    (hasher.finalize() == crc).then_some((tag, payload, FRAME_HEAD + len))
}

/// A journal file read a part at a time: `buf[at..]` holds what is read and not yet taken.
struct Ahead<R> {
    reader: R,
    buf: Vec<u8>,
    at: usize,
    /// The file offset of `buf[0]`.
    base: u64,
}

impl<R: std::io::Read> Ahead<R> {
    fn rest(&self) -> &[u8] {
        self.buf.get(self.at..).unwrap_or_default()
    }

    fn offset(&self) -> u64 {
        self.base.saturating_add(self.at as u64)
    }

    fn advance(&mut self, n: usize) {
        self.at = self.at.saturating_add(n).min(self.buf.len());
    }

    /// Reads until `rest` holds at least `need` bytes; false when the file ends first.
    fn fill(&mut self, need: usize) -> std::io::Result<bool> {
        if self.rest().len() >= need {
            return Ok(true);
        }
        self.buf.drain(..self.at);
        self.base = self.base.saturating_add(self.at as u64);
        self.at = 0;
        while self.buf.len() < need {
            let have = self.buf.len();
            self.buf.resize(have + need.max(READ_AHEAD), 0);
            let read = self
                .reader
                .read(self.buf.get_mut(have..).unwrap_or_default());
            self.buf.truncate(have + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// What a journal's frames say.
#[derive(Debug, Default, PartialEq, Eq)]
struct Scanned {
    /// The highest batch number marked.
    durable: u64,
    /// Where the last frame that checks ends.
    valid_len: u64,
    damaged: bool,
}

/// Reads the `len` bytes of a journal from `reader` a part at a time, handing each record to
/// `each`. Past bytes that are no frame, the next frame is looked for at the next `SYNC`: the
/// journal is damaged if one that checks is found, its append torn if none is.
fn scan_journal(
    reader: impl std::io::Read,
    len: u64,
    each: &mut dyn FnMut(&[u8]),
) -> std::io::Result<Scanned> {
    let mut ahead = Ahead {
        reader: reader.take(len),
        buf: Vec::new(),
        at: 0,
        base: 0,
    };
    let mut scanned = Scanned::default();
    let mut lost_sync = false;
    loop {
        if !ahead.fill(FRAME_HEAD)? {
            return Ok(scanned);
        }
        let left = len.saturating_sub(ahead.offset());
        // A stated length past the file's end is damage, not a reason to read on.
        if let Some(payload) = frame_len(ahead.rest())
            .filter(|&n| (n as u64) <= left.saturating_sub(FRAME_HEAD as u64))
            && ahead.fill(FRAME_HEAD.saturating_add(payload))?
            && let Some((tag, payload, framed)) = unframe(ahead.rest())
        {
            scanned.damaged |= lost_sync;
            lost_sync = false;
            if tag == MARK {
                let n = <[u8; 8]>::try_from(payload).map_or(0, u64::from_be_bytes);
                scanned.durable = scanned.durable.max(n);
            } else {
                each(payload);
            }
            ahead.advance(framed);
            scanned.valid_len = ahead.offset();
            continue;
        }
        lost_sync = true;
        ahead.advance(1);
        loop {
            if !ahead.fill(SYNC.len())? {
                return Ok(scanned);
            }
            let rest = ahead.rest();
            match rest.windows(SYNC.len()).position(|w| w == SYNC) {
                Some(at) => {
                    ahead.advance(at);
                    break;
                }
                // The last bytes may start a SYNC the next read completes.
                None => ahead.advance(rest.len().saturating_sub(SYNC.len() - 1)),
            }
        }
    }
}

/// A journal written before frames started with `SYNC`: the same frames without it. Read
/// whole, once, by `Journal::open`, which writes it again in the current form.
mod unsynced {
    use super::{MARK, RECORD};

    pub(super) const FRAME_HEAD: usize = 9;

    fn unframe(bytes: &[u8]) -> Option<(u8, &[u8], usize)> {
        let head = bytes.get(..FRAME_HEAD)?;
        let tag = *head.first()?;
        if tag != MARK && tag != RECORD {
            return None;
        }
        let len_bytes = <[u8; 4]>::try_from(head.get(1..5)?).ok()?;
        let crc = u32::from_le_bytes(<[u8; 4]>::try_from(head.get(5..9)?).ok()?);
        let len = usize::try_from(u32::from_le_bytes(len_bytes)).ok()?;
        let payload = bytes.get(FRAME_HEAD..FRAME_HEAD.checked_add(len)?)?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[tag]);
        hasher.update(&len_bytes);
        hasher.update(payload);
        (hasher.finalize() == crc).then_some((tag, payload, FRAME_HEAD + len))
    }

    /// Its records, the highest number marked, and whether it was damaged (past bytes that are
    /// no frame, every later offset is tried: these frames have nothing to look for).
    pub(super) fn parse(bytes: &[u8]) -> (Vec<&[u8]>, u64, bool) {
        let (mut records, mut durable, mut damaged) = (Vec::new(), 0, false);
        let mut at = 0;
        while let Some(rest) = bytes.get(at..).filter(|r| !r.is_empty()) {
            match unframe(rest) {
                Some((tag, payload, len)) => {
                    if tag == MARK {
                        let n = <[u8; 8]>::try_from(payload).map_or(0, u64::from_be_bytes);
                        durable = durable.max(n);
                    } else {
                        records.push(payload);
                    }
                    at += len;
                }
                None => match (1..rest.len())
                    .find(|&skip| unframe(rest.get(skip..).unwrap_or_default()).is_some())
                {
                    Some(skip) => {
                        damaged = true;
                        at += skip;
                    }
                    None => break,
                },
            }
        }
        (records, durable, damaged)
    }
}

/// Writes the file at `path` again with what `write` writes, atomically: aside, synced,
/// renamed, directory synced. `finish`, called with the file aside before it is synced, may
/// append to it. Returns its length.
fn replace_file<T>(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> Result<(), KvError>,
    finish: impl FnOnce(&mut dyn std::io::Write) -> Result<T, KvError>,
) -> Result<(T, u64), KvError> {
    let aside = path.with_extension("new");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&aside).map_err(from_io)?);
    let finished = match write(&mut out).and_then(|()| finish(&mut out)) {
        Ok(finished) => finished,
        Err(e) => {
            drop(out);
            // A half-written copy is of no use: the file in place stays what it was.
            let _ = std::fs::remove_file(&aside);
            return Err(e);
        }
    };
    let file = out.into_inner().map_err(|e| from_io(e.into_error()))?;
    file.sync_all().map_err(from_io)?;
    let len = file.metadata().map_err(from_io)?.len();
    std::fs::rename(&aside, path).map_err(from_io)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok((finished, len))
}

/// Writes `payload` framed with `tag` to `out`.
fn write_frame(out: &mut dyn std::io::Write, tag: u8, payload: &[u8]) -> Result<(), KvError> {
    let mut framed = Vec::with_capacity(FRAME_HEAD + payload.len());
    frame(&mut framed, tag, payload);
    out.write_all(&framed).map_err(from_io)
}

/// Writes a journal of the earlier form (`unsynced`) again in the current one, with the same
/// records and mark; damage it held stays visible as one byte that is no frame, before the mark.
fn upgrade_journal(path: &Path) -> Result<(), KvError> {
    let old = std::fs::read(path).map_err(from_io)?;
    let (records, durable, damaged) = unsynced::parse(&old);
    let write = |out: &mut dyn std::io::Write| {
        for record in records {
            write_frame(out, RECORD, record)?;
        }
        if damaged {
            out.write_all(&[0]).map_err(from_io)?;
        }
        write_frame(out, MARK, &durable.to_be_bytes())
    };
    replace_file(path, write, |_| Ok(())).map(|_| ())
}

impl Journal {
    /// Opens the journal at `path` (made empty if there is none), cutting off a torn append;
    /// returns it with the highest batch number it marks.
    fn open(path: &Path) -> Result<(Journal, u64), KvError> {
        let mut start = [0u8; SYNC.len()];
        let earlier_form = match std::fs::File::open(path) {
            Ok(mut file) => match std::io::Read::read(&mut file, &mut start) {
                Ok(0) => false,
                Ok(_) => start != SYNC,
                Err(e) => return Err(from_io(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(from_io(e)),
        };
        if earlier_form {
            upgrade_journal(path)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(from_io)?;
        let len = file.metadata().map_err(from_io)?.len();
        let scanned =
            scan_journal(std::io::BufReader::new(&file), len, &mut |_| {}).map_err(from_io)?;
        let len = if scanned.valid_len < len && !scanned.damaged {
            file.set_len(scanned.valid_len).map_err(from_io)?;
            scanned.valid_len
        } else {
            len
        };
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        let journal = Journal {
            path: path.to_owned(),
            staged: Mutex::new((Vec::new(), 0)),
            file: Mutex::new(Appending {
                file,
                marked: scanned.durable,
                len,
            }),
        };
        Ok((journal, scanned.durable))
    }

    fn lock_staged(&self) -> MutexGuard<'_, (Vec<u8>, u64)> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_file(&self) -> MutexGuard<'_, Appending> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes batch `number`, applied, with its records.
    fn stage(&self, number: u64, records: &[Vec<u8>]) {
        let mut staged = self.lock_staged();
        for record in records {
            frame(&mut staged.0, RECORD, record);
        }
        staged.1 = number;
    }

    fn drop_staged(&self) {
        self.lock_staged().0.clear();
    }

    /// Runs `flush_data` (which makes every batch applied so far durable), then appends the
    /// records staged before it and the last batch's number, synced. Flushes take turns.
    fn flush(&self, flush_data: impl FnOnce() -> Result<(), KvError>) -> Result<(), KvError> {
        let mut file = self.lock_file();
        let (mut bytes, number) = {
            let mut staged = self.lock_staged();
            (std::mem::take(&mut staged.0), staged.1)
        };
        let records_len = bytes.len();
        let restage = |mut bytes: Vec<u8>| {
            // Appended by the next flush that succeeds (or dropped with their batches, if the
            // store goes back to what was durable).
            bytes.truncate(records_len);
            let mut staged = self.lock_staged();
            bytes.append(&mut staged.0);
            staged.0 = bytes;
        };
        if let Err(e) = flush_data() {
            restage(bytes);
            return Err(e);
        }
        if records_len == 0 && number <= file.marked {
            return Ok(());
        }
        frame(&mut bytes, MARK, &number.to_be_bytes());
        let len = file.len;
        // Records are synced before the flush returns, as the data is: a write is acknowledged
        // after it. A mark alone is not: a mark the disk lost only finds a later loss less
        // early, and a flush that wrote no local change costs no more sync.
        let appended = std::io::Write::write_all(&mut file.file, &bytes)
            .and_then(|()| {
                if records_len > 0 {
                    file.file.sync_data()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| {
                // Half an append would read as damage once more is appended after it.
                let _ = file.file.set_len(len);
                from_io(e)
            });
        match appended {
            Ok(()) => {
                file.marked = file.marked.max(number);
                file.len = len.saturating_add(bytes.len() as u64);
                Ok(())
            }
            Err(e) => {
                // The data is durable: the flush did what it is for, and failing it now would
                // refuse writes that are there to stay. Only their copies wait, for the next
                // append that succeeds.
                tracing::warn!(error = %e, "the journal could not be appended to; it catches up at the next flush");
                restage(bytes);
                Ok(())
            }
        }
    }

    /// Reads the journal's records as the file is now, a part at a time. Appends and rewrites
    /// go on meanwhile: what was appended after the read began is not read, and a rewrite
    /// replaces the file under another name, leaving the one being read whole.
    fn records(&self, each: &mut dyn FnMut(&[u8])) -> Result<bool, KvError> {
        let (file, len) = {
            let appending = self.lock_file();
            (
                std::fs::File::open(&self.path).map_err(from_io)?,
                appending.len,
            )
        };
        let scanned = scan_journal(std::io::BufReader::new(file), len, each).map_err(from_io)?;
        Ok(scanned.damaged)
    }

    fn bytes(&self) -> u64 {
        self.lock_file().len
    }

    /// Flushes as `flush` does, then replaces the file with the records `keep` gives, each
    /// written aside as it comes, and the last number marked, taken once they are (synced,
    /// renamed). Flushes go on while the records are written: the marks they append are
    /// covered by the one the new file ends with. Records staged meanwhile stay staged.
    fn rewrite(
        &self,
        keep: JournalKeep<'_>,
        flush_data: impl FnOnce() -> Result<(), KvError>,
    ) -> Result<(), KvError> {
        self.flush(flush_data)?;
        let write = |out: &mut dyn std::io::Write| {
            let mut failed = None;
            keep(&mut |record| {
                if failed.is_none()
                    && let Err(e) = write_frame(out, RECORD, record)
                {
                    failed = Some(e);
                }
            })?;
            failed.map_or(Ok(()), Err)
        };
        let finish = |out: &mut dyn std::io::Write| {
            let file = self.lock_file();
            write_frame(out, MARK, &file.marked.to_be_bytes())?;
            Ok(file)
        };
        let (mut file, len) = replace_file(&self.path, write, finish)?;
        file.file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(from_io)?;
        file.len = len;
        Ok(())
    }
}

/// The sled directories under a store's path. Generation 0 is the path itself (every store
/// starts there); generation n > 0 is `gen-{n}`, made by a compaction. The file `CURRENT` names
/// the one in use once a compaction has happened; it is replaced atomically (written aside,
/// synced, renamed), so a crash leaves it naming either the old generation or the new, complete
/// one. Whatever else is found at open is an unfinished copy or an old generation not yet
/// removed, and goes.
struct Generations {
    root: PathBuf,
}

/// The files sled keeps in its directory.
const SLED_FILES: [&str; 3] = ["db", "conf", "blobs"];

impl Generations {
    fn dir(&self, generation: u64) -> PathBuf {
        match generation {
            0 => self.root.clone(),
            n => self.root.join(format!("gen-{n}")),
        }
    }

    fn current(&self) -> Result<u64, KvError> {
        let path = self.root.join("CURRENT");
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .strip_prefix("gen-")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    KvError::Corrupt(format!(
                        "{} does not name a generation ({text:?})",
                        path.display()
                    ))
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(from_io(e)),
        }
    }

    /// The generation in use, after removing every other one.
    fn settle(&self) -> Result<u64, KvError> {
        let current = self.current()?;
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(from_io(e)),
        };
        for entry in entries {
            let name = entry.map_err(from_io)?.file_name();
            let name = name.to_string_lossy();
            let stale = match name.strip_prefix("gen-") {
                Some(n) => n.parse::<u64>().is_ok_and(|n| n != current),
                None => name == "CURRENT.new",
            };
            if stale {
                remove_all(&self.root.join(name.as_ref()))?;
            }
        }
        if current != 0 {
            if !self.dir(current).join("db").exists() {
                return Err(KvError::Corrupt(format!(
                    "{} names gen-{current}, which holds no store",
                    self.root.join("CURRENT").display()
                )));
            }
            self.remove(0)?;
        }
        Ok(current)
    }

    /// Makes `generation` the one in use, durably.
    fn switch_to(&self, generation: u64) -> Result<(), KvError> {
        let aside = self.root.join("CURRENT.new");
        let mut file = std::fs::File::create(&aside).map_err(from_io)?;
        std::io::Write::write_all(&mut file, format!("gen-{generation}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(from_io)?;
        std::fs::rename(&aside, self.root.join("CURRENT")).map_err(from_io)?;
        sync_dir(&self.root)
    }

    /// Removes a generation no longer in use.
    fn remove(&self, generation: u64) -> Result<(), KvError> {
        match generation {
            0 => {
                for name in SLED_FILES {
                    remove_all(&self.root.join(name))?;
                }
                // sled's snapshot files, `snap.{lsn}` and their temporaries.
                for entry in std::fs::read_dir(&self.root).map_err(from_io)? {
                    let entry = entry.map_err(from_io)?;
                    if entry.file_name().to_string_lossy().starts_with("snap.") {
                        remove_all(&entry.path())?;
                    }
                }
                Ok(())
            }
            n => remove_all(&self.dir(n)),
        }
    }
}

fn remove_all(path: &Path) -> Result<(), KvError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed.map_err(from_io)
}

/// Syncs every file under `dir` (sled syncs its log, not necessarily its config file or the
/// directories' entries), then `dir` itself.
fn sync_all(dir: &Path) -> Result<(), KvError> {
    for entry in std::fs::read_dir(dir).map_err(from_io)? {
        let path = entry.map_err(from_io)?.path();
        if path.is_dir() {
            sync_all(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|file| file.sync_all())
                .map_err(from_io)?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(path: &Path) -> Result<(), KvError> {
    std::fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(from_io)
}

/// An in-memory engine. Clones share the same map, so a test can "reopen" a store by building a
/// new one over a clone. `durable` holds what the last flush made durable; `crash()` throws away
/// the rest, as a power cut would.
#[derive(Clone, Default)]
pub struct MemoryKv {
    inner: Arc<Mutex<MemoryState>>,
}

/// Values are kept sealed, as on disk.
#[derive(Default)]
struct MemoryState {
    visible: BTreeMap<Vec<u8>, Vec<u8>>,
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    journal_staged: Vec<Vec<u8>>,
    journal: Vec<Vec<u8>>,
    /// The next journal rewrite fails, doing nothing, as a crash before it would leave it.
    refuse_rewrite: bool,
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything that was applied but not flushed.
    pub fn crash(&self) {
        let mut state = self.lock();
        state.visible = state.durable.clone();
        state.journal_staged.clear();
    }

    /// Has the next `rewrite_journal` fail before it does anything, as a crash there would.
    pub fn refuse_journal_rewrite(&self) {
        self.lock().refuse_rewrite = true;
    }

    /// Flips a bit of the value stored under `key`, as damage on a disk would (the value then
    /// fails its checksum). False when there is no such key.
    pub fn damage(&self, key: &[u8]) -> bool {
        let mut state = self.lock();
        let MemoryState {
            visible, durable, ..
        } = &mut *state;
        let mut found = false;
        for map in [visible, durable] {
            if let Some(byte) = map.get_mut(key).and_then(|v| v.first_mut()) {
                *byte ^= 0x10;
                found = true;
            } else if let Some(v) = map.get_mut(key) {
                // An empty value is its checksum alone.
                v.clear();
                found = true;
            }
        }
        found
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding this lock can only come from a bug in a test; the map itself is
        // never left half-updated, so carrying on with it is sound.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bounds<'a>(start: &'a [u8], end: &'a [u8]) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (Bound::Included(start), Bound::Excluded(end))
}

impl Kv for MemoryKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let stored = self.lock().visible.get(key).cloned();
        stored.map(|v| unseal(key, v)).transpose()
    }

    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.lock().visible.contains_key(key))
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let state = self.lock();
        state
            .visible
            .range::<[u8], _>(bounds(start, end))
            .take(limit)
            .map(|(k, v)| Ok((k.clone(), unseal(k, v.clone())?)))
            .collect()
    }

    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if start >= end {
            return Ok(None);
        }
        let state = self.lock();
        Ok(state
            .visible
            .range::<[u8], _>(bounds(start, end))
            .next_back()
            .map(|(k, _)| k.clone()))
    }

    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        if start >= end {
            return Ok(0);
        }
        Ok(self
            .lock()
            .visible
            .range::<[u8], _>(bounds(start, end))
            .count() as u64)
    }

    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        let mut state = self.lock();
        for (key, value) in batch.ops {
            match value {
                Some(v) => {
                    let sealed = seal(&key, &v);
                    state.visible.insert(key, sealed)
                }
                None => state.visible.remove(&key),
            };
        }
        state.journal_staged.extend(batch.journal);
        Ok(())
    }

    fn flush(&self) -> Result<(), KvError> {
        let mut state = self.lock();
        state.durable = state.visible.clone();
        let staged = std::mem::take(&mut state.journal_staged);
        state.journal.extend(staged);
        Ok(())
    }

    fn journal(&self, each: &mut dyn FnMut(&[u8])) -> Result<bool, KvError> {
        let records = self.lock().journal.clone();
        records.iter().for_each(|record| each(record));
        Ok(false)
    }

    fn journal_bytes(&self) -> u64 {
        self.lock().journal.iter().map(|r| r.len() as u64).sum()
    }

    fn rewrite_journal(&self, keep: JournalKeep<'_>) -> Result<(), KvError> {
        if std::mem::take(&mut self.lock().refuse_rewrite) {
            return Err(KvError::Io("the journal rewrite was refused".into()));
        }
        self.flush()?;
        let mut records = Vec::new();
        keep(&mut |record| records.push(record.to_vec()))?;
        self.lock().journal = records;
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, KvError> {
        Ok(self
            .lock()
            .durable
            .iter()
            .map(|(k, v)| (k.len() + v.len().saturating_sub(SEAL_BYTES)) as u64)
            .sum())
    }

    fn key_sizes(&self, each: &mut dyn FnMut(&[u8], u64)) -> Result<(), KvError> {
        for (k, v) in &self.lock().visible {
            each(k, v.len().saturating_sub(SEAL_BYTES) as u64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn put(kv: &dyn Kv, key: &[u8], value: Vec<u8>) {
        let mut batch = Batch::default();
        batch.put(key.to_vec(), value);
        kv.apply(batch).unwrap();
    }

    /// Every pair of the store, as its `range` reads it.
    fn all(kv: &dyn Kv) -> Vec<Pair> {
        kv.range(b"", &[0xff; 4], usize::MAX).unwrap()
    }

    /// How many chunks sled holds (the engine's reserved keys but its own two).
    fn chunks(kv: &SledKv) -> usize {
        let own = [RESERVED, 0xff, 0xff, 0xff, 0xff];
        kv.read()
            .db()
            .unwrap()
            .range([RESERVED]..)
            .keys()
            .filter(|k| !k.as_ref().unwrap().starts_with(&own))
            .count()
    }

    #[test]
    fn long_values_are_kept_in_chunks_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        let sizes = [0, 1, CHUNK - 8, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 100_000];
        let mut expected = BTreeMap::new();
        let mut batch = Batch::default();
        for (n, len) in sizes.iter().enumerate() {
            // `k1` is a prefix of `k10`...: their chunks must not meet.
            let key = format!("k{n}").into_bytes();
            batch.put(key.clone(), value(*len, n as u8));
            batch.put([key.clone(), b"0".to_vec()].concat(), value(*len, 7));
            expected.insert(key.clone(), value(*len, n as u8));
            expected.insert([key, b"0".to_vec()].concat(), value(*len, 7));
        }
        kv.apply(batch).unwrap();
        let pairs: Vec<Pair> = expected.clone().into_iter().collect();
        assert_eq!(all(&kv), pairs);
        for (key, v) in &expected {
            assert_eq!(kv.get(key).unwrap().as_ref(), Some(v));
        }
        let live: u64 = pairs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        assert_eq!(kv.live_bytes().unwrap(), live);
        assert_eq!(kv.count(b"", &[0xff]).unwrap(), pairs.len() as u64);
        assert_eq!(
            kv.last_key(b"", &[0xff, 0xff]).unwrap(),
            Some(b"k60".to_vec())
        );

        // A long value made shorter, long made short, and removed: no chunk is left behind.
        put(&kv, b"k6", value(2 * CHUNK, 9));
        assert_eq!(kv.get(b"k6").unwrap(), Some(value(2 * CHUNK, 9)));
        put(&kv, b"k5", value(10, 9));
        assert_eq!(kv.get(b"k5").unwrap(), Some(value(10, 9)));
        let mut batch = Batch::default();
        for key in expected.keys() {
            batch.remove(key.clone());
        }
        // The last write of a key in a batch wins, as in sled.
        batch.put(b"k6".to_vec(), value(CHUNK * 2 + 5, 1));
        batch.remove(b"k6".to_vec());
        batch.remove(b"k4".to_vec());
        batch.put(b"k4".to_vec(), value(CHUNK * 2 + 5, 1));
        kv.apply(batch).unwrap();
        assert_eq!(all(&kv), vec![(b"k4".to_vec(), value(CHUNK * 2 + 5, 1))]);
        assert_eq!(chunks(&kv), 3);
        let mut batch = Batch::default();
        batch.put(vec![RESERVED, 1], b"x".to_vec());
        assert!(matches!(kv.apply(batch), Err(KvError::Io(_))));
    }

    #[test]
    fn a_long_value_stored_whole_by_an_older_version_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        db.insert(b"old", value(50_000, 3)).unwrap();
        db.flush().unwrap();
        drop(db);
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(kv.get(b"old").unwrap(), Some(value(50_000, 3)));
        assert_eq!(all(&kv), vec![(b"old".to_vec(), value(50_000, 3))]);
    }

    #[test]
    fn a_compaction_keeps_every_pair_and_leaves_only_the_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        for round in 0..20u8 {
            put(&kv, b"big", value(200_000, round));
            put(&kv, &[b's', round], value(100, round));
        }
        // Copied in several of the copy's batches.
        put(&kv, b"huge", value(3 * COPY_BATCH_BYTES + 17, 5));
        let before = all(&kv);
        kv.compact().unwrap();
        assert_eq!(all(&kv), before);
        assert_eq!(
            SledKv::current_dir(dir.path()).unwrap(),
            dir.path().join("gen-1")
        );
        assert!(
            !dir.path().join("db").exists(),
            "the old generation is gone"
        );
        put(&kv, b"after", b"1".to_vec());
        kv.compact().unwrap();
        assert!(!dir.path().join("gen-1").exists());
        kv.flush().unwrap();
        drop(kv);
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        let mut expected = before;
        expected.insert(0, (b"after".to_vec(), b"1".to_vec()));
        assert_eq!(all(&kv), expected);
    }

    /// A crash at any point of a compaction: before `CURRENT` names the new generation, the old
    /// one is whole and the half-made copy goes at the next open; after, the new one is whole
    /// and what is left of the old one goes.
    #[test]
    fn an_interrupted_compaction_leaves_the_old_or_the_new_store_whole() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        put(&kv, b"a", value(10_000, 1));
        kv.flush().unwrap();
        drop(kv);
        // Crashed while copying: a generation no `CURRENT` names, and a `CURRENT` being written.
        std::fs::create_dir_all(dir.path().join("gen-1/blobs")).unwrap();
        std::fs::write(dir.path().join("gen-1/db"), b"half a copy").unwrap();
        std::fs::write(dir.path().join("CURRENT.new"), b"gen-1\n").unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(kv.get(b"a").unwrap(), Some(value(10_000, 1)));
        assert!(!dir.path().join("gen-1").exists());
        assert!(!dir.path().join("CURRENT.new").exists());
        kv.compact().unwrap();
        drop(kv);
        // Crashed after the switch, before the old generation was removed.
        std::fs::write(dir.path().join("db"), b"the old log").unwrap();
        std::fs::write(dir.path().join("conf"), b"the old conf").unwrap();
        std::fs::create_dir_all(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("snap.0001"), b"an old snapshot").unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(all(&kv), vec![(b"a".to_vec(), value(10_000, 1))]);
        for old in ["db", "conf", "blobs", "snap.0001"] {
            assert!(!dir.path().join(old).exists(), "{old} is left");
        }
        drop(kv);
        std::fs::rename(dir.path().join("gen-1"), dir.path().join("elsewhere")).unwrap();
        assert!(matches!(
            SledKv::open(dir.path(), 1 << 20),
            Err(KvError::Corrupt(_))
        ));
        std::fs::write(dir.path().join("CURRENT"), b"nonsense").unwrap();
        assert!(matches!(
            SledKv::open(dir.path(), 1 << 20),
            Err(KvError::Corrupt(_))
        ));
    }
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// A value whose bytes changed under sled fails its checksum, naming its key, short or
    /// chunked; the others still read.
    #[test]
    fn a_damaged_value_is_refused_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        put(&kv, b"short", value(10, 1));
        put(&kv, b"long", value(3 * CHUNK, 2));
        put(&kv, b"fine", value(10, 3));
        {
            let engine = kv.read();
            let db = engine.db().unwrap();
            let mut stored = db.get(b"short").unwrap().unwrap().to_vec();
            stored[3] ^= 1;
            db.insert(b"short", stored).unwrap();
            let chunk = chunk_key(&chunk_prefix(b"long"), 1);
            let mut stored = db.get(&chunk).unwrap().unwrap().to_vec();
            stored[100] ^= 0x40;
            db.insert(chunk, stored).unwrap();
        }
        for key in [&b"short"[..], b"long"] {
            match kv.get(key) {
                Err(KvError::Damaged(k)) => assert_eq!(k, key),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(kv.range(b"a", b"z", 10), Err(KvError::Damaged(k)) if k == b"long"));
        assert_eq!(kv.get(b"fine").unwrap(), Some(value(10, 3)));
    }

    /// sled files that lost the last batches (as its recovery drops everything after a record
    /// that fails its checksum) are found at open against the journal, whose records are all
    /// still there; batches written after the loss go on from the journal's number, so the
    /// loss is not hidden by later writes.
    #[test]
    fn batches_the_data_lost_are_found_against_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let saved = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        let mut batch = Batch::default();
        batch.put(b"a".to_vec(), b"1".to_vec());
        batch.journal(b"first".to_vec());
        kv.apply(batch).unwrap();
        kv.flush().unwrap();
        drop(kv);
        wait_released(dir.path());
        copy_dir(dir.path(), saved.path());
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(kv.lost(), None);
        for n in 0..2u8 {
            let mut batch = Batch::default();
            batch.put(vec![b'b', n], b"2".to_vec());
            batch.journal(vec![b'j', n]);
            kv.apply(batch).unwrap();
        }
        kv.flush().unwrap();
        drop(kv);
        wait_released(dir.path());
        Generations {
            root: dir.path().to_owned(),
        }
        .remove(0)
        .unwrap();
        for entry in std::fs::read_dir(saved.path()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "journal" {
                let target = dir.path().join(entry.file_name());
                if entry.file_type().unwrap().is_dir() {
                    copy_dir(&entry.path(), &target);
                } else {
                    std::fs::copy(entry.path(), target).unwrap();
                }
            }
        }
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            kv.lost(),
            Some(Lost {
                durable: 3,
                found: 1
            })
        );
        assert_eq!(kv.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(kv.get(&[b'b', 0]).unwrap(), None);
        let (records, damaged) = journal_of(&kv);
        assert_eq!(
            records,
            [b"first".to_vec(), b"j\0".to_vec(), b"j\x01".to_vec()]
        );
        assert!(!damaged);
        put(&kv, b"after", b"3".to_vec());
        kv.flush().unwrap();
        drop(kv);
        wait_released(dir.path());
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(kv.lost(), None, "batch 4 holds everything up to 3 again");
    }

    /// A torn append at the journal's tail is cut off quietly; a damaged record with good ones
    /// after it is damage, and the good ones still count.
    #[test]
    fn a_torn_journal_tail_is_cut_and_damage_inside_it_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        for n in 0..3u8 {
            let mut batch = Batch::default();
            batch.journal(vec![b'j', n]);
            kv.apply(batch).unwrap();
            kv.flush().unwrap();
        }
        drop(kv);
        wait_released(dir.path());
        let path = dir.path().join("journal");
        let mut bytes = std::fs::read(&path).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(&SYNC);
        bytes.extend_from_slice(&[RECORD, 40, 0, 0, 0, 1, 2]);
        std::fs::write(&path, &bytes).unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(kv.lost(), None);
        assert_eq!(
            journal_of(&kv),
            (
                vec![b"j\0".to_vec(), b"j\x01".to_vec(), b"j\x02".to_vec()],
                false
            )
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole as u64);
        drop(kv);
        wait_released(dir.path());
        // The second record's payload, flipped.
        let mut bytes = std::fs::read(&path).unwrap();
        let second = bytes.windows(2).position(|w| w == b"j\x01").unwrap();
        bytes[second + 1] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            journal_of(&kv),
            (vec![b"j\0".to_vec(), b"j\x02".to_vec()], true)
        );
        assert_eq!(kv.lost(), None, "the marks after the damage still count");
    }

    /// The journal's records and whether it is damaged.
    fn journal_of(kv: &dyn Kv) -> (Vec<Vec<u8>>, bool) {
        let mut records = Vec::new();
        let damaged = kv.journal(&mut |r| records.push(r.to_vec())).unwrap();
        (records, damaged)
    }

    /// Past damage, the journal is read on from the next frame's sync bytes in one pass,
    /// reading a part at a time: records longer than a read, frames split across reads, a
    /// stated length past the end, and long runs of garbage (where trying every offset took
    /// time quadratic in their length) all read as they should.
    #[test]
    fn a_damaged_journal_is_read_on_from_the_next_frame_in_one_pass() {
        let long = vec![7u8; READ_AHEAD * 2 + 5];
        let mut bytes = Vec::new();
        frame(&mut bytes, RECORD, b"one");
        frame(&mut bytes, RECORD, &long);
        frame(&mut bytes, MARK, &5u64.to_be_bytes());
        let whole = bytes.len();
        // Garbage with tags and lengths that would each be tried as a frame.
        bytes.extend((0..3 * READ_AHEAD).map(|i| if i % 2 == 0 { RECORD } else { 1 }));
        frame(&mut bytes, RECORD, b"two");
        let mut head = Vec::new();
        frame(&mut head, RECORD, b"three");
        // A head stating far more than the file holds.
        head[SYNC.len() + 1..SYNC.len() + 5].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&head);
        frame(&mut bytes, RECORD, b"four");
        let mut records = Vec::new();
        let scanned = scan_journal(bytes.as_slice(), bytes.len() as u64, &mut |r| {
            records.push(r.to_vec())
        })
        .unwrap();
        assert_eq!(
            records,
            [b"one".to_vec(), long, b"two".to_vec(), b"four".to_vec()]
        );
        assert_eq!(
            scanned,
            Scanned {
                durable: 5,
                valid_len: bytes.len() as u64,
                damaged: true
            }
        );
        // A torn last append: everything before it, undamaged.
        let torn = bytes.get(..whole + 3).unwrap();
        let scanned = scan_journal(torn, torn.len() as u64, &mut |_| {}).unwrap();
        assert_eq!((scanned.valid_len, scanned.damaged), (whole as u64, false));
    }

    /// A rewrite keeps the records it is handed, written as they come, and the last mark;
    /// appends go on after it, and the length kept in memory is the file's.
    #[test]
    fn a_rewritten_journal_keeps_what_it_is_handed_and_appends_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        for n in 0..3u8 {
            let mut batch = Batch::default();
            batch.journal(vec![b'j', n]);
            kv.apply(batch).unwrap();
        }
        kv.flush().unwrap();
        kv.rewrite_journal(&mut |keep| {
            keep(b"j\x01");
            keep(b"j\x02");
            Ok(())
        })
        .unwrap();
        let mut batch = Batch::default();
        batch.journal(b"j\x03".to_vec());
        kv.apply(batch).unwrap();
        kv.flush().unwrap();
        let path = dir.path().join("journal");
        assert_eq!(kv.journal_bytes(), std::fs::metadata(&path).unwrap().len());
        let kept = vec![b"j\x01".to_vec(), b"j\x02".to_vec(), b"j\x03".to_vec()];
        assert_eq!(journal_of(&kv), (kept.clone(), false));
        // A rewrite whose records cannot all be had leaves the journal as it was.
        let refused = kv.rewrite_journal(&mut |keep| {
            keep(b"only this");
            Err(KvError::Io("the queue could not be read".into()))
        });
        assert!(refused.is_err());
        assert!(!path.with_extension("new").exists());
        drop(kv);
        wait_released(dir.path());
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(journal_of(&kv), (kept, false));
        assert_eq!(kv.lost(), None);
    }

    /// A journal written before frames started with sync bytes is written again in the
    /// current form at open: the same records and mark, its damage still reported.
    #[test]
    fn a_journal_of_the_earlier_form_is_read_and_written_again() {
        let earlier = |tag: u8, payload: &[u8]| {
            let mut framed = Vec::new();
            frame(&mut framed, tag, payload);
            framed.split_off(SYNC.len())
        };
        for damaged in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("journal");
            let mut bytes = earlier(RECORD, b"one");
            if damaged {
                bytes.extend_from_slice(&[RECORD, 1, 2]);
            }
            bytes.extend(earlier(RECORD, b"two"));
            bytes.extend(earlier(MARK, &4u64.to_be_bytes()));
            std::fs::write(&path, &bytes).unwrap();
            let (journal, durable) = Journal::open(&path).unwrap();
            assert_eq!(durable, 4);
            let mut records = Vec::new();
            let found = journal.records(&mut |r| records.push(r.to_vec())).unwrap();
            assert_eq!(records, [b"one".to_vec(), b"two".to_vec()]);
            assert_eq!(found, damaged);
            assert_eq!(
                std::fs::read(&path).unwrap().get(..SYNC.len()),
                Some(&SYNC[..])
            );
        }
    }

    /// sled lets go of its directory's lock a moment after the last `Db` is dropped.
    fn wait_released(path: &Path) {
        for _ in 0..500 {
            match try_open_db(path, 1 << 20) {
                Ok(db) => {
                    drop(db);
                    return;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    /// A snapshot file sled was writing when its process was killed is left as
    /// `snap.{lsn}.generating`, which sled 0.34 reads as its latest snapshot and refuses as
    /// corrupt: the store opens anyway, from the log, with everything it held.
    #[test]
    fn a_snapshot_sled_did_not_finish_writing_does_not_keep_the_store_shut() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        put(&kv, b"a", value(10, 1));
        put(&kv, b"b", value(3 * CHUNK, 2));
        kv.flush().unwrap();
        drop(kv);
        wait_released(dir.path());
        let unfinished = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
        std::fs::write(&unfinished, b"half a snapshot, cut short by SIGKILL").unwrap();
        assert!(matches!(
            try_open_db(dir.path(), 1 << 20),
            Err(KvError::Corrupt(_))
        ));
        let kv = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(kv.get(b"a").unwrap(), Some(value(10, 1)));
        assert_eq!(kv.get(b"b").unwrap(), Some(value(3 * CHUNK, 2)));
        assert!(!unfinished.exists());
    }
}
