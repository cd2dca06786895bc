//! The store's side of sync: picking the next upload batch from the SyncQueue, recording what the
//! relay said about it, and applying the relay's change log to the local documents together with
//! the download cursor.
//!
//! Owns: the pending index's upkeep and use, the upload state moves of queue entries, and the rule
//! that remote changes and the cursor that covers them land in one atomic batch (with no queue
//! entries: a remote change is not this device's to upload).
//!
//! Must not touch: the network, sessions, timers or threads. Every operation here is synchronous
//! and durable only after `Store::flush`; the caller decides when to flush.

use super::conflicts::Ledger;
use super::kv::{Batch, Kv};
use super::{CacheKey, CountDelta, Store, StoreError, WorkingSet, decode, keys, stage_entry};
use crate::record::decode_change;
use crate::resolve;
use automerge::Change;
use ferry_proto::wire::{ChangeOutcome, ChangeResult, LogEntry};
use ferry_proto::{
    Operation, QueueStatus, SyncQueueEntry, validate_collection, validate_record_id,
};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};

/// The cursor name under which the relay's log position is kept.
pub const RELAY_CURSOR: &str = "relay";

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
}

/// What applying part of the relay's log did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteOutcome {
    /// The records whose documents changed.
    pub applied: Vec<RemoteApplied>,
    /// Conflicts found, or changed (resolved), by these entries, in log order.
    pub conflicts: Vec<crate::resolve::Conflict>,
}

/// Builds the pending index for a store made before it existed. Runs once: the marker key is
/// written in the same batch as the index.
pub(super) fn ensure_pending_index(kv: &dyn Kv) -> Result<(), StoreError> {
    if kv.get(keys::META_PENDING_INDEX)?.is_some() {
        return Ok(());
    }
    const PAGE: usize = 512;
    let mut batch = Batch::default();
    let mut start = keys::QUEUE.to_vec();
    let end = keys::prefix_end(keys::QUEUE);
    loop {
        let page = kv.range(&start, &end, PAGE)?;
        let Some((last, _)) = page.last() else { break };
        start = keys::after(last);
        for (_, bytes) in page {
            let entry: SyncQueueEntry = decode(&bytes, "queue entry")?;
            if entry.status == QueueStatus::Pending {
                batch.put(keys::pending(entry.priority, entry.id), Vec::new());
            }
        }
    }
    batch.put(keys::META_PENDING_INDEX.to_vec(), Vec::new());
    kv.apply(batch)?;
    Ok(kv.flush()?)
}

impl Store {
    /// Takes the next pending entries to upload, highest priority first and oldest first within
    /// a priority, up to `max_changes` entries and `max_bytes` of change data (but always at least
    /// one entry, however large, so a big change cannot block the queue). They move to
    /// `Processing` in one atomic batch; durable after `flush`.
    pub fn next_upload_batch(
        &self,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Vec<SyncQueueEntry>, StoreError> {
        let mut queue = self.lock_queue();
        let now = self.clock.now_ms();
        let mut picked = Vec::new();
        let mut bytes = 0usize;
        let mut start = keys::PENDING.to_vec();
        let end = keys::prefix_end(keys::PENDING);
        'scan: while picked.len() < max_changes {
            let page = self
                .kv
                .range(&start, &end, (max_changes - picked.len()).min(256))?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            for (key, _) in page {
                let id = keys::pending_id(&key)?;
                let stored = self
                    .kv
                    .get(&keys::queue(id))?
                    .ok_or(StoreError::QueueEntryNotFound(id))?;
                let entry = self.with_change(decode(&stored, "queue entry")?)?;
                let size = entry.data.len();
                if !picked.is_empty() && bytes.saturating_add(size) > max_bytes {
                    break 'scan;
                }
                bytes = bytes.saturating_add(size);
                picked.push(entry);
            }
        }
        let mut batch = Batch::default();
        let mut delta = CountDelta::default();
        for entry in &mut picked {
            entry.start(now)?;
            stage_entry(&mut batch, &mut delta, Some(QueueStatus::Pending), entry);
        }
        self.apply_queue_batch(&mut queue, batch, delta)?;
        Ok(picked)
    }

    /// Records the relay's answer to an upload, in one atomic batch: stored and duplicate changes
    /// are completed; a change refused with a retryable code is failed (back to `Pending`, or
    /// `Failed` once `max_retries` is reached); one refused for good goes straight to `Failed`.
    /// The error kept is `"<kind>: <message>"`. Results for entries not in `Processing` are
    /// ignored and listed in the summary. Durable after `flush`.
    pub fn finish_upload(
        &self,
        results: &[ChangeResult],
        max_retries: u32,
    ) -> Result<UploadSummary, StoreError> {
        self.settle(
            results.iter().map(|r| (r.entry, &r.outcome)),
            |entry, outcome, now, summary| match outcome {
                ChangeOutcome::Stored { .. } | ChangeOutcome::Duplicate { .. } => {
                    summary.completed += 1;
                    entry.complete(now)
                }
                ChangeOutcome::Rejected { code, message } => {
                    let error = format!("{}: {message}", code.kind().as_str());
                    if code.is_retryable() {
                        entry.fail(error, max_retries, now)?;
                        count_failure(entry, summary);
                        Ok(())
                    } else {
                        summary.failed += 1;
                        entry.reject(error, now)
                    }
                }
            },
        )
    }

    /// The connection was lost before the relay answered: the entries go back to `Pending` with
    /// `error` recorded and one more retry counted (`Failed` once `max_retries` is reached).
    /// Entries not in `Processing` are skipped. Durable after `flush`.
    pub fn abandon_upload(
        &self,
        ids: &[u64],
        error: &str,
        max_retries: u32,
    ) -> Result<UploadSummary, StoreError> {
        self.settle(
            ids.iter().map(|&id| (id, &())),
            |entry, (), now, summary| {
                entry.fail(error, max_retries, now)?;
                count_failure(entry, summary);
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
        for (id, item) in items {
            if !seen.insert(id) {
                continue;
            }
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
            );
        }
        self.apply_queue_batch(&mut queue, batch, delta)?;
        Ok(summary)
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

    /// Applies entries of the relay's log to the local documents and moves the download cursor to
    /// `through`, all in one atomic batch: after a crash either both are there or neither, so a
    /// device may read a change twice (harmless: applying is idempotent) but never skips one.
    /// Records that do not exist yet are created; no queue entries are made. Each change then
    /// meets, in log order, the record's changes logged before it, and the conflicts that brings
    /// are recorded in the same batch (see `conflicts`). This device's own changes come back in
    /// the log too: they change no document but take their place in that order. Returns the
    /// records that changed and the conflicts found or resolved. Durable after `flush`.
    ///
    /// If any entry cannot be applied (malformed, or its dependencies are missing), nothing is
    /// written and the error names it. Skipping it instead would move the cursor past a change
    /// this device never got; the relay's log is causally closed, so such an entry means the
    /// download was damaged or incomplete, and reading again from the cursor is the fix.
    ///
    /// The cursor never moves backwards: a late answer to an older download cannot rewind it.
    pub fn apply_remote(
        &self,
        entries: &[LogEntry],
        through: u64,
    ) -> Result<RemoteOutcome, StoreError> {
        let mut order: Vec<CacheKey> = Vec::new();
        // Entries of collections with unique constraints, in log order: they are checked against
        // each other once every record is applied.
        let mut across_records: Vec<(CacheKey, automerge::ChangeHash, u64)> = Vec::new();
        // Each record's changes, decoded once, with their seqs.
        let mut groups: HashMap<CacheKey, Vec<(u64, Change)>> = HashMap::new();
        for entry in entries {
            let invalid = |reason: String| StoreError::RemoteEntry {
                seq: entry.seq,
                address: format!("{}/{}", entry.collection, entry.record),
                reason,
            };
            validate_collection(&entry.collection, &self.options.limits)
                .and_then(|()| validate_record_id(&entry.record, &self.options.limits))
                .map_err(|e| invalid(e.to_string()))?;
            let change = decode_change(&entry.change).map_err(|e| invalid(e.to_string()))?;
            let key = (entry.collection.clone(), entry.record.clone());
            if !self.policy(&key.0).unique.is_empty() {
                across_records.push((key.clone(), change.hash(), entry.seq));
            }
            groups
                .entry(key.clone())
                .or_insert_with(|| {
                    order.push(key);
                    Vec::new()
                })
                .push((entry.seq, change));
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
        for key in order {
            let group = groups.remove(&key).unwrap_or_default();
            let first = group.first().map_or(0, |(seq, _)| *seq);
            let positions: Vec<(automerge::ChangeHash, u64)> =
                group.iter().map(|(seq, c)| (c.hash(), *seq)).collect();
            // The device that wrote the last of the changes, as subscribers are told.
            let device = group
                .last()
                .map(|(_, c)| c.actor_id().to_hex_string())
                .unwrap_or_default();
            let policy = self.options.policies.of(&key.0);
            if policy.unique.is_empty() && self.fast_forward_own(&mut ledger, &key, &group)? {
                continue;
            }
            let changes = group.into_iter().map(|(_, c)| c).collect();
            let record = working.take(&key, &mut cache, || self.load_or_new(&key))?;
            self.seed_logged(&mut ledger, &key, record)?;
            let existed = record.exists();
            let was_deleted = existed && resolve::is_deleted(record, policy);
            let changed = record.apply_decoded(changes).map_err(|e| {
                // Every entry decoded, so this is a dependency missing from the record's
                // changes as a whole: name the record's first entry.
                StoreError::RemoteEntry {
                    seq: first,
                    address: format!("{}/{}", key.0, key.1),
                    reason: e.to_string(),
                }
            })?;
            if changed {
                let deleted = resolve::is_deleted(record, policy);
                let operation = if deleted {
                    Operation::Delete
                } else if !existed || was_deleted {
                    Operation::Create
                } else {
                    Operation::Update
                };
                batch.put(keys::doc(&key.0, &key.1), record.save());
                applied.push(RemoteApplied {
                    collection: key.0.clone(),
                    id: key.1.clone(),
                    operation,
                    deleted,
                    heads: record.heads().iter().map(|h| h.to_string()).collect(),
                    device,
                });
            }
            ledger.documents.insert(key.clone(), record.heads());
            if policy.unique.is_empty() {
                // Detection within one record needs only that record's order.
                for position in positions {
                    self.detect_entry(&mut ledger, &mut batch, &key, position, record)?;
                }
            }
            working.used(&key);
        }
        self.detect_in_log_order(
            &mut ledger,
            &across_records,
            &mut working,
            &mut cache,
            &mut batch,
        )?;
        self.finish_ledger(&mut ledger, &mut batch)?;
        batch.put(keys::cursor(RELAY_CURSOR), cursor.to_be_bytes().to_vec());
        self.kv.apply(batch)?;
        self.count_open(&ledger);
        // As in `write_all`: the documents go back into the cache only once their batch landed.
        for (key, record) in working.into_cacheable() {
            cache.put(key, record);
        }
        let conflicts = ledger.changed;
        Ok(RemoteOutcome { applied, conflicts })
    }
}

/// Counts an entry that `fail` moved: back to pending or, out of retries, failed.
fn count_failure(entry: &SyncQueueEntry, summary: &mut UploadSummary) {
    if entry.status == QueueStatus::Failed {
        summary.failed += 1;
    } else {
        summary.retrying += 1;
    }
}
