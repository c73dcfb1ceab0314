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

/// Compresses `data`; `None` when it does not get smaller.
#[cfg(feature = "compression")]
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    let out = lz4_flex::block::compress_prepend_size(data);
    (out.len() < data.len()).then_some(out)
}

/// Without the `compression` feature nothing is compressed.
#[cfg(not(feature = "compression"))]
pub fn compress(_data: &[u8]) -> Option<Vec<u8>> {
    None
}

/// Decompresses a payload written by [`compress`], refusing sizes no LZ4 block can produce.
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
