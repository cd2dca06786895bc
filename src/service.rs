//! The local API: the methods apps call (put, patch, delete, get, list, history, import, queue,
//! log, status, ...), each a typed request with a typed answer (`api`), and their error codes.
//! The daemon serves it over the IPC socket; the CLI calls it in-process when no daemon runs, and
//! the relay's web actor calls it on its own store. One `Method::run` per method for all of them,
//! so the paths cannot drift apart.
//!
//! Owns: what each method does, parameter validation, the error codes apps see, group commit (a
//! write is answered only after the flush that makes it durable; a job that panics fails alone,
//! the committer goes on), and change events for subscribers.
//!
//! Must not touch: JSON-RPC, sockets and framing (that is `ipc`), process lifecycle (that is
//! `daemon`).

use crate::crypt::FieldError;
use crate::query::Query;
use crate::resolve::{Conflict, ConflictKind, ConflictStatus, Take};
use crate::store::completed::Held;
use crate::store::conflicts::ResolveOutcome;
use crate::store::kv::KvError;
use crate::store::snapshot::SnapshotOutcome;
use crate::store::sync::{RemoteApplied, RemoteOutcome};
use crate::store::{Applied, PreparedWrites, QueueAction, RecordView, Store, StoreError, Write};
use base64::Engine as _;
use ferry_proto::wire::{LogEntry, SnapshotPage, UniqueIndexPage};
use ferry_proto::{Operation, QueueStatus, SyncQueueEntry};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::{broadcast, oneshot};

pub mod api;

use api::{
    Address, Answer, CollectionList, CollectionSize, CollectionsParams, ConflictId, ConflictPage,
    ConflictSummary, ConflictsParams, Contents, DeleteParams, DoctorAnswer, DoctorParams,
    ExportParams, Exported, GetParams, HistoryParams, ImportAutomergeParams, ImportParams,
    Imported, ImportedDocument, KeyReloadParams, KeyReloaded, ListParams, LogPage, LogParams,
    Method, Named as _, PatchParams, PutParams, QuarantinedEntry, QuarantinedSummary, QueuePage,
    QueueParams, RecordHistory, RecordPage, ResolveRequest, Retried, RetryParams, StatusAnswer,
    StatusParams, Storage, SubscribeParams, Subscribed, SyncPauseParams, SyncPaused,
    SyncResumeParams, UnsubscribeParams, Unsubscribed,
};

/// Stable JSON-RPC error codes. The standard ones are JSON-RPC 2.0's own.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL: i64 = -32603;
    pub const NOT_FOUND: i64 = -32001;
    pub const TOO_LARGE: i64 = -32002;
    pub const UNKNOWN_COLLECTION: i64 = -32003;
    pub const DISK_FULL: i64 = -32004;
    pub const STORAGE: i64 = -32005;
    pub const CORRUPT: i64 = -32006;
    pub const UNAVAILABLE: i64 = -32007;
    pub const INVALID_STATE: i64 = -32008;
    pub const BUSY: i64 = -32009;
    /// A sync with the relay did not complete; the message names the kind (network,
    /// authentication, validation, server, timeout).
    pub const SYNC_FAILED: i64 = -32010;
    /// The conflict was already resolved (here or on another device), or settled by its
    /// collection's strategy.
    pub const CONFLICT_SETTLED: i64 = -32011;
    /// An encrypted field was written or read and no account key is set on this device.
    pub const NO_KEY: i64 = -32012;
    /// An encrypted value does not decrypt: another account key, another record or field, or
    /// damaged bytes.
    pub const UNDECRYPTABLE: i64 = -32013;
}

/// An error as apps see it: a stable code and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: i64,
    pub message: String,
}

impl ApiError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// The code says the params are at fault; the message says how, in words a person can act
    /// on (a CLI user never typed the params, so no protocol prefix).
    pub fn invalid_params(message: impl std::fmt::Display) -> Self {
        Self::new(code::INVALID_PARAMS, message.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use crate::record::RecordError;
        let code = match &e {
            StoreError::Field(FieldError::NoKey { .. }) => code::NO_KEY,
            StoreError::Field(FieldError::WrongKey { .. } | FieldError::Damaged { .. }) => {
                code::UNDECRYPTABLE
            }
            StoreError::Field(FieldError::Seal(_) | FieldError::Encode { .. }) => code::INTERNAL,
            StoreError::NotFound { .. }
            | StoreError::QueueEntryNotFound(_)
            | StoreError::ConflictNotFound(_) => code::NOT_FOUND,
            StoreError::ConflictSettled { .. } => code::CONFLICT_SETTLED,
            StoreError::MergeNeedsData(_)
            | StoreError::UnknownVersion { .. }
            | StoreError::ImportRefused(_) => code::INVALID_PARAMS,
            StoreError::Exists { .. } => code::INVALID_STATE,
            StoreError::UnknownCollection(_) | StoreError::NotSynced(_) => code::UNKNOWN_COLLECTION,
            StoreError::Query(_) => code::INVALID_PARAMS,
            StoreError::Record(RecordError::TooLarge { .. })
            | StoreError::ChangeTooLarge { .. } => code::TOO_LARGE,
            StoreError::Address(_) | StoreError::Record(RecordError::ReservedField { .. }) => {
                code::INVALID_PARAMS
            }
            StoreError::Record(
                RecordError::TooDeep { .. }
                | RecordError::InvalidChange(_)
                | RecordError::NotJsonShaped(_),
            ) => code::INVALID_PARAMS,
            StoreError::Record(RecordError::MissingDependencies { .. }) => code::INVALID_STATE,
            StoreError::Storage(KvError::DiskFull(_)) => code::DISK_FULL,
            StoreError::Storage(KvError::Corrupt(_) | KvError::Damaged(_))
            | StoreError::Decode { .. }
            | StoreError::Record(RecordError::Corrupt(_)) => code::CORRUPT,
            StoreError::Storage(KvError::Io(_)) => code::STORAGE,
            StoreError::Transition(_) | StoreError::OwnEntryGone { .. } => code::INVALID_STATE,
            StoreError::WrongDevice { .. }
            | StoreError::UnsupportedFormat(_)
            | StoreError::Encode { .. }
            | StoreError::Snapshot(_)
            | StoreError::Panicked { .. }
            | StoreError::Record(
                RecordError::Automerge(_)
                | RecordError::ApplyPanicked(_)
                | RecordError::NotReloadable(_),
            ) => code::INTERNAL,
        };
        ApiError::new(code, e.to_string())
    }
}

/// A record changed, locally or by sync: its entry in the store's change feed. Sent to
/// subscribers after the change is durable.
pub use crate::store::feed::{FeedChange as ChangeEvent, Origin};

/// How writes become durable.
enum Committer {
    /// Each call flushes its own writes (a CLI command working on the store directly).
    Direct,
    /// One thread applies every queued write, flushes once, then answers them all.
    Grouped {
        jobs: mpsc::Sender<Job>,
        thread: JoinHandle<()>,
    },
}

/// Work for the committer: local writes, or relay log entries with the cursor they move to. Both
/// go through the one thread so that they are serialised and share its group flush.
enum Job {
    Writes {
        writes: Vec<Write>,
        reply: WritesReply,
    },
    Remote {
        entries: Vec<LogEntry>,
        through: u64,
        reply: mpsc::Sender<Result<RemoteOutcome, StoreError>>,
    },
    Resolve {
        request: ResolveRequest,
        reply: mpsc::Sender<Result<ResolveOutcome, StoreError>>,
    },
    Snapshot {
        page: SnapshotPage,
        reply: mpsc::Sender<Result<SnapshotOutcome, StoreError>>,
    },
    ImportDocument {
        /// Collection, id and the document's bytes.
        document: (String, String, Vec<u8>),
        reply: mpsc::Sender<Result<(Applied, usize), StoreError>>,
    },
    UniqueIndex {
        page: UniqueIndexPage,
        reply: mpsc::Sender<Result<Vec<Conflict>, StoreError>>,
    },
    /// Jobs handed over together, run in order in one group: one flush covers them all.
    Group(Vec<Job>),
}

/// Where a write job's result goes: to a caller blocked on it, or to a task awaiting it (a
/// pipelined write holds no thread while it waits).
enum WritesReply {
    Blocking(mpsc::Sender<Result<Vec<Applied>, StoreError>>),
    Awaited(oneshot::Sender<Result<Vec<Applied>, StoreError>>),
}

impl WritesReply {
    fn send(self, result: Result<Vec<Applied>, StoreError>) {
        // The caller may have gone away; its work stands either way.
        match self {
            WritesReply::Blocking(reply) => {
                let _ = reply.send(result);
            }
            WritesReply::Awaited(reply) => {
                let _ = reply.send(result);
            }
        }
    }
}

/// What is left of a job once it has run: answering its caller, once the group's flush says
/// whether its work is durable.
type AfterFlush = Box<dyn FnOnce(&Result<(), StoreError>) + Send>;

impl Job {
    /// The jobs this one stands for, in order.
    fn flatten(self, into: &mut Vec<Job>) {
        match self {
            Job::Group(jobs) => jobs.into_iter().for_each(|job| job.flatten(into)),
            job => into.push(job),
        }
    }

    fn run(self, store: &Store) -> AfterFlush {
        // The caller may have gone away; its work stands either way.
        match self {
            Job::Group(jobs) => {
                let answers: Vec<AfterFlush> = jobs.into_iter().map(|job| job.run(store)).collect();
                Box::new(move |flushed| answers.into_iter().for_each(|answer| answer(flushed)))
            }
            Job::Writes { writes, reply } => {
                let result = supervised("a write", || store.write_all(writes));
                Box::new(move |flushed| reply.send(after_flush(flushed, result)))
            }
            Job::Remote {
                entries,
                through,
                reply,
            } => {
                let result = supervised("applying the relay's changes", || {
                    store.apply_remote(&entries, through)
                });
                Box::new(move |flushed| {
                    let _ = reply.send(after_flush(flushed, result));
                })
            }
            Job::Snapshot { page, reply } => {
                let result = supervised("taking in the relay's snapshot", || {
                    store.apply_snapshot_page(&page)
                });
                Box::new(move |flushed| {
                    let _ = reply.send(after_flush(flushed, result));
                })
            }
            Job::UniqueIndex { page, reply } => {
                let result = supervised("taking in the relay's unique-value index", || {
                    store.apply_unique_index_page(&page)
                });
                Box::new(move |flushed| {
                    let _ = reply.send(after_flush(flushed, result));
                })
            }
            Job::ImportDocument { document, reply } => {
                let (collection, id, bytes) = document;
                let result = supervised("an imported Automerge document", || {
                    store.import_document(&collection, &id, &bytes)
                });
                Box::new(move |flushed| {
                    let _ = reply.send(after_flush(flushed, result));
                })
            }
            Job::Resolve { request, reply } => {
                let result = supervised("a conflict resolution", || {
                    store.resolve_conflict(&request.id, request.take, request.data)
                });
                Box::new(move |flushed| {
                    let _ = reply.send(after_flush(flushed, result));
                })
            }
        }
    }
}

/// Runs one job's work so that a panic in it fails that job only, never the committer thread
/// (and with it every later write). The store stages a job's work in a batch it applies at the
/// end, and takes documents out of its cache while it works on them, so an unwound job leaves
/// nothing half-written behind.
fn supervised<T>(
    work: &'static str,
    run: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        let message = crate::record::panic_message(panic.as_ref());
        tracing::error!(
            work,
            message,
            "a committer job panicked; the daemon goes on"
        );
        Err(StoreError::Panicked { work, message })
    })
}

fn after_flush<T>(
    flushed: &Result<(), StoreError>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match (flushed, result) {
        (Ok(()), result) => result,
        (Err(e), Ok(_)) => Err(StoreError::Storage(not_durable(e))),
        (Err(_), Err(e)) => Err(e),
    }
}

/// Groups of answers the committer may have applied ahead of the flush that covers them: enough
/// to keep it busy through a flush, few enough that a slow disk soon holds back new writes.
const GROUPS_AHEAD: usize = 4;

/// Runs jobs in groups, in three threads: this one gathers a group and prepares its writes
/// (ids, checks, the documents of new records built on every core: `Store::prepare_writes`);
/// an applier commits the group before it meanwhile, in order, each run of write jobs as one
/// batch; a flusher makes what was applied durable and answers it, while the applier goes on.
/// A group's answers wait for a flush begun after the group was applied, so an answer still
/// means durable.
fn run_committer(store: Arc<Store>, jobs: mpsc::Receiver<Job>, group_max: usize) {
    let store = store.as_ref();
    let (to_flusher, applied) = mpsc::sync_channel::<Vec<AfterFlush>>(GROUPS_AHEAD);
    // One group prepared ahead of the one being applied.
    let (to_applier, prepared) = mpsc::sync_channel::<Vec<Step>>(1);
    std::thread::scope(|scope| {
        // A thread that cannot start drops its receiver: its work is then done here.
        let flusher = std::thread::Builder::new()
            .name("ferry-flusher".into())
            .spawn_scoped(scope, move || run_flusher(store, applied));
        if let Err(e) = flusher {
            tracing::warn!(error = %e, "no flusher thread; each group is flushed as it is applied");
        }
        let for_applier = to_flusher.clone();
        let applier = std::thread::Builder::new()
            .name("ferry-applier".into())
            .spawn_scoped(scope, move || run_applier(store, prepared, for_applier));
        if let Err(e) = applier {
            tracing::warn!(error = %e, "no applier thread; groups are prepared and applied in turn");
        }
        while let Ok(first) = jobs.recv() {
            let mut group = Vec::new();
            first.flatten(&mut group);
            while group.len() < group_max {
                match jobs.try_recv() {
                    Ok(job) => job.flatten(&mut group),
                    Err(_) => break,
                }
            }
            let steps = prepare_group(store, group);
            if let Err(mpsc::SendError(steps)) = to_applier.send(steps) {
                hand_to_flusher(store, &to_flusher, run_steps(store, steps));
            }
        }
        drop((to_applier, to_flusher));
    });
}

/// Applies prepared groups in the order they come.
fn run_applier(
    store: &Store,
    prepared: mpsc::Receiver<Vec<Step>>,
    to_flusher: mpsc::SyncSender<Vec<AfterFlush>>,
) {
    while let Ok(steps) = prepared.recv() {
        hand_to_flusher(store, &to_flusher, run_steps(store, steps));
    }
}

/// Passes a group's answers to the flusher, or, with no flusher (it could not start, or an
/// answer panicked in it), flushes and answers here.
fn hand_to_flusher(
    store: &Store,
    to_flusher: &mpsc::SyncSender<Vec<AfterFlush>>,
    answers: Vec<AfterFlush>,
) {
    if let Err(mpsc::SendError(answers)) = to_flusher.send(answers) {
        answer_flushed(store, answers);
    }
}

/// Flushes what the committer applied and answers it: every group waiting when a flush begins
/// is covered by that one flush.
fn run_flusher(store: &Store, applied: mpsc::Receiver<Vec<AfterFlush>>) {
    while let Ok(mut answers) = applied.recv() {
        while let Ok(more) = applied.try_recv() {
            answers.extend(more);
        }
        answer_flushed(store, answers);
    }
}

fn answer_flushed(store: &Store, answers: Vec<AfterFlush>) {
    let flushed = store.flush();
    for answer in answers {
        answer(&flushed);
    }
}

/// A group's work as the applier runs it, in order.
enum Step {
    /// Write jobs in a row, prepared as one batch: the cost of a write is mostly what a batch
    /// costs whatever its size (the locks, the apply, the feed). Each job stays atomic on its
    /// own: should the one batch of several jobs fail (a write cannot be staged: a patch of a
    /// missing record, a change too large), nothing of it was written, and the jobs run again
    /// one by one (`one_by_one`, their writes), each getting its own answer.
    Writes {
        /// Or why preparing them failed (a panic), which each job is then told.
        prepared: Result<Box<PreparedWrites>, StoreError>,
        replies: Vec<(usize, WritesReply)>,
        one_by_one: Option<Vec<Vec<Write>>>,
    },
    Other(Job),
}

/// Splits a group into steps, each run of consecutive write jobs one step, its writes
/// prepared (`Store::prepare_writes`).
fn prepare_group(store: &Store, group: Vec<Job>) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut writes = Vec::new();
    for job in group {
        match job {
            Job::Writes { writes: w, reply } => writes.push((w, reply)),
            other => {
                steps.extend(prepare_writes(store, std::mem::take(&mut writes)));
                steps.push(Step::Other(other));
            }
        }
    }
    steps.extend(prepare_writes(store, writes));
    steps
}

fn prepare_writes(store: &Store, jobs: Vec<(Vec<Write>, WritesReply)>) -> Option<Step> {
    if jobs.is_empty() {
        return None;
    }
    let one_by_one = (jobs.len() > 1).then(|| jobs.iter().map(|(w, _)| w.clone()).collect());
    let mut all = Vec::with_capacity(jobs.iter().map(|(w, _)| w.len()).sum());
    let mut replies = Vec::with_capacity(jobs.len());
    for (writes, reply) in jobs {
        replies.push((writes.len(), reply));
        all.extend(writes);
    }
    let prepared = supervised("preparing writes", || {
        Ok(Box::new(store.prepare_writes(all)))
    });
    Some(Step::Writes {
        prepared,
        replies,
        one_by_one,
    })
}

fn run_steps(store: &Store, steps: Vec<Step>) -> Vec<AfterFlush> {
    let _span = tracing::debug_span!("group_commit", steps = steps.len()).entered();
    let mut answers = Vec::with_capacity(steps.len());
    for step in steps {
        match step {
            Step::Other(job) => answers.push(job.run(store)),
            Step::Writes {
                prepared,
                replies,
                one_by_one,
            } => answers.extend(run_prepared(store, prepared, replies, one_by_one)),
        }
    }
    answers
}

fn run_prepared(
    store: &Store,
    prepared: Result<Box<PreparedWrites>, StoreError>,
    replies: Vec<(usize, WritesReply)>,
    one_by_one: Option<Vec<Vec<Write>>>,
) -> Vec<AfterFlush> {
    let result =
        prepared.and_then(|prepared| supervised("a write", || store.write_prepared(*prepared)));
    match (result, one_by_one) {
        (Ok(applied), _) => {
            let mut applied = applied.into_iter();
            let answers: Vec<(WritesReply, Vec<Applied>)> = replies
                .into_iter()
                .map(|(count, reply)| (reply, applied.by_ref().take(count).collect()))
                .collect();
            vec![Box::new(move |flushed: &Result<(), StoreError>| {
                for (reply, applied) in answers {
                    reply.send(after_flush(flushed, Ok(applied)));
                }
            })]
        }
        (Err(_), Some(jobs)) => jobs
            .into_iter()
            .zip(replies)
            .map(|(writes, (_, reply))| Job::Writes { writes, reply }.run(store))
            .collect(),
        // One job (`one_by_one` is kept only for several): its error is its answer.
        (Err(e), None) => {
            let reply = replies.into_iter().next().map(|(_, reply)| reply);
            vec![Box::new(move |flushed: &Result<(), StoreError>| {
                if let Some(reply) = reply {
                    reply.send(after_flush(flushed, Err(e)));
                }
            })]
        }
    }
}

/// How a begun write's durable results become its method's answer.
type AnswerOf = fn(Vec<Applied>) -> Result<Answer, ApiError>;

/// A write handed to the committer by [`Service::begin_writes`]: done once it is durable, with
/// its answer.
pub type Submitted = futures_util::future::BoxFuture<'static, Result<Answer, ApiError>>;

fn shutting_down() -> ApiError {
    ApiError::new(code::UNAVAILABLE, "the daemon is shutting down: try again")
}

/// The result of a one-write commit.
fn first_applied(applied: Vec<Applied>) -> Result<Applied, ApiError> {
    applied
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::new(code::INTERNAL, "no result"))
}

/// Why a write applied in a group could not be acknowledged: its flush failed. A full disk stays a
/// full disk, so apps see the same error code as when the write itself hit it.
fn not_durable(flush: &StoreError) -> KvError {
    match flush {
        StoreError::Storage(KvError::DiskFull(detail)) => KvError::DiskFull(format!(
            "{detail}; the write was applied but could not be made durable"
        )),
        _ => KvError::Io(format!(
            "the write was applied but could not be made durable ({flush}); it was not acknowledged"
        )),
    }
}

/// Settings the service needs beyond the store's.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub max_import_records: usize,
    pub max_list_limit: usize,
    pub group_commit_max: usize,
    /// True when serving through the daemon (enables group commit and subscriptions).
    pub daemon: bool,
}

pub struct Service {
    store: Arc<Store>,
    committer: Committer,
    events: broadcast::Sender<ChangeEvent>,
    conflict_events: broadcast::Sender<ConflictEvent>,
    options: ServiceOptions,
    started: Instant,
}

impl Service {
    pub fn new(store: Arc<Store>, options: ServiceOptions) -> Self {
        let committer = if options.daemon {
            let (jobs, rx) = mpsc::channel();
            let for_thread = store.clone();
            let group_max = options.group_commit_max.max(1);
            let thread = std::thread::Builder::new()
                .name("ferry-committer".into())
                .spawn(move || run_committer(for_thread, rx, group_max));
            match thread {
                Ok(thread) => Committer::Grouped { jobs, thread },
                Err(e) => {
                    tracing::warn!(error = %e, "no committer thread; flushing per write");
                    Committer::Direct
                }
            }
        } else {
            Committer::Direct
        };
        let (events, _) = broadcast::channel(4096);
        let (conflict_events, _) = broadcast::channel(1024);
        Service {
            store,
            committer,
            events,
            conflict_events,
            options,
            started: Instant::now(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<ChangeEvent> {
        self.events.subscribe()
    }

    /// Conflicts as they are found and resolved, once durable.
    pub fn subscribe_conflicts(&self) -> broadcast::Receiver<ConflictEvent> {
        self.conflict_events.subscribe()
    }

    fn announce_conflicts<'a>(&self, conflicts: impl IntoIterator<Item = &'a Conflict>) {
        for conflict in conflicts {
            let _ = self.conflict_events.send(ConflictEvent::from(conflict));
        }
    }

    /// Stops the committer after it has answered every write it was given.
    pub fn shutdown(self) -> Result<(), StoreError> {
        if let Committer::Grouped { jobs, thread } = self.committer {
            drop(jobs);
            if thread.join().is_err() {
                tracing::error!("committer thread panicked");
            }
        }
        self.store.flush()
    }

    /// Applies writes atomically and returns once they are durable.
    pub fn commit(&self, writes: Vec<Write>) -> Result<Vec<Applied>, ApiError> {
        let applied = self.durably(
            writes,
            |store, writes| store.write_all(writes),
            |writes, reply| Job::Writes {
                writes,
                reply: WritesReply::Blocking(reply),
            },
        )?;
        self.announce_local(&applied);
        Ok(applied)
    }

    /// Whether [`Service::begin_writes`] takes this request: a put, patch, delete or import, in
    /// the daemon (where a committer thread makes writes durable in groups).
    pub fn can_begin(&self, request: &api::Request) -> bool {
        matches!(self.committer, Committer::Grouped { .. })
            && matches!(
                request,
                api::Request::Put(_)
                    | api::Request::Patch(_)
                    | api::Request::Delete(_)
                    | api::Request::Import(_)
            )
    }

    /// Hands writes to the committer, in order and together (one flush covers them all),
    /// without waiting for them, and gives for each the way to wait for its answer: the
    /// answer comes once the write is durable, exactly as [`Service::handle`] would give it.
    /// Writes begun one after the other are applied in that order, so a connection can go on
    /// reading requests while earlier ones are made durable. Only for requests
    /// [`Service::can_begin`] takes; any other is refused as `INVALID_STATE`.
    pub fn begin_writes(
        self: &Arc<Self>,
        requests: Vec<api::Request>,
    ) -> Vec<Result<Submitted, ApiError>> {
        let mut jobs = Vec::new();
        let begun = requests
            .into_iter()
            .map(|request| {
                let (writes, shape): (Vec<Write>, AnswerOf) = match request {
                    api::Request::Put(p) => {
                        (vec![p.into_write()], |a| first_applied(a).map(Answer::Put))
                    }
                    api::Request::Patch(p) => (vec![p.into_write()], |a| {
                        first_applied(a).map(Answer::Patch)
                    }),
                    api::Request::Delete(p) => (vec![p.into_write()], |a| {
                        first_applied(a).map(Answer::Delete)
                    }),
                    api::Request::Import(p) => {
                        (p.into_writes(self.options.max_import_records)?, |a| {
                            Ok(Answer::Import(imported(a)))
                        })
                    }
                    other => {
                        return Err(ApiError::new(
                            code::INVALID_STATE,
                            format!("{} cannot be begun without waiting", other.method()),
                        ));
                    }
                };
                let (reply, answer) = oneshot::channel();
                jobs.push(Job::Writes {
                    writes,
                    reply: WritesReply::Awaited(reply),
                });
                let service = self.clone();
                let submitted: Submitted = Box::pin(async move {
                    let applied = answer.await.map_err(|_| shutting_down())??;
                    service.announce_local(&applied);
                    shape(applied)
                });
                Ok(submitted)
            })
            .collect();
        if let Committer::Grouped { jobs: queue, .. } = &self.committer
            && !jobs.is_empty()
        {
            // A refused hand-over drops the replies: each waiter then reads "shutting down".
            let _ = queue.send(Job::Group(jobs));
        }
        begun
    }

    /// Subscribers hear of records another device's changes (or the relay's snapshot) changed,
    /// and of the conflicts they brought.
    fn announce_remote(&self, applied: &[RemoteApplied], conflicts: &[Conflict]) {
        for a in applied {
            let _ = self.events.send(ChangeEvent {
                seq: a.seq,
                collection: a.collection.clone(),
                id: a.id.clone(),
                operation: a.operation,
                heads: a.heads.clone(),
                device: a.device.clone(),
                origin: Origin::Remote,
            });
        }
        self.announce_conflicts(conflicts);
    }

    fn announce_local(&self, applied: &[Applied]) {
        for a in applied {
            if let (Some(operation), Some(seq)) = (a.operation, a.seq) {
                // No subscribers is fine: nobody is listening.
                let _ = self.events.send(ChangeEvent {
                    seq,
                    collection: a.collection.clone(),
                    id: a.id.clone(),
                    operation,
                    heads: a.heads.clone(),
                    device: self.store.device_id().to_owned(),
                    origin: Origin::Local,
                });
            }
        }
    }

    /// Applies entries of the relay's log and moves the download cursor to `through`, serialised
    /// with local writes; returns once both are durable, after which subscribers hear of every
    /// record that changed.
    pub fn apply_remote(
        &self,
        entries: Vec<LogEntry>,
        through: u64,
    ) -> Result<RemoteOutcome, ApiError> {
        let outcome = self.durably(
            entries,
            |store, entries| store.apply_remote(&entries, through),
            |entries, reply| Job::Remote {
                entries,
                through,
                reply,
            },
        )?;
        self.announce_remote(&outcome.applied, &outcome.conflicts);
        Ok(outcome)
    }

    /// Takes in a page of the relay's snapshot (see `Store::apply_snapshot_page`); returns once
    /// it is durable. Subscribers hear of the records it changed and the conflicts it brought.
    pub fn apply_snapshot_page(&self, page: SnapshotPage) -> Result<SnapshotOutcome, ApiError> {
        let outcome = self.durably(
            page,
            |store, page| store.apply_snapshot_page(&page),
            |page, reply| Job::Snapshot { page, reply },
        )?;
        self.announce_remote(&outcome.applied, &outcome.conflicts);
        Ok(outcome)
    }

    /// Takes in a page of the relay's unique-value index (see
    /// `Store::apply_unique_index_page`); returns once it is durable. Subscribers hear of the
    /// conflict entries it brought.
    pub fn apply_unique_index_page(&self, page: UniqueIndexPage) -> Result<(), ApiError> {
        let conflicts = self.durably(
            page,
            |store, page| store.apply_unique_index_page(&page),
            |page, reply| Job::UniqueIndex { page, reply },
        )?;
        self.announce_conflicts(&conflicts);
        Ok(())
    }

    /// Takes in a record's Automerge document made elsewhere (see `Store::import_document`);
    /// returns once it is durable. Subscribers hear of the record.
    pub fn import_document(
        &self,
        collection: String,
        id: String,
        bytes: Vec<u8>,
    ) -> Result<(Applied, usize), ApiError> {
        let imported = self.durably(
            (collection, id, bytes),
            |store, (collection, id, bytes)| store.import_document(&collection, &id, &bytes),
            |document, reply| Job::ImportDocument { document, reply },
        )?;
        self.announce_local(std::slice::from_ref(&imported.0));
        Ok(imported)
    }

    /// Resolves an open conflict (see `Store::resolve_conflict`); returns once the resolving
    /// changes are durable. Subscribers hear of the records written and of the conflict.
    pub fn resolve_conflict(&self, request: ResolveRequest) -> Result<ResolveOutcome, ApiError> {
        let outcome = self.durably(
            request,
            |store, r| store.resolve_conflict(&r.id, r.take, r.data),
            |request, reply| Job::Resolve { request, reply },
        )?;
        self.announce_local(&outcome.writes);
        self.announce_conflicts([&outcome.conflict]);
        Ok(outcome)
    }

    /// Runs `work` on the store and returns once it is durable: here, then a flush, when the
    /// CLI works on the store directly; on the committer thread, in a group commit, in the
    /// daemon.
    fn durably<P, T>(
        &self,
        payload: P,
        work: impl FnOnce(&Store, P) -> Result<T, StoreError>,
        job: impl FnOnce(P, mpsc::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, ApiError> {
        match &self.committer {
            Committer::Direct => {
                let done = supervised("a store operation", || work(&self.store, payload))?;
                self.store.flush()?;
                Ok(done)
            }
            Committer::Grouped { jobs, .. } => {
                let (reply, answer) = mpsc::channel();
                jobs.send(job(payload, reply))
                    .map_err(|_| shutting_down())?;
                Ok(answer.recv().map_err(|_| shutting_down())??)
            }
        }
    }

    /// Runs one method. Blocking: call it off the async runtime.
    pub fn call<M: Method>(&self, params: M) -> Result<M::Answer, ApiError> {
        let _span = tracing::debug_span!("call", method = M::NAME).entered();
        params.run(self)
    }

    fn commit_one(&self, write: Write) -> Result<Applied, ApiError> {
        first_applied(self.commit(vec![write])?)
    }

    fn check_limit(&self, limit: Option<usize>) -> Result<usize, ApiError> {
        page_limit(limit, self.options.max_list_limit)
    }

    /// The relay log entries this device could not apply (`Store::apply_remote`): how many,
    /// and the first of them, each with its log position, record, change hash and reason.
    fn quarantined(&self) -> Result<QuarantinedSummary, ApiError> {
        const LISTED: usize = 20;
        let (count, entries) = self.store.quarantined(LISTED)?;
        let entries = entries
            .into_iter()
            .map(|q| QuarantinedEntry {
                seq: q.seq,
                collection: q.collection,
                record: q.record,
                hash: q.hash,
                reason: q.reason,
                at_ms: q.at_ms,
            })
            .collect();
        Ok(QuarantinedSummary { count, entries })
    }

    /// What the store holds, for `status`.
    fn contents(&self) -> Result<Contents, ApiError> {
        let collections = self.store.collections()?;
        let documents: u64 = collections.iter().map(|(_, n)| n).sum();
        Ok(Contents {
            documents,
            collections: collections.len(),
            queue: self.store.queue_counts()?,
            conflicts: ConflictSummary {
                open: self.store.open_conflicts()?,
                counts: self.store.conflict_counts()?,
            },
            quarantined: self.quarantined()?,
        })
    }
}

impl PutParams {
    fn into_write(self) -> Write {
        Write::Put {
            collection: self.collection,
            id: self.id,
            fields: self.fields,
        }
    }
}

impl Method for PutParams {
    type Answer = Applied;
    fn run(self, service: &Service) -> Result<Applied, ApiError> {
        service.commit_one(self.into_write())
    }
}

impl PatchParams {
    fn into_write(self) -> Write {
        Write::Patch {
            collection: self.collection,
            id: self.id,
            set: self.fields,
            unset: self.unset,
        }
    }
}

impl Method for PatchParams {
    type Answer = Applied;
    fn run(self, service: &Service) -> Result<Applied, ApiError> {
        service.commit_one(self.into_write())
    }
}

impl DeleteParams {
    fn into_write(self) -> Write {
        let Address { collection, id } = self.0;
        Write::Delete { collection, id }
    }
}

impl Method for DeleteParams {
    type Answer = Applied;
    fn run(self, service: &Service) -> Result<Applied, ApiError> {
        service.commit_one(self.into_write())
    }
}

impl Method for GetParams {
    type Answer = RecordView;
    fn run(self, service: &Service) -> Result<RecordView, ApiError> {
        Ok(service.store.get(&self.0.collection, &self.0.id)?)
    }
}

impl Method for ListParams {
    type Answer = RecordPage;
    fn run(self, service: &Service) -> Result<RecordPage, ApiError> {
        let limit = service.check_limit(self.limit)?;
        if self.conditions.is_empty() && self.order_by.is_none() {
            let (records, next) =
                service
                    .store
                    .list(&self.collection, self.after.as_deref(), limit)?;
            return Ok(RecordPage {
                records,
                next,
                plan: None,
            });
        }
        let query = Query::new(self.conditions, self.order_by.map(|f| (f, self.order)))
            .map_err(|e| ApiError::new(code::INVALID_PARAMS, e.to_string()))?;
        let found = service
            .store
            .query(&self.collection, &query, self.after.as_deref(), limit)?;
        Ok(RecordPage {
            records: found.records,
            next: found.next,
            plan: Some(found.plan),
        })
    }
}

impl Method for CollectionsParams {
    type Answer = CollectionList;
    fn run(self, service: &Service) -> Result<CollectionList, ApiError> {
        let collections = service
            .store
            .collections()?
            .into_iter()
            .map(|(name, documents)| CollectionSize { name, documents })
            .collect();
        Ok(CollectionList { collections })
    }
}

impl Method for HistoryParams {
    type Answer = RecordHistory;
    fn run(self, service: &Service) -> Result<RecordHistory, ApiError> {
        let Address { collection, id } = self.0;
        let changes = service.store.history(&collection, &id)?;
        Ok(RecordHistory {
            collection,
            id,
            changes,
        })
    }
}

impl Method for ExportParams {
    type Answer = Exported;
    fn run(self, service: &Service) -> Result<Exported, ApiError> {
        let Address { collection, id } = self.0;
        let bytes = service.store.export_doc(&collection, &id)?;
        Ok(Exported {
            collection,
            id,
            automerge_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
        })
    }
}

impl Method for ImportAutomergeParams {
    type Answer = ImportedDocument;
    fn run(self, service: &Service) -> Result<ImportedDocument, ApiError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.automerge_base64)
            .map_err(|e| {
                ApiError::invalid_params(format!(
                    "automerge_base64 is not base64 ({e}): send the document's bytes encoded \
                     with the standard alphabet"
                ))
            })?;
        let (applied, changes) = service.import_document(self.collection, self.id, bytes)?;
        Ok(ImportedDocument {
            collection: applied.collection,
            id: applied.id,
            heads: applied.heads,
            changes,
        })
    }
}

impl Method for ImportParams {
    type Answer = Imported;
    fn run(self, service: &Service) -> Result<Imported, ApiError> {
        let writes = self.into_writes(service.options.max_import_records)?;
        Ok(imported(service.commit(writes)?))
    }
}

/// What an import answers once its writes are durable.
fn imported(applied: Vec<Applied>) -> Imported {
    Imported {
        imported: applied.len(),
        changed: applied.iter().filter(|a| a.operation.is_some()).count(),
        ids: applied.into_iter().map(|a| a.id).collect(),
    }
}

impl ImportParams {
    /// The import's records as writes; refused over `max` records.
    fn into_writes(self, max: usize) -> Result<Vec<Write>, ApiError> {
        if self.records.len() > max {
            return Err(ApiError::new(
                code::TOO_LARGE,
                format!(
                    "import of {} records is over the limit of {max} per call: split it into calls",
                    self.records.len(),
                ),
            ));
        }
        Ok(self
            .records
            .into_iter()
            .map(|r| Write::Put {
                collection: r.collection,
                id: r.id,
                fields: r.fields,
            })
            .collect())
    }
}

impl Method for QueueParams {
    type Answer = QueuePage;
    fn run(self, service: &Service) -> Result<QueuePage, ApiError> {
        let store = &service.store;
        let status = self
            .status
            .as_deref()
            .map(|s| {
                QueueStatus::parse(s).ok_or_else(|| {
                    ApiError::invalid_params(format!(
                        "status {s:?}: use pending, processing, completed or failed"
                    ))
                })
            })
            .transpose()?;
        let limit = self.limit.unwrap_or(100).min(10_000);
        let entries = match (self.newest_first || self.before.is_some(), self.after) {
            (true, Some(_)) => {
                return Err(ApiError::invalid_params(
                    "`after` pages oldest first and `before` newest first: give one of them",
                ));
            }
            (true, None) => store.queue_newest(status, self.before, limit)?,
            (false, after) => store.queue(status, after, limit)?,
        };
        let entries = entries
            .iter()
            .map(|e| {
                let mut view = QueueView::from(e);
                view.conflict = store.change_conflict(&e.data)?;
                Ok(view)
            })
            .collect::<Result<Vec<QueueView>, StoreError>>()?;
        Ok(QueuePage {
            entries,
            counts: store.queue_counts()?,
        })
    }
}

impl Method for RetryParams {
    type Answer = Retried;
    fn run(self, service: &Service) -> Result<Retried, ApiError> {
        let ids = match (self.ids, self.all_failed) {
            (Some(ids), false) => ids,
            (None, true) => service.store.queue_ids(QueueStatus::Failed)?,
            _ => {
                return Err(ApiError::invalid_params(
                    "give either `ids` or `all_failed: true`",
                ));
            }
        };
        service.store.queue_transition(&ids, &QueueAction::Retry)?;
        service.store.flush()?;
        Ok(Retried { retried: ids })
    }
}

/// Without the daemon's sync loop only a remembered pause means anything: the daemon reads it
/// when it starts.
impl Method for SyncPauseParams {
    type Answer = SyncPaused;
    fn run(self, service: &Service) -> Result<SyncPaused, ApiError> {
        if !self.remember {
            return Err(ApiError::new(
                code::UNAVAILABLE,
                "no daemon runs, so nothing syncs now: pause with `remember` (`ferry sync pause \
                 --remember`) to keep the daemon from syncing when it starts",
            ));
        }
        service.store.remember_sync_paused(true)?;
        Ok(SyncPaused {
            paused: true,
            remembered: true,
        })
    }
}

impl Method for SyncResumeParams {
    type Answer = SyncPaused;
    fn run(self, service: &Service) -> Result<SyncPaused, ApiError> {
        service.store.remember_sync_paused(false)?;
        Ok(SyncPaused {
            paused: false,
            remembered: false,
        })
    }
}

impl Method for LogParams {
    type Answer = LogPage;
    fn run(self, service: &Service) -> Result<LogPage, ApiError> {
        let limit = self.limit.unwrap_or(100).min(10_000);
        Ok(LogPage {
            entries: service.store.log(self.before, limit)?,
        })
    }
}

impl Method for StatusParams {
    type Answer = StatusAnswer;
    fn run(self, service: &Service) -> Result<StatusAnswer, ApiError> {
        let store = &service.store;
        let disk_full_since = store.disk_full_since();
        // The daemon measures live bytes (a full scan) at start and then now and then, and
        // keeps its last measure in the store; a CLI working on the store directly shows that
        // one, with its time, or measures them now when none is kept.
        let space = match store.last_space_kept() {
            Some(space) => Some(space),
            None if !service.options.daemon && disk_full_since.is_none() => {
                Some(store.measure_space()?)
            }
            None => None,
        };
        let damage = store.damage();
        let contents = match service.contents() {
            Ok(contents) => Some(contents),
            // sled cannot even be read after a disk filled up until it has some room again:
            // the status still says so.
            Err(_) if disk_full_since.is_some() => None,
            // A damaged value met on the way: the status says the store is damaged.
            Err(_) if damage.is_some() => None,
            Err(e) => return Err(e),
        };
        // Only a daemon's own process says anything about the daemon.
        let daemon = service.options.daemon;
        Ok(StatusAnswer {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            device_id: store.device_id().to_owned(),
            data_dir: service.options.data_dir.clone(),
            socket: service.options.socket.clone(),
            daemon,
            store_bytes: store.size_on_disk().ok(),
            live_bytes: space.map(|s| s.live_bytes),
            live_bytes_measured_ms: space.map(|s| s.measured_at_ms),
            storage: match disk_full_since {
                Some(since_ms) => Storage::DiskFull { since_ms },
                None => Storage::Ok,
            },
            contents,
            damage,
            pid: daemon.then(std::process::id),
            uptime_ms: daemon.then(|| service.started.elapsed().as_millis() as u64),
        })
    }
}

impl Method for DoctorParams {
    type Answer = DoctorAnswer;
    fn run(self, service: &Service) -> Result<DoctorAnswer, ApiError> {
        if self.repair && service.options.daemon {
            return Err(ApiError::new(
                code::INVALID_STATE,
                "a repair may have this device read the relay's data again from the start, \
                 which a running sync must not meet half way: stop the daemon, run `ferry doctor \
                 --repair`, then start the daemon again",
            ));
        }
        if self.repair {
            let (checkup, repaired) = service.store.repair()?;
            return Ok(DoctorAnswer {
                checkup,
                repaired: Some(repaired),
            });
        }
        Ok(DoctorAnswer {
            checkup: service.store.examine()?,
            repaired: None,
        })
    }
}

impl Method for ConflictsParams {
    type Answer = ConflictPage;
    fn run(self, service: &Service) -> Result<ConflictPage, ApiError> {
        let status = self.status_filter()?;
        let limit = service.check_limit(self.limit)?;
        let mut conflicts = service.store.conflicts(
            status,
            self.collection.as_deref(),
            self.after.as_deref(),
            limit,
        )?;
        for conflict in &mut conflicts {
            service.store.open_conflict(conflict);
        }
        let next = (conflicts.len() == limit)
            .then(|| conflicts.last().map(|c| c.id.clone()))
            .flatten();
        Ok(ConflictPage { conflicts, next })
    }
}

impl ConflictsParams {
    /// The status asked for: `None` for all.
    pub fn status_filter(&self) -> Result<Option<ConflictStatus>, ApiError> {
        match self.status.as_deref() {
            None => Ok(Some(ConflictStatus::Open)),
            Some("all") => Ok(None),
            Some(s) => Ok(Some(ConflictStatus::parse(s).ok_or_else(|| {
                ApiError::invalid_params(format!(
                    "status {s:?}: use open, resolved, auto_resolved or all"
                ))
            })?)),
        }
    }
}

/// A list call's page size: `limit`, `ListParams::DEFAULT_LIMIT` by default, at most `max`.
pub fn page_limit(limit: Option<usize>, max: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(ListParams::DEFAULT_LIMIT);
    if limit == 0 || limit > max {
        return Err(ApiError::invalid_params(format!(
            "limit must be 1 to {max}"
        )));
    }
    Ok(limit)
}

impl Method for ConflictId {
    type Answer = Conflict;
    fn run(self, service: &Service) -> Result<Conflict, ApiError> {
        match service.store.conflict(&self.id)? {
            Some(mut conflict) => {
                service.store.open_conflict(&mut conflict);
                Ok(conflict)
            }
            None => Err(StoreError::ConflictNotFound(self.id).into()),
        }
    }
}

impl Method for ResolveRequest {
    type Answer = ResolveOutcome;
    fn run(self, service: &Service) -> Result<ResolveOutcome, ApiError> {
        let mut outcome = service.resolve_conflict(self)?;
        service.store.open_conflict(&mut outcome.conflict);
        Ok(outcome)
    }
}

impl Method for KeyReloadParams {
    type Answer = KeyReloaded;
    /// Reads `account.key` again, so that a key set or imported with the CLI while the daemon
    /// runs is used at once. The key itself never crosses the socket: only its fingerprint.
    fn run(self, service: &Service) -> Result<KeyReloaded, ApiError> {
        let path = crate::datadir::account_key_path(&service.options.data_dir);
        let key = crate::crypt::AccountKey::load(&path)
            .map_err(|e| ApiError::new(code::INVALID_STATE, e.to_string()))?;
        let fingerprint = key.as_ref().map(|k| k.fingerprint());
        service.store.keyring().set(key);
        Ok(KeyReloaded {
            set: fingerprint.is_some(),
            fingerprint,
        })
    }
}

/// The methods only a daemon serves (they live as long as its connection, or need its sync
/// loop): `ipc` runs them; the service alone refuses them.
fn needs_daemon(method: &str) -> ApiError {
    ApiError::new(
        code::UNAVAILABLE,
        format!("{method} needs the daemon: start `ferry daemon` and use its socket"),
    )
}

impl Method for SubscribeParams {
    type Answer = Subscribed;
    fn run(self, _: &Service) -> Result<Subscribed, ApiError> {
        Err(needs_daemon(Self::NAME))
    }
}

impl Method for UnsubscribeParams {
    type Answer = Unsubscribed;
    fn run(self, _: &Service) -> Result<Unsubscribed, ApiError> {
        Err(needs_daemon(Self::NAME))
    }
}

/// A queue entry as apps see it: the change as its hash and size rather than raw bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueView {
    pub id: u64,
    pub operation: Operation,
    pub model_name: String,
    pub object_id: String,
    pub change: Option<String>,
    pub data_bytes: usize,
    pub status: QueueStatus,
    pub retry_count: u32,
    pub last_error: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub priority: i32,
    /// The conflict this change brought when it met the relay's log, if any.
    pub conflict: Option<String>,
}

impl From<&SyncQueueEntry> for QueueView {
    fn from(e: &SyncQueueEntry) -> Self {
        QueueView {
            id: e.id,
            operation: e.operation,
            model_name: e.model_name.clone(),
            object_id: e.object_id.clone(),
            change: Held::of(&e.data).hash().map(|h| h.to_string()),
            data_bytes: Held::of(&e.data).change_bytes(),
            status: e.status,
            retry_count: e.retry_count,
            last_error: e.last_error.clone(),
            created_at: e.created_at,
            updated_at: e.updated_at,
            priority: e.priority,
            conflict: None,
        }
    }
}

/// A conflict found or resolved, as subscribers hear of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConflictEvent {
    pub id: String,
    pub kind: ConflictKind,
    pub collection: String,
    pub record: String,
    pub status: ConflictStatus,
    pub winner: Option<Take>,
    /// True while only this device's resolution exists (not yet back from the relay).
    pub resolving: bool,
}

impl From<&Conflict> for ConflictEvent {
    fn from(c: &Conflict) -> Self {
        ConflictEvent {
            id: c.id.clone(),
            kind: c.kind,
            collection: c.collection.clone(),
            record: c.record.clone(),
            status: c.status,
            winner: c.winner,
            resolving: c.resolving.is_some(),
        }
    }
}

/// Reads a method's params (an object, or null for none). An error names the param at fault, e.g.
/// "`collection`: invalid type: integer `5`, expected a string".
pub(crate) fn parse<T: DeserializeOwned>(params: Value) -> Result<T, ApiError> {
    let params = if params.is_null() { json!({}) } else { params };
    if !params.is_object() {
        return Err(ApiError::invalid_params(
            "params must be an object with named fields",
        ));
    }
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid_params(inner)
        } else {
            ApiError::invalid_params(format!("`{path}`: {inner}"))
        }
    })
}
