//! The `records` rows of records this relay's appends created with one plain first change
//! (`record::PlainFirst`: the bulk of an initial sync), handed from the append that logged them
//! to the materializer, so that it writes their rows without reading their bases back from the
//! database and decoding them again.
//!
//! Owns: which rows are kept (by space and the seq of the entry that created the record, within
//! a byte budget) and handing each over once. Must not touch: storage, or what a row holds
//! (`relay::materializer` decides that; a row kept here is what it makes of such a record).
//! A row is kept only once its append committed: a record created by the entry at `seq`, with
//! no later entry, is that one change, whatever relay materializes it. Rows another relay's
//! appends created are not here: the materializer reads those from storage.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::storage::RecordKey;

/// Bytes of rows kept at once, all spaces together: a few materializer steps ahead.
const BUDGET_BYTES: usize = 16 << 20;
/// What one kept row costs beyond its text (map entry, key and field headers), roughly.
const ROW_OVERHEAD: usize = 128;
/// Spaces whose last append here is remembered at once; past that, those not appended to for
/// `FORGET_APPENDS_AFTER` are forgotten.
const APPENDED_SPACES: usize = 1024;
const FORGET_APPENDS_AFTER: Duration = Duration::from_secs(60);

/// A created record's row, as the materializer writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedRow {
    pub key: RecordKey,
    /// The fields as JSON text.
    pub fields: String,
    pub deleted: bool,
    /// The change's time, in milliseconds since the Unix epoch.
    pub updated_ms: i64,
}

impl CreatedRow {
    fn bytes(&self) -> usize {
        self.fields.len() + self.key.0.len() + self.key.1.len() + ROW_OVERHEAD
    }
}

#[derive(Default)]
struct Kept {
    spaces: HashMap<String, BTreeMap<u64, CreatedRow>>,
    bytes: usize,
    /// When this relay last committed an append to each space.
    appended: HashMap<String, Instant>,
}

pub struct CreatedRows {
    kept: Mutex<Kept>,
    budget: usize,
}

impl Default for CreatedRows {
    fn default() -> Self {
        CreatedRows::with_budget(BUDGET_BYTES)
    }
}

impl CreatedRows {
    pub fn with_budget(budget: usize) -> Self {
        CreatedRows {
            kept: Mutex::new(Kept::default()),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        // The map stays consistent whatever a panicking holder did: each change is one insert
        // or remove with its byte count.
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the rows an append to `space` created, once it committed, by the seq of the entry
    /// that created each. Rows past the budget are not kept (the materializer reads those
    /// records from storage): the rows kept are the ones it needs next, so none is evicted
    /// before it is taken or its entries are materialized.
    /// Every committed append is told, with no rows too: `appended_here` says so.
    pub fn committed(&self, space: &str, rows: Vec<(u64, CreatedRow)>) {
        let mut kept = self.lock();
        let Kept {
            spaces,
            bytes,
            appended,
        } = &mut *kept;
        let now = Instant::now();
        if appended.len() >= APPENDED_SPACES && !appended.contains_key(space) {
            appended.retain(|_, at| now.duration_since(*at) < FORGET_APPENDS_AFTER);
        }
        if appended.len() < APPENDED_SPACES || appended.contains_key(space) {
            appended.insert(space.to_owned(), now);
        }
        if rows.is_empty() {
            return;
        }
        let of_space = spaces.entry(space.to_owned()).or_default();
        for (seq, row) in rows {
            let size = row.bytes();
            if bytes.saturating_add(size) > self.budget {
                break;
            }
            *bytes += size;
            if let Some(replaced) = of_space.insert(seq, row) {
                *bytes = bytes.saturating_sub(replaced.bytes());
            }
        }
    }

    /// Whether the row of `key`, created by the entry at `seq` of `space`, is kept.
    pub fn holds(&self, space: &str, seq: u64, key: &RecordKey) -> bool {
        self.lock()
            .spaces
            .get(space)
            .and_then(|rows| rows.get(&seq))
            .is_some_and(|row| row.key == *key)
    }

    /// Whether this relay appended to `space` within `within`, or holds rows of it: then its
    /// materializer is the one to write them.
    pub fn appended_here(&self, space: &str, within: Duration) -> bool {
        let kept = self.lock();
        kept.spaces.contains_key(space)
            || kept
                .appended
                .get(space)
                .is_some_and(|at| at.elapsed() < within)
    }

    /// The row of `key`, created by the entry at `seq` of `space`, handed over (no longer kept).
    pub fn take(&self, space: &str, seq: u64, key: &RecordKey) -> Option<CreatedRow> {
        let mut kept = self.lock();
        let Kept { spaces, bytes, .. } = &mut *kept;
        let rows = spaces.get_mut(space)?;
        if rows.get(&seq).is_none_or(|row| row.key != *key) {
            return None;
        }
        let row = rows.remove(&seq)?;
        *bytes = bytes.saturating_sub(row.bytes());
        if rows.is_empty() {
            spaces.remove(space);
        }
        Some(row)
    }

    /// Drops the rows of `space`'s entries up to `seq`: `records` holds them (materialized
    /// here or by another relay), or the rows were made from storage.
    pub fn forget_through(&self, space: &str, seq: u64) {
        let mut kept = self.lock();
        let Kept { spaces, bytes, .. } = &mut *kept;
        let Some(rows) = spaces.get_mut(space) else {
            return;
        };
        let later = rows.split_off(&seq.saturating_add(1));
        let dropped = std::mem::replace(rows, later);
        for row in dropped.values() {
            *bytes = bytes.saturating_sub(row.bytes());
        }
        if rows.is_empty() {
            spaces.remove(space);
        }
    }

    /// Bytes kept, all spaces together.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(record: &str) -> CreatedRow {
        CreatedRow {
            key: ("c".into(), record.into()),
            fields: r#"{"a":1}"#.into(),
            deleted: false,
            updated_ms: 7,
        }
    }

    #[test]
    fn a_row_is_handed_over_once_for_its_record_and_seq() {
        let rows = CreatedRows::default();
        rows.committed("s", vec![(3, row("r3")), (4, row("r4"))]);
        let key = |r: &str| ("c".to_owned(), r.to_owned());
        assert!(rows.holds("s", 3, &key("r3")));
        assert!(
            !rows.holds("s", 3, &key("r4")),
            "another record at that seq"
        );
        assert!(!rows.holds("other", 3, &key("r3")));
        assert_eq!(rows.take("s", 4, &key("r3")), None);
        assert_eq!(rows.take("s", 3, &key("r3")), Some(row("r3")));
        assert_eq!(rows.take("s", 3, &key("r3")), None);
        rows.forget_through("s", 4);
        assert!(!rows.holds("s", 4, &key("r4")));
        assert_eq!(rows.bytes(), 0);
    }

    #[test]
    fn rows_past_the_budget_are_not_kept_and_forgetting_frees_them() {
        let one = row("r").bytes();
        let rows = CreatedRows::with_budget(one * 2);
        rows.committed("s", (1..=3).map(|seq| (seq, row("r"))).collect());
        let key = ("c".to_owned(), "r".to_owned());
        assert!(rows.holds("s", 1, &key) && rows.holds("s", 2, &key));
        assert!(!rows.holds("s", 3, &key), "past the budget");
        rows.forget_through("s", 1);
        assert_eq!(rows.bytes(), one);
        rows.committed("s", vec![(5, row("r"))]);
        assert!(rows.holds("s", 5, &key));
        rows.forget_through("s", 9);
        assert_eq!(rows.bytes(), 0);
    }

    #[test]
    fn a_space_appended_to_here_is_known_with_or_without_rows() {
        let rows = CreatedRows::default();
        let recently = Duration::from_secs(5);
        assert!(!rows.appended_here("s", recently));
        rows.committed("s", Vec::new());
        assert!(rows.appended_here("s", recently));
        assert!(!rows.appended_here("s", Duration::ZERO));
        rows.committed("t", vec![(1, row("r"))]);
        assert!(rows.appended_here("t", Duration::ZERO), "it holds rows");
    }
}
