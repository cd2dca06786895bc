//! The store's change feed: one entry per change a record took (a local write, a change from
//! the relay's log, a record a snapshot page brought), numbered in the order the store committed
//! them and written in the same atomic batch as the change. An app that was down asks for the
//! changes after the last number it saw (`subscribe` with `since`) and misses nothing; a
//! subscriber that fell behind the live events reads the gap from here instead of being told to
//! re-read everything.
//!
//! The changes one batch makes are kept together, several to a key (`f{first number}`, the
//! changes' encodings one after another, up to `PACK_BYTES`): a key costs the engine more than
//! the bytes of a change. Numbers are given under the store's cache lock, which every batch that stages a
//! change holds until it lands, so one key's changes are numbered in a run that no other
//! key's numbers interleave. A key written before changes were kept together holds one change
//! encoded the same way, so it reads as a key of one. Keys written now start with
//! `PACKED_TAG` and hold heads and device ids as bytes (`Packed`), where older keys hold them
//! as hex text (`FeedChange` itself); both read the same.
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

/// The most bytes one key's changes take when it holds more than one (about 16 changes):
/// longer values cost the engine more than the keys they save (the store keeps a value over
/// 4 KiB in chunks, each a key of its own; sled's nodes fill with few keys).
pub(super) const PACK_BYTES: usize = 2048;

/// The first byte of a key's changes encoded as `Packed`. Older keys start with their first
/// change's number (postcard's varint of a number from 1 on), never with it.
const PACKED_TAG: u8 = 0;

/// Hex text as bytes (half the size), or as it is when it does not read back the same.
#[derive(Serialize, Deserialize)]
enum Hex {
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    Text(String),
}

impl Hex {
    fn of(text: &str) -> Hex {
        // Lowercase hex is what `encode` gives back; anything else is kept as written.
        match crate::hex::decode(text) {
            Some(bytes) if !text.bytes().any(|b| b.is_ascii_uppercase()) => Hex::Bytes(bytes),
            _ => Hex::Text(text.to_owned()),
        }
    }

    fn into_text(self) -> String {
        match self {
            Hex::Bytes(bytes) => crate::hex::encode(&bytes),
            Hex::Text(text) => text,
        }
    }
}

/// A change as a key holds it: `FeedChange` with its heads and device as bytes.
#[derive(Serialize, Deserialize)]
struct Packed {
    seq: u64,
    collection: String,
    id: String,
    operation: Operation,
    heads: Vec<Hex>,
    device: Hex,
    origin: Origin,
}

impl Packed {
    fn of(change: FeedChange) -> Packed {
        Packed {
            seq: change.seq,
            collection: change.collection,
            id: change.id,
            operation: change.operation,
            heads: change.heads.iter().map(|h| Hex::of(h)).collect(),
            device: Hex::of(&change.device),
            origin: change.origin,
        }
    }

    fn into_change(self) -> FeedChange {
        FeedChange {
            seq: self.seq,
            collection: self.collection,
            id: self.id,
            operation: self.operation,
            heads: self.heads.into_iter().map(Hex::into_text).collect(),
            device: self.device.into_text(),
            origin: self.origin,
        }
    }
}

/// The changes one `f` key holds, in order.
pub(crate) fn unpack(value: &[u8]) -> Result<Vec<FeedChange>, StoreError> {
    let mut changes = Vec::new();
    let undecodable = |e: postcard::Error| StoreError::Decode {
        what: "feed entry",
        detail: e.to_string(),
    };
    match value.split_first() {
        Some((&PACKED_TAG, mut rest)) => {
            while !rest.is_empty() {
                let (packed, after) =
                    postcard::take_from_bytes::<Packed>(rest).map_err(undecodable)?;
                changes.push(packed.into_change());
                rest = after;
            }
        }
        _ => {
            let mut rest = value;
            while !rest.is_empty() {
                let (change, after) =
                    postcard::take_from_bytes::<FeedChange>(rest).map_err(undecodable)?;
                changes.push(change);
                rest = after;
            }
        }
    }
    Ok(changes)
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
        let part = super::encode(&Packed::of(change), "feed entry")?;
        if !batch.extend_growing(&part, PACK_BYTES) {
            batch.put_growing(keys::feed(seq), [&[PACKED_TAG], part.as_slice()].concat());
        }
        Ok(seq)
    }

    /// The number after the last change any key holds (1 for an empty feed). A last key that
    /// cannot be read (damaged) does not keep the store from opening: no key holds more changes
    /// than `PACK_BYTES` (each takes a byte at least), so numbering goes on past that.
    pub(super) fn next_feed_seq(kv: &dyn super::kv::Kv) -> Result<u64, StoreError> {
        let Some(key) = kv.last_key(keys::FEED, &keys::prefix_end(keys::FEED))? else {
            return Ok(1);
        };
        let first = keys::seq_of(&key, keys::FEED.len())?;
        let last = match kv.get(&key) {
            Ok(Some(value)) => unpack(&value).ok().and_then(|c| c.last().map(|c| c.seq)),
            _ => None,
        };
        Ok(last
            .unwrap_or_else(|| first.saturating_add(PACK_BYTES as u64))
            .saturating_add(1))
    }

    /// Notes that the batch holding these feed numbers landed (durable with the next flush).
    pub(crate) fn feed_landed(&self, seqs: impl Iterator<Item = u64>) {
        if let Some(last) = seqs.max() {
            self.feed_landed.fetch_max(last, Ordering::SeqCst);
        }
    }

    /// Up to `limit` durable changes after `after`, in order. (A change that landed and is
    /// not flushed yet is left for a later read: a failed flush takes it back.)
    pub fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<FeedChange>, StoreError> {
        let durable = self.feed_durable.load(Ordering::SeqCst);
        if after >= durable || limit == 0 {
            return Ok(Vec::new());
        }
        let end = keys::feed(durable.saturating_add(1));
        // The key holding `after + 1`, if any, starts at or before it.
        let mut start = self
            .kv
            .last_key(keys::FEED, &keys::feed(after.saturating_add(2)))?
            .unwrap_or_else(|| keys::feed(after.saturating_add(1)));
        let mut changes = Vec::new();
        loop {
            let page = self.kv.range(&start, &end, limit.clamp(1, 64))?;
            for (_, value) in &page {
                for change in unpack(value)? {
                    if change.seq > after && change.seq <= durable {
                        changes.push(change);
                        if changes.len() == limit {
                            return Ok(changes);
                        }
                    }
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == limit.clamp(1, 64) => {
                    start.clone_from(last);
                    start.push(0);
                }
                _ => return Ok(changes),
            }
        }
    }

    /// The first change kept and the last one durable. A number given to a change whose batch
    /// did not land is never durable, and may be given again after a restart: only durable
    /// numbers are ever shown.
    pub fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        let last = self.feed_durable.load(Ordering::SeqCst);
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

    /// Drops the oldest changes so that at most `keep` remain past those kept with them (a key's
    /// changes go together: the few others of the oldest key kept stay), `batch_size` keys at a time;
    /// returns how many changes went. Durable with the next flush.
    pub fn prune_feed(&self, keep: u64, batch_size: usize) -> Result<u64, StoreError> {
        let bounds = self.feed_bounds()?;
        let kept = bounds.last.saturating_add(1).saturating_sub(bounds.first);
        if kept <= keep {
            return Ok(0);
        }
        let first_kept = bounds.last.saturating_add(1).saturating_sub(keep);
        // Every key before the last one starting below `first_kept` holds only older changes;
        // that last one goes too when its changes all are.
        let Some(straddling) = self.kv.last_key(keys::FEED, &keys::feed(first_kept))? else {
            return Ok(0);
        };
        let straddling_goes = match self.kv.get(&straddling)? {
            Some(value) => unpack(&value)?.iter().all(|c| c.seq < first_kept),
            None => false,
        };
        let mut below = straddling.clone();
        if straddling_goes {
            below.push(0);
        }
        let mut removed = 0;
        loop {
            let old = self.kv.range(keys::FEED, &below, batch_size.max(1))?;
            if old.is_empty() {
                return Ok(removed);
            }
            let mut batch = Batch::default();
            for (key, value) in &old {
                removed += unpack(value)?.len() as u64;
                batch.remove(key.clone());
            }
            self.kv.apply(batch)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Fields;
    use crate::store::Write;
    use crate::store::kv::{Kv, MemoryKv};
    use crate::store::tests::open;

    const DEVICE: &str = "000102030405060708090a0b0c0d0e0f";

    fn put(id: usize) -> Write {
        let mut fields = Fields::new();
        fields.insert("n".into(), serde_json::json!(id));
        Write::Put {
            collection: "Note".into(),
            id: Some(format!("n{id}")),
            fields,
        }
    }

    fn feed_keys(kv: &MemoryKv) -> u64 {
        kv.count(keys::FEED, &keys::prefix_end(keys::FEED)).unwrap()
    }

    fn seqs(changes: &[FeedChange]) -> Vec<u64> {
        changes.iter().map(|c| c.seq).collect()
    }

    /// The first number of each key's changes, in order.
    fn key_firsts(kv: &MemoryKv) -> Vec<u64> {
        let pairs = kv
            .range(keys::FEED, &keys::prefix_end(keys::FEED), usize::MAX)
            .unwrap();
        for (_, value) in &pairs {
            assert!(value.len() <= PACK_BYTES || unpack(value).unwrap().len() == 1);
        }
        pairs
            .iter()
            .map(|(key, _)| keys::seq_of(key, keys::FEED.len()).unwrap())
            .collect()
    }

    #[test]
    fn a_batch_s_changes_share_keys_and_read_back_after_any_number() {
        let kv = MemoryKv::default();
        let store = open(&kv);
        store.write_all((0..100).map(put).collect()).unwrap();
        for id in 0..3 {
            store.write(put(10_000 + id)).unwrap();
        }
        assert_eq!(store.feed_after(0, 10).unwrap(), [], "nothing durable yet");
        store.flush().unwrap();
        let firsts = key_firsts(&kv);
        assert!(firsts.len() <= 100 / 8 + 3, "{firsts:?}");
        assert_eq!(firsts[firsts.len() - 3..], [101, 102, 103]);
        let last = 103;
        assert_eq!(store.feed_bounds().unwrap(), FeedBounds { first: 1, last });
        for after in 0..=last {
            let all = store.feed_after(after, usize::MAX).unwrap();
            assert_eq!(seqs(&all), (after + 1..=last).collect::<Vec<_>>());
            let some = store.feed_after(after, 7).unwrap();
            assert_eq!(seqs(&some), seqs(&all[..all.len().min(7)]));
        }
        let first = &store.feed_after(0, 1).unwrap()[0];
        assert_eq!((first.id.as_str(), first.origin), ("n0", Origin::Local));

        // The numbers go on after a restart.
        drop(store);
        let store = open(&kv);
        let applied = store.write(put(20_000)).unwrap();
        assert_eq!(applied.seq, Some(last + 1));
    }

    #[test]
    fn pruning_drops_whole_keys_and_keeps_every_change_asked_for() {
        let kv = MemoryKv::default();
        let store = open(&kv);
        store.write_all((0..100).map(put).collect()).unwrap();
        for id in 0..5 {
            store.write(put(10_000 + id)).unwrap();
        }
        store.flush().unwrap();
        let last = 105;
        let firsts = key_firsts(&kv);
        // Keeping all but the first change of the batch's second key keeps that key whole.
        let first_kept = firsts[1] + 1;
        assert!(first_kept < firsts[2]);
        assert_eq!(
            store.prune_feed(last + 1 - first_kept, 2).unwrap(),
            firsts[1] - 1
        );
        store.flush().unwrap();
        assert_eq!(key_firsts(&kv), firsts[1..]);
        let bounds = store.feed_bounds().unwrap();
        assert_eq!(
            bounds,
            FeedBounds {
                first: firsts[1],
                last
            }
        );
        assert_eq!(
            seqs(&store.feed_after(bounds.first - 1, usize::MAX).unwrap()),
            (bounds.first..=last).collect::<Vec<_>>()
        );
        // Keeping 5 drops the rest of the batch; keeping more than there are drops nothing.
        assert_eq!(store.prune_feed(5, 100).unwrap(), 101 - firsts[1]);
        assert_eq!(store.prune_feed(5, 100).unwrap(), 0);
        assert_eq!(store.feed_bounds().unwrap().first, last - 4);
    }

    #[test]
    fn a_damaged_last_key_does_not_keep_the_store_from_opening_and_numbers_go_past_it() {
        let kv = MemoryKv::default();
        let store = open(&kv);
        store.write_all((0..10).map(put).collect()).unwrap();
        store.flush().unwrap();
        drop(store);
        let last_key = kv
            .last_key(keys::FEED, &keys::prefix_end(keys::FEED))
            .unwrap()
            .unwrap();
        let mut batch = Batch::default();
        batch.put(last_key, vec![0xff; 7]);
        kv.apply(batch).unwrap();
        let store = open(&kv);
        let applied = store.write(put(99)).unwrap();
        assert!(applied.seq.unwrap() > 10, "{applied:?}");
        store.flush().unwrap();
        let after = applied.seq.unwrap() - 1;
        assert_eq!(seqs(&store.feed_after(after, 10).unwrap()), [after + 1]);
    }

    #[test]
    fn a_feed_written_one_change_a_key_reads_on_and_numbers_go_on_after_it() {
        let kv = MemoryKv::default();
        let mut batch = Batch::default();
        for seq in 1..=3 {
            let change = FeedChange {
                seq,
                collection: "Note".into(),
                id: format!("old{seq}"),
                operation: ferry_proto::Operation::Create,
                heads: vec![],
                device: DEVICE.into(),
                origin: Origin::Remote,
            };
            batch.put(
                keys::feed(seq),
                crate::store::encode(&change, "feed entry").unwrap(),
            );
        }
        kv.apply(batch).unwrap();
        let store = open(&kv);
        store.write_all(vec![put(1), put(2)]).unwrap();
        store.flush().unwrap();
        let changes = store.feed_after(1, usize::MAX).unwrap();
        assert_eq!(seqs(&changes), [2, 3, 4, 5]);
        assert_eq!(changes[1].id, "old3");
        assert_eq!(changes[2].id, "n1");
        assert_eq!(store.prune_feed(2, 1).unwrap(), 3);
        assert_eq!(feed_keys(&kv), 1);
    }

    /// A key holds heads and device ids as bytes, half their hex; text that is not lowercase
    /// hex is kept as it is; every change reads back as it was staged.
    #[test]
    fn changes_are_kept_with_their_hex_as_bytes_and_read_back_the_same() {
        let head = "00ff".repeat(16);
        let change = |seq: u64, heads: Vec<String>, device: &str| FeedChange {
            seq,
            collection: "Note".into(),
            id: format!("n{seq}"),
            operation: ferry_proto::Operation::Update,
            heads,
            device: device.into(),
            origin: Origin::Local,
        };
        let changes = [
            change(1, vec![head.clone(), head.to_uppercase()], DEVICE),
            change(2, vec![], "not hex"),
            change(3, vec!["abc".into()], "ABCD"),
        ];
        let mut value = vec![PACKED_TAG];
        for c in &changes {
            value.extend(crate::store::encode(&Packed::of(c.clone()), "feed entry").unwrap());
        }
        assert_eq!(unpack(&value).unwrap(), changes);
        let hex_only = change(1, vec![head.clone()], DEVICE);
        let as_text = crate::store::encode(&hex_only, "feed entry").unwrap();
        let as_bytes = crate::store::encode(&Packed::of(hex_only), "feed entry").unwrap();
        assert_eq!(as_text.len() - as_bytes.len(), 32 + 16 - 2);

        // Written through the store, heads read back as the record's.
        let kv = MemoryKv::default();
        let store = open(&kv);
        let written = store.write(put(7)).unwrap();
        store.flush().unwrap();
        let read = store.feed_after(0, 10).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].heads, written.heads);
        assert_eq!(read[0].device, DEVICE);
    }
}
