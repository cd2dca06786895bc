//! Each record's materialized view: what its collection's policy shows (fields, whether it is
//! live, heads), kept under its `v` key beside the document and written in the same atomic batch
//! as every change to the document, so that `get`, `list` and `is_live` answer without loading
//! Automerge. Encrypted fields stay sealed in a view, as the document holds them, and are opened
//! at read time with the keyring: a view never holds plaintext its document holds sealed.
//!
//! A view names the policy it was computed under (`fingerprint`: strategy, delete rule, text
//! fields); one computed under another policy, or missing, is computed from the document when
//! read. An open rebuilds the views of a store made before views existed, or whose policies
//! changed, a page at a time (`mviews` marks how far it got, so an interrupted rebuild resumes).
//!
//! Owns: the `v` keys and their encoding, the rule that a batch which writes or removes a
//! document writes or removes its view (`Store::settle_views`, run by every batch that changes
//! documents), the rebuild at open, and comparing a view with its document (`doctor`).
//! Must not touch: what a change does to a document (the write and apply paths stage the view of
//! the record they hold; anything else is computed here from the document's bytes).

use super::kv::Batch;
use super::{CacheKey, FieldsText, NotFields, RecordView, Store, StoreError, keys};
use crate::crypt::{Keyring, SEALED_KEY};
use crate::record::{Fields, PlainFirst, Record};
use crate::resolve::{self, Policies, Policy};
use automerge::ChangeHash;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Bumped whenever what a view holds, or how it is computed, changes: every view is then
/// computed again at the next open.
const VIEW_FORMAT: &[u8] = b"view 1";

/// A record's view as stored. Fields are JSON text: postcard cannot carry `serde_json::Value`,
/// and JSON text is what every read turns them into anyway.
#[derive(Debug, Serialize, Deserialize)]
struct Stored<'a> {
    /// The `fingerprint` of the policy it was computed under.
    policy: u32,
    /// The record exists and is not deleted, as its policy shows it.
    live: bool,
    heads: Vec<[u8; 32]>,
    /// Encrypted fields sealed, as in the document.
    fields: &'a str,
}

/// Where an interrupted rebuild of the views stands (`keys::META_VIEWS`).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Progress {
    /// `policies_fingerprint` of the policies the views are being, or were, computed under.
    policies: u32,
    /// The last document key whose view is done; `None` once every view is.
    done_through: Option<Vec<u8>>,
}

/// FNV-1a, 32 bits: stable across builds and platforms, unlike the standard hasher.
fn fnv(parts: &[&[u8]]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for part in parts {
        // A separator after each part, so that ("ab", "c") and ("a", "bc") differ.
        for &byte in part.iter().chain(std::iter::once(&0xff_u8)) {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash
}

/// What a view computed under `policy` depends on, as a number: its strategy, delete rule and
/// text fields (encrypted fields are opened at read time and unique constraints show nothing).
pub(super) fn fingerprint(policy: &Policy) -> u32 {
    let delete_rule = format!("{:?}", policy.on_delete);
    let mut parts: Vec<&[u8]> = vec![
        VIEW_FORMAT,
        policy.strategy.as_str().as_bytes(),
        delete_rule.as_bytes(),
    ];
    parts.extend(policy.text.iter().map(|name| name.as_bytes()));
    fnv(&parts)
}

/// Every collection's policy fingerprint together: when it changes, views are checked at open.
fn policies_fingerprint(policies: &Policies) -> u32 {
    let default = fingerprint(&policies.default).to_be_bytes();
    let named: Vec<(Vec<u8>, [u8; 4])> = policies
        .collections
        .iter()
        .map(|(name, policy)| (name.clone().into_bytes(), fingerprint(policy).to_be_bytes()))
        .collect();
    let mut parts: Vec<&[u8]> = vec![&default];
    for (name, fp) in &named {
        parts.push(name);
        parts.push(fp);
    }
    fnv(&parts)
}

fn encode(
    policy: &Policy,
    live: bool,
    heads: &[ChangeHash],
    fields: &Fields,
) -> Result<Vec<u8>, StoreError> {
    let fields = serde_json::to_string(fields).map_err(|e| StoreError::Encode {
        what: "record view",
        detail: e.to_string(),
    })?;
    super::encode(
        &Stored {
            policy: fingerprint(policy),
            live,
            heads: heads.iter().map(|h| h.0).collect(),
            fields: &fields,
        },
        "record view",
    )
}

/// The view of `record` under `policy`, encoded.
pub(super) fn of_record(record: &mut Record, policy: &Policy) -> Result<Vec<u8>, StoreError> {
    let shown = resolve::view(record, policy);
    encode(policy, shown.is_live(), &record.heads(), &shown.fields)
}

/// The view of a record whose document is the plain first change `hash`: what it sets, under
/// any policy (one change meets no other).
pub(super) fn of_plain_first(
    plain: &PlainFirst,
    hash: ChangeHash,
    policy: &Policy,
) -> Result<Vec<u8>, StoreError> {
    encode(policy, !plain.deleted, &[hash], &plain.fields)
}

/// The view of a new live record whose document is the first change `hash`, which set `fields`.
pub(super) fn of_new_record(
    fields: &Fields,
    hash: ChangeHash,
    policy: &Policy,
) -> Result<Vec<u8>, StoreError> {
    encode(policy, true, &[hash], fields)
}

/// The fields' text and the heads a stored view holds; `None` when `bytes` are not a view.
pub(super) fn fields_and_heads(bytes: &[u8]) -> Option<(&str, Vec<[u8; 32]>)> {
    let stored = decode(bytes).ok()?;
    Some((stored.fields, stored.heads))
}

/// Borrows the fields' text from `bytes` rather than copying it.
fn decode(bytes: &[u8]) -> Result<Stored<'_>, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Decode {
        what: "record view",
        detail: e.to_string(),
    })
}

/// The answer a read gives from a view; `None` for a record that is not live.
fn answer(
    collection: &str,
    id: &str,
    stored: &Stored<'_>,
    keyring: &Keyring,
    strict: bool,
) -> Result<Option<RecordView>, StoreError> {
    if !stored.live {
        return Ok(None);
    }
    let damaged = |e: NotFields| StoreError::Decode {
        what: "record view",
        detail: e.to_string(),
    };
    let fields = if stored.fields.contains(SEALED_KEY) {
        // Sealed values are opened in the answer: the view keeps them as the document does.
        let mut fields = FieldsText::from_text(stored.fields)
            .and_then(|text| text.parse())
            .map_err(damaged)?;
        keyring.open_fields(collection, id, &mut fields, strict)?;
        FieldsText::of(&fields).map_err(|e| StoreError::Encode {
            what: "record fields",
            detail: e.to_string(),
        })?
    } else {
        FieldsText::stored(stored.fields).map_err(damaged)?
    };
    Ok(Some(RecordView {
        collection: collection.to_owned(),
        id: id.to_owned(),
        fields,
        heads: stored.heads.iter().map(|h| crate::hex::encode(h)).collect(),
        conflicts: Vec::new(),
    }))
}

/// The fields a stored view shows (encrypted ones sealed), `None` when its record is not live:
/// what index entries are made from.
pub(super) fn live_fields(bytes: &[u8]) -> Result<Option<Fields>, StoreError> {
    let stored = decode(bytes)?;
    if !stored.live {
        return Ok(None);
    }
    serde_json::from_str(stored.fields)
        .map(Some)
        .map_err(|e| StoreError::Decode {
            what: "record view",
            detail: e.to_string(),
        })
}

/// A view as `doctor` compares it: the fields parsed, so that two encodings of the same fields
/// are the same view.
#[derive(Debug, PartialEq)]
struct Compared {
    policy: u32,
    live: bool,
    heads: Vec<[u8; 32]>,
    fields: serde_json::Value,
}

fn compared(bytes: &[u8]) -> Result<Compared, StoreError> {
    let stored = decode(bytes)?;
    Ok(Compared {
        policy: stored.policy,
        live: stored.live,
        heads: stored.heads,
        fields: serde_json::from_str(stored.fields).map_err(|e| StoreError::Decode {
            what: "record view",
            detail: e.to_string(),
        })?,
    })
}

/// What a batch does to one record's document and view, in the order of its operations.
#[derive(Clone, Copy)]
enum Pending {
    /// The document's last operation is a put, with no view put after it.
    Written,
    /// The document's last operation is a removal.
    Removed,
    /// A view was put after the document's last operation.
    Settled,
}

impl Store {
    /// Stages the view of `record`, the document the batch holds for `key`.
    pub(super) fn stage_view(
        &self,
        batch: &mut Batch,
        key: &CacheKey,
        record: &mut Record,
    ) -> Result<(), StoreError> {
        let view = of_record(record, self.policy(&key.0))?;
        batch.put(keys::view(&key.0, &key.1), view);
        Ok(())
    }

    /// Completes `batch` so that every document it writes or removes has its view written or
    /// removed with it. The write and apply paths stage the views of the records they hold
    /// (`stage_view`); a document put without one (a purge's restoration, a repair) has its
    /// view computed here from the bytes the batch leaves. The views' index entries follow them
    /// (`settle_indexes`).
    pub(super) fn settle_views(&self, batch: &mut Batch) -> Result<(), StoreError> {
        let mut records: HashMap<&[u8], Pending> = HashMap::new();
        for (key, value) in batch.ops() {
            match key.first() {
                Some(b'd') => {
                    if let Some(record) = key.get(keys::DOC_ALL.len()..) {
                        let state = match value {
                            Some(_) => Pending::Written,
                            None => Pending::Removed,
                        };
                        records.insert(record, state);
                    }
                }
                Some(b'v') => {
                    if let Some(record) = key.get(keys::VIEW.len()..)
                        && let Some(state) = records.get_mut(record)
                        && value.is_some()
                    {
                        *state = Pending::Settled;
                    }
                }
                _ => {}
            }
        }
        let mut settle = Vec::new();
        for (record, state) in records {
            let doc = [keys::DOC_ALL, record].concat();
            let view = [keys::VIEW, record].concat();
            match state {
                Pending::Settled => {}
                Pending::Removed => settle.push((view, None)),
                Pending::Written => {
                    let collection = keys::doc_collection(&doc)?;
                    let id = keys::doc_id(&doc, keys::doc_prefix(collection).len())?;
                    let bytes = batch.get(&doc).unwrap_or_default();
                    let mut loaded = self.parse(collection, bytes)?;
                    let computed = of_record(&mut loaded, self.policy(collection))?;
                    tracing::debug!(collection, id, "a record view computed from its document");
                    settle.push((view, Some(computed)));
                }
            }
        }
        for (key, value) in settle {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.remove(key),
            }
        }
        self.settle_indexes(batch)
    }

    /// The record's view, from its `v` key, or computed from its document when the view is
    /// missing or was computed under another policy. `None` when neither exists.
    fn read_view<T>(
        &self,
        collection: &str,
        id: &str,
        with: impl FnOnce(&Stored<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        if let Some(bytes) = self.kv.get(&keys::view(collection, id))? {
            let stored = decode(&bytes)?;
            if stored.policy == fingerprint(self.policy(collection)) {
                return with(&stored).map(Some);
            }
        }
        let Some(computed) = self.computed_view(collection, id)? else {
            return Ok(None);
        };
        with(&decode(&computed)?).map(Some)
    }

    /// The view the record's document gives now (loaded from storage, or the cached one).
    fn computed_view(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let policy = self.policy(collection);
        self.with_record(collection, id, |record| of_record(record, policy))?
            .transpose()
    }

    /// A live record as its view shows it (encrypted fields opened; a field that does not open
    /// fails the read), with no conflict ids; `None` for a missing or deleted one.
    pub(super) fn view_of(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<RecordView>, StoreError> {
        let keyring = &self.options.keyring;
        Ok(self
            .read_view(collection, id, |stored| {
                answer(collection, id, stored, keyring, true)
            })?
            .flatten())
    }

    /// Whether the record is live, from its view.
    pub(super) fn view_is_live(&self, collection: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .read_view(collection, id, |stored| Ok(stored.live))?
            .unwrap_or(false))
    }

    /// Up to `wanted` live records of a collection after the id `after`, in id order, from
    /// their views (encrypted fields opened; one that does not open shows a placeholder).
    pub(super) fn list_views(
        &self,
        collection: &str,
        after: Option<&str>,
        wanted: usize,
    ) -> Result<Vec<RecordView>, StoreError> {
        let prefix = keys::view_prefix(collection);
        let mut start = match after {
            Some(id) => keys::after(&keys::view(collection, id)),
            None => prefix.clone(),
        };
        let end = keys::prefix_end(&prefix);
        let policy = fingerprint(self.policy(collection));
        let mut out = Vec::new();
        while out.len() < wanted {
            // No more than the page still needs: reading past it costs as much as reading it.
            let page = self.kv.range(&start, &end, (wanted - out.len()).min(256))?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            for (key, bytes) in page {
                let id = keys::doc_id(&key, prefix.len())?;
                if let Some(view) = self.listed(collection, id, &bytes, policy)? {
                    out.push(view);
                    if out.len() == wanted {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// A record as `list` shows it, from its stored view `bytes` (computed from the document when
    /// made under another policy than `policy`, the collection's fingerprint): encrypted fields
    /// opened (a placeholder for one that does not open), its open conflicts; `None` when it is
    /// not live.
    pub(super) fn listed(
        &self,
        collection: &str,
        id: &str,
        bytes: &[u8],
        policy: u32,
    ) -> Result<Option<RecordView>, StoreError> {
        let keyring = &self.options.keyring;
        let stored = decode(bytes)?;
        let live = if stored.policy == policy {
            answer(collection, id, &stored, keyring, false)?
        } else {
            match self.computed_view(collection, id)? {
                Some(computed) => answer(collection, id, &decode(&computed)?, keyring, false)?,
                None => None,
            }
        };
        let Some(mut view) = live else {
            return Ok(None);
        };
        view.conflicts = self.record_conflicts(collection, id)?;
        Ok(Some(view))
    }

    /// Checks the view stored for the document at `doc` (its key) against `record`, that
    /// document loaded: a description of what is wrong, or `None` when they agree.
    pub(super) fn check_view(
        &self,
        doc: &[u8],
        record: &mut Record,
    ) -> Result<Option<String>, StoreError> {
        let collection = keys::doc_collection(doc)?;
        let Some(view_key) = keys::view_of_doc(doc) else {
            return Ok(None);
        };
        let expected = compared(&of_record(record, self.policy(collection))?)?;
        Ok(match self.kv.get(&view_key)? {
            None => Some("the record's view is missing".into()),
            Some(bytes) => match compared(&bytes) {
                Ok(found) if found == expected => None,
                Ok(_) => Some("the record's view differs from its document".into()),
                Err(e) => Some(e.to_string()),
            },
        })
    }

    /// Stages the view of the document stored at `doc` (its key) again, when it loads.
    pub(super) fn stage_view_again(&self, batch: &mut Batch, doc: &[u8]) -> Result<(), StoreError> {
        let collection = keys::doc_collection(doc)?;
        let id = keys::doc_id(doc, keys::doc_prefix(collection).len())?;
        if let Some(mut record) = self.load(collection, id)? {
            let key = (collection.to_owned(), id.to_owned());
            self.stage_view(batch, &key, &mut record)?;
        }
        Ok(())
    }

    /// Marks a new store's views as complete under its policies (it has no documents).
    pub(super) fn views_marker(policies: &Policies) -> Result<Vec<u8>, StoreError> {
        super::encode(
            &Progress {
                policies: policies_fingerprint(policies),
                done_through: None,
            },
            "views progress",
        )
    }

    /// Computes every view that is missing or was computed under another policy, when the
    /// store was made before views existed or its policies changed since they were computed;
    /// a page of documents per batch, resuming where an interrupted rebuild stopped. Returns
    /// how many views were written.
    pub(super) fn rebuild_views(&self) -> Result<u64, StoreError> {
        const PAGE: usize = 256;
        let policies = policies_fingerprint(&self.options.policies);
        let progress = match self.kv.get(keys::META_VIEWS)? {
            Some(bytes) => super::decode::<Progress>(&bytes, "views progress").ok(),
            None => None,
        };
        let mut start = match progress {
            Some(p) if p.policies == policies => match p.done_through {
                None => return Ok(0),
                Some(done) => keys::after(&done),
            },
            _ => keys::DOC_ALL.to_vec(),
        };
        tracing::info!("record views: checking every record's view against its document");
        let end = keys::prefix_end(keys::DOC_ALL);
        let (mut checked, mut written) = (0u64, 0u64);
        loop {
            let page = self.kv.range(&start, &end, PAGE)?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            let mut batch = Batch::default();
            for (doc, bytes) in &page {
                checked += 1;
                let collection = keys::doc_collection(doc)?;
                let Some(view_key) = keys::view_of_doc(doc) else {
                    continue;
                };
                let policy = self.policy(collection);
                let current = match self.kv.get(&view_key) {
                    Ok(Some(view)) => decode(&view).is_ok_and(|v| v.policy == fingerprint(policy)),
                    Ok(None) | Err(_) => false,
                };
                if current {
                    continue;
                }
                match self.parse(collection, bytes) {
                    Ok(mut record) => {
                        batch.put(view_key, of_record(&mut record, policy)?);
                        written += 1;
                    }
                    // Reads compute it from the document, and `doctor` reports the document.
                    Err(e) => tracing::warn!(error = %e, key = %super::kv::printable(doc),
                        "a document does not load: its view is left out"),
                }
            }
            let marker = Progress {
                policies,
                done_through: Some(last.clone()),
            };
            batch.put(
                keys::META_VIEWS.to_vec(),
                super::encode(&marker, "views progress")?,
            );
            self.settle_indexes(&mut batch)?;
            self.kv.apply(batch)?;
            if checked.is_multiple_of(PAGE as u64 * 40) {
                tracing::info!(checked, written, "record views: rebuilding");
            }
        }
        let mut batch = Batch::default();
        batch.put(
            keys::META_VIEWS.to_vec(),
            Self::views_marker(&self.options.policies)?,
        );
        self.kv.apply(batch)?;
        self.kv.flush()?;
        tracing::info!(
            checked,
            written,
            "record views: every record's view is current"
        );
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::kv::{Kv, MemoryKv};
    use crate::store::{StoreOptions, Write, paired};
    use std::sync::Arc;

    const DEVICE: &str = "000102030405060708090a0b0c0d0e0f";

    fn open(kv: &MemoryKv, strategy: resolve::Strategy) -> Store {
        let mut options = StoreOptions::default();
        options.policies.default = Policy::of(strategy);
        Store::open(Box::new(kv.clone()), DEVICE, options, Arc::new(SystemClock)).unwrap()
    }

    fn put(store: &Store, id: &str) {
        let mut fields = Fields::new();
        fields.insert("n".into(), serde_json::json!(id));
        store
            .write(Write::Put {
                collection: "Note".into(),
                id: Some(id.into()),
                fields,
            })
            .unwrap();
    }

    fn policy_of_view(kv: &MemoryKv, id: &str) -> Option<u32> {
        let bytes = paired::over(kv).get(&keys::view("Note", id)).unwrap()?;
        Some(decode(&bytes).unwrap().policy)
    }

    /// A store whose views are gone (as one made before views existed) gets them back at open,
    /// and a policy change has every view computed again under the new policy; reads answer
    /// what the documents give all along.
    #[test]
    fn views_missing_or_computed_under_another_policy_are_rebuilt_at_open() {
        let kv = MemoryKv::new();
        let store = open(&kv, resolve::Strategy::Merge);
        let ids: Vec<String> = (0..600).map(|n| format!("r{n:03}")).collect();
        for id in &ids {
            put(&store, id);
        }
        store.flush().unwrap();
        drop(store);
        let mut batch = Batch::default();
        for id in &ids {
            batch.remove(keys::view("Note", id));
        }
        batch.remove(keys::META_VIEWS.to_vec());
        paired::over(&kv).apply(batch).unwrap();

        let store = open(&kv, resolve::Strategy::Merge);
        let merge = fingerprint(&Policy::of(resolve::Strategy::Merge));
        assert!(ids.iter().all(|id| policy_of_view(&kv, id) == Some(merge)));
        assert_eq!(store.examine().unwrap().damage, None);
        drop(store);

        let store = open(&kv, resolve::Strategy::Lww);
        let lww = fingerprint(&Policy::of(resolve::Strategy::Lww));
        assert_ne!(merge, lww);
        assert!(ids.iter().all(|id| policy_of_view(&kv, id) == Some(lww)));
        let (page, _) = store.list("Note", None, 1000).unwrap();
        assert_eq!(page.len(), ids.len());
        assert_eq!(store.examine().unwrap().damage, None);
    }

    /// A view computed under another policy is not answered from: the read computes the view
    /// from the document under the policy configured now.
    #[test]
    fn a_view_of_another_policy_is_computed_from_the_document_when_read() {
        let kv = MemoryKv::new();
        let store = open(&kv, resolve::Strategy::Merge);
        put(&store, "a");
        let key = keys::view("Note", "a");
        let stale = encode(
            &Policy::of(resolve::Strategy::Lww),
            true,
            &[],
            &Fields::new(),
        )
        .unwrap();
        let mut batch = Batch::default();
        batch.put(key, stale);
        store.kv.apply(batch).unwrap();
        assert_eq!(
            store.get("Note", "a").unwrap().fields.get("n").unwrap(),
            serde_json::json!("a")
        );
        assert_eq!(store.list("Note", None, 10).unwrap().0.len(), 1);
        assert!(store.is_live("Note", "a").unwrap());
    }

    /// A batch that writes a document with no view gets its view computed from the document;
    /// one that removes a document removes its view.
    #[test]
    fn a_batch_writing_or_removing_a_document_settles_its_view() {
        let kv = MemoryKv::new();
        let store = open(&kv, resolve::Strategy::Merge);
        put(&store, "a");
        put(&store, "b");
        let a_doc = paired::over(&kv)
            .get(&keys::doc("Note", "a"))
            .unwrap()
            .unwrap();
        let mut batch = Batch::default();
        batch.put(keys::doc("Note", "c"), a_doc);
        batch.remove(keys::doc("Note", "b"));
        store.settle_views(&mut batch).unwrap();
        store.kv.apply(batch).unwrap();
        assert_eq!(
            paired::over(&kv).get(&keys::view("Note", "b")).unwrap(),
            None
        );
        assert_eq!(
            store.get("Note", "c").unwrap().fields.get("n").unwrap(),
            serde_json::json!("a")
        );
        assert_eq!(store.examine().unwrap().damage, None);
    }
}
