//! The HTTPS API's write and conflict routes, which act through the space's web actor
//! (`relay::web_actor`): `POST /api/sync/upload`, `GET /api/conflicts`, `GET /api/conflicts/{id}`
//! and `POST /api/sync/resolve-conflict` (docs/HTTP.md has the shapes).
//!
//! Owns: these routes' request and response shapes and the mapping of the web actor's errors to
//! HTTP statuses. Must not touch: the log directly (only through `WebActors`), tokens (the
//! `Principal` extractor has checked them).

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::http::{ApiState, ErrorCode, Failure, JsonBody, Principal};
use super::web_actor::{
    RejectCode, Resolved, WebActorError, WebActors, WebOperation, WebWrite, WriteOutcome,
};
use crate::record::Fields;
use crate::resolve::{Conflict, Take};
use crate::service::api::{ConflictPage, ConflictsParams};
use crate::service::code;

/// The earliest `timestamp` an operation may carry (2000-01-01): anything before is a clock
/// that was never set, or seconds sent as milliseconds.
const EARLIEST_TIMESTAMP_MS: u64 = 946_684_800_000;
/// How far ahead of the relay's clock an operation's `timestamp` may be.
const MAX_CLOCK_AHEAD_MS: u64 = 24 * 3600 * 1000;

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/sync/upload", post(upload))
        .route("/api/conflicts", get(list_conflicts))
        .route("/api/conflicts/{id}", get(get_conflict))
        .route("/api/sync/resolve-conflict", post(resolve_conflict))
}

impl From<WebActorError> for Failure {
    fn from(e: WebActorError) -> Self {
        match e {
            WebActorError::Log(e) => e.into(),
            WebActorError::Refused(e) => match e.code {
                code::NOT_FOUND => Failure::new(ErrorCode::NotFound, e.message),
                code::CONFLICT_SETTLED => Failure::new(ErrorCode::Settled, e.message),
                code::INVALID_PARAMS => Failure::bad_request(e.message),
                _ => {
                    tracing::error!(error = %e, "the space's web actor failed an HTTP request");
                    Failure::new(
                        ErrorCode::Unavailable,
                        "the relay could not write to the account: try again later",
                    )
                }
            },
        }
    }
}

/// Runs `work` with the web actors, off the async runtime's threads.
fn with_web_actors<T>(
    state: &ApiState,
    work: impl FnOnce(&WebActors) -> Result<T, WebActorError>,
) -> Result<T, Failure> {
    tokio::task::block_in_place(|| Ok(work(&state.web_actors)?))
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UploadOperation {
    operation: WebOperation,
    model: String,
    object_id: String,
    /// A create's fields, or the top-level fields an update sets; absent for a delete.
    data: Option<Fields>,
    /// When the client made the change (ms since the epoch): checked, then only logged.
    timestamp: u64,
    /// The client's id, as its access token names it.
    device_id: String,
    /// The record's `version` (as `download` or an earlier upload gave it) the client made an
    /// update or delete on.
    base: Option<String>,
}

async fn upload(
    State(state): State<ApiState>,
    principal: Principal,
    JsonBody(operations): JsonBody<Vec<UploadOperation>>,
) -> Result<axum::Json<Uploaded>, Failure> {
    let now = state.clock.now_ms();
    let Planned { outcomes, writes } = plan(operations, &principal.device, now)?;
    let written = if writes.is_empty() {
        Vec::new()
    } else {
        with_web_actors(&state, |actors| {
            actors.write(&principal.account, writes, now)
        })?
    };
    let results = merge(outcomes, written);
    let count = |f: fn(&WriteOutcome) -> bool| results.iter().filter(|r| f(r)).count();
    // The changes carry the web actor's id; this line says which client made them.
    tracing::info!(
        account = principal.account,
        client = principal.device,
        applied = count(|r| matches!(r, WriteOutcome::Applied { .. })),
        conflicts = count(|r| matches!(r, WriteOutcome::Conflict { .. })),
        rejected = count(|r| matches!(r, WriteOutcome::Rejected { .. })),
        "HTTP upload"
    );
    Ok(axum::Json(Uploaded { results }))
}

/// An upload's answer: one result per operation, in order.
#[derive(Serialize)]
struct Uploaded {
    results: Vec<WriteOutcome>,
}

/// An upload's operations checked against the client and the clock: a rejection for each one
/// that fails (in order, `None` where it goes on), and the writes for the web actor.
pub(crate) struct Planned {
    pub outcomes: Vec<Option<WriteOutcome>>,
    pub writes: Vec<WebWrite>,
}

/// Checks each operation of an upload by `device` at `now`; an operation that cannot be
/// understood at all (an update without `data`) fails the whole request.
pub(crate) fn plan(
    operations: Vec<UploadOperation>,
    device: &str,
    now: u64,
) -> Result<Planned, Failure> {
    let mut outcomes: Vec<Option<WriteOutcome>> = Vec::with_capacity(operations.len());
    let mut writes = Vec::new();
    for (index, op) in operations.into_iter().enumerate() {
        let fields = match (op.operation, op.data) {
            (WebOperation::Delete, _) => Fields::new(),
            (_, Some(fields)) => fields,
            (_, None) => {
                return Err(Failure::bad_request(format!(
                    "operation [{index}]: `data` is required for create and update"
                )));
            }
        };
        let rejected = if op.device_id != device {
            Some(WriteOutcome::rejected(
                &op.object_id,
                RejectCode::WrongDevice,
                format!(
                    "device_id {:?} is not the client the access token was issued to ({device}): \
                     send the `device` the sign-in answered",
                    op.device_id
                ),
            ))
        } else if op.timestamp < EARLIEST_TIMESTAMP_MS
            || op.timestamp > now.saturating_add(MAX_CLOCK_AHEAD_MS)
        {
            Some(WriteOutcome::rejected(
                &op.object_id,
                RejectCode::BadTimestamp,
                format!(
                    "timestamp {} is not a time in milliseconds since 1970 near the relay's \
                     clock: check the client's clock and units",
                    op.timestamp
                ),
            ))
        } else {
            None
        };
        let base = match op.base.as_deref().map(parse_version).transpose() {
            Ok(base) => base,
            Err(reason) => {
                outcomes.push(Some(WriteOutcome::rejected(
                    &op.object_id,
                    RejectCode::BadVersion,
                    reason,
                )));
                continue;
            }
        };
        if rejected.is_none() {
            writes.push(WebWrite {
                operation: op.operation,
                collection: op.model,
                id: op.object_id,
                fields,
                base,
            });
        }
        outcomes.push(rejected);
    }
    Ok(Planned { outcomes, writes })
}

/// Each operation's result in order: its rejection, or the next write's outcome.
pub(crate) fn merge(
    outcomes: Vec<Option<WriteOutcome>>,
    written: Vec<WriteOutcome>,
) -> Vec<WriteOutcome> {
    let mut written = written.into_iter();
    outcomes
        .into_iter()
        .filter_map(|outcome| outcome.or_else(|| written.next()))
        .collect()
}

/// A `version`: the record's heads, hex, comma-joined.
fn parse_version(version: &str) -> Result<Vec<automerge::ChangeHash>, String> {
    version
        .split(',')
        .map(|head| {
            head.trim().parse().map_err(|_| {
                format!(
                    "base {version:?} is not a record version (change hashes, 64 hex digits \
                     each, comma-joined): send the `version` download gave"
                )
            })
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConflictsQuery {
    /// open (the default), resolved, auto_resolved or all.
    status: Option<String>,
    /// The `next` of the previous page.
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_conflicts(
    State(state): State<ApiState>,
    principal: Principal,
    query: Result<Query<ConflictsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<ConflictPage>, Failure> {
    let Query(query) = query.map_err(|e| {
        Failure::bad_request(format!(
            "{}: `status` is open, resolved, auto_resolved or all; `limit` a whole number",
            e.body_text()
        ))
    })?;
    let query = ConflictsParams {
        status: query.status,
        collection: None,
        after: query.after,
        limit: query.limit,
    };
    let list = with_web_actors(&state, |actors| actors.conflicts(&principal.account, query))?;
    Ok(axum::Json(list))
}

async fn get_conflict(
    State(state): State<ApiState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<axum::Json<Conflict>, Failure> {
    let conflict = with_web_actors(&state, |actors| actors.conflict(&principal.account, &id))?;
    Ok(axum::Json(conflict))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveConflictRequest {
    conflict_id: String,
    resolution: Take,
    /// The fields a `merge` sets over the record as it is now.
    resolved_data: Option<Fields>,
}

async fn resolve_conflict(
    State(state): State<ApiState>,
    principal: Principal,
    JsonBody(request): JsonBody<ResolveConflictRequest>,
) -> Result<axum::Json<Resolved>, Failure> {
    let resolved = with_web_actors(&state, |actors| {
        actors.resolve(
            &principal.account,
            &request.conflict_id,
            request.resolution,
            request.resolved_data,
            state.clock.now_ms(),
        )
    })?;
    Ok(axum::Json(resolved))
}
