//! `Store::take`: load and delete in one atomic step, on every backend.

use std::thread;
use std::time::Duration;

use super::{Player, load, player, save};
use crate::codec::Compression;
use crate::error::StorageError;
use crate::store::{LoadOptions, SaveOptions, Store};
#[cfg(feature = "encryption")]
use crate::testing::test_key;
use crate::testing::{Fixture, TestBackend};

/// A take returns the value and removes it; the quota and the read cache follow.
pub fn take_returns_the_value_and_removes_it(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::with(factory, |c| {
        c.max_size(Some(4096))
            .compression(Compression::Off)
            .read_cache(Some(Duration::from_secs(60)))
    });
    save(&f.store, "hero", &player("Ada"));
    save(&f.store, "other", &1u8);
    // A cached read must not outlive the take.
    assert_eq!(load::<Player>(&f.store, "hero"), Some(player("Ada")));
    let taken: Option<Player> = f.store.take("hero", &LoadOptions::default()).unwrap();
    assert_eq!(taken, Some(player("Ada")));
    assert_eq!(load::<Player>(&f.store, "hero"), None);
    assert!(!f.store.exists("hero").unwrap());
    assert!(f.store.get_metadata("hero").unwrap().is_none());
    assert!(f.store.backend().get("hero").unwrap().is_none());
    assert_eq!(
        f.store
            .take::<Player>("hero", &LoadOptions::default())
            .unwrap(),
        None
    );
    assert_eq!(f.store.list_keys("").unwrap(), ["other"]);
    assert_eq!(f.store.get_stats().item_count, 1);
    // The quota's count follows: a take frees room as a delete does, again and again.
    for round in 0..5 {
        save(&f.store, "big", &"x".repeat(3000));
        let err = f
            .store
            .save("big2", &"y".repeat(3000), &SaveOptions::default())
            .unwrap_err();
        assert!(matches!(err, StorageError::QuotaExceeded { .. }), "{err}");
        let (payload, info) = f
            .store
            .take_bytes("big", &LoadOptions::default())
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: big is there"));
        let back: String = crate::codec::format::deserialize("big", &payload, info.format).unwrap();
        assert_eq!(back.len(), 3000);
    }
    save(&f.store, "big2", &"y".repeat(3000));
}

/// Nothing to take is `Ok(None)`; an expired record is removed, never returned.
pub fn take_of_a_missing_or_expired_key_is_none(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    assert_eq!(
        f.store
            .take::<u32>("nothing", &LoadOptions::default())
            .unwrap(),
        None
    );
    assert!(
        f.store
            .take_bytes("nothing", &LoadOptions::default())
            .unwrap()
            .is_none()
    );
    f.store
        .save(
            "session",
            &"token",
            &SaveOptions::new().ttl(Duration::from_secs(10)),
        )
        .unwrap();
    f.advance(Duration::from_secs(10));
    assert_eq!(
        f.store
            .take::<String>("session", &LoadOptions::default())
            .unwrap(),
        None
    );
    // The expired record was removed by the take, not left for the cleanup.
    assert!(f.store.backend().get("session").unwrap().is_none());
    assert_eq!(f.store.purge_expired().unwrap(), 0);
    let err = f
        .store
        .take::<u32>("", &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidKey { .. }), "{err}");
}

/// A take that cannot decode the record fails and keeps it.
pub fn take_of_the_wrong_type_fails_and_keeps_the_record(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    save(&f.store, "name", &"Ada".to_string());
    let err = f
        .store
        .take::<Player>("name", &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, StorageError::Deserialize { .. }), "{err}");
    assert_eq!(load::<String>(&f.store, "name").as_deref(), Some("Ada"));
    assert_eq!(
        f.store
            .take::<String>("name", &LoadOptions::default())
            .unwrap()
            .as_deref(),
        Some("Ada")
    );
}

/// A take that cannot decrypt the record fails as a load would and keeps it.
#[cfg(feature = "encryption")]
pub fn take_that_cannot_decrypt_keeps_the_record(factory: &dyn Fn() -> TestBackend) {
    let mut f = Fixture::with(factory, |c| c.encryption_key(test_key()));
    f.store
        .save("secret", &"gold", &SaveOptions::new().encrypt(true))
        .unwrap();
    // A record copied under another key fails its check: refused, and left in place.
    f.copy_record("secret", "copied");
    let err = f
        .store
        .take::<String>("copied", &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Corrupt { .. } | StorageError::DecryptionFailed { .. }
        ),
        "{err}"
    );
    assert!(f.store.backend().get("copied").unwrap().is_some());
    if !f.persistent() {
        return;
    }
    // Without the key: the error a load gives, and the record stays for the right key.
    f.reopen(|c| c).unwrap();
    let err = f
        .store
        .take::<String>("secret", &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, StorageError::EncryptionKeyMissing { .. }),
        "{err}"
    );
    f.reopen(|c| c.encryption_key(test_key())).unwrap();
    assert_eq!(
        f.store
            .take::<String>("secret", &LoadOptions::default())
            .unwrap()
            .as_deref(),
        Some("gold")
    );
}

/// Eight threads over two stores take one key at once: exactly one gets the value.
pub fn take_race_has_exactly_one_winner(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    // A second store over the same file, database or namespace, where the backend is shared.
    let second = if f.persistent() {
        Store::open(f.config()).unwrap()
    } else {
        f.store.clone()
    };
    let threads = 8;
    for round in 0..50u32 {
        save(&f.store, "loot", &round);
        let start = std::sync::Barrier::new(threads);
        let winners: Vec<u32> = thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let store = if t % 2 == 0 { &f.store } else { &second };
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        store.take::<u32>("loot", &LoadOptions::default()).unwrap()
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(
            winners,
            [round],
            "round {round}: exactly one take gets the value"
        );
        assert!(!f.store.exists("loot").unwrap());
        assert!(!second.exists("loot").unwrap());
    }
    assert_eq!(f.store.get_stats().item_count, 0);
}
