//! World snapshots through the plugin: messages, responses, autosave, exit flush.

use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy::time::TimeUpdateStrategy;
use bevy_storage::plugin::{
    LoadWorld, SaveWorld, SnapshotAppExt, SnapshotMetadata, SnapshotPlugin, Storage, StoragePlugin,
    WorldLoaded, WorldSaved,
};
use bevy_storage::snapshot::{
    Persist, SnapshotEncoding, SnapshotSettings, autosave_keys, list_slots,
};
use bevy_storage::{SaveOptions, StorageConfig};
use serde::{Deserialize, Serialize};

#[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[reflect(Component)]
struct Position(i32, i32);

#[derive(Component, Reflect, Clone, Debug, PartialEq)]
#[reflect(Component)]
struct Follows(#[entities] Entity);

#[derive(Resource, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Resource)]
struct Turn(u32);

#[derive(Resource, Default)]
struct Seen {
    saved: Vec<WorldSaved>,
    loaded: Vec<WorldLoaded>,
}

fn app_with(storage: impl Plugin, snapshots: SnapshotPlugin) -> App {
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, storage, snapshots))
        .register_snapshot_component::<Position>()
        .insert_resource(TimeUpdateStrategy::ManualDuration(Duration::from_millis(
            100,
        )))
        .init_resource::<Seen>()
        .add_observer(|ev: On<WorldSaved>, mut seen: ResMut<Seen>| {
            seen.saved.push(ev.event().clone())
        })
        .add_observer(|ev: On<WorldLoaded>, mut seen: ResMut<Seen>| {
            seen.loaded.push(ev.event().clone())
        });
    app
}

fn settings() -> SnapshotSettings {
    SnapshotSettings::default()
        .encoding(SnapshotEncoding::Binary)
        .allow_resource::<Turn>()
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

fn populate(world: &mut World) {
    let leader = world
        .spawn((Persist, Position(1, 2), Name::new("leader")))
        .id();
    world.spawn((
        Persist,
        Position(3, 4),
        Follows(leader),
        Name::new("follower"),
    ));
    world.spawn((Position(9, 9), Name::new("camera")));
    world.insert_resource(Turn(17));
}

fn persisted_positions(world: &mut World) -> Vec<Position> {
    let mut v: Vec<Position> = world
        .query_filtered::<&Position, With<Persist>>()
        .iter(world)
        .cloned()
        .collect();
    v.sort_by_key(|p| (p.0, p.1));
    v
}

#[test]
fn save_then_load_through_messages() {
    let mut app = app_with(StoragePlugin::memory(), SnapshotPlugin::new(settings()));
    populate(app.world_mut());
    app.world_mut()
        .write_message(SaveWorld::new("slot:1").metadata("level", "Crypt"));
    pump_until(&mut app, "the save", |s| !s.saved.is_empty());
    let saved = app.world().resource::<Seen>().saved[0].clone();
    assert_eq!(saved.key, "slot:1");
    assert_eq!(saved.result.as_ref().unwrap(), &2);

    // Change the world, then load the slot back.
    let world = app.world_mut();
    let mut q = world.query_filtered::<Entity, With<Persist>>();
    let first = q.iter(world).next().unwrap();
    world.despawn(first);
    world.spawn((Persist, Position(100, 100)));
    world.insert_resource(Turn(99));
    let request = LoadWorld::new("slot:1");
    let id = request.id;
    world.write_message(request);
    pump_until(&mut app, "the load", |s| !s.loaded.is_empty());
    let loaded = app.world().resource::<Seen>().loaded[0].clone();
    assert_eq!(loaded.id, id);
    let map = loaded.result.unwrap();
    assert_eq!(map.len(), 2);
    let world = app.world_mut();
    assert_eq!(persisted_positions(world), [Position(1, 2), Position(3, 4)]);
    assert_eq!(world.resource::<Turn>(), &Turn(17));
    let follows = world.query::<&Follows>().single(world).unwrap().0;
    let mut names = world.query::<(Entity, &Name)>();
    let leader = names
        .iter(world)
        .find(|(_, n)| n.as_str() == "leader")
        .unwrap()
        .0;
    assert_eq!(follows, leader, "references point at the loaded leader");
    let camera = world
        .query::<&Name>()
        .iter(world)
        .filter(|n| n.as_str() == "camera")
        .count();
    assert_eq!(camera, 1, "non-persisted entities are untouched");

    // The slot lists with its metadata.
    let store = store_of(&mut app);
    let slots = list_slots(&store, "slot:").unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].custom["level"], "Crypt");
}

#[test]
fn failed_loads_answer_with_the_cause_and_change_nothing() {
    let mut app = app_with(StoragePlugin::memory(), SnapshotPlugin::new(settings()));
    populate(app.world_mut());
    app.update();
    let store = store_of(&mut app);
    store
        .save_bytes(
            "slot:junk",
            b"BSNP\x01\x00\x02\x00garbage garbage",
            &SaveOptions::default(),
        )
        .unwrap();
    app.world_mut()
        .write_message(LoadWorld::new("slot:missing"));
    app.world_mut().write_message(LoadWorld::new("slot:junk"));
    pump_until(&mut app, "two answers", |s| s.loaded.len() == 2);
    let seen = app.world().resource::<Seen>();
    let missing = seen.loaded[0].result.as_ref().unwrap_err().to_string();
    assert!(missing.contains("slot:missing"), "{missing}");
    let junk = seen.loaded[1].result.as_ref().unwrap_err().to_string();
    assert!(junk.contains("snapshot"), "{junk}");
    let world = app.world_mut();
    assert_eq!(persisted_positions(world), [Position(1, 2), Position(3, 4)]);
    assert_eq!(world.resource::<Turn>(), &Turn(17));
}

#[test]
fn autosave_rotates_and_loading_falls_back_past_a_corrupt_one() {
    let plugin = SnapshotPlugin::new(settings()).autosave(Duration::from_secs(1), 2);
    let mut app = app_with(StoragePlugin::memory(), plugin);
    populate(app.world_mut());
    app.world_mut()
        .resource_mut::<SnapshotMetadata>()
        .0
        .insert("play_time_s".into(), 5.into());
    // 100 ms per frame: an autosave every 10 frames; wait for three of them.
    pump_until(&mut app, "three autosaves", |s| {
        s.saved.iter().filter(|r| r.autosave).count() >= 3
    });
    let store = store_of(&mut app);
    let keys = autosave_keys(&store, "autosave/").unwrap();
    assert_eq!(keys.len(), 2, "only the newest two are kept: {keys:?}");
    let slots = list_slots(&store, "autosave/").unwrap();
    assert_eq!(slots[0].custom["play_time_s"], 5);

    // Make the world differ, damage the newest autosave, load "the autosave".
    app.world_mut().insert_resource(Turn(1));
    store
        .save_bytes(keys.last().unwrap(), b"torn", &SaveOptions::default())
        .unwrap();
    app.world_mut().write_message(LoadWorld::newest_autosave());
    pump_until(&mut app, "the autosave load", |s| !s.loaded.is_empty());
    let loaded = app.world().resource::<Seen>().loaded[0].clone();
    assert!(loaded.result.is_ok(), "{:?}", loaded.result);
    assert_eq!(&loaded.key, &keys[0], "fell back to the older autosave");
    assert_eq!(loaded.skipped.len(), 1);
    assert_eq!(app.world().resource::<Turn>(), &Turn(17));
}

#[test]
fn a_save_sent_with_app_exit_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("game.db");
    {
        let mut app = app_with(
            StoragePlugin::config(StorageConfig::sqlite(&path)),
            SnapshotPlugin::new(settings()),
        );
        populate(app.world_mut());
        app.update(); // let the store open
        pump_until(&mut app, "the store", |_| true);
        app.world_mut().write_message(SaveWorld::new("quit-save"));
        app.world_mut().write_message(AppExit::Success);
        app.update();
        assert_eq!(
            app.world().resource::<Seen>().saved.len(),
            1,
            "answered before the app ended"
        );
    }
    let mut app = app_with(
        StoragePlugin::config(StorageConfig::sqlite(&path)),
        SnapshotPlugin::new(settings()),
    );
    app.world_mut().write_message(LoadWorld::new("quit-save"));
    pump_until(&mut app, "the load", |s| !s.loaded.is_empty());
    assert!(app.world().resource::<Seen>().loaded[0].result.is_ok());
    assert_eq!(
        persisted_positions(app.world_mut()),
        [Position(1, 2), Position(3, 4)]
    );
}

#[cfg(all(feature = "compression", feature = "encryption"))]
#[test]
fn snapshots_are_compressed_and_encrypted_as_configured() {
    use bevy_storage::{Compression, EncryptionKey};
    let key = || EncryptionKey::from_bytes([3; 32]);
    let storage = StoragePlugin::memory().encryption_key(key());
    let plugin = SnapshotPlugin::new(settings().compression(Compression::Lz4).encrypt(true));
    let mut app = app_with(storage, plugin);
    populate(app.world_mut());
    for i in 0..200 {
        app.world_mut()
            .spawn((Persist, Position(i, i), Name::new("soldier")));
    }
    app.world_mut().write_message(SaveWorld::new("secret-slot"));
    pump_until(&mut app, "the save", |s| !s.saved.is_empty());
    assert!(app.world().resource::<Seen>().saved[0].result.is_ok());
    let store = store_of(&mut app);
    let meta = store.get_metadata("secret-slot").unwrap().unwrap();
    assert!(meta.encrypted && meta.compressed, "{meta:?}");
    let raw = store.backend().get("secret-slot").unwrap().unwrap().value;
    assert!(
        !raw.windows(7).any(|w| w == b"soldier"),
        "the stored snapshot is ciphertext"
    );

    // Loading through the same store decrypts it.
    app.world_mut().write_message(LoadWorld::new("secret-slot"));
    pump_until(&mut app, "the load", |s| !s.loaded.is_empty());
    let loaded = app.world().resource::<Seen>().loaded[0].clone();
    assert_eq!(loaded.result.unwrap().len(), 202);

    // A store without the key cannot read it, and says why.
    let other = bevy_storage::Store::with_backend(store.backend().clone(), StorageConfig::memory())
        .unwrap();
    let err = bevy_storage::snapshot::read_snapshot(&other, "secret-slot").unwrap_err();
    assert!(
        matches!(err, bevy_storage::StorageError::EncryptionKeyMissing { .. }),
        "{err}"
    );
}

/// A store that encrypts every save encrypts its worlds too, without the snapshot settings
/// saying so; and a plaintext world planted in it is refused on load, leaving the live world
/// as it was.
#[cfg(feature = "encryption")]
#[test]
fn world_saves_follow_the_store_defaults_and_refuse_forged_plaintext() {
    use bevy_storage::{EncryptionKey, StorageError};
    let storage = StoragePlugin::memory().encryption(EncryptionKey::from_bytes([5; 32]));
    let mut app = app_with(storage, SnapshotPlugin::new(settings()));
    populate(app.world_mut());
    app.world_mut().write_message(SaveWorld::new("slot"));
    pump_until(&mut app, "the save", |s| !s.saved.is_empty());
    assert!(app.world().resource::<Seen>().saved[0].result.is_ok());
    let store = store_of(&mut app);
    let meta = store.get_metadata("slot").unwrap().unwrap();
    assert!(meta.encrypted, "the world was saved in plaintext: {meta:?}");
    assert_eq!(meta.compressed, cfg!(feature = "compression"), "{meta:?}");

    // The attacker writes a world of their own, in plaintext, with a tool that has no key.
    let attacker =
        bevy_storage::Store::with_backend(store.backend().clone(), StorageConfig::memory())
            .unwrap();
    let forged = bevy_storage::snapshot::read_snapshot(
        &bevy_storage::Store::with_backend(
            store.backend().clone(),
            StorageConfig::memory().encryption_key(EncryptionKey::from_bytes([5; 32])),
        )
        .unwrap(),
        "slot",
    )
    .unwrap()
    .unwrap();
    attacker
        .save_bytes("forged", &forged, &SaveOptions::new().encrypt(false))
        .unwrap();
    let persisted_before = app
        .world_mut()
        .query_filtered::<Entity, With<Persist>>()
        .iter(app.world())
        .count();
    app.world_mut().write_message(LoadWorld::new("forged"));
    pump_until(&mut app, "the load", |s| !s.loaded.is_empty());
    let loaded = app.world().resource::<Seen>().loaded[0].clone();
    let err = loaded.result.unwrap_err();
    assert!(
        matches!(*err, StorageError::NotEncrypted { .. }),
        "a forged plaintext world was not refused: {err}"
    );
    let persisted_after = app
        .world_mut()
        .query_filtered::<Entity, With<Persist>>()
        .iter(app.world())
        .count();
    assert_eq!(persisted_before, persisted_after, "the live world was kept");
}

/// A build without the `compression` feature saves worlds with the default settings (the
/// snapshot settings no longer ask for compression themselves).
#[test]
fn default_world_saves_work_in_every_build() {
    let mut app = app_with(StoragePlugin::memory(), SnapshotPlugin::new(settings()));
    populate(app.world_mut());
    app.world_mut().write_message(SaveWorld::new("slot"));
    pump_until(&mut app, "the save", |s| !s.saved.is_empty());
    let saved = app.world().resource::<Seen>().saved[0].clone();
    assert!(saved.result.is_ok(), "{:?}", saved.result);
    let store = store_of(&mut app);
    let meta = store.get_metadata("slot").unwrap().unwrap();
    assert_eq!(meta.compressed, cfg!(feature = "compression"), "{meta:?}");
}

// ------------------------------------------------------------------ one request path

/// Key-value responses seen, in delivery order.
#[derive(Resource, Default)]
struct KeyValueSeen(Vec<String>);

fn mixed_app() -> App {
    use bevy_storage::plugin::{ClearCompleted, DeleteCompleted, LoadCompleted};
    let mut app = app_with(StoragePlugin::memory(), SnapshotPlugin::new(settings()));
    app.init_resource::<KeyValueSeen>()
        .add_observer(|ev: On<DeleteCompleted>, mut seen: ResMut<KeyValueSeen>| {
            seen.0.push(format!("delete {:?}", ev.event().result))
        })
        .add_observer(|ev: On<ClearCompleted>, mut seen: ResMut<KeyValueSeen>| {
            seen.0
                .push(format!("clear {:?}", ev.event().result.is_ok()))
        })
        .add_observer(|ev: On<LoadCompleted>, mut seen: ResMut<KeyValueSeen>| {
            seen.0.push(format!("load found={}", ev.event().found()))
        });
    populate(app.world_mut());
    app
}

/// The plugin's store, once open: it opens on the pool, so a test that asks right after the
/// first frame pumps frames until it is (a failure to open is the test's failure).
fn store_of(app: &mut App) -> bevy_storage::Store {
    let start = Instant::now();
    loop {
        let storage = app.world().resource::<Storage>();
        if let Some(store) = storage.store() {
            return store.clone();
        }
        assert!(storage.error().is_none(), "{:?}", storage.error());
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for the store to open"
        );
        app.update();
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pump_kv(app: &mut App, n: usize) {
    let start = Instant::now();
    while app.world().resource::<KeyValueSeen>().0.len() < n {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out");
        app.update();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A world save and a delete of its slot sent in one frame run in the order they were sent,
/// in both orders (they share one scheduler and the slot's key).
#[test]
fn world_and_key_value_requests_on_one_key_keep_their_order() {
    use bevy_storage::plugin::DeleteRequest;
    // Save, then delete: the delete removes what the save wrote.
    let mut app = mixed_app();
    app.update(); // the store opens
    app.world_mut().write_message(SaveWorld::new("slot"));
    app.world_mut().write_message(DeleteRequest::new("slot"));
    pump_until(&mut app, "the save", |s| !s.saved.is_empty());
    pump_kv(&mut app, 1);
    assert!(app.world().resource::<Seen>().saved[0].result.is_ok());
    assert_eq!(
        app.world().resource::<KeyValueSeen>().0,
        ["delete Ok(true)"]
    );
    assert!(
        !store_of(&mut app).exists("slot").unwrap(),
        "the delete ran last"
    );

    // Delete, then save: the slot holds the new save.
    let mut app = mixed_app();
    app.world_mut().write_message(DeleteRequest::new("slot"));
    app.world_mut().write_message(SaveWorld::new("slot"));
    pump_until(&mut app, "the save", |s| !s.saved.is_empty());
    pump_kv(&mut app, 1);
    assert_eq!(
        app.world().resource::<KeyValueSeen>().0,
        ["delete Ok(false)"]
    );
    assert!(
        store_of(&mut app).exists("slot").unwrap(),
        "the save ran last"
    );
}

/// A world load waits for a clear sent before it, and a clear sent after a world save waits
/// for it: all in one frame.
#[test]
fn world_requests_keep_their_order_across_a_clear() {
    use bevy_storage::plugin::{ClearRequest, LoadRequest};
    let mut app = mixed_app();
    app.world_mut().write_message(SaveWorld::new("slot"));
    app.world_mut().write_message(ClearRequest::new());
    app.world_mut().write_message(LoadWorld::new("slot"));
    app.world_mut().write_message(SaveWorld::new("after"));
    app.world_mut().write_message(LoadRequest::new("after"));
    pump_until(&mut app, "both saves and the load", |s| {
        s.saved.len() == 2 && s.loaded.len() == 1
    });
    pump_kv(&mut app, 2);
    let seen = app.world().resource::<Seen>();
    assert!(seen.saved.iter().all(|s| s.result.is_ok()));
    let load = seen.loaded[0].result.as_ref().unwrap_err();
    assert!(
        matches!(**load, bevy_storage::StorageError::NoSnapshot { .. }),
        "the load ran after the clear: {load}"
    );
    assert_eq!(
        app.world().resource::<KeyValueSeen>().0,
        ["clear true", "load found=true"],
        "the clear ran after the first save, the key-value load after the second"
    );
    let store = store_of(&mut app);
    assert!(!store.exists("slot").unwrap());
    assert!(store.exists("after").unwrap());
}

/// A world save sent after a world load captures the loaded world, even when the load's
/// decoding takes a while: world requests run one at a time.
#[test]
fn a_world_save_captures_what_an_earlier_load_applied() {
    let mut app = mixed_app();
    app.world_mut().write_message(SaveWorld::new("first"));
    pump_until(&mut app, "the first save", |s| s.saved.len() == 1);
    for i in 0..50 {
        app.world_mut()
            .spawn((Persist, Position(100 + i, 0), Name::new("extra")));
    }
    app.world_mut().write_message(LoadWorld::new("first"));
    app.world_mut().write_message(SaveWorld::new("second"));
    pump_until(&mut app, "the load and the second save", |s| {
        s.saved.len() == 2 && s.loaded.len() == 1
    });
    let saved = &app.world().resource::<Seen>().saved[1];
    assert_eq!(saved.key, "second");
    assert_eq!(
        *saved.result.as_ref().unwrap(),
        2,
        "the second save captured the loaded world (2 persisted entities), not the one before it"
    );
}

/// The frame a game changes its world in, for
/// [`a_world_save_behind_a_large_intake_captures_the_world_it_was_sent_from`].
#[derive(Resource, Default)]
struct Frame(u32);

/// A world save sent while a large intake of key-value saves from the frame before is still
/// being queued on the pool is captured before the next frame's game systems run: it holds
/// the world of the frame that sent it, never a later one.
#[test]
fn a_world_save_behind_a_large_intake_captures_the_world_it_was_sent_from() {
    use bevy_storage::plugin::SaveRequest;
    let mut app = mixed_app();
    app.update(); // the store opens
    app.init_resource::<Frame>().add_systems(
        Update,
        |mut frame: ResMut<Frame>,
         mut positions: Query<(&mut Position, &Name), With<Persist>>,
         mut saves: MessageWriter<SaveRequest>,
         mut worlds: MessageWriter<SaveWorld>| {
            frame.0 += 1;
            let mut set_leader = |to: Position| {
                for (mut position, name) in &mut positions {
                    if name.as_str() == "leader" {
                        *position = to.clone();
                    }
                }
            };
            match frame.0 {
                // Many saves in one frame: taken in by a pool task, in order.
                1 => {
                    saves.write_batch((0..5_000).map(|i| SaveRequest::new(format!("kv{i}"), i)));
                }
                // The next frame changes the world and saves it.
                2 => {
                    set_leader(Position(77, 77));
                    worlds.write(SaveWorld::new("sent"));
                }
                // The frame after changes it again.
                3 => set_leader(Position(88, 88)),
                _ => {}
            }
        },
    );
    pump_until(&mut app, "the world save", |s| !s.saved.is_empty());
    assert!(app.world().resource::<Seen>().saved[0].result.is_ok());
    assert!(
        app.world().resource::<Frame>().0 >= 3,
        "the frame after the save ran its systems"
    );
    app.world_mut().write_message(LoadWorld::new("sent"));
    pump_until(&mut app, "the load", |s| !s.loaded.is_empty());
    assert!(app.world().resource::<Seen>().loaded[0].result.is_ok());
    assert_eq!(
        persisted_positions(app.world_mut()),
        [Position(3, 4), Position(77, 77)],
        "the save holds the world of the frame that sent it"
    );
}

/// The asynchronous slot listing is answered like the other requests, in order with the saves
/// of its slots sent before it.
#[test]
fn slots_are_listed_asynchronously_after_the_saves_before_them() {
    use bevy_storage::plugin::{ListSlots, SlotsListed};
    #[derive(Resource, Default)]
    struct Listed(Vec<SlotsListed>);
    let mut app = mixed_app();
    app.init_resource::<Listed>().add_observer(
        |ev: On<SlotsListed>, mut listed: ResMut<Listed>| listed.0.push(ev.event().clone()),
    );
    app.world_mut().write_message(SaveWorld::new("slot:1"));
    app.world_mut().write_message(SaveWorld::new("slot:2"));
    let list = ListSlots::new("slot:");
    let id = list.id;
    app.world_mut().write_message(list);
    let start = Instant::now();
    while app.world().resource::<Listed>().0.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out");
        app.update();
    }
    let listed = &app.world().resource::<Listed>().0[0];
    assert_eq!(listed.id, id);
    let slots = listed.result.as_ref().unwrap();
    let mut keys: Vec<&str> = slots.iter().map(|s| s.key.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["slot:1", "slot:2"],
        "both saves ran before the listing"
    );
    assert!(slots.iter().all(|s| s.entity_count == 2));
}

/// Every persisted entity's position and follow target (by position), sorted: what a load
/// of the autosave chain must give back.
fn persisted_state(world: &mut World) -> (Vec<(Position, Option<Position>)>, Option<Turn>) {
    let mut v: Vec<(Position, Option<Position>)> = world
        .query_filtered::<(&Position, Option<&Follows>), With<Persist>>()
        .iter(world)
        .map(|(p, f)| {
            (
                p.clone(),
                f.and_then(|f| world.get::<Position>(f.0).cloned()),
            )
        })
        .collect();
    v.sort_by_key(|(p, _)| (p.0, p.1));
    (v, world.get_resource::<Turn>().cloned())
}

/// Persisted entities nobody touches: a base big enough that small deltas stay under the
/// policy's share of it.
fn bulk(world: &mut World) {
    world.spawn_batch((0..300).map(|i| (Persist, Position(-1000 - i, 0))));
}

fn autosave_now(app: &mut App) -> WorldSaved {
    let before = app.world().resource::<Seen>().saved.len();
    app.world_mut().write_message(SaveWorld::autosave());
    pump_until(app, "an autosave", |s| s.saved.len() > before);
    let saved = app.world().resource::<Seen>().saved.last().unwrap().clone();
    assert!(saved.result.is_ok(), "{:?}", saved.result);
    saved
}

#[test]
fn incremental_autosaves_write_deltas_compact_and_load_as_one_world() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("game.db");
    let plugin = || {
        SnapshotPlugin::new(settings())
            .autosave_prefix("auto/")
            .incremental(bevy_storage::snapshot::ChainPolicy::default().max_deltas(2))
    };
    let expected;
    {
        let mut app = app_with(
            StoragePlugin::config(StorageConfig::sqlite(&path)),
            plugin(),
        );
        populate(app.world_mut());
        bulk(app.world_mut());
        let mut kinds = Vec::new();
        for round in 0..5 {
            let w = app.world_mut();
            let mover = w
                .query_filtered::<Entity, (With<Persist>, With<Follows>)>()
                .iter(w)
                .next()
                .unwrap();
            w.get_mut::<Position>(mover).unwrap().0 += 10;
            let new = w.spawn((Persist, Position(100 + round, 0))).id();
            w.entity_mut(mover).insert(Follows(new));
            w.resource_mut::<Turn>().0 += 1;
            kinds.push(autosave_now(&mut app).delta);
        }
        // A full base, two deltas, then the policy's full snapshot and a delta of it.
        assert_eq!(kinds, [false, true, true, false, true]);
        let store = store_of(&mut app);
        let slots = list_slots(&store, "auto/").unwrap();
        let newest = &slots[0];
        let chain = newest
            .chain
            .as_ref()
            .expect("the newest autosave is a delta");
        assert_eq!(chain.sequence, 1);
        assert_eq!(newest.entity_count, 307);
        // Keep 3: the newest three, and the first chain, which the oldest of them (its
        // second delta) needs.
        assert_eq!(autosave_keys(&store, "auto/").unwrap().len(), 5);
        expected = persisted_state(app.world_mut());
    }
    let mut app = app_with(
        StoragePlugin::config(StorageConfig::sqlite(&path)),
        plugin(),
    );
    app.world_mut().write_message(LoadWorld::newest_autosave());
    pump_until(&mut app, "the chain's load", |s| !s.loaded.is_empty());
    let loaded = app.world().resource::<Seen>().loaded[0].clone();
    assert!(loaded.result.is_ok(), "{:?}", loaded.result);
    assert!(loaded.skipped.is_empty());
    assert_eq!(persisted_state(app.world_mut()), expected);
    // A load ends the chain: the next autosave is full.
    assert!(!autosave_now(&mut app).delta);
}

/// Clones of [`Counted`]: the values a capture took out of the world (on the main thread).
static COUNTED_CLONES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A typed component that counts its clones.
#[derive(Component, Reflect, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[reflect(Component)]
struct Counted(u32);

impl Clone for Counted {
    fn clone(&self) -> Self {
        COUNTED_CLONES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted(self.0)
    }
}

fn counted_clones() -> usize {
    COUNTED_CLONES.load(std::sync::atomic::Ordering::SeqCst)
}

fn counted_state(world: &mut World) -> Vec<u32> {
    let mut v: Vec<u32> = world
        .query_filtered::<&Counted, With<Persist>>()
        .iter(world)
        .map(|c| c.0)
        .collect();
    v.sort();
    v
}

#[test]
fn a_compacting_autosave_captures_a_delta_and_the_pool_folds_the_new_base() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("game.db");
    let plugin = || {
        SnapshotPlugin::new(settings())
            .autosave_prefix("auto/")
            .incremental(bevy_storage::snapshot::ChainPolicy::default().max_deltas(2))
    };
    let new_app = || {
        let mut app = app_with(
            StoragePlugin::config(StorageConfig::sqlite(&path)),
            plugin(),
        );
        app.register_snapshot_component::<Counted>();
        app
    };
    let mut app = new_app();
    populate(app.world_mut());
    app.world_mut()
        .spawn_batch((0..1000).map(|i| (Persist, Position(i, 1), Counted(i as u32))));
    // Each round: one value changed, one entity spawned, one despawned, one reference moved.
    let edit = |app: &mut App, round: u32| {
        let w = app.world_mut();
        let counted: Vec<Entity> = w
            .query_filtered::<Entity, (With<Persist>, With<Counted>)>()
            .iter(w)
            .collect();
        w.get_mut::<Counted>(counted[0]).unwrap().0 += 10_000;
        w.despawn(counted[1]);
        let new = w
            .spawn((
                Persist,
                Position(5000 + round as i32, 0),
                Counted(5000 + round),
            ))
            .id();
        let follower = w
            .query_filtered::<Entity, (With<Persist>, With<Follows>)>()
            .iter(w)
            .next()
            .unwrap();
        w.entity_mut(follower).insert(Follows(new));
        w.resource_mut::<Turn>().0 += 1;
    };

    let before = counted_clones();
    assert!(!autosave_now(&mut app).delta);
    assert!(
        counted_clones() - before >= 1000,
        "the first base is a full capture"
    );
    for round in 0..2 {
        edit(&mut app, round);
        assert!(autosave_now(&mut app).delta);
    }
    edit(&mut app, 2);
    let before = counted_clones();
    let compacted = autosave_now(&mut app);
    let cloned = counted_clones() - before;
    assert!(!compacted.delta, "the policy's new base");
    assert!(
        cloned <= 4,
        "the compacting autosave took {cloned} values on the main thread: a full capture, not a delta"
    );
    let store = store_of(&mut app);
    assert_eq!(
        bevy_storage::snapshot::chain_of(&store, &compacted.key).unwrap(),
        None,
        "the new base is a whole snapshot"
    );
    let at_compaction = (
        persisted_state(app.world_mut()),
        counted_state(app.world_mut()),
    );

    // The chain goes on from the new base.
    edit(&mut app, 3);
    let next = autosave_now(&mut app);
    assert!(next.delta);
    let chain = bevy_storage::snapshot::chain_of(&store, &next.key)
        .unwrap()
        .expect("a delta");
    assert_eq!(
        (chain.base.as_str(), chain.sequence),
        (compacted.key.as_str(), 1)
    );
    let newest = (
        persisted_state(app.world_mut()),
        counted_state(app.world_mut()),
    );
    drop(app);

    // The new base alone loads as the world it was folded for; the newest chain as the world.
    let mut app = new_app();
    app.world_mut().write_message(LoadWorld::newest_autosave());
    pump_until(&mut app, "the chain's load", |s| !s.loaded.is_empty());
    let loaded = app.world().resource::<Seen>().loaded[0].clone();
    assert!(loaded.result.is_ok(), "{:?}", loaded.result);
    assert_eq!(loaded.key, next.key);
    let mut app2 = new_app();
    app2.world_mut()
        .write_message(LoadWorld::new(compacted.key.clone()));
    pump_until(&mut app2, "the base's load", |s| !s.loaded.is_empty());
    let loaded = app2.world().resource::<Seen>().loaded[0].clone();
    assert!(loaded.result.is_ok(), "{:?}", loaded.result);
    assert_eq!(
        (
            persisted_state(app2.world_mut()),
            counted_state(app2.world_mut())
        ),
        at_compaction
    );
    assert_eq!(
        (
            persisted_state(app.world_mut()),
            counted_state(app.world_mut())
        ),
        newest
    );
}

#[test]
fn a_chain_the_pool_cannot_compact_keeps_its_delta_and_the_next_autosave_is_a_full_base() {
    let plugin = SnapshotPlugin::new(settings())
        .autosave_prefix("auto/")
        .incremental(bevy_storage::snapshot::ChainPolicy::default().max_deltas(2));
    let mut app = app_with(StoragePlugin::memory(), plugin);
    populate(app.world_mut());
    bulk(app.world_mut());
    let base = autosave_now(&mut app);
    assert!(!base.delta);
    for i in 0..2 {
        app.world_mut().spawn((Persist, Position(50 + i, 0)));
        assert!(autosave_now(&mut app).delta);
    }
    // The base no longer reads back: the pool cannot fold the chain into a new base.
    let store = store_of(&mut app);
    store
        .save_bytes(&base.key, b"not a snapshot", &SaveOptions::default())
        .unwrap();
    app.world_mut().spawn((Persist, Position(60, 0)));
    let kept = autosave_now(&mut app);
    assert!(
        kept.delta,
        "the compaction failed: its delta is stored as it was"
    );
    let chain = bevy_storage::snapshot::chain_of(&store, &kept.key)
        .unwrap()
        .expect("a delta of the chain");
    assert_eq!(
        (chain.base.as_str(), chain.sequence),
        (base.key.as_str(), 3)
    );
    app.world_mut().spawn((Persist, Position(61, 0)));
    let full = autosave_now(&mut app);
    assert!(!full.delta, "the next autosave captures a new base");
    assert_eq!(
        bevy_storage::snapshot::chain_of(&store, &full.key).unwrap(),
        None
    );
    let expected = persisted_state(app.world_mut());
    app.world_mut().write_message(LoadWorld::newest_autosave());
    pump_until(&mut app, "the load", |s| !s.loaded.is_empty());
    let loaded = app.world().resource::<Seen>().loaded[0].clone();
    assert!(loaded.result.is_ok(), "{:?}", loaded.result);
    assert_eq!(loaded.key, full.key);
    assert_eq!(persisted_state(app.world_mut()), expected);
}

#[test]
fn a_torn_delta_falls_back_to_the_chain_state_before_it() {
    let plugin = SnapshotPlugin::new(settings())
        .incremental(bevy_storage::snapshot::ChainPolicy::default())
        .autosave_prefix("auto/");
    let mut app = app_with(StoragePlugin::memory(), plugin);
    populate(app.world_mut());
    bulk(app.world_mut());
    assert!(!autosave_now(&mut app).delta);
    app.world_mut().spawn((Persist, Position(7, 7)));
    assert!(autosave_now(&mut app).delta);
    let good = persisted_state(app.world_mut());
    app.world_mut().spawn((Persist, Position(8, 8)));
    app.world_mut().resource_mut::<Turn>().0 = 99;
    let torn = autosave_now(&mut app);
    assert!(torn.delta);
    app.world_mut().spawn((Persist, Position(9, 9)));
    let after = autosave_now(&mut app);
    assert!(after.delta);

    let store = store_of(&mut app);
    let keys = autosave_keys(&store, "auto/").unwrap();
    assert_eq!(
        keys.len(),
        4,
        "a kept delta keeps its whole chain: {keys:?}"
    );
    // A delta's key loads its chain up to it.
    app.world_mut()
        .write_message(LoadWorld::new(keys[1].clone()));
    pump_until(&mut app, "the delta's load", |s| !s.loaded.is_empty());
    let loaded = app.world().resource::<Seen>().loaded[0].clone();
    assert!(loaded.result.is_ok(), "{:?}", loaded.result);
    assert_eq!(persisted_state(app.world_mut()), good);
    // A named slot cannot be incremental.
    let before = app.world().resource::<Seen>().saved.len();
    app.world_mut()
        .write_message(SaveWorld::new("slot").incremental(true));
    pump_until(&mut app, "the refused save", |s| s.saved.len() > before);
    let refused = app.world().resource::<Seen>().saved.last().unwrap().clone();
    assert!(
        matches!(&refused.result, Err(e) if matches!(**e, bevy_storage::StorageError::Config(_))),
        "{:?}",
        refused.result
    );
    let bytes = bevy_storage::snapshot::read_snapshot(&store, &torn.key)
        .unwrap()
        .unwrap();
    store
        .save_bytes(
            &torn.key,
            &bytes[..bytes.len() / 2],
            &SaveOptions::default(),
        )
        .unwrap();

    // Loading the torn delta itself fails and changes nothing.
    app.world_mut()
        .write_message(LoadWorld::new(torn.key.clone()));
    pump_until(&mut app, "the torn load", |s| s.loaded.len() > 1);
    assert!(app.world().resource::<Seen>().loaded[1].result.is_err());

    app.world_mut().write_message(LoadWorld::newest_autosave());
    pump_until(&mut app, "the fallback load", |s| s.loaded.len() > 2);
    let loaded = app.world().resource::<Seen>().loaded[2].clone();
    assert!(loaded.result.is_ok(), "{:?}", loaded.result);
    assert_eq!(
        loaded.key, keys[1],
        "the chain up to the delta before the torn one"
    );
    let skipped: Vec<&str> = loaded.skipped.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(skipped, [after.key.as_str(), torn.key.as_str()]);
    assert_eq!(persisted_state(app.world_mut()), good);
}

#[derive(Resource, Default)]
struct VisiblePersisted(Vec<usize>);

#[derive(Resource, Default)]
struct PositionsAdded(usize);

/// `LoadWorld::spread_over_frames`: each frame's game systems see the old world, nothing
/// persisted, or the whole loaded world; observers run for every loaded entity; `WorldLoaded`
/// comes once, and a save sent with the load waits for all of it.
#[test]
fn a_load_spread_over_frames_is_never_seen_half_loaded() {
    let mut app = app_with(StoragePlugin::memory(), SnapshotPlugin::new(settings()));
    populate(app.world_mut());
    for i in 0..40 {
        app.world_mut().spawn((Persist, Position(10 + i, 0)));
    }
    app.world_mut().write_message(SaveWorld::new("big"));
    pump_until(&mut app, "the save", |s| s.saved.len() == 1);
    app.world_mut()
        .spawn((Persist, Position(-1, -1), Name::new("stale")));
    app.world_mut().insert_resource(Turn(99));
    app.init_resource::<VisiblePersisted>()
        .init_resource::<PositionsAdded>()
        .add_systems(
            Update,
            |persisted: Query<(), With<Persist>>, mut seen: ResMut<VisiblePersisted>| {
                seen.0.push(persisted.iter().count());
            },
        )
        .add_observer(|_: On<Add, Position>, mut added: ResMut<PositionsAdded>| {
            added.0 += 1;
        });
    app.world_mut()
        .write_message(LoadWorld::new("big").spread_over_frames(5));
    app.world_mut().write_message(SaveWorld::new("after"));
    pump_until(&mut app, "the load and the save after it", |s| {
        s.loaded.len() == 1 && s.saved.len() == 2
    });
    for _ in 0..3 {
        app.update();
    }
    let seen = app.world().resource::<Seen>();
    assert_eq!(seen.loaded.len(), 1, "WorldLoaded once");
    assert_eq!(seen.loaded[0].result.as_ref().unwrap().len(), 42);
    assert_eq!(
        *seen.saved[1].result.as_ref().unwrap(),
        42,
        "the save sent with the load captured the whole loaded world"
    );
    // Frame by frame: the old world (43), then nothing persisted for a while, then all 42.
    let frames = app.world().resource::<VisiblePersisted>().0.clone();
    let hidden = frames.iter().filter(|n| **n == 0).count();
    assert!(hidden >= 5, "spread over frames: {frames:?}");
    let first_hidden = frames.iter().position(|n| *n == 0).unwrap();
    let last_hidden = frames.iter().rposition(|n| *n == 0).unwrap();
    assert!(
        frames[..first_hidden].iter().all(|n| *n == 43),
        "{frames:?}"
    );
    assert!(
        frames[first_hidden..=last_hidden].iter().all(|n| *n == 0),
        "{frames:?}"
    );
    assert!(
        frames[last_hidden + 1..].iter().all(|n| *n == 42),
        "{frames:?}"
    );
    assert_eq!(app.world().resource::<PositionsAdded>().0, 42);
    // The loaded world is whole: references remapped, the resource restored.
    let world = app.world_mut();
    let follows = world.query::<&Follows>().single(world).unwrap().0;
    let mut names = world.query::<(Entity, &Name)>();
    let leader = names
        .iter(world)
        .find(|(_, n)| n.as_str() == "leader")
        .unwrap()
        .0;
    assert_eq!(follows, leader, "references point at the loaded leader");
    assert!(names.iter(world).all(|(_, n)| n.as_str() != "stale"));
    assert_eq!(world.resource::<Turn>(), &Turn(17));
    assert_eq!(persisted_positions(world).len(), 42);
}
