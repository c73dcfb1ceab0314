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
