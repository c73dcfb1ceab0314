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
