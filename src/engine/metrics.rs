//! The daemon's Prometheus metrics: what only the sync loop sees as it happens (round
//! durations and outcomes); the rest is read from the sync status and the store when rendered.
//!
//! Must not touch: what is synced or stored; metrics only observe.

use std::time::Duration;

use super::{ConnectionState, SyncStatus};
use crate::metrics::{CounterVec, Exposition, Histogram};
use crate::resolve::ConflictKind;
use crate::store::Store;

/// Upper bounds (seconds) of the buckets for the daemon's sync rounds, which span network round
/// trips and whole batches.
const ROUND_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The daemon's metrics: what only the sync loop sees as it happens. The rest is read from the
/// sync status and the store when rendered.
#[derive(Debug)]
pub struct DaemonMetrics {
    sync_duration: Histogram,
    rounds: CounterVec,
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        DaemonMetrics {
            sync_duration: Histogram::new(ROUND_BUCKETS),
            rounds: CounterVec::default(),
        }
    }
}

impl DaemonMetrics {
    /// A sync round reached `Idle`, `took` after it started.
    pub fn round_succeeded(&self, took: Duration) {
        self.sync_duration.observe(took);
        self.rounds.inc("success");
    }

    /// A sync round failed; `kind` is the failure's kind (network, authentication, ...).
    pub fn round_failed(&self, kind: &str) {
        self.rounds.inc(kind);
    }

    /// The exposition. `status` is `None` when the daemon does not sync.
    pub fn render(&self, status: Option<&SyncStatus>, store: &Store) -> String {
        let mut out = Exposition::default();
        out.histogram(
            "ferry_sync_duration_seconds",
            "Time from the start of a sync round to having nothing left to do.",
            &self.sync_duration,
        );
        let counter = |s: Option<&SyncStatus>, pick: fn(&SyncStatus) -> u64| s.map_or(0, pick);
        out.counter(
            "ferry_sync_bytes_sent_total",
            "UDP payload bytes sent to the relay (QUIC and TLS included), updated as rounds end.",
            counter(status, |s| s.bytes_sent),
        );
        out.counter(
            "ferry_sync_bytes_received_total",
            "UDP payload bytes received from the relay (QUIC and TLS included), updated as \
             rounds end.",
            counter(status, |s| s.bytes_received),
        );
        out.counter(
            "ferry_sync_records_uploaded_total",
            "Local changes the relay stored (or already held).",
            counter(status, |s| s.uploaded),
        );
        out.counter(
            "ferry_sync_records_downloaded_total",
            "Log entries applied from the relay.",
            counter(status, |s| s.downloaded),
        );
        out.counters(
            "ferry_sync_rounds_total",
            "Sync rounds, by outcome: success or the kind of failure (network, authentication, \
             validation, server, timeout, storage).",
            "outcome",
            &["success"],
            &self.rounds.snapshot(),
        );
        match store.conflict_counts() {
            Ok(counts) => {
                let by_kind: Vec<(String, u64)> =
                    counts.into_iter().map(|c| (c.kind, c.detected)).collect();
                out.counters(
                    "ferry_conflicts_total",
                    "Conflicts detected in this device's store, by kind.",
                    "kind",
                    &ConflictKind::ALL.map(ConflictKind::as_str),
                    &by_kind,
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot read conflict counts for metrics"),
        }
        match store.queue_counts() {
            Ok(queue) => {
                out.header(
                    "ferry_queue_entries",
                    "Sync queue entries, by status.",
                    "gauge",
                );
                for (status, n) in [
                    ("pending", queue.pending),
                    ("processing", queue.processing),
                    ("completed", queue.completed),
                    ("failed", queue.failed),
                ] {
                    out.sample("ferry_queue_entries", &[("status", status)], n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read queue counts for metrics"),
        }
        out.gauge(
            "ferry_relay_connected",
            "1 while the daemon holds a session with its relay, else 0.",
            i64::from(status.is_some_and(|s| s.state == ConnectionState::Connected)),
        );
        match store.quarantined(0) {
            Ok((count, _)) => out.gauge(
                "ferry_quarantined_entries",
                "Relay log entries this device could not apply and set aside.",
                i64::try_from(count).unwrap_or(i64::MAX),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot count quarantined entries for metrics"),
        }
        match store.size_on_disk() {
            Ok(bytes) => out.gauge(
                "ferry_storage_bytes",
                "Size of the daemon's store on disk.",
                i64::try_from(bytes).unwrap_or(i64::MAX),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot read the store's size for metrics"),
        }
        out.finish()
    }
}
