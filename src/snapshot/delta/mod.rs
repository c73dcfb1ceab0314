//! Snapshot chains: a full snapshot (the *base*) followed by *deltas*, each holding only what
//! changed since the record before it.
//!
//! A delta is captured on the main thread from Bevy's change ticks: the typed columns query
//! `Changed<T>` since the chain's last capture, so the work is a pass over each typed
//! component's change ticks (no value is touched, no hash lookup made, for an unchanged
//! entity) plus the changed values themselves. What change ticks cannot tell (a component
//! removed, an entity despawned or unmarked) is recorded as it happens by an observer of
//! `Remove` on [`Persist`] and on every saved component type (the [`ChainTracker`]). The
//! observers exist only while a chain is being written; a load removes them.
//!
//! A delta holds, by saved entity id (`Entity::to_bits` of the run that wrote the chain):
//! entities despawned (or no longer [`Persist`]), components removed, and the values of
//! components added or changed, of entities that became persisted (all their components) and
//! of `ChildOf` for every child of a parent whose `Children` changed (so that a load rebuilds
//! the same order); and the allowlisted resources that changed. Its header names the record
//! it follows by length and CRC-32 ([`RecordLink`]): it never applies to another base.
//!
//! Loading merges base and deltas on a worker thread into one [`DecodedWorld`] (a value
//! overwritten, removed or despawned by a later delta is dropped there), so the main thread
//! applies the chain as it would one snapshot: all or nothing.
//!
//! Entity ids of a chain are those of the run that wrote it; a run that loads a world starts
//! a new chain with its next save (the plugin does this).

use std::collections::{HashMap, HashSet};

use bevy::ecs::change_detection::{CHECK_TICK_THRESHOLD, Tick};
use bevy::ecs::component::ComponentId;
use bevy::ecs::entity::{EntityHashMap, EntityHashSet};
use bevy::ecs::lifecycle::Remove;
use bevy::ecs::observer::Observer;
use bevy::ecs::reflect::{AppTypeRegistry, ReflectComponent};
use bevy::prelude::*;
use bevy::reflect::PartialReflect;
use serde::ser::SerializeTuple;
use serde::{Serialize, Serializer};

use super::capture::{CapturedWorld, capture, capture_resources};
use super::columns::{CapturedColumn, DeltaRows, DeltaScope, ReflectColumn, scan_changed};
use super::encode::{Columns, Resources, encode_body};
use super::header::{DELTA_FORMAT_VERSION, DeltaHeader, RecordLink, SnapshotEncoding};
use super::{Persist, SnapshotRegistry, SnapshotSettings};
use crate::error::{Result, StorageError};

mod merge;
pub(crate) use merge::ChainMerge;
pub use merge::{compact_chain, decode_chain};

/// When a chain is compacted: its next save is a full snapshot (a new base) once it holds
/// `max_deltas` deltas, or once its deltas together outgrow `max_delta_percent` of the
/// base's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainPolicy {
    /// Deltas after which the next save is full. Default 10. Loading a chain decodes every
    /// delta in it.
    pub max_deltas: u32,
    /// Total delta bytes, in percent of the base's bytes, past which the next save is
    /// full. Default 50.
    pub max_delta_percent: u32,
}

impl Default for ChainPolicy {
    fn default() -> Self {
        Self {
            max_deltas: 10,
            max_delta_percent: 50,
        }
    }
}

impl ChainPolicy {
    /// Sets [`max_deltas`](Self::max_deltas) (at least 1).
    pub fn max_deltas(mut self, n: u32) -> Self {
        self.max_deltas = n.max(1);
        self
    }

    /// Sets [`max_delta_percent`](Self::max_delta_percent).
    pub fn max_delta_percent(mut self, percent: u32) -> Self {
        self.max_delta_percent = percent;
        self
    }
}

/// Where a chain stands after its last stored record: what its next delta follows.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainCursor {
    since: Tick,
    parent: RecordLink,
    sequence: u32,
    base_len: u64,
    deltas_len: u64,
}

impl ChainCursor {
    /// Deltas stored after the base so far.
    pub fn deltas(&self) -> u32 {
        self.sequence
    }

    /// Bytes of the base.
    pub fn base_len(&self) -> u64 {
        self.base_len
    }

    /// Bytes of the deltas so far.
    pub fn deltas_len(&self) -> u64 {
        self.deltas_len
    }

    /// True when `policy` says the next save should be a full snapshot, or when the chain's
    /// last capture is so many change ticks ago that Bevy may have clamped the ticks since.
    pub fn wants_full(&self, policy: &ChainPolicy, world: &World) -> bool {
        self.wants_compaction(policy) || self.ticks_too_old(world)
    }

    /// True when `policy` says the chain is long enough: its next save should be a new base.
    /// That base need not be captured on the main thread: capture a delta as usual and fold
    /// the chain into a new base on a worker thread with
    /// [`store_compacted_autosave`](crate::snapshot::store_compacted_autosave) (the plugin
    /// does).
    pub fn wants_compaction(&self, policy: &ChainPolicy) -> bool {
        self.sequence >= policy.max_deltas
            || u128::from(self.deltas_len) * 100
                > u128::from(self.base_len) * u128::from(policy.max_delta_percent)
    }

    /// True when the chain's last capture is so many change ticks ago that Bevy may have
    /// clamped the ticks since: change detection can no longer tell what changed, and only a
    /// full capture is right.
    pub fn ticks_too_old(&self, world: &World) -> bool {
        let age = world
            .read_change_tick()
            .get()
            .wrapping_sub(self.since.get());
        age >= CHECK_TICK_THRESHOLD
    }

    /// The cursor of a new chain whose base, stored as `bytes`, is the chain up to the delta
    /// captured as `step` merged into one snapshot
    /// ([`store_compacted_autosave`](crate::snapshot::store_compacted_autosave)): its next
    /// delta holds what changed since that delta's capture.
    pub fn compacted(step: ChainStep, bytes: &[u8]) -> Self {
        ChainStart { tick: step.tick }.cursor(bytes)
    }

    /// The cursor once the delta captured as `step` is stored as `bytes`.
    pub fn advance(&self, step: ChainStep, bytes: &[u8]) -> Self {
        Self {
            since: step.tick,
            parent: RecordLink::of(bytes),
            sequence: step.sequence,
            base_len: self.base_len,
            deltas_len: self.deltas_len + bytes.len() as u64,
        }
    }
}

/// A chain's start: the change tick of its base's capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStart {
    tick: Tick,
}

impl ChainStart {
    /// The cursor once the base is stored as `bytes`.
    pub fn cursor(self, bytes: &[u8]) -> ChainCursor {
        ChainCursor {
            since: self.tick,
            parent: RecordLink::of(bytes),
            sequence: 0,
            base_len: bytes.len() as u64,
            deltas_len: 0,
        }
    }
}

/// What a captured delta moves its chain to, for [`ChainCursor::advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStep {
    tick: Tick,
    sequence: u32,
}

/// What the observers of a chain saw since its last capture. A resource, inserted by
/// [`capture_base`]; [`stop_chain`] removes the observers.
#[derive(Resource, Default)]
pub struct ChainTracker {
    persist: Option<ComponentId>,
    /// Entities whose `Persist` went (despawned, or the marker removed).
    left: Vec<Entity>,
    /// Saved components removed from entities that stayed.
    removed: Vec<(Entity, ComponentId)>,
    watched: HashSet<ComponentId>,
    observers: Vec<Entity>,
}

impl std::fmt::Debug for ChainTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainTracker")
            .field("left", &self.left.len())
            .field("removed", &self.removed.len())
            .field("watched", &self.watched.len())
            .finish()
    }
}

fn on_remove(event: On<Remove>, tracker: Option<ResMut<ChainTracker>>) {
    let Some(mut tracker) = tracker else {
        return;
    };
    let entity = event.event().entity;
    let components = event.trigger().components;
    if tracker.persist.is_some_and(|p| components.contains(&p)) {
        // It leaves the snapshot: its other removals do not matter.
        tracker.left.push(entity);
        return;
    }
    for &id in components {
        if tracker.watched.contains(&id) {
            tracker.removed.push((entity, id));
        }
    }
}

/// Watches `Persist` and every saved component of a persisted entity that is not watched yet.
/// Runs with every delta: the tracker resource is changed in place (a resource is an entity
/// in Bevy 0.19, and taking it out and back costs two archetype moves).
fn watch_persisted(world: &mut World, settings: &SnapshotSettings) {
    let persist = world.register_component::<Persist>();
    if !world.contains_resource::<ChainTracker>() {
        world.insert_resource(ChainTracker::default());
    }
    let mut new = Vec::new();
    {
        let tracker = world.resource::<ChainTracker>();
        if !tracker.watched.contains(&persist) {
            new.push(persist);
        }
        for archetype in world.archetypes().iter() {
            if archetype.is_empty() || !archetype.contains(persist) {
                continue;
            }
            for &id in archetype.components() {
                if tracker.watched.contains(&id) || new.contains(&id) {
                    continue;
                }
                let saved = world
                    .components()
                    .get_info(id)
                    .and_then(|info| info.type_id())
                    .is_some_and(|t| settings.saves_component(t));
                if saved {
                    new.push(id);
                }
            }
        }
    }
    let observer = (!new.is_empty()).then(|| {
        world
            .spawn(Observer::new(on_remove).with_components(new.clone()))
            .id()
    });
    let mut tracker = world.resource_mut::<ChainTracker>();
    tracker.persist = Some(persist);
    tracker.watched.extend(new);
    tracker.observers.extend(observer);
}

/// Ends any chain being written in `world`: removes its observers and what they recorded.
/// Run it before a load replaces the persisted entities (their despawns are no change to
/// record) — the plugin does.
pub fn stop_chain(world: &mut World) {
    if let Some(tracker) = world.remove_resource::<ChainTracker>() {
        for observer in tracker.observers {
            if let Ok(entity) = world.get_entity_mut(observer) {
                entity.despawn();
            }
        }
    }
}

/// Captures a full snapshot (as [`capture`]) that starts a chain: from now on removals and
/// despawns are recorded for the chain's deltas. Store the encoded bytes, then make the
/// chain's cursor with [`ChainStart::cursor`].
pub fn capture_base(
    world: &mut World,
    settings: &SnapshotSettings,
    snapshots: &SnapshotRegistry,
) -> Result<(CapturedWorld, ChainStart)> {
    stop_chain(world);
    // Changes from now on carry a later tick than everything this capture sees.
    let tick = world.increment_change_tick();
    watch_persisted(world, settings);
    let captured = capture(world, settings, snapshots)?;
    Ok((captured, ChainStart { tick }))
}

/// What changed in the persisted part of a world since the last record of its chain, cloned
/// out of it and ready to encode on any thread.
pub struct CapturedDelta {
    game_version: u32,
    encoding: SnapshotEncoding,
    entities: Vec<u64>,
    despawned: Vec<u64>,
    removed: Vec<(String, Vec<u32>)>,
    columns: Vec<Box<dyn CapturedColumn>>,
    resources: Vec<(String, Box<dyn PartialReflect>)>,
    registry: AppTypeRegistry,
    parent: RecordLink,
    step: ChainStep,
    live_count: u32,
}

impl std::fmt::Debug for CapturedDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturedDelta")
            .field("sequence", &self.step.sequence)
            .field("entities", &self.entities.len())
            .field("despawned", &self.despawned.len())
            .field("columns", &self.columns.len())
            .field("resources", &self.resources.len())
            .finish()
    }
}

impl CapturedDelta {
    /// Entities added or changed in this delta.
    pub fn entity_count(&self) -> usize {
        self.entities.len()
    }

    /// Entities despawned (or unmarked) in this delta.
    pub fn despawned_count(&self) -> usize {
        self.despawned.len()
    }

    /// Persisted entities in the world when it was captured.
    pub fn live_count(&self) -> usize {
        self.live_count as usize
    }

    /// What storing this delta moves its chain's cursor to ([`ChainCursor::advance`]).
    pub fn step(&self) -> ChainStep {
        self.step
    }

    /// Serializes the delta (run it on a task pool).
    pub fn encode(mut self) -> Result<Vec<u8>> {
        for column in &mut self.columns {
            column.sort_by_row();
        }
        let reg = self.registry.read();
        let body = DeltaBodyOut {
            entities: &self.entities,
            despawned: &self.despawned,
            removed: &self.removed,
            columns: Columns(&self.columns, &reg),
            resources: Resources(&self.resources, &reg),
        };
        let header = DeltaHeader {
            format_version: DELTA_FORMAT_VERSION,
            encoding: self.encoding,
            game_version: self.game_version,
            entity_count: self.entities.len() as u32,
            sequence: self.step.sequence,
            live_count: self.live_count,
            parent: self.parent,
        };
        encode_body(
            self.encoding,
            &header.to_bytes(),
            64 * self.entities.len(),
            &body,
        )
    }
}

struct DeltaBodyOut<'a> {
    entities: &'a [u64],
    despawned: &'a [u64],
    removed: &'a [(String, Vec<u32>)],
    columns: Columns<'a>,
    resources: Resources<'a>,
}

impl Serialize for DeltaBodyOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(5)?;
        t.serialize_element(self.entities)?;
        t.serialize_element(self.despawned)?;
        t.serialize_element(self.removed)?;
        t.serialize_element(&self.columns)?;
        t.serialize_element(&self.resources)?;
        t.end()
    }
}

/// Persisted entities, from the archetype sizes (no entity is visited).
fn persisted_count(world: &World, persist: ComponentId) -> u32 {
    world
        .archetypes()
        .iter()
        .filter(|a| a.contains(persist))
        .map(|a| a.len() as usize)
        .sum::<usize>() as u32
}

/// Captures what changed since `cursor`'s record: the main-thread part of an incremental
/// save. Store the encoded bytes as the record after the cursor's, then
/// [`advance`](ChainCursor::advance) the cursor; if storing fails, start a new chain (the
/// removals this delta took from the [`ChainTracker`] are in no other delta).
///
/// Fails if the world has no chain running ([`capture_base`] was not called on it, or a load
/// stopped it), or as [`capture`] does.
pub fn capture_delta(
    world: &mut World,
    settings: &SnapshotSettings,
    snapshots: &SnapshotRegistry,
    cursor: &ChainCursor,
) -> Result<CapturedDelta> {
    if !world.contains_resource::<ChainTracker>() {
        return Err(StorageError::Snapshot(
            "no snapshot chain is running in this world (a load ends it): save a full snapshot first"
                .into(),
        ));
    }
    let registry = world.get_resource_or_init::<AppTypeRegistry>().clone();
    let tick = world.increment_change_tick();
    watch_persisted(world, settings);
    let persist = world.register_component::<Persist>();
    let (left, removed_ids) = {
        let mut tracker = world.resource_mut::<ChainTracker>();
        (
            std::mem::take(&mut tracker.left),
            std::mem::take(&mut tracker.removed),
        )
    };
    let since = cursor.since;
    let (mut rows, despawned, removed, mut columns, resources) =
        world.last_change_tick_scope(since, |world| {
            changed_parts(
                world,
                settings,
                snapshots,
                &registry,
                since,
                left,
                removed_ids,
            )
        })?;
    let live_count = persisted_count(world, persist);

    // Rows in hierarchy order among siblings, so that `ChildOf` replays in `Children` order.
    let child_of = columns
        .iter()
        .find(|c| c.type_path() == ChildOf::type_path());
    let order = child_of.and_then(|c| sibling_order(world, &rows.entities, c.rows()));
    let mut removed = removed;
    if let Some(order) = order {
        let mut new_row = vec![0u32; order.len()];
        for (new, &old) in order.iter().enumerate() {
            new_row[old as usize] = new as u32;
        }
        for column in &mut columns {
            for row in column.rows_mut() {
                *row = new_row[*row as usize];
            }
        }
        for (_, list) in &mut removed {
            for row in list {
                *row = new_row[*row as usize];
            }
        }
        rows.entities = order
            .iter()
            .map(|&old| rows.entities[old as usize])
            .collect();
    }
    Ok(CapturedDelta {
        game_version: settings.game_version,
        encoding: settings.encoding,
        entities: rows.entities.iter().map(|e| e.to_bits()).collect(),
        despawned,
        removed,
        columns,
        resources,
        registry,
        parent: cursor.parent,
        step: ChainStep {
            tick,
            sequence: cursor.sequence + 1,
        },
        live_count,
    })
}

type ChangedParts = (
    DeltaRows,
    Vec<u64>,
    Vec<(String, Vec<u32>)>,
    Vec<Box<dyn CapturedColumn>>,
    Vec<(String, Box<dyn PartialReflect>)>,
);

/// The delta's content; runs with the world's last change tick set to the chain's.
fn changed_parts(
    world: &mut World,
    settings: &SnapshotSettings,
    snapshots: &SnapshotRegistry,
    registry: &AppTypeRegistry,
    since: Tick,
    left: Vec<Entity>,
    removed_ids: Vec<(Entity, ComponentId)>,
) -> Result<ChangedParts> {
    let this_run = world.read_change_tick();
    let persist = world.register_component::<Persist>();
    let mut fresh = EntityHashSet::default();
    scan_changed(world, persist, true, |entity| {
        fresh.insert(entity);
    });
    let mut reordered = EntityHashSet::default();
    let mut parents =
        world.query_filtered::<(Entity, &Children), (With<Persist>, Changed<Children>)>();
    let mut seen_parents = EntityHashSet::default();
    for (parent, children) in parents.iter(world) {
        seen_parents.insert(parent);
        reordered.extend(
            children
                .iter()
                .filter(|c| world.get::<Persist>(*c).is_some()),
        );
    }
    // A child marked again under an unchanged parent: its siblings' order goes in with it,
    // or a load would put it after the siblings saved before.
    for entity in &fresh {
        let Some(parent) = world.get::<ChildOf>(*entity).map(ChildOf::parent) else {
            continue;
        };
        if !seen_parents.insert(parent) || world.get::<Persist>(parent).is_none() {
            continue;
        }
        if let Some(children) = world.get::<Children>(parent) {
            reordered.extend(
                children
                    .iter()
                    .filter(|c| world.get::<Persist>(*c).is_some()),
            );
        }
    }
    let mut despawned = Vec::new();
    let mut seen_left = EntityHashSet::default();
    for entity in left {
        if !seen_left.insert(entity) {
            continue;
        }
        let persisted = world
            .get_entity(entity)
            .is_ok_and(|e| e.contains_id(persist));
        // Unmarked and marked again: saved anew (it is `fresh`), so the old state goes.
        if !persisted || fresh.contains(&entity) {
            despawned.push(entity.to_bits());
        }
    }

    let scope = DeltaScope { fresh, reordered };
    let mut rows = DeltaRows::default();
    let mut columns: Vec<Box<dyn CapturedColumn>> = Vec::new();
    let mut typed_ids = HashMap::new();
    for codec in &snapshots.typed {
        typed_ids.insert(codec.type_id(), codec.type_path());
        if settings.saves_component(codec.type_id()) {
            let column = codec.capture_changed(world, &scope, &mut rows);
            if !column.rows().is_empty() {
                columns.push(column);
            }
        }
    }

    let reg = registry.read();
    let type_path_of = |world: &World, id: ComponentId| -> Option<String> {
        let type_id = world.components().get_info(id)?.type_id()?;
        if !settings.saves_component(type_id) {
            return None;
        }
        if let Some(path) = typed_ids.get(&type_id) {
            return Some((*path).to_owned());
        }
        reg.get(type_id)
            .filter(|r| r.data::<ReflectComponent>().is_some())
            .map(|r| r.type_info().type_path().to_owned())
    };

    // Reflected components: the saved ones on persisted entities, then for each the entities
    // whose ticks say changed (the tick columns of the tables when table-stored, each entity's
    // ticks otherwise) and the fresh entities that hold it.
    let mut reflect_ids: Vec<(ComponentId, &ReflectComponent, String)> = Vec::new();
    for archetype in world.archetypes().iter() {
        if archetype.is_empty() || !archetype.contains(persist) {
            continue;
        }
        for &component_id in archetype.components() {
            if reflect_ids.iter().any(|(id, ..)| *id == component_id) {
                continue;
            }
            let Some(type_id) = world
                .components()
                .get_info(component_id)
                .and_then(|i| i.type_id())
            else {
                continue;
            };
            if typed_ids.contains_key(&type_id) || !settings.saves_component(type_id) {
                continue;
            }
            let Some(registration) = reg.get(type_id) else {
                continue;
            };
            let Some(reflect_component) = registration.data::<ReflectComponent>() else {
                continue;
            };
            let path = registration.type_info().type_path().to_owned();
            reflect_ids.push((component_id, reflect_component, path));
        }
    }
    let mut reflected: HashMap<ComponentId, ReflectColumn> = HashMap::new();
    for (component_id, reflect_component, type_path) in reflect_ids {
        let mut changed: Vec<Entity> = Vec::new();
        let scanned = scan_changed(world, component_id, false, |e| changed.push(e));
        if !scanned {
            for archetype in world.archetypes().iter() {
                if archetype.is_empty()
                    || !archetype.contains(persist)
                    || !archetype.contains(component_id)
                {
                    continue;
                }
                changed.extend(archetype.entities().iter().map(|a| a.id()).filter(|e| {
                    world
                        .entity(*e)
                        .get_change_ticks_by_id(component_id)
                        .is_some_and(|t| t.is_changed(since, this_run))
                }));
            }
        }
        let mut seen: EntityHashSet = changed.iter().copied().collect();
        changed.extend(
            scope
                .fresh
                .iter()
                .filter(|e| world.entity(**e).contains_id(component_id) && seen.insert(**e)),
        );
        for entity in changed {
            let Some(value) = reflect_component.reflect(world.entity(entity)) else {
                continue;
            };
            let cloned = match value.reflect_clone() {
                Ok(v) => v.into_partial_reflect(),
                Err(_) => value.to_dynamic(),
            };
            let column = reflected
                .entry(component_id)
                .or_insert_with(|| ReflectColumn {
                    type_path: type_path.clone(),
                    rows: Vec::new(),
                    values: Vec::new(),
                });
            column.rows.push(rows.row(entity));
            column.values.push(cloned);
        }
    }
    let mut reflected: Vec<ReflectColumn> = reflected.into_values().collect();
    reflected.sort_by(|a, b| a.type_path.cmp(&b.type_path));
    columns.extend(
        reflected
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn CapturedColumn>),
    );

    // Removed components of entities that stay persisted.
    let mut removed: Vec<(String, Vec<u32>)> = Vec::new();
    let mut removed_seen = HashSet::new();
    for (entity, id) in removed_ids {
        if scope.fresh.contains(&entity) || !removed_seen.insert((entity, id)) {
            continue;
        }
        let Ok(entity_ref) = world.get_entity(entity) else {
            continue;
        };
        if !entity_ref.contains_id(persist) || entity_ref.contains_id(id) {
            continue; // gone, or inserted again (then it is changed)
        }
        let Some(type_path) = type_path_of(world, id) else {
            continue;
        };
        let row = rows.row(entity);
        match removed.iter_mut().find(|(p, _)| *p == type_path) {
            Some((_, list)) => list.push(row),
            None => removed.push((type_path, vec![row])),
        }
    }

    // Allowlisted resources that changed.
    let resources = capture_resources(world, &reg, settings, |entity, id| {
        entity
            .get_change_ticks_by_id(id)
            .is_some_and(|t| t.is_changed(since, this_run))
    })?;
    drop(reg);
    Ok((rows, despawned, removed, columns, resources))
}

/// A new order of `entities` (old indices) in which the children of each parent (the rows
/// of the delta's `ChildOf` column, `child_rows`) come in their `Children` order; `None` when
/// none of them has a parent (nothing to reorder).
fn sibling_order(world: &World, entities: &[Entity], child_rows: &[u32]) -> Option<Vec<u32>> {
    let mut parents: EntityHashMap<Entity> = EntityHashMap::default();
    for row in child_rows {
        let entity = entities[*row as usize];
        if let Some(child_of) = world.get::<ChildOf>(entity) {
            parents.insert(entity, child_of.parent());
        }
    }
    if parents.is_empty() {
        return None;
    }
    let mut position: EntityHashMap<usize> = EntityHashMap::default();
    let mut indexed = EntityHashSet::default();
    for parent in parents.values() {
        if indexed.insert(*parent)
            && let Some(children) = world.get::<Children>(*parent)
        {
            position.extend(children.iter().enumerate().map(|(i, c)| (c, i)));
        }
    }
    let mut order: Vec<u32> = (0..entities.len() as u32).collect();
    order.sort_by_key(|&i| {
        let e = entities[i as usize];
        match parents.get(&e) {
            Some(parent) => (1, parent.to_bits(), position.get(&e).copied().unwrap_or(0)),
            None => (0, 0, i as usize),
        }
    });
    Some(order)
}
