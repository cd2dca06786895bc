//! The store's change feed: one entry per change a record took (a local write, a change from
//! the relay's log, a record a snapshot page brought), numbered in the order the store committed
//! them and written in the same atomic batch as the change. An app that was down asks for the
//! changes after the last number it saw (`subscribe` with `since`) and misses nothing; a
//! subscriber that fell behind the live events reads the gap from here instead of being told to
//! re-read everything.
//!
//! Owns: the `f` keys and their numbering, reading them in order, and pruning the oldest.
//! Must not touch: what a change does to a record (the write and apply paths stage an entry
//! here for each change they make), sockets or subscriptions.

use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;

use super::kv::Batch;
use super::{Store, StoreError, keys};
use ferry_proto::Operation;

/// Whether an app on this device made a change or sync brought it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Local,
    Remote,
}

/// A change a record took, as the feed keeps it and subscribers hear of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeedChange {
    /// Its place in the feed: numbers only grow (a change that did not land leaves a gap).
    pub seq: u64,
    pub collection: String,
    pub id: String,
    pub operation: Operation,
    pub heads: Vec<String>,
    /// The device that wrote the change.
    pub device: String,
    pub origin: Origin,
}

/// The feed's first and last kept numbers (`first > last`: it is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedBounds {
    pub first: u64,
    pub last: u64,
}

impl Store {
    /// Stages `change` in `batch` under the next number, which it returns (and sets in it).
    pub(crate) fn stage_feed(
        &self,
        batch: &mut Batch,
        mut change: FeedChange,
    ) -> Result<u64, StoreError> {
        let seq = self.next_feed_seq.fetch_add(1, Ordering::Relaxed);
        change.seq = seq;
        batch.put(keys::feed(seq), super::encode(&change, "feed entry")?);
        Ok(seq)
    }

    /// Up to `limit` changes after `after`, in order.
    pub fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<FeedChange>, StoreError> {
        let start = keys::feed(after.saturating_add(1));
        self.kv
            .range(&start, &keys::prefix_end(keys::FEED), limit)?
            .into_iter()
            .map(|(_, value)| super::decode(&value, "feed entry"))
            .collect()
    }

    /// The first change kept and the last one numbered.
    pub fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        let last = self.next_feed_seq.load(Ordering::Relaxed).saturating_sub(1);
        let first = match self
            .kv
            .range(keys::FEED, &keys::prefix_end(keys::FEED), 1)?
            .first()
        {
            Some((key, _)) => keys::seq_of(key, keys::FEED.len())?,
            None => last.saturating_add(1),
        };
        Ok(FeedBounds { first, last })
    }

    /// Drops the oldest changes so that at most `keep` remain, `batch_size` at a time;
    /// returns how many went. Durable with the next flush.
    pub fn prune_feed(&self, keep: u64, batch_size: usize) -> Result<u64, StoreError> {
        let bounds = self.feed_bounds()?;
        let kept = bounds.last.saturating_add(1).saturating_sub(bounds.first);
        if kept <= keep {
            return Ok(0);
        }
        let below = keys::feed(bounds.last.saturating_add(1).saturating_sub(keep));
        let mut removed = 0;
        loop {
            let old = self.kv.range(keys::FEED, &below, batch_size.max(1))?;
            if old.is_empty() {
                return Ok(removed);
            }
            let mut batch = Batch::default();
            for (key, _) in &old {
                batch.remove(key.clone());
            }
            removed += old.len() as u64;
            self.kv.apply(batch)?;
        }
    }
}
