//! The daemon's plain-HTTP `GET /metrics` server (axum, on `metrics.listen`): renders
//! `engine::DaemonMetrics` with the sync status, the store and the alerts.
//!
//! Must not touch: what is synced or stored; it only reads.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::alerting::Monitor;
use crate::engine::{DaemonMetrics, SyncHandle};
use crate::metrics::CONTENT_TYPE;
use crate::store::Store;

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
        text.push_str(&scrape.alerts.render_metrics(
            "ferry_alerts_active",
            "1 while the alert of this kind is active, else 0.",
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
