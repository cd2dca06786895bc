//! The relay's Prometheus metrics: request durations, frame bytes, changes stored, duplicate
//! and rejected, sessions, sign-ins and connected devices, updated by the sessions and
//! `server::carry_out` with atomic adds; store size and conflict counts read from the store when
//! rendered ([`RelayScrape`], for the relay API's `GET /metrics`); the `records` table's lag as
//! the materializer last read it (PostgreSQL storage).
//!
//! Must not touch: what is synced or stored; metrics only observe.

use std::sync::Arc;
use std::time::Duration;

use super::alerts::RelayAlerts;
use super::store::RelayStore;
use crate::metrics::{Counter, CounterVec, Exposition, Gauge, Histogram};

/// Upper bounds (seconds) of the buckets for the relay's per-request durations: a store append
/// is a flush (about 0.1 ms to a few ms), a read is a range scan.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// What a relay request carried out: the `kind` label of its duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Upload,
    Download,
    Push,
}

/// The relay's metrics. Shared (`Arc`) by every session; updates are atomic adds.
#[derive(Debug)]
pub struct RelayMetrics {
    upload: Histogram,
    download: Histogram,
    push: Histogram,
    /// Frame bytes, counted by the sessions' `FrameSender`/`FrameReceiver`.
    pub bytes_received: Arc<Counter>,
    pub bytes_sent: Arc<Counter>,
    changes_stored: Counter,
    changes_duplicate: Counter,
    changes_rejected: CounterVec,
    log_entries_sent: Counter,
    sessions: CounterVec,
    sign_ins: CounterVec,
    connected_devices: Gauge,
    /// The `records` table's lag behind the most behind space, once a materializer reports it.
    records_lag: std::sync::Mutex<Option<(u64, f64)>>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        RelayMetrics {
            upload: Histogram::new(REQUEST_BUCKETS),
            download: Histogram::new(REQUEST_BUCKETS),
            push: Histogram::new(REQUEST_BUCKETS),
            bytes_received: Arc::default(),
            bytes_sent: Arc::default(),
            changes_stored: Counter::default(),
            changes_duplicate: Counter::default(),
            changes_rejected: CounterVec::default(),
            log_entries_sent: Counter::default(),
            sessions: CounterVec::default(),
            sign_ins: CounterVec::default(),
            connected_devices: Gauge::default(),
            records_lag: std::sync::Mutex::default(),
        }
    }
}

/// One device counted in `ferry_relay_connected_devices` until this is dropped.
#[derive(Debug)]
pub struct ConnectedDevice(Arc<RelayMetrics>);

impl Drop for ConnectedDevice {
    fn drop(&mut self) {
        self.0.connected_devices.add(-1);
    }
}

impl RelayMetrics {
    pub fn request(&self, kind: RequestKind, took: Duration) {
        match kind {
            RequestKind::Upload => &self.upload,
            RequestKind::Download => &self.download,
            RequestKind::Push => &self.push,
        }
        .observe(took);
    }

    pub fn change_stored(&self) {
        self.changes_stored.inc_by(1);
    }

    pub fn change_duplicate(&self) {
        self.changes_duplicate.inc_by(1);
    }

    pub fn change_rejected(&self, code: ferry_proto::wire::ErrorCode) {
        self.changes_rejected.inc(code.as_str());
    }

    pub fn log_entries_sent(&self, entries: u64) {
        self.log_entries_sent.inc_by(entries);
    }

    /// A session ended: `ok`, or the kind of error that ended it.
    pub fn session_ended(&self, outcome: &str) {
        self.sessions.inc(outcome);
    }

    /// A sign-in was decided: `ok`, the refusal's reason word, or `rate_limited`.
    pub fn sign_in(&self, result: &str) {
        self.sign_ins.inc(result);
    }

    /// Counts a device as connected for as long as the returned guard lives.
    pub fn device_connected(self: &Arc<Self>) -> ConnectedDevice {
        self.connected_devices.add(1);
        ConnectedDevice(self.clone())
    }

    /// How far the `records` table is behind the log of the space most behind: entries, and
    /// seconds since the oldest of them was logged.
    pub fn records_lag(&self, entries: u64, seconds: f64) {
        *self.records_lag.lock().unwrap_or_else(|e| e.into_inner()) = Some((entries, seconds));
    }

    /// The exposition, with the store's size and conflict counts read now.
    pub fn render(&self, store: &RelayStore) -> String {
        let mut out = Exposition::default();
        out.histograms(
            "ferry_relay_sync_request_duration_seconds",
            "Time the relay took to carry out a request: storing an upload, reading a download \
             page, reading a push.",
            "kind",
            &[
                ("upload", &self.upload),
                ("download", &self.download),
                ("push", &self.push),
            ],
        );
        out.counter(
            "ferry_relay_bytes_received_total",
            "Session frame bytes received from devices.",
            self.bytes_received.get(),
        );
        out.counter(
            "ferry_relay_bytes_sent_total",
            "Session frame bytes sent to devices.",
            self.bytes_sent.get(),
        );
        out.counter(
            "ferry_relay_changes_stored_total",
            "Uploaded changes appended to a space's log.",
            self.changes_stored.get(),
        );
        out.counter(
            "ferry_relay_changes_duplicate_total",
            "Uploaded changes the relay already held.",
            self.changes_duplicate.get(),
        );
        out.counters(
            "ferry_relay_changes_rejected_total",
            "Uploaded changes refused, by error code.",
            "code",
            &[],
            &self.changes_rejected.snapshot(),
        );
        out.counter(
            "ferry_relay_log_entries_sent_total",
            "Log entries sent to devices (downloads and pushes).",
            self.log_entries_sent.get(),
        );
        out.counters(
            "ferry_relay_sessions_total",
            "Device sessions ended, by outcome: ok, shutdown (the relay stopped) or the kind of \
             error that ended them.",
            "outcome",
            &["ok"],
            &self.sessions.snapshot(),
        );
        out.counters(
            "ferry_relay_sign_ins_total",
            "Sign-in attempts, by result: ok, the reason of a refusal, or rate_limited.",
            "result",
            &["ok"],
            &self.sign_ins.snapshot(),
        );
        let conflicts: Vec<(String, u64)> = store
            .conflicts_found()
            .into_iter()
            .map(|(kind, n)| (kind.as_str().to_owned(), n))
            .collect();
        out.counters(
            "ferry_relay_conflicts_total",
            "Conflicts found in appended changes since the relay started, by kind.",
            "kind",
            &[],
            &conflicts,
        );
        out.gauge(
            "ferry_relay_connected_devices",
            "Devices signed in now.",
            self.connected_devices.get(),
        );
        let records_lag = *self.records_lag.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((entries, seconds)) = records_lag {
            out.gauge(
                "ferry_relay_records_lag_entries",
                "Log entries the records table lacks, in the space most behind.",
                i64::try_from(entries).unwrap_or(i64::MAX),
            );
            out.gauge(
                "ferry_relay_records_lag_seconds",
                "Seconds since the oldest log entry the records table lacks was logged, in the \
                 space most behind (0 when it lacks none).",
                seconds,
            );
        }
        match store.size_on_disk() {
            Ok(bytes) => out.gauge(
                "ferry_relay_storage_bytes",
                "Size of the relay's store on disk.",
                i64::try_from(bytes).unwrap_or(i64::MAX),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot read the store's size for metrics"),
        }
        out.finish()
    }
}

/// A relay's metrics with the store they sample at render time: what a `GET /metrics` route
/// holds.
#[derive(Clone)]
pub struct RelayScrape {
    metrics: Arc<RelayMetrics>,
    store: Arc<RelayStore>,
    alerts: Arc<RelayAlerts>,
}

impl RelayScrape {
    pub fn new(
        metrics: Arc<RelayMetrics>,
        store: Arc<RelayStore>,
        alerts: Arc<RelayAlerts>,
    ) -> Self {
        RelayScrape {
            metrics,
            store,
            alerts,
        }
    }

    /// The exposition ([`CONTENT_TYPE`]). Reads the store (its size): call it off the async
    /// threads (`spawn_blocking`).
    pub fn render(&self) -> String {
        let mut text = self.metrics.render(&self.store);
        text.push_str(&self.alerts.monitor().render_metrics(
            "ferry_relay_alerts_active",
            "Accounts with the alert of this kind active (disk_free: the relay itself).",
        ));
        text
    }
}

impl std::fmt::Debug for RelayScrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayScrape")
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}
