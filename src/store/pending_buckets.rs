//! The pending index kept 64 entries to an engine key.
//!
//! The store names each pending queue entry by a key of its own, `p{rank}{id}` with no value
//! (`keys::pending`), so that the next upload batch is a range read. An engine key has a cost of
//! its own whatever it holds (a walk from the root and a node copy on every write, memory and
//! disk that grow with the number of keys: `store::paired` measures it), and every local write
//! adds one. So the engine holds the index in *buckets*: the ids `64k..64k+63` of one priority
//! under the key of the first, `p{rank}{64k}`, whose value is a 64-bit map of the ids present
//! (bit `i` for `64k+i`, big-endian). A batch of local writes takes consecutive queue ids, so
//! its pending keys mostly fall in one bucket.
//!
//! `Buckets` shows the store one key an entry: gets, ranges, counts and batches on the index
//! are translated here; every other key passes through. Stores written before hold one key an
//! entry, with no value: they are converted when opened (`Buckets::open`).
//!
//! Invariants: a bucket is never empty (it goes with its last entry); the store's pending keys
//! hold no value (a value written to one is not kept); a batch reads the buckets it changes
//! under the same lock that applies it.
//!
//! Must not touch: which entries are pending (the store's queue decides), or any other key.

use super::keys;
use super::kv::{Batch, Kv, KvError, Pair, forward_to_inner};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Ids a bucket holds.
const WIDTH: u64 = 64;
/// `p`, the priority's rank (4 bytes), the id (8 bytes).
const KEY_LEN: usize = 13;
/// Present once the index is kept in buckets.
const META_BUCKETED: &[u8] = b"mpending_buckets";
/// Keys read per page of a scan or of the conversion.
const PAGE: usize = 1024;

/// A pending key's rank and id; `None` for any other key.
fn split(key: &[u8]) -> Option<([u8; 4], u64)> {
    if key.len() != KEY_LEN || !key.starts_with(keys::PENDING) {
        return None;
    }
    let rank = key.get(1..5)?.try_into().ok()?;
    let id = u64::from_be_bytes(key.get(5..)?.try_into().ok()?);
    Some((rank, id))
}

fn key_of(rank: [u8; 4], id: u64) -> Vec<u8> {
    [keys::PENDING, &rank, &id.to_be_bytes()].concat()
}

/// The key of the bucket holding `id`, and its bit there.
fn bucket_of(rank: [u8; 4], id: u64) -> (Vec<u8>, u64) {
    (key_of(rank, id - id % WIDTH), 1 << (id % WIDTH))
}

/// The ids stored under `key` as the engine holds it: a bucket's, or the one id of a key
/// written before buckets (no value). `None` for anything else.
fn ids_of(key: &[u8], value: &[u8]) -> Option<([u8; 4], Vec<u64>)> {
    let (rank, first) = split(key)?;
    if value.is_empty() {
        return Some((rank, vec![first]));
    }
    if first % WIDTH != 0 {
        return None;
    }
    let map = u64::from_be_bytes(value.try_into().ok()?);
    Some((
        rank,
        (0..WIDTH)
            .filter(|bit| map & (1 << bit) != 0)
            .map(|bit| first + bit)
            .collect(),
    ))
}

/// A bucket's map as stored: `0` when it is absent.
fn map_of(key: &[u8], stored: Option<Vec<u8>>) -> Result<u64, KvError> {
    match stored {
        None => Ok(0),
        // A key written before buckets at an id a bucket starts at: that id alone.
        Some(value) if value.is_empty() => Ok(1),
        Some(value) => <[u8; 8]>::try_from(value.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| KvError::Damaged(key.to_vec())),
    }
}

/// The key of the first bucket that may hold a key at or after `from` (a key of the index's
/// part): the bucket of the first whole pending key not before it.
fn first_bucket(from: &[u8]) -> Vec<u8> {
    let mut whole = from.to_vec();
    whole.resize(KEY_LEN, 0);
    match split(&whole) {
        Some((rank, id)) => bucket_of(rank, id).0,
        None => from.to_vec(),
    }
}

/// The part of `start..end` inside the pending index, if any.
fn index_part(start: &[u8], end: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let index_end = keys::prefix_end(keys::PENDING);
    let from = start.max(keys::PENDING).to_vec();
    let to = end.min(index_end.as_slice()).to_vec();
    (from < to).then_some((from, to))
}

pub struct Buckets {
    inner: Box<dyn Kv>,
    /// Held from reading the buckets a batch changes until it is applied.
    applying: Mutex<()>,
}

impl Buckets {
    /// The store's keys over `inner`, its pending index converted to buckets first if it was
    /// written before them (a page of keys a batch; a conversion cut short goes on at the next
    /// open).
    pub fn open(inner: Box<dyn Kv>) -> Result<Buckets, KvError> {
        let buckets = Buckets {
            inner,
            applying: Mutex::new(()),
        };
        if buckets.inner.get(META_BUCKETED)?.is_none() {
            buckets.convert()?;
        }
        Ok(buckets)
    }

    fn convert(&self) -> Result<(), KvError> {
        let end = keys::prefix_end(keys::PENDING);
        let mut start = keys::PENDING.to_vec();
        loop {
            let page = self.inner.range(&start, &end, PAGE)?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            // Keys written before buckets hold no value; buckets already made are kept.
            let mut maps: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            let mut singles = Vec::new();
            for (key, value) in &page {
                if let (true, Some((rank, id))) = (value.is_empty(), split(key)) {
                    let (bucket, bit) = bucket_of(rank, id);
                    *maps.entry(bucket).or_default() |= bit;
                    singles.push(key.clone());
                }
            }
            if maps.is_empty() {
                continue;
            }
            let mut batch = Batch::default();
            for key in singles {
                if !maps.contains_key(&key) {
                    batch.remove(key);
                }
            }
            for (bucket, map) in maps {
                let stored = self.inner.get(&bucket)?.filter(|v| !v.is_empty());
                let map = map_of(&bucket, stored)? | map;
                batch.put(bucket, map.to_be_bytes().to_vec());
            }
            self.inner.apply(batch)?;
        }
        let mut done = Batch::default();
        done.put(META_BUCKETED.to_vec(), Vec::new());
        self.inner.apply(done)?;
        self.inner.flush()
    }

    /// Every pending key in `from..to` (inside the index), in order, up to `limit`.
    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, KvError> {
        let mut out = Vec::new();
        let mut start = first_bucket(from);
        if start.as_slice() < from {
            // The bucket `from` falls in: read alone, so that when it is damaged a read that
            // starts past its key goes on after it (a read from before reports it).
            match self.inner.range(&start, &keys::after(&start), 1) {
                Err(KvError::Damaged(key)) if key == start => start = keys::after(&start),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        // Buckets enough for `limit` when they are full (a batch's entries mostly are).
        let page_size = (limit / WIDTH as usize).saturating_add(2).min(PAGE);
        while out.len() < limit {
            let page = self.inner.range(&start, to, page_size)?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            for (key, value) in &page {
                let Some((rank, ids)) = ids_of(key, value) else {
                    return Err(KvError::Damaged(key.clone()));
                };
                for id in ids {
                    let key = key_of(rank, id);
                    if key.as_slice() >= from && key.as_slice() < to && out.len() < limit {
                        out.push(key);
                    }
                }
            }
            if page.len() < page_size {
                break;
            }
        }
        Ok(out)
    }
}

impl Kv for Buckets {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let Some((rank, id)) = split(key) else {
            return self.inner.get(key);
        };
        let (bucket, bit) = bucket_of(rank, id);
        Ok((map_of(&bucket, self.inner.get(&bucket)?)? & bit != 0).then(Vec::new))
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        let Some((from, to)) = index_part(start, end) else {
            return self.inner.range(start, end, limit);
        };
        let mut out = self.inner.range(start, &from, limit)?;
        let wanted = limit.saturating_sub(out.len());
        out.extend(
            self.scan(&from, &to, wanted)?
                .into_iter()
                .map(|key| (key, Vec::new())),
        );
        let wanted = limit.saturating_sub(out.len());
        if wanted > 0 && to.as_slice() < end {
            out.extend(self.inner.range(&to, end, wanted)?);
        }
        Ok(out)
    }

    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let Some((from, to)) = index_part(start, end) else {
            return self.inner.last_key(start, end);
        };
        if to.as_slice() < end
            && let Some(last) = self.inner.last_key(&to, end)?
        {
            return Ok(Some(last));
        }
        let bucket_start = first_bucket(&from);
        let mut stop = to.clone();
        while let Some(key) = self.inner.last_key(&bucket_start, &stop)? {
            let value = self.inner.get(&key)?.unwrap_or_default();
            let Some((rank, ids)) = ids_of(&key, &value) else {
                return Err(KvError::Damaged(key));
            };
            let last = ids
                .into_iter()
                .map(|id| key_of(rank, id))
                .rfind(|k| k.as_slice() >= from.as_slice() && k.as_slice() < to.as_slice());
            if last.is_some() {
                return Ok(last);
            }
            stop = key;
        }
        self.inner.last_key(start, &from)
    }

    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        let Some((from, to)) = index_part(start, end) else {
            return self.inner.count(start, end);
        };
        let outside = self.inner.count(start, &from)?
            + if to.as_slice() < end {
                self.inner.count(&to, end)?
            } else {
                0
            };
        Ok(outside + self.scan(&from, &to, usize::MAX)?.len() as u64)
    }

    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        let (ops, journal, short) = batch.into_parts();
        let mut out = Batch::default();
        out.offer_short(short);
        // Per bucket, the bits the batch sets and clears, in the order it does.
        let mut changes: BTreeMap<Vec<u8>, (u64, u64)> = BTreeMap::new();
        // Keys the batch removes by name: a damaged bucket among them is written anew from the
        // batch alone (a repair removes the damaged values it found and writes the index again
        // from the queue); any other write to a damaged bucket fails.
        let mut removed_by_name = std::collections::BTreeSet::new();
        for (key, value) in ops {
            let Some((rank, id)) = split(&key) else {
                match value {
                    Some(value) => out.put(key, value),
                    None => out.remove(key),
                }
                continue;
            };
            let (bucket, bit) = bucket_of(rank, id);
            let (set, clear) = changes.entry(bucket).or_default();
            if value.is_some() {
                *set |= bit;
                *clear &= !bit;
            } else {
                *clear |= bit;
                *set &= !bit;
                removed_by_name.insert(key);
            }
        }
        for record in journal {
            out.journal(record);
        }
        if changes.is_empty() {
            return self.inner.apply(out);
        }
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        for (bucket, (set, clear)) in changes {
            let stored = match self.inner.get(&bucket) {
                Err(KvError::Damaged(key))
                    if key == bucket && removed_by_name.contains(&bucket) =>
                {
                    Some(0u64.to_be_bytes().to_vec())
                }
                other => other?,
            };
            let existed = stored.is_some();
            let map = (map_of(&bucket, stored)? | set) & !clear;
            if map != 0 {
                out.put(bucket, map.to_be_bytes().to_vec());
            } else if existed {
                out.remove(bucket);
            }
        }
        self.inner.apply(out)
    }

    // The keys as the engine holds them: a bucket counts once.
    forward_to_inner!(beside_keys);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kv::MemoryKv;
    use proptest::prelude::*;

    fn pending(rank: u8, id: u64) -> Vec<u8> {
        key_of([0, 0, 0, rank], id)
    }

    fn apply(kv: &dyn Kv, ops: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let mut batch = Batch::default();
        for (key, value) in ops {
            match value {
                Some(v) => batch.put(key.clone(), v.clone()),
                None => batch.remove(key.clone()),
            }
        }
        kv.apply(batch).unwrap();
    }

    /// A pending key (of two priorities, ids around a few buckets' edges) or a key beside the
    /// index; pending keys hold no value.
    fn op() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
        let key = prop_oneof![
            4 => (0u8..2, 0u64..200).prop_map(|(r, id)| pending(r, id)),
            1 => "[ox][a-c]{0,2}".prop_map(String::into_bytes),
        ];
        (key, any::<bool>()).prop_map(|(key, put)| {
            let value = (put).then(|| {
                if key[0] == b'p' {
                    Vec::new()
                } else {
                    b"v".to_vec()
                }
            });
            (key, value)
        })
    }

    fn bounds() -> Vec<Vec<u8>> {
        let mut bounds = vec![
            Vec::new(),
            b"o".to_vec(),
            b"p".to_vec(),
            b"q".to_vec(),
            b"y".to_vec(),
            vec![0xff],
        ];
        for (r, id) in [
            (0, 0),
            (0, 63),
            (0, 64),
            (0, 100),
            (1, 5),
            (1, 128),
            (1, 199),
        ] {
            bounds.push(pending(r, id));
            bounds.push(keys::after(&pending(r, id)));
        }
        bounds.sort();
        bounds
    }

    fn check_reads(kv: &dyn Kv, model: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), TestCaseError> {
        let bounds = bounds();
        for (i, start) in bounds.iter().enumerate() {
            for end in &bounds[i..] {
                let mut expected: Vec<Pair> = model
                    .range::<[u8], _>((
                        std::ops::Bound::Included(start.as_slice()),
                        std::ops::Bound::Excluded(end.as_slice()),
                    ))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut whole = kv.range(start, end, usize::MAX).unwrap();
                whole.retain(|(k, _)| k != META_BUCKETED);
                expected.retain(|(k, _)| k != META_BUCKETED);
                prop_assert_eq!(&whole, &expected);
                for limit in [1, 2, 5] {
                    let mut page = kv.range(start, end, limit).unwrap();
                    let upto: Vec<Pair> = kv
                        .range(start, end, usize::MAX)
                        .unwrap()
                        .into_iter()
                        .take(limit)
                        .collect();
                    prop_assert_eq!(&page, &upto);
                    page.clear();
                }
                let meta =
                    u64::from(start.as_slice() <= META_BUCKETED && META_BUCKETED < end.as_slice());
                prop_assert_eq!(kv.count(start, end).unwrap(), expected.len() as u64 + meta);
                let last = kv.last_key(start, end).unwrap();
                let expected_last = expected.last().map(|(k, _)| k.clone());
                if meta == 0 || expected_last.as_deref().is_some_and(|k| k > META_BUCKETED) {
                    prop_assert_eq!(last, expected_last);
                }
            }
        }
        for r in 0..2 {
            for id in 0..200 {
                let key = pending(r, id);
                prop_assert_eq!(kv.get(&key).unwrap(), model.get(&key).cloned());
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever batches write, the index reads through buckets exactly as a plain map of
        /// its keys, and the engine holds a key a bucket.
        #[test]
        fn reads_what_a_plain_keyspace_would(
            batches in prop::collection::vec(prop::collection::vec(op(), 1..40), 1..8),
        ) {
            let raw = MemoryKv::new();
            let buckets = Buckets::open(Box::new(raw.clone())).unwrap();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for ops in &batches {
                apply(&buckets, ops);
                for (key, value) in ops {
                    match value {
                        Some(value) => model.insert(key.clone(), value.clone()),
                        None => model.remove(key),
                    };
                }
                check_reads(&buckets, &model)?;
                let stored = raw.range(b"p", b"q", usize::MAX).unwrap();
                let buckets_held: std::collections::BTreeSet<Vec<u8>> = model
                    .keys()
                    .filter_map(|k| split(k))
                    .map(|(rank, id)| bucket_of(rank, id).0)
                    .collect();
                prop_assert_eq!(stored.len(), buckets_held.len());
            }
        }

        /// A store written before buckets (a key an entry) reads the same once opened, and
        /// holds buckets only.
        #[test]
        fn an_index_of_a_key_an_entry_is_converted_when_opened(
            ids in prop::collection::btree_set((0u8..2, 0u64..3000), 0..400),
        ) {
            let raw = MemoryKv::new();
            let mut model = BTreeMap::new();
            let mut batch = Batch::default();
            for &(r, id) in &ids {
                batch.put(pending(r, id), Vec::new());
                model.insert(pending(r, id), Vec::new());
            }
            batch.put(b"other".to_vec(), b"v".to_vec());
            model.insert(b"other".to_vec(), b"v".to_vec());
            raw.apply(batch).unwrap();
            let buckets = Buckets::open(Box::new(raw.clone())).unwrap();
            check_reads(&buckets, &model)?;
            let whole = buckets.range(b"p", b"q", usize::MAX).unwrap();
            prop_assert_eq!(whole.len(), ids.len());
            for (key, value) in raw.range(b"p", b"q", usize::MAX).unwrap() {
                prop_assert_eq!(value.len(), 8, "{:?} is still a key an entry", key);
            }
            prop_assert!(raw.get(META_BUCKETED).unwrap().is_some());
        }
    }

    #[test]
    fn a_batch_of_consecutive_entries_writes_one_key() {
        let raw = MemoryKv::new();
        let buckets = Buckets::open(Box::new(raw.clone())).unwrap();
        let ops: Vec<_> = (128..192)
            .map(|id| (pending(0, id), Some(Vec::new())))
            .collect();
        apply(&buckets, &ops);
        assert_eq!(raw.range(b"p", b"q", usize::MAX).unwrap().len(), 1);
        let removed: Vec<_> = (128..192).map(|id| (pending(0, id), None)).collect();
        apply(&buckets, &removed);
        assert!(raw.range(b"p", b"q", usize::MAX).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_bucket_is_named() {
        let raw = MemoryKv::new();
        let buckets = Buckets::open(Box::new(raw.clone())).unwrap();
        let mut batch = Batch::default();
        batch.put(pending(0, 64), vec![1, 2, 3]);
        raw.apply(batch).unwrap();
        assert!(
            matches!(buckets.get(&pending(0, 70)), Err(KvError::Damaged(k)) if k == pending(0, 64))
        );
        assert!(
            matches!(buckets.range(b"p", b"q", 10), Err(KvError::Damaged(k)) if k == pending(0, 64))
        );
    }
}
