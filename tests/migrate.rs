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
}
