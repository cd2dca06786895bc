//! Damage to the store: found at open, met at read, examined in full and repaired.
//!
//! Owns: the `mdamage` key (what was found, kept until a repair, so that every later open and
//! `status` still says so), the journal of unsynced local changes (each new queue entry, whole,
//! is journaled with the batch that writes it, `Batch::journal`, and the journal is rewritten
//! with the entries not yet completed when it has grown, and before completed entries are
//! pruned), the full examination `doctor` runs, and the repair.
//!
//! What counts as damage: a value whose checksum fails (`KvError::Damaged`), a document that
//! does not load, a queue entry that does not decode or lost its change, a pending-index key
//! that disagrees with the queue, a document count that disagrees with the documents, batches the engine lost (`Kv::lost`), and journaled changes
//! the queue no longer holds. A repair removes every damaged value, puts the journaled changes
//! the queue lost back (pending, applied to their documents where these hold what they build
//! on; the rest reach them through the relay's log once uploaded), rebuilds the pending index,
//! and, when anything but the queue was damaged, forgets what the device had read of the relay
//! (cursor, logged heads, conflict entries and counters, quarantine) so that it reads it all
//! again: documents merge, so nothing local is lost. Damaged values are never uploaded: a
//! queue entry that fails its check is never read as one.
//!
//! Must not touch: the network or sessions; the daemon decides when to repair.

use super::kv::{Batch, Kv, KvError, Pair, forward_to_inner, printable};
use super::{QueueCounts, Store, StoreError, decode, encode, keys, stage_entry};
use ferry_proto::{Operation, QueueStatus, SyncQueueEntry};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

/// What is known to be wrong with the store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Damage {
    /// When it was first found (Unix ms).
    pub since_ms: u64,
    /// Batches made durable that the data no longer holds: the engine's recovery dropped them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_batches: Option<LostBatches>,
    /// Values that fail their checksum or cannot be read as what their key says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<DamagedValue>,
    /// Local changes acknowledged and not yet uploaded that the queue lost or holds damaged;
    /// the journal has them whole, and a repair puts them back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recoverable: Vec<LostChange>,
    /// Queue entries damaged with no copy in the journal: their changes are lost, unless they
    /// reached the relay before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unrecoverable: Vec<u64>,
    /// The journal itself holds damaged records (those past them still count).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub journal_damaged: bool,
}

impl Damage {
    fn is_empty(&self) -> bool {
        self.lost_batches.is_none()
            && self.damaged.is_empty()
            && self.recoverable.is_empty()
            && self.unrecoverable.is_empty()
            && !self.journal_damaged
    }

    /// One line saying what is wrong.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(lost) = &self.lost_batches {
            parts.push(format!(
                "the data lost {} batches written before it was last closed",
                lost.durable.saturating_sub(lost.found)
            ));
        }
        if !self.damaged.is_empty() {
            parts.push(format!("{} damaged values", self.damaged.len()));
        }
        if !self.recoverable.is_empty() {
            parts.push(format!(
                "{} unsynced local changes missing from the queue (kept in the journal)",
                self.recoverable.len()
            ));
        }
        if !self.unrecoverable.is_empty() {
            parts.push(format!(
                "{} queue entries damaged with no copy",
                self.unrecoverable.len()
            ));
        }
        if self.journal_damaged {
            parts.push("the journal of unsynced changes is damaged".into());
        }
        parts.join("; ")
    }

    fn merge(&mut self, other: Damage) {
        self.lost_batches = self.lost_batches.take().or(other.lost_batches);
        for value in other.damaged {
            if !self.damaged.iter().any(|d| d.key == value.key) {
                self.damaged.push(value);
            }
        }
        for change in other.recoverable {
            if !self
                .recoverable
                .iter()
                .any(|c| c.queue_id == change.queue_id)
            {
                self.recoverable.push(change);
            }
        }
        for id in other.unrecoverable {
            if !self.unrecoverable.contains(&id) {
                self.unrecoverable.push(id);
            }
        }
        self.journal_damaged |= other.journal_damaged;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostBatches {
    /// The last batch the journal says was made durable.
    pub durable: u64,
    /// The last batch the data holds.
    pub found: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedValue {
    /// What the key holds: document, queue entry, queue change, pending index, cursor, ...
    pub kind: String,
    /// The key, printable.
    pub key: String,
    pub detail: String,
}

/// A local change the journal holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostChange {
    pub queue_id: u64,
    pub collection: String,
    pub id: String,
    pub operation: Operation,
}

impl LostChange {
    fn of(entry: &SyncQueueEntry) -> Self {
        LostChange {
            queue_id: entry.id,
            collection: entry.model_name.clone(),
            id: entry.object_id.clone(),
            operation: entry.operation,
        }
    }
}

/// What `Store::examine` read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkup {
    /// `None`: nothing is wrong.
    pub damage: Option<Damage>,
    pub keys: u64,
    pub documents: u64,
    pub queue_entries: u64,
    /// Records the journal holds (one per unsynced change, until a change journaled again is
    /// rewritten away).
    pub journaled_changes: u64,
}

/// What `Store::repair` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Repaired {
    /// Damaged values removed (a document is then read again from the relay).
    pub removed: Vec<DamagedValue>,
    /// Local changes put back into the queue from the journal.
    pub restored: Vec<LostChange>,
    /// Queue entries whose changes are lost for good.
    pub unrecoverable: Vec<u64>,
    /// Whether the device reads the relay's data again from the start.
    pub reads_relay_again: bool,
}

/// The journal is rewritten once it takes this much, or twice what it took after the last
/// rewrite if that is more.
const JOURNAL_MIN_LIMIT: u64 = 4 << 20;

/// The keys a repair removes so that the device reads the relay's data again: its read
/// position, the heads logged per record, conflict entries, unique values and counters,
/// quarantined entries, and a bootstrap's pages.
const READ_FROM_RELAY: [&[u8]; 6] = [b"c", b"h", b"x", b"u", b"k", b"z"];

fn damaged_value(key: &[u8], detail: impl Into<String>) -> DamagedValue {
    DamagedValue {
        kind: keys::Kind::of(key).one().into(),
        key: printable(key),
        detail: detail.into(),
    }
}

/// The kinds of keys a repair may remove without reading the relay's data again: the queue's,
/// and record views, index entries and document counts, which it computes again from the
/// documents.
fn queue_only(key: &[u8]) -> bool {
    matches!(
        key.first(),
        Some(b'q' | b'y' | b'b' | b'p' | b'l' | b'v' | b'i' | b'n')
    ) || key == keys::META_QUEUE_COUNTS
}

/// Notes the keys whose values failed their checksum when read, so that `status` says the
/// store is damaged as soon as anything meets it.
pub(super) struct Watched {
    inner: Box<dyn Kv>,
    seen: Arc<Mutex<BTreeSet<Vec<u8>>>>,
}

impl Watched {
    pub(super) fn new(inner: Box<dyn Kv>) -> (Self, Arc<Mutex<BTreeSet<Vec<u8>>>>) {
        let seen = Arc::default();
        let watched = Watched {
            inner,
            seen: Arc::clone(&seen),
        };
        (watched, seen)
    }

    fn note<T>(&self, result: Result<T, KvError>) -> Result<T, KvError> {
        if let Err(KvError::Damaged(key)) = &result {
            lock(&self.seen).insert(key.clone());
        }
        result
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Kv for Watched {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.note(self.inner.get(key))
    }
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        self.note(self.inner.range(start, end, limit))
    }
    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        self.note(self.inner.apply(batch))
    }
    fn live_bytes(&self) -> Result<u64, KvError> {
        self.note(self.inner.live_bytes())
    }
    fn key_sizes(&self, each: &mut dyn FnMut(&[u8], u64)) -> Result<(), KvError> {
        self.note(self.inner.key_sizes(each))
    }
    fn compact(&self) -> Result<(), KvError> {
        self.note(self.inner.compact())
    }
    forward_to_inner!(
        last_key,
        count,
        flush,
        size_on_disk,
        disk_full_since,
        reopen,
        resume_writes,
        lost,
        journal,
        journal_bytes,
        rewrite_journal,
    );
}

/// Journaled changes decoded and handed on at a time: what reading the journal holds in memory
/// besides the changes a caller keeps.
const JOURNAL_PAGE: usize = 1024;

/// What a read of the whole journal found.
#[derive(Default)]
pub(super) struct JournalRead {
    /// Records read (a change journaled twice, before the journal is rewritten, counts twice).
    pub(super) records: u64,
    /// The id after the highest journaled.
    pub(super) next_id: u64,
    /// A record was damaged or did not decode.
    damaged: bool,
}

/// Reads the journal a page of decoded changes at a time, handing each page to `page`: memory
/// stays bounded however many unsynced changes it holds.
fn journal_pages(
    kv: &dyn Kv,
    page: &mut dyn FnMut(Vec<SyncQueueEntry>) -> Result<(), StoreError>,
) -> Result<JournalRead, StoreError> {
    let mut read = JournalRead::default();
    let mut entries = Vec::with_capacity(JOURNAL_PAGE);
    let mut failed = None;
    let mut undecodable = false;
    let damaged = kv.journal(&mut |record| {
        if failed.is_some() {
            return;
        }
        read.records += 1;
        match decode::<SyncQueueEntry>(record, "journaled change") {
            Ok(entry) => {
                read.next_id = read.next_id.max(entry.id.saturating_add(1));
                entries.push(entry);
            }
            Err(_) => undecodable = true,
        }
        if entries.len() >= JOURNAL_PAGE
            && let Err(e) = page(std::mem::take(&mut entries))
        {
            failed = Some(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    if !entries.is_empty() {
        page(entries)?;
    }
    read.damaged = damaged || undecodable;
    Ok(read)
}

/// The journaled changes `keep` says to keep (the last copy of each id), read a page at a time.
fn journaled(
    kv: &dyn Kv,
    keep: impl Fn(u64) -> bool,
) -> Result<(BTreeMap<u64, SyncQueueEntry>, JournalRead), StoreError> {
    let mut kept = BTreeMap::new();
    let read = journal_pages(kv, &mut |entries| {
        for entry in entries {
            if keep(entry.id) {
                kept.insert(entry.id, entry);
            }
        }
        Ok(())
    })?;
    Ok((kept, read))
}

/// The ids of a page of journaled `entries` the queue holds, read in one pass over the queue's
/// keys from the page's first id to its last (one point read per entry costs several times as
/// much, and a device back from a long time offline journals every change it made), or by
/// point reads when the page's ids lie far apart. An entry the pass does not find (none, when it
/// meets a damaged value) is read on its own by the caller, which tells which.
fn held_queue_ids(kv: &dyn Kv, entries: &[SyncQueueEntry]) -> BTreeSet<u64> {
    const PAGE: usize = 1024;
    let ids: BTreeSet<u64> = entries.iter().map(|e| e.id).collect();
    let mut held = BTreeSet::new();
    let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
        return held;
    };
    // Past this spread, the pass would read more of the queue than the page asks about.
    if last.saturating_sub(*first) > (ids.len() as u64).saturating_mul(4) {
        return held;
    }
    let mut start = keys::queue(*first);
    let end = keys::queue(last.saturating_add(1));
    loop {
        let page = match kv.range(&start, &end, PAGE) {
            Ok(page) => page,
            Err(_) => return BTreeSet::new(),
        };
        let Some((last_key, _)) = page.last() else {
            return held;
        };
        start = keys::after(last_key);
        for (key, _) in &page {
            if let Ok(id) = keys::seq_of(key, keys::QUEUE.len())
                && ids.contains(&id)
            {
                held.insert(id);
            }
        }
        if page.len() < PAGE {
            return held;
        }
    }
}

/// What the open finds cheaply: batches the engine lost, and journaled changes the queue does
/// not hold (the journal holds the changes not uploaded yet). Reads the journal a page at a
/// time and keeps only the changes the queue lacks.
pub(super) fn check_at_open(kv: &dyn Kv, now: u64) -> Result<(Damage, JournalRead), StoreError> {
    let mut missing: BTreeMap<u64, SyncQueueEntry> = BTreeMap::new();
    let mut damaged: BTreeMap<u64, DamagedValue> = BTreeMap::new();
    let read = journal_pages(kv, &mut |entries| {
        let held = held_queue_ids(kv, &entries);
        for entry in entries {
            if held.contains(&entry.id) {
                continue;
            }
            match kv.get(&keys::queue(entry.id)) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    missing.insert(entry.id, entry);
                }
                Err(KvError::Damaged(key)) => {
                    damaged.insert(entry.id, damaged_value(&key, "checksum mismatch"));
                    missing.insert(entry.id, entry);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })?;
    // A completed entry the journal still holds may have gone to the queue's history.
    let in_history = super::history::holds(kv, &missing.keys().copied().collect());
    missing.retain(|id, _| !in_history.contains(id));
    let damage = Damage {
        since_ms: now,
        lost_batches: kv.lost().map(|l| LostBatches {
            durable: l.durable,
            found: l.found,
        }),
        journal_damaged: read.damaged,
        damaged: damaged.into_values().collect(),
        recoverable: missing.values().map(LostChange::of).collect(),
        ..Damage::default()
    };
    Ok((damage, read))
}

/// What a full read keeps of a queue entry.
#[derive(Clone, Copy)]
struct Queued {
    status: QueueStatus,
    priority: i32,
    /// The change is in the entry's value, not under its own key.
    inline_change: bool,
}

impl Queued {
    fn of(entry: &SyncQueueEntry) -> Self {
        Queued {
            status: entry.status,
            priority: entry.priority,
            inline_change: !entry.data.is_empty(),
        }
    }
}

/// Everything a full read of the store found, for `examine` and `repair`.
#[derive(Default)]
struct Scan {
    damaged: Vec<(Vec<u8>, String)>,
    keys: u64,
    documents: u64,
    /// Document keys found per collection (those that fail their checksum too), and the
    /// counts stored (`doc_counts`).
    documents_by: BTreeMap<String, u64>,
    counts: BTreeMap<String, u64>,
    /// The queue's counts as stored (`keys::META_QUEUE_COUNTS`), if they are.
    queue_counts: Option<Vec<u8>>,
    /// Entries that read, by id: what a checkup and a repair need of them, so that a full read
    /// keeps a few bytes per entry rather than each entry.
    queue: BTreeMap<u64, Queued>,
    /// Ids whose change is kept under its own key.
    changes: BTreeSet<u64>,
    /// Pending-index keys found.
    pending: Vec<Vec<u8>>,
    /// The view keys of the documents found: any other view is one with no document.
    views: HashSet<Vec<u8>>,
    /// Index entries found, with a digest of the view each holds a copy of.
    index_entries: BTreeMap<Vec<u8>, u64>,
    /// The index entries the views found give, with the view's key and digest.
    index_expected: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
}

/// What tells two copies of a view apart in a scan, without keeping them.
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

impl Scan {
    fn count_document(&mut self, key: &[u8]) {
        if let Ok(collection) = keys::doc_collection(key) {
            *self.documents_by.entry(collection.to_owned()).or_insert(0) += 1;
        }
    }

    /// Document counts that disagree with the documents found.
    fn wrong_counts(&self) -> Vec<(Vec<u8>, String)> {
        let collections: BTreeSet<&String> =
            self.documents_by.keys().chain(self.counts.keys()).collect();
        let mut wrong = Vec::new();
        for collection in collections {
            let held = self.documents_by.get(collection).copied().unwrap_or(0);
            match self.counts.get(collection) {
                Some(&count) if count == held => {}
                Some(count) => wrong.push((
                    keys::doc_count(collection),
                    format!("says {count} documents; the collection holds {held}"),
                )),
                None => wrong.push((
                    keys::doc_count(collection),
                    format!("missing; the collection holds {held} documents"),
                )),
            }
        }
        wrong
    }

    /// The queue's stored counts, when they disagree with the entries found. Not when queue
    /// entries are damaged: the counts are then wrong because of them, and a repair counts again.
    fn wrong_queue_counts(&self) -> Option<(Vec<u8>, String)> {
        let stored = self.queue_counts.as_ref()?;
        if self
            .damaged
            .iter()
            .any(|(key, _)| matches!(key.first(), Some(b'q' | b'y')))
        {
            return None;
        }
        let mut held = QueueCounts::default();
        for entry in self.queue.values() {
            held.count(entry.status);
        }
        let show = |c: &QueueCounts| {
            format!(
                "{} pending, {} processing, {} completed, {} failed",
                c.pending, c.processing, c.completed, c.failed
            )
        };
        let problem = match QueueCounts::from_stored(stored) {
            Some(counts) if counts == held => return None,
            Some(counts) => format!("say {}; the queue holds {}", show(&counts), show(&held)),
            None => format!("cannot be read; the queue holds {}", show(&held)),
        };
        Some((keys::META_QUEUE_COUNTS.to_vec(), problem))
    }

    /// The entries a view gives that are missing or hold another copy of it, with the key of
    /// the view they should hold.
    fn index_entries_to_write(&self) -> impl Iterator<Item = (&Vec<u8>, &Vec<u8>)> {
        self.index_expected
            .iter()
            .filter(|(key, (_, digest))| self.index_entries.get(*key) != Some(digest))
            .map(|(key, (view, _))| (key, view))
    }

    /// Queue entries with a problem beyond their own value (their change missing), and
    /// pending-index keys the queue disagrees with (pointing at no pending entry, or missing).
    fn inconsistencies(&self) -> Vec<(Vec<u8>, String)> {
        let mut found = self.wrong_counts();
        found.extend(self.wrong_queue_counts());
        for (id, entry) in &self.queue {
            if !entry.inline_change && !self.changes.contains(id) {
                found.push((keys::queue(*id), "its change is missing".into()));
            }
        }
        for key in self.index_entries.keys() {
            if !self.index_expected.contains_key(key) {
                found.push((key.clone(), "an index entry no record's view gives".into()));
            }
        }
        for (key, _) in self.index_entries_to_write() {
            let problem = if self.index_entries.contains_key(key) {
                "an index entry holds another copy of its record's view"
            } else {
                "an index entry its record's view gives is missing"
            };
            found.push((key.clone(), problem.into()));
        }
        let indexed: BTreeSet<&Vec<u8>> = self.pending.iter().collect();
        for key in &self.pending {
            let points_at_pending = keys::pending_id(key)
                .ok()
                .and_then(|id| Some((id, self.queue.get(&id)?)))
                .is_some_and(|(id, e)| {
                    e.status == QueueStatus::Pending && keys::pending(e.priority, id) == *key
                });
            if !points_at_pending {
                found.push((key.clone(), "points at no pending queue entry".into()));
            }
        }
        for (&id, entry) in &self.queue {
            let key = keys::pending(entry.priority, id);
            if entry.status == QueueStatus::Pending && !indexed.contains(&key) {
                found.push((
                    key,
                    "a pending queue entry is missing from the index".into(),
                ));
            }
        }
        found
    }
}

impl Store {
    pub(super) fn lock_damage(&self) -> MutexGuard<'_, Option<Damage>> {
        lock(&self.damage)
    }

    /// Records what the open found, durably, beside what an earlier open found.
    pub(super) fn note_damage(&self, found: Damage) -> Result<(), StoreError> {
        let mut damage = self.lock_damage();
        let stored = match self.kv.get(keys::META_DAMAGE) {
            Ok(stored) => stored,
            Err(KvError::Damaged(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mut known = match stored {
            Some(bytes) => serde_json::from_slice::<Damage>(&bytes).unwrap_or_default(),
            None => Damage::default(),
        };
        if found.is_empty() {
            // Nothing new: what is on record stays as it is, with no write at every open.
            if !known.is_empty() {
                tracing::error!(damage = %known.summary(), "the store is damaged: see `ferry doctor`");
            }
            *damage = (!known.is_empty()).then_some(known);
            return Ok(());
        }
        if known.is_empty() {
            known.since_ms = found.since_ms;
        }
        known.merge(found);
        let bytes = serde_json::to_vec(&known).map_err(|e| StoreError::Encode {
            what: "damage report",
            detail: e.to_string(),
        })?;
        let mut batch = Batch::default();
        batch.put(keys::META_DAMAGE.to_vec(), bytes);
        self.kv.apply(batch)?;
        self.kv.flush()?;
        tracing::error!(damage = %known.summary(), "the store is damaged: see `ferry doctor`");
        *damage = Some(known);
        Ok(())
    }

    /// What is known to be wrong with the store: what opens found, and values met damaged
    /// since. `None` when nothing is known to be (`examine` reads everything).
    pub fn damage(&self) -> Option<Damage> {
        let mut damage = self.lock_damage().clone();
        let seen = lock(&self.seen_damaged).clone();
        if !seen.is_empty() {
            let now = self.clock.now_ms();
            let met = damage.get_or_insert_with(|| Damage {
                since_ms: now,
                ..Damage::default()
            });
            met.merge(Damage {
                damaged: seen
                    .iter()
                    .map(|key| damaged_value(key, "checksum mismatch, met at read"))
                    .collect(),
                ..Damage::default()
            });
        }
        damage
    }

    /// Reads every key of the store, noting the values that fail their checksum and moving on.
    fn scan(&self) -> Result<Scan, StoreError> {
        const PAGE: usize = 256;
        let mut scan = Scan::default();
        let mut start = Vec::new();
        let end = vec![u8::MAX];
        // Past a damaged key, the pairs before it are read up to it, then reading goes on after.
        let mut stop = end.clone();
        loop {
            match self.kv.range(&start, &stop, PAGE) {
                Ok(page) => {
                    let Some((last, _)) = page.last() else {
                        if stop == end {
                            break;
                        }
                        if stop.first() == Some(&b'd') {
                            scan.views.extend(keys::view_of_doc(&stop));
                            scan.count_document(&stop);
                        }
                        scan.damaged
                            .push((stop.clone(), "checksum mismatch".into()));
                        start = keys::after(&stop);
                        stop = end.clone();
                        continue;
                    };
                    start = keys::after(last);
                    for (key, value) in page {
                        self.look_at(&mut scan, key, value);
                    }
                }
                Err(KvError::Damaged(key)) if key >= start => stop = key,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(scan)
    }

    fn look_at(&self, scan: &mut Scan, key: Vec<u8>, value: Vec<u8>) {
        scan.keys += 1;
        match key.first() {
            Some(b'd') => {
                scan.documents += 1;
                scan.count_document(&key);
                let Some(view) = keys::view_of_doc(&key) else {
                    return;
                };
                scan.views.insert(view.clone());
                let loaded = keys::doc_collection(&key)
                    .and_then(|collection| self.parse(collection, &value));
                let mut record = match loaded {
                    Ok(record) => record,
                    Err(e) => return scan.damaged.push((key, e.to_string())),
                };
                match self.check_view(&key, &mut record) {
                    Ok(None) => {}
                    Ok(Some(wrong)) => scan.damaged.push((view, wrong)),
                    // Reading on meets the view at its key and notes it there.
                    Err(StoreError::Storage(KvError::Damaged(_))) => {}
                    Err(e) => scan.damaged.push((view, e.to_string())),
                }
            }
            Some(b'v') if !scan.views.contains(&key) => {
                scan.damaged
                    .push((key, "a record view with no document".into()));
            }
            Some(b'v') => {
                let view = digest(&value);
                for entry in self.index_entries(&key, &value) {
                    scan.index_expected.insert(entry, (key.clone(), view));
                }
            }
            Some(b'i') => {
                scan.index_entries.insert(key, digest(&value));
            }
            Some(b'q') => match decode::<SyncQueueEntry>(&value, "queue entry") {
                Ok(entry) if keys::queue(entry.id) == key => {
                    scan.queue.insert(entry.id, Queued::of(&entry));
                }
                Ok(_) => scan.damaged.push((key, "holds another queue entry".into())),
                Err(e) => scan.damaged.push((key, e.to_string())),
            },
            Some(b'y') => match super::history::read(&key, &value) {
                Ok(entries) => {
                    for entry in &entries {
                        scan.queue.insert(entry.id, Queued::of(entry));
                    }
                }
                Err(e) => scan.damaged.push((key, e.to_string())),
            },
            Some(b'b') => {
                if let Ok(id) = keys::seq_of(&key, keys::QUEUE_CHANGE.len()) {
                    scan.changes.insert(id);
                }
            }
            Some(b'p') => scan.pending.push(key),
            Some(b'm') if key == keys::META_QUEUE_COUNTS => scan.queue_counts = Some(value),
            Some(b'n') => match super::doc_counts::parse(&key, &value) {
                Ok((collection, count)) => {
                    scan.counts.insert(collection, count);
                }
                Err(e) => scan.damaged.push((key, e.to_string())),
            },
            _ => {}
        }
    }

    /// Reads the whole store and the journal, and says what is wrong (what an open found and
    /// no repair has mended yet included).
    pub fn examine(&self) -> Result<Checkup, StoreError> {
        let scan = self.scan()?;
        let (journal, read) = self.journal_beside(&scan)?;
        Ok(self.checkup(&scan, &journal, &read))
    }

    /// The journaled changes the queue `scan` read does not hold whole (the only ones a
    /// checkup or a repair needs), read a page at a time.
    fn journal_beside(
        &self,
        scan: &Scan,
    ) -> Result<(BTreeMap<u64, SyncQueueEntry>, JournalRead), StoreError> {
        // Entries whose change is missing go too, and come back from the journal.
        let damaged: BTreeSet<Vec<u8>> = scan
            .damaged
            .iter()
            .chain(&scan.inconsistencies())
            .map(|(key, _)| key.clone())
            .collect();
        journaled(self.kv.as_ref(), |id| {
            !scan.queue.contains_key(&id) || damaged.contains(&keys::queue(id))
        })
    }

    fn checkup(
        &self,
        scan: &Scan,
        journal: &BTreeMap<u64, SyncQueueEntry>,
        read: &JournalRead,
    ) -> Checkup {
        Checkup {
            damage: self.judge(scan, journal, read.damaged),
            keys: scan.keys,
            documents: scan.documents,
            queue_entries: scan.queue.len() as u64,
            journaled_changes: read.records,
        }
    }

    fn judge(
        &self,
        scan: &Scan,
        journal: &BTreeMap<u64, SyncQueueEntry>,
        journal_damaged: bool,
    ) -> Option<Damage> {
        let mut seen = BTreeSet::new();
        let damaged: Vec<DamagedValue> = scan
            .damaged
            .iter()
            .chain(&scan.inconsistencies())
            .filter(|(key, _)| seen.insert(key.clone()))
            .map(|(key, detail)| damaged_value(key, detail.clone()))
            .collect();
        let recoverable = journal
            .values()
            .filter(|e| !scan.queue.contains_key(&e.id))
            .map(LostChange::of)
            .collect();
        let unrecoverable = scan
            .damaged
            .iter()
            .filter_map(|(key, _)| {
                (key.first() == Some(&b'q'))
                    .then(|| keys::seq_of(key, keys::QUEUE.len()).ok())
                    .flatten()
            })
            .filter(|id| !journal.contains_key(id))
            .collect();
        let mut found = Damage {
            since_ms: self.clock.now_ms(),
            damaged,
            recoverable,
            unrecoverable,
            journal_damaged,
            ..Damage::default()
        };
        if let Some(known) = self.lock_damage().clone() {
            // What an open found stays until a repair: lost batches cannot be seen again.
            found.lost_batches = known.lost_batches;
            found.since_ms = known.since_ms;
        }
        (!found.is_empty()).then_some(found)
    }

    /// Repairs the store (see the module doc) and returns what it found, as `examine` says it,
    /// and what it did, from one read of the store and the journal. Everything lands in one
    /// atomic batch, made durable before this returns; the journal is then rewritten.
    pub fn repair(&self) -> Result<(Checkup, Repaired), StoreError> {
        let mut cache = self.lock_cache();
        let mut queue = self.lock_queue();
        let scan = self.scan()?;
        let (journal, read) = self.journal_beside(&scan)?;
        let checkup = self.checkup(&scan, &journal, &read);
        let Some(damage) = checkup.damage.clone() else {
            drop(queue);
            drop(cache);
            self.clear_damage()?;
            return Ok((checkup, Repaired::default()));
        };
        let mut bad: Vec<(Vec<u8>, String)> = scan.damaged.clone();
        bad.extend(scan.inconsistencies());
        let mut batch = Batch::default();
        let mut removed = Vec::new();
        for (key, detail) in &bad {
            batch.remove(key.clone());
            if key.first() == Some(&b'q')
                && let Ok(id) = keys::seq_of(key, keys::QUEUE.len())
            {
                batch.remove(keys::queue_change(id));
            }
            removed.push(damaged_value(key, detail.clone()));
        }
        let reads_relay_again =
            damage.lost_batches.is_some() || bad.iter().any(|(key, _)| !queue_only(key));
        if reads_relay_again {
            for prefix in READ_FROM_RELAY {
                self.remove_all(&mut batch, prefix)?;
            }
        }
        // The queue as it stays, then the journaled changes it lost, pending again.
        let damaged_keys: BTreeSet<&Vec<u8>> = bad.iter().map(|(key, _)| key).collect();
        for (key, _) in &bad {
            if let Some(doc) = keys::doc_of_view(key)
                && !damaged_keys.contains(&doc)
            {
                self.stage_view_again(&mut batch, &doc)?;
            }
        }
        let mut entries: BTreeMap<u64, Queued> = scan
            .queue
            .iter()
            .filter(|(id, _)| !damaged_keys.contains(&keys::queue(**id)))
            .map(|(id, e)| (*id, *e))
            .collect();
        let mut restored = Vec::new();
        for (id, journaled) in &journal {
            if entries.contains_key(id) {
                continue;
            }
            let mut entry = journaled.clone();
            entry.status = QueueStatus::Pending;
            entry.retry_count = 0;
            entry.last_error = None;
            let doc = keys::doc(&entry.model_name, &entry.object_id);
            if !damaged_keys.contains(&doc) {
                self.apply_restored(&mut batch, &entry)?;
            }
            let mut delta = super::CountDelta::default();
            stage_entry(&mut batch, &mut delta, None, &entry)?;
            restored.push(LostChange::of(&entry));
            entries.insert(*id, Queued::of(&entry));
        }
        // The pending index, rebuilt from the queue.
        for key in &scan.pending {
            batch.remove(key.clone());
        }
        for (&id, entry) in &entries {
            if entry.status == QueueStatus::Pending {
                batch.put(keys::pending(entry.priority, id), Vec::new());
            }
        }
        for (key, view) in scan.index_entries_to_write() {
            if let Some(copy) = self.kv.get(view)? {
                batch.put(key.clone(), copy);
            }
        }
        batch.remove(keys::META_DAMAGE.to_vec());
        // Counted again when next asked, from the queue the repair left.
        batch.remove(keys::META_QUEUE_COUNTS.to_vec());
        self.settle_views(&mut batch)?;
        self.kv.apply(batch)?;
        if bad.iter().any(|(key, _)| key.first() == Some(&b'n')) {
            // Counted again from the documents the repair left.
            self.kv
                .apply(super::doc_counts::recount(self.kv.as_ref())?)?;
        }
        // The journal, from the queue as it now stands (the queue lock is held).
        self.rewrite_journal_locked()?;
        // What memory holds came from the damaged store.
        cache.clear();
        *queue = None;
        let kv = self.kv.as_ref();
        let next = super::next_queue_id(kv)?.max(
            entries
                .keys()
                .next_back()
                .map_or(0, |id| id.saturating_add(1)),
        );
        self.next_queue_id.fetch_max(next, Ordering::SeqCst);
        let open = kv.count(keys::CONFLICT_OPEN, &keys::prefix_end(keys::CONFLICT_OPEN))?;
        self.open_conflicts.store(open, Ordering::SeqCst);
        *self.lock_damage() = None;
        lock(&self.seen_damaged).clear();
        let repaired = Repaired {
            removed,
            restored,
            unrecoverable: damage.unrecoverable,
            reads_relay_again,
        };
        tracing::info!(
            removed = repaired.removed.len(),
            restored = repaired.restored.len(),
            unrecoverable = repaired.unrecoverable.len(),
            reads_relay_again,
            "the store is repaired"
        );
        Ok((checkup, repaired))
    }

    fn clear_damage(&self) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.remove(keys::META_DAMAGE.to_vec());
        self.kv.apply(batch)?;
        self.kv.flush()?;
        *self.lock_damage() = None;
        lock(&self.seen_damaged).clear();
        Ok(())
    }

    /// Stages removing every key under `prefix` (keys only: a damaged value goes like the rest).
    fn remove_all(&self, batch: &mut Batch, prefix: &[u8]) -> Result<(), StoreError> {
        let mut below = keys::prefix_end(prefix);
        while let Some(key) = self.kv.last_key(prefix, &below)? {
            batch.remove(key.clone());
            below = key;
        }
        Ok(())
    }

    /// Applies a journaled change to its document, when the document holds what it builds on.
    /// One that does not is left to the relay's log: it comes back there once uploaded, after
    /// the changes it builds on.
    fn apply_restored(&self, batch: &mut Batch, entry: &SyncQueueEntry) -> Result<(), StoreError> {
        let key = keys::doc(&entry.model_name, &entry.object_id);
        let mut record = match batch.get(&key) {
            Some(bytes) => self.parse(&entry.model_name, bytes)?,
            None => match self.load(&entry.model_name, &entry.object_id) {
                Ok(Some(record)) => record,
                Ok(None) => self.new_record(&entry.model_name),
                Err(e) => {
                    tracing::warn!(error = %e, queue_id = entry.id, "a restored change's document cannot be read: the relay's log brings it");
                    return Ok(());
                }
            },
        };
        match record.apply_changes(std::slice::from_ref(&entry.data)) {
            Ok(true) => batch.put(key, record.save()),
            Ok(false) => {}
            Err(e) => tracing::info!(error = %e, queue_id = entry.id,
                "a restored change waits for the relay's log to bring what it builds on"),
        }
        Ok(())
    }

    /// Keeps the journal from growing for ever: once past its limit, rewrites it with the queue
    /// entries not yet completed when more than half its records are of changes uploaded (the
    /// queue's counts and `journal_records` tell), else doubles the limit. A full read of the
    /// queue when it rewrites, so the daemon calls it beside its writes, not in their way.
    /// Under its limit, a journal past `JOURNAL_MIN_LIMIT` is emptied as soon as the queue holds
    /// no change left to upload: without that, a device back from working offline (its limit
    /// twice what it journaled then) kept a second copy of every change it had uploaded until
    /// it wrote as much again.
    pub fn bound_journal(&self) -> Result<(), StoreError> {
        let limit = self.journal_limit.load(Ordering::SeqCst);
        let bytes = self.kv.journal_bytes();
        if bytes > limit {
            let queue = self.lock_queue();
            let to_upload = queue.as_ref().map(|t| t.shown.not_completed());
            let records = self.journal_records.load(Ordering::SeqCst);
            // A rewrite keeps every change still to upload: while they are half the journal or
            // more (an import, work offline), it would copy them all to leave little out. The
            // limit doubles as if it had: a sync that uploads them empties the journal at its
            // end, with no rewrite in its way.
            if to_upload.is_some_and(|n| records <= n.saturating_mul(2)) {
                self.journal_limit
                    .store(bytes.saturating_mul(2), Ordering::SeqCst);
                return Ok(());
            }
            return self.rewrite_journal_locked();
        }
        if bytes <= JOURNAL_MIN_LIMIT {
            return Ok(());
        }
        // The counts kept with the queue say so without reading it (none yet: wait for them),
        // and nothing is journaled or leaves the queue while its lock is held.
        let queue = self.lock_queue();
        let all_uploaded = queue.is_some_and(|t| t.shown.not_completed() == 0);
        if !all_uploaded {
            return Ok(());
        }
        self.kv.rewrite_journal(&mut |_keep| Ok(()))?;
        self.journal_records.store(0, Ordering::SeqCst);
        self.journal_limit
            .store(JOURNAL_MIN_LIMIT, Ordering::SeqCst);
        drop(queue);
        Ok(())
    }

    /// Rewrites the journal with the queue entries not completed; the caller holds the queue
    /// lock, so no entry is journaled or moves meanwhile.
    pub(super) fn rewrite_journal_locked(&self) -> Result<(), StoreError> {
        let mut kept_bytes = 0u64;
        let mut kept_records = 0u64;
        let mut failed = None;
        // Each entry is written to the new journal as the queue is read, a page at a time.
        let rewritten = self.kv.rewrite_journal(&mut |keep| {
            let scanned = self.scan_live_queue(None, |entry| {
                if entry.status == QueueStatus::Completed {
                    return true;
                }
                match self
                    .with_change(entry)
                    .and_then(|e| encode(&e, "journaled change"))
                {
                    Ok(record) => {
                        kept_bytes += record.len() as u64;
                        kept_records += 1;
                        keep(&record);
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            });
            if let Err(e) = scanned {
                failed = Some(e);
            }
            match &failed {
                Some(e) => Err(KvError::Io(format!("the queue could not be read: {e}"))),
                None => Ok(()),
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        rewritten?;
        self.journal_records.store(kept_records, Ordering::SeqCst);
        self.journal_limit.store(
            JOURNAL_MIN_LIMIT.max(kept_bytes.saturating_mul(2)),
            Ordering::SeqCst,
        );
        Ok(())
    }
}

/// The limit `bound_journal` starts with, for a journal of `bytes` at open: twice that, as
/// after a rewrite. A device that starts with a long queue (back from working offline) would
/// otherwise rewrite every unsynced change at once, under the queue lock its first upload needs,
/// only to keep them all.
pub(super) fn journal_start_limit(bytes: u64) -> u64 {
    JOURNAL_MIN_LIMIT.max(bytes.saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kv::MemoryKv;
    use crate::store::tests::open;
    use crate::store::{QueueAction, Write};

    fn put(store: &Store, id: &str, n: u64) -> u64 {
        let mut fields = crate::record::Fields::new();
        fields.insert("n".into(), serde_json::json!(n));
        store
            .write(Write::Put {
                collection: "Note".into(),
                id: Some(id.into()),
                fields,
            })
            .unwrap()
            .queue_id
            .unwrap()
    }

    /// The ids the journal holds, in its order; it must not be damaged.
    fn journal_ids(kv: &dyn Kv) -> Vec<u64> {
        let mut ids = Vec::new();
        let read = journal_pages(kv, &mut |entries| {
            ids.extend(entries.iter().map(|e| e.id));
            Ok(())
        })
        .unwrap();
        assert!(!read.damaged);
        ids
    }

    fn kinds(damage: &Damage) -> Vec<String> {
        let mut kinds: Vec<String> = damage.damaged.iter().map(|d| d.kind.clone()).collect();
        kinds.sort();
        kinds
    }

    /// A damaged document, a damaged unsynced queue entry, a lost one, and a damaged index key
    /// are all found; a repair removes the damaged values, puts both unsynced changes back from
    /// the journal, rebuilds the index, and has the device read the relay again (a document
    /// went); nothing else is touched, and the store is then sound.
    #[test]
    fn damaged_and_lost_values_are_found_and_unsynced_changes_come_back_from_the_journal() {
        let kv = MemoryKv::new();
        let store = open(&kv);
        let synced = put(&store, "a", 1);
        let damaged_entry = put(&store, "b", 2);
        let lost_entry = put(&store, "c", 3);
        put(&store, "d", 4);
        store
            .queue_transition(&[synced], &QueueAction::Start)
            .unwrap();
        store
            .queue_transition(&[synced], &QueueAction::Complete)
            .unwrap();
        store.set_cursor("relay", &7u64.to_be_bytes()).unwrap();
        store.flush().unwrap();
        assert_eq!(store.examine().unwrap().damage, None);
        drop(store);

        assert!(kv.damage(&keys::doc("Note", "a")));
        assert!(kv.damage(&keys::queue(damaged_entry)));
        // Gone as if the engine's recovery had dropped it, with its index key (its bit of the
        // bucket of ids 0 to 63, `pending_buckets`).
        let bucket = keys::pending(0, 0);
        let map = kv
            .get(&bucket)
            .unwrap()
            .expect("the bucket of the pending entries");
        let map = u64::from_be_bytes(map.try_into().expect("a bucket")) & !(1 << lost_entry);
        let mut batch = Batch::default();
        batch.remove(keys::queue(lost_entry));
        batch.put(bucket.clone(), map.to_be_bytes().to_vec());
        kv.apply(batch).unwrap();
        assert!(kv.damage(&bucket));
        kv.flush().unwrap();

        let store = open(&kv);
        // The open finds the lost entry and the damaged one it reads for the journal's sake.
        let at_open = store.damage().expect("found at open");
        let mut recoverable: Vec<u64> = at_open.recoverable.iter().map(|c| c.queue_id).collect();
        recoverable.sort();
        assert_eq!(recoverable, [damaged_entry, lost_entry]);
        // A read of the document meets it damaged and says so.
        assert!(matches!(
            store.history("Note", "a"),
            Err(StoreError::Storage(KvError::Damaged(_)))
        ));
        let checkup = store.examine().unwrap();
        let damage = checkup.damage.expect("damage");
        // The view is stored with its document: damaged with it.
        assert_eq!(
            kinds(&damage),
            [
                "document",
                "pending index",
                "pending index",
                "queue entry",
                "record view"
            ],
            "{damage:?}"
        );
        assert_eq!(damage.recoverable.len(), 2);
        assert!(damage.unrecoverable.is_empty());

        let (before, repaired) = store.repair().unwrap();
        assert_eq!(before.damage, Some(damage));
        assert!(repaired.reads_relay_again);
        let mut restored: Vec<u64> = repaired.restored.iter().map(|c| c.queue_id).collect();
        restored.sort();
        assert_eq!(restored, [damaged_entry, lost_entry]);
        assert_eq!(store.examine().unwrap().damage, None);
        assert_eq!(store.damage(), None);
        assert_eq!(store.sync_cursor().unwrap(), 0, "the relay is read again");
        let pending = store.queue_ids(QueueStatus::Pending).unwrap();
        assert_eq!(pending, [damaged_entry, lost_entry, 4]);
        assert!(matches!(
            store.get("Note", "a"),
            Err(StoreError::NotFound { .. })
        ));
        for id in ["b", "c", "d"] {
            assert!(store.get("Note", id).is_ok(), "{id}");
        }
        // The next upload batch holds every unsynced change, each once.
        let batch = store
            .next_upload_batch(crate::store::BatchLimits::of(10, 1 << 20))
            .unwrap();
        let ids: Vec<u64> = batch.entries.iter().map(|e| e.id).collect();
        assert_eq!(ids, [damaged_entry, lost_entry, 4]);
        // A new write never takes a restored entry's id, and survives a reopen with the rest.
        let next = put(&store, "e", 5);
        assert!(next > 4);
        store.flush().unwrap();
        drop(store);
        let store = open(&kv);
        assert_eq!(store.damage(), None);
        assert_eq!(store.examine().unwrap().damage, None);
    }

    /// A sound store of two notes, `a` (n = 1) and `b` (n = 2), that read the relay up to 7.
    fn two_notes_read_to_7(kv: &MemoryKv) {
        let store = open(kv);
        put(&store, "a", 1);
        put(&store, "b", 2);
        store.set_cursor("relay", &7u64.to_be_bytes()).unwrap();
        store.flush().unwrap();
        assert_eq!(store.examine().unwrap().damage, None);
        assert_eq!(store.collections().unwrap(), [("Note".to_owned(), 2)]);
    }

    /// A view that says something else than its document (another record's) is found; a repair
    /// computes it again, and the device keeps what it read of the relay (documents are sound).
    /// A view written with no document is not kept at all (`paired`).
    #[test]
    fn views_that_differ_from_their_documents_are_found_and_written_again() {
        let kv = MemoryKv::new();
        two_notes_read_to_7(&kv);
        let keyspace = crate::store::paired::over(&kv);
        let a_view = keyspace.get(&keys::view("Note", "a")).unwrap().unwrap();
        let mut batch = Batch::default();
        batch.put(keys::view("Note", "b"), a_view.clone());
        batch.put(keys::view("Note", "ghost"), a_view);
        keyspace.apply(batch).unwrap();
        keyspace.flush().unwrap();
        assert_eq!(keyspace.get(&keys::view("Note", "ghost")).unwrap(), None);

        let store = open(&kv);
        let n = |id: &str| store.get("Note", id).map(|v| v.fields.get("n").unwrap());
        assert_eq!(
            n("b").unwrap(),
            serde_json::json!(1),
            "reads answer from views"
        );
        let damage = store.examine().unwrap().damage.expect("found");
        assert_eq!(kinds(&damage), ["record view"], "{damage:?}");
        let (_, repaired) = store.repair().unwrap();
        assert!(!repaired.reads_relay_again);
        assert_eq!(store.sync_cursor().unwrap(), 7);
        assert_eq!(n("b").unwrap(), serde_json::json!(2));
        assert_eq!(n("a").unwrap(), serde_json::json!(1));
        assert!(matches!(n("ghost"), Err(StoreError::NotFound { .. })));
        assert_eq!(store.examine().unwrap().damage, None);
    }

    /// A collection's document count that disagrees with its documents, or is missing or
    /// unreadable, is found, and a repair counts again without reading the relay again.
    #[test]
    fn wrong_document_counts_are_found_and_counted_again() {
        let kv = MemoryKv::new();
        two_notes_read_to_7(&kv);
        let keyspace = crate::store::paired::over(&kv);
        let mut batch = Batch::default();
        batch.put(keys::doc_count("Note"), 5u64.to_be_bytes().to_vec());
        batch.put(keys::doc_count("Gone"), 1u64.to_be_bytes().to_vec());
        batch.put(keys::doc_count("Odd"), b"bad".to_vec());
        keyspace.apply(batch).unwrap();
        keyspace.flush().unwrap();

        let store = open(&kv);
        let damage = store.examine().unwrap().damage.expect("found");
        let counts: Vec<(&str, &str)> = damage
            .damaged
            .iter()
            .map(|d| (d.key.as_str(), d.detail.as_str()))
            .collect();
        assert_eq!(kinds(&damage), ["document count"; 3], "{damage:?}");
        assert!(
            counts.contains(&("nNote", "says 5 documents; the collection holds 2")),
            "{counts:?}"
        );
        assert!(
            counts.contains(&("nGone", "says 1 documents; the collection holds 0")),
            "{counts:?}"
        );
        let (_, repaired) = store.repair().unwrap();
        assert!(!repaired.reads_relay_again);
        assert_eq!(store.sync_cursor().unwrap(), 7);
        assert_eq!(store.collections().unwrap(), [("Note".to_owned(), 2)]);
        assert_eq!(store.examine().unwrap().damage, None);

        drop(store);
        let mut batch = Batch::default();
        batch.remove(keys::doc_count("Note"));
        keyspace.apply(batch).unwrap();
        let store = open(&kv);
        let damage = store.examine().unwrap().damage.expect("found");
        assert_eq!(
            damage.damaged[0].detail,
            "missing; the collection holds 2 documents"
        );
        store.repair().unwrap();
        assert_eq!(store.collections().unwrap(), [("Note".to_owned(), 2)]);
    }

    /// A record's view is stored with its document (`paired`): when that value fails its
    /// checksum, reads of either are refused, the examination names both, and a repair removes
    /// the record and has the device read the relay again.
    #[test]
    fn a_record_that_fails_its_checksum_is_found_as_document_and_view() {
        let kv = MemoryKv::new();
        let store = open(&kv);
        put(&store, "a", 1);
        put(&store, "b", 2);
        store.flush().unwrap();
        drop(store);
        assert!(kv.damage(&keys::doc("Note", "a")));

        let store = open(&kv);
        assert!(matches!(
            store.get("Note", "a"),
            Err(StoreError::Storage(KvError::Damaged(_)))
        ));
        let damage = store.examine().unwrap().damage.expect("found");
        assert_eq!(kinds(&damage), ["document", "record view"], "{damage:?}");
        let (_, repaired) = store.repair().unwrap();
        assert!(repaired.reads_relay_again);
        assert_eq!(
            store.get("Note", "b").unwrap().fields.get("n").unwrap(),
            serde_json::json!(2)
        );
        assert_eq!(store.examine().unwrap().damage, None);
        assert_eq!(store.damage(), None);
    }

    /// Only queue data damaged: the repair keeps what the device read of the relay.
    #[test]
    fn a_repair_of_the_queue_alone_keeps_the_read_position() {
        let kv = MemoryKv::new();
        let store = open(&kv);
        let entry = put(&store, "a", 1);
        store.set_cursor("relay", &7u64.to_be_bytes()).unwrap();
        store.flush().unwrap();
        drop(store);
        assert!(kv.damage(&keys::queue(entry)));
        let store = open(&kv);
        let (_, repaired) = store.repair().unwrap();
        assert!(!repaired.reads_relay_again);
        assert_eq!(repaired.restored.len(), 1);
        assert_eq!(store.sync_cursor().unwrap(), 7);
        assert_eq!(store.queue_ids(QueueStatus::Pending).unwrap(), [entry]);
    }

    /// A flushed store with two queued changes, the first of them uploaded (completed).
    fn one_uploaded_one_not(kv: &MemoryKv) -> (Store, u64, u64) {
        let store = open(kv);
        let first = put(&store, "a", 1);
        let second = put(&store, "b", 2);
        store
            .queue_transition(&[first], &QueueAction::Start)
            .unwrap();
        store
            .queue_transition(&[first], &QueueAction::Complete)
            .unwrap();
        store.flush().unwrap();
        (store, first, second)
    }

    /// Pruning rewrites the journal without the completed entries before they leave the queue:
    /// stopped at either point (a rewrite that fails, as a crash there; a crash before the
    /// removal is durable), the next open reports nothing, as the queue still holds whatever
    /// the journal does. Removing them first let a later flush make the removal durable while
    /// the journal still held them, which the next open took for lost unsynced changes.
    #[test]
    fn pruning_stopped_at_any_point_reports_no_lost_change() {
        let kv = MemoryKv::new();
        let (store, first, second) = one_uploaded_one_not(&kv);
        kv.refuse_journal_rewrite();
        assert!(store.prune_history(u64::MAX, 0, 100).is_err());
        // The committer's next flush makes durable whatever was applied.
        store.flush().unwrap();
        drop(store);
        kv.crash();
        let store = open(&kv);
        assert_eq!(store.damage(), None);
        assert_eq!(journal_ids(&kv), [first, second]);

        // The journal rewritten, the removal not yet durable.
        assert_eq!(store.prune_history(u64::MAX, 0, 100).unwrap(), (1, 0));
        assert_eq!(journal_ids(&kv), [second]);
        drop(store);
        kv.crash();
        let store = open(&kv);
        assert_eq!(store.damage(), None);
        assert_eq!(store.queue_ids(QueueStatus::Completed).unwrap(), [first]);
    }

    /// A journal under its limit but past the floor is emptied once every change in it is
    /// uploaded, not before (one change left to upload keeps it), and nothing is then lost at
    /// the next open.
    #[test]
    fn a_journal_of_changes_all_uploaded_is_emptied_under_its_limit() {
        let kv = MemoryKv::new();
        let store = open(&kv);
        let text = "x".repeat(200_000);
        let mut ids = Vec::new();
        for n in 0..30 {
            let mut fields = crate::record::Fields::new();
            fields.insert("text".into(), serde_json::json!(format!("{n}{text}")));
            let written = store
                .write(Write::Put {
                    collection: "Note".into(),
                    id: Some(format!("n{n}")),
                    fields,
                })
                .unwrap();
            ids.push(written.queue_id.unwrap());
        }
        store.flush().unwrap();
        let journaled = kv.journal_bytes();
        assert!(journaled > JOURNAL_MIN_LIMIT, "{journaled}");
        // Opened again, its limit is twice that: only its contents can empty it.
        drop(store);
        let store = open(&kv);
        store.queue_counts().unwrap();
        let (last, uploaded) = ids.split_last().unwrap();
        store
            .queue_transition(uploaded, &QueueAction::Start)
            .unwrap();
        store
            .queue_transition(uploaded, &QueueAction::Complete)
            .unwrap();
        store.flush().unwrap();
        store.bound_journal().unwrap();
        assert_eq!(kv.journal_bytes(), journaled, "a change is left to upload");
        store
            .queue_transition(&[*last], &QueueAction::Start)
            .unwrap();
        store.bound_journal().unwrap();
        assert_eq!(kv.journal_bytes(), journaled, "one is in flight");
        store
            .queue_transition(&[*last], &QueueAction::Complete)
            .unwrap();
        store.flush().unwrap();
        store.bound_journal().unwrap();
        assert!(journal_ids(&kv).is_empty());
        assert!(kv.journal_bytes() < 1024, "{}", kv.journal_bytes());
        drop(store);
        kv.crash();
        let store = open(&kv);
        assert_eq!(store.damage(), None);
        assert_eq!(store.queue_counts().unwrap().completed, 30);
    }

    /// A journal past its limit is rewritten only when that leaves out most of it: while its
    /// changes are still to upload (an import, work offline), copying them all would keep them
    /// all, under the queue's lock, once for every doubling of the journal; its limit doubles
    /// instead, so that a sync under way is not stalled by a rewrite its end makes needless.
    #[test]
    fn a_journal_of_changes_still_to_upload_is_not_rewritten_to_keep_them() {
        let text = "x".repeat(200_000);
        let thirty = |kv: &MemoryKv| {
            let store = open(kv);
            let ids: Vec<u64> = (0..30)
                .map(|n| {
                    let mut fields = crate::record::Fields::new();
                    fields.insert("text".into(), serde_json::json!(format!("{n}{text}")));
                    let written = store.write(Write::Put {
                        collection: "Note".into(),
                        id: Some(format!("n{n}")),
                        fields,
                    });
                    written.unwrap().queue_id.unwrap()
                })
                .collect();
            store.flush().unwrap();
            assert!(kv.journal_bytes() > JOURNAL_MIN_LIMIT);
            store.queue_counts().unwrap();
            (store, ids)
        };

        let upload = |store: &Store, ids: &[u64]| {
            store.queue_transition(ids, &QueueAction::Start).unwrap();
            store.queue_transition(ids, &QueueAction::Complete).unwrap();
            store.flush().unwrap();
        };

        let kv = MemoryKv::new();
        let (store, ids) = thirty(&kv);
        let journaled = kv.journal_bytes();
        // A rewrite would fail: none is tried.
        kv.refuse_journal_rewrite();
        store.bound_journal().unwrap();
        assert_eq!(journal_ids(&kv), ids);
        assert_eq!(store.journal_limit.load(Ordering::SeqCst), journaled * 2);
        // Under its new limit, uploads leave it as it is until none is left to upload.
        upload(&store, &ids[..20]);
        store.bound_journal().unwrap();
        assert_eq!(journal_ids(&kv), ids);

        let kv = MemoryKv::new();
        let (store, ids) = thirty(&kv);
        upload(&store, &ids[..20]);
        store.bound_journal().unwrap();
        assert_eq!(
            journal_ids(&kv),
            ids[20..],
            "20 of 30 were uploaded: rewritten"
        );
        drop(store);
        kv.crash();
        let store = open(&kv);
        assert_eq!(store.damage(), None);
        assert_eq!(store.queue_counts().unwrap().pending, 10);
    }

    /// The journal keeps the changes not yet uploaded: completed ones go when it is rewritten,
    /// and pruning them from the queue is not taken for a loss.
    #[test]
    fn the_journal_forgets_uploaded_changes_and_pruning_is_not_a_loss() {
        let kv = MemoryKv::new();
        let (store, first, second) = one_uploaded_one_not(&kv);
        assert_eq!(journal_ids(&kv), [first, second]);
        store.prune_history(u64::MAX, 0, 100).unwrap();
        assert_eq!(journal_ids(&kv), [second]);
        drop(store);
        let store = open(&kv);
        assert_eq!(store.damage(), None);
    }
}
