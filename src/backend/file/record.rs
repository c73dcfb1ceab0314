//! The record file: one key's record in one file, checked on every read.
//!
//! ```text
//! offset size
//!  0      4   magic "BSTR"
//!  4      1   format version (1)
//!  5      3   zero
//!  8      4   header length H (u32, little endian)
//! 12      4   CRC-32 of the value
//! 16      8   value length V (u64, LE)
//! 24      4   CRC-32 of bytes 0..24 followed by the header
//! 28      4   zero
//! 32      8   last access time (i64 ms, LE), rewritten in place by `touch`
//! 40      4   CRC-32 of bytes 32..40
//! 44      4   zero
//! 48      H   header: JSON object {"key": <the key>, "meta": <RecordMeta>}
//! 48+H    V   value: the record bytes as the codec produced them
//! ```
//!
//! The file length must be exactly `48 + H + V`. A file that is too short or too long, has the
//! wrong magic, or fails a checksum is **corrupt**: [`get`](crate::backend::Backend::get) and
//! [`get_meta`](crate::backend::Backend::get_meta) of its key return [`StorageError::Corrupt`],
//! while [`scan`](crate::backend::Backend::scan) (and so `usage` and `purge_expired`) skip it
//! without failing, and every other record is unaffected. A record of a newer format version gives
//! [`StorageError::UnsupportedVersion`]. Writing the key again replaces a damaged file.
//!
//! The access time lives in its own checksummed slot so that `touch` is one 12-byte write in
//! place instead of a rewrite of a possibly large file. If that slot is ever torn (a crash
//! during `touch`), the access time from the header (the time of the last write) is used; the
//! record itself is never lost to a `touch`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::{Record, RecordMeta};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

const RECORD_MAGIC: [u8; 4] = *b"BSTR";
const RECORD_VERSION: u8 = 1;
/// Size of the fixed part of a record file, before the JSON header.
const FIXED_LEN: usize = 48;
/// Offset of the access-time slot that `touch` rewrites in place.
const TOUCH_OFFSET: u64 = 32;

#[derive(Serialize)]
struct HeaderRef<'a> {
    key: &'a str,
    meta: &'a RecordMeta,
}

#[derive(Deserialize)]
struct HeaderOwned {
    key: String,
    meta: RecordMeta,
}

/// The part of a header a load needs: the key, to check the file is this key's, and the
/// expiry. The other fields are passed over without being built (no custom metadata map).
#[derive(Deserialize)]
struct HeaderForLoad {
    key: String,
    meta: ExpiryOnly,
}

#[derive(Deserialize)]
struct ExpiryOnly {
    expires_at: Option<Timestamp>,
}

/// The key of a header alone.
#[derive(Deserialize)]
struct HeaderKey {
    key: String,
}

/// What is wrong with a file that has a data-file name.
#[derive(Debug)]
pub(super) enum Damage {
    Corrupt(String),
    NewerVersion(u8),
}

impl Damage {
    pub(super) fn into_error(self, key: &str, path: &Path) -> StorageError {
        match self {
            Damage::Corrupt(reason) => {
                StorageError::corrupt(key, format!("{reason} (file {})", path.display()))
            }
            Damage::NewerVersion(found) => StorageError::UnsupportedVersion {
                key: key.to_owned(),
                found,
                supported: RECORD_VERSION,
            },
        }
    }
}

/// The result of reading one data file.
pub(super) enum Loaded<T> {
    Missing,
    Damaged(Damage),
    /// The key stored in the file, and what was read.
    Found(String, T),
}

/// The fixed first 48 bytes of a record file, decoded.
struct Fixed {
    header_len: usize,
    value_len: u64,
    value_crc: u32,
    header_crc: u32,
    accessed_at: Option<Timestamp>,
}

impl Fixed {
    fn total_len(&self) -> u64 {
        // Saturating: a damaged length field near u64::MAX must read as damage, not overflow.
        ((FIXED_LEN + self.header_len) as u64).saturating_add(self.value_len)
    }
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The 12 bytes of the access-time slot.
fn touch_slot(at: Timestamp) -> [u8; 12] {
    let mut slot = [0; 12];
    slot[..8].copy_from_slice(&at.0.to_le_bytes());
    let crc = crc32fast::hash(&slot[..8]);
    slot[8..].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// The complete bytes of a record file.
pub(super) fn encode_record(key: &str, record: &Record) -> Result<Vec<u8>> {
    let header = serde_json::to_vec(&HeaderRef {
        key,
        meta: &record.meta,
    })
    .map_err(|e| StorageError::Serialize {
        key: key.to_owned(),
        message: format!("record metadata: {e}"),
    })?;
    let header_len = u32::try_from(header.len()).map_err(|_| StorageError::Serialize {
        key: key.to_owned(),
        message: "record metadata is larger than 4 GiB".to_owned(),
    })?;
    let mut buf = Vec::with_capacity(FIXED_LEN + header.len() + record.value.len());
    buf.extend_from_slice(&RECORD_MAGIC);
    buf.push(RECORD_VERSION);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&header_len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&record.value).to_le_bytes());
    buf.extend_from_slice(&(record.value.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..24]);
    crc.update(&header);
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&touch_slot(record.meta.accessed_at));
    buf.extend_from_slice(&[0; 4]);
    debug_assert_eq!(buf.len(), FIXED_LEN);
    buf.extend_from_slice(&header);
    buf.extend_from_slice(&record.value);
    Ok(buf)
}

fn parse_fixed(b: &[u8; FIXED_LEN]) -> std::result::Result<Fixed, Damage> {
    if b[..4] != RECORD_MAGIC {
        return Err(Damage::Corrupt(
            "not a bevy_storage record file (wrong magic bytes)".to_owned(),
        ));
    }
    match b[4] {
        RECORD_VERSION => {}
        0 => return Err(Damage::Corrupt("format version 0 is invalid".to_owned())),
        v => return Err(Damage::NewerVersion(v)),
    }
    let stamp = &b[32..40];
    let accessed_at = (u32_at(b, 40) == crc32fast::hash(stamp))
        .then(|| Timestamp(i64::from_le_bytes(stamp.try_into().expect("8 bytes"))));
    Ok(Fixed {
        header_len: u32_at(b, 8) as usize,
        value_crc: u32_at(b, 12),
        value_len: u64_at(b, 16),
        header_crc: u32_at(b, 24),
        accessed_at,
    })
}

fn length_damage(fixed: &Fixed, actual: u64) -> Option<Damage> {
    let expected = fixed.total_len();
    (expected != actual).then(|| {
        Damage::Corrupt(format!(
            "truncated or overlong: the header announces {expected} bytes but the file has {actual}"
        ))
    })
}

/// Checks the header's checksum and reads it as `H` (all of it, or the part a reader needs).
fn parse_header<H: DeserializeOwned>(
    fixed_bytes: &[u8; FIXED_LEN],
    fixed: &Fixed,
    header: &[u8],
) -> std::result::Result<H, Damage> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&fixed_bytes[..24]);
    crc.update(header);
    if crc.finalize() != fixed.header_crc {
        return Err(Damage::Corrupt("header checksum mismatch".to_owned()));
    }
    serde_json::from_slice(header).map_err(|e| Damage::Corrupt(format!("unreadable header: {e}")))
}

/// The key and metadata of a whole header, with the access time the fixed part holds when it
/// is newer (see `touch`).
fn full_header(fixed: &Fixed, header: HeaderOwned) -> (String, RecordMeta) {
    let HeaderOwned { key, mut meta } = header;
    if let Some(at) = fixed.accessed_at {
        meta.accessed_at = at;
    }
    (key, meta)
}

fn too_short(len: u64) -> Damage {
    Damage::Corrupt(format!(
        "truncated: {len} bytes, shorter than the {FIXED_LEN}-byte file header"
    ))
}

/// Checks a whole record file (its lengths and both checksums) and reads its header as `H`;
/// returns the header, the fixed part and where the value starts.
fn parse_record<H: DeserializeOwned>(
    bytes: &[u8],
) -> std::result::Result<(H, Fixed, usize), Damage> {
    let fixed_bytes: &[u8; FIXED_LEN] = bytes
        .get(..FIXED_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| too_short(bytes.len() as u64))?;
    let fixed = parse_fixed(fixed_bytes)?;
    if let Some(damage) = length_damage(&fixed, bytes.len() as u64) {
        return Err(damage);
    }
    let value_start = FIXED_LEN + fixed.header_len;
    let header = parse_header(fixed_bytes, &fixed, &bytes[FIXED_LEN..value_start])?;
    if crc32fast::hash(&bytes[value_start..]) != fixed.value_crc {
        return Err(Damage::Corrupt("value checksum mismatch".to_owned()));
    }
    Ok((header, fixed, value_start))
}

/// True when `bytes` is an intact record file of `key` (both checksums, the lengths, and the
/// key in its header).
pub(super) fn is_record_of(bytes: &[u8], key: &str) -> bool {
    parse_record::<HeaderKey>(bytes).is_ok_and(|(header, ..)| header.key == key)
}

fn read_error(path: &Path, e: io::Error) -> StorageError {
    StorageError::io(format!("reading the record file {}", path.display()), e)
}

/// Reads and checks a whole record file, reading its header as `H`; `found` makes the key and
/// the result from the header, the fixed part and the value (the file's own buffer, without
/// what precedes the value).
fn load_whole<H: DeserializeOwned, T>(
    path: &Path,
    found: impl FnOnce(H, &Fixed, Vec<u8>) -> (String, T),
) -> Result<Loaded<T>> {
    match fs::read(path) {
        Ok(mut bytes) => Ok(match parse_record::<H>(&bytes) {
            Ok((header, fixed, value_start)) => {
                bytes.drain(..value_start);
                let (key, result) = found(header, &fixed, bytes);
                Loaded::Found(key, result)
            }
            Err(damage) => Loaded::Damaged(damage),
        }),
        Err(e) => unreadable(path, e),
    }
}

/// Reads and checks a whole record file.
pub(super) fn load_record(path: &Path) -> Result<Loaded<Record>> {
    load_whole(path, |header: HeaderOwned, fixed, value| {
        let (key, meta) = full_header(fixed, header);
        (key, Record { value, meta })
    })
}

/// Reads and checks a whole record file, for its value and expiry.
pub(super) fn load_value(path: &Path) -> Result<Loaded<(Vec<u8>, Option<Timestamp>)>> {
    load_whole(path, |header: HeaderForLoad, _, value| {
        (header.key, (value, header.meta.expires_at))
    })
}

/// A file that cannot be read: missing, a directory under a data-file name, or an I/O error.
fn unreadable<T>(path: &Path, e: io::Error) -> Result<Loaded<T>> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(Loaded::Missing)
    } else if path.is_dir() {
        Ok(Loaded::Damaged(Damage::Corrupt(
            "a directory, not a record file".to_owned(),
        )))
    } else {
        Err(read_error(path, e))
    }
}

/// Reads and checks the key and metadata of a record file, without reading its value.
pub(super) fn load_header(path: &Path) -> Result<Loaded<RecordMeta>> {
    match File::open(path) {
        Ok(mut file) => read_header_from(&mut file, path),
        Err(e) => unreadable(path, e),
    }
}

fn read_header_from(file: &mut File, path: &Path) -> Result<Loaded<RecordMeta>> {
    let meta = file.metadata().map_err(|e| read_error(path, e))?;
    if meta.is_dir() {
        return unreadable(path, io::Error::other("is a directory"));
    }
    let len = meta.len();
    if len < FIXED_LEN as u64 {
        return Ok(Loaded::Damaged(too_short(len)));
    }
    let mut fixed_bytes = [0; FIXED_LEN];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut fixed_bytes))
        .map_err(|e| read_error(path, e))?;
    let fixed = match parse_fixed(&fixed_bytes) {
        Ok(fixed) => fixed,
        Err(damage) => return Ok(Loaded::Damaged(damage)),
    };
    if let Some(damage) = length_damage(&fixed, len) {
        return Ok(Loaded::Damaged(damage));
    }
    let mut header = vec![0; fixed.header_len];
    file.read_exact(&mut header)
        .map_err(|e| read_error(path, e))?;
    Ok(match parse_header(&fixed_bytes, &fixed, &header) {
        Ok(header) => {
            let (key, meta) = full_header(&fixed, header);
            Loaded::Found(key, meta)
        }
        Err(damage) => Loaded::Damaged(damage),
    })
}

/// Sets the access time of `key`'s record file at `path` in place (one write of its
/// access-time slot); nothing if the file is gone. A damaged file, or one of another key, is
/// reported.
pub(super) fn touch_in_place(key: &str, path: &Path, at: Timestamp) -> Result<()> {
    let context = || format!("updating the access time in {}", path.display());
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io(context(), e)),
    };
    match read_header_from(&mut file, path)? {
        Loaded::Missing => return Ok(()),
        Loaded::Damaged(damage) => return Err(damage.into_error(key, path)),
        Loaded::Found(found_key, _) if found_key != key => {
            return Err(StorageError::corrupt(
                key,
                format!(
                    "the file {} holds the record of another key ({found_key:?})",
                    path.display()
                ),
            ));
        }
        Loaded::Found(..) => {}
    }
    file.seek(SeekFrom::Start(TOUCH_OFFSET))
        .and_then(|_| file.write_all(&touch_slot(at)))
        .map_err(|e| StorageError::io(context(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::backend::file::lock::LOCK_FILE;
    use crate::backend::file::testing::*;

    #[test]
    fn garbage_files_are_ignored_or_reported() {
        let (_tmp, b) = setup();
        b.write(vec![put("good", b"fine", 1), put("other", b"ok", 1)], NOW)
            .unwrap();
        let root = b.root().to_owned();
        fs::write(root.join("k-garbage"), noise(300, 1)).unwrap();
        fs::write(root.join("k-empty"), b"").unwrap();
        fs::write(root.join("notes.txt"), noise(100, 2)).unwrap();
        fs::write(root.join("K-UPPER"), noise(100, 3)).unwrap();
        fs::write(root.join("k-%zz"), noise(100, 4)).unwrap();
        fs::write(
            root.join(format!("l-zz-{}-0", "0".repeat(24))),
            noise(64, 5),
        )
        .unwrap();
        fs::create_dir(root.join("k-subdir")).unwrap();
        fs::create_dir(root.join("saves")).unwrap();
        // A valid record of "good" under another key's name.
        fs::copy(b.path_of("good").unwrap().unwrap(), root.join("k-copied")).unwrap();

        for key in ["garbage", "empty", "subdir", "copied"] {
            match b.get(key) {
                Err(StorageError::Corrupt { key: k, reason }) => {
                    assert_eq!(k, key);
                    assert!(reason.contains(&format!("k-{key}")), "{reason}");
                }
                other => panic!("{key}: {other:?}"),
            }
            assert!(matches!(b.get_meta(key), Err(StorageError::Corrupt { .. })));
            assert!(matches!(
                b.get_value(key),
                Err(StorageError::Corrupt { .. })
            ));
        }
        assert_eq!(
            listed_keys(&b, ""),
            vec!["good".to_owned(), "other".to_owned()]
        );
        assert_eq!(value_of(&b, "good").unwrap(), b"fine");
        assert_eq!(b.usage(NOW).unwrap().item_count, 2);
        assert_eq!(b.purge_expired(NOW).unwrap(), 0);

        // Writing the key again repairs it; deleting removes the damaged file.
        b.write(vec![put("garbage", b"new", 1), del("empty")], NOW)
            .unwrap();
        assert_eq!(value_of(&b, "garbage").unwrap(), b"new");
        assert!(!root.join("k-empty").exists());

        b.clear().unwrap();
        assert_eq!(listed_keys(&b, ""), Vec::<String>::new());
        let left = names_in(&root);
        for name in [
            LOCK_FILE,
            "notes.txt",
            "K-UPPER",
            "k-%zz",
            "k-subdir",
            "saves",
        ] {
            assert!(left.contains(name), "clear removed {name}");
        }
        assert!(!left.contains("k-garbage") && !left.contains("k-copied"));
    }

    #[test]
    fn damaged_record_files_are_corrupt() {
        let (_tmp, b) = setup();
        b.write(vec![put("t", &noise(100, 9), 1), put("u", b"fine", 1)], NOW)
            .unwrap();
        let path = b.path_of("t").unwrap().unwrap();
        let original = fs::read(&path).unwrap();
        let len = original.len();
        let header_end = len - 100;
        let damages: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("10 bytes", original[..10].to_vec()),
            ("47 bytes", original[..47].to_vec()),
            ("fixed part only", original[..48].to_vec()),
            ("header cut", original[..header_end - 3].to_vec()),
            ("last byte missing", original[..len - 1].to_vec()),
            ("one byte more", [&original[..], b"x"].concat()),
            ("bad magic", {
                let mut d = original.clone();
                d[0] ^= 0xff;
                d
            }),
            ("header bit flip", {
                let mut d = original.clone();
                d[60] ^= 0x04;
                d
            }),
            ("length field flip", {
                let mut d = original.clone();
                d[16] ^= 0x01;
                d
            }),
            ("value bit flip", {
                let mut d = original.clone();
                d[len - 5] ^= 0x10;
                d
            }),
        ];
        for (what, bytes) in damages {
            fs::write(&path, &bytes).unwrap();
            assert!(
                matches!(b.get("t"), Err(StorageError::Corrupt { .. })),
                "{what}: {:?}",
                b.get("t")
            );
            assert!(
                matches!(b.get_value("t"), Err(StorageError::Corrupt { .. })),
                "{what}: {:?}",
                b.get_value("t")
            );
            if what != "value bit flip" {
                assert!(
                    matches!(b.get_meta("t"), Err(StorageError::Corrupt { .. })),
                    "{what}"
                );
            }
            let listed = listed_keys(&b, "");
            assert!(listed.contains(&"u".to_owned()), "{what}");
            if what != "value bit flip" {
                assert_eq!(listed, vec!["u".to_owned()], "{what}");
            }
            assert_eq!(value_of(&b, "u").unwrap(), b"fine");
        }
        let mut newer = original.clone();
        newer[4] = 9;
        fs::write(&path, &newer).unwrap();
        assert!(matches!(
            b.get("t"),
            Err(StorageError::UnsupportedVersion { found: 9, .. })
        ));
        assert!(matches!(
            b.get_value("t"),
            Err(StorageError::UnsupportedVersion { found: 9, .. })
        ));
        fs::write(&path, &original).unwrap();
        assert_eq!(value_of(&b, "t").unwrap(), noise(100, 9));
        assert_eq!(
            b.get_value("t").unwrap(),
            Some((noise(100, 9), None)),
            "what a load reads matches the record"
        );
    }

    #[test]
    fn touch_sets_the_access_time_in_place() {
        let (_tmp, b) = setup();
        b.write(vec![put("k", b"value", 1)], NOW).unwrap();
        let path = b.path_of("k").unwrap().unwrap();
        let len = fs::metadata(&path).unwrap().len();
        b.touch("k", Timestamp(42)).unwrap();
        let rec = b.get("k").unwrap().unwrap();
        assert_eq!(rec.meta.accessed_at, Timestamp(42));
        assert_eq!(rec.meta.modified_at, Timestamp(1));
        assert_eq!(rec.value, b"value");
        assert_eq!(b.get_meta("k").unwrap().unwrap().accessed_at, Timestamp(42));
        assert_eq!(fs::metadata(&path).unwrap().len(), len);
        b.touch("absent", Timestamp(42)).unwrap();
        assert_eq!(b.get("absent").unwrap(), None);
        // A torn access-time slot falls back to the write time; the record survives.
        let mut bytes = fs::read(&path).unwrap();
        bytes[34] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(b.get("k").unwrap().unwrap().meta.accessed_at, Timestamp(1));
        // Touching a damaged record reports it.
        fs::write(&path, b"junk").unwrap();
        assert!(matches!(
            b.touch("k", Timestamp(5)),
            Err(StorageError::Corrupt { .. })
        ));
    }
}
