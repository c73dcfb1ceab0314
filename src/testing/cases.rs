//! The conformance cases: each takes the factory of the backend under test and panics on a
//! failure. [`backend_conformance_suite!`](crate::backend_conformance_suite) runs them all,
//! one `#[test]` each; a new case is a function here (or in `cases/integrity.rs`, for what is
//! stored and how it holds up) plus one line in that macro's list.

use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Fixture, TestBackend};
use crate::codec::{Compression, Format};
use crate::error::StorageError;
use crate::store::{LoadOptions, SaveOptions, StorageOperation, Store};

mod integrity;
mod listing;
mod take;
mod versions;
pub use integrity::*;
pub use listing::*;
pub use take::*;
pub use versions::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Player {
    name: String,
    level: u32,
    position: (f32, f32),
    inventory: Vec<String>,
    stats: BTreeMap<String, i64>,
    guild: Option<String>,
}

fn player(name: &str) -> Player {
    Player {
        name: name.into(),
        level: 7,
        position: (1.5, -2.25),
        inventory: vec!["sword".into(), "potion".into()],
        stats: [("str".to_string(), 12), ("dex".to_string(), -1)].into(),
        guild: None,
    }
}

fn load<T: serde::de::DeserializeOwned>(store: &Store, key: &str) -> Option<T> {
    store.load(key, &LoadOptions::default()).unwrap()
}

fn save<T: Serialize>(store: &Store, key: &str, value: &T) {
    store.save(key, value, &SaveOptions::default()).unwrap();
}

// ---------------------------------------------------------------- reference cases

/// A saved value loads back equal, in every format.
pub fn save_then_load_returns_equal_data(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let p = player("Ada");
    save(&f.store, "player:ada", &p);
    assert_eq!(load::<Player>(&f.store, "player:ada"), Some(p));
    // Every format round-trips.
    for format in [Format::Ron, Format::Binary] {
        let opts = SaveOptions::new().format(format);
        f.store.save("player:fmt", &player("Fmt"), &opts).unwrap();
        assert_eq!(load::<Player>(&f.store, "player:fmt"), Some(player("Fmt")));
    }
}

/// A missing key loads as `None` or the given default, and exists nowhere.
pub fn missing_key_loads_as_none_and_as_default(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    assert_eq!(load::<Player>(&f.store, "nobody"), None);
    let d = f
        .store
        .load_or("nobody", player("Default"), &LoadOptions::default())
        .unwrap();
    assert_eq!(d.name, "Default");
    let n: u32 = f
        .store
        .load_or_default("nobody", &LoadOptions::default())
        .unwrap();
    assert_eq!(n, 0);
    assert!(!f.store.exists("nobody").unwrap());
    assert!(f.store.get_metadata("nobody").unwrap().is_none());
    assert!(!f.store.delete("nobody").unwrap());
}

/// Listing by prefix finds exactly the keys that start with it.
pub fn list_by_prefix_finds_exactly_the_matching_keys(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    for k in ["user:1", "user:2", "admin:1"] {
        save(&f.store, k, &k);
    }
    assert_eq!(f.store.list_keys("user:").unwrap(), ["user:1", "user:2"]);
    assert_eq!(
        f.store.list_keys("").unwrap(),
        ["admin:1", "user:1", "user:2"]
    );
}

/// A prefix is matched byte for byte: no wildcard (`%`, `_`, `*`, `?`, `[`) is special; the list is
/// sorted.
pub fn prefix_matches_literally(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let keys = [
        "user_1", "userX1", "user%", "usera", "100%done", "100x", "a*b", "axb", "a?c", "abc",
        "[x]", "x", "é:1", "e:1", "名前:1", "a\\b", "ab",
    ];
    for k in keys {
        save(&f.store, k, &1u8);
    }
    let cases: &[(&str, &[&str])] = &[
        ("user_", &["user_1"]),
        ("user%", &["user%"]),
        ("100%", &["100%done"]),
        ("a*", &["a*b"]),
        ("a?", &["a?c"]),
        ("[", &["[x]"]),
        ("é", &["é:1"]),
        ("名", &["名前:1"]),
        ("a\\", &["a\\b"]),
        ("zzz", &[]),
    ];
    for (prefix, expected) in cases {
        assert_eq!(
            &f.store.list_keys(prefix).unwrap(),
            expected,
            "prefix {prefix:?}"
        );
    }
    let all = f.store.list_keys("").unwrap();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted, "list_keys is sorted");
    assert_eq!(all.len(), keys.len());
}

/// Two saves in one transaction both land.
pub fn balance_transfer_in_one_transaction(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    save(&f.store, "balance:alice", &100i64);
    save(&f.store, "balance:bob", &50i64);
    let a: i64 = load(&f.store, "balance:alice").unwrap();
    let b: i64 = load(&f.store, "balance:bob").unwrap();
    f.store
        .transaction(vec![
            StorageOperation::save("balance:alice", a - 30),
            StorageOperation::save("balance:bob", b + 30),
        ])
        .unwrap();
    assert_eq!(load::<i64>(&f.store, "balance:alice"), Some(70));
    assert_eq!(load::<i64>(&f.store, "balance:bob"), Some(80));
}

// ---------------------------------------------------------------- transactions

/// A transaction that fails (a create-only save of a live key, an invalid key) changes nothing;
/// operations apply in order.
pub fn failed_transaction_changes_nothing(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    save(&f.store, "a", &1);
    save(&f.store, "b", &2);
    // A create-only save of an existing key sinks the whole transaction.
    let err = f
        .store
        .transaction(vec![
            StorageOperation::save("a", 10),
            StorageOperation::delete("a"),
            StorageOperation::save("c", 30),
            StorageOperation::save_with("b", 20, SaveOptions::new().overwrite(false)),
        ])
        .unwrap_err();
    assert!(
        matches!(err, StorageError::AlreadyExists { ref key } if key == "b"),
        "{err}"
    );
    assert_eq!(load::<i32>(&f.store, "a"), Some(1));
    assert_eq!(load::<i32>(&f.store, "b"), Some(2));
    assert_eq!(load::<i32>(&f.store, "c"), None);
    // So does an invalid key, before anything is written.
    let err = f
        .store
        .transaction(vec![
            StorageOperation::save("a", 10),
            StorageOperation::delete("bad\0key"),
        ])
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidKey { .. }));
    assert_eq!(load::<i32>(&f.store, "a"), Some(1));
    // Operations apply in order: delete then create-only save of the same key succeeds.
    f.store
        .transaction(vec![
            StorageOperation::delete("a"),
            StorageOperation::save_with("a", 11, SaveOptions::new().overwrite(false)),
        ])
        .unwrap();
    assert_eq!(load::<i32>(&f.store, "a"), Some(11));
    f.store.transaction(vec![]).unwrap();
}

// ---------------------------------------------------------------- TTL

/// An expired record is invisible before cleanup removes it; cleanup counts what it removes.
pub fn ttl_hides_expired_records_before_cleanup(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let opts = SaveOptions::new().ttl(Duration::from_secs(60));
    f.store.save("session:1", &"token", &opts).unwrap();
    save(&f.store, "forever", &"x");
    let meta = f.store.get_metadata("session:1").unwrap().unwrap();
    assert_eq!(
        meta.expires_at
            .unwrap()
            .duration_since(meta.created_at)
            .unwrap(),
        Duration::from_secs(60)
    );
    f.advance(Duration::from_secs(59));
    assert!(f.store.exists("session:1").unwrap());
    f.advance(Duration::from_secs(1));
    assert_eq!(load::<String>(&f.store, "session:1"), None);
    assert!(!f.store.exists("session:1").unwrap());
    assert!(f.store.get_metadata("session:1").unwrap().is_none());
    assert_eq!(f.store.list_keys("").unwrap(), ["forever"]);
    assert_eq!(f.store.get_stats().item_count, 1);
    assert!(
        !f.store.delete("session:1").unwrap(),
        "an expired record is not there to delete"
    );
    f.store.save("session:2", &"t", &opts).unwrap();
    f.advance(Duration::from_secs(61));
    assert_eq!(
        f.store.purge_expired().unwrap(),
        1,
        "session:1 was deleted already"
    );
    assert_eq!(f.store.purge_expired().unwrap(), 0);
    assert_eq!(f.store.list_keys("").unwrap(), ["forever"]);
}

/// The store's default TTL applies to saves that set none; `no_expiry` and an own TTL override it.
pub fn default_ttl_and_no_expiry(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::with(factory, |c| c.default_ttl(Some(Duration::from_secs(10))));
    save(&f.store, "temp", &1);
    f.store
        .save("kept", &2, &SaveOptions::new().no_expiry())
        .unwrap();
    f.store
        .save(
            "long",
            &3,
            &SaveOptions::new().ttl(Duration::from_secs(100)),
        )
        .unwrap();
    f.advance(Duration::from_secs(11));
    assert_eq!(f.store.list_keys("").unwrap(), ["kept", "long"]);
}

// ---------------------------------------------------------------- overwrite

/// `overwrite(false)` refuses a live record and keeps it, and treats an expired one as absent.
pub fn overwrite_false_refuses_live_keys_only(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let no = SaveOptions::new().overwrite(false);
    f.store.save("slot", &1, &no).unwrap();
    let err = f.store.save("slot", &2, &no).unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists { .. }));
    assert!(err.to_string().contains("slot"));
    assert_eq!(load::<i32>(&f.store, "slot"), Some(1));
    // An expired record counts as absent.
    f.store
        .save("lease", &1, &SaveOptions::new().ttl(Duration::from_secs(5)))
        .unwrap();
    f.advance(Duration::from_secs(6));
    f.store.save("lease", &2, &no).unwrap();
    assert_eq!(load::<i32>(&f.store, "lease"), Some(2));
}

/// Of concurrent create-only saves of one key, exactly one wins.
pub fn overwrite_false_has_no_race(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    for round in 0..5 {
        let key = format!("race:{round}");
        let winners: usize = thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = f.store.clone();
                    let key = key.clone();
                    s.spawn(move || {
                        store
                            .save(&key, &i, &SaveOptions::new().overwrite(false))
                            .map(|_| 1)
                            .unwrap_or_else(|e| {
                                assert!(matches!(e, StorageError::AlreadyExists { .. }), "{e}");
                                0
                            })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(winners, 1, "exactly one create-only save wins");
    }
}

// ---------------------------------------------------------------- metadata

/// Created, modified and accessed times follow writes and (opted-in) reads.
pub fn metadata_timestamps_follow_writes_and_reads(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    save(&f.store, "k", &1);
    let m1 = f.store.get_metadata("k").unwrap().unwrap();
    assert_eq!(m1.created_at, m1.modified_at);
    assert_eq!(m1.last_accessed_at, m1.modified_at);
    assert_eq!(m1.key, "k");
    assert!(m1.size > 0);
    f.advance(Duration::from_secs(5));
    save(&f.store, "k", &2);
    let m2 = f.store.get_metadata("k").unwrap().unwrap();
    assert_eq!(
        m2.created_at, m1.created_at,
        "created_at is kept across overwrites"
    );
    assert_eq!(
        m2.modified_at.duration_since(m1.modified_at).unwrap(),
        Duration::from_secs(5)
    );
    f.advance(Duration::from_secs(5));
    let _: Option<i32> = f.store.load("k", &LoadOptions::default()).unwrap();
    let m3 = f.store.get_metadata("k").unwrap().unwrap();
    assert_eq!(
        m3.last_accessed_at, m2.last_accessed_at,
        "a plain load is not a write"
    );
    let _: Option<i32> = f
        .store
        .load("k", &LoadOptions::new().update_access_time(true))
        .unwrap();
    let m4 = f.store.get_metadata("k").unwrap().unwrap();
    assert_eq!(
        m4.last_accessed_at.duration_since(m2.modified_at).unwrap(),
        Duration::from_secs(5)
    );
    assert_eq!(m4.modified_at, m2.modified_at);
    // After deletion the key starts a new life.
    f.store.delete("k").unwrap();
    f.advance(Duration::from_secs(1));
    save(&f.store, "k", &3);
    let m5 = f.store.get_metadata("k").unwrap().unwrap();
    assert!(m5.created_at > m1.created_at);
}

/// The game's metadata fields come back as saved.
pub fn custom_metadata_round_trips(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let opts = SaveOptions::new()
        .metadata("level", "Crypt of Bones")
        .metadata("play_time_s", 4521)
        .metadata("hardcore", true)
        .metadata("party", serde_json::json!(["ada", "bob"]))
        .metadata("ratio", 0.5);
    f.store.save("slot:1", &player("Ada"), &opts).unwrap();
    let meta = f.store.get_metadata("slot:1").unwrap().unwrap();
    assert_eq!(meta.custom, opts.metadata);
    assert_eq!(
        meta.custom_field::<u64>("play_time_s").unwrap().unwrap(),
        4521
    );
    assert_eq!(
        meta.custom_field::<Vec<String>>("party").unwrap().unwrap(),
        ["ada", "bob"]
    );
    assert!(meta.custom_field::<u64>("level").unwrap().is_err());
    assert!(meta.custom_field::<u64>("absent").is_none());
}

// ---------------------------------------------------------------- quota

/// The quota refuses a write (or transaction) that would exceed it, keeping old values; deletes and
/// expiry free room.
pub fn quota_refuses_writes_and_keeps_old_values(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::with(factory, |c| {
        c.max_size(Some(4096)).compression(Compression::Off)
    });
    let chunk = "x".repeat(1000);
    for i in 0..3 {
        save(&f.store, &format!("c{i}"), &chunk);
    }
    let before = f.store.get_stats();
    assert!(
        before.total_size > 3000 && before.total_size < 4096,
        "{before:?}"
    );
    let big = "y".repeat(2000);
    let err = f
        .store
        .save("c3", &big, &SaveOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, StorageError::QuotaExceeded { max_size: 4096, .. }),
        "{err}"
    );
    // A failed overwrite keeps the old value.
    let err = f
        .store
        .save("c0", &"z".repeat(3000), &SaveOptions::default())
        .unwrap_err();
    assert!(matches!(err, StorageError::QuotaExceeded { .. }));
    assert_eq!(load::<String>(&f.store, "c0"), Some(chunk.clone()));
    assert!(!f.store.exists("c3").unwrap());
    // Replacing a record with one of the same size fits even near the limit.
    save(&f.store, "c0", &"w".repeat(1000));
    // A transaction that would overflow changes nothing.
    let err = f
        .store
        .transaction(vec![
            StorageOperation::delete("c1"),
            StorageOperation::save("c4", "q".repeat(1000)),
            StorageOperation::save("c5", "q".repeat(1000)),
            StorageOperation::save("c6", "q".repeat(1000)),
        ])
        .unwrap_err();
    assert!(matches!(err, StorageError::QuotaExceeded { .. }));
    assert!(f.store.exists("c1").unwrap());
    // Deleting frees room.
    f.store.delete("c1").unwrap();
    f.store.delete("c2").unwrap();
    save(&f.store, "c3", &big);
    assert_eq!(f.store.get_stats().max_size, Some(4096));
    // Expired records do not hold the quota.
    f.store.clear().unwrap();
    f.store
        .save(
            "t",
            &"x".repeat(3000),
            &SaveOptions::new().ttl(Duration::from_secs(1)),
        )
        .unwrap();
    f.advance(Duration::from_secs(2));
    save(&f.store, "u", &"x".repeat(3000));
}

// ---------------------------------------------------------------- keys

/// Invalid keys are `InvalidKey` in every operation; odd but valid keys are stored faithfully.
pub fn invalid_keys_are_typed_errors_everywhere(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let long = "k".repeat(513);
    for key in [
        "",
        "nul\0",
        "new\nline",
        "\u{1}bevy_storage/keycheck",
        long.as_str(),
    ] {
        let is_invalid = |r: Result<(), StorageError>| {
            assert!(matches!(r, Err(StorageError::InvalidKey { .. })), "{key:?}")
        };
        is_invalid(f.store.save(key, &1, &SaveOptions::default()).map(drop));
        is_invalid(f.store.load::<i32>(key, &LoadOptions::default()).map(drop));
        is_invalid(f.store.delete(key).map(drop));
        is_invalid(f.store.exists(key).map(drop));
        is_invalid(f.store.get_metadata(key).map(drop));
        is_invalid(f.store.transaction(vec![StorageOperation::save(key, 1)]));
    }
    assert!(matches!(
        f.store.list_keys("a\0"),
        Err(StorageError::InvalidKey { .. })
    ));
    // Odd but valid keys are stored faithfully and listed back exactly.
    let odd = [
        "../../etc/passwd",
        "a/b",
        "C:\\x",
        "..",
        ".",
        "CON",
        "nul",
        "Player",
        "player",
        "e\u{301}",
        "\u{e9}",
        "🎮:1",
        " spaced ",
    ];
    for (i, key) in odd.iter().enumerate() {
        save(&f.store, key, &i);
    }
    for (i, key) in odd.iter().enumerate() {
        assert_eq!(load::<usize>(&f.store, key), Some(i), "{key:?}");
    }
    let max = "é".repeat(256);
    save(&f.store, &max, &"longest");
    assert_eq!(load::<String>(&f.store, &max).as_deref(), Some("longest"));
    assert_eq!(f.store.list_keys("").unwrap().len(), odd.len() + 1);
}
