//! The store's side of sync: picking the next upload batch from the SyncQueue, recording what the
//! relay said about it, and applying the relay's change log to the local documents together with
//! the download cursor.
//!
//! Owns: the pending index's upkeep and use, the upload state moves of queue entries, the rule
//! that remote changes and the cursor that covers them land in one atomic batch (with no queue
//! entries: a remote change is not this device's to upload), and the quarantine of log entries
//! that cannot be applied (kept in that same batch, so the cursor passes them).
//!
//! Must not touch: the network, sessions, timers or threads. Every operation here is synchronous
//! and durable only after `Store::flush`; the caller decides when to flush.

use super::completed::{self, Held};
use super::conflicts::Ledger;
use super::feed::{FeedChange, Origin};
use super::kv::{Batch, Kv};
use super::{
    CacheKey, CountDelta, Store, StoreError, WorkingSet, decode, implied, keys, stage_entry,
    stage_landing,
};
use crate::record::first_change::{self, FirstChange};
use crate::record::{ChangeHeader, Record, change_header, decode_change};
use crate::resolve;
use automerge::{Change, ChangeHash};
use ferry_proto::session::OwnEntry;
use ferry_proto::wire::{ChangeOutcome, ChangeResult, ErrorCode, ErrorKind, LogEntry};
use ferry_proto::{
    Operation, QueueStatus, SyncQueueEntry, validate_collection, validate_record_id,
};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};

/// The cursor name under which the relay's log position is kept.
pub const RELAY_CURSOR: &str = "relay";

/// How far the next upload batch may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_changes: usize,
    /// Change bytes in one batch (one entry always goes, if it is under `max_change_bytes`).
    pub max_bytes: usize,
    /// The largest change a frame can carry: larger entries are refused, never sent.
    pub max_change_bytes: usize,
}

impl BatchLimits {
    /// Limits with no bound on one change's size.
    pub fn of(max_changes: usize, max_bytes: usize) -> Self {
        BatchLimits {
            max_changes,
            max_bytes,
            max_change_bytes: usize::MAX,
        }
    }
}

/// The next upload batch, and the entries refused on the way because no frame can carry them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadBatch {
    /// Now `Processing`, in upload order.
    pub entries: Vec<SyncQueueEntry>,
    /// Now `Failed`, with the reason in `last_error`.
    pub refused: Vec<SyncQueueEntry>,
}

/// How often, and how patiently, a queue entry whose upload fails is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Failed attempts before the entry is marked `Failed`.
    pub max_retries: u32,
    /// The wait after the first failure; it doubles (with jitter) up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl RetryPolicy {
    /// `max_retries` attempts, each allowed at once.
    pub fn immediate(max_retries: u32) -> Self {
        RetryPolicy {
            max_retries,
            backoff_initial_ms: 0,
            backoff_max_ms: 0,
        }
    }

    /// The wait before `entry`'s next attempt, after its `retry_count` failures: exponential,
    /// with a jitter taken from the entry and the attempt so that entries failing together spread
    /// out, and the same inputs always wait the same.
    fn wait_ms(&self, entry: &SyncQueueEntry) -> u64 {
        let (id, failures) = (entry.id, entry.retry_count);
        let ceiling = self
            .backoff_initial_ms
            .saturating_mul(1u64 << failures.saturating_sub(1).min(30))
            .min(self.backoff_max_ms);
        let half = ceiling / 2;
        half + splitmix64(id ^ (u64::from(failures) << 40)) % (ceiling - half + 1)
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Queue entries whose uploads went wrong, held apart so that none of them can take another
/// entry down with it: each goes in batches of at most `batch_limit` entries (halved each time a
/// batch holding it gets no answer, down to a batch of its own) and, once it fails alone, waits
/// out an exponential backoff. In memory: a restart gives every entry a fresh start (its retry
/// count, which is durable, still bounds its attempts).
#[derive(Debug, Default)]
pub(super) struct UploadHolds {
    held: HashMap<u64, Hold>,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    batch_limit: usize,
    not_before_ms: u64,
}

impl UploadHolds {
    pub(super) fn release(&mut self, id: u64) {
        self.held.remove(&id);
    }

    /// The earliest time an entry waiting out its backoff may go again, if one waits past `now`.
    fn next_due(&self, now: u64) -> Option<u64> {
        self.held
            .values()
            .map(|h| h.not_before_ms)
            .filter(|&at| at > now)
            .min()
    }
}

/// What the daemon last knew of its sync, kept in the store so that `ferry status` can show it
/// while no daemon runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastKnownSync {
    pub relay_head: u64,
    pub relay_head_at_ms: Option<u64>,
    pub last_sync_ms: Option<u64>,
    /// Kind, message and time of the last failure.
    pub last_error: Option<(String, String, u64)>,
    pub disconnected_since_ms: Option<u64>,
    /// The relay used last (`host:port` as configured), tried first at the next start.
    #[serde(default)]
    pub relay: Option<String>,
}

/// What `finish_upload` or `abandon_upload` did with the entries it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UploadSummary {
    /// Stored by the relay (or already held by it).
    pub completed: u64,
    /// Moved to `Failed`: refused for good, or out of retries.
    pub failed: u64,
    /// Back to `Pending`, to be uploaded again.
    pub retrying: u64,
    /// Ids that were not in `Processing` (unknown, or already settled): left untouched.
    pub ignored: Vec<u64>,
    /// The entries the relay refused, with why.
    pub refused: Vec<RefusedEntry>,
    /// Records whose edits the relay refused as built on a history it flattened, now written
    /// again on the new one (`set_aside`): local changes to upload.
    pub written_again: usize,
}

/// A local change that was refused: by the relay, or before sending, as too large for a frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedEntry {
    pub entry: u64,
    pub collection: String,
    pub record: String,
    /// `"<kind>: <message>"`.
    pub error: String,
    /// True when the entry is now `Failed` (refused for good, or out of retries); false when it
    /// will be tried again.
    pub failed: bool,
}

impl RefusedEntry {
    pub fn of(entry: &SyncQueueEntry) -> Self {
        RefusedEntry {
            entry: entry.id,
            collection: entry.model_name.clone(),
            record: entry.object_id.clone(),
            error: entry.last_error.clone().unwrap_or_default(),
            failed: entry.status == QueueStatus::Failed,
        }
    }

    /// One line for people: which change, what happened to it, and why.
    pub fn describe(&self) -> String {
        format!(
            "{}/{} (queue entry {}) {}: {}",
            self.collection,
            self.record,
            self.entry,
            if self.failed {
                "refused"
            } else {
                "refused, will be retried"
            },
            self.error
        )
    }
}

/// A record that changed because of remote changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemoteApplied {
    pub collection: String,
    pub id: String,
    /// What the change did to the record as this device sees it.
    pub operation: Operation,
    /// True when the record is now a tombstone.
    pub deleted: bool,
    /// The record's heads afterwards, hex.
    pub heads: Vec<String>,
    /// The device (Automerge actor, hex) that wrote the last of the changes applied.
    pub device: String,
    /// Its number in the change feed (given as its batch is staged).
    pub seq: u64,
}

impl RemoteApplied {
    /// Numbers the change in the feed, staging its entry in `batch`.
    pub(crate) fn stage_feed(
        &mut self,
        store: &Store,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        self.seq = store.stage_feed(
            batch,
            FeedChange {
                seq: 0,
                collection: self.collection.clone(),
                id: self.id.clone(),
                operation: self.operation,
                heads: self.heads.clone(),
                device: self.device.clone(),
                origin: Origin::Remote,
            },
        )?;
        Ok(())
    }
}

/// What applying part of the relay's log did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteOutcome {
    /// The records whose documents changed.
    pub applied: Vec<RemoteApplied>,
    /// Conflicts found, or changed (resolved), by these entries, in log order.
    pub conflicts: Vec<crate::resolve::Conflict>,
    /// Entries that could not be applied, kept aside; the cursor moved past them.
    pub quarantined: Vec<Quarantined>,
    /// Purged records this device had edits to that the relay had not logged, written again
    /// as new histories: local changes, waiting to be uploaded.
    pub restored: usize,
}

/// A relay log entry this device could not apply (malformed, its dependencies missing, or
/// refused by Automerge): kept with its position and why, so that it can be looked at, while
/// the rest of the log goes on being applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantined {
    /// Its position in the relay's log.
    pub seq: u64,
    pub collection: String,
    pub record: String,
    /// The change's hash (hex), when its bytes are one change.
    pub hash: Option<String>,
    /// Why it was not applied.
    pub reason: String,
    /// When it was quarantined (unix ms).
    pub at_ms: u64,
    /// The entry's change bytes, as the relay sent them.
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
}

impl Quarantined {
    fn new(entry: &LogEntry, reason: String, at_ms: u64) -> Self {
        Quarantined {
            seq: entry.seq,
            collection: entry.collection.clone(),
            record: entry.record.clone(),
            hash: crate::record::chunk_hash(&entry.change),
            reason,
            at_ms,
            change: entry.change.clone(),
        }
    }
}

/// Builds the pending index for a store made before it existed. Runs once: the marker key is
/// written in the same batch as the index.
pub(super) fn ensure_pending_index(kv: &dyn Kv) -> Result<(), StoreError> {
    if kv.get(keys::META_PENDING_INDEX)?.is_some() {
        return Ok(());
    }
    let mut batch = Batch::default();
    super::queue_pages(kv, |page| {
        for (_, bytes) in page {
            let entry: SyncQueueEntry = decode(&bytes, "queue entry")?;
            if entry.status == QueueStatus::Pending {
                batch.put(keys::pending(entry.priority, entry.id), Vec::new());
            }
        }
        Ok(())
    })?;
    batch.put(keys::META_PENDING_INDEX.to_vec(), Vec::new());
    kv.apply(batch)?;
    Ok(kv.flush()?)
}

impl Store {
    /// Takes the next pending entries to upload, highest priority first and oldest first within
    /// a priority, up to `max_changes` entries and `max_bytes` of change data (but always at least
    /// one entry, however large, so a big change cannot block the queue). They are `Processing`
    /// from here on, in memory only: stored, they stay `Pending` (see `Store::in_flight`).
    ///
    /// Entries held apart after failed uploads (see `UploadHolds`) keep their batch small, and
    /// one waiting out its backoff is passed over with every later entry of its record (which
    /// depends on it). An entry whose change is over `max_change_bytes` can never be sent: it is
    /// failed with the reason in the same batch and returned as refused.
    pub fn next_upload_batch(&self, limits: BatchLimits) -> Result<UploadBatch, StoreError> {
        // The queue lock first, then the holds: the order every path takes them in.
        let mut queue = self.lock_queue();
        let holds = self.lock_holds();
        let now = self.clock.now_ms();
        let mut picked: Vec<SyncQueueEntry> = Vec::new();
        let mut refused = Vec::new();
        let mut waiting_records: HashSet<(String, String)> = HashSet::new();
        let mut cap = limits.max_changes;
        let mut bytes = 0usize;
        let mut start = keys::PENDING.to_vec();
        let end = keys::prefix_end(keys::PENDING);
        'scan: while picked.len() < cap {
            let page = self.kv.range(&start, &end, 256)?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            for (key, _) in page {
                let id = keys::pending_id(&key)?;
                if self.lock_in_flight().contains_key(&id) {
                    continue;
                }
                let stored = self
                    .kv
                    .get(&keys::queue(id))?
                    .ok_or(StoreError::QueueEntryNotFound(id))?;
                let entry: SyncQueueEntry = decode(&stored, "queue entry")?;
                let record = || (entry.model_name.clone(), entry.object_id.clone());
                let hold = holds.held.get(&id).copied();
                // Nothing waits in the usual case: then no key is built.
                let record_waits =
                    !waiting_records.is_empty() && waiting_records.contains(&record());
                if record_waits || hold.is_some_and(|h| h.not_before_ms > now) {
                    waiting_records.insert(record());
                    continue;
                }
                let mut entry = self.with_change(entry)?;
                let size = entry.data.len();
                if size > limits.max_change_bytes {
                    entry.start(now)?;
                    entry.reject(too_large(size, limits.max_change_bytes), now)?;
                    waiting_records.insert((entry.model_name.clone(), entry.object_id.clone()));
                    refused.push(entry);
                    continue;
                }
                let limit = hold.map_or(usize::MAX, |h| h.batch_limit);
                let over_bytes =
                    !picked.is_empty() && bytes.saturating_add(size) > limits.max_bytes;
                if over_bytes || picked.len() >= limit {
                    break 'scan;
                }
                cap = cap.min(limit);
                bytes = bytes.saturating_add(size);
                picked.push(entry);
                if picked.len() >= cap {
                    break 'scan;
                }
            }
        }
        drop(holds);
        let mut batch = Batch::default();
        let mut delta = CountDelta::default();
        for entry in &refused {
            stage_entry(&mut batch, &mut delta, Some(QueueStatus::Pending), entry)?;
        }
        for entry in &mut picked {
            entry.start(now)?;
            delta.take_into_flight();
        }
        self.apply_queue_batch(&mut queue, batch, delta)?;
        let mut in_flight = self.lock_in_flight();
        for entry in &picked {
            in_flight.insert(entry.id, entry.clone());
        }
        drop(in_flight);
        Ok(UploadBatch {
            entries: picked,
            refused,
        })
    }

    /// Whether any entry waits to be uploaded or is on its way (one key read, however long the
    /// queue).
    pub fn has_pending(&self) -> Result<bool, StoreError> {
        let end = keys::prefix_end(keys::PENDING);
        Ok(!self.kv.range(keys::PENDING, &end, 1)?.is_empty())
    }

    /// When the next entry waiting out its backoff may be uploaded, if any waits.
    pub fn next_upload_due(&self) -> Option<u64> {
        self.lock_holds().next_due(self.clock.now_ms())
    }

    /// Records the relay's answer to an upload, in one atomic batch: stored and duplicate changes
    /// are completed; a change refused with a retryable code is failed (back to `Pending` after a
    /// backoff, or `Failed` once `max_retries` is reached); one refused for good goes straight to
    /// `Failed`. The error kept is `"<kind>: <message>"`. Results for entries not in `Processing`
    /// are ignored and listed in the summary. Durable after `flush`.
    pub fn finish_upload(
        &self,
        results: &[ChangeResult],
        policy: &RetryPolicy,
    ) -> Result<UploadSummary, StoreError> {
        let set_aside = self.set_aside_uploads(results)?;
        let superseded = self.superseded(results, &set_aside)?;
        let mut summary = self.settle(
            results.iter().map(|r| (r.entry, &r.outcome)),
            |entry, outcome, now, summary| match outcome {
                ChangeOutcome::Stored { .. } | ChangeOutcome::Duplicate { .. } => {
                    summary.completed += 1;
                    self.lock_holds().release(entry.id);
                    entry.complete(now)
                }
                ChangeOutcome::Rejected { .. } if superseded.contains(&entry.id) => {
                    // Its record's restoration, a change of its own, carries what it wrote.
                    summary.completed += 1;
                    self.lock_holds().release(entry.id);
                    entry.complete(now)
                }
                ChangeOutcome::Rejected { code, message } => {
                    let error = format!("{}: {message}", code.kind().as_str());
                    if code.is_retryable() {
                        entry.fail(error, policy.max_retries, now)?;
                        // Answered on its own, it harmed no other entry: it only waits.
                        let wait = policy.wait_ms(entry);
                        hold_back(&mut self.lock_holds(), entry, usize::MAX, wait, now);
                        count_failure(entry, summary);
                    } else {
                        summary.failed += 1;
                        self.lock_holds().release(entry.id);
                        entry.reject(error, now)?;
                    }
                    summary.refused.push(RefusedEntry::of(entry));
                    Ok(())
                }
            },
        )?;
        self.drop_ended_uploads(results)?;
        if !set_aside.is_empty() {
            self.note_set_aside_answers(results, &set_aside)?;
            summary.written_again = self.settle_set_asides()?;
        }
        Ok(summary)
    }

    /// The refused entries whose record's document no longer holds their change: this device
    /// met the purge entry of the history they were built on, and the record's restoration (or
    /// its purge, when it showed the record deleted) took them over (PROTOCOL.md, section 5.8).
    /// Refused `RecordPurged` themselves, or, built on such a one, `MissingDependencies`. Until
    /// the download meets the purge entry they wait, retryable.
    /// Those of a history set aside (`set_aside`) wait for the rest of its answers instead.
    fn superseded(
        &self,
        results: &[ChangeResult],
        set_aside: &HashMap<u64, (CacheKey, ChangeHash)>,
    ) -> Result<HashSet<u64>, StoreError> {
        let mut superseded = HashSet::new();
        for result in results {
            if set_aside.contains_key(&result.entry) {
                continue;
            }
            let ChangeOutcome::Rejected {
                code: ErrorCode::RecordPurged | ErrorCode::MissingDependencies,
                ..
            } = result.outcome
            else {
                continue;
            };
            let Some(stored) = self.kv.get(&keys::queue(result.entry))? else {
                continue;
            };
            let entry = self.with_change(decode::<SyncQueueEntry>(&stored, "queue entry")?)?;
            let hash = change_header(&entry.data)?.hash;
            // Read from storage, not the cache: the queue lock is not held here, and the
            // cache's is taken before it everywhere else.
            let held = match self
                .kv
                .get(&keys::doc(&entry.model_name, &entry.object_id))?
            {
                Some(bytes) => self.parse(&entry.model_name, &bytes)?.has_change(&hash),
                None => false,
            };
            if !held {
                superseded.insert(result.entry);
            }
        }
        Ok(superseded)
    }

    /// The batch `ids` got no answer (`kind` says why): its entries go back to `Pending` with
    /// `error` recorded. An entry that was not alone in its batch cannot be blamed: it counts no
    /// retry, and its next batches are half as large, until it goes alone. An entry that was
    /// alone counts one more retry (`Failed` once `max_retries` is reached) and waits out a
    /// backoff first, unless the network failed under it. Entries not in `Processing` are
    /// skipped. Durable after `flush`.
    pub fn abandon_upload(
        &self,
        ids: &[u64],
        error: &str,
        kind: ErrorKind,
        policy: &RetryPolicy,
    ) -> Result<UploadSummary, StoreError> {
        let alone = ids.len() == 1;
        self.settle(
            ids.iter().map(|&id| (id, &())),
            |entry, (), now, summary| {
                let mut holds = self.lock_holds();
                if alone && kind != ErrorKind::Network {
                    entry.fail(error, policy.max_retries, now)?;
                    hold_back(&mut holds, entry, 1, policy.wait_ms(entry), now);
                    count_failure(entry, summary);
                } else {
                    entry.requeue(error, now)?;
                    hold_back(&mut holds, entry, (ids.len() / 2).max(1), 0, now);
                    summary.retrying += 1;
                }
                Ok(())
            },
        )
    }

    /// Applies `settle` to each named entry that is in `Processing` (each id once), all in one
    /// atomic batch.
    fn settle<'a, T: 'a>(
        &self,
        items: impl Iterator<Item = (u64, &'a T)>,
        mut settle: impl FnMut(
            &mut SyncQueueEntry,
            &T,
            u64,
            &mut UploadSummary,
        ) -> Result<(), ferry_proto::TransitionError>,
    ) -> Result<UploadSummary, StoreError> {
        let mut queue = self.lock_queue();
        let now = self.clock.now_ms();
        let mut summary = UploadSummary::default();
        let mut batch = Batch::default();
        let mut delta = CountDelta::default();
        let mut seen = BTreeSet::new();
        let mut landed = Vec::new();
        for (id, item) in items {
            if !seen.insert(id) {
                continue;
            }
            let flying = self.lock_in_flight().get(&id).cloned();
            if let Some(mut entry) = flying {
                settle(&mut entry, item, now, &mut summary)?;
                stage_landing(&mut batch, &mut delta, &entry)?;
                landed.push(id);
                continue;
            }
            // Moved to `Processing` in storage (`queue_transition`) rather than taken into
            // an upload.
            let entry = match self.kv.get(&keys::queue(id))? {
                Some(bytes) => Some(decode::<SyncQueueEntry>(&bytes, "queue entry")?),
                None => None,
            };
            let Some(mut entry) = entry.filter(|e| e.status == QueueStatus::Processing) else {
                summary.ignored.push(id);
                continue;
            };
            settle(&mut entry, item, now, &mut summary)?;
            stage_entry(
                &mut batch,
                &mut delta,
                Some(QueueStatus::Processing),
                &entry,
            )?;
        }
        self.apply_queue_batch(&mut queue, batch, delta)?;
        self.land(&landed);
        Ok(summary)
    }

    /// Stages the removal of the quarantined entries `released` says are no longer needed: their
    /// record's history was purged, or its document now holds their change (merged from a
    /// snapshot). Returns how many.
    pub(super) fn release_quarantined(
        &self,
        batch: &mut Batch,
        mut released: impl FnMut(&Quarantined) -> bool,
    ) -> Result<usize, StoreError> {
        let mut count = 0;
        self.each_quarantined(|key, entry| {
            if released(&entry) {
                batch.remove(key);
                count += 1;
            }
        })?;
        Ok(count)
    }

    /// Hands `each` every quarantined entry with its key, oldest first, a page at a time.
    pub(super) fn each_quarantined(
        &self,
        mut each: impl FnMut(Vec<u8>, Quarantined),
    ) -> Result<(), StoreError> {
        let mut start = keys::QUARANTINE.to_vec();
        let end = keys::prefix_end(keys::QUARANTINE);
        loop {
            let page = self.kv.range(&start, &end, 256)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            start = keys::after(last);
            for (key, bytes) in page {
                each(key, decode(&bytes, "quarantined entry")?);
            }
        }
    }

    /// How many relay log entries are quarantined, and the first `limit` of them (oldest first).
    pub fn quarantined(&self, limit: usize) -> Result<(u64, Vec<Quarantined>), StoreError> {
        let end = keys::prefix_end(keys::QUARANTINE);
        let count = self.kv.count(keys::QUARANTINE, &end)?;
        let entries = self
            .kv
            .range(keys::QUARANTINE, &end, limit)?
            .iter()
            .map(|(_, bytes)| decode(bytes, "quarantined entry"))
            .collect::<Result<_, _>>()?;
        Ok((count, entries))
    }

    /// How far this device has applied the relay's log (0 before the first download).
    pub fn sync_cursor(&self) -> Result<u64, StoreError> {
        match self.cursor(RELAY_CURSOR)? {
            None => Ok(0),
            Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Decode {
                    what: "sync cursor",
                    detail: format!("{} bytes instead of 8", bytes.len()),
                }),
        }
    }

    /// Keeps what the daemon knows of its sync for `ferry status` while no daemon runs. Durable
    /// with the next flush.
    pub fn save_last_known_sync(&self, known: &LastKnownSync) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let bytes = serde_json::to_vec(known).map_err(|e| StoreError::Encode {
            what: "sync state",
            detail: e.to_string(),
        })?;
        batch.put(keys::META_SYNC_STATE.to_vec(), bytes);
        Ok(self.kv.apply(batch)?)
    }

    /// Keeps sync paused across restarts (`true`), or lets the next start sync again; durable
    /// when it returns.
    pub fn remember_sync_paused(&self, paused: bool) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        if paused {
            batch.put(keys::META_SYNC_PAUSED.to_vec(), vec![1]);
        } else {
            batch.remove(keys::META_SYNC_PAUSED.to_vec());
        }
        self.kv.apply(batch)?;
        self.flush()
    }

    /// Whether sync was paused to stay paused across restarts.
    pub fn sync_paused(&self) -> Result<bool, StoreError> {
        Ok(self.kv.get(keys::META_SYNC_PAUSED)?.is_some())
    }

    /// What the daemon last knew of its sync; `None` before its first connection.
    pub fn last_known_sync(&self) -> Result<Option<LastKnownSync>, StoreError> {
        match self.kv.get(keys::META_SYNC_STATE)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Decode {
                        what: "sync state",
                        detail: e.to_string(),
                    })
            }
        }
    }

    /// The log entries the relay left out of a page because this device uploaded them, rebuilt
    /// from its queue (the relay logs an upload's bytes as they came), and merged into `entries`
    /// in log order.
    pub fn with_own_entries(
        &self,
        mut entries: Vec<LogEntry>,
        own: &[OwnEntry],
    ) -> Result<Vec<LogEntry>, StoreError> {
        if own.is_empty() {
            return Ok(entries);
        }
        entries.reserve(own.len());
        let mut used = Vec::with_capacity(own.len());
        for &OwnEntry { seq, entry } in own {
            let gone = || StoreError::OwnEntryGone { seq, entry };
            let queued = self.queue_entry(entry)?.ok_or_else(gone)?;
            // A completed entry's change is read from its record's document; one the document
            // no longer holds (its history was rewritten since) is downloaded whole.
            let queued = match Held::of(&queued.data) {
                Held::Completed { hash, .. } => SyncQueueEntry {
                    data: self
                        .change_in_document(&queued.model_name, &queued.object_id, &hash)?
                        .ok_or_else(gone)?,
                    ..queued
                },
                Held::Whole(_) | Held::Apart => self.with_change(queued)?,
            };
            used.push(queued.id);
            entries.push(LogEntry {
                seq,
                collection: queued.model_name,
                record: queued.object_id,
                change: queued.data,
            });
        }
        entries.sort_unstable_by_key(|e| e.seq);
        self.forget_completed_changes(&used)?;
        Ok(entries)
    }

    /// Has the completed entries among `ids`, whose changes came back in the log, keep their
    /// changes' hashes and lengths only (`completed`): their records' documents hold them. Only
    /// once back: until then the download may need them whole, and a record's history may be
    /// written again (flattened, purged, set aside) before its change comes back. Nothing moves
    /// them any more, so they go to the queue's history (`history`). Not durable by itself, and
    /// need not be: an entry still whole is only larger.
    fn forget_completed_changes(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut queue = self.lock_queue();
        let mut batch = Batch::default();
        let mut moved = Vec::with_capacity(ids.len());
        for &id in ids {
            let Some(stored) = self.kv.get(&keys::queue(id))? else {
                continue;
            };
            let entry: SyncQueueEntry = decode(&stored, "queue entry")?;
            if entry.status != QueueStatus::Completed {
                continue;
            }
            let change = match Held::of(&entry.data) {
                Held::Whole(change) => change.to_vec(),
                Held::Apart => self.with_change(entry.clone())?.data,
                Held::Completed { .. } => continue,
            };
            let Some(marked) = completed::mark(&change) else {
                continue;
            };
            if change.len() > super::INLINE_CHANGE_BYTES {
                batch.remove(keys::queue_change(id));
            }
            batch.remove(keys::queue(id));
            moved.push(SyncQueueEntry {
                data: marked,
                ..entry
            });
        }
        if moved.is_empty() {
            return Ok(());
        }
        super::history::stage_moves(self.kv.as_ref(), &mut batch, moved)?;
        self.apply_queue_batch(&mut queue, batch, CountDelta::default())
    }

    /// Applies entries of the relay's log to the local documents and moves the download cursor to
    /// `through`, all in one atomic batch: after a crash either both are there or neither, so a
    /// device may read a change twice (harmless: applying is idempotent) but never skips one.
    /// Records that do not exist yet are created; no queue entries are made. Each change then
    /// meets, in log order, the record's changes logged before it, and the conflicts that brings
    /// are recorded in the same batch (see `conflicts`). This device's own changes come back in
    /// the log too: those it holds (same hash) change no document but take their place in that
    /// order. Returns the records that changed, the conflicts found or resolved, and the entries
    /// quarantined. Durable after `flush`.
    ///
    /// An entry that cannot be applied (malformed, its dependencies missing, refused by
    /// Automerge, making it panic, or leaving a document that does not load again once saved:
    /// `Record::apply_reloadable`) is quarantined: kept under its seq with the reason, in the
    /// same batch, and left out, as is any later entry built on it. The relay validates every
    /// change before logging it, so this only happens with a log written by an older relay or a
    /// faulty one; moving past it keeps one bad entry from blocking the rest of the space.
    ///
    /// The cursor never moves backwards: a late answer to an older download cannot rewind it.
    pub fn apply_remote(
        &self,
        entries: &[LogEntry],
        through: u64,
    ) -> Result<RemoteOutcome, StoreError> {
        let now = self.clock.now_ms();
        let mut quarantined = Vec::new();
        let mut order: Vec<CacheKey> = Vec::new();
        // Entries of collections with unique constraints, in log order: they are checked against
        // each other once every record is applied.
        let mut across_records: Vec<(CacheKey, automerge::ChangeHash, u64)> = Vec::new();
        // Each record's entries with their headers; the changes are decoded only where they
        // have to be applied (not this device's own coming back on top of the log).
        let mut groups: HashMap<CacheKey, Vec<(&LogEntry, ChangeHeader)>> = HashMap::new();
        // After a snapshot, an entry its page took the record past is in the document already,
        // and its conflicts in the relay's entries the page brought.
        // Once the log is read past the last page's head no entry can be covered: the pages are
        // not looked through for every entry of every later apply.
        let bootstrap = self
            .snapshot_pages()?
            .filter(|b| b.complete && entries.first().is_some_and(|e| e.seq <= b.end()));
        // Records whose history a purge entry ends, with its seq, and what these entries
        // brought of that history first.
        let mut purges: HashMap<CacheKey, u64> = HashMap::new();
        let mut purged_history: HashMap<CacheKey, Vec<&LogEntry>> = HashMap::new();
        // Records whose history a flatten entry starts again, with its seq, and what these
        // entries brought of the old history first.
        let mut flattens: HashMap<CacheKey, u64> = HashMap::new();
        let mut held_flattened: HashSet<CacheKey> = HashSet::new();
        let mut flattened_history: HashMap<CacheKey, Vec<&LogEntry>> = HashMap::new();
        // Collections were added: the log is read again from its start, and the entries of
        // those held before, up to where they were read, are applied already.
        let backfill = self.backfill()?;
        for entry in entries {
            if let Some(bootstrap) = &bootstrap
                && entry.seq <= bootstrap.covered(&entry.collection, &entry.record)
            {
                continue;
            }
            if backfill
                .as_ref()
                .is_some_and(|b| b.covers(entry.seq, &entry.collection))
            {
                continue;
            }
            if entry.is_purge() {
                // What these entries brought of the record before goes with its history.
                let key = (entry.collection.clone(), entry.record.clone());
                across_records.retain(|(k, _, _)| *k != key);
                let before = groups.entry(key.clone()).or_insert_with(|| {
                    order.push(key.clone());
                    Vec::new()
                });
                purged_history
                    .entry(key.clone())
                    .or_default()
                    .extend(before.drain(..).map(|(e, _)| e));
                purges.insert(key, entry.seq);
                continue;
            }
            let header = validate_collection(&entry.collection, &self.options.limits)
                .and_then(|()| validate_record_id(&entry.record, &self.options.limits))
                .map_err(|e| e.to_string())
                .and_then(|()| change_header(&entry.change).map_err(|e| e.to_string()));
            let header = match header {
                Ok(header) => header,
                Err(reason) => {
                    quarantined.push(Quarantined::new(entry, reason, now));
                    continue;
                }
            };
            let key = (entry.collection.clone(), entry.record.clone());
            if entry.is_flatten() {
                // The new history holds what these entries brought of the old one.
                if let Some(before) = groups.get_mut(&key) {
                    flattened_history
                        .entry(key.clone())
                        .or_default()
                        .extend(before.drain(..).map(|(e, _)| e));
                }
                flattens.insert(key.clone(), entry.seq);
            }
            if !self.policy(&key.0).unique.is_empty() {
                across_records.push((key.clone(), header.hash, entry.seq));
            }
            groups
                .entry(key.clone())
                .or_insert_with(|| {
                    order.push(key);
                    Vec::new()
                })
                .push((entry, header));
        }
        // Read under the cache lock, which every apply holds, so two applies cannot both move
        // the cursor from the same old value.
        let mut cache = self.lock_cache();
        let cursor = self.sync_cursor()?.max(through);
        let mut working = WorkingSet::default();
        for key in &order {
            working.uses.insert(key.clone(), 1);
        }
        for (key, _, _) in &across_records {
            *working.uses.entry(key.clone()).or_insert(1) += 1;
        }
        let mut batch = Batch::default();
        let mut ledger = Ledger::default();
        let mut applied = Vec::new();
        let mut delta = CountDelta::default();
        let mut restored = 0;
        for key in purges.keys() {
            let old = match cache.pop(key) {
                Some(record) => Some(record),
                None => self.load(&key.0, &key.1)?,
            };
            let history: Vec<Change> = purged_history
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|e| decode_change(&e.change).ok())
                .collect();
            let mut fresh = self.new_record(&key.0);
            let mut document = Vec::new();
            if let Some(old) = old
                && self
                    .restore_purged(key, old, history, &mut fresh, now, &mut batch, &mut delta)?
            {
                document = fresh.heads();
                restored += 1;
            }
            let later = groups.get(key).is_some_and(|g| !g.is_empty());
            if document.is_empty() {
                batch.remove(keys::doc(&key.0, &key.1));
            }
            Store::purge_logged(&mut ledger, key, document.clone());
            // The record's entries after the purge entry start from it.
            if later || !document.is_empty() {
                working.records.insert(key.clone(), (fresh, false));
            }
        }
        // Edits of this device's on a flattened history are written again once this apply's
        // entries are in: after them, as a local change is.
        let mut rebases = Vec::new();
        for key in flattens.keys() {
            let old = match cache.pop(key) {
                Some(record) => Some(record),
                None => self.load(&key.0, &key.1)?,
            };
            // A record this device does not hold: the flatten change creates it.
            let Some(old) = old else { continue };
            held_flattened.insert(key.clone());
            let history: Vec<Change> = flattened_history
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|e| decode_change(&e.change).ok())
                .collect();
            rebases.push((key.clone(), self.logged_with(key, old, history)?));
            Store::purge_logged(&mut ledger, key, Vec::new());
            working
                .records
                .insert(key.clone(), (self.new_record(&key.0), false));
            // Kept in the working set past the apply, for the rebase.
            *working.uses.entry(key.clone()).or_insert(1) += 1;
        }
        let purged_open = if purges.is_empty() {
            0
        } else {
            // Entries of a purged history that could not be applied go with it.
            let of_purged = |q: &Quarantined| {
                purges
                    .get(&(q.collection.clone(), q.record.clone()))
                    .is_some_and(|&purge| q.seq < purge)
            };
            quarantined.retain(|q| !of_purged(q));
            self.release_quarantined(&mut batch, of_purged)?;
            self.purge_conflicts(&purges, &mut ledger, &mut batch)?
        };
        if !flattens.is_empty() {
            // Entries of a flattened history that could not be applied: the new one holds
            // what the relay logged of them.
            let of_flattened = |q: &Quarantined| {
                flattens
                    .get(&(q.collection.clone(), q.record.clone()))
                    .is_some_and(|&flatten| q.seq < flatten)
            };
            quarantined.retain(|q| !of_flattened(q));
            self.release_quarantined(&mut batch, of_flattened)?;
        }
        for key in order {
            let headers = groups.remove(&key).unwrap_or_default();
            let policy = self.options.policies.of(&key.0);
            if policy.unique.is_empty() && self.fast_forward_own(&mut ledger, &key, &headers)? {
                continue;
            }
            let only = match headers.as_slice() {
                [(entry, _)] => Some(*entry),
                _ => None,
            };
            // The record is new here and its one change is its document as it is: kept
            // without building, applying and saving an Automerge document for it; read by
            // hand when it is laid out as Ferry writes a new record, else decoded.
            let mut keep_created = |entry: &LogEntry, first: &FirstChange| {
                let Some((created, view)) = self.created_as_is(&key, first, &ledger, &cache)?
                else {
                    return Ok::<_, StoreError>(false);
                };
                let message = first.message.as_deref().unwrap_or_default();
                let fields = &first.plain.fields;
                let short =
                    implied::shorten(&first.actor, first.time_ms, message, fields, &entry.change);
                let (doc_key, view_key) = (keys::doc(&key.0, &key.1), keys::view(&key.0, &key.1));
                batch.put_record(doc_key, entry.change.clone(), view_key, view, short);
                Store::log_created(&mut ledger, &key, first.hash);
                applied.push(created);
                Ok(true)
            };
            let plain_first = policy.unique.is_empty().then_some(only).flatten();
            let by_hand = plain_first.and_then(|e| first_change::decode(&e.change));
            if let (Some(entry), Some(first)) = (plain_first, &by_hand)
                && keep_created(entry, first)?
            {
                continue;
            }
            let mut group: Vec<(u64, Change)> = Vec::with_capacity(headers.len());
            for (entry, _) in headers {
                match decode_change(&entry.change) {
                    Ok(change) => group.push((entry.seq, change)),
                    Err(e) => quarantined.push(Quarantined::new(entry, e.to_string(), now)),
                }
            }
            if group.is_empty() {
                continue;
            }
            if let (Some(entry), [(_, change)], None) = (plain_first, group.as_slice(), &by_hand)
                && let Some(first) = FirstChange::of(change)
                && keep_created(entry, &first)?
            {
                continue;
            }
            let record = working.take(&key, &mut cache, || self.load_or_new(&key))?;
            self.seed_logged(&mut ledger.logged, &key, record)?;
            let existed = record.exists();
            let was_deleted = existed && resolve::is_deleted(record, policy);
            let mut positions: Vec<(automerge::ChangeHash, u64)> =
                group.iter().map(|(seq, c)| (c.hash(), *seq)).collect();
            // The device that wrote the last of the changes, as subscribers are told.
            let last_writer = |group: &[(u64, Change)]| {
                group
                    .last()
                    .map(|(_, c)| c.actor_id().to_hex_string())
                    .unwrap_or_default()
            };
            let mut device = last_writer(&group);
            let changes = group.into_iter().map(|(_, c)| c).collect();
            let changed = match record.apply_reloadable(changes) {
                Ok(changed) => changed,
                Err(_) => {
                    // Decoded again from the entries: only this error path pays for it.
                    let group = entries
                        .iter()
                        .filter(|e| e.collection == key.0 && e.record == key.1)
                        .filter_map(|e| Some((e.seq, decode_change(&e.change).ok()?)))
                        .collect();
                    let mut refused = Vec::new();
                    let (kept, changed) =
                        self.apply_each(&key, group, &mut working, &mut cache, &mut refused)?;
                    for (seq, reason) in refused {
                        if let Some(entry) = entries.iter().find(|e| e.seq == seq) {
                            tracing::warn!(seq, collection = %key.0, record = %key.1, %reason,
                                "a log entry cannot be applied: quarantined");
                            quarantined.push(Quarantined::new(entry, reason, now));
                        }
                    }
                    positions = kept.iter().map(|(seq, c)| (c.hash(), *seq)).collect();
                    device = last_writer(&kept);
                    changed
                }
            };
            let record = working.take(&key, &mut cache, || self.load_or_new(&key))?;
            if changed {
                let deleted = resolve::is_deleted(record, policy);
                let operation = if deleted {
                    Operation::Delete
                } else if (!existed || was_deleted) && !held_flattened.contains(&key) {
                    Operation::Create
                } else {
                    Operation::Update
                };
                batch.put(keys::doc(&key.0, &key.1), record.save());
                self.stage_view(&mut batch, &key, record)?;
                applied.push(RemoteApplied {
                    collection: key.0.clone(),
                    id: key.1.clone(),
                    operation,
                    deleted,
                    heads: record.heads().iter().map(|h| h.to_string()).collect(),
                    device,
                    seq: 0,
                });
            }
            ledger.logged.documents.insert(key.clone(), record.heads());
            if policy.unique.is_empty() {
                // Detection within one record needs only that record's order.
                for position in positions {
                    self.detect_entry(&mut ledger, &key, position, record)?;
                }
            }
            working.used(&key);
        }
        for (key, (old, seen)) in rebases {
            let record = working.take(&key, &mut cache, || self.load_or_new(&key))?;
            if record.exists()
                && self.rebase_flattened(&key, old, seen, record, now, &mut batch, &mut delta)?
            {
                ledger.logged.documents.insert(key.clone(), record.heads());
                restored += 1;
            }
            working.used(&key);
        }
        if !quarantined.is_empty() {
            let left_out: HashSet<u64> = quarantined.iter().map(|q| q.seq).collect();
            across_records.retain(|(_, _, seq)| !left_out.contains(seq));
        }
        let index = self.unique_index_pages()?.filter(|i| {
            across_records
                .first()
                .is_some_and(|(_, _, seq)| *seq <= i.end())
        });
        self.detect_in_log_order(
            &mut ledger,
            index.as_ref(),
            &across_records,
            &mut working,
            &mut cache,
            &batch,
        )?;
        self.finish_ledger(&ledger, &mut batch)?;
        for entry in &quarantined {
            batch.put(
                keys::quarantine(entry.seq),
                super::encode(entry, "quarantined entry")?,
            );
        }
        batch.put(keys::cursor(RELAY_CURSOR), cursor.to_be_bytes().to_vec());
        self.stage_backfill_done(backfill.as_ref(), cursor, &mut batch);
        if bootstrap.is_some_and(|b| cursor >= b.end()) {
            batch.remove(keys::cursor(super::snapshot::SNAPSHOT_CURSOR));
        }
        if let Some(index) = self.unique_index_pages()?
            && index.complete
            && cursor >= index.end()
        {
            // No log entry after the index pages' heads is covered by them.
            batch.remove(keys::cursor(super::snapshot::UNIQUE_INDEX_CURSOR));
        }
        for change in &mut applied {
            change.stage_feed(self, &mut batch)?;
        }
        // Under the queue lock: a restoration queues a change.
        let mut queue = self.lock_queue();
        self.apply_queue_batch(&mut queue, batch, delta)?;
        drop(queue);
        self.feed_landed(applied.iter().map(|a| a.seq));
        self.count_open(&ledger);
        self.count_purged_open(purged_open);
        // As in `write_all`: the documents go back into the cache only once their batch landed.
        for (key, record) in working.into_cacheable() {
            cache.put(key, record);
        }
        drop(cache);
        let conflicts = ledger.conflicts.into_changed();
        // Answers to set-aside uploads may have waited for this part of the log.
        let restored = restored + self.settle_set_asides()?;
        Ok(RemoteOutcome {
            applied,
            conflicts,
            quarantined,
            restored,
        })
    }

    /// A record whose history the relay purged, held here as `old`: when it holds edits the
    /// relay never logged (beyond its logged heads and `history`, the changes of that history
    /// met since, applied first), the record as this device shows it, the delete met, is written
    /// on `fresh` (an empty document) as a new history, queued in `batch` like any local change,
    /// and true is returned; every device meets it with an `update_delete` conflict entry
    /// (PROTOCOL.md, section 5.8). False when there was nothing of this device's to keep.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn restore_purged(
        &self,
        key: &CacheKey,
        mut old: Record,
        history: Vec<Change>,
        fresh: &mut Record,
        now: u64,
        batch: &mut Batch,
        delta: &mut CountDelta,
    ) -> Result<bool, StoreError> {
        let logged_now: Vec<ChangeHash> = history.iter().map(Change::hash).collect();
        // What does not apply is left out, as applying it would quarantine it.
        if !history.is_empty() && old.apply_reloadable(history).is_err() {
            old = match self.load(&key.0, &key.1)? {
                Some(stored) => stored,
                None => return Ok(false),
            };
        }
        if !self.holds_unlogged(key, &mut old, &logged_now)? {
            return Ok(false);
        }
        // Edits that build on nothing logged (a record this device created on its own, under
        // the same id) are a new history already: kept as they are, they are logged after the
        // purge entry like any first change, whether their upload is waiting or on its way.
        if let Some(own) = self.own_history(key, &mut old, &logged_now)? {
            fresh.apply_decoded(own)?;
            return Ok(true);
        }
        self.write_restoration(key, old, fresh, now, batch, delta)
    }

    /// The changes `record` holds beyond what the log brought (its logged heads and
    /// `logged_now`), when none of them depends on a logged one.
    fn own_history(
        &self,
        key: &CacheKey,
        record: &mut Record,
        logged_now: &[ChangeHash],
    ) -> Result<Option<Vec<Change>>, StoreError> {
        let mut have = self.logged_heads_of(key, record)?;
        have.extend_from_slice(logged_now);
        have.retain(|h| record.has_change(h));
        let unlogged = record.changes_after(&have)?;
        Ok(builds_on_itself(&unlogged).then_some(unlogged))
    }

    /// The changes of `entries` when they make a history of their own (each depends only on
    /// others of them): none when there are none, or when one builds on something else.
    fn independent_changes(
        &self,
        entries: Vec<SyncQueueEntry>,
    ) -> Result<Option<Vec<Change>>, StoreError> {
        let mut changes = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = self.with_change(entry)?;
            match decode_change(&entry.data) {
                Ok(change) => changes.push(change),
                Err(_) => return Ok(None),
            }
        }
        Ok((!changes.is_empty() && builds_on_itself(&changes)).then_some(changes))
    }

    /// The record's queue entries not completed yet (waiting, failed or on their way).
    pub(super) fn uncompleted_entries(
        &self,
        key: &CacheKey,
    ) -> Result<Vec<SyncQueueEntry>, StoreError> {
        let mut entries = Vec::new();
        self.scan_live_queue(None, |entry| {
            if entry.model_name == key.0
                && entry.object_id == key.1
                && entry.status != QueueStatus::Completed
            {
                entries.push(entry);
            }
            true
        })?;
        Ok(entries)
    }

    /// Writes `old` as this device shows it on `fresh` as a purged record's new history, queued
    /// in `batch`; false when that wrote nothing.
    pub(super) fn write_restoration(
        &self,
        key: &CacheKey,
        mut old: Record,
        fresh: &mut Record,
        now: u64,
        batch: &mut Batch,
        delta: &mut CountDelta,
    ) -> Result<bool, StoreError> {
        // The record's changes still waiting to be uploaded are the restoration's now
        // (`complete_carried`): sent as well, one that depends on nothing would be logged as a
        // new history beside it. A new history's first changes already on their way are
        // logged as that history whatever happens here: the restoration builds on them, as
        // beside them it would reuse their actor's sequence numbers and be refused.
        let (in_flight, waiting): (Vec<_>, Vec<_>) = self
            .uncompleted_entries(key)?
            .into_iter()
            .partition(|e| e.status == QueueStatus::Processing);
        if let Some(first) = self.independent_changes(in_flight)? {
            fresh.apply_decoded(first)?;
        }
        let shown = resolve::view(&mut old, self.options.policies.of(&key.0));
        let written = fresh.restore_purged(&shown.fields, shown.deleted, now)?;
        let policy = self.options.policies.of(&key.0);
        let staged = super::Staged::of(fresh, Vec::new(), written, policy)?;
        if staged.written.is_none() {
            return Ok(false);
        }
        self.finish(key.clone(), staged, now, batch, delta)?;
        self.complete_carried(key, "it was purged", waiting, None, now, batch, delta)?;
        Ok(true)
    }

    /// `old` with `history` (changes of its history met in this apply) applied, and the heads
    /// of what this device saw logged of it, those changes included.
    fn logged_with(
        &self,
        key: &CacheKey,
        mut old: Record,
        history: Vec<Change>,
    ) -> Result<(Record, Vec<ChangeHash>), StoreError> {
        let logged_now: Vec<ChangeHash> = history.iter().map(Change::hash).collect();
        // What does not apply is left out, as applying it would quarantine it.
        if !history.is_empty() && old.apply_reloadable(history).is_err() {
            old = match self.load(&key.0, &key.1)? {
                Some(stored) => stored,
                None => self.new_record(&key.0),
            };
        }
        let mut seen = self.logged_heads_of(key, &mut old)?;
        seen.extend_from_slice(&logged_now);
        Ok((old, seen))
    }

    /// A record whose history a flatten entry started again, held here as `old`, of which this
    /// device saw the changes up to `seen` logged: when it holds edits beyond them, what they
    /// changed of what the record showed at `seen` (fields set or removed, a delete) is
    /// written on `fresh`, which holds the new history, as one local change, queued in `batch`
    /// (edits that build on nothing logged are kept as they are, beside it); the record's
    /// changes still waiting to be uploaded are completed, as it carries them (PROTOCOL.md,
    /// section 5.8). True when it wrote one.
    #[allow(clippy::too_many_arguments)]
    fn rebase_flattened(
        &self,
        key: &CacheKey,
        mut old: Record,
        mut seen: Vec<ChangeHash>,
        fresh: &mut Record,
        now: u64,
        batch: &mut Batch,
        delta: &mut CountDelta,
    ) -> Result<bool, StoreError> {
        seen.retain(|h| old.has_change(h));
        let unlogged = old.changes_after(&seen)?;
        if unlogged.is_empty() {
            return Ok(false);
        }
        if builds_on_itself(&unlogged) {
            // Edits that build on nothing logged (a record this device created on its own,
            // under the same id) are a history of their own, uploaded as they are: kept beside
            // the new one, as the relay keeps them.
            fresh.apply_decoded(unlogged)?;
            batch.put(keys::doc(&key.0, &key.1), fresh.save());
            self.stage_view(batch, key, fresh)?;
            return Ok(true);
        }
        let mut before = old.fork_at(&seen)?;
        self.write_again(key, (&mut before, &mut old), None, fresh, now, batch, delta)
    }

    /// Writes on `fresh` (a record's new history) what `old` changed of what `before` showed
    /// (fields set or removed, a delete), as one local change queued in `batch`, and completes
    /// the record's entries still waiting to be uploaded (those of the changes in `carried`,
    /// when given), as it carries them. False when that changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_again(
        &self,
        key: &CacheKey,
        (before, old): (&mut Record, &mut Record),
        carried: Option<&HashSet<ChangeHash>>,
        fresh: &mut Record,
        now: u64,
        batch: &mut Batch,
        delta: &mut CountDelta,
    ) -> Result<bool, StoreError> {
        let policy = self.options.policies.of(&key.0);
        let logged = resolve::view(before, policy);
        let local = resolve::view(old, policy);
        let live = fresh.is_live();
        let heads_before = fresh.heads();
        let written = if local.deleted {
            if logged.deleted || !live {
                None
            } else {
                fresh.delete(now)?
            }
        } else if logged.deleted || !live {
            // Brought back here: as this device shows it.
            fresh.put(&local.fields, now)?
        } else {
            let set: crate::record::Fields = local
                .fields
                .iter()
                .filter(|(name, value)| logged.fields.get(*name) != Some(*value))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect();
            let unset: Vec<String> = logged
                .fields
                .keys()
                .filter(|name| !local.fields.contains_key(*name))
                .cloned()
                .collect();
            if set.is_empty() && unset.is_empty() {
                None
            } else {
                fresh.patch(&set, &unset, now)?
            }
        };
        let staged = super::Staged::of(fresh, heads_before, written, policy)?;
        if staged.written.is_none() {
            return Ok(false);
        }
        // The change is this device's, not logged: the record's logged state says so, as any
        // local write's does.
        self.stage_unlogged(&mut HashMap::new(), batch, key, &staged)?;
        self.finish(key.clone(), staged, now, batch, delta)?;
        let waiting: Vec<_> = self
            .uncompleted_entries(key)?
            .into_iter()
            .filter(|e| e.status != QueueStatus::Processing)
            .collect();
        let why = "its history was flattened";
        self.complete_carried(key, why, waiting, carried, now, batch, delta)?;
        Ok(true)
    }

    /// Completes `waiting`, the record's queue entries still waiting to be uploaded (pending or
    /// failed), of the changes in `only` when given: a change written again on the record's new
    /// history carries them, after `why`.
    #[allow(clippy::too_many_arguments)]
    fn complete_carried(
        &self,
        key: &CacheKey,
        why: &str,
        waiting: Vec<SyncQueueEntry>,
        only: Option<&HashSet<ChangeHash>>,
        now: u64,
        batch: &mut Batch,
        delta: &mut CountDelta,
    ) -> Result<(), StoreError> {
        for entry in waiting {
            let mut entry = self.with_change(entry)?;
            if let Some(only) = only
                && !only.contains(&change_header(&entry.data)?.hash)
            {
                continue;
            }
            let was = entry.status;
            entry.status = QueueStatus::Completed;
            entry.updated_at = now;
            entry.last_error = Some(format!(
                "{}/{}: {why}, and this change is carried by the one written again on its new \
                 history",
                key.0, key.1
            ));
            super::stage_entry(batch, delta, Some(was), &entry)?;
            self.lock_holds().release(entry.id);
        }
        Ok(())
    }

    /// What applying `change` would report when it creates a record this device does not hold
    /// in any form (no document, no cached one, no logged state) as a plain first change
    /// (`PlainFirst`): such a change applies to an empty document and meets no other, so the
    /// change's bytes are the record's document and detection has nothing to find; with the
    /// record's view. `None` for anything else, which is applied as usual.
    fn created_as_is(
        &self,
        key: &CacheKey,
        first: &FirstChange,
        ledger: &Ledger,
        cache: &LruCache<CacheKey, Record>,
    ) -> Result<Option<(RemoteApplied, Vec<u8>)>, StoreError> {
        let message = first.message.as_deref();
        if cache.contains(key)
            || resolve::resolution_of(message).is_some()
            || resolve::is_restoration(message)
        {
            return Ok(None);
        }
        if self.kv.get(&keys::doc(&key.0, &key.1))?.is_some()
            || self.has_logged_state(ledger, key)?
        {
            return Ok(None);
        }
        let plain = &first.plain;
        let view = super::views::of_plain_first(plain, first.hash, self.policy(&key.0))?;
        let created = RemoteApplied {
            collection: key.0.clone(),
            id: key.1.clone(),
            operation: if plain.deleted {
                Operation::Delete
            } else {
                Operation::Create
            },
            deleted: plain.deleted,
            heads: vec![first.hash.to_string()],
            device: first.actor.to_hex_string(),
            seq: 0,
        };
        Ok(Some((created, view)))
    }

    /// Applies a record's changes one at a time, in log order, to its document as stored, after
    /// applying them together failed: returns those that applied, and puts each that did not
    /// with its reason in `refused` (a change built on a refused one is refused in turn, its
    /// dependency missing). Only this error path pays for it.
    fn apply_each(
        &self,
        key: &CacheKey,
        group: Vec<(u64, Change)>,
        working: &mut WorkingSet,
        cache: &mut LruCache<CacheKey, Record>,
        refused: &mut Vec<(u64, String)>,
    ) -> Result<(Vec<(u64, Change)>, bool), StoreError> {
        working.discard(key);
        let mut kept: Vec<(u64, Change)> = Vec::with_capacity(group.len());
        let mut changed = false;
        for (seq, change) in group {
            let record = working.take(key, cache, || self.load_or_new(key))?;
            match record.apply_reloadable(vec![change.clone()]) {
                Ok(did) => {
                    changed |= did;
                    kept.push((seq, change));
                }
                Err(e) => {
                    refused.push((seq, e.to_string()));
                    if e.needs_reload() {
                        working.discard(key);
                        let record = working.take(key, cache, || self.load_or_new(key))?;
                        record.apply_decoded(kept.iter().map(|(_, c)| c.clone()).collect())?;
                    }
                }
            }
        }
        Ok((kept, changed))
    }
}

/// Holds `entry` apart after a failed upload: its batches at most `batch_limit` entries, and no
/// new attempt for `wait_ms`.
fn hold_back(
    holds: &mut UploadHolds,
    entry: &SyncQueueEntry,
    batch_limit: usize,
    wait_ms: u64,
    now: u64,
) {
    if entry.status == QueueStatus::Failed {
        holds.release(entry.id);
        return;
    }
    let hold = holds.held.entry(entry.id).or_insert(Hold {
        batch_limit,
        not_before_ms: 0,
    });
    hold.batch_limit = hold.batch_limit.min(batch_limit);
    hold.not_before_ms = now.saturating_add(wait_ms);
}

fn too_large(size: usize, max: usize) -> String {
    format!(
        "{}: the change is {size} bytes, over the {max} bytes one sync frame can carry: it \
         cannot be uploaded; raise sync.max_frame_bytes (and relay.max_frame_bytes) above it, \
         or write the record in smaller parts",
        ErrorKind::Validation.as_str()
    )
}

/// Counts an entry that `fail` moved: back to pending or, out of retries, failed.
fn count_failure(entry: &SyncQueueEntry, summary: &mut UploadSummary) {
    if entry.status == QueueStatus::Failed {
        summary.failed += 1;
    } else {
        summary.retrying += 1;
    }
}

/// Whether every change depends only on others of `changes`: a history of its own.
fn builds_on_itself(changes: &[Change]) -> bool {
    let own: HashSet<ChangeHash> = changes.iter().map(Change::hash).collect();
    changes
        .iter()
        .all(|c| c.deps().iter().all(|d| own.contains(d)))
}
