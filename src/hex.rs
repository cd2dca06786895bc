//! Lowercase hex text of bytes, and bytes back from it: how heads, change hashes, device ids
//! and token ids are written in answers, keys and logs. Written out here rather than through
//! `format!`, which cost a third of a `list` page's time in a record's heads alone.
//!
//! Owns: the two conversions. Must not touch: anything else.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        for nibble in [byte >> 4, byte & 0x0f] {
            if let Some(&digit) = DIGITS.get(usize::from(nibble)) {
                text.push(char::from(digit));
            }
        }
    }
    text
}

/// Bytes from hex text (either case); `None` if it is not hex.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_matches_formatting_and_decodes_back() {
        let bytes: Vec<u8> = (0..=255).collect();
        let text = encode(&bytes);
        let formatted: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(text, formatted);
        assert_eq!(decode(&text), Some(bytes));
        assert_eq!(decode("0A"), Some(vec![10]));
        for bad in ["0", "0g", "+1", "é0"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
