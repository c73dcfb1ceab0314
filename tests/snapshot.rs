//! World snapshots without the plugin: capture → encode → decode → apply, in fresh apps.

use bevy::ecs::entity::EntityHashMap;
use bevy::prelude::*;
use bevy_storage::StorageError;
use bevy_storage::snapshot::{
    Persist, SnapshotContext, SnapshotEncoding, SnapshotRegistry, SnapshotSettings, capture,
    decode, read_header,
};
use serde::{Deserialize, Serialize};

#[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[reflect(Component)]
struct Position {
    x: f32,
    y: f32,
}

#[derive(Component, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Component)]
struct Health(u32);

#[derive(Component, Reflect, Clone, Debug, PartialEq)]
#[reflect(Component)]
struct Target(#[entities] Entity);

#[derive(Component, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Component)]
struct Secret(String);

#[derive(Component, Clone, Debug, PartialEq)]
struct NotReflected;

#[derive(Resource, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Resource)]
struct Score(u64);

#[derive(Resource, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Resource)]
struct Unsaved(u64);

fn settings(encoding: SnapshotEncoding) -> SnapshotSettings {
    SnapshotSettings::default()
        .encoding(encoding)
        .allow_resource::<Score>()
        .deny_component::<Secret>()
}

fn registry() -> SnapshotRegistry {
    let mut r = SnapshotRegistry::new();
    r.register_component::<Position>();
    r
}

fn app() -> App {
    let mut app = App::new();
    app.insert_resource(registry());
    app
}

/// A small world: a player with a target, a parent with two children, a non-persisted
/// entity, a secret, a resource.
fn populate(world: &mut World) -> (Entity, Entity) {
    let goblin = world
        .spawn((
            Persist,
            Position { x: 5.0, y: 1.0 },
            Health(12),
            Name::new("goblin"),
        ))
        .id();
    let player = world
        .spawn((
            Persist,
            Position { x: 1.0, y: 2.0 },
            Health(30),
            Target(goblin),
            Secret("pw".into()),
        ))
        .id();
    let chest = world.spawn((Persist, Name::new("chest"))).id();
    for name in ["coin", "gem"] {
        world.spawn((Persist, Name::new(name), ChildOf(chest)));
    }
    world.spawn((Position { x: 99.0, y: 99.0 }, Name::new("camera")));
    world.insert_resource(Score(42));
    world.insert_resource(Unsaved(7));
    (player, goblin)
}

fn round_trip(encoding: SnapshotEncoding) -> (Vec<u8>, App, EntityHashMap<Entity>) {
    let mut source = app();
    populate(source.world_mut());
    let s = settings(encoding);
    let captured = capture(source.world_mut(), &s, &registry()).unwrap();
    assert_eq!(captured.entity_count(), 5);
    let bytes = captured.encode().unwrap();

    let mut target = app();
    target.world_mut().spawn((Persist, Name::new("stale")));
    target
        .world_mut()
        .spawn((Name::new("bystander"), Position { x: 0.0, y: 0.0 }));
    let context = SnapshotContext::from_world(target.world_mut());
    let decoded = decode(&bytes, &context).unwrap();
    let map = decoded.apply(target.world_mut(), true);
    (bytes, target, map)
}

fn find(world: &mut World, name: &str) -> Entity {
    let mut q = world.query::<(Entity, &Name)>();
    let found: Vec<Entity> = q
        .iter(world)
        .filter(|(_, n)| n.as_str() == name)
        .map(|(e, _)| e)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {name}");
    found[0]
}

fn check_loaded_world(world: &mut World, map: &EntityHashMap<Entity>) {
    assert_eq!(map.len(), 5);
    // The stale persisted entity is gone, the bystander is untouched.
    assert!(
        world
            .query::<&Name>()
            .iter(world)
            .all(|n| n.as_str() != "stale")
    );
    let bystander = find(world, "bystander");
    assert!(world.get::<Persist>(bystander).is_none());
    assert_eq!(
        world.get::<Position>(bystander),
        Some(&Position { x: 0.0, y: 0.0 })
    );
    // Components round-trip, typed and reflected; references point at the new entities.
    let goblin = find(world, "goblin");
    assert_eq!(world.get::<Health>(goblin), Some(&Health(12)));
    let mut players =
        world.query_filtered::<(Entity, &Position, &Health, &Target), With<Persist>>();
    let (player, pos, health, target) = players.single(world).unwrap();
    assert_eq!((pos, health), (&Position { x: 1.0, y: 2.0 }, &Health(30)));
    assert_eq!(target.0, goblin, "entity reference remapped");
    assert!(
        world.get::<Secret>(player).is_none(),
        "denied component left out"
    );
    // Hierarchy: children point at the new chest, in their saved order.
    let chest = find(world, "chest");
    let children: Vec<Entity> = world.get::<Children>(chest).unwrap().iter().collect();
    let names: Vec<&str> = children
        .iter()
        .map(|c| world.get::<Name>(*c).unwrap().as_str())
        .collect();
    assert_eq!(names, ["coin", "gem"]);
    for child in children {
        assert_eq!(world.get::<ChildOf>(child).unwrap().parent(), chest);
        assert!(world.get::<Persist>(child).is_some());
    }
    // Allowlisted resource restored, others not.
    assert_eq!(world.get_resource::<Score>(), Some(&Score(42)));
    assert!(world.get_resource::<Unsaved>().is_none());
}

#[test]
fn round_trip_in_a_fresh_app_ron() {
    let (bytes, mut app, map) = round_trip(SnapshotEncoding::Ron);
    check_loaded_world(app.world_mut(), &map);
    let text = String::from_utf8_lossy(&bytes[16..]);
    assert!(text.contains("goblin"), "RON is readable");
    assert_eq!(read_header(&bytes).unwrap().encoding, SnapshotEncoding::Ron);
}

#[test]
fn round_trip_in_a_fresh_app_binary() {
    let (bytes, mut app, map) = round_trip(SnapshotEncoding::Binary);
    check_loaded_world(app.world_mut(), &map);
    let (ron_bytes, _, _) = round_trip(SnapshotEncoding::Ron);
    assert!(
        bytes.len() < ron_bytes.len() / 2,
        "binary {} vs RON {}",
        bytes.len(),
        ron_bytes.len()
    );
}

#[test]
fn keep_existing_when_asked() {
    let mut source = app();
    populate(source.world_mut());
    let bytes = capture(
        source.world_mut(),
        &settings(SnapshotEncoding::Binary),
        &registry(),
    )
    .unwrap()
    .encode()
    .unwrap();
    let mut target = app();
    target.world_mut().spawn((Persist, Name::new("kept")));
    let context = SnapshotContext::from_world(target.world_mut());
    decode(&bytes, &context)
        .unwrap()
        .apply(target.world_mut(), false);
    find(target.world_mut(), "kept");
    find(target.world_mut(), "goblin");
}

/// Names every entity and component in a world, to compare before and after a failed load.
fn fingerprint(world: &mut World) -> Vec<String> {
    let mut out: Vec<String> = world
        .query::<(Entity, Option<&Name>, Option<&Position>, Option<&Persist>)>()
        .iter(world)
        .map(|(e, n, p, persist)| format!("{e:?} {n:?} {p:?} {}", persist.is_some()))
        .collect();
    out.sort();
    out.push(format!("{:?}", world.get_resource::<Score>()));
    out
}

fn expect_failure(bytes: &[u8], check: impl Fn(&StorageError)) {
    let mut target = app();
    target
        .world_mut()
        .spawn((Persist, Name::new("precious"), Position { x: 3.0, y: 4.0 }));
    target.world_mut().insert_resource(Score(1));
    let before = fingerprint(target.world_mut());
    let context = SnapshotContext::from_world(target.world_mut());
    match decode(bytes, &context) {
        Ok(d) => panic!("decoded a bad snapshot: {d:?}"),
        Err(e) => check(&e),
    }
    assert_eq!(
        fingerprint(target.world_mut()),
        before,
        "a failed load changes nothing"
    );
}

#[test]
fn damaged_snapshots_are_refused_and_change_nothing() {
    for encoding in [SnapshotEncoding::Ron, SnapshotEncoding::Binary] {
        let mut source = app();
        populate(source.world_mut());
        let bytes = capture(source.world_mut(), &settings(encoding), &registry())
            .unwrap()
            .encode()
            .unwrap();
        // Truncations at many points.
        for cut in [
            0,
            3,
            15,
            16,
            17,
            bytes.len() / 3,
            bytes.len() / 2,
            bytes.len() - 1,
        ] {
            expect_failure(&bytes[..cut], |e| {
                assert!(
                    matches!(
                        e,
                        StorageError::Snapshot(_) | StorageError::UnregisteredType { .. }
                    ),
                    "{encoding:?} cut {cut}: {e}"
                )
            });
        }
        // Garbage appended.
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"garbage");
        expect_failure(&longer, |e| {
            assert!(matches!(e, StorageError::Snapshot(_)), "{e}")
        });
        // A newer format.
        let mut newer = bytes.clone();
        newer[4] = 0xff;
        expect_failure(&newer, |e| {
            assert!(
                matches!(e, StorageError::SnapshotFormatTooNew { .. }),
                "{e}"
            )
        });
    }
}

#[test]
fn an_unregistered_type_is_named_and_changes_nothing() {
    let mut source = app();
    populate(source.world_mut());
    let bytes = capture(
        source.world_mut(),
        &settings(SnapshotEncoding::Ron),
        &registry(),
    )
    .unwrap()
    .encode()
    .unwrap();
    // Rename a reflected type in the RON text to one nobody registered.
    let text = String::from_utf8(bytes[16..].to_vec()).unwrap();
    let path = Health::type_path();
    assert!(text.contains(path));
    let mut renamed = bytes[..16].to_vec();
    renamed.extend_from_slice(text.replace(path, "old_game::Vitality").as_bytes());
    expect_failure(&renamed, |e| match e {
        StorageError::UnregisteredType { type_path } => assert_eq!(type_path, "old_game::Vitality"),
        other => panic!("{other}"),
    });
}

#[test]
fn newer_game_version_is_refused() {
    let mut source = app();
    populate(source.world_mut());
    let bytes = capture(
        source.world_mut(),
        &settings(SnapshotEncoding::Binary).game_version(5),
        &registry(),
    )
    .unwrap()
    .encode()
    .unwrap();
    expect_failure(&bytes, |e| {
        assert!(
            matches!(
                e,
                StorageError::SnapshotGameVersionTooNew {
                    found: 5,
                    current: 0
                }
            ),
            "{e}"
        )
    });
}

#[test]
fn a_value_of_the_wrong_shape_is_refused() {
    let mut source = app();
    source.world_mut().spawn((Persist, Health(3)));
    let bytes = capture(
        source.world_mut(),
        &settings(SnapshotEncoding::Ron),
        &registry(),
    )
    .unwrap()
    .encode()
    .unwrap();
    let text = String::from_utf8(bytes[16..].to_vec()).unwrap();
    assert!(text.contains("(3)"), "{text}");
    let mut broken = bytes[..16].to_vec();
    broken.extend_from_slice(text.replace("(3)", "(\"three\")").as_bytes());
    expect_failure(&broken, |e| {
        assert!(matches!(e, StorageError::Snapshot(_)), "{e}")
    });
}

/// Version 1 of the game stored `Position` as a tuple struct `OldPos(f32, f32)` and `Score`
/// as a `u32`; version 2 migrates both.
#[test]
fn migrations_upgrade_older_snapshots() {
    #[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[reflect(Component)]
    struct OldPos(f32, f32);

    #[derive(Resource, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[reflect(Resource)]
    struct OldScore(u32);

    let mut source = App::new();
    let mut old_registry = SnapshotRegistry::new();
    old_registry.register_component::<OldPos>();
    source.world_mut().spawn((Persist, OldPos(7.0, 8.0)));
    source.world_mut().insert_resource(OldScore(9));
    let old_settings = SnapshotSettings::default()
        .encoding(SnapshotEncoding::Binary)
        .game_version(1)
        .allow_resource::<OldScore>();
    let bytes = capture(source.world_mut(), &old_settings, &old_registry)
        .unwrap()
        .encode()
        .unwrap();

    let mut target = App::new();
    let mut registry = registry();
    registry
        .migrate_component::<(f32, f32), Position>(OldPos::type_path(), 2, |(x, y)| Position {
            x,
            y,
        })
        .migrate_resource::<u32, Score>(OldScore::type_path(), 2, |s| Score(u64::from(s) * 100));
    target.insert_resource(registry);
    target.insert_resource(SnapshotSettings::default().game_version(2));
    let context = SnapshotContext::from_world(target.world_mut());
    decode(&bytes, &context)
        .unwrap()
        .apply(target.world_mut(), true);
    let world = target.world_mut();
    let positions: Vec<Position> = world.query::<&Position>().iter(world).cloned().collect();
    assert_eq!(positions, [Position { x: 7.0, y: 8.0 }]);
    assert_eq!(world.resource::<Score>(), &Score(900));
    // The same snapshot in an app at version 1 (no migration applies) loads as it was.
    let mut v1 = App::new();
    v1.insert_resource(old_registry);
    v1.insert_resource(old_settings);
    let context = SnapshotContext::from_world(v1.world_mut());
    decode(&bytes, &context)
        .unwrap()
        .apply(v1.world_mut(), true);
    let w = v1.world_mut();
    assert_eq!(w.query::<&OldPos>().iter(w).count(), 1);
}

#[test]
fn unreflected_components_are_left_out() {
    let mut source = app();
    source.world_mut().spawn((Persist, NotReflected, Health(1)));
    let bytes = capture(
        source.world_mut(),
        &settings(SnapshotEncoding::Binary),
        &registry(),
    )
    .unwrap()
    .encode()
    .unwrap();
    let mut target = app();
    let context = SnapshotContext::from_world(target.world_mut());
    decode(&bytes, &context)
        .unwrap()
        .apply(target.world_mut(), true);
    let w = target.world_mut();
    assert_eq!(w.query::<&Health>().iter(w).count(), 1);
    assert_eq!(w.query::<&NotReflected>().iter(w).count(), 0);
}

#[test]
fn allowlisted_components_only() {
    let mut source = app();
    populate(source.world_mut());
    let s = settings(SnapshotEncoding::Ron).allow_component::<Health>();
    let bytes = capture(source.world_mut(), &s, &registry())
        .unwrap()
        .encode()
        .unwrap();
    let mut target = app();
    let context = SnapshotContext::from_world(target.world_mut());
    decode(&bytes, &context)
        .unwrap()
        .apply(target.world_mut(), true);
    let w = target.world_mut();
    assert_eq!(w.query::<&Health>().iter(w).count(), 2);
    assert_eq!(w.query::<&Position>().iter(w).count(), 0);
    assert_eq!(w.query::<&Name>().iter(w).count(), 0);
}

mod assets {
    use super::*;
    use bevy::asset::{AssetPlugin, AssetServer};

    #[derive(Asset, Reflect, Debug)]
    struct SpriteSheet {
        frames: u32,
    }

    #[derive(Component, Reflect, Debug)]
    #[reflect(Component)]
    struct Look(Handle<SpriteSheet>);

    fn asset_app() -> App {
        let mut app = App::new();
        app.add_plugins((MinimalPlugins, AssetPlugin::default()))
            .init_asset::<SpriteSheet>()
            .register_asset_reflect::<SpriteSheet>()
            .insert_resource(registry());
        app
    }

    fn saved_with_a_handle() -> Vec<u8> {
        let mut source = asset_app();
        let handle = source
            .world()
            .resource::<AssetServer>()
            .load::<SpriteSheet>("sprites/hero.ron");
        source.world_mut().spawn((Persist, Look(handle)));
        capture(
            source.world_mut(),
            &settings(SnapshotEncoding::Ron),
            &registry(),
        )
        .unwrap()
        .encode()
        .unwrap()
    }

    #[test]
    fn handles_round_trip_by_asset_path() {
        let bytes = saved_with_a_handle();
        assert!(String::from_utf8_lossy(&bytes).contains("sprites/hero.ron"));
        let mut target = asset_app();
        let context = SnapshotContext::from_world(target.world_mut());
        decode(&bytes, &context)
            .unwrap()
            .apply(target.world_mut(), true);
        let w = target.world_mut();
        let look = w.query::<&Look>().single(w).unwrap();
        assert_eq!(
            look.0.path().map(|p| p.to_string()).as_deref(),
            Some("sprites/hero.ron")
        );
    }

    #[test]
    fn handles_without_an_asset_server_are_a_clear_error() {
        let bytes = saved_with_a_handle();
        let mut target = App::new();
        target
            .register_type::<Look>()
            .register_type::<Handle<SpriteSheet>>();
        target.insert_resource(registry());
        target.world_mut().spawn((Persist, Name::new("untouched")));
        let context = SnapshotContext::from_world(target.world_mut());
        let err = decode(&bytes, &context).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("AssetServer") && message.contains("sprites/hero.ron"),
            "{message}"
        );
        let w = target.world_mut();
        assert_eq!(w.query::<&Name>().iter(w).count(), 1);
    }
}

mod slots {
    use super::*;
    use bevy_storage::clock::ManualClock;
    use bevy_storage::snapshot::{
        autosave_keys, list_slots, load_newest_autosave, store_autosave, store_snapshot,
    };
    use bevy_storage::{CustomMetadata, StorageConfig, Store};
    use std::time::Duration;

    fn snapshot_with_score(score: u64) -> Vec<u8> {
        let mut source = app();
        source.world_mut().spawn((Persist, Health(score as u32)));
        source.world_mut().insert_resource(Score(score));
        capture(
            source.world_mut(),
            &settings(SnapshotEncoding::Binary).game_version(3),
            &registry(),
        )
        .unwrap()
        .encode()
        .unwrap()
    }

    fn fields(level: &str, play_time: u64) -> CustomMetadata {
        [
            ("level".to_string(), serde_json::json!(level)),
            ("play_time_s".to_string(), serde_json::json!(play_time)),
        ]
        .into()
    }

    #[test]
    fn slots_list_with_metadata_without_decoding() {
        let clock = ManualClock::starting_now();
        let store = Store::open(StorageConfig::memory().clock(clock.clone())).unwrap();
        let s = settings(SnapshotEncoding::Binary);
        store_snapshot(
            &store,
            "slot:1",
            &snapshot_with_score(1),
            &s,
            fields("Crypt", 60),
        )
        .unwrap();
        clock.advance(Duration::from_secs(10));
        store_snapshot(
            &store,
            "slot:2",
            &snapshot_with_score(2),
            &s,
            fields("Tower", 600),
        )
        .unwrap();
        store
            .save("slot:notes", &"not a snapshot", &Default::default())
            .unwrap();
        let slots = list_slots(&store, "slot:").unwrap();
        assert_eq!(
            slots.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
            ["slot:2", "slot:1"]
        );
        assert_eq!(slots[0].game_version, 3);
        assert_eq!(slots[0].entity_count, 1);
        assert_eq!(slots[0].custom, fields("Tower", 600));
        assert!(slots[0].saved_at > slots[1].saved_at);
        assert!(slots[0].size > 0);
    }

    #[test]
    fn autosaves_rotate_and_fall_back_past_a_corrupt_one() {
        let store = Store::open(StorageConfig::memory()).unwrap();
        let s = settings(SnapshotEncoding::Binary);
        for score in 1..=5 {
            store_autosave(
                &store,
                "autosave/",
                3,
                &snapshot_with_score(score),
                &s,
                CustomMetadata::new(),
            )
            .unwrap();
        }
        let keys = autosave_keys(&store, "autosave/").unwrap();
        assert_eq!(
            keys,
            [
                "autosave/000000000003",
                "autosave/000000000004",
                "autosave/000000000005"
            ]
        );

        let mut target = app();
        target.insert_resource(SnapshotSettings::default().game_version(3));
        let context = SnapshotContext::from_world(target.world_mut());
        let found = load_newest_autosave(&store, "autosave/", &context)
            .unwrap()
            .unwrap();
        assert_eq!(found.key, "autosave/000000000005");
        assert!(found.skipped.is_empty());

        // The newest write is damaged: the previous one loads, with the failure reported.
        store
            .save_bytes(
                "autosave/000000000005",
                b"BSNP torn write",
                &Default::default(),
            )
            .unwrap();
        let found = load_newest_autosave(&store, "autosave/", &context)
            .unwrap()
            .unwrap();
        assert_eq!(found.key, "autosave/000000000004");
        assert_eq!(found.skipped.len(), 1);
        found.world.apply(target.world_mut(), true);
        assert_eq!(target.world().resource::<Score>(), &Score(4));

        // Nothing decodes: a clear error; nothing saved: None.
        for k in autosave_keys(&store, "autosave/").unwrap() {
            store.save_bytes(&k, b"junk", &Default::default()).unwrap();
        }
        assert!(load_newest_autosave(&store, "autosave/", &context).is_err());
        assert!(
            load_newest_autosave(&store, "nothing/", &context)
                .unwrap()
                .is_none()
        );
    }
}

mod relationships {
    use super::*;

    /// The game's own relationship, saved through reflection.
    #[derive(Component, Reflect, Debug)]
    #[reflect(Component)]
    #[relationship(relationship_target = Followers)]
    struct Following(#[entities] Entity);

    #[derive(Component, Reflect, Debug, Default)]
    #[reflect(Component)]
    #[relationship_target(relationship = Following)]
    struct Followers(Vec<Entity>);

    fn load_into_fresh_app(source: &mut App) -> App {
        let s = settings(SnapshotEncoding::Ron).deny_component::<Followers>();
        let bytes = capture(source.world_mut(), &s, &registry())
            .unwrap()
            .encode()
            .unwrap();
        let mut target = app();
        let context = SnapshotContext::from_world(target.world_mut());
        decode(&bytes, &context)
            .unwrap()
            .apply(target.world_mut(), true);
        target
    }

    #[test]
    fn custom_relationships_are_remapped_and_rebuilt() {
        let mut source = app();
        let leader = source
            .world_mut()
            .spawn((Persist, Name::new("leader")))
            .id();
        source
            .world_mut()
            .spawn((Persist, Name::new("fan"), Following(leader)));
        let mut target = load_into_fresh_app(&mut source);
        let w = target.world_mut();
        let leader = find(w, "leader");
        let fan = find(w, "fan");
        assert_eq!(w.get::<Following>(fan).unwrap().0, leader);
        assert_eq!(
            w.get::<Followers>(leader).unwrap().0,
            [fan],
            "the target side is rebuilt by the hooks"
        );
    }

    #[test]
    fn a_relationship_to_an_unsaved_entity_is_not_a_panic() {
        let mut source = app();
        let outsider = source.world_mut().spawn(Name::new("outsider")).id();
        source
            .world_mut()
            .spawn((Persist, Name::new("fan"), Following(outsider)));
        let mut target = load_into_fresh_app(&mut source);
        let w = target.world_mut();
        let fan = find(w, "fan");
        // Through reflection, before Bevy has seen `Followers`, the value is kept pointing at
        // the placeholder, with the relationship hooks skipped.
        if let Some(following) = w.get::<Following>(fan) {
            assert_eq!(following.0, Entity::PLACEHOLDER);
        }
        // Once both sides are known to the app, it is left out.
        let mut source = app();
        let outsider = source.world_mut().spawn(Name::new("outsider")).id();
        source
            .world_mut()
            .spawn((Persist, Name::new("fan"), Following(outsider)));
        let bytes = capture(
            source.world_mut(),
            &settings(SnapshotEncoding::Ron),
            &registry(),
        )
        .unwrap()
        .encode()
        .unwrap();
        let mut target = app();
        target.world_mut().register_component::<Followers>();
        target.world_mut().register_component::<Following>();
        let context = SnapshotContext::from_world(target.world_mut());
        decode(&bytes, &context)
            .unwrap()
            .apply(target.world_mut(), true);
        let w = target.world_mut();
        let fan = find(w, "fan");
        assert!(w.get::<Following>(fan).is_none());
        // Saved with its target, it loads whole (the other test); a typed ChildOf with an
        // unsaved parent is left out (tests/hostile.rs).
    }
}

/// Snapshot chains: a base and deltas, merged and applied in fresh apps.
mod chains {
    use std::collections::BTreeMap;

    use bevy::prelude::*;
    use bevy_storage::snapshot::{
        ChainCursor, ChainPolicy, Persist, RecordKind, SnapshotContext, SnapshotEncoding,
        SnapshotRegistry, SnapshotSettings, capture_base, capture_delta, compact_chain, decode,
        decode_chain, read_header, record_kind,
    };
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    /// Names an entity across apps.
    #[derive(Component, Reflect, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
    #[reflect(Component)]
    struct Tag(u32);

    /// Typed.
    #[derive(Component, Reflect, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
    #[reflect(Component)]
    struct Pos(i32);

    /// Reflected.
    #[derive(Component, Reflect, Clone, Copy, Debug, PartialEq, Default)]
    #[reflect(Component)]
    struct Hp(u32);

    /// Reflected, with an entity reference.
    #[derive(Component, Reflect, Clone, Copy, Debug, PartialEq)]
    #[reflect(Component)]
    struct Aim(#[entities] Entity);

    #[derive(Resource, Reflect, Clone, Copy, Debug, PartialEq, Default)]
    #[reflect(Resource)]
    struct Clock(u64);

    fn settings(encoding: SnapshotEncoding) -> SnapshotSettings {
        SnapshotSettings::default()
            .encoding(encoding)
            .allow_resource::<Clock>()
    }

    fn app() -> App {
        let mut app = App::new();
        let mut registry = SnapshotRegistry::new();
        registry
            .register_component::<Tag>()
            .register_component::<Pos>();
        app.insert_resource(registry);
        app
    }

    #[derive(Debug, PartialEq)]
    struct Row {
        pos: Option<i32>,
        hp: Option<u32>,
        aim: Option<Option<u32>>,
        parent: Option<u32>,
        children: Vec<u32>,
    }

    type Dump = (BTreeMap<u32, Row>, Option<u64>);

    /// The persisted part of a world by tag: what a load must reproduce.
    fn dump(world: &mut World) -> Dump {
        let tag_of = |world: &World, e: Entity| -> Option<u32> {
            let e = world.get_entity(e).ok()?;
            e.contains::<Persist>()
                .then(|| e.get::<Tag>().map(|t| t.0))?
        };
        let entities: Vec<Entity> = world
            .query_filtered::<Entity, With<Persist>>()
            .iter(world)
            .collect();
        let mut rows = BTreeMap::new();
        for e in entities {
            let r = world.entity(e);
            let row = Row {
                pos: r.get::<Pos>().map(|p| p.0),
                hp: r.get::<Hp>().map(|h| h.0),
                aim: r.get::<Aim>().map(|a| tag_of(world, a.0)),
                parent: r.get::<ChildOf>().and_then(|c| tag_of(world, c.parent())),
                children: r
                    .get::<Children>()
                    .map(|c| c.iter().filter_map(|c| tag_of(world, c)).collect())
                    .unwrap_or_default(),
            };
            let tag = r.get::<Tag>().expect("every test entity is tagged").0;
            assert!(rows.insert(tag, row).is_none());
        }
        (rows, world.get_resource::<Clock>().map(|c| c.0))
    }

    /// Loads `records` (base first) into a fresh app. Checks on the way that the chain
    /// compacted into one whole snapshot (`compact_chain`, what a compacting autosave stores)
    /// loads the same world.
    fn load(records: &[Vec<u8>]) -> Dump {
        let mut target = app();
        let context = SnapshotContext::from_world(target.world_mut());
        let decoded = decode_chain(records, &context).unwrap();
        decoded.apply(target.world_mut(), true);
        let loaded = dump(target.world_mut());

        let encoding = read_header(&records[0]).unwrap().encoding;
        let compacted = compact_chain(records, &context, &settings(encoding)).unwrap();
        assert_eq!(record_kind(&compacted), Some(RecordKind::Full));
        let mut target = app();
        decode(&compacted, &context)
            .unwrap()
            .apply(target.world_mut(), true);
        assert_eq!(
            dump(target.world_mut()),
            loaded,
            "the compacted chain loads as the chain"
        );
        loaded
    }

    struct Chain {
        records: Vec<Vec<u8>>,
        cursor: ChainCursor,
        settings: SnapshotSettings,
    }

    impl Chain {
        fn start(app: &mut App, encoding: SnapshotEncoding) -> Self {
            let settings = settings(encoding);
            let registry = app.world().resource::<SnapshotRegistry>().clone();
            let (captured, start) = capture_base(app.world_mut(), &settings, &registry).unwrap();
            let bytes = captured.encode().unwrap();
            Self {
                cursor: start.cursor(&bytes),
                records: vec![bytes],
                settings,
            }
        }

        fn delta(&mut self, app: &mut App) -> usize {
            let registry = app.world().resource::<SnapshotRegistry>().clone();
            let captured =
                capture_delta(app.world_mut(), &self.settings, &registry, &self.cursor).unwrap();
            let rows = captured.entity_count();
            let step = captured.step();
            let bytes = captured.encode().unwrap();
            self.cursor = self.cursor.advance(step, &bytes);
            self.records.push(bytes);
            rows
        }
    }

    fn spawn(world: &mut World, tag: u32) -> Entity {
        world.spawn((Persist, Tag(tag), Pos(tag as i32))).id()
    }

    #[test]
    fn a_chain_round_trips_spawns_changes_removals_despawns_reparents_and_resources() {
        for encoding in [SnapshotEncoding::Ron, SnapshotEncoding::Binary] {
            let mut app = app();
            let w = app.world_mut();
            let root = spawn(w, 0);
            let a = spawn(w, 1);
            let b = spawn(w, 2);
            let c = spawn(w, 3);
            w.entity_mut(a).insert((ChildOf(root), Hp(10)));
            w.entity_mut(b).insert((ChildOf(root), Aim(c)));
            w.insert_resource(Clock(1));
            for i in 10..200 {
                spawn(w, i); // untouched bulk
            }
            let mut chain = Chain::start(&mut app, encoding);
            assert_eq!(load(&chain.records), dump(app.world_mut()));

            // Nothing changed: an empty delta.
            assert_eq!(chain.delta(&mut app), 0);
            assert_eq!(load(&chain.records), dump(app.world_mut()));

            // Change, add, remove a component; spawn with a reference to it; a resource.
            let w = app.world_mut();
            w.get_mut::<Pos>(a).unwrap().0 = 100;
            w.entity_mut(c).insert(Hp(5));
            w.entity_mut(a).remove::<Hp>();
            let d = spawn(w, 4);
            w.entity_mut(c).insert(Aim(d));
            w.resource_mut::<Clock>().0 = 2;
            let rows = chain.delta(&mut app);
            assert!(rows <= 3, "only what changed: {rows} rows");
            assert_eq!(load(&chain.records), dump(app.world_mut()));

            // Reparent (to the end of another parent's children), despawn one with a
            // reference to it kept elsewhere, unmark one.
            let w = app.world_mut();
            w.entity_mut(a).insert(ChildOf(c));
            w.entity_mut(d).insert(ChildOf(c));
            w.entity_mut(b).insert(ChildOf(c));
            w.despawn(d);
            let ten = spawn_lookup(w, 10);
            w.entity_mut(ten).remove::<Persist>();
            chain.delta(&mut app);
            assert_eq!(load(&chain.records), dump(app.world_mut()));

            // Marked again: saved whole; a subtree despawned with its parent.
            let w = app.world_mut();
            let ten = spawn_lookup(w, 10);
            w.entity_mut(ten).insert(Persist);
            w.entity_mut(ten).insert(Pos(-10));
            w.despawn(c);
            chain.delta(&mut app);
            assert_eq!(load(&chain.records), dump(app.world_mut()));

            // Every prefix of the chain is a state the world was in (checked above), and a
            // record left out of the middle is refused.
            let mut gap = chain.records.clone();
            gap.remove(2);
            let mut target = app_for_errors();
            let context = SnapshotContext::from_world(target.world_mut());
            let err = decode_chain(&gap, &context).unwrap_err().to_string();
            assert!(err.contains("another base"), "{err}");
        }
    }

    fn app_for_errors() -> App {
        app()
    }

    fn spawn_lookup(world: &mut World, tag: u32) -> Entity {
        world
            .query::<(Entity, &Tag)>()
            .iter(world)
            .find(|(_, t)| t.0 == tag)
            .unwrap()
            .0
    }

    #[test]
    fn a_delta_of_one_percent_holds_one_percent() {
        let mut app = app();
        for i in 0..10_000 {
            spawn(app.world_mut(), i);
        }
        let mut chain = Chain::start(&mut app, SnapshotEncoding::Binary);
        let w = app.world_mut();
        for (n, mut pos) in w.query::<&mut Pos>().iter_mut(w).enumerate() {
            if n % 100 == 0 {
                pos.0 += 1;
            }
        }
        assert_eq!(chain.delta(&mut app), 100);
        assert!(chain.records[1].len() * 50 < chain.records[0].len());
        assert_eq!(load(&chain.records), dump(app.world_mut()));
    }

    #[test]
    fn the_policy_asks_for_a_full_snapshot() {
        let mut app = app();
        for i in 0..100 {
            spawn(app.world_mut(), i);
        }
        let mut chain = Chain::start(&mut app, SnapshotEncoding::Binary);
        let policy = ChainPolicy::default().max_deltas(2);
        assert!(!chain.cursor.wants_full(&policy, app.world()));
        chain.delta(&mut app);
        assert!(!chain.cursor.wants_full(&policy, app.world()));
        chain.delta(&mut app);
        assert!(chain.cursor.wants_full(&policy, app.world()), "two deltas");
        // Big deltas: more than 50% of the base.
        let mut chain = Chain::start(&mut app, SnapshotEncoding::Binary);
        let w = app.world_mut();
        for mut pos in w.query::<&mut Pos>().iter_mut(w) {
            pos.0 += 1;
        }
        chain.delta(&mut app);
        assert!(
            chain
                .cursor
                .wants_full(&ChainPolicy::default(), app.world())
        );
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Spawn(Option<u8>),
        SetPos(u8, i32),
        SetHp(u8, u32),
        RemoveHp(u8),
        RemovePos(u8),
        Despawn(u8),
        Reparent(u8, Option<u8>),
        Aim(u8, u8),
        Unmark(u8),
        Mark(u8),
        Clock(u64),
        Save,
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            3 => proptest::option::of(any::<u8>()).prop_map(Edit::Spawn),
            3 => (any::<u8>(), -50i32..50).prop_map(|(e, v)| Edit::SetPos(e, v)),
            2 => (any::<u8>(), 0u32..50).prop_map(|(e, v)| Edit::SetHp(e, v)),
            1 => any::<u8>().prop_map(Edit::RemoveHp),
            1 => any::<u8>().prop_map(Edit::RemovePos),
            1 => any::<u8>().prop_map(Edit::Despawn),
            2 => (any::<u8>(), proptest::option::of(any::<u8>()))
                .prop_map(|(e, p)| Edit::Reparent(e, p)),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(e, t)| Edit::Aim(e, t)),
            1 => any::<u8>().prop_map(Edit::Unmark),
            1 => any::<u8>().prop_map(Edit::Mark),
            1 => any::<u64>().prop_map(Edit::Clock),
            2 => Just(Edit::Save),
        ]
    }

    /// The live tagged entities, by tag.
    fn tagged(world: &mut World) -> Vec<(u32, Entity)> {
        let mut v: Vec<(u32, Entity)> = world
            .query::<(Entity, &Tag)>()
            .iter(world)
            .map(|(e, t)| (t.0, e))
            .collect();
        v.sort();
        v
    }

    fn run_edit(world: &mut World, edit: &Edit, next_tag: &mut u32) {
        let live = tagged(world);
        let pick = |i: u8| (!live.is_empty()).then(|| live[i as usize % live.len()]);
        match *edit {
            Edit::Spawn(parent) => {
                let e = spawn(world, *next_tag);
                *next_tag += 1;
                if let Some((_, p)) = parent.and_then(pick) {
                    world.entity_mut(e).insert(ChildOf(p));
                }
            }
            Edit::SetPos(i, v) => {
                if let Some((_, e)) = pick(i) {
                    world.entity_mut(e).insert(Pos(v));
                }
            }
            Edit::SetHp(i, v) => {
                if let Some((_, e)) = pick(i) {
                    world.entity_mut(e).insert(Hp(v));
                }
            }
            Edit::RemoveHp(i) => {
                if let Some((_, e)) = pick(i) {
                    world.entity_mut(e).remove::<Hp>();
                }
            }
            Edit::RemovePos(i) => {
                if let Some((_, e)) = pick(i) {
                    world.entity_mut(e).remove::<Pos>();
                }
            }
            Edit::Despawn(i) => {
                if let Some((_, e)) = pick(i) {
                    world.despawn(e);
                }
            }
            Edit::Reparent(i, p) => {
                let Some((tag, e)) = pick(i) else { return };
                match p.and_then(pick) {
                    // Parents have smaller tags: no cycles.
                    Some((ptag, p)) if ptag < tag => {
                        world.entity_mut(e).insert(ChildOf(p));
                    }
                    _ => {
                        world.entity_mut(e).remove::<ChildOf>();
                    }
                }
            }
            Edit::Aim(i, t) => {
                if let (Some((_, e)), Some((_, t))) = (pick(i), pick(t)) {
                    world.entity_mut(e).insert(Aim(t));
                }
            }
            Edit::Unmark(i) => {
                if let Some((_, e)) = pick(i) {
                    world.entity_mut(e).remove::<Persist>();
                }
            }
            Edit::Mark(i) => {
                if let Some((_, e)) = pick(i) {
                    world.entity_mut(e).insert(Persist);
                }
            }
            Edit::Clock(v) => world.insert_resource(Clock(v)),
            Edit::Save => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_edits_with_deltas_between_load_back_as_the_live_world(
            edits in proptest::collection::vec(edit(), 1..60),
            binary in any::<bool>(),
        ) {
            let encoding = if binary { SnapshotEncoding::Binary } else { SnapshotEncoding::Ron };
            let mut app = app();
            let mut next_tag = 0;
            for _ in 0..5 {
                spawn(app.world_mut(), next_tag);
                next_tag += 1;
            }
            let mut chain = Chain::start(&mut app, encoding);
            for edit in &edits {
                run_edit(app.world_mut(), edit, &mut next_tag);
                if matches!(edit, Edit::Save) {
                    chain.delta(&mut app);
                    prop_assert_eq!(load(&chain.records), dump(app.world_mut()));
                }
            }
            chain.delta(&mut app);
            prop_assert_eq!(load(&chain.records), dump(app.world_mut()));
        }
    }
}

/// `DecodedWorld::spread`: a load applied a slice per frame.
mod spread {
    use super::*;
    use bevy::ecs::entity_disabling::Disabled;
    use bevy_storage::snapshot::Loading;

    #[derive(Resource, Default)]
    struct Added(Vec<Entity>);

    fn saved() -> Vec<u8> {
        let mut source = app();
        populate(source.world_mut());
        capture(
            source.world_mut(),
            &settings(SnapshotEncoding::Binary),
            &registry(),
        )
        .unwrap()
        .encode()
        .unwrap()
    }

    fn visible_persisted(world: &mut World) -> usize {
        world
            .query_filtered::<Entity, With<Persist>>()
            .iter(world)
            .count()
    }

    #[test]
    fn a_game_query_sees_the_old_world_then_nothing_then_the_whole_new_one() {
        let bytes = saved();
        let mut target = app();
        target.world_mut().spawn((Persist, Name::new("stale")));
        target
            .world_mut()
            .spawn((Name::new("bystander"), Position { x: 0.0, y: 0.0 }));
        target.init_resource::<Added>();
        target.add_observer(|add: On<Add, Position>, mut added: ResMut<Added>| {
            added.0.push(add.entity);
        });
        let context = SnapshotContext::from_world(target.world_mut());
        let mut spread = decode(&bytes, &context).unwrap().spread(true, 1);
        let world = target.world_mut();
        assert_eq!(
            visible_persisted(world),
            1,
            "the old world until the first step"
        );
        let mut steps = 0;
        let map = loop {
            let done = spread.step(world);
            steps += 1;
            if let Some(map) = done {
                break map;
            }
            assert!(!spread.is_done());
            // Mid-load, a game query sees no persisted entity, old or new, nor any saved
            // component or resource of the load; the bystander stays.
            assert_eq!(visible_persisted(world), 0, "step {steps}");
            assert_eq!(world.query::<&Health>().iter(world).count(), 0);
            assert_eq!(world.query::<&ChildOf>().iter(world).count(), 0);
            assert_eq!(world.query::<&Position>().iter(world).count(), 1);
            assert!(world.get_resource::<Score>().is_none(), "resources go last");
            find(world, "bystander");
        };
        assert!(spread.is_done());
        assert!(steps > 10, "one entity or value a step: {steps} steps");
        check_loaded_world(world, &map);
        assert_eq!(visible_persisted(world), 5);
        assert_eq!(
            world
                .query_filtered::<Entity, With<Disabled>>()
                .iter(world)
                .count(),
            0,
            "nothing is left disabled"
        );
        // Observers ran for each loaded entity with a `Position` (the player and the goblin).
        let mut added = world.resource::<Added>().0.clone();
        added.sort();
        let mut expected = vec![find(world, "goblin")];
        let mut players = world.query_filtered::<Entity, With<Target>>();
        expected.push(players.single(world).unwrap());
        expected.sort();
        assert_eq!(added, expected);
        // A step after the last one does nothing.
        assert!(spread.step(world).unwrap().is_empty());
        assert_eq!(visible_persisted(world), 5);
    }

    #[test]
    fn a_large_budget_loads_in_two_steps_and_keeps_existing_when_asked() {
        let bytes = saved();
        let mut target = app();
        target.world_mut().spawn((Persist, Name::new("kept")));
        let context = SnapshotContext::from_world(target.world_mut());
        let mut spread = decode(&bytes, &context).unwrap().spread(false, usize::MAX);
        let world = target.world_mut();
        let map = spread
            .step(world)
            .expect("one step without anything to hide");
        assert_eq!(map.len(), 5);
        find(world, "kept");
        find(world, "goblin");
        assert_eq!(visible_persisted(world), 6);

        // With `Loading` registered as disabling, as `SnapshotPlugin` does.
        let mut target = app();
        target.world_mut().register_disabling_component::<Loading>();
        target.world_mut().spawn((Persist, Name::new("stale")));
        target
            .world_mut()
            .spawn((Name::new("bystander"), Position { x: 0.0, y: 0.0 }));
        let context = SnapshotContext::from_world(target.world_mut());
        let mut spread = decode(&bytes, &context).unwrap().spread(true, usize::MAX);
        let world = target.world_mut();
        assert!(
            spread.step(world).is_none(),
            "the first step hides the old world"
        );
        assert_eq!(visible_persisted(world), 0);
        let hidden = world
            .query_filtered::<Entity, With<Loading>>()
            .iter(world)
            .count();
        assert_eq!(hidden, 1, "behind `Loading`");
        let map = spread.step(world).expect("the rest in the second");
        check_loaded_world(world, &map);
        let hidden = world
            .query_filtered::<Entity, With<Loading>>()
            .iter(world)
            .count();
        assert_eq!(hidden, 0);
    }
}

/// A hand-made snapshot whose typed column repeats rows out of order and whose component comes
/// in two columns: the combined insert keeps the last value of each entity, as inserting the
/// values in order would.
#[test]
fn repeated_rows_and_columns_keep_the_last_value() {
    use bevy::reflect::TypePath;
    let mut source = app();
    let entities: Vec<u64> = (0..3)
        .map(|_| source.world_mut().spawn(Persist).id().to_bits())
        .collect();
    let header = capture(
        source.world_mut(),
        &settings(SnapshotEncoding::Ron),
        &registry(),
    )
    .unwrap()
    .encode()
    .unwrap()[..16]
        .to_vec();
    let p = |v: f32| Position { x: v, y: v };
    let path = Position::type_path().to_string();
    let columns = vec![
        (path.clone(), vec![1u32, 0, 1], vec![p(1.0), p(2.0), p(3.0)]),
        (path, vec![0u32], vec![p(9.0)]),
    ];
    let resources: Vec<(String, u8)> = Vec::new();
    let body = ron::to_string(&(entities, columns, resources)).unwrap();
    let bytes = [header, body.into_bytes()].concat();

    let mut target = app();
    let context = SnapshotContext::from_world(target.world_mut());
    let map = decode(&bytes, &context)
        .unwrap()
        .apply(target.world_mut(), true);
    let world = target.world_mut();
    assert_eq!(map.len(), 3);
    let mut positions: Vec<Option<f32>> = map
        .iter()
        .map(|(saved, live)| (saved.to_bits(), world.get::<Position>(*live).map(|p| p.x)))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_values()
        .collect();
    positions.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // Row 0: 2 then 9 (the second column); row 1: 1 then 3; row 2: none.
    assert_eq!(positions, [None, Some(3.0), Some(9.0)]);
    let persisted = world
        .query_filtered::<Entity, With<Persist>>()
        .iter(world)
        .count();
    assert_eq!(persisted, 3);
}

/// Loads large enough that the map from saved to live entities is built on another thread
/// while the components go in (every entity has the same typed components: the combined
/// insert's dense path). Every reference is mapped all the same, in one frame and spread,
/// and every value is dropped once: moved into the world, or dropped with the load.
mod large_loads {
    use super::*;
    use std::cell::Cell;

    /// A typed component holding a reference: mapping it waits for the map.
    #[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[reflect(Component)]
    struct Follows(#[entities] Entity);

    /// A typed zero-sized component.
    #[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[reflect(Component)]
    struct Flag;

    thread_local! {
        /// `Counted` values alive on this thread (each test runs on a thread of its own).
        static ALIVE: Cell<i64> = const { Cell::new(0) };
    }

    /// A value with drop glue that counts itself: made by `new`, `clone` and decoding.
    #[derive(Debug, PartialEq, Reflect)]
    struct Counted(String);

    impl Counted {
        fn new(text: String) -> Self {
            ALIVE.set(ALIVE.get() + 1);
            Self(text)
        }
    }

    impl Clone for Counted {
        fn clone(&self) -> Self {
            Self::new(self.0.clone())
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            ALIVE.set(ALIVE.get() - 1);
        }
    }

    impl Serialize for Counted {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.0.serialize(s)
        }
    }

    impl<'de> Deserialize<'de> for Counted {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            String::deserialize(d).map(Counted::new)
        }
    }

    #[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[reflect(Component)]
    struct Label(Counted);

    const ENTITIES: usize = 20_000;

    fn typed_app() -> App {
        let mut app = App::new();
        let mut registry = SnapshotRegistry::new();
        registry
            .register_component::<Position>()
            .register_component::<Follows>()
            .register_component::<Flag>()
            .register_component::<Label>();
        app.insert_resource(registry);
        app
    }

    /// Entity `i` is at `x = i`, has a `Flag` and a `Label`, and (`with_references`) follows
    /// entity `i + 1` (the last one the first).
    fn saved(with_references: bool) -> (Vec<u8>, Vec<Entity>) {
        let mut source = typed_app();
        let world = source.world_mut();
        let entities: Vec<Entity> = world.spawn_batch((0..ENTITIES).map(|_| Persist)).collect();
        for (i, entity) in entities.iter().enumerate() {
            let position = Position {
                x: i as f32,
                y: 0.0,
            };
            let label = Label(Counted::new(format!("unit {i}")));
            let mut entity = world.entity_mut(*entity);
            entity.insert((position, Flag, label));
            if with_references {
                entity.insert(Follows(entities[(i + 1) % ENTITIES]));
            }
        }
        let registry = world.resource::<SnapshotRegistry>().clone();
        let settings = SnapshotSettings::default().encoding(SnapshotEncoding::Binary);
        let bytes = capture(world, &settings, &registry)
            .unwrap()
            .encode()
            .unwrap();
        (bytes, entities)
    }

    /// The loaded world: the live entity at each `x` (`None` where none is).
    fn by_position(world: &mut World) -> Vec<Option<Entity>> {
        let mut at = vec![None; ENTITIES];
        for (entity, position) in world
            .query_filtered::<(Entity, &Position), With<Persist>>()
            .iter(world)
        {
            let slot = &mut at[position.x as usize];
            assert!(slot.is_none(), "two entities at x = {}", position.x);
            *slot = Some(entity);
        }
        at
    }

    /// The returned map sends each saved id to the live entity at its position, which has
    /// its label and flag, and (`with_references`) follows the live entity saved after it.
    fn check(
        world: &mut World,
        map: &EntityHashMap<Entity>,
        saved: &[Entity],
        gone: &[usize],
        with_references: bool,
    ) {
        let at = by_position(world);
        assert_eq!(map.len(), ENTITIES);
        for (i, live) in at.iter().enumerate() {
            if gone.contains(&i) {
                assert!(live.is_none(), "entity {i} was despawned by an observer");
                continue;
            }
            let live = live.unwrap_or_else(|| panic!("entity {i} is loaded"));
            assert_eq!(map[&saved[i]], live, "the map of entity {i}");
            assert_eq!(world.get::<Label>(live).unwrap().0.0, format!("unit {i}"));
            assert!(world.get::<Flag>(live).is_some());
            if with_references {
                let next = (i + 1) % ENTITIES;
                assert_eq!(
                    world.get::<Follows>(live).unwrap().0,
                    map[&saved[next]],
                    "entity {i} follows entity {next}'s live entity"
                );
            }
        }
    }

    /// The `Label`s in `world`.
    fn labels(world: &mut World) -> i64 {
        world.query::<&Label>().iter(world).count() as i64
    }

    #[test]
    fn references_are_mapped_in_one_frame_and_spread() {
        let (bytes, saved) = saved(true);
        let mut target = typed_app();
        target.world_mut().spawn((Persist, Name::new("stale")));
        let context = SnapshotContext::from_world(target.world_mut());
        let map = decode(&bytes, &context)
            .unwrap()
            .apply(target.world_mut(), true);
        check(target.world_mut(), &map, &saved, &[], true);

        // Again, over frames, replacing the load above.
        let mut spread = decode(&bytes, &context).unwrap().spread(true, 3_000);
        let map = loop {
            if let Some(map) = spread.step(target.world_mut()) {
                break map;
            }
        };
        check(target.world_mut(), &map, &saved, &[], true);
        let world = target.world_mut();
        let persisted = world
            .query_filtered::<(), With<Persist>>()
            .iter(world)
            .count();
        assert_eq!(persisted, ENTITIES, "the first load was replaced");
    }

    #[test]
    fn without_references_the_map_is_waited_for_when_the_load_returns_it() {
        let (bytes, saved) = saved(false);
        let mut target = typed_app();
        let context = SnapshotContext::from_world(target.world_mut());
        let map = decode(&bytes, &context)
            .unwrap()
            .apply(target.world_mut(), true);
        check(target.world_mut(), &map, &saved, &[], false);
    }

    #[test]
    fn an_observer_that_despawns_a_later_entity_mid_load_is_not_a_panic() {
        let (bytes, saved) = saved(true);
        let mut target = typed_app();
        // When entity 0 gets its components, it despawns the one it follows (entity 1, not
        // filled in yet): the load goes on without it.
        target.add_observer(
            |add: On<Add, Position>,
             query: Query<(&Position, &Follows)>,
             mut commands: Commands| {
                if let Ok((position, follows)) = query.get(add.entity)
                    && position.x == 0.0
                {
                    commands.entity(follows.0).despawn();
                }
            },
        );
        let context = SnapshotContext::from_world(target.world_mut());
        let map = decode(&bytes, &context)
            .unwrap()
            .apply(target.world_mut(), true);
        check(target.world_mut(), &map, &saved, &[1], true);
        // Every decoded label is in the world or was dropped with the load (entity 1's
        // never went in): none leaked, none dropped twice.
        assert_eq!(labels(target.world_mut()), ENTITIES as i64 - 1);
        assert_eq!(
            ALIVE.get(),
            ENTITIES as i64 - 1,
            "labels alive = labels in the world"
        );
        drop(target);
        assert_eq!(ALIVE.get(), 0);
    }

    /// A game's observer that panics while the load inserts components: the process aborts
    /// with a message. Bevy 0.19's `insert_by_ids` cannot be used again for those components
    /// after a panic inside it, and a caller that caught the panic and stepped on (as the
    /// plugin catches a request's panics) crashed with a segmentation fault at the next insert
    /// of the same components. The load runs in a child process (this test, run again).
    #[test]
    fn a_panic_in_an_observer_mid_load_aborts_instead_of_corrupting_memory() {
        const CHILD: &str = "BEVY_STORAGE_TEST_PANIC_MID_LOAD";
        if std::env::var_os(CHILD).is_some() {
            let (bytes, _) = saved(true);
            let mut target = typed_app();
            // The loaded entities are hidden until the last step: the observer allows that.
            type Hidden = bevy::ecs::entity_disabling::Disabled;
            target.add_observer(
                |add: On<Add, Position>, query: Query<&Position, Allow<Hidden>>| {
                    if query.get(add.entity).is_ok_and(|p| p.x == 5.0) {
                        panic!("a game's observer fails");
                    }
                },
            );
            let context = SnapshotContext::from_world(target.world_mut());
            let mut spread = decode(&bytes, &context).unwrap().spread(false, 3_000);
            let world = target.world_mut();
            for _ in 0..100 {
                let step =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| spread.step(world)));
                if let Ok(Some(_)) = step {
                    break;
                }
            }
            // Then the same components go in again, as the next load would.
            let _ = decode(&bytes, &context).unwrap().apply(world, true);
            println!("the child went on after the panic");
            return;
        }
        let name =
            "large_loads::a_panic_in_an_observer_mid_load_aborts_instead_of_corrupting_memory";
        let exe = std::env::current_exe().unwrap();
        let test_args = [name, "--exact", "--nocapture", "--test-threads=1"];
        // Through a shell that turns core dumps off: the abort is expected, its core file not.
        #[cfg(unix)]
        let mut command = {
            let mut command = std::process::Command::new("sh");
            command
                .args(["-c", "ulimit -c 0; exec \"$0\" \"$@\""])
                .arg(&exe)
                .args(test_args);
            command
        };
        #[cfg(not(unix))]
        let mut command = {
            let mut command = std::process::Command::new(&exe);
            command.args(test_args);
            command
        };
        let child = command.env(CHILD, "1").output().unwrap();
        let stderr = String::from_utf8_lossy(&child.stderr);
        let stdout = String::from_utf8_lossy(&child.stdout);
        assert!(!stdout.contains("the child went on"), "{stdout}");
        assert!(stderr.contains("a game's observer fails"), "{stderr}");
        assert!(
            stderr.contains("the process aborts rather than corrupt memory"),
            "{stderr}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                child.status.signal(),
                Some(6),
                "SIGABRT: {:?}",
                child.status
            );
        }
    }

    #[test]
    fn the_entity_mapper_keeps_its_auto_traits() {
        fn check<T: Send + Sync + std::panic::UnwindSafe + std::panic::RefUnwindSafe>() {}
        check::<bevy_storage::snapshot::SnapshotEntityMapper<'static>>();
    }
}
