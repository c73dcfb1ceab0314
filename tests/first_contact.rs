//! What a new user meets first in the store's API (issue 16): the `get`/`set` shorthands,
//! `save_encoded` for tools, and a quota that refuses what can never fit before doing the work.

use std::time::{Duration, Instant};

use bevy_storage::Format;
use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
struct Settings {
    volume: f32,
    language: String,
}

#[test]
fn get_and_set_are_load_and_save_with_default_options() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        StorageConfig::sqlite(dir.path().join("game.db"))
            .default_ttl(Some(Duration::from_secs(3600)))
    };
    let store = Store::open(config()).unwrap();
    assert_eq!(store.get::<Settings>("settings").unwrap(), None);
    let settings = Settings {
        volume: 0.5,
        language: "fr".into(),
    };
    store.set("settings", &settings).unwrap();
    // Unsized values borrow too, as `save` does.
    store.set("motd", "welcome").unwrap();
    store.set("scores", &[3u32, 1, 2][..]).unwrap();
    // The store's defaults apply: its TTL, its compression; overwriting is allowed.
    let meta = store.get_metadata("settings").unwrap().unwrap();
    assert!(meta.expires_at.is_some(), "the store's default TTL");
    store.set("settings", &Settings::default()).unwrap();
    drop(store);
    let store = Store::open(config()).unwrap();
    assert_eq!(
        store.get::<Settings>("settings").unwrap(),
        Some(Settings::default())
    );
    assert_eq!(
        store.get::<String>("motd").unwrap().as_deref(),
        Some("welcome")
    );
    assert_eq!(
        store.get::<Vec<u32>>("scores").unwrap(),
        Some(vec![3, 1, 2])
    );
    // Errors stay errors: a wrong type is not `None`.
    assert!(matches!(
        store.get::<u64>("motd"),
        Err(StorageError::Deserialize { .. })
    ));
    assert!(matches!(
        store.set("", &1u8),
        Err(StorageError::InvalidKey { .. })
    ));
}

#[test]
fn save_encoded_stores_a_payload_in_its_format() {
    let store = Store::open(StorageConfig::memory()).unwrap();
    store
        .save_encoded(
            "settings",
            br#"(volume: 0.25, language: "de")"#,
            Format::Ron,
            &SaveOptions::new().metadata("by", "inspector"),
        )
        .unwrap();
    assert_eq!(
        store.get::<Settings>("settings").unwrap(),
        Some(Settings {
            volume: 0.25,
            language: "de".into()
        })
    );
    let meta = store.get_metadata("settings").unwrap().unwrap();
    assert_eq!(meta.custom["by"], "inspector");
    // Postcard bytes load as the type they encode.
    let bytes = postcard::to_stdvec(&(7u32, true)).unwrap();
    store
        .save_encoded("pair", &bytes, Format::Binary, &SaveOptions::new())
        .unwrap();
    assert_eq!(store.get::<(u32, bool)>("pair").unwrap(), Some((7, true)));
    // A payload that is not what its format says fails when it is loaded, as a typed error.
    store
        .save_encoded("bad", b"(unclosed", Format::Ron, &SaveOptions::new())
        .unwrap();
    assert!(matches!(
        store.get::<Settings>("bad"),
        Err(StorageError::Deserialize { .. })
    ));
}

#[test]
fn bytes_that_can_never_fit_are_refused_before_any_work() {
    let quota = 1024 * 1024;
    let store = Store::open(StorageConfig::memory().max_size(Some(quota))).unwrap();
    store.set("small", &1u8).unwrap();
    let huge = vec![7u8; 64 * 1024 * 1024];

    // Uncompressed: a record holds at least its payload.
    let start = Instant::now();
    let refused = store.save_bytes(
        "huge",
        &huge,
        &SaveOptions::new().compression(Compression::Off),
    );
    let took = start.elapsed();
    match refused {
        Err(StorageError::QuotaExceeded {
            needed, max_size, ..
        }) => {
            assert_eq!(max_size, quota);
            assert_eq!(needed, huge.len() as u64);
        }
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    // Checksumming and copying 64 MiB at opt-level 0 takes far longer than this.
    assert!(took < Duration::from_millis(20), "{took:?}");
    if !cfg!(feature = "compression") {
        return;
    }
    // Compressed, LZ4 could shrink 64 MiB of one byte repeated to under 1 MiB: it is tried,
    // and this one fits.
    store
        .save_bytes(
            "zeros",
            &vec![0u8; 64 * 1024 * 1024],
            &SaveOptions::new().compression(Compression::Lz4),
        )
        .unwrap();
    // 300 MiB compressed can never fit 1 MiB (LZ4 never shrinks below 1/256).
    let too_big = vec![0u8; 300 * 1024 * 1024];
    assert!(matches!(
        store.save_bytes(
            "too_big",
            &too_big,
            &SaveOptions::new().compression(Compression::Lz4)
        ),
        Err(StorageError::QuotaExceeded { .. })
    ));
    // Nothing changed.
    assert!(!store.exists("huge").unwrap() && !store.exists("too_big").unwrap());
    assert_eq!(store.get::<u8>("small").unwrap(), Some(1));
}
