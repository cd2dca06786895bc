//! The relay's own participant in each account space: its *web actor*, through which HTTP clients
//! write records and settle conflicts.
//!
//! A space's web actor has a device id of its own, kept by relay storage (`web_actor`) the first
//! time the space is written over HTTP. An HTTP write is built as an Automerge change under that
//! actor on a copy of the relay's own document of the record (every logged change in it), with
//! the same code a device's store writes with (`store::build_change`), then appended to the
//! space's log like a device's upload (`append_counted`: validated, counted, its conflicts found
//! by the relay's conflict ledger) and published to the live QUIC sessions. Conflict views are
//! the entries that ledger keeps as changes are logged, found by the same detection, in the same
//! log order, as on every device, so their ids match every device's; a resolution is written as
//! the change devices recognise as one, and the ledger marks the conflict resolved as it is
//! logged. Nothing is held but the relay's documents and log: no replay, no second copy.
//!
//! Writes to one space are made one request at a time (a lock per space), so that two requests
//! never build changes with the same sequence number.
//!
//! Encrypted fields: the relay has no account key. Reads show their envelopes, and a write that
//! sets an `encrypted` field is refused.
//!
//! Owns: the web actor's ids and locks, the per-operation checks of HTTP writes, and the
//! outcome of each. Must not touch: the log's layout or storage (`relay::store`), tokens and
//! accounts, HTTP shapes (`relay::http`, `relay::web_write`).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::{ActorId, ChangeHash};
use ferry_proto::wire::{ChangeOutcome, ErrorKind, UploadChange};
use serde::{Deserialize, Serialize};

use super::server::{Shared, append_counted};
use super::store::RelayStoreError;
use crate::record::{Fields, Record, chunk_hash};
use crate::resolve::{self, Conflict, Take};
use crate::service::api::{ConflictPage, ConflictsParams};
use crate::service::{ApiError, code, page_limit};
use crate::store::conflicts::{check_resolution, resolution_targets, write_resolution};
use crate::store::{StoreError, StoreOptions, Write, build_change};

#[derive(Debug, thiserror::Error)]
pub enum WebActorError {
    #[error("the space's log cannot be read or written ({0}); try again")]
    Log(#[from] RelayStoreError),
    /// The request was refused; the code says why (not found, settled, invalid).
    #[error(transparent)]
    Refused(#[from] ApiError),
}

impl From<StoreError> for WebActorError {
    fn from(e: StoreError) -> Self {
        WebActorError::Refused(e.into())
    }
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

fn version_of(record: &mut Record) -> String {
    let heads: Vec<String> = record.heads().iter().map(ToString::to_string).collect();
    version(&heads)
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

/// The web actors of every space.
pub struct WebActors {
    shared: Shared,
    /// Collections, limits and policies, as the relay's config gives them; no account key.
    options: StoreOptions,
    /// Most conflicts one list request returns.
    max_list_limit: usize,
    spaces: Mutex<HashMap<String, Arc<SpaceActor>>>,
}

/// One space's web actor.
struct SpaceActor {
    actor: ActorId,
    /// Its device id: the actor, hex.
    id: String,
    /// Held through each write or resolution of the space.
    busy: Mutex<()>,
}

/// The records one request writes, each a copy of the relay's document under the web actor,
/// with the request's earlier changes in it.
struct Working<'a> {
    actors: &'a WebActors,
    space: &'a str,
    actor: &'a ActorId,
    records: HashMap<(String, String), Record>,
}

impl Working<'_> {
    fn record(&mut self, collection: &str, id: &str) -> Result<&mut Record, WebActorError> {
        let key = (collection.to_owned(), id.to_owned());
        Ok(match self.records.entry(key) {
            Entry::Occupied(held) => held.into_mut(),
            Entry::Vacant(slot) => {
                let text = self.actors.options.policies.of(collection).text.clone();
                let record = self
                    .actors
                    .shared
                    .store
                    .fork_as(self.space, collection, id, self.actor)?
                    .unwrap_or_else(|| Record::new(self.actor))
                    .with_text_fields(text);
                slot.insert(record)
            }
        })
    }
}

impl WebActors {
    pub fn new(shared: &Shared, options: StoreOptions, max_list_limit: usize) -> Self {
        WebActors {
            shared: shared.clone(),
            options,
            max_list_limit,
            spaces: Mutex::new(HashMap::new()),
        }
    }

    /// The space's web actor, kept by storage from its first use on.
    fn space(&self, space: &str) -> Result<Arc<SpaceActor>, WebActorError> {
        if let Some(actor) = lock(&self.spaces).get(space) {
            return Ok(actor.clone());
        }
        let id = self
            .shared
            .store
            .web_actor(space, &new_actor_id(self.shared.clock.now_ms()))?;
        let actor = ActorId::from(crate::hex::decode(&id).ok_or_else(|| {
            ApiError::new(
                code::INTERNAL,
                format!("the space's web actor {id:?} is not hex: the relay's store is damaged"),
            )
        })?);
        let actor = Arc::new(SpaceActor {
            actor,
            id,
            busy: Mutex::new(()),
        });
        let mut spaces = lock(&self.spaces);
        Ok(spaces.entry(space.to_owned()).or_insert(actor).clone())
    }

    /// The space's web actor's device id: the origin its changes have in the log.
    pub fn web_actor(&self, space: &str) -> Result<String, WebActorError> {
        Ok(self.space(space)?.id.clone())
    }

    /// Writes `writes` as the space's web actor, in order: each that passes its checks becomes a
    /// change on the relay's document of its record (with the request's earlier changes), and
    /// all of them are appended to the log in one call, where each meets the log like a
    /// device's change. When the relay's config declares collections, only those may be
    /// written. One bad write does not sink the others.
    pub fn write(
        &self,
        space: &str,
        writes: Vec<WebWrite>,
        now: u64,
    ) -> Result<Vec<WriteOutcome>, WebActorError> {
        let actor = self.space(space)?;
        let _busy = lock(&actor.busy);
        let mut working = Working {
            actors: self,
            space,
            actor: &actor.actor,
            records: HashMap::new(),
        };
        let mut outcomes: Vec<WriteOutcome> = Vec::with_capacity(writes.len());
        let mut uploads = Vec::new();
        for (index, write) in writes.into_iter().enumerate() {
            let object_id = write.id.clone();
            let built = self.build(&mut working, write, now);
            match built {
                Ok(Built::Change(upload, version)) => {
                    uploads.push(UploadChange {
                        entry: index as u64,
                        ..upload
                    });
                    // Answered once the log has it; meanwhile it holds the version the write left.
                    outcomes.push(WriteOutcome::Applied { object_id, version });
                }
                Ok(Built::Unchanged(version)) => {
                    outcomes.push(WriteOutcome::Applied { object_id, version })
                }
                Ok(Built::Refused(outcome)) => outcomes.push(outcome),
                Err(WebActorError::Refused(e)) => {
                    let code = match e.code {
                        code::NOT_FOUND => RejectCode::NotFound,
                        code::UNKNOWN_COLLECTION => RejectCode::UnknownModel,
                        _ => RejectCode::Invalid,
                    };
                    outcomes.push(WriteOutcome::rejected(&object_id, code, e.message));
                }
                Err(e) => return Err(e),
            }
        }
        let results = self.append(space, &actor.id, &uploads, now)?;
        for (upload, outcome) in uploads.iter().zip(results) {
            let Some(slot) = usize::try_from(upload.entry)
                .ok()
                .and_then(|i| outcomes.get_mut(i))
            else {
                continue;
            };
            let object_id = upload.record.clone();
            let version = match slot {
                WriteOutcome::Applied { version, .. } => std::mem::take(version),
                _ => String::new(),
            };
            *slot = match outcome {
                ChangeOutcome::Rejected { code, message } => WriteOutcome::Rejected {
                    object_id,
                    reason: format!("the log refused the change ({message})"),
                    code: RejectCode::Log(code.kind()),
                },
                ChangeOutcome::Stored { .. } | ChangeOutcome::Duplicate { .. } => {
                    let hash = chunk_hash(&upload.change).unwrap_or_default();
                    match self.shared.store.change_conflict(space, &hash)? {
                        Some(conflict_id) => WriteOutcome::Conflict {
                            object_id,
                            conflict_id,
                            version,
                        },
                        None => WriteOutcome::Applied { object_id, version },
                    }
                }
            };
        }
        Ok(outcomes)
    }

    /// Checks one write and builds its change.
    fn build(
        &self,
        working: &mut Working<'_>,
        write: WebWrite,
        now: u64,
    ) -> Result<Built, WebActorError> {
        let policies = &self.options.policies;
        let refuse = |code, reason: String| {
            Ok(Built::Refused(WriteOutcome::rejected(
                &write.id, code, reason,
            )))
        };
        if self
            .options
            .declared_collections
            .as_ref()
            .is_some_and(|d| !d.contains(&write.collection))
        {
            return refuse(
                RejectCode::UnknownModel,
                format!(
                    "model {:?} is not declared in the relay's config: add a [collections.{}] \
                     section there (as on the devices)",
                    write.collection, write.collection
                ),
            );
        }
        let policy = policies.of(&write.collection);
        if let Some(field) = write.fields.keys().find(|f| policy.encrypted.contains(*f)) {
            return refuse(
                RejectCode::EncryptedField,
                format!(
                    "field {field:?} of {} is encrypted with the account key, which the relay \
                     does not have: write it from a device",
                    write.collection
                ),
            );
        }
        if write.base.is_some() && write.operation == WebOperation::Create {
            return refuse(
                RejectCode::Invalid,
                "`base` is the version an update or delete was made on: leave it out of a create"
                    .into(),
            );
        }
        self.options
            .check_write(&write.collection, Some(&write.id), None)?;
        let record = working.record(&write.collection, &write.id)?;
        // Made on an older version: whether the record was live there is the store's to tell.
        let live = write.base.is_some() || resolve::view(record, policy).is_live();
        let (collection, id) = (write.collection.clone(), write.id.clone());
        let change = match (write.operation, live) {
            (WebOperation::Create, true) => {
                return refuse(
                    RejectCode::Exists,
                    format!("{collection}/{id} already exists: update it instead"),
                );
            }
            (WebOperation::Update | WebOperation::Delete, false) => {
                return refuse(
                    RejectCode::NotFound,
                    format!("{collection}/{id} does not exist (or is deleted)"),
                );
            }
            (WebOperation::Create, false) => Write::Put {
                collection: collection.clone(),
                id: Some(id.clone()),
                fields: write.fields,
            },
            (WebOperation::Update, true) => Write::Patch {
                collection: collection.clone(),
                id: id.clone(),
                set: write.fields,
                unset: Vec::new(),
            },
            (WebOperation::Delete, true) => Write::Delete {
                collection: collection.clone(),
                id: id.clone(),
            },
        };
        let built = build_change(record, change, write.base.as_deref(), now, &self.options)?;
        let version = version_of(record);
        Ok(match built {
            None => Built::Unchanged(version),
            Some((_, change)) => Built::Change(
                UploadChange {
                    entry: 0,
                    collection,
                    record: id,
                    change,
                },
                version,
            ),
        })
    }

    /// Appends the web actor's changes to the space's log, publishes the new head to the live
    /// sessions, and answers each change.
    fn append(
        &self,
        space: &str,
        actor: &str,
        uploads: &[UploadChange],
        now: u64,
    ) -> Result<Vec<ChangeOutcome>, WebActorError> {
        if uploads.is_empty() {
            return Ok(Vec::new());
        }
        let shared = &self.shared;
        let (results, head) = append_counted(
            &shared.store,
            &shared.metrics,
            &shared.activity,
            (space, actor),
            uploads,
            &|_| false,
            now,
        )?;
        if results
            .iter()
            .any(|r| matches!(r.outcome, ChangeOutcome::Stored { .. }))
        {
            shared.spaces.publish(space, head);
            shared.alerts.appended(&shared.store, space);
        }
        Ok(results.into_iter().map(|r| r.outcome).collect())
    }

    /// The space's conflicts, as a device's `conflicts.list` gives them.
    pub fn conflicts(
        &self,
        space: &str,
        query: ConflictsParams,
    ) -> Result<ConflictPage, WebActorError> {
        let status = query.status_filter()?;
        let limit = page_limit(query.limit, self.max_list_limit)?;
        let mut conflicts = Vec::new();
        let mut after = query.after;
        // Collection filtering happens after the storage page, so pages may come up short.
        while conflicts.len() < limit {
            let page = self
                .shared
                .store
                .conflicts(space, status, after.as_deref(), limit)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            let last_page = page.len() < limit;
            conflicts.extend(
                page.into_iter()
                    .filter(|c| query.collection.as_ref().is_none_or(|q| *q == c.collection))
                    .take(limit - conflicts.len()),
            );
            if last_page {
                break;
            }
        }
        let next = (conflicts.len() == limit)
            .then(|| conflicts.last().map(|c| c.id.clone()))
            .flatten();
        Ok(ConflictPage { conflicts, next })
    }

    /// One conflict, as a device's `conflicts.get` gives it.
    pub fn conflict(&self, space: &str, id: &str) -> Result<Conflict, WebActorError> {
        self.shared
            .store
            .conflict(space, id)?
            .ok_or_else(|| StoreError::ConflictNotFound(id.to_owned()).into())
    }

    /// Resolves an open conflict as the web actor: writes what `take` keeps as the resolution
    /// change devices recognise (see `Store::resolve_conflict`) and appends it; the answer shows
    /// the conflict as the log now has it, resolved, as every device will once it syncs.
    pub fn resolve(
        &self,
        space: &str,
        id: &str,
        take: Take,
        data: Option<Fields>,
        now: u64,
    ) -> Result<Resolved, WebActorError> {
        let actor = self.space(space)?;
        let _busy = lock(&actor.busy);
        let conflict = self.conflict(space, id)?;
        check_resolution(&conflict, take, data.as_ref(), &self.options.limits)?;
        let policy = self.options.policies.of(&conflict.collection);
        if let Some(field) = data
            .iter()
            .flat_map(|d| d.keys())
            .find(|f| policy.encrypted.contains(*f))
        {
            return Err(ApiError::invalid_params(format!(
                "field {field:?} of {} is encrypted with the account key, which the relay does \
                 not have: resolve this conflict from a device",
                conflict.collection
            ))
            .into());
        }
        let mut working = Working {
            actors: self,
            space,
            actor: &actor.actor,
            records: HashMap::new(),
        };
        let targets = resolution_targets(&conflict, take, data, |record| {
            let record = working.record(&conflict.collection, record)?;
            Ok::<_, WebActorError>(resolve::view(record, policy))
        })?;
        let mut uploads = Vec::new();
        let mut writes = Vec::new();
        for target in targets {
            let record = working.record(&conflict.collection, &target.record)?;
            let Some(written) = write_resolution(record, &target, id, take, now)? else {
                continue;
            };
            writes.push(Written {
                collection: conflict.collection.clone(),
                id: target.record.clone(),
                version: version_of(record),
            });
            uploads.push(UploadChange {
                entry: uploads.len() as u64,
                collection: conflict.collection.clone(),
                record: target.record,
                change: written.change.raw_bytes().to_vec(),
            });
        }
        let results = self.append(space, &actor.id, &uploads, now)?;
        if let Some(ChangeOutcome::Rejected { message, .. }) = results
            .iter()
            .find(|r| matches!(r, ChangeOutcome::Rejected { .. }))
        {
            return Err(ApiError::new(
                code::INTERNAL,
                format!("the log refused the resolution ({message})"),
            )
            .into());
        }
        let conflict = self.conflict(space, id)?;
        Ok(Resolved { conflict, writes })
    }
}

/// One write, checked and built.
enum Built {
    /// A change to append, with the record's version after it.
    Change(UploadChange, String),
    /// The record already holds what the write asks for: its version.
    Unchanged(String),
    Refused(WriteOutcome),
}

/// A random device id for a new web actor, in the form device ids take (hex).
pub(crate) fn new_actor_id(now_ms: u64) -> String {
    let mut bytes = [0u8; 16];
    // Without OS randomness the id still only has to differ from the space's devices' ids,
    // which are key hashes; the time makes that so.
    if getrandom::fill(&mut bytes).is_err() {
        for (byte, time) in bytes.iter_mut().zip(now_ms.to_be_bytes()) {
            *byte = time;
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every holder leaves the data whole before anything can panic.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
