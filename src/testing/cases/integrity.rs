//! The cases about what is stored and how it holds up: compression and encryption through the
//! store, damaged records, clear, stats, reopening, the read cache and concurrency. (The rest
//! are in the parent module; the helpers are shared.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use super::{Player, load, player, save};
use crate::backend::{PutMode, WriteOp};
use crate::codec::Compression;
#[cfg(feature = "encryption")]
use crate::codec::EncryptionKey;
use crate::error::StorageError;
use crate::store::{LoadOptions, SaveOptions, StorageOperation};
#[cfg(feature = "encryption")]
use crate::testing::test_key;
use crate::testing::{Fixture, TestBackend};

// ---------------------------------------------------------------- codec through the store

/// Compressed records round-trip and are smaller (without the `compression` feature `Lz4` is
/// refused).
pub fn compression_round_trips_and_shrinks(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let text = "the quick brown fox jumps over the lazy dog ".repeat(200);
    f.store
        .save(
            "plain",
            &text,
            &SaveOptions::new().compression(Compression::Off),
        )
        .unwrap();
    let packed = f.store.save(
        "packed",
        &text,
        &SaveOptions::new().compression(Compression::Lz4),
    );
    if !cfg!(feature = "compression") {
        // A build without LZ4 says so instead of storing something else.
        assert!(
            matches!(
                packed,
                Err(StorageError::FeatureDisabled {
                    feature: "compression",
                    ..
                })
            ),
            "{packed:?}"
        );
        return;
    }
    packed.unwrap();
    assert_eq!(
        load::<String>(&f.store, "packed").as_deref(),
        Some(text.as_str())
    );
    let plain = f.store.get_metadata("plain").unwrap().unwrap();
    let packed = f.store.get_metadata("packed").unwrap().unwrap();
    assert!(!plain.compressed);
    if cfg!(feature = "compression") {
        assert!(packed.compressed);
        assert!(
            packed.size * 5 < plain.size,
            "{} vs {}",
            packed.size,
            plain.size
        );
    }
}

#[cfg(feature = "encryption")]
/// Encrypted records round-trip, hold no plaintext and differ each save; a store can encrypt by
/// default.
pub fn encryption_round_trips_and_hides_plaintext(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::with(factory, |c| c.encryption_key(test_key()));
    let secret = "the dragon sleeps under the well";
    f.store
        .save("secret", &secret, &SaveOptions::new().encrypt(true))
        .unwrap();
    f.store.save("open", &secret, &SaveOptions::new()).unwrap();
    assert_eq!(load::<String>(&f.store, "secret").as_deref(), Some(secret));
    let meta = f.store.get_metadata("secret").unwrap().unwrap();
    assert!(meta.encrypted);
    assert!(!f.store.get_metadata("open").unwrap().unwrap().encrypted);
    let raw = f.store.backend().get("secret").unwrap().unwrap().value;
    assert!(
        !raw.windows(6).any(|w| w == b"dragon"),
        "ciphertext must not hold the plaintext"
    );
    // Same plaintext twice: different ciphertexts.
    f.store
        .save("secret2", &secret, &SaveOptions::new().encrypt(true))
        .unwrap();
    let raw2 = f.store.backend().get("secret2").unwrap().unwrap().value;
    assert_ne!(raw[8..raw.len() - 4], raw2[8..raw2.len() - 4]);
    // Encrypt by default when the store says so.
    let g = Fixture::with(factory, |c| {
        c.encryption_key(test_key()).enable_encryption(true)
    });
    save(&g.store, "auto", &1);
    assert!(g.store.get_metadata("auto").unwrap().unwrap().encrypted);
    // Clear keeps the key check: the store reopens with the same key.
    f.store.clear().unwrap();
    f.store
        .save("after", &1, &SaveOptions::new().encrypt(true))
        .unwrap();
    assert_eq!(load::<i32>(&f.store, "after"), Some(1));
}

#[cfg(feature = "encryption")]
/// A record copied under another key, a wrong key and a missing key are typed errors.
pub fn wrong_or_missing_key_is_a_clear_error(factory: &dyn Fn() -> TestBackend) {
    let mut f = Fixture::with(factory, |c| c.encryption_key(test_key()));
    f.store
        .save("secret", &"gold", &SaveOptions::new().encrypt(true))
        .unwrap();
    f.store.save("plain", &"tin", &SaveOptions::new()).unwrap();
    // Copying a record under another key is detected (key bound as associated data + checksum).
    f.copy_record("secret", "copied");
    let err = f
        .store
        .load::<String>("copied", &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Corrupt { .. } | StorageError::DecryptionFailed { .. }
        ),
        "{err}"
    );
    if !f.persistent() {
        return;
    }
    // Wrong key: refused at open, by name.
    let wrong = f.reopen(|c| c.encryption_key(EncryptionKey::from_bytes([7; 32])));
    assert!(
        matches!(wrong, Err(StorageError::WrongEncryptionKey)),
        "{wrong:?}"
    );
    let wrong = f.reopen(|c| {
        c.encryption_key(EncryptionKey::from_passphrase("not the key at all").unwrap())
    });
    assert!(
        matches!(wrong, Err(StorageError::WrongEncryptionKey)),
        "{wrong:?}"
    );
    // No key: plain records load, encrypted ones say what is missing.
    f.reopen(|c| c).unwrap();
    assert_eq!(load::<String>(&f.store, "plain").as_deref(), Some("tin"));
    let err = f
        .store
        .load::<String>("secret", &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, StorageError::EncryptionKeyMissing { .. }),
        "{err}"
    );
    // The right key still works.
    f.reopen(|c| c.encryption_key(test_key())).unwrap();
    assert_eq!(load::<String>(&f.store, "secret").as_deref(), Some("gold"));
}

#[cfg(feature = "encryption")]
/// A passphrase store reopens with the same passphrase; its bookkeeping stays hidden.
pub fn passphrase_keys_survive_reopen(factory: &dyn Fn() -> TestBackend) {
    let pass = || EncryptionKey::from_passphrase("correct horse battery staple").unwrap();
    let mut f = Fixture::with(factory, |c| c.encryption_key(pass()));
    if !f.persistent() {
        return;
    }
    f.store
        .save("s", &42u32, &SaveOptions::new().encrypt(true))
        .unwrap();
    f.reopen(|c| c.encryption_key(pass())).unwrap();
    assert_eq!(load::<u32>(&f.store, "s"), Some(42));
    assert_eq!(
        f.store.list_keys("").unwrap(),
        ["s"],
        "bookkeeping records stay hidden"
    );
    assert_eq!(f.store.get_stats().item_count, 1);
}

/// Truncated or bit-flipped records are typed errors and harm no other record.
pub fn damaged_records_are_typed_errors_and_harm_nothing_else(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    save(&f.store, "good", &player("Good"));
    save(&f.store, "victim", &player("Victim"));
    let original = f.store.backend().get("victim").unwrap().unwrap();
    let now = crate::clock::Timestamp::now();
    let put = |value: Vec<u8>| {
        let mut record = original.clone();
        record.meta.size = value.len() as u64;
        record.value = value;
        f.store
            .backend()
            .write(
                vec![WriteOp::Put {
                    key: "victim".into(),
                    record,
                    mode: PutMode::Upsert,
                }],
                now,
            )
            .unwrap();
    };
    let bytes = original.value.clone();
    let mut damaged: Vec<Vec<u8>> = vec![
        vec![],
        b"not a record at all".to_vec(),
        bytes[..bytes.len() / 2].to_vec(),
        bytes[..bytes.len() - 1].to_vec(),
    ];
    for i in [0, 4, 5, 6, 7, 9, bytes.len() / 2, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        damaged.push(b);
    }
    for value in damaged {
        put(value.clone());
        let err = f
            .store
            .load::<Player>("victim", &LoadOptions::default())
            .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::Corrupt { .. } | StorageError::UnsupportedVersion { .. }
            ),
            "{value:?}: {err}"
        );
        assert_eq!(load::<Player>(&f.store, "good"), Some(player("Good")));
    }
    // Reading as the wrong type is a typed error too.
    put(bytes);
    let err = f
        .store
        .load::<u64>("victim", &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, StorageError::Deserialize { .. }), "{err}");
    let err = f
        .store
        .load_or::<u64>("victim", 5, &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Deserialize { .. }),
        "a default never hides damage"
    );
}

/// `clear` removes every record and the store stays usable.
pub fn clear_removes_everything(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    for i in 0..10 {
        save(&f.store, &format!("k{i}"), &i);
    }
    f.store.clear().unwrap();
    assert!(f.store.list_keys("").unwrap().is_empty());
    assert_eq!(f.store.get_stats().item_count, 0);
    save(&f.store, "k0", &0);
    assert_eq!(f.store.list_keys("").unwrap(), ["k0"]);
}

/// Stats report the item count, sizes, health, counts and timings.
pub fn stats_report_items_size_health_and_timings(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    for i in 0..5 {
        save(&f.store, &format!("k{i}"), &"value");
    }
    let _ = load::<String>(&f.store, "k1");
    let _ = f.store.exists("k2").unwrap();
    let _ = f.store.save("bad\0", &1, &SaveOptions::default());
    let stats = f.store.get_stats();
    assert_eq!(stats.item_count, 5);
    let sizes: u64 = (0..5)
        .map(|i| {
            f.store
                .get_metadata(&format!("k{i}"))
                .unwrap()
                .unwrap()
                .size
        })
        .sum();
    assert_eq!(stats.total_size, sizes);
    assert!(stats.is_healthy);
    assert_eq!(stats.last_error, None, "bad input is not a backend failure");
    assert!(!stats.backend_type.is_empty());
    assert_eq!(stats.performance.writes, 6);
    assert_eq!(stats.performance.errors, 1);
    assert_eq!(stats.performance.reads, 2);
    assert_eq!(
        stats.performance.operation_count,
        stats.performance.reads + stats.performance.writes
    );
    assert!(stats.performance.avg_write_time > Duration::ZERO);
    assert!(stats.available_space.unwrap() <= 100 * 1024 * 1024 - sizes);
}

/// Reopening the store keeps every record and its metadata.
pub fn reopening_keeps_every_record(factory: &dyn Fn() -> TestBackend) {
    let mut f = Fixture::new(factory);
    if !f.persistent() {
        return;
    }
    for i in 0..50 {
        f.store
            .save(
                &format!("k{i:02}"),
                &player(&i.to_string()),
                &SaveOptions::new().metadata("i", i),
            )
            .unwrap();
    }
    f.store.delete("k07").unwrap();
    f.store
        .transaction(vec![
            StorageOperation::save("tx:a", 1),
            StorageOperation::save("tx:b", 2),
        ])
        .unwrap();
    let meta_before = f.store.get_metadata("k10").unwrap();
    f.reopen(|c| c).unwrap();
    assert_eq!(f.store.list_keys("k").unwrap().len(), 49);
    assert_eq!(load::<Player>(&f.store, "k42"), Some(player("42")));
    assert_eq!(f.store.get_metadata("k10").unwrap(), meta_before);
    assert_eq!(load::<i32>(&f.store, "tx:b"), Some(2));
}

/// The read cache serves repeated loads, and every write through the store invalidates it.
/// A key enters the cache on its second load (the first only marks it), and is served from
/// the third.
pub fn read_cache_serves_and_invalidates(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::with(factory, |c| c.read_cache(Some(Duration::from_secs(60))));
    save(&f.store, "k", &1);
    for _ in 0..3 {
        assert_eq!(load::<i32>(&f.store, "k"), Some(1));
    }
    let s = f.store.get_stats().cache;
    assert_eq!((s.hits, s.misses), (1, 2));
    save(&f.store, "k", &2);
    assert_eq!(load::<i32>(&f.store, "k"), Some(2), "a save invalidates");
    f.store
        .transaction(vec![StorageOperation::save("k", 3)])
        .unwrap();
    assert_eq!(
        load::<i32>(&f.store, "k"),
        Some(3),
        "a transaction invalidates"
    );
    f.store.delete("k").unwrap();
    assert_eq!(load::<i32>(&f.store, "k"), None, "a delete invalidates");
    save(&f.store, "k", &4);
    for _ in 0..3 {
        let _ = load::<i32>(&f.store, "k");
    }
    f.store.clear().unwrap();
    assert_eq!(load::<i32>(&f.store, "k"), None, "clear invalidates");
    // Expiry is honoured even for cached entries.
    f.store
        .save("t", &1, &SaveOptions::new().ttl(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(load::<i32>(&f.store, "t"), Some(1));
    }
    f.advance(Duration::from_secs(6));
    assert_eq!(load::<i32>(&f.store, "t"), None);
}

// ---------------------------------------------------------------- concurrency

/// Concurrent writers lose nothing and read their own writes.
pub fn concurrent_writers_lose_nothing(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let threads = 4;
    let per_thread = 40;
    thread::scope(|s| {
        for t in 0..threads {
            let store = f.store.clone();
            s.spawn(move || {
                for i in 0..per_thread {
                    let key = format!("t{t}:k{}", i % 10);
                    store.save(&key, &(t, i), &SaveOptions::default()).unwrap();
                    let back: (usize, usize) =
                        store.load(&key, &LoadOptions::default()).unwrap().unwrap();
                    assert_eq!(back, (t, i), "a thread reads its own write");
                    if i % 7 == 0 {
                        store
                            .transaction(vec![
                                StorageOperation::save(format!("t{t}:tx:a"), i),
                                StorageOperation::save(format!("t{t}:tx:b"), i),
                            ])
                            .unwrap();
                    }
                }
            });
        }
    });
    for t in 0..threads {
        for k in 0..10 {
            let last = (0..per_thread).filter(|i| i % 10 == k).max().unwrap();
            assert_eq!(
                load::<(usize, usize)>(&f.store, &format!("t{t}:k{k}")),
                Some((t, last))
            );
        }
        let a: usize = load(&f.store, &format!("t{t}:tx:a")).unwrap();
        assert_eq!(Some(a), load(&f.store, &format!("t{t}:tx:b")));
    }
}

/// Concurrent readers never see half a transaction.
pub fn readers_never_see_half_a_transaction(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    f.store
        .transaction(vec![
            StorageOperation::save("pair:a", 0u64),
            StorageOperation::save("pair:b", 0u64),
        ])
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    thread::scope(|s| {
        let writer = f.store.clone();
        let writer_done = Arc::clone(&done);
        s.spawn(move || {
            for v in 1..=150u64 {
                writer
                    .transaction(vec![
                        StorageOperation::save("pair:a", v),
                        StorageOperation::save("pair:b", v),
                    ])
                    .unwrap();
            }
            writer_done.store(true, Ordering::SeqCst);
        });
        for reader in 0..2 {
            let store = f.store.clone();
            let done = Arc::clone(&done);
            s.spawn(move || {
                // Versions only grow and both keys change together, so whichever key is read
                // second can never be older than the one read first.
                let (first, second) = if reader == 0 {
                    ("pair:a", "pair:b")
                } else {
                    ("pair:b", "pair:a")
                };
                let mut checks = 0;
                while !done.load(Ordering::SeqCst) || checks < 10 {
                    let x: u64 = store.load(first, &LoadOptions::default()).unwrap().unwrap();
                    let y: u64 = store
                        .load(second, &LoadOptions::default())
                        .unwrap()
                        .unwrap();
                    assert!(
                        y >= x,
                        "saw {first}={x} then {second}={y}: half a transaction"
                    );
                    checks += 1;
                }
            });
        }
    });
    assert_eq!(load::<u64>(&f.store, "pair:a"), Some(150));
}
