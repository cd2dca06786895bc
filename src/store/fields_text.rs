//! A record's fields as the JSON object text its view keeps. Reads hand that text on as it is
//! (`get`, `list`, queries, the change feed, `export`), so that answering a read neither parses
//! the fields nor writes them out again; a caller that needs values parses them (`parse`), or
//! only the ones it looks at (`pick`, what queries compare).
//!
//! Owns: the text's checks (valid JSON, an object) and its (de)serialization. Must not touch:
//! how views are stored or computed (`views`).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::record::Fields;

/// A JSON object's text: checked (it parses, and it is an object), or as this store wrote it.
#[derive(Clone)]
pub struct FieldsText(Box<str>);

/// Text that is not a JSON object of fields.
#[derive(Debug, thiserror::Error)]
#[error("the fields are not a JSON object: {0}")]
pub struct NotFields(String);

/// The name under which serde_json's serializer writes a struct's one string field as the JSON
/// text it holds: what `RawValue` serializes as, taken here so that text read from a view is
/// written out without being parsed again to make a `RawValue` of it (the test
/// `text_passes_through_serialization_as_it_is` pins it).
const RAW_JSON: &str = "$serde_json::private::RawValue";

impl FieldsText {
    /// The text of `fields`.
    pub fn of(fields: &Fields) -> Result<Self, NotFields> {
        serde_json::to_string(fields)
            .map(|text| FieldsText(text.into_boxed_str()))
            .map_err(|e| NotFields(e.to_string()))
    }

    /// Checks `text` and keeps a copy.
    pub fn from_text(text: &str) -> Result<Self, NotFields> {
        let raw: Box<RawValue> =
            serde_json::from_str(text).map_err(|e| NotFields(e.to_string()))?;
        Self::checked(raw)
    }

    /// Text this store wrote with `of` and kept under its value's checksum (a record's view),
    /// taken without parsing it again: a read hands it on as it is. Only its ends are looked
    /// at, which finds a text cut short.
    pub(crate) fn stored(text: &str) -> Result<Self, NotFields> {
        if text.starts_with('{') && text.ends_with('}') {
            Ok(FieldsText(text.into()))
        } else {
            Err(NotFields(format!("found {}", truncated(text))))
        }
    }

    fn checked(raw: Box<RawValue>) -> Result<Self, NotFields> {
        // `RawValue` keeps the value's text without surrounding whitespace.
        if raw.get().starts_with('{') {
            Ok(FieldsText(raw.into()))
        } else {
            Err(NotFields(format!("found {}", truncated(raw.get()))))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Every field's value.
    pub fn parse(&self) -> Result<Fields, NotFields> {
        serde_json::from_str(self.as_str()).map_err(|e| NotFields(e.to_string()))
    }

    /// One field's value; `None` when it is absent (or when the text cannot be read, which
    /// `from_text` and deserializing rule out).
    pub fn get(&self, name: &str) -> Option<serde_json::Value> {
        self.pick(|field| field == name).ok()?.remove(name)
    }

    /// The values of the fields `wanted` names; the others are read past, not built.
    pub fn pick(&self, wanted: impl Fn(&str) -> bool) -> Result<Fields, NotFields> {
        let mut reader = serde_json::Deserializer::from_str(self.as_str());
        Pick(wanted)
            .deserialize(&mut reader)
            .map_err(|e| NotFields(e.to_string()))
    }
}

fn truncated(text: &str) -> &str {
    let end = text.char_indices().nth(40).map_or(text.len(), |(at, _)| at);
    text.get(..end).unwrap_or(text)
}

impl fmt::Debug for FieldsText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for FieldsText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Two texts are equal when they hold the same fields, whatever their spacing or key order.
impl PartialEq for FieldsText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
            || matches!((self.parse(), other.parse()), (Ok(a), Ok(b)) if a == b)
    }
}

/// Text equals a map when it holds those fields.
impl PartialEq<Fields> for FieldsText {
    fn eq(&self, other: &Fields) -> bool {
        self.parse().is_ok_and(|fields| &fields == other)
    }
}

impl Serialize for FieldsText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut raw = serializer.serialize_struct(RAW_JSON, 1)?;
        raw.serialize_field(RAW_JSON, self.as_str())?;
        raw.end()
    }
}

impl<'de> Deserialize<'de> for FieldsText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        FieldsText::checked(raw).map_err(de::Error::custom)
    }
}

/// Reads an object keeping the fields its predicate names.
struct Pick<F>(F);

impl<'de, F: Fn(&str) -> bool> DeserializeSeed<'de> for Pick<F> {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Fields, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, F: Fn(&str) -> bool> Visitor<'de> for Pick<F> {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of fields")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut picked = Fields::new();
        while let Some(Key(name)) = map.next_key()? {
            if (self.0)(&name) {
                picked.insert(name.into_owned(), map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(picked)
    }
}

/// A key, borrowed from the text unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: serde_json::Value) -> Fields {
        match value {
            serde_json::Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn text_passes_through_serialization_as_it_is() {
        let text = FieldsText::from_text(r#"{"b":1,"a":"x\"y"}"#).unwrap();
        #[derive(Serialize)]
        struct Reply<'a> {
            fields: &'a FieldsText,
        }
        let out = serde_json::to_string(&Reply { fields: &text }).unwrap();
        assert_eq!(out, r#"{"fields":{"b":1,"a":"x\"y"}}"#);
        let back: FieldsText = serde_json::from_str(r#" { "a" : "x\"y", "b" : 1 } "#).unwrap();
        assert_eq!(back, text);
        assert_eq!(back.parse().unwrap(), fields(json!({"a": "x\"y", "b": 1})));
    }

    #[test]
    fn stored_text_is_handed_on_unparsed_and_a_cut_one_refused() {
        let written = FieldsText::of(&fields(json!({"a": [1, {"b": "c}"}], "d": null}))).unwrap();
        let read = FieldsText::stored(written.as_str()).unwrap();
        assert_eq!(read.as_str(), written.as_str());
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            json!({"a": [1, {"b": "c}"}], "d": null})
        );
        let text = written.as_str();
        for cut in [&text[..text.len() - 1], &text[1..], ""] {
            assert!(FieldsText::stored(cut).is_err(), "{cut:?} was taken");
        }
    }

    #[test]
    fn only_objects_are_fields() {
        for bad in ["[1]", "1", "\"{\"", "{", "{\"a\":}", ""] {
            assert!(FieldsText::from_text(bad).is_err(), "{bad:?} was taken");
            assert!(
                serde_json::from_str::<FieldsText>(bad).is_err(),
                "{bad:?} was taken"
            );
        }
    }

    #[test]
    fn pick_keeps_only_the_named_fields_and_reads_escaped_names() {
        let text = FieldsText::of(&fields(json!({
            "a": {"deep": [1, 2, {"x": null}]}, "b\"c": 2, "d": "four", "e": [true]
        })))
        .unwrap();
        let picked = text.pick(|name| name == "b\"c" || name == "e").unwrap();
        assert_eq!(picked, fields(json!({"b\"c": 2, "e": [true]})));
        assert_eq!(text.pick(|_| true).unwrap(), text.parse().unwrap());
        assert!(text.pick(|_| false).unwrap().is_empty());
    }

    #[test]
    fn equal_fields_in_another_order_are_equal() {
        let a = FieldsText::from_text(r#"{"a":1,"b":[2]}"#).unwrap();
        let b = FieldsText::from_text(r#"{"b":[2],"a":1}"#).unwrap();
        let c = FieldsText::from_text(r#"{"b":[3],"a":1}"#).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
