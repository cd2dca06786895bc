//! The queue's history: completed entries kept for `ferry queue` (`store.keep_completed_days`),
//! many to a key.
//!
//! Once its change has come back in the relay's log, a completed entry keeps only its change's
//! hash (`completed`) and nothing moves it any more: it leaves its own key (`q{id}`) for its
//! bucket, `y{id / BUCKET_IDS}`, which holds the completed entries of those ids in id order,
//! packed (`packed`: the entries of one bucket share most of their bytes). A key costs the
//! engine about 200 bytes whatever it holds, more than the entry itself, and a device keeps a
//! month of them.
//!
//! Owns: the buckets: moving entries in, reading them back by id and in order, pruning them.
//! Must not touch: the live queue's keys (`mod.rs`), or when an entry completes or comes back
//! (`sync`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ferry_proto::{QueueStatus, SyncQueueEntry};

use super::kv::{Batch, Kv};
use super::{StoreError, keys, packed};

/// Ids to a bucket: about 1.4 KiB of entries before compression, 700 bytes after. Larger
/// values cost sled more than the keys they save (its nodes fill with few of them): measured
/// at 100,000 records, 64 ids to a bucket left the device 65 bytes a record larger on disk
/// than 16, and 8 no smaller.
const BUCKET_IDS: u64 = 16;

/// Whether the history may hold entries of `status` (any, for `None`): it holds completed
/// ones only.
pub(super) fn may_hold(status: Option<QueueStatus>) -> bool {
    status.is_none_or(|s| s == QueueStatus::Completed)
}

fn bucket_of(id: u64) -> u64 {
    id / BUCKET_IDS
}

fn bucket_key(id: u64) -> Vec<u8> {
    keys::history(bucket_of(id))
}

fn damaged(detail: impl ToString) -> StoreError {
    StoreError::Decode {
        what: "queue history",
        detail: detail.to_string(),
    }
}

/// The entries a bucket holds, in id order: `key` and `value` as stored.
pub(crate) fn read(key: &[u8], value: &[u8]) -> Result<Vec<SyncQueueEntry>, StoreError> {
    let bucket = keys::seq_of(key, keys::HISTORY.len())?;
    let raw = packed::unpack(value).map_err(damaged)?;
    let entries: Vec<SyncQueueEntry> = super::decode(&raw, "queue history")?;
    if let Some(stray) = entries.iter().find(|e| bucket_of(e.id) != bucket) {
        return Err(damaged(format!(
            "bucket {bucket} holds queue entry {}",
            stray.id
        )));
    }
    if !entries.is_sorted_by_key(|e| e.id) {
        return Err(damaged(format!("bucket {bucket} is out of order")));
    }
    Ok(entries)
}

/// A bucket's stored value.
pub(crate) fn pack(entries: &[SyncQueueEntry]) -> Result<Vec<u8>, StoreError> {
    Ok(packed::pack(&super::encode(&entries, "queue history")?))
}

/// The bucket at `key`, none when there is no such key.
fn bucket(kv: &dyn Kv, key: &[u8]) -> Result<Vec<SyncQueueEntry>, StoreError> {
    match kv.get(key)? {
        Some(value) => read(key, &value),
        None => Ok(Vec::new()),
    }
}

/// The entry `id`, if the history holds it.
pub(super) fn entry(kv: &dyn Kv, id: u64) -> Result<Option<SyncQueueEntry>, StoreError> {
    Ok(bucket(kv, &bucket_key(id))?
        .into_iter()
        .find(|entry| entry.id == id))
}

/// Which of `ids` the history holds, reading each bucket once. A bucket that cannot be read
/// holds none of them.
pub(super) fn holds(kv: &dyn Kv, ids: &BTreeSet<u64>) -> BTreeSet<u64> {
    let mut held = BTreeSet::new();
    let buckets: BTreeSet<u64> = ids.iter().map(|&id| bucket_of(id)).collect();
    for bucket in buckets {
        let key = keys::history(bucket);
        if let Ok(entries) = self::bucket(kv, &key) {
            held.extend(entries.iter().map(|e| e.id).filter(|id| ids.contains(id)));
        }
    }
    held
}

/// Stages moving `entries` (completed, their changes back in the log) into the history, in
/// `batch`; the caller removes their own keys in the same batch. Runs under the queue's lock.
pub(super) fn stage_moves(
    kv: &dyn Kv,
    batch: &mut Batch,
    entries: Vec<SyncQueueEntry>,
) -> Result<(), StoreError> {
    let mut by_bucket: BTreeMap<u64, Vec<SyncQueueEntry>> = BTreeMap::new();
    for entry in entries {
        by_bucket
            .entry(bucket_of(entry.id))
            .or_default()
            .push(entry);
    }
    for (bucket, moved) in by_bucket {
        let key = keys::history(bucket);
        let mut held: BTreeMap<u64, SyncQueueEntry> = self::bucket(kv, &key)?
            .into_iter()
            .map(|e| (e.id, e))
            .collect();
        held.extend(moved.into_iter().map(|e| (e.id, e)));
        let held: Vec<SyncQueueEntry> = held.into_values().collect();
        batch.put(key, pack(&held)?);
    }
    Ok(())
}

/// A bound on the ids the history holds: every one is below it. The last bucket's last id and
/// one; when that bucket cannot be read (damaged), the end of its range, so that a damaged
/// bucket does not keep the store from opening or have an id given twice.
pub(super) fn ids_below(kv: &dyn Kv) -> Result<u64, StoreError> {
    let end = keys::prefix_end(keys::HISTORY);
    let Some(key) = kv.last_key(keys::HISTORY, &end)? else {
        return Ok(0);
    };
    let bucket = keys::seq_of(&key, keys::HISTORY.len())?;
    let last = match kv.get(&key) {
        Ok(Some(value)) => read(&key, &value)
            .ok()
            .and_then(|entries| entries.last().map(|e| e.id)),
        _ => None,
    };
    Ok(match last {
        Some(id) => id.saturating_add(1),
        None => bucket.saturating_add(1).saturating_mul(BUCKET_IDS),
    })
}

/// Stages forgetting the entries last updated before `cutoff_ms`, at most `max`, oldest first;
/// returns how many. Ids grow with time: past an entry created after the cutoff, nothing later
/// can be older.
pub(super) fn stage_prune(
    kv: &dyn Kv,
    batch: &mut Batch,
    cutoff_ms: u64,
    max: usize,
) -> Result<usize, StoreError> {
    let end = keys::prefix_end(keys::HISTORY);
    let mut start = keys::HISTORY.to_vec();
    let mut pruned = 0;
    while pruned < max {
        let Some((key, value)) = kv.range(&start, &end, 1)?.into_iter().next() else {
            break;
        };
        start = keys::after(&key);
        let entries = read(&key, &value)?;
        let held = entries.len();
        let mut kept = Vec::with_capacity(held);
        let mut done = false;
        for entry in entries {
            done |= entry.created_at >= cutoff_ms || pruned == max;
            if !done && entry.updated_at < cutoff_ms {
                pruned += 1;
            } else {
                kept.push(entry);
            }
        }
        // A bucket nothing left is not written again.
        if kept.is_empty() {
            batch.remove(key);
        } else if kept.len() < held {
            batch.put(key, pack(&kept)?);
        }
        if done {
            break;
        }
    }
    Ok(pruned)
}

/// The history's entries after an id, in id order, a bucket at a time.
pub(super) struct Walk {
    after: Option<u64>,
    next_key: Vec<u8>,
    buffered: VecDeque<SyncQueueEntry>,
    done: bool,
}

impl Walk {
    pub(super) fn after(after: Option<u64>) -> Walk {
        let first = after.map_or(0, |id| id.saturating_add(1));
        Walk {
            after,
            next_key: bucket_key(first),
            buffered: VecDeque::new(),
            done: false,
        }
    }

    /// The next entry, if its id is below `bound` (any, for `None`).
    pub(super) fn next_below(
        &mut self,
        kv: &dyn Kv,
        bound: Option<u64>,
    ) -> Result<Option<SyncQueueEntry>, StoreError> {
        while self.buffered.is_empty() && !self.done {
            let end = keys::prefix_end(keys::HISTORY);
            let Some((key, value)) = kv.range(&self.next_key, &end, 1)?.into_iter().next() else {
                self.done = true;
                break;
            };
            self.next_key = keys::after(&key);
            let after = self.after;
            self.buffered.extend(
                read(&key, &value)?
                    .into_iter()
                    .filter(|e| after.is_none_or(|after| e.id > after)),
            );
        }
        match self.buffered.front() {
            Some(next) if bound.is_none_or(|bound| next.id < bound) => {
                Ok(self.buffered.pop_front())
            }
            _ => Ok(None),
        }
    }
}

/// Up to `limit` entries below `before` that `wanted` keeps, newest first.
pub(super) fn newest(
    kv: &dyn Kv,
    before: Option<u64>,
    limit: usize,
    wanted: impl Fn(&SyncQueueEntry) -> bool,
) -> Result<Vec<SyncQueueEntry>, StoreError> {
    let mut out = Vec::new();
    let mut end = before.map_or_else(
        || keys::prefix_end(keys::HISTORY),
        |id| keys::history(bucket_of(id).saturating_add(1)),
    );
    while out.len() < limit {
        let Some(key) = kv.last_key(keys::HISTORY, &end)? else {
            break;
        };
        if let Some(value) = kv.get(&key)? {
            let entries = read(&key, &value)?;
            out.extend(
                entries
                    .into_iter()
                    .rev()
                    .filter(|e| before.is_none_or(|before| e.id < before) && wanted(e))
                    .take(limit - out.len()),
            );
        }
        end = key;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Fields;
    use crate::store::kv::MemoryKv;
    use crate::store::sync::{BatchLimits, RetryPolicy};
    use crate::store::tests::open;
    use crate::store::{QueueAction, Store, Write};
    use ferry_proto::session::OwnEntry;
    use ferry_proto::wire::{ChangeOutcome, ChangeResult, ErrorCode};

    fn put(n: usize) -> Write {
        let mut fields = Fields::new();
        fields.insert("n".into(), serde_json::json!(n));
        Write::Put {
            collection: "Note".into(),
            id: Some(format!("n{n}")),
            fields,
        }
    }

    /// Uploads every pending entry, as stored at log seqs from `first_seq`, and reads them back
    /// in the log as this device's own: completed, then back.
    fn upload_and_read_back(store: &Store, first_seq: u64) {
        let batch = store
            .next_upload_batch(BatchLimits::of(usize::MAX, usize::MAX))
            .unwrap()
            .entries;
        let results: Vec<ChangeResult> = (first_seq..)
            .zip(&batch)
            .map(|(seq, e)| ChangeResult {
                entry: e.id,
                outcome: ChangeOutcome::Stored { seq },
            })
            .collect();
        store
            .finish_upload(&results, &RetryPolicy::immediate(5))
            .unwrap();
        let own: Vec<OwnEntry> = (first_seq..)
            .zip(&batch)
            .map(|(seq, e)| OwnEntry { seq, entry: e.id })
            .collect();
        let log = store.with_own_entries(Vec::new(), &own).unwrap();
        assert_eq!(log.len(), batch.len());
    }

    fn key_count(kv: &MemoryKv, prefix: &[u8]) -> u64 {
        kv.count(prefix, &keys::prefix_end(prefix)).unwrap()
    }

    fn ids(entries: &[SyncQueueEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.id).collect()
    }

    #[test]
    fn entries_back_from_the_log_go_to_the_history_and_read_as_before() {
        let kv = MemoryKv::new();
        let store = open(&kv);
        for n in 1..=70 {
            store.write(put(n)).unwrap();
        }
        let own_log = store.queue(None, None, 100).unwrap();
        upload_and_read_back(&store, 1);
        // Entries 1-70 fill buckets 0 to 70 / BUCKET_IDS; none keeps its own key.
        assert_eq!(key_count(&kv, keys::QUEUE), 0);
        assert_eq!(key_count(&kv, keys::HISTORY), bucket_of(70) + 1);
        let pending = store.write(put(71)).unwrap().queue_id.unwrap();
        assert_eq!(pending, 71);

        // Listed in id order with the live queue, from any point, and newest first.
        let all = store.queue(None, None, 100).unwrap();
        assert_eq!(ids(&all), (1..=71).collect::<Vec<_>>());
        assert!(all[..70].iter().all(|e| e.status == QueueStatus::Completed));
        assert_eq!(all[70].status, QueueStatus::Pending);
        for (read, written) in all.iter().zip(&own_log) {
            assert_eq!(
                (&read.model_name, &read.object_id),
                (&written.model_name, &written.object_id)
            );
            assert_eq!(read.data.len(), 37, "the change's hash and length");
        }
        assert_eq!(ids(&store.queue(None, Some(62), 3).unwrap()), [63, 64, 65]);
        assert_eq!(ids(&store.queue(None, Some(69), 5).unwrap()), [70, 71]);
        assert_eq!(
            ids(&store.queue(Some(QueueStatus::Pending), None, 5).unwrap()),
            [71]
        );
        assert_eq!(
            ids(&store.queue_newest(None, None, 3).unwrap()),
            [71, 70, 69]
        );
        assert_eq!(
            ids(&store
                .queue_newest(Some(QueueStatus::Pending), None, 3)
                .unwrap()),
            [71]
        );
        assert_eq!(store.queue_ids(QueueStatus::Completed).unwrap().len(), 70);
        assert_eq!(
            ids(&store
                .queue_newest(Some(QueueStatus::Completed), Some(66), 4)
                .unwrap()),
            [65, 64, 63, 62]
        );
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.completed, counts.pending), (70, 1));

        // An entry in the history is found by id, and is still completed.
        assert!(matches!(
            store.queue_transition(&[5], &QueueAction::Retry),
            Err(StoreError::Transition(_))
        ));
        // A download reading the same span again reads them from the history.
        let again: Vec<OwnEntry> = (1..=3).map(|id| OwnEntry { seq: id, entry: id }).collect();
        let log = store.with_own_entries(Vec::new(), &again).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(key_count(&kv, keys::QUEUE), 1);
        assert!(store.examine().unwrap().damage.is_none());

        // Reopened, the next id comes after every id the history holds.
        store.flush().unwrap();
        drop(store);
        let store = open(&kv);
        let next = store.write(put(72)).unwrap().queue_id.unwrap();
        assert_eq!(next, 72);
        assert!(store.examine().unwrap().damage.is_none());

        // Pruning drops the oldest first, a bucket once it is empty, and nothing live.
        assert_eq!(store.prune_history(u64::MAX, 0, 60).unwrap().0, 60);
        assert_eq!(
            key_count(&kv, keys::HISTORY),
            bucket_of(70) - bucket_of(61) + 1
        );
        assert_eq!(ids(&store.queue(None, None, 3).unwrap()), [61, 62, 63]);
        assert_eq!(store.prune_history(u64::MAX, 0, 60).unwrap().0, 10);
        assert_eq!(key_count(&kv, keys::HISTORY), 0);
        assert_eq!(ids(&store.queue(None, None, 10).unwrap()), [71, next]);
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.completed, counts.pending), (0, 2));
    }

    /// A store whose entries 1-5 went up and came back (in the history) and 6 is pending.
    fn five_back_one_pending(kv: &MemoryKv) -> Store {
        let store = open(kv);
        for n in 1..=5 {
            store.write(put(n)).unwrap();
        }
        upload_and_read_back(&store, 1);
        store.write(put(6)).unwrap();
        store.flush().unwrap();
        store
    }

    #[test]
    fn a_damaged_bucket_is_found_and_repaired_without_losing_a_change() {
        let kv = MemoryKv::new();
        let store = five_back_one_pending(&kv);
        assert!(kv.damage(&keys::history(0)));
        let checkup = store.examine().unwrap();
        let damage = checkup.damage.unwrap();
        assert_eq!(damage.damaged.len(), 1, "{damage:?}");
        assert_eq!(damage.damaged[0].kind, "queue history");
        assert!(damage.unrecoverable.is_empty());
        let (_, repaired) = store.repair().unwrap();
        assert_eq!(repaired.removed.len(), 1);
        assert!(!repaired.reads_relay_again);
        assert!(store.examine().unwrap().damage.is_none());
        // The journal still held the lost entries' changes: they go up again (the relay knows
        // them and answers with where it stored them).
        assert_eq!(repaired.restored.len(), 5);
        let left = store.queue(None, None, 10).unwrap();
        assert_eq!(ids(&left), [1, 2, 3, 4, 5, 6]);
        assert!(left.iter().all(|e| e.status == QueueStatus::Pending));
        assert!(store.get("Note", "n3").unwrap().fields.get("n").is_some());
    }

    fn entry(id: u64, updated_at: u64) -> SyncQueueEntry {
        SyncQueueEntry {
            id,
            operation: ferry_proto::Operation::Create,
            model_name: "Note".into(),
            object_id: format!("n{id}"),
            data: vec![0; 37],
            status: QueueStatus::Completed,
            retry_count: 0,
            last_error: None,
            created_at: updated_at,
            updated_at,
            priority: 0,
        }
    }

    #[test]
    fn buckets_merge_what_moves_in_and_refuse_what_is_not_theirs() {
        let kv = MemoryKv::new();
        let mut batch = Batch::default();
        stage_moves(
            &kv,
            &mut batch,
            vec![entry(3, 1), entry(1, 1), entry(200, 1)],
        )
        .unwrap();
        kv.apply(batch).unwrap();
        let mut batch = Batch::default();
        stage_moves(&kv, &mut batch, vec![entry(2, 1), entry(3, 2)]).unwrap();
        kv.apply(batch).unwrap();
        let first = bucket(&kv, &keys::history(0)).unwrap();
        assert_eq!(ids(&first), [1, 2, 3]);
        assert_eq!(first[2].updated_at, 2, "moved again, the newer copy stays");
        assert_eq!(entry_of(&kv, 200), Some(200));
        assert_eq!(entry_of(&kv, 4), None);
        assert_eq!(ids_below(&kv).unwrap(), 201);
        // Nothing old enough: nothing pruned, no bucket written again.
        let mut batch = Batch::default();
        assert_eq!(stage_prune(&kv, &mut batch, 1, 10).unwrap(), 0);
        assert!(batch.is_empty());
        let asked = BTreeSet::from([2, 4, 200, 500]);
        assert_eq!(holds(&kv, &asked), BTreeSet::from([2, 200]));

        let mut walk = Walk::after(Some(1));
        let mut walked = Vec::new();
        while let Some(e) = walk.next_below(&kv, None).unwrap() {
            walked.push(e.id);
        }
        assert_eq!(walked, [2, 3, 200]);
        let mut walk = Walk::after(None);
        assert_eq!(walk.next_below(&kv, Some(1)).unwrap(), None);
        assert_eq!(
            walk.next_below(&kv, Some(2)).unwrap().map(|e| e.id),
            Some(1)
        );

        assert!(kv.damage(&bucket_key(200)));
        assert_eq!(
            ids_below(&kv).unwrap(),
            (bucket_of(200) + 1) * BUCKET_IDS,
            "a damaged last bucket: the end of its range"
        );

        // A bucket holding another bucket's entry, out of order, or damaged, is refused.
        let value = kv.get(&keys::history(0)).unwrap().unwrap();
        assert!(read(&keys::history(1), &value).is_err());
        let unordered = pack(&[entry(3, 1), entry(2, 1)]).unwrap();
        assert!(read(&keys::history(0), &unordered).is_err());
        assert!(read(&keys::history(0), &[7, 1, 2]).is_err());
        assert!(read(&keys::history(0), &value[..value.len() - 1]).is_err());
    }

    #[test]
    fn the_fuzz_seed_is_a_bucket() {
        let seed = include_bytes!("../../fuzz/seeds/stored_entries/history_bucket.bin");
        assert!(packed::is_compressed(seed));
        let read = read(&keys::history(0), seed).unwrap();
        assert_eq!(ids(&read), [1, 2, 3, 4, 5]);
        assert_eq!(read[4].object_id, "c000000005");
    }

    fn entry_of(kv: &MemoryKv, id: u64) -> Option<u64> {
        super::entry(kv, id).unwrap().map(|e| e.id)
    }

    /// What happens to a queue in the property test below.
    #[derive(Debug, Clone)]
    enum Step {
        /// A write to record `n`: a new one, or an update.
        Write(usize),
        /// Up to `take` pending entries go up; the relay answers each by the next answer (0
        /// stored, 1 refused for now, 2 refused for good, 3 no answer: left in flight).
        Upload {
            take: usize,
            answers: Vec<u8>,
        },
        /// The stored ones come back in the log: they go to the history.
        ReadBack,
        /// `ferry retry`, or a move made by hand (refused when the entry cannot make it).
        Transition {
            id: u64,
            action: u8,
        },
        Prune(usize),
        /// A restart: what was in flight is forgotten, still stored pending.
        Reopen,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0usize..12).prop_map(Step::Write),
            3 => (1usize..8, proptest::collection::vec(0u8..4, 8))
                .prop_map(|(take, answers)| Step::Upload { take, answers }),
            2 => Just(Step::ReadBack),
            2 => (1u64..40, 0u8..3).prop_map(|(id, action)| Step::Transition { id, action }),
            1 => (0usize..20).prop_map(Step::Prune),
            2 => Just(Step::Reopen),
        ]
    }

    fn counted(entries: &[SyncQueueEntry]) -> crate::store::QueueCounts {
        let mut counts = crate::store::QueueCounts::default();
        for entry in entries {
            counts.count(entry.status);
        }
        counts
    }

    proptest::proptest! {
        /// The queue's counts, kept with every move and read back at each open instead of
        /// counted again, always equal the entries listed, and `doctor` finds the counts stored
        /// right, across writes, uploads and their answers, entries left in flight, entries
        /// back from the log, moves by hand, pruning and restarts.
        #[test]
        fn the_queue_counts_kept_equal_the_entries_across_restarts(
            steps in proptest::collection::vec(step(), 1..40)
        ) {
            let kv = MemoryKv::new();
            let mut store = open(&kv);
            let mut next_seq = 1;
            let mut stored: Vec<OwnEntry> = Vec::new();
            for step in steps {
                match step {
                    Step::Write(n) => {
                        store.write(put(n)).unwrap();
                    }
                    Step::Upload { take, answers } => {
                        let batch = store
                            .next_upload_batch(BatchLimits::of(take, usize::MAX))
                            .unwrap()
                            .entries;
                        let mut results = Vec::new();
                        for (entry, answer) in batch.iter().zip(answers.iter().cycle()) {
                            let outcome = match answer {
                                0 => {
                                    stored.push(OwnEntry { seq: next_seq, entry: entry.id });
                                    next_seq += 1;
                                    ChangeOutcome::Stored { seq: next_seq - 1 }
                                }
                                1 => ChangeOutcome::Rejected {
                                    code: ErrorCode::Overloaded,
                                    message: "busy".into(),
                                },
                                2 => ChangeOutcome::Rejected {
                                    code: ErrorCode::InvalidChange,
                                    message: "refused".into(),
                                },
                                _ => continue,
                            };
                            results.push(ChangeResult { entry: entry.id, outcome });
                        }
                        store
                            .finish_upload(&results, &RetryPolicy::immediate(5))
                            .unwrap();
                    }
                    Step::ReadBack => {
                        // Refused when one of them was pruned meanwhile: nothing moves then.
                        let _ = store.with_own_entries(Vec::new(), &stored);
                        stored.clear();
                    }
                    Step::Transition { id, action } => {
                        let action = match action {
                            0 => QueueAction::Retry,
                            1 => QueueAction::Start,
                            _ => QueueAction::Complete,
                        };
                        let _ = store.queue_transition(&[id], &action);
                    }
                    Step::Prune(max) => {
                        store.prune_history(u64::MAX, 0, max).unwrap();
                    }
                    Step::Reopen => {
                        store.flush().unwrap();
                        drop(store);
                        store = open(&kv);
                    }
                }
                let listed = store.queue(None, None, usize::MAX).unwrap();
                proptest::prop_assert_eq!(store.queue_counts().unwrap(), counted(&listed));
                proptest::prop_assert_eq!(store.examine().unwrap().damage, None);
            }
        }
    }

    #[test]
    fn an_open_reads_the_queue_counts_stored_and_doctor_finds_them_wrong() {
        let kv = MemoryKv::new();
        drop(five_back_one_pending(&kv));
        let stored = kv.get(keys::META_QUEUE_COUNTS).unwrap().unwrap();
        let stored = crate::store::QueueCounts::from_stored(&stored).unwrap();
        assert_eq!((stored.pending, stored.completed), (1, 5));

        // The open takes the counts as stored: an entry written past the store is not counted.
        let mut batch = Batch::default();
        let mut stray = store_entry_of(&kv, 6);
        stray.id = 7;
        batch.put(
            keys::queue(7),
            crate::store::encode(&stray, "queue entry").unwrap(),
        );
        batch.put(keys::pending(stray.priority, 7), Vec::new());
        kv.apply(batch).unwrap();
        let store = open(&kv);
        assert_eq!(store.queue_counts().unwrap(), stored);

        // `doctor` finds them wrong; the repair drops them, and they are counted again.
        let damage = store.examine().unwrap().damage.unwrap();
        assert_eq!(damage.damaged.len(), 1, "{damage:?}");
        assert!(
            damage.damaged[0].detail.contains(
                "say 1 pending, 0 processing, 5 completed, 0 failed; the queue holds 2 pending"
            ),
            "{damage:?}"
        );
        store.repair().unwrap();
        assert_eq!(kv.get(keys::META_QUEUE_COUNTS).unwrap(), None);
        assert_eq!(store.queue_counts().unwrap().pending, 2);
        assert_eq!(store.examine().unwrap().damage, None);
        // Counted again, they are stored with the next move.
        store.write(put(8)).unwrap();
        let stored = kv.get(keys::META_QUEUE_COUNTS).unwrap().unwrap();
        let stored = crate::store::QueueCounts::from_stored(&stored).unwrap();
        assert_eq!((stored.pending, stored.completed), (3, 5));

        // Unreadable counts are found too; the queue is counted instead, and the counts kept.
        let mut batch = Batch::default();
        batch.put(keys::META_QUEUE_COUNTS.to_vec(), vec![1, 2, 3]);
        kv.apply(batch).unwrap();
        drop(store);
        let store = open(&kv);
        let damage = store.examine().unwrap().damage.unwrap();
        assert!(
            damage.damaged[0].detail.starts_with("cannot be read"),
            "{damage:?}"
        );
        assert_eq!(store.queue_counts().unwrap().pending, 3);
        let stored = kv.get(keys::META_QUEUE_COUNTS).unwrap().unwrap();
        assert_eq!(
            crate::store::QueueCounts::from_stored(&stored)
                .unwrap()
                .pending,
            3
        );
        assert_eq!(store.examine().unwrap().damage, None);
    }

    fn store_entry_of(kv: &MemoryKv, id: u64) -> SyncQueueEntry {
        crate::store::decode(&kv.get(&keys::queue(id)).unwrap().unwrap(), "queue entry").unwrap()
    }
}
