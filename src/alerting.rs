//! Alerts in a running process (the daemon or the relay): the [`Monitor`] holds an
//! [`Alerts`] state per scope (the relay: one per account, plus the whole relay under `""`; the
//! daemon: only `""`), logs each transition once, and posts it to the webhook; plus the two
//! measurements alerts need from the file system (free space, a directory's size).
//!
//! Must not touch: the alert rules (`alerts`), the store or sync. The webhook is posted from its
//! own task through a bounded queue: a slow or dead receiver loses posts (logged), never holds
//! up the caller.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::alerts::{Alert, AlertKind, Alerts, AlertsConfig, Transition};
use crate::metrics::Exposition;

/// Posts waiting for the webhook; more are dropped (and logged).
const WEBHOOK_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("alerts.webhook {0:?} is not an http://host:port/path URL")]
    Url(String),
    #[error("cannot reach the webhook at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("the webhook did not answer within alerts.webhook_timeout_ms")]
    Timeout,
    #[error("the webhook's HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the webhook request cannot be built: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("the webhook's body cannot be written as JSON ({0}): please report this as a bug")]
    Body(#[from] serde_json::Error),
    #[error("the webhook answered {0}: check the receiver's logs")]
    Status(hyper::StatusCode),
}

/// What the webhook receives for each transition.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookPost {
    pub kind: AlertKind,
    /// `fired` or `cleared`.
    pub state: &'static str,
    pub message: String,
    pub value: f64,
    pub threshold: f64,
    /// The device id, or `relay`.
    pub device: String,
    /// The account the alert is about (the relay), or empty.
    pub space: String,
    /// When the transition happened (unix ms).
    pub time: u64,
}

/// A process's alert state, shared by whatever observes (`Arc`).
pub struct Monitor {
    config: AlertsConfig,
    source: String,
    scopes: Mutex<BTreeMap<String, Alerts>>,
    webhook: Option<mpsc::Sender<WebhookPost>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// One gauge per alert kind in the metrics exposition: how many scopes (the daemon: 0 or 1;
    /// the relay: accounts, and the relay as a whole) have it active.
    pub fn render_metrics(&self, name: &str, help: &str) -> String {
        let mut out = Exposition::default();
        out.header(name, help, "gauge");
        for (kind, n) in self.active_counts() {
            out.sample(name, &[("kind", kind.as_str())], n);
        }
        out.finish()
    }

    /// `source` names this process in webhook posts (a device id, or `relay`). With a webhook
    /// configured, this starts its sender task: call it inside the tokio runtime.
    pub fn new(config: AlertsConfig, source: impl Into<String>) -> Arc<Self> {
        let webhook = (!config.webhook.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            let timeout = Duration::from_millis(config.webhook_timeout_ms);
            tokio::spawn(send_posts(config.webhook.clone(), timeout, rx));
            tx
        });
        Arc::new(Monitor {
            config,
            source: source.into(),
            scopes: Mutex::new(BTreeMap::new()),
            webhook,
        })
    }

    pub fn config(&self) -> &AlertsConfig {
        &self.config
    }

    /// Feeds one observation to `scope`'s alerts and reports what it changed.
    pub fn observe(
        &self,
        scope: &str,
        now_ms: u64,
        observe: impl FnOnce(&mut Alerts, u64) -> Option<Transition>,
    ) {
        let transition = {
            let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
            let alerts = scopes
                .entry(scope.to_string())
                .or_insert_with(|| Alerts::new(self.config.clone()));
            observe(alerts, now_ms)
        };
        if let Some(transition) = transition {
            self.report(scope, &transition, now_ms);
        }
    }

    /// The alerts active for `scope`, with the whole process's (scope `""`).
    pub fn active(&self, scope: &str) -> Vec<Alert> {
        let scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        let mut active: Vec<Alert> = scopes.get("").map(Alerts::active).unwrap_or_default();
        if !scope.is_empty() {
            active.extend(scopes.get(scope).map(Alerts::active).unwrap_or_default());
        }
        active
    }

    /// How many scopes have each kind of alert active (every kind listed).
    pub fn active_counts(&self) -> Vec<(AlertKind, u64)> {
        let scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        AlertKind::ALL
            .iter()
            .map(|kind| {
                let n = scopes
                    .values()
                    .filter(|a| a.active().iter().any(|x| x.kind == *kind))
                    .count();
                (*kind, n as u64)
            })
            .collect()
    }

    fn report(&self, scope: &str, transition: &Transition, now_ms: u64) {
        let alert = transition.alert();
        let kind = alert.kind.as_str();
        match transition {
            Transition::Fired(_) => tracing::warn!(
                alert = kind,
                space = scope,
                value = alert.value,
                threshold = alert.threshold,
                "alert fired: {}",
                alert.message
            ),
            Transition::Cleared(_) => tracing::info!(
                alert = kind,
                space = scope,
                value = alert.value,
                threshold = alert.threshold,
                "alert cleared"
            ),
        }
        let Some(webhook) = &self.webhook else {
            return;
        };
        let post = WebhookPost {
            kind: alert.kind,
            state: transition.state(),
            message: alert.message.clone(),
            value: alert.value,
            threshold: alert.threshold,
            device: self.source.clone(),
            space: scope.to_string(),
            time: now_ms,
        };
        if webhook.try_send(post).is_err() {
            tracing::warn!(
                alert = kind,
                "the alert webhook is behind or stopped: this transition is not posted"
            );
        }
    }
}

/// Posts each transition in order, one at a time.
async fn send_posts(url: String, timeout: Duration, mut posts: mpsc::Receiver<WebhookPost>) {
    while let Some(post) = posts.recv().await {
        let sent = tokio::time::timeout(timeout, post_json(&url, &post))
            .await
            .unwrap_or(Err(WebhookError::Timeout));
        if let Err(e) = sent {
            tracing::warn!(alert = post.kind.as_str(), state = post.state, error = %e,
                "cannot post the alert to alerts.webhook");
        }
    }
}

/// `http://host:port/path` → (`host:port`, `/path`).
fn split_url(url: &str) -> Result<(String, String), WebhookError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| WebhookError::Url(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(WebhookError::Url(url.into()));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

async fn post_json(url: &str, post: &WebhookPost) -> Result<(), WebhookError> {
    let (authority, path) = split_url(url)?;
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|source| WebhookError::Connect {
            addr: authority.clone(),
            source,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let body = serde_json::to_string(post)?;
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(body)?;
    let response = sender.send_request(request).await;
    driver.abort();
    let status = response?.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(WebhookError::Status(status))
    }
}

/// Free bytes for an unprivileged user on the file system holding `path`.
pub fn disk_free(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is NUL-terminated and `stats` is a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::useless_conversion)] // the field widths differ between platforms
    let free = u64::from(stats.f_bavail).saturating_mul(u64::from(stats.f_frsize));
    Ok(free)
}

/// Bytes of the files under `path` (symbolic links are not followed).
pub fn dir_size(path: &Path) -> std::io::Result<u64> {
    sum_files(path, std::fs::Metadata::len)
}

/// The blocks allocated to the files under `path`, as `du` counts them.
pub fn dir_allocated(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    sum_files(path, |meta| meta.blocks().saturating_mul(512))
}

/// `measure` summed over every file under `path`, however deep.
fn sum_files(path: &Path, measure: impl Fn(&std::fs::Metadata) -> u64) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut pending = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(measure(&meta));
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_split_into_authority_and_path() {
        let (a, p) = split_url("http://127.0.0.1:9000/hooks/alerts").unwrap();
        assert_eq!(
            (a.as_str(), p.as_str()),
            ("127.0.0.1:9000", "/hooks/alerts")
        );
        let (a, p) = split_url("http://example").unwrap();
        assert_eq!((a.as_str(), p.as_str()), ("example:80", "/"));
        assert!(split_url("https://x/").is_err());
        assert!(split_url("http:///x").is_err());
    }

    #[test]
    fn a_directory_size_counts_nested_files_and_disk_free_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/x"), [0u8; 300]).unwrap();
        std::fs::write(dir.path().join("y"), [0u8; 20]).unwrap();
        assert_eq!(dir_size(dir.path()).unwrap(), 320);
        assert!(disk_free(dir.path()).unwrap() > 0);
        assert!(disk_free(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn scopes_are_separate_and_the_whole_process_shows_in_each() {
        let monitor = Monitor::new(
            AlertsConfig {
                account_quota_bytes: 10,
                min_disk_free_mb: 1,
                ..AlertsConfig::default()
            },
            "relay",
        );
        monitor.observe("a", 1, |a, now| a.storage_used(11, now));
        monitor.observe("", 1, |a, now| a.disk_free(0, now));
        let kinds = |scope| {
            monitor
                .active(scope)
                .into_iter()
                .map(|a| a.kind)
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds("a"), [AlertKind::DiskFree, AlertKind::StorageQuota]);
        assert_eq!(kinds("b"), [AlertKind::DiskFree]);
        let counts = monitor.active_counts();
        assert!(counts.contains(&(AlertKind::StorageQuota, 1)));
        assert!(counts.contains(&(AlertKind::SyncFailures, 0)));
    }
}
