//! Prometheus metrics: the relay's ([`RelayMetrics`]) and the daemon's ([`DaemonMetrics`]), the
//! few metric types they are made of, the text exposition format (version 0.0.4) they render
//! to, and the daemon's plain-HTTP `GET /metrics` server ([`serve_daemon`]).
//!
//! Written by hand rather than with `prometheus-client`: that crate encodes OpenMetrics (a
//! counter's `# TYPE` line names it without `_total`, and the text ends in `# EOF`), while
//! scrapers and parsers of the 0.0.4 format expect every line to name the sample it describes.
//! Updates on hot paths are single relaxed atomic adds; labelled counters take a short lock and
//! are only touched once per session, sign-in or rejected change.
//!
//! Values that already live elsewhere (the daemon's [`SyncStatus`] counters, queue and conflict
//! counts, storage size, the relay's conflict counts) are read when rendered, never copied.
//!
//! Must not touch: what is synced or stored; metrics only observe. The relay's HTTP route is
//! the relay API's; this module only gives it [`RelayMetrics::render`] and [`CONTENT_TYPE`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::alerting::Monitor;
use crate::engine::{ConnectionState, SyncHandle, SyncStatus};
use crate::relay::alerts::RelayAlerts;
use crate::relay::store::RelayStore;
use crate::resolve::ConflictKind;
use crate::store::Store;

/// The `Content-Type` of a rendered exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the buckets for the relay's per-request durations: a store append
/// is a flush (about 0.1 ms to a few ms), a read is a range scan.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds (seconds) of the buckets for the daemon's sync rounds, which span network round
/// trips and whole batches.
const ROUND_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters told apart by the value of one label. The values come from small closed sets
/// (error kinds, outcomes), so the map stays small.
#[derive(Debug, Default)]
pub struct CounterVec(Mutex<BTreeMap<String, u64>>);

impl CounterVec {
    pub fn inc(&self, label: &str) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(label) {
            Some(n) => *n += 1,
            None => {
                counts.insert(label.to_owned(), 1);
            }
        }
    }

    fn snapshot(&self) -> Vec<(String, u64)> {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Durations in fixed buckets. The sum is kept in whole microseconds so that observing stays
/// one atomic add per field.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the `+Inf` bucket; not cumulative (rendering adds them up).
    buckets: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(slot) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }
}

/// A text exposition being written: each family's `# HELP` and `# TYPE` lines, then its samples.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let value = value
                    .replace('\\', r"\\")
                    .replace('"', "\\\"")
                    .replace('\n', r"\n");
                let _ = write!(self.0, "{key}=\"{value}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        self.sample(name, &[], value);
    }

    /// A counter family by one label; `always` values are shown (as 0) even before they count.
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        always: &[&str],
        values: &[(String, u64)],
    ) {
        self.header(name, help, "counter");
        let mut all: BTreeMap<&str, u64> = always.iter().map(|v| (*v, 0)).collect();
        for (value, n) in values {
            *all.entry(value.as_str()).or_insert(0) += n;
        }
        for (value, n) in all {
            self.sample(name, &[(label, value)], n);
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.header(name, help, "gauge");
        self.sample(name, &[], value);
    }

    fn histograms(&mut self, name: &str, help: &str, label: &str, series: &[(&str, &Histogram)]) {
        self.header(name, help, "histogram");
        for (value, histogram) in series {
            self.histogram_samples(name, &[(label, value)], histogram);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.header(name, help, "histogram");
        self.histogram_samples(name, &[], histogram);
    }

    fn histogram_samples(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        let bounds = histogram
            .bounds
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_string()]);
        for (le, count) in bounds.zip(histogram.buckets.iter()) {
            cumulative += count.load(Ordering::Relaxed);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        let sum = histogram.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

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
    /// Each space's sync log and per-minute totals, for the web interface.
    pub activity: crate::relay::activity::Activity,
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
            activity: Default::default(),
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
        match store.size_on_disk() {
            Ok(bytes) => out.gauge(
                "ferry_relay_storage_bytes",
                "Size of the relay's store on disk.",
                i64::try_from(bytes).unwrap_or(i64::MAX),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot read the store's size for metrics"),
        }
        out.0
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
        text.push_str(&render_alerts(
            "ferry_relay_alerts_active",
            "Accounts with the alert of this kind active (disk_free: the relay itself).",
            self.alerts.monitor(),
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
        match store.size_on_disk() {
            Ok(bytes) => out.gauge(
                "ferry_storage_bytes",
                "Size of the daemon's store on disk.",
                i64::try_from(bytes).unwrap_or(i64::MAX),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot read the store's size for metrics"),
        }
        out.0
    }
}

/// One gauge per alert kind: how many scopes (the daemon: 0 or 1; the relay: accounts, and the
/// relay as a whole) have it active.
pub fn render_alerts(name: &str, help: &str, alerts: &Monitor) -> String {
    let mut out = Exposition::default();
    out.header(name, help, "gauge");
    for (kind, n) in alerts.active_counts() {
        out.sample(name, &[("kind", kind.as_str())], n);
    }
    out.0
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.listen {0:?} is not an address such as 127.0.0.1:9464")]
    Listen(String),
    #[error("cannot listen for metrics scrapes on {addr}: {source} (pick another metrics.listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the daemon's metrics listener on `listen` (`metrics.listen`).
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, MetricsError> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| MetricsError::Listen(listen.to_string()))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

#[derive(Clone)]
struct DaemonScrape {
    metrics: Arc<DaemonMetrics>,
    alerts: Arc<Monitor>,
    store: Arc<Store>,
    sync: Option<SyncHandle>,
}

/// Serves `GET /metrics` in plain HTTP on `listener` until `shutdown` turns true.
pub async fn serve_daemon(
    listener: tokio::net::TcpListener,
    metrics: Arc<DaemonMetrics>,
    alerts: Arc<Monitor>,
    store: Arc<Store>,
    sync: Option<SyncHandle>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape_daemon))
        .with_state(DaemonScrape {
            metrics,
            alerts,
            store,
            sync,
        });
    let stopped = async move {
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::error!(error = %e, "the metrics server stopped");
    }
}

async fn scrape_daemon(
    axum::extract::State(scrape): axum::extract::State<DaemonScrape>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = scrape.sync.as_ref().map(SyncHandle::status);
    // Reading the store's counters and size can touch the disk.
    let rendered = tokio::task::spawn_blocking(move || {
        let mut text = scrape.metrics.render(status.as_ref(), &scrape.store);
        text.push_str(&render_alerts(
            "ferry_alerts_active",
            "1 while the alert of this kind is active, else 0.",
            &scrape.alerts,
        ));
        text
    })
    .await;
    match rendered {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let histogram = Histogram::new(&[0.01, 0.1]);
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_secs(3));
        let mut out = Exposition::default();
        out.histogram("x_seconds", "help", &histogram);
        assert_eq!(
            out.0,
            "# HELP x_seconds help\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.01\"} 1\nx_seconds_bucket{le=\"0.1\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 3.055\nx_seconds_count 3\n"
        );
    }

    #[test]
    fn label_values_are_escaped_and_always_values_show_as_zero() {
        let counts = CounterVec::default();
        counts.inc("a\"b\\c\nd");
        counts.inc("a\"b\\c\nd");
        let mut out = Exposition::default();
        out.counters("y_total", "h", "l", &["ok"], &counts.snapshot());
        assert_eq!(
            out.0,
            "# HELP y_total h\n# TYPE y_total counter\ny_total{l=\"a\\\"b\\\\c\\nd\"} 2\n\
             y_total{l=\"ok\"} 0\n"
        );
    }
}
