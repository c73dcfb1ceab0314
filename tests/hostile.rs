//! Hostile input and hostile conditions: keys built to escape the store, secrets that must
//! not leak, and disks that fail or fill up.
//!
//! - **Keys**: a table of path-traversal spellings, absolute and UNC paths, control
//!   characters, over-long keys, Unicode that normalizes to the same text, Windows device
//!   names and trailing dots and spaces, against the memory, file and SQLite backends. Each
//!   key is refused with `InvalidKey` (exactly the ones the key rules forbid) or stored and
//!   read back byte for byte; the file backend's root never gains anything but its own files,
//!   and nothing appears beside it.
//! - **Secrets**: raw key bytes (also in hex), a passphrase and a Redis password never appear
//!   in `Debug` output, in error messages, or in the log output of the plugin.
//! - **Disk faults**: an error-injecting backend shows that the store returns the typed error
//!   and keeps the previous values (also its quota and read cache stay right); when the tests
//!   run as root, a small tmpfs is filled for real through the file and SQLite backends.
// The secret and fault-injection tests need the `encryption` feature; without it their
// helpers are unused.
#![cfg_attr(not(feature = "encryption"), allow(dead_code, unused_imports))]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bevy_storage::backend::{
    Backend, FileBackend, KeyEntry, PutMode, Record, RecordMeta, Usage, WriteOp, WriteOutcome,
};
use bevy_storage::clock::Timestamp;
use bevy_storage::codec::Cipher;
use bevy_storage::key::MAX_KEY_LEN;
use bevy_storage::{
    Compression, EncryptionKey, LoadOptions, SaveOptions, StorageConfig, StorageError,
    StorageOperation, Store,
};

// =========================================================================== hostile keys

/// Keys an attacker (or an unlucky player name) might produce. Every one is either refused by
/// the key rules or must be stored as an ordinary, separate key.
fn hostile_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        // Path traversal, every spelling.
        "..",
        ".",
        "...",
        "../",
        "..\\",
        "../x",
        "..\\x",
        "../../etc/passwd",
        "..\\..\\windows\\win.ini",
        "a/../../b",
        "a/./b",
        "./x",
        "x/..",
        "....//",
        "..;/x",
        "%2e%2e%2f",
        "%2e%2e/x",
        "..%2fx",
        "..%5cx",
        "%2E%2E%2F",
        "%252e%252e%252f",
        "..%c0%af",
        "..%ef%bc%8f",
        "%00",
        "\u{ff0e}\u{ff0e}\u{ff0f}x", // fullwidth "../"
        "\u{2024}\u{2024}/x",        // one dot leaders
        "..\u{2215}x",               // division slash
        "..\u{29f8}x",               // big solidus
        // Absolute paths, drives, UNC, URLs.
        "/",
        "\\",
        "//",
        "/etc/passwd",
        "/tmp/bevy_storage_escape",
        "C:",
        "C:\\",
        "C:\\Windows\\System32\\x",
        "c:/x",
        "\\\\server\\share\\x",
        "\\\\?\\C:\\x",
        "\\\\.\\COM1",
        "//server/share/x",
        "file:///etc/passwd",
        "~/x",
        "~",
        "$HOME/x",
        "%APPDATA%\\x",
        // Names reserved on Windows, in several cases and with extensions.
        "CON",
        "con",
        "Con",
        "PRN",
        "AUX",
        "NUL",
        "nul",
        "COM1",
        "COM9",
        "com1",
        "LPT1",
        "LPT9",
        "CON.txt",
        "nul.tar.gz",
        "AUX.",
        "COM\u{b9}",
        "LPT\u{b2}",
        "CONIN$",
        "CONOUT$",
        "CLOCK$",
        // Trailing and leading dots and spaces, NTFS streams, wildcards.
        "name.",
        "name..",
        "name ",
        "name. . ",
        " ",
        "  ",
        " name",
        ".hidden",
        "x:stream",
        "x::$DATA",
        "<>:\"|?*",
        "*",
        "?",
        "%",
        "_",
        "[a-z]",
        // Names that look like the file backend's own files.
        ".lock",
        ".journal",
        ".tmp-0123456789abcdef",
        "k-",
        "k-abc",
        "l-abc-0123456789abcdef01234567-0",
        "%41",
        "k-%41",
        // SQL and Redis syntax.
        "'; DROP TABLE records; --",
        "\" OR 1=1 --",
        "{ns}:k",
        "\u{1}bevy_storage/keycheck",
        // Unicode that normalizes (NFC/NFD/NFKC) to the same text: separate keys.
        "\u{e9}",   // é precomposed (NFC)
        "e\u{301}", // é decomposed (NFD)
        "\u{c5}",   // Å
        "\u{212b}", // ANGSTROM SIGN
        "A\u{30a}", // A + ring
        "\u{fb01}", // ﬁ ligature
        "fi",
        "\u{ac00}",         // 가 precomposed
        "\u{1100}\u{1161}", // 가 as jamo
        "\u{130}",          // İ (case folding trouble)
        "i\u{307}",
        "Player",
        "player",
        "PLAYER",
        "\u{200b}", // zero-width space alone
        "a\u{200b}b",
        "\u{feff}bom",
        "\u{202e}txt.exe", // right-to-left override
        "\u{2028}",        // line separator (not a control character)
        "\u{fffd}",
        "\u{1f3ae}:1",
        "\u{10ffff}",
        // Control characters: refused by the key rules.
        "",
        "a\0b",
        "\0",
        "nul\0.txt",
        "\u{1}",
        "\u{1b}[31mred",
        "tab\there",
        "line\nbreak",
        "cr\rreturn",
        "\u{7f}",
        "\u{85}",
        "\u{9f}",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // Lengths around the limit, in bytes of UTF-8.
    keys.push("k".repeat(MAX_KEY_LEN));
    keys.push("k".repeat(MAX_KEY_LEN + 1));
    keys.push(format!("{}{}", "k".repeat(MAX_KEY_LEN - 2), "\u{e9}")); // 512 bytes
    keys.push(format!("{}{}", "k".repeat(MAX_KEY_LEN - 1), "\u{e9}")); // 513 bytes
    keys.push("\u{e9}".repeat(MAX_KEY_LEN / 2)); // 512 bytes, 256 chars
    keys.push("\u{1f3ae}".repeat(MAX_KEY_LEN / 4)); // 512 bytes, 128 chars
    keys.push("\u{1f3ae}".repeat(MAX_KEY_LEN / 4 + 1)); // 516 bytes
    keys.push("../".repeat(MAX_KEY_LEN / 3)); // 510 bytes of traversal
    keys.push(format!("{}x", "/".repeat(MAX_KEY_LEN - 1)));
    keys.push("A".repeat(200)); // uppercase: 3 bytes per character in a file name
    keys.push(format!("{}a", "A".repeat(199)));
    // Overlong UTF-8 ("\xc0\xae" for '.') cannot be put in a `&str`: the API cannot even
    // receive it. Check the premise.
    assert!(String::from_utf8(b"\xc0\xae\xc0\xae/x".to_vec()).is_err());
    assert!(String::from_utf8(b"\xe0\x80\xae".to_vec()).is_err());
    keys
}

/// The key rules, written out independently of `bevy_storage::key`.
fn must_be_refused(key: &str) -> bool {
    key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control)
}

fn check_hostile_keys(store: &Store) {
    let keys = hostile_keys();
    let distinct: BTreeSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "the table has duplicates");
    let mut stored = BTreeSet::new();
    for (i, key) in keys.iter().enumerate() {
        let result = store.save(key, &(i, key.clone()), &SaveOptions::default());
        if must_be_refused(key) {
            assert!(
                matches!(result, Err(StorageError::InvalidKey { .. })),
                "{key:?} must be refused with InvalidKey, got {result:?}"
            );
            // Every entry point refuses it, and the message says why.
            let load = store.load::<(usize, String)>(key, &LoadOptions::default());
            assert!(
                matches!(load, Err(StorageError::InvalidKey { .. })),
                "{key:?}"
            );
            let tx = store.transaction(vec![
                StorageOperation::save("innocent", 1),
                StorageOperation::save(key.clone(), 1),
            ]);
            assert!(
                matches!(tx, Err(StorageError::InvalidKey { .. })),
                "{key:?}"
            );
            assert!(
                !store.exists("innocent").unwrap(),
                "a refused key must fail its whole transaction"
            );
            let message = result.unwrap_err().to_string();
            assert!(message.contains("invalid key"), "{message}");
            assert!(
                message.len() < 400,
                "the message shortens the key: {message}"
            );
        } else {
            result.unwrap_or_else(|e| panic!("{key:?} is a valid key but saving failed: {e}"));
            stored.insert(key.clone());
        }
    }
    // Everything reads back exactly, under its own key only.
    for (i, key) in keys.iter().enumerate() {
        if stored.contains(key) {
            let back: Option<(usize, String)> = store.load(key, &LoadOptions::default()).unwrap();
            assert_eq!(back, Some((i, key.clone())), "{key:?}");
            assert!(store.exists(key).unwrap());
        }
    }
    let listed: BTreeSet<String> = store.list_keys("").unwrap().into_iter().collect();
    assert_eq!(
        listed, stored,
        "list_keys must show exactly the stored keys"
    );
    // Prefixes are literal: no traversal, no wildcard.
    for prefix in [
        "../", "..\\", "%", "_", "*", "C:", "\\\\", "/", "\u{e9}", "e\u{301}",
    ] {
        let expected: BTreeSet<String> = stored
            .iter()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        let got: BTreeSet<String> = store.list_keys(prefix).unwrap().into_iter().collect();
        assert_eq!(got, expected, "prefix {prefix:?}");
    }
    // A transaction over many hostile keys at once (the file backend journals it).
    let batch: Vec<&String> = stored.iter().take(40).collect();
    store
        .transaction(
            batch
                .iter()
                .map(|k| StorageOperation::save((*k).clone(), format!("tx:{k}")))
                .collect(),
        )
        .unwrap();
    for k in &batch {
        let back: Option<String> = store.load(k, &LoadOptions::default()).unwrap();
        assert_eq!(back, Some(format!("tx:{k}")));
    }
    // Deleting them removes exactly them.
    for k in &batch {
        assert!(store.delete(k).unwrap(), "{k:?}");
    }
    let left: BTreeSet<String> = store.list_keys("").unwrap().into_iter().collect();
    assert_eq!(left.len(), stored.len() - batch.len());
    for k in &batch {
        assert!(!left.contains(*k));
    }
}

#[test]
fn hostile_keys_memory() {
    check_hostile_keys(&Store::open(StorageConfig::memory()).unwrap());
}

#[cfg(feature = "sqlite")]
#[test]
fn hostile_keys_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    check_hostile_keys(&Store::open(StorageConfig::sqlite(&path)).unwrap());
    // Reopened, everything is still there under the same keys.
    let store = Store::open(StorageConfig::sqlite(&path)).unwrap();
    assert!(!store.list_keys("").unwrap().is_empty());
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        entries.len() <= 4,
        "only the database, its WAL files and its disk reserve: {entries:?}"
    );
}

/// Every entry under `dir`, recursively, relative to it.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            out.insert(path.strip_prefix(dir).unwrap().to_path_buf());
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

/// Every entry under `dir` except what is inside `dir/parent/root` (the root itself counts).
fn outside(dir: &Path) -> BTreeSet<PathBuf> {
    let root = Path::new("parent/root");
    tree(dir)
        .into_iter()
        .filter(|p| p == root || !p.starts_with(root))
        .collect()
}

/// The root holds only the backend's own files: `.lock` and data files with names made of
/// lowercase letters, digits, `_`, `-` and `%`-escapes (no sub-directory, no dot file, no
/// uppercase), at most 255 bytes long.
fn assert_root_is_clean(root: &Path) {
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().expect("ASCII names");
        assert!(
            entry.file_type().unwrap().is_file(),
            "{name:?} is not a file"
        );
        if name == ".lock" {
            continue;
        }
        assert!(
            name.starts_with("k-") || name.starts_with("l-"),
            "unexpected entry {name:?} in the root"
        );
        assert!(
            name.len() <= 255,
            "{name:?} is too long for common file systems"
        );
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-%".contains(&b)),
            "{name:?} has a character some file system treats specially"
        );
    }
}

#[test]
fn hostile_keys_file_never_leave_the_root() {
    let outer = tempfile::tempdir().unwrap();
    // root's parent holds a decoy the keys would hit if they escaped.
    let parent = outer.path().join("parent");
    let root = parent.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(parent.join("passwd"), b"decoy").unwrap();
    let outside_before = outside(outer.path());
    {
        let store = Store::open(StorageConfig::file(&root)).unwrap();
        check_hostile_keys(&store);
        assert_root_is_clean(&root);
        // Hostile keys must not make the backend write beside the root either.
        assert_eq!(
            outside(outer.path()),
            outside_before,
            "an entry appeared outside the root"
        );
        assert_eq!(std::fs::read(parent.join("passwd")).unwrap(), b"decoy");
        // The decoy is not reachable as a record.
        for key in ["../passwd", "..\\passwd", "%2e%2e%2fpasswd"] {
            assert_eq!(
                store.load::<String>(key, &LoadOptions::default()).unwrap(),
                None,
                "{key:?}"
            );
        }
    }
    // After reopening, the same keys are found again.
    let store = Store::open(StorageConfig::file(&root)).unwrap();
    let keys = store.list_keys("").unwrap();
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(store.exists(key).unwrap(), "{key:?}");
    }
    assert_root_is_clean(&root);
    store.clear().unwrap();
    assert!(store.list_keys("").unwrap().is_empty());
    drop(store);
    assert_root_is_clean(&root);
    assert_eq!(outside(outer.path()), outside_before);
}

/// A journal left by a crash is rolled forward at open: even when it names hostile keys
/// (crafted by copying real record files), every change lands inside the root.
#[test]
fn a_journal_naming_hostile_keys_rolls_forward_inside_the_root() {
    let outer = tempfile::tempdir().unwrap();
    let scratch_root = outer.path().join("scratch");
    let root = outer.path().join("parent").join("root");
    std::fs::create_dir_all(&root).unwrap();
    let keys = [
        "../escape",
        "..\\escape",
        "/abs",
        "\\\\server\\share",
        "CON",
        "name. ",
    ];
    // Real record files for those keys, made by a scratch backend.
    let mut changes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    {
        let scratch = FileBackend::open(&scratch_root).unwrap();
        for key in keys {
            let now = Timestamp::now();
            scratch
                .write(
                    vec![WriteOp::Put {
                        key: key.to_owned(),
                        record: raw_record(key.as_bytes(), now),
                        mode: PutMode::Upsert,
                    }],
                    now,
                )
                .unwrap();
            let path = scratch.path_of(key).unwrap().unwrap();
            changes.push((key.to_owned(), Some(std::fs::read(path).unwrap())));
        }
        changes.push(("../../deleted".to_owned(), None));
    }
    // The journal format of `backend::file` (see the module docs of src/backend/file/journal.rs).
    let payload = postcard::to_stdvec(&changes).unwrap();
    let mut journal = b"BSTJ\x01\0\0\0".to_vec();
    journal.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    journal.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    journal.extend_from_slice(&[0; 4]);
    journal.extend_from_slice(&payload);
    std::fs::write(root.join(".journal"), &journal).unwrap();

    let backend = FileBackend::open(&root).unwrap();
    for key in keys {
        let record = backend.get(key).unwrap().expect("rolled forward");
        assert_eq!(record.value, key.as_bytes());
    }
    assert!(!root.join(".journal").exists());
    assert_root_is_clean(&root);
    let outside: Vec<PathBuf> = outside(outer.path())
        .into_iter()
        .filter(|p| !p.starts_with("scratch"))
        .collect();
    assert_eq!(
        outside,
        [PathBuf::from("parent"), PathBuf::from("parent/root")]
    );
}

fn raw_record(value: &[u8], now: Timestamp) -> Record {
    Record {
        value: value.to_vec(),
        meta: RecordMeta {
            created_at: now,
            modified_at: now,
            accessed_at: now,
            expires_at: None,
            size: value.len() as u64,
            compressed: false,
            encrypted: false,
            custom: Default::default(),
            version: Default::default(),
        },
    }
}

// ================================================================================ secrets

const RAW: [u8; 32] = [
    0x3c, 0x7e, 0x91, 0xd2, 0x05, 0xa8, 0x6f, 0xe3, 0x14, 0xb9, 0x47, 0x2a, 0xcd, 0x58, 0x9e, 0x01,
    0x73, 0xf6, 0x2b, 0x8c, 0x40, 0xd7, 0x19, 0xae, 0x65, 0xc3, 0x0f, 0x92, 0x5d, 0xe8, 0x36, 0xbb,
];
const PASSPHRASE: &str = "Tr0ub4dor&3-purple-SECRET-passphrase";
const SHORT_PASSPHRASE: &str = "Sec7ret";
const REDIS_PASSWORD: &str = "hunter2-REDIS-pw";
/// Passwords with the characters that end a URL's authority, raw and percent-encoded.
const REDIS_PASSWORD_SLASH: &str = "s3/cr3t-REDIS";
const REDIS_PASSWORD_MIXED: &str = "p@ss:w?rd#REDIS";
const REDIS_PASSWORD_ENCODED: &str = "pct%2Fenc%40REDIS";
const REDIS_PASSWORD_DECODED: &str = "pct/enc@REDIS";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every spelling of a secret that could end up in text.
fn secret_spellings() -> Vec<String> {
    let lower = hex(&RAW);
    let decimal = RAW.iter().map(u8::to_string).collect::<Vec<_>>().join(", ");
    vec![
        lower.clone(),
        lower.to_uppercase(),
        // Any 8 consecutive hex digits of the key.
        lower[..8].to_owned(),
        lower[24..32].to_owned(),
        lower[56..].to_owned(),
        // The `Debug` of a byte array.
        decimal[..20].to_owned(),
        PASSPHRASE.to_owned(),
        "purple-SECRET".to_owned(),
        SHORT_PASSPHRASE.to_owned(),
        REDIS_PASSWORD.to_owned(),
        REDIS_PASSWORD_SLASH.to_owned(),
        "cr3t-REDIS".to_owned(),
        REDIS_PASSWORD_MIXED.to_owned(),
        "w?rd#REDIS".to_owned(),
        REDIS_PASSWORD_ENCODED.to_owned(),
        REDIS_PASSWORD_DECODED.to_owned(),
    ]
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in secret_spellings() {
        assert!(!text.contains(&secret), "{what} leaks {secret:?}:\n{text}");
    }
    // The raw bytes themselves (a lossy conversion of the key into text).
    assert!(
        !text
            .as_bytes()
            .windows(6)
            .any(|w| RAW.windows(6).any(|r| r == w)),
        "{what} holds raw key bytes"
    );
}

fn assert_debug_clean<T: std::fmt::Debug>(what: &str, value: &T) {
    assert_no_secret(what, &format!("{value:?}"));
    assert_no_secret(what, &format!("{value:#?}"));
}

fn assert_error_clean(what: &str, e: &StorageError) {
    assert_no_secret(what, &e.to_string());
    assert_no_secret(what, &format!("{e:?}"));
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        assert_no_secret(what, &s.to_string());
        source = s.source();
    }
}

#[cfg(feature = "encryption")]
#[test]
fn no_key_material_in_debug_output() {
    let keys = [
        EncryptionKey::from_bytes(RAW),
        EncryptionKey::from_slice(&RAW).unwrap(),
        EncryptionKey::from_hex(&hex(&RAW)).unwrap(),
        EncryptionKey::from_hex(&hex(&RAW).to_uppercase()).unwrap(),
        EncryptionKey::from_passphrase(PASSPHRASE).unwrap(),
    ];
    for key in &keys {
        assert_debug_clean("EncryptionKey", key);
        assert_debug_clean("a cloned EncryptionKey", &key.clone());
        let config = StorageConfig::memory()
            .encryption_key(key.clone())
            .enable_encryption(true);
        assert_debug_clean("StorageConfig", &config);
        assert_debug_clean("BackendConfig", &config.backend);
        assert_debug_clean(
            "StoragePluginBuilder",
            &bevy_storage::StoragePlugin::config(config.clone()),
        );
        let store = Store::open(config).unwrap();
        assert_debug_clean("Store", &store);
        assert_debug_clean("StorageStats", &store.get_stats());
        if !key.is_passphrase() {
            assert_debug_clean("Cipher", &Cipher::new(key, None).unwrap());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        StorageConfig::file(dir.path().join("r"))
            .encryption_key(EncryptionKey::from_passphrase(PASSPHRASE).unwrap()),
    )
    .unwrap();
    store
        .save("secret", &"value", &SaveOptions::new().encrypt(true))
        .unwrap();
    assert_debug_clean("a file Store", &store);
    assert_debug_clean("metadata", &store.get_metadata("secret").unwrap());
    // Nor on disk in the clear.
    for entry in std::fs::read_dir(dir.path().join("r")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert_no_secret("a record file", &String::from_utf8_lossy(&bytes));
    }
}

#[cfg(feature = "redis")]
fn redis_urls() -> Vec<String> {
    // Port 1 on loopback: nothing listens, so opening fails fast with a connection error.
    vec![
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"),
        format!("redis://player:{REDIS_PASSWORD}@127.0.0.1:1"),
        format!("rediss://:{REDIS_PASSWORD}@127.0.0.1:1/2"),
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:1/0?namespace=game"),
        format!("redis://:{REDIS_PASSWORD_SLASH}@127.0.0.1:1/0"),
        format!("redis://player:{REDIS_PASSWORD_SLASH}@127.0.0.1:1"),
        format!("redis://player:{REDIS_PASSWORD_MIXED}@127.0.0.1:1/0"),
        format!("redis://:{REDIS_PASSWORD_ENCODED}@127.0.0.1:1/0"),
        format!("redis://player:{REDIS_PASSWORD_ENCODED}@127.0.0.1:1/0?namespace=game"),
    ]
}

/// Errors from every path that handles a secret: bad keys, wrong keys, missing keys,
/// tampered records, unreachable servers with a password in their URL.
#[cfg(feature = "encryption")]
#[test]
fn no_key_material_in_error_messages() {
    let mut errors: Vec<(String, StorageError)> = Vec::new();
    let mut push = |what: &str, e: StorageError| errors.push((what.to_owned(), e));
    let hex_key = hex(&RAW);
    push(
        "hex too short",
        EncryptionKey::from_hex(&hex_key[..63]).unwrap_err(),
    );
    push(
        "hex too long",
        EncryptionKey::from_hex(&format!("{hex_key}0")).unwrap_err(),
    );
    push(
        "hex with a bad digit",
        EncryptionKey::from_hex(&format!("{}g", &hex_key[..63])).unwrap_err(),
    );
    push(
        "hex with non-ASCII",
        EncryptionKey::from_hex(&format!("{}é", &hex_key[..62])).unwrap_err(),
    );
    push(
        "slice too short",
        EncryptionKey::from_slice(&RAW[..31]).unwrap_err(),
    );
    push(
        "passphrase too short",
        EncryptionKey::from_passphrase(SHORT_PASSPHRASE).unwrap_err(),
    );
    push(
        "passphrase without salt",
        Cipher::new(&EncryptionKey::from_passphrase(PASSPHRASE).unwrap(), None).unwrap_err(),
    );
    push(
        "encryption on without a key",
        Store::open(StorageConfig::memory().enable_encryption(true)).unwrap_err(),
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let config = || StorageConfig::file(&path);
    {
        let store = Store::open(config().encryption_key(EncryptionKey::from_bytes(RAW))).unwrap();
        store
            .save("gold", &"a lot", &SaveOptions::new().encrypt(true))
            .unwrap();
        // A tampered record.
        let mut record = store.backend().get("gold").unwrap().unwrap();
        let n = record.value.len();
        record.value[n / 2] ^= 1;
        store
            .backend()
            .write(
                vec![WriteOp::Put {
                    key: "tampered".into(),
                    record,
                    mode: PutMode::Upsert,
                }],
                Timestamp::now(),
            )
            .unwrap();
        push(
            "tampered record",
            store
                .load::<String>("tampered", &LoadOptions::default())
                .unwrap_err(),
        );
    }
    let mut wrong = RAW;
    wrong[0] ^= 0xff;
    push(
        "wrong raw key",
        Store::open(config().encryption_key(EncryptionKey::from_bytes(wrong))).unwrap_err(),
    );
    push(
        "passphrase for a raw-key store",
        Store::open(config().encryption_key(EncryptionKey::from_passphrase(PASSPHRASE).unwrap()))
            .unwrap_err(),
    );
    {
        let store = Store::open(config()).unwrap();
        push(
            "no key for an encrypted record",
            store
                .load::<String>("gold", &LoadOptions::default())
                .unwrap_err(),
        );
        push(
            "encrypting without a key",
            store
                .save("x", &1, &SaveOptions::new().encrypt(true))
                .unwrap_err(),
        );
    }
    // A passphrase store opened with another passphrase, and with the raw key.
    let pass_path = dir.path().join("p.db");
    drop(
        Store::open(
            StorageConfig::file(&pass_path)
                .encryption_key(EncryptionKey::from_passphrase(PASSPHRASE).unwrap()),
        )
        .unwrap(),
    );
    push(
        "wrong passphrase",
        Store::open(
            StorageConfig::file(&pass_path)
                .encryption_key(EncryptionKey::from_passphrase("another long passphrase").unwrap()),
        )
        .unwrap_err(),
    );
    push(
        "raw key for a passphrase store",
        Store::open(StorageConfig::file(&pass_path).encryption_key(EncryptionKey::from_bytes(RAW)))
            .unwrap_err(),
    );
    #[cfg(feature = "redis")]
    for url in redis_urls() {
        let config = match StorageConfig::from_url(&url) {
            Ok(config) => config,
            Err(e) => {
                push(&format!("unparsable Redis URL {url}"), e);
                continue;
            }
        };
        assert_debug_clean("a Redis StorageConfig", &config);
        assert_debug_clean(
            "a Redis StoragePluginBuilder",
            &bevy_storage::StoragePlugin::config(config.clone()),
        );
        let started = Instant::now();
        match Store::open(config) {
            Ok(_) => panic!("nothing listens on port 1"),
            Err(e) => push(&format!("unreachable Redis {url}"), e),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    assert!(errors.len() >= 15);
    for (what, e) in &errors {
        assert_error_clean(what, e);
        assert!(!e.to_string().is_empty());
    }
}

// ------------------------------------------------------------------------- log capture

/// Everything logged through `tracing` by any thread of this test binary.
static LOG: Mutex<String> = Mutex::new(String::new());

/// Installs the capturing subscriber (once) and returns the log.
fn captured_log() -> &'static Mutex<String> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        use bevy::log::tracing_subscriber::layer::SubscriberExt;
        let subscriber = bevy::log::tracing_subscriber::registry().with(Capture);
        bevy::log::tracing::subscriber::set_global_default(subscriber)
            .expect("no other subscriber in this test binary");
    });
    &LOG
}

struct Capture;

struct Fields<'a>(&'a mut String);

impl bevy::log::tracing::field::Visit for Fields<'_> {
    fn record_debug(
        &mut self,
        field: &bevy::log::tracing::field::Field,
        value: &dyn std::fmt::Debug,
    ) {
        use std::fmt::Write;
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
    fn record_str(&mut self, field: &bevy::log::tracing::field::Field, value: &str) {
        self.0.push_str(&format!(" {}={value}", field.name()));
    }
}

impl<S: bevy::log::tracing::Subscriber> bevy::log::tracing_subscriber::Layer<S> for Capture {
    fn on_event(
        &self,
        event: &bevy::log::tracing::Event<'_>,
        _ctx: bevy::log::tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut line = format!(
            "{} {}:",
            event.metadata().level(),
            event.metadata().target()
        );
        event.record(&mut Fields(&mut line));
        line.push('\n');
        LOG.lock().unwrap().push_str(&line);
    }

    fn on_new_span(
        &self,
        attrs: &bevy::log::tracing::span::Attributes<'_>,
        _id: &bevy::log::tracing::span::Id,
        _ctx: bevy::log::tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut line = format!("span {}:", attrs.metadata().name());
        attrs.record(&mut Fields(&mut line));
        line.push('\n');
        LOG.lock().unwrap().push_str(&line);
    }
}

/// The plugin logs why a store cannot be opened; with a wrong key or passphrase, and with a
/// password in a Redis URL, that log line must say what is wrong without the secret.
#[cfg(feature = "encryption")]
#[test]
fn no_key_material_in_log_output() {
    use bevy::prelude::*;
    use bevy_storage::plugin::StorageState;
    use bevy_storage::{Storage, StorageActivity, StoragePlugin};

    let log = captured_log();
    bevy::log::error!("capture self-test {}", "ok");
    assert!(log.lock().unwrap().contains("capture self-test ok"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records");
    // A store created with the passphrase...
    drop(
        Store::open(
            StorageConfig::file(&path)
                .encryption_key(EncryptionKey::from_passphrase(PASSPHRASE).unwrap()),
        )
        .unwrap(),
    );
    // ...opened by the plugin with the raw key, the hex key and a wrong passphrase.
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    let mut configs = vec![
        StorageConfig::file(&path).encryption_key(EncryptionKey::from_bytes(RAW)),
        StorageConfig::file(&path).encryption_key(EncryptionKey::from_hex(&hex(&RAW)).unwrap()),
        StorageConfig::file(&path)
            .encryption_key(EncryptionKey::from_passphrase(format!("{PASSPHRASE}!")).unwrap()),
    ];
    #[cfg(feature = "redis")]
    configs.extend(
        redis_urls()
            .iter()
            .filter_map(|url| StorageConfig::from_url(url).ok()),
    );
    let failures_before = log.lock().unwrap().matches("could not open").count();
    let count = configs.len();
    for config in configs {
        let mut app = App::new();
        app.add_plugins((MinimalPlugins, StoragePlugin::config(config)));
        let start = Instant::now();
        loop {
            app.update();
            let failed = matches!(
                app.world().resource::<StorageActivity>().state,
                StorageState::Failed(_)
            );
            if failed {
                let storage = app.world().resource::<Storage>();
                assert_error_clean("the plugin's open error", storage.error().unwrap());
                assert_debug_clean("the Storage resource", storage);
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the plugin never reported the failed open"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        app.update();
    }
    let text = log.lock().unwrap().clone();
    let failures = text.matches("could not open").count() - failures_before;
    assert!(
        failures >= count,
        "expected {count} logged open failures, found {failures} in:\n{text}"
    );
    assert_no_secret("the log output", &text);
}

// ============================================================================ disk faults

/// How the faulty backend fails.
#[derive(Default)]
struct Faults {
    /// Fail the write (or transaction) whose number, counted from 1 since `arm`, is this.
    fail_nth: AtomicU64,
    /// Writes seen since `arm`.
    writes: AtomicU64,
    /// Fail every change from now on (write, touch, clear, purge).
    fail_all: std::sync::atomic::AtomicBool,
    /// How many operations were refused.
    refused: AtomicUsize,
    /// Break the contract of `Backend::write`: apply the batch but answer one outcome short.
    short_answers: std::sync::atomic::AtomicBool,
}

impl Faults {
    fn arm_nth(&self, n: u64) {
        self.writes.store(0, Ordering::SeqCst);
        self.fail_nth.store(n, Ordering::SeqCst);
    }
    fn fail_all(&self, on: bool) {
        self.fail_all.store(on, Ordering::SeqCst);
    }
    fn error(&self, doing: &str) -> StorageError {
        self.refused.fetch_add(1, Ordering::SeqCst);
        StorageError::io(
            format!("{doing} (injected)"),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        )
    }
    fn check_change(&self, doing: &str) -> bevy_storage::Result<()> {
        if self.fail_all.load(Ordering::SeqCst) {
            return Err(self.error(doing));
        }
        Ok(())
    }
}

/// A backend that fails on command, over a real one.
struct Faulty {
    inner: Arc<dyn Backend>,
    faults: Arc<Faults>,
}

impl Backend for Faulty {
    fn backend_type(&self) -> &str {
        "faulty"
    }
    fn get(&self, key: &str) -> bevy_storage::Result<Option<Record>> {
        self.inner.get(key)
    }
    fn get_meta(&self, key: &str) -> bevy_storage::Result<Option<RecordMeta>> {
        self.inner.get_meta(key)
    }
    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> bevy_storage::Result<Vec<WriteOutcome>> {
        self.faults.check_change("writing")?;
        let n = self.faults.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.faults.fail_nth.load(Ordering::SeqCst) {
            return Err(self.faults.error("writing"));
        }
        let mut outcomes = self.inner.write(ops, now)?;
        if self.faults.short_answers.load(Ordering::SeqCst) {
            outcomes.pop();
        }
        Ok(outcomes)
    }
    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> bevy_storage::Result<bool> {
        self.faults.check_change("taking")?;
        self.inner.delete_if_unchanged(key, value, expires_at)
    }
    fn touch(&self, key: &str, at: Timestamp) -> bevy_storage::Result<()> {
        self.faults.check_change("touching")?;
        self.inner.touch(key, at)
    }
    fn scan(&self, prefix: &str) -> bevy_storage::Result<Vec<KeyEntry>> {
        self.inner.scan(prefix)
    }
    fn purge_expired(&self, now: Timestamp) -> bevy_storage::Result<usize> {
        self.faults.check_change("purging")?;
        self.inner.purge_expired(now)
    }
    fn clear(&self) -> bevy_storage::Result<()> {
        self.faults.check_change("clearing")?;
        self.inner.clear()
    }
    fn usage(&self, now: Timestamp) -> bevy_storage::Result<Usage> {
        self.inner.usage(now)
    }
}

fn value(tag: &str, n: usize) -> String {
    format!("{tag}:{}", "v".repeat(n))
}

fn load_s(store: &Store, key: &str) -> Option<String> {
    store.load(key, &LoadOptions::default()).unwrap()
}

fn injected_faults_keep_previous_values(inner: Arc<dyn Backend>) {
    let faults = Arc::new(Faults::default());
    let faulty = Faulty {
        inner: Arc::clone(&inner),
        faults: Arc::clone(&faults),
    };
    let store = Store::open(
        StorageConfig::custom(faulty)
            .max_size(Some(64 * 1024))
            .read_cache(Some(Duration::from_secs(3600)))
            .encryption_key(EncryptionKey::from_bytes([3; 32]))
            .compression(Compression::Lz4),
    )
    .unwrap();
    // A second view straight over the inner backend, without the faulty layer or a cache.
    let direct = Store::with_backend(
        Arc::clone(&inner),
        StorageConfig::memory().encryption_key(EncryptionKey::from_bytes([3; 32])),
    )
    .unwrap();
    let opts = SaveOptions::new().encrypt(true);
    for k in ["a", "b", "c"] {
        store.save(k, &value(k, 100), &opts).unwrap();
        // The first load marks the key, the second fills the cache.
        assert_eq!(load_s(&store, k), Some(value(k, 100)));
        assert_eq!(load_s(&store, k), Some(value(k, 100)));
    }
    let is_injected = |r: &bevy_storage::Result<_>| {
        matches!(r, Err(StorageError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOSPC))
            || matches!(r, Err(StorageError::StorageFull { message, .. }) if message.contains("os error 28"))
    };
    let unchanged = |when: &str| {
        for k in ["a", "b", "c"] {
            assert_eq!(
                load_s(&store, k),
                Some(value(k, 100)),
                "{k} via the store {when}"
            );
            assert_eq!(
                load_s(&direct, k),
                Some(value(k, 100)),
                "{k} on the backend {when}"
            );
        }
    };

    // Every kind of change, failing.
    faults.fail_all(true);
    assert!(is_injected(
        &store.save("a", &value("new", 50), &opts).map(drop)
    ));
    assert!(is_injected(&store.save_bytes("b", b"raw", &opts).map(drop)));
    assert!(is_injected(&store.delete("c").map(drop)));
    assert!(is_injected(&store.transaction(vec![
        StorageOperation::save_with("a", value("tx", 1), opts.clone()),
        StorageOperation::delete("b"),
        StorageOperation::save("d", 1),
    ])));
    assert!(is_injected(&store.clear()));
    assert!(is_injected(&store.purge_expired().map(drop)));
    // A load that cannot record its access time: the value, or the typed error.
    match store.load::<String>("a", &LoadOptions::new().update_access_time(true)) {
        Ok(v) => assert_eq!(v, Some(value("a", 100))),
        Err(e) => assert!(is_injected(&Err(e))),
    }
    // The failure shows in the stats: reads (those of `get_stats` itself included) still
    // work, but the store is unhealthy until a write succeeds again.
    let stats = store.get_stats();
    assert!(!stats.is_healthy, "writes are failing: {stats:?}");
    assert!(
        stats
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("injected"),
        "{stats:?}"
    );
    assert!(stats.performance.errors >= 7, "{stats:?}");
    unchanged("after failed writes");
    assert!(!store.exists("d").unwrap());
    assert!(
        !store.get_stats().is_healthy,
        "successful reads do not hide failing writes"
    );

    // Many failed writes do not leak quota reservations: a write that fits still succeeds.
    for i in 0..100 {
        let r = store
            .save(
                &format!("big{i}"),
                &value("x", 4000),
                &SaveOptions::new().compression(Compression::Off),
            )
            .map(drop);
        assert!(is_injected(&r), "{r:?}");
    }
    faults.fail_all(false);
    store
        .save(
            "fits",
            &value("x", 30_000),
            &SaveOptions::new().compression(Compression::Off),
        )
        .expect("the quota must not count failed writes");
    assert!(
        store.get_stats().is_healthy,
        "health comes back with success"
    );
    store.delete("fits").unwrap();

    // The Nth write of a sequence fails, and only that one.
    for nth in 1..=4u64 {
        faults.arm_nth(nth);
        let mut results = Vec::new();
        for i in 1..=4u64 {
            let key = format!("seq{i}");
            let r = if i % 2 == 0 {
                store.transaction(vec![
                    StorageOperation::save_with(key.clone(), value("t", i as usize), opts.clone()),
                    StorageOperation::save_with(
                        format!("{key}:pair"),
                        value("t", i as usize),
                        opts.clone(),
                    ),
                ])
            } else {
                store.save(&key, &value("t", i as usize), &opts).map(drop)
            };
            results.push(r);
        }
        for (i, r) in results.iter().enumerate() {
            let i = i as u64 + 1;
            let key = format!("seq{i}");
            if i == nth {
                assert!(is_injected(r), "write {i} of 4 should fail: {r:?}");
                assert_eq!(load_s(&store, &key), None);
                assert_eq!(load_s(&store, &format!("{key}:pair")), None);
            } else {
                assert!(r.is_ok(), "write {i} of 4 should succeed: {r:?}");
                assert_eq!(load_s(&direct, &key), Some(value("t", i as usize)));
            }
        }
        faults.arm_nth(0);
        for i in 1..=4 {
            let _ = store.delete(&format!("seq{i}"));
            let _ = store.delete(&format!("seq{i}:pair"));
        }
    }
    unchanged("at the end");
    assert!(faults.refused.load(Ordering::SeqCst) >= 100);
}

/// A custom backend that answers a batch with fewer outcomes than operations gets a typed
/// error naming the broken contract, never a panic or a request left unanswered.
#[test]
fn a_backend_answering_too_few_outcomes_is_an_error() {
    let faults = Arc::new(Faults::default());
    let store = Store::open(StorageConfig::custom(Faulty {
        inner: Arc::new(bevy_storage::backend::MemoryBackend::new()),
        faults: Arc::clone(&faults),
    }))
    .unwrap();
    store.save("kept", &1u32, &SaveOptions::default()).unwrap();
    faults.short_answers.store(true, Ordering::SeqCst);
    let err = store
        .transaction(vec![
            StorageOperation::save("a", 2u32),
            StorageOperation::delete("kept"),
        ])
        .unwrap_err();
    match &err {
        StorageError::Backend { backend, message } => {
            assert_eq!(backend, "faulty");
            assert!(
                message.contains("2 operation(s) with 1 outcome(s)"),
                "{message}"
            );
        }
        other => panic!("expected Backend, got {other:?}"),
    }
    assert!(store.save("b", &3u32, &SaveOptions::default()).is_err());
    assert!(!store.get_stats().is_healthy);
    faults.short_answers.store(false, Ordering::SeqCst);
    store.save("b", &3u32, &SaveOptions::default()).unwrap();
    assert!(store.get_stats().is_healthy);
}

#[cfg(feature = "encryption")]
#[test]
fn injected_faults_memory() {
    injected_faults_keep_previous_values(Arc::new(bevy_storage::backend::MemoryBackend::new()));
}

#[cfg(feature = "encryption")]
#[test]
fn injected_faults_file() {
    let dir = tempfile::tempdir().unwrap();
    injected_faults_keep_previous_values(Arc::new(FileBackend::open(dir.path()).unwrap()));
}

#[cfg(all(feature = "sqlite", feature = "encryption"))]
#[test]
fn injected_faults_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let backend = bevy_storage::backend::SqliteBackend::open(
        dir.path().join("s.db"),
        &bevy_storage::backend::sqlite::SqliteOptions::default(),
    )
    .unwrap();
    injected_faults_keep_previous_values(Arc::new(backend));
}

// ------------------------------------------------------------------------ a real full disk

/// A tmpfs of a few hundred KiB mounted for one test, unmounted on drop. `None` (with a
/// message) when not running as root or when mounting is not possible here.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(test: &str, size: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED {test}: a real full disk needs root to mount a tmpfs");
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED {test}: could not mount a tmpfs ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: could not run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Incompressible text (hex of a hash chain), so compression cannot shrink it.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.truncate(len);
    s
}

fn is_disk_full_error(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::Io { .. }
            | StorageError::Backend { .. }
            | StorageError::QuotaExceeded { .. }
            | StorageError::StorageFull { .. }
    )
}

/// Fills the tmpfs through `config()` until a write fails; checks that the failure is typed,
/// that failed overwrites and transactions keep the old values, and that every acknowledged
/// record is intact after reopening. Returns the reopened store.
fn fill_the_disk(config: &dyn Fn() -> StorageConfig) -> Store {
    let store = Store::open(config()).unwrap();
    let opts = SaveOptions::new().compression(Compression::Off);
    let mut acked: Vec<(String, String)> = Vec::new();
    for i in 0..4 {
        let (k, v) = (format!("keep:{i}"), noise(i, 2000));
        store.save(&k, &v, &opts).unwrap();
        acked.push((k, v));
    }
    let mut failure = None;
    for i in 0..2000u64 {
        let (k, v) = (format!("fill:{i}"), noise(1000 + i, 8 * 1024));
        match store.save(&k, &v, &opts) {
            Ok(_) => acked.push((k, v)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("a 256 KiB disk must fill up");
    eprintln!(
        "the disk filled up after {} records: {failure}",
        acked.len()
    );
    assert!(
        is_disk_full_error(&failure),
        "untyped error on a full disk: {failure:?}"
    );
    assert!(
        !failure.to_string().is_empty(),
        "the message says what went wrong"
    );
    // Overwrites and transactions on the full disk: refused with the old values kept, or done.
    let big = noise(7, 64 * 1024);
    match store.save("keep:0", &big, &opts) {
        Ok(_) => acked[0].1 = big.clone(),
        Err(e) => assert!(is_disk_full_error(&e), "{e:?}"),
    }
    let tx = store.transaction(vec![
        StorageOperation::save_with("keep:1", big.clone(), opts.clone()),
        StorageOperation::save_with("keep:2", big.clone(), opts.clone()),
        StorageOperation::delete("keep:3"),
    ]);
    match tx {
        Ok(()) => {
            acked[1].1 = big.clone();
            acked[2].1 = big.clone();
            acked.remove(3);
        }
        Err(e) => assert!(is_disk_full_error(&e), "{e:?}"),
    }
    for (k, v) in &acked {
        assert_eq!(load_s(&store, k).as_ref(), Some(v), "{k} before reopening");
    }
    drop(store);
    let store = Store::open(config()).expect("a full disk must not stop the store from opening");
    for (k, v) in &acked {
        assert_eq!(load_s(&store, k).as_ref(), Some(v), "{k} after reopening");
    }
    store
}

#[test]
fn full_disk_file_backend() {
    let Some(fs) = Tmpfs::mount("full_disk_file_backend", "256k") else {
        return;
    };
    let root = fs.path().join("root");
    let config = || StorageConfig::file(&root).max_size(None);
    let store = fill_the_disk(&config);
    // No temp file or journal is left behind by the failed writes.
    for entry in std::fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == ".lock" || name.starts_with("k-") || name.starts_with("l-"),
            "{name:?} left on the full disk"
        );
    }
    // Freeing space makes writes work again.
    for key in store.list_keys("fill:").unwrap() {
        store.delete(&key).unwrap();
    }
    store
        .save("after", &noise(9, 8 * 1024), &SaveOptions::new())
        .unwrap();
    drop(store);
}

#[cfg(feature = "sqlite")]
#[test]
fn full_disk_sqlite_backend() {
    let Some(fs) = Tmpfs::mount("full_disk_sqlite_backend", "256k") else {
        return;
    };
    let path = fs.path().join("store.db");
    let config = || StorageConfig::sqlite(&path).max_size(None);
    let store = fill_the_disk(&config);
    // SQLite needs room in its WAL even to delete; whatever it answers must be typed.
    for key in store.list_keys("fill:").unwrap() {
        if let Err(e) = store.delete(&key) {
            assert!(is_disk_full_error(&e), "{e:?}");
        }
    }
    drop(store);
}

// ============================================================================== snapshots

/// A persisted child whose parent is not persisted is saved with a `ChildOf` that points
/// outside the snapshot (as is a `ChildOf` in an edited or damaged snapshot). Loading it used
/// to panic inside Bevy's hierarchy hook (a command on `Entity::PLACEHOLDER`); the entity now
/// loads without a parent, and the app keeps running.
#[test]
fn a_snapshot_child_of_an_unsaved_parent_loads_as_a_root() {
    use bevy::prelude::*;
    use bevy_storage::snapshot::{
        Persist, SnapshotContext, SnapshotEncoding, SnapshotRegistry, SnapshotSettings, capture,
        decode,
    };
    for encoding in [SnapshotEncoding::Ron, SnapshotEncoding::Binary] {
        let mut source = App::new();
        source.insert_resource(SnapshotRegistry::new());
        let world = source.world_mut();
        let parent = world.spawn(Name::new("unsaved parent")).id();
        world.spawn((Persist, Name::new("kid"), ChildOf(parent)));
        let saved_parent = world.spawn((Persist, Name::new("saved parent"))).id();
        world.spawn((Persist, Name::new("sibling"), ChildOf(saved_parent)));
        let settings = SnapshotSettings::default().encoding(encoding);
        let bytes = capture(world, &settings, &SnapshotRegistry::new())
            .unwrap()
            .encode()
            .unwrap();

        let mut target = App::new();
        target.insert_resource(SnapshotRegistry::new());
        let context = SnapshotContext::from_world(target.world_mut());
        decode(&bytes, &context)
            .unwrap()
            .apply(target.world_mut(), true);
        target.update();
        let world = target.world_mut();
        let mut q = world.query::<(&Name, Option<&ChildOf>)>();
        let found: Vec<(String, bool)> = q
            .iter(world)
            .map(|(n, c)| (n.to_string(), c.is_some()))
            .collect();
        assert!(found.contains(&("kid".into(), false)), "{found:?}");
        assert!(found.contains(&("sibling".into(), true)), "{found:?}");
    }
}
