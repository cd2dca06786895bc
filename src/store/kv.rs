//! The storage trait the store is written against, and its two engines: sled on disk and an
//! in-memory map for tests. The trait is deliberately narrow (ordered keys, atomic batches, an
//! explicit durability point) so that another engine can replace sled without touching the store.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(
        "the disk is full ({0}): free space in the data directory, then restart the daemon if writes keep failing; this write was not acknowledged"
    )]
    DiskFull(String),
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error(
        "the store is corrupt: {0}; restore the data directory from a backup or another device"
    )]
    Corrupt(String),
}

/// An atomic set of writes: all of them land, or none.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    pub fn remove(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The value this batch will leave at `key`, if it writes one: its last put, unless a later
    /// remove undoes it.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.ops
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }
}

pub type Pair = (Vec<u8>, Vec<u8>);

/// Ordered key-value storage.
pub trait Kv: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Up to `limit` pairs with `start <= key < end`, in key order.
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError>;
    /// The greatest key with `start <= key < end`.
    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// How many keys lie in `start <= key < end`.
    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError>;
    /// Applies the batch atomically. It is visible at once but durable only after `flush`.
    fn apply(&self, batch: Batch) -> Result<(), KvError>;
    /// Makes every applied batch durable.
    fn flush(&self) -> Result<(), KvError>;
    fn size_on_disk(&self) -> Result<u64, KvError>;
}

/// sled 0.34, one tree, keys prefixed by kind (see `store::keys`).
pub struct SledKv {
    db: sled::Db,
}

impl SledKv {
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, KvError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| {
                let unreadable = |detail: &str| {
                    KvError::Corrupt(format!("{} cannot be read ({detail})", path.display()))
                };
                match e {
                    // What sled says when its files in `path` cannot be read as a sled store.
                    sled::Error::Unsupported(detail) => unreadable(&detail),
                    other => match from_sled(other) {
                        KvError::Corrupt(detail) => unreadable(&detail),
                        other => other,
                    },
                }
            })?;
        Ok(SledKv { db })
    }
}

fn from_sled(e: sled::Error) -> KvError {
    match e {
        sled::Error::Io(io) => from_io(io),
        sled::Error::Corruption { at, bt: _ } => KvError::Corrupt(format!("sled at {at:?}")),
        other => KvError::Io(other.to_string()),
    }
}

pub(crate) fn from_io(io: std::io::Error) -> KvError {
    if io.raw_os_error() == Some(libc::ENOSPC) || io.kind() == std::io::ErrorKind::StorageFull {
        KvError::DiskFull(io.to_string())
    } else {
        KvError::Io(io.to_string())
    }
}

impl Kv for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.db.get(key).map_err(from_sled)?.map(|v| v.to_vec()))
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        self.db
            .range(start..end)
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(from_sled))
            .collect()
    }

    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.db.range(start..end).next_back() {
            Some(r) => Ok(Some(r.map_err(from_sled)?.0.to_vec())),
            None => Ok(None),
        }
    }

    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        let mut n = 0;
        for key in self.db.range(start..end).keys() {
            key.map_err(from_sled)?;
            n += 1;
        }
        Ok(n)
    }

    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.ops {
            match value {
                Some(v) => sled_batch.insert(key, v),
                None => sled_batch.remove(key),
            }
        }
        self.db.apply_batch(sled_batch).map_err(from_sled)
    }

    fn flush(&self) -> Result<(), KvError> {
        self.db.flush().map(|_| ()).map_err(from_sled)
    }

    fn size_on_disk(&self) -> Result<u64, KvError> {
        self.db.size_on_disk().map_err(from_sled)
    }
}

/// An in-memory engine. Clones share the same map, so a test can "reopen" a store by building a
/// new one over a clone. `durable` holds what the last flush made durable; `crash()` throws away
/// the rest, as a power cut would.
#[derive(Clone, Default)]
pub struct MemoryKv {
    inner: Arc<Mutex<MemoryState>>,
}

#[derive(Default)]
struct MemoryState {
    visible: BTreeMap<Vec<u8>, Vec<u8>>,
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything that was applied but not flushed.
    pub fn crash(&self) {
        let mut state = self.lock();
        state.visible = state.durable.clone();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding this lock can only come from a bug in a test; the map itself is
        // never left half-updated, so carrying on with it is sound.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bounds<'a>(start: &'a [u8], end: &'a [u8]) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (Bound::Included(start), Bound::Excluded(end))
}

impl Kv for MemoryKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.lock().visible.get(key).cloned())
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let state = self.lock();
        Ok(state
            .visible
            .range::<[u8], _>(bounds(start, end))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if start >= end {
            return Ok(None);
        }
        let state = self.lock();
        Ok(state
            .visible
            .range::<[u8], _>(bounds(start, end))
            .next_back()
            .map(|(k, _)| k.clone()))
    }

    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        if start >= end {
            return Ok(0);
        }
        Ok(self
            .lock()
            .visible
            .range::<[u8], _>(bounds(start, end))
            .count() as u64)
    }

    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        let mut state = self.lock();
        for (key, value) in batch.ops {
            match value {
                Some(v) => state.visible.insert(key, v),
                None => state.visible.remove(&key),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), KvError> {
        let mut state = self.lock();
        state.durable = state.visible.clone();
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, KvError> {
        Ok(self
            .lock()
            .durable
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum())
    }
}

/// One keyspace inside another: every key is stored under `prefix`, and reads see only the keys
/// under it, with the prefix taken off. Lets several stores share one engine (one sled database,
/// one flush) without their key layouts meeting. `flush` and `size_on_disk` are the whole
/// engine's.
pub struct PrefixKv {
    inner: Arc<dyn Kv>,
    prefix: Vec<u8>,
}

impl PrefixKv {
    /// `prefix` must not be a prefix of any other key the engine holds (end it with a byte the
    /// other layouts never put there, as `relay::mirror` does with `\0`).
    pub fn new(inner: Arc<dyn Kv>, prefix: Vec<u8>) -> Self {
        PrefixKv { inner, prefix }
    }

    fn outer(&self, key: &[u8]) -> Vec<u8> {
        let mut outer = Vec::with_capacity(self.prefix.len() + key.len());
        outer.extend_from_slice(&self.prefix);
        outer.extend_from_slice(key);
        outer
    }

    fn inner_key(&self, mut key: Vec<u8>) -> Vec<u8> {
        key.drain(..self.prefix.len().min(key.len()));
        key
    }
}

impl Kv for PrefixKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(&self.outer(key))
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        Ok(self
            .inner
            .range(&self.outer(start), &self.outer(end), limit)?
            .into_iter()
            .map(|(k, v)| (self.inner_key(k), v))
            .collect())
    }

    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self
            .inner
            .last_key(&self.outer(start), &self.outer(end))?
            .map(|k| self.inner_key(k)))
    }

    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        self.inner.count(&self.outer(start), &self.outer(end))
    }

    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        let ops = batch
            .ops
            .into_iter()
            .map(|(k, v)| (self.outer(&k), v))
            .collect();
        self.inner.apply(Batch { ops })
    }

    fn flush(&self) -> Result<(), KvError> {
        self.inner.flush()
    }

    fn size_on_disk(&self) -> Result<u64, KvError> {
        self.inner.size_on_disk()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefixed_keyspace_sees_only_its_own_keys() {
        let engine = Arc::new(MemoryKv::new());
        let mut outside = Batch::default();
        outside.put(b"a1".to_vec(), b"outside".to_vec());
        outside.put(b"p\0a1".to_vec(), b"inside".to_vec());
        outside.put(b"q".to_vec(), b"after".to_vec());
        engine.apply(outside).unwrap();
        let kv = PrefixKv::new(engine.clone(), b"p\0".to_vec());
        assert_eq!(kv.get(b"a1").unwrap(), Some(b"inside".to_vec()));
        let mut batch = Batch::default();
        batch.put(b"a2".to_vec(), b"two".to_vec());
        batch.remove(b"a1".to_vec());
        kv.apply(batch).unwrap();
        assert_eq!(
            kv.range(b"", &[0xff], 10).unwrap(),
            vec![(b"a2".to_vec(), b"two".to_vec())]
        );
        assert_eq!(kv.last_key(b"a", b"b").unwrap(), Some(b"a2".to_vec()));
        assert_eq!(kv.count(b"", &[0xff]).unwrap(), 1);
        assert_eq!(engine.get(b"a1").unwrap(), Some(b"outside".to_vec()));
        assert_eq!(engine.get(b"p\0a2").unwrap(), Some(b"two".to_vec()));
    }
}
