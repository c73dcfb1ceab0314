//! LZ4 compression of payloads (with the `compression` feature).
//!
//! Levels: `0` is off. `1..=9` all select LZ4 block compression as implemented by
//! [`lz4_flex`], which has a single (fast) mode: about 1-3 GB/s to compress and several GB/s
//! to decompress, typically 2-4x smaller for text-like data. The level is accepted for
//! compatibility with the reference design; higher levels do not compress harder. Whatever the
//! level, a payload that LZ4 does not shrink is stored uncompressed (the record's
//! `compressed` flag reports what was actually done).

use crate::error::{Result, StorageError};

/// Highest accepted compression level.
pub const MAX_LEVEL: u8 = 9;

/// Checks a level is in `0..=9`.
pub fn check_level(level: u8) -> Result<()> {
    if level > MAX_LEVEL {
        Err(StorageError::InvalidCompressionLevel(level))
    } else {
        Ok(())
    }
}

/// Compresses `data` into a new buffer that starts with `prefix` zero bytes (room for the
/// caller's header) and has capacity for `spare` more bytes after the compressed block (room
/// for a trailer), so the caller appends without reallocating. The compressed block is the
/// uncompressed length as a little-endian `u32` followed by an LZ4 block, as
/// [`decompress`] reads it. `None` when it does not get smaller than `data`.
#[cfg(feature = "compression")]
pub fn compress_after(prefix: usize, data: &[u8], spare: usize) -> Option<Vec<u8>> {
    u32::try_from(data.len()).ok()?;
    // lz4_flex's own allocating entry point is its fastest (an unchecked output sink); the
    // copy behind the prefix costs little next to the compression itself.
    let block = lz4_flex::block::compress_prepend_size(data);
    (block.len() < data.len()).then(|| {
        let mut out = Vec::with_capacity(prefix + block.len() + spare);
        out.resize(prefix, 0);
        out.extend_from_slice(&block);
        out
    })
}

/// Without the `compression` feature nothing is compressed.
#[cfg(not(feature = "compression"))]
pub fn compress_after(_prefix: usize, _data: &[u8], _spare: usize) -> Option<Vec<u8>> {
    None
}

/// Decompresses a payload written by [`compress_after`], refusing sizes no LZ4 block can produce.
pub fn decompress(key: &str, data: &[u8]) -> Result<Vec<u8>> {
    #[cfg(feature = "compression")]
    {
        let claimed = data
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| {
                StorageError::corrupt(key, "compressed payload shorter than its size field")
            })?;
        // LZ4 cannot expand more than ~255x; a larger claim is damage, not data.
        if claimed > (data.len() - 4).saturating_mul(255) + 16 {
            return Err(StorageError::corrupt(
                key,
                format!("compressed payload claims an impossible size of {claimed} bytes"),
            ));
        }
        lz4_flex::block::decompress_size_prepended(data)
            .map_err(|e| StorageError::corrupt(key, format!("LZ4 data is damaged: {e}")))
    }
    #[cfg(not(feature = "compression"))]
    {
        let _ = data;
        Err(StorageError::FeatureDisabled {
            feature: "compression",
            what: format!("reading the compressed record {key:?}"),
        })
    }
}
