//! Queries on the device's records (`query::Query`): how the store finds what a query asks for.
//! From a secondary index when one serves it (`index::Plan`: the entries in its range, each
//! record's view, from the copy its entry holds, then checked against every condition), else by a scan of the collection's
//! views in id order; either keeps no more than a page (and one more) when it must sort, and
//! both give the same answer. The answer says which (`plan`: `index:<fields>` or `scan`).
//!
//! Owns: running a query over the store's views and indexes. Must not touch: documents, the
//! queue, index entries (read only).

use super::index::{self, Plan};
use super::{NotFields, RecordView, Store, StoreError, keys, views};
use crate::query::{Direction, Position, Query, QueryError};
use crate::record::Fields;

/// Records read from the views at a time while scanning.
const SCAN_PAGE: usize = 1024;

/// A record read for a query, with the values of the fields the query names (the others are
/// not parsed: the answer passes the record's fields on as text).
struct Candidate {
    record: RecordView,
    values: Fields,
}

impl Candidate {
    fn of(query: &Query, record: RecordView) -> Result<Self, StoreError> {
        let values = record
            .fields
            .pick(|name| query.fields().any(|f| f == name))
            .map_err(|e: NotFields| StoreError::Decode {
                what: "record view",
                detail: e.to_string(),
            })?;
        Ok(Candidate { record, values })
    }

    fn id(&self) -> &str {
        &self.record.id
    }
}

/// A page of a query's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub records: Vec<RecordView>,
    /// The `after` of the next page (`None`: this is the last).
    pub next: Option<String>,
    /// How the records were found.
    pub plan: String,
}

impl Store {
    /// Up to `limit` live records of `collection` meeting `query`, in its order, after `after`
    /// (the `next` of the page before). Conditions and orders on encrypted fields are refused:
    /// their values are sealed.
    pub fn query(
        &self,
        collection: &str,
        query: &Query,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Found, StoreError> {
        let policy = self.options.policies.of(collection);
        if let Some(field) = query.fields().find(|f| policy.encrypted.contains(*f)) {
            return Err(StoreError::Query(QueryError::Condition {
                field: field.to_owned(),
                problem: "the field is encrypted: its values are sealed, so they cannot be \
                          compared (query on another field, or filter after reading)"
                    .into(),
            }));
        }
        if let Some(plan) = self.plan(collection, query)? {
            return self.query_index(collection, query, after, limit, plan);
        }
        let wanted = limit.saturating_add(1);
        let mut kept: Vec<Candidate> = Vec::new();
        match query.order_by() {
            None => {
                // Id order is the scan's: it stops once a page and one more are found.
                let mut from = after.map(str::to_owned);
                loop {
                    let (page, next) = self.list(collection, from.as_deref(), SCAN_PAGE)?;
                    for r in page {
                        let candidate = Candidate::of(query, r)?;
                        if query.matches(&candidate.values) {
                            kept.push(candidate);
                        }
                    }
                    if kept.len() >= wanted || next.is_none() {
                        break;
                    }
                    from = next;
                }
                kept.truncate(wanted);
            }
            Some(_) => {
                let position = after.map(Position::parse).transpose()?;
                let mut sorted = Sorted::new(query, wanted);
                let mut from = None;
                loop {
                    let (page, next) = self.list(collection, from.as_deref(), SCAN_PAGE)?;
                    for r in page {
                        let c = Candidate::of(query, r)?;
                        if query.matches(&c.values)
                            && position
                                .as_ref()
                                .is_none_or(|p| query.is_after(p, &c.values, c.id()))
                        {
                            sorted.push(c);
                        }
                    }
                    if next.is_none() {
                        break;
                    }
                    from = next;
                }
                kept = sorted.finish();
            }
        }
        Ok(page_of(query, kept, limit, "scan".into()))
    }

    /// Runs `plan`: reads its index range (backwards for a descending order it keeps), each
    /// record's view, and keeps those that meet the query and come after `after`.
    fn query_index(
        &self,
        collection: &str,
        query: &Query,
        after: Option<&str>,
        limit: usize,
        plan: Plan,
    ) -> Result<Found, StoreError> {
        let wanted = limit.saturating_add(1);
        let position = match (query.order_by(), after) {
            (Some(_), Some(after)) => Some(Position::parse(after)?),
            _ => None,
        };
        let direction = query.order_by().map_or(Direction::Asc, |(_, d)| d);
        let (mut lo, mut hi) = (plan.lo.clone(), plan.hi.clone());
        if plan.streams {
            let after_id = position.as_ref().map(|p| p.id.as_str()).or(after);
            match (&plan.ordered_at, &position, after_id) {
                (Some(at), Some(p), _) => {
                    match index::position_bound(at, p.value.as_ref(), direction) {
                        Some(bound) if direction == Direction::Asc => lo = lo.max(bound),
                        Some(bound) => hi = hi.min(bound),
                        None => {}
                    }
                }
                // Every field held equal: entries follow in id order.
                (None, _, Some(id)) => {
                    let at = [plan.lo.as_slice(), id.as_bytes()].concat();
                    match direction {
                        Direction::Asc => lo = lo.max(keys::after(&at)),
                        Direction::Desc => hi = hi.min(at),
                    }
                }
                _ => {}
            }
        }
        let policy = views::fingerprint(self.policy(collection));
        let keep = |c: &Candidate| {
            query.matches(&c.values)
                && match (&position, after) {
                    (Some(p), _) => query.is_after(p, &c.values, c.id()),
                    (None, Some(id)) => c.id() > id,
                    (None, None) => true,
                }
        };
        let mut kept = Vec::new();
        let mut sorted = Sorted::new(query, wanted);
        let backwards = plan.streams && direction == Direction::Desc;
        while lo < hi && kept.len() < wanted {
            // Entries with the copy of the view they hold; reading backwards finds keys alone,
            // and each record's view is then read at its own key.
            let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = if backwards {
                let Some(last) = self.kv.last_key(&lo, &hi)? else {
                    break;
                };
                hi = last.clone();
                vec![(last, None)]
            } else {
                let page = self.kv.range(&lo, &hi, SCAN_PAGE)?;
                let Some((last, _)) = page.last() else {
                    break;
                };
                lo = keys::after(last);
                page.into_iter()
                    .map(|(key, copy)| (key, Some(copy)))
                    .collect()
            };
            for (entry, copy) in entries {
                let Some(id) = index::id_of(&entry, &plan) else {
                    continue;
                };
                let bytes = match copy {
                    Some(copy) => copy,
                    None => match self.kv.get(&keys::view(collection, id))? {
                        Some(view) => view,
                        None => continue,
                    },
                };
                let Some(record) = self.listed(collection, id, &bytes, policy)? else {
                    continue;
                };
                let candidate = Candidate::of(query, record)?;
                if !keep(&candidate) {
                    continue;
                }
                if plan.streams {
                    kept.push(candidate);
                    if kept.len() == wanted {
                        break;
                    }
                } else {
                    sorted.push(candidate);
                }
            }
        }
        if !plan.streams {
            kept = sorted.finish();
        }
        Ok(page_of(query, kept, limit, format!("index:{}", plan.name)))
    }
}

/// The records of a query that must be sorted, kept to the first `wanted` in its order as they
/// come: memory stays bounded by the page, not the records read.
struct Sorted<'q> {
    query: &'q Query,
    wanted: usize,
    kept: Vec<Candidate>,
}

impl<'q> Sorted<'q> {
    fn new(query: &'q Query, wanted: usize) -> Self {
        Sorted {
            query,
            wanted,
            kept: Vec::new(),
        }
    }

    fn push(&mut self, candidate: Candidate) {
        self.kept.push(candidate);
        if self.kept.len() > self.wanted.saturating_mul(2).max(SCAN_PAGE) {
            self.sort();
        }
    }

    fn sort(&mut self) {
        let query = self.query;
        self.kept
            .sort_by(|a, b| query.compare((&a.values, a.id()), (&b.values, b.id())));
        self.kept.truncate(self.wanted);
    }

    fn finish(mut self) -> Vec<Candidate> {
        self.sort();
        self.kept
    }
}

/// The answer of a query whose first `limit` (and one more, when there are) records are `kept`.
fn page_of(query: &Query, mut kept: Vec<Candidate>, limit: usize, plan: String) -> Found {
    let next = if kept.len() > limit {
        kept.truncate(limit);
        kept.last().map(|c| match query.order_by() {
            None => c.record.id.clone(),
            Some(_) => query.position(&c.values, c.id()),
        })
    } else {
        None
    };
    Found {
        records: kept.into_iter().map(|c| c.record).collect(),
        next,
        plan,
    }
}
