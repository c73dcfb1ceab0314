//! The record string: how one record is laid out in Redis, and the Redis keys of a namespace.
//!
//! A record is one Redis string: a fixed header (integers little-endian, timestamps in ms since
//! the epoch), then `custom_len` bytes of custom metadata (a JSON object; nothing when there is
//! none), then `size` bytes of value. The fields the scripts read come first, so that one
//! `struct.unpack('<i8i8I4', record)` in Lua reads them:
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | i64 | `created_at` |
//! | 8 | i64 | `expires_at`, 0 for never (an expiry at or before the epoch is written as -1) |
//! | 16 | u32 | `size`: length of the value |
//! | 20 | u32 | `custom_len`: length of the custom metadata |
//! | 24 | i64 | `modified_at` |
//! | 32 | i64 | `accessed_at` |
//! | 40 | u8 | flags: 1 compressed, 2 encrypted |
//! | 41 | u8 | layout version, 3 |
//! | 42 | u64 | `version` ([`RecordVersion`](crate::backend::RecordVersion)) |
//!
//! Layout 2, written before records had versions, is the same without the version: a
//! 42-byte header. It is still read (its records have version 0) and replaced by layout 3
//! when the record is written again; the scripts accept both (`scripts/header.lua`).
//!
//! The two bookkeeping keys make [`usage`](crate::backend::Backend::usage) cheap: the counters plus
//! one walk over the live records that have an expiry (in pages, reading their sizes from their
//! headers), instead of a `SCAN` of the whole database. Every change goes through the scripts or
//! the transaction of new records (see [`batch`](super::batch)), which keep them exact. A record
//! that Redis expired leaves a stale entry in `{NS}:expiry`, and so may a key later written again
//! without an expiry; such entries are ignored (the usage, purge and trim scripts check the
//! record's header, with the helper of `scripts/header.lua`) and trimmed by the next batches the
//! write script runs, `purge_expired` and `clear`.

use crate::backend::{CustomMetadata, RecordMeta, RecordVersion};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// Length of the header this build writes (layout 3); see the module docs for its fields.
pub(super) const HEADER_LEN: usize = 50;

/// Length of a layout-2 header, the shortest header there is.
pub(super) const MIN_HEADER_LEN: usize = 42;

/// The key layout version this build writes, at offset 41 of every record's header.
pub(super) const LAYOUT_VERSION: u8 = 3;

/// The layout written before records had versions, still read.
const LAYOUT_WITHOUT_VERSION: u8 = 2;

/// The Redis keys of one namespace.
pub(super) struct Keys {
    /// `{NS}:r:`, followed by the record's key.
    pub(super) record_prefix: String,
    pub(super) usage: String,
    pub(super) expiry: String,
    /// `{NS}:batch`: set and removed within one `MULTI`/`EXEC` by a batch of new records (see
    /// [`COUNT_NEW_RECORDS_SCRIPT`](super::scripts::COUNT_NEW_RECORDS_SCRIPT)), so it never
    /// exists between commands.
    pub(super) batch_token: String,
}

impl Keys {
    pub(super) fn new(namespace: &str) -> Self {
        let base = format!("{{{namespace}}}:");
        Self {
            record_prefix: format!("{base}r:"),
            usage: format!("{base}usage"),
            expiry: format!("{base}expiry"),
            batch_token: format!("{base}batch"),
        }
    }

    pub(super) fn record(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.record_prefix.len() + key.len());
        k.push_str(&self.record_prefix);
        k.push_str(key);
        k
    }
}

fn flags(meta: &RecordMeta) -> u8 {
    u8::from(meta.compressed) | (u8::from(meta.encrypted) << 1)
}

/// The little-endian `i64` at `at`; the caller checked the length.
fn le_i64(bytes: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    i64::from_le_bytes(b)
}

/// The little-endian `u64` at `at`; the caller checked the length.
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The little-endian `u32` at `at`; the caller checked the length.
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// A record's header; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    created_at: i64,
    /// `None`: never.
    pub(super) expires_at: Option<i64>,
    pub(super) size: u32,
    custom_len: u32,
    modified_at: i64,
    accessed_at: i64,
    flags: u8,
    /// 42 (layout 2) or 50 (layout 3).
    header_len: usize,
    version: u64,
}

impl Header {
    /// Where the value starts.
    pub(super) fn value_start(&self) -> usize {
        self.header_len + self.custom_len as usize
    }

    /// The custom metadata bytes of `record` (a record, or its beginning up to at least
    /// [`value_start`](Self::value_start)).
    pub(super) fn custom<'a>(&self, record: &'a [u8]) -> &'a [u8] {
        &record[self.header_len..self.value_start()]
    }

    /// The length of the whole record.
    fn record_len(&self) -> usize {
        self.value_start() + self.size as usize
    }

    /// Checks that a record of `len` bytes is as long as this header announces.
    pub(super) fn check_len(&self, key: &str, len: usize) -> Result<()> {
        if len == self.record_len() {
            return Ok(());
        }
        Err(StorageError::corrupt(
            key,
            format!(
                "the Redis record is {len} bytes long but its header announces {} ({} \
                 of header, {} of custom metadata, {} of value)",
                self.record_len(),
                self.header_len,
                self.custom_len,
                self.size
            ),
        ))
    }

    /// Reads the header at the start of `bytes` (a record or its beginning).
    pub(super) fn parse(key: &str, bytes: &[u8]) -> Result<Self> {
        let too_short = |header_len: usize| {
            StorageError::corrupt(
                key,
                format!(
                    "the Redis record is {} bytes long, shorter than its {header_len}-byte header",
                    bytes.len()
                ),
            )
        };
        if bytes.len() < MIN_HEADER_LEN {
            return Err(too_short(MIN_HEADER_LEN));
        }
        let (header_len, version) = match bytes[MIN_HEADER_LEN - 1] {
            LAYOUT_VERSION if bytes.len() < HEADER_LEN => return Err(too_short(HEADER_LEN)),
            LAYOUT_VERSION => (HEADER_LEN, le_u64(bytes, MIN_HEADER_LEN)),
            LAYOUT_WITHOUT_VERSION => (MIN_HEADER_LEN, 0),
            layout => {
                return Err(StorageError::corrupt(
                    key,
                    format!(
                        "the Redis record has key layout version {layout}; this build reads \
                         versions {LAYOUT_WITHOUT_VERSION} and {LAYOUT_VERSION}"
                    ),
                ));
            }
        };
        let expires_at = le_i64(bytes, 8);
        Ok(Self {
            created_at: le_i64(bytes, 0),
            expires_at: (expires_at != 0).then_some(expires_at),
            size: le_u32(bytes, 16),
            custom_len: le_u32(bytes, 20),
            modified_at: le_i64(bytes, 24),
            accessed_at: le_i64(bytes, 32),
            flags: bytes[40],
            header_len,
            version,
        })
    }

    /// The metadata this header describes, with the custom metadata read from `custom`.
    pub(super) fn meta(&self, key: &str, custom: &[u8]) -> Result<RecordMeta> {
        let custom = if custom.is_empty() {
            CustomMetadata::new()
        } else {
            serde_json::from_slice(custom).map_err(|e| {
                StorageError::corrupt(key, format!("custom metadata is not a JSON object: {e}"))
            })?
        };
        Ok(RecordMeta {
            created_at: Timestamp(self.created_at),
            modified_at: Timestamp(self.modified_at),
            accessed_at: Timestamp(self.accessed_at),
            expires_at: self.expires_at.map(Timestamp),
            size: u64::from(self.size),
            compressed: self.flags & 1 != 0,
            encrypted: self.flags & 2 != 0,
            custom,
            version: RecordVersion(self.version),
        })
    }
}

/// Checks that `bytes` is a whole record: its header and exactly the lengths it announces.
pub(super) fn parse_record(key: &str, bytes: &[u8]) -> Result<Header> {
    let header = Header::parse(key, bytes)?;
    header.check_len(key, bytes.len())?;
    Ok(header)
}

/// A record's expiry as its header holds it: 0 means "never", so an expiry at the epoch (long
/// past for any real clock) is written as -1.
pub(super) fn stored_expiry(expires_at: Option<Timestamp>) -> i64 {
    match expires_at {
        None => 0,
        Some(Timestamp(0)) => -1,
        Some(Timestamp(t)) => t,
    }
}

/// The header of a record (see the module docs); the lengths were checked to fit.
pub(super) fn encode_header(meta: &RecordMeta, size: usize, custom_len: usize) -> [u8; HEADER_LEN] {
    let expires_at = stored_expiry(meta.expires_at);
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&meta.created_at.0.to_le_bytes());
    h[8..16].copy_from_slice(&expires_at.to_le_bytes());
    h[16..20].copy_from_slice(&(size as u32).to_le_bytes());
    h[20..24].copy_from_slice(&(custom_len as u32).to_le_bytes());
    h[24..32].copy_from_slice(&meta.modified_at.0.to_le_bytes());
    h[32..40].copy_from_slice(&meta.accessed_at.0.to_le_bytes());
    h[40] = flags(meta);
    h[41] = LAYOUT_VERSION;
    h[42..50].copy_from_slice(&meta.version.0.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_different_namespaces_never_overlap() {
        let a = Keys::new("game");
        let b = Keys::new("game:r");
        assert!(!b.record("x").starts_with(&a.record_prefix));
        assert!(!a.record("r:x").starts_with(&b.record_prefix));
        assert_ne!(a.record("r:x"), b.record("x"));
    }

    fn sample_meta() -> RecordMeta {
        let mut custom = CustomMetadata::new();
        custom.insert("level".into(), "cave".into());
        RecordMeta {
            created_at: Timestamp(1_700_000_000_123),
            modified_at: Timestamp(1_700_000_000_456),
            accessed_at: Timestamp(1_700_000_000_789),
            expires_at: Some(Timestamp(1_800_000_000_000)),
            size: 5,
            compressed: true,
            encrypted: false,
            custom,
            version: RecordVersion(0xFEDC_BA98_7654_3210),
        }
    }

    /// A record as the write script stores it.
    fn stored(meta: &RecordMeta, value: &[u8]) -> Vec<u8> {
        let custom = if meta.custom.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&meta.custom).unwrap()
        };
        let mut bytes = encode_header(meta, value.len(), custom.len()).to_vec();
        bytes.extend_from_slice(&custom);
        bytes.extend_from_slice(value);
        bytes
    }

    #[test]
    fn records_round_trip_through_the_layout() {
        let mut meta = sample_meta();
        for expires_at in [Some(Timestamp(1_800_000_000_000)), None] {
            meta.expires_at = expires_at;
            let bytes = stored(&meta, b"value");
            assert_eq!(bytes[MIN_HEADER_LEN - 1], LAYOUT_VERSION);
            let header = parse_record("k", &bytes).unwrap();
            let custom = &bytes[HEADER_LEN..header.value_start()];
            assert_eq!(header.meta("k", custom).unwrap(), meta);
            assert_eq!(&bytes[header.value_start()..], b"value");
        }
        // Without custom metadata nothing sits between the header and the value.
        meta.custom.clear();
        meta.encrypted = true;
        let bytes = stored(&meta, b"v");
        assert_eq!(bytes.len(), HEADER_LEN + 1);
        let header = parse_record("k", &bytes).unwrap();
        assert_eq!(
            header.meta("k", &[]).unwrap(),
            RecordMeta {
                size: 1,
                ..meta.clone()
            }
        );
        // An expiry at the epoch stays an expiry (long past), never "never".
        meta.expires_at = Some(Timestamp(0));
        let header = Header::parse("k", &stored(&meta, b"v")).unwrap();
        assert_eq!(header.expires_at, Some(-1));
    }

    #[test]
    fn layout_2_records_read_as_version_0() {
        let meta = sample_meta();
        let layout3 = stored(&meta, b"value");
        let mut layout2 = layout3[..MIN_HEADER_LEN].to_vec();
        layout2[MIN_HEADER_LEN - 1] = LAYOUT_WITHOUT_VERSION;
        layout2.extend_from_slice(&layout3[HEADER_LEN..]);
        let header = parse_record("k", &layout2).unwrap();
        assert_eq!(
            header.meta("k", header.custom(&layout2)).unwrap(),
            RecordMeta {
                version: RecordVersion(0),
                ..meta
            }
        );
        assert_eq!(&layout2[header.value_start()..], b"value");
        // A layout-3 header cut before its version is damage, not a layout-2 record.
        let mut cut = layout3[..MIN_HEADER_LEN + 3].to_vec();
        cut[MIN_HEADER_LEN - 1] = LAYOUT_VERSION;
        let err = Header::parse("k", &cut).unwrap_err();
        assert!(err.to_string().contains("50-byte header"), "{err}");
    }

    #[test]
    fn damaged_records_are_corrupt_errors() {
        let meta = sample_meta();
        let good = stored(&meta, b"value");
        let mut wrong_version = good.clone();
        wrong_version[MIN_HEADER_LEN - 1] = 1;
        let mut bad_json = good.clone();
        bad_json[HEADER_LEN] = b'[';
        for (bytes, why) in [
            (&b"short"[..], "shorter than its"),
            (&wrong_version[..], "layout version 1"),
            (&good[..good.len() - 1], "header announces"),
            (&[&good[..], b"x"].concat()[..], "header announces"),
        ] {
            match parse_record("k", bytes) {
                Err(StorageError::Corrupt { key, reason }) => {
                    assert_eq!(key, "k");
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{why}: {other:?}"),
            }
        }
        let header = parse_record("k", &bad_json).unwrap();
        let err = header
            .meta("k", &bad_json[HEADER_LEN..header.value_start()])
            .unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    }
}
