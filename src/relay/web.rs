//! The relay's web interface: the page, its script and style (shipped inside the binary, no
//! build step), and the read-only routes it needs beside the sync API: collections, records
//! with their history, the account's devices (with a revoke action), the sync log, per-minute
//! totals for the charts, the account's active alerts, and a stream of server-sent events as the
//! account's log grows.
//!
//! Every route takes the same bearer token as the sync API and reads only the token's account:
//! another account's records and devices answer exactly like missing ones.
//!
//! Must not touch: the store's layout, the token rules, sessions over QUIC. Reads go through
//! `RelayStore`, `Accounts` and `relay::activity`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::accounts::{AccountError, DeviceRecord, Revocation};
use super::activity::{DeviceSync, SyncEvent};
use super::http::{ApiState, ErrorCode, Failure, Principal};

/// Records in one page of `GET /api/records` when the client does not say.
const RECORDS_PAGE: usize = 50;
/// Log entries one change event names at most (it says when there were more).
const EVENT_RECORDS: usize = 200;
/// A comment line keeps idle event streams open through proxies.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/api/collections", get(collections))
        .route("/api/records", get(records))
        .route("/api/records/{collection}/{id}", get(record))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}/revoke", post(revoke))
        .route("/api/sync-log", get(sync_log))
        .route("/api/stats", get(stats))
        .route("/api/alerts", get(alerts))
        .route("/api/events", get(events))
}

/// A static file of the interface. The page runs only its own script and style, never inline
/// code, and may not be framed.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                 base-uri 'none'; form-action 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

fn query_failure(e: axum::extract::rejection::QueryRejection, expected: &str) -> Failure {
    Failure::bad_request(format!("{}: {expected}", e.body_text()))
}

async fn collections(
    State(state): State<ApiState>,
    principal: Principal,
) -> Result<axum::Json<Value>, Failure> {
    let found = tokio::task::block_in_place(|| state.store.collections(&principal.account))?;
    let collections: Vec<Value> = found
        .into_iter()
        .map(|(name, records)| {
            let strategy = state.policies.of(&name).strategy.as_str();
            json!({ "name": name, "records": records, "strategy": strategy })
        })
        .collect();
    Ok(axum::Json(json!({ "collections": collections })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordsQuery {
    collection: String,
    /// The last id of the previous page.
    after: Option<String>,
    limit: Option<usize>,
}

/// A record as its collection's strategy shows it.
#[derive(Serialize)]
struct RecordView {
    collection: String,
    id: String,
    deleted: bool,
    fields: serde_json::Map<String, Value>,
    heads: Vec<String>,
}

fn view(state: &ApiState, space: &str, collection: &str, id: &str) -> Result<RecordView, Failure> {
    let policy = state.policies.of(collection);
    let (view, heads) = state
        .store
        .view(space, collection, id, policy)?
        .ok_or_else(|| no_record(collection, id))?;
    Ok(RecordView {
        collection: collection.to_owned(),
        id: id.to_owned(),
        deleted: view.deleted,
        fields: view.fields.into_iter().collect(),
        heads,
    })
}

fn no_record(collection: &str, id: &str) -> Failure {
    Failure::new(
        ErrorCode::NotFound,
        format!("no record {collection}/{id} in this account"),
    )
}

async fn records(
    State(state): State<ApiState>,
    principal: Principal,
    query: Result<Query<RecordsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Value>, Failure> {
    let Query(query) = query.map_err(|e| {
        query_failure(
            e,
            "give `collection`, and optionally `after` (an id) and `limit`",
        )
    })?;
    let limit = query
        .limit
        .unwrap_or(RECORDS_PAGE)
        .clamp(1, state.options.max_page);
    let space = principal.account.as_str();
    let page = tokio::task::block_in_place(|| {
        let ids = state
            .store
            .records(space, &query.collection, query.after.as_deref(), limit)?;
        ids.iter()
            .map(|id| view(&state, space, &query.collection, id))
            .collect::<Result<Vec<_>, Failure>>()
    })?;
    let next = (page.len() == limit)
        .then(|| page.last().map(|r| r.id.clone()))
        .flatten();
    Ok(axum::Json(json!({
        "collection": query.collection,
        "records": page,
        "next": next,
    })))
}

async fn record(
    State(state): State<ApiState>,
    principal: Principal,
    Path((collection, id)): Path<(String, String)>,
) -> Result<axum::Json<Value>, Failure> {
    let space = principal.account.as_str();
    let (record, history) = tokio::task::block_in_place(|| {
        let record = view(&state, space, &collection, &id)?;
        let history = state
            .store
            .history(space, &collection, &id)?
            .unwrap_or_default();
        Ok::<_, Failure>((record, history))
    })?;
    Ok(axum::Json(json!({ "record": record, "history": history })))
}

/// A device or web client of the account, with its latest sync.
#[derive(Serialize)]
struct DeviceView {
    #[serde(flatten)]
    device: DeviceSummary,
    /// When it last uploaded or was sent changes (since the relay started).
    last_sync_ms: Option<u64>,
    /// Log entries appended since what it was last sent.
    pending: Option<u64>,
    /// The caller itself.
    current: bool,
}

#[derive(Serialize)]
struct DeviceSummary {
    id: String,
    kind: super::accounts::ClientKind,
    label: String,
    registered_ms: u64,
    revoked_ms: Option<u64>,
    last_sign_in_ms: u64,
}

impl From<DeviceRecord> for DeviceSummary {
    fn from(d: DeviceRecord) -> Self {
        DeviceSummary {
            id: d.device,
            kind: d.kind,
            label: d.label,
            registered_ms: d.registered_ms,
            revoked_ms: d.revoked_ms,
            last_sign_in_ms: d.last_sign_in_ms,
        }
    }
}

async fn devices(
    State(state): State<ApiState>,
    principal: Principal,
) -> Result<axum::Json<Value>, Failure> {
    let head = tokio::task::block_in_place(|| state.store.head(&principal.account))?;
    let devices: Vec<DeviceView> = state
        .accounts
        .devices(Some(&principal.account))
        .into_iter()
        .map(|d| {
            let synced: Option<DeviceSync> =
                state.live.activity.device(&principal.account, &d.device);
            DeviceView {
                current: d.device == principal.device,
                last_sync_ms: synced.as_ref().map(|s| s.last_sync_ms),
                pending: synced.map(|s| head.saturating_sub(s.sent_through)),
                device: d.into(),
            }
        })
        .collect();
    Ok(axum::Json(json!({ "head": head, "devices": devices })))
}

async fn revoke(
    State(state): State<ApiState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Failure> {
    let missing = || {
        Failure::new(
            ErrorCode::NotFound,
            format!("no device {id} in this account"),
        )
    };
    let owned = state
        .accounts
        .devices(Some(&principal.account))
        .iter()
        .any(|d| d.device == id);
    if !owned {
        return Err(missing());
    }
    let revoked = tokio::task::block_in_place(|| state.accounts.revoke(&id, state.clock.now_ms()))
        .map_err(|e| match e {
            AccountError::NoDevice(_) => missing(),
            other => {
                tracing::error!(error = %other, "revoking a device over HTTP failed");
                Failure::new(
                    ErrorCode::Unavailable,
                    format!("the relay could not revoke the device: {other}"),
                )
            }
        })?;
    tracing::info!(
        account = principal.account,
        by = principal.device,
        device = id,
        "device revoked over HTTP"
    );
    Ok(axum::Json(
        json!({ "device": DeviceSummary::from(revoked) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn sync_log(
    State(state): State<ApiState>,
    principal: Principal,
    query: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Value>, Failure> {
    let Query(query) = query.map_err(|e| query_failure(e, "`limit` is a whole number"))?;
    let limit = query.limit.unwrap_or(100).min(super::activity::LOG_ENTRIES);
    let entries: Vec<SyncEvent> = state.live.activity.log(&principal.account, limit);
    Ok(axum::Json(json!({ "entries": entries })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    /// How many minutes back (default 60, at most a day).
    minutes: Option<u64>,
}

async fn stats(
    State(state): State<ApiState>,
    principal: Principal,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Value>, Failure> {
    let Query(query) = query.map_err(|e| query_failure(e, "`minutes` is a whole number"))?;
    let minutes = query
        .minutes
        .unwrap_or(60)
        .clamp(1, super::activity::MINUTES as u64);
    let now = state.clock.now_ms();
    let since = now.saturating_sub(minutes * 60_000);
    let totals = state.live.activity.minutes(&principal.account, since);
    Ok(axum::Json(json!({
        "now_ms": now,
        "since_ms": since,
        "minutes": totals,
    })))
}

/// The account's active alerts (`relay::alerts`): its storage quota and conflict rate, and the
/// relay's disk.
async fn alerts(
    State(state): State<ApiState>,
    principal: Principal,
) -> Result<axum::Json<Value>, Failure> {
    Ok(axum::Json(
        json!({ "alerts": state.alerts.active(&principal.account) }),
    ))
}

/// What an event stream waits on between events.
struct Stream {
    state: ApiState,
    principal: Principal,
    head: watch::Receiver<u64>,
    revocations: broadcast::Receiver<Revocation>,
    /// The log position the last event reached.
    sent: u64,
    started: bool,
    /// The token expired: the stream ends after saying so.
    ended: bool,
}

impl Stream {
    /// The next chunk of the stream; `None` ends it (token expired, client revoked, relay
    /// stopping).
    async fn next(&mut self) -> Option<String> {
        if self.ended {
            return None;
        }
        if !self.started {
            self.started = true;
            return Some(format!(
                "retry: 3000\nevent: hello\ndata: {}\n\n",
                json!({ "head": self.sent, "device": self.principal.device })
            ));
        }
        loop {
            let expires_in = Duration::from_millis(
                self.principal
                    .expires_ms
                    .saturating_sub(self.state.clock.now_ms()),
            );
            tokio::select! {
                changed = self.head.changed() => {
                    changed.ok()?;
                    let head = *self.head.borrow_and_update();
                    return Some(self.changes(head));
                }
                revocation = self.revocations.recv() => {
                    let revoked = match revocation {
                        Ok(Revocation::Device(d)) => d == self.principal.device,
                        Ok(Revocation::Family(f)) => f == self.principal.family,
                        Err(broadcast::error::RecvError::Closed) => true,
                        Err(broadcast::error::RecvError::Lagged(_)) => !self
                            .state
                            .accounts
                            .still_admitted(&self.principal.device, &self.principal.family),
                    };
                    if revoked {
                        return None;
                    }
                }
                _ = tokio::time::sleep(KEEP_ALIVE) => return Some(":\n\n".into()),
                _ = tokio::time::sleep(expires_in) => {
                    self.ended = true;
                    return Some(format!(
                        "event: expired\ndata: {}\n\n",
                        json!({ "message": "the access token expired: refresh it and reconnect" })
                    ));
                }
            }
        }
    }

    /// A `change` event naming the records the log entries after the last event touched.
    fn changes(&mut self, head: u64) -> String {
        let read = tokio::task::block_in_place(|| {
            self.state.store.read_since(
                &self.principal.account,
                self.sent,
                EVENT_RECORDS,
                usize::MAX,
            )
        });
        let (records, through) = match read {
            Ok(slice) => {
                let records: Vec<Value> = slice
                    .entries
                    .iter()
                    .map(|e| json!({ "seq": e.seq, "collection": e.collection, "id": e.record }))
                    .collect();
                (records, slice.through)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the log for an event stream");
                (Vec::new(), self.sent)
            }
        };
        let more = through < head;
        self.sent = head;
        format!(
            "event: change\ndata: {}\n\n",
            json!({ "head": head, "records": records, "more": more })
        )
    }
}

async fn events(State(state): State<ApiState>, principal: Principal) -> Result<Response, Failure> {
    let head = tokio::task::block_in_place(|| state.store.head(&principal.account))?;
    let stream = Stream {
        head: state.live.spaces.subscribe(&principal.account, head),
        revocations: state.accounts.subscribe_revocations(),
        state,
        principal,
        sent: head,
        started: false,
        ended: false,
    };
    let body = futures_util::stream::unfold(stream, |mut stream| async move {
        let chunk = stream.next().await?;
        Some((Ok::<_, Infallible>(chunk), stream))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}
