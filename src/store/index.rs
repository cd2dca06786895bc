//! Secondary indexes: per collection, entries keyed by the values of one field or several
//! (`index = ["email", ["customer", "year"]]`, order-preserving, `encoding`) and the record id,
//! one per live record and index. A record whose field is missing is indexed under "missing"
//! (it sorts first, as queries order it), so an index holds every live record of its collection
//! and can serve an order by its field. Deleted records are not indexed.
//!
//! Entries are derived from the record's view alone, and each holds a copy of that view, so that
//! a query reads its records from the index range alone (one ordered read instead of a tree
//! look-up per record: at 100,000 records, most of what an indexed query cost), for a view's
//! bytes more on disk per index and record. Whatever batch writes or removes a view has the
//! entries of the view it replaces removed and those of the new one written with it, copy and
//! all (`settle_indexes`, run where views are settled), so they change in the same atomic batch
//! as the document on every path. An index configured for the first time, or made in an older
//! format, is built at open a page of views per batch, resumable (`mindex` marks how far it
//! got); one no longer configured is dropped. Until its build is done, queries do not use it.
//! The planner (`plan`) picks the index whose equality prefix, then range, then order serve a
//! query best; `store::query` runs it.
//!
//! Owns: the `i` keys and their progress keys, the build and the drop, the plan. Must not touch:
//! views (read only), documents.

mod encoding;

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::kv::{Batch, KvError};
use super::{Store, StoreError, keys, views};
use crate::query::{Direction, Op, Query};
use crate::record::Fields;

/// Bumped whenever what an entry holds changes: every index is then built again at open.
/// 2: entries hold a copy of their record's view.
const INDEX_FORMAT: u32 = 2;
/// Views read per batch while building.
const BUILD_PAGE: usize = 512;

/// An index's name (its fields, joined by `,`), as plans and progress keys name it.
pub fn name(fields: &[String]) -> String {
    fields.join(",")
}

/// How far an index's build got (`keys::index_progress`).
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    format: u32,
    /// The last view key whose entry is written; `None` once all are.
    done_through: Option<Vec<u8>>,
}

/// How a query is read from an index: the entries in `lo..hi`, each record then checked against
/// every condition.
#[derive(Debug)]
pub(super) struct Plan {
    pub name: String,
    /// The length of the index's key prefix, and how many values follow it before the id.
    pub prefix_len: usize,
    pub fields: usize,
    pub lo: Vec<u8>,
    pub hi: Vec<u8>,
    /// The index's order within the range is the query's (ascending; reversed for `desc`), so
    /// reading stops once a page is found; otherwise every entry in range is read and sorted.
    pub streams: bool,
    /// The key under which the value of the query's order field follows, when the range is
    /// ordered by it: where a page's position lets reading start.
    pub ordered_at: Option<Vec<u8>>,
}

/// The entry key of a record with `fields` and `id` in the index on the fields `index`.
fn entry(collection: &str, index: &[String], fields: &Fields, id: &str) -> Vec<u8> {
    let mut key = keys::index_prefix(collection, &name(index));
    for field in index {
        encoding::push(&mut key, fields.get(field));
    }
    key.extend_from_slice(id.as_bytes());
    key
}

/// Every entry a stored view gives, for the collection's `indexes`; none for a view that is not
/// live or does not decode (a damaged one: `doctor` repairs views, then indexes, whole).
fn entries_of<'a>(
    collection: &str,
    id: &str,
    indexes: impl IntoIterator<Item = &'a [String]>,
    view: Option<&[u8]>,
) -> BTreeSet<Vec<u8>> {
    let Some(Ok(Some(fields))) = view.map(views::live_fields) else {
        return BTreeSet::new();
    };
    indexes
        .into_iter()
        .map(|index| entry(collection, index, &fields, id))
        .collect()
}

/// The collection and id of a view key.
fn record_of_view(view: &[u8]) -> Option<(&str, &str)> {
    let mut parts = view.strip_prefix(keys::VIEW)?.splitn(2, |&b| b == 0);
    let collection = std::str::from_utf8(parts.next()?).ok()?;
    let id = std::str::from_utf8(parts.next()?).ok()?;
    Some((collection, id))
}

impl Store {
    fn indexes_of(&self, collection: &str) -> &[Vec<String>] {
        self.options
            .indexes
            .get(collection)
            .map_or(&[], Vec::as_slice)
    }

    /// Completes `batch` so that each view it writes or removes has the index entries of the
    /// view stored now removed and those of the view it leaves written.
    pub(super) fn settle_indexes(&self, batch: &mut Batch) -> Result<(), StoreError> {
        if self.options.indexes.is_empty() {
            return Ok(());
        }
        let mut left: HashMap<&[u8], Option<&[u8]>> = HashMap::new();
        for (key, value) in batch.ops() {
            if key.first() == Some(&b'v') {
                left.insert(key, value);
            }
        }
        let mut changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for (view_key, new) in left {
            let Some((collection, id)) = record_of_view(view_key) else {
                continue;
            };
            let indexes = self.indexes_of(collection);
            if indexes.is_empty() {
                continue;
            }
            let old = match self.kv.get(view_key) {
                Ok(old) => old,
                // A damaged view gets written again by a repair, which builds indexes again.
                Err(KvError::Damaged(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let before = entries_of(
                collection,
                id,
                indexes.iter().map(Vec::as_slice),
                old.as_deref(),
            );
            let after = entries_of(collection, id, indexes.iter().map(Vec::as_slice), new);
            changes.extend(before.difference(&after).map(|k| (k.clone(), None)));
            // Every entry the new view gives holds its copy, those whose key stays too.
            if let Some(view) = new {
                changes.extend(after.into_iter().map(|k| (k, Some(view.to_vec()))));
            }
        }
        for (key, value) in changes {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.remove(key),
            }
        }
        Ok(())
    }

    /// The entries the stored view `bytes` under `view_key` gives in the collection's indexes
    /// (every one is built once the store is open): what `doctor` expects to find.
    pub(super) fn index_entries(&self, view_key: &[u8], bytes: &[u8]) -> BTreeSet<Vec<u8>> {
        let Some((collection, id)) = record_of_view(view_key) else {
            return BTreeSet::new();
        };
        let indexes = self.indexes_of(collection);
        entries_of(
            collection,
            id,
            indexes.iter().map(Vec::as_slice),
            Some(bytes),
        )
    }

    /// Whether the index `index` of `collection` is built and may answer queries.
    fn index_built(&self, collection: &str, index: &str) -> Result<bool, StoreError> {
        Ok(
            match self.kv.get(&keys::index_progress(collection, index))? {
                Some(bytes) => super::decode::<Progress>(&bytes, "index progress")
                    .is_ok_and(|p| p.format == INDEX_FORMAT && p.done_through.is_none()),
                None => false,
            },
        )
    }

    /// Drops the entries of indexes no longer configured, and builds those not built yet (or in
    /// an older format), resuming an interrupted build. Returns how many entries were written.
    pub(super) fn build_indexes(&self) -> Result<u64, StoreError> {
        self.drop_unconfigured_indexes()?;
        let mut written = 0;
        for (collection, indexes) in &self.options.indexes {
            for index in indexes {
                written += self.build_index(collection, index)?;
            }
        }
        Ok(written)
    }

    fn drop_unconfigured_indexes(&self) -> Result<(), StoreError> {
        let end = keys::prefix_end(keys::INDEX);
        let mut start = keys::INDEX.to_vec();
        loop {
            let first = self.kv.range(&start, &end, 1)?;
            let Some((key, _)) = first.first() else {
                break;
            };
            let Some((collection, index)) = keys::index_of_entry(key) else {
                start = keys::after(key);
                continue;
            };
            let prefix = keys::index_prefix(collection, index);
            start = keys::prefix_end(&prefix);
            let configured = self
                .indexes_of(collection)
                .iter()
                .any(|fields| name(fields) == index);
            if !configured {
                tracing::info!(collection, index, "index no longer configured: dropped");
                self.remove_entries(&prefix)?;
                let mut batch = Batch::default();
                batch.remove(keys::index_progress(collection, index));
                self.kv.apply(batch)?;
            }
        }
        // Progress keys of indexes whose build never wrote an entry.
        let end = keys::prefix_end(keys::META_INDEX);
        let mut batch = Batch::default();
        for (key, _) in self.kv.range(keys::META_INDEX, &end, usize::MAX)? {
            let known = key
                .strip_prefix(keys::META_INDEX)
                .and_then(|rest| {
                    let mut parts = rest.splitn(2, |&b| b == 0);
                    Some((parts.next()?, parts.next()?))
                })
                .is_some_and(|(collection, index)| {
                    let collection = String::from_utf8_lossy(collection);
                    self.indexes_of(&collection)
                        .iter()
                        .any(|fields| name(fields).as_bytes() == index)
                });
            if !known {
                batch.remove(key);
            }
        }
        self.kv.apply(batch)?;
        Ok(())
    }

    fn remove_entries(&self, prefix: &[u8]) -> Result<(), StoreError> {
        let end = keys::prefix_end(prefix);
        loop {
            let page = self.kv.range(prefix, &end, 4096)?;
            if page.is_empty() {
                return Ok(());
            }
            let mut batch = Batch::default();
            for (key, _) in page {
                batch.remove(key);
            }
            self.kv.apply(batch)?;
        }
    }

    fn build_index(&self, collection: &str, index: &[String]) -> Result<u64, StoreError> {
        let index_name = name(index);
        let progress_key = keys::index_progress(collection, &index_name);
        let progress = match self.kv.get(&progress_key)? {
            Some(bytes) => super::decode::<Progress>(&bytes, "index progress").ok(),
            None => None,
        };
        let views = keys::view_prefix(collection);
        let mut start = match progress {
            Some(p) if p.format == INDEX_FORMAT => match p.done_through {
                None => return Ok(0),
                Some(done) => {
                    tracing::info!(collection, index = %index_name, "index build: resuming");
                    keys::after(&done)
                }
            },
            stale => {
                if stale.is_some() {
                    self.remove_entries(&keys::index_prefix(collection, &index_name))?;
                }
                views.clone()
            }
        };
        let end = keys::prefix_end(&views);
        // Counted by their documents: a view is read with its document (`paired`), so counting
        // views would read every record once more before the build reads them.
        let total = match (keys::doc_of_view(&start), keys::doc_of_view(&end)) {
            (Some(first), Some(after)) => self.kv.count(&first, &after)?,
            _ => 0,
        };
        tracing::info!(collection, index = %index_name, records = total, "index build: starting");
        let (mut written, mut checked) = (0u64, 0u64);
        loop {
            let page = self.kv.range(&start, &end, BUILD_PAGE)?;
            checked += page.len() as u64;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            let mut batch = Batch::default();
            for (key, bytes) in &page {
                let Some((_, id)) = record_of_view(key) else {
                    continue;
                };
                for entry in entries_of(collection, id, [index], Some(bytes)) {
                    batch.put(entry, bytes.clone());
                    written += 1;
                }
            }
            let marker = Progress {
                format: INDEX_FORMAT,
                done_through: Some(last.clone()),
            };
            batch.put(
                progress_key.clone(),
                super::encode(&marker, "index progress")?,
            );
            self.kv.apply(batch)?;
            if checked.is_multiple_of(BUILD_PAGE as u64 * 40) {
                tracing::info!(collection, index = %index_name, checked, of = total,
                    "index build: under way");
            }
        }
        let mut batch = Batch::default();
        let done = Progress {
            format: INDEX_FORMAT,
            done_through: None,
        };
        batch.put(progress_key, super::encode(&done, "index progress")?);
        self.kv.apply(batch)?;
        self.kv.flush()?;
        tracing::info!(collection, index = %index_name, written, "index build: done");
        Ok(written)
    }

    /// The best built index for `query` on `collection`, if one serves it: the longest prefix of
    /// its fields with equality conditions, then a range on the next field, then an order the
    /// index gives as it is.
    pub(super) fn plan(&self, collection: &str, query: &Query) -> Result<Option<Plan>, StoreError> {
        let mut best: Option<((usize, bool, bool), Plan)> = None;
        for index in self.indexes_of(collection) {
            let Some((score, plan)) = plan_for(collection, index, query) else {
                continue;
            };
            if best.as_ref().is_some_and(|(s, _)| *s >= score) {
                continue;
            }
            if self.index_built(collection, &plan.name)? {
                best = Some((score, plan));
            }
        }
        Ok(best.map(|(_, plan)| plan))
    }
}

/// How `index` would serve `query`, and how well (equalities, a range, an order kept).
fn plan_for(
    collection: &str,
    index: &[String],
    query: &Query,
) -> Option<((usize, bool, bool), Plan)> {
    let equal = |field: &str| {
        query
            .conditions()
            .iter()
            .find(|c| c.field == field && c.op == Op::Eq)
            .and_then(|c| c.value.as_ref())
    };
    let mut base = keys::index_prefix(collection, &name(index));
    let mut equalities = 0;
    for field in index {
        let Some(value) = equal(field) else { break };
        encoding::push(&mut base, Some(value));
        equalities += 1;
    }
    let next = index.get(equalities);
    let (mut lo, mut hi) = (base.clone(), keys::prefix_end(&base));
    let mut ranged = false;
    for c in query.conditions() {
        if Some(&c.field) != next {
            continue;
        }
        let Some(value) = c.value.as_ref() else {
            continue;
        };
        let mut at = base.clone();
        encoding::push(&mut at, Some(value));
        let (kind_lo, kind_hi) = encoding::kind_range(value);
        let (from, to) = match c.op {
            Op::Gt | Op::Ge => (at, [base.as_slice(), &kind_hi].concat()),
            Op::Lt => ([base.as_slice(), &kind_lo].concat(), at),
            Op::Le => ([base.as_slice(), &kind_lo].concat(), keys::prefix_end(&at)),
            Op::Eq | Op::In | Op::Exists => continue,
        };
        lo = lo.max(from);
        hi = hi.min(to);
        ranged = true;
    }
    let complete = equalities == index.len();
    let (streams, ordered_at) = match query.order_by() {
        None => (complete, None),
        Some((field, _)) if complete && index.iter().any(|f| f == field) => (true, None),
        Some((field, _)) => {
            let last = equalities + 1 == index.len();
            let by_next = next.is_some_and(|n| n == field) && last;
            (by_next, by_next.then(|| base.clone()))
        }
    };
    if equalities == 0 && !ranged && !streams {
        return None;
    }
    let plan = Plan {
        name: name(index),
        prefix_len: keys::index_prefix(collection, &name(index)).len(),
        fields: index.len(),
        lo,
        hi,
        streams,
        ordered_at,
    };
    Some(((equalities, ranged, streams), plan))
}

/// The record id an entry of `plan`'s index names.
pub(super) fn id_of<'k>(entry: &'k [u8], plan: &Plan) -> Option<&'k str> {
    let mut at = plan.prefix_len;
    for _ in 0..plan.fields {
        at += encoding::skip(entry.get(at..)?)?;
    }
    std::str::from_utf8(entry.get(at..)?).ok()
}

/// Where reading an ordered plan may start (ascending) or stop (descending) for a page after a
/// record whose order value is `value`: entries of smaller (greater, descending) values come
/// before it. `None` leaves the range as it is.
pub(super) fn position_bound(
    ordered_at: &[u8],
    value: Option<&serde_json::Value>,
    direction: Direction,
) -> Option<Vec<u8>> {
    let value = value?;
    let mut at = ordered_at.to_vec();
    encoding::push(&mut at, Some(value));
    Some(match direction {
        Direction::Asc => at,
        Direction::Desc => keys::prefix_end(&at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::query::{Condition, Query};
    use crate::store::kv::{Kv, MemoryKv};
    use crate::store::{StoreOptions, Write};
    use std::sync::Arc;

    const DEVICE: &str = "000102030405060708090a0b0c0d0e0f";
    const RECORDS: usize = 1300;

    fn open(kv: &MemoryKv, indexed: bool) -> Store {
        let mut options = StoreOptions::default();
        if indexed {
            options.indexes = [("Note".to_owned(), vec![vec!["n".to_owned()]])].into();
        }
        Store::open(Box::new(kv.clone()), DEVICE, options, Arc::new(SystemClock)).unwrap()
    }

    fn n_is(n: u64) -> Query {
        let condition = Condition {
            field: "n".into(),
            op: Op::Eq,
            value: Some(serde_json::json!(n)),
        };
        Query::new(vec![condition], None).unwrap()
    }

    fn ids(store: &Store, query: &Query) -> (Vec<String>, String) {
        let found = store.query("Note", query, None, 1000).unwrap();
        (
            found.records.into_iter().map(|r| r.id).collect(),
            found.plan,
        )
    }

    fn entries(kv: &MemoryKv) -> u64 {
        let prefix = keys::index_prefix("Note", "n");
        kv.count(&prefix, &keys::prefix_end(&prefix)).unwrap()
    }

    /// An index added to a collection that holds records is built at open; a build interrupted
    /// after its first page resumes there (writing only the rest), and until it is done queries
    /// scan and say so, with the same answer. Dropped from the config, its entries go.
    #[test]
    fn an_index_added_later_is_built_at_open_resuming_an_interrupted_build() {
        let kv = MemoryKv::new();
        let store = open(&kv, false);
        for i in 0..RECORDS {
            let mut fields = Fields::new();
            fields.insert("n".into(), serde_json::json!(i % 10));
            let id = Some(format!("r{i:04}"));
            let collection = "Note".to_owned();
            store
                .write(Write::Put {
                    collection,
                    id,
                    fields,
                })
                .unwrap();
        }
        let expected: Vec<String> = (0..RECORDS)
            .filter(|i| i % 10 == 3)
            .map(|i| format!("r{i:04}"))
            .collect();
        assert_eq!(ids(&store, &n_is(3)), (expected.clone(), "scan".into()));
        store.flush().unwrap();
        drop(store);

        let store = open(&kv, true);
        assert_eq!(entries(&kv), RECORDS as u64);
        assert_eq!(ids(&store, &n_is(3)), (expected.clone(), "index:n".into()));

        // As a build stopped after its first page leaves it.
        let progress = keys::index_progress("Note", "n");
        let views = keys::view_prefix("Note");
        let first_page = crate::store::paired::over(&kv)
            .range(&views, &keys::prefix_end(&views), BUILD_PAGE)
            .unwrap();
        let done_through = first_page.last().map(|(key, _)| key.clone());
        let built_ids: BTreeSet<&str> = first_page
            .iter()
            .filter_map(|(key, _)| record_of_view(key).map(|(_, id)| id))
            .collect();
        let mut batch = Batch::default();
        let prefix = keys::index_prefix("Note", "n");
        for (key, _) in kv
            .range(&prefix, &keys::prefix_end(&prefix), usize::MAX)
            .unwrap()
        {
            let plan = plan_for("Note", &["n".to_owned()], &n_is(0)).unwrap().1;
            if id_of(&key, &plan).is_some_and(|id| !built_ids.contains(id)) {
                batch.remove(key);
            }
        }
        let partial = Progress {
            format: INDEX_FORMAT,
            done_through,
        };
        batch.put(
            progress,
            crate::store::encode(&partial, "index progress").unwrap(),
        );
        kv.apply(batch).unwrap();
        assert_eq!(entries(&kv), BUILD_PAGE as u64);
        assert_eq!(ids(&store, &n_is(3)), (expected.clone(), "scan".into()));

        assert_eq!(
            store.build_indexes().unwrap(),
            (RECORDS - BUILD_PAGE) as u64
        );
        assert_eq!(entries(&kv), RECORDS as u64);
        assert_eq!(ids(&store, &n_is(3)), (expected, "index:n".into()));
        assert_eq!(store.examine().unwrap().damage, None);
        drop(store);

        let store = open(&kv, false);
        assert_eq!(entries(&kv), 0);
        assert_eq!(kv.get(&keys::index_progress("Note", "n")).unwrap(), None);
        assert_eq!(ids(&store, &n_is(3)).1, "scan");
    }

    /// `doctor` finds an index entry missing or left over, and a repair writes the entries the
    /// views give again.
    #[test]
    fn index_entries_that_differ_from_the_views_are_found_and_repaired() {
        let kv = MemoryKv::new();
        let store = open(&kv, true);
        for (id, n) in [("a", 1), ("b", 2), ("c", 3)] {
            let mut fields = Fields::new();
            fields.insert("n".into(), serde_json::json!(n));
            let collection = "Note".to_owned();
            store
                .write(Write::Put {
                    collection,
                    id: Some(id.into()),
                    fields,
                })
                .unwrap();
        }
        let prefix = keys::index_prefix("Note", "n");
        let held = kv.range(&prefix, &keys::prefix_end(&prefix), 10).unwrap();
        // Each entry holds a copy of its record's view.
        for (key, copy) in &held {
            let id = std::str::from_utf8(key.get(key.len() - 1..).unwrap()).unwrap();
            assert_eq!(
                Some(copy),
                crate::store::paired::over(&kv)
                    .get(&keys::view("Note", id))
                    .unwrap()
                    .as_ref()
            );
        }
        let mut batch = Batch::default();
        // a's and b's entries lost, a ghost, and c's holding b's view.
        let [a, b, c] = held.as_slice() else {
            panic!("{held:?}")
        };
        batch.remove(a.0.clone());
        batch.remove(b.0.clone());
        batch.put([prefix.as_slice(), b"\x02ghost"].concat(), Vec::new());
        batch.put(c.0.clone(), b.1.clone());
        kv.apply(batch).unwrap();
        // A query reads the copies: c's entry now shows b's fields, which do not meet n = 3.
        assert_eq!(ids(&store, &n_is(3)), (Vec::new(), "index:n".into()));

        let damage = store.examine().unwrap().damage.unwrap();
        let kinds: Vec<&str> = damage.damaged.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, ["index entry"; 4], "{damage:?}");
        store.repair().unwrap();
        assert_eq!(store.examine().unwrap().damage, None);
        let now = kv.range(&prefix, &keys::prefix_end(&prefix), 10).unwrap();
        assert_eq!(now, held);
        assert_eq!(
            ids(&store, &n_is(2)),
            (vec!["b".to_owned()], "index:n".into())
        );
        assert_eq!(
            ids(&store, &n_is(3)),
            (vec!["c".to_owned()], "index:n".into())
        );
    }
}
