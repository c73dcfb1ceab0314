//! Step 4, on the main thread: put a decoded snapshot into the world.

use bevy::ecs::entity::EntityHashMap;
use bevy::ecs::reflect::AppTypeRegistry;
use bevy::prelude::*;

use super::Persist;
use super::columns::{LoadedColumn, LoadedResource, SnapshotEntityMapper};
use super::header::SnapshotHeader;

/// A snapshot decoded and checked on a worker thread, ready for [`apply`](Self::apply).
pub struct DecodedWorld {
    pub(crate) header: SnapshotHeader,
    pub(crate) entities: Vec<Entity>,
    pub(crate) columns: Vec<(String, Vec<u32>, Box<dyn LoadedColumn>)>,
    pub(crate) resources: Vec<(String, Box<dyn LoadedResource>)>,
    pub(crate) registry: AppTypeRegistry,
}

impl std::fmt::Debug for DecodedWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodedWorld")
            .field("header", &self.header)
            .field("entities", &self.entities.len())
            .field(
                "columns",
                &self.columns.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .field("resources", &self.resources.len())
            .finish()
    }
}

impl DecodedWorld {
    /// The snapshot's header.
    pub fn header(&self) -> SnapshotHeader {
        self.header
    }

    /// Writes the snapshot into `world`: despawns the entities marked [`Persist`] now (when
    /// `despawn_existing`), spawns the saved ones with their components, replaces the saved
    /// resources, and maps every entity reference. Returns the map from saved entity ids to
    /// the live entities. Everything was checked when decoding, so this does not fail.
    pub fn apply(self, world: &mut World, despawn_existing: bool) -> EntityHashMap<Entity> {
        if despawn_existing {
            let mut query = world.query_filtered::<Entity, With<Persist>>();
            let existing: Vec<Entity> = query.iter(world).collect();
            for entity in existing {
                // Despawning a parent takes its children along: some may be gone already.
                if world.get_entity(entity).is_ok() {
                    world.despawn(entity);
                }
            }
        }
        let live: Vec<Entity> = world
            .spawn_batch(std::iter::repeat_n(Persist, self.entities.len()))
            .collect();
        let map: EntityHashMap<Entity> = self
            .entities
            .iter()
            .copied()
            .zip(live.iter().copied())
            .collect();
        let registry = self.registry.read();
        let mut mapper = SnapshotEntityMapper::new(&map);
        for (_, rows, column) in self.columns {
            let targets: Vec<Entity> = rows.iter().map(|r| live[*r as usize]).collect();
            column.apply(world, targets, &mut mapper, &registry);
        }
        for (_, resource) in self.resources {
            resource.apply(world, &mut mapper, &registry);
        }
        // Relationship hooks queue their half (a parent's `Children`) as commands: run them
        // now, or a world whose last column was `ChildOf` would be left without them.
        world.flush();
        map
    }
}
