//! The conflict ledger: what changes, met in the relay's log order, do to the conflict entries,
//! the unique-value index and the conflict counters. A device runs it as it applies the log
//! (`store::conflicts`), the relay as it logs changes (`relay::store`): the same code over the
//! same order, so both keep the same entries under the same ids.
//!
//! Owns: the life of a conflict entry (found: auto-resolved by its strategy or open; resolved when
//! a resolution reaches the log, the later of two standing; a unique clash ended by an edit), the
//! unique index's moves (the records holding a value in the order they took it, and the open
//! clashes over it) and the counters. It reads the state it starts from through
//! [`ConflictState`] and hands back what changed; the caller writes that where it keeps it, in
//! the same commit as the changes that caused it, so a crash repeats a meeting but never half-does
//! it.
//!
//! Must not touch: storage, documents (the sides of a unique clash come from the caller), clocks.

use super::{Conflict, ConflictKind, ConflictStatus, Detection, Policy, Resolution, Side};
use super::{UniqueClash, conflict_id, differing_fields};
use automerge::ChangeHash;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A record: (collection, id).
pub type RecordKey = (String, String);

/// The values a record holds for its collection's unique constraints, by constraint index.
pub type HeldValues = Vec<(usize, Vec<Value>)>;

/// One value of one unique constraint, as the index keys it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueKey {
    pub collection: String,
    /// The constraint's index in the collection's list.
    pub constraint: usize,
    /// The constraint's field values as compact JSON (equal values give equal text).
    pub value: String,
}

/// The records holding one unique value, in the order they took it, and the open clashes over it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Holders {
    pub records: Vec<String>,
    /// (conflict id, the record that held the value first, the record that took it after).
    pub open: Vec<(String, String, String)>,
}

/// The counters kept per conflict kind and collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    Detected,
    AutoResolved,
    Queued,
    ResolvedManually,
}

impl Counter {
    pub const ALL: [Counter; 4] = [
        Counter::Detected,
        Counter::AutoResolved,
        Counter::Queued,
        Counter::ResolvedManually,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Counter::Detected => "detected",
            Counter::AutoResolved => "auto_resolved",
            Counter::Queued => "queued",
            Counter::ResolvedManually => "resolved_manually",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A unique value that cannot be written as JSON (serde_json refuses only non-string map keys,
/// which values read from a document never have).
#[derive(Debug, thiserror::Error)]
#[error("a unique value cannot be encoded: {0}")]
pub struct EncodeError(pub String);

/// The conflict state a ledger starts from, as its keeper has it stored.
pub trait ConflictState {
    type Error: From<EncodeError>;
    fn conflict(&self, id: &str) -> Result<Option<Conflict>, Self::Error>;
    /// The unique values the record holds (none when nothing is stored).
    fn held(&self, record: &RecordKey) -> Result<HeldValues, Self::Error>;
    fn holders(&self, value: &ValueKey) -> Result<Holders, Self::Error>;
}

/// Where a unique check is in the log, and under which policy.
pub struct UniqueCheck<'a> {
    pub key: &'a RecordKey,
    /// The change that gave the record its values, and its place in the log.
    pub change: ChangeHash,
    pub seq: u64,
    /// That change's time.
    pub time: i64,
    pub policy: &'a Policy,
}

/// What meetings have changed, loaded on first use: later meetings see what earlier ones did.
#[derive(Debug, Default)]
pub struct Ledger {
    conflicts: BTreeMap<String, Option<Conflict>>,
    /// Entries to write.
    dirty: BTreeSet<String>,
    /// Entries found here (the others were stored before).
    found: BTreeSet<String>,
    held: HashMap<RecordKey, HeldValues>,
    holders: BTreeMap<ValueKey, Holders>,
    counters: BTreeMap<(Counter, ConflictKind, String), u64>,
    /// Entries found or changed, in the order it happened, for subscribers.
    changed: Vec<Conflict>,
    opened: u64,
    closed: u64,
}

impl Ledger {
    /// Takes in what detection found for one change: the conflict it brings and the conflict it
    /// resolves, if any.
    pub fn meet<S: ConflictState>(
        &mut self,
        state: &S,
        detection: Detection,
    ) -> Result<(), S::Error> {
        if let Some(conflict) = detection.conflict {
            self.found(state, conflict)?;
        }
        if let Some((id, resolution)) = detection.resolves {
            self.resolved(state, &id, resolution)?;
        }
        Ok(())
    }

    fn load<S: ConflictState>(
        &mut self,
        state: &S,
        id: &str,
    ) -> Result<Option<Conflict>, S::Error> {
        if let Some(c) = self.conflicts.get(id) {
            return Ok(c.clone());
        }
        let conflict = state.conflict(id)?;
        self.conflicts.insert(id.to_owned(), conflict.clone());
        Ok(conflict)
    }

    fn put(&mut self, conflict: Conflict) {
        self.dirty.insert(conflict.id.clone());
        self.changed.push(conflict.clone());
        self.conflicts.insert(conflict.id.clone(), Some(conflict));
    }

    fn count(&mut self, counter: Counter, conflict: &Conflict) {
        *self
            .counters
            .entry((counter, conflict.kind, conflict.collection.clone()))
            .or_insert(0) += 1;
    }

    /// A new conflict: counted, open or settled by its strategy. One found before (the same
    /// changes met again after a crash) is left as it is.
    fn found<S: ConflictState>(&mut self, state: &S, conflict: Conflict) -> Result<(), S::Error> {
        if self.load(state, &conflict.id)?.is_some() {
            return Ok(());
        }
        self.count(Counter::Detected, &conflict);
        if conflict.status == ConflictStatus::Open {
            self.opened += 1;
            self.count(Counter::Queued, &conflict);
        } else {
            self.count(Counter::AutoResolved, &conflict);
        }
        self.found.insert(conflict.id.clone());
        self.put(conflict);
        Ok(())
    }

    /// A conflict entry as the relay holds it, taken from a snapshot instead of met in the log:
    /// kept as it stands and counted as meeting its changes would have (found; queued or
    /// settled; resolved). One already held is brought to the snapshot's state, keeping this
    /// device's own `resolving` note while it is still open.
    pub fn adopt<S: ConflictState>(
        &mut self,
        state: &S,
        mut conflict: Conflict,
    ) -> Result<(), S::Error> {
        let held = self.load(state, &conflict.id)?;
        let was_open = match &held {
            None => {
                self.count(Counter::Detected, &conflict);
                if conflict.status == ConflictStatus::AutoResolved {
                    self.count(Counter::AutoResolved, &conflict);
                } else {
                    self.count(Counter::Queued, &conflict);
                    self.opened += 1;
                }
                self.found.insert(conflict.id.clone());
                true
            }
            Some(held) => held.status == ConflictStatus::Open,
        };
        if conflict.status == ConflictStatus::Open {
            conflict.resolving = held.and_then(|h| h.resolving);
        } else if was_open && conflict.status == ConflictStatus::Resolved {
            self.count(Counter::ResolvedManually, &conflict);
            self.closed += 1;
        }
        self.put(conflict);
        Ok(())
    }

    /// A resolution of `id` reached the log: an open conflict is resolved; of two resolutions
    /// of one conflict the later one (change time, then device) stands.
    fn resolved<S: ConflictState>(
        &mut self,
        state: &S,
        id: &str,
        resolution: Resolution,
    ) -> Result<(), S::Error> {
        let Some(mut conflict) = self.load(state, id)? else {
            return Ok(());
        };
        let later = |old: &Resolution| {
            old.take.is_none() || (resolution.time, &resolution.device) > (old.time, &old.device)
        };
        match (&conflict.status, &conflict.resolution) {
            (ConflictStatus::Open, _) => {
                self.count(Counter::ResolvedManually, &conflict);
                self.closed += 1;
            }
            (ConflictStatus::Resolved, Some(old)) if later(old) => {}
            _ => return Ok(()),
        }
        conflict.status = ConflictStatus::Resolved;
        conflict.resolution = Some(resolution);
        conflict.resolving = None;
        self.put(conflict);
        Ok(())
    }

    /// Moves a record's unique values in the index to `values`, what its logged state now holds:
    /// a value another live record already holds is a clash (a conflict flagging this record,
    /// the later one; `side_of` gives a record's side as logged); a clash ends when either
    /// record stops holding the value. The holders of a value `known` names already count this
    /// change (a device took them from the relay's index as of a later head): only the record's
    /// own values move for it.
    pub fn move_unique<S: ConflictState>(
        &mut self,
        state: &S,
        at: UniqueCheck<'_>,
        values: HeldValues,
        known: impl Fn(&ValueKey) -> bool,
        mut side_of: impl FnMut(&str) -> Result<Side, S::Error>,
    ) -> Result<(), S::Error> {
        let key = at.key;
        let before = match self.held.get(key) {
            Some(held) => held.clone(),
            None => state.held(key)?,
        };
        if before == values {
            return Ok(());
        }
        for (constraint, value) in before.iter().filter(|v| !values.contains(v)) {
            let value_key = value_key(&key.0, *constraint, value)?;
            if known(&value_key) {
                continue;
            }
            let mut holders = self.holders_of(state, &value_key)?;
            holders.records.retain(|r| *r != key.1);
            let (ended, open): (Vec<_>, Vec<_>) = holders
                .open
                .drain(..)
                .partition(|(_, a, b)| *a == key.1 || *b == key.1);
            holders.open = open;
            for (id, _, _) in ended {
                self.end_clash(state, &id, at.time)?;
            }
            self.holders.insert(value_key, holders);
        }
        for (constraint, value) in values.iter().filter(|v| !before.contains(v)) {
            let value_key = value_key(&key.0, *constraint, value)?;
            if known(&value_key) {
                continue;
            }
            let mut holders = self.holders_of(state, &value_key)?;
            // `values` come from `resolve::unique_values` over this same policy, so every
            // constraint index is one of its constraints.
            if let Some(first) = holders.records.first().cloned()
                && let Some(fields) = at.policy.unique.get(*constraint)
            {
                let clash = UniqueClash {
                    fields: fields.clone(),
                    value: value.clone(),
                };
                let server = side_of(&first)?;
                let mut client = side_of(&key.1)?;
                // As for the other kinds, the client side names the change that brought it.
                client.changes = vec![at.change.to_string()];
                let conflict = unique_conflict(&at, &value_key, &first, clash, server, client);
                holders
                    .open
                    .push((conflict.id.clone(), first, key.1.clone()));
                self.found(state, conflict)?;
            }
            holders.records.push(key.1.clone());
            self.holders.insert(value_key, holders);
        }
        self.held.insert(key.clone(), values);
        Ok(())
    }

    fn holders_of<S: ConflictState>(
        &mut self,
        state: &S,
        value: &ValueKey,
    ) -> Result<Holders, S::Error> {
        match self.holders.get(value) {
            Some(h) => Ok(h.clone()),
            None => state.holders(value),
        }
    }

    /// A unique clash ended because one of its records no longer holds the value.
    fn end_clash<S: ConflictState>(
        &mut self,
        state: &S,
        id: &str,
        time: i64,
    ) -> Result<(), S::Error> {
        let Some(mut conflict) = self.load(state, id)? else {
            return Ok(());
        };
        if conflict.status != ConflictStatus::Open {
            return Ok(());
        }
        self.count(Counter::ResolvedManually, &conflict);
        self.closed += 1;
        conflict.status = ConflictStatus::Resolved;
        conflict.resolution = Some(Resolution {
            take: None,
            device: None,
            time,
            change: None,
        });
        conflict.resolving = None;
        self.put(conflict);
        Ok(())
    }

    /// The entries to write, as they stand now, with whether each was found here (so the change
    /// that brought it gets indexed).
    pub fn entries(&self) -> impl Iterator<Item = (&Conflict, bool)> {
        self.dirty.iter().filter_map(|id| {
            let conflict = self.conflicts.get(id)?.as_ref()?;
            Some((conflict, self.found.contains(id)))
        })
    }

    /// Records whose unique values moved, with the values they hold now.
    pub fn held(&self) -> impl Iterator<Item = (&RecordKey, &HeldValues)> {
        self.held.iter()
    }

    /// Values whose holders moved, with their holders now (none: the value is free).
    pub fn holders(&self) -> impl Iterator<Item = (&ValueKey, &Holders)> {
        self.holders.iter()
    }

    /// What to add to each counter.
    pub fn counters(&self) -> impl Iterator<Item = (Counter, ConflictKind, &str, u64)> {
        self.counters
            .iter()
            .map(|((counter, kind, collection), n)| (*counter, *kind, collection.as_str(), *n))
    }

    /// Conflicts opened and closed here.
    pub fn open_delta(&self) -> (u64, u64) {
        (self.opened, self.closed)
    }

    /// Entries found or changed, in the order it happened (one may appear more than once).
    pub fn into_changed(self) -> Vec<Conflict> {
        self.changed
    }
}

/// The index key of a unique value.
pub fn value_key(
    collection: &str,
    constraint: usize,
    value: &[Value],
) -> Result<ValueKey, EncodeError> {
    let value = serde_json::to_string(value).map_err(|e| EncodeError(e.to_string()))?;
    Ok(ValueKey {
        collection: collection.to_owned(),
        constraint,
        value,
    })
}

fn unique_conflict(
    at: &UniqueCheck<'_>,
    value: &ValueKey,
    first: &str,
    clash: UniqueClash,
    server: Side,
    client: Side,
) -> Conflict {
    let key = at.key;
    let constraint = clash.fields.join(",");
    Conflict {
        id: conflict_id(&[
            ConflictKind::Unique.as_str().as_bytes(),
            key.0.as_bytes(),
            constraint.as_bytes(),
            value.value.as_bytes(),
            first.as_bytes(),
            key.1.as_bytes(),
            // The same two records can clash again on the same value after a clash ended:
            // that is a new conflict.
            &at.seq.to_be_bytes(),
        ]),
        kind: ConflictKind::Unique,
        collection: key.0.clone(),
        record: key.1.clone(),
        strategy: at.policy.strategy,
        status: ConflictStatus::Open,
        seq: at.seq,
        fields: differing_fields(&server.fields, &client.fields),
        server,
        client,
        winner: None,
        unique: Some(clash),
        resolution: None,
        resolving: None,
    }
}
