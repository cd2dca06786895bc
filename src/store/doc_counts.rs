//! How many documents each collection holds, kept with the writes that change it.
//!
//! `status` and `ferry collections` say how many documents each collection holds. Counted by a
//! walk, that is every document key read through the engine on every call: on a store of
//! 1,000,000 records, seconds of work and the memory of every page the walk reads in. So the
//! engine keeps the counts: `n{collection}` → u64 big-endian, the number of the collection's
//! document keys (`d\0{collection}\0…`), written in the same atomic batch as the documents that
//! move it.
//!
//! `Counted`, a layer over the engine, keeps them: for each document a batch puts or removes,
//! it asks the layer below whether the document is there (without reading it), under the lock
//! that applies the batch so that two batches never count one document twice, and adds to the
//! batch the counts that move. A count that falls to 0 is removed: the counts name exactly the
//! collections that hold documents. A batch that writes a count itself (`recount`, which a
//! repair uses) is taken as written for that collection. A count found unreadable is counted
//! again from the collection's documents before it moves. Stores written before counts
//! existed get them when opened (`Counted::open`, one walk).
//!
//! Invariant: `n{collection}` holds the number of the collection's document keys, and exists
//! exactly for the collections that have any.
//!
//! Must not touch: what documents hold (only whether they exist), or any other key.

use super::StoreError;
use super::keys;
use super::kv::{Batch, Kv, KvError, forward_to_inner};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

/// Keeps `n{collection}` right on every batch (see the module doc).
pub(super) struct Counted {
    inner: Box<dyn Kv>,
    /// Held from the first look at a batch's documents until it is applied.
    applying: Mutex<()>,
}

impl Counted {
    /// The layer over `inner`, counting the documents first when the store has no counts yet.
    pub(super) fn open(inner: Box<dyn Kv>) -> Result<Self, KvError> {
        if inner.get(keys::META_DOC_COUNTS)?.is_none() {
            let mut batch = recount(inner.as_ref())?;
            batch.put(keys::META_DOC_COUNTS.to_vec(), Vec::new());
            inner.apply(batch)?;
            inner.flush()?;
        }
        Ok(Counted {
            inner,
            applying: Mutex::new(()),
        })
    }

    /// How the batch moves each collection's count: +1 for a document it adds, -1 for one it
    /// removes (a document's last write in the batch decides), leaving out the collections
    /// whose count the batch writes itself.
    fn moves<'a>(&self, batch: &'a Batch) -> Result<BTreeMap<&'a str, i64>, KvError> {
        let mut documents: HashMap<&[u8], bool> = HashMap::new();
        let mut written: HashSet<&[u8]> = HashSet::new();
        for (key, value) in batch.ops() {
            if key.starts_with(keys::DOC_ALL) {
                documents.insert(key, value.is_some());
            } else if let Some(collection) = key.strip_prefix(keys::DOC_COUNT) {
                written.insert(collection);
            }
        }
        let mut moves = BTreeMap::new();
        for (key, present) in documents {
            let Some(collection) = collection_of(key) else {
                continue;
            };
            if written.contains(collection.as_bytes()) {
                continue;
            }
            let by = match (self.inner.contains(key)?, present) {
                (false, true) => 1,
                (true, false) => -1,
                _ => continue,
            };
            *moves.entry(collection).or_insert(0) += by;
        }
        Ok(moves)
    }

    /// The collection's count as stored, or counted again from its documents when it does not
    /// read.
    fn count_of(&self, collection: &str) -> Result<u64, KvError> {
        let key = keys::doc_count(collection);
        let stored = match self.inner.get(&key) {
            Ok(Some(value)) => decode(&value),
            Ok(None) => Some(0),
            Err(KvError::Damaged(_)) => None,
            Err(e) => return Err(e),
        };
        match stored {
            Some(count) => Ok(count),
            None => {
                tracing::warn!(collection, "a document count does not read: counted again");
                count_documents(self.inner.as_ref(), collection)
            }
        }
    }
}

impl Kv for Counted {
    fn apply(&self, mut batch: Batch) -> Result<(), KvError> {
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts = Vec::new();
        for (collection, by) in self.moves(&batch)? {
            if by != 0 {
                let count = self.count_of(collection)?.saturating_add_signed(by);
                counts.push((keys::doc_count(collection), count));
            }
        }
        for (key, count) in counts {
            match count {
                0 => batch.remove(key),
                n => batch.put(key, n.to_be_bytes().to_vec()),
            }
        }
        self.inner.apply(batch)
    }

    forward_to_inner!(get, contains, range, last_key, count);
    forward_to_inner!(beside_keys);
}

/// The collection a document key names; `None` for a key not laid out as one.
fn collection_of(key: &[u8]) -> Option<&str> {
    keys::doc_collection(key).ok()
}

fn decode(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

fn count_documents(kv: &dyn Kv, collection: &str) -> Result<u64, KvError> {
    let prefix = keys::doc_prefix(collection);
    kv.count(&prefix, &keys::prefix_end(&prefix))
}

/// A batch that writes every collection's count as the documents in `kv` give it, and removes
/// the counts of collections holding none: one walk over the document keys, a collection at a
/// time, from the last. Keys only: a damaged value is counted, never read.
pub(super) fn recount(kv: &dyn Kv) -> Result<Batch, KvError> {
    let mut batch = Batch::default();
    let mut end = keys::prefix_end(keys::DOC_COUNT);
    while let Some(key) = kv.last_key(keys::DOC_COUNT, &end)? {
        end.clone_from(&key);
        batch.remove(key);
    }
    let mut end = keys::prefix_end(keys::DOC_ALL);
    while let Some(key) = kv.last_key(keys::DOC_ALL, &end)? {
        let Some(collection) = collection_of(&key) else {
            end = key;
            continue;
        };
        let count = count_documents(kv, collection)?;
        if count > 0 {
            batch.put(keys::doc_count(collection), count.to_be_bytes().to_vec());
        }
        end = keys::doc_prefix(collection);
    }
    Ok(batch)
}

/// Every collection holding documents, with how many, in name order.
pub(super) fn read(kv: &dyn Kv) -> Result<Vec<(String, u64)>, StoreError> {
    let mut out = Vec::new();
    let end = keys::prefix_end(keys::DOC_COUNT);
    let mut start = keys::DOC_COUNT.to_vec();
    loop {
        let page = kv.range(&start, &end, 256)?;
        let Some((last, _)) = page.last() else {
            return Ok(out);
        };
        start = keys::after(last);
        for (key, value) in page {
            out.push(parse(&key, &value)?);
        }
    }
}

/// A stored count: its collection and number.
pub(super) fn parse(key: &[u8], value: &[u8]) -> Result<(String, u64), StoreError> {
    let damaged = |detail: &str| StoreError::Decode {
        what: "document count",
        detail: detail.to_owned(),
    };
    let collection = key
        .strip_prefix(keys::DOC_COUNT)
        .and_then(|name| std::str::from_utf8(name).ok())
        .ok_or_else(|| damaged("its key names no collection"))?;
    let count = decode(value).ok_or_else(|| damaged("not 8 bytes"))?;
    Ok((collection.to_owned(), count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kv::MemoryKv;
    use proptest::prelude::*;

    /// The counts a walk over the document keys gives.
    fn walked(kv: &dyn Kv) -> Vec<(String, u64)> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for (key, _) in kv
            .range(keys::DOC_ALL, &keys::prefix_end(keys::DOC_ALL), usize::MAX)
            .unwrap()
        {
            *out.entry(collection_of(&key).unwrap().to_owned())
                .or_default() += 1;
        }
        out.into_iter().collect()
    }

    fn counted(raw: &MemoryKv) -> Counted {
        Counted::open(Box::new(raw.clone())).unwrap()
    }

    /// A put (`Some`) or removal (`None`) of a document of collection `C{c}`, id `{id}`.
    type Op = (u8, u8, bool);

    fn batch_of(ops: &[Op]) -> Batch {
        let mut batch = Batch::default();
        for &(c, id, put) in ops {
            let key = keys::doc(&format!("C{c}"), &id.to_string());
            match put {
                true => batch.put(key, vec![id]),
                false => batch.remove(key),
            }
        }
        batch
    }

    proptest! {
        /// Whatever batches put and remove (a document written twice in one batch, removed
        /// when absent, written when present), the counts are what a walk gives, and name
        /// only collections holding documents.
        #[test]
        fn counts_follow_every_batch(
            batches in prop::collection::vec(
                prop::collection::vec((0u8..3, 0u8..6, any::<bool>()), 0..8),
                1..20,
            ),
        ) {
            let raw = MemoryKv::new();
            let kv = counted(&raw);
            for ops in &batches {
                kv.apply(batch_of(ops)).unwrap();
                prop_assert_eq!(read(&kv).unwrap(), walked(&kv));
            }
        }
    }

    #[test]
    fn a_store_without_counts_is_counted_when_opened_and_once() {
        let raw = MemoryKv::new();
        raw.apply(batch_of(&[(0, 1, true), (0, 2, true), (2, 1, true)]))
            .unwrap();
        let kv = counted(&raw);
        let expected = [("C0".to_owned(), 2), ("C2".to_owned(), 1)];
        assert_eq!(read(&kv).unwrap(), expected);
        assert!(raw.get(keys::META_DOC_COUNTS).unwrap().is_some());
        // Written below the layer: a later open trusts the counts kept and does not walk.
        raw.apply(batch_of(&[(1, 1, true)])).unwrap();
        assert_eq!(read(&counted(&raw)).unwrap(), expected);
    }

    /// The count at open reads keys only: a store holding a damaged document (or count) still
    /// opens, and the damaged document is counted (`doctor` names it; a repair removes it).
    #[test]
    fn counting_at_open_reads_no_value() {
        let raw = MemoryKv::new();
        raw.apply(batch_of(&[(0, 1, true), (0, 2, true), (1, 1, true)]))
            .unwrap();
        let mut stale = Batch::default();
        stale.put(keys::doc_count("C9"), 1u64.to_be_bytes().to_vec());
        raw.apply(stale).unwrap();
        assert!(raw.damage(&keys::doc("C0", "2")));
        assert!(raw.damage(&keys::doc_count("C9")));
        let kv = counted(&raw);
        assert_eq!(
            read(&kv).unwrap(),
            [("C0".to_owned(), 2), ("C1".to_owned(), 1)]
        );
    }

    #[test]
    fn an_unreadable_count_is_counted_again_when_it_moves() {
        let raw = MemoryKv::new();
        let kv = counted(&raw);
        kv.apply(batch_of(&[(0, 1, true), (0, 2, true)])).unwrap();
        let mut damage = Batch::default();
        damage.put(keys::doc_count("C0"), b"bad".to_vec());
        raw.apply(damage).unwrap();
        assert!(matches!(read(&kv), Err(StoreError::Decode { .. })));
        kv.apply(batch_of(&[(0, 3, true)])).unwrap();
        assert_eq!(read(&kv).unwrap(), [("C0".to_owned(), 3)]);
    }

    #[test]
    fn a_count_a_batch_writes_is_taken_as_written() {
        let raw = MemoryKv::new();
        let kv = counted(&raw);
        kv.apply(batch_of(&[(0, 1, true), (1, 1, true)])).unwrap();
        let mut batch = batch_of(&[(0, 2, true), (1, 2, true)]);
        batch.put(keys::doc_count("C0"), 7u64.to_be_bytes().to_vec());
        kv.apply(batch).unwrap();
        assert_eq!(
            read(&kv).unwrap(),
            [("C0".to_owned(), 7), ("C1".to_owned(), 2)]
        );
        kv.apply(recount(&kv).unwrap()).unwrap();
        assert_eq!(read(&kv).unwrap(), walked(&kv));
    }
}
