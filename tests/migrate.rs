//! What a game coming from another persistence crate relies on, checked: what happens to an
//! unsaved child of a saved parent (the README's "Coming from another crate" table says it).

use bevy::prelude::*;
use bevy_storage::snapshot::{
    Persist, SnapshotContext, SnapshotRegistry, SnapshotSettings, capture, decode,
};

#[derive(Component, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Component)]
struct Label(String);

fn app() -> App {
    let mut app = App::new();
    app.insert_resource(SnapshotRegistry::new())
        .register_type::<Label>();
    app
}

fn labels(world: &mut World) -> Vec<String> {
    let mut q = world.query::<&Label>();
    let mut all: Vec<String> = q.iter(world).map(|l| l.0.clone()).collect();
    all.sort();
    all
}

/// A saved (`Persist`) parent with a child that is not: the snapshot holds the parent alone.
/// Loading despawns the persisted entities of the moment (`despawn_existing`, the default),
/// and despawning a parent takes its children: the unsaved child is gone afterwards, and the
/// loaded parent has no children. With `despawn_existing(false)` the old pair stays beside
/// the loaded parent.
#[test]
fn a_saved_parent_whose_child_was_not_saved_loads_without_it() {
    let mut app = app();
    let world = app.world_mut();
    let parent = world.spawn((Persist, Label("ship".into()))).id();
    world.spawn((Label("engine glow (not saved)".into()), ChildOf(parent)));
    world.spawn((Persist, Label("crate".into())));
    let settings = SnapshotSettings::default();
    let captured = capture(world, &settings, &SnapshotRegistry::new()).unwrap();
    assert_eq!(
        captured.entity_count(),
        2,
        "the unsaved child is not in the snapshot"
    );
    let bytes = captured.encode().unwrap();

    // Load over the same world.
    let context = SnapshotContext::from_world(world);
    decode(&bytes, &context).unwrap().apply(world, true);
    assert_eq!(
        labels(world),
        ["crate", "ship"],
        "the unsaved child went with its old parent"
    );
    let mut q = world.query_filtered::<(&Label, Option<&Children>), With<Persist>>();
    for (label, children) in q.iter(world) {
        assert!(children.is_none(), "{} came back without children", label.0);
    }

    // Keeping the existing entities keeps the old parent and its child, beside the new ones.
    let mut app = self::app();
    let world = app.world_mut();
    let parent = world.spawn((Persist, Label("ship".into()))).id();
    world.spawn((Label("engine glow (not saved)".into()), ChildOf(parent)));
    let context = SnapshotContext::from_world(world);
    decode(&bytes, &context).unwrap().apply(world, false);
    assert_eq!(
        labels(world),
        ["crate", "engine glow (not saved)", "ship", "ship"]
    );
}

/// A component that cannot be serialized (it holds a runtime handle) and is not reflected,
/// saved as a stand-in and rebuilt on load: moonshine-save's `map_component`.
mod mapped_component {
    use std::sync::{Arc, Mutex};

    use bevy::prelude::*;
    use bevy_storage::plugin::SnapshotAppExt;
    use bevy_storage::snapshot::{
        Persist, SnapshotContext, SnapshotEncoding, SnapshotRegistry, SnapshotSettings, capture,
        decode,
    };
    use serde::{Deserialize, Serialize};

    /// The audio engine's side: which voices are playing.
    type Mixer = Arc<Mutex<Vec<String>>>;

    /// A voice of the engine: the sound's name and a live handle into the mixer.
    #[derive(Component, TypePath)]
    struct Voice {
        sound: String,
        volume: f32,
        mixer: Mixer,
    }

    /// What is saved for a voice.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
    struct SavedVoice {
        sound: String,
        volume: f32,
    }

    #[derive(Component, Reflect, Clone, Debug, PartialEq, Default)]
    #[reflect(Component)]
    struct Name2(String);

    /// An app whose voices are saved as `SavedVoice` and reconnected to `mixer` on load.
    fn app(mixer: &Mixer) -> App {
        let mut app = App::new();
        app.register_type::<Name2>();
        let on_load = Arc::clone(mixer);
        app.map_snapshot_component::<Voice, SavedVoice>(
            |voice| SavedVoice {
                sound: voice.sound.clone(),
                volume: voice.volume,
            },
            move |saved| {
                on_load.lock().unwrap().push(saved.sound.clone());
                Voice {
                    sound: saved.sound,
                    volume: saved.volume,
                    mixer: Arc::clone(&on_load),
                }
            },
        );
        app
    }

    fn round_trip(encoding: SnapshotEncoding) {
        let old_mixer: Mixer = Arc::default();
        let mut old = app(&old_mixer);
        let world = old.world_mut();
        old_mixer.lock().unwrap().push("rain".into());
        world.spawn((
            Persist,
            Name2("campfire".into()),
            Voice {
                sound: "rain".into(),
                volume: 0.25,
                mixer: Arc::clone(&old_mixer),
            },
        ));
        // Not persisted: not saved, mapped or not.
        world.spawn(Voice {
            sound: "menu music".into(),
            volume: 1.0,
            mixer: Arc::clone(&old_mixer),
        });
        let settings = SnapshotSettings::default().encoding(encoding);
        let registry = world.resource::<SnapshotRegistry>().clone();
        let bytes = capture(world, &settings, &registry)
            .unwrap()
            .encode()
            .unwrap();
        if encoding == SnapshotEncoding::Ron {
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.contains("rain") && text.contains("0.25"), "{text}");
            assert!(!text.contains("menu music"));
        }
        drop(old);

        // A world reset: a new app, a new mixer.
        let new_mixer: Mixer = Arc::default();
        let mut new = app(&new_mixer);
        let world = new.world_mut();
        let context = SnapshotContext::from_world(world);
        decode(&bytes, &context).unwrap().apply(world, true);
        let mut q = world.query_filtered::<(&Name2, &Voice), With<Persist>>();
        let loaded: Vec<_> = q.iter(world).collect();
        assert_eq!(loaded.len(), 1);
        let (name, voice) = loaded[0];
        assert_eq!(name.0, "campfire");
        assert_eq!((voice.sound.as_str(), voice.volume), ("rain", 0.25));
        assert!(
            Arc::ptr_eq(&voice.mixer, &new_mixer),
            "the handle points into the new mixer"
        );
        assert_eq!(*new_mixer.lock().unwrap(), ["rain"]);
    }

    #[test]
    fn a_runtime_handle_component_survives_a_world_reset_ron() {
        round_trip(SnapshotEncoding::Ron);
    }

    #[test]
    fn a_runtime_handle_component_survives_a_world_reset_binary() {
        round_trip(SnapshotEncoding::Binary);
    }

    /// The same component through the plugin: autosaves of an incremental chain (a full
    /// base, then a delta holding only the voice whose volume changed: the mapping's
    /// change-tick path), then `LoadWorld` in a new app with a new mixer.
    #[test]
    fn mapped_components_go_through_save_world_deltas_and_load_world() {
        use bevy_storage::StorageConfig;
        use bevy_storage::plugin::{LoadWorld, SaveWorld, SnapshotPlugin, StoragePlugin};
        use bevy_storage::plugin::{WorldLoaded, WorldSaved};
        use bevy_storage::snapshot::ChainPolicy;
        use std::time::{Duration, Instant};

        #[derive(Resource, Default)]
        struct Seen(Vec<Result<bool, String>>);

        fn game(mixer: &Mixer, path: &std::path::Path) -> App {
            let mut app = app(mixer);
            app.add_plugins((
                MinimalPlugins,
                StoragePlugin::config(StorageConfig::sqlite(path)),
                SnapshotPlugin::new(SnapshotSettings::default())
                    .incremental(ChainPolicy::default()),
            ))
            .init_resource::<Seen>()
            .add_observer(|ev: On<WorldSaved>, mut seen: ResMut<Seen>| {
                seen.0.push(
                    ev.result
                        .as_ref()
                        .map(|_| ev.delta)
                        .map_err(|e| e.to_string()),
                );
            })
            .add_observer(|ev: On<WorldLoaded>, mut seen: ResMut<Seen>| {
                seen.0
                    .push(ev.result.as_ref().map(|_| false).map_err(|e| e.to_string()));
            });
            app
        }
        fn answer(app: &mut App) -> Result<bool, String> {
            let start = Instant::now();
            let before = app.world().resource::<Seen>().0.len();
            while app.world().resource::<Seen>().0.len() == before {
                assert!(start.elapsed() < Duration::from_secs(20), "no answer");
                app.update();
                std::thread::sleep(Duration::from_millis(1));
            }
            app.world().resource::<Seen>().0.last().unwrap().clone()
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("game.db");
        let old_mixer: Mixer = Arc::default();
        let mut old = game(&old_mixer, &path);
        for (sound, volume) in [("rain", 0.25), ("wind", 0.5)] {
            old.world_mut().spawn((
                Persist,
                Name2(sound.to_uppercase()),
                Voice {
                    sound: sound.into(),
                    volume,
                    mixer: Arc::clone(&old_mixer),
                },
            ));
        }
        old.world_mut().write_message(SaveWorld::autosave());
        assert_eq!(
            answer(&mut old),
            Ok(false),
            "the chain's base is a full snapshot"
        );
        let world = old.world_mut();
        let mut voices = world.query::<&mut Voice>();
        for mut voice in voices.iter_mut(world) {
            if voice.sound == "wind" {
                voice.volume = 0.75;
            }
        }
        old.world_mut().write_message(SaveWorld::autosave());
        assert_eq!(answer(&mut old), Ok(true), "the change is a delta");
        drop(old);

        let new_mixer: Mixer = Arc::default();
        let mut new = game(&new_mixer, &path);
        new.world_mut().write_message(LoadWorld::newest_autosave());
        assert_eq!(answer(&mut new), Ok(false));
        let world = new.world_mut();
        let mut q = world.query_filtered::<&Voice, With<Persist>>();
        let mut loaded: Vec<(String, f32, bool)> = q
            .iter(world)
            .map(|v| (v.sound.clone(), v.volume, Arc::ptr_eq(&v.mixer, &new_mixer)))
            .collect();
        loaded.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            loaded,
            [("rain".into(), 0.25, true), ("wind".into(), 0.75, true)]
        );
        let mut playing = new_mixer.lock().unwrap().clone();
        playing.sort();
        assert_eq!(playing, ["rain", "wind"]);
    }
}
