//! What a queue entry keeps of its change once the relay has stored it.
//!
//! An entry waiting to be uploaded holds its change (inline, or under its own key when long:
//! `keys::queue_change`). Once completed, the change is in the record's document as well, and
//! the entry is kept for `ferry queue`'s history (`store.keep_completed_days`) and for the
//! download, which places the device's own changes in log order (`Store::with_own_entries`).
//! So once its change has come back in the log, a completed entry keeps only the change's hash
//! and length, `[MARK][hash][length, u32 BE]` (37 bytes in place of a few hundred), and the
//! change is read from the record's document if it is needed again. A change starts with
//! Automerge's magic bytes, never with `MARK`.
//!
//! Owns: that layout. Must not touch: when an entry completes or comes back (`sync`), or how
//! entries are stored (`mod.rs`, `stage_entry`).

use crate::record::change_header;
use automerge::ChangeHash;

const MARK: u8 = 0;
const MARKED_BYTES: usize = 1 + 32 + 4;

/// What an entry's `data` holds of its change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held<'a> {
    /// The change's bytes.
    Whole(&'a [u8]),
    /// Nothing: the change is under its own key (`keys::queue_change`).
    Apart,
    /// The change's hash and length: the entry is completed and its record's document holds it.
    Completed { hash: ChangeHash, len: u32 },
}

impl Held<'_> {
    /// What `data`, an entry's, holds.
    pub fn of(data: &[u8]) -> Held<'_> {
        if data.is_empty() {
            return Held::Apart;
        }
        if data.len() == MARKED_BYTES
            && let Some((&MARK, rest)) = data.split_first()
            && let Some((hash, len)) = rest.split_first_chunk::<32>()
            && let Ok(len) = <[u8; 4]>::try_from(len)
        {
            return Held::Completed {
                hash: ChangeHash(*hash),
                len: u32::from_be_bytes(len),
            };
        }
        Held::Whole(data)
    }

    /// The change's hash, when known without its bytes' being under another key.
    pub fn hash(&self) -> Option<ChangeHash> {
        match self {
            Held::Whole(bytes) => change_header(bytes).ok().map(|h| h.hash),
            Held::Apart => None,
            Held::Completed { hash, .. } => Some(*hash),
        }
    }

    /// The change's length in bytes (0 when apart and not read).
    pub fn change_bytes(&self) -> usize {
        match self {
            Held::Whole(bytes) => bytes.len(),
            Held::Apart => 0,
            Held::Completed { len, .. } => *len as usize,
        }
    }
}

/// What a completed entry keeps of `change`; `None` when `change` is not one whole change
/// (then the entry keeps what it holds).
pub(super) fn mark(change: &[u8]) -> Option<Vec<u8>> {
    let hash = change_header(change).ok()?.hash;
    let len = u32::try_from(change.len()).ok()?;
    let mut marked = Vec::with_capacity(MARKED_BYTES);
    marked.push(MARK);
    marked.extend_from_slice(&hash.0);
    marked.extend_from_slice(&len.to_be_bytes());
    Some(marked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::first_change;
    use automerge::ActorId;

    #[test]
    fn a_completed_entry_keeps_its_changes_hash_and_length() {
        let mut fields = crate::record::Fields::new();
        fields.insert("name".into(), "Ada".into());
        let actor = ActorId::from([3u8; 16].as_slice());
        let change =
            first_change::encode(&actor, 1, "create", &fields, &Default::default()).unwrap();
        let marked = mark(&change.bytes).unwrap();
        assert_eq!(marked.len(), MARKED_BYTES);
        let held = Held::of(&marked);
        assert_eq!(
            held,
            Held::Completed {
                hash: change.hash,
                len: change.bytes.len() as u32
            }
        );
        assert_eq!(held.hash(), Some(change.hash));
        assert_eq!(held.change_bytes(), change.bytes.len());
        let whole = Held::of(&change.bytes);
        assert_eq!(whole, Held::Whole(&change.bytes));
        assert_eq!(whole.hash(), Some(change.hash));
        assert_eq!(Held::of(&[]), Held::Apart);
        // Not a change: kept as it is.
        assert_eq!(mark(b"not a change"), None);
        assert_eq!(mark(&marked), None);
    }
}
