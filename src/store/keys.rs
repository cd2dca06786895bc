//! The key layout of the store's single ordered keyspace.
//!
//! - `d\0{collection}\0{id}`: a record's Automerge document (ids never hold control characters,
//!   so `\0` cannot occur inside one, and keys of one collection are contiguous and id-ordered).
//! - `q{u64 big-endian}`: a SyncQueue entry; `l{u64 big-endian}`: a SyncLog entry.
//! - `b{u64 big-endian}`: the change of the queue entry with that id, when it is longer than
//!   `store::INLINE_CHANGE_BYTES` (the entry then holds no data): written once with the entry,
//!   so that moving the entry between states rewrites only its small value.
//! - `y{bucket u64 big-endian}`: completed queue entries whose changes came back, kept for the
//!   queue's history, `history::BUCKET_IDS` ids to a bucket (`history`).
//! - `p{!priority, order-preserving, u32 big-endian}{id u64 big-endian}` → empty: the pending
//!   index, one key per `Pending` queue entry, so that the next upload batch (highest priority
//!   first, then oldest first) is a range read rather than a scan of the whole queue.
//! - `m{name}`: metadata; `c{name}`: a sync cursor.
//! - `h{collection}\0{id}`: the heads of the record's changes applied from the relay's log (the
//!   "logged" state every device agrees on; conflicts are found against it).
//! - `xe{conflict id}`: a conflict entry (JSON); `xo{id}` → empty: one per open conflict;
//!   `xr{collection}\0{record}\0{id}` → empty: the open conflicts that flag a record;
//!   `xc{change hash}` → conflict id: the conflict a change brought.
//! - `uv{collection}\0{constraint u32 big-endian}{value JSON}`: the records holding a unique value
//!   (and the open clashes over it); `ur{collection}\0{id}`: the unique values a record holds.
//! - `k{counter}\0{kind}\0{collection}` → u64 big-endian: conflict counters.
//! - `z{seq u64 big-endian}`: a relay log entry this device could not apply, kept with why
//!   (`sync::Quarantined`).
//! - `f{seq u64 big-endian}`: changes of the change feed one batch made, from that number on
//!   (`feed::FeedChange`s, up to `feed::PACK_BYTES` to a key).
//! - `v{collection}\0{id}`: a record's view (`views`), written and removed with its document.
//!   The engine holds a record's document and view as one value under the document's key, and
//!   a long document apart under `D\0{collection}\0{id}` (`paired`): the keys here are the
//!   store's view of them.
//! - `i{collection}\0{index}\0{values, order-preserving}{id}` → empty: a secondary index entry of
//!   a live record (`index`), written and removed with its view; `mindex\0{collection}\0{index}`:
//!   how far the index's build got.
//! - `n{collection}` → u64 big-endian: how many documents the collection holds, written with
//!   the batches that add or remove them (`doc_counts`); `mdoc_counts`: present once they are.
//! - `r{collection}\0{id}`: a record's old history set aside after a bootstrap from a flattened
//!   document, until the relay answered the uploads it holds (`set_aside`).

use super::StoreError;

pub const DOC_ALL: &[u8] = b"d\0";
pub const QUEUE: &[u8] = b"q";
pub const LOG: &[u8] = b"l";
pub const META_DEVICE: &[u8] = b"mdevice";
pub const META_FORMAT: &[u8] = b"mformat";
/// Present once the pending index covers every pending entry (stores made before the index
/// existed get it built when they are opened).
pub const META_PENDING_INDEX: &[u8] = b"mpending_index";
/// Present once every long queue change is under its own key (stores made before that get
/// them moved when they are opened).
pub const META_QUEUE_CHANGES: &[u8] = b"mqueue_changes";
pub const QUEUE_CHANGE: &[u8] = b"b";
pub const HISTORY: &[u8] = b"y";
/// What is known to be wrong with the store (JSON, `health::Damage`), until a repair.
pub const META_DAMAGE: &[u8] = b"mdamage";
/// What the daemon last knew of its sync (JSON), for `ferry status` while no daemon runs.
pub const META_SYNC_STATE: &[u8] = b"msync_state";
/// Present while sync is paused across restarts (`ferry sync pause --remember`).
pub const META_SYNC_PAUSED: &[u8] = b"msync_paused";
/// The collections this device syncs (`None`: every one), as last opened (`store::partial`).
pub const META_SYNCED: &[u8] = b"msynced_collections";
/// A backfill under way after collections were added (`partial::Backfill`).
pub const META_BACKFILL: &[u8] = b"mbackfill";
/// What the store's last compaction left on disk per live byte beyond the floor, in
/// thousandths (`Store::bound_space`), big-endian u64.
pub const META_COPY_RATIO: &[u8] = b"mcopy_ratio";
/// The last measure of the space the store takes (`Store::measure_space`), kept for a status
/// read without a daemon: store bytes, live bytes and when (Unix ms), three big-endian u64.
pub const META_SPACE: &[u8] = b"mspace";
pub const PENDING: &[u8] = b"p";
pub const CURSOR: &[u8] = b"c";
pub const CONFLICT: &[u8] = b"xe";
pub const CONFLICT_OPEN: &[u8] = b"xo";
pub const CONFLICT_COUNTER: &[u8] = b"k";
pub const QUARANTINE: &[u8] = b"z";
pub const FEED: &[u8] = b"f";
pub const VIEW: &[u8] = b"v";
/// The policies the record views were computed under, and how far a rebuild got (`views`).
pub const META_VIEWS: &[u8] = b"mviews";

pub const INDEX: &[u8] = b"i";
pub const META_INDEX: &[u8] = b"mindex\0";
pub const SET_ASIDE: &[u8] = b"r";
pub const DOC_COUNT: &[u8] = b"n";
/// Present once every collection's document count is kept (`doc_counts`).
pub const META_DOC_COUNTS: &[u8] = b"mdoc_counts";
/// The queue's entries by status as stored (entries in an upload are stored pending), written
/// with every batch that moves them (`Store::apply_queue_batch`), so that an open does not read
/// the whole queue to count it: four big-endian u64, pending, processing, completed, failed.
/// Absent while they are not known.
pub const META_QUEUE_COUNTS: &[u8] = b"mqueue_counts";

pub fn doc_count(collection: &str) -> Vec<u8> {
    [DOC_COUNT, collection.as_bytes()].concat()
}

pub fn set_aside(collection: &str, id: &str) -> Vec<u8> {
    record_key(SET_ASIDE, collection, id)
}

/// The (collection, id) of a per-record key under `prefix`; `None` for another key.
pub fn record_of(prefix: &[u8], key: &[u8]) -> Option<(String, String)> {
    let rest = key.strip_prefix(prefix)?;
    let split = rest.iter().position(|&b| b == 0)?;
    let (collection, id) = (rest.get(..split)?, rest.get(split + 1..)?);
    Some((
        std::str::from_utf8(collection).ok()?.to_owned(),
        std::str::from_utf8(id).ok()?.to_owned(),
    ))
}
/// What a key holds, by its prefix: one place for `ferry space`'s byte counts and the damage
/// reports of `health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A record's document, as the store names it; on the engine, its document and view.
    Documents,
    /// A document kept apart from its record's view (`paired`).
    LongDocuments,
    Views,
    DocumentCounts,
    IndexEntries,
    QueueEntries,
    QueueChanges,
    QueueHistory,
    PendingIndex,
    SyncLog,
    ChangeFeed,
    LoggedHeads,
    Conflicts,
    UniqueValues,
    Quarantine,
    Cursors,
    SetAside,
    IndexBuilds,
    Metadata,
    Other,
}

impl Kind {
    pub fn of(key: &[u8]) -> Kind {
        let Some((&first, rest)) = key.split_first() else {
            return Kind::Other;
        };
        match first {
            b'd' => Kind::Documents,
            b'D' => Kind::LongDocuments,
            b'v' => Kind::Views,
            b'n' => Kind::DocumentCounts,
            b'i' => Kind::IndexEntries,
            b'q' => Kind::QueueEntries,
            b'b' => Kind::QueueChanges,
            b'y' => Kind::QueueHistory,
            b'p' => Kind::PendingIndex,
            b'l' => Kind::SyncLog,
            b'f' => Kind::ChangeFeed,
            b'h' => Kind::LoggedHeads,
            b'x' | b'k' => Kind::Conflicts,
            b'u' => Kind::UniqueValues,
            b'z' => Kind::Quarantine,
            b'c' => Kind::Cursors,
            b'r' => Kind::SetAside,
            b'm' if rest.starts_with(b"index\0") => Kind::IndexBuilds,
            b'm' => Kind::Metadata,
            _ => Kind::Other,
        }
    }

    /// The keys of this kind, as `ferry space` counts them (on the engine: a record's document
    /// and view are one key, `records`, and views have none of their own).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Documents => "records",
            Kind::LongDocuments => "long_documents",
            Kind::Views => "views",
            Kind::DocumentCounts => "document_counts",
            Kind::IndexEntries => "index_entries",
            Kind::QueueEntries => "queue_entries",
            Kind::QueueChanges => "queue_changes",
            Kind::QueueHistory => "queue_history",
            Kind::PendingIndex => "pending_index",
            Kind::SyncLog => "sync_log",
            Kind::ChangeFeed => "change_feed",
            Kind::LoggedHeads => "logged_heads",
            Kind::Conflicts => "conflicts",
            Kind::UniqueValues => "unique_values",
            Kind::Quarantine => "quarantine",
            Kind::Cursors => "cursors",
            Kind::SetAside => "set_aside_histories",
            Kind::IndexBuilds => "index_builds",
            Kind::Metadata => "metadata",
            Kind::Other => "other",
        }
    }

    /// One key of this kind, as a damage report names it.
    pub fn one(self) -> &'static str {
        match self {
            Kind::Documents | Kind::LongDocuments => "document",
            Kind::Views => "record view",
            Kind::DocumentCounts => "document count",
            Kind::IndexEntries => "index entry",
            Kind::QueueEntries => "queue entry",
            Kind::QueueChanges => "queue change",
            Kind::QueueHistory => "queue history",
            Kind::PendingIndex => "pending index",
            Kind::SyncLog => "sync log entry",
            Kind::ChangeFeed => "feed entry",
            Kind::LoggedHeads => "logged heads",
            Kind::Conflicts | Kind::UniqueValues => "conflict data",
            Kind::Quarantine => "quarantined entry",
            Kind::Cursors => "sync cursor",
            Kind::SetAside => "set-aside history",
            Kind::IndexBuilds | Kind::Metadata => "metadata",
            Kind::Other => "unknown",
        }
    }
}

/// `{prefix}{a}\0{b}`: the layout of every per-record key.
fn record_key(prefix: &[u8], collection: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + collection.len() + id.len() + 1);
    key.extend_from_slice(prefix);
    key.extend_from_slice(collection.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

pub fn logged_heads(collection: &str, id: &str) -> Vec<u8> {
    record_key(b"h", collection, id)
}

pub fn conflict(id: &str) -> Vec<u8> {
    [CONFLICT, id.as_bytes()].concat()
}

pub fn conflict_open(id: &str) -> Vec<u8> {
    [CONFLICT_OPEN, id.as_bytes()].concat()
}

/// Prefix of the open conflicts that flag one record.
pub fn record_conflicts(collection: &str, id: &str) -> Vec<u8> {
    let mut key = record_key(b"xr", collection, id);
    key.push(0);
    key
}

pub fn change_conflict(hash: &str) -> Vec<u8> {
    [b"xc".as_slice(), hash.as_bytes()].concat()
}

/// The prefix of every unique value's key.
pub fn unique_value_prefix() -> Vec<u8> {
    b"uv".to_vec()
}

pub fn unique_value(collection: &str, constraint: usize, value: &[u8]) -> Vec<u8> {
    let mut key = record_key(b"uv", collection, "");
    key.extend_from_slice(&u32::try_from(constraint).unwrap_or(u32::MAX).to_be_bytes());
    key.extend_from_slice(value);
    key
}

pub fn unique_held(collection: &str, id: &str) -> Vec<u8> {
    record_key(b"ur", collection, id)
}

pub fn conflict_counter(counter: &str, kind: &str, collection: &str) -> Vec<u8> {
    let mut key = record_key(CONFLICT_COUNTER, counter, kind);
    key.push(0);
    key.extend_from_slice(collection.as_bytes());
    key
}

pub fn cursor(name: &str) -> Vec<u8> {
    let mut key = CURSOR.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

pub fn view(collection: &str, id: &str) -> Vec<u8> {
    record_key(VIEW, collection, id)
}

pub fn view_prefix(collection: &str) -> Vec<u8> {
    record_key(VIEW, collection, "")
}

/// The view key of the record whose document key is `doc`.
pub fn view_of_doc(doc: &[u8]) -> Option<Vec<u8>> {
    Some([VIEW, doc.get(DOC_ALL.len()..)?].concat())
}

/// The document key of the record whose view key is `view`; `None` for another key.
pub fn doc_of_view(view: &[u8]) -> Option<Vec<u8>> {
    let record = view.strip_prefix(VIEW)?;
    Some([DOC_ALL, record].concat())
}

/// Prefix of one index's entries, `index` being its name.
pub fn index_prefix(collection: &str, index: &str) -> Vec<u8> {
    let mut key = record_key(INDEX, collection, index);
    key.push(0);
    key
}

pub fn index_progress(collection: &str, index: &str) -> Vec<u8> {
    record_key(META_INDEX, collection, index)
}

/// The collection and index an index entry's key belongs to.
pub fn index_of_entry(key: &[u8]) -> Option<(&str, &str)> {
    let mut parts = key.strip_prefix(INDEX)?.splitn(3, |&b| b == 0);
    let collection = std::str::from_utf8(parts.next()?).ok()?;
    let index = std::str::from_utf8(parts.next()?).ok()?;
    parts.next()?;
    Some((collection, index))
}

pub fn doc_prefix(collection: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + collection.len());
    key.extend_from_slice(DOC_ALL);
    key.extend_from_slice(collection.as_bytes());
    key.push(0);
    key
}

pub fn doc(collection: &str, id: &str) -> Vec<u8> {
    let mut key = doc_prefix(collection);
    key.extend_from_slice(id.as_bytes());
    key
}

fn corrupt(detail: &str) -> StoreError {
    StoreError::Decode {
        what: "key",
        detail: detail.to_owned(),
    }
}

/// The id part of a document key whose collection prefix is `prefix_len` bytes.
pub fn doc_id(key: &[u8], prefix_len: usize) -> Result<&str, StoreError> {
    key.get(prefix_len..)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| corrupt("document key with a bad id"))
}

pub fn doc_collection(key: &[u8]) -> Result<&str, StoreError> {
    let rest = key
        .get(DOC_ALL.len()..)
        .ok_or_else(|| corrupt("short document key"))?;
    let collection = rest
        .iter()
        .position(|&b| b == 0)
        .and_then(|end| rest.get(..end))
        .ok_or_else(|| corrupt("document key without a collection"))?;
    std::str::from_utf8(collection).map_err(|_| corrupt("document key with a bad collection"))
}

fn seq_key(prefix: &[u8], n: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&n.to_be_bytes());
    key
}

pub fn queue(id: u64) -> Vec<u8> {
    seq_key(QUEUE, id)
}

pub fn feed(seq: u64) -> Vec<u8> {
    seq_key(FEED, seq)
}

pub fn quarantine(seq: u64) -> Vec<u8> {
    seq_key(QUARANTINE, seq)
}

pub fn queue_change(id: u64) -> Vec<u8> {
    seq_key(QUEUE_CHANGE, id)
}

/// The key of a bucket of the queue's history (`history`).
pub fn history(bucket: u64) -> Vec<u8> {
    seq_key(HISTORY, bucket)
}

pub fn log(id: u64) -> Vec<u8> {
    seq_key(LOG, id)
}

/// The pending-index key of a queue entry: keys sort by priority, highest first, then by id.
pub fn pending(priority: i32, id: u64) -> Vec<u8> {
    // Flipping the sign bit maps i32 order onto u32 order; inverting all bits reverses it.
    let rank = !((priority as u32) ^ 0x8000_0000);
    let mut key = PENDING.to_vec();
    key.extend_from_slice(&rank.to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The queue id a pending-index key points at.
pub fn pending_id(key: &[u8]) -> Result<u64, StoreError> {
    seq_of(key, PENDING.len() + 4)
}

pub fn seq_of(key: &[u8], prefix_len: usize) -> Result<u64, StoreError> {
    key.get(prefix_len..)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("sequence key of the wrong length"))
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

/// The smallest key greater than `key`.
pub fn after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(doc("Customer", "42"), b"d\0Customer\x0042");
        assert_eq!(doc_collection(&doc("Customer", "42")).unwrap(), "Customer");
        assert_eq!(
            doc_id(&doc("C", "x/y"), doc_prefix("C").len()).unwrap(),
            "x/y"
        );
        assert_eq!(prefix_end(b"d\0C\0"), b"d\0C\x01");
        assert_eq!(view("Customer", "42"), b"vCustomer\x0042");
        assert_eq!(view_of_doc(&doc("C", "x/y")), Some(view("C", "x/y")));
        assert_eq!(doc_of_view(&view("C", "x/y")), Some(doc("C", "x/y")));
        assert_eq!(doc_of_view(&doc("C", "x/y")), None);
        assert_eq!(
            doc_id(&view("C", "x/y"), view_prefix("C").len()).unwrap(),
            "x/y"
        );
        assert_eq!(seq_of(&queue(258), 1).unwrap(), 258);
        assert!(queue(1) < queue(256));
        let order = [
            pending(i32::MAX, 9),
            pending(5, 1),
            pending(5, 2),
            pending(0, 1),
            pending(-1, 0),
            pending(i32::MIN, 0),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(pending_id(&pending(-3, 77)).unwrap(), 77);
        let entry = [index_prefix("C", "a,b"), b"\x02\x01\0x".to_vec()].concat();
        assert_eq!(index_of_entry(&entry), Some(("C", "a,b")));
        assert_eq!(index_of_entry(&doc("C", "x")), None);
        assert_eq!(
            record_of(SET_ASIDE, &set_aside("C", "x")),
            Some(("C".to_owned(), "x".to_owned()))
        );
        assert_eq!(record_of(SET_ASIDE, &doc("C", "x")), None);
        for (key, named) in [
            (doc("C", "x"), "records"),
            (b"D\0C\0x".to_vec(), "long_documents"),
            (view("C", "x"), "views"),
            (doc_count("C"), "document_counts"),
            (entry.clone(), "index_entries"),
            (queue(1), "queue_entries"),
            (queue_change(1), "queue_changes"),
            (history(1), "queue_history"),
            (pending(0, 1), "pending_index"),
            (log(1), "sync_log"),
            (feed(1), "change_feed"),
            (logged_heads("C", "x"), "logged_heads"),
            (conflict("c1"), "conflicts"),
            (conflict_counter("detected", "k", "C"), "conflicts"),
            (unique_held("C", "x"), "unique_values"),
            (quarantine(1), "quarantine"),
            (cursor("relay"), "cursors"),
            (set_aside("C", "x"), "set_aside_histories"),
            (index_progress("C", "a"), "index_builds"),
            (META_DEVICE.to_vec(), "metadata"),
            (Vec::new(), "other"),
        ] {
            assert_eq!(
                Kind::of(&key).name(),
                named,
                "{}",
                crate::store::kv::printable(&key)
            );
        }
    }
}
