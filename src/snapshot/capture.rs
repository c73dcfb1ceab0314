//! Step 1, on the main thread: clone the persisted part of the world out of it.

use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use bevy::ecs::component::ComponentId;
use bevy::ecs::entity::{EntityHashMap, EntityHashSet};
use bevy::ecs::reflect::{AppTypeRegistry, ReflectComponent, ReflectResource};
use bevy::prelude::*;
use bevy::reflect::PartialReflect;

use super::columns::{CapturedColumn, ReflectColumn};
use super::{Persist, SnapshotEncoding, SnapshotRegistry, SnapshotSettings};
use crate::error::{Result, StorageError};

/// The persisted part of a world, cloned out of it and ready to encode on any thread.
pub struct CapturedWorld {
    pub(crate) game_version: u32,
    pub(crate) encoding: SnapshotEncoding,
    /// Saved entity ids (`Entity::to_bits` at capture; file-local), in hierarchy order.
    pub(crate) entities: Vec<u64>,
    pub(crate) columns: Vec<Box<dyn CapturedColumn>>,
    pub(crate) resources: Vec<(String, Box<dyn PartialReflect>)>,
    pub(crate) registry: AppTypeRegistry,
}

impl CapturedWorld {
    /// Number of entities captured.
    pub fn entity_count(&self) -> usize {
        self.entities.len()
    }

    /// Number of resources captured.
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }
}

impl std::fmt::Debug for CapturedWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturedWorld")
            .field("entities", &self.entities.len())
            .field("columns", &self.columns.len())
            .field("resources", &self.resources.len())
            .finish()
    }
}

/// Clones every [`Persist`] entity's saved components and the allowlisted resources out of
/// `world`. This is the only snapshot step that needs the world; encoding runs elsewhere.
///
/// Fails if an allowlisted resource is not reflected with `#[reflect(Resource)]`.
pub fn capture(
    world: &mut World,
    settings: &SnapshotSettings,
    snapshots: &SnapshotRegistry,
) -> Result<CapturedWorld> {
    let registry = world.get_resource_or_init::<AppTypeRegistry>().clone();
    let entities = persisted_in_hierarchy_order(world);
    let rows: EntityHashMap<u32> = entities
        .iter()
        .enumerate()
        .map(|(i, e)| (*e, i as u32))
        .collect();

    let mut columns: Vec<Box<dyn CapturedColumn>> = Vec::new();
    let mut typed_ids = HashSet::new();
    for codec in &snapshots.typed {
        typed_ids.insert(codec.type_id());
        if settings.saves_component(codec.type_id()) {
            let column = codec.capture(world, &rows);
            if !column.rows().is_empty() {
                columns.push(column);
            }
        }
    }

    let reg = registry.read();
    let mut reflected: HashMap<ComponentId, ReflectColumn> = HashMap::new();
    if let Some(persist_id) = world.component_id::<Persist>() {
        for archetype in world.archetypes().iter() {
            if archetype.is_empty() || !archetype.contains(persist_id) {
                continue;
            }
            for &component_id in archetype.components() {
                let Some(info) = world.components().get_info(component_id) else {
                    continue;
                };
                let Some(type_id) = info.type_id() else {
                    continue;
                };
                if typed_ids.contains(&type_id) || !settings.saves_component(type_id) {
                    continue;
                }
                let Some(reflect_component) =
                    reg.get(type_id).and_then(|r| r.data::<ReflectComponent>())
                else {
                    warn_once_unreflected(&info.name().to_string());
                    continue;
                };
                let column = reflected
                    .entry(component_id)
                    .or_insert_with(|| ReflectColumn {
                        type_path: reg
                            .get(type_id)
                            .map(|r| r.type_info().type_path().to_owned())
                            .unwrap_or_default(),
                        rows: Vec::new(),
                        values: Vec::new(),
                    });
                for archetype_entity in archetype.entities() {
                    let entity = archetype_entity.id();
                    let Some(&row) = rows.get(&entity) else {
                        continue;
                    };
                    let Some(value) = reflect_component.reflect(world.entity(entity)) else {
                        continue;
                    };
                    let cloned = match value.reflect_clone() {
                        Ok(v) => v.into_partial_reflect(),
                        Err(_) => value.to_dynamic(),
                    };
                    column.rows.push(row);
                    column.values.push(cloned);
                }
            }
        }
    }
    let mut reflected: Vec<ReflectColumn> = reflected.into_values().collect();
    reflected.sort_by(|a, b| a.type_path.cmp(&b.type_path));
    columns.extend(
        reflected
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn CapturedColumn>),
    );

    let resources = capture_resources(world, &reg, settings, |_, _| true)?;
    drop(reg);

    Ok(CapturedWorld {
        game_version: settings.game_version,
        encoding: settings.encoding,
        entities: entities.iter().map(|e| e.to_bits()).collect(),
        columns,
        resources,
        registry,
    })
}

/// The allowlisted resources of `settings` that `keep` accepts (given the resource's entity
/// and component id), in type-path order, as reflected clones: what a full snapshot stores
/// (every one) and what a delta stores (the changed ones). An allowlisted type that is not
/// registered as a reflected resource is an error; one never inserted is skipped.
pub(super) fn capture_resources(
    world: &World,
    reg: &bevy::reflect::TypeRegistry,
    settings: &SnapshotSettings,
    keep: impl Fn(EntityRef<'_>, ComponentId) -> bool,
) -> Result<Vec<(String, Box<dyn PartialReflect>)>> {
    let mut resources = Vec::new();
    let mut wanted: Vec<TypeId> = settings.resources.iter().copied().collect();
    wanted.sort_by_key(|t| reg.get(*t).map(|r| r.type_info().type_path()));
    for type_id in wanted {
        let registration = reg
            .get(type_id)
            .filter(|r| r.data::<ReflectResource>().is_some());
        let Some(registration) = registration else {
            return Err(StorageError::Snapshot(format!(
                "an allowlisted resource ({type_id:?}) is not registered for reflection: derive Reflect and add #[reflect(Resource)]"
            )));
        };
        let Some(reflect_component) = registration.data::<ReflectComponent>() else {
            continue;
        };
        let Some(component_id) = world.components().get_valid_id(type_id) else {
            continue; // never inserted: nothing to save
        };
        let Some(entity) = world.resource_entities().get(component_id) else {
            continue;
        };
        let entity_ref = world.entity(entity);
        if !keep(entity_ref, component_id) {
            continue;
        }
        if let Some(value) = reflect_component.reflect(entity_ref) {
            let cloned = match value.reflect_clone() {
                Ok(v) => v.into_partial_reflect(),
                Err(_) => value.to_dynamic(),
            };
            resources.push((registration.type_info().type_path().to_owned(), cloned));
        }
    }
    Ok(resources)
}

/// Every persisted entity, parents before children and siblings in their `Children` order,
/// so that re-inserting `ChildOf` in this order rebuilds the same `Children` lists.
fn persisted_in_hierarchy_order(world: &mut World) -> Vec<Entity> {
    let mut query = world.query_filtered::<(Entity, Option<&ChildOf>), With<Persist>>();
    let found: Vec<(Entity, Option<Entity>)> = query
        .iter(world)
        .map(|(e, p)| (e, p.map(ChildOf::parent)))
        .collect();
    if found.iter().all(|(_, parent)| parent.is_none()) {
        return found.into_iter().map(|(e, _)| e).collect();
    }
    let persisted: EntityHashSet = found.iter().map(|(e, _)| *e).collect();
    let mut order = Vec::with_capacity(found.len());
    let mut stack = Vec::new();
    for (entity, parent) in &found {
        if parent.is_some_and(|p| persisted.contains(&p)) {
            continue; // reached from its parent
        }
        stack.push(*entity);
        while let Some(next) = stack.pop() {
            order.push(next);
            if let Some(children) = world.get::<Children>(next) {
                stack.extend(children.iter().rev().filter(|c| persisted.contains(c)));
            }
        }
    }
    order
}

fn warn_once_unreflected(name: &str) {
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut warned = WARNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if warned.insert(name.to_owned()) {
        warn!(
            "component {name} on a persisted entity is not reflected (derive Reflect, add #[reflect(Component)]) and is left out of snapshots"
        );
    }
}
