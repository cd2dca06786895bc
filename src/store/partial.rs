//! Partial sync on the device (PROTOCOL.md, section 5.9): which collections this device syncs
//! (`sync.collections`, all when empty), remembered in the store so that adding a collection
//! later is noticed, and the backfill that follows: the device reads the relay's log from the
//! start again, passing over the entries of the collections it already held up to where it had
//! read them, so the added ones arrive whole and nothing is applied twice.
//!
//! Owns: the `msynced_collections` and `mbackfill` meta keys and the decisions above. Must not
//! touch: the session (the engine tells it the collections), documents, the queue.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::kv::Batch;
use super::sync::RELAY_CURSOR;
use super::{Store, StoreError, keys};

/// The log entries a backfill passes over: those of `held` collections up to `through` (where
/// the device had read the log when collections were added), which it applied already.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backfill {
    pub through: u64,
    pub held: BTreeSet<String>,
}

impl Backfill {
    /// Whether the entry at `seq` of `collection` was applied before the backfill began.
    pub fn covers(&self, seq: u64, collection: &str) -> bool {
        seq <= self.through && self.held.contains(collection)
    }
}

impl Store {
    /// Whether this device syncs `collection`.
    pub fn syncs(&self, collection: &str) -> bool {
        self.options.syncs(collection)
    }

    /// The collections this device syncs, for its sessions to name (empty: every one).
    pub fn synced_collections(&self) -> Vec<String> {
        self.options
            .synced_collections
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// The backfill under way, if collections were added and the log is not read past where
    /// the device had read it then.
    pub fn backfill(&self) -> Result<Option<Backfill>, StoreError> {
        match self.kv.get(keys::META_BACKFILL)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(super::decode(&bytes, "backfill")?)),
        }
    }

    /// Stages the end of the backfill once the log is read to `cursor`.
    pub(super) fn stage_backfill_done(
        &self,
        backfill: Option<&Backfill>,
        cursor: u64,
        batch: &mut Batch,
    ) {
        if backfill.is_some_and(|b| cursor >= b.through) {
            batch.remove(keys::META_BACKFILL.to_vec());
        }
    }

    /// Compares the collections this store was opened to sync with those it synced before, and
    /// starts a backfill when some were added: the cursor goes back to the start of the log.
    /// Durable with the next flush.
    pub(super) fn note_synced_collections(&self) -> Result<(), StoreError> {
        let now = self.options.synced_collections.clone();
        let before: Option<Option<BTreeSet<String>>> = match self.kv.get(keys::META_SYNCED)? {
            None => None,
            Some(bytes) => Some(super::decode(&bytes, "synced collections")?),
        };
        if before.as_ref() == Some(&now) {
            return Ok(());
        }
        let mut batch = Batch::default();
        batch.put(
            keys::META_SYNCED.to_vec(),
            super::encode(&now, "synced collections")?,
        );
        // A store that never noted its collections synced all of them (or is new): nothing was
        // left out that it now wants.
        let Some(Some(held)) = before else {
            return Ok(self.kv.apply(batch)?);
        };
        let added = now.as_ref().is_none_or(|now| !now.is_subset(&held));
        let cursor = self.sync_cursor()?;
        if !added || cursor == 0 {
            return Ok(self.kv.apply(batch)?);
        }
        // An unfinished backfill keeps what it knew: its held collections were read to its
        // `through`, and nothing else was.
        let backfill = match self.backfill()? {
            Some(unfinished) => unfinished,
            None => Backfill {
                through: cursor,
                held,
            },
        };
        batch.put(
            keys::META_BACKFILL.to_vec(),
            super::encode(&backfill, "backfill")?,
        );
        batch.put(keys::cursor(RELAY_CURSOR), 0u64.to_be_bytes().to_vec());
        // A bootstrap the device was in the middle of starts again too.
        batch.remove(keys::cursor(super::snapshot::SNAPSHOT_CURSOR));
        batch.remove(keys::cursor(super::snapshot::UNIQUE_INDEX_CURSOR));
        self.kv.apply(batch)?;
        tracing::info!(
            synced = ?now,
            through = backfill.through,
            "collections added to sync: reading the relay's log from the start again"
        );
        Ok(())
    }
}
