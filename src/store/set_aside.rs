//! A record's old history set aside after a bootstrap from a page whose document the relay
//! flattened (PROTOCOL.md, section 5.8), or after the relay answered a change of it as logged
//! before it purged the record (`drop_ended_uploads`), until the relay has answered every upload
//! of it that was waiting: which of them it logged is known only from those answers.
//!
//! Owns the `r` keys: the old document, its changes that were waiting, and the answers met so
//! far. What the relay refused as built on the ended history is then written again on the new
//! one, as a rebase met in the log would write it (`sync`); what it logged is in the new history
//! already, or comes back in the log beside it. Must not touch the upload queue's states other
//! than completing the entries such a write carries.

use super::kv::Batch;
use super::sync::RemoteApplied;
use super::{CacheKey, CountDelta, Store, StoreError, decode, encode, keys};
use crate::record::{Record, change_header};
use crate::resolve;
use automerge::{Change, ChangeHash};
use ferry_proto::Operation;
use ferry_proto::wire::{ChangeOutcome, ChangeResult, ErrorCode};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// What the relay answered to one of the set-aside changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Answer {
    /// Logged at this seq (stored now, or a duplicate of one logged before).
    Logged(u64),
    /// Refused as built on the history the flatten entry ended: written again on the new one.
    EndedHistory,
    /// Refused for another reason: the entry failed as any refused change does.
    Refused,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct SetAside {
    /// The head the page's flattened document was taken at.
    head: u64,
    /// The record's document before the bootstrap, saved.
    document: Vec<u8>,
    /// Its changes that were waiting for the relay's answer then.
    waiting: Vec<[u8; 32]>,
    /// The answers met since, by change.
    answers: Vec<([u8; 32], Answer)>,
}

impl Store {
    /// Sets `old`'s history aside in `batch`: its changes in `waiting` are answered by the
    /// relay before anything of them is written on the record's new history.
    pub(super) fn set_aside(
        &self,
        batch: &mut Batch,
        key: &CacheKey,
        head: u64,
        old: &mut Record,
        waiting: &[ChangeHash],
    ) -> Result<(), StoreError> {
        let set_aside = SetAside {
            head,
            document: old.save(),
            waiting: waiting.iter().map(|h| h.0).collect(),
            answers: Vec::new(),
        };
        batch.put(
            keys::set_aside(&key.0, &key.1),
            encode(&set_aside, "set-aside history")?,
        );
        Ok(())
    }

    /// Whether any record's history is set aside (one range read).
    fn has_set_aside(&self) -> Result<bool, StoreError> {
        let end = keys::prefix_end(keys::SET_ASIDE);
        Ok(!self.kv.range(keys::SET_ASIDE, &end, 1)?.is_empty())
    }

    fn set_asides(&self) -> Result<Vec<(CacheKey, SetAside)>, StoreError> {
        let end = keys::prefix_end(keys::SET_ASIDE);
        let mut start = keys::SET_ASIDE.to_vec();
        let mut all = Vec::new();
        loop {
            let page = self.kv.range(&start, &end, 256)?;
            let Some((last, _)) = page.last() else {
                return Ok(all);
            };
            start = keys::after(last);
            for (k, bytes) in page {
                let Some(record) = keys::record_of(keys::SET_ASIDE, &k) else {
                    continue;
                };
                all.push((record, decode(&bytes, "set-aside history")?));
            }
        }
    }

    /// The changes of `results` that are set aside: entry id to (record, change). Empty, after
    /// one range read, when nothing is.
    pub(super) fn set_aside_uploads(
        &self,
        results: &[ChangeResult],
    ) -> Result<HashMap<u64, (CacheKey, ChangeHash)>, StoreError> {
        let mut found = HashMap::new();
        if !self.has_set_aside()? {
            return Ok(found);
        }
        let asides: HashMap<CacheKey, HashSet<[u8; 32]>> = self
            .set_asides()?
            .into_iter()
            .map(|(key, aside)| (key, aside.waiting.into_iter().collect()))
            .collect();
        for result in results {
            let Some(stored) = self.kv.get(&keys::queue(result.entry))? else {
                continue;
            };
            let entry = self.with_change(decode(&stored, "queue entry")?)?;
            let key = (entry.model_name.clone(), entry.object_id.clone());
            let hash = change_header(&entry.data)?.hash;
            if asides.get(&key).is_some_and(|w| w.contains(&hash.0)) {
                found.insert(result.entry, (key, hash));
            }
        }
        Ok(found)
    }

    /// Notes the relay's answers to set-aside changes (`set_aside_uploads` of `results`).
    /// Durable with the next flush; an answer lost to a crash is asked for again, as its entry
    /// stays waiting.
    pub(super) fn note_set_aside_answers(
        &self,
        results: &[ChangeResult],
        uploads: &HashMap<u64, (CacheKey, ChangeHash)>,
    ) -> Result<(), StoreError> {
        if uploads.is_empty() {
            return Ok(());
        }
        let mut asides: HashMap<CacheKey, SetAside> = self.set_asides()?.into_iter().collect();
        let mut answered = HashSet::new();
        for result in results {
            let Some((key, hash)) = uploads.get(&result.entry) else {
                continue;
            };
            let answer = match &result.outcome {
                ChangeOutcome::Stored { seq } | ChangeOutcome::Duplicate { seq } => {
                    Answer::Logged(*seq)
                }
                ChangeOutcome::Rejected {
                    code: ErrorCode::RecordPurged | ErrorCode::MissingDependencies,
                    ..
                } => Answer::EndedHistory,
                ChangeOutcome::Rejected { code, .. } if code.is_retryable() => continue,
                ChangeOutcome::Rejected { .. } => Answer::Refused,
            };
            if let Some(aside) = asides.get_mut(key) {
                aside.answers.retain(|(h, _)| *h != hash.0);
                aside.answers.push((hash.0, answer));
                answered.insert(key.clone());
            }
        }
        let mut batch = Batch::default();
        for (key, aside) in asides.iter().filter(|(key, _)| answered.contains(*key)) {
            batch.put(
                keys::set_aside(&key.0, &key.1),
                encode(aside, "set-aside history")?,
            );
        }
        self.kv.apply(batch)?;
        Ok(())
    }

    /// Settles every set-aside history the relay has answered whole: the changes it logged
    /// after the page are in the record's document by now (met in the log), and what it
    /// refused as built on the ended history is written again on the new one, as one local
    /// change whose batch completes their entries and drops the set-aside history. Returns how
    /// many records took such a change.
    pub fn settle_set_asides(&self) -> Result<usize, StoreError> {
        if !self.has_set_aside()? {
            return Ok(0);
        }
        let mut written = 0;
        let cursor = self.sync_cursor()?;
        for (key, aside) in self.set_asides()? {
            let answered: HashMap<[u8; 32], Answer> = aside.answers.iter().copied().collect();
            if aside.waiting.iter().any(|h| !answered.contains_key(h)) {
                continue;
            }
            // A change logged after the page is met in the log before anything builds on it.
            let pending_in_log = answered
                .values()
                .any(|a| matches!(a, Answer::Logged(seq) if *seq > aside.head && *seq > cursor));
            if pending_in_log {
                continue;
            }
            let ended: HashSet<ChangeHash> = answered
                .iter()
                .filter(|(_, a)| **a == Answer::EndedHistory)
                .map(|(h, _)| ChangeHash(*h))
                .collect();
            let mut cache = self.lock_cache();
            let mut batch = Batch::default();
            let mut delta = CountDelta::default();
            batch.remove(keys::set_aside(&key.0, &key.1));
            let mut current = match cache.pop(&key) {
                Some(record) => Some(record),
                None => self.load(&key.0, &key.1)?,
            };
            let mut wrote = false;
            if !ended.is_empty()
                && let Some(current) = current.as_mut()
            {
                let mut old = self.parse(&key.0, &aside.document)?;
                let before = heads_without(&old.changes_after(&[])?, &ended);
                let mut seen = old.fork_at(&before)?;
                wrote = self.write_again(
                    &key,
                    (&mut seen, &mut old),
                    Some(&ended),
                    current,
                    self.clock.now_ms(),
                    &mut batch,
                    &mut delta,
                )?;
            }
            let mut queue = self.lock_queue();
            self.apply_queue_batch(&mut queue, batch, delta)?;
            drop(queue);
            if let Some(current) = current {
                cache.put(key, current);
            }
            written += usize::from(wrote);
        }
        Ok(written)
    }

    /// Drops from their records the changes the relay answered `Duplicate` at a seq this
    /// device's download went past without meeting them as logged: the relay logged them, then
    /// ended their history (a purge the log was compacted past), and their first answer was lost
    /// before this device bootstrapped, so the page's history was merged beside them
    /// (PROTOCOL.md, section 5.8). They leave the document with what this device built on them;
    /// what of that still waits for an answer is set aside (`set_aside`), to be written again on
    /// the record's history once the relay refuses it. Returns how many records lost changes.
    pub(super) fn drop_ended_uploads(&self, results: &[ChangeResult]) -> Result<usize, StoreError> {
        if !results
            .iter()
            .any(|r| matches!(r.outcome, ChangeOutcome::Duplicate { .. }))
        {
            return Ok(0);
        }
        // Under the cache lock, as an apply moves the cursor and the logged heads together.
        let mut cache = self.lock_cache();
        let cursor = self.sync_cursor()?;
        let pages = self.snapshot_pages()?;
        let mut answered: HashMap<CacheKey, HashSet<ChangeHash>> = HashMap::new();
        for result in results {
            let ChangeOutcome::Duplicate { seq } = result.outcome else {
                continue;
            };
            let Some(stored) = self.kv.get(&keys::queue(result.entry))? else {
                continue;
            };
            let entry = self.with_change(decode(&stored, "queue entry")?)?;
            let key = (entry.model_name.clone(), entry.object_id.clone());
            let past = pages
                .as_ref()
                .and_then(|p| p.taken(&key.0, &key.1))
                .map_or(cursor, |head| head.max(cursor));
            if seq > past {
                continue;
            }
            // Without an `h` key every change the record holds was met in the log.
            if self.never_logged(&key)?.is_none() {
                continue;
            }
            answered
                .entry(key)
                .or_default()
                .insert(change_header(&entry.data)?.hash);
        }
        let mut dropped = 0;
        for (key, answered) in answered {
            let mut old = match cache.pop(&key) {
                Some(record) => record,
                None => match self.load(&key.0, &key.1)? {
                    Some(record) => record,
                    None => continue,
                },
            };
            let logged = self.logged_heads_of(&key, &mut old)?;
            let unlogged = old.changes_after(&logged)?;
            let mut gone: HashSet<ChangeHash> = unlogged
                .iter()
                .map(Change::hash)
                .filter(|h| answered.contains(h))
                .collect();
            if gone.is_empty() {
                cache.put(key, old);
                continue;
            }
            // What builds on them, in causal order as the document gives its changes.
            for change in &unlogged {
                if change.deps().iter().any(|d| gone.contains(d)) {
                    gone.insert(change.hash());
                }
            }
            let kept = heads_without(&old.changes_after(&[])?, &gone);
            let mut fresh = if kept.is_empty() {
                self.new_record(&key.0)
            } else {
                old.fork_at(&kept)?
            };
            let waiting: Vec<ChangeHash> = self
                .uncompleted_entries(&key)?
                .into_iter()
                .map(|entry| self.with_change(entry))
                .map(|entry| Ok(change_header(&entry?.data)?.hash))
                .collect::<Result<Vec<_>, StoreError>>()?
                .into_iter()
                .filter(|h| gone.contains(h))
                .collect();
            let mut batch = Batch::default();
            if !waiting.is_empty() {
                self.set_aside(&mut batch, &key, cursor, &mut old, &waiting)?;
            }
            let policy = self.options.policies.of(&key.0);
            let deleted = kept.is_empty() || resolve::is_deleted(&mut fresh, policy);
            if kept.is_empty() {
                batch.remove(keys::doc(&key.0, &key.1));
            } else {
                batch.put(keys::doc(&key.0, &key.1), fresh.save());
                self.stage_view(&mut batch, &key, &mut fresh)?;
            }
            self.stage_document_heads(&key, &kept, &mut batch)?;
            let mut shown = RemoteApplied {
                collection: key.0.clone(),
                id: key.1.clone(),
                operation: if deleted {
                    Operation::Delete
                } else {
                    Operation::Update
                },
                deleted,
                heads: kept.iter().map(ChangeHash::to_string).collect(),
                device: String::new(),
                seq: 0,
            };
            shown.stage_feed(self, &mut batch)?;
            let mut queue = self.lock_queue();
            self.apply_queue_batch(&mut queue, batch, CountDelta::default())?;
            drop(queue);
            self.feed_landed(std::iter::once(shown.seq));
            tracing::warn!(collection = %key.0, record = %key.1, changes = gone.len(),
                "changes of this device's the relay logged before it purged the record left it");
            if !kept.is_empty() {
                cache.put(key, fresh);
            }
            dropped += 1;
        }
        Ok(dropped)
    }
}

/// The heads of `changes` once `left_out` (and so what builds on them) is taken away.
fn heads_without(changes: &[Change], left_out: &HashSet<ChangeHash>) -> Vec<ChangeHash> {
    let kept: Vec<&Change> = changes
        .iter()
        .filter(|c| !left_out.contains(&c.hash()))
        .collect();
    let depended: HashSet<ChangeHash> = kept.iter().flat_map(|c| c.deps().to_vec()).collect();
    kept.iter()
        .map(|c| c.hash())
        .filter(|h| !depended.contains(h))
        .collect()
}
