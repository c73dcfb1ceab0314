//! Fuzzes the world-snapshot decoder, `snapshot::decode`, with a small registered type set:
//! a typed component (`Position`), reflected ones (`Health`, `Target` holding an entity,
//! `Name`, `ChildOf`), an allowlisted resource (`Score`) and a migration (`OldHealth` before
//! game version 2).
//!
//! The first input byte picks a mode; the rest is the material:
//! - `0`: the bytes as a snapshot, as they are;
//! - `1`/`2`: a valid RON / binary snapshot of a small world, damaged by the input read as
//!   `(offset u16, xor u8)` edits;
//! - `3`: a valid header (RON or binary by bit 7 of the first byte) followed by the bytes.
//!
//! Oracles: never a panic; an error is one of the typed snapshot errors; a snapshot that
//! decodes can be applied to a world (decoding promises that applying cannot fail).

#![no_main]

use std::sync::LazyLock;

use bevy::prelude::*;
use bevy_storage::StorageError;
use bevy_storage::snapshot::{
    Persist, SnapshotContext, SnapshotEncoding, SnapshotRegistry, SnapshotSettings, capture, decode,
};
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[derive(Component, Reflect, Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[reflect(Component)]
struct Position {
    x: i32,
    y: i32,
}

#[derive(Component, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Component)]
struct Health(u32);

#[derive(Component, Reflect, Clone, Debug, PartialEq)]
#[reflect(Component)]
struct Target(#[entities] Entity);

#[derive(Resource, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Resource)]
struct Score(u64);

/// The shape `Health` had before game version 2.
#[derive(Deserialize)]
struct OldHealth {
    hp: u16,
}

fn registry() -> SnapshotRegistry {
    let mut r = SnapshotRegistry::new();
    r.register_component::<Position>();
    r.migrate_component::<OldHealth, Health>("snapshot_decoder::OldHealth", 2, |old| {
        Health(u32::from(old.hp))
    });
    r
}

struct Fixture {
    context: SnapshotContext,
    /// Valid snapshots: RON, binary.
    valid: [Vec<u8>; 2],
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let mut app = App::new();
    app.insert_resource(registry());
    let world = app.world_mut();
    let a = world
        .spawn((
            Persist,
            Position { x: 1, y: -2 },
            Health(30),
            Name::new("a"),
        ))
        .id();
    let b = world.spawn((Persist, Target(a), Health(9))).id();
    world.spawn((Persist, Name::new("child"), ChildOf(b)));
    world.insert_resource(Score(77));
    let valid = [SnapshotEncoding::Ron, SnapshotEncoding::Binary].map(|encoding| {
        let settings = SnapshotSettings::default()
            .encoding(encoding)
            .game_version(2)
            .allow_resource::<Score>();
        capture(world, &settings, &registry())
            .unwrap()
            .encode()
            .unwrap()
    });
    let mut target = App::new();
    target.insert_resource(registry());
    target.insert_resource(SnapshotSettings::default().game_version(3));
    // Types the snapshot names must be registered where it is decoded.
    target.register_type::<Position>();
    target.register_type::<Health>();
    target.register_type::<Target>();
    target.register_type::<Score>();
    let context = SnapshotContext::from_world(target.world_mut());
    for v in &valid {
        decode(v, &context).expect("the valid snapshots decode");
    }
    Fixture { context, valid }
});

fn run(bytes: &[u8]) {
    let fixture = &*FIXTURE;
    match decode(bytes, &fixture.context) {
        Ok(decoded) => {
            let mut world = World::new();
            world.insert_resource(fixture.context.registry.clone());
            let _ = decoded.apply(&mut world, true);
        }
        Err(e) => assert!(
            matches!(
                e,
                StorageError::Snapshot(_)
                    | StorageError::NestingTooDeep { .. }
                    | StorageError::UnregisteredType { .. }
                    | StorageError::SnapshotFormatTooNew { .. }
                    | StorageError::SnapshotGameVersionTooNew { .. }
            ),
            "untyped error {e:?}"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode & 3 {
        0 => run(rest),
        m @ (1 | 2) => {
            let mut bytes = FIXTURE.valid[m as usize - 1].clone();
            for edit in rest.chunks_exact(3) {
                let at = u16::from_le_bytes([edit[0], edit[1]]) as usize % bytes.len();
                bytes[at] ^= edit[2];
            }
            run(&bytes);
        }
        _ => {
            let which = usize::from(mode & 0x80 != 0);
            let mut bytes = FIXTURE.valid[which][..16].to_vec();
            bytes.extend_from_slice(rest);
            run(&bytes);
        }
    }
});
