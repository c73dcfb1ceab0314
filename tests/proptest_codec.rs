#![cfg(all(feature = "compression", feature = "encryption"))]
// The cases seal records with LZ4 and AES-GCM; the smallest build runs the other suites.
//! Property tests over everything that parses stored bytes: the record envelope and value
//! codec, the file backend's record files and journal, and the world-snapshot decoder.
//!
//! The promise under test: any byte string, and any mutation of a valid record (truncation,
//! bit flips, swapped or duplicated byte ranges, a record copied under another key, a record
//! from a newer format version), gives a typed error or the original value, never a panic and
//! never a wrong value.
//!
//! Case counts are set per test (`ProptestConfig::with_cases`) so that one `cargo test` run
//! makes well over 100,000 cases in total while the whole file stays within about a minute in
//! the dev profile; `CASES` at the bottom of each config says how many.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use bevy::prelude::*;
use bevy_storage::backend::{Backend, FileBackend, PutMode, Record, RecordMeta, WriteOp};
use bevy_storage::clock::Timestamp;
use bevy_storage::codec::{
    self, Cipher, Compression, EncryptionKey, Format, SealOptions, envelope,
};
use bevy_storage::snapshot::{
    Persist, SnapshotContext, SnapshotEncoding, SnapshotRegistry, SnapshotSettings, capture,
};
use bevy_storage::{CustomMetadata, StorageError};
use proptest::prelude::*;
use proptest::sample::Index;
use serde::{Deserialize, Serialize};

// ------------------------------------------------------------------------------ fixtures

static CIPHER: LazyLock<Cipher> =
    LazyLock::new(|| Cipher::new(&EncryptionKey::from_bytes([9; 32]), None).unwrap());
static OTHER_CIPHER: LazyLock<Cipher> =
    LazyLock::new(|| Cipher::new(&EncryptionKey::from_bytes([10; 32]), None).unwrap());

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Player {
    name: String,
    level: u32,
    gold: i64,
    items: Vec<String>,
    flags: Option<(bool, u8)>,
}

fn player() -> impl Strategy<Value = Player> {
    (
        ".{0,16}",
        any::<u32>(),
        any::<i64>(),
        prop::collection::vec("[a-z ]{0,12}", 0..4),
        any::<Option<(bool, u8)>>(),
    )
        .prop_map(|(name, level, gold, items, flags)| Player {
            name,
            level,
            gold,
            items,
            flags,
        })
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Ron), Just(Format::Binary)]
}

/// What a decoder may answer for damaged input: one of the errors that name the damage.
fn is_typed_decode_error(e: &StorageError) -> bool {
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

/// Checks a decode error is typed and names the record it is about.
fn check_error(e: &StorageError, key: &str) -> Result<(), TestCaseError> {
    prop_assert!(is_typed_decode_error(e), "untyped error: {e:?}");
    let message = e.to_string();
    prop_assert!(
        message.contains(&format!("{key:?}")),
        "the message does not name the key {key:?}: {message}"
    );
    Ok(())
}

fn cipher(on: bool) -> Option<&'static Cipher> {
    on.then(|| &*CIPHER)
}

// ----------------------------------------------------------------------------- mutations

/// One kind of damage to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    /// Keep only the first `len` bytes.
    Truncate(Index),
    /// Flip one to four bits.
    FlipBits(Vec<(Index, u8)>),
    /// Overwrite one byte.
    SetByte(Index, u8),
    /// Swap two non-overlapping ranges of the same length.
    SwapRanges(Index, Index, usize),
    /// Copy a range and insert the copy somewhere.
    Duplicate(Index, usize, Index),
    /// Remove a range.
    Remove(Index, usize),
    /// Append bytes.
    Append(Vec<u8>),
    /// Overwrite a little-endian u32 (at an index rounded to the length).
    SetU32(Index, u32),
    /// Overwrite a little-endian u64.
    SetU64(Index, u64),
    /// Overwrite the bytes at an exact offset (a field of a known layout).
    At(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        prop::collection::vec((any::<Index>(), 0u8..8), 1..5).prop_map(Mutation::FlipBits),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        (any::<Index>(), any::<Index>(), 1usize..24)
            .prop_map(|(a, b, n)| Mutation::SwapRanges(a, b, n)),
        (any::<Index>(), 1usize..32, any::<Index>())
            .prop_map(|(a, n, at)| Mutation::Duplicate(a, n, at)),
        (any::<Index>(), 1usize..32).prop_map(|(a, n)| Mutation::Remove(a, n)),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        (any::<Index>(), any::<u32>()).prop_map(|(i, v)| Mutation::SetU32(i, v)),
        (any::<Index>(), any::<u64>()).prop_map(|(i, v)| Mutation::SetU64(i, v)),
    ]
}

impl Mutation {
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        let len = b.len();
        if len == 0 {
            if let Mutation::Append(extra) = self {
                b.extend_from_slice(extra);
            }
            return b;
        }
        match self {
            Mutation::Truncate(i) => b.truncate(i.index(len)),
            Mutation::FlipBits(bits) => {
                for (i, bit) in bits {
                    b[i.index(len)] ^= 1 << bit;
                }
            }
            Mutation::SetByte(i, v) => b[i.index(len)] = *v,
            Mutation::SwapRanges(x, y, n) => {
                let n = (*n).min(len / 2);
                if n > 0 {
                    let a = x.index(len - n + 1);
                    let c = y.index(len - n + 1);
                    let (lo, hi) = (a.min(c), a.max(c));
                    if hi >= lo + n {
                        let (left, right) = b.split_at_mut(hi);
                        left[lo..lo + n].swap_with_slice(&mut right[..n]);
                    }
                }
            }
            Mutation::Duplicate(x, n, at) => {
                let start = x.index(len);
                let end = (start + n).min(len);
                let copy = b[start..end].to_vec();
                let at = at.index(len + 1);
                b.splice(at..at, copy);
            }
            Mutation::Remove(x, n) => {
                let start = x.index(len);
                let end = (start + n).min(len);
                b.drain(start..end);
            }
            Mutation::Append(extra) => b.extend_from_slice(extra),
            Mutation::SetU32(i, v) => {
                if len >= 4 {
                    let at = i.index(len - 3);
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            Mutation::SetU64(i, v) => {
                if len >= 8 {
                    let at = i.index(len - 7);
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            Mutation::At(at, v) => {
                if at + v.len() <= len {
                    b[*at..at + v.len()].copy_from_slice(v);
                }
            }
        }
        b
    }
}

/// Recomputes the envelope checksum (CRC-32 of everything before it, then the key), as a
/// forger would: the damage then has to be caught by the layers below the checksum.
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

// ------------------------------------------------------------------ any bytes, any header

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_ANY_BYTES))]

    /// Any byte string: `inspect`, `open` and `decode` answer with a typed error (a random
    /// string practically never carries a valid checksum), never a panic.
    #[test]
    fn any_bytes_open_and_decode_to_a_typed_error(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        with_magic in any::<bool>(),
        encrypted in any::<bool>(),
        key in "[a-z0-9:]{1,12}",
    ) {
        let mut bytes = bytes;
        if with_magic {
            // Get past the magic-number check most of the time.
            bytes.splice(0..bytes.len().min(5), *b"BSTR\x01");
        }
        let _ = envelope::inspect(&key, &bytes);
        match envelope::open(&key, &bytes, cipher(encrypted)) {
            Ok(_) => {} // a 1 in 2^32 checksum collision: not a failure of the decoder
            Err(e) => check_error(&e, &key)?,
        }
        if let Err(e) = codec::decode::<serde_json::Value>(&key, &bytes, cipher(encrypted)) {
            check_error(&e, &key)?;
        }
        if let Err(e) = codec::decode::<Vec<String>>(&key, &bytes, None) {
            check_error(&e, &key)?;
        }
    }
}

/// A header byte: usually a valid value, sometimes anything.
fn header_byte(valid: std::ops::Range<u8>) -> impl Strategy<Value = u8> {
    prop_oneof![4 => valid, 1 => any::<u8>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_FRAMED))]

    /// A well-framed record with a valid checksum around an arbitrary body: the damage is now
    /// below the checksum, so decompression, decryption and deserialization see garbage.
    /// Typed error or a value, never a panic.
    #[test]
    fn garbage_behind_a_valid_checksum_is_a_typed_error(
        version in header_byte(1..2),
        flags in header_byte(0..4),
        format_byte in header_byte(0..3),
        reserved in header_byte(0..1),
        lz4_size in prop::option::of(any::<u32>()),
        body in prop::collection::vec(any::<u8>(), 0..300),
        with_cipher in any::<bool>(),
        key in "[a-z0-9:]{1,12}",
    ) {
        let mut bytes = b"BSTR".to_vec();
        bytes.extend_from_slice(&[version, flags, format_byte, reserved]);
        if let Some(size) = lz4_size {
            // A plausible LZ4 size prefix, small or absurd.
            bytes.extend_from_slice(&(size % 4096).to_le_bytes()[..if size % 2 == 0 { 4 } else { 2 }]);
        }
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&[0; 4]);
        fix_crc(&mut bytes, &key);
        let c = cipher(with_cipher);
        if let Err(e) = envelope::open(&key, &bytes, c) {
            check_error(&e, &key)?;
        }
        for result in [
            codec::decode::<serde_json::Value>(&key, &bytes, c).map(drop),
            codec::decode::<Vec<String>>(&key, &bytes, c).map(drop),
            codec::decode::<Player>(&key, &bytes, c).map(drop),
            codec::decode::<(u8, Option<String>, Vec<u64>)>(&key, &bytes, c).map(drop),
        ] {
            if let Err(e) = result {
                check_error(&e, &key)?;
            }
        }
    }
}

// -------------------------------------------------------------------- mutated valid records

/// How a valid record is damaged.
#[derive(Debug, Clone)]
enum RecordDamage {
    /// Bytes damaged; the checksum is recomputed afterwards when `forge` is set.
    Bytes { mutation: Mutation, forge: bool },
    /// The intact record read under another key (copied, or a file moved), optionally with
    /// the checksum recomputed for that key.
    OtherKey { key: String, forge: bool },
    /// The envelope version byte raised, as a newer build would write it.
    NewerVersion { version: u8, forge: bool },
    /// Read with the wrong key, or with none.
    WrongCipher { none: bool },
}

fn record_damage() -> impl Strategy<Value = RecordDamage> {
    prop_oneof![
        8 => (mutation(), prop::bool::weighted(0.3))
            .prop_map(|(mutation, forge)| RecordDamage::Bytes { mutation, forge }),
        1 => ("[a-z0-9:]{1,12}", any::<bool>())
            .prop_map(|(key, forge)| RecordDamage::OtherKey { key, forge }),
        1 => (2u8.., any::<bool>())
            .prop_map(|(version, forge)| RecordDamage::NewerVersion { version, forge }),
        1 => any::<bool>().prop_map(|none| RecordDamage::WrongCipher { none }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_MUTATED))]

    /// A valid record, damaged: a typed error or exactly the original value.
    ///
    /// With the checksum recomputed (a forged record), a plain record has no authentication:
    /// then only "no panic, typed error or some value" is required. An encrypted record is
    /// authenticated by AES-GCM over header, key and ciphertext: even forged, it decodes to
    /// the original or fails.
    #[test]
    fn mutated_records_give_a_typed_error_or_the_original(
        value in player(),
        format in format(),
        compression in prop_oneof![Just(Compression::Off), Just(Compression::Lz4)],
        encrypt in any::<bool>(),
        key in "[a-z0-9:]{1,12}",
        damage in record_damage(),
    ) {
        let options = SealOptions { format, compression, encrypt };
        let (bytes, _) = codec::encode(&key, &value, &options, cipher(encrypt)).unwrap();
        prop_assert_eq!(&codec::decode::<Player>(&key, &bytes, cipher(encrypt)).unwrap(), &value);

        let (read_key, damaged, forged, read_cipher) = match &damage {
            RecordDamage::Bytes { mutation, forge } => {
                let mut b = mutation.apply(&bytes);
                if *forge {
                    fix_crc(&mut b, &key);
                }
                (key.clone(), b, *forge, cipher(encrypt))
            }
            RecordDamage::OtherKey { key: other, forge } => {
                let mut b = bytes.clone();
                if *forge {
                    fix_crc(&mut b, other);
                }
                (other.clone(), b, *forge, cipher(encrypt))
            }
            RecordDamage::NewerVersion { version, forge } => {
                let mut b = bytes.clone();
                b[4] = *version;
                if *forge {
                    fix_crc(&mut b, &key);
                }
                (key.clone(), b, *forge, cipher(encrypt))
            }
            RecordDamage::WrongCipher { none } => {
                let c = if *none { None } else { Some(&*OTHER_CIPHER) };
                (key.clone(), bytes.clone(), false, c)
            }
        };
        let result = codec::decode::<Player>(&read_key, &damaged, read_cipher);
        match (&damage, &result) {
            (RecordDamage::NewerVersion { version, .. }, r) => {
                prop_assert!(
                    matches!(r, Err(StorageError::UnsupportedVersion { found, .. }) if found == version),
                    "a newer version must say so: {r:?}"
                );
            }
            (RecordDamage::WrongCipher { none }, r) if encrypt => {
                let expected = if *none {
                    matches!(r, Err(StorageError::EncryptionKeyMissing { .. }))
                } else {
                    matches!(r, Err(StorageError::DecryptionFailed { .. }))
                };
                prop_assert!(expected, "wrong or missing key: {r:?}");
            }
            (_, Ok(decoded)) => {
                // A forged plain record may decode to something else; nothing else may.
                let still_authenticated = encrypt && damaged.len() > 5 && damaged[5] & 2 != 0;
                if !forged || still_authenticated {
                    prop_assert_eq!(decoded, &value, "damage decoded to a different value");
                }
            }
            (_, Err(e)) => check_error(e, &read_key)?,
        }
        // The store's raw path must agree: open gives the payload or a typed error.
        if let Err(e) = envelope::open(&read_key, &damaged, read_cipher) {
            check_error(&e, &read_key)?;
        }
    }
}

// ------------------------------------------------------------- file backend: record files

/// A file backend holding a few records, and the original bytes of their files.
struct FileFixture {
    _dir: tempfile::TempDir,
    backend: FileBackend,
    files: Vec<(String, PathBuf, Vec<u8>, Record)>,
}

fn record(value: &[u8], custom: bool) -> Record {
    let now = Timestamp::now();
    let mut meta = RecordMeta {
        created_at: now,
        modified_at: now,
        accessed_at: now,
        expires_at: None,
        size: value.len() as u64,
        compressed: false,
        encrypted: false,
        custom: CustomMetadata::new(),
        version: bevy_storage::RecordVersion::fresh(),
    };
    if custom {
        meta.custom.insert("level".into(), "Crypt".into());
    }
    Record {
        value: value.to_vec(),
        meta,
    }
}

impl FileFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path().join("root")).unwrap();
        let keys = [
            "victim".to_owned(),
            // Long enough for a hashed name (`l-...`), probed slot by slot.
            format!("long:{}", "Q".repeat(120)),
        ];
        let mut files = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let (value, _) =
                codec::encode(key, &"a value worth keeping", &SealOptions::default(), None)
                    .unwrap();
            let rec = record(&value, i == 0);
            backend
                .write(
                    vec![WriteOp::Put {
                        key: key.clone(),
                        record: rec.clone(),
                        mode: PutMode::Upsert,
                    }],
                    Timestamp::now(),
                )
                .unwrap();
            let path = backend.path_of(key).unwrap().unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let stored = backend.get(key).unwrap().unwrap();
            files.push((key.clone(), path, bytes, stored));
        }
        backend
            .write(
                vec![WriteOp::Put {
                    key: "bystander".into(),
                    record: record(b"untouched", false),
                    mode: PutMode::Upsert,
                }],
                Timestamp::now(),
            )
            .unwrap();
        Self {
            _dir: dir,
            backend,
            files,
        }
    }
}

/// Damage aimed at the record file's fixed header (lengths, checksums, version).
fn file_damage() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => mutation(),
        1 => (prop::sample::select(vec![8usize, 12, 24, 40]), any::<u32>())
            .prop_map(|(at, v)| Mutation::At(at, v.to_le_bytes().to_vec())),
        1 => (
            prop::sample::select(vec![16usize, 32]),
            prop_oneof![any::<u64>(), Just(u64::MAX), (u64::MAX - 64)..],
        )
            .prop_map(|(at, v)| Mutation::At(at, v.to_le_bytes().to_vec())),
        1 => (2u8..).prop_map(|v| Mutation::At(4, vec![v])),
    ]
}

/// A damaged record file, read through `Backend::get`, `get_meta` and `scan`: a typed
/// error (`Corrupt`, `UnsupportedVersion`) or the original record, never a panic; other
/// records are unaffected and `scan` skips the damaged one without failing.
#[test]
fn damaged_record_files_give_a_typed_error_or_the_original() {
    let fixture = FileFixture::new();
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(CASES_FILES));
    let result = runner.run(&(0usize..2, file_damage()), |(which, damage)| {
        let (key, path, original, stored) = &fixture.files[which];
        let damaged = damage.apply(original);
        std::fs::write(path, &damaged).unwrap();
        let b = &fixture.backend;
        let got = b.get(key);
        let meta = b.get_meta(key);
        let scan = b.scan("");
        let bystander = b.get("bystander");
        std::fs::write(path, original).unwrap();

        match &got {
            Ok(Some(r)) => prop_assert_eq!(r, stored, "damage read back as another record"),
            Ok(None) => prop_assert!(false, "a damaged file made the key vanish silently"),
            Err(e) => prop_assert!(
                matches!(
                    e,
                    StorageError::Corrupt { .. } | StorageError::UnsupportedVersion { .. }
                ),
                "untyped error {e:?}"
            ),
        }
        match &meta {
            Ok(Some(m)) => prop_assert_eq!(m, &stored.meta),
            Ok(None) => prop_assert!(false, "a damaged file made the key vanish silently"),
            Err(e) => prop_assert!(
                matches!(
                    e,
                    StorageError::Corrupt { .. } | StorageError::UnsupportedVersion { .. }
                ),
                "untyped error {e:?}"
            ),
        }
        let scan = scan.map_err(|e| TestCaseError::fail(format!("scan failed: {e}")))?;
        prop_assert!(scan.iter().any(|e| e.key == "bystander"));
        prop_assert!(bystander.unwrap().is_some());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_JOURNAL))]

    /// Garbage in `.journal` (random, or framed with a valid length and checksum around a
    /// random payload): opening the directory discards it or fails with a typed error, never
    /// panics, and leaves only the backend's own files.
    #[test]
    fn garbage_journals_never_panic(
        payload in prop::collection::vec(any::<u8>(), 0..200),
        framed in any::<bool>(),
        version in prop_oneof![4 => Just(1u8), 1 => any::<u8>()],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let journal = if framed {
            let mut j = b"BSTJ".to_vec();
            j.push(version);
            j.extend_from_slice(&[0; 3]);
            j.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            j.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            j.extend_from_slice(&[0; 4]);
            j.extend_from_slice(&payload);
            j
        } else {
            payload
        };
        std::fs::write(root.join(".journal"), &journal).unwrap();
        match FileBackend::open(&root) {
            Ok(b) => {
                prop_assert!(b.scan("").unwrap().is_empty());
                drop(b);
                prop_assert!(!root.join(".journal").exists(), "an invalid journal is removed");
            }
            Err(e) => prop_assert!(
                matches!(e, StorageError::Backend { .. }),
                "untyped error {e:?}"
            ),
        }
        assert_only_backend_files(&root, dir.path());
    }
}

fn assert_only_backend_files(root: &Path, parent: &Path) {
    for entry in std::fs::read_dir(root).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == ".lock"
                || name == ".journal"
                || name.starts_with("k-")
                || name.starts_with("l-"),
            "stray entry {name:?} in the root"
        );
    }
    let siblings: Vec<_> = std::fs::read_dir(parent).unwrap().collect();
    assert_eq!(siblings.len(), 1, "the root's parent gained entries");
}

// ------------------------------------------------------------------------- snapshot decoder

#[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[reflect(Component)]
struct Position {
    x: i32,
    y: i32,
}

#[derive(Component, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Component)]
struct Health(u32);

#[derive(Component, Reflect, Clone, Debug, PartialEq)]
#[reflect(Component)]
struct Target(#[entities] Entity);

#[derive(Resource, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Resource)]
struct Score(u64);

struct SnapshotFixture {
    context: SnapshotContext,
    /// Valid snapshots of a small world, RON and binary.
    valid: [Vec<u8>; 2],
}

static SNAPSHOTS: LazyLock<SnapshotFixture> = LazyLock::new(|| {
    let registry = || {
        let mut r = SnapshotRegistry::new();
        r.register_component::<Position>();
        r
    };
    let mut app = App::new();
    app.insert_resource(registry());
    let world = app.world_mut();
    let a = world
        .spawn((Persist, Position { x: 1, y: 2 }, Health(3), Name::new("a")))
        .id();
    let b = world.spawn((Persist, Target(a), Health(9))).id();
    world.spawn((Persist, Name::new("child"), ChildOf(b)));
    world.insert_resource(Score(77));
    let valid = [SnapshotEncoding::Ron, SnapshotEncoding::Binary].map(|encoding| {
        let settings = SnapshotSettings::default()
            .encoding(encoding)
            .game_version(2)
            .allow_resource::<Score>();
        capture(world, &settings, &registry())
            .unwrap()
            .encode()
            .unwrap()
    });
    let mut target = App::new();
    target.insert_resource(registry());
    target.insert_resource(SnapshotSettings::default().game_version(3));
    let context = SnapshotContext::from_world(target.world_mut());
    for v in &valid {
        bevy_storage::snapshot::decode(v, &context).expect("the valid snapshots decode");
    }
    SnapshotFixture { context, valid }
});

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_SNAPSHOT))]

    /// The snapshot decoder on damaged snapshots (mutations of valid RON and binary ones) and
    /// on garbage behind a valid header: a typed snapshot error, or a snapshot that applies to
    /// a world; never a panic.
    #[test]
    fn damaged_snapshots_give_a_typed_error(
        which in 0usize..3,
        mutation in mutation(),
        garbage in prop::collection::vec(any::<u8>(), 0..120),
        encoding in 1u8..3,
    ) {
        let fixture = &*SNAPSHOTS;
        let bytes = if which < 2 {
            mutation.apply(&fixture.valid[which])
        } else {
            let mut b = fixture.valid[encoding as usize - 1][..16].to_vec();
            b.extend_from_slice(&garbage);
            b
        };
        match bevy_storage::snapshot::decode(&bytes, &fixture.context) {
            Ok(decoded) => {
                // Some damage is harmless (RON whitespace, a changed number). What decodes
                // must apply without failing: decoding promises that.
                let mut world = World::new();
                world.insert_resource(fixture.context.registry.clone());
                let _ = decoded.apply(&mut world, true);
            }
            Err(e) => prop_assert!(
                matches!(
                    e,
                    StorageError::Snapshot(_)
                        | StorageError::UnregisteredType { .. }
                        | StorageError::SnapshotFormatTooNew { .. }
                        | StorageError::SnapshotGameVersionTooNew { .. }
                ),
                "untyped error {e:?}"
            ),
        }
    }
}

// ------------------------------------------------------------------------------- budgets

// Cases per test; the total must stay at or above 100,000 (see `case_budget_is_at_least_100k`).
// ------------------------------------------------------------------------------ nesting

/// A recursive type as games save them (quest trees, dialogue graphs, scripts).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Tree {
    Leaf(u8),
    Node(Vec<Tree>),
    Pair(Box<Tree>, Box<Tree>),
}

impl Tree {
    /// Its nesting as the codec counts it (`codec::depth`): a newtype variant is one level,
    /// a sequence one more, a tuple variant two.
    fn levels(&self) -> usize {
        match self {
            Tree::Leaf(_) => 1,
            Tree::Node(children) => 2 + children.iter().map(Tree::levels).max().unwrap_or(0),
            Tree::Pair(a, b) => 2 + a.levels().max(b.levels()),
        }
    }
}

/// Trees from flat to twice as deep as the codec accepts.
fn tree() -> impl Strategy<Value = Tree> {
    let leaf = any::<u8>().prop_map(Tree::Leaf);
    leaf.prop_recursive(130, 400, 2, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Tree::Node),
            (inner.clone(), inner).prop_map(|(a, b)| Tree::Pair(Box::new(a), Box::new(b))),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_NESTING))]

    /// On a test thread (2 MiB of stack, as a Bevy pool thread): a tree saves exactly when
    /// it nests no deeper than `MAX_DEPTH`, then loads back equal; deeper ones are refused
    /// with `NestingTooDeep` when saved.
    #[test]
    fn trees_save_exactly_up_to_the_depth_limit(tree in tree(), format in format()) {
        let options = SealOptions { format, compression: Compression::Off, encrypt: false };
        let allowed = tree.levels() <= codec::depth::MAX_DEPTH;
        match codec::encode("tree", &tree, &options, None) {
            Ok((bytes, _)) => {
                prop_assert!(allowed, "saved a tree of {} levels", tree.levels());
                let back: Tree = codec::decode("tree", &bytes, None)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(back, tree);
            }
            Err(e) => {
                prop_assert!(!allowed, "refused a tree of {} levels: {e}", tree.levels());
                prop_assert!(matches!(e, StorageError::NestingTooDeep { .. }), "{e:?}");
            }
        }
    }

    /// Any bytes as the payload of a recursive type, mostly runs of variant tags (deep
    /// nesting): a typed error or a tree within the limit, never a stack overflow.
    #[test]
    fn nested_payloads_decode_within_the_limit(
        tags in prop::collection::vec(prop_oneof![8 => 1u8..=2, 1 => any::<u8>()], 0..2_000),
        ron in any::<bool>(),
    ) {
        let (payload, format) = if ron {
            let text: String = tags
                .iter()
                .map(|t| match t % 3 { 0 => "Leaf(1)", 1 => "Node([", _ => "Pair(" })
                .collect();
            (text.into_bytes(), Format::Ron)
        } else {
            (tags, Format::Binary)
        };
        let options = SealOptions { format, compression: Compression::Off, encrypt: false };
        let (bytes, _) = envelope::seal("tree", &payload, &options, None).unwrap();
        match codec::decode::<Tree>("tree", &bytes, None) {
            Ok(tree) => prop_assert!(tree.levels() <= codec::depth::MAX_DEPTH),
            Err(e) => check_error(&e, "tree")?,
        }
    }
}

const CASES_NESTING: u32 = 3_000;
const CASES_ANY_BYTES: u32 = 30_000;
const CASES_FRAMED: u32 = 25_000;
const CASES_MUTATED: u32 = 40_000;
const CASES_FILES: u32 = 4_000;
const CASES_JOURNAL: u32 = 500;
const CASES_SNAPSHOT: u32 = 10_000;

#[test]
fn case_budget_is_at_least_100k() {
    let total = CASES_ANY_BYTES
        + CASES_FRAMED
        + CASES_MUTATED
        + CASES_FILES
        + CASES_JOURNAL
        + CASES_SNAPSHOT
        + 2 * CASES_NESTING;
    assert!(total >= 100_000, "only {total} property cases per run");
}
