//! A new record's document kept as the few bytes its view does not already hold.
//!
//! A record created by one plain change (`record::first_change`: scalar fields set on an empty
//! document) has that change as its document, and a view holding the same fields. The change's
//! bytes follow from its actor, time and message and the view's fields: `first_change::encode`
//! writes them exactly as Automerge does. So the store offers the engine a *short form* of such
//! a document, `[FORMAT][actor length][actor][time, i64 LE][message]` (about 30 bytes against a
//! change of a few hundred), kept in the record's pair instead of the document
//! (`store::paired`), and expanded again whenever the document is read.
//!
//! A short form is made only for a change `first_change::encode` writes byte for byte from the
//! fields the view holds (the store's own new records are written so; a change from elsewhere
//! is checked here), and an expansion is accepted only when the change it writes is the
//! one the view names as the record's head: a view that does not imply its document reads as a
//! damaged pair, never as another document.
//!
//! Owns: the short form's layout, making it and expanding it. Must not touch: how pairs are
//! stored (`paired`), what a view holds (`views`), how a change is encoded (`first_change`).

use super::views;
use crate::record::{Fields, first_change};
use automerge::ActorId;
use std::collections::BTreeSet;

/// The short form's first byte: its layout's version.
const FORMAT: u8 = 1;

/// The short form of the first change `actor` made at `time_ms` with `message`, setting the
/// fields its record's view holds, as `first_change::encode` writes it from them.
pub(super) fn short_form(actor: &ActorId, time_ms: i64, message: &str) -> Option<Vec<u8>> {
    let actor = actor.to_bytes();
    let actor_len = u8::try_from(actor.len()).ok()?;
    let mut short = Vec::with_capacity(10 + actor.len() + message.len());
    short.push(FORMAT);
    short.push(actor_len);
    short.extend_from_slice(actor);
    short.extend_from_slice(&time_ms.to_le_bytes());
    short.extend_from_slice(message.as_bytes());
    Some(short)
}

/// The short form of `document`, a first change from elsewhere by `actor` at `time_ms` with
/// `message`, read as setting `fields` (the fields its record's view is made of); `None` unless
/// `first_change::encode` writes `document` exactly from them. The view holds `fields` as JSON
/// text, which reads back as the same values (`serde_json` with `float_roundtrip`), so the
/// expansion gives `document` back.
pub(super) fn shorten(
    actor: &ActorId,
    time_ms: i64,
    message: &str,
    fields: &Fields,
    document: &[u8],
) -> Option<Vec<u8>> {
    let written = first_change::encode(actor, time_ms, message, fields, &BTreeSet::new())?;
    (written.bytes == document).then(|| short_form(actor, time_ms, message))?
}

/// The document `short` stands for, with its record's `view`; `None` when they do not give the
/// change the view names as the record's one head.
pub fn expand(short: &[u8], view: &[u8]) -> Option<Vec<u8>> {
    let (&FORMAT, rest) = short.split_first()? else {
        return None;
    };
    let (&actor_len, rest) = rest.split_first()?;
    let (actor, rest) = rest.split_at_checked(usize::from(actor_len))?;
    let (time, message) = rest.split_first_chunk::<8>()?;
    let message = std::str::from_utf8(message).ok()?;
    let (fields, heads) = views::fields_and_heads(view)?;
    let fields: Fields = serde_json::from_str(fields).ok()?;
    let change = first_change::encode(
        &ActorId::from(actor),
        i64::from_le_bytes(*time),
        message,
        &fields,
        &BTreeSet::new(),
    )?;
    (heads == [change.hash.0]).then_some(change.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;
    use crate::resolve::Policy;
    use serde_json::json;

    fn fields(value: serde_json::Value) -> Fields {
        match value {
            serde_json::Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn actor() -> ActorId {
        ActorId::from([7u8; 16].as_slice())
    }

    const TIME: i64 = 1_700_000_000_123;

    /// A record's first change and view, as the store writes them, and the change's short form
    /// as a device receiving it makes it.
    fn created(fields: &Fields) -> (first_change::EncodedChange, Vec<u8>, Vec<u8>) {
        let change = first_change::encode(&actor(), TIME, "create", fields, &BTreeSet::new())
            .expect("plain fields");
        let view = views::of_new_record(fields, change.hash, &Policy::default()).expect("view");
        let short = shorten(&actor(), TIME, "create", fields, &change.bytes).expect("short form");
        (change, view, short)
    }

    #[test]
    fn a_short_form_expands_to_the_document_it_was_made_of() {
        let fields =
            fields(json!({"name": "Ada", "n": 3, "neg": -4, "f": 2.5, "ok": true, "none": null}));
        let (change, view, short) = created(&fields);
        assert!(short.len() < 40, "{} bytes", short.len());
        assert_eq!(short_form(&actor(), TIME, "create"), Some(short.clone()));
        assert_eq!(expand(&short, &view), Some(change.bytes.clone()));
        // Automerge loads the expanded bytes as the record it created.
        let mut record = Record::load(&change.bytes, &actor()).unwrap();
        assert_eq!(record.heads(), vec![change.hash]);
    }

    #[test]
    fn no_short_form_for_another_document_or_view() {
        let fields = fields(json!({"name": "Ada"}));
        let (change, _, short) = created(&fields);
        // Another time, actor or message writes another change.
        assert_eq!(shorten(&actor(), 1, "create", &fields, &change.bytes), None);
        let other = ActorId::from([8u8; 16].as_slice());
        assert_eq!(
            shorten(&other, TIME, "create", &fields, &change.bytes),
            None
        );
        assert_eq!(
            shorten(&actor(), TIME, "update", &fields, &change.bytes),
            None
        );
        // Other fields write another change.
        let bob = self::fields(json!({"name": "Bob"}));
        assert_eq!(shorten(&actor(), TIME, "create", &bob, &change.bytes), None);
        // The short form holds no fields: with another record's view it gives that record's
        // change, the one the view names; with a view naming another change, nothing.
        let (bob_change, bob_view, _) = created(&bob);
        assert_eq!(expand(&short, &bob_view), Some(bob_change.bytes));
        let relabelled = views::of_new_record(&bob, change.hash, &Policy::default()).unwrap();
        assert_eq!(expand(&short, &relabelled), None);
    }

    #[test]
    fn damaged_short_forms_expand_to_nothing() {
        let fields = fields(json!({"name": "Ada"}));
        let (_, view, short) = created(&fields);
        for cut in 0..short.len() {
            assert_eq!(expand(&short[..cut], &view), None, "cut at {cut}");
        }
        for at in 0..short.len() {
            let mut damaged = short.clone();
            damaged[at] ^= 0x40;
            assert_eq!(expand(&damaged, &view), None, "byte {at}");
        }
        assert_eq!(expand(&short, b"not a view"), None);
    }
}
