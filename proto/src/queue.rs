//! The SyncQueue and SyncLog entry types and the rules for moving a queue entry between states.
//!
//! A queue entry is born `Pending` with the local change it carries. The uploader marks it
//! `Processing` when it goes into a batch, then `Completed` once the relay has stored it, or back to
//! `Pending` with the error recorded (`Failed` after too many tries, or at once when the relay
//! refuses the change for good). A person may put a `Failed` entry back to `Pending` (retry).
//! No other moves exist: each is checked here.

use serde::{Deserialize, Serialize};

/// What a local write did to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueStatus {
    Pending,
    Processing,
    Completed,
    Failed,
}

impl QueueStatus {
    pub const ALL: [QueueStatus; 4] = [
        QueueStatus::Pending,
        QueueStatus::Processing,
        QueueStatus::Completed,
        QueueStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueStatus::Pending => "pending",
            QueueStatus::Processing => "processing",
            QueueStatus::Completed => "completed",
            QueueStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// One local change waiting to be uploaded (or already uploaded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncQueueEntry {
    /// Position in the queue: strictly increasing on a device.
    pub id: u64,
    pub operation: Operation,
    /// The collection of the record.
    pub model_name: String,
    /// The record's id.
    pub object_id: String,
    /// The Automerge change, as its raw bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub status: QueueStatus,
    pub retry_count: u32,
    pub last_error: Option<String>,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds.
    pub updated_at: u64,
    /// Higher uploads first; from the collection's config.
    pub priority: i32,
}

impl SyncQueueEntry {
    /// The change as an upload carries it.
    pub fn into_upload(self) -> crate::wire::UploadChange {
        crate::wire::UploadChange {
            entry: self.id,
            collection: self.model_name,
            record: self.object_id,
            change: self.data,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue entry {id} cannot go from {from} to {to}")]
pub struct TransitionError {
    pub id: u64,
    pub from: &'static str,
    pub to: &'static str,
}

impl SyncQueueEntry {
    fn transition(
        &mut self,
        allowed_from: &[QueueStatus],
        to: QueueStatus,
        now_ms: u64,
    ) -> Result<(), TransitionError> {
        if !allowed_from.contains(&self.status) {
            return Err(TransitionError {
                id: self.id,
                from: self.status.as_str(),
                to: to.as_str(),
            });
        }
        self.status = to;
        self.updated_at = now_ms;
        Ok(())
    }

    /// The entry goes into an upload batch.
    pub fn start(&mut self, now_ms: u64) -> Result<(), TransitionError> {
        self.transition(&[QueueStatus::Pending], QueueStatus::Processing, now_ms)
    }

    /// The relay confirmed it stored the change.
    pub fn complete(&mut self, now_ms: u64) -> Result<(), TransitionError> {
        self.transition(&[QueueStatus::Processing], QueueStatus::Completed, now_ms)?;
        self.last_error = None;
        Ok(())
    }

    /// The upload failed. The entry is tried again later unless it has now failed `max_retries`
    /// times, in which case it stays `Failed` until someone retries it by hand.
    pub fn fail(
        &mut self,
        error: impl Into<String>,
        max_retries: u32,
        now_ms: u64,
    ) -> Result<(), TransitionError> {
        let to = if self.retry_count.saturating_add(1) >= max_retries {
            QueueStatus::Failed
        } else {
            QueueStatus::Pending
        };
        self.transition(&[QueueStatus::Processing], to, now_ms)?;
        self.retry_count = self.retry_count.saturating_add(1);
        self.last_error = Some(error.into());
        Ok(())
    }

    /// The upload got no answer for a reason this entry cannot be blamed for (the network
    /// failed, or another entry of its batch broke it): back to `Pending` with the error noted,
    /// its retry count unchanged.
    pub fn requeue(
        &mut self,
        error: impl Into<String>,
        now_ms: u64,
    ) -> Result<(), TransitionError> {
        self.transition(&[QueueStatus::Processing], QueueStatus::Pending, now_ms)?;
        self.last_error = Some(error.into());
        Ok(())
    }

    /// The relay refused the change for good (a non-retryable error): trying again cannot help,
    /// so the entry goes straight to `Failed` with the reason, whatever its retry count.
    pub fn reject(&mut self, error: impl Into<String>, now_ms: u64) -> Result<(), TransitionError> {
        self.transition(&[QueueStatus::Processing], QueueStatus::Failed, now_ms)?;
        self.last_error = Some(error.into());
        Ok(())
    }

    /// A person asked to try a failed entry again; its retry count starts over.
    pub fn retry(&mut self, now_ms: u64) -> Result<(), TransitionError> {
        self.transition(&[QueueStatus::Failed], QueueStatus::Pending, now_ms)?;
        self.retry_count = 0;
        Ok(())
    }

    /// After a restart, entries that were mid-upload are uploaded again: the relay applies a
    /// change idempotently, so sending it twice is harmless, while dropping it would lose it.
    pub fn requeue_interrupted(&mut self, now_ms: u64) -> Result<(), TransitionError> {
        self.transition(&[QueueStatus::Processing], QueueStatus::Pending, now_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Upload,
    Download,
    /// Connecting, authenticating, agreeing on a version (sync phase 1).
    Initialization,
    /// Recording the outcome and telling subscribers (sync phase 4), or a session that ended
    /// with an error.
    Finalization,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncOutcome {
    Success,
    Partial,
    Failed,
}

/// One sync phase's record, kept for people and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncLogEntry {
    pub id: u64,
    /// Unix milliseconds.
    pub timestamp: u64,
    pub direction: Direction,
    pub records_processed: u64,
    pub status: SyncOutcome,
    pub error_message: Option<String>,
    pub user_id: Option<String>,
    pub device_id: String,
    /// Conflicts the phase's changes brought (downloads: found while applying the relay's log).
    pub conflicts: u64,
}

impl SyncLogEntry {
    /// Conflicts per change processed: the conflict rate of the phase.
    pub fn conflict_rate(&self) -> f64 {
        if self.records_processed == 0 {
            0.0
        } else {
            self.conflicts as f64 / self.records_processed as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> SyncQueueEntry {
        SyncQueueEntry {
            id: 7,
            operation: Operation::Create,
            model_name: "Customer".into(),
            object_id: "1".into(),
            data: vec![1, 2, 3],
            status: QueueStatus::Pending,
            retry_count: 0,
            last_error: None,
            created_at: 10,
            updated_at: 10,
            priority: 0,
        }
    }

    #[test]
    fn happy_path() {
        let mut e = entry();
        e.start(11).unwrap();
        assert_eq!(e.status, QueueStatus::Processing);
        e.complete(12).unwrap();
        assert_eq!(e.status, QueueStatus::Completed);
        assert_eq!(e.updated_at, 12);
        assert_eq!(e.created_at, 10);
    }

    #[test]
    fn failures_retry_then_stick() {
        let mut e = entry();
        for attempt in 1..3 {
            e.start(20).unwrap();
            e.fail("network: relay unreachable", 3, 21).unwrap();
            assert_eq!(e.status, QueueStatus::Pending);
            assert_eq!(e.retry_count, attempt);
        }
        e.start(30).unwrap();
        e.fail("server: 500", 3, 31).unwrap();
        assert_eq!(e.status, QueueStatus::Failed);
        assert_eq!(e.retry_count, 3);
        assert_eq!(e.last_error.as_deref(), Some("server: 500"));
        assert!(
            e.start(32).is_err(),
            "a failed entry is not picked up again"
        );
        e.retry(33).unwrap();
        assert_eq!((e.status, e.retry_count), (QueueStatus::Pending, 0));
        e.start(34).unwrap();
        e.complete(35).unwrap();
        assert_eq!(e.last_error, None);
    }

    #[test]
    fn illegal_moves_are_refused_and_change_nothing() {
        let mut e = entry();
        let before = e.clone();
        assert_eq!(
            e.complete(50),
            Err(TransitionError {
                id: 7,
                from: "pending",
                to: "completed"
            })
        );
        assert!(e.fail("x", 3, 50).is_err());
        assert!(e.retry(50).is_err());
        assert!(e.requeue_interrupted(50).is_err());
        assert_eq!(e, before);
    }

    #[test]
    fn a_rejected_entry_fails_at_once_and_only_from_processing() {
        let mut e = entry();
        assert!(e.reject("validation: bad", 0).is_err(), "not in an upload");
        e.start(1).unwrap();
        e.reject("validation: invalid change", 2).unwrap();
        assert_eq!(e.status, QueueStatus::Failed);
        assert_eq!(e.retry_count, 0);
        assert_eq!(e.last_error.as_deref(), Some("validation: invalid change"));
        assert_eq!(e.updated_at, 2);
        assert!(e.reject("again", 3).is_err());
    }

    #[test]
    fn interrupted_uploads_are_requeued() {
        let mut e = entry();
        e.start(1).unwrap();
        e.requeue_interrupted(2).unwrap();
        assert_eq!(e.status, QueueStatus::Pending);
    }

    #[test]
    fn status_names_round_trip() {
        for s in QueueStatus::ALL {
            assert_eq!(QueueStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(QueueStatus::parse("done"), None);
    }
}
