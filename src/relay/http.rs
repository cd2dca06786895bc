//! The relay's HTTPS API: JSON over HTTP/1.1 and HTTP/2, TLS 1.3 only with the relay's own
//! certificate (the one devices pin), for clients that cannot run the daemon and for the web
//! interface. Requests carry the same access tokens as QUIC sessions (`Authorization: Bearer`),
//! checked by `Accounts::check_access`; every handler reads and writes only the token's
//! account's space, and another account's records answer exactly like missing ones.
//!
//! Owns: routes, request and response shapes, the mapping of errors to HTTP statuses, ETags and
//! the cache of download pages. Must not touch: the log's layout (`relay::store`), the token
//! rules (`auth::token`, `relay::accounts`), sessions over QUIC.
//!
//! Endpoints (docs/HTTP.md has the shapes):
//! - `POST /api/auth/login` {account, password, label?}: a person or an HTTP-only client signs
//!   in with the account's password; it is registered as a `web` client of the account (listed
//!   and revocable like a device) and gets tokens.
//! - `POST /api/auth/refresh` {refresh_token}: rotates a refresh token (reuse revokes its family).
//! - `POST /api/sync/initialize` {device_id, app_version, last_sync}: server time, the log's
//!   head, how much changed since `last_sync`, protocol and app version compatibility.
//! - `GET /api/sync/download?since=CURSOR&limit=N`: the records changed after the cursor, as
//!   JSON, one page at a time, with an `ETag` (`304 Not Modified` when it matches) and gzip
//!   when the client accepts it.
//! - `POST /api/sync/upload`, `GET /api/conflicts`, `GET /api/conflicts/{id}`,
//!   `POST /api/sync/resolve-conflict`: writes and conflict resolutions as the space's web actor
//!   (`relay::web_write`, `relay::web_actor`).
//! - `GET /metrics`: the relay's Prometheus metrics, for a scraper that shows
//!   `relay.metrics_token` as its bearer token (served only when that is set).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferry_proto::wire::{PROTOCOL_VERSION, Secret};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::accounts::{Accounts, Denied};
use super::server::AttemptLimiter;
use super::store::{RelayStore, RelayStoreError};
use super::web_actor::WebActors;
use crate::clock::Clock;
use crate::resolve::Policies;

/// Pages of `download` kept rendered: a page is the same bytes until the log grows.
const CACHED_PAGES: usize = 256;
/// A TLS handshake must finish within this long.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest request body, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most records in one `download` page.
    pub max_page: usize,
    /// The oldest app version `initialize` calls compatible ("" accepts all).
    pub min_app_version: String,
    /// Password sign-ins one client address may try per minute.
    pub logins_per_minute: u32,
}

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    pub clock: Arc<dyn Clock>,
    pub accounts: Arc<Accounts>,
    pub store: Arc<RelayStore>,
    pub policies: Arc<Policies>,
    pub options: HttpOptions,
    /// The relay's metrics and the token a scraper must show; `None`: no `/metrics`.
    pub metrics: Option<(super::metrics::RelayScrape, Secret)>,
    pub live: Live,
    /// Each space's web actor, for the write and conflict routes (`relay::web_actor`).
    pub web_actors: Arc<WebActors>,
    /// The relay's alerts: `alerts.active(space)` for the token's account.
    pub alerts: Arc<super::alerts::RelayAlerts>,
    logins: Arc<Mutex<AttemptLimiter>>,
    pages: Arc<Mutex<lru::LruCache<PageKey, Bytes>>>,
}

/// What the relay's QUIC side shares with the API: each space's log head as it moves, and what
/// devices did (`activity::Activity`).
#[derive(Clone)]
pub struct Live {
    pub spaces: Arc<super::server::Spaces>,
    pub activity: Arc<super::activity::Activity>,
}

/// (account, since, limit, head, gzip).
type PageKey = (String, u64, usize, u64, bool);

impl ApiState {
    pub fn new(
        shared: &super::server::Shared,
        policies: Arc<Policies>,
        options: HttpOptions,
        metrics: Option<(super::metrics::RelayScrape, Secret)>,
        web_actors: Arc<WebActors>,
    ) -> Self {
        ApiState {
            clock: shared.clock.clone(),
            accounts: shared.accounts.clone(),
            store: shared.store.clone(),
            live: Live {
                spaces: shared.spaces.clone(),
                activity: shared.activity.clone(),
            },
            alerts: shared.alerts.clone(),
            metrics,
            web_actors,
            logins: Arc::new(Mutex::new(AttemptLimiter::new(options.logins_per_minute))),
            pages: Arc::new(Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(CACHED_PAGES).unwrap_or(std::num::NonZeroUsize::MIN),
            ))),
            policies,
            options,
        }
    }
}

/// The client's address, put on each request by the connection it came on.
#[derive(Debug, Clone, Copy)]
struct Remote(SocketAddr);

/// The stable code of an HTTP error response, which clients match on; each goes with one status
/// (docs/HTTP.md lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON or not the expected shape; a bad query.
    BadRequest,
    /// No token, a bad, expired or revoked one, or a wrong password.
    Unauthorized,
    /// The client was revoked by the operator.
    Forbidden,
    /// No such endpoint, record or conflict (another account's look the same).
    NotFound,
    /// A cursor past the end of the account's log.
    CursorAhead,
    /// A cursor below the account's compaction horizon: the log after it is no longer kept.
    Compacted,
    /// The conflict is already resolved, auto-resolved or being resolved.
    Settled,
    /// The body is over `relay.http_max_body_bytes`.
    TooLarge,
    /// Too many sign-ins from one address.
    RateLimited,
    /// The relay's store failed: retry later.
    Unavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::CursorAhead,
        ErrorCode::Compacted,
        ErrorCode::Settled,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];

    /// The HTTP status an error with this code is sent with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::CursorAhead | ErrorCode::Settled => StatusCode::CONFLICT,
            ErrorCode::Compacted => StatusCode::GONE,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error as an HTTP client sees it: its code's status and `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct Failure {
    code: ErrorCode,
    message: String,
}

/// The body of an error response.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl Failure {
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Failure::new(ErrorCode::BadRequest, message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferry\""),
            );
        }
        response
    }
}

impl From<Denied> for Failure {
    fn from(denied: Denied) -> Self {
        tracing::info!(reason = denied.reason(), "HTTP request refused");
        match denied {
            Denied::Store(e) => Failure::new(
                ErrorCode::Unavailable,
                format!("the relay could not check the credential: {e}"),
            ),
            Denied::Revoked | Denied::NotRegistered | Denied::OtherAccount => {
                Failure::new(ErrorCode::Forbidden, denied.to_string())
            }
            other => Failure::new(ErrorCode::Unauthorized, other.to_string()),
        }
    }
}

impl From<RelayStoreError> for Failure {
    fn from(e: RelayStoreError) -> Self {
        match e {
            RelayStoreError::Address(e) => {
                Failure::new(ErrorCode::NotFound, format!("no such record: {e}"))
            }
            other => {
                tracing::error!(error = %other, "the relay's store failed an HTTP request");
                Failure::new(
                    ErrorCode::Unavailable,
                    "the relay's store failed: try again later",
                )
            }
        }
    }
}

/// A JSON body of type `T`: a body that is not JSON, or not `T`, is a 400 naming the field.
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: for<'de> Deserialize<'de>,
    S: Send + Sync,
{
    type Rejection = Failure;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Failure> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Failure::new(
                    ErrorCode::TooLarge,
                    "the request body is over the relay's limit (relay.http_max_body_bytes): \
                     send fewer operations per request",
                )
            } else {
                Failure::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(&mut de)
            .map(JsonBody)
            .map_err(|e| {
                let at = e.path().to_string();
                let inner = e.into_inner();
                if inner.is_syntax() || inner.is_eof() {
                    Failure::bad_request(format!("the body is not valid JSON: {inner}"))
                } else if at == "." {
                    Failure::bad_request(format!(
                        "the body does not have the expected shape: {inner}"
                    ))
                } else {
                    Failure::bad_request(format!("field `{at}`: {inner}"))
                }
            })
    }
}

/// Who a request comes from: its access token's account and client.
#[derive(Debug, Clone)]
pub struct Principal {
    pub account: String,
    pub device: String,
    /// When the access token expires, ms since the epoch.
    pub expires_ms: u64,
    /// The token family, which a revocation may end.
    pub family: String,
}

impl FromRequestParts<ApiState> for Principal {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Failure> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Failure::new(
                    ErrorCode::Unauthorized,
                    "no access token: send `Authorization: Bearer TOKEN` (POST /api/auth/login)",
                )
            })?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| {
                Failure::new(
                    ErrorCode::Unauthorized,
                    "the Authorization header must be `Bearer TOKEN`",
                )
            })?
            .trim();
        let claims = state.accounts.check_access(token, state.clock.now_ms())?;
        Ok(Principal {
            account: claims.sub,
            device: claims.device,
            expires_ms: claims.exp.saturating_mul(1000),
            family: claims.fam,
        })
    }
}

pub fn router(state: ApiState) -> Router {
    let limit = state.options.max_body_bytes;
    Router::new()
        .route("/api/auth/login", post(login))
        .route("/api/auth/refresh", post(refresh))
        .route("/api/sync/initialize", post(initialize))
        .route("/api/sync/download", get(download))
        .route("/metrics", get(metrics))
        .merge(super::web::routes())
        .merge(super::web_write::routes())
        .fallback(|| async {
            Failure::new(ErrorCode::NotFound, "no such endpoint: see docs/HTTP.md")
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    account: String,
    password: String,
    /// What this client is, as `ferry relay devices` lists it ("web" when absent).
    label: Option<String>,
}

#[derive(Serialize)]
struct TokenResponse {
    access_token: String,
    access_expires_ms: u64,
    refresh_token: String,
    refresh_expires_ms: u64,
    account: String,
    device: String,
    token_type: &'static str,
}

impl TokenResponse {
    fn new(account: String, device: String, tokens: ferry_proto::wire::Tokens) -> Self {
        TokenResponse {
            access_token: tokens.access.expose().to_string(),
            access_expires_ms: tokens.access_expires_ms,
            refresh_token: tokens.refresh.expose().to_string(),
            refresh_expires_ms: tokens.refresh_expires_ms,
            account,
            device,
            token_type: "Bearer",
        }
    }
}

fn remote_ip(parts: &axum::http::Extensions) -> std::net::IpAddr {
    parts
        .get::<Remote>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |r| r.0.ip())
}

async fn login(
    State(state): State<ApiState>,
    extensions: axum::http::Extensions,
    JsonBody(request): JsonBody<LoginRequest>,
) -> Result<axum::Json<TokenResponse>, Failure> {
    let allowed = state
        .logins
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .allow(remote_ip(&extensions), state.clock.now_ms());
    if !allowed {
        return Err(Failure::new(
            ErrorCode::RateLimited,
            "too many sign-in attempts from this address: wait a minute, then try again",
        ));
    }
    let label = request.label.unwrap_or_else(|| "web".into());
    let (device, tokens) = tokio::task::block_in_place(|| {
        state.accounts.login(
            &request.account,
            &Secret::new(request.password),
            &label,
            state.clock.now_ms(),
        )
    })?;
    Ok(axum::Json(TokenResponse::new(
        request.account,
        device,
        tokens,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: String,
}

async fn refresh(
    State(state): State<ApiState>,
    JsonBody(request): JsonBody<RefreshRequest>,
) -> Result<axum::Json<TokenResponse>, Failure> {
    let (account, device, tokens) = tokio::task::block_in_place(|| {
        state
            .accounts
            .refresh_bearer(&Secret::new(request.refresh_token), state.clock.now_ms())
    })?;
    Ok(axum::Json(TokenResponse::new(account, device, tokens)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InitializeRequest {
    /// The client's own name for itself, for the relay's logs.
    device_id: String,
    app_version: String,
    /// The cursor the client synced up to last time (`null` or absent: never).
    last_sync: Option<u64>,
}

/// Compares versions as major.minor.patch numbers ("1.10.2" is after "1.9"; missing parts are
/// 0; a pre-release or build suffix is ignored). A version that is not numbers is not
/// compatible with any minimum.
fn version_at_least(version: &str, minimum: &str) -> bool {
    let parts = |v: &str| -> Option<[u64; 3]> {
        let core = v.trim_start_matches('v').split(['-', '+']).next()?;
        let mut numbers = [0u64; 3];
        for (slot, part) in numbers.iter_mut().zip(core.split('.')) {
            *slot = part.parse().ok()?;
        }
        (core.split('.').count() <= 3).then_some(numbers)
    };
    match (parts(version), parts(minimum)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
}

async fn initialize(
    State(state): State<ApiState>,
    principal: Principal,
    JsonBody(request): JsonBody<InitializeRequest>,
) -> Result<axum::Json<Value>, Failure> {
    if request.device_id.is_empty() || request.device_id.len() > 256 {
        return Err(Failure::bad_request(
            "field `device_id`: give the client's name for itself, 1 to 256 bytes",
        ));
    }
    let head = tokio::task::block_in_place(|| state.store.head(&principal.account))?;
    let since = request.last_sync.unwrap_or(0);
    if since > head {
        return Err(Failure::new(
            ErrorCode::CursorAhead,
            format!(
                "last_sync {since} is past the account's log, which ends at {head}: the relay \
                 lost part of its log (restored from a backup?); sync from 0"
            ),
        ));
    }
    let minimum = &state.options.min_app_version;
    let compatible = minimum.is_empty() || version_at_least(&request.app_version, minimum);
    tracing::info!(
        account = principal.account,
        client = request.device_id,
        app_version = request.app_version,
        "HTTP client initialised"
    );
    Ok(axum::Json(json!({
        "server_time_ms": state.clock.now_ms(),
        "account": principal.account,
        "cursor": head,
        "changes_since_last_sync": head - since,
        "protocol_version": PROTOCOL_VERSION,
        "app_version": { "compatible": compatible, "minimum": minimum },
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

/// One record in a download page: its state now, and the last log position in the page that
/// changed it.
#[derive(Serialize)]
struct DownloadedRecord {
    collection: String,
    id: String,
    seq: u64,
    deleted: bool,
    fields: BTreeMap<String, Value>,
    heads: Vec<String>,
    /// The heads comma-joined: what `upload` answers as a record's version.
    version: String,
}

async fn download(
    State(state): State<ApiState>,
    principal: Principal,
    query: Result<Query<DownloadQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let Query(query) = query.map_err(|e| {
        Failure::bad_request(format!(
            "{}: `since` and `limit` are whole numbers",
            e.body_text()
        ))
    })?;
    let since = query.since.unwrap_or(0);
    let limit = query
        .limit
        .unwrap_or(state.options.max_page)
        .clamp(1, state.options.max_page);
    let (head, horizon) = tokio::task::block_in_place(|| {
        let store = &state.store;
        Ok::<_, RelayStoreError>((
            store.head(&principal.account)?,
            store.horizon(&principal.account)?,
        ))
    })?;
    if since > head {
        return Err(Failure::new(
            ErrorCode::CursorAhead,
            format!("since {since} is past the account's log, which ends at {head}: sync from 0"),
        ));
    }
    if since < horizon {
        return Err(compacted(since, horizon));
    }
    // A gzip body is another representation of the page: its own ETag, its own cache entry.
    let gzip = accepts_gzip(&headers);
    let etag = format!(
        "\"{head}-{since}-{limit}{}\"",
        if gzip { "-gz" } else { "" }
    );
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let body =
        tokio::task::block_in_place(|| page_body(&state, &principal, (since, limit, head), gzip))?;
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, "private, no-cache".to_string()),
            (header::VARY, "accept-encoding".to_string()),
        ],
        body,
    )
        .into_response();
    if gzip {
        // Already compressed: the compression layer leaves a response with an encoding alone.
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok(response)
}

/// The answer to a cursor below the account's compaction horizon (PROTOCOL.md, section 5.8).
fn compacted(since: u64, horizon: u64) -> Failure {
    Failure::new(
        ErrorCode::Compacted,
        format!(
            "the account's log up to {horizon} is no longer kept, so the changes after {since} \
             cannot be listed: read every record again (GET /api/records) and download from \
             since={horizon}"
        ),
    )
}

/// Whether the request accepts a gzip body (`Accept-Encoding: gzip`, not with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            parts
                .next()
                .is_some_and(|name| name.eq_ignore_ascii_case("gzip"))
                && parts.all(|p| p.replace(' ', "") != "q=0" && p.replace(' ', "") != "q=0.0")
        })
}

/// A download page's body, from the page cache or rendered (and compressed) now. Pages are
/// cached under the head the ETag names: a page read after a later append is newer than that,
/// never older, and the next request's ETag moves on anyway.
fn page_body(
    state: &ApiState,
    principal: &Principal,
    (since, limit, head): (u64, usize, u64),
    gzip: bool,
) -> Result<Bytes, Failure> {
    let key = |gzip| (principal.account.clone(), since, limit, head, gzip);
    let cached = |gzip| {
        state
            .pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key(gzip))
            .cloned()
    };
    let keep = |gzip, body: &Bytes| {
        state
            .pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(key(gzip), body.clone());
    };
    if let Some(body) = cached(gzip) {
        return Ok(body);
    }
    let plain = match cached(false) {
        Some(body) => body,
        None => {
            let body = render_page(state, principal, since, limit)?;
            keep(false, &body);
            body
        }
    };
    if !gzip {
        return Ok(plain);
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let compressed = std::io::Write::write_all(&mut encoder, &plain)
        .and_then(|()| encoder.finish())
        .map_err(|e| {
            Failure::new(
                ErrorCode::Unavailable,
                format!("compressing the page failed: {e}"),
            )
        })?;
    let body = Bytes::from(compressed);
    keep(true, &body);
    Ok(body)
}

fn render_page(
    state: &ApiState,
    principal: &Principal,
    since: u64,
    limit: usize,
) -> Result<Bytes, Failure> {
    let slice = state
        .store
        .read_since(&principal.account, since, limit, usize::MAX)?;
    if since < slice.horizon {
        // Compacted since the cursor was checked.
        return Err(compacted(since, slice.horizon));
    }
    // The newest position of each record in the page, in log order.
    let mut last_seq: BTreeMap<(String, String), u64> = BTreeMap::new();
    for entry in &slice.entries {
        last_seq.insert((entry.collection.clone(), entry.record.clone()), entry.seq);
    }
    let mut order: Vec<_> = last_seq.into_iter().collect();
    order.sort_by_key(|(_, seq)| *seq);
    let mut records = Vec::with_capacity(order.len());
    for ((collection, id), seq) in order {
        let policy = state.policies.of(&collection);
        let Some((view, heads)) = state
            .store
            .view(&principal.account, &collection, &id, policy)?
        else {
            continue;
        };
        records.push(DownloadedRecord {
            collection,
            id,
            seq,
            deleted: view.deleted,
            fields: view.fields.into_iter().collect(),
            version: super::web_actor::version(&heads),
            heads,
        });
    }
    let next = (slice.through < slice.head).then_some(slice.through);
    let page = json!({
        "since": since,
        "through": slice.through,
        "head": slice.head,
        "next": next,
        "records": records,
    });
    Ok(Bytes::from(page.to_string()))
}

async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Result<Response, Failure> {
    let Some((scrape, token)) = state.metrics.clone() else {
        return Err(Failure::new(
            ErrorCode::NotFound,
            "this relay serves no metrics: set relay.metrics_token",
        ));
    };
    let shown = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let matches: bool =
        subtle::ConstantTimeEq::ct_eq(shown.as_bytes(), token.expose().as_bytes()).into();
    if !matches {
        return Err(Failure::new(
            ErrorCode::Unauthorized,
            "scraping needs `Authorization: Bearer` with relay.metrics_token",
        ));
    }
    let text = tokio::task::spawn_blocking(move || scrape.render())
        .await
        .map_err(|e| {
            Failure::new(
                ErrorCode::Unavailable,
                format!("rendering the metrics failed: {e}"),
            )
        })?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, at most `max_connections`
/// connections at once: past that, new ones are closed unread, so a flood of connections costs
/// the relay no more than that many tasks and buffers.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((tcp, remote)) = accepted else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(%remote, "HTTPS connection refused: at the connection limit");
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        tracing::debug!(%remote, "HTTPS handshake failed");
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |mut request: axum::http::Request<hyper::body::Incoming>| {
                            request.extensions_mut().insert(Remote(remote));
                            tower::ServiceExt::oneshot(app.clone(), request)
                        },
                    );
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    if let Err(e) = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(%remote, error = %e, "HTTPS connection ended");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_versions_compare_by_number() {
        assert!(version_at_least("1.10.0", "1.9.3"));
        assert!(version_at_least("v2.0", "2.0.0"));
        assert!(version_at_least("2.0.1-beta", "2.0.1"));
        assert!(!version_at_least("1.2.9", "1.3"));
        assert!(!version_at_least("banana", "1.0"));
        assert!(!version_at_least("1.2.3.4", "1.0"));
    }
}
