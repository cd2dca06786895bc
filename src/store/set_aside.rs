//! A record's old history set aside after a bootstrap from a page whose document the relay
//! flattened (PROTOCOL.md, section 5.8), until the relay has answered every upload of it that
//! was waiting: which of them it logged is known only from those answers.
//!
//! Owns the `r` keys: the old document, its changes that were waiting, and the answers met so
//! far. What the relay refused as built on the ended history is then written again on the new
//! one, as a rebase met in the log would write it (`sync`); what it logged is in the new history
//! already, or comes back in the log beside it. Must not touch the upload queue's states other
//! than completing the entries such a write carries.

use super::kv::Batch;
use super::{CacheKey, CountDelta, Store, StoreError, decode, encode, keys};
use crate::record::{Record, change_header};
use automerge::{Change, ChangeHash};
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
