//! The local API's shapes: one request type per method (its params) and one answer type per
//! method, serialised exactly as the socket carries them (docs/IPC.md). `Request` is the closed
//! set of methods; `Method` ties each request type to its answer.
//!
//! Owns: field names and JSON shapes. Must not touch: what a method does (that is
//! `service::Service`), JSON-RPC envelopes and framing (that is `ipc`).

use std::path::PathBuf;

use ferry_proto::SyncLogEntry;
use serde::{Deserialize, Serialize};

use super::{ApiError, QueueView, Service};
use crate::record::{Fields, HistoryEntry};
use crate::resolve::{Conflict, Take};
use crate::store::conflicts::{ConflictCounts, ResolveOutcome};
use crate::store::health::{Checkup, Damage, Repaired};
use crate::store::{Applied, QueueCounts, RecordView};

/// A method's name on the socket, given by `methods!`.
pub trait Named {
    const NAME: &'static str;
}

/// A method's params, typed: the answer it gets and how the service runs it.
pub trait Method: Named + Into<Request> {
    type Answer: Serialize + serde::de::DeserializeOwned;

    /// Runs the method. Blocking: call it off the async runtime.
    fn run(self, service: &Service) -> Result<Self::Answer, ApiError>;
}

/// Declares every method once: its name, its request variant and params type, and its answer
/// type. From that list come `Request`, `Answer`, the decoding of a JSON-RPC method and params,
/// and the dispatch of a request to its `Method::run`. The methods after `daemon only` need the
/// daemon's sync loop: `ipc` answers them, the service alone refuses them.
macro_rules! methods {
    (
        $($name:literal => $variant:ident($params:ident) -> $answer:ty, decoded by $decode:path;)*
        daemon only:
        $($d_name:literal => $d_variant:ident($d_params:ident), decoded by $d_decode:path;)*
    ) => {
        /// One call of the local API: the method and its params.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "method", content = "params")]
        pub enum Request {
            $(#[serde(rename = $name)] $variant($params),)*
            $(#[serde(rename = $d_name)] $d_variant($d_params),)*
        }

        /// What a method answers, one variant per method.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(untagged)]
        pub enum Answer {
            $($variant($answer),)*
        }

        $(
            impl From<$params> for Request {
                fn from(params: $params) -> Self {
                    Request::$variant(params)
                }
            }

            impl Named for $params {
                const NAME: &'static str = $name;
            }
        )*
        $(
            impl From<$d_params> for Request {
                fn from(params: $d_params) -> Self {
                    Request::$d_variant(params)
                }
            }
        )*

        impl Request {
            /// The method's name on the socket.
            pub fn method(&self) -> &'static str {
                match self {
                    $(Request::$variant(_) => $name,)*
                    $(Request::$d_variant(_) => $d_name,)*
                }
            }

            /// Reads a JSON-RPC method and its params (an object, or null for none). An unknown
            /// method is `METHOD_NOT_FOUND`; params that do not fit name the one at fault.
            pub fn decode(method: &str, params: serde_json::Value) -> Result<Request, ApiError> {
                match method {
                    $($name => Ok(Request::$variant($decode(params)?)),)*
                    $($d_name => Ok(Request::$d_variant($d_decode(params)?)),)*
                    other => Err(ApiError::new(
                        super::code::METHOD_NOT_FOUND,
                        format!(
                            "unknown method {other:?}: the methods are put, patch, delete, get, \
                             list, collections, history, import, export, subscribe, \
                              unsubscribe, queue, retry, log, status, sync, sync.pause, \
                             sync.resume, conflicts.list, conflicts.get, conflicts.resolve, \
                             key.reload, doctor"
                        ),
                    )),
                }
            }
        }

        impl Service {
            /// Runs any method. Blocking: call it off the async runtime.
            pub fn handle(&self, request: Request) -> Result<Answer, ApiError> {
                match request {
                    $(Request::$variant(params) => self.call(params).map(Answer::$variant),)*
                    $(Request::$d_variant(_) => Err(super::needs_daemon($d_name)),)*
                }
            }
        }
    };
}

methods! {
    "put" => Put(PutParams) -> Applied, decoded by super::parse;
    "patch" => Patch(PatchParams) -> Applied, decoded by super::parse;
    "delete" => Delete(DeleteParams) -> Applied, decoded by super::parse;
    "get" => Get(GetParams) -> RecordView, decoded by super::parse;
    "list" => List(ListParams) -> RecordPage, decoded by super::parse;
    "collections" => Collections(CollectionsParams) -> CollectionList, decoded by super::parse;
    "history" => History(HistoryParams) -> RecordHistory, decoded by super::parse;
    "import" => Import(ImportParams) -> Imported, decoded by super::parse;
    "export" => Export(ExportParams) -> Exported, decoded by super::parse;
    "import_automerge" => ImportAutomerge(ImportAutomergeParams) -> ImportedDocument, decoded by super::parse;
    "subscribe" => Subscribe(SubscribeParams) -> Subscribed, decoded by super::parse;
    "unsubscribe" => Unsubscribe(UnsubscribeParams) -> Unsubscribed, decoded by super::parse;
    "queue" => Queue(QueueParams) -> QueuePage, decoded by super::parse;
    "retry" => Retry(RetryParams) -> Retried, decoded by super::parse;
    "log" => Log(LogParams) -> LogPage, decoded by super::parse;
    "status" => Status(StatusParams) -> StatusAnswer, decoded by super::parse;
    "conflicts.list" => ConflictsList(ConflictsParams) -> ConflictPage, decoded by super::parse;
    "conflicts.get" => ConflictsGet(ConflictId) -> Conflict, decoded by super::parse;
    "conflicts.resolve" => ConflictsResolve(ResolveRequest) -> ResolveOutcome, decoded by super::parse;
    "key.reload" => KeyReload(KeyReloadParams) -> KeyReloaded, decoded by super::parse;
    "doctor" => Doctor(DoctorParams) -> DoctorAnswer, decoded by super::parse;
    "sync.pause" => SyncPause(SyncPauseParams) -> SyncPaused, decoded by super::parse;
    "sync.resume" => SyncResume(SyncResumeParams) -> SyncPaused, decoded by super::parse;
    daemon only:
    "sync" => Sync(SyncParams), decoded by SyncParams::decode;
}

/// A record address, as `delete`, `get`, `history` and `export` take it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub collection: String,
    pub id: String,
}

/// Declares a method's params as a record address.
macro_rules! address_params {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Address);

        impl $name {
            pub fn new(collection: impl Into<String>, id: impl Into<String>) -> Self {
                $name(Address { collection: collection.into(), id: id.into() })
            }
        }
    )*};
}

address_params! {
    /// `delete`: the record to delete.
    DeleteParams;
    /// `get`: the record to read.
    GetParams;
    /// `history`: the record whose changes to list.
    HistoryParams;
    /// `export`: the record whose Automerge document to give.
    ExportParams;
}

/// Declares a method that takes no params.
macro_rules! no_params {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {}
    )*};
}

no_params! {
    /// `collections`: no params.
    CollectionsParams;
    /// `status`: no params.
    StatusParams;
    /// `key.reload`: no params.
    KeyReloadParams;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutParams {
    pub collection: String,
    /// `None`: the store makes a time-ordered id.
    pub id: Option<String>,
    pub fields: Fields,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchParams {
    pub collection: String,
    pub id: String,
    #[serde(default)]
    pub fields: Fields,
    /// Top-level fields to remove.
    #[serde(default)]
    pub unset: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub collection: String,
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub after: Option<String>,
    /// Conditions every record listed meets (`query::Condition`); none: every live record.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<crate::query::Condition>,
    /// A top-level field to order by; none: by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_by: Option<String>,
    /// `asc` (the default) or `desc`.
    #[serde(default)]
    pub order: crate::query::Direction,
}

impl ListParams {
    /// Records in a page whose call gives no limit.
    pub const DEFAULT_LIMIT: usize = 100;

    /// A page by id, with no condition, of at most `DEFAULT_LIMIT` records: views read in key
    /// order, a few microseconds each, whatever the collection holds.
    pub fn is_short_page(&self) -> bool {
        self.conditions.is_empty()
            && self.order_by.is_none()
            && self.limit.unwrap_or(Self::DEFAULT_LIMIT) <= Self::DEFAULT_LIMIT
    }

    /// A plain page of a collection, by id.
    pub fn page(collection: String, limit: Option<usize>, after: Option<String>) -> Self {
        ListParams {
            collection,
            limit,
            after,
            conditions: Vec::new(),
            order_by: None,
            order: crate::query::Direction::Asc,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRecord {
    pub collection: String,
    pub id: Option<String>,
    pub fields: Fields,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    pub records: Vec<ImportRecord>,
}

/// What a subscription watches: a collection, one record, or everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams {
    pub collection: Option<String>,
    pub id: Option<String>,
    /// Also send every change after this feed number (the `seq` of the last change the app
    /// saw) before the live ones: none is missed or sent twice.
    #[serde(default)]
    pub since: Option<u64>,
    /// Each change notification carries the record's fields as they are when it is sent
    /// (null once deleted).
    #[serde(default)]
    pub fields: bool,
}

impl SubscribeParams {
    pub fn admits(&self, collection: &str, id: &str) -> bool {
        let matches =
            |filter: &Option<String>, value: &str| filter.as_deref().is_none_or(|f| f == value);
        matches(&self.collection, collection) && matches(&self.id, id)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeParams {
    pub subscription: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueParams {
    /// pending, processing, completed or failed; every status when absent.
    pub status: Option<String>,
    /// Oldest first, from after this id (the default order).
    pub after: Option<u64>,
    /// Newest first, from before this id; `newest_first` without it starts at the newest.
    pub before: Option<u64>,
    #[serde(default)]
    pub newest_first: bool,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryParams {
    pub ids: Option<Vec<u64>>,
    #[serde(default)]
    pub all_failed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    pub before: Option<u64>,
    pub limit: Option<usize>,
}

/// Pauses sync: the daemon ends its session and makes no connection until `sync.resume`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncPauseParams {
    /// Stay paused after a restart too (until `sync.resume`).
    pub remember: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncResumeParams {}

/// Where sync stands after `sync.pause` or `sync.resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncPaused {
    pub paused: bool,
    /// The pause holds across restarts.
    pub remembered: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncParams {
    /// Retry every failed queue entry first.
    pub retry_failed: bool,
}

impl SyncParams {
    /// `sync`'s params read as a whole (null for none): a bad one is named by serde's message.
    fn decode(params: serde_json::Value) -> Result<SyncParams, ApiError> {
        if params.is_null() {
            return Ok(SyncParams::default());
        }
        serde_json::from_value(params).map_err(ApiError::invalid_params)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictsParams {
    /// open (the default), resolved, auto_resolved, or all.
    pub status: Option<String>,
    pub collection: Option<String>,
    /// The `next` of the previous page.
    pub after: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictId {
    pub id: String,
}

/// A conflict resolution, as an app asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    pub id: String,
    pub take: Take,
    /// The fields a `merge` sets over the record as it is now.
    pub data: Option<Fields>,
}

/// `list`: a page of live records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordPage {
    pub records: Vec<RecordView>,
    /// The `after` of the next page; `None` on the last page.
    pub next: Option<String>,
    /// How a query (`where` or `order_by`) was answered: `scan` when it read the whole
    /// collection. Absent for a plain page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionList {
    pub collections: Vec<CollectionSize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionSize {
    pub name: String,
    pub documents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordHistory {
    pub collection: String,
    pub id: String,
    pub changes: Vec<HistoryEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Imported {
    pub imported: usize,
    /// Records whose content changed (the others already held exactly this).
    pub changed: usize,
    pub ids: Vec<String>,
}

/// `import_automerge`: a record's Automerge document made elsewhere, to take in with its history
/// under a new id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportAutomergeParams {
    pub collection: String,
    pub id: String,
    /// The whole document, as Automerge saves it.
    pub automerge_base64: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportedDocument {
    pub collection: String,
    pub id: String,
    /// The record's heads, hex.
    pub heads: Vec<String>,
    /// The document's changes, each queued for upload.
    pub changes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exported {
    pub collection: String,
    pub id: String,
    /// The record's whole Automerge document.
    pub automerge_base64: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribed {
    pub subscription: u64,
    /// The change feed's last number when the subscription started.
    #[serde(default)]
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribed {
    pub unsubscribed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuePage {
    pub entries: Vec<QueueView>,
    pub counts: QueueCounts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retried {
    pub retried: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogPage {
    pub entries: Vec<SyncLogEntry>,
}

/// `status`: what the store holds and where (`ipc::DaemonStatus` adds the daemon's sync and
/// alerts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub version: String,
    pub device_id: String,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    /// Whether a daemon answered.
    pub daemon: bool,
    pub store_bytes: Option<u64>,
    pub live_bytes: Option<u64>,
    pub live_bytes_measured_ms: Option<u64>,
    pub storage: Storage,
    /// `None` only when a full disk keeps the store from being read.
    #[serde(flatten)]
    pub contents: Option<Contents>,
    /// What is known to be wrong with the store (`doctor` reads all of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damage: Option<Damage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
}

/// `doctor`: read the whole store and say what is damaged; with `repair`, repair it too (the
/// daemon refuses a repair: it is run with the daemon stopped).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoctorParams {
    #[serde(default)]
    pub repair: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoctorAnswer {
    /// The store as read before any repair.
    pub checkup: Checkup,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Repaired>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Storage {
    Ok,
    /// Writes are refused until the disk has room again.
    DiskFull {
        since_ms: u64,
    },
}

/// What the store holds, for `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contents {
    pub documents: u64,
    pub collections: usize,
    pub queue: QueueCounts,
    pub conflicts: ConflictSummary,
    pub quarantined: QuarantinedSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictSummary {
    pub open: u64,
    pub counts: Vec<ConflictCounts>,
}

/// The relay log entries this device could not apply: how many, and the first of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantinedSummary {
    pub count: u64,
    pub entries: Vec<QuarantinedEntry>,
}

/// A quarantined log entry without its change bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantinedEntry {
    pub seq: u64,
    pub collection: String,
    pub record: String,
    pub hash: Option<String>,
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictPage {
    pub conflicts: Vec<Conflict>,
    /// The `after` of the next page; `None` on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyReloaded {
    pub set: bool,
    pub fingerprint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A request as the socket carries it reads back as the same request, through the decoding
    /// `ipc` does: the typed shapes are the wire's.
    #[test]
    fn requests_read_back_from_their_wire_form() {
        let fields = json!({ "name": "Ada" }).as_object().cloned().unwrap();
        let requests: Vec<Request> = vec![
            PutParams {
                collection: "C".into(),
                id: None,
                fields: fields.clone(),
            }
            .into(),
            PatchParams {
                collection: "C".into(),
                id: "1".into(),
                fields: fields.clone(),
                unset: vec!["old".into()],
            }
            .into(),
            DeleteParams::new("C", "1").into(),
            GetParams::new("C", "1").into(),
            ListParams {
                conditions: vec![crate::query::Condition {
                    field: "n".into(),
                    op: crate::query::Op::Ge,
                    value: Some(serde_json::json!(2)),
                }],
                order_by: Some("n".into()),
                order: crate::query::Direction::Desc,
                ..ListParams::page("C".into(), Some(3), Some("1".into()))
            }
            .into(),
            CollectionsParams {}.into(),
            HistoryParams::new("C", "1").into(),
            ImportParams {
                records: vec![ImportRecord {
                    collection: "C".into(),
                    id: Some("1".into()),
                    fields,
                }],
            }
            .into(),
            ExportParams::new("C", "1").into(),
            ImportAutomergeParams {
                collection: "C".into(),
                id: "2".into(),
                automerge_base64: "hW9Kgw==".into(),
            }
            .into(),
            SubscribeParams {
                collection: Some("C".into()),
                id: None,
                since: Some(7),
                fields: true,
            }
            .into(),
            UnsubscribeParams { subscription: 2 }.into(),
            QueueParams {
                status: Some("failed".into()),
                newest_first: true,
                ..QueueParams::default()
            }
            .into(),
            RetryParams {
                ids: Some(vec![4]),
                all_failed: false,
            }
            .into(),
            LogParams {
                before: Some(9),
                limit: None,
            }
            .into(),
            StatusParams {}.into(),
            SyncParams { retry_failed: true }.into(),
            ConflictsParams {
                status: Some("all".into()),
                ..ConflictsParams::default()
            }
            .into(),
            ConflictId { id: "c1".into() }.into(),
            ResolveRequest {
                id: "c1".into(),
                take: Take::Merge,
                data: None,
            }
            .into(),
            KeyReloadParams {}.into(),
        ];
        let mut methods: Vec<&str> = Vec::new();
        for request in requests {
            let wire = serde_json::to_value(&request).unwrap();
            let method = wire["method"].as_str().unwrap();
            assert_eq!(method, request.method());
            let decoded = Request::decode(method, wire["params"].clone());
            assert_eq!(decoded.as_ref(), Ok(&request), "{wire}");
            methods.push(request.method());
        }
        // Every method once.
        let mut unique = methods.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), methods.len());
        assert_eq!(methods.len(), 21);
    }

    #[test]
    fn params_errors_name_the_param_and_unknown_methods_list_the_methods() {
        let e = Request::decode("get", json!({ "collection": 5, "id": "1" })).unwrap_err();
        assert_eq!(e.code, super::super::code::INVALID_PARAMS);
        assert!(e.message.starts_with("`collection`: invalid type"), "{e:?}");
        let e = Request::decode("status", json!({ "x": 1 })).unwrap_err();
        assert_eq!(e.code, super::super::code::INVALID_PARAMS);
        let e = Request::decode("nope", Value::Null).unwrap_err();
        assert_eq!(e.code, super::super::code::METHOD_NOT_FOUND);
        assert!(e.message.contains("conflicts.resolve, key.reload"), "{e:?}");
        assert_eq!(
            Request::decode("status", Value::Null),
            Ok(StatusParams {}.into())
        );
        assert_eq!(
            Request::decode("sync", Value::Null),
            Ok(SyncParams::default().into())
        );
    }
}
