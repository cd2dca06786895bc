//! The embedded relay storage: one ordered keyspace behind the `Kv` trait (sled in a data
//! directory, or in memory), holding what earlier versions wrote in the same layout.
//!
//! Owns: the key layout below, the encoding of values, each space's head in memory (read from
//! the log on first use; sled is opened by one process, so no one else appends), and turning a
//! commit into one `Kv` batch. Must not touch: what the relay decides (`relay::store`,
//! `relay::accounts`).
//!
//! Log keys (a space name holds no control characters, so `\0` ends it; collection names and
//! record ids hold none either; every text part ends with `\0`):
//! - `l{space}\0{last seq u64 BE}\x01` → a block of consecutive log entries (collection,
//!   record, origin device, change bytes) of one append, ending at that seq, compressed together
//!   (`log_blocks`); `l{space}\0{seq u64 BE}` → one log entry, as earlier versions stored it
//!   (read as before; they sort among the blocks by seq).
//! - `h{space}\0{collection}\0{record}\0{change hash, 32 bytes}` → `{seq u64 BE}`: the dedup
//!   index, per record (two records may hold byte-identical changes), also used to check that a
//!   change's dependencies are already in the record's log.
//! - `b{space}\0{collection}\0{record}\0` → the record's base: Automerge chunks (a saved document,
//!   or the record's first change), loadable as they are.
//! - `t{space}\0{collection}\0{record}\0{seq u64 BE}` → empty: a change appended to the record
//!   since its base was written; its bytes are in the log at `seq`.
//! - `r{space}\0{collection}\0{record}\0` → the record's logged heads, 32 bytes each, sorted.
//! - `c{space}\0{conflict kind}\0{collection}\0` → `{count u64 BE}`: conflicts found in the space.
//! - `s{space}\0` → `{bytes u64 BE}`: bytes of the space's log entries (the account's quota); a
//!   log kept before this count existed is measured once, by reading it.
//! - `u{space}\0{collection}\0{constraint index}\0{value JSON}\0` → the records holding that
//!   unique value, in the order they took it, and the open clashes over it (JSON `Holders`; a
//!   plain list of records where written before clashes were kept);
//!   `v{space}\0{collection}\0{record}\0` → the unique values a record holds (JSON).
//! - `x{space}\0{conflict id}\0` → a conflict entry (JSON); `o{space}\0{conflict id}\0` → empty:
//!   the conflict is open; `k{space}\0{change hash, hex}\0` → the id of the conflict that change
//!   brought; `y{space}\0{collection}\0{record}\0{conflict id}\0` → empty: the conflict is on
//!   that record (what a snapshot sends with the record's document).
//! - `g{space}\0` → empty: the conflict entries and unique index cover the space's whole log
//!   (logs kept before the relay kept them lack it until rebuilt); `i{space}\0` → empty: so
//!   does the per-record index of the entries (`y`), which earlier versions did not keep: a
//!   space without it counts as not complete, and is rebuilt once.
//! - `z{space}\0` → `{seq u64 BE}`: the compaction horizon, the log's entries up to it dropped
//!   (their `h` keys kept); `n{space}\0{time ms u64 BE}` → `{seq u64 BE}`: a time mark, the
//!   log's head at that time, while it lies above the horizon.
//! - `d{space}\0{seq u64 BE}` → a tombstone note (postcard `Tombstone`): the change at `seq` left
//!   its record deleted; `p{space}\0{collection}\0{record}\0` → `{seq u64 BE}`: the purge
//!   marker, the seq of the purge entry (an entry with an empty change, no `h` key) that last
//!   ended the record's history.
//! - `w{space}\0` → the space's web actor (the actor its HTTP writes are made under); spaces
//!   whose web actor was kept by earlier versions have it under `M{space}\0` + `mdevice`.
//!
//! `!layout` → the layout version ("2": log entries in blocks); a store without it holds one
//! entry a key, as earlier versions wrote it.
//!
//! Account keys (upper-case prefixes):
//! - `A{account}` → `AccountRecord`; `D{device}` → `DeviceRecord`;
//!   `E{SHA-256 of the code's secret}` → `EnrolmentRecord` (removed when used);
//!   `F{family id}` → `auth::token::Family`; `K{kid}` → `StoredKey`;
//!   `P{account}` → the account's password, an Argon2id PHC string.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::log_blocks::{self, StoredEntry};
use super::{
    AccountRecord, AccountStorage, AccountWrite, Append, DeviceRecord, EnrolmentRecord, Holders,
    LogCompaction, LogStorage, RelayConflictCount, StorageError, StoredKey, Tombstone, UniqueValue,
    UniqueValues,
};
use crate::auth::token::Family;
use crate::record::chunk_hash_bytes;
use crate::resolve::{Conflict, ConflictKind, ConflictStatus};
use crate::store::keys::{after as after_key, prefix_end};
use crate::store::kv::{Batch, Kv};
use ferry_proto::wire::{LogEntry, RecordName};

/// A unique value's holders as stored: earlier versions kept the records only.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredHolders {
    Now(Holders),
    Records(Vec<String>),
}

impl StoredHolders {
    fn into_holders(self) -> Holders {
        match self {
            StoredHolders::Now(holders) => holders,
            StoredHolders::Records(records) => Holders {
                records,
                open: Vec::new(),
            },
        }
    }
}

pub struct KvStorage {
    kv: Arc<dyn Kv>,
    /// Each space's head, read from the log on first use; its lock serialises commits to it.
    spaces: Mutex<HashMap<String, Arc<Mutex<u64>>>>,
    /// Serialises account commits, whose checks (an account is new, a code unused) must hold
    /// when their batch lands.
    accounts: Mutex<()>,
}

/// The key of the store's layout version, `LAYOUT`. A store without it was written before log
/// entries were kept in blocks (one entry a key), which this version reads as it is.
const LAYOUT_KEY: &[u8] = b"!layout";
/// Log entries in blocks (`log_blocks`).
const LAYOUT: &[u8] = b"2";

impl KvStorage {
    /// The storage over `kv` as a relay serves it: a layout this version cannot read is refused,
    /// and the store is marked with this version's layout before anything is written to it, so
    /// that later versions know what they read.
    pub fn open(kv: Arc<dyn Kv>) -> Result<Self, StorageError> {
        match kv.get(LAYOUT_KEY)? {
            Some(found) if found == LAYOUT => {}
            Some(found) => {
                return Err(StorageError::LayoutTooNew {
                    found: String::from_utf8_lossy(&found).into_owned(),
                    known: String::from_utf8_lossy(LAYOUT).into_owned(),
                });
            }
            None => {
                let mut batch = Batch::default();
                batch.put(LAYOUT_KEY.to_vec(), LAYOUT.to_vec());
                kv.apply(batch)?;
                kv.flush()?;
            }
        }
        Ok(KvStorage::new(kv))
    }

    pub fn new(kv: Arc<dyn Kv>) -> Self {
        KvStorage {
            kv,
            spaces: Mutex::new(HashMap::new()),
            accounts: Mutex::new(()),
        }
    }

    fn space(&self, space: &str) -> Result<Arc<Mutex<u64>>, StorageError> {
        let mut spaces = lock(&self.spaces);
        if let Some(state) = spaces.get(space) {
            return Ok(state.clone());
        }
        let prefix = key(b'l', &[space]);
        let last = match self.kv.last_key(&prefix, &prefix_end(&prefix))? {
            Some(k) => log_blocks::log_key_seq(&k, prefix.len())
                .map(|(seq, _)| seq)
                .ok_or_else(|| corrupt("log key", "sequence of the wrong length"))?,
            None => 0,
        };
        // A log compacted through its head keeps no entry: its horizon is its head.
        let head = last.max(self.horizon_of(space)?);
        let state = Arc::new(Mutex::new(head));
        spaces.insert(space.to_owned(), state.clone());
        Ok(state)
    }

    fn horizon_of(&self, space: &str) -> Result<u64, StorageError> {
        self.counter(&key(b'z', &[space]))
    }

    /// The space's tail entries, `(record, seq)`, in key order, from `start` on (a `t` key of
    /// the space), up to `limit`; with the key to go on from.
    #[allow(clippy::type_complexity)]
    fn tail_entries(
        &self,
        space: &str,
        start: &[u8],
        limit: usize,
    ) -> Result<(Vec<(super::RecordKey, u64)>, Option<Vec<u8>>), StorageError> {
        let prefix = key(b't', &[space]);
        let rows = self.kv.range(start, &prefix_end(&prefix), limit)?;
        let next = rows.last().map(|(k, _)| after_key(k));
        let entries = rows
            .iter()
            .map(|(k, _)| {
                let bad = || corrupt("tail key", String::from_utf8_lossy(k));
                let rest = k.get(prefix.len()..).ok_or_else(bad)?;
                let mut parts = rest.splitn(3, |&b| b == 0);
                let (Some(collection), Some(record), Some(seq)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad());
                };
                let seq = <[u8; 8]>::try_from(seq)
                    .map(u64::from_be_bytes)
                    .map_err(|_| bad())?;
                let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad());
                Ok(((text(collection)?, text(record)?), seq))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((entries, next))
    }

    /// Drops the space's log entries up to `horizon`, a part at a time (each part one batch,
    /// its bytes taken off the quota under the space's commit lock, so appends go on between
    /// parts): what a crash leaves lies below the horizon, and the next compaction drops it.
    /// The block holding both sides of the horizon is written again with the entries above it.
    fn drop_entries(
        &self,
        space: &str,
        state: &Mutex<u64>,
        horizon: u64,
    ) -> Result<(), StorageError> {
        let prefix = key(b'l', &[space]);
        let below = seq_key(b'l', &[space], horizon.saturating_add(1));
        loop {
            let _commits = lock(state);
            let mut rows = self.kv.range(&prefix, &below, 512)?;
            if rows.is_empty() {
                rows = self.kv.range(&below, &prefix_end(&prefix), 1)?;
            }
            let mut batch = Batch::default();
            let mut dropped = 0u64;
            for (k, v) in rows {
                let entries = log_blocks::entries(&k, &v, prefix.len())?;
                if entries.first().is_none_or(|(seq, _)| *seq > horizon) {
                    continue;
                }
                let mut above = Vec::new();
                for (seq, entry) in entries {
                    if seq > horizon {
                        above.push(entry);
                        continue;
                    }
                    dropped = dropped.saturating_add(log_blocks::quota_bytes(&entry));
                    // A base that names this entry (a record with no change since it was
                    // created) takes the change itself before the entry goes.
                    let base = key(b'b', &[space, &entry.collection, &entry.record]);
                    if let Some(stored) = self.kv.get(&base)?
                        && logged_base(&stored) == Some(seq)
                    {
                        batch.put(base, entry.change.into_owned());
                    }
                }
                if above.is_empty() {
                    batch.remove(k);
                } else {
                    batch.put(k, log_blocks::pack(&above)?);
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            let before = self.log_bytes(space)?;
            batch.put(
                key(b's', &[space]),
                before.saturating_sub(dropped).to_be_bytes().to_vec(),
            );
            self.kv.apply(batch)?;
        }
    }

    /// The entry logged at `seq`, read from the value holding it: the first at or after its key.
    fn entry_at(
        &self,
        space: &str,
        seq: u64,
    ) -> Result<Option<StoredEntry<'static>>, StorageError> {
        let prefix = key(b'l', &[space]);
        let holding = self
            .kv
            .range(&seq_key(b'l', &[space], seq), &prefix_end(&prefix), 1)?;
        let Some((k, v)) = holding.into_iter().next() else {
            return Ok(None);
        };
        log_blocks::entry_at(&k, &v, prefix.len(), seq)
    }

    /// Removes what the space keeps of the record's history: base, tail, logged heads, unique
    /// values and conflict entries, whose counts are taken off `counted` (counter key → the
    /// count now).
    fn purge_record(
        &self,
        batch: &mut Batch,
        counted: &mut HashMap<Vec<u8>, u64>,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<(), StorageError> {
        batch.remove(key(b'b', &[space, collection, record]));
        batch.remove(key(b'r', &[space, collection, record]));
        batch.remove(key(b'v', &[space, collection, record]));
        let tails = key(b't', &[space, collection, record]);
        for (k, _) in self.kv.range(&tails, &prefix_end(&tails), usize::MAX)? {
            batch.remove(k);
        }
        let on_record = key(b'y', &[space, collection, record]);
        for (k, _) in self
            .kv
            .range(&on_record, &prefix_end(&on_record), usize::MAX)?
        {
            let id = k
                .get(on_record.len()..k.len().saturating_sub(1))
                .and_then(|id| std::str::from_utf8(id).ok())
                .ok_or_else(|| corrupt("record conflict key", String::from_utf8_lossy(&k)))?;
            // Its count goes with it: the counts are those of the entries kept, as on a device
            // that bootstraps from a snapshot after the purge.
            if let Some(conflict) = self.conflict(space, id)? {
                let counter = key(b'c', &[space, conflict.kind.as_str(), &conflict.collection]);
                let before = counted
                    .get(&counter)
                    .copied()
                    .map_or_else(|| self.counter(&counter), Ok)?;
                counted.insert(counter, before.saturating_sub(1));
            }
            batch.remove(key(b'x', &[space, id]));
            batch.remove(key(b'o', &[space, id]));
            batch.remove(k);
        }
        Ok(())
    }

    fn counter(&self, key: &[u8]) -> Result<u64, StorageError> {
        match self.kv.get(key)? {
            Some(value) => be_u64(&value, "counter"),
            None => Ok(0),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StorageError> {
        match self.kv.get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(what, e)),
        }
    }

    fn decoded<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StorageError> {
        match self.kv.get(key)? {
            None => Ok(None),
            Some(bytes) => decode(&bytes, what).map(Some),
        }
    }

    /// Every value under the one-byte `prefix`, decoded.
    fn all<T: serde::de::DeserializeOwned>(
        &self,
        prefix: u8,
        what: &'static str,
    ) -> Result<Vec<T>, StorageError> {
        self.kv
            .range(&[prefix], &[prefix.saturating_add(1)], usize::MAX)?
            .iter()
            .map(|(_, v)| decode(v, what))
            .collect()
    }

    /// The one batch of an append. A compaction's base and tail removals come after the created
    /// bases and tail keys of the same append, which they replace.
    fn batch(&self, space: &str, append: Append) -> Result<Batch, StorageError> {
        let mut batch = Batch::default();
        // A new record's base is its first change, which its log entry holds too: the base
        // names that entry rather than repeat the change (`BASE_IN_LOG`).
        let mut creating: HashMap<(&str, &str), (u64, &[u8])> = HashMap::new();
        for (seq, entry) in (append.after.saturating_add(1)..).zip(&append.entries) {
            creating
                .entry((entry.collection.as_str(), entry.record.as_str()))
                .or_insert((seq, entry.change.as_slice()));
        }
        for ((collection, record), base) in &append.created {
            let value = match creating.get(&(collection.as_str(), record.as_str())) {
                Some(&(seq, change)) if change == base.as_slice() => base_in_log(seq),
                _ => base.clone(),
            };
            batch.put(key(b'b', &[space, collection, record]), value);
        }
        let first_seq = append.after.saturating_add(1);
        let stored: Vec<StoredEntry> = append
            .entries
            .iter()
            .map(|entry| StoredEntry {
                collection: entry.collection.as_str().into(),
                record: entry.record.as_str().into(),
                origin: entry.origin.as_str().into(),
                change: entry.change.as_slice().into(),
            })
            .collect();
        let log_bytes = stored
            .iter()
            .map(log_blocks::quota_bytes)
            .fold(0, u64::saturating_add);
        for block in log_blocks::blocks(&stored) {
            let last = first_seq.saturating_add(block.end.saturating_sub(1) as u64);
            let value = log_blocks::pack(stored.get(block).unwrap_or_default())?;
            batch.put(block_key(space, last), value);
        }
        for (seq, entry) in (first_seq..).zip(&append.entries) {
            // A purge entry is no change: nothing to deduplicate.
            if !entry.change.is_empty() {
                batch.put(
                    hash_key(space, &entry.collection, &entry.record, &entry.hash),
                    seq.to_be_bytes().to_vec(),
                );
            }
        }
        let mut counted = HashMap::new();
        for ((collection, record), seq) in &append.purged {
            self.purge_record(&mut batch, &mut counted, space, collection, record)?;
            batch.put(
                key(b'p', &[space, collection, record]),
                seq.to_be_bytes().to_vec(),
            );
        }
        for (counter, value) in counted {
            match value {
                0 => batch.remove(counter),
                value => batch.put(counter, value.to_be_bytes().to_vec()),
            }
        }
        for tombstone in &append.tombstones {
            batch.put(
                seq_key(b'd', &[space], tombstone.seq),
                encode(tombstone, "tombstone note")?,
            );
        }
        for seq in &append.tombstones_done {
            batch.remove(seq_key(b'd', &[space], *seq));
        }
        for ((collection, record), seq) in &append.tails {
            batch.put(
                seq_key(b't', &[space, collection, record], *seq),
                Vec::new(),
            );
        }
        for compaction in append.compactions {
            let (collection, record) = &compaction.record;
            batch.put(key(b'b', &[space, collection, record]), compaction.base);
            for seq in compaction.tail {
                batch.remove(seq_key(b't', &[space, collection, record], seq));
            }
        }
        for flattened in &append.flattened {
            let (collection, record) = &flattened.record;
            for seq in &flattened.tail {
                batch.remove(seq_key(b't', &[space, collection, record], *seq));
            }
            batch.put(
                key(b'p', &[space, collection, record]),
                flattened.seq.to_be_bytes().to_vec(),
            );
        }
        for ((collection, record), heads) in append.heads {
            batch.put(key(b'r', &[space, &collection, &record]), heads.concat());
        }
        for (value, holders) in &append.holders {
            let k = unique_key(space, value);
            if holders.records.is_empty() {
                batch.remove(k);
            } else {
                batch.put(k, to_json(holders, "unique value holders")?);
            }
        }
        for conflict in &append.conflict_entries {
            let id = conflict.id.as_str();
            batch.put(
                key(b'x', &[space, id]),
                to_json(conflict, "conflict entry")?,
            );
            batch.put(
                key(b'y', &[space, &conflict.collection, &conflict.record, id]),
                Vec::new(),
            );
            if conflict.status == ConflictStatus::Open {
                batch.put(key(b'o', &[space, id]), Vec::new());
            } else {
                batch.remove(key(b'o', &[space, id]));
            }
        }
        if append.conflicts_complete {
            batch.put(key(b'g', &[space]), Vec::new());
            batch.put(key(b'i', &[space]), Vec::new());
        }
        for (change, id) in &append.conflict_changes {
            batch.put(key(b'k', &[space, change]), id.as_bytes().to_vec());
        }
        for ((collection, record), held) in &append.held {
            batch.put(
                key(b'v', &[space, collection, record]),
                to_json(held, "unique values")?,
            );
        }
        for (kind, collection, found) in &append.conflicts {
            let counter = key(b'c', &[space, kind.as_str(), collection]);
            let before = self.counter(&counter)?;
            batch.put(
                counter,
                before.saturating_add(*found).to_be_bytes().to_vec(),
            );
        }
        if log_bytes > 0 {
            let before = self.log_bytes(space)?;
            batch.put(
                key(b's', &[space]),
                before.saturating_add(log_bytes).to_be_bytes().to_vec(),
            );
        }
        Ok(batch)
    }
}

impl LogStorage for KvStorage {
    fn head(&self, space: &str) -> Result<u64, StorageError> {
        let state = self.space(space)?;
        let head = *lock(&state);
        Ok(head)
    }

    fn append(&self, space: &str, append: Append) -> Result<(), StorageError> {
        let state = self.space(space)?;
        let mut head = lock(&state);
        if *head != append.after {
            return Err(StorageError::HeadMoved {
                staged: append.after,
                head: *head,
            });
        }
        let next = append.next_seq();
        let batch = self.batch(space, append)?;
        if batch.is_empty() {
            return Ok(());
        }
        self.kv.apply(batch)?;
        // The entries are in the log from here on, flushed or not: the next append must number
        // after them, never over them.
        *head = next.saturating_sub(1);
        drop(head);
        Ok(self.kv.flush()?)
    }

    fn flush(&self) -> Result<(), StorageError> {
        Ok(self.kv.flush()?)
    }

    fn change_seq(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        hash: &[u8; 32],
    ) -> Result<Option<u64>, StorageError> {
        match self.kv.get(&hash_key(space, collection, record, hash))? {
            Some(value) => be_u64(&value, "change index entry").map(Some),
            None => Ok(None),
        }
    }

    fn record_changes(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Vec<([u8; 32], u64)>, StorageError> {
        let prefix = key(b'h', &[space, collection, record]);
        let mut changes = self
            .kv
            .range(&prefix, &prefix_end(&prefix), usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let hash = k
                    .get(prefix.len()..)
                    .and_then(|h| <[u8; 32]>::try_from(h).ok())
                    .ok_or_else(|| corrupt("change index key", "a hash of the wrong length"))?;
                Ok((hash, be_u64(&v, "change index entry")?))
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        changes.sort_unstable_by_key(|&(_, seq)| seq);
        Ok(changes)
    }

    fn change_at(&self, space: &str, seq: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .entry_at(space, seq)?
            .map(|entry| entry.change.into_owned()))
    }

    fn read_log(
        &self,
        space: &str,
        after: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogEntry>, StorageError> {
        let max_changes = max_changes.max(1);
        let prefix = key(b'l', &[space]);
        let end = prefix_end(&prefix);
        let mut start = seq_key(b'l', &[space], after.saturating_add(1));
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        'scan: while entries.len() < max_changes {
            // A value holds up to a block of entries (one, if an earlier version stored it).
            let values = (max_changes - entries.len()).div_ceil(16).min(64);
            let page = self.kv.range(&start, &end, values)?;
            let Some((last, _)) = page.last() else { break };
            start = after_key(last);
            for (k, v) in page {
                for (seq, entry) in log_blocks::entries(&k, &v, prefix.len())? {
                    if seq <= after {
                        continue;
                    }
                    if !entries.is_empty() && bytes.saturating_add(entry.change.len()) > max_bytes {
                        break 'scan;
                    }
                    bytes = bytes.saturating_add(entry.change.len());
                    entries.push(LogEntry {
                        seq,
                        collection: entry.collection.into_owned(),
                        record: entry.record.into_owned(),
                        change: entry.change.into_owned(),
                    });
                    if entries.len() == max_changes {
                        break 'scan;
                    }
                }
            }
        }
        Ok(entries)
    }

    fn base(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(stored) = self.kv.get(&key(b'b', &[space, collection, record]))? else {
            return Ok(None);
        };
        let Some(seq) = logged_base(&stored) else {
            return Ok(Some(stored));
        };
        match self.entry_at(space, seq)? {
            Some(entry) => Ok(Some(entry.change.into_owned())),
            None => Err(first_change_gone(collection, record, seq)),
        }
    }

    /// Bases naming their log entries are read a block at a time: the records of a snapshot
    /// page were mostly created together, so their first changes share blocks, each unpacked
    /// once rather than once a record.
    fn bases_of(
        &self,
        space: &str,
        records: &[super::RecordKey],
    ) -> Result<HashMap<super::RecordKey, Vec<u8>>, StorageError> {
        let mut bases = HashMap::with_capacity(records.len());
        let mut in_log: Vec<(u64, &super::RecordKey)> = Vec::new();
        for record in records {
            let (collection, id) = record;
            let Some(stored) = self.kv.get(&key(b'b', &[space, collection, id]))? else {
                continue;
            };
            match logged_base(&stored) {
                Some(seq) => in_log.push((seq, record)),
                None => {
                    bases.insert(record.clone(), stored);
                }
            }
        }
        in_log.sort_unstable_by_key(|&(seq, _)| seq);
        let prefix = key(b'l', &[space]);
        let end = prefix_end(&prefix);
        let mut rest = in_log.as_slice();
        while let Some(&(first, _)) = rest.first() {
            let holding = self.kv.range(&seq_key(b'l', &[space], first), &end, 1)?;
            let holding = holding.into_iter().next();
            let last = holding
                .as_ref()
                .and_then(|(k, _)| log_blocks::log_key_seq(k, prefix.len()))
                .map_or(first, |(last, _)| last);
            let covered = rest.partition_point(|&(seq, _)| seq <= last);
            let (group, after) = rest.split_at(covered.max(1));
            let seqs: Vec<u64> = group.iter().map(|&(seq, _)| seq).collect();
            let changes = match &holding {
                Some((k, v)) => log_blocks::changes_at(k, v, prefix.len(), &seqs)?,
                None => Vec::new(),
            };
            for &(seq, (collection, id)) in group {
                let found = changes
                    .binary_search_by_key(&seq, |(found, _)| *found)
                    .ok()
                    .and_then(|at| changes.get(at));
                let Some((_, change)) = found else {
                    return Err(first_change_gone(collection, id, seq));
                };
                bases.insert((collection.clone(), id.clone()), change.clone());
            }
            rest = after;
        }
        Ok(bases)
    }

    /// A base naming its log entry is answered from the dedup index (the entry's hash is the
    /// one logged at that seq), so the block holding the entry is not unpacked.
    fn base_change_hash(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<[u8; 32]>, StorageError> {
        let Some(stored) = self.kv.get(&key(b'b', &[space, collection, record]))? else {
            return Ok(None);
        };
        let Some(seq) = logged_base(&stored) else {
            return Ok(chunk_hash_bytes(&stored));
        };
        let logged = self.record_changes(space, collection, record)?;
        if let Some((hash, _)) = logged.iter().find(|(_, at)| *at == seq) {
            return Ok(Some(*hash));
        }
        Ok(self
            .entry_at(space, seq)?
            .and_then(|entry| chunk_hash_bytes(&entry.change)))
    }

    fn has_base(&self, space: &str, collection: &str, record: &str) -> Result<bool, StorageError> {
        Ok(self
            .kv
            .get(&key(b'b', &[space, collection, record]))?
            .is_some())
    }

    fn tail(&self, space: &str, collection: &str, record: &str) -> Result<Vec<u64>, StorageError> {
        let prefix = key(b't', &[space, collection, record]);
        self.kv
            .range(&prefix, &prefix_end(&prefix), usize::MAX)?
            .iter()
            .map(|(k, _)| seq_at(k, prefix.len()))
            .collect()
    }

    fn record_heads(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<Vec<[u8; 32]>>, StorageError> {
        let Some(bytes) = self.kv.get(&key(b'r', &[space, collection, record]))? else {
            return Ok(None);
        };
        let (heads, rest) = bytes.as_chunks::<32>();
        if !rest.is_empty() {
            return Err(corrupt(
                "record heads",
                format!("{} bytes, not a multiple of 32", bytes.len()),
            ));
        }
        Ok(Some(heads.to_vec()))
    }

    fn unique_values(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<UniqueValues>, StorageError> {
        self.json(&key(b'v', &[space, collection, record]), "unique values")
    }

    fn unique_holders(&self, space: &str, value: &UniqueValue) -> Result<Holders, StorageError> {
        let stored: Option<StoredHolders> =
            self.json(&unique_key(space, value), "unique value index")?;
        Ok(stored.map(StoredHolders::into_holders).unwrap_or_default())
    }

    fn unique_holders_after(
        &self,
        space: &str,
        collection: &str,
        constraint: usize,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Holders)>, StorageError> {
        let prefix = key(b'u', &[space, collection, &constraint.to_string()]);
        let start = match after {
            Some(value) => after_key(&key(
                b'u',
                &[space, collection, &constraint.to_string(), value],
            )),
            None => prefix.clone(),
        };
        self.kv
            .range(&start, &prefix_end(&prefix), limit)?
            .into_iter()
            .map(|(k, bytes)| {
                // The value part ends with the `\0` every key part ends with.
                let value = k
                    .get(prefix.len()..k.len().saturating_sub(1))
                    .and_then(|v| String::from_utf8(v.to_vec()).ok())
                    .ok_or_else(|| corrupt("unique value key", "the value is not text"))?;
                let stored: StoredHolders =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt("unique value index", e))?;
                Ok((value, stored.into_holders()))
            })
            .collect()
    }

    fn conflict(&self, space: &str, id: &str) -> Result<Option<Conflict>, StorageError> {
        self.json(&key(b'x', &[space, id]), "conflict entry")
    }

    fn conflicts(
        &self,
        space: &str,
        open_only: bool,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Conflict>, StorageError> {
        let kind = if open_only { b'o' } else { b'x' };
        let prefix = key(kind, &[space]);
        let start = match after {
            Some(id) => after_key(&key(kind, &[space, id])),
            None => prefix.clone(),
        };
        let rows = self.kv.range(&start, &prefix_end(&prefix), limit)?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, value) in rows {
            let conflict = if open_only {
                let id = k
                    .get(prefix.len()..k.len().saturating_sub(1))
                    .and_then(|id| std::str::from_utf8(id).ok())
                    .ok_or_else(|| corrupt("open conflict key", String::from_utf8_lossy(&k)))?;
                self.conflict(space, id)?
            } else {
                Some(serde_json::from_slice(&value).map_err(|e| corrupt("conflict entry", e))?)
            };
            out.extend(conflict);
        }
        Ok(out)
    }

    fn record_conflicts(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Vec<Conflict>, StorageError> {
        let prefix = key(b'y', &[space, collection, record]);
        let mut out = Vec::new();
        for (k, _) in self.kv.range(&prefix, &prefix_end(&prefix), usize::MAX)? {
            let id = k
                .get(prefix.len()..k.len().saturating_sub(1))
                .and_then(|id| std::str::from_utf8(id).ok())
                .ok_or_else(|| corrupt("record conflict key", String::from_utf8_lossy(&k)))?;
            out.extend(self.conflict(space, id)?);
        }
        Ok(out)
    }

    fn conflicts_complete(&self, space: &str) -> Result<bool, StorageError> {
        Ok(self.kv.get(&key(b'g', &[space]))?.is_some()
            && self.kv.get(&key(b'i', &[space]))?.is_some())
    }

    fn change_conflict(&self, space: &str, change: &str) -> Result<Option<String>, StorageError> {
        Ok(self
            .kv
            .get(&key(b'k', &[space, change]))?
            .map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    fn web_actor(&self, space: &str, candidate: &str) -> Result<String, StorageError> {
        let state = self.space(space)?;
        let _commits = lock(&state);
        let k = key(b'w', &[space]);
        if let Some(actor) = self.kv.get(&k)? {
            return Ok(String::from_utf8_lossy(&actor).into_owned());
        }
        let mut legacy = key(b'M', &[space]);
        legacy.extend_from_slice(crate::store::keys::META_DEVICE);
        let actor = match self.kv.get(&legacy)? {
            Some(actor) => String::from_utf8_lossy(&actor).into_owned(),
            None => candidate.to_owned(),
        };
        let mut batch = Batch::default();
        batch.put(k, actor.as_bytes().to_vec());
        self.kv.apply(batch)?;
        self.kv.flush()?;
        Ok(actor)
    }

    fn conflict_counts(&self, space: &str) -> Result<Vec<RelayConflictCount>, StorageError> {
        let prefix = key(b'c', &[space]);
        self.kv
            .range(&prefix, &prefix_end(&prefix), usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let bad = || corrupt("conflict counter key", String::from_utf8_lossy(&k));
                let rest = k
                    .get(prefix.len()..k.len().saturating_sub(1))
                    .ok_or_else(bad)?;
                let text = std::str::from_utf8(rest).map_err(|_| bad())?;
                let (kind, collection) = text.split_once('\0').ok_or_else(bad)?;
                let kind = ConflictKind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == kind)
                    .ok_or_else(bad)?;
                let detected = <[u8; 8]>::try_from(v.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| bad())?;
                Ok(RelayConflictCount {
                    kind,
                    collection: collection.to_owned(),
                    detected,
                })
            })
            .collect()
    }

    fn log_bytes(&self, space: &str) -> Result<u64, StorageError> {
        let counter = key(b's', &[space]);
        if let Some(value) = self.kv.get(&counter)? {
            return be_u64(&value, "counter");
        }
        let prefix = key(b'l', &[space]);
        let end = prefix_end(&prefix);
        let (mut start, mut total) = (prefix.clone(), 0u64);
        loop {
            let page = self.kv.range(&start, &end, 1024)?;
            let Some((last, _)) = page.last() else {
                return Ok(total);
            };
            start = after_key(last);
            for (k, v) in &page {
                total = log_blocks::entries(k, v, prefix.len())?
                    .iter()
                    .map(|(_, entry)| log_blocks::quota_bytes(entry))
                    .fold(total, u64::saturating_add);
            }
        }
    }

    fn collections(&self, space: &str) -> Result<Vec<(String, u64)>, StorageError> {
        let all = key(b'b', &[space]);
        let end = prefix_end(&all);
        let mut start = all.clone();
        let mut out = Vec::new();
        while let Some((k, _)) = self.kv.range(&start, &end, 1)?.pop() {
            let rest = k.get(all.len()..).unwrap_or_default();
            let name = rest.split(|&b| b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(name).into_owned();
            let prefix = key(b'b', &[space, &name]);
            let after_collection = prefix_end(&prefix);
            out.push((name, self.kv.count(&prefix, &after_collection)?));
            start = after_collection;
        }
        Ok(out)
    }

    fn records(
        &self,
        space: &str,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let prefix = key(b'b', &[space, collection]);
        let start = match after {
            Some(id) => after_key(&key(b'b', &[space, collection, id])),
            None => prefix.clone(),
        };
        self.kv
            .range(&start, &prefix_end(&prefix), limit)?
            .into_iter()
            .map(|(k, _)| {
                // The id part ends with the `\0` every key part ends with.
                k.get(prefix.len()..k.len().saturating_sub(1))
                    .and_then(|id| String::from_utf8(id.to_vec()).ok())
                    .ok_or_else(|| corrupt("record key", "the id is not text"))
            })
            .collect()
    }

    fn record_names(
        &self,
        space: &str,
        after: Option<&RecordName>,
        limit: usize,
    ) -> Result<Vec<RecordName>, StorageError> {
        let all = key(b'b', &[space]);
        let start = match after {
            Some(name) => after_key(&key(b'b', &[space, &name.collection, &name.record])),
            None => all.clone(),
        };
        self.kv
            .range(&start, &prefix_end(&all), limit)?
            .into_iter()
            .map(|(k, _)| {
                let mut parts = k.get(all.len()..).unwrap_or_default().split(|&b| b == 0);
                let (Some(collection), Some(record)) = (parts.next(), parts.next()) else {
                    return Err(corrupt(
                        "record key",
                        "a base key without collection and record",
                    ));
                };
                Ok(RecordName {
                    collection: String::from_utf8_lossy(collection).into_owned(),
                    record: String::from_utf8_lossy(record).into_owned(),
                })
            })
            .collect()
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.kv.size_on_disk()?)
    }

    fn horizon(&self, space: &str) -> Result<u64, StorageError> {
        self.horizon_of(space)
    }

    fn tails_through(
        &self,
        space: &str,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<super::RecordKey>, StorageError> {
        let mut records: Vec<super::RecordKey> = Vec::new();
        let mut start = Some(key(b't', &[space]));
        while let Some(from) = start.take() {
            if records.len() >= limit {
                break;
            }
            let (entries, next) = self.tail_entries(space, &from, 4096)?;
            start = next;
            for (record, at) in entries {
                if at <= seq && records.last() != Some(&record) && records.len() < limit {
                    records.push(record);
                }
            }
        }
        Ok(records)
    }

    fn time_marks(&self, space: &str) -> Result<Vec<(u64, u64)>, StorageError> {
        let prefix = key(b'n', &[space]);
        self.kv
            .range(&prefix, &prefix_end(&prefix), usize::MAX)?
            .iter()
            .map(|(k, v)| Ok((seq_at(k, prefix.len())?, be_u64(v, "time mark")?)))
            .collect()
    }

    fn compact_log(&self, space: &str, step: LogCompaction) -> Result<(), StorageError> {
        let state = self.space(space)?;
        let horizon = {
            let head = lock(&state);
            if *head != step.after {
                return Err(StorageError::HeadMoved {
                    staged: step.after,
                    head: *head,
                });
            }
            let before = self.horizon_of(space)?;
            let horizon = step.horizon.min(step.after).max(before);
            let mut batch = Batch::default();
            let mut saved = std::collections::HashSet::new();
            for compaction in step.bases {
                let (collection, record) = &compaction.record;
                batch.put(key(b'b', &[space, collection, record]), compaction.base);
                for seq in compaction.tail {
                    batch.remove(seq_key(b't', &[space, collection, record], seq));
                    saved.insert((compaction.record.clone(), seq));
                }
            }
            if horizon > before {
                let mut start = Some(key(b't', &[space]));
                while let Some(from) = start.take() {
                    let (entries, next) = self.tail_entries(space, &from, 4096)?;
                    start = next;
                    if let Some((record, seq)) = entries
                        .into_iter()
                        .find(|entry| entry.1 <= horizon && !saved.contains(entry))
                    {
                        return Err(StorageError::Uncovered {
                            horizon,
                            record,
                            seq,
                        });
                    }
                }
                batch.put(key(b'z', &[space]), horizon.to_be_bytes().to_vec());
            }
            let marks = key(b'n', &[space]);
            if let Some((time, at)) = step.mark
                && at > horizon
            {
                batch.put(seq_key(b'n', &[space], time), at.to_be_bytes().to_vec());
            }
            for (k, v) in self.kv.range(&marks, &prefix_end(&marks), usize::MAX)? {
                if be_u64(&v, "time mark")? <= horizon {
                    batch.remove(k);
                }
            }
            self.kv.apply(batch)?;
            horizon
        };
        self.drop_entries(space, &state, horizon)?;
        Ok(self.kv.flush()?)
    }

    fn tombstones(&self, space: &str, limit: usize) -> Result<Vec<Tombstone>, StorageError> {
        let prefix = key(b'd', &[space]);
        self.kv
            .range(&prefix, &prefix_end(&prefix), limit)?
            .iter()
            .map(|(_, v)| decode::<Tombstone>(v, "tombstone note"))
            .collect()
    }

    fn purged_at(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<u64>, StorageError> {
        match self.kv.get(&key(b'p', &[space, collection, record]))? {
            Some(value) => be_u64(&value, "purge marker").map(Some),
            None => Ok(None),
        }
    }

    fn reclaim_space(&self) -> Result<(u64, u64), StorageError> {
        let before = self.kv.size_on_disk()?;
        // sled keeps the segments of removed pairs until it happens to clean them, so a log
        // compacted away frees nothing on disk by itself; a copy of the live pairs does. Worth
        // its pause only when most of the files are garbage.
        if before
            <= self
                .kv
                .live_bytes()?
                .saturating_mul(2)
                .saturating_add(RECLAIM_FLOOR_BYTES)
        {
            return Ok((before, before));
        }
        self.kv.compact()?;
        Ok((before, self.kv.size_on_disk()?))
    }
}

/// Below this much garbage on disk the relay's store is not rewritten.
const RECLAIM_FLOOR_BYTES: u64 = 64 << 20;

impl AccountStorage for KvStorage {
    fn account(&self, name: &str) -> Result<Option<AccountRecord>, StorageError> {
        self.decoded(&account_key(b'A', name.as_bytes()), "account")
    }

    fn accounts(&self) -> Result<Vec<AccountRecord>, StorageError> {
        self.all(b'A', "account")
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StorageError> {
        self.all(b'D', "device")
    }

    fn enrolment(&self, code_hash: &[u8; 32]) -> Result<Option<EnrolmentRecord>, StorageError> {
        self.decoded(&account_key(b'E', code_hash), "enrolment code")
    }

    fn family(&self, id: &str) -> Result<Option<Family>, StorageError> {
        self.decoded(&account_key(b'F', id.as_bytes()), "token family")
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StorageError> {
        self.decoded(&account_key(b'D', id.as_bytes()), "device")
    }

    fn families(&self) -> Result<Vec<Family>, StorageError> {
        self.all(b'F', "token family")
    }

    fn signing_keys(&self) -> Result<Vec<StoredKey>, StorageError> {
        self.all(b'K', "signing key")
    }

    fn password(&self, account: &str) -> Result<Option<String>, StorageError> {
        Ok(self
            .kv
            .get(&account_key(b'P', account.as_bytes()))?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn write_accounts(&self, writes: Vec<AccountWrite>) -> Result<(), StorageError> {
        let _writing = lock(&self.accounts);
        let mut batch = Batch::default();
        for write in writes {
            match write {
                AccountWrite::CreateAccount(record) => {
                    let k = account_key(b'A', record.name.as_bytes());
                    if self.kv.get(&k)?.is_some() {
                        return Err(StorageError::AccountExists(record.name));
                    }
                    batch.put(k, encode(&record, "account")?);
                }
                AccountWrite::Device(record) => {
                    batch.put(
                        account_key(b'D', record.device.as_bytes()),
                        encode(&record, "device")?,
                    );
                }
                AccountWrite::RemoveDevice(device) => {
                    batch.remove(account_key(b'D', device.as_bytes()));
                }
                AccountWrite::Enrolment { code_hash, record } => {
                    batch.put(account_key(b'E', &code_hash), encode(&record, "enrolment")?);
                }
                AccountWrite::ConsumeEnrolment(code_hash) => {
                    let k = account_key(b'E', &code_hash);
                    if self.kv.get(&k)?.is_none() {
                        return Err(StorageError::EnrolmentUsed);
                    }
                    batch.remove(k);
                }
                AccountWrite::Family(family) => {
                    batch.put(
                        account_key(b'F', family.id.as_bytes()),
                        encode(&family, "token family")?,
                    );
                }
                AccountWrite::RemoveFamily(id) => {
                    batch.remove(account_key(b'F', id.as_bytes()));
                }
                AccountWrite::SigningKey(stored) => {
                    batch.put(
                        account_key(b'K', stored.kid.as_bytes()),
                        encode(&stored, "signing key")?,
                    );
                }
                AccountWrite::RemoveSigningKey(kid) => {
                    batch.remove(account_key(b'K', kid.as_bytes()));
                }
                AccountWrite::Password { account, phc } => {
                    batch.put(account_key(b'P', account.as_bytes()), phc.into_bytes());
                }
            }
        }
        self.kv.apply(batch)?;
        Ok(self.kv.flush()?)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every holder leaves the data whole before anything can panic (a head is set after its
    // batch lands).
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn corrupt(what: &'static str, detail: impl ToString) -> StorageError {
    StorageError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

/// The first byte of a base that is a log entry's change (then the entry's seq, 8 bytes
/// big-endian). A saved Automerge document or change starts with its magic bytes, never 0.
const BASE_IN_LOG: u8 = 0;

fn base_in_log(seq: u64) -> Vec<u8> {
    let mut value = vec![BASE_IN_LOG];
    value.extend_from_slice(&seq.to_be_bytes());
    value
}

/// A base names a log entry the log does not hold.
fn first_change_gone(collection: &str, record: &str, seq: u64) -> StorageError {
    corrupt(
        "document",
        format!(
            "{collection}/{record}'s document is its first change, log entry {seq}, which the \
             log no longer holds"
        ),
    )
}

/// The seq of the log entry a stored base names, if it names one.
fn logged_base(stored: &[u8]) -> Option<u64> {
    match stored.split_first() {
        Some((&BASE_IN_LOG, seq)) => <[u8; 8]>::try_from(seq).ok().map(u64::from_be_bytes),
        _ => None,
    }
}

/// What a key of this layout holds, by its first byte, as `ferry space` names it.
pub fn key_kind(key: &[u8]) -> &'static str {
    match key.first() {
        Some(b'l') => "log_entries",
        Some(b'h') => "dedup_index",
        Some(b'b') => "bases",
        Some(b't') => "tails",
        Some(b'r') => "logged_heads",
        Some(b'x' | b'o' | b'k' | b'y' | b'c' | b'g' | b'i') => "conflicts",
        Some(b'u' | b'v') => "unique_values",
        Some(b'd' | b'p') => "tombstones",
        Some(b'z' | b'n') => "compaction_marks",
        Some(b's' | b'w' | b'M' | b'!') => "space_metadata",
        Some(b'A' | b'D' | b'E' | b'F' | b'K' | b'P') => "accounts",
        _ => "other",
    }
}

/// `{kind}{part}\0{part}\0...`: each part ends with `\0`, so one part's keys are contiguous.
fn key(kind: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![kind];
    for part in parts {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k
}

/// What a damaged key of this layout held, in which space, and where: a log entry's seq, a
/// record's name.
pub(super) fn damaged(key: &[u8]) -> StorageError {
    let Some((&kind, rest)) = key.split_first() else {
        return named("value", "", "an empty key".into(), None);
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let parts = |b: &[u8]| -> Vec<String> {
        b.split(|&c| c == 0)
            .filter(|p| !p.is_empty())
            .map(text)
            .collect()
    };
    let what = match kind {
        b'l' => "log entry",
        b'b' => "document",
        b't' => "document's tail entry",
        b'r' => "record heads",
        b'h' => "change index entry",
        b'x' | b'y' | b'o' | b'k' | b'c' | b'g' | b'i' => "conflict data",
        b'v' | b'u' => "unique value",
        b's' => "log size",
        b'w' | b'M' => "web actor",
        b'z' => "compaction horizon",
        b'n' => "compaction time mark",
        b'd' => "tombstone note",
        b'p' => "purge marker",
        b'!' => "layout version",
        _ => "account data",
    };
    match kind {
        b'l' => {
            let space_len = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
            let space = text(rest.get(..space_len).unwrap_or_default());
            let position = match log_blocks::log_key_seq(rest, space_len.saturating_add(1)) {
                Some((seq, false)) => format!("seq {seq}"),
                Some((last, true)) => format!("the block of entries ending at seq {last}"),
                None => "an unreadable key".into(),
            };
            named(what, &space, position, None)
        }
        b't' | b'd' => match split_seq(rest) {
            Some((head, seq)) => {
                let mut names = parts(head);
                let space = if names.is_empty() {
                    String::new()
                } else {
                    names.remove(0)
                };
                let record = names.join("/");
                let position = if record.is_empty() {
                    format!("seq {seq}")
                } else {
                    format!("record {record}, seq {seq}")
                };
                let owner = (kind == b't').then(|| record_of(&names)).flatten();
                named(what, &space, position, owner)
            }
            None => named(what, &text(rest), "an unreadable key".into(), None),
        },
        b'a'..=b'z' => {
            let mut names = parts(rest);
            let space = if names.is_empty() {
                String::new()
            } else {
                names.remove(0)
            };
            // What a record's rebuild writes again: its document, heads and conflict index.
            let owner = matches!(kind, b'b' | b'r' | b'y')
                .then(|| record_of(&names))
                .flatten();
            named(what, &space, format!("key {}", names.join("/")), owner)
        }
        _ => named(
            what,
            "",
            format!("key {}", crate::store::kv::printable(key)),
            None,
        ),
    }
}

/// The record a key's parts after its space name: (collection, record id).
fn record_of(names: &[String]) -> Option<super::RecordKey> {
    match names {
        [collection, record, ..] => Some((collection.clone(), record.clone())),
        _ => None,
    }
}

/// The parts of a seq key and its seq: its last 8 bytes.
fn split_seq(key: &[u8]) -> Option<(&[u8], u64)> {
    let at = key.len().checked_sub(8)?;
    let seq = <[u8; 8]>::try_from(key.get(at..)?).ok()?;
    Some((key.get(..at)?, u64::from_be_bytes(seq)))
}

fn named(
    what: &'static str,
    space: &str,
    position: String,
    record: Option<super::RecordKey>,
) -> StorageError {
    StorageError::Damaged {
        what,
        space: space.to_owned(),
        position,
        record,
    }
}

fn seq_key(kind: u8, parts: &[&str], seq: u64) -> Vec<u8> {
    let mut k = key(kind, parts);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The key of a block of the space's log entries ending at `last` (`log_blocks`).
fn block_key(space: &str, last: u64) -> Vec<u8> {
    let mut k = seq_key(b'l', &[space], last);
    k.push(log_blocks::BLOCK_TAG);
    k
}

fn hash_key(space: &str, collection: &str, record: &str, hash: &[u8; 32]) -> Vec<u8> {
    let mut k = key(b'h', &[space, collection, record]);
    k.extend_from_slice(hash);
    k
}

fn unique_key(space: &str, value: &UniqueValue) -> Vec<u8> {
    key(
        b'u',
        &[
            space,
            &value.collection,
            &value.constraint.to_string(),
            &value.value,
        ],
    )
}

fn account_key(prefix: u8, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(prefix);
    k.extend_from_slice(name);
    k
}

fn seq_at(key: &[u8], prefix_len: usize) -> Result<u64, StorageError> {
    key.get(prefix_len..)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("log key", "sequence of the wrong length"))
}

fn be_u64(value: &[u8], what: &'static str) -> Result<u64, StorageError> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(what, format!("{} bytes instead of 8", value.len())))
}

fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StorageError> {
    postcard::to_stdvec(value).map_err(|e| StorageError::Encode {
        what,
        detail: e.to_string(),
    })
}

fn to_json<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| StorageError::Encode {
        what,
        detail: e.to_string(),
    })
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &'static str) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(what, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::storage::LoggedChange;
    use crate::store::kv::MemoryKv;

    const SPACE: &str = "team";

    fn change(seq: u64) -> Vec<u8> {
        format!("the change logged at seq {seq}, as bytes").into_bytes()
    }

    fn logged(seq: u64) -> LoggedChange {
        LoggedChange {
            collection: "Note".into(),
            record: format!("n{seq}"),
            origin: "device-a".into(),
            hash: [u8::try_from(seq).unwrap(); 32],
            change: change(seq),
        }
    }

    fn seqs(storage: &KvStorage, after: u64) -> Vec<u64> {
        let entries = storage.read_log(SPACE, after, 1000, usize::MAX).unwrap();
        for entry in &entries {
            assert_eq!(entry.change, change(entry.seq));
            assert_eq!(entry.record, format!("n{}", entry.seq));
        }
        entries.iter().map(|entry| entry.seq).collect()
    }

    /// The entry logged at `seq` as earlier versions stored it, one a key.
    fn alone(seq: u64) -> Vec<u8> {
        let entry = logged(seq);
        encode(
            &StoredEntry {
                collection: entry.collection.as_str().into(),
                record: entry.record.as_str().into(),
                origin: entry.origin.as_str().into(),
                change: entry.change.as_slice().into(),
            },
            "log entry",
        )
        .unwrap()
    }

    fn alone_bytes(seqs: std::ops::RangeInclusive<u64>) -> u64 {
        seqs.map(|seq| alone(seq).len() as u64).sum()
    }

    /// What the stored values of the space's log take.
    fn stored_bytes(kv: &MemoryKv) -> u64 {
        let prefix = key(b'l', &[SPACE]);
        let rows = kv.range(&prefix, &prefix_end(&prefix), usize::MAX).unwrap();
        rows.iter().map(|(_, v)| v.len() as u64).sum()
    }

    /// A log kept by an earlier version (one entry a key) goes on in blocks: the head, reads
    /// across both, bases naming an entry of either, and a compaction whose horizon falls inside
    /// a block, which keeps the entries above it and the quota in step.
    #[test]
    fn a_log_of_single_entries_goes_on_in_blocks_and_compacts_through_both() {
        let kv = MemoryKv::new();
        let mut batch = Batch::default();
        for seq in 1..=3 {
            batch.put(seq_key(b'l', &[SPACE], seq), alone(seq));
            batch.put(
                key(b'b', &[SPACE, "Note", &format!("n{seq}")]),
                base_in_log(seq),
            );
        }
        batch.put(
            key(b's', &[SPACE]),
            alone_bytes(1..=3).to_be_bytes().to_vec(),
        );
        kv.apply(batch).unwrap();

        let storage = KvStorage::new(Arc::new(kv.clone()));
        assert_eq!(storage.head(SPACE).unwrap(), 3);
        let entries: Vec<LoggedChange> = (4..=80).map(logged).collect();
        let created = entries
            .iter()
            .map(|e| ((e.collection.clone(), e.record.clone()), e.change.clone()))
            .collect();
        storage
            .append(
                SPACE,
                Append {
                    after: 3,
                    entries,
                    created,
                    ..Append::default()
                },
            )
            .unwrap();
        let storage = KvStorage::new(Arc::new(kv.clone()));
        assert_eq!(storage.head(SPACE).unwrap(), 80);
        assert_eq!(seqs(&storage, 0), (1..=80).collect::<Vec<_>>());
        assert_eq!(seqs(&storage, 2), (3..=80).collect::<Vec<_>>());
        assert_eq!(seqs(&storage, 40), (41..=80).collect::<Vec<_>>());
        for seq in [1, 3, 4, 35, 36, 80] {
            assert_eq!(storage.change_at(SPACE, seq).unwrap(), Some(change(seq)));
            let base = storage.base(SPACE, "Note", &format!("n{seq}")).unwrap();
            assert_eq!(base, Some(change(seq)));
        }
        assert_eq!(storage.change_at(SPACE, 81).unwrap(), None);
        let prefix = key(b'l', &[SPACE]);
        let values = kv.count(&prefix, &prefix_end(&prefix)).unwrap();
        assert_eq!(values, 3 + 3, "3 single entries and 77 entries in 3 blocks");
        assert_eq!(
            storage.log_bytes(SPACE).unwrap(),
            alone_bytes(1..=80),
            "as stored alone"
        );
        assert!(
            stored_bytes(&kv) < alone_bytes(1..=3) + alone_bytes(4..=80) / 2,
            "blocks of alike entries take less than half their entries"
        );

        storage
            .compact_log(
                SPACE,
                LogCompaction {
                    after: 80,
                    horizon: 50,
                    ..LogCompaction::default()
                },
            )
            .unwrap();
        assert_eq!(seqs(&storage, 0), (51..=80).collect::<Vec<_>>());
        assert_eq!(storage.change_at(SPACE, 50).unwrap(), None);
        assert_eq!(storage.change_at(SPACE, 51).unwrap(), Some(change(51)));
        for seq in [1, 3, 4, 50, 51, 80] {
            let base = storage.base(SPACE, "Note", &format!("n{seq}")).unwrap();
            assert_eq!(base, Some(change(seq)), "n{seq}'s base");
        }
        assert_eq!(storage.log_bytes(SPACE).unwrap(), alone_bytes(51..=80));
        kv.apply({
            let mut batch = Batch::default();
            batch.remove(key(b's', &[SPACE]));
            batch
        })
        .unwrap();
        assert_eq!(
            storage.log_bytes(SPACE).unwrap(),
            alone_bytes(51..=80),
            "measured"
        );
        let storage = KvStorage::new(Arc::new(kv.clone()));
        assert_eq!(storage.head(SPACE).unwrap(), 80);
    }

    #[test]
    fn a_store_is_marked_with_its_layout_and_a_newer_one_is_refused() {
        let kv = MemoryKv::new();
        KvStorage::open(Arc::new(kv.clone())).unwrap();
        assert_eq!(kv.get(LAYOUT_KEY).unwrap().as_deref(), Some(LAYOUT));
        KvStorage::open(Arc::new(kv.clone())).unwrap();
        let mut batch = Batch::default();
        batch.put(LAYOUT_KEY.to_vec(), b"3".to_vec());
        kv.apply(batch).unwrap();
        let refused = KvStorage::open(Arc::new(kv.clone())).err().unwrap();
        assert!(
            matches!(&refused, StorageError::LayoutTooNew { found, .. } if found == "3"),
            "{refused}"
        );
        assert!(refused.to_string().contains("newer ferry"), "{refused}");
    }

    #[test]
    fn a_damaged_block_is_named_by_its_last_seq() {
        let damaged = damaged(&block_key(SPACE, 77));
        assert!(
            matches!(&damaged, StorageError::Damaged { what: "log entry", space, position, .. }
                if space == SPACE && position.contains("ending at seq 77")),
            "{damaged:?}"
        );
        let single = super::damaged(&seq_key(b'l', &[SPACE], 1));
        assert!(
            matches!(&single, StorageError::Damaged { position, .. } if position == "seq 1"),
            "{single:?}"
        );
    }
}
