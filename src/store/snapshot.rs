//! The store's side of a snapshot bootstrap (PROTOCOL.md, section 5.8): a page of the relay's
//! documents merged into the local ones, with the relay's conflict entries for them, and which
//! log entries the pages already hold, so that reading the log after them skips those.
//!
//! Owns: the `snapshot` cursor key (the pages taken so far: each one's last record and head),
//! the rule that a page's documents, conflict entries and that key land in one atomic batch (an
//! interrupted bootstrap resumes after the last page kept, and never keeps half a page), and the
//! download cursor set once the last page is in.
//!
//! Must not touch: the network, sessions, timers. Detection is not run here: a page's entries
//! are what the relay found meeting the same changes in the same order.

use super::sync::{RELAY_CURSOR, RemoteApplied};
use super::{CacheKey, Store, StoreError, keys};
use crate::record::{Record, change_header};
use crate::resolve::ledger::ValueKey;
use crate::resolve::{self, Conflict};
use automerge::{Change, ChangeHash};
use ferry_proto::Operation;
use ferry_proto::session::Bootstrap;
use ferry_proto::wire::{IndexPosition, RecordName, SnapshotPage, SnapshotRecord, UniqueIndexPage};
use ferry_proto::{validate_collection, validate_record_id};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

use super::conflicts::Ledger;
use super::kv::Batch;

/// How many of a page's new records are loaded together, on every core, before they are
/// merged: enough to keep the cores busy, few enough that their documents take little memory.
const FRESH_CHUNK: usize = 512;

/// The cursor name under which a bootstrap's pages are kept.
pub const SNAPSHOT_CURSOR: &str = "snapshot";
/// The cursor name under which the pages of the relay's unique-value index are kept, once a
/// bootstrap's pages are all in, for a space with unique constraints.
pub const UNIQUE_INDEX_CURSOR: &str = "unique_index";

/// The pages of a snapshot taken so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPages {
    /// Each page in order: its last record (`None`: it held none) and the head it was taken at.
    pub pages: Vec<(Option<RecordName>, u64)>,
    /// The last page is in.
    pub complete: bool,
}

impl SnapshotPages {
    /// Where the next page starts: after the last record taken (`None`: from the first).
    pub fn resume_after(&self) -> Option<RecordName> {
        self.pages.iter().rev().find_map(|(last, _)| last.clone())
    }

    /// The head of the page that holds the record's key range: its log entries up to there are
    /// in the document the page brought. The last page covers every key after its own last.
    pub fn covered(&self, collection: &str, record: &str) -> u64 {
        for (last, head) in &self.pages {
            if let Some(last) = last
                && (collection, record) <= (last.collection.as_str(), last.record.as_str())
            {
                return *head;
            }
        }
        self.end()
    }

    /// The head of the page taken so far that holds the record's key range, if one holds it
    /// yet: that page's document held every change of the record logged up to there.
    pub fn taken(&self, collection: &str, record: &str) -> Option<u64> {
        let reached = self.resume_after().is_some_and(|last| {
            (collection, record) <= (last.collection.as_str(), last.record.as_str())
        });
        (self.complete || reached).then(|| self.covered(collection, record))
    }

    /// The cursor the log is read from once every page is in: the first page's head (heads
    /// only grow from page to page).
    pub fn start(&self) -> u64 {
        self.pages.first().map_or(0, |(_, head)| *head)
    }

    /// The last page's head: entries after it are in no page.
    pub fn end(&self) -> u64 {
        self.pages.last().map_or(0, |(_, head)| *head)
    }
}

/// The pages of the relay's unique-value index taken so far (PROTOCOL.md, section 5.8): each
/// holds the holders of a range of values as of its head, so a log entry up to that head has
/// already moved them, and the device moves only its record's own values for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPages {
    /// Each page in order: where it ends and the head it was taken at.
    pub pages: Vec<(Option<IndexPosition>, u64)>,
    /// The last page is in.
    pub complete: bool,
}

impl IndexPages {
    /// Where the next page starts.
    pub fn resume_after(&self) -> Option<IndexPosition> {
        self.pages.last().and_then(|(last, _)| last.clone())
    }

    /// The head as of which the pages hold the value's holders (0: no page holds them yet). A
    /// page ending on a value covers the values up to it; the first page past the values (the
    /// conflict entries' pages) covers every value after the last page of values.
    pub fn covered(&self, value: &ValueKey) -> u64 {
        let value = (
            value.collection.as_str(),
            value.constraint,
            value.value.as_str(),
        );
        for (last, head) in &self.pages {
            match last {
                Some(IndexPosition::Value(last))
                    if value
                        > (
                            last.collection.as_str(),
                            last.constraint as usize,
                            last.value.as_str(),
                        ) => {}
                _ => return *head,
            }
        }
        0
    }

    /// The highest head a page was taken at: no later log entry is covered.
    pub fn end(&self) -> u64 {
        self.pages.iter().map(|(_, head)| *head).max().unwrap_or(0)
    }
}

/// What a snapshot page's records purged: the records (each with the seq up to which its
/// conflict entries went with its history), the restorations queued, and their documents.
/// Per record with queue entries not completed (waiting to be uploaded, or failed): their
/// changes. Every other change this device wrote was acknowledged, its entry completed (and
/// perhaps pruned since), so the relay logged it.
type OwnUploads = std::collections::HashMap<CacheKey, HashSet<ChangeHash>>;

#[derive(Default)]
struct Purge {
    /// This device's uploads not acknowledged, read when a record none of whose changes it met
    /// in the log needs them: the relay logged every other change of it.
    own: Option<OwnUploads>,
    records: std::collections::HashMap<CacheKey, u64>,
    restored: usize,
    restored_docs: Vec<(CacheKey, Record)>,
    documents: std::collections::HashMap<CacheKey, Vec<ChangeHash>>,
    delta: super::CountDelta,
}

/// What one snapshot page did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotOutcome {
    /// Records whose document changed.
    pub applied: Vec<RemoteApplied>,
    /// Conflict entries taken in or changed.
    pub conflicts: Vec<Conflict>,
    /// The last page is in: the log is read from `cursor` on.
    pub complete: bool,
    pub cursor: u64,
    /// Purged records this device had edits to that the relay never logged, written again as
    /// new histories: local changes, waiting to be uploaded.
    pub restored: usize,
}

impl Store {
    /// The bootstrap in progress or in its catch-up (the log not yet read past its last page),
    /// if any.
    pub fn snapshot_pages(&self) -> Result<Option<SnapshotPages>, StoreError> {
        match self.kv.get(&keys::cursor(SNAPSHOT_CURSOR))? {
            None => Ok(None),
            Some(bytes) => Ok(Some(super::decode(&bytes, "snapshot pages")?)),
        }
    }

    /// The unique-value index pages of a bootstrap, while they are read or cover log entries
    /// not yet read, if any.
    pub fn unique_index_pages(&self) -> Result<Option<IndexPages>, StoreError> {
        match self.kv.get(&keys::cursor(UNIQUE_INDEX_CURSOR))? {
            None => Ok(None),
            Some(bytes) => Ok(Some(super::decode(&bytes, "unique index pages")?)),
        }
    }

    /// Whether a collection this device holds has unique constraints: a bootstrap then takes
    /// the relay's unique-value index too.
    pub fn has_unique_constraints(&self) -> bool {
        let policies = &self.options.policies;
        std::iter::once(&policies.default)
            .chain(policies.collections.values())
            .any(|p| !p.unique.is_empty())
    }

    /// How a session to the relay bootstraps: after the last page kept when a bootstrap was
    /// interrupted, or after the last page of its unique-value index while that is read;
    /// otherwise when the store has never read the log.
    pub fn session_bootstrap(&self) -> Result<Bootstrap, StoreError> {
        if let Some(pages) = self.snapshot_pages()?
            && !pages.complete
        {
            return Ok(Bootstrap::Resume(pages.resume_after()));
        }
        if let Some(index) = self.unique_index_pages()?
            && !index.complete
        {
            return Ok(Bootstrap::ResumeIndex(index.resume_after()));
        }
        Ok(Bootstrap::Fresh)
    }

    /// Takes in the next page of the relay's unique-value index (the one after
    /// `IndexPages::resume_after`): the holders of its values in place of this device's (the
    /// first page drops every value held before), its conflict entries of kind `unique` as the
    /// relay holds them, and the page noted, in one atomic batch. Returns the conflict entries
    /// taken in or changed. Durable after `flush`.
    pub fn apply_unique_index_page(
        &self,
        page: &UniqueIndexPage,
    ) -> Result<Vec<Conflict>, StoreError> {
        let _cache = self.lock_cache();
        let mut state = self
            .unique_index_pages()?
            .filter(|i| !i.complete)
            .unwrap_or_default();
        let conflicts: Vec<Conflict> = serde_json::from_slice(&page.conflicts).map_err(|e| {
            StoreError::Snapshot(format!(
                "the unique-value index holds conflict entries that do not decode ({e})"
            ))
        })?;
        let mut batch = Batch::default();
        let mut ledger = Ledger::default();
        self.adopt_unique_index(
            &mut ledger,
            &page.values,
            conflicts,
            state.pages.is_empty(),
            &mut batch,
        )?;
        state.pages.push((page.last.clone(), page.head));
        state.complete = page.complete;
        if state.complete && self.sync_cursor()? >= state.end() {
            batch.remove(keys::cursor(UNIQUE_INDEX_CURSOR));
        } else {
            batch.put(
                keys::cursor(UNIQUE_INDEX_CURSOR),
                super::encode(&state, "unique index pages")?,
            );
        }
        self.finish_ledger(&ledger, &mut batch)?;
        let mut queue = self.lock_queue();
        self.apply_queue_batch(&mut queue, batch, super::CountDelta::default())?;
        drop(queue);
        self.count_open(&ledger);
        Ok(ledger.conflicts.into_changed())
    }

    /// Takes in the next page of a snapshot (the one after `SnapshotPages::resume_after`): each
    /// record's document merged into the local one (a record this device holds keeps every
    /// change it has; those the relay has not logged stay in the queue and upload as usual), its
    /// conflict entries as the relay holds them, and the page noted, all in one atomic batch.
    /// With the last page the download cursor moves to the first page's head (never back). A
    /// page taken after a finished bootstrap starts a new one (a device that fell behind the
    /// relay's horizon again). Durable after `flush`.
    pub fn apply_snapshot_page(&self, page: &SnapshotPage) -> Result<SnapshotOutcome, StoreError> {
        let mut cache = self.lock_cache();
        let mut state = self
            .snapshot_pages()?
            .filter(|b| !b.complete)
            .unwrap_or_default();
        let mut batch = Batch::default();
        let mut ledger = Ledger::default();
        let mut applied = Vec::with_capacity(page.records.len());
        let mut taken: Vec<(CacheKey, Record)> = Vec::with_capacity(page.records.len());
        let mut purge = Purge::default();
        self.purge_unlisted(
            page,
            state.resume_after(),
            &mut cache,
            &mut purge,
            &mut batch,
        )?;
        for (key, record) in purge.restored_docs.drain(..) {
            taken.push((key, record));
        }
        // A page's loaded documents are kept past their record only where something reads them
        // again: `release_covered` (records with quarantined entries) and the cache (the last
        // of those the device held before; a record new to it is read from its view). A page of
        // 10,000 new records held them all: 440 MiB at 100,000 records, 500 at 1,000,000.
        let quarantined = self.quarantined_records(page.head)?;
        let cached_from = page.records.len().saturating_sub(cache.cap().get());
        let mut fresh = HashMap::new();
        for (index, record) in page.records.iter().enumerate() {
            if index % FRESH_CHUNK == 0 {
                let end = page.records.len().min(index + FRESH_CHUNK);
                let chunk = page.records.get(index..end).unwrap_or_default();
                fresh = self.prepare_fresh(chunk, &cache)?;
            }
            let key = (record.collection.clone(), record.record.clone());
            cache.pop(&key);
            let prepared = fresh.remove(&(index % FRESH_CHUNK));
            let (parsed, view) = match prepared {
                Some((parsed, view)) => (Some(parsed), Some(view)),
                None => (None, None),
            };
            let (mut doc, changed, existed) = self.merge_snapshot(
                &key,
                (record, page.head),
                parsed,
                &mut ledger,
                &mut purge,
                &mut batch,
            )?;
            if changed {
                let policy = self.policy(&key.0);
                let deleted = resolve::is_deleted(&mut doc, policy);
                // A record this device did not hold is the page's document, which just loaded:
                // kept as the relay saved it rather than saved again.
                let saved = if existed {
                    doc.save()
                } else {
                    record.document.clone()
                };
                batch.put(keys::doc(&key.0, &key.1), saved);
                match view {
                    Some(view) if !existed => batch.put(keys::view(&key.0, &key.1), view),
                    _ => self.stage_view(&mut batch, &key, &mut doc)?,
                }
                applied.push(RemoteApplied {
                    collection: key.0.clone(),
                    id: key.1.clone(),
                    operation: if deleted {
                        Operation::Delete
                    } else if existed {
                        Operation::Update
                    } else {
                        Operation::Create
                    },
                    deleted,
                    heads: doc.heads().iter().map(|h| h.to_string()).collect(),
                    device: String::new(),
                    seq: 0,
                });
            }
            cache.pop(&key);
            if (existed && index >= cached_from) || quarantined.contains(&key) {
                taken.push((key, doc));
            }
        }
        if page.complete && self.has_unique_constraints() {
            // The unique-value index is read next, from its start.
            batch.put(
                keys::cursor(UNIQUE_INDEX_CURSOR),
                super::encode(&IndexPages::default(), "unique index pages")?,
            );
        } else if state.pages.is_empty() {
            // A new bootstrap: the index pages of an earlier one cover nothing of it.
            batch.remove(keys::cursor(UNIQUE_INDEX_CURSOR));
        }
        state.pages.push((page.last.clone(), page.head));
        state.complete = page.complete;
        let mut cursor = self.sync_cursor()?;
        if page.complete {
            cursor = cursor.max(state.start());
            batch.put(keys::cursor(RELAY_CURSOR), cursor.to_be_bytes().to_vec());
            self.stage_backfill_done(self.backfill()?.as_ref(), cursor, &mut batch);
        }
        if page.complete && cursor >= state.end() {
            // No log entry after the pages can be one they hold: nothing to skip.
            batch.remove(keys::cursor(SNAPSHOT_CURSOR));
        } else {
            batch.put(
                keys::cursor(SNAPSHOT_CURSOR),
                super::encode(&state, "snapshot pages")?,
            );
        }
        for key in purge.records.keys() {
            let listed = page
                .records
                .iter()
                .any(|r| r.collection == key.0 && r.record == key.1);
            if !listed {
                let document = purge.documents.get(key).cloned().unwrap_or_default();
                Store::purge_logged(&mut ledger, key, document);
            }
        }
        let purged_open = if purge.records.is_empty() {
            0
        } else {
            self.purge_conflicts(&purge.records, &mut ledger, &mut batch)?
        };
        self.release_covered(page.head, &purge, &mut taken, &mut batch)?;
        self.finish_ledger(&ledger, &mut batch)?;
        for change in &mut applied {
            change.stage_feed(self, &mut batch)?;
        }
        // Under the queue lock: a restoration queues a change.
        let mut queue = self.lock_queue();
        self.apply_queue_batch(&mut queue, batch, purge.delta)?;
        drop(queue);
        self.feed_landed(applied.iter().map(|a| a.seq));
        self.count_open(&ledger);
        self.count_purged_open(purged_open);
        for (key, doc) in taken {
            cache.put(key, doc);
        }
        Ok(SnapshotOutcome {
            applied,
            conflicts: ledger.conflicts.into_changed(),
            complete: page.complete,
            cursor,
            restored: purge.restored,
        })
    }

    /// The records with quarantined log entries at or below `head`: those whose documents
    /// `release_covered` reads.
    fn quarantined_records(&self, head: u64) -> Result<HashSet<CacheKey>, StoreError> {
        let mut records = HashSet::new();
        self.each_quarantined(|_, entry| {
            if entry.seq <= head {
                records.insert((entry.collection, entry.record));
            }
        })?;
        Ok(records)
    }

    /// Stages the removal of quarantined log entries (at or below the page's head) that the page
    /// settled: those of a purged history, and those whose change a merged document now holds.
    fn release_covered(
        &self,
        head: u64,
        purge: &Purge,
        taken: &mut [(CacheKey, Record)],
        batch: &mut Batch,
    ) -> Result<usize, StoreError> {
        let index: std::collections::HashMap<CacheKey, usize> = taken
            .iter()
            .enumerate()
            .map(|(i, (key, _))| (key.clone(), i))
            .collect();
        self.release_quarantined(batch, |entry| {
            let key = (entry.collection.clone(), entry.record.clone());
            if entry.seq > head {
                return false;
            }
            if purge.records.contains_key(&key) {
                return true;
            }
            let hash = entry
                .hash
                .as_deref()
                .and_then(|h| h.parse::<ChangeHash>().ok());
            match (hash, index.get(&key).and_then(|&i| taken.get_mut(i))) {
                (Some(hash), Some((_, doc))) => doc.has_change(&hash),
                _ => false,
            }
        })
    }

    /// The page's records this device does not hold, each loaded and its view computed, on
    /// every core: what taking in a new device's snapshot costs, done in parallel. By index in
    /// `records`; one that does not load is left to the page's own pass, which reports it.
    fn prepare_fresh(
        &self,
        records: &[SnapshotRecord],
        cache: &lru::LruCache<CacheKey, Record>,
    ) -> Result<HashMap<usize, (Record, Vec<u8>)>, StoreError> {
        const MIN_PARALLEL: usize = 64;
        let mut candidates = Vec::new();
        if records.len() < MIN_PARALLEL {
            return Ok(HashMap::new());
        }
        for (index, r) in records.iter().enumerate() {
            let key = (r.collection.clone(), r.record.clone());
            if validate_collection(&key.0, &self.options.limits).is_ok()
                && validate_record_id(&key.1, &self.options.limits).is_ok()
                && !cache.contains(&key)
                && self.kv.get(&keys::doc(&key.0, &key.1))?.is_none()
            {
                candidates.push((index, r));
            }
        }
        // On the pool's threads; a record whose load panics is left to the page's own pass, as
        // one that does not load.
        let prepared = candidates
            .par_iter()
            .filter_map(|(index, r)| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut doc = self.parse(&r.collection, &r.document).ok()?;
                    let view =
                        super::views::of_record(&mut doc, self.policy(&r.collection)).ok()?;
                    Some((*index, (doc, view)))
                }))
                .ok()
                .flatten()
            })
            .collect();
        Ok(prepared)
    }

    /// Per record, the changes of this device's queue entries that are not completed.
    fn own_uploads(&self) -> Result<OwnUploads, StoreError> {
        let mut own = OwnUploads::new();
        let mut failed = None;
        self.scan_live_queue(None, |entry| {
            if entry.status == ferry_proto::QueueStatus::Completed {
                return true;
            }
            let key = (entry.model_name.clone(), entry.object_id.clone());
            match self
                .with_change(entry)
                .and_then(|e| Ok(change_header(&e.data)?.hash))
            {
                Ok(hash) => {
                    own.entry(key).or_default().insert(hash);
                    true
                }
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(own),
        }
    }

    /// The changes of `key` this device wrote that the relay has not acknowledged yet (their
    /// queue entries not completed), read once per page.
    fn waiting_uploads(
        &self,
        purge: &mut Purge,
        key: &CacheKey,
    ) -> Result<HashSet<ChangeHash>, StoreError> {
        if purge.own.is_none() {
            purge.own = Some(self.own_uploads()?);
        }
        Ok(purge
            .own
            .as_ref()
            .and_then(|own| own.get(key))
            .cloned()
            .unwrap_or_default())
    }

    /// The records this device holds in the page's key range (after `from`, through its last,
    /// or to the end for the last page) that the page does not list although the relay once
    /// logged them: the relay purged them, and compacted its log past the purge entry this
    /// device would otherwise have met (PROTOCOL.md, section 5.8). Each goes as a purge entry
    /// takes it, or comes back as a new history if this device held edits the relay never
    /// logged. A record none of whose changes was ever logged is this device's own, and stays.
    fn purge_unlisted(
        &self,
        page: &SnapshotPage,
        from: Option<RecordName>,
        cache: &mut lru::LruCache<CacheKey, Record>,
        purge: &mut Purge,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        let mut start = match &from {
            Some(name) => keys::after(&keys::doc(&name.collection, &name.record)),
            None => keys::DOC_ALL.to_vec(),
        };
        let end = match (&page.last, page.complete) {
            (Some(last), false) => keys::after(&keys::doc(&last.collection, &last.record)),
            _ => keys::prefix_end(keys::DOC_ALL),
        };
        let listed: std::collections::HashSet<(&str, &str)> = page
            .records
            .iter()
            .map(|r| (r.collection.as_str(), r.record.as_str()))
            .collect();
        let now = self.clock.now_ms();
        loop {
            let rows = self.kv.range(&start, &end, 256)?;
            let Some((last, _)) = rows.last() else {
                return Ok(());
            };
            start = keys::after(last);
            for (k, bytes) in rows {
                let mut parts = k
                    .get(keys::DOC_ALL.len()..)
                    .unwrap_or_default()
                    .split(|&b| b == 0);
                let (Some(collection), Some(id)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let key = (
                    String::from_utf8_lossy(collection).into_owned(),
                    String::from_utf8_lossy(id).into_owned(),
                );
                // A collection this device does not sync is in no page: its records were not
                // purged for being left out.
                if listed.contains(&(key.0.as_str(), key.1.as_str())) || !self.syncs(&key.0) {
                    continue;
                }
                let mut old = self.parse(&key.0, &bytes)?;
                let mut fresh = self.new_record(&key.0);
                let restored = if self.never_logged(&key)? == Some(true) {
                    let waiting = self.waiting_uploads(purge, &key)?;
                    if acknowledged(&mut old, &waiting)?.is_empty() {
                        // The relay never logged any of it: this device's own new record.
                        continue;
                    }
                    !waiting.is_empty()
                        && self.write_restoration(
                            &key,
                            old,
                            &mut fresh,
                            now,
                            batch,
                            &mut purge.delta,
                        )?
                } else {
                    self.restore_purged(
                        &key,
                        old,
                        Vec::new(),
                        &mut fresh,
                        now,
                        batch,
                        &mut purge.delta,
                    )?
                };
                cache.pop(&key);
                if restored {
                    let document = fresh.heads();
                    purge.restored += 1;
                    purge.records.insert(key.clone(), u64::MAX);
                    purge.restored_docs.push((key.clone(), fresh));
                    purge.documents.insert(key, document);
                } else {
                    batch.remove(k);
                    purge.records.insert(key, u64::MAX);
                }
            }
        }
    }

    /// The record with the page's document merged in, whether that changed what this device
    /// held, and whether it held the record; stages its logged heads and conflict entries in
    /// `ledger`.
    fn merge_snapshot(
        &self,
        key: &CacheKey,
        (record, head): (&SnapshotRecord, u64),
        parsed: Option<Record>,
        ledger: &mut Ledger,
        purge: &mut Purge,
        batch: &mut Batch,
    ) -> Result<(Record, bool, bool), StoreError> {
        validate_collection(&key.0, &self.options.limits)?;
        validate_record_id(&key.1, &self.options.limits)?;
        let invalid = |what: String| StoreError::Snapshot(format!("{}/{}: {what}", key.0, key.1));
        let mut snapshot = match parsed {
            Some(parsed) => parsed,
            None => self
                .parse(&key.0, &record.document)
                .map_err(|e| invalid(format!("a document that does not load ({e})")))?,
        };
        let conflicts: Vec<Conflict> = serde_json::from_slice(&record.conflicts)
            .map_err(|e| invalid(format!("conflict entries that do not decode ({e})")))?;
        if let Some(other) = conflicts
            .iter()
            .find(|c| c.collection != key.0 || c.record != key.1)
        {
            return Err(invalid(format!(
                "conflict entry {} of another record",
                other.id
            )));
        }
        let logged: Vec<ChangeHash> = snapshot.heads();
        let mut local = self.load(&key.0, &key.1)?;
        if let Some(held) = local.as_mut() {
            let never_logged = self.never_logged(key)? == Some(true);
            let mut waiting = HashSet::new();
            let seen = if never_logged {
                // None of its changes met in the log yet: those the relay acknowledged are
                // logged all the same.
                waiting = self.waiting_uploads(purge, key)?;
                acknowledged(held, &waiting)?
            } else {
                self.logged_heads_of(key, held)?
            };
            // A page that holds what this device saw logged continues its history: no flatten
            // replaced it, and its changes need not be read to look for one.
            let continues = !seen.is_empty() && seen.iter().all(|h| snapshot.has_change(h));
            if !continues
                && let Some(flatten) = snapshot.flatten_change()
                && !held.has_change(&flatten)
            {
                // The relay started the history this device saw again as one change
                // (PROTOCOL.md, section 5.8): the page's document replaces it and the conflict
                // entries stay; edits the relay may not have logged are set aside until it
                // answers them (`set_aside`), what it refused then written again on it.
                if let Some(mut old) = local.take() {
                    // What the page's document holds of it was logged beside the new history;
                    // of the rest, what waits for the relay's answer may have been logged
                    // before the flatten (its answer lost) or not: set aside until answered.
                    let mut seen = seen;
                    seen.extend(
                        old.changes_after(&[])?
                            .iter()
                            .map(Change::hash)
                            .filter(|h| snapshot.has_change(h)),
                    );
                    seen.retain(|h| old.has_change(h));
                    let uploads = self.waiting_uploads(purge, key)?;
                    let waiting: Vec<ChangeHash> = old
                        .changes_after(&seen)?
                        .iter()
                        .map(Change::hash)
                        .filter(|h| uploads.contains(h))
                        .collect();
                    if !waiting.is_empty() {
                        self.set_aside(batch, key, head, &mut old, &waiting)?;
                    }
                }
                // The history this device held may also have been purged before the one the
                // relay flattened was written: its conflict entries go with it.
                purge
                    .records
                    .insert(key.clone(), before_new_history(&conflicts));
                let document = snapshot.heads();
                self.stage_held(key, &mut snapshot, &logged, batch)?;
                self.adopt_snapshot(ledger, key, logged, document, conflicts)?;
                return Ok((snapshot, true, true));
            }
            if !seen.iter().all(|h| snapshot.has_change(h)) {
                // The relay no longer holds what this device saw logged: it purged the record,
                // which was written again since (PROTOCOL.md, section 5.8).
                purge
                    .records
                    .insert(key.clone(), before_new_history(&conflicts));
                let mut fresh = self.new_record(&key.0);
                let now = self.clock.now_ms();
                let restored = match local.take() {
                    Some(old) if never_logged => {
                        !waiting.is_empty()
                            && self.write_restoration(
                                key,
                                old,
                                &mut fresh,
                                now,
                                batch,
                                &mut purge.delta,
                            )?
                    }
                    Some(mut old) => {
                        // Its changes beyond those it met in the log that the relay answered
                        // were logged too, before the purge: they went with the history.
                        let uploads = self.waiting_uploads(purge, key)?;
                        let met = self.logged_heads_of(key, &mut old)?;
                        let answered: Vec<Change> = old
                            .changes_after(&met)?
                            .into_iter()
                            .filter(|c| !uploads.contains(&c.hash()))
                            .collect();
                        self.restore_purged(
                            key,
                            old,
                            answered,
                            &mut fresh,
                            now,
                            batch,
                            &mut purge.delta,
                        )?
                    }
                    None => false,
                };
                if restored {
                    purge.restored += 1;
                    local = Some(fresh);
                }
            }
        }
        let (mut doc, changed, existed) = match local {
            None => (snapshot, true, false),
            Some(mut local) => {
                let have = local.heads();
                let changes = snapshot.changes_after(&have).map_err(|e| {
                    invalid(format!("a document whose changes cannot be read ({e})"))
                })?;
                let changed = local
                    .apply_decoded(changes)
                    .map_err(|e| invalid(format!("changes that do not apply here ({e})")))?;
                (local, changed, true)
            }
        };
        let document = doc.heads();
        self.stage_held(key, &mut doc, &logged, batch)?;
        self.adopt_snapshot(ledger, key, logged, document, conflicts)?;
        Ok((doc, changed, existed))
    }
}

/// The seq up to which a record's conflict entries on this device went with a history the relay
/// ended: those before the first of the entries the relay holds (`conflicts`, the page's), or
/// all of them when it holds none.
fn before_new_history(conflicts: &[Conflict]) -> u64 {
    let first = conflicts.iter().map(|c| c.seq).min();
    first.map_or(u64::MAX, |seq| seq.saturating_sub(1))
}

/// The changes of `record` that are not `waiting`: those of a record none of whose changes this
/// device met in the log that the relay acknowledged, whose queue entries may be pruned since.
fn acknowledged(
    record: &mut Record,
    waiting: &HashSet<ChangeHash>,
) -> Result<Vec<ChangeHash>, StoreError> {
    Ok(record
        .changes_after(&[])?
        .iter()
        .map(|change| change.hash())
        .filter(|hash| !waiting.contains(hash))
        .collect())
}
