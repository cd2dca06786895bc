//! Record addresses (`collection/id`) and the bounds every peer enforces on them.

use serde::{Deserialize, Serialize};

/// Bounds on what a record may be. Every peer checks the same limits, so a record accepted on one
/// device is accepted everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest collection name, in bytes.
    pub max_collection_bytes: usize,
    /// Longest record id, in bytes.
    pub max_id_bytes: usize,
    /// Largest record, measured as its compact JSON encoding, in bytes.
    pub max_record_bytes: usize,
    /// Deepest nesting of objects and arrays inside a record.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_collection_bytes: 64,
            max_id_bytes: 256,
            max_record_bytes: 1024 * 1024,
            max_depth: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("collection name is empty: give a name such as `Customer`")]
    EmptyCollection,
    #[error("collection name is {len} bytes, over the limit of {max}: use a shorter name")]
    CollectionTooLong { len: usize, max: usize },
    #[error(
        "collection name {name:?} has a character other than ASCII letters, digits, `_`, `-` or `.`, or does not start with a letter"
    )]
    CollectionCharacters { name: String },
    #[error("record id is empty: give an id, or leave it out to have one generated")]
    EmptyId,
    #[error("record id is {len} bytes, over the limit of {max}: use a shorter id")]
    IdTooLong { len: usize, max: usize },
    #[error("record id contains a control character (U+{code:04X}): ids must be printable text")]
    IdControlCharacter { code: u32 },
}

/// Collection names are identifiers: they appear in file names, URLs and config keys.
pub fn validate_collection(name: &str, limits: &Limits) -> Result<(), AddressError> {
    let first = name.chars().next().ok_or(AddressError::EmptyCollection)?;
    if name.len() > limits.max_collection_bytes {
        return Err(AddressError::CollectionTooLong {
            len: name.len(),
            max: limits.max_collection_bytes,
        });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if !first.is_ascii_alphabetic() || !name.chars().all(allowed) {
        return Err(AddressError::CollectionCharacters {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Record ids are any printable text up to the bound; control characters are refused because
/// they would corrupt line-based output and key encodings.
pub fn validate_record_id(id: &str, limits: &Limits) -> Result<(), AddressError> {
    if id.is_empty() {
        return Err(AddressError::EmptyId);
    }
    if id.len() > limits.max_id_bytes {
        return Err(AddressError::IdTooLong {
            len: id.len(),
            max: limits.max_id_bytes,
        });
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(AddressError::IdControlCharacter { code: c as u32 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names() {
        let l = Limits::default();
        assert!(validate_collection("Customer", &l).is_ok());
        assert!(validate_collection("invoice_line-2.v1", &l).is_ok());
        assert_eq!(
            validate_collection("", &l),
            Err(AddressError::EmptyCollection)
        );
        assert!(matches!(
            validate_collection("1abc", &l),
            Err(AddressError::CollectionCharacters { .. })
        ));
        assert!(matches!(
            validate_collection("a/b", &l),
            Err(AddressError::CollectionCharacters { .. })
        ));
        assert!(matches!(
            validate_collection(&"a".repeat(65), &l),
            Err(AddressError::CollectionTooLong { len: 65, max: 64 })
        ));
    }

    #[test]
    fn record_ids() {
        let l = Limits::default();
        assert!(validate_record_id("42", &l).is_ok());
        assert!(validate_record_id("ünïcødé/with spaces/🚢", &l).is_ok());
        assert_eq!(validate_record_id("", &l), Err(AddressError::EmptyId));
        assert_eq!(
            validate_record_id("a\nb", &l),
            Err(AddressError::IdControlCharacter { code: 10 })
        );
        assert!(matches!(
            validate_record_id(&"x".repeat(257), &l),
            Err(AddressError::IdTooLong { .. })
        ));
    }
}
