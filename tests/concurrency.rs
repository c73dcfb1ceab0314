//! Several threads and several separately opened `Store` handles on one database, running
//! mixed saves, deletes and transactions at once. A checker verifies every key's final state
//! against the history the writers had acknowledged, and readers check throughout that no
//! transaction is ever half visible.
//!
//! - SQLite: three `Store::open` of the same file, so three writer connections compete for
//!   the database lock and readers read through other connections than the writers.
//! - File: three `Store::open` of the same root, one by a path through a symbolic link. In
//!   one process these share one backend (the file backend's lock is per process; see
//!   `backend::file`), but each `Store` has its own quota and statistics.
//! - Memory: three `Store`s over one `MemoryBackend`.
//!
//! What the writers do, on keys of their own and on shared groups:
//! - own keys `w<t>:k<j>`: saves, deletes and small transactions, each thread the only writer
//!   of its keys, so the final state of each is exactly the last acknowledged operation;
//! - shared groups `g<g>:{a,b,c,check}`: a transaction writes the same id to all four keys.
//!   Writers of a group take turns on a mutex (only to number the transactions in commit
//!   order: the transactions themselves run through different handles and connections), so
//!   ids grow with commits. A reader that reads one key of a group and then another must see
//!   an id at least as new in the second: anything else is half a transaction.
//! - failing group transactions (`overwrite(false)` on the existing check key): must fail with
//!   `AlreadyExists`, and their id must never be seen by anyone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use bevy_storage::backend::{Backend, MemoryBackend};
use bevy_storage::{
    Compression, LoadOptions, SaveOptions, StorageConfig, StorageError, StorageOperation, Store,
};

const GROUPS: usize = 3;
const GROUP_KEYS: [&str; 4] = ["a", "b", "c", "check"];
const OWN_KEYS: u64 = 6;
const WRITERS: usize = 4;
const READERS: usize = 2;
/// Ids of failing transactions start here: far above any committed id.
const FAILED_BASE: u64 = 1 << 40;

fn group_key(g: usize, k: &str) -> String {
    format!("g{g}:{k}")
}

fn own_key(t: usize, j: u64) -> String {
    format!("w{t}:k{j}")
}

/// xorshift64*: a small deterministic generator per thread.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The value of an own key: writer, operation, and some padding.
type Own = (usize, u64, String);

fn own_value(t: usize, i: u64) -> Own {
    (t, i, "p".repeat((i % 7 * 40) as usize))
}

/// Shared state of one run.
struct Shared {
    /// The last committed id of each group, behind the group's turn-taking mutex.
    groups: Vec<Mutex<u64>>,
    /// Ids of transactions that had to fail.
    failed: Mutex<BTreeSet<u64>>,
    failed_next: AtomicU64,
    writers_done: AtomicBool,
}

fn opts(i: u64) -> SaveOptions {
    // Compression on some writes, off on others (where the build has it).
    SaveOptions::new().compression(Compression::from(
        cfg!(feature = "compression") && i.is_multiple_of(3),
    ))
}

/// One writer: returns the acknowledged final state of its own keys.
fn writer(t: usize, store: &Store, shared: &Shared, ops: u64) -> BTreeMap<String, Option<Own>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x1000_0001));
    let mut mine: BTreeMap<String, Option<Own>> = BTreeMap::new();
    for i in 0..ops {
        match rng.below(20) {
            0..=7 => {
                let key = own_key(t, rng.below(OWN_KEYS));
                let v = own_value(t, i);
                store.save(&key, &v, &opts(i)).unwrap();
                // Read your own write, through the same handle.
                let back: Option<Own> = store.load(&key, &LoadOptions::default()).unwrap();
                assert_eq!(back.as_ref(), Some(&v), "{key} right after its save");
                mine.insert(key, Some(v));
            }
            8..=10 => {
                let key = own_key(t, rng.below(OWN_KEYS));
                let was = store.delete(&key).unwrap();
                let expected = mine.get(&key).is_some_and(Option::is_some);
                assert_eq!(was, expected, "delete of {key} reports whether it existed");
                mine.insert(key, None);
            }
            11..=13 => {
                let a = own_key(t, rng.below(OWN_KEYS));
                let b = own_key(t, rng.below(OWN_KEYS));
                let c = own_key(t, rng.below(OWN_KEYS));
                let v = own_value(t, i);
                store
                    .transaction(vec![
                        StorageOperation::save_with(a.clone(), v.clone(), opts(i)),
                        StorageOperation::delete(b.clone()),
                        StorageOperation::save_with(c.clone(), v.clone(), opts(i)),
                    ])
                    .unwrap();
                // In order: a later operation on the same key wins.
                mine.insert(a, Some(v.clone()));
                mine.insert(b, None);
                mine.insert(c, Some(v));
            }
            14..=17 => {
                let g = rng.below(GROUPS as u64) as usize;
                let mut last = shared.groups[g].lock().unwrap();
                let id = *last + 1;
                let ops = GROUP_KEYS
                    .iter()
                    .map(|k| StorageOperation::save_with(group_key(g, k), id, opts(i)))
                    .collect();
                store.transaction(ops).unwrap();
                *last = id;
            }
            _ => {
                let g = rng.below(GROUPS as u64) as usize;
                let _turn = shared.groups[g].lock().unwrap();
                let id = shared.failed_next.fetch_add(1, Ordering::SeqCst);
                shared.failed.lock().unwrap().insert(id);
                let mut ops: Vec<StorageOperation> = ["a", "b", "c"]
                    .iter()
                    .map(|k| StorageOperation::save(group_key(g, k), id))
                    .collect();
                ops.push(StorageOperation::save_with(
                    group_key(g, "check"),
                    id,
                    SaveOptions::new().overwrite(false),
                ));
                let result = store.transaction(ops);
                assert!(
                    matches!(result, Err(StorageError::AlreadyExists { .. })),
                    "a transaction with overwrite(false) on an existing key must fail: {result:?}"
                );
            }
        }
    }
    mine
}

/// One reader: reads the keys of a group one by one in a varying order until the writers are
/// done; returns how many group reads it checked.
fn reader(r: usize, store: &Store, shared: &Shared) -> u64 {
    let mut rng = Rng(0x5151_7777 + r as u64);
    let mut checks = 0;
    while !shared.writers_done.load(Ordering::SeqCst) || checks < 20 {
        let g = rng.below(GROUPS as u64) as usize;
        let mut order = GROUP_KEYS.to_vec();
        let rot = rng.below(4) as usize;
        order.rotate_left(rot);
        if rng.below(2) == 0 {
            order.reverse();
        }
        let mut newest_seen = 0u64;
        let mut seen = Vec::new();
        for k in order {
            let key = group_key(g, k);
            let id: u64 = store
                .load(&key, &LoadOptions::default())
                .unwrap()
                .unwrap_or_else(|| panic!("{key} vanished"));
            seen.push((key, id));
            assert!(
                id < FAILED_BASE,
                "saw id {id} of a transaction that failed: {seen:?}"
            );
            assert!(
                id >= newest_seen,
                "half a transaction: read {seen:?} in this order (ids only grow)"
            );
            newest_seen = id;
        }
        checks += 1;
    }
    checks
}

/// Runs writers and readers over `handles`, then checks the final state through every handle
/// and through one opened afterwards by `reopen`.
fn run(handles: &[Store], ops_per_writer: u64, reopen: impl Fn() -> Store) {
    let setup = &handles[0];
    for g in 0..GROUPS {
        setup
            .transaction(
                GROUP_KEYS
                    .iter()
                    .map(|k| StorageOperation::save(group_key(g, k), 0u64))
                    .collect(),
            )
            .unwrap();
    }
    let shared = Shared {
        groups: (0..GROUPS).map(|_| Mutex::new(0)).collect(),
        failed: Mutex::new(BTreeSet::new()),
        failed_next: AtomicU64::new(FAILED_BASE),
        writers_done: AtomicBool::new(false),
    };
    let n = handles.len();
    let (histories, reads) = thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                // Readers use other handles than the writers next to them.
                let store = &handles[(r + 1) % n];
                let shared = &shared;
                s.spawn(move || reader(r, store, shared))
            })
            .collect();
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let store = &handles[t % n];
                let shared = &shared;
                s.spawn(move || writer(t, store, shared, ops_per_writer))
            })
            .collect();
        let histories: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        shared.writers_done.store(true, Ordering::SeqCst);
        let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        (histories, reads)
    });
    assert!(reads >= (READERS * 20) as u64);
    let committed: Vec<u64> = shared.groups.iter().map(|m| *m.lock().unwrap()).collect();
    assert!(
        committed.iter().sum::<u64>() > 0,
        "some group transactions ran"
    );
    assert!(
        !shared.failed.lock().unwrap().is_empty(),
        "some failing transactions ran"
    );

    let check = |store: &Store, via: &str| {
        let mut expected_keys = BTreeSet::new();
        for (t, history) in histories.iter().enumerate() {
            for j in 0..OWN_KEYS {
                let key = own_key(t, j);
                let expected = history.get(&key).cloned().flatten();
                let got: Option<Own> = store.load(&key, &LoadOptions::default()).unwrap();
                assert_eq!(
                    got, expected,
                    "{key} via {via}: not the last acknowledged state"
                );
                if expected.is_some() {
                    expected_keys.insert(key);
                }
            }
        }
        for (g, id) in committed.iter().enumerate() {
            for k in GROUP_KEYS {
                let key = group_key(g, k);
                let got: Option<u64> = store.load(&key, &LoadOptions::default()).unwrap();
                assert_eq!(got, Some(*id), "{key} via {via}: not the last committed id");
                expected_keys.insert(key);
            }
        }
        let listed: BTreeSet<String> = store.list_keys("").unwrap().into_iter().collect();
        assert_eq!(listed, expected_keys, "list_keys via {via}");
        assert_eq!(store.get_stats().item_count, expected_keys.len() as u64);
    };
    for (i, h) in handles.iter().enumerate() {
        check(h, &format!("handle {i}"));
    }
    check(&reopen(), "a handle opened afterwards");
}

#[test]
fn memory_handles_over_one_backend() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let open = || Store::with_backend(Arc::clone(&backend), StorageConfig::memory()).unwrap();
    let handles: Vec<Store> = (0..3).map(|_| open()).collect();
    run(&handles, 150, open);
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_handles_on_one_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let open = || Store::open(StorageConfig::sqlite(&path).max_size(None).pool_size(2)).unwrap();
    let handles: Vec<Store> = (0..3).map(|_| open()).collect();
    run(&handles, 120, || {
        // A fresh connection after the others are done with it.
        open()
    });
    drop(handles);
    // And once more with every earlier handle closed.
    let store = open();
    assert!(store.exists("g0:check").unwrap());
}

#[test]
fn file_handles_on_one_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    // The same root by three spellings: plain, with `.` components, through a symlink.
    let dotted = dir.path().join(".").join("root").join(".");
    let link = dir.path().join("link");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&root, &link).unwrap();
    #[cfg(not(unix))]
    let link = root.clone();
    let spellings: [&Path; 3] = [&root, &dotted, &link];
    let handles: Vec<Store> = spellings
        .iter()
        .map(|p| Store::open(StorageConfig::file(p).max_size(None)).unwrap())
        .collect();
    run(&handles, 40, || {
        Store::open(StorageConfig::file(&root).max_size(None)).unwrap()
    });
    drop(handles);
    // Every handle closed: the directory opens again (the lock was released) with everything.
    let store = Store::open(StorageConfig::file(&link)).unwrap();
    assert!(store.exists("g0:check").unwrap());
    for entry in std::fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == ".lock" || name.starts_with("k-") || name.starts_with("l-"),
            "{name:?} left in the root"
        );
    }
}
