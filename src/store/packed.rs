//! Values stored compressed when that makes them smaller: a format byte, then the bytes as they
//! are (`PLAIN`) or one zstd frame (`ZSTD`, level 1).
//!
//! Used where many small values are kept together under one key (the relay's log blocks, the
//! device's queue history): what they repeat (names, ids, timestamps) is stored once a value.
//! Unpacking never allocates more than `MAX_UNPACKED` bytes, whatever a damaged frame claims,
//! and keeps one zstd context per thread each way: setting one up costs more than packing or
//! unpacking a few KiB.
//!
//! Owns: that format. Must not touch: what the bytes mean, or keys.

use std::borrow::Cow;
use std::cell::RefCell;

const PLAIN: u8 = 0;
const ZSTD: u8 = 1;
/// Values larger than this are stored as they are: unpacking allocates the whole size at once,
/// which a damaged size must not make large.
pub const MAX_UNPACKED: usize = 1 << 20;
/// zstd level 1, as the wire: most of level 3's ratio on change batches at about twice the speed.
const ZSTD_LEVEL: i32 = 1;

/// Why a stored value cannot be unpacked: it is damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnpackError {
    #[error("empty")]
    Empty,
    #[error("unknown format {0}")]
    UnknownFormat(u8),
    #[error("says it unpacks to {0} bytes, more than a packed value holds")]
    TooLarge(u64),
    #[error("no readable zstd frame")]
    NoFrame,
    #[error("{0}")]
    Zstd(String),
}

/// `raw` as stored: compressed when that makes it smaller and it is at most `MAX_UNPACKED`.
pub fn pack(raw: &[u8]) -> Vec<u8> {
    if raw.len() <= MAX_UNPACKED
        && let Some(packed) = compress(raw)
        && packed.len() < raw.len()
    {
        let mut value = Vec::with_capacity(packed.len() + 1);
        value.push(ZSTD);
        value.extend_from_slice(&packed);
        return value;
    }
    let mut value = Vec::with_capacity(raw.len() + 1);
    value.push(PLAIN);
    value.extend_from_slice(raw);
    value
}

/// Values up to this size are packed through the thread's kept context (about 120 KB for a
/// log block); a larger one, rare, through a context of its own, so that no thread keeps the
/// half megabyte a 1 MiB value grows a context to.
const KEPT_CONTEXT_MAX_BYTES: usize = 64 << 10;

/// One zstd frame of `raw`; `None` when zstd fails.
fn compress(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() > KEPT_CONTEXT_MAX_BYTES {
        return zstd::bulk::compress(raw, ZSTD_LEVEL).ok();
    }
    thread_local! {
        static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { RefCell::new(None) };
    }
    COMPRESSOR.with_borrow_mut(|kept| {
        if kept.is_none() {
            *kept = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        let packed = kept.as_mut()?.compress(raw);
        if packed.is_err() {
            // A context a failure left half-used is not trusted with the next value.
            *kept = None;
        }
        packed.ok()
    })
}

/// Whether `value` was stored compressed.
pub fn is_compressed(value: &[u8]) -> bool {
    value.first() == Some(&ZSTD)
}

/// The bytes `value` was packed from.
pub fn unpack(value: &[u8]) -> Result<Cow<'_, [u8]>, UnpackError> {
    match value.split_first() {
        Some((&PLAIN, raw)) => Ok(Cow::Borrowed(raw)),
        Some((&ZSTD, packed)) => decompress(packed).map(Cow::Owned),
        Some((&format, _)) => Err(UnpackError::UnknownFormat(format)),
        None => Err(UnpackError::Empty),
    }
}

fn decompress(packed: &[u8]) -> Result<Vec<u8>, UnpackError> {
    let size = match zstd::zstd_safe::get_frame_content_size(packed) {
        Ok(Some(size)) if size <= MAX_UNPACKED as u64 => size as usize,
        Ok(Some(size)) => return Err(UnpackError::TooLarge(size)),
        _ => return Err(UnpackError::NoFrame),
    };
    thread_local! {
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { RefCell::new(None) };
    }
    DECOMPRESSOR
        .with_borrow_mut(|kept| {
            if kept.is_none() {
                *kept = Some(zstd::bulk::Decompressor::new()?);
            }
            let unpacked = match kept {
                Some(decompressor) => decompressor.decompress(packed, size),
                None => zstd::bulk::decompress(packed, size),
            };
            if unpacked.is_err() {
                // Whatever a damaged frame left in the context does not reach the next value.
                *kept = None;
            }
            unpacked
        })
        .map_err(|e| UnpackError::Zstd(e.to_string()))
}

/// A frame that claims to unpack to `claimed` bytes (and holds zeros), for tests of the limit.
#[cfg(test)]
pub fn claiming(claimed: usize) -> Vec<u8> {
    let mut value = vec![ZSTD];
    value.extend(zstd::bulk::compress(&vec![0u8; claimed], ZSTD_LEVEL).unwrap_or_default());
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_as_they_were_packed() {
        let repetitive = b"Customer c000000001 device-a ".repeat(40);
        let packed = pack(&repetitive);
        assert!(is_compressed(&packed));
        assert!(packed.len() < repetitive.len() / 4);
        assert_eq!(unpack(&packed).unwrap(), &repetitive[..]);
        // What does not compress is kept as it is.
        let short = b"ab".to_vec();
        let kept = pack(&short);
        assert!(!is_compressed(&kept));
        assert_eq!(unpack(&kept).unwrap(), &short[..]);
        assert!(unpack(&pack(&[])).unwrap().is_empty());
        // So is what is too large to unpack in one allocation.
        let large = vec![7u8; MAX_UNPACKED + 1];
        assert!(!is_compressed(&pack(&large)));
    }

    #[test]
    fn damaged_values_are_refused_and_the_next_one_reads() {
        let raw = b"queue history of a device ".repeat(30);
        let packed = pack(&raw);
        assert_eq!(unpack(&[]), Err(UnpackError::Empty));
        assert_eq!(unpack(&[9, 1, 2]), Err(UnpackError::UnknownFormat(9)));
        assert_eq!(unpack(&[ZSTD, 1, 2, 3]), Err(UnpackError::NoFrame));
        let cut = &packed[..packed.len() - 3];
        assert!(unpack(cut).is_err());
        assert_eq!(
            unpack(&claiming(MAX_UNPACKED + 1)),
            Err(UnpackError::TooLarge(MAX_UNPACKED as u64 + 1))
        );
        assert_eq!(unpack(&packed).unwrap(), &raw[..]);
    }
}
