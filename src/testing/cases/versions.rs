//! Versioned writes (optimistic concurrency): every write gives a record a new version, and a
//! save conditional on a version is checked atomically with the write, on every backend.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use super::{load, save};
use crate::backend::RecordVersion;
use crate::error::StorageError;
use crate::store::{LoadOptions, SaveOptions, StorageOperation, Store};
use crate::testing::{Fixture, TestBackend};

fn versioned<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &str,
) -> Option<(T, RecordVersion)> {
    store
        .load_versioned(key, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("load_versioned {key}: {e}"))
}

fn version_of(store: &Store, key: &str) -> Option<RecordVersion> {
    store
        .get_metadata(key)
        .unwrap_or_else(|e| panic!("get_metadata {key}: {e}"))
        .map(|m| m.version)
}

/// Asserts `result` is the conflict of a save of `key` that expected `expected` and should
/// have found `found`.
fn assert_conflict<T: std::fmt::Debug>(
    result: crate::error::Result<T>,
    key: &str,
    expected: RecordVersion,
    found: Option<RecordVersion>,
) {
    match result {
        Err(StorageError::VersionConflict {
            key: k,
            expected: e,
            found: f,
        }) => {
            assert_eq!(k, key);
            assert_eq!(
                e, expected,
                "the conflict names the version the write required"
            );
            assert_eq!(f, found, "the conflict carries the version found");
        }
        other => panic!("expected a version conflict on {key}, got {other:?}"),
    }
}

/// Every write gives the record a new version (also a write of the same bytes, and a write
/// after a delete); loads, metadata and the save itself report the same version.
pub fn every_write_gives_a_new_version(factory: &dyn Fn() -> TestBackend) {
    let mut f = Fixture::new(factory);
    let mut seen = HashSet::new();
    let v1 = f
        .store
        .save("hero", &10u32, &SaveOptions::default())
        .unwrap();
    assert_eq!(versioned::<u32>(&f.store, "hero"), Some((10, v1)));
    assert_eq!(version_of(&f.store, "hero"), Some(v1));
    assert!(seen.insert(v1));
    // The same value again: still a new version.
    let v2 = f
        .store
        .save("hero", &10u32, &SaveOptions::default())
        .unwrap();
    assert!(
        seen.insert(v2),
        "a rewrite of the same bytes keeps version {v2}"
    );
    assert_eq!(version_of(&f.store, "hero"), Some(v2));
    // Deleted and written again: a version never seen before (no ABA).
    assert!(f.store.delete("hero").unwrap());
    assert_eq!(versioned::<u32>(&f.store, "hero"), None);
    let v3 = f
        .store
        .save("hero", &10u32, &SaveOptions::default())
        .unwrap();
    assert!(seen.insert(v3), "a recreated record reuses version {v3}");
    // In a transaction too, and other keys get versions of their own.
    f.store
        .transaction(vec![
            StorageOperation::save("hero", 11u32),
            StorageOperation::save("sidekick", 1u32),
        ])
        .unwrap();
    for key in ["hero", "sidekick"] {
        let v = version_of(&f.store, key).unwrap();
        assert!(seen.insert(v), "{key} got an old version {v}");
    }
    // Saving raw bytes reports the stored version as well; reading the access time does not
    // change it.
    let raw = f
        .store
        .save_bytes("raw", b"bytes", &SaveOptions::default())
        .unwrap();
    assert_eq!(version_of(&f.store, "raw"), Some(raw));
    f.store
        .load::<u32>("hero", &LoadOptions::new().update_access_time(true))
        .unwrap();
    let hero = version_of(&f.store, "hero");
    assert_eq!(versioned::<u32>(&f.store, "hero").map(|(_, v)| v), hero);
    // Versions are stored, not made up on reading: they survive reopening.
    if f.persistent() {
        f.reopen(|c| c).unwrap();
        assert_eq!(version_of(&f.store, "hero"), hero);
        assert_eq!(version_of(&f.store, "raw"), Some(raw));
    }
}

/// A save conditional on a version writes only over the live record of that version, and
/// otherwise fails with `VersionConflict` carrying what it found, changing nothing.
pub fn conditional_save_checks_the_version(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let v1 = f
        .store
        .save("gold", &100u32, &SaveOptions::new().metadata("by", "a"))
        .unwrap();
    // At the current version: written, and the version moves on.
    let v2 = f
        .store
        .save("gold", &150u32, &SaveOptions::new().if_version(v1))
        .unwrap();
    assert_ne!(v1, v2);
    assert_eq!(versioned::<u32>(&f.store, "gold"), Some((150, v2)));
    // A stale version: refused, with the version found; nothing changed.
    assert_conflict(
        f.store
            .save("gold", &999u32, &SaveOptions::new().if_version(v1)),
        "gold",
        v1,
        Some(v2),
    );
    assert_eq!(versioned::<u32>(&f.store, "gold"), Some((150, v2)));
    // A missing key has no version to match; a deleted one neither.
    assert_conflict(
        f.store
            .save("nothing", &1u32, &SaveOptions::new().if_version(v2)),
        "nothing",
        v2,
        None,
    );
    assert_eq!(load::<u32>(&f.store, "nothing"), None);
    save(&f.store, "gone", &1u32);
    let gone = version_of(&f.store, "gone").unwrap();
    f.store.delete("gone").unwrap();
    assert_conflict(
        f.store
            .save("gone", &2u32, &SaveOptions::new().if_version(gone)),
        "gone",
        gone,
        None,
    );
    assert_eq!(load::<u32>(&f.store, "gone"), None);
    // An expired record counts as absent, before any cleanup ran.
    let lease = f
        .store
        .save(
            "lease",
            &1u32,
            &SaveOptions::new().ttl(Duration::from_secs(5)),
        )
        .unwrap();
    let renewed = f
        .store
        .save(
            "lease",
            &2u32,
            &SaveOptions::new()
                .if_version(lease)
                .ttl(Duration::from_secs(5)),
        )
        .unwrap();
    f.advance(Duration::from_secs(5));
    assert_conflict(
        f.store.save(
            "lease",
            &3u32,
            &SaveOptions::new()
                .if_version(renewed)
                .ttl(Duration::from_secs(5)),
        ),
        "lease",
        renewed,
        None,
    );
    assert_eq!(load::<u32>(&f.store, "lease"), None);
    // A conditional save keeps the record's creation time, like any overwrite, and takes
    // precedence over `overwrite(false)`.
    let created = f.store.get_metadata("gold").unwrap().unwrap().created_at;
    f.advance(Duration::from_secs(2));
    f.store
        .save(
            "gold",
            &151u32,
            &SaveOptions::new().overwrite(false).if_version(v2),
        )
        .unwrap();
    let meta = f.store.get_metadata("gold").unwrap().unwrap();
    assert_eq!(meta.created_at, created);
    assert!(
        meta.custom.is_empty(),
        "the new save's metadata replaced the old"
    );
    assert_ne!(
        meta.version,
        RecordVersion(0),
        "the store never writes version 0"
    );
}

/// In a transaction each save carries its own condition; one conflict refuses the whole
/// transaction.
pub fn transactions_check_each_version_all_or_nothing(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let a = f
        .store
        .save("acct:a", &100i64, &SaveOptions::default())
        .unwrap();
    let b = f
        .store
        .save("acct:b", &0i64, &SaveOptions::default())
        .unwrap();
    // Someone else changes b after we read it.
    let b_now = f
        .store
        .save("acct:b", &5i64, &SaveOptions::default())
        .unwrap();
    let transfer = |a: RecordVersion, b: RecordVersion| {
        f.store.transaction(vec![
            StorageOperation::save_with("acct:a", 70i64, SaveOptions::new().if_version(a)),
            StorageOperation::save_with("acct:b", 30i64, SaveOptions::new().if_version(b)),
            StorageOperation::save("log:1", "moved 30"),
        ])
    };
    assert_conflict(transfer(a, b), "acct:b", b, Some(b_now));
    assert_eq!(versioned::<i64>(&f.store, "acct:a"), Some((100, a)));
    assert_eq!(versioned::<i64>(&f.store, "acct:b"), Some((5, b_now)));
    assert_eq!(load::<String>(&f.store, "log:1"), None);
    // With both versions current it commits.
    transfer(a, b_now).unwrap();
    assert_eq!(load::<i64>(&f.store, "acct:a"), Some(70));
    assert_eq!(load::<i64>(&f.store, "acct:b"), Some(30));
    assert_ne!(version_of(&f.store, "acct:a"), Some(a));
    // A condition after a delete of the same key in the same transaction finds nothing.
    let a_now = version_of(&f.store, "acct:a").unwrap();
    assert_conflict(
        f.store.transaction(vec![
            StorageOperation::delete("acct:a"),
            StorageOperation::save_with("acct:a", 1i64, SaveOptions::new().if_version(a_now)),
        ]),
        "acct:a",
        a_now,
        None,
    );
    assert_eq!(versioned::<i64>(&f.store, "acct:a"), Some((70, a_now)));
}

/// Many threads on two stores over the same backend increment one counter by
/// read-modify-write with `if_version`, retrying on conflict: no increment is lost, and the
/// final count is exactly the number of successful conditional saves.
pub fn read_modify_write_counter_loses_no_update(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    // A second store over the same file, database or namespace, where the backend is shared
    // (a backend whose second instance keeps its own image, as the example's JSON file does,
    // races on one store instead).
    save(&f.store, "counter", &0u64);
    let second = if f.persistent() {
        let other = Store::open(f.config()).unwrap();
        save(&f.store, "probe", &1u8);
        if other.exists("probe").unwrap() {
            other
        } else {
            f.store.clone()
        }
    } else {
        f.store.clone()
    };
    const THREADS: u64 = 8;
    const INCREMENTS: u64 = 25;
    let successes = AtomicU64::new(0);
    let conflicts = AtomicU64::new(0);
    thread::scope(|s| {
        for t in 0..THREADS {
            let store = if t % 2 == 0 { &f.store } else { &second };
            let (successes, conflicts) = (&successes, &conflicts);
            s.spawn(move || {
                for _ in 0..INCREMENTS {
                    loop {
                        let (count, version) = versioned::<u64>(store, "counter").unwrap();
                        match store.save(
                            "counter",
                            &(count + 1),
                            &SaveOptions::new().if_version(version),
                        ) {
                            Ok(_) => {
                                successes.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Err(StorageError::VersionConflict { found, .. }) => {
                                assert_ne!(found, Some(version));
                                conflicts.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => panic!("thread {t}: {e}"),
                        }
                    }
                }
            });
        }
    });
    let successes = successes.into_inner();
    assert_eq!(successes, THREADS * INCREMENTS);
    assert_eq!(load::<u64>(&f.store, "counter"), Some(successes));
    assert_eq!(load::<u64>(&second, "counter"), Some(successes));
    // Eight threads on one key collide; the count above proves none of them lost a write.
    let _ = conflicts.into_inner();
}
