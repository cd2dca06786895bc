//! The relay's storage boundary: everything the relay keeps goes through [`RelayStorage`] (the
//! change logs and documents through [`LogStorage`], accounts through [`AccountStorage`]), so
//! that another engine, such as a database several relays share, can sit beside the embedded
//! one without touching the relay's logic.
//!
//! Owns: the traits, the types that cross them, and their error. `kv.rs` is the embedded engine
//! over the ordered-KV trait (sled on disk, or in memory), in the key layout existing data
//! directories hold. `tests/relay_storage.rs` is the conformance suite every engine must pass.
//! Must not touch: validation, Automerge, conflict detection, tokens or caches: `relay::store` and
//! `relay::accounts` decide, storage keeps what they decided and answers their reads.
//!
//! Writes are commits: an [`Append`] to one space's log, or a list of [`AccountWrite`]s, lands
//! whole or not at all and is durable when the call returns `Ok`. An append states the head it
//! was staged against; an engine refuses it with [`StorageError::HeadMoved`] if the log moved on
//! meanwhile (another relay appended), so that the change is staged again on what is logged.
//! Counters are kept by the engine as sums: an append carries the conflicts it found, and the
//! engine adds those and its entries' bytes (the space's quota) to what is stored, so commits
//! made by several relays add up.

pub mod kv;
pub(crate) mod log_blocks;
pub mod pg;

use std::collections::HashMap;

use crate::auth::token::Family;
use crate::record::chunk_hash_bytes;
use crate::resolve::{Conflict, ConflictKind};
use crate::store::kv::KvError;
use ferry_proto::wire::{LogEntry, RecordName};
use serde::{Deserialize, Serialize};

pub use kv::KvStorage;
pub use pg::PgStorage;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The engine failed: a full disk, I/O, or damage the engine found itself.
    #[error(transparent)]
    Engine(KvError),
    /// A stored value failed its checksum: it is never read as good, so never served.
    #[error(
        "the relay's stored {what} of space {space:?} ({position}) is damaged: its checksum \
         does not match, so it is not served; {}",
        repair_advice(space, record.as_ref())
    )]
    Damaged {
        what: &'static str,
        space: String,
        position: String,
        /// The record the value belongs to, when it belongs to one (its document, tail, heads,
        /// change index or conflict index), which `ferry relay rebuild-record` rebuilds.
        record: Option<RecordKey>,
    },
    #[error("stored {what} cannot be decoded ({detail}): the relay's store is damaged")]
    Corrupt { what: &'static str, detail: String },
    #[error(
        "{what} cannot be encoded ({detail}): nothing was written; please report this as a bug"
    )]
    Encode { what: &'static str, detail: String },
    #[error(
        "the space's log moved on to seq {head} while an append was staged against seq {staged}: \
         stage it again"
    )]
    HeadMoved { staged: u64, head: u64 },
    #[error(
        "the log cannot be compacted through seq {horizon}: {record:?}'s base does not hold its \
         change at seq {seq} yet (save the record's document as its base first)"
    )]
    Uncovered {
        horizon: u64,
        record: RecordKey,
        seq: u64,
    },
    #[error("account {0:?} already exists")]
    AccountExists(String),
    #[error("the enrolment code was already used")]
    EnrolmentUsed,
    /// The database could not be reached (the PostgreSQL engine).
    #[error(
        "cannot reach the relay's PostgreSQL database ({detail}): check that it is running and \
         that relay.postgres_url names it; nothing was written"
    )]
    Unreachable { detail: String },
    /// The database refused a statement (the PostgreSQL engine).
    #[error(
        "the relay's PostgreSQL database refused a statement ({detail}): nothing was written; \
         see the database's log"
    )]
    Database { detail: String },
    /// The database's schema was migrated by a newer relay than this one.
    #[error(
        "the database's schema is at version {found}, newer than this ferry binary knows \
         ({known}): upgrade ferry on this machine to the version that migrated it"
    )]
    SchemaTooNew { found: i32, known: i32 },
    /// The embedded store's layout was written by a newer relay than this one.
    #[error(
        "the relay's store is in layout {found:?}, which this ferry binary cannot read (it reads \
         layouts up to {known:?}): it was written by a newer ferry; run that version or a newer one"
    )]
    LayoutTooNew { found: String, known: String },
}

/// What an operator does about a damaged value: a record's is rebuilt from the log.
fn repair_advice(space: &str, record: Option<&RecordKey>) -> String {
    match record {
        Some((collection, record)) => format!(
            "`ferry relay rebuild-record --space {space} --collection {collection} --record \
             {record}` rebuilds the record from the log, or restore the relay's data directory \
             from a backup"
        ),
        None => "restore the relay's data directory from a backup".to_owned(),
    }
}

impl From<KvError> for StorageError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Damaged(key) => kv::damaged(&key),
            other => StorageError::Engine(other),
        }
    }
}

/// A record within a space: (collection, record id).
pub type RecordKey = (String, String);

/// A change as the relay identifies it: the record it belongs to and its hash (two records may
/// hold byte-identical changes).
pub type ChangeKey = (String, String, [u8; 32]);

/// The unique values a record holds, per constraint (its index in the collection's list).
pub type UniqueValues = Vec<(usize, Vec<serde_json::Value>)>;

/// One value of a unique constraint of a collection, and the records holding it.
pub use crate::resolve::ledger::{Holders, ValueKey as UniqueValue};

/// A change as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChange {
    pub collection: String,
    pub record: String,
    /// The uploading device.
    pub origin: String,
    /// Its Automerge hash, the key of the per-record dedup index.
    pub hash: [u8; 32],
    pub change: Vec<u8>,
}

/// A record whose document is saved as a new base, with the tail seqs that base now holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compaction {
    pub record: RecordKey,
    pub base: Vec<u8>,
    pub tail: Vec<u64>,
}

/// A record a logged change left deleted, noted at that change's seq so that it can be purged
/// once `tombstone_days` old (PROTOCOL.md, section 5.8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub seq: u64,
    pub collection: String,
    pub record: String,
    /// The record's logged heads after that change: once they moved on, the note is stale.
    pub heads: Vec<[u8; 32]>,
    /// When the relay logged it (its clock).
    pub time_ms: u64,
}

/// Conflicts of one kind found in one collection of a space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayConflictCount {
    pub kind: ConflictKind,
    pub collection: String,
    pub detected: u64,
}

/// One atomic append to a space's log: the entries, numbered from `after + 1` on, and everything
/// that moves with them.
#[derive(Debug, Default)]
pub struct Append {
    /// The head the append was staged against.
    pub after: u64,
    /// The new entries; the first is at seq `after + 1`, each next one seq after.
    pub entries: Vec<LoggedChange>,
    /// Records this append creates, with their base: their first change, as it is.
    pub created: HashMap<RecordKey, Vec<u8>>,
    /// Changes appended to existing records since their base: (record, seq).
    pub tails: Vec<(RecordKey, u64)>,
    /// Documents saved as new bases (after `created`, whose bases they replace).
    pub compactions: Vec<Compaction>,
    /// Records' logged heads after this append, sorted.
    pub heads: HashMap<RecordKey, Vec<[u8; 32]>>,
    /// Unique values whose holders change, with all their holders now, in the order they took
    /// the value, and the open clashes over it (no records: the value is free).
    pub holders: HashMap<UniqueValue, Holders>,
    /// Records whose unique values change, with the values they hold now.
    pub held: HashMap<RecordKey, UniqueValues>,
    /// Conflicts found, to add to the space's counts.
    pub conflicts: Vec<(ConflictKind, String, u64)>,
    /// Conflict entries found or changed, as they stand now (an open one is listed as open).
    pub conflict_entries: Vec<Conflict>,
    /// Changes (hex hash) that brought a conflict, with its id.
    pub conflict_changes: Vec<(String, String)>,
    /// The space's conflict entries and unique index cover its whole log from here on (its
    /// first append, or a rebuild from the log).
    pub conflicts_complete: bool,
    /// Records this append's changes leave deleted, noted for purging.
    pub tombstones: Vec<Tombstone>,
    /// Tombstone notes (by seq) done with: their record purged, or changed since.
    pub tombstones_done: Vec<u64>,
    /// Records whose history this append's purge entries end, each with its entry's seq: their
    /// base, tail, logged heads, unique values and conflict entries are dropped, and a purge
    /// marker keeps the entry's seq (`purged_at`). Their dedup index stays, as compaction keeps
    /// it.
    pub purged: Vec<(RecordKey, u64)>,
    /// Records whose history this append's flatten entries start again (PROTOCOL.md, section
    /// 5.8). Their base is their flatten change (in `created`); the tail of the history it
    /// replaces is dropped and a marker keeps the entry's seq (`purged_at`), so that a change
    /// built on that history is refused. Conflict entries, unique values and the dedup index
    /// stay.
    pub flattened: Vec<Flattened>,
}

/// A record whose history a flatten entry starts again: the entry's seq and the tail seqs of
/// the history it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flattened {
    pub record: RecordKey,
    pub seq: u64,
    pub tail: Vec<u64>,
}

impl Append {
    pub fn new(after: u64) -> Self {
        Append {
            after,
            ..Append::default()
        }
    }

    /// The seq the next entry gets.
    pub fn next_seq(&self) -> u64 {
        self.after
            .saturating_add(self.entries.len() as u64)
            .saturating_add(1)
    }

    /// The change this append logs at `seq`, if it logs one there.
    pub fn change_at(&self, seq: u64) -> Option<&[u8]> {
        let index = usize::try_from(seq.checked_sub(self.after)?.checked_sub(1)?).ok()?;
        self.entries.get(index).map(|e| e.change.as_slice())
    }

    /// Nothing to write: no entry, compaction or conflict state.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.compactions.is_empty()
            && self.conflict_entries.is_empty()
            && self.holders.is_empty()
            && self.held.is_empty()
            && !self.conflicts_complete
            && self.tombstones.is_empty()
            && self.tombstones_done.is_empty()
    }
}

/// A step of a space's log compaction (PROTOCOL.md, section 5.8), one commit: records' documents
/// saved as their bases, then the log entries up to `horizon` dropped, their dedup index kept.
#[derive(Debug, Default)]
pub struct LogCompaction {
    /// The head the step was staged against (bases are read as of it).
    pub after: u64,
    /// Records whose document is saved as their new base, with the tail seqs it now holds.
    pub bases: Vec<Compaction>,
    /// Drop the log entries up to this seq (no higher than `after`); a horizon at or below the
    /// space's current one drops nothing.
    pub horizon: u64,
    /// `(time_ms, head)`: the log's head at that time, kept so that a later horizon can be
    /// found by age (`keep_log_days`); marks at or below the new horizon are dropped.
    pub mark: Option<(u64, u64)>,
}

/// What a relay hears of commits to storage other relays share (`LogStorage::follow`), as they
/// land: those it made itself included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageNews {
    /// Hearing commits (again): those made while not hearing them were missed, so the heads of
    /// the spaces the relay serves are read once.
    Listening,
    /// Not hearing commits (the database is out of reach): until `Listening` comes back, the
    /// heads of the spaces the relay serves are polled.
    Deaf,
    /// A space's log was appended to, up to `head`.
    Head { space: String, head: u64 },
    /// A device's record was written (registered, signed in, revoked) or removed.
    Device(String),
    /// A token family was revoked (a refresh token used twice).
    FamilyRevoked(String),
    /// The token signing keys changed (a rotation).
    SigningKeys,
}

/// A space's change logs, records' documents (base + tail), logged heads, unique-value index,
/// conflict counts and log bytes.
pub trait LogStorage: Send + Sync {
    /// Whether other relays may append to the same logs (a database they share): the relay
    /// store then checks a space's head before trusting a document it cached. The embedded
    /// engine is one process's own, so nothing is checked.
    fn shared(&self) -> bool {
        false
    }

    /// Keeps other relays from committing appends to the space until `release_space`: for a
    /// relay whose append lost to theirs several times in a row (staged against a head that
    /// moved before it committed), so that its next staging is the one that commits. Appends
    /// through this storage go on meanwhile. `false` when no other relay writes to this engine
    /// (nothing to hold).
    fn hold_space(&self, space: &str) -> Result<bool, StorageError> {
        let _ = space;
        Ok(false)
    }

    /// Lets other relays commit to the space again, after `hold_space`.
    fn release_space(&self, space: &str) {
        let _ = space;
    }

    /// Sends `news` what other relays commit (and this one), as it lands, until `news` is
    /// closed, reconnecting by itself; `false` when no other relay writes to this engine.
    fn follow(&self, news: tokio::sync::mpsc::UnboundedSender<StorageNews>) -> bool {
        drop(news);
        false
    }

    /// The last seq of the space's log (0 when empty).
    fn head(&self, space: &str) -> Result<u64, StorageError>;

    /// Commits `append` atomically and durably, or refuses it whole: with `HeadMoved` when the
    /// space's head is no longer `append.after`. When the commit landed but could not be made
    /// durable the error is the engine's, and the entries are visible all the same: the next
    /// append numbers after them.
    fn append(&self, space: &str, append: Append) -> Result<(), StorageError>;

    /// Makes everything the engine holds durable (commits already are when they return).
    fn flush(&self) -> Result<(), StorageError>;

    /// The seq at which the record's change `hash` was logged, if it was. Per record: two
    /// records may hold byte-identical changes.
    fn change_seq(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        hash: &[u8; 32],
    ) -> Result<Option<u64>, StorageError>;

    /// `change_seq` for many changes at once (an upload's hashes and their dependencies): the
    /// seq of each one logged; those not logged are left out. An engine behind a network answers
    /// it in one round trip.
    fn change_seqs(
        &self,
        space: &str,
        changes: &[ChangeKey],
    ) -> Result<HashMap<ChangeKey, u64>, StorageError> {
        let mut logged = HashMap::new();
        for key in changes {
            let (collection, record, hash) = key;
            if let Some(seq) = self.change_seq(space, collection, record, hash)? {
                logged.insert(key.clone(), seq);
            }
        }
        Ok(logged)
    }

    /// Every change logged for the record, as the dedup index holds them: `(hash, seq)` in seq
    /// order, those compaction dropped from the log included (see `horizon`).
    fn record_changes(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Vec<([u8; 32], u64)>, StorageError>;

    /// The change bytes logged at `seq`.
    fn change_at(&self, space: &str, seq: u64) -> Result<Option<Vec<u8>>, StorageError>;

    /// Entries with seq > `after`, in order, up to `max_changes` (at least one) and `max_bytes`
    /// of change data (at least one entry, whatever its size).
    fn read_log(
        &self,
        space: &str,
        after: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogEntry>, StorageError>;

    /// The record's base (Automerge chunks: a saved document, or its first change); `None` when
    /// the space has no such record.
    fn base(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<Vec<u8>>, StorageError>;

    /// `base` of each of `records` that the space holds; those it does not hold are left out.
    /// An engine behind a network answers it in one round trip.
    fn bases_of(
        &self,
        space: &str,
        records: &[RecordKey],
    ) -> Result<HashMap<RecordKey, Vec<u8>>, StorageError> {
        let mut bases = HashMap::new();
        for key in records {
            let (collection, record) = key;
            if let Some(base) = self.base(space, collection, record)? {
                bases.insert(key.clone(), base);
            }
        }
        Ok(bases)
    }

    /// The hash of the record's base when that base is one change (its first, for a record
    /// with no change since it was created) rather than a saved document; `None` otherwise,
    /// and when the space has no such record.
    fn base_change_hash(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<[u8; 32]>, StorageError> {
        Ok(self
            .base(space, collection, record)?
            .as_deref()
            .and_then(chunk_hash_bytes))
    }

    /// Whether the space holds the record (it has a base), without reading the base.
    fn has_base(&self, space: &str, collection: &str, record: &str) -> Result<bool, StorageError> {
        Ok(self.base(space, collection, record)?.is_some())
    }

    /// The seqs of the record's changes logged since its base, in order.
    fn tail(&self, space: &str, collection: &str, record: &str) -> Result<Vec<u64>, StorageError>;

    /// `tail` of each of `records` that the space holds (`has_base`); those it does not hold are
    /// left out. An engine behind a network answers it in one round trip.
    fn tails_of(
        &self,
        space: &str,
        records: &[RecordKey],
    ) -> Result<HashMap<RecordKey, Vec<u64>>, StorageError> {
        let mut tails = HashMap::new();
        for key in records {
            let (collection, record) = key;
            if self.has_base(space, collection, record)? {
                tails.insert(key.clone(), self.tail(space, collection, record)?);
            }
        }
        Ok(tails)
    }

    /// The record's logged heads as last stored; `None` when none were stored (a record with
    /// one change, or logged before heads were kept).
    fn record_heads(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<Vec<[u8; 32]>>, StorageError>;

    /// The unique values the record holds, if any were stored.
    fn unique_values(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<UniqueValues>, StorageError>;

    /// The records holding `value`, in the order they took it, and the open clashes over it.
    fn unique_holders(&self, space: &str, value: &UniqueValue) -> Result<Holders, StorageError>;

    /// Up to `limit` values of the collection's unique constraint `constraint` that some record
    /// holds, in value order (bytes) after `after`, each with its holders: a page of the
    /// unique-value index a bootstrap reads.
    fn unique_holders_after(
        &self,
        space: &str,
        collection: &str,
        constraint: usize,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Holders)>, StorageError>;

    /// One of the space's conflict entries.
    fn conflict(&self, space: &str, id: &str) -> Result<Option<Conflict>, StorageError>;

    /// Up to `limit` of the space's conflict entries in id order after `after`; only open ones
    /// when `open_only`.
    fn conflicts(
        &self,
        space: &str,
        open_only: bool,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Conflict>, StorageError>;

    /// The conflict entries on one record (`Conflict::record`), in id order: what a snapshot
    /// sends with the record's document.
    fn record_conflicts(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Vec<Conflict>, StorageError>;

    /// `record_conflicts` of each of `records` that has any; the others are left out. An
    /// engine behind a network answers it in one round trip.
    fn conflicts_of(
        &self,
        space: &str,
        records: &[RecordKey],
    ) -> Result<HashMap<RecordKey, Vec<Conflict>>, StorageError> {
        let mut conflicts = HashMap::new();
        for key in records {
            let (collection, record) = key;
            let found = self.record_conflicts(space, collection, record)?;
            if !found.is_empty() {
                conflicts.insert(key.clone(), found);
            }
        }
        Ok(conflicts)
    }

    /// Whether the space's conflict entries, and their index by record (`record_conflicts`),
    /// cover its whole log (see `Append::conflicts_complete`): not for a log kept before the
    /// relay kept them, or before it indexed them by record, until it is rebuilt.
    fn conflicts_complete(&self, space: &str) -> Result<bool, StorageError>;

    /// The conflict the change (hex hash) brought, if it brought one.
    fn change_conflict(&self, space: &str, change: &str) -> Result<Option<String>, StorageError>;

    /// The actor the relay writes the space's HTTP changes under: the one kept, or, the first
    /// time, `candidate`, kept from then on (durably, before this returns).
    fn web_actor(&self, space: &str, candidate: &str) -> Result<String, StorageError>;

    /// The space's conflict counts, by kind and collection.
    fn conflict_counts(&self, space: &str) -> Result<Vec<RelayConflictCount>, StorageError>;

    /// Bytes of the space's log entries (the account's quota).
    fn log_bytes(&self, space: &str) -> Result<u64, StorageError>;

    /// The space's collections with their record counts, in name order.
    fn collections(&self, space: &str) -> Result<Vec<(String, u64)>, StorageError>;

    /// Up to `limit` record ids of a collection in id order, after `after`.
    fn records(
        &self,
        space: &str,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError>;

    /// Up to `limit` records of the space in (collection, id) order, after `after`.
    fn record_names(
        &self,
        space: &str,
        after: Option<&RecordName>,
        limit: usize,
    ) -> Result<Vec<RecordName>, StorageError>;

    /// Bytes the engine takes on disk.
    fn size_on_disk(&self) -> Result<u64, StorageError>;

    /// The space's compaction horizon: its log entries up to this seq are dropped (0: none).
    /// `read_log` and `change_at` no longer find them; `change_seq` still does.
    fn horizon(&self, space: &str) -> Result<u64, StorageError>;

    /// Up to `limit` records, in key order, that have a tail entry at or below `seq`: the
    /// records whose bases must be saved before the log can be compacted through `seq`.
    fn tails_through(
        &self,
        space: &str,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<RecordKey>, StorageError>;

    /// The space's time marks `(time_ms, head)`, oldest first (see `LogCompaction::mark`).
    fn time_marks(&self, space: &str) -> Result<Vec<(u64, u64)>, StorageError>;

    /// Commits a compaction step: refused whole with `HeadMoved` when the space's head is no
    /// longer `step.after`, and with `Uncovered` when, once `step.bases` are saved, a record's
    /// tail still names an entry at or below `step.horizon` (an entry is dropped only once a
    /// base holds it). The entries are dropped with their bytes taken off the space's quota
    /// (`log_bytes`); an engine may drop them after the horizon is committed, a part at a time,
    /// as long as a crash leaves only entries below the horizon behind, which a later step
    /// drops. Durable when it returns.
    fn compact_log(&self, space: &str, step: LogCompaction) -> Result<(), StorageError>;

    /// Up to `limit` of the space's tombstone notes, in seq order.
    fn tombstones(&self, space: &str, limit: usize) -> Result<Vec<Tombstone>, StorageError>;

    /// The seq of the purge entry that last ended the record's history, if one did.
    fn purged_at(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<u64>, StorageError>;

    /// Frees the disk that removed data still takes (log entries compacted away), for an engine
    /// whose files do not shrink as data is removed: it rewrites them when they hold much more
    /// than the live data. A pause for every other call while it runs; durable and atomic.
    /// Returns the bytes on disk before and after.
    fn reclaim_space(&self) -> Result<(u64, u64), StorageError>;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub name: String,
    pub created_ms: u64,
}

/// What kind of client a registered device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// A daemon: signs in with its ed25519 key on every connection.
    Device,
    /// A person or an HTTP-only client signed in with the account's password (`login`); it
    /// holds tokens only.
    Web,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device: String,
    pub account: String,
    pub kind: ClientKind,
    /// What the client called itself at login (web clients).
    pub label: String,
    pub public_key: [u8; 32],
    pub registered_ms: u64,
    pub revoked_ms: Option<u64>,
    /// When it last signed in with its key, a refresh token or an enrolment code (signing in
    /// with a still valid access token writes nothing).
    pub last_sign_in_ms: u64,
}

/// An enrolment code, kept under the SHA-256 of its secret (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentRecord {
    pub account: String,
    pub expires_ms: u64,
}

/// A token signing key, current or retired.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredKey {
    pub kid: String,
    pub seed: [u8; 32],
    pub created_s: u64,
    pub retired_s: Option<u64>,
}

/// One write of an account commit.
#[derive(Clone)]
pub enum AccountWrite {
    /// Refused (`AccountExists`) when the name is taken.
    CreateAccount(AccountRecord),
    Device(DeviceRecord),
    RemoveDevice(String),
    Enrolment {
        code_hash: [u8; 32],
        record: EnrolmentRecord,
    },
    /// Removes the code; refused (`EnrolmentUsed`) when it is gone, so a code is used once.
    ConsumeEnrolment([u8; 32]),
    Family(Family),
    RemoveFamily(String),
    SigningKey(StoredKey),
    RemoveSigningKey(String),
    /// The account's password as an Argon2id PHC string.
    Password {
        account: String,
        phc: String,
    },
}

/// Accounts, devices, enrolment codes, token families, signing keys and passwords.
pub trait AccountStorage: Send + Sync {
    fn account(&self, name: &str) -> Result<Option<AccountRecord>, StorageError>;
    /// Every account, in name order.
    fn accounts(&self) -> Result<Vec<AccountRecord>, StorageError>;
    /// Every registered device (revoked ones included), in id order.
    fn devices(&self) -> Result<Vec<DeviceRecord>, StorageError>;
    fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StorageError>;
    /// With storage several relays share, the TLS certificate and key (PEM) they all present:
    /// the first relay's `candidate` is kept and every relay gets it back, so one pinned
    /// fingerprint fits them all. An engine of one relay keeps none: the candidate is its own.
    fn shared_certificate(
        &self,
        candidate: (String, String),
    ) -> Result<(String, String), StorageError> {
        Ok(candidate)
    }
    fn enrolment(&self, code_hash: &[u8; 32]) -> Result<Option<EnrolmentRecord>, StorageError>;
    fn family(&self, id: &str) -> Result<Option<Family>, StorageError>;
    /// Every token family, in id order.
    fn families(&self) -> Result<Vec<Family>, StorageError>;
    /// Every signing key, in kid order.
    fn signing_keys(&self) -> Result<Vec<StoredKey>, StorageError>;
    /// The account's password as an Argon2id PHC string, if it has one.
    fn password(&self, account: &str) -> Result<Option<String>, StorageError>;
    /// Commits the writes in order, atomically and durably, or refuses them whole.
    fn write_accounts(&self, writes: Vec<AccountWrite>) -> Result<(), StorageError>;
}

/// Everything the relay keeps.
pub trait RelayStorage: LogStorage + AccountStorage {}

impl<T: LogStorage + AccountStorage> RelayStorage for T {}
