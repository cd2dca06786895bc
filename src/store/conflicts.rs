//! The store's side of conflicts: detection run in the relay's log order as remote changes are
//! applied (through `resolve::ledger`, which the relay runs too), where the conflict entries and
//! their indexes, each record's logged heads, the unique-value index and the conflict counters
//! are kept, and resolutions written as local changes (their checks, targets and change shared
//! with the relay's web actor: `check_resolution`, `resolution_targets`, `write_resolution`).
//!
//! Owns: everything under the `h`, `x`, `u` and `k` keys (see `keys`). What counts as a conflict
//! and what a record shows are `resolve`'s rules; this module keeps their results, in the same
//! atomic batch as the changes that caused them, so a crash can repeat an apply but never half-do
//! it.
//!
//! Must not touch: the network, sessions, the IPC shapes.

use super::kv::Batch;
use super::{CacheKey, CountDelta, Staged, Store, StoreError, WorkingSet, keys, validate_fields};
use crate::record::{ChangeHeader, Fields, Record, Written, resolution_message};
use crate::resolve::ledger::{
    self, ConflictState, Counter, HeldValues, Holders, UniqueCheck, ValueKey,
};
use crate::resolve::{self, Conflict, ConflictKind, ConflictStatus, LogPosition, Resolution, Take};
use automerge::ChangeHash;
use ferry_proto::Limits;
use ferry_proto::Operation;
use ferry_proto::wire::{HeadsHasher, RecordName};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;

/// Conflict counts for one kind in one collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictCounts {
    pub kind: String,
    pub collection: String,
    pub detected: u64,
    pub auto_resolved: u64,
    pub queued: u64,
    pub resolved_manually: u64,
}

/// What a resolution wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResolveOutcome {
    pub conflict: Conflict,
    pub writes: Vec<super::Applied>,
}

/// The conflict state one apply reads and changes, loaded on first use and written into the
/// apply's batch at the end, so later entries of the same apply see what earlier ones did.
#[derive(Default)]
pub(super) struct Ledger {
    pub logged: Logged,
    /// Conflict entries, the unique index and the counters.
    pub conflicts: ledger::Ledger,
    /// What purged conflict entries had added to the counters, taken off them.
    forgotten: BTreeMap<(Counter, ConflictKind, String), u64>,
}

/// Records' logged heads as an apply moves them.
#[derive(Default)]
pub(super) struct Logged {
    /// Each record's logged heads, as far as the apply has got.
    heads: HashMap<CacheKey, Vec<ChangeHash>>,
    /// Each record's document heads once the apply is done.
    pub documents: HashMap<CacheKey, Vec<ChangeHash>>,
    /// The records that have an `h` key stored.
    unlogged: HashSet<CacheKey>,
}

/// The store's conflict state, as the shared ledger reads it.
struct Stored<'a>(&'a Store);

impl ConflictState for Stored<'_> {
    type Error = StoreError;

    fn conflict(&self, id: &str) -> Result<Option<Conflict>, StoreError> {
        self.0.conflict(id)
    }

    fn held(&self, record: &CacheKey) -> Result<HeldValues, StoreError> {
        Ok(self
            .0
            .stored_json(&keys::unique_held(&record.0, &record.1), "unique values")?
            .unwrap_or_default())
    }

    fn holders(&self, value: &ValueKey) -> Result<Holders, StoreError> {
        Ok(self
            .0
            .stored_json(&unique_value_key(value), "unique value index")?
            .unwrap_or_default())
    }
}

impl From<ledger::EncodeError> for StoreError {
    fn from(e: ledger::EncodeError) -> Self {
        StoreError::Encode {
            what: "unique value",
            detail: e.0,
        }
    }
}

fn unique_value_key(value: &ValueKey) -> Vec<u8> {
    keys::unique_value(&value.collection, value.constraint, value.value.as_bytes())
}

impl Store {
    fn stored_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.kv.get(key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Decode {
                        what,
                        detail: e.to_string(),
                    })
            }
        }
    }

    /// A conflict entry as a reader sees it: the encrypted fields of its sides and of its
    /// field-level values decrypted (a value that does not decrypt shows as a placeholder).
    /// Entries are stored with encrypted values, as the documents are.
    pub fn open_conflict(&self, conflict: &mut Conflict) {
        let keyring = &self.options.keyring;
        let collection = conflict.collection.as_str();
        for side in [&mut conflict.server, &mut conflict.client] {
            // Lenient: cannot fail.
            let _ = keyring.open_fields(collection, &side.record, &mut side.fields, false);
        }
        for field in &mut conflict.fields {
            let [Value::String(name)] = field.path.as_slice() else {
                continue;
            };
            for value in [&mut field.server, &mut field.client].into_iter().flatten() {
                keyring.open_value(collection, &conflict.record, name, value);
            }
        }
    }

    /// One conflict entry.
    pub fn conflict(&self, id: &str) -> Result<Option<Conflict>, StoreError> {
        self.stored_json(&keys::conflict(id), "conflict entry")
    }

    /// Conflict entries in id order after `after`, those with `status` only when given.
    pub fn conflicts(
        &self,
        status: Option<ConflictStatus>,
        collection: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Conflict>, StoreError> {
        // Open ones have their own index; the others are found by scanning every entry.
        let (prefix, from_index) = match status {
            Some(ConflictStatus::Open) => (keys::CONFLICT_OPEN, true),
            _ => (keys::CONFLICT, false),
        };
        let mut start = match after {
            Some(id) => keys::after(&[prefix, id.as_bytes()].concat()),
            None => prefix.to_vec(),
        };
        let end = keys::prefix_end(prefix);
        let mut out = Vec::new();
        while out.len() < limit {
            let page = self.kv.range(&start, &end, 256)?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            for (key, bytes) in page {
                let conflict: Conflict = if from_index {
                    let id = key
                        .get(prefix.len()..)
                        .and_then(|id| std::str::from_utf8(id).ok())
                        .unwrap_or_default();
                    match self.conflict(id)? {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Decode {
                        what: "conflict entry",
                        detail: e.to_string(),
                    })?
                };
                if status.is_some_and(|s| s != conflict.status)
                    || collection.is_some_and(|c| c != conflict.collection)
                {
                    continue;
                }
                out.push(conflict);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// How many conflicts are open.
    pub fn open_conflicts(&self) -> Result<u64, StoreError> {
        Ok(self.open_conflicts.load(Ordering::SeqCst))
    }

    /// Counts, once its batch has landed, the conflicts an apply opened and closed.
    pub(super) fn count_open(&self, ledger: &Ledger) {
        let (opened, closed) = ledger.conflicts.open_delta();
        self.open_conflicts.fetch_add(opened, Ordering::SeqCst);
        self.open_conflicts.fetch_sub(closed, Ordering::SeqCst);
    }

    /// The open conflicts that flag a record.
    pub fn record_conflicts(&self, collection: &str, id: &str) -> Result<Vec<String>, StoreError> {
        if self.open_conflicts.load(Ordering::SeqCst) == 0 {
            return Ok(Vec::new());
        }
        let prefix = keys::record_conflicts(collection, id);
        let rows = self.kv.range(&prefix, &keys::prefix_end(&prefix), 64)?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, _)| String::from_utf8(k.get(prefix.len()..)?.to_vec()).ok())
            .collect())
    }

    /// The conflict a change brought, if any, by its hash (`change` as a queue entry holds it,
    /// `completed::Held`): how a SyncQueue entry shows that its change hit one.
    pub fn change_conflict(&self, change: &[u8]) -> Result<Option<String>, StoreError> {
        let Some(hash) = super::completed::Held::of(change).hash() else {
            return Ok(None);
        };
        Ok(self
            .kv
            .get(&keys::change_conflict(&hash.to_string()))?
            .and_then(|v| String::from_utf8(v).ok()))
    }

    /// Every conflict counter, by kind and collection.
    pub fn conflict_counts(&self) -> Result<Vec<ConflictCounts>, StoreError> {
        let prefix = keys::CONFLICT_COUNTER;
        let rows = self
            .kv
            .range(prefix, &keys::prefix_end(prefix), usize::MAX)?;
        let mut by_key: BTreeMap<(String, String), ConflictCounts> = BTreeMap::new();
        for (key, value) in rows {
            let text =
                String::from_utf8_lossy(key.get(prefix.len()..).unwrap_or_default()).into_owned();
            let mut parts = text.splitn(3, '\0');
            let (Some(counter), Some(kind), Some(collection)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let n = <[u8; 8]>::try_from(value.as_slice()).map_or(0, u64::from_be_bytes);
            let row = by_key
                .entry((kind.to_owned(), collection.to_owned()))
                .or_insert_with(|| ConflictCounts {
                    kind: kind.to_owned(),
                    collection: collection.to_owned(),
                    ..ConflictCounts::default()
                });
            match counter {
                "detected" => row.detected = n,
                "auto_resolved" => row.auto_resolved = n,
                "queued" => row.queued = n,
                "resolved_manually" => row.resolved_manually = n,
                _ => {}
            }
        }
        Ok(by_key.into_values().collect())
    }

    /// Runs conflict detection for one applied log entry: the change meets the record's changes
    /// logged before it. Stages the new logged heads, a conflict found and a resolution seen.
    /// Returns the record's logged view and the change's time when its collection has unique
    /// constraints, for the unique check.
    pub(super) fn detect_entry(
        &self,
        ledger: &mut Ledger,
        key: &CacheKey,
        (hash, seq): (ChangeHash, u64),
        record: &mut Record,
    ) -> Result<Option<(resolve::View, i64)>, StoreError> {
        let policy = self.options.policies.of(&key.0);
        self.seed_logged(&mut ledger.logged, key, record)?;
        let logged = ledger.logged.heads.get(key).cloned().unwrap_or_default();
        let doc = record.automerge();
        let at = LogPosition {
            seq,
            collection: &key.0,
            record: &key.1,
        };
        let mut detection = resolve::detect(doc, &logged, &hash, at, policy);
        let unique = (!policy.unique.is_empty()).then(|| {
            let view = resolve::view_at(doc, Some(&detection.logged_heads), policy);
            (view, resolve::change_stamp(doc, &hash).time)
        });
        ledger
            .logged
            .heads
            .insert(key.clone(), std::mem::take(&mut detection.logged_heads));
        ledger.conflicts.meet(&Stored(self), detection)?;
        Ok(unique)
    }

    /// Runs detection, in log order, for applied entries of collections with unique constraints:
    /// a clash is between records, so which record took a value first is the log's order across
    /// records. Every record named must be in `working` (one use per entry). `index`: the
    /// unique-value index pages a bootstrap took, whose values' holders count the entries up to
    /// their heads already.
    pub(super) fn detect_in_log_order(
        &self,
        ledger: &mut Ledger,
        index: Option<&super::snapshot::IndexPages>,
        order: &[(CacheKey, ChangeHash, u64)],
        working: &mut WorkingSet,
        cache: &mut LruCache<CacheKey, Record>,
        batch: &Batch,
    ) -> Result<(), StoreError> {
        for (key, hash, seq) in order {
            let record = working.take(key, cache, || self.load_or_new(key))?;
            if let Some((view, time)) = self.detect_entry(ledger, key, (*hash, *seq), record)? {
                let policy = self.options.policies.of(&key.0);
                let values = resolve::unique_values(&view, policy);
                let at = UniqueCheck {
                    key,
                    change: *hash,
                    seq: *seq,
                    time,
                    policy,
                };
                let logged = &mut ledger.logged;
                let side_of = |id: &str| {
                    let record_key = (key.0.clone(), id.to_owned());
                    // The other record may have been applied earlier in this batch, not yet
                    // stored.
                    let staged = batch.get(&keys::doc(&record_key.0, &record_key.1));
                    let record = working.take(&record_key, cache, || match staged {
                        Some(bytes) => self.parse(&record_key.0, bytes),
                        None => self.load_or_new(&record_key),
                    })?;
                    self.seed_logged(logged, &record_key, record)?;
                    let heads = logged.heads.get(&record_key).cloned().unwrap_or_default();
                    let doc = record.automerge();
                    let view = resolve::view_at(doc, Some(&heads), policy);
                    Ok(resolve::side(doc, id, &heads, view))
                };
                ledger.conflicts.move_unique(
                    &Stored(self),
                    at,
                    values,
                    |value| index.is_some_and(|i| *seq <= i.covered(value)),
                    side_of,
                )?;
            }
            working.used(key);
        }
        Ok(())
    }

    /// The `h` key of a record: present while it has local changes the relay has not logged back.
    fn logged_state(&self, key: &CacheKey) -> Result<Option<LoggedState>, StoreError> {
        match self.kv.get(&keys::logged_heads(&key.0, &key.1))? {
            None => Ok(None),
            Some(bytes) => Ok(Some(super::decode(&bytes, "logged heads")?)),
        }
    }

    /// Puts a record's logged heads into the ledger before the apply changes its document: the
    /// `h` key's, or, without one (every change of the record is logged), its heads now.
    pub(super) fn seed_logged(
        &self,
        logged: &mut Logged,
        key: &CacheKey,
        record: &mut Record,
    ) -> Result<(), StoreError> {
        if logged.heads.contains_key(key) {
            return Ok(());
        }
        let (heads, document) = match self.logged_state(key)? {
            Some(state) => {
                logged.unlogged.insert(key.clone());
                (state.logged(), state.document())
            }
            None => {
                let heads = record.heads();
                (heads.clone(), heads)
            }
        };
        logged.heads.insert(key.clone(), heads);
        logged.documents.entry(key.clone()).or_insert(document);
        Ok(())
    }

    /// Whether anything of the record's logged state is known, in this apply or stored.
    pub(super) fn has_logged_state(
        &self,
        ledger: &Ledger,
        key: &CacheKey,
    ) -> Result<bool, StoreError> {
        Ok(ledger.logged.heads.contains_key(key) || self.logged_state(key)?.is_some())
    }

    /// The heads of the record's changes this device saw logged: its `h` key's, or, without one,
    /// its document's.
    pub(super) fn logged_heads_of(
        &self,
        key: &CacheKey,
        record: &mut Record,
    ) -> Result<Vec<ChangeHash>, StoreError> {
        Ok(match self.logged_state(key)? {
            Some(state) => state.logged(),
            None => record.heads(),
        })
    }

    /// Whether the record has an `h` key, and the logged heads it names are none: every change
    /// this device holds of it is its own, never logged.
    pub(super) fn never_logged(&self, key: &CacheKey) -> Result<Option<bool>, StoreError> {
        Ok(self.logged_state(key)?.map(|state| state.logged.is_empty()))
    }

    /// Stages `document` as the record's document heads, its logged heads staying: after
    /// changes of this device's left its document. No `h` key is kept when they are the same.
    pub(super) fn stage_document_heads(
        &self,
        key: &CacheKey,
        document: &[ChangeHash],
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        let logged = self
            .logged_state(key)?
            .map(|state| state.logged())
            .unwrap_or_default();
        let h = keys::logged_heads(&key.0, &key.1);
        let same: BTreeSet<&ChangeHash> = logged.iter().collect();
        if document.is_empty() || same == document.iter().collect() {
            batch.remove(h);
        } else {
            batch.put(
                h,
                super::encode(&LoggedState::new(&logged, document), "logged heads")?,
            );
        }
        Ok(())
    }

    /// Whether `record` holds local changes the relay has not logged: changes beyond its logged
    /// heads and `logged_now` (changes met in the log since those were stored).
    pub(super) fn holds_unlogged(
        &self,
        key: &CacheKey,
        record: &mut Record,
        logged_now: &[ChangeHash],
    ) -> Result<bool, StoreError> {
        let Some(state) = self.logged_state(key)? else {
            return Ok(false);
        };
        let mut have = state.logged();
        have.extend_from_slice(logged_now);
        have.retain(|h| record.has_change(h));
        Ok(!record.changes_after(&have)?.is_empty())
    }

    /// A record whose history a purge entry ended (PROTOCOL.md, section 5.8): nothing of it is
    /// logged any more, and its document now holds `document` (a restoration of this device's,
    /// not logged yet, or nothing).
    pub(super) fn purge_logged(ledger: &mut Ledger, key: &CacheKey, document: Vec<ChangeHash>) {
        ledger.logged.heads.insert(key.clone(), Vec::new());
        ledger.logged.documents.insert(key.clone(), document);
        // So that `finish_ledger` removes an `h` key the record no longer needs.
        ledger.logged.unlogged.insert(key.clone());
    }

    /// Stages the removal of the conflict entries of purged records (each with the seq of its
    /// purge entry) found before that seq, with their indexes. Returns how many of them were
    /// open, to count once the batch has landed.
    pub(super) fn purge_conflicts(
        &self,
        purged: &HashMap<CacheKey, u64>,
        ledger: &mut Ledger,
        batch: &mut Batch,
    ) -> Result<u64, StoreError> {
        let mut open = 0;
        let mut start = keys::CONFLICT.to_vec();
        let end = keys::prefix_end(keys::CONFLICT);
        loop {
            let page = self.kv.range(&start, &end, 256)?;
            let Some((last, _)) = page.last() else {
                return Ok(open);
            };
            start = keys::after(last);
            for (key, bytes) in page {
                let conflict: Conflict =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Decode {
                        what: "conflict entry",
                        detail: e.to_string(),
                    })?;
                let record = (conflict.collection.clone(), conflict.record.clone());
                if purged.get(&record).is_none_or(|&seq| conflict.seq > seq) {
                    continue;
                }
                // Counted as found, queued or settled, and resolved: taken off again, so that
                // the counters are those of the entries held, as on a device that bootstraps
                // from a snapshot after the purge.
                let settled = if conflict.status == ConflictStatus::AutoResolved {
                    Counter::AutoResolved
                } else {
                    Counter::Queued
                };
                let mut counted = vec![Counter::Detected, settled];
                if conflict.status == ConflictStatus::Resolved {
                    counted.push(Counter::ResolvedManually);
                }
                for counter in counted {
                    *ledger
                        .forgotten
                        .entry((counter, conflict.kind, conflict.collection.clone()))
                        .or_default() += 1;
                }
                let id = &conflict.id;
                if conflict.status == ConflictStatus::Open {
                    open += 1;
                    batch.remove(keys::conflict_open(id));
                    let mut flag = keys::record_conflicts(&conflict.collection, &conflict.record);
                    flag.extend_from_slice(id.as_bytes());
                    batch.remove(flag);
                }
                if let Some(change) = conflict.client.changes.first() {
                    batch.remove(keys::change_conflict(change));
                }
                batch.remove(key);
            }
        }
    }

    /// Counts open conflict entries a purge removed, once its batch has landed.
    pub(super) fn count_purged_open(&self, open: u64) {
        self.open_conflicts.fetch_sub(open, Ordering::SeqCst);
    }

    /// A record this device held nothing of, created by `hash` as its only change: its place in
    /// the log is what detection would have recorded (a change on nothing meets nothing).
    pub(super) fn log_created(ledger: &mut Ledger, key: &CacheKey, hash: ChangeHash) {
        ledger.logged.heads.insert(key.clone(), vec![hash]);
        ledger.logged.documents.insert(key.clone(), vec![hash]);
    }

    /// This device's own changes coming back in the log, each building on the logged heads
    /// before it (the usual case): their place in the log is all they add, since the document
    /// already holds them, so it is not even loaded. False, with nothing done, for anything else
    /// (another device's change, a resolution, a change concurrent with logged ones, or one
    /// under this device's actor that it does not hold: someone else's change passed off as its
    /// own is applied, or refused, like any other).
    pub(super) fn fast_forward_own<E>(
        &self,
        ledger: &mut Ledger,
        key: &CacheKey,
        changes: &[(E, ChangeHeader)],
    ) -> Result<bool, StoreError> {
        let own = changes.iter().all(|(_, c)| {
            c.actor == self.actor
                && resolve::resolution_of(c.message.as_deref()).is_none()
                && !resolve::is_restoration(c.message.as_deref())
        });
        if !own || ledger.logged.heads.contains_key(key) {
            return Ok(false);
        }
        let Some(state) = self.logged_state(key)? else {
            return Ok(false);
        };
        // The last change is held when it is one of the document's heads, and the chain checked
        // below (each change built on the one before) makes the others its ancestors, which a
        // change's hash covers. Otherwise the document is loaded and tells.
        let held = changes
            .last()
            .is_some_and(|(_, last)| state.document().contains(&last.hash));
        if !held {
            return Ok(false);
        }
        let mut logged = state.logged();
        for (_, change) in changes {
            let deps: BTreeSet<&ChangeHash> = change.deps.iter().collect();
            if deps != logged.iter().collect() {
                return Ok(false);
            }
            logged = vec![change.hash];
        }
        ledger.logged.heads.insert(key.clone(), logged);
        ledger
            .logged
            .documents
            .insert(key.clone(), state.document());
        ledger.logged.unlogged.insert(key.clone());
        Ok(true)
    }

    /// Stages, with a local write, that the record has a change the relay has not logged back:
    /// its logged heads stay those before its first such change. `unlogged` holds the logged
    /// heads of records already written in the same batch.
    pub(super) fn stage_unlogged(
        &self,
        unlogged: &mut HashMap<CacheKey, Vec<ChangeHash>>,
        batch: &mut Batch,
        key: &CacheKey,
        staged: &Staged,
    ) -> Result<(), StoreError> {
        if staged.written.is_none() {
            return Ok(());
        }
        let logged = match unlogged.get(key) {
            Some(logged) => logged.clone(),
            // A record with no change before this write has no key to read (the bulk-import case).
            None if staged.before.is_empty() => Vec::new(),
            None => match self.logged_state(key)? {
                Some(state) => state.logged(),
                None => staged.before.clone(),
            },
        };
        let state = LoggedState::new(&logged, &staged.after);
        batch.put(
            keys::logged_heads(&key.0, &key.1),
            super::encode(&state, "logged heads")?,
        );
        unlogged.insert(key.clone(), logged);
        Ok(())
    }

    /// Takes in a record as a snapshot page brings it: its logged heads are the snapshot's
    /// (`logged`), its document's `document` (more when it holds changes of this device's the
    /// relay has not logged), and its conflict entries are the relay's, as they stand.
    pub(super) fn adopt_snapshot(
        &self,
        ledger: &mut Ledger,
        key: &CacheKey,
        logged: Vec<ChangeHash>,
        document: Vec<ChangeHash>,
        conflicts: Vec<Conflict>,
    ) -> Result<(), StoreError> {
        // Whether an `h` key is stored, so that `finish_ledger` removes one that is no longer
        // needed.
        if self.logged_state(key)?.is_some() {
            ledger.logged.unlogged.insert(key.clone());
        }
        ledger.logged.heads.insert(key.clone(), logged);
        ledger.logged.documents.insert(key.clone(), document);
        for conflict in conflicts {
            ledger.conflicts.adopt(&Stored(self), conflict)?;
        }
        Ok(())
    }

    /// Stages the relay's unique-value index in place of this device's: the holders of a page
    /// of values (a value no record holds is dropped), and its conflict entries of kind
    /// `unique` as the relay holds them. `replace` drops every value this device held first
    /// (the first page of the index).
    pub(super) fn adopt_unique_index(
        &self,
        ledger: &mut Ledger,
        values: &[ferry_proto::wire::UniqueHolders],
        conflicts: Vec<Conflict>,
        replace: bool,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        if replace {
            let all = keys::unique_value_prefix();
            let end = keys::prefix_end(&all);
            let mut start = all;
            loop {
                let page = self.kv.range(&start, &end, 1024)?;
                let Some((last, _)) = page.last() else {
                    break;
                };
                start = keys::after(last);
                for (key, _) in page {
                    batch.remove(key);
                }
            }
        }
        for entry in values {
            ferry_proto::validate_collection(&entry.value.collection, &self.options.limits)?;
            let holders: Holders = serde_json::from_slice(&entry.holders).map_err(|e| {
                StoreError::Snapshot(format!(
                    "the holders of a unique value of {} do not decode ({e})",
                    entry.value.collection
                ))
            })?;
            let key = keys::unique_value(
                &entry.value.collection,
                entry.value.constraint as usize,
                entry.value.value.as_bytes(),
            );
            if holders.records.is_empty() {
                batch.remove(key);
            } else {
                batch.put(key, to_json(&holders, "unique value holders")?);
            }
        }
        for conflict in conflicts {
            if conflict.kind != ConflictKind::Unique {
                return Err(StoreError::Snapshot(format!(
                    "the unique-value index holds conflict entry {} of kind {}",
                    conflict.id,
                    conflict.kind.as_str()
                )));
            }
            ledger.conflicts.adopt(&Stored(self), conflict)?;
        }
        Ok(())
    }

    /// Stages the unique values a record's logged state holds (`logged`: its logged heads), as
    /// a snapshot page brings it: where the log's later moves of its values start from.
    pub(super) fn stage_held(
        &self,
        key: &CacheKey,
        record: &mut Record,
        logged: &[ChangeHash],
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        let policy = self.options.policies.of(&key.0);
        if policy.unique.is_empty() {
            return Ok(());
        }
        let view = resolve::view_at(record.automerge(), Some(logged), policy);
        let held = resolve::unique_values(&view, policy);
        let stored = keys::unique_held(&key.0, &key.1);
        if held.is_empty() {
            batch.remove(stored);
        } else {
            batch.put(stored, to_json(&held, "unique values")?);
        }
        Ok(())
    }

    /// Stages what the ledger holds into the apply's batch.
    pub(super) fn finish_ledger(
        &self,
        ledger: &Ledger,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        let logged = &ledger.logged;
        for (key, heads) in &logged.heads {
            let h = keys::logged_heads(&key.0, &key.1);
            let document = logged.documents.get(key).map_or(&[][..], Vec::as_slice);
            let same: BTreeSet<&ChangeHash> = heads.iter().collect();
            if same == document.iter().collect() {
                // Everything the record holds is logged: the usual state needs no key.
                if logged.unlogged.contains(key) {
                    batch.remove(h);
                }
            } else {
                batch.put(
                    h,
                    super::encode(&LoggedState::new(heads, document), "logged heads")?,
                );
            }
        }
        let conflicts = &ledger.conflicts;
        for (conflict, found) in conflicts.entries() {
            let id = &conflict.id;
            batch.put(keys::conflict(id), to_json(conflict, "conflict")?);
            let mut flag = keys::record_conflicts(&conflict.collection, &conflict.record);
            flag.extend_from_slice(id.as_bytes());
            if conflict.status == ConflictStatus::Open {
                batch.put(keys::conflict_open(id), Vec::new());
                batch.put(flag, Vec::new());
            } else {
                batch.remove(keys::conflict_open(id));
                batch.remove(flag);
            }
            if found && let Some(change) = conflict.client.changes.first() {
                batch.put(keys::change_conflict(change), id.as_bytes().to_vec());
            }
        }
        for (key, held) in conflicts.held() {
            batch.put(
                keys::unique_held(&key.0, &key.1),
                to_json(held, "unique values")?,
            );
        }
        for (value, holders) in conflicts.holders() {
            let key = unique_value_key(value);
            if holders.records.is_empty() {
                batch.remove(key);
            } else {
                batch.put(key, to_json(holders, "unique value holders")?);
            }
        }
        let mut moves: BTreeMap<(Counter, ConflictKind, &str), (u64, u64)> = BTreeMap::new();
        for (counter, kind, collection, add) in conflicts.counters() {
            moves.entry((counter, kind, collection)).or_default().0 += add;
        }
        for ((counter, kind, collection), taken) in &ledger.forgotten {
            moves.entry((*counter, *kind, collection)).or_default().1 += taken;
        }
        for ((counter, kind, collection), (add, taken)) in moves {
            let key = keys::conflict_counter(counter.as_str(), kind.as_str(), collection);
            let now = self
                .kv
                .get(&key)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, u64::from_be_bytes);
            match now.saturating_add(add).saturating_sub(taken) {
                // A counter purges took back to nothing is not kept: no row of zeros.
                0 => batch.remove(key),
                value => batch.put(key, value.to_be_bytes().to_vec()),
            }
        }
        Ok(())
    }

    /// Resolves an open conflict by writing the chosen version as a local change (for a unique
    /// clash: keeping one record and deleting the other), which syncs like any write; every
    /// device marks the conflict resolved when that change comes back in the relay's log. The
    /// changes and the conflict's `resolving` note land in one atomic batch; durable after
    /// `flush`.
    pub fn resolve_conflict(
        &self,
        id: &str,
        take: Take,
        data: Option<Fields>,
    ) -> Result<ResolveOutcome, StoreError> {
        let now = self.clock.now_ms();
        let mut cache = self.lock_cache();
        let mut conflict = self
            .conflict(id)?
            .ok_or_else(|| StoreError::ConflictNotFound(id.to_owned()))?;
        let mut data = data;
        check_resolution(&conflict, take, data.as_ref(), &self.options.limits)?;
        if let Some(data) = &mut data {
            // The record `data` lands in: for a unique clash the kept one.
            let target = match (conflict.kind, take) {
                (ConflictKind::Unique, Take::Client) => &conflict.client.record,
                (ConflictKind::Unique, _) => &conflict.server.record,
                _ => &conflict.record,
            };
            self.options.keyring.seal_fields(
                &self.options.policies.of(&conflict.collection).encrypted,
                &conflict.collection,
                target,
                &Fields::new(),
                data,
            )?;
        }
        let policy = self.options.policies.of(&conflict.collection).clone();
        let mut working = WorkingSet::default();
        let targets = resolution_targets(&conflict, take, data, |id| {
            let key = (conflict.collection.clone(), id.to_owned());
            let record = working.take(&key, &mut cache, || self.load_or_new(&key))?;
            Ok::<_, StoreError>(resolve::view(record, &policy))
        })?;
        let mut batch = Batch::default();
        let mut delta = CountDelta::default();
        let mut writes = Vec::new();
        let mut unlogged = HashMap::new();
        let mut change = None;
        for target in targets {
            let key = (conflict.collection.clone(), target.record.clone());
            let record = working.take(&key, &mut cache, || self.load_or_new(&key))?;
            let before = record.heads();
            let written = write_resolution(record, &target, id, take, now)?;
            if change.is_none() {
                change = written.as_ref().map(|w| w.change.hash().to_string());
            }
            let staged = Staged::of(record, before, written, &policy)?;
            self.stage_unlogged(&mut unlogged, &mut batch, &key, &staged)?;
            writes.push(self.finish(key, staged, now, &mut batch, &mut delta)?);
        }
        conflict.resolving = Some(Resolution {
            take: Some(take),
            device: Some(self.device_id.clone()),
            time: i64::try_from(now).unwrap_or(i64::MAX),
            change,
        });
        batch.put(keys::conflict(id), to_json(&conflict, "conflict")?);
        let mut queue = self.lock_queue();
        self.apply_queue_batch(&mut queue, batch, delta)?;
        drop(queue);
        for (key, record) in working.into_cacheable() {
            cache.put(key, record);
        }
        Ok(ResolveOutcome { conflict, writes })
    }
}

impl Store {
    /// Digests the logged heads of this device's records after `after` and up to `last`
    /// (through the end when `None`), as `ferry_proto::wire::HeadsHasher` does: the same
    /// digest the relay gives for the same range over the same log prefix. Records none of
    /// whose changes the relay logged yet are left out, as the relay has none of them.
    pub fn heads_digest(
        &self,
        after: Option<&RecordName>,
        last: Option<&RecordName>,
    ) -> Result<(u32, [u8; 32]), StoreError> {
        let mut start = match after {
            Some(name) => [keys::doc(&name.collection, &name.record), vec![0]].concat(),
            None => keys::DOC_ALL.to_vec(),
        };
        let end = match last {
            Some(name) => [keys::doc(&name.collection, &name.record), vec![0]].concat(),
            None => keys::prefix_end(keys::DOC_ALL),
        };
        let mut hasher = HeadsHasher::default();
        loop {
            let page = self.kv.range(&start, &end, 256)?;
            let Some((final_key, _)) = page.last() else {
                break;
            };
            start = [final_key.as_slice(), &[0]].concat();
            for (key, _) in &page {
                let collection = keys::doc_collection(key)?;
                if !self.syncs(collection) {
                    continue;
                }
                let id = keys::doc_id(key, keys::doc_prefix(collection).len())?;
                let cache_key = (collection.to_owned(), id.to_owned());
                let logged = match self.logged_state(&cache_key)? {
                    Some(state) => state.logged(),
                    None => self
                        .with_record(collection, id, |r| r.heads())?
                        .unwrap_or_default(),
                };
                if logged.is_empty() {
                    continue;
                }
                let mut heads: Vec<[u8; 32]> = logged.iter().map(|h| h.0).collect();
                hasher.record(collection, id, &mut heads);
            }
        }
        Ok(hasher.finish())
    }
}

/// The records a resolution writes, and what each becomes, given what each record shows now
/// (`current`, by record id).
pub fn resolution_targets<E>(
    conflict: &Conflict,
    take: Take,
    data: Option<Fields>,
    mut current: impl FnMut(&str) -> Result<resolve::View, E>,
) -> Result<Vec<Target>, E> {
    if conflict.kind == ConflictKind::Unique {
        let (server, client) = (&conflict.server.record, &conflict.client.record);
        let (keep, drop) = match take {
            Take::Server | Take::Merge => (server, client),
            Take::Client => (client, server),
        };
        let kept = current(keep)?;
        let dropped = current(drop)?;
        // As for one record, `data` is set over the merged fields.
        let fields = match take {
            Take::Merge => {
                let mut merged = dropped.fields.clone();
                merged.extend(kept.fields.clone());
                merged.extend(data.unwrap_or_default());
                merged
            }
            _ => kept.fields.clone(),
        };
        // The dropped record first: when two devices resolved the clash at once, each
        // record shows the later resolution once it is logged, so the later resolution's
        // kept record can only come alive after its other record is gone, and the two
        // resolutions never make both records live (a new clash) in between.
        return Ok(vec![
            Target::of(drop, dropped.fields.clone(), true, &dropped),
            Target::of(keep, fields, false, &kept),
        ]);
    }
    let now = current(&conflict.record)?;
    let side = match take {
        Take::Server => Some(&conflict.server),
        Take::Client => Some(&conflict.client),
        Take::Merge => None,
    };
    let mut fields = if now.is_live() {
        now.fields.clone()
    } else {
        side.map_or_else(|| conflict.client.fields.clone(), |s| s.fields.clone())
    };
    let deleted = side.is_some_and(|s| s.deleted);
    match (take, data) {
        (Take::Merge, Some(data)) => fields.extend(data),
        (_, _) if conflict.kind == ConflictKind::UpdateUpdate => {
            for field in &conflict.fields {
                let value = match take {
                    Take::Server => field.server.clone(),
                    _ => field.client.clone(),
                };
                set_path(&mut fields, &field.path, value);
            }
        }
        _ => {}
    }
    Ok(vec![Target::of(&conflict.record, fields, deleted, &now)])
}

/// Whether `take` (with `data`) may resolve `conflict`: it is open and not being resolved here
/// already, `data` is valid fields, and a merge of one record brings them.
pub fn check_resolution(
    conflict: &Conflict,
    take: Take,
    data: Option<&Fields>,
    limits: &Limits,
) -> Result<(), StoreError> {
    if conflict.status != ConflictStatus::Open || conflict.resolving.is_some() {
        return Err(StoreError::ConflictSettled {
            id: conflict.id.clone(),
            status: if conflict.resolving.is_some() {
                "resolved on this device (waiting to sync)"
            } else {
                conflict.status.as_str()
            },
        });
    }
    if let Some(data) = data {
        validate_fields(data, limits)?;
    }
    if take == Take::Merge && data.is_none() && conflict.kind != ConflictKind::Unique {
        return Err(StoreError::MergeNeedsData(conflict.id.clone()));
    }
    Ok(())
}

/// Writes one target of a resolution of conflict `id` to its record, as the change every device
/// recognises as that resolution when it reaches the log. On error the record is rolled back.
pub fn write_resolution(
    record: &mut Record,
    target: &Target,
    id: &str,
    take: Take,
    now: u64,
) -> Result<Option<Written>, StoreError> {
    let message = resolution_message(target.operation.as_str(), id, take.as_str());
    Ok(record
        .materialize(
            &target.fields,
            target.deleted,
            target.operation,
            Some((id, message)),
            now,
        )
        .inspect_err(|_| record.rollback())?)
}

/// The value of a record's `h` key.
#[derive(Serialize, Deserialize)]
struct LoggedState {
    /// The heads of the record's changes the relay has logged back.
    logged: Vec<[u8; 32]>,
    /// The heads of its document (some changes not logged yet).
    document: Vec<[u8; 32]>,
}

impl LoggedState {
    fn new(logged: &[ChangeHash], document: &[ChangeHash]) -> Self {
        LoggedState {
            logged: logged.iter().map(|h| h.0).collect(),
            document: document.iter().map(|h| h.0).collect(),
        }
    }

    fn logged(&self) -> Vec<ChangeHash> {
        self.logged.iter().copied().map(ChangeHash).collect()
    }

    fn document(&self) -> Vec<ChangeHash> {
        self.document.iter().copied().map(ChangeHash).collect()
    }
}

/// What one record becomes in a resolution.
pub struct Target {
    pub record: String,
    fields: Fields,
    deleted: bool,
    operation: Operation,
}

impl Target {
    fn of(record: &str, fields: Fields, deleted: bool, now: &resolve::View) -> Self {
        let operation = if deleted {
            Operation::Delete
        } else if now.is_live() {
            Operation::Update
        } else {
            Operation::Create
        };
        Target {
            record: record.to_owned(),
            fields,
            deleted,
            operation,
        }
    }
}

/// Sets (or with `None` removes) the value at `path` (field names and list indexes).
fn set_path(fields: &mut Fields, path: &[Value], value: Option<Value>) {
    let Some((Value::String(first), rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match value {
            Some(v) => {
                fields.insert(first.clone(), v);
            }
            None => {
                fields.remove(first);
            }
        }
        return;
    }
    let mut slot = match fields.get_mut(first) {
        Some(v) => v,
        None => return,
    };
    for (i, step) in rest.iter().enumerate() {
        let last = i + 1 == rest.len();
        slot = match (slot, step) {
            (Value::Object(map), Value::String(k)) if last => {
                match value {
                    Some(v) => {
                        map.insert(k.clone(), v);
                    }
                    None => {
                        map.remove(k);
                    }
                }
                return;
            }
            (Value::Array(items), Value::Number(n)) if last => {
                if let (Some(slot), Some(v)) = (
                    n.as_u64()
                        .and_then(|n| items.get_mut(usize::try_from(n).ok()?)),
                    value,
                ) {
                    *slot = v;
                }
                return;
            }
            (Value::Object(map), Value::String(k)) => match map.get_mut(k) {
                Some(v) => v,
                None => return,
            },
            (Value::Array(items), Value::Number(n)) => {
                match n
                    .as_u64()
                    .and_then(|n| items.get_mut(usize::try_from(n).ok()?))
                {
                    Some(v) => v,
                    None => return,
                }
            }
            _ => return,
        };
    }
}

fn to_json<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        what,
        detail: e.to_string(),
    })
}
