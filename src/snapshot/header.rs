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
//! A *delta* record of a snapshot chain (see `delta/`) has a header of its own, so that no
//! reader takes it for a whole world:
//! ```text
//! offset size
//! 0      4    magic "BSND"
//! 4      2    delta format version (LE)
//! 6      1    encoding: 1 RON, 2 postcard
//! 7      1    reserved, 0
//! 8      4    game version (LE)
//! 12     4    entity count: rows of this delta (LE)
//! 16     4    sequence: 1 for the first delta after the base (LE)
//! 20     4    persisted entities in the world when it was captured (LE)
//! 24     8    parent length: byte length of the record it follows (LE)
//! 32     4    parent CRC-32 of the record it follows (LE)
//! 36     4    reserved, 0
//! 40     ..   body: (entities, despawned, [(type path, rows)], [(type path, rows, values)],
//!             [(type path, value)])
//! ```
//! The parent link (length and CRC-32 of the whole previous record, header included) makes a
//! delta refuse any base or predecessor other than the one it was captured against.
//!
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

const DELTA_MAGIC: [u8; 4] = *b"BSND";
/// The length of a delta record's header in bytes; its body starts here.
pub const DELTA_HEADER_LEN: usize = 40;
/// The newest delta format this build writes and reads.
pub const DELTA_FORMAT_VERSION: u16 = 1;

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
        out[6] = encoding_byte(self.encoding);
        out[8..12].copy_from_slice(&self.game_version.to_le_bytes());
        out[12..16].copy_from_slice(&self.entity_count.to_le_bytes());
        out
    }
}

/// Which record of a chain this is (the identity a delta's parent link names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordLink {
    /// Byte length of the record (header included, before compression or encryption).
    pub len: u64,
    /// CRC-32 of those bytes.
    pub crc: u32,
}

impl RecordLink {
    /// The link naming `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            len: bytes.len() as u64,
            crc: crc32fast::hash(bytes),
        }
    }
}

/// What the header of a delta record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaHeader {
    /// Delta format version (this build: [`DELTA_FORMAT_VERSION`]).
    pub format_version: u16,
    /// RON or binary.
    pub encoding: SnapshotEncoding,
    /// The game version that wrote it.
    pub game_version: u32,
    /// Rows (entities added or changed) in this delta.
    pub entity_count: u32,
    /// Position in its chain: 1 for the first delta after the base.
    pub sequence: u32,
    /// Persisted entities in the world when it was captured.
    pub live_count: u32,
    /// The record this delta follows (the base, or the delta before it).
    pub parent: RecordLink,
}

/// Whether stored bytes are a whole snapshot or a delta of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A whole world ("BSNP").
    Full,
    /// Changes since the record it follows ("BSND").
    Delta,
}

/// The kind of snapshot record `bytes` holds, `None` if they are neither.
pub fn record_kind(bytes: &[u8]) -> Option<RecordKind> {
    match bytes.get(..4) {
        Some(m) if m == MAGIC => Some(RecordKind::Full),
        Some(m) if m == DELTA_MAGIC => Some(RecordKind::Delta),
        _ => None,
    }
}

fn encoding_byte(encoding: SnapshotEncoding) -> u8 {
    match encoding {
        SnapshotEncoding::Ron => 1,
        SnapshotEncoding::Binary => 2,
    }
}

fn read_encoding(byte: u8) -> Result<SnapshotEncoding> {
    match byte {
        1 => Ok(SnapshotEncoding::Ron),
        2 => Ok(SnapshotEncoding::Binary),
        other => Err(StorageError::Snapshot(format!(
            "unknown snapshot encoding {other}"
        ))),
    }
}

impl DeltaHeader {
    /// The header's [`DELTA_HEADER_LEN`] bytes, the body follows them.
    #[cfg_attr(not(feature = "bevy"), allow(dead_code))]
    pub(crate) fn to_bytes(self) -> [u8; DELTA_HEADER_LEN] {
        let mut out = [0u8; DELTA_HEADER_LEN];
        out[..4].copy_from_slice(&DELTA_MAGIC);
        out[4..6].copy_from_slice(&self.format_version.to_le_bytes());
        out[6] = encoding_byte(self.encoding);
        out[8..12].copy_from_slice(&self.game_version.to_le_bytes());
        out[12..16].copy_from_slice(&self.entity_count.to_le_bytes());
        out[16..20].copy_from_slice(&self.sequence.to_le_bytes());
        out[20..24].copy_from_slice(&self.live_count.to_le_bytes());
        out[24..32].copy_from_slice(&self.parent.len.to_le_bytes());
        out[32..36].copy_from_slice(&self.parent.crc.to_le_bytes());
        out
    }
}

/// Reads and checks a delta record's header.
pub fn read_delta_header(bytes: &[u8]) -> Result<DeltaHeader> {
    if bytes.len() < DELTA_HEADER_LEN || bytes[..4] != DELTA_MAGIC {
        return Err(StorageError::Snapshot(
            "not a snapshot delta (bad header): the record holds something else or is truncated"
                .into(),
        ));
    }
    let format_version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if format_version > DELTA_FORMAT_VERSION {
        return Err(StorageError::SnapshotFormatTooNew {
            found: format_version,
            supported: DELTA_FORMAT_VERSION,
        });
    }
    let encoding = read_encoding(bytes[6])?;
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[24..32]);
    Ok(DeltaHeader {
        format_version,
        encoding,
        game_version: word(8),
        entity_count: word(12),
        sequence: word(16),
        live_count: word(20),
        parent: RecordLink {
            len: u64::from_le_bytes(len),
            crc: word(32),
        },
    })
}

/// Reads and checks a snapshot's header.
pub fn read_header(bytes: &[u8]) -> Result<SnapshotHeader> {
    if record_kind(bytes) == Some(RecordKind::Delta) {
        return Err(StorageError::Snapshot(
            "this record is a delta of a snapshot chain, not a whole world: load it through its chain (the autosave rotation)"
                .into(),
        ));
    }
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
    let encoding = read_encoding(bytes[6])?;
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
    fn a_delta_header_reads_back_as_written_and_is_no_full_header() {
        let header = DeltaHeader {
            format_version: DELTA_FORMAT_VERSION,
            encoding: SnapshotEncoding::Ron,
            game_version: 3,
            entity_count: 12,
            sequence: 4,
            live_count: 1000,
            parent: RecordLink::of(b"the base"),
        };
        let bytes = header.to_bytes();
        assert_eq!(read_delta_header(&bytes).unwrap(), header);
        assert_eq!(record_kind(&bytes), Some(RecordKind::Delta));
        assert!(
            matches!(read_header(&bytes), Err(StorageError::Snapshot(m)) if m.contains("delta"))
        );
        assert!(read_delta_header(&bytes[..DELTA_HEADER_LEN - 1]).is_err());
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
