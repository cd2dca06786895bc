//! The embedded engine's log entries as stored: runs of consecutive entries of one append packed
//! into one value and compressed together, so that what entries repeat (collection, origin,
//! field names, actor ids) is stored once a block rather than once an entry.
//!
//! Owns: the block's encoding, which entries go in which block, and reading a stored log value
//! (a block, or one entry as earlier versions stored it) back as `(seq, entry)` pairs. Must not
//! touch: keys other than the log's, or what an entry means (`storage::kv` places and drops them).
//!
//! A block is keyed by its last seq (`l{space}\0{last seq u64 BE}\x01`), so the first key at or
//! after `l{space}\0{seq}` is the value holding `seq` if any does, and the last key gives the
//! head. One entry as earlier versions stored it (`l{space}\0{seq u64 BE}`, no tag) sorts among
//! blocks by its seq and is read as before; an earlier version reading a block key finds a
//! sequence of the wrong length and refuses the log rather than misnumber it.
//!
//! A block's value is the postcard `Vec<StoredEntry>` of its entries, in seq order, packed
//! (`store::packed`: a format byte, then zstd-compressed or as it is).

use std::borrow::Cow;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::StorageError;
use crate::store::packed;

/// A log entry as stored (postcard; field order is the format).
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredEntry<'a> {
    pub collection: Cow<'a, str>,
    pub record: Cow<'a, str>,
    pub origin: Cow<'a, str>,
    #[serde(with = "serde_bytes", borrow)]
    pub change: Cow<'a, [u8]>,
}

/// The byte after a block key's seq; an entry stored alone has none.
pub(crate) const BLOCK_TAG: u8 = 1;
/// A block holds at most this many entries...
const BLOCK_ENTRIES: usize = 32;
/// ...and, unless its one entry is larger, at most this many bytes before compression: sized so
/// that a compressed block mostly stays under the KV's 4 KiB chunk (one key, one read), and
/// `change_at` unpacks little to find one entry.
const BLOCK_RAW_BYTES: usize = 8 << 10;
/// Splits `entries` (consecutive seqs) into blocks, as ranges of their indexes.
pub(super) fn blocks(entries: &[StoredEntry<'_>]) -> Vec<Range<usize>> {
    let mut blocks: Vec<Range<usize>> = Vec::new();
    let mut bytes = 0usize;
    for (at, entry) in entries.iter().enumerate() {
        let size = entry_size(entry);
        match blocks.last_mut() {
            Some(block)
                if block.len() < BLOCK_ENTRIES && bytes.saturating_add(size) <= BLOCK_RAW_BYTES =>
            {
                block.end = at + 1;
                bytes = bytes.saturating_add(size);
            }
            _ => {
                blocks.push(at..at + 1);
                bytes = size;
            }
        }
    }
    blocks
}

/// What an entry takes in a block before compression.
fn entry_size(entry: &StoredEntry<'_>) -> usize {
    [
        entry.collection.len(),
        entry.record.len(),
        entry.origin.len(),
        entry.change.len(),
    ]
    .into_iter()
    .map(|len| varint_len(len).saturating_add(len))
    .fold(0, usize::saturating_add)
}

/// What an entry counts in its space's log bytes (the account's quota): its size as one entry
/// was stored before blocks, whatever its block compresses to, so the quota means what it
/// means on every engine.
pub(super) fn quota_bytes(entry: &StoredEntry<'_>) -> u64 {
    entry_size(entry) as u64
}

/// The bytes of postcard's varint of `n`: 7 bits each.
fn varint_len(n: usize) -> usize {
    (usize::BITS - n.leading_zeros()).div_ceil(7).max(1) as usize
}

/// A block's stored value.
pub(crate) fn pack(entries: &[StoredEntry<'_>]) -> Result<Vec<u8>, StorageError> {
    let raw = postcard::to_stdvec(entries).map_err(|e| StorageError::Encode {
        what: "log block",
        detail: e.to_string(),
    })?;
    Ok(packed::pack(&raw))
}

/// The key's seq (a block's last) and whether it names a block; `None` for a key of another
/// shape.
pub(super) fn log_key_seq(key: &[u8], prefix_len: usize) -> Option<(u64, bool)> {
    let rest = key.get(prefix_len..)?;
    let (seq, block) = match rest.len() {
        8 => (rest, false),
        9 if rest.last() == Some(&BLOCK_TAG) => (rest.get(..8)?, true),
        _ => return None,
    };
    Some((u64::from_be_bytes(<[u8; 8]>::try_from(seq).ok()?), block))
}

/// The entries a stored log value holds, with their seqs, in order: `key` is the value's key,
/// `prefix_len` the length of its space's log prefix.
pub(crate) fn entries(
    key: &[u8],
    value: &[u8],
    prefix_len: usize,
) -> Result<Vec<(u64, StoredEntry<'static>)>, StorageError> {
    read_value(key, value, prefix_len, |first, stored| {
        (first..).zip(stored.into_iter().map(owned)).collect()
    })
}

/// The entry at `seq` in a stored log value (see `entries`), if the value holds it: only that
/// entry is copied out of the block.
pub(crate) fn entry_at(
    key: &[u8],
    value: &[u8],
    prefix_len: usize,
    seq: u64,
) -> Result<Option<StoredEntry<'static>>, StorageError> {
    read_value(key, value, prefix_len, |first, stored| {
        let at = usize::try_from(seq.checked_sub(first)?).ok()?;
        stored.into_iter().nth(at).map(owned)
    })
}

/// The changes at `seqs` (ascending) in a stored log value (see `entries`), each with its seq,
/// the value unpacked once; a seq the value does not hold is left out.
pub(crate) fn changes_at(
    key: &[u8],
    value: &[u8],
    prefix_len: usize,
    seqs: &[u64],
) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    read_value(key, value, prefix_len, |first, stored| {
        let mut wanted = seqs.iter().copied().peekable();
        let mut found = Vec::with_capacity(seqs.len());
        for (seq, entry) in (first..).zip(stored) {
            while wanted.next_if(|&w| w < seq).is_some() {}
            if wanted.next_if_eq(&seq).is_some() {
                found.push((seq, entry.change.into_owned()));
            }
        }
        found
    })
}

/// Hands `read` the entries a stored log value holds, borrowed from it (or from its unpacked
/// block), and the seq of the first.
fn read_value<R>(
    key: &[u8],
    value: &[u8],
    prefix_len: usize,
    read: impl FnOnce(u64, Vec<StoredEntry<'_>>) -> R,
) -> Result<R, StorageError> {
    let (seq, block) = log_key_seq(key, prefix_len)
        .ok_or_else(|| corrupt("log key", "sequence of the wrong length".into()))?;
    if !block {
        let entry: StoredEntry = decode(value, "log entry")?;
        return Ok(read(seq, vec![entry]));
    }
    let raw = packed::unpack(value).map_err(|e| corrupt("log block", e.to_string()))?;
    let stored: Vec<StoredEntry> = decode(&raw, "log block")?;
    let count = u64::try_from(stored.len()).unwrap_or(u64::MAX);
    let first = count
        .checked_sub(1)
        .and_then(|before| seq.checked_sub(before))
        .ok_or_else(|| {
            corrupt(
                "log block",
                format!("{count} entries cannot end at seq {seq}"),
            )
        })?;
    Ok(read(first, stored))
}

fn owned(entry: StoredEntry<'_>) -> StoredEntry<'static> {
    StoredEntry {
        collection: entry.collection.into_owned().into(),
        record: entry.record.into_owned().into(),
        origin: entry.origin.into_owned().into(),
        change: entry.change.into_owned().into(),
    }
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &'static str) -> Result<T, StorageError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| corrupt(what, e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(what, format!("{} bytes after its end", rest.len())));
    }
    Ok(value)
}

fn corrupt(what: &'static str, detail: String) -> StorageError {
    StorageError::Corrupt { what, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(record: &str, change: Vec<u8>) -> StoredEntry<'static> {
        StoredEntry {
            collection: "Note".into(),
            record: record.to_owned().into(),
            origin: "device-a".into(),
            change: change.into(),
        }
    }

    fn key(seq: u64, block: bool) -> Vec<u8> {
        let mut key = b"lspace\0".to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        if block {
            key.push(BLOCK_TAG);
        }
        key
    }

    #[test]
    fn a_block_reads_back_its_entries_at_their_seqs() {
        let stored: Vec<_> = (0..20)
            .map(|n| {
                entry(
                    &format!("r{n}"),
                    format!("change {n} of a note").into_bytes(),
                )
            })
            .collect();
        let value = pack(&stored).unwrap();
        assert!(packed::is_compressed(&value), "repetitive entries compress");
        let read = entries(&key(119, true), &value, 7).unwrap();
        let seqs: Vec<u64> = read.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (100..120).collect::<Vec<_>>());
        let (_, fifth) = &read[5];
        assert_eq!((&*fifth.collection, &*fifth.record), ("Note", "r5"));
        assert_eq!(&fifth.change[..], b"change 5 of a note");
        // One entry read out of the block is the same entry.
        for (seq, entry) in &read {
            let alone = entry_at(&key(119, true), &value, 7, *seq).unwrap().unwrap();
            assert_eq!(
                postcard::to_stdvec(&alone).unwrap(),
                postcard::to_stdvec(entry).unwrap()
            );
        }
        for outside in [0, 99, 120, u64::MAX] {
            assert!(
                entry_at(&key(119, true), &value, 7, outside)
                    .unwrap()
                    .is_none()
            );
        }
        // Several read out at once: those held, each once, in order; the rest left out.
        let asked = [0, 99, 100, 104, 104, 111, 119, 120, u64::MAX];
        let changes = changes_at(&key(119, true), &value, 7, &asked).unwrap();
        let held: Vec<(u64, Vec<u8>)> = [100, 104, 111, 119]
            .into_iter()
            .map(|seq| (seq, format!("change {} of a note", seq - 100).into_bytes()))
            .collect();
        assert_eq!(changes, held);
        // A damaged block in between leaves the next one readable.
        let mut damaged = value.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x55;
        assert!(entries(&key(119, true), &damaged, 7).is_err());
        assert_eq!(entries(&key(119, true), &value, 7).unwrap().len(), 20);
    }

    #[test]
    fn an_entry_counts_its_size_stored_alone() {
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let one = entry("r1", vec![5; len]);
            let alone = postcard::to_stdvec(&one).unwrap();
            assert_eq!(
                quota_bytes(&one),
                alone.len() as u64,
                "a change of {len} bytes"
            );
        }
    }

    #[test]
    fn an_entry_stored_alone_reads_as_before() {
        let alone = postcard::to_stdvec(&entry("r1", vec![1, 2, 3])).unwrap();
        let read = entries(&key(7, false), &alone, 7).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!((read[0].0, &read[0].1.change[..]), (7, &[1u8, 2, 3][..]));
        let one = entry_at(&key(7, false), &alone, 7, 7).unwrap().unwrap();
        assert_eq!(&one.change[..], &[1u8, 2, 3][..]);
        assert!(entry_at(&key(7, false), &alone, 7, 6).unwrap().is_none());
    }

    #[test]
    fn the_fuzz_seeds_are_blocks() {
        for seed in [
            &include_bytes!("../../../fuzz/seeds/stored_entries/log_block_plain.bin")[..],
            &include_bytes!("../../../fuzz/seeds/stored_entries/log_block_zstd.bin")[..],
        ] {
            let read = entries(&key(5, true), seed, 7).unwrap();
            let records: Vec<&str> = read.iter().map(|(_, e)| &*e.record).collect();
            assert_eq!(records, ["n0", "n1", "n2", "n3", "n4", "n5"]);
        }
    }

    #[test]
    fn blocks_are_cut_by_count_and_size() {
        let small: Vec<_> = (0..70)
            .map(|n| entry(&format!("r{n}"), vec![0; 10]))
            .collect();
        assert_eq!(blocks(&small), vec![0..32, 32..64, 64..70]);
        let large: Vec<_> = (0..5)
            .map(|n| entry(&format!("r{n}"), vec![7; BLOCK_RAW_BYTES / 2 - 40]))
            .collect();
        assert_eq!(blocks(&large), vec![0..2, 2..4, 4..5]);
        let huge = [entry("big", vec![1; packed::MAX_UNPACKED + 1])];
        assert_eq!(blocks(&huge), vec![0..1]);
        let value = pack(&huge).unwrap();
        assert!(!packed::is_compressed(&value), "too large to compress");
        assert_eq!(
            entries(&key(3, true), &value, 7).unwrap()[0].1.change.len(),
            packed::MAX_UNPACKED + 1
        );
    }

    #[test]
    fn a_damaged_block_is_refused_not_misread() {
        let stored: Vec<_> = (0..4)
            .map(|n| entry(&format!("r{n}"), vec![n; 40]))
            .collect();
        let value = pack(&stored).unwrap();
        let refused = |key: &[u8], value: &[u8]| {
            matches!(entries(key, value, 7), Err(StorageError::Corrupt { .. }))
        };
        assert!(
            refused(&key(2, true), &value),
            "4 entries cannot end at seq 2"
        );
        assert!(refused(&key(9, true), &[]));
        assert!(refused(&key(9, true), &[9, 1, 2]));
        assert!(refused(&key(9, true), &value[..value.len() / 2]));
        let mut flipped = value.clone();
        flipped[1] ^= 0xff;
        assert!(refused(&key(9, true), &flipped));
        assert!(refused(
            &key(9, true),
            &packed::claiming(packed::MAX_UNPACKED + 1)
        ));
        assert!(refused(b"lspace\0\0\0\x01", &value), "a short key");
        assert!(
            refused(&[key(9, false), vec![2]].concat(), &value),
            "an unknown tag"
        );
    }
}
