//! The `records` table's materializer (PostgreSQL storage only): it follows each space's log and
//! keeps one row per record as devices show it, so that a backend reads the central data with
//! SQL (writes still go through the HTTP API).
//!
//! Owns: what a row holds (the record's view under its collection's policy, `resolve::view`,
//! with encrypted fields as the envelopes the relay stores; deleted; the seq of the last entry
//! that touched it; the time of its latest change), computed from the record's base and tail as
//! of the step's last entry, and the loop that moves each space's materialized position on: one
//! bounded step at a time, rows and position in one transaction (`PgStorage::commit_records`),
//! so the table is never ahead of or behind the position it records. Relays on one database share
//! the spaces through a lease per space (`PgStorage::lease_records`); a step committed on a
//! position another relay moved is refused whole. Purged records lose their row.
//! Must not touch: the log, documents or anything a device reads; it runs on a storage of its own
//! (its own connections and threads), woken by the same notifications as pushes, so uploads never
//! wait for it.

use std::sync::Arc;
use std::time::Duration;

use automerge::ActorId;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

use super::created::CreatedRows;
use super::metrics::RelayMetrics;
use super::storage::pg::{RecordRow, RecordsBatch, RecordsCommit, RecordsLag, StoredRecord};
use super::storage::{LogStorage, PgStorage, RecordKey, StorageError, StorageNews};
use super::store::assemble;
use crate::record::{Fields, PlainFirst, Record, RecordError, decode_change};
use crate::resolve::{self, Policies};

/// How recently a relay must have appended to a space to materialize it without deferring.
const APPENDED_LATELY: Duration = Duration::from_secs(10);

/// The materializer's listening connection's `application_name`.
pub const LISTENER_NAME: &str = "ferry records materializer";

#[derive(Debug, thiserror::Error)]
pub enum MaterializerError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "{collection}/{record} of space {space:?} cannot be loaded to materialize it: {source}"
    )]
    Record {
        space: String,
        collection: String,
        record: String,
        source: Box<RecordError>,
    },
    #[error("the fields of {collection}/{record} cannot be written as JSON: {detail}")]
    Json {
        collection: String,
        record: String,
        detail: String,
    },
}

#[derive(Debug, Clone)]
pub struct MaterializerOptions {
    /// Most log entries one step (one transaction) covers.
    pub batch_entries: usize,
    /// How long a space stays this relay's after its last step, unless released.
    pub lease: Duration,
    /// How often every space's lag is read even when no commit was heard: leases other relays
    /// let run out, and commits missed while not hearing.
    pub poll: Duration,
    /// How far behind (in time) a space may fall before a relay that has not appended to it
    /// lately materializes it (`CreatedRows::appended_here`): until then the relay that
    /// appended, holding the created records' rows, does it, cheaper.
    pub defer: Duration,
}

impl Default for MaterializerOptions {
    fn default() -> Self {
        MaterializerOptions {
            batch_entries: 1000,
            lease: Duration::from_secs(10),
            poll: Duration::from_secs(1),
            defer: Duration::from_secs(1),
        }
    }
}

pub struct Materializer {
    storage: Arc<PgStorage>,
    policies: Policies,
    /// This relay's name in the leases: random, so that two relays never share one.
    name: String,
    metrics: Arc<RelayMetrics>,
    options: MaterializerOptions,
    /// Documents are only read here; changes are never made under it.
    actor: ActorId,
    /// Rows of records this relay's appends created, handed over instead of read back.
    created: Arc<CreatedRows>,
}

impl Materializer {
    pub fn new(
        storage: Arc<PgStorage>,
        policies: Policies,
        metrics: Arc<RelayMetrics>,
        options: MaterializerOptions,
    ) -> Self {
        let mut random = [0u8; 8];
        // Without the OS's entropy, the process id and the time still tell relays apart.
        if getrandom::fill(&mut random).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            random = (u64::from(std::process::id()) << 32 | u64::from(nanos)).to_be_bytes();
        }
        let name = format!("relay-{:016x}", u64::from_be_bytes(random));
        Materializer {
            storage,
            policies,
            name,
            metrics,
            options,
            actor: ActorId::from(&[0u8; 16][..]),
            created: Arc::new(CreatedRows::with_budget(0)),
        }
    }

    /// Takes the rows of records this relay's appends created from `created` (see
    /// `CreatedRows`) rather than reading and decoding their bases.
    pub fn taking_created_from(mut self, created: Arc<CreatedRows>) -> Self {
        self.created = created;
        self
    }

    /// One pass: reads every space's lag (published in the metrics) and catches up each space
    /// that is behind and not leased by another relay, until `stopped`. Returns the lag read.
    pub fn pass(&self, stopped: &watch::Receiver<bool>) -> Result<Vec<RecordsLag>, StorageError> {
        let lag = self.storage.records_lag()?;
        self.metrics.records_lag(
            lag.iter()
                .map(RecordsLag::entries_behind)
                .max()
                .unwrap_or(0),
            lag.iter().map(|l| l.seconds_behind).fold(0.0, f64::max),
        );
        // Rows of entries `records` holds (another relay's steps included) are not needed.
        for space in &lag {
            self.created
                .forget_through(&space.space, space.materialized);
        }
        for behind in lag.iter().filter(|l| l.entries_behind() > 0) {
            if *stopped.borrow() {
                break;
            }
            // A space this relay does not append to is left, while it is not much behind, to
            // the relay that does and holds its created records' rows: that one writes them
            // without reading anything back. Past `defer`, whichever relay is free takes it; a
            // relay appending to the space never waits.
            if behind.seconds_behind < self.options.defer.as_secs_f64()
                && !self.created.appended_here(&behind.space, APPENDED_LATELY)
            {
                continue;
            }
            if let Err(e) = self.catch_up(&behind.space, stopped) {
                tracing::warn!(space = behind.space, error = %e,
                    "the records table cannot follow the space's log: tried again shortly");
            }
        }
        Ok(lag)
    }

    /// Materializes the space up to its head, one step at a time, if its lease is free or this
    /// relay's; gives the lease up once caught up. Returns the position reached, `None` when
    /// another relay holds the space.
    pub fn catch_up(
        &self,
        space: &str,
        stopped: &watch::Receiver<bool>,
    ) -> Result<Option<u64>, MaterializerError> {
        let lease = self.options.lease;
        let Some(mut position) = self.storage.lease_records(space, &self.name, lease)? else {
            return Ok(None);
        };
        while !*stopped.borrow() {
            let created = self.created.clone();
            let owned = space.to_owned();
            let Some(batch) = self.storage.records_batch(
                space,
                position,
                self.options.batch_entries,
                move |seq, key| created.holds(&owned, seq, key),
            )?
            else {
                self.storage.release_records(space, &self.name)?;
                break;
            };
            let Some(step) = self.step(space, position, batch) else {
                // A row said to be kept was not: the step is read again, from storage.
                return Ok(Some(position));
            };
            let through = step.through;
            let committed = self
                .storage
                .commit_records(space, &self.name, lease, step)?;
            self.created.forget_through(space, through);
            if !committed {
                return Ok(None);
            }
            position = through;
        }
        Ok(Some(position))
    }

    /// The rows a batch brings: each record it touches as it stood at the batch's last entry.
    /// A record whose document cannot be read keeps the row it had: one damaged record must not
    /// hold the rest of the space back (`ferry relay rebuild-record` repairs it, and its next
    /// change writes its row). `None` when a row `CreatedRows` held for the step is gone.
    fn step(&self, space: &str, after: u64, batch: RecordsBatch) -> Option<RecordsCommit> {
        let mut step = RecordsCommit {
            after,
            through: batch.through,
            whole: batch.whole,
            ..RecordsCommit::default()
        };
        for (key, seq) in batch.known {
            // The entry at `seq` created the record and is its last of the step: the record,
            // as of the step's last entry, is that one change, which the row kept shows.
            let created = self.created.take(space, seq, &key)?;
            step.rows.push(RecordRow {
                key: created.key,
                fields: created.fields,
                deleted: created.deleted,
                updated_ms: created.updated_ms,
                log_position: seq,
            });
        }
        for record in batch.records {
            let key = record.key.clone();
            match self.row(space, record, batch.through) {
                Ok(Some(row)) => step.rows.push(row),
                Ok(None) => step.removed.push(key),
                Err(e) => tracing::warn!(space, error = %e,
                    "a record's row in the records table is left as it was"),
            }
        }
        Some(step)
    }

    /// The record's row as of `at`; `None` when the space held no such record then, or holds it
    /// no more (purged).
    fn row(
        &self,
        space: &str,
        record: StoredRecord,
        at: u64,
    ) -> Result<Option<RecordRow>, MaterializerError> {
        let StoredRecord {
            key,
            base,
            tail,
            seqs,
            one_change_seq,
        } = record;
        let (collection, id) = &key;
        let failed = |source| MaterializerError::Record {
            space: space.to_owned(),
            collection: collection.clone(),
            record: id.clone(),
            source: Box::new(source),
        };
        let Some(base) = base else {
            return Ok(None);
        };
        // The seq a change was logged at, if by `at`; a record's only change has `one_change_seq`.
        let logged_by_then = |hash: &automerge::ChangeHash| {
            seqs.get(&hash.0)
                .copied()
                .or(one_change_seq)
                .filter(|&seq| seq <= at)
        };
        if tail.is_empty()
            && (seqs.len() == 1 || one_change_seq.is_some())
            && let Ok(change) = decode_change(&base)
            && let Some(plain) = PlainFirst::of(&change)
        {
            // A record created by one plain change (the bulk of an initial sync) shows that
            // change's fields, as a device takes it, without loading a document.
            let Some(log_position) = logged_by_then(&change.hash()) else {
                return Ok(None);
            };
            return Ok(Some(RecordRow {
                fields: json_text(&plain.fields, &key)?,
                key,
                deleted: plain.deleted,
                updated_ms: change.timestamp(),
                log_position,
            }));
        }
        let mut doc =
            assemble(&base, tail, &self.actor, (space, collection, id)).map_err(failed)?;
        // The log holds every change after the changes it depends on, so a document whose
        // heads were all logged by `at` holds nothing logged later.
        if !doc.heads().iter().all(|h| logged_by_then(h).is_some()) {
            let earlier: Vec<Vec<u8>> = doc
                .changes_after(&[])
                .map_err(failed)?
                .iter()
                .filter(|c| logged_by_then(&c.hash()).is_some())
                .map(|c| c.raw_bytes().to_vec())
                .collect();
            let mut then = Record::new(&self.actor);
            then.apply_changes(&earlier).map_err(failed)?;
            doc = then;
        }
        let heads = doc.heads();
        let Some(log_position) = heads.iter().filter_map(logged_by_then).max() else {
            return Ok(None);
        };
        let view = resolve::view(&mut doc, self.policies.of(collection));
        if !view.exists {
            return Ok(None);
        }
        let automerge = doc.automerge();
        let updated_ms = heads
            .iter()
            .filter_map(|h| automerge.get_change_meta_by_hash(h))
            .map(|meta| meta.timestamp)
            .max()
            .unwrap_or(0);
        Ok(Some(RecordRow {
            fields: json_text(&view.fields, &key)?,
            key,
            deleted: view.deleted,
            updated_ms,
            log_position,
        }))
    }
}

/// A row's fields as JSON text.
fn json_text(
    fields: &Fields,
    (collection, record): &RecordKey,
) -> Result<String, MaterializerError> {
    serde_json::to_string(fields).map_err(|e| MaterializerError::Json {
        collection: collection.clone(),
        record: record.clone(),
        detail: e.to_string(),
    })
}

/// Runs passes until `stopped`: one as soon as a commit is heard (those heard meanwhile are
/// taken together), and one every `poll` whatever is heard.
pub async fn run(
    materializer: Arc<Materializer>,
    mut heard: UnboundedReceiver<StorageNews>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut poll = tokio::time::interval(materializer.options.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hearing = true;
    loop {
        tokio::select! {
            changed = stopped.changed() => {
                if changed.is_err() || *stopped.borrow() {
                    return;
                }
            }
            news = heard.recv(), if hearing => {
                if news.is_none() {
                    hearing = false;
                }
                while heard.try_recv().is_ok() {}
            }
            _ = poll.tick() => {}
        }
        let (this, stop) = (materializer.clone(), stopped.clone());
        match tokio::task::spawn_blocking(move || this.pass(&stop)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e,
                "cannot read how far the records table is: tried again shortly"),
            Err(e) => tracing::error!(error = %e, "a records materializer pass stopped abnormally"),
        }
    }
}

/// Starts following the database with `storage` (a connection of its own) and returns what it
/// hears, for `run`.
pub fn follow(storage: &PgStorage) -> UnboundedReceiver<StorageNews> {
    let (news, heard) = tokio::sync::mpsc::unbounded_channel();
    storage.follow(news);
    heard
}
