//! The snapshot header: what a stored world says about itself before its body is decoded.
//! Bevy-free, so the CLI and servers read it without the `bevy` feature.
//!
//! ```text
//! offset size
//! 0      4    magic "BSNP"
//! 4      2    snapshot format version (LE)
//! 6      1    encoding: 1 RON, 2 postcard
//! 7      1    reserved, 0
//! 8      4    game version (LE)
//! 12     4    entity count (LE)
//! 16     ..   body: (entities, [(type path, rows, values)], [(type path, value)])
//! ```
//! The header is readable without decoding the body (slot listings use it through the record
//! metadata instead). Integrity (checksum, authentication) comes from the store's envelope.
//! Entity ids in the body are Bevy's `Entity::to_bits` of the saving run: file-local, always
//! remapped on load.

use crate::error::{Result, StorageError};

const MAGIC: [u8; 4] = *b"BSNP";
/// The length of the header in bytes; the body starts here.
pub const HEADER_LEN: usize = 16;

/// The newest snapshot format this build writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 1;

/// How snapshot values are serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotEncoding {
    /// RON text: readable in any editor, for debugging. The default in debug builds.
    Ron,
    /// postcard binary: several times smaller and faster. The default in release builds.
    Binary,
}

impl Default for SnapshotEncoding {
    fn default() -> Self {
        if cfg!(debug_assertions) {
            Self::Ron
        } else {
            Self::Binary
        }
    }
}

/// What the header of a snapshot says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Snapshot format version (this build: [`SNAPSHOT_FORMAT_VERSION`]).
    pub format_version: u16,
    /// RON or binary.
    pub encoding: SnapshotEncoding,
    /// The game version that wrote it.
    pub game_version: u32,
    /// Number of entities in it.
    pub entity_count: u32,
}

impl SnapshotHeader {
    /// The header's [`HEADER_LEN`] bytes, the body follows them.
    #[cfg_attr(not(feature = "bevy"), allow(dead_code))]
    pub(crate) fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.format_version.to_le_bytes());
        out[6] = match self.encoding {
            SnapshotEncoding::Ron => 1,
            SnapshotEncoding::Binary => 2,
        };
        out[8..12].copy_from_slice(&self.game_version.to_le_bytes());
        out[12..16].copy_from_slice(&self.entity_count.to_le_bytes());
        out
    }
}

/// Reads and checks a snapshot's header.
pub fn read_header(bytes: &[u8]) -> Result<SnapshotHeader> {
    if bytes.len() < HEADER_LEN || bytes[..4] != MAGIC {
        return Err(StorageError::Snapshot(
            "not a world snapshot (bad header): the record holds something else or is truncated"
                .into(),
        ));
    }
    let format_version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if format_version > SNAPSHOT_FORMAT_VERSION {
        return Err(StorageError::SnapshotFormatTooNew {
            found: format_version,
            supported: SNAPSHOT_FORMAT_VERSION,
        });
    }
    let encoding = match bytes[6] {
        1 => SnapshotEncoding::Ron,
        2 => SnapshotEncoding::Binary,
        other => {
            return Err(StorageError::Snapshot(format!(
                "unknown snapshot encoding {other}"
            )));
        }
    };
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    Ok(SnapshotHeader {
        format_version,
        encoding,
        game_version: word(8),
        entity_count: word(12),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_back_as_written() {
        let header = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_VERSION,
            encoding: SnapshotEncoding::Binary,
            game_version: 7,
            entity_count: 300,
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(b"body");
        assert_eq!(read_header(&bytes).unwrap(), header);
    }

    #[test]
    fn a_bad_header_is_a_typed_error() {
        let good = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_VERSION,
            encoding: SnapshotEncoding::Ron,
            game_version: 0,
            entity_count: 0,
        }
        .to_bytes();
        assert!(matches!(
            read_header(&good[..HEADER_LEN - 1]),
            Err(StorageError::Snapshot(_))
        ));
        let mut newer = good;
        newer[4] = 0xff;
        assert!(matches!(
            read_header(&newer),
            Err(StorageError::SnapshotFormatTooNew { found: 255, .. })
        ));
        let mut unknown = good;
        unknown[6] = 9;
        assert!(matches!(
            read_header(&unknown),
            Err(StorageError::Snapshot(m)) if m.contains("encoding 9")
        ));
    }
}
