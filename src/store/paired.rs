//! A record's document and view kept under one key of the engine.
//!
//! The store lays a record out as two keys (`store::keys`): its document `d\0{collection}\0{id}`
//! and its view `v{collection}\0{id}`, written and removed together. An engine key has a cost
//! of its own, whatever it holds: a walk from the root and a node copy on every write, and
//! memory and disk that grow with the number of keys (sled 0.34 opens a store of 6,000,000
//! keys at four times the memory of one holding the same bytes under 1,000,000). So the engine
//! holds both as one value under the document's key, a *pair*: `[PAIR_TAG][flags][document
//! length and bytes, unless apart][view]`. A document longer than `APART_BYTES` is kept apart
//! under `D\0{collection}\0{id}`, so that reading a view never reads a long history.
//!
//! `Paired` shows the store the keys as `store::keys` lays them out: reads, ranges, counts and
//! batches on document and view keys are translated here; every other key passes through.
//! Stores written before pairs existed are converted when opened (`Paired::open`).
//!
//! Invariants: a pair always holds a document (views are removed with their documents; a view
//! left without one is dropped); a batch reads the pairs it changes only in part under the same
//! lock that applies it, so that a batch writing a view keeps the document another wrote; a
//! batch writing whole records reads nothing (which documents are apart is kept in memory).
//!
//! A batch may offer a short form of a record's document, one its view implies
//! (`kv::ShortForm`, made by `store::implied`): the pair then holds that instead
//! (`[PAIR_TAG][FLAG_SHORT | FLAG_VIEW][short form length and bytes][view]`), provided the batch
//! leaves exactly the document and view it was made for. Reading the document expands it with
//! the function the store gives (`Expand`); a batch that writes the view alone stores the
//! document expanded first.
//!
//! Must not touch: what documents and views hold (bytes here), or any other key's layout.

use super::keys;
use super::kv::{Batch, Kv, KvError, Pair, ShortForm, forward_to_inner};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

/// Documents longer than this are kept apart from their views.
pub const APART_BYTES: usize = 2048;
/// The first byte of a pair. Automerge documents and changes start with `0x85`, so a document
/// stored alone before pairs existed is never taken for one.
const PAIR_TAG: u8 = 0;
/// The pair's document is under its `D` key.
const FLAG_APART: u8 = 1;
/// The pair holds a view.
const FLAG_VIEW: u8 = 2;
/// The pair's document is in a short form its view implies.
const FLAG_SHORT: u8 = 4;
/// Present once every record is stored as a pair.
const META_PAIRED: &[u8] = b"mpaired_records";
/// Records converted, or pairs read, per batch of the conversion and per page of a scan.
const PAGE: usize = 512;

/// The regions of the keyspace whose keys are not stored as they are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    /// `D`: documents kept apart; not keys of the store's layout, never shown.
    Apart,
    /// `d`: documents, each the pair under the same key.
    Documents,
    /// `v`: views, each in the pair under its record's document key.
    Views,
}

const REGIONS: [(u8, Region); 3] = [
    (b'D', Region::Apart),
    (b'd', Region::Documents),
    (b'v', Region::Views),
];

fn region_of(key: &[u8]) -> Option<Region> {
    let first = key.first()?;
    REGIONS.iter().find(|(b, _)| b == first).map(|(_, r)| *r)
}

/// `start..end` cut where regions begin and end, each part with its region (`None`: keys
/// stored as named), in key order.
fn segments(start: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Vec<u8>, Option<Region>)> {
    let mut parts = Vec::new();
    let mut from = start.to_vec();
    while from.as_slice() < end {
        let first = from.first().copied();
        let (to, region) = match first.and_then(|b| region_of(&[b]).map(|r| (b, r))) {
            Some((byte, region)) => (vec![byte + 1], Some(region)),
            None => {
                let next = REGIONS
                    .iter()
                    .map(|(b, _)| *b)
                    .find(|b| first.is_none_or(|f| *b > f));
                (next.map_or_else(|| end.to_vec(), |b| vec![b]), None)
            }
        };
        let to = if to.as_slice() < end {
            to
        } else {
            end.to_vec()
        };
        parts.push((from, to.clone(), region));
        from = to;
    }
    parts
}

/// The record part (`{collection}\0{id}`) of a document or view key.
fn record_of(key: &[u8]) -> Option<&[u8]> {
    match key.first()? {
        b'd' => key.strip_prefix(keys::DOC_ALL),
        b'v' => key.get(1..),
        _ => None,
    }
}

fn pair_key(record: &[u8]) -> Vec<u8> {
    [keys::DOC_ALL, record].concat()
}

fn apart_key(record: &[u8]) -> Vec<u8> {
    [b"D\0".as_slice(), record].concat()
}

fn view_key(record: &[u8]) -> Vec<u8> {
    [keys::VIEW, record].concat()
}

/// The document in its short form and its view, to the document's bytes; `None` when they do
/// not give a document (the pair is then damaged).
pub type Expand = fn(short: &[u8], view: &[u8]) -> Option<Vec<u8>>;

/// A pair as stored, borrowed: its document (`None`: apart; in its short form when `short`)
/// and view.
pub(crate) struct Parsed<'a> {
    pub document: Option<&'a [u8]>,
    pub view: Option<&'a [u8]>,
    pub short: bool,
}

/// The pair `bytes` hold; `None` when they are not one.
pub(crate) fn parse(bytes: &[u8]) -> Option<Parsed<'_>> {
    let (&tag, rest) = bytes.split_first()?;
    let (&flags, mut rest) = rest.split_first()?;
    if tag != PAIR_TAG || flags & !(FLAG_APART | FLAG_VIEW | FLAG_SHORT) != 0 {
        return None;
    }
    let short = flags & FLAG_SHORT != 0;
    if short && flags & (FLAG_APART | FLAG_VIEW) != FLAG_VIEW {
        return None;
    }
    let document = if flags & FLAG_APART == 0 {
        let (len, after) = read_varint(rest)?;
        let len = usize::try_from(len).ok()?;
        let (document, after) = after.split_at_checked(len)?;
        rest = after;
        Some(document)
    } else {
        None
    };
    let view = if flags & FLAG_VIEW != 0 {
        Some(rest)
    } else if rest.is_empty() {
        None
    } else {
        return None;
    };
    Some(Parsed {
        document,
        view,
        short,
    })
}

/// A pair's bytes: `document` `None` when it is kept apart.
fn encode(document: Option<&[u8]>, view: Option<&[u8]>) -> Vec<u8> {
    encode_flagged(0, document, view)
}

/// A pair's bytes holding a document's short form and its view.
fn encode_short(short: &[u8], view: &[u8]) -> Vec<u8> {
    encode_flagged(FLAG_SHORT, Some(short), Some(view))
}

fn encode_flagged(mut flags: u8, document: Option<&[u8]>, view: Option<&[u8]>) -> Vec<u8> {
    let len = document.map_or(0, <[u8]>::len) + view.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(len + 12);
    out.push(PAIR_TAG);
    if document.is_none() {
        flags |= FLAG_APART;
    }
    if view.is_some() {
        flags |= FLAG_VIEW;
    }
    out.push(flags);
    if let Some(document) = document {
        write_varint(&mut out, document.len() as u64);
        out.extend_from_slice(document);
    }
    if let Some(view) = view {
        out.extend_from_slice(view);
    }
    out
}

fn write_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn read_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut n = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        n |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((n, bytes.get(i + 1..)?));
        }
    }
    None
}

/// What a batch does to one record: each part put (`Some(Some)`), removed (`Some(None)`) or left.
#[derive(Default)]
struct Written {
    document: Option<Option<Vec<u8>>>,
    view: Option<Option<Vec<u8>>>,
}

/// The store's keyspace over an engine that holds each record as a pair (see the module doc).
pub struct Paired {
    inner: Box<dyn Kv>,
    /// The records whose document is kept apart, so that a batch writing a whole record needs
    /// no read to know whether to remove one; `None` when not known (after a batch failed),
    /// and such batches read the pair. Held while a batch is staged and applied.
    apart: Mutex<Option<HashSet<Vec<u8>>>>,
    expand: Expand,
}

impl Paired {
    /// Opens the keyspace over `inner`, converting a store written before pairs existed: each
    /// batch of the conversion moves whole records, so a conversion cut short by a crash goes
    /// on at the next open. A document that fails its checksum stays as it is (reading it says
    /// it is damaged, as before) and its view goes: views are computed again from documents.
    pub fn open(inner: Box<dyn Kv>, expand: Expand) -> Result<Paired, KvError> {
        if inner.get(META_PAIRED)?.is_none() {
            let converted = convert(inner.as_ref())?;
            let mut batch = Batch::default();
            batch.put(META_PAIRED.to_vec(), Vec::new());
            inner.apply(batch)?;
            inner.flush()?;
            if converted > 0 {
                tracing::info!(records = converted, "records converted to pairs");
            }
        }
        let apart = apart_records(inner.as_ref())?;
        Ok(Paired {
            inner,
            apart: Mutex::new(Some(apart)),
            expand,
        })
    }

    fn document(&self, key: &[u8], record: &[u8], stored: &[u8]) -> Result<Vec<u8>, KvError> {
        let parsed = parse(stored).ok_or_else(|| KvError::Damaged(key.to_vec()))?;
        match parsed.document {
            Some(_) if parsed.short => self
                .expanded(&parsed)
                .ok_or_else(|| KvError::Damaged(key.to_vec())),
            Some(document) => Ok(document.to_vec()),
            None => self
                .inner
                .get(&apart_key(record))
                .map_err(|e| as_key(e, key))?
                .ok_or_else(|| KvError::Damaged(key.to_vec())),
        }
    }

    /// The document of a pair holding its short form.
    fn expanded(&self, parsed: &Parsed<'_>) -> Option<Vec<u8>> {
        (self.expand)(parsed.document?, parsed.view?)
    }

    /// Up to `limit` documents with keys in `start..end` (inside the `d` region) into `out`.
    fn documents(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        out: &mut Vec<Pair>,
    ) -> Result<(), KvError> {
        for (key, stored) in self.inner.range(start, end, limit)? {
            let record = record_of(&key).ok_or_else(|| KvError::Damaged(key.clone()))?;
            let document = self.document(&key, record, &stored)?;
            out.push((key, document));
        }
        Ok(())
    }

    /// Hands `each` the view key and view of every pair with a view whose view key lies in
    /// `start..end` (inside the `v` region), until it returns false, reading pairs `page` at a
    /// time (nearly every pair holds a view: a caller that wants n asks for pages of n).
    fn views(
        &self,
        start: &[u8],
        end: &[u8],
        page: usize,
        each: &mut dyn FnMut(Vec<u8>, &[u8]) -> bool,
    ) -> Result<(), KvError> {
        let page = page.clamp(1, PAGE);
        let mut from = pair_key(start.get(1..).unwrap_or_default());
        let to = match end.first() {
            Some(b'v') => pair_key(end.get(1..).unwrap_or_default()),
            _ => keys::prefix_end(keys::DOC_ALL),
        };
        loop {
            let pairs = self.inner.range(&from, &to, page).map_err(as_view_error)?;
            for (key, stored) in &pairs {
                let record = record_of(key).ok_or_else(|| KvError::Damaged(key.clone()))?;
                let parsed = parse(stored).ok_or_else(|| KvError::Damaged(view_key(record)))?;
                if let Some(view) = parsed.view
                    && !each(view_key(record), view)
                {
                    return Ok(());
                }
            }
            match pairs.last() {
                Some((last, _)) if pairs.len() == page => from = keys::after(last),
                _ => return Ok(()),
            }
        }
    }

    /// What a batch leaves in the record's pair, and the writes that do it; `apart` follows.
    /// `short` is the short form the batch offers for the record's document.
    fn stage(
        &self,
        record: &[u8],
        written: Written,
        short: Option<ShortForm>,
        apart: &mut Option<HashSet<Vec<u8>>>,
        out: &mut Batch,
    ) -> Result<(), KvError> {
        let pair = pair_key(record);
        // The pair as stored is read for a part the batch leaves, or, when which documents are
        // apart is not known, to know whether one is to be removed.
        let read = match &written.document {
            Some(None) => false,
            Some(Some(_)) => written.view.is_none() || apart.is_none(),
            None => true,
        };
        let stored = if read {
            match self.inner.get(&pair) {
                Ok(stored) => stored,
                // A damaged pair is overwritten only by a batch that writes its document.
                Err(KvError::Damaged(_)) if written.document.is_some() => None,
                Err(e) => return Err(as_key(e, &view_key(record))),
            }
        } else {
            None
        };
        let stored = match &stored {
            Some(bytes) => Some(parse(bytes).ok_or_else(|| KvError::Damaged(pair.clone()))?),
            None => None,
        };
        let was_apart = match apart.as_ref() {
            Some(known) => known.contains(record),
            None => !read || stored.as_ref().is_none_or(|s| s.document.is_none()),
        };
        let view = match written.view {
            Some(view) => view,
            None => stored.as_ref().and_then(|s| s.view).map(<[u8]>::to_vec),
        };
        let now_apart = match written.document {
            Some(None) => {
                out.remove(pair);
                false
            }
            Some(Some(document)) => match (short, view.as_deref()) {
                (Some(form), Some(view)) if form.document == document && form.view == view => {
                    out.put(pair, encode_short(&form.short, view));
                    false
                }
                _ => put_record(out, record, document, view.as_deref()),
            },
            // The view alone: a short form goes with the view it was made for.
            None => match stored {
                Some(parsed) if parsed.short => {
                    let document = self
                        .expanded(&parsed)
                        .ok_or_else(|| KvError::Damaged(view_key(record)))?;
                    put_record(out, record, document, view.as_deref())
                }
                Some(Parsed { document, .. }) => {
                    out.put(pair, encode(document, view.as_deref()));
                    was_apart
                }
                // No document: a view alone is not kept.
                None => return Ok(()),
            },
        };
        if was_apart && !now_apart {
            out.remove(apart_key(record));
        }
        if let Some(known) = apart.as_mut() {
            if now_apart {
                known.insert(record.to_vec());
            } else {
                known.remove(record);
            }
        }
        Ok(())
    }
}

/// Puts a record's pair holding `document` and `view`, its document apart when long; returns
/// whether it is apart.
fn put_record(out: &mut Batch, record: &[u8], document: Vec<u8>, view: Option<&[u8]>) -> bool {
    if document.len() > APART_BYTES {
        out.put(pair_key(record), encode(None, view));
        out.put(apart_key(record), document);
        true
    } else {
        out.put(pair_key(record), encode(Some(&document), view));
        false
    }
}

/// The records whose document is kept apart, read from the keys alone.
fn apart_records(kv: &dyn Kv) -> Result<HashSet<Vec<u8>>, KvError> {
    let mut records = HashSet::new();
    let start = apart_key(b"");
    let mut end = keys::prefix_end(&start);
    while let Some(key) = kv.last_key(&start, &end)? {
        records.insert(key.get(start.len()..).unwrap_or_default().to_vec());
        end = key;
    }
    Ok(records)
}

/// `e`, naming `key` when it names a damaged value.
fn as_key(e: KvError, key: &[u8]) -> KvError {
    match e {
        KvError::Damaged(_) => KvError::Damaged(key.to_vec()),
        other => other,
    }
}

/// A damaged pair met while reading views, named as the view it holds.
fn as_view_error(e: KvError) -> KvError {
    match e {
        KvError::Damaged(key) => match record_of(&key) {
            Some(record) => KvError::Damaged(view_key(record)),
            None => KvError::Damaged(key),
        },
        other => other,
    }
}

/// Moves every document and view stored under its own key into a pair; returns how many
/// records it converted.
fn convert(kv: &dyn Kv) -> Result<u64, KvError> {
    let mut converted = 0;
    let mut from = keys::DOC_ALL.to_vec();
    let docs_end = keys::prefix_end(keys::DOC_ALL);
    let mut stop = docs_end.clone();
    loop {
        let page = match kv.range(&from, &stop, PAGE) {
            Ok(page) => page,
            // Convert up to the damaged document, leave it, and go on after it.
            Err(KvError::Damaged(key)) if key >= from && key < stop => {
                stop = key;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut batch = Batch::default();
        for (key, stored) in &page {
            if stored.first() == Some(&PAIR_TAG) && parse(stored).is_some() {
                continue;
            }
            let Some(record) = record_of(key) else {
                continue;
            };
            let view = match kv.get(&view_key(record)) {
                Ok(view) => view,
                Err(KvError::Damaged(_)) => None,
                Err(e) => return Err(e),
            };
            put_record(&mut batch, record, stored.clone(), view.as_deref());
            batch.remove(view_key(record));
            converted += 1;
        }
        if !batch.is_empty() {
            kv.apply(batch)?;
        }
        match page.last() {
            Some((last, _)) if page.len() == PAGE => from = keys::after(last),
            _ if stop != docs_end => {
                from = keys::after(&stop);
                stop = docs_end.clone();
            }
            _ => break,
        }
    }
    remove_views_left(kv)?;
    Ok(converted)
}

/// Removes the views still under their own key after the conversion: those of no document,
/// and those of documents it left damaged. Keys only (`last_key`): a damaged view goes too.
fn remove_views_left(kv: &dyn Kv) -> Result<(), KvError> {
    let mut end = keys::prefix_end(keys::VIEW);
    let mut batch = Batch::default();
    while let Some(key) = kv.last_key(keys::VIEW, &end)? {
        batch.remove(key.clone());
        end = key;
    }
    if !batch.is_empty() {
        kv.apply(batch)?;
    }
    Ok(())
}

impl Kv for Paired {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let Some(region) = region_of(key) else {
            return self.inner.get(key);
        };
        let Some(record) = record_of(key) else {
            return Ok(None);
        };
        match region {
            Region::Apart => Ok(None),
            Region::Documents => match self.inner.get(key)? {
                Some(stored) => self.document(key, record, &stored).map(Some),
                None => Ok(None),
            },
            Region::Views => match self
                .inner
                .get(&pair_key(record))
                .map_err(|e| as_key(e, key))?
            {
                Some(stored) => Ok(parse(&stored)
                    .ok_or_else(|| KvError::Damaged(key.to_vec()))?
                    .view
                    .map(<[u8]>::to_vec)),
                None => Ok(None),
            },
        }
    }

    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        match (region_of(key), record_of(key)) {
            (None, _) => self.inner.contains(key),
            // A pair always holds its document, under the document's key.
            (Some(Region::Documents), Some(_)) => self.inner.contains(key),
            _ => Ok(self.get(key)?.is_some()),
        }
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        let mut out = Vec::new();
        for (from, to, region) in segments(start, end) {
            let wanted = limit.saturating_sub(out.len());
            if wanted == 0 {
                break;
            }
            match region {
                None => out.extend(self.inner.range(&from, &to, wanted)?),
                Some(Region::Apart) => {}
                Some(Region::Documents) => self.documents(&from, &to, wanted, &mut out)?,
                Some(Region::Views) => self.views(&from, &to, wanted, &mut |key, view| {
                    out.push((key, view.to_vec()));
                    out.len() < limit
                })?,
            }
        }
        Ok(out)
    }

    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        for (from, to, region) in segments(start, end).into_iter().rev() {
            let last = match region {
                None | Some(Region::Documents) => self.inner.last_key(&from, &to)?,
                Some(Region::Apart) => None,
                Some(Region::Views) => {
                    let mut last = None;
                    self.views(&from, &to, PAGE, &mut |key, _| {
                        last = Some(key);
                        true
                    })?;
                    last
                }
            };
            if last.is_some() {
                return Ok(last);
            }
        }
        Ok(None)
    }

    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        let mut total = 0;
        for (from, to, region) in segments(start, end) {
            total += match region {
                // Every pair holds a document.
                None | Some(Region::Documents) => self.inner.count(&from, &to)?,
                Some(Region::Apart) => 0,
                Some(Region::Views) => {
                    let mut views = 0;
                    self.views(&from, &to, PAGE, &mut |_, _| {
                        views += 1;
                        true
                    })?;
                    views
                }
            };
        }
        Ok(total)
    }

    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        let mut apart = self.apart.lock().unwrap_or_else(|p| p.into_inner());
        let (ops, journal, short) = batch.into_parts();
        let mut short: HashMap<Vec<u8>, ShortForm> = short
            .into_iter()
            .filter_map(|(key, form)| Some((record_of(&key)?.to_vec(), form)))
            .collect();
        let mut out = Batch::default();
        let mut records: BTreeMap<Vec<u8>, Written> = BTreeMap::new();
        for (key, value) in ops {
            let part = match (region_of(&key), record_of(&key)) {
                (Some(Region::Documents), Some(record)) => Some((record.to_vec(), true)),
                (Some(Region::Views), Some(record)) => Some((record.to_vec(), false)),
                _ => None,
            };
            match part {
                Some((record, true)) => records.entry(record).or_default().document = Some(value),
                Some((record, false)) => records.entry(record).or_default().view = Some(value),
                None => match value {
                    Some(value) => out.put(key, value),
                    None => out.remove(key),
                },
            }
        }
        for (record, written) in records {
            let short = short.remove(&record);
            if let Err(e) = self.stage(&record, written, short, &mut apart, &mut out) {
                *apart = None;
                return Err(e);
            }
        }
        for record in journal {
            out.journal(record);
        }
        let applied = self.inner.apply(out);
        if applied.is_err() {
            // What the engine holds is not known now: pairs are read until the next open.
            *apart = None;
        }
        applied
    }

    // The keys as the engine holds them: a pair counts once, as a document.
    forward_to_inner!(beside_keys);
}

/// The store's keys over `kv` as a test sees them, for tests that write or read them directly.
#[cfg(test)]
pub(super) fn over(kv: &super::kv::MemoryKv) -> Paired {
    match Paired::open(Box::new(kv.clone()), super::implied::expand) {
        Ok(paired) => paired,
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kv::MemoryKv;
    use proptest::prelude::*;

    fn doc(record: &str) -> Vec<u8> {
        [keys::DOC_ALL, record.as_bytes()].concat()
    }

    fn view(record: &str) -> Vec<u8> {
        [keys::VIEW, record.as_bytes()].concat()
    }

    /// Bytes that start as Automerge's do, `len` long.
    fn automerge_like(len: usize, seed: u8) -> Vec<u8> {
        let mut bytes = vec![0x85, 0x6f, 0x4a, 0x83];
        bytes.extend((0..len.saturating_sub(4)).map(|i| seed.wrapping_add(i as u8)));
        bytes.truncate(len);
        bytes
    }

    fn apply(kv: &dyn Kv, ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), KvError> {
        let mut batch = Batch::default();
        for (key, value) in ops {
            match value {
                Some(value) => batch.put(key.clone(), value.clone()),
                None => batch.remove(key.clone()),
            }
        }
        kv.apply(batch)
    }

    fn raw_keys(raw: &MemoryKv) -> Vec<Vec<u8>> {
        raw.range(b"", &[0xff], usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// The keys a test looks at around the regions and inside them.
    const BOUNDS: [&[u8]; 16] = [
        b"",
        b"C",
        b"D",
        b"D\0C\0a",
        b"E",
        b"d",
        b"d\0C\0",
        b"d\0C\0a",
        b"d\0C\0b\0",
        b"e",
        b"m",
        b"v",
        b"vC\0a",
        b"vC\0b\0",
        b"w",
        b"\xff",
    ];

    fn record_name() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["C\0a", "C\0b", "C\0bb", "Cx\0a", "E\0z"])
    }

    fn op() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
        let value = prop_oneof![
            Just(None),
            (1usize..64, any::<u8>()).prop_map(|(n, s)| Some(automerge_like(n, s))),
            (APART_BYTES - 2..APART_BYTES + 3, any::<u8>())
                .prop_map(|(n, s)| Some(automerge_like(n, s))),
        ];
        let key = prop_oneof![
            record_name().prop_map(doc),
            record_name().prop_map(view),
            prop::sample::select(vec![
                b"c1".to_vec(),
                b"e".to_vec(),
                b"mx".to_vec(),
                b"w\0".to_vec(),
                b"B".to_vec(),
            ]),
        ];
        (key, value)
    }

    proptest! {
        /// Whatever batches write, the store reads through pairs exactly what a plain map of its
        /// keys holds (a view going with its document), and the engine holds one key a record.
        #[test]
        fn reads_what_a_plain_keyspace_would(
            batches in prop::collection::vec(prop::collection::vec(op(), 1..8), 1..12),
            limits in prop::collection::vec(1usize..6, 4),
            forget_apart in prop::collection::vec(any::<bool>(), 12),
        ) {
            let raw = MemoryKv::new();
            let paired = Paired::open(Box::new(raw.clone()), super::super::implied::expand).unwrap();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for (ops, forget) in batches.iter().zip(forget_apart) {
                if forget {
                    // As after a failed batch: pairs are read to know.
                    *paired.apart.lock().unwrap() = None;
                }
                apply(&paired, ops).unwrap();
                for (key, value) in ops {
                    match value {
                        Some(value) => model.insert(key.clone(), value.clone()),
                        None => model.remove(key),
                    };
                }
                let orphans: Vec<Vec<u8>> = model
                    .keys()
                    .filter(|k| k.first() == Some(&b'v'))
                    .filter(|k| !model.contains_key(&doc(std::str::from_utf8(&k[1..]).unwrap())))
                    .cloned()
                    .collect();
                for key in orphans {
                    model.remove(&key);
                }
                model.remove(META_PAIRED);
                for (i, start) in BOUNDS.iter().enumerate() {
                    for end in &BOUNDS[i..] {
                        let expected: Vec<Pair> = model
                            .range::<[u8], _>((std::ops::Bound::Included(*start), std::ops::Bound::Excluded(*end)))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        let mut whole = paired.range(start, end, usize::MAX).unwrap();
                        whole.retain(|(k, _)| k != META_PAIRED);
                        prop_assert_eq!(&whole, &expected);
                        for &limit in &limits {
                            let page = paired.range(start, end, limit).unwrap();
                            let upto: Vec<Pair> = paired
                                .range(start, end, usize::MAX)
                                .unwrap()
                                .into_iter()
                                .take(limit)
                                .collect();
                            prop_assert_eq!(page, upto);
                        }
                        let meta = u64::from(start <= &META_PAIRED && META_PAIRED < *end);
                        prop_assert_eq!(paired.count(start, end).unwrap(), expected.len() as u64 + meta);
                        let last = paired.last_key(start, end).unwrap();
                        let expected_last = expected.last().map(|(k, _)| k.clone());
                        if meta == 0 || expected_last.as_deref().is_some_and(|k| k > META_PAIRED) {
                            prop_assert_eq!(last, expected_last);
                        }
                    }
                }
                for (key, value) in &model {
                    let read = paired.get(key).unwrap();
                    prop_assert_eq!(read.as_ref(), Some(value));
                }
                let documents = model.keys().filter(|k| k.first() == Some(&b'd')).count();
                let stored = raw_keys(&raw);
                prop_assert!(stored.iter().all(|k| k.first() != Some(&b'v')));
                prop_assert_eq!(stored.iter().filter(|k| k.first() == Some(&b'd')).count(), documents);
                let long = model
                    .iter()
                    .filter(|(k, v)| k.first() == Some(&b'd') && v.len() > APART_BYTES)
                    .count();
                prop_assert_eq!(stored.iter().filter(|k| k.first() == Some(&b'D')).count(), long);
            }
        }
    }

    #[test]
    fn a_batch_writing_a_view_keeps_the_document_and_one_without_a_document_writes_nothing() {
        let raw = MemoryKv::new();
        let paired = Paired::open(Box::new(raw.clone()), super::super::implied::expand).unwrap();
        let long = automerge_like(APART_BYTES + 1, 7);
        apply(&paired, &[(doc("C\0a"), Some(long.clone()))]).unwrap();
        apply(&paired, &[(view("C\0a"), Some(b"{}".to_vec()))]).unwrap();
        apply(&paired, &[(view("C\0b"), Some(b"{}".to_vec()))]).unwrap();
        assert_eq!(paired.get(&doc("C\0a")).unwrap(), Some(long));
        assert_eq!(paired.get(&view("C\0a")).unwrap(), Some(b"{}".to_vec()));
        assert_eq!(paired.get(&view("C\0b")).unwrap(), None);
        let short = automerge_like(10, 1);
        apply(&paired, &[(doc("C\0a"), Some(short.clone()))]).unwrap();
        assert_eq!(paired.get(&doc("C\0a")).unwrap(), Some(short));
        assert_eq!(paired.get(&view("C\0a")).unwrap(), Some(b"{}".to_vec()));
        assert!(raw_keys(&raw).iter().all(|k| k.first() != Some(&b'D')));
    }

    /// A stand-in for `implied::expand`: the short form `S` and a view give the view's bytes
    /// after `AM`; anything else gives nothing.
    fn toy_expand(short: &[u8], view: &[u8]) -> Option<Vec<u8>> {
        (short == b"S").then(|| [b"AM".as_slice(), view].concat())
    }

    fn put_with_short(kv: &dyn Kv, record: &str, document: &[u8], view_bytes: &[u8]) {
        let mut batch = Batch::default();
        batch.put_record(
            doc(record),
            document.to_vec(),
            view(record),
            view_bytes.to_vec(),
            Some(b"S".to_vec()),
        );
        kv.apply(batch).unwrap();
    }

    #[test]
    fn a_short_form_is_kept_only_for_the_document_and_view_it_was_offered_with() {
        let raw = MemoryKv::new();
        let paired = Paired::open(Box::new(raw.clone()), toy_expand).unwrap();
        put_with_short(&paired, "C\0a", b"AMv1", b"v1");
        let stored = raw.get(&doc("C\0a")).unwrap().unwrap();
        assert!(parse(&stored).unwrap().short);
        assert_eq!(stored, encode_short(b"S", b"v1"));
        assert_eq!(paired.get(&doc("C\0a")).unwrap(), Some(b"AMv1".to_vec()));
        assert_eq!(paired.get(&view("C\0a")).unwrap(), Some(b"v1".to_vec()));
        assert_eq!(
            paired
                .range(&doc(""), &keys::prefix_end(keys::DOC_ALL), 10)
                .unwrap(),
            vec![(doc("C\0a"), b"AMv1".to_vec())]
        );

        // A later write of the document or view in the same batch: the document as it is.
        let mut batch = Batch::default();
        batch.put_record(
            doc("C\0b"),
            b"AMv2".to_vec(),
            view("C\0b"),
            b"v2".to_vec(),
            Some(b"S".to_vec()),
        );
        batch.put(view("C\0b"), b"v3".to_vec());
        batch.put_record(
            doc("C\0c"),
            b"AMv4".to_vec(),
            view("C\0c"),
            b"v4".to_vec(),
            Some(b"S".to_vec()),
        );
        batch.put(doc("C\0c"), b"AMv5".to_vec());
        paired.apply(batch).unwrap();
        for (record, document, view_bytes) in [("C\0b", "AMv2", "v3"), ("C\0c", "AMv5", "v4")] {
            let stored = raw.get(&doc(record)).unwrap().unwrap();
            assert!(!parse(&stored).unwrap().short, "{record}");
            assert_eq!(
                paired.get(&doc(record)).unwrap(),
                Some(document.as_bytes().to_vec())
            );
            assert_eq!(
                paired.get(&view(record)).unwrap(),
                Some(view_bytes.as_bytes().to_vec())
            );
        }

        // The view written alone: the document it implied is stored expanded, and stays.
        apply(&paired, &[(view("C\0a"), Some(b"other".to_vec()))]).unwrap();
        assert!(
            !parse(&raw.get(&doc("C\0a")).unwrap().unwrap())
                .unwrap()
                .short
        );
        assert_eq!(paired.get(&doc("C\0a")).unwrap(), Some(b"AMv1".to_vec()));
        assert_eq!(paired.get(&view("C\0a")).unwrap(), Some(b"other".to_vec()));

        // A short form that does not expand is a damaged pair, and the view alone cannot
        // be written over it.
        let mut bad = Batch::default();
        bad.put(doc("C\0d"), encode_short(b"X", b"v"));
        raw.apply(bad).unwrap();
        assert_eq!(damaged(paired.get(&doc("C\0d"))), doc("C\0d"));
        assert_eq!(paired.get(&view("C\0d")).unwrap(), Some(b"v".to_vec()));
        assert_eq!(
            damaged(apply(&paired, &[(view("C\0d"), Some(b"w".to_vec()))])),
            view("C\0d")
        );
        // Removing the record removes its pair.
        apply(&paired, &[(doc("C\0a"), None), (view("C\0a"), None)]).unwrap();
        assert_eq!(raw.get(&doc("C\0a")).unwrap(), None);
    }

    /// The key a read or write says is damaged.
    fn damaged<T>(result: Result<T, KvError>) -> Vec<u8> {
        match result {
            Err(KvError::Damaged(key)) => key,
            other => panic!("expected damage, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_damaged_pair_is_named_as_the_key_read_and_only_a_whole_write_replaces_it() {
        let raw = MemoryKv::new();
        let paired = Paired::open(Box::new(raw.clone()), super::super::implied::expand).unwrap();
        apply(
            &paired,
            &[
                (doc("C\0a"), Some(automerge_like(20, 1))),
                (view("C\0a"), Some(b"{\"n\":1}".to_vec())),
                (doc("C\0b"), Some(automerge_like(20, 2))),
                (view("C\0b"), Some(b"{\"n\":2}".to_vec())),
            ],
        )
        .unwrap();
        assert!(raw.damage(&doc("C\0a")));
        assert_eq!(damaged(paired.get(&doc("C\0a"))), doc("C\0a"));
        assert_eq!(damaged(paired.get(&view("C\0a"))), view("C\0a"));
        assert_eq!(damaged(paired.range(b"v", b"w", 10)), view("C\0a"));
        assert_eq!(damaged(paired.range(b"d", b"e", 10)), doc("C\0a"));
        // What lies before and after the damage reads.
        assert_eq!(paired.range(&view("C\0b"), b"w", 10).unwrap().len(), 1);
        assert_eq!(
            damaged(apply(&paired, &[(view("C\0a"), Some(b"{}".to_vec()))])),
            view("C\0a")
        );
        apply(
            &paired,
            &[
                (doc("C\0a"), Some(automerge_like(20, 3))),
                (view("C\0a"), Some(b"{}".to_vec())),
            ],
        )
        .unwrap();
        assert_eq!(paired.get(&view("C\0a")).unwrap(), Some(b"{}".to_vec()));
        assert!(raw.damage(&doc("C\0b")));
        apply(&paired, &[(doc("C\0b"), None), (view("C\0b"), None)]).unwrap();
        assert_eq!(paired.get(&doc("C\0b")).unwrap(), None);
    }

    #[test]
    fn a_store_written_before_pairs_is_converted_once_and_reads_the_same() {
        let raw = MemoryKv::new();
        let long = automerge_like(APART_BYTES + 100, 9);
        let legacy = [
            (doc("C\0a"), Some(automerge_like(30, 1))),
            (view("C\0a"), Some(b"{\"a\":1}".to_vec())),
            (doc("C\0b"), Some(long.clone())),
            (view("C\0b"), Some(b"{\"b\":1}".to_vec())),
            // A document whose view a rebuild has not written yet.
            (doc("C\0c"), Some(automerge_like(30, 3))),
            // Damaged below: it stays, its view goes.
            (doc("C\0d"), Some(automerge_like(30, 4))),
            (view("C\0d"), Some(b"{\"d\":1}".to_vec())),
            // A view of no document.
            (view("C\0z"), Some(b"{}".to_vec())),
            (b"q1".to_vec(), Some(b"entry".to_vec())),
        ];
        apply(&raw, &legacy).unwrap();
        // One record converted already, as by an open a crash cut short.
        apply(
            &raw,
            &[
                (doc("B\0a"), Some(encode(Some(b"\x85doc"), Some(b"{}")))),
                (view("B\0a"), None),
            ],
        )
        .unwrap();
        assert!(raw.damage(&doc("C\0d")));
        let paired = Paired::open(Box::new(raw.clone()), super::super::implied::expand).unwrap();
        assert_eq!(paired.get(&doc("B\0a")).unwrap(), Some(b"\x85doc".to_vec()));
        assert_eq!(paired.get(&view("B\0a")).unwrap(), Some(b"{}".to_vec()));
        assert_eq!(
            paired.get(&view("C\0a")).unwrap(),
            Some(b"{\"a\":1}".to_vec())
        );
        assert_eq!(paired.get(&doc("C\0b")).unwrap(), Some(long));
        assert_eq!(
            paired.get(&view("C\0b")).unwrap(),
            Some(b"{\"b\":1}".to_vec())
        );
        assert!(paired.get(&doc("C\0c")).unwrap().is_some());
        assert_eq!(paired.get(&view("C\0c")).unwrap(), None);
        assert!(matches!(paired.get(&doc("C\0d")), Err(KvError::Damaged(_))));
        assert_eq!(paired.get(&view("C\0z")).unwrap(), None);
        assert_eq!(paired.get(b"q1").unwrap(), Some(b"entry".to_vec()));
        let stored = raw_keys_after_damage(&raw);
        assert!(
            stored.iter().all(|k| k.first() != Some(&b'v')),
            "{stored:?}"
        );
        assert!(stored.contains(&apart_key(b"C\0b")));
        // Converted once: a second open writes nothing.
        let before = raw_keys_after_damage(&raw);
        drop(paired);
        let _again = Paired::open(Box::new(raw.clone()), super::super::implied::expand).unwrap();
        assert_eq!(raw_keys_after_damage(&raw), before);
    }

    /// On sled: a store written before pairs (a document long enough for the engine's chunks
    /// among them) is converted, the conversion is durable, and a reopened store reads the same.
    #[test]
    fn a_sled_store_written_before_pairs_converts_durably() {
        use crate::store::kv::SledKv;
        let dir = tempfile::tempdir().unwrap();
        let long = automerge_like(10_000, 5);
        {
            let sled = SledKv::open(dir.path(), 1 << 20).unwrap();
            apply(
                &sled,
                &[
                    (doc("C\0a"), Some(automerge_like(40, 1))),
                    (view("C\0a"), Some(b"{\"a\":1}".to_vec())),
                    (doc("C\0b"), Some(long.clone())),
                    (view("C\0b"), Some(b"{\"b\":1}".to_vec())),
                ],
            )
            .unwrap();
            sled.flush().unwrap();
        }
        let read_back = |paired: &Paired| {
            assert_eq!(
                paired.get(&view("C\0a")).unwrap(),
                Some(b"{\"a\":1}".to_vec())
            );
            assert_eq!(paired.get(&doc("C\0b")).unwrap(), Some(long.clone()));
            assert_eq!(paired.count(b"d", b"e").unwrap(), 2);
            assert_eq!(paired.range(b"v", b"w", 10).unwrap().len(), 2);
        };
        {
            let sled = SledKv::open(dir.path(), 1 << 20).unwrap();
            read_back(&Paired::open(Box::new(sled), super::super::implied::expand).unwrap());
        }
        let sled = SledKv::open(dir.path(), 1 << 20).unwrap();
        assert!(sled.get(META_PAIRED).unwrap().is_some());
        assert_eq!(sled.count(b"v", b"w").unwrap(), 0);
        read_back(&Paired::open(Box::new(sled), super::super::implied::expand).unwrap());
    }

    /// Every key the engine holds, a damaged value included.
    fn raw_keys_after_damage(raw: &MemoryKv) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        let mut end = vec![0xff];
        while let Some(key) = raw.last_key(b"", &end).unwrap() {
            end.clone_from(&key);
            keys.push(key);
        }
        keys.reverse();
        keys
    }

    #[test]
    fn pairs_encode_and_parse_back_and_other_bytes_are_refused() {
        for (document, view) in [
            (Some(&b"\x85abc"[..]), Some(&b"{}"[..])),
            (Some(&[0x85; 300][..]), None),
            (None, Some(&b"{}"[..])),
            (None, None),
            (Some(&b""[..]), Some(&b""[..])),
        ] {
            let bytes = encode(document, view);
            let parsed = parse(&bytes).unwrap();
            assert_eq!((parsed.document, parsed.view), (document, view));
        }
        for bytes in [
            &b""[..],
            &[0x85, 0x6f][..],
            &[PAIR_TAG][..],
            &[PAIR_TAG, 4][..],
            &[PAIR_TAG, 0, 5, 1][..],
            &[PAIR_TAG, 0, 0xff][..],
            &[PAIR_TAG, FLAG_APART, 1][..],
        ] {
            assert!(parse(bytes).is_none(), "{bytes:?}");
        }
    }
}
