//! One defaults policy for compression: at every layer that can choose it (a `Store` save's
//! `SaveOptions`, a `SaveRequest` through the plugin, a world snapshot's `SnapshotSettings`),
//! the choice is what lands in the stored record's envelope flags, and a layer that does not
//! choose gets the store's `compression` (itself `Compression::default()` when unset).
//!
//! Every record is read back raw from the SQLite file after the app is gone, through a fresh
//! backend, so what is checked is what is on disk.
#![cfg(feature = "sqlite")]

use std::path::Path;
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy::time::TimeUpdateStrategy;
use bevy_storage::backend::sqlite::SqliteOptions;
use bevy_storage::backend::{Backend, SqliteBackend};
use bevy_storage::plugin::SharedError;
use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[reflect(Component)]
struct Position(i32, i32);

/// Responses of the saves sent through the plugin, by key.
#[derive(Resource, Default)]
struct Seen {
    saves: Vec<(String, Result<(), SharedError>)>,
    worlds: Vec<(String, Result<usize, SharedError>)>,
}

/// The layers that choose compression.
#[derive(Debug, Clone, Copy)]
enum Layer {
    /// `Store::save` with `SaveOptions`.
    StoreSave,
    /// A `SaveRequest` message through the plugin.
    SaveRequest,
    /// A `SaveWorld` snapshot with `SnapshotSettings`.
    Snapshot,
}

const LAYERS: [Layer; 3] = [Layer::StoreSave, Layer::SaveRequest, Layer::Snapshot];
/// `None`: the layer (or the store) does not choose.
const CHOICES: [Option<Compression>; 3] = [None, Some(Compression::Off), Some(Compression::Lz4)];

/// Bit 0 of the envelope's flags byte (offset 5): the body is LZ4-compressed.
const FLAG_COMPRESSED: u8 = 1;

fn key(layer: Layer, choice: Option<Compression>) -> String {
    let choice = choice.map_or("unset", |c| c.as_str());
    format!("{layer:?}:{choice}").to_lowercase()
}

/// A value LZ4 shrinks a lot, so `Lz4` always sets the flag.
fn text() -> String {
    "the quick brown fox jumps over the lazy dog ".repeat(100)
}

fn pump_until(app: &mut App, what: &str, done: impl Fn(&Seen) -> bool) {
    let start = Instant::now();
    while !done(app.world().resource::<Seen>()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        app.update();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Saves one record per layer and choice into the SQLite file at `path`, with the store's
/// default `store_default` (`None`: the config's own default), and returns each save's
/// outcome by key.
fn save_every_layer(
    path: &Path,
    store_default: Option<Compression>,
) -> Vec<(String, Result<(), String>)> {
    let mut plugin = StoragePlugin::sqlite(path);
    if let Some(compression) = store_default {
        plugin = plugin.compression(compression);
    }
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, plugin, SnapshotPlugin::default()))
        .register_snapshot_component::<Position>()
        .insert_resource(TimeUpdateStrategy::ManualDuration(Duration::from_millis(
            16,
        )))
        .init_resource::<Seen>()
        .add_observer(|ev: On<SaveCompleted>, mut seen: ResMut<Seen>| {
            let ev = ev.event();
            seen.saves
                .push((ev.key.clone(), ev.result.clone().map(drop)));
        })
        .add_observer(|ev: On<WorldSaved>, mut seen: ResMut<Seen>| {
            let ev = ev.event();
            seen.worlds.push((ev.key.clone(), ev.result.clone()));
        });
    for i in 0..200 {
        app.world_mut().spawn((Persist, Position(i % 3, 7)));
    }
    let start = Instant::now();
    while app.world().resource::<Storage>().store().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the store never opened"
        );
        app.update();
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut outcomes = Vec::new();
    for layer in LAYERS {
        for choice in CHOICES {
            let key = key(layer, choice);
            let outcome = match layer {
                Layer::StoreSave => {
                    let store = app.world().resource::<Storage>().store().unwrap().clone();
                    let mut options = SaveOptions::new();
                    options.compression = choice;
                    store
                        .save(&key, &text(), &options)
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
                Layer::SaveRequest => {
                    let mut request = SaveRequest::new(key.clone(), text());
                    if let Some(compression) = choice {
                        request = request.compression(compression);
                    }
                    app.world_mut().write_message(request);
                    pump_until(&mut app, &key, |s| s.saves.iter().any(|(k, _)| *k == key));
                    let seen = app.world().resource::<Seen>();
                    let (_, result) = seen.saves.iter().find(|(k, _)| *k == key).unwrap();
                    result.clone().map_err(|e| e.to_string())
                }
                Layer::Snapshot => {
                    app.insert_resource(SnapshotSettings {
                        compression: choice,
                        ..default()
                    });
                    app.world_mut().write_message(SaveWorld::new(key.clone()));
                    pump_until(&mut app, &key, |s| s.worlds.iter().any(|(k, _)| *k == key));
                    let seen = app.world().resource::<Seen>();
                    let (_, result) = seen.worlds.iter().find(|(k, _)| *k == key).unwrap();
                    result.clone().map(drop).map_err(|e| e.to_string())
                }
            };
            outcomes.push((key, outcome));
        }
    }
    outcomes
}

#[test]
fn each_layer_stores_its_choice_or_the_stores_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = 0;
    for (i, store_default) in CHOICES.into_iter().enumerate() {
        let path = dir.path().join(format!("store{i}.db"));
        let outcomes = save_every_layer(&path, store_default);
        // The app is gone: read what is in the file through a backend of its own.
        let backend = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
        for layer in LAYERS {
            for choice in CHOICES {
                let key = key(layer, choice);
                let expected = choice.or(store_default).unwrap_or(Compression::default());
                let what = format!("store default {store_default:?}, {key}: expected {expected}");
                let outcome = &outcomes.iter().find(|(k, _)| *k == key).unwrap().1;
                let record = backend.get(&key).unwrap();
                rows += 1;
                if expected == Compression::Lz4 && !cfg!(feature = "compression") {
                    // A build without LZ4 refuses instead of storing something else.
                    let err = outcome.as_ref().expect_err(&what);
                    assert!(err.contains("compression"), "{what}: {err}");
                    assert!(record.is_none(), "{what}: nothing stored");
                    continue;
                }
                assert!(outcome.is_ok(), "{what}: {outcome:?}");
                let record = record.unwrap_or_else(|| panic!("{what}: not stored"));
                let flags = record.value[5];
                assert_eq!(
                    flags & FLAG_COMPRESSED != 0,
                    expected == Compression::Lz4,
                    "{what}: envelope flags {flags:#04b}"
                );
                assert_eq!(
                    record.meta.compressed,
                    expected == Compression::Lz4,
                    "{what}: the metadata column agrees"
                );
            }
        }
    }
    assert_eq!(rows, 27);
}

/// Without any choice anywhere the store's default is `Compression::default()`: LZ4 with the
/// `compression` feature, off without it (so the smallest build saves and loads by default).
#[test]
fn the_default_is_lz4_with_the_feature_and_off_without() {
    assert_eq!(
        Compression::default() == Compression::Lz4,
        cfg!(feature = "compression")
    );
    assert_eq!(StorageConfig::memory().compression, Compression::default());
    let store = Store::open(StorageConfig::memory()).unwrap();
    store.set("k", &text()).unwrap();
    assert_eq!(
        store.get_metadata("k").unwrap().unwrap().compressed,
        cfg!(feature = "compression")
    );
    assert_eq!(store.get::<String>("k").unwrap(), Some(text()));
}

/// The deprecated `enable_compression(bool)` still works, as `compression(Compression::from)`.
#[test]
#[allow(deprecated)]
fn the_deprecated_bool_setter_forwards() {
    assert_eq!(
        StorageConfig::memory()
            .enable_compression(false)
            .compression,
        Compression::Off
    );
    assert_eq!(
        StorageConfig::memory().enable_compression(true).compression,
        Compression::Lz4
    );
}

/// `Compression` reads and writes as `"off"` / `"lz4"` (settings files, the CLI).
#[test]
fn compression_parses_and_serializes_by_name() {
    for (c, name) in [(Compression::Off, "off"), (Compression::Lz4, "lz4")] {
        assert_eq!(c.to_string(), name);
        assert_eq!(name.parse::<Compression>().unwrap(), c);
        assert_eq!(name.to_uppercase().parse::<Compression>().unwrap(), c);
        assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{name}\""));
        assert_eq!(
            serde_json::from_str::<Compression>(&format!("\"{name}\"")).unwrap(),
            c
        );
    }
    let err = "9".parse::<Compression>().unwrap_err();
    assert!(matches!(err, StorageError::Config(_)), "{err}");
    assert!(serde_json::from_str::<Compression>("1").is_err());
}
