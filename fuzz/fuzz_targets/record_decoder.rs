//! Fuzzes the record decoder: `codec::envelope::open` and `codec::decode` (to
//! `serde_json::Value` and `Vec<String>`), with and without a cipher.
//!
//! The first input byte picks a mode; the rest is the material:
//! - `0`: the bytes as a record, as they are;
//! - `1`: the bytes behind a valid checksum (the fuzzer cannot forge CRC-32 by itself, and
//!   everything below the checksum would stay unexplored);
//! - `2`: a valid record (one of a few: RON, postcard, LZ4, AES-GCM), damaged by the input
//!   read as `(offset u16, xor u8)` edits, with or without the checksum recomputed;
//! - `3`: round trip: the bytes, if they are JSON, encoded with the codec and decoded again
//!   must give the same value (or, nested past the limit, be refused when saved);
//! - bit 5 set: the bytes as the payload of a valid record of a recursive type (`Tree`), in
//!   postcard (bit 7 clear) or RON (bit 7 set): nesting is the material, and the depth limit
//!   must refuse what is too deep with `NestingTooDeep`.
//!
//! Run it with `ulimit -s 2048` so that the fuzzer's own thread has the 2 MiB stack of a
//! game's threads: a decoder that recursed without bound would crash it.
//!
//! Bit 7 of the first byte reads with the cipher; bit 6 recomputes the checksum in mode 2.
//! Oracles: never a panic; an error is one of the typed decode errors; an authenticated or
//! checksummed record decodes to its original value or fails.

#![no_main]

use std::sync::LazyLock;

use bevy_storage::StorageError;
use bevy_storage::codec::{self, Cipher, Compression, EncryptionKey, Format, SealOptions, envelope};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "fuzz:record";

static CIPHER: LazyLock<Cipher> =
    LazyLock::new(|| Cipher::new(&EncryptionKey::from_bytes([0x42; 32]), None).unwrap());

/// Valid records: (bytes, encrypted, the JSON value they hold).
static VALID: LazyLock<Vec<(Vec<u8>, bool, serde_json::Value)>> = LazyLock::new(|| {
    let value = serde_json::json!({
        "name": "Ada", "level": 7, "gold": -120, "ratio": 0.25,
        "items": ["sword", "shield", "potion potion potion potion"],
        "pos": [1, 2, 3], "flags": {"tutorial": true, "boss": null}
    });
    let mut out = Vec::new();
    for format in [Format::Ron, Format::Binary] {
        for compression in [Compression::Off, Compression::Lz4] {
            for encrypt in [false, true] {
                let options = SealOptions {
                    format,
                    compression,
                    encrypt,
                };
                // postcard cannot hold a `serde_json::Value`: store strings instead.
                let bytes = if format == Format::Binary {
                    let strings = vec!["sword".to_owned(), "shield".repeat(9)];
                    codec::encode(KEY, &strings, &options, Some(&CIPHER))
                        .unwrap()
                        .0
                } else {
                    codec::encode(KEY, &value, &options, Some(&CIPHER))
                        .unwrap()
                        .0
                };
                let held = if format == Format::Binary {
                    serde_json::json!(["sword", "shield".repeat(9)])
                } else {
                    value.clone()
                };
                out.push((bytes, encrypt, held));
            }
        }
    }
    out
});

fn fix_crc(bytes: &mut [u8], key: &str) {
    if bytes.len() < 4 {
        return;
    }
    let n = bytes.len() - 4;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..n]);
    h.update(key.as_bytes());
    let crc = h.finalize().to_le_bytes();
    bytes[n..].copy_from_slice(&crc);
}

fn typed(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::Corrupt { .. }
            | StorageError::UnsupportedVersion { .. }
            | StorageError::DecryptionFailed { .. }
            | StorageError::EncryptionKeyMissing { .. }
            | StorageError::Deserialize { .. }
            | StorageError::NestingTooDeep { .. }
    )
}

/// A recursive type, as games save (quest trees, dialogue graphs).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Tree {
    Leaf(u8),
    Node(Vec<Tree>),
    Pair(Box<Tree>, Box<Tree>),
}

/// Drops a tree without recursing.
fn drop_flat(tree: Tree) {
    let mut stack = vec![tree];
    while let Some(t) = stack.pop() {
        match t {
            Tree::Leaf(_) => {}
            Tree::Node(children) => stack.extend(children),
            Tree::Pair(a, b) => {
                stack.push(*a);
                stack.push(*b);
            }
        }
    }
}

fn check<T>(what: &str, r: &Result<T, StorageError>) {
    if let Err(e) = r {
        assert!(typed(e), "{what}: untyped error {e:?}");
        assert!(
            e.to_string().contains(KEY),
            "{what}: the error does not name the key: {e}"
        );
    }
}

/// Runs every decoder on `bytes`.
fn decode_all(bytes: &[u8], cipher: Option<&Cipher>) -> Option<serde_json::Value> {
    let _ = envelope::inspect(KEY, bytes);
    let opened = envelope::open(KEY, bytes, cipher);
    check("open", &opened);
    let strings = codec::decode::<Vec<String>>(KEY, bytes, cipher);
    check("decode Vec<String>", &strings);
    let value = codec::decode::<serde_json::Value>(KEY, bytes, cipher);
    check("decode Value", &value);
    match (value, strings) {
        (Ok(v), _) => Some(v),
        (_, Ok(s)) => Some(serde_json::json!(s)),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 0x20 != 0 {
        let format = if mode & 0x80 != 0 { Format::Ron } else { Format::Binary };
        let options = SealOptions {
            format,
            compression: Compression::Off,
            encrypt: false,
        };
        let (bytes, _) = envelope::seal(KEY, rest, &options, None).unwrap();
        let tree = codec::decode::<Tree>(KEY, &bytes, None);
        check("decode Tree", &tree);
        if let Ok(tree) = tree {
            drop_flat(tree);
        }
        return;
    }
    let cipher = (mode & 0x80 != 0).then(|| &*CIPHER);
    match mode & 3 {
        0 => {
            decode_all(rest, cipher);
        }
        1 => {
            let mut bytes = rest.to_vec();
            bytes.extend_from_slice(&[0; 4]);
            fix_crc(&mut bytes, KEY);
            decode_all(&bytes, cipher);
        }
        2 => {
            let Some((&pick, edits)) = rest.split_first() else {
                return;
            };
            let (original, encrypted, held) = &VALID[pick as usize % VALID.len()];
            let mut bytes = original.clone();
            for edit in edits.chunks_exact(3) {
                let at = u16::from_le_bytes([edit[0], edit[1]]) as usize % bytes.len();
                bytes[at] ^= edit[2];
            }
            let forged = mode & 0x40 != 0;
            if forged {
                fix_crc(&mut bytes, KEY);
            }
            let changed = bytes != *original;
            let decoded = decode_all(&bytes, Some(&CIPHER));
            // Without a forged checksum, damage is caught; with one, an encrypted record that
            // still says it is encrypted is caught by AES-GCM.
            let authenticated = !forged || (*encrypted && bytes[5] & 2 != 0);
            if let Some(v) = decoded {
                if authenticated || !changed {
                    assert_eq!(&v, held, "damage decoded to another value");
                }
            }
        }
        _ => {
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) else {
                return;
            };
            let options = SealOptions {
                format: Format::Ron,
                compression: Compression::from((mode >> 2) & 1 != 0),
                encrypt: cipher.is_some(),
            };
            let (bytes, _) = match codec::encode(KEY, &value, &options, cipher) {
                Ok(sealed) => sealed,
                // Nested past the limit: refused when saved, never written.
                Err(StorageError::NestingTooDeep { .. }) => return,
                Err(e) => panic!("a JSON value does not save: {e}\n{value}"),
            };
            let back: serde_json::Value = codec::decode(KEY, &bytes, cipher)
                .unwrap_or_else(|e| panic!("a saved value does not load back: {e}\n{value}"));
            assert_eq!(back, value, "a saved value loads back different");
        }
    }
});
