//! Queries on the device's records (`query::Query`): how the store finds what a query asks for.
//! Today by a scan of the collection's views, in id order, keeping no more than a page when the
//! query is ordered by a field; the answer says so (`plan`).
//!
//! Owns: running a query over the store's views. Must not touch: documents, the queue.

use super::{RecordView, Store, StoreError};
use crate::query::{Position, Query, QueryError};

/// Records read from the views at a time while scanning.
const SCAN_PAGE: usize = 1024;

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
        let wanted = limit.saturating_add(1);
        let mut kept: Vec<RecordView> = Vec::new();
        match query.order_by() {
            None => {
                // Id order is the scan's: it stops once a page and one more are found.
                let mut from = after.map(str::to_owned);
                loop {
                    let (page, next) = self.list(collection, from.as_deref(), SCAN_PAGE)?;
                    kept.extend(page.into_iter().filter(|r| query.matches(&r.fields)));
                    if kept.len() >= wanted || next.is_none() {
                        break;
                    }
                    from = next;
                }
                kept.truncate(wanted);
            }
            Some(_) => {
                let position = after.map(Position::parse).transpose()?;
                let order = |a: &RecordView, b: &RecordView| {
                    query.compare((&a.fields, &a.id), (&b.fields, &b.id))
                };
                let mut from = None;
                loop {
                    let (page, next) = self.list(collection, from.as_deref(), SCAN_PAGE)?;
                    kept.extend(page.into_iter().filter(|r| {
                        query.matches(&r.fields)
                            && position
                                .as_ref()
                                .is_none_or(|p| query.is_after(p, &r.fields, &r.id))
                    }));
                    // Only the first page and one more can be answered: the rest goes as the
                    // scan goes, so memory stays bounded by the page.
                    if kept.len() > wanted.saturating_mul(2).max(SCAN_PAGE) {
                        kept.sort_by(order);
                        kept.truncate(wanted);
                    }
                    if next.is_none() {
                        break;
                    }
                    from = next;
                }
                kept.sort_by(order);
                kept.truncate(wanted);
            }
        }
        let next = if kept.len() > limit {
            kept.truncate(limit);
            kept.last().map(|r| match query.order_by() {
                None => r.id.clone(),
                Some(_) => query.position(&r.fields, &r.id),
            })
        } else {
            None
        };
        Ok(Found {
            records: kept,
            next,
            plan: "scan".into(),
        })
    }
}
