//! The relay's own participant in each account space: its *web actor*, through which HTTP clients
//! write records and settle conflicts.
//!
//! Each space used over HTTP gets a device-like `Store` (behind a `Service`) with a stable device
//! id of its own, generated when the space's mirror is first opened and kept in that store. The
//! mirror applies the space's log exactly like a device does (`RelayStore::read_since` →
//! `apply_remote`, in log order, the cursor in the same batch as the documents), so it holds the
//! same conflict entries as every device (same ids, statuses and resolutions). Its own writes go
//! into its SyncQueue and are appended to the log by the pump below
//! (`next_upload_batch` → `RelayStore::append` → `finish_upload`), then the space's new head is
//! published to the live QUIC sessions, as a device's upload is.
//!
//! Mirrors catch up lazily: each call that needs it first brings the mirror to the log's head
//! (one read of the head when it is already there). At most `max_open` mirrors stay open (least
//! recently used first out); one still in use when it leaves that set stays the only one for its
//! space until its last user is done, so two stores never work on one space's keys at once.
//!
//! Costs: a mirror is a second copy of a space's documents (on top of the log and the relay's
//! documents), plus its conflict entries and queue, kept under the key prefix `M{space}\0` in the
//! relay's sled database; only spaces used through the HTTP write or conflict routes get one. The
//! first call for a space applies its whole log.
//!
//! Encrypted fields: the relay has no account key. The mirror's reads show their envelopes, as a
//! device store without the key does, and a write that sets an `encrypted` field is refused.
//!
//! Owns: the mirrors' key prefix, opening and evicting mirrors, catching up, the pump, and the
//! per-operation checks of HTTP writes. Must not touch: the log's layout (`relay::store`), tokens
//! and accounts, HTTP shapes (`relay::http`, `relay::web_write`).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use automerge::ChangeHash;
use ferry_proto::Limits;
use ferry_proto::wire::{ChangeOutcome, ErrorKind, UploadChange};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::activity::Activity;
use super::alerts::RelayAlerts;
use super::metrics::RelayMetrics;
use super::server::{Shared, Spaces};
use super::store::{RelayStore, RelayStoreError};
use crate::clock::SystemClock;
use crate::record::Fields;
use crate::resolve::{Conflict, Policies, Take};
use crate::service::api::{ConflictId, ConflictPage, ConflictsParams, ResolveRequest};
use crate::service::{ApiError, ConflictEvent, Service, ServiceOptions, code};
use crate::store::kv::{Kv, PrefixKv};
use crate::store::{
    Applied, BatchLimits, RetryPolicy, Store, StoreError, StoreOptions, Write, keys,
};

/// Log entries applied per read while catching up.
const CATCH_UP_CHANGES: usize = 1024;
const CATCH_UP_BYTES: usize = 8 << 20;
/// Queue entries appended per `RelayStore::append` call by the pump.
const PUMP_CHANGES: usize = 256;
const PUMP_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("the space's log cannot be read or written ({0}); try again")]
    Log(#[from] RelayStoreError),
    #[error("the relay's copy of space {space} cannot be opened ({source}); check the relay's log")]
    Open {
        space: String,
        source: Box<StoreError>,
    },
    /// The mirror's store refused the request; the code says why (not found, settled, invalid).
    #[error(transparent)]
    Refused(#[from] ApiError),
}

impl From<StoreError> for MirrorError {
    fn from(e: StoreError) -> Self {
        MirrorError::Refused(e.into())
    }
}

/// How mirrors are kept.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Mirrors kept open at once.
    pub max_open: usize,
    /// Documents each open mirror keeps loaded.
    pub cache_docs: usize,
    pub limits: Limits,
    /// Appends a change may fail (for a retryable reason) before it is marked failed.
    pub max_retries: u32,
    /// Most conflicts one list request returns.
    pub max_list_limit: usize,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            max_open: 64,
            cache_docs: 256,
            limits: Limits::default(),
            max_retries: 5,
            max_list_limit: 1000,
        }
    }
}

/// Every space's mirror, opened on first use.
pub struct Mirrors {
    kv: Arc<dyn Kv>,
    log: Arc<RelayStore>,
    spaces: Arc<Spaces>,
    metrics: Arc<RelayMetrics>,
    activity: Arc<Activity>,
    alerts: Arc<RelayAlerts>,
    policies: Arc<Policies>,
    options: MirrorOptions,
    open: Mutex<Open>,
    events: Mutex<HashMap<String, broadcast::Sender<ConflictEvent>>>,
}

struct Open {
    /// The mirrors kept open.
    recent: lru::LruCache<String, Arc<Mirror>>,
    /// Every mirror that may still be in use, kept or not.
    live: HashMap<String, Weak<Mirror>>,
}

impl Mirrors {
    pub fn new(
        kv: Arc<dyn Kv>,
        shared: &Shared,
        policies: Arc<Policies>,
        options: MirrorOptions,
    ) -> Self {
        let capacity = NonZeroUsize::new(options.max_open).unwrap_or(NonZeroUsize::MIN);
        Mirrors {
            kv,
            log: shared.store.clone(),
            spaces: shared.spaces.clone(),
            metrics: shared.metrics.clone(),
            activity: shared.activity.clone(),
            alerts: shared.alerts.clone(),
            policies,
            options,
            open: Mutex::new(Open {
                recent: lru::LruCache::new(capacity),
                live: HashMap::new(),
            }),
            events: Mutex::new(HashMap::new()),
        }
    }

    /// The space's mirror, opened if needed (not caught up: its calls do that).
    pub fn mirror(&self, space: &str) -> Result<Arc<Mirror>, MirrorError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mirror) = open.live.get(space).and_then(Weak::upgrade) {
            open.recent.put(space.to_owned(), mirror.clone());
            return Ok(mirror);
        }
        // The space's name ends the prefix at `\0`, which no space name holds (the log's rule).
        self.log.head(space)?;
        let mut prefix = b"M".to_vec();
        prefix.extend_from_slice(space.as_bytes());
        prefix.push(0);
        let kv = PrefixKv::new(self.kv.clone(), prefix);
        let opened = |source| MirrorError::Open {
            space: space.to_owned(),
            source: Box::new(source),
        };
        let device = match kv.get(keys::META_DEVICE).map_err(|e| opened(e.into()))? {
            Some(stored) => String::from_utf8_lossy(&stored).into_owned(),
            None => new_actor_id(),
        };
        let store = Store::open(
            Box::new(kv),
            &device,
            StoreOptions {
                limits: self.options.limits,
                cache_docs: self.options.cache_docs,
                policies: (*self.policies).clone(),
                ..StoreOptions::default()
            },
            Arc::new(SystemClock),
        )
        .map_err(opened)?;
        store.recover_interrupted().map_err(opened)?;
        let service = Service::new(
            Arc::new(store),
            ServiceOptions {
                data_dir: Default::default(),
                socket: Default::default(),
                max_import_records: 0,
                max_list_limit: self.options.max_list_limit,
                group_commit_max: 1,
                daemon: false,
            },
        );
        let mirror = Arc::new(Mirror {
            space: space.to_owned(),
            web_actor: device,
            service,
            log: self.log.clone(),
            spaces: self.spaces.clone(),
            metrics: self.metrics.clone(),
            activity: self.activity.clone(),
            alerts: self.alerts.clone(),
            events: self.sender(space),
            policies: self.policies.clone(),
            max_retries: self.options.max_retries,
            busy: Mutex::new(()),
        });
        open.live.retain(|_, m| m.strong_count() > 0);
        open.live.insert(space.to_owned(), Arc::downgrade(&mirror));
        open.recent.put(space.to_owned(), mirror.clone());
        tracing::info!(
            space,
            web_actor = mirror.web_actor,
            "opened the space's mirror"
        );
        Ok(mirror)
    }

    /// The space's conflicts as its mirror finds and resolves them, once durable. They are found
    /// when the mirror catches up, which each HTTP call on the space does first.
    pub fn subscribe_conflicts(&self, space: &str) -> broadcast::Receiver<ConflictEvent> {
        self.sender(space).subscribe()
    }

    fn sender(&self, space: &str) -> broadcast::Sender<ConflictEvent> {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events
            .entry(space.to_owned())
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }
}

/// A random device id for a new web actor, in the form device ids take (hex).
fn new_actor_id() -> String {
    let mut bytes = [0u8; 16];
    // Without OS randomness the id still only has to differ from the space's devices' ids,
    // which are key hashes; the time makes that so.
    if getrandom::fill(&mut bytes).is_err() {
        let now = crate::clock::now_ms().to_be_bytes();
        for (byte, time) in bytes.iter_mut().zip(now) {
            *byte = time;
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One HTTP write operation, checked for its shape by the caller.
#[derive(Debug, Clone)]
pub struct WebWrite {
    pub operation: WebOperation,
    pub collection: String,
    pub id: String,
    /// The fields a create sets, or the top-level fields an update sets.
    pub fields: Fields,
    /// The record's version (heads) the client made an update or delete on, when it may be
    /// older than the record's current one: the write is then made concurrently at that version.
    pub base: Option<Vec<ChangeHash>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebOperation {
    Create,
    Update,
    Delete,
}

/// What became of one write, in the order given.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum WriteOutcome {
    /// In the log; `version` is the record's heads after it (hex, comma-joined).
    Applied { object_id: String, version: String },
    /// In the log, and it met concurrent changes: the conflict it brought.
    Conflict {
        object_id: String,
        conflict_id: String,
        version: String,
    },
    /// Not written.
    Rejected {
        object_id: String,
        reason: String,
        code: RejectCode,
    },
}

/// Why an upload's operation was not written: a stable code clients match on (docs/HTTP.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// Another client's `device_id`.
    WrongDevice,
    /// Before 2000, or over a day ahead of the relay's clock.
    BadTimestamp,
    /// A `base` that is not a version.
    BadVersion,
    /// The relay's config declares collections, and not this one.
    UnknownModel,
    /// The field is encrypted with the account key, which the relay does not have.
    EncryptedField,
    /// A create of a live record.
    Exists,
    /// An update or delete of a missing or deleted record.
    NotFound,
    /// A bad id, field name or value, too large; a `base` that does not fit.
    Invalid,
    /// The log refused the change: the kind of its refusal.
    #[serde(untagged)]
    Log(ErrorKind),
}

impl WriteOutcome {
    pub fn rejected(object_id: &str, code: RejectCode, reason: impl Into<String>) -> Self {
        WriteOutcome::Rejected {
            object_id: object_id.to_owned(),
            reason: reason.into(),
            code,
        }
    }
}

/// The comma-joined hex heads by which HTTP clients name a record's version.
pub fn version(heads: &[String]) -> String {
    heads.join(",")
}

/// What resolving a conflict did: the conflict as it stands once its resolution is in the log,
/// and the records written.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    pub conflict: Conflict,
    pub writes: Vec<Written>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub collection: String,
    pub id: String,
    pub version: String,
}

/// One space's web actor.
pub struct Mirror {
    space: String,
    web_actor: String,
    service: Service,
    log: Arc<RelayStore>,
    spaces: Arc<Spaces>,
    metrics: Arc<RelayMetrics>,
    activity: Arc<Activity>,
    alerts: Arc<RelayAlerts>,
    events: broadcast::Sender<ConflictEvent>,
    policies: Arc<Policies>,
    max_retries: u32,
    /// Held through each call, so that catching up, writing and pumping of one space never
    /// interleave.
    busy: Mutex<()>,
}

impl Mirror {
    /// The web actor's device id: the origin its changes have in the log.
    pub fn web_actor(&self) -> &str {
        &self.web_actor
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the mirror to the log's head; returns the cursor reached.
    pub fn catch_up(&self) -> Result<u64, MirrorError> {
        let _busy = self.lock();
        self.catch_up_locked()
    }

    fn catch_up_locked(&self) -> Result<u64, MirrorError> {
        let store = self.service.store();
        loop {
            let cursor = store.sync_cursor()?;
            let slice =
                self.log
                    .read_since(&self.space, cursor, CATCH_UP_CHANGES, CATCH_UP_BYTES)?;
            if slice.through <= cursor {
                return Ok(cursor);
            }
            let outcome = self.service.apply_remote(slice.entries, slice.through)?;
            self.announce(&outcome.conflicts);
            if slice.through >= slice.head {
                return Ok(slice.through);
            }
        }
    }

    fn announce<'a>(&self, conflicts: impl IntoIterator<Item = &'a Conflict>) {
        for conflict in conflicts {
            // No subscriber is fine: nobody is listening.
            let _ = self.events.send(ConflictEvent::from(conflict));
        }
    }

    /// Appends every pending change of the web actor to the log and publishes the new head.
    /// Returns each uploaded queue entry's change and what the log did with it.
    fn pump(&self) -> Result<HashMap<u64, (Vec<u8>, ChangeOutcome)>, MirrorError> {
        let store = self.service.store();
        let retries = RetryPolicy::immediate(self.max_retries);
        let mut sent = HashMap::new();
        loop {
            // A change refused for a retryable reason comes back as pending with one more retry
            // counted, and is marked failed after `max_retries`: the loop ends.
            let entries = store
                .next_upload_batch(BatchLimits::of(PUMP_CHANGES, PUMP_BYTES))?
                .entries;
            if entries.is_empty() {
                return Ok(sent);
            }
            let changes: Vec<UploadChange> = entries
                .into_iter()
                .map(ferry_proto::SyncQueueEntry::into_upload)
                .collect();
            let appended = super::server::append_counted(
                &self.log,
                &self.metrics,
                &self.activity,
                &self.space,
                &self.web_actor,
                &changes,
                crate::clock::now_ms(),
            );
            let results = match appended {
                Ok((results, _)) => results,
                Err(e) => {
                    let ids: Vec<u64> = changes.iter().map(|c| c.entry).collect();
                    store.abandon_upload(&ids, &e.to_string(), ErrorKind::Server, &retries)?;
                    store.flush()?;
                    return Err(e.into());
                }
            };
            store.finish_upload(&results, &retries)?;
            store.flush()?;
            let head = results
                .iter()
                .filter_map(|r| match r.outcome {
                    ChangeOutcome::Stored { seq } => Some(seq),
                    _ => None,
                })
                .max();
            if let Some(head) = head {
                self.spaces.publish(&self.space, head);
                self.alerts.appended(&self.log, &self.space);
            }
            let mut changes: HashMap<u64, Vec<u8>> =
                changes.into_iter().map(|c| (c.entry, c.change)).collect();
            for result in results {
                let change = changes.remove(&result.entry).unwrap_or_default();
                sent.insert(result.entry, (change, result.outcome));
            }
        }
    }

    /// Writes `writes` as the web actor, in order: every one that passes its checks in one
    /// commit (each on its own when the commit as a whole is refused, so that one bad write does
    /// not sink the others), then appended to the log and met with the log like a device's
    /// change. When the relay's config declares collections, only those may be written.
    pub fn write(&self, writes: Vec<WebWrite>) -> Result<Vec<WriteOutcome>, MirrorError> {
        let policies = &self.policies;
        let declared = (!policies.collections.is_empty()).then_some(&policies.collections);
        let _busy = self.lock();
        self.catch_up_locked()?;
        let store = self.service.store();
        // One slot per write, in order: a refusal now, or `None` until its commit answers.
        let mut outcomes: Vec<Option<WriteOutcome>> = Vec::with_capacity(writes.len());
        // Whether each record is live as the writes before it in this request leave it.
        let mut live: HashMap<(String, String), bool> = HashMap::new();
        let mut accepted: Vec<(usize, Write, Option<Vec<ChangeHash>>)> = Vec::new();
        for (index, write) in writes.into_iter().enumerate() {
            let key = (write.collection.clone(), write.id.clone());
            let refuse =
                |code, reason: String| Some(WriteOutcome::rejected(&write.id, code, reason));
            if declared.is_some_and(|d| !d.contains_key(&write.collection)) {
                outcomes.push(refuse(
                    RejectCode::UnknownModel,
                    format!(
                        "model {:?} is not declared in the relay's config: add a [collections.{}] \
                         section there (as on the devices)",
                        write.collection, write.collection
                    ),
                ));
                continue;
            }
            let encrypted = &policies.of(&write.collection).encrypted;
            if let Some(field) = write.fields.keys().find(|f| encrypted.contains(*f)) {
                outcomes.push(refuse(
                    RejectCode::EncryptedField,
                    format!(
                        "field {field:?} of {} is encrypted with the account key, which the relay \
                         does not have: write it from a device",
                        write.collection
                    ),
                ));
                continue;
            }
            if write.base.is_some() && write.operation == WebOperation::Create {
                outcomes.push(refuse(
                    RejectCode::Invalid,
                    "`base` is the version an update or delete was made on: leave it out of a \
                     create"
                        .into(),
                ));
                continue;
            }
            let was_live = match live.get(&key) {
                Some(live) => *live,
                // Made on an older version: whether the record was live there is the store's
                // to tell, at that version.
                None if write.base.is_some() => true,
                None => match store.is_live(&key.0, &key.1) {
                    Ok(live) => live,
                    Err(e) => {
                        outcomes.push(refuse(RejectCode::Invalid, e.to_string()));
                        continue;
                    }
                },
            };
            let base = write.base;
            let (write, now_live) = match (write.operation, was_live) {
                (WebOperation::Create, true) => {
                    outcomes.push(refuse(
                        RejectCode::Exists,
                        format!("{}/{} already exists: update it instead", key.0, key.1),
                    ));
                    continue;
                }
                (WebOperation::Update | WebOperation::Delete, false) => {
                    outcomes.push(refuse(
                        RejectCode::NotFound,
                        format!("{}/{} does not exist (or is deleted)", key.0, key.1),
                    ));
                    continue;
                }
                (WebOperation::Create, false) => (
                    Write::Put {
                        collection: write.collection,
                        id: Some(write.id),
                        fields: write.fields,
                    },
                    true,
                ),
                (WebOperation::Update, true) => (
                    Write::Patch {
                        collection: write.collection,
                        id: write.id,
                        set: write.fields,
                        unset: Vec::new(),
                    },
                    true,
                ),
                (WebOperation::Delete, true) => (
                    Write::Delete {
                        collection: write.collection,
                        id: write.id,
                    },
                    false,
                ),
            };
            live.insert(key, now_live);
            accepted.push((index, write, base));
            outcomes.push(None);
        }
        let applied = self.commit(accepted)?;
        let sent = self.pump()?;
        self.catch_up_locked()?;
        for (index, id, result) in applied {
            let outcome = match result {
                Err(e) if e.code == code::NOT_FOUND => {
                    WriteOutcome::rejected(&id, RejectCode::NotFound, e.message)
                }
                Err(e) => WriteOutcome::rejected(&id, RejectCode::Invalid, e.message),
                Ok(applied) => self.outcome(applied, &sent)?,
            };
            if let Some(slot) = outcomes.get_mut(index) {
                *slot = Some(outcome);
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| WriteOutcome::rejected("", RejectCode::Invalid, "not written"))
            })
            .collect())
    }

    /// Commits the writes together, or each alone when the whole is refused for what a write
    /// holds; an error of the store itself (storage) is the caller's. Returns once durable.
    #[allow(clippy::type_complexity)]
    fn commit(
        &self,
        accepted: Vec<(usize, Write, Option<Vec<ChangeHash>>)>,
    ) -> Result<Vec<(usize, String, Result<Applied, ApiError>)>, MirrorError> {
        if accepted.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.service.store();
        let durably = |writes| -> Result<Vec<Applied>, ApiError> {
            let applied = store.write_all_at(writes)?;
            store.flush()?;
            Ok(applied)
        };
        let writes = accepted
            .iter()
            .map(|(_, w, base)| (w.clone(), base.clone()))
            .collect();
        match durably(writes) {
            Ok(applied) => Ok(accepted
                .into_iter()
                .zip(applied)
                .map(|((index, _, _), a)| (index, a.id.clone(), Ok(a)))
                .collect()),
            Err(e) if !is_input_error(&e) => Err(e.into()),
            Err(_) => accepted
                .into_iter()
                .map(|(index, write, base)| {
                    let id = write_id(&write);
                    match durably(vec![(write, base)]) {
                        Ok(mut applied) if !applied.is_empty() => {
                            Ok((index, id, Ok(applied.remove(0))))
                        }
                        Ok(_) => Ok((
                            index,
                            id,
                            Err(ApiError::new(code::INTERNAL, "the write gave no result")),
                        )),
                        Err(e) if is_input_error(&e) => Ok((index, id, Err(e))),
                        Err(e) => Err(e.into()),
                    }
                })
                .collect(),
        }
    }

    /// What one committed write became once pumped and met with the log.
    fn outcome(
        &self,
        applied: Applied,
        sent: &HashMap<u64, (Vec<u8>, ChangeOutcome)>,
    ) -> Result<WriteOutcome, MirrorError> {
        let version = version(&applied.heads);
        let object_id = applied.id;
        let Some((change, result)) = applied.queue_id.and_then(|q| sent.get(&q)) else {
            // The record already held exactly this: nothing to log.
            return Ok(WriteOutcome::Applied { object_id, version });
        };
        if let ChangeOutcome::Rejected { code, message } = result {
            return Ok(WriteOutcome::Rejected {
                object_id,
                reason: format!("the log refused the change ({message})"),
                code: RejectCode::Log(code.kind()),
            });
        }
        Ok(match self.service.store().change_conflict(change)? {
            Some(conflict_id) => WriteOutcome::Conflict {
                object_id,
                conflict_id,
                version,
            },
            None => WriteOutcome::Applied { object_id, version },
        })
    }

    /// The mirror's conflicts, as a device's `conflicts.list` gives them.
    pub fn conflicts(&self, query: ConflictsParams) -> Result<ConflictPage, MirrorError> {
        let _busy = self.lock();
        self.catch_up_locked()?;
        Ok(self.service.call(query)?)
    }

    /// One conflict, as a device's `conflicts.get` gives it.
    pub fn conflict(&self, id: String) -> Result<Conflict, MirrorError> {
        let _busy = self.lock();
        self.catch_up_locked()?;
        Ok(self.service.call(ConflictId { id })?)
    }

    /// Resolves an open conflict as the web actor (see `Store::resolve_conflict`), appends the
    /// resolution to the log and catches up, so the answer shows the conflict as every device
    /// will once it syncs.
    pub fn resolve(
        &self,
        id: &str,
        take: Take,
        data: Option<Fields>,
    ) -> Result<Resolved, MirrorError> {
        let _busy = self.lock();
        self.catch_up_locked()?;
        let outcome = self.service.resolve_conflict(ResolveRequest {
            id: id.to_owned(),
            take,
            data,
        })?;
        self.announce([&outcome.conflict]);
        self.pump()?;
        self.catch_up_locked()?;
        let store = self.service.store();
        let mut conflict = store.conflict(id)?.unwrap_or(outcome.conflict);
        store.open_conflict(&mut conflict);
        let writes = outcome
            .writes
            .into_iter()
            .map(|a| Written {
                version: version(&a.heads),
                collection: a.collection,
                id: a.id,
            })
            .collect();
        Ok(Resolved { conflict, writes })
    }
}

/// Whether the store refused a write for what it holds (so the others may still go in).
fn is_input_error(e: &ApiError) -> bool {
    matches!(
        e.code,
        code::INVALID_PARAMS
            | code::TOO_LARGE
            | code::UNKNOWN_COLLECTION
            | code::NOT_FOUND
            | code::NO_KEY
            | code::UNDECRYPTABLE
    )
}

fn write_id(write: &Write) -> String {
    match write {
        Write::Put { id, .. } => id.clone().unwrap_or_default(),
        Write::Patch { id, .. } | Write::Delete { id, .. } => id.clone(),
    }
}
