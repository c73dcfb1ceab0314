//! LZ4 compression of payloads (with the `compression` feature), and [`Compression`], the one
//! type that chooses it everywhere (store default, save, plugin request, snapshot).
//!
//! [`Compression::Lz4`] is LZ4 block compression as implemented by [`lz4_flex`], which has a
//! single (fast) mode: about 1-3 GB/s to compress and several GB/s to decompress, typically
//! 2-4x smaller for text-like data. A payload that LZ4 does not shrink is stored uncompressed
//! (the record's `compressed` flag reports what was actually done).
//!
//! On disk the choice is bit 0 of the envelope's flags byte (see
//! [`envelope`](super::envelope)), as it always was: the numeric levels 1-9 of earlier
//! releases all wrote the same bytes as `Lz4` does now, so their records load unchanged.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};

/// Whether a value is compressed when it is saved.
///
/// Chosen once per store ([`StorageConfig::compression`](crate::StorageConfig::compression),
/// the plugin builder's [`compression`](crate::plugin::StoragePluginBuilder::compression)) and
/// overridden per save ([`SaveOptions::compression`](crate::SaveOptions::compression),
/// [`SaveRequest::compression`](crate::plugin::SaveRequest::compression)) or per snapshot
/// ([`SnapshotSettings::compression`](crate::snapshot::SnapshotSettings::compression)); a
/// save or snapshot that does not choose gets the store's.
///
/// The default is what a store uses when nothing is set: `Lz4` with the `compression` feature,
/// `Off` without it. In a build without the feature, saving with `Lz4` is refused with
/// [`StorageError::FeatureDisabled`]. Serialized (and parsed with [`FromStr`]) as `"off"` or
/// `"lz4"`.
///
/// ```
/// use bevy_storage::{Compression, SaveOptions, StorageConfig};
/// let config = StorageConfig::memory().compression(Compression::Off);
/// let options = SaveOptions::new().compression(Compression::Lz4);
/// assert_eq!("lz4".parse::<Compression>().unwrap(), Compression::Lz4);
/// # let _ = (config, options);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Compression {
    /// Stored as serialized (and encrypted, if asked).
    Off,
    /// LZ4 block compression (needs the `compression` feature).
    Lz4,
}

impl Default for Compression {
    /// `Lz4` with the `compression` feature, `Off` without it.
    fn default() -> Self {
        if cfg!(feature = "compression") {
            Self::Lz4
        } else {
            Self::Off
        }
    }
}

impl Compression {
    /// Whether this compresses at all.
    pub fn is_on(self) -> bool {
        self != Self::Off
    }

    /// The lowercase name, as serialized and parsed: `"off"` or `"lz4"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Lz4 => "lz4",
        }
    }

    /// Refuses a choice this build cannot carry out (`Lz4` without the `compression`
    /// feature), naming what was being done.
    pub(crate) fn check_available(self, what: impl FnOnce() -> String) -> Result<()> {
        if self == Self::Lz4 && !cfg!(feature = "compression") {
            return Err(StorageError::FeatureDisabled {
                feature: "compression",
                what: what(),
            });
        }
        Ok(())
    }
}

impl From<bool> for Compression {
    /// `true` is [`Compression::Lz4`], `false` [`Compression::Off`] (the old
    /// `enable_compression(bool)`).
    fn from(on: bool) -> Self {
        if on { Self::Lz4 } else { Self::Off }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = StorageError;

    /// `off` or `lz4`, in any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(Self::Off),
            "lz4" => Ok(Self::Lz4),
            _ => Err(StorageError::Config(format!(
                "unknown compression {s:?}: use off or lz4"
            ))),
        }
    }
}

/// Compresses `data` into a new buffer that starts with `prefix` zero bytes (room for the
/// caller's header) and has capacity for `spare` more bytes after the compressed block (room
/// for a trailer), so the caller appends without reallocating. The compressed block is the
/// uncompressed length as a little-endian `u32` followed by an LZ4 block, as
/// [`decompress`] reads it. `None` when it does not get smaller than `data`.
///
/// LZ4 writes straight behind the prefix (`compress_into`), so the block is never copied.
/// The buffer is sized for LZ4's worst case and zeroed by the allocator (`calloc`): a large
/// one is fresh zero pages from the kernel, of which only those the block reaches are ever
/// touched, so it costs no more page faults than `compress_prepend_size`'s own uninitialized
/// buffer; the unused tail is handed back before returning.
#[cfg(feature = "compression")]
pub fn compress_after(prefix: usize, data: &[u8], spare: usize) -> Option<Vec<u8>> {
    let size = u32::try_from(data.len()).ok()?;
    let max = lz4_flex::block::get_maximum_output_size(data.len());
    let body = prefix + SIZE_LEN;
    let mut out = vec![0u8; body.checked_add(max)?.checked_add(spare)?];
    out[prefix..body].copy_from_slice(&size.to_le_bytes());
    let written = lz4_flex::block::compress_into(data, &mut out[body..body + max]).ok()?;
    (SIZE_LEN + written < data.len()).then(|| {
        out.truncate(body + written);
        // In place (a `realloc` that shrinks): keeps room for the trailer only.
        out.shrink_to(body + written + spare);
        out
    })
}

/// The uncompressed length in front of the LZ4 block.
#[cfg(feature = "compression")]
const SIZE_LEN: usize = 4;

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

#[cfg(all(test, feature = "compression"))]
mod tests {
    use super::*;

    /// The block behind the prefix is byte for byte what `compress_prepend_size` writes (the
    /// format every stored record has), the prefix is zeros, the trailer fits without a
    /// reallocation, and the worst-case buffer was handed back.
    #[test]
    fn compress_after_writes_the_same_block_behind_the_prefix() {
        let text = b"sword shield potion goblin dungeon gold arrow torch map key ";
        let mut rng = 0x2545_f491_u32;
        let noisy: Vec<u8> = (0..70_000)
            .map(|i| {
                rng ^= rng << 13;
                rng ^= rng >> 17;
                rng ^= rng << 5;
                if i % 3 == 0 {
                    rng as u8
                } else {
                    text[i % text.len()]
                }
            })
            .collect();
        // Below and above 64 KiB (lz4_flex picks another hash table there), tiny, repetitive.
        let inputs: Vec<Vec<u8>> = vec![
            text.repeat(3),
            text.repeat(2_000),
            noisy,
            vec![7; 1 << 20],
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
        ];
        for data in &inputs {
            for (prefix, spare) in [(8, 4), (20, 20), (0, 0)] {
                let out = compress_after(prefix, data, spare).expect("compressible");
                let expected = lz4_flex::block::compress_prepend_size(data);
                assert!(out[..prefix].iter().all(|&b| b == 0));
                assert_eq!(&out[prefix..], &expected[..], "{} bytes", data.len());
                assert!(out.capacity() >= out.len() + spare);
                assert!(out.capacity() <= out.len() + spare + 64, "worst case kept");
                assert_eq!(decompress("k", &out[prefix..]).unwrap(), *data);
            }
        }
    }

    #[test]
    fn what_does_not_shrink_is_not_compressed() {
        let mut rng = 1u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (rng >> 56) as u8
            })
            .collect();
        assert!(compress_after(8, &random, 4).is_none());
        assert!(compress_after(8, b"", 4).is_none());
        assert!(compress_after(8, b"abc", 4).is_none());
    }
}
