#![cfg(all(feature = "sqlite", feature = "encryption"))]
//! Every save file is untrusted input (issue 13): a generated corpus of hostile saves, each
//! of which must give a typed error, within a second and 64 MiB of extra memory, decoded on a
//! thread with a 2 MiB stack (a Bevy task-pool thread, a game's main thread), and without
//! damaging what was stored before.
//!
//! Memory is measured per thread by a counting allocator, so the tests of this binary that
//! run in parallel do not disturb each other's figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_storage::backend::{Backend, PutMode, Record, RecordMeta, WriteOp};
use bevy_storage::codec::depth::MAX_DEPTH;
use bevy_storage::codec::envelope::{self, SealOptions};
use bevy_storage::codec::format;
use bevy_storage::key::KEYCHECK_KEY;
use bevy_storage::snapshot::{
    DELTA_HEADER_LEN, HEADER_LEN, Persist, SnapshotContext, SnapshotEncoding, SnapshotRegistry,
    SnapshotSettings, capture, capture_base, capture_delta, decode, decode_chain,
};
use bevy_storage::{
    Compression, EncryptionKey, Format, LoadOptions, SaveOptions, StorageConfig, StorageError,
    Store,
};
use serde::{Deserialize, Serialize};

// ===================================================================== measuring a decode

struct CountingAllocator;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counting only
// touches const-initialized thread-locals, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The bounds every hostile case must stay within.
const TIME_BOUND: Duration = Duration::from_secs(1);
const MEMORY_BOUND: isize = 64 * 1024 * 1024;
/// The stack of a Bevy task-pool thread and of a game's main thread.
const STACK: usize = 2 * 1024 * 1024;

/// Runs `attempt` on a fresh thread with a 2 MiB stack and checks its bounds: it must finish
/// within [`TIME_BOUND`], allocate at most [`MEMORY_BOUND`] more than it started with, and
/// return the error `expected` accepts.
fn hostile_case<T: Send + 'static + std::fmt::Debug>(
    name: &str,
    attempt: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
    expected: impl Fn(&StorageError) -> bool,
) {
    let (outcome, elapsed, peak) = std::thread::Builder::new()
        .name(format!("hostile {name}"))
        .stack_size(STACK)
        .spawn(move || {
            let base = LIVE.with(Cell::get);
            PEAK.with(|p| p.set(base));
            let start = Instant::now();
            let outcome = attempt();
            let elapsed = start.elapsed();
            let peak = PEAK.with(Cell::get) - base;
            (outcome, elapsed, peak)
        })
        .expect("spawn")
        .join()
        .unwrap_or_else(|_| panic!("{name}: the decode panicked"));
    match &outcome {
        Ok(value) => panic!("{name}: a hostile save was accepted: {value:?}"),
        Err(e) => assert!(expected(e), "{name}: unexpected error: {e:?}"),
    }
    assert!(
        elapsed < TIME_BOUND,
        "{name}: took {elapsed:?} (bound {TIME_BOUND:?})"
    );
    assert!(
        peak < MEMORY_BOUND,
        "{name}: allocated {} MiB (bound 64 MiB)",
        peak / (1024 * 1024)
    );
    println!(
        "hostile {name}: {:?} in {elapsed:?}, {} KiB",
        outcome
            .unwrap_err()
            .to_string()
            .chars()
            .take(90)
            .collect::<String>(),
        peak / 1024
    );
}

fn too_deep(e: &StorageError) -> bool {
    matches!(e, StorageError::NestingTooDeep { .. })
}

// ===================================================================== the corpus's values

/// Any recursive type a game saves: a quest tree, a dialogue graph, a scripting AST.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

impl Tree {
    /// A tree of `nodes` nodes; it nests `nodes + 1` levels (each node and the leaf count one).
    fn nested(nodes: usize) -> Tree {
        (0..nodes).fold(Tree::Leaf, |t, _| Tree::Node(Box::new(t)))
    }
}

/// Drops a deep tree without recursing (the derived `Drop` would recurse).
fn drop_flat(mut tree: Tree) {
    while let Tree::Node(inner) = tree {
        tree = *inner;
    }
}

/// postcard bytes of a `Tree` nested `depth` nodes deep: variant 1 (`Node`) repeated, then 0.
fn deep_postcard(depth: usize) -> Vec<u8> {
    let mut bytes = vec![1u8; depth];
    bytes.push(0);
    bytes
}

/// RON text of a `Tree` nested `depth` nodes deep.
fn deep_ron(depth: usize) -> Vec<u8> {
    format!("{}Leaf{}", "Node(".repeat(depth), ")".repeat(depth)).into_bytes()
}

fn now(store: &Store) -> bevy_storage::clock::Timestamp {
    bevy_storage::clock::Timestamp::from_system_time(store.now())
}

/// Writes `value` as the stored bytes of `key`, behind the store's back (an edited save).
fn plant(store: &Store, key: &str, value: Vec<u8>) {
    plant_with(store.backend().as_ref(), key, value, now(store));
}

fn plant_with(
    backend: &dyn Backend,
    key: &str,
    value: Vec<u8>,
    at: bevy_storage::clock::Timestamp,
) {
    let record = Record {
        meta: RecordMeta {
            created_at: at,
            modified_at: at,
            accessed_at: at,
            expires_at: None,
            size: value.len() as u64,
            compressed: false,
            encrypted: false,
            custom: Default::default(),
            version: Default::default(),
        },
        value,
    };
    let op = WriteOp::Put {
        key: key.to_owned(),
        record,
        mode: PutMode::Upsert,
    };
    backend.write(vec![op], at).unwrap();
}

/// A correctly sealed record of `payload` in `format`: only the payload is hostile.
fn sealed(key: &str, payload: &[u8], format: Format) -> Vec<u8> {
    let options = SealOptions {
        format,
        compression: Compression::Off,
        encrypt: false,
    };
    envelope::seal(key, payload, &options, None).unwrap().0
}

fn memory_store() -> Store {
    Store::open(StorageConfig::memory()).unwrap()
}

// ===================================================================== 1. depth

#[test]
fn deep_records_are_refused_in_every_format() {
    for (format, bytes) in [
        (Format::Binary, deep_postcard(100_000)),
        (Format::Ron, deep_ron(100_000)),
        // Just past the limit: the refusal is the limit's, not a side effect of size.
        (Format::Binary, deep_postcard(MAX_DEPTH)),
        (Format::Ron, deep_ron(MAX_DEPTH)),
    ] {
        let store = memory_store();
        let name = format!(
            "{format:?} record nested past the limit ({} bytes)",
            bytes.len()
        );
        plant(&store, "quest:tree", sealed("quest:tree", &bytes, format));
        hostile_case(
            &name,
            move || store.load::<Tree>("quest:tree", &LoadOptions::default()),
            too_deep,
        );
    }
}

#[test]
fn deep_values_decode_directly_as_typed_errors() {
    // The codec functions the CLI and tools call hold the same limit.
    hostile_case(
        "format::deserialize postcard",
        || format::deserialize::<Tree>("k", &deep_postcard(1_000_000), Format::Binary),
        too_deep,
    );
    hostile_case(
        "format::deserialize RON",
        || format::deserialize::<Tree>("k", &deep_ron(1_000_000), Format::Ron),
        too_deep,
    );
    // A self-describing value (what the CLI reads records as) in RON.
    hostile_case(
        "RON value",
        || {
            format::deserialize::<serde_json::Value>("k", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", Format::Ron)
        },
        |e| too_deep(e) || matches!(e, StorageError::Deserialize { .. }),
    );
}

#[test]
fn values_up_to_the_limit_round_trip_on_a_2_mib_stack() {
    std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(|| {
            for format in [Format::Ron, Format::Binary] {
                let store = memory_store();
                let opts = SaveOptions::new().format(format);
                // MAX_DEPTH - 1 nodes and the leaf: exactly MAX_DEPTH levels.
                let deepest = Tree::nested(MAX_DEPTH - 1);
                store.save("tree", &deepest, &opts).unwrap();
                let back: Tree = store
                    .load("tree", &LoadOptions::default())
                    .unwrap()
                    .unwrap();
                assert_eq!(back, deepest, "{format:?}");
                drop_flat(back);

                // One level more is refused when saved, and the stored value is kept.
                let too_deep_value = Tree::nested(MAX_DEPTH);
                let err = store.save("tree", &too_deep_value, &opts).unwrap_err();
                assert!(
                    matches!(err, StorageError::NestingTooDeep { limit, .. } if limit == MAX_DEPTH),
                    "{format:?}: {err}"
                );
                let kept: Tree = store
                    .load("tree", &LoadOptions::default())
                    .unwrap()
                    .unwrap();
                assert_eq!(kept, deepest);
                drop_flat(kept);
                drop_flat(deepest);
                drop_flat(too_deep_value);
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn deep_custom_metadata_is_refused() {
    // The metadata columns are decoded too (serde_json, whose own limit is 128).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let store = Store::open(StorageConfig::sqlite(&path)).unwrap();
    store.save("k", &1u8, &SaveOptions::new()).unwrap();
    drop(store);
    let connection = rusqlite_update(&path);
    drop(connection);
    let store = Store::open(StorageConfig::sqlite(&path)).unwrap();
    hostile_case(
        "custom metadata nested 100,000 deep",
        move || store.get_metadata("k"),
        |e| matches!(e, StorageError::Corrupt { .. }),
    );
}

/// Edits the custom metadata of `k` in the SQLite file into deeply nested JSON.
fn rusqlite_update(path: &std::path::Path) -> rusqlite::Connection {
    let connection = rusqlite::Connection::open(path).unwrap();
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
    connection
        .execute("UPDATE records SET custom = ?1 WHERE key = 'k'", [deep])
        .unwrap();
    connection
}

// ===================================================================== lengths, truncation

#[test]
fn huge_declared_lengths_and_truncations_are_refused() {
    let store = memory_store();
    // postcard: a Vec<u8> declaring 2^62 bytes, a String declaring 1 TiB, then nothing.
    let mut huge_vec = vec![0xff; 8];
    huge_vec.push(0x3f);
    plant(&store, "bytes", sealed("bytes", &huge_vec, Format::Binary));
    let s = store.clone();
    hostile_case(
        "postcard Vec<u8> declaring 2^62 bytes",
        move || s.load::<Vec<u8>>("bytes", &LoadOptions::default()),
        |e| matches!(e, StorageError::Deserialize { .. }),
    );
    let s = store.clone();
    hostile_case(
        "postcard Vec<String> declaring 2^62 elements",
        move || s.load::<Vec<String>>("bytes", &LoadOptions::default()),
        |e| matches!(e, StorageError::Deserialize { .. }),
    );

    // LZ4: a compressed payload claiming 4 GiB.
    let mut lz4 = sealed("lz4", &[0u8; 16], Format::Binary);
    lz4[5] = 1; // the compressed flag
    lz4[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let fixed = fix_crc("lz4", lz4);
    plant(&store, "lz4", fixed);
    let s = store.clone();
    hostile_case(
        "LZ4 block claiming 4 GiB",
        move || s.load::<Vec<u8>>("lz4", &LoadOptions::default()),
        |e| matches!(e, StorageError::Corrupt { .. }),
    );

    // Every truncation of a real record.
    let store = memory_store();
    store
        .save("hero", &vec!["sword"; 40], &SaveOptions::new())
        .unwrap();
    let full = store.backend().get("hero").unwrap().unwrap().value;
    for len in [0, 1, 4, 8, 11, full.len() / 2, full.len() - 1] {
        plant(&store, "hero", full[..len].to_vec());
        let s = store.clone();
        hostile_case(
            &format!("record truncated to {len} bytes"),
            move || s.load::<Vec<String>>("hero", &LoadOptions::default()),
            |e| matches!(e, StorageError::Corrupt { .. }),
        );
    }
}

/// Recomputes a record's CRC (as an attacker who knows the format would).
fn fix_crc(key: &str, mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 4;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..n]);
    h.update(key.as_bytes());
    let crc = h.finalize();
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

// ===================================================================== forged and swapped

const RAW_KEY: [u8; 32] = [7; 32];

fn encrypted_store(backend: Option<Arc<dyn Backend>>) -> Store {
    let config = StorageConfig::memory()
        .encryption_key(EncryptionKey::from_bytes(RAW_KEY))
        .enable_encryption(true);
    match backend {
        Some(b) => Store::with_backend(b, config).unwrap(),
        None => Store::open(config).unwrap(),
    }
}

#[test]
fn plaintext_records_are_refused_in_an_encrypted_store() {
    let secure = encrypted_store(None);
    secure
        .save("gold:alice", &100u64, &SaveOptions::new())
        .unwrap();
    // The attacker opens the same database without the key and writes plaintext.
    let attacker = Store::with_backend(secure.backend().clone(), StorageConfig::memory()).unwrap();
    attacker
        .save(
            "gold:alice",
            &999_999_999u64,
            &SaveOptions::new().encrypt(false),
        )
        .unwrap();
    attacker
        .save(
            "gold:bob",
            &999_999_999u64,
            &SaveOptions::new().encrypt(false),
        )
        .unwrap();
    for key in ["gold:alice", "gold:bob"] {
        let s = secure.clone();
        hostile_case(
            &format!("forged plaintext {key}"),
            move || s.load::<u64>(key, &LoadOptions::default()),
            |e| matches!(e, StorageError::NotEncrypted { .. }),
        );
    }
    // Raw-byte loads (snapshots, tools) hold the same line.
    let s = secure.clone();
    hostile_case(
        "forged plaintext through load_bytes",
        move || s.load_bytes("gold:alice", &LoadOptions::default()),
        |e| matches!(e, StorageError::NotEncrypted { .. }),
    );
    // A game migrating old saves opts in, deliberately.
    let migrate = LoadOptions::new().accept_plaintext(true);
    assert_eq!(
        secure.load::<u64>("gold:alice", &migrate).unwrap(),
        Some(999_999_999)
    );
    // And the cache never hands a plaintext record to a load that did not opt in.
    let cached = Store::with_backend(
        secure.backend().clone(),
        StorageConfig::memory()
            .encryption_key(EncryptionKey::from_bytes(RAW_KEY))
            .enable_encryption(true)
            .read_cache(Some(Duration::from_secs(60))),
    )
    .unwrap();
    // Twice: the first load marks the key, the second fills the cache.
    assert!(cached.load::<u64>("gold:bob", &migrate).is_ok());
    assert!(cached.load::<u64>("gold:bob", &migrate).is_ok());
    assert_eq!(cached.get_stats().cache.entries, 1);
    assert!(matches!(
        cached.load::<u64>("gold:bob", &LoadOptions::default()),
        Err(StorageError::NotEncrypted { .. })
    ));
    // A store that only holds the key (encryption per save) still reads plaintext: it made
    // no promise about records it was not asked to encrypt.
    let per_save = Store::with_backend(
        secure.backend().clone(),
        StorageConfig::memory().encryption_key(EncryptionKey::from_bytes(RAW_KEY)),
    )
    .unwrap();
    assert_eq!(
        per_save
            .load::<u64>("gold:bob", &LoadOptions::default())
            .unwrap(),
        Some(999_999_999)
    );
}

#[test]
fn records_swapped_between_keys_are_refused() {
    for encrypted in [false, true] {
        let store = if encrypted {
            encrypted_store(None)
        } else {
            memory_store()
        };
        store
            .save("gold:alice", &5u64, &SaveOptions::new())
            .unwrap();
        store
            .save("gold:bob", &1_000_000u64, &SaveOptions::new())
            .unwrap();
        let rich = store.backend().get("gold:bob").unwrap().unwrap().value;
        // As copied, and (encrypted) with the checksum recomputed for the new key. Without
        // encryption the checksum is no secret, and a recomputed one passes: that is what
        // encryption is for, and `StorageConfig::enable_encryption` says so.
        let mut forgeries = vec![("as is", rich.clone())];
        if encrypted {
            forgeries.push(("with its CRC fixed", fix_crc("gold:alice", rich.clone())));
        }
        for (how, bytes) in forgeries {
            plant(&store, "gold:alice", bytes);
            let s = store.clone();
            hostile_case(
                &format!("record copied between keys {how} (encrypted: {encrypted})"),
                move || s.load::<u64>("gold:alice", &LoadOptions::default()),
                |e| {
                    matches!(
                        e,
                        StorageError::Corrupt { .. } | StorageError::DecryptionFailed { .. }
                    )
                },
            );
        }
    }
}

// ===================================================================== the key check

const PASSPHRASE: &str = "correct horse battery staple";

fn passphrase_config() -> StorageConfig {
    StorageConfig::memory()
        .encryption_key(EncryptionKey::from_passphrase(PASSPHRASE).unwrap())
        .enable_encryption(true)
}

/// The key-check record as JSON, to edit.
fn keycheck(backend: &dyn Backend) -> serde_json::Value {
    serde_json::from_slice(&backend.get(KEYCHECK_KEY).unwrap().unwrap().value).unwrap()
}

fn put_keycheck(backend: &dyn Backend, value: &serde_json::Value) {
    plant_with(
        backend,
        KEYCHECK_KEY,
        serde_json::to_vec(value).unwrap(),
        bevy_storage::clock::Timestamp::now(),
    );
}

#[test]
fn hostile_key_derivation_parameters_fail_fast() {
    let store = Store::open(passphrase_config()).unwrap();
    store.save("gold", &5u64, &SaveOptions::new()).unwrap();
    let backend = store.backend().clone();
    let original = keycheck(backend.as_ref());
    for (field, value) in [
        ("m_cost", serde_json::json!(4u64 * 1024 * 1024)), // 4 GiB
        ("m_cost", serde_json::json!(u32::MAX)),
        ("m_cost", serde_json::json!(0)),
        ("t_cost", serde_json::json!(1_000_000)),
        ("t_cost", serde_json::json!(0)),
        ("p_cost", serde_json::json!(1_000)),
        ("p_cost", serde_json::json!(0)),
        ("salt", serde_json::json!([1, 2, 3])),
        ("salt", serde_json::json!(vec![0; 100_000])),
        ("kdf", serde_json::json!({"nested": [[[[[[[]]]]]]]})),
    ] {
        let mut edited = original.clone();
        if field == "kdf" {
            edited["kdf"] = value.clone();
        } else {
            edited["kdf"][field] = value.clone();
        }
        put_keycheck(backend.as_ref(), &edited);
        let b = backend.clone();
        hostile_case(
            &format!("key check with {field} = {}", short(&value)),
            move || Store::with_backend(b, passphrase_config()),
            |e| matches!(e, StorageError::Corrupt { .. }),
        );
    }
    // Within the bounds but as expensive as they allow (46 MiB × 2): refused as the wrong
    // parameters (they are bound into the check), in well under a second once optimized.
    let mut edited = original.clone();
    edited["kdf"]["m_cost"] = serde_json::json!(46 * 1024);
    put_keycheck(backend.as_ref(), &edited);
    let b = backend.clone();
    hostile_case(
        "key check with edited parameters inside the bounds",
        move || Store::with_backend(b, passphrase_config()),
        |e| matches!(e, StorageError::WrongEncryptionKey),
    );
    // A key-check record of a megabyte is refused before it is parsed.
    plant_with(
        backend.as_ref(),
        KEYCHECK_KEY,
        vec![b' '; 1 << 20],
        bevy_storage::clock::Timestamp::now(),
    );
    let b = backend.clone();
    hostile_case(
        "a 1 MiB key check",
        move || Store::with_backend(b, passphrase_config()),
        |e| matches!(e, StorageError::Corrupt { .. }),
    );
    // Put back, everything opens and reads again: nothing was damaged.
    put_keycheck(backend.as_ref(), &original);
    let again = Store::with_backend(backend, passphrase_config()).unwrap();
    assert_eq!(
        again.load::<u64>("gold", &LoadOptions::default()).unwrap(),
        Some(5)
    );
}

fn short(value: &serde_json::Value) -> String {
    value.to_string().chars().take(24).collect()
}

#[test]
fn a_forged_or_swapped_key_check_is_refused() {
    let store = Store::open(passphrase_config()).unwrap();
    store.save("gold", &5u64, &SaveOptions::new()).unwrap();
    let backend = store.backend().clone();
    let original = keycheck(backend.as_ref());

    // Swapped in from a store the attacker made with a passphrase of their own.
    let theirs =
        Store::open(StorageConfig::memory().encryption_key(
            EncryptionKey::from_passphrase("the attacker's own passphrase").unwrap(),
        ))
        .unwrap();
    put_keycheck(backend.as_ref(), &keycheck(theirs.backend().as_ref()));
    let b = backend.clone();
    hostile_case(
        "key check swapped in from another store",
        move || Store::with_backend(b, passphrase_config()),
        |e| matches!(e, StorageError::WrongEncryptionKey),
    );

    // A raw-key check put in a passphrase store, and the other way round.
    let raw = encrypted_store(None);
    put_keycheck(backend.as_ref(), &keycheck(raw.backend().as_ref()));
    let b = backend.clone();
    hostile_case(
        "a raw-key check in a passphrase store",
        move || Store::with_backend(b, passphrase_config()),
        |e| matches!(e, StorageError::WrongEncryptionKey),
    );

    // The same salt with fewer passes (a cheaper brute force of a stolen file) no longer
    // matches what the key sealed.
    let mut cheaper = original.clone();
    cheaper["kdf"]["t_cost"] = serde_json::json!(1);
    put_keycheck(backend.as_ref(), &cheaper);
    let b = backend.clone();
    hostile_case(
        "key check edited to one pass",
        move || Store::with_backend(b, passphrase_config()),
        |e| matches!(e, StorageError::WrongEncryptionKey),
    );

    put_keycheck(backend.as_ref(), &original);
    assert!(Store::with_backend(backend, passphrase_config()).is_ok());
}

// ===================================================================== snapshots

/// A component saved on the typed path that nests as deeply as the player makes it.
#[derive(Component, Clone, Debug, PartialEq, Serialize, Deserialize, Reflect)]
#[reflect(Component)]
struct SkillTree {
    marker: [u8; 8],
    tree: Tree2,
}

/// [`Tree`] for reflection (a reflected enum holding a `Vec` of itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Reflect)]
#[reflect(no_field_bounds)]
enum Tree2 {
    Leaf,
    Node(Vec<Tree2>),
}

const MARKER: [u8; 8] = *b"SKILLTRE";

fn skill_world(typed: bool) -> (App, SnapshotRegistry) {
    let mut app = App::new();
    let mut registry = SnapshotRegistry::new();
    if typed {
        registry.register_component::<SkillTree>();
    }
    app.register_type::<SkillTree>();
    app.insert_resource(registry.clone());
    app.world_mut().spawn((
        Persist,
        SkillTree {
            marker: MARKER,
            tree: Tree2::Node(vec![Tree2::Leaf]),
        },
    ));
    (app, registry)
}

/// A snapshot whose skill tree was edited to nest `depth` deep.
fn deep_snapshot(encoding: SnapshotEncoding, typed: bool, depth: usize) -> Vec<u8> {
    let (mut app, registry) = skill_world(typed);
    let settings = SnapshotSettings::default().encoding(encoding);
    let bytes = capture(app.world_mut(), &settings, &registry)
        .unwrap()
        .encode()
        .unwrap();
    deepen(bytes, HEADER_LEN, encoding, typed, depth)
}

/// A snapshot record (header of `header_len` bytes) whose skill tree is edited to nest
/// `depth` deep.
fn deepen(
    bytes: Vec<u8>,
    header_len: usize,
    encoding: SnapshotEncoding,
    typed: bool,
    depth: usize,
) -> Vec<u8> {
    match encoding {
        SnapshotEncoding::Ron => {
            // The binary header, then RON text.
            let (head, body) = bytes.split_at(header_len);
            let (head, body) = (head.to_vec(), String::from_utf8(body.to_vec()).unwrap());
            let shallow_pos = body
                .find("Node([Leaf])")
                .or_else(|| body.find("Node([\n"))
                .unwrap_or_else(|| panic!("no tree in {body}"));
            let end = shallow_pos + body[shallow_pos..].find(']').unwrap() + 2;
            let deep = format!("{}Leaf{}", "Node([".repeat(depth), "])".repeat(depth));
            let mut out = head;
            out.extend_from_slice(&body.as_bytes()[..shallow_pos]);
            out.extend_from_slice(deep.as_bytes());
            out.extend_from_slice(&body.as_bytes()[end..]);
            out
        }
        SnapshotEncoding::Binary => {
            // After the marker: Node = 1, a one-element Vec = 1, Leaf = 0.
            let at = bytes.windows(8).position(|w| w == MARKER).expect("marker") + 8;
            assert_eq!(&bytes[at..at + 3], &[1, 1, 0], "typed: {typed}");
            let mut out = bytes[..at].to_vec();
            for _ in 0..depth {
                out.extend_from_slice(&[1, 1]);
            }
            out.push(0);
            out.extend_from_slice(&bytes[at + 3..]);
            out
        }
    }
}

/// A chain of the skill world: its base and a delta in which the tree changed.
fn skill_chain(encoding: SnapshotEncoding, typed: bool) -> (Vec<u8>, Vec<u8>) {
    let (mut app, registry) = skill_world(typed);
    let settings = SnapshotSettings::default().encoding(encoding);
    let (captured, start) = capture_base(app.world_mut(), &settings, &registry).unwrap();
    let base = captured.encode().unwrap();
    let cursor = start.cursor(&base);
    let world = app.world_mut();
    for mut tree in world.query::<&mut SkillTree>().iter_mut(world) {
        tree.set_changed();
    }
    let delta = capture_delta(app.world_mut(), &settings, &registry, &cursor)
        .unwrap()
        .encode()
        .unwrap();
    (base, delta)
}

#[test]
fn deep_and_malformed_deltas_are_refused() {
    for typed in [true, false] {
        for encoding in [SnapshotEncoding::Binary, SnapshotEncoding::Ron] {
            let (base, delta) = skill_chain(encoding, typed);
            let deep = deepen(delta, DELTA_HEADER_LEN, encoding, typed, 50_000);
            let (mut target, _) = skill_world(typed);
            let context = SnapshotContext::from_world(target.world_mut());
            hostile_case(
                &format!("{encoding:?} delta nested 100,000 deep (typed path: {typed})"),
                move || decode_chain(&[base, deep], &context).map(|_| ()),
                too_deep,
            );
        }
    }

    let (base, delta) = skill_chain(SnapshotEncoding::Ron, true);
    let (mut target, _) = skill_world(true);
    let context = SnapshotContext::from_world(target.world_mut());
    let snapshot_error = |e: &StorageError| matches!(e, StorageError::Snapshot(_));
    let with_body = |entities: u32, body: &str| {
        let mut out = delta[..DELTA_HEADER_LEN].to_vec();
        out[12..16].copy_from_slice(&entities.to_le_bytes());
        out.extend_from_slice(body.as_bytes());
        out
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a removal naming a row past the delta's entities",
            with_body(1, r#"([7], [], [("x", [5])], [], [])"#),
        ),
        (
            "a column naming a row past the delta's entities",
            with_body(
                1,
                r#"([7], [], [], [("bevy_ecs::hierarchy::ChildOf", [3], [(7)])], [])"#,
            ),
        ),
        (
            "more entities than the header says",
            with_body(1, "([7, 8], [], [], [], [])"),
        ),
        (
            "a despawned list holding text",
            with_body(0, r#"([], ["x"], [], [], [])"#),
        ),
        ("a body cut short", with_body(1, "([7], [], [")),
        ("a header cut short", delta[..DELTA_HEADER_LEN - 3].to_vec()),
    ];
    for (name, bytes) in cases {
        let (base, context) = (base.clone(), context.clone());
        hostile_case(
            name,
            move || decode_chain(&[base, bytes], &context).map(|_| ()),
            snapshot_error,
        );
    }

    // A delta on a base other than its own.
    let (other_base, _) = skill_chain(SnapshotEncoding::Binary, true);
    let context2 = context.clone();
    hostile_case(
        "a delta on another base",
        move || decode_chain(&[other_base, delta], &context2).map(|_| ()),
        |e| matches!(e, StorageError::Snapshot(m) if m.contains("another base")),
    );

    // A huge declared length in a postcard delta: refused without allocating it.
    let (base, delta) = skill_chain(SnapshotEncoding::Binary, true);
    let mut huge = delta[..DELTA_HEADER_LEN].to_vec();
    huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    hostile_case(
        "a postcard delta declaring 2^63 entities",
        move || decode_chain(&[base, huge], &context).map(|_| ()),
        snapshot_error,
    );
}

#[test]
fn deep_snapshots_are_refused() {
    for typed in [true, false] {
        for encoding in [SnapshotEncoding::Binary, SnapshotEncoding::Ron] {
            let bytes = deep_snapshot(encoding, typed, 50_000);
            let (mut target, _) = skill_world(typed);
            let context = SnapshotContext::from_world(target.world_mut());
            hostile_case(
                &format!("{encoding:?} snapshot nested 100,000 deep (typed path: {typed})"),
                move || decode(&bytes, &context).map(|_| ()),
                too_deep,
            );
        }
    }
}

#[test]
fn a_world_nested_too_deep_to_load_is_refused_when_saved() {
    let (mut app, registry) = skill_world(true);
    app.world_mut().spawn((
        Persist,
        SkillTree {
            marker: MARKER,
            tree: (0..MAX_DEPTH + 20).fold(Tree2::Leaf, |t, _| Tree2::Node(vec![t])),
        },
    ));
    let settings = SnapshotSettings::default().encoding(SnapshotEncoding::Binary);
    let err = capture(app.world_mut(), &settings, &registry)
        .unwrap()
        .encode()
        .unwrap_err();
    assert!(too_deep(&err), "{err}");
}

// ===================================================================== serialize errors

struct Gold(i64);

impl Serialize for Gold {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 < 0 {
            return Err(serde::ser::Error::custom("gold must not be negative"));
        }
        s.serialize_i64(self.0)
    }
}

#[derive(Serialize)]
struct Purse {
    owner: String,
    coins: Vec<Gold>,
}

#[test]
fn serialize_errors_keep_their_cause_and_path() {
    let store = memory_store();
    let purse = Purse {
        owner: "alice".into(),
        coins: vec![Gold(3), Gold(-1)],
    };
    for format in [Format::Binary, Format::Ron] {
        let err = store
            .save("purse", &purse, &SaveOptions::new().format(format))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, StorageError::Serialize { .. })
                && text.contains("gold must not be negative"),
            "{format:?}: {text}"
        );
        if format == Format::Binary {
            assert!(text.contains("coins[1]"), "{text}");
        }
    }
}
