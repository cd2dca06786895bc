//! The newest log entries of each space as this relay appended them, kept in memory for the
//! sessions that follow the log live: each of them reads, a page at a time, what was just
//! appended, and gets it from here instead of reading and decoding it from storage again.
//!
//! Owns: which entries are kept (a contiguous run per space, bounded in bytes and in spaces) and
//! answering a read from them exactly as storage would. Must not touch: storage, sessions or
//! validation; it never decides what is in the log, it only remembers what storage committed.
//! Entries another relay appended to the same storage are not here: a read that does not start
//! inside the run goes to storage.

use ferry_proto::wire::LogEntry;
use lru::LruCache;
use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};

/// Change bytes kept per space: a few pages of the log, enough for readers a page or two behind.
const SPACE_BYTES: usize = 4 << 20;
/// Spaces kept at once (the most recently appended to): with `SPACE_BYTES`, at most 32 MiB.
const SPACES: usize = 8;

pub struct RecentLogs {
    spaces: Mutex<LruCache<String, Run>>,
}

/// A contiguous run of a space's newest entries, in seq order.
#[derive(Default)]
struct Run {
    entries: VecDeque<LogEntry>,
    bytes: usize,
}

impl Default for RecentLogs {
    fn default() -> Self {
        let capacity = NonZeroUsize::new(SPACES).unwrap_or(NonZeroUsize::MIN);
        RecentLogs {
            spaces: Mutex::new(LruCache::new(capacity)),
        }
    }
}

impl RecentLogs {
    /// Remembers entries storage has just committed to `space`, in seq order. An entry that
    /// does not follow the run (another relay appended in between) starts a new one.
    pub fn committed(&self, space: &str, entries: Vec<LogEntry>) {
        if entries.is_empty() {
            // An append of compactions alone: nothing to keep, and no other space's run to evict.
            return;
        }
        let mut spaces = self.lock();
        let run = spaces.get_or_insert_mut(space.to_owned(), Run::default);
        for entry in entries {
            if run
                .entries
                .back()
                .is_some_and(|last| last.seq.checked_add(1) != Some(entry.seq))
            {
                run.entries.clear();
                run.bytes = 0;
            }
            run.bytes = run.bytes.saturating_add(entry.change.len());
            run.entries.push_back(entry);
        }
        while run.bytes > SPACE_BYTES {
            let Some(dropped) = run.entries.pop_front() else {
                break;
            };
            run.bytes = run.bytes.saturating_sub(dropped.change.len());
        }
    }

    /// The entries after `after`, as storage's `read_log` returns them (at least one, at most
    /// `max_changes`, no more than `max_bytes` of changes past the first), when the run holds
    /// the entry right after `after`; `None` sends the read to storage.
    pub fn read(
        &self,
        space: &str,
        after: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Option<Vec<LogEntry>> {
        let mut spaces = self.lock();
        let run = spaces.get(space)?;
        let first = run.entries.front()?.seq;
        let skip = usize::try_from(after.checked_add(1)?.checked_sub(first)?).ok()?;
        if skip >= run.entries.len() {
            return None;
        }
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for entry in run.entries.iter().skip(skip).take(max_changes.max(1)) {
            if !entries.is_empty() && bytes.saturating_add(entry.change.len()) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(entry.change.len());
            entries.push(entry.clone());
        }
        Some(entries)
    }

    /// Forgets the space's entries: the log they were read from is not the one storage holds
    /// now (a database restored to an earlier point).
    pub fn forget(&self, space: &str) {
        self.lock().pop(space);
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<String, Run>> {
        // Every change under the lock leaves a valid run: a poisoned one holds nothing half-done.
        self.spaces.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, bytes: usize) -> LogEntry {
        LogEntry {
            seq,
            collection: "Doc".into(),
            record: format!("r{seq}"),
            change: vec![7; bytes],
        }
    }

    fn seqs(entries: &[LogEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn reads_start_inside_the_run_and_keep_the_limits() {
        let recent = RecentLogs::default();
        recent.committed("s", (5..=9).map(|seq| entry(seq, 10)).collect());
        assert_eq!(
            recent.read("s", 3, 10, usize::MAX),
            None,
            "starts before the run"
        );
        assert_eq!(
            recent.read("s", 9, 10, usize::MAX),
            None,
            "nothing after the run"
        );
        assert_eq!(recent.read("other", 4, 10, usize::MAX), None);
        let all = recent.read("s", 4, 10, usize::MAX).map(|e| seqs(&e));
        assert_eq!(all, Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(
            recent.read("s", 6, 2, usize::MAX).map(|e| seqs(&e)),
            Some(vec![7, 8])
        );
        // As storage: the first entry always, then only while the bytes fit.
        assert_eq!(
            recent.read("s", 4, 10, 25).map(|e| seqs(&e)),
            Some(vec![5, 6])
        );
        assert_eq!(recent.read("s", 4, 10, 1).map(|e| seqs(&e)), Some(vec![5]));
        assert_eq!(
            recent.read("s", 4, 0, usize::MAX).map(|e| seqs(&e)),
            Some(vec![5])
        );
    }

    #[test]
    fn an_entry_that_does_not_follow_starts_a_new_run() {
        let recent = RecentLogs::default();
        recent.committed("s", (1..=3).map(|seq| entry(seq, 10)).collect());
        // Seqs 4 and 5 were appended through another relay.
        recent.committed("s", vec![entry(6, 10)]);
        assert_eq!(recent.read("s", 2, 10, usize::MAX), None);
        assert_eq!(
            recent.read("s", 5, 10, usize::MAX).map(|e| seqs(&e)),
            Some(vec![6])
        );
    }

    #[test]
    fn an_append_with_no_entries_evicts_no_other_space() {
        let recent = RecentLogs::default();
        recent.committed("kept", vec![entry(1, 10)]);
        for n in 0..SPACES {
            recent.committed(&format!("empty{n}"), Vec::new());
        }
        assert!(recent.read("kept", 0, 10, usize::MAX).is_some());
    }

    #[test]
    fn the_oldest_entries_go_past_the_byte_bound() {
        let recent = RecentLogs::default();
        let big = SPACE_BYTES / 2;
        recent.committed("s", (1..=3).map(|seq| entry(seq, big)).collect());
        assert_eq!(
            recent.read("s", 0, 10, usize::MAX),
            None,
            "entry 1 was dropped"
        );
        let kept = recent.read("s", 1, 10, usize::MAX).map(|e| seqs(&e));
        assert_eq!(kept, Some(vec![2, 3]));
    }
}
