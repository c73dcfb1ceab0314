//! The versioned envelope around every stored value.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "BSTR"
//! 4       1     envelope version (1)
//! 5       1     flags: bit 0 = LZ4-compressed, bit 1 = AES-256-GCM encrypted; others must be 0
//! 6       1     payload format: 0 raw, 1 RON, 2 postcard
//! 7       1     reserved, 0
//! 8       12    nonce                       (encrypted records only)
//! ..      n     body: payload, compressed then encrypted as the flags say
//! ..      16    GCM tag                     (encrypted records only)
//! end-4   4     CRC-32 (little endian) of every byte before it followed by the record's key
//! ```
//! The checksum catches truncation and bit flips, and a record copied under another key. For an
//! encrypted record the header and the key are also the AES-GCM associated data, so altering
//! either, or the ciphertext, makes decryption fail even if the checksum is recomputed.

use super::compress::{self, Compression};
use super::crypto::{Cipher, NONCE_LEN, TAG_LEN};
use super::format::Format;
use crate::error::{Result, StorageError};

/// First four bytes of every record.
pub const MAGIC: [u8; 4] = *b"BSTR";
/// The envelope version this build writes, and the newest it reads.
pub const VERSION: u8 = 1;
const HEADER_LEN: usize = 8;
const CRC_LEN: usize = 4;
const FLAG_COMPRESSED: u8 = 1;
const FLAG_ENCRYPTED: u8 = 2;

/// What to do when sealing a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealOptions {
    /// The format the payload is in (recorded in the header).
    pub format: Format,
    /// Compress the body (bit 0 of the flags says whether it was: a payload LZ4 does not
    /// shrink is stored plain).
    pub compression: Compression,
    /// Encrypt with the store's cipher.
    pub encrypt: bool,
}

impl Default for SealOptions {
    fn default() -> Self {
        Self {
            format: Format::Ron,
            compression: Compression::Off,
            encrypt: false,
        }
    }
}

/// What the header of a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeInfo {
    /// The payload format.
    pub format: Format,
    /// The body is compressed.
    pub compressed: bool,
    /// The body is encrypted.
    pub encrypted: bool,
}

/// Bytes the envelope puts in front of the payload with these options: a payload for
/// [`seal_vec`] starts at this offset of its buffer.
#[cfg_attr(feature = "internals", visibility::make(pub), doc(hidden))]
pub(crate) fn payload_offset(options: &SealOptions) -> usize {
    HEADER_LEN + if options.encrypt { NONCE_LEN } else { 0 }
}

/// Bytes the envelope appends after the body (the GCM tag when encrypting, the checksum).
fn trailer_len(options: &SealOptions) -> usize {
    CRC_LEN + if options.encrypt { TAG_LEN } else { 0 }
}

/// A buffer to write a payload into for [`seal_vec`]: [`payload_offset`] placeholder bytes,
/// and capacity for `payload_capacity` payload bytes plus the envelope's trailer.
#[cfg_attr(feature = "internals", visibility::make(pub), doc(hidden))]
pub(crate) fn payload_buffer(options: &SealOptions, payload_capacity: usize) -> Vec<u8> {
    let offset = payload_offset(options);
    let mut buf = Vec::with_capacity(offset + payload_capacity + trailer_len(options));
    buf.resize(offset, 0);
    buf
}

/// Wraps `payload` for `key`: compresses and encrypts as asked, adds header and checksum.
///
/// Copies `payload` once; `seal_vec` (crate-internal) seals a payload written into a
/// `payload_buffer` without copying it.
pub fn seal(
    key: &str,
    payload: &[u8],
    options: &SealOptions,
    cipher: Option<&Cipher>,
) -> Result<(Vec<u8>, EnvelopeInfo)> {
    let mut buf = payload_buffer(options, payload.len());
    buf.extend_from_slice(payload);
    seal_vec(key, buf, options, cipher)
}

/// Seals the payload that follows the first [`payload_offset`] bytes of `buf` (as
/// [`payload_buffer`] leaves them), in place: an uncompressed payload is encrypted where it
/// lies and the header and trailer are written around it, so the record is `buf` itself.
#[cfg_attr(feature = "internals", visibility::make(pub), doc(hidden))]
pub(crate) fn seal_vec(
    key: &str,
    mut buf: Vec<u8>,
    options: &SealOptions,
    cipher: Option<&Cipher>,
) -> Result<(Vec<u8>, EnvelopeInfo)> {
    options
        .compression
        .check_available(|| format!("compressing {key:?}"))?;
    let cipher = match (options.encrypt, cipher) {
        (false, _) => None,
        (true, Some(c)) => Some(c),
        (true, None) => {
            return Err(StorageError::EncryptionNotConfigured {
                key: key.to_owned(),
            });
        }
    };
    let offset = payload_offset(options);
    if buf.len() < offset {
        return Err(StorageError::Serialize {
            key: key.to_owned(),
            message: format!(
                "seal_vec needs {offset} placeholder bytes before the payload, got a {}-byte buffer",
                buf.len()
            ),
        });
    }
    let mut compressed = false;
    if options.compression.is_on()
        && let Some(out) = compress::compress_after(offset, &buf[offset..], trailer_len(options))
    {
        buf = out;
        compressed = true;
    }
    let mut flags = 0;
    if compressed {
        flags |= FLAG_COMPRESSED;
    }
    if cipher.is_some() {
        flags |= FLAG_ENCRYPTED;
    }
    let header = [
        MAGIC[0],
        MAGIC[1],
        MAGIC[2],
        MAGIC[3],
        VERSION,
        flags,
        options.format.to_byte(),
        0,
    ];
    buf[..HEADER_LEN].copy_from_slice(&header);
    buf.reserve_exact(trailer_len(options));
    if let Some(cipher) = cipher {
        let (nonce, tag) =
            cipher.encrypt_in_place(&[&header, key.as_bytes()], &mut buf[offset..])?;
        buf[HEADER_LEN..offset].copy_from_slice(&nonce);
        buf.extend_from_slice(&tag);
    }
    let crc = checksum(&buf, key);
    buf.extend_from_slice(&crc.to_le_bytes());
    let info = EnvelopeInfo {
        format: options.format,
        compressed,
        encrypted: cipher.is_some(),
    };
    Ok((buf, info))
}

fn checksum(bytes: &[u8], key: &str) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.update(key.as_bytes());
    h.finalize()
}

/// Reads only the header of a record (no checksum, no decryption): what it claims to be.
pub fn inspect(key: &str, bytes: &[u8]) -> Result<EnvelopeInfo> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(StorageError::corrupt(
            key,
            format!(
                "{} bytes is too short to be a record (truncated?)",
                bytes.len()
            ),
        ));
    }
    if bytes[..4] != MAGIC {
        return Err(StorageError::corrupt(
            key,
            "missing the record header: not written by bevy_storage, or damaged",
        ));
    }
    if bytes[4] > VERSION {
        return Err(StorageError::UnsupportedVersion {
            key: key.to_owned(),
            found: bytes[4],
            supported: VERSION,
        });
    }
    if bytes[4] == 0 {
        return Err(StorageError::corrupt(
            key,
            "envelope version 0 does not exist",
        ));
    }
    let flags = bytes[5];
    if flags & !(FLAG_COMPRESSED | FLAG_ENCRYPTED) != 0 || bytes[7] != 0 {
        return Err(StorageError::corrupt(key, "unknown header flags"));
    }
    let format = Format::from_byte(bytes[6]).ok_or_else(|| {
        StorageError::corrupt(key, format!("unknown payload format {}", bytes[6]))
    })?;
    Ok(EnvelopeInfo {
        format,
        compressed: flags & FLAG_COMPRESSED != 0,
        encrypted: flags & FLAG_ENCRYPTED != 0,
    })
}

/// Checks and unwraps a record of `key`: returns the payload as it was before sealing.
pub fn open(key: &str, bytes: &[u8], cipher: Option<&Cipher>) -> Result<(Vec<u8>, EnvelopeInfo)> {
    // Check before copying: a damaged record costs no allocation.
    inspect(key, bytes)?;
    open_vec(key, bytes.to_vec(), cipher)
}

/// Like [`open`], reusing the record's own buffer for the payload (no copy for plain
/// records, decryption in place for encrypted ones).
pub fn open_vec(
    key: &str,
    mut bytes: Vec<u8>,
    cipher: Option<&Cipher>,
) -> Result<(Vec<u8>, EnvelopeInfo)> {
    let info = inspect(key, &bytes)?;
    let content_len = bytes.len() - CRC_LEN;
    let stored_crc = u32::from_le_bytes(bytes[content_len..].try_into().expect("4 bytes"));
    if checksum(&bytes[..content_len], key) != stored_crc {
        return Err(StorageError::corrupt(
            key,
            "checksum mismatch: the record is truncated or damaged, or was stored under another key",
        ));
    }
    bytes.truncate(content_len);
    if info.encrypted {
        let cipher = cipher.ok_or_else(|| StorageError::EncryptionKeyMissing {
            key: key.to_owned(),
        })?;
        if bytes.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(StorageError::corrupt(
                key,
                "encrypted record shorter than nonce and tag",
            ));
        }
        let header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("header length");
        let nonce: [u8; NONCE_LEN] = bytes[HEADER_LEN..HEADER_LEN + NONCE_LEN]
            .try_into()
            .expect("nonce length");
        let tag_start = bytes.len() - TAG_LEN;
        let tag: [u8; TAG_LEN] = bytes[tag_start..].try_into().expect("tag length");
        bytes.truncate(tag_start);
        let body = &mut bytes[HEADER_LEN + NONCE_LEN..];
        if !cipher.decrypt_in_place(&[&header, key.as_bytes()], &nonce, &tag, body) {
            return Err(StorageError::DecryptionFailed {
                key: key.to_owned(),
            });
        }
        bytes.drain(..HEADER_LEN + NONCE_LEN);
    } else {
        bytes.drain(..HEADER_LEN);
    }
    if info.compressed {
        bytes = compress::decompress(key, &bytes)?;
    }
    Ok((bytes, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options with `compression`, or uncompressed in a build without the `compression`
    /// feature (which refuses `Lz4`: tested apart below).
    fn opts(compression: Compression) -> SealOptions {
        SealOptions {
            format: Format::Raw,
            compression: if cfg!(feature = "compression") {
                compression
            } else {
                Compression::Off
            },
            encrypt: false,
        }
    }

    #[cfg(not(feature = "compression"))]
    #[test]
    fn compression_without_the_feature_is_refused() {
        let options = SealOptions {
            compression: Compression::Lz4,
            ..opts(Compression::Off)
        };
        assert!(matches!(
            seal("k", b"x", &options, None),
            Err(StorageError::FeatureDisabled {
                feature: "compression",
                ..
            })
        ));
    }

    #[test]
    fn seal_open_round_trip_plain_and_compressed() {
        let payload = b"hello hello hello hello hello hello hello hello".repeat(20);
        for compression in [Compression::Off, Compression::Lz4] {
            let (bytes, info) = seal("k", &payload, &opts(compression), None).unwrap();
            assert_eq!(
                info.compressed,
                compression.is_on() && cfg!(feature = "compression")
            );
            let (back, info2) = open("k", &bytes, None).unwrap();
            assert_eq!(back, payload);
            assert_eq!(info, info2);
        }
    }

    #[test]
    fn incompressible_payload_is_stored_plain() {
        let payload: Vec<u8> = (0..=255u8).collect();
        let (_, info) = seal("k", &payload, &opts(Compression::Lz4), None).unwrap();
        assert!(!info.compressed);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let (bytes, _) = seal(
            "k",
            b"some payload that matters",
            &opts(Compression::Lz4),
            None,
        )
        .unwrap();
        for len in 0..bytes.len() {
            assert!(
                open("k", &bytes[..len], None).is_err(),
                "truncated to {len}"
            );
        }
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(open("k", &b, None).is_err(), "bit {i}");
        }
    }

    #[test]
    fn a_record_under_another_key_is_refused() {
        let (bytes, _) = seal("player:1", b"x", &opts(Compression::Off), None).unwrap();
        let err = open("player:2", &bytes, None).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn newer_version_is_refused_clearly() {
        let (mut bytes, _) = seal("k", b"x", &opts(Compression::Off), None).unwrap();
        bytes[4] = VERSION + 1;
        assert!(matches!(
            open("k", &bytes, None),
            Err(StorageError::UnsupportedVersion { found, .. }) if found == VERSION + 1
        ));
    }

    /// A record sealed by the releases that took a numeric level (0-9), for `player:ada` and
    /// `OLD_PAYLOAD` at level 1 (levels 1-9 wrote these same bytes): RON, LZ4, not encrypted.
    const OLD_LEVEL_1_RECORD: &str = "425354520101010061000000ff19286e616d653a22416461222c676f6c64\
        3a3132302c696e76656e746f72793a5b2273776f7264222c080020606f7264225d29bc4b0297";
    #[cfg(feature = "compression")]
    const OLD_PAYLOAD: &str = "(name:\"Ada\",gold:120,inventory:[\"sword\",\"sword\",\"sword\",\
        \"sword\",\"sword\",\"sword\",\"sword\",\"sword\"])";

    fn old_level_1_record() -> Vec<u8> {
        (0..OLD_LEVEL_1_RECORD.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&OLD_LEVEL_1_RECORD[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The byte format did not change with `Compression`: a record written at level 1 by the
    /// old code path opens, and `Lz4` now writes exactly the same bytes.
    #[test]
    fn a_record_written_at_level_1_by_the_old_code_still_opens() {
        let old = old_level_1_record();
        let (flags, format) = (old[5], old[6]);
        assert_eq!((flags, format), (FLAG_COMPRESSED, 1), "compressed RON");
        #[cfg(feature = "compression")]
        {
            let (payload, info) = open("player:ada", &old, None).unwrap();
            assert_eq!(payload, OLD_PAYLOAD.as_bytes());
            assert!(info.compressed && !info.encrypted);
            assert_eq!(info.format, Format::Ron);
            let options = SealOptions {
                format: Format::Ron,
                compression: Compression::Lz4,
                encrypt: false,
            };
            let (new, _) = seal("player:ada", OLD_PAYLOAD.as_bytes(), &options, None).unwrap();
            assert_eq!(new, old, "Lz4 seals as level 1 did");
        }
        #[cfg(not(feature = "compression"))]
        assert!(matches!(
            open("player:ada", &old, None),
            Err(StorageError::FeatureDisabled {
                feature: "compression",
                ..
            })
        ));
    }

    #[cfg(feature = "encryption")]
    mod encrypted {
        use super::*;
        use crate::codec::crypto::EncryptionKey;

        fn cipher(byte: u8) -> Cipher {
            Cipher::new(&EncryptionKey::from_bytes([byte; 32]), None).unwrap()
        }

        fn enc() -> SealOptions {
            SealOptions {
                format: Format::Raw,
                compression: Compression::Lz4,
                encrypt: true,
            }
        }

        #[test]
        fn round_trip_and_fresh_nonce() {
            let c = cipher(7);
            let (a, info) = seal("k", b"secret secret secret secret", &enc(), Some(&c)).unwrap();
            let (b, _) = seal("k", b"secret secret secret secret", &enc(), Some(&c)).unwrap();
            assert!(info.encrypted);
            assert_ne!(a, b, "same plaintext twice gives different ciphertexts");
            assert_eq!(
                open("k", &a, Some(&c)).unwrap().0,
                b"secret secret secret secret"
            );
            assert!(!a.windows(6).any(|w| w == b"secret"));
        }

        #[test]
        fn wrong_missing_key_and_tampering_are_typed_errors() {
            let c = cipher(7);
            let (bytes, _) = seal("k", b"secret", &enc(), Some(&c)).unwrap();
            assert!(matches!(
                open("k", &bytes, Some(&cipher(8))),
                Err(StorageError::DecryptionFailed { .. })
            ));
            assert!(matches!(
                open("k", &bytes, None),
                Err(StorageError::EncryptionKeyMissing { .. })
            ));
            // Tamper with a ciphertext byte and fix the checksum: GCM still catches it.
            let mut t = bytes.clone();
            t[HEADER_LEN + NONCE_LEN] ^= 0x40;
            let n = t.len() - CRC_LEN;
            let crc = checksum(&t[..n], "k");
            t[n..].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(
                open("k", &t, Some(&c)),
                Err(StorageError::DecryptionFailed { .. })
            ));
            // Copy under another key with a recomputed checksum: the key is associated data.
            let mut moved = bytes.clone();
            let crc = checksum(&moved[..n], "other");
            moved[n..].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(
                open("other", &moved, Some(&c)),
                Err(StorageError::DecryptionFailed { .. })
            ));
        }

        #[test]
        fn encrypt_without_cipher_is_refused() {
            assert!(matches!(
                seal("k", b"x", &enc(), None),
                Err(StorageError::EncryptionNotConfigured { .. })
            ));
        }
    }
}
