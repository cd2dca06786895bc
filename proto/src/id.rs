//! Time-ordered unique record ids (the ULID layout: 48-bit milliseconds, 80 random bits, in
//! Crockford base32), so that ids sort by creation time and listing a collection pages in the
//! order records were made.

/// Generates ids that increase strictly, even within one millisecond or when the clock steps
/// back: the random part is then incremented instead of redrawn.
#[derive(Debug, Default, Clone)]
pub struct IdGenerator {
    last: Option<u128>,
}

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl IdGenerator {
    pub fn new() -> Self {
        Self::default()
    }

    /// `now_ms` is Unix time in milliseconds; `random` supplies the 80 random bits.
    pub fn next(&mut self, now_ms: u64, random: [u8; 10]) -> String {
        let mut rand_part = [0u8; 16];
        rand_part[6..].copy_from_slice(&random);
        let fresh = (u128::from(now_ms & 0xFFFF_FFFF_FFFF) << 80) | u128::from_be_bytes(rand_part);
        let next = match self.last {
            Some(last) if fresh <= last => last.wrapping_add(1),
            _ => fresh,
        };
        self.last = Some(next);
        encode(next)
    }
}

// `& 0x1F` keeps every index below 32, the length of `ALPHABET`, a `[u8; 32]`.
#[allow(clippy::indexing_slicing)]
fn encode(value: u128) -> String {
    (0..26)
        .rev()
        .map(|i| ALPHABET[((value >> (i * 5)) & 0x1F) as usize] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_26_chars_and_increase() {
        let mut g = IdGenerator::new();
        let a = g.next(1_700_000_000_000, [0xFF; 10]);
        let b = g.next(1_700_000_000_000, [0x00; 10]);
        let c = g.next(1_600_000_000_000, [0x00; 10]);
        let d = g.next(1_700_000_000_001, [0x00; 10]);
        assert_eq!(a.len(), 26);
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
    }

    #[test]
    fn known_encoding() {
        let mut g = IdGenerator::new();
        assert_eq!(g.next(0, [0; 10]), "00000000000000000000000000");
        let mut g = IdGenerator::new();
        assert_eq!(g.next(1, [0; 10]), "00000000010000000000000000");
    }
}
